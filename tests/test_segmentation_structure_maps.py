"""The foreground mask, MIND / MIND-SSC and contour extractors against plain references (numpy loops, scipy)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
from hypothesis import given
from hypothesis import strategies as st

from plasticine.core import NonFiniteError
from plasticine.core.filters import gaussian_smooth
from plasticine.segmentation import (
    ContourExtractor,
    ForegroundExtractor,
    KMeansExtractor,
    MINDExtractor,
    contour_map,
    foreground_mask,
    mind_descriptor,
    mind_pairs,
)


# -- MIND -----------------------------------------------------------------------------------------


def mind_reference(image: np.ndarray, sigma: float, dilation: int, layout: str) -> np.ndarray:
    """MIND written plainly: loops over pixels, pairs and patch offsets (one image ``(C, *S)``).

    The image is read with replicate padding (coordinates clipped to the image) and so is the image
    of squared differences that the Gaussian patch weight sums (as Heinrich's implementation pads
    both).
    """
    shape = image.shape[1:]
    n = len(shape)
    r = max(1, int(3.0 * sigma + 0.5))
    t = np.arange(-r, r + 1)
    w1 = np.exp(-0.5 * (t / sigma) ** 2)
    w1 /= w1.sum()
    pairs = mind_pairs(n, layout, dilation)

    def clip(p):
        return tuple(min(max(q, 0), s - 1) for q, s in zip(p, shape))

    def value(p):
        return image[(slice(None),) + clip(p)]

    def sqdiff(y, a, b):
        y = clip(y)
        return float(((value(tuple(q + o for q, o in zip(y, a))) - value(tuple(q + o for q, o in zip(y, b)))) ** 2).sum())

    dist = np.zeros((len(pairs),) + shape)
    for x in itertools.product(*[range(s) for s in shape]):
        for k, (a, b) in enumerate(pairs):
            total = 0.0
            for p in itertools.product(range(-r, r + 1), repeat=n):
                weight = np.prod([w1[q + r] for q in p])
                total += weight * sqdiff(tuple(xi + pi for xi, pi in zip(x, p)), a, b)
            dist[(k,) + x] = total
    dist = dist - dist.min(0, keepdims=True)
    var = dist.mean(0, keepdims=True)
    mean = var.mean()
    var = np.clip(var, mean / 1000, mean * 1000)
    return np.exp(-dist / np.where(var > 0, var, 1.0))


@pytest.mark.parametrize(
    "shape, sigma, dilation, layout",
    [((7, 6), 0.8, 2, "ssc"), ((6, 5), 1.2, 1, "mind"), ((4, 4, 3), 0.3, 1, "ssc"), ((4, 5, 3), 0.4, 2, "mind")],
)
def test_mind_matches_a_brute_force_reference(shape, sigma, dilation, layout):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.rand(2, 2, *shape, generator=g, dtype=torch.float64)
    out = mind_descriptor(x, sigma=sigma, dilation=dilation, layout=layout)
    assert out.shape == (2, len(mind_pairs(len(shape), layout, dilation)), *shape)
    for b in range(2):
        np.testing.assert_allclose(out[b].numpy(), mind_reference(x[b].numpy(), sigma, dilation, layout), rtol=0, atol=1e-12)


def test_mind_channel_counts_and_offsets():
    assert len(mind_pairs(2)) == 4 and len(mind_pairs(3)) == 12 and len(mind_pairs(3, "mind")) == 6
    for a, b in mind_pairs(3, dilation=2):  # SSC: two neighbours at sqrt(2) * dilation from each other
        assert sum(q * q for q in a) == 4 and sum(q * q for q in b) == 4 and sum((p - q) ** 2 for p, q in zip(a, b)) == 8
    assert MINDExtractor().num_channels(3) == 12


def test_mind_largest_channel_is_one_and_a_constant_image_gives_ones():
    x = gaussian_smooth(torch.rand(2, 1, 12, 10, generator=torch.Generator().manual_seed(1)), 1.0)
    m = MINDExtractor()(x)
    assert bool((m.amax(1) == 1).all()) and bool((m > 0).all())
    assert torch.equal(MINDExtractor()(torch.full((1, 1, 6, 6), 0.3)), torch.ones(1, 4, 6, 6))


def test_mind_propagates_a_nan_to_its_image_only():
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    x[0, 0, 3, 3] = float("nan")
    m = MINDExtractor()(x)
    assert bool(m[0].isnan().all()) and bool(m[1].isfinite().all())


def test_mind_bad_settings():
    with pytest.raises(ValueError, match="sigma"):
        MINDExtractor(sigma=0.0)
    with pytest.raises(ValueError, match="layout"):
        MINDExtractor(layout="census")
    with pytest.raises(ValueError, match="dilation"):
        MINDExtractor(dilation=0)
    with pytest.raises(ValueError, match="image"):
        MINDExtractor()(torch.zeros(1, 1, 8, dtype=torch.float32))


# -- foreground -----------------------------------------------------------------------------------


def scipy_foreground(mask: np.ndarray) -> np.ndarray:
    """Largest face-connected component (first in raster order on ties), holes filled, by scipy."""
    labels, count = ndi.label(mask)
    if count == 0:
        return np.zeros_like(mask)
    sizes = np.bincount(labels.ravel())[1:]
    return ndi.binary_fill_holes(labels == np.argmax(sizes) + 1)


@given(seed=st.integers(0, 2**16), density=st.floats(0.3, 0.7), three_d=st.booleans())
def test_foreground_of_a_binary_image_matches_scipy(seed, density, three_d):
    shape = (9, 8, 7) if three_d else (21, 18)
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(2, 1, *shape, generator=g) < density).to(torch.float64)
    x[:, :, 0] = 1.0  # at least 1 percent of ones: the robust maximum is 1
    out = foreground_mask(x, smoothing_sigma=None)
    for b in range(2):
        np.testing.assert_array_equal(out[b, 0].numpy(), scipy_foreground(x[b, 0].numpy() > 0.5))


def test_foreground_fills_holes_and_keeps_the_largest_component():
    x = torch.zeros(1, 1, 12, 12)
    x[..., 2:9, 2:9] = 1.0
    x[..., 4:6, 4:6] = 0.0  # a hole
    x[..., 10:12, 10:12] = 1.0  # a smaller component
    m = ForegroundExtractor(smoothing_sigma=None)(x)
    assert m[0, 1, 2:9, 2:9].sum() == 49 and m[0, 1].sum() == 49
    torch.testing.assert_close(m.sum(1), torch.ones(1, 12, 12))


def test_foreground_closing_bridges_a_one_pixel_gap():
    x = torch.zeros(1, 1, 12, 12)
    x[..., 2:10, 2:5] = 1.0
    x[..., 2:10, 6:9] = 1.0  # two bars one pixel apart
    plain = foreground_mask(x, smoothing_sigma=None)
    closed = foreground_mask(x, smoothing_sigma=None, closing=1)
    assert int(plain.sum()) == 24 and int(closed.sum()) == 8 * 7
    assert bool((closed | ~(x > 0)).all())  # the closing contains the bright set


def test_foreground_of_a_constant_image_is_empty():
    assert not bool(foreground_mask(torch.full((2, 1, 6, 5), 0.7)).any())
    assert not bool(foreground_mask(torch.full((1, 1, 6, 5), 0.7), threshold="otsu").any())


def test_foreground_errors():
    x = torch.rand(1, 1, 8, 8)
    with pytest.raises(ValueError, match="image"):
        ForegroundExtractor()(torch.rand(1, 2, 8, 8))
    x[0, 0, 1, 1] = float("inf")
    with pytest.raises(NonFiniteError, match="image"):
        ForegroundExtractor()(x)
    with pytest.raises(ValueError, match="threshold"):
        ForegroundExtractor("mean")
    with pytest.raises(ValueError, match="fraction"):
        ForegroundExtractor(fraction=1.0)
    with pytest.raises(ValueError, match="closing"):
        ForegroundExtractor(closing=-1)


# -- contours -------------------------------------------------------------------------------------


def contour_reference(labels: np.ndarray) -> np.ndarray:
    out = np.zeros(labels.shape, dtype=bool)
    for p in itertools.product(*[range(s) for s in labels.shape]):
        for d in range(labels.ndim):
            for s in (-1, 1):
                q = list(p)
                q[d] += s
                if 0 <= q[d] < labels.shape[d] and labels[tuple(q)] != labels[p]:
                    out[p] = True
    return out


@pytest.mark.parametrize("shape", [(9, 7), (5, 4, 6)], ids=["2d", "3d"])
def test_contours_match_a_loop_reference(shape):
    labels = torch.randint(0, 3, (2, 1, *shape), generator=torch.Generator().manual_seed(3))
    partition = torch.nn.functional.one_hot(labels[:, 0], 3).movedim(-1, 1).to(torch.float64)
    out = contour_map(partition)
    assert out.shape == (2, 1, *shape) and out.dtype == torch.float64
    for b in range(2):
        np.testing.assert_array_equal(out[b, 0].numpy() > 0, contour_reference(labels[b, 0].numpy()))


def test_contour_extractor_default_is_the_paper_potts_partition():
    x = torch.zeros(1, 1, 10, 10)
    x[..., 3:7, 3:7] = 1.0
    e = ContourExtractor()(x)[0, 0]
    assert torch.equal(e > 0, torch.from_numpy(contour_reference(x[0, 0].numpy() > 0.5))) and int(e.sum()) == 12 + 16


def test_contours_of_an_integer_map_are_refused():
    with pytest.raises(ValueError, match="partition"):
        contour_map(torch.zeros(1, 2, 4, 4, dtype=torch.int64))


def test_contour_extractor_round_trips_its_inner_extractor():
    e = ContourExtractor(KMeansExtractor(3, smoothing_sigma=1.0))
    again = ContourExtractor.from_config(e.config)
    x = torch.rand(1, 1, 9, 9, generator=torch.Generator().manual_seed(4))
    assert torch.equal(e(x), again(x))


def test_foreground_fraction_rule_uses_the_robust_maximum():
    """t = min + f (q - min) with q the 0.99-quantile, as torch.quantile computes it; no size limit."""
    from plasticine.segmentation.foreground import _quantile

    x = torch.rand(3, 1000, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for q in (0.5, 0.99, 1.0, 0.123):
        torch.testing.assert_close(_quantile(x, q), torch.quantile(x, q, dim=1), rtol=0, atol=1e-15)
    big = torch.zeros(1, 2**24 + 1)  # more values than torch.quantile takes (a 256^3 volume and one)
    big[0, -1000:] = 1.0
    with pytest.raises(RuntimeError):
        torch.quantile(big, 0.99, dim=1)
    assert float(_quantile(big, 0.99999)) == 1.0 and float(_quantile(big, 0.99)) == 0.0


@pytest.mark.parametrize(
    "call, arg",
    [(mind_descriptor, "image"), (foreground_mask, "image"), (contour_map, "partition")],
    ids=["mind", "foreground", "contours"],
)
def test_empty_batches_and_integer_tensors_are_refused_naming_the_argument(call, arg):
    with pytest.raises(ValueError, match=f"^{arg}: .*empty batch"):
        call(torch.zeros(0, 1, 6, 6))
    with pytest.raises(ValueError, match=f"^{arg}: "):
        call(torch.zeros(1, 1, 6, 6, dtype=torch.int64))
