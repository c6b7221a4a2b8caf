"""Potts solvers and the Potts structure extractor.

References: brute force over all partitions (1-D), a straightforward NumPy ADMM (2-D), closed-form
energies of simple candidates, float64 against float32, and the real BrainWeb slices.
"""

from __future__ import annotations

import importlib.util
import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy import ndimage

from plasticine.core.protocols import StructureExtractor
from plasticine.data import brainweb_slices
from plasticine.segmentation import (
    PottsExtractor,
    pixel_gamma,
    potts,
    potts_1d,
    potts_energy,
    potts_structure_map,
)
from plasticine.segmentation.potts_model import line_solver, regions
from plasticine.segmentation.metrics import dice

from conftest import make_generator

needs_numba = pytest.mark.skipif(
    importlib.util.find_spec("numba") is None,
    reason="numba is not installed (optional extra plasticine[numba]): the compiled Potts line kernel is not tested",
)

# ----------------------------------------------------------------------------------------------
# references
# ----------------------------------------------------------------------------------------------


def _partition_energy(f: np.ndarray, w: np.ndarray, gamma: float, cuts: tuple[int, ...]) -> tuple[float, np.ndarray]:
    """Energy and minimiser of one partition of a line ``f (n, C)`` (segments between the cuts)."""
    n = f.shape[0]
    bounds = (0, *cuts, n)
    u = np.zeros_like(f)
    energy = gamma * len(cuts)
    for s, t in zip(bounds[:-1], bounds[1:]):
        ws = w[s:t]
        mean = (ws[:, None] * f[s:t]).sum(0) / ws.sum() if ws.sum() > 0 else np.zeros(f.shape[1])
        u[s:t] = mean
        energy += float((ws[:, None] * (f[s:t] - mean) ** 2).sum())
    return energy, u


def _brute_force_1d(f: np.ndarray, w: np.ndarray, gamma: float) -> list[tuple[float, np.ndarray]]:
    """Every partition's energy and minimiser, sorted by energy."""
    n = f.shape[0]
    out = []
    for k in range(n):
        for cuts in itertools.combinations(range(1, n), k):
            out.append(_partition_energy(f, w, gamma, cuts))
    return sorted(out, key=lambda e: e[0])


def _energy_1d(u: np.ndarray, f: np.ndarray, w: np.ndarray, gamma: float) -> float:
    jumps = int((np.abs(np.diff(u, axis=0)).max(1) > 0).sum()) if len(u) > 1 else 0
    return gamma * jumps + float((w[:, None] * (u - f) ** 2).sum())


def _dp_1d_numpy(f: np.ndarray, w: np.ndarray, gamma: float) -> np.ndarray:
    """Textbook O(n^2) dynamic programme for one scalar line (loops, no vectorisation)."""
    n = len(f)
    best = np.full(n + 1, np.inf)
    best[0] = -gamma
    jump = np.zeros(n + 1, dtype=int)
    for r in range(1, n + 1):
        sw = sf = sff = 0.0
        for l in range(r - 1, -1, -1):
            sw += w[l]
            sf += w[l] * f[l]
            sff += w[l] * f[l] * f[l]
            dev = sff - sf * sf / sw
            if best[l] + gamma + dev < best[r]:
                best[r] = best[l] + gamma + dev
                jump[r] = l
    u = np.empty(n)
    r = n
    while r > 0:
        l = jump[r]
        u[l:r] = (w[l:r] * f[l:r]).sum() / w[l:r].sum()
        r = l
    return u


def _admm_numpy(f: np.ndarray, gamma: float, tol: float = 1e-10, max_iter: int = 100) -> np.ndarray:
    """Storath-Weinmann ADMM for the 4-neighbourhood, written out plainly (unit weights)."""
    u = f.copy()
    v = f.copy()
    lam = np.zeros_like(f)
    mu = 0.01 * gamma
    fnorm = float((f**2).sum())
    for _ in range(max_iter):
        g = (f + mu * v - lam) / (1 + mu)
        u = np.stack([_dp_1d_numpy(row, np.full(len(row), 1 + mu), 2 * gamma) for row in g])
        g = (f + mu * u + lam) / (1 + mu)
        v = np.stack([_dp_1d_numpy(col, np.full(len(col), 1 + mu), 2 * gamma) for col in g.T]).T
        lam = lam + mu * (u - v)
        mu *= 2
        if ((u - v) ** 2).sum() <= tol * fnorm:
            break
    return u


