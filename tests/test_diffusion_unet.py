"""ConditionalUNet: shapes at uneven 2D/3D sizes, gradients, determinism, the noise-level embedding,
the influence of the condition, input validation, and a short training run on real BrainWeb slices."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import make_generator
from plasticine.core import Denoiser, from_json, to_json
from plasticine.diffusion.conditioning import ConcatConditioning, LearnedConditioning
from plasticine.diffusion.unet import MAX_LOG_SNR, ConditionalUNet, UNetConfig, log_snr, noise_level_embedding


def tiny_config(ndim: int = 2, cond_channels: int = 1, **kw) -> UNetConfig:
    base = dict(ndim=ndim, in_channels=1, cond_channels=cond_channels, base_channels=8, channel_mults=(1, 2, 2),
                num_res_blocks=1, attention_levels=(2,), num_heads=2, dropout=0.0, norm_groups=4)
    base.update(kw)
    return UNetConfig(**base)


def tiny_net(ndim: int = 2, cond_channels: int = 1, film: bool = False, seed: int = 0, **kw) -> ConditionalUNet:
    cfg = tiny_config(ndim, cond_channels, **kw)
    enc = LearnedConditioning(cond_channels, channels=(4, 4, 8)[: len(cfg.channel_mults)], ndim=ndim) if film else None
    return ConditionalUNet(cfg, encoder=enc, generator=make_generator(seed))


def inputs(shape, cond_channels=1, seed=0, dtype=torch.float32):
    g = make_generator(seed)
    noisy = torch.randn(shape, generator=g, dtype=dtype)
    gamma = torch.rand(shape[0], generator=g, dtype=torch.float64) * 0.98 + 0.01
    cond = torch.randn((shape[0], cond_channels, *shape[2:]), generator=g, dtype=dtype) if cond_channels else None
    return noisy, gamma, cond


# -- shapes ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("film", [False, True], ids=["concat", "film"])
@pytest.mark.parametrize("size", [(37, 50), (9, 14, 11)], ids=["2d-37x50", "3d-9x14x11"])
def test_shape_uneven_sizes(size, film):
    ndim = len(size)
    net = tiny_net(ndim, cond_channels=2, film=film)
    noisy, gamma, cond = inputs((3, 1, *size), cond_channels=2)
    out = net(noisy, gamma, cond)
    assert out.shape == noisy.shape and out.dtype == noisy.dtype
    assert torch.isfinite(out).all()


@pytest.fixture(scope="module")
def small_net() -> ConditionalUNet:
    return tiny_net(2).eval()


@given(seed=st.integers(0, 2**31 - 1), h=st.integers(1, 23), w=st.integers(1, 23))
def test_shape_any_2d_size(small_net, seed, h, w):
    noisy, gamma, cond = inputs((2, 1, h, w), seed=seed)
    with torch.no_grad():
        assert small_net(noisy, gamma, cond).shape == (2, 1, h, w)


def test_float64_and_unconditional(dtype):
    net = tiny_net(2, cond_channels=0).to(dtype)
    noisy, gamma, _ = inputs((2, 1, 11, 7), cond_channels=0, dtype=dtype)
    out = net(noisy, gamma, None)
    assert out.shape == noisy.shape and out.dtype == dtype


def test_is_a_denoiser():
    assert isinstance(tiny_net(), Denoiser)


# -- gradients, determinism, batch independence ----------------------------------------------------------


@pytest.mark.parametrize("ndim", [2, 3])
def test_gradients_reach_every_parameter(ndim):
    net = tiny_net(ndim, cond_channels=2, film=True, attention_levels=(1, 2), num_res_blocks=2)
    size = (12, 10) if ndim == 2 else (6, 5, 7)
    noisy, gamma, cond = inputs((2, 1, *size), cond_channels=2)
    net(noisy, gamma, cond).square().mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} got an all-zero gradient"


def test_gradcheck_inputs_float64():
    net = tiny_net(2, cond_channels=1, film=True, base_channels=4, channel_mults=(1, 2), attention_levels=(1,), num_heads=1, norm_groups=2).double()
    noisy, gamma, cond = inputs((1, 1, 4, 3), dtype=torch.float64)
    noisy.requires_grad_(True)
    cond.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, c: net(x, gamma, c), (noisy, cond), eps=1e-6, atol=1e-5)


def test_eval_mode_is_deterministic():
    net = tiny_net(2, dropout=0.3).eval()
    noisy, gamma, cond = inputs((2, 1, 17, 13))
    with torch.no_grad():
        torch.testing.assert_close(net(noisy, gamma, cond), net(noisy, gamma, cond), rtol=0, atol=0)


def test_dropout_acts_in_train_mode_with_replayable_masks():
    net = tiny_net(2, dropout=0.5).train()
    noisy, gamma, cond = inputs((2, 1, 17, 13))
    a = net(noisy, gamma, cond, generator=make_generator(1))
    b = net(noisy, gamma, cond, generator=make_generator(2))
    assert (a - b).abs().max() > 1e-4
    torch.testing.assert_close(net(noisy, gamma, cond, generator=make_generator(1)), a, rtol=0, atol=0)
    with torch.no_grad():  # eval mode: no dropout, whatever the generator
        net.eval()
        torch.testing.assert_close(net(noisy, gamma, cond, generator=make_generator(1)), net(noisy, gamma, cond))


def test_initialisation_replays_from_a_generator():
    a, b, c = tiny_net(2, film=True, seed=5), tiny_net(2, film=True, seed=5), tiny_net(2, film=True, seed=6)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)
        if pa.dim() > 1:
            assert not torch.equal(pa, pc), name


@given(seed=st.integers(0, 2**31 - 1))
def test_batch_items_are_independent(small_net, seed):
    net = small_net
    noisy, gamma, cond = inputs((3, 1, 9, 12), seed=seed)
    with torch.no_grad():
        full = net(noisy, gamma, cond)
        for i in range(3):
            one = net(noisy[i : i + 1], gamma[i : i + 1], cond[i : i + 1])
            torch.testing.assert_close(full[i : i + 1], one, rtol=1e-4, atol=1e-5)


def test_config_round_trip_rebuilds_the_same_network():
    net = tiny_net(3, cond_channels=2).eval()
    cfg = from_json(json.loads(json.dumps(to_json(net.settings))))
    assert cfg == net.settings and isinstance(cfg.channel_mults, tuple)
    rebuilt = ConditionalUNet.from_config(net.config).eval()
    assert rebuilt.settings == net.settings
    rebuilt.load_state_dict(net.state_dict())
    noisy, gamma, cond = inputs((1, 1, 5, 6, 7), cond_channels=2)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(noisy, gamma, cond), net(noisy, gamma, cond), rtol=0, atol=0)


@pytest.mark.parametrize("ndim", [2, 3])
def test_memory_format_does_not_change_values(ndim):
    cfg = tiny_config(ndim)
    a = ConditionalUNet(cfg, channels_last=True, generator=make_generator(0)).eval()
    b = ConditionalUNet(cfg, channels_last=False, generator=make_generator(0)).eval()
    noisy, gamma, cond = inputs((2, 1, *((9, 10) if ndim == 2 else (5, 6, 7))))
    with torch.no_grad():
        out = a(noisy, gamma, cond)
        torch.testing.assert_close(out, b(noisy, gamma, cond), rtol=1e-4, atol=1e-5)
    assert out.is_contiguous()


# -- the noise-level embedding ---------------------------------------------------------------------------


def test_log_snr_closed_form():
    g = np.array([1e-6, 1e-4, 0.01, 0.3, 0.5, 0.9, 0.999999, 1.0])
    with np.errstate(divide="ignore"):
        expected = np.clip(np.log(g) - np.log1p(-g), -MAX_LOG_SNR, MAX_LOG_SNR)
    got = log_snr(torch.tensor(g, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9)
    assert got[-1] == MAX_LOG_SNR


def _palette_embedding(gamma: torch.Tensor, dim: int) -> torch.Tensor:
    """Palette's embedding of sqrt(gamma): transformer sinusoid with max period 10000 (reference for contrast)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float64) / half)
    arg = gamma.sqrt()[:, None] * freqs[None]
    return torch.cat([torch.cos(arg), torch.sin(arg)], dim=1)


