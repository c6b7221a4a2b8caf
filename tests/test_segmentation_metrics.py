"""Segmentation metrics against hand counts, numpy set arithmetic, brute-force surface distances and SciPy."""

import doctest
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from scipy.spatial.distance import directed_hausdorff

from plasticine.segmentation import metrics
from plasticine.segmentation.metrics import accuracy, confusion_matrix, dice, hausdorff95, iou, pixel_accuracy

from conftest import make_generator

OVERLAP = {"dice": dice, "iou": iou, "accuracy": accuracy}


def one_hot(labels: torch.Tensor, num_classes: int, dtype=torch.float32) -> torch.Tensor:
    return F.one_hot(labels[:, 0], num_classes).movedim(-1, 1).to(dtype)


def random_labels(gen, batch, num_classes, size, smooth=False):
    """Random label maps; ``smooth`` gives blobs (argmax of box-filtered noise) instead of salt and pepper."""
    noise = torch.rand(batch, num_classes, *size, generator=gen)
    if smooth:
        pool = F.avg_pool2d if len(size) == 2 else F.avg_pool3d
        noise = pool(noise, 3, stride=1, padding=1, count_include_pad=False)
    return noise.argmax(1, keepdim=True)


def surface_np(mask: np.ndarray) -> np.ndarray:
    """Voxels with a face neighbour outside the mask (outside the image counts as outside), by slicing."""
    padded = np.pad(mask, 1, constant_values=False)
    interior = padded.copy()
    for axis in range(mask.ndim):
        interior &= np.roll(padded, 1, axis) & np.roll(padded, -1, axis)
    inner = tuple(slice(1, -1) for _ in range(mask.ndim))
    return mask & ~interior[inner]


def brute_force_distances(a, b, spacing):
    pa = np.argwhere(surface_np(a)) * np.asarray(spacing)
    pb = np.argwhere(surface_np(b)) * np.asarray(spacing)
    d = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    return d.min(1), d.min(0), pa, pb


# ---------------------------------------------------------------- hand-computed cases


def test_hand_counts_2x3():
    # truth  0 1 1 / 2 2 0   prediction  0 1 2 / 2 1 0
    t = torch.tensor([[0, 1, 1], [2, 2, 0]]).view(1, 1, 2, 3)
    p = torch.tensor([[0, 1, 2], [2, 1, 0]]).view(1, 1, 2, 3)
    assert confusion_matrix(p, t, 3)[0].tolist() == [[2, 0, 0], [0, 1, 1], [0, 1, 1]]
    # class 0: |P|=2 |T|=2 TP=2; class 1: |P|=2 |T|=2 TP=1; class 2: |P|=2 |T|=2 TP=1
    torch.testing.assert_close(dice(p, t, 3), torch.tensor([[1.0, 0.5, 0.5]], dtype=torch.float64))
    torch.testing.assert_close(iou(p, t, 3), torch.tensor([[1.0, 1 / 3, 1 / 3]], dtype=torch.float64))
    torch.testing.assert_close(accuracy(p, t, 3), torch.tensor([[1.0, 0.5, 0.5]], dtype=torch.float64))
    torch.testing.assert_close(pixel_accuracy(p, t, 3), torch.tensor([4 / 6], dtype=torch.float64))
    torch.testing.assert_close(iou(p, t, 3, reduction="mean_class"), torch.tensor([5 / 9], dtype=torch.float64))
    torch.testing.assert_close(dice(p, t, 3, include_background=False, reduction="mean"), torch.tensor(0.5, dtype=torch.float64))


def test_accuracy_is_recall_not_precision():
    # truth class 1 has 1 voxel, found; prediction has 3 voxels of class 1: recall 1, precision 1/3.
    t = torch.tensor([0, 0, 0, 1]).view(1, 1, 1, 4).expand(1, 1, 2, 4).contiguous()
    p = torch.tensor([0, 1, 1, 1]).view(1, 1, 1, 4).expand(1, 1, 2, 4).contiguous()
    torch.testing.assert_close(accuracy(p, t, 2), torch.tensor([[1 / 3, 1.0]], dtype=torch.float64))
    torch.testing.assert_close(accuracy(t, p, 2), torch.tensor([[1.0, 1 / 3]], dtype=torch.float64))


