r"""Normalised cross-correlation: global and local (windowed).

Both losses are :math:`-\mathrm{NCC}`, so lower is better, with values in :math:`[-1, 1]`:
-1 when the fixed image is an increasing affine function :math:`a x + b` (``a > 0``) of the moving
one, +1 for a decreasing one. Flat regions (zero variance in either image) have NCC 0, by
definition, instead of 0 / 0, and the variances are computed so that rounding cannot make them
negative (no NaN or inf for finite inputs, also in float16, which is promoted to float32). A NaN
or an infinity anywhere in an input (also where the mask weight is 0) gives a NaN loss, as the
conventions require (:doc:`/conventions`).

References:
    B. B. Avants, C. L. Epstein, M. Grossman, J. C. Gee, "Symmetric diffeomorphic image registration
    with cross-correlation", Medical Image Analysis 12(1), 2008 (local cross-correlation).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from ..core import check_shape
from ..core.config import Configurable
from ..core.kernels import box_sum_kernel, selected
from ._common import check_pair, no_autocast, promote

__all__ = ["ncc", "local_ncc", "box_sum", "NCC", "LocalNCC"]


def _flat_tolerance(dtype: torch.dtype) -> float:
    # Window variances come from sums of squares minus squared sums, which cancel: a variance
    # below this fraction of the window's sum of squares is rounding noise, so the window is flat.
    return 64.0 * torch.finfo(dtype).eps


def _masked_centre(x: torch.Tensor, w: torch.Tensor | None, count: torch.Tensor) -> torch.Tensor:
    """Subtract the (weighted) mean over the last axis, twice, so that a constant becomes exactly 0."""
    for _ in range(2):
        s = x.sum(-1, keepdim=True) if w is None else (x * w).sum(-1, keepdim=True)
        x = x - s / count
    return x


def ncc(moving: torch.Tensor, fixed: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    r"""Minus the global normalised cross-correlation, averaged over batch and channels.

    For every batch element and channel, with voxel weights :math:`w` (the mask, 1 without one),
    weighted means :math:`\bar x, \bar y` and :math:`x' = x - \bar x`, :math:`y' = y - \bar y`:

    .. math::
        \mathrm{NCC} = \frac{\sum w x' y'}{\sqrt{\sum w x'^2 \, \sum w y'^2}} \in [-1, 1],

    and NCC = 0 if either image is flat (its standard deviation at rounding level: below
    :math:`8 \epsilon` times its root mean square, :math:`\epsilon` the machine epsilon). The means
    are subtracted twice, so a constant image is exactly flat. The loss is :math:`-\mathrm{NCC}`,
    in ``[-1, 1]``; it is -1 exactly when ``fixed = a * moving + b`` with ``a > 0`` inside the mask.
    A non-finite value in ``moving``, ``fixed`` or ``mask`` gives NaN.

    Args:
        moving: the image being deformed.
        fixed: the reference image.
        mask: voxel weights ``>= 0`` (e.g. a binary region); voxels with weight 0 do not count.

    Returns:
        A scalar in ``[-1, 1]``.

    Shape:
        moving, fixed: ``(B, C, *S)``; mask: ``(B, 1, *S)`` or None; out: ``()``.

    Example:
        >>> x = torch.rand(2, 1, 16, 16)
        >>> round(ncc(x, 3 * x + 1).item(), 5)
        -1.0
    """
    dims = check_pair(moving, fixed, mask)
    with no_autocast(moving.device):
        x = promote(moving)
        y = promote(fixed).to(x.dtype)
        b, c = dims["B"], dims["C"]
        x, y = x.reshape(b, c, -1), y.reshape(b, c, -1)
        if mask is None:
            w = None
            count = torch.full((1, 1, 1), float(x.shape[-1]), dtype=x.dtype, device=x.device)
        else:
            w = mask.reshape(b, 1, -1).to(x.dtype)
            count = w.sum(-1, keepdim=True).clamp(min=torch.finfo(x.dtype).tiny)
        xc, yc = _masked_centre(x, w, count), _masked_centre(y, w, count)
        wx = xc if w is None else xc * w
        wy = yc if w is None else yc * w
        vx, vy, cov = (wx * xc).sum(-1), (wy * yc).sum(-1), (wx * yc).sum(-1)
        # Centred twice, the variances are accurate to rounding: flat means std < 8 eps * rms.
        tol = 64.0 * torch.finfo(x.dtype).eps ** 2
        sx = (x * x if w is None else x * x * w).sum(-1)
        sy = (y * y if w is None else y * y * w).sum(-1)
        ok = (vx > tol * sx) & (vy > tol * sy)
        denom = torch.where(ok, vx * vy, torch.ones_like(vx))
        # flat: 0 * (vx + vy), which is 0, or NaN when an input (or the mask) is not finite
        value = torch.where(ok, cov * torch.rsqrt(denom), 0.0 * (vx + vy))
        return -value.clamp(-1.0, 1.0).mean()


def _box_axis(x: torch.Tensor, dim: int, window: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Zero-padded centred sum over ``window`` (odd) neighbours along ``dim``, by doubling sums.

    Written into ``out`` when given (same shape as ``x``).
    """
    size = x.shape[dim]
    r = window // 2
    pad = [0, 0] * (x.dim() - dim - 1) + [r, r]
    s = torch.nn.functional.pad(x, pad)  # s[i] = x[i - r]
    first = True
    offset, width, left = 0, 1, window
    # s holds sums of `width` consecutive padded values; the window is split into binary blocks.
    while left:
        if left & 1:
            piece = s.narrow(dim, offset, size)
            if first:
                out = piece.clone() if out is None else out.copy_(piece)
                first = False
            else:
                out.add_(piece)
            offset += width
        left >>= 1
        if left:
            n = s.shape[dim] - width
            s = s.narrow(dim, 0, n) + s.narrow(dim, width, n)
            width *= 2
    assert out is not None
    return out


