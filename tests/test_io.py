"""Data I/O: readers against the libraries' own values, round trips, normalisation against numpy, errors naming the file."""

from __future__ import annotations

import json
import os
import re
import sys

import numpy as np
import pytest
import torch
from conftest import make_generator
from hypothesis import given
from hypothesis import strategies as st

from plasticine.core import Deformation
from plasticine.io import (
    ImageFolder,
    ImageReadError,
    UnpairedImages,
    image_format,
    normalize_intensity,
    read_deformation,
    read_image,
    read_points,
    write_deformation,
    write_image,
    write_trace,
)

PIL = pytest.importorskip("PIL.Image", reason="the io extra (pillow) is not installed")
nib = pytest.importorskip("nibabel", reason="the io extra (nibabel) is not installed")


# -- normalisation --------------------------------------------------------------------------------


def test_percentile_normalisation_matches_numpy():
    x = torch.rand(2, 9, 7, generator=make_generator(0), dtype=torch.float64) * 50 - 3
    out = normalize_intensity(x, "percentile", low=2.0, high=97.0)
    for c in range(2):
        a = x[c].numpy()
        lo, hi = np.percentile(a, 2.0), np.percentile(a, 97.0)
        np.testing.assert_allclose(out[c].numpy(), (np.clip(a, lo, hi) - lo) / (hi - lo), atol=1e-12)


@given(
    seed=st.integers(0, 2**31 - 1),
    shape=st.sampled_from([(1, 3, 5), (2, 9, 7), (3, 4, 5, 6), (1, 1, 2)]),
    low=st.floats(0.0, 49.0),
    high=st.floats(51.0, 100.0),
)
def test_percentiles_equal_numpy_on_random_data(seed, shape, low, high):
    x = torch.randn(*shape, generator=make_generator(seed), dtype=torch.float64) * 30
    x[0].view(-1)[0] = x[0].view(-1)[-1]  # a repeated value
    out = normalize_intensity(x, "percentile", low=low, high=high)
    for c in range(shape[0]):
        a = x[c].numpy()
        lo, hi = np.percentile(a, low), np.percentile(a, high)
        expected = (np.clip(a, lo, hi) - lo) / (hi - lo) if hi > lo else np.zeros_like(a)  # a constant image maps to 0
        np.testing.assert_allclose(out[c].numpy(), expected, rtol=0, atol=1e-14)


def test_percentiles_beyond_2_to_the_24_values(tmp_path):
    """torch.quantile refuses more than 2^24 values; a 257 x 256 x 256 uint8 NIfTI (> 2^24 voxels) reads."""
    shape = (257, 256, 256)
    n = int(np.prod(shape))
    assert n > 2**24
    # counts chosen so that both percentiles interpolate between two different values
    a = np.full(n, 1, np.uint8)
    a[: int(np.floor(0.01 * (n - 1))) + 1] = 0
    a[int(np.floor(0.99 * (n - 1))) + 1 :] = 2
    np.random.default_rng(0).shuffle(a.reshape(-1, 64))  # blocks of 64 values in random order
    a = a.reshape(shape)
    lo, hi = np.percentile(a, [1.0, 99.0])
    assert 0 < lo < 1 < hi < 2
    expected = torch.from_numpy(((np.clip(np.arange(3.0), lo, hi) - lo) / (hi - lo)).astype(np.float32))[torch.from_numpy(a).long()]
    out = normalize_intensity(torch.from_numpy(a)[None])
    assert out.dtype == torch.float32
    assert torch.equal(out[0], expected)
    nib.save(nib.Nifti1Image(a, np.eye(4)), tmp_path / "ct.nii")
    x = read_image(tmp_path / "ct.nii")
    assert x.shape == (1,) + shape and x.is_contiguous()
    assert torch.equal(x[0], expected)


def test_any_error_while_reading_names_the_file(tmp_path, monkeypatch):
    import plasticine.io as io

    write_image(tmp_path / "scan.nii", torch.rand(1, 3, 4, 5))

    def broken(*args, **kwargs):
        raise RuntimeError("quantile() input tensor is too large")

    monkeypatch.setattr(io, "normalize_intensity", broken)
    with pytest.raises(ImageReadError, match=r"scan\.nii.*too large"):
        read_image(tmp_path / "scan.nii")