def _piecewise_image(gen: torch.Generator, shape: tuple[int, ...], levels: int, noise: float, dtype=torch.float64) -> torch.Tensor:
    """Random boxes on a background, plus Gaussian noise: ``(1, 1, *shape)``."""
    img = torch.zeros(shape, dtype=dtype)
    for _ in range(levels):
        lo = [int(torch.randint(0, max(1, s - 2), (1,), generator=gen)) for s in shape]
        hi = [int(torch.randint(a + 1, s + 1, (1,), generator=gen)) for a, s in zip(lo, shape)]
        img[tuple(slice(a, b) for a, b in zip(lo, hi))] = torch.rand((), generator=gen, dtype=dtype)
    return (img + noise * torch.randn(shape, generator=gen, dtype=dtype))[None, None]


# ----------------------------------------------------------------------------------------------
# 1-D
# ----------------------------------------------------------------------------------------------


@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 9),
    channels=st.integers(1, 2),
    weighted=st.booleans(),
    gamma=st.floats(0.0, 1.0),
)
def test_potts_1d_equals_brute_force(seed, n, channels, weighted, gamma):
    gen = make_generator(seed)
    f = torch.rand(3, n, channels, generator=gen, dtype=torch.float64)
    if weighted:
        w = torch.rand(3, n, generator=gen, dtype=torch.float64) * 2
        w[w < 0.2] = 0.0  # zero weights too
    else:
        w = torch.ones(3, n, dtype=torch.float64)
    u = potts_1d(f, gamma, w if weighted else None)
    assert u.shape == f.shape and u.dtype == f.dtype
    for i in range(3):
        fi, wi, ui = f[i].numpy(), w[i].numpy(), u[i].numpy()
        ranked = _brute_force_1d(fi, wi, gamma)
        best = ranked[0][0]
        assert _energy_1d(ui, fi, wi, gamma) == pytest.approx(best, rel=1e-10, abs=1e-12)
        unique = len(ranked) == 1 or ranked[1][0] > best + 1e-6
        if unique and wi.min() > 0:
            np.testing.assert_allclose(ui, ranked[0][1], rtol=0, atol=1e-10)


def test_potts_1d_matches_loop_dp_on_longer_signals():
    gen = make_generator(3)
    f = torch.rand(6, 40, generator=gen, dtype=torch.float64).cumsum(1).sin()
    w = torch.rand(6, 40, generator=gen, dtype=torch.float64) + 0.1
    for gamma in (0.01, 0.1, 1.0):
        u = potts_1d(f, gamma, w)
        for i in range(6):
            ref = _dp_1d_numpy(f[i].numpy(), w[i].numpy(), gamma)
            e_ours = _energy_1d(u[i].numpy()[:, None], f[i].numpy()[:, None], w[i].numpy(), gamma)
            e_ref = _energy_1d(ref[:, None], f[i].numpy()[:, None], w[i].numpy(), gamma)
            assert e_ours == pytest.approx(e_ref, rel=1e-10)


def test_potts_1d_many_lines_equal_few(monkeypatch):
    """Lines split over several CPU blocks give what each line gives alone."""
    monkeypatch.setattr(line_solver, "_CPU_BLOCK_ELEMENTS", 12 * 100)  # blocks of 100 lines
    gen = make_generator(7)
    f = torch.rand(600, 12, 2, generator=gen, dtype=torch.float64)
    w = torch.rand(600, 12, generator=gen, dtype=torch.float64) + 0.1
    u = potts_1d(f, 0.2, w)
    for i in (0, 99, 100, 599):
        torch.testing.assert_close(u[i : i + 1], potts_1d(f[i : i + 1], 0.2, w[i : i + 1]), rtol=0, atol=1e-12)


