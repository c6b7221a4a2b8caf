"""torchio and MONAI images through plasticine.interop, checked against the packages' own readers.

The references are independent of plasticine's conversion: torchio writes a NIfTI file that
plasticine.io reads (and MONAI's LoadImage reads a file plasticine.io wrote), and the tensor and
affine of each must equal what to_tensor makes of the package's object.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from plasticine.interop import from_tensor, to_tensor, translate_image

nib = pytest.importorskip("nibabel", reason="the io extra (nibabel) is not installed")


def oblique_affine() -> np.ndarray:
    """An oblique rotation with anisotropic voxels (0.8, 1.5, 2.5 mm) and an origin, RAS."""
    a, b = 0.3, -0.2
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    out = np.eye(4)
    out[:3, :3] = rz @ rx @ np.diag([0.8, 1.5, 2.5])
    out[:3, 3] = [-12.5, 30.25, 7.0]
    return out


def tio_module():
    return pytest.importorskip("torchio", reason="torchio is not installed (pip install 'plasticine[torchio]')")


def monai_data():
    return pytest.importorskip("monai.data", reason="MONAI is not installed (pip install 'plasticine[monai]')")


def test_tensor_round_trip_is_identity() -> None:
    x = torch.rand(2, 5, 6, 7)
    image, affine = to_tensor(x)
    assert image.shape == (1, 2, 5, 6, 7) and torch.equal(image[0], x)
    np.testing.assert_array_equal(affine, np.eye(4))
    assert torch.equal(from_tensor(image, x), x)


def test_scalar_image_round_trip_keeps_data_and_affine() -> None:
    tio = tio_module()
    a = oblique_affine()
    x = torch.rand(1, 5, 6, 7)
    img = tio.ScalarImage(tensor=x, affine=a)
    image, affine = to_tensor(img)
    assert image.shape == (1, 1, 5, 6, 7) and image.dtype == torch.float32 and torch.equal(image[0], x)
    np.testing.assert_array_equal(affine, a)
    back = from_tensor(image * 2.0, img)
    assert type(back) is tio.ScalarImage and torch.equal(back.data, 2.0 * x)
    np.testing.assert_array_equal(back.affine, a)
    mask = from_tensor((image > 0.5).float(), img, label=True)
    assert type(mask) is tio.LabelMap
    np.testing.assert_array_equal(mask.affine, a)


def test_subject_needs_the_key_of_an_image() -> None:
    tio = tio_module()
    img = tio.ScalarImage(tensor=torch.rand(1, 4, 5, 6), affine=oblique_affine())
    subject = tio.Subject(t1=img)
    image, affine = to_tensor(subject, key="t1")
    assert torch.equal(image[0], img.data)
    np.testing.assert_array_equal(affine, img.affine)
    np.testing.assert_array_equal(from_tensor(image, subject, key="t1").affine, img.affine)
    with pytest.raises(ValueError, match=r"^key: expected the name of an image .*'t1'.*got 't2'"):
        to_tensor(subject, key="t2")
    with pytest.raises(ValueError, match=r"^key: only a torchio.Subject takes a key"):
        to_tensor(img, key="t1")


def test_torchio_file_reads_as_plasticine_reads_it(tmp_path) -> None:
    """torchio writes the file; plasticine.io reads it: same tensor and affine as to_tensor."""
    tio = tio_module()
    from plasticine.io import read_affine, read_image

    a = oblique_affine()
    img = tio.ScalarImage(tensor=torch.rand(1, 5, 6, 7) * 100.0, affine=a)
    path = tmp_path / "t1.nii.gz"
    img.save(path)
    image, affine = to_tensor(tio.ScalarImage(path))
    assert torch.equal(image[0], read_image(path, normalization="none"))
    np.testing.assert_allclose(affine, read_affine(path), atol=1e-6)
    np.testing.assert_allclose(affine, a, atol=1e-5)  # the header holds float32
    normalised, _ = to_tensor(tio.ScalarImage(path), normalization="percentile")
    assert torch.equal(normalised[0], read_image(path))


def test_monai_load_image_matches_plasticine(tmp_path) -> None:
    """plasticine.io writes the file; MONAI's LoadImage reads it (RAS, no reorientation asked)."""
    monai_data()
    from monai.transforms import LoadImage

    from plasticine.io import read_affine, read_image, write_image

    a = oblique_affine()
    x = torch.rand(1, 5, 6, 7)
    path = write_image(tmp_path / "x.nii.gz", x, affine=a)
    meta = LoadImage(image_only=True, ensure_channel_first=True)(str(path))
    image, affine = to_tensor(meta)
    assert torch.equal(image[0], read_image(path, normalization="none"))
    np.testing.assert_allclose(affine, read_affine(path), atol=1e-6)
    back = from_tensor(image + 1.0, meta)
    assert type(back) is type(meta) and torch.equal(back.as_tensor(), x + 1.0)
    assert torch.equal(back.affine, meta.affine) and back.meta["filename_or_obj"] == meta.meta["filename_or_obj"]


