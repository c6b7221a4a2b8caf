"""gaussian_smooth against scipy.ndimage, its adjoint (dot-product test) and float64 gradcheck."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_generator
from hypothesis import given
from hypothesis import strategies as st
from scipy import ndimage

from plasticine.core import gaussian_smooth
from plasticine.core.filters import _SeparableSmoothAdjoint, gaussian_kernel1d

_shapes = st.one_of(st.tuples(st.integers(1, 12), st.integers(1, 12)), st.tuples(st.integers(1, 7), st.integers(1, 7), st.integers(1, 7)))
_sigma = st.sampled_from([0.0, 0.4, 1.0, 1.5, 3.3])


@given(seed=st.integers(0, 2**31 - 1), shape=_shapes, sigmas=st.lists(_sigma, min_size=3, max_size=3), truncate=st.sampled_from([2.0, 3.0, 4.0]))
def test_gaussian_smooth_equals_scipy_nearest(seed, shape, sigmas, truncate):
    # scipy's "nearest" mode extends the edge value as far as the kernel reaches (axes shorter than
    # the radius included); a sigma of 0 leaves the axis alone in both
    sig = tuple(sigmas[: len(shape)])
    x = torch.randn(2, 3, *shape, generator=make_generator(seed), dtype=torch.float64)
    out = gaussian_smooth(x, sig, truncate=truncate).numpy()
    ref = np.stack([[ndimage.gaussian_filter(x[b, c].numpy(), sig, mode="nearest", truncate=truncate) for c in range(3)] for b in range(2)])
    assert np.abs(out - ref).max() < 1e-12


@given(seed=st.integers(0, 2**31 - 1), shape=_shapes, sigma=st.sampled_from([0.5, 1.5, 4.0]))
def test_backward_is_the_adjoint(seed, shape, sigma):
    # <S x, y> = <x, S^T y> for the operator and the adjoint used by the backward pass
    gen = make_generator(seed)
    x = torch.randn(1, 2, *shape, generator=gen, dtype=torch.float64)
    y = torch.randn(1, 2, *shape, generator=gen, dtype=torch.float64)
    kernels = tuple((a, tuple(gaussian_kernel1d(sigma, dtype=torch.float64).tolist())) for a in range(len(shape)))
    lhs = (gaussian_smooth(x, sigma) * y).sum()
    rhs = (x * _SeparableSmoothAdjoint.apply(y, kernels)).sum()
    assert lhs.item() == pytest.approx(rhs.item(), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("shape", [(6, 5), (4, 3, 5), (2, 9)])
def test_gradcheck_and_gradgradcheck(shape):
    x = torch.randn(1, 2, *shape, generator=make_generator(3), dtype=torch.float64, requires_grad=True)
    for sigma in (0.8, (1.5, 0.0) + (2.5,) * (len(shape) - 2)):
        assert torch.autograd.gradcheck(lambda t: gaussian_smooth(t, sigma), (x,))
        assert torch.autograd.gradgradcheck(lambda t: gaussian_smooth(t, sigma), (x,))


def test_zero_sigma_copies_and_bad_sigma_is_refused():
    x = torch.randn(1, 1, 4, 5)
    y = gaussian_smooth(x, 0.0)
    assert torch.equal(x, y) and y.data_ptr() != x.data_ptr()
    with pytest.raises(ValueError, match="sigma"):
        gaussian_smooth(x, -1.0)
    with pytest.raises(ValueError, match="sigma"):
        gaussian_smooth(x, (1.0, 1.0, 1.0))
