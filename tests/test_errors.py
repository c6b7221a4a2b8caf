"""The rule of docs/conventions.rst, "Errors and non-finite values", for every public name.

Every name in ``__all__`` of plasticine.core, plasticine.losses, plasticine.registration.integrators
and plasticine.translator has a case here (or sits in ``NOT_CALLABLE`` with the reason), so a new
public function without a case fails ``test_every_public_name_has_a_case``. Each case is checked for

(a) a wrong shape: a ``ValueError`` naming the argument, raised before any computation;
(b) an empty batch (B = 0): refused with a ``ValueError`` naming the argument;
(c) an integer tensor where floats are expected: a ``ValueError`` naming the argument;
(d) a NaN in: a non-finite result (computations), or a ``NonFiniteError`` naming the argument
    (boundaries: ``Deformation``, ``check_finite``, the translator's inputs).

A check that does not apply to a name says why in its case (``na``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
import torch

import plasticine.core as core
import plasticine.losses as losses
import plasticine.registration.integrators as integrators
import plasticine.translator as translator
from plasticine.core import NonFiniteError

S = (6, 7)  # spatial size of every test tensor (2D; the checks do not depend on N)

PACKAGES = {"core": core, "losses": losses, "integrators": integrators, "translator": translator}

NOT_CALLABLE = {
    **{f"core.{p}": "a typing.Protocol (contract tests in the component suites)" for p in (
        "ConditionEncoder", "Denoiser", "Integrator", "NoiseSchedule", "RegistrationBackend", "Sampler",
        "SimilarityLoss", "StructureExtractor", "Warper")},
    "core.NonFiniteError": "the exception class the boundaries raise",
    "core.FoldingReport": "a NamedTuple of folding_report's results",
    **{f"core.{n}": "configuration of components, no tensors (tests in test_core_config.py)" for n in (
        "Config", "ConfigError", "Configurable", "from_json", "register_settings", "registered_classes", "to_json")},
    "translator.COMPONENTS": "a tuple of names",
    "core.accepts_keyword": "inspects a callable's signature: no tensors, raises nothing (tests in test_spacing.py)",
}

CHECKS = ("shape", "empty", "integer", "nan")


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def image(b: int, seed: int = 0) -> torch.Tensor:
    return rand(b, 1, *S, seed=seed)


def field_(b: int) -> torch.Tensor:
    """A zero displacement/velocity: a NaN put into any input stays where interpolation reads it."""
    return torch.zeros(b, 2, *S)


def all_points(b: int) -> torch.Tensor:
    """Every voxel centre as a point, so a NaN anywhere in a sampled field is read."""
    return core.identity_grid(S).flatten(1).T.unsqueeze(0).expand(b, -1, -1).contiguous()


@dataclass
class Case:
    """How to call one public name on valid inputs of batch size ``b``, and which checks apply.

    ``call(**inputs(b))`` must succeed. ``shape`` is the argument given a wrong shape (default: the
    first input); every floating input is tried as an integer tensor and with a NaN. ``boundary``:
    a NaN raises ``NonFiniteError`` instead of propagating. ``na``: checks that do not apply, with
    the reason. ``custom``: a check done by a callable that must raise ``ValueError`` matching the
    given pattern (for names without tensor inputs).
    """

    call: Callable[..., Any]
    inputs: Callable[[int], dict[str, Any]]
    shape: str | None = None
    boundary: bool = False
    na: dict[str, str] = field(default_factory=dict)
    custom: dict[str, tuple[Callable[[], Any], str]] = field(default_factory=dict)


@functools.lru_cache(maxsize=None)
def tiny_translator() -> translator.TraceableTranslator:
    from plasticine.diffusion import DDIMSampler, LinearSchedule
    from plasticine.diffusion.conditioning import ConcatConditioning
    from plasticine.diffusion.unet import ConditionalUNet, UNetConfig
    from plasticine.registration.network import LearnedRegistration, RegistrationNet, RegistrationNetConfig
    from plasticine.segmentation import KMeansExtractor

    torch.manual_seed(0)
    return translator.TraceableTranslator(
        KMeansExtractor(2),
        LearnedRegistration(RegistrationNet(RegistrationNetConfig(features=4, encoder=(4, 4), align_channels=4, align_layers=1))),
        ConditionalUNet(UNetConfig(cond_channels=2, base_channels=8, channel_mults=(1,), attention_levels=(), norm_groups=4)),
        LinearSchedule(num_steps=20),
        DDIMSampler(steps=2),
        ConcatConditioning(2),
    )


def translate(x: torch.Tensor) -> translator.TranslationResult:
    return tiny_translator().translate(x, generator=torch.Generator().manual_seed(0))


@functools.lru_cache(maxsize=None)
def a_result() -> translator.TranslationResult:
    return translate(rand(1, 1, 8, 8))


def img_pair(b):
    return {"moving": image(b), "fixed": image(b, seed=1)}


def disp(b):
    return {"displacement": field_(b)}


def vel(b):
    return {"velocity": field_(b)}


def module(cls, *args, **kwargs):
    return lambda **inputs: cls(*args, **kwargs)(**inputs)


CASES: dict[str, Case] = {
    # -- core --------------------------------------------------------------------------------------
    "core.Deformation": Case(lambda forward, inverse: core.Deformation(forward, inverse), lambda b: {"forward": field_(b), "inverse": field_(b)}, boundary=True),
    "core.GridSampleWarper": Case(module(core.GridSampleWarper), lambda b: {"image": image(b), "displacement": field_(b)}),
    "core.check_finite": Case(
        lambda tensor: core.check_finite(tensor, "tensor"),
        lambda b: {"tensor": image(b)},
        boundary=True,
        na={
            "shape": "accepts any shape",
            "empty": "accepts any shape; an empty tensor holds no non-finite value",
            "integer": "accepts any dtype; integers are always finite",
        },
    ),
    "core.check_image": Case(lambda image: core.check_image(image, "image"), lambda b: {"image": image(b)}, boundary=True),
    **{f"core.{n}": Case(
        lambda f=f: f(),
        lambda b: {},
        na={"shape": "checks a Python number", "empty": "takes no batch", "nan": "takes no tensor"},
        custom={"integer": (lambda f=f: f(True), r"^n: expected .*, got True$")},
    ) for n, f in (
        ("check_int", lambda v=3: core.check_int(v, "n", 1)),
        ("check_number", lambda v=0.5: core.check_number(v, "n", 0, 1)),
        ("check_option", lambda v=2: core.check_option(v, "n", (1, 2))),
        ("spacing_tuple", lambda v=(1.0, 2.0): core.spacing_tuple(v, 2, "n")),
    )},
    "core.check_shape": Case(
        lambda tensor: core.check_shape(tensor, "B C *S", "tensor", floating=True),
        lambda b: {"tensor": image(b)},
        na={"nan": "checks shapes and dtypes only, computes nothing"},
    ),
    "core.check_values": Case(
        lambda values: core.check_values(values, values < 0, lambda: "values: expected values >= 0"),
        lambda b: {"values": image(b)},
        na={
            "shape": "accepts any shape (the flags broadcast to the values)",
            "empty": "accepts any shape; an empty tensor has no value to refuse",
            "integer": "accepts any dtype; the caller's flags decide",
        },
    ),
    "core.compose": Case(core.compose, lambda b: {"u_a": field_(b), "u_b": field_(b)}),
    "core.displacement_from_world": Case(core.displacement_from_world, lambda b: {"displacement": field_(b), "affine": torch.eye(3)}),
    "core.displacement_to_grid": Case(core.displacement_to_grid, disp),
    "core.displacement_to_world": Case(core.displacement_to_world, lambda b: {"displacement": field_(b), "affine": torch.eye(3)}),
    "core.folding_fraction": Case(core.folding_fraction, disp),
    "core.folding_report": Case(core.folding_report, disp),
    "core.non_diffeomorphic_volume": Case(core.non_diffeomorphic_volume, disp),
    "core.one_sided_jacobian_determinants": Case(core.one_sided_jacobian_determinants, disp),
    "core.gaussian_smooth": Case(lambda x: core.gaussian_smooth(x, 1.0), lambda b: {"x": image(b)}),
    "core.grid_to_displacement": Case(core.grid_to_displacement, lambda b: {"grid": core.displacement_to_grid(field_(1)).expand(b, -1, -1, -1).contiguous()}),
    "core.identity_grid": Case(
        lambda: core.identity_grid(S),
        lambda b: {},
        na={"empty": "takes no batch", "nan": "takes no tensor"},
        custom={
            "shape": (lambda: core.identity_grid((4,)), r"identity_grid: expected 2 or 3 positive spatial sizes, got \(4,\)"),
            "integer": (lambda: core.identity_grid(S, dtype=torch.int64), r"dtype: expected a floating-point dtype, got torch.int64"),
        },
    ),
    "core.inverse_consistency_error": Case(core.inverse_consistency_error, lambda b: {"displacement": field_(b), "inverse": field_(b)}),
    "core.jacobian_determinant": Case(core.jacobian_determinant, disp),
    "core.jacobian_matrix": Case(core.jacobian_matrix, disp),
    "core.resize": Case(lambda x: core.resize(x, (4, 9)), lambda b: {"x": image(b)}),
    "core.resize_field": Case(lambda field: core.resize_field(field, (4, 9)), lambda b: {"field": field_(b)}),
    "core.sample_at_points": Case(core.sample_at_points, lambda b: {"field": image(b), "points": all_points(b)}),
    "core.spatial_gradient": Case(core.spatial_gradient, lambda b: {"field": image(b)}),
    "core.voxel_to_world": Case(core.voxel_to_world, lambda b: {"points": all_points(b), "affine": torch.eye(3)}),
    "core.warp": Case(core.warp, lambda b: {"image": image(b), "displacement": field_(b)}),
    "core.world_to_voxel": Case(core.world_to_voxel, lambda b: {"points": all_points(b), "affine": torch.eye(3)}),
    # -- losses ------------------------------------------------------------------------------------
    "losses.BendingEnergy": Case(module(losses.BendingEnergy), disp),
    "losses.GradientSmoothness": Case(module(losses.GradientSmoothness), disp),
    "losses.LocalNCC": Case(module(losses.LocalNCC, window=3), img_pair),
    "losses.MutualInformation": Case(module(losses.MutualInformation, bins=8), img_pair),
    "losses.NCC": Case(module(losses.NCC), img_pair),
    "losses.bending_energy": Case(losses.bending_energy, disp),
    "losses.box_sum": Case(lambda x: losses.box_sum(x, 3), lambda b: {"x": image(b)}),
    "losses.gradient_smoothness": Case(losses.gradient_smoothness, disp),
    "losses.joint_histogram": Case(lambda moving, fixed: losses.joint_histogram(moving, fixed, bins=8), img_pair),
    "losses.local_ncc": Case(lambda moving, fixed: losses.local_ncc(moving, fixed, window=3), img_pair),
    "losses.mutual_information": Case(lambda moving, fixed: losses.mutual_information(moving, fixed, bins=8), img_pair),
    "losses.ncc": Case(losses.ncc, img_pair),
    # -- integrators -------------------------------------------------------------------------------
    "integrators.Euler": Case(module(integrators.Euler, steps=4), vel),
    "integrators.RK4": Case(module(integrators.RK4, steps=2), vel),
    "integrators.ScalingAndSquaring": Case(module(integrators.ScalingAndSquaring), vel),
    "integrators.auto_squaring_steps": Case(integrators.auto_squaring_steps, vel, boundary=True),  # returns an int: cannot carry a NaN
    "integrators.integrate_euler": Case(lambda velocity: integrators.integrate_euler(velocity, 4), vel),
    "integrators.integrate_rk4": Case(lambda velocity: integrators.integrate_rk4(velocity, 2), vel),
    "integrators.scaling_and_squaring": Case(integrators.scaling_and_squaring, vel),
    # -- translator --------------------------------------------------------------------------------
    "translator.TraceableTranslator": Case(lambda x: translate(x), lambda b: {"x": rand(b, 1, 8, 8)}, boundary=True),
    "translator.TranslationResult": Case(lambda image: a_result().deformation.to_source(image), lambda b: {"image": rand(b, 1, 8, 8)}),
}


def public_names() -> set[str]:
    return {f"{pkg}.{name}" for pkg, mod in PACKAGES.items() for name in mod.__all__}


def test_every_public_name_has_a_case():
    names = public_names()
    assert set(CASES) | set(NOT_CALLABLE) == names, (
        f"without a case: {sorted(names - set(CASES) - set(NOT_CALLABLE))}; stale: {sorted((set(CASES) | set(NOT_CALLABLE)) - names)}"
    )
    assert not set(CASES) & set(NOT_CALLABLE)


def test_every_case_decides_every_check():
    for name, case in CASES.items():
        assert set(case.na) <= set(CHECKS), name
        assert all(reason for reason in case.na.values()), f"{name}: a check that does not apply needs a reason"


def _floating_inputs(case: Case) -> list[str]:
    return [k for k, v in case.inputs(1).items() if isinstance(v, torch.Tensor) and v.is_floating_point()]


def _params(check: str) -> list:
    out = []
    for name, case in sorted(CASES.items()):
        if check in case.na:
            continue
        if check in case.custom:
            out.append(pytest.param(name, None, id=f"{name}"))
        elif check in ("integer", "nan"):
            out += [pytest.param(name, arg, id=f"{name}-{arg}") for arg in _floating_inputs(case)]
        else:
            out.append(pytest.param(name, None, id=name))
    return out


def _custom(case: Case, check: str) -> bool:
    if check not in case.custom:
        return False
    fn, pattern = case.custom[check]
    with pytest.raises(ValueError, match=pattern):
        fn()
    return True


@pytest.mark.parametrize("name", sorted(CASES))
def test_valid_inputs_work(name):
    case = CASES[name]
    case.call(**case.inputs(2))


@pytest.mark.parametrize("name,arg", _params("shape"))
def test_a_wrong_shape_raises_naming_the_argument(name, arg):
    case = CASES[name]
    if _custom(case, "shape"):
        return
    inputs = case.inputs(1)
    arg = case.shape or next(iter(inputs))
    inputs[arg] = inputs[arg][..., None, None]  # two extra spatial axes: never a valid shape
    with pytest.raises(ValueError, match=rf"^{arg}: expected shape"):
        case.call(**inputs)


@pytest.mark.parametrize("name,arg", _params("empty"))
def test_an_empty_batch_is_refused(name, arg):
    case = CASES[name]
    if _custom(case, "empty"):
        return
    inputs = case.inputs(0)
    first = next(k for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.shape[:1] == (0,))
    with pytest.raises(ValueError, match=rf"^{first}: expected shape .*an empty batch \(B = 0\)"):
        case.call(**inputs)


@pytest.mark.parametrize("name,arg", _params("integer"))
def test_an_integer_tensor_is_refused_where_floats_are_expected(name, arg):
    case = CASES[name]
    if _custom(case, "integer"):
        return
    inputs = case.inputs(1)
    inputs[arg] = inputs[arg].round().long()
    with pytest.raises(ValueError, match=rf"^{arg}: expected a floating-point tensor, got dtype torch.int64"):
        case.call(**inputs)


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, core.Deformation):
        return [out.forward, out.inverse]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    raise AssertionError(f"unexpected output {type(out).__name__}")


@pytest.mark.parametrize("name,arg", _params("nan"))
def test_a_nan_gives_a_non_finite_result_or_a_boundary_error(name, arg):
    case = CASES[name]
    inputs = case.inputs(1)
    bad = inputs[arg].clone()
    bad.view(-1)[bad.numel() // 2] = float("nan")
    inputs[arg] = bad
    if case.boundary:
        with pytest.raises(NonFiniteError, match=rf"^{arg}: expected finite values"):
            case.call(**inputs)
        return
    out = _tensors(case.call(**inputs))
    assert any(not bool(torch.isfinite(t).all()) for t in out), f"{name}: a NaN in {arg} gave a finite result"


@pytest.mark.parametrize("name,arg", [p for p in _params("nan") if not CASES[p.values[0]].boundary])
def test_an_infinity_gives_a_non_finite_result(name, arg):
    case = CASES[name]
    inputs = case.inputs(1)
    bad = inputs[arg].clone()
    bad.view(-1)[bad.numel() // 2] = float("inf")
    inputs[arg] = bad
    out = _tensors(case.call(**inputs))
    assert any(not bool(torch.isfinite(t).all()) for t in out), f"{name}: an infinity in {arg} gave a finite result"
