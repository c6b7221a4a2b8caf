r"""Regularisers of displacement fields: gradient smoothness and bending energy.

Both take a displacement :math:`u` in voxels (plasticine's convention) and a voxel ``spacing``
:math:`h`. With a spacing, they are evaluated in physical units: component :math:`i` is
converted to :math:`h_i u_i` and derivatives along axis :math:`j` are divided by :math:`h_j`, so
the same continuous deformation sampled at two resolutions gives (up to discretisation error)
the same value and a regularisation weight does not need re-tuning per resolution.

In formulas, with :math:`h = (h_1, \dots, h_N)` the voxel size in mm in the tensor's axis order
(the column norms of the image's voxel-to-world affine, :func:`plasticine.io.voxel_spacing`):
the displacement in mm is :math:`u^{mm}_i = h_i u_i` and a derivative in mm is the voxel
derivative divided by the spacing, :math:`\partial / \partial x^{mm}_j = h_j^{-1} \partial /
\partial x_j`, so :math:`\partial u^{mm}_i / \partial x^{mm}_j = (h_i / h_j)\, \partial u_i /
\partial x_j`. The gradient energy is dimensionless and does not change when every spacing is
scaled by the same :math:`s`; the bending energy (second derivatives, 1/mm) scales by
:math:`s^{-2}`. ``spacing=None`` or ``1`` gives voxel units, the values of a unit spacing.

Both are means over batch, components and positions of sums over derivative terms, with
compact finite-difference stencils that see the highest frequencies (a checkerboard field has
zero central differences but is penalised here).
"""

from __future__ import annotations

import numbers
from typing import Sequence

import torch
from torch import nn

from ..core import check_shape
from ..core.config import Configurable
from ..core.grid import constant_vector
from ..core.shapes import spacing_tuple
from ._common import no_autocast, promote

__all__ = ["gradient_smoothness", "bending_energy", "GradientSmoothness", "BendingEnergy"]


def _prepare(displacement: torch.Tensor, spacing: float | Sequence[float] | None, min_size: int, what: str):
    """Checked field in physical units ``h_i u_i`` (float32 at least), its ``N`` and the spacing."""
    dims = check_shape(displacement, "B N *S", "displacement", floating=True)
    n = dims["N"]
    h = spacing_tuple(spacing, n)
    if min(dims["S"]) < min_size:
        raise ValueError(
            f"displacement: {what} needs at least {min_size} voxels along every spatial axis, got shape "
            f"{tuple(displacement.shape)}"
        )
    u = promote(displacement)
    if any(x != h[0] for x in h):
        u = u * constant_vector(h, u, n)
    elif h[0] != 1.0:
        u = u * h[0]
    return u, n, h


def _mean_square(d: torch.Tensor, factor: float) -> torch.Tensor:
    """``mean((factor * d)^2)`` over all entries: one fused dot product, no squared copy.

    Shape:
        d: any (contiguous, as ``torch.diff`` returns); out: ``()``.
    """
    flat = d.reshape(-1)
    return torch.dot(flat, flat) * (factor * factor / flat.numel())


def gradient_smoothness(displacement: torch.Tensor, spacing: float | Sequence[float] | None = 1.0) -> torch.Tensor:
    r"""Mean squared first derivatives of a displacement field (forward differences).

    .. math::
        R(u) = \sum_{j=1}^{N} \operatorname{mean}_{b, i, p}
        \left(\frac{h_i\,(u_i(p + e_j) - u_i(p))}{h_j}\right)^2,

    the mean taken over the batch, the components :math:`i` and the positions :math:`p` where the
    forward difference along axis :math:`j` exists (all but the last slice of that axis). It is the
    smoothness term of the paper, a discrete :math:`\frac{1}{N} \frac{1}{|\Omega|}\int \lVert \nabla u \rVert_F^2`:
    for :math:`u_i = a\, x_j` (in physical units) it equals :math:`a^2 / N`.

    Args:
        displacement: the field ``u`` in voxels.
        spacing: voxel size per axis in the tensor's axis order (one number or one per axis, in
            mm for a value in mm); None or 1 gives voxel units.

    Returns:
        A scalar ``>= 0``.

    Raises:
        ValueError: on a shape other than ``(B, N, *S)``, fewer than 2 voxels along an axis, or
            a spacing that is not None, one positive finite number or ``N`` of them.

    Shape:
        displacement: ``(B, N, *S)``; out: ``()``.

    Example:
        >>> u = torch.zeros(1, 2, 8, 8); u[:, 1] = 0.5 * torch.arange(8.0)  # u_x = x / 2
        >>> gradient_smoothness(u).item()  # (1/2)^2 / 2 components
        0.125
    """
    u, n, h = _prepare(displacement, spacing, 2, "gradient_smoothness")
    with no_autocast(u.device):
        # components in physical units (h_i u_i), differentiated along x_j (/ h_j)
        terms = [_mean_square(torch.diff(u, dim=2 + j), 1.0 / h[j]) for j in range(n)]
        return torch.stack(terms).sum()