def nested_squares(n=11, outer=7, inner=3):
    a = torch.zeros(1, 1, n, n, dtype=torch.long)
    b = torch.zeros(1, 1, n, n, dtype=torch.long)
    o, i = (n - outer) // 2, (n - inner) // 2
    a[..., o : o + outer, o : o + outer] = 1
    b[..., i : i + inner, i : i + inner] = 1
    return a, b


def test_nested_squares_by_hand():
    # Outer 7x7 ring (24 voxels) against inner 3x3 ring (8 voxels). Inner -> outer: 8 distances of 2.
    # Outer -> inner: 12 at 2 (side middles), 8 at sqrt(5), 4 corners at sqrt(8). Pooled: 20 x 2,
    # 8 x sqrt(5), 4 x sqrt(8); the 95th percentile sits at rank 0.95 * 31 = 29.45 -> sqrt(8).
    a, b = nested_squares()
    fg = dict(include_background=False)
    torch.testing.assert_close(dice(a, b, 2, **fg), torch.tensor([[18 / 58]], dtype=torch.float64))
    torch.testing.assert_close(iou(a, b, 2, **fg), torch.tensor([[9 / 49]], dtype=torch.float64))
    assert hausdorff95(a, b, 2, **fg).item() == pytest.approx(math.sqrt(8))
    assert hausdorff95(a, b, 2, percentile=100, **fg).item() == pytest.approx(math.sqrt(8))
    assert hausdorff95(a, b, 2, percentile=50, **fg).item() == pytest.approx(2.0)
    # rank 0.7 * 31 = 21.7 lies in the sqrt(5) block (ranks 20..27)
    assert hausdorff95(a, b, 2, percentile=70, **fg).item() == pytest.approx(math.sqrt(5))
    # directed 70th percentiles: inner -> outer 2; outer -> inner rank 0.7 * 23 = 16.1 -> sqrt(5)
    assert hausdorff95(a, b, 2, percentile=70, aggregate="max", **fg).item() == pytest.approx(math.sqrt(5))
    # directed 50th: inner 2, outer rank 11.5 between 2 (rank 11) and sqrt(5) (rank 12)
    expect = max(2.0, 2.0 + 0.5 * (math.sqrt(5) - 2.0))
    assert hausdorff95(a, b, 2, percentile=50, aggregate="max", **fg).item() == pytest.approx(expect)


def test_single_voxels_distance_and_spacing():
    p = torch.zeros(1, 1, 9, 9, dtype=torch.long)
    t = torch.zeros(1, 1, 9, 9, dtype=torch.long)
    p[0, 0, 1, 1] = 1
    t[0, 0, 4, 5] = 1
    fg = dict(include_background=False)
    assert hausdorff95(p, t, 2, **fg).item() == pytest.approx(5.0)
    assert hausdorff95(p, t, 2, spacing=(2.0, 1.0), **fg).item() == pytest.approx(math.hypot(6.0, 4.0))
    assert hausdorff95(p, t, 2, spacing=0.5, **fg).item() == pytest.approx(2.5)
    v = torch.zeros(1, 1, 4, 5, 6, dtype=torch.long)
    w = torch.zeros(1, 1, 4, 5, 6, dtype=torch.long)
    v[0, 0, 0, 1, 1] = 1
    w[0, 0, 1, 3, 3] = 1
    assert hausdorff95(v, w, 2, **fg).item() == pytest.approx(3.0)
    assert hausdorff95(v, w, 2, spacing=(3.0, 1.0, 2.0), **fg).item() == pytest.approx(math.sqrt(9 + 4 + 16))


def test_shifted_squares_hausdorff_equals_shift():
    a = torch.zeros(1, 1, 12, 14, dtype=torch.long)
    b = torch.zeros_like(a)
    a[..., 3:8, 2:7] = 1
    b[..., 3:8, 5:10] = 1  # shifted by 3 columns
    fg = dict(include_background=False)
    assert hausdorff95(a, b, 2, percentile=100, **fg).item() == pytest.approx(3.0)
    assert hausdorff95(a, b, 2, percentile=100, spacing=(1.0, 0.4), **fg).item() == pytest.approx(1.2)
    # 3D slab shifted by 2 along the first axis
    c = torch.zeros(1, 1, 10, 6, 6, dtype=torch.long)
    d = torch.zeros_like(c)
    c[:, :, 1:5, 1:5, 1:5] = 1
    d[:, :, 3:7, 1:5, 1:5] = 1
    assert hausdorff95(c, d, 2, percentile=100, **fg).item() == pytest.approx(2.0)