def test_minmax_and_zscore_match_numpy_and_constant_is_zero():
    x = torch.rand(1, 5, 6, 4, generator=make_generator(1), dtype=torch.float64)
    a = x.numpy()
    np.testing.assert_allclose(normalize_intensity(x, "minmax").numpy(), (a - a.min()) / (a.max() - a.min()), atol=1e-12)
    np.testing.assert_allclose(normalize_intensity(x, "zscore").numpy(), (a - a.mean()) / a.std(), atol=1e-12)
    assert torch.equal(normalize_intensity(x, "none"), x)
    const = torch.full((1, 4, 4), 3.0)
    for m in ("percentile", "minmax", "zscore"):
        assert torch.equal(normalize_intensity(const, m), torch.zeros_like(const))


@given(seed=st.integers(0, 2**31 - 1))
def test_percentile_output_in_unit_range_and_order_preserving(seed):
    x = torch.randn(1, 8, 8, generator=make_generator(seed)) * 100
    out = normalize_intensity(x)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    flat, o = x.flatten(), out.flatten()
    i, j = torch.randint(0, 64, (2, 50), generator=make_generator(seed + 1))
    assert bool(((flat[i] <= flat[j]) <= (o[i] <= o[j])).all())  # a <= b implies f(a) <= f(b)


def test_normalisation_errors():
    with pytest.raises(ValueError, match="method"):
        normalize_intensity(torch.rand(1, 4, 4), "softmax")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="NaN"):
        normalize_intensity(torch.tensor([[[float("nan"), 1.0]]]))
    with pytest.raises(ValueError, match="low, high"):
        normalize_intensity(torch.rand(1, 4, 4), low=50, high=10)


# -- PNG ------------------------------------------------------------------------------------------


def test_png_round_trip_is_exact_on_8_bit_values(tmp_path):
    k = torch.randint(0, 256, (1, 11, 7), generator=make_generator(2)).double()
    write_image(tmp_path / "a.png", k / 255.0)
    back = read_image(tmp_path / "a.png", normalization="none")
    assert back.shape == (1, 11, 7) and back.dtype == torch.float32
    assert torch.equal(back.double(), k)
    rgb = torch.rand(3, 5, 6, generator=make_generator(3))
    write_image(tmp_path / "rgb.png", rgb)
    assert read_image(tmp_path / "rgb.png").shape == (3, 5, 6)


def test_png_16_bit_and_modes(tmp_path):
    a = (np.arange(30, dtype=np.uint16).reshape(5, 6) * 2000).astype(np.uint16)
    PIL.fromarray(a).save(tmp_path / "w.png")
    assert np.array_equal(read_image(tmp_path / "w.png", normalization="none")[0].numpy(), a.astype(np.float32))
    PIL.new("RGBA", (4, 4)).save(tmp_path / "alpha.png")
    with pytest.raises(ImageReadError, match="alpha.png.*RGBA"):
        read_image(tmp_path / "alpha.png")
    with pytest.raises(ValueError, match="PNG holds a 2D image"):
        write_image(tmp_path / "v.png", torch.rand(1, 3, 4, 5))


# -- NIfTI ----------------------------------------------------------------------------------------


def test_nifti_round_trip_and_header_scaling(tmp_path):
    v = torch.rand(1, 6, 5, 4, generator=make_generator(4)) * 100
    write_image(tmp_path / "v.nii.gz", v)
    assert torch.equal(read_image(tmp_path / "v.nii.gz", normalization="none"), v)
    # scaled int16 storage: the reader applies scl_slope and scl_inter like nibabel
    data = np.arange(60, dtype=np.int16).reshape(3, 4, 5)
    img = nib.Nifti1Image(data, np.eye(4))
    img.header.set_slope_inter(0.5, -3.0)
    nib.save(img, tmp_path / "s.nii")
    expected = np.asarray(nib.load(tmp_path / "s.nii").dataobj, dtype=np.float64)
    np.testing.assert_allclose(read_image(tmp_path / "s.nii", normalization="none")[0].numpy(), expected)
    np.testing.assert_allclose(expected, data * 0.5 - 3.0)
    # a 4D series: the last axis becomes the channels; a 2D image has one channel
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((4, 5, 3, 2)).astype(np.float32), np.eye(4)), tmp_path / "t.nii.gz")
    assert read_image(tmp_path / "t.nii.gz").shape == (2, 4, 5, 3)
    write_image(tmp_path / "two.nii.gz", torch.rand(1, 7, 3))
    assert read_image(tmp_path / "two.nii.gz").shape == (1, 7, 3)


