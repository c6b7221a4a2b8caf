r"""Reverse-diffusion samplers that run an explicit, tested plan of ``(k, k_prev)`` steps.

Every sampler here satisfies :class:`~plasticine.core.Sampler`, reads only ``schedule.gammas`` of
the :class:`~plasticine.core.NoiseSchedule` protocol, and calls the
denoiser as ``denoiser(y_k, gamma_k, condition) -> eps_hat`` with the signal level
:math:`\gamma_k` (not an integer step); a denoiser trained to predict ``x0`` or ``v`` instead is
read through the sampler's ``prediction`` option, and ``clip`` / ``dynamic_threshold`` condition the
data prediction before each step (:mod:`plasticine.diffusion.prediction`; the defaults, eps and no
clipping, are the paper's). Notation: :math:`\gamma = \gamma_k`,
:math:`\gamma' = \gamma_{k'}` for a step ``k -> k'`` (``k' < k``), and the data prediction
:math:`\hat y_0 = (y_k - \sqrt{1-\gamma}\,\hat\epsilon) / \sqrt{\gamma}`.

* :class:`AncestralSampler`: the paper's Algorithm 1 (DDPM, eq. 5);
* :class:`DDIMSampler`: DDIM with stochasticity ``eta``, plus a deterministic
  :meth:`~DDIMSampler.encode` / :meth:`~DDIMSampler.decode` pair (DDIB-style translation; the
  function :func:`ddim_encode` and :class:`~plasticine.diffusion.DDIBTranslator`);
* :class:`DPMSolverPP`: DPM-Solver++ (2M), a second-order multistep solver for few steps.

**The plan.** :func:`step_plan` turns a start step ``k0`` and a number of steps into the list of
pairs ``[(k0, k_1), (k_1, k_2), ..., (k_{n-1}, 0)]``: strictly decreasing, first ``k = k0``,
last ``k_prev = 0``, and the ``k_prev`` of one pair is the ``k`` of the next, so there is no
separately computed "previous timestep" to get wrong. It has ``n = min(steps, k0)`` pairs
(``k0`` pairs, every step, when ``steps`` is None), and none when ``k0 = 0``.

**The start.** ``sample(denoiser, schedule, condition, start, start_step, generator=None)`` steps
from ``(start, start_step)``: ``start`` *is* the state :math:`y_{k_0}` at step ``k0 = start_step``
and is never noised here; the caller makes it with the schedule:

* pure noise, ``start_step = K``: ``start = noise_like(x, g)`` (:func:`~plasticine.diffusion.noise_like`);
* a mid-schedule start (the paper's inference; SDEdit): ``start = schedule.q_sample(x, k0, noise_like(x, g))``
  (what :meth:`~plasticine.TraceableTranslator.translate` does).

``start_step`` is an int, or a ``(B,)`` integer tensor of per-sample steps; samples with different
``k0`` are run in groups, each with its own plan (ascending ``k0``).

Randomness comes only from ``generator`` (``None`` uses torch's default generator), drawn on the
generator's device and moved to the image's (:func:`~plasticine.diffusion.noise_like`). Step
coefficients are computed in float64 from the schedule and applied in the image dtype; the denoiser receives gamma in the image dtype, at least
float32. Gradients flow through a sampler like through any torch code: wrap inference in
``torch.no_grad()`` (or ``torch.inference_mode()``) so that a long plan does not keep its graph. :meth:`sample` returns the image; :meth:`sample_trajectory`
returns a :class:`SampleResult` with the intermediate states.

References:
    Ho, Jain, Abbeel, "Denoising Diffusion Probabilistic Models", NeurIPS 2020.
    Song, Meng, Ermon, "Denoising Diffusion Implicit Models", ICLR 2021.
    Lu et al., "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models", 2022.
    Lin et al., "Common Diffusion Noise Schedules and Sample Steps are Flawed", WACV 2024 (spacings).
    Meng et al., "SDEdit: Guided Image Synthesis and Editing with Stochastic Differential Equations", ICLR 2022.
    Su et al., "Dual Diffusion Implicit Bridges for Image-to-Image Translation", ICLR 2023.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Literal

import numpy as np
import torch

from ..core.config import Configurable
from ..core.protocols import Denoiser, NoiseSchedule
from ..core.shapes import check_shape
from ..core.validate import check_int, check_number, check_option
from .prediction import PREDICTIONS, Prediction, check_clip, split_prediction, threshold_x0
from .schedules import _check_steps, noise_like

__all__ = [
    "Spacing",
    "step_plan",
    "SampleResult",
    "PlanSampler",
    "AncestralSampler",
    "DDIMSampler",
    "ddim_encode",
    "DPMSolverPP",
]

Spacing = Literal["leading", "trailing", "linspace", "log_snr"]
_SPACINGS = ("leading", "trailing", "linspace", "log_snr")
Plan = list[tuple[int, int]]


def _round_half_up(num: np.ndarray, den: int) -> np.ndarray:
    """``floor(num / den + 1/2)`` in exact integer arithmetic (no float ties, no half-to-even)."""
    return (2 * num + den) // (2 * den)


def _log_snr_levels(k0: int, n: int, gammas: Any) -> np.ndarray:
    """``n`` distinct levels from ``k0`` down to 1 nearest to log-SNR targets evenly spaced from ``k0``'s to step 1's."""
    g = np.asarray(gammas, dtype=np.float64)[: k0 + 1]
    lam = np.log(g[1:]) - np.log1p(-g[1:])  # lam[k - 1] = log SNR of step k, decreasing in k
    targets = np.linspace(lam[k0 - 1], lam[0], n)
    levels = 1 + np.abs(lam[None, :] - targets[:, None]).argmin(1)
    # where several targets fall nearest one step, move the later ones down (then cap the top at k0)
    for i in range(n - 1, -1, -1):
        levels[i] = max(levels[i], (levels[i + 1] if i + 1 < n else 0) + 1)
    levels[0] = k0
    for i in range(1, n):
        levels[i] = min(levels[i], levels[i - 1] - 1)
    return levels


def step_plan(start: int, steps: int | None = None, spacing: Spacing = "trailing", gammas: Any = None) -> Plan:
    r"""The ``(k, k_prev)`` pairs of a reverse run from step ``start`` down to 0.

    With ``k0 = start`` and ``n = min(steps, k0)`` (``n = k0`` when ``steps`` is None), the plan
    visits ``n`` levels :math:`k_0 > k_1 > \dots > k_{n-1} \ge 1` and then 0:

    * ``"trailing"``: :math:`k_i = \mathrm{round}(k_0 - i\,k_0/n)`, evenly spaced and anchored at
      ``k0`` (the lowest level is about :math:`k_0/n`);
    * ``"linspace"``: :math:`k_i = \mathrm{round}` of ``n`` points evenly spaced from ``k0`` down to
      1 (the last pair is ``(1, 0)``);
    * ``"leading"``: integer stride :math:`r = \lfloor k_0/n \rfloor` anchored at the clean end,
      levels :math:`1, 1 + r, \dots, 1 + (n-2) r` topped by ``k0`` itself (Lin et al. note that the
      usual leading grid never starts at the requested level; this one always does);
    * ``"log_snr"``: evenly spaced in log-SNR, :math:`\lambda_k = \log(\gamma_k / (1 - \gamma_k))`
      (needs ``gammas``): :math:`k_i` is the step whose :math:`\lambda` is nearest to
      :math:`\lambda_{k_0} + i\,(\lambda_1 - \lambda_{k_0})/(n-1)`, so ``k_0`` first and 1 last;
      where two targets fall nearest the same step (finer than the discretisation) the later levels
      move down one step each to keep them distinct. DPM-Solver's "logSNR" time steps.

    Rounding is half up, in exact integer arithmetic, so levels at least one apart stay distinct
    and no float tie decides a level. When ``n = k0`` every spacing gives every step,
    ``[(k0, k0-1), ..., (1, 0)]``. For ``k0 = K`` divisible by ``n``, ``"trailing"`` is the
    trailing grid of diffusers' schedulers (whose timestep ``t`` is our step ``t + 1``).

    Args:
        start: the first step ``k0 >= 0`` (0 gives an empty plan).
        steps: the number of pairs wanted (at least 1), or None for every step.
        spacing: how the levels are spread.
        gammas: the schedule's levels :math:`\gamma_0 .. \gamma_K` (a sequence or a tensor), used
            (and required) by ``"log_snr"`` only.

    Returns:
        ``n`` pairs ``(k, k_prev)``, strictly decreasing, starting at ``k = k0`` and ending at
        ``k_prev = 0``, each ``k_prev`` equal to the next ``k``.

    Example:
        >>> step_plan(10, 3, "trailing")
        [(10, 7), (7, 3), (3, 0)]
        >>> step_plan(10, 3, "leading")
        [(10, 4), (4, 1), (1, 0)]
        >>> step_plan(10, 3, "linspace")
        [(10, 6), (6, 1), (1, 0)]

    Shape:
        Not applicable (Python ints).
    """
    k0 = check_int(start, "start", 0)
    if steps is not None:
        check_int(steps, "steps", 1)
    check_option(spacing, "spacing", _SPACINGS)
    if spacing == "log_snr" and gammas is None:
        raise ValueError("gammas: the 'log_snr' spacing needs the schedule's levels, got None")
    if k0 == 0:
        return []
    n = k0 if steps is None else min(int(steps), k0)
    if n == k0:
        levels = np.arange(k0, 0, -1)
    elif spacing == "log_snr":
        levels = _log_snr_levels(k0, n, gammas) if n > 1 else np.array([k0])
    elif spacing == "trailing":
        levels = _round_half_up(k0 * (n - np.arange(n, dtype=np.int64)), n)
    elif spacing == "linspace":
        i = np.arange(n, dtype=np.int64)
        levels = _round_half_up(k0 * (n - 1) - i * (k0 - 1), n - 1) if n > 1 else np.array([k0])
    else:
        r = k0 // n
        levels = np.concatenate([[k0], 1 + r * np.arange(n - 2, -1, -1)]) if n > 1 else np.array([k0])
    ks = [int(v) for v in levels] + [0]
    return list(zip(ks[:-1], ks[1:]))


@dataclass(frozen=True)
class SampleResult:
    """A sample with the states it passed through.

    Attributes:
        image: the final sample.
        trajectory: the states, ``trajectory[0]`` the start :math:`y_{k_0}` as given and
            ``trajectory[-1]`` the image; ``trajectory[i]`` is the state after ``i`` steps. With
            per-sample start steps the plans differ in length; a sample whose plan has ended keeps
            its final state (at step 0) in the later entries.
        steps: ``steps[i]`` is the step index of every sample in ``trajectory[i]``.

    Shape:
        image: ``(B, C, *S)``; trajectory: a list of ``(B, C, *S)``; steps: a list of ``(B,)`` int64.
    """

    image: torch.Tensor
    trajectory: list[torch.Tensor]
    steps: list[torch.Tensor]


# -- helpers ---------------------------------------------------------------------------------------


def _gammas_of(schedule: NoiseSchedule) -> list[float]:
    g = getattr(schedule, "gammas", None)
    if not isinstance(g, torch.Tensor):
        raise ValueError(f"schedule: expected a NoiseSchedule with a gammas tensor, got {type(schedule).__name__}")
    check_shape(g, "K1", "schedule.gammas")
    if g.shape[0] < 2:
        raise ValueError(f"schedule.gammas: expected K + 1 >= 2 levels, got shape {tuple(g.shape)}")
    if g.dtype != torch.float64:
        raise ValueError(f"schedule.gammas: expected float64, got {g.dtype}")
    gl = g.detach().cpu()
    if float(gl[0]) != 1.0 or not bool((gl[1:] < gl[:-1]).all()) or not float(gl[-1]) > 0:
        raise ValueError("schedule.gammas: expected gamma_0 = 1 and strictly decreasing positive levels")
    return gl.tolist()


def _eps(denoiser: Denoiser, x: torch.Tensor, gamma: float, condition: torch.Tensor | None) -> torch.Tensor:
    # at least float32: in float16 every gamma above 1 - 2**-11 would read as 1
    level = torch.full((x.shape[0],), gamma, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
    out = denoiser(x, level, condition)
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"denoiser output: expected shape {tuple(x.shape)} (that of the noisy input), got {got}")
    return out


def _check_inputs(start: torch.Tensor, condition: torch.Tensor | None, name: str) -> dict[str, Any]:
    dims = check_shape(start, "B C *S", name)
    if not start.is_floating_point():
        raise ValueError(f"{name}: expected a floating tensor, got dtype {start.dtype}")
    if condition is not None:
        check_shape(condition, "B Cc *S", "condition", bindings={"B": dims["B"], "S": dims["S"]})
    return dims


# A run executes one plan on one group: (x, condition, plan, record) -> (final, states after each step).
_Run = Callable[[torch.Tensor, "torch.Tensor | None", Plan, bool], tuple[torch.Tensor, list[torch.Tensor]]]


def _run_groups(x: torch.Tensor, condition: torch.Tensor | None, k0: torch.Tensor, plan_of: Callable[[int], Plan], run: _Run, record: bool) -> SampleResult:
    """Run every group of samples that share a start step with its own plan; reassemble."""
    values = torch.unique(k0).tolist()
    if len(values) == 1:
        plan = plan_of(int(values[0]))
        out, states = run(x, condition, plan, record)
        if not record:
            return SampleResult(out, [], [])
        ks = [k for k, _ in plan] + [0] if plan else [int(values[0])]
        steps = [torch.full((x.shape[0],), k, dtype=torch.int64) for k in ks]
        return SampleResult(out, [x] + states, steps)
    out = torch.empty_like(x)
    groups = []
    for v in values:
        idx = torch.nonzero(k0 == v).flatten()
        idx_dev = idx.to(x.device)
        plan = plan_of(int(v))
        g_out, g_states = run(x[idx_dev], None if condition is None else condition[idx_dev], plan, record)
        out[idx_dev] = g_out
        groups.append((idx, idx_dev, plan, [x[idx_dev]] + g_states))
    if not record:
        return SampleResult(out, [], [])
    length = max(len(g[3]) for g in groups)
    trajectory = [torch.empty_like(x) for _ in range(length)]
    steps = [torch.zeros(x.shape[0], dtype=torch.int64) for _ in range(length)]
    for idx, idx_dev, plan, states in groups:
        ks = [k for k, _ in plan] + [0] if plan else [0]
        for i in range(length):
            trajectory[i][idx_dev] = states[min(i, len(states) - 1)]
            steps[i][idx] = ks[min(i, len(ks) - 1)]
    return SampleResult(out, trajectory, steps)


class PlanSampler(Configurable, config_abstract=True):
    r"""Base class of the samplers: the plan, the start ``(y_k0, k0)``, per-sample groups.

    A subclass sets ``steps`` (None: every step) and ``spacing`` in its constructor and implements
    one reverse step rule, ``_run``; :meth:`plan`, :meth:`sample` and :meth:`sample_trajectory`
    are shared, so every sampler treats ``start``, ``start_step`` and ``generator`` the same way (see the module docstring of
    :mod:`plasticine.diffusion.samplers`). ``sampler.config`` holds a subclass's constructor
    arguments (:class:`~plasticine.core.Configurable`).

    Every sampler takes three more options, by keyword, read by :meth:`_predict`:

    * ``prediction``: what the denoiser returns, ``"eps"`` (the paper's), ``"x0"`` or ``"v"`` (see
      :mod:`plasticine.diffusion.prediction`); it must be what the denoiser was trained for (the
      loss reads the same setting, :func:`~plasticine.training.diffusion_objective`).
    * ``clip``: ``(low, high)``: clip the data prediction :math:`\hat x_0` to this range before
      every step (e.g. ``(-1, 1)`` for data scaled there), or None (the default).
    * ``dynamic_threshold``: Imagen's percentile ``p`` in ``(0, 1]`` (e.g. 0.995): per sample
      :math:`s = \max(1, \mathrm{quantile}_p|\hat x_0|)`, :math:`\hat x_0 \leftarrow
      \mathrm{clip}(\hat x_0, -s, s)/s`, or None (the default). At most one of ``clip`` and
      ``dynamic_threshold``.

    An oracle denoiser of an image inside the clip range stays exact with either; whatever the
    denoiser returns, a clipped sampler's output lies in the clip range (``[-1, 1]`` for the
    dynamic threshold), since every last step returns the conditioned :math:`\hat x_0`.

    Shape:
        See :meth:`PlanSampler.sample`.
    """

    steps: int | None
    spacing: Spacing
    prediction: Prediction = "eps"
    clip: tuple[float, float] | None = None
    dynamic_threshold: float | None = None

    def _set_prediction(self, prediction: Prediction, clip: tuple[float, float] | None, dynamic_threshold: float | None) -> None:
        """Check and store the options shared by every sampler: the parametrisation and the x0 conditioning."""
        self.prediction = check_option(prediction, "prediction", PREDICTIONS)
        self.clip, self.dynamic_threshold = check_clip(clip, dynamic_threshold)

    def _predict(self, denoiser: Denoiser, x: torch.Tensor, gamma: float, condition: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        r"""``(eps, x0)`` at ``(x, gamma)``: the denoiser output read in ``prediction``, x0 clipped or thresholded.

        With the defaults (``"eps"``, no clipping) this is the denoiser output itself and ``None``
        (the step rules use it unchanged). Otherwise :math:`\hat x_0` comes from
        :func:`~plasticine.diffusion.prediction.split_prediction`, is conditioned by
        :func:`~plasticine.diffusion.prediction.threshold_x0`, and :math:`\hat\epsilon =
        (y - \sqrt\gamma\,\hat x_0)/\sqrt{1-\gamma}` is recomputed from it, so that a step
        built from either is the same step.
        """
        out = _eps(denoiser, x, gamma, condition)
        if self.prediction == "eps" and self.clip is None and self.dynamic_threshold is None:
            return out, None
        eps, x0 = split_prediction(out, x, gamma, self.prediction)
        if self.clip is None and self.dynamic_threshold is None:
            return eps, x0
        x0 = threshold_x0(x0, self.clip, self.dynamic_threshold)
        return (x - math.sqrt(gamma) * x0) / math.sqrt(1 - gamma), x0

    def _options_repr(self) -> str:
        """The shared options that differ from their defaults, for ``__repr__``."""
        parts = [f", {n}={getattr(self, n)!r}" for n, d in (("prediction", "eps"), ("clip", None), ("dynamic_threshold", None)) if getattr(self, n) != d]
        return "".join(parts)

    def plan(self, schedule: NoiseSchedule, start_step: int) -> Plan:
        """The ``(k, k_prev)`` pairs this sampler runs from ``start_step``.

        See :func:`step_plan` for the spacing and the guarantees.

        Args:
            schedule: the noise schedule (gives ``K``).
            start_step: the first step, an int in ``[0, K]`` (``K``: from pure noise).

        Returns:
            The list of pairs, ``min(steps, start_step)`` long.

        Shape:
            Not applicable.
        """
        K = len(_gammas_of(schedule)) - 1
        return step_plan(int(_check_steps(start_step, "start_step", 0, K, 1)[0]), self.steps, self.spacing, schedule.gammas)

    def _run(self, denoiser: Denoiser, gammas: list[float], x: torch.Tensor, condition: torch.Tensor | None, plan: Plan, generator: torch.Generator | None, record: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The step rule of a subclass: run ``plan`` on the states ``x`` (one group, all at the plan's first ``k``).

        ``gammas`` are the schedule's levels as Python floats; stochastic steps draw from
        ``generator`` with :func:`~plasticine.diffusion.noise_like`. Returns the final states and,
        when ``record``, the state after every step. Every setting (``eta``, ``order``, ...) comes
        from the constructor, so every sampler has this one signature.
        """
        raise NotImplementedError

    def _sample(self, denoiser: Denoiser, schedule: NoiseSchedule, condition: torch.Tensor | None, start: torch.Tensor, start_step: int | torch.Tensor, generator: torch.Generator | None, record: bool, name: str = "start") -> SampleResult:
        gammas = _gammas_of(schedule)
        dims = _check_inputs(start, condition, name)
        k0 = _check_steps(start_step, "start_step", 0, len(gammas) - 1, dims["B"]).cpu()
        plan_of = lambda k: step_plan(k, self.steps, self.spacing, gammas)  # noqa: E731
        run = lambda xs, cs, plan, rec: self._run(denoiser, gammas, xs, cs, plan, generator, rec)  # noqa: E731
        return _run_groups(start, condition, k0, plan_of, run, record)

    def sample(
        self,
        denoiser: Denoiser,
        schedule: NoiseSchedule,
        condition: torch.Tensor | None,
        start: torch.Tensor,
        start_step: int | torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Denoise the states ``start`` at ``start_step`` to step 0 (see the module docstring for the start).

        Args:
            denoiser: ``(noisy, gamma, condition) -> eps_hat``.
            schedule: the noise schedule the denoiser was trained with.
            condition: passed to the denoiser unchanged (per group), or None.
            start: the states :math:`y_{k_0}` (pure noise when ``start_step = K``); not noised here.
            start_step: :math:`k_0`, an int in ``[0, K]`` or a ``(B,)`` integer tensor of per-sample steps
                (``0``: ``start`` is returned unchanged).
            generator: the only source of randomness (the stochastic steps).

        Returns:
            The samples :math:`y_0`, in the dtype and on the device of ``start``.

        Shape:
            condition: ``(B, Cc, *S)`` or None; start: ``(B, C, *S)``; start_step: an int, ``()`` or
            ``(B,)``; out: ``(B, C, *S)``.
        """
        return self._sample(denoiser, schedule, condition, start, start_step, generator, False).image

    def sample_trajectory(
        self,
        denoiser: Denoiser,
        schedule: NoiseSchedule,
        condition: torch.Tensor | None,
        start: torch.Tensor,
        start_step: int | torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> SampleResult:
        """Like :meth:`sample`, also returning every intermediate state.

        Same arguments and the same draws from ``generator`` as :meth:`sample`, so the same seed
        gives the same image.

        Returns:
            A :class:`SampleResult` (image, trajectory, steps).

        Shape:
            As :meth:`sample`; see :class:`SampleResult`.
        """
        return self._sample(denoiser, schedule, condition, start, start_step, generator, True)


class AncestralSampler(PlanSampler):
    r"""Ancestral (DDPM) sampling, the paper's Algorithm 1.

    Each step ``k -> k'`` with :math:`a = \gamma_k / \gamma_{k'}` (:math:`= \alpha_k` for one step):

    .. math::

        y_{k'} = \frac{1}{\sqrt{a}}\Big(y_k - \frac{1 - a}{\sqrt{1 - \gamma_k}}\,
        \epsilon_\theta(y_k, \gamma_k, c)\Big) + \sigma z,\qquad z \sim \mathcal{N}(0, I),

    with :math:`z = 0` on the last step (to ``k' = 0``). ``variance="beta"`` uses
    :math:`\sigma^2 = 1 - a` (:math:`\beta_k`, the paper's eq. 5, exact for :math:`y_0 \sim
    \mathcal{N}(\mu, I)`); ``"posterior"`` uses :math:`\tilde\beta = (1 - a)(1 - \gamma_{k'}) /
    (1 - \gamma_k)` (exact for a single clean image). With ``steps`` the run skips levels
    (respaced DDPM); the default runs every step.

    Args:
        variance: ``"beta"`` (the paper's) or ``"posterior"``.
        steps: the number of steps (None: every step, as in the paper).
        spacing: how skipped levels are spread (see :func:`step_plan`); used when ``steps < k0``.
        prediction, clip, dynamic_threshold: the options shared by every sampler, see :class:`PlanSampler`.

    With a parametrisation other than eps, or clipping, the step uses :math:`\hat\epsilon` recomputed
    from the (conditioned) :math:`\hat x_0` and the last step returns :math:`\hat x_0`.

    Reference:
        Ho, Jain, Abbeel, NeurIPS 2020, Algorithm 2; the Plasticine paper, Algorithm 1 and eq. 5.

    Shape:
        See :meth:`PlanSampler.sample`.
    """

    def __init__(
        self,
        variance: Literal["beta", "posterior"] = "beta",
        steps: int | None = None,
        spacing: Spacing = "trailing",
        *,
        prediction: Prediction = "eps",
        clip: tuple[float, float] | None = None,
        dynamic_threshold: float | None = None,
    ) -> None:
        self.variance = check_option(variance, "variance", ("beta", "posterior"))
        self.steps = None if steps is None else check_int(steps, "steps", minimum=1)
        self.spacing = check_option(spacing, "spacing", _SPACINGS)
        self._set_prediction(prediction, clip, dynamic_threshold)

    def _run(self, denoiser: Denoiser, gammas: list[float], x: torch.Tensor, condition: torch.Tensor | None, plan: Plan, generator: torch.Generator | None, record: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        states: list[torch.Tensor] = []
        for k, kp in plan:
            g, gp = gammas[k], gammas[kp]
            a = g / gp
            eps, x0 = self._predict(denoiser, x, g, condition)
            if kp == 0 and x0 is not None:
                x = x0
            else:
                x = (1 / math.sqrt(a)) * x - ((1 - a) / (math.sqrt(a) * math.sqrt(1 - g))) * eps
            if kp > 0:
                var = (1 - a) if self.variance == "beta" else (1 - a) * (1 - gp) / (1 - g)
                x = x + math.sqrt(var) * noise_like(x, generator)
            if record:
                states.append(x)
        return x, states

    def __repr__(self) -> str:
        return f"AncestralSampler(variance={self.variance!r}, steps={self.steps!r}, spacing={self.spacing!r}{self._options_repr()})"


class DDIMSampler(PlanSampler):
    r"""DDIM sampling, and its deterministic encode/decode pair.

    Each step ``k -> k'``:

    .. math::

        y_{k'} = \sqrt{\gamma'}\,\hat y_0 + \sqrt{1 - \gamma' - \sigma^2}\,\hat\epsilon + \sigma z,
        \qquad \sigma = \eta \sqrt{\frac{1 - \gamma'}{1 - \gamma}}\sqrt{1 - \frac{\gamma}{\gamma'}},

    so ``eta=0`` is deterministic (the probability-flow ODE, first order) and ``eta=1`` is
    ancestral sampling with the posterior variance. The last step (:math:`\gamma' = 1`) returns
    :math:`\hat y_0`.

    Args:
        steps: the number of steps ``n`` (fewer when the start step is smaller).
        eta: stochasticity in ``[0, 1]``.
        spacing: how the levels are spread (see :func:`step_plan`); ``"trailing"`` by default
            since it starts at the requested level and spaces every level evenly.
        prediction, clip, dynamic_threshold: the options shared by every sampler, see :class:`PlanSampler`.

    With clipping the step is built from the conditioned :math:`\hat x_0` and the :math:`\hat\epsilon`
    recomputed from it, and the last step returns :math:`\hat x_0` itself.

    Reference:
        Song, Meng, Ermon, "Denoising Diffusion Implicit Models", ICLR 2021, eq. 12 and 16.

    Shape:
        See :meth:`PlanSampler.sample`, :meth:`encode`, :meth:`decode`.
    """

    def __init__(
        self,
        steps: int = 50,
        eta: float = 0.0,
        spacing: Spacing = "trailing",
        *,
        prediction: Prediction = "eps",
        clip: tuple[float, float] | None = None,
        dynamic_threshold: float | None = None,
    ) -> None:
        self.steps = check_int(steps, "steps", minimum=1)
        self.eta = check_number(eta, "eta", 0, 1)
        self.spacing = check_option(spacing, "spacing", _SPACINGS)
        self._set_prediction(prediction, clip, dynamic_threshold)

    def _step(self, x: torch.Tensor, eps: torch.Tensor, g: float, gp: float, generator: torch.Generator | None) -> torch.Tensor:
        s2 = self.eta**2 * (1 - gp) / (1 - g) * (1 - g / gp)
        r = math.sqrt(gp / g)
        # sqrt(g') y0_hat + sqrt(1 - g' - s2) eps, with y0_hat = (x - sqrt(1 - g) eps) / sqrt(g)
        x_new = r * x + (math.sqrt(max(1 - gp - s2, 0.0)) - r * math.sqrt(1 - g)) * eps
        if s2 > 0:
            x_new = x_new + math.sqrt(s2) * noise_like(x, generator)
        return x_new

    def _run(self, denoiser: Denoiser, gammas: list[float], x: torch.Tensor, condition: torch.Tensor | None, plan: Plan, generator: torch.Generator | None, record: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        states: list[torch.Tensor] = []
        for k, kp in plan:
            g, gp = gammas[k], gammas[kp]
            eps, x0 = self._predict(denoiser, x, g, condition)
            x = x0 if kp == 0 and x0 is not None else self._step(x, eps, g, gp, generator)
            if record:
                states.append(x)
        return x, states

    def _require_deterministic(self, what: str) -> None:
        if self.eta != 0.0:
            raise ValueError(f"DDIMSampler.{what}: the deterministic pair needs eta = 0, this sampler has eta = {self.eta}")

    def encode(
        self,
        denoiser: Denoiser,
        schedule: NoiseSchedule,
        condition: torch.Tensor | None,
        x0: torch.Tensor,
        end_step: int | torch.Tensor,
        iterations: int = 0,
    ) -> torch.Tensor:
        r"""Deterministic DDIM inversion: a clean image to its latent at ``end_step``.

        Runs the reversed :meth:`plan` of ``end_step`` upwards. Each step ``k' -> k`` solves the
        DDIM step backwards,

        .. math::

            y_k = \sqrt{\gamma/\gamma'}\,y_{k'} + \big(\sqrt{1-\gamma} - \sqrt{\gamma/\gamma'}\sqrt{1-\gamma'}\big)\,e,

        with :math:`e = \epsilon_\theta(y_{k'}, \gamma', c)` (the usual explicit inversion; from the
        clean image, ``k' = 0``, :math:`e = 0`: a clean image carries no noise, the limit of an exact
        denoiser at :math:`\gamma \to 1`), then ``iterations`` fixed-point refinements
        :math:`e \leftarrow \epsilon_\theta(y_k, \gamma, c)`. A refined step is the exact inverse of
        the :meth:`decode` step when the iteration converges.

        Args:
            denoiser: ``(noisy, gamma, condition) -> eps_hat``.
            schedule: the noise schedule.
            condition: passed to the denoiser, or None.
            x0: clean images.
            end_step: the latent's step (``K``: the full inversion), an int or a ``(B,)`` integer tensor.
            iterations: fixed-point refinements per step (``>= 0``; each costs one denoiser call).

        Returns:
            The latents :math:`y_{end}`.

        Raises:
            ValueError: if this sampler's ``eta`` is not 0.

        Shape:
            condition: ``(B, Cc, *S)`` or None; x0: ``(B, C, *S)``; out: ``(B, C, *S)``.
        """
        self._require_deterministic("encode")
        check_int(iterations, "iterations", 0)
        gammas = _gammas_of(schedule)
        K = len(gammas) - 1
        dims = _check_inputs(x0, condition, "x0")
        kend = _check_steps(end_step, "end_step", 0, K, dims["B"]).cpu()

        def run(x: torch.Tensor, cond: torch.Tensor | None, plan: Plan, record: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
            for k, kp in reversed(plan):
                g, gp = gammas[k], gammas[kp]
                r = math.sqrt(g / gp)
                c = math.sqrt(1 - g) - r * math.sqrt(1 - gp)
                e = self._predict(denoiser, x, gp, cond)[0] if kp > 0 else torch.zeros_like(x)
                for _ in range(iterations):
                    e = self._predict(denoiser, r * x + c * e, g, cond)[0]
                x = r * x + c * e
            return x, []

        return _run_groups(x0, condition, kend, lambda k: step_plan(k, self.steps, self.spacing, gammas), run, False).image

    def decode(
        self,
        denoiser: Denoiser,
        schedule: NoiseSchedule,
        condition: torch.Tensor | None,
        latent: torch.Tensor,
        start_step: int | torch.Tensor,
    ) -> torch.Tensor:
        r"""Deterministic DDIM decoding (``eta = 0``) of a latent at ``start_step``: the inverse of :meth:`encode`.

        The same run as :meth:`sample` (the latent is the start :math:`y_{k_0}`), only refused for a
        stochastic sampler. ``decode(encode(x0, k0), k0)`` returns ``x0`` up to the inversion error.

        Args:
            denoiser: ``(noisy, gamma, condition) -> eps_hat``.
            schedule: the noise schedule.
            condition: passed to the denoiser, or None.
            latent: the states at ``start_step``.
            start_step: an int in ``[0, K]``, or a ``(B,)`` integer tensor.

        Returns:
            The decoded images.

        Raises:
            ValueError: if this sampler's ``eta`` is not 0.

        Shape:
            condition: ``(B, Cc, *S)`` or None; latent: ``(B, C, *S)``; out: ``(B, C, *S)``.
        """
        self._require_deterministic("decode")
        return self._sample(denoiser, schedule, condition, latent, start_step, None, False, "latent").image

    def __repr__(self) -> str:
        return f"DDIMSampler(steps={self.steps}, eta={self.eta!r}, spacing={self.spacing!r}{self._options_repr()})"


def ddim_encode(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    condition: torch.Tensor | None = None,
    *,
    steps: int,
    end_step: int | torch.Tensor | None = None,
    prediction: Prediction = "eps",
    spacing: Spacing = "trailing",
    clip: tuple[float, float] | None = None,
    iterations: int = 0,
) -> torch.Tensor:
    r"""Run the deterministic DDIM ODE forwards: clean images :math:`x_0` to their latents at ``end_step``.

    The reverse of ``DDIMSampler(steps, eta=0, spacing)``: the same plan
    :math:`[(k_0, k_1), \dots, (k_{n-1}, 0)]` of :func:`step_plan` (``k0 = end_step``), run from
    the last pair to the first. The decoding step ``k -> k'`` (``k' < k``) of :class:`DDIMSampler`
    with ``eta = 0`` is

    .. math::

        y_{k'} = \sqrt{\gamma'}\,\hat y_0 + \sqrt{1-\gamma'}\,\hat\epsilon
        = \sqrt{\gamma'/\gamma}\,y_k + \big(\sqrt{1-\gamma'} - \sqrt{\gamma'/\gamma}\sqrt{1-\gamma}\big)
        \,\hat\epsilon(y_k, \gamma),

    a first-order step of the probability-flow ODE :math:`d\bar y / d\sigma = \hat\epsilon` in
    :math:`\bar y = y/\sqrt\gamma`, :math:`\sigma = \sqrt{(1-\gamma)/\gamma}`. Solving it for
    :math:`y_k` with the noise prediction taken at the known end, :math:`\hat\epsilon \approx
    \hat\epsilon(y_{k'}, \gamma')`, gives the encoding step

    .. math::

        y_k = \sqrt{\gamma/\gamma'}\,y_{k'} + \big(\sqrt{1-\gamma} - \sqrt{\gamma/\gamma'}\sqrt{1-\gamma'}\big)
        \,\hat\epsilon(y_{k'}, \gamma'),

    the same ODE run the other way (:math:`\hat\epsilon = 0` from the clean image, :math:`\gamma' = 1`).
    The two differ only in where :math:`\hat\epsilon` is read, so ``decode(encode(x))`` returns
    ``x`` up to an error that is first order in the step size; ``iterations`` fixed-point
    refinements (:math:`\hat\epsilon \leftarrow \hat\epsilon(y_k, \gamma)`) make each step the
    exact inverse of the decoding step when they converge. The prediction conversion and ``clip``
    are those of the samplers (``PlanSampler._predict``); this is :meth:`DDIMSampler.encode` of
    ``DDIMSampler(steps, 0.0, spacing, prediction=prediction, clip=clip)``.

    Args:
        denoiser: ``(noisy, gamma, condition) -> output`` read as ``prediction``.
        schedule: the noise schedule the denoiser was trained with.
        x0: clean images.
        condition: passed to the denoiser unchanged, or None (an unconditional model).
        steps: the number of steps ``n`` (at least 1; fewer when ``end_step`` is smaller).
        end_step: the latent's step, an int in ``[0, K]`` or a ``(B,)`` integer tensor; None
            (the default) is ``K``, the full inversion to the noise end.
        prediction: what the denoiser returns, ``"eps"``, ``"x0"`` or ``"v"``.
        spacing: how the levels are spread (see :func:`step_plan`).
        clip: ``(low, high)`` for the data prediction before every step, or None.
        iterations: fixed-point refinements per step (``>= 0``; each costs one denoiser call).

    Returns:
        The latents :math:`y_{k_0}`, in the dtype and on the device of ``x0``.

    Example:
        >>> import torch
        >>> from plasticine.diffusion import LinearSchedule
        >>> s = LinearSchedule(1e-4, 2e-2, 100)
        >>> y = torch.ones(1, 1, 2, 2, dtype=torch.float64)
        >>> point = lambda x, g, c: (x - g.view(-1, 1, 1, 1).sqrt() * y) / (1 - g.view(-1, 1, 1, 1)).sqrt()
        >>> z = ddim_encode(point, s, y, steps=10)
        >>> torch.allclose(DDIMSampler(10).decode(point, s, None, z, 100), y)
        True

    Shape:
        x0: ``(B, C, *S)``; condition: ``(B, Cc, *S)`` or None; end_step: an int or ``(B,)``;
        out: ``(B, C, *S)``.
    """
    sampler = DDIMSampler(steps, 0.0, spacing, prediction=prediction, clip=clip)
    if end_step is None:
        end_step = len(_gammas_of(schedule)) - 1
    return sampler.encode(denoiser, schedule, condition, x0, end_step, iterations)


class DPMSolverPP(PlanSampler):
    r"""DPM-Solver++ (multistep, data prediction), order 1 or 2 ("2M").

    With :math:`\alpha = \sqrt{\gamma}`, :math:`\sigma = \sqrt{1-\gamma}`,
    :math:`\lambda = \log(\alpha/\sigma)` and :math:`h = \lambda' - \lambda` for a step ``k -> k'``:

    .. math::

        y_{k'} = \frac{\sigma'}{\sigma}\,y_k - \alpha'\,(e^{-h} - 1)\,D,\qquad
        D = \Big(1 + \frac{1}{2r}\Big)\hat y_0^{(k)} - \frac{1}{2r}\,\hat y_0^{(k_{prev})},\quad
        r = \frac{h_{prev}}{h},

    where the second-order correction is used from the second step on (``order=2``); the first
    step, ``order=1`` (identical to DDIM with ``eta=0``) and the last step use :math:`D = \hat y_0`.
    The last step goes to :math:`\gamma' = 1` (:math:`\lambda' = \infty`) and returns
    :math:`\hat y_0` (first order, as DPM-Solver++ does at the final step).

    Args:
        steps: the number of steps (denoiser calls), fewer when the start step is smaller.
        order: 1 or 2.
        spacing: how the levels are spread (see :func:`step_plan`).
        prediction, clip, dynamic_threshold: the options shared by every sampler, see :class:`PlanSampler`.

    Clipping conditions the data prediction :math:`\hat y_0` that every step is built from.

    Reference:
        Lu, Zhou, Bao, Chen, Li, Zhu, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
        Probabilistic Models", arXiv:2211.01095, Algorithm 2.

    Shape:
        See :meth:`PlanSampler.sample`.
    """

    def __init__(
        self,
        steps: int = 20,
        order: Literal[1, 2] = 2,
        spacing: Spacing = "trailing",
        *,
        prediction: Prediction = "eps",
        clip: tuple[float, float] | None = None,
        dynamic_threshold: float | None = None,
    ) -> None:
        self.steps = check_int(steps, "steps", minimum=1)
        self.order = int(check_option(order, "order", (1, 2)))
        self.spacing = check_option(spacing, "spacing", _SPACINGS)
        self._set_prediction(prediction, clip, dynamic_threshold)

    def _run(self, denoiser: Denoiser, gammas: list[float], x: torch.Tensor, condition: torch.Tensor | None, plan: Plan, generator: torch.Generator | None, record: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        states: list[torch.Tensor] = []
        prev_x0: torch.Tensor | None = None
        prev_h = 0.0
        for k, kp in plan:
            g, gp = gammas[k], gammas[kp]
            eps, x0 = self._predict(denoiser, x, g, condition)
            if x0 is None:
                x0 = (1 / math.sqrt(g)) * x - math.sqrt((1 - g) / g) * eps
            if kp == 0:
                x = x0
            else:
                lam = 0.5 * (math.log(g) - math.log1p(-g))
                lam_p = 0.5 * (math.log(gp) - math.log1p(-gp))
                h = lam_p - lam
                if self.order == 2 and prev_x0 is not None:
                    c = 1 / (2 * (prev_h / h))
                    d = (1 + c) * x0 - c * prev_x0
                else:
                    d = x0
                x = math.sqrt((1 - gp) / (1 - g)) * x - (math.sqrt(gp) * math.expm1(-h)) * d
                prev_x0, prev_h = x0, h
            if record:
                states.append(x)
        return x, states

    def __repr__(self) -> str:
        return f"DPMSolverPP(steps={self.steps}, order={self.order}, spacing={self.spacing!r}{self._options_repr()})"
