r"""Training objective of the denoiser and an exponential moving average of its weights.

:func:`noise_prediction_loss` is the paper's intensity objective (Palette's with the L1 norm):

.. math::

    \mathcal{L} = \mathbb{E}_{y, k, \gamma, \epsilon}
    \big\| \epsilon_\theta\big(\sqrt{\gamma}\, y + \sqrt{1-\gamma}\,\epsilon,\ \gamma,\ c\big) - \epsilon \big\|_1,

with :math:`k \sim \mathcal{U}\{1..K\}` and :math:`\gamma \sim \mathcal{U}[\gamma_k, \gamma_{k-1})`
(continuous noise level, see :meth:`~plasticine.core.NoiseSchedule.sample_gamma`). With
``prediction="x0"`` or ``"v"`` the denoiser regresses :math:`y` or
:math:`v = \sqrt{\gamma}\epsilon - \sqrt{1-\gamma}\,y` instead
(:func:`~plasticine.diffusion.prediction.prediction_target`), and ``snr_gamma`` weights each sample
by min-SNR (:func:`~plasticine.diffusion.prediction.min_snr_weight`, Hang et al. 2023).
:class:`EMA` keeps :math:`\bar\theta \leftarrow d\,\bar\theta + (1 - d)\,\theta` for sampling.

References:
    Saharia et al., "Palette: Image-to-Image Diffusion Models", SIGGRAPH 2022.
    Ho, Jain, Abbeel, "Denoising Diffusion Probabilistic Models", NeurIPS 2020.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Literal

import torch

from ..core.protocols import Denoiser, NoiseSchedule
from ..core.shapes import check_shape
from ..core.validate import check_number
from .prediction import PREDICTIONS, Prediction, min_snr_weight, prediction_target
from .schedules import noise_like

__all__ = ["noise_prediction_loss", "NoisePredictionLoss", "EMA"]

LossKind = Literal["l1", "l2"]


def noise_prediction_loss(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    y: torch.Tensor,
    condition: torch.Tensor | None,
    generator: torch.Generator | None = None,
    loss: LossKind = "l1",
    *,
    prediction: Prediction = "eps",
    snr_gamma: float | None = None,
) -> torch.Tensor:
    r"""Noise-prediction loss at a continuous noise level drawn per sample.

    Draws, in this order from ``generator``: the steps ``k`` and levels ``gamma`` (``(B,)``,
    ``schedule.sample_gamma``), then the noise :math:`\epsilon \sim \mathcal{N}(0, I)` of the shape
    of ``y`` (:func:`~plasticine.diffusion.noise_like`); noises
    :math:`y_\gamma = \sqrt{\gamma} y + \sqrt{1-\gamma}\,\epsilon` (``schedule.diffuse``); calls
    ``denoiser(y_gamma, gamma, condition)`` (gamma in the dtype of ``y``, at least float32); and returns the mean
    over all elements of :math:`|\hat\epsilon - \epsilon|` (``"l1"``, the paper's) or
    :math:`(\hat\epsilon - \epsilon)^2` (``"l2"``, DDPM's simple loss).

    With ``prediction`` other than ``"eps"`` the error is taken against that parametrisation's
    target (:func:`~plasticine.diffusion.prediction.prediction_target`: :math:`y` for ``"x0"``,
    :math:`\sqrt\gamma\,\epsilon - \sqrt{1-\gamma}\,y` for ``"v"``). With ``snr_gamma`` the
    per-sample mean error is weighted by :math:`w(\gamma)` of min-SNR-:math:`\gamma_w`
    (:func:`~plasticine.diffusion.prediction.min_snr_weight`) before the batch mean:
    :math:`\frac1B \sum_b w_b\,\overline{|\hat o_b - o_b|}`. The same draws in either case.

    Args:
        denoiser: ``(noisy, gamma, condition) -> eps_hat``.
        schedule: the noise schedule (its ``sample_gamma`` and ``diffuse``).
        y: clean target images.
        condition: what the denoiser is conditioned on, or None.
        generator: the source of randomness, on any device (``None``: torch's default generator).
        loss: ``"l1"`` or ``"l2"``.
        prediction: what the denoiser predicts, ``"eps"`` (the paper's), ``"x0"`` or ``"v"``; the
            sampler must read it the same way (its ``prediction`` option).
        snr_gamma: the min-SNR cap :math:`\gamma_w > 0` (5 in Hang et al.), or None for no weighting.

    Returns:
        A scalar tensor (differentiable in the denoiser's parameters).

    Example:
        >>> import torch
        >>> from plasticine.diffusion import LinearSchedule
        >>> zero = lambda noisy, gamma, cond: torch.zeros_like(noisy)
        >>> y = torch.zeros(4, 1, 8, 8)
        >>> l2 = noise_prediction_loss(zero, LinearSchedule(num_steps=10), y, None, torch.Generator().manual_seed(0), "l2")
        >>> bool(0.5 < l2 < 1.5)  # E[eps^2] = 1
        True

    Shape:
        y: ``(B, C, *S)``; condition: ``(B, Cc, *S)`` or None; out: ``()``.
    """
    dims = check_shape(y, "B C *S", "y")
    if not y.is_floating_point():
        raise ValueError(f"y: expected a floating tensor, got dtype {y.dtype}")
    if condition is not None:
        check_shape(condition, "B Cc *S", "condition", bindings={"B": dims["B"], "S": dims["S"]})
    if loss not in ("l1", "l2"):
        raise ValueError(f"loss: expected 'l1' or 'l2', got {loss!r}")
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction: expected one of {PREDICTIONS}, got {prediction!r}")
    if snr_gamma is not None:
        check_number(snr_gamma, "snr_gamma", 0, min_open=True)
    if not isinstance(schedule, NoiseSchedule):
        raise ValueError(f"schedule: expected a NoiseSchedule, got {type(schedule).__name__}")
    _, gamma = schedule.sample_gamma(dims["B"], generator, device=y.device)
    noise = noise_like(y, generator)
    noisy = schedule.diffuse(y, gamma, noise)
    eps_hat = denoiser(noisy, gamma.to(torch.promote_types(y.dtype, torch.float32)), condition)
    if not isinstance(eps_hat, torch.Tensor) or eps_hat.shape != y.shape:
        got = tuple(eps_hat.shape) if isinstance(eps_hat, torch.Tensor) else type(eps_hat).__name__
        raise ValueError(f"denoiser output: expected shape {tuple(y.shape)}, got {got}")
    diff = eps_hat - prediction_target(y, noise, gamma, prediction)
    err = diff.abs() if loss == "l1" else diff.square()
    if snr_gamma is None:
        return err.mean()
    weight = min_snr_weight(gamma, snr_gamma, prediction).to(device=err.device, dtype=err.dtype)
    return (err.reshape(err.shape[0], -1).mean(1) * weight).mean()


class NoisePredictionLoss(torch.nn.Module):
    """Module form of :func:`noise_prediction_loss`: stores the schedule and the norm.

    Args:
        schedule: the noise schedule.
        loss: ``"l1"`` (the paper's) or ``"l2"``.
        prediction: ``"eps"``, ``"x0"`` or ``"v"``.
        snr_gamma: the min-SNR cap, or None.

    Shape:
        y: ``(B, C, *S)``; condition: ``(B, Cc, *S)`` or None; out: ``()``.
    """

    def __init__(self, schedule: NoiseSchedule, loss: LossKind = "l1", *, prediction: Prediction = "eps", snr_gamma: float | None = None) -> None:
        super().__init__()
        if loss not in ("l1", "l2"):
            raise ValueError(f"loss: expected 'l1' or 'l2', got {loss!r}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction: expected one of {PREDICTIONS}, got {prediction!r}")
        self.schedule, self.loss, self.prediction = schedule, loss, prediction
        self.snr_gamma = None if snr_gamma is None else check_number(snr_gamma, "snr_gamma", 0, min_open=True)

    def forward(self, denoiser: Denoiser, y: torch.Tensor, condition: torch.Tensor | None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Evaluate :func:`noise_prediction_loss` with the stored settings.

        Args:
            denoiser: ``(noisy, gamma, condition) -> eps_hat``.
            y: clean target images.
            condition: the condition, or None.
            generator: the source of randomness.

        Returns:
            A scalar tensor.

        Shape:
            y: ``(B, C, *S)``; condition: ``(B, Cc, *S)`` or None; out: ``()``.
        """
        return noise_prediction_loss(denoiser, self.schedule, y, condition, generator, self.loss, prediction=self.prediction, snr_gamma=self.snr_gamma)

    def extra_repr(self) -> str:
        return f"schedule={self.schedule!r}, loss={self.loss!r}, prediction={self.prediction!r}, snr_gamma={self.snr_gamma!r}"


class EMA:
    r"""Exponential moving average of a model's parameters.

    ``update()`` sets :math:`\bar\theta \leftarrow d\,\bar\theta + (1 - d)\,\theta` for every
    floating parameter (after ``n`` updates with a constant :math:`\theta`:
    :math:`\bar\theta_n = d^n \bar\theta_0 + (1 - d^n)\theta`). The average starts as a copy of
    the parameters and is held in at least float32. Buffers (e.g. batch-norm statistics) are
    not averaged: the model's own are used. ``average_parameters()`` swaps the averaged weights
    into the model for a ``with`` block and restores the trained ones afterwards (also on an
    exception); ``copy_to()`` writes them for good.

    Args:
        model: the module being trained.
        decay: :math:`d \in [0, 1)`.

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(2, 1)
        >>> ema = EMA(net, decay=0.5)
        >>> with torch.no_grad():
        ...     _ = net.weight.add_(2.0)
        >>> ema.update()
        >>> with ema.average_parameters():
        ...     pass  # sample with the averaged weights here
        >>> ema.num_updates
        1

    Shape:
        Not applicable (parameters keep their shapes).
    """

    def __init__(self, model: torch.nn.Module, decay: float = 0.9999) -> None:
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        self.decay = check_number(decay, "decay", 0, 1, max_open=True)
        self.model = model
        self.num_updates = 0
        self.shadow: dict[str, torch.Tensor] = {
            name: p.detach().clone().to(torch.promote_types(p.dtype, torch.float32)) for name, p in self._params()
        }

    def _params(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        return ((n, p) for n, p in self.model.named_parameters() if p.is_floating_point())

    def _matched(self) -> list[tuple[torch.Tensor, torch.nn.Parameter]]:
        params = dict(self._params())
        if params.keys() != self.shadow.keys():
            missing = sorted(set(self.shadow) ^ set(params))
            raise ValueError(f"EMA: the model's parameters changed since the average was created (differing names: {missing[:5]})")
        for name, p in params.items():
            if p.shape != self.shadow[name].shape:
                raise ValueError(f"EMA: parameter {name}: expected shape {tuple(self.shadow[name].shape)}, got {tuple(p.shape)}")
        return [(self.shadow[n], p) for n, p in params.items()]

    @torch.no_grad()
    def update(self) -> None:
        """Fold the model's current parameters into the average.

        Returns:
            None.

        Shape:
            Not applicable.
        """
        for avg, p in self._matched():
            avg.lerp_(p.detach().to(device=avg.device, dtype=avg.dtype), 1.0 - self.decay)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module | None = None) -> None:
        """Write the averaged weights into ``model`` (default: the tracked model) for good.

        Args:
            model: a module with the same parameter names and shapes.

        Returns:
            None.

        Shape:
            Not applicable.
        """
        target = self.model if model is None else model
        params = dict((n, p) for n, p in target.named_parameters() if p.is_floating_point())
        if params.keys() != self.shadow.keys():
            raise ValueError(f"EMA.copy_to: expected a model with parameters {sorted(self.shadow)[:5]}..., got {sorted(params)[:5]}...")
        for name, p in params.items():
            p.copy_(self.shadow[name])

    @contextmanager
    def average_parameters(self) -> Iterator[torch.nn.Module]:
        """Swap the averaged weights into the model for a ``with`` block; restore on exit.

        Returns:
            A context manager yielding the model (holding the averaged weights inside the block).

        Shape:
            Not applicable.
        """
        pairs = self._matched()
        backup = [p.detach().clone() for _, p in pairs]
        with torch.no_grad():
            for avg, p in pairs:
                p.copy_(avg)
        try:
            yield self.model
        finally:
            with torch.no_grad():
                for (_, p), saved in zip(pairs, backup):
                    p.copy_(saved)

    def state_dict(self) -> dict[str, Any]:
        """The average, the decay and the update count (tensors and plain values only).

        Returns:
            ``{"decay", "num_updates", "shadow": {name: tensor}}``.

        Shape:
            Not applicable.
        """
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": {n: t.clone() for n, t in self.shadow.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (names and shapes must match the model).

        Args:
            state: a dict from :meth:`state_dict`.

        Returns:
            None.

        Shape:
            Not applicable.
        """
        if not isinstance(state, dict) or not {"decay", "num_updates", "shadow"} <= state.keys():
            raise ValueError(f"state: expected keys decay, num_updates, shadow, got {sorted(state) if isinstance(state, dict) else type(state).__name__}")
        shadow = state["shadow"]
        if shadow.keys() != self.shadow.keys():
            raise ValueError(f"state['shadow']: expected parameters {sorted(self.shadow)}, got {sorted(shadow)}")
        for name, t in shadow.items():
            if tuple(t.shape) != tuple(self.shadow[name].shape):
                raise ValueError(f"state['shadow'][{name!r}]: expected shape {tuple(self.shadow[name].shape)}, got {tuple(t.shape)}")
        decay = state["decay"]
        if not 0.0 <= float(decay) < 1.0:
            raise ValueError(f"state['decay']: expected a float in [0, 1), got {decay!r}")
        self.decay = float(decay)
        self.num_updates = int(state["num_updates"])
        for name, t in shadow.items():
            self.shadow[name] = t.detach().to(device=self.shadow[name].device, dtype=self.shadow[name].dtype).clone()

    def __repr__(self) -> str:
        return f"EMA(decay={self.decay}, num_updates={self.num_updates}, parameters={len(self.shadow)})"
