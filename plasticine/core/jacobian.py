r"""Jacobian determinant, folding and inverse consistency of displacement fields.

Definitions (fixed, so counts are reproducible):

* The Jacobian of :math:`\phi(p) = p + u(p)` is :math:`J = I + \nabla u` with
  :math:`\partial_j u_i` taken by **central differences** :math:`(u_i(p + e_j) - u_i(p - e_j)) / 2`
  in the interior and **one-sided first-order differences** on the first and last voxel of each
  axis (``numpy.gradient`` with ``edge_order=1``), divided by the voxel spacing. Rows of ``J`` are
  the components ``i``, columns the axes ``j``, both in tensor axis order.
* ``folding_fraction`` is the fraction of voxels with :math:`\det J \le 0` (**non-positive**,
  so a voxel that collapses to zero volume counts as folded).
* ``one_sided_jacobian_determinants`` / ``non_diffeomorphic_volume`` / ``folding_report``: the
  Jacobian determinants of every one-sided difference stencil (the simplices of each pixel or voxel
  cell) and the non-diffeomorphic volume of the LUMIR challenge (Liu et al. 2022), see
  :func:`one_sided_jacobian_determinants`.
* ``inverse_consistency_error`` is the Euclidean norm of :math:`\phi \circ \phi^{-1} - \mathrm{Id}`
  (and of :math:`\phi^{-1} \circ \phi - \mathrm{Id}`), in voxels, averaged over both directions.
"""

from __future__ import annotations

import itertools
from typing import Literal, NamedTuple, Sequence

import torch
import torch.nn.functional as F

from .grid import constant_vector, _vector_length, working_dtype
from .shapes import check_shape, spacing_tuple
from .warp import compose

__all__ = [
    "spatial_gradient",
    "jacobian_matrix",
    "jacobian_determinant",
    "folding_fraction",
    "one_sided_jacobian_determinants",
    "non_diffeomorphic_volume",
    "FoldingReport",
    "folding_report",
    "inverse_consistency_error",
]

Reduction = Literal["mean", "max", "none"]


def _twice_gradient(field: torch.Tensor) -> torch.Tensor:
    """``2 h`` times :func:`spatial_gradient` with unit spacing: the undivided central differences.

    ``f(p + e_j) - f(p - e_j)`` inside, twice the one-sided difference on the edges. Without
    autograd the differences are written straight into the result (no temporaries).

    Shape:
        field: ``(B, C, *S)``; out: ``(B, C, N, *S)``.
    """
    n = field.dim() - 2
    # composite ops under autograd and under torch.compile (which cannot trace the strided out= writes)
    track = (torch.is_grad_enabled() and field.requires_grad) or torch.compiler.is_compiling()
    parts = []
    out = None if track else torch.empty(field.shape[0], field.shape[1], n, *field.shape[2:], dtype=field.dtype, device=field.device)
    for j in range(n):
        d = 2 + j
        size = field.shape[d]
        if size < 2:
            if track:
                parts.append(torch.zeros_like(field))
            else:
                out[:, :, j].zero_()
            continue
        f0, f1 = field.narrow(d, 0, 1), field.narrow(d, 1, 1)
        g0, g1 = field.narrow(d, size - 2, 1), field.narrow(d, size - 1, 1)
        hi, lo = field.narrow(d, 2, size - 2), field.narrow(d, 0, size - 2)
        if track:
            parts.append(torch.cat([2.0 * (f1 - f0), hi - lo, 2.0 * (g1 - g0)], dim=d))
        else:
            o = out[:, :, j]
            torch.sub(hi, lo, out=o.narrow(d, 1, size - 2))
            torch.sub(f1, f0, out=o.narrow(d, 0, 1)).mul_(2.0)
            torch.sub(g1, g0, out=o.narrow(d, size - 1, 1)).mul_(2.0)
    return torch.stack(parts, dim=2) if track else out


