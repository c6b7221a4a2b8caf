r"""A real, unpaired cross-modality case: T1 MR axial slices of a whole head (source) and head CT axial slices (target).

Nothing here is shipped (the licences of the two volumes do not allow it): both are read at run
time from what packages install, each file pinned by its SHA-256.

**Source (MR), the default: Colin27** (``source="colin27"``), the T1 average of 27 scans of one
subject on the MNI grid, from Debian's ``mricron-data`` (``ch2.nii.gz``, read by
:func:`plasticine.data.system.colin27`), 1 mm isotropic, scaled to ``[0, 1]`` by its maximum. It is
a whole head: scalp, skull (dark in T1, bright in CT) and brain, as a CT holds them. Masks, per
axial slice:

* brain: the BET brain extraction shipped beside it (``ch2bet.nii.gz``), nonzero voxels, closed
  with a disc of 6 mm (which fills the sulci, so that the mask is the space inside the skull that
  the CT's intracranial mask outlines), holes filled, largest component;
* head: intensity above 0.05, closed with a disc of 3 mm, holes filled, largest component.

**Source (MR), ``source="mni152"``.** The MNI152 2009 (ICBM 152 nonlinear symmetric 2009a) T1 template that nilearn
ships (``pip install nilearn``, or ``pip install 'plasticine[crossmodal]'``; the file is read
directly, nilearn is not imported), 1 mm isotropic, scaled to ``[0, 1]`` by its maximum as
:func:`nilearn.datasets.load_mni152_template` does. Note that this template is **skull-stripped**:
it holds the brain only, with no skull or scalp, so its head mask is, within a few pixels, its
brain mask, and a CT network trained to find the inside of the skull has no skull to find in it
(the reason Colin27 is the default). Masks, per axial slice:

* brain: the template's brain mask (nilearn's :func:`~nilearn.datasets.load_mni152_brain_mask`,
  intensity above 0.2 of the maximum), holes filled, largest component;
* head: intensity above 0.05, closed with a disc of 3 mm, holes filled, largest component.

**Target (CT).** The head CT of Debian's ``invesalius-examples`` (``apt-get install
invesalius-examples``; ``Cranium.inv3``, a tar holding a plist, a raw int16 volume in Hounsfield
units and masks). It is a **coronal** acquisition of shape ``(108, 256, 256)``: axis 0 runs from
anterior to posterior at 1.5 mm, axis 1 from superior to inferior and axis 2 across the head, both
at 0.957 mm. An axial slice is therefore ``ct[:, y, :]``, with 1.5 mm rows (row 0 anterior) and
0.957 mm columns. Intensities are the soft-tissue to bone window

.. math::

    t = \operatorname{clip}\big((\mathrm{HU} + 100) / 1100,\ 0,\ 1\big),

which maps -100 HU (fat) and below to 0 and 1000 HU (bone) and above to 1: the clipping is the
documented intensity mapping of this case, not a silent clamp. Masks, per axial slice (computed on
a 0.957 mm isotropic grid, then resampled with the image):

* head: ``HU > -300``, the largest 3D component (which drops the head holder), holes filled per slice;
* intracranial: the bone ``HU > 250``, closed with a disc of 3 mm; the inside of that closed bone
  (its holes, filled), minus the closed bone; largest component.

**Slices kept.** The CT's field of view is 162 mm from front to back, so below about 50 mm under
the vertex the forehead leaves it and the skull no longer closes. Kept are the CT slices of the
first run below the vertex whose intracranial area is at least ``min_area_fraction`` of the largest
(the skull closed around the brain). The depth of a slice is its distance below the highest slice
whose intracranial (CT) or brain (MR) area exceeds 1 % of the largest; the MR slices kept span the
same depths as the CT slices, at the template's 1 mm spacing (so the counts differ by a slice or two:
the domains are unpaired).

**Geometry.** Both domains are resampled (linear, antialiased) to square pixels of
``field_of_view_mm / size`` mm, then cropped or padded with zeros (air in both) to ``size x size``,
the bounding box of each domain's head masks centred. Both are oriented the same way: rows run from
anterior (row 0) to posterior, columns from the subject's right to left (the radiological view).
The CT's columns are taken as stored, assumed to follow the usual orientation of a coronal DICOM
series (column 0 on the subject's right; the file does not say, and the head is too symmetric to
tell); the MR template is left-right symmetric, so its left-right order is a convention only.

There is no pixel-wise correspondence between the two domains (two subjects, no registration): score
a translation by tracing a segmentation (see ``benchmarks/crossmodal.py``) and by intensity-distribution
distances.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import plistlib
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.validate import check_option

__all__ = ["CrossModalCase", "crossmodal_case", "CT_PATH", "CROSSMODAL_SHA256", "ct_window"]

#: Where Debian's ``invesalius-examples`` installs the head CT.
CT_PATH = Path("/usr/share/doc/invesalius-examples/examples/Cranium.inv3")
_MNI_NAME = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
_CT_HINT = "install Debian's invesalius-examples (apt-get install invesalius-examples)"
_MNI_HINT = "reinstall nilearn (pip install --force-reinstall nilearn)"

#: SHA-256 of the two files read.
CROSSMODAL_SHA256 = {
    "Cranium.inv3": "3b34f11f7c4f557f4c65cd6543c412a2f6ceb0cfecfd9c41184420e02d9b7e2a",
    _MNI_NAME: "421a10e872fd6cadae7f61d358dffbcc1795a497d61ee76c5dda2503e1a1e9e6",
}

_CT_SPACING = (1.5, 0.95703125)  # axial slice: rows (anterior-posterior), columns; also the axial slice spacing is 0.957
_MR_SPACING = 1.0
_BRAIN_THRESHOLD = 0.2  # nilearn's load_mni152_brain_mask
_MR_HEAD_THRESHOLD = 0.05
_HEAD_HU = -300.0
_BONE_HU = 250.0
_CLOSING_MM = 3.0
_BRAIN_CLOSING_MM = 6.0  # Colin27's brain extraction follows the sulci; closed, it outlines the intracranial space
_TOP_FRACTION = 0.01


@dataclass(frozen=True)
class CrossModalCase:
    """The MR and CT slices of :func:`crossmodal_case`, their masks and where they came from.

    Attributes:
        source: MR T1 slices, float32 in ``[0, 1]``.
        source_brain: MR brain masks (the truth a traced segmentation is scored against).
        source_head: MR head masks (for ``"mni152"``, skull-stripped, close to the brain mask).
        target: CT slices in the window ``(HU + 100) / 1100`` clipped to ``[0, 1]``, float32.
        target_intracranial: CT intracranial masks (inside the skull).
        target_head: CT head masks.
        pixel_mm: the side of a pixel, mm (both domains).
        source_slices: the template's axial indices (its third axis, 1 mm) of the MR slices.
        target_slices: the CT's axis-1 indices (0.957 mm) of the CT slices.
        source_name: ``"colin27"`` or ``"mni152"``, the MR volume.

    Shape:
        source, source_brain, source_head: ``(n_source, size, size)``; target, target_intracranial,
        target_head: ``(n_target, size, size)``; masks are bool.
    """

    source: np.ndarray
    source_brain: np.ndarray
    source_head: np.ndarray
    target: np.ndarray
    target_intracranial: np.ndarray
    target_head: np.ndarray
    pixel_mm: float
    source_slices: tuple[int, ...]
    target_slices: tuple[int, ...]
    source_name: str = "colin27"


def ct_window(hu: np.ndarray) -> np.ndarray:
    """The case's CT intensity mapping: ``(HU + 100) / 1100`` clipped to ``[0, 1]`` (soft tissue to bone).

    The clipping is the mapping (a display window): -100 HU and below map to 0, 1000 HU and above to 1.

    Args:
        hu: Hounsfield units.

    Returns:
        float32 intensities in ``[0, 1]``.

    Shape:
        hu: any; out: the same.
    """
    return np.clip((np.asarray(hu, dtype=np.float32) + 100.0) / 1100.0, 0.0, 1.0)


def _pinned(path: Path, hint: str) -> bytes:
    """The bytes of ``path``, checked against its pinned SHA-256."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {hint}")
    blob = path.read_bytes()
    want = CROSSMODAL_SHA256[path.name]
    got = hashlib.sha256(blob).hexdigest()
    if got != want:
        raise RuntimeError(f"{path}: expected sha256 {want}, got {got}; the installed data changed")
    return blob


