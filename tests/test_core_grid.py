"""Identity grid and the converters between voxel, normalised-grid and world coordinates."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_generator
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from plasticine.core import (
    displacement_from_world,
    displacement_to_grid,
    displacement_to_world,
    grid_to_displacement,
    identity_grid,
    voxel_to_world,
    world_to_voxel,
)

fixtures_ok = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
sizes2 = st.tuples(st.integers(1, 19), st.integers(2, 19))
sizes3 = st.tuples(st.integers(2, 9), st.integers(1, 9), st.integers(2, 9))


def random_affine(gen: torch.Generator, n: int, batch: int | None = None) -> torch.Tensor:
    """A well-conditioned random (N+1, N+1) affine (or a batch of them) in float64."""
    lead = () if batch is None else (batch,)
    a = torch.zeros(*lead, n + 1, n + 1, dtype=torch.float64)
    a[..., :n, :n] = torch.eye(n, dtype=torch.float64) * 1.5 + 0.5 * torch.randn(*lead, n, n, generator=gen, dtype=torch.float64)
    a[..., :n, n] = 50 * torch.randn(*lead, n, generator=gen, dtype=torch.float64)
    a[..., n, n] = 1.0
    return a


def test_identity_grid_values(ndim, dtype, device):
    shape = (3, 5) if ndim == 2 else (2, 4, 3)
    g = identity_grid(shape, dtype=dtype, device=device)
    assert g.shape == (ndim, *shape) and g.dtype == dtype and g.device.type == device.type
    ref = np.indices(shape)
    np.testing.assert_array_equal(g.cpu().numpy(), ref)
    with pytest.raises(ValueError, match=r"expected 2 or 3 positive spatial sizes, got \(4,\)"):
        identity_grid((4,))
    with pytest.raises(ValueError, match=r"got \(4, 0\)"):
        identity_grid((4, 0))


@given(seed=st.integers(0, 2**31 - 1), s2=sizes2, s3=sizes3, batch=st.integers(1, 3))
@fixtures_ok
def test_displacement_grid_round_trip_and_closed_form(seed, s2, s3, batch, ndim, dtype):
    gen = make_generator(seed)
    shape = s2 if ndim == 2 else s3
    u = (torch.randn(batch, ndim, *shape, generator=gen, dtype=torch.float64) * 3).to(dtype)
    grid = displacement_to_grid(u)
    assert grid.shape == (batch, *shape, ndim)
    # closed form: grid[..., N-1-i] = 2 (p_i + u_i) / (S_i - 1) - 1, and 0 on an axis of size 1
    p = np.indices(shape).astype(np.float64)
    ud = u.double().numpy()
    eps = torch.finfo(dtype).eps
    for i, s in enumerate(shape):
        expected = 2 * (p[i] + ud[:, i]) / (s - 1) - 1 if s > 1 else np.zeros_like(ud[:, i])
        np.testing.assert_allclose(grid[..., ndim - 1 - i].double().numpy(), expected, rtol=0, atol=8 * eps * (1 + np.abs(expected).max()))
    back = grid_to_displacement(grid)
    expected_back = u.clone()
    for i, s in enumerate(shape):
        if s == 1:
            expected_back[:, i] = 0  # no normalised extent: documented to come back as 0
    tol = 8 * max(shape) * eps * (1 + ud.__abs__().max())
    torch.testing.assert_close(back, expected_back, rtol=0, atol=tol)


@given(seed=st.integers(0, 2**31 - 1), npts=st.integers(1, 20), batched=st.booleans())
@fixtures_ok
def test_voxel_world_round_trip_and_closed_form(seed, npts, batched, ndim, dtype):
    gen = make_generator(seed)
    batch = 2
    affine = random_affine(gen, ndim, batch if batched else None)
    p = (torch.rand(batch, npts, ndim, generator=gen, dtype=torch.float64) * 100).to(dtype)
    x = voxel_to_world(p, affine)
    a = affine.numpy() if batched else np.broadcast_to(affine.numpy(), (batch, ndim + 1, ndim + 1))
    pd = p.double().numpy()
    ref = np.einsum("bij,bpj->bpi", a[:, :ndim, :ndim], pd) + a[:, None, :ndim, ndim]
    eps = torch.finfo(dtype).eps
    np.testing.assert_allclose(x.double().numpy(), ref, rtol=0, atol=64 * eps * np.abs(ref).max())
    back = world_to_voxel(x, affine)
    cond = np.linalg.cond(a[:, :ndim, :ndim]).max()
    torch.testing.assert_close(back, p, rtol=0, atol=64 * cond * eps * np.abs(ref).max())


@given(seed=st.integers(0, 2**31 - 1), s2=sizes2, s3=sizes3, batched=st.booleans())
@fixtures_ok
def test_displacement_world_round_trip_and_points(seed, s2, s3, batched, ndim, dtype):
    gen = make_generator(seed)
    shape = s2 if ndim == 2 else s3
    affine = random_affine(gen, ndim, 2 if batched else None)
    u = (torch.randn(2, ndim, *shape, generator=gen, dtype=torch.float64) * 4).to(dtype)
    uw = displacement_to_world(u, affine)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(displacement_from_world(uw, affine), u, rtol=0, atol=256 * eps * (1 + u.abs().max().item()))
    # a vector is the difference of two points: A (p + u) + t - (A p + t) = A u
    p = identity_grid(shape, dtype=torch.float64).flatten(1).T.expand(2, -1, -1)
    moved = p + u.double().flatten(2).transpose(1, 2)
    diff = voxel_to_world(moved, affine) - voxel_to_world(p, affine)
    torch.testing.assert_close(uw.double().flatten(2).transpose(1, 2), diff, rtol=0, atol=1e-3 if dtype == torch.float32 else 1e-9)


def test_scanner_affine_round_trip_in_float32():
    """Float32 points with a scanner-like affine (large offset) round-trip to float32 accuracy."""
    affine = torch.tensor([[0.9, 0.1, -120.0], [-0.05, 1.1, 95.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    p = torch.tensor([[[10.25, 200.5], [0.0, 0.0]]], dtype=torch.float32)
    back = world_to_voxel(voxel_to_world(p, affine), affine)
    assert (back - p).abs().max().item() < 1e-4


def test_converter_errors_name_expected_and_actual():
    with pytest.raises(ValueError, match=r"affine: expected shape \(3, 3\) or \(B, 3, 3\), got \(4, 4\)"):
        voxel_to_world(torch.zeros(1, 5, 2), torch.eye(4))
    with pytest.raises(ValueError, match=r"points: expected shape \(B, P, N\), got \(5, 2\)"):
        world_to_voxel(torch.zeros(5, 2), torch.eye(3))
    with pytest.raises(ValueError, match=r"displacement: expected shape \(B, N, \*S\), got \(1, 2, 4, 4, 4\)"):
        displacement_to_world(torch.zeros(1, 2, 4, 4, 4), torch.eye(4))
    with pytest.raises(ValueError, match=r"grid: expected shape \(B, \*S, N\), got \(1, 4, 4, 3\): N=3 vector components but 2 spatial"):
        grid_to_displacement(torch.zeros(1, 4, 4, 3))
    with pytest.raises(ValueError, match=r"displacement: expected shape \(B, N, \*S\), got \(4, 4\)"):
        displacement_to_grid(torch.zeros(4, 4))


def test_converters_on_device(device):
    gen = make_generator(3)
    u = torch.randn(1, 3, 4, 5, 6, generator=gen, dtype=torch.float64)
    affine = random_affine(gen, 3)
    torch.testing.assert_close(displacement_to_grid(u.to(device)).cpu(), displacement_to_grid(u))
    torch.testing.assert_close(displacement_to_world(u.to(device), affine.to(device)).cpu(), displacement_to_world(u, affine))


def test_integer_inputs_singular_and_non_finite_affines():
    p = torch.rand(1, 4, 2, generator=make_generator(3))
    with pytest.raises(ValueError, match="^points: expected a floating-point tensor, got dtype torch.int64"):
        voxel_to_world(p.long(), torch.eye(3))
    with pytest.raises(ValueError, match="^affine: expected a floating-point tensor, got dtype torch.int64"):
        voxel_to_world(p, torch.eye(3, dtype=torch.long))
    with pytest.raises(ValueError, match="^dtype: expected a floating-point dtype, got torch.int64"):
        identity_grid((3, 4), dtype=torch.int64)
    singular = torch.eye(3)
    singular[1, 1] = 0.0
    with pytest.raises(ValueError, match="^affine: expected an invertible matrix, got a singular one"):
        world_to_voxel(p, singular)
    infinite = torch.eye(3)
    infinite[0, 0] = float("inf")  # inv would give a finite 0 for 1 / inf
    assert bool(world_to_voxel(p, infinite).isnan().all())
    assert bool(displacement_from_world(torch.zeros(1, 2, 3, 4), infinite).isnan().all())
