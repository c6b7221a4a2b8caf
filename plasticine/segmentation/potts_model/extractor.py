r"""The extractor-facing side of the Potts model: size-independent penalty, structure map, extractor.

**Scale.** The jump term counts boundary pixels while the data term sums over pixels, so an image
resampled by a factor :math:`s` per axis needs :math:`\gamma` scaled by :math:`s` to keep the same
partition. :class:`PottsExtractor` therefore takes ``gamma`` for a reference side length of 256
pixels and uses :math:`\gamma_{\text{pixel}} = \gamma \, (\prod_i S_i)^{1/N} / 256`
(:func:`pixel_gamma`), on intensities min-max normalised to [0, 1] per image and channel.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ...core.config import Configurable
from ...core.shapes import check_shape
from ...core.validate import check_int, check_number, check_option
from ..extractors import kmeans, one_hot
from .admm import potts
from .neighborhoods import Neighborhood

__all__ = ["REFERENCE_SIZE", "pixel_gamma", "potts_structure_map", "PottsExtractor"]


REFERENCE_SIZE = 256
"""Side length (pixels) at which :class:`PottsExtractor`'s ``gamma`` is the per-pixel jump penalty."""


def pixel_gamma(gamma: float, shape: tuple[int, ...] | torch.Size, reference: int = REFERENCE_SIZE) -> float:
    r"""Per-pixel jump penalty for an image of spatial size ``shape`` from a size-independent ``gamma``.

    .. math::

        \gamma_{\text{pixel}} = \gamma \, \frac{(\prod_{i=1}^N S_i)^{1/N}}{\text{reference}},

    so that an image resampled by a factor ``s`` per axis, whose boundary lengths grow like ``s``
    pixels relative to its areas, keeps the same partition. At ``S = (256, 256)`` (the reference)
    ``gamma`` is the per-pixel penalty.

    Args:
        gamma: penalty at the reference size.
        shape: spatial size ``S``.
        reference: reference side length in pixels.

    Returns:
        The per-pixel penalty.

    Shape:
        shape: ``(N,)`` sizes.
    """
    size = [int(s) for s in shape]
    if not size or min(size) < 1:
        raise ValueError(f"shape: expected positive sizes, got {tuple(shape)}")
    return float(gamma) * math.prod(size) ** (1.0 / len(size)) / float(reference)


def _normalized(image: torch.Tensor) -> torch.Tensor:
    """Min-max normalisation to [0, 1] per image and channel (a constant channel becomes 0)."""
    flat = image.flatten(2)
    lo = flat.amin(2)
    span = flat.amax(2) - lo
    span = torch.where(span > 0, span, torch.ones_like(span))
    shape = (*image.shape[:2], *([1] * (image.dim() - 2)))
    return (image - lo.view(shape)) / span.view(shape)


def potts_structure_map(
    image: torch.Tensor,
    num_classes: int = 2,
    gamma: float = 0.5,
    *,
    neighborhood: Neighborhood = "axes",
    normalize: bool = True,
    max_iter: int = 100,
) -> torch.Tensor:
    r"""One-hot structure map: Potts partition of the image, its regions clustered into ``L`` classes.

    The image is min-max normalised to [0, 1] per image and channel (``normalize=True``),
    partitioned by :func:`potts` with the per-pixel penalty :func:`pixel_gamma` ``(gamma, S)`` (so
    that resampled images get the same partition), and the piecewise-constant result is clustered
    by :func:`~plasticine.segmentation.extractors.kmeans` (deterministic quantile start) into
    ``num_classes`` classes ordered by mean intensity.

    Args:
        image: images, one or more channels (channels share the partition).
        num_classes: number of classes ``L`` (2: background and foreground, as in the paper).
        gamma: jump penalty at the reference size of 256 pixels per side, on [0, 1] intensities.
        neighborhood: ``"axes"`` or ``"diagonals"`` (2D only), see :func:`potts`.
        normalize: min-max normalise each image and channel first.
        max_iter: most ADMM iterations of :func:`potts`.

    Returns:
        One-hot map in the image's dtype, class 0 the darkest.

    Shape:
        image: ``(B, C, *S)``; out: ``(B, L, *S)``.

    Reference:
        Storath, Weinmann, Frikel and Unser, Inverse Problems 31(2), 2015; Storath and Weinmann,
        SIAM J. Imaging Sci. 7(3), 2014.
    """
    check_shape(image, "B C *S", "image", floating=True)
    x = _normalized(image) if normalize else image
    u = potts(x, pixel_gamma(gamma, image.shape[2:]), neighborhood=neighborhood, max_iter=max_iter)
    return one_hot(kmeans(u, num_classes).labels, num_classes, image.dtype)


class PottsExtractor(Configurable, nn.Module):
    """Structure extractor of the paper: Potts partition clustered into ``L`` classes.

    Stores the settings of :func:`potts_structure_map` and calls it; deterministic, 2D and 3D.

    Args:
        num_classes: number of classes ``L``.
        gamma: jump penalty at the reference size (256 pixels per side) on [0, 1] intensities;
            larger gives coarser maps.
        neighborhood: ``"axes"`` or ``"diagonals"`` (2D only).
        normalize: min-max normalise each image and channel first.
        max_iter: most ADMM iterations.

    Shape:
        image: ``(B, C, *S)``; out: ``(B, L, *S)`` one-hot.

    Example:
        >>> x = torch.zeros(1, 1, 16, 16)
        >>> x[..., 4:12, 4:12] = 1.0
        >>> PottsExtractor(2)(x)[0, 1].sum().item()
        64.0
    """

    def __init__(
        self,
        num_classes: int = 2,
        gamma: float = 0.5,
        neighborhood: Neighborhood = "axes",
        normalize: bool = True,
        max_iter: int = 100,
    ):
        super().__init__()
        self.num_classes = check_int(num_classes, "num_classes", 1)
        self.gamma = check_number(gamma, "gamma", 0, min_open=True)
        self.neighborhood = check_option(neighborhood, "neighborhood", ("axes", "diagonals"))
        self.normalize = bool(normalize)
        self.max_iter = check_int(max_iter, "max_iter", 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Structure map of ``image`` ``(B, C, *S)`` -> ``(B, L, *S)``."""
        return potts_structure_map(
            image,
            self.num_classes,
            self.gamma,
            neighborhood=self.neighborhood,
            normalize=self.normalize,
            max_iter=self.max_iter,
        )

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, gamma={self.gamma}, neighborhood={self.neighborhood!r}"
