r"""The paper's evaluation on any data set: traced segmentation (Table I) and distribution metrics (Table III).

:func:`evaluate_translation` takes source images with their labels, target images with their labels
and a trained :class:`~plasticine.translator.TraceableTranslator`, and

1. trains a segmentation U-Net on the targets (:func:`train_segmenter`), or uses the one given;
2. turns every source into an image for that network by each method of :func:`translate_methods`
   (:data:`METHODS`):

   * ``"no translation"``: the source itself;
   * ``"plasticine, phi = identity"``: the translator with the identity registration
     (:class:`~plasticine.registration.IdentityRegistration`): intensities only, nothing to trace;
   * ``"register, then translate"``: the paper's "combination": the source warped by the learned
     :math:`\phi` first, then translated with :math:`\phi = \mathrm{id}`; its mask is traced back
     with :math:`\phi^{-1}`;
   * ``"DDIB"``: :class:`~plasticine.diffusion.DDIBTranslator` of two condition-free models, one per
     domain (:func:`train_ddib`: the translator's architecture with the default translator's
     parametrisation, x0 prediction on the data range mapped to [-1, 1] and clipped there, so
     that its images stay in the data range; :class:`DDIBBaseline`), joined by deterministic DDIM
     encoding and decoding; no deformation (skipped when ``ddib_steps = 0`` and no model is given);
   * ``"plasticine, traced"``: :meth:`~plasticine.translator.TraceableTranslator.translate`; the
     mask predicted on :math:`\hat y` is traced back as :math:`m \circ \phi^{-1}`
     (:meth:`~plasticine.core.Deformation.labels_to_source`);

3. segments each image, brings the mask into the source's geometry and scores it against the
   source's labels (:func:`segmentation_scores`);
4. computes the distribution metrics of each method (:func:`distribution_metrics`).

**Table I columns** (:func:`summarize`), per method, the mean over the cases:

* per class :math:`c`: the class accuracy :math:`|P_c \cap T_c| / |T_c|`
  (:func:`~plasticine.segmentation.accuracy`), Dice, IoU and HD95
  (:func:`~plasticine.segmentation.hausdorff95`, in voxels, and in mm when ``spacing`` is given);
* averaged: the pixel accuracy (fraction of all voxels labelled correctly), the mean Dice and mean
  HD95 over the foreground classes ``1 .. L-1``, and the mean IoU over all classes (background
  included, as the mIoU of segmentation benchmarks).

Empty masks: a class absent from both masks of a case leaves that case out of the class's means
(``empty="nan"``; a class absent everywhere has no value, written ``null``). A class present in only
one of the two has Dice, IoU and accuracy 0 and an undefined HD95 (the distance to an empty set,
:math:`\infty`); HD95 means are taken over the cases where it is finite, and ``hd95_undefined``
counts the (case, class) pairs left out, so a method that misses structures cannot look better by
its HD95 alone.

**Distribution metrics**, per method (the numbers of the paper's Table III):

* ``bhattacharyya``: :func:`~plasticine.metrics.bhattacharyya_distance` between the histogram of the
  method's images inside the head (pooled over the cases) and that of the target images inside
  theirs; ``bins`` equal bins on ``value_range`` plus one bin below and one above
  (:func:`~plasticine.metrics.intensity_histogram`). The head is
  :func:`~plasticine.recipes.head_extractor`'s mask of each image's source (warped by
  :math:`\phi` for the images in the target geometry) and of each target image;
* ``nmi``: :func:`~plasticine.metrics.normalized_mutual_information` (``bins`` bins) of the source in
  the image's geometry and the image, inside that head, mean over cases: how much of the source's
  structure the image keeps (2 for a one-to-one intensity map, 1 for none);
* ``frechet`` and ``simplified_frechet``: :func:`~plasticine.metrics.frechet_distance` and
  :func:`~plasticine.metrics.simplified_frechet_distance` between the features of the method's
  images and those of the target images, from the ``extractor`` passed in; the default is
  :class:`~plasticine.metrics.RandomFeatures` (a fixed random-weight network, seed 0: no trained
  weights, so comparable only between runs with the same extractor, not with published FIDs).
  Single-channel 2D images only, at least 2 of each (a covariance), of at least 16 pixels per axis
  for the default (``null`` otherwise);
* with a paired ``truth`` (the true target-domain image of each source, in the geometry the
  translation should have): ``mae``, ``psnr`` (peak: the width of ``value_range``) and ``ssim``
  (:func:`~plasticine.metrics.mae`, :func:`~plasticine.metrics.psnr`,
  :func:`~plasticine.metrics.ssim`) inside the truth's head mask, mean over cases.

Seeds (all recorded): the segmentation network's weights and batches ``seed + 10``; the
translation of case ``i`` ``seed + 20 + i`` (every method of a case draws from a fresh generator
with that seed); the DDIB models ``seed + 30`` (source) and ``seed + 31`` (target).

Progress: every long step (segmentation and DDIB training, the cases) reports on stderr, one line
updated in place, unless ``progress=False``.
"""

from __future__ import annotations

import io
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .core import folding_fraction
from .core.deformation import Deformation
from .core.shapes import check_shape
from .core.validate import check_int, check_number
from .translator import TraceableTranslator

__all__ = [
    "METHODS",
    "EvaluationSettings",
    "Evaluation",
    "MethodOutput",
    "evaluate_translation",
    "train_segmenter",
    "DDIBBaseline",
    "train_ddib",
    "translate_methods",
    "segment",
    "segmentation_scores",
    "summarize",
    "distribution_metrics",
    "draw_grid",
    "translation_figure",
    "format_tables",
]

#: The methods of the evaluation, in the order of the tables.
METHODS: tuple[str, ...] = (
    "no translation",
    "plasticine, phi = identity",
    "register, then translate",
    "DDIB",
    "plasticine, traced",
)