def _mni_path() -> Path:
    spec = importlib.util.find_spec("nilearn")
    if spec is None or spec.origin is None:
        raise ImportError("the MR -> CT case needs nilearn's MNI152 template: pip install nilearn (or 'plasticine[crossmodal]')")
    return Path(spec.origin).parent / "datasets" / "data" / _MNI_NAME


def _read_mr(source: str) -> tuple[np.ndarray, np.ndarray]:
    """The MR volume scaled to [0, 1] and its brain mask, axes (x: left to right, y: posterior to anterior, z: inferior to superior)."""
    if source == "mni152":
        t1 = _read_mni()
        return t1, t1 > _BRAIN_THRESHOLD
    from .system import colin27

    t1, affine = colin27("ch2.nii.gz")
    brain, _ = colin27("ch2bet.nii.gz")
    if t1.shape != brain.shape or not np.allclose(np.abs(np.diag(affine))[:3], _MR_SPACING):
        raise RuntimeError(f"Colin27: expected a 1 mm T1 and brain extraction of one shape, got {t1.shape} and {brain.shape}")
    t1 = t1.astype(np.float32)
    return t1 / t1.max(), brain > 0


def _read_mni() -> np.ndarray:
    """The MNI152 T1 template scaled to [0, 1], axes (x: left to right, y: posterior to anterior, z: inferior to superior)."""
    import gzip

    try:
        import nibabel as nib
    except ImportError as exc:  # pragma: no cover - nilearn depends on nibabel
        raise ImportError("reading the MNI152 template needs nibabel: pip install nibabel") from exc
    path = _mni_path()
    img = nib.Nifti1Image.from_bytes(gzip.decompress(_pinned(path, _MNI_HINT)))
    if nib.aff2axcodes(img.affine) != ("R", "A", "S") or not np.allclose(img.header.get_zooms()[:3], _MR_SPACING):
        raise RuntimeError(f"{path}: expected a 1 mm RAS volume, got {nib.aff2axcodes(img.affine)} at {img.header.get_zooms()} mm")
    data = np.asarray(img.dataobj, dtype=np.float32)
    return data / data.max()


