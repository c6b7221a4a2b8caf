"""The noise-prediction loss (closed forms, draws, gradients) and the EMA of the weights."""

import math

import numpy as np
import pytest
import torch
from conftest import SpySchedule, make_generator
from scipy import stats

from plasticine.diffusion import EMA, CosineSchedule, LinearSchedule, NoisePredictionLoss, min_snr_weight, noise_prediction_loss, prediction_target, split_prediction


def zero(noisy, gamma, condition):
    return torch.zeros_like(noisy)


def oracle(noisy, gamma, condition):
    """Knows the clean image (passed as the condition), so it returns the exact noise."""
    g = gamma.view(-1, *([1] * (noisy.dim() - 1)))
    return (noisy - g.sqrt() * condition) / (1 - g).sqrt()


SCHED = LinearSchedule(1e-4, 2e-2, 50)


def _replay(schedule, y, seed):
    """The documented draw order: (k, gamma) first, then the noise."""
    g = make_generator(seed)
    k, gamma = schedule.sample_gamma(y.shape[0], g)
    noise = torch.randn(y.shape, generator=g, dtype=y.dtype)
    return k, gamma, noise


@pytest.mark.parametrize("kind", ["l1", "l2"])
def test_zero_denoiser_equals_the_norm_of_the_drawn_noise(kind, dtype, ndim, device):
    y = torch.randn((3, 2) + (5, 4, 3)[:ndim], generator=make_generator(0), dtype=dtype)
    got = noise_prediction_loss(zero, SCHED, y.to(device), None, make_generator(1), kind)
    _, _, noise = _replay(SCHED, y, 1)
    ref = noise.abs().mean() if kind == "l1" else noise.square().mean()
    assert got.shape == () and got.dtype == dtype and got.device == device
    torch.testing.assert_close(got.cpu(), ref, rtol=1e-6 if device.type == "cuda" else 0, atol=0)


def test_constant_denoiser_closed_forms():
    """eps_hat = c: E|c - n| = c (2 Phi(c) - 1) + 2 phi(c) (folded normal), E(c - n)^2 = c^2 + 1."""
    c = 0.7
    y = torch.zeros(64, 1, 32, 32, dtype=torch.float64)
    const = lambda noisy, gamma, cond: torch.full_like(noisy, c)  # noqa: E731
    l1 = noise_prediction_loss(const, SCHED, y, None, make_generator(2), "l1").item()
    l2 = noise_prediction_loss(const, SCHED, y, None, make_generator(2), "l2").item()
    n = y.numel()
    ref_l1 = c * (2 * stats.norm.cdf(c) - 1) + 2 * stats.norm.pdf(c)
    assert abs(l1 - ref_l1) < 5 * math.sqrt(1.0 / n)
    assert abs(l2 - (c * c + 1)) < 5 * math.sqrt((2 + 4 * c * c) / n)
    assert abs(noise_prediction_loss(zero, SCHED, y, None, make_generator(3), "l1").item() - math.sqrt(2 / math.pi)) < 5 / math.sqrt(n)


@pytest.mark.parametrize("kind", ["l1", "l2"])
def test_oracle_denoiser_has_zero_loss(kind):
    y = torch.randn(8, 1, 6, 6, generator=make_generator(4), dtype=torch.float64)
    assert noise_prediction_loss(oracle, CosineSchedule(40), y, y, make_generator(5), kind).item() < 1e-9


def test_the_denoiser_sees_continuous_levels_and_the_noised_input():
    y = torch.randn(300, 1, 2, 2, generator=make_generator(6), dtype=torch.float64)
    seen = {}

    def rec(noisy, gamma, condition):
        seen.update(noisy=noisy, gamma=gamma, condition=condition)
        return zero(noisy, gamma, condition)

    cond = torch.ones(300, 3, 2, 2, dtype=torch.float64)
    noise_prediction_loss(rec, SCHED, y, cond, make_generator(7))
    k, gamma, noise = _replay(SCHED, y, 7)
    assert seen["gamma"].dtype == y.dtype and seen["condition"] is cond
    torch.testing.assert_close(seen["gamma"], gamma, rtol=0, atol=0)
    g = SCHED.gammas
    assert bool((gamma >= g[k]).all()) and bool((gamma < g[k - 1]).all())
    assert len(set(np.round(gamma.numpy(), 12))) == 300  # continuous, not the 50 discrete levels
    col = gamma.view(-1, 1, 1, 1)
    torch.testing.assert_close(seen["noisy"], col.sqrt() * y + (1 - col).sqrt() * noise, rtol=0, atol=1e-15)


