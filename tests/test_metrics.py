"""plasticine.metrics against scikit-image, SciPy, closed forms and values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from plasticine.data import brainweb_slices
from plasticine.metrics import (
    RandomFeatures,
    bhattacharyya_distance,
    frechet_distance,
    image_features,
    intensity_histogram,
    mae,
    normalized_mutual_information,
    psnr,
    simplified_frechet_distance,
    ssim,
)


@pytest.fixture(scope="module")
def skm():
    """scikit-image's metrics, the reference of SSIM and NMI (the other tests run without it)."""
    return pytest.importorskip("skimage.metrics", reason="scikit-image is the reference (pip install scikit-image)")


def _t(x: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x, dtype=np.float64))


@pytest.fixture(scope="module")
def slices():
    d = brainweb_slices()
    return d["t1"].astype(np.float64) / 255.0, d["pd"].astype(np.float64) / 255.0


def _volume(image: np.ndarray, depth: int = 14) -> np.ndarray:
    """A small 3D volume from a 2D slice: a crop, stacked with a shift per plane (varies along every axis)."""
    crop = image[60:100, 50:86]
    return np.stack([np.roll(crop, k, axis=1) * (1.0 - 0.02 * k) for k in range(depth)])


# --- MAE and PSNR by hand -----------------------------------------------------------------------


def test_mae_and_psnr_by_hand():
    a = _t([[0.0, 1.0], [2.0, 3.0]])[None, None]
    b = _t([[1.0, 1.0], [2.0, 0.0]])[None, None]
    # |a - b| = 1, 0, 0, 3: MAE 1; squared 1, 0, 0, 9: MSE 2.5; PSNR with R = 3: 10 log10(9 / 2.5)
    assert mae(a, b).tolist() == [1.0]
    assert psnr(a, b, 3.0).item() == pytest.approx(10 * math.log10(9 / 2.5))
    mask = torch.tensor([[True, False], [False, True]])[None, None]  # errors 1 and 3
    assert mae(a, b, mask).tolist() == [2.0]
    assert psnr(a, b, 3.0, mask).item() == pytest.approx(10 * math.log10(9 / 5.0))
    assert psnr(a, a, 1.0).tolist() == [math.inf]


def test_per_item_and_channels():
    a = torch.zeros(2, 2, 3, 3, 3, dtype=torch.float64)
    b = a.clone()
    b[0, 0] = 1.0  # item 0: one channel of two off by 1 everywhere; item 1 exact
    b[1, 1, 0, 0, 0] = 4.0
    assert mae(a, b).tolist() == pytest.approx([0.5, 4.0 / 54])
    mask = torch.zeros(2, 1, 3, 3, 3, dtype=torch.bool)
    mask[:, :, 0, 0, 0] = True
    assert mae(a, b, mask).tolist() == pytest.approx([0.5, 2.0])


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(-100, 100), min_size=4, max_size=4), st.lists(st.floats(-100, 100), min_size=4, max_size=4))
def test_mae_psnr_match_numpy(xs, ys):
    a, b = _t(xs).view(1, 1, 2, 2), _t(ys).view(1, 1, 2, 2)
    d = np.asarray(xs) - np.asarray(ys)
    assert mae(a, b).item() == pytest.approx(np.abs(d).mean(), abs=1e-12)
    assert mae(a, b).item() == mae(b, a).item()
    mse = (d**2).mean()
    expected = math.inf if mse == 0 else 10 * math.log10(200.0**2 / mse)
    assert psnr(a, b, 200.0).item() == pytest.approx(expected)


# --- SSIM against scikit-image ------------------------------------------------------------------


def _skimage_ssim(skm, a: np.ndarray, b: np.ndarray, data_range: float, sigma: float = 1.5, full: bool = False):
    return skm.structural_similarity(
        a, b, data_range=data_range, gaussian_weights=True, sigma=sigma, use_sample_covariance=False, full=full
    )


def test_ssim_matches_scikit_image_2d(skm, slices):
    t1, pd = slices
    got = ssim(_t(np.stack([t1, t1]))[:, None], _t(np.stack([pd, t1]))[:, None], 1.0)
    assert got[0].item() == pytest.approx(_skimage_ssim(skm, t1, pd, 1.0), abs=1e-10)
    assert got[1].item() == pytest.approx(1.0, abs=1e-12)
    noisy = t1 + np.random.default_rng(0).normal(0, 0.05, t1.shape)
    assert ssim(_t(t1)[None, None], _t(noisy)[None, None], 1.0, sigma=2.0).item() == pytest.approx(
        _skimage_ssim(skm, t1, noisy, 1.0, sigma=2.0), abs=1e-10
    )


