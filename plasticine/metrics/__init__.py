"""Image-comparison metrics: paired scores in a mask (MAE, PSNR, SSIM), NMI, histogram and Frechet distances."""

from .distribution import (
    bhattacharyya_distance,
    frechet_distance,
    intensity_histogram,
    normalized_mutual_information,
    simplified_frechet_distance,
)
from .features import RandomFeatures, image_features
from .image import mae, psnr, ssim

__all__ = [
    "RandomFeatures",
    "bhattacharyya_distance",
    "frechet_distance",
    "image_features",
    "intensity_histogram",
    "mae",
    "normalized_mutual_information",
    "psnr",
    "simplified_frechet_distance",
    "ssim",
]