def spatial_gradient(field: torch.Tensor, spacing: float | Sequence[float] = 1.0) -> torch.Tensor:
    r"""Central-difference gradient (one-sided on the edges) of every channel along every axis.

    :math:`\partial_j f(p) \approx (f(p + e_j) - f(p - e_j)) / 2h_j` inside,
    :math:`(f(p + e_j) - f(p)) / h_j` on the first and :math:`(f(p) - f(p - e_j)) / h_j` on the
    last voxel of axis ``j``; an axis of size 1 has zero gradient. Matches
    ``numpy.gradient(field, *spacing, axis=..., edge_order=1)`` (which rejects size 1).

    Args:
        field: any ``(B, C, *S)`` tensor (an image or a displacement).
        spacing: voxel size ``h`` along each axis (one number for all).

    Returns:
        The gradient, ``out[:, c, j] = d field_c / d x_j``.

    Shape:
        field: ``(B, C, *S)``; out: ``(B, C, N, *S)``.

    Example:
        >>> f = torch.tensor([0.0, 1.0, 4.0, 9.0]).view(1, 1, 1, 4).expand(1, 1, 2, 4)
        >>> spatial_gradient(f)[0, 0, 1, 0]
        tensor([1., 2., 4., 5.])
    """
    n = check_shape(field, "B C *S", "field", floating=True)["N"]
    h = spacing_tuple(spacing, n)
    g = _twice_gradient(field)
    scale = constant_vector([0.5 / x for x in h], g, n).unsqueeze(0)
    return g.mul_(scale) if not (torch.is_grad_enabled() and g.requires_grad) else g * scale


def jacobian_matrix(displacement: torch.Tensor, spacing: float | Sequence[float] = 1.0) -> torch.Tensor:
    r"""Jacobian :math:`J = I + \nabla u` of the map :math:`p \mapsto p + u(p)`.

    Derivatives as in :func:`spatial_gradient`. With a voxel size the displacement stays in
    voxels and the result is the Jacobian in world units,
    :math:`J_{ij} = \delta_{ij} + (h_i / h_j)\, \partial_j u_i` (:math:`H (I + \nabla u) H^{-1}`
    with :math:`H = \mathrm{diag}(h)`), whose determinant equals the voxel one.

    Args:
        displacement: ``u`` in voxels, channel ``i`` along axis ``i``.
        spacing: voxel size ``h`` per axis (one number for all).

    Returns:
        ``out[..., i, j] = d phi_i / d x_j`` at every voxel.

    Shape:
        displacement: ``(B, N, *S)``; out: ``(B, *S, N, N)``.
    """
    n = check_shape(displacement, "B N *S", "displacement", floating=True)["N"]
    h = spacing_tuple(spacing, n)
    g = spatial_gradient(displacement)  # (B, N_i, N_j, *S) in voxels
    if any(x != 1.0 for x in h):
        ratio = [[h[i] / h[j] for j in range(n)] for i in range(n)]
        g = g * constant_vector([r for row in ratio for r in row], g, n).view(1, n, n, *([1] * n))
    eye = torch.eye(n, dtype=g.dtype, device=g.device).view(1, n, n, *([1] * n))
    return (g + eye).movedim(1, -1).movedim(1, -1)


