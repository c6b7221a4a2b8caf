"""Condition encoders: one contract suite for every ConditionEncoder, then each encoder's own checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import make_generator
from plasticine.core import ConditionEncoder
from plasticine.diffusion.conditioning import ConcatConditioning, LearnedConditioning, structure_condition

L = 3


def make_encoders(ndim: int) -> dict[str, torch.nn.Module]:
    return {
        "concat": ConcatConditioning(L),
        "learned": LearnedConditioning(L, channels=(4, 6, 8), ndim=ndim, generator=make_generator(0)).eval(),
    }


def soft_map(shape, seed: int) -> torch.Tensor:
    """A random soft partition (channels sum to one), like a structure extractor's output."""
    logits = torch.randn(shape, generator=make_generator(seed))
    return logits.softmax(dim=1)


# -- contract suite --------------------------------------------------------------------------------------


@pytest.fixture(params=["concat", "learned"])
def name(request):
    return request.param


SIZES = {2: (13, 10), 3: (7, 6, 5)}


def test_contract_protocol_and_shape(name, ndim):
    enc = make_encoders(ndim)[name]
    assert isinstance(enc, ConditionEncoder)
    s = soft_map((2, L, *SIZES[ndim]), seed=1)
    out = enc(s)
    assert out.shape[0] == 2 and out.shape[2:] == s.shape[2:]
    assert out.shape[1] == enc.out_channels
    assert out.is_floating_point() and torch.isfinite(out).all()


def test_contract_deterministic(name, ndim):
    enc = make_encoders(ndim)[name]
    s = soft_map((2, L, *SIZES[ndim]), seed=2)
    torch.testing.assert_close(enc(s), enc(s), rtol=0, atol=0)


@given(seed=st.integers(0, 2**31 - 1))
def test_contract_batch_items_independent(seed):
    for enc in make_encoders(2).values():
        s = soft_map((3, L, 9, 11), seed)
        full = enc(s)
        for i in range(3):
            torch.testing.assert_close(full[i : i + 1], enc(s[i : i + 1]), rtol=1e-5, atol=1e-6)


def test_contract_rejects_wrong_channel_count(name, ndim):
    enc = make_encoders(ndim)[name]
    with pytest.raises(ValueError, match=rf"structure: expected shape \(B, {L}, \*S\)"):
        enc(soft_map((2, L + 1, *SIZES[ndim]), seed=3))


def test_contract_rejects_integer_map_without_one_hot(name):
    enc = make_encoders(2)[name]
    with pytest.raises(ValueError, match="floating"):
        enc(torch.zeros(1, L, 5, 5, dtype=torch.long))


def test_contract_rejects_non_tensor(name):
    enc = make_encoders(2)[name]
    with pytest.raises(TypeError, match="torch.Tensor"):
        enc(np.zeros((1, L, 5, 5), dtype=np.float32))


def test_contract_float64(name, ndim):
    enc = make_encoders(ndim)[name].double()
    s = soft_map((1, L, *SIZES[ndim]), seed=4).double()
    assert enc(s).dtype == torch.float64


# -- ConcatConditioning ----------------------------------------------------------------------------------


@given(seed=st.integers(0, 2**31 - 1), ndim=st.sampled_from([2, 3]), labels=st.integers(1, 5))
def test_one_hot_matches_numpy(seed, ndim, labels):
    size = (4, 5) if ndim == 2 else (3, 4, 2)
    lab = torch.randint(0, labels, (2, 1, *size), generator=make_generator(seed))
    got = ConcatConditioning(labels, one_hot=True)(lab)
    expected = np.moveaxis(np.eye(labels, dtype=np.float32)[lab[:, 0].numpy()], -1, 1)
    np.testing.assert_array_equal(got.numpy(), expected)
    assert got.dtype == torch.get_default_dtype()


def test_one_hot_bool_mask_and_dtype():
    mask = torch.zeros(1, 1, 3, 3, dtype=torch.bool)
    mask[0, 0, 1, 1] = True
    out = ConcatConditioning(2, one_hot=True, dtype=torch.float64)(mask)
    assert out.dtype == torch.float64
    assert out[0, 1].sum() == 1 and out[0, 0].sum() == 8 and out[0, 1, 1, 1] == 1


def test_float_map_passes_unchanged():
    s = soft_map((2, L, 6, 7), seed=5)
    out = ConcatConditioning(L)(s)
    assert out is s
    assert ConcatConditioning(L, dtype=torch.float64)(s).dtype == torch.float64


def test_concat_rejects_bad_input():
    with pytest.raises(ValueError, match=r"labels in \[0, 3\)"):
        ConcatConditioning(3, one_hot=True)(torch.tensor([[[[0, 3]]]]))
    with pytest.raises(ValueError, match=r"labels in \[0, 3\)"):
        ConcatConditioning(3, one_hot=True)(torch.tensor([[[[-1, 0]]]]))
    with pytest.raises(ValueError, match="one_hot=True expects an integer label map"):
        ConcatConditioning(3, one_hot=True)(torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match=r"structure: expected shape \(B, 1, \*S\)"):
        ConcatConditioning(3, one_hot=True)(torch.zeros(1, 3, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="finite"):
        ConcatConditioning(1)(torch.full((1, 1, 2, 2), float("nan")))
    with pytest.raises(ValueError, match="num_labels"):
        ConcatConditioning(0)
    with pytest.raises(ValueError, match="floating dtype"):
        ConcatConditioning(2, dtype=torch.int32)
    with pytest.raises(ValueError, match="floating dtype"):
        structure_condition(torch.zeros(1, 2, 3, 3), 2, dtype=torch.int64)


# -- LearnedConditioning ---------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(37, 50), (9, 14, 11), (1, 1)])
def test_pyramid_sizes_match_the_unet_levels(size):
    enc = LearnedConditioning(2, channels=(3, 4, 5, 6), ndim=len(size))
    feats = enc.pyramid(torch.rand(2, 2, *size))
    assert len(feats) == 4
    for i, f in enumerate(feats):
        assert f.shape[:2] == (2, enc.channels[i])
        assert tuple(f.shape[2:]) == tuple(math.ceil(n / 2**i) for n in size)
    torch.testing.assert_close(enc(torch.ones(1, 2, *size)), enc.pyramid(torch.ones(1, 2, *size))[0])


def test_learned_gradcheck_float64():
    enc = LearnedConditioning(2, channels=(2, 3), ndim=2).double()
    s = torch.rand(1, 2, 5, 4, dtype=torch.float64, generator=make_generator(6), requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: enc.pyramid(x)[1], (s,), eps=1e-6, atol=1e-6)


def test_learned_rejects_bad_arguments():
    with pytest.raises(ValueError, match="in_channels"):
        LearnedConditioning(0)
    with pytest.raises(ValueError, match="channels"):
        LearnedConditioning(2, channels=())
    with pytest.raises(ValueError, match="ndim"):
        LearnedConditioning(2, ndim=1)
    with pytest.raises(ValueError, match="2 spatial"):
        LearnedConditioning(2, ndim=2)(torch.rand(1, 2, 4, 4, 4))
