"""Noise schedules: closed forms in float64, the forward process, the posterior, the training draw."""

import math

import numpy as np
import pytest
import torch
from conftest import make_generator
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats

from plasticine.core import NoiseSchedule
from plasticine.diffusion import (
    CosineSchedule,
    DiscreteSchedule,
    LinearSchedule,
    ScheduleFromBetas,
)

SCHEDULES = {
    "linear-paper": lambda: LinearSchedule(),
    "linear-100": lambda: LinearSchedule(1e-4, 2e-2, 100),
    "cosine-100": lambda: CosineSchedule(100),
    "cosine-s0": lambda: CosineSchedule(50, s=0.0),
    "from-betas": lambda: ScheduleFromBetas(torch.linspace(0.3, 0.01, 30, dtype=torch.float64) ** 2 + 1e-3),
    "one-step": lambda: ScheduleFromBetas([0.5]),
}


@pytest.fixture(params=list(SCHEDULES), ids=list(SCHEDULES))
def schedule(request):
    """Every schedule kind (the contract suite runs on each)."""
    return SCHEDULES[request.param]()


# -- contract: every schedule ------------------------------------------------------------------------


def test_contract_arrays(schedule):
    assert isinstance(schedule, NoiseSchedule)
    K = schedule.num_steps
    g, b, a = schedule.gammas, schedule.betas, schedule.alphas
    for arr in (g, b, a):
        assert arr.dtype == torch.float64 and arr.shape == (K + 1,) and arr.device.type == "cpu"
    assert g[0] == 1.0 and b[0] == 0.0 and a[0] == 1.0
    assert bool((g[1:] < g[:-1]).all()) and bool((g > 0).all()) and bool((g <= 1).all())
    assert bool((b[1:] > 0).all()) and bool((b[1:] < 1).all())
    np.testing.assert_array_equal(a.numpy(), 1 - b.numpy())
    np.testing.assert_allclose(g.numpy(), np.cumprod(1 - b.numpy()), rtol=1e-14, atol=0)


def test_contract_arrays_are_copies(schedule):
    g = schedule.gammas
    g[1] = 5.0
    assert schedule.gammas[1] < 1


def test_contract_config_rebuilds(schedule):
    assert not callable(schedule.config)  # one meaning of config: the constructor arguments, a mapping
    rebuilt = type(schedule).from_config(schedule.config)
    torch.testing.assert_close(rebuilt.gammas, schedule.gammas, rtol=0, atol=0)
    assert repr(schedule).startswith(type(schedule).__name__)


