r"""Optional Triton kernels behind :func:`~plasticine.core.warp`, the integrators, MI and local NCC.

The public functions choose these kernels for CUDA tensors when ``triton`` is importable (the
``triton`` extra) and run the eager torch code otherwise. The choice is visible and can be forced
for a block of code with :func:`backend`; :func:`selected` says which path a tensor takes. No
environment variable changes a result.

The kernels work in voxel units and add the identity inside the kernel, in float32 (float64 for
float64 inputs), so no sampling grid is built and half-precision inputs keep sub-pixel accuracy
(``grid_sample`` on half inputs holds the absolute normalised coordinate, whose spacing near the
far edge is about ``max(S) * 2^-12`` voxels in float16 and ``max(S) * 2^-9`` in bfloat16, half a
voxel and 4 voxels at a size of 2048; here only the displacement is rounded, to its own precision):

* :func:`warp_kernel`: :math:`\mathrm{out}(p) = I(p + u(p))`, 2D and 3D, linear and nearest,
  border and zeros padding; one pass forward, one pass backward (atomic adds scatter the image
  gradient, the displacement gradient is gathered per voxel);
* :func:`squaring_step`: one fused step of scaling and squaring, :math:`u \leftarrow u + u \circ (\mathrm{Id} + u)`,
  and :func:`scaling_and_squaring_kernel` built from it (each step keeps only its input field
  for the backward);
* :func:`joint_histogram_kernel`: the Parzen joint histogram of
  :func:`~plasticine.losses.joint_histogram` (cubic B-spline or Gaussian kernel, same bin
  positions and padding rules) by atomic adds, and its backward gathered per sample;
* :func:`box_sum_kernel`: the zero-padded centred box sums of :func:`~plasticine.losses.local_ncc`,
  one pass per axis.

The kernels' backward passes are differentiable once (a backward with ``create_graph=True``
raises and names ``backend("eager")``, whose ``grid_sample`` supports a second derivative).
Atomic adds (the image gradient of a warp, the histogram) add in a varying order on CUDA, so
those results can differ between runs in the last bits, as ``grid_sample``'s backward does.

Equality with the eager path (forward and backward, 2D and 3D, float32 to about ``1e-5``) is
tested on the CPU through Triton's interpreter (``TRITON_INTERPRET=1``, which runs the kernels
on CPU tensors); there, forcing ``backend("triton")`` runs them on CPU tensors too.

Code traced by :func:`torch.compile` takes the eager path whatever the backend (the compiler
fuses it into kernels of its own). Cases without a kernel run eagerly whatever the backend: cubic interpolation and reflection
padding in :func:`~plasticine.core.warp`, ``memory="autograd"`` in
:func:`~plasticine.registration.scaling_and_squaring` (which supports a second derivative; the
kernels' backward is differentiable once), and the Euler and RK4 integrators.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from typing import Iterator, Literal, Sequence

import torch

__all__ = [
    "Backend",
    "backend",
    "selected",
    "triton_available",
    "warp_kernel",
    "squaring_step",
    "scaling_and_squaring_kernel",
    "joint_histogram_kernel",
    "box_sum_kernel",
]

Backend = Literal["auto", "eager", "triton"]
"""``"auto"``: Triton for CUDA tensors when importable, eager otherwise; ``"eager"``: never Triton; ``"triton"``: always (an error where it cannot run)."""

_BACKENDS = ("auto", "eager", "triton")
_CHOICE: contextvars.ContextVar[str] = contextvars.ContextVar("plasticine_kernel_backend", default="auto")
_PADDINGS = ("border", "zeros")
_BLOCK = 1024
_HISTOGRAM_COPIES = 32
"""Histograms per row that the blocks of the MI kernel add into in turn, summed at the end."""
_MAX_ELEMENTS = 2**31 - 1 - 8 * _BLOCK
"""Largest tensor the kernels take (their offsets are int32); ``"auto"`` runs larger ones eagerly."""


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether ``triton`` can be imported (cached after the first call; the import happens here).

    Shape:
        Not applicable.
    """
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # any failure means no Triton path
        return False
    return True


