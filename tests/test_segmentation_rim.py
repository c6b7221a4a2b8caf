"""RimExtractor and rim_mask: scipy's Euclidean distance transform as the reference, the map's support, its invariance to the inside."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_generator
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from plasticine.segmentation import ForegroundExtractor, MINDExtractor, RimExtractor, StackedExtractor, rim_mask


@settings(deadline=None)
@given(ndim=st.sampled_from([2, 3]), depth=st.floats(0.0, 6.0), fill=st.floats(0.2, 0.9), seed=st.integers(0, 2**16))
def test_rim_mask_is_the_distance_transform_bounded_by_the_depth(ndim, depth, fill, seed):
    shape = (13, 11) if ndim == 2 else (9, 8, 7)
    mask = torch.rand(2, 1, *shape, generator=make_generator(seed)) < fill
    got = rim_mask(mask, depth)
    for i in range(2):
        m = mask[i, 0].numpy()
        # beyond the image is background: pad with it, then measure
        dist = ndimage.distance_transform_edt(np.pad(m, 1))[(slice(1, -1),) * ndim]
        ref = m & (dist <= depth) if depth >= 1 else np.zeros_like(m)
        np.testing.assert_array_equal(got[i, 0].numpy(), ref)


def test_rim_extractor_is_the_map_on_the_rim_of_the_foreground():
    x = torch.zeros(2, 1, 40, 36)
    x[..., 5:35, 4:32] = 0.5 + 0.5 * torch.rand(2, 1, 30, 28, generator=make_generator(1))
    fg, mind = ForegroundExtractor(), MINDExtractor(sigma=1.0)
    ext = RimExtractor(mind, 4.0, fg)
    rim = rim_mask(fg(x)[:, 1:2] > 0.5, 4.0)
    torch.testing.assert_close(ext(x), mind(x) * rim, rtol=0, atol=0)
    assert ext.num_channels(2) == mind.num_channels(2) and ext.num_channels(3) == mind.num_channels(3)
    assert 0 < int(rim.sum()) < int((fg(x)[:, 1] > 0.5).sum())
    assert bool((ext(x)[..., 20, 18] == 0).all()) and bool((ext(x)[..., 6, 18] != 0).any())
    # 3D, and a stack with the head mask as the recipes build it
    v = torch.zeros(1, 1, 16, 15, 14)
    v[..., 3:13, 3:12, 3:11] = 0.5 + 0.5 * torch.rand(1, 1, 10, 9, 8, generator=make_generator(2))
    stacked = StackedExtractor([fg, RimExtractor(mind, 2.0, fg)])
    assert stacked(v).shape == (1, 2 + mind.num_channels(3), 16, 15, 14)


def test_a_remap_of_the_inside_leaves_the_rim_map_unchanged():
    """The T1 sulci case: shuffling the intensities deep inside the head (a non-monotone remap of the
    inside that keeps the histogram, so the foreground mask is the same) changes the MIND map there
    but not on the rim, as long as MIND's footprint from the rim does not reach the changed voxels."""
    g = make_generator(3)
    x = torch.zeros(1, 1, 64, 64)
    x[..., 4:60, 4:60] = 0.4 + 0.6 * torch.rand(1, 1, 56, 56, generator=g)
    fg, mind = ForegroundExtractor(), MINDExtractor(sigma=0.8)
    depth = 4.0
    ext = RimExtractor(mind, depth, fg)
    deep = torch.zeros_like(x, dtype=torch.bool)
    deep[..., 24:40, 24:40] = True  # at least 20 voxels from the outline: beyond the rim and MIND's reach
    y = x.clone()
    vals = y[deep]
    y[deep] = vals[torch.randperm(vals.numel(), generator=g)]
    assert torch.equal(fg(x), fg(y))
    assert not torch.allclose(mind(x), mind(y)), "the remap does not change the full map, so the test shows nothing"
    torch.testing.assert_close(ext(y), ext(x), rtol=0, atol=1e-6)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="depth"):
        RimExtractor(MINDExtractor(), 0.5)
    with pytest.raises(ValueError, match="extractor"):
        RimExtractor(3.0)
    with pytest.raises(ValueError, match="depth"):
        rim_mask(torch.ones(1, 1, 4, 4, dtype=torch.bool), -1.0)
    with pytest.raises(ValueError, match="mask"):
        rim_mask(torch.ones(1, 2, 4, 4, dtype=torch.bool), 1.0)
