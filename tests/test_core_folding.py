"""One-sided Jacobian determinants, non-diffeomorphic volume and the folding report.

References: closed forms (affine maps, a pushed pixel worked out by hand), a per-voxel numpy loop
that builds each simplex from its mapped vertices (written apart from the vectorised code), and
the sampled flow of an analytic velocity at increasing resolution.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from conftest import make_generator
from hypothesis import given
from hypothesis import strategies as st

from plasticine.core import (
    folding_fraction,
    folding_report,
    jacobian_determinant,
    non_diffeomorphic_volume,
    one_sided_jacobian_determinants,
)
from plasticine.registration import integrate_rk4


def _stencils(n: int) -> list[list[tuple[int, ...]]]:
    """Edge offsets per stencil, in the documented order (written out independently)."""
    out = []
    for signs in itertools.product((1, -1), repeat=n):
        out.append([tuple(signs[j] if i == j else 0 for i in range(n)) for j in range(n)])
    if n == 3:
        out.append([(-1, -1, 0), (-1, 0, -1), (0, -1, -1)])
        out.append([(1, 1, 0), (0, 1, 1), (1, 0, 1)])
    return out


def reference_determinants(u: np.ndarray) -> np.ndarray:
    """(B, K, *S) simplex volume ratios by a loop over voxels: mapped vertices, np.linalg.det.

    A vertex outside the grid takes the displacement of the nearest edge voxel (the reference
    implementation's edge padding) and its own position.
    """
    b, n, *shape = u.shape
    sten = _stencils(n)
    out = np.zeros((b, len(sten), *shape))

    def phi(bi: int, q: tuple[int, ...]) -> np.ndarray:
        clamped = tuple(min(max(c, 0), s - 1) for c, s in zip(q, shape))
        return np.asarray(q, dtype=np.float64) + u[(bi, slice(None), *clamped)]

    for bi in range(b):
        for p in itertools.product(*[range(s) for s in shape]):
            for k, offs in enumerate(sten):
                mapped = np.stack([phi(bi, tuple(a + o for a, o in zip(p, off))) - phi(bi, p) for off in offs], axis=1)
                ref = np.stack([np.asarray(off, dtype=np.float64) for off in offs], axis=1)
                out[(bi, k, *p)] = np.linalg.det(mapped) / np.linalg.det(ref)
    return out


def reference_ndv(u: np.ndarray) -> np.ndarray:
    """(B,) Liu et al.'s NDV / NDA over the voxel count: -0.5 min(J, 0) / 6 (3D) or / 2 (2D), J = det of the edges."""
    r = reference_determinants(u)
    n = u.shape[1]
    # Liu et al.'s J is the determinant of the mapped edges: r for the corner simplices, 2 r for the central tetrahedra
    jac = r.copy()
    if n == 3:
        jac[:, 8:] *= 2.0
    per_voxel = (-0.5 * np.minimum(jac, 0.0) / (6.0 if n == 3 else 2.0)).sum(1)
    return per_voxel.reshape(u.shape[0], -1).mean(1)


def affine_field(a: np.ndarray, shape: tuple[int, ...], shift: float = 0.3) -> torch.Tensor:
    """(1, N, *S) displacement of p -> A p + b, float64."""
    n = len(shape)
    grid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in shape], indexing="ij"))
    m = torch.as_tensor(a, dtype=torch.float64) - torch.eye(n, dtype=torch.float64)
    return (torch.einsum("ij,j...->i...", m, grid) + shift).unsqueeze(0)


def test_pushed_pixel_by_hand():
    # pixel (1, 1) moved 1.5 along axis 0, past its neighbour at (2, 1): the forward difference
    # along axis 0 is 1 - 1.5 = -0.5, the backward one 1 + 1.5 = 2.5; axis 1 is untouched
    u = torch.zeros(1, 2, 3, 3, dtype=torch.float64)
    u[0, 0, 1, 1] = 1.5
    r = one_sided_jacobian_determinants(u)
    assert r[0, :, 1, 1].tolist() == [-0.5, -0.5, 2.5, 2.5]
    # the central difference at (1, 1) skips the voxel itself: det 1 there
    assert jacobian_determinant(u)[0, 0, 1, 1].item() == 1.0