@pytest.mark.parametrize("weighted", [False, True])
def test_lines_of_different_lengths_equal_each_line_alone(monkeypatch, weighted):
    """Lines sorted by length into blocks that stop at their longest line: each equals its line alone."""
    monkeypatch.setattr(line_solver, "_CPU_BLOCK_ELEMENTS", 60)  # several blocks of a few lines
    gen = make_generator(8)
    m, n = 23, 15
    f = torch.rand(n, m, 1, generator=gen, dtype=torch.float64)
    w = torch.rand(n, m, generator=gen, dtype=torch.float64) + 0.1 if weighted else None
    lengths = torch.randint(1, n + 1, (m,), generator=gen)
    lengths[3] = n
    u = line_solver._solve_lines(f, w, 0.05, lengths, "torch")
    for k in range(m):
        ln = int(lengths[k])
        alone = potts_1d(f[:ln, k, 0][None], 0.05, None if w is None else w[:ln, k][None], backend="torch")[0]
        torch.testing.assert_close(u[:ln, k, 0], alone, rtol=0, atol=1e-12)
    if importlib.util.find_spec("numba") is not None:  # the compiled kernel, all lines in one call: the same bits
        valid = torch.arange(n)[:, None] < lengths[None]
        assert torch.equal(line_solver._solve_lines(f, w, 0.05, lengths, "numba")[valid], u[valid])


def test_potts_1d_limits_and_float32():
    gen = make_generator(5)
    steps = torch.repeat_interleave(torch.tensor([0.0, 1.0, 0.3, 0.8]), 16)
    f64 = steps[None].repeat(4, 1).double() + 0.05 * torch.randn(4, 64, generator=gen, dtype=torch.float64)
    # gamma = 0 reproduces the data; a huge gamma gives the (weighted) mean
    torch.testing.assert_close(potts_1d(f64, 0.0), f64)
    w = torch.rand(4, 64, generator=gen, dtype=torch.float64) + 0.5
    big = potts_1d(f64, 1e6, w)
    torch.testing.assert_close(big, ((w * f64).sum(1, keepdim=True) / w.sum(1, keepdim=True)).expand_as(f64))
    # the steps are found; float32 gives the same partition and values up to rounding
    u64 = potts_1d(f64, 0.5)
    u32 = potts_1d(f64.float(), 0.5)
    assert u32.dtype == torch.float32
    torch.testing.assert_close(u32.double(), u64, rtol=0, atol=1e-5)
    jumps = (u64.diff(dim=1).abs() > 0).sum(1)
    assert jumps.tolist() == [3, 3, 3, 3]


def test_potts_1d_rejects_bad_input():
    with pytest.raises(ValueError, match="M, n"):
        potts_1d(torch.zeros(2, 3, 4, 5), 1.0)
    with pytest.raises(ValueError, match="gamma"):
        potts_1d(torch.zeros(2, 3), -1.0)
    with pytest.raises(ValueError, match="weights"):
        potts_1d(torch.zeros(2, 3), 1.0, torch.ones(2, 4))
    with pytest.raises(ValueError, match="non-negative"):
        potts_1d(torch.zeros(2, 3), 1.0, -torch.ones(2, 3))
    with pytest.raises(ValueError, match="floating"):
        potts_1d(torch.zeros(2, 3, dtype=torch.long), 1.0)


# ----------------------------------------------------------------------------------------------
# energy
# ----------------------------------------------------------------------------------------------


def test_potts_energy_matches_direct_count():
    gen = make_generator(11)
    u = torch.randint(0, 3, (2, 2, 5, 6), generator=gen).double()
    f = torch.rand(2, 2, 5, 6, generator=gen, dtype=torch.float64)
    w = torch.rand(2, 1, 5, 6, generator=gen, dtype=torch.float64)
    for nb, pairs in (
        ("axes", [((0, 1), 1.0), ((1, 0), 1.0)]),
        ("diagonals", [((0, 1), math.sqrt(2) - 1), ((1, 0), math.sqrt(2) - 1), ((1, 1), 1 - math.sqrt(2) / 2), ((1, -1), 1 - math.sqrt(2) / 2)]),
    ):
        e = potts_energy(u, f, 0.7, w, neighborhood=nb)
        for b in range(2):
            x = u[b].numpy()
            expect = float((w[b].numpy() * (x - f[b].numpy()) ** 2).sum())
            for (dy, dx), om in pairs:
                for y in range(5):
                    for xx in range(6):
                        y2, x2 = y + dy, xx + dx
                        if 0 <= y2 < 5 and 0 <= x2 < 6 and np.any(x[:, y, xx] != x[:, y2, x2]):
                            expect += 0.7 * om
            assert e[b].item() == pytest.approx(expect, rel=1e-12)


