"""Overlapping patches stitched with blending weights (plasticine.core.patches and its two wrappers)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from plasticine.core.jacobian import jacobian_determinant
from plasticine.core.patches import patch_grid, patch_window, random_patches, sliding_window
from plasticine.diffusion import PatchwiseDenoiser
from plasticine.registration import LearnedRegistration, PatchwiseRegistration, RegistrationNet, RegistrationNetConfig, ScalingAndSquaring
from plasticine.registration.network import RegistrationOutput


@st.composite
def layouts(draw, ndim=None, min_overlap=0):
    """An image size and a valid (patch, overlap, margin) per axis."""
    n = draw(st.sampled_from([1, 2, 3])) if ndim is None else ndim
    shape, patch, overlap, margin = [], [], [], []
    for _ in range(n):
        p = draw(st.integers(max(2, 2 * min_overlap), 9))
        s = draw(st.integers(p, 23))
        o = draw(st.integers(min_overlap, p // 2))
        m = draw(st.integers(0, max(0, (o - 1) // 2)))
        shape.append(s), patch.append(p), overlap.append(o), margin.append(m)
    return tuple(shape), tuple(patch), tuple(overlap), tuple(margin)


def _conv(x, kernel):
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[x.dim() - 2]
    return conv(x, kernel, padding=kernel.shape[-1] // 2)


@given(layout=layouts(), seed=st.integers(0, 2**31 - 1))
def test_a_local_operator_stitched_equals_the_whole_image_result(layout, seed):
    """Radius <= margin: every weighted voxel saw all it depends on, so the blend is the whole result."""
    shape, patch, overlap, margin = layout
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, *shape, generator=g, dtype=torch.float64)
    radius = min(margin)
    kernel = torch.randn(4, 3, *([2 * radius + 1] * len(shape)), generator=g, dtype=torch.float64)
    whole = _conv(x, kernel)
    stitched = sliding_window(lambda t: _conv(t, kernel), [x], patch, overlap=overlap, margin=margin)
    torch.testing.assert_close(stitched, whole, rtol=0, atol=1e-12)
    # a pointwise affine map (radius 0) with two inputs, one of them None
    both = sliding_window(lambda a, none, b: 2 * a - b[:, :1] + 1, [x, None, x.flip(1)], patch, overlap=overlap, margin=margin)
    torch.testing.assert_close(both, 2 * x - x.flip(1)[:, :1] + 1, rtol=0, atol=1e-12)


def test_a_wider_operator_differs_only_near_the_cuts():
    """The check above can fail: radius 2 with margin 0 differs from the whole result, near the cuts only."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, 30, generator=g, dtype=torch.float64)
    kernel = torch.randn(1, 1, 5, generator=g, dtype=torch.float64)
    stitched = sliding_window(lambda t: _conv(t, kernel), [x], 12, overlap=4, margin=0)
    bad = ((stitched - _conv(x, kernel)).abs() > 1e-12)[0, 0].nonzero().flatten().tolist()
    (starts,) = patch_grid((30,), 12, 4, 0)[0]
    cuts = [a for a in starts if a > 0] + [a + 12 for a in starts if a + 12 < 30]
    assert bad and all(any(-2 <= i - c < 2 for c in cuts) for i in bad), (bad, cuts)


@given(layout=layouts(min_overlap=1))
def test_neighbouring_weights_are_a_partition_of_unity_where_the_overlap_is_regular(layout):
    shape, patch, overlap, margin = layout
    grid, p, o, m = patch_grid(shape, patch, overlap, margin)
    total = torch.zeros(shape, dtype=torch.float64)
    for corner in itertools.product(*grid):
        lower = [a > 0 for a in corner]
        upper = [a + pi < s for a, pi, s in zip(corner, p, shape)]
        w = patch_window(p, o, m, lower, upper, dtype=torch.float64)
        assert float(w.min()) >= 0 and float(w.max()) <= 1
        total[tuple(slice(a, a + pi) for a, pi in zip(corner, p))] += w
    assert float(total.min()) > 0  # every voxel is covered by a weighted patch
    regular = all(all(b - a == pi - oi for a, b in zip(s, s[1:])) for s, pi, oi in zip(grid, p, o))
    if regular:
        torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=1e-12)


