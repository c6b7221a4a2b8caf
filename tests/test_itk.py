"""ITK / ANTs displacement fields: the file format, and the real tools applying plasticine's fields.

The reference for the maths is independent of plasticine's own geometry code: world positions come
from :func:`nibabel.affines.apply_affine`, LPS is RAS with x and y negated, and the tools
(SimpleITK's ``DisplacementFieldTransform`` and ``Resample``, ANTs' ``apply_transforms`` and
``apply_transforms_to_points``) read the files themselves. The 3D cases use Colin27 (Debian's
mricron-data) at a quarter of its resolution (45 x 54 x 45) on an oblique affine with spacings
(1.2, 1.5, 2.0) mm, and a smooth random diffeomorphism of up to 4 voxels.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

nib = pytest.importorskip("nibabel", reason="the io extra (nibabel) is not installed")
from nibabel.affines import apply_affine

from plasticine.core import Deformation
from plasticine.data.synthetic import random_deformation
from plasticine.io import (
    ImageReadError,
    read_itk_deformation,
    read_itk_displacement,
    write_itk_deformation,
    write_itk_displacement,
)

LPS = np.diag([-1.0, -1.0, 1.0])

POINT_TOLERANCE = 1e-4
"""Largest error of a mapped point in voxels: the vectors are float32 millimetres (about 1e-6 mm of
rounding for displacements of a few mm), so anything above this is a convention error, not rounding."""

RMS_TOLERANCE = 0.05
"""Largest voxel-equivalent RMS difference of resampled intensities (what the tools must meet)."""


def rotation(angles_deg) -> np.ndarray:
    """Rotation matrix about x, then y, then z (degrees), by the closed form of each axis."""
    out = np.eye(3)
    for axis, angle in enumerate(np.radians(angles_deg)):
        c, s = np.cos(angle), np.sin(angle)
        i, j = [k for k in range(3) if k != axis]
        r = np.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        out = r @ out
    return out


def oblique_affine(spacing=(1.2, 1.5, 2.0), angles=(12.0, -8.0, 15.0), origin=(-30.0, 12.5, 7.0)) -> np.ndarray:
    a = np.eye(4)
    a[:3, :3] = rotation(angles) @ np.diag(spacing)
    a[:3, 3] = origin
    return a


def world_displacement(u: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """world(p + u(p)) - world(p) at every voxel, by nibabel, as ``(*S, 3)`` RAS millimetres."""
    grid = np.moveaxis(np.indices(u.shape[1:]), 0, -1).astype(np.float64)
    return apply_affine(affine, grid + np.moveaxis(u, 0, -1)) - apply_affine(affine, grid)


# -- the file format --------------------------------------------------------------------------------


@settings(max_examples=20, deadline=None)
@given(
    spacing=st.tuples(*[st.floats(0.3, 3.0)] * 3),
    angles=st.tuples(*[st.floats(-180.0, 180.0)] * 3),
    flip=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_written_vectors_are_lps_millimetres_and_read_back(tmp_path_factory, spacing, angles, flip, seed):
    # the stored vector at voxel p is world(p + u(p)) - world(p) with x and y negated, whatever the
    # (possibly mirrored) oblique affine; reading gives u and the affine back to float32 rounding
    affine = oblique_affine(spacing, angles, (3.0, -4.0, 5.0))
    if flip:
        affine[:3, 1] *= -1.0
    u = torch.randn(3, 4, 5, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3
    path = write_itk_displacement(tmp_path_factory.mktemp("w") / "Warp.nii.gz", u, affine)
    img = nib.load(str(path))
    assert img.header["intent_code"] == 1007 and img.shape == (4, 5, 3, 1, 3)
    assert img.header.get_xyzt_units()[0] == "mm"
    expected = world_displacement(u.numpy(), affine) @ LPS
    stored = np.asarray(img.dataobj)[:, :, :, 0, :]
    assert np.abs(stored - expected).max() <= 1e-6 * (1 + np.abs(expected).max())
    back, back_affine = read_itk_displacement(path)
    assert back.dtype == torch.float32 and back.shape == u.shape
    assert np.allclose(back_affine, affine, atol=1e-5)
    assert (back.double() - u).abs().max() <= 1e-5 * (1 + u.abs().max())


def test_2d_field_is_the_itk_2d_layout(tmp_path):
    affine = np.eye(4)
    affine[:2, :2] = rotation((0.0, 0.0, 20.0))[:2, :2] @ np.diag([0.8, 1.7])
    affine[:3, 3] = (5.0, -6.0, 2.0)
    u = torch.randn(2, 6, 7, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    path = write_itk_displacement(tmp_path / "Warp.nii", u, affine)
    img = nib.load(str(path))
    assert img.shape == (6, 7, 1, 1, 2) and img.header["intent_code"] == 1007
    u3 = torch.cat([u, torch.zeros(1, 6, 7, dtype=u.dtype)])[..., None].numpy()
    expected = (world_displacement(u3, affine) @ LPS)[..., 0, :2]
    assert np.abs(np.asarray(img.dataobj)[:, :, 0, 0, :] - expected).max() < 1e-5
    back, _ = read_itk_displacement(path)
    assert back.shape == (2, 6, 7) and (back.double() - u).abs().max() < 1e-5


def test_deformation_round_trip_and_file_names(tmp_path):
    phi = random_deformation((9, 8, 7), 2.0, control_points=4, generator=torch.Generator().manual_seed(2))
    affine = oblique_affine()
    warp, inverse = write_itk_deformation(tmp_path / "sub" / "case_", phi, affine)
    assert (warp.name, inverse.name) == ("case_Warp.nii.gz", "case_InverseWarp.nii.gz")
    back, back_affine = read_itk_deformation(warp, inverse)
    assert isinstance(back, Deformation) and back.forward.shape == (1, 3, 9, 8, 7)
    assert np.allclose(back_affine, affine, atol=1e-5)
    assert (back.forward - phi.forward).abs().max() < 1e-5
    assert (back.inverse - phi.inverse).abs().max() < 1e-5
    # a second round trip of what was read (the affine now a torch tensor) reproduces the values
    again, _ = read_itk_deformation(*write_itk_deformation(tmp_path / "again_", back, torch.from_numpy(back_affine)))
    assert (again.forward - back.forward).abs().max() < 1e-6


def one_line_error(call, *needles):
    with pytest.raises(ValueError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    return message


def test_bad_files_give_one_line_errors_naming_the_file(tmp_path):
    plain = tmp_path / "plain.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6, 1, 3), np.float32), np.eye(4)), plain)
    one_line_error(lambda: read_itk_displacement(plain), str(plain), "intent code 1007", "got intent code 0")
    flat = tmp_path / "flat.nii.gz"
    img = nib.Nifti1Image(np.zeros((4, 5, 6, 3), np.float32), np.eye(4))
    img.header.set_intent("vector")
    nib.save(img, flat)
    one_line_error(lambda: read_itk_displacement(flat), str(flat), "(X, Y, Z, 1, 3)", "(4, 5, 6, 3)")
    wide = tmp_path / "wide.nii.gz"
    img = nib.Nifti1Image(np.zeros((4, 5, 2, 1, 2), np.float32), np.eye(4))
    img.header.set_intent("vector")
    nib.save(img, wide)
    one_line_error(lambda: read_itk_displacement(wide), str(wide), "(X, Y, 1, 1, 2)")
    one_line_error(lambda: read_itk_displacement(tmp_path / "none.nii.gz"), "none.nii.gz", "no such file")
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a nifti file")
    one_line_error(lambda: read_itk_displacement(broken), str(broken), "cannot read")
    small = write_itk_displacement(tmp_path / "smallWarp.nii.gz", torch.zeros(3, 4, 4, 4), np.eye(4))
    other = write_itk_displacement(tmp_path / "otherWarp.nii.gz", torch.zeros(3, 4, 4, 5), np.eye(4))
    one_line_error(lambda: read_itk_deformation(small, other), str(other), "expected the grid of")
    assert isinstance(pytest.raises(ImageReadError, read_itk_displacement, plain).value, ValueError)


def test_affines_itk_cannot_hold_are_refused(tmp_path):
    u = torch.zeros(3, 4, 4, 4)
    shear = np.eye(4)
    shear[0, 1] = 0.5
    one_line_error(lambda: write_itk_displacement(tmp_path / "a.nii.gz", u, shear), "affine", "orthogonal")
    one_line_error(lambda: write_itk_displacement(tmp_path / "a.nii.gz", u, np.eye(4, dtype=int)), "affine", "floating", "int")
    one_line_error(lambda: write_itk_displacement(tmp_path / "a.nii.gz", u, np.eye(3)), "affine", "4 x 4", "(3, 3)")
    sheared_z = np.eye(4)
    sheared_z[0, 2] = 0.3  # a 2D field's third voxel axis still has to be orthogonal: ITK reads the 3 x 3 direction
    one_line_error(lambda: write_itk_displacement(tmp_path / "a.nii.gz", torch.zeros(2, 4, 4), sheared_z), "affine", "orthogonal")
    tilted = np.eye(4)
    tilted[:3, :3] = rotation((30.0, 0.0, 0.0))
    one_line_error(lambda: write_itk_displacement(tmp_path / "a.nii.gz", torch.zeros(2, 4, 4), tilted), "affine", "x-y plane")
    one_line_error(lambda: write_itk_displacement(tmp_path / "a.npz", u, np.eye(4)), "a.npz", ".nii")
    nan = u.clone()
    nan[0, 1, 1, 1] = float("nan")
    one_line_error(lambda: write_itk_displacement(tmp_path / "a.nii.gz", nan, np.eye(4)), "displacement", "finite")
    one_line_error(lambda: write_itk_displacement(tmp_path / "a.nii.gz", torch.zeros(2, 4, 4, 4), np.eye(4)), "displacement")
    assert not list(tmp_path.iterdir())  # nothing was written


# -- the real tools -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """Colin27 at 4 mm steps on an oblique anisotropic grid, a random diffeomorphism and its ITK files."""
    from scipy import ndimage

    from plasticine.data.system import colin27

    try:
        volume, _ = colin27()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    volume = ndimage.zoom(volume.astype(np.float64), 0.25, order=1)
    volume /= volume.max()
    affine = oblique_affine()
    phi = random_deformation(volume.shape, 4.0, control_points=5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    folder = tmp_path_factory.mktemp("itk")
    warp, inverse = write_itk_deformation(folder / "case_", phi, affine)
    image_path = folder / "colin27.nii.gz"
    nib.save(nib.Nifti1Image(volume.astype(np.float32), affine), image_path)
    image = torch.from_numpy(np.asarray(nib.load(str(image_path)).dataobj, dtype=np.float64))[None, None]
    return {"image": image, "affine": affine, "phi": phi, "warp": warp, "inverse": inverse, "image_path": image_path}


def to_lps(voxels: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return apply_affine(affine, voxels) @ LPS


def from_lps(points: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return apply_affine(np.linalg.inv(affine), np.asarray(points) @ LPS)


def sample_points(shape, count: int = 400, seed: int = 3) -> np.ndarray:
    """Fractional voxel positions inside the grid."""
    rng = np.random.default_rng(seed)
    return rng.uniform(0.0, 1.0, (count, len(shape))) * (np.array(shape) - 1)


def voxel_rms(ours: np.ndarray, theirs: np.ndarray, image: np.ndarray, inside: np.ndarray) -> float:
    """RMS intensity difference over ``inside``, in voxels: divided by the RMS gradient magnitude there."""
    gradient = np.sqrt(sum(g**2 for g in np.gradient(image)))
    return float(np.sqrt(((ours - theirs)[inside] ** 2).mean()) / np.sqrt((gradient[inside] ** 2).mean()))


def inside_mask(displacement: torch.Tensor, margin: float = 1.0) -> np.ndarray:
    """Voxels whose mapped position ``p + u(p)`` lies at least ``margin`` inside the grid."""
    shape = displacement.shape[2:]
    q = np.indices(shape) + displacement[0].numpy()
    return np.all([(q[i] >= margin) & (q[i] <= s - 1 - margin) for i, s in enumerate(shape)], axis=0)


def test_simpleitk_applies_the_warp_as_to_target(case):
    sitk = pytest.importorskip("SimpleITK", reason="SimpleITK is not installed (pip install 'plasticine[itk]')")
    phi, affine = case["phi"], case["affine"]
    for path, field, pulled in ((case["warp"], phi.forward, phi.to_target), (case["inverse"], phi.inverse, phi.to_source)):
        transform = sitk.DisplacementFieldTransform(sitk.ReadImage(str(path), sitk.sitkVectorFloat64))
        # points: ITK maps the physical point of voxel p to that of p + u(p)
        p = sample_points(phi.shape)
        mapped = from_lps([transform.TransformPoint(tuple(x)) for x in to_lps(p, affine)], affine)
        expected = p + phi_points(field, p)
        error = np.abs(mapped - expected).max()
        assert error < POINT_TOLERANCE, error
        # images: resampling the file's image through the field equals plasticine's pull-back
        moving = sitk.ReadImage(str(case["image_path"]), sitk.sitkFloat64)
        theirs = sitk.GetArrayFromImage(sitk.Resample(moving, moving, transform, sitk.sitkLinear, 0.0)).transpose(2, 1, 0)
        ours = pulled(case["image"])[0, 0].numpy()
        inside = inside_mask(field)
        assert inside.mean() > 0.75  # the one-voxel rim is 12 % of the grid
        rms = voxel_rms(ours, theirs, case["image"][0, 0].numpy(), inside)
        assert rms < RMS_TOLERANCE and np.abs(ours - theirs)[inside].max() < 1e-5, rms


def phi_points(field: torch.Tensor, points: np.ndarray) -> np.ndarray:
    """The displacement at fractional voxel positions, by scipy's linear interpolation (an independent reference)."""
    from scipy import ndimage

    return np.stack([ndimage.map_coordinates(field[0, i].numpy(), points.T, order=1) for i in range(field.shape[1])], axis=1)