def test_metatensor_lps_affine_is_turned_to_ras_and_kept_on_the_way_back() -> None:
    data = monai_data()
    a = oblique_affine()
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ a
    x = torch.rand(1, 4, 5, 6)
    meta = data.MetaTensor(x, affine=torch.as_tensor(lps), meta={"space": "LPS"})
    image, affine = to_tensor(meta)
    np.testing.assert_allclose(affine, a, rtol=0, atol=1e-12)
    back = from_tensor(image, meta)
    assert back.meta["space"] == "LPS" and torch.equal(back.affine, meta.affine) and torch.equal(back.as_tensor(), x)


def test_bad_inputs_name_the_argument() -> None:
    with pytest.raises(ValueError, match=r"^obj: expected a torchio.ScalarImage .* got ndarray"):
        to_tensor(np.zeros((1, 4, 4)))
    with pytest.raises(ValueError, match=r"^obj"):
        to_tensor(torch.zeros(4, 4))
    with pytest.raises(ValueError, match=r"^tensor"):
        from_tensor(torch.zeros(1, 1, 4, 5), torch.zeros(1, 4, 4))
    x = torch.rand(1, 4, 4, 4)
    x[0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"^obj: expected finite values"):
        to_tensor(x)


def test_a_batched_metatensor_is_refused() -> None:
    data = monai_data()
    batch = data.list_data_collate([data.MetaTensor(torch.rand(1, 4, 4, 4)), data.MetaTensor(torch.rand(1, 4, 4, 4))])
    with pytest.raises(ValueError, match=r"^obj: expected one channel-first MetaTensor .*got a batch"):
        to_tensor(batch)


def test_translation_keeps_the_geometry_of_a_2d_torchio_image() -> None:
    tio = tio_module()
    from plasticine.recipes import build_translator

    a = oblique_affine()
    img = tio.ScalarImage(tensor=torch.rand(1, 16, 16, 1), affine=a)  # torchio's 2D: one slice
    translator = build_translator(2, 1, sampler_steps=2, seed=0).eval()
    out, result = translate_image(translator, img, generator=torch.Generator().manual_seed(0))
    assert type(out) is tio.ScalarImage and out.shape == (1, 16, 16, 1)
    np.testing.assert_array_equal(out.affine, a)
    assert torch.equal(out.data[..., 0], result.image[0])
    mask = from_tensor(result.deformation.to_source((result.image > 0.5).float()), img, label=True)
    np.testing.assert_array_equal(mask.affine, a)


def test_translation_keeps_the_geometry_of_a_3d_metatensor() -> None:
    data = monai_data()
    from plasticine.recipes import build_translator

    a = oblique_affine()
    meta = data.MetaTensor(torch.rand(1, 16, 16, 16), affine=torch.as_tensor(a))
    translator = build_translator(3, 1, sampler_steps=2, seed=0).eval()
    out, result = translate_image(translator, meta, generator=torch.Generator().manual_seed(0))
    assert isinstance(out, data.MetaTensor) and out.shape == (1, 16, 16, 16)
    assert torch.equal(out.affine, meta.affine) and torch.equal(out.as_tensor(), result.image[0])
