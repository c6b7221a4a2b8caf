"""Deformation: images, labels and points traced consistently through phi and phi^-1."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_generator
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import ndimage

from plasticine.core import Deformation, warp
from plasticine.registration import scaling_and_squaring

fixtures_ok = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def smooth_velocity(gen: torch.Generator, shape: tuple[int, ...], sigma: float, amp: float) -> torch.Tensor:
    x = torch.randn(1, len(shape), *shape, generator=gen, dtype=torch.float64).numpy()
    x = ndimage.gaussian_filter(x, [0, 0] + [sigma] * len(shape))
    return torch.from_numpy(x * (amp / np.abs(x).max()))


def svf_deformation(gen: torch.Generator, shape: tuple[int, ...], sigma: float = 6.0, amp: float = 3.0) -> Deformation:
    v = smooth_velocity(gen, shape, sigma, amp)
    return Deformation(forward=scaling_and_squaring(v), inverse=scaling_and_squaring(-v), velocity=v)


def shifted(n: int, shape: tuple[int, ...], t: float, batch: int = 1) -> Deformation:
    """phi(p) = p + t e_0 (a shift along axis 0) and its exact inverse."""
    fwd = torch.zeros(batch, n, *shape, dtype=torch.float64)
    fwd[:, 0] = t
    return Deformation(forward=fwd, inverse=-fwd)


@pytest.mark.parametrize("t", [3.0, 2.4, 2.6])
def test_labels_on_a_known_shift_linear_and_nearest(t, ndim):
    """labels o phi for phi = p + t e_0 is the label map read t rows further on: at row r the label of
    row r + t, rounded for nearest, and for linear the class with the larger of the weights
    (1 - frac, frac) on rows floor(r + t) and ceil(r + t): the same rounding, reached differently."""
    shape = (24, 9) if ndim == 2 else (24, 5, 6)
    gen = make_generator(int(10 * t))
    labels = torch.randint(0, 4, (2, 1, *shape), generator=gen)
    d = shifted(ndim, shape, t)
    rows = np.clip(np.round(np.arange(shape[0]) + t).astype(int), 0, shape[0] - 1)
    expected = labels[:, :, rows]
    for method in ["linear", "nearest"]:
        out = d.labels_to_target(labels, num_classes=4, method=method)
        assert out.dtype == torch.int64 and out.shape == labels.shape
        assert torch.equal(out, expected), method
    back_rows = np.clip(np.round(np.arange(shape[0]) - t).astype(int), 0, shape[0] - 1)
    assert torch.equal(d.labels_to_source(labels, method="nearest"), labels[:, :, back_rows])


def test_linear_label_tracing_differs_from_nearest_where_it_should():
    """Linear one-hot + argmax takes the class with the most interpolation weight, nearest the closest voxel.

    Around voxel (3, 3) the labels are [[0, 1], [2, 1]]; a shift of (0.45, 0.45) reads (3.45, 3.45):
    the nearest voxel is (3, 3), class 0 (weight 0.55^2 = 0.3025), while class 1 holds
    0.55 * 0.45 + 0.45^2 = 0.45 of the weight, so linear tracing gives 1.
    """
    labels = torch.zeros(1, 1, 8, 8, dtype=torch.long)
    labels[0, 0, 3, 4], labels[0, 0, 4, 3], labels[0, 0, 4, 4] = 1, 2, 1
    fwd = torch.full((1, 2, 8, 8), 0.45, dtype=torch.float64)
    d = Deformation(forward=fwd, inverse=-fwd)
    assert d.labels_to_target(labels, num_classes=3, method="linear")[0, 0, 3, 3].item() == 1
    assert d.labels_to_target(labels, num_classes=3, method="nearest")[0, 0, 3, 3].item() == 0


@given(seed=st.integers(0, 2**31 - 1), y=st.integers(20, 43), x=st.integers(20, 43))
@fixtures_ok
def test_points_to_target_agrees_with_to_target(seed, y, x):
    """A blob at source point p appears in to_target(image) at points_to_target(p)."""
    gen = make_generator(seed)
    shape = (64, 64)
    d = svf_deformation(gen, shape)
    img = np.zeros(shape)
    img[y, x] = 1.0
    img = torch.from_numpy(ndimage.gaussian_filter(img, 2.0))[None, None]
    moved = d.to_target(img)[0, 0]
    peak = np.array(np.unravel_index(int(moved.argmax()), shape), dtype=float)
    q = d.points_to_target(torch.tensor([[[float(y), float(x)]]], dtype=torch.float64))[0, 0].numpy()
    assert np.abs(peak - q).max() <= 1.0
    # and to_source brings the blob back where it was
    back = d.to_source(d.to_target(img))[0, 0]
    assert np.unravel_index(int(back.argmax()), shape) == (y, x)


@given(seed=st.integers(0, 2**31 - 1), npts=st.integers(1, 8))
@fixtures_ok
def test_points_round_trip(seed, npts, ndim):
    gen = make_generator(seed)
    shape = (40, 44) if ndim == 2 else (20, 22, 21)
    d = svf_deformation(gen, shape, 5.0, 2.0)
    p = torch.rand(1, npts, ndim, generator=gen, dtype=torch.float64) * (torch.tensor(shape, dtype=torch.float64) - 12) + 6
    q = d.points_to_target(p)
    assert q.shape == p.shape
    torch.testing.assert_close(d.points_to_source(q), p, rtol=0, atol=0.05)
    torch.testing.assert_close(d.inverted().points_to_target(q), p, rtol=0, atol=0.05)


def test_to_dtype_inverted_and_properties():
    gen = make_generator(1)
    d = svf_deformation(gen, (12, 10), 3.0, 1.0)
    assert d.shape == (12, 10) and d.ndim == 2
    f = d.to(torch.float32)
    assert f.forward.dtype == f.inverse.dtype == f.velocity.dtype == torch.float32
    torch.testing.assert_close(f.forward.double(), d.forward, rtol=0, atol=1e-6)
    inv = d.inverted()
    assert inv.forward is d.inverse and inv.inverse is d.forward and torch.equal(inv.velocity, -d.velocity)
    assert "Deformation(shape=(12, 10)" in repr(d)
    img = torch.randn(1, 2, 12, 10, generator=gen, dtype=torch.float32)
    torch.testing.assert_close(f.to_target(img), warp(img, f.forward))
    torch.testing.assert_close(d.to_target(img), warp(img, d.forward.float()))
    torch.testing.assert_close(d.jacobian_determinant()[0, 0, 5, 5], d.jacobian_determinant()[0, 0, 5, 5])
    assert d.folding_fraction().item() == 0.0
    assert d.inverse_consistency().item() < 0.05


def test_deformation_errors():
    u = torch.zeros(1, 2, 8, 9)
    with pytest.raises(ValueError, match=r"inverse: expected shape \(B, N, \*S\), got \(1, 2, 8, 8\)"):
        Deformation(u, torch.zeros(1, 2, 8, 8))
    with pytest.raises(ValueError, match="share dtype and device"):
        Deformation(u, u.double())
    with pytest.raises(ValueError, match=r"velocity: expected shape"):
        Deformation(u, u, torch.zeros(1, 2, 8, 10))
    d = Deformation(u, u)
    with pytest.raises(ValueError, match="integer tensor"):
        d.labels_to_target(torch.zeros(1, 1, 8, 9))
    with pytest.raises(ValueError, match=r"labels: expected values in \[0, 2\)"):
        d.labels_to_target(torch.full((1, 1, 8, 9), 3), num_classes=2)
    with pytest.raises(ValueError, match=r"labels: expected batch size 2 .* got \(3, 1, 8, 9\)"):
        Deformation(torch.zeros(2, 2, 8, 9), torch.zeros(2, 2, 8, 9)).labels_to_source(torch.zeros(3, 1, 8, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="method: expected"):
        d.labels_to_target(torch.zeros(1, 1, 8, 9, dtype=torch.long), method="cubic")


def test_device(device):
    gen = make_generator(2)
    d = svf_deformation(gen, (16, 18), 3.0, 1.5)
    dd = d.to(device)
    img = torch.randn(1, 1, 16, 18, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(dd.to_target(img.to(device)).cpu(), d.to_target(img))
    labels = torch.randint(0, 3, (1, 1, 16, 18), generator=gen)
    assert torch.equal(dd.labels_to_target(labels.to(device)).cpu(), d.labels_to_target(labels))


@pytest.mark.parametrize("name", ["forward", "inverse", "velocity"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_fields_are_refused(name, value):
    # a Deformation held (and the CLI wrote) all-NaN fields
    from plasticine.core import NonFiniteError

    fields = {k: torch.zeros(2, 2, 8, 9) for k in ("forward", "inverse", "velocity")}
    fields[name][1, 0, 3, 4] = value
    with pytest.raises(NonFiniteError, match=rf"^{name}: expected finite values, found 1 NaN or infinite value\(s\) in a tensor of shape \(2, 2, 8, 9\)"):
        Deformation(**fields)
    assert issubclass(NonFiniteError, ValueError)


def test_integer_fields_empty_batches_and_overflowing_casts_are_refused():
    with pytest.raises(ValueError, match="^forward: expected a floating-point tensor, got dtype torch.int64"):
        Deformation(torch.zeros(1, 2, 8, 9, dtype=torch.long), torch.zeros(1, 2, 8, 9, dtype=torch.long))
    with pytest.raises(ValueError, match=r"^forward: .*an empty batch \(B = 0\)"):
        Deformation(torch.zeros(0, 2, 8, 9), torch.zeros(0, 2, 8, 9))
    u = torch.zeros(1, 2, 8, 9)
    u[0, 0, 2, 2] = 1e6
    with pytest.raises(ValueError, match="^forward: expected finite values"):
        Deformation(u, -u).to(torch.float16)  # 1e6 overflows float16
    d = Deformation(torch.zeros(1, 2, 8, 9), torch.zeros(1, 2, 8, 9))
    with pytest.raises(ValueError, match="^points: expected a floating-point tensor"):
        d.points_to_target(torch.zeros(1, 3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="^image: expected a floating-point tensor"):
        d.to_source(torch.zeros(1, 1, 8, 9, dtype=torch.long))
