"""Jacobians, folding and inverse consistency against numpy.gradient, closed forms and gradcheck."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_generator
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from plasticine.core import (
    folding_fraction,
    identity_grid,
    inverse_consistency_error,
    jacobian_determinant,
    jacobian_matrix,
    spatial_gradient,
)

fixtures_ok = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
sizes2 = st.tuples(st.integers(2, 17), st.integers(2, 17))
sizes3 = st.tuples(st.integers(2, 8), st.integers(2, 8), st.integers(2, 8))


def numpy_jacobian(u: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """(B, *S, N, N) Jacobian of p -> p + u in world units, from numpy.gradient (edge_order=1)."""
    n = u.shape[1]
    h = np.asarray(spacing)
    g = np.stack([np.stack(np.gradient(u[:, i] * h[i], *h, axis=tuple(range(1, n + 1)), edge_order=1), axis=-1) for i in range(n)], axis=-2)
    return g + np.eye(n)


@given(seed=st.integers(0, 2**31 - 1), s2=sizes2, s3=sizes3, batch=st.integers(1, 3), anisotropic=st.booleans())
@fixtures_ok
def test_gradient_matrix_and_determinant_match_numpy(seed, s2, s3, batch, anisotropic, ndim, dtype):
    gen = make_generator(seed)
    shape = s2 if ndim == 2 else s3
    u = (torch.randn(batch, ndim, *shape, generator=gen, dtype=torch.float64) * 0.4).to(dtype)
    spacing = tuple(float(x) for x in (torch.rand(ndim, generator=gen, dtype=torch.float64) * 2 + 0.5)) if anisotropic else (1.0,) * ndim
    ud = u.double().numpy()
    eps = torch.finfo(dtype).eps
    # spatial_gradient == numpy.gradient(edge_order=1) per channel and axis
    ref_g = np.stack([np.stack(np.gradient(ud[:, c], *spacing, axis=tuple(range(1, ndim + 1)), edge_order=1), axis=1) for c in range(ndim)], axis=1)
    np.testing.assert_allclose(spatial_gradient(u, spacing).double().numpy(), ref_g, rtol=0, atol=16 * eps)
    ref_j = numpy_jacobian(ud, spacing)
    np.testing.assert_allclose(jacobian_matrix(u, spacing).double().numpy(), ref_j, rtol=0, atol=64 * eps)
    ref_det = np.linalg.det(ref_j)
    det = jacobian_determinant(u)
    assert det.shape == (batch, 1, *shape) and det.dtype == dtype
    np.testing.assert_allclose(det[:, 0].double().numpy(), ref_det, rtol=0, atol=64 * eps)
    # the determinant does not depend on the voxel spacing (for a displacement in voxels)
    np.testing.assert_allclose(np.linalg.det(jacobian_matrix(u, spacing).double().numpy()), ref_det, rtol=0, atol=256 * eps)
    # the same numbers with autograd recording (another code path)
    det_tracked = jacobian_determinant(u.clone().requires_grad_())
    torch.testing.assert_close(det_tracked.detach(), det, rtol=0, atol=8 * eps)


@given(seed=st.integers(0, 2**31 - 1), s2=sizes2, s3=sizes3)
@fixtures_ok
def test_affine_map_has_det_of_its_matrix_everywhere(seed, s2, s3, ndim, dtype):
    """For u(p) = (A - I) p + t finite differences are exact: J = A and det J = det A, edges included."""
    gen = make_generator(seed)
    shape = s2 if ndim == 2 else s3
    a = torch.eye(ndim, dtype=torch.float64) + 0.6 * (torch.rand(ndim, ndim, generator=gen, dtype=torch.float64) - 0.5)
    t = torch.randn(ndim, generator=gen, dtype=torch.float64)
    p = identity_grid(shape, dtype=torch.float64)
    u = (torch.einsum("ij,j...->i...", a - torch.eye(ndim, dtype=torch.float64), p) + t.view(ndim, *([1] * ndim)))[None].to(dtype)
    tol = 32 * max(shape) * torch.finfo(dtype).eps
    torch.testing.assert_close(jacobian_determinant(u).double(), torch.full((1, 1, *shape), torch.linalg.det(a).item(), dtype=torch.float64), rtol=0, atol=tol)
    torch.testing.assert_close(jacobian_matrix(u).double(), a.expand(1, *shape, ndim, ndim), rtol=0, atol=tol)
    h = torch.tensor([0.5, 2.0, 3.0][:ndim], dtype=torch.float64)
    world = torch.diag(h) @ a @ torch.diag(1 / h)
    torch.testing.assert_close(jacobian_matrix(u, tuple(h.tolist())).double(), world.expand(1, *shape, ndim, ndim), rtol=0, atol=4 * tol)


def test_folding_fraction_counts_known_folds(ndim, dtype):
    """Along axis 0 the map sends rows to x = [0, 1, 2, 3, 2, 1, 6, 7, ...]: det J = (x[i+1] - x[i-1]) / 2
    is 0 at row 3 (counted: det <= 0) and -1 at row 4, positive elsewhere: two folded rows."""
    h = 12
    shape = (h, 7) if ndim == 2 else (h, 5, 4)
    x = torch.arange(h, dtype=dtype)
    x[4], x[5] = 2.0, 1.0
    u = torch.zeros(2, ndim, *shape, dtype=dtype)
    u[:, 0] = (x - torch.arange(h, dtype=dtype)).view(h, *([1] * (ndim - 1)))
    det = jacobian_determinant(u)[0, 0]
    folded_rows = sorted(set(torch.nonzero(det <= 0)[:, 0].tolist()))
    assert folded_rows == [3, 4]
    assert det[3].eq(0).all() and det[4].eq(-1).all()
    torch.testing.assert_close(folding_fraction(u), torch.full((2,), 2 / h, dtype=dtype))
    mask = torch.zeros(2, 1, *shape)
    mask[0, :, 2:6] = 1  # rows 2..5: two of four folded
    mask[1, :, 7:] = 1  # no folded row
    torch.testing.assert_close(folding_fraction(u, mask), torch.tensor([0.5, 0.0], dtype=dtype))


def test_inverse_consistency_closed_forms(ndim):
    shape = (9, 8) if ndim == 2 else (6, 5, 7)
    t = torch.tensor([1.5, -0.5, 2.0][:ndim], dtype=torch.float64).view(1, ndim, *([1] * ndim))
    u = t.expand(1, ndim, *shape)
    torch.testing.assert_close(inverse_consistency_error(u, -u), torch.zeros(1, dtype=torch.float64))
    norm = t.norm().item()
    torch.testing.assert_close(inverse_consistency_error(u, torch.zeros_like(u)), torch.tensor([norm], dtype=torch.float64))
    # a field that is wrong at one voxel only: mean and max and the masked mean
    inv = -u.clone()
    inv[(0, 0) + (2,) * ndim] += 1.0
    e = inverse_consistency_error(u, inv, reduction="none")
    assert e.shape == (1, 1, *shape) and e.max().item() > 0
    assert inverse_consistency_error(u, inv, reduction="max").item() == pytest.approx(e.max().item())
    mask = torch.zeros(1, 1, *shape)
    mask[(0, 0) + (slice(4, None),) * ndim] = 1
    far = inverse_consistency_error(u, inv, mask)
    assert far.item() == pytest.approx((e * mask).sum().item() / mask.sum().item())
    with pytest.raises(ValueError, match="reduction: expected"):
        inverse_consistency_error(u, inv, reduction="sum")


def test_gradcheck_jacobian_determinant_and_gradient(ndim):
    gen = make_generator(8)
    shape = (4, 5) if ndim == 2 else (3, 4, 3)
    u = (0.3 * torch.randn(1, ndim, *shape, generator=gen, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(jacobian_determinant, (u,))
    assert torch.autograd.gradcheck(lambda x: spatial_gradient(x, (0.5, 2.0, 1.5)[:ndim]), (u,))
    assert torch.autograd.gradcheck(lambda x: jacobian_matrix(x, (0.5, 2.0, 1.5)[:ndim]), (u,))


def test_size_one_axis_and_errors():
    u = torch.zeros(1, 3, 1, 4, 5)
    u[:, 1] = torch.arange(4.0).view(4, 1) * 0.5
    torch.testing.assert_close(jacobian_determinant(u), torch.full((1, 1, 1, 4, 5), 1.5))
    with pytest.raises(ValueError, match=r"displacement: expected shape \(B, N, \*S\), got \(1, 2, 4, 5, 6\)"):
        jacobian_determinant(torch.zeros(1, 2, 4, 5, 6))
    with pytest.raises(ValueError, match="spacing: expected None, one positive finite number or 2"):
        spatial_gradient(torch.zeros(1, 1, 4, 4), (1.0, -1.0))
    with pytest.raises(ValueError, match=r"mask: expected shape \(B, 1, \*S\), got \(1, 1, 3, 5\)"):
        folding_fraction(torch.zeros(1, 2, 4, 5), torch.ones(1, 1, 3, 5))


def test_device_matches_cpu(device, ndim):
    gen = make_generator(9)
    shape = (6, 7) if ndim == 2 else (4, 5, 6)
    u = 0.3 * torch.randn(2, ndim, *shape, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(jacobian_determinant(u.to(device)).cpu(), jacobian_determinant(u))
    torch.testing.assert_close(inverse_consistency_error(u.to(device), -u.to(device)).cpu(), inverse_consistency_error(u, -u))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_fields_give_non_finite_measures(value):
    # a NaN determinant is not "not folded", and a NaN composition is not "consistent"
    u = 0.1 * torch.randn(2, 2, 7, 8, generator=make_generator(9))
    u[1, 0, 3, 3] = value
    frac = folding_fraction(u)
    assert bool(torch.isfinite(frac[0])) and not bool(torch.isfinite(frac[1]))
    for reduction in ("mean", "max"):
        err = inverse_consistency_error(u, -u, reduction=reduction)
        assert bool(torch.isfinite(err[0])) and not bool(torch.isfinite(err[1]))
        masked = inverse_consistency_error(-u[:1], u[:1], mask=torch.full((1, 1, 7, 8), value), reduction=reduction)
        assert not bool(torch.isfinite(masked).any())
    assert not bool(torch.isfinite(jacobian_determinant(u)[1, 0, 2:5, 2:5]).all())  # the neighbours read it


def test_integer_fields_and_masks_are_refused():
    with pytest.raises(ValueError, match="^displacement: expected a floating-point tensor, got dtype torch.int64"):
        jacobian_determinant(torch.zeros(1, 2, 4, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="^mask: expected a bool or floating-point tensor, got dtype torch.int64"):
        folding_fraction(torch.zeros(1, 2, 4, 5), torch.ones(1, 1, 4, 5, dtype=torch.long))