def test_ssim_matches_scikit_image_3d_and_channels(skm, slices):
    t1, pd = slices
    va, vb = _volume(t1), _volume(pd)
    assert ssim(_t(va)[None, None], _t(vb)[None, None], 1.0).item() == pytest.approx(_skimage_ssim(skm, va, vb, 1.0), abs=1e-10)
    two_a, two_b = np.stack([t1, pd]), np.stack([pd, 1.0 - t1])
    ref = skm.structural_similarity(
        two_a, two_b, data_range=1.0, channel_axis=0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )
    assert ssim(_t(two_a)[None], _t(two_b)[None], 1.0).item() == pytest.approx(ref, abs=1e-10)


def test_masked_ssim_is_the_mean_of_the_map_over_the_mask(skm, slices):
    t1, pd = slices
    _, smap = _skimage_ssim(skm, t1, pd, 1.0, full=True)
    head = t1 > 0.1
    interior = np.zeros_like(head)
    interior[5:-5, 5:-5] = True  # radius int(3.5 * 1.5 + 0.5) = 5
    got = ssim(_t(t1)[None, None], _t(pd)[None, None], 1.0, mask=torch.from_numpy(head)[None, None])
    assert got.item() == pytest.approx(smap[head & interior].mean(), abs=1e-10)
    # the mask changes the score: the head alone is not the whole image
    assert abs(got.item() - _skimage_ssim(skm, t1, pd, 1.0)) > 1e-3


def test_ssim_refuses_bad_input(slices):
    t1, _ = slices
    x = _t(t1)[None, None]
    with pytest.raises(ValueError, match="data_range"):
        ssim(x, x, 0.0)
    with pytest.raises(ValueError, match="at least 11 voxels"):
        ssim(x[..., :10], x[..., :10], 1.0)
    border = torch.zeros_like(x, dtype=torch.bool)
    border[..., 0, :] = True
    with pytest.raises(ValueError, match="from the border"):
        ssim(x, x, 1.0, mask=border)
    with pytest.raises(ValueError, match="mask: expected a bool"):
        mae(x, x, mask=border.float())
    with pytest.raises(ValueError, match="mask: expected at least one selected voxel"):
        mae(x, x, mask=torch.zeros_like(border))
    with pytest.raises(ValueError, match="b"):
        mae(x, x[..., :-1])


# --- histograms and the Bhattacharyya distance --------------------------------------------------


def test_intensity_histogram_counts_out_of_range_values_apart():
    h = intensity_histogram(np.array([-0.5, 0.0, 0.5, 1.0, 1.5]), bins=2)
    assert h.tolist() == [0.2, 0.4, 0.2, 0.2]
    with pytest.raises(ValueError, match="finite"):
        intensity_histogram(np.array([0.5, np.nan]), bins=2)


def test_bhattacharyya_distance_by_hand():
    assert bhattacharyya_distance([0.5, 0.5], [1.0, 0.0]) == pytest.approx(0.5 * math.log(2))
    assert bhattacharyya_distance([0.25, 0.75], [0.75, 0.25]) == pytest.approx(-math.log(2 * math.sqrt(0.1875)))
    assert bhattacharyya_distance([0.2, 0.3, 0.5], [0.2, 0.3, 0.5]) == 0.0
    assert bhattacharyya_distance([1.0, 0.0], [0.0, 1.0]) == math.inf
    with pytest.raises(ValueError, match="summing to 1"):
        bhattacharyya_distance([0.5, 0.6], [0.5, 0.5])


# --- normalised mutual information --------------------------------------------------------------


def test_nmi_by_hand_2x2():
    # a: 0 0 1 1, b: 0 1 1 1 with 2 bins: joint counts [[1, 1], [0, 2]] / 4
    a = _t([[0.0, 0.0], [1.0, 1.0]])[None, None]
    b = _t([[0.0, 1.0], [1.0, 1.0]])[None, None]
    h = lambda *p: -sum(x * math.log(x) for x in p)
    expected = (h(0.5, 0.5) + h(0.25, 0.75)) / h(0.25, 0.25, 0.5)
    assert normalized_mutual_information(a, b, bins=2).item() == pytest.approx(expected)
    assert normalized_mutual_information(a, a, bins=2).item() == pytest.approx(2.0)
    # any one-to-one remapping of the bins leaves it unchanged
    assert normalized_mutual_information(1.0 - 3.0 * a, b, bins=2).item() == pytest.approx(expected)


def test_nmi_matches_scikit_image(skm, slices):
    t1, pd = slices
    for bins in (2, 17, 100):
        ref = skm.normalized_mutual_information(t1, pd, bins=bins)
        assert normalized_mutual_information(_t(t1)[None, None], _t(pd)[None, None], bins).item() == pytest.approx(ref, rel=1e-12)
    va, vb = _volume(t1), _volume(pd)
    ref = skm.normalized_mutual_information(va, vb, bins=32)
    assert normalized_mutual_information(_t(va)[None, None], _t(vb)[None, None], 32).item() == pytest.approx(ref, rel=1e-12)
    head = t1 > 0.1
    ref = skm.normalized_mutual_information(t1[head], pd[head], bins=50)
    got = normalized_mutual_information(_t(t1)[None, None], _t(pd)[None, None], 50, mask=torch.from_numpy(head)[None, None])
    assert got.item() == pytest.approx(ref, rel=1e-12)
    flat = torch.ones(1, 1, 4, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="constant"):
        normalized_mutual_information(flat, flat, 8)


