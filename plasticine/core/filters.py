"""Separable filters on ``(B, C, *S)`` tensors, 2D and 3D alike."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from .shapes import check_shape

__all__ = ["gaussian_kernel1d", "gaussian_smooth", "resize", "resize_field"]


def gaussian_kernel1d(sigma: float, truncate: float = 3.0, *, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    r"""Normalised sampled Gaussian :math:`g(t) \propto e^{-t^2 / 2\sigma^2}`, ``|t| <= round(truncate * sigma)`` (scipy's radius).

    Shape:
        out: ``(2r + 1,)`` with ``r = max(1, int(truncate * sigma + 0.5))``.
    """
    if not (sigma > 0 and math.isfinite(sigma)):
        raise ValueError(f"sigma: expected a positive finite number, got {sigma}")
    r = max(1, int(truncate * sigma + 0.5))
    t = torch.arange(-r, r + 1, dtype=dtype, device=device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def gaussian_smooth(x: torch.Tensor, sigma: float | Sequence[float], truncate: float = 3.0) -> torch.Tensor:
    r"""Gaussian smoothing along every spatial axis (separable, replicate padding).

    Matches ``scipy.ndimage.gaussian_filter(..., mode="nearest", truncate=truncate)`` per channel.
    A sigma of 0 leaves that axis unchanged.

    Args:
        x: images or vector fields.
        sigma: standard deviation in voxels, one for all axes or one per axis.
        truncate: kernel radius in standard deviations.

    Shape:
        x: ``(B, C, *S)``; out: ``(B, C, *S)``.
    """
    n = check_shape(x, "B C *S", "x", floating=True)["N"]
    sig = (float(sigma),) * n if isinstance(sigma, (int, float)) else tuple(float(s) for s in sigma)
    if len(sig) != n or not all(0 <= s < math.inf for s in sig):
        raise ValueError(f"sigma: expected one or {n} non-negative finite numbers, got {sigma}")
    # taps as Python numbers (computed on the CPU: no device round trip)
    kernels = tuple((axis, tuple(gaussian_kernel1d(s, truncate, dtype=torch.float64).tolist())) for axis, s in enumerate(sig) if s > 0)
    if not kernels:
        return x.clone()
    return _SeparableSmooth.apply(x, kernels)


def _correlate_axis(x: torch.Tensor, taps: tuple[float, ...], axis: int) -> torch.Tensor:
    """``out[i] = sum_j taps[j] x[i + j - r]`` along spatial ``axis``, replicate padding (no autograd)."""
    r = (len(taps) - 1) // 2
    d = 2 + axis
    size = x.shape[d]
    shape = list(x.shape)
    shape[d] = r
    xp = torch.cat([x.narrow(d, 0, 1).expand(shape), x, x.narrow(d, size - 1, 1).expand(shape)], d)
    out = xp.narrow(d, 0, size) * taps[0]
    for j in range(1, len(taps)):
        out.add_(xp.narrow(d, j, size), alpha=taps[j])
    return out


def _correlate_axis_adjoint(g: torch.Tensor, taps: tuple[float, ...], axis: int) -> torch.Tensor:
    """Adjoint of :func:`_correlate_axis`: spread ``g`` back over the padded axis, fold the padding onto the edges."""
    r = (len(taps) - 1) // 2
    d = 2 + axis
    size = g.shape[d]
    shape = list(g.shape)
    shape[d] = size + 2 * r
    gp = g.new_zeros(shape)
    for j, t in enumerate(taps):
        gp.narrow(d, j, size).add_(g, alpha=t)
    out = gp.narrow(d, r, size).clone()
    out.narrow(d, 0, 1).add_(gp.narrow(d, 0, r).sum(d, keepdim=True))
    out.narrow(d, size - 1, 1).add_(gp.narrow(d, size + r, r).sum(d, keepdim=True))
    return out


class _SeparableSmooth(torch.autograd.Function):
    """Separable correlation with replicate padding; its backward is :class:`_SeparableSmoothAdjoint`.

    Each axis is ``2r + 1`` scaled adds of shifted views of the padded tensor (measured about 9x
    faster than ``conv3d`` with a ``(2r + 1, 1, 1)`` kernel on a 3-channel 90x108x90 field, whose
    backward was slower still); the pair of Functions is differentiable to any order.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, kernels: tuple) -> torch.Tensor:  # noqa: D102 - see the class
        ctx.kernels = kernels
        for axis, taps in kernels:
            x = _correlate_axis(x, taps, axis)
        return x

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # noqa: D102
        return _SeparableSmoothAdjoint.apply(g, ctx.kernels), None


class _SeparableSmoothAdjoint(torch.autograd.Function):
    """Adjoint of :class:`_SeparableSmooth` (axes in reverse order); its backward is the smoothing itself."""

    @staticmethod
    def forward(ctx, g: torch.Tensor, kernels: tuple) -> torch.Tensor:  # noqa: D102
        ctx.kernels = kernels
        for axis, taps in reversed(kernels):
            g = _correlate_axis_adjoint(g, taps, axis)
        return g

    @staticmethod
    def backward(ctx, h: torch.Tensor):  # noqa: D102
        return _SeparableSmooth.apply(h, ctx.kernels), None


def resize(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Resample images to a new spatial size by linear interpolation with aligned corner voxels.

    Voxel ``0`` and voxel ``S - 1`` keep their positions (``align_corners=True``), matching the voxel
    convention of :mod:`plasticine.core.grid`; displacement *vectors* are not rescaled here (see
    :func:`resize_field`).

    Shape:
        x: ``(B, C, *S)``; out: ``(B, C, *shape)``.
    """
    n = check_shape(x, "B C *S", "x", floating=True)["N"]
    shape = tuple(int(s) for s in shape)
    if len(shape) != n or min(shape) < 1:
        raise ValueError(f"shape: expected {n} positive sizes, got {shape}")
    if shape == tuple(x.shape[2:]):
        return x
    return F.interpolate(x, size=shape, mode="bilinear" if n == 2 else "trilinear", align_corners=True)


def resize_field(field: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Resample a velocity or displacement field (voxel units) to another grid of the same extent.

    Positions are resampled linearly with aligned corner voxels and the vectors are rescaled by
    ``(shape_i - 1) / (S_i - 1)`` so they keep their physical length.

    Shape:
        field: ``(B, N, *S)``; out: ``(B, N, *shape)``.
    """
    dims = check_shape(field, "B N *S", "field", floating=True)
    old, n = dims["S"], dims["N"]
    out = resize(field, shape)
    scale = torch.tensor([(s - 1) / max(o - 1, 1) for s, o in zip(shape, old)], dtype=field.dtype, device=field.device)
    return out * scale.view(1, n, *([1] * n))
