r"""What the denoiser's output means, and the conditioning of its data prediction.

One place for the parametrisation shared by the samplers and the loss. For a noisy state
:math:`y = \sqrt{\gamma}\,x_0 + \sqrt{1-\gamma}\,\epsilon` the denoiser may predict

* ``"eps"``: the noise :math:`\epsilon` (the paper's, DDPM's);
* ``"x0"``: the clean image :math:`x_0`;
* ``"v"``: the velocity :math:`v = \sqrt{\gamma}\,\epsilon - \sqrt{1-\gamma}\,x_0` (Salimans & Ho),

and :func:`split_prediction` turns any of them into the pair :math:`(\hat\epsilon, \hat x_0)`:

.. math::

    \text{eps: } \hat x_0 = \frac{y - \sqrt{1-\gamma}\,\hat\epsilon}{\sqrt{\gamma}},\qquad
    \text{x0: } \hat\epsilon = \frac{y - \sqrt{\gamma}\,\hat x_0}{\sqrt{1-\gamma}},\qquad
    \text{v: } \hat x_0 = \sqrt{\gamma}\,y - \sqrt{1-\gamma}\,\hat v,\ \
    \hat\epsilon = \sqrt{1-\gamma}\,y + \sqrt{\gamma}\,\hat v.

:func:`threshold_x0` clips a data prediction to a range, or applies Imagen's dynamic thresholding
(per sample :math:`s = \max(1, \mathrm{quantile}_p |\hat x_0|)`,
:math:`\hat x_0 \leftarrow \mathrm{clip}(\hat x_0, -s, s) / s`). :func:`min_snr_weight` is the
min-SNR-:math:`\gamma_w` loss weight of Hang et al. with :math:`\mathrm{SNR} = \gamma / (1 - \gamma)`:
:math:`\min(\mathrm{SNR}, \gamma_w)/\mathrm{SNR}` for eps, :math:`\min(\mathrm{SNR}, \gamma_w)` for
x0 and :math:`\min(\mathrm{SNR}, \gamma_w)/(\mathrm{SNR} + 1)` for v (each is the x0-loss weight
:math:`\min(\mathrm{SNR}, \gamma_w)` expressed on that parametrisation's own error).

References:
    Salimans, Ho, "Progressive Distillation for Fast Sampling of Diffusion Models", ICLR 2022 (v).
    Saharia et al., "Photorealistic Text-to-Image Diffusion Models with Deep Language
    Understanding" (Imagen), NeurIPS 2022 (dynamic thresholding).
    Hang et al., "Efficient Diffusion Training via Min-SNR Weighting Strategy", ICCV 2023.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from ..core.validate import check_interval, check_number, check_option

__all__ = ["Prediction", "PREDICTIONS", "split_prediction", "prediction_target", "min_snr_weight", "threshold_x0", "check_clip"]

Prediction = Literal["eps", "x0", "v"]
PREDICTIONS: tuple[str, ...] = ("eps", "x0", "v")


def _levels(gamma: float | torch.Tensor, like: torch.Tensor) -> tuple[float | torch.Tensor, float | torch.Tensor]:
    """``(sqrt(gamma), sqrt(1 - gamma))`` as floats, or as tensors broadcast over ``like``'s batch."""
    if isinstance(gamma, torch.Tensor):
        g = gamma.to(device=like.device, dtype=torch.promote_types(like.dtype, torch.float32)).reshape(-1, *([1] * (like.dim() - 1)))
        return g.sqrt(), (1 - g).sqrt()
    return math.sqrt(gamma), math.sqrt(1 - gamma)


def split_prediction(output: torch.Tensor, noisy: torch.Tensor, gamma: float | torch.Tensor, prediction: Prediction = "eps") -> tuple[torch.Tensor, torch.Tensor]:
    r"""The noise and data predictions :math:`(\hat\epsilon, \hat x_0)` of a denoiser output.

    See the module docstring for the formulas. Both come back in the dtype of ``output``.

    Args:
        output: what the denoiser returned.
        noisy: its input :math:`y`.
        gamma: the signal level :math:`\gamma \in (0, 1)`: a float, or a ``(B,)`` tensor.
        prediction: ``"eps"``, ``"x0"`` or ``"v"``.

    Returns:
        ``(eps, x0)``.

    Example:
        >>> import torch
        >>> x0, eps, g = torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), 0.25
        >>> y = g**0.5 * x0 + (1 - g) ** 0.5 * eps
        >>> v = g**0.5 * eps - (1 - g) ** 0.5 * x0
        >>> e, x = split_prediction(v, y, g, "v")
        >>> torch.allclose(x, x0) and torch.allclose(e, eps, atol=1e-6)
        True

    Shape:
        output, noisy: ``(B, C, *S)``; gamma: a float or ``(B,)``; out: two ``(B, C, *S)``.
    """
    check_option(prediction, "prediction", PREDICTIONS)
    a, s = _levels(gamma, output)
    if prediction == "eps":
        eps, x0 = output, (noisy - s * output) / a
    elif prediction == "x0":
        eps, x0 = (noisy - a * output) / s, output
    else:
        eps, x0 = s * noisy + a * output, a * noisy - s * output
    return eps.to(output.dtype), x0.to(output.dtype)


