"""Training: the two objectives against hand-assembled references, the batch order, exact resumption."""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch
from conftest import SpySchedule, make_generator
from test_translator import ShiftRegistration, make_translator, phantom

from plasticine.checkpoint import load_state
from plasticine.checkpoint import CheckpointError
from plasticine.diffusion import noise_prediction_loss
from plasticine.diffusion.unet import ConditionalUNet, UNetConfig
from plasticine.registration.network import registration_objective
from plasticine.training import ShuffledBatches, TrainConfig, Trainer, deformation_objective, diffusion_objective, noise_cue


def test_diffusion_objective_is_algorithm_2():
    """Condition = conditioning(structure(y)) of the target; the draws are those of noise_prediction_loss."""
    t = make_translator()
    y = phantom((10, 8), seed=3)
    loss = diffusion_objective(t, y, make_generator(11))
    ref = noise_prediction_loss(t.denoiser, t.schedule, y, t.structure(y), make_generator(11), "l1")
    assert torch.equal(loss, ref)
    loss.backward()
    assert all(p.grad is not None for p in t.denoiser.parameters())
    # an independent check of the draws: the same level and noise by hand
    g = make_generator(11)
    _, gamma = t.schedule.sample_gamma(2, g)
    noise = torch.randn(y.shape, generator=g)
    with torch.no_grad():
        eps = t.denoiser(t.schedule.diffuse(y, gamma, noise), gamma.float(), t.structure(y))
    assert torch.allclose(loss.detach(), (eps - noise).abs().mean(), atol=1e-6)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_training_uses_the_translator_s_data_range_and_the_sampler_s_parametrisation(prediction):
    """One mapping for training and sampling: the loss sees to_diffusion(y), in the sampler's parametrisation."""
    from plasticine.diffusion import DDIMSampler, split_prediction

    t = make_translator(sampler=DDIMSampler(steps=3, prediction=prediction), data_range=(0.0, 2.0))
    y = phantom((10, 8), seed=3)
    loss = diffusion_objective(t, y, make_generator(11), snr_gamma=5.0)
    ref = noise_prediction_loss(t.denoiser, t.schedule, y - 1.0, t.structure(y), make_generator(11), "l1", prediction=prediction, snr_gamma=5.0)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)
    # the cue is a noise estimate in every parametrisation, of the target in the diffusion's range
    g = make_generator(6)
    _, gamma = t.schedule.sample_gamma(2, g)
    noisy = t.schedule.diffuse(y - 1.0, gamma, torch.randn(y.shape, generator=g))
    with torch.no_grad():
        eps = split_prediction(t.denoiser(noisy, gamma.float(), t.structure(y)), noisy, gamma, prediction)[0]
    torch.testing.assert_close(noise_cue(t, y, make_generator(6)), eps, rtol=0, atol=1e-5)
    # a precomputed condition (the recipe's paired conditions) goes through the same mapping
    c = torch.rand(2, 2, 10, 8, generator=make_generator(12))
    given = diffusion_objective(t, y, make_generator(11), condition=c)
    ref = noise_prediction_loss(t.denoiser, t.schedule, y - 1.0, c, make_generator(11), "l1", prediction=prediction)
    torch.testing.assert_close(given, ref, rtol=1e-6, atol=0)


def test_noise_cue_draws_through_the_schedule_protocol():
    """The cue's level and noising come from the schedule's methods, not from its gammas."""
    t = make_translator()
    y = phantom((10, 8), seed=4)
    ref = noise_cue(t, y, make_generator(6))
    spy = SpySchedule(t.schedule)
    t = t.replace(schedule=spy)
    assert torch.equal(noise_cue(t, y, make_generator(6)), ref)
    assert spy.calls == ["sample_gamma", "diffuse"]