def test_slices_of_a_volume(tmp_path):
    v = torch.rand(1, 6, 5, 4, generator=make_generator(5))
    write_image(tmp_path / "vol.nii.gz", v)
    write_image(tmp_path / "flat.png", torch.rand(1, 6, 5, generator=make_generator(6)))
    ds = ImageFolder(tmp_path / "vol.nii.gz", axis=1, slices=(1, -1), normalization="none")
    assert len(ds) == 3 and [it.slice for it in ds.items] == [1, 2, 3]
    for i, s in enumerate((1, 2, 3)):
        assert torch.equal(ds[i], v[:, :, s])
    assert ds.name(0) == "vol_s0001"
    whole = ImageFolder(tmp_path, normalization="none")  # a folder: sorted, volumes stay 3D
    assert [p.name for p in whole.files] == ["flat.png", "vol.nii.gz"]
    assert whole[1].shape == (1, 6, 5, 4)
    with pytest.raises(ImageReadError, match="vol.nii.gz.*differs"):
        whole.stack()
    with pytest.raises(ValueError, match="needs axis"):
        ImageFolder(tmp_path, slices=(0, 2))


def test_real_nibabel_anatomical():
    from nibabel.testing import data_path

    path = os.path.join(data_path, "anatomical.nii")
    if not os.path.exists(path):
        pytest.skip("nibabel's test data (anatomical.nii) is not installed with this nibabel")
    ref = np.asarray(nib.load(path).dataobj, dtype=np.float64)
    x = read_image(path, normalization="none")
    assert x.shape == (1,) + ref.shape
    np.testing.assert_allclose(x[0].numpy(), ref.astype(np.float32))
    ds = ImageFolder(path, axis=2, slices=(10, 12))
    assert len(ds) == 2 and ds[0].shape == (1,) + ref.shape[:2]
    assert 0.0 <= float(ds[0].min()) and float(ds[0].max()) <= 1.0


# -- DICOM ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])
def test_real_pydicom_files(name):
    pydicom = pytest.importorskip("pydicom", reason="the io extra (pydicom) is not installed")
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom's test file {name} is not available")
    ds = pydicom.dcmread(path)
    expected = ds.pixel_array.astype(np.float64) * float(getattr(ds, "RescaleSlope", 1)) + float(getattr(ds, "RescaleIntercept", 0))
    x = read_image(path, normalization="none")
    assert x.shape == (1,) + ds.pixel_array.shape
    np.testing.assert_allclose(x[0].numpy(), expected)
    if name == "CT_small.dcm":
        assert float(x.min()) < -500  # Hounsfield units: air is far below zero


def _pydicom_file(name):
    pydicom = pytest.importorskip("pydicom", reason="the io extra (pydicom) is not installed")
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom's test file {name} is not available")
    return pydicom, path


def test_dicom_rescale_slope_and_intercept_are_applied(tmp_path):
    pydicom, path = _pydicom_file("MR_small.dcm")
    ds = pydicom.dcmread(path)
    ds.RescaleSlope, ds.RescaleIntercept = 2.5, -7
    ds.save_as(tmp_path / "scaled.dcm")
    x = read_image(tmp_path / "scaled.dcm", normalization="none")
    np.testing.assert_allclose(x[0].numpy(), ds.pixel_array * 2.5 - 7)


