"""Samplers: step plans, oracle recovery, mid-schedule and per-sample starts, solver maths, DDIM inversion.

The oracle denoiser reads the clean image from the condition, so it follows samples through the
per-sample groups: eps_hat(y_k, gamma_k, c = y0) = (y_k - sqrt(gamma_k) y0) / sqrt(1 - gamma_k).
"""

import math
from fractions import Fraction

import pytest
import torch
from conftest import Recorder, make_generator
from hypothesis import given
from hypothesis import strategies as st

from plasticine.core import Sampler
from plasticine.diffusion import (
    AncestralSampler,
    CosineSchedule,
    DDIMSampler,
    DPMSolverPP,
    LinearSchedule,
    SampleResult,
    ScheduleFromBetas,
    noise_like,
    step_plan,
)


def _col(gamma, x):
    return gamma.to(torch.float64).view(-1, *([1] * (x.dim() - 1)))


def oracle(x, gamma, condition):
    """The exact noise of x given its clean image, which travels as the condition."""
    g = _col(gamma, x)
    return ((x.double() - g.sqrt() * condition.double()) / (1 - g).sqrt()).to(x.dtype)


def gaussian_denoiser(mu, s):
    """The optimal eps for data y0 ~ N(mu, s^2) per pixel: E[eps | y_k]."""

    def f(x, gamma, condition):
        g = _col(gamma, x)
        return ((1 - g).sqrt() * (x.double() - g.sqrt() * mu) / (g * s * s + 1 - g)).to(x.dtype)

    return f


def smooth_denoiser(x, gamma, condition):
    """A smooth, non-linear, spatially coupled denoiser (no relation to any data)."""
    g = _col(gamma, x).to(x.dtype)
    return (1 - g).sqrt() * (torch.tanh(1.5 * x + 0.3 * torch.roll(x, 1, -1)) + 0.2 * torch.sin(x))


def noised_sample(sampler, denoiser, schedule, condition, x, k0, generator, trajectory=False):
    """The sampler run from x noised to k0 with the schedule (the translator's start): the noise is the first draw."""
    start = schedule.q_sample(x, k0, noise_like(x, generator))
    run = sampler.sample_trajectory if trajectory else sampler.sample
    return run(denoiser, schedule, condition, start, k0, generator)


SAMPLERS = {
    "ancestral": lambda: AncestralSampler(),
    "ancestral-posterior": lambda: AncestralSampler("posterior"),
    "ancestral-respaced": lambda: AncestralSampler(steps=12, spacing="linspace"),
    "ddim": lambda: DDIMSampler(10),
    "ddim-eta": lambda: DDIMSampler(15, eta=0.7, spacing="leading"),
    "ddim-linspace": lambda: DDIMSampler(9, spacing="linspace"),
    "dpm2": lambda: DPMSolverPP(8),
    "dpm1": lambda: DPMSolverPP(8, order=1, spacing="leading"),
}
# |y_hat - y0| with the oracle: every sampler's last step returns the data prediction, which the
# oracle makes exact; what is left is rounding, amplified by 1 / sqrt(gamma) on the way.
ORACLE_TOL = {torch.float32: 2e-4, torch.float64: 1e-10}


@pytest.fixture(params=list(SAMPLERS), ids=list(SAMPLERS))
def sampler(request):
    """Every sampler configuration (the contract suite runs on each)."""
    return SAMPLERS[request.param]()


@pytest.fixture(scope="module")
def sched():
    return LinearSchedule(1e-4, 2e-2, 60)


def _images(shape, seed, dtype=torch.float64):
    return torch.randn(shape, generator=make_generator(seed), dtype=dtype).clamp(-2, 2) * 0.5


# -- plans -----------------------------------------------------------------------------------------


