"""Pull-back warping, composition of displacements and sampling at points.

All three use voxel units and the axis order of the tensor (see :mod:`plasticine.core.grid`).
The work is done by :func:`torch.nn.functional.grid_sample` with ``align_corners=True`` on CPU
and CUDA alike; nothing here synchronises with the host. With the ``triton`` extra, linear and
nearest warps with border or zeros padding of CUDA tensors run the kernel of
:mod:`plasticine.core.kernels` instead (the choice: :func:`plasticine.core.kernels.backend`).

Padding modes equal ``scipy.ndimage.map_coordinates`` modes (tested): ``"border"`` is scipy's
``"nearest"``, ``"zeros"`` is ``"grid-constant"`` with ``cval=0`` (linear interpolation blends
towards 0 within one voxel outside the edge; scipy's ``"constant"`` does not), ``"reflection"``
is ``"mirror"`` (reflection about the edge voxel centres). Linear and nearest interpolation equal
``order=1`` and ``order=0``.

Accuracy: ``grid_sample`` works in coordinates normalised to [-1, 1], so a sample position moves
by up to about ``max(S) * eps`` voxels (``eps = 2^-23`` in float32); an identity warp in float32
therefore differs from its input by at most about ``max(S) * 2^-23 * max|neighbour difference|``
(measured: 0.81 of that, sizes up to 512; float64: ~1e-13).

Speed: the voxel -> grid conversion is one autograd node (no identity grid or channel flip per
call). torch's CPU grid sampler parallelises over the batch only. For a batch of one image on the
CPU the sampling is split into ``torch.get_num_threads()`` pieces along the first spatial axis
that run as one batched call (same values; see ``_grid_sample``). Iterative integrators warp in
normalised units throughout (``NormalisedFrame``) instead of converting at every step.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
import torch.nn.functional as F

from . import kernels
from .grid import constant_vector, _normalised_identity, _normalised_scale, working_dtype, displacement_to_grid
from .shapes import check_shape

__all__ = ["warp", "compose", "sample_at_points", "GridSampleWarper", "NormalisedFrame", "Mode", "Padding"]

Mode = Literal["linear", "nearest", "cubic"]
Padding = Literal["border", "zeros", "reflection"]

_MODES = {"linear": "bilinear", "nearest": "nearest", "cubic": "bicubic"}
_PADDINGS = ("border", "zeros", "reflection")


# A piece of a split grid holds at least this many points (below it the split costs more than it saves).
_MIN_POINTS_PER_PIECE = 16384


def _grid_sample(image: torch.Tensor, grid: torch.Tensor, mode: str, padding: str) -> torch.Tensor:
    """``F.grid_sample`` (``align_corners=True``) that keeps every CPU thread busy for a single image.

    torch's CPU grid sampler parallelises over the batch only, so one image runs on one core. For
    a batch of one on the CPU the grid is cut along its first spatial axis into ``k`` pieces (``k``
    up to ``torch.get_num_threads()``) that are sampled as a batch of ``k`` from the same image
    (an expanded view, no copy). Every output value is computed exactly as without the split; the
    gradient with respect to the image is the sum of the ``k`` pieces' gradients (the same
    terms, added in another order).

    Shape:
        image: ``(B, C, *S_in)``; grid: ``(B, *S, N)``; out: ``(B, C, *S)``.
    """
    s0 = grid.shape[1]
    points = grid[0, ..., 0].numel()
    k = 1
    # under torch.compile the compiler schedules the threads (and get_num_threads cannot be traced)
    if image.device.type == "cpu" and image.shape[0] == 1 and grid.shape[0] == 1 and not torch.compiler.is_compiling():
        k = min(torch.get_num_threads(), s0, points // _MIN_POINTS_PER_PIECE)
    if k <= 1:
        return F.grid_sample(image, grid, mode=mode, padding_mode=padding, align_corners=True)
    piece = -(-s0 // k)
    k = -(-s0 // piece)
    pad = piece * k - s0
    if pad:
        grid = torch.cat([grid, grid[:, :pad]], dim=1)
    pieces = grid.reshape(k, piece, *grid.shape[2:])
    out = F.grid_sample(image.expand(k, *image.shape[1:]), pieces, mode=mode, padding_mode=padding, align_corners=True)
    out = out.transpose(0, 1).reshape(1, image.shape[1], piece * k, *out.shape[3:])
    return out[:, :, :s0] if pad else out


class NormalisedFrame:
    """Repeated warps of one spatial size in ``grid_sample``'s normalised units.

    Iterative schemes (scaling and squaring, Euler, RK4) warp fields by fields many times. Here
    the normalised coordinate lines are built once; a displacement ``u`` (voxels, axis order) is
    converted once to ``w = to_grid(u)`` (normalised units, reversed (x, y[, z]) channel order)
    and every warp is one ``grid_sample`` at ``identity + w`` (:meth:`grid` writes that sum
    channel by channel, so no identity field is held). A field sampled this way stays in the units
    it has, so a field ``w`` warped by itself is again in normalised units. On an axis of size 1
    the scale is 1 (the component is carried along; ``grid_sample`` reads the only voxel there).
    Shared by the integrators of :mod:`plasticine.registration.integrators`.

    Fields of float16/bfloat16 ``like`` are handled in float32: the coordinate lines, the scale and
    so every ``to_grid`` result are float32 (see :doc:`/conventions`).

    Args:
        like: a tensor of the spatial size, dtype and device of the fields to warp.
        mode: interpolation.
        padding: how samples outside the grid are read.

    Shape:
        ``to_grid``/``from_grid``: ``(B, N, *S)`` to ``(B, N, *S)``; ``sample``: field
        ``(B or 1, C, *S)``, w ``(B, N, *S)``, out ``(B, C, *S)``.
    """

    def __init__(self, like: torch.Tensor, mode: Mode = "linear", padding: Padding = "border"):
        shape = tuple(like.shape[2:])
        self.mode = _torch_mode(mode, padding, len(shape))
        self.padding = padding
        self.shape = shape
        n = len(shape)
        dtype = working_dtype(like.dtype)
        lines = [torch.linspace(-1.0, 1.0, k, dtype=dtype, device=like.device) if k > 1 else torch.zeros(1, dtype=dtype, device=like.device) for k in shape]
        # channel c of the grid is the coordinate along axis n - 1 - c, broadcast over the others
        self._lines = [lines[n - 1 - c].view([-1 if d == n - 1 - c else 1 for d in range(n)]) for c in range(n)]
        self.scale = _normalised_scale(shape, torch.empty(0, dtype=dtype, device=like.device), size_one=1.0)
        self._identity: torch.Tensor | None = None

    @property
    def identity(self) -> torch.Tensor:
        """The normalised identity, ``(1, N, *S)`` (built on each access)."""
        return _normalised_identity(self.shape, self.scale.dtype, self.scale.device)

    def grid(self, w: torch.Tensor) -> torch.Tensor:
        """The ``grid_sample`` grid ``identity + w``, channel last.

        Outside autograd each channel is written as ``w`` plus the broadcast coordinate line of
        its axis, straight into a contiguous grid, so no identity field is stored; under autograd
        (``w`` requiring grad) and under ``torch.compile`` (which cannot trace the strided
        writes) it is ``identity + w`` with the identity built once per frame, channel last as a view.

        Args:
            w: the field in normalised units.

        Shape:
            w: ``(B, N, *S)``; out: ``(B, *S, N)``.
        """
        if (torch.is_grad_enabled() and w.requires_grad) or torch.compiler.is_compiling():
            if self._identity is None:
                self._identity = self.identity
            return (self._identity + w).movedim(1, -1)
        out = torch.empty(w.shape[0], *self.shape, len(self.shape), dtype=w.dtype, device=w.device)
        for c, line in enumerate(self._lines):
            torch.add(w[:, c], line, out=out[..., c])
        return out

    def to_grid(self, u: torch.Tensor) -> torch.Tensor:
        """A displacement in voxels (axis order) in normalised units (reversed channel order).

        Shape:
            u: ``(B, N, *S)``; out: ``(B, N, *S)``.
        """
        return u.flip(1) * self.scale

    def from_grid(self, w: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`to_grid`.

        Shape:
            w: ``(B, N, *S)``; out: ``(B, N, *S)``.
        """
        return (w / self.scale).flip(1)

    def sample(self, field: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``field`` read at ``identity + w`` (one ``grid_sample``).

        Shape:
            field: ``(B or 1, C, *S)``; w: ``(B, N, *S)``; out: ``(B, C, *S)``.
        """
        return self.read(field, self.grid(w))

    def read(self, field: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """``field`` read at a grid from :meth:`grid` (one ``grid_sample``; :meth:`sample` without building the grid).

        Shape:
            field: ``(B or 1, C, *S)``; grid: ``(B, *S, N)``; out: ``(B, C, *S)``.
        """
        if field.shape[0] != grid.shape[0]:
            field = field.expand(grid.shape[0], *field.shape[1:])
        return _grid_sample(field, grid, self.mode, self.padding)


def _mark_non_finite(out: torch.Tensor, positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Make ``out`` NaN, in place, where a sample position along ``dim`` of ``positions`` is not finite.

    ``grid_sample`` reads a NaN or infinite position as one on (or beyond) the edge and returns a
    finite value; the conventions require a non-finite result there. Adds ``0 * component`` of
    every component (0 for a finite one, NaN otherwise), broadcast over ``out``'s channels:
    ``N`` in-place additions, no temporaries, no host synchronisation, no gradient.

    Shape:
        out: ``(B, C, *S)`` with positions ``(B or 1, N, *S)`` and ``dim=1``, or out ``(B, P, C)``
        with positions ``(B, P, N)`` and ``dim=-1``.
    """
    p = positions.detach()
    for i in range(p.shape[dim]):
        out.add_(p.narrow(dim, i, 1), alpha=0.0)
    return out


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
        image: the image to resample, any floating dtype matching ``displacement`` (a
            float16/bfloat16 one may meet a float32 one).
        displacement: ``u`` in voxels, channel ``i`` along spatial axis ``i``. Its batch size
            must equal the image's, or be 1 (one field for every image).
        mode: ``"linear"`` (bi/trilinear, default), ``"nearest"`` (gives no gradient with
            respect to ``displacement``; a warning says so when one is requested) or ``"cubic"``
            (Keys cubic convolution with a = -0.75, 2D only).
        padding: value outside the image: ``"border"`` (nearest edge voxel, default),
            ``"zeros"`` or ``"reflection"`` (mirrored about the edge voxel centres, scipy's
            ``mode="mirror"``).

    Precision: the sampling coordinates ``p + u(p)`` are formed in float32 for a float16/bfloat16
    displacement and the image is sampled in float32 then, so half-precision inputs keep
    sub-voxel accuracy (``torch.compile`` and autocast alike, see :doc:`/conventions`).

    Returns:
        The warped image, same shape and dtype as ``image``; float32 under :func:`torch.autocast`
        for a half-precision image or displacement (as CPU autocast runs ``grid_sample``).
        Non-finite values propagate (see
        :doc:`/conventions`): ``out(p)`` is NaN where ``u(p)`` holds a NaN or an infinity, and
        non-finite where interpolation reads a non-finite image voxel.

    Shape:
        image: ``(B, C, *S)``; displacement: ``(B, N, *S)`` or ``(1, N, *S)``; out: ``(B, C, *S)``.

    Example:
        >>> img = torch.arange(5.0).view(1, 1, 1, 5).expand(1, 1, 3, 5)
        >>> u = torch.zeros(1, 2, 3, 5); u[:, 1] = 1.0
        >>> warp(img, u)[0, 0, 0]
        tensor([1., 2., 3., 4., 4.])
    """
    dims = check_shape(image, "B C *S", "image", floating=True)
    n = dims["N"]
    bu = check_shape(displacement, "B N *S", "displacement", bindings={"S": dims["S"], "N": n}, floating=True)["B"]
    if bu not in (1, dims["B"]):
        expected = f"{dims['B']} (the image batch size)" + ("" if dims["B"] == 1 else " or 1")
        raise ValueError(
            f"displacement: expected batch size {expected}, got {bu}: image {tuple(image.shape)}, displacement {tuple(displacement.shape)}"
        )
    _check_dtypes(image, displacement, "displacement", "the image's")
    tmode = _torch_mode(mode, padding, n)
    if mode == "nearest" and displacement.requires_grad and torch.is_grad_enabled():
        warnings.warn(
            "warp(mode='nearest') has zero gradient with respect to the displacement; use mode='linear' to optimise it",
            stacklevel=2,
        )
    if mode != "cubic" and padding != "reflection" and kernels.selected(image) == "triton":
        return kernels.warp_kernel(image, displacement, mode, padding)
    grid = displacement_to_grid(displacement)  # float32 for a half-precision displacement
    if bu != dims["B"]:
        grid = grid.expand(dims["B"], *grid.shape[1:])
    out = _grid_sample(image.to(grid.dtype), grid, tmode, padding)
    if not torch.is_autocast_enabled(image.device.type):
        out = out.to(image.dtype)
    return _mark_non_finite(out, displacement, 1)


def _check_dtypes(a: torch.Tensor, b: torch.Tensor, name: str, whose: str) -> None:
    """Equal dtypes, or float16/bfloat16 beside float32 (computed in float32); else a ValueError naming ``name``."""
    if a.dtype != b.dtype and not (working_dtype(a.dtype) == working_dtype(b.dtype) == torch.float32):
        raise ValueError(f"{name}: expected {whose} dtype {a.dtype}, got {b.dtype} (only float16/bfloat16 may meet float32)")


def compose(u_a: torch.Tensor, u_b: torch.Tensor, padding: Padding = "border") -> torch.Tensor:
    r"""Displacement of :math:`\phi_a \circ \phi_b`: ``u_b + warp(u_a, u_b)``.

    :math:`(\phi_a \circ \phi_b)(p) = p + u_b(p) + u_a(p + u_b(p))`: first ``b``, then ``a``.
    Warping an image with the result equals warping it with ``u_a`` and then with ``u_b``
    (up to interpolation): ``warp(warp(I, u_a), u_b) ~ warp(I, compose(u_a, u_b))``.

    Args:
        u_a: displacement of the outer map.
        u_b: displacement of the inner map.
        padding: how ``u_a`` is extended outside the grid (border by default).

    Returns:
        The displacement of :math:`\phi_a \circ \phi_b` in voxels, in the wider dtype of the two
        and at least float32 (float16/bfloat16 fields are composed in float32).

    Shape:
        u_a: ``(B, N, *S)``; u_b: ``(B, N, *S)``; out: ``(B, N, *S)``.
    """
    dims = check_shape(u_a, "B N *S", "u_a", floating=True)
    check_shape(u_b, "B N *S", "u_b", bindings=dims, floating=True)
    _check_dtypes(u_a, u_b, "u_b", "u_a's")
    dtype = working_dtype(torch.promote_types(u_a.dtype, u_b.dtype))
    return u_b.to(dtype) + warp(u_a.to(dtype), u_b, padding=padding)


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
        ``out[b, p, c] = field[b, c](points[b, p])``; NaN for a point with a non-finite coordinate.

    Shape:
        field: ``(B, C, *S)``; points: ``(B, P, N)``; out: ``(B, P, C)``.
    """
    dims = check_shape(field, "B C *S", "field", floating=True)
    n = dims["N"]
    check_shape(points, "B P N", "points", bindings={"B": dims["B"], "N": n}, spatial=(), floating=True)
    if points.dtype != field.dtype:
        raise ValueError(f"points: expected the field's dtype {field.dtype}, got {points.dtype}")
    tmode = _torch_mode(mode, padding, n)
    sizes = dims["S"]
    scale = constant_vector([2.0 / (s - 1) if s > 1 else 0.0 for s in sizes], field).view(n)
    offset = constant_vector([1.0 if s > 1 else 0.0 for s in sizes], field).view(n)
    g = points * scale - offset
    g = g.flip(-1).reshape(points.shape[0], points.shape[1], *([1] * (n - 1)), n)
    out = _grid_sample(field, g, tmode, padding)
    return _mark_non_finite(out.reshape(field.shape[0], field.shape[1], points.shape[1]).transpose(1, 2), points, -1)


class GridSampleWarper(torch.nn.Module):
    """The :class:`~plasticine.core.Warper` of :func:`warp`: stores mode and padding.

    Args:
        mode: interpolation, as in :func:`warp`.
        padding: extension outside the grid, as in :func:`warp`.

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
