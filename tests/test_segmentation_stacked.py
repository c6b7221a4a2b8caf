"""StackedExtractor: its map is its parts' maps one after the other, its channels their sum, its config round-trips."""

from __future__ import annotations

import pytest
import torch
from conftest import make_generator

from plasticine.core.config import from_json, to_json
from plasticine.core.filters import gaussian_smooth
from plasticine.segmentation import ContourExtractor, ForegroundExtractor, KMeansExtractor, MINDExtractor, PottsExtractor, StackedExtractor

PARTS = [
    [ForegroundExtractor(), MINDExtractor(sigma=2.5)],
    [KMeansExtractor(3), MINDExtractor(layout="mind", dilation=1), PottsExtractor()],
    [MINDExtractor()],
]


def _image(shape, seed=0):
    return gaussian_smooth(torch.rand(2, 1, *shape, generator=make_generator(seed)), 1.0)


@pytest.mark.parametrize("parts", PARTS, ids=["foreground+mind", "three", "one"])
@pytest.mark.parametrize("shape", [(16, 14), (8, 7, 6)], ids=["2d", "3d"])
def test_channels_are_the_parts_maps_in_order(parts, shape):
    ext = StackedExtractor(parts)
    x = _image(shape)
    m = ext(x)
    assert m.shape == (2, ext.num_channels(len(shape)), *shape)
    start = 0
    for part in parts:
        piece = part(x)
        assert torch.equal(m[:, start : start + piece.shape[1]], piece)
        start += piece.shape[1]
    assert start == m.shape[1]


def test_num_channels_sums_the_parts():
    # the foreground mask has 2 channels, MIND-SSC 4 in 2D and 12 in 3D, k-means its classes
    ext = StackedExtractor([ForegroundExtractor(), MINDExtractor(), KMeansExtractor(5)])
    assert ext.num_channels(2) == 2 + 4 + 5
    assert ext.num_channels(3) == 2 + 12 + 5


def test_config_round_trips_through_json():
    ext = StackedExtractor([ForegroundExtractor(fraction=0.2), MINDExtractor(sigma=1.5)])
    back = from_json(to_json(ext))
    assert isinstance(back, StackedExtractor) and to_json(back) == to_json(ext)
    x = _image((12, 10), seed=1)
    assert torch.equal(back(x), ext(x))


def test_the_stack_of_head_mask_and_mind_ignores_an_affine_remap_of_the_intensities():
    # both parts are invariant to x -> a x with a > 0 (exact for powers of two), so the stack is
    x = _image((20, 18), seed=2)
    ext = StackedExtractor([ForegroundExtractor(), MINDExtractor(sigma=2.5)])
    assert torch.equal(ext(8.0 * x), ext(x))


@pytest.mark.parametrize(
    ("value", "needle"),
    [([], "non-empty"), (ForegroundExtractor(), "non-empty list"), ([ForegroundExtractor(), "mind"], "modules"), ([ContourExtractor()], "num_channels")],
    ids=["empty", "a-module", "a-string", "unknown-channels"],
)
def test_bad_parts_are_refused_naming_the_argument(value, needle):
    with pytest.raises(ValueError, match="extractors") as info:
        StackedExtractor(value)
    assert needle in str(info.value)
