"""Contract of :class:`~plasticine.core.StructureExtractor`: ``image (B, C, *S) -> map (B, L, *S)``.

Every implementation in IMPLEMENTATIONS must pass every test here unchanged; a new extractor is
added to the list (a factory taking no argument), and the suite fails if an extractor exported by a
plasticine package is missing from it. What every shipped extractor claims: a deterministic map with
values in [0, 1], the same number of channels ``L`` for every image of a dimension, each image
independent of the others in its batch, and invariance to a positive scaling of the intensities
(checked with powers of two, exact in floating point). The partitions (PARTITIONS: k-means,
multi-Otsu, Potts, the foreground mask) also have channels that sum to 1 at every voxel (one-hot or
soft), and those ranked by intensity (RANKED) order their classes by increasing mean intensity
(class 0 the darkest, so that one tissue gets one channel across images). The descriptors (MIND),
the contour maps and the stacks of several maps are neither: their channels are not classes.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ._discovery import check_listed, check_uniform, factories, param
from plasticine.core import StructureExtractor
from plasticine.core.filters import gaussian_smooth
from plasticine.segmentation import (
    ContourExtractor,
    ForegroundExtractor,
    KMeansExtractor,
    MINDExtractor,
    MultiOtsuExtractor,
    PottsExtractor,
    RimExtractor,
    StackedExtractor,
)

RANKED = [
    param(lambda: PottsExtractor(3), "PottsExtractor"),
    param(lambda: PottsExtractor(2, gamma=0.2, max_iter=20), "PottsExtractor-fine", pytest.mark.slow),
    param(lambda: KMeansExtractor(3), "KMeansExtractor"),
    param(lambda: KMeansExtractor(2, smoothing_sigma=1.0), "KMeansExtractor-smoothed"),
    param(lambda: MultiOtsuExtractor(3), "MultiOtsuExtractor"),
    param(lambda: MultiOtsuExtractor(2, smoothing_sigma=1.0, bins=64), "MultiOtsuExtractor-smoothed"),
]

PARTITIONS = RANKED + [
    param(lambda: ForegroundExtractor(), "ForegroundExtractor"),
    param(lambda: ForegroundExtractor("otsu", closing=1, smoothing_sigma=None, bins=64), "ForegroundExtractor-otsu-closed"),
]

IMPLEMENTATIONS = PARTITIONS + [
    param(lambda: MINDExtractor(), "MINDExtractor"),
    param(lambda: MINDExtractor(sigma=1.5, dilation=1, layout="mind"), "MINDExtractor-mind"),
    param(lambda: ContourExtractor(), "ContourExtractor"),
    param(lambda: ContourExtractor(KMeansExtractor(3)), "ContourExtractor-kmeans"),
    param(lambda: StackedExtractor([ForegroundExtractor(), MINDExtractor(sigma=2.5)]), "StackedExtractor"),
    param(lambda: StackedExtractor([KMeansExtractor(3), ForegroundExtractor()]), "StackedExtractor-partitions"),
    param(lambda: RimExtractor(MINDExtractor(), depth=2), "RimExtractor"),
]

SHAPES = [(16, 14), (8, 7, 6)]


def smooth_image(shape, batch=2, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return gaussian_smooth(torch.rand(batch, 1, *shape, generator=g, dtype=dtype), 1.5)


def test_every_exported_extractor_is_listed():
    check_listed([make() for make in factories(IMPLEMENTATIONS)], StructureExtractor)


def test_one_call_signature():
    check_uniform([make() for make in factories(IMPLEMENTATIONS)], StructureExtractor)


@pytest.mark.parametrize("make", IMPLEMENTATIONS)
def test_is_a_structure_extractor(make):
    assert isinstance(make(), StructureExtractor)


@pytest.mark.parametrize("make", IMPLEMENTATIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=["2d", "3d"])
def test_map_shape_dtype_and_range(make, shape, dtype):
    ext = make()
    x = smooth_image(shape, dtype=dtype)
    m = ext(x)
    assert m.shape[0] == 2 and m.shape[2:] == x.shape[2:] and m.dtype == dtype
    assert m.shape[1] == getattr(ext, "num_classes", m.shape[1])
    assert bool((m >= 0).all()) and bool((m <= 1).all())


@pytest.mark.parametrize("make", PARTITIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=["2d", "3d"])
def test_partition_of_unity(make, shape, dtype):
    m = make()(smooth_image(shape, dtype=dtype))
    torch.testing.assert_close(m.sum(1), torch.ones_like(m[:, 0]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("make", IMPLEMENTATIONS)
def test_same_number_of_classes_for_every_image(make):
    ext = make()
    for shape in SHAPES:
        sizes = {ext(smooth_image(shape, batch=1, seed=seed)).shape[1] for seed in (1, 2)}
        assert len(sizes) == 1


@pytest.mark.parametrize("make", PARTITIONS)
def test_partitions_have_the_same_number_of_classes_in_2d_and_3d(make):
    ext = make()
    sizes = {ext(smooth_image(s, batch=1, seed=seed)).shape[1] for s, seed in zip(SHAPES, (1, 2))}
    assert len(sizes) == 1


@pytest.mark.parametrize("make", IMPLEMENTATIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=["2d", "3d"])
def test_deterministic(make, shape):
    x = smooth_image(shape, seed=3)
    assert torch.equal(make()(x), make()(x))


@pytest.mark.parametrize("make", RANKED)
@pytest.mark.parametrize("shape", SHAPES, ids=["2d", "3d"])
def test_classes_ordered_by_mean_intensity(make, shape):
    x = smooth_image(shape, seed=4, dtype=torch.float64)
    m = make()(x)
    for b in range(x.shape[0]):
        mass = m[b].flatten(1).sum(1)
        means = (m[b] * x[b]).flatten(1).sum(1)[mass > 0] / mass[mass > 0]
        assert bool((means.diff() > 0).all()), means


@pytest.mark.parametrize("make", IMPLEMENTATIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=["2d", "3d"])
def test_each_image_independent_of_its_batch(make, shape):
    x = smooth_image(shape, seed=5)
    ext = make()
    assert torch.equal(ext(x)[1:], ext(x[1:]))


@pytest.mark.parametrize("make", IMPLEMENTATIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=["2d", "3d"])
def test_invariant_to_scaling_the_intensities(make, shape):
    x = smooth_image(shape, seed=6)
    ext = make()
    assert torch.equal(ext(4.0 * x), ext(x))


@pytest.mark.slow
@pytest.mark.parametrize("make", IMPLEMENTATIONS)
@given(seed=st.integers(0, 2**16), power=st.integers(-3, 3))
def test_scaling_invariance_on_drawn_images(make, seed, power):
    x = smooth_image((12, 10), batch=1, seed=seed)
    ext = make()
    assert torch.equal(ext(2.0**power * x), ext(x))
