"""Real images installed by system packages (not shipped: their licences do not allow it).

* Colin27 (``ch2``) and its AAL atlas, from Debian's ``mricron-data``
  (``apt-get install mricron-data``; files in ``/usr/share/mricron/templates``). The ITK BrainWeb T1
  slice shipped in :mod:`plasticine.data` is Colin27 axial slice ``z = 94`` transposed, so
  :func:`aal_slice` labels both shipped slices.

Each file is pinned by its SHA-256; a missing file raises :class:`FileNotFoundError` naming the
package that installs it, a changed file raises :class:`RuntimeError`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

__all__ = ["MRICRON_DIR", "colin27", "aal_slice"]

MRICRON_DIR = Path("/usr/share/mricron/templates")
_SHA256 = {
    "ch2.nii.gz": "a009051127f64dc3dd554d5f5b589870ea72106d9642c21b4e7093e478cfc309",
    "ch2bet.nii.gz": "592a2d20abdf36eefcb540ca8958428040edffc1bc1a18ba1dcfbabac77c5dd1",
    "aal.nii.gz": "b512dcd3f36b77f56be7a9a038134096e66314b7e8c31d25875b96bcf6991454",
}


def _load(name: str) -> tuple[np.ndarray, np.ndarray]:
    path = MRICRON_DIR / name
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: install Debian's mricron-data (apt-get install mricron-data)")
    blob = path.read_bytes()
    digest = hashlib.sha256(blob).hexdigest()
    if digest != _SHA256[name]:
        raise RuntimeError(f"{path}: expected sha256 {_SHA256[name]}, got {digest}; the installed data changed")
    try:
        import nibabel as nib
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("reading NIfTI files needs nibabel: pip install 'plasticine[io]'") from exc
    img = nib.Nifti1Image.from_bytes(__import__("gzip").decompress(blob))
    return np.asarray(img.dataobj), img.affine


def colin27(name: str = "ch2.nii.gz") -> tuple[np.ndarray, np.ndarray]:
    """A Colin27 volume (``"ch2.nii.gz"`` T1, ``"ch2bet.nii.gz"`` skull-stripped, ``"aal.nii.gz"`` labels).

    Returns:
        ``(volume, affine)``: the array in file axis order (181 x 217 x 181, 1 mm) and its 4x4 affine.

    Shape:
        volume: ``(181, 217, 181)``; affine: ``(4, 4)``.
    """
    if name not in _SHA256:
        raise ValueError(f"name: expected one of {sorted(_SHA256)}, got {name!r}")
    return _load(name)


def aal_slice() -> np.ndarray:
    """AAL labels of Colin27 axial slice 94, in the geometry of the shipped BrainWeb slices.

    Returns:
        int64 label map (0 = background, AAL region codes otherwise).

    Shape:
        out: ``(217, 181)``.
    """
    labels, _ = colin27("aal.nii.gz")
    return np.ascontiguousarray(labels[:, :, 94].T).astype(np.int64)
