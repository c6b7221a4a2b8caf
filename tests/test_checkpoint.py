"""Saving and loading: round trips give the same output, configs rebuild every component, no code is unpickled."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import make_generator
from test_translator import make_translator, phantom

from plasticine import checkpoint as ck
from plasticine.checkpoint import CheckpointError, atomic_write, build_component, component_config, load_state, load_tensors, register_component, save_state
from plasticine.diffusion import AncestralSampler, CosineSchedule, DDIMSampler, DPMSolverPP, LinearSchedule, ScheduleFromBetas
from plasticine.diffusion.conditioning import ConcatConditioning, LearnedConditioning
from plasticine.diffusion.unet import ConditionalUNet, UNetConfig
from plasticine.losses import NCC, BendingEnergy, GradientSmoothness, LocalNCC, MutualInformation
from plasticine.registration import LBFGS, RK4, Adam, Euler, GradientDescent, ScalingAndSquaring
from plasticine.registration.iterative import IterativeRegistration
from plasticine.registration.network import LearnedRegistration, RegistrationNet, RegistrationNetConfig
from plasticine.segmentation import KMeansExtractor, MultiOtsuExtractor, PottsExtractor
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


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_round_trip_same_output(tmp_path, suffix):
    t = make_translator()
    with torch.no_grad():  # weights that differ from any fresh initialisation
        for p in t.denoiser.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=make_generator(1)))
    path = tmp_path / f"model{suffix}"
    t.save(path)
    torch.manual_seed(123)  # the loaded parts are built with other random weights first
    u = TraceableTranslator.load(path)
    assert u.config() == t.config() and repr(u) == repr(t)
    assert all(torch.equal(u.state_dict()[k], v) for k, v in t.state_dict().items())
    x = phantom((10, 12))
    a = t.translate(x, num_samples=2, generator=make_generator(4))
    b = u.translate(x, num_samples=2, generator=make_generator(4))
    assert torch.equal(a.image, b.image) and torch.equal(a.deformation.forward, b.deformation.forward)
    assert not list(tmp_path.glob("*.tmp"))  # no temporary file left behind


def test_config_is_plain_json(tmp_path):
    t = make_translator(start_fraction=0.3)
    t.save(tmp_path / "m.safetensors")
    tensors, config = load_tensors(tmp_path / "m.safetensors")
    assert json.loads(json.dumps(config)) == config
    comps = config["translator"]["components"]
    assert comps["sampler"] == {"class": "DDIMSampler", "config": {"steps": 3, "eta": 0.0, "spacing": "trailing"}}
    assert comps["registration"]["class"] == "LearnedRegistration" and comps["registration"]["config"]["integrator"]["class"] == "ScalingAndSquaring"
    assert config["translator"]["start_fraction"] == 0.3 and TraceableTranslator.load(tmp_path / "m.safetensors").start_fraction == 0.3
    assert set(tensors) == set(t.state_dict())


COMPONENTS = [
    LinearSchedule(1e-5, 2e-2, 30),
    CosineSchedule(40, s=0.01),
    ScheduleFromBetas([0.1, 0.2, 0.3]),
    AncestralSampler("posterior", steps=7, spacing="leading"),
    DDIMSampler(steps=9, eta=0.3),
    DPMSolverPP(steps=4, order=1),
    ConcatConditioning(3, one_hot=True, dtype=torch.float64),
    LearnedConditioning(2, (4, 8), ndim=3),
    ConditionalUNet(UNetConfig(ndim=3, cond_channels=2, base_channels=8, channel_mults=(1, 2), attention_levels=(1,), norm_groups=4), encoder=LearnedConditioning(2, (4, 8), 3)),
    PottsExtractor(4, gamma=0.2, neighborhood="diagonals", normalize=False, max_iter=7),
    KMeansExtractor(3, smoothing_sigma=1.5, max_iter=9),
    MultiOtsuExtractor(2, bins=64),
    ScalingAndSquaring(5, "zeros"),
    Euler(4),
    RK4(3, "reflection"),
    LearnedRegistration(RegistrationNet(RegistrationNetConfig(spatial_dims=3, cue_channels=0, features=4, encoder=(4, 8), inverse="learned")), RK4(2)),
    IterativeRegistration(LocalNCC((3, 5)), BendingEnergy((1.0, 2.0)), levels=(2, 1), iterations=(4, 2), optimizer=LBFGS(0.5), integrator=RK4(3)),
    IterativeRegistration(MutualInformation(bins=16, kernel="gaussian", moving_range=(0.0, 1.0)), GradientSmoothness(0.5)),
    IterativeRegistration(NCC(), GradientSmoothness()),
    IterativeRegistration(NCC(), GradientSmoothness(), optimizer=Adam(0.1)),
    IterativeRegistration(optimizer=GradientDescent(0.3, update_smoothing=2.0), integrator=ScalingAndSquaring(5), smoothing=1.0),
]


@pytest.mark.parametrize("obj", COMPONENTS, ids=lambda o: type(o).__name__)
def test_every_shipped_component_rebuilds(obj):
    spec = component_config(obj)
    assert json.loads(json.dumps(spec)) == spec
    rebuilt = build_component(json.loads(json.dumps(spec)))
    assert type(rebuilt) is type(obj) and component_config(rebuilt) == spec
    if isinstance(obj, torch.nn.Module):  # the same architecture: the weights fit
        rebuilt.load_state_dict(obj.state_dict())
    if hasattr(obj, "network"):
        assert rebuilt.network.config == obj.network.config
        rebuilt.network.load_state_dict(obj.network.state_dict())
    if hasattr(obj, "config") and not callable(obj.config):
        assert rebuilt.config == obj.config
    if hasattr(obj, "gammas"):
        assert torch.equal(rebuilt.gammas, obj.gammas)


class Thresholds(torch.nn.Module):
    """A user structure extractor: two classes split at ``level``."""

    def __init__(self, level: float = 0.5):
        super().__init__()
        self.level = level

    def config(self):
        return {"level": self.level}

    def forward(self, image):
        fg = (image.mean(1, keepdim=True) > self.level).to(image.dtype)
        return torch.cat([1 - fg, fg], 1)


def test_unknown_component_needs_registering(tmp_path):
    t = make_translator(structure=Thresholds(0.4))
    with pytest.raises(CheckpointError, match="register_component"):
        t.save(tmp_path / "m.pt")
    assert not (tmp_path / "m.pt").exists()
    register_component(Thresholds)
    try:
        t.save(tmp_path / "m.pt")
        u = TraceableTranslator.load(tmp_path / "m.pt")
        assert isinstance(u.structure, Thresholds) and u.structure.level == 0.4
        with pytest.raises(CheckpointError, match="already registered"):
            register_component(type("Thresholds", (), {"config": lambda self: {}}))  # another class, same name
    finally:
        ck._REGISTRY.pop("Thresholds")
    with pytest.raises(CheckpointError, match="not registered"):
        TraceableTranslator.load(tmp_path / "m.pt")


def test_pickled_objects_are_refused(tmp_path):
    target = str(tmp_path / "executed")
    path = tmp_path / "evil.pt"
    torch.save({"format": "plasticine", "version": 1, "config": "{}", "tensors": {}, "payload": Evil(target)}, path)
    with pytest.raises(CheckpointError, match="refused to load"):
        TraceableTranslator.load(path)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_state(path)
    assert not os.path.exists(target) and not MARKER


def test_bad_files(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        TraceableTranslator.load(tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match=r"\.safetensors, \.pt or \.pth"):
        make_translator().save(tmp_path / "model.bin")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable"):
        TraceableTranslator.load(tmp_path / "junk.safetensors")
    (tmp_path / "junk.pt").write_bytes(b"\x00\x01 nothing")
    with pytest.raises(CheckpointError):
        TraceableTranslator.load(tmp_path / "junk.pt")
    t = make_translator()
    t.save(tmp_path / "m.pt")
    small = make_translator(denoiser=ConditionalUNet(UNetConfig(cond_channels=2, base_channels=4, channel_mults=(1,), attention_levels=(), norm_groups=4)))
    tensors, config = load_tensors(tmp_path / "m.pt")
    ck.save_tensors(tmp_path / "mixed.pt", small.state_dict(), config)  # weights of another architecture
    with pytest.raises(CheckpointError, match="do not match"):
        TraceableTranslator.load(tmp_path / "mixed.pt")


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
    t.save(path)
    u = TraceableTranslator.load(path)  # unmodified: the same weights
    assert all(torch.equal(u.state_dict()[k], v) for k, v in t.state_dict().items())
    _, big = _largest(t.state_dict())
    _flip_tensor_bytes(path, big)
    with pytest.raises(CheckpointError, match=r"model\.(safetensors|pt): integrity check failed"):
        TraceableTranslator.load(path)
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
    assert torch.load(path, weights_only=True)["version"] == ck.FORMAT_VERSION == 2


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_non_finite_weights_are_refused(tmp_path, suffix):
    t = make_translator()
    name, big = _largest(t.state_dict())
    with torch.no_grad():
        big[(0,) * big.dim()] = float("nan")
    path = tmp_path / f"model{suffix}"
    with pytest.raises(CheckpointError, match=rf"model{suffix}: refused to write: tensor '{name}' holds 1 non-finite"):
        t.save(path)
    assert not path.exists() and not list(tmp_path.iterdir())
    # a file that holds one (with a valid hash) does not load
    tensors = {k: v.detach().contiguous().clone() for k, v in t.state_dict().items()}
    text = json.dumps({"translator": t.config(), "format_version": 2}, sort_keys=True)
    digest, _ = ck._fingerprint(tensors, text)
    if suffix == ".pt":
        torch.save({"format": "plasticine", "version": 2, "config": text, "tensors": tensors, "sha256": digest}, path)
    else:
        from safetensors.torch import save_file

        save_file(tensors, path, metadata={"plasticine_config": text, "format_version": "2", "plasticine_sha256": digest})
    with pytest.raises(CheckpointError, match=rf"model{suffix}: refused to load: tensor '{name}' holds 1 non-finite"):
        TraceableTranslator.load(path)


def test_non_finite_training_states_are_refused(tmp_path):
    path = tmp_path / "state.pt"
    state = {"step": 1, "optimizer": {"state": {0: {"exp_avg": torch.tensor([0.0, float("inf")])}}}, "rng": torch.get_rng_state()}
    with pytest.raises(CheckpointError, match=r"state\.pt: refused to write: tensor 'optimizer\.state\.0\.exp_avg' holds 1 non-finite"):
        save_state(path, state)
    assert not path.exists()
    digest, _ = ck._fingerprint(state)
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