def test_dicom_monochrome1_is_inverted(tmp_path):
    """MONOCHROME1 shows the minimum white: read, it is the inverse of the same pixels as MONOCHROME2."""
    pydicom, path = _pydicom_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    raw = ds.pixel_array.astype(np.float64)  # signed 16 bits: the stored range is [-32768, 32767]
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "mono1.dcm")
    mono2 = read_image(path, normalization="none")
    mono1 = read_image(tmp_path / "mono1.dcm", normalization="none")
    slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
    np.testing.assert_allclose(mono2[0].numpy(), raw * slope + intercept)
    np.testing.assert_allclose(mono1[0].numpy(), (-1 - raw) * slope + intercept)
    for method in ("minmax", "percentile"):  # brighter is higher: the normalised images are complements
        a, b = read_image(path, normalization=method), read_image(tmp_path / "mono1.dcm", normalization=method)
        np.testing.assert_allclose(b.numpy(), 1 - a.numpy(), atol=1e-6)


def test_dicom_monochrome1_unsigned_inverts_over_bits_stored(tmp_path):
    pydicom = pytest.importorskip("pydicom", reason="the io extra (pydicom) is not installed")
    from pydicom.dataset import Dataset, FileMetaDataset

    if not hasattr(Dataset, "set_pixel_data"):
        pytest.skip("needs pydicom >= 3 (Dataset.set_pixel_data)")
    raw = np.array([[0, 1, 2], [100, 4000, 4095]], dtype=np.uint16)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.set_pixel_data(raw, "MONOCHROME1", 12)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # secondary capture
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    ds.save_as(tmp_path / "u12.dcm", enforce_file_format=True)
    assert pydicom.dcmread(tmp_path / "u12.dcm").PhotometricInterpretation == "MONOCHROME1"
    np.testing.assert_array_equal(read_image(tmp_path / "u12.dcm", normalization="none")[0].numpy(), 4095 - raw)


def test_dicom_palette_colour_is_mapped_to_rgb_not_read_as_indices(tmp_path):
    pydicom, path = _pydicom_file("examples_palette.dcm")
    try:
        from pydicom.pixels import apply_color_lut
    except ImportError:
        from pydicom.pixel_data_handlers.util import apply_color_lut
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "PALETTE COLOR"
    x = read_image(path, normalization="none")
    rgb = apply_color_lut(ds.pixel_array, ds)
    assert x.shape == (3,) + ds.pixel_array.shape
    np.testing.assert_array_equal(np.moveaxis(x.numpy(), 0, -1), rgb)
    del ds.RedPaletteColorLookupTableData  # a palette without its table is refused, naming the file
    ds.save_as(tmp_path / "nolut.dcm")
    with pytest.raises(ImageReadError, match=r"nolut\.dcm"):
        read_image(tmp_path / "nolut.dcm")


@pytest.mark.parametrize("photometric, samples", [("HSV", 3), ("ARGB", 4), ("MONOCHROME2", 3), ("RGB", 1)])
def test_dicom_unsupported_photometric_interpretations_are_refused(tmp_path, photometric, samples):
    pydicom, path = _pydicom_file("MR_small.dcm")
    ds = pydicom.dcmread(path)
    ds.PhotometricInterpretation, ds.SamplesPerPixel = photometric, samples
    ds.save_as(tmp_path / "odd.dcm")
    with pytest.raises(ImageReadError, match=rf"odd\.dcm: photometric interpretation .*{photometric}"):
        read_image(tmp_path / "odd.dcm")


def test_dicom_ybr_colour_reads_as_rgb():
    pydicom, path = _pydicom_file("SC_ybr_full_422_uncompressed.dcm")
    if not hasattr(pydicom, "pixels"):
        pytest.skip("YBR colour needs pydicom >= 3")
    from pydicom.pixels import pixel_array

    x = read_image(path, normalization="none")
    np.testing.assert_array_equal(np.moveaxis(x.numpy(), 0, -1), pixel_array(path, as_rgb=True))


# -- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["bad.png", "bad.nii.gz", "bad.nii", "bad.dcm"])
def test_damaged_files_raise_naming_the_file(tmp_path, name):
    (tmp_path / name).write_bytes(b"this is not an image")
    with pytest.raises(ImageReadError, match=name.replace(".", r"\.")):
        read_image(tmp_path / name)
    with pytest.raises(ImageReadError, match=name.replace(".", r"\.")):
        ImageFolder(tmp_path)


