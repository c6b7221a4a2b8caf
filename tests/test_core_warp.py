"""warp, compose, sample_at_points and GridSampleWarper against scipy, closed forms and gradcheck."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_generator
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import ndimage

from plasticine.core import GridSampleWarper, Warper, compose, displacement_to_grid, sample_at_points, warp
from plasticine.core.warp import _grid_sample

# warp's padding -> the scipy.ndimage.map_coordinates mode that equals it (checked below):
# grid_sample's "zeros" blends towards 0 within one voxel of the edge, which is scipy's
# "grid-constant" (scipy's "constant" does not interpolate outside [0, S - 1]).
SCIPY_MODE = {"border": "nearest", "zeros": "grid-constant", "reflection": "mirror"}

# the device/dtype/ndim fixtures are plain values, safe to share across hypothesis inputs
fixtures_ok = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
sizes2 = st.tuples(st.integers(3, 23), st.integers(3, 23))
sizes3 = st.tuples(st.integers(3, 11), st.integers(3, 11), st.integers(3, 11))


def smooth(gen: torch.Generator, shape: tuple[int, ...], sigma: float, amp: float, dtype=torch.float64) -> torch.Tensor:
    """Random field ``(B, C, *S)`` from ``gen``, Gaussian-smoothed (scipy) and scaled to max |.| = amp."""
    x = torch.randn(shape, generator=gen, dtype=torch.float64).numpy()
    x = ndimage.gaussian_filter(x, [0, 0] + [sigma] * (len(shape) - 2), mode="nearest")
    x = x * (amp / max(np.abs(x).max(), 1e-12))
    return torch.from_numpy(x).to(dtype)


def identity_tolerance(image: torch.Tensor) -> float:
    """Error bound of an identity warp.

    grid_sample normalises voxel coordinates to [-1, 1] and back, which moves each sample by up
    to about ``max(S) * eps`` voxels (``eps = 2^-23`` in float32, ``2^-52`` in float64); the value
    then moves by that times the largest difference between neighbouring voxels. Measured: at
    most 0.81 of ``max(S) * eps * max|neighbour difference|`` (sizes up to 512, 2D and 3D).
    """
    eps = torch.finfo(image.dtype).eps
    n = image.dim() - 2
    step = max(image.diff(dim=d).abs().max().item() for d in range(2, 2 + n) if image.shape[d] > 1)
    return 2.0 * max(image.shape[2:]) * eps * step + 4 * eps * image.abs().max().item()


@fixtures_ok
@given(seed=st.integers(0, 2**31 - 1), s2=sizes2, s3=sizes3, batch=st.integers(1, 3), data=st.data())
def test_identity_warp_returns_input(seed, s2, s3, batch, data, ndim, dtype, device):
    gen = make_generator(seed)
    shape = s2 if ndim == 2 else s3
    mode = data.draw(st.sampled_from(["linear", "nearest"] + (["cubic"] if ndim == 2 else [])))
    padding = data.draw(st.sampled_from(["border", "zeros", "reflection"]))
    image = torch.randn(batch, 2, *shape, generator=gen, dtype=dtype).to(device)
    u = torch.zeros(batch, ndim, *shape, dtype=dtype, device=device)
    out = warp(image, u, mode, padding)
    assert out.shape == image.shape and out.dtype == dtype
    if mode == "nearest":
        assert torch.equal(out, image)
    else:
        assert (out - image).abs().max().item() <= identity_tolerance(image.cpu())


def _scipy_warp(image: np.ndarray, u: np.ndarray, order: int, padding: str) -> np.ndarray:
    grid = np.indices(image.shape[1:], dtype=np.float64) + u
    return np.stack([ndimage.map_coordinates(c, grid, order=order, mode=SCIPY_MODE[padding], cval=0.0) for c in image])


@fixtures_ok
@given(seed=st.integers(0, 2**31 - 1), s2=sizes2, s3=sizes3, batch=st.integers(1, 2), data=st.data())
def test_warp_matches_scipy_map_coordinates(seed, s2, s3, batch, data, ndim, dtype):
    gen = make_generator(seed)
    shape = s2 if ndim == 2 else s3
    mode = data.draw(st.sampled_from(["linear", "nearest"]))
    padding = data.draw(st.sampled_from(["border", "zeros", "reflection"]))
    amp = data.draw(st.floats(0.1, 4.0))
    image = torch.randn(batch, 2, *shape, generator=gen, dtype=torch.float64)
    u = smooth(gen, (batch, ndim, *shape), 2.0, amp)
    out = warp(image.to(dtype), u.to(dtype), mode, padding).double().numpy()
    # the reference sees exactly the values warp sees (rounded to dtype)
    image_d, u_d = image.to(dtype).double().numpy(), u.to(dtype).double().numpy()
    eps = torch.finfo(dtype).eps
    for b in range(batch):
        ref = _scipy_warp(image_d[b], u_d[b], 1 if mode == "linear" else 0, padding)
        if mode == "linear":
            # coordinates move by up to ~ max(S) * eps voxels in the normalisation (see identity_tolerance)
            step = max(np.abs(np.diff(image_d[b], axis=d)).max() for d in range(1, 1 + ndim))
            tol = 4 * (max(shape) + amp) * eps * step + 8 * eps * np.abs(image_d[b]).max()
            np.testing.assert_allclose(out[b], ref, rtol=0, atol=tol)
        else:
            # away from rounding ties (where a coordinate's fraction is 1/2) the voxel is unambiguous
            frac = (np.indices(shape) + u_d[b]) % 1.0
            safe = (np.abs(frac - 0.5) > 1e3 * max(shape) * eps).all(axis=0)
            np.testing.assert_array_equal(out[b][:, safe], ref[:, safe])


def _keys_cubic_reference(image: np.ndarray, u: np.ndarray, padding: str) -> np.ndarray:
    """Keys cubic convolution (a = -0.75) with border (clamped taps) or zeros (taps outside are 0)."""

    def w(t):
        a, t = -0.75, np.abs(t)
        return np.where(t <= 1, ((a + 2) * t - (a + 3)) * t * t + 1, np.where(t < 2, a * (((t - 5) * t + 8) * t - 4), 0.0))

    h, wd = image.shape
    pos = np.indices((h, wd), dtype=np.float64) + u
    y0, x0 = np.floor(pos[0]).astype(int), np.floor(pos[1]).astype(int)
    out = np.zeros((h, wd))
    for dy in range(-1, 3):
        for dx in range(-1, 3):
            yi, xi = y0 + dy, x0 + dx
            weight = w(pos[0] - yi) * w(pos[1] - xi)
            inside = (yi >= 0) & (yi < h) & (xi >= 0) & (xi < wd)
            val = image[np.clip(yi, 0, h - 1), np.clip(xi, 0, wd - 1)]
            out += weight * (val if padding == "border" else np.where(inside, val, 0.0))
    return out


@given(seed=st.integers(0, 2**31 - 1), shape=sizes2, padding=st.sampled_from(["border", "zeros"]))
def test_cubic_warp_is_keys_cubic_convolution(seed, shape, padding):
    gen = make_generator(seed)
    image = torch.randn(1, 1, *shape, generator=gen, dtype=torch.float64)
    u = smooth(gen, (1, 2, *shape), 2.0, 3.0)
    out = warp(image, u, "cubic", padding)[0, 0].numpy()
    ref = _keys_cubic_reference(image[0, 0].numpy(), u[0].numpy(), padding)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-10)


def test_shift_direction_and_broadcast_field(device):
    img = torch.zeros(3, 1, 20, 17, device=device, dtype=torch.float64)
    img[:, 0, 10, 7] = 1.0
    u = torch.zeros(1, 2, 20, 17, device=device, dtype=torch.float64)
    u[:, 0] = 3.0  # pull from p + 3 along axis 0: content moves by -3
    out = warp(img, u)
    assert out.shape == img.shape
    assert (out[:, 0, 7, 7] == 1.0).all() and out.sum().item() == 3.0


def _interp_error_scale(x: np.ndarray, ndim: int) -> float:
    """Sum over axes of the largest second difference |x[i+1] - 2 x[i] + x[i-1]| (any channel)."""
    x = np.asarray(x)
    axes = range(x.ndim - ndim, x.ndim)
    return float(sum(np.abs(np.diff(x, 2, axis=a)).max() for a in axes))


@fixtures_ok
@given(seed=st.integers(0, 2**31 - 1), s2=sizes2, s3=sizes3, amp=st.floats(0.2, 2.0))
def test_compose_agrees_with_warping_twice(seed, s2, s3, amp, ndim):
    """warp(warp(I, a), b) = warp(I, compose(a, b)) up to linear-interpolation error, inside.

    Linear interpolation of f errs by at most 1/8 of the sum over axes of max |d^2 f / dx_j^2|.
    Warping twice interpolates I, then I o phi_a; composing interpolates a (an error scaled by
    |grad I|) and I. The tolerance is that bound, with second derivatives taken as second
    differences of the sampled arrays, doubled for their own error.
    """
    gen = make_generator(seed)
    shape = tuple(s + 12 for s in (s2 if ndim == 2 else s3))
    image = smooth(gen, (1, 1, *shape), 3.0, 1.0)
    a, b = smooth(gen, (1, ndim, *shape), 4.0, amp), smooth(gen, (1, ndim, *shape), 4.0, amp)
    twice = warp(warp(image, a), b)
    once = warp(image, compose(a, b))
    m = 5  # a, b <= 2 voxels: inside this margin no sample leaves the grid
    inner = (0, 0) + tuple(slice(m, s - m) for s in shape)
    grad_i = max(np.abs(np.diff(image.numpy(), axis=d)).max() for d in range(2, 2 + ndim))
    d2 = lambda x: _interp_error_scale(x.numpy()[0], ndim)  # noqa: E731
    tol = 0.25 * (2 * d2(image) + d2(warp(image, a)) + grad_i * d2(a)) + 1e-12
    assert (twice - once)[inner].abs().max().item() <= tol


@fixtures_ok
@given(seed=st.integers(0, 2**31 - 1), s2=sizes2, s3=sizes3, batch=st.integers(1, 2))
def test_compose_closed_form_translations_and_affine(seed, s2, s3, batch, ndim, dtype):
    gen = make_generator(seed)
    shape = s2 if ndim == 2 else s3
    view = (batch, ndim, *([1] * ndim))
    # translations: phi_a o phi_b = p + t_b + t_a, everywhere (border padding extends constants)
    ta = torch.rand(batch, ndim, generator=gen, dtype=torch.float64) * 6 - 3
    tb = torch.rand(batch, ndim, generator=gen, dtype=torch.float64) * 6 - 3
    ua, ub = ta.view(view).expand(batch, ndim, *shape), tb.view(view).expand(batch, ndim, *shape)
    out = compose(ua.to(dtype), ub.to(dtype))
    tol = 10 * max(shape) * torch.finfo(dtype).eps
    torch.testing.assert_close(out.double(), (ua + ub), rtol=0, atol=tol)
    # affine maps x -> M x + t are reproduced exactly by linear interpolation where phi_b stays inside
    eye = torch.eye(ndim, dtype=torch.float64)
    ma = eye + 0.1 * (torch.rand(batch, ndim, ndim, generator=gen, dtype=torch.float64) - 0.5)
    mb = eye + 0.1 * (torch.rand(batch, ndim, ndim, generator=gen, dtype=torch.float64) - 0.5)
    p = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in shape], indexing="ij"))
    c = torch.tensor(shape, dtype=torch.float64).view(ndim, *([1] * ndim)) / 2 - 0.5
    affine = lambda m, t: torch.einsum("bij,j...->bi...", m - eye, p - c) + 0.5 * t.view(view)  # noqa: E731
    ua, ub = affine(ma, ta), affine(mb, tb)
    phib = p + ub
    inside = torch.ones(batch, *shape, dtype=torch.bool)
    for i, s in enumerate(shape):
        inside &= (phib[:, i] >= 0) & (phib[:, i] <= s - 1)
    expected = ub + torch.einsum("bij,bj...->bi...", ma - eye, phib - c) + 0.5 * ta.view(view)
    out = compose(ua.to(dtype), ub.to(dtype)).double()
    err = (out - expected).abs().amax(1)[inside]
    assert err.numel() > 0 and err.max().item() <= tol


@fixtures_ok
@given(seed=st.integers(0, 2**31 - 1), s2=sizes2, s3=sizes3, npts=st.integers(1, 9))
def test_sample_at_points_matches_scipy(seed, s2, s3, npts, ndim, dtype):
    gen = make_generator(seed)
    shape = s2 if ndim == 2 else s3
    field = torch.randn(2, 3, *shape, generator=gen, dtype=torch.float64)
    pts = torch.rand(2, npts, ndim, generator=gen, dtype=torch.float64) * (torch.tensor(shape) + 2) - 1
    out = sample_at_points(field.to(dtype), pts.to(dtype)).double()
    assert out.shape == (2, npts, 3)
    f, q = field.to(dtype).double().numpy(), pts.to(dtype).double().numpy()
    for b in range(2):
        ref = np.stack([ndimage.map_coordinates(f[b, c], q[b].T, order=1, mode="nearest") for c in range(3)], axis=-1)
        np.testing.assert_allclose(out[b].numpy(), ref, rtol=0, atol=20 * max(shape) * torch.finfo(dtype).eps * np.abs(f).max())


def test_split_sampling_equals_single_batch(monkeypatch):
    """A single large image is sampled in pieces across threads; values and gradients are unchanged."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    batches = []
    original = torch.nn.functional.grid_sample

    def recording(input, grid, **kwargs):
        batches.append(grid.shape[0])
        return original(input, grid, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "grid_sample", recording)
    try:
        gen = make_generator(7)
        for shape in [(260, 129), (65, 40, 17)]:  # an odd first axis exercises the padded split
            n = len(shape)
            image = torch.randn(1, 2, *shape, generator=gen, dtype=torch.float64, requires_grad=True)
            u = smooth(gen, (1, n, *shape), 2.0, 3.0).requires_grad_()
            out = warp(image, u)
            twin_image = image.detach().expand(2, *image.shape[1:]).clone().requires_grad_()
            ref = warp(twin_image, u.detach().expand(2, *u.shape[1:]))  # batch of 2: no split
            assert torch.equal(out[0], ref[0])
            w = torch.randn(out.shape, generator=gen, dtype=torch.float64)
            gi, gu = torch.autograd.grad((out * w).sum(), (image, u))
            u2 = u.detach().expand(2, *u.shape[1:]).clone().requires_grad_()
            gi2, gu2 = torch.autograd.grad((warp(twin_image, u2) * w).sum(), (twin_image, u2))
            torch.testing.assert_close(gi[0], gi2[0], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(gu[0], gu2[0], rtol=1e-12, atol=1e-12)
            # the single image really went through in two pieces, the twin batch in one call of 2
            grid = displacement_to_grid(u.detach())
            ref = torch.nn.functional.grid_sample(image.detach(), grid.contiguous(), align_corners=True, padding_mode="border")
            batches.clear()
            assert torch.equal(_grid_sample(image.detach(), grid, "bilinear", "border"), ref)
            assert batches == [2]
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("ndim_", [2, 3])
def test_gradcheck_warp_linear(ndim_):
    gen = make_generator(3)
    shape = (5, 6) if ndim_ == 2 else (4, 5, 3)
    image = torch.randn(2, 2, *shape, generator=gen, dtype=torch.float64, requires_grad=True)
    u = (smooth(gen, (2, ndim_, *shape), 1.5, 1.3) + 0.05).requires_grad_()  # off the integer kinks
    fast = ndim_ == 3  # 3D: projected (fast-mode) check, the full Jacobian takes ~15 s per padding
    for padding in ["border", "zeros", "reflection"]:
        assert torch.autograd.gradcheck(lambda i, d: warp(i, d, "linear", padding), (image, u), fast_mode=fast)


def test_gradgradcheck_warp_displacement():
    # the voxel -> grid conversion is one autograd node whose backward is differentiable again
    gen = make_generator(5)
    image = torch.randn(1, 1, 5, 6, generator=gen, dtype=torch.float64)
    u = (smooth(gen, (1, 2, 5, 6), 1.5, 1.3) + 0.05).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda d: warp(image, d), (u,))
    w = torch.randn(1, 2, 5, 6, generator=gen, dtype=torch.float64)
    (g,) = torch.autograd.grad((displacement_to_grid(u) * w.movedim(1, -1)).sum(), u, create_graph=True)
    # d/du of sum(grid * w): channel i of u feeds grid channel N - 1 - i with scale 2 / (S_i - 1)
    expected = torch.stack([w[:, 1] * 2 / 4, w[:, 0] * 2 / 5], 1)
    assert torch.allclose(g, expected)


