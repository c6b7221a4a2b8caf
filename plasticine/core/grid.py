"""Coordinates: the identity grid and converters between the three coordinate systems.

plasticine works in *voxel* coordinates: the centre of voxel ``(i, j[, k])`` sits at exactly
those integer indices, in the tensor's own axis order. Displacements ``(B, N, *S)`` are in
voxels, channel ``i`` along spatial axis ``i``. Two other systems meet it at the edges:

* torch's ``grid_sample`` grid ``(B, *S, N)``: normalised to ``[-1, 1]`` with
  ``align_corners=True`` (``-1`` and ``1`` are the centres of the first and last voxel) and the
  last dimension in reversed (x, y[, z]) order;
* world (scanner) coordinates: ``x_world = A[:N, :N] @ p + A[:N, N]`` for an ``(N+1, N+1)``
  affine ``A`` that maps tensor indices in axis order to millimetres (for a volume loaded with
  nibabel without reordering this is the NIfTI affine).

Every converter has its inverse here, and the round trips are tested.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .shapes import check_shape

__all__ = [
    "identity_grid",
    "displacement_to_grid",
    "grid_to_displacement",
    "voxel_to_world",
    "world_to_voxel",
    "displacement_to_world",
    "displacement_from_world",
    "constant_vector",
]


def identity_grid(
    shape: Sequence[int], *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> torch.Tensor:
    """Voxel coordinates of every voxel centre: ``grid[i, p] = p_i``.

    Args:
        shape: spatial size ``S`` (2 or 3 entries).
        dtype: floating dtype of the result.
        device: device of the result.

    Returns:
        ``(N, *S)`` tensor, channel ``i`` holding the index along axis ``i``.

    Shape:
        out: ``(N, *S)`` with ``N = len(shape)``.

    Example:
        >>> identity_grid((2, 3))[1]
        tensor([[0., 1., 2.],
                [0., 1., 2.]])
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (2, 3) or min(shape) < 1:
        raise ValueError(f"identity_grid: expected 2 or 3 positive spatial sizes, got {shape}")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype: expected a floating-point dtype, got {dtype}")
    axes = [torch.arange(s, dtype=dtype, device=device) for s in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)


