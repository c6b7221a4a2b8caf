r"""Contract of :class:`plasticine.core.Sampler`: every sampler in IMPLEMENTATIONS passes these unchanged.

A sampler steps from ``(start, start_step)``: ``start`` *is* :math:`y_{k_0}` (pure noise for
``k0 = K``, ``schedule.q_sample(x, k0, noise)`` otherwise) and is never noised by the sampler.
A new sampler is added to IMPLEMENTATIONS (an id, a factory, whether its steps draw noise); the
last test fails when ``plasticine.diffusion`` exports a sampler that is not listed. The maths of
each sampler (marginals, orders of convergence, the diffusers references) stays in
``tests/test_diffusion_samplers.py``.

Every sampler option of the parametrisation (``prediction``: eps, x0, v) and of the conditioning of
the data prediction (``clip``, ``dynamic_threshold``) keeps the oracle exact for an image inside the
clip range, and clipping keeps the output in range whatever the denoiser returns.

The oracle denoiser reads the clean image from the condition and returns the exact noise of its
input, :math:`\hat\epsilon = (y_k - \sqrt{\gamma_k} y_0) / \sqrt{1 - \gamma_k}`; every
sampler's last step returns the data prediction, which the oracle makes exact, so the result is
:math:`y_0` up to rounding, amplified by at most :math:`1/\sqrt{\gamma_{k_0}}` on the way: the bound
is ``ORACLE_TOL`` (float64: 1e-10, float32: 2e-4) on the schedule here.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import Recorder, make_generator
from hypothesis import given
from hypothesis import strategies as st

import plasticine.diffusion as diffusion
from plasticine.core import Sampler
from plasticine.diffusion import AncestralSampler, DDIMSampler, DPMSolverPP, LinearSchedule, PlanSampler, noise_like

from ._signatures import normalised_signature

IMPLEMENTATIONS = [
    # (id, factory, stochastic: whether the steps draw from the generator)
    ("ancestral", lambda: AncestralSampler(), True),
    ("ancestral-posterior-respaced", lambda: AncestralSampler("posterior", steps=12, spacing="linspace"), True),
    ("ddim-eta0", lambda: DDIMSampler(10), False),
    ("ddim-eta0.7", lambda: DDIMSampler(15, eta=0.7, spacing="leading"), True),
    ("dpm-solver++2m", lambda: DPMSolverPP(8), False),
    ("dpm-solver++1", lambda: DPMSolverPP(8, order=1, spacing="leading"), False),
    # the x0 conditioning and the log-SNR plan keep every contract (the images here lie in [-1, 1])
    ("ancestral-clip-log-snr", lambda: AncestralSampler(steps=12, spacing="log_snr", clip=(-1.0, 1.0)), True),
    ("ddim-threshold", lambda: DDIMSampler(10, dynamic_threshold=0.995), False),
    ("dpm-solver++2m-clip-log-snr", lambda: DPMSolverPP(8, spacing="log_snr", clip=(-1.0, 1.0)), False),
]
PREDICTION_KINDS = ("eps", "x0", "v")
# x0 conditioning options: each keeps an oracle of an image inside [-1, 1] exact
CONDITIONING = {"none": {}, "clip": {"clip": (-1.0, 1.0)}, "threshold": {"dynamic_threshold": 0.9}}
IDS = [name for name, _, _ in IMPLEMENTATIONS]
BASES = {PlanSampler}  # exported base classes, not samplers themselves
SCHEDULE = LinearSchedule(1e-4, 2e-2, 60)
K = SCHEDULE.num_steps
ORACLE_TOL = {torch.float32: 2e-4, torch.float64: 1e-10}


@pytest.fixture(params=IMPLEMENTATIONS, ids=IDS)
def case(request) -> tuple[Sampler, bool]:
    _, make, stochastic = request.param
    return make(), stochastic


@pytest.fixture
def sampler(case) -> Sampler:
    return case[0]


def oracle(x: torch.Tensor, gamma: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
    g = gamma.to(torch.float64).view(-1, *([1] * (x.dim() - 1)))
    return ((x.double() - g.sqrt() * condition.double()) / (1 - g).sqrt()).to(x.dtype)


def oracle_of(prediction: str):
    """The exact answer of a denoiser trained in ``prediction`` (eps, x0 or v) for the clean image in the condition."""

    def predict(x: torch.Tensor, gamma: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        g = gamma.to(torch.float64).view(-1, *([1] * (x.dim() - 1)))
        eps = oracle(x, gamma, condition).double()
        out = {"eps": eps, "x0": condition.double(), "v": g.sqrt() * eps - (1 - g).sqrt() * condition.double()}[prediction]
        return out.to(x.dtype)

    return predict


def with_options(sampler, **options):
    """The same sampler with some constructor options changed (through its config)."""
    return type(sampler).from_config({**sampler.config, **options})


def smooth_denoiser(x: torch.Tensor, gamma: torch.Tensor, condition: torch.Tensor | None) -> torch.Tensor:
    g = gamma.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
    return (1 - g).sqrt() * torch.tanh(1.5 * x + 0.3 * torch.roll(x, 1, -1))


def _images(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(shape, generator=make_generator(seed), dtype=dtype).clamp(-2, 2) * 0.5


# -- the protocol and its signature ----------------------------------------------------------------


def test_satisfies_the_protocol(sampler):
    assert isinstance(sampler, Sampler)


def test_sample_signatures_are_uniform():
    """Every sampler's ``sample`` has the protocol's signature: an explicit start step, no None meaning."""
    expected = normalised_signature(Sampler.sample)
    names = [p[0] for p in expected[0]]
    assert names == ["self", "denoiser", "schedule", "condition", "start", "start_step", "generator"]
    assert expected[0][names.index("start_step")][2] is inspect.Parameter.empty  # required
    for name, make, _ in IMPLEMENTATIONS:
        assert normalised_signature(type(make()).sample) == expected, name


def test_step_rules_share_the_base_signature():
    """Settings come from the constructor: no step rule takes an extra parameter (DDIM's eta did)."""
    expected = normalised_signature(PlanSampler._run)
    for name, make, _ in IMPLEMENTATIONS:
        cls = type(make())
        if issubclass(cls, PlanSampler):
            assert normalised_signature(cls._run) == expected, name


# -- shapes, dtypes, determinism --------------------------------------------------------------------


def test_shape_dtype_and_device(sampler, dtype, ndim, device):
    shape = (3, 2) + (6, 5, 4)[:ndim]
    start = torch.randn(shape, generator=make_generator(1), dtype=dtype).to(device)
    out = sampler.sample(smooth_denoiser, SCHEDULE, None, start, K, make_generator(2))
    assert out.shape == shape and out.dtype == dtype and out.device == start.device
    assert bool(torch.isfinite(out).all())


def test_same_generator_same_sample(case):
    sampler, stochastic = case
    start = _images((2, 1, 6, 6), 3)
    a = sampler.sample(smooth_denoiser, SCHEDULE, None, start, 40, make_generator(4))
    b = sampler.sample(smooth_denoiser, SCHEDULE, None, start, 40, make_generator(4))
    c = sampler.sample(smooth_denoiser, SCHEDULE, None, start, 40, make_generator(5))
    assert torch.equal(a, b)
    assert torch.equal(a, c) != stochastic  # only the stochastic steps read the generator


def test_int_and_tensor_start_steps_are_the_same(sampler):
    start = _images((3, 1, 5, 5), 6)
    by_int = sampler.sample(smooth_denoiser, SCHEDULE, None, start, 23, make_generator(7))
    for k0 in (torch.tensor(23), torch.full((3,), 23)):
        assert torch.equal(by_int, sampler.sample(smooth_denoiser, SCHEDULE, None, start, k0, make_generator(7)))


# -- the start -----------------------------------------------------------------------------------------


def test_the_start_is_the_state_at_the_start_step(sampler):
    """The first denoiser input is ``start`` itself at gamma_k0: the sampler does not noise it."""
    start = _images((2, 1, 4, 4), 8)
    rec = Recorder(smooth_denoiser)
    sampler.sample(rec, SCHEDULE, None, start, 37, make_generator(9))
    x, gamma = rec.calls[0]
    assert torch.equal(x, start)
    assert gamma.tolist() == [SCHEDULE.gammas[37].item()] * 2


def test_start_step_zero_returns_the_start(sampler):
    start = _images((2, 1, 4, 4), 10)
    rec = Recorder(smooth_denoiser)
    assert torch.equal(sampler.sample(rec, SCHEDULE, None, start, 0, make_generator(11)), start)
    assert rec.calls == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_oracle_from_pure_noise(sampler, dtype):
    """start_step = K: the start is pure noise."""
    y0 = _images((3, 2, 6, 5), 12, dtype)
    start = torch.randn(y0.shape, generator=make_generator(13), dtype=dtype)
    out = sampler.sample(oracle, SCHEDULE, y0, start, K, make_generator(14))
    torch.testing.assert_close(out, y0, rtol=0, atol=ORACLE_TOL[dtype])


@given(k0=st.integers(1, K), seed=st.integers(0, 2**31 - 1))
def test_oracle_recovers_x0_from_any_start_step(k0, seed):
    """From y_k0 = q_sample(x, k0, noise) of any image x, the oracle of y0 leads every sampler to y0."""
    y0 = _images((2, 1, 5, 4), seed % 1000)
    x = _images((2, 1, 5, 4), seed % 1000 + 1)
    g = make_generator(seed)
    start = SCHEDULE.q_sample(x, k0, noise_like(x, g))
    for name, make, _ in IMPLEMENTATIONS:
        out = make().sample(oracle, SCHEDULE, y0, start, k0, g)
        torch.testing.assert_close(out, y0, rtol=0, atol=ORACLE_TOL[torch.float64], msg=lambda m, n=name: f"{n}: {m}")


def test_per_sample_start_steps(sampler):
    """A (B,) tensor of start steps: every sample is denoised from its own step (0: left as it is)."""
    y0 = _images((4, 1, 5, 5), 15)
    k0 = torch.tensor([K, 0, 17, 3])
    start = SCHEDULE.q_sample(y0 + 1.0, k0, noise_like(y0, make_generator(16)))
    out = sampler.sample(oracle, SCHEDULE, y0, start, k0, make_generator(17))
    torch.testing.assert_close(out[k0 > 0], y0[k0 > 0], rtol=0, atol=ORACLE_TOL[torch.float64])
    assert torch.equal(out[1], y0[1] + 1.0)


# -- parametrisation and the conditioning of x0 ------------------------------------------------------


@pytest.mark.parametrize("conditioning", list(CONDITIONING), ids=list(CONDITIONING))
@pytest.mark.parametrize("prediction", PREDICTION_KINDS)
def test_an_oracle_in_each_parametrisation_recovers_x0(sampler, prediction, conditioning):
    """Read in its own parametrisation, with or without clipping, the oracle of y0 leads to y0 from pure noise and mid-schedule."""
    s = with_options(sampler, **{"clip": None, "dynamic_threshold": None, "prediction": prediction, **CONDITIONING[conditioning]})
    assert s.prediction == prediction and s.config["prediction"] == prediction
    y0 = _images((2, 1, 5, 4), 21)
    assert float(y0.abs().max()) <= 1.0
    for k0, seed in ((K, 22), (29, 23)):
        g = make_generator(seed)
        start = SCHEDULE.q_sample(_images(y0.shape, seed), k0, noise_like(y0, g))
        out = s.sample(oracle_of(prediction), SCHEDULE, y0, start, k0, g)
        torch.testing.assert_close(out, y0, rtol=0, atol=ORACLE_TOL[torch.float64])


@pytest.mark.parametrize("options", [{"clip": (-1.0, 1.0)}, {"clip": (-0.25, 0.5)}, {"dynamic_threshold": 0.995}], ids=["clip", "clip-asym", "threshold"])
def test_clipping_keeps_the_output_in_range_whatever_the_denoiser_says(sampler, options):
    """A denoiser that returns huge noise drives the unclipped output far out; clipped, it stays in range."""
    low, high = options.get("clip", (-1.0, 1.0))
    huge = lambda x, gamma, c: 1e4 * torch.sign(torch.sin(7.0 * x + 1.0))  # noqa: E731
    start = torch.randn(2, 1, 6, 5, generator=make_generator(24), dtype=torch.float64)
    free = with_options(sampler, clip=None, dynamic_threshold=None).sample(huge, SCHEDULE, None, start, K, make_generator(25))
    assert float(free.abs().max()) > 10 * max(abs(low), abs(high))  # the denoiser does push out of range
    for k0 in (K, 31):
        out = with_options(sampler, **{"clip": None, "dynamic_threshold": None, **options}).sample(huge, SCHEDULE, None, start, k0, make_generator(25))
        assert bool(torch.isfinite(out).all())
        assert float(out.min()) >= low and float(out.max()) <= high, (float(out.min()), float(out.max()))


@pytest.mark.parametrize("options", [{"clip": (-1.0, 1.0)}, {"dynamic_threshold": 0.9}, {"prediction": "v"}], ids=["clip", "threshold", "v"])
def test_the_options_propagate_a_non_finite_prediction(sampler, options):
    """Clipping never hides a NaN: a denoiser that returns NaN gives a non-finite output, not an in-range one."""
    nan = lambda x, gamma, c: torch.full_like(x, float("nan"))  # noqa: E731
    start = _images((2, 1, 4, 4), 28)
    out = with_options(sampler, **{"clip": None, "dynamic_threshold": None, **options}).sample(nan, SCHEDULE, None, start, 20, make_generator(29))
    assert bool(torch.isnan(out).all())


def test_the_default_options_are_the_paper_sampling(sampler):
    """The defaults read eps and condition nothing: the output is that of the sampler built without the options."""
    if sampler.config.get("clip") is not None or sampler.config.get("dynamic_threshold") is not None:
        pytest.skip("a case with conditioning on")
    start = _images((2, 1, 5, 5), 26)
    a = sampler.sample(smooth_denoiser, SCHEDULE, None, start, 40, make_generator(27))
    b = with_options(sampler, prediction="eps", clip=None, dynamic_threshold=None).sample(smooth_denoiser, SCHEDULE, None, start, 40, make_generator(27))
    assert torch.equal(a, b)


def test_bad_options_give_one_line_errors(sampler):
    cases = [
        ({"prediction": "noise"}, "prediction: expected one of"),
        ({"clip": (1.0, -1.0)}, "clip: expected low < high"),
        ({"clip": (0.0,)}, "clip: expected None or a"),
        ({"clip": (0.0, float("nan"))}, "clip"),
        ({"dynamic_threshold": 0.0}, "dynamic_threshold"),
        ({"dynamic_threshold": 1.5}, "dynamic_threshold"),
        ({"clip": (-1.0, 1.0), "dynamic_threshold": 0.9}, "at most one"),
    ]
    base = {"clip": None, "dynamic_threshold": None}
    for options, what in cases:
        with pytest.raises(ValueError, match=what) as err:
            with_options(sampler, **{**base, **options})
        assert "\n" not in str(err.value)


# -- errors -----------------------------------------------------------------------------------------------


def test_bad_start_steps_give_one_line_errors(sampler):
    x = torch.zeros(2, 1, 4, 4)
    cases = [
        (None, "NoneType"),  # no meaning of its own: pure noise is start_step = K
        (K + 1, rf"steps in \[0, {K}\]"),
        (-1, rf"steps in \[0, {K}\]"),
        (2.0, r"int or a \(B,\) integer tensor"),
        (torch.tensor([1.0, 2.0]), "integer"),
        (torch.tensor([1, 2, 3]), "B=3"),
    ]
    for k0, what in cases:
        with pytest.raises(ValueError, match=what) as err:
            sampler.sample(oracle, SCHEDULE, x, x, k0, make_generator(0))
        msg = str(err.value)
        assert msg.startswith("start_step:") and "\n" not in msg, msg


# -- the list is complete ----------------------------------------------------------------------------------


def test_every_exported_sampler_is_listed():
    exported = {
        obj
        for obj in (getattr(diffusion, name) for name in diffusion.__all__)
        if inspect.isclass(obj) and callable(getattr(obj, "sample", None)) and obj not in BASES
    }
    listed = {type(make()) for _, make, _ in IMPLEMENTATIONS}
    assert exported, "no sampler found: the protocol changed?"
    assert exported <= listed, f"add to IMPLEMENTATIONS: {sorted(c.__name__ for c in exported - listed)}"
    assert all(any(issubclass(c, base) for c in listed) for base in BASES)  # a base really is one