def test_contract_q_sample_closed_form(schedule, dtype, ndim):
    g = make_generator(1)
    K = schedule.num_steps
    shape = (4, 2) + (5, 6, 3)[:ndim]
    y0 = torch.randn(shape, generator=g, dtype=dtype)
    noise = torch.randn(shape, generator=g, dtype=dtype)
    k = torch.tensor([0, K, 1, K // 2])
    out = schedule.q_sample(y0, k, noise)
    assert out.dtype == dtype and out.shape == shape
    gam = schedule.gammas.numpy()[k.numpy()].reshape(-1, *([1] * (len(shape) - 1)))
    ref = np.sqrt(gam) * y0.double().numpy() + np.sqrt(1 - gam) * noise.double().numpy()
    tol = 1e-6 if dtype == torch.float32 else 1e-13
    np.testing.assert_allclose(out.double().numpy(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(out[0], y0[0], rtol=0, atol=0)  # k = 0 is the clean image


def test_contract_q_sample_errors(schedule):
    y0 = torch.zeros(2, 1, 4, 4)
    K = schedule.num_steps
    with pytest.raises(ValueError, match="integer"):
        schedule.q_sample(y0, torch.tensor([1.0, 2.0]), y0)
    with pytest.raises(ValueError, match=r"expected steps in \[0, "):
        schedule.q_sample(y0, torch.tensor([0, K + 1]), y0)
    with pytest.raises(ValueError, match=r"expected steps in \[0, "):
        schedule.q_sample(y0, torch.tensor([-1, 0]), y0)
    with pytest.raises(ValueError, match="B=3"):
        schedule.q_sample(y0, torch.tensor([0, 1, 1]), y0)
    with pytest.raises(ValueError, match="noise"):
        schedule.q_sample(y0, torch.tensor([0, 1]), torch.zeros(2, 1, 4, 5))
    with pytest.raises(ValueError, match=r"\(B,\) integer tensor"):
        schedule.q_sample(y0, 1.0, y0)


def test_contract_sample_gamma(schedule):
    K = schedule.num_steps
    k, gamma = schedule.sample_gamma(500, make_generator(3))
    assert k.dtype == torch.int64 and gamma.dtype == torch.float64 and k.shape == gamma.shape == (500,)
    assert int(k.min()) >= 1 and int(k.max()) <= K
    g = schedule.gammas
    assert bool((gamma >= g[k]).all()) and bool((gamma < g[k - 1]).all())
    k2, gamma2 = schedule.sample_gamma(500, make_generator(3))
    assert torch.equal(k, k2) and torch.equal(gamma, gamma2)
    k3, _ = schedule.sample_gamma(500, make_generator(4))
    assert K == 1 or not torch.equal(k, k3)


def test_contract_posterior_is_bayes(schedule):
    """q(y_{k-1} | y0, yk) against the product of the two Gaussians it comes from."""
    K = schedule.num_steps
    g = schedule.gammas.numpy()
    a = schedule.alphas.numpy()
    b = schedule.betas.numpy()
    ks = np.unique(np.array([1, 2, K // 2, K]).clip(1, K))
    c0, ck, var = schedule.posterior_coefficients(torch.as_tensor(ks), torch.as_tensor(ks) - 1)
    # q(yk | y_{k-1}) = N(sqrt(a) y_{k-1}, b) times q(y_{k-1} | y0) = N(sqrt(g_{k-1}) y0, 1 - g_{k-1});
    # at k = 1 the second factor is a point mass at y0 (checked below by the closed form and in
    # test_contract_posterior_tensor_form)
    m = ks >= 2
    kb = ks[m]
    prec = a[kb] / b[kb] + 1 / (1 - g[kb - 1])
    ref_var = 1 / prec
    np.testing.assert_allclose(var.numpy()[m], ref_var, rtol=1e-10)
    np.testing.assert_allclose(ck.numpy()[m], ref_var * np.sqrt(a[kb]) / b[kb], rtol=1e-10)
    np.testing.assert_allclose(c0.numpy()[m], ref_var * np.sqrt(g[kb - 1]) / (1 - g[kb - 1]), rtol=1e-10)
    # the closed form of Ho et al. eq. 7 (with beta_k itself; the code forms 1 - gamma_k / gamma_{k-1},
    # which loses about 6 digits of float64 when beta_k = 1e-6, hence rtol 1e-9)
    np.testing.assert_allclose(var.numpy(), b[ks] * (1 - g[ks - 1]) / (1 - g[ks]), rtol=1e-9)
    np.testing.assert_allclose(c0.numpy(), np.sqrt(g[ks - 1]) * b[ks] / (1 - g[ks]), rtol=1e-9)
    np.testing.assert_allclose(ck.numpy(), np.sqrt(a[ks]) * (1 - g[ks - 1]) / (1 - g[ks]), rtol=1e-12)


def test_contract_posterior_tensor_form(schedule):
    gen = make_generator(5)
    K = schedule.num_steps
    y0 = torch.randn(3, 2, 4, 5, generator=gen, dtype=torch.float64)
    yk = torch.randn(3, 2, 4, 5, generator=gen, dtype=torch.float64)
    k = torch.tensor([1, K, max(1, K // 3)])
    mean, var = schedule.posterior(y0, yk, k, k - 1)
    c0, ck, v = schedule.posterior_coefficients(k, k - 1)
    assert mean.shape == y0.shape and var.shape == (3, 1, 1, 1)
    torch.testing.assert_close(mean, c0.view(-1, 1, 1, 1) * y0 + ck.view(-1, 1, 1, 1) * yk)
    torch.testing.assert_close(var.flatten(), v)
    assert var[0].item() == 0.0  # k = 1: y0 is known exactly
    with pytest.raises(ValueError, match=r"expected steps in \[1, "):
        schedule.posterior(y0, yk, torch.tensor([0, 1, 1]), 0)


# -- closed forms -----------------------------------------------------------------------------------


def test_linear_is_the_papers_linspace():
    s = LinearSchedule()
    assert s.num_steps == 2000
    np.testing.assert_array_equal(s.betas.numpy()[1:], np.linspace(1e-6, 1e-2, 2000, dtype=np.float64))
    np.testing.assert_allclose(s.gammas.numpy()[1:], np.cumprod(1 - np.linspace(1e-6, 1e-2, 2000)), rtol=1e-13)
    # sum of betas is about 10, so gamma_K is about exp(-10)
    assert 3e-5 < s.gammas[-1].item() < 6e-5


def test_cosine_closed_form():
    K, s_off = 200, 0.008
    s = CosineSchedule(K, s=s_off)
    t = np.arange(K + 1) / K
    f = np.cos((t + s_off) / (1 + s_off) * np.pi / 2) ** 2
    ref = f / f[0]
    betas_ref = np.minimum(1 - ref[1:] / ref[:-1], 0.999)
    np.testing.assert_allclose(s.betas.numpy()[1:], betas_ref, rtol=1e-12)
    clipped = 1 - ref[1:] / ref[:-1] > 0.999
    assert clipped[-1] and clipped.sum() == 1  # only the last step is clipped
    np.testing.assert_allclose(s.gammas.numpy()[:K], ref[:K], rtol=1e-12)
    assert s.gammas[-1].item() == pytest.approx(ref[K - 1] * 0.001, rel=1e-12)


@given(seed=st.integers(0, 2**31 - 1), K=st.integers(1, 60))
def test_from_betas_matches_numpy(seed, K):
    betas = torch.rand(K, generator=make_generator(seed), dtype=torch.float64) * 0.5 + 1e-4
    s = ScheduleFromBetas(betas)
    np.testing.assert_allclose(s.gammas.numpy(), np.concatenate([[1.0], np.cumprod(1 - betas.numpy())]), rtol=1e-14)
    assert isinstance(s, DiscreteSchedule)
    # marginal consistency of the posterior: y_k ~ q(y_k|y0), y_{k'} ~ q(y_{k'}|y0, y_k) gives q(y_{k'}|y0)
    rng = np.random.default_rng(seed)
    k = int(rng.integers(1, K + 1))
    kp = int(rng.integers(0, k))
    c0, ck, var = s.posterior_coefficients(k, kp)
    g = s.gammas.numpy()
    assert float(c0 + ck * math.sqrt(g[k])) == pytest.approx(math.sqrt(g[kp]), rel=1e-12, abs=1e-15)
    assert float(ck**2 * (1 - g[k]) + var) == pytest.approx(1 - g[kp], rel=1e-12, abs=1e-15)


def test_posterior_by_quadrature():
    """The posterior mean and variance of one scalar, by numerical integration of the Bayes product."""
    s = LinearSchedule(1e-3, 5e-2, 40)
    g, a = s.gammas.numpy(), s.alphas.numpy()
    y0, yk, k = 0.7, -0.4, 17
    grid = np.linspace(-6, 6, 200001)
    like = stats.norm.pdf(yk, np.sqrt(a[k]) * grid, np.sqrt(1 - a[k]))
    prior = stats.norm.pdf(grid, np.sqrt(g[k - 1]) * y0, np.sqrt(1 - g[k - 1]))
    w = like * prior
    w /= np.trapezoid(w, grid)
    mean_q = np.trapezoid(grid * w, grid)
    var_q = np.trapezoid((grid - mean_q) ** 2 * w, grid)
    mean, var = s.posterior(torch.full((1, 1, 1, 1), y0, dtype=torch.float64), torch.full((1, 1, 1, 1), yk, dtype=torch.float64), torch.tensor([k]), k - 1)
    assert mean.item() == pytest.approx(mean_q, abs=1e-7)
    assert var.item() == pytest.approx(var_q, rel=1e-6)


def test_q_sample_empirical_moments():
    s = LinearSchedule(1e-4, 2e-2, 100)
    gen = make_generator(11)
    n = 20000
    y0 = torch.full((n, 1, 1, 1), 1.3, dtype=torch.float64)
    for k in (1, 30, 100):
        out = s.q_sample(y0, torch.full((n,), k), torch.randn(y0.shape, generator=gen, dtype=torch.float64))
        gk = s.gammas[k].item()
        se = math.sqrt((1 - gk) / n)
        assert abs(out.mean().item() - math.sqrt(gk) * 1.3) < 5 * se + 1e-12
        assert out.var().item() == pytest.approx(1 - gk, rel=0.05)


def test_sample_noise_level_is_uniform():
    s = LinearSchedule(1e-2, 1e-1, 10)
    k, gamma = s.sample_gamma(20000, make_generator(21))
    counts = np.bincount(k.numpy(), minlength=11)[1:]
    assert stats.chisquare(counts).pvalue > 1e-4
    g = s.gammas
    u = ((gamma - g[k]) / (g[k - 1] - g[k])).numpy()
    assert stats.kstest(u, "uniform").pvalue > 1e-4


def test_sample_noise_level_device_and_errors():
    s = LinearSchedule(num_steps=20)
    k, gamma = s.sample_gamma(3, make_generator(0), device="cpu")
    assert k.device.type == "cpu" and gamma.shape == (3,)
    with pytest.raises(ValueError, match="batch"):
        s.sample_gamma(0)


def test_diffuse_continuous_levels():
    y0 = torch.ones(2, 1, 3, 3, dtype=torch.float64)
    noise = torch.full_like(y0, 2.0)
    s = LinearSchedule(num_steps=20)
    out = s.diffuse(y0, torch.tensor([1.0, 0.36], dtype=torch.float64), noise)
    torch.testing.assert_close(out[0], y0[0])
    torch.testing.assert_close(out[1], torch.full_like(y0[1], 0.6 + 0.8 * 2.0))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        s.diffuse(y0, torch.tensor([1.1, 0.5], dtype=torch.float64), noise)
    with pytest.raises(ValueError, match="floating"):
        s.diffuse(y0, torch.tensor([1, 0]), noise)


# -- validation ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: LinearSchedule(0.0, 1e-2, 10), "beta_start"),
        (lambda: LinearSchedule(1e-4, 1.0, 10), "beta_end"),
        (lambda: LinearSchedule(1e-2, 1e-4, 10), "beta_end: expected >= beta_start"),
        (lambda: LinearSchedule(1e-4, 1e-2, 0), "num_steps"),
        (lambda: LinearSchedule(1e-4, 1e-2, 2.5), "num_steps"),
        (lambda: LinearSchedule(1e-4, 1e-2, 1), "beta_start == beta_end"),
        (lambda: LinearSchedule(float("nan"), 1e-2, 10), "beta_start"),
        (lambda: CosineSchedule(0), "num_steps"),
        (lambda: CosineSchedule(10, s=-0.1), "s: expected"),
        (lambda: CosineSchedule(10, max_beta=1.0), "max_beta"),
        (lambda: ScheduleFromBetas([0.1, 0.0]), r"open interval \(0, 1\)"),
        (lambda: ScheduleFromBetas([0.1, 1.0]), r"open interval \(0, 1\)"),
        (lambda: ScheduleFromBetas([0.1, float("nan")]), "finite"),
        (lambda: ScheduleFromBetas(torch.full((2, 3), 0.1)), r"expected shape \(K\)"),
        (lambda: ScheduleFromBetas(torch.zeros(0, dtype=torch.float64)), "at least one step"),
        (lambda: ScheduleFromBetas([0.1, 1e-20]), "decrease strictly"),
        (lambda: ScheduleFromBetas([0.9] * 400), "underflows"),
    ],
)
def test_invalid_arguments_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_one_step_linear_is_allowed():
    s = LinearSchedule(0.5, 0.5, 1)
    torch.testing.assert_close(s.gammas, torch.tensor([1.0, 0.5], dtype=torch.float64))


@pytest.mark.parametrize("cls", [LinearSchedule, CosineSchedule])
@pytest.mark.parametrize("num_steps", [3_000_000_000, 3e9, 0, True])
def test_absurd_step_counts_are_refused_before_allocating(cls, num_steps):
    with pytest.raises(ValueError, match=r"num_steps: expected an int in \[1, 1000000\]"):
        cls(num_steps=num_steps)
