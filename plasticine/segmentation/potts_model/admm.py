r"""The image solver: Storath and Weinmann's ADMM splitting of the Potts problem into 1-D problems.

**Image problem** (:func:`potts`). Following Storath and Weinmann (2014), the jump term is split by
direction: with :math:`K` directions (copies :math:`u_1, \dots, u_K` of :math:`u`) one minimises
:math:`\sum_k K \omega_k \gamma J_k(u_k) + \lVert u_k - f \rVert_w^2` subject to :math:`u_i = u_j`
by ADMM (augmented Lagrangian with multipliers :math:`\lambda_{ij}` for :math:`i < j` and coupling
:math:`\mu`). Each copy's update is a set of independent 1-D Potts problems along its direction,

.. math::

    u_k \leftarrow \operatorname*{argmin}_u \; K \omega_k \gamma J_k(u)
    + \Bigl\lVert u - \frac{w f + \tfrac K2 \bigl(\mu \sum_{j \neq k} u_j
    - \sum_{j > k} \lambda_{kj} + \sum_{j < k} \lambda_{jk}\bigr)}{w + \tfrac{K(K-1)}{2} \mu}
    \Bigr\rVert^2_{w + K(K-1)\mu/2},

taken in turn (Gauss-Seidel: each uses the newest other copies), then
:math:`\lambda_{ij} \leftarrow \lambda_{ij} + \mu (u_i - u_j)` and :math:`\mu \leftarrow 2 \mu`
(starting from :math:`\mu = 0.01 \gamma`), until
:math:`\sum_{i<j} \lVert u_i - u_j \rVert^2 \le \text{tol} \, \lVert f \rVert^2`. For two directions
this is exactly the paper's scheme (penalty :math:`2\gamma` per direction,
:math:`u = \text{Potts}((w f + \mu v - \lambda) / (w + \mu))`,
:math:`v = \text{Potts}((w f + \mu u + \lambda) / (w + \mu))`); for the 8-neighbourhood it gives
penalties :math:`4(\sqrt 2 - 1)\gamma` and :math:`4(1 - \sqrt 2 / 2)\gamma` and the six multipliers
of the original Pottslab code. Every line of every image of the batch is one column of the 1-D
solver; each image stops at its own convergence, so results do not depend on the batch.

The result is then refitted and its regions merged (:mod:`~plasticine.segmentation.potts_model.regions`).
Since ADMM is a heuristic for an NP-hard problem, an image whose result has a higher energy than the
constant image (its weighted mean) gets the constant image instead, so the result is never worse
than that trivial candidate.

Reference:
    M. Storath, A. Weinmann, "Fast partitioning of vector-valued images", SIAM J. Imaging Sci.
    7(3), 1826-1852, 2014.
"""

from __future__ import annotations

import math

import torch

from ...core.shapes import check_shape
from .energy import potts_energy
from .line_solver import LineBackend, _check_gamma, _solve_lines, line_backend
from .neighborhoods import Neighborhood, _Direction, _directions
from .regions import _connected_regions, _refit_regions

__all__ = ["potts"]


