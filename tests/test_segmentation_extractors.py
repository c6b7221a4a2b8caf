"""k-means and multi-Otsu structure maps and the shared clustering helpers.

References: an exhaustive search over all threshold combinations, scikit-image's
``threshold_multiotsu`` (when installed), a plain NumPy Lloyd iteration, and the real BrainWeb slices.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from plasticine.core.filters import gaussian_smooth
from plasticine.core.protocols import StructureExtractor
from plasticine.data import brainweb_slices
from plasticine.segmentation import (
    KMeansExtractor,
    MultiOtsuExtractor,
    kmeans,
    kmeans_structure_map,
    multi_otsu_structure_map,
    multi_otsu_thresholds,
    one_hot,
)
from plasticine.segmentation.extractors import _histogram, _otsu_bins
from plasticine.segmentation.metrics import dice

from conftest import make_generator


def _within_class_ss(counts: np.ndarray, starts: tuple[int, ...]) -> float:
    """Within-class sum of squares of the bin indices for classes starting at ``starts``."""
    pos = np.arange(len(counts), dtype=float)
    edges = (0, *starts, len(counts))
    total = 0.0
    for a, b in zip(edges[:-1], edges[1:]):
        c, x = counts[a:b], pos[a:b]
        if c.sum() > 0:
            m = (c * x).sum() / c.sum()
            total += float((c * (x - m) ** 2).sum())
    return total


@given(seed=st.integers(0, 2**31 - 1), bins=st.integers(4, 12), classes=st.integers(2, 4))
def test_otsu_dynamic_programme_equals_exhaustive_search(seed, bins, classes):
    gen = make_generator(seed)
    counts = torch.randint(0, 20, (2, bins), generator=gen).double()
    starts = _otsu_bins(counts, classes)
    for b in range(2):
        c = counts[b].numpy()
        best = min(_within_class_ss(c, s) for s in itertools.combinations(range(1, bins), classes - 1))
        got = tuple(starts[b].tolist())
        assert list(got) == sorted(set(got)) and 0 < got[0] and got[-1] < bins
        assert _within_class_ss(c, got) == pytest.approx(best, rel=1e-9, abs=1e-9)


def test_multi_otsu_matches_scikit_image():
    filters = pytest.importorskip("skimage.filters")
    gen = make_generator(0)
    x = torch.cat([torch.randn(3000, generator=gen) * 0.3 + m for m in (0.0, 2.0, 5.0, 6.0)]).double()
    img = x.view(1, 1, 120, 100)
    for classes in (2, 3, 4):
        idx, counts, lo, width = _histogram(img, 256)
        centers = (lo + (torch.arange(256) + 0.5) * width).numpy()
        ref = filters.threshold_multiotsu(classes=classes, hist=(counts[0].numpy(), centers))
        ref_idx = np.searchsorted(centers, ref)  # last bin of each lower class
        starts = _otsu_bins(counts, classes)[0].numpy()
        np.testing.assert_array_equal(starts - 1, ref_idx)
        thr = multi_otsu_thresholds(img, classes)[0]
        np.testing.assert_allclose(thr.numpy(), ref + width.item() / 2, rtol=0, atol=1e-9)


def test_multi_otsu_labels_follow_thresholds():
    gen = make_generator(1)
    img = torch.rand(2, 1, 9, 10, generator=gen)
    thr = multi_otsu_thresholds(img, 3, bins=64)
    m = multi_otsu_structure_map(img, 3, bins=64)
    labels = m.argmax(1)
    expect = (img[:, 0, ..., None] >= thr[:, None, None, :]).sum(-1)
    # pixels within rounding of a threshold may fall either side
    near = (img[:, 0, ..., None] - thr[:, None, None, :]).abs().amin(-1) < 1e-6
    assert torch.equal(labels[~near], expect[~near])


def _lloyd_numpy(x: np.ndarray, k: int) -> np.ndarray:
    """Plain Lloyd iteration from the same quantile start (one image, pixels x (N, C))."""
    order = np.argsort(x.mean(1), kind="stable")
    groups = (np.arange(len(x)) * k) // len(x)
    centers = np.stack([x[order[groups == g]].mean(0) for g in range(k)])
    labels = None
    for _ in range(100):
        d = ((x[:, None, :] - centers[None]) ** 2).sum(-1)
        new = d.argmin(1)
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        for g in range(k):
            if (labels == g).any():
                centers[g] = x[labels == g].mean(0)
    rank = np.argsort(centers.mean(1), kind="stable")
    return np.argsort(rank)[labels]


@given(seed=st.integers(0, 2**31 - 1), channels=st.integers(1, 3), classes=st.integers(1, 4))
def test_kmeans_matches_numpy_lloyd(seed, channels, classes):
    gen = make_generator(seed)
    img = torch.rand(2, channels, 7, 6, generator=gen, dtype=torch.float64)
    res = kmeans(img, classes)
    assert res.labels.shape == (2, 1, 7, 6) and res.centers.shape == (2, classes, channels)
    for b in range(2):
        x = img[b].flatten(1).T.numpy()
        ref = _lloyd_numpy(x, classes)
        np.testing.assert_array_equal(res.labels[b, 0].flatten().numpy(), ref)
    # ordered by mean intensity and a fixed point: every centre is the mean of its pixels
    assert (res.centers.mean(2).diff(dim=1) >= 0).all()
    for b in range(2):
        for k in range(classes):
            sel = res.labels[b, 0] == k
            if sel.any():
                torch.testing.assert_close(res.centers[b, k], img[b][:, sel].mean(1))


def test_one_hot():
    lab = torch.tensor([[[[0, 2], [1, 1]]]])
    oh = one_hot(lab, 3)
    assert oh.shape == (1, 3, 2, 2) and torch.equal(oh.argmax(1, keepdim=True), lab)
    with pytest.raises(ValueError, match="0..2"):
        one_hot(lab + 1, 3)
    with pytest.raises(ValueError, match="integer"):
        one_hot(lab.float(), 3)


@pytest.mark.parametrize("make", [lambda: KMeansExtractor(3), lambda: MultiOtsuExtractor(3), lambda: KMeansExtractor(2, smoothing_sigma=1.0)])
def test_extractor_contract(make, ndim):
    ext = make()
    assert isinstance(ext, StructureExtractor)
    shape = (9, 11) if ndim == 2 else (5, 6, 7)
    x = torch.rand(2, 1, *shape, generator=make_generator(3))
    out = ext(x)
    assert out.shape == (2, ext.num_classes, *shape) and out.dtype == x.dtype
    assert torch.equal(out.sum(1), torch.ones_like(out[:, 0]))
    assert torch.equal(ext(x), out)
    torch.testing.assert_close(ext(x[1:]), out[1:])  # per image: independent of the batch


def test_smoothing_is_applied_first():
    x = torch.rand(1, 1, 16, 16, generator=make_generator(4))
    torch.testing.assert_close(kmeans_structure_map(x, 2, smoothing_sigma=1.5), kmeans_structure_map(gaussian_smooth(x, 1.5), 2))
    torch.testing.assert_close(multi_otsu_structure_map(x, 3, smoothing_sigma=1.5), multi_otsu_structure_map(gaussian_smooth(x, 1.5), 3))


def test_extractors_reject_bad_input():
    with pytest.raises(ValueError, match="num_classes"):
        KMeansExtractor(0)
    with pytest.raises(ValueError, match="smoothing_sigma"):
        MultiOtsuExtractor(2, smoothing_sigma=-1.0)
    with pytest.raises(ValueError, match="bins"):
        MultiOtsuExtractor(5, bins=3)
    with pytest.raises(ValueError, match="B, 1"):
        MultiOtsuExtractor(2)(torch.rand(1, 2, 4, 4))
    with pytest.raises(ValueError, match="floating"):
        KMeansExtractor(2)(torch.zeros(1, 1, 4, 4, dtype=torch.long))


def test_baselines_on_real_brain_slices():
    data = brainweb_slices()
    for name in ("t1", "pd"):
        img = torch.tensor(data[name], dtype=torch.float32)[None, None]
        head = torch.tensor(data[name] > 40)[None, None].long()
        for ext in (KMeansExtractor(2, smoothing_sigma=1.0), MultiOtsuExtractor(2, smoothing_sigma=1.0)):
            fg = ext(img)[:, 1:].long()
            score = dice(fg, head, 2)[0, 1].item()
            print(f"{name}: {type(ext).__name__}(2) against the head threshold mask: Dice {score:.3f}")
            assert score > 0.8
