"""TraceableTranslator: Algorithm 1 wiring, output shapes and conventions in 2D and 3D, swappable parts, bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_generator
from hypothesis import given, settings
from hypothesis import strategies as st

from plasticine.core import Deformation, warp
from plasticine.diffusion import AncestralSampler, DDIMSampler, DPMSolverPP, LinearSchedule, noise_like
from plasticine.diffusion.conditioning import ConcatConditioning
from plasticine.diffusion.unet import ConditionalUNet, UNetConfig
from plasticine.registration.iterative import IterativeRegistration
from plasticine.registration.network import LearnedRegistration, RegistrationNet, RegistrationNetConfig
from plasticine.segmentation import KMeansExtractor, MultiOtsuExtractor, PottsExtractor
from plasticine.translator import TraceableTranslator, TranslationResult

K = 50


def tiny_unet(ndim: int, labels: int = 2) -> ConditionalUNet:
    return ConditionalUNet(UNetConfig(ndim=ndim, cond_channels=labels, base_channels=8, channel_mults=(1,), attention_levels=(), norm_groups=4))


def tiny_registration(ndim: int) -> LearnedRegistration:
    cfg = RegistrationNetConfig(spatial_dims=ndim, features=4, encoder=(4, 4), align_channels=4, align_layers=1)
    net = RegistrationNet(cfg)
    with torch.no_grad():  # a visible deformation, not the near-identity of a fresh head
        net.head.weight.normal_(0.0, 0.05, generator=make_generator(7))
    return LearnedRegistration(net)


def make_translator(ndim: int = 2, **parts) -> TraceableTranslator:
    torch.manual_seed(0)
    kw = dict(
        structure=KMeansExtractor(2),
        registration=tiny_registration(ndim),
        denoiser=tiny_unet(ndim),
        schedule=LinearSchedule(1e-4, 0.05, num_steps=K),
        sampler=DDIMSampler(steps=3),
        conditioning=ConcatConditioning(2),
    )
    kw.update(parts)
    return TraceableTranslator(**kw)


def phantom(shape: tuple[int, ...], batch: int = 2, seed: int = 0) -> torch.Tensor:
    """Bright block on a dark background with a little noise."""
    x = 0.05 * torch.rand(batch, 1, *shape, generator=make_generator(seed))
    inner = tuple(slice(s // 4, 3 * s // 4) for s in shape)
    x[(slice(None), slice(None)) + inner] += 0.8
    return x


class ShiftRegistration:
    """A backend with a known answer: phi(p) = p + shift (a constant displacement)."""

    def __init__(self, shift: tuple[float, ...]):
        self.shift = shift
        self.calls: list[tuple[torch.Tensor, torch.Tensor | None]] = []

    def register(self, source, target=None, *, cue=None):
        self.calls.append((source, target))
        B, n, shape = source.shape[0], len(self.shift), source.shape[2:]
        u = torch.tensor(self.shift, dtype=source.dtype).view(1, n, *([1] * n)).expand(B, n, *shape).clone()
        return Deformation(u, -u)


class RecordingDenoiser(torch.nn.Module):
    """Wraps a denoiser and keeps every condition it received."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.conditions = inner, []

    def forward(self, noisy, gamma, condition):
        self.conditions.append(condition)
        return self.inner(noisy, gamma, condition)


@pytest.mark.parametrize("shape", [(12, 10), (8, 6, 7)], ids=["2d", "3d"])
def test_shapes_and_defaults(shape):
    ndim = len(shape)
    t = make_translator(ndim)
    x = phantom(shape)
    r = t.translate(x, generator=make_generator(1))
    assert isinstance(r, TranslationResult)
    assert r.image.shape == x.shape and r.image.dtype == x.dtype
    assert r.samples.shape == (1, *x.shape) and r.num_samples == 1
    assert torch.equal(r.image, r.samples[0]) and torch.equal(r.std, torch.zeros_like(x))
    assert r.deformation.forward.shape == (2, ndim, *shape) and r.deformation.inverse.shape == (2, ndim, *shape)
    assert r.source_structure.shape == (2, 2, *shape) and r.warped_structure.shape == (2, 2, *shape)
    assert torch.equal(r.source_structure.sum(1), torch.ones(2, *shape))  # one-hot
    assert r.start_step == t.default_start_step == K // 2
    assert bool(torch.isfinite(r.image).all()) and not r.image.requires_grad
    # the warped structure is x_s o phi, the deformation that the backend returned
    assert torch.allclose(r.warped_structure, warp(r.source_structure, r.deformation.forward), atol=1e-6)
    assert r.deformation.forward.abs().max() > 1e-3  # the check above is not the identity


