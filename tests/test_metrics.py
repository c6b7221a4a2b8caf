"""plasticine.metrics against scikit-image, SciPy, closed forms and values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from plasticine.data import brainweb_slices
from plasticine.metrics import mae, psnr, ssim

skimage_metrics = pytest.importorskip("skimage.metrics", reason="scikit-image is the reference (pip install scikit-image)")


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


def _skimage_ssim(a: np.ndarray, b: np.ndarray, data_range: float, sigma: float = 1.5, full: bool = False):
    return skimage_metrics.structural_similarity(
        a, b, data_range=data_range, gaussian_weights=True, sigma=sigma, use_sample_covariance=False, full=full
    )


def test_ssim_matches_scikit_image_2d(slices):
    t1, pd = slices
    got = ssim(_t(np.stack([t1, t1]))[:, None], _t(np.stack([pd, t1]))[:, None], 1.0)
    assert got[0].item() == pytest.approx(_skimage_ssim(t1, pd, 1.0), abs=1e-10)
    assert got[1].item() == pytest.approx(1.0, abs=1e-12)
    noisy = t1 + np.random.default_rng(0).normal(0, 0.05, t1.shape)
    assert ssim(_t(t1)[None, None], _t(noisy)[None, None], 1.0, sigma=2.0).item() == pytest.approx(
        _skimage_ssim(t1, noisy, 1.0, sigma=2.0), abs=1e-10
    )


def test_ssim_matches_scikit_image_3d_and_channels(slices):
    t1, pd = slices
    va, vb = _volume(t1), _volume(pd)
    assert ssim(_t(va)[None, None], _t(vb)[None, None], 1.0).item() == pytest.approx(_skimage_ssim(va, vb, 1.0), abs=1e-10)
    two_a, two_b = np.stack([t1, pd]), np.stack([pd, 1.0 - t1])
    ref = skimage_metrics.structural_similarity(
        two_a, two_b, data_range=1.0, channel_axis=0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )
    assert ssim(_t(two_a)[None], _t(two_b)[None], 1.0).item() == pytest.approx(ref, abs=1e-10)


def test_masked_ssim_is_the_mean_of_the_map_over_the_mask(slices):
    t1, pd = slices
    _, smap = _skimage_ssim(t1, pd, 1.0, full=True)
    head = t1 > 0.1
    interior = np.zeros_like(head)
    interior[5:-5, 5:-5] = True  # radius int(3.5 * 1.5 + 0.5) = 5
    got = ssim(_t(t1)[None, None], _t(pd)[None, None], 1.0, mask=torch.from_numpy(head)[None, None])
    assert got.item() == pytest.approx(smap[head & interior].mean(), abs=1e-10)
    # the mask changes the score: the head alone is not the whole image
    assert abs(got.item() - _skimage_ssim(t1, pd, 1.0)) > 1e-3


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
