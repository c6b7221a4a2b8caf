r"""Per-pair registration by optimising a stationary velocity field (no training needed).

:class:`IterativeRegistration` minimises, from coarse to fine resolution,

.. math::

    E(v) = S(x \circ \exp(\tilde v), y) + S(x, y \circ \exp(-\tilde v)) + \lambda R(\tilde v),
    \qquad \tilde v = G_\sigma * v,

with ``S`` any :class:`~plasticine.core.SimilarityLoss` (normalised mutual information by default),
``R`` a regulariser of the smoothed velocity and :math:`G_\sigma` a Gaussian that keeps the velocity
smooth (the "fluid-like" smoothing of the update in SyN and demons). The result is a
:class:`~plasticine.core.Deformation` with ``forward = exp(v)`` and ``inverse = exp(-v)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch

from ..core.config import Configurable, register_settings
from ..core.deformation import Deformation
from ..core.filters import gaussian_smooth, resize, resize_field
from ..core.shapes import check_shape
from ..core.warp import warp
from .integrators import scaling_and_squaring

__all__ = ["IterativeRegistration", "IterativeConfig"]


@register_settings
@dataclass(frozen=True)
class IterativeConfig:
    """Settings of :class:`IterativeRegistration`.

    Attributes:
        levels: downsampling factor of each resolution level, coarse to fine.
        iterations: optimiser steps per level.
        lr: step size: the largest update in voxels of the level for ``"gradient"``, the
            learning rate for Adam and L-BFGS.
        smoothing: Gaussian sigma (voxels of the level) applied to the velocity.
        weight: regularisation weight lambda (0 by default: the two Gaussians regularise, as in
            SyN; a positive weight adds the explicit penalty).
        steps: squaring steps of the exponential.
        symmetric: use both terms of E (forward and inverse); else only the forward one.
        optimizer: ``"gradient"`` (the default: steepest descent whose update is smoothed by a
            Gaussian of ``update_smoothing`` and scaled so that it moves at most ``lr`` voxels, the
            update rule of SyN and demons), ``"adam"`` or ``"lbfgs"``.
        update_smoothing: Gaussian sigma (voxels of the level) of the update, for ``"gradient"``.
    """

    levels: tuple[int, ...] = (4, 2, 1)
    iterations: tuple[int, ...] = (40, 25, 10)
    lr: float = 0.25
    smoothing: float = 1.5
    weight: float = 0.0
    steps: int = 7
    symmetric: bool = True
    optimizer: Literal["gradient", "adam", "lbfgs"] = "gradient"
    update_smoothing: float = 6.0


class IterativeRegistration(Configurable):
    """Registration backend that optimises an SVF per pair; runs on the device of its inputs.

    ``backend.config`` holds the constructor arguments, components included (see
    :class:`~plasticine.core.Configurable`); ``backend.settings`` is the :class:`IterativeConfig`
    in use.

    Args:
        similarity: loss ``(moving, fixed, mask) -> scalar``, lower is better; defaults to
            :class:`plasticine.losses.MutualInformation` (normalised MI, 32 bins).
        regularizer: penalty of the smoothed velocity ``(B, N, *S) -> scalar``; defaults to
            :class:`plasticine.losses.GradientSmoothness`.
        config: an :class:`IterativeConfig`; keyword overrides may be given instead.

    Shape:
        source, target: ``(B, C, *S)``; returned Deformation fields ``(B, N, *S)``.
    """

    def __init__(
        self,
        similarity: Callable[..., torch.Tensor] | None = None,
        regularizer: Callable[[torch.Tensor], torch.Tensor] | None = None,
        config: IterativeConfig | None = None,
        **overrides,
    ):
        if similarity is None:
            from ..losses import MutualInformation

            similarity = MutualInformation()
        if regularizer is None:
            from ..losses import GradientSmoothness

            regularizer = GradientSmoothness()
        self.similarity, self.regularizer = similarity, regularizer
        cfg = config or IterativeConfig()
        if overrides:
            cfg = IterativeConfig(**{**cfg.__dict__, **overrides})
        if len(cfg.levels) != len(cfg.iterations) or not cfg.levels:
            raise ValueError(f"levels and iterations must have the same non-zero length, got {cfg.levels} and {cfg.iterations}")
        if cfg.optimizer not in ("gradient", "adam", "lbfgs"):
            raise ValueError(f"optimizer: expected 'gradient', 'adam' or 'lbfgs', got {cfg.optimizer!r}")
        self.settings = cfg

    def register(self, source: torch.Tensor, target: torch.Tensor | None = None, *, cue: torch.Tensor | None = None) -> Deformation:
        """Find phi with ``source o phi ~ target``.

        Args:
            source: moving image ``x``.
            target: fixed image ``y``; required.
            cue: ignored by this backend (accepted for the protocol); must be None.

        Shape:
            source, target: ``(B, C, *S)``; out: Deformation with ``(B, N, *S)`` fields.
        """
        if target is None:
            raise ValueError("IterativeRegistration needs a target image: register(source, target)")
        if cue is not None:
            raise ValueError("IterativeRegistration does not use a cue; pass cue=None")
        dims = check_shape(source, "B C *S", "source")
        check_shape(target, "B C *S", "target", bindings=dims)
        if not source.is_floating_point() or source.dtype != target.dtype:
            raise ValueError(f"source and target must share one floating dtype, got {source.dtype} and {target.dtype}")
        cfg = self.settings
        shape, n = dims["S"], dims["N"]
        v = None
        for factor, iters in zip(cfg.levels, cfg.iterations):
            lshape = tuple(max(4, round((s - 1) / factor) + 1) for s in shape)
            x, y = resize(source, lshape), resize(target, lshape)
            v0 = torch.zeros(dims["B"], n, *lshape, dtype=source.dtype, device=source.device) if v is None else resize_field(v, lshape)
            v = self._optimise(x, y, v0, iters).detach()
        with torch.no_grad():
            v = self._smooth(resize_field(v, shape), cfg.smoothing * cfg.levels[-1])
            return Deformation(scaling_and_squaring(v, cfg.steps), scaling_and_squaring(-v, cfg.steps), v)

    @staticmethod
    def _smooth(v: torch.Tensor, sigma: float) -> torch.Tensor:
        return gaussian_smooth(v, sigma) if sigma > 0 else v

    def _energy(self, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.settings
        vs = self._smooth(v, cfg.smoothing)
        fwd = scaling_and_squaring(vs, cfg.steps)
        e = self.similarity(warp(x, fwd), y)
        if cfg.symmetric:
            e = e + self.similarity(x, warp(y, scaling_and_squaring(-vs, cfg.steps)))
        if cfg.weight:
            e = e + cfg.weight * self.regularizer(vs)
        return e, vs

    @torch.enable_grad()
    def _optimise(self, x: torch.Tensor, y: torch.Tensor, v0: torch.Tensor, iters: int) -> torch.Tensor:
        cfg = self.settings
        param = v0.clone().requires_grad_(True)
        if cfg.optimizer == "gradient":
            n = v0.dim() - 2
            for _ in range(iters):
                e, _ = self._energy(x, y, param)
                (grad,) = torch.autograd.grad(e, param)
                with torch.no_grad():
                    step = self._smooth(grad, cfg.update_smoothing)
                    # largest vector length (a sum of squares: torch's norm(dim=1) is slow on the CPU)
                    size = step.square().sum(1, keepdim=True).amax(dim=tuple(range(2, n + 2)), keepdim=True).sqrt()
                    param -= cfg.lr * step / size.clamp(min=1e-12)
        elif cfg.optimizer == "adam":
            opt = torch.optim.Adam([param], lr=cfg.lr)
            for _ in range(iters):
                opt.zero_grad(set_to_none=True)
                e, _ = self._energy(x, y, param)
                e.backward()
                opt.step()
        else:
            opt = torch.optim.LBFGS([param], lr=cfg.lr, max_iter=iters, line_search_fn="strong_wolfe")

            def closure():
                opt.zero_grad(set_to_none=True)
                e, _ = self._energy(x, y, param)
                e.backward()
                return e

            opt.step(closure)
        return param.detach()