# ----------------------------------------------------------------------------------------------
# images
# ----------------------------------------------------------------------------------------------


def _one_cut_energy(f: torch.Tensor, gamma: float, nb: str) -> float:
    """Energy of the easy partition 'above / below the mean', each side at its mean."""
    mask = f > f.mean()
    u = torch.where(mask, f[mask].mean(), f[~mask].mean()) if mask.any() and (~mask).any() else f.mean().expand_as(f)
    return potts_energy(u, f, gamma, neighborhood=nb).item()


@given(seed=st.integers(0, 2**31 - 1), nb=st.sampled_from(["axes", "diagonals"]), gamma=st.floats(0.02, 0.5))
def test_potts_2d_never_worse_than_simple_candidates(seed, nb, gamma):
    gen = make_generator(seed)
    f = _piecewise_image(gen, (9, 11), levels=3, noise=0.1)
    u = potts(f, gamma, neighborhood=nb)
    e = potts_energy(u, f, gamma, neighborhood=nb).item()
    e_identity = potts_energy(f, f, gamma, neighborhood=nb).item()  # every pixel its own value
    e_constant = potts_energy(f.mean().expand_as(f), f, gamma, neighborhood=nb).item()
    assert e <= min(e_identity, e_constant, _one_cut_energy(f, gamma, nb)) + 1e-9


@given(seed=st.integers(0, 2**31 - 1), gamma=st.floats(0.05, 0.5))
def test_potts_2d_matches_plain_numpy_admm(seed, gamma):
    gen = make_generator(seed)
    f = _piecewise_image(gen, (7, 8), levels=2, noise=0.05)
    u = potts(f, gamma, neighborhood="axes")
    ref = torch.from_numpy(_admm_numpy(f[0, 0].numpy(), gamma))[None, None]
    e = potts_energy(u, f, gamma).item()
    e_ref = potts_energy(ref, f, gamma, tol=1e-6).item()  # the reference's split copies agree to ~1e-6
    assert e <= e_ref * (1 + 1e-5)


def test_potts_recovers_clean_partitions_2d_and_3d(ndim):
    shape = (12, 13) if ndim == 2 else (8, 9, 10)
    f = torch.zeros(1, 1, *shape, dtype=torch.float64)
    inner = tuple(slice(2, s - 3) for s in shape)
    f[(0, 0, *inner)] = 1.0
    f[(0, 0, *(slice(0, 3) for _ in shape))] = 0.5
    u = potts(f, 0.05)
    torch.testing.assert_close(u, f)
    noisy = f + 0.05 * torch.randn(f.shape, generator=make_generator(1), dtype=torch.float64)
    u = potts(noisy, 0.1)
    assert (u.unique().numel()) == 3
    assert ((u - f).abs() < 0.05).all()


def _region_joins(u: np.ndarray, f: np.ndarray, gamma: float, nb: str) -> list[float]:
    """Energy change of joining each pair of adjacent regions of ``u`` (brute force, one image).

    Regions are the connected sets of equal value (4/6-connected for ``axes``, 8-connected for
    ``diagonals``); u, f: ``(C, *S)``.
    """
    nd = u.ndim - 1
    conn = ndimage.generate_binary_structure(nd, 1 if nb == "axes" else nd)
    keys = np.unique(u.reshape(u.shape[0], -1), axis=1)
    lab = np.zeros(u.shape[1:], dtype=int)
    count = 0
    for k in keys.T:
        sub, n = ndimage.label(np.all(u == k.reshape(-1, *([1] * nd)), axis=0), structure=conn)
        lab[sub > 0] = sub[sub > 0] + count
        count += n
    if nb == "axes":
        pairs = [(tuple(1 if i == a else 0 for i in range(nd)), 1.0) for a in range(nd)]
    else:
        pairs = [((0, 1), math.sqrt(2) - 1), ((1, 0), math.sqrt(2) - 1), ((1, 1), 1 - math.sqrt(2) / 2), ((1, -1), 1 - math.sqrt(2) / 2)]
    beta: dict[tuple[int, int], float] = {}
    for p in itertools.product(*(range(s) for s in lab.shape)):
        for off, om in pairs:
            q = tuple(a + o for a, o in zip(p, off))
            if all(0 <= a < s for a, s in zip(q, lab.shape)) and lab[p] != lab[q]:
                key = (min(lab[p], lab[q]), max(lab[p], lab[q]))
                beta[key] = beta.get(key, 0.0) + om
    out = []
    for (a, b), bw in beta.items():
        ma, mb = (lab == a).sum(), (lab == b).sum()
        mu_a, mu_b = f[:, lab == a].mean(1), f[:, lab == b].mean(1)
        out.append(ma * mb / (ma + mb) * float(((mu_a - mu_b) ** 2).sum()) - gamma * bw)
    return out