def prediction_target(x0: torch.Tensor, noise: torch.Tensor, gamma: torch.Tensor, prediction: Prediction = "eps") -> torch.Tensor:
    r"""What a denoiser of the given parametrisation should return for :math:`y = \sqrt\gamma x_0 + \sqrt{1-\gamma}\epsilon`.

    Args:
        x0: clean images.
        noise: the noise :math:`\epsilon`.
        gamma: ``(B,)`` signal levels.
        prediction: ``"eps"`` (returns ``noise`` itself), ``"x0"`` (``x0`` itself) or ``"v"``.

    Returns:
        The regression target, in the dtype of ``x0``.

    Shape:
        x0, noise: ``(B, C, *S)``; gamma: ``(B,)``; out: ``(B, C, *S)``.
    """
    check_option(prediction, "prediction", PREDICTIONS)
    if prediction == "eps":
        return noise
    if prediction == "x0":
        return x0
    a, s = _levels(gamma, x0)
    return (a * noise - s * x0).to(x0.dtype)


def min_snr_weight(gamma: torch.Tensor, snr_gamma: float, prediction: Prediction = "eps") -> torch.Tensor:
    r"""Per-sample min-SNR loss weights (Hang et al. 2023), see the module docstring.

    Args:
        gamma: ``(B,)`` signal levels in ``(0, 1)``.
        snr_gamma: the cap :math:`\gamma_w > 0` (the paper uses 5).
        prediction: the parametrisation whose error is weighted.

    Returns:
        ``(B,)`` weights in float64.

    Shape:
        gamma: ``(B,)``; out: ``(B,)``.
    """
    check_option(prediction, "prediction", PREDICTIONS)
    check_number(snr_gamma, "snr_gamma", 0, min_open=True)
    g = gamma.to(torch.float64)
    snr = g / (1 - g)
    capped = snr.clamp(max=float(snr_gamma))
    if prediction == "eps":
        return capped / snr
    if prediction == "x0":
        return capped
    return capped / (snr + 1)


def check_clip(clip: object, dynamic_threshold: object) -> tuple[tuple[float, float] | None, float | None]:
    """Validate a sampler's ``clip`` and ``dynamic_threshold`` options (at most one of them).

    Args:
        clip: None or ``(low, high)`` with ``low < high``, finite.
        dynamic_threshold: None or a percentile ``p`` in ``(0, 1]``.

    Returns:
        ``(clip, dynamic_threshold)`` as ``(float, float) | None`` and ``float | None``.

    Shape:
        Not applicable.
    """
    clip = check_interval(clip, "clip")
    if dynamic_threshold is not None:
        dynamic_threshold = check_number(dynamic_threshold, "dynamic_threshold", 0, 1, min_open=True)
        if clip is not None:
            raise ValueError(f"clip and dynamic_threshold: expected at most one of them, got clip={clip!r} and dynamic_threshold={dynamic_threshold!r}")
    return clip, dynamic_threshold  # type: ignore[return-value]


def threshold_x0(x0: torch.Tensor, clip: tuple[float, float] | None = None, dynamic_threshold: float | None = None) -> torch.Tensor:
    r"""Clip a data prediction to ``clip``, or dynamically threshold it into ``[-1, 1]``.

    Dynamic thresholding (Imagen): per sample :math:`s = \max(1, q_p)` with :math:`q_p` the
    ``p = dynamic_threshold`` quantile of :math:`|\hat x_0|` over all its elements, then
    :math:`\hat x_0 \leftarrow \mathrm{clip}(\hat x_0, -s, s)/s`: a prediction already inside
    ``[-1, 1]`` is unchanged, one that overshoots is pulled back in, keeping its relative contrast.
    Non-finite values propagate (a NaN stays NaN).

    Args:
        x0: data predictions.
        clip: ``(low, high)``, or None.
        dynamic_threshold: the percentile ``p`` in ``(0, 1]``, or None.

    Returns:
        The conditioned prediction (``x0`` itself when both are None).

    Shape:
        x0: ``(B, C, *S)``; out: ``(B, C, *S)``.
    """
    if clip is not None:
        return x0.clamp(clip[0], clip[1])
    if dynamic_threshold is not None:
        flat = x0.detach().reshape(x0.shape[0], -1).abs().to(torch.promote_types(x0.dtype, torch.float32))
        s = torch.quantile(flat, dynamic_threshold, dim=1).clamp(min=1.0).to(x0.dtype)
        s = s.reshape(-1, *([1] * (x0.dim() - 1)))
        return torch.maximum(torch.minimum(x0, s), -s) / s
    return x0