def test_other_errors(tmp_path):
    with pytest.raises(ImageReadError, match=r"x\.gif: unsupported"):
        image_format(tmp_path / "x.gif")
    with pytest.raises(ImageReadError, match="no such file"):
        read_image(tmp_path / "missing.png")
    with pytest.raises(ImageReadError, match="no supported image"):
        ImageFolder(tmp_path)
    nan = nib.Nifti1Image(np.array([[[np.nan, 1.0]]], dtype=np.float32), np.eye(4))
    nib.save(nan, tmp_path / "nan.nii")
    with pytest.raises(ImageReadError, match=r"nan\.nii.*NaN"):
        read_image(tmp_path / "nan.nii")


def test_missing_library_says_what_to_install(tmp_path, monkeypatch):
    write_image(tmp_path / "v.nii", torch.rand(1, 3, 3, 3))
    monkeypatch.setitem(sys.modules, "nibabel", None)
    with pytest.raises(ImportError, match=r"nibabel.*plasticine\[io\]"):
        read_image(tmp_path / "v.nii")


# -- deformations, traces, points -----------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".npz", ".nii.gz", ".nii"])
@pytest.mark.parametrize("shape", [(7, 5), (4, 6, 5)])
def test_deformation_round_trip(tmp_path, suffix, shape):
    n = len(shape)
    g = make_generator(7)
    d = Deformation(torch.randn(2, n, *shape, generator=g), torch.randn(2, n, *shape, generator=g), torch.randn(2, n, *shape, generator=g))
    path = write_deformation(tmp_path / f"d{suffix}", d, index=1)
    e = read_deformation(path)
    assert torch.equal(e.forward, d.forward[1:]) and torch.equal(e.inverse, d.inverse[1:])
    if suffix == ".npz":
        assert torch.equal(e.velocity, d.velocity[1:])
    else:
        assert (tmp_path / f"d_inverse{suffix}").is_file()
        assert nib.load(path).header.get_intent()[0] == "vector"


