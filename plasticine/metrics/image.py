r"""Paired image scores: mean absolute error, PSNR and SSIM, each in an optional mask.

Every function compares two images ``a`` and ``b`` of the same shape ``(B, C, *S)`` (2D or 3D) and
returns one score per item, a float64 ``(B,)`` tensor on the inputs' device. A ``mask`` ``(B, 1, *S)``
(bool) selects the voxels that count, the same in every channel; without a mask every voxel counts.
An item whose mask selects nothing is refused (its score would be 0/0), never returned as NaN.

Write :math:`\Omega_b` for the voxels of item ``b`` that the mask selects, :math:`|\Omega_b|` for
their number and :math:`C` for the channels. Then

.. math::

   \mathrm{MAE}_b = \frac{1}{C |\Omega_b|} \sum_{c, x \in \Omega_b} |a_{bcx} - b_{bcx}|, \qquad
   \mathrm{PSNR}_b = 10 \log_{10} \frac{R^2}{\mathrm{MSE}_b}, \qquad
   \mathrm{SSIM}_b = \frac{1}{C |\Omega_b'|} \sum_{c, x \in \Omega_b'} S_{bc}(x),

with the mean squared error :math:`\mathrm{MSE}_b` over the same voxels as the MAE, the data range
:math:`R` (the difference between the largest and the smallest value the images can take, e.g.
``1`` for images in ``[0, 1]``, ``4095`` for CT clipped to ``[-1024, 3071]`` HU) and the SSIM map
:math:`S` of Wang et al. (2004), computed with Gaussian local statistics:

.. math::

   S(x) = \frac{(2 \mu_a \mu_b + C_1)(2 \sigma_{ab} + C_2)}{(\mu_a^2 + \mu_b^2 + C_1)(\sigma_a^2 + \sigma_b^2 + C_2)},
   \quad C_1 = (K_1 R)^2, \ C_2 = (K_2 R)^2, \ K_1 = 0.01, \ K_2 = 0.03,

where :math:`\mu_a = g * a`, :math:`\sigma_a^2 = g * a^2 - \mu_a^2` and
:math:`\sigma_{ab} = g * (ab) - \mu_a \mu_b` for the normalised Gaussian window :math:`g` of standard
deviation ``sigma`` (default 1.5) and radius :math:`r = \lfloor 3.5 \sigma + 0.5 \rfloor` (5 voxels
for 1.5: an 11-voxel window). The SSIM is averaged over :math:`\Omega_b' = \Omega_b \cap I`, where
:math:`I` is the interior, the voxels at least :math:`r` from every border, whose windows lie inside
the image; no padding convention enters the score. Without a mask this is exactly scikit-image's
``structural_similarity(a, b, data_range=R, gaussian_weights=True, sigma=1.5,
use_sample_covariance=False)`` (which crops the same border before averaging); with a mask it is the
mean of the SSIM map over the mask, as the SynthRAD challenge scores synthetic CT (which also crops
the border of its map and mask). SynthRAD further sets the voxels outside the mask to the lowest
value of the range in both images before computing the map; do that to the inputs first to
reproduce its numbers exactly.

PSNR is ``inf`` for identical images (MSE 0). Computation is in float64.

References:
    Wang, Bovik, Sheikh and Simoncelli, "Image quality assessment: from error visibility to
    structural similarity", IEEE TIP 13(4), 2004. Thummerer et al., "SynthRAD2023 Grand Challenge
    dataset: generating synthetic CT for radiotherapy", Medical Physics 50(7), 2023.
"""

from __future__ import annotations

import math

import torch

from ..core.filters import gaussian_smooth
from ..core.shapes import check_shape
from ..core.validate import check_image, check_number

__all__ = ["mae", "psnr", "ssim"]

K1 = 0.01
K2 = 0.03
TRUNCATE = 3.5
"""Window radius of the SSIM in standard deviations (scikit-image's and SciPy's Gaussian filter)."""


