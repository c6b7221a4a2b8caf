r"""Regions of a nearly piecewise-constant result: connected regions, the refit and greedy merging.

The copies of the ADMM solver (:mod:`~plasticine.segmentation.potts_model.admm`) agree only up to
the stopping tolerance, so the result is finally made exactly piecewise constant: neighbours whose
values differ by at most ``merge_tol`` (relative to the intensity range) are joined into connected
regions, and each region gets the weighted mean of :math:`f`. This "refit" never adds a jump and
gives each region its optimal value.

**Region merging.** ADMM often leaves small or weakly contrasted regions whose removal would lower
the energy. With ``merge_regions`` (default) adjacent regions :math:`A, B` (masses :math:`m`,
means :math:`\mu`, weighted shared boundary :math:`\beta_{AB} = \sum_d \omega_d \#\{p : p \in A,
p + d \in B \text{ or back}\}`) are then joined while the exact energy change
:math:`\frac{m_A m_B}{m_A + m_B} \lVert \mu_A - \mu_B \rVert^2 - \gamma \beta_{AB}` is negative,
in rounds that join every pair which is the best join of both its regions. Each round lowers the
energy; the result is stable: no single join of two adjacent regions lowers it further. On the
BrainWeb slices this lowers the energy of the ADMM result by 1 to 4 percent.
"""

from __future__ import annotations

import math

import torch

from .neighborhoods import _shifted_pair

__all__: list[str] = []


def _connected_regions(u: torch.Tensor, offsets: list[tuple[int, ...]], tol: float) -> torch.Tensor:
    """Connected regions of neighbours of ``u`` whose values differ by at most ``tol`` (max over channels).

    Returns one label per pixel of the flattened batch ``(B * prod(S),)``: the smallest flat pixel
    index of its region (regions never cross images).
    """
    b = u.shape[0]
    shape = tuple(u.shape[2:])
    npix = math.prod(shape)
    labels = torch.arange(b * npix, device=u.device).view(b, 1, *shape)
    links = []
    for off in offsets:
        ua, ub = _shifted_pair(u, off)
        la, lb = _shifted_pair(labels, off)
        links.append(((ua - ub).abs().amax(1, keepdim=True) <= tol, la, lb))
    flat = labels.view(-1)
    while True:
        before = flat.clone()
        for close, la, lb in links:
            lo = torch.minimum(la, lb)
            la.copy_(torch.where(close, lo, la))
            lb.copy_(torch.where(close, torch.minimum(lo, lb), lb))
        for _ in range(4):  # pointer jumping: a label is a pixel index whose label is never larger
            flat.copy_(flat[flat])
        if torch.equal(before, flat):
            break
    return flat


def _refit_regions(
    labels: torch.Tensor,
    f: torch.Tensor,
    w: torch.Tensor | None,
    gamma: float,
    offsets: list[tuple[int, ...]],
    omegas: list[float],
    merge: bool,
) -> torch.Tensor:
    r"""Give each region the weighted mean of ``f``, after greedy merges of adjacent regions (``merge``).

    With masses :math:`m` (sums of weights), means :math:`\mu` and the weighted count
    :math:`\beta_{AB} = \sum_d \omega_d \#\{\text{neighbour pairs along } d \text{ between } A, B\}`,
    joining adjacent regions :math:`A` and :math:`B` changes the energy by exactly

    .. math::

        \Delta_{AB} = \frac{m_A m_B}{m_A + m_B} \lVert \mu_A - \mu_B \rVert^2 - \gamma \beta_{AB}

    (the data term of the union minus those of the parts, minus the jumps that disappear; all other
    boundaries keep their counts). Each round joins every pair that is the most negative
    :math:`\Delta` of both its regions (disjoint pairs, so their changes add up); rounds repeat
    until no join lowers the energy. Every round strictly lowers the energy, so this ends.

    Shape:
        labels: ``(B * prod(S),)``; f: ``(B, C, *S)``; w: ``(B, 1, *S)`` or None; out: like ``f``.
    """
    b, c = f.shape[:2]
    shape = tuple(f.shape[2:])
    dev = f.device
    ids, inv = torch.unique(labels, return_inverse=True)
    r = ids.numel()
    wt = torch.ones(b * math.prod(shape), dtype=torch.float64, device=dev) if w is None else w.reshape(-1).double()
    fl = f.movedim(1, -1).reshape(-1, c).double()
    mass = torch.zeros(r, dtype=torch.float64, device=dev).index_add_(0, inv, wt)
    sums = torch.zeros(r, c, dtype=torch.float64, device=dev).index_add_(0, inv, fl * wt[:, None])
    region = inv
    if merge and r > 1:
        lab = inv.view(b, 1, *shape)
        keys, wts = [], []
        for off, om in zip(offsets, omegas):
            la, lb = _shifted_pair(lab, off)
            cut = la != lb
            lo, hi = torch.minimum(la, lb)[cut], torch.maximum(la, lb)[cut]
            keys.append(lo * r + hi)
            wts.append(torch.full(lo.shape, om, dtype=torch.float64, device=dev))
        pa, pb, beta = _pair_weights(torch.cat(keys), torch.cat(wts), r)
        root = torch.arange(r, device=dev)
        idx_all = torch.arange(pa.numel(), device=dev)
        tiny = torch.finfo(torch.float64).tiny
        while pa.numel():
            ma, mb = mass[pa], mass[pb]
            mu_a = sums[pa] / ma.clamp_min(tiny)[:, None]
            mu_b = sums[pb] / mb.clamp_min(tiny)[:, None]
            delta = ma * mb / (ma + mb).clamp_min(tiny) * (mu_a - mu_b).square().sum(1) - gamma * beta
            gain = torch.where(delta < 0, delta, math.inf)
            if not bool(torch.isfinite(gain).any()):
                break
            best = torch.full((r,), math.inf, dtype=torch.float64, device=dev)
            best.scatter_reduce_(0, pa, gain, "amin").scatter_reduce_(0, pb, gain, "amin")
            sel = torch.isfinite(gain) & (gain == best[pa]) & (gain == best[pb])
            idx = idx_all[: pa.numel()]
            first = torch.full((r,), pa.numel(), dtype=torch.long, device=dev)
            pick = torch.where(sel, idx, pa.numel())
            first.scatter_reduce_(0, pa, pick, "amin").scatter_reduce_(0, pb, pick, "amin")
            sel &= (first[pa] == idx) & (first[pb] == idx)  # ties: one pair per region
            parent = torch.arange(r, device=dev)
            parent[pb[sel]] = pa[sel]
            mass = torch.zeros_like(mass).index_add_(0, parent, mass)
            sums = torch.zeros_like(sums).index_add_(0, parent, sums)
            root = parent[root]
            na, nb = parent[pa], parent[pb]
            keep = na != nb
            pa, pb, beta = _pair_weights(torch.minimum(na, nb)[keep] * r + torch.maximum(na, nb)[keep], beta[keep], r)
        region = root[inv]
    mean = sums / mass.clamp_min(torch.finfo(torch.float64).tiny)[:, None]
    return mean[region].view(b, *shape, c).movedim(-1, 1).to(f.dtype).contiguous()


def _pair_weights(keys: torch.Tensor, weights: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Distinct region pairs ``(a, b)``, ``a < b``, from keys ``a * r + b``, with their summed weights."""
    uniq, inv = torch.unique(keys, return_inverse=True)
    total = torch.zeros(uniq.numel(), dtype=weights.dtype, device=weights.device).index_add_(0, inv, weights)
    return uniq // r, uniq % r, total
