"""plasticine.segmentation."""