def test_mask_touching_the_edge_has_its_surface_there():
    # a full-image mask: its surface is the image border, so HD to a centred voxel is the farthest border voxel
    full = torch.ones(1, 1, 5, 5, dtype=torch.long)
    dot = torch.zeros(1, 1, 5, 5, dtype=torch.long)
    dot[0, 0, 2, 2] = 1
    assert hausdorff95(full, dot, 2, percentile=100, include_background=False).item() == pytest.approx(math.sqrt(8))


# ---------------------------------------------------------------- empty masks


def test_empty_conventions():
    z = torch.zeros(1, 1, 6, 6, dtype=torch.long)
    o = z.clone()
    o[0, 0, 2:4, 2:4] = 1
    for name, fn in OVERLAP.items():
        assert fn(z, z, 2)[0, 1].item() == 1.0, name
        assert math.isnan(fn(z, z, 2, empty="nan")[0, 1].item()), name
        assert fn(o, z, 2)[0, 1].item() == 0.0, name  # prediction has the class, truth does not
        assert fn(z, o, 2)[0, 1].item() == 0.0, name  # truth has it, prediction misses it
        assert fn(o, z, 2, empty="nan")[0, 1].item() == 0.0, name
    assert hausdorff95(z, z, 2)[0, 1].item() == 0.0
    assert math.isnan(hausdorff95(z, z, 2, empty="nan")[0, 1].item())
    assert hausdorff95(o, z, 2)[0, 1].item() == math.inf
    assert hausdorff95(z, o, 2, empty="nan")[0, 1].item() == math.inf


def test_nan_entries_are_skipped_by_the_means():
    t = torch.zeros(2, 1, 4, 4, dtype=torch.long)
    p = t.clone()
    t[0, 0, :2] = 1
    p[0, 0, :1] = 1  # sample 0: class 1 Dice 2*4/(4+8) = 2/3; sample 1: class 1 absent from both
    d = dice(p, t, 2, include_background=False, empty="nan")
    assert math.isnan(d[1, 0].item())
    assert dice(p, t, 2, include_background=False, empty="nan", reduction="mean").item() == pytest.approx(2 / 3)
    assert dice(p, t, 2, include_background=False, reduction="mean").item() == pytest.approx((2 / 3 + 1) / 2)
    h = hausdorff95(torch.ones_like(p), t, 2, include_background=False, reduction="mean")
    assert h.item() == math.inf


# ---------------------------------------------------------------- independent references


@given(seed=st.integers(0, 2**31 - 1), ndim=st.sampled_from([2, 3]), num_classes=st.integers(2, 4))
def test_overlap_scores_match_numpy_sets(seed, ndim, num_classes):
    gen = make_generator(seed)
    size = (7, 9) if ndim == 2 else (4, 5, 6)
    p = random_labels(gen, 2, num_classes, size)
    t = random_labels(gen, 2, num_classes, size, smooth=True)
    pn, tn = p.numpy()[:, 0], t.numpy()[:, 0]
    got = {name: fn(p, t, num_classes) for name, fn in OVERLAP.items()}
    cm = confusion_matrix(p, t, num_classes)
    for b in range(2):
        for i in range(num_classes):
            for j in range(num_classes):
                assert cm[b, i, j].item() == int(((tn[b] == i) & (pn[b] == j)).sum())
        assert pixel_accuracy(p, t, num_classes)[b].item() == pytest.approx(float((pn[b] == tn[b]).mean()))
        for c in range(num_classes):
            sp = {tuple(x) for x in np.argwhere(pn[b] == c)}
            stt = {tuple(x) for x in np.argwhere(tn[b] == c)}
            inter, union = len(sp & stt), len(sp | stt)
            ref_dice = 2 * inter / (len(sp) + len(stt)) if union else 1.0
            ref_iou = inter / union if union else 1.0
            ref_acc = inter / len(stt) if stt else (1.0 if not sp else 0.0)
            assert got["dice"][b, c].item() == pytest.approx(ref_dice)
            assert got["iou"][b, c].item() == pytest.approx(ref_iou)
            assert got["accuracy"][b, c].item() == pytest.approx(ref_acc)


