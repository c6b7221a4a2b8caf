r"""Mutual information of two images from a sparse Parzen-window joint histogram.

The joint histogram is the Parzen-window estimate of Mattes et al. and Thevenaz & Unser: every
sample (a voxel of the moving and of the fixed image) adds the outer product of two kernel
vectors to the histogram, and the kernel is compact, so a sample touches only ``K`` bins per axis
(``K = 4`` for the cubic B-spline, ``K * K = 16`` joint bins). The estimator never forms the
dense ``samples x bins`` weight matrix:

* Every sample falls in a *cell*, the pair of first bins its two kernels touch. For the cubic
  B-spline the four weights are cubic polynomials of the sample's fractional bin position ``f``,
  so one ``index_add_`` accumulates, per cell, the 16 moments :math:`\sum w f_m^p f_f^q`
  (``p, q < 4``); a ``4 x 4`` change of basis per cell turns them into the 16 joint-bin
  contributions. For the Gaussian the ``K * K`` weight products are accumulated directly.
* A hand-written backward pass gathers, per sample, the histogram gradient of its cell and
  evaluates the derivative of the kernel products (for the B-spline a bivariate polynomial, by
  Horner's rule), giving the gradient with respect to the bin positions of both images (it flows
  through the kernel weights) and to the mask weights.

With the ``triton`` extra, CUDA tensors take the kernel of :mod:`plasticine.core.kernels`
instead: one atomic add per sample and joint bin, and the same backward per sample.

Work and memory are linear in the number of samples (processed in chunks of bounded size) and
do not grow with the number of bins beyond the ``bins x bins`` histogram.

References:
    D. Mattes, D. R. Haynor, H. Vesselle, T. K. Lewellen, W. Eubank, "PET-CT image registration in
    the chest using free-form deformations", IEEE TMI 22(1), 2003.

    P. Thevenaz, M. Unser, "Optimization of mutual information for multiresolution image
    registration", IEEE TIP 9(12), 2000.

    C. Studholme, D. L. G. Hill, D. J. Hawkes, "An overlap invariant entropy measure of 3D medical
    image alignment", Pattern Recognition 32(1), 1999 (normalised mutual information).
"""

from __future__ import annotations

import math
import numbers
from typing import Literal, NamedTuple

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from ..core.config import Configurable
from ..core.kernels import joint_histogram_kernel, selected
from ._common import check_pair, no_autocast, promote

__all__ = ["joint_histogram", "mutual_information", "MutualInformation"]

Kernel = Literal["bspline", "gaussian"]

# Gaussian kernels are cut off where they fall below exp(-TRUNCATE**2 / 2) = 3.4e-4 of their peak.
GAUSSIAN_TRUNCATE = 4.0

# Cubic B-spline weights of the four bins i-1, i, i+1, i+2 touched by a sample at i + f, f in [0, 1],
# as polynomials in f, times 6: 6 * weights = [1, f, f^2, f^3] @ _BSPLINE6 (rows: powers, columns:
# the 4 bins). The factor 6 keeps the coefficients integers; the histogram is normalised anyway.
_BSPLINE6 = [
    [1.0, 4.0, 1.0, 0.0],
    [-3.0, 0.0, 3.0, 0.0],
    [3.0, -6.0, 3.0, 0.0],
    [-1.0, 3.0, -3.0, 1.0],
]


class _Spec(NamedTuple):
    """How a kernel maps a bin position ``t`` to its ``taps`` bins and weights."""

    kernel: str
    bins: int
    taps: int  # K: bins touched per sample and axis
    pad: int  # P: histogram padding on both sides so that every tap lands in the padded histogram
    cells: int  # C: possible first taps per axis, C + K - 1 = bins + 2 P
    sigma: float
    radius: float
    low: float  # bin position of the lowest intensity
    high: float  # bin position of the highest intensity