@dataclass(frozen=True)
class EvaluationSettings:
    """Settings of :func:`evaluate_translation`.

    Attributes:
        segmentation_steps: training steps of the segmentation U-Net (ignored when one is given).
        segmentation_width: its first-level channels.
        segmentation_depth: its number of poolings.
        ddib_steps: training steps of each DDIB model; 0 skips DDIB (unless a model is given).
        ddib_sampler_steps: DDIM steps each way of the DDIB translation.
        batch_size: images per training step (segmentation and DDIB).
        learning_rate: Adam's, for both.
        seed: base seed (see the module notes for the offsets).
        bins: histogram bins of the Bhattacharyya distance and of NMI.
        value_range: the histogram range, the PSNR peak (its width) and the DDIB models' data range
            when the translator has none (:func:`train_ddib`).
        spacing: voxel size in mm per spatial axis (tensor order), for HD95 in mm; None: voxels only.
        progress: report every long step on stderr.

    Shape:
        Not applicable.
    """

    segmentation_steps: int = 400
    segmentation_width: int = 16
    segmentation_depth: int = 4
    ddib_steps: int = 400
    ddib_sampler_steps: int = 20
    batch_size: int = 4
    learning_rate: float = 1e-3
    seed: int = 0
    bins: int = 64
    value_range: tuple[float, float] = (0.0, 1.0)
    spacing: tuple[float, ...] | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("segmentation_steps", "segmentation_width", "segmentation_depth", "ddib_sampler_steps", "batch_size", "bins"):
            check_int(getattr(self, name), f"EvaluationSettings.{name}", 1)
        check_int(self.ddib_steps, "EvaluationSettings.ddib_steps", 0)
        check_int(self.seed, "EvaluationSettings.seed")
        check_number(self.learning_rate, "EvaluationSettings.learning_rate", 0, min_open=True)
        lo, hi = (float(v) for v in self.value_range)
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"EvaluationSettings.value_range: expected finite (low, high) with low < high, got {self.value_range!r}")
        if self.spacing is not None and not all(isinstance(s, (int, float)) and math.isfinite(s) and s > 0 for s in self.spacing):
            raise ValueError(f"EvaluationSettings.spacing: expected positive voxel sizes (mm) or None, got {self.spacing!r}")

    def seeds(self) -> dict[str, Any]:
        """The seeds every random draw of the evaluation uses.

        Returns:
            ``{"segmentation", "translation_of_case_0", "ddib_source", "ddib_target"}``; case ``i``
            uses ``translation_of_case_0 + i``.

        Shape:
            Not applicable.
        """
        s = self.seed
        return {"segmentation": s + 10, "translation_of_case_0": s + 20, "ddib_source": s + 30, "ddib_target": s + 31}


class _ProgressLine:
    """``label: i/n`` on stderr, rewritten in place; a final newline at :meth:`close`."""

    def __init__(self, label: str, total: int, enabled: bool) -> None:
        self.label, self.total, self.enabled, self.start = label, total, enabled, time.perf_counter()

    def update(self, done: int, note: str = "") -> None:
        if self.enabled:
            extra = f" {note}" if note else ""
            print(f"\r{self.label}: {done}/{self.total} ({time.perf_counter() - self.start:.0f} s){extra}   ", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled:
            print(file=sys.stderr, flush=True)


def _check_labels(labels: torch.Tensor, images: torch.Tensor, num_classes: int, name: str) -> torch.Tensor:
    """Integer labels ``(n, 1, *S)`` in ``0 .. L-1`` matching ``images`` ``(n, C, *S)``."""
    check_shape(labels, "B 1 *S", name, bindings={"B": images.shape[0], "S": tuple(images.shape[2:])})
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"{name}: expected an integer label tensor, got dtype {labels.dtype}")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"{name}: expected labels in [0, {num_classes - 1}] (num_classes={num_classes}), found [{lo}, {hi}]")
    return labels.to(torch.int64)


def _check_images(images: torch.Tensor, name: str) -> torch.Tensor:
    check_shape(images, "B C *S", name, floating=True)
    if images.dim() not in (4, 5):
        raise ValueError(f"{name}: expected 2D or 3D images (n, C, H, W) or (n, C, D, H, W), got shape {tuple(images.shape)}")
    if not bool(torch.isfinite(images).all()):
        raise ValueError(f"{name}: expected finite values, found {int((~torch.isfinite(images)).sum())} NaN or infinite")
    return images


def train_segmenter(images: torch.Tensor, labels: torch.Tensor, num_classes: int, settings: EvaluationSettings = EvaluationSettings()) -> nn.Module:
    """Train the evaluation's segmentation U-Net on (target) images and their labels.

    A :class:`~plasticine.segmentation.SegmentationUNet` of ``settings.segmentation_depth`` poolings
    and ``settings.segmentation_width`` first-level channels, initialised and trained
    (:func:`~plasticine.segmentation.train_segmentation`: Adam, random flips, Dice + cross-entropy)
    from one generator seeded ``settings.seed + 10``.

    Args:
        images: the training images.
        labels: their integer labels.
        num_classes: classes ``L``, background included.
        settings: steps, width, depth, batch size, learning rate, seed, progress.

    Returns:
        The trained network, in evaluation mode.

    Raises:
        ValueError: for mismatched shapes or labels outside ``0 .. L-1``.

    Shape:
        images: ``(n, C, *S)``; labels: ``(n, 1, *S)``; the network maps ``(B, C, *S)`` to ``(B, L, *S)`` logits.
    """
    from .segmentation import SegmentationUNet, SegmentationUNetConfig, train_segmentation

    images = _check_images(images, "images")
    check_int(num_classes, "num_classes", 2)
    labels = _check_labels(labels, images, num_classes, "labels")
    g = torch.Generator().manual_seed(settings.seeds()["segmentation"])
    config = SegmentationUNetConfig(depth=settings.segmentation_depth, base_width=settings.segmentation_width)
    net = SegmentationUNet(images.shape[1], num_classes, images.dim() - 2, config, generator=g).to(images.device)
    bar = _ProgressLine("segmentation U-Net", settings.segmentation_steps, settings.progress)
    train_segmentation(
        net, images, labels, settings.segmentation_steps, g, batch_size=settings.batch_size, lr=settings.learning_rate, callback=lambda step, loss: bar.update(step, f"loss {loss:.4g}")
    )
    bar.close()
    return net.eval()


