"""DDIM encoding (the probability-flow ODE run forwards) and the DDIB translator, against closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_generator

from plasticine.core import to_json
from plasticine.diffusion import (
    ConditionalUNet,
    CosineSchedule,
    DDIBTranslator,
    DDIMSampler,
    LinearSchedule,
    UNetConfig,
    ddim_encode,
)

K = 1000


@pytest.fixture(scope="module")
def sched():
    return LinearSchedule(1e-4, 2e-2, K)


def _col(gamma, x):
    return gamma.to(torch.float64).view(-1, *([1] * (x.dim() - 1)))


def point_oracle(y_star):
    """The exact eps of data that is the single image y*: (x - sqrt(g) y*) / sqrt(1 - g)."""

    def f(x, gamma, condition):
        assert condition is None
        g = _col(gamma, x)
        return ((x.double() - g.sqrt() * y_star.double()) / (1 - g).sqrt()).to(x.dtype)

    return f


def gaussian_oracle(m, s):
    """E[eps | x_k] for data N(m, s^2) per voxel: sqrt(1 - g) (x - sqrt(g) m) / (g s^2 + 1 - g)."""

    def f(x, gamma, condition):
        assert condition is None
        g = _col(gamma, x)
        return ((1 - g).sqrt() * (x.double() - g.sqrt() * m) / (g * s * s + 1 - g)).to(x.dtype)

    return f


def as_x0(eps_denoiser):
    """The same model read as an x0 predictor: x0_hat = (x - sqrt(1 - g) eps_hat) / sqrt(g)."""

    def f(x, gamma, condition):
        g = _col(gamma, x)
        return (x - (1 - g).sqrt() * eps_denoiser(x, gamma, condition)) / g.sqrt()

    return f


def gaussian_flow(x, m, s, gamma):
    """The exact probability-flow state at level gamma of a sample x of N(m, s^2)."""
    return math.sqrt(gamma) * m + math.sqrt(gamma * s * s + 1 - gamma) * (x - m) / s


def _images(shape, seed, m=0.0, s=1.0):
    return m + s * torch.randn(shape, dtype=torch.float64, generator=make_generator(seed))


# -- (a) encode / decode with one model --------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 1, 5, 6), (1, 2, 3, 4, 5)])
@pytest.mark.parametrize("steps, end_step", [(10, None), (37, 400), (1, 1), (1000, None)])
def test_point_oracle_round_trip_is_exact(sched, shape, steps, end_step):
    y_star = _images(shape, 1)
    f = point_oracle(y_star)
    latent = ddim_encode(f, sched, y_star, steps=steps, end_step=end_step)
    k0 = K if end_step is None else end_step
    # every encoding step of the data point stays on its ray sqrt(g) y*
    torch.testing.assert_close(latent, math.sqrt(float(sched.gammas[k0])) * y_star, rtol=0, atol=1e-12)
    out = DDIMSampler(steps).decode(f, sched, None, latent, k0)
    torch.testing.assert_close(out, y_star, rtol=0, atol=1e-10)


def test_gaussian_encode_follows_the_closed_form_flow(sched):
    m, s = 0.5, 2.0
    x = _images((3, 1, 6, 6), 2, m, s)
    f = gaussian_oracle(m, s)
    errs = []
    for n in (20, 200):
        z = ddim_encode(f, sched, x, steps=n)
        errs.append((z - gaussian_flow(x, m, s, float(sched.gammas[-1]))).abs().max().item())
    assert errs[1] < errs[0] / 4
    assert errs[1] < 0.05


def test_gaussian_round_trip_error_shrinks_with_steps(sched):
    m, s = 0.5, 2.0
    x = _images((3, 1, 6, 6), 3, m, s)
    f = gaussian_oracle(m, s)

    def err(n):
        z = ddim_encode(f, sched, x, steps=n)
        return (DDIMSampler(n).decode(f, sched, None, z, K) - x).abs().max().item()

    e20, e200 = err(20), err(200)
    assert e200 < e20 / 4  # first order: about 10x for 10x the steps
    assert e200 < 0.2


def test_fixed_point_iterations_make_the_round_trip_exact(sched):
    m, s = 0.0, 1.5
    x = _images((2, 1, 4, 4), 4, m, s)
    f = gaussian_oracle(m, s)
    z = ddim_encode(f, sched, x, steps=20, iterations=25)
    torch.testing.assert_close(DDIMSampler(20).decode(f, sched, None, z, K), x, rtol=0, atol=1e-8)


@pytest.mark.parametrize("spacing", ["trailing", "linspace", "leading", "log_snr"])
def test_x0_parametrisation_gives_the_same_latent(sched, spacing):
    """The prediction option reads the same model in another parametrisation: same latent."""
    f = gaussian_oracle(0.3, 1.2)
    x = _images((2, 1, 4, 5), 5, 0.3, 1.2)
    z_eps = ddim_encode(f, sched, x, steps=15, spacing=spacing)
    z_x0 = ddim_encode(as_x0(f), sched, x, steps=15, spacing=spacing, prediction="x0")
    torch.testing.assert_close(z_x0, z_eps, rtol=0, atol=1e-9)


def test_per_sample_end_steps_match_single_runs(sched):
    f = gaussian_oracle(0.0, 1.0)
    x = _images((3, 1, 4, 4), 6)
    ends = torch.tensor([500, 1000, 40])
    z = ddim_encode(f, sched, x, steps=10, end_step=ends)
    for i in range(3):
        torch.testing.assert_close(z[i : i + 1], ddim_encode(f, sched, x[i : i + 1], steps=10, end_step=int(ends[i])), rtol=0, atol=0)


# -- (b) the bridge between two Gaussians ------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 1, 6, 6), (1, 1, 3, 4, 4)])
def test_bridge_between_gaussians_is_the_affine_map(sched, shape):
    m1, s1, m2, s2 = 0.5, 2.0, -1.0, 0.5
    x = _images(shape, 7, m1, s1)
    g_k = float(sched.gammas[-1])
    # exact flow of the target decoded from the exact source latent at K
    exact = m2 + s2 * (gaussian_flow(x, m1, s1, g_k) - math.sqrt(g_k) * m2) / math.sqrt(g_k * s2 * s2 + 1 - g_k)
    affine = m2 + (s2 / s1) * (x - m1)
    assert (exact - affine).abs().max().item() < 1e-2  # gamma_K ~ 4e-5: the latent is almost pure noise
    errs = []
    for n in (50, 1000):
        t = DDIBTranslator(gaussian_oracle(m1, s1), gaussian_oracle(m2, s2), sched, n)
        y = t.translate(x)
        assert y.shape == x.shape and y.dtype == x.dtype
        errs.append((y - exact).abs().max().item())
    assert errs[1] < errs[0] / 4
    assert errs[1] < 0.02
    assert (y - affine).abs().max().item() < 0.03


def test_bridge_with_a_cosine_schedule_and_x0_models():
    sched = CosineSchedule(num_steps=400)
    m1, s1, m2, s2 = 1.0, 0.5, 0.0, 1.0
    x = _images((2, 1, 5, 5), 8, m1, s1)
    t = DDIBTranslator(as_x0(gaussian_oracle(m1, s1)), as_x0(gaussian_oracle(m2, s2)), sched, 400, prediction="x0")
    y = t.translate(x)
    assert (y - (m2 + (s2 / s1) * (x - m1))).abs().max().item() < 0.05


def test_same_model_both_ways_reconstructs(sched):
    f = point_oracle(_images((2, 1, 4, 4), 9))
    x = _images((2, 1, 4, 4), 9)
    torch.testing.assert_close(DDIBTranslator(f, f, sched, 25).translate(x), x, rtol=0, atol=1e-10)


# -- (c) determinism, shapes, arguments --------------------------------------------------------------


def test_translation_is_deterministic_and_draws_nothing(sched):
    t = DDIBTranslator(gaussian_oracle(0.0, 1.0), gaussian_oracle(1.0, 2.0), sched, 30)
    x = _images((2, 1, 4, 4), 10)
    state = torch.get_rng_state()
    a = t.translate(x)
    b = t.translate(x, torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b) and torch.equal(a, t(x))
    torch.testing.assert_close(t.decode(t.encode(x)), a, rtol=0, atol=0)


def test_bad_arguments(sched):
    f = gaussian_oracle(0.0, 1.0)
    x = _images((1, 1, 4, 4), 11)
    cases = [
        (lambda: ddim_encode(f, sched, x, steps=0), "steps"),
        (lambda: ddim_encode(f, sched, x, steps=5, end_step=K + 1), "end_step"),
        (lambda: ddim_encode(f, sched, x, steps=5, prediction="score"), "prediction"),
        (lambda: ddim_encode(f, sched, x, steps=5, spacing="cubic"), "spacing"),
        (lambda: ddim_encode(f, sched, x, steps=5, iterations=-1), "iterations"),
        (lambda: ddim_encode(f, sched, x[0, 0], steps=5), "x0"),
        (lambda: ddim_encode(f, sched, x.long(), steps=5), "x0"),
        (lambda: ddim_encode(f, "linear", x, steps=5), "schedule"),
        (lambda: DDIBTranslator(f, 3, sched), "target_denoiser"),
        (lambda: DDIBTranslator(f, f, sched, 0), "steps"),
        (lambda: DDIBTranslator(f, f, sched, end_step=0), "end_step"),
        (lambda: DDIBTranslator(f, f, sched, clip=(1, -1)), "clip"),
        (lambda: DDIBTranslator(f, f, sched).translate(x, generator=1), "generator"),
    ]
    for call, name in cases:
        with pytest.raises(ValueError, match=name) as info:
            call()
        assert "\n" not in str(info.value)


# -- (d) condition-free U-Nets -----------------------------------------------------------------------


@pytest.mark.parametrize("ndim, shape", [(2, (2, 1, 8, 8)), (3, (1, 1, 4, 4, 4))])
def test_unconditional_unets(ndim, shape):
    sched = LinearSchedule(1e-4, 2e-2, 50)
    cfg = UNetConfig(ndim=ndim, cond_channels=0, base_channels=4, channel_mults=(1,), attention_levels=(), norm_groups=4)
    src, tgt = ConditionalUNet(cfg, generator=make_generator(1)), ConditionalUNet(cfg, generator=make_generator(2))
    t = DDIBTranslator(src, tgt, sched, 5).eval()
    assert set(dict(t.named_children())) == {"source_denoiser", "target_denoiser"}
    x = torch.randn(shape, generator=make_generator(12))
    with torch.no_grad():
        y = t.translate(x)
        ref = DDIMSampler(5).decode(tgt, sched, None, DDIMSampler(5).encode(src, sched, None, x, 50), 50)
    assert y.shape == x.shape and bool(torch.isfinite(y).all())
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    assert to_json(t)["config"]["steps"] == 5
