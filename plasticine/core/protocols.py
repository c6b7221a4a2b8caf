"""The plug-in points of plasticine as :class:`typing.Protocol` classes.

Every component is an object that satisfies one of these structurally; nothing needs to inherit
from them. ``isinstance(obj, Protocol)`` checks that the methods exist (``runtime_checkable``),
and each protocol has a contract test suite in ``tests/`` that every implementation runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .deformation import Deformation

__all__ = [
    "NoiseSchedule",
    "Sampler",
    "Denoiser",
    "ConditionEncoder",
    "StructureExtractor",
    "Integrator",
    "Warper",
    "SimilarityLoss",
    "RegistrationBackend",
]


@runtime_checkable
class NoiseSchedule(Protocol):
    r"""Discrete diffusion noise schedule of ``K`` steps: every operation the diffusion model needs.

    ``gammas[k]`` is :math:`\gamma_k = \prod_{i \le k} \alpha_i` (float64, ``gammas[0] = 1``).
    A step argument ``k`` is a Python int (the same step for every sample) or an integer tensor
    (``()`` or ``(B,)``, per sample).

    * ``q_sample(y0, k, noise)``: :math:`y_k = \sqrt{\gamma_k} y_0 + \sqrt{1 - \gamma_k} \epsilon`;
    * ``diffuse(y0, gamma, noise)``: the same at continuous levels :math:`\gamma` (training);
    * ``sample_gamma(batch, generator, device)``: the training draw ``(k, gamma)`` of a level per sample;
    * ``posterior_coefficients(k, k_prev)`` and ``posterior(y0, yk, k, k_prev)``: the Gaussian
      :math:`q(y_{k'} \mid y_0, y_k)` of any pair ``k_prev < k``.

    Shape:
        gammas: ``(K + 1,)``; y0, yk, noise: ``(B, C, *S)``; k, k_prev: an int, ``()`` or ``(B,)``;
        gamma: ``(B,)``; images out: ``(B, C, *S)``.
    """

    @property
    def num_steps(self) -> int: ...

    @property
    def gammas(self) -> torch.Tensor: ...

    def q_sample(self, y0: torch.Tensor, k: int | torch.Tensor, noise: torch.Tensor) -> torch.Tensor: ...

    def diffuse(self, y0: torch.Tensor, gamma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor: ...

    def sample_gamma(
        self, batch: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def posterior_coefficients(
        self, k: int | torch.Tensor, k_prev: int | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...

    def posterior(
        self, y0: torch.Tensor, yk: torch.Tensor, k: int | torch.Tensor, k_prev: int | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


@runtime_checkable
class Denoiser(Protocol):
    """Noise estimator :math:`\\epsilon_\\theta(y_k, \\gamma_k, c)`.

    Shape:
        noisy: ``(B, C, *S)``; gamma: ``(B,)``; condition: ``(B, Cc, *S)`` or None; out: ``(B, C, *S)``.
    """

    def __call__(self, noisy: torch.Tensor, gamma: torch.Tensor, condition: torch.Tensor | None) -> torch.Tensor: ...


@runtime_checkable
class Sampler(Protocol):
    r"""Reverse-diffusion sampler that runs an explicit plan of ``(k, k_prev)`` steps from ``(start, start_step)``.

    ``start`` *is* the state :math:`y_{k_0}` at ``start_step`` :math:`= k_0`, and the sampler
    denoises it to step 0; it is never noised by the sampler. The caller makes the start: pure noise
    for ``start_step = K``, or ``schedule.q_sample(x, k0, noise)`` for a mid-schedule start (the
    paper's inference, SDEdit). ``start_step`` is an int, or a ``(B,)`` integer tensor of per-sample
    steps; ``generator`` is the only source of randomness of stochastic steps.

    Shape:
        condition: ``(B, Cc, *S)`` or None; start: ``(B, C, *S)``; start_step: an int or ``(B,)``;
        out: ``(B, C, *S)``.
    """

    def sample(
        self,
        denoiser: Denoiser,
        schedule: NoiseSchedule,
        condition: torch.Tensor | None,
        start: torch.Tensor,
        start_step: int | torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor: ...


@runtime_checkable
class ConditionEncoder(Protocol):
    """Turns a structure map into what the denoiser receives as condition.

    Shape:
        structure: ``(B, L, *S)``; out: ``(B, Cc, *S)`` (or what the paired denoiser reads).
    """

    def __call__(self, structure: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class StructureExtractor(Protocol):
    """Structure map of an image (deterministic): a coarse partition, or a descriptor with values in [0, 1].

    Shape:
        image: ``(B, C, *S)``; out: ``(B, L, *S)``: one-hot or soft classes, or descriptor channels.
    """

    def __call__(self, image: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class Integrator(Protocol):
    """Integrates a stationary velocity field: returns the displacement of :math:`\\exp(v)`.

    Shape:
        velocity: ``(B, N, *S)``; out: ``(B, N, *S)``.
    """

    def __call__(self, velocity: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class Warper(Protocol):
    """Pull-back resampling ``image o (Id + u)``.

    Shape:
        image: ``(B, C, *S)``; displacement: ``(B, N, *S)``; out: ``(B, C, *S)``.
    """

    def __call__(self, image: torch.Tensor, displacement: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class SimilarityLoss(Protocol):
    """Image dissimilarity, lower is better.

    Shape:
        moving, fixed: ``(B, C, *S)``; mask: ``(B, 1, *S)`` or None; out: scalar.
    """

    def __call__(self, moving: torch.Tensor, fixed: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor: ...


@runtime_checkable
class RegistrationBackend(Protocol):
    """Finds the deformation of a source image (towards a target, when the backend needs one).

    Shape:
        source: ``(B, C, *S)``; target: ``(B, C, *S)`` or None; cue: ``(B, Ce, *S)`` or None.
    """

    def register(
        self, source: torch.Tensor, target: torch.Tensor | None = None, *, cue: torch.Tensor | None = None
    ) -> "Deformation": ...