class _BoxSum(torch.autograd.Function):
    """Separable box sum; it is self-adjoint (zero padding, odd centred window)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, windows: tuple[int, ...]) -> torch.Tensor:  # type: ignore[override]
        ctx.windows = windows
        return _box(x, windows)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return _BoxSum.apply(grad, ctx.windows), None


def _box(x: torch.Tensor, windows: tuple[int, ...], out: torch.Tensor | None = None) -> torch.Tensor:
    """Separable box sum over the last ``len(windows)`` axes (into ``out`` when given)."""
    if selected(x) == "triton":
        return box_sum_kernel(x, windows, out)
    n = len(windows)
    axes = [i for i, w in enumerate(windows) if w > 1]
    if not axes:
        return x.clone() if out is None else out.copy_(x)
    for i in axes:
        x = _box_axis(x, x.dim() - n + i, windows[i], out if i == axes[-1] else None)
    return x


def _box_each(parts: list, windows: tuple[int, ...]) -> torch.Tensor:
    """Box sums of several same-shape tensors, one at a time (small temporaries), stacked first.

    ``parts`` holds tensors or zero-argument callables that make them (so each product exists
    only while it is being summed).
    """
    first = parts[0]() if callable(parts[0]) else parts[0]
    out = first.new_empty((len(parts),) + first.shape)
    for k, part in enumerate(parts):
        _box(first if k == 0 else (part() if callable(part) else part), windows, out[k])
    return out


def _windows(window: int | Sequence[int], n: int) -> tuple[int, ...]:
    if isinstance(window, int):
        window = (window,) * n
    window = tuple(window)
    if len(window) != n or any((not isinstance(w, int)) or w < 1 or w % 2 == 0 for w in window):
        raise ValueError(f"window: expected one odd positive integer or {n} of them, got {window!r}")
    return window


def box_sum(x: torch.Tensor, window: int | Sequence[int]) -> torch.Tensor:
    r"""Sum over the centred box of ``window`` voxels around every voxel (zero padding).

    :math:`(\mathrm{box}\,x)(p) = \sum_{\lVert q - p \rVert_\infty \le r} x(q)` with
    :math:`r = (\mathrm{window} - 1) / 2` per axis and :math:`x = 0` outside the image, computed
    separably with :math:`O(\log \mathrm{window})` passes per axis. The operator is self-adjoint, so
    its backward pass is itself. The same code serves 1, 2 and 3 spatial dimensions. With the
    ``triton`` extra, CUDA tensors take one kernel pass per axis (:mod:`plasticine.core.kernels`),
    here and inside :func:`local_ncc`.

    Args:
        x: the tensor to sum.
        window: odd window width, one for all axes or one per spatial axis.

    Returns:
        The box sums, same shape as ``x``.

    Shape:
        x: ``(B, C, *S)`` with 1 to 3 spatial axes; out: ``(B, C, *S)``.
    """
    dims = check_shape(x, "B C *S", "x", spatial=(1, 2, 3), floating=True)
    return _BoxSum.apply(x, _windows(window, len(dims["S"])))


class _LocalNCCMap(torch.autograd.Function):
    """Local NCC at every voxel of normalised images, with a hand-written backward pass.

    With ``A_s = dL/dS_s`` for every window sum ``S_s`` (computed at the window centres), the
    gradient at a voxel is a box sum of the ``A_s`` (the box is self-adjoint), e.g.
    ``dL/dx = w (box(A_x) + 2 x box(A_xx) + y box(A_xy))``; only the sums that an input needs are
    boxed.
    """

    @staticmethod
    def forward(ctx, xn, yn, w, windows, counts):  # type: ignore[override]
        xw = xn if w is None else xn * w
        yw = yn if w is None else yn * w
        sx, sy, sxx, syy, sxy = _box_each(
            [xw, yw, lambda: xw * xn, lambda: yw * yn, lambda: xw * yn], windows
        ).unbind(0)
        n = counts if w is None else _box(w, windows)
        n_safe = n.clamp(min=1e-3)  # windows without any (or with tiny) weight are flat below
        mx, my = sx / n_safe, sy / n_safe
        vx = (sxx - sx * mx).clamp_(min=0.0)
        vy = (syy - sy * my).clamp_(min=0.0)
        cross = sxy - sx * my
        tol = _flat_tolerance(xn.dtype)
        ok = (vx > tol * sxx) & (vy > tol * syy) & (n > 1e-3)
        r = torch.where(ok, torch.rsqrt(torch.where(ok, vx * vy, torch.ones_like(vx))), torch.zeros_like(vx))
        c = cross * r
        if any(ctx.needs_input_grad[:3]):
            inv_vx = torch.where(ok, 1.0 / torch.where(ok, vx, torch.ones_like(vx)), torch.zeros_like(vx))
            inv_vy = torch.where(ok, 1.0 / torch.where(ok, vy, torch.ones_like(vy)), torch.zeros_like(vy))
            ctx.save_for_backward(xn, yn, w, mx, my, r, c, inv_vx, inv_vy)
        ctx.windows = windows
        return c.clamp(-1.0, 1.0)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        xn, yn, w, mx, my, r, c, inv_vx, inv_vy = ctx.saved_tensors
        need_x, need_y, need_w = ctx.needs_input_grad[:3]
        g = grad * ((c >= -1.0) & (c <= 1.0))  # the clamp passes the gradient inside [-1, 1]
        gr = g * r
        gcx = g * c * inv_vx
        gcy = g * c * inv_vy
        coef = {  # made one at a time, while being boxed
            "xy": lambda: gr,
            "xx": lambda: -0.5 * gcx,
            "yy": lambda: -0.5 * gcy,
            "x": lambda: gcx * mx - gr * my,
            "y": lambda: gcy * my - gr * mx,
            "n": lambda: gr * mx * my - 0.5 * (gcx * mx * mx + gcy * my * my),
        }
        names = []
        if need_x:
            names += ["x", "xx", "xy"]
        if need_y:
            names += [k for k in ("y", "yy", "xy") if k not in names]
        if need_w:
            names += [k for k in ("x", "xx", "xy", "y", "yy") if k not in names] + ["n"]
        boxed = dict(zip(names, _box_each([coef[k] for k in names], ctx.windows).unbind(0)))
        gx = gy = gw = None
        if need_x:
            gx = boxed["x"] + 2.0 * xn * boxed["xx"] + yn * boxed["xy"]
            if w is not None:
                gx = gx * w
        if need_y:
            gy = boxed["y"] + 2.0 * yn * boxed["yy"] + xn * boxed["xy"]
            if w is not None:
                gy = gy * w
        if need_w:
            gw = (
                boxed["n"]
                + xn * (boxed["x"] + xn * boxed["xx"] + yn * boxed["xy"])
                + yn * (boxed["y"] + yn * boxed["yy"])
            ).sum(1, keepdim=True)
        return gx, gy, gw, None, None


def local_ncc(
    moving: torch.Tensor,
    fixed: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    window: int | Sequence[int] = 9,
) -> torch.Tensor:
    r"""Minus the mean local (windowed) normalised cross-correlation.

    With box sums over the window :math:`W(p)` of ``window`` voxels per axis around :math:`p`
    (voxels outside the image or with mask weight 0 do not count, so border windows are smaller),
    :math:`n = \sum_W w`, :math:`S_x = \sum_W w x`, :math:`S_{xx} = \sum_W w x^2`,
    :math:`S_{xy} = \sum_W w x y` and so on:

    .. math::
        \mathrm{NCC}(p) = \frac{S_{xy} - S_x S_y / n}
        {\sqrt{(S_{xx} - S_x^2 / n)(S_{yy} - S_y^2 / n)}} \in [-1, 1]

    (the signed correlation, not its square). The loss is

    .. math::
        -\frac{\sum_p w(p)\, \mathrm{NCC}(p)}{\sum_p w(p)} \in [-1, 1],

    averaged over batch and channels; -1 exactly when ``fixed = a * moving + b`` with ``a > 0``
    in every window. For numerical stability each image is first shifted and scaled by its global
    (masked) mean and standard deviation, which NCC does not see; the window variances are clamped
    at 0, and a window where either variance is below :math:`64 \epsilon` times its sum of squares
    (a flat window, including windows of a single voxel) has NCC 0. For finite inputs there is no
    inf or NaN; a non-finite value in ``moving``, ``fixed`` or ``mask`` gives NaN.

    Args:
        moving: the image being deformed.
        fixed: the reference image.
        mask: voxel weights ``>= 0`` (e.g. a binary region). Only masked voxels enter the window
            sums, and the mean runs over masked window centres.
        window: odd window width in voxels, one for all axes or one per spatial axis. It stays
            in voxels on anisotropic grids (NCC has no physical unit, and the iterative backend
            evaluates it at several resolutions); for about ``w`` mm with voxel sizes ``h`` give
            ``tuple(2 * round(w / (2 * hi)) + 1 for hi in h)`` (see :doc:`/conventions`).

    Returns:
        A scalar in ``[-1, 1]``.

    Raises:
        ValueError: on mismatched shapes or an even or non-positive window.

    Shape:
        moving, fixed: ``(B, C, *S)`` with 1, 2 or 3 spatial axes; mask: ``(B, 1, *S)`` or None;
        out: ``()``.

    Example:
        >>> x = torch.rand(1, 1, 12, 12, 12)
        >>> round(local_ncc(x, 2 * x - 1, window=5).item(), 5)
        -1.0
    """
    dims = check_pair(moving, fixed, mask)
    n_sp = len(dims["S"])
    windows = _windows(window, n_sp)
    with no_autocast(moving.device):
        x = promote(moving)
        y = promote(fixed).to(x.dtype)
        b, c = dims["B"], dims["C"]
        w = None if mask is None else mask.to(x.dtype)
        # Global normalisation (constant per image, so NCC is unchanged; detached, so exact).
        with torch.no_grad():
            flat_w = None if w is None else w.reshape(b, 1, -1)
            count = (
                torch.full((1, 1, 1), float(x[0, 0].numel()), dtype=x.dtype, device=x.device)
                if w is None
                else flat_w.sum(-1, keepdim=True).clamp(min=torch.finfo(x.dtype).tiny)
            )
            stats = []
            for img in (x, y):
                flat = img.reshape(b, c, -1)
                mean = (flat if flat_w is None else flat * flat_w).sum(-1, keepdim=True) / count
                dev = flat - mean
                var = ((dev * dev) if flat_w is None else dev * dev * flat_w).sum(-1, keepdim=True) / count
                std = var.sqrt()
                std = torch.where(std > 0, std, torch.ones_like(std))
                shape = (b, c) + (1,) * n_sp
                stats.append((mean.view(shape), std.view(shape)))
        xn = (x - stats[0][0]) / stats[0][1]
        yn = (y - stats[1][0]) / stats[1][1]
        if w is None:
            n = torch.ones((), dtype=x.dtype, device=x.device)
            for i, win in enumerate(windows):
                ones = torch.ones((1, 1, dims["S"][i]), dtype=x.dtype, device=x.device)
                counts = _box_axis(ones, 2, win).view([dims["S"][i] if j == i else 1 for j in range(n_sp)])
                n = n * counts
        else:
            n = None
        value = _LocalNCCMap.apply(xn, yn, w, windows, n)
        if w is None:
            per_image = value.flatten(2).mean(-1)
        else:
            wf = w.flatten(2)
            per_image = (value.flatten(2) * wf).sum(-1) / wf.sum(-1).clamp(min=torch.finfo(x.dtype).tiny)
        return -per_image.mean()


class NCC(Configurable, nn.Module):
    r"""Minus the global normalised cross-correlation; see :func:`ncc`. Values in ``[-1, 1]``.

    Shape:
        moving, fixed: ``(B, C, *S)``; mask: ``(B, 1, *S)`` or None; out: ``()``.

    Example:
        >>> x = torch.rand(1, 1, 8, 8)
        >>> round(NCC()(x, x).item(), 5)
        -1.0
    """

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Minus the NCC of ``moving`` and ``fixed``."""
        return ncc(moving, fixed, mask)


class LocalNCC(Configurable, nn.Module):
    r"""Minus the mean local normalised cross-correlation; see :func:`local_ncc`. Values in ``[-1, 1]``.

    Args:
        window: odd window width in voxels (also on anisotropic grids, see :func:`local_ncc`), one for all axes or one per spatial axis.

    Shape:
        moving, fixed: ``(B, C, *S)`` with 1 to 3 spatial axes; mask: ``(B, 1, *S)`` or None;
        out: ``()``.

    Example:
        >>> x = torch.rand(1, 1, 16, 16)
        >>> round(LocalNCC(window=5)(x, x).item(), 5)
        -1.0
    """

    def __init__(self, window: int | Sequence[int] = 9) -> None:
        super().__init__()
        if isinstance(window, int):
            _windows(window, 1)
        else:
            window = tuple(window)
            _windows(window, len(window))
        self.window = window

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Minus the mean local NCC of ``moving`` and ``fixed``."""
        return local_ncc(moving, fixed, mask, window=self.window)

    def extra_repr(self) -> str:
        return f"window={self.window}"
