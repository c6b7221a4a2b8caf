"""Pull-back warping, composition of displacements and sampling at points.

All three use voxel units and the axis order of the tensor (see :mod:`plasticine.core.grid`).
The work is done by :func:`torch.nn.functional.grid_sample` with ``align_corners=True`` on CPU
and CUDA alike; nothing here synchronises with the host.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
import torch.nn.functional as F

from .grid import displacement_to_grid
from .shapes import check_shape

__all__ = ["warp", "compose", "sample_at_points", "GridSampleWarper", "Mode", "Padding"]

Mode = Literal["linear", "nearest", "cubic"]
Padding = Literal["border", "zeros", "reflection"]

_MODES = {"linear": "bilinear", "nearest": "nearest", "cubic": "bicubic"}
_PADDINGS = ("border", "zeros", "reflection")


def _torch_mode(mode: str, padding: str, n: int) -> str:
    if mode not in _MODES:
        raise ValueError(f"mode: expected one of {tuple(_MODES)}, got {mode!r}")
    if padding not in _PADDINGS:
        raise ValueError(f"padding: expected one of {_PADDINGS}, got {padding!r}")
    if mode == "cubic" and n != 2:
        raise ValueError(f"mode='cubic' is available for 2D images only (torch's bicubic grid sampler); got {n}D")
    return _MODES[mode]


def warp(
    image: torch.Tensor,
    displacement: torch.Tensor,
    mode: Mode = "linear",
    padding: Padding = "border",
) -> torch.Tensor:
    r"""Pull an image back through a map: ``out(p) = image(p + u(p))``, i.e. ``image o phi``.

    With :math:`\phi(p) = p + u(p)` the result is :math:`I \circ \phi`. A displacement of
    ``+3`` along axis 0 therefore moves the image content by ``-3`` along axis 0.

    Args:
        image: the image to resample, any floating dtype matching ``displacement``.
        displacement: ``u`` in voxels, channel ``i`` along spatial axis ``i``. Its batch size
            must equal the image's, or be 1 (one field for every image).
        mode: ``"linear"`` (bi/trilinear, default), ``"nearest"`` (gives no gradient with
            respect to ``displacement``; a warning says so when one is requested) or ``"cubic"``
            (Keys cubic convolution with a = -0.75, 2D only).
        padding: value outside the image: ``"border"`` (nearest edge voxel, default),
            ``"zeros"`` or ``"reflection"`` (mirrored about the edge voxel centres, scipy's
            ``mode="mirror"``).

    Returns:
        The warped image, same shape and dtype as ``image``.

    Shape:
        image: ``(B, C, *S)``; displacement: ``(B, N, *S)`` or ``(1, N, *S)``; out: ``(B, C, *S)``.

    Example:
        >>> img = torch.arange(5.0).view(1, 1, 1, 5).expand(1, 1, 3, 5)
        >>> u = torch.zeros(1, 2, 3, 5); u[:, 1] = 1.0
        >>> warp(img, u)[0, 0, 0]
        tensor([1., 2., 3., 4., 4.])
    """
    dims = check_shape(image, "B C *S", "image")
    n = dims["N"]
    ud = check_shape(displacement, "Bu N *S", "displacement", bindings={"S": dims["S"], "N": n})
    if ud["Bu"] not in (1, dims["B"]):
        raise ValueError(
            f"displacement: expected batch size {dims['B']} or 1 to match image {tuple(image.shape)}, got {tuple(displacement.shape)}"
        )
    if not image.is_floating_point() or image.dtype != displacement.dtype:
        raise ValueError(f"image and displacement must share one floating dtype, got {image.dtype} and {displacement.dtype}")
    tmode = _torch_mode(mode, padding, n)
    if mode == "nearest" and displacement.requires_grad and torch.is_grad_enabled():
        warnings.warn(
            "warp(mode='nearest') has zero gradient with respect to the displacement; use mode='linear' to optimise it",
            stacklevel=2,
        )
    grid = displacement_to_grid(displacement)
    if ud["Bu"] != dims["B"]:
        grid = grid.expand(dims["B"], *grid.shape[1:])
    return F.grid_sample(image, grid, mode=tmode, padding_mode=padding, align_corners=True)


def compose(u_a: torch.Tensor, u_b: torch.Tensor, padding: Padding = "border") -> torch.Tensor:
    r"""Displacement of :math:`\phi_a \circ \phi_b`: ``u_b + warp(u_a, u_b)``.

    :math:`(\phi_a \circ \phi_b)(p) = p + u_b(p) + u_a(p + u_b(p))`: first ``b``, then ``a``.
    Warping an image with the result equals warping it with ``u_a`` and then with ``u_b``
    (up to interpolation): ``warp(warp(I, u_a), u_b) ~ warp(I, compose(u_a, u_b))``.

    Args:
        u_a: displacement of the outer map.
        u_b: displacement of the inner map.
        padding: how ``u_a`` is extended outside the grid (border by default).

    Shape:
        u_a: ``(B, N, *S)``; u_b: ``(B, N, *S)``; out: ``(B, N, *S)``.
    """
    dims = check_shape(u_a, "B N *S", "u_a")
    check_shape(u_b, "B N *S", "u_b", bindings=dims)
    return u_b + warp(u_a, u_b, padding=padding)


def sample_at_points(
    field: torch.Tensor, points: torch.Tensor, mode: Mode = "linear", padding: Padding = "border"
) -> torch.Tensor:
    """Interpolate a field at arbitrary voxel coordinates.

    Args:
        field: image or displacement to sample.
        points: voxel coordinates in tensor axis order.
        mode: interpolation, as in :func:`warp`.
        padding: extension outside the grid, as in :func:`warp`.

    Returns:
        ``out[b, p, c] = field[b, c](points[b, p])``.

    Shape:
        field: ``(B, C, *S)``; points: ``(B, P, N)``; out: ``(B, P, C)``.
    """
    dims = check_shape(field, "B C *S", "field")
    n = dims["N"]
    check_shape(points, "B P N", "points", bindings={"B": dims["B"], "N": n}, spatial=())
    if points.dtype != field.dtype:
        raise ValueError(f"points and field must share one dtype, got {points.dtype} and {field.dtype}")
    tmode = _torch_mode(mode, padding, n)
    shape = torch.tensor(dims["S"], dtype=field.dtype, device=field.device)
    scale = torch.where(shape > 1, 2.0 / (shape - 1).clamp(min=1), torch.zeros_like(shape))
    g = points * scale - (scale != 0).to(field.dtype)
    g = g.flip(-1).reshape(points.shape[0], points.shape[1], *([1] * (n - 1)), n)
    out = F.grid_sample(field, g, mode=tmode, padding_mode=padding, align_corners=True)
    return out.reshape(field.shape[0], field.shape[1], points.shape[1]).transpose(1, 2)


class GridSampleWarper(torch.nn.Module):
    """The :class:`~plasticine.core.Warper` of :func:`warp`: stores mode and padding.

    Shape:
        image: ``(B, C, *S)``; displacement: ``(B, N, *S)``; out: ``(B, C, *S)``.
    """

    def __init__(self, mode: Mode = "linear", padding: Padding = "border"):
        super().__init__()
        _torch_mode(mode, padding, 2)
        self.mode, self.padding = mode, padding

    def forward(self, image: torch.Tensor, displacement: torch.Tensor) -> torch.Tensor:
        return warp(image, displacement, self.mode, self.padding)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, padding={self.padding!r}"
