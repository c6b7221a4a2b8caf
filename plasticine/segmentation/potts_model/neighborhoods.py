r"""Neighbourhoods of the Potts model and the lines of an image along each of their directions.

The neighbourhood :math:`\mathcal{N}` of the Potts energy (:mod:`~plasticine.segmentation.potts_model.energy`)
sets its jump directions and their weights :math:`\omega_d`. Two neighbourhoods are available (``neighborhood``):

* ``"axes"``: the unit offsets along every spatial axis, :math:`\omega_d = 1` (4-neighbourhood in
  2D, 6-neighbourhood in 3D; the jump count is the anisotropic boundary length);
* ``"diagonals"`` (2D only): axes and both diagonals with Storath and Weinmann's near-isotropic
  weights :math:`\omega_{axis} = \sqrt 2 - 1`, :math:`\omega_{diag} = 1 - \sqrt 2 / 2`.

The solvers cut an image into the lines of each direction (``_Direction``), solve them in 1-D and put
them back.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

__all__ = ["Neighborhood"]


Neighborhood = Literal["axes", "diagonals"]

_OMEGA_AXIS = math.sqrt(2.0) - 1.0
_OMEGA_DIAG = 1.0 - math.sqrt(2.0) / 2.0


class _Direction:
    """How to cut a ``(B, C, *S)`` image into lines along one direction and put them back.

    An axis direction is a permutation of the axes. A 2D diagonal is gathered through an index
    map: line ``k`` holds its pixels at positions ``0 .. length_k - 1`` and padding after them, so
    that every line starts at position 0 and the solver can stop each one at its own length.
    """

    def __init__(self, shape: tuple[int, ...], offset: tuple[int, ...], device: torch.device):
        self.shape = shape
        nz = [i for i, o in enumerate(offset) if o != 0]
        self.axis = nz[0] if len(nz) == 1 else None
        self.lengths: torch.Tensor | None = None
        if self.axis is None:
            h, w_ = shape
            n = min(h, w_)
            k = torch.arange(h + w_ - 1, device=device)
            if offset[0] * offset[1] > 0:  # down-right: x - y = k - (h - 1)
                y0 = (h - 1 - k).clamp_min(0)
                x0 = (k - (h - 1)).clamp_min(0)
                step = 1
                length = torch.minimum(h - y0, w_ - x0)
            else:  # down-left: x + y = k
                y0 = (k - (w_ - 1)).clamp_min(0)
                x0 = k - y0
                step = -1
                length = torch.minimum(h - y0, x0 + 1)
            t = torch.arange(n, device=device)[:, None]
            valid = t < length[None]
            y = y0[None] + t
            x = x0[None] + step * t
            self.index = torch.where(valid, y * w_ + x, h * w_)  # (n, L); h * w_ is a dummy pixel
            self.lengths = length
            pos = torch.empty(h * w_, dtype=torch.long, device=device)
            pos[self.index[valid]] = torch.arange(valid.numel(), device=device).view(valid.shape)[valid]
            self.pixel_pos = pos  # where each pixel sits in the flattened (n, L) line array

    def lines(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *S)`` -> ``(n, M, C)``."""
        b, c = x.shape[:2]
        if self.axis is not None:
            y = x.movedim(2 + self.axis, 0).movedim(2, -1)  # (n, B, *rest, C)
            return y.reshape(y.shape[0], -1, c)
        flat = torch.cat([x.reshape(b, c, -1), x.new_zeros(b, c, 1)], 2)
        y = flat[:, :, self.index]  # (B, C, n, L)
        return y.permute(2, 0, 3, 1).reshape(self.index.shape[0], -1, c)

    def line_lengths(self, batch: int) -> torch.Tensor | None:
        """Length of every line ``(M,)``, None when all have the full length."""
        return None if self.lengths is None else self.lengths.repeat(batch)

    def image(self, lines: torch.Tensor, b: int, c: int) -> torch.Tensor:
        """``(n, M, C)`` -> ``(B, C, *S)``."""
        if self.axis is not None:
            n = lines.shape[0]
            nd = len(self.shape)
            rest = [s for i, s in enumerate(self.shape) if i != self.axis]
            y = lines.reshape(n, b, *rest, c)  # dims: n, B, rest..., C
            spatial = [0 if i == self.axis else 2 + i - (i > self.axis) for i in range(nd)]
            return y.permute(1, nd + 1, *spatial).contiguous()
        n, ln = self.index.shape
        y = lines.reshape(n, b, ln, c).permute(1, 3, 0, 2).reshape(b, c, n * ln)
        return y[:, :, self.pixel_pos].reshape(b, c, *self.shape)


def _directions(shape: tuple[int, ...], neighborhood: str) -> tuple[list[tuple[int, ...]], list[float]]:
    """Offsets and weights of a neighbourhood."""
    nd = len(shape)
    axes = [tuple(1 if i == a else 0 for i in range(nd)) for a in range(nd)]
    if neighborhood == "axes":
        return axes, [1.0] * nd
    if neighborhood == "diagonals":
        if nd != 2:
            raise ValueError(f"neighborhood: 'diagonals' is defined for 2 spatial dimensions, got {nd}; use 'axes'")
        return [axes[1], (1, 1), axes[0], (1, -1)], [_OMEGA_AXIS, _OMEGA_DIAG, _OMEGA_AXIS, _OMEGA_DIAG]
    raise ValueError(f"neighborhood: expected 'axes' or 'diagonals', got {neighborhood!r}")


def _shifted_pair(x: torch.Tensor, offset: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Views ``x[p]`` and ``x[p + offset]`` over all p where both exist (spatial dims from 2 on)."""
    a, b = [slice(None), slice(None)], [slice(None), slice(None)]
    for o in offset:
        if o > 0:
            a.append(slice(0, -o))
            b.append(slice(o, None))
        elif o < 0:
            a.append(slice(-o, None))
            b.append(slice(0, o))
        else:
            a.append(slice(None))
            b.append(slice(None))
    return x[tuple(a)], x[tuple(b)]
