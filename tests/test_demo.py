"""The demo: its exact truth against independent references, the shipped checkpoint, quick runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import record_calls
from scipy import ndimage

from plasticine.checkpoint import load_translator
from plasticine.cli import main
from plasticine.core import jacobian_determinant
from plasticine.core.warp import compose
from plasticine.data import brainweb_slices
from plasticine.demo import QUICK, DemoConfig, enlargement_field, make_cohort, pd_lookup, run_demo, shipped_checkpoint
from plasticine.registration import PopulationRegistration

FIELDS = (
    "ventricle_dice",
    "ventricle_dice_identity",
    "endpoint_error",
    "endpoint_error_identity",
    "endpoint_error_changed",
    "landmark_error",
    "folding_fraction",
    "translation_mae",
    "translation_ssim",
    "per_subject",
    "goals_met",
    "seconds",
    "shape",
)


def test_pd_lookup_is_the_mean_pd_per_t1_value():
    d = brainweb_slices()
    table = pd_lookup(d["t1"], d["pd"])
    t1, pd = d["t1"].astype(int), d["pd"].astype(float)
    for t in np.unique(t1)[::7]:  # brute force on a subset of the values present
        assert table[t] == pytest.approx(pd[t1 == t].mean())
    assert table.shape == (256,) and np.isfinite(table).all()


def test_enlargement_field_is_a_diffeomorphism_that_enlarges_the_mask():
    mask = torch.zeros(1, 1, 40, 36)
    mask[:, :, 14:26, 15:21] = 1
    f = enlargement_field(mask, 2.5)
    assert float(f.velocity.norm(dim=1).max()) == pytest.approx(2.5)
    assert float(jacobian_determinant(f.forward).min()) > 0
    # exp(v) o exp(-v) = id up to the integration error
    assert float(compose(f.forward, f.inverse).norm(dim=1).max()) < 0.05
    grown = f.labels_to_target(mask.long(), 2)
    assert int(grown.sum()) > int(mask.sum()) and bool((grown >= mask.long()).all())
    with pytest.raises(ValueError, match="max_displacement"):
        enlargement_field(mask, 50.0)


def test_cohort_truth():
    cfg = DemoConfig(shape=(54, 45), enlargement=1.5, subject_displacement=2.0)
    c = make_cohort(cfg, 3, seed=5, include_real=True)
    d = brainweb_slices()
    # subject 0 is the real slice, resampled with antialiasing (compare with scipy's zoom, loosely)
    ref = ndimage.zoom(d["t1"] / 255.0, (54 / 217, 45 / 181), order=1)
    assert np.corrcoef(c.sources[0, 0].numpy().ravel(), ref.ravel())[0, 1] > 0.95
    assert c.targets.shape == c.sources.shape == (3, 1, 54, 45)
    assert float(c.targets.min()) >= 0 and float(c.targets.max()) <= 1
    # the truly enlarged masks are the source masks traced through phi_E, and larger
    assert torch.equal(c.target_masks[:1], c.field.labels_to_target(c.source_masks[:1], 2))
    assert bool((c.target_masks.sum((1, 2, 3)) > c.source_masks.sum((1, 2, 3))).all())
    # landmarks: phi_E^-1(p), so phi_E(target landmark) returns to p
    back = c.field.points_to_source(c.target_landmarks[:1].double())
    torch.testing.assert_close(back.float(), c.landmarks[:1], atol=0.05, rtol=0)


def test_shipped_checkpoint_loads_small():
    path = shipped_checkpoint()
    assert path.is_file(), f"the demo checkpoint {path} is missing from the package"
    assert path.stat().st_size < 2_500_000
    t = load_translator(path)
    assert set(t.components()) == {"structure", "registration", "denoiser", "schedule", "sampler", "conditioning"}


def test_shipped_checkpoint_is_the_unpaired_recipe_and_its_field_traces():
    from plasticine.demo import build_demo_translator

    t = load_translator(shipped_checkpoint())
    fresh = build_demo_translator(DemoConfig())
    for name in ("structure", "sampler", "conditioning", "schedule"):
        assert repr(getattr(t, name).config) == repr(getattr(fresh, name).config), name
    assert (t.start, t.start_fraction, t.data_range) == (fresh.start, fresh.start_fraction, fresh.data_range)
    assert isinstance(t.registration, PopulationRegistration) and bool(t.registration.fitted)
    # the one fitted field, applied to the test subjects (never seen in training), traces their
    # ventricles far better than no registration, against the exact truth
    cohort = make_cohort(DemoConfig(), 4, DemoConfig().seed + 1000, include_real=True)
    d = t.registration.register(cohort.sources)
    traced = d.labels_to_target(cohort.source_masks, 2)
    dice = lambda a, b: 2 * float((a.bool() & b.bool()).sum()) / float(a.sum() + b.sum())  # noqa: E731
    for i in range(4):
        assert dice(traced[i], cohort.target_masks[i]) > 0.9 > dice(cohort.source_masks[i], cohort.target_masks[i])


def test_demo_training_uses_no_paired_information(monkeypatch):
    from dataclasses import replace

    from plasticine import recipes
    from plasticine.demo import train_demo_translator

    calls = record_calls(monkeypatch, recipes, "train_translator")
    cfg = replace(QUICK, diffusion_iterations=1, train_subjects=4)
    cohort = make_cohort(cfg, 4, cfg.seed + 1, include_real=False)
    t = train_demo_translator(cfg, verbose=False, cohort=cohort)
    ((_, kwargs),) = calls
    assert kwargs.get("conditions") is None and not kwargs.get("paired", False)
    # the field is the fit of the population registration on the two sets, nothing else
    again = PopulationRegistration(cfg.shape)
    again.fit(cohort.sources, cohort.targets)
    assert torch.equal(again.forward_field, t.registration.forward_field) and torch.equal(again.inverse_field, t.registration.inverse_field)


def test_quick_demo_writes_metrics_and_outputs(tmp_path):
    m = run_demo(tmp_path / "demo", quick=True, verbose=False)
    doc = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    for key in FIELDS:
        assert key in doc and key in m
    assert doc["subjects"] == 1 and 0.0 <= doc["ventricle_dice"] <= 1.0 and doc["endpoint_error"] >= 0
    for name in ("subject0_translated.png", "subject0_deformation.npz", "subject0_mask_traced.png", "subject0_landmarks.json"):
        assert (tmp_path / "demo" / name).is_file()
    assert (tmp_path / "demo" / "summary.png").is_file() or doc["notes"]


def test_retrain_with_a_tiny_step_count(tmp_path):
    ckpt = tmp_path / "tiny.pt"
    code = main(["--threads", "1", "demo", "--retrain", "--quick", "--diffusion-steps", "1", "--registration-steps", "1", "--no-figures", "--output", str(tmp_path / "o"), "--checkpoint", str(ckpt)])
    assert code == 0
    doc = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert doc["retrained"] and doc["config"]["diffusion_iterations"] == 1 and doc["shape"] == list(QUICK.shape)
    t = load_translator(ckpt)
    assert t.denoiser.settings.cond_channels == 6  # the head mask (2 channels) and MIND-SSC (4 in 2D)
    assert isinstance(t.registration, PopulationRegistration) and bool(t.registration.fitted)


def test_retraining_is_deterministic_given_the_seed():
    from dataclasses import replace

    from plasticine.demo import train_demo_translator

    cfg = replace(QUICK, diffusion_iterations=2, registration_iterations=2, train_subjects=4)
    a = train_demo_translator(cfg, verbose=False).state_dict()
    b = train_demo_translator(cfg, verbose=False).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c = train_demo_translator(replace(cfg, seed=1), verbose=False).state_dict()
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_summary_figure_shows_every_subject(tmp_path):
    plt = pytest.importorskip("matplotlib.pyplot", reason="the plot extra (matplotlib) is not installed")
    from types import SimpleNamespace

    from plasticine.core import Deformation
    from plasticine.demo import _write_outputs

    n = 4
    c = make_cohort(DemoConfig(shape=(54, 45), enlargement=1.5, subject_displacement=2.0), n, seed=5, include_real=True)
    d = Deformation(c.field.forward.expand(n, -1, -1, -1).float(), c.field.inverse.expand(n, -1, -1, -1).float())
    result = SimpleNamespace(deformation=d, image=c.targets, points_to_target=d.points_to_target)
    metrics = {"per_subject": {"ventricle_dice": [1.0] * n, "endpoint_error": [0.0] * n}, "ventricle_dice": 1.0, "ventricle_dice_identity": 0.5, "endpoint_error": 0.0, "endpoint_error_identity": 1.0}
    assert _write_outputs(tmp_path, c, result, metrics, figures=True) == []
    rows_px = plt.imread(tmp_path / "summary.png").shape[0]
    assert rows_px == round(2.9 * n * 100), f"summary.png is {rows_px} px high: not one row per subject"


def test_the_demo_needs_no_optional_package(tmp_path):
    import subprocess
    import sys

    blocked = ("PIL", "nibabel", "pydicom", "matplotlib", "safetensors", "tqdm")
    code = (
        "import sys\n"
        f"for m in {blocked!r}: sys.modules[m] = None  # importing any of them now fails\n"
        "from plasticine.cli import main\n"
        f"sys.exit(main(['--threads', '1', 'demo', '--quick', '--output', {str(tmp_path / 'demo')!r}]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    doc = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert any("matplotlib" in note for note in doc["notes"]), doc["notes"]
    assert (tmp_path / "demo" / "subject0_translated.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_contrast_randomized_conditions_sharpen_the_unpaired_t1_to_pd_translation():
    """A small version of the T1 -> PD benchmark: conditioned on remapped targets' maps, the denoiser
    translates T1 maps closer to the true PD-like targets (SSIM in the brain) than trained on their own maps."""
    from dataclasses import replace

    from plasticine.metrics import ssim
    from plasticine.recipes import MR_CONTRAST_OPTIONS, TrainingRecipe, build_translator, train_translator
    from plasticine.training import ContrastRandomization

    shape = (40, 33)
    config = replace(DemoConfig(), shape=shape, enlargement=1.5, subject_displacement=2.0)
    train = make_cohort(config, 16, 1, include_real=False)
    test = make_cohort(config, 4, 0, include_real=True)
    scores = []
    for contrast in (None, ContrastRandomization(DemoConfig().contrast_knots)):
        t = build_translator(2, 1, **MR_CONTRAST_OPTIONS, registration="population", shape=shape, sampler_steps=10)
        train_translator(t, train.sources, train.targets, TrainingRecipe(diffusion_steps=300, batch_size=4, progress="none", contrast=contrast))
        result = t.translate(test.sources, generator=torch.Generator().manual_seed(0))
        assert float(result.image.min()) >= 0 and float(result.image.max()) <= 1
        scores.append(ssim(result.image, test.targets, 1.0, test.brain))
    own, randomized = scores
    assert bool(torch.all(randomized > own)), f"own maps {own.tolist()}, remapped {randomized.tolist()}"
    assert float(randomized.mean() - own.mean()) > 0.03