def _min_neighbour_separation(embed, gammas: torch.Tensor, dim: int) -> float:
    e = embed(gammas, dim)
    return float((e[1:] - e[:-1]).norm(dim=1).min() / math.sqrt(dim // 2))  # relative to the row norm


@pytest.mark.parametrize("dim", [16, 32, 64])
def test_embedding_separates_levels_across_the_range(dim):
    # 40 levels from 1e-4 to 1 (log-spaced), plus levels close to 1 where images are almost clean
    far = torch.logspace(-4, 0, 40, dtype=torch.float64)
    near_one = 1 - torch.logspace(-6, -1, 20, dtype=torch.float64)
    for gammas in (far, near_one):
        ours = _min_neighbour_separation(noise_level_embedding, gammas, dim)
        palette = _min_neighbour_separation(_palette_embedding, gammas, dim)
        assert ours > 0.1, ours  # neighbours at least 10% of the embedding norm apart
        assert palette < 0.02, palette  # Palette's would fail the same test
    e = noise_level_embedding(far, dim)
    torch.testing.assert_close(e.norm(dim=1), torch.full((40,), math.sqrt(dim // 2), dtype=torch.float64))


def test_embedding_monotone_slowest_feature_and_distinct_far_levels():
    g = torch.logspace(-4, 0, 200, dtype=torch.float64)
    e = noise_level_embedding(g, 32)
    slowest = e[:, 0]  # sin(omega_min * lambda), monotone on the clipped range
    assert (slowest[1:] > slowest[:-1]).all()
    d = torch.cdist(e, e)
    off = d + torch.eye(200, dtype=torch.float64) * 1e9
    assert off.min() > 0.02 * math.sqrt(16)


def test_embedding_rejects_bad_input():
    with pytest.raises(ValueError, match="even"):
        noise_level_embedding(torch.tensor([0.5]), 7)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        noise_level_embedding(torch.tensor([0.0, 0.5]), 8)
    with pytest.raises(ValueError, match="gamma"):
        noise_level_embedding(torch.tensor([[0.5]]), 8)


# -- the condition matters -------------------------------------------------------------------------------


@pytest.mark.parametrize("film", [False, True], ids=["concat", "film"])
def test_condition_changes_the_output(film):
    net = tiny_net(2, cond_channels=2, film=film).eval()
    noisy, gamma, cond = inputs((2, 1, 16, 12), cond_channels=2)
    with torch.no_grad():
        base = net(noisy, gamma, cond)
        for ch in range(2):
            other = cond.clone()
            other[:, ch] = -other[:, ch]
            assert (net(noisy, gamma, other) - base).abs().mean() > 1e-3 * base.abs().mean()


def test_film_path_alone_carries_the_condition():
    net = tiny_net(2, cond_channels=1, film=True).eval()
    with torch.no_grad():
        net.stem.weight[:, 1:] = 0  # cut the concatenated condition: only FiLM sees it
    noisy, gamma, cond = inputs((1, 1, 16, 12))
    with torch.no_grad():
        assert (net(noisy, gamma, cond) - net(noisy, gamma, -cond)).abs().max() > 1e-4


def test_gamma_changes_the_output():
    net = tiny_net(2).eval()
    noisy, _, cond = inputs((2, 1, 16, 12))
    with torch.no_grad():
        a = net(noisy, torch.tensor([0.2, 0.2]), cond)
        b = net(noisy, torch.tensor([0.9, 0.9]), cond)
    assert (a - b).abs().mean() > 1e-4


def test_works_with_concat_conditioning_of_a_label_map():
    enc = ConcatConditioning(3, one_hot=True)
    labels = torch.randint(0, 3, (2, 1, 10, 9), generator=make_generator(3))
    net = tiny_net(2, cond_channels=3)
    noisy, gamma, _ = inputs((2, 1, 10, 9), cond_channels=0)
    assert net(noisy, gamma, enc(labels)).shape == noisy.shape


# -- bad input -------------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    net = tiny_net(2, cond_channels=1)
    noisy, gamma, cond = inputs((2, 1, 8, 8))
    with pytest.raises(ValueError, match=r"noisy: expected 1 channels"):
        net(torch.randn(2, 2, 8, 8), gamma, cond)
    with pytest.raises(ValueError, match=r"noisy.*2 spatial"):
        net(torch.randn(2, 1, 8, 8, 8), gamma, torch.randn(2, 1, 8, 8, 8))
    with pytest.raises(ValueError, match=r"gamma: expected shape \(B\)"):
        net(noisy, gamma[:, None], cond)
    with pytest.raises(ValueError, match=r"gamma.*B=3 does not match B=2"):
        net(noisy, torch.rand(3), cond)
    with pytest.raises(ValueError, match=r"gamma: expected shape"):
        net(noisy, torch.tensor(0.5), cond)
    for bad in ([0.0, 0.5], [0.5, 1.5], [-0.1, 0.5], [float("nan"), 0.5]):
        with pytest.raises(ValueError, match=r"gamma: expected cumulative signal levels in \(0, 1\]"):
            net(noisy, torch.tensor(bad), cond)
    with pytest.raises(ValueError, match="floating"):
        net(noisy, torch.tensor([1, 1]), cond)
    with pytest.raises(ValueError, match=r"condition: expected a \(2, 1, \*S\) tensor"):
        net(noisy, gamma, None)
    with pytest.raises(ValueError, match=r"condition: expected shape \(B, 1, \*S\)"):
        net(noisy, gamma, torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"condition.*does not match"):
        net(noisy, gamma, torch.randn(2, 1, 8, 9))
    with pytest.raises(ValueError, match=r"condition: expected dtype torch.float32"):
        net(noisy, gamma, cond.double())
    with pytest.raises(ValueError, match="unconditional"):
        tiny_net(2, cond_channels=0)(noisy, gamma, cond)
    # gamma == 1 (a clean image) is a valid level
    assert net(noisy, torch.ones(2), cond).shape == noisy.shape


def test_bad_configs_raise():
    with pytest.raises(ValueError, match="norm_groups"):
        UNetConfig(base_channels=12, norm_groups=8)
    with pytest.raises(ValueError, match="attention_levels"):
        UNetConfig(channel_mults=(1, 2), attention_levels=(2,))
    with pytest.raises(ValueError, match="num_heads"):
        UNetConfig(base_channels=8, channel_mults=(1, 2, 2), attention_levels=(2,), num_heads=3, norm_groups=4)
    with pytest.raises(ValueError, match="ndim"):
        UNetConfig(ndim=4)
    with pytest.raises(ValueError, match="dropout"):
        UNetConfig(dropout=1.0)
    with pytest.raises(ValueError, match=r"^UNetConfig: cannot rebuild UNetConfig from its config: .*unexpected keyword argument 'width'"):
        from_json({"class": "UNetConfig", "config": {"width": 3}})
    cfg = tiny_config(2, cond_channels=2)
    with pytest.raises(ValueError, match="in_channels == cond_channels"):
        ConditionalUNet(cfg, encoder=LearnedConditioning(3, (4, 4, 8)))
    with pytest.raises(ValueError, match="3 levels"):
        ConditionalUNet(cfg, encoder=LearnedConditioning(2, (4, 8)))
    with pytest.raises(ValueError, match="ndim"):
        ConditionalUNet(cfg, encoder=LearnedConditioning(2, (4, 4, 8), ndim=3))


# -- learning on real images -----------------------------------------------------------------------------


def _train_on_brainweb(steps: int, batch: int, patch: int, seed: int = 0) -> list[float]:
    """Train a tiny U-Net to predict the noise of PD patches conditioned on the T1 patches."""
    from plasticine.data import brainweb_slices
    from plasticine.diffusion import LinearSchedule, noise_prediction_loss

    d = brainweb_slices()
    pair = torch.from_numpy(np.stack([d["pd"], d["t1"]])).float() / 127.5 - 1.0  # (2, 217, 181) in [-1, 1]
    g = make_generator(seed)
    net = ConditionalUNet(UNetConfig(base_channels=8, channel_mults=(1, 2), attention_levels=(1,), num_heads=1, norm_groups=4), generator=g)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    schedule = LinearSchedule()  # the paper's: 1e-6 .. 1e-2 over 2000 steps
    losses = []
    for _ in range(steps):
        ys = torch.randint(0, pair.shape[1] - patch + 1, (batch,), generator=g).tolist()
        xs = torch.randint(0, pair.shape[2] - patch + 1, (batch,), generator=g).tolist()
        crops = torch.stack([pair[:, y : y + patch, x : x + patch] for y, x in zip(ys, xs)])
        loss = noise_prediction_loss(net, schedule, crops[:, :1], crops[:, 1:], generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def test_tiny_model_learns_on_brainweb_quick():
    losses = _train_on_brainweb(steps=40, batch=4, patch=16)
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < 0.75 * first, (first, last)


@pytest.mark.slow
def test_tiny_model_learns_on_brainweb():
    losses = _train_on_brainweb(steps=250, batch=8, patch=32)
    first, last = np.mean(losses[:50]), np.mean(losses[-50:])
    assert last < 0.6 * first, (first, last)
