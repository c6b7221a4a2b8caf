"""plasticine.diffusion."""
