"""Structure maps (Potts, k-means, multi-Otsu) and segmentation tools."""

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
from .potts import PottsExtractor, pixel_gamma, potts, potts_1d, potts_energy, potts_structure_map

__all__ = [
    "KMeansExtractor",
    "KMeansResult",
    "MultiOtsuExtractor",
    "PottsExtractor",
    "kmeans",
    "kmeans_structure_map",
    "multi_otsu_structure_map",
    "multi_otsu_thresholds",
    "one_hot",
    "pixel_gamma",
    "potts",
    "potts_1d",
    "potts_energy",
    "potts_structure_map",
]
