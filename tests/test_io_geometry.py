"""Affines of image files and slices, world points in trace files: checked against nibabel and SimpleITK."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from plasticine.core import Deformation
from plasticine.io import ImageFolder, ImageReadError, read_affine, read_points, write_deformation, write_image, write_trace

nib = pytest.importorskip("nibabel", reason="the io extra (nibabel) is not installed")
from nibabel.affines import apply_affine


def _oblique() -> np.ndarray:
    c, s = math.cos(math.radians(15)), math.sin(math.radians(15))
    t = math.radians(25)
    rz = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
    rx = np.array([[1, 0, 0], [0, math.cos(t), -math.sin(t)], [0, math.sin(t), math.cos(t)]])
    a = np.eye(4)
    a[:3, :3] = rx @ rz @ np.diag([1.2, 0.8, 2.0])
    a[:3, 3] = [12.5, -30.0, 7.25]
    return a


def test_nifti_and_png_affines(tmp_path):
    a = _oblique()
    nib.save(nib.Nifti1Image(np.zeros((5, 4, 3), np.float32), a), tmp_path / "v.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((5, 4), np.float32), a), tmp_path / "i.nii")
    np.testing.assert_allclose(read_affine(tmp_path / "v.nii.gz"), nib.load(tmp_path / "v.nii.gz").affine)
    np.testing.assert_allclose(read_affine(tmp_path / "i.nii"), nib.load(tmp_path / "i.nii").affine)
    write_image(tmp_path / "p.png", torch.zeros(1, 5, 4))
    np.testing.assert_array_equal(read_affine(tmp_path / "p.png"), np.eye(4))
    with pytest.raises(ImageReadError, match="no such file"):
        read_affine(tmp_path / "missing.nii.gz")


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_slice_affines_are_nibabels_with_the_sliced_axis_third(tmp_path, axis):
    a = _oblique()
    vol = nib.Nifti1Image(np.random.default_rng(0).random((5, 4, 3)).astype(np.float32), a)
    nib.save(vol, tmp_path / "v.nii.gz")
    folder = ImageFolder(tmp_path / "v.nii.gz", axis=axis, normalization="none")
    kept = [k for k in range(3) if k != axis]
    for i in range(len(folder)):
        index = [slice(None)] * 3
        index[axis] = slice(i, i + 1)
        ref = vol.slicer[tuple(index)].affine[:, kept + [axis, 3]]
        np.testing.assert_allclose(folder.affine(i), ref, atol=1e-12)
        # the slice's voxel (r, c) sits where the volume's voxel does
        p = np.array([2.0, 1.0])
        q = np.insert(p, axis, i)
        np.testing.assert_allclose(apply_affine(folder.affine(i), np.append(p, 0.0)), apply_affine(a, q), atol=1e-12)
        torch.testing.assert_close(folder[i], torch.from_numpy(np.asanyarray(vol.dataobj)).select(axis, i)[None])


def _dicom(name):
    pytest.importorskip("pydicom", reason="the io extra (pydicom) is not installed")
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom's test file {name} is not available")
    return path


def test_dicom_affine_matches_simpleitk(tmp_path):
    sitk = pytest.importorskip("SimpleITK", reason="SimpleITK is not installed")
    import pydicom

    ds = pydicom.dcmread(_dicom("CT_small.dcm"))
    r = _oblique()[:3, :3] / np.array([1.2, 0.8, 2.0])
    ds.ImageOrientationPatient = [float(v) for v in np.r_[r[:, 0], r[:, 1]]]
    ds.PixelSpacing = [0.7, 1.3]
    ds.ImagePositionPatient = [-40.5, 22.0, 13.0]
    ds.save_as(tmp_path / "oblique.dcm")
    for path in (_dicom("CT_small.dcm"), tmp_path / "oblique.dcm"):
        a = read_affine(path)
        img = sitk.ReadImage(str(path))  # ITK: index (column, row), LPS
        direction = np.reshape(img.GetDirection(), (3, 3)) * np.array(img.GetSpacing())
        lps = np.diag([-1.0, -1.0, 1.0]) @ a[:3]
        np.testing.assert_allclose(lps[:, 3], img.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(lps[:, 0], direction[:, 1], atol=1e-5)  # tensor axis 0: the row index
        np.testing.assert_allclose(lps[:, 1], direction[:, 0], atol=1e-5)
        image = read_image_shape(path)
        assert image == (1, img.GetSize()[1], img.GetSize()[0])


def read_image_shape(path):
    from plasticine.io import read_image

    return tuple(read_image(path, normalization="none").shape)


def test_dicom_without_geometry_is_the_identity_with_spacing(tmp_path):
    import pydicom

    ds = pydicom.dcmread(_dicom("CT_small.dcm"))
    del ds.ImageOrientationPatient, ds.ImagePositionPatient
    if "SpacingBetweenSlices" in ds:
        del ds.SpacingBetweenSlices
    ds.PixelSpacing, ds.SliceThickness = [0.7, 1.3], 2.5
    ds.save_as(tmp_path / "plain.dcm")
    np.testing.assert_allclose(read_affine(tmp_path / "plain.dcm"), np.diag([0.7, 1.3, 2.5, 1.0]))
    ds.PixelSpacing = [0.0, 1.3]
    ds.save_as(tmp_path / "flat.dcm")
    with pytest.raises(ImageReadError, match="flat.dcm: expected PixelSpacing of two values > 0"):
        read_affine(tmp_path / "flat.dcm")


@pytest.mark.parametrize("n", [2, 3])
def test_world_points_round_trip_through_a_trace_file(tmp_path, n):
    a = _oblique()
    g = torch.Generator().manual_seed(n)
    src, tgt = torch.rand(5, n, generator=g) * 10, torch.rand(5, n, generator=g) * 10
    path = write_trace(tmp_path / "t.json", src, tgt, affine=a, seed=1)
    for which, p in (("source", src), ("target", tgt)):
        torch.testing.assert_close(read_points(path, which=which), p)  # the voxel keys as before
        back = read_points(path, which=which, space="world", affine=a, ndim=n)
        torch.testing.assert_close(back, p, atol=1e-4, rtol=0)
    import json

    doc = json.loads(path.read_text())
    padded = np.c_[src.double().numpy(), np.zeros((5, 3 - n))]
    np.testing.assert_allclose([q["source"] for q in doc["world_points"]], apply_affine(a, padded), atol=1e-4)
    assert doc["world_units"] == "mm RAS" and doc["seed"] == 1


def test_points_and_affine_errors(tmp_path):
    a = _oblique()
    write_trace(tmp_path / "plain.json", torch.zeros(1, 2), torch.zeros(1, 2))
    with pytest.raises(ImageReadError, match="world_points"):
        read_points(tmp_path / "plain.json", space="world", affine=a, ndim=2)
    with pytest.raises(ValueError, match="space: expected 'voxel' or 'world', got 'mm'"):
        read_points(tmp_path / "plain.json", space="mm")
    with pytest.raises(ValueError, match="affine: world points need"):
        read_points(tmp_path / "plain.json", space="world")
    with pytest.raises(ValueError, match="only with space='world'"):
        read_points(tmp_path / "plain.json", affine=a)
    with pytest.raises(ValueError, match="ndim: expected 2 or 3, got 4"):
        read_points(tmp_path / "plain.json", space="world", affine=a, ndim=4)
    (tmp_path / "w.json").write_text("[[1.0, 2.0, 3.0]]")
    with pytest.raises(ValueError, match="affine: expected an invertible"):
        read_points(tmp_path / "w.json", space="world", affine=np.diag([1.0, 1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="affine: expected a finite 4 x 4"):
        write_trace(tmp_path / "x.json", torch.zeros(1, 2), torch.zeros(1, 2), affine=np.eye(3))
    with pytest.raises(ValueError, match="affine: .*npz"):
        write_deformation(tmp_path / "d.npz", Deformation(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4)), affine=a)
    write_deformation(tmp_path / "d.nii.gz", Deformation(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4)), affine=a)
    for f in ("d.nii.gz", "d_inverse.nii.gz"):
        np.testing.assert_allclose(nib.load(tmp_path / f).affine, a, atol=1e-5)


def test_check_itk_affine():
    from plasticine.io import check_itk_affine

    a = _oblique()  # tilted about x: its first two axes leave the world x-y plane
    np.testing.assert_array_equal(check_itk_affine(torch.from_numpy(a), 3), a)
    with pytest.raises(ValueError, match=r"x-y plane; expected affine\[2, :2\] = 0"):
        check_itk_affine(a, 2)
    c, s = math.cos(0.3), math.sin(0.3)
    flat = np.array([[-1.2 * c, 0.8 * s, 0, 4.0], [-1.2 * s, -0.8 * c, 0, -2.0], [0, 0, 2.0, 9.0], [0, 0, 0, 1]])  # mirrored, rotated in-plane
    np.testing.assert_array_equal(check_itk_affine(flat, 2), flat)
    sheared = np.eye(4)
    sheared[0, 1] = 0.5
    with pytest.raises(ValueError, match="shears them"):
        check_itk_affine(sheared, 3)
    with pytest.raises(ValueError, match="ndim: expected 2 or 3, got 4"):
        check_itk_affine(a, 4)
