"""Real MR anatomy shipped with the package, and loaders for system-installed data.

``brainweb_slices()`` returns the three 217x181 images of the ITK example data (Apache-2.0, see
``plasticine/data/NOTICE``): a T1 and a proton-density slice of the same (BrainWeb) anatomy,
pixel-aligned, and a ventricle mask of that slice. The file is pinned by its SHA-256.

``crossmodal_case()`` (:mod:`plasticine.data.crossmodal`) loads a real unpaired MR -> CT case from
installed packages (nilearn's MNI152 T1 template and Debian's ``invesalius-examples`` head CT).
"""

from __future__ import annotations

import hashlib
from importlib import resources

import numpy as np

from .crossmodal import CrossModalCase, crossmodal_case

__all__ = ["brainweb_slices", "BRAINWEB_SHA256", "CrossModalCase", "crossmodal_case"]

BRAINWEB_SHA256 = "5cfd0ea67348697d922fd9831397fa3dd774314fd4e570c471635878014f8885"


def brainweb_slices() -> dict[str, np.ndarray]:
    """The shipped BrainWeb T1 and PD slices and the ventricle mask.

    Returns:
        ``{"t1": uint8, "pd": uint8, "ventricles": bool}``, each of shape ``(217, 181)``
        (rows anterior to posterior, columns right to left as in the ITK PNGs).

    Raises:
        RuntimeError: if the shipped file does not match its pinned SHA-256.

    Shape:
        each array: ``(217, 181)``.
    """
    blob = resources.files(__package__).joinpath("brainweb_slices.npz").read_bytes()
    digest = hashlib.sha256(blob).hexdigest()
    if digest != BRAINWEB_SHA256:
        raise RuntimeError(f"brainweb_slices.npz: expected sha256 {BRAINWEB_SHA256}, got {digest}; the package data is damaged")
    import io

    with np.load(io.BytesIO(blob), allow_pickle=False) as z:
        return {"t1": z["t1"].copy(), "pd": z["pd"].copy(), "ventricles": z["ventricles"] > 127}