@given(seed=st.integers(0, 2**31 - 1), nb=st.sampled_from(["axes", "diagonals"]), gamma=st.floats(0.01, 0.3))
def test_potts_result_is_stable_under_region_joins(seed, nb, gamma):
    gen = make_generator(seed)
    f = _piecewise_image(gen, (9, 11), levels=4, noise=0.15)
    u = potts(f, gamma, neighborhood=nb)
    joins = _region_joins(u[0].numpy(), f[0].numpy(), gamma, nb)
    assert min(joins, default=0.0) >= -1e-9
    # joining only lowers the energy
    kept = potts(f, gamma, neighborhood=nb, merge_regions=False)
    e, e_kept = (potts_energy(x, f, gamma, neighborhood=nb).item() for x in (u, kept))
    assert e <= e_kept + 1e-9


def test_region_joins_in_3d_and_with_weights():
    gen = make_generator(21)
    f = _piecewise_image(gen, (5, 6, 7), levels=4, noise=0.2)
    u = potts(f, 0.05)
    assert min(_region_joins(u[0].numpy(), f[0].numpy(), 0.05, "axes"), default=0.0) >= -1e-9
    # a weightless half: its regions cost no data term, so each joins a neighbour
    w = torch.ones(1, 1, 5, 6, 7, dtype=torch.float64)
    w[..., :3] = 0.0
    uw = potts(f, 0.05, w)
    assert potts_energy(uw, f, 0.05, w).item() <= potts_energy(potts(f, 0.05, w, merge_regions=False), f, 0.05, w).item() + 1e-9


def test_refit_regions_joins_exactly_when_it_lowers_the_energy():
    # two 5x5 halves of a 5x10 image: 5 neighbour pairs across, joining changes the energy by
    # 25 * 25 / 50 * (mu_a - mu_b)^2 - 5 gamma
    f = torch.zeros(1, 1, 5, 10, dtype=torch.float64)
    f[..., 5:] = 0.3
    labels = torch.tensor([0] * 5 + [5] * 5).repeat(5)
    offsets, omegas = [(1, 0), (0, 1)], [1.0, 1.0]
    for gamma, joined in ((0.2, False), (0.25, True)):  # 12.5 * 0.09 = 1.125 vs 5 gamma = 1.0 / 1.25
        out = regions._refit_regions(labels, f, None, gamma, offsets, omegas, merge=True)
        assert (out.unique().numel() == 1) == joined
        expected = torch.full_like(f, 0.15) if joined else f
        torch.testing.assert_close(out, expected)
    out = regions._refit_regions(labels, f, None, 0.25, offsets, omegas, merge=False)
    torch.testing.assert_close(out, f)


def test_potts_batched_equals_single_and_float32_equals_float64():
    gen = make_generator(2)
    f = torch.cat([_piecewise_image(gen, (20, 17), levels=4, noise=0.08) for _ in range(3)])
    u = potts(f, 0.1, neighborhood="diagonals")
    for i in range(3):
        torch.testing.assert_close(potts(f[i : i + 1], 0.1, neighborhood="diagonals"), u[i : i + 1])
    u32 = potts(f.float(), 0.1, neighborhood="diagonals")
    assert u32.dtype == torch.float32
    e64 = potts_energy(u, f, 0.1, neighborhood="diagonals")
    e32 = potts_energy(u32, f, 0.1, neighborhood="diagonals")
    torch.testing.assert_close(e32, e64, rtol=1e-3, atol=0)
    assert ((u32.double() - u).abs() > 1e-4).double().mean() < 0.01