def test_start_step_zero_is_the_source():
    """k0 = 0: q(x_0 | x) is x itself and the plan has no step."""
    t = make_translator()
    x = phantom((10, 9))
    r = t.translate(x, start_step=0, num_samples=2, generator=make_generator(0))
    assert torch.equal(r.image, x) and torch.equal(r.samples[1], x) and r.start_step == 0


def test_the_translator_noises_the_start_with_its_schedule():
    """translate draws the noise first, makes x_k0 = schedule.q_sample(x, k0, noise), and samples from (x_k0, k0)."""
    t = make_translator(sampler=AncestralSampler(steps=4))  # stochastic steps: the order of the draws matters
    x = phantom((10, 9))
    r = t.translate(x, start_step=20, num_samples=2, generator=make_generator(4))
    g = make_generator(4)
    with torch.no_grad():
        clean = x.repeat(2, 1, 1, 1)
        start = t.schedule.q_sample(clean, 20, noise_like(clean, g))
        cond = t.conditioning(r.warped_structure).repeat(2, 1, 1, 1)
        out = t.sampler.sample(t.denoiser, t.schedule, cond, start, 20, g)
    assert torch.equal(r.samples, out.reshape(2, *x.shape))


def test_condition_is_the_warped_structure_and_conventions():
    """With phi(p) = p + (0, 2): x_s o phi(i, j) = x_s(i, j + 2); points move by -2; labels trace back."""
    rec = RecordingDenoiser(tiny_unet(2))
    backend = ShiftRegistration((0.0, 2.0))
    t = make_translator(2, registration=backend, denoiser=rec)
    x = phantom((8, 12), batch=1)
    r = t.translate(x, start_step=10, num_samples=2, generator=make_generator(3))
    xs = r.source_structure
    assert torch.equal(r.warped_structure[..., :, :-2], xs[..., :, 2:])
    assert torch.equal(r.warped_structure[..., :, -2:], xs[..., :, -1:].expand(-1, -1, -1, 2))  # border padding
    assert len(backend.calls) == 1 and backend.calls[0][1] is None  # source only
    cond = rec.conditions[0]
    assert cond.shape == (2, 2, 8, 12)  # both draws in one batch
    assert torch.equal(cond[0], r.warped_structure[0]) and torch.equal(cond[1], r.warped_structure[0])
    p = torch.tensor([[[3.0, 5.0], [1.5, 7.25]]])
    assert torch.allclose(r.deformation.points_to_target(p), p - torch.tensor([0.0, 2.0]))
    assert torch.allclose(r.deformation.points_to_source(r.deformation.points_to_target(p)), p)
    mask = torch.zeros(1, 1, 8, 12, dtype=torch.long)
    mask[..., 2:6, 4:8] = 1
    back = r.deformation.labels_to_source(mask, num_classes=2)
    assert torch.equal(back[..., 2:6, 6:10], torch.ones(1, 1, 4, 4, dtype=torch.long)) and int(back.sum()) == 16
    soft = r.deformation.to_source(mask.double())
    assert torch.allclose(soft[..., :, 2:], mask.double()[..., :, :-2])
    assert torch.allclose(r.deformation.to_target(soft)[..., :, 4:8], mask.double()[..., :, 4:8])


SHARED = make_translator()


