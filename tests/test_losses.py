"""Registration losses against independent references, closed forms and their invariants.

References written here, independently of the library code: a dense float64 Parzen estimator
(every sample times every bin), brute-force window loops for local NCC, ``numpy.corrcoef`` for
NCC, ``numpy.diff`` for the regularisers, ``scipy.ndimage.convolve`` for the box sums.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import make_generator
from plasticine.core import SimilarityLoss
from plasticine.losses import (
    NCC,
    BendingEnergy,
    GradientSmoothness,
    LocalNCC,
    MutualInformation,
    bending_energy,
    box_sum,
    gradient_smoothness,
    joint_histogram,
    local_ncc,
    mutual_information,
    ncc,
)

SEEDS = st.integers(0, 2**31 - 1)


def smooth_image(shape, gen, dtype=torch.float64):
    """A random image with structure at several scales (upsampled noise plus fine noise)."""
    coarse = torch.rand((shape[0], shape[1]) + tuple(max(2, s // 4) for s in shape[2:]), generator=gen, dtype=dtype)
    mode = "bilinear" if len(shape) == 4 else ("trilinear" if len(shape) == 5 else "linear")
    up = torch.nn.functional.interpolate(coarse, size=shape[2:], mode=mode, align_corners=True)
    return up + 0.05 * torch.rand(shape, generator=gen, dtype=dtype)


# --------------------------------------------------------------------------------------------
# Mutual information: the dense float64 reference of the same estimator


def _bspline3(d: torch.Tensor) -> torch.Tensor:
    a = d.abs()
    return torch.where(a < 1, 2.0 / 3.0 - a**2 + a**3 / 2, torch.where(a < 2, (2 - a) ** 3 / 6, torch.zeros_like(a)))


def dense_joint(x, y, mask, bins, kernel="bspline", sigma=0.5):
    """Every sample times every bin, float64: h[i, j] = sum_v w_v K(t_v - i) K(s_v - j)."""
    x, y = x.double().flatten(2), y.double().flatten(2)
    w = torch.ones_like(x[:, :1]) if mask is None else mask.double().flatten(2)

    def position(v):
        inside = w > 0
        lo = torch.where(inside, v, math.inf).amin(2, keepdim=True)
        hi = torch.where(inside, v, -math.inf).amax(2, keepdim=True)
        unit = ((v - lo) / (hi - lo)).clamp(0, 1)
        return 1 + unit * (bins - 3) if kernel == "bspline" else unit * (bins - 1)

    centres = torch.arange(bins, dtype=torch.float64)

    def weights(t):
        d = t.unsqueeze(-1) - centres
        if kernel == "bspline":
            return _bspline3(d)
        return torch.exp(-(d**2) / (2 * sigma**2)) * (d.abs() <= 4 * sigma)

    h = torch.einsum("bcn,bcni,bcnj->bcij", w.expand_as(x), weights(position(x)), weights(position(y)))
    return h / h.sum((2, 3), keepdim=True)


def dense_mi(p, normalized):
    def entropy(q, dims):
        q = q.clamp(min=1e-300)
        return -(q * q.log()).sum(dims)

    hm, hf, hj = entropy(p.sum(3), (2,)), entropy(p.sum(2), (2,)), entropy(p, (2, 3))
    return ((hm + hf) / hj if normalized else hm + hf - hj).mean()


@pytest.mark.parametrize("kernel", ["bspline", "gaussian"])
@pytest.mark.parametrize("shape", [(2, 1, 17, 23), (1, 2, 7, 8, 9)])
@pytest.mark.parametrize("masked", [False, True])
def test_mi_matches_dense_reference(kernel, shape, masked):
    gen = make_generator(3)
    x = torch.rand(shape, generator=gen, dtype=torch.float64)
    y = x**2 + 0.3 * torch.rand(shape, generator=gen, dtype=torch.float64)
    mask = (torch.rand((shape[0], 1) + shape[2:], generator=gen) > 0.3) if masked else None
    p = joint_histogram(x, y, mask, bins=11, kernel=kernel)
    ref = dense_joint(x, y, mask, 11, kernel)
    torch.testing.assert_close(p, ref, rtol=0, atol=1e-14)
    for normalized in (True, False):
        value = mutual_information(x, y, mask, bins=11, kernel=kernel, normalized=normalized)
        torch.testing.assert_close(value, -dense_mi(ref, normalized), rtol=1e-12, atol=1e-12)


def test_mi_float32_matches_float64_reference_at_scale():
    gen = make_generator(4)
    x = smooth_image((1, 1, 64, 64), gen)
    y = (1 - x) ** 3 + 0.1 * torch.rand(x.shape, generator=gen, dtype=torch.float64)
    ref = -dense_mi(dense_joint(x, y, None, 32), True)
    value = mutual_information(x.float(), y.float(), bins=32)
    assert value.dtype == torch.float32
    assert abs(value.item() - ref.item()) < 1e-5


@pytest.mark.parametrize("kernel", ["bspline", "gaussian"])
@pytest.mark.parametrize("normalized", [True, False])
def test_mi_gradcheck(kernel, normalized):
    gen = make_generator(5)
    x = torch.rand(2, 1, 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.rand(2, 1, 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.rand(2, 1, 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    f = lambda a, b, m: mutual_information(a, b, m, bins=6, kernel=kernel, normalized=normalized)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, y, w))
    g = lambda a, b: mutual_information(a, b, bins=5, kernel=kernel, moving_range=(0.1, 0.9), fixed_range=(0, 1))  # noqa: E731
    assert torch.autograd.gradcheck(g, (x, y))


def test_mi_gradcheck_3d_only_moving():
    gen = make_generator(6)
    x = torch.rand(1, 1, 4, 5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.rand(1, 1, 4, 5, 3, generator=gen, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: mutual_information(a, y, bins=7), (x,))


@given(seed=SEEDS, kernel=st.sampled_from(["bspline", "gaussian"]), ndim=st.sampled_from([2, 3]))
def test_mi_symmetric_and_nmi_bounded(seed, kernel, ndim):
    gen = make_generator(seed)
    shape = (2, 1) + (12,) * ndim
    x = smooth_image(shape, gen, torch.float32)
    y = torch.rand(shape, generator=gen) * x + x**2
    for normalized in (True, False):
        a = mutual_information(x, y, bins=16, kernel=kernel, normalized=normalized)
        b = mutual_information(y, x, bins=16, kernel=kernel, normalized=normalized)
        assert abs(a.item() - b.item()) < 1e-5
    p = joint_histogram(x, y, bins=16, kernel=kernel)
    nmi = -torch.stack([mutual_information(x[i : i + 1], y[i : i + 1], bins=16, kernel=kernel) for i in range(2)])
    assert torch.all(nmi >= 1 - 1e-5) and torch.all(nmi <= 2 + 1e-5)
    torch.testing.assert_close(p.sum((2, 3)), torch.ones(2, 1))
    mi = -mutual_information(x, y, bins=16, kernel=kernel, normalized=False)
    assert -1e-5 <= mi.item() <= math.log(16)


@given(seed=SEEDS, shift=st.integers(1, 4), axis=st.sampled_from([2, 3]))
def test_mi_lowest_for_identical_images(seed, shift, axis):
    gen = make_generator(seed)
    x = smooth_image((1, 1, 24, 24), gen, torch.float32)
    other = smooth_image((1, 1, 24, 24), gen, torch.float32)
    for normalized in (True, False):
        same = mutual_information(x, x, bins=16, normalized=normalized)
        assert same < mutual_information(x, torch.roll(x, shift, axis), bins=16, normalized=normalized)
        assert same < mutual_information(x, other, bins=16, normalized=normalized)


@given(seed=SEEDS, power=st.floats(0.5, 2.0))
def test_mi_nearly_invariant_to_monotone_maps(seed, power):
    gen = make_generator(seed)
    x = smooth_image((1, 1, 32, 32), gen, torch.float32)
    y = smooth_image((1, 1, 32, 32), gen, torch.float32) + x
    base = mutual_information(x, y, bins=16)
    mapped = mutual_information(x, 2.0 * y**power + 1.0, bins=16)  # y > 0, increasing map
    assert abs(mapped.item() - base.item()) < 0.05 * abs(base.item())
    # an affine map a x + b (a > 0) changes nothing but rounding
    torch.testing.assert_close(mutual_information(3 * x - 1, y, bins=16), mutual_information(x, y, bins=16))


def test_mi_peaks_at_alignment_on_real_t1_pd():
    from plasticine.data import brainweb_slices

    d = brainweb_slices()
    t1 = torch.from_numpy(d["t1"]).float()[None, None]
    pd = torch.from_numpy(d["pd"]).float()[None, None]
    aligned = mutual_information(t1, pd)
    for shift in (1, 3):
        for axis in (2, 3):
            assert aligned < mutual_information(t1, torch.roll(pd, shift, axis))
            assert mutual_information(t1, pd, normalized=False) < mutual_information(t1, torch.roll(pd, shift, axis), normalized=False)


def test_mi_mask_restricts():
    gen = make_generator(8)
    x = smooth_image((2, 1, 20, 20), gen)
    y = smooth_image((2, 1, 20, 20), gen) + x
    mask = torch.zeros(2, 1, 20, 20, dtype=torch.bool)
    mask[:, :, 3:15, 5:17] = True
    y2 = torch.where(mask, y, 100 * torch.rand(y.shape, generator=gen, dtype=torch.float64) - 50)
    x2 = torch.where(mask, x, -7.0)
    for kernel in ("bspline", "gaussian"):
        a = mutual_information(x, y, mask, bins=12, kernel=kernel)
        torch.testing.assert_close(mutual_information(x2, y2, mask, bins=12, kernel=kernel), a, rtol=1e-12, atol=1e-12)
        crop = (slice(None), slice(None), slice(3, 15), slice(5, 17))
        torch.testing.assert_close(mutual_information(x[crop], y[crop], bins=12, kernel=kernel), a, rtol=1e-12, atol=1e-12)
    xr = x2.clone().requires_grad_()
    mutual_information(xr, y2, mask, bins=12).backward()
    assert torch.all(xr.grad[~mask] == 0) and xr.grad[mask].abs().sum() > 0


def test_mi_value_range_clips():
    gen = make_generator(9)
    x = torch.rand(1, 1, 16, 16, generator=gen, dtype=torch.float64)
    y = torch.rand(1, 1, 16, 16, generator=gen, dtype=torch.float64)
    ranged = mutual_information(x, y, bins=8, moving_range=(0.2, 0.8), fixed_range=(0.0, 1.0))
    clipped = mutual_information(x.clamp(0.2, 0.8), y, bins=8, moving_range=(0.2, 0.8), fixed_range=(0.0, 1.0))
    torch.testing.assert_close(ranged, clipped)
    with pytest.raises(ValueError, match="moving_range"):
        mutual_information(x, y, moving_range=(1.0, 1.0))


def test_mi_under_autocast_computes_in_float32():
    # MONAI #7622: histograms in float16 gave -inf. Inputs in bfloat16 and autocast on.
    gen = make_generator(10)
    x = smooth_image((2, 1, 32, 32), gen, torch.float32)
    y = x**2 + 0.1 * torch.rand(x.shape, generator=gen)
    ref = mutual_information(x.bfloat16().float(), y.bfloat16().float())
    xb = x.bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        p = joint_histogram(xb, y.bfloat16())
        value = mutual_information(xb, y.bfloat16())
    assert p.dtype == torch.float32 and value.dtype == torch.float32
    assert torch.isfinite(value)
    torch.testing.assert_close(value, ref)
    value.backward()
    assert xb.grad.dtype == torch.bfloat16 and torch.isfinite(xb.grad.float()).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for loss in (ncc(xb, y), local_ncc(xb, y, window=5)):
            assert loss.dtype == torch.float32 and torch.isfinite(loss)


@pytest.mark.parametrize("kernel", ["bspline", "gaussian"])
def test_mi_constant_images_are_finite(kernel):
    # MONAI #9018: a constant image gave NaN.
    gen = make_generator(11)
    c = torch.full((1, 1, 10, 10), 0.3, dtype=torch.float64, requires_grad=True)
    y = torch.rand(1, 1, 10, 10, generator=gen, dtype=torch.float64)
    for a, b in ((c, y), (y, c), (c, c)):
        for normalized in (True, False):
            value = mutual_information(a, b, bins=8, kernel=kernel, normalized=normalized)
            assert torch.isfinite(value)
            assert value.item() == pytest.approx(-1.0 if normalized else 0.0, abs=1e-12)
    mutual_information(c, y, bins=8, kernel=kernel).backward()
    assert torch.isfinite(c.grad).all()
    empty = torch.zeros(1, 1, 10, 10, dtype=torch.bool)
    assert mutual_information(y, y, empty).item() == -1.0


def test_mi_rejects_bad_settings():
    x = torch.rand(1, 1, 8, 8)
    for bins in (3, 2, 0):
        with pytest.raises(ValueError, match="bins"):
            mutual_information(x, x, bins=bins)
    with pytest.raises(ValueError, match="bins"):
        mutual_information(x, x, bins=1, kernel="gaussian")
    with pytest.raises(ValueError, match="bins"):
        MutualInformation(bins=3)
    with pytest.raises(ValueError, match="sigma"):
        mutual_information(x, x, kernel="gaussian", sigma=0.0)
    with pytest.raises(ValueError, match="kernel"):
        mutual_information(x, x, kernel="parzen")  # type: ignore[arg-type]
    assert mutual_information(x, x, bins=4).isfinite()
    assert mutual_information(x, x, bins=2, kernel="gaussian").isfinite()


# --------------------------------------------------------------------------------------------
# NCC and local NCC


@given(seed=SEEDS, a=st.floats(0.01, 100.0), b=st.floats(-100.0, 100.0), ndim=st.sampled_from([1, 2, 3]))
def test_ncc_bounds_affine_and_numpy(seed, a, b, ndim):
    gen = make_generator(seed)
    shape = (2, 2) + (6,) * ndim
    x = torch.rand(shape, generator=gen, dtype=torch.float64)
    y = torch.rand(shape, generator=gen, dtype=torch.float64) + 0.5 * x
    value = ncc(x, y)
    ref = np.mean([np.corrcoef(x[i, c].flatten().numpy(), y[i, c].flatten().numpy())[0, 1] for i in range(2) for c in range(2)])
    assert value.item() == pytest.approx(-ref, abs=1e-12)
    assert -1 <= value.item() <= 1
    assert ncc(x, a * x + b).item() == pytest.approx(-1.0, abs=1e-9)
    assert ncc(x, -a * x + b).item() == pytest.approx(1.0, abs=1e-9)
    xf = x.float()
    assert -1 <= ncc(xf, a * xf + b).item() <= -1 + 1e-4


def brute_local_ncc(x, y, mask, window):
    """Window loops in float64 over every centre; windows clipped at the border and to the mask."""
    x, y = x.double().numpy(), y.double().numpy()
    w = np.ones_like(x[:, :1]) if mask is None else mask.double().numpy()
    r = window // 2
    spatial = x.shape[2:]
    out = []
    for bi in range(x.shape[0]):
        for ci in range(x.shape[1]):
            num = den = 0.0
            for p in np.ndindex(*spatial):
                sl = tuple(slice(max(0, q - r), q + r + 1) for q in p)
                ww = w[bi, 0][sl]
                n = ww.sum()
                value = 0.0
                if n > 0:
                    mx = (ww * x[bi, ci][sl]).sum() / n
                    my = (ww * y[bi, ci][sl]).sum() / n
                    dx, dy = x[bi, ci][sl] - mx, y[bi, ci][sl] - my
                    vx, vy = (ww * dx * dx).sum(), (ww * dy * dy).sum()
                    if vx > 1e-12 and vy > 1e-12:
                        value = (ww * dx * dy).sum() / math.sqrt(vx * vy)
                num += w[bi, 0][p] * value
                den += w[bi, 0][p]
            out.append(num / den)
    return -float(np.mean(out))


@pytest.mark.parametrize("shape", [(2, 1, 15), (1, 2, 7, 9), (1, 1, 5, 6, 7)])
@pytest.mark.parametrize("masked", [False, True])
def test_local_ncc_matches_brute_force(shape, masked):
    gen = make_generator(12)
    x = torch.rand(shape, generator=gen, dtype=torch.float64)
    y = torch.rand(shape, generator=gen, dtype=torch.float64) + x
    mask = (torch.rand((shape[0], 1) + shape[2:], generator=gen) > 0.3) if masked else None
    value = local_ncc(x, y, mask, window=3)
    assert value.item() == pytest.approx(brute_local_ncc(x, y, mask, 3), abs=1e-12)


@given(seed=SEEDS, a=st.floats(0.01, 100.0), b=st.floats(-100.0, 100.0), ndim=st.sampled_from([1, 2, 3]), window=st.sampled_from([3, 5, 9]))
def test_local_ncc_bounded_and_affine(seed, a, b, ndim, window):
    gen = make_generator(seed)
    shape = (1, 1) + (10,) * ndim
    x = torch.rand(shape, generator=gen, dtype=torch.float64)
    y = torch.rand(shape, generator=gen, dtype=torch.float64)
    assert -1 <= local_ncc(x, y, window=window).item() <= 1
    assert local_ncc(x, a * x + b, window=window).item() == pytest.approx(-1.0, abs=1e-9)
    assert local_ncc(x, -a * x + b, window=window).item() == pytest.approx(1.0, abs=1e-9)
    xf = x.float()
    assert -1 <= local_ncc(xf, a * xf + b, window=window).item() <= -1 + 1e-3


def test_local_ncc_stable_with_large_offsets_and_flat_windows():
    # MONAI #8350, voxelmorph #211/#444: cancellation made variances negative, flat windows 0/0.
    gen = make_generator(13)
    x = smooth_image((1, 1, 24, 24), gen)
    y = smooth_image((1, 1, 24, 24), gen) + x
    ref = local_ncc(x, y, window=5).item()
    value = local_ncc((x + 1e3).float(), (10 * y - 5e2).float(), window=5)
    assert abs(value.item() - ref) < 2e-3
    flat = x.clone()
    flat[:, :, :12] = 0.7  # flat half: NCC 0 there
    for img in (flat.float(), flat.half()):
        xr = img.clone().requires_grad_()
        loss = local_ncc(xr, y.to(img.dtype), window=5)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(xr.grad).all()
    const = torch.full((1, 1, 16, 16), 3.0, requires_grad=True)
    for loss in (local_ncc(const, const), ncc(const, const), local_ncc(const, torch.rand(1, 1, 16, 16, generator=gen), torch.ones(1, 1, 16, 16, dtype=torch.bool))):
        loss.backward()
        assert loss.item() == 0.0 and torch.isfinite(const.grad).all()


@pytest.mark.parametrize("loss", [ncc, local_ncc])
def test_ncc_masks_restrict(loss):
    gen = make_generator(14)
    x = smooth_image((2, 1, 16, 16), gen)
    y = smooth_image((2, 1, 16, 16), gen) + x
    mask = torch.rand(2, 1, 16, 16, generator=gen) > 0.4
    noise = 1e3 * torch.rand(x.shape, generator=gen, dtype=torch.float64)
    a = loss(x, y, mask)
    torch.testing.assert_close(loss(torch.where(mask, x, noise), torch.where(mask, y, -noise), mask), a, rtol=1e-12, atol=1e-12)
    xr = torch.where(mask, x, noise).requires_grad_()
    loss(xr, y, mask).backward()
    assert torch.all(xr.grad[~mask] == 0)


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_ncc_gradcheck(ndim):
    gen = make_generator(15)
    shape = (2, 1) + (5,) * ndim
    x = torch.rand(shape, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.rand(shape, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = torch.rand((2, 1) + (5,) * ndim, generator=gen, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: ncc(a, b, mask), (x, y))
    assert torch.autograd.gradcheck(lambda a, b: local_ncc(a, b, window=3), (x, y))
    assert torch.autograd.gradcheck(lambda a, b: local_ncc(a, b, mask > 0.3, window=(3,) * ndim), (x, y))
    soft = mask.clone().requires_grad_()  # a soft mask is differentiated too
    assert torch.autograd.gradcheck(lambda m: local_ncc(x.detach(), y.detach(), m, window=3), (soft,))
    assert torch.autograd.gradcheck(lambda m: ncc(x.detach(), y.detach(), m), (soft,))


def test_box_sum_matches_scipy_and_is_self_adjoint():
    gen = make_generator(16)
    for shape, window in (((2, 3, 11), 5), ((1, 2, 8, 9), (3, 7)), ((1, 1, 6, 5, 7), 9)):
        x = torch.rand(shape, generator=gen, dtype=torch.float64)
        windows = (window,) * (len(shape) - 2) if isinstance(window, int) else window
        ref = ndi.convolve(x.numpy(), np.ones((1, 1) + windows), mode="constant")
        np.testing.assert_allclose(box_sum(x, window).numpy(), ref, atol=1e-12)
        x.requires_grad_()
        assert torch.autograd.gradcheck(lambda a: box_sum(a, window), (x,))


# --------------------------------------------------------------------------------------------
# Regularisers


def numpy_smoothness(u, h):
    n = u.shape[1]
    phys = u * np.asarray(h).reshape(1, n, *([1] * n))
    return sum(np.mean((np.diff(phys, axis=2 + j) / h[j]) ** 2) for j in range(n))


def numpy_bending(u, h):
    n = u.shape[1]
    phys = u * np.asarray(h).reshape(1, n, *([1] * n))
    total = sum(np.mean((np.diff(phys, 2, axis=2 + j) / h[j] ** 2) ** 2) for j in range(n))
    for j in range(n):
        for k in range(j + 1, n):
            total += 2 * np.mean((np.diff(np.diff(phys, axis=2 + j), axis=2 + k) / (h[j] * h[k])) ** 2)
    return total


@pytest.mark.parametrize("shape,spacing", [((2, 2, 7, 9), (1.0, 1.0)), ((2, 2, 6, 8), (0.7, 1.9)), ((1, 3, 4, 5, 6), (2.0, 1.0, 0.5))])
def test_regularisers_match_numpy(shape, spacing):
    gen = make_generator(17)
    u = torch.randn(shape, generator=gen, dtype=torch.float64)
    assert gradient_smoothness(u, spacing).item() == pytest.approx(numpy_smoothness(u.numpy(), spacing), rel=1e-12)
    assert bending_energy(u, spacing).item() == pytest.approx(numpy_bending(u.numpy(), spacing), rel=1e-12)
    assert GradientSmoothness(spacing)(u).item() == gradient_smoothness(u, spacing).item()
    assert BendingEnergy(spacing)(u).item() == bending_energy(u, spacing).item()
    u.requires_grad_()
    assert torch.autograd.gradcheck(lambda a: gradient_smoothness(a, spacing), (u,))
    assert torch.autograd.gradcheck(lambda a: bending_energy(a, spacing), (u,))


def test_regularisers_closed_forms_on_polynomials(ndim):
    size = 7
    coords = torch.meshgrid(*[torch.arange(size, dtype=torch.float64)] * ndim, indexing="ij")
    u = torch.zeros((1, ndim) + (size,) * ndim, dtype=torch.float64)
    # u_0 = a x_last^2 / 2: d2/dx2 = a exactly, forward differences a (x + 1/2).
    a = 1.5
    u[0, 0] = 0.5 * a * coords[-1] ** 2
    assert bending_energy(u).item() == pytest.approx(a**2 / ndim, rel=1e-12)
    diffs = a * (torch.arange(size - 1, dtype=torch.float64) + 0.5)
    assert gradient_smoothness(u).item() == pytest.approx((diffs**2).mean().item() / ndim, rel=1e-12)
    # u_1 = a x_0 x_1: only the mixed derivative (= a), counted twice.
    u.zero_()
    u[0, 1] = a * coords[0] * coords[1]
    assert bending_energy(u).item() == pytest.approx(2 * a**2 / ndim, rel=1e-12)
    # linear field: zero bending, gradient smoothness c^2 / N per component and axis
    u.zero_()
    u[0, -1] = 0.25 * coords[0]
    assert bending_energy(u).item() == pytest.approx(0.0, abs=1e-24)
    assert gradient_smoothness(u).item() == pytest.approx(0.25**2 / ndim, rel=1e-12)


def test_bending_energy_penalises_checkerboard(ndim):
    # MONAI #6541: central differences (np.gradient twice) vanish on a checkerboard.
    size = 8
    coords = torch.meshgrid(*[torch.arange(size)] * ndim, indexing="ij")
    board = (-1.0) ** sum(coords).double()
    u = torch.zeros((1, ndim) + (size,) * ndim, dtype=torch.float64)
    u[0, 0] = board
    central = (u[:, :, 2:] - u[:, :, :-2]) / 2  # central first difference along axis 0
    assert central.abs().max() == 0  # the pitfall: so is every central second difference
    # pure terms (-4)^2 on each axis, mixed terms 4^2 counted twice, averaged over N components
    expected = (16.0 * ndim + 2 * 16.0 * ndim * (ndim - 1) / 2) / ndim
    assert bending_energy(u).item() == pytest.approx(expected, rel=1e-12)
    assert gradient_smoothness(u).item() == pytest.approx(4.0, rel=1e-12)


@pytest.mark.parametrize("ndim", [2, 3])
def test_regularisers_resolution_independent(ndim):
    # MONAI #3485: the same continuous field at two resolutions gives about the same value.
    def field(size):
        h = 1.0 / (size - 1)
        xs = torch.meshgrid(*[torch.linspace(0, 1, size, dtype=torch.float64)] * ndim, indexing="ij")
        phys = torch.stack([0.1 * torch.sin(2 * xs[-1] + i) * torch.cos(1.5 * xs[0]) for i in range(ndim)])
        return (phys / h).unsqueeze(0), h  # displacement in voxels

    u1, h1 = field(17)
    u2, h2 = field(33)
    for f in (gradient_smoothness, bending_energy):
        v1, v2 = f(u1, h1).item(), f(u2, h2).item()
        assert v1 > 0 and abs(v1 - v2) < 0.05 * v2
    # in voxel units the bending energy scales with h^2 (the Jacobian is dimensionless, so the
    # gradient smoothness of an isotropic grid does not depend on the spacing)
    assert bending_energy(u1).item() / bending_energy(u2).item() == pytest.approx(4.0, rel=0.1)


def test_regulariser_shape_errors():
    with pytest.raises(ValueError, match="displacement"):
        gradient_smoothness(torch.zeros(1, 3, 8, 8))  # 3 components in 2D
    with pytest.raises(ValueError, match="displacement"):
        bending_energy(torch.zeros(1, 2, 8))
    with pytest.raises(ValueError, match="at least 3"):
        bending_energy(torch.zeros(1, 2, 2, 8))
    with pytest.raises(ValueError, match="at least 2"):
        gradient_smoothness(torch.zeros(1, 2, 1, 8))
    with pytest.raises(ValueError, match="spacing"):
        bending_energy(torch.zeros(1, 2, 8, 8), spacing=(1.0, 0.0))
    with pytest.raises(ValueError, match="spacing"):
        gradient_smoothness(torch.zeros(1, 3, 4, 4, 4), spacing=(1.0, 1.0))


# --------------------------------------------------------------------------------------------
# Shapes, modules, protocol


@pytest.mark.parametrize("loss", [mutual_information, ncc, local_ncc])
def test_similarity_shape_errors(loss):
    x = torch.rand(2, 1, 8, 8)
    with pytest.raises(ValueError, match="fixed"):
        loss(x, torch.rand(2, 1, 8, 9))
    with pytest.raises(ValueError, match="fixed"):
        loss(x, torch.rand(1, 1, 8, 8))
    with pytest.raises(ValueError, match="mask"):
        loss(x, x, torch.ones(2, 2, 8, 8))
    with pytest.raises(ValueError, match="mask"):
        loss(x, x, torch.ones(2, 1, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="moving"):
        loss(torch.rand(8, 8), torch.rand(8, 8))


def test_local_ncc_window_errors():
    x = torch.rand(1, 1, 8, 8)
    for window in (4, 0, (3, 5, 7), (3, 4)):
        with pytest.raises(ValueError, match="window"):
            local_ncc(x, x, window=window)
    with pytest.raises(ValueError, match="window"):
        LocalNCC(window=2)


def test_modules_call_functions_and_satisfy_protocol():
    gen = make_generator(18)
    x = torch.rand(1, 1, 12, 12, generator=gen)
    y = torch.rand(1, 1, 12, 12, generator=gen) + x
    mask = torch.rand(1, 1, 12, 12, generator=gen) > 0.2
    pairs = [
        (MutualInformation(bins=16, kernel="gaussian", sigma=0.7), lambda *a: mutual_information(*a, bins=16, kernel="gaussian", sigma=0.7)),
        (NCC(), ncc),
        (LocalNCC(window=(3, 5)), lambda *a: local_ncc(*a, window=(3, 5))),
    ]
    for module, function in pairs:
        assert isinstance(module, SimilarityLoss)
        assert module(x, y, mask).item() == function(x, y, mask).item()
        assert module(x, y).shape == ()


# --------------------------------------------------------------------------------------------
# Non-finite inputs and empty batches (docs/conventions.rst, "Errors and non-finite values")

SIMILARITIES = [
    ("mi", lambda a, b, m=None: mutual_information(a, b, m, bins=8)),
    ("mi-gaussian", lambda a, b, m=None: mutual_information(a, b, m, bins=8, kernel="gaussian")),
    ("mi-range", lambda a, b, m=None: mutual_information(a, b, m, bins=8, moving_range=(0.0, 1.0), fixed_range=(0.0, 1.0))),
    ("mi-plain", lambda a, b, m=None: mutual_information(a, b, m, bins=8, normalized=False)),
    ("ncc", ncc),
    ("lncc", lambda a, b, m=None: local_ncc(a, b, m, window=3)),
]


@pytest.mark.parametrize("name,loss", SIMILARITIES, ids=[n for n, _ in SIMILARITIES])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["moving", "fixed", "mask", "masked-out"])
def test_similarities_propagate_non_finite_inputs(name, loss, value, where):
    # with a NaN, NCC returned a finite 0 and MutualInformation raised an index error
    gen = make_generator(21)
    x, y = torch.rand(2, 1, 9, 10, generator=gen), torch.rand(2, 1, 9, 10, generator=gen)
    mask = torch.ones(2, 1, 9, 10)
    if where == "mask":
        mask[1, 0, 4, 4] = value
    else:
        (x if where in ("moving", "masked-out") else y)[1, 0, 4, 4] = value
        if where == "masked-out":  # a zero mask weight does not hide it: the loss is a reduction over all inputs
            mask[1, 0, 4, 4] = 0.0
    assert not torch.isfinite(loss(x, y, mask))
    if where in ("moving", "fixed"):
        assert not torch.isfinite(loss(x, y))


def test_joint_histogram_of_a_non_finite_image_is_nan_only_there():
    x = torch.rand(2, 2, 8, 8, generator=make_generator(22))
    x[1, 0, 3, 3] = float("nan")
    p = joint_histogram(x, x.flip(-1), bins=6)
    assert bool(p[1, 0].isnan().all()) and bool(torch.isfinite(p[0]).all()) and bool(torch.isfinite(p[1, 1]).all())
    torch.testing.assert_close(p[0].sum((-2, -1)), torch.ones(2))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_regularizers_propagate_non_finite_fields(value):
    u = torch.rand(1, 2, 6, 6, generator=make_generator(23))
    u[0, 1, 2, 3] = value
    assert not torch.isfinite(gradient_smoothness(u)) and not torch.isfinite(bending_energy(u))


@pytest.mark.parametrize(
    "loss",
    [mutual_information, ncc, local_ncc, NCC(), LocalNCC(3), MutualInformation(bins=8), lambda a, b: box_sum(a, 3)],
)
def test_empty_batch_is_refused_not_an_index_error(loss):
    # B = 0 raised IndexError (local NCC) or a reshape RuntimeError (NCC, MI)
    x = torch.zeros(0, 1, 8, 8)
    with pytest.raises(ValueError, match=r"(moving|x): expected shape \(B, C, \*S\), got \(0, 1, 8, 8\): an empty batch \(B = 0\)"):
        loss(x, x)


def test_integer_images_are_refused_naming_the_argument():
    x = torch.rand(1, 1, 8, 8)
    for loss in (mutual_information, ncc, local_ncc):
        with pytest.raises(ValueError, match="^fixed: expected a floating-point tensor, got dtype torch.int64"):
            loss(x, (10 * x).long())
    with pytest.raises(ValueError, match="^displacement: expected a floating-point tensor, got dtype torch.int32"):
        bending_energy(torch.zeros(1, 2, 5, 5, dtype=torch.int32))
