r"""Unpaired MR -> CT translation on real images, scored by the paper's traced-segmentation protocol.

The case is :func:`plasticine.data.crossmodal.crossmodal_case`: Colin27 T1 axial slices of a whole
head (source) and axial slices of a real head CT (target), 128 x 128 at 1.625 mm, unpaired. Every
fourth slice of each domain (``i % 4 == 2``) is held out; the rest train.

1. A segmentation U-Net (:class:`plasticine.segmentation.SegmentationUNet`) is trained on the
   training CT slices and their intracranial masks; its Dice on the held-out CT slices is reported.
2. The translator is the default of ``plasticine train`` (:func:`plasticine.recipes.build_translator`:
   the filled head mask as the structure map, x0 prediction on data mapped to [-1, 1] and clipped
   there, generation from pure noise in the warped source's geometry), trained by
   :func:`plasticine.recipes.train_translator` (Algorithm 2: the denoiser on the CT slices
   conditioned on their own maps, the registration on unpaired pairs) on the training MR slices
   (source) and the training CT slices (target), with fewer steps than the command's default so
   that the benchmark fits its time (the counts are printed and written).
3. Each method turns every held-out MR slice into an image for the CT network, which segments it;
   the mask is brought back to the MR's geometry and scored against the MR brain mask (Dice of
   the brain, mean IoU over background and brain, pixel accuracy; mean and standard deviation over
   the slices; and the paper's Table I columns per class from :func:`plasticine.evaluation.summarize`:
   class accuracy, Dice, IoU and HD95 in mm for the background and the brain):

   * ``no translation``: the MR itself;
   * ``histogram matching``: inside the MR head, the MR's intensities mapped so that their
     quantiles are those of the pooled training CT intensities inside the CT heads
     (:func:`histogram_match`), zero outside;
   * ``intensity inversion``: ``(1 - x) * head`` (:func:`invert_inside`);
   * ``plasticine, phi = identity``: the translator with a registration that returns the identity
     (:class:`~plasticine.registration.IdentityRegistration`, through :meth:`~plasticine.translator.TraceableTranslator.replace`):
     translate, segment, no tracing;
   * ``register, then translate``: the paper's "combination": the source warped by the learned
     phi first, translated with phi = identity, the mask traced back with phi^-1;
   * ``DDIB``: two condition-free models of the translator's denoiser architecture, one trained on
     the training MR slices and one on the training CT slices (``--ddib-steps`` each, seeds
     ``seed + 30`` and ``seed + 31``), joined by deterministic DDIM encoding and decoding
     (``--ddib-sampler-steps`` each way; :func:`plasticine.evaluation.train_ddib`: x0 prediction on
     [0, 1] mapped to [-1, 1] and clipped there); no deformation, the mask is used as it is;
   * ``plasticine, traced``: :meth:`~plasticine.translator.TraceableTranslator.translate`, segment,
     trace the labels back with phi^-1 (:meth:`~plasticine.translator.TranslationResult.labels_to_source`).

4. Intensity fidelity: the Bhattacharyya distance :math:`-\ln \sum_i \sqrt{p_i q_i}` between the
   histogram of each method's image inside the head (pooled over the held-out slices) and that of
   the held-out real CT slices inside their head masks. Histograms have ``--bins`` equal bins on
   ``[0, 1]`` plus one bin below 0 and one above 1, so mass that a translation puts outside the data
   range counts as different from CT (nothing is clipped). The head of an image in the target
   geometry is the MR head mask warped by phi. There is no paired truth between the domains, so MAE,
   PSNR and SSIM are not applicable here (recorded as such).

Also recorded: the fraction of folded pixels (det J <= 0) of phi and its inverse consistency
(voxels), the training losses, and the time of each stage.

5. **The T1 -> PD case, trained unpaired** (``--part t1pd`` or ``all``): the demo's task
   (:mod:`plasticine.demo`: the real BrainWeb T1 slice deformed per subject, targets in a PD-like
   contrast with enlarged ventricles, exact truth), but trained as Algorithm 2 is written: the
   denoiser on the targets conditioned on the targets' own structure maps, the registration on
   unpaired sets; no paired information. The translator is
   :func:`~plasticine.recipes.build_translator` with ``T1PD_OPTIONS``: the recipe for two MR
   contrasts, :data:`~plasticine.recipes.MR_CONTRAST_OPTIONS` (``structure="foreground+mind"``
   with ``mind_sigma=1.0``: both are MR, their internal structure corresponds, which MIND-SSC
   carries, and the finer patches keep more of it than the default 2.5; ``prediction="x0"``,
   clipped), and ``registration="population"``
   (:class:`~plasticine.registration.PopulationRegistration`: the mean source registered to the mean
   target, one field for every subject; the enlargement is the same for every subject, and a
   network trained on randomly drawn targets pulls each source towards the population's mean shape
   instead). Stage 2 is that fit, so ``--pd-registration-steps`` is not used. Stage 1 conditions
   each target on the map of a randomly remapped copy of it
   (:class:`~plasticine.training.ContrastRandomization` with the demo's ``contrast_knots``): the
   MIND-SSC maps of T1 and PD differ where the contrast change is not affine, and trained on
   remapped maps the denoiser reads the T1's maps as its own. Scored on the demo's 4 test
   subjects: translation MAE and SSIM (:func:`plasticine.metrics.ssim`, Gaussian window 1.5) inside
   the brain against the true PD-like target, traced ventricle Dice against the truly enlarged
   mask, endpoint error, folding; next to the same for the translator trained on the targets' own
   maps (``own maps only``, the paper's Algorithm 2 as written), for phi = identity and for no
   translation.

Outputs (``--output``, default ``crossmodal-results``): ``results.json`` (settings, seeds, every
number, per-slice scores), ``case.png`` (8 MR and 8 CT slices with their mask contours),
``examples.png`` (held-out MR slices, each method's image with its predicted mask, and the mask
traced back onto the MR next to the truth).

Threads: the default is one torch thread. On a machine whose 2 cores are shared, two threads make
every parallel operation wait for a busy core (a training step measured 6.5 s with 2 threads and
0.9 s with 1 under load); on idle cores ``--threads 2`` is a little faster.

Usage::

    python benchmarks/crossmodal.py                  # both cases with DDIB (1234 s on 2 quiet cores, one thread)
    python benchmarks/crossmodal.py --part mr-ct     # the MR -> CT case only
    python benchmarks/crossmodal.py --part ddib      # its DDIB row alone (same case, CT network and seeds)
    python benchmarks/crossmodal.py --quick          # smoke run: 64 x 64, few slices, tiny steps (about a minute)
    python benchmarks/crossmodal.py --diffusion-steps 2000 --registration-steps 2000 --output runs/xmod
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import format_table, machine_summary  # noqa: E402  (benchmarks/ is a folder of scripts)

from plasticine.core import folding_fraction, inverse_consistency_error  # noqa: E402
from plasticine.data.crossmodal import CrossModalCase, crossmodal_case  # noqa: E402
from plasticine.evaluation import EvaluationSettings, segment, summarize, train_ddib, translate_methods  # noqa: E402
from plasticine.evaluation import segmentation_scores as table1_scores  # noqa: E402
from plasticine.metrics import bhattacharyya_distance, intensity_histogram  # noqa: E402
from plasticine.recipes import MR_CONTRAST_OPTIONS, TrainingRecipe, build_translator, train_translator  # noqa: E402
from plasticine.registration import IdentityRegistration  # noqa: E402
from plasticine.segmentation import SegmentationUNet, SegmentationUNetConfig, dice, iou, pixel_accuracy, train_segmentation  # noqa: E402
from plasticine.training import ContrastRandomization  # noqa: E402

METHODS = (
    "no translation",
    "histogram matching",
    "intensity inversion",
    "plasticine, phi = identity",
    "register, then translate",
    "DDIB",
    "plasticine, traced",
)


@dataclass(frozen=True)
class Settings:
    """Everything that decides the numbers of a run.

    Attributes:
        size: slice side in pixels (field of view 208 mm).
        slice_every: keep every ``slice_every``-th slice of each domain (1: all).
        holdout_every: hold out slice ``i`` when ``i % holdout_every == holdout_every // 2``.
        diffusion_steps: denoiser training steps (stage 1 of the recipe).
        registration_steps: registration training steps (stage 2).
        learning_rate: Adam's, both stages.
        pd_diffusion_steps: stage 1 of the T1 -> PD case.
        pd_registration_steps: stage 2 of the T1 -> PD case.
        segmentation_steps: training steps of the CT segmentation network.
        segmentation_width: its first-level channels (depth 4).
        ddib_steps: training steps of each of the two condition-free DDIB models.
        ddib_sampler_steps: DDIM steps each way of the DDIB translation.
        batch_size: batch of every training.
        seed: seed of the translator's weights and training; the segmentation uses ``seed + 10``,
            translation ``seed + 20``, the DDIB models ``seed + 30`` and ``seed + 31``.
        bins: histogram bins on ``[0, 1]`` (plus an underflow and an overflow bin).
        threads: torch CPU threads.

    Shape:
        Not applicable.
    """

    size: int = 128
    slice_every: int = 1
    holdout_every: int = 4
    diffusion_steps: int = 1600
    registration_steps: int = 300
    learning_rate: float = 1e-3
    pd_diffusion_steps: int = 700
    pd_registration_steps: int = 300
    segmentation_steps: int = 400
    segmentation_width: int = 16
    ddib_steps: int = 400
    ddib_sampler_steps: int = 20
    batch_size: int = 4
    seed: int = 0
    bins: int = 64
    threads: int = 1


#: The T1 -> PD translator: :func:`~plasticine.recipes.build_translator` with these options (and the grid):
#: the recipe for two MR contrasts and the population registration.
T1PD_OPTIONS: dict[str, Any] = {**MR_CONTRAST_OPTIONS, "registration": "population"}

QUICK = dict(size=64, slice_every=3, diffusion_steps=20, registration_steps=10, segmentation_steps=30, segmentation_width=8, ddib_steps=4, ddib_sampler_steps=2, pd_diffusion_steps=4, pd_registration_steps=4)
STEP_OPTIONS = ("diffusion_steps", "registration_steps", "segmentation_steps", "ddib_steps", "ddib_sampler_steps", "pd_diffusion_steps", "pd_registration_steps")


# -- baselines and scores -----------------------------------------------------------------------
def histogram_match(image: np.ndarray, mask: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Map the intensities inside ``mask`` so that their quantiles are those of ``reference``; zero outside.

    The classical mapping (as scikit-image's ``match_histograms``): each distinct value of
    ``image[mask]`` at empirical cumulative level :math:`F(v)` becomes the reference's value at the
    same level, linearly interpolated in the reference's empirical quantile function.

    Args:
        image: one image.
        mask: where to match (the head), bool, nonempty.
        reference: the reference intensities (e.g. every CT value inside the CT heads).

    Returns:
        float32 image: matched values inside ``mask``, 0 outside.

    Raises:
        ValueError: for an empty mask or reference, or shapes that differ.

    Shape:
        image, mask: ``(H, W)`` (any shape, the same); reference: ``(M,)`` (any shape).
    """
    if image.shape != mask.shape:
        raise ValueError(f"mask: expected the image's shape {image.shape}, got {mask.shape}")
    values, ref = image[mask], np.asarray(reference, dtype=np.float64).ravel()
    if values.size == 0 or ref.size == 0:
        raise ValueError(f"histogram_match: expected a nonempty mask and reference, got {values.size} and {ref.size} values")
    src, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ref_values, ref_counts = np.unique(ref, return_counts=True)
    src_levels = np.cumsum(counts) / values.size
    ref_levels = np.cumsum(ref_counts) / ref.size
    out = np.zeros(image.shape, dtype=np.float32)
    out[mask] = np.interp(src_levels, ref_levels, ref_values)[inverse.ravel()]
    return out


