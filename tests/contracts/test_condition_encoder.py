"""Contract of :class:`~plasticine.core.ConditionEncoder`: ``structure (B, L, *S) -> condition (B, Cc, *S)``.

Every implementation in IMPLEMENTATIONS must pass every test here unchanged; a new encoder is added
to the list (a factory taking the number of labels ``L`` and of spatial dimensions), and the suite
fails if an encoder exported by a plasticine package is missing from it. The defining property: the
condition keeps the batch and the grid of the structure map, has ``out_channels`` channels (the
denoiser's ``cond_channels``), depends on the map (two maps give two conditions) and on nothing
else (deterministic, each image independent of its batch), and a non-finite map is refused or gives
a non-finite condition, never a finite-looking one.
"""

from __future__ import annotations

import math

import pytest
import torch

from ._discovery import check_listed, check_uniform, factories, param
from plasticine.core import ConditionEncoder
from plasticine.diffusion import ConcatConditioning, LearnedConditioning

IMPLEMENTATIONS = [
    param(lambda labels, ndim: ConcatConditioning(labels), "ConcatConditioning"),
    param(lambda labels, ndim: ConcatConditioning(labels, dtype=torch.float64), "ConcatConditioning-float64"),
    param(
        lambda labels, ndim: LearnedConditioning(labels, (4, 8), ndim, generator=torch.Generator().manual_seed(0)).eval(),
        "LearnedConditioning",
    ),
]

SHAPES = [(12, 10), (7, 6, 5)]
LABELS = 3


def structure_map(shape, batch=2, seed=0, dtype=torch.float32):
    """A one-hot map of LABELS classes."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, LABELS, (batch, *shape), generator=g)
    return torch.nn.functional.one_hot(labels, LABELS).movedim(-1, 1).to(dtype)


def build(make, ndim, dtype=torch.float32):
    enc = make(LABELS, ndim)
    return enc.to(dtype) if isinstance(enc, torch.nn.Module) else enc


def test_every_exported_encoder_is_listed():
    check_listed([make(LABELS, 2) for make in factories(IMPLEMENTATIONS)], ConditionEncoder)


def test_one_call_signature():
    check_uniform([make(LABELS, 2) for make in factories(IMPLEMENTATIONS)], ConditionEncoder)


@pytest.mark.parametrize("make", IMPLEMENTATIONS)
def test_is_a_condition_encoder(make):
    assert isinstance(make(LABELS, 2), ConditionEncoder)


@pytest.mark.parametrize("make", IMPLEMENTATIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=["2d", "3d"])
def test_keeps_batch_grid_and_floating_dtype(make, shape, dtype, device):
    enc = build(make, len(shape), dtype)
    enc = enc.to(device) if isinstance(enc, torch.nn.Module) else enc
    s = structure_map(shape, dtype=dtype).to(device)
    c = enc(s)
    assert c.shape == (2, enc.out_channels, *shape) and c.device == s.device and c.is_floating_point()
    if getattr(enc, "dtype", None) is None:  # an encoder without a fixed output dtype keeps the map's
        assert c.dtype == dtype


@pytest.mark.parametrize("make", IMPLEMENTATIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=["2d", "3d"])
def test_deterministic_and_independent_of_the_batch(make, shape):
    enc = build(make, len(shape))
    s = structure_map(shape, batch=3, seed=1)
    c = enc(s)
    assert torch.equal(c, build(make, len(shape))(s))
    torch.testing.assert_close(c[1:2], enc(s[1:2]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("make", IMPLEMENTATIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=["2d", "3d"])
def test_two_maps_give_two_conditions(make, shape):
    enc = build(make, len(shape))
    a, b = structure_map(shape, seed=2), structure_map(shape, seed=3)
    assert not torch.equal(enc(a), enc(b))


@pytest.mark.parametrize("make", IMPLEMENTATIONS)
def test_wrong_number_of_labels_is_an_error_naming_the_structure(make):
    enc = build(make, 2)
    with pytest.raises(ValueError, match="structure"):
        enc(torch.rand(1, LABELS + 1, 8, 8))


@pytest.mark.parametrize("make", IMPLEMENTATIONS)
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_map_refused_or_propagated(make, bad):
    enc = build(make, 2)
    s = structure_map((8, 8))
    s[0, 0, 3, 3] = bad
    try:
        c = enc(s)
    except ValueError as err:
        assert "structure" in str(err)
        return
    assert not bool(torch.isfinite(c).all())