@given(K=st.integers(1, 400), steps=st.one_of(st.none(), st.integers(1, 450)), frac=st.floats(0, 1), spacing=st.sampled_from(["leading", "trailing", "linspace", "log_snr"]), none_start=st.booleans())
def test_plan_properties(K, steps, frac, spacing, none_start):
    k0 = K if none_start else int(round(frac * K))
    sampler = AncestralSampler(steps=steps, spacing=spacing)
    schedule = ScheduleFromBetas(torch.full((K,), 1e-3, dtype=torch.float64))
    plan = sampler.plan(schedule, k0)
    n = k0 if steps is None else min(steps, k0)
    assert len(plan) == n
    assert plan == step_plan(k0, steps, spacing, schedule.gammas)
    if k0 == 0:
        assert plan == []
        return
    assert plan[0][0] == k0 and plan[-1][1] == 0
    ks = [k for k, _ in plan] + [0]
    assert all(a > b for a, b in zip(ks, ks[1:]))  # strictly decreasing, so no duplicates
    assert all(p[1] == q[0] for p, q in zip(plan, plan[1:]))  # chained: k_prev is the next k
    assert all(isinstance(k, int) and isinstance(kp, int) for k, kp in plan)
    if n == k0:
        assert plan == [(k, k - 1) for k in range(k0, 0, -1)]


def _half_up(q: Fraction) -> int:
    return math.floor(q + Fraction(1, 2))


@given(k0=st.integers(1, 3000), n=st.integers(1, 3000))
def test_plan_spacings_against_brute_force(k0, n):
    """The documented grids, in exact rational arithmetic."""
    n = min(n, k0)
    if n == k0:
        return
    trailing = [k for k, _ in step_plan(k0, n, "trailing")]
    assert trailing == [_half_up(k0 - Fraction(i * k0, n)) for i in range(n)]
    linspace = [k for k, _ in step_plan(k0, n, "linspace")]
    assert linspace == ([_half_up(k0 - Fraction(i * (k0 - 1), n - 1)) for i in range(n)] if n > 1 else [k0])
    leading = [k for k, _ in step_plan(k0, n, "leading")]
    r = k0 // n
    assert leading == [k0] + [1 + r * i for i in range(n - 2, -1, -1)]


@given(k0=st.integers(2, 1000), n=st.integers(2, 60), cosine=st.booleans())
def test_log_snr_plan_is_evenly_spaced_in_log_snr(k0, n, cosine):
    """Each level of the "log_snr" plan is the step nearest to its evenly spaced log-SNR target.

    Targets: lambda(k0) + i (lambda(1) - lambda(k0)) / (n - 1), lambda = log(gamma / (1 - gamma));
    checked by brute force wherever the nearest steps of the targets are distinct (where two
    targets share a nearest step the plan moves a level by one; then only the structure holds).
    """
    n = min(n, k0 - 1)
    schedule = CosineSchedule(num_steps=1000) if cosine else LinearSchedule(1e-4, 2e-2, 1000)
    g = schedule.gammas.tolist()
    lam = {k: math.log(g[k]) - math.log1p(-g[k]) for k in range(1, k0 + 1)}
    levels = [k for k, _ in step_plan(k0, n, "log_snr", schedule.gammas)]
    assert len(levels) == n and levels[0] == k0 and levels[-1] >= 1
    assert all(a > b for a, b in zip(levels, levels[1:]))
    if n < 2:
        return
    targets = [lam[k0] + i * (lam[1] - lam[k0]) / (n - 1) for i in range(n)]
    nearest = [min(lam, key=lambda k, t=t: (abs(lam[k] - t), k)) for t in targets]
    if all(a > b for a, b in zip(nearest, nearest[1:])):
        assert levels == nearest
        assert levels[-1] == 1
        # within the discretisation: each level's log-SNR is within half a step's gap of its target
        for k, t in zip(levels, targets):
            gap = max(abs(lam[k] - lam[j]) for j in (k - 1, k + 1) if j in lam)
            assert abs(lam[k] - t) <= gap / 2 + 1e-12


