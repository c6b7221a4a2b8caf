r"""Discrete noise schedules of the diffusion model, computed in float64.

A schedule of ``K`` steps is given by its variances :math:`\beta_1, \dots, \beta_K \in (0, 1)`;
:math:`\alpha_k = 1 - \beta_k` and the cumulative signal level
:math:`\gamma_k = \prod_{i \le k} \alpha_i` (Palette's and the paper's :math:`\gamma`, DDPM's
:math:`\bar\alpha`). Every array is indexed by the step itself, ``k = 0 .. K``: index ``0`` is the
clean image with :math:`\beta_0 = 0`, :math:`\alpha_0 = \gamma_0 = 1`, so ``gammas[k]`` is
:math:`\gamma_k` with no shift by one. The forward process is

.. math::

    q(y_k \mid y_0) = \mathcal{N}\big(\sqrt{\gamma_k}\, y_0,\ (1 - \gamma_k) I\big),

and the posterior of one step back (Ho et al. 2020, eq. 6-7) is
:math:`q(y_{k'} \mid y_0, y_k) = \mathcal{N}(c_0 y_0 + c_k y_k, \tilde\beta I)` with, for any
``k' < k`` and :math:`a = \gamma_k / \gamma_{k'}`,

.. math::

    c_0 = \frac{\sqrt{\gamma_{k'}}\,(1 - a)}{1 - \gamma_k}, \quad
    c_k = \frac{\sqrt{a}\,(1 - \gamma_{k'})}{1 - \gamma_k}, \quad
    \tilde\beta = \frac{(1 - a)(1 - \gamma_{k'})}{1 - \gamma_k}.

Three schedules share the :class:`~plasticine.core.NoiseSchedule` protocol through the base class
:class:`DiscreteSchedule`: :class:`LinearSchedule` (the paper's, :math:`10^{-6} .. 10^{-2}` over
2000 steps), :class:`CosineSchedule` (Nichol & Dhariwal 2021) and :class:`ScheduleFromBetas`.
Every operation is a method of the protocol, with one signature: the forward process by step
(:meth:`~DiscreteSchedule.q_sample`) and by continuous level (:meth:`~DiscreteSchedule.diffuse`),
the training draw of a level (:meth:`~DiscreteSchedule.sample_gamma`) and the posterior of any pair
of steps (:meth:`~DiscreteSchedule.posterior_coefficients`, :meth:`~DiscreteSchedule.posterior`).
A step is a Python int (the same for every sample) or an integer tensor of per-sample steps.

References:
    Ho, Jain, Abbeel, "Denoising Diffusion Probabilistic Models", NeurIPS 2020.
    Nichol, Dhariwal, "Improved Denoising Diffusion Probabilistic Models", ICML 2021.
    Saharia et al., "Palette: Image-to-Image Diffusion Models", SIGGRAPH 2022.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..core.config import Configurable
from ..core.shapes import check_shape
from ..core.validate import check_int, check_number, check_values

__all__ = [
    "DiscreteSchedule",
    "LinearSchedule",
    "CosineSchedule",
    "ScheduleFromBetas",
    "noise_like",
]

def _broadcast(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample values ``(B,)`` as ``(B, 1, ..., 1)`` in the dtype and device of ``like``."""
    return values.to(device=like.device, dtype=like.dtype).reshape((-1,) + (1,) * (like.dim() - 1))


def noise_like(like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    r"""Standard normal noise :math:`\epsilon \sim \mathcal{N}(0, I)` of the shape and dtype of ``like``.

    Drawn on the generator's device (so a CPU generator gives the same draws for CUDA images) and
    moved to the device of ``like``; ``None`` uses torch's default generator on that device. Every
    noise of the diffusion model (the training draw, the translator's start, the samplers' steps)
    comes from here, so the same seed gives the same draws everywhere.

    Args:
        like: the tensor whose shape, dtype and device the noise takes.
        generator: source of randomness.

    Returns:
        The noise.

    Shape:
        like, out: any shape, the same.
    """
    if generator is None:
        return torch.randn(like.shape, dtype=like.dtype, device=like.device)
    return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=generator.device).to(like.device)


