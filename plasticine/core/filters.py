"""Separable filters on ``(B, C, *S)`` tensors, 2D and 3D alike."""

from __future__ import annotations

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
    if sigma <= 0:
        raise ValueError(f"sigma: expected a positive number, got {sigma}")
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
    n = check_shape(x, "B C *S", "x")["N"]
    sig = (float(sigma),) * n if isinstance(sigma, (int, float)) else tuple(float(s) for s in sigma)
    if len(sig) != n or min(sig) < 0:
        raise ValueError(f"sigma: expected one or {n} non-negative numbers, got {sigma}")
    b, c = x.shape[:2]
    out = x.reshape(b * c, 1, *x.shape[2:])
    conv = (F.conv1d, F.conv2d, F.conv3d)[n - 1]
    for axis, s in enumerate(sig):
        if s == 0:
            continue
        k = gaussian_kernel1d(s, truncate, dtype=x.dtype, device=x.device)
        r = (k.numel() - 1) // 2
        shape = [1] * n
        shape[axis] = k.numel()
        pad = [0] * (2 * n)
        pad[2 * (n - 1 - axis)] = pad[2 * (n - 1 - axis) + 1] = r
        out = conv(F.pad(out, pad, mode="replicate"), k.view(1, 1, *shape))
    return out.reshape(x.shape)


def resize(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Resample images to a new spatial size by linear interpolation with aligned corner voxels.

    Voxel ``0`` and voxel ``S - 1`` keep their positions (``align_corners=True``), matching the voxel
    convention of :mod:`plasticine.core.grid`; displacement *vectors* are not rescaled here (see
    :func:`resize_field`).

    Shape:
        x: ``(B, C, *S)``; out: ``(B, C, *shape)``.
    """
    n = check_shape(x, "B C *S", "x")["N"]
    shape = tuple(int(s) for s in shape)
    if len(shape) != n:
        raise ValueError(f"shape: expected {n} sizes, got {shape}")
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
    dims = check_shape(field, "B N *S", "field")
    old, n = dims["S"], dims["N"]
    out = resize(field, shape)
    scale = torch.tensor([(s - 1) / max(o - 1, 1) for s, o in zip(shape, old)], dtype=field.dtype, device=field.device)
    return out * scale.view(1, n, *([1] * n))
