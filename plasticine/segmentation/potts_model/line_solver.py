r"""The exact 1-D L2-Potts solver: dynamic programming on a batch of lines.

**1-D problem** (:func:`potts_1d`). On a line of length ``n`` the problem is solved exactly by
dynamic programming: with :math:`P_0 = -\gamma`,

.. math::

    P_r = \min_{0 \le l < r} P_l + \gamma + d_{l,r},
    \qquad d_{l,r} = \sum_{i=l}^{r-1} w_i \lVert f_i \rVert^2 - \frac{\lVert \sum_{i=l}^{r-1} w_i f_i \rVert^2}{\sum_{i=l}^{r-1} w_i},

the squared deviation of :math:`f` on the segment ``[l, r)`` from its weighted mean, read off
cumulative sums of :math:`w`, :math:`w f` and :math:`w \lVert f \rVert^2` in O(1). The optimal jump
positions are found by backtracking from ``r = n``. All lines of a batch are solved at once: for each
``r`` the candidates ``l < r`` of every line form one ``(r, M)`` tensor operation (without the
"stop once :math:`d_{l,r} + \gamma > P_r`" pruning of a scalar scan, which does not vectorise
over lines), so one direction of a batch of images costs ``n`` steps of five tensor operations,
whatever the batch size. The recursion runs in float64 for any input dtype.

On CPU tensors the default backend (:func:`line_backend`) is the compiled scalar scan with that
pruning (:mod:`~plasticine.segmentation.potts_model.line_kernel`, numba): the same cumulative
moments, the same expressions and the same backtracking, so the same values and jumps. Its lines
are shared out over all CPU cores, as Pottslab does (the result does not depend on their number).

Reference:
    F. Friedrich, A. Kempe, V. Liebscher, G. Winkler, "Complexity penalized M-estimation: fast
    computation", J. Comput. Graph. Stat. 17(1), 2008.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch

from ...core.shapes import check_shape

__all__ = ["LineBackend", "line_backend", "potts_1d"]


LineBackend = Literal["auto", "numba", "torch"]


_TINY = torch.finfo(torch.float64).tiny


def _inverse_lengths(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``inv[r, l] = 1 / (r - l)`` for ``l < r``, else 0; ``(n + 1, n + 1)``."""
    idx = torch.arange(n + 1, device=device, dtype=dtype)
    diff = idx[:, None] - idx[None, :]
    return torch.where(diff > 0, 1.0 / diff.clamp_min(1.0), torch.zeros((), dtype=dtype, device=device))


_CPU_BLOCK_ELEMENTS = 256 * 256
"""Line positions solved together on the CPU (lines x length): blocks of this size keep each step's
tensors in cache (measured 1.6x faster than 2048 lines of 256 at once); on CUDA all lines go at once."""


_NUMBA_ERROR: list[str] = []
"""Why numba could not be imported, once tried (empty: not tried yet or importable)."""


def _numba_missing() -> str | None:
    """None when the compiled kernel is importable, else the reason."""
    if not _NUMBA_ERROR:
        try:
            from . import line_kernel  # noqa: F401
        except Exception as exc:  # noqa: BLE001 - any import failure means the torch path
            _NUMBA_ERROR.append(f"{type(exc).__name__}: {exc}")
        else:
            _NUMBA_ERROR.append("")
    return _NUMBA_ERROR[0] or None


def line_backend(backend: LineBackend = "auto", device: torch.device | str = "cpu") -> str:
    r"""The 1-D Potts solver that runs for ``backend`` on tensors of ``device``: ``"numba"`` or ``"torch"``.

    ``"auto"`` picks the compiled per-line loop (``"numba"``: Pottslab's early-terminating scan,
    about :math:`O(n \bar\ell)` per line of length :math:`n` with segments of mean length
    :math:`\bar\ell`; see :mod:`~plasticine.segmentation.potts_model.line_kernel`) for CPU tensors
    when numba is importable (the optional extra ``plasticine[numba]``), and the tensor path
    (``"torch"``: all lines at once, :math:`O(n^2)` per line, any device) otherwise. Both give the
    same optimal values and jumps. ``"numba"`` or ``"torch"`` forces one.

    Args:
        backend: ``"auto"``, ``"numba"`` or ``"torch"``.
        device: where the signals are.

    Returns:
        ``"numba"`` or ``"torch"``.

    Raises:
        ValueError: for an unknown name, ``"numba"`` without numba or on a non-CPU device.

    Shape:
        no tensors.

    Example:
        >>> line_backend("torch")
        'torch'
    """
    dev = torch.device(device)
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "numba" if dev.type == "cpu" and _numba_missing() is None else "torch"
    if backend == "numba":
        if dev.type != "cpu":
            raise ValueError(f"backend: 'numba' runs on CPU tensors, got tensors on {dev}; use 'auto' or 'torch'")
        reason = _numba_missing()
        if reason is not None:
            raise ValueError(f"backend: 'numba' needs numba (pip install plasticine[numba]), which does not import ({reason})")
        return "numba"
    raise ValueError(f"backend: expected 'auto', 'numba' or 'torch', got {backend!r}")