def potts(
    image: torch.Tensor,
    gamma: float,
    weights: torch.Tensor | None = None,
    *,
    neighborhood: Neighborhood = "axes",
    max_iter: int = 100,
    mu_init: float | None = None,
    mu_step: float = 2.0,
    tol: float = 1e-10,
    merge_tol: float = 1e-3,
    merge_regions: bool = True,
    backend: LineBackend = "auto",
) -> torch.Tensor:
    r"""Piecewise-constant L2-Potts partition of images, 2D and 3D, by ADMM over 1-D problems.

    Minimises (approximately: the problem is NP-hard) the energy of :func:`potts_energy` with
    Storath and Weinmann's splitting into 1-D problems along rows, columns (and depth, and in 2D
    optionally both diagonals), each solved exactly by the dynamic programme of :func:`potts_1d`.
    See the module notes for the scheme and its stopping rule, and
    :mod:`~plasticine.segmentation.potts_model.regions` for the final refit.

    Args:
        image: images, any intensity scale (vector-valued with ``C > 1``: channels share the jumps).
        gamma: jump penalty per pixel (not rescaled; see :func:`pixel_gamma`), ``> 0``.
        weights: non-negative data weights ``(B, 1, *S)``; None means all ones. The result does
            not depend on the data where the weight is 0 (a region without weight gets 0).
        neighborhood: ``"axes"`` (4/6-neighbourhood) or ``"diagonals"`` (2D 8-neighbourhood,
            near-isotropic weights).
        max_iter: most ADMM iterations; an image that has not converged by then returns its
            row-direction copy (refitted).
        mu_init: initial coupling; None means ``0.01 * gamma``.
        mu_step: factor by which the coupling grows each iteration, ``> 1``.
        tol: stop when :math:`\sum_{i<j} \lVert u_i - u_j \rVert^2 \le \text{tol} \sum_p w \lVert f \rVert^2`.
        merge_tol: neighbours closer than ``merge_tol`` times the image's intensity range form one
            region in the final refit; 0 joins only exactly equal values.
        merge_regions: after the refit, join adjacent regions greedily while a join lowers the
            energy (exact energy change, rounds of mutually best pairs; see
            :mod:`~plasticine.segmentation.potts_model.regions`).
            False keeps the ADMM partition as it is.
        backend: the 1-D solver, ``"auto"`` (compiled on CPU tensors when numba is importable,
            else the tensor path), ``"numba"`` or ``"torch"``; see
            :func:`~plasticine.segmentation.potts_model.line_solver.line_backend`. Both give the
            same result.

    Returns:
        The piecewise-constant image, same shape and dtype as ``image``.

    Raises:
        ValueError: on a shape or setting that does not fit.

    Shape:
        image: ``(B, C, *S)``; weights: ``(B, 1, *S)``; out: ``(B, C, *S)``.

    Reference:
        Storath and Weinmann, "Fast partitioning of vector-valued images", SIAM J. Imaging Sci.
        7(3), 2014 (Algorithm 1 and its 8-neighbourhood variant).
    """
    bind = check_shape(image, "B C *S", "image")
    if not image.is_floating_point():
        raise ValueError(f"image: expected a floating dtype, got {image.dtype}")
    gamma = _check_gamma(gamma)
    backend = line_backend(backend, image.device)
    if gamma == 0:
        raise ValueError("gamma: expected a number > 0 (gamma = 0 returns the image itself)")
    if weights is not None:
        check_shape(weights, "B 1 *S", "weights", bindings=bind)
        if bool((weights < 0).any()):
            raise ValueError("weights: expected non-negative values, found a negative one")
        weights = weights.to(dtype=image.dtype, device=image.device)
    if max_iter < 1:
        raise ValueError(f"max_iter: expected a positive integer, got {max_iter}")
    if not mu_step > 1:
        raise ValueError(f"mu_step: expected a number > 1, got {mu_step}")
    if tol < 0 or merge_tol < 0:
        raise ValueError(f"tol, merge_tol: expected numbers >= 0, got {tol}, {merge_tol}")
    mu = 0.01 * gamma if mu_init is None else float(mu_init)
    if not mu > 0:
        raise ValueError(f"mu_init: expected a number > 0, got {mu_init}")
    shape = tuple(image.shape[2:])
    offsets, omegas = _directions(shape, neighborhood)
    dirs = [_Direction(shape, off, image.device) for off in offsets]
    bsz, c = image.shape[:2]
    k = len(dirs)
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]

    f = image
    w = weights
    fw = f if w is None else f * w
    fnorm = (fw * f).flatten(1).sum(1)
    out = f.clone()
    active = torch.arange(bsz, device=f.device)
    if w is None:
        start = f
    else:  # pixels without weight start at the weighted mean, so that their data never enters
        wsum = w.flatten(2).sum(2).clamp_min(torch.finfo(f.dtype).tiny)
        wmean = (fw.flatten(2).sum(2) / wsum).view(bsz, c, *([1] * len(shape)))
        start = torch.where(w > 0, f, wmean)
    copies = [start.clone() for _ in range(k)]
    lams = {p: torch.zeros_like(f) for p in pairs}
    for _ in range(max_iter):
        den_add = k * (k - 1) / 2 * mu
        for i in range(k):
            num = sum(copies[j] for j in range(k) if j != i) * mu
            for (p, q), lam in lams.items():
                if p == i:
                    num = num - lam
                elif q == i:
                    num = num + lam
            num = fw + (k / 2) * num
            # the 1-D data weights are w + K(K-1)/2 mu; uniform ones are folded into gamma
            den = den_add + (1.0 if w is None else w)
            lines = dirs[i].lines(num / den)
            pen = k * omegas[i] * gamma
            lengths = dirs[i].line_lengths(len(active))
            if w is None:
                sol = _solve_lines(lines, None, pen / den, lengths, backend)
            else:
                sol = _solve_lines(lines, dirs[i].lines(den)[..., 0], pen, lengths, backend)
            copies[i] = dirs[i].image(sol, len(active), c)
        err = torch.zeros(len(active), dtype=f.dtype, device=f.device)
        for (p, q), lam in lams.items():
            diff = copies[p] - copies[q]
            lam.add_(diff, alpha=mu)
            err = err + diff.square().flatten(1).sum(1)
        mu *= mu_step
        done = err <= tol * fnorm
        if bool(done.any()):
            out[active[done]] = copies[0][done]
            keep = ~done
            if not bool(keep.any()):
                active = active[keep]
                break
            active = active[keep]
            copies = [x[keep] for x in copies]
            lams = {p: lam[keep] for p, lam in lams.items()}
            f, fw, fnorm = f[keep], fw[keep], fnorm[keep]
            w = None if w is None else w[keep]
    if len(active):
        out[active] = copies[0]
    # intensity range of each image over the pixels that carry weight: the scale of merge_tol
    flat = image.flatten(2)
    if weights is not None:
        used = weights.flatten(2) > 0
        hi = torch.where(used, flat, -math.inf).amax(2)
        lo = torch.where(used, flat, math.inf).amin(2)
        span = torch.where(used.any(2), hi - lo, torch.zeros_like(hi)).amax(1)
    else:
        span = (flat.amax(2) - flat.amin(2)).amax(1)  # (B,)
    scale = torch.where(span > 0, span, torch.ones_like(span)).view(-1, *([1] * (image.dim() - 1)))
    regions = _connected_regions(out / scale, offsets, merge_tol)  # one tolerance per image: unit range
    out = _refit_regions(regions, image, weights, gamma, offsets, omegas, merge_regions)
    # ADMM is a heuristic for an NP-hard problem: keep the constant image where it is better
    wt = torch.ones_like(image[:, :1]) if weights is None else weights
    mean = (image * wt).flatten(2).sum(2) / wt.flatten(2).sum(2).clamp_min(torch.finfo(image.dtype).tiny)
    const = mean.view(*mean.shape, *([1] * len(shape))).expand_as(image)
    worse = potts_energy(out, image, gamma, weights, neighborhood=neighborhood) > potts_energy(
        const, image, gamma, weights, neighborhood=neighborhood
    )
    return torch.where(worse.view(-1, *([1] * (image.dim() - 1))), const, out)