@settings(max_examples=5)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(2, 3))
def test_samples_mean_and_std(seed, n):
    t = SHARED
    x = phantom((8, 8), batch=2, seed=seed % 1000)
    r = t.translate(x, start_step=20, num_samples=n, generator=make_generator(seed))
    s = r.samples.numpy()
    assert r.samples.shape == (n, 2, 1, 8, 8)
    np.testing.assert_allclose(r.image.numpy(), s.mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(r.std.numpy(), s.std(0), rtol=1e-5, atol=1e-6)
    assert not torch.equal(r.samples[0], r.samples[1])  # independent draws


def test_same_seed_same_output():
    t = SHARED
    x = phantom((9, 11))
    a = t.translate(x, generator=make_generator(5)).image
    b = t.translate(x, generator=make_generator(5)).image
    c = t.translate(x, generator=make_generator(6)).image
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize(
    "sampler", [AncestralSampler(steps=3), DDIMSampler(steps=3, eta=0.5), DPMSolverPP(steps=3)], ids=["ancestral", "ddim", "dpm"]
)
def test_swap_sampler(sampler):
    t = make_translator(sampler=sampler)
    r = t.translate(phantom((10, 10)), start_step=30, generator=make_generator(0))
    assert r.image.shape == (2, 1, 10, 10) and bool(torch.isfinite(r.image).all())


@pytest.mark.parametrize("structure", [MultiOtsuExtractor(3), PottsExtractor(3, max_iter=20), KMeansExtractor(3)], ids=["otsu", "potts", "kmeans"])
def test_swap_structure_extractor(structure):
    batch = 2
    t = make_translator(structure=structure, denoiser=tiny_unet(2, labels=3), conditioning=ConcatConditioning(3))
    r = t.translate(phantom((12, 12), batch=batch), start_step=10, generator=make_generator(0))
    assert r.source_structure.shape == (batch, 3, 12, 12) and r.image.shape == (batch, 1, 12, 12)
    assert torch.equal(r.source_structure, structure(phantom((12, 12), batch=batch)))


def test_swap_registration_backend_needing_a_target():
    backend = IterativeRegistration(levels=(1,), iterations=(3,))
    t = make_translator(registration=backend)
    x, y = phantom((12, 12), seed=0), phantom((12, 12), seed=1)
    with pytest.raises(ValueError, match="needs a target"):
        t.translate(x)
    r = t.translate(x, target=y, start_step=10, generator=make_generator(0))
    assert r.deformation.forward.shape == (2, 2, 12, 12) and r.image.shape == x.shape


def test_bad_inputs():
    t = SHARED
    x = phantom((8, 8))
    with pytest.raises(ValueError, match=r"expected shape \(B, C, \*S\)"):
        t.translate(x[0, 0])
    bad = x.clone()
    bad[0, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        t.translate(bad)
    with pytest.raises(ValueError, match="floating"):
        t.translate((x * 10).long())
    with pytest.raises(ValueError, match="num_samples"):
        t.translate(x, num_samples=0)
    with pytest.raises(ValueError, match="start_step"):
        t.translate(x, start_step=K + 1)
    with pytest.raises(ValueError, match="start_step"):
        t.translate(x, start_step=2.5)
    with pytest.raises(ValueError, match="target"):
        t.translate(x, target=phantom((8, 9)))
    with pytest.raises(ValueError, match="string"):
        make_translator(sampler="ddim")
    with pytest.raises(ValueError, match="start_fraction"):
        TraceableTranslator(**make_translator().components(), start_fraction=1.5)


def test_state_dict_and_replace():
    """The translator is an nn.Module: its learned parts are submodules, state_dict/eval/to are torch's."""
    t = make_translator()
    assert isinstance(t, torch.nn.Module)
    for name in ("modules", "state_dict", "load_state_dict", "to", "train", "eval"):  # not re-implemented
        assert getattr(TraceableTranslator, name) is getattr(torch.nn.Module, name), name
    assert {name for name, _ in t.named_children()} == {"structure", "registration", "denoiser", "conditioning"}
    assert dict(t.named_modules())["registration.network"] is t.registration.network
    sd = t.state_dict()
    assert any(k.startswith("registration.network.") for k in sd) and any(k.startswith("denoiser.") for k in sd)
    assert set(sd) == {f"registration.{k}" for k in t.registration.state_dict()} | {f"denoiser.{k}" for k in t.denoiser.state_dict()}
    assert t.eval() is t and not t.denoiser.training and not t.registration.network.training
    other = make_translator()
    with torch.no_grad():
        for p in other.denoiser.parameters():
            p.add_(1.0)
    other.load_state_dict(sd)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in sd.items())
    with pytest.raises(RuntimeError, match="Missing key"):
        other.load_state_dict({k: v for k, v in sd.items() if not k.startswith("denoiser.")})
    r = t.replace(sampler=DPMSolverPP(steps=2))
    assert r.denoiser is t.denoiser and isinstance(r.sampler, DPMSolverPP) and isinstance(t.sampler, DDIMSampler)
    assert r.config["sampler"] is r.sampler and r.config["denoiser"] is t.denoiser and r.config["start_fraction"] == t.start_fraction


def test_parts_are_read_only_once_built():
    """A part assigned after construction would leave the recorded config (what save writes) stale."""
    t = make_translator()
    with pytest.raises(AttributeError, match=r"^TraceableTranslator\.sampler: a constructor argument, read-only once built"):
        t.sampler = DPMSolverPP(steps=2)
    with pytest.raises(AttributeError, match="read-only"):
        t.start_fraction = 0.1
    assert isinstance(t.sampler, DDIMSampler) and t.config["sampler"] is t.sampler


def test_parts_are_checked_against_the_protocols():
    for name, bad in (("registration", object()), ("schedule", DDIMSampler(steps=2)), ("sampler", LinearSchedule(num_steps=5))):
        with pytest.raises(ValueError, match=rf"^{name}: expected an object satisfying the \w+ protocol of plasticine.core"):
            make_translator(**{name: bad})


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64, torch.bfloat16])
def test_input_dtype_other_than_the_weights_is_refused_clearly(dtype):
    # float16/float64 input failed inside a convolution
    x = phantom((8, 8)).to(dtype)
    with pytest.raises(ValueError, match=rf"^x: expected dtype torch.float32 \(the dtype of the translator's weights\), got {dtype}"):
        SHARED.translate(x)
    with pytest.raises(ValueError, match=r"^target: expected the dtype and device of x"):
        make_translator(registration=IterativeRegistration(levels=(1,), iterations=(1,))).translate(phantom((8, 8)), target=x)