def _normalised_identity(shape: Sequence[int], dtype: torch.dtype, device: torch.device | None) -> torch.Tensor:
    """``grid_sample``'s identity in normalised units, channels in reversed (x, y[, z]) order.

    Channel ``k`` is the normalised coordinate along spatial axis ``N - 1 - k``: ``-1`` at the first
    voxel centre, ``1`` at the last (``linspace``, exact at both ends); ``0`` on an axis of size 1.

    Shape:
        out: ``(1, N, *S)``.
    """
    n = len(shape)
    axes = [torch.linspace(-1.0, 1.0, s, dtype=dtype, device=device) if s > 1 else torch.zeros(1, dtype=dtype, device=device) for s in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij")[::-1], dim=0).unsqueeze(0).view(1, n, *shape)


def constant_vector(values: Sequence[float], like: torch.Tensor, ndim: int = 0) -> torch.Tensor:
    """Python numbers as a tensor on ``like``'s device, shaped ``(1, len, 1 x ndim)``, without a host copy.

    ``torch.tensor(values, device="cuda")`` copies from pageable host memory and waits for the
    stream; filling entries with scalars only queues kernels. For per-axis factors (voxel
    spacings, grid scales) that multiply a ``(B, N, *S)`` field.

    Args:
        values: the numbers (one per channel).
        like: a tensor whose dtype and device the result takes.
        ndim: number of trailing singleton dimensions (the spatial ones).

    Returns:
        The vector, broadcastable against ``(B, len(values), *S)``.

    Shape:
        out: ``(1, len(values), *[1] * ndim)``.
    """
    out = torch.empty(len(values), dtype=like.dtype, device=like.device)
    for i, x in enumerate(values):
        out[i] = x
    return out.view(1, len(values), *([1] * ndim))


def _vector_length(field: torch.Tensor, keepdim: bool = False) -> torch.Tensor:
    """Euclidean length of the vectors along dim 1: ``sqrt(sum_i field_i^2)``, gradient 0 at zero vectors.

    A sum of squares and a square root: torch's ``norm(dim=1)`` reduces over the short channel
    axis about 80 times slower on the CPU (measured 160 vs 2 ms for a 3x90x108x90 field).

    Shape:
        field: ``(B, N, *S)``; out: ``(B, *S)``, or ``(B, 1, *S)`` with ``keepdim``.
    """
    sq = field.square().sum(1, keepdim=keepdim)
    pos = sq > 0
    # zero vectors take sq itself (0, gradient 0); a NaN takes sq too, so it propagates
    return torch.where(pos, torch.where(pos, sq, torch.ones_like(sq)).sqrt(), sq)


def _normalised_scale(shape: Sequence[int], like: torch.Tensor, size_one: float = 0.0) -> torch.Tensor:
    """``2 / (S_i - 1)`` per axis in reversed (x, y[, z]) order (``size_one`` for an axis of size 1).

    Shape:
        out: ``(1, N, 1, ..., 1)``, broadcasting over ``(B, N, *S)``.
    """
    n = len(shape)
    s = [2.0 / (k - 1) if k > 1 else size_one for k in reversed(tuple(shape))]
    return constant_vector(s, like, n)


def displacement_to_grid(displacement: torch.Tensor) -> torch.Tensor:
    """The ``grid_sample`` grid (``align_corners=True``) that samples at ``p + u(p)``.

    ``grid[b, ..., N - 1 - i] = 2 (p_i + u_i(p)) / (S_i - 1) - 1``; an axis of size 1 gets ``0``
    (``grid_sample`` has only one voxel to read there, whatever the coordinate).

    Args:
        displacement: ``u`` in voxels, channel ``i`` along axis ``i``.

    Returns:
        Normalised sampling grid, last dimension in (x, y[, z]) order (a permuted view of a
        channel-first tensor; ``grid_sample`` reads it as it is).

    Shape:
        displacement: ``(B, N, *S)``; out: ``(B, *S, N)``.
    """
    check_shape(displacement, "B N *S", "displacement", floating=True)
    if torch.compiler.is_compiling():
        return _to_grid_traced(displacement)
    return _ToGrid.apply(displacement)


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype in which coordinates built from a field of ``dtype`` are computed.

    float32 for float16 and bfloat16 (bfloat16's 8 significant bits resolve a coordinate between
    128 and 256 to whole voxels, so identity + displacement, squaring accumulations and Jacobian
    determinants are formed in float32, see :doc:`/conventions`); every other floating dtype is kept.

    Shape:
        Not applicable.
    """
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _grid_scales(shape: Sequence[int]) -> tuple[float, ...]:
    """``2 / (S_a - 1)`` for grid channel ``k`` (axis ``a = N - 1 - k``), 0 on an axis of size 1."""
    n = len(shape)
    return tuple(2.0 / (shape[n - 1 - k] - 1) if shape[n - 1 - k] > 1 else 0.0 for k in range(n))


def _grid_lines(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> list[tuple[int, torch.Tensor | None, float]]:
    """Per grid channel ``k``: its axis ``a = N - 1 - k``, that axis' ``linspace`` broadcast as ``(1, *S)`` (None on an axis of size 1), and its scale."""
    n = len(shape)
    lines = []
    for k, scale in enumerate(_grid_scales(shape)):
        a = n - 1 - k
        view = [1] * (n + 1)
        view[1 + a] = shape[a]
        coords = torch.linspace(-1.0, 1.0, shape[a], dtype=dtype, device=device).view(view) if shape[a] > 1 else None
        lines.append((a, coords, scale))
    return lines


def _to_grid_traced(u: torch.Tensor) -> torch.Tensor:
    """:func:`displacement_to_grid` in composite ops (the same values), for ``torch.compile``.

    Dynamo cannot trace the strided ``out=`` writes of :class:`_ToGrid`; here each channel is an
    out-of-place broadcast add, stacked channel last, which a compiler fuses into one kernel.
    """
    uc = u.to(working_dtype(u.dtype))
    lines = _grid_lines(tuple(u.shape[2:]), uc.dtype, u.device)
    return torch.stack([torch.add(c, uc[:, a], alpha=s) if c is not None else torch.zeros_like(uc[:, a]) for a, c, s in lines], dim=-1)


class _ToGrid(torch.autograd.Function):
    """:func:`displacement_to_grid` as one node: channel ``k`` of the grid is axis ``N - 1 - k``.

    Forward: one broadcast add of that axis' ``linspace`` per channel, written straight into a
    channel-first buffer (returned as its channel-last view); backward: one scaled copy per channel.
    No identity grid, channel flip, tensor of scales or concatenation is built per call. The map is
    affine, so the backward is differentiable again (composite ops under ``create_graph``). A
    float16/bfloat16 ``u`` gives a float32 grid (:func:`working_dtype`); its gradient comes
    back in ``u``'s dtype.
    """

    @staticmethod
    def forward(ctx, u: torch.Tensor) -> torch.Tensor:  # noqa: D102 - documented on the class
        shape = tuple(u.shape[2:])
        dtype = working_dtype(u.dtype)
        lines = _grid_lines(shape, dtype, u.device)
        out = torch.empty((u.shape[0], len(shape), *shape), dtype=dtype, device=u.device)
        for k, (a, coords, scale) in enumerate(lines):
            if coords is None:
                out[:, k].zero_()
            else:
                torch.add(coords, u[:, a].to(dtype), alpha=scale, out=out[:, k])
        ctx.scales, ctx.dtype = tuple(s for _, _, s in lines), u.dtype
        return out.movedim(1, -1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        n = grad.shape[-1]
        scales = ctx.scales
        if torch.is_grad_enabled():  # create_graph: composite, differentiable ops
            return torch.stack([grad[..., n - 1 - i] * scales[n - 1 - i] for i in range(n)], 1).to(ctx.dtype)
        gu = torch.empty((grad.shape[0], n, *grad.shape[1:-1]), dtype=ctx.dtype, device=grad.device)
        for i in range(n):
            torch.mul(grad[..., n - 1 - i], scales[n - 1 - i], out=gu[:, i])
        return gu


def grid_to_displacement(grid: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`displacement_to_grid`: voxel displacement from a normalised grid.

    ``u_i(p) = (grid[..., N - 1 - i] + 1) (S_i - 1) / 2 - p_i``. Axes of size 1 have no
    normalised extent; their displacement is returned as 0.

    Args:
        grid: normalised ``grid_sample`` grid (``align_corners=True``), last dimension in
            (x, y[, z]) order.

    Returns:
        Displacement in voxels, channel ``i`` along axis ``i``.

    Shape:
        grid: ``(B, *S, N)``; out: ``(B, N, *S)``.
    """
    check_shape(grid, "B *S N", "grid", floating=True)
    g = grid.movedim(-1, 1)
    shape = tuple(g.shape[2:])
    base = _normalised_identity(shape, grid.dtype, grid.device)
    half = 1.0 / _normalised_scale(shape, grid, size_one=torch.inf)  # (S - 1) / 2, 0 on size-1 axes
    return ((g - base) * half).flip(1)


def _check_affine(affine: torch.Tensor, n: int) -> torch.Tensor:
    if not isinstance(affine, torch.Tensor) or affine.dim() not in (2, 3) or tuple(affine.shape[-2:]) != (n + 1, n + 1):
        got = tuple(affine.shape) if isinstance(affine, torch.Tensor) else type(affine).__name__
        raise ValueError(f"affine: expected shape ({n + 1}, {n + 1}) or (B, {n + 1}, {n + 1}), got {got}")
    if not affine.is_floating_point():
        raise ValueError(f"affine: expected a floating-point tensor, got dtype {affine.dtype}")
    return affine


def _inverse_affine(affine: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Inverse of an affine, taken in float64 and cast to ``like``'s dtype and device.

    NaN everywhere if the affine holds a NaN or an infinity (``inv`` would turn an infinity into a
    finite 0); a singular affine raises a ``ValueError``.
    """
    a = affine.to(device=like.device, dtype=torch.float64)
    try:
        inv = torch.linalg.inv(a)
    except torch.linalg.LinAlgError as err:
        raise ValueError(f"affine: expected an invertible matrix, got a singular one ({err})") from None
    return (inv + a.mul(0.0).sum((-2, -1), keepdim=True)).to(like.dtype)


def voxel_to_world(points: torch.Tensor, affine: torch.Tensor) -> torch.Tensor:
    """Map voxel coordinates (axis order) to world coordinates: ``x = A[:N, :N] p + A[:N, N]``.

    Args:
        points: voxel coordinates in tensor axis order.
        affine: voxel-to-world affine (one for all, or one per batch element).

    Returns:
        World coordinates (millimetres for a scanner affine).

    Shape:
        points: ``(B, P, N)``; affine: ``(N+1, N+1)`` or ``(B, N+1, N+1)``; out: ``(B, P, N)``.
    """
    n = check_shape(points, "B P N", "points", spatial=(), floating=True)["N"]
    a = _check_affine(affine, n).to(points)
    return points @ a[..., :n, :n].transpose(-1, -2) + a[..., None, :n, n]


def world_to_voxel(points: torch.Tensor, affine: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`voxel_to_world`: :math:`p = A_{:N,:N}^{-1} (x - A_{:N,N})`.

    The affine is inverted in float64 and the result cast to the points' dtype.

    Args:
        points: world coordinates.
        affine: voxel-to-world affine (one for all, or one per batch element).

    Returns:
        Voxel coordinates in tensor axis order.

    Shape:
        points: ``(B, P, N)``; affine: ``(N+1, N+1)`` or ``(B, N+1, N+1)``; out: ``(B, P, N)``.
    """
    n = check_shape(points, "B P N", "points", spatial=(), floating=True)["N"]
    return voxel_to_world(points, _inverse_affine(_check_affine(affine, n), points))


def displacement_to_world(displacement: torch.Tensor, affine: torch.Tensor) -> torch.Tensor:
    """Express a voxel displacement field in world units: ``u_world(p) = A[:N, :N] u(p)``.

    The field stays on the voxel grid; only the vectors change (translation does not act on them).

    Args:
        displacement: ``u`` in voxels, channel ``i`` along axis ``i``.
        affine: voxel-to-world affine (one for all, or one per batch element).

    Returns:
        The displacement vectors in world units.

    Shape:
        displacement: ``(B, N, *S)``; affine: ``(N+1, N+1)`` or ``(B, N+1, N+1)``; out: ``(B, N, *S)``.
    """
    n = check_shape(displacement, "B N *S", "displacement", floating=True)["N"]
    a = _check_affine(affine, n).to(displacement)[..., :n, :n]
    return torch.einsum("ij,bj...->bi...", a, displacement) if a.dim() == 2 else torch.einsum("bij,bj...->bi...", a, displacement)


def displacement_from_world(displacement: torch.Tensor, affine: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`displacement_to_world`: world-unit vectors back to voxel units.

    :math:`u(p) = A_{:N,:N}^{-1} u_{world}(p)`, the affine inverted in float64.

    Args:
        displacement: vectors in world units on the voxel grid.
        affine: voxel-to-world affine (one for all, or one per batch element).

    Returns:
        The displacement in voxels, channel ``i`` along axis ``i``.

    Shape:
        displacement: ``(B, N, *S)``; affine: ``(N+1, N+1)`` or ``(B, N+1, N+1)``; out: ``(B, N, *S)``.
    """
    n = check_shape(displacement, "B N *S", "displacement", floating=True)["N"]
    return displacement_to_world(displacement, _inverse_affine(_check_affine(affine, n), displacement))
