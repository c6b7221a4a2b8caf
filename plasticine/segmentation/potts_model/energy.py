r"""The L2-Potts energy of a candidate partition: the quantity the solvers minimise.

The (weighted, vector-valued) L2-Potts problem of an image :math:`f : \Omega \to \mathbb{R}^C` is

.. math::

    \min_u \; \gamma \sum_{d \in \mathcal{N}} \omega_d \, \#\{p : u(p + d) \neq u(p)\}
    + \sum_{p \in \Omega} w(p) \, \lVert u(p) - f(p) \rVert_2^2 ,

where :math:`\mathcal{N}` is a set of neighbour offsets with weights :math:`\omega_d`. The minimiser
is piecewise constant: a partition of the image into regions, each carrying the weighted mean of
:math:`f` over it.
"""

from __future__ import annotations

import torch

from ...core.shapes import check_shape
from .line_solver import _check_gamma
from .neighborhoods import Neighborhood, _directions, _shifted_pair

__all__ = ["potts_energy"]


def potts_energy(
    u: torch.Tensor,
    f: torch.Tensor,
    gamma: float,
    weights: torch.Tensor | None = None,
    *,
    neighborhood: Neighborhood = "axes",
    tol: float = 0.0,
) -> torch.Tensor:
    r"""L2-Potts energy of a candidate ``u`` for the data ``f``, one value per image.

    .. math::

        E(u) = \gamma \sum_{d \in \mathcal{N}} \omega_d \, \#\{p : \lVert u(p + d) - u(p) \rVert_\infty > \text{tol}\}
        + \sum_p w(p) \lVert u(p) - f(p) \rVert_2^2,

    with the neighbourhood :math:`\mathcal{N}` and weights :math:`\omega_d` of ``neighborhood`` (see
    :mod:`~plasticine.segmentation.potts_model.neighborhoods`). This is the energy :func:`potts` minimises (with ``tol=0``).

    Args:
        u: candidate image.
        f: data.
        gamma: jump penalty per unit of jump weight (per pixel, not rescaled).
        weights: data weights ``(B, 1, *S)``, non-negative; None means all ones.
        neighborhood: ``"axes"`` or ``"diagonals"`` (2D only).
        tol: values differing by at most ``tol`` (maximum over channels) do not count as a jump.

    Returns:
        float64 energies.

    Shape:
        u, f: ``(B, C, *S)``; weights: ``(B, 1, *S)``; out: ``(B,)``.
    """
    bind = check_shape(f, "B C *S", "f")
    check_shape(u, "B C *S", "u", bindings=bind)
    gamma = _check_gamma(gamma)
    if weights is not None:
        check_shape(weights, "B 1 *S", "weights", bindings=bind)
    offsets, omegas = _directions(tuple(f.shape[2:]), neighborhood)
    u64, f64 = u.double(), f.to(device=u.device, dtype=torch.float64)
    res = (u64 - f64).square().sum(1, keepdim=True)
    if weights is not None:
        res = res * weights.to(device=u.device, dtype=torch.float64)
    energy = res.flatten(1).sum(1)
    for off, om in zip(offsets, omegas):
        a, b = _shifted_pair(u, off)
        jumps = ((a - b).abs().amax(1) > tol).flatten(1).sum(1)
        energy = energy + gamma * om * jumps.double()
    return energy