@given(layout=layouts(min_overlap=2), seed=st.integers(0, 2**31 - 1))
def test_patch_dependent_results_are_blended_without_a_seam(layout, seed):
    """Each patch adds its own constant (the worst case of disagreeing patches): no jump survives.

    The blend moves by at most spread * pi / (2 r) per voxel along an axis with ramp r = o - 2m;
    hard tiles (overlap 0) jump by the full difference of two patches.
    """
    shape, patch, overlap, margin = layout
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(1, 1, *shape, dtype=torch.float64)
    offsets = iter(torch.rand(10_000, generator=g, dtype=torch.float64).tolist())
    out = sliding_window(lambda t: t + next(offsets), [x], patch, overlap=overlap, margin=margin)
    spread = float(out.max() - out.min())
    for i, (o, m) in enumerate(zip(overlap, margin)):
        step = out.diff(dim=2 + i).abs()
        assert float(step.max()) <= spread * math.pi / (2 * (o - 2 * m)) * 1.5 + 1e-12
    offsets = iter(torch.tensor([0.0, 1.0] * 5000, dtype=torch.float64).tolist())
    tiles = sliding_window(lambda t: t + next(offsets), [torch.zeros(1, 1, 16, dtype=torch.float64)], 8, overlap=0)
    assert float(tiles.diff(dim=2).abs().max()) == 1.0


def test_random_patches_cut_aligned_windows_reproducibly():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(5, 2, 9, 11, 7, generator=g)
    maps = images[:, :1] * 3.0
    a = random_patches(images, (4, 5, 7), torch.Generator().manual_seed(1), (maps,))
    b = random_patches(images, (4, 5, 7), torch.Generator().manual_seed(1), (maps,))
    assert a[0].shape == (5, 2, 4, 5, 7) and a[1].shape == (5, 1, 4, 5, 7)
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    torch.testing.assert_close(a[1], a[0][:, :1] * 3.0, rtol=0, atol=0)  # the same corner in both
    for k in range(5):  # each patch is a window of its own image
        found = [(i, j) for i in range(6) for j in range(7) if torch.equal(images[k, :, i : i + 4, j : j + 5], a[0][k])]
        assert found, k
    corners = {tuple(random_patches(images[:1], 4, torch.Generator().manual_seed(s))[0].flatten()[:3].tolist()) for s in range(20)}
    assert len(corners) > 3  # the corner is drawn, not fixed


def test_bad_patch_settings_name_the_argument():
    x = torch.zeros(1, 1, 16, 16, 16)
    cases = [
        (dict(patch=0), "patch: expected sizes in [1, 16]"),
        (dict(patch=17), "patch: expected sizes in [1, 16]"),
        (dict(patch=(8, 8)), "patch: expected one integer or 3 integers"),
        (dict(patch=8, overlap=5), "overlap: expected values in [0, patch/2]"),
        (dict(patch=8, overlap=4, margin=2), "margin: expected values >= 0 with 2 * margin < overlap"),
        (dict(patch=8, overlap=0, margin=1), "margin:"),
    ]
    for kw, needle in cases:
        with pytest.raises(ValueError, match=None) as err:
            sliding_window(lambda t: t, [x], kw.pop("patch"), **kw)
        assert needle in str(err.value), (needle, str(err.value))
    with pytest.raises(ValueError, match=r"inputs\[1\]: expected batch 1 and spatial size \(16, 16, 16\)"):
        sliding_window(lambda a, b: a, [x, torch.zeros(1, 1, 16, 16, 15)], 8)
    with pytest.raises(ValueError, match=r"fn: expected a \(1, C', \*\(8, 8, 8\)\) result"):
        sliding_window(lambda t: t[..., :4], [x], 8)
    with pytest.raises(ValueError, match=r"patch: expected sizes in \[1, 9\] along axis 0"):
        random_patches(torch.zeros(2, 1, 9, 9), 10)