def invert_inside(image: np.ndarray, head: np.ndarray) -> np.ndarray:
    """Intensity inversion inside the head: ``(1 - x) * head``.

    Args:
        image: image in ``[0, 1]``.
        head: the head mask.

    Returns:
        float32 image.

    Shape:
        image, head: any shape, the same; out: the same.
    """
    return ((1.0 - image) * head).astype(np.float32)




def segmentation_scores(prediction: torch.Tensor, truth: torch.Tensor) -> dict[str, list[float]]:
    """Per-slice Dice of the foreground, mean IoU (background and foreground) and pixel accuracy.

    Shape:
        prediction, truth: ``(n, 1, H, W)`` int64 labels in {0, 1}.
    """
    return {
        "dice": dice(prediction, truth, 2)[:, 1].tolist(),
        "mean_iou": iou(prediction, truth, 2, reduction="mean_class").tolist(),
        "accuracy": pixel_accuracy(prediction, truth, 2).tolist(),
    }


# -- the run ------------------------------------------------------------------------------------
def split(n: int, every: int) -> tuple[list[int], list[int]]:
    """Indices ``(train, held_out)`` of ``n`` slices: slice ``i`` is held out when ``i % every == every // 2``.

    Shape:
        Not applicable.
    """
    held = [i for i in range(n) if i % every == every // 2]
    return [i for i in range(n) if i not in held], held


def _tensor(a: np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).to(dtype)[:, None]


def _summary(per_slice: dict[str, list[float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, values in per_slice.items():
        out[f"{key}_mean"] = float(np.mean(values))
        out[f"{key}_std"] = float(np.std(values))
    return out


def _recipe(settings: Settings, diffusion_steps: int, registration_steps: int, contrast: ContrastRandomization | None = None) -> TrainingRecipe:
    """The benchmark's training recipe: the settings' batch, rate and seed, no checkpoints, quiet.

    Shape:
        Not applicable.
    """
    return TrainingRecipe(
        diffusion_steps=diffusion_steps,
        registration_steps=registration_steps,
        batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        seed=settings.seed,
        checkpoint_every=0,
        progress="none",
        contrast=contrast,
    )


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _case(settings: Settings) -> CrossModalCase:
    """The MR -> CT case at the settings' size, every ``slice_every``-th slice.

    Shape:
        Not applicable.
    """
    case = crossmodal_case(settings.size)
    every = settings.slice_every
    return CrossModalCase(
        **{k: getattr(case, k)[::every] for k in ("source", "source_brain", "source_head", "target", "target_intracranial", "target_head")},
        pixel_mm=case.pixel_mm,
        source_slices=case.source_slices[::every],
        target_slices=case.target_slices[::every],
    )


def _ct_network(settings: Settings, ct: torch.Tensor, ct_ic: torch.Tensor, ct_train: list[int], ct_test: list[int]) -> tuple[Any, list[float], dict[str, list[float]]]:
    """The CT segmentation network (seed ``seed + 10``), its losses and its held-out CT scores.

    Shape:
        ct, ct_ic: ``(n, 1, H, W)``.
    """
    gen = torch.Generator().manual_seed(settings.seed + 10)
    seg = SegmentationUNet(1, 2, 2, SegmentationUNetConfig(depth=4, base_width=settings.segmentation_width), generator=gen)
    seg_losses = train_segmentation(seg, ct[ct_train], ct_ic[ct_train], settings.segmentation_steps, gen, batch_size=settings.batch_size)
    seg.eval()
    return seg, seg_losses, segmentation_scores(segment(seg, ct[ct_test]), ct_ic[ct_test])


def _ddib_settings(settings: Settings) -> EvaluationSettings:
    """The settings of :func:`plasticine.evaluation.train_ddib` for this run (seeds ``seed + 30``, ``seed + 31``).

    Shape:
        Not applicable.
    """
    return EvaluationSettings(ddib_steps=settings.ddib_steps, ddib_sampler_steps=settings.ddib_sampler_steps, batch_size=settings.batch_size, learning_rate=settings.learning_rate, seed=settings.seed, progress=True)


def _ddib_seeds(ddib_settings: EvaluationSettings) -> dict[str, int]:
    """The DDIB models' seeds, for the results.

    Shape:
        Not applicable.
    """
    return {k: v for k, v in ddib_settings.seeds().items() if k.startswith("ddib")}


def _ddib_record(settings: Settings, ddib: Any) -> dict[str, Any]:
    """How the DDIB baseline was made, for the results.

    Shape:
        Not applicable.
    """
    return {"trained_steps": settings.ddib_steps, "sampler_steps": ddib.steps, "data_range": list(ddib.data_range), "prediction": ddib.bridge.prediction, "clip": list(ddib.bridge.clip)}


def _method_scores(image: torch.Tensor, in_source: torch.Tensor, truth: torch.Tensor, head: torch.Tensor, brain: torch.Tensor, ct_hist: np.ndarray, pixel_mm: float, bins: int) -> dict[str, Any]:
    """One method's row: traced scores, Table I columns, histogram distance to CT, means inside the head and brain.

    Args:
        image: the method's images; in_source: their masks in the MR geometry; truth: the MR brain masks;
        head, brain: the head and brain masks in the images' geometry; ct_hist: the reference histogram.

    Shape:
        every tensor: ``(n, 1, H, W)``.
    """
    scores = segmentation_scores(in_source, truth)
    values = image[head > 0.5].numpy()
    hist = intensity_histogram(values, bins)
    return {
        **_summary(scores),
        "per_slice": scores,
        "table1": summarize(table1_scores(in_source, truth, 2, spacing=(pixel_mm, pixel_mm))),
        "bhattacharyya_to_ct": bhattacharyya_distance(hist, ct_hist),
        "fraction_outside_0_1": float(hist[-2:].sum()),
        "mean_inside_head": float(values.mean()),
        "mean_inside_brain": float(image[brain > 0.5].mean()),
    }


def run_ddib(settings: Settings, output: Path) -> dict[str, Any]:
    """The DDIB row of the MR -> CT case alone: the same case, held-out slices, CT network and seeds as :func:`run`.

    DDIB needs the translator's architecture, schedule and data range only, not its weights, so the
    translator is built (seed ``seed``) and not trained. Writes ``ddib.json`` into ``output``.

    Shape:
        Not applicable.
    """
    torch.set_num_threads(settings.threads)
    output.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    case = _case(settings)
    mr_train, mr_test = split(len(case.source), settings.holdout_every)
    ct_train, ct_test = split(len(case.target), settings.holdout_every)
    mr, ct = _tensor(case.source), _tensor(case.target)
    truth = _tensor(case.source_brain, torch.int64)[mr_test]
    seg, _, ct_scores = _ct_network(settings, ct, _tensor(case.target_intracranial, torch.int64), ct_train, ct_test)
    _log(f"segmentation: held-out CT Dice {np.mean(ct_scores['dice']):.3f} ({time.perf_counter() - t0:.0f} s)")
    ddib_settings = _ddib_settings(settings)
    ddib = train_ddib(build_translator(2, 1, seed=settings.seed), mr[mr_train], ct[ct_train], ddib_settings)
    x = mr[mr_test]
    with torch.no_grad():
        image = ddib(x)
    ct_hist = intensity_histogram(case.target[ct_test][case.target_head[ct_test]], settings.bins)
    head = _tensor(case.source_head[mr_test])
    row = _method_scores(image, segment(seg, image), truth, head, truth.float(), ct_hist, case.pixel_mm, settings.bins)
    results = {
        "settings": asdict(settings),
        "seeds": {"segmentation": settings.seed + 10, **_ddib_seeds(ddib_settings)},
        "ddib": _ddib_record(settings, ddib),
        "segmentation": {"ct_held_out": _summary(ct_scores)},
        "methods": {"DDIB": row},
        "time_s": time.perf_counter() - t0,
    }
    (output / "ddib.json").write_text(json.dumps(results, indent=1))
    return results


def run(settings: Settings, output: Path) -> dict[str, Any]:
    """Run the benchmark, write ``results.json`` and the PNGs into ``output``, return the results.

    Shape:
        Not applicable.
    """
    torch.set_num_threads(settings.threads)
    output.mkdir(parents=True, exist_ok=True)
    clock: dict[str, float] = {}
    t0 = time.perf_counter()
    case = _case(settings)
    clock["load_s"] = time.perf_counter() - t0
    mr_train, mr_test = split(len(case.source), settings.holdout_every)
    ct_train, ct_test = split(len(case.target), settings.holdout_every)
    _log(f"case: {len(case.source)} MR and {len(case.target)} CT slices of {settings.size} x {settings.size} at {case.pixel_mm} mm; held out {len(mr_test)} MR, {len(ct_test)} CT")
    save_case_preview(case, output / "case.png")

    mr, ct = _tensor(case.source), _tensor(case.target)
    brain = _tensor(case.source_brain, torch.int64)
    head = case.source_head
    ct_ic = _tensor(case.target_intracranial, torch.int64)

    # 1. the CT segmentation network
    t = time.perf_counter()
    seg, seg_losses, ct_scores = _ct_network(settings, ct, ct_ic, ct_train, ct_test)
    clock["segmentation_training_s"] = time.perf_counter() - t
    _log(f"segmentation: held-out CT Dice {np.mean(ct_scores['dice']):.3f} ({clock['segmentation_training_s']:.0f} s)")

    # 2. the translator, the default recipe with fewer steps
    t = time.perf_counter()
    translator = build_translator(2, 1, seed=settings.seed)
    recipe = _recipe(settings, settings.diffusion_steps, settings.registration_steps)
    train_losses = train_translator(translator, mr[mr_train], ct[ct_train], recipe)
    clock["translator_training_s"] = time.perf_counter() - t
    _log(f"translator trained: {settings.diffusion_steps} + {settings.registration_steps} steps ({clock['translator_training_s']:.0f} s); losses {train_losses}")

    # the DDIB baseline: two condition-free models of the denoiser's architecture, one per domain
    t = time.perf_counter()
    ddib_settings = _ddib_settings(settings)
    ddib = train_ddib(translator, mr[mr_train], ct[ct_train], ddib_settings)
    clock["ddib_training_s"] = time.perf_counter() - t
    _log(f"DDIB trained: {settings.ddib_steps} steps per model ({clock['ddib_training_s']:.0f} s)")

    # 3. every method's image for the CT network, its mask in the MR's geometry, its head
    t = time.perf_counter()
    x, truth = mr[mr_test], brain[mr_test]
    head_x = _tensor(head[mr_test])
    reference = case.target[ct_train][case.target_head[ct_train]]
    images: dict[str, torch.Tensor] = {
        "no translation": x,
        "histogram matching": _tensor(np.stack([histogram_match(case.source[i], head[i], reference) for i in mr_test])),
        "intensity inversion": _tensor(invert_inside(case.source[mr_test], head[mr_test])),
    }
    heads: dict[str, torch.Tensor] = {name: head_x for name in images}
    seed = settings.seed + 20
    composed = translate_methods(translator, x, seed=seed, ddib=ddib)  # the composed baselines of plasticine.evaluation
    phi = composed["plasticine, traced"].deformation
    warped_head = (phi.to_target(head_x) > 0.5).float()
    traced = {name for name, o in composed.items() if o.deformation is not None}
    for name in METHODS[3:]:
        images[name] = composed[name].image
        heads[name] = warped_head if name in traced else head_x
    predicted = {name: segment(seg, image) for name, image in images.items()}
    in_source = {name: phi.labels_to_source(p, 2) if name in traced else p for name, p in predicted.items()}
    clock["translation_and_scoring_s"] = time.perf_counter() - t

    ct_hist = intensity_histogram(case.target[ct_test][case.target_head[ct_test]], settings.bins)
    methods = {
        name: _method_scores(images[name], in_source[name], truth, heads[name], phi.to_target(truth.float()) if name in traced else truth.float(), ct_hist, case.pixel_mm, settings.bins)
        for name in METHODS
    }
    clock["total_s"] = time.perf_counter() - t0
    results = {
        "settings": asdict(settings),
        "seeds": {"translator": settings.seed, "segmentation": settings.seed + 10, "translation": seed, **_ddib_seeds(ddib_settings)},
        "ddib": _ddib_record(settings, ddib),
        "recipe": asdict(recipe),
        "translator": repr(translator),
        "case": {
            "pixel_mm": case.pixel_mm,
            "source_slices": list(case.source_slices),
            "target_slices": list(case.target_slices),
            "mr_train": mr_train,
            "mr_held_out": mr_test,
            "ct_train": ct_train,
            "ct_held_out": ct_test,
        },
        "segmentation": {"ct_held_out": _summary(ct_scores), "ct_per_slice": ct_scores, "final_loss": seg_losses[-1], "config": asdict(seg.settings)},
        "methods": methods,
        "intensity": {
            "histogram": f"{settings.bins} equal bins on [0, 1] plus one below 0 and one above 1",
            "mask": "the head: the MR head mask (warped by phi for images in the target geometry); the real CT's head masks for the reference",
            "reference": "the held-out CT slices inside their head masks",
            "ct_mean_inside_head": float(case.target[ct_test][case.target_head[ct_test]].mean()),
            "ct_mean_inside_intracranial": float(case.target[ct_test][case.target_intracranial[ct_test]].mean()),
            "mr_mean_inside_brain": float(case.source[mr_test][case.source_brain[mr_test]].mean()),
            "mae_psnr_ssim": "not applicable: no paired CT truth for the MR slices",
        },
        "deformation": {
            "folded_fraction_max": float(folding_fraction(phi.forward).max()),
            "inverse_consistency_voxels": float(inverse_consistency_error(phi.forward, phi.inverse).mean()),
            "max_displacement_voxels": float(phi.forward.norm(dim=1).max()),
        },
        "training_losses": train_losses,
        "time": clock,
        "machine": machine_summary("cpu"),
    }
    (output / "results.json").write_text(json.dumps(results, indent=1))
    save_examples(case, mr_test, images, predicted, in_source, truth, output / "examples.png")
    return results


def run_t1_pd(settings: Settings, output: Path) -> dict[str, Any]:
    """The T1 -> PD case trained unpaired: write ``t1pd.json`` and ``t1pd.png`` into ``output``, return the results.

    Shape:
        Not applicable.
    """
    from plasticine.demo import QUICK as DEMO_QUICK
    from plasticine.demo import DemoConfig, evaluate, make_cohort
    from plasticine.metrics import mae, ssim

    torch.set_num_threads(settings.threads)
    output.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    config = DEMO_QUICK if settings.pd_diffusion_steps < 20 else DemoConfig()
    train = make_cohort(config, config.train_subjects, config.seed + 1, include_real=False)
    test = make_cohort(config, config.test_subjects, config.seed, include_real=True)
    options = {**T1PD_OPTIONS, "shape": tuple(config.shape)}
    contrast = ContrastRandomization(config.contrast_knots)
    models, recipes, losses, train_s = {}, {}, {}, {}
    for key, randomized in (("contrast", contrast), ("own maps", None)):
        t1 = time.perf_counter()
        models[key] = build_translator(2, 1, **options, seed=settings.seed)
        recipes[key] = recipe = _recipe(settings, settings.pd_diffusion_steps, settings.pd_registration_steps, randomized)
        losses[key] = train_translator(models[key], train.sources, train.targets, recipe)
        train_s[key] = time.perf_counter() - t1
        _log(f"T1 -> PD translator trained unpaired ({key}): {recipe.diffusion_steps} denoiser steps, population registration fitted ({train_s[key]:.0f} s)")
    translator = models["contrast"]
    rows: dict[str, Any] = {}
    brain = test.brain
    images = {}
    truth: dict[str, Any] = {}
    methods = (
        ("plasticine, traced", translator),
        ("plasticine, traced, own maps only", models["own maps"]),
        ("plasticine, phi = identity", translator.replace(registration=IdentityRegistration()).eval()),
    )
    for name, model in methods:
        metrics, result = evaluate(model, test, seed=settings.seed + 20)
        truth = metrics["per_subject"]  # the *_identity scores depend on the cohort only
        images[name] = result.image
        rows[name] = {
            "mae_in_brain": mae(result.image, test.targets, brain).tolist(),
            "ssim_in_brain": ssim(result.image, test.targets, 1.0, brain).tolist(),
            **{k: metrics["per_subject"][k] for k in ("ventricle_dice", "endpoint_error", "landmark_error", "folding_fraction")},
        }
    rows["no translation"] = {
        "mae_in_brain": mae(test.sources, test.targets, brain).tolist(),
        "ssim_in_brain": ssim(test.sources, test.targets, 1.0, brain).tolist(),
        "ventricle_dice": truth["ventricle_dice_identity"],
        "endpoint_error": truth["endpoint_error_identity"],
        "landmark_error": truth["landmark_error_identity"],
        "folding_fraction": [0.0] * len(test),
    }
    results = {
        "settings": {"demo": asdict(config), "recipe": asdict(recipes["contrast"]), "translator": options},
        "translator": repr(translator),
        "methods": {name: {**{f"{k}_mean": float(np.mean(v)) for k, v in row.items()}, "per_subject": row} for name, row in rows.items()},
        "test_subjects": len(test),
        "training_losses": losses,
        "training_s": train_s,
        "time_s": time.perf_counter() - t0,
    }
    (output / "t1pd.json").write_text(json.dumps(results, indent=1))
    save_t1_pd(test, images, output / "t1pd.png")
    return results


def save_t1_pd(test: Any, images: dict[str, torch.Tensor], path: Path) -> None:
    """A PNG: per test subject, the T1 source, each translation and the true PD-like target.

    Shape:
        Not applicable.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [("T1 source", test.sources), *images.items(), ("true PD-like target", test.targets)]
    fig, axes = plt.subplots(len(test), len(columns), figsize=(2.2 * len(columns), 2.6 * len(test)), squeeze=False, layout="constrained")
    for r in range(len(test)):
        for c, (name, stack) in enumerate(columns):
            axes[r, c].imshow(stack[r, 0].numpy(), cmap="gray", vmin=0, vmax=1)
            axes[r, c].set_title(name, fontsize=7)
            axes[r, c].axis("off")
    fig.savefig(path, dpi=80)
    plt.close(fig)


# -- pictures -----------------------------------------------------------------------------------
def save_case_preview(case: CrossModalCase, path: Path, count: int = 8) -> None:
    """A PNG of ``count`` MR slices (brain mask red, head cyan) over ``count`` CT slices (intracranial red, head cyan).

    Shape:
        Not applicable.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, count, figsize=(2 * count, 4.8), layout="constrained")
    rows = (
        (case.source, case.source_brain, case.source_head, case.source_slices, "MR z"),
        (case.target, case.target_intracranial, case.target_head, case.target_slices, "CT y"),
    )
    for ax_row, (image, inner, outer, index, name) in zip(axes, rows):
        for ax, i in zip(ax_row, np.linspace(0, len(image) - 1, count).round().astype(int)):
            ax.imshow(image[i], cmap="gray", vmin=0, vmax=1)
            ax.contour(inner[i], [0.5], colors="r", linewidths=0.6)
            ax.contour(outer[i], [0.5], colors="c", linewidths=0.6)
            ax.set_title(f"{name} = {index[i]}", fontsize=8)
            ax.axis("off")
    fig.suptitle("rows: anterior (top) to posterior; columns: right to left; red: brain / intracranial, cyan: head", fontsize=9)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def save_examples(case, held_out, images, predicted, in_source, truth, path: Path, count: int = 3) -> None:
    """A PNG: per example slice, each method's image with its predicted mask (top) and the mask on the MR (bottom).

    Red: the predicted (top) or traced (bottom) mask; green: the MR brain mask.

    Shape:
        Not applicable.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picks = np.linspace(0, len(held_out) - 1, min(count, len(held_out))).round().astype(int)
    fig, axes = plt.subplots(2 * len(picks), len(METHODS), figsize=(2.2 * len(METHODS), 4.6 * len(picks)), squeeze=False, layout="constrained")
    for r, k in enumerate(picks):
        for c, name in enumerate(METHODS):
            top, bottom = axes[2 * r, c], axes[2 * r + 1, c]
            top.imshow(images[name][k, 0].numpy(), cmap="gray", vmin=0, vmax=1)
            top.contour(predicted[name][k, 0].numpy(), [0.5], colors="r", linewidths=0.6)
            bottom.imshow(case.source[held_out[k]], cmap="gray", vmin=0, vmax=1)
            bottom.contour(truth[k, 0].numpy(), [0.5], colors="lime", linewidths=0.6)
            bottom.contour(in_source[name][k, 0].numpy(), [0.5], colors="r", linewidths=0.6)
            top.set_title(name, fontsize=7)
            bottom.set_title(f"MR z={case.source_slices[held_out[k]]}, Dice {float(dice(in_source[name][k : k + 1], truth[k : k + 1], 2)[0, 1]):.2f}", fontsize=7)
            top.axis("off")
            bottom.axis("off")
    fig.savefig(path, dpi=80)
    plt.close(fig)


def t1_pd_table(results: dict[str, Any]) -> str:
    """The T1 -> PD results as text.

    Shape:
        Not applicable.
    """
    rows = []
    for name, m in results["methods"].items():
        rows.append([name, f"{m['mae_in_brain_mean']:.3f}", f"{m['ssim_in_brain_mean']:.3f}", f"{m['ventricle_dice_mean']:.3f}", f"{m['endpoint_error_mean']:.3f}", f"{m['landmark_error_mean']:.3f}", f"{m['folding_fraction_mean']:.4f}"])
    headers = ["method", "MAE in brain", "SSIM in brain", "traced ventricle Dice", "endpoint error", "landmark error", "folded"]
    return format_table(headers, rows, ["<", ">", ">", ">", ">", ">", ">"])


def table(results: dict[str, Any]) -> str:
    """The results table as text.

    Shape:
        Not applicable.
    """
    rows = []
    for name in (m for m in METHODS if m in results["methods"]):
        m = results["methods"][name]
        rows.append(
            [
                name,
                f"{m['dice_mean']:.3f} +- {m['dice_std']:.3f}",
                f"{m['mean_iou_mean']:.3f}",
                f"{m['accuracy_mean']:.3f}",
                f"{m['bhattacharyya_to_ct']:.3f}",
                f"{m['fraction_outside_0_1']:.3f}",
                f"{m['mean_inside_brain']:.3f}",
            ]
        )
    headers = ["method", "traced Dice", "mean IoU", "accuracy", "Bhattacharyya to CT", "outside [0,1]", "mean in brain"]
    return format_table(headers, rows, ["<", ">", ">", ">", ">", ">", ">"])


def per_class_table(results: dict[str, Any]) -> str:
    """The paper's Table I columns per class (0 background, 1 brain) and averaged, with HD95 in mm.

    From :func:`plasticine.evaluation.summarize`: accuracy (per class: :math:`|P_c \cap T_c| / |T_c|`;
    ``mean``: pixel accuracy), Dice, IoU (``mean``: over both classes), HD95 (``mean``: the brain's),
    and the slices where HD95 is undefined (the class in one mask only).

    Shape:
        Not applicable.
    """

    def fmt(value: float | None, digits: int = 3) -> str:
        return "n/a" if value is None else f"{value:.{digits}f}"

    rows = []
    for name in (m for m in METHODS if m in results["methods"]):
        t = results["methods"][name]["table1"]
        m = t["mean"]
        rows.append([name, "mean", fmt(m["accuracy"]), fmt(m["dice"]), fmt(m["mean_iou"]), fmt(m["hd95_mm"], 2), str(m["hd95_undefined"])])
        for c, r in t["per_class"].items():
            rows.append(["", c, fmt(r["accuracy"]), fmt(r["dice"]), fmt(r["iou"]), fmt(r["hd95_mm"], 2), str(r["hd95_undefined"])])
    headers = ["method", "class", "accuracy", "Dice", "IoU", "HD95 (mm)", "HD95 undefined"]
    return format_table(headers, rows, ["<", ">", ">", ">", ">", ">", ">"])


def main(argv: list[str] | None = None) -> None:
    """Parse the options, run, print the tables."""
    defaults = Settings()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 64 x 64, every third slice, tiny step counts")
    p.add_argument("--part", choices=("all", "mr-ct", "t1pd", "ddib"), default="all", help="which case to run (default: both; ddib: the MR -> CT case's DDIB row alone)")
    p.add_argument("--output", type=Path, default=Path("crossmodal-results"), help="folder for results.json, t1pd.json and the PNGs")
    p.add_argument("--threads", type=int, default=defaults.threads, help="torch CPU threads (default 1, see the module notes)")
    p.add_argument("--seed", type=int, default=defaults.seed)
    for name in STEP_OPTIONS:
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None, help=f"default {getattr(defaults, name)} ({QUICK[name]} with --quick)")
    args = p.parse_args(argv)
    chosen = dict(QUICK) if args.quick else {}
    for name in STEP_OPTIONS:
        if getattr(args, name) is not None:
            chosen[name] = getattr(args, name)
    for name, value in {**{k: chosen[k] for k in STEP_OPTIONS if k in chosen}, "threads": args.threads}.items():
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected an int >= 1, got {value}")
    settings = Settings(**chosen, threads=args.threads, seed=args.seed)
    start = time.perf_counter()
    if args.part in ("all", "mr-ct"):
        results = run(settings, args.output)
        s, seg = results["settings"], results["segmentation"]["ct_held_out"]
        print(
            f"MR -> CT, unpaired, {s['size']} x {s['size']} at {results['case']['pixel_mm']} mm; {len(results['case']['mr_held_out'])} held-out MR slices; "
            f"translator: build_translator defaults, {s['diffusion_steps']} + {s['registration_steps']} training steps; "
            f"CT segmentation: {s['segmentation_steps']} steps, held-out CT Dice {seg['dice_mean']:.3f}"
        )
        print(table(results))
        print("Table I columns per class (0: background, 1: brain; HD95 in mm):")
        print(per_class_table(results))
        d = results["deformation"]
        print(f"phi: folded fraction {d['folded_fraction_max']:.4f} (max over slices), inverse consistency {d['inverse_consistency_voxels']:.3f} voxel, max |u| {d['max_displacement_voxels']:.1f} voxels")
        print(f"real CT mean inside the head {results['intensity']['ct_mean_inside_head']:.3f}, inside the skull {results['intensity']['ct_mean_inside_intracranial']:.3f}")
        print(f"time: {results['time']['total_s']:.0f} s ({json.dumps({k: round(v) for k, v in results['time'].items()})})")
    if args.part == "ddib":
        results = run_ddib(settings, args.output)
        s, seg = results["settings"], results["segmentation"]["ct_held_out"]
        print(f"MR -> CT, the DDIB row alone: {s['ddib_steps']} steps per model, {s['ddib_sampler_steps']} DDIM steps each way; CT segmentation: {s['segmentation_steps']} steps, held-out CT Dice {seg['dice_mean']:.3f}")
        print(table(results))
        print("Table I columns per class (0: background, 1: brain; HD95 in mm):")
        print(per_class_table(results))
        print(f"time: {results['time_s']:.0f} s")
    if args.part in ("all", "t1pd"):
        pd = run_t1_pd(settings, args.output)
        r = pd["settings"]["recipe"]
        opts = ", ".join(f"{k}={v!r}" for k, v in pd["settings"]["translator"].items())
        knots = r["contrast"]["knots"]
        print(f"\nT1 -> PD (the demo's task), trained unpaired: build_translator({opts}), {r['diffusion_steps']} denoiser steps, conditions from targets remapped by ContrastRandomization(knots={knots}) (own maps only: without it); {pd['test_subjects']} test subjects")
        print(t1_pd_table(pd))
        print(f"time: {pd['time_s']:.0f} s")
    print(f"total time: {time.perf_counter() - start:.0f} s; written to {args.output}")


if __name__ == "__main__":
    main()
