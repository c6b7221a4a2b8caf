"""Saving and loading: every component round-trips with the same outputs, no code is unpickled."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import pkgutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_generator
from test_translator import make_translator, phantom

import plasticine
from plasticine import checkpoint as ck
from plasticine.checkpoint import CheckpointError, atomic_write, load_component, load_state, load_tensors, load_translator, save_component, save_state
from plasticine.core import Config, Configurable, registered_classes, to_json
from plasticine.diffusion import AncestralSampler, CosineSchedule, DDIBTranslator, DDIMSampler, DPMSolverPP, LinearSchedule, ScheduleFromBetas
from plasticine.diffusion.conditioning import ConcatConditioning, LearnedConditioning
from plasticine.diffusion.schedules import DiscreteSchedule
from plasticine.diffusion.unet import ConditionalUNet, UNetConfig
from plasticine.losses import NCC, BendingEnergy, GradientSmoothness, LocalNCC, MutualInformation
from plasticine.registration import LBFGS, RK4, Adam, AntsRegistration, Euler, GradientDescent, IdentityRegistration, PopulationRegistration, ScalingAndSquaring
from plasticine.registration.iterative import IterativeRegistration
from plasticine.registration.network import LearnedRegistration, RegistrationNet, RegistrationNetConfig
from plasticine.segmentation import ContourExtractor, ForegroundExtractor, KMeansExtractor, MINDExtractor, MultiOtsuExtractor, PottsExtractor, RimExtractor, StackedExtractor
from plasticine.segmentation.unet import SegmentationUNet, SegmentationUNetConfig
from plasticine.translator import TraceableTranslator

MARKER: list[str] = []


def _executed(path: str) -> None:  # what a malicious pickle would run
    MARKER.append(path)
    Path(path).write_text("pwned")


class Evil:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (_executed, (self.path,))


OPTIONS = {
    "defaults": {},
    # the sampler's parametrisation and x0 conditioning, the diffusion's data range, the warped start
    "options": dict(sampler=DDIMSampler(3, spacing="log_snr", prediction="v", clip=(-1.0, 1.0)), data_range=(0.0, 1.0), start="warped"),
}


@pytest.mark.parametrize("options", list(OPTIONS), ids=list(OPTIONS))
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_round_trip_same_output(tmp_path, suffix, options):
    t = make_translator(**OPTIONS[options])
    with torch.no_grad():  # weights that differ from any fresh initialisation
        for p in t.denoiser.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=make_generator(1)))
    path = tmp_path / f"model{suffix}"
    save_component(t, path)
    torch.manual_seed(123)  # the loaded parts are built with other random weights first
    u = load_translator(path)
    assert to_json(u) == to_json(t) and repr(u) == repr(t) and not u.training
    assert all(torch.equal(u.state_dict()[k], v) for k, v in t.state_dict().items())
    x = phantom((10, 12))
    a = t.translate(x, num_samples=2, generator=make_generator(4))
    b = u.translate(x, num_samples=2, generator=make_generator(4))
    assert torch.equal(a.image, b.image) and torch.equal(a.deformation.forward, b.deformation.forward)
    assert not list(tmp_path.glob("*.tmp"))  # no temporary file left behind


def test_config_is_plain_json(tmp_path):
    t = make_translator(start_fraction=0.3)
    save_component(t, tmp_path / "m.safetensors")
    tensors, config = load_tensors(tmp_path / "m.safetensors")
    assert json.loads(json.dumps(config, allow_nan=False)) == config
    assert config["format_version"] == ck.FORMAT_VERSION == 3 and config["component"]["class"] == "TraceableTranslator"
    parts = config["component"]["config"]
    assert parts["sampler"] == {"class": "DDIMSampler", "config": {"steps": 3, "eta": 0.0, "spacing": "trailing", "prediction": "eps", "clip": None, "dynamic_threshold": None}}
    assert parts["registration"]["class"] == "LearnedRegistration" and parts["registration"]["config"]["downsample"] == 1
    assert parts["registration"]["config"]["network"]["config"]["config"]["class"] == "RegistrationNetConfig"
    assert parts["start_fraction"] == 0.3 and load_translator(tmp_path / "m.safetensors").start_fraction == 0.3
    assert set(tensors) == set(t.state_dict())


# -- every component: save -> load -> the same outputs -----------------------------------------------


def _image(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=make_generator(seed))


def _field(*shape: int, seed: int = 0) -> torch.Tensor:
    return 0.8 * torch.randn(*shape, generator=make_generator(seed))


class _AntsCalled(Exception):
    def __init__(self, kwargs: dict):
        super().__init__("stub")
        self.kwargs = kwargs


class _StubAnts:
    """Stands in for antspyx: records what ``ants.registration`` is asked to do."""

    @staticmethod
    def from_numpy(array, **kwargs):
        return array

    @staticmethod
    def registration(fixed, moving, **kwargs):
        raise _AntsCalled(kwargs)


def _ants_call(backend: AntsRegistration, monkeypatch) -> dict:
    monkeypatch.setattr("plasticine.registration.ants._import_ants", lambda: _StubAnts)
    with pytest.raises(_AntsCalled) as called:
        backend.register(_image(1, 1, 6, 6), _image(1, 1, 6, 6, seed=1))
    return called.value.kwargs


def _sample(sampler):
    schedule = LinearSchedule(1e-3, 0.2, num_steps=20)
    start = _image(2, 1, 6, 5)
    return sampler.sample(lambda y, gamma, c: 0.3 * y + 0.1 * c, schedule, _image(2, 1, 6, 5, seed=3), start, start_step=15, generator=make_generator(9))


def _schedule(schedule):
    y0, noise = _image(2, 1, 5, 4), _field(2, 1, 5, 4, seed=1)
    return schedule.gammas, schedule.q_sample(y0, torch.tensor([1, schedule.num_steps]), noise)


def _translator_downsampled():
    net = RegistrationNet(RegistrationNetConfig(features=4, encoder=(4, 4), align_channels=4, align_layers=1))
    with torch.no_grad():
        net.head.weight.normal_(0.0, 0.05, generator=make_generator(7))
    return make_translator(registration=LearnedRegistration(net, RK4(3), downsample=2), start_fraction=0.4)


def _translate(t):
    r = t.translate(phantom((12, 10)), num_samples=2, generator=make_generator(4))
    return r.image, r.deformation.forward, r.deformation.inverse


def _minimise(optimizer):
    target = _field(1, 2, 6, 6, seed=4)
    with torch.enable_grad():
        return optimizer.minimise(lambda v: (v - target).square().sum() + v.diff(dim=-1).square().sum(), torch.zeros(1, 2, 6, 6), 4)


def _reg_net():
    return RegistrationNet(RegistrationNetConfig(spatial_dims=3, cue_channels=1, features=4, encoder=(4, 8), inverse="learned", norm_groups=2), velocity_level=1)


def _ddib():
    def unet(seed):
        return ConditionalUNet(UNetConfig(cond_channels=0, base_channels=4, channel_mults=(1,), attention_levels=(), norm_groups=2), generator=make_generator(seed))

    return DDIBTranslator(unet(11), unet(12), LinearSchedule(1e-3, 0.2, num_steps=20), steps=4, prediction="x0", clip=(-1.0, 1.0))


def _population():
    backend = PopulationRegistration((12, 12), IterativeRegistration(levels=(2, 1), iterations=(4, 2)))
    target = phantom((12, 12), batch=3, seed=1).roll(2, dims=-1)
    backend.fit(phantom((12, 12), batch=3, seed=0), target)
    return backend


#: class -> (a component with settings other than the defaults, what it computes). A component
#: class that is registered but has no case here fails test_every_component_has_a_case.
CASES = {
    LinearSchedule: (lambda: LinearSchedule(1e-5, 2e-2, 30), _schedule),
    CosineSchedule: (lambda: CosineSchedule(40, s=0.01), _schedule),
    ScheduleFromBetas: (lambda: ScheduleFromBetas([0.1, 0.2, 0.3]), _schedule),
    DiscreteSchedule: (lambda: DiscreteSchedule(torch.tensor([0.05, 0.1], dtype=torch.float64)), _schedule),
    AncestralSampler: (lambda: AncestralSampler("posterior", steps=7, spacing="leading", prediction="x0", dynamic_threshold=0.9), _sample),
    DDIMSampler: (lambda: DDIMSampler(steps=9, eta=0.3, clip=(-1.0, 1.0)), _sample),
    DPMSolverPP: (lambda: DPMSolverPP(steps=4, order=1, spacing="log_snr", prediction="v"), _sample),
    ConcatConditioning: (lambda: ConcatConditioning(3, one_hot=True, dtype=torch.float64), lambda c: c(torch.tensor([[[[0, 2], [1, 1]]]]))),
    LearnedConditioning: (lambda: LearnedConditioning(2, (4, 8), ndim=3, generator=make_generator(1)), lambda c: c.pyramid(_image(1, 2, 5, 6, 4))),
    ConditionalUNet: (
        lambda: ConditionalUNet(
            UNetConfig(ndim=3, cond_channels=2, base_channels=8, channel_mults=(1, 2), attention_levels=(1,), norm_groups=4),
            encoder=LearnedConditioning(2, (4, 8), 3, generator=make_generator(2)),
            channels_last=False,
            generator=make_generator(3),
        ),
        lambda u: u(_image(2, 1, 5, 6, 4), torch.tensor([0.3, 0.9]), _image(2, 2, 5, 6, 4, seed=1)),
    ),
    PottsExtractor: (lambda: PottsExtractor(4, gamma=0.2, neighborhood="diagonals", normalize=False, max_iter=7), lambda e: e(_image(2, 1, 9, 8))),
    KMeansExtractor: (lambda: KMeansExtractor(3, smoothing_sigma=1.5, max_iter=9), lambda e: e(_image(2, 1, 9, 8))),
    MultiOtsuExtractor: (lambda: MultiOtsuExtractor(3, bins=64), lambda e: e(_image(2, 1, 9, 8))),
    ForegroundExtractor: (lambda: ForegroundExtractor("otsu", closing=1, smoothing_sigma=0.7, bins=32), lambda e: e(_image(2, 1, 9, 8))),
    MINDExtractor: (lambda: MINDExtractor(sigma=1.2, dilation=1, layout="mind"), lambda e: e(_image(2, 1, 6, 7, 5))),
    ContourExtractor: (lambda: ContourExtractor(KMeansExtractor(3, smoothing_sigma=1.0, max_iter=9)), lambda e: e(_image(2, 1, 9, 8))),
    StackedExtractor: (lambda: StackedExtractor([ForegroundExtractor(fraction=0.2), MINDExtractor(sigma=1.5)]), lambda e: e(_image(2, 1, 9, 8))),
    RimExtractor: (lambda: RimExtractor(MINDExtractor(sigma=1.5), 2.5, ForegroundExtractor(fraction=0.2)), lambda e: e(_image(2, 1, 12, 11))),
    ScalingAndSquaring: (lambda: ScalingAndSquaring(5, "zeros"), lambda f: f(_field(1, 2, 8, 7))),
    Euler: (lambda: Euler(4, "reflection"), lambda f: f(_field(1, 2, 8, 7))),
    RK4: (lambda: RK4(3, "reflection"), lambda f: f(_field(1, 3, 6, 5, 4))),
    MutualInformation: (lambda: MutualInformation(bins=16, kernel="gaussian", sigma=0.7, moving_range=(0.0, 1.0)), lambda m: m(_image(2, 1, 8, 8), _image(2, 1, 8, 8, seed=1))),
    NCC: (lambda: NCC(), lambda m: m(_image(2, 1, 8, 8), _image(2, 1, 8, 8, seed=1))),
    LocalNCC: (lambda: LocalNCC((3, 5)), lambda m: m(_image(2, 1, 8, 8), _image(2, 1, 8, 8, seed=1))),
    GradientSmoothness: (lambda: GradientSmoothness((0.5, 2.0)), lambda r: r(_field(1, 2, 6, 6))),
    BendingEnergy: (lambda: BendingEnergy((1.0, 2.0)), lambda r: r(_field(1, 2, 6, 6))),
    RegistrationNet: (_reg_net, lambda n: n(_image(1, 1, 6, 7, 5), _image(1, 1, 6, 7, 5, seed=1), _image(1, 1, 6, 7, 5, seed=2))),
    LearnedRegistration: (lambda: _translator_downsampled().registration, lambda r: tuple(r.register(phantom((12, 10))).__dict__.values())),
    IterativeRegistration: (
        lambda: IterativeRegistration(
            LocalNCC(3), BendingEnergy(2.0), levels=(2, 1), iterations=(3, 2), weight=0.1, optimizer=GradientDescent(0.3, update_smoothing=2.0), integrator=RK4(3)
        ),
        lambda r: r.register(phantom((12, 12), seed=0), phantom((12, 12), seed=1)).forward,
    ),
    GradientDescent: (lambda: GradientDescent(0.3, update_smoothing=1.0), _minimise),
    Adam: (lambda: Adam(0.05), _minimise),
    LBFGS: (lambda: LBFGS(0.5), _minimise),
    IdentityRegistration: (lambda: IdentityRegistration(), lambda r: r.register(phantom((12, 10))).forward),
    PopulationRegistration: (_population, lambda r: tuple(r.register(phantom((12, 12))).__dict__.values())),
    AntsRegistration: (lambda: AntsRegistration("SyNOnly", "CC", pad=4, reg_iterations=(4, 2, 0)), None),  # the call it makes, see below
    SegmentationUNet: (
        lambda: SegmentationUNet(1, 3, 2, SegmentationUNetConfig(depth=2, base_width=4, norm="group", groups=2, dropout=0.1), generator=make_generator(5)),
        lambda n: n(_image(2, 1, 9, 10)),
    ),
    TraceableTranslator: (_translator_downsampled, _translate),
    DDIBTranslator: (_ddib, lambda t: t.translate(_image(2, 1, 8, 8))),
}


#: Modules that need an optional dependency at import time, and which the library imports only where
#: it is installed (the Triton kernel source, the compiled Potts line loop): module -> dependency.
OPTIONAL_MODULES = {"plasticine.core._triton_kernels": "triton", "plasticine.segmentation.potts_model.line_kernel": "numba"}


def _components() -> list[type]:
    """Every Configurable class of plasticine, found through the registry (all modules imported)."""
    for m in pkgutil.walk_packages(plasticine.__path__, "plasticine."):
        if m.name.endswith("__main__"):
            continue
        if m.name in OPTIONAL_MODULES and importlib.util.find_spec(OPTIONAL_MODULES[m.name]) is None:
            continue
        importlib.import_module(m.name)
    return sorted(
        (c for c in registered_classes().values() if issubclass(c, Configurable) and c.__module__.startswith("plasticine.") and vars(sys.modules[c.__module__]).get(c.__name__) is c),
        key=lambda c: c.__qualname__,
    )


def test_every_component_has_a_case():
    assert {c.__qualname__ for c in _components()} - {c.__qualname__ for c in CASES} == set()


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


@pytest.mark.parametrize("cls", list(CASES), ids=lambda c: c.__name__)
def test_every_component_round_trips_with_the_same_outputs(cls, tmp_path, monkeypatch):
    """save -> load (in a fresh state of the global generator) -> the same outputs on the same inputs and seeds."""
    make, run = CASES[cls]
    torch.manual_seed(0)
    obj = make()
    assert type(obj) is cls and isinstance(obj.config, Config) and not callable(obj.config)
    if isinstance(obj, torch.nn.Module):
        obj.eval()  # what load returns
    if run is None:
        run = lambda b: _ants_call(b, monkeypatch)  # noqa: E731
    with torch.no_grad():
        before = run(obj)
    path = tmp_path / f"{cls.__name__}.pt"
    save_component(obj, path)
    torch.manual_seed(123)  # modules are rebuilt with other random weights first
    loaded = load_component(path, expected=cls)
    assert type(loaded) is cls
    with torch.no_grad():
        after = run(loaded)
    assert _same(before, after)


def test_a_translator_with_a_downsampling_registration_round_trips(tmp_path):
    """LearnedRegistration(downsample=2) came back with downsample=1, so translate gave other outputs."""
    t = _translator_downsampled().eval()
    before = _translate(t)
    for suffix in (".safetensors", ".pt"):
        save_component(t, tmp_path / f"m{suffix}")
        u = load_translator(tmp_path / f"m{suffix}")
        assert u.registration.downsample == 2 and _same(before, _translate(u))


def test_a_float64_translator_loads_in_float64(tmp_path):
    t = make_translator().to(torch.float64).eval()
    save_component(t, tmp_path / "m.pt")
    u = load_translator(tmp_path / "m.pt")
    assert next(u.denoiser.parameters()).dtype == torch.float64
    x = phantom((8, 8)).double()
    assert torch.equal(t.translate(x, generator=make_generator(1)).image, u.translate(x, generator=make_generator(1)).image)


class Thresholds(torch.nn.Module):
    """A user structure extractor that does not declare its configuration."""

    def __init__(self, level: float = 0.5):
        super().__init__()
        self.level = level

    def forward(self, image):
        fg = (image.mean(1, keepdim=True) > self.level).to(image.dtype)
        return torch.cat([1 - fg, fg], 1)


class ConfigurableThresholds(Configurable, Thresholds, config_name="test_checkpoint.ConfigurableThresholds"):
    """The same extractor made savable by inheriting Configurable."""


def test_a_user_component_saves_once_it_is_configurable(tmp_path):
    t = make_translator(structure=Thresholds(0.4))
    with pytest.raises(CheckpointError, match=r"m\.pt: cannot save: TraceableTranslator\.structure: cannot write a test_checkpoint\.Thresholds into a config: a component must inherit plasticine\.core\.config\.Configurable"):
        save_component(t, tmp_path / "m.pt")
    assert not (tmp_path / "m.pt").exists()
    t = make_translator(structure=ConfigurableThresholds(0.4))
    save_component(t, tmp_path / "m.pt")
    u = load_translator(tmp_path / "m.pt")
    assert type(u.structure) is ConfigurableThresholds and u.structure.level == 0.4
    with pytest.raises(CheckpointError, match=r"m\.pt: expected a LinearSchedule checkpoint, the file holds a TraceableTranslator"):
        load_component(tmp_path / "m.pt", expected=LinearSchedule)
    from plasticine.core import config as core_config

    saved = core_config._CLASSES.pop("test_checkpoint.ConfigurableThresholds")  # as in a process that did not import it
    try:
        with pytest.raises(CheckpointError, match=r"m\.pt: TraceableTranslator\.structure: the class 'test_checkpoint\.ConfigurableThresholds' is not registered; import the module that defines it"):
            load_translator(tmp_path / "m.pt")
    finally:
        core_config._CLASSES["test_checkpoint.ConfigurableThresholds"] = saved


def test_files_of_an_earlier_format_version_are_refused(tmp_path):
    t = make_translator()
    old_layout = {"translator": {"components": {}, "start_fraction": 0.5}, "format_version": 2}  # what versions 1 and 2 wrote
    ck.save_tensors(tmp_path / "old.pt", t.state_dict(), old_layout)
    with pytest.raises(CheckpointError, match=r"^\S*old\.pt: a checkpoint of format version 2; this plasticine reads component checkpoints of format version 3 .*load_tensors"):
        load_translator(tmp_path / "old.pt")
    tensors, config = load_tensors(tmp_path / "old.pt")  # the weights still read
    assert config == old_layout and set(tensors) == set(t.state_dict())
    ck.save_tensors(tmp_path / "other.pt", {}, {"k": 1})
    with pytest.raises(CheckpointError, match="format version unknown"):
        load_component(tmp_path / "other.pt")


def test_pickled_objects_are_refused(tmp_path):
    target = str(tmp_path / "executed")
    path = tmp_path / "evil.pt"
    torch.save({"format": "plasticine", "version": 1, "config": "{}", "tensors": {}, "payload": Evil(target)}, path)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_translator(path)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_state(path)
    assert not os.path.exists(target) and not MARKER


def test_bad_files(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_translator(tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match=r"\.safetensors, \.pt or \.pth"):
        save_component(make_translator(), tmp_path / "model.bin")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable"):
        load_translator(tmp_path / "junk.safetensors")
    (tmp_path / "junk.pt").write_bytes(b"\x00\x01 nothing")
    with pytest.raises(CheckpointError):
        load_translator(tmp_path / "junk.pt")
    t = make_translator()
    save_component(t, tmp_path / "m.pt")
    small = make_translator(denoiser=ConditionalUNet(UNetConfig(cond_channels=2, base_channels=4, channel_mults=(1,), attention_levels=(), norm_groups=4)))
    tensors, config = load_tensors(tmp_path / "m.pt")
    ck.save_tensors(tmp_path / "mixed.pt", small.state_dict(), config)  # weights of another architecture
    with pytest.raises(CheckpointError, match=r"mixed\.pt: the weights do not match the config: denoiser\.\S+: expected torch.float32 of shape"):
        load_translator(tmp_path / "mixed.pt")
    ck.save_tensors(tmp_path / "fewer.pt", {k: v for k, v in tensors.items() if not k.startswith("denoiser.")}, config)
    with pytest.raises(CheckpointError, match=r"fewer\.pt: the weights do not match the config: missing keys \['denoiser\."):
        load_translator(tmp_path / "fewer.pt")


def test_atomic_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "state.pt"
    save_state(path, {"step": 1, "w": torch.ones(3)})

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ck.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        save_state(path, {"step": 2, "w": torch.zeros(3)})
    monkeypatch.undo()
    state = load_state(path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]  # the temporary file is gone
    atomic_write(path, b"abc")
    assert path.read_bytes() == b"abc"


def _flip_tensor_bytes(path: Path, tensor: torch.Tensor, count: int = 64) -> None:
    """Invert ``count`` bytes inside the stored raw bytes of ``tensor`` (found in the file)."""
    data = bytearray(path.read_bytes())
    raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    offset = data.find(raw)
    assert offset > 0 and len(raw) >= 2 * count, "the tensor's bytes are stored as they are"
    for i in range(offset + len(raw) // 4, offset + len(raw) // 4 + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _largest(state: dict) -> tuple[str, torch.Tensor]:
    return max(state.items(), key=lambda kv: kv[1].numel())


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_flipped_bytes_fail_the_integrity_check(tmp_path, suffix):
    t = make_translator()
    path = tmp_path / f"model{suffix}"
    save_component(t, path)
    u = load_translator(path)  # unmodified: the same weights
    assert all(torch.equal(u.state_dict()[k], v) for k, v in t.state_dict().items())
    _, big = _largest(t.state_dict())
    _flip_tensor_bytes(path, big)
    with pytest.raises(CheckpointError, match=r"model\.(safetensors|pt): integrity check failed"):
        load_translator(path)
    with pytest.raises(CheckpointError, match="integrity check failed"):
        load_tensors(path)


def test_flipped_bytes_in_a_training_state(tmp_path):
    path = tmp_path / "state.pt"
    w = torch.randn(256, generator=make_generator(0))
    save_state(path, {"step": 3, "model": {"w": w}, "rng": torch.get_rng_state()})
    state = load_state(path)
    assert state["step"] == 3 and torch.equal(state["model"]["w"], w) and "plasticine_sha256" not in state
    _flip_tensor_bytes(path, w)
    with pytest.raises(CheckpointError, match=r"state\.pt: integrity check failed"):
        load_state(path)
    torch.save({"step": 3, "model": {"w": w}}, path)  # no hash: not written by save_state
    with pytest.raises(CheckpointError, match="integrity check failed.*no sha256"):
        load_state(path)


def test_the_hash_covers_config_and_names(tmp_path):
    """A changed config, name or value in a file with the old hash is refused."""
    path = tmp_path / "m.pt"
    ck.save_tensors(path, {"a": torch.ones(2), "b": torch.zeros(2)}, {"k": 1})
    good = torch.load(path, weights_only=True)
    for change in ({"config": '{"k": 2}'}, {"tensors": {"a": torch.zeros(2), "b": torch.ones(2)}}, {"tensors": {"a": torch.ones(2), "c": torch.zeros(2)}}, {"tensors": {"a": torch.ones(2).double(), "b": torch.zeros(2)}}):
        torch.save({**good, **change}, path)
        with pytest.raises(CheckpointError, match="integrity check failed"):
            load_tensors(path)
    torch.save({**good, "version": 2, "sha256": None}, path)
    with pytest.raises(CheckpointError, match="no sha256"):
        load_tensors(path)


def test_version_1_files_load_unverified(tmp_path):
    """What format version 1 wrote (no hash) still loads, with the finiteness check."""
    path = tmp_path / "old.pt"
    torch.save({"format": "plasticine", "version": 1, "config": '{"k": 1}', "tensors": {"w": torch.ones(3)}}, path)
    tensors, config = load_tensors(path)
    assert config == {"k": 1} and torch.equal(tensors["w"], torch.ones(3))
    from safetensors.torch import save_file

    save_file({"w": torch.ones(3)}, tmp_path / "old.safetensors", metadata={"plasticine_config": '{"k": 1}', "format_version": "1"})
    assert load_tensors(tmp_path / "old.safetensors")[1] == {"k": 1}
    torch.save({"format": "plasticine", "version": 1, "config": "{}", "tensors": {"w": torch.tensor([1.0, float("nan")])}}, path)
    with pytest.raises(CheckpointError, match=r"old\.pt: refused to load: tensor 'w' holds 1 non-finite"):
        load_tensors(path)
    ck.save_tensors(path, {"w": torch.ones(3)}, {})
    assert torch.load(path, weights_only=True)["version"] == ck.FORMAT_VERSION == 3


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_non_finite_weights_are_refused(tmp_path, suffix):
    t = make_translator()
    name, big = _largest(t.state_dict())
    with torch.no_grad():
        big[(0,) * big.dim()] = float("nan")
    path = tmp_path / f"model{suffix}"
    with pytest.raises(CheckpointError, match=rf"model{suffix}: refused to write: tensor '{name}' holds 1 non-finite"):
        save_component(t, path)
    assert not path.exists() and not list(tmp_path.iterdir())
    # a file that holds one (with a valid hash) does not load
    tensors = {k: v.detach().contiguous().clone() for k, v in t.state_dict().items()}
    text = json.dumps({"component": to_json(t), "format_version": 3}, sort_keys=True)
    digest, _ = ck.fingerprint(tensors, text)
    if suffix == ".pt":
        torch.save({"format": "plasticine", "version": 3, "config": text, "tensors": tensors, "sha256": digest}, path)
    else:
        from safetensors.torch import save_file

        save_file(tensors, path, metadata={"plasticine_config": text, "format_version": "3", "plasticine_sha256": digest})
    with pytest.raises(CheckpointError, match=rf"model{suffix}: refused to load: tensor '{name}' holds 1 non-finite"):
        load_translator(path)


def test_non_finite_training_states_are_refused(tmp_path):
    path = tmp_path / "state.pt"
    state = {"step": 1, "optimizer": {"state": {0: {"exp_avg": torch.tensor([0.0, float("inf")])}}}, "rng": torch.get_rng_state()}
    with pytest.raises(CheckpointError, match=r"state\.pt: refused to write: tensor 'optimizer\.state\.0\.exp_avg' holds 1 non-finite"):
        save_state(path, state)
    assert not path.exists()
    digest, _ = ck.fingerprint(state)
    torch.save({**state, "plasticine_sha256": digest}, path)
    with pytest.raises(CheckpointError, match=r"state\.pt: refused to load: tensor 'optimizer\.state\.0\.exp_avg'"):
        load_state(path)


def test_atomic_write_removes_stale_temporaries(tmp_path):
    stale = tmp_path / ".state.pt.ab12cd34.tmp"  # left by a write that was killed
    other = tmp_path / ".other.pt.ab12cd34.tmp"  # another file's (maybe a running write)
    similar = tmp_path / ".state.pt.old.tmp"  # not a temporary name
    for p in (stale, other, similar):
        p.write_bytes(b"partial")
    atomic_write(tmp_path / "state.pt", b"new")
    assert (tmp_path / "state.pt").read_bytes() == b"new"
    assert not stale.exists() and other.exists() and similar.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.pt.ab12cd34.tmp", ".state.pt.old.tmp", "state.pt"]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002], ids=oct)
def test_atomic_write_follows_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "a.bin", b"x")  # a new file
        save_state(tmp_path / "s.pt", {"w": torch.ones(1)})
    finally:
        os.umask(old)
    for name in ("a.bin", "s.pt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
