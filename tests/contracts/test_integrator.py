"""Contract of :class:`~plasticine.core.Integrator`: ``velocity (B, N, *S) -> displacement of exp(v)``.

Every implementation in IMPLEMENTATIONS must pass every test here unchanged. A new integrator is
added to the list (a factory taking no argument); the suite fails if an integrator exported by a
plasticine package is missing from it.

Stated bound (inverse consistency): for a smooth velocity (Gaussian-smoothed noise, sigma 3 voxels)
with :math:`\\max|v| = A \\le 2` voxels, :math:`\\exp(v) \\circ \\exp(-v)` and
:math:`\\exp(-v) \\circ \\exp(v)` are within 0.05 voxels of the identity on every voxel at least
``ceil(2A) + 2`` voxels from the edges (measured at A = 2: at most 0.0095 voxels for every
shipped integrator, 2D 32 x 28).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ._discovery import check_listed, check_uniform, factories, param
from plasticine.core import Integrator, compose
from plasticine.core.filters import gaussian_smooth
from plasticine.registration import RK4, Euler, ScalingAndSquaring

IMPLEMENTATIONS = [
    param(ScalingAndSquaring, "ScalingAndSquaring"),
    param(lambda: ScalingAndSquaring("auto"), "ScalingAndSquaring-auto"),
    param(Euler, "Euler"),
    param(RK4, "RK4"),
]

SHAPES = [(32, 28), (20, 18, 16)]
IC_BOUND = 0.05


def smooth_velocity(shape, amplitude, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    v = gaussian_smooth(torch.randn(1, len(shape), *shape, generator=g, dtype=torch.float64), 3.0)
    return (v / v.abs().amax() * amplitude).to(dtype)


def interior(field, margin):
    return field[(slice(None), slice(None)) + tuple(slice(margin, -margin) for _ in field.shape[2:])]


def test_every_exported_integrator_is_listed():
    check_listed([make() for make in factories(IMPLEMENTATIONS)], Integrator)


def test_one_call_signature():
    check_uniform([make() for make in factories(IMPLEMENTATIONS)], Integrator)


@pytest.mark.parametrize("make", IMPLEMENTATIONS)
def test_is_an_integrator(make):
    assert isinstance(make(), Integrator)


@pytest.mark.parametrize("make", IMPLEMENTATIONS)
@pytest.mark.parametrize("shape", [(9, 7), (6, 5, 4)], ids=["2d", "3d"])
def test_shape_dtype_and_device_kept(make, shape, dtype, device):
    v = 0.5 * torch.randn(2, len(shape), *shape, generator=torch.Generator().manual_seed(1), dtype=dtype).to(device)
    u = make()(v)
    assert u.shape == v.shape and u.dtype == dtype and u.device == v.device


@pytest.mark.parametrize("make", IMPLEMENTATIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=["2d", "3d"])
def test_deterministic(make, shape):
    v = smooth_velocity(shape, 2.0)
    assert torch.equal(make()(v), make()(v))


@pytest.mark.parametrize("make", IMPLEMENTATIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=["2d", "3d"])
def test_exp_of_zero_is_the_identity(make, shape):
    v = torch.zeros(1, len(shape), *shape)
    assert torch.equal(make()(v), v)


@pytest.mark.parametrize("make", IMPLEMENTATIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=["2d", "3d"])
def test_exp_of_a_constant_is_that_translation(make, shape):
    v = torch.ones(1, len(shape), *shape) * torch.tensor([1.5, -0.75, 0.5][: len(shape)]).view(1, -1, *[1] * len(shape))
    torch.testing.assert_close(make()(v), v, rtol=0, atol=1e-5)


@pytest.mark.parametrize("make", IMPLEMENTATIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=["2d", "3d"])
def test_exp_v_and_exp_minus_v_are_inverse(make, shape):
    amplitude = 2.0
    v = smooth_velocity(shape, amplitude)
    integrate = make()
    fwd, inv = integrate(v), integrate(-v)
    margin = math.ceil(2 * amplitude) + 2
    for a, b in ((fwd, inv), (inv, fwd)):
        err = interior(compose(a, b), margin).norm(dim=1)
        assert float(err.max()) < IC_BOUND


@pytest.mark.parametrize("make", IMPLEMENTATIONS)
@given(seed=st.integers(0, 2**16), amplitude=st.floats(0.1, 2.0))
def test_inverse_bound_holds_on_drawn_fields(make, seed, amplitude):
    v = smooth_velocity((24, 20), amplitude, seed, torch.float64)
    integrate = make()
    err = interior(compose(integrate(v), integrate(-v)), math.ceil(2 * amplitude) + 2).norm(dim=1)
    assert float(err.max()) < IC_BOUND


@pytest.mark.parametrize("make", IMPLEMENTATIONS)
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_velocity_gives_non_finite_displacement(make, bad):
    """A NaN or inf gives a non-finite displacement at its voxel, or a ValueError naming the velocity."""
    v = smooth_velocity((12, 10), 1.0)
    v[0, 1, 6, 5] = bad
    try:
        u = make()(v)
    except ValueError as err:
        assert "velocity" in str(err)
        return
    assert not bool(torch.isfinite(u[0, :, 6, 5]).all())