def _spec(bins: int, kernel: str, sigma: float) -> _Spec:
    if isinstance(bins, numbers.Integral) and not isinstance(bins, bool):
        bins = int(bins)
    if kernel == "bspline":
        if not isinstance(bins, int) or bins < 4:
            raise ValueError(f"bins: the cubic B-spline kernel spans 4 bins, so at least 4 bins are needed, got {bins!r}")
        return _Spec("bspline", bins, 4, 0, bins - 3, 0.0, 2.0, 1.0, bins - 2.0)
    if kernel == "gaussian":
        if not isinstance(bins, int) or bins < 2:
            raise ValueError(f"bins: the Gaussian kernel needs at least 2 bins, got {bins!r}")
        if not (isinstance(sigma, (int, float)) and sigma > 0 and math.isfinite(sigma)):
            raise ValueError(f"sigma: expected a positive kernel width in bins, got {sigma!r}")
        radius = GAUSSIAN_TRUNCATE * float(sigma)
        taps = int(math.floor(2 * radius)) + 1
        return _Spec("gaussian", bins, taps, taps, bins + taps + 1, float(sigma), radius, 0.0, bins - 1.0)
    raise ValueError(f"kernel: expected 'bspline' or 'gaussian', got {kernel!r}")


def _fraction(t: torch.Tensor, spec: _Spec) -> tuple[torch.Tensor, torch.Tensor]:
    """B-spline: cell index of the first tap (as floats) and the fraction ``f`` in ``[0, 1]``.

    A sample at ``t = i + f`` touches bins ``i - 1 .. i + 2`` with ``i`` clamped to
    ``[1, bins - 3]``, so all four taps lie inside the histogram.
    """
    i = t.floor().clamp_(1.0, spec.bins - 3.0)
    f = t - i
    return i.sub_(1.0), f


