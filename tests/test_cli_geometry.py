"""World geometry through ``plasticine translate`` and ``trace``: every NIfTI output keeps the input's affine."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from test_cli import folders, model  # noqa: F401  (the tiny trained translator)

from plasticine.cli import main
from plasticine.io import read_deformation, read_itk_deformation, write_image

nib = pytest.importorskip("nibabel", reason="the io extra (nibabel) is not installed")
from nibabel.affines import apply_affine


def _oblique(tilt: float = 0.0) -> np.ndarray:
    """Anisotropic (1.2, 0.8, 2.0) mm voxels, 15 degrees about z (then ``tilt`` degrees about x), an origin."""
    c, s = math.cos(math.radians(15)), math.sin(math.radians(15))
    rz = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
    t = math.radians(tilt)
    rx = np.array([[1, 0, 0], [0, math.cos(t), -math.sin(t)], [0, math.sin(t), math.cos(t)]])
    a = np.eye(4)
    a[:3, :3] = rx @ rz @ np.diag([1.2, 0.8, 2.0])
    a[:3, 3] = [12.5, -30.0, 7.25]
    return a


def _translate(src, out, translator, *extra):
    args = ["--threads", "1", "translate", "--model", str(translator), "--input", str(src), "--output", str(out), "--start-step", "5"]
    return main(args + list(extra))


def _check_outputs(out, name, affine):
    """Every NIfTI output of ``name`` read back by nibabel has ``affine``; returns the trace document."""
    doc = json.loads((out / f"{name}_trace.json").read_text())
    np.testing.assert_allclose(doc["affine"], affine, atol=1e-12)
    niftis = [f for f in doc["files"] if f.endswith(".nii.gz")]
    assert f"{name}_translated.nii.gz" in niftis and len(niftis) >= 3
    for f in niftis:
        assert (out / f).is_file()
        assert np.allclose(nib.load(out / f).affine, affine, atol=1e-5), f
    return doc


@pytest.fixture(scope="module")
def nifti2d(tmp_path_factory):
    root = tmp_path_factory.mktemp("geom2d")
    g = torch.Generator().manual_seed(3)
    nib.save(nib.Nifti1Image(torch.rand(16, 12, generator=g).numpy(), _oblique()), root / "img.nii.gz")
    return root / "img.nii.gz"


def test_2d_nifti_outputs_keep_the_affine_and_itk_warp_is_the_deformation(model, nifti2d, tmp_path):  # noqa: F811
    sitk = pytest.importorskip("SimpleITK", reason="SimpleITK is not installed")
    a = _oblique()
    assert _translate(nifti2d, tmp_path / "npz", model) == 0
    assert _translate(nifti2d, tmp_path / "itk", model, "--deformation-format", "itk") == 0
    assert _translate(nifti2d, tmp_path / "nii", model, "--deformation-format", "nii.gz") == 0
    doc = _check_outputs(tmp_path / "itk", "img", a)
    assert doc["files"] == ["img_translated.nii.gz", "img_translated.png", "imgWarp.nii.gz", "imgInverseWarp.nii.gz"]
    _check_outputs(tmp_path / "nii", "img", a)
    ref = read_deformation(tmp_path / "npz" / "img_deformation.npz")
    assert float(ref.forward.abs().max()) > 1e-4  # the learned registration, not the identity
    back, affine = read_itk_deformation(tmp_path / "itk" / "imgWarp.nii.gz", tmp_path / "itk" / "imgInverseWarp.nii.gz")
    np.testing.assert_allclose(affine, a, atol=1e-5)
    torch.testing.assert_close(back.forward, ref.forward, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(back.inverse, ref.inverse, atol=1e-5, rtol=1e-5)
    nii = read_deformation(tmp_path / "nii" / "img_deformation.nii.gz")
    torch.testing.assert_close(nii.forward, ref.forward)
    # ITK's view of the grid: origin, spacing and direction in LPS
    warp = sitk.ReadImage(str(tmp_path / "itk" / "imgWarp.nii.gz"))
    lps = np.diag([-1.0, -1.0, 1.0]) @ a[:3, :3]
    spacing = np.linalg.norm(a[:3, :3], axis=0)
    np.testing.assert_allclose(warp.GetOrigin(), [-a[0, 3], -a[1, 3]], atol=1e-4)
    np.testing.assert_allclose(warp.GetSpacing(), spacing[:2], atol=1e-5)
    np.testing.assert_allclose(np.reshape(warp.GetDirection(), (2, 2)), (lps / spacing)[:2, :2], atol=1e-5)


def test_sliced_volume_outputs_world_points_and_traced_masks(model, tmp_path):  # noqa: F811
    a = _oblique()
    g = torch.Generator().manual_seed(4)
    vol = nib.Nifti1Image(torch.rand(16, 12, 3, generator=g).numpy(), a)
    nib.save(vol, tmp_path / "vol.nii.gz")
    voxels = np.array([[3.0, 4.0], [10.5, 7.25]])
    k = 1
    expected = vol.slicer[:, :, k : k + 1].affine  # nibabel's affine of the slice, an independent reference
    world = apply_affine(expected, np.c_[voxels, np.zeros(2)])
    (tmp_path / "w.json").write_text(json.dumps(world.tolist()))
    out = tmp_path / "out"
    args = ["--axis", "2", "--points", str(tmp_path / "w.json"), "--points-space", "world", "--deformation-format", "itk"]
    assert _translate(tmp_path / "vol.nii.gz", out, model, *args, "--slices", str(k), str(k + 1)) == 0
    doc = _check_outputs(out, f"vol_s{k:04d}", expected)
    # world -> voxel -> world
    np.testing.assert_allclose([p["source"] for p in doc["points"]], voxels, atol=1e-4)
    np.testing.assert_allclose([p["source"] for p in doc["world_points"]], world, atol=1e-4)
    target = np.array([p["target"] for p in doc["points"]])
    np.testing.assert_allclose([p["target"] for p in doc["world_points"]], apply_affine(expected, np.c_[target, np.zeros(2)]), atol=1e-4)
    # a traced mask keeps the affine of the mask file
    assert _translate(tmp_path / "vol.nii.gz", tmp_path / "nii", model, "--axis", "2", "--slices", str(k), str(k + 1), "--deformation-format", "nii.gz") == 0
    mask = torch.zeros(1, 16, 12)
    mask[:, 4:9, 3:8] = 1.0
    other = _oblique(tilt=30.0)
    write_image(tmp_path / "mask.nii.gz", mask, affine=other)
    trace = ["trace", "--deformation", str(tmp_path / "nii" / f"vol_s{k:04d}_deformation.nii.gz"), "--mask", str(tmp_path / "mask.nii.gz")]
    assert main(trace + ["--output", str(tmp_path / "m.nii.gz")]) == 0
    assert np.allclose(nib.load(tmp_path / "m.nii.gz").affine, other, atol=1e-5)
    # points traced through the NIfTI deformation are written in world millimetres too
    back = ["trace", "--deformation", trace[2], "--points", str(out / f"vol_s{k:04d}_trace.json"), "--direction", "to-source"]
    assert main(back + ["--output", str(tmp_path / "back.json")]) == 0
    doc = json.loads((tmp_path / "back.json").read_text())
    np.testing.assert_allclose(doc["affine"], expected, atol=1e-5)
    np.testing.assert_allclose([p["target"] for p in doc["world_points"]], apply_affine(expected, np.c_[target, np.zeros(2)]), atol=1e-3)


def _fails_in_one_line(capsys, args, *needles):
    capsys.readouterr()
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("plasticine translate: error: "), err
    for needle in needles:
        assert needle in err, err


def test_bad_world_points_and_affines_fail_in_one_line(model, tmp_path, capsys):  # noqa: F811
    a = _oblique(tilt=30.0)  # slices along axis 0 leave the world x-y plane: no 2D ITK image
    g = torch.Generator().manual_seed(5)
    nib.save(nib.Nifti1Image(torch.rand(3, 16, 12, generator=g).numpy(), a), tmp_path / "vol.nii.gz")
    base = ["translate", "--model", str(model), "--input", str(tmp_path / "vol.nii.gz"), "--output", str(tmp_path / "o"), "--axis", "0", "--start-step", "5"]
    on_plane = apply_affine(a, [[1.0, 3.0, 4.0]])
    for rows, needle in (([[3.0, 4.0]], "3 RAS coordinates"), ((on_plane + 2.0 * a[:3, 0]).tolist(), "off the plane")):
        (tmp_path / "p.json").write_text(json.dumps(rows))
        _fails_in_one_line(capsys, base + ["--points", str(tmp_path / "p.json"), "--points-space", "world"], "--points-space world", needle)
    _fails_in_one_line(capsys, base + ["--deformation-format", "itk"], "--deformation-format itk", "slice 0", "x-y plane")
    assert not (tmp_path / "o").exists()  # refused before any work
    # the same slices are fine as NIfTI voxel displacements, with the slice's affine (sliced axis third)
    assert main(base + ["--slices", "2", "3", "--deformation-format", "nii.gz"]) == 0
    expected = nib.load(tmp_path / "vol.nii.gz").slicer[2:3].affine[:, [1, 2, 0, 3]]
    assert np.allclose(nib.load(tmp_path / "o" / "vol_s0002_deformation_inverse.nii.gz").affine, expected, atol=1e-5)
    _fails_in_one_line(capsys, base + ["--points-space", "world"], "--points-space world: expected --points")
    with pytest.raises(SystemExit):
        main(base + ["--points-space", "mm"])
