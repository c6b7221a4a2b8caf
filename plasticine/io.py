r"""Reading and writing images, deformations and trace files.

**Reading.** :func:`read_image` reads one file into a ``(C, *S)`` float32 tensor in the array
order of the file (no reorientation):

* PNG (and other Pillow formats: ``.png``, ``.jpg``, ``.jpeg``, ``.tif``, ``.tiff``, ``.bmp``):
  grayscale (8, 16 or 32 bit) gives ``C = 1``, RGB gives ``C = 3``; images with an alpha channel or a
  palette are refused (convert them first), so that nothing is dropped silently;
* NIfTI (``.nii``, ``.nii.gz``, read with nibabel): a 3D volume gives ``(1, X, Y, Z)`` in nibabel's
  array order with the scaling of the header applied; a 4D series gives ``(T, X, Y, Z)``; a 2D image
  (or a volume with one slice, ``(X, Y, 1)``) gives ``(1, X, Y)``;
* DICOM (``.dcm``, read with pydicom): the modality LUT is applied (``RescaleSlope`` and
  ``RescaleIntercept``, so CT values are in Hounsfield units); a single frame gives ``(1, H, W)``,
  a multi-frame file ``(1, F, H, W)``, a colour image ``(3, H, W)`` (``(3, F, H, W)``). The
  photometric interpretation is applied: ``MONOCHROME1`` (minimum shown white) is inverted over
  the stored range, :math:`x \mapsto l + h - x` with :math:`[l, h]` the range of ``BitsStored``
  bits, before the modality LUT, so that higher is brighter as for ``MONOCHROME2``;
  ``PALETTE COLOR`` is mapped through its palette to RGB (never read as indices); ``RGB`` and
  ``YBR_*`` (converted to RGB by pydicom >= 3) give RGB; any other interpretation is refused. No
  VOI window is applied (the normalisation below plays its part).

The ``io`` extra (``pip install 'plasticine[io]'``) installs Pillow, nibabel and pydicom; each is
imported only when a file of its format is read, and a missing one raises an
:class:`ImportError` that says what to install. Writing PNG needs none of them.

Memory: reading gives a float32 array in C order in one pass from the file's data (NIfTI stores
Fortran order), and the percentiles partition one copy of it (:func:`numpy.percentile`, no size
limit); the peak is about twice the float32 result plus the file's own array.

**Geometry.** :func:`read_affine` gives the ``(4, 4)`` voxel-to-world (RAS, mm) affine of a file in
the tensor axis order of :func:`read_image` (which never reorders axes): the NIfTI header's affine,
DICOM's position, orientation and spacing (LPS turned into RAS), the identity for PNG. A 2D image
keeps a 4 x 4 affine whose third column is the axis across its plane. :meth:`ImageFolder.affine`
gives the affine of each item (of each slice: see below); :func:`write_image`,
:func:`write_deformation` and :func:`write_itk_deformation` write it, :func:`write_trace` records it
with the points in world coordinates, and :func:`read_points` reads world points back to voxels.

**2D slices of 3D volumes.** With ``axis`` (0, 1 or 2, a spatial axis of the volume) every slice
along that axis is an item of :class:`ImageFolder`; ``slices=(start, stop)`` keeps the slices
``start <= i < stop`` (Python ``range`` semantics, negative values count from the end). The affine
of slice ``i`` along axis ``a`` is the volume's affine ``A`` restricted to the two kept axes, in
order, with the sliced axis as its third column and the origin moved onto the slice:
``[A[:, k0], A[:, k1], A[:, a], A[:, 3] + i A[:, a]]``, so the slice sits where it was in the volume.

**Intensity normalisation** (:func:`normalize_intensity`), per image and channel:

* ``"percentile"`` (the default): clip to the 1st and 99th percentiles :math:`[q_l, q_h]` and map to
  :math:`[0, 1]`, :math:`x' = (\mathrm{clip}(x, q_l, q_h) - q_l) / (q_h - q_l)`; robust to a few
  very bright voxels and the scale the shipped translators are trained on;
* ``"minmax"``: :math:`x' = (x - \min x) / (\max x - \min x)`, in :math:`[0, 1]`;
* ``"zscore"``: :math:`x' = (x - \mu) / \sigma` over the whole image;
* ``"none"``: the stored values (after the header scaling or modality LUT).

A constant image (zero range or zero deviation) maps to zeros.

**Writing.** :func:`write_image` writes PNG (2D, 8-bit grey or RGB, by a built-in encoder; values
must lie in :math:`[0, 1]`, others are refused rather than clipped) or NIfTI (2D or 3D, float32,
identity affine unless one is given); :func:`write_deformation` writes a
:class:`~plasticine.core.Deformation` as ``.npz`` (``forward``, ``inverse`` and, if present,
``velocity``, each ``(N, *S)`` float32 in voxels) or as NIfTI vector images (the forward
displacement in the named file, the inverse next to it with the suffix ``_inverse``; array shape
``(X, Y, Z, 1, N)`` with ``Z = 1`` in 2D, intent ``vector``); :func:`write_trace` writes a JSON
trace file. :func:`write_itk_deformation` writes phi and phi^-1 as the ITK / ANTs displacement
fields ``<prefix>Warp.nii.gz`` and ``<prefix>InverseWarp.nii.gz`` (LPS millimetres on the grid of a
given affine, see :func:`write_itk_displacement` and :doc:`/conventions`), which
``ants.apply_transforms``, ``antsApplyTransforms`` and SimpleITK's ``DisplacementFieldTransform``
apply; :func:`read_itk_deformation` reads them back. Every file is replaced atomically (temporary file in the same folder, then
:func:`os.replace`).

Every reading error, whatever the library raised, is one line naming the file and what was
expected: :class:`ImageReadError` (a :class:`ValueError`); only a missing package is an
:class:`ImportError`. Non-finite values are refused when reading and when writing.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from .core.deformation import Deformation
from .core.shapes import check_shape

__all__ = [
    "SUFFIXES",
    "TRACE_FORMAT",
    "ImageFolder",
    "ImageReadError",
    "ItkFormat",
    "Normalization",
    "UnpairedImages",
    "check_itk_affine",
    "image_format",
    "normalize_intensity",
    "png_bytes",
    "read_affine",
    "read_deformation",
    "read_image",
    "read_itk_deformation",
    "read_itk_displacement",
    "read_points",
    "voxel_spacing",
    "write_deformation",
    "write_image",
    "write_itk_deformation",
    "write_itk_displacement",
    "write_trace",
]

Normalization = Literal["percentile", "minmax", "zscore", "none"]
Format = Literal["pillow", "nifti", "dicom"]

#: Supported file name endings by format.
SUFFIXES: dict[str, tuple[str, ...]] = {
    "pillow": (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"),
    "nifti": (".nii", ".nii.gz"),
    "dicom": (".dcm", ".dicom"),
}

#: The ``format`` field of a trace file.
TRACE_FORMAT = "plasticine-trace"

_EXTRA = "pip install 'plasticine[io]'"


class ImageReadError(ValueError):
    """A file could not be read as an image, a deformation or a points list; the message names it."""


def _import(module: str, what: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        package = {"PIL": "pillow"}.get(module, module)
        extra = _EXTRA if module != "SimpleITK" else "pip install 'plasticine[itk]'"
        raise ImportError(f"{what} needs the {package} package: {extra} (or pip install {package})") from err


def image_format(path: str | os.PathLike[str]) -> Format:
    """The format of a file, from its name (case-insensitive).

    Args:
        path: the file name.

    Returns:
        ``"pillow"``, ``"nifti"`` or ``"dicom"``.

    Raises:
        ImageReadError: for an unsupported ending, naming the file and the supported ones.

    Shape:
        Not applicable.
    """
    name = Path(path).name.lower()
    for fmt, suffixes in SUFFIXES.items():
        if name.endswith(suffixes):
            return fmt  # type: ignore[return-value]
    known = ", ".join(s for group in SUFFIXES.values() for s in group)
    raise ImageReadError(f"{path}: unsupported file type (expected one of {known})")


def normalize_intensity(image: torch.Tensor, method: Normalization = "percentile", *, low: float = 1.0, high: float = 99.0) -> torch.Tensor:
    r"""Normalise the intensities of one image, each channel on its own (see the module docstring).

    Args:
        image: the image.
        method: ``"percentile"`` (clip to the ``low`` and ``high`` percentiles, map to [0, 1]),
            ``"minmax"`` (map to [0, 1]), ``"zscore"`` (zero mean, unit deviation) or ``"none"``.
        low: lower percentile of ``"percentile"``, in ``[0, high)``.
        high: upper percentile of ``"percentile"``, in ``(low, 100]``.

    Returns:
        The normalised image, float32 (float64 stays float64); a constant channel maps to zeros.

    Raises:
        ValueError: for an unknown method, bad percentiles or non-finite values.

    Shape:
        image: ``(C, *S)``; out: ``(C, *S)``.

    Example:
        >>> normalize_intensity(torch.tensor([[0.0, 5.0, 10.0]]), "minmax").tolist()
        [[0.0, 0.5, 1.0]]
    """
    check_shape(image, "C *S", "image", spatial=(1, 2, 3))
    if method not in ("percentile", "minmax", "zscore", "none"):
        raise ValueError(f"method: expected 'percentile', 'minmax', 'zscore' or 'none', got {method!r}")
    if not 0.0 <= low < high <= 100.0:
        raise ValueError(f"low, high: expected 0 <= low < high <= 100, got {low}, {high}")
    x = image if image.dtype == torch.float64 else image.to(torch.float32)
    if not _finite(x):
        raise ValueError(f"image: expected finite values, found {int((~torch.isfinite(x)).sum())} NaN or infinite value(s)")
    if method == "none":
        return x
    flat = x.reshape(x.shape[0], -1)
    if method == "zscore":
        lo, hi = flat.mean(1), None
        span = flat.std(1, correction=0)
    else:
        q = _percentiles(flat, (low, high)).to(x.dtype) if method == "percentile" else torch.stack([flat.amin(1), flat.amax(1)], 1)
        lo, hi = q[:, 0], q[:, 1]
        span = hi - lo
    out = torch.empty_like(flat)  # filled channel by channel: one temporary of the image's size at most
    for c in range(flat.shape[0]):
        if not span[c] > 0:
            out[c].zero_()
            continue
        if method == "percentile":
            torch.clamp(flat[c], lo[c], hi[c], out=out[c])
            out[c].sub_(lo[c])
        else:
            torch.sub(flat[c], lo[c], out=out[c])
        out[c].div_(span[c])
    return out.reshape(x.shape)


def _finite(x: torch.Tensor) -> bool:
    """Whether every value is finite, with no temporary of the tensor's size (min and max propagate NaN)."""
    return x.numel() == 0 or bool(torch.isfinite(torch.stack([x.amin(), x.amax()]).double()).all())


