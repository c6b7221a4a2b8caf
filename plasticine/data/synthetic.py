r"""Generated data with exact truth: smooth random diffeomorphisms and synthetic contrasts.

The recipe of the exact-truth benchmark: a smooth random stationary velocity (Gaussian noise on a coarse
grid of control points, cubic upsampling, a taper to zero at the border, scaled to a chosen maximum) is
integrated to :math:`\phi = \exp(v)` and :math:`\phi^{-1} = \exp(-v)`; a target is ``source o phi`` and a
source landmark ``p`` sits at :math:`\phi^{-1}(p)` in the target. Where no real second contrast exists,
:func:`random_intensity_map` makes one. Everything is drawn from a :class:`torch.Generator`, so a seed
regenerates a case bit for bit.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from scipy import ndimage

from ..core.deformation import Deformation
from ..core.jacobian import jacobian_determinant
from ..core.shapes import check_shape

__all__ = ["random_velocity", "random_deformation", "random_intensity_map"]


def _taper(shape: Sequence[int], margin: float) -> np.ndarray:
    """Smooth window, 0 on the border and 1 beyond ``margin`` (a fraction of each axis)."""
    w = np.ones(shape)
    for axis, size in enumerate(shape):
        t = np.arange(size, dtype=np.float64)
        d = np.minimum(t, size - 1 - t) / max(margin * (size - 1), 1e-12)
        d = np.clip(d, 0.0, 1.0)
        ramp = d * d * (3 - 2 * d)  # smoothstep
        w = w * ramp.reshape([-1 if a == axis else 1 for a in range(len(shape))])
    return w


def random_velocity(
    shape: Sequence[int],
    max_norm: float,
    *,
    control_points: int = 6,
    margin: float = 0.1,
    batch: int = 1,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    r"""A smooth random stationary velocity field in voxels.

    Gaussian noise on a grid of ``control_points`` per axis is upsampled by cubic splines
    (``scipy.ndimage.zoom``, order 3) to ``shape``, multiplied by a smoothstep taper that is 0 on the
    border and 1 beyond ``margin`` of each axis, and scaled so that :math:`\max_p \lVert v(p) \rVert`
    equals ``max_norm`` in every batch element.

    Args:
        shape: spatial size (2 or 3 entries).
        max_norm: largest vector length in voxels (the displacement of ``exp(v)`` is of that size).
        control_points: coarse grid size per axis (5 to 8 gives anatomy-scale deformations).
        margin: taper width as a fraction of each axis.
        batch: number of fields.
        generator: source of randomness.
        dtype: floating dtype of the result.

    Shape:
        out: ``(batch, N, *shape)``.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (2, 3):
        raise ValueError(f"shape: expected 2 or 3 spatial sizes, got {shape}")
    if control_points < 2:
        raise ValueError(f"control_points: expected at least 2, got {control_points}")
    n = len(shape)
    coarse = torch.randn((batch, n) + (control_points,) * n, generator=generator, dtype=torch.float64).numpy()
    zoom = [s / control_points for s in shape]
    taper = _taper(shape, margin)
    fields = []
    for b in range(batch):
        comps = [ndimage.zoom(coarse[b, i], zoom, order=3, mode="nearest", grid_mode=True)[tuple(slice(0, s) for s in shape)] for i in range(n)]
        v = np.stack(comps) * taper
        norm = np.sqrt((v**2).sum(0)).max()
        fields.append(v * (max_norm / norm if norm > 0 else 0.0))
    return torch.from_numpy(np.stack(fields)).to(dtype)


def random_deformation(
    shape: Sequence[int],
    max_norm: float,
    *,
    control_points: int = 6,
    margin: float = 0.1,
    batch: int = 1,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    steps: int = 10,
) -> Deformation:
    r"""A random diffeomorphism :math:`\phi = \exp(v)` with its exact inverse :math:`\exp(-v)`.

    The velocity comes from :func:`random_velocity`; both maps are integrated by scaling and squaring
    with ``steps`` squarings. Raises if any Jacobian determinant is not positive (the field was too
    rough for its size: use fewer control points or a smaller ``max_norm``).

    Shape:
        returned Deformation: ``forward``, ``inverse``, ``velocity`` of shape ``(batch, N, *shape)``.
    """
    from ..registration.integrators import scaling_and_squaring

    v = random_velocity(shape, max_norm, control_points=control_points, margin=margin, batch=batch, generator=generator, dtype=torch.float64)
    fwd, inv = scaling_and_squaring(v, steps), scaling_and_squaring(-v, steps)
    det = torch.minimum(jacobian_determinant(fwd).amin(), jacobian_determinant(inv).amin())
    if det <= 0:
        raise ValueError(f"random_deformation: the drawn field folds (min det J = {float(det):.3f}); lower max_norm={max_norm} or control_points={control_points}")
    return Deformation(fwd.to(dtype), inv.to(dtype), v.to(dtype))


def random_intensity_map(
    image: torch.Tensor,
    *,
    knots: int = 5,
    monotone: bool = False,
    low: float = 1.0,
    high: float = 99.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""A synthetic second contrast: a random piecewise-linear map of percentile-normalised intensities.

    Each image is normalised so that its ``low`` and ``high`` percentiles map to 0 and 1 (clipped),
    then passed through a piecewise-linear function with ``knots`` equally spaced knots whose values
    are drawn uniformly in [0, 1] (sorted when ``monotone``; otherwise contrast may invert).

    Shape:
        image: ``(B, C, *S)``; out: ``(B, C, *S)`` in [0, 1].
    """
    check_shape(image, "B C *S", "image")
    if knots < 2:
        raise ValueError(f"knots: expected at least 2, got {knots}")
    flat = image.flatten(1).to(torch.float64)
    q = torch.quantile(flat, torch.tensor([low / 100, high / 100], dtype=torch.float64), dim=1)
    x = ((flat - q[0, :, None]) / (q[1] - q[0]).clamp(min=1e-12)[:, None]).clamp(0, 1)
    values = torch.rand((image.shape[0], knots), generator=generator, dtype=torch.float64)
    if monotone:
        values = values.sort(dim=1).values
    pos = x * (knots - 1)
    i0 = pos.floor().clamp(max=knots - 2).long()
    t = pos - i0
    out = torch.gather(values, 1, i0) * (1 - t) + torch.gather(values, 1, i0 + 1) * t
    return out.view_as(image).to(image.dtype)