class _ConvDenoiser(torch.nn.Module):
    """A local denoiser (radius 1): eps = conv(noisy) * gamma + conv(condition)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Conv3d(1, 1, 3, padding=1).double(), torch.nn.Conv3d(2, 1, 3, padding=1).double()

    def forward(self, noisy, gamma, condition):
        return self.a(noisy) * gamma.view(-1, 1, 1, 1, 1) + self.b(condition)


def test_patchwise_denoiser_of_a_local_denoiser_is_the_denoiser():
    g = torch.Generator().manual_seed(2)
    den = _ConvDenoiser()
    y, c = torch.randn(2, 1, 14, 12, 10, generator=g, dtype=torch.float64), torch.randn(2, 2, 14, 12, 10, generator=g, dtype=torch.float64)
    gamma = torch.tensor([0.3, 0.9], dtype=torch.float64)
    calls = []
    wrapped = PatchwiseDenoiser(den, 8, overlap=4, margin=1, progress=lambda done, total: calls.append((done, total)))
    with torch.no_grad():
        torch.testing.assert_close(wrapped(y, gamma, c), den(y, gamma, c), rtol=0, atol=1e-12)
    assert wrapped.patches((14, 12, 10)) == 12 and calls[-1] == (12, 12) and len(calls) == 12  # starts (0, 4, 6) x (0, 4) x (0, 2)


class _PatchConstantNet(torch.nn.Module):
    """A 'network' whose velocity is a constant that depends on the patch it sees (disagreeing patches)."""

    def forward(self, x, y=None, cue=None):
        v = (x.mean(dim=(1, 2, 3, 4), keepdim=True) * torch.tensor([1.5, -1.0, 0.5], dtype=x.dtype).view(1, 3, 1, 1, 1)).expand(-1, -1, *x.shape[2:])
        return RegistrationOutput(v, -v, None, v)


def test_patchwise_registration_stitches_the_velocity_smoothly_and_integrates_once():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(1, 1, 20, 18, 16, generator=g, dtype=torch.float64) * torch.linspace(0, 4, 20, dtype=torch.float64).view(1, 1, -1, 1, 1)
    backend = LearnedRegistration(_PatchConstantNet(), ScalingAndSquaring(7))
    smooth = PatchwiseRegistration(backend, 10, overlap=5, margin=0).register(x)
    hard = PatchwiseRegistration(backend, 10, overlap=0).register(x)
    # the velocity is stitched, phi its exponential: phi^-1 = exp(-v) exactly as for one field
    torch.testing.assert_close(smooth.forward, ScalingAndSquaring(7)(smooth.velocity))
    torch.testing.assert_close(smooth.inverse, ScalingAndSquaring(7)(-smooth.velocity))
    spread = float(hard.velocity.amax() - hard.velocity.amin())
    jump = lambda d: max(float(d.velocity.diff(dim=k).abs().max()) for k in (2, 3, 4))  # noqa: E731
    assert jump(hard) > 0.3 * spread  # hard tiles: a seam of the size of the patches' disagreement
    assert jump(smooth) <= spread * math.pi / (2 * 5) * 1.5
    assert float(jacobian_determinant(smooth.forward).min()) > 0  # no fold at the patch borders
    # one patch covering the image is the backend itself
    net = RegistrationNet(RegistrationNetConfig(spatial_dims=3, image_channels=1, cue_channels=0, features=4, encoder=(4, 4), align_channels=4, align_layers=1)).double().eval()
    real = LearnedRegistration(net)
    with torch.no_grad():
        whole, one = real.register(x), PatchwiseRegistration(real, (20, 18, 16)).register(x)
    torch.testing.assert_close(one.forward, whole.forward, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="backend: expected downsample=1"):
        PatchwiseRegistration(LearnedRegistration(net, downsample=2), 8)
