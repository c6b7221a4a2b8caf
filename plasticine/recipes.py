r"""The standard translator and its two-stage training: what ``plasticine train`` and the demo run.

* :func:`build_translator` assembles the translator of ``plasticine train``: small networks that
  train on a CPU, the structure map, parametrisation, data range, clipping and start chosen by
  its arguments.
* :func:`train_translator` trains it as the paper does, one :class:`~plasticine.training.Trainer`
  per stage, each over :class:`~plasticine.training.ShuffledBatches`:

  1. the denoiser on the target images, conditioned on their own structure maps (Algorithm 2,
     :func:`~plasticine.training.diffusion_objective`), with an optional weight average;
  2. the registration network on (source, target) pairs, the frozen denoiser giving the noise cue
     (:func:`~plasticine.training.deformation_objective`).

  Unpaired data is the default: stage 2 pairs each source with a target drawn by
  :class:`~plasticine.io.UnpairedImages`. A stage with a checkpoint file resumes from it.

The command line and the demo both call these two functions, so one recipe is written once.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .core.shapes import spacing_tuple
from .losses import GradientSmoothness
from .training import Augmentation, ContrastRandomization, Progress, ShuffledBatches, TrainConfig, Trainer, deformation_objective, diffusion_objective
from .translator import TraceableTranslator

if TYPE_CHECKING:
    from .segmentation import ForegroundExtractor

__all__ = ["MR_CONTRAST_OPTIONS", "STRUCTURES", "TrainingRecipe", "build_translator", "head_extractor", "train_translator"]


#: The structure maps :func:`build_translator` offers (``structure=``), see its docstring.
STRUCTURES: tuple[str, ...] = ("foreground", "foreground+rim", "foreground+mind", "mind", "kmeans", "potts")

#: The :func:`build_translator` options for translation between two MR contrasts (T1 -> PD): the
#: head mask stacked with fine MIND-SSC patches (both domains are MR, so their internal structure
#: corresponds and the self-similarity carries it; ``mind_sigma=1.0`` keeps more of it than the
#: default 2.5) and :math:`\hat x_0` prediction, clipped. Use as
#: ``build_translator(ndim, channels, **MR_CONTRAST_OPTIONS)`` and train with
#: ``TrainingRecipe(contrast=ContrastRandomization(12))`` (MIND-SSC is invariant to affine but not
#: to non-monotone contrast changes; trained on maps of remapped targets the denoiser reads the
#: source's maps as its own); the registration stays a separate choice, and the MR -> CT defaults
#: of :func:`build_translator` are not changed by it. On the T1 -> PD case of
#: ``benchmarks/crossmodal.py`` (700 denoiser steps) this scored SSIM 0.856 in the brain, and 0.770
#: trained on the targets' own maps, where ``"v"`` prediction scored 0.680, ``"eps"`` 0.324, a weight
#: average (``ema_decay=0.995``) 0.762 and min-SNR weighting (``snr_gamma=5``) 0.700 (see :doc:`/benchmarks`).
MR_CONTRAST_OPTIONS: dict[str, Any] = dict(structure="foreground+mind", mind_sigma=1.0, prediction="x0")


def head_extractor() -> ForegroundExtractor:
    """The head-mask extractor of the ``"foreground"`` structure map and of the evaluation's masks.

    :class:`~plasticine.segmentation.ForegroundExtractor` with ``fraction=0.05, closing=3``: the
    filled largest component above 5 % of the image's robust range, closed by 3 voxels. On the
    MR -> CT case it found the heads of both domains best (Dice 0.98 MR, 0.99 CT).

    Returns:
        A new extractor; channel 1 of its output is the head.

    Shape:
        image: ``(B, C, *S)``; out: ``(B, 2, *S)``.
    """
    from .segmentation import ForegroundExtractor

    return ForegroundExtractor(fraction=0.05, closing=3)


def build_translator(
    ndim: int,
    channels: int,
    *,
    structure: str = "foreground",
    classes: int = 4,
    mind_sigma: float = 2.5,
    rim_depth: float = 10.0,
    prediction: str = "x0",
    data_range: tuple[float, float] | None = (0.0, 1.0),
    clip: bool = True,
    start: str = "warped",
    start_fraction: float = 1.0,
    sampler_steps: int = 20,
    seed: int = 0,
    registration: str = "learned",
    shape: tuple[int, ...] | None = None,
) -> TraceableTranslator:
    r"""The translator that ``plasticine train`` builds: small networks that train on a CPU.

    A structure map chosen by ``structure``, the learned registration network with the noise cue
    (16 to 32 channels) and scaling and squaring, a conditional U-Net (16, 32, 32 channels) whose
    condition has the map's channels, the paper's linear schedule, DDIM with ``sampler_steps``
    steps and concatenation conditioning. The structure maps:

    * ``"foreground"`` (default): the filled head mask
      (:class:`~plasticine.segmentation.ForegroundExtractor` with ``fraction=0.05, closing=3``,
      :func:`head_extractor`, 2 channels), the same anatomy whatever the contrast inside the
      head, but only its outline: the skull is placed where a target of that head shape has it.
      Those settings of the extractor found the heads of both domains of the MR -> CT case of
      ``benchmarks/crossmodal.py`` best (Dice 0.98 MR, 0.99 CT, against 0.99 and 0.95 for its
      defaults);
    * ``"foreground+rim"``: the head mask stacked with MIND-SSC (``sigma=mind_sigma``) on the rim
      of the head only (:class:`~plasticine.segmentation.RimExtractor`, within ``rim_depth``
      voxels of the outline; 6 channels in 2D, 14 in 3D). The scalp, the skull and the fluid
      around the brain are edges in MR and in CT alike, so the rim's self-similarity places the
      skull where the source has it; the inside of the brain (the T1 sulci, which CT does not
      show) is left out. On the MR -> CT case its traced segmentation was level with the head
      mask's within the spread between training runs (see :doc:`/benchmarks`);
    * ``"foreground+mind"``: :class:`~plasticine.segmentation.StackedExtractor` of the head mask and
      MIND-SSC (:class:`~plasticine.segmentation.MINDExtractor` with ``sigma=mind_sigma``; 4
      channels in 2D, 12 in 3D): more anatomy inside the head, for domains whose internal
      structure corresponds (T1 -> PD); from MR to CT it carries the sulci into the bone;
    * ``"mind"``: MIND-SSC alone;
    * ``"kmeans"``: :class:`~plasticine.segmentation.KMeansExtractor` ``(classes, max_iter=50)``,
      classes ranked by intensity (the demo's; it changes meaning when the contrast inverts);
    * ``"potts"``: :class:`~plasticine.segmentation.PottsExtractor` ``()`` (the paper's two classes).

    The registration (``registration``):

    * ``"learned"`` (default): the paper's network, trained in stage 2 on (source, target) pairs
      and predicting :math:`\phi` from the source alone;
    * ``"population"``: :class:`~plasticine.registration.PopulationRegistration` on the grid
      ``shape``, one deformation for every image, the registration of the mean source to the mean
      target (stage 2 fits it, no network). For unpaired sets whose subjects vary alike in both
      domains and differ by a systematic change (the T1 -> PD case of ``benchmarks/crossmodal.py``:
      ventricle Dice above 0.9 where the learned network, trained on randomly drawn targets, pulls
      every source towards the average subject; see :doc:`/benchmarks`).

    The default generates the target domain from pure noise (``start_fraction=1``) in the
    geometry of the warped source (``start="warped"``), the data mapped from ``data_range`` to
    :math:`[-1, 1]` inside the diffusion and :math:`\hat x_0` predicted directly and clipped to
    :math:`[-1, 1]` at every step. The demo's translator (:func:`plasticine.demo.build_demo_translator`)
    is this one with ``structure="foreground+mind", mind_sigma=1.0, registration="population"``,
    the recipe of the T1 -> PD case. ``structure="kmeans", prediction="eps", data_range=None,
    clip=False, start="source"`` gives the paper's settings (its unwarped start, its eps
    parametrisation).

    Args:
        ndim: 2 or 3 spatial dimensions.
        channels: image channels.
        structure: one of :data:`STRUCTURES`.
        classes: k-means classes (``structure="kmeans"``).
        mind_sigma: patch width (pixels) of MIND-SSC (``"mind"``, ``"foreground+mind"``,
            ``"foreground+rim"``).
        rim_depth: depth of the rim in voxels (``"foreground+rim"``), >= 1.
        prediction: the denoiser's output, ``"eps"`` (the paper), ``"x0"`` or ``"v"``
            (the sampler's ``prediction``, used in training too).
        data_range: intensity range mapped to :math:`[-1, 1]` inside the diffusion, or None.
        clip: clip :math:`\hat x_0` to :math:`[-1, 1]` at every sampler step.
        start: ``"warped"`` (noised :math:`x \circ \phi`, the condition's geometry) or
            ``"source"`` (noised :math:`x`, the paper's).
        start_fraction: default start step as a fraction of ``K``, in [0, 1].
        sampler_steps: DDIM steps.
        seed: seed of the initial weights.
        registration: ``"learned"`` or ``"population"``.
        shape: the image grid, needed by (and only by) ``registration="population"``.

    Returns:
        A :class:`~plasticine.translator.TraceableTranslator`, in training mode.

    Raises:
        ValueError: naming the argument, for any setting outside the above (before anything is
            built).

    Shape:
        Not applicable.
    """
    from .core.validate import check_int, check_interval, check_number, check_option
    from .diffusion import DDIMSampler, LinearSchedule
    from .diffusion.conditioning import ConcatConditioning
    from .diffusion.prediction import PREDICTIONS
    from .diffusion.unet import ConditionalUNet, UNetConfig
    from .registration import ScalingAndSquaring
    from .registration.network import LearnedRegistration, RegistrationNet, RegistrationNetConfig
    from .registration.population import PopulationRegistration
    from .segmentation import KMeansExtractor, MINDExtractor, PottsExtractor, RimExtractor, StackedExtractor

    if ndim not in (2, 3) or isinstance(ndim, bool):
        raise ValueError(f"ndim: expected 2 or 3, got {ndim!r}")
    check_int(channels, "channels", 1)
    check_option(structure, "structure", STRUCTURES)
    check_int(classes, "classes", 1)
    check_number(mind_sigma, "mind_sigma", 0, min_open=True)
    check_number(rim_depth, "rim_depth", 1)
    check_option(prediction, "prediction", PREDICTIONS)
    data_range = check_interval(data_range, "data_range")
    if not isinstance(clip, bool):
        raise ValueError(f"clip: expected True or False, got {clip!r}")
    check_option(start, "start", ("warped", "source"))
    check_number(start_fraction, "start_fraction", 0, 1)
    check_int(sampler_steps, "sampler_steps", 1)
    check_int(seed, "seed")
    check_option(registration, "registration", ("learned", "population"))
    if (registration == "population") != (shape is not None):
        raise ValueError(f"shape: expected the image grid with registration='population' and None otherwise, got {shape!r} with registration={registration!r}")
    if shape is not None and (not isinstance(shape, (tuple, list)) or len(shape) != ndim or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 2 for s in shape)):
        raise ValueError(f"shape: expected {ndim} ints >= 2 (ndim={ndim}), got {shape!r}")

    parts = {
        "kmeans": lambda: KMeansExtractor(classes, max_iter=50),
        "foreground": head_extractor,
        "mind": lambda: MINDExtractor(sigma=mind_sigma),
        "foreground+mind": lambda: StackedExtractor([head_extractor(), MINDExtractor(sigma=mind_sigma)]),
        "foreground+rim": lambda: StackedExtractor([head_extractor(), RimExtractor(MINDExtractor(sigma=mind_sigma), rim_depth, head_extractor())]),
        "potts": lambda: PottsExtractor(),
    }
    extractor = parts[structure]()
    labels = extractor.num_channels(ndim) if hasattr(extractor, "num_channels") else extractor.num_classes
    torch.manual_seed(seed)
    net = RegistrationNet(
        RegistrationNetConfig(spatial_dims=ndim, image_channels=channels, cue_channels=channels, features=16, encoder=(16, 32, 32, 32), align_channels=16, align_layers=3)
    )
    unet = ConditionalUNet(UNetConfig(ndim=ndim, in_channels=channels, cond_channels=labels, base_channels=16, channel_mults=(1, 2, 2), attention_levels=()))
    backend = LearnedRegistration(net, ScalingAndSquaring(7)) if shape is None else PopulationRegistration(tuple(shape))
    return TraceableTranslator(
        extractor,
        backend,
        unet,
        LinearSchedule(),
        DDIMSampler(sampler_steps, prediction=prediction, clip=(-1.0, 1.0) if clip else None),
        ConcatConditioning(labels),
        start_fraction=start_fraction,
        data_range=data_range,
        start=start,
    )


@dataclass(frozen=True)
class TrainingRecipe:
    """Settings of :func:`train_translator`.

    Attributes:
        diffusion_steps: optimizer steps of the denoiser (stage 1).
        registration_steps: optimizer steps of the registration network (stage 2).
        batch_size: images per optimizer step.
        learning_rate: Adam's learning rate, both stages.
        seed: seed of the batches and the noise (stage 2 uses ``seed + 1``).
        ema_decay: decay of the denoiser's weight average, copied into the denoiser after stage 1
            (None: no average).
        checkpoint_every: steps between training checkpoints (0: only at the end of a stage).
        progress: see :class:`~plasticine.training.TrainConfig`.
        augmentation: random flips, small affine maps and intensity jitter of every batch
            (:class:`~plasticine.training.Augmentation`; a condition gets its image's geometry), or
            None. Not recorded in the training checkpoints: resume with the same value.
        snr_gamma: min-SNR loss weighting of stage 1 (:func:`~plasticine.diffusion.noise_prediction_loss`),
            or None (the paper's: unweighted). The data range and the parametrisation are the
            translator's own (its ``data_range`` and its sampler's ``prediction``).
        patch_size: train on one random patch of this size per image and step
            (:func:`~plasticine.core.patches.random_patches`; one integer or one per spatial axis),
            for volumes too large for a whole-image batch; None: whole images. See
            :func:`train_translator`.
        spacing: voxel size in mm per spatial axis (tensor order) of the training images, for
            the smoothness term of stage 2 in mm (``GradientSmoothness(spacing)``, see
            :mod:`plasticine.losses.regularizers`); None: in voxels (``plasticine train`` takes
            it from the images' affines when they share one, :func:`plasticine.io.voxel_spacing`).
        contrast: in stage 1, condition each target on the structure map of a randomly remapped
            copy of it (:class:`~plasticine.training.ContrastRandomization`, on the translator's
            ``data_range``), so that the denoiser reads maps of other contrasts (the source's)
            as it reads the target's own; or None (the paper's: the target's own map). Drawn
            after ``augmentation``; with ``patch_size``, on the whole image, whose map is then
            cut. Needs the translator's ``data_range``; not with given ``conditions``. On the T1 -> PD case of
            ``benchmarks/crossmodal.py`` it raised the SSIM of the translation in the brain
            from 0.770 to 0.856 (see :doc:`/benchmarks`).

    Shape:
        Not applicable.
    """

    diffusion_steps: int = 2000
    registration_steps: int = 2000
    batch_size: int = 4
    learning_rate: float = 1e-3
    seed: int = 0
    ema_decay: float | None = None
    checkpoint_every: int = 100
    progress: Progress = "auto"
    augmentation: Augmentation | None = None
    snr_gamma: float | None = None
    patch_size: int | tuple[int, ...] | None = None
    spacing: tuple[float, ...] | None = None
    contrast: ContrastRandomization | None = None

    def __post_init__(self) -> None:
        if self.contrast is not None and not isinstance(self.contrast, ContrastRandomization):
            raise ValueError(f"TrainingRecipe.contrast: expected None or a ContrastRandomization, got {self.contrast!r}")
        if self.spacing is not None:
            if not isinstance(self.spacing, (tuple, list)) or len(self.spacing) not in (2, 3):
                raise ValueError(f"TrainingRecipe.spacing: expected None or 2 or 3 positive finite voxel sizes (one per spatial axis), got {self.spacing!r}")
            object.__setattr__(self, "spacing", spacing_tuple(self.spacing, len(self.spacing), "TrainingRecipe.spacing"))


def train_translator(
    translator: TraceableTranslator,
    source: torch.Tensor | Sequence[torch.Tensor],
    target: torch.Tensor | Sequence[torch.Tensor],
    recipe: TrainingRecipe = TrainingRecipe(),
    *,
    checkpoint_prefix: str | os.PathLike[str] | None = None,
    conditions: torch.Tensor | None = None,
    paired: bool = False,
) -> dict[str, dict[str, float]]:
    r"""Train the translator's denoiser, then its registration network (in place).

    Stage 1 minimises :func:`~plasticine.training.diffusion_objective` over batches of ``target``
    (the condition of :math:`y` is :math:`\mathrm{conditioning}(\mathrm{structure}(y))`); with
    ``conditions``, item ``i`` of ``target`` is conditioned on ``conditions[i]`` instead. Stage 2
    minimises :func:`~plasticine.training.deformation_objective` with the denoiser frozen, over
    (source, target) pairs: ``source[i]`` with a target drawn for it by
    :class:`~plasticine.io.UnpairedImages`, or with ``target[i]`` when ``paired``. A
    :class:`~plasticine.registration.PopulationRegistration` has no network: stage 2 is its
    :meth:`~plasticine.registration.PopulationRegistration.fit` on the two sets (no steps, no
    pairs), and its losses are the fitted field's displacement sizes.

    With ``recipe.patch_size``, every step sees one random patch of each image
    (:func:`~plasticine.core.patches.random_patches`), augmented after cutting. Stage 1 cuts the
    image together with its structure map, computed once on the *whole* image (or with its given
    condition), so the denoiser learns the condition that :class:`~plasticine.diffusion.PatchwiseDenoiser`
    hands it at translation, a patch of the whole image's map; stage 2 cuts source and target at
    the same corner (corresponding anatomy of roughly aligned volumes; the noise cue of a target
    patch is computed on the patch, and translation does not use it).

    Args:
        translator: the translator to train (its denoiser and registration network).
        source: source-domain images.
        target: target-domain images.
        recipe: the settings.
        checkpoint_prefix: write (and resume from) ``<prefix>.diffusion-state.pt`` and
            ``<prefix>.registration-state.pt``; None: no training checkpoints.
        conditions: precomputed conditions of the targets, or None (their own structure maps).
        paired: pair ``source[i]`` with ``target[i]`` in stage 2 (needs as many of each).

    Returns:
        The last logged losses of each stage: ``{"denoiser": {...}, "registration": {...}}``. The
        translator ends in evaluation mode.

    Raises:
        ValueError: for fewer images than ``batch_size``, unmatched ``paired`` / ``conditions``, a
            ``spacing`` of another dimension than the images, or a ``patch_size`` larger than an image.

    Shape:
        source, target: ``(n, C, *S)`` (or sequences of ``(C, *S)``); conditions: ``(n_target,
        L, *S)``.
    """
    from .io import UnpairedImages

    for name, data in (("source", source), ("target", target)):
        if len(data) < recipe.batch_size:
            raise ValueError(f"{name}: {len(data)} image(s), fewer than the batch size {recipe.batch_size}")
    if paired and len(source) != len(target):
        raise ValueError(f"paired: expected as many sources as targets, got {len(source)} and {len(target)}")
    if conditions is not None and len(conditions) != len(target):
        raise ValueError(f"conditions: expected one per target ({len(target)}), got {len(conditions)}")
    contrast = recipe.contrast
    if contrast is not None:
        if translator.data_range is None:
            raise ValueError("recipe.contrast: expected a translator with a data_range (the remaps act on it), got data_range=None")
        if conditions is not None:
            raise ValueError("recipe.contrast: expected the targets' own maps, got it with given conditions")
    n_spatial = source[0].dim() - 1
    if recipe.spacing is not None and len(recipe.spacing) != n_spatial:
        raise ValueError(f"recipe.spacing: expected {n_spatial} voxel sizes (one per spatial axis of the images), got {recipe.spacing}")

    def state(stage: str) -> str | None:
        return None if checkpoint_prefix is None else f"{os.fspath(checkpoint_prefix)}.{stage}-state.pt"

    def settings(steps: int, seed: int, name: str, **extra: Any) -> TrainConfig:
        return TrainConfig(
            steps=steps,
            checkpoint_path=state("diffusion" if name == "denoiser" else name),
            checkpoint_every=recipe.checkpoint_every,
            seed=seed,
            progress=recipe.progress,
            log_every=max(1, steps // 10),
            name=name,
            **extra,
        )

    unet = translator.denoiser
    aug = recipe.augmentation
    patch = recipe.patch_size
    if patch is not None:
        from .core.patches import patch_grid

        for name, data in (("source", source), ("target", target)):
            for i in range(len(data)):
                try:
                    patch_grid(tuple(data[i].shape[1:]), patch)
                except ValueError as err:
                    raise ValueError(f"patch_size: {name}[{i}] of spatial size {tuple(data[i].shape[1:])}: {err}") from err
        if contrast is not None:  # the maps of whole remapped images, drawn at each step
            from_maps = True
        elif conditions is None:  # the maps of whole images, cut with them
            with torch.no_grad():
                conditions = torch.stack([translator.structure_map(y[None])[0] for y in target])
            from_maps = True
        else:
            from_maps = False
    if patch is not None:
        from .core.patches import random_patches

        def objective(m: Any, b: Any, g: torch.Generator) -> torch.Tensor:
            if contrast is None:
                whole, maps = b
            else:
                whole = b
                with torch.no_grad():
                    maps = translator.structure_map(contrast(whole, g, translator.data_range))
            y, c = random_patches(whole, patch, g, (maps,))
            if aug is not None:
                y, c = aug(y, g, (c,))
            condition = translator.conditioning(c) if from_maps else c
            return diffusion_objective(translator, y, g, denoiser=m, snr_gamma=recipe.snr_gamma, condition=condition)

        items: Any = target if contrast is not None else list(zip(target, conditions))
    elif conditions is None:

        def objective(m: Any, y: torch.Tensor, g: torch.Generator) -> torch.Tensor:
            if aug is not None:
                (y,) = aug(y, g)
            condition = None
            if contrast is not None:
                with torch.no_grad():
                    condition = translator.conditioning(translator.structure_map(contrast(y, g, translator.data_range)))
            return diffusion_objective(translator, y, g, denoiser=m, snr_gamma=recipe.snr_gamma, condition=condition)

        items = target
    else:

        def objective(m: Any, b: Any, g: torch.Generator) -> torch.Tensor:
            y, c = b if aug is None else aug(b[0], g, (b[1],))
            return diffusion_objective(translator, y, g, denoiser=m, snr_gamma=recipe.snr_gamma, condition=c)

        items = list(zip(target, conditions))

    regularizer = None if recipe.spacing is None else GradientSmoothness(recipe.spacing)

    def registration_objective(m: Any, b: Any, g: torch.Generator) -> Any:
        x, y = b
        if patch is not None:
            x, y = random_patches(x, patch, g, (y,))
        if aug is not None:
            (x,), (y,) = aug(x, g), aug(y, g)
        return deformation_objective(translator, x, y, g, network=m, regularizer=regularizer)

    stage1 = Trainer(
        objective,
        unet,
        torch.optim.Adam(unet.parameters(), recipe.learning_rate),
        ShuffledBatches(items, recipe.batch_size, seed=recipe.seed),
        settings(recipe.diffusion_steps, recipe.seed, "denoiser", ema_decay=recipe.ema_decay),
    )
    losses = {"denoiser": stage1.fit()}
    if stage1.ema is not None:
        stage1.ema.copy_to(unet)
    unet.eval()
    from .registration.population import PopulationRegistration

    if isinstance(translator.registration, PopulationRegistration):
        losses["registration"] = translator.registration.fit(source, target)
        translator.eval()
        return losses
    net = translator.registration.network
    pairs: Any = list(zip(source, target)) if paired else UnpairedImages(source, target, seed=recipe.seed)
    losses["registration"] = Trainer(
        registration_objective,
        net,
        torch.optim.Adam(net.parameters(), recipe.learning_rate),
        ShuffledBatches(pairs, recipe.batch_size, seed=recipe.seed + 1),
        settings(recipe.registration_steps, recipe.seed + 1, "registration"),
    ).fit()
    translator.eval()
    return losses
