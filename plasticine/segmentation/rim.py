r"""A structure map restricted to the rim of the foreground: the outer layers of a head, not its inside.

For an extractor :math:`E` with map :math:`E(x) \in \mathbb{R}^{L \times S}`, a foreground mask
:math:`F(x) \in \{0, 1\}^S` (channel 1 of a :class:`~plasticine.segmentation.ForegroundExtractor`)
and a depth :math:`d` in voxels,

.. math::

    R(x)(p) = E(x)(p)\; [\,F(x)(p) = 1 \ \text{and}\ \exists\, q: F(x)(q) = 0,\ \lVert p - q \rVert_2 \le d\,],

the map inside the foreground within Euclidean distance :math:`d` (voxel centres) of a background
voxel, zero elsewhere; voxels beyond the image count as background. This is the rim that
``scipy.ndimage.distance_transform_edt`` of the mask bounds by :math:`d`, computed as a
convolution of the background with the ball of radius :math:`d` (exact on the integer grid).

Why: between MR and CT the head's outer layers (scalp, skull, the cerebrospinal fluid around the
brain) are edges in both modalities, so a self-similarity map such as MIND-SSC means the same
anatomy there, while deeper inside the T1 sulci have no counterpart in CT and carry into a
translation as spurious bone. Restricting the map to a rim of about the scalp and skull's thickness
keeps the part that corresponds. The rim map is invariant to every intensity remap that leaves
both the foreground mask and :math:`E` unchanged (the intersection of their invariances).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import Configurable
from ..core.shapes import check_shape
from ..core.validate import check_number
from .foreground import ForegroundExtractor
from .stacked import _channels

__all__ = ["RimExtractor", "rim_mask"]


def _ball(radius: float, ndim: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The offsets of norm at most ``radius`` as a ``(1, 1, *k)`` kernel of ones and zeros."""
    r = int(radius)
    axes = [torch.arange(-r, r + 1, dtype=torch.float64, device=device)] * ndim
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))
    return ((grid**2).sum(0) <= radius**2 + 1e-9).to(dtype)[None, None]


def rim_mask(mask: torch.Tensor, depth: float) -> torch.Tensor:
    r"""The voxels of a mask within Euclidean distance ``depth`` of a voxel outside it (see :mod:`plasticine.segmentation.rim`).

    Args:
        mask: foreground masks (bool or 0/1), 2D or 3D.
        depth: :math:`d` in voxels, >= 0 (0: no voxel).

    Returns:
        bool rim masks.

    Raises:
        ValueError: for a bad shape or a negative or non-finite ``depth``.

    Shape:
        mask: ``(B, 1, *S)``; out: ``(B, 1, *S)``.

    Example:
        >>> m = torch.zeros(1, 1, 7, 7, dtype=torch.bool); m[..., 1:6, 1:6] = True
        >>> int(rim_mask(m, 1.0).sum())  # the 5 x 5 square less its 3 x 3 inside
        16
    """
    dims = check_shape(mask, "B 1 *S", "mask", spatial=(2, 3))
    d = check_number(depth, "depth", 0.0)
    inside = mask.bool()
    if d < 1:
        return torch.zeros_like(inside)
    conv = F.conv2d if dims["N"] == 2 else F.conv3d
    kernel = _ball(d, dims["N"], torch.float32, mask.device)
    r = kernel.shape[-1] // 2
    background = F.pad((~inside).to(torch.float32), (r,) * (2 * dims["N"]), value=1.0)
    near = conv(background, kernel) > 0.5
    return inside & near


class RimExtractor(Configurable, nn.Module):
    """Structure extractor: the map of ``extractor`` on the rim of the foreground (see :mod:`plasticine.segmentation.rim`).

    Args:
        extractor: the structure extractor whose map is restricted (stating its channels, as
            :class:`~plasticine.segmentation.MINDExtractor`).
        depth: the rim's depth :math:`d` in voxels, >= 1.
        foreground: the extractor of the mask (its channel 1 is the foreground); None: a
            :class:`~plasticine.segmentation.ForegroundExtractor` with its defaults.

    Raises:
        ValueError: for a depth below 1 or a part that does not state its channels.

    Shape:
        image: ``(B, C, *S)``; out: ``(B, L, *S)`` with ``L`` the channels of ``extractor``.

    Example:
        >>> from plasticine.segmentation import MINDExtractor
        >>> ext = RimExtractor(MINDExtractor(), depth=3)
        >>> x = torch.zeros(1, 1, 24, 24); x[..., 4:20, 4:20] = torch.rand(16, 16) + 0.5
        >>> out = ext(x)
        >>> out.shape, bool((out[..., 12, 12] == 0).all())  # the inside is zeroed
        (torch.Size([1, 4, 24, 24]), True)
    """

    def __init__(self, extractor: nn.Module, depth: float = 10.0, foreground: nn.Module | None = None):
        super().__init__()
        if not isinstance(extractor, nn.Module):
            raise ValueError(f"extractor: expected a structure extractor module, got a {type(extractor).__name__}")
        _channels(extractor, 2)
        self.depth = check_number(depth, "depth", 1.0)
        self.extractor = extractor
        self.foreground = ForegroundExtractor() if foreground is None else foreground

    def num_channels(self, ndim: int) -> int:
        """Channels of the map: those of ``extractor``.

        Args:
            ndim: 2 or 3 spatial dimensions.

        Returns:
            The condition's ``num_labels``.

        Shape:
            Not applicable.
        """
        return _channels(self.extractor, ndim)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """The rim map: ``extractor(image)`` times :func:`rim_mask` of the foreground.

        Args:
            image: the images.

        Returns:
            The map, zero outside the rim.

        Shape:
            image: ``(B, C, *S)``; out: ``(B, L, *S)``.
        """
        check_shape(image, "B C *S", "image", floating=True)
        fg = self.foreground(image)[:, 1:2] > 0.5
        rim = rim_mask(fg, self.depth)
        return self.extractor(image) * rim.to(image.dtype)
