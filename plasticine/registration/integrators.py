r"""Integrators of stationary velocity fields (SVF): the displacement of :math:`\exp(v)`.

A stationary velocity :math:`v` (voxels per unit time, ``(B, N, *S)``) generates the flow
:math:`\partial_t \phi_t = v \circ \phi_t`, :math:`\phi_0 = \mathrm{Id}`; the group exponential is
:math:`\exp(v) = \phi_1`, and :math:`\exp(-v) = \exp(v)^{-1}` gives the inverse. Three integrators
share the :class:`~plasticine.core.Integrator` protocol:

* :class:`ScalingAndSquaring` (the paper's, ``steps=7``): :math:`\phi = (\mathrm{Id} + v / 2^T)^{2^T}`
  by ``T`` self-compositions;
* :class:`Euler` and :class:`RK4`: fixed-step integration of the flow, one warp of ``v`` per stage.

All compose with linear interpolation and, by default, border padding (the field is extended by
its edge values; on a smooth 40-voxel field on 256 x 256 this is 8 to 12 times more
inverse-consistent than zero padding, see :class:`ScalingAndSquaring`). The work happens in
``grid_sample``'s normalised units: the velocity is converted once, the coordinate lines are
built once, and every step is one ``grid_sample`` and one addition. Scaling and squaring
differentiates with a lean backward by default (``memory="lean"``: three per-step fields kept,
the others recomputed, each step's ``grid_sample`` backward run from them one step at a time),
which needs less than half the peak memory of plain autograd and of the peers for forward+backward. With a fixed number of steps
nothing synchronises with the host; ``steps="auto"`` reads :math:`\max|v|` once. With the
``triton`` extra, scaling and squaring of a CUDA tensor (border or zeros padding, ``memory="lean"``)
runs one fused kernel per step (:mod:`plasticine.core.kernels`).

Precision: a float16/bfloat16 velocity (say, predicted under :func:`torch.autocast`) is
integrated in float32: the coordinate lines, every step's field and its accumulation are float32,
and so is the returned displacement (see :doc:`/conventions`). All three integrators compile with
``torch.compile(fullgraph=True)``; the lean scaling and squaring then runs as the operator
``plasticine::lean_squaring`` with its own backward (the same values and gradient).

Errors follow :doc:`/conventions`: the velocity must be a floating ``(B, N, *S)`` tensor with
``B >= 1`` (an integer velocity is refused, not integrated), and a NaN or an infinity in it gives a
non-finite displacement wherever the flow reads it (at least at its own voxel), never a finite one.

References:
    V. Arsigny, O. Commowick, X. Pennec, N. Ayache, "A Log-Euclidean framework for statistics on
    diffeomorphisms", MICCAI 2006 (scaling and squaring of stationary velocity fields).
    J. Ashburner, "A fast diffeomorphic image registration algorithm", NeuroImage 38, 2007.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Literal, get_args

import torch

from ..core.config import Configurable
from ..core.kernels import scaling_and_squaring_kernel, selected
from ..core.shapes import NonFiniteError, check_shape
from ..core.validate import check_int, check_option
from ..core.grid import working_dtype
from ..core.warp import NormalisedFrame, Padding

Memory = Literal["lean", "autograd"]
"""How :func:`scaling_and_squaring` keeps what its backward needs: ``"lean"`` (per-step fields only, steps recomputed) or ``"autograd"``."""

__all__ = ["scaling_and_squaring", "integrate_euler", "integrate_rk4", "auto_squaring_steps", "ScalingAndSquaring", "Euler", "RK4"]


def auto_squaring_steps(velocity: torch.Tensor, max_step: float = 0.5, min_steps: int = 4, max_steps: int = 20) -> int:
    r"""Number of squaring steps ``T`` so that the first step moves at most ``max_step`` voxels.

    :math:`T = \min(T_{max}, \max(T_{min}, \lceil \log_2(\max_p |v(p)| / s) \rceil))` with the
    Euclidean norm :math:`|v(p)|`. Reads :math:`\max|v|` from the tensor, so it synchronises with
    the device once (the fixed-step integrators never do).

    Args:
        velocity: stationary velocity in voxels.
        max_step: largest displacement ``s`` (voxels) of the scaled field :math:`v / 2^T`.
        min_steps: smallest ``T`` returned.
        max_steps: largest ``T`` returned.

    Returns:
        The number of squarings ``T``.

    Raises:
        ValueError: for a wrong shape or a non-floating velocity;
            :class:`~plasticine.core.NonFiniteError` (a ``ValueError``) if it holds a non-finite
            value (an ``int`` cannot carry a NaN).

    Shape:
        velocity: ``(B, N, *S)``.

    Example:
        >>> v = torch.zeros(1, 2, 8, 8); v[0, 0, 3, 3] = 100.0
        >>> auto_squaring_steps(v)  # 100 / 2^8 <= 0.5
        8
    """
    check_shape(velocity, "B N *S", "velocity", floating=True)
    vmax = float(velocity.detach().square().sum(1).amax()) ** 0.5
    if not math.isfinite(vmax):
        raise NonFiniteError(f"velocity: expected finite values to choose the number of squarings, found max norm {vmax}")
    need = math.ceil(math.log2(vmax / max_step)) if vmax > max_step else 0
    return int(min(max(min_steps, need), max_steps))


def scaling_and_squaring(
    velocity: torch.Tensor, steps: int | Literal["auto"] = 7, padding: Padding = "border", memory: Memory = "lean"
) -> torch.Tensor:
    r"""Displacement of :math:`\exp(v)` by scaling and squaring.

    :math:`u_0 = v / 2^T`, then ``T`` times :math:`u \leftarrow u + u \circ (\mathrm{Id} + u)`
    (i.e. :math:`\phi \leftarrow \phi \circ \phi`), each composition one linear ``grid_sample``
    in normalised units. Accuracy (inverse consistency, Jacobian) is stated, measured and tested
    in :class:`ScalingAndSquaring`.

    Args:
        velocity: stationary velocity in voxels, channel ``i`` along axis ``i``.
        steps: number of squarings ``T`` (``0`` returns ``v`` itself), or ``"auto"`` for
            :func:`auto_squaring_steps` (one host synchronisation).
        padding: extension of the field outside the grid during composition.
        memory: what the backward keeps. ``"lean"``: a few per-step fields (the others
            recomputed), each step's
            ``grid_sample`` backward run from them in the backward, one step at a time (less than
            half the peak memory of ``"autograd"`` for forward+backward, bitwise the same gradient; a
            second backward through the graph recomputes the fields; a second derivative is
            refused). ``"autograd"``: plain autograd, which keeps every step's
            sampling grid too and supports ``create_graph=True``. Without a gradient both run the
            same loop.

    Returns:
        The displacement of :math:`\exp(v)` in voxels, in ``velocity``'s dtype, or float32 for a
        float16/bfloat16 velocity (integrated in float32).

    Raises:
        RuntimeError: from the backward, for ``memory="lean"`` with ``create_graph=True``.

    Shape:
        velocity: ``(B, N, *S)``; out: ``(B, N, *S)``.

    Example:
        >>> v = torch.zeros(1, 2, 5, 5); v[:, 1] = 1.5  # a constant velocity is a translation
        >>> scaling_and_squaring(v)[0, 1, 2, 2].item()
        1.5
    """
    check_shape(velocity, "B N *S", "velocity", floating=True)
    if steps == "auto":
        steps = auto_squaring_steps(velocity)
    steps = check_int(steps, "steps", 0)
    memory = check_option(memory, "memory", get_args(Memory))
    if padding in ("border", "zeros") and memory == "lean" and selected(velocity) == "triton":
        return scaling_and_squaring_kernel(velocity, steps, padding)
    frame = NormalisedFrame(velocity, "linear", padding)
    if memory == "lean" and steps and torch.is_grad_enabled() and velocity.requires_grad:
        if torch.compiler.is_compiling():
            return frame.from_grid(_lean_squaring(velocity, steps, frame.padding)[0])
        return frame.from_grid(_LeanSquaring.apply(velocity, frame, steps))
    w = frame.to_grid(velocity) * (0.5**steps)
    for _ in range(steps):
        w = w + frame.sample(w, w)
    return frame.from_grid(w)


_LEAN_SLOTS = 2
r"""Tensors (kept fields and sampling grids) the lean backward holds besides those of the step it differentiates.