def jacobian_determinant(displacement: torch.Tensor) -> torch.Tensor:
    r"""Determinant of the Jacobian of :math:`\phi = \mathrm{Id} + u` at every voxel.

    :math:`\det J(p)` with :math:`J = I + \nabla u` and derivatives as in :func:`spatial_gradient`
    (central inside, one-sided on the edges, see the module docs); the 2x2 and 3x3 determinants
    are written out (cofactor expansion), not taken by LU. The work is done on the undivided
    differences :math:`D = 2 \nabla u` (:math:`\det J = 2^{-N} \det(2I + D)`, exact in binary
    floating point), which saves a pass per entry. For a displacement in voxels the determinant
    does not depend on the voxel spacing (:math:`\det(I + H G H^{-1}) = \det(I + G)`), so none is
    taken.

    Args:
        displacement: ``u`` in voxels, channel ``i`` along axis ``i``.

    Returns:
        :math:`\det J` per voxel; ``> 0`` where :math:`\phi` preserves orientation. A
        float16/bfloat16 displacement is differentiated and its determinant formed in float32
        (the result is float32; in 8 mantissa bits :math:`1 - \det J` of a small deformation is
        lost), also under :func:`torch.autocast`.

    Shape:
        displacement: ``(B, N, *S)``; out: ``(B, 1, *S)``.

    Example:
        >>> u = torch.zeros(1, 2, 4, 4); u[:, 0] = 0.5 * torch.arange(4.0).view(4, 1)
        >>> jacobian_determinant(u)[0, 0, 1, 1].item()  # stretch by 1.5 along axis 0
        1.5
    """
    n = check_shape(displacement, "B N *S", "displacement", floating=True)["N"]
    g = _twice_gradient(displacement.to(working_dtype(displacement.dtype)))  # (B, N_i, N_j, *S) = 2 du_i/dx_j
    diag = g.diagonal(dim1=1, dim2=2)
    if (torch.is_grad_enabled() and g.requires_grad) or torch.compiler.is_compiling():
        g = g + 2.0 * torch.eye(n, dtype=g.dtype, device=g.device).view(1, n, n, *([1] * n))
    else:
        diag.add_(2.0)
    a = [[g[:, i, j] for j in range(n)] for i in range(n)]
    if n == 2:
        det = torch.addcmul(a[0][0] * a[1][1], a[0][1], a[1][0], value=-1.0)
        return det.mul_(0.25).unsqueeze(1) if not det.requires_grad else (0.25 * det).unsqueeze(1)
    c0 = torch.addcmul(a[1][1] * a[2][2], a[1][2], a[2][1], value=-1.0)
    c1 = torch.addcmul(a[1][0] * a[2][2], a[1][2], a[2][0], value=-1.0)
    c2 = torch.addcmul(a[1][0] * a[2][1], a[1][1], a[2][0], value=-1.0)
    det = torch.addcmul(torch.addcmul(a[0][0] * c0, a[0][1], c1, value=-1.0), a[0][2], c2)
    return det.mul_(0.125).unsqueeze(1) if not det.requires_grad else (0.125 * det).unsqueeze(1)


def _check_reduction(reduction: str, mask: torch.Tensor | None, like: torch.Tensor) -> None:
    """Check ``reduction`` and a ``(B, 1, *S)`` bool or floating ``mask`` against ``like`` ``(B, N, *S)``."""
    if reduction not in ("mean", "max", "none"):
        raise ValueError(f"reduction: expected 'mean', 'max' or 'none', got {reduction!r}")
    if mask is not None:
        check_shape(mask, "B 1 *S", "mask", bindings={"B": like.shape[0], "S": tuple(like.shape[2:])})
        if not (mask.is_floating_point() or mask.dtype == torch.bool):
            raise ValueError(f"mask: expected a bool or floating-point tensor, got dtype {mask.dtype}")


def _reduce(values: torch.Tensor, mask: torch.Tensor | None, reduction: str) -> torch.Tensor:
    """Reduce ``(B, 1, *S)`` values over space, optionally inside a checked mask, to ``(B,)``.

    A NaN in the values or the mask gives NaN (``amax`` propagates NaN; the masked maximum adds
    ``sum(0 * mask)``, which is NaN for a non-finite mask).
    """
    if reduction == "none":
        return values
    flat = values.flatten(1)
    if mask is None:
        return flat.mean(1) if reduction == "mean" else flat.amax(1)
    m = mask.flatten(1).to(flat.dtype)
    if reduction == "mean":
        return (flat * m).sum(1) / m.sum(1).clamp(min=1)
    return torch.where(m > 0, flat, torch.full_like(flat, -torch.inf)).amax(1) + m.mul(0.0).sum(1)


