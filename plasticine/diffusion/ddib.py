r"""Dual Diffusion Implicit Bridges (DDIB): translation by two condition-free diffusion models.

A source model :math:`\epsilon_s` is trained on the source domain only and a target model
:math:`\epsilon_t` on the target domain only (unconditional, or with a condition that is not the
other domain). Each defines a deterministic DDIM map between its data and the shared latent
:math:`y_K` (the probability-flow ODE, :func:`~plasticine.diffusion.ddim_encode` one way,
:meth:`DDIMSampler.decode <plasticine.diffusion.DDIMSampler.decode>` with ``eta = 0`` the other):

.. math::

    z = E_s(x) \quad(\text{encode with } \epsilon_s \text{ from } k=0 \text{ to } k_0),\qquad
    \hat y = D_t(z) \quad(\text{decode with } \epsilon_t \text{ from } k_0 \text{ to } 0).

No paired data and no joint training: the two models meet only in the latent. For one-dimensional
Gaussians :math:`x \sim \mathcal N(m_1, s_1^2)`, :math:`y \sim \mathcal N(m_2, s_2^2)` the exact
flows give :math:`y_k = \sqrt{\gamma_k} m + \sqrt{\gamma_k s^2 + 1 - \gamma_k}\, z` with
:math:`z = (x - m)/s`, so the bridge to :math:`k_0 = K` is the affine map

.. math::

    \hat y = m_2 + s_2\,\frac{\sqrt{\gamma_K}(m_1 - m_2) + \sqrt{\gamma_K s_1^2 + 1 - \gamma_K}\,(x - m_1)/s_1}
    {\sqrt{\gamma_K s_2^2 + 1 - \gamma_K}} \;\to\; m_2 + \frac{s_2}{s_1}(x - m_1)
    \quad (\gamma_K \to 0),

the optimal-transport map between the two Gaussians, which the discretised bridge approaches as the
number of steps grows (tested).

Reference:
    Su, Song, Meng, Ermon, "Dual Diffusion Implicit Bridges for Image-to-Image Translation", ICLR 2023.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.config import Configurable
from ..core.protocols import Denoiser, NoiseSchedule
from ..core.validate import check_int
from .prediction import Prediction
from .samplers import DDIMSampler, Spacing, _gammas_of, ddim_encode

__all__ = ["DDIBTranslator"]


class DDIBTranslator(Configurable, nn.Module):
    r"""DDIB image translation: DDIM-encode with the source model, DDIM-decode with the target model.

    :meth:`translate` runs :func:`~plasticine.diffusion.ddim_encode` with ``source_denoiser`` from
    the image to the latent at ``end_step`` (default ``K``), then ``DDIMSampler(steps, eta=0,
    spacing).decode`` with ``target_denoiser`` back to step 0, both on the same plan of
    :func:`~plasticine.diffusion.step_plan`, and the same ``prediction`` and ``clip``. With
    :math:`\gamma = \gamma_k`, :math:`\gamma' = \gamma_{k'}` for a pair ``k' < k`` of the plan:

    .. math::

        \text{encode } (k' \to k):\ y_k = \sqrt{\gamma/\gamma'}\,y_{k'} +
        \big(\sqrt{1-\gamma} - \sqrt{\gamma/\gamma'}\sqrt{1-\gamma'}\big)\,\epsilon_s(y_{k'}, \gamma'),

        \text{decode } (k \to k'):\ y_{k'} = \sqrt{\gamma'/\gamma}\,y_k +
        \big(\sqrt{1-\gamma'} - \sqrt{\gamma'/\gamma}\sqrt{1-\gamma}\big)\,\epsilon_t(y_k, \gamma),

    each an explicit step of the probability-flow ODE, so with ``target = source`` translation is
    reconstruction up to a first-order discretisation error. Everything is deterministic: no
    randomness is drawn. The denoisers are called with ``condition = None`` (condition-free
    models, e.g. a :class:`~plasticine.diffusion.ConditionalUNet` with ``cond_channels = 0``).
    An ``nn.Module`` denoiser is registered as a submodule (``.to()``, ``.eval()``, ``state_dict``
    reach it); a plain callable is kept as it is. Run it under ``torch.no_grad()`` for inference.

    Args:
        source_denoiser: ``(noisy, gamma, None) -> output`` of the source domain.
        target_denoiser: the same for the target domain (trained with the same schedule).
        schedule: the noise schedule of both models.
        steps: DDIM steps each way (at least 1; fewer when ``end_step`` is smaller).
        prediction: what both denoisers return, ``"eps"``, ``"x0"`` or ``"v"``.
        spacing: how the levels are spread (see :func:`~plasticine.diffusion.step_plan`).
        clip: ``(low, high)`` for the data prediction before every step, or None.
        end_step: the latent's step ``k0`` in ``[1, K]``; None (the default) is ``K``, the paper's.
        iterations: fixed-point refinements per encoding step (see :func:`~plasticine.diffusion.ddim_encode`).

    Raises:
        ValueError: for a non-callable denoiser, a schedule without levels, or an option out of range.

    Shape:
        See :meth:`translate`.
    """

    def __init__(
        self,
        source_denoiser: Denoiser,
        target_denoiser: Denoiser,
        schedule: NoiseSchedule,
        steps: int = 50,
        *,
        prediction: Prediction = "eps",
        spacing: Spacing = "trailing",
        clip: tuple[float, float] | None = None,
        end_step: int | None = None,
        iterations: int = 0,
    ) -> None:
        nn.Module.__init__(self)
        for name, d in (("source_denoiser", source_denoiser), ("target_denoiser", target_denoiser)):
            if not callable(d):
                raise ValueError(f"{name}: expected a denoiser (noisy, gamma, condition) -> output, got {type(d).__name__}")
        K = len(_gammas_of(schedule)) - 1
        self.source_denoiser = source_denoiser
        self.target_denoiser = target_denoiser
        self.schedule = schedule
        self.decoder = DDIMSampler(steps, 0.0, spacing, prediction=prediction, clip=clip)
        self.steps, self.prediction, self.spacing, self.clip = self.decoder.steps, self.decoder.prediction, self.decoder.spacing, self.decoder.clip
        self.end_step = K if end_step is None else check_int(end_step, "end_step", 1, K)
        self.iterations = check_int(iterations, "iterations", 0)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The source model's latent of ``x`` at ``end_step`` (:func:`~plasticine.diffusion.ddim_encode`).

        Args:
            x: source-domain images.

        Returns:
            The latents :math:`y_{k_0}`.

        Shape:
            x: ``(B, C, *S)``; out: ``(B, C, *S)``.
        """
        options = {"prediction": self.prediction, "spacing": self.spacing, "clip": self.clip, "iterations": self.iterations}
        return ddim_encode(self.source_denoiser, self.schedule, x, None, steps=self.steps, end_step=self.end_step, **options)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """The target model's image of a latent at ``end_step`` (DDIM, ``eta = 0``).

        Args:
            latent: latents at ``end_step``.

        Returns:
            Target-domain images.

        Shape:
            latent: ``(B, C, *S)``; out: ``(B, C, *S)``.
        """
        return self.decoder.decode(self.target_denoiser, self.schedule, None, latent, self.end_step)

    def translate(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Translate source images to the target domain: ``decode(encode(x))``.

        Args:
            x: source-domain images (floating).
            generator: accepted where a seeded translation is expected (a Generator or None); unused, DDIB draws nothing.

        Returns:
            The translations, in the dtype and on the device of ``x``.

        Shape:
            x: ``(B, C, *S)``; out: ``(B, C, *S)``.
        """
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
        return self.decode(self.encode(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`translate` (so that the module can be called).

        Args:
            x: source-domain images.

        Returns:
            The translations.

        Shape:
            x: ``(B, C, *S)``; out: ``(B, C, *S)``.
        """
        return self.translate(x)

    def extra_repr(self) -> str:
        """The settings, for ``repr``.

        Returns:
            A one-line summary.

        Shape:
            Not applicable.
        """
        return f"steps={self.steps}, end_step={self.end_step}, prediction={self.prediction!r}, spacing={self.spacing!r}, clip={self.clip!r}, iterations={self.iterations}"
