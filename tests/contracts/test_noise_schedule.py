"""Contract of :class:`plasticine.core.NoiseSchedule`: every schedule in IMPLEMENTATIONS passes these unchanged.

A new schedule is added to IMPLEMENTATIONS (an id and a factory); the last test fails when
``plasticine.diffusion`` exports a schedule that is not listed. The closed forms of each schedule
(linear, cosine) stay in ``tests/test_diffusion_schedules.py``.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import make_generator
from hypothesis import given
from hypothesis import strategies as st

import plasticine.diffusion as diffusion
from plasticine.core import NoiseSchedule
from plasticine.diffusion import CosineSchedule, DiscreteSchedule, LinearSchedule, ScheduleFromBetas, noise_like

from ._signatures import normalised_signature, protocol_members

IMPLEMENTATIONS = [
    ("linear", lambda: LinearSchedule(1e-4, 2e-2, 50)),
    ("linear-paper", lambda: LinearSchedule()),
    ("cosine", lambda: CosineSchedule(40)),
    ("from-betas", lambda: ScheduleFromBetas(torch.linspace(0.3, 0.01, 30, dtype=torch.float64) ** 2 + 1e-3)),
    ("from-betas-one-step", lambda: ScheduleFromBetas([0.5])),
    ("discrete", lambda: DiscreteSchedule(torch.full((12,), 0.05, dtype=torch.float64))),
]
IDS = [name for name, _ in IMPLEMENTATIONS]
MEMBERS = protocol_members(NoiseSchedule)
PROPERTIES = [m for m in MEMBERS if isinstance(vars(NoiseSchedule)[m], property)]
METHODS = [m for m in MEMBERS if m not in PROPERTIES]


@pytest.fixture(params=[make for _, make in IMPLEMENTATIONS], ids=IDS)
def schedule(request) -> NoiseSchedule:
    return request.param()


def _images(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = make_generator(seed)
    y0 = torch.randn(shape, generator=g, dtype=dtype)
    return y0, noise_like(y0, g)


# -- the protocol and its signatures -----------------------------------------------------------------


def test_satisfies_the_protocol(schedule):
    assert isinstance(schedule, NoiseSchedule)
    K = schedule.num_steps
    g = schedule.gammas
    assert isinstance(K, int) and K >= 1
    assert g.dtype == torch.float64 and g.shape == (K + 1,)
    assert g[0].item() == 1.0 and bool((g[1:] < g[:-1]).all()) and g[-1].item() > 0


def test_the_protocol_declares_every_operation():
    """One API: the forward process by step and by level, the training draw, the posterior."""
    assert set(MEMBERS) == {"num_steps", "gammas", "q_sample", "diffuse", "sample_gamma", "posterior_coefficients", "posterior"}
    assert PROPERTIES == ["num_steps", "gammas"]


@pytest.mark.parametrize("member", METHODS)
def test_signatures_are_uniform(member):
    """Every schedule's method has the protocol's signature: names, defaults and types."""
    expected = normalised_signature(getattr(NoiseSchedule, member))
    for name, make in IMPLEMENTATIONS:
        assert normalised_signature(getattr(type(make()), member)) == expected, f"{name}.{member}"


@pytest.mark.parametrize("member", PROPERTIES)
def test_properties_are_properties(member):
    for name, make in IMPLEMENTATIONS:
        assert isinstance(inspect.getattr_static(type(make()), member), property), f"{name}.{member}"


# -- the forward process ---------------------------------------------------------------------------------


def test_q_sample_shapes_dtype_and_closed_form(schedule, dtype, ndim):
    K = schedule.num_steps
    shape = (4, 2) + (5, 6, 3)[:ndim]
    y0, noise = _images(shape, 1, dtype)
    k = torch.tensor([0, K, 1, (K + 1) // 2])
    out = schedule.q_sample(y0, k, noise)
    assert out.shape == shape and out.dtype == dtype
    g = schedule.gammas[k].view(-1, *([1] * (len(shape) - 1)))
    ref = g.sqrt() * y0.double() + (1 - g).sqrt() * noise.double()
    tol = 1e-6 if dtype == torch.float32 else 1e-13
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    assert torch.equal(out[0], y0[0])  # k = 0 is the clean image


def test_int_and_tensor_steps_are_the_same(schedule, dtype):
    """A Python int, a 0-d tensor and a (B,) tensor of one step give identical results."""
    y0, noise = _images((3, 1, 4, 5), 2, dtype)
    for k in sorted({0, 1, schedule.num_steps // 2, schedule.num_steps}):
        by_int = schedule.q_sample(y0, k, noise)
        assert torch.equal(by_int, schedule.q_sample(y0, torch.tensor(k), noise))
        assert torch.equal(by_int, schedule.q_sample(y0, torch.full((3,), k), noise))
    K = schedule.num_steps
    k, kp = K, K - 1
    c_int = schedule.posterior_coefficients(k, kp)
    c_tensor = schedule.posterior_coefficients(torch.tensor([k]), torch.tensor([kp]))
    assert all(a.shape == () and b.shape == (1,) and torch.equal(a.reshape(1), b) for a, b in zip(c_int, c_tensor))
    yk = schedule.q_sample(y0, k, noise)
    m_int, v_int = schedule.posterior(y0, yk, k, kp)
    m_tensor, v_tensor = schedule.posterior(y0, yk, torch.full((3,), k), torch.full((3,), kp))
    assert torch.equal(m_int, m_tensor) and torch.equal(v_int, v_tensor)


def test_diffuse_at_the_step_levels_is_q_sample(schedule):
    y0, noise = _images((3, 2, 4, 4), 3)
    k = torch.tensor([0, 1, schedule.num_steps])
    assert torch.equal(schedule.diffuse(y0, schedule.gammas[k], noise), schedule.q_sample(y0, k, noise))


# -- the training draw ----------------------------------------------------------------------------------


def test_sample_gamma_range_dtype_and_determinism(schedule):
    K = schedule.num_steps
    k, gamma = schedule.sample_gamma(300, make_generator(4))
    assert k.shape == gamma.shape == (300,) and k.dtype == torch.int64 and gamma.dtype == torch.float64
    assert int(k.min()) >= 1 and int(k.max()) <= K
    g = schedule.gammas
    assert bool((gamma >= g[k]).all()) and bool((gamma < g[k - 1]).all())  # within the levels around k, never 1
    k2, gamma2 = schedule.sample_gamma(300, make_generator(4))
    assert torch.equal(k, k2) and torch.equal(gamma, gamma2)
    _, gamma3 = schedule.sample_gamma(300, make_generator(5))
    assert not torch.equal(gamma, gamma3)
    k4, gamma4 = schedule.sample_gamma(2, make_generator(4), device="cpu")
    assert k4.device.type == gamma4.device.type == "cpu"


# -- the posterior ----------------------------------------------------------------------------------------


@given(seed=st.integers(0, 2**31 - 1))
def test_posterior_keeps_the_marginals(seed):
    """y_k ~ q(y_k | y0) then y_k' ~ q(y_k' | y0, y_k) gives q(y_k' | y0), for any pair k' < k, on every schedule."""
    rng = torch.Generator().manual_seed(seed)
    for _, make in IMPLEMENTATIONS:
        s = make()
        K = s.num_steps
        k = torch.randint(1, K + 1, (5,), generator=rng)
        kp = (torch.rand(5, generator=rng, dtype=torch.float64) * k).long()  # uniform in [0, k - 1]
        c0, ck, var = s.posterior_coefficients(k, kp)
        g = s.gammas
        torch.testing.assert_close(c0 + ck * g[k].sqrt(), g[kp].sqrt(), rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(ck**2 * (1 - g[k]) + var, 1 - g[kp], rtol=1e-10, atol=1e-15)


def test_posterior_tensor_form(schedule):
    y0, yk = _images((3, 2, 4, 5), 6)
    K = schedule.num_steps
    k = torch.tensor([1, K, max(1, K // 3)])
    kp = k - 1
    mean, var = schedule.posterior(y0, yk, k, kp)
    c0, ck, v = schedule.posterior_coefficients(k, kp)
    assert mean.shape == y0.shape and var.shape == (3, 1, 1, 1)
    torch.testing.assert_close(mean, c0.view(-1, 1, 1, 1) * y0 + ck.view(-1, 1, 1, 1) * yk)
    torch.testing.assert_close(var.flatten(), v)
    assert var[0].item() == 0.0  # k = 1 to 0: y0 is known exactly


# -- errors ---------------------------------------------------------------------------------------------------


def test_bad_steps_give_one_line_errors_naming_the_argument(schedule):
    K = schedule.num_steps
    y0 = torch.zeros(2, 1, 4, 4)
    cases = [
        (lambda: schedule.q_sample(y0, torch.tensor([1.0, 2.0]), y0), "k", "integer"),
        (lambda: schedule.q_sample(y0, 1.0, y0), "k", r"int or a \(B,\) integer tensor"),
        (lambda: schedule.q_sample(y0, None, y0), "k", "NoneType"),
        (lambda: schedule.q_sample(y0, True, y0), "k", "bool"),
        (lambda: schedule.q_sample(y0, K + 1, y0), "k", rf"steps in \[0, {K}\]"),
        (lambda: schedule.q_sample(y0, torch.tensor([-1, 0]), y0), "k", rf"steps in \[0, {K}\]"),
        (lambda: schedule.q_sample(y0, torch.tensor([0, 1, 1]), y0), "k", "B=3"),
        (lambda: schedule.q_sample(y0, torch.zeros(2, 1, dtype=torch.int64), y0), "k", "shape"),
        (lambda: schedule.q_sample(y0, 0, torch.zeros(2, 1, 4, 5)), "noise", "expected shape"),
        (lambda: schedule.diffuse(y0, torch.tensor([1.5, 0.5], dtype=torch.float64), y0), "gamma", r"\[0, 1\]"),
        (lambda: schedule.sample_gamma(0), "batch", "an int >= 1, got 0"),
        (lambda: schedule.posterior_coefficients(0, 0), "k", rf"steps in \[1, {K}\]"),
        (lambda: schedule.posterior_coefficients(1, 1), "k_prev", None),
        (lambda: schedule.posterior_coefficients(torch.tensor([1, 1]), torch.tensor([0, 0, 0])), "k_prev", "shape"),
        (lambda: schedule.posterior(y0, y0, torch.tensor([1, 1, 1]), 0), "k", "B=3"),
    ]
    for call, name, what in cases:
        with pytest.raises(ValueError, match=what) as err:
            call()
        msg = str(err.value)
        assert msg.startswith(f"{name}:") and "\n" not in msg, msg


# -- the list is complete --------------------------------------------------------------------------------------


def test_every_exported_schedule_is_listed():
    exported = {
        obj
        for obj in (getattr(diffusion, name) for name in diffusion.__all__)
        if inspect.isclass(obj) and all(hasattr(obj, m) for m in MEMBERS)
    }
    listed = {type(make()) for _, make in IMPLEMENTATIONS}
    assert exported, "no schedule found: the protocol members changed?"
    assert exported <= listed, f"add to IMPLEMENTATIONS: {sorted(c.__name__ for c in exported - listed)}"