def _powers(t: torch.Tensor, spec: _Spec, w: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """B-spline: cell index of the first tap (as floats) and ``w f^p`` for ``p = 0..3``.

    Shape:
        t, w: ``(n,)``; out: ``(n,)``, ``(4, n)``.
    """
    i = t.floor().clamp_(1.0, spec.bins - 3.0)
    out = t.new_empty(4, t.shape[0])
    f = torch.sub(t, i, out=out[1])
    torch.mul(f, f, out=out[2])
    torch.mul(out[2], f, out=out[3])
    if w is None:
        out[0].fill_(1.0)
    else:
        out[0].copy_(w)
        out[1:].mul_(w)
    return i.sub_(1.0), out


def _poly2(t: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``sum_p x^p sum_r t[p, r] y^r`` by Horner's rule in both variables.

    Shape:
        t: ``(P, R, n)``; x, y: ``(n,)``; out: ``(n,)``.
    """
    r = t.shape[1]
    inner = t[:, r - 1].clone()
    for j in range(r - 2, -1, -1):
        inner.mul_(y).add_(t[:, j])
    out = inner[-1].clone()
    for j in range(t.shape[0] - 2, -1, -1):
        out.mul_(x).add_(inner[j])
    return out


def _gaussian_taps(
    t: torch.Tensor, spec: _Spec, derivative: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gaussian: cell index of the first tap (as floats), tap weights and their derivatives in ``t``.

    The taps are the ``K`` bins from ``ceil(t - radius)``; those farther than the radius get weight
    0. The tap axis comes first so that every operation runs along the contiguous sample axis.

    Shape:
        t: ``(n,)``; out: ``(n,)``, ``(K, n)``, ``(K, n)`` or None.
    """
    first = torch.ceil(t - spec.radius)
    offsets = torch.arange(spec.taps, dtype=t.dtype, device=t.device).unsqueeze(1)
    d = t.unsqueeze(0) - (first.unsqueeze(0) + offsets)
    inside = d.abs() <= spec.radius
    weights = torch.exp(d * d * (-0.5 / spec.sigma**2)) * inside
    dweights = weights * d * (-1.0 / spec.sigma**2) if derivative else None
    return first.add_(float(spec.pad)), weights, dweights


def _chunk_size(device: torch.device) -> int:
    # Bounded temporaries on the CPU (they stay in cache); few, large launches on accelerators.
    return 1 << 15 if device.type == "cpu" else 1 << 20


def _cell_index(first_m: torch.Tensor, first_f: torch.Tensor, start: int, stop: int, n: int, c: int) -> torch.Tensor:
    """Flat index ``(row * C + first_m) * C + first_f`` of every sample's cell."""
    index = first_m.mul_(c).add_(first_f).long()
    if stop - start > n or start // n != (stop - 1) // n:  # the chunk spans several rows
        index += torch.div(torch.arange(start, stop, device=index.device), n, rounding_mode="floor") * (c * c)
    elif start // n:
        index += (start // n) * c * c
    return index


class _JointHistogram(torch.autograd.Function):
    """Parzen joint histogram of bin positions, up to a constant factor (36 for the B-spline).

    Differentiable in both positions and in the sample weights; double backward is not supported.

    Shape:
        tm, tf: ``(M, n)``; w: ``(M, n)`` or None; out: ``(M, bins, bins)``.
    """

    @staticmethod
    def forward(ctx, tm: torch.Tensor, tf: torch.Tensor, w: torch.Tensor | None, spec: _Spec) -> torch.Tensor:  # type: ignore[override]
        m, n = tm.shape
        k, c = spec.taps, spec.cells
        cells = torch.zeros(k * k, m * c * c, dtype=tm.dtype, device=tm.device)
        tm_flat, tf_flat = tm.reshape(-1), tf.reshape(-1)
        w_flat = None if w is None else w.reshape(-1)
        step = _chunk_size(tm.device)
        for start in range(0, m * n, step):
            stop = min(start + step, m * n)
            ww = None if w_flat is None else w_flat[start:stop]
            if spec.kernel == "bspline":
                # Moments sum_v w f_m^p f_f^q per cell; the weights are cubic polynomials in f.
                im, pm = _powers(tm_flat[start:stop], spec, ww)
                jf, pf = _powers(tf_flat[start:stop], spec, None)
            else:
                im, pm, _ = _gaussian_taps(tm_flat[start:stop], spec, False)
                jf, pf, _ = _gaussian_taps(tf_flat[start:stop], spec, False)
                if ww is not None:
                    pm.mul_(ww)
            index = _cell_index(im, jf, start, stop, n, c)
            cells.index_add_(1, index, (pm.unsqueeze(1) * pf.unsqueeze(0)).view(k * k, -1))
        if spec.kernel == "bspline":
            coef = torch.tensor(_BSPLINE6, dtype=tm.dtype, device=tm.device)
            cells = torch.einsum("pa,qb,pqx->abx", coef, coef, cells.view(k, k, -1))
        cells = cells.reshape(k, k, m, c, c)
        size = spec.bins + 2 * spec.pad
        hist = torch.zeros(m, size, size, dtype=tm.dtype, device=tm.device)
        for a in range(k):
            for b in range(k):
                hist[:, a : a + c, b : b + c] += cells[a, b]
        ctx.spec = spec
        ctx.save_for_backward(tm, tf, w)
        p = spec.pad
        return hist[:, p : p + spec.bins, p : p + spec.bins].contiguous()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        tm, tf, w = ctx.saved_tensors
        spec: _Spec = ctx.spec
        m, n = tm.shape
        k, c, p = spec.taps, spec.cells, spec.pad
        need_m, need_f, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        # gcell[a, b, cell] = grad[first_m + a, first_f + b] for the cell (first_m, first_f).
        padded = torch.nn.functional.pad(grad, (p, p, p, p))
        gcell = padded.unfold(1, k, 1).unfold(2, k, 1).permute(3, 4, 0, 1, 2).reshape(k * k, m * c * c)
        gm = torch.empty_like(tm) if need_m else None
        gf = torch.empty_like(tf) if need_f else None
        gw = torch.empty_like(w) if (need_w and w is not None) else None
        tm_flat, tf_flat = tm.reshape(-1), tf.reshape(-1)
        w_flat = None if w is None else w.reshape(-1)
        step = _chunk_size(tm.device)
        if spec.kernel == "bspline":
            # d/dw, d/dfm, d/dff of sum_ab g[a, b] W_a(fm) W_b(ff) as polynomials in (fm, ff):
            # q[p, r] = sum_ab A[p, a] A[r, b] g[a, b] is the coefficient of fm^p ff^r.
            coef = torch.tensor(_BSPLINE6, dtype=grad.dtype, device=grad.device)
            q = torch.einsum("pa,rb,abx->prx", coef, coef, gcell.view(k, k, -1))
            steps = torch.arange(1.0, 4.0, dtype=grad.dtype, device=grad.device).view(3, 1, 1)
            tables = []  # (name, coefficient table (P, R, cells)): sum_p fm^p sum_r t[p, r] ff^r
            if need_m:
                tables.append(("m", q[1:] * steps))
            if need_f:
                tables.append(("f", q[:, 1:] * steps.view(1, 3, 1)))
            if gw is not None:
                tables.append(("w", q))
            rows = [t.shape[0] * t.shape[1] for _, t in tables]
            table = torch.cat([t.reshape(-1, t.shape[-1]) for _, t in tables]) if tables else None
            for start in range(0, m * n, step):
                if table is None:
                    break
                stop = min(start + step, m * n)
                im, fm = _fraction(tm_flat[start:stop], spec)
                jf, ff = _fraction(tf_flat[start:stop], spec)
                gathered = table.index_select(1, _cell_index(im, jf, start, stop, n, c)).split(rows)
                ww = None if w_flat is None else w_flat[start:stop]
                for (name, t), values in zip(tables, gathered):
                    value = _poly2(values.view(t.shape[0], t.shape[1], -1), fm, ff)
                    if name == "w":
                        gw.view(-1)[start:stop] = value
                    else:
                        out = gm if name == "m" else gf
                        out.view(-1)[start:stop] = value if ww is None else value.mul_(ww)
            return gm, gf, gw, None
        for start in range(0, m * n, step):
            stop = min(start + step, m * n)
            im, wm, dwm = _gaussian_taps(tm_flat[start:stop], spec, need_m)
            jf, wf, dwf = _gaussian_taps(tf_flat[start:stop], spec, need_f)
            g = gcell.index_select(1, _cell_index(im, jf, start, stop, n, c)).view(k, k, -1)
            ww = None if w_flat is None else w_flat[start:stop]
            if need_m or gw is not None:
                v = (g * wf.unsqueeze(0)).sum(1)  # sum_b g[a, b] wf[b]
                if need_m:
                    val = (v * dwm).sum(0)
                    gm.view(-1)[start:stop] = val if ww is None else val.mul_(ww)
                if gw is not None:
                    gw.view(-1)[start:stop] = (v.mul_(wm)).sum(0)
            if need_f:
                u = (g * wm.unsqueeze(1)).sum(0)  # sum_a wm[a] g[a, b]
                val = (u * dwf).sum(0)
                gf.view(-1)[start:stop] = val if ww is None else val.mul_(ww)
        return gm, gf, gw, None


def _bin_positions(
    image: torch.Tensor,
    weights: torch.Tensor | None,
    value_range: tuple[float, float] | None,
    spec: _Spec,
    name: str,
) -> torch.Tensor:
    """Map intensities linearly to bin positions in ``[spec.low, spec.high]``.

    Shape:
        image: ``(B, C, n)``; weights: ``(B, 1, n)`` or None; out: ``(B, C, n)``.
    """
    if value_range is None:
        if weights is None:
            lo = image.amin(dim=2, keepdim=True)
            hi = image.amax(dim=2, keepdim=True)
        else:
            inside = weights > 0
            lo = torch.where(inside, image, torch.inf).amin(dim=2, keepdim=True)
            hi = torch.where(inside, image, -torch.inf).amax(dim=2, keepdim=True)
            empty = ~torch.isfinite(lo)
            lo = torch.where(empty, torch.zeros_like(lo), lo)
            hi = torch.where(empty, torch.zeros_like(hi), hi)
    else:
        if len(value_range) != 2 or not float(value_range[0]) < float(value_range[1]):
            raise ValueError(f"{name}: expected (low, high) with low < high, got {value_range!r}")
        lo = torch.tensor(float(value_range[0]), dtype=image.dtype, device=image.device)
        hi = torch.tensor(float(value_range[1]), dtype=image.dtype, device=image.device)
    span = hi - lo
    # A constant image (span 0) puts all its mass at the lowest bin position instead of 0 / 0.
    unit = ((image - lo) / torch.where(span > 0, span, torch.ones_like(span))).clamp(0.0, 1.0)
    # A NaN position (from a non-finite input) would index outside the histogram; it is moved to
    # the lowest bin here, and joint_histogram returns NaN for that image.
    return spec.low + torch.nan_to_num(unit, nan=0.0) * (spec.high - spec.low)


def joint_histogram(
    moving: torch.Tensor,
    fixed: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    bins: int = 32,
    kernel: Kernel = "bspline",
    sigma: float = 0.5,
    moving_range: tuple[float, float] | None = None,
    fixed_range: tuple[float, float] | None = None,
) -> torch.Tensor:
    r"""Parzen-window joint probability of the intensities of two images.

    Intensities are mapped linearly to continuous bin positions, from each image's minimum and
    maximum inside the mask (or from ``moving_range`` / ``fixed_range``; values outside the range
    are clipped to it):

    * ``"bspline"`` (Mattes et al.): the range maps to ``[1, bins - 2]`` and the kernel is the
      cubic B-spline :math:`\beta^3`, which spans 4 bins, so all of a sample's mass stays in the
      histogram (:math:`\sum_k \beta^3(t - k) = 1`);
    * ``"gaussian"``: the range maps to ``[0, bins - 1]`` (bin centres at the extremes) and the
      kernel is :math:`\exp(-(t - k)^2 / 2\sigma^2)` (``sigma`` in bins), cut off at
      ``4 sigma``; mass beyond the outer bins is dropped.

    The histogram is

    .. math::
        h(a, b) = \sum_v w_v \, K(t^m_v - a) \, K(t^f_v - b), \qquad p = h / \textstyle\sum_{a,b} h(a, b),

    with :math:`w_v` the mask (1 without one). Gradients flow to both images (through the kernel
    weights and through the min/max range) and to a floating-point mask; double backward is not
    supported. Half-precision inputs (and autocast) are computed in float32.

    Args:
        moving: first image.
        fixed: second image.
        mask: voxel weights, e.g. a binary region; only voxels with ``mask > 0`` set the range.
        bins: number of bins per axis (at least 4 for ``"bspline"``, 2 for ``"gaussian"``).
        kernel: ``"bspline"`` (cubic B-spline) or ``"gaussian"``.
        sigma: width of the Gaussian kernel in bins (only used by ``"gaussian"``).
        moving_range: fixed intensity range ``(low, high)`` of ``moving``; None uses its min/max.
        fixed_range: the same for ``fixed``.

    Returns:
        The joint probability ``p[b, c, i, j]`` of ``moving`` in bin ``i`` and ``fixed`` in bin
        ``j``, summing to 1 for every batch element and channel (0 everywhere for an empty mask;
        NaN everywhere where ``moving``, ``fixed`` or ``mask`` hold a NaN or an infinity).

    Shape:
        moving, fixed: ``(B, C, *S)``; mask: ``(B, 1, *S)`` or None; out: ``(B, C, bins, bins)``.

    Example:
        >>> x = torch.rand(1, 1, 16, 16)
        >>> p = joint_histogram(x, x, bins=8)
        >>> p.shape, round(p.sum().item(), 5)
        (torch.Size([1, 1, 8, 8]), 1.0)
    """
    dims = check_pair(moving, fixed, mask)
    spec = _spec(bins, kernel, sigma)
    with no_autocast(moving.device):
        x = promote(moving)
        y = promote(fixed).to(x.dtype)
        b, ch = dims["B"], dims["C"]
        x, y = x.reshape(b, ch, -1), y.reshape(b, ch, -1)
        w = None
        if mask is not None:
            w = mask.reshape(b, 1, -1).to(x.dtype)
        tm = _bin_positions(x, w, moving_range, spec, "moving_range")
        tf = _bin_positions(y, w, fixed_range, spec, "fixed_range")
        n = tm.shape[-1]
        wb = None if w is None else w.expand(b, ch, n).reshape(b * ch, n)
        tm, tf = tm.reshape(b * ch, n), tf.reshape(b * ch, n)
        if selected(tm) == "triton":
            hist = joint_histogram_kernel(tm, tf, wb, spec.kernel, spec.bins, spec.taps, spec.sigma, spec.radius)
        else:
            hist = _JointHistogram.apply(tm, tf, wb, spec)
        total = hist.sum(dim=(1, 2), keepdim=True)
        prob = (hist / torch.where(total > 0, total, torch.ones_like(total))).view(b, ch, bins, bins)
        finite = torch.isfinite(x).all(-1) & torch.isfinite(y).all(-1)  # (B, C), no host synchronisation
        if w is not None:
            finite = finite & torch.isfinite(w).all(-1)
        return torch.where(finite[..., None, None], prob, torch.nan)


def _entropy(p: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """:math:`-\\sum p \\log p` with :math:`0 \\log 0 = 0` and finite gradients at 0."""
    tiny = torch.finfo(p.dtype).tiny
    return -(p * torch.log(p.clamp(min=tiny))).sum(dim=dims)


def mutual_information(
    moving: torch.Tensor,
    fixed: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    bins: int = 32,
    normalized: bool = True,
    kernel: Kernel = "bspline",
    sigma: float = 0.5,
    moving_range: tuple[float, float] | None = None,
    fixed_range: tuple[float, float] | None = None,
) -> torch.Tensor:
    r"""Negative (normalised) mutual information of two images, a loss: lower is better.

    From the Parzen joint probability :math:`p` of :func:`joint_histogram` and its marginals
    :math:`p_m(a) = \sum_b p(a, b)`, :math:`p_f(b) = \sum_a p(a, b)`, with
    :math:`H(q) = -\sum q \log q` (natural logarithm, :math:`0 \log 0 = 0`):

    * ``normalized=True``: :math:`\mathrm{NMI} = (H(p_m) + H(p_f)) / H(p)`, in :math:`[1, 2]`
      (1 for independent images, 2 for a one-to-one intensity relation without kernel blur);
      the loss is :math:`-\mathrm{NMI}`, in :math:`[-2, -1]`. This is the paper's similarity.
    * ``normalized=False``: :math:`\mathrm{MI} = H(p_m) + H(p_f) - H(p)`, in
      :math:`[0, \log(\mathrm{bins})]`; the loss is :math:`-\mathrm{MI}`, in
      :math:`[-\log(\mathrm{bins}), 0]`.

    The value is computed for every batch element and channel and averaged. A constant image
    gives MI 0 (NMI 1), never NaN; so does an empty mask. A NaN or an infinity in an input gives
    NaN (see :doc:`/conventions`). The histogram and the entropies are
    computed in float32 (float64 for float64 inputs), also under autocast.

    Args:
        moving: the image being deformed.
        fixed: the reference image.
        mask: voxel weights ``>= 0`` (e.g. a binary region of interest).
        bins: histogram bins per axis.
        normalized: NMI (True) or plain MI (False).
        kernel: Parzen window, ``"bspline"`` (cubic B-spline, 4 bins wide) or ``"gaussian"``.
        sigma: width of the Gaussian window in bins (only for ``"gaussian"``).
        moving_range: intensity range ``(low, high)`` mapped onto the bins for ``moving``;
            None uses the image's min/max inside the mask.
        fixed_range: the same for ``fixed``.

    Returns:
        A scalar: minus the (normalised) mutual information, averaged over batch and channels.

    Raises:
        ValueError: on mismatched shapes, an unknown kernel, too few bins (fewer than the kernel
            spans: 4 for ``"bspline"``, 2 for ``"gaussian"``), a non-positive ``sigma`` or an
            empty range.

    Shape:
        moving, fixed: ``(B, C, *S)``; mask: ``(B, 1, *S)`` or None; out: ``()``.

    Example:
        >>> x = torch.rand(2, 1, 32, 32)
        >>> loss = mutual_information(x, x.exp())  # monotone map: highly dependent
        >>> bool(-2.0 <= loss <= -1.0)
        True
    """
    p = joint_histogram(
        moving, fixed, mask, bins=bins, kernel=kernel, sigma=sigma, moving_range=moving_range, fixed_range=fixed_range
    )
    h_m = _entropy(p.sum(dim=3), (2,))
    h_f = _entropy(p.sum(dim=2), (2,))
    h_joint = _entropy(p, (2, 3))
    if normalized:
        # NMI 1 where the joint entropy is 0 (a constant image); a NaN entropy stays NaN
        safe = torch.where(h_joint > 0, h_joint, torch.ones_like(h_joint))
        value = torch.where(h_joint == 0, torch.ones_like(h_joint), (h_m + h_f) / safe)
    else:
        value = h_m + h_f - h_joint
    return -value.mean()


class MutualInformation(Configurable, nn.Module):
    r"""Negative (normalised) mutual information loss; see :func:`mutual_information`.

    Args:
        bins: histogram bins per axis.
        normalized: NMI :math:`(H_m + H_f) / H_{mf}` (loss in ``[-2, -1]``) or MI
            :math:`H_m + H_f - H_{mf}` (loss in ``[-log(bins), 0]``).
        kernel: ``"bspline"`` or ``"gaussian"``.
        sigma: Gaussian width in bins.
        moving_range: fixed intensity range of the moving image, or None for its min/max.
        fixed_range: fixed intensity range of the fixed image, or None for its min/max.

    Shape:
        moving, fixed: ``(B, C, *S)``; mask: ``(B, 1, *S)`` or None; out: ``()``.

    Example:
        >>> loss = MutualInformation(bins=16)
        >>> x = torch.rand(1, 1, 8, 8, 8)
        >>> bool(loss(x, x) < loss(x, torch.rand(1, 1, 8, 8, 8)))
        True
    """

    def __init__(
        self,
        bins: int = 32,
        normalized: bool = True,
        kernel: Kernel = "bspline",
        sigma: float = 0.5,
        moving_range: tuple[float, float] | None = None,
        fixed_range: tuple[float, float] | None = None,
    ) -> None:
        super().__init__()
        _spec(bins, kernel, sigma)  # validate early
        self.bins = bins
        self.normalized = normalized
        self.kernel: Kernel = kernel
        self.sigma = sigma
        self.moving_range = moving_range
        self.fixed_range = fixed_range

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Minus the (normalised) mutual information of ``moving`` and ``fixed``."""
        return mutual_information(
            moving,
            fixed,
            mask,
            bins=self.bins,
            normalized=self.normalized,
            kernel=self.kernel,
            sigma=self.sigma,
            moving_range=self.moving_range,
            fixed_range=self.fixed_range,
        )

    def extra_repr(self) -> str:
        return f"bins={self.bins}, normalized={self.normalized}, kernel={self.kernel!r}, sigma={self.sigma}"
