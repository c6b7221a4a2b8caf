"""Contract of :class:`~plasticine.core.SimilarityLoss`: ``(moving, fixed, mask) -> scalar``, lower is better.

Every implementation in IMPLEMENTATIONS must pass every test here unchanged; a new loss is added to
the list (a factory taking no argument), and the suite fails if a similarity loss exported by a
plasticine package is missing from it. The defining property: an image compared with itself scores
lower than compared with a shifted copy; a mask ``(B, 1, *S)`` restricts the comparison (what lies
outside it does not matter, a mask of ones is no mask); gradients are finite; NaN propagates.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ._discovery import check_listed, check_uniform, factories, param
from plasticine.core import SimilarityLoss
from plasticine.core.filters import gaussian_smooth
from plasticine.losses import NCC, LocalNCC, MutualInformation

IMPLEMENTATIONS = [
    param(NCC, "NCC"),
    param(LocalNCC, "LocalNCC"),
    param(lambda: LocalNCC(5), "LocalNCC-5"),
    param(MutualInformation, "MutualInformation"),
    param(lambda: MutualInformation(normalized=False), "MutualInformation-plain"),
    param(lambda: MutualInformation(bins=16, kernel="gaussian"), "MutualInformation-gaussian"),
]

SHAPES = [(24, 20), (12, 11, 10)]


def smooth_image(shape, batch=2, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return gaussian_smooth(torch.rand(batch, 1, *shape, generator=g, dtype=dtype), 1.5)


def inner_mask(shape, batch=2, margin=3):
    m = torch.zeros(batch, 1, *shape)
    m[(slice(None), slice(None)) + tuple(slice(margin, -margin) for _ in shape)] = 1.0
    return m


def test_every_exported_similarity_loss_is_listed():
    check_listed([make() for make in factories(IMPLEMENTATIONS)], SimilarityLoss)


def test_one_call_signature():
    check_uniform([make() for make in factories(IMPLEMENTATIONS)], SimilarityLoss)


@pytest.mark.parametrize("make", IMPLEMENTATIONS)
def test_is_a_similarity_loss(make):
    assert isinstance(make(), SimilarityLoss)


@pytest.mark.parametrize("make", IMPLEMENTATIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=["2d", "3d"])
def test_scalar_in_the_input_dtype_and_device(make, shape, dtype, device):
    x = smooth_image(shape, dtype=dtype).to(device)
    y = torch.roll(x, 1, 2)
    loss = make()(x, y)
    assert loss.shape == () and loss.dtype == dtype and loss.device == x.device
    assert make()(x, y, inner_mask(shape).to(device, dtype)).shape == ()


@pytest.mark.parametrize("make", IMPLEMENTATIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=["2d", "3d"])
def test_deterministic(make, shape):
    x, y = smooth_image(shape, seed=1), smooth_image(shape, seed=2)
    assert torch.equal(make()(x, y), make()(x, y))


@pytest.mark.parametrize("make", IMPLEMENTATIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=["2d", "3d"])
@pytest.mark.parametrize("shift", [1, 2, 3])
def test_aligned_scores_lower_than_shifted(make, shape, shift):
    x = smooth_image(shape)
    loss = make()
    assert float(loss(x, x)) < float(loss(torch.roll(x, shift, 2), x))
    assert float(loss(x, x)) < float(loss(torch.roll(x, -shift, len(shape) + 1), x))


@pytest.mark.parametrize("make", IMPLEMENTATIONS)
@given(seed=st.integers(0, 2**16), shift=st.integers(1, 4))
def test_aligned_scores_lower_on_drawn_images(make, seed, shift):
    x = smooth_image((20, 18), batch=1, seed=seed, dtype=torch.float64)
    loss = make()
    assert float(loss(x, x)) < float(loss(torch.roll(x, shift, 3), x))


@pytest.mark.parametrize("make", IMPLEMENTATIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=["2d", "3d"])
def test_gradients_are_finite_and_informative(make, shape):
    fixed = smooth_image(shape, seed=3)
    moving = torch.roll(fixed, 2, 2).requires_grad_(True)
    make()(moving, fixed).backward()
    assert bool(torch.isfinite(moving.grad).all()) and float(moving.grad.abs().sum()) > 0


@pytest.mark.parametrize("make", IMPLEMENTATIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=["2d", "3d"])
def test_mask_restricts_the_comparison(make, shape):
    x, y = smooth_image(shape, seed=4), smooth_image(shape, seed=5)
    mask = inner_mask(shape)
    loss = make()
    torch.testing.assert_close(loss(x, y, torch.ones_like(mask)), loss(x, y), rtol=0, atol=1e-6)
    other = torch.where(mask > 0, x, torch.rand(x.shape, generator=torch.Generator().manual_seed(6)))
    torch.testing.assert_close(loss(other, y, mask), loss(x, y, mask), rtol=0, atol=1e-6)


@pytest.mark.parametrize("make", IMPLEMENTATIONS)
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_input_gives_non_finite_loss(make, bad):
    x, y = smooth_image((16, 14), seed=7), smooth_image((16, 14), seed=8)
    x[0, 0, 8, 7] = bad
    assert not math.isfinite(float(make()(x, y)))