def _percentiles(flat: torch.Tensor, percents: tuple[float, ...]) -> torch.Tensor:
    """Percentiles of each row as :func:`numpy.percentile` (``"linear"``), float64; no size limit.

    ``torch.quantile`` refuses more than 2^24 values; :func:`numpy.percentile` partitions one copy of a row.
    """
    rows = flat.detach().cpu().numpy()
    return torch.tensor([np.percentile(row, percents).tolist() for row in rows], dtype=torch.float64, device=flat.device)


def _read_pillow(Image: Any, path: Path) -> np.ndarray:
    with Image.open(path) as im:
        im.load()
        mode = im.mode
        if mode in ("L", "I", "F", "I;16", "I;16B", "I;16L", "1"):
            return np.asarray(im.convert("F") if mode == "1" else im).astype(np.float32)[None]
        if mode == "RGB":
            return np.moveaxis(np.asarray(im).astype(np.float32), -1, 0)
        raise ImageReadError(f"{path}: Pillow mode {mode!r} is not supported (expected a grayscale or RGB image; convert images with alpha or a palette first)")


def _read_nifti(nib: Any, path: Path) -> np.ndarray:
    proxy = nib.load(str(path)).dataobj
    raw = np.asanyarray(proxy.get_unscaled())
    while raw.ndim > 3 and raw.shape[-1] == 1:
        raw = raw[..., 0]
    if raw.ndim == 2:
        raw = raw[None]
    elif raw.ndim == 3:
        raw = raw[None, :, :, 0] if raw.shape[2] == 1 else raw[None]
    elif raw.ndim == 4:
        raw = np.moveaxis(raw, -1, 0)
    else:
        raise ImageReadError(f"{path}: expected a 2D, 3D or 4D NIfTI image, got array shape {raw.shape}")
    data = raw.astype(np.float32, order="C")  # one pass from the file's (Fortran) order to float32 in C order
    slope, inter = float(proxy.slope), float(proxy.inter)  # the header's scaling, in place
    if slope != 1.0:
        data *= np.float32(slope)
    if inter != 0.0:
        data += np.float32(inter)
    return data


#: Samples per pixel of each supported DICOM photometric interpretation.
_PHOTOMETRIC = {"MONOCHROME1": 1, "MONOCHROME2": 1, "PALETTE COLOR": 1, "RGB": 3, "YBR_FULL": 3, "YBR_FULL_422": 3, "YBR_ICT": 3, "YBR_RCT": 3}


def _read_dicom(pydicom: Any, path: Path) -> np.ndarray:
    try:
        from pydicom.pixels import apply_color_lut, apply_modality_lut
    except ImportError:  # pydicom < 3
        from pydicom.pixel_data_handlers.util import apply_color_lut, apply_modality_lut
    ds = pydicom.dcmread(str(path))
    if "PixelData" not in ds:
        raise ImageReadError(f"{path}: the DICOM file holds no pixel data")
    pi = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    samples = int(ds.get("SamplesPerPixel", 1))
    if pi not in _PHOTOMETRIC:
        raise ImageReadError(f"{path}: photometric interpretation {pi!r} is not supported (expected one of {', '.join(_PHOTOMETRIC)})")
    if samples != _PHOTOMETRIC[pi]:
        raise ImageReadError(f"{path}: photometric interpretation {pi} needs {_PHOTOMETRIC[pi]} sample(s) per pixel, the file has {samples}")
    if pi.startswith("YBR") and not hasattr(pydicom, "pixels"):
        raise ImageReadError(f"{path}: reading {pi} colour needs pydicom >= 3 (which converts it to RGB): pip install 'pydicom>=3'")
    arr = ds.pixel_array  # pydicom >= 3 converts YBR_* to RGB
    if pi == "PALETTE COLOR":
        return np.moveaxis(np.asarray(apply_color_lut(arr, ds), dtype=np.float32), -1, 0)
    if samples == 3:
        return np.moveaxis(np.asarray(arr, dtype=np.float32), -1, 0)
    if pi == "MONOCHROME1":  # the minimum is white: invert over the stored range, so that higher is brighter
        bits = int(ds.BitsStored)
        lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if int(ds.get("PixelRepresentation", 0)) == 1 else (0, 2**bits - 1)
        arr = (lo + hi) - arr.astype(np.int64)
    return np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)[None]


#: The package each format is read with, and its reader.
_READERS = {"pillow": ("PIL.Image", _read_pillow), "nifti": ("nibabel", _read_nifti), "dicom": ("pydicom", _read_dicom)}