@given(seed=st.integers(0, 2**31 - 1), ndim=st.sampled_from([2, 3]))
def test_overlap_properties(seed, ndim):
    gen = make_generator(seed)
    size = (8, 7) if ndim == 2 else (5, 4, 6)
    p = random_labels(gen, 3, 3, size, smooth=True)
    t = random_labels(gen, 3, 3, size, smooth=True)
    d, j = dice(p, t, 3), iou(p, t, 3)
    torch.testing.assert_close(d, dice(t, p, 3))
    torch.testing.assert_close(j, iou(t, p, 3))
    for x in (d, j, accuracy(p, t, 3), pixel_accuracy(p, t, 3)):
        assert bool(((x >= 0) & (x <= 1)).all())
    torch.testing.assert_close(d, 2 * j / (1 + j))
    assert bool((j <= d).all())
    # identical maps score perfectly
    assert bool((dice(p, p, 3) == 1).all()) and bool((hausdorff95(p, p, 3) == 0).all())
    # one-hot (float and bool) and integer inputs agree, also mixed
    for fn in (dice, iou, accuracy, hausdorff95):
        ref = fn(p, t, 3)
        torch.testing.assert_close(fn(one_hot(p, 3), one_hot(t, 3, torch.bool)), ref)
        torch.testing.assert_close(fn(one_hot(p, 3, torch.float64), t, 3), ref)
    torch.testing.assert_close(pixel_accuracy(one_hot(p, 3), t), pixel_accuracy(p, t, 3))
    # reductions are NaN-free means of the (B, L) table
    torch.testing.assert_close(dice(p, t, 3, reduction="mean_class"), d.mean(1))
    torch.testing.assert_close(dice(p, t, 3, reduction="mean_batch"), d.mean(0))
    torch.testing.assert_close(dice(p, t, 3, reduction="mean"), d.mean())
    torch.testing.assert_close(dice(p, t, 3, include_background=False), d[:, 1:])


@given(
    seed=st.integers(0, 2**31 - 1),
    ndim=st.sampled_from([2, 3]),
    q=st.sampled_from([50.0, 95.0, 100.0]),
    aggregate=st.sampled_from(["pooled", "max"]),
    anisotropic=st.booleans(),
)
def test_hausdorff_matches_brute_force(seed, ndim, q, aggregate, anisotropic):
    gen = make_generator(seed)
    size = (9, 11) if ndim == 2 else (5, 7, 6)
    p = random_labels(gen, 2, 3, size, smooth=True)
    t = random_labels(gen, 2, 3, size, smooth=bool(seed % 2))
    spacing = tuple(float(s) for s in (0.5 + 2 * torch.rand(ndim, generator=gen))) if anisotropic else (1.0,) * ndim
    got = hausdorff95(p, t, 3, spacing=spacing, percentile=q, aggregate=aggregate)
    pn, tn = p.numpy()[:, 0], t.numpy()[:, 0]
    for b in range(2):
        for c in range(3):
            a, m = pn[b] == c, tn[b] == c
            if not a.any() or not m.any():
                assert got[b, c].item() == (0.0 if a.any() == m.any() else math.inf)
                continue
            d_ab, d_ba, pa, pb = brute_force_distances(a, m, spacing)
            if aggregate == "pooled":
                ref = np.percentile(np.concatenate([d_ab, d_ba]), q)
            else:
                ref = max(np.percentile(d_ab, q), np.percentile(d_ba, q))
            assert got[b, c].item() == pytest.approx(ref, rel=1e-9, abs=1e-9)
            if q == 100.0:
                ref_h = max(directed_hausdorff(pa, pb)[0], directed_hausdorff(pb, pa)[0])
                assert got[b, c].item() == pytest.approx(ref_h, rel=1e-9, abs=1e-9)
    # symmetric in its arguments, in both aggregations
    torch.testing.assert_close(hausdorff95(t, p, 3, spacing=spacing, percentile=q, aggregate=aggregate), got)