def _solve_lines(
    g: torch.Tensor, w: torch.Tensor | None, gamma: float, lengths: torch.Tensor | None = None, backend: str = "torch"
) -> torch.Tensor:
    """Exact 1-D L2-Potts on lines stored as columns, in cache-sized blocks of lines on the CPU.

    Lines of different lengths (``lengths``) are sorted by length first, so that each block runs
    only as many steps as its longest line has positions; the output after a line's end is
    meaningless. ``backend`` is a resolved name (:func:`line_backend`); ``"numba"`` solves all
    lines in one call. Each line's centre is computed once for all lines, so that both backends
    work on the same moments and agree to the last bit.
    """
    n, m = g.shape[:2]
    if n == 0 or m == 0:
        return g.clone()
    wd = None if w is None else w.double()
    x = g.double()
    shift = _line_shift(x, wd, lengths)
    if backend == "numba":
        return _kernel_fit(x, wd, gamma, lengths, shift).to(g.dtype)
    if g.device.type != "cpu" or (m * n <= _CPU_BLOCK_ELEMENTS and lengths is None):
        return _solve_line_block(g, wd, gamma, lengths, shift)
    if lengths is None:
        per = max(1, _CPU_BLOCK_ELEMENTS // max(n, 1))
        parts = [
            _solve_line_block(
                g[:, i : i + per], None if wd is None else wd[:, i : i + per], gamma, None, shift[:, i : i + per]
            )
            for i in range(0, m, per)
        ]
        return torch.cat(parts, 1)
    order = torch.argsort(lengths, stable=True)
    sizes = lengths[order].tolist()
    out = torch.zeros_like(g)
    i = 0
    while i < m:
        j = i + 1  # grow the block while its lines x longest length stays within the budget
        while j < m and (j + 1 - i) * sizes[j] <= _CPU_BLOCK_ELEMENTS:
            j += 1
        top = max(int(sizes[j - 1]), 1)
        idx = order[i:j]
        sol = _solve_line_block(
            g[:top, idx], None if wd is None else wd[:top, idx], gamma, lengths[idx], shift[:, idx]
        )
        out[:top, idx] = sol
        i = j
    return out


def _line_shift(x: torch.Tensor, wd: torch.Tensor | None, lengths: torch.Tensor | None) -> torch.Tensor:
    """Centre of each line ``(1, M, C)`` of float64 lines ``x``: its (weighted) mean over its own positions.

    The minimiser is shift-equivariant and the cumulative sums of centred lines lose less precision.
    """
    if lengths is not None:
        valid = torch.arange(x.shape[0], device=x.device)[:, None] < lengths[None]
        return (x * valid[..., None]).sum(0, keepdim=True) / lengths.clamp_min(1)[None, :, None]
    if wd is None:
        return x.mean(0, keepdim=True)
    return (x * wd[..., None]).sum(0, keepdim=True) / wd.sum(0)[None, :, None].clamp_min(_TINY)


def _solve_line_block(
    g: torch.Tensor, wd: torch.Tensor | None, gamma: float, lengths: torch.Tensor | None, shift: torch.Tensor
) -> torch.Tensor:
    """Exact 1-D L2-Potts on lines stored as columns: ``g (n, M, C)``, ``wd (n, M)`` float64 or None (ones).

    ``lengths (M,)``, when given, ends line ``m`` at position ``lengths[m]``: the values after it
    are ignored and its output there is meaningless. ``shift (1, M, C)`` is each line's centre
    (:func:`_line_shift`). Returns the piecewise-constant minimiser ``(n, M, C)`` in the dtype of
    ``g``. The recursion runs in float64 whatever the input dtype.
    """
    n, m, c = g.shape
    dev = g.device
    x = g.double()
    if lengths is not None:
        x = x * (torch.arange(n, device=dev)[:, None] < lengths[None])[..., None]
    x = x - shift
    wx = x if wd is None else x * wd[..., None]
    s1 = torch.cat([x.new_zeros(1, m, c), wx.cumsum(0)])  # (n+1, M, C)
    s2 = torch.cat([x.new_zeros(1, m), (wx * x).sum(-1).cumsum(0)])  # (n+1, M)
    cw = None if wd is None else torch.cat([wd.new_zeros(1, m), wd.cumsum(0)])  # (n+1, M)
    inv = _inverse_lengths(n, torch.float64, dev) if wd is None else None
    b = _optimal_values(s1, cw, inv, gamma)
    bounds = _backtrack_values(s1, s2, cw, inv, b, gamma, lengths)
    u = _segment_means(s1, cw, bounds) + shift
    return u.to(g.dtype)


def _optimal_values(s1: torch.Tensor, cw: torch.Tensor | None, inv: torch.Tensor | None, gamma: float) -> torch.Tensor:
    """The forward recursion on all lines at once: ``b (n + 1, M)`` from the moments ``s1``, ``cw``."""
    n1, m, c = s1.shape
    n = n1 - 1
    dev = s1.device
    scalar = c == 1
    s1v = s1[..., 0] if scalar else s1
    # b[r] = P[r] + gamma - s2[r] satisfies b[0] = 0, b[r] = min_l (b[l] - q(l, r)) + gamma with
    # q(l, r) = |S1[r] - S1[l]|^2 / (W[r] - W[l]); only the values are reduced here (a reduction with
    # indices is several times slower in torch), the minimising l are recovered by backtracking
    b = torch.empty(n + 1, m, dtype=torch.float64, device=dev)
    b[0] = 0.0
    best = torch.empty(m, dtype=torch.float64, device=dev)
    buf1 = torch.empty((n, m) if scalar else (n, m, c), dtype=torch.float64, device=dev)
    buf2 = torch.empty(n, m, dtype=torch.float64, device=dev)
    buf3 = None if cw is None else torch.empty(n, m, dtype=torch.float64, device=dev)
    for r in range(1, n + 1):
        u = torch.sub(s1v[r], s1v[:r], out=buf1[:r])
        if inv is not None:
            iw = inv[r, :r, None]
        else:
            iw = torch.sub(cw[r], cw[:r], out=buf3[:r]).clamp_min_(_TINY).reciprocal_()
        if scalar:
            t = torch.mul(u, iw, out=buf2[:r])
            cand = torch.addcmul(b[:r], t, u, value=-1.0, out=buf2[:r])
        else:
            q = torch.sum(u.square_(), -1, out=buf2[:r])
            cand = torch.addcmul(b[:r], q, iw, value=-1.0, out=buf2[:r])
        torch.amin(cand, 0, out=best)
        torch.add(best, gamma, out=b[r])
    return b


def _kernel_fit(
    x: torch.Tensor, w: torch.Tensor | None, gamma: float, lengths: torch.Tensor | None, shift: torch.Tensor
) -> torch.Tensor:
    """The minimiser ``(n, M, C)`` float64 from the compiled per-line loop (numba backend)."""
    from . import line_kernel

    n, m, _ = x.shape
    ends = np.full(m, n, dtype=np.int64) if lengths is None else lengths.numpy().astype(np.int64)
    u = line_kernel.solve_lines(
        x.contiguous().numpy(),
        None if w is None else w.contiguous().numpy(),
        ends,
        gamma,
        shift[0].contiguous().numpy(),
    )
    return torch.from_numpy(u)


def _backtrack_values(
    s1: torch.Tensor,
    s2: torch.Tensor,
    cw: torch.Tensor | None,
    inv: torch.Tensor | None,
    b: torch.Tensor,
    gamma: float,
    lengths: torch.Tensor | None,
) -> torch.Tensor:
    """Jump positions of the optimal partitions, from the optimal values ``b (n + 1, M)`` alone.

    Walks back from each line's end: at the current ``r`` of every line it recomputes the
    candidates ``b[l] - q(l, r)`` and moves to the largest ``l`` whose candidate attains the optimum
    ``b[r] - gamma`` (up to a relative 1e-10 for rounding). One step per segment of the longest
    partition; the forward pass then needs only the fast value reduction. Returns ``(n + 1, M)``
    bool, True at 0, at n, at each line's end and at every jump.
    """
    n1, m = b.shape
    n = n1 - 1
    c = s1.shape[-1]
    dev = b.device
    bounds = torch.zeros(n1, m, dtype=torch.bool, device=dev)
    bounds[0] = True
    bounds[n] = True
    cur = torch.full((m,), n, dtype=torch.long, device=dev) if lengths is None else lengths.clone()
    bounds[cur, torch.arange(m, device=dev)] = True
    tol = 1e-10 * (b.abs().amax(0) + s2[n].abs() + abs(gamma))  # (M,)
    lpos = torch.arange(n, device=dev)[:, None]
    s1l = s1[:n]
    bl = b[:n]
    while bool(cur.any()):
        idx = cur[None]
        u = s1l - s1.gather(0, idx[..., None].expand(1, m, c))
        q = u.square_().sum(-1) if c > 1 else u[..., 0].square_()
        if cw is None:
            q.mul_(inv.index_select(0, cur)[:, :n].T)
        else:
            q.div_((cw.gather(0, idx) - cw[:n]).clamp_min_(_TINY))
        target = b.gather(0, idx) - gamma + tol
        ok = (bl - q <= target) & (lpos < idx)
        cur = torch.where(ok, lpos, 0).amax(0)
        bounds.scatter_(0, cur[None], True)
    return bounds


def _segment_means(s1: torch.Tensor, cw: torch.Tensor | None, bounds: torch.Tensor) -> torch.Tensor:
    """Per-pixel value of the segment it lies in, from the cumulative sums and the jump positions."""
    n1, m, c = s1.shape
    n = n1 - 1
    idx = torch.arange(n + 1, device=s1.device)[:, None]
    start = torch.where(bounds[:n], idx[:n], 0).cummax(0).values  # (n, M)
    end = torch.where(bounds[1:], idx[1:], n).flip(0).cummin(0).values.flip(0)  # (n, M)
    total = s1.gather(0, end[..., None].expand(n, m, c)) - s1.gather(0, start[..., None].expand(n, m, c))
    if cw is None:
        weight = (end - start).to(s1.dtype)
    else:
        weight = (cw.gather(0, end) - cw.gather(0, start)).clamp_min(torch.finfo(s1.dtype).tiny)
    return total / weight[..., None]


def potts_1d(
    f: torch.Tensor, gamma: float, weights: torch.Tensor | None = None, *, backend: LineBackend = "auto"
) -> torch.Tensor:
    r"""Exact minimiser of the 1-D L2-Potts functional on a batch of (vector-valued) signals.

    .. math::

        \min_u \; \gamma \, \#\{i : u_{i+1} \neq u_i\} + \sum_{i=0}^{n-1} w_i \lVert u_i - f_i \rVert_2^2,

    solved by dynamic programming over cumulative moments in :math:`O(n^2)` per signal (see the
    module notes); all ``M`` signals are processed together. When several partitions are optimal
    one of them is returned (the one with the latest last jump, up to rounding).

    Args:
        f: signals, one per row; scalar ``(M, n)`` or vector-valued ``(M, n, C)``.
        gamma: jump penalty, ``>= 0``.
        weights: non-negative data weights ``(M, n)``; None means all ones. A segment whose weights
            are all zero gets the value 0.
        backend: ``"auto"`` (the compiled loop on CPU tensors when numba is importable, else the
            tensor path), ``"numba"`` or ``"torch"``; see :func:`line_backend`. Both give the same
            partition.

    Returns:
        The minimiser, piecewise constant along each signal, same shape and dtype as ``f``.

    Raises:
        ValueError: on a shape, dtype or value that does not fit.

    Shape:
        f: ``(M, n)`` or ``(M, n, C)``; weights: ``(M, n)``; out: like ``f``.

    Reference:
        Friedrich, Kempe, Liebscher and Winkler, J. Comput. Graph. Stat. 17(1), 2008; Storath and
        Weinmann, SIAM J. Imaging Sci. 7(3), 2014.

    Example:
        >>> f = torch.tensor([[0.0, 0.1, 0.0, 1.0, 1.1, 0.9]])
        >>> potts_1d(f, gamma=0.1)
        tensor([[0.0333, 0.0333, 0.0333, 1.0000, 1.0000, 1.0000]])
    """
    if not isinstance(f, torch.Tensor):
        raise TypeError(f"f: expected a torch.Tensor, got {type(f).__name__}")
    if f.dim() not in (2, 3):
        raise ValueError(f"f: expected shape (M, n) or (M, n, C), got {tuple(f.shape)}")
    if not f.is_floating_point():
        raise ValueError(f"f: expected a floating dtype, got {f.dtype}")
    gamma = _check_gamma(gamma)
    backend = line_backend(backend, f.device)
    x = f if f.dim() == 3 else f[..., None]
    w = None
    if weights is not None:
        check_shape(weights, "M n", "weights", bindings={"M": x.shape[0], "n": x.shape[1]})
        if bool((weights < 0).any()):
            raise ValueError("weights: expected non-negative values, found a negative one")
        w = weights.to(dtype=f.dtype, device=f.device).T
    u = _solve_lines(x.transpose(0, 1), w, gamma, backend=backend).transpose(0, 1)
    return u if f.dim() == 3 else u[..., 0]


def _check_gamma(gamma: float) -> float:
    gamma = float(gamma)
    if not math.isfinite(gamma) or gamma < 0:
        raise ValueError(f"gamma: expected a finite number >= 0, got {gamma}")
    return gamma