def _check_steps(k: object, name: str, low: int, high: int, batch: int | None = None) -> torch.Tensor:
    """Steps given as an int or an integer tensor, as an int64 tensor in ``[low, high]`` (on the tensor's device, CPU for an int).

    With ``batch`` the result is ``(batch,)`` (an int or a 0-d tensor is repeated, a 1-D tensor must
    have ``batch`` entries); without, it keeps the shape ``()`` or ``(n,)``.
    """
    if isinstance(k, (int, np.integer)) and not isinstance(k, bool):
        t = torch.tensor(int(k), dtype=torch.int64)
    elif isinstance(k, torch.Tensor):
        if k.is_floating_point() or k.is_complex() or k.dtype == torch.bool:
            raise ValueError(f"{name}: expected an integer tensor of steps, got dtype {k.dtype}")
        if k.dim() > 1:
            raise ValueError(f"{name}: expected an int or a () or (B,) integer tensor of steps, got shape {tuple(k.shape)}")
        if batch is not None and k.dim() == 1:
            check_shape(k, "B", name, bindings={"B": batch})
        t = k.detach().to(torch.int64)
    else:
        raise ValueError(f"{name}: expected an int or a (B,) integer tensor of steps, got {type(k).__name__}")
    if t.numel() and bool(((t < low) | (t > high)).any()):
        raise ValueError(f"{name}: expected steps in [{low}, {high}], got min {int(t.min())}, max {int(t.max())}")
    return t.expand(batch) if batch is not None and t.dim() == 0 else t