def test_gradcheck_warp_cubic_2d():
    gen = make_generator(4)
    image = torch.randn(1, 2, 6, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    u = (smooth(gen, (1, 2, 6, 7), 1.5, 1.2) + 0.05).requires_grad_()
    assert torch.autograd.gradcheck(lambda i, d: warp(i, d, "cubic"), (image, u))


def test_gradcheck_compose_and_sample_at_points(ndim):
    gen = make_generator(5)
    shape = (5, 6) if ndim == 2 else (4, 5, 3)
    a = (smooth(gen, (1, ndim, *shape), 1.5, 1.1) + 0.05).requires_grad_()
    b = (smooth(gen, (1, ndim, *shape), 1.5, 1.1) + 0.05).requires_grad_()
    assert torch.autograd.gradcheck(compose, (a, b), fast_mode=ndim == 3)
    pts = (torch.rand(1, 4, ndim, generator=gen, dtype=torch.float64) * 3 + 0.3).requires_grad_()
    assert torch.autograd.gradcheck(lambda f, p: sample_at_points(f, p), (a, pts), fast_mode=ndim == 3)


def test_nearest_warns_when_displacement_requires_grad():
    image = torch.randn(1, 1, 6, 7)
    u = torch.zeros(1, 2, 6, 7, requires_grad=True)
    with pytest.warns(UserWarning, match="zero gradient"):
        warp(image, u, mode="nearest")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warp(image, u, mode="linear")
        warp(image, u.detach(), mode="nearest")
        with torch.no_grad():
            warp(image, u, mode="nearest")


def test_shape_and_option_errors_name_expected_and_actual():
    image, u = torch.zeros(2, 1, 8, 9), torch.zeros(2, 2, 8, 9)
    with pytest.raises(ValueError, match=r"image: expected shape \(B, C, \*S\), got \(8, 9\)"):
        warp(torch.zeros(8, 9), u)
    with pytest.raises(ValueError, match=r"displacement: expected shape \(B, N, \*S\), got \(2, 2, 8, 10\)"):
        warp(image, torch.zeros(2, 2, 8, 10))
    with pytest.raises(ValueError, match=r"displacement: expected shape \(B, N, \*S\), got \(2, 3, 8, 9\)"):
        warp(image, torch.zeros(2, 3, 8, 9))
    with pytest.raises(ValueError, match=r"displacement: expected batch size 2 \(the image batch size\) or 1, got 3: image \(2, 1, 8, 9\), displacement \(3, 2, 8, 9\)"):
        warp(image, torch.zeros(3, 2, 8, 9))
    with pytest.raises(ValueError, match=r"displacement: expected the image's dtype torch.float32, got torch.float64"):
        warp(image, u.double())
    with pytest.raises(ValueError, match=r"mode: expected one of .*'bilinear'"):
        warp(image, u, mode="bilinear")
    with pytest.raises(ValueError, match=r"padding: expected one of .*'edge'"):
        warp(image, u, padding="edge")
    with pytest.raises(ValueError, match="2D images only"):
        warp(torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 3, 4, 4, 4), mode="cubic")
    with pytest.raises(ValueError, match=r"u_b: expected shape \(B, N, \*S\), got \(2, 2, 8, 8\)"):
        compose(u, torch.zeros(2, 2, 8, 8))
    with pytest.raises(ValueError, match=r"points: expected shape \(B, P, N\), got \(2, 5, 3\)"):
        sample_at_points(image, torch.zeros(2, 5, 3))
    with pytest.raises(ValueError, match=r"padding: expected one of"):
        GridSampleWarper(padding="wrap")