The backward adds every step's gradient terms into the gradient it received (eager path), so
besides the caller's output a step holds five fields: that gradient, :math:`w_i`, its grid and
the two ``grid_sample`` gradients. With two more the peak is eight fields, as at the last step,
where the forward's other two kept fields are still held: at 1x3x96x96x96 that is 81 MB, under
half of every peer's 172 to 182 MB (one field is 10.1 MiB, and a ninth would pass that half).
"""


def _lean_kept(steps: int) -> tuple[int, ...]:
    r"""Indices ``i`` of the fields :math:`w_i` that the lean forward keeps: :math:`T-1`, :math:`T-2` and :math:`\lfloor T/2 \rfloor`.

    :math:`w_0` is never kept (it is :math:`v / 2^T` in normalised units, recomputed from
    :math:`v`). Three is the most that fits beside the last step's five working fields and the
    output in the budget of :data:`_LEAN_SLOTS`; every other field costs at least one squaring to
    recompute, and for ``T = 7`` the backward recomputes exactly three (:math:`w_4` from
    :math:`w_3`, then :math:`w_1, w_2` from :math:`w_0`).
    """
    return tuple(sorted({i for i in (steps - 1, steps - 2, steps // 2) if i >= 1}))


class _LeanSquaring(torch.autograd.Function):
    r"""The ``T`` squarings from the velocity, with a backward that keeps only a few per-step fields.

    Forward: :math:`w_0 = \mathrm{to\_grid}(v) / 2^T`, :math:`w_{i+1} = w_i + w_i \circ (\mathrm{Id} + w_i)`
    (one ``grid_sample`` and one addition each), keeping no graph and only the fields of
    :func:`_lean_kept` (three for ``T >= 4``). Backward, from the last step to the first: the
    field :math:`w_i` of the step is popped if kept, else recomputed from the nearest kept field
    below it (or from :math:`v`, which the caller holds anyway); on the way the fields just below
    :math:`i` are kept, and then the sampling grid :math:`\mathrm{Id} + w_{i-1}` of the next step,
    while at most :data:`_LEAN_SLOTS` tensors are held (a kept grid saves rebuilding it). The
    incoming gradient :math:`g` is pulled through the step by ``grid_sample``'s own backward,
    :math:`g \leftarrow g + \partial_{\text{image}} + \partial_{\text{grid}}` (the image and the
    grid of the step are both :math:`w_i`, both gradients are needed), with the contiguous
    sampling grid rebuilt from :math:`w_i` unless kept. The sums are made in place in the
    gradient received (a fresh tensor from the division of :meth:`NormalisedFrame.from_grid`,
    held by nothing else); the compiled operator, which must not write its inputs, accumulates
    into the first image gradient instead. These are the terms plain autograd adds, added in its
    order (:math:`g + \partial_{\text{image}}` is :math:`\partial_{\text{image}} + g` to the bit),
    so the gradient is the same to the bit. At any time the backward holds the gradient, :math:`w_i`,
    its grid, the two ``grid_sample`` gradients and :data:`_LEAN_SLOTS` kept tensors (at the last
    step: the forward's two other kept fields), besides the caller's output: eight fields at the
    peak; autograd keeps every step's grid (a strided view, whose ``grid_sample`` backward is
    slower than on the contiguous one here) and input instead.

    Shape:
        velocity: ``(B, N, *S)`` in voxels; out: ``(B, N, *S)`` in normalised units.
    """

    @staticmethod
    def start(velocity: torch.Tensor, frame: NormalisedFrame, steps: int) -> torch.Tensor:
        r""":math:`w_0 = \mathrm{to\_grid}(v) / 2^T`."""
        return frame.to_grid(velocity).mul_(0.5**steps)

    @staticmethod
    def squarings(velocity: torch.Tensor, frame: NormalisedFrame, steps: int) -> tuple[torch.Tensor, list[tuple[int, torch.Tensor, None]]]:
        r"""The last field :math:`w_T` and the kept :math:`(i, w_i, \text{None})` of :func:`_lean_kept`, without a graph."""
        keep = _lean_kept(steps)
        w = _LeanSquaring.start(velocity, frame, steps)
        kept = []
        for i in range(steps):
            if i in keep:
                kept.append((i, w, None))
            w = frame.sample(w, w).add_(w)
        return w, kept

    @staticmethod
    def forward(ctx, velocity: torch.Tensor, frame: NormalisedFrame, steps: int) -> torch.Tensor:
        w, kept = _LeanSquaring.squarings(velocity, frame, steps)
        # the kept fields are intermediates, held as a list so that the backward can drop each one
        # as soon as it has used it (saved tensors would all live until the backward ends)
        ctx.frame, ctx.steps, ctx.kept = frame, steps, kept
        ctx.save_for_backward(velocity)
        return w

    @staticmethod
    def field(
        velocity: torch.Tensor, frame: NormalisedFrame, steps: int, i: int, kept: list[tuple[int, torch.Tensor, torch.Tensor | None]]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        r"""``(w_i, grid)``: :math:`w_i` popped from ``kept`` or recomputed from the nearest field below it; its sampling grid if kept, else None.

        A recomputation starts from the top kept field :math:`w_j` (kept again) or from
        :math:`w_0`; with the room left under :data:`_LEAN_SLOTS` it keeps the fields just below
        :math:`i` (never :math:`w_0`, which costs no squaring), then, if room is left and
        :math:`w_{i-1}` is kept, the grid :math:`\mathrm{Id} + w_{i-1}` it built, which the next
        step uses instead of rebuilding it.
        """
        if kept and kept[-1][0] == i:
            _, w, grid = kept.pop()
            return w, grid
        rekeep = bool(kept)
        j, w, grid = kept.pop() if rekeep else (0, _LeanSquaring.start(velocity, frame, steps), None)
        room = _LEAN_SLOTS - sum(1 if g is None else 2 for _, _, g in kept) - rekeep
        first = max(1, j + 1 if rekeep else j, i - room)
        room -= max(0, i - first)
        for k in range(j, i):
            if grid is None:
                grid = frame.grid(w)
            if (k == j and rekeep) or k >= first:
                kept.append((k, w, grid if k == i - 1 and room > 0 else None))
            w = frame.read(w, grid).add_(w)
            grid = None
        return w, None

    @staticmethod
    def backward(ctx, grad: torch.Tensor, own: bool = True):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "scaling_and_squaring(memory='lean') is differentiable once: for a backward with "
                "create_graph=True (a second derivative) use memory='autograd'"
            )
        (velocity,) = ctx.saved_tensors
        frame, steps = ctx.frame, ctx.steps
        # a second backward through the graph (retain_graph=True) finds the fields dropped: recompute them
        kept = ctx.kept if ctx.kept is not None else _LeanSquaring.squarings(velocity, frame, steps)[1]
        ctx.kept = None
        n = velocity.dim() - 2
        sampler_backward = torch.ops.aten.grid_sampler_2d_backward if n == 2 else torch.ops.aten.grid_sampler_3d_backward
        padding = ("zeros", "border", "reflection").index(frame.padding)
        for i in reversed(range(steps)):
            w, grid = _LeanSquaring.field(velocity, frame, steps, i, kept)
            if grid is None:
                grid = frame.grid(w)
            g_image, g_grid = sampler_backward(grad, w, grid, 0, padding, True, [True, True])
            del grid, w
            # the terms in autograd's order: (from the addition + from the image) + from the grid
            if own:
                grad.add_(g_image)
            else:
                grad, own = g_image.add_(grad), True
            del g_image
            grad.add_(g_grid.movedim(-1, 1))
            del g_grid
        # w_0 = flip(v) * scale / 2^T, so dL/dv = flip(scale * g) / 2^T
        return grad.mul_(frame.scale).mul_(0.5**steps).flip(1), None, None


@torch.library.custom_op("plasticine::lean_squaring", mutates_args=())
def _lean_squaring(velocity: torch.Tensor, steps: int, padding: str) -> list[torch.Tensor]:
    r"""The lean forward as one operator for ``torch.compile``: :math:`w_T`, then the kept :math:`w_i` of :func:`_lean_kept`.

    Dynamo cannot trace :class:`_LeanSquaring` (its backward drops the kept fields from a list), so
    a compiled :func:`scaling_and_squaring` calls this operator and its backward
    (:func:`_lean_squaring_backward`), which run the same code as the eager lean path (the same
    values and gradient); the compiler sees both as opaque calls. The kept fields are saved until
    the backward ends (the eager path frees each one after use).

    Shape:
        velocity: ``(B, N, *S)`` in voxels; out: ``1 + len(_lean_kept(T))`` fields ``(B, N, *S)`` in normalised units.
    """
    with torch.no_grad():
        w, kept = _LeanSquaring.squarings(velocity, NormalisedFrame(velocity, "linear", padding), steps)
    return [w, *(field for _, field, _ in kept)]


@_lean_squaring.register_fake
def _(velocity: torch.Tensor, steps: int, padding: str) -> list[torch.Tensor]:
    like = torch.empty_like(velocity, dtype=working_dtype(velocity.dtype))
    return [torch.empty_like(like) for _ in range(1 + len(_lean_kept(steps)))]


@torch.library.custom_op("plasticine::lean_squaring_backward", mutates_args=())
def _lean_squaring_backward(grad: torch.Tensor, velocity: torch.Tensor, kept: list[torch.Tensor], steps: int, padding: str) -> torch.Tensor:
    """The backward of :func:`_lean_squaring`: :meth:`_LeanSquaring.backward` on the saved fields.

    Shape:
        grad: ``(B, N, *S)``; velocity: ``(B, N, *S)``; out: ``(B, N, *S)``, in ``velocity``'s dtype.
    """
    kept_at = [(i, field, None) for i, field in zip(_lean_kept(steps), kept)]
    ctx = SimpleNamespace(saved_tensors=(velocity,), frame=NormalisedFrame(velocity, "linear", padding), steps=steps, kept=kept_at)
    with torch.no_grad():
        return _LeanSquaring.backward(ctx, grad, own=False)[0].to(velocity.dtype)


@_lean_squaring_backward.register_fake
def _(grad: torch.Tensor, velocity: torch.Tensor, kept: list[torch.Tensor], steps: int, padding: str) -> torch.Tensor:
    return torch.empty_like(velocity)


def _lean_setup(ctx, inputs, output) -> None:
    velocity, ctx.steps, ctx.padding = inputs
    ctx.save_for_backward(velocity, *output[1:])


def _lean_grad(ctx, grads):
    velocity, *kept = ctx.saved_tensors
    return _lean_squaring_backward(grads[0], velocity, kept, ctx.steps, ctx.padding), None, None


_lean_squaring.register_autograd(_lean_grad, setup_context=_lean_setup)


def integrate_euler(velocity: torch.Tensor, steps: int = 32, padding: Padding = "border") -> torch.Tensor:
    r"""Displacement of :math:`\exp(v)` by forward Euler: :math:`u \leftarrow u + h\, v \circ (\mathrm{Id} + u)`.

    First-order accurate (error about :math:`\max|v| \max|\partial v| / (2\,\text{steps})`),
    ``steps - 1`` warps of ``v`` with :math:`h = 1/\text{steps}`.

    Args:
        velocity: stationary velocity in voxels.
        steps: number of Euler steps (positive).
        padding: extension of ``v`` outside the grid.

    Returns:
        The displacement of :math:`\exp(v)` in voxels (float32 for a float16/bfloat16 velocity).

    Shape:
        velocity: ``(B, N, *S)``; out: ``(B, N, *S)``.
    """
    check_shape(velocity, "B N *S", "velocity", floating=True)
    h = 1.0 / check_int(steps, "steps", 1)
    frame = NormalisedFrame(velocity, "linear", padding)
    vg = frame.to_grid(velocity)
    w = vg * h
    for _ in range(steps - 1):
        w = w + h * frame.sample(vg, w)
    return frame.from_grid(w)


def integrate_rk4(velocity: torch.Tensor, steps: int = 8, padding: Padding = "border") -> torch.Tensor:
    r"""Displacement of :math:`\exp(v)` by the classical fourth-order Runge-Kutta method.

    For every voxel the trajectory :math:`\dot p = v(p)` is integrated from ``t = 0`` to ``1``
    in ``steps`` steps of four stages (``4 steps - 1`` warps of ``v``); :math:`v` is interpolated
    linearly between voxels, which bounds the accuracy more than the step count does.

    Args:
        velocity: stationary velocity in voxels.
        steps: number of RK4 steps (positive).
        padding: extension of ``v`` outside the grid.

    Returns:
        The displacement of :math:`\exp(v)` in voxels (float32 for a float16/bfloat16 velocity).

    Shape:
        velocity: ``(B, N, *S)``; out: ``(B, N, *S)``.
    """
    check_shape(velocity, "B N *S", "velocity", floating=True)
    h = 1.0 / check_int(steps, "steps", 1)
    frame = NormalisedFrame(velocity, "linear", padding)
    vg = frame.to_grid(velocity)
    w = torch.zeros_like(vg)
    for i in range(steps):
        k1 = frame.sample(vg, w) if i else vg
        k2 = frame.sample(vg, w + (0.5 * h) * k1)
        k3 = frame.sample(vg, w + (0.5 * h) * k2)
        k4 = frame.sample(vg, w + h * k3)
        w = w + (h / 6.0) * (k1 + 2 * k2 + 2 * k3 + k4)
    return frame.from_grid(w)


class ScalingAndSquaring(Configurable, torch.nn.Module):
    r"""Module form of :func:`scaling_and_squaring` (the paper's integrator, ``steps=7``).

    **Inverse consistency (stated bound, tested).** Let :math:`A = \max_p |v(p)|` (Euclidean,
    voxels), :math:`G = \max |\partial_j v_i|` and :math:`H = \max |\partial_k \partial_j v_i|`,
    derivatives by :func:`~plasticine.core.spatial_gradient` (applied twice for ``H``). On every voxel
    at least :math:`\lceil 2A \rceil + 2` voxels from the edges (where no sample leaves the grid),
    :math:`\exp(v) \circ \exp(-v)` and :math:`\exp(-v) \circ \exp(v)` (by
    :func:`~plasticine.core.compose`) are within

    .. math::

        e^{G} \left( \frac{A\, G}{2^T} + \frac{H}{4} \right) + 8 \max(S)\, \varepsilon

    voxels of the identity (``T`` squarings, :math:`\varepsilon` the dtype's machine epsilon).
    The first term is the error of the first step :math:`\exp(v / 2^T) \approx \mathrm{Id} + v / 2^T`
    doubled by every squaring; the second the linear interpolation of the composed fields. The
    bound was found on 150 random smooth fields (2D and 3D, Gaussian-smoothed noise with
    :math:`\sigma` from 1 to 10 voxels, :math:`G \le 1.5`, ``T`` from 2 to 12), where the measured
    error reached at most 0.68 of it; ``tests/test_integrators.py`` checks it on drawn fields in
    float32 and float64. Near the edges the border padding adds an error that the bound does not
    cover (the field beyond the edge is unknown).

    **Orientation (stated bound, tested).** If :math:`G \le 1` then the Jacobian determinant of
    :math:`\exp(v)` (:func:`~plasticine.core.jacobian_determinant`) is at least
    :math:`\tfrac12 e^{-N G} > 0` at every voxel, for any ``T >= 4`` (the exact flow satisfies
    :math:`\det \ge e^{-N G}`). Measured minima on fields with :math:`\sigma = 1` to 8: 0.36
    (2D) and 0.22 (3D) at :math:`G = 1`; folding appears from :math:`G \approx 2` to 3 on rough
    fields.

    **Measured inverse consistency** (``python tests/test_integrators.py``): mean of
    :func:`~plasticine.core.inverse_consistency_error` over a 256 x 256 float32 field (noise from
    seed 0 smoothed with :math:`\sigma = 24`, scaled to :math:`\max|v| = 40` voxels,
    :math:`G = 0.77`):

    =========  =====  ===========  ===========================
    padding    steps  whole image  interior (40 voxels inside)
    =========  =====  ===========  ===========================
    border     7      0.057        0.0154
    border     12     0.041        0.0024
    zeros      7      0.485        0.0154
    zeros      12     0.469        0.0024
    =========  =====  ===========  ===========================

    Border padding is 8.6 (7 steps) to 11.5 (12 steps) times more inverse-consistent than zero
    padding over the whole image, the same inside; 12 steps instead of 7 divide the interior error
    by 6.

    **Memory and time (measured, ``python benchmarks/primitives.py --only scaling_and_squaring --threads 1``).**
    ``memory="lean"`` (the default) gives the same output and, to the bit, the same gradient as
    ``memory="autograd"``. One forward+backward, 7 steps, float32, one CPU thread, every library
    called 11 times in turn; peak memory: 1x3x96x96x96, 80.9 MB (8 fields) against 182 MB for
    autograd (0.44x; MONAI, voxelmorph and torchreg 182 MB: 0.44x, deepali 172 MB: 0.47x);
    1x2x256x256, 4.6 against 9.5 MB (0.48x; voxelmorph 9.6 MB, deepali 10.6 MB). The fields kept
    are :math:`w_{T-1}, w_{T-2}` and :math:`w_{\lfloor T/2 \rfloor}`; the others are recomputed
    (three extra squarings for ``T = 7``, the fewest that these three allow), each costing one
    ``grid_sample`` forward (about 5 % of the fwd+bwd time each at 96^3). Time at 96^3 on a
    shared 2-core machine at load average 8 to 12 (wall time about twice the CPU time): lean /
    autograd 1.08x by the median CPU time (``time.process_time``), 1.16x by the smallest,
    0.93x by the median wall time (0.84x by the smallest); lean / the peers by the median CPU
    time: MONAI 0.83x, voxelmorph 1.06x, deepali 1.03x, torchreg 0.85x. Two separate runs of
    lean and autograd alone (5 and 9 alternating calls each, load about 8 to 9): 1.07x and 1.09x
    by the median CPU time, 0.99x and 1.06x by the smallest; under such load single calls vary
    by up to 1.6x, so the ratio is known to about 0.05.

    Args:
        steps: number of squarings ``T`` or ``"auto"`` (:func:`auto_squaring_steps`).
        padding: extension of the field outside the grid during composition.
        memory: ``"lean"`` or ``"autograd"``, what the backward keeps (see
            :func:`scaling_and_squaring`).

    Shape:
        velocity: ``(B, N, *S)``; out: ``(B, N, *S)``.

    Example:
        >>> exp = ScalingAndSquaring(steps=7)
        >>> v = torch.zeros(2, 3, 8, 9, 10)
        >>> exp(v).shape
        torch.Size([2, 3, 8, 9, 10])
    """

    def __init__(self, steps: int | Literal["auto"] = 7, padding: Padding = "border", memory: Memory = "lean"):
        super().__init__()
        self.steps = steps if steps == "auto" else check_int(steps, "steps", 0)
        self.padding = check_option(padding, "padding", get_args(Padding))
        self.memory = check_option(memory, "memory", get_args(Memory))

    def forward(self, velocity: torch.Tensor) -> torch.Tensor:
        return scaling_and_squaring(velocity, self.steps, self.padding, self.memory)

    def extra_repr(self) -> str:
        return f"steps={self.steps!r}, padding={self.padding!r}, memory={self.memory!r}"


class Euler(Configurable, torch.nn.Module):
    """Module form of :func:`integrate_euler`.

    Args:
        steps: number of Euler steps (positive).
        padding: extension of ``v`` outside the grid.

    Shape:
        velocity: ``(B, N, *S)``; out: ``(B, N, *S)``.
    """

    def __init__(self, steps: int = 32, padding: Padding = "border"):
        super().__init__()
        self.steps, self.padding = check_int(steps, "steps", 1), check_option(padding, "padding", get_args(Padding))

    def forward(self, velocity: torch.Tensor) -> torch.Tensor:
        return integrate_euler(velocity, self.steps, self.padding)

    def extra_repr(self) -> str:
        return f"steps={self.steps}, padding={self.padding!r}"


class RK4(Configurable, torch.nn.Module):
    """Module form of :func:`integrate_rk4`.

    Args:
        steps: number of RK4 steps (positive).
        padding: extension of ``v`` outside the grid.

    Shape:
        velocity: ``(B, N, *S)``; out: ``(B, N, *S)``.
    """

    def __init__(self, steps: int = 8, padding: Padding = "border"):
        super().__init__()
        self.steps, self.padding = check_int(steps, "steps", 1), check_option(padding, "padding", get_args(Padding))

    def forward(self, velocity: torch.Tensor) -> torch.Tensor:
        return integrate_rk4(velocity, self.steps, self.padding)

    def extra_repr(self) -> str:
        return f"steps={self.steps}, padding={self.padding!r}"