def _interpreted() -> bool:
    """Whether Triton runs its interpreter (``TRITON_INTERPRET=1``), which executes kernels on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@contextlib.contextmanager
def backend(name: Backend) -> Iterator[None]:
    """Choose the path of the kernels' public callers inside a ``with`` block.

    ``with backend("eager"):`` runs the torch code even on CUDA; ``with backend("triton"):``
    runs the kernels and raises where they cannot run (triton missing, a CPU tensor outside
    the interpreter, or a tensor of ``2^31`` elements or more); ``"auto"`` (the default outside
    any block) takes the kernels for CUDA tensors when triton is importable. Blocks nest; the choice is per thread and per asyncio task.

    Args:
        name: ``"auto"``, ``"eager"`` or ``"triton"``.

    Raises:
        ValueError: for another name.

    Shape:
        not applicable (no tensors).

    Example:
        >>> with backend("eager"):
        ...     selected(torch.zeros(1))
        'eager'
    """
    if name not in _BACKENDS:
        raise ValueError(f"backend: expected one of {_BACKENDS}, got {name!r}")
    token = _CHOICE.set(name)
    try:
        yield
    finally:
        _CHOICE.reset(token)


def selected(tensor: torch.Tensor) -> str:
    """The path (``"triton"`` or ``"eager"``) that an operation on ``tensor`` takes under the current :func:`backend`.

    Args:
        tensor: the operation's first input.

    Returns:
        ``"triton"`` or ``"eager"``; always ``"eager"`` while :func:`torch.compile` traces (the
        compiler then generates its own kernels from the torch code, without a graph break).

    Raises:
        ValueError: under ``backend("triton")`` when triton is not importable, ``tensor`` is
            not on CUDA and Triton's interpreter is off, or it has too many elements for int32 offsets.

    Shape:
        tensor: any.
    """
    if torch.compiler.is_compiling():
        return "eager"  # traced by torch.compile, which generates its own kernels
    choice = _CHOICE.get()
    if choice == "eager":
        return "eager"
    small = tensor.numel() <= _MAX_ELEMENTS
    if choice == "auto":
        return "triton" if tensor.is_cuda and small and triton_available() else "eager"
    if not small:
        raise ValueError(f"backend('triton'): expected at most {_MAX_ELEMENTS} elements (the kernels index with int32), got {tensor.numel()}")
    if not triton_available():
        raise ValueError("backend('triton'): expected an importable triton (pip install 'plasticine[triton]'), got an import failure")
    if not tensor.is_cuda and not _interpreted():
        raise ValueError(f"backend('triton'): expected a CUDA tensor (or TRITON_INTERPRET=1), got one on {tensor.device}")
    return "triton"


def _use(tensor: torch.Tensor) -> bool:
    return selected(tensor) == "triton"


# ----------------------------------------------------------------------------------------------
# The kernels (defined on first use, so that importing this module never imports triton)


@functools.lru_cache(maxsize=1)
def _lib():
    """The kernels (:mod:`plasticine.core._triton_kernels`, which imports triton) and triton itself."""
    from . import _triton_kernels as lib

    return lib


def _compute_type(dtype: torch.dtype):
    tl = _lib().tl
    return tl.float64 if dtype == torch.float64 else tl.float32


def _spatial(shape: Sequence[int]) -> tuple[int, int, int]:
    return (1, *shape) if len(shape) == 2 else tuple(shape)


# ----------------------------------------------------------------------------------------------
# Warp and the fused squaring step


def _check_options(mode: str, padding: str) -> None:
    if mode not in ("linear", "nearest"):
        raise ValueError(f"mode: expected 'linear' or 'nearest' for the kernel, got {mode!r}")
    if padding not in _PADDINGS:
        raise ValueError(f"padding: expected one of {_PADDINGS} for the kernel, got {padding!r}")


def _launch_fwd(image: torch.Tensor, disp: torch.Tensor, linear: bool, zeros: bool, add: bool) -> torch.Tensor:
    lib = _lib()
    n = disp.shape[1]
    b, c = image.shape[:2]
    d, h, w = _spatial(image.shape[2:])
    out = torch.empty_like(image)
    total = b * d * h * w
    grid = (lib.triton.cdiv(total, _BLOCK),)
    vox = d * h * w
    lib.warp_fwd[grid](
        image, disp, out, c, d, h, w, total, c * vox, 0 if disp.shape[0] == 1 else n * vox,
        NDIM=n, LINEAR=linear, ZEROS=zeros, ADD=add, CT=_compute_type(image.dtype), BLOCK=_BLOCK,
    )
    return out


def _launch_bwd(image, disp, grad, linear: bool, zeros: bool, need_img: bool, need_disp: bool):
    lib = _lib()
    n = disp.shape[1]
    b, c = image.shape[:2]
    d, h, w = _spatial(image.shape[2:])
    total = b * d * h * w
    vox = d * h * w
    acc = torch.float64 if image.dtype == torch.float64 else torch.float32
    gimg = torch.zeros(image.shape, dtype=acc, device=image.device) if need_img else image
    gdisp = torch.empty((b, n) + tuple(image.shape[2:]), dtype=acc, device=image.device) if need_disp else disp
    grid = (lib.triton.cdiv(total, _BLOCK),)
    lib.warp_bwd[grid](
        image, disp, grad, gimg, gdisp, c, d, h, w, total, c * vox, 0 if disp.shape[0] == 1 else n * vox,
        NDIM=n, LINEAR=linear, ZEROS=zeros, NEED_IMG=need_img, NEED_DISP=need_disp and linear,
        CT=_compute_type(image.dtype), BLOCK=_BLOCK,
    )
    if need_disp and not linear:
        gdisp.zero_()
    return (gimg if need_img else None), (gdisp if need_disp else None)


class _Warp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image, disp, mode, padding):  # type: ignore[override]
        image, disp = image.contiguous(), disp.contiguous()
        ctx.options = (mode == "linear", padding == "zeros")
        ctx.save_for_backward(image, disp)
        return _launch_fwd(image, disp, *ctx.options, add=False)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        if torch.is_grad_enabled():
            raise RuntimeError("the Triton warp kernel is differentiable once: run a second derivative with backend('eager')")
        image, disp = ctx.saved_tensors
        need_img, need_disp = ctx.needs_input_grad[:2]
        gimg, gdisp = _launch_bwd(image, disp, grad.contiguous(), *ctx.options, need_img, need_disp)
        if gimg is not None:
            gimg = gimg.to(image.dtype)
        if gdisp is not None:
            if disp.shape[0] != gdisp.shape[0]:
                gdisp = gdisp.sum(0, keepdim=True)
            gdisp = gdisp.to(disp.dtype)
        return gimg, gdisp, None, None


def warp_kernel(image: torch.Tensor, displacement: torch.Tensor, mode: str = "linear", padding: str = "border") -> torch.Tensor:
    r"""The Triton pull-back warp :math:`\mathrm{out}(p) = I(p + u(p))`, identity added in the kernel.

    :func:`~plasticine.core.warp` calls it for CUDA tensors (see :func:`backend`); it takes the
    same arguments, checked there. Positions are computed in float32 (float64 for float64
    inputs) from the voxel index and ``u``; linear weights follow ``grid_sample``
    (``align_corners=True``), nearest rounds half to even, border padding clips the position (its
    gradient is 0 where clipped), zeros padding reads 0 outside. Non-finite ``u(p)`` gives NaN.
    Backward: :math:`\partial I` by atomic adds of ``g * weight`` at the stencil's voxels,
    :math:`\partial u_i(p) = \sum_c g_c(p) \sum_k I_c(k)\, \partial w_k / \partial p_i` (0 for nearest).

    Args:
        image: the image, float16, bfloat16, float32 or float64.
        displacement: ``u`` in voxels, the image's dtype; batch size the image's or 1.
        mode: ``"linear"`` or ``"nearest"``.
        padding: ``"border"`` or ``"zeros"``.

    Returns:
        The warped image, in the image's dtype.

    Shape:
        image: ``(B, C, *S)``; displacement: ``(B or 1, N, *S)`` with ``N = len(S)`` in (2, 3); out: ``(B, C, *S)``.
    """
    _check_options(mode, padding)
    return _Warp.apply(image, displacement, mode, padding)


class _SquaringStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, zeros):  # type: ignore[override]
        u = u.contiguous()
        ctx.zeros = zeros
        ctx.save_for_backward(u)
        return _launch_fwd(u, u, True, zeros, add=True)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        if torch.is_grad_enabled():
            raise RuntimeError("the Triton squaring kernel is differentiable once: use memory='autograd' for a second derivative")
        (u,) = ctx.saved_tensors
        gimg, gdisp = _launch_bwd(u, u, grad.contiguous(), True, ctx.zeros, True, True)
        return (gimg.add_(gdisp).add_(grad)).to(u.dtype), None


def squaring_step(u: torch.Tensor, padding: str = "border") -> torch.Tensor:
    r"""One fused step of scaling and squaring: :math:`u + u \circ (\mathrm{Id} + u)` (linear), in one kernel.

    The displacement of :math:`\phi \circ \phi` for :math:`\phi = \mathrm{Id} + u`. Backward:
    :math:`g + \partial_{\text{image}} + \partial_{\text{position}}` of the warp, from ``u`` alone
    (the step keeps only its input).

    Args:
        u: displacement in voxels.
        padding: ``"border"`` or ``"zeros"``.

    Returns:
        The displacement of the squared map.

    Shape:
        u: ``(B, N, *S)``; out: ``(B, N, *S)``.
    """
    _check_options("linear", padding)
    return _SquaringStep.apply(u, padding == "zeros")


def scaling_and_squaring_kernel(velocity: torch.Tensor, steps: int, padding: str = "border") -> torch.Tensor:
    r""":math:`u_0 = v / 2^T`, then ``T`` fused :func:`squaring_step` calls; the Triton path of :func:`~plasticine.registration.scaling_and_squaring`.

    Forward+backward keeps the ``T`` per-step fields and nothing else (no grids, no images).

    Args:
        velocity: stationary velocity in voxels.
        steps: number of squarings ``T >= 0``.
        padding: ``"border"`` or ``"zeros"``.

    Returns:
        The displacement of :math:`\exp(v)`.

    Shape:
        velocity: ``(B, N, *S)``; out: ``(B, N, *S)``.
    """
    u = velocity * (0.5**steps)
    for _ in range(steps):
        u = squaring_step(u, padding)
    return u


# ----------------------------------------------------------------------------------------------
# The MI joint histogram


class _Histogram(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tm, tf, w, kernel, bins, taps, sigma, radius):  # type: ignore[override]
        lib = _lib()
        tm, tf = tm.contiguous(), tf.contiguous()
        w = None if w is None else w.contiguous()
        rows, n = tm.shape
        blocks = lib.triton.cdiv(n, _BLOCK)
        copies = min(blocks, _HISTOGRAM_COPIES)
        hist = torch.zeros(rows, copies, bins, bins, dtype=tm.dtype, device=tm.device)
        ctx.options = (kernel == "bspline", taps, bins, float(sigma), float(radius))
        lib.hist_fwd[(blocks, rows)](
            tm, tf, tm if w is None else w, hist, n, bins, float(sigma), float(radius), copies,
            HAS_W=w is not None, BSPLINE=kernel == "bspline", TAPS=taps, BLOCK=_BLOCK,
        )
        ctx.save_for_backward(tm, tf, w)
        return hist.sum(1)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        if torch.is_grad_enabled():
            raise RuntimeError("the Triton histogram kernel is differentiable once")
        lib = _lib()
        tm, tf, w = ctx.saved_tensors
        bspline, taps, bins, sigma, radius = ctx.options
        need_m, need_f, need_w = ctx.needs_input_grad[:3]
        need_w = need_w and w is not None
        rows, n = tm.shape
        gm = torch.empty_like(tm) if need_m else None
        gf = torch.empty_like(tf) if need_f else None
        gw = torch.empty_like(w) if need_w else None
        grid = (lib.triton.cdiv(n, _BLOCK), rows)
        lib.hist_bwd[grid](
            tm, tf, tm if w is None else w, grad.contiguous(), tm if gm is None else gm, tm if gf is None else gf,
            tm if gw is None else gw, n, bins, sigma, radius,
            HAS_W=w is not None, BSPLINE=bspline, TAPS=taps, NEED_M=need_m, NEED_F=need_f, NEED_W=need_w, BLOCK=_BLOCK,
        )
        return gm, gf, gw, None, None, None, None, None


def joint_histogram_kernel(
    tm: torch.Tensor, tf: torch.Tensor, w: torch.Tensor | None, kernel: str, bins: int, taps: int, sigma: float, radius: float
) -> torch.Tensor:
    r"""Parzen joint histogram of bin positions by atomic adds; the Triton path of :func:`~plasticine.losses.joint_histogram`.

    :math:`h(a, b) = \sum_v w_v K_a(t^m_v) K_b(t^f_v)` over the ``taps`` bins each sample touches:
    for ``"bspline"`` the bins :math:`i - 1, \dots, i + 2` with :math:`i = \mathrm{clip}(\lfloor t \rfloor, 1, \mathrm{bins} - 3)`
    and six times the cubic B-spline weights of :math:`f = t - i` (the eager estimator's scale,
    36 for the joint histogram); for ``"gaussian"`` the bins from :math:`\lceil t - r \rceil`,
    weight :math:`\exp(-(t - k)^2 / 2\sigma^2)` within the radius ``r``, bins outside the
    histogram dropped. The blocks of samples add into up to 32 copies of the histogram in turn
    (fewer collisions of the atomic adds), summed at the end. Backward per sample: :math:`\partial t^m_v = w_v \sum_{ab} g_{ab} K'_a K_b`,
    :math:`\partial t^f_v = w_v \sum_{ab} g_{ab} K_a K'_b`, :math:`\partial w_v = \sum_{ab} g_{ab} K_a K_b`.

    Args:
        tm, tf: bin positions of the moving and the fixed image (float32 or float64).
        w: sample weights or None.
        kernel: ``"bspline"`` or ``"gaussian"``.
        bins: bins per axis.
        taps: bins touched per sample and axis (4 for the B-spline).
        sigma, radius: the Gaussian's width and cut-off in bins (unused by the B-spline).

    Returns:
        The unnormalised joint histogram.

    Shape:
        tm, tf, w: ``(M, n)``; out: ``(M, bins, bins)``.
    """
    if kernel not in ("bspline", "gaussian"):
        raise ValueError(f"kernel: expected 'bspline' or 'gaussian', got {kernel!r}")
    return _Histogram.apply(tm, tf, w, kernel, int(bins), int(taps), sigma, radius)


# ----------------------------------------------------------------------------------------------
# Box sums


def box_sum_kernel(x: torch.Tensor, windows: Sequence[int], out: torch.Tensor | None = None) -> torch.Tensor:
    r"""Zero-padded centred box sums over the last ``len(windows)`` axes, one Triton pass per axis.

    :math:`(\mathrm{box}\,x)(p) = \sum_{|q_i - p_i| \le r_i} x(q)` with :math:`r_i = (\mathrm{window}_i - 1) / 2`,
    accumulated in float32 (float64 for float64 input); the path of the box sums inside
    :func:`~plasticine.losses.local_ncc` and :func:`~plasticine.losses.box_sum`. Not
    differentiable by itself (the box is self-adjoint; its callers apply it to the gradient).

    Args:
        x: the tensor to sum.
        windows: odd window widths, one per summed axis.
        out: where to write the result (same shape as ``x``), or None.

    Returns:
        The box sums, same shape and dtype as ``x``.

    Shape:
        x: ``(..., *S)`` with ``len(S) = len(windows)``; out: same.
    """
    lib = _lib()
    x = x.contiguous()
    n = len(windows)
    axes = [i for i, w in enumerate(windows) if w > 1]
    result = torch.empty_like(x) if out is None else out
    if not axes:
        return result.copy_(x)
    total = x.numel()
    grid = (lib.triton.cdiv(total, _BLOCK),)
    ct = _compute_type(x.dtype)
    src = x
    for k, i in enumerate(axes):
        dim = x.dim() - n + i
        dst = result if k == len(axes) - 1 and result.is_contiguous() else torch.empty_like(x)
        lib.box_axis[grid](src, dst, x.shape[dim], x.stride(dim), total, windows[i] // 2, CT=ct, BLOCK=_BLOCK)
        src = dst
    if src is not result:
        result.copy_(src)
    return result