class _Wrapper(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.module, self.calls = inner, 0  # the attribute DistributedDataParallel uses

    def forward(self, *args):
        self.calls += 1
        return self.module(*args)


def test_deformation_objective_uses_the_noise_cue():
    t = make_translator()
    x, y = phantom((12, 12), seed=1), phantom((12, 12), seed=2)
    terms = deformation_objective(t, x, y, make_generator(5), smoothness_weight=0.5)
    assert set(terms) == {"total", "forward", "inverse", "smoothness", "align", "velocity"}
    g = make_generator(5)
    _, gamma = t.schedule.sample_gamma(2, g)
    noise = torch.randn(y.shape, generator=g)
    with torch.no_grad():
        cue = t.denoiser(t.schedule.diffuse(y, gamma, noise), gamma.float(), t.structure(y))
    assert torch.equal(noise_cue(t, y, make_generator(5)), cue)
    ref = registration_objective(t.registration.network, t.registration.integrator, x, y, cue, smoothness_weight=0.5)
    for k in terms:
        assert torch.allclose(terms[k], ref[k], atol=1e-6), k
    wrapped = _Wrapper(t.registration.network)  # e.g. a DistributedDataParallel wrapper: no .settings
    again = deformation_objective(t, x, y, make_generator(5), network=wrapped, smoothness_weight=0.5)
    assert torch.equal(again["total"], terms["total"]) and wrapped.calls == 1
    terms["total"].backward()
    assert all(p.grad is None for p in t.denoiser.parameters())  # the cue is detached
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in t.registration.network.parameters())


def test_deformation_objective_needs_a_learned_backend():
    t = make_translator(registration=ShiftRegistration((0.0, 1.0)))
    with pytest.raises(ValueError, match="no trainable network"):
        deformation_objective(t, phantom((8, 8)), phantom((8, 8)))
    with pytest.raises(ValueError, match="finite"):
        diffusion_objective(t, phantom((8, 8)) * float("nan"))


def test_shuffled_batches_order_and_shards():
    data = torch.arange(10.0)
    one = ShuffledBatches(data, 4, seed=3, rank=0, world_size=1)
    assert one.batches_per_epoch == 2
    epoch0 = torch.cat([next(one), next(one)])
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(3))
    assert torch.equal(epoch0, perm[:8].double().float())
    assert one.epoch == 1 and one.position == 0
    # two ranks with batch 2 see, together, the single process's batch of 4
    ranks = [ShuffledBatches(data, 2, seed=3, rank=r, world_size=2) for r in range(2)]
    single = ShuffledBatches(data, 4, seed=3, rank=0, world_size=1)
    for _ in range(5):
        both = torch.cat([next(ranks[0]), next(ranks[1])])
        assert torch.equal(both.sort().values, next(single).sort().values)
    state = ranks[0].state_dict()
    again = ShuffledBatches(data, 2, seed=3, rank=0, world_size=2)
    again.load_state_dict(state)
    assert torch.equal(next(again), next(ranks[0]))
    with pytest.raises(ValueError, match="seed"):
        ShuffledBatches(data, 2, seed=4, rank=0, world_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="at least"):
        ShuffledBatches(data, 6, rank=0, world_size=2)
    pairs = ShuffledBatches([(torch.zeros(2), torch.tensor(i)) for i in range(4)], 2, rank=0, world_size=1)
    a, b = next(pairs)
    assert a.shape == (2, 2) and b.shape == (2,)


def _diffusion_run(
    tmp_path,
    steps: int,
    *,
    stop_at: int | None = None,
    init_seed: int = 0,
    ema: float | None = 0.9,
    lr: float = 1e-3,
    images: tuple[int, ...] = (0, 1),
    unet: ConditionalUNet | None = None,
    **config,
):
    """A tiny denoiser trained with the diffusion objective; optionally interrupted before step ``stop_at``."""
    torch.manual_seed(init_seed)  # another seed gives another initialisation: the resumed run must not care
    t = make_translator() if unet is None else make_translator(denoiser=unet)
    t = t.replace(structure=lambda img: torch.cat([(img < 0.4).to(img.dtype), (img >= 0.4).to(img.dtype)], 1))
    data = ShuffledBatches(torch.cat([phantom((8, 8), batch=3, seed=s) for s in images]), 2, seed=1, rank=0, world_size=1)
    opt = torch.optim.Adam(t.denoiser.parameters(), lr=lr)
    calls = {"n": 0}

    def objective(model, y, g):
        calls["n"] += 1
        if stop_at is not None and calls["n"] == stop_at:
            raise KeyboardInterrupt
        return diffusion_objective(t, y, g, denoiser=model)

    config = {"checkpoint_every": 2, "progress": "none", "seed": 4, **config}
    cfg = TrainConfig(steps=steps, checkpoint_path=str(tmp_path / "train.pt"), ema_decay=ema, **config)
    trainer = Trainer(objective, t.denoiser, opt, data, cfg)
    return trainer