def test_log_snr_spacing_needs_the_schedule():
    with pytest.raises(ValueError, match="gammas: the 'log_snr' spacing needs") as err:
        step_plan(10, 3, "log_snr")
    assert "\n" not in str(err.value)
    s = LinearSchedule(1e-4, 2e-2, 100)
    assert DDIMSampler(5, spacing="log_snr").plan(s, 100) == step_plan(100, 5, "log_snr", s.gammas)


def test_plan_known_values_and_the_previous_timestep_bug():
    """Peers compute k_prev = k - K // n, which is wrong for trailing and linspace grids."""
    assert step_plan(50, 7, "trailing") == [(50, 43), (43, 36), (36, 29), (29, 21), (21, 14), (14, 7), (7, 0)]
    assert step_plan(50, 7, "linspace") == [(50, 42), (42, 34), (34, 26), (26, 17), (17, 9), (9, 1), (1, 0)]
    assert step_plan(50, 7, "leading") == [(50, 36), (36, 29), (29, 22), (22, 15), (15, 8), (8, 1), (1, 0)]
    for spacing in ("trailing", "linspace"):
        plan = step_plan(50, 7, spacing)
        assert any(kp != k - 50 // 7 for k, kp in plan[:-1])  # the peer rule would be off here
    assert step_plan(1000, 10, "trailing") == [(1000 - 100 * i, 900 - 100 * i) for i in range(10)]
    assert step_plan(5, 1, "leading") == step_plan(5, 1, "trailing") == step_plan(5, 1, "linspace") == [(5, 0)]
    # exact ties round up (half-to-even would give 6 and 2 here)
    assert step_plan(13, 2, "trailing") == [(13, 7), (7, 0)]
    assert step_plan(4, 3, "linspace") == [(4, 3), (3, 1), (1, 0)]


def test_plan_mid_schedule_start_bookkeeping(sched):
    """A mid-schedule start gets its own plan: it starts exactly at k0 with n pairs."""
    d = DDIMSampler(10, spacing="trailing")
    plan = d.plan(sched, 37)
    assert plan[0][0] == 37 and plan[-1][1] == 0 and len(plan) == 10
    full = d.plan(sched, 60)
    assert full[0][0] == 60 and len(full) == 10
    assert len(d.plan(sched, 4)) == 4 and d.plan(sched, 0) == []
    with pytest.raises(ValueError, match=r"start_step: expected steps in \[0, 60\]"):
        d.plan(sched, 61)


@pytest.mark.parametrize("make", list(SAMPLERS.values()), ids=list(SAMPLERS))
def test_sampler_calls_follow_the_plan_from_a_mid_start(make, sched):
    """The denoiser sees gamma_k of every planned k, in order; the start is noised to exactly k0."""
    sampler = make()
    k0 = 41
    x0 = torch.zeros(2000, 1, 2, 2, dtype=torch.float64)
    rec = Recorder(oracle)
    noised_sample(sampler, rec, sched, x0, x0, k0, make_generator(0))
    plan = sampler.plan(sched, k0)
    assert len(rec.calls) == len(plan)
    got = [float(g[0]) for _, g in rec.calls]
    assert got == [sched.gammas[k].item() for k, _ in plan]
    first = rec.calls[0][0]
    assert first.std().item() == pytest.approx(math.sqrt(1 - sched.gammas[k0].item()), rel=0.05)


def test_validation_of_constructor_arguments():
    for make, match in [
        (lambda: DDIMSampler(0), "steps"),
        (lambda: DDIMSampler(None), "steps"),
        (lambda: DDIMSampler(10, eta=1.5), "eta"),
        (lambda: DDIMSampler(10, spacing="uniform"), "spacing"),
        (lambda: DPMSolverPP(10, order=3), "order"),
        (lambda: AncestralSampler("large"), "variance"),
        (lambda: AncestralSampler(steps=0), "steps"),
        (lambda: step_plan(-1, 3), "start"),
        (lambda: step_plan(3, 0), "steps"),
    ]:
        with pytest.raises(ValueError, match=match):
            make()


# -- contract: every sampler -------------------------------------------------------------------------


def test_contract_protocol_and_config(sampler):
    assert isinstance(sampler, Sampler)
    assert not callable(sampler.config)  # one meaning of config: the constructor arguments, a mapping
    rebuilt = type(sampler).from_config(sampler.config)
    assert rebuilt.config == sampler.config and repr(rebuilt) == repr(sampler)


def test_contract_oracle_from_pure_noise(sampler, sched, dtype, ndim):
    shape = (3, 2) + (6, 5, 4)[:ndim]
    y0 = _images(shape, 1, dtype)
    noise = torch.randn(shape, generator=make_generator(2), dtype=dtype)
    out = sampler.sample(oracle, sched, y0, noise, 60, make_generator(3))
    assert out.dtype == dtype and out.shape == shape
    torch.testing.assert_close(out, y0, rtol=0, atol=ORACLE_TOL[dtype])


def test_contract_oracle_from_mid_schedule(sampler, sched, dtype, device):
    y0 = _images((3, 1, 7, 6), 4, dtype).to(device)
    x_in = _images((3, 1, 7, 6), 5, dtype).to(device)  # the clean input that is noised to k0
    # the oracle denoises towards y0, whatever image was noised: the last step must land on y0
    out = noised_sample(sampler, oracle, sched, y0, x_in, torch.tensor([23, 23, 5], device=device), make_generator(6))
    assert out.device == y0.device
    torch.testing.assert_close(out, y0, rtol=0, atol=ORACLE_TOL[dtype])


def test_contract_half_precision_gets_float32_levels(sampler, sched):
    y0 = _images((2, 1, 4, 4), 30, torch.float16)
    rec = Recorder(oracle)
    out = noised_sample(sampler, rec, sched, y0, y0, 20, make_generator(31))
    assert out.dtype == torch.float16 and all(g.dtype == torch.float32 for _, g in rec.calls)
    assert (out.float() - y0.float()).abs().max() < 0.05


def test_contract_oracle_per_sample_start(sampler, sched):
    y0 = _images((5, 1, 6, 6), 7)
    starts = torch.tensor([60, 0, 17, 60, 3])
    rec = Recorder(oracle)
    out = noised_sample(sampler, rec, sched, y0, y0 + 1.0, starts, make_generator(8))
    torch.testing.assert_close(out[starts > 0], y0[starts > 0], rtol=0, atol=1e-10)
    torch.testing.assert_close(out[1], y0[1] + 1.0, rtol=0, atol=0)  # start 0: nothing to denoise
    # every group ran its own plan: the calls are the plans of 3, 17 and 60 (ascending), with group sizes
    expect = []
    for k0, size in ((3, 1), (17, 1), (60, 2)):
        expect += [(size, sched.gammas[k].item()) for k, _ in sampler.plan(sched, k0)]
    assert [(x.shape[0], float(g[0])) for x, g in rec.calls] == expect


def test_contract_per_sample_start_equals_separate_runs_for_deterministic_samplers(sched):
    d = DDIMSampler(7)
    x = _images((3, 1, 5, 5), 9)
    cond = _images((3, 1, 5, 5), 10)
    starts = torch.tensor([30, 12, 30])
    noise = torch.randn(x.shape, generator=make_generator(11), dtype=x.dtype)
    out = noised_sample(d, smooth_denoiser, sched, cond, x, starts, make_generator(11))
    for i in range(3):
        xi = sched.q_sample(x[i : i + 1], starts[i : i + 1], noise[i : i + 1])
        ref = d.decode(smooth_denoiser, sched, cond[i : i + 1], xi, int(starts[i]))
        torch.testing.assert_close(out[i : i + 1], ref, rtol=0, atol=1e-12)


def test_contract_same_seed_same_sample(sampler, sched):
    x = _images((2, 1, 6, 6), 12)
    a = noised_sample(sampler, smooth_denoiser, sched, None, x, 40, make_generator(13))
    b = noised_sample(sampler, smooth_denoiser, sched, None, x, 40, make_generator(13))
    assert torch.equal(a, b)
    c = noised_sample(sampler, smooth_denoiser, sched, None, x, 40, make_generator(14))
    assert not torch.equal(a, c)  # the noising at k0 differs


def test_contract_trajectory(sampler, sched):
    x = _images((2, 1, 5, 4), 15)
    res = noised_sample(sampler, smooth_denoiser, sched, None, x, 33, make_generator(16), trajectory=True)
    img = noised_sample(sampler, smooth_denoiser, sched, None, x, 33, make_generator(16))
    assert isinstance(res, SampleResult)
    assert torch.equal(res.image, img) and torch.equal(res.trajectory[-1], img)
    plan = sampler.plan(sched, 33)
    assert len(res.trajectory) == len(res.steps) == len(plan) + 1
    assert [int(s[0]) for s in res.steps] == [k for k, _ in plan] + [0]
    noise = torch.randn(x.shape, generator=make_generator(16), dtype=x.dtype)
    torch.testing.assert_close(res.trajectory[0], sched.q_sample(x, torch.full((2,), 33), noise))


def test_contract_trajectory_per_sample_padding(sampler, sched):
    x = _images((3, 1, 4, 4), 17)
    starts = torch.tensor([5, 20, 0])
    res = noised_sample(sampler, smooth_denoiser, sched, None, x, starts, make_generator(18), trajectory=True)
    n = max(len(sampler.plan(sched, 5)), len(sampler.plan(sched, 20)))
    assert len(res.trajectory) == n + 1
    for b, k0 in enumerate(starts.tolist()):
        ks = [k for k, _ in sampler.plan(sched, k0)] + [0]
        ks += [0] * (n + 1 - len(ks))
        assert [int(s[b]) for s in res.steps] == ks
        torch.testing.assert_close(res.trajectory[-1][b], res.image[b], rtol=0, atol=0)
    torch.testing.assert_close(res.trajectory[0][2], x[2], rtol=0, atol=0)


def test_contract_input_errors(sampler, sched):
    x = torch.zeros(2, 1, 4, 4)
    with pytest.raises(ValueError, match="start"):
        sampler.sample(oracle, sched, None, torch.zeros(2, 4, 4), 60)
    with pytest.raises(ValueError, match="condition"):
        sampler.sample(oracle, sched, torch.zeros(2, 1, 4, 5), x, 60)
    with pytest.raises(ValueError, match="condition"):
        sampler.sample(oracle, sched, torch.zeros(3, 1, 4, 4), x, 60)
    with pytest.raises(ValueError, match=r"start_step: expected steps in \[0, 60\]"):
        sampler.sample(oracle, sched, x, x, start_step=61)
    with pytest.raises(ValueError, match="integer"):
        sampler.sample(oracle, sched, x, x, start_step=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="B=3"):
        sampler.sample(oracle, sched, x, x, start_step=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="denoiser output"):
        sampler.sample(lambda y, g, c: y[:, :0], sched, None, x, 60)
    with pytest.raises(ValueError, match="floating"):
        sampler.sample(oracle, sched, None, torch.zeros(2, 1, 4, 4, dtype=torch.int64), 60)
    with pytest.raises(ValueError, match="gammas"):
        sampler.sample(oracle, object(), None, x, 60)


# -- the maths of each sampler -----------------------------------------------------------------------


def test_ancestral_same_seed_and_different_seeds(sched):
    noise = torch.randn(2, 1, 6, 6, generator=make_generator(0))
    a = AncestralSampler().sample(smooth_denoiser, sched, None, noise, 60, make_generator(1))
    b = AncestralSampler().sample(smooth_denoiser, sched, None, noise, 60, make_generator(1))
    c = AncestralSampler().sample(smooth_denoiser, sched, None, noise, 60, make_generator(2))
    assert torch.equal(a, b) and (a - c).abs().max() > 1e-2


def test_ancestral_posterior_variance_keeps_the_marginals_exact(sched):
    """With the oracle and the posterior variance, every state y_k is distributed as q(y_k | y0)."""
    y0 = torch.full((4000, 1, 2, 2), 0.8, dtype=torch.float64)
    res = noised_sample(AncestralSampler("posterior"), oracle, sched, y0, y0, 60, make_generator(4), trajectory=True)
    for state, step in zip(res.trajectory[:-1], res.steps[:-1]):
        g = sched.gammas[int(step[0])].item()
        resid = (state - math.sqrt(g) * 0.8) / math.sqrt(1 - g)
        assert abs(resid.mean().item()) < 0.05 and resid.std().item() == pytest.approx(1.0, abs=0.05)


def test_ancestral_beta_variance_is_exact_for_standard_gaussian_data():
    """For y0 ~ N(mu, I) the paper's variance beta_k makes every reverse step exact (Ho et al.)."""
    s = LinearSchedule(1e-4, 2e-2, 100)
    mu = 0.6
    x0 = mu + torch.randn(20000, 1, 1, 1, generator=make_generator(5), dtype=torch.float64)
    out = noised_sample(AncestralSampler("beta"), gaussian_denoiser(mu, 1.0), s, None, x0, 100, make_generator(6))
    assert out.mean().item() == pytest.approx(mu, abs=0.03)
    assert out.std().item() == pytest.approx(1.0, abs=0.02)
    # and the two outputs are not just the input (the chain went through noise)
    assert torch.corrcoef(torch.stack([out.flatten(), x0.flatten()]))[0, 1] < 0.9


def test_ddim_eta0_keeps_the_noise_direction(sched):
    """DDIM with eta = 0 and the oracle moves along sqrt(g) y0 + sqrt(1 - g) eps with a fixed eps."""
    y0 = _images((2, 1, 5, 5), 7)
    eps = torch.randn(y0.shape, generator=make_generator(8), dtype=torch.float64)
    res = DDIMSampler(9).sample_trajectory(oracle, sched, y0, eps * math.sqrt(1 - sched.gammas[-1].item()) + math.sqrt(sched.gammas[-1].item()) * y0, 60)
    for state, step in zip(res.trajectory[:-1], res.steps[:-1]):
        g = sched.gammas[int(step[0])].item()
        torch.testing.assert_close((state - math.sqrt(g) * y0) / math.sqrt(1 - g), eps, rtol=0, atol=1e-10)


def test_ddim_eta1_has_the_posterior_marginals(sched):
    y0 = torch.full((4000, 1, 2, 2), -0.5, dtype=torch.float64)
    res = noised_sample(DDIMSampler(6, eta=1.0), oracle, sched, y0, y0, 60, make_generator(10), trajectory=True)
    for state, step in zip(res.trajectory[:-1], res.steps[:-1]):
        g = sched.gammas[int(step[0])].item()
        resid = (state - math.sqrt(g) * -0.5) / math.sqrt(1 - g)
        assert abs(resid.mean().item()) < 0.05 and resid.std().item() == pytest.approx(1.0, abs=0.05)


def test_dpm_order1_is_ddim(sched):
    x = _images((2, 1, 6, 6), 11)
    for spacing in ("leading", "trailing", "linspace"):
        a = DPMSolverPP(9, order=1, spacing=spacing).sample(smooth_denoiser, sched, None, x, 60)
        b = DDIMSampler(9, spacing=spacing).sample(smooth_denoiser, sched, None, x, 60)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("schedule", [LinearSchedule(1e-4, 2e-2, 1000), CosineSchedule(1000)], ids=["linear", "cosine"])
def test_ode_solvers_converge_at_their_order(schedule):
    """Gaussian data N(mu, s^2): the probability-flow ODE maps y_K to mu + s (y_K - sqrt(g_K) mu) / sqrt(g_K s^2 + 1 - g_K)."""
    mu, s = 0.7, 0.4
    gK = schedule.gammas[-1].item()
    z = torch.linspace(-2, 2, 11, dtype=torch.float64).view(1, 1, 11, 1).expand(1, 1, 11, 2).contiguous()
    exact = mu + s * (z - math.sqrt(gK) * mu) / math.sqrt(gK * s * s + 1 - gK)
    den = gaussian_denoiser(mu, s)

    def err(sampler):
        return (sampler.sample(den, schedule, None, z, schedule.num_steps) - exact).abs().max().item()

    ddim = [err(DDIMSampler(n)) for n in (10, 40)]
    dpm = [err(DPMSolverPP(n)) for n in (10, 40)]
    assert 3.0 < ddim[0] / ddim[1] < 5.0  # first order: 4x smaller for 4x the steps
    assert dpm[0] / dpm[1] > 10.0  # second order: about 16x
    assert dpm[1] < ddim[1] / 5
    assert err(DPMSolverPP(200)) < 1e-3


# -- DDIM encode / decode -------------------------------------------------------------------------------


@pytest.mark.parametrize("end_step", [60, 25, torch.tensor([60, 7, 0])])
def test_encode_decode_oracle(sched, end_step):
    x0 = _images((3, 1, 6, 5), 12)
    d = DDIMSampler(10)
    latent = d.encode(oracle, sched, x0, x0, end_step)
    rec = d.decode(oracle, sched, x0, latent, end_step)
    torch.testing.assert_close(rec, x0, rtol=0, atol=1e-10)


@pytest.mark.parametrize("steps, iterations, tol", [(50, 0, 0.08), (200, 0, 0.02), (50, 3, 1e-5), (50, 10, 1e-10)])
def test_encode_decode_smooth_denoiser(steps, iterations, tol):
    """Explicit inversion is first order in the step; fixed-point refinement makes it exact."""
    s = LinearSchedule(1e-4, 2e-2, 200)
    x0 = _images((2, 1, 8, 8), 13)
    d = DDIMSampler(steps)
    latent = d.encode(smooth_denoiser, s, None, x0, 200, iterations=iterations)
    assert latent.std().item() > 0.3  # a real latent, not the image scaled down
    err = (d.decode(smooth_denoiser, s, None, latent, 200) - x0).abs().max().item()
    assert err < tol


def test_encode_decode_per_sample_and_translation_composes(sched):
    x0 = _images((3, 1, 6, 6), 14)
    d = DDIMSampler(12)
    ends = torch.tensor([40, 60, 9])
    latent = d.encode(smooth_denoiser, sched, None, x0, ends, iterations=8)
    for i in range(3):
        one = d.encode(smooth_denoiser, sched, None, x0[i : i + 1], int(ends[i]), iterations=8)
        torch.testing.assert_close(latent[i : i + 1], one, rtol=0, atol=1e-12)
    torch.testing.assert_close(d.decode(smooth_denoiser, sched, None, latent, ends), x0, rtol=0, atol=1e-8)
    # DDIB: encode with a source model, decode with a target model (here the oracle of a target image)
    target = _images((3, 1, 6, 6), 15)
    out = d.decode(oracle, sched, target, d.encode(smooth_denoiser, sched, None, x0, 60), 60)
    torch.testing.assert_close(out, target, rtol=0, atol=1e-10)


def test_encode_decode_need_eta_zero(sched):
    d = DDIMSampler(10, eta=0.5)
    x = torch.zeros(1, 1, 4, 4)
    with pytest.raises(ValueError, match="eta = 0"):
        d.encode(oracle, sched, x, x, 60)
    with pytest.raises(ValueError, match="eta = 0"):
        d.decode(oracle, sched, x, x, 60)
    with pytest.raises(ValueError, match="iterations"):
        DDIMSampler(10).encode(oracle, sched, x, x, 60, iterations=-1)


# -- the paper's setting and an independent reference ----------------------------------------------------


def test_papers_schedule_ancestral_oracle_2000_steps():
    s = LinearSchedule()
    y0 = _images((1, 1, 8, 8), 16, torch.float32)
    x = torch.rand(1, 1, 8, 8, generator=make_generator(17))
    out = noised_sample(AncestralSampler(), oracle, s, y0, x, 2000, make_generator(18))
    torch.testing.assert_close(out, y0, rtol=0, atol=ORACLE_TOL[torch.float32])


def _as_timestep_model(schedule, fn):
    g = schedule.gammas
    return lambda x, t: fn(x, torch.full((x.shape[0],), g[int(t) + 1].item(), dtype=x.dtype), None)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_against_diffusers_ddim_and_dpm_solver():
    """diffusers' timestep t is our step k = t + 1 (its alphas_cumprod[t] is our gamma_{t+1})."""
    diffusers = pytest.importorskip("diffusers")
    s = LinearSchedule(1e-4, 2e-2, 100)
    model = _as_timestep_model(s, smooth_denoiser)
    x_start = torch.randn(2, 1, 6, 6, generator=make_generator(19), dtype=torch.float64)
    ref_ddim = diffusers.DDIMScheduler(num_train_timesteps=100, trained_betas=s.betas[1:].numpy(), timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False)
    ref_ddim.set_timesteps(10)
    assert [int(t) + 1 for t in ref_ddim.timesteps] == [k for k, _ in DDIMSampler(10).plan(s, 100)]
    x = x_start.clone()
    for t in ref_ddim.timesteps:
        x = ref_ddim.step(model(x, t), t, x, eta=0.0).prev_sample
    # diffusers holds alphas_cumprod in float32, hence the tolerance
    torch.testing.assert_close(DDIMSampler(10).sample(smooth_denoiser, s, None, x_start, 100), x, rtol=0, atol=1e-5)
    for order in (1, 2):
        ours = DPMSolverPP(7, order=order, spacing="linspace")
        ref = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=100, trained_betas=s.betas[1:].numpy(), solver_order=order, algorithm_type="dpmsolver++", final_sigmas_type="zero", lower_order_final=True)
        ref.set_timesteps(timesteps=[k - 1 for k, _ in ours.plan(s, 100)])
        x = x_start.clone()
        for t in ref.timesteps:
            x = ref.step(model(x, t), t, x).prev_sample
        torch.testing.assert_close(ours.sample(smooth_denoiser, s, None, x_start, 100), x, rtol=0, atol=1e-5)


