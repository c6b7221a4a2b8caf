r"""Jacobian determinant, folding and inverse consistency of displacement fields.

Definitions (fixed, so counts are reproducible):

* The Jacobian of :math:`\phi(p) = p + u(p)` is :math:`J = I + \nabla u` with
  :math:`\partial_j u_i` taken by **central differences** :math:`(u_i(p + e_j) - u_i(p - e_j)) / 2`
  in the interior and **one-sided first-order differences** on the first and last voxel of each
  axis (``numpy.gradient`` with ``edge_order=1``), divided by the voxel spacing. Rows of ``J`` are
  the components ``i``, columns the axes ``j``, both in tensor axis order.
* ``folding_fraction`` is the fraction of voxels with :math:`\det J \le 0` (**non-positive**,
  so a voxel that collapses to zero volume counts as folded).
* ``inverse_consistency_error`` is the Euclidean norm of :math:`\phi \circ \phi^{-1} - \mathrm{Id}`
  (and of :math:`\phi^{-1} \circ \phi - \mathrm{Id}`), in voxels, averaged over both directions.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch

from .shapes import check_shape
from .warp import compose

__all__ = ["spatial_gradient", "jacobian_matrix", "jacobian_determinant", "folding_fraction", "inverse_consistency_error"]

Reduction = Literal["mean", "max", "none"]


def _spacing(spacing: float | Sequence[float], n: int) -> tuple[float, ...]:
    if isinstance(spacing, (int, float)):
        spacing = (float(spacing),) * n
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != n or min(spacing) <= 0:
        raise ValueError(f"spacing: expected one positive number or {n} positive numbers, got {spacing}")
    return spacing


def spatial_gradient(field: torch.Tensor, spacing: float | Sequence[float] = 1.0) -> torch.Tensor:
    """Central-difference gradient (one-sided on the edges) of every channel along every axis.

    Matches ``numpy.gradient(field, *spacing, axis=..., edge_order=1)``.

    Shape:
        field: ``(B, C, *S)``; out: ``(B, C, N, *S)`` with ``out[:, c, j] = d field_c / d x_j``.
    """
    n = check_shape(field, "B C *S", "field")["N"]
    h = _spacing(spacing, n)
    grads = []
    for j in range(n):
        d = 2 + j
        size = field.shape[d]
        if size < 2:
            grads.append(torch.zeros_like(field))
            continue
        inner = (field.narrow(d, 2, size - 2) - field.narrow(d, 0, size - 2)) / (2 * h[j])
        first = (field.narrow(d, 1, 1) - field.narrow(d, 0, 1)) / h[j]
        last = (field.narrow(d, size - 1, 1) - field.narrow(d, size - 2, 1)) / h[j]
        grads.append(torch.cat([first, inner, last], dim=d))
    return torch.stack(grads, dim=2)


def jacobian_matrix(displacement: torch.Tensor, spacing: float | Sequence[float] = 1.0) -> torch.Tensor:
    r"""Jacobian :math:`J = I + \nabla u` of the map :math:`p \mapsto p + u(p)`.

    Args:
        displacement: ``u`` in voxels.
        spacing: voxel size per axis ``h``. The displacement stays in voxels; the result is
            the Jacobian in world units, ``J_ij = delta_ij + (h_i / h_j) d_j u_i``.

    Shape:
        displacement: ``(B, N, *S)``; out: ``(B, *S, N, N)`` with ``out[..., i, j] = d phi_i / d x_j``.
    """
    n = check_shape(displacement, "B N *S", "displacement")["N"]
    h = _spacing(spacing, n)
    g = spatial_gradient(displacement)  # (B, N_i, N_j, *S) in voxels
    if any(x != 1.0 for x in h):
        hs = torch.tensor(h, dtype=g.dtype, device=g.device)
        g = g * (hs.view(1, n, 1, *([1] * n)) / hs.view(1, 1, n, *([1] * n)))
    eye = torch.eye(n, dtype=g.dtype, device=g.device).view(1, n, n, *([1] * n))
    return (g + eye).movedim(1, -1).movedim(1, -1)


def jacobian_determinant(displacement: torch.Tensor) -> torch.Tensor:
    r"""Determinant of the Jacobian of :math:`\phi = \mathrm{Id} + u` at every voxel.

    Central differences inside, one-sided differences on the edges (see the module docs);
    the 2x2 and 3x3 determinants are written out (cofactor expansion), not taken by LU.
    For a displacement in voxels the determinant does not depend on the voxel spacing
    (:math:`\det(I + H G H^{-1}) = \det(I + G)`), so none is taken.

    Shape:
        displacement: ``(B, N, *S)``; out: ``(B, 1, *S)``.

    Example:
        >>> u = torch.zeros(1, 2, 4, 4); u[:, 0] = 0.5 * torch.arange(4.0).view(4, 1)
        >>> jacobian_determinant(u)[0, 0, 1, 1].item()  # stretch by 1.5 along axis 0
        1.5
    """
    n = check_shape(displacement, "B N *S", "displacement")["N"]
    g = spatial_gradient(displacement)
    a = [[g[:, i, j] + (1.0 if i == j else 0.0) for j in range(n)] for i in range(n)]
    if n == 2:
        det = a[0][0] * a[1][1] - a[0][1] * a[1][0]
    else:
        det = (
            a[0][0] * (a[1][1] * a[2][2] - a[1][2] * a[2][1])
            - a[0][1] * (a[1][0] * a[2][2] - a[1][2] * a[2][0])
            + a[0][2] * (a[1][0] * a[2][1] - a[1][1] * a[2][0])
        )
    return det.unsqueeze(1)


def _reduce(values: torch.Tensor, mask: torch.Tensor | None, reduction: str) -> torch.Tensor:
    """Reduce ``(B, 1, *S)`` values over space, optionally inside a mask, to ``(B,)``."""
    if reduction == "none":
        return values
    if reduction not in ("mean", "max"):
        raise ValueError(f"reduction: expected 'mean', 'max' or 'none', got {reduction!r}")
    flat = values.flatten(1)
    if mask is None:
        return flat.mean(1) if reduction == "mean" else flat.amax(1)
    check_shape(mask, "B 1 *S", "mask", bindings={"B": values.shape[0], "S": tuple(values.shape[2:])})
    m = mask.flatten(1).to(flat.dtype)
    if reduction == "mean":
        return (flat * m).sum(1) / m.sum(1).clamp(min=1)
    return torch.where(m > 0, flat, torch.full_like(flat, -torch.inf)).amax(1)


def folding_fraction(displacement: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    r"""Fraction of voxels where :math:`\det J \le 0` (non-positive), per batch element.

    Uses :func:`jacobian_determinant` (central differences, one-sided at the edges).

    Shape:
        displacement: ``(B, N, *S)``; mask: ``(B, 1, *S)`` or None; out: ``(B,)`` in [0, 1].
    """
    folded = (jacobian_determinant(displacement) <= 0).to(displacement.dtype)
    return _reduce(folded, mask, "mean")


def inverse_consistency_error(
    displacement: torch.Tensor,
    inverse: torch.Tensor,
    mask: torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    r"""How far two fields are from being each other's inverse, in voxels.

    :math:`e(p) = \tfrac12 \left(\lVert(\phi \circ \phi^{-1})(p) - p\rVert
    + \lVert(\phi^{-1} \circ \phi)(p) - p\rVert\right)`, with compositions by :func:`compose`
    (linear interpolation, border padding).

    Args:
        displacement: ``u`` of :math:`\phi`.
        inverse: ``u`` of :math:`\phi^{-1}`.
        mask: optional region to average over.
        reduction: ``"mean"`` or ``"max"`` over the voxels (``(B,)``), or ``"none"`` (the map).

    Shape:
        displacement, inverse: ``(B, N, *S)``; mask: ``(B, 1, *S)``; out: ``(B,)`` or ``(B, 1, *S)``.
    """
    dims = check_shape(displacement, "B N *S", "displacement")
    check_shape(inverse, "B N *S", "inverse", bindings=dims)
    e1 = compose(displacement, inverse).norm(dim=1, keepdim=True)
    e2 = compose(inverse, displacement).norm(dim=1, keepdim=True)
    return _reduce(0.5 * (e1 + e2), mask, reduction)
