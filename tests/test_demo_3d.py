"""``plasticine demo --3d``: the Colin27 task, its geometry, a tiny run, and the message without the data."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from plasticine.cli import main
from plasticine.data.system import MRICRON_DIR
from plasticine.demo import DEMO_3D, _dice, build_demo_translator, make_cohort_3d, run_demo_3d

nib = pytest.importorskip("nibabel", reason="the io extra (nibabel) is not installed")
needs_colin = pytest.mark.skipif(not (MRICRON_DIR / "ch2bet.nii.gz").exists(), reason="Colin27 needs Debian's mricron-data (apt-get install mricron-data)")

TINY = replace(DEMO_3D, train_subjects=2, test_subjects=1, diffusion_iterations=1, registration_iterations=1, sampler_steps=2)


@needs_colin
def test_the_3d_task_has_exact_truth_on_the_colin27_grid():
    cohort, affine = make_cohort_3d(replace(DEMO_3D, test_subjects=2), 2, seed=5, include_real=True)
    assert cohort.sources.shape == (2, 1, 28, 35, 28) and cohort.field.forward.shape == (1, 3, 28, 35, 28)
    # the coarse grid covers the 1 mm volume: the centres of both grids are one world point
    fine = nib.load(MRICRON_DIR / "ch2bet.nii.gz")
    centre = lambda a, shape: a[:3, :3] @ ((np.array(shape) - 1) / 2) + a[:3, 3]  # noqa: E731
    np.testing.assert_allclose(centre(affine, (28, 35, 28)), centre(fine.affine, fine.shape), atol=1e-9)
    np.testing.assert_allclose(np.linalg.norm(affine[:3, :3], axis=0), np.array(fine.shape) / (28, 35, 28))
    # subject 0 is the volume itself; the ventricles are inside the brain and grow in the target
    vent, brain = cohort.source_masks[0, 0].bool(), cohort.brain[0, 0]
    assert 5 < int(vent.sum()) and bool(brain[vent].all())
    assert int(cohort.target_masks[0].sum()) > int(cohort.source_masks[0].sum())
    assert float(cohort.sources[1].sub(cohort.sources[0]).abs().max()) > 0.05  # subject 1 is deformed
    # true target landmarks are phi_E^-1 of the source landmarks: phi_E(q) lands back on p
    back = cohort.field.points_to_source(cohort.target_landmarks[:1].double())
    torch.testing.assert_close(back, cohort.landmarks[:1].double(), atol=0.1, rtol=0)  # interpolation of phi
    assert float((cohort.target_landmarks - cohort.landmarks).norm(dim=-1).max()) > 0.5  # they do move


@needs_colin
def test_a_tiny_3d_demo_trains_on_patches_translates_by_patches_and_scores(tmp_path, capsys):
    metrics = run_demo_3d(tmp_path / "d3", config=TINY, patch=(16, 20, 16), checkpoint=tmp_path / "t3.pt")
    out = capsys.readouterr().out
    assert "plasticine demo --3d: 1 Colin27 volume(s) on a 28 x 35 x 28 grid" in out and "traced ventricle Dice" in out
    doc = json.loads((tmp_path / "d3" / "metrics.json").read_text())
    assert doc["patch"] == [16, 20, 16] and doc["shape"] == [28, 35, 28]
    for key in ("ventricle_dice", "endpoint_error", "landmark_error", "folding_fraction"):
        assert np.isfinite(doc[key]) and doc[key] == metrics[key]
    a = nib.load(tmp_path / "d3" / "subject0_source.nii.gz").affine
    for name in ("translated", "target_truth", "mask_traced", "mask_truth", "deformation", "deformation_inverse"):
        img = nib.load(tmp_path / "d3" / f"subject0_{name}.nii.gz")
        assert img.shape[:3] == (28, 35, 28) and np.allclose(img.affine, a), name
    assert (tmp_path / "t3.pt").is_file()
    with pytest.raises(ValueError, match=r"config.shape: the grid \(8, 10, 8\) is too coarse for the ventricles"):
        make_cohort_3d(replace(DEMO_3D, shape=(8, 10, 8)), 1, 0, include_real=True)


@pytest.mark.slow
@needs_colin
def test_the_3d_population_registration_traces_better_than_identity():
    # the demo's registration, fitted on its 24 unpaired training subjects, applied to the real
    # volume (measured: ventricle Dice 0.535 against 0.404, landmark error 0.514 against 0.906 voxel)
    train, _ = make_cohort_3d(DEMO_3D, DEMO_3D.train_subjects, DEMO_3D.seed + 1, include_real=False)
    test, _ = make_cohort_3d(DEMO_3D, 1, DEMO_3D.seed + 1000, include_real=True)
    reg = build_demo_translator(DEMO_3D, ndim=3).registration
    reg.fit(train.sources, train.targets)
    d = reg.register(test.sources)
    dice = _dice(d.labels_to_target(test.source_masks, 2)[0], test.target_masks[0])
    dice_identity = _dice(test.source_masks[0], test.target_masks[0])
    assert dice > dice_identity + 0.08
    moved = (d.points_to_target(test.landmarks) - test.target_landmarks).norm(dim=-1).mean()
    still = (test.landmarks - test.target_landmarks).norm(dim=-1).mean()
    assert float(moved) < 0.7 * float(still)
    changed = test.field.forward.norm(dim=1) > 0.5  # where the true field moves, the error halves
    err = (d.forward - test.field.forward.float()).norm(dim=1)
    assert float(err[changed].mean()) < 0.6 * float(test.field.forward.norm(dim=1)[changed].mean())
    assert float(d.folding_fraction().max()) == 0.0


def test_demo_3d_says_what_to_install_without_the_data(tmp_path, monkeypatch, capsys):
    import plasticine.data.system as system

    monkeypatch.setattr(system, "MRICRON_DIR", tmp_path / "absent")
    assert main(["demo", "--3d", "--output", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ch2bet.nii.gz not found: install Debian's mricron-data (apt-get install mricron-data)" in err, err
    assert main(["demo", "--3d", "--quick", "--output", str(tmp_path / "o")]) == 1
    assert "--quick and --3d" in capsys.readouterr().err