def read_image(path: str | os.PathLike[str], *, normalization: Normalization = "percentile") -> torch.Tensor:
    """Read one PNG, NIfTI or DICOM file into a float tensor (see the module docstring).

    Memory: the float32 result, one temporary of its size (the percentiles) and the file's own
    array.

    Args:
        path: the file.
        normalization: see :func:`normalize_intensity`.

    Returns:
        The image, float32.

    Raises:
        ImageReadError: for a missing, unsupported, damaged or non-finite file, or one that cannot
            be normalised (the message names the file).
        ImportError: when the package of the format is not installed.

    Shape:
        out: ``(C, *S)`` with 2 or 3 spatial dimensions.
    """
    path = Path(path)
    fmt = image_format(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: no such file")
    package, reader = _READERS[fmt]
    module = _import(package, f"reading {path.name}")
    try:
        arr = reader(module, path)
    except ImageReadError:
        raise
    except Exception as err:  # every library raises its own types
        raise ImageReadError(f"{path}: cannot read as {fmt} ({type(err).__name__}: {_one_line(err)})") from err
    if arr.ndim not in (3, 4) or min(arr.shape[1:]) < 1:
        raise ImageReadError(f"{path}: expected a 2D or 3D image, got array shape {arr.shape}")
    image = torch.from_numpy(np.ascontiguousarray(arr))
    if not _finite(image):
        raise ImageReadError(f"{path}: contains {int((~torch.isfinite(image)).sum())} NaN or infinite value(s) (as float32)")
    try:
        return normalize_intensity(image, normalization).to(torch.float32)
    except Exception as err:
        raise ImageReadError(f"{path}: cannot normalise ({normalization!r}): {type(err).__name__}: {_one_line(err)}") from err


def _check_file_affine(path: Path, a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.shape != (4, 4) or not np.isfinite(a).all() or abs(np.linalg.det(a[:3, :3])) < 1e-12:
        raise ImageReadError(f"{path}: expected a finite, invertible 4 x 4 voxel-to-world affine in the header, got {np.round(a, 6).tolist()}")
    return a


def _dicom_affine(pydicom: Any, path: Path) -> np.ndarray:
    """Voxel -> RAS of a DICOM file, in the axis order of :func:`_read_dicom`: (row, column) or (frame, row, column)."""
    ds = pydicom.dcmread(str(path), stop_before_pixels=True)
    spacing = [float(v) for v in ds.get("PixelSpacing", [1.0, 1.0])]
    across = float(ds.get("SpacingBetweenSlices", ds.get("SliceThickness", 1.0)) or 1.0)
    if len(spacing) != 2 or min(spacing) <= 0 or across <= 0:
        raise ImageReadError(f"{path}: expected PixelSpacing of two values > 0 and a slice spacing > 0, got {spacing} and {across}")
    iop, ipp = ds.get("ImageOrientationPatient"), ds.get("ImagePositionPatient")
    frames = int(ds.get("NumberOfFrames", 1) or 1) > 1
    if iop is None or ipp is None:  # no geometry: the identity scaled by the spacings
        return np.diag(([across] if frames else []) + spacing + ([] if frames else [across]) + [1.0])
    row, col = np.array([float(v) for v in iop[:3]]), np.array([float(v) for v in iop[3:]])  # row: along a row (column index grows)
    rows, cols, normal = col * spacing[0], row * spacing[1], np.cross(row, col) * across  # the row index moves along the column direction
    lps = np.eye(4)
    lps[:3, :3] = np.stack([normal, rows, cols] if frames else [rows, cols, normal], axis=1)
    lps[:3, 3] = [float(v) for v in ipp]
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def read_affine(path: str | os.PathLike[str]) -> np.ndarray:
    r"""The voxel-to-world (RAS, millimetres) affine of an image file, in :func:`read_image`'s axis order.

    :math:`x = A_{:3,:3}\, p + A_{:3,3}` is the world position of voxel ``p`` (tensor axis order,
    padded with a 0 for 2D images). NIfTI: the header's affine (sform, else qform, else the voxel
    sizes, as nibabel's ``img.affine``); :func:`read_image` keeps the file's array axes, so the
    columns need no reordering. DICOM: ``ImagePositionPatient`` (origin), ``ImageOrientationPatient``
    (row and column directions), ``PixelSpacing`` and ``SpacingBetweenSlices`` (else
    ``SliceThickness``, else 1) along the normal, turned from LPS to RAS; a multi-frame file has the
    frame axis first, along the normal; without position and orientation, the identity scaled by the
    spacings. PNG and the other Pillow formats: the identity. Only the header is read.

    Args:
        path: the file.

    Returns:
        The float64 affine.

    Raises:
        ImageReadError: for a missing or unsupported file, or a header without a finite,
            invertible affine, naming the file.
        ImportError: when the package of the format is not installed.

    Shape:
        out: ``(4, 4)``; a 2D image's third column is the axis across its plane.
    """
    path = Path(path)
    fmt = image_format(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: no such file")
    if fmt == "pillow":
        return np.eye(4)
    module = _import(_READERS[fmt][0], f"reading {path.name}")
    try:
        a = module.load(str(path)).affine if fmt == "nifti" else _dicom_affine(module, path)
    except ImageReadError:
        raise
    except Exception as err:  # every library raises its own types
        raise ImageReadError(f"{path}: cannot read the affine of this {fmt} file ({type(err).__name__}: {_one_line(err)})") from err
    return _check_file_affine(path, a)


def _slice_affine(affine: np.ndarray, axis: int, index: int) -> np.ndarray:
    """The 4 x 4 affine of slice ``index`` along spatial ``axis`` of a volume: kept axes first, the sliced axis third."""
    kept = [k for k in range(3) if k != axis]
    a = np.array(affine, dtype=np.float64)
    out = np.eye(4)
    out[:3, :3] = a[:3, [kept[0], kept[1], axis]]
    out[:3, 3] = a[:3, 3] + index * a[:3, axis]
    return out


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


@dataclass(frozen=True)
class _Item:
    path: Path
    slice: int | None


class ImageFolder(torch.utils.data.Dataset):
    """The images of a folder (or a list of files), one item per image or per 2D slice.

    The files are read once, at construction (sorted by name); unsupported names are skipped when
    a folder is listed and refused when named. With ``axis``, each 3D volume becomes its slices
    along that spatial axis (2D files are kept as they are); without it a volume is one 3D item.
    Intensities are normalised per file (per volume for slices), see :func:`normalize_intensity`.

    Args:
        root: a folder, one file, or a sequence of files.
        axis: spatial axis of the volumes to slice along (0, 1 or 2), or None.
        slices: ``(start, stop)`` range of slice indices to keep (Python ``range`` semantics), or
            None for all; only with ``axis``.
        normalization: see :func:`normalize_intensity`.
        recursive: list sub-folders too.

    Raises:
        ImageReadError: for an empty selection or a file that cannot be read.

    Shape:
        item: ``(C, *S)`` float32.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        *,
        axis: int | None = None,
        slices: tuple[int, int] | None = None,
        normalization: Normalization = "percentile",
        recursive: bool = False,
    ) -> None:
        if axis is not None and axis not in (0, 1, 2):
            raise ValueError(f"axis: expected None, 0, 1 or 2, got {axis!r}")
        if slices is not None and axis is None:
            raise ValueError("slices: a slice range needs axis= (the axis to slice along)")
        if slices is not None and (len(slices) != 2 or not all(isinstance(s, int) for s in slices)):
            raise ValueError(f"slices: expected (start, stop) integers, got {slices!r}")
        self.files = self._list(root, recursive)
        self.axis, self.slice_range, self.normalization = axis, slices, normalization
        self.items: list[_Item] = []
        self._images: list[torch.Tensor] = []
        self._affines: dict[Path, np.ndarray] = {}
        for path in self.files:
            image = read_image(path, normalization=normalization)
            if axis is None or image.dim() == 3:
                self.items.append(_Item(path, None))
                self._images.append(image)
                continue
            depth = image.shape[1 + axis]
            indices = range(depth) if slices is None else range(depth)[slice(*slices)]
            for i in indices:
                self.items.append(_Item(path, i))
                self._images.append(image.select(1 + axis, i).contiguous())
        if not self.items:
            raise ImageReadError(f"{root}: no image selected (files {[str(f) for f in self.files]}, axis={axis}, slices={slices})")

    @staticmethod
    def _list(root: Any, recursive: bool) -> list[Path]:
        if isinstance(root, (str, os.PathLike)):
            path = Path(root)
            if path.is_dir():
                found = path.rglob("*") if recursive else path.iterdir()
                files = []
                for f in found:
                    if not f.is_file():
                        continue
                    try:
                        image_format(f)
                    except ImageReadError:
                        continue
                    files.append(f)
                if not files:
                    raise ImageReadError(f"{path}: the folder holds no supported image file (expected names ending in {sorted(s for g in SUFFIXES.values() for s in g)})")
                return sorted(files)
            if not path.exists():
                raise ImageReadError(f"{path}: no such file or folder")
            image_format(path)
            return [path]
        files = [Path(f) for f in root]
        for f in files:
            image_format(f)
        if not files:
            raise ImageReadError("expected at least one file, got an empty list")
        return files

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self._images[index]

    def affine(self, index: int) -> np.ndarray:
        """The voxel-to-world (RAS, mm) affine of item ``index``: its file's (:func:`read_affine`) or its slice's.

        A slice ``i`` along ``axis`` gets the volume's affine with the two kept axes as its first
        columns, the sliced axis as the third and the origin moved onto the slice (see the module
        docstring). The file's header is read at the first call.

        Args:
            index: the item.

        Returns:
            The float64 affine.

        Raises:
            ImageReadError: when the file's header holds no usable affine.

        Shape:
            out: ``(4, 4)``.
        """
        item = self.items[index]
        if item.path not in self._affines:
            self._affines[item.path] = read_affine(item.path)
        a = self._affines[item.path]
        return a.copy() if item.slice is None else _slice_affine(a, self.axis, item.slice)

    def name(self, index: int) -> str:
        """A file-name stem for item ``index``: the file name without its ending, plus ``_s<slice>``.

        Args:
            index: the item.

        Returns:
            The name.

        Shape:
            Not applicable.
        """
        item = self.items[index]
        stem = item.path.name
        for suffix in sorted((s for g in SUFFIXES.values() for s in g), key=len, reverse=True):
            if stem.lower().endswith(suffix):
                stem = stem[: -len(suffix)]
                break
        return stem if item.slice is None else f"{stem}_s{item.slice:04d}"

    def stack(self) -> torch.Tensor:
        """All items as one batch.

        Returns:
            The batch.

        Raises:
            ImageReadError: when the items differ in shape, naming the first two files that do.

        Shape:
            out: ``(n, C, *S)``.
        """
        first = self._images[0].shape
        for item, image in zip(self.items, self._images):
            if image.shape != first:
                raise ImageReadError(
                    f"{item.path}: shape {tuple(image.shape)} differs from {tuple(first)} of {self.items[0].path}; "
                    "every image of a set must have the same channels and size (resample them first)"
                )
        return torch.stack(self._images)


class UnpairedImages(torch.utils.data.Dataset):
    """Unpaired (source, target) items for training the registration network.

    Item ``i`` is ``(source[i % n_s], target[order[i] % n_t])`` for ``i < max(n_s, n_t)``, with
    ``order`` a random permutation drawn once from ``seed``: every image is used, and sources meet
    targets of other subjects.

    Args:
        source: the source images.
        target: the target images.
        seed: seed of the pairing.

    Shape:
        item: ``((C, *S), (C, *S))``.
    """

    def __init__(self, source: torch.utils.data.Dataset, target: torch.utils.data.Dataset, *, seed: int = 0) -> None:
        self.source, self.target = source, target
        n = max(len(source), len(target))  # type: ignore[arg-type]
        self.order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return int(self.order.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.source[index % len(self.source)], self.target[int(self.order[index]) % len(self.target)]  # type: ignore[arg-type]


# -- writing --------------------------------------------------------------------------------------


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith((".nii", ".nii.gz"))


def _write_nifti(path: Path, array: np.ndarray, affine: np.ndarray | None, intent: str | None = None, *, scanner: bool = False) -> None:
    """Write a float32 NIfTI atomically; ``scanner`` also stores the affine as the qform (both codes 1, units mm), as ITK does."""
    nib = _import("nibabel", f"writing {path.name}")
    with np.errstate(over="ignore"):
        data32 = np.asarray(array, dtype=np.float32)
    if not np.isfinite(data32).all():
        raise ValueError(f"{path}: expected values within the float32 range of a NIfTI file, found {int((~np.isfinite(data32)).sum())} beyond it")
    if affine is not None:
        affine = np.asarray(affine, dtype=np.float64)
        if affine.shape != (4, 4) or not np.isfinite(affine).all():
            raise ValueError(f"affine: expected a finite 4 x 4 matrix for {path.name}, got shape {affine.shape}")
    img = nib.Nifti1Image(data32, np.eye(4) if affine is None else affine)
    if intent is not None:
        img.header.set_intent(intent)
    if scanner:
        img.set_sform(affine, code="scanner")
        img.set_qform(affine, code="scanner")
        img.header.set_xyzt_units("mm", "sec")
    data = img.to_bytes()
    if path.name.lower().endswith(".gz"):
        import gzip

        data = gzip.compress(data, mtime=0)
    _atomic_bytes(path, data)


def _atomic_bytes(path: Path, data: bytes) -> None:
    from .checkpoint import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data)


def png_bytes(u8: np.ndarray) -> bytes:
    """The bytes of an 8-bit PNG of a ``uint8`` array (built-in encoder: zlib, no filter, no Pillow).

    Args:
        u8: grey or RGB pixels.

    Returns:
        The PNG file's bytes (what :func:`write_image` writes for a PNG).

    Shape:
        u8: ``(H, W)`` grey or ``(H, W, 3)`` RGB.
    """

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    h, w = u8.shape[:2]
    rows = np.concatenate([np.zeros((h, 1), np.uint8), np.ascontiguousarray(u8, dtype=np.uint8).reshape(h, -1)], axis=1)
    header = struct.pack(">IIBBBBB", w, h, 8, 0 if u8.ndim == 2 else 2, 0, 0, 0)  # 8 bits, grey or RGB, no interlace
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)) + chunk(b"IEND", b"")


def write_image(path: str | os.PathLike[str], image: torch.Tensor, *, affine: np.ndarray | None = None) -> Path:
    """Write one image: PNG for 2D (``.png``), NIfTI for 2D or 3D (``.nii``, ``.nii.gz``).

    PNG: 1 or 3 channels, values in :math:`[0, 1]` (others are refused, not clipped: clamp or
    normalise first) stored as 8 bits (:math:`\\mathrm{round}(255 x)`) by a built-in encoder, so
    writing a PNG needs no optional package. NIfTI: float32, channels as the last axis when
    ``C > 1``, ``affine`` (4 x 4, identity by default) as the header's affine. Folders are created;
    the file is replaced atomically.

    Args:
        path: the file.
        image: the image.
        affine: voxel-to-world affine of a NIfTI file.

    Returns:
        The path.

    Raises:
        ValueError: naming the file, for a bad shape, non-finite values, PNG values outside
            :math:`[0, 1]`, values beyond float32 in NIfTI, or a format that cannot hold the image.

    Shape:
        image: ``(C, *S)``; a PNG of ``(C, H, W)`` has ``H`` rows and ``W`` columns.
    """
    path = Path(path)
    dims = check_shape(image, "C *S", "image", spatial=(2, 3))
    arr = image.detach().to("cpu", torch.float64).numpy()
    if not np.isfinite(arr).all():
        raise ValueError(f"{path}: image: expected finite values, found {int((~np.isfinite(arr)).sum())} NaN or infinite value(s)")
    if _is_nifti(path):
        data = arr[0] if dims["C"] == 1 else np.moveaxis(arr, 0, -1)
        if dims["C"] > 1 and dims["N"] == 2:
            data = data[:, :, None, :]  # (X, Y, 1, C): the 4th NIfTI axis holds the channels
        _write_nifti(path, data, affine)
        return path
    if not path.name.lower().endswith(".png"):
        raise ValueError(f"{path}: expected a file name ending in .png, .nii or .nii.gz")
    if dims["N"] != 2:
        raise ValueError(f"{path}: a PNG holds a 2D image, got spatial size {dims['S']} (write .nii.gz for 3D)")
    if dims["C"] not in (1, 3):
        raise ValueError(f"{path}: a PNG holds 1 or 3 channels, got {dims['C']}")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"{path}: a PNG holds values in [0, 1], the image has [{lo:.6g}, {hi:.6g}] (clamp or normalise it first)")
    u8 = np.round(arr * 255.0).astype(np.uint8)
    _atomic_bytes(path, png_bytes(u8[0] if dims["C"] == 1 else np.moveaxis(u8, 0, -1)))
    return path


def _inverse_path(path: Path) -> Path:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return path.with_name(name[: -len(suffix)] + "_inverse" + name[-len(suffix) :])
    raise ValueError(f"{path}: not a NIfTI name")


def write_deformation(path: str | os.PathLike[str], deformation: Deformation, *, index: int = 0, affine: np.ndarray | None = None) -> Path:
    """Write batch item ``index`` of a deformation as ``.npz`` or NIfTI (see the module docstring).

    The displacements stay in voxels (tensor axis order) in both formats; ``affine`` is the header
    of the NIfTI files (the grid's place in the world, for viewers), not a change of units. For
    fields that other tools apply, see :func:`write_itk_deformation`.

    Args:
        path: ``.npz``, ``.nii`` or ``.nii.gz``.
        deformation: the deformation.
        index: the batch item.
        affine: ``(4, 4)`` voxel-to-world affine of the NIfTI files (identity by default; an
            ``.npz`` file holds no affine and refuses one).

    Returns:
        The path (of the forward field for NIfTI).

    Raises:
        ValueError: for an unknown ending or index, or a field with non-finite values (naming the
            file and the field; nothing is written).

    Shape:
        deformation fields: ``(B, N, *S)``; each written array ``(N, *S)`` (npz) or
        ``(X, Y, Z, 1, N)`` (NIfTI, ``Z = 1`` in 2D).
    """
    path = Path(path)
    B = deformation.forward.shape[0]
    if not 0 <= index < B:
        raise ValueError(f"index: expected 0 <= index < {B}, got {index}")
    fields = {"forward": deformation.forward[index], "inverse": deformation.inverse[index]}
    if deformation.velocity is not None:
        fields["velocity"] = deformation.velocity[index]
    arrays = {k: v.detach().to("cpu", torch.float32).numpy() for k, v in fields.items()}
    for key, a in arrays.items():
        if not np.isfinite(a).all():
            raise ValueError(f"{path}: the {key} field has {int((~np.isfinite(a)).sum())} NaN, infinite or beyond-float32 value(s); refusing to write it")
    if affine is not None and not _is_nifti(path):
        raise ValueError(f"affine: {path.name} holds voxel displacements without a header; give an affine only for .nii or .nii.gz")
    if path.name.lower().endswith(".npz"):
        import io as _io

        buf = _io.BytesIO()
        np.savez_compressed(buf, **arrays, convention=np.array("phi(p) = p + forward(p), voxels, tensor axis order; inverse is phi^-1"))
        _atomic_bytes(path, buf.getvalue())
        return path
    if _is_nifti(path):
        for target, key in ((path, "forward"), (_inverse_path(path), "inverse")):
            a = np.moveaxis(arrays[key], 0, -1)
            spatial = a.shape[:-1] + ((1,) if a.ndim == 3 else ())  # 2D fields get a Z axis of size 1
            _write_nifti(target, a.reshape(spatial + (1, a.shape[-1])), affine, "vector")
        return path
    raise ValueError(f"{path}: expected a file name ending in .npz, .nii or .nii.gz")


def read_deformation(path: str | os.PathLike[str]) -> Deformation:
    """Read a deformation written by :func:`write_deformation` (batch of one).

    Args:
        path: ``.npz`` or the forward NIfTI file (its ``_inverse`` file must sit next to it).

    Returns:
        The :class:`~plasticine.core.Deformation`, float32.

    Raises:
        ImageReadError: for a missing, malformed or non-finite file, naming it.
        ImportError: when nibabel is needed and not installed.

    Shape:
        fields: ``(1, N, *S)``.
    """
    path = Path(path)
    if path.name.lower().endswith(".npz"):
        files = {"forward": path, "inverse": path, "velocity": path}
    elif _is_nifti(path):
        files = {"forward": path, "inverse": _inverse_path(path)}
    else:
        raise ImageReadError(f"{path}: expected a deformation file ending in .npz, .nii or .nii.gz")
    for p in dict.fromkeys(files.values()):
        if not p.is_file():
            raise ImageReadError(f"{p}: no such file" + ("" if p == path else " (a NIfTI deformation is a forward file and its _inverse file)"))
    nib = _import("nibabel", f"reading {path.name}") if _is_nifti(path) else None
    current = path
    try:
        if nib is None:
            with np.load(path, allow_pickle=False) as z:
                if not {"forward", "inverse"} <= set(z.files):
                    raise ImageReadError(f"{path}: expected arrays 'forward' and 'inverse', found {sorted(z.files)}")
                raw = {k: z[k] for k in files if k in z.files}
        else:
            raw = {}
            for key, current in files.items():
                raw[key] = np.asanyarray(nib.load(str(current)).dataobj)
    except ImageReadError:
        raise
    except Exception as err:  # zip, zlib, pickle refusal, NIfTI header...
        raise ImageReadError(f"{current}: cannot read the deformation ({type(err).__name__}: {_one_line(err)})") from err
    fields: dict[str, np.ndarray] = {}
    for key, a in raw.items():
        if a.dtype.kind not in "iuf":
            raise ImageReadError(f"{files[key]}: expected real numbers in the {key} field, got dtype {a.dtype}")
        if nib is not None:  # (X, Y, Z, 1, N) -> (N, X, Y, Z), or (N, X, Y) for N = 2 (Z = 1)
            if a.ndim != 5 or a.shape[3] != 1 or a.shape[4] not in (2, 3) or (a.shape[4] == 2 and a.shape[2] != 1):
                raise ImageReadError(f"{files[key]}: expected a vector image of shape (X, Y, Z, 1, N) with N = 3, or N = 2 and Z = 1, got {a.shape}")
            a = np.moveaxis(a[:, :, 0, 0, :] if a.shape[4] == 2 else a[..., 0, :], -1, 0)
        with np.errstate(over="ignore"):  # beyond float32 becomes inf, refused below
            fields[key] = np.ascontiguousarray(a, dtype=np.float32)
    f = fields["forward"]
    n = f.shape[0] if f.ndim else 0
    if n not in (2, 3) or f.ndim != n + 1 or min(f.shape) < 1 or any(a.shape != f.shape for a in fields.values()):
        shapes = ", ".join(f"{k} {a.shape}" for k, a in fields.items())
        raise ImageReadError(f"{path}: expected fields of one shape (N, *S) with N = 2 or 3 spatial axes, got {shapes}")
    for key, a in fields.items():
        if not np.isfinite(a).all():
            raise ImageReadError(f"{files[key]}: the {key} field has {int((~np.isfinite(a)).sum())} NaN, infinite or beyond-float32 value(s); expected finite displacements")
    v = fields.get("velocity")
    return Deformation(torch.from_numpy(f)[None], torch.from_numpy(fields["inverse"])[None], None if v is None else torch.from_numpy(v)[None])


def write_trace(
    path: str | os.PathLike[str],
    source_points: torch.Tensor,
    target_points: torch.Tensor,
    *,
    affine: np.ndarray | None = None,
    **metadata: Any,
) -> Path:
    r"""Write a trace file: corresponding points in the source and in the translation, as JSON.

    The file is ``{"format": "plasticine-trace", "version": 1, "units": "voxel", "axis_order":
    "tensor", "points": [{"source": [...], "target": [...]}, ...], **metadata}``, written
    atomically (temporary file in the same folder, then :func:`os.replace`). With ``affine`` (the
    voxel-to-world matrix of the grid both sides lie on) it also holds ``"affine"`` (the 4 x 4 as
    lists), ``"world_units": "mm RAS"`` and ``"world_points": [{"source": [x, y, z], "target":
    [x, y, z]}, ...]``, :math:`x = A_{:3,:3}\, p + A_{:3,3}` (a 2D point padded with a 0 across
    its plane), which :func:`read_points` reads with ``space="world"``.

    Args:
        path: the file.
        source_points: voxel coordinates in the source, tensor axis order.
        target_points: the same points in the target.
        affine: ``(4, 4)`` voxel-to-world (RAS, mm) affine of the grid, or None.
        **metadata: JSON values stored alongside (input file, start step, seed...).

    Returns:
        The path.

    Raises:
        ValueError: for mismatched or non-finite points, or metadata that is not JSON data.

    Shape:
        source_points, target_points: ``(P, N)``.
    """
    dims = check_shape(source_points, "P N", "source_points")
    check_shape(target_points, "P N", "target_points", bindings=dims)
    for name, p in (("source_points", source_points), ("target_points", target_points)):
        if not bool(torch.isfinite(p).all()):
            raise ValueError(f"{name}: expected finite coordinates")
    reserved = {"format", "version", "units", "axis_order", "points", "affine", "world_units", "world_points"} & set(metadata)
    if reserved:
        raise ValueError(f"metadata: the keys {sorted(reserved)} are reserved")
    doc = {
        "format": TRACE_FORMAT,
        "version": 1,
        "units": "voxel",
        "axis_order": "tensor",
        "points": [{"source": s, "target": t} for s, t in zip(source_points.tolist(), target_points.tolist())],
    }
    if affine is not None:
        a = _point_affine(affine, dims["N"])
        worlds = [_voxel_to_world(p, a).tolist() for p in (source_points, target_points)]
        doc.update(affine=a.tolist(), world_units="mm RAS", world_points=[{"source": s, "target": t} for s, t in zip(*worlds)])
    doc.update(metadata)
    try:
        text = json.dumps(doc, indent=1)
    except TypeError as err:
        raise ValueError(f"metadata: expected JSON values: {err}") from err
    path = Path(path)
    _atomic_bytes(path, text.encode())
    return path


def read_points(
    path: str | os.PathLike[str],
    *,
    which: Literal["source", "target"] = "source",
    space: Literal["voxel", "world"] = "voxel",
    affine: np.ndarray | None = None,
    ndim: int | None = None,
) -> torch.Tensor:
    r"""Read points: a trace file, a JSON list of coordinate lists, or a CSV/text table.

    Accepted: a trace file of :func:`write_trace` (version 1; its ``which`` side); JSON
    ``[[...], ...]`` or ``{"points": [[...], ...]}``; ``.csv``/``.txt`` with one point per line,
    coordinates separated by commas or white space (lines starting with ``#`` and header lines
    before the first point are skipped). The file is UTF-8 text; coordinates are numbers (not
    booleans), voxels in tensor axis order.

    With ``space="world"`` the coordinates are world positions ``(x, y, z)`` in millimetres (RAS,
    the space of a NIfTI affine; a trace file's ``world_points``) and come back as voxels of the
    grid of ``affine``, :math:`p = A^{-1} x`. For a 2D grid (``ndim=2``) the third voxel coordinate
    is the distance across the plane: a point more than half a voxel off the plane is refused (it
    does not lie in the image), one within it gets the first two coordinates.

    Args:
        path: the file.
        which: the side of a trace file to read, ``"source"`` or ``"target"``.
        space: ``"voxel"`` (tensor axis order) or ``"world"`` (RAS mm).
        affine: ``(4, 4)`` voxel-to-world affine of the grid; needed with ``space="world"``.
        ndim: spatial dimensions of the grid with ``space="world"`` (default 3).

    Returns:
        float32 points in voxels.

    Raises:
        ValueError: for a bad ``which``, ``space``, ``affine`` or ``ndim``.
        ImageReadError: for a missing or malformed file, or world points that are not 3
            coordinates or lie off a 2D grid's plane, naming it.

    Shape:
        out: ``(P, N)`` with ``P >= 1`` and ``N`` = 2 or 3 (``ndim`` with ``space="world"``).
    """
    if which not in ("source", "target"):
        raise ValueError(f"which: expected 'source' or 'target', got {which!r}")
    if space not in ("voxel", "world"):
        raise ValueError(f"space: expected 'voxel' or 'world', got {space!r}")
    if space == "voxel":
        if affine is not None or ndim is not None:
            raise ValueError("affine, ndim: only with space='world' (voxel points need no affine)")
        return _read_point_rows(Path(path), which, "points")
    if affine is None:
        raise ValueError("affine: world points need the voxel-to-world affine of the grid, got None")
    n = 3 if ndim is None else ndim
    if n not in (2, 3):
        raise ValueError(f"ndim: expected 2 or 3, got {ndim!r}")
    path = Path(path)
    world = _read_point_rows(path, which, "world_points")
    if world.shape[1] != 3:
        raise ImageReadError(f"{path}: world points are 3 RAS coordinates (x, y, z) in mm, got {world.shape[1]} per point")
    a = _point_affine(affine, n)
    voxels = torch.from_numpy(np.linalg.solve(a[:3, :3], (world.double().numpy() - a[:3, 3]).T).T)
    if n == 2:
        off = voxels[:, 2].abs()
        if bool((off > 0.5).any()):
            i = int(off.argmax())
            raise ImageReadError(
                f"{path}: world point {i} {world[i].tolist()} lies {float(voxels[i, 2]):.4g} voxels off the plane of the 2D image (expected within 0.5)"
            )
        voxels = voxels[:, :2]
    return voxels.to(torch.float32)


def _point_affine(affine: Any, n: int) -> np.ndarray:
    """A checked finite, invertible float64 ``(4, 4)`` voxel-to-world affine for ``n``-D points."""
    if isinstance(affine, torch.Tensor):
        affine = affine.detach().to("cpu", torch.float64).numpy()
    a = np.asarray(affine, dtype=np.float64) if np.asarray(affine).dtype.kind in "iuf" else None
    if a is None or a.shape != (4, 4) or not np.isfinite(a).all() or not np.array_equal(a[3], [0.0, 0.0, 0.0, 1.0]):
        raise ValueError(f"affine: expected a finite 4 x 4 voxel-to-world matrix with last row (0, 0, 0, 1), got {_brief(np.asarray(affine).tolist())}")
    if abs(np.linalg.det(a[:3, :3])) < 1e-12:
        raise ValueError(f"affine: expected an invertible matrix, got {_brief(a.tolist())}")
    return a


def voxel_spacing(affine: Any, ndim: int) -> tuple[float, ...]:
    r"""The voxel size in mm along each spatial axis of an image, in the tensor's axis order.

    Tensor axis :math:`i` steps along column :math:`i` of the voxel-to-world affine :math:`A`
    (see the module docstring; a 2D image or slice keeps its two axes as the first columns), so
    its voxel size is the column norm :math:`h_i = \lVert A_{:3, i} \rVert_2`, for any
    rotation, mirroring or shear. This is the ``spacing`` the regularisers and the iterative
    registration take (see :doc:`/conventions`).

    Args:
        affine: a finite, invertible ``(4, 4)`` voxel-to-world matrix (numpy or torch), e.g. from
            :func:`read_affine` or :meth:`ImageFolder.affine`.
        ndim: the number of spatial dimensions of the image, 2 or 3.

    Returns:
        ``ndim`` positive floats.

    Raises:
        ValueError: naming ``affine`` or ``ndim``, for a matrix that is not a finite invertible
            affine or a dimension other than 2 or 3.

    Shape:
        affine: ``(4, 4)``; out: ``(ndim,)`` tuple.

    Example:
        >>> voxel_spacing(np.diag([-2.0, 2.0, 3.0, 1.0]), 3)
        (2.0, 2.0, 3.0)
    """
    if isinstance(ndim, bool) or ndim not in (2, 3):
        raise ValueError(f"ndim: expected 2 or 3 spatial dimensions, got {ndim!r}")
    a = _point_affine(affine, ndim)
    return tuple(float(v) for v in np.linalg.norm(a[:3, :ndim], axis=0))


def _voxel_to_world(points: torch.Tensor, a: np.ndarray) -> np.ndarray:
    """``(P, N)`` voxel points (a 2D point padded with 0 across its plane) as ``(P, 3)`` RAS mm."""
    p = points.detach().to("cpu", torch.float64).numpy()
    p = np.concatenate([p, np.zeros((len(p), 3 - p.shape[1]))], axis=1)
    return p @ a[:3, :3].T + a[:3, 3]


def _read_point_rows(path: Path, which: str, key: str) -> torch.Tensor:
    """The ``(P, N)`` rows of a points file; ``key`` is the list of a trace file to read."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: no such file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ImageReadError(f"{path}: expected UTF-8 text (a JSON or CSV points file), found byte 0x{err.object[err.start]:02x} at offset {err.start}") from None
    except OSError as err:
        raise ImageReadError(f"{path}: cannot read ({type(err).__name__}: {_one_line(err)})") from err
    rows: Any
    if path.suffix.lower() == ".json":
        try:
            doc = json.loads(text)
        except (ValueError, RecursionError) as err:
            raise ImageReadError(f"{path}: not valid JSON ({type(err).__name__}: {_one_line(err)})") from None
        if isinstance(doc, dict) and doc.get("format") == TRACE_FORMAT:
            if doc.get("version") != 1:
                raise ImageReadError(f"{path}: expected trace file version 1, got {_brief(doc.get('version'))}")
            if key != "points" and key not in doc:
                raise ImageReadError(f"{path}: the trace file holds no {key!r} (it was written without an affine)")
            pairs = doc.get(key)
            if not isinstance(pairs, list) or not all(isinstance(p, dict) and which in p for p in pairs):
                raise ImageReadError(f"{path}: expected the trace file's {key!r} to be a list of {{'source': [...], 'target': [...]}} objects, got {_brief(pairs)}")
            rows = [p[which] for p in pairs]
        elif isinstance(doc, dict):
            if "points" not in doc:
                raise ImageReadError(f"{path}: expected a list of points or an object with 'points', got an object with keys {_brief(sorted(doc))}")
            rows = doc["points"]
        else:
            rows = doc
    else:
        rows = []
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.replace(",", " ").split()
            try:
                rows.append([float(p) for p in parts])
            except ValueError:
                if rows:
                    raise ImageReadError(f"{path}: a line is not a list of numbers: {_brief(line)}") from None
    return _points(path, rows)


def _brief(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _points(path: Path, rows: Any) -> torch.Tensor:
    """Rows of 2 or 3 numbers (the same count each) as a finite float32 ``(P, N)`` tensor."""
    if not isinstance(rows, list) or not rows:
        raise ImageReadError(f"{path}: expected a non-empty list of points of 2 or 3 coordinates, got {_brief(rows)}")
    for i, row in enumerate(rows):
        if (
            not isinstance(row, list)
            or len(row) not in (2, 3)
            or len(row) != len(rows[0])
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in row)
        ):
            raise ImageReadError(f"{path}: point {i}: expected a list of 2 or 3 numbers like the first point, got {_brief(row)}")
    try:
        values = [[float(v) for v in row] for row in rows]
    except OverflowError:
        raise ImageReadError(f"{path}: coordinates must be finite (an integer is too large for a float)") from None
    pts = torch.tensor(values, dtype=torch.float64)
    if not bool(torch.isfinite(pts).all()) or bool((pts.abs() > torch.finfo(torch.float32).max).any()):
        raise ImageReadError(f"{path}: coordinates must be finite float32 numbers")
    return pts.to(torch.float32)


# -- ITK / ANTs displacement fields ---------------------------------------------------------------

_ITK_INTENTS = {1007: "vector", 1006: "dispvect"}
"""NIfTI intent codes read as a displacement field (ITK and ANTs write 1007)."""

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])
"""NIfTI world (RAS) to ITK physical space (LPS): x and y change sign; its own inverse."""


def _itk_affine(affine: Any, n: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """The checked 4 x 4 voxel -> RAS affine and ``M``, the ``(n, n)`` matrix voxel vector -> LPS mm.

    ITK stores an image's geometry as origin, spacing and a direction matrix, so the voxel axes must
    be orthogonal (no shear); a 2D ITK image lies in the world x-y plane.
    """
    if isinstance(affine, torch.Tensor):
        if not affine.is_floating_point():
            raise ValueError(f"affine: expected a floating-point 4 x 4 matrix{where}, got dtype {affine.dtype}")
        affine = affine.detach().to("cpu", torch.float64).numpy()
    a = np.asarray(affine)
    if a.dtype.kind != "f":
        raise ValueError(f"affine: expected a floating-point 4 x 4 matrix{where}, got dtype {a.dtype}")
    a = a.astype(np.float64)
    if a.shape != (4, 4) or not np.isfinite(a).all():
        raise ValueError(
            f"affine: expected a finite 4 x 4 voxel-to-world matrix{where}, got shape {a.shape}"
            + ("" if a.shape != (4, 4) else " with non-finite values")
        )
    if not np.array_equal(a[3], [0.0, 0.0, 0.0, 1.0]):
        raise ValueError(f"affine: expected the last row (0, 0, 0, 1){where}, got {a[3].tolist()}")
    spacing = np.linalg.norm(a[:3, :3], axis=0)  # all three columns: ITK reads the file's 3 x 3 direction also in 2D
    if spacing.min() <= 0:
        raise ValueError(f"affine: expected voxel axes of non-zero length{where}, got spacings {spacing.tolist()}")
    direction = a[:3, :3] / spacing
    gram = direction.T @ direction
    if np.abs(gram - np.eye(3)).max() > 1e-5:
        raise ValueError(
            f"affine: ITK images have orthogonal voxel axes (origin, spacing, direction); the affine{where} shears them (cosines {np.round(gram[np.triu_indices(3, 1)], 6).tolist()})"
        )
    if n == 2 and np.abs(a[2, :2]).max() > 1e-6 * spacing.max():
        raise ValueError(f"affine: a 2D ITK image lies in the world x-y plane; expected affine[2, :2] = 0{where}, got {a[2, :2].tolist()}")
    return a, _RAS_TO_LPS[:n, :n] @ a[:n, :n]


def check_itk_affine(affine: Any, ndim: int) -> np.ndarray:
    """Check that an ITK image can hold the grid of ``affine`` (see :func:`write_itk_displacement`).

    ITK stores a grid as origin, spacing and direction, so the voxel axes must be orthogonal (any
    rotation, mirroring and anisotropic spacing is fine), and a 2D ITK image lies in the world x-y
    plane (``affine[2, :2] = 0``). Use it to refuse a grid before any work is done.

    Args:
        affine: the ``(4, 4)`` voxel-to-world (RAS, mm) matrix, numpy or torch, floating.
        ndim: the spatial dimensions of the grid, 2 or 3.

    Returns:
        The affine as float64.

    Raises:
        ValueError: for a bad ``ndim``, or an affine that is not a finite floating 4 x 4 matrix with
            orthogonal voxel axes (in the x-y plane in 2D), saying which.

    Shape:
        affine: ``(4, 4)``.
    """
    if ndim not in (2, 3) or isinstance(ndim, bool):
        raise ValueError(f"ndim: expected 2 or 3, got {ndim!r}")
    return _itk_affine(affine, ndim, "")[0]


def _itk_array(displacement: torch.Tensor, affine: Any, name: str, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A voxel displacement ``(N, *S)`` as the ITK array ``(X, Y, Z, 1, N)`` of LPS mm vectors, and the affine."""
    dims = check_shape(displacement, "N *S", name, floating=True)
    a, m = _itk_affine(affine, dims["N"], f" of {path.name}")
    u = displacement.detach().to("cpu", torch.float64).numpy()
    if not np.isfinite(u).all():
        raise ValueError(f"{path}: {name}: expected finite displacements, found {int((~np.isfinite(u)).sum())} NaN or infinite value(s)")
    d = np.moveaxis(np.tensordot(m, u, axes=(1, 0)), 0, -1)  # (*S, N): d(p) = M u(p)
    spatial = d.shape[:-1] + ((1,) if dims["N"] == 2 else ())
    return d.reshape(spatial + (1, dims["N"])), a


def write_itk_displacement(path: str | os.PathLike[str], displacement: torch.Tensor, affine: Any) -> Path:
    r"""Write a voxel displacement as an ITK displacement field (NIfTI as ANTs' ``*Warp.nii.gz``, or ``.h5``).

    The field stays on the grid of ``affine`` (the reference, *fixed* image of ITK); each vector
    becomes the physical displacement of the point, in millimetres in ITK's LPS space. With ``A``
    the voxel-to-world (RAS) affine, :math:`A_{:3,:3}` its linear part, :math:`F = \mathrm{diag}(-1,
    -1, 1)` the change RAS -> LPS and :math:`\phi(p) = p + u(p)` the map in voxels,

    .. math::

       d(p) = F\,\bigl(A\,\phi(p) - A\,p\bigr) = F A_{:3,:3}\, u(p),

    stored at voxel ``p``, whose ITK physical position is :math:`F A p` (ITK reads origin, spacing
    and direction from the affine and turns them into LPS the same way). ITK's
    ``DisplacementFieldTransform`` maps a physical point ``x`` to ``x + d(x)``; resampling a moving
    image through it reads the image at that point. So a field written from the ``forward``
    displacement of a :class:`~plasticine.core.Deformation` pulls the source (moving) image into the
    target (fixed) geometry, as :meth:`~plasticine.core.Deformation.to_target` does.

    The file: float32, shape ``(X, Y, Z, 1, 3)`` (the fifth NIfTI dimension holds the vector), intent
    code 1007 (``vector``), the affine as sform and qform (code 1, scanner), units mm. A 2D field is
    ITK's 2D equivalent, ``(X, Y, 1, 1, 2)`` with the in-plane LPS components
    :math:`F_{:2,:2} A_{:2,:2}\, u`; its affine must keep the two voxel axes in the world x-y plane.
    ITK holds no shear: the voxel axes of ``affine`` must be orthogonal.

    A name ending in ``.h5`` writes an ITK transform file instead, through SimpleITK (the ``itk``
    extra): one ``DisplacementFieldTransform`` whose field holds the same vectors in float64, with
    the grid as ITK's origin :math:`F A_{:N,N}`, spacing (the column lengths of
    :math:`A_{:N,:N}`) and direction; a 2D field keeps only the in-plane part of the affine. The
    file is replaced atomically.

    Args:
        path: a ``.nii``, ``.nii.gz`` or ``.h5`` file.
        displacement: the displacement in voxels, channel ``i`` along tensor axis ``i`` (the
            tensor's axes are the NIfTI array axes, as :func:`read_image` gives them).
        affine: the ``(4, 4)`` voxel-to-world (RAS, mm) matrix of the grid, numpy or torch,
            floating.

    Returns:
        The path.

    Raises:
        ValueError: for a bad shape or ending, a non-finite displacement, or an affine that is not a
            finite floating 4 x 4 matrix with orthogonal voxel axes (in the x-y plane in 2D).
        ImportError: when nibabel (NIfTI) or SimpleITK (``.h5``) is not installed.

    Shape:
        displacement: ``(N, *S)`` with ``N = 2`` or ``3``; the file ``(X, Y, Z, 1, N)`` (``Z = 1``
        in 2D).

    Example:
        >>> import numpy as np, tempfile, torch
        >>> u = torch.zeros(3, 4, 5, 6); u[0] = 1.0           # one voxel along axis 0
        >>> path = write_itk_displacement(tempfile.mkdtemp() + "/Warp.nii.gz", u, np.diag([-2.0, 2, 2, 1]))
        >>> v, a = read_itk_displacement(path)
        >>> bool(torch.equal(v, u))
        True
    """
    path = Path(path)
    if not (_is_nifti(path) or _is_h5(path)):
        raise ValueError(f"{path}: expected an ITK displacement file name ending in .nii, .nii.gz or .h5")
    array, a = _itk_array(displacement, affine, "displacement", path)
    _write_itk_file(path, array, a)
    return path


def _is_h5(path: Path) -> bool:
    return path.name.lower().endswith(".h5")


def _write_itk_file(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    """Write the ITK array ``(X, Y, Z, 1, N)`` as NIfTI, or as an ITK transform file (``.h5``) through SimpleITK."""
    if _is_nifti(path):
        _write_nifti(path, array, affine, "vector", scanner=True)
        return
    if not np.isfinite(array).all():
        raise ValueError(f"{path}: expected finite vectors, found {int((~np.isfinite(array)).sum())} beyond the float64 range")
    sitk = _import("SimpleITK", f"writing {path.name}")
    n = array.shape[-1]
    vectors = array[:, :, 0, 0, :] if n == 2 else array[:, :, :, 0, :]
    field = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(vectors, tuple(range(n))[::-1] + (n,))), isVector=True)
    lps = _RAS_TO_LPS[:n, :n] @ affine[:n, :n]
    spacing = np.linalg.norm(lps, axis=0)
    field.SetSpacing(spacing.tolist())
    field.SetOrigin((_RAS_TO_LPS[:n, :n] @ affine[:n, 3]).tolist())
    field.SetDirection((lps / spacing).ravel().tolist())
    temporary = path.with_name(f".{path.name}.{os.getpid()}.sitk.h5")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        sitk.WriteTransform(sitk.DisplacementFieldTransform(field), str(temporary))
        data = temporary.read_bytes()
    finally:
        temporary.unlink(missing_ok=True)
    _atomic_bytes(path, data)


def _read_itk_h5(sitk: Any, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The vectors ``(*S, N)`` (LPS mm) and the voxel-to-RAS affine of an ITK transform file holding one displacement field."""
    try:
        transform = sitk.ReadTransform(str(path))
        name = transform.GetName()
        if name == "CompositeTransform":
            composite = sitk.CompositeTransform(transform)
            parts = [composite.GetNthTransform(i).GetName() for i in range(composite.GetNumberOfTransforms())]
            if parts != ["DisplacementFieldTransform"]:
                raise ImageReadError(f"{path}: expected one ITK DisplacementFieldTransform, got a CompositeTransform of {parts}")
            transform = composite.GetNthTransform(0)
        elif name != "DisplacementFieldTransform":
            raise ImageReadError(f"{path}: expected an ITK DisplacementFieldTransform, got a {name}")
        field = sitk.DisplacementFieldTransform(transform).GetDisplacementField()
        n = field.GetDimension()
        vectors = np.transpose(sitk.GetArrayFromImage(field), tuple(range(n))[::-1] + (n,)).astype(np.float64)
        direction = np.asarray(field.GetDirection(), dtype=np.float64).reshape(n, n)
        spacing, origin = np.asarray(field.GetSpacing(), dtype=np.float64), np.asarray(field.GetOrigin(), dtype=np.float64)
    except ImageReadError:
        raise
    except Exception as err:  # HDF5, an unknown transform type...
        raise ImageReadError(f"{path}: cannot read the ITK transform ({type(err).__name__}: {_one_line(err)})") from err
    if n not in (2, 3) or vectors.shape[-1] != n:
        raise ImageReadError(f"{path}: expected a 2D or 3D displacement field with as many components as dimensions, got {vectors.shape}")
    affine = np.eye(4)
    affine[:n, :n] = _RAS_TO_LPS[:n, :n] @ direction @ np.diag(spacing)
    affine[:n, 3] = _RAS_TO_LPS[:n, :n] @ origin
    return vectors, affine


def read_itk_displacement(path: str | os.PathLike[str]) -> tuple[torch.Tensor, np.ndarray]:
    r"""Read an ITK displacement field (NIfTI) as a voxel displacement on its grid, and its affine.

    The inverse of :func:`write_itk_displacement`: with ``A`` the file's voxel-to-world (RAS)
    affine and ``d(p)`` the stored LPS vectors, :math:`u(p) = (F A_{:N,:N})^{-1} d(p)`. Reads the
    fields that ITK, SimpleITK and ANTs write (``*Warp.nii.gz``, ``*InverseWarp.nii.gz``), and
    ITK transform files (``.h5``, through SimpleITK) that hold one ``DisplacementFieldTransform``
    (alone or as the only member of a ``CompositeTransform``); their affine is built from the
    field's origin ``o``, spacing ``s`` and direction ``D`` as :math:`A_{:N,:N} = F D\,
    \mathrm{diag}(s)`, :math:`A_{:N,N} = F o` (the identity along z in 2D).

    Args:
        path: a ``.nii``, ``.nii.gz`` or ``.h5`` displacement field.

    Returns:
        ``(displacement, affine)``: float32 voxel displacement in tensor axis order (the NIfTI array
        axes), and the float64 ``(4, 4)`` voxel-to-world affine of the grid.

    Raises:
        ImageReadError: one line naming the file, for a missing or unreadable file, an intent code
            other than 1007 (``vector``) or 1006 (``dispvect``), a shape other than
            ``(X, Y, Z, 1, 3)`` or ``(X, Y, 1, 1, 2)``, spatial units other than mm, an affine ITK
            cannot hold, non-finite vectors, or an ``.h5`` file that holds another transform.
        ImportError: when nibabel (NIfTI) or SimpleITK (``.h5``) is not installed.

    Shape:
        displacement: ``(N, *S)``, ``S = (X, Y, Z)`` or ``(X, Y)``; affine: ``(4, 4)``.
    """
    path = Path(path)
    if not (_is_nifti(path) or _is_h5(path)):
        raise ImageReadError(f"{path}: expected an ITK displacement field ending in .nii, .nii.gz or .h5")
    if not path.is_file():
        raise ImageReadError(f"{path}: no such file")
    if _is_h5(path):
        d, affine = _read_itk_h5(_import("SimpleITK", f"reading {path.name}"), path)
        return _itk_voxels(path, d, affine)
    nib = _import("nibabel", f"reading {path.name}")
    try:
        img = nib.load(str(path))
        header = img.header
        intent = int(header["intent_code"])
        units = header.get_xyzt_units()[0]
        affine = np.asarray(img.affine, dtype=np.float64)
        shape = tuple(img.shape)
        if intent in _ITK_INTENTS and len(shape) == 5:
            raw = np.asanyarray(img.dataobj)
    except Exception as err:  # gzip, header, truncated data...
        raise ImageReadError(f"{path}: cannot read the displacement field ({type(err).__name__}: {_one_line(err)})") from err
    if intent not in _ITK_INTENTS:
        raise ImageReadError(f"{path}: expected an ITK displacement field with NIfTI intent code 1007 (vector), got intent code {intent}")
    if len(shape) != 5 or shape[3] != 1 or shape[4] not in (2, 3) or (shape[4] == 2 and shape[2] != 1):
        raise ImageReadError(f"{path}: expected an ITK displacement field of shape (X, Y, Z, 1, 3) or (X, Y, 1, 1, 2), got {shape}")
    if raw.dtype.kind not in "iuf":
        raise ImageReadError(f"{path}: expected real vector components, got dtype {raw.dtype}")
    if units not in ("mm", "unknown"):
        raise ImageReadError(f"{path}: expected spatial units of mm, got {units}")
    d = np.asarray(raw, dtype=np.float64)
    return _itk_voxels(path, d[:, :, 0, 0, :] if shape[4] == 2 else d[:, :, :, 0, :], affine)


def _itk_voxels(path: Path, d: np.ndarray, affine: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
    """LPS millimetre vectors ``(*S, N)`` on the grid of ``affine`` as a float32 voxel displacement ``(N, *S)``."""
    n = d.shape[-1]
    try:
        _, m = _itk_affine(affine, n, "")
    except ValueError as err:
        raise ImageReadError(f"{path}: {err}") from None
    if not np.isfinite(d).all():
        raise ImageReadError(f"{path}: expected finite vectors, found {int((~np.isfinite(d)).sum())} NaN or infinite value(s)")
    u = np.tensordot(np.linalg.inv(m), np.moveaxis(d, -1, 0), axes=(1, 0))
    with np.errstate(over="ignore"):
        u32 = np.ascontiguousarray(u, dtype=np.float32)
    if not np.isfinite(u32).all():
        raise ImageReadError(f"{path}: the displacement in voxels exceeds the float32 range")
    return torch.from_numpy(u32), affine


ItkFormat = Literal["nifti", "h5"]
_ITK_ENDINGS = {"nifti": ".nii.gz", "h5": ".h5"}


def write_itk_deformation(
    prefix: str | os.PathLike[str], deformation: Deformation, affine: Any, *, index: int = 0, format: ItkFormat = "nifti"
) -> tuple[Path, Path]:
    r"""Write phi and phi^-1 of a deformation as ANTs' ``<prefix>Warp.nii.gz`` and ``<prefix>InverseWarp.nii.gz``.

    The ANTs convention: ``Warp`` maps fixed (target) physical points to moving (source) points, so
    resampling the source through it gives the source in the target geometry
    (:meth:`~plasticine.core.Deformation.to_target`); ``InverseWarp`` maps source points to target
    points and pulls a target image into the source geometry
    (:meth:`~plasticine.core.Deformation.to_source`). Both fields lie on the one grid of
    ``affine`` (plasticine's source and target share it) and are written by
    :func:`write_itk_displacement` (LPS millimetres, see there). Apply them with
    ``antsApplyTransforms -t <prefix>Warp.nii.gz`` (``ants.apply_transforms(fixed, moving,
    [warp])``) or SimpleITK's ``DisplacementFieldTransform``. With ``format="h5"`` the two files
    are ITK transform files, ``<prefix>Warp.h5`` and ``<prefix>InverseWarp.h5`` (through
    SimpleITK). The velocity, if any, is not written (ITK holds the displacements). Both arrays are
    checked before either file is written.

    Args:
        prefix: the path prefix, e.g. ``"out/case1_"`` (folders are created).
        deformation: the deformation.
        affine: the ``(4, 4)`` voxel-to-world (RAS, mm) matrix of its grid.
        index: the batch item.
        format: ``"nifti"`` (``.nii.gz``, needs nibabel) or ``"h5"`` (needs SimpleITK).

    Returns:
        ``(warp, inverse_warp)``: the two paths.

    Raises:
        ValueError: for a bad index or format, a non-finite field or an affine ITK cannot hold.
        ImportError: when the package of the format is not installed.

    Shape:
        deformation fields: ``(B, N, *S)``; files ``(X, Y, Z, 1, N)`` (``Z = 1`` in 2D).
    """
    B = deformation.forward.shape[0]
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < B:
        raise ValueError(f"index: expected an integer 0 <= index < {B}, got {index!r}")
    if format not in _ITK_ENDINGS:
        raise ValueError(f"format: expected one of {sorted(_ITK_ENDINGS)}, got {format!r}")
    prefix, ending = os.fspath(prefix), _ITK_ENDINGS[format]
    warp, inverse = Path(prefix + "Warp" + ending), Path(prefix + "InverseWarp" + ending)
    arrays = [
        _itk_array(field[index], affine, name, path)
        for field, name, path in ((deformation.forward, "forward", warp), (deformation.inverse, "inverse", inverse))
    ]
    for path, (array, a) in zip((warp, inverse), arrays):
        _write_itk_file(path, array, a)
    return warp, inverse


def read_itk_deformation(warp: str | os.PathLike[str], inverse: str | os.PathLike[str]) -> tuple[Deformation, np.ndarray]:
    """Read a deformation from an ITK/ANTs ``Warp`` field and its ``InverseWarp`` (see :func:`write_itk_deformation`).

    ``warp`` (fixed -> moving points) becomes ``forward``, ``inverse`` becomes ``inverse``; the
    target is ITK's fixed image, the source its moving image. For ANTs' SyN outputs pass
    ``<prefix>1Warp.nii.gz`` and ``<prefix>1InverseWarp.nii.gz``; an affine stage that ANTs
    keeps in a separate ``.mat`` file is not part of these fields.

    Args:
        warp: the forward field file.
        inverse: the inverse field file.

    Returns:
        ``(deformation, affine)``: the float32 :class:`~plasticine.core.Deformation` (batch of one)
        and the float64 ``(4, 4)`` voxel-to-world affine of its grid.

    Raises:
        ImageReadError: for a file :func:`read_itk_displacement` refuses, or two fields on
            different grids, naming the files.

    Shape:
        deformation fields: ``(1, N, *S)``; affine: ``(4, 4)``.
    """
    forward, a = read_itk_displacement(warp)
    backward, b = read_itk_displacement(inverse)
    if forward.shape != backward.shape or not np.allclose(a, b, rtol=1e-6, atol=1e-5):
        raise ImageReadError(
            f"{inverse}: expected the grid of {warp} (shape {tuple(forward.shape[1:])}), got shape {tuple(backward.shape[1:])}"
            + ("" if forward.shape != backward.shape else " with another affine")
        )
    return Deformation(forward[None], backward[None]), a