def test_resume_equals_uninterrupted(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    full = _diffusion_run(tmp_path / "a", 4)
    full.fit()
    broken = _diffusion_run(tmp_path / "b", 4, stop_at=4)
    with pytest.raises(KeyboardInterrupt):
        broken.fit()
    assert load_state(tmp_path / "b" / "train.pt")["step"] == 2
    resumed = _diffusion_run(tmp_path / "b", 4, init_seed=99)
    resumed.fit()
    assert resumed.step == full.step == 4
    for k, v in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v), k
    for k, v in full.ema.shadow.items():
        assert torch.equal(resumed.ema.shadow[k], v), k
    assert resumed.last == full.last
    assert torch.equal(resumed.generator.get_state(), full.generator.get_state())
    final = load_state(tmp_path / "b" / "train.pt")
    assert final["step"] == 4 and final["data"] == full.data.state_dict()


def test_trainer_precision_progress_and_errors(tmp_path, capsys):
    net = torch.nn.Linear(3, 1)
    data = ShuffledBatches(torch.randn(8, 3, generator=make_generator(0)), 4, rank=0, world_size=1)
    objective = lambda m, b, g: {"total": m(b).square().mean(), "extra": m(b).mean()}  # noqa: E731
    with pytest.raises(ValueError, match="CUDA"):
        Trainer(objective, net, torch.optim.SGD(net.parameters(), lr=0.1), data, TrainConfig(steps=2, precision="fp16"))
    tr = Trainer(objective, net, torch.optim.SGD(net.parameters(), lr=0.1), data, TrainConfig(steps=4, precision="bf16", progress="print", log_every=2))
    out = tr.fit()
    assert set(out) == {"total", "extra"} and tr.step == 4
    err = capsys.readouterr().err
    assert "train: step 2/4 loss" in err and "train: step 4/4 loss" in err
    if importlib.util.find_spec("tqdm") is not None:  # a bar instead of lines
        more = Trainer(objective, net, torch.optim.SGD(net.parameters(), lr=0.1), data, TrainConfig(steps=2, progress="tqdm"))
        assert more.fit()["total"] >= 0 and "step" not in capsys.readouterr().err
    bad = Trainer(lambda m, b, g: m(b).sum() * float("inf"), net, torch.optim.SGD(net.parameters(), lr=0.1), data, TrainConfig(steps=1, progress="none"))
    with pytest.raises(FloatingPointError, match="step 1"):
        bad.fit()
    with pytest.raises(ValueError, match="resumable"):
        Trainer(objective, net, torch.optim.SGD(net.parameters(), lr=0.1), iter([]), TrainConfig(steps=1, checkpoint_path=str(tmp_path / "c.pt")))
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    # a checkpoint of another world size is not resumed silently
    tr.save_checkpoint(tmp_path / "c.pt")
    state = load_state(tmp_path / "c.pt")
    state["world_size"] = 2
    with pytest.raises(ValueError, match="2 process"):
        tr.load_state_dict(state)
    assert dataclasses.asdict(tr.settings) == load_state(tmp_path / "c.pt")["config"]


