r"""The paper's "basic contours": the boundaries of a partition given by another extractor.

For a partition with labels :math:`\ell(p) = \arg\max_k P_k(p)` (the first class on ties), the
contour map is

.. math::

    E(p) = [\, \exists\, q \in \mathcal N(p) : \ell(q) \neq \ell(p) \,],

with :math:`\mathcal N(p)` the face neighbours (4 in 2D, 6 in 3D) inside the image: both pixels of
every boundary pair are marked, so the map is symmetric under swapping the two sides.

**Invariance.** :math:`E` depends on the partition only up to a permutation of its labels:
:math:`E(P \pi) = E(P)` for every permutation :math:`\pi` of the channels. It is therefore
invariant to every intensity remap to which the inner partition is invariant up to relabelling:
a k-means, multi-Otsu or Potts partition is ordered by intensity, so a contrast inversion reverses
its labels and keeps its boundaries wherever the partition itself is unchanged up to that
reversal (exactly for two classes on an image without ties of the thresholds).
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.config import Configurable
from ..core.shapes import check_shape
from .foreground import _axis_offsets
from .potts_model.extractor import PottsExtractor
from .potts_model.neighborhoods import _shifted_pair

__all__ = ["contour_map", "ContourExtractor"]


def contour_map(partition: torch.Tensor) -> torch.Tensor:
    """Boundary map of a partition: 1 where a pixel's label differs from a face neighbour's.

    Args:
        partition: one-hot or soft class maps (the label is the argmax over channels).

    Returns:
        The contour map, 0 or 1, in the partition's dtype.

    Shape:
        partition: ``(B, L, *S)``; out: ``(B, 1, *S)``.

    Example:
        >>> p = torch.zeros(1, 2, 1, 4)
        >>> p[:, 0, :, :2] = 1
        >>> p[:, 1, :, 2:] = 1
        >>> contour_map(p).view(-1).tolist()
        [0.0, 1.0, 1.0, 0.0]
    """
    check_shape(partition, "B L *S", "partition", floating=True)
    labels = partition.argmax(1, keepdim=True)
    edges = torch.zeros_like(labels, dtype=torch.bool)
    for offset in _axis_offsets(labels.dim() - 2):
        a, b = _shifted_pair(labels, offset)
        ea, eb = _shifted_pair(edges, offset)
        differ = a != b
        ea |= differ
        eb |= differ
    return edges.to(partition.dtype)


class ContourExtractor(Configurable, nn.Module):
    """Structure extractor: the contours of another extractor's partition (see :func:`contour_map`).

    Invariant to permutations of the inner partition's labels, hence to every remap (contrast
    inversion among them) that permutes them (see :mod:`plasticine.segmentation.contours`).

    Args:
        extractor: the partition whose boundaries are taken (a one-hot or soft
            :class:`~plasticine.core.StructureExtractor`); None for the paper's two-class Potts
            partition, :class:`~plasticine.segmentation.PottsExtractor` ``()``.

    Shape:
        image: ``(B, C, *S)``; out: ``(B, 1, *S)``, 0 or 1; pair it with ``ConcatConditioning(1)``.

    Example:
        >>> x = torch.zeros(1, 1, 6, 6)
        >>> x[..., :, 3:] = 1.0
        >>> ContourExtractor()(x)[0, 0, 0].tolist()
        [0.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    """

    def __init__(self, extractor: nn.Module | None = None):
        super().__init__()
        self.extractor = PottsExtractor() if extractor is None else extractor

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Contour map of ``image`` ``(B, C, *S)`` -> ``(B, 1, *S)``."""
        return contour_map(self.extractor(image))

    def extra_repr(self) -> str:
        return ""
