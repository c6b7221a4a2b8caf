r"""The :class:`TraceableTranslator`: the paper's method assembled from plug-in parts.

Inference (the paper's Algorithm 1) for a source image :math:`x`:

1. :math:`x_s = \mathrm{structure}(x)`, a ``(B, L, *S)`` structure map;
2. :math:`\phi = \mathrm{registration}(x)`, a :class:`~plasticine.core.Deformation` predicted from
   the source alone (a learned backend) or towards a given ``target`` (a backend that needs one);
3. the condition :math:`c = \mathrm{conditioning}(x_s \circ \phi)` (the structure map warped into the
   target geometry by :meth:`~plasticine.core.Deformation.to_target`, linear interpolation of the
   channels, border padding);
4. :math:`x_{k_0} \sim q(x_{k_0} \mid x_0 = x)`, then the sampler denoises :math:`k_0 \to 0` with
   :math:`\epsilon_\theta(y_k, \gamma_k, c)`. Options: ``start="warped"`` noises :math:`x \circ \phi`
   instead (start and condition in one geometry); ``data_range=(l, h)`` runs the diffusion on the
   images mapped affinely from ``[l, h]`` to ``[-1, 1]`` (:meth:`TraceableTranslator.to_diffusion`),
   the sample mapped back.

The output :math:`\hat y` lives in the target geometry. A mask :math:`m` drawn on :math:`\hat y` is
traced back to the source as :math:`m \circ \phi^{-1}`; a source point :math:`p` sits at
:math:`\phi^{-1}(p)` in :math:`\hat y` (see :class:`TranslationResult`).

**The start step** :math:`k_0` trades faithfulness to the source against realism: the noised start
keeps :math:`\sqrt{\gamma_{k_0}}\,x` of the source, so a small :math:`k_0` changes little and a
:math:`k_0` near :math:`K` forgets the source intensities and keeps only what the condition carries.
The default is ``start_fraction * K`` rounded to the nearest step, ``start_fraction = 0.5`` (for the
paper's linear schedule, :math:`10^{-6} .. 10^{-2}` over :math:`K = 2000`, :math:`k_0 = 1000` keeps
:math:`\sqrt{\gamma_{1000}} \approx 0.29` of the source signal).

Training uses the two objectives of :mod:`plasticine.training` (:func:`~plasticine.training.diffusion_objective`,
:func:`~plasticine.training.deformation_objective`). The translator is an :class:`torch.nn.Module`
whose learned parts are its submodules, so ``state_dict``, ``to``, ``train``, ``eval`` and
``parameters`` are torch's; ``translator.config`` holds its six parts, ``start_fraction``,
``data_range`` and ``start``
(:class:`~plasticine.core.Configurable`), so :func:`plasticine.checkpoint.save_component` and
:func:`plasticine.checkpoint.load_translator` write and read it, config and weights, as one file.

Reference:
    Zhang, Cheng et al., "Plasticine: A Traceable Diffusion Model for Medical Image Translation",
    Algorithm 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from .core.config import Configurable
from .core.deformation import Deformation
from .core.protocols import ConditionEncoder, Denoiser, NoiseSchedule, RegistrationBackend, Sampler, StructureExtractor
from .core.shapes import NonFiniteError, check_finite, check_shape
from .core.validate import check_image, check_int, check_interval, check_number, check_option
from .diffusion.schedules import noise_like

__all__ = ["TranslationResult", "TraceableTranslator", "COMPONENTS"]

#: The component names of a translator, in constructor order.
COMPONENTS: tuple[str, ...] = ("structure", "registration", "denoiser", "schedule", "sampler", "conditioning")

#: The protocol of plasticine.core that each component must satisfy.
_PROTOCOLS: dict[str, type] = {
    "structure": StructureExtractor,
    "registration": RegistrationBackend,
    "denoiser": Denoiser,
    "schedule": NoiseSchedule,
    "sampler": Sampler,
    "conditioning": ConditionEncoder,
}


@dataclass
class TranslationResult:
    r"""What :meth:`TraceableTranslator.translate` returns: the image and how it traces to the source.

    With ``n = num_samples`` draws per input, ``samples[i]`` is draw ``i`` of every batch item,
    ``image`` is their per-voxel mean and ``std`` their per-voxel standard deviation
    (:math:`\sqrt{\tfrac1n \sum_i (s_i - \bar s)^2}`, zero for one draw). The mean is the
    estimate of the translation with the least variance; pick ``samples[i]`` for a single,
    sharper draw. All samples share one deformation and one condition.

    Tracing goes through the :class:`~plasticine.core.Deformation` itself, one place for it:
    ``result.deformation.to_source(mask)`` carries a mask drawn on the translation back to the
    source (:math:`m \circ \phi^{-1}`), ``labels_to_source`` does it for label maps,
    ``points_to_target(p)`` finds where source points sit in the translation
    (:math:`\phi^{-1}(p)`), ``points_to_source`` and ``to_target`` go the other way.

    Attributes:
        image: the translated image :math:`\hat y` (mean of the samples), target geometry.
        deformation: :math:`\phi` and :math:`\phi^{-1}` between source and target geometry.
        source_structure: :math:`x_s`, the structure map of the source.
        warped_structure: :math:`x_s \circ \phi`, the map the condition was made of.
        samples: every draw.
        std: per-voxel spread of the draws.
        start_step: the step :math:`k_0` sampling started from.

    Shape:
        image, std: ``(B, C, *S)``; samples: ``(n, B, C, *S)``; source_structure, warped_structure:
        ``(B, L, *S)``; deformation fields: ``(B, N, *S)``.
    """

    image: torch.Tensor
    deformation: Deformation
    source_structure: torch.Tensor
    warped_structure: torch.Tensor
    samples: torch.Tensor
    std: torch.Tensor
    start_step: int

    @property
    def num_samples(self) -> int:
        """The number of draws ``n``."""
        return self.samples.shape[0]


class TraceableTranslator(Configurable, nn.Module):
    r"""Traceable image translation: conditional diffusion for intensity, registration for shape.

    Every part is a plug-in object satisfying the matching protocol of :mod:`plasticine.core`
    (checked with ``isinstance``, the protocols being ``runtime_checkable``); the translator only
    wires them together (see the module docstring for the algorithm). It is an
    :class:`torch.nn.Module`: the parts that are modules (the denoiser, a learned registration and
    its network, a learned encoder) are its submodules, so ``state_dict`` (keys such as
    ``"denoiser.stem.weight"``, ``"registration.network.head.bias"``), ``to``, ``train``, ``eval``
    and ``parameters`` come from torch. It has no ``forward``: call :meth:`translate`. The parts
    are read-only once built (``translator.config`` records them): :meth:`replace` makes a
    translator with other ones.

    Args:
        structure: :class:`~plasticine.core.StructureExtractor`, ``image -> (B, L, *S)`` map.
        registration: :class:`~plasticine.core.RegistrationBackend`, e.g.
            :class:`~plasticine.registration.network.LearnedRegistration` (predicts from the source
            alone) or :class:`~plasticine.registration.iterative.IterativeRegistration` (needs
            ``translate(x, target=y)``).
        denoiser: :class:`~plasticine.core.Denoiser`, e.g.
            :class:`~plasticine.diffusion.unet.ConditionalUNet` with ``cond_channels`` equal to the
            condition's channels.
        schedule: :class:`~plasticine.core.NoiseSchedule` the denoiser is trained with.
        sampler: :class:`~plasticine.core.Sampler` (ancestral, DDIM, DPM-Solver++).
        conditioning: :class:`~plasticine.core.ConditionEncoder`, warped structure map -> condition.
        start_fraction: default start step as a fraction of ``K`` (``k0 = round(start_fraction * K)``),
            in ``[0, 1]``.
        data_range: ``(low, high)``: the range of the images, mapped affinely onto ``[-1, 1]`` inside
            the diffusion (:meth:`to_diffusion`, :meth:`from_diffusion`), so that the denoiser sees
            data of unit scale and a sampler's ``clip=(-1, 1)`` clips to the data range; None (the
            default, the paper's) runs the diffusion on the images as they are. Training
            (:mod:`plasticine.training`) applies the same map.
        start: where sampling starts: ``"source"`` (the default, the paper's Algorithm 1) noises the
            source :math:`x` itself; ``"warped"`` noises the warped source :math:`x \circ \phi`,
            which lies in the geometry of the condition :math:`x_s \circ \phi` (see
            :meth:`translate`).

    Example:
        >>> import torch
        >>> from plasticine.diffusion import LinearSchedule, DDIMSampler
        >>> from plasticine.diffusion.conditioning import ConcatConditioning
        >>> from plasticine.diffusion.unet import ConditionalUNet, UNetConfig
        >>> from plasticine.registration.network import LearnedRegistration, RegistrationNet, RegistrationNetConfig
        >>> from plasticine.segmentation import KMeansExtractor
        >>> t = TraceableTranslator(
        ...     KMeansExtractor(2),
        ...     LearnedRegistration(RegistrationNet(RegistrationNetConfig(features=8, encoder=(8, 8), align_channels=8, align_layers=1))),
        ...     ConditionalUNet(UNetConfig(cond_channels=2, base_channels=8, channel_mults=(1,), attention_levels=())),
        ...     LinearSchedule(num_steps=100), DDIMSampler(steps=5), ConcatConditioning(2))
        >>> r = t.translate(torch.rand(1, 1, 16, 16), generator=torch.Generator().manual_seed(0))
        >>> r.image.shape, r.deformation.forward.shape, r.start_step
        (torch.Size([1, 1, 16, 16]), torch.Size([1, 2, 16, 16]), 50)

    Shape:
        See :meth:`translate`.
    """

    def __init__(
        self,
        structure: StructureExtractor,
        registration: RegistrationBackend,
        denoiser: Denoiser,
        schedule: NoiseSchedule,
        sampler: Sampler,
        conditioning: ConditionEncoder,
        *,
        start_fraction: float = 0.5,
        data_range: tuple[float, float] | None = None,
        start: Literal["source", "warped"] = "source",
    ) -> None:
        parts = {"structure": structure, "registration": registration, "denoiser": denoiser, "schedule": schedule, "sampler": sampler, "conditioning": conditioning}
        for name, obj in parts.items():
            if isinstance(obj, str):
                raise ValueError(f"{name}: expected a component object, got the string {obj!r} (build the component and pass it)")
            if not isinstance(obj, _PROTOCOLS[name]):
                raise ValueError(f"{name}: expected an object satisfying the {_PROTOCOLS[name].__name__} protocol of plasticine.core, got {type(obj).__name__}")
        check_number(start_fraction, "start_fraction", 0, 1)
        check_option(start, "start", ("source", "warped"))
        data_range = check_interval(data_range, "data_range")
        super().__init__()
        self.structure = structure
        self.registration = registration
        self.denoiser = denoiser
        self.schedule = schedule
        self.sampler = sampler
        self.conditioning = conditioning
        self.start_fraction = float(start_fraction)
        self.data_range = data_range
        self.start = start

    # -- parts -------------------------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        """``K``, the number of diffusion steps of the schedule."""
        return int(self.schedule.gammas.shape[0]) - 1

    @property
    def default_start_step(self) -> int:
        """The start step used when ``translate`` gets ``start_step=None``: ``round(start_fraction * K)``."""
        return int(round(self.start_fraction * self.num_steps))

    def components(self) -> dict[str, Any]:
        """The six parts by name, in constructor order.

        Returns:
            ``{"structure", "registration", "denoiser", "schedule", "sampler", "conditioning"}``.

        Shape:
            Not applicable.
        """
        return {name: getattr(self, name) for name in COMPONENTS}

    def replace(self, **components: Any) -> "TraceableTranslator":
        """A translator sharing every part except the ones given (e.g. a wrapped denoiser).

        Args:
            **components: new parts by name (see :data:`COMPONENTS`).

        Returns:
            The new translator (the old one is unchanged).

        Shape:
            Not applicable.
        """
        unknown = set(components) - set(COMPONENTS)
        if unknown:
            raise ValueError(f"replace: unknown component names {sorted(unknown)}, expected some of {COMPONENTS}")
        return type(self)(**{**self.components(), **components}, start_fraction=self.start_fraction, data_range=self.data_range, start=self.start)

    def _check_like_weights(self, x: torch.Tensor) -> None:
        """Refuse an image whose dtype or device differs from the weights' (it would fail inside a layer)."""
        params = [p for p in self.parameters() if p.is_floating_point()]
        dtypes = sorted({str(p.dtype) for p in params})
        devices = sorted({str(p.device) for p in params})
        if params and str(x.dtype) not in dtypes:
            want = " or ".join(dtypes)
            raise ValueError(
                f"x: expected dtype {want} (the dtype of the translator's weights), got {x.dtype}: "
                f"convert the image (x.to({want})) or the translator (translator.to({x.dtype}))"
            )
        if params and str(x.device) not in devices:
            want = " or ".join(devices)
            raise ValueError(f"x: expected device {want} (where the translator's weights are), got {x.device}: move the image or the translator")

    # -- the data range of the diffusion ---------------------------------------------------------
    def to_diffusion(self, x: torch.Tensor) -> torch.Tensor:
        r"""Images into the diffusion's range: :math:`2 (x - l)/(h - l) - 1` for ``data_range = (l, h)``.

        Used on the start of :meth:`translate` and on the training targets
        (:func:`~plasticine.training.diffusion_objective`, :func:`~plasticine.training.noise_cue`);
        ``x`` itself when ``data_range`` is None. Values outside the range map outside ``[-1, 1]``
        (nothing is clamped).

        Args:
            x: images.

        Returns:
            The diffusion's data.

        Shape:
            x: ``(B, C, *S)``; out: ``(B, C, *S)``.
        """
        if self.data_range is None:
            return x
        low, high = self.data_range
        return (x - low) * (2.0 / (high - low)) - 1.0

    def from_diffusion(self, y: torch.Tensor) -> torch.Tensor:
        r"""The inverse of :meth:`to_diffusion`: :math:`l + (y + 1)(h - l)/2`; ``y`` itself when ``data_range`` is None.

        Args:
            y: the diffusion's data (a sample).

        Returns:
            Images in the range of the inputs.

        Shape:
            y: ``(B, C, *S)``; out: ``(B, C, *S)``.
        """
        if self.data_range is None:
            return y
        low, high = self.data_range
        return (y + 1.0) * ((high - low) / 2.0) + low

    # -- inference -------------------------------------------------------------------------------
    def structure_map(self, x: torch.Tensor) -> torch.Tensor:
        """The structure map of ``x``, checked to be a floating ``(B, L, *S)`` map.

        Args:
            x: images.

        Returns:
            The map, in the dtype of ``x``.

        Shape:
            x: ``(B, C, *S)``; out: ``(B, L, *S)``.
        """
        dims = check_shape(x, "B C *S", "x")
        xs = self.structure(x)
        check_shape(xs, "B L *S", f"structure map from {type(self.structure).__name__}", bindings={"B": dims["B"], "S": dims["S"]})
        return xs.to(x.dtype)

    def translate(
        self,
        x: torch.Tensor,
        *,
        start_step: int | None = None,
        num_samples: int = 1,
        generator: torch.Generator | None = None,
        target: torch.Tensor | None = None,
    ) -> TranslationResult:
        r"""Translate source images into the target domain and return how they trace back.

        Runs the paper's Algorithm 1 (see the module docstring), all under :func:`torch.no_grad`
        (a backend that optimises inside ``register``, such as the iterative one, switches autograd
        on for itself):
        ``x_s = structure(x)``; ``phi = registration.register(x)`` (or ``register(x, target)`` when
        ``target`` is given); ``c = conditioning(x_s o phi)``; the sampler starts from
        :math:`x_{k_0} \sim q(x_{k_0} \mid x)` (``start="source"``) or
        :math:`q(x_{k_0} \mid x \circ \phi)` (``start="warped"``), both taken in the diffusion's
        range (:meth:`to_diffusion`), and denoises to step 0; the sample is mapped back with
        :meth:`from_diffusion`.

        **Why a warped start.** The condition :math:`x_s \circ \phi` is in the target geometry,
        while the unwarped source keeps the source geometry: with a deformation of a few voxels the
        noised start (which keeps :math:`\sqrt{\gamma_{k_0}}\,x` of the source) and the condition
        disagree about where every edge is, and the denoiser is asked to follow two geometries at
        once. :math:`x \circ \phi` puts start and condition in one geometry, that of the output. The ``n = num_samples`` draws
        run as one batch of ``n * B`` images (draw ``i`` of item ``b`` at row ``i * B + b``), so the
        generator's draws, and the result, depend on ``n``. The networks run in the mode they are in:
        call :meth:`eval` after training (:func:`~plasticine.checkpoint.load_translator` returns a
        translator in evaluation mode).

        Inputs and outputs are checked (a boundary of the library, see :doc:`/conventions`): ``x``
        and ``target`` must be finite and have the dtype and device of the translator's weights
        (nothing is converted silently), and a non-finite structure map, deformation, condition or
        sample raises :class:`~plasticine.core.NonFiniteError` (a ``ValueError``) naming the part
        that produced it instead of being returned (one host synchronisation per check).

        Args:
            x: source images, finite, in the dtype and on the device of the translator's weights.
            start_step: :math:`k_0` in ``[0, K]``; None uses :attr:`default_start_step`
                (``round(start_fraction * K)``). ``0`` returns the start image (``x``, or
                :math:`x \circ \phi`) unchanged, up to the rounding of the data-range map.
            num_samples: draws per image, ``>= 1``.
            generator: the only source of randomness (``None``: torch's default generator).
            target: target images for a registration backend that needs one (an iterative or ANTs
                backend); None for a backend that predicts from the source alone.

        Returns:
            A :class:`TranslationResult`.

        Raises:
            ValueError: for a wrong shape, a non-floating or non-finite image, an image whose dtype
                or device differs from the weights', a bad ``start_step`` or ``num_samples``, or a
                backend that needs a target when none is given (the backend's own error).
            plasticine.core.NonFiniteError: (a ``ValueError``) when a part produced a NaN or an
                infinity: the structure extractor, the registration, the conditioning or the
                sampler (a diverged denoiser, or non-finite weights).

        Shape:
            x, target: ``(B, C, *S)``; see :class:`TranslationResult` for the outputs.
        """
        dims = check_image(x, "x")
        self._check_like_weights(x)
        if target is not None:
            check_shape(target, "B C *S", "target", bindings=dict(dims))
            check_image(target, "target")
            if target.dtype != x.dtype or target.device != x.device:
                raise ValueError(f"target: expected the dtype and device of x, {x.dtype} on {x.device}, got {target.dtype} on {target.device}")
        check_int(num_samples, "num_samples", 1)
        K = self.num_steps
        k0 = self.default_start_step if start_step is None else check_int(start_step, "start_step", 0, K)
        B = dims["B"]
        reg = type(self.registration).__name__
        try:
            with torch.no_grad():
                deformation = self.registration.register(x) if target is None else self.registration.register(x, target)
        except NonFiniteError as err:
            raise NonFiniteError(f"translate: the registration ({reg}) produced a non-finite deformation: {err}") from err
        if not isinstance(deformation, Deformation):
            raise ValueError(f"registration.register: expected a Deformation, got {type(deformation).__name__}")
        if deformation.shape != dims["S"] or deformation.forward.shape[0] != B:
            raise ValueError(f"registration.register: expected fields of shape ({B}, {dims['N']}, *{dims['S']}), got {tuple(deformation.forward.shape)}")
        with torch.no_grad():
            xs = self.structure_map(x)
            check_finite(xs, f"translate: the structure map from {type(self.structure).__name__}")
            warped = deformation.to_target(xs)
            condition = self.conditioning(warped)
            if condition is not None:
                condition = condition.to(x.dtype)
                check_finite(condition, f"translate: the condition from {type(self.conditioning).__name__}")
            origin = x if self.start == "source" else deformation.to_target(x)
            clean = self.to_diffusion(origin).repeat(num_samples, *([1] * (x.dim() - 1)))
            cond = None if condition is None else condition.repeat(num_samples, *([1] * (condition.dim() - 1)))
            start = self.schedule.q_sample(clean, k0, noise_like(clean, generator))
            out = self.from_diffusion(self.sampler.sample(self.denoiser, self.schedule, cond, start, k0, generator))
            check_finite(
                out,
                f"translate: the samples from {type(self.sampler).__name__}",
                f"the denoiser {type(self.denoiser).__name__} diverged or holds non-finite weights",
            )
            samples = out.reshape(num_samples, *x.shape)
            mean = samples.mean(0)
            std = samples.std(0, correction=0)
        return TranslationResult(mean, deformation, xs, warped, samples, std, k0)

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}={type(o).__name__}" for n, o in self.components().items())
        extra = "".join(f", {n}={getattr(self, n)!r}" for n, d in (("data_range", None), ("start", "source")) if getattr(self, n) != d)
        return f"TraceableTranslator({parts}, start_fraction={self.start_fraction}{extra})"
