r"""``plasticine demo``: traceable translation on real MR anatomy with exact truth, offline.

**The task.** The source domain is the real BrainWeb T1 slice shipped in the package
(:func:`plasticine.data.brainweb_slices`), together with smooth random deformations of it for
variety (:func:`plasticine.data.synthetic.random_deformation`, 4 voxels at most). The target
domain is the same anatomy after a systematic structure change, the same for every subject (the
paper's disease-progression setting): an enlargement of the ventricles by a smooth radial field
centred on the ventricle mask,

.. math::

    v(p) = -a\,(p - c)\,\exp\Big(-\tfrac12 \sum_i \big((p_i - c_i)/\sigma_i\big)^2\Big),
    \qquad \phi_E = \exp(v), \quad \phi_E^{-1} = \exp(-v),

with :math:`c` the centroid of the ventricle mask, :math:`\sigma_i` twice the mask's spread along
axis :math:`i`, and :math:`a` such that :math:`\max \lVert v \rVert` is ``enlargement`` voxels
(``exp`` by scaling and squaring in float64); a target :math:`y = g(x) \circ \phi_E` pulls the
anatomy towards :math:`c`, so the ventricles grow. The contrast :math:`g` is PD-like,
calibrated on the real PD slice of the same anatomy: the two slices are pixel-aligned, so
:math:`g(t)` is the mean PD value of the pixels whose T1 value is :math:`t` (a 256-entry table,
empty entries interpolated, see :func:`pd_lookup`).

**Exact truth.** For every subject the true map is :math:`\phi_E`; the demo traces the source's
ventricle mask into the translation with the estimated :math:`\hat\phi` and compares it with the
truly enlarged mask (one-hot linear warps with argmax), and measures the endpoint error
:math:`\lVert \hat u(p) - u_E(p) \rVert` inside the brain (mean over the brain mask, in voxels of
the working grid), next to the same numbers for the identity map (no registration).

**Size.** Everything runs on a 108 x 90 grid (the 217 x 181 slices resampled by half with
antialiasing), so that the demo and its training fit a CPU; voxels are 2 mm.

**The translator** is :func:`plasticine.recipes.build_translator` with the unpaired T1 -> PD
recipe of ``benchmarks/crossmodal.py`` (:doc:`/benchmarks`, "T1 -> PD, trained unpaired"), trained
by :func:`train_demo_translator` as Algorithm 2 is written, with no paired information: the
denoiser on the targets, each conditioned on the structure map (the filled head mask and MIND-SSC)
of a randomly remapped copy of itself (:class:`~plasticine.training.ContrastRandomization`,
``DemoConfig.contrast_knots``): MIND-SSC does not depend on which tissue is brighter as long as the
contrast change is affine, and T1 -> PD is not, so the denoiser learns to read maps of many
contrasts, the T1's among them; the registration is a :class:`~plasticine.registration.PopulationRegistration`, fitted
on the training sets alone: the mean of the 48 sources registered to the mean of the 48 targets
(which subject a target came from is not used, nor the true field). The subjects' own
deformations average out in the two means, so the one field it finds is the population's
systematic change, the enlargement :math:`\phi_E`. What it cannot do: follow per-subject
differences. It returns that one field for every image, so a change that differed between
subjects (a subject whose ventricles grew more than the others') would be traced with the
population's average change; in this demo the change is the same for every subject by
construction, which is the setting the model is right for. Translation generates the target
contrast from pure noise in the warped source's geometry (:math:`\hat x_0` prediction clipped to
[-1, 1], 20 DDIM steps).

The shipped checkpoint ``plasticine/data/demo_translator.pt`` is what ``plasticine demo
--retrain`` writes with the default settings (deterministic given the seed on one machine; see
``plasticine/data/demo_NOTICE``).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import load_translator, save_component
from .core.deformation import Deformation
from .core.warp import warp
from .metrics import ssim
from .translator import TraceableTranslator

__all__ = [
    "DemoConfig",
    "DemoCohort",
    "DEMO_CHECKPOINT",
    "pd_lookup",
    "enlargement_field",
    "make_cohort",
    "build_demo_translator",
    "train_demo_translator",
    "evaluate",
    "run_demo",
    "DEMO_3D",
    "PATCH_3D",
    "make_cohort_3d",
    "run_demo_3d",
]

#: File name of the shipped checkpoint inside :mod:`plasticine.data`.
DEMO_CHECKPOINT = "demo_translator.pt"


@dataclass(frozen=True)
class DemoConfig:
    """Settings of the demo task, its translator and its training.

    Attributes:
        shape: working grid (the slices are resampled to it; 3D for :func:`run_demo_3d`).
        enlargement: largest displacement of the systematic field, in voxels of ``shape``.
        subject_displacement: largest displacement of the random subject deformations.
        train_subjects: generated training pairs.
        test_subjects: evaluation subjects; the first is the real slice itself.
        mind_sigma: patch width (pixels) of the MIND-SSC channels of the structure map.
        registration: ``"population"`` (the demo's: one field fitted on the training sets, see
            :class:`~plasticine.registration.PopulationRegistration`) or ``"learned"`` (the
            registration network trained on unpaired pairs).
        sampler_steps: DDIM steps.
        start_fraction: start step as a fraction of ``K``.
        diffusion_iterations: optimizer steps of the denoiser.
        registration_iterations: optimizer steps of the registration network (``"learned"`` only;
            the population registration is fitted, not trained by steps).
        batch_size: items per training batch.
        learning_rate: Adam learning rate of both stages.
        ema_decay: decay of the denoiser's weight average, whose weights are kept (None: the last
            weights).
        contrast_knots: condition the denoiser in training on the structure maps of randomly
            remapped targets, :class:`~plasticine.training.ContrastRandomization` with this many
            knots (the default keeps a quarter of the maps as they are), or None (the targets' own maps).
            The MIND-SSC maps of T1 and PD differ where the contrast change is not affine; trained on
            remapped maps, the denoiser reads the T1's maps as its own (on the T1 -> PD case of
            ``benchmarks/crossmodal.py``, SSIM in the brain 0.856 with 12 knots, 0.770 without, see :doc:`/benchmarks`).
        seed: seed of everything.
    """

    shape: tuple[int, ...] = (108, 90)
    enlargement: float = 3.0
    subject_displacement: float = 4.0
    train_subjects: int = 48
    test_subjects: int = 4
    mind_sigma: float = 1.0
    registration: str = "population"
    sampler_steps: int = 20
    start_fraction: float = 1.0
    diffusion_iterations: int = 700
    registration_iterations: int = 500
    batch_size: int = 4
    learning_rate: float = 1e-3
    ema_decay: float | None = None
    contrast_knots: int | None = 12
    seed: int = 0


#: Smaller settings for tests and a fast look (``--quick``).
QUICK = DemoConfig(shape=(54, 45), enlargement=1.5, subject_displacement=2.0, train_subjects=8, test_subjects=2, diffusion_iterations=4, registration_iterations=4, batch_size=4, sampler_steps=4)


# -- the task -------------------------------------------------------------------------------------


def pd_lookup(t1: np.ndarray, pd: np.ndarray) -> np.ndarray:
    """The PD-like contrast map fitted on the pixel-aligned real T1 and PD slices.

    ``table[t]`` is the mean PD value of the pixels whose T1 value is ``t``; values no pixel has
    are interpolated linearly between their neighbours (held constant beyond the ends).

    Args:
        t1: uint8 T1 slice.
        pd: uint8 PD slice, pixel-aligned with ``t1``.

    Returns:
        float64 table of 256 PD values in ``[0, 255]``.

    Shape:
        t1, pd: ``(H, W)``; out: ``(256,)``.
    """
    if t1.shape != pd.shape:
        raise ValueError(f"t1, pd: expected the same shape, got {t1.shape} and {pd.shape}")
    t = t1.astype(np.int64).ravel()
    counts = np.bincount(t, minlength=256)[:256]
    sums = np.bincount(t, weights=pd.astype(np.float64).ravel(), minlength=256)[:256]
    seen = counts > 0
    grid = np.arange(256)
    return np.interp(grid, grid[seen], sums[seen] / counts[seen])


def _resample(image: np.ndarray, shape: tuple[int, int]) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(image, dtype=np.float64))[None, None]
    if tuple(x.shape[2:]) == tuple(shape):
        return x
    return F.interpolate(x, size=shape, mode="bilinear", antialias=True, align_corners=False)


def _brain_mask(t1: np.ndarray) -> np.ndarray:
    """Brain (tissue inside the skull) of the T1 slice: the largest bright component, holes filled."""
    from scipy import ndimage

    tissue = ndimage.binary_erosion(t1 > 40, iterations=2)
    labels, n = ndimage.label(tissue)
    sizes = ndimage.sum(tissue, labels, range(1, n + 1))
    brain = labels == (1 + int(np.argmax(sizes)))
    brain = ndimage.binary_dilation(brain, iterations=2) & (t1 > 20)
    return ndimage.binary_fill_holes(brain)


def enlargement_field(mask: torch.Tensor, max_displacement: float, steps: int = 10) -> Deformation:
    r"""The systematic ventricle enlargement: a smooth radial field centred on a mask, and its inverse.

    :math:`v(p) = -a (p - c) \exp(-\frac12 \sum_i ((p_i - c_i)/\sigma_i)^2)` with :math:`c` the
    mask's centroid, :math:`\sigma_i` twice its standard deviation along axis :math:`i` and
    :math:`a` such that :math:`\max\lVert v\rVert` = ``max_displacement``;
    :math:`\phi = \exp(v)`, :math:`\phi^{-1} = \exp(-v)` by scaling and squaring in float64.
    Pulling an image back through :math:`\phi` enlarges the masked structure.

    Args:
        mask: the structure (nonzero inside).
        max_displacement: largest velocity length, voxels; must be below the size at which the map
            would fold.
        steps: squarings.

    Returns:
        The :class:`~plasticine.core.Deformation` (float64, with its velocity).

    Shape:
        mask: ``(1, 1, *S)``; fields ``(1, N, *S)``.
    """
    from .core.shapes import check_shape
    from .registration.integrators import scaling_and_squaring

    dims = check_shape(mask, "1 1 *S", "mask")
    m = mask[0, 0].to(torch.float64) > 0
    if not bool(m.any()):
        raise ValueError("mask: expected a nonempty mask")
    idx = torch.nonzero(m).to(torch.float64)
    c, sigma = idx.mean(0), 2.0 * idx.std(0).clamp(min=1.0)
    coords = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in dims["S"]], indexing="ij"))
    rel = coords - c.view(-1, *([1] * len(dims["S"])))
    g = torch.exp(-0.5 * ((rel / sigma.view(-1, *([1] * len(dims["S"])))) ** 2).sum(0))
    v = -(rel * g)[None]
    top = float(v.norm(dim=1).amax())
    a = float(max_displacement) / top
    # v = -a (p - c) g(p) with 0 < a < 1 keeps the Jacobian of v above -1 in every direction: no folding
    if not 0.0 < a < 1.0:
        raise ValueError(f"max_displacement: expected a number in (0, {top:.2f}) voxels for this mask (larger folds the map), got {max_displacement}")
    v = a * v
    return Deformation(scaling_and_squaring(v, steps), scaling_and_squaring(-v, steps), v)


@dataclass
class DemoCohort:
    """Generated subjects of the demo with their exact truth.

    Attributes:
        sources: T1 source images in ``[0, 1]``.
        targets: PD-like targets with enlarged ventricles, :math:`g(x) \\circ \\phi_E`.
        source_masks: ventricle masks of the sources (0/1).
        target_masks: the truly enlarged masks (the source masks traced through :math:`\\phi_E`).
        brain: brain masks of the sources (bool).
        field: the systematic field :math:`\\phi_E` (batch of one, shared by every subject).
        landmarks: source landmarks (around the ventricle), voxel coordinates.
        target_landmarks: their true positions in the target, :math:`\\phi_E^{-1}(p)`.

    Shape:
        images and masks: ``(n, 1, H, W)``; field: ``(1, 2, H, W)``; landmarks: ``(n, P, 2)``.
    """

    sources: torch.Tensor
    targets: torch.Tensor
    source_masks: torch.Tensor
    target_masks: torch.Tensor
    brain: torch.Tensor
    field: Deformation
    landmarks: torch.Tensor
    target_landmarks: torch.Tensor

    def __len__(self) -> int:
        return self.sources.shape[0]


def make_cohort(config: DemoConfig, num_subjects: int, seed: int, *, include_real: bool) -> DemoCohort:
    """Generate subjects: random smooth deformations of the real slice, and their targets.

    Subject ``i`` is :math:`x_i = T_1 \\circ \\psi_i` (with :math:`\\psi_0 = \\mathrm{id}` when
    ``include_real``), its target :math:`y_i = g(x_i) \\circ \\phi_E`; masks follow the same maps
    (one-hot linear warps with argmax). Landmarks are 8 points on an ellipse around the ventricle
    centroid and the centroid itself, at the same coordinates in every source; their true
    positions in the target are :math:`\\phi_E^{-1}(p)`.

    Args:
        config: the task settings.
        num_subjects: ``n``.
        seed: seed of the subject deformations.
        include_real: subject 0 is the undeformed real slice.

    Returns:
        The :class:`DemoCohort` (float32 images).

    Shape:
        See :class:`DemoCohort`.
    """
    from .data import brainweb_slices

    d = brainweb_slices()
    shape = tuple(config.shape)
    table = pd_lookup(d["t1"], d["pd"])
    t1 = _resample(d["t1"] / 255.0, shape)
    vent = (_resample(d["ventricles"].astype(np.float64), shape) > 0.5).to(torch.float64)
    brain = (_resample(_brain_mask(d["t1"]).astype(np.float64), shape) > 0.5).to(torch.float64)
    scale = shape[0] / d["t1"].shape[0]
    ang = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    ring = torch.tensor([40.0, 20.0], dtype=torch.float64) * scale * torch.stack([torch.sin(ang), torch.cos(ang)], -1)
    return _cohort(config, t1, vent, brain, table, ring, num_subjects, seed, include_real=include_real)


def _cohort(
    config: DemoConfig,
    t1: torch.Tensor,
    vent: torch.Tensor,
    brain: torch.Tensor,
    table: np.ndarray,
    ring: torch.Tensor,
    num_subjects: int,
    seed: int,
    *,
    include_real: bool,
) -> DemoCohort:
    """Subjects of one T1 image (2D or 3D, float64 ``(1, 1, *S)`` in [0, 1]) with its masks, see :func:`make_cohort`."""
    from .data.synthetic import random_deformation

    shape = tuple(t1.shape[2:])
    field = enlargement_field(vent, config.enlargement)
    g = torch.Generator().manual_seed(seed)
    n_random = num_subjects - (1 if include_real else 0)
    nd = len(shape)
    if n_random > 0:
        psi = random_deformation(shape, config.subject_displacement, control_points=5, batch=n_random, generator=g, dtype=torch.float64)
        u = psi.forward
        if include_real:
            u = torch.cat([torch.zeros_like(u[:1]), u])
    else:
        u = torch.zeros((num_subjects, nd, *shape), dtype=torch.float64)
    n = num_subjects
    rep = (-1,) * (nd + 2)
    x = warp(t1.expand(n, *rep[1:]), u)
    masks = Deformation(u, u).labels_to_target(vent.expand(n, *rep[1:]).long(), 2)
    brains = Deformation(u, u).labels_to_target(brain.expand(n, *rep[1:]).long(), 2).bool()
    # the PD-like contrast, by linear interpolation of the table at the T1 values
    pos = (x * 255.0).clamp(0, 255)
    lo = pos.floor().long().clamp(max=254)
    t = pos - lo
    tab = torch.from_numpy(table / 255.0)
    pdlike = tab[lo] * (1 - t) + tab[lo + 1] * t
    fe = Deformation(field.forward.expand(n, *rep[1:]), field.inverse.expand(n, *rep[1:]))
    y = fe.to_target(pdlike)
    target_masks = fe.labels_to_target(masks, 2)
    # landmarks: the ventricle centroid and points around it (the same in every source)
    c = torch.nonzero(vent[0, 0] > 0).to(torch.float64).mean(0)
    pts = torch.cat([c[None], c + ring]).expand(n, -1, -1).contiguous()
    target_pts = fe.points_to_target(pts)
    f32 = torch.float32
    return DemoCohort(x.to(f32), y.to(f32), masks, target_masks, brains, field, pts.to(f32), target_pts.to(f32))


# -- the translator -------------------------------------------------------------------------------


def build_demo_translator(config: DemoConfig = DemoConfig(), *, ndim: int = 2) -> TraceableTranslator:
    r"""The demo's translator with freshly initialised weights (about 0.4 M parameters).

    :func:`plasticine.recipes.build_translator` with the unpaired T1 -> PD recipe of
    ``benchmarks/crossmodal.py``: the structure map ``"foreground+mind"`` (the filled head mask and
    MIND-SSC with ``sigma=config.mind_sigma``: both domains are MR, so their internal structure
    corresponds, and MIND-SSC does not depend on which tissue is brighter), the population
    registration on the grid ``config.shape`` (``config.registration``), a conditional U-Net
    (16, 32, 32 channels, no attention) predicting :math:`\hat x_0`, the paper's linear schedule on
    intensities mapped from [0, 1] to [-1, 1], DDIM with ``sampler_steps`` steps clipping
    :math:`\hat x_0`, started at ``start_fraction`` of ``K`` from the noised warped source, and
    concatenation conditioning; weights initialised from ``seed``.

    Args:
        config: the settings (its ``shape`` is the grid of the population registration, 2D or 3D).
        ndim: 2 (the demo's) or 3 (:func:`run_demo_3d`); must match ``config.shape``. In 3D the
            population registration optimises on the working grid alone (one level, 200 steps
            of at most 0.25 voxel, Gaussian smoothing 1.5 voxels): on the 3D demo's 6 mm grid the
            default's coarse level (7 x 9 x 7 voxels) is too coarse for the ventricles, and with it
            the fitted field traced them no better than the identity (Dice 0.404 both).

    Returns:
        The translator, in training mode.

    Raises:
        ValueError: for a ``config.shape`` of another dimension than ``ndim``.

    Shape:
        Not applicable.
    """
    from .recipes import build_translator

    if len(config.shape) != ndim:
        raise ValueError(f"config.shape: expected {ndim} sizes (ndim={ndim}), got {tuple(config.shape)}")
    translator = build_translator(
        ndim,
        1,
        structure="foreground+mind",
        mind_sigma=config.mind_sigma,
        registration=config.registration,
        shape=tuple(config.shape) if config.registration == "population" else None,
        start_fraction=config.start_fraction,
        sampler_steps=config.sampler_steps,
        seed=config.seed,
    )
    if ndim == 3 and config.registration == "population":
        from .registration.iterative import IterativeRegistration
        from .registration.optimizers import GradientDescent
        from .registration.population import PopulationRegistration

        backend = IterativeRegistration(levels=(1,), iterations=(200,), smoothing=1.5, optimizer=GradientDescent(lr=0.25, update_smoothing=1.5, tolerance=0))
        translator = translator.replace(registration=PopulationRegistration(tuple(config.shape), backend))
    return translator


def _say(message: str, verbose: bool) -> None:
    if verbose:
        print(message, file=sys.stderr, flush=True)


def train_demo_translator(
    config: DemoConfig = DemoConfig(),
    *,
    verbose: bool = True,
    cohort: DemoCohort | None = None,
    patch_size: tuple[int, ...] | None = None,
) -> TraceableTranslator:
    r"""Train the demo translator unpaired, as Algorithm 2 is written (CPU, deterministic).

    Stage 1 trains the denoiser on the targets, each conditioned on its own structure map
    :math:`\mathrm{conditioning}(\mathrm{structure}(y))`; stage 2 fits the population
    registration on the two sets, :math:`\phi = \mathrm{register}(\bar x, \bar y)` with
    :math:`\bar x, \bar y` the voxel-wise means of the sources and of the targets
    (:meth:`~plasticine.registration.PopulationRegistration.fit`; with ``config.registration =
    "learned"``, the network is trained on sources paired with randomly drawn targets). Nothing
    uses the truth: not the field :math:`\phi_E`, not which target belongs to which source. Both
    stages are :func:`plasticine.recipes.train_translator`, seeded from ``config.seed``.

    Args:
        config: the settings.
        verbose: print progress to stderr.
        cohort: the training sets (default: :func:`make_cohort` with ``config.train_subjects``
            subjects; :func:`make_cohort_3d` gives a 3D one, and the translator is then 3D); only
            its ``sources`` and ``targets`` are read.
        patch_size: train the denoiser on random patches of this size
            (:class:`~plasticine.recipes.TrainingRecipe` ``patch_size``), or None; the population
            registration is fitted on the whole images.

    Returns:
        The trained translator, in evaluation mode.

    Shape:
        Not applicable.
    """
    from .recipes import TrainingRecipe, train_translator
    from .training import ContrastRandomization

    if cohort is None:
        cohort = make_cohort(config, config.train_subjects, config.seed + 1, include_real=False)
    ndim = cohort.sources.dim() - 2
    translator = build_demo_translator(config, ndim=ndim)
    n = len(cohort)
    on = "" if patch_size is None else f" (random {' x '.join(map(str, patch_size))} patches)"
    stage2 = "population registration fitted on the two sets" if config.registration == "population" else f"registration {config.registration_iterations} steps"
    _say(f"training unpaired on {n} sources and {n} targets of size {tuple(cohort.sources.shape[2:])}{on}: denoiser {config.diffusion_iterations} steps, {stage2}", verbose)
    recipe = TrainingRecipe(
        diffusion_steps=config.diffusion_iterations,
        registration_steps=config.registration_iterations,
        batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        seed=config.seed,
        ema_decay=config.ema_decay,
        checkpoint_every=0,
        progress="print" if verbose else "none",
        patch_size=patch_size,
        contrast=None if config.contrast_knots is None else ContrastRandomization(config.contrast_knots),
    )
    train_translator(translator, cohort.sources, cohort.targets, recipe)
    return translator.eval()


# -- evaluation and outputs -----------------------------------------------------------------------


def _dice(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.bool(), b.bool()
    total = int(a.sum() + b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def evaluate(translator: TraceableTranslator, cohort: DemoCohort, *, seed: int = 0) -> tuple[dict[str, Any], Any]:
    r"""Translate the cohort's sources and score how well the translation traces, against exact truth.

    Scores (means over the subjects, and per subject):

    * ``ventricle_dice``: Dice of the source ventricle mask traced into the translation with the
      estimated :math:`\hat\phi` against the truly enlarged mask (``ventricle_dice_identity``: the
      untraced source mask against it);
    * ``endpoint_error``: mean :math:`\lVert \hat u - u_E \rVert` over the brain, voxels
      (``endpoint_error_identity``: mean :math:`\lVert u_E \rVert`, the error of no registration);
      ``endpoint_error_changed``: the same inside the region where :math:`\lVert u_E \rVert > 0.5`;
    * ``landmark_error``: mean distance between :math:`\hat\phi^{-1}(p)` and :math:`\phi_E^{-1}(p)`;
    * ``folding_fraction``: fraction of voxels with :math:`\det J_{\hat\phi} \le 0`;
    * ``translation_mae``: mean absolute difference between the translation and the true target
      inside the brain (``translation_mae_source``: the source itself against the target);
    * ``translation_ssim``: SSIM of the translation against the true target inside the brain
      (:func:`plasticine.metrics.ssim`, data range 1, Gaussian window 1.5 voxels).

    Args:
        translator: the translator (evaluation mode).
        cohort: the subjects with their truth.
        seed: seed of the sampler's generator.

    Returns:
        ``(metrics, result)``: a dict of floats and lists, and the
        :class:`~plasticine.translator.TranslationResult`.

    Shape:
        Not applicable.
    """
    result = translator.translate(cohort.sources, generator=torch.Generator().manual_seed(seed))
    d = result.deformation
    n = len(cohort)
    truth = cohort.field.forward.to(d.forward.dtype)
    traced = d.labels_to_target(cohort.source_masks, 2)
    brain = cohort.brain[:, 0]
    err = (d.forward - truth).norm(dim=1)
    true_norm = truth.norm(dim=1).expand_as(err)
    changed = brain & (true_norm > 0.5)
    est_pts = result.deformation.points_to_target(cohort.landmarks)
    per: dict[str, list[float]] = {k: [] for k in (
        "ventricle_dice", "ventricle_dice_identity", "endpoint_error", "endpoint_error_identity", "endpoint_error_changed",
        "endpoint_error_changed_identity", "landmark_error", "landmark_error_identity", "folding_fraction", "translation_mae",
        "translation_mae_source", "translation_ssim")}
    folding = d.folding_fraction()
    folding = folding.reshape(-1) if folding.dim() else folding.expand(n)
    for i in range(n):
        per["ventricle_dice"].append(_dice(traced[i], cohort.target_masks[i]))
        per["ventricle_dice_identity"].append(_dice(cohort.source_masks[i], cohort.target_masks[i]))
        per["endpoint_error"].append(float(err[i][brain[i]].mean()))
        per["endpoint_error_identity"].append(float(true_norm[i][brain[i]].mean()))
        per["endpoint_error_changed"].append(float(err[i][changed[i]].mean()))
        per["endpoint_error_changed_identity"].append(float(true_norm[i][changed[i]].mean()))
        per["landmark_error"].append(float((est_pts[i] - cohort.target_landmarks[i]).norm(dim=-1).mean()))
        per["landmark_error_identity"].append(float((cohort.landmarks[i] - cohort.target_landmarks[i]).norm(dim=-1).mean()))
        per["folding_fraction"].append(float(folding[i]) if folding.numel() == n else float(folding.mean()))
        per["translation_mae"].append(float((result.image[i] - cohort.targets[i]).abs()[0][brain[i]].mean()))
        per["translation_mae_source"].append(float((cohort.sources[i] - cohort.targets[i]).abs()[0][brain[i]].mean()))
    per["translation_ssim"] = ssim(result.image, cohort.targets.to(result.image.dtype), 1.0, cohort.brain).tolist()
    metrics: dict[str, Any] = {k: float(np.mean(v)) for k, v in per.items()}
    metrics["per_subject"] = per
    return metrics, result


def _write_outputs(out: Path, cohort: DemoCohort, result: Any, metrics: dict[str, Any], *, figures: bool) -> list[str]:
    """Images, deformations, masks, landmarks, metrics and figures of the demo; returns notes."""
    from .evaluation import draw_grid
    from .io import write_deformation, write_image, write_trace

    notes: list[str] = []
    d = result.deformation
    traced = d.labels_to_target(cohort.source_masks, 2)
    est_pts = result.deformation.points_to_target(cohort.landmarks)
    for i in range(len(cohort)):
        s = f"subject{i}"
        write_image(out / f"{s}_source.png", cohort.sources[i])
        write_image(out / f"{s}_target_truth.png", cohort.targets[i].clamp(0, 1))
        write_image(out / f"{s}_translated.png", result.image[i].clamp(0, 1))
        write_image(out / f"{s}_mask_source.png", cohort.source_masks[i].float())
        write_image(out / f"{s}_mask_traced.png", traced[i].float())
        write_image(out / f"{s}_mask_truth.png", cohort.target_masks[i].float())
        write_deformation(out / f"{s}_deformation.npz", d, index=i)
        write_trace(
            out / f"{s}_landmarks.json",
            cohort.landmarks[i],
            est_pts[i],
            true_target=cohort.target_landmarks[i].tolist(),
            description="source landmarks (ventricle centroid and a ring around it) and their estimated positions in the translation, phi^-1(p); true_target: phi_E^-1(p)",
        )
    if not figures:
        return notes
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        notes.append("figures skipped: matplotlib is not installed (pip install 'plasticine[plot]')")
        return notes
    step = max(2, cohort.sources.shape[-1] // 18)
    for i in range(len(cohort)):
        fig, axes = plt.subplots(1, 2, figsize=(7, 4.2))
        for ax, u, title, color in ((axes[0], d.forward[i], "estimated phi", "tab:orange"), (axes[1], cohort.field.forward[0].float(), "true phi_E", "tab:green")):
            ax.imshow(result.image[i, 0].clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)
            draw_grid(ax, u, step, color)
            ax.set_title(title)
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(out / f"subject{i}_grid.png", dpi=100)
        plt.close(fig)
    k = len(cohort)
    fig, axes = plt.subplots(k, 5, figsize=(13, 2.9 * k), squeeze=False)
    for i in range(k):
        row = axes[i]
        row[0].imshow(cohort.sources[i, 0].numpy(), cmap="gray", vmin=0, vmax=1)
        row[0].contour(cohort.source_masks[i, 0].numpy(), levels=[0.5], colors="yellow", linewidths=0.8)
        row[0].plot(cohort.landmarks[i, :, 1].numpy(), cohort.landmarks[i, :, 0].numpy(), "y.", ms=4)
        row[1].imshow(result.image[i, 0].clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)
        row[1].contour(traced[i, 0].numpy(), levels=[0.5], colors="tab:orange", linewidths=0.8)
        row[1].plot(est_pts[i, :, 1].numpy(), est_pts[i, :, 0].numpy(), ".", color="tab:orange", ms=4)
        row[2].imshow(cohort.targets[i, 0].clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)
        row[2].contour(cohort.target_masks[i, 0].numpy(), levels=[0.5], colors="tab:green", linewidths=0.8)
        row[2].plot(cohort.target_landmarks[i, :, 1].numpy(), cohort.target_landmarks[i, :, 0].numpy(), ".", color="tab:green", ms=4)
        row[3].imshow(result.image[i, 0].clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)
        draw_grid(row[3], d.forward[i], step, "tab:orange")
        err = (d.forward[i] - cohort.field.forward[0].float()).norm(dim=0)
        im = row[4].imshow(err.numpy(), cmap="magma", vmin=0, vmax=max(1.0, float(cohort.field.forward.norm(dim=1).max())))
        fig.colorbar(im, ax=row[4], fraction=0.04)
        pm = metrics["per_subject"]
        titles = (
            f"subject {i}: T1 source ({'real' if i == 0 else 'deformed'}), mask",
            f"translation, traced mask (Dice {pm['ventricle_dice'][i]:.3f})",
            "true target (PD-like, enlarged)",
            "estimated phi",
            f"endpoint error (mean {pm['endpoint_error'][i]:.2f} vx)",
        )
        for ax, t in zip(row, titles):
            ax.set_title(t, fontsize=8)
            ax.axis("off")
    fig.suptitle(
        f"plasticine demo: traced ventricle Dice {metrics['ventricle_dice']:.3f} (identity {metrics['ventricle_dice_identity']:.3f}), "
        f"endpoint error {metrics['endpoint_error']:.2f} voxel (identity {metrics['endpoint_error_identity']:.2f})",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(out / "summary.png", dpi=100)
    plt.close(fig)
    return notes


def _print_scores(metrics: dict[str, Any], *, goals: bool) -> None:
    """The traced scores of :func:`evaluate` against no registration, with the 2D demo's goals or without."""
    dice, epe = ("; goal > 0.9", "; goal < 1") if goals else ("", "")
    print(f"  traced ventricle Dice  {metrics['ventricle_dice']:.3f}   (no registration: {metrics['ventricle_dice_identity']:.3f}{dice})")
    print(f"  endpoint error, brain  {metrics['endpoint_error']:.3f} voxel (no registration: {metrics['endpoint_error_identity']:.3f}{epe})")
    print(f"  endpoint error where the true field moves > 0.5 voxel  {metrics['endpoint_error_changed']:.3f} (no registration: {metrics['endpoint_error_changed_identity']:.3f})")
    print(f"  landmark error         {metrics['landmark_error']:.3f} voxel (no registration: {metrics['landmark_error_identity']:.3f})")
    print(f"  folded voxels          {100 * metrics['folding_fraction']:.3f} %")
    print(f"  translation MAE, brain {metrics['translation_mae']:.3f} (source vs target: {metrics['translation_mae_source']:.3f}), SSIM {metrics['translation_ssim']:.3f}")


def _print_recipe(translator: TraceableTranslator, config: DemoConfig) -> None:
    """One line on how the translator was trained and what its registration can trace."""
    from .registration.population import PopulationRegistration

    if isinstance(translator.registration, PopulationRegistration):
        maps = "the structure maps of remapped copies of them" if config.contrast_knots is not None else "their own structure maps"
        print(f"  trained unpaired: the denoiser on the targets, conditioned on {maps}; phi is one field for every subject, the mean source registered to the mean target")
        print("  (the change all subjects share; it cannot follow per-subject differences)")


def shipped_checkpoint() -> Path:
    """The path of the checkpoint shipped in :mod:`plasticine.data`.

    Returns:
        The path (inside the installed package).

    Shape:
        Not applicable.
    """
    return Path(str(resources.files("plasticine.data").joinpath(DEMO_CHECKPOINT)))


def run_demo(
    output: str | os.PathLike[str] = "plasticine-demo",
    *,
    retrain: bool = False,
    quick: bool = False,
    checkpoint: str | os.PathLike[str] | None = None,
    config: DemoConfig | None = None,
    figures: bool = True,
    verbose: bool = True,
) -> dict[str, Any]:
    """Run the demo: load (or retrain) the translator, translate, trace, score, write the outputs.

    Args:
        output: the output folder (created).
        retrain: train the translator first (``config``'s recipe) and write it to ``checkpoint``
            (default ``<output>/demo_translator.pt``) instead of loading the shipped one.
        quick: one test subject (the real slice) and 4 sampler steps; with ``retrain``, the small
            :data:`QUICK` task (54 x 45, a few training steps) for a fast check.
        checkpoint: the checkpoint to load (default: the shipped one) or, with ``retrain``, to write.
        config: the task settings (default :class:`DemoConfig`, or :data:`QUICK` with ``quick`` and
            ``retrain``).
        figures: write the matplotlib figures (skipped with a note when matplotlib is missing).
        verbose: print progress and the scores.

    Returns:
        The metrics (also written to ``<output>/metrics.json``).

    Raises:
        plasticine.checkpoint.CheckpointError: for a missing or unreadable checkpoint.

    Shape:
        Not applicable.
    """
    start = time.perf_counter()
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    if config is None:
        config = QUICK if (quick and retrain) else DemoConfig()
    if retrain:
        translator = train_demo_translator(config, verbose=verbose)
        ckpt = Path(checkpoint) if checkpoint is not None else out / DEMO_CHECKPOINT
        save_component(translator, ckpt)
        _say(f"wrote the checkpoint {ckpt} ({ckpt.stat().st_size / 1e6:.2f} MB)", verbose)
    else:
        ckpt = Path(checkpoint) if checkpoint is not None else shipped_checkpoint()
        translator = load_translator(ckpt)
    train_seconds = time.perf_counter() - start
    if quick:
        s = translator.sampler  # the same parametrisation and clipping, fewer steps
        translator = translator.replace(sampler=type(s).from_config({**s.config, "steps": 4}))
        config = replace(config, test_subjects=1, sampler_steps=4)
    cohort = make_cohort(config, config.test_subjects, config.seed + 1000, include_real=True)
    metrics, result = evaluate(translator, cohort, seed=config.seed)
    notes = _write_outputs(out, cohort, result, metrics, figures=figures)
    seconds = time.perf_counter() - start
    metrics.update(
        {
            "goals": {"ventricle_dice": "> 0.9", "endpoint_error": "< 1 voxel"},
            "goals_met": {"ventricle_dice": metrics["ventricle_dice"] > 0.9, "endpoint_error": metrics["endpoint_error"] < 1.0},
            "subjects": len(cohort),
            "shape": list(config.shape),
            "voxel_mm": 217 / config.shape[0],
            "checkpoint": str(ckpt),
            "retrained": retrain,
            "quick": quick,
            "config": asdict(config),
            "seconds": seconds,
            "training_seconds": train_seconds if retrain else 0.0,
            "threads": torch.get_num_threads(),
            "notes": notes,
        }
    )
    from .checkpoint import atomic_write

    atomic_write(out / "metrics.json", json.dumps(metrics, indent=1).encode())
    if verbose:
        print(f"plasticine demo: {len(cohort)} subject(s) on a {config.shape[0]} x {config.shape[1]} grid, checkpoint {ckpt}")
        _print_recipe(translator, config)
        _print_scores(metrics, goals=True)
        for note in notes:
            print(f"  {note}")
        print(f"  outputs in {out}/ ({seconds:.1f} s)")
    return metrics


# -- the 3D demo ----------------------------------------------------------------------------------

#: Settings of ``plasticine demo --3d``: Colin27 on a grid of about 6.3 mm, a short training (a minute or two on 2 CPU cores);
#: 24 training subjects, so that their own deformations average out of the templates of the population registration.
DEMO_3D = DemoConfig(
    shape=(28, 35, 28),
    enlargement=2.0,
    subject_displacement=1.5,
    train_subjects=24,
    test_subjects=1,
    sampler_steps=4,
    start_fraction=0.3,
    diffusion_iterations=30,
    registration_iterations=30,
    batch_size=2,
    learning_rate=2e-3,
    contrast_knots=None,
)

#: Patch size of the 3D demo: training on random patches, translation on 2 x 2 x 2 overlapping ones, stitched.
PATCH_3D: tuple[int, int, int] = (16, 20, 16)


def make_cohort_3d(config: DemoConfig, num_subjects: int, seed: int, *, include_real: bool) -> tuple[DemoCohort, np.ndarray]:
    r"""The demo's task on a real volume: Colin27 (``ch2bet``, Debian's ``mricron-data``) on the grid ``config.shape``.

    The same task as :func:`make_cohort`, in 3D: subjects are smooth random deformations of the
    skull-stripped Colin27 T1 (:func:`plasticine.data.system.colin27`), targets their PD-like
    contrast after the ventricle enlargement :math:`\phi_E` (:func:`enlargement_field`). The
    ventricle mask is the largest dark component (T1 < 45) of the brain eroded by 10 mm, found at
    1 mm and resampled (area average > 0.5); the brain mask is the nonzero region of ``ch2bet``.
    The contrast :math:`g` is the table of :func:`pd_lookup` from the BrainWeb slice pair, applied
    after mapping Colin27 onto the BrainWeb T1 scale (the shipped T1 slice is Colin27's axial
    slice 94: a least-squares line between the two over the head, correlation 0.97). Landmarks are
    the ventricle centroid and six points at :math:`\pm s_i / 8` along each axis around it.

    Args:
        config: the task settings (a 3D ``shape``).
        num_subjects: ``n``.
        seed: seed of the subject deformations.
        include_real: subject 0 is the undeformed volume.

    Returns:
        ``(cohort, affine)``: the :class:`DemoCohort` and the voxel-to-world affine of the working
        grid (Colin27's, scaled to the grid's voxels).

    Raises:
        FileNotFoundError: when ``mricron-data`` is not installed (the message says how to get it).

    Shape:
        images and masks: ``(n, 1, *shape)``; affine: ``(4, 4)``.
    """
    from scipy import ndimage

    from .data import brainweb_slices
    from .data.system import colin27

    if len(config.shape) != 3:
        raise ValueError(f"config.shape: expected a 3D grid (D, H, W), got {tuple(config.shape)}")
    volume, affine = colin27("ch2bet.nii.gz")
    head, _ = colin27("ch2.nii.gz")
    d = brainweb_slices()
    table = pd_lookup(d["t1"], d["pd"])
    ref, mine = d["t1"].astype(np.float64), head[:, :, 94].T.astype(np.float64)
    inside = ref > 20
    slope, offset = np.linalg.lstsq(np.c_[mine[inside], np.ones(int(inside.sum()))], ref[inside], rcond=None)[0]
    brain1 = volume > 0
    dark = ndimage.binary_erosion(brain1, iterations=10) & (volume < 45)
    labels, n = ndimage.label(dark)
    if n == 0:
        raise RuntimeError("ch2bet.nii.gz: no ventricle found (the installed data changed)")
    vent1 = labels == 1 + int(np.argmax(ndimage.sum(dark, labels, range(1, n + 1))))
    shape = tuple(config.shape)

    def grid(a: np.ndarray) -> torch.Tensor:
        return F.interpolate(torch.from_numpy(np.asarray(a, dtype=np.float64))[None, None], size=shape, mode="area")

    t1 = (grid(np.where(brain1, volume * slope + offset, 0.0)) / 255.0).clamp(0, 1)
    vent = (grid(vent1) > 0.5).to(torch.float64)
    if int(vent.sum()) < 8:
        raise ValueError(f"config.shape: the grid {shape} is too coarse for the ventricles ({int(vent.sum())} voxel(s) of the mask, expected at least 8); use a finer grid such as {DEMO_3D.shape}")
    brain = (grid(brain1) > 0.5).to(torch.float64)
    c = torch.tensor([s / 8 for s in shape], dtype=torch.float64)
    ring = torch.cat([torch.diag(c), -torch.diag(c)])
    scale = np.diag([*(s / t for s, t in zip(volume.shape, shape)), 1.0])
    world = affine @ scale
    world[:3, 3] = affine[:3, :3] @ ((np.array(volume.shape) / np.array(shape) - 1) / 2) + affine[:3, 3]  # voxel centres of the coarse grid
    return _cohort(config, t1, vent, brain, table, ring, num_subjects, seed, include_real=include_real), world


def run_demo_3d(
    output: str | os.PathLike[str] = "plasticine-demo-3d",
    *,
    config: DemoConfig = DEMO_3D,
    patch: tuple[int, ...] = PATCH_3D,
    checkpoint: str | os.PathLike[str] | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    r"""The demo on a real volume: train a 3D translator on patches, translate by stitched patches, score.

    The task is :func:`make_cohort_3d` (Colin27 from ``mricron-data``). The translator is
    :func:`build_demo_translator` in 3D, trained unpaired by :func:`train_demo_translator`: the
    denoiser on random ``patch``-sized patches (:class:`~plasticine.recipes.TrainingRecipe`
    ``patch_size``), the population registration fitted on the whole training volumes; the
    evaluation subjects are translated whole, the denoiser run on overlapping patches and stitched
    (:class:`~plasticine.diffusion.PatchwiseDenoiser`; a learned registration would be stitched by
    :class:`~plasticine.registration.PatchwiseRegistration`, the population one is a whole-grid
    field), and scored as :func:`evaluate` does. There is no shipped 3D checkpoint: every run
    trains (the denoiser's training in :data:`DEMO_3D` is short, so its translation shows the
    pipeline, not a trained model's accuracy; the traced scores are the population field's). Writes ``<output>/metrics.json``, the NIfTI volumes of subject 0 on the working grid's
    affine (source, translation, true target, traced and true ventricle masks, phi and phi^-1 as
    NIfTI voxel displacements) and its landmarks as a trace file.

    Args:
        output: the output folder (created).
        config: the task and training settings.
        patch: patch size (training and translation).
        checkpoint: also write the trained translator there, or None.
        verbose: print progress and the scores.

    Returns:
        The metrics.

    Raises:
        FileNotFoundError: when ``mricron-data`` is not installed.

    Shape:
        Not applicable.
    """
    from .diffusion import PatchwiseDenoiser
    from .io import write_deformation, write_image, write_trace
    from .registration import PatchwiseRegistration

    start = time.perf_counter()
    train_cohort, affine = make_cohort_3d(config, config.train_subjects, config.seed + 1, include_real=False)
    cohort, _ = make_cohort_3d(config, config.test_subjects, config.seed + 1000, include_real=True)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    translator = train_demo_translator(config, verbose=verbose, cohort=train_cohort, patch_size=patch)
    train_seconds = time.perf_counter() - start
    if checkpoint is not None:
        save_component(translator, checkpoint)
    parts: dict[str, Any] = {"denoiser": PatchwiseDenoiser(translator.denoiser, patch)}
    if config.registration == "learned":  # the population registration holds one whole-grid field
        parts["registration"] = PatchwiseRegistration(translator.registration, patch)
    stitched = translator.replace(**parts).eval()
    _say(f"translating {len(cohort)} volume(s) of {tuple(config.shape)} on {stitched.denoiser.patches(config.shape)} overlapping {' x '.join(map(str, patch))} patches", verbose)
    metrics, result = evaluate(stitched, cohort, seed=config.seed)
    d = result.deformation
    write_image(out / "subject0_source.nii.gz", cohort.sources[0], affine=affine)
    write_image(out / "subject0_translated.nii.gz", result.image[0], affine=affine)
    write_image(out / "subject0_target_truth.nii.gz", cohort.targets[0], affine=affine)
    write_image(out / "subject0_mask_traced.nii.gz", d.labels_to_target(cohort.source_masks, 2)[0].float(), affine=affine)
    write_image(out / "subject0_mask_truth.nii.gz", cohort.target_masks[0].float(), affine=affine)
    write_deformation(out / "subject0_deformation.nii.gz", d, affine=affine)
    write_trace(
        out / "subject0_landmarks.json",
        cohort.landmarks[0],
        d.points_to_target(cohort.landmarks)[0],
        affine=affine,
        true_target=cohort.target_landmarks[0].tolist(),
        description="source landmarks (ventricle centroid and six points around it) and their estimated positions in the translation, phi^-1(p); true_target: phi_E^-1(p)",
    )
    seconds = time.perf_counter() - start
    metrics.update(
        {
            "subjects": len(cohort),
            "shape": list(config.shape),
            "voxel_mm": [float(v) for v in np.linalg.norm(affine[:3, :3], axis=0)],
            "patch": list(patch),
            "config": asdict(config),
            "seconds": seconds,
            "training_seconds": train_seconds,
            "threads": torch.get_num_threads(),
        }
    )
    from .checkpoint import atomic_write

    atomic_write(out / "metrics.json", json.dumps(metrics, indent=1).encode())
    if verbose:
        print(f"plasticine demo --3d: {len(cohort)} Colin27 volume(s) on a {' x '.join(map(str, config.shape))} grid, trained {train_seconds:.0f} s on {' x '.join(map(str, patch))} patches")
        _print_recipe(translator, config)
        _print_scores(metrics, goals=False)
        print(f"  outputs in {out}/ ({seconds:.1f} s)")
    return metrics
