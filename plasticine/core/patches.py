r"""Overlapping patches: a dense operator applied to a large image patch by patch, stitched without seams.

An image too large for a network is cut into patches of size :math:`P` placed every
:math:`s = P - o` voxels along each axis (:math:`o` the overlap; the last patch of an axis ends at its
last voxel, so it may overlap its neighbour more). Each patch gets a separable weight
:math:`w_p(t) = \prod_i w_{p,i}(t_i)`; along an axis, on a side where the patch has a neighbour,

.. math::

    w(t) = \begin{cases} 0 & t < m \\ \sin^2\!\big(\tfrac{\pi}{2}\,\tfrac{t - m + 1/2}{r}\big) & m \le t < m + r \\ 1 & t \ge m + r \end{cases}
    \qquad r = o - 2m,

(:math:`t` the distance from that side, :math:`m` the margin), and :math:`w = 1` on a side that lies on
the image border. The stitched result is the weighted mean

.. math::

    F(x)(q) = \frac{\sum_p w_p(q - a_p)\, f(x|_p)(q - a_p)}{\sum_p w_p(q - a_p)}

over the patches :math:`p` (corner :math:`a_p`) that hold :math:`q`. Two neighbours with the regular
overlap blend as :math:`\cos^2 + \sin^2 = 1`: a partition of unity whose weights change by at most
:math:`\pi / (2r)` per voxel, so patch-to-patch differences of :math:`f` are spread smoothly over the
ramp instead of showing as a seam. The margin discards the :math:`m` voxels next to a cut, where a
patch sees less context than the whole image: for an operator whose value at a voxel depends only on
the voxels within :math:`m` of it (a convolution of radius :math:`\le m`, with the image border
treated as the operator treats it), :math:`F(x) = f(x)` exactly.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import torch

__all__ = ["PatchGrid", "patch_grid", "patch_window", "sliding_window", "random_patches"]


class PatchGrid(tuple):
    """The patch corners of one image: a tuple of per-axis start lists (see :func:`patch_grid`).

    Shape:
        Not applicable.
    """

    @property
    def count(self) -> int:
        """Number of patches (the product of the per-axis counts)."""
        return math.prod(len(s) for s in self)


def _sizes(value: int | Sequence[int], n: int, name: str) -> tuple[int, ...]:
    """``value`` as ``n`` integers (one integer is used on every axis)."""
    if isinstance(value, int) and not isinstance(value, bool):
        values: Sequence[int] = (value,) * n
    else:
        values = tuple(value)
        if len(values) != n or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise ValueError(f"{name}: expected one integer or {n} integers (one per spatial axis), got {value!r}")
    return tuple(values)


def _axis_starts(size: int, patch: int, overlap: int) -> list[int]:
    step = patch - overlap
    starts = list(range(0, max(size - patch, 0) + 1, step))
    if starts[-1] + patch < size:
        starts.append(size - patch)
    return starts


def patch_grid(shape: Sequence[int], patch: int | Sequence[int], overlap: int | Sequence[int] | None = None, margin: int | Sequence[int] | None = None) -> tuple[PatchGrid, tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    r"""The patch corners covering ``shape``, with the checked patch size, overlap and margin.

    Along an axis of length :math:`L` the starts are :math:`0, s, 2s, \dots` (:math:`s = P - o`) while
    a patch stays inside, plus :math:`L - P` when the last one does not reach the end.

    Args:
        shape: spatial size of the image.
        patch: patch size, one integer for every axis or one per axis, each in ``[1, L]``.
        overlap: voxels shared by neighbours, in ``[0, P/2]`` per axis (default ``P // 4``);
            ``0`` tiles the image (hard seams for a network).
        margin: voxels next to a cut that get no weight, with ``2 m < o`` where ``o > 0`` (default
            ``o // 4``).

    Returns:
        ``(grid, patch, overlap, margin)``: the :class:`PatchGrid` and the per-axis settings.

    Raises:
        ValueError: naming the argument, for a size, overlap or margin outside those ranges.

    Shape:
        Not applicable.
    """
    n = len(shape)
    p = _sizes(patch, n, "patch")
    for i, (pi, si) in enumerate(zip(p, shape)):
        if not 1 <= pi <= si:
            raise ValueError(f"patch: expected sizes in [1, {si}] along axis {i} (the image is {tuple(shape)}), got {p}")
    o = tuple(pi // 4 for pi in p) if overlap is None else _sizes(overlap, n, "overlap")
    for i, (oi, pi) in enumerate(zip(o, p)):
        if not 0 <= 2 * oi <= pi:
            raise ValueError(f"overlap: expected values in [0, patch/2] along axis {i} (patch {pi}), got {o}")
    m = tuple(oi // 4 for oi in o) if margin is None else _sizes(margin, n, "margin")
    for i, (mi, oi) in enumerate(zip(m, o)):
        if mi < 0 or (oi > 0 and 2 * mi >= oi) or (oi == 0 and mi != 0):
            raise ValueError(f"margin: expected values >= 0 with 2 * margin < overlap along axis {i} (overlap {oi}), got {m}")
    grid = PatchGrid(_axis_starts(si, pi, oi) for si, pi, oi in zip(shape, p, o))
    return grid, p, o, m


def _ramp(patch: int, overlap: int, margin: int, lower: bool, upper: bool, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    w = torch.ones(patch, dtype=torch.float64)
    r = overlap - 2 * margin
    if r > 0:
        t = torch.arange(patch, dtype=torch.float64)
        side = torch.where(t < margin, torch.zeros_like(t), torch.sin(0.5 * math.pi * ((t - margin + 0.5) / r).clamp(max=1.0)) ** 2)
        if lower:
            w = w * side
        if upper:
            w = w * side.flip(0)
    return w.to(dtype=dtype, device=device)


def patch_window(patch: Sequence[int], overlap: Sequence[int], margin: Sequence[int], lower: Sequence[bool], upper: Sequence[bool], *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    r"""The separable blending weight :math:`w_p` of one patch (see the module docstring).

    Args:
        patch: patch size per axis.
        overlap: overlap per axis.
        margin: margin per axis.
        lower: per axis, whether the patch has a neighbour before it (a ramp at its start).
        upper: per axis, whether it has one after it (a ramp at its end).
        dtype: dtype of the weight.
        device: its device.

    Returns:
        The weight, in ``[0, 1]``.

    Shape:
        out: ``patch``.
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    w = torch.ones((), dtype=dtype, device=device)
    for i, (p, o, m, lo, hi) in enumerate(zip(patch, overlap, margin, lower, upper)):
        axis = _ramp(p, o, m, lo, hi, dtype, device)
        w = w[..., None] * axis if i else axis
    return w


def sliding_window(
    fn: Callable[..., torch.Tensor],
    inputs: Sequence[torch.Tensor],
    patch: int | Sequence[int],
    *,
    overlap: int | Sequence[int] | None = None,
    margin: int | Sequence[int] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    r"""Apply a dense operator patch by patch and stitch the results with blending weights.

    ``fn(*patches)`` gets the same patch of every input and returns a ``(B, C', *patch)`` tensor;
    the result is the weighted mean of the module docstring. Gradients flow through ``fn`` as
    through any torch code.

    Args:
        fn: the operator.
        inputs: images that share one spatial size (a None entry is passed to ``fn`` as None).
        patch: patch size (see :func:`patch_grid`).
        overlap: see :func:`patch_grid`.
        margin: see :func:`patch_grid`.
        progress: called as ``progress(done, total)`` after each patch, or None.

    Returns:
        The stitched result.

    Raises:
        ValueError: for inputs of different spatial sizes or batch sizes, a bad patch setting, or
            an ``fn`` output that is not ``(B, C', *patch)``.

    Shape:
        inputs: ``(B, C_j, *S)``; out: ``(B, C', *S)``.
    """
    present = [x for x in inputs if x is not None]
    if not present:
        raise ValueError("inputs: expected at least one tensor, got none")
    ref = present[0]
    if ref.dim() < 3:
        raise ValueError(f"inputs[0]: expected (B, C, *S) with at least one spatial axis, got shape {tuple(ref.shape)}")
    shape = tuple(ref.shape[2:])
    for j, x in enumerate(inputs):
        if x is not None and (tuple(x.shape[2:]) != shape or x.shape[0] != ref.shape[0]):
            raise ValueError(f"inputs[{j}]: expected batch {ref.shape[0]} and spatial size {shape} like inputs[0], got shape {tuple(x.shape)}")
    grid, p, o, m = patch_grid(shape, patch, overlap, margin)
    total = grid.count
    out: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    for done, corner in enumerate(itertools.product(*grid), start=1):
        where = tuple(slice(a, a + pi) for a, pi in zip(corner, p))
        result = fn(*(None if x is None else x[(slice(None), slice(None)) + where] for x in inputs))
        if result.dim() != len(shape) + 2 or tuple(result.shape[2:]) != p or result.shape[0] != ref.shape[0]:
            raise ValueError(f"fn: expected a ({ref.shape[0]}, C', *{p}) result for a patch, got shape {tuple(result.shape)}")
        if out is None:
            out = result.new_zeros((result.shape[0], result.shape[1], *shape))
            weight = result.new_zeros(shape)
        lower = [a > 0 for a in corner]
        upper = [a + pi < s for a, pi, s in zip(corner, p, shape)]
        w = patch_window(p, o, m, lower, upper, dtype=result.dtype, device=result.device)
        out[(slice(None), slice(None)) + where] += w * result
        weight[where] += w
        if progress is not None:
            progress(done, total)
    assert out is not None and weight is not None
    return out / weight


def random_patches(images: torch.Tensor, patch: int | Sequence[int], generator: torch.Generator | None = None, aligned: Sequence[torch.Tensor] = ()) -> tuple[torch.Tensor, ...]:
    r"""One random patch per batch item, the same window in the images and the maps aligned with them.

    The corner of item ``b`` is drawn uniformly, :math:`a_i \sim U\{0, \dots, L_i - P_i\}` per axis,
    from ``generator`` (on its device; the same seed gives the same patches).

    Args:
        images: the batch.
        patch: patch size, one integer or one per spatial axis, each in ``[1, L_i]``.
        generator: the source of randomness.
        aligned: tensors with the images' batch and spatial size, cut at the same corners.

    Returns:
        ``(images, *aligned)`` cut to the patch.

    Raises:
        ValueError: for a patch larger than the images or an aligned tensor of another size.

    Shape:
        images: ``(B, C, *S)``; aligned: ``(B, L, *S)``; out: ``(B, C, *patch)``, ``(B, L, *patch)``.
    """
    if images.dim() < 3:
        raise ValueError(f"images: expected (B, C, *S), got shape {tuple(images.shape)}")
    shape = tuple(images.shape[2:])
    p = _sizes(patch, len(shape), "patch")
    for i, (pi, si) in enumerate(zip(p, shape)):
        if not 1 <= pi <= si:
            raise ValueError(f"patch: expected sizes in [1, {si}] along axis {i} (the images are {shape}), got {p}")
    for j, m in enumerate(aligned):
        if m.shape[0] != images.shape[0] or tuple(m.shape[2:]) != shape:
            raise ValueError(f"aligned[{j}]: expected batch {images.shape[0]} and spatial size {shape}, got shape {tuple(m.shape)}")
    tensors = (images, *aligned)
    outs: list[list[torch.Tensor]] = [[] for _ in tensors]
    for b in range(images.shape[0]):
        device = None if generator is None else generator.device
        corner = [int(torch.randint(si - pi + 1, (1,), generator=generator, device=device)) for pi, si in zip(p, shape)]
        where = (b, slice(None)) + tuple(slice(a, a + pi) for a, pi in zip(corner, p))
        for out, t in zip(outs, tensors):
            out.append(t[where])
    return tuple(torch.stack(o) for o in outs)