class DDIBBaseline(nn.Module):
    r"""The DDIB baseline in image space: its own data range around a :class:`~plasticine.diffusion.DDIBTranslator`.

    .. math::

        \hat y = l + \tfrac{h - l}{2}\,\big(D_t(E_s(2 (x - l)/(h - l) - 1)) + 1\big)

    for ``data_range = (l, h)``: the images are mapped onto :math:`[-1, 1]`, bridged by the
    deterministic DDIM encoding (source model) and decoding (target model) of ``bridge``, and mapped
    back. With the bridge's ``clip = (-1, 1)`` on the data prediction of an ``"x0"`` model, every
    decoded value lies in ``[l, h]`` (the last DDIM step returns the clipped prediction itself).

    Args:
        bridge: the :class:`~plasticine.diffusion.DDIBTranslator` of the two condition-free models.
        data_range: ``(low, high)`` of the images, ``low < high``.

    Raises:
        ValueError: for a bridge that is not a DDIBTranslator or a bad range.

    Shape:
        x: ``(B, C, *S)``; out: ``(B, C, *S)``.
    """

    def __init__(self, bridge: nn.Module, data_range: tuple[float, float]) -> None:
        from .core.validate import check_interval
        from .diffusion import DDIBTranslator

        super().__init__()
        if not isinstance(bridge, DDIBTranslator):
            raise ValueError(f"bridge: expected a DDIBTranslator, got {type(bridge).__name__}")
        data_range = check_interval(data_range, "data_range")
        if data_range is None:
            raise ValueError("data_range: expected (low, high) with low < high, got None")
        self.bridge, self.data_range = bridge, data_range

    @property
    def steps(self) -> int:
        """The DDIM steps each way of the bridge.

        Shape:
            Not applicable.
        """
        return int(self.bridge.steps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Translate source images (in ``data_range``) to the target domain.

        Args:
            x: source images.

        Returns:
            The translations, in the data range's units.

        Shape:
            x: ``(B, C, *S)``; out: ``(B, C, *S)``.
        """
        low, high = self.data_range
        y = self.bridge(2.0 * (x - low) / (high - low) - 1.0)
        return low + (y + 1.0) * (high - low) / 2.0

    def extra_repr(self) -> str:
        """The data range, for ``repr``.

        Shape:
            Not applicable.
        """
        return f"data_range={self.data_range!r}"


def train_ddib(translator: TraceableTranslator, source: torch.Tensor, target: torch.Tensor, settings: EvaluationSettings = EvaluationSettings()) -> DDIBBaseline:
    r"""The DDIB baseline: two condition-free denoisers, one per domain, parametrised as the default translator's.

    Each model is the translator's denoiser architecture (:class:`~plasticine.diffusion.ConditionalUNet`
    with its :class:`~plasticine.diffusion.UNetConfig`) without a condition (``cond_channels=0``),
    trained for ``settings.ddib_steps`` steps with :func:`~plasticine.diffusion.noise_prediction_loss`
    (L1, the translator's schedule) by a :class:`~plasticine.training.Trainer`; seeds ``seed + 30``
    (source) and ``seed + 31`` (target) for the initial weights and the batches.

    The parametrisation is that of :func:`~plasticine.recipes.build_translator`'s default, whatever
    the translator's own: the models predict :math:`\hat x_0` directly (``"x0"``), on the images
    mapped from the data range :math:`[l, h]` onto :math:`[-1, 1]`, and the prediction is clipped to
    :math:`[-1, 1]` at every DDIM step, so that a decoded image stays inside :math:`[l, h]`. The data
    range is the translator's ``data_range``, or ``settings.value_range`` when it has none (an
    eps-parametrised translator on raw intensities, as the demo's: its two models, trained from pure
    noise without clipping, would decode mostly outside the data range).

    Args:
        translator: gives the denoiser architecture, the schedule and the data range.
        source: source-domain images.
        target: target-domain images.
        settings: steps, sampler steps, batch size, learning rate, seed, value range, progress.

    Returns:
        The :class:`DDIBBaseline` (in evaluation mode): a
        :class:`~plasticine.diffusion.DDIBTranslator` with ``settings.ddib_sampler_steps`` steps each
        way, ``prediction="x0"`` and ``clip=(-1, 1)``, inside the data range's mapping.

    Raises:
        ValueError: for a translator whose denoiser is not a ``ConditionalUNet``, ``ddib_steps = 0`` or
            fewer images than the batch size.

    Shape:
        source: ``(n, C, *S)``; target: ``(m, C, *S)``.
    """
    from dataclasses import replace

    from .diffusion import ConditionalUNet, DDIBTranslator, noise_prediction_loss
    from .training import ShuffledBatches, TrainConfig, Trainer

    if settings.ddib_steps < 1:
        raise ValueError("settings.ddib_steps: expected at least 1 step to train the DDIB models, got 0")
    config = getattr(translator.denoiser, "settings", None)
    if not isinstance(translator.denoiser, ConditionalUNet):
        raise ValueError(f"translator: DDIB copies the denoiser's architecture, expected a ConditionalUNet, got {type(translator.denoiser).__name__}")
    low, high = (float(v) for v in (translator.data_range if translator.data_range is not None else settings.value_range))
    seeds = settings.seeds()
    models = []
    for name, images, seed in (("DDIB source model", source, seeds["ddib_source"]), ("DDIB target model", target, seeds["ddib_target"])):
        images = _check_images(images, name)
        if len(images) < settings.batch_size:
            raise ValueError(f"{name}: {len(images)} image(s), fewer than the batch size {settings.batch_size} (lower the batch size or skip DDIB)")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = ConditionalUNet(replace(config, cond_channels=0)).to(images.device)

        def objective(m: Any, y: torch.Tensor, g: torch.Generator) -> torch.Tensor:
            return noise_prediction_loss(m, translator.schedule, 2.0 * (y - low) / (high - low) - 1.0, None, g, "l1", prediction="x0")

        Trainer(
            objective,
            model,
            torch.optim.Adam(model.parameters(), settings.learning_rate),
            ShuffledBatches(list(images), settings.batch_size, seed=seed),
            TrainConfig(steps=settings.ddib_steps, seed=seed, progress="auto" if settings.progress else "none", log_every=max(1, settings.ddib_steps // 10), name=name),
        ).fit()
        models.append(model.eval())
    bridge = DDIBTranslator(models[0], models[1], translator.schedule, settings.ddib_sampler_steps, prediction="x0", clip=(-1.0, 1.0))
    return DDIBBaseline(bridge, (low, high)).eval()


@dataclass
class MethodOutput:
    """One method's image for the segmentation network, and the map that brings its mask back.

    Attributes:
        image: the image given to the segmentation network.
        deformation: :math:`\\phi` when the image lives in the target geometry (its mask is traced
            back with :math:`\\phi^{-1}`), None when it lives in the source's.

    Shape:
        image: ``(B, C, *S)``; deformation: ``(B, N, *S)`` displacements.
    """

    image: torch.Tensor
    deformation: Deformation | None


def translate_methods(translator: TraceableTranslator, x: torch.Tensor, *, seed: int, ddib: nn.Module | None = None) -> dict[str, MethodOutput]:
    r"""Every composed method's image of the sources ``x`` (see the module notes), in :data:`METHODS` order.

    Each translation draws from a fresh ``torch.Generator`` seeded ``seed`` on the device of
    ``x``, so that the methods differ by their composition only. ``"DDIB"`` is present when
    ``ddib`` is given: ``ddib(x)``, a module that maps source images to target images in the
    images' own units (the :class:`DDIBBaseline` of :func:`train_ddib`).

    Args:
        translator: the trained translator.
        x: source images.
        seed: seed of every method's generator.
        ddib: a :class:`DDIBBaseline` (:func:`train_ddib`) or any module from source to target images, or None.

    Returns:
        ``{method: MethodOutput}``.

    Shape:
        x: ``(B, C, *S)``; every image: ``(B, C, *S)``.
    """

    def gen() -> torch.Generator:
        return torch.Generator(x.device).manual_seed(seed)

    from .registration import IdentityRegistration

    identity = translator.replace(registration=IdentityRegistration())
    out = {"no translation": MethodOutput(x, None)}
    out["plasticine, phi = identity"] = MethodOutput(identity.translate(x, generator=gen()).image, None)
    result = translator.translate(x, generator=gen())
    phi = result.deformation
    out["register, then translate"] = MethodOutput(identity.translate(phi.to_target(x), generator=gen()).image, phi)
    if ddib is not None:
        with torch.no_grad():
            out["DDIB"] = MethodOutput(ddib(x), None)
    out["plasticine, traced"] = MethodOutput(result.image, phi)
    return out


def segment(net: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The labels a segmentation network predicts: the argmax of its logits, without gradients.

    Args:
        net: maps images to ``(B, L, *S)`` logits.
        images: the images.

    Returns:
        int64 labels.

    Shape:
        images: ``(B, C, *S)``; out: ``(B, 1, *S)``.
    """
    with torch.no_grad():
        return net(images).argmax(1, keepdim=True)