# --- Frechet distances --------------------------------------------------------------------------


def _scipy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """The reference FID formula (pytorch-fid): scipy.linalg.sqrtm of the covariance product."""
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * root))


def test_frechet_distance_1d_closed_form():
    # two 1D samples with exact means and (unbiased) standard deviations: d^2 = (m1 - m2)^2 + (s1 - s2)^2
    x = np.array([-1.0, 1.0])  # mean 0, unbiased variance 2
    a = _t(3.0 + 2.0 * x)[:, None]  # mean 3, sd 2 sqrt 2
    b = _t(-1.0 + 0.5 * x)[:, None]  # mean -1, sd sqrt(2) / 2
    expected = 16.0 + (2 * math.sqrt(2) - math.sqrt(2) / 2) ** 2
    assert frechet_distance(a, b) == pytest.approx(expected)
    assert simplified_frechet_distance(a, b) == pytest.approx(expected)


def test_frechet_distance_against_scipy_and_properties():
    rng = np.random.default_rng(1)
    mix = rng.normal(size=(5, 5))
    a = rng.normal(size=(200, 5)) @ mix
    b = rng.normal(size=(150, 5)) @ (mix + 0.3 * rng.normal(size=(5, 5))) + 0.5
    d = frechet_distance(_t(a), _t(b))
    assert d == pytest.approx(_scipy_frechet(a, b), rel=1e-8)
    assert d == pytest.approx(frechet_distance(_t(b), _t(a)), rel=1e-10)
    assert frechet_distance(_t(a), _t(a)) == pytest.approx(0.0, abs=1e-9)
    assert simplified_frechet_distance(_t(a), _t(a)) == 0.0
    # the simplified distance is the full one of the diagonal-covariance Gaussians
    sa, sb = a.std(0, ddof=1), b.std(0, ddof=1)
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + ((sa - sb) ** 2).sum()
    assert simplified_frechet_distance(_t(a), _t(b)) == pytest.approx(expected)
    assert simplified_frechet_distance(_t(b), _t(a)) == pytest.approx(expected)
    with pytest.raises(ValueError, match="feats_b"):
        frechet_distance(_t(a), _t(b[:, :4]))
    with pytest.raises(ValueError, match="at least 2"):
        simplified_frechet_distance(_t(a[:1]), _t(b))


# --- random features ----------------------------------------------------------------------------


def test_random_features_are_fixed_and_separate_contrasts(slices):
    t1, pd = slices
    net = RandomFeatures(width=4, depth=3, seed=3)
    x = torch.from_numpy(np.stack([t1, pd])).float()[:, None]
    f = net(x)
    assert f.shape == (2, net.num_features) == (2, 2 * 4 * 7)
    assert torch.equal(f, RandomFeatures(width=4, depth=3, seed=3)(x))  # one seed, one network
    assert not torch.equal(f, RandomFeatures(width=4, depth=3, seed=4)(x))
    assert not any(p.requires_grad for p in net.parameters()) and len(list(net.parameters())) == 0
    # batching does not change the features
    assert torch.allclose(image_features(x, net, batch_size=1), f, atol=1e-6)
    # a T1 set and its noisy copies are closer to each other than to the PD set
    rng = np.random.default_rng(2)
    noisy = lambda img: np.stack([img + rng.normal(0, 0.02, img.shape) for _ in range(6)])
    t1a, t1b, pds = (torch.from_numpy(noisy(i)).float()[:, None] for i in (t1, t1, pd))
    fa, fb, fp = (image_features(s, net) for s in (t1a, t1b, pds))
    assert simplified_frechet_distance(fa, fb) < simplified_frechet_distance(fa, fp)
    with pytest.raises(ValueError, match="images"):
        net(x[..., :4, :4])


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(0.5, 2.0))
def test_ssim_is_symmetric_and_at_most_one(seed, sigma):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(2, 1, 16, 16, generator=g, dtype=torch.float64)
    b = a + 0.2 * torch.rand(2, 1, 16, 16, generator=g, dtype=torch.float64)
    s = ssim(a, b, 1.2, sigma=min(sigma, 2.0))
    assert torch.equal(s, ssim(b, a, 1.2, sigma=min(sigma, 2.0)))
    assert (s <= 1.0).all() and (s > -1.0).all()
    assert torch.allclose(ssim(a, a, 1.2, sigma=sigma), torch.ones(2, dtype=torch.float64))