def test_two_stages_then_save_and_translate(tmp_path):
    """The paper's recipe: train the denoiser, then the registration network with its cue; save; translate."""
    t = make_translator()
    x = torch.cat([phantom((8, 8), batch=2, seed=s) for s in range(2)])
    y = 1.0 - x  # another contrast of the same anatomy (unpaired in the order below)
    cfg = TrainConfig(steps=2, progress="none")
    dm = Trainer(lambda m, b, g: diffusion_objective(t, b, g, denoiser=m), t.denoiser, torch.optim.Adam(t.denoiser.parameters(), 1e-3), ShuffledBatches(y, 2, rank=0, world_size=1), cfg)
    dm.fit()
    t.denoiser.eval()
    before = {k: v.clone() for k, v in t.registration.network.state_dict().items()}
    net = t.registration.network
    reg = Trainer(
        lambda m, b, g: deformation_objective(t, b[0], b[1], g, network=m),
        net,
        torch.optim.Adam(net.parameters(), 1e-3),
        ShuffledBatches(list(zip(x, y.flip(0))), 2, rank=0, world_size=1),
        cfg,
    )
    terms = reg.fit()
    assert set(terms) == {"total", "forward", "inverse", "smoothness", "align"}
    assert any(not torch.equal(before[k], v) for k, v in net.state_dict().items())
    from plasticine.checkpoint import load_translator, save_component

    save_component(t, tmp_path / "t.safetensors")
    u = load_translator(tmp_path / "t.safetensors")
    t.eval()
    a = t.translate(x[:1], start_step=10, generator=make_generator(0))
    b = u.translate(x[:1], start_step=10, generator=make_generator(0))
    assert torch.equal(a.image, b.image)


def test_progress_names_the_stage(capsys):
    net = torch.nn.Linear(3, 1)
    data = ShuffledBatches(torch.randn(8, 3, generator=make_generator(0)), 4, rank=0, world_size=1)
    objective = lambda m, b, g: m(b).square().mean()  # noqa: E731
    Trainer(objective, net, torch.optim.SGD(net.parameters(), lr=0.1), data, TrainConfig(steps=2, progress="print", log_every=1, name="denoiser")).fit()
    lines = capsys.readouterr().err.splitlines()
    assert lines and all(line.startswith("denoiser: step ") for line in lines), lines
    if importlib.util.find_spec("tqdm") is not None:
        Trainer(objective, net, torch.optim.SGD(net.parameters(), lr=0.1), data, TrainConfig(steps=2, progress="tqdm", name="registration")).fit()
        assert "registration" in capsys.readouterr().err
    for bad in ("", "two\nlines", 3):
        with pytest.raises(ValueError, match="TrainConfig.name"):
            TrainConfig(steps=1, name=bad)


@pytest.fixture
def saved_run(tmp_path):
    """A checkpoint after 2 of 4 steps of :func:`_diffusion_run` with its defaults."""
    run = _diffusion_run(tmp_path, 2)
    run.fit()
    return tmp_path


SMALL_UNET = dict(cond_channels=2, base_channels=4, channel_mults=(1,), attention_levels=(), norm_groups=4)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"lr": 2e-3}, "optimizer lr is 0.001 in the checkpoint, 0.002 in this run"),
        ({"images": (0, 2)}, "data_sha256 is '[0-9a-f]{64}' in the saved state, '[0-9a-f]{64}' in this source"),
        ({"images": (0, 1, 2)}, "items is 6 in the saved state, 9 in this source"),
        ({"seed": 7}, "TrainConfig.seed is 4 in the checkpoint, 7 in this run"),
        ({"ema": 0.5}, "TrainConfig.ema_decay is 0.9 in the checkpoint, 0.5 in this run"),
        ({"grad_clip": 1.0}, "TrainConfig.grad_clip is None in the checkpoint, 1.0 in this run"),
        ({"precision": "bf16"}, "precision is 'fp32' in the checkpoint, 'bf16' in this run"),
        ({"unet": ConditionalUNet(UNetConfig(**SMALL_UNET))}, "model config.base_channels is 8 in the checkpoint, 4 in this run"),
        ({"steps": 1}, "the checkpoint is at step 2, beyond TrainConfig.steps 1"),
    ],
    ids=["lr", "data", "items", "seed", "ema", "grad_clip", "precision", "model", "steps"],
)
def test_resume_refuses_changed_settings(saved_run, change, message):
    """Every setting that changes the result is refused on resume, naming it, the saved and the new value."""
    before = load_state(saved_run / "train.pt")
    kw = {"steps": 4, **change}
    run = _diffusion_run(saved_run, kw.pop("steps"), **kw)
    weights = {k: v.clone() for k, v in run.model.state_dict().items()}
    with pytest.raises(CheckpointError, match=rf"train\.pt: .*{message}") as info:
        run.fit()
    assert "\n" not in str(info.value)
    assert run.step == 0 and all(torch.equal(v, run.model.state_dict()[k]) for k, v in weights.items())  # nothing restored
    assert load_state(saved_run / "train.pt")["step"] == before["step"] == 2  # the checkpoint is untouched


