r"""Per-pair registration by optimising a stationary velocity field (no training needed).

:class:`IterativeRegistration` minimises, from coarse to fine resolution,

.. math::

    E(v) = S(x \circ \exp(\tilde v), y) + S(x, y \circ \exp(-\tilde v)) + \lambda R(\tilde v),
    \qquad \tilde v = G_\sigma * v,

with ``S`` any :class:`~plasticine.core.SimilarityLoss` (normalised mutual information by default),
``R`` a regulariser of the smoothed velocity and :math:`G_\sigma` a Gaussian that keeps the velocity
smooth (the "fluid-like" smoothing of the update in SyN and demons). The exponential is any
:class:`~plasticine.core.Integrator` (scaling and squaring by default) and the minimisation any
:class:`~plasticine.registration.optimizers.OptimizerStrategy` (the SyN-like smoothed gradient
descent by default; Adam and L-BFGS ship too), both given as objects. The result is a
:class:`~plasticine.core.Deformation` with ``forward = exp(v)`` and ``inverse = exp(-v)``.
With ``spacing=h`` (the voxel size of the images, an :class:`IterativeConfig` field) ``R`` is
evaluated in mm on every level (anisotropic voxels, see :doc:`/conventions`); without a spacing
it is in voxels of the level.

**Cost.** Each level runs at most its ``iterations``; the default descent stops a level earlier
once the energy has converged (its mean over a window of steps no longer falls, see
:class:`~plasticine.registration.optimizers.GradientDescent`). The coarse levels do most of the
work (50 steps each at 1/4 and 1/2 resolution), the full resolution only refines (3 steps): one
step there costs as much as about 8 at half resolution in 3D. By default the energy is
differentiated to first order through the exponential (``gradient="first_order"``,
:math:`\partial \exp(v) / \partial v \approx \mathrm{Id}`, the force-based update of SyN and
demons), which skips the backward through the integrator, and the integrator takes as many
squarings as keep its first step under half a voxel (``steps="auto"``, four for displacements up
to 8 voxels). Measured on the Colin27 2 mm volume (``benchmarks/registration.py``, see
:doc:`/benchmarks`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..core.config import Configurable, register_settings
from ..core.deformation import Deformation
from ..core.filters import gaussian_smooth, resize, resize_field
from ..core.protocols import Integrator
from ..core.shapes import check_shape, spacing_tuple
from ..core.validate import accepts_keyword, check_option
from ..core.warp import warp
from .optimizers import GradientDescent, OptimizerStrategy

__all__ = ["IterativeRegistration", "IterativeConfig"]


@register_settings
@dataclass(frozen=True)
class IterativeConfig:
    """Settings of :class:`IterativeRegistration` (the optimiser and the integrator hold their own).

    Attributes:
        levels: downsampling factor of each resolution level, coarse to fine.
        iterations: most optimiser iterations per level (the default optimiser stops a level earlier when converged).
        smoothing: Gaussian sigma (voxels of the level) applied to the velocity.
        weight: regularisation weight lambda (0 by default: the two Gaussians regularise, as in
            SyN; a positive weight adds the explicit penalty).
        symmetric: use both terms of E (forward and inverse); else only the forward one.
        gradient: how the energy is differentiated through the exponential: ``"exact"``
            (through the integrator) or ``"first_order"`` (:math:`\\partial \\exp(v) / \\partial v`
            taken as the identity, its value at :math:`v = 0`: the gradient with respect to the
            displacement is used as the gradient with respect to the velocity, the force of SyN
            and demons; the integrator then runs without a graph).
        spacing: voxel size of the images in mm per spatial axis (tensor order; the column norms
            of their affine, :func:`plasticine.io.voxel_spacing`), or None (voxel units). With a
            spacing the regulariser is called as ``regularizer(v, spacing=h_level)`` with the
            voxel size of each level, :math:`h^l_i = h_i (S_i - 1) / (S^l_i - 1)` (the
            corner-aligned resampling of :func:`~plasticine.core.filters.resize`), so a weight
            means the same at every level and on every grid; without one it is called as
            ``regularizer(v)``, exactly as before. The similarity, the Gaussian smoothing and the
            fields stay in voxels, and with ``weight=0`` the spacing changes nothing.
    """

    levels: tuple[int, ...] = (4, 2, 1)
    iterations: tuple[int, ...] = (50, 50, 3)
    smoothing: float = 1.5
    weight: float = 0.0
    symmetric: bool = True
    gradient: str = "first_order"
    spacing: tuple[float, ...] | None = None


_MOVED = {
    "lr": "the optimizer, e.g. optimizer=GradientDescent(lr=...)",
    "update_smoothing": "the optimizer, e.g. optimizer=GradientDescent(update_smoothing=...)",
    "optimizer": "the optimizer argument as an object: GradientDescent(), Adam() or LBFGS()",
    "steps": "the integrator, e.g. integrator=ScalingAndSquaring(steps=...)",
}


class IterativeRegistration(Configurable):
    """Registration backend that optimises an SVF per pair; runs on the device of its inputs.

    ``backend.config`` holds the constructor arguments, components included (see
    :class:`~plasticine.core.Configurable`); ``backend.settings`` is the :class:`IterativeConfig`
    in use.

    Args:
        similarity: loss ``(moving, fixed, mask) -> scalar``, lower is better; defaults to
            :class:`plasticine.losses.MutualInformation` (normalised MI, 32 bins).
        regularizer: penalty of the smoothed velocity ``(B, N, *S) -> scalar``; defaults to
            :class:`plasticine.losses.GradientSmoothness`. With ``spacing=h`` it is called as
            ``regularizer(v, spacing=h_level)`` (in mm; see :class:`IterativeConfig`).
        config: an :class:`IterativeConfig`; keyword overrides of its fields may be given instead.
        integrator: an :class:`~plasticine.core.Integrator` giving ``exp(v)``;
            :class:`~plasticine.registration.ScalingAndSquaring` with ``steps="auto"`` by default
            (as many squarings as keep the first step under half a voxel, at least 4).
        optimizer: an :class:`~plasticine.registration.optimizers.OptimizerStrategy`
            (:class:`~plasticine.registration.optimizers.GradientDescent` by default,
            :class:`~plasticine.registration.optimizers.Adam`,
            :class:`~plasticine.registration.optimizers.LBFGS`), run once per level.

    Raises:
        ValueError: for levels and iterations of different or zero length, an integrator that is
            not callable or an optimizer without a ``minimise`` method (a name string, say), a
            spacing that is not None or 2 or 3 positive finite numbers, or a spacing with a
            regulariser whose call takes no ``spacing`` keyword.
        TypeError: for a keyword override that is not a field of :class:`IterativeConfig`.

    Shape:
        source, target: ``(B, C, *S)``; returned Deformation fields ``(B, N, *S)``.
    """

    def __init__(
        self,
        similarity: Callable[..., torch.Tensor] | None = None,
        regularizer: Callable[[torch.Tensor], torch.Tensor] | None = None,
        config: IterativeConfig | None = None,
        *,
        integrator: Integrator | None = None,
        optimizer: OptimizerStrategy | None = None,
        **overrides,
    ):
        if similarity is None:
            from ..losses import MutualInformation

            similarity = MutualInformation()
        if regularizer is None:
            from ..losses import GradientSmoothness

            regularizer = GradientSmoothness()
        if integrator is None:
            from .integrators import ScalingAndSquaring

            integrator = ScalingAndSquaring(steps="auto")
        optimizer = GradientDescent() if optimizer is None else optimizer
        if not isinstance(integrator, Integrator):
            raise ValueError(f"integrator: expected a callable velocity -> displacement (e.g. ScalingAndSquaring()), got {integrator!r}")
        if not isinstance(optimizer, OptimizerStrategy):
            raise ValueError(f"optimizer: expected an object with a minimise method (GradientDescent(), Adam() or LBFGS()), got {optimizer!r}")
        fields = {f.name for f in dataclasses.fields(IterativeConfig)}
        for key in overrides:
            if key not in fields:
                where = f"; it moved to {_MOVED[key]}" if key in _MOVED else ""
                raise TypeError(f"IterativeRegistration: unknown setting {key!r}, expected one of {sorted(fields)}{where}")
        cfg = config or IterativeConfig()
        if overrides:
            cfg = dataclasses.replace(cfg, **overrides)
        check_option(cfg.gradient, "gradient", ("exact", "first_order"))
        if cfg.spacing is not None:
            count = len(cfg.spacing) if isinstance(cfg.spacing, (tuple, list)) else 0
            if count not in (2, 3):
                raise ValueError(f"spacing: expected None or 2 or 3 positive finite voxel sizes (one per spatial axis), got {cfg.spacing!r}")
            cfg = dataclasses.replace(cfg, spacing=spacing_tuple(cfg.spacing, count))
            if not accepts_keyword(regularizer, "spacing"):
                raise ValueError(f"spacing: the regularizer {regularizer!r} takes no spacing keyword (regularizer(v, spacing=h)); give one that does, e.g. GradientSmoothness(), or spacing=None")
        if len(cfg.levels) != len(cfg.iterations) or not cfg.levels:
            raise ValueError(f"levels and iterations must have the same non-zero length, got {cfg.levels} and {cfg.iterations}")
        self.similarity, self.regularizer = similarity, regularizer
        self.integrator, self.optimizer = integrator, optimizer
        self.settings = cfg

    def register(self, source: torch.Tensor, target: torch.Tensor | None = None, *, cue: torch.Tensor | None = None) -> Deformation:
        """Find phi with ``source o phi ~ target``.

        Args:
            source: moving image ``x``.
            target: fixed image ``y``; required.
            cue: ignored by this backend (accepted for the protocol); must be None.

        Raises:
            ValueError: for a missing target, a cue, mismatched shapes or dtypes, or a
                ``settings.spacing`` of another dimension than the images.

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
        h = cfg.spacing
        if h is not None and len(h) != n:
            raise ValueError(f"spacing: expected {n} voxel sizes (one per spatial axis of the images), got {h}")
        v = None
        for factor, iters in zip(cfg.levels, cfg.iterations):
            lshape = tuple(max(4, round((s - 1) / factor) + 1) for s in shape)
            x, y = resize(source, lshape), resize(target, lshape)
            v0 = torch.zeros(dims["B"], n, *lshape, dtype=source.dtype, device=source.device) if v is None else resize_field(v, lshape)
            hl = None if h is None else tuple(hi * (s - 1) / max(ls - 1, 1) for hi, s, ls in zip(h, shape, lshape))
            with torch.enable_grad():
                v = self.optimizer.minimise(lambda w, x=x, y=y, hl=hl: self._energy(x, y, w, hl), v0, iters).detach()
        with torch.no_grad():
            v = self._smooth(resize_field(v, shape), cfg.smoothing * cfg.levels[-1])
            return Deformation(self.integrator(v), self.integrator(-v), v)

    def with_spacing(self, spacing: float | Sequence[float] | None) -> "IterativeRegistration":
        """The same backend (components shared) for images of another voxel spacing.

        ``IterativeRegistration.from_config({**self.config, "spacing": spacing})``, checked as
        the constructor checks it. ``plasticine translate`` calls it with each input's spacing.

        Args:
            spacing: 2 or 3 voxel sizes in mm (one per spatial axis), or None (voxel units).

        Raises:
            ValueError: for a spacing that is not None or 2 or 3 positive finite numbers.

        Shape:
            Not applicable.
        """
        if hasattr(spacing, "tolist"):  # numpy arrays, tensors
            spacing = spacing.tolist()  # type: ignore[union-attr]
        if isinstance(spacing, list):
            spacing = tuple(spacing)
        return type(self).from_config({**self.config, "spacing": spacing})

    @staticmethod
    def _smooth(v: torch.Tensor, sigma: float) -> torch.Tensor:
        return gaussian_smooth(v, sigma) if sigma > 0 else v

    def _exp(self, v: torch.Tensor) -> torch.Tensor:
        if self.settings.gradient == "exact":
            return self.integrator(v)
        with torch.no_grad():
            u = self.integrator(v)
        # the value of exp(v) with the derivative of Id + v (v - v.detach() is zero)
        return u + (v - v.detach())

    def _energy(self, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor, spacing: tuple[float, ...] | None = None) -> torch.Tensor:
        cfg = self.settings
        vs = self._smooth(v, cfg.smoothing)
        e = self.similarity(warp(x, self._exp(vs)), y)
        if cfg.symmetric:
            e = e + self.similarity(x, warp(y, self._exp(-vs)))
        if cfg.weight:
            e = e + cfg.weight * (self.regularizer(vs) if spacing is None else self.regularizer(vs, spacing=spacing))
        return e
