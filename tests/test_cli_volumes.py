"""3D volumes through ``plasticine train`` and ``translate``: patches, stitching, progress, geometry."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_cli import folders, model  # noqa: F401  (the tiny trained 2D translator)
from test_cli_geometry import _check_outputs, _oblique

from plasticine.checkpoint import load_translator
from plasticine.cli import main
from plasticine.io import read_deformation, read_image, read_itk_deformation

nib = pytest.importorskip("nibabel", reason="the io extra (nibabel) is not installed")
from nibabel.affines import apply_affine


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    """Two source and two target 16^3 volumes on an oblique anisotropic grid."""
    root = tmp_path_factory.mktemp("vol3d")
    g = torch.Generator().manual_seed(7)
    (root / "src").mkdir(), (root / "tgt").mkdir()
    for i in range(2):
        x = torch.rand(16, 16, 16, generator=g).numpy()
        nib.save(nib.Nifti1Image(x, _oblique(tilt=20.0)), root / "src" / f"v{i}.nii.gz")
        nib.save(nib.Nifti1Image(1.0 - x, _oblique(tilt=20.0)), root / "tgt" / f"w{i}.nii.gz")
    return root


@pytest.fixture(scope="module")
def model3d(volumes):
    out = volumes / "m3.pt"
    args = ["--threads", "1", "train", "--source", str(volumes / "src"), "--target", str(volumes / "tgt"), "--output", str(out)]
    args += ["--diffusion-steps", "2", "--registration-steps", "2", "--batch-size", "2", "--sampler-steps", "2", "--patch", "12", "--quiet"]
    assert main(args) == 0
    return out


def _translate(volumes, translator, out, *extra):
    args = ["--threads", "1", "translate", "--model", str(translator), "--input", str(volumes / "src" / "v0.nii.gz"), "--output", str(out), "--start-step", "5"]
    return main(args + list(extra))


def test_train_builds_a_3d_translator_from_volumes_on_patches(volumes, model3d):
    translator = load_translator(model3d)
    assert translator.denoiser.settings.ndim == 3 and translator.registration.network.settings.spatial_dims == 3
    settings = json.loads((volumes / "m3.losses.json").read_text())["settings"]
    assert settings["ndim"] == 3 and settings["patch"] == [12, 12, 12]
    # the smoothness term of the registration is in mm, with the voxel spacing of the affines
    assert settings["spacing"] == pytest.approx([1.2, 0.8, 2.0], rel=1e-6)


def test_translate_volumes_by_patches_keeps_the_affine(volumes, model3d, tmp_path, capsys):
    a = _oblique(tilt=20.0)
    capsys.readouterr()
    assert _translate(volumes, model3d, tmp_path / "itk", "--patch", "12", "--deformation-format", "itk") == 0
    err = capsys.readouterr().err
    assert "volume 1/1 v0.nii.gz (16, 16, 16): 8 patches of 12 x 12 x 12 per network call" in err and "volume 1/1 done in" in err, err
    doc = _check_outputs(tmp_path / "itk", "v0", a)
    assert doc["patch"] == [12, 12, 12] and doc["overlap"] == [3, 3, 3]
    assert doc["files"] == ["v0_translated.nii.gz", "v0Warp.nii.gz", "v0InverseWarp.nii.gz"]
    translated = nib.load(tmp_path / "itk" / "v0_translated.nii.gz")
    assert translated.shape == (16, 16, 16) and np.isfinite(np.asarray(translated.dataobj)).all()
    # the same patches with NIfTI voxel displacements: the ITK files hold the same deformation
    assert _translate(volumes, model3d, tmp_path / "nii", "--patch", "12", "--deformation-format", "nii.gz") == 0
    _check_outputs(tmp_path / "nii", "v0", a)
    ref = read_deformation(tmp_path / "nii" / "v0_deformation.nii.gz")
    back, affine = read_itk_deformation(tmp_path / "itk" / "v0Warp.nii.gz", tmp_path / "itk" / "v0InverseWarp.nii.gz")
    np.testing.assert_allclose(affine, a, atol=1e-5)
    torch.testing.assert_close(back.forward, ref.forward, atol=1e-5, rtol=1e-5)
    # world points in and out, and a 3D mask traced through the NIfTI deformation keeps its own affine
    world = apply_affine(a, [[3.0, 4.0, 5.0], [10.5, 7.25, 12.0]])
    (tmp_path / "w.json").write_text(json.dumps(world.tolist()))
    assert _translate(volumes, model3d, tmp_path / "pts", "--patch", "12", "--points", str(tmp_path / "w.json"), "--points-space", "world") == 0
    doc = json.loads((tmp_path / "pts" / "v0_trace.json").read_text())
    np.testing.assert_allclose([p["source"] for p in doc["points"]], [[3.0, 4.0, 5.0], [10.5, 7.25, 12.0]], atol=1e-6)
    target = np.array([p["target"] for p in doc["points"]])
    np.testing.assert_allclose([p["target"] for p in doc["world_points"]], apply_affine(a, target), atol=1e-4)
    mask = np.zeros((16, 16, 16), np.float32)
    mask[4:10, 5:11, 3:9] = 1
    other = _oblique(tilt=45.0)
    nib.save(nib.Nifti1Image(mask, other), tmp_path / "mask.nii.gz")
    trace = ["trace", "--deformation", str(tmp_path / "nii" / "v0_deformation.nii.gz"), "--mask", str(tmp_path / "mask.nii.gz"), "--output", str(tmp_path / "m.nii.gz")]
    assert main(trace) == 0
    traced = nib.load(tmp_path / "m.nii.gz")
    assert traced.shape == (16, 16, 16) and np.allclose(traced.affine, other, atol=1e-5)
    # the whole volume at once (the network is fully convolutional) is also a valid translation
    assert _translate(volumes, model3d, tmp_path / "whole", "--deformation-format", "nii.gz") == 0
    _check_outputs(tmp_path / "whole", "v0", a)
    whole = read_image(tmp_path / "whole" / "v0_translated.nii.gz", normalization="none")
    assert whole.shape == (1, 16, 16, 16) and json.loads((tmp_path / "whole" / "v0_trace.json").read_text())["patch"] is None


def _fails(capsys, command, args, *needles):
    capsys.readouterr()
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"plasticine {command}: error: "), err
    for needle in needles:
        assert needle in err, err


def test_bad_patches_and_dimensions_fail_in_one_line(volumes, model3d, model, folders, tmp_path, capsys):  # noqa: F811
    base = ["translate", "--model", str(model3d), "--input", str(volumes / "src"), "--output", str(tmp_path / "o")]
    _fails(capsys, "translate", base + ["--patch", "0"], "--patch: expected sizes >= 1, got 0 0 0")
    _fails(capsys, "translate", base + ["--patch", "20"], "--patch:", "v0.nii.gz has spatial size (16, 16, 16)", "[1, 16]")
    _fails(capsys, "translate", base + ["--patch", "8", "8"], "--patch: expected 1 or 3 sizes", "got 2: 8 8")
    _fails(capsys, "translate", base + ["--overlap", "2"], "--overlap 2: expected --patch")
    _fails(capsys, "translate", base + ["--patch", "12", "--overlap", "7"], "--overlap:", "[0, patch/2]")
    _fails(capsys, "translate", ["translate", "--model", str(model), "--input", str(volumes / "src"), "--output", str(tmp_path / "o")], "a 3D image", "is 2D", "--axis")
    _fails(capsys, "translate", ["translate", "--model", str(model3d), "--input", str(folders / "src"), "--output", str(tmp_path / "o")], "a 2D image", "is 3D")
    assert not (tmp_path / "o").exists()  # refused before any work
    train = ["train", "--source", str(volumes / "src"), "--target", str(volumes / "tgt"), "--output", str(tmp_path / "x.pt"), "--batch-size", "2"]
    _fails(capsys, "train", train + ["--patch", "17"], "--patch:", "has spatial size (16, 16, 16)")
    _fails(capsys, "train", train + ["--patch", "-1", "8", "8"], "--patch: expected sizes >= 1")
    assert not (tmp_path / "x.pt").exists()