class DiscreteSchedule(Configurable):
    r"""A noise schedule given by its ``K`` variances :math:`\beta_1 .. \beta_K`, held in float64.

    The base class of every schedule here; it satisfies :class:`~plasticine.core.NoiseSchedule`.
    ``schedule.config`` holds its constructor arguments (:class:`~plasticine.core.Configurable`).
    Arrays are indexed by the step ``k = 0 .. K`` (see the module docstring): ``betas[0] = 0``,
    ``alphas[0] = gammas[0] = 1``.

    Args:
        betas: :math:`\beta_1 .. \beta_K`, each in ``(0, 1)``; must keep :math:`\gamma` strictly
            decreasing and positive in float64.

    Raises:
        ValueError: on a non-1-D, non-finite or out-of-range ``betas``, or if a :math:`\gamma_k`
            underflows or fails to decrease in float64.

    Shape:
        betas: ``(K,)``; ``betas``, ``alphas``, ``gammas`` properties: ``(K + 1,)``.
    """

    def __init__(self, betas: torch.Tensor) -> None:
        if not isinstance(betas, torch.Tensor):
            betas = torch.as_tensor(betas, dtype=torch.float64)
        check_shape(betas, "K", "betas")
        b = betas.detach().to(device="cpu", dtype=torch.float64)
        if b.numel() < 1:
            raise ValueError("betas: expected at least one step, got an empty tensor")
        if not bool(torch.isfinite(b).all()):
            raise ValueError("betas: expected finite values, found NaN or inf")
        if bool(((b <= 0) | (b >= 1)).any()):
            raise ValueError(f"betas: expected values in the open interval (0, 1), got min {float(b.min())}, max {float(b.max())}")
        one = torch.ones(1, dtype=torch.float64)
        alphas = torch.cat([one, 1 - b])
        gammas = torch.cumprod(alphas, 0)
        if not bool((gammas[-1] > 0).item()):
            raise ValueError("betas: gamma_K underflows to 0 in float64; use fewer or smaller betas")
        if not bool((gammas[1:] < gammas[:-1]).all()):
            first = int(torch.nonzero(gammas[1:] >= gammas[:-1])[0]) + 1
            raise ValueError(f"betas: gamma must decrease strictly in float64, but gamma_{first} == gamma_{first - 1} (beta_{first} = {float(b[first - 1])!r} too small)")
        self._betas = torch.cat([torch.zeros(1, dtype=torch.float64), b])
        self._alphas = alphas
        self._gammas = gammas
        self._gammas_on: dict[torch.device, torch.Tensor] = {torch.device("cpu"): gammas}

    # -- the arrays -------------------------------------------------------------------------------

    @property
    def num_steps(self) -> int:
        """Number of diffusion steps ``K``."""
        return self._betas.shape[0] - 1

    @property
    def betas(self) -> torch.Tensor:
        r""":math:`\beta_0 = 0, \beta_1 .. \beta_K` (float64, CPU, shape ``(K + 1,)``)."""
        return self._betas.clone()

    @property
    def alphas(self) -> torch.Tensor:
        r""":math:`\alpha_k = 1 - \beta_k`, :math:`\alpha_0 = 1` (float64, CPU, shape ``(K + 1,)``)."""
        return self._alphas.clone()

    @property
    def gammas(self) -> torch.Tensor:
        r""":math:`\gamma_k = \prod_{i \le k} \alpha_i`, :math:`\gamma_0 = 1` (float64, CPU, shape ``(K + 1,)``)."""
        return self._gammas.clone()

    def _gammas_device(self, device: torch.device) -> torch.Tensor:
        if device not in self._gammas_on:
            self._gammas_on[device] = self._gammas.to(device)
        return self._gammas_on[device]

    # -- the forward process ------------------------------------------------------------------------

    def q_sample(self, y0: torch.Tensor, k: int | torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        r"""Draw :math:`y_k \sim q(y_k \mid y_0)`: :math:`\sqrt{\gamma_k} y_0 + \sqrt{1 - \gamma_k}\,\epsilon`.

        Args:
            y0: clean images.
            k: the step, integers in ``[0, K]`` (``0`` returns ``y0``): an int for every sample, or
                a ``(B,)`` (or 0-d) integer tensor.
            noise: standard normal noise :math:`\epsilon` (e.g. :func:`noise_like`).

        Returns:
            The noisy images, in the dtype of ``y0``.

        Example:
            >>> s = ScheduleFromBetas([0.75])  # gamma_1 = 0.25
            >>> s.q_sample(torch.full((1, 1, 1, 1), 2.0), 1, torch.zeros(1, 1, 1, 1)).item()
            1.0

        Shape:
            y0, noise: ``(B, C, *S)``; k: an int, ``()`` or ``(B,)``; out: ``(B, C, *S)``.
        """
        dims = check_shape(y0, "B C *S", "y0")
        steps = _check_steps(k, "k", 0, self.num_steps, dims["B"])
        return self.diffuse(y0, self._gammas_device(steps.device)[steps], noise)

    def diffuse(self, y0: torch.Tensor, gamma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        r"""Noise clean images to the signal levels ``gamma``: :math:`\sqrt{\gamma} y_0 + \sqrt{1-\gamma}\,\epsilon`.

        The continuous form of :meth:`q_sample` (``q_sample(y0, k, noise)`` is
        ``diffuse(y0, gammas[k], noise)``), for the levels :meth:`sample_gamma` draws in training.
        The square roots are taken in the precision of ``gamma`` (float64 from :meth:`sample_gamma`)
        and cast to the image dtype.

        Args:
            y0: clean images.
            gamma: signal level of every sample, floating, in ``[0, 1]``.
            noise: standard normal noise, same shape as ``y0``.

        Returns:
            The noisy images :math:`y_\gamma`, in the dtype of ``y0``.

        Shape:
            y0, noise: ``(B, C, *S)``; gamma: ``(B,)``; out: ``(B, C, *S)``.
        """
        dims = check_shape(y0, "B C *S", "y0")
        check_shape(noise, "B C *S", "noise", bindings=dict(dims))
        check_shape(gamma, "B", "gamma", bindings={"B": dims["B"]})
        if not gamma.is_floating_point():
            raise ValueError(f"gamma: expected a floating tensor of signal levels, got dtype {gamma.dtype}")
        gamma = check_values(
            gamma, (gamma < 0) | (gamma > 1), lambda: f"gamma: expected values in [0, 1], got min {float(gamma.min())}, max {float(gamma.max())}"
        )
        return _broadcast(gamma.sqrt(), y0) * y0 + _broadcast((1 - gamma).sqrt(), y0) * noise

    def sample_gamma(
        self, batch: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r"""Palette's continuous noise-level draw for training.

        :math:`k \sim \mathcal{U}\{1, \dots, K\}`, then :math:`\gamma = \gamma_k + u(\gamma_{k-1} - \gamma_k)`
        with :math:`u \sim \mathcal{U}[0, 1)`, so :math:`\gamma \in [\gamma_k, \gamma_{k-1})` is
        uniform between the two levels around step ``k`` and never exactly 1. ``k`` is drawn first,
        then ``u``, both from ``generator`` (on its device).

        Args:
            batch: number of samples ``B``.
            generator: source of randomness (``None``: torch's default generator).
            device: where the results go (default: the generator's device, or CPU).

        Returns:
            ``(k, gamma)``: int64 steps in ``[1, K]`` and float64 levels in
            :math:`[\gamma_k, \gamma_{k-1})`.

        Shape:
            k, gamma: ``(B,)``.
        """
        check_int(batch, "batch", 1)
        draw_device = generator.device if generator is not None else torch.device("cpu")
        k = torch.randint(1, self.num_steps + 1, (batch,), generator=generator, device=draw_device)
        u = torch.rand(batch, generator=generator, device=draw_device, dtype=torch.float64)
        g = self._gammas_device(draw_device)
        gamma = g[k] + u * (g[k - 1] - g[k])
        out = torch.device(device) if device is not None else draw_device
        return k.to(out), gamma.to(out)

    # -- the posterior --------------------------------------------------------------------------------

    def posterior_coefficients(
        self, k: int | torch.Tensor, k_prev: int | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        r"""Coefficients of the posterior :math:`q(y_{k'} \mid y_0, y_k)` for steps ``k' < k`` (float64, CPU).

        With :math:`a = \gamma_k / \gamma_{k'}` (the :math:`\alpha_k` of one step when ``k' = k - 1``):
        mean :math:`c_0 y_0 + c_k y_k` with :math:`c_0 = \sqrt{\gamma_{k'}}(1-a)/(1-\gamma_k)`,
        :math:`c_k = \sqrt{a}(1-\gamma_{k'})/(1-\gamma_k)`, and variance
        :math:`\tilde\beta = (1-a)(1-\gamma_{k'})/(1-\gamma_k)` (Ho et al. 2020, eq. 7, for any pair).

        Args:
            k: current steps in ``[1, K]``, an int or an integer tensor.
            k_prev: earlier steps, ``0 <= k_prev < k`` (``k - 1`` for one step), an int or an integer tensor.

        Returns:
            ``(c0, ck, variance)``, each float64 with the broadcast shape of ``k`` and ``k_prev``.

        Shape:
            k, k_prev: ints, ``()`` or ``(n,)``; outs: their broadcast shape.
        """
        K = self.num_steps
        k_t = _check_steps(k, "k", 1, K).cpu()
        kp_t = _check_steps(k_prev, "k_prev", 0, K - 1).cpu()
        if k_t.dim() and kp_t.dim() and k_t.shape != kp_t.shape:
            raise ValueError(f"k_prev: expected one step or the shape of k, {tuple(k_t.shape)}, got shape {tuple(kp_t.shape)}")
        if bool((kp_t >= k_t).any()):
            raise ValueError(f"k_prev: expected 0 <= k_prev < k, got k={k_t.tolist()}, k_prev={kp_t.tolist()}")
        g_k, g_p = self._gammas[k_t], self._gammas[kp_t]
        a = g_k / g_p
        c0 = g_p.sqrt() * (1 - a) / (1 - g_k)
        ck = a.sqrt() * (1 - g_p) / (1 - g_k)
        var = (1 - a) * (1 - g_p) / (1 - g_k)
        return c0, ck, var

    def posterior(
        self, y0: torch.Tensor, yk: torch.Tensor, k: int | torch.Tensor, k_prev: int | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r"""Mean and variance of :math:`q(y_{k'} \mid y_0, y_k)` (see :meth:`posterior_coefficients`).

        Args:
            y0: clean images.
            yk: the noisy images at step ``k``.
            k: the step of every sample, in ``[1, K]``: an int or a ``(B,)`` integer tensor.
            k_prev: the earlier step, ``0 <= k_prev < k``: an int or a ``(B,)`` integer tensor.

        Returns:
            ``(mean, variance)``: the mean ``(B, C, *S)`` and the variance ``(B, 1, ..., 1)``,
            both in the dtype and on the device of ``y0``.

        Shape:
            y0, yk: ``(B, C, *S)``; k, k_prev: an int, ``()`` or ``(B,)``; mean: ``(B, C, *S)``;
            variance: ``(B, 1, *1)``.
        """
        dims = check_shape(y0, "B C *S", "y0")
        check_shape(yk, "B C *S", "yk", bindings=dict(dims))
        K = self.num_steps
        k_t = _check_steps(k, "k", 1, K, dims["B"])
        kp_t = _check_steps(k_prev, "k_prev", 0, K - 1, dims["B"])
        c0, ck, var = self.posterior_coefficients(k_t, kp_t)
        return _broadcast(c0, y0) * y0 + _broadcast(ck, y0) * yk, _broadcast(var, y0)

    # -- description -------------------------------------------------------------------------------------

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_steps={self.num_steps}, gamma_K={float(self._gammas[-1]):.3g})"


class ScheduleFromBetas(DiscreteSchedule):
    r"""A schedule from explicit variances :math:`\beta_1 .. \beta_K` (see :class:`DiscreteSchedule`).

    Args:
        betas: ``K`` values in ``(0, 1)`` (a tensor or a sequence of floats), held in float64.

    Example:
        >>> s = ScheduleFromBetas([0.1, 0.2])
        >>> [round(g, 6) for g in s.gammas.tolist()]
        [1.0, 0.9, 0.72]

    Shape:
        betas: ``(K,)``.
    """


MAX_STEPS = 1_000_000
"""The most steps a schedule may have (diffusion models use :math:`10^3` to :math:`10^4`); more is
refused rather than allocated."""


class LinearSchedule(DiscreteSchedule):
    r"""Linear variances :math:`\beta_k` from ``beta_start`` to ``beta_end`` (Ho et al. 2020).

    :math:`\beta_k = \beta_{start} + (k - 1)(\beta_{end} - \beta_{start}) / (K - 1)` for
    ``k = 1 .. K`` (``numpy.linspace`` in float64). The defaults are the paper's
    (:math:`10^{-6} .. 10^{-2}`, ``K = 2000``).

    Args:
        beta_start: :math:`\beta_1`, in ``(0, 1)``.
        beta_end: :math:`\beta_K`, in ``[beta_start, 1)``.
        num_steps: ``K >= 1`` (with ``K = 1`` only ``beta_start`` is used and must equal ``beta_end``).

    Shape:
        ``betas``, ``alphas``, ``gammas``: ``(K + 1,)``.
    """

    def __init__(self, beta_start: float = 1e-6, beta_end: float = 1e-2, num_steps: int = 2000) -> None:
        check_int(num_steps, "num_steps", 1, MAX_STEPS)
        for name, v in (("beta_start", beta_start), ("beta_end", beta_end)):
            check_number(v, name, 0, 1, min_open=True, max_open=True)
        if beta_end < beta_start:
            raise ValueError(f"beta_end: expected >= beta_start = {beta_start!r} (a non-decreasing schedule), got {beta_end!r}")
        if num_steps == 1 and beta_end != beta_start:
            raise ValueError(f"num_steps=1 has one beta: expected beta_start == beta_end, got {beta_start!r} and {beta_end!r}")
        self.beta_start, self.beta_end = float(beta_start), float(beta_end)
        super().__init__(torch.from_numpy(np.linspace(self.beta_start, self.beta_end, num_steps, dtype=np.float64)))

    def __repr__(self) -> str:
        return f"LinearSchedule(beta_start={self.beta_start!r}, beta_end={self.beta_end!r}, num_steps={self.num_steps})"


class CosineSchedule(DiscreteSchedule):
    r"""The cosine schedule of Nichol & Dhariwal (2021), with clipped variances.

    :math:`f(t) = \cos^2\!\big(\tfrac{t/K + s}{1 + s}\cdot\tfrac{\pi}{2}\big)`,
    :math:`\beta_k = \min\big(1 - f(k)/f(k-1),\ \beta_{max}\big)`; without clipping
    :math:`\gamma_k = f(k)/f(0)`. The clip matters at the last steps (:math:`f(K) = 0` gives
    :math:`\beta_K = 1` before clipping).

    Args:
        num_steps: ``K >= 1``.
        s: offset that keeps :math:`\beta_1` from being tiny, ``>= 0``.
        max_beta: the clip, in ``(0, 1)``.

    Reference:
        Nichol, Dhariwal, "Improved Denoising Diffusion Probabilistic Models", ICML 2021, eq. 17.

    Shape:
        ``betas``, ``alphas``, ``gammas``: ``(K + 1,)``.
    """

    def __init__(self, num_steps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> None:
        check_int(num_steps, "num_steps", 1, MAX_STEPS)
        self.s = check_number(s, "s", 0)
        self.max_beta = check_number(max_beta, "max_beta", 0, 1, min_open=True, max_open=True)
        t = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
        f = torch.cos((t + self.s) / (1 + self.s) * (math.pi / 2)) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(max=self.max_beta)
        super().__init__(betas)

    def __repr__(self) -> str:
        return f"CosineSchedule(num_steps={self.num_steps}, s={self.s!r}, max_beta={self.max_beta!r})"