def test_translator_in_float64_takes_float64_images():
    t = make_translator().to(torch.float64)
    r = t.translate(phantom((8, 8)).double(), start_step=5, generator=make_generator(0))
    assert r.image.dtype == torch.float64 and r.deformation.forward.dtype == torch.float64


def _poisoned(part: str) -> TraceableTranslator:
    t = make_translator()
    if part == "denoiser":
        with torch.no_grad():
            next(t.denoiser.parameters()).fill_(float("nan"))
    elif part == "registration":
        with torch.no_grad():
            t.registration.network.head.weight.fill_(float("inf"))
    elif part == "structure":
        t = t.replace(structure=lambda x: torch.full((x.shape[0], 2, *x.shape[2:]), float("nan")))
    else:
        t = t.replace(conditioning=lambda s: s * float("nan"))
    return t


@pytest.mark.parametrize(
    "part,message",
    [
        ("denoiser", r"^translate: the samples from DDIMSampler: expected finite values, found \d+ NaN or infinite value\(s\) .*\(the denoiser ConditionalUNet diverged or holds non-finite weights\)$"),
        ("registration", r"^translate: the registration \(LearnedRegistration\) produced a non-finite deformation: (forward|inverse|velocity): expected finite values"),
        ("structure", r"^translate: the structure map from function: expected finite values"),
        ("conditioning", r"^translate: the condition from function: expected finite values"),
    ],
    ids=["denoiser", "registration", "structure", "conditioning"],
)
def test_non_finite_outputs_raise_naming_the_part(part, message):
    # a diverged part gave an all-NaN result that was returned (and written) as success
    from plasticine.core import NonFiniteError

    with pytest.raises(NonFiniteError, match=message):
        _poisoned(part).translate(phantom((8, 8)), start_step=5, generator=make_generator(0))