def bending_energy(displacement: torch.Tensor, spacing: float | Sequence[float] | None = 1.0) -> torch.Tensor:
    r"""Mean bending energy of a displacement field, with compact second differences.

    .. math::
        R(u) = \sum_{j} \operatorname{mean}\left(\partial_{jj} u\right)^2
        + 2 \sum_{j < k} \operatorname{mean}\left(\partial_{jk} u\right)^2,

    each mean over the batch, the components and the positions where the stencil fits, with

    * pure terms :math:`\partial_{jj} u(p) = (u(p + e_j) - 2 u(p) + u(p - e_j)) / h_j^2`
      (stencil ``[1, -2, 1]``),
    * mixed terms :math:`\partial_{jk} u(p) = (u(p + e_j + e_k) - u(p + e_j) - u(p + e_k) + u(p))
      / (h_j h_k)` (the 2x2 forward-difference stencil),

    and the components in physical units (:math:`h_i u_i`). Unlike central differences
    (stencil ``[1, 0, -1] / 2`` applied twice), these stencils penalise a checkerboard field.
    For :math:`u_i = a\, x_j^2 / 2` the value is :math:`a^2 / N` exactly; for
    :math:`u_i = a\, x_j x_k` (:math:`j \ne k`) it is :math:`2 a^2 / N`.

    References:
        D. Rueckert, L. I. Sonoda, C. Hayes, D. L. G. Hill, M. O. Leach, D. J. Hawkes, "Nonrigid
        registration using free-form deformations: application to breast MR images", IEEE TMI
        18(8), 1999.

    Args:
        displacement: the field ``u`` in voxels.
        spacing: voxel size per axis in the tensor's axis order (one number or one per axis, in
            mm for a value in mm); None or 1 gives voxel units.

    Returns:
        A scalar ``>= 0``.

    Raises:
        ValueError: on a shape other than ``(B, N, *S)``, fewer than 3 voxels along an axis, or
            a spacing that is not None, one positive finite number or ``N`` of them.

    Shape:
        displacement: ``(B, N, *S)``; out: ``()``.

    Example:
        >>> x = torch.arange(8.0)
        >>> u = torch.zeros(1, 2, 8, 8); u[:, 1] = 0.5 * x**2  # u_x = x^2 / 2: d2u/dx2 = 1
        >>> bending_energy(u).item()  # 1 / 2 components
        0.5
    """
    u, n, h = _prepare(displacement, spacing, 3, "bending_energy")
    with no_autocast(u.device):
        total = u.new_zeros(())
        for j in range(n):
            first = torch.diff(u, dim=2 + j)  # forward differences along x_j
            for k in range(j, n):
                # [1, -2, 1] for k == j, the 2x2 forward stencil for k != j (counted twice)
                second = torch.diff(first, dim=2 + k)
                term = _mean_square(second, 1.0 / (h[j] * h[k]))
                total = total + (term if k == j else 2.0 * term)
        return total


def _stored_spacing(spacing: float | Sequence[float] | None) -> float | tuple[float, ...] | None:
    """The constructor's spacing, checked (its length is checked against ``N`` at the call)."""
    if spacing is None:
        return None
    if hasattr(spacing, "tolist") and not isinstance(spacing, str):  # numpy arrays, tensors
        spacing = spacing.tolist()
    if isinstance(spacing, numbers.Real) and not isinstance(spacing, bool):
        return spacing_tuple(spacing, 1)[0]
    count = len(spacing) if isinstance(spacing, Sequence) and not isinstance(spacing, str) else 1
    return spacing_tuple(spacing, count)


class GradientSmoothness(Configurable, nn.Module):
    r"""Mean squared forward differences of a displacement; see :func:`gradient_smoothness`.

    Args:
        spacing: voxel size per axis (one number or one per axis; None or 1: voxel units). A
            call may give its own, ``module(u, spacing=h)`` (the iterative backend passes the
            spacing of each resolution level).

    Shape:
        displacement: ``(B, N, *S)``; out: ``()``.

    Example:
        >>> GradientSmoothness()(torch.zeros(1, 3, 4, 4, 4)).item()
        0.0
    """

    def __init__(self, spacing: float | Sequence[float] | None = 1.0) -> None:
        super().__init__()
        self.spacing = _stored_spacing(spacing)

    def forward(self, displacement: torch.Tensor, spacing: float | Sequence[float] | None = None) -> torch.Tensor:
        """The smoothness of ``displacement``; ``spacing``, when given, replaces the stored one for this call."""
        return gradient_smoothness(displacement, self.spacing if spacing is None else spacing)

    def extra_repr(self) -> str:
        return f"spacing={self.spacing}"


class BendingEnergy(Configurable, nn.Module):
    r"""Bending energy of a displacement with compact stencils; see :func:`bending_energy`.

    Args:
        spacing: voxel size per axis (one number or one per axis; None or 1: voxel units). A
            call may give its own, ``module(u, spacing=h)`` (the iterative backend passes the
            spacing of each resolution level).

    Shape:
        displacement: ``(B, N, *S)``; out: ``()``.

    Example:
        >>> BendingEnergy(spacing=(1.0, 0.5))(torch.zeros(1, 2, 5, 5)).item()
        0.0
    """

    def __init__(self, spacing: float | Sequence[float] | None = 1.0) -> None:
        super().__init__()
        self.spacing = _stored_spacing(spacing)

    def forward(self, displacement: torch.Tensor, spacing: float | Sequence[float] | None = None) -> torch.Tensor:
        """The bending energy of ``displacement``; ``spacing``, when given, replaces the stored one for this call."""
        return bending_energy(displacement, self.spacing if spacing is None else spacing)

    def extra_repr(self) -> str:
        return f"spacing={self.spacing}"