def test_potts_vector_valued_and_weights():
    gen = make_generator(4)
    base = _piecewise_image(gen, (10, 10), levels=3, noise=0.0)
    f = torch.cat([base, 1 - base], 1) + 0.03 * torch.randn(1, 2, 10, 10, generator=gen, dtype=torch.float64)
    u = potts(f, 0.1)
    assert u.shape == f.shape
    # both channels share the jumps
    jumps0 = u[:, 0].diff(dim=-1).abs() > 0
    jumps1 = u[:, 1].diff(dim=-1).abs() > 0
    assert torch.equal(jumps0, jumps1)
    # zero weight on a pixel: its value does not matter
    w = torch.ones(1, 1, 10, 10, dtype=torch.float64)
    w[..., 5, 5] = 0.0
    g = f.clone()
    g[..., 5, 5] = 100.0
    torch.testing.assert_close(potts(g, 0.1, w), potts(f, 0.1, w))


def test_potts_rejects_bad_input():
    with pytest.raises(ValueError, match="B, C"):
        potts(torch.zeros(4, 4), 1.0)
    with pytest.raises(ValueError, match="diagonals"):
        potts(torch.zeros(1, 1, 4, 4, 4), 1.0, neighborhood="diagonals")
    with pytest.raises(ValueError, match="neighborhood"):
        potts(torch.zeros(1, 1, 4, 4), 1.0, neighborhood="ring")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="gamma"):
        potts(torch.zeros(1, 1, 4, 4), 0.0)
    with pytest.raises(ValueError, match="weights"):
        potts(torch.zeros(1, 1, 4, 4), 1.0, torch.ones(1, 1, 4, 5))
    with pytest.raises(ValueError, match="mu_step"):
        potts(torch.zeros(1, 1, 4, 4), 1.0, mu_step=1.0)


def test_pixel_gamma_scales_with_side_length():
    assert pixel_gamma(0.5, (256, 256)) == pytest.approx(0.5)
    assert pixel_gamma(0.5, (128, 128)) == pytest.approx(0.25)
    assert pixel_gamma(1.0, (64, 64, 64)) == pytest.approx(0.25)
    assert pixel_gamma(1.0, (128, 512)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="shape"):
        pixel_gamma(1.0, (0, 4))


def test_structure_map_is_resolution_consistent():
    """A 2x upsampled image gives (nearly) the 2x upsampled map with the size-scaled gamma."""
    gen = make_generator(8)
    f = _piecewise_image(gen, (24, 24), levels=4, noise=0.05, dtype=torch.float32)
    big = torch.nn.functional.interpolate(f, scale_factor=2, mode="nearest")
    small_map = potts_structure_map(f, 3, 0.3)
    big_map = potts_structure_map(big, 3, 0.3)
    up = torch.nn.functional.interpolate(small_map, scale_factor=2, mode="nearest")
    assert (up.argmax(1) == big_map.argmax(1)).float().mean() > 0.97


# ----------------------------------------------------------------------------------------------
# extractor
# ----------------------------------------------------------------------------------------------


def test_potts_extractor_contract(ndim):
    ext = PottsExtractor(num_classes=3, gamma=0.3)
    assert isinstance(ext, StructureExtractor)
    shape = (10, 12) if ndim == 2 else (6, 7, 8)
    gen = make_generator(9)
    x = torch.cat([_piecewise_image(gen, shape, levels=3, noise=0.05, dtype=torch.float32) * 100 for _ in range(2)])
    out = ext(x)
    assert out.shape == (2, 3, *shape) and out.dtype == x.dtype
    assert torch.equal(out.sum(1), torch.ones_like(out[:, 0]))
    assert torch.equal(ext(x), out)  # deterministic
    # classes ordered by mean intensity
    for b in range(2):
        means = [x[b, 0][out[b, k] > 0].mean().item() for k in range(3) if out[b, k].any()]
        assert means == sorted(means)
    with pytest.raises(ValueError, match="num_classes"):
        PottsExtractor(num_classes=0)
    with pytest.raises(ValueError, match="gamma"):
        PottsExtractor(gamma=-1.0)