def check_mask(mask: torch.Tensor | None, dims: dict, name: str = "mask") -> torch.Tensor | None:
    """Validate an optional bool mask ``(B, 1, *S)`` against the image bindings ``dims``.

    Args:
        mask: the mask or None.
        dims: bindings of the images (``B`` and ``S``), from :func:`~plasticine.core.check_image`.
        name: how it is called in the error.

    Returns:
        The mask (unchanged), or None.

    Raises:
        ValueError: for a wrong shape, a non-bool dtype or an item whose mask is empty.

    Shape:
        mask: ``(B, 1, *S)``.
    """
    if mask is None:
        return None
    check_shape(mask, "B 1 *S", name, bindings=dict(dims))
    if mask.dtype != torch.bool:
        raise ValueError(f"{name}: expected a bool tensor, got dtype {mask.dtype}")
    empty = (~mask.flatten(1).any(1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"{name}: expected at least one selected voxel per item, got none in items {empty}")
    return mask


def _pair(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None) -> tuple[dict, torch.Tensor | None]:
    dims = check_image(a, "a")
    check_image(b, "b")
    check_shape(b, "B C *S", "b", bindings=dict(dims))
    return dims, check_mask(mask, dims)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over channels and the selected voxels of each item: ``(B, C, *S)`` -> ``(B,)``."""
    if mask is None:
        return values.flatten(1).mean(1)
    weight = mask.to(values.dtype).expand_as(values)
    return (values * weight).flatten(1).sum(1) / weight.flatten(1).sum(1)


def mae(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    r"""Mean absolute error :math:`\frac{1}{C|\Omega|}\sum |a - b|` per item, over the mask (see the module).

    Args:
        a: one image.
        b: the other, same shape.
        mask: the voxels that count (bool), or None for all.

    Returns:
        float64 scores, in the images' units.

    Raises:
        ValueError: for shapes that differ, non-floating or non-finite images, or a bad mask.

    Shape:
        a, b: ``(B, C, *S)``; mask: ``(B, 1, *S)``; out: ``(B,)``.
    """
    _, mask = _pair(a, b, mask)
    return _masked_mean((a.double() - b.double()).abs(), mask)


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    r"""Peak signal-to-noise ratio :math:`10 \log_{10}(R^2 / \mathrm{MSE})` per item, in dB, over the mask.

    Args:
        a: one image.
        b: the other, same shape.
        data_range: :math:`R`, the range of values the images can take (positive).
        mask: the voxels that count (bool), or None for all.

    Returns:
        float64 scores in decibels; ``inf`` where the images agree on every selected voxel.

    Raises:
        ValueError: for shapes that differ, non-floating or non-finite images, a bad mask or a
            non-positive ``data_range``.

    Shape:
        a, b: ``(B, C, *S)``; mask: ``(B, 1, *S)``; out: ``(B,)``.
    """
    _, mask = _pair(a, b, mask)
    r = check_number(data_range, "data_range", 0.0, math.inf, min_open=True, max_open=True)
    mse = _masked_mean((a.double() - b.double()) ** 2, mask)
    return 10.0 * torch.log10(r * r / mse)


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float, mask: torch.Tensor | None = None, sigma: float = 1.5) -> torch.Tensor:
    r"""Structural similarity (Wang et al. 2004, Gaussian window) per item, averaged over the mask's interior.

    The SSIM map :math:`S` of the module's formula, averaged over the channels and over the selected
    voxels that lie at least the window radius :math:`r = \lfloor 3.5\sigma + 0.5 \rfloor` from
    every border. Without a mask it equals scikit-image's ``structural_similarity`` with
    ``gaussian_weights=True, sigma=sigma, use_sample_covariance=False, data_range=data_range``
    (channels averaged as with its ``channel_axis``).

    Args:
        a: one image.
        b: the other, same shape.
        data_range: :math:`R` of the constants :math:`C_1 = (0.01 R)^2`, :math:`C_2 = (0.03 R)^2` (positive).
        mask: the voxels that count (bool), or None for all.
        sigma: standard deviation of the Gaussian window in voxels (positive).

    Returns:
        float64 scores, at most 1 (1 for identical images).

    Raises:
        ValueError: for shapes that differ, non-floating or non-finite images, a bad mask, a
            non-positive ``data_range`` or ``sigma``, an image smaller than the window
            (:math:`2r + 1` voxels along some axis) or a mask with no voxel in the interior.

    Shape:
        a, b: ``(B, C, *S)``; mask: ``(B, 1, *S)``; out: ``(B,)``.
    """
    dims, mask = _pair(a, b, mask)
    r_data = check_number(data_range, "data_range", 0.0, math.inf, min_open=True, max_open=True)
    sigma = check_number(sigma, "sigma", 0.0, math.inf, min_open=True, max_open=True)
    radius = max(1, int(TRUNCATE * sigma + 0.5))
    if min(dims["S"]) < 2 * radius + 1:
        raise ValueError(
            f"a: expected at least {2 * radius + 1} voxels along every spatial axis (the window of sigma {sigma}), got {dims['S']}"
        )
    x, y = a.double(), b.double()
    stats = gaussian_smooth(torch.cat([x, y, x * x, y * y, x * y], 1), sigma, TRUNCATE)
    mu_x, mu_y, xx, yy, xy = stats.chunk(5, 1)
    var_x, var_y, cov = xx - mu_x * mu_x, yy - mu_y * mu_y, xy - mu_x * mu_y
    c1, c2 = (K1 * r_data) ** 2, (K2 * r_data) ** 2
    smap = (2 * mu_x * mu_y + c1) * (2 * cov + c2) / ((mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2))
    interior = torch.zeros((1, 1, *dims["S"]), dtype=torch.bool, device=a.device)
    interior[(slice(None), slice(None)) + (slice(radius, -radius),) * dims["N"]] = True
    where = interior if mask is None else mask & interior
    empty = (~where.flatten(1).any(1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"mask: expected a selected voxel at least {radius} voxels from the border, got none in items {empty}")
    return _masked_mean(smap, where.expand(dims["B"], 1, *dims["S"]))
