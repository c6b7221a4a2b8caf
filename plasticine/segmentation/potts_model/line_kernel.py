r"""The 1-D L2-Potts dynamic programme as a compiled CPU loop (numba), with the early-termination bound.

This module imports numba at import time; :mod:`~plasticine.segmentation.potts_model.line_solver`
imports it lazily, when a backend is first resolved (``pip install plasticine[numba]``).

Each line is scanned on its own, with the same recursion and the same floating-point expressions as
the tensor path, so both give bit-identical optimal values and therefore the same jumps. In energy
form :math:`P_r = \min_{l < r} c_l`, :math:`c_l = P_l + \gamma + d_{l,r}` (:math:`P_0 = -\gamma`).
For every ``r`` the candidate ``l = 0`` (no jump) is taken first, then ``l = r - 1, r - 2, ...``
from the right, and the scan stops at the first ``l`` after which no smaller ``l'`` can do better
than the best :math:`P^{\text{best}}` found so far. Two lower bounds hold for all
:math:`1 \le l' < l`:

* :math:`c_{l'} \ge \gamma + d_{l,r}`, since :math:`P_{l'} \ge 0` and :math:`d_{l',r} \ge d_{l,r}`
  (Storath and Weinmann's Pottslab, ``minL2Potts``);
* :math:`c_{l'} \ge c_l - \gamma`, since :math:`P_l \le P_{l'} + \gamma + d_{l',l}` (one more
  segment) and :math:`d_{l',r} \ge d_{l',l} + d_{l,r}` (splitting a segment never raises its
  squared deviation); this is the pruning rule of PELT (Killick, Fearnhead and Eckley, 2012),
  used here as a stop.

The bounds are applied with a margin of :math:`10^{-10}` of the line's scale
(:math:`\sum w f^2 + \gamma`), far above the rounding of the cumulative sums, so that a stop never
skips a candidate that the full scan would pick. A scan reaches back about one segment, so a line
of ``n`` positions costs about :math:`O(n \bar\ell)` instead of :math:`O(n^2)` for segments of
mean length :math:`\bar\ell`.

The backtracking is the tensor path's (:func:`_backtrack_values` in the line solver): from each
line's end, the largest ``l`` whose candidate attains the optimum up to a relative
:math:`10^{-10}`.

Reference:
    M. Storath, A. Weinmann, "Fast partitioning of vector-valued images", SIAM J. Imaging Sci.
    7(3), 2014; Pottslab (``minL2Potts``), https://github.com/mstorath/Pottslab. R. Killick,
    P. Fearnhead, I. A. Eckley, "Optimal detection of changepoints with a linear computational
    cost", J. Am. Stat. Assoc. 107(500), 2012.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np

__all__ = ["solve_lines"]

_TINY = np.finfo(np.float64).tiny
_PRUNE_MARGIN = 1e-10
_BACKTRACK_TOL = 1e-10


@numba.njit(cache=True, nogil=True, fastmath=False)
def _line(s1, s2, cw, weighted, length, gamma, inv, shift, b, bounds, out):  # pragma: no cover - compiled
    """One line: ``s1 (n + 1, C)``, ``s2 (n + 1,)``, ``cw (n + 1,)``, ``inv[k] = 1 / k``, ``shift (C,)``.

    Writes the optimal values ``b (n + 1,)``, the jumps ``bounds (n + 1,)`` and the segment means
    plus ``shift`` into ``out (n, C)``.
    """
    c = s1.shape[1]
    n = s1.shape[0] - 1
    b[0] = 0.0
    scale = abs(s2[length]) + abs(gamma)
    margin = _PRUNE_MARGIN * scale
    for r in range(1, length + 1):
        # l = 0 first: the no-jump candidate (P_0 = -gamma, outside the bound below)
        if weighted:
            iw = 1.0 / max(cw[r] - cw[0], _TINY)
        else:
            iw = inv[r]
        if c == 1:
            u = s1[r, 0] - s1[0, 0]
            best = b[0] - (u * iw) * u
        else:
            q = 0.0
            for h in range(c):
                u = s1[r, h] - s1[0, h]
                q += u * u
            best = b[0] - q * iw
        for l in range(r - 1, 0, -1):
            if weighted:
                iw = 1.0 / max(cw[r] - cw[l], _TINY)
            else:
                iw = inv[r - l]
            if c == 1:
                u = s1[r, 0] - s1[l, 0]
                t = u * iw
                q = t * u
                cand = b[l] - q
            else:
                q = 0.0
                for h in range(c):
                    u = s1[r, h] - s1[l, h]
                    q += u * u
                cand = b[l] - q * iw
                q = q * iw
            if cand < best:
                best = cand
            # every l' < l has cand(l') >= cand(l) - gamma and cand(l') >= gamma + d(l, r) - s2[r]
            # (Pottslab's bound); either above the best ends the scan
            if cand > best + gamma + margin or (s2[r] - s2[l]) - q + gamma > best + s2[r] + margin:
                break
        b[r] = best + gamma
    top = 0.0
    for r in range(length + 1):
        top = max(top, abs(b[r]))
    tol = _BACKTRACK_TOL * (top + abs(s2[length]) + abs(gamma))
    bounds[0] = True
    bounds[length] = True
    cur = length
    while cur > 0:
        target = b[cur] - gamma + tol
        nxt = 0
        for l in range(cur - 1, -1, -1):
            if c == 1:
                u = s1[l, 0] - s1[cur, 0]
                q = u * u
            else:
                q = 0.0
                for k in range(c):
                    u = s1[l, k] - s1[cur, k]
                    q += u * u
            if weighted:
                q = q / max(cw[cur] - cw[l], _TINY)
            else:
                q = q * inv[cur - l]
            if b[l] - q <= target:
                nxt = l
                break
        cur = nxt
        bounds[cur] = True
    bounds[n] = True
    # segment means, as the tensor path's _segment_means: (S1[end] - S1[start]) / weight + shift
    start = 0
    for e in range(1, n + 1):
        if not bounds[e]:
            continue
        if weighted:
            wt = max(cw[e] - cw[start], _TINY)
        else:
            wt = float(e - start)
        for k in range(c):
            v = (s1[e, k] - s1[start, k]) / wt + shift[k]
            for p in range(start, e):
                out[p, k] = v
        start = e


@numba.njit(cache=True, nogil=True, fastmath=False)
def _lines(x, w, weighted, lengths, gamma, inv, shift, out, start, stop):  # pragma: no cover - compiled
    n, m, c = x.shape
    for i in range(start, stop):
        length = lengths[i]
        # the tensor path's moments: x masked after the line's end, centred, weighted, summed in order
        s1 = np.empty((n + 1, c), dtype=np.float64)
        s2 = np.empty(n + 1, dtype=np.float64)
        cw = np.empty(n + 1 if weighted else 1, dtype=np.float64)
        for h in range(c):
            s1[0, h] = 0.0
        s2[0] = 0.0
        cw[0] = 0.0
        for r in range(n):
            keep = 1.0 if r < length else 0.0
            sq = 0.0
            for h in range(c):
                v = x[r, i, h] * keep - shift[i, h]
                wv = v * w[r, i] if weighted else v
                s1[r + 1, h] = s1[r, h] + wv
                if h == 0:
                    sq = wv * v
                else:
                    sq += wv * v
            s2[r + 1] = s2[r] + sq
            if weighted:
                cw[r + 1] = cw[r] + w[r, i]
        b = np.empty(n + 1, dtype=np.float64)
        bounds = np.zeros(n + 1, dtype=np.bool_)
        line = np.empty((n, c), dtype=np.float64)
        _line(s1, s2, cw, weighted, length, gamma, inv, shift[i], b, bounds, line)
        for r in range(n):
            for h in range(c):
                out[r, i, h] = line[r, h]


def solve_lines(
    x: np.ndarray,
    w: np.ndarray | None,
    lengths: np.ndarray,
    gamma: float,
    shift: np.ndarray,
) -> np.ndarray:
    r"""Optimal piecewise-constant fits of ``M`` lines stored as columns.

    Each line ``x[:, i]`` is masked after its length, centred by ``shift[i]`` and weighted by
    ``w[:, i]``; with :math:`S_1`, :math:`S_2`, :math:`W` the cumulative sums of :math:`w f`,
    :math:`w \lVert f \rVert^2` and :math:`w` (0 first) the recursion
    :math:`b_r = \min_{l < r} b_l - \lVert S_1[r] - S_1[l] \rVert^2 / (W[r] - W[l]) + \gamma`
    runs with the pruning of the module notes, the jumps are backtracked and every segment gets
    its mean :math:`(S_1[e] - S_1[s]) / (W[e] - W[s])` plus ``shift``.

    Args:
        x: ``(n, M, C)`` float64 signals.
        w: ``(n, M)`` float64 positive weights, or None for unit weights.
        lengths: ``(M,)`` int64, the end of each line (``<= n``); after it the fit runs over the
            rest ``[length, n)`` as one segment.
        gamma: jump penalty.
        shift: ``(M, C)`` float64, the centre of each line.

    Returns:
        ``(n, M, C)`` float64, the fits.

    Shape:
        x: ``(n, M, C)``; w: ``(n, M)``; lengths: ``(M,)``; shift: ``(M, C)``; out: ``(n, M, C)``.
    """
    n, m, c = x.shape
    out = np.empty((n, m, c), dtype=np.float64)
    weighted = w is not None
    wa = w if weighted else np.zeros((1, 1), dtype=np.float64)
    k = np.arange(n + 1, dtype=np.float64)
    k[0] = 1.0
    inv = 1.0 / k  # the tensor path's 1 / (r - l)
    _shared(lambda a, b: _lines(x, wa, weighted, lengths, float(gamma), inv, shift, out, a, b), m, n)
    return out


_POOL: list[ThreadPoolExecutor] = []
_MIN_CHUNK = 16 * 1024
"""Line positions per piece of work: pieces much smaller than this cost more to hand out than to solve."""


def _threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - platforms without affinity
        return max(1, os.cpu_count() or 1)


def _shared(work, m: int, n: int) -> None:
    """Run ``work(start, stop)`` over the lines ``0 .. m`` on all CPU cores, as Pottslab does.

    The lines are cut into pieces that the calling thread and helper threads take in turn from a
    shared counter; the call returns once every piece is done, without waiting for a helper that
    has not started (on a busy machine the caller then solves all of them). The compiled loop
    releases the GIL, and each line is solved on its own, so the result does not depend on the
    number of threads or the order of the pieces.
    """
    threads = min(_threads(), max(1, m * n // _MIN_CHUNK))
    if threads == 1:
        work(0, m)
        return
    size = max(1, -(-m // (4 * threads)))
    pieces = [(a, min(a + size, m)) for a in range(0, m, size)]
    lock = threading.Lock()
    state = {"next": 0, "done": 0}
    finished = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        while True:
            with lock:
                i = state["next"]
                state["next"] = i + 1
            if i >= len(pieces):
                return
            try:
                work(*pieces[i])
            except BaseException as exc:  # noqa: BLE001 - handed to the caller below
                errors.append(exc)
            with lock:
                state["done"] += 1
                if state["done"] == len(pieces):
                    finished.set()

    if not _POOL:
        _POOL.append(ThreadPoolExecutor(max_workers=max(1, _threads() - 1), thread_name_prefix="potts-lines"))
    for _ in range(threads - 1):
        _POOL[0].submit(run)
    run()
    finished.wait()
    if errors:
        raise errors[0]