def _read_cranium() -> np.ndarray:
    """The InVesalius CT in HU, shape (108, 256, 256): (anterior-posterior, superior-inferior, across)."""
    blob = _pinned(CT_PATH, _CT_HINT)
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
        main = plistlib.loads(tar.extractfile(members["main.plist"]).read())
        matrix = main["matrix"]
        raw = tar.extractfile(members[matrix["filename"]]).read()
    shape = tuple(matrix["shape"])
    if main.get("orientation") != 1 or shape != (108, 256, 256) or matrix["dtype"] != "int16":
        raise RuntimeError(f"{CT_PATH}: expected a coronal (orientation 1) int16 volume of shape (108, 256, 256), got orientation {main.get('orientation')}, {matrix['dtype']} {shape}")
    return np.frombuffer(raw, dtype="<i2").reshape(shape)


def _disc(radius: int) -> np.ndarray:
    r = np.arange(-radius, radius + 1)
    return (r[:, None] ** 2 + r[None, :] ** 2) <= radius * radius


def _largest(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage as ndi

    labels, n = ndi.label(mask)
    if n <= 1:
        return mask.astype(bool)
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (int(np.argmax(sizes)) + 1)


def _closed(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary closing that treats the outside as empty (padded, so the border does not erode)."""
    from scipy import ndimage as ndi

    padded = np.pad(mask, radius + 1)
    out = ndi.binary_closing(padded, structure=_disc(radius))
    return out[radius + 1 : -(radius + 1), radius + 1 : -(radius + 1)]


def _filled(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage as ndi

    return ndi.binary_fill_holes(mask)


def _resample(stack: np.ndarray, spacing: tuple[float, float], pixel: float) -> np.ndarray:
    """Linear, antialiased resampling of ``(n, H, W)`` slices from ``spacing`` mm to ``pixel`` mm pixels."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(stack, dtype=np.float32))[:, None]
    scale = (spacing[0] / pixel, spacing[1] / pixel)
    antialias = min(scale) < 1.0
    out = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False, recompute_scale_factor=False, antialias=antialias)
    # every output is a convex combination of inputs: clipping to their range removes rounding only
    return out[:, 0].clamp(float(x.min()), float(x.max())).numpy()


def _frame(stacks: list[np.ndarray], head: np.ndarray, size: int, pixel: float, domain: str) -> list[np.ndarray]:
    """Crop or pad every ``(n, H, W)`` stack to ``size x size`` with the heads' bounding box centred."""
    rows, cols = np.nonzero(head.any(0))
    extent = (rows.max() - rows.min() + 1, cols.max() - cols.min() + 1)
    if max(extent) > size:
        raise ValueError(
            f"field_of_view_mm: the {domain} heads span {extent[0] * pixel:.0f} x {extent[1] * pixel:.0f} mm, more than the "
            f"{size * pixel:.0f} mm field of view; use a larger field_of_view_mm"
        )
    out = []
    for stack in stacks:
        frame = np.zeros((stack.shape[0], size, size), dtype=stack.dtype)
        # source offset of the frame's first row/column so that the box centre lands on the frame centre
        start = [int(round((lo + hi) / 2 - (size - 1) / 2)) for lo, hi in ((rows.min(), rows.max()), (cols.min(), cols.max()))]
        src = [slice(max(s, 0), min(s + size, n)) for s, n in zip(start, stack.shape[1:])]
        dst = [slice(sl.start - s, sl.stop - s) for sl, s in zip(src, start)]
        frame[:, dst[0], dst[1]] = stack[:, src[0], src[1]]
        out.append(frame)
    return out


def _top(areas: np.ndarray) -> int:
    """The first (highest) slice whose area exceeds ``_TOP_FRACTION`` of the largest."""
    return int(np.nonzero(areas > _TOP_FRACTION * areas.max())[0][0])


def _ct_slices(min_area_fraction: float) -> tuple[list[int], np.ndarray, np.ndarray, np.ndarray, float, float]:
    """Kept CT slices on the 0.957 mm isotropic grid: indices, windowed images, intracranial and head masks, depths."""
    hu = _read_cranium()
    head3d = _largest(hu > _HEAD_HU)
    fine = (_CT_SPACING[1], _CT_SPACING[1])
    radius = int(round(_CLOSING_MM / fine[0]))
    ys = [y for y in range(hu.shape[1]) if head3d[:, y, :].any()]
    # axial slices ct[:, y, :] on the isotropic grid (rows upsampled from 1.5 mm)
    slices = _resample(hu[:, ys, :].transpose(1, 0, 2).astype(np.float32), _CT_SPACING, fine[0])
    heads = _resample(head3d[:, ys, :].transpose(1, 0, 2).astype(np.float32), _CT_SPACING, fine[0]) > 0.5
    intracranial = np.zeros_like(heads)
    for i, s in enumerate(slices):
        bone = _closed(s > _BONE_HU, radius)
        intracranial[i] = _largest(_filled(bone) & ~bone)
        heads[i] = _filled(_largest(heads[i]))
    areas = intracranial.sum((1, 2)).astype(np.float64)
    top = _top(areas)
    ok = areas >= min_area_fraction * areas.max()
    first = top + int(np.argmax(ok[top:]))
    last = first
    while last + 1 < len(ok) and ok[last + 1]:
        last += 1
    keep = list(range(first, last + 1))
    depth_mm = (first - top) * _CT_SPACING[1], (last - top) * _CT_SPACING[1]
    return [ys[i] for i in keep], ct_window(slices[keep]), intracranial[keep], heads[keep], depth_mm[0], depth_mm[1]


def _mr_slices(depth_min: float, depth_max: float, source: str) -> tuple[list[int], np.ndarray, np.ndarray, np.ndarray]:
    """MR axial slices at the depths below the brain's top: indices, images, brain and head masks (1 mm)."""
    t1, brain3d = _read_mr(source)
    # axial slice z: rows anterior (row 0) to posterior, columns the subject's right to left
    view = lambda v, z: v[:, :, z].T[::-1, ::-1]  # noqa: E731
    brain_area = brain3d.sum((0, 1))
    zs_desc = np.arange(t1.shape[2])[::-1]
    top = int(zs_desc[_top(brain_area[zs_desc].astype(np.float64))])
    zs = [z for z in range(t1.shape[2]) if depth_min <= (top - z) * _MR_SPACING <= depth_max][::-1]
    images = np.stack([view(t1, z) for z in zs]).astype(np.float32)
    radius = int(round(_CLOSING_MM / _MR_SPACING))
    close = int(round(_BRAIN_CLOSING_MM / _MR_SPACING)) if source == "colin27" else 0
    brains = np.stack([_largest(_filled(_closed(view(brain3d, z), close) if close else view(brain3d, z))) for z in zs])
    heads = np.stack([_largest(_filled(_closed(im > _MR_HEAD_THRESHOLD, radius))) for im in images])
    return zs, images, brains, heads


def crossmodal_case(size: int = 128, *, field_of_view_mm: float = 208.0, min_area_fraction: float = 0.3, source: str = "colin27") -> CrossModalCase:
    """Load the unpaired MR -> CT case: T1 MR and head CT axial slices on one pixel grid (see the module notes).

    Args:
        size: the slices' side in pixels (128 for the benchmark, 64 for fast tests), at least 16.
        field_of_view_mm: the side of the slices in mm; the pixel is ``field_of_view_mm / size`` mm
            (1.625 mm by default).
        min_area_fraction: a CT slice is kept when its intracranial area is at least this fraction
            of the largest (in ``(0, 1]``).
        source: the MR: ``"colin27"`` (a whole head, the default) or ``"mni152"`` (nilearn's
            skull-stripped template).

    Returns:
        A :class:`CrossModalCase`; slices run from superior to inferior.

    Raises:
        ImportError: without nilearn (``"mni152"``) or nibabel (``"colin27"``).
        FileNotFoundError: without the CT (``apt-get install invesalius-examples``) or Colin27
            (``apt-get install mricron-data``).
        RuntimeError: when an installed file differs from its pinned SHA-256, or is not the
            expected volume.
        ValueError: for a bad argument, or a field of view too small for the heads.

    Shape:
        See :class:`CrossModalCase`: every slice is ``(size, size)``.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 16:
        raise ValueError(f"size: expected an int >= 16, got {size!r}")
    if isinstance(field_of_view_mm, bool) or not isinstance(field_of_view_mm, (int, float)) or not 0 < field_of_view_mm < float("inf"):
        raise ValueError(f"field_of_view_mm: expected a positive finite number, got {field_of_view_mm!r}")
    if isinstance(min_area_fraction, bool) or not isinstance(min_area_fraction, (int, float)) or not 0 < min_area_fraction <= 1:
        raise ValueError(f"min_area_fraction: expected a number in (0, 1], got {min_area_fraction!r}")
    check_option(source, "source", ("colin27", "mni152"))
    pixel = float(field_of_view_mm) / size
    from .system import MRICRON_DIR

    mr_file = (_mni_path(), _MNI_HINT) if source == "mni152" else (MRICRON_DIR / "ch2.nii.gz", "install Debian's mricron-data (apt-get install mricron-data)")
    for path, hint in (mr_file, (CT_PATH, _CT_HINT)):
        if not path.is_file():  # both before any work
            raise FileNotFoundError(f"{path} not found: {hint}")
    ct_idx, ct, intracranial, ct_head, d0, d1 = _ct_slices(float(min_area_fraction))
    mr_idx, mr, brain, mr_head = _mr_slices(d0, d1, source)
    fine = (_CT_SPACING[1], _CT_SPACING[1])
    ct, intracranial, ct_head = (_resample(a.astype(np.float32), fine, pixel) for a in (ct, intracranial, ct_head))
    mr, brain, mr_head = (_resample(a.astype(np.float32), (_MR_SPACING, _MR_SPACING), pixel) for a in (mr, brain, mr_head))
    intracranial, ct_head, brain, mr_head = (a > 0.5 for a in (intracranial, ct_head, brain, mr_head))
    ct, intracranial, ct_head = _frame([ct, intracranial, ct_head], ct_head, size, pixel, "CT")
    mr, brain, mr_head = _frame([mr, brain, mr_head], mr_head, size, pixel, "MR")
    return CrossModalCase(
        source=mr,
        source_brain=brain,
        source_head=mr_head,
        target=ct,
        target_intracranial=intracranial,
        target_head=ct_head,
        pixel_mm=pixel,
        source_slices=tuple(mr_idx),
        target_slices=tuple(ct_idx),
        source_name=source,
    )
