"""Contract of :class:`~plasticine.core.Denoiser`: ``(noisy (B, C, *S), gamma (B,), condition) -> eps_hat (B, C, *S)``.

Every implementation in IMPLEMENTATIONS must pass every test here unchanged; a new denoiser is added
to the list (a factory taking the number of spatial dimensions and returning the denoiser, in eval
mode, and its number of condition channels, 0 for an unconditional one), and the suite fails if a
denoiser exported by a plasticine package is missing from it. The defining property: the estimate
has the shape and dtype of the noisy image, depends on the noise level and on the condition, is
deterministic in eval mode with each image independent of its batch, has finite gradients, and a
NaN in the input gives a non-finite estimate.
"""

from __future__ import annotations

import math

import pytest
import torch

from ._discovery import check_listed, check_uniform, factories, param
from plasticine.core import Denoiser
from plasticine.diffusion import ConditionalUNet, LearnedConditioning, PatchwiseDenoiser, UNetConfig


def tiny_unet(ndim: int, cond_channels: int = 2, encoder: bool = False):
    config = UNetConfig(ndim=ndim, cond_channels=cond_channels, base_channels=8, channel_mults=(1, 2), attention_levels=(1,), norm_groups=4)
    g = torch.Generator().manual_seed(0)
    enc = LearnedConditioning(cond_channels, (4, 8), ndim) if encoder else None
    return ConditionalUNet(config, encoder=enc, generator=g).eval(), cond_channels


def tiny_patchwise(ndim: int):
    """The tiny U-Net evaluated on overlapping patches smaller than the contract's grids, stitched."""
    unet, cond_channels = tiny_unet(ndim)
    return PatchwiseDenoiser(unet, patch=8 if ndim == 2 else 4, overlap=4 if ndim == 2 else 2).eval(), cond_channels


IMPLEMENTATIONS = [
    param(tiny_unet, "ConditionalUNet"),
    param(tiny_patchwise, "PatchwiseDenoiser"),
    param(lambda n: tiny_unet(n, encoder=True), "ConditionalUNet-learned-encoder"),
    param(lambda n: tiny_unet(n, cond_channels=0), "ConditionalUNet-unconditional"),
]

SHAPES = [(12, 10), (7, 6, 5)]


def inputs(shape, cond_channels, batch=2, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    noisy = torch.randn(batch, 1, *shape, generator=g, dtype=dtype)
    gamma = torch.rand(batch, generator=g, dtype=torch.float64) * 0.9 + 0.05
    cond = torch.rand(batch, cond_channels, *shape, generator=g, dtype=dtype) if cond_channels else None
    return noisy, gamma, cond


def test_every_exported_denoiser_is_listed():
    check_listed([make(2)[0] for make in factories(IMPLEMENTATIONS)], Denoiser)


def test_one_call_signature():
    check_uniform([make(2)[0] for make in factories(IMPLEMENTATIONS)], Denoiser)


@pytest.mark.parametrize("make", IMPLEMENTATIONS)
def test_is_a_denoiser(make):
    assert isinstance(make(2)[0], Denoiser)


@pytest.mark.parametrize("make", IMPLEMENTATIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=["2d", "3d"])
def test_shape_dtype_and_device_kept(make, shape, dtype, device):
    net, cc = make(len(shape))
    net = net.to(device, dtype)
    noisy, gamma, cond = (None if t is None else t.to(device) for t in inputs(shape, cc, dtype=dtype))
    out = net(noisy, gamma, cond)
    assert out.shape == noisy.shape and out.dtype == dtype and out.device == noisy.device


@pytest.mark.parametrize("make", IMPLEMENTATIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=["2d", "3d"])
def test_deterministic_and_independent_of_the_batch(make, shape):
    net, cc = make(len(shape))
    net = net.double()
    noisy, gamma, cond = inputs(shape, cc, batch=3, dtype=torch.float64)
    with torch.no_grad():
        out = net(noisy, gamma, cond)
        assert torch.equal(out, net(noisy, gamma, cond))
        alone = net(noisy[1:2], gamma[1:2], None if cond is None else cond[1:2])
    torch.testing.assert_close(out[1:2], alone, rtol=0, atol=1e-10)


@pytest.mark.parametrize("make", IMPLEMENTATIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=["2d", "3d"])
def test_depends_on_the_noise_level_and_the_condition(make, shape):
    net, cc = make(len(shape))
    noisy, gamma, cond = inputs(shape, cc, seed=1)
    with torch.no_grad():
        out = net(noisy, gamma, cond)
        assert not torch.allclose(out, net(noisy, 1.0 - gamma, cond), rtol=0, atol=1e-6)
        if cc:
            assert not torch.allclose(out, net(noisy, gamma, 1.0 - cond), rtol=0, atol=1e-6)


@pytest.mark.parametrize("make", IMPLEMENTATIONS)
def test_gradients_finite(make):
    net, cc = make(2)
    noisy, gamma, cond = inputs(SHAPES[0], cc, seed=2)
    noisy.requires_grad_(True)
    net(noisy, gamma, cond).square().mean().backward()
    grads = [p.grad for p in net.parameters()] + [noisy.grad]
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    assert float(noisy.grad.abs().sum()) > 0


@pytest.mark.parametrize("make", IMPLEMENTATIONS)
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_input_gives_non_finite_estimate(make, bad):
    net, cc = make(2)
    noisy, gamma, cond = inputs(SHAPES[0], cc, seed=3)
    noisy[0, 0, 5, 4] = bad
    with torch.no_grad():
        out = net(noisy, gamma, cond)
    assert not bool(torch.isfinite(out[0]).all())