def test_grid_sample_warper_is_a_warper_and_equals_warp():
    gen = make_generator(1)
    image = torch.randn(2, 3, 9, 8, generator=gen)
    u = smooth(gen, (2, 2, 9, 8), 2.0, 2.0, torch.float32)
    warper = GridSampleWarper("nearest", "reflection")
    assert isinstance(warper, Warper)
    assert torch.equal(warper(image, u), warp(image, u, "nearest", "reflection"))
    assert "reflection" in repr(warper)


def test_device_matches_cpu(device, ndim):
    gen = make_generator(2)
    shape = (9, 11) if ndim == 2 else (5, 7, 6)
    image = torch.randn(2, 2, *shape, generator=gen, dtype=torch.float64)
    u = smooth(gen, (2, ndim, *shape), 2.0, 2.0)
    ref = warp(image, u)
    out = warp(image.to(device), u.to(device))
    assert out.device.type == device.type
    torch.testing.assert_close(out.cpu(), ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(compose(u.to(device), u.to(device)).cpu(), compose(u, u), rtol=0, atol=1e-10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host synchronisation is only observable on CUDA")
def test_no_host_synchronisation_on_cuda():
    """warp, compose, sampling, the Jacobian and fixed-step integrators only queue kernels."""
    from plasticine.core import jacobian_determinant
    from plasticine.registration import integrate_euler, integrate_rk4, scaling_and_squaring

    dev = torch.device("cuda")
    image = torch.randn(1, 2, 33, 40, device=dev)
    u = torch.randn(1, 2, 33, 40, device=dev)
    pts = torch.rand(1, 5, 2, device=dev) * 30
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        warp(image, u)
        compose(u, u)
        sample_at_points(image, pts)
        jacobian_determinant(u)
        scaling_and_squaring(u, 7)
        integrate_euler(u, 4)
        integrate_rk4(u, 2)
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("mode,padding", [("linear", "border"), ("linear", "zeros"), ("nearest", "reflection"), ("cubic", "border")])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_displacement_gives_non_finite_output_there(mode, padding, value):
    # grid_sample reads a NaN position as an edge position, so warp returned a
    # finite value where the displacement was NaN
    image = torch.rand(2, 3, 9, 8, generator=make_generator(5))
    u = torch.zeros(2, 2, 9, 8)
    u[1, 0, 4, 2] = value
    out = warp(image, u, mode, padding)
    expected = torch.zeros_like(out, dtype=torch.bool)
    expected[1, :, 4, 2] = True
    assert torch.equal(~torch.isfinite(out), expected)
    torch.testing.assert_close(out[0], image[0])  # finite values are unchanged
    one = warp(image, u[1:])  # one field for the whole batch
    assert bool((~torch.isfinite(one[:, :, 4, 2])).all()) and int((~torch.isfinite(one)).sum()) == 6


def test_non_finite_points_and_fields_propagate():
    field = torch.rand(1, 2, 6, 7, generator=make_generator(6))
    points = torch.tensor([[[1.0, 2.0], [float("nan"), 3.0], [2.0, float("inf")]]])
    out = sample_at_points(field, points)
    assert bool(torch.isfinite(out[0, 0]).all()) and not bool(torch.isfinite(out[0, 1:]).any())
    u_a = torch.zeros(1, 2, 6, 7)
    u_a[0, 1, 3, 3] = float("nan")
    assert bool(compose(u_a, torch.zeros(1, 2, 6, 7))[0, 1, 3, 3].isnan())
    assert bool(compose(torch.zeros(1, 2, 6, 7), u_a)[0, :, 3, 3].isnan().all())


def test_empty_batches_and_integer_inputs_are_refused():
    # B = 0 raised IndexError in warp, compose and sample_at_points
    e, u = torch.zeros(0, 1, 8, 9), torch.zeros(0, 2, 8, 9)
    with pytest.raises(ValueError, match=r"image: expected shape \(B, C, \*S\), got \(0, 1, 8, 9\): an empty batch \(B = 0\)"):
        warp(e, u)
    with pytest.raises(ValueError, match=r"u_a: .*an empty batch \(B = 0\)"):
        compose(u, u)
    with pytest.raises(ValueError, match=r"field: .*an empty batch \(B = 0\)"):
        sample_at_points(e, torch.zeros(0, 3, 2))
    with pytest.raises(ValueError, match=r"image: expected shape \(B, C, \*S\), got \(1, 1, 0, 9\): S=\(0, 9\) has no voxels"):
        warp(torch.zeros(1, 1, 0, 9), torch.zeros(1, 2, 0, 9))
    with pytest.raises(ValueError, match="^image: expected a floating-point tensor, got dtype torch.int64"):
        warp(torch.zeros(1, 1, 8, 9, dtype=torch.long), torch.zeros(1, 2, 8, 9))
    with pytest.raises(ValueError, match="^u_b: expected a floating-point tensor, got dtype torch.int64"):
        compose(torch.zeros(1, 2, 8, 9), torch.zeros(1, 2, 8, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="^points: expected a floating-point tensor, got dtype torch.int64"):
        sample_at_points(torch.zeros(1, 1, 8, 9), torch.zeros(1, 3, 2, dtype=torch.long))
    assert sample_at_points(torch.zeros(1, 1, 8, 9), torch.zeros(1, 0, 2)).shape == (1, 0, 1)  # no points: trivially empty


def test_batch_size_error_names_both_batch_sizes():
    # an image batch of 1 and a field batch of 2 said "expected batch size 1 or 1"
    with pytest.raises(ValueError, match=r"^displacement: expected batch size 1 \(the image batch size\), got 2: image \(1, 1, 8, 9\), displacement \(2, 2, 8, 9\)$"):
        warp(torch.zeros(1, 1, 8, 9), torch.zeros(2, 2, 8, 9))