def test_empty_batch_is_refused():
    with pytest.raises(ValueError, match=r"^x: expected shape \(B, C, \*S\), got \(0, 1, 8, 8\): an empty batch \(B = 0\)"):
        SHARED.translate(torch.zeros(0, 1, 8, 8))


# -- the start's geometry and the diffusion's data range --------------------------------------------


class RecordingSampler:
    """A Sampler that keeps its start and returns it unchanged (so translate returns the mapped-back start)."""

    def __init__(self):
        self.starts: list[tuple[torch.Tensor, int]] = []

    def sample(self, denoiser, schedule, condition, start, start_step, generator=None):
        self.starts.append((start.clone(), start_step))
        return start


@pytest.mark.parametrize("start", ["source", "warped"])
def test_the_start_is_the_noised_source_or_the_noised_warped_source(start):
    """start="warped": the sampler starts from q(x_k0 | x o phi), the condition's geometry; "source": from q(x_k0 | x)."""
    shift = (2.0, -1.0)
    rec = RecordingSampler()
    t = make_translator(registration=ShiftRegistration(shift), sampler=rec, start=start)
    assert t.config["start"] == start
    x = phantom((12, 10))
    r = t.translate(x, start_step=20, num_samples=2, generator=make_generator(5))
    (got, k0), = rec.starts
    assert k0 == 20
    origin = x if start == "source" else x.clone()
    if start == "warped":  # x o phi by hand: out(p) = x(p + shift), border padding
        idx = [torch.arange(s).add(int(d)).clamp(0, s - 1) for s, d in zip(x.shape[2:], shift)]
        origin = x[:, :, idx[0]][:, :, :, idx[1]]
        assert torch.allclose(origin, r.deformation.to_target(x), atol=1e-6)
        assert not torch.allclose(origin, x)
    clean = origin.repeat(2, 1, 1, 1)
    g = make_generator(5)
    want = t.schedule.q_sample(clean, 20, noise_like(clean, g))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_the_default_start_is_the_paper_s_and_replace_keeps_the_options():
    t = make_translator()
    assert t.start == "source" and t.data_range is None and t.config["start"] == "source" and t.config["data_range"] is None
    u = make_translator(start="warped", data_range=(0.0, 2.0)).replace(sampler=DDIMSampler(steps=2))
    assert u.start == "warped" and u.data_range == (0.0, 2.0) and "start='warped'" in repr(u)


def test_data_range_maps_into_minus_one_one_and_back():
    """data_range=(l, h): the sampler sees 2 (x - l) / (h - l) - 1, translate returns the inverse of what it produced."""
    rec = RecordingSampler()
    t = make_translator(sampler=rec, data_range=(0.0, 2.0))
    x = phantom((10, 9))
    assert torch.equal(t.to_diffusion(torch.tensor([0.0, 1.0, 2.0, 3.0])), torch.tensor([-1.0, 0.0, 1.0, 2.0]))  # not clamped
    torch.testing.assert_close(t.from_diffusion(t.to_diffusion(x)), x, rtol=0, atol=1e-6)
    r = t.translate(x, start_step=10, generator=make_generator(6))
    (got, _), = rec.starts
    g = make_generator(6)
    want = t.schedule.q_sample(x - 1.0, 10, noise_like(x, g))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(r.image, (got + 1.0), rtol=0, atol=1e-6)  # from_diffusion of the sample
    plain = make_translator(sampler=RecordingSampler())
    assert plain.to_diffusion(x) is x and plain.from_diffusion(x) is x


def test_bad_start_and_data_range_give_one_line_errors():
    for kwargs, what in (
        ({"start": "target"}, "start: expected one of"),
        ({"data_range": (1.0, 0.0)}, "data_range: expected low < high"),
        ({"data_range": (0.0,)}, "data_range: expected None or a"),
        ({"data_range": (0.0, float("inf"))}, "data_range"),
    ):
        with pytest.raises(ValueError, match=what) as err:
            make_translator(**kwargs)
        assert "\n" not in str(err.value)