def test_trace_file_is_atomic_and_round_trips(tmp_path):
    src = torch.tensor([[1.0, 2.0], [3.5, 4.0]])
    tgt = src + 0.25
    path = write_trace(tmp_path / "t.json", src, tgt, input="x.png", start_step=3)
    doc = json.loads(path.read_text())
    assert doc["format"] == "plasticine-trace" and doc["input"] == "x.png" and doc["start_step"] == 3
    assert torch.equal(read_points(path), src) and torch.equal(read_points(path, which="target"), tgt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.json"]  # no temporary file left
    write_trace(path, tgt, src)  # replaced in place
    assert torch.equal(read_points(path), tgt)
    with pytest.raises(ValueError, match="reserved"):
        write_trace(tmp_path / "u.json", src, tgt, points=[])


def test_points_files(tmp_path):
    (tmp_path / "p.csv").write_text("# comment\nz,y,x\n1,2,3\n4 5 6\n")
    assert read_points(tmp_path / "p.csv").tolist() == [[1, 2, 3], [4, 5, 6]]
    (tmp_path / "p.json").write_text(json.dumps({"points": [[1, 2]]}))
    assert read_points(tmp_path / "p.json").tolist() == [[1, 2]]
    (tmp_path / "bad.json").write_text("[[1, 2], [3]]")
    with pytest.raises(ImageReadError, match=r"bad\.json"):
        read_points(tmp_path / "bad.json")
    (tmp_path / "bad.txt").write_text("1 2\nthree four\n")
    with pytest.raises(ImageReadError, match=r"bad\.txt"):
        read_points(tmp_path / "bad.txt")


def test_unpaired_images_use_every_image():
    src = [torch.full((1, 2, 2), float(i)) for i in range(3)]
    tgt = [torch.full((1, 2, 2), float(10 + i)) for i in range(5)]
    ds = UnpairedImages(src, tgt, seed=3)
    assert len(ds) == 5
    pairs = [ds[i] for i in range(5)]
    assert {float(y[0, 0, 0]) for _, y in pairs} == {10.0, 11.0, 12.0, 13.0, 14.0}
    assert {float(x[0, 0, 0]) for x, _ in pairs} == {0.0, 1.0, 2.0}


# -- non-finite and malformed deformations, points, traces ----------------------------------------


def test_non_finite_deformations_are_refused_on_read_and_write(tmp_path):
    f = torch.zeros(3, 4, 5, 6)
    bad = f.clone()
    bad[1, 2, 3, 4] = float("nan")
    np.savez(tmp_path / "nan.npz", forward=bad.numpy(), inverse=f.numpy())
    with pytest.raises(ImageReadError, match=r"nan\.npz: the forward field has 1 NaN"):
        read_deformation(tmp_path / "nan.npz")
    np.savez(tmp_path / "big.npz", forward=f.numpy(), inverse=np.full(f.shape, 1e300))  # beyond float32
    with pytest.raises(ImageReadError, match=r"big\.npz: the inverse field"):
        read_deformation(tmp_path / "big.npz")
    vec = np.zeros((4, 5, 6, 1, 3), np.float32)
    nib.save(nib.Nifti1Image(vec, np.eye(4)), tmp_path / "d.nii.gz")
    vec[0, 0, 0, 0, 0] = np.inf
    nib.save(nib.Nifti1Image(vec, np.eye(4)), tmp_path / "d_inverse.nii.gz")
    with pytest.raises(ImageReadError, match=r"d_inverse\.nii\.gz: the inverse field has 1 NaN, infinite"):
        read_deformation(tmp_path / "d.nii.gz")
    # writing: a deformation whose fields turned non-finite after construction is refused, nothing written
    d = Deformation(f[None].clone(), f[None].clone(), f[None].clone())
    d.velocity[0, 0, 0, 0, 0] = float("inf")
    for name in ("w.npz", "w.nii.gz"):
        with pytest.raises(ValueError, match=rf"{re.escape(name)}: the velocity field has 1 NaN"):
            write_deformation(tmp_path / name, d)
        assert not (tmp_path / name).exists()
    d.velocity[0, 0, 0, 0, 0] = 0.0
    d.inverse[0, 1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"w\.npz: the inverse field has 1 NaN"):
        write_deformation(tmp_path / "w.npz", d)


@pytest.mark.parametrize(
    "arrays, match",
    [
        ({"forward": np.zeros((2, 3, 4))}, "expected arrays 'forward' and 'inverse'"),
        ({"forward": np.zeros((2, 3, 4)), "inverse": np.zeros((2, 3, 5))}, r"one shape \(N, \*S\)"),
        ({"forward": np.zeros(()), "inverse": np.zeros(())}, r"one shape \(N, \*S\)"),
        ({"forward": np.zeros((4, 3, 4)), "inverse": np.zeros((4, 3, 4))}, r"N = 2 or 3"),
        ({"forward": np.zeros((2, 3, 4)), "inverse": np.zeros((2, 3, 4)), "velocity": np.zeros((2, 3))}, r"velocity \(2, 3\)"),
        ({"forward": np.array(["a", "b"]), "inverse": np.zeros(2)}, "real numbers"),
        ({"forward": np.zeros((2, 3, 4), complex), "inverse": np.zeros((2, 3, 4))}, "real numbers"),
    ],
)
def test_malformed_deformation_files_name_the_file(tmp_path, arrays, match):
    np.savez(tmp_path / "m.npz", **arrays)
    with pytest.raises(ImageReadError, match=rf"m\.npz: .*{match}"):
        read_deformation(tmp_path / "m.npz")


def test_two_dimensional_nifti_deformation_with_several_slices_is_refused(tmp_path):
    vec = np.zeros((4, 5, 2, 1, 2), np.float32)  # N = 2 but Z = 2: the second slice would be dropped
    for name in ("d.nii", "d_inverse.nii"):
        nib.save(nib.Nifti1Image(vec, np.eye(4)), tmp_path / name)
    with pytest.raises(ImageReadError, match=r"d\.nii: expected a vector image"):
        read_deformation(tmp_path / "d.nii")


@pytest.mark.parametrize(
    "doc, match",
    [
        ({"format": "plasticine-trace", "version": 1}, "'points' to be a list"),
        ({"format": "plasticine-trace", "version": 1, "points": [{"target": [1, 2]}]}, "'points' to be a list"),
        ({"format": "plasticine-trace", "version": 1, "points": [[1, 2]]}, "'points' to be a list"),
        ({"format": "plasticine-trace", "version": 1, "points": {"source": [1, 2]}}, "'points' to be a list"),
        ({"format": "plasticine-trace", "version": 1, "points": [{"source": 3}]}, "point 0: expected a list of 2 or 3 numbers"),
        ({"format": "plasticine-trace", "version": 1, "points": [{"source": [1, 2]}, {"source": [1, 2, 3]}]}, "point 1"),
        ({"format": "plasticine-trace", "version": 2, "points": []}, "version 1"),
        ({"format": "plasticine-trace", "version": 1, "points": []}, "non-empty list"),
        ({"points": [[True, False]]}, "point 0"),
        ({"points": [["1", "2"]]}, "point 0"),
        ({"points": [[1, None]]}, "point 0"),
        ({"points": [[10**400, 1]]}, "finite"),
        ({"points": [[1e39, 1]]}, "finite float32"),
        ({"points": "1 2"}, "non-empty list"),
        ({"coordinates": [[1, 2]]}, "an object with 'points'"),
        ([[1, 2], [3, 4, 5]], "point 1"),
        ([1, 2], "point 0"),
        ([[[1, 2]]], "point 0"),
        (3, "non-empty list"),
        (None, "non-empty list"),
    ],
)
def test_malformed_points_files_name_the_file(tmp_path, doc, match):
    (tmp_path / "p.json").write_text(json.dumps(doc))
    with pytest.raises(ImageReadError, match=rf"p\.json: .*{match}") as info:
        read_points(tmp_path / "p.json")
    assert "\n" not in str(info.value)


def test_points_files_that_are_not_text_or_json(tmp_path):
    (tmp_path / "p.csv").write_bytes(b"1,2\n\xff\xfe3,4\n")
    with pytest.raises(ImageReadError, match=r"p\.csv: expected UTF-8 text.*0xff"):
        read_points(tmp_path / "p.csv")
    (tmp_path / "deep.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(ImageReadError, match=r"deep\.json: not valid JSON"):
        read_points(tmp_path / "deep.json")
    (tmp_path / "empty.csv").write_text("# nothing\nx,y\n")
    with pytest.raises(ImageReadError, match=r"empty\.csv: expected a non-empty list"):
        read_points(tmp_path / "empty.csv")
    (tmp_path / "nan.csv").write_text("1,nan\n")
    with pytest.raises(ImageReadError, match=r"nan\.csv: coordinates must be finite"):
        read_points(tmp_path / "nan.csv")
    with pytest.raises(ValueError, match="which: expected 'source' or 'target'"):
        read_points(tmp_path / "nan.csv", which="both")  # type: ignore[arg-type]


def test_png_values_outside_the_unit_range_are_refused_not_clipped(tmp_path):
    for image, found in ((torch.full((1, 3, 4), 1.5), r"\[1\.5, 1\.5\]"), (torch.linspace(-0.25, 1, 12).reshape(1, 3, 4), r"\[-0\.25, 1\]")):
        with pytest.raises(ValueError, match=rf"x\.png: a PNG holds values in \[0, 1\], the image has {found}"):
            write_image(tmp_path / "x.png", image)
        assert not (tmp_path / "x.png").exists()
    with pytest.raises(ValueError, match=r"x\.nii: .*float32 range"):
        write_image(tmp_path / "x.nii", torch.full((1, 3, 4), 1e300, dtype=torch.float64))


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_written_files_get_the_permissions_of_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        f = torch.zeros(1, 2, 3, 4)
        paths = [
            write_image(tmp_path / "a.png", torch.rand(1, 3, 4)),
            write_image(tmp_path / "a.nii.gz", torch.rand(1, 3, 4)),
            write_deformation(tmp_path / "d.npz", Deformation(f, f)),
            write_deformation(tmp_path / "d.nii", Deformation(f, f)),
            tmp_path / "d_inverse.nii",
            write_trace(tmp_path / "t.json", torch.zeros(1, 2), torch.zeros(1, 2)),
        ]
    finally:
        os.umask(old)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in paths} == {p.name: oct(0o640) for p in paths}
