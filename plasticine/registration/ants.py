r"""ANTs SyN as a registration backend (optional extra ``ants``: ``pip install plasticine[ants]``).

ANTs returns its result as transform files. They are converted to plasticine's convention exactly by
*warping coordinate images*: an image whose value at voxel ``q`` is ``q_i`` (padded beyond the border so
that points mapped outside are still linear) resampled through the forward transforms gives, at each
target voxel ``p``, the source position :math:`\phi(p)_i`, hence ``u_i(p) = phi(p)_i - p_i``; likewise
the inverse transforms give :math:`\phi^{-1}`. Linear interpolation of a linear function is exact, so
the conversion adds no error beyond ANTs' own resampling of its fields. Images are handed to ANTs with
unit spacing, zero origin and identity direction, so ANTs' physical space is plasticine's voxel space.
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np
import torch

from ..core.config import Configurable
from ..core.deformation import Deformation
from ..core.shapes import check_shape
from ..core.validate import check_int

__all__ = ["AntsRegistration"]


def _import_ants() -> Any:
    try:
        return importlib.import_module("ants")
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("AntsRegistration needs antspyx: pip install 'plasticine[ants]'") from exc


class AntsRegistration(Configurable):
    """Registration backend that runs ``ants.registration`` (SyN by default) pair by pair on the CPU.

    Args:
        transform: ANTs ``type_of_transform`` (``"SyN"``, ``"SyNOnly"``, ``"ElasticSyN"``, ...).
        metric: SyN metric, ``"mattes"`` (mutual information, the default) or ``"CC"``.
        pad: margin in voxels of the coordinate images used for the conversion.
        **kwargs: passed on to ``ants.registration`` (e.g. ``reg_iterations=(40, 20, 0)``). ANTs
            samples its metric randomly and runs multi-threaded, so results vary slightly between runs.

    Shape:
        source, target: ``(B, 1, *S)``; returned Deformation fields ``(B, N, *S)`` on the input's
        device and dtype.
    """

    def __init__(self, transform: str = "SyN", metric: str = "mattes", pad: int = 32, **kwargs: Any):
        self.transform, self.metric, self.pad, self.kwargs = transform, metric, check_int(pad, "pad", 0), kwargs

    def register(self, source: torch.Tensor, target: torch.Tensor | None = None, *, cue: torch.Tensor | None = None) -> Deformation:
        """Register each source to its target with ANTs.

        Shape:
            source, target: ``(B, 1, *S)``; out: Deformation with ``(B, N, *S)`` fields.
        """
        if target is None:
            raise ValueError("AntsRegistration needs a target image: register(source, target)")
        if cue is not None:
            raise ValueError("AntsRegistration does not use a cue; pass cue=None")
        dims = check_shape(source, "B 1 *S", "source")
        check_shape(target, "B 1 *S", "target", bindings=dims)
        ants = _import_ants()
        fwd, inv = [], []
        for b in range(dims["B"]):
            x = ants.from_numpy(source[b, 0].detach().double().cpu().numpy().astype(np.float32))
            y = ants.from_numpy(target[b, 0].detach().double().cpu().numpy().astype(np.float32))
            reg = ants.registration(fixed=y, moving=x, type_of_transform=self.transform, syn_metric=self.metric, **self.kwargs)
            fwd.append(self._displacement(ants, y, reg["fwdtransforms"], None))
            inv.append(self._displacement(ants, x, reg["invtransforms"], self._invert_flags(reg["invtransforms"])))
        fwd_t, inv_t = (torch.from_numpy(np.stack(f)).to(device=source.device, dtype=source.dtype) for f in (fwd, inv))
        return Deformation(fwd_t, inv_t)

    @staticmethod
    def _invert_flags(transforms: list[str]) -> list[bool]:
        return [t.endswith(".mat") for t in transforms]

    def _displacement(self, ants: Any, reference: Any, transforms: list[str], whichtoinvert: list[bool] | None) -> np.ndarray:
        shape = reference.shape
        p = self.pad
        padded = tuple(s + 2 * p for s in shape)
        coords = np.indices(padded, dtype=np.float64) - p
        out = []
        for i in range(len(shape)):
            moving = ants.from_numpy(coords[i].astype(np.float32), origin=tuple(-float(p) for _ in shape))
            warped = ants.apply_transforms(
                fixed=reference, moving=moving, transformlist=transforms, whichtoinvert=whichtoinvert, interpolator="linear"
            )
            out.append(warped.numpy().astype(np.float64) - np.indices(shape)[i])
        return np.stack(out)