def _region_dice(labels: np.ndarray, mask: np.ndarray) -> float:
    """Best Dice of a connected region of one class against ``mask``."""
    best = 0.0
    for k in np.unique(labels):
        cc, _ = ndimage.label(labels == k)
        for i in np.unique(cc[mask]):
            if i > 0:
                region = cc == i
                best = max(best, 2 * (region & mask).sum() / (region.sum() + mask.sum()))
    return best


def test_structure_maps_of_real_brain_slices():
    data = brainweb_slices()
    ventricles = data["ventricles"]
    for name, gamma in (("t1", 0.2), ("pd", 0.5)):
        img = torch.tensor(data[name], dtype=torch.float32)[None, None]
        head = torch.tensor(data[name] > 40)[None, None].long()  # about 15 % of the maximum intensity
        fg = PottsExtractor(num_classes=2, gamma=gamma)(img)[:, 1:].long()
        score = dice(fg, head, 2)[0, 1].item()
        print(f"{name}: 2-class Potts map against the head threshold mask: Dice {score:.3f}")
        assert score > 0.9
    for name, classes, bound in (("t1", 3, 0.9), ("pd", 4, 0.5)):
        img = torch.tensor(data[name], dtype=torch.float32)[None, None]
        labels = potts_structure_map(img, classes, 0.05)[0].argmax(0).numpy()
        score = _region_dice(labels, ventricles)
        print(f"{name}: {classes}-class Potts map, best connected region against the ventricle mask: Dice {score:.3f}")
        assert score > bound


# ----------------------------------------------------------------------------------------------
# the compiled line kernel (numba backend) against the tensor path
# ----------------------------------------------------------------------------------------------


def _both_backends_1d(f, gamma, w=None):
    a = potts_1d(f, gamma, w, backend="torch")
    b = potts_1d(f, gamma, w, backend="numba")
    return a, b


