"""What each structure extractor claims to be invariant to, checked on drawn images and on the real BrainWeb slices.

The claims are in the module docstrings of :mod:`plasticine.segmentation.mind`,
:mod:`plasticine.segmentation.foreground` and :mod:`plasticine.segmentation.contours`; the T1/PD
agreement table of every extractor is printed by ``benchmarks/structure_invariance.py``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from plasticine.core.filters import gaussian_smooth
from plasticine.data import brainweb_slices
from plasticine.segmentation import (
    ContourExtractor,
    ForegroundExtractor,
    KMeansExtractor,
    MINDExtractor,
    MultiOtsuExtractor,
    contour_map,
    mind_descriptor,
)


@pytest.fixture(scope="module")
def slices():
    d = brainweb_slices()
    return {k: torch.tensor(d[k], dtype=torch.float64)[None, None] / 255 for k in ("t1", "pd")}


def _dice(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(2 * (a * b).sum() / (a.sum() + b.sum()))


def _smooth(seed: int, shape=(14, 12), dtype=torch.float64) -> torch.Tensor:
    return gaussian_smooth(torch.rand(2, 1, *shape, generator=torch.Generator().manual_seed(seed), dtype=dtype), 1.2)


# -- MIND -----------------------------------------------------------------------------------------


@given(seed=st.integers(0, 2**16), scale=st.floats(0.1, 10.0), negative=st.booleans(), offset=st.floats(-2.0, 2.0), three_d=st.booleans())
def test_mind_is_invariant_to_affine_remaps_contrast_inversion_included(seed, scale, negative, offset, three_d):
    x = _smooth(seed, (8, 7, 6) if three_d else (14, 12))
    a = -scale if negative else scale
    torch.testing.assert_close(mind_descriptor(a * x + offset), mind_descriptor(x), rtol=0, atol=1e-7)


@pytest.mark.parametrize("scale", [-4.0, -1.0, 0.5, 8.0])
def test_mind_is_bit_exact_under_power_of_two_scalings_and_negation(scale):
    x = _smooth(7, dtype=torch.float32)
    assert torch.equal(MINDExtractor()(scale * x), MINDExtractor()(x))


def test_mind_under_a_non_monotone_remap_of_a_real_slice(slices):
    """g(x) = |x - c| folds the T1 intensities at a grey-matter level c (an order no monotone map keeps).

    Claim: wherever g is affine on the window of radius rho around x (all its intensities on one
    side of c) and the variance clamp is inactive, MIND is unchanged (to rounding); over the whole
    head the maps still correlate at 0.85 (measured 0.854), while k-means' classes of the two
    images share almost nothing (mean Dice 0.013).
    """
    t1, c = slices["t1"], 0.45
    g = (t1 - c).abs()
    sigma, dilation = 0.8, 2
    a, b = mind_descriptor(t1, sigma=sigma, dilation=dilation), mind_descriptor(g, sigma=sigma, dilation=dilation)
    rho = dilation + max(1, int(3 * sigma + 0.5))
    wmax = F.max_pool2d(t1, 2 * rho + 1, 1, rho)
    wmin = -F.max_pool2d(-t1, 2 * rho + 1, 1, rho)
    one_sided = (wmin >= c) | (wmax <= c)

    def clamp_inactive(x):  # the variance estimate inside [mean / 1000, 1000 mean] (see mind_descriptor)
        m = mind_descriptor(x, sigma=sigma, dilation=dilation)
        total = -m.log().sum(1, keepdim=True)  # sum_k D'_k / V = K exactly when V is not clamped
        return ((total - m.shape[1]).abs() < 1e-9) | (total == 0)  # (all D'_k = 0: no V matters)

    where = one_sided & clamp_inactive(t1) & clamp_inactive(g)
    assert float(where.double().mean()) > 0.4  # measured 0.445 of the slice
    assert float((a - b).abs().amax(1, keepdim=True)[where].max()) < 1e-9

    head = (ForegroundExtractor()(t1.float())[:, 1:] > 0).expand_as(a)
    u, v = a[head] - a[head].mean(), b[head] - b[head].mean()
    assert float((u * v).sum() / (u.norm() * v.norm())) > 0.85
    ka, kb = KMeansExtractor(4)(t1.float()), KMeansExtractor(4)(g.float())
    assert float((2 * (ka * kb).flatten(2).sum(2) / (ka + kb).flatten(2).sum(2)).mean()) < 0.05


# -- foreground -----------------------------------------------------------------------------------


def _head_phantom(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Background noise in [0, 0.05], an elliptic head with intensities in [0.3, 1] and dark enclosed holes."""
    g = torch.Generator().manual_seed(seed)
    h, w = 32, 28
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    head = ((yy - 15.5) / 12) ** 2 + ((xx - 13.5) / 10) ** 2 <= 1
    holes = ((yy - 12) / 3) ** 2 + ((xx - 11) / 2.5) ** 2 <= 1
    tissue = 0.3 + 0.7 * gaussian_smooth(torch.rand(1, 1, h, w, generator=g, dtype=torch.float64), 1.5)
    tissue = (tissue - tissue.min()) / (tissue.max() - tissue.min()) * 0.7 + 0.3
    noise = 0.05 * torch.rand(1, 1, h, w, generator=g, dtype=torch.float64)
    inside = head & ~holes
    return torch.where(inside, tissue, noise), inside