def segmentation_scores(prediction: torch.Tensor, truth: torch.Tensor, num_classes: int, *, spacing: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    r"""Per case and class: accuracy, Dice, IoU, HD95 (voxels, and mm with ``spacing``); per case: pixel accuracy.

    The scores of :mod:`plasticine.segmentation.metrics` with ``empty="nan"`` (a class absent from
    both masks of a case is NaN, left out of the means); HD95 is the pooled 95th percentile of the
    symmetric surface distances (:func:`~plasticine.segmentation.hausdorff95`), ``inf`` where the
    class is in one mask only.

    Args:
        prediction: predicted labels (in the truth's geometry).
        truth: true labels.
        num_classes: classes ``L``.
        spacing: voxel size (mm) per spatial axis, or None.

    Returns:
        float64 tensors ``"accuracy"``, ``"dice"``, ``"iou"``, ``"hd95"`` (and ``"hd95_mm"``) of shape
        ``(B, L)`` and ``"pixel_accuracy"`` of shape ``(B,)``.

    Shape:
        prediction, truth: ``(B, 1, *S)`` int64.
    """
    from .segmentation import accuracy, dice, hausdorff95, iou, pixel_accuracy

    out = {
        "accuracy": accuracy(prediction, truth, num_classes, empty="nan"),
        "dice": dice(prediction, truth, num_classes, empty="nan"),
        "iou": iou(prediction, truth, num_classes, empty="nan"),
        "hd95": hausdorff95(prediction, truth, num_classes, empty="nan"),
        "pixel_accuracy": pixel_accuracy(prediction, truth, num_classes),
    }
    if spacing is not None:
        out["hd95_mm"] = hausdorff95(prediction, truth, num_classes, spacing=tuple(spacing), empty="nan")
    return out


def _number(value: float) -> float | None:
    """A finite float, or None (JSON null) for an undefined mean."""
    value = float(value)
    return value if math.isfinite(value) else None


def _mean(values: torch.Tensor) -> float | None:
    """The mean of the finite entries (None when there is none)."""
    finite = values[torch.isfinite(values)]
    return _number(finite.mean()) if finite.numel() else None


def summarize(scores: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    r"""Table I of one method from the per-case scores of :func:`segmentation_scores`.

    Per class ``c`` (``"per_class"``, keyed by the class index as text): the means over the cases
    of accuracy, Dice, IoU (cases where ``c`` is absent from both masks left out), HD95 and HD95 in
    mm (finite cases only) and ``hd95_undefined``, the cases where ``c`` is in one mask only.
    Averaged (``"mean"``): ``accuracy``, the pixel accuracy's mean over cases; ``dice`` and
    ``hd95`` (``hd95_mm``), the means over the cases of each case's mean over the foreground classes
    ``1 .. L-1``; ``mean_iou``, the mean over the cases of each case's mean IoU over all classes;
    ``dice_std`` and ``mean_iou_std``, their standard deviations over the cases (population);
    ``hd95_undefined``, the foreground (case, class) pairs left out of ``hd95``.

    .. math::

        \mathrm{mDice} = \frac1B \sum_b \operatorname{nanmean}_{c \ge 1} \mathrm{Dice}_{bc},\qquad
        \mathrm{mIoU} = \frac1B \sum_b \operatorname{nanmean}_{c \ge 0} \mathrm{IoU}_{bc}.

    Args:
        scores: the output of :func:`segmentation_scores`.

    Returns:
        ``{"per_class": {...}, "mean": {...}, "cases": B}``, floats or None (undefined).

    Shape:
        scores: ``(B, L)`` tensors and ``(B,)`` pixel accuracy.
    """
    keys = [k for k in ("accuracy", "dice", "iou", "hd95", "hd95_mm") if k in scores]
    n_classes = scores["dice"].shape[1]
    per_class: dict[str, Any] = {}
    for c in range(n_classes):
        row = {k: (_mean(scores[k][:, c]) if k.startswith("hd95") else _number(torch.nanmean(scores[k][:, c]))) for k in keys}
        row["hd95_undefined"] = int(torch.isinf(scores["hd95"][:, c]).sum())
        per_class[str(c)] = row
    fg = slice(1, None)
    case_dice = torch.nanmean(scores["dice"][:, fg], dim=1)
    case_iou = torch.nanmean(scores["iou"], dim=1)
    mean: dict[str, Any] = {
        "accuracy": _number(scores["pixel_accuracy"].mean()),
        "dice": _number(torch.nanmean(case_dice)),
        "dice_std": _number(np.nanstd(case_dice.numpy())) if bool(torch.isfinite(case_dice).any()) else None,
        "mean_iou": _number(torch.nanmean(case_iou)),
        "mean_iou_std": _number(np.nanstd(case_iou.numpy())) if bool(torch.isfinite(case_iou).any()) else None,
    }
    for k in ("hd95", "hd95_mm"):
        if k in scores:
            h = scores[k][:, fg]
            finite = torch.where(torch.isfinite(h), h, torch.full_like(h, math.nan))
            mean[k] = _number(torch.nanmean(torch.nanmean(finite, dim=1))) if bool(torch.isfinite(finite).any()) else None
    mean["hd95_undefined"] = int(torch.isinf(scores["hd95"][:, fg]).sum())
    return {"per_class": per_class, "mean": mean, "cases": int(scores["dice"].shape[0])}


def distribution_metrics(
    images: torch.Tensor,
    heads: torch.Tensor,
    sources: torch.Tensor,
    targets: torch.Tensor,
    target_heads: torch.Tensor,
    *,
    bins: int = 64,
    value_range: tuple[float, float] = (0.0, 1.0),
    truth: torch.Tensor | None = None,
    truth_heads: torch.Tensor | None = None,
    extractor: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, Any]:
    r"""The distribution metrics of one method (see the module notes).

    .. math::

        D_B(p, q) = -\ln \sum_i \sqrt{p_i q_i},\qquad
        \mathrm{NMI}(a, b) = \frac{H(a) + H(b)}{H(a, b)},\qquad
        \mathrm{FD} = \lVert \mu_a - \mu_b \rVert^2 + \operatorname{tr}\big(\Sigma_a + \Sigma_b - 2 (\Sigma_a \Sigma_b)^{1/2}\big).

    Args:
        images: the method's images.
        heads: their head masks (bool).
        sources: the sources in the images' geometry (for NMI).
        targets: the target-domain images (the reference distribution).
        target_heads: their head masks (bool).
        bins: histogram bins (Bhattacharyya and NMI).
        value_range: histogram range; its width is the PSNR peak.
        truth: the paired true target-domain images, or None.
        truth_heads: their head masks (bool), with ``truth``.
        extractor: feature extractor for the Frechet distances (None: ``RandomFeatures()``).

    Returns:
        ``bhattacharyya``, ``nmi``, ``frechet``, ``simplified_frechet`` (None where not applicable),
        and with ``truth`` ``mae``, ``psnr``, ``ssim``.

    Shape:
        images, sources, truth: ``(B, C, *S)``; heads, truth_heads: ``(B, 1, *S)``; targets:
        ``(M, C, *S')``; target_heads: ``(M, 1, *S')``.
    """
    from . import metrics as m

    lo, hi = value_range
    hist = m.intensity_histogram(images[heads.expand_as(images)].cpu().numpy(), bins, value_range)
    ref = m.intensity_histogram(targets[target_heads.expand_as(targets)].cpu().numpy(), bins, value_range)
    out: dict[str, Any] = {
        "bhattacharyya": _number(m.bhattacharyya_distance(hist, ref)),
        "fraction_outside_range": float(hist[-2:].sum()),
        "nmi": _number(m.normalized_mutual_information(sources, images, bins, heads).mean()),
    }
    if extractor is None and images.dim() == 4:
        default = m.RandomFeatures().to(images.device)
        extractor = default if min(*images.shape[2:], *targets.shape[2:]) >= 2**default.depth else None
        usable = extractor is not None
    else:
        usable = True
    if usable and images.dim() == 4 and images.shape[1] == 1 and min(len(images), len(targets)) >= 2:
        fa, fb = m.image_features(images, extractor), m.image_features(targets, extractor)
        out["frechet"] = _number(m.frechet_distance(fa, fb))
        out["simplified_frechet"] = _number(m.simplified_frechet_distance(fa, fb))
    else:
        out["frechet"] = out["simplified_frechet"] = None
    if truth is not None:
        out["mae"] = _number(m.mae(images, truth, truth_heads).mean())
        out["psnr"] = _number(m.psnr(images, truth, hi - lo, truth_heads).mean())
        out["ssim"] = _number(m.ssim(images, truth, hi - lo, truth_heads).mean())
    return out


# -- figures ------------------------------------------------------------------------------------
def draw_grid(ax: Any, u: torch.Tensor, step: int, color: str) -> None:
    """Draw on a matplotlib axis the image of a regular grid under ``p -> p + u(p)``.

    Every ``step``-th row and column of voxel centres, moved by the displacement (rows are
    axis 0, columns axis 1; plotted as x = column, y = row).

    Args:
        ax: a matplotlib ``Axes``.
        u: a 2D displacement field, channel 0 along rows, 1 along columns (voxels).
        step: voxels between grid lines (>= 1).
        color: matplotlib colour of the lines.

    Shape:
        u: ``(2, H, W)``.
    """
    H, W = u.shape[1:]
    u = u.detach().cpu()
    rows = torch.arange(H, dtype=u.dtype)[:, None] + u[0]
    cols = torch.arange(W, dtype=u.dtype)[None, :] + u[1]
    for r in range(0, H, step):
        ax.plot(cols[r].numpy(), rows[r].numpy(), color=color, lw=0.6)
    for c in range(0, W, step):
        ax.plot(cols[:, c].numpy(), rows[:, c].numpy(), color=color, lw=0.6)


def _plot_modules() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("figures need matplotlib: pip install 'plasticine[plot]' (or skip the figures)") from err
    return plt


def _plane(t: torch.Tensor) -> torch.Tensor:
    """The 2D plane shown of a ``(C, *S)`` tensor: itself in 2D, the middle slice of axis 0 in 3D."""
    return t if t.dim() == 3 else t[:, t.shape[1] // 2]


def translation_figure(
    path: str | Path,
    source: torch.Tensor,
    deformation: Deformation,
    translation: torch.Tensor,
    traced_labels: torch.Tensor,
    *,
    source_labels: torch.Tensor | None = None,
    title: str = "",
) -> Path:
    r"""Write one translation's figure (PNG, written to a temporary file then renamed).

    Five panels with titles and colour bars: the source; the deformation grid (a regular grid under
    :math:`p \mapsto \phi(p)` over the translation); the translation; the traced labels (the mask
    predicted on the translation, traced back to the source with :math:`\phi^{-1}`, over the source,
    with the source's true label contours when given); the Jacobian determinant
    :math:`\det \nabla\phi` (diverging colours centred on 1; :math:`\le 0` marks folding). A 3D case
    shows the middle slice along axis 0 (and the in-plane part of :math:`\phi`).

    Args:
        path: the PNG file.
        source: the source image.
        deformation: its :math:`\phi` (batch of one).
        translation: the translation.
        traced_labels: the traced labels.
        source_labels: the source's true labels, or None.
        title: the figure's title.

    Returns:
        The path written.

    Raises:
        ImportError: when matplotlib is not installed.

    Shape:
        source, translation: ``(C, *S)``; deformation: ``(1, N, *S)``; traced_labels, source_labels: ``(1, *S)``.
    """
    from .checkpoint import atomic_write
    from .core import jacobian_determinant

    plt = _plot_modules()
    u = deformation.forward[0].detach().cpu().float()
    det = jacobian_determinant(deformation.forward[:1].detach().cpu().double())[0]
    if u.shape[0] == 3:
        u, det = u[1:, u.shape[1] // 2], det[:, det.shape[1] // 2]
    src, trn = _plane(source.detach().cpu())[0], _plane(translation.detach().cpu())[0]
    traced = _plane(traced_labels.cpu())[0]
    fig, axes = plt.subplots(1, 5, figsize=(17, 3.8), layout="constrained")
    im = axes[0].imshow(src.numpy(), cmap="gray")
    fig.colorbar(im, ax=axes[0], fraction=0.046, label="intensity")
    axes[0].set_title("source")
    im = axes[1].imshow(trn.numpy(), cmap="gray")
    draw_grid(axes[1], u, max(2, max(u.shape[1:]) // 16), "tab:orange")
    fig.colorbar(im, ax=axes[1], fraction=0.046, label="translation intensity")
    axes[1].set_title("deformation grid phi")
    im = axes[2].imshow(trn.numpy(), cmap="gray")
    fig.colorbar(im, ax=axes[2], fraction=0.046, label="intensity")
    axes[2].set_title("translation")
    axes[3].imshow(src.numpy(), cmap="gray")
    n = max(int(traced.max()), 0 if source_labels is None else int(source_labels.max())) + 1
    masked = np.ma.masked_equal(traced.numpy(), 0)
    im = axes[3].imshow(masked, cmap=plt.get_cmap("tab10", max(n, 2)), vmin=-0.5, vmax=max(n, 2) - 0.5, alpha=0.45, interpolation="nearest")
    if source_labels is not None:
        truth = _plane(source_labels.cpu())[0].numpy()
        for c in range(1, n):
            if (truth == c).any():
                axes[3].contour(truth == c, [0.5], colors="lime", linewidths=0.7)
    fig.colorbar(im, ax=axes[3], fraction=0.046, label="traced label (0 not drawn)", ticks=range(max(n, 2)))
    axes[3].set_title("traced labels (green: source labels)" if source_labels is not None else "traced labels")
    d = det[0].numpy()
    span = max(float(np.abs(d - 1).max()), 1e-3)
    im = axes[4].imshow(d, cmap="RdBu_r", vmin=1 - span, vmax=1 + span)
    if (d <= 0).any():
        axes[4].contour(d <= 0, [0.5], colors="k", linewidths=0.7)
    fig.colorbar(im, ax=axes[4], fraction=0.046, label="det J")
    axes[4].set_title(f"Jacobian determinant (folded {float((d <= 0).mean()):.4f})")
    for ax in axes:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    return atomic_write(path, buffer.getvalue())


# -- the whole evaluation -----------------------------------------------------------------------
@dataclass
class Evaluation:
    """The result of :func:`evaluate_translation`.

    Attributes:
        results: JSON-ready numbers: ``settings``, ``seeds``, ``num_classes``, ``cases``,
            ``methods`` (per method ``table`` from :func:`summarize`, ``distribution`` from
            :func:`distribution_metrics` and ``per_case`` scores), ``segmentation`` (how the
            network was made) and ``time_s``.
        segmenter: the segmentation network used.
        ddib: the DDIB translator used, or None.

    Shape:
        Not applicable.
    """

    results: dict[str, Any]
    segmenter: nn.Module
    ddib: nn.Module | None


def _heads(images: torch.Tensor) -> torch.Tensor:
    from .recipes import head_extractor

    return head_extractor()(images)[:, 1:2] > 0.5


def _nonempty(mask: torch.Tensor) -> torch.Tensor:
    """A head mask with every empty item replaced by the whole image (the metrics need a voxel)."""
    empty = ~mask.flatten(1).any(1)
    return torch.where(empty.view(-1, *([1] * (mask.dim() - 1))), torch.ones_like(mask), mask)


def evaluate_translation(
    translator: TraceableTranslator,
    source: torch.Tensor,
    source_labels: torch.Tensor,
    target: torch.Tensor,
    target_labels: torch.Tensor,
    num_classes: int,
    settings: EvaluationSettings = EvaluationSettings(),
    *,
    segmenter: nn.Module | None = None,
    ddib: nn.Module | None = None,
    truth: torch.Tensor | None = None,
    extractor: Callable[[torch.Tensor], torch.Tensor] | None = None,
    names: Sequence[str] | None = None,
    figures: str | Path | None = None,
) -> Evaluation:
    """Run the paper's evaluation (see the module notes) and return every number.

    Args:
        translator: the trained translator (source -> target).
        source: source images.
        source_labels: their integer labels (the truth the traced masks are scored against).
        target: target-domain images (the segmentation network's training set and the reference
            distribution).
        target_labels: their integer labels.
        num_classes: classes ``L`` (background 0 included), at least 2.
        settings: the settings.
        segmenter: a trained segmentation network for the target domain, or None to train one
            (:func:`train_segmenter`).
        ddib: a :class:`DDIBBaseline` (or any module from source to target images), or None to train one when
            ``settings.ddib_steps > 0`` (:func:`train_ddib`), else no DDIB row.
        truth: paired true target-domain images of the sources, or None.
        extractor: features for the Frechet distances (None: ``RandomFeatures()``).
        names: one name per case (default ``case0000``, ...), for the per-case scores and figures.
        figures: a folder to write one :func:`translation_figure` per case into (``<name>.png``), or None.

    Returns:
        An :class:`Evaluation`.

    Raises:
        ValueError: for mismatched shapes, labels outside ``0 .. L-1``, non-finite images or a
            translation that is not finite.
        ImportError: with ``figures`` when matplotlib is missing (checked before any work).

    Shape:
        source, truth: ``(n, C, *S)``; source_labels: ``(n, 1, *S)``; target: ``(m, C, *S')``;
        target_labels: ``(m, 1, *S')``.
    """
    t0 = time.perf_counter()
    if not isinstance(settings, EvaluationSettings):
        raise ValueError(f"settings: expected an EvaluationSettings, got {type(settings).__name__}")
    check_int(num_classes, "num_classes", 2)
    source, target = _check_images(source, "source"), _check_images(target, "target")
    if source.shape[1] != target.shape[1] or source.dim() != target.dim():
        raise ValueError(f"source images are (n, C, *S) = {tuple(source.shape)}, target images {tuple(target.shape)}: expected the same channels and dimensions")
    source_labels = _check_labels(source_labels, source, num_classes, "source_labels")
    target_labels = _check_labels(target_labels, target, num_classes, "target_labels")
    if truth is not None:
        truth = _check_images(truth, "truth")
        if truth.shape != source.shape:
            raise ValueError(f"truth: expected the sources' shape {tuple(source.shape)}, got {tuple(truth.shape)}")
    n = source.shape[0]
    names = [f"case{i:04d}" for i in range(n)] if names is None else list(names)
    if len(names) != n:
        raise ValueError(f"names: expected one per source ({n}), got {len(names)}")
    if settings.spacing is not None and len(settings.spacing) != source.dim() - 2:
        raise ValueError(f"settings.spacing: expected {source.dim() - 2} voxel sizes (one per spatial axis), got {settings.spacing!r}")
    if figures is not None:
        _plot_modules()
        Path(figures).mkdir(parents=True, exist_ok=True)
    seeds = settings.seeds()

    if segmenter is None:
        segmenter = train_segmenter(target, target_labels, num_classes, settings)
        made = {"trained": True, "steps": settings.segmentation_steps, "depth": settings.segmentation_depth, "width": settings.segmentation_width, "seed": seeds["segmentation"]}
    else:
        made = {"trained": False}
    segmenter.eval()
    held = torch.cat([segment(segmenter, target[i : i + settings.batch_size]) for i in range(0, len(target), settings.batch_size)])
    made["dice_on_target_training_images"] = summarize(segmentation_scores(held, target_labels, num_classes))["mean"]["dice"]
    if ddib is None and settings.ddib_steps > 0:
        ddib = train_ddib(translator, source, target, settings)
    translator.eval()

    methods = [m for m in METHODS if m != "DDIB" or ddib is not None]
    scores: dict[str, list[dict[str, torch.Tensor]]] = {m: [] for m in methods}
    images: dict[str, list[torch.Tensor]] = {m: [] for m in methods}
    heads: dict[str, list[torch.Tensor]] = {m: [] for m in methods}
    in_geometry: dict[str, list[torch.Tensor]] = {m: [] for m in methods}
    source_heads = _nonempty(_heads(source))
    folded: list[float] = []
    bar = _ProgressLine("translate, segment, trace", n, settings.progress)
    for i in range(n):
        x, truth_i, head = source[i : i + 1], source_labels[i : i + 1], source_heads[i : i + 1]
        outputs = translate_methods(translator, x, seed=seeds["translation_of_case_0"] + i, ddib=ddib)
        for name in methods:
            o = outputs[name]
            if not bool(torch.isfinite(o.image).all()):
                raise ValueError(f"{names[i]}: the {name!r} image is not finite ({int((~torch.isfinite(o.image)).sum())} NaN or infinite values)")
            predicted = segment(segmenter, o.image)
            back = predicted if o.deformation is None else o.deformation.labels_to_source(predicted, num_classes)
            scores[name].append(segmentation_scores(back, truth_i, num_classes, spacing=settings.spacing))
            images[name].append(o.image.detach())
            heads[name].append(head if o.deformation is None else _nonempty(o.deformation.to_target(head.to(x.dtype)) > 0.5))
            in_geometry[name].append(x if o.deformation is None else o.deformation.to_target(x))
        phi = outputs["plasticine, traced"].deformation
        folded.append(float(folding_fraction(phi.forward).max()))
        if figures is not None:
            traced = phi.labels_to_source(segment(segmenter, outputs["plasticine, traced"].image), num_classes)
            translation_figure(
                Path(figures) / f"{names[i]}.png", x[0], phi, outputs["plasticine, traced"].image[0], traced[0], source_labels=truth_i[0], title=f"{names[i]}: plasticine, traced"
            )
        bar.update(i + 1)
    bar.close()

    target_heads = _nonempty(_heads(target))
    truth_heads = None if truth is None else _nonempty(_heads(truth))
    results_methods: dict[str, Any] = {}
    for name in methods:
        per_case = {k: torch.cat([s[k] for s in scores[name]]) for k in scores[name][0]}
        results_methods[name] = {
            "table": summarize(per_case),
            "distribution": distribution_metrics(
                torch.cat(images[name]),
                torch.cat(heads[name]),
                torch.cat(in_geometry[name]),
                target,
                target_heads,
                bins=settings.bins,
                value_range=settings.value_range,
                truth=truth,
                truth_heads=truth_heads,
                extractor=extractor,
            ),
            "per_case": {k: [[_number(v) for v in row] if row.dim() else _number(row) for row in t] for k, t in per_case.items()},
            "traced": name in ("register, then translate", "plasticine, traced"),
        }
    results = {
        "settings": {**asdict(settings), "value_range": list(settings.value_range), "spacing": None if settings.spacing is None else list(settings.spacing)},
        "seeds": seeds,
        "num_classes": num_classes,
        "cases": names,
        "methods": results_methods,
        "segmentation": made,
        "ddib": None if ddib is None else {"trained_steps": settings.ddib_steps, "sampler_steps": int(getattr(ddib, "steps", settings.ddib_sampler_steps))},
        "distribution": {
            "histogram": f"{settings.bins} equal bins on [{settings.value_range[0]}, {settings.value_range[1]}] plus one below and one above",
            "mask": "the head (plasticine.recipes.head_extractor) of each image's source, warped by phi for images in the target geometry; of each target image for the reference",
            "reference": "the target images inside their heads",
            "features": "the given extractor" if extractor is not None else "RandomFeatures() (fixed random weights, seed 0; not Inception features)",
            "paired": "mae, psnr, ssim inside the truth's head" if truth is not None else "not applicable: no paired truth given",
        },
        "deformation": {"folded_fraction_max": max(folded)},
        "time_s": time.perf_counter() - t0,
    }
    return Evaluation(results, segmenter, ddib)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def format_tables(results: Mapping[str, Any]) -> str:
    """The printed tables of :func:`evaluate_translation`'s results: Table I, then the distribution metrics.

    Args:
        results: :attr:`Evaluation.results`.

    Returns:
        Plain text, one row per method (and per class for Table I).

    Shape:
        Not applicable.
    """
    mm = results["settings"]["spacing"] is not None
    head = ["method", "class", "accuracy", "Dice", "IoU", "HD95 (vx)"] + (["HD95 (mm)"] if mm else []) + ["HD95 undefined"]
    rows = []
    for name, m in results["methods"].items():
        mean = m["table"]["mean"]
        rows.append([name, "mean", _fmt(mean["accuracy"]), f"{_fmt(mean['dice'])} +- {_fmt(mean['dice_std'])}", _fmt(mean["mean_iou"]), _fmt(mean.get("hd95"), 2)] + ([_fmt(mean.get("hd95_mm"), 2)] if mm else []) + [str(mean["hd95_undefined"])])
        for c, r in m["table"]["per_class"].items():
            rows.append(["", c, _fmt(r["accuracy"]), _fmt(r["dice"]), _fmt(r["iou"]), _fmt(r["hd95"], 2)] + ([_fmt(r.get("hd95_mm"), 2)] if mm else []) + [str(r["hd95_undefined"])])
    dist_head = ["method", "Bhattacharyya", "NMI", "Frechet", "simplified Frechet"]
    paired = "mae" in next(iter(results["methods"].values()))["distribution"]
    if paired:
        dist_head += ["MAE", "PSNR", "SSIM"]
    dist_rows = []
    for name, m in results["methods"].items():
        d = m["distribution"]
        row = [name, _fmt(d["bhattacharyya"]), _fmt(d["nmi"]), _fmt(d["frechet"], 4), _fmt(d["simplified_frechet"], 4)]
        if paired:
            row += [_fmt(d["mae"]), _fmt(d["psnr"], 2), _fmt(d["ssim"])]
        dist_rows.append(row)

    def render(headers: list[str], body: list[list[str]]) -> str:
        widths = [max(len(str(r[i])) for r in [headers, *body]) for i in range(len(headers))]
        lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths)))]
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w) for i, (v, w) in enumerate(zip(r, widths))) for r in body]
        return "\n".join(lines)

    return "Table I: traced segmentation (mean over cases; accuracy = pixel accuracy, Dice and HD95 over the foreground classes, IoU over all)\n" + render(head, rows) + "\n\nDistribution metrics\n" + render(dist_head, dist_rows)
