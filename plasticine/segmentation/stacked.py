r"""Several structure maps as one: the channel concatenation of the maps of a list of extractors.

For extractors :math:`E_1, \dots, E_m` with :math:`L_1, \dots, L_m` channels,

.. math::

    E(x) = [\,E_1(x);\ E_2(x);\ \dots;\ E_m(x)\,] \in [0, 1]^{(L_1 + \dots + L_m) \times S},

channel by channel in the order given. The stacked map is invariant to every intensity remap to
which all its parts are invariant (the intersection of their invariances): a filled foreground mask
stacked with MIND-SSC (the default of ``plasticine train``) keeps the head outline of the first and
the local self-similarity of the second, and both are unchanged by positive affine remaps. It is a
partition only when it has a single part that is one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..core.config import Configurable
from ..core.shapes import check_shape

__all__ = ["StackedExtractor"]


def _channels(extractor: nn.Module, ndim: int) -> int:
    """Channels of one part's map for ``ndim``-dimensional images (``num_channels(ndim)`` or ``num_classes``)."""
    if hasattr(extractor, "num_channels"):
        return int(extractor.num_channels(ndim))
    if hasattr(extractor, "num_classes"):
        return int(extractor.num_classes)
    raise ValueError(
        f"extractors: {type(extractor).__name__} states neither num_channels(ndim) nor num_classes, so the stacked map's channels are unknown"
    )


class StackedExtractor(Configurable, nn.Module):
    """Structure extractor: the channel concatenation of the maps of ``extractors`` (see :mod:`plasticine.segmentation.stacked`).

    Args:
        extractors: one or more :class:`~plasticine.core.StructureExtractor` modules, each stating
            its channels (``num_channels(ndim)``, as :class:`~plasticine.segmentation.MINDExtractor`,
            or ``num_classes``, as the partitions).

    Raises:
        ValueError: for an empty list or a part that does not state its channels.

    Shape:
        image: ``(B, C, *S)``; out: ``(B, L_1 + ... + L_m, *S)``; pair it with
        ``ConcatConditioning(extractor.num_channels(ndim))``.

    Example:
        >>> from plasticine.segmentation import ForegroundExtractor, MINDExtractor
        >>> ext = StackedExtractor([ForegroundExtractor(), MINDExtractor()])
        >>> ext.num_channels(2), ext(torch.rand(1, 1, 16, 16)).shape
        (6, torch.Size([1, 6, 16, 16]))
    """

    def __init__(self, extractors: Sequence[nn.Module]):
        super().__init__()
        if isinstance(extractors, nn.Module) or not isinstance(extractors, Sequence) or len(extractors) == 0:
            raise ValueError(f"extractors: expected a non-empty list of structure extractors, got {extractors!r:.80}")
        for part in extractors:
            if not isinstance(part, nn.Module):
                raise ValueError(f"extractors: expected structure extractor modules, got a {type(part).__name__}")
            _channels(part, 2)
        self.extractors = nn.ModuleList(extractors)

    def num_channels(self, ndim: int) -> int:
        """Channels of the stacked map of ``ndim``-dimensional images: the sum over the parts.

        Args:
            ndim: 2 or 3 spatial dimensions.

        Returns:
            ``L_1 + ... + L_m`` (the condition's ``num_labels``).

        Shape:
            Not applicable.
        """
        return sum(_channels(part, ndim) for part in self.extractors)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Stacked map of ``image`` ``(B, C, *S)`` -> ``(B, L_1 + ... + L_m, *S)``."""
        check_shape(image, "B C *S", "image", floating=True)
        return torch.cat([part(image) for part in self.extractors], 1)