def test_resume_allows_more_steps_and_cosmetic_changes(saved_run, capsys):
    run = _diffusion_run(saved_run, 3, checkpoint_every=0, progress="print", log_every=1, name="denoiser")
    run.fit()
    assert run.step == 3
    err = capsys.readouterr().err
    assert "denoiser: resuming from" in err and "denoiser: step 3/3" in err


# -- augmentation ---------------------------------------------------------------------------------


def test_augmentation_flip_alone_is_the_mirror_image():
    from plasticine.training import Augmentation

    x = torch.rand(2, 1, 9, 7, generator=make_generator(0))
    flip = Augmentation(flip=1.0, degrees=0.0, translate=0.0, scale=(1.0, 1.0), intensity=0.0)
    (y,) = flip(x, make_generator(1))
    torch.testing.assert_close(y, torch.flip(x, [-1]), atol=1e-5, rtol=0)
    x3 = torch.rand(1, 1, 5, 6, 7, generator=make_generator(2))
    torch.testing.assert_close(flip(x3, make_generator(1))[0], torch.flip(x3, [-1]), atol=1e-5, rtol=0)


def test_augmentation_is_reproducible_keeps_maps_aligned_and_leaves_global_state():
    from plasticine.training import Augmentation

    aug = Augmentation(intensity=0.2)
    x = torch.rand(3, 1, 16, 12, generator=make_generator(0))
    c = torch.rand(3, 4, 16, 12, generator=make_generator(1))
    state = torch.random.get_rng_state()
    y, cc = aug(x, make_generator(5), (c,))
    assert torch.equal(state, torch.random.get_rng_state()), "the global generator was used"
    y2, cc2 = aug(x, make_generator(5), (c,))
    assert torch.equal(y, y2) and torch.equal(cc, cc2)
    assert not torch.allclose(y, aug(x, make_generator(6))[0])
    # an aligned copy of the image gets the same geometry: the image is a gain and offset of it
    y, z = aug(x, make_generator(7), (x,))
    for i in range(3):
        a = torch.stack([z[i].flatten(), torch.ones(z[i].numel())], 1)
        fit = torch.linalg.lstsq(a, y[i].flatten()[:, None]).solution
        assert float((a @ fit - y[i].flatten()[:, None]).abs().max()) < 1e-5
        assert abs(float(fit[0]) - 1) <= 0.2 + 1e-6 and abs(float(fit[1])) <= 0.2 + 1e-6


