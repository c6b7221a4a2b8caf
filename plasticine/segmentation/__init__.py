"""Structure maps (Potts, k-means, multi-Otsu, foreground mask, MIND-SSC, contours, rims and stacks of them) and segmentation tools."""

from .extractors import (
    KMeansExtractor,
    KMeansResult,
    MultiOtsuExtractor,
    kmeans,
    kmeans_structure_map,
    multi_otsu_structure_map,
    multi_otsu_thresholds,
    one_hot,
)
from .contours import ContourExtractor, contour_map
from .foreground import ForegroundExtractor, foreground_mask
from .mind import MINDExtractor, mind_descriptor, mind_pairs
from .metrics import accuracy, confusion_matrix, dice, hausdorff95, iou, pixel_accuracy
from .stacked import StackedExtractor
from .rim import RimExtractor, rim_mask
from .potts_model import PottsExtractor, line_backend, pixel_gamma, potts, potts_1d, potts_energy, potts_structure_map
from .unet import SegmentationLoss, SegmentationUNet, SegmentationUNetConfig, segmentation_loss, train_segmentation

__all__ = [
    "ContourExtractor",
    "ForegroundExtractor",
    "KMeansExtractor",
    "KMeansResult",
    "MINDExtractor",
    "MultiOtsuExtractor",
    "PottsExtractor",
    "RimExtractor",
    "SegmentationLoss",
    "SegmentationUNet",
    "SegmentationUNetConfig",
    "StackedExtractor",
    "accuracy",
    "confusion_matrix",
    "contour_map",
    "dice",
    "foreground_mask",
    "hausdorff95",
    "iou",
    "kmeans",
    "kmeans_structure_map",
    "mind_descriptor",
    "mind_pairs",
    "multi_otsu_structure_map",
    "multi_otsu_thresholds",
    "one_hot",
    "pixel_accuracy",
    "pixel_gamma",
    "potts",
    "potts_1d",
    "line_backend",
    "potts_energy",
    "potts_structure_map",
    "rim_mask",
    "segmentation_loss",
    "train_segmentation",
]
