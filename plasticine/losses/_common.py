"""Helpers shared by the losses: input checks, float32 promotion under autocast, spacing."""

from __future__ import annotations


import torch

from ..core import check_shape
from ..core.grid import working_dtype

__all__: list[str] = []


def promote(x: torch.Tensor) -> torch.Tensor:
    """Return a checked floating ``x`` in float32 if it is float16/bfloat16, else unchanged (differentiably).

    Statistics such as histograms, entropies and sums of squares overflow or lose all precision in
    half precision, so every loss computes them in at least float32.
    """
    return x.to(working_dtype(x.dtype))


def check_pair(
    moving: torch.Tensor,
    fixed: torch.Tensor,
    mask: torch.Tensor | None,
    spatial: tuple[int, ...] = (1, 2, 3),
) -> dict:
    """Check floating ``moving``/``fixed`` ``(B, C, *S)`` of equal shape and a bool or floating ``mask`` ``(B, 1, *S)``.

    Returns the bindings of :func:`plasticine.core.check_shape`.
    """
    dims = check_shape(moving, "B C *S", "moving", spatial=spatial, floating=True)
    check_shape(fixed, "B C *S", "fixed", bindings=dict(dims), spatial=spatial, floating=True)
    if mask is not None:
        check_shape(mask, "B 1 *S", "mask", bindings={"B": dims["B"], "S": dims["S"]}, spatial=spatial)
        if not (torch.is_floating_point(mask) or mask.dtype == torch.bool):
            raise ValueError(f"mask: expected a bool or floating-point tensor, got dtype {mask.dtype}")
    return dims


def no_autocast(device: torch.device) -> torch.autocast:
    """A context that switches autocast off on ``device`` (the losses pick their own precision).

    Shape:
        Not applicable.
    """
    return torch.autocast(device_type=device.type, enabled=False)