@settings(deadline=None)
@given(
    knots=st.integers(2, 9),
    keep=st.sampled_from([0.0, 0.5]),
    floor=st.floats(0.0, 0.5),
    lo=st.floats(-2.0, 1.0),
    width=st.floats(0.5, 3.0),
    seed=st.integers(0, 2**16),
)
def test_contrast_randomization_is_the_piecewise_linear_curve_through_its_knots(knots, keep, floor, lo, width, seed):
    """Against numpy's interpolation on the range, the end segments extended linearly outside it."""
    import numpy as np

    from plasticine.training import ContrastRandomization

    cr = ContrastRandomization(knots, keep, floor)
    g = make_generator(seed)
    w = cr.draw(3, g)
    assert w.shape == (3, knots) and torch.all(w[:, 0] == 0)
    identity = torch.linspace(0, 1, knots, dtype=torch.float64)
    for row in w:
        assert torch.equal(row, identity) or bool(torch.all((row[1:] >= floor) & (row[1:] <= 1)))
    hi = lo + width
    x = lo + (torch.rand(3, 1, 7, 5, generator=make_generator(seed + 1), dtype=torch.float64) * 1.4 - 0.2) * width
    out = cr.apply(x, w, (lo, hi))
    grid = np.linspace(0, 1, knots)
    for i in range(3):
        v = ((x[i] - lo) / width).numpy().ravel()
        wi = w[i].numpy()
        ref = np.interp(v, grid, wi)
        below, above = v < 0, v > 1
        ref[below] = wi[0] + (wi[1] - wi[0]) * v[below] * (knots - 1)
        ref[above] = wi[-1] + (wi[-1] - wi[-2]) * (v[above] - 1) * (knots - 1)
        np.testing.assert_allclose(out[i].numpy().ravel(), lo + width * ref, rtol=0, atol=1e-9)
    # the call draws what draw() draws, and keep = 1 is the identity
    torch.testing.assert_close(cr(x, make_generator(seed), (lo, hi)), out, rtol=0, atol=0)
    torch.testing.assert_close(ContrastRandomization(knots, 1.0, floor)(x, g, (lo, hi)), x, rtol=0, atol=1e-12)


def test_contrast_randomization_draws_non_monotone_curves_per_image_from_the_generator():
    from plasticine.training import ContrastRandomization

    cr = ContrastRandomization(keep=0.0)
    state = torch.random.get_rng_state()
    w = cr.draw(64, make_generator(3))
    assert torch.equal(state, torch.random.get_rng_state()), "the global generator was used"
    assert torch.equal(w, cr.draw(64, make_generator(3))) and not torch.equal(w, cr.draw(64, make_generator(4)))
    steps = w.diff(dim=1)
    assert bool(((steps > 0).any(1) & (steps < 0).any(1)).any()), "no draw inverts part of the range"
    assert len({tuple(r.tolist()) for r in w}) == 64
    # keep=0.5 keeps about half the images as they are
    kept = (ContrastRandomization(keep=0.5).draw(400, make_generator(5)) == torch.linspace(0, 1, 12, dtype=torch.float64)).all(1)
    assert 150 < int(kept.sum()) < 250


def test_contrast_randomization_refuses_bad_settings_and_shapes():
    from plasticine.training import ContrastRandomization

    for kwargs, name in (({"knots": 1}, "knots"), ({"keep": 1.5}, "keep"), ({"floor": 1.0}, "floor"), ({"floor": -0.1}, "floor")):
        with pytest.raises(ValueError, match=f"ContrastRandomization.{name}"):
            ContrastRandomization(**kwargs)
    cr = ContrastRandomization()
    with pytest.raises(ValueError, match="values"):
        cr.apply(torch.rand(2, 1, 4, 4), torch.zeros(3, cr.knots), (0, 1))
    with pytest.raises(ValueError, match="data_range"):
        cr.apply(torch.rand(2, 1, 4, 4), torch.zeros(2, cr.knots), (1, 1))
    with pytest.raises(ValueError, match="images"):
        cr(torch.rand(4, 4))


def test_augmentation_refuses_bad_settings_and_shapes():
    from plasticine.training import Augmentation

    with pytest.raises(ValueError, match="Augmentation.flip"):
        Augmentation(flip=1.5)
    with pytest.raises(ValueError, match="Augmentation.scale"):
        Augmentation(scale=(1.1, 0.9))
    with pytest.raises(ValueError, match=r"aligned\[0\]"):
        Augmentation()(torch.rand(2, 1, 8, 8), None, (torch.rand(3, 1, 8, 8),))
