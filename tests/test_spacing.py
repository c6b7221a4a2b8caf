"""Voxel spacing: regularisers in mm, the Jacobian, the iterative backend, the recipe and the CLI.

References written here, independently of the library code: closed forms of linear and quadratic
fields, the continuous energy of an analytic field integrated with ``numpy.trapezoid`` on a fine
grid, ``numpy.diff`` finite differences, and nibabel's ``voxel_sizes``.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import make_generator
from plasticine.core import accepts_keyword, jacobian_determinant
from plasticine.core.jacobian import jacobian_matrix
from plasticine.core.shapes import spacing_tuple
from plasticine.core.filters import gaussian_smooth
from plasticine.core.warp import warp
from plasticine.losses import NCC, BendingEnergy, GradientSmoothness, bending_energy, gradient_smoothness
from plasticine.registration import IterativeRegistration, ScalingAndSquaring
from plasticine.registration.optimizers import Adam

SEEDS = st.integers(0, 2**31 - 1)
SPACING = st.floats(0.3, 4.0)


def grid_mm(shape, h):
    """Voxel-centre coordinates in mm, one ``(*S)`` array per axis (voxel p at p * h)."""
    return np.meshgrid(*[np.arange(s) * hi for s, hi in zip(shape, h)], indexing="ij")


def to_voxels(u_mm, h):
    """A ``(N, *S)`` displacement in mm as a ``(1, N, *S)`` float64 tensor in voxels: u_i / h_i."""
    n = len(h)
    return torch.from_numpy(np.stack(u_mm) / np.asarray(h).reshape(n, *([1] * n)))[None]


def numpy_smoothness_mm(u_mm, h):
    """sum_j mean_{i,p} (diff_j u^mm_i / h_j)^2, straight from the definition in mm."""
    u = np.stack(u_mm)
    return sum(np.mean((np.diff(u, axis=1 + j) / h[j]) ** 2) for j in range(len(h)))


# --------------------------------------------------------------------------------------------
# Closed forms on anisotropic grids


@pytest.mark.parametrize("shape,h", [((9, 7), (0.8, 2.5)), ((5, 6, 7), (3.0, 1.0, 0.6))])
def test_linear_field_closed_form_in_mm(shape, h):
    # u^mm = M x^mm: the gradient energy is ||M||_F^2 / N whatever the spacing, the bending 0
    n = len(h)
    M = np.random.default_rng(0).normal(size=(n, n))
    x = grid_mm(shape, h)
    u_mm = [sum(M[i, j] * x[j] for j in range(n)) for i in range(n)]
    u = to_voxels(u_mm, h)
    assert gradient_smoothness(u, h).item() == pytest.approx((M**2).sum() / n, rel=1e-12)
    assert gradient_smoothness(u, h).item() == pytest.approx(numpy_smoothness_mm(u_mm, h), rel=1e-12)
    assert bending_energy(u, h).item() == pytest.approx(0.0, abs=1e-20)
    # in voxels the same field has the gradient (h_j / h_i) M_ij: a different, wrong-unit value
    vox = sum((M[i, j] * h[j] / h[i]) ** 2 for i in range(n) for j in range(n)) / n
    assert gradient_smoothness(u).item() == pytest.approx(vox, rel=1e-12)
    assert abs(vox - (M**2).sum() / n) > 0.1


@pytest.mark.parametrize("h", [(0.7, 2.0), (2.0, 1.0, 0.5)])
def test_quadratic_field_bending_closed_form_in_mm(h):
    # u^mm_0 = a (x^mm_last)^2 / 2: d2/dx2 = a exactly, so the bending energy is a^2 / N
    n, a = len(h), 0.3
    x = grid_mm((6,) * n, h)
    u_mm = [0.5 * a * x[-1] ** 2] + [np.zeros_like(x[0])] * (n - 1)
    assert bending_energy(to_voxels(u_mm, h), h).item() == pytest.approx(a**2 / n, rel=1e-12)
    # u^mm_1 = a x^mm_0 x^mm_1: only the mixed term (a), counted twice
    u_mm = [np.zeros_like(x[0]), a * x[0] * x[1]] + [np.zeros_like(x[0])] * (n - 2)
    assert bending_energy(to_voxels(u_mm, h), h).item() == pytest.approx(2 * a**2 / n, rel=1e-12)


# --------------------------------------------------------------------------------------------
# The same physical field on an anisotropic and an isotropic grid


def analytic_field(ndim):
    """u^mm and its exact gradient d u_i / d x_j (functions of mm coordinates) on [0, L]^N."""
    k = (2 * math.pi / 60.0, 2 * math.pi / 45.0, 2 * math.pi / 50.0)[:ndim]

    def u(x):
        return [0.8 * np.sin(k[-1] * x[-1] + i) * np.cos(k[0] * x[0] + 0.5 * i) for i in range(ndim)]

    def grad(x):
        out = []
        for i in range(ndim):
            row = [np.zeros_like(x[0]) for _ in range(ndim)]
            s, c = np.sin(k[-1] * x[-1] + i), np.cos(k[0] * x[0] + 0.5 * i)
            row[-1] = row[-1] + 0.8 * k[-1] * np.cos(k[-1] * x[-1] + i) * c
            row[0] = row[0] - 0.8 * k[0] * s * np.sin(k[0] * x[0] + 0.5 * i)
            out.append(row)
        return out

    return u, grad


@pytest.mark.parametrize("ndim", [2, 3])
def test_regulariser_of_resampled_field_matches_anisotropic(ndim):
    # Extent L = 36 mm per axis; anisotropic voxels (1, 3) / (3, 1, 1.5) mm and isotropic 1 mm.
    L = 36.0
    aniso = (1.0, 3.0) if ndim == 2 else (3.0, 1.0, 1.5)
    iso = (1.0,) * ndim
    u, grad = analytic_field(ndim)
    # continuous reference (1 / N) mean_Omega ||grad u||_F^2, trapezoid rule on a 0.25 mm grid
    fine = np.linspace(0, L, 145)
    xf = np.meshgrid(*[fine] * ndim, indexing="ij")
    density = sum(g**2 for row in grad(xf) for g in row) / ndim
    for _ in range(ndim):
        density = np.trapezoid(density, fine, axis=0)
    continuous = density / L**ndim
    values = {}
    for h in (aniso, iso):
        shape = tuple(int(round(L / hi)) + 1 for hi in h)
        field = to_voxels(u(grid_mm(shape, h)), h)
        values[h] = gradient_smoothness(field, h).item()
        assert values[h] == pytest.approx(numpy_smoothness_mm(u(grid_mm(shape, h)), h), rel=1e-12)
    # The discrete value is a mean over grid points of forward differences: O(h^2) in the
    # difference, O(h / L) from the end slices the mean counts in full (a plain mean, not the
    # trapezoid rule). Bound: h_max / (2 L) of the continuous energy, 4.2 % here (measured:
    # 1.6 % in 2D, 0.7 % in 3D for the anisotropic grid, under 0.2 % for the isotropic one).
    bound = max(aniso) / (2 * L)
    assert abs(values[aniso] - continuous) <= bound * continuous
    assert abs(values[iso] - continuous) <= bound * continuous
    assert abs(values[aniso] - values[iso]) <= bound * continuous
    # without the spacing the anisotropic grid gives a value far off (the unit is wrong)
    shape = tuple(int(round(L / hi)) + 1 for hi in aniso)
    assert abs(gradient_smoothness(to_voxels(u(grid_mm(shape, aniso)), aniso)).item() - continuous) > 3 * bound * continuous


# --------------------------------------------------------------------------------------------
# Invariances and gradients


@given(seed=SEEDS, s=st.floats(0.25, 4.0), h=st.lists(SPACING, min_size=2, max_size=3))
def test_scaling_all_spacings(seed, s, h):
    n = len(h)
    u = torch.randn((1, n) + (5,) * n, generator=make_generator(seed), dtype=torch.float64)
    hs = tuple(s * x for x in h)
    # a displacement in voxels: the gradient energy is dimensionless, the bending energy 1/mm^2
    assert gradient_smoothness(u, hs).item() == pytest.approx(gradient_smoothness(u, h).item(), rel=1e-9)
    assert bending_energy(u, hs).item() == pytest.approx(s**-2 * bending_energy(u, h).item(), rel=1e-9)
    # a fixed field in mm on voxels s times larger (u_vox = u_mm / (s h)): the diffusion term
    # scales by s^-2, the bending term by s^-4
    u_mm = u * torch.tensor(h, dtype=torch.float64).view(1, n, *([1] * n))
    u_s = u_mm / torch.tensor(hs, dtype=torch.float64).view(1, n, *([1] * n))
    assert gradient_smoothness(u_s, hs).item() == pytest.approx(s**-2 * gradient_smoothness(u, h).item(), rel=1e-9)
    assert bending_energy(u_s, hs).item() == pytest.approx(s**-4 * bending_energy(u, h).item(), rel=1e-9)


@given(seed=SEEDS, h=st.lists(SPACING, min_size=2, max_size=3))
def test_jacobian_determinant_does_not_depend_on_spacing(seed, h):
    # det(I + H G H^-1) = det(I + G): the determinant of a voxel displacement needs no spacing
    n = len(h)
    u = 0.3 * torch.randn((1, n) + (5,) * n, generator=make_generator(seed), dtype=torch.float64)
    det_h = torch.linalg.det(jacobian_matrix(u, h))
    torch.testing.assert_close(det_h, jacobian_determinant(u)[:, 0], rtol=0, atol=1e-10)
    torch.testing.assert_close(torch.linalg.det(jacobian_matrix(u)), det_h, rtol=0, atol=1e-10)


def test_gradcheck_with_spacing_at_the_call(ndim):
    h = (0.6, 2.0, 1.3)[:ndim]
    u = torch.randn((1, ndim) + (4,) * ndim, generator=make_generator(3), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: GradientSmoothness()(a, spacing=h), (u,))
    assert torch.autograd.gradcheck(lambda a: BendingEnergy()(a, spacing=h), (u,))
    assert torch.autograd.gradcheck(lambda a: jacobian_matrix(a, h), (u,))
    # the call's spacing replaces the stored one
    assert GradientSmoothness(spacing=(9.0,) * ndim)(u, spacing=h).item() == gradient_smoothness(u, h).item()


def test_default_spacing_gives_the_voxel_values():
    u = torch.randn(2, 3, 4, 5, 6, generator=make_generator(4), dtype=torch.float64)
    for f, module in ((gradient_smoothness, GradientSmoothness), (bending_energy, BendingEnergy)):
        ref = f(u).item()
        assert f(u, None).item() == ref and f(u, 1.0).item() == ref and f(u, (1.0, 1.0, 1.0)).item() == ref
        assert module()(u).item() == ref and module(None)(u).item() == ref


@pytest.mark.parametrize(
    "bad", [0.0, -1.0, float("nan"), float("inf"), True, "1.0", (1.0, 2.0), (1.0, 0.0, 1.0), (1.0, float("nan"), 1.0), (True, 1.0, 1.0), object()]
)
def test_bad_spacing_is_refused(bad):
    u = torch.zeros(1, 3, 4, 4, 4)
    message = r"spacing: expected None, one positive finite number or 3 of them \(one per spatial axis\), got"
    for call in (gradient_smoothness, bending_energy, jacobian_matrix, lambda a, s: GradientSmoothness()(a, spacing=s)):
        with pytest.raises(ValueError, match=message):
            call(u, bad)
    x = torch.rand(1, 1, 8, 8, 8)
    with pytest.raises(ValueError, match=r"^spacing: expected"):  # at construction, or (2 sizes) at the 3D register
        IterativeRegistration(weight=1.0, levels=(1,), iterations=(1,), spacing=bad).register(x, x)
    with pytest.raises(ValueError, match="spacing"):
        spacing_tuple(bad, 3)


def test_constructor_refuses_bad_spacing():
    for bad in (0.0, (1.0, -2.0), "2", True):
        with pytest.raises(ValueError, match="spacing"):
            GradientSmoothness(bad)
        with pytest.raises(ValueError, match="spacing"):
            BendingEnergy(bad)


# --------------------------------------------------------------------------------------------
# Iterative registration


def anisotropic_case(seed, shape, h):
    """An image, its warp by a known SVF field smooth in mm, and the true forward displacement."""
    n = len(h)
    g = make_generator(seed)
    img = gaussian_smooth(torch.rand((1, 1) + shape, generator=g, dtype=torch.float64), tuple(2.0 / x for x in h))
    img = (img - img.min()) / (img.max() - img.min())
    v_mm = gaussian_smooth(torch.randn((1, n) + shape, generator=g, dtype=torch.float64), tuple(8.0 / x for x in h))
    v_mm = v_mm / v_mm.abs().amax() * 2.5  # at most 2.5 mm
    v = v_mm / torch.tensor(h, dtype=torch.float64).view(1, n, *([1] * n))
    u = ScalingAndSquaring(steps=6)(v)
    return img, warp(img, u), u


def endpoint_error_mm(forward, truth, h):
    n = len(h)
    diff = (forward - truth) * torch.tensor(h, dtype=truth.dtype).view(1, n, *([1] * n))
    return diff.norm(dim=1).mean().item()


def backend(weight, spacing=None):
    return IterativeRegistration(NCC(), levels=(2, 1), iterations=(60, 40), smoothing=0.5, weight=weight, optimizer=Adam(lr=0.05), spacing=spacing)


@pytest.mark.parametrize("shape,h,weights", [((48, 16), (1.0, 3.0), (0.3, 1.0)), ((8, 24, 24), (3.0, 1.0, 1.0), (1.0,))], ids=["2d", "3d"])
def test_iterative_registration_with_spacing_has_lower_endpoint_error(shape, h, weights):
    # measured EPE (mm), start 0.62 / 0.81: 2D voxels 0.292, 0.310 vs mm 0.259, 0.265; 3D 0.336 vs 0.263
    img, tgt, truth = anisotropic_case(0, shape, h)
    start = endpoint_error_mm(torch.zeros_like(truth), truth, h)
    for weight in weights:
        voxels = endpoint_error_mm(backend(weight).register(img, tgt).forward, truth, h)
        mm = endpoint_error_mm(backend(weight, h).register(img, tgt).forward, truth, h)
        assert mm < 0.95 * voxels < start


def test_iterative_registration_default_and_zero_weight_unchanged():
    img, tgt, _ = anisotropic_case(1, (24, 12), (1.0, 2.0))
    settings = dict(levels=(2, 1), iterations=(10, 5), smoothing=0.5, optimizer=Adam(lr=0.05))
    reg = IterativeRegistration(NCC(), weight=1.0, **settings)
    a, b = reg.register(img, tgt), IterativeRegistration(NCC(), weight=1.0, spacing=None, **settings).register(img, tgt)
    assert torch.equal(a.forward, b.forward) and torch.equal(a.inverse, b.inverse)
    assert not torch.equal(reg.with_spacing((1.0, 2.0)).register(img, tgt).forward, a.forward)
    # with weight 0 (the default) the spacing only reaches the (unused) regulariser
    free = IterativeRegistration(NCC(), **settings)
    torch.testing.assert_close(free.with_spacing((1.0, 2.0)).register(img, tgt).forward, free.register(img, tgt).forward, rtol=0, atol=0)


def test_with_spacing_keeps_everything_else():
    similarity = NCC()
    reg = IterativeRegistration(similarity, weight=0.5, levels=(2, 1), iterations=(3, 2))
    other = reg.with_spacing(np.array([1.0, 2.5]))
    assert other.settings.spacing == (1.0, 2.5) and other.similarity is similarity
    assert dataclasses.replace(other.settings, spacing=None) == reg.settings
    assert other.with_spacing(None).settings == reg.settings
    with pytest.raises(ValueError, match=r"spacing: expected None or 2 or 3 positive finite voxel sizes"):
        reg.with_spacing(2.0)
    x = torch.rand(1, 1, 8, 8, 8)
    with pytest.raises(ValueError, match=r"spacing: expected 3 voxel sizes \(one per spatial axis of the images\), got \(1.0, 2.5\)"):
        other.register(x, x)


def test_iterative_registration_level_spacing_reaches_the_regulariser():
    seen = []

    def spy(v, spacing=None):
        seen.append((tuple(v.shape[2:]), spacing))
        return gradient_smoothness(v, spacing)

    x = torch.rand(1, 1, 17, 9, dtype=torch.float64)
    IterativeRegistration(NCC(), spy, levels=(4, 2, 1), iterations=(1, 1, 1), weight=1.0, optimizer=Adam(lr=0.01), spacing=(1.0, 2.0)).register(x, x)
    levels = {shape: h for shape, h in seen}
    # corner-aligned resampling: a level of S_l voxels spans (S - 1) h, so h_l = h (S - 1) / (S_l - 1)
    for shape, h in levels.items():
        assert h == pytest.approx((1.0 * 16 / (shape[0] - 1), 2.0 * 8 / (shape[1] - 1)), rel=1e-12)
    assert levels[(17, 9)] == pytest.approx((1.0, 2.0))


def test_spacing_with_a_regulariser_that_takes_none_is_refused():
    x = torch.rand(1, 1, 8, 8)
    reg = IterativeRegistration(NCC(), lambda v: v.square().mean(), weight=1.0, levels=(1,), iterations=(1,))
    reg.register(x, x)  # fine without a spacing
    with pytest.raises(ValueError, match="spacing: the regularizer .* takes no spacing keyword"):
        reg.with_spacing((1.0, 2.0))


# --------------------------------------------------------------------------------------------
# The affine's spacing, the translator and the recipe


def test_voxel_spacing_matches_nibabel():
    nib = pytest.importorskip("nibabel")
    from plasticine.io import voxel_spacing

    rng = np.random.default_rng(5)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    a = np.eye(4)
    a[:3, :3] = q @ np.diag([1.2, -0.7, 3.0])
    a[:3, 3] = rng.normal(size=3)
    assert voxel_spacing(a, 3) == pytest.approx(tuple(nib.affines.voxel_sizes(a)), rel=1e-12)
    assert voxel_spacing(torch.from_numpy(a), 2) == pytest.approx(tuple(nib.affines.voxel_sizes(a))[:2], rel=1e-12)
    with pytest.raises(ValueError, match="ndim: expected 2 or 3"):
        voxel_spacing(a, 4)
    with pytest.raises(ValueError, match="affine: expected"):
        voxel_spacing(np.eye(3), 3)


def test_cli_translate_hands_each_input_its_spacing(tmp_path, monkeypatch):
    nib = pytest.importorskip("nibabel")
    from plasticine.checkpoint import save_component
    from plasticine.cli import main
    from plasticine.recipes import build_translator
    from plasticine.translator import TraceableTranslator

    reg = IterativeRegistration(NCC(), levels=(1,), iterations=(1,), weight=1.0)
    translator = build_translator(2, 1, sampler_steps=1, seed=0).replace(registration=reg)
    save_component(translator, tmp_path / "m.pt")
    (tmp_path / "in").mkdir()
    image = np.random.default_rng(0).random((16, 12)).astype(np.float32)
    nib.save(nib.Nifti1Image(image, np.diag([-0.5, 2.0, 3.0, 1.0])), tmp_path / "in" / "a.nii.gz")
    nib.save(nib.Nifti1Image(image, np.diag([1.5, 1.0, 1.0, 1.0])), tmp_path / "in" / "b.nii.gz")
    seen = []

    def translate(self, x, **kwargs):  # the iterative backend needs a target: record and stop
        seen.append(self.registration.settings.spacing)
        raise ValueError("recorded")

    monkeypatch.setattr(TraceableTranslator, "translate", translate)
    for name in ("a", "b"):
        assert main(["--threads", "1", "translate", "--model", str(tmp_path / "m.pt"), "--input", str(tmp_path / "in" / f"{name}.nii.gz"), "--output", str(tmp_path / "out")]) != 0
    assert seen == [pytest.approx((0.5, 2.0)), pytest.approx((1.5, 1.0))]


def test_training_recipe_spacing_is_checked():
    from plasticine.recipes import TrainingRecipe

    assert TrainingRecipe(spacing=[1.0, 2.0]).spacing == (1.0, 2.0)
    for bad in ((1.0,), (1.0, 0.0), 2.0, (1.0, float("inf"), 1.0)):
        with pytest.raises(ValueError, match="TrainingRecipe.spacing"):
            TrainingRecipe(spacing=bad)


def test_cli_takes_the_shared_spacing_of_the_images(tmp_path, capsys):
    nib = pytest.importorskip("nibabel")
    from plasticine.cli import _shared_spacing
    from plasticine.io import ImageFolder

    x = np.random.default_rng(0).random((6, 5, 4)).astype(np.float32)
    for name, zooms in (("a", (1.0, 1.0, 1.0)), ("b", (0.5, 2.0, 1.5)), ("c", (0.5, 2.0, 1.5)), ("d", (0.5, 2.0, 3.0))):
        (tmp_path / name).mkdir()
        nib.save(nib.Nifti1Image(x, np.diag([-zooms[0], zooms[1], zooms[2], 1.0])), tmp_path / name / "v.nii.gz")
    folder = {name: ImageFolder(tmp_path / name) for name in "abcd"}
    assert _shared_spacing([folder["b"], folder["c"]], 3) == pytest.approx((0.5, 2.0, 1.5))
    assert _shared_spacing([folder["a"]], 3) is None  # unit voxels: voxel units, as before
    assert _shared_spacing([folder["b"], folder["d"]], 3) is None
    assert "voxel spacing (0.5, 2.0, 1.5) mm" in capsys.readouterr().err
    # a slice keeps the spacing of its two axes
    sliced = ImageFolder(tmp_path / "b", axis=0)
    assert _shared_spacing([sliced], 2) == pytest.approx((2.0, 1.5))


def test_accepts_keyword():
    def positional_only(u, spacing, /):
        return u

    assert accepts_keyword(lambda u, spacing=None: u, "spacing")
    assert accepts_keyword(lambda u, **options: u, "spacing")
    assert not accepts_keyword(lambda u: u, "spacing")
    assert not accepts_keyword(positional_only, "spacing")
    assert accepts_keyword(GradientSmoothness(), "spacing")  # a module: its forward
    assert not accepts_keyword(torch.nn.Identity(), "spacing")
    assert not accepts_keyword(max, "spacing")  # a builtin without a readable signature


def test_training_recipe_regularises_in_mm():
    from plasticine.recipes import TrainingRecipe, build_translator, train_translator

    x = torch.rand(2, 1, 16, 12, generator=make_generator(0))
    y = 1 - torch.rand(2, 1, 16, 12, generator=make_generator(1))
    runs = {}
    for spacing in (None, (1.0, 1.0), (1.0, 3.0)):
        t = build_translator(2, 1, classes=3, sampler_steps=2, seed=0)
        losses = train_translator(t, x, y, TrainingRecipe(diffusion_steps=1, registration_steps=2, batch_size=2, progress="none", spacing=spacing))
        runs[spacing] = (t.registration.state_dict(), losses["registration"]["smoothness"])
    plain, unit, aniso = runs[None], runs[(1.0, 1.0)], runs[(1.0, 3.0)]
    assert all(torch.equal(plain[0][k], unit[0][k]) for k in plain[0]) and plain[1] == unit[1]  # a unit spacing is voxel units
    assert aniso[1] != plain[1] and any(not torch.equal(plain[0][k], aniso[0][k]) for k in plain[0])
    with pytest.raises(ValueError, match=r"recipe.spacing: expected 2 voxel sizes"):
        train_translator(build_translator(2, 1, classes=3, sampler_steps=2), x, y, TrainingRecipe(diffusion_steps=1, registration_steps=1, batch_size=2, progress="none", spacing=(1.0, 1.0, 2.0)))