def test_one_triangle_folds():
    # pixel (2, 2) moved by (0.6, 0.6) towards (3, 3): of the 12 triangles at it only
    # {(2,2), (3,2), (2,3)} flips, with edges (0.4, -0.6) and (-0.6, 0.4): r = 0.16 - 0.36 = -0.2
    u = torch.zeros(1, 2, 6, 6, dtype=torch.float64)
    u[0, :, 2, 2] = 0.6
    r = one_sided_jacobian_determinants(u)
    negative = (r < 0).nonzero().tolist()
    assert negative == [[0, 0, 2, 2]]
    assert r[0, 0, 2, 2].item() == pytest.approx(-0.2, abs=1e-15)
    rep = folding_report(u)
    assert rep.central.item() == 0.0  # the central difference misses it
    assert rep.one_sided.item() == 1 / 36
    # one triangle of area 1/2 inverted to 0.2 of its area, counted in one of the two splits
    assert rep.non_diffeomorphic_volume.item() == pytest.approx(0.5 * 0.5 * 0.2 / 36, rel=1e-12)


@pytest.mark.parametrize("n", [2, 3])
def test_pushed_voxel_matches_the_vertex_loop(n):
    u = torch.zeros(1, n, *([4] * n), dtype=torch.float64)
    u[(0, 0) + (1,) * n] = 1.5
    u[(0, n - 1) + (2,) * n] = -0.7
    got = one_sided_jacobian_determinants(u).numpy()
    np.testing.assert_allclose(got, reference_determinants(u.numpy()), rtol=0, atol=1e-12)
    assert non_diffeomorphic_volume(u).item() == pytest.approx(float(reference_ndv(u.numpy())[0]), rel=1e-12)


@given(seed=st.integers(0, 2**31 - 1), ndim=st.sampled_from([2, 3]), batch=st.integers(1, 2), amp=st.floats(0.1, 1.5))
def test_random_fields_match_the_vertex_loop(seed, ndim, batch, amp):
    gen = make_generator(seed)
    shape = (5, 6) if ndim == 2 else (3, 4, 3)
    u = torch.randn(batch, ndim, *shape, generator=gen, dtype=torch.float64) * amp
    got = one_sided_jacobian_determinants(u).numpy()
    ref = reference_determinants(u.numpy())
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(non_diffeomorphic_volume(u).numpy(), reference_ndv(u.numpy()), rtol=1e-10, atol=1e-13)
    rep = folding_report(u)
    np.testing.assert_array_equal(rep.one_sided.numpy(), (ref.min(1) <= 0).reshape(batch, -1).mean(1))
    np.testing.assert_array_equal(rep.central.numpy(), folding_fraction(u).numpy())


@given(seed=st.integers(0, 2**31 - 1), ndim=st.sampled_from([2, 3]))
def test_affine_map_every_stencil_is_the_determinant(seed, ndim):
    # inside the grid (no edge padding involved) every simplex of p -> A p + b has ratio det A,
    # whatever its sign: orientation-reversing maps included
    gen = make_generator(seed)
    a = torch.randn(ndim, ndim, generator=gen, dtype=torch.float64).numpy()
    shape = (6,) * ndim
    r = one_sided_jacobian_determinants(affine_field(a, shape))
    inner = r[(0, slice(None)) + (slice(1, -1),) * ndim]
    np.testing.assert_allclose(inner.numpy(), np.linalg.det(a), rtol=1e-10, atol=1e-10)