def test_loss_float32_gamma_is_cast_and_seed_reproducible():
    y = torch.randn(4, 1, 5, 5, generator=make_generator(8))
    net = torch.nn.Conv2d(1, 1, 3, padding=1)
    den = lambda x, g, c: net(x) * g.view(-1, 1, 1, 1)  # noqa: E731
    a = noise_prediction_loss(den, SCHED, y, None, make_generator(9))
    b = noise_prediction_loss(den, SCHED, y, None, make_generator(9))
    c = noise_prediction_loss(den, SCHED, y, None, make_generator(10))
    assert a.dtype == torch.float32 and torch.equal(a, b) and not torch.equal(a, c)


def test_gradient_flows_and_gradcheck():
    y = torch.randn(3, 1, 6, 6, generator=make_generator(11), dtype=torch.float64)
    torch.manual_seed(11)  # the weights: with others the L1 gradient of the output bias can be exactly 0
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(4, 1, 3, padding=1)).double()

    def den(x, gamma, cond):
        return net(torch.cat([x, gamma.view(-1, 1, 1, 1).expand_as(x)], 1))

    noise_prediction_loss(den, SCHED, y, None, make_generator(12), "l1").backward()
    for p in net.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    w = torch.randn(1, 1, 3, 3, generator=make_generator(13), dtype=torch.float64, requires_grad=True)
    conv = lambda x, g, c, w: torch.nn.functional.conv2d(x, w, padding=1)  # noqa: E731
    for kind in ("l2",):  # l1 has kinks; l2 is smooth in the weights
        assert torch.autograd.gradcheck(lambda w: noise_prediction_loss(lambda x, g, c: conv(x, g, c, w), SCHED, y, None, make_generator(14), kind), (w,))


def test_module_form_matches_the_function():
    y = torch.randn(2, 1, 4, 4, generator=make_generator(15))
    mod = NoisePredictionLoss(SCHED, "l2")
    assert torch.equal(mod(zero, y, None, make_generator(16)), noise_prediction_loss(zero, SCHED, y, None, make_generator(16), "l2"))
    assert "l2" in repr(mod)
    with pytest.raises(ValueError, match="loss"):
        NoisePredictionLoss(SCHED, "huber")


def test_the_loss_draws_through_the_schedule_protocol():
    """The level and the noising come from the schedule's methods, so any NoiseSchedule trains."""
    y = torch.randn(3, 1, 4, 4, generator=make_generator(17))
    spy = SpySchedule(SCHED)
    loss = noise_prediction_loss(zero, spy, y, None, make_generator(18))
    assert spy.calls == ["sample_gamma", "diffuse"]
    assert torch.equal(loss, noise_prediction_loss(zero, SCHED, y, None, make_generator(18)))


def test_loss_input_errors():
    y = torch.zeros(2, 1, 4, 4)
    with pytest.raises(ValueError, match="loss"):
        noise_prediction_loss(zero, SCHED, y, None, make_generator(0), "l3")
    with pytest.raises(ValueError, match="y"):
        noise_prediction_loss(zero, SCHED, torch.zeros(2, 4, 4), None, make_generator(0))
    with pytest.raises(ValueError, match="floating"):
        noise_prediction_loss(zero, SCHED, torch.zeros(2, 1, 4, 4, dtype=torch.int64), None)
    with pytest.raises(ValueError, match="condition"):
        noise_prediction_loss(zero, SCHED, y, torch.zeros(2, 1, 4, 3), make_generator(0))
    with pytest.raises(ValueError, match="denoiser output"):
        noise_prediction_loss(lambda x, g, c: x[:1], SCHED, y, None, make_generator(0))
    with pytest.raises(ValueError, match="schedule"):
        noise_prediction_loss(zero, object(), y, None, make_generator(0))


# -- EMA -----------------------------------------------------------------------------------------------


def _set(model, value):
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)