@given(seed=st.integers(0, 2**16))
def test_foreground_is_unchanged_by_inverting_the_contrast_inside_the_head(seed):
    x, inside = _head_phantom(seed)
    inverted = torch.where(inside, 1.3 - x, x)  # non-monotone: the head is reversed, the background kept
    ext = ForegroundExtractor(smoothing_sigma=None)
    m = ext(x)
    assert torch.equal(ext(inverted), m) and int(m[0, 1].sum()) > int(inside.sum())  # the holes are filled


def test_foreground_of_real_slices_under_inversion_and_across_contrasts(slices):
    """Measured: T1 against its inversion inside the head, (1 - x) * head, Dice 0.987; T1 against PD 0.990."""
    ext = ForegroundExtractor()
    t1, pd = slices["t1"].float(), slices["pd"].float()
    head = ext(t1)[:, 1:]
    assert _dice(ext((1 - t1) * head)[:, 1:], head) > 0.98
    assert _dice(ext(pd)[:, 1:], head) > 0.98
    k1, k2 = KMeansExtractor(4)(t1), KMeansExtractor(4)(pd)  # intensity ranks mean other tissues in PD
    assert float((2 * (k1 * k2).flatten(2).sum(2) / (k1 + k2).flatten(2).sum(2)).mean()) < 0.4  # measured 0.339


# -- contours -------------------------------------------------------------------------------------


@given(seed=st.integers(0, 2**16), classes=st.integers(2, 5), three_d=st.booleans())
def test_contours_are_invariant_to_label_permutations(seed, classes, three_d):
    g = torch.Generator().manual_seed(seed)
    shape = (6, 5, 4) if three_d else (9, 8)
    labels = (gaussian_smooth(torch.rand(1, 1, *shape, generator=g), 1.0) * 1e3).long() % classes
    partition = F.one_hot(labels[:, 0], classes).movedim(-1, 1).float()
    perm = torch.randperm(classes, generator=g)
    assert torch.equal(contour_map(partition[:, perm]), contour_map(partition))


@pytest.mark.parametrize("inner", [KMeansExtractor(2), MultiOtsuExtractor(2)], ids=["kmeans", "multi-otsu"])
def test_contours_of_a_real_slice_survive_contrast_inversion(slices, inner):
    """Two classes reverse under x -> 1 - x, so the partition's boundaries stay (measured: exactly)."""
    t1 = slices["t1"].float()
    ext = ContourExtractor(inner)
    assert torch.equal(ext(1 - t1), ext(t1))
    assert not torch.equal(inner(1 - t1), inner(t1))  # the labels themselves did change
