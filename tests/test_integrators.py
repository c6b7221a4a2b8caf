"""SVF integrators: identities, the stated inverse-consistency and Jacobian bounds, group property, gradcheck.

Run as a script (``python tests/test_integrators.py``) to print the inverse-consistency table quoted
in the :class:`~plasticine.registration.ScalingAndSquaring` docstring, or with ``--time`` to print
the timings of scaling and squaring and of the Jacobian determinant (never part of a test).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import make_generator
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import ndimage

from plasticine.core import Integrator, compose, inverse_consistency_error, jacobian_determinant, spatial_gradient
from plasticine.registration import (
    RK4,
    Euler,
    ScalingAndSquaring,
    auto_squaring_steps,
    integrate_euler,
    integrate_rk4,
    scaling_and_squaring,
)

fixtures_ok = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
INTEGRATORS = [scaling_and_squaring, integrate_euler, integrate_rk4]


def velocity(gen: torch.Generator, shape: tuple[int, ...], sigma: float, grad: float, batch: int = 1) -> torch.Tensor:
    """Smooth random velocity ``(B, N, *S)`` (float64) scaled so that max |d_j v_i| = ``grad``."""
    n = len(shape)
    x = torch.randn(batch, n, *shape, generator=gen, dtype=torch.float64).numpy()
    x = ndimage.gaussian_filter(x, [0, 0] + [sigma] * n, mode="reflect")
    v = torch.from_numpy(x)
    return v * (grad / spatial_gradient(v).abs().max())


def sizes(v: torch.Tensor) -> tuple[float, float, float]:
    """A = max |v| (Euclidean), G = max |d_j v_i|, H = max |d_k d_j v_i| (spatial_gradient, twice)."""
    g = spatial_gradient(v)
    h = spatial_gradient(g.flatten(1, 2))
    return v.norm(dim=1).max().item(), g.abs().max().item(), h.abs().max().item()


def ic_bound(v: torch.Tensor, steps: int) -> float:
    """The bound stated in the ScalingAndSquaring docstring (with its floating-point term)."""
    a, g, h = sizes(v.double())
    return math.exp(g) * (a * g / 2**steps + h / 4) + 8 * max(v.shape[2:]) * torch.finfo(v.dtype).eps


def interior(v: torch.Tensor) -> tuple:
    """Index of the voxels at least ceil(2 max|v|) + 2 from every edge."""
    m = math.ceil(2 * v.norm(dim=1).max().item()) + 2
    return (slice(None), slice(None)) + tuple(slice(m, s - m) for s in v.shape[2:])


def test_zero_velocity_is_identity(ndim, dtype, device):
    shape = (5, 7) if ndim == 2 else (4, 6, 5)
    v = torch.zeros(3, ndim, *shape, dtype=dtype, device=device)
    for f in INTEGRATORS:
        out = f(v)
        assert out.shape == v.shape and out.dtype == dtype and out.device.type == device.type
        assert torch.equal(out, v)
    assert torch.equal(scaling_and_squaring(v, "auto"), v)


@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 3), steps=st.integers(0, 9))
@fixtures_ok
def test_constant_velocity_is_a_translation(seed, batch, steps, ndim, dtype):
    """exp(t) = t for a constant t: every scheme reproduces a translation (border padding)."""
    gen = make_generator(seed)
    shape = (6, 9) if ndim == 2 else (5, 4, 6)
    t = torch.rand(batch, ndim, generator=gen, dtype=torch.float64) * 8 - 4
    v = t.view(batch, ndim, *([1] * ndim)).expand(batch, ndim, *shape).to(dtype)
    tol = 64 * max(shape) * torch.finfo(dtype).eps * (1 + 2**steps)
    for out in [scaling_and_squaring(v, steps), integrate_euler(v, steps + 1), integrate_rk4(v, steps + 1)]:
        torch.testing.assert_close(out, v, rtol=0, atol=tol)


@given(
    seed=st.integers(0, 2**31 - 1),
    sigma=st.floats(1.5, 8.0),
    grad=st.floats(0.01, 1.5),
    steps=st.integers(2, 12),
    batch=st.integers(1, 2),
)
@fixtures_ok
def test_inverse_consistency_within_stated_bound(seed, sigma, grad, steps, batch, ndim, dtype):
    """max over the interior of |exp(v) o exp(-v) - Id| and |exp(-v) o exp(v) - Id| <= the docstring bound."""
    gen = make_generator(seed)
    shape = (56, 49) if ndim == 2 else (27, 25, 26)
    v = velocity(gen, shape, sigma, grad, batch)
    cap = 8.0 if ndim == 2 else 2.5  # max|v| bounds the margin: ceil(2 max|v|) + 2 voxels
    v = (v * min(1.0, cap / v.norm(dim=1).max().item())).to(dtype)
    fwd, inv = scaling_and_squaring(v, steps), scaling_and_squaring(-v, steps)
    err = torch.maximum(compose(fwd, inv).norm(dim=1, keepdim=True), compose(inv, fwd).norm(dim=1, keepdim=True))
    err = err[interior(v)]
    assert err.numel() > 0
    for b in range(batch):
        assert err[b].max().item() <= ic_bound(v[b : b + 1], steps)


@given(seed=st.integers(0, 2**31 - 1), sigma=st.floats(1.0, 8.0), grad=st.floats(0.01, 1.0), steps=st.integers(4, 10))
@fixtures_ok
def test_positive_jacobian_within_stated_bound(seed, sigma, grad, steps, ndim):
    """det J(exp(v)) >= exp(-N max|d v|) / 2 > 0 whenever max |d_j v_i| <= 1 (docstring)."""
    gen = make_generator(seed)
    shape = (40, 37) if ndim == 2 else (19, 22, 20)
    v = velocity(gen, shape, sigma, grad)
    det = jacobian_determinant(scaling_and_squaring(v, steps))
    assert det.min().item() >= 0.5 * math.exp(-ndim * sizes(v)[1])


@given(seed=st.integers(0, 2**31 - 1), s=st.floats(-1.0, 1.0), t=st.floats(-1.0, 1.0), steps=st.integers(5, 10))
@fixtures_ok
def test_one_parameter_group(seed, s, t, steps, ndim):
    """exp((s + t) v) = exp(s v) o exp(t v), inside, within the bound of the largest velocity involved."""
    gen = make_generator(seed)
    shape = (48, 45) if ndim == 2 else (26, 24, 25)
    v = velocity(gen, shape, 4.0, 0.4)
    v = v * min(1.0, 1.5 / v.norm(dim=1).max().item())  # (|s| + |t|) max|v| <= 3: margin <= 8 voxels
    lhs = scaling_and_squaring((s + t) * v, steps)
    rhs = compose(scaling_and_squaring(s * v, steps), scaling_and_squaring(t * v, steps))
    big = (abs(s) + abs(t)) * v
    err = (lhs - rhs).norm(dim=1, keepdim=True)[interior(big)]
    assert err.max().item() <= ic_bound(big, steps)


@given(seed=st.integers(0, 2**31 - 1), sigma=st.floats(2.0, 6.0), grad=st.floats(0.05, 0.8))
@fixtures_ok
def test_auto_steps_against_rk4_reference(seed, sigma, grad, ndim):
    """steps='auto' (first step <= 0.5 voxel) agrees with RK4 in 16 steps within the stated bound."""
    gen = make_generator(seed)
    shape = (44, 47) if ndim == 2 else (22, 21, 20)
    v = velocity(gen, shape, sigma, grad)
    v = v * min(1.0, (8.0 if ndim == 2 else 3.0) / v.norm(dim=1).max().item())  # keep an interior
    steps = auto_squaring_steps(v)
    assert steps == max(4, math.ceil(math.log2(v.norm(dim=1).max().item() / 0.5)))
    auto = scaling_and_squaring(v, "auto")
    assert torch.equal(auto, scaling_and_squaring(v, steps))
    ref = integrate_rk4(v, 16)
    err = (auto - ref).norm(dim=1, keepdim=True)[interior(v)]
    assert err.max().item() <= ic_bound(v, steps)


def test_auto_steps_limits_and_errors():
    v = torch.zeros(1, 2, 8, 8)
    assert auto_squaring_steps(v) == 4
    v[0, 0, 3, 3] = 100.0  # log2(100 / 0.5) = 7.6 -> 8
    assert auto_squaring_steps(v) == 8
    v[0, 0, 3, 3] = 1e9
    assert auto_squaring_steps(v) == 20
    v[0, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        auto_squaring_steps(v)


@given(seed=st.integers(0, 2**31 - 1), sigma=st.floats(3.0, 8.0), grad=st.floats(0.01, 0.1))
@fixtures_ok
def test_integrators_agree_for_small_smooth_velocity(seed, sigma, grad, ndim):
    """Scaling and squaring, RK4 and Euler give the same map for small smooth v.

    Euler's error is first order, about A G / (2 steps); the others sit within ``ic_bound``.
    """
    gen = make_generator(seed)
    shape = (36, 41) if ndim == 2 else (20, 19, 21)
    v = velocity(gen, shape, sigma, grad)
    v = v * min(1.0, 3.0 / v.norm(dim=1).max().item())  # keep an interior
    a, g, _ = sizes(v)
    ss, rk, eu = scaling_and_squaring(v, 10), integrate_rk4(v, 4), integrate_euler(v, 32)
    inner = interior(v)
    assert (ss - rk).norm(dim=1, keepdim=True)[inner].max().item() <= ic_bound(v, 10)
    assert (eu - rk).norm(dim=1, keepdim=True)[inner].max().item() <= ic_bound(v, 10) + math.exp(g) * a * g / 32
    # and they are not trivially equal: the map moves voxels
    assert ss.abs().max().item() > 0.5 * a


@pytest.mark.parametrize("name", ["ss", "euler", "rk4"])
def test_gradcheck_integrators(name, ndim):
    gen = make_generator(11)
    shape = (5, 6) if ndim == 2 else (4, 5, 3)
    v = (velocity(gen, shape, 1.0, 0.4) + 0.03).requires_grad_()
    f = {"ss": lambda x: scaling_and_squaring(x, 3), "euler": lambda x: integrate_euler(x, 3), "rk4": lambda x: integrate_rk4(x, 2)}[name]
    assert torch.autograd.gradcheck(f, (v,), fast_mode=ndim == 3)


def test_modules_match_functions_and_follow_the_protocol():
    gen = make_generator(12)
    v = velocity(gen, (12, 13), 2.0, 0.3).float()
    for module, ref in [
        (ScalingAndSquaring(5, "zeros"), scaling_and_squaring(v, 5, "zeros")),
        (ScalingAndSquaring("auto"), scaling_and_squaring(v, "auto")),
        (Euler(7, "reflection"), integrate_euler(v, 7, "reflection")),
        (RK4(3), integrate_rk4(v, 3)),
    ]:
        assert isinstance(module, Integrator)
        assert torch.equal(module(v), ref)
        assert "steps=" in repr(module)


@pytest.mark.parametrize("bad", [-1, 2.0, True, "many"])
def test_invalid_steps_and_padding_raise(bad):
    v = torch.zeros(1, 2, 6, 6)
    with pytest.raises(ValueError, match="steps: expected"):
        scaling_and_squaring(v, bad)
    with pytest.raises(ValueError, match="steps: expected"):
        ScalingAndSquaring(bad)
    with pytest.raises(ValueError, match="steps: expected"):
        Euler(0 if bad == -1 else bad)
    with pytest.raises(ValueError, match="steps: expected"):
        integrate_rk4(v, 0 if bad == -1 else bad)
    with pytest.raises(ValueError, match="padding: expected"):
        ScalingAndSquaring(7, "wrap")
    with pytest.raises(ValueError, match="padding: expected"):
        integrate_euler(v, 4, "wrap")
    with pytest.raises(ValueError, match=r"velocity: expected shape \(B, N, \*S\), got \(1, 3, 6, 6\)"):
        scaling_and_squaring(torch.zeros(1, 3, 6, 6))


def test_size_one_axis_is_carried_along():
    """An axis of size 1 has nothing to interpolate: its component integrates as a translation."""
    v = torch.zeros(1, 3, 1, 6, 5, dtype=torch.float64)
    v[:, 0] = 0.7
    for f in INTEGRATORS:
        torch.testing.assert_close(f(v), v, rtol=0, atol=1e-12)


def test_device_matches_cpu(device, ndim):
    gen = make_generator(13)
    shape = (17, 15) if ndim == 2 else (9, 8, 10)
    v = velocity(gen, shape, 2.0, 0.5)
    for f in INTEGRATORS:
        torch.testing.assert_close(f(v.to(device)).cpu(), f(v), rtol=0, atol=1e-9)


def inverse_consistency_table() -> list[tuple[str, str, int, float, float]]:
    """The numbers quoted in the ScalingAndSquaring docstring.

    A smooth 2D velocity on 256 x 256 (float32): standard normal noise from seed 0, Gaussian
    smoothing with sigma = 24 (scipy, reflect) per component, scaled to max |v| = 40 voxels.
    Returns (field, padding, steps, mean error over the image, mean over the interior 40 voxels
    from the edges) with the error of :func:`~plasticine.core.inverse_consistency_error`.
    """
    gen = make_generator(0)
    noise = torch.randn(2, 256, 256, generator=gen, dtype=torch.float64).numpy()
    v = torch.from_numpy(np.stack([ndimage.gaussian_filter(c, 24, mode="reflect") for c in noise]))[None]
    v = (v * (40 / v.norm(dim=1).max())).float()
    mask = torch.zeros(1, 1, 256, 256)
    mask[..., 40:-40, 40:-40] = 1
    rows = []
    for padding in ["border", "zeros"]:
        for steps in [7, 12]:
            fwd, inv = scaling_and_squaring(v, steps, padding), scaling_and_squaring(-v, steps, padding)
            whole = inverse_consistency_error(fwd, inv).item()
            inner = inverse_consistency_error(fwd, inv, mask).item()
            rows.append(("sigma=24, max|v|=40", padding, steps, whole, inner))
    return rows


def timing_table(repeats: int = 15) -> list[tuple[str, float, float]]:
    """Median and minimum wall time (ms) of the cases the project compares with its peers.

    Scaling and squaring (7 steps) forward + backward on 1x2x256x256 and 1x3x96x96x96 float32
    velocities, and the Jacobian determinant forward on fields of the same sizes, with the
    current ``torch.get_num_threads()``. Other processes on the same cores make single timings
    noisy: compare medians, and the minimum as the least disturbed run.
    """
    import time

    gen = make_generator(0)
    rows = []
    for shape, reps in [((1, 2, 256, 256), repeats), ((1, 3, 96, 96, 96), max(3, repeats // 5))]:
        pool = torch.nn.functional.avg_pool2d if len(shape) == 4 else torch.nn.functional.avg_pool3d
        v = (pool(torch.randn(shape, generator=gen), 9, 1, 4) * 20).requires_grad_()
        u = v.detach() * 0.05

        def ss() -> None:
            v.grad = None
            scaling_and_squaring(v, 7).sum().backward()

        def jd() -> None:
            with torch.no_grad():
                jacobian_determinant(u)

        for name, f, n in [("scaling_and_squaring T=7 fwd+bwd", ss, reps), ("jacobian_determinant fwd", jd, 3 * reps)]:
            f()
            times = []
            for _ in range(n):
                t0 = time.perf_counter()
                f()
                times.append(time.perf_counter() - t0)
            times.sort()
            rows.append((f"{name} {'x'.join(map(str, shape))}", 1e3 * times[len(times) // 2], 1e3 * times[0]))
    return rows


if __name__ == "__main__":
    import sys

    torch.set_num_threads(2)
    if "--time" in sys.argv:
        print(f"timings with {torch.get_num_threads()} threads (ms): median, min")
        for name, median, best in timing_table():
            print(f"{name:60s} {median:9.2f} {best:9.2f}")
    else:
        print("inverse consistency of scaling and squaring, 256 x 256, mean |phi o phi^-1 - Id| (voxels)")
        for field, padding, steps, whole, inner in inverse_consistency_table():
            print(f"{field}  padding={padding:7s} steps={steps:2d}  whole image {whole:.4f}  interior {inner:.4f}")


@pytest.mark.parametrize("integrator", [ScalingAndSquaring(), ScalingAndSquaring("auto"), Euler(4), RK4(2)], ids=repr)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_velocity_is_refused_not_integrated(integrator, dtype):
    # an integer velocity gave an all-NaN field (scaling and squaring) or a
    # NotImplementedError from grid_sample (Euler, RK4)
    v = torch.ones(1, 2, 8, 8, dtype=dtype)
    with pytest.raises(ValueError, match=rf"velocity: expected a floating-point tensor, got dtype {dtype}"):
        integrator(v)


@pytest.mark.parametrize("integrator", [ScalingAndSquaring(), Euler(4), RK4(2)], ids=repr)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_velocity_gives_a_non_finite_displacement_where_it_sits(integrator, value):
    v = 0.3 * torch.randn(2, 2, 9, 8, generator=make_generator(3))
    v[1, 0, 4, 5] = value
    u = integrator(v)
    assert not bool(torch.isfinite(u[1, :, 4, 5]).all())
    assert bool(torch.isfinite(u[0]).all())  # the other batch item is untouched


def test_empty_batch_is_refused_not_an_index_error():
    # B = 0 raised IndexError (or a RuntimeError from amax for steps="auto")
    v = torch.zeros(0, 2, 8, 8)
    for f in (scaling_and_squaring, integrate_euler, integrate_rk4, auto_squaring_steps, ScalingAndSquaring("auto")):
        with pytest.raises(ValueError, match=r"velocity: expected shape \(B, N, \*S\), got \(0, 2, 8, 8\): an empty batch \(B = 0\)"):
            f(v)