def test_simpleitk_2d_field_maps_points_as_plasticine(tmp_path):
    sitk = pytest.importorskip("SimpleITK", reason="SimpleITK is not installed (pip install 'plasticine[itk]')")
    affine = np.eye(4)
    affine[:2, :2] = rotation((0.0, 0.0, -25.0))[:2, :2] @ np.diag([0.9, 1.4])
    affine[:3, 3] = (12.0, -3.0, 0.0)
    phi = random_deformation((24, 30), 3.0, control_points=4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    warp, _ = write_itk_deformation(tmp_path / "flat_", phi, affine)
    field = sitk.ReadImage(str(warp), sitk.sitkVectorFloat64)
    assert field.GetDimension() == 2 and field.GetNumberOfComponentsPerPixel() == 2
    transform = sitk.DisplacementFieldTransform(field)
    affine2 = np.eye(3)
    affine2[:2, :2], affine2[:2, 2] = affine[:2, :2], affine[:2, 3]
    flip = np.diag([-1.0, -1.0])
    p = sample_points(phi.shape)
    mapped = apply_affine(
        np.linalg.inv(affine2), np.array([transform.TransformPoint(tuple(x)) for x in apply_affine(affine2, p) @ flip]) @ flip
    )
    assert np.abs(mapped - (p + phi_points(phi.forward, p))).max() < POINT_TOLERANCE


def test_fields_written_by_simpleitk_read_as_its_transform(tmp_path):
    # the other direction: a field made by SimpleITK (3D and 2D, oblique) read by plasticine moves
    # the voxel points where SimpleITK's transform moves their physical points
    sitk = pytest.importorskip("SimpleITK", reason="SimpleITK is not installed (pip install 'plasticine[itk]')")
    rng = np.random.default_rng(5)
    for dim, size in ((3, (7, 6, 5)), (2, (9, 8))):
        vectors = rng.normal(0.0, 2.0, size[::-1] + (dim,))  # sitk arrays are (z, y, x, component)
        field = sitk.GetImageFromArray(vectors, isVector=True)
        field.SetSpacing((1.3, 0.7, 2.1)[:dim])
        field.SetOrigin((4.0, -2.0, 9.0)[:dim])
        field.SetDirection(tuple(rotation((10.0, 20.0, -35.0) if dim == 3 else (0.0, 0.0, -35.0))[:dim, :dim].ravel()))
        path = tmp_path / f"sitk{dim}d.nii.gz"
        sitk.WriteImage(field, str(path))
        u, affine = read_itk_displacement(path)
        transform = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
        for index in np.ndindex(*size):
            x = field.TransformIndexToPhysicalPoint(tuple(int(i) for i in index))
            y = np.array(transform.TransformPoint(x))
            q = np.array(index) + u[(slice(None),) + index].double().numpy()
            y_ours = (affine[:dim, :dim] @ q + affine[:dim, 3]) * np.array([-1.0, -1.0, 1.0])[:dim]
            assert np.abs(y_ours - y).max() < 1e-4, (dim, index)


def test_ants_applies_the_warp_as_to_target(case):
    ants = pytest.importorskip("ants", reason="antspyx is not installed (pip install 'plasticine[ants]')")
    phi = case["phi"]
    image = ants.image_read(str(case["image_path"]))
    for path, field, pulled in ((case["warp"], phi.forward, phi.to_target), (case["inverse"], phi.inverse, phi.to_source)):
        theirs = ants.apply_transforms(fixed=image, moving=image, transformlist=[str(path)], interpolator="linear").numpy()
        ours = pulled(case["image"])[0, 0].numpy()
        inside = inside_mask(field)
        rms = voxel_rms(ours, theirs, case["image"][0, 0].numpy(), inside)
        assert rms < RMS_TOLERANCE and np.abs(ours - theirs)[inside].max() < 1e-5, rms


def test_points_round_trip_through_ants(case):
    # ANTs maps points the opposite way to images: the Warp (which pulls the source image into the
    # target) carries target points to the source, as points_to_source; the InverseWarp carries
    # source points to the target, as points_to_target; both in turn bring a point back
    ants = pytest.importorskip("ants", reason="antspyx is not installed (pip install 'plasticine[ants]')")
    import pandas as pd

    phi, affine = case["phi"], case["affine"]
    p = sample_points(phi.shape, seed=6)

    def through(points, path):
        frame = pd.DataFrame(to_lps(points, affine), columns=["x", "y", "z"])
        return from_lps(ants.apply_transforms_to_points(3, frame, [str(path)])[["x", "y", "z"]].to_numpy(), affine)

    in_target = through(p, case["inverse"])
    ours = phi.points_to_target(torch.from_numpy(p)[None])[0].numpy()
    assert np.abs(in_target - ours).max() < POINT_TOLERANCE
    in_source = through(p, case["warp"])
    assert np.abs(in_source - phi.points_to_source(torch.from_numpy(p)[None])[0].numpy()).max() < POINT_TOLERANCE
    back = through(in_target, case["warp"])
    ours_back = phi.points_to_source(torch.from_numpy(ours)[None])[0].numpy()
    assert np.abs(back - ours_back).max() < 2 * POINT_TOLERANCE
    consistency = np.abs(back - p).max()
    assert consistency < 0.1, consistency  # the inverse consistency of phi itself (scaling and squaring)


def test_ants_syn_files_read_as_the_backend_deformation(monkeypatch):
    # one SyN run: its Warp / InverseWarp files read by read_itk_deformation equal the Deformation
    # that AntsRegistration builds from the same run by warping coordinate images
    ants = pytest.importorskip("ants", reason="antspyx is not installed (pip install 'plasticine[ants]')")
    from scipy import ndimage

    from plasticine.data.system import colin27
    from plasticine.registration import AntsRegistration

    try:
        volume, _ = colin27()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    target = ndimage.zoom(volume.astype(np.float64), 1 / 6, order=1)
    target /= target.max()
    source = ndimage.map_coordinates(
        target, np.indices(target.shape) + 1.5 * np.sin(np.indices(target.shape) / 5.0), order=1, mode="nearest"
    )
    runs = []
    registration = ants.registration

    def recorded(*args, **kwargs):
        runs.append(registration(*args, **kwargs))
        return runs[-1]

    monkeypatch.setattr(ants, "registration", recorded)
    backend = AntsRegistration(transform="SyNOnly", pad=8, reg_iterations=(20, 10, 0))
    ours = backend.register(torch.from_numpy(source)[None, None], torch.from_numpy(target)[None, None])
    (run,) = runs
    warp = next(f for f in run["fwdtransforms"] if f.endswith("Warp.nii.gz"))
    inverse = next(f for f in run["invtransforms"] if f.endswith("InverseWarp.nii.gz"))
    for mat in (f for f in run["fwdtransforms"] if f.endswith(".mat")):  # SyNOnly keeps an identity affine
        assert np.allclose(ants.read_transform(mat).parameters, [1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0], atol=1e-6)
    read, affine = read_itk_deformation(warp, inverse)
    assert np.allclose(affine, np.diag([-1.0, -1.0, 1.0, 1.0]))  # ANTs' unit grid, in RAS
    assert float(read.forward.abs().max()) > 0.5  # SyN moved something
    assert (read.forward - ours.forward.float()).abs().max() < 1e-4
    assert (read.inverse - ours.inverse.float()).abs().max() < 1e-4


def test_h5_transform_files_hold_the_same_field(tmp_path, case):
    # format="h5": one DisplacementFieldTransform per file through SimpleITK, read back as the NIfTI
    # pair is, applied by SimpleITK and by ANTs exactly as the NIfTI fields
    sitk = pytest.importorskip("SimpleITK", reason="SimpleITK is not installed (pip install 'plasticine[itk]')")
    phi, affine = case["phi"], case["affine"]
    warp, inverse = write_itk_deformation(tmp_path / "case_", phi, affine, format="h5")
    assert (warp.name, inverse.name) == ("case_Warp.h5", "case_InverseWarp.h5")
    back, back_affine = read_itk_deformation(warp, inverse)
    assert np.allclose(back_affine, affine, atol=1e-9)
    assert (back.forward.double() - phi.forward).abs().max() < 1e-5
    assert (back.inverse.double() - phi.inverse).abs().max() < 1e-5
    transform = sitk.ReadTransform(str(warp))
    assert transform.GetName() == "DisplacementFieldTransform"
    p = sample_points(phi.shape, seed=7)
    mapped = from_lps([transform.TransformPoint(tuple(x)) for x in to_lps(p, affine)], affine)
    assert np.abs(mapped - (p + phi_points(phi.forward, p))).max() < POINT_TOLERANCE
    # a composite of that one field reads the same; a composite of two transforms is refused
    composite = tmp_path / "composite.h5"
    sitk.WriteTransform(sitk.CompositeTransform([transform]), str(composite))
    assert torch.equal(read_itk_displacement(composite)[0], back.forward[0])
    pair = tmp_path / "pair.h5"
    sitk.WriteTransform(sitk.CompositeTransform([sitk.AffineTransform(3), transform]), str(pair))
    one_line_error(
        lambda: read_itk_displacement(pair), str(pair), "CompositeTransform of ['AffineTransform', 'DisplacementFieldTransform']"
    )
    rigid = tmp_path / "rigid.h5"
    sitk.WriteTransform(sitk.Euler3DTransform(), str(rigid))
    one_line_error(lambda: read_itk_displacement(rigid), str(rigid), "DisplacementFieldTransform", "Euler3DTransform")
    one_line_error(lambda: write_itk_deformation(tmp_path / "x_", phi, affine, format="mat"), "format", "'mat'")
    # 2D: the in-plane grid survives
    flat = np.eye(4)
    flat[:2, :2] = rotation((0.0, 0.0, 30.0))[:2, :2] @ np.diag([0.6, 1.1])
    flat[:2, 3] = (3.0, -8.0)
    u = torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    u2, a2 = read_itk_displacement(write_itk_displacement(tmp_path / "flat.h5", u, flat))
    assert np.allclose(a2, flat) and (u2.double() - u).abs().max() < 1e-5
    ants = pytest.importorskip("ants", reason="antspyx is not installed (pip install 'plasticine[ants]')")
    image = ants.image_read(str(case["image_path"]))
    for h5, nifti in ((warp, case["warp"]), (inverse, case["inverse"])):
        a, b = (
            ants.apply_transforms(fixed=image, moving=image, transformlist=[str(f)], interpolator="linear").numpy() for f in (h5, nifti)
        )
        assert np.abs(a - b).max() < 1e-5


def test_h5_without_simpleitk_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "SimpleITK", None)  # import SimpleITK now fails
    with pytest.raises(ImportError, match=r"plasticine\[itk\]"):
        write_itk_displacement(tmp_path / "Warp.h5", torch.zeros(3, 4, 4, 4), np.eye(4))
    assert not list(tmp_path.iterdir())