def folding_fraction(displacement: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    r"""Fraction of voxels where :math:`\det J \le 0` (non-positive), per batch element.

    Uses :func:`jacobian_determinant` (central differences, one-sided at the edges).

    Args:
        displacement: ``u`` in voxels.
        mask: optional region; the fraction is taken over its non-zero voxels.

    Returns:
        The folded fraction per batch element.

    Shape:
        displacement: ``(B, N, *S)``; mask: ``(B, 1, *S)`` or None; out: ``(B,)`` in [0, 1].
    """
    check_shape(displacement, "B N *S", "displacement", floating=True)
    _check_reduction("mean", mask, displacement)
    det = jacobian_determinant(displacement)
    folded = (det <= 0).to(det.dtype).add_(det, alpha=0.0)  # NaN where det is not finite
    return _reduce(folded, mask, "mean")


def _stencils(n: int) -> list[tuple[tuple[int, ...], ...]]:
    """The edge offsets of every one-sided stencil, in the order of :func:`one_sided_jacobian_determinants`."""
    eye = [tuple(int(i == j) for i in range(n)) for j in range(n)]
    out = [tuple(tuple(s * e for e in eye[j]) for j, s in enumerate(signs)) for signs in itertools.product((1, -1), repeat=n)]
    if n == 3:  # the central tetrahedra of the two five-tetrahedron splits of a cube
        out.append(((-1, -1, 0), (-1, 0, -1), (0, -1, -1)))
        out.append(((1, 1, 0), (0, 1, 1), (1, 0, 1)))
    return out


def one_sided_jacobian_determinants(displacement: torch.Tensor) -> torch.Tensor:
    r"""Jacobian determinant of :math:`\phi = \mathrm{Id} + u` on every simplex that meets a voxel.

    The definition of Liu et al. (the non-diffeomorphic volume of the LUMIR challenge). For a
    stencil of edge offsets :math:`o_1, \dots, o_N` (integer vectors) the simplex
    :math:`\{p, p + o_1, \dots, p + o_N\}` is mapped linearly by the piecewise-linear interpolant
    of :math:`\phi`, with Jacobian determinant

    .. math::

        r = \frac{\det\bigl[\phi(p + o_1) - \phi(p), \dots, \phi(p + o_N) - \phi(p)\bigr]}
                 {\det\bigl[o_1, \dots, o_N\bigr]},

    the signed volume ratio of the simplex (so :math:`r = 1` for the identity and
    :math:`r = \det A` on every stencil for an affine map :math:`p \mapsto A p + b`). The stencils:

    * 2D, ``K = 4``: forward or backward differences per axis, channel ``k`` for the signs
      ``(+, +), (+, -), (-, +), (-, -)`` (axis order); these are the four triangles of the two
      diagonal splits of each pixel square.
    * 3D, ``K = 10``: the eight sign combinations ``(+, +, +), (+, +, -), ..., (-, -, -)`` (the
      corner tetrahedra) and the two central tetrahedra of the two five-tetrahedron splits of a
      voxel cube, with offsets :math:`(-1,-1,0), (-1,0,-1), (0,-1,-1)` (Liu et al.'s
      :math:`J_1^*`) and :math:`(1,1,0), (0,1,1), (1,0,1)` (:math:`J_2^*`).

    As in the reference implementation (``digital_diffeomorphism``), the displacement is extended
    by one voxel with its edge values (so an offset that leaves the grid sees the identity there).
    A voxel is diffeomorphic in the digital sense when every :math:`r > 0`.

    Reference: Y. Liu, J. Chen, S. Wei, A. Carass, J. Prince, "On finite difference Jacobian
    computation in deformable image registration", International Journal of Computer Vision
    (2024), arXiv:2212.06060.

    Args:
        displacement: ``u`` in voxels, channel ``i`` along axis ``i`` (2D or 3D).

    Returns:
        :math:`r` per stencil (channel) and voxel.

    Raises:
        ValueError: for a displacement that is not a floating 2D or 3D field.

    Shape:
        displacement: ``(B, N, *S)`` with ``N`` 2 or 3; out: ``(B, K, *S)``, ``K`` = 4 (2D) or 10 (3D).

    Example:
        >>> u = torch.zeros(1, 2, 3, 3); u[0, 0, 1, 1] = 1.5  # one pixel pushed past its neighbour
        >>> one_sided_jacobian_determinants(u)[0, :, 1, 1]
        tensor([-0.5000, -0.5000,  2.5000,  2.5000])
    """
    n = check_shape(displacement, "B N *S", "displacement", floating=True)["N"]
    if n not in (2, 3):
        raise ValueError(f"displacement: expected a 2D or 3D field (N = 2 or 3 channels), got N = {n}")
    shape = displacement.shape[2:]
    padded = F.pad(displacement, [1, 1] * n, mode="replicate")
    centre = padded[(slice(None), slice(None)) + tuple(slice(1, 1 + k) for k in shape)]

    def edge(o: tuple[int, ...]) -> list[torch.Tensor]:
        # phi(p + o) - phi(p), one tensor (B, *S) per component
        d = padded[(slice(None), slice(None)) + tuple(slice(1 + a, 1 + a + k) for a, k in zip(o, shape))] - centre
        return [d[:, i] + o[i] if o[i] else d[:, i] for i in range(n)]

    dets = []
    for offsets in _stencils(n):
        cols = [edge(o) for o in offsets]  # cols[j][i] = entry (i, j)
        a = [[cols[j][i] for j in range(n)] for i in range(n)]
        if n == 2:
            det = a[0][0] * a[1][1] - a[0][1] * a[1][0]
        else:
            det = (
                a[0][0] * (a[1][1] * a[2][2] - a[1][2] * a[2][1])
                - a[0][1] * (a[1][0] * a[2][2] - a[1][2] * a[2][0])
                + a[0][2] * (a[1][0] * a[2][1] - a[1][1] * a[2][0])
            )
        reference = round(float(torch.linalg.det(torch.tensor(offsets, dtype=torch.float64).T)))
        dets.append(det if reference == 1 else det / reference)
    return torch.stack(dets, dim=1)


def _simplex_volumes(n: int) -> list[float]:
    """Volume of each stencil's simplex in voxels (the order of :func:`_stencils`)."""
    return [0.5] * 4 if n == 2 else [1.0 / 6.0] * 8 + [1.0 / 3.0] * 2


def non_diffeomorphic_volume(displacement: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    r"""Non-diffeomorphic volume (NDV, area in 2D) as a fraction of the voxels, per batch element.

    With :math:`r_k(p)` from :func:`one_sided_jacobian_determinants` and :math:`V_k` the volume of
    stencil :math:`k`'s simplex in voxels (2D: :math:`\tfrac12` each; 3D: :math:`\tfrac16` for the
    corner and :math:`\tfrac13` for the central tetrahedra),

    .. math::

        \mathrm{NDV} = \frac{1}{|M|} \sum_{p \in M} \sum_k \tfrac12 V_k \max(-r_k(p), 0),

    the inverted volume of the piecewise-linear interpolant of :math:`\phi`, averaged over the two
    ways of splitting each cell into simplices (each split's simplices cover the cell once, hence
    the :math:`\tfrac12`), over the voxels of the mask :math:`M` (all voxels without one). This is
    Liu et al.'s NDV/NDA divided by the voxel count; the LUMIR challenge reports it in percent
    (100 times this). It is 0 exactly when no simplex is inverted, and grows with how much volume
    folds, not only with how many voxels.

    Reference: Y. Liu et al., "On finite difference Jacobian computation in deformable image
    registration", IJCV 2024, arXiv:2212.06060.

    Args:
        displacement: ``u`` in voxels (2D or 3D).
        mask: optional region; the sum runs over its non-zero voxels and is divided by their number.

    Returns:
        The NDV fraction per batch element (in voxels per voxel, ``>= 0``).

    Shape:
        displacement: ``(B, N, *S)``; mask: ``(B, 1, *S)`` or None; out: ``(B,)``.
    """
    r = one_sided_jacobian_determinants(displacement)
    _check_reduction("mean", mask, displacement)
    return _reduce(_inverted_volume(r), mask, "mean")


def _inverted_volume(r: torch.Tensor) -> torch.Tensor:
    """``sum_k V_k max(-r_k, 0) / 2`` per voxel from ``(B, K, *S)`` determinants, ``(B, 1, *S)``."""
    n = r.dim() - 2
    weights = constant_vector([0.5 * v for v in _simplex_volumes(n)], r, n)
    return (torch.clamp(-r, min=0.0) * weights).sum(1, keepdim=True)


class FoldingReport(NamedTuple):
    r"""Folding of a displacement by three definitions, each ``(B,)`` (see :func:`folding_report`).

    Fields: ``central``, the fraction of voxels with central-difference :math:`\det J \le 0`
    (:func:`folding_fraction`); ``one_sided``, the fraction of voxels where some one-sided
    stencil has :math:`r \le 0` (:func:`one_sided_jacobian_determinants`);
    ``non_diffeomorphic_volume``, the NDV fraction (:func:`non_diffeomorphic_volume`).
    """

    central: torch.Tensor
    one_sided: torch.Tensor
    non_diffeomorphic_volume: torch.Tensor


def folding_report(displacement: torch.Tensor, mask: torch.Tensor | None = None) -> FoldingReport:
    r"""The central-difference folding count beside the one-sided (digital diffeomorphism) measures.

    The central difference :math:`(u(p + e_j) - u(p - e_j)) / 2` skips the voxel itself, so it
    can miss a fold (a voxel pushed past its neighbours keeps :math:`\det J = 1`) and flag voxels
    of a map whose piecewise-linear interpolant is invertible. The one-sided stencils test every
    simplex of the interpolant (Liu et al. 2022, arXiv:2212.06060): the map is a digital
    diffeomorphism when ``one_sided`` and ``non_diffeomorphic_volume`` are 0.

    Args:
        displacement: ``u`` in voxels (2D or 3D).
        mask: optional region to count in.

    Returns:
        A :class:`FoldingReport` of three ``(B,)`` fractions; NaN where the field is not finite.

    Shape:
        displacement: ``(B, N, *S)``; mask: ``(B, 1, *S)`` or None; out: three ``(B,)``.

    Example:
        >>> u = torch.zeros(1, 2, 5, 5); u[0, 0, 2, 2] = 1.5
        >>> rep = folding_report(u)
        >>> float(rep.central), float(rep.one_sided), round(float(rep.non_diffeomorphic_volume), 4)
        (0.0, 0.08, 0.02)
    """
    r = one_sided_jacobian_determinants(displacement)
    _check_reduction("mean", mask, displacement)
    low = r.amin(1, keepdim=True)
    folded = (low <= 0).to(r.dtype).add_(low, alpha=0.0)
    return FoldingReport(
        central=folding_fraction(displacement, mask),
        one_sided=_reduce(folded, mask, "mean"),
        non_diffeomorphic_volume=_reduce(_inverted_volume(r), mask, "mean"),
    )


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

    Returns:
        The error per batch element, or per voxel for ``reduction="none"``.

    Shape:
        displacement, inverse: ``(B, N, *S)``; mask: ``(B, 1, *S)``; out: ``(B,)`` or ``(B, 1, *S)``.
    """
    dims = check_shape(displacement, "B N *S", "displacement", floating=True)
    check_shape(inverse, "B N *S", "inverse", bindings=dims, floating=True)
    _check_reduction(reduction, mask, displacement)
    e1 = _vector_length(compose(displacement, inverse), keepdim=True)
    e2 = _vector_length(compose(inverse, displacement), keepdim=True)
    return _reduce(0.5 * (e1 + e2), mask, reduction)