# -- parametrisations and min-SNR weighting ------------------------------------------------------------


def oracle_in(prediction):
    """The exact output of a denoiser trained in ``prediction`` (the clean image comes as the condition)."""

    def predict(noisy, gamma, condition):
        g = gamma.view(-1, *([1] * (noisy.dim() - 1)))
        eps = oracle(noisy, gamma, condition)
        return {"eps": eps, "x0": condition, "v": g.sqrt() * eps - (1 - g).sqrt() * condition}[prediction]

    return predict


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_each_parametrisation_has_a_zero_loss_oracle_and_its_own_target(prediction):
    y = torch.randn(4, 1, 6, 5, generator=make_generator(30), dtype=torch.float64)
    assert float(noise_prediction_loss(oracle_in(prediction), SCHED, y, y, make_generator(31), prediction=prediction)) < 1e-10
    # the zero denoiser's error is the norm of the target: noise (eps), y (x0), sqrt(g) eps - sqrt(1 - g) y (v)
    _, gamma, noise = _replay(SCHED, y, 32)
    target = prediction_target(y, noise, gamma, prediction)
    got = noise_prediction_loss(zero, SCHED, y, None, make_generator(32), "l2", prediction=prediction)
    torch.testing.assert_close(got, target.square().mean(), rtol=1e-12, atol=0)
    # split_prediction inverts the target: the true (eps, x0) back from the noisy input
    noisy = SCHED.diffuse(y, gamma, noise)
    eps, x0 = split_prediction(target, noisy, gamma, prediction)
    torch.testing.assert_close(eps, noise, rtol=0, atol=1e-9)
    torch.testing.assert_close(x0, y, rtol=0, atol=1e-9)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_min_snr_weighting_weights_each_sample(prediction):
    """w = min(SNR, c) / SNR (eps), min(SNR, c) (x0), min(SNR, c) / (SNR + 1) (v), SNR = gamma / (1 - gamma)."""
    y = torch.randn(5, 1, 4, 4, generator=make_generator(33), dtype=torch.float64)
    _, gamma, noise = _replay(SCHED, y, 34)
    snr = gamma / (1 - gamma)
    w = {"eps": snr.clamp(max=5.0) / snr, "x0": snr.clamp(max=5.0), "v": snr.clamp(max=5.0) / (snr + 1)}[prediction]
    torch.testing.assert_close(min_snr_weight(gamma, 5.0, prediction), w, rtol=1e-12, atol=0)
    per_sample = prediction_target(y, noise, gamma, prediction).abs().flatten(1).mean(1)
    got = noise_prediction_loss(zero, SCHED, y, None, make_generator(34), prediction=prediction, snr_gamma=5.0)
    torch.testing.assert_close(got, (w * per_sample).mean(), rtol=1e-12, atol=0)
    # min-SNR in each parametrisation is the same weight on the x0 error: w_eps SNR = w_x0 = w_v (SNR + 1)
    torch.testing.assert_close(min_snr_weight(gamma, 5.0, "eps") * snr, min_snr_weight(gamma, 5.0, "x0"), rtol=1e-12, atol=0)
    # a cap above every SNR leaves the eps loss unweighted
    plain = noise_prediction_loss(zero, SCHED, y, None, make_generator(34))
    torch.testing.assert_close(noise_prediction_loss(zero, SCHED, y, None, make_generator(34), snr_gamma=1e12), plain, rtol=1e-12, atol=0)
    module = NoisePredictionLoss(SCHED, prediction=prediction, snr_gamma=5.0)
    assert torch.equal(module(zero, y, None, make_generator(34)), got)


def test_parametrisation_option_errors():
    y = torch.zeros(2, 1, 4, 4)
    for kwargs, what in (({"prediction": "noise"}, "prediction: expected one of"), ({"snr_gamma": 0.0}, "snr_gamma"), ({"snr_gamma": float("nan")}, "snr_gamma")):
        with pytest.raises(ValueError, match=what) as err:
            noise_prediction_loss(zero, SCHED, y, None, make_generator(0), **kwargs)
        assert "\n" not in str(err.value)
        with pytest.raises(ValueError, match=what):
            NoisePredictionLoss(SCHED, **kwargs)