@given(seed=st.integers(0, 2**31 - 1), ndim=st.sampled_from([2, 3]), size=st.integers(2, 7))
def test_orientation_preserving_affine_never_folds(seed, ndim, size):
    # A = I + E with every entry of E below 1 / (2 N): A and all its principal minors (what the
    # edge padding leaves) are diagonally dominant with a positive diagonal, so det > 0
    gen = make_generator(seed)
    e = (torch.rand(ndim, ndim, generator=gen, dtype=torch.float64) * 2 - 1).numpy() / (2 * ndim + 0.1)
    u = affine_field(np.eye(ndim) + e, (size,) * ndim)
    rep = folding_report(u)
    assert rep.central.item() == 0.0 and rep.one_sided.item() == 0.0 and rep.non_diffeomorphic_volume.item() == 0.0


@given(seed=st.integers(0, 2**31 - 1), ndim=st.sampled_from([2, 3]), axis=st.integers(0, 2))
def test_reflection_always_folds(seed, ndim, axis):
    gen = make_generator(seed)
    e = (torch.rand(ndim, ndim, generator=gen, dtype=torch.float64) * 2 - 1).numpy() / (2 * ndim + 0.1)
    flip = np.eye(ndim)
    flip[axis % ndim, axis % ndim] = -1.0
    u = affine_field(flip @ (np.eye(ndim) + e), (5,) * ndim)
    rep = folding_report(u)
    # every interior simplex is inverted (ratio det A < 0), and so is the central Jacobian
    assert rep.central.item() == 1.0
    assert rep.one_sided.item() == 1.0
    assert rep.non_diffeomorphic_volume.item() > 0.0


def _analytic_flow(n: int) -> torch.Tensor:
    """exp(v) sampled on an n x n grid of [0, 1]^2 for a fixed smooth, rough-at-coarse-scale v.

    v(x) = a (sin(2 pi (3 x1 + 2 x0)), cos(2 pi (2 x0 - 3 x1))), a = 0.08, in units of the unit square,
    converted to voxels, integrated by RK4 (64 steps; the exact flow is a diffeomorphism).
    """
    t = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
    x0, x1 = torch.meshgrid(t, t, indexing="ij")
    a = 0.08
    v = torch.stack([torch.sin(2 * torch.pi * (3 * x1 + 2 * x0)), torch.cos(2 * torch.pi * (2 * x0 - 3 * x1))]) * a * (n - 1)
    return integrate_rk4(v.unsqueeze(0), steps=64)


def test_sampled_flow_of_a_rough_velocity():
    coarse, fine = folding_report(_analytic_flow(24)), folding_report(_analytic_flow(96))
    print(f"\n24 x 24: {coarse}\n96 x 96: {fine}")
    # coarsely sampled (max |dv| about 1.8 per voxel), the interpolant of the diffeomorphic flow is not
    # invertible: simplices invert, and the central difference, which skips the voxel itself, misses them
    assert coarse.non_diffeomorphic_volume.item() > 0.0
    assert coarse.one_sided.item() > coarse.central.item()
    # sampled finely, every simplex keeps its orientation: the interpolant is a homeomorphism
    r = one_sided_jacobian_determinants(_analytic_flow(96))
    assert r.min().item() > 0.0
    assert fine.one_sided.item() == 0.0 and fine.non_diffeomorphic_volume.item() == 0.0


def test_bad_input():
    with pytest.raises(ValueError, match="displacement"):
        one_sided_jacobian_determinants(torch.zeros(1, 1, 5))
    with pytest.raises(ValueError, match="displacement"):
        folding_report(torch.zeros(1, 2, 4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="mask"):
        non_diffeomorphic_volume(torch.zeros(1, 2, 4, 4), mask=torch.ones(1, 1, 3, 4))


def test_mask_and_non_finite():
    u = torch.zeros(1, 2, 6, 6, dtype=torch.float64)
    u[0, :, 2, 2] = 0.6
    mask = torch.zeros(1, 1, 6, 6, dtype=torch.bool)
    mask[..., :3, :3] = True
    rep = folding_report(u, mask)
    assert rep.one_sided.item() == 1 / 9
    assert rep.non_diffeomorphic_volume.item() == pytest.approx(0.05 / 9, rel=1e-12)
    u[0, 1, 4, 4] = float("nan")
    rep = folding_report(u)
    assert all(torch.isnan(x).all() for x in rep)