@needs_numba
@given(
    seed=st.integers(0, 2**31 - 1),
    m=st.integers(1, 12),
    n=st.integers(1, 70),
    channels=st.integers(1, 3),
    weighted=st.booleans(),
    steps=st.booleans(),
    gamma=st.floats(1e-4, 3.0),
)
def test_numba_line_kernel_equals_torch_path(seed, m, n, channels, weighted, steps, gamma):
    """Same partitions, values and energies to the last bit on random (tie-free) problems."""
    gen = make_generator(seed)
    noise = torch.randn(m, n, channels, generator=gen, dtype=torch.float64)
    if steps:  # piecewise constant levels plus noise: long segments, where the pruning acts
        levels = torch.randint(0, 5, (m, n // 8 + 1, channels), generator=gen).double()
        f = levels.repeat_interleave(8, 1)[:, :n] + 0.05 * noise
    else:
        f = noise
    f = f[..., 0] if channels == 1 else f
    w = torch.rand(m, n, generator=gen, dtype=torch.float64) + 0.05 if weighted else None
    a, b = _both_backends_1d(f, gamma, w)
    assert torch.equal(a, b)
    ww = torch.ones(m, n, dtype=torch.float64) if w is None else w
    fc, uc = (f, b) if channels > 1 else (f[..., None], b[..., None])
    for i in range(m if n <= 8 else 0):  # short lines: the optimum of all partitions
        e = _energy_1d(uc[i].numpy(), fc[i].numpy(), ww[i].numpy(), gamma)
        best = _brute_force_1d(fc[i].numpy(), ww[i].numpy(), gamma)[0][0]
        assert e == pytest.approx(best, rel=1e-10, abs=1e-12)


@needs_numba
def test_numba_line_kernel_matches_loop_dp_and_zero_weights():
    """Longer lines against the textbook loop DP, and weightless pixels."""
    gen = make_generator(11)
    f = torch.rand(3, 50, generator=gen, dtype=torch.float64).mul(4).round().repeat_interleave(3, 1)
    f = f + 0.02 * torch.randn(f.shape, generator=gen, dtype=torch.float64)
    w = torch.rand(f.shape, generator=gen, dtype=torch.float64)
    zeros = torch.where(w < 0.1, 0.0, w)  # weightless pixels: both give the same (any value is optimal there)
    assert torch.equal(*_both_backends_1d(f, 0.2, zeros))
    w = w + 0.05
    for gamma in (0.005, 0.2, 5.0):
        a, b = _both_backends_1d(f, gamma, w)
        assert torch.equal(a, b)
        for i in range(3):
            ref = _dp_1d_numpy(f[i].numpy(), w[i].numpy(), gamma)
            e_b = _energy_1d(b[i].numpy()[:, None], f[i].numpy()[:, None], w[i].numpy(), gamma)
            e_ref = _energy_1d(ref[:, None], f[i].numpy()[:, None], w[i].numpy(), gamma)
            assert e_b == pytest.approx(e_ref, rel=1e-10)


@needs_numba
def test_numba_line_kernel_threads_give_the_same_bits(monkeypatch):
    """Lines shared out in pieces over several threads: the same result as one thread and the tensor path."""
    from plasticine.segmentation.potts_model import line_kernel

    gen = make_generator(13)
    f = torch.rand(40, 90, generator=gen, dtype=torch.float64).mul(3).round() + 0.01 * torch.rand(40, 90, generator=gen)
    w = torch.rand(40, 90, generator=gen, dtype=torch.float64) + 0.1
    ref = potts_1d(f, 0.1, w, backend="torch")
    monkeypatch.setattr(line_kernel, "_MIN_CHUNK", 1)
    monkeypatch.setattr(line_kernel, "_threads", lambda: 3)
    assert torch.equal(potts_1d(f, 0.1, w, backend="numba"), ref)
    monkeypatch.setattr(line_kernel, "_threads", lambda: 1)
    assert torch.equal(potts_1d(f, 0.1, w, backend="numba"), ref)


@needs_numba
@pytest.mark.parametrize("nb", ["axes", "diagonals"])
def test_numba_backend_on_the_real_brain_slice(nb):
    """The whole solver on the BrainWeb T1 slice (64 x 64, float64): the same image and energy."""
    x = torch.tensor(brainweb_slices()["t1"], dtype=torch.float64)[None, None] / 255.0
    x = torch.nn.functional.interpolate(x, size=(64, 64), mode="area")
    gamma = pixel_gamma(0.5, (64, 64))
    a = potts(x, gamma, neighborhood=nb, backend="torch")
    b = potts(x, gamma, neighborhood=nb, backend="numba")
    assert torch.equal(a, b)
    assert potts_energy(a, x, gamma, neighborhood=nb).item() == potts_energy(b, x, gamma, neighborhood=nb).item()
    assert b.unique().numel() > 2  # a real partition, not the constant image
    rows = x[0, 0]
    assert torch.equal(*_both_backends_1d(rows, 4 * gamma))


def test_line_backend_choice(monkeypatch):
    assert line_solver.line_backend("torch") == "torch"
    assert line_solver.line_backend("torch", "meta") == "torch"
    assert line_solver.line_backend("auto", "meta") == "torch"  # not a CPU tensor: the tensor path
    with pytest.raises(ValueError, match="backend"):
        line_solver.line_backend("cuda")
    with pytest.raises(ValueError, match="CPU tensors"):
        line_solver.line_backend("numba", "meta")
    with pytest.raises(ValueError, match="backend"):
        potts_1d(torch.zeros(1, 3), 0.1, backend="fast")
    if importlib.util.find_spec("numba") is not None:
        assert line_solver.line_backend("auto", "cpu") == "numba"
    # without numba: "auto" falls back to the tensor path, "numba" says why it cannot run
    monkeypatch.setattr(line_solver, "_NUMBA_ERROR", ["ModuleNotFoundError: No module named 'numba'"])
    assert line_solver.line_backend("auto", "cpu") == "torch"
    with pytest.raises(ValueError, match="No module named 'numba'"):
        line_solver.line_backend("numba", "cpu")
    f = torch.tensor([[0.0, 0.1, 1.0, 1.1]], dtype=torch.float64)
    torch.testing.assert_close(potts_1d(f, 0.1), potts_1d(f, 0.1, backend="torch"), rtol=0, atol=0)