def test_ema_recursion_matches_numpy():
    net = torch.nn.Linear(3, 2).double()
    ema = EMA(net, decay=0.9)
    start = {n: p.detach().clone().numpy() for n, p in net.named_parameters()}
    rng = np.random.default_rng(0)
    ref = dict(start)
    for _ in range(7):
        with torch.no_grad():
            for n, p in net.named_parameters():
                p.copy_(torch.from_numpy(rng.normal(size=tuple(p.shape))))
        ema.update()
        for n, p in net.named_parameters():
            ref[n] = 0.9 * ref[n] + 0.1 * p.detach().numpy()
    for n in ref:
        np.testing.assert_allclose(ema.shadow[n].numpy(), ref[n], rtol=1e-13, atol=1e-15)
    assert ema.num_updates == 7


def test_ema_constant_parameters_closed_form():
    net = torch.nn.Conv2d(1, 2, 3).double()
    _set(net, 0.0)
    ema = EMA(net, decay=0.99)
    _set(net, 1.0)
    for _ in range(50):
        ema.update()
    for t in ema.shadow.values():
        torch.testing.assert_close(t, torch.full_like(t, 1 - 0.99**50), rtol=1e-12, atol=0)


def test_ema_swap_in_and_out_restores_even_on_error():
    net = torch.nn.Linear(2, 2)
    _set(net, 0.0)
    ema = EMA(net, decay=0.5)
    _set(net, 4.0)
    ema.update()  # average: 2.0
    x = torch.ones(1, 2)
    with ema.average_parameters() as m:
        assert m is net
        torch.testing.assert_close(net(x), torch.full((1, 2), 2.0 * 2 + 2.0))
    torch.testing.assert_close(net.weight, torch.full((2, 2), 4.0))
    with pytest.raises(RuntimeError, match="boom"):
        with ema.average_parameters():
            raise RuntimeError("boom")
    torch.testing.assert_close(net.weight, torch.full((2, 2), 4.0))
    other = torch.nn.Linear(2, 2)
    ema.copy_to(other)
    torch.testing.assert_close(other.weight, torch.full((2, 2), 2.0))
    ema.copy_to()
    torch.testing.assert_close(net.bias, torch.full((2,), 2.0))


def test_ema_state_dict_round_trip_and_errors():
    net = torch.nn.Linear(3, 1)
    ema = EMA(net, decay=0.8)
    _set(net, 1.0)
    ema.update()
    ema.update()
    state = ema.state_dict()
    fresh = EMA(torch.nn.Linear(3, 1), decay=0.1)
    fresh.load_state_dict(state)
    assert fresh.decay == 0.8 and fresh.num_updates == 2
    for n in state["shadow"]:
        assert torch.equal(fresh.shadow[n], ema.shadow[n])
    state["shadow"]["weight"].add_(1.0)  # the state is a copy
    assert not torch.equal(state["shadow"]["weight"], ema.shadow["weight"])
    with pytest.raises(ValueError, match="expected parameters"):
        EMA(torch.nn.Linear(3, 1, bias=False)).load_state_dict(ema.state_dict())
    with pytest.raises(ValueError, match="expected shape"):
        EMA(torch.nn.Linear(4, 1)).load_state_dict(ema.state_dict())
    with pytest.raises(ValueError, match="keys"):
        fresh.load_state_dict({"shadow": {}})


def test_ema_validation_and_low_precision():
    with pytest.raises(ValueError, match="decay"):
        EMA(torch.nn.Linear(1, 1), decay=1.0)
    with pytest.raises(ValueError, match="model"):
        EMA("net")
    net = torch.nn.Linear(2, 2).to(torch.bfloat16)
    ema = EMA(net, decay=0.9999)
    assert all(t.dtype == torch.float32 for t in ema.shadow.values())
    before = ema.shadow["weight"].clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update()
    # a bfloat16 average could not move by 1e-4; the float32 one does
    torch.testing.assert_close(ema.shadow["weight"] - before, torch.full((2, 2), 1e-4), rtol=0.02, atol=0)
    net2 = torch.nn.Linear(2, 2)
    ema2 = EMA(net2)
    net2.extra = torch.nn.Parameter(torch.zeros(1))
    with pytest.raises(ValueError, match="parameters changed"):
        ema2.update()
