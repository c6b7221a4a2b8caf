"""Contract of :class:`~plasticine.core.Warper`: ``(image (B, C, *S), displacement (B, N, *S)) -> image o (Id + u)``.

Every implementation in IMPLEMENTATIONS must pass every test here unchanged; a new warper is added
to the list (a factory taking no argument), and the suite fails if a warper exported by a plasticine
package is missing from it. The defining property is the pull-back convention of
:doc:`/conventions`: at a displacement of whole voxels, ``out(p) = image(p + u(p))`` exactly.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ._discovery import check_listed, check_uniform, factories, param
from plasticine.core import GridSampleWarper, Warper

IMPLEMENTATIONS = [
    param(GridSampleWarper, "GridSampleWarper"),
    param(lambda: GridSampleWarper("nearest"), "GridSampleWarper-nearest"),
    param(lambda: GridSampleWarper(padding="zeros"), "GridSampleWarper-zeros"),
    param(lambda: GridSampleWarper(padding="reflection"), "GridSampleWarper-reflection"),
]

SHAPES = [(11, 9), (7, 6, 5)]


def _image(shape, channels=2, batch=2, seed=0, dtype=torch.float32):
    return torch.rand(batch, channels, *shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_every_exported_warper_is_listed():
    check_listed([make() for make in factories(IMPLEMENTATIONS)], Warper)


def test_one_call_signature():
    check_uniform([make() for make in factories(IMPLEMENTATIONS)], Warper)


@pytest.mark.parametrize("make", IMPLEMENTATIONS)
def test_is_a_warper(make):
    assert isinstance(make(), Warper)


@pytest.mark.parametrize("make", IMPLEMENTATIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=["2d", "3d"])
def test_shape_dtype_and_device_kept(make, shape, dtype, device):
    x = _image(shape, dtype=dtype).to(device)
    u = (torch.randn(2, len(shape), *shape, generator=torch.Generator().manual_seed(1), dtype=dtype)).to(device)
    out = make()(x, u)
    assert out.shape == x.shape and out.dtype == dtype and out.device == x.device


@pytest.mark.parametrize("make", IMPLEMENTATIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=["2d", "3d"])
def test_deterministic(make, shape):
    x = _image(shape)
    u = 1.7 * torch.randn(2, len(shape), *shape, generator=torch.Generator().manual_seed(2))
    assert torch.equal(make()(x, u), make()(x, u))


@pytest.mark.parametrize("make", IMPLEMENTATIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=["2d", "3d"])
def test_zero_displacement_is_the_identity(make, shape):
    x = _image(shape)
    torch.testing.assert_close(make()(x, torch.zeros(2, len(shape), *shape)), x, rtol=0, atol=1e-6)


@pytest.mark.parametrize("make", IMPLEMENTATIONS)
@pytest.mark.parametrize("ndim", [2, 3])
@given(seed=st.integers(0, 2**16))
def test_whole_voxel_displacement_pulls_back(make, ndim, seed):
    """out(p) = image(p + u(p)) for integer u(p) that stays inside the grid."""
    shape = (9, 8) if ndim == 2 else (7, 6, 5)
    g = torch.Generator().manual_seed(seed)
    x = _image(shape, batch=1, seed=seed, dtype=torch.float64)
    grids = torch.meshgrid(*[torch.arange(s) for s in shape], indexing="ij")
    targets = [torch.randint(0, s, shape, generator=g) for s in shape]  # any voxel, for every voxel
    u = torch.stack([(t - p) for t, p in zip(targets, grids)])[None].double()
    expected = x[(slice(None), slice(None), *targets)]
    torch.testing.assert_close(make()(x, u), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("make", IMPLEMENTATIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=["2d", "3d"])
def test_linear_in_the_image(make, shape):
    x, y = _image(shape, seed=3, dtype=torch.float64), _image(shape, seed=4, dtype=torch.float64)
    u = 1.3 * torch.randn(2, len(shape), *shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    w = make()
    torch.testing.assert_close(w(2.0 * x - 0.5 * y, u), 2.0 * w(x, u) - 0.5 * w(y, u), rtol=0, atol=1e-12)


@pytest.mark.parametrize("make", IMPLEMENTATIONS)
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_displacement_gives_non_finite_value(make, bad):
    x = _image((9, 8), batch=1)
    u = torch.zeros(1, 2, 9, 8)
    u[0, 0, 4, 3] = bad
    out = make()(x, u)
    assert not bool(torch.isfinite(out[0, :, 4, 3]).any())
    assert bool(torch.isfinite(out[0, :, 0, 0]).all())