@pytest.mark.parametrize("variance, variance_type", [("beta", "fixed_large"), ("posterior", "fixed_small")])
def test_against_diffusers_ddpm_same_noise(variance, variance_type):
    """Same generator, same draws: the ancestral chain equals diffusers' DDPM step by step (float64)."""
    diffusers = pytest.importorskip("diffusers")
    s = LinearSchedule(1e-4, 2e-2, 100)
    ref = diffusers.DDPMScheduler(num_train_timesteps=100, trained_betas=s.betas[1:].numpy(), variance_type=variance_type, clip_sample=False)
    ref.betas, ref.alphas, ref.alphas_cumprod = s.betas[1:].clone(), s.alphas[1:].clone(), s.gammas[1:].clone()
    ref.one = torch.tensor(1.0, dtype=torch.float64)
    ref.set_timesteps(100)
    model = _as_timestep_model(s, smooth_denoiser)
    x_start = torch.randn(2, 1, 6, 6, generator=make_generator(20), dtype=torch.float64)
    g = make_generator(21)
    x = x_start.clone()
    for t in ref.timesteps:
        x = ref.step(model(x, t), t, x, generator=g).prev_sample
    ours = AncestralSampler(variance).sample(smooth_denoiser, s, None, x_start, 100, make_generator(21))
    torch.testing.assert_close(ours, x, rtol=0, atol=1e-10)