@given(seed=st.integers(0, 2**31 - 1), ndim=st.sampled_from([2, 3]), scale=st.floats(0.1, 10.0))
def test_hausdorff_spacing_scales_and_follows_axes(seed, ndim, scale):
    gen = make_generator(seed)
    size = (10, 8) if ndim == 2 else (6, 5, 7)
    p = random_labels(gen, 1, 2, size, smooth=True)
    t = random_labels(gen, 1, 2, size, smooth=True)
    spacing = tuple(float(s) for s in (0.5 + torch.rand(ndim, generator=gen)))
    base = hausdorff95(p, t, 2, spacing=spacing)
    scaled = hausdorff95(p, t, 2, spacing=tuple(scale * s for s in spacing))
    torch.testing.assert_close(scaled, scale * base)
    # permuting the axes together with the spacing leaves the distances unchanged
    perm = tuple(reversed(range(ndim)))
    dims = (0, 1) + tuple(2 + i for i in perm)
    permuted = hausdorff95(p.permute(dims), t.permute(dims), 2, spacing=tuple(spacing[i] for i in perm))
    torch.testing.assert_close(permuted, base)


def test_results_stay_on_the_input_device(device):
    gen = make_generator(3)
    p = random_labels(gen, 2, 3, (6, 7)).to(device)
    t = random_labels(gen, 2, 3, (6, 7)).to(device)
    for fn in (dice, iou, accuracy, hausdorff95):
        out = fn(p, t, 3)
        assert out.device == p.device and out.dtype == torch.float64
        torch.testing.assert_close(out.cpu(), fn(p.cpu(), t.cpu(), 3))
    assert confusion_matrix(p, t, 3).dtype == torch.int64


# ---------------------------------------------------------------- errors


def test_bad_inputs_raise_clear_errors():
    p = torch.zeros(2, 1, 5, 6, dtype=torch.long)
    with pytest.raises(ValueError, match=r"S=\(5, 7\) does not match S=\(5, 6\)"):
        dice(p, torch.zeros(2, 1, 5, 7, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="B=3 does not match B=2"):
        iou(p, torch.zeros(3, 1, 5, 6, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="num_classes is required"):
        dice(p, p)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 1\], found \[0, 2\]"):
        dice(p, p + (torch.arange(6) % 3).view(1, 1, 1, 6), 2)
    with pytest.raises(ValueError, match="integer label map must have shape"):
        dice(torch.zeros(2, 3, 5, 6, dtype=torch.long), p, 3)
    with pytest.raises(ValueError, match="binary mask"):
        dice(torch.zeros(2, 1, 5, 6, dtype=torch.bool), p, 2)
    with pytest.raises(ValueError, match="only 0 and 1"):
        dice(torch.full((2, 2, 5, 6), 0.5), p, 2)
    with pytest.raises(ValueError, match="exactly one channel"):
        dice(torch.ones(2, 2, 5, 6), p, 2)
    with pytest.raises(ValueError, match="2 or 3 spatial dimensions"):
        dice(torch.zeros(2, 1, 5, dtype=torch.long), torch.zeros(2, 1, 5, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="reduction"):
        dice(p, p, 2, reduction="sum")
    with pytest.raises(ValueError, match="empty"):
        iou(p, p, 2, empty="zero")
    with pytest.raises(ValueError, match="spacing"):
        hausdorff95(p, p, 2, spacing=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        hausdorff95(p, p, 2, spacing=(1.0, 0.0))
    with pytest.raises(ValueError, match="percentile"):
        hausdorff95(p, p, 2, percentile=0)
    with pytest.raises(ValueError, match="aggregate"):
        hausdorff95(p, p, 2, aggregate="mean")
    with pytest.raises(ValueError, match="at least 2 classes"):
        dice(torch.ones(2, 1, 5, 6), torch.ones(2, 1, 5, 6), include_background=False)
    with pytest.raises(ValueError, match="complex"):
        dice(torch.zeros(2, 1, 5, 6, dtype=torch.complex64), p, 2)
    with pytest.raises(TypeError):
        dice(np.zeros((2, 1, 5, 6)), p, 2)


def test_docstring_examples():
    result = doctest.testmod(metrics, extraglobs={"torch": torch}, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 6 and result.failed == 0
