"""The ``plasticine`` command line: ``train``, ``translate``, ``trace``, ``evaluate``, ``demo`` and ``view``.

Run ``plasticine <command> --help`` for the options of each (``python -m plasticine`` is the same).

* ``plasticine train --source SRC --target TGT --output model.pt`` trains a translator on two
  unpaired image folders (PNG, NIfTI or DICOM; ``--axis`` slices 3D volumes into 2D images, without
  it a folder of volumes trains a 3D translator, on random ``--patch`` patches where whole volumes
  do not fit a batch): the
  denoiser first (the paper's Algorithm 2, :func:`~plasticine.training.diffusion_objective`), then
  the registration network (:func:`~plasticine.training.deformation_objective` on unpaired
  source/target pairs). The translator is :func:`plasticine.recipes.build_translator` with the
  options ``--structure``, ``--classes``, ``--mind-sigma``, ``--rim-depth``, ``--prediction``, ``--data-range``
  (``--no-data-range``), ``--no-clip``, ``--start``, ``--start-fraction``, ``--sampler-steps`` and
  ``--registration``: ``learned`` (default, the paper's network, a field per image) or
  ``population`` (:class:`~plasticine.registration.PopulationRegistration`: one field for every
  image, the mean source registered to the mean target, fitted instead of trained; for sets that
  differ by a change all subjects share, it cannot follow per-subject differences; every source and
  target image must be on one grid, otherwise a one-line error says so);
  the training is :class:`~plasticine.recipes.TrainingRecipe` with ``--ema-decay``,
  ``--augment``, ``--snr-gamma`` and ``--contrast-randomization``
  (:class:`~plasticine.training.ContrastRandomization`). The smoothness term of the registration network is taken in
  millimetres with the voxel spacing of the images' affines (:func:`plasticine.io.voxel_spacing`)
  when all source and target images share one that is not 1 (anisotropic voxels are then
  regularised as the physical field they sample); images of different spacings are regularised
  in voxels, and a note says so. The spacing used is recorded in ``model.losses.json``. The defaults are those of ``build_translator``: the filled head mask as
  the structure map, x0 prediction on data mapped to [-1, 1] and clipped
  there at every step, generation from pure noise in the warped source's geometry. Each stage
  writes a training checkpoint next to the output (``model.pt.diffusion-state.pt``,
  ``model.pt.registration-state.pt``) every ``--checkpoint-every`` steps; running the same command
  again resumes where it stopped (and a larger ``--*-steps`` continues training). At the end it
  prints the last logged losses of both stages and writes them, with the settings used, to
  ``model.losses.json`` (``<output stem>.losses.json``; a stage that was already complete in its
  checkpoint ran no step and has no losses).
* ``plasticine translate --model model.pt --input IN --output OUT`` (a registration backend
  regularised in mm, one with a ``with_spacing`` method such as
  :class:`~plasticine.registration.IterativeRegistration`, gets each input's voxel spacing from its
  affine) writes, per input image,
  ``<name>_translated.nii.gz`` (the translation as float32 NIfTI, nothing clamped; it needs
  nibabel, without it a note is printed and only the preview is written), for 2D images of 1 or 3
  channels an 8-bit preview ``<name>_translated.png`` (values outside [0, 1] are clipped there,
  and the count is printed), ``<name>_deformation.npz`` (phi and phi^-1, see
  :func:`plasticine.io.write_deformation`; ``--deformation-format nii.gz`` writes NIfTI voxel
  displacements, ``itk`` ANTs' ``<name>Warp.nii.gz`` and ``<name>InverseWarp.nii.gz``, see
  :func:`plasticine.io.write_itk_deformation`) and ``<name>_trace.json`` (a trace file: the
  ``--points`` carried into the translation in voxels and in world millimetres, the affine, the
  files written, and how the output was made). Every NIfTI output carries the input's
  voxel-to-world affine (:meth:`plasticine.io.ImageFolder.affine`: the file's, or the slice's with
  ``--axis``): the translation and phi live on the source's voxel grid, so they overlay the input
  in a viewer. ``--points-space world`` reads ``--points`` as RAS millimetres.
  ``--no-registration`` translates with phi = identity
  (:class:`~plasticine.registration.IdentityRegistration`), the baseline without a deformation.
  ``--patch`` (and ``--overlap``) runs the networks on overlapping patches of each image, stitched
  with blending weights (:class:`~plasticine.diffusion.PatchwiseDenoiser`,
  :class:`~plasticine.registration.PatchwiseRegistration`: the velocity is stitched, then integrated
  once); each volume's progress goes to stderr (``--quiet`` silences it). The translator's
  dimensionality must match the input's (a volume given to a 2D translator is refused: use ``--axis``).
* ``plasticine trace --deformation X_deformation.npz --mask M --output OUT`` (or ``--points P``)
  carries a mask or points through a saved result: ``--direction to-target`` (default) from the
  source into the translation (mask o phi, points phi^-1(p)), ``to-source`` back (mask o phi^-1,
  points phi(q)); a traced mask keeps the affine of the ``--mask`` file, and traced points of a
  NIfTI deformation are also written in world millimetres through the affine of its header.
* ``plasticine evaluate --source S --source-labels SL --target T --target-labels TL --model model.pt
  --output OUT`` runs the paper's evaluation (:func:`plasticine.evaluation.evaluate_translation`):
  a segmentation U-Net trained on the targets (``--segmentation-steps``; or loaded with
  ``--segmentation``, written with ``--save-segmentation``), every source translated by the
  translator and each composed baseline (no translation, phi = identity, register then translate,
  DDIB with ``--ddib-steps`` per model unless ``--no-ddib``), segmented and traced back with
  phi^-1, scored against the source labels. Labels are integer images read with the same
  ``--axis``/``--slices`` and no normalisation, paired with the images by sorted name. It prints
  Table I (accuracy, Dice, IoU, HD95 per class and averaged) and the distribution metrics
  (Bhattacharyya, NMI, Frechet on fixed random features; MAE, PSNR, SSIM with ``--truth``) and
  writes ``evaluation.json`` (every number, the settings and seeds), ``table1.csv``,
  ``distribution.csv`` and ``figures/<name>.png`` per source (matplotlib; ``--no-figures`` to skip).
* ``plasticine demo`` runs :func:`plasticine.demo.run_demo` (offline, on the shipped real MR slice);
  ``plasticine demo --3d`` runs :func:`plasticine.demo.run_demo_3d` on a real volume (Colin27, from
  Debian's ``mricron-data``; without it the command says how to install it), training a 3D
  translator on patches first.
* ``plasticine view X_trace.json --output page.html`` writes the interactive tracing viewer
  (:func:`plasticine.viewer.write_viewer`) of one result of translate: source and translation side
  by side, pointer tracking through phi and phi^-1, ``--labels`` (a label image of the source)
  traced into the translation, the deformation grid and the Jacobian map, in one HTML file.

Every option is checked before any work starts. Bad input (a missing or unreadable file, mismatched
shapes, a bad option) prints one line ``plasticine <command>: error: ...`` to stderr and exits with
status 1 (2 for a malformed command line), without a traceback; ``--debug`` shows the traceback.
``--threads`` and ``--debug`` are accepted before or after the subcommand, and ``--help`` shows every
default.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

__all__ = ["main", "build_parser"]


_CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth")
_MASK_SUFFIXES = (".png", ".nii", ".nii.gz")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Help text with the default of every option that has one (not of required or unset ones)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required or action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _common_options() -> argparse.ArgumentParser:
    """Options every subcommand takes (also accepted before the subcommand)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--threads", type=int, default=argparse.SUPPRESS, help=f"CPU threads for torch (default: torch's choice, {torch.get_num_threads()} on this machine)"
    )
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the full traceback of an error")
    return common


def _add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--axis", type=int, choices=(0, 1, 2), default=None, help="slice 3D volumes into 2D images along this array axis")
    p.add_argument("--slices", type=int, nargs=2, metavar=("START", "STOP"), default=None, help="keep slices START <= i < STOP (with --axis)")
    p.add_argument(
        "--normalization",
        choices=("percentile", "minmax", "zscore", "none"),
        default="percentile",
        help="intensity normalisation per image (default: clip to the 1st-99th percentiles, map to [0, 1])",
    )


def _add_patch_option(p: argparse.ArgumentParser, text: str) -> None:
    p.add_argument("--patch", type=int, nargs="+", metavar="P", default=None, help=text)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``plasticine`` command.

    Returns:
        The parser with the ``train``, ``translate``, ``trace``, ``evaluate``, ``demo`` and ``view`` subcommands.

    Shape:
        Not applicable.
    """
    from .diffusion.prediction import PREDICTIONS
    from .recipes import STRUCTURES

    common = _common_options()
    parser = argparse.ArgumentParser(
        prog="plasticine",
        description="Traceable medical image translation (diffusion for intensity, diffeomorphic registration for shape).",
        parents=[common],
        formatter_class=_HelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,translate,trace,evaluate,demo,view}")
    kinds = dict(parents=[common], formatter_class=_HelpFormatter)

    p = sub.add_parser("train", **kinds, help="train a translator on unpaired source and target images", description="Train a translator on unpaired source and target images (resumable).")
    p.add_argument("--source", required=True, help="folder (or file) of source-domain images")
    p.add_argument("--target", required=True, help="folder (or file) of target-domain images")
    p.add_argument("--output", required=True, help="translator file to write (.pt, or .safetensors with the safetensors package)")
    _add_data_options(p)
    p.add_argument(
        "--structure",
        choices=STRUCTURES,
        default=STRUCTURES[0],
        help="structure map the denoiser is conditioned on: the filled head mask (the default, for MR <-> CT), with MIND-SSC on the head's rim or everywhere (two MR contrasts), MIND-SSC alone, k-means classes ranked by intensity, or the paper's 2-class Potts partition",
    )
    p.add_argument("--classes", type=int, default=4, help="k-means classes (with --structure kmeans)")
    p.add_argument("--mind-sigma", type=float, default=2.5, help="MIND-SSC patch width in pixels (with --structure mind, foreground+mind or foreground+rim)")
    p.add_argument("--rim-depth", type=float, default=10.0, help="depth in voxels of the head's rim that carries MIND-SSC (with --structure foreground+rim), >= 1")
    p.add_argument("--prediction", choices=PREDICTIONS, default="x0", help="what the denoiser predicts: the noise (eps, the paper's), the clean image (x0) or v")
    p.add_argument(
        "--data-range",
        type=float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        default=None,
        help="intensity range of the (normalised) images, mapped to [-1, 1] inside the diffusion (default: 0.0 1.0, the range of --normalization percentile and minmax)",
    )
    p.add_argument("--no-data-range", action="store_true", help="diffuse the intensities as they are (no mapping to [-1, 1])")
    p.add_argument("--no-clip", action="store_true", help="do not clip the predicted clean image to [-1, 1] at each sampler step")
    p.add_argument("--start", choices=("warped", "source"), default="warped", help="sampling starts from the noised warped source (the condition's geometry) or the unwarped source (the paper's)")
    p.add_argument(
        "--registration",
        choices=("learned", "population"),
        default="learned",
        help="learned: the paper's registration network, trained on unpaired (source, target) pairs, a field per image; "
        "population: one field for every image, the registration of the mean source to the mean target (the change "
        "common to the two sets, such as an enlargement all subjects share; it cannot follow per-subject differences; "
        "needs every source and target image on one grid)",
    )
    p.add_argument("--diffusion-steps", type=int, default=2000, help="optimizer steps of the denoiser")
    p.add_argument("--registration-steps", type=int, default=2000, help="optimizer steps of the registration network (--registration learned)")
    p.add_argument("--batch-size", type=int, default=4, help="images per optimizer step")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--sampler-steps", type=int, default=20, help="DDIM steps at translation")
    p.add_argument("--start-fraction", type=float, default=1.0, help="start step of translate as a fraction of K (1: from pure noise)")
    p.add_argument("--ema-decay", type=float, default=None, help="decay of the denoiser's weight average, whose weights are kept, in [0, 1) (default: none, the last weights)")
    p.add_argument("--augment", action="store_true", help="random flips, small affine maps and intensity jitter of every training batch")
    p.add_argument("--snr-gamma", type=float, default=None, help="min-SNR loss weighting cap of the denoiser's training, > 0 (default: none, unweighted)")
    p.add_argument(
        "--contrast-randomization",
        action="store_true",
        help="condition the denoiser in training on the structure maps of randomly remapped targets, so that it reads the source's maps as its own "
        "(for maps that depend on the contrast, such as MIND-SSC between two MR contrasts; needs a data range, not with --patch)",
    )
    _add_patch_option(p, "train on one random patch of this size per image and step (one size, or one per spatial axis), for volumes too large for a whole-image batch (default: whole images)")
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between training checkpoints")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights, the batches and the noise")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--quiet", action="store_true", help="no progress output")

    p = sub.add_parser("translate", **kinds, help="translate images with a saved translator", description="Translate images; writes the translation (float32 NIfTI, and an 8-bit PNG preview of 2D images), phi and phi^-1, and a trace file per input.")
    p.add_argument("--model", required=True, help="translator file written by train")
    p.add_argument("--input", required=True, help="folder or file of source images")
    p.add_argument("--output", required=True, help="output folder")
    _add_data_options(p)
    p.add_argument("--start-step", type=int, default=None, help="start step k0 (default: the translator's)")
    p.add_argument("--samples", type=int, default=1, help="draws per image (their mean is written)")
    p.add_argument("--seed", type=int, default=0, help="seed of item i is seed + i")
    p.add_argument("--points", default=None, help="points file (JSON or CSV, source coordinates) to carry into every translation")
    p.add_argument(
        "--points-space",
        choices=("voxel", "world"),
        default="voxel",
        help="coordinates of --points: voxels in tensor axis order, or world x y z in mm (RAS, through the input's affine; on a 2D image or slice within half a voxel of its plane)",
    )
    p.add_argument(
        "--deformation-format",
        choices=("npz", "nii.gz", "itk"),
        default="npz",
        help="file format of phi and phi^-1: npz or NIfTI voxel displacements, or itk: <name>Warp.nii.gz and <name>InverseWarp.nii.gz (ANTs/ITK, LPS mm)",
    )
    p.add_argument("--no-registration", action="store_true", help="translate without a deformation (phi = identity): the baseline that changes intensities only")
    _add_patch_option(p, "run the networks on overlapping patches of this size (one size, or one per spatial axis), stitched with blending weights, for volumes too large to translate at once (default: whole images)")
    p.add_argument("--overlap", type=int, nargs="+", metavar="O", default=None, help="with --patch: voxels shared by neighbouring patches, at most half the patch (default: a quarter of the patch)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--quiet", action="store_true", help="no progress output for volumes")

    p = sub.add_parser("trace", **kinds, help="carry a mask or points through a saved deformation", description="Carry a mask or points through a deformation written by translate.")
    p.add_argument("--deformation", required=True, help="<name>_deformation.npz (or .nii.gz) written by translate")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--mask", help="label or mask image (PNG or NIfTI) in the geometry it is carried from")
    what.add_argument("--points", help="points file (JSON, a trace file, or CSV)")
    p.add_argument("--direction", choices=("to-target", "to-source"), default="to-target", help="to-target: source -> translation; to-source: back")
    p.add_argument("--which", choices=("source", "target"), default=None, help="side of a trace file to read (default: the side the direction starts from)")
    p.add_argument("--output", required=True, help="output: a mask image (.png, .nii, .nii.gz) with --mask, a trace file (.json) with --points")

    p = sub.add_parser("view", **kinds, help="write the interactive tracing viewer of a translation", description="Write one self-contained HTML page (no server, no network) showing the source and its translation side by side, with pointer tracking through phi and phi^-1, traced regions, the deformation grid and the Jacobian map.")
    p.add_argument("result", help="<name>_trace.json written by translate for one input (it names the source, the translation and the deformation)")
    p.add_argument("--output", required=True, help="HTML file to write")
    p.add_argument("--source", default=None, help="source image file (default: the input the trace file names, read as translate read it)")
    p.add_argument("--labels", default=None, help="label image (PNG or NIfTI, integer labels) in the source geometry, traced into the translation")

    p = sub.add_parser(
        "evaluate",
        **kinds,
        help="the paper's evaluation: traced segmentation (Table I) and distribution metrics of a translator and its baselines",
        description="Train (or load) a segmentation U-Net on the target images, translate the sources with the translator and each composed baseline "
        "(no translation, phi = identity, register then translate, DDIB), segment, trace the masks back with phi^-1 and score them against the "
        "source labels; print the tables and write evaluation.json, table1.csv, distribution.csv and one figure per source.",
    )
    p.add_argument("--source", required=True, help="folder (or file) of source-domain images")
    p.add_argument("--source-labels", required=True, help="folder (or file) of their integer label images, paired by sorted name")
    p.add_argument("--target", required=True, help="folder (or file) of target-domain images (the segmentation network's training set)")
    p.add_argument("--target-labels", required=True, help="folder (or file) of their integer label images, paired by sorted name")
    p.add_argument("--model", required=True, help="translator file written by train")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--truth", default=None, help="folder (or file) of the true target-domain image of each source (paired by sorted name): adds MAE, PSNR and SSIM")
    _add_data_options(p)
    p.add_argument("--classes", type=int, default=None, help="number of label classes, background 0 included (default: 1 + the largest label in the target labels)")
    p.add_argument("--segmentation", default=None, help="segmentation network file to load (written by --save-segmentation) instead of training one")
    p.add_argument("--segmentation-steps", type=int, default=400, help="training steps of the segmentation U-Net")
    p.add_argument("--segmentation-width", type=int, default=16, help="its first-level channels")
    p.add_argument("--segmentation-depth", type=int, default=4, help="its number of poolings")
    p.add_argument("--save-segmentation", default=None, help="write the trained segmentation network to this file (.pt or .safetensors)")
    p.add_argument("--ddib-steps", type=int, default=400, help="training steps of each of the two condition-free DDIB models")
    p.add_argument("--ddib-sampler-steps", type=int, default=20, help="DDIM steps each way of the DDIB translation")
    p.add_argument("--no-ddib", action="store_true", help="skip the DDIB baseline")
    p.add_argument("--batch-size", type=int, default=4, help="images per training step (segmentation and DDIB)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (segmentation and DDIB)")
    p.add_argument("--bins", type=int, default=64, help="histogram bins of the Bhattacharyya distance and NMI")
    p.add_argument("--value-range", type=float, nargs=2, metavar=("LOW", "HIGH"), default=(0.0, 1.0), help="histogram range, PSNR peak (its width) and, for a translator without a data range, the DDIB models' data range")
    p.add_argument("--spacing", type=float, nargs="+", default=None, help="voxel size in mm per spatial axis (array order) for HD95 in mm (default: HD95 in voxels only)")
    p.add_argument("--seed", type=int, default=0, help="base seed: segmentation seed + 10, translation of case i seed + 20 + i, DDIB seed + 30 and + 31")
    p.add_argument("--no-figures", action="store_true", help="do not write the per-source figures (they need matplotlib)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--quiet", action="store_true", help="no progress output")

    p = sub.add_parser("demo", **kinds, help="the offline demo on real MR anatomy", description="Translate the shipped real T1 slice into an enlarged-ventricle PD-like domain and score the tracing against exact truth.")
    p.add_argument("--output", default="plasticine-demo", help="output folder")
    p.add_argument("--retrain", action="store_true", help="train the translator with the recipe first (a few minutes on a CPU) and write its checkpoint")
    p.add_argument("--quick", action="store_true", help="one subject and 4 sampler steps; with --retrain, a tiny task for a fast check")
    p.add_argument("--checkpoint", default=None, help="checkpoint to load (default: the shipped one) or, with --retrain, to write")
    p.add_argument("--diffusion-steps", type=int, default=None, help="with --retrain: optimizer steps of the denoiser")
    p.add_argument("--registration-steps", type=int, default=None, help="with --retrain: optimizer steps of the registration network")
    p.add_argument("--seed", type=int, default=None, help="seed of the task and the training")
    p.add_argument("--no-figures", action="store_true", help="skip the matplotlib figures")
    p.add_argument(
        "--3d",
        dest="volume",
        action="store_true",
        help="the demo on a real volume (Colin27 from Debian's mricron-data at 6 mm): trains a 3D translator on patches (about 1-2 minutes on 2 cores), translates by stitched patches, prints the traced scores",
    )
    return parser


def _load_images(args: argparse.Namespace, path: str) -> Any:
    from .io import ImageFolder

    return ImageFolder(path, axis=args.axis, slices=None if args.slices is None else tuple(args.slices), normalization=args.normalization)


def _device(name: str) -> torch.device:
    """The ``--device`` as a torch device, refused when it cannot be used here."""
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"--device: expected cpu, cuda or cuda:N, got {name!r}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device: {name!r} asked for, but torch sees no CUDA device here (use --device cpu)")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device: expected cpu, cuda or cuda:N, got {name!r}")
    return device


def _check_checkpoint_name(option: str, name: str) -> None:
    """Refuse a translator file name that saving would refuse, before any work is done."""
    lower = name.lower()
    if not lower.endswith(_CHECKPOINT_SUFFIXES):
        raise ValueError(f"{option}: {name}: expected a file name ending in {', '.join(_CHECKPOINT_SUFFIXES)}")
    if lower.endswith(".safetensors") and importlib.util.find_spec("safetensors") is None:
        raise ValueError(f"{option}: {name}: writing .safetensors needs the safetensors package (pip install safetensors), or name a .pt file")


def _check_option_number(option: str, value: float | None, what: str, ok: bool) -> None:
    """Refuse a numeric option outside its range, naming it (None: not given, nothing to check)."""
    if value is not None and not (math.isfinite(value) and ok):
        raise ValueError(f"{option}: expected {what}, got {value}")


def _patch_option(option: str, values: list[int] | None, ndim: int) -> tuple[int, ...] | None:
    """``--patch`` / ``--overlap`` as one value per spatial axis (None: not given)."""
    if values is None:
        return None
    if len(values) not in (1, ndim):
        raise ValueError(f"{option}: expected 1 or {ndim} sizes (one per spatial axis of the {ndim}D images), got {len(values)}: {' '.join(map(str, values))}")
    return tuple(values) * ndim if len(values) == 1 else tuple(values)


def _check_patch(images: Any, patch: tuple[int, ...] | None, overlap: tuple[int, ...] | None = None) -> None:
    """Refuse a ``--patch`` (and ``--overlap``) that does not fit every image, naming the file."""
    from .core.patches import patch_grid

    if patch is None:
        return
    if any(p < 1 for p in patch):
        raise ValueError(f"--patch: expected sizes >= 1, got {' '.join(map(str, patch))}")
    for i in range(len(images)):
        shape = tuple(images[i].shape[1:])
        try:
            patch_grid(shape, patch, overlap)
        except ValueError as err:
            item = images.items[i]
            option = "--patch" if str(err).startswith("patch") else "--overlap"
            where = f"{item.path}{'' if item.slice is None else f' slice {item.slice}'}"
            raise ValueError(f"{option}: {where} has spatial size {shape}: {str(err).split(': ', 1)[1]}") from err


def _translator_ndim(translator: Any) -> int | None:
    """Spatial dimensions of a translator's denoiser (None when it does not say)."""
    return getattr(getattr(translator.denoiser, "settings", None), "ndim", None)


def _losses_file(output: Path) -> Path:
    """``<output stem>.losses.json`` beside the translator file."""
    return output.with_name(output.name[: -len(output.suffix)] + ".losses.json")


def _finite_or_text(value: float) -> float | str:
    """A loss for JSON: the number, or its text when it is not finite (JSON has no NaN)."""
    return value if math.isfinite(value) else str(value)


def _check_one_grid(source: Any, target: Any) -> None:
    """``--registration population`` fits one field on a grid: every source and target image must share it."""
    first = None
    for name, images in (("--source", source), ("--target", target)):
        for item, image in zip(images.items, (images[i] for i in range(len(images)))):
            grid = tuple(image.shape[1:])
            if first is None:
                first = (grid, item.path)
            elif grid != first[0]:
                raise ValueError(
                    f"--registration population: expected every source and target image on one grid (one field for all), "
                    f"got {grid} in {name} {item.path} and {first[0]} in {first[1]}; resample them to one grid or use --registration learned"
                )


def _train(args: argparse.Namespace) -> int:
    import json

    from .checkpoint import atomic_write, save_component
    from .recipes import TrainingRecipe, build_translator, train_translator
    from .training import Augmentation, ContrastRandomization

    for name in ("diffusion_steps", "registration_steps", "batch_size", "checkpoint_every", "classes", "sampler_steps"):
        if getattr(args, name) < (0 if name == "checkpoint_every" else 1):
            raise ValueError(f"--{name.replace('_', '-')}: expected a positive integer, got {getattr(args, name)}")
    _check_checkpoint_name("--output", args.output)
    _check_option_number("--lr", args.lr, "a finite learning rate > 0", args.lr > 0)
    _check_option_number("--start-fraction", args.start_fraction, "a fraction in (0, 1]", 0 < args.start_fraction <= 1)
    _check_option_number("--mind-sigma", args.mind_sigma, "a finite patch width > 0 (pixels)", args.mind_sigma > 0)
    _check_option_number("--rim-depth", args.rim_depth, "a finite depth >= 1 (voxels)", args.rim_depth >= 1)
    _check_option_number("--ema-decay", args.ema_decay, "a decay in [0, 1)", args.ema_decay is not None and 0 <= args.ema_decay < 1)
    _check_option_number("--snr-gamma", args.snr_gamma, "a finite cap > 0", args.snr_gamma is not None and args.snr_gamma > 0)
    if args.no_data_range and args.data_range is not None:
        raise ValueError(f"--data-range {args.data_range[0]} {args.data_range[1]} and --no-data-range: give one of the two")
    data_range = None if args.no_data_range else (0.0, 1.0) if args.data_range is None else tuple(args.data_range)
    if data_range is not None and not (all(math.isfinite(v) for v in data_range) and data_range[0] < data_range[1]):
        raise ValueError(f"--data-range: expected finite LOW < HIGH, got {data_range[0]} {data_range[1]}")
    device = _device(args.device)
    source, target = _load_images(args, args.source), _load_images(args, args.target)
    if args.registration == "population":
        _check_one_grid(source, target)
    xs, ys = source.stack(), target.stack()
    if xs.shape[1:] != ys.shape[1:]:
        raise ValueError(f"source images have shape {tuple(xs.shape[1:])} (C, *S), target images {tuple(ys.shape[1:])}: resample them to one size")
    for name, n in (("source", len(source)), ("target", len(target))):
        if n < args.batch_size:
            raise ValueError(f"--{name}: {n} image(s), fewer than --batch-size {args.batch_size}")
    ndim = xs.dim() - 2
    patch = _patch_option("--patch", args.patch, ndim)
    _check_patch(source, patch)
    _check_patch(target, patch)
    spacing = _shared_spacing([source, target], ndim, args.quiet)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    built = {
        "structure": args.structure,
        "classes": args.classes,
        "mind_sigma": args.mind_sigma,
        "rim_depth": args.rim_depth,
        "prediction": args.prediction,
        "data_range": data_range,
        "clip": not args.no_clip,
        "start": args.start,
        "start_fraction": args.start_fraction,
        "sampler_steps": args.sampler_steps,
        "seed": args.seed,
        "registration": args.registration,
        "shape": tuple(xs.shape[2:]) if args.registration == "population" else None,
    }
    translator = build_translator(ndim, xs.shape[1], **built).to(device)
    recipe = TrainingRecipe(
        diffusion_steps=args.diffusion_steps,
        registration_steps=args.registration_steps,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        seed=args.seed,
        ema_decay=args.ema_decay,
        checkpoint_every=args.checkpoint_every,
        progress="none" if args.quiet else "auto",
        augmentation=Augmentation() if args.augment else None,
        snr_gamma=args.snr_gamma,
        patch_size=patch,
        spacing=spacing,
        contrast=ContrastRandomization() if args.contrast_randomization else None,
    )
    if not args.quiet:
        kind = "volume(s)" if ndim == 3 else "image(s)"
        on = "whole images" if patch is None else f"random {' x '.join(map(str, patch))} patches"
        print(f"plasticine train: {len(source)} source and {len(target)} target {kind} of shape {tuple(xs.shape[1:])}, a {ndim}D translator trained on {on}", file=sys.stderr)
    losses = train_translator(translator, source, target, recipe, checkpoint_prefix=out)
    save_component(translator, out)
    settings = {
        **built,
        "data_range": None if data_range is None else list(data_range),
        "diffusion_steps": args.diffusion_steps,
        "registration_steps": args.registration_steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "ema_decay": args.ema_decay,
        "augment": args.augment,
        "snr_gamma": args.snr_gamma,
        "ndim": ndim,
        "patch": None if patch is None else list(patch),
        "spacing": None if spacing is None else list(spacing),
        "normalization": args.normalization,
        "source": str(args.source),
        "target": str(args.target),
        "source_images": len(source),
        "target_images": len(target),
    }
    record = {
        "model": out.name,
        "losses": {stage: {k: _finite_or_text(v) for k, v in terms.items()} for stage, terms in losses.items()},
        "settings": settings,
    }
    losses_file = _losses_file(out)
    atomic_write(losses_file, (json.dumps(record, indent=2, allow_nan=False) + "\n").encode())
    for stage, terms in losses.items():
        text = ", ".join(f"{k} {v:.6g}" for k, v in terms.items()) or "no step run (the stage was complete in its checkpoint)"
        print(f"final {stage} loss: {text}")
    if not args.quiet:
        print(f"plasticine train: wrote {out} and {losses_file.name}", file=sys.stderr)
    return 0


def _shared_spacing(folders: Sequence[Any], ndim: int, quiet: bool = False) -> tuple[float, ...] | None:
    """The voxel spacing (mm, tensor order) every image of ``folders`` shares, or None.

    None also when the shared spacing is 1 along every axis (voxel units, as without affines) or
    when the images' spacings differ (relative tolerance 1e-6; a note is printed unless ``quiet``).
    """
    from .io import voxel_spacing

    found = [(folder.items[i], voxel_spacing(folder.affine(i), ndim)) for folder in folders for i in range(len(folder))]
    first = found[0][1]
    for item, h in found[1:]:
        if not all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(first, h)):
            if not quiet:
                print(
                    f"plasticine: note: {found[0][0].path} has voxel spacing {first} mm, {item.path} {h} mm: the registration is regularised in voxels",
                    file=sys.stderr,
                )
            return None
    return None if all(math.isclose(a, 1.0, rel_tol=1e-9) for a in first) else first


def _check_unique_names(images: Any) -> None:
    """Refuse inputs whose outputs would share a name (``scan.png`` and ``scan.nii.gz``)."""
    seen: dict[str, Any] = {}
    for i in range(len(images)):
        name, item = images.name(i), images.items[i]
        if name in seen:
            raise ValueError(
                f"{item.path}: its outputs would be named {name}_* like those of {seen[name]}; rename one of the two input files"
            )
        seen[name] = item.path


def _translate(args: argparse.Namespace) -> int:
    from .checkpoint import load_translator
    from .io import check_itk_affine, read_points, voxel_spacing, write_deformation, write_image, write_itk_deformation, write_trace

    if args.samples < 1:
        raise ValueError(f"--samples: expected an integer >= 1, got {args.samples}")
    if args.start_step is not None and args.start_step < 1:
        raise ValueError(f"--start-step: expected an integer >= 1, got {args.start_step}")
    device = _device(args.device)
    translator = load_translator(args.model, map_location=device)
    if args.no_registration:
        from .registration import IdentityRegistration

        translator = translator.replace(registration=IdentityRegistration()).eval()
    images = _load_images(args, args.input)
    _check_unique_names(images)
    ndim = _translator_ndim(translator)
    for i in range(len(images)):
        n = images[i].dim() - 1
        if ndim is not None and n != ndim:
            item = images.items[i]
            hint = "translate its slices with --axis" if n == 3 else "train a 2D translator for 2D images, or give volumes"
            raise ValueError(f"{item.path}: a {n}D image of spatial size {tuple(images[i].shape[1:])}, the translator {args.model} is {ndim}D: {hint}")
    n_spatial = images[0].dim() - 1
    if args.overlap is not None and args.patch is None:
        raise ValueError(f"--overlap {' '.join(map(str, args.overlap))}: expected --patch (the patches that overlap), got none")
    patch = _patch_option("--patch", args.patch, n_spatial)
    overlap = _patch_option("--overlap", args.overlap, n_spatial)
    _check_patch(images, patch, overlap)
    if args.points is None and args.points_space != "voxel":
        raise ValueError(f"--points-space {args.points_space}: expected --points (the file whose coordinates it describes), got none")
    affines = [images.affine(i) for i in range(len(images))]
    uses_spacing = callable(getattr(translator.registration, "with_spacing", None))
    for i, affine in enumerate(affines if args.deformation_format == "itk" else []):
        item = images.items[i]
        try:
            check_itk_affine(affine, images[i].dim() - 1)
        except ValueError as err:
            raise ValueError(f"--deformation-format itk: {item.path}{'' if item.slice is None else f' slice {item.slice}'}: {err}") from err
    points: list[torch.Tensor | None] = [None] * len(images)
    if args.points is not None and args.points_space == "voxel":
        points = [read_points(args.points)] * len(images)
    elif args.points is not None:
        for i, affine in enumerate(affines):
            item = images.items[i]
            try:
                points[i] = read_points(args.points, space="world", affine=affine, ndim=images[i].dim() - 1)
            except ValueError as err:
                raise ValueError(f"--points-space world: {err} ({item.path}{'' if item.slice is None else f' slice {item.slice}'})") from err
    has_nibabel = importlib.util.find_spec("nibabel") is not None
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    noted = False
    calls = [0]
    live = sys.stderr.isatty()

    def count_call(done: int, total: int) -> None:
        if done == total:
            calls[0] += 1
            if live and not args.quiet:
                print(f"\r  denoiser call {calls[0]} ({total} patches)", end="", file=sys.stderr, flush=True)

    if patch is not None:
        from .diffusion import PatchwiseDenoiser
        from .registration import LearnedRegistration, PatchwiseRegistration

        from .core.patches import patch_grid

        parts: dict[str, Any] = {"denoiser": PatchwiseDenoiser(translator.denoiser, patch, overlap=overlap, progress=count_call)}
        if isinstance(translator.registration, LearnedRegistration) and translator.registration.downsample == 1:
            parts["registration"] = PatchwiseRegistration(translator.registration, patch, overlap=overlap)
        translator = translator.replace(**parts).eval()
    for i in range(len(images)):
        x = images[i][None].to(device)
        volume = x.dim() == 5
        started = time.perf_counter()
        if volume and not args.quiet:
            where = "whole" if patch is None else f"{parts['denoiser'].patches(x.shape[2:])} patches of {' x '.join(map(str, patch))} per network call"
            print(f"plasticine translate: volume {i + 1}/{len(images)} {images.items[i].path.name} {tuple(x.shape[2:])}: {where}", file=sys.stderr, flush=True)
        calls[0] = 0
        affine, pts = affines[i], points[i]
        if pts is not None and pts.shape[1] != x.dim() - 2:
            raise ValueError(f"{args.points}: points have {pts.shape[1]} coordinates, the images {x.dim() - 2} spatial dimensions")
        name = images.name(i)
        g = torch.Generator(device).manual_seed(args.seed + i)
        # a registration regularised in mm (IterativeRegistration) gets this input's voxel spacing
        run = translator.replace(registration=translator.registration.with_spacing(voxel_spacing(affine, x.dim() - 2))).eval() if uses_spacing else translator
        try:
            r = run.translate(x, start_step=args.start_step, num_samples=args.samples, generator=g)
        except ValueError as err:
            raise ValueError(f"{images.items[i].path}: {err}") from err
        y = r.image[0].cpu()
        preview = out / f"{name}_translated.png" if x.dim() == 4 and x.shape[1] in (1, 3) else None
        floats = out / f"{name}_translated.nii.gz" if preview is None or has_nibabel else None
        if floats is None and not noted:
            print("plasticine translate: note: nibabel is not installed (pip install nibabel): the float translations are not written, only the 8-bit PNG previews", file=sys.stderr)
            noted = True
        clipped = int(((y < 0) | (y > 1)).sum()) if preview is not None else 0
        if clipped:  # an 8-bit PNG holds [0, 1]: say how much of the translation lies outside
            kept = f"; the values are kept in {floats.name}" if floats is not None else ""
            print(f"plasticine translate: {preview.name}: {clipped} of {y.numel()} values outside [0, 1] clipped for the 8-bit PNG preview{kept}", file=sys.stderr)
        if floats is not None:
            write_image(floats, y, affine=affine)
        if preview is not None:
            write_image(preview, y.clamp(0, 1) if clipped else y)
        image_file = floats if floats is not None else preview
        deformation = r.deformation.to("cpu")
        if args.deformation_format == "itk":
            def_files = list(write_itk_deformation(out / name, deformation, affine))
        else:
            def_files = [out / f"{name}_deformation.{args.deformation_format}"]
            write_deformation(def_files[0], deformation, affine=affine if args.deformation_format == "nii.gz" else None)
            if args.deformation_format == "nii.gz":
                def_files.append(def_files[0].with_name(f"{name}_deformation_inverse.nii.gz"))
        src = torch.empty(0, x.dim() - 2) if pts is None else pts
        tgt = src if pts is None else r.deformation.points_to_target(pts[None].to(device))[0].cpu()
        item = images.items[i]
        files = [f.name for f in (floats, preview, *def_files) if f is not None]
        write_trace(
            out / f"{name}_trace.json",
            src,
            tgt,
            affine=affine,
            input=str(item.path),
            slice=item.slice,
            axis=images.axis,
            model=str(args.model),
            translated=image_file.name,
            preview=None if preview is None else preview.name,
            registration="identity" if args.no_registration else "model",
            deformation=def_files[0].name,
            deformation_format=args.deformation_format,
            files=files,
            points_space=args.points_space,
            start_step=r.start_step,
            samples=args.samples,
            seed=args.seed + i,
            normalization=images.normalization,
            clipped_values=clipped,
            patch=None if patch is None else list(patch),
            overlap=None if patch is None else list(patch_grid(tuple(x.shape[2:]), patch, overlap)[2]),
        )
        if volume and not args.quiet:
            print(f"{chr(13) if live else ''}plasticine translate: volume {i + 1}/{len(images)} done in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
        print(f"{item.path}{'' if item.slice is None else f' slice {item.slice}'} -> {image_file}")
    return 0


def _trace(args: argparse.Namespace) -> int:
    from .io import read_affine, read_deformation, read_image, read_points, write_image, write_trace

    out = Path(args.output)
    if args.points is not None and not out.name.lower().endswith(".json"):
        raise ValueError(f"--output: {out}: points are written as a trace file; expected a name ending in .json")
    if args.mask is not None and not out.name.lower().endswith(_MASK_SUFFIXES):
        raise ValueError(f"--output: {out}: a traced mask is an image; expected a name ending in {', '.join(_MASK_SUFFIXES)}")
    d = read_deformation(args.deformation)
    to_target = args.direction == "to-target"
    if args.points is not None:
        which = args.which or ("source" if to_target else "target")
        p = read_points(args.points, which=which)
        if p.shape[1] != d.ndim:
            raise ValueError(f"{args.points}: points have {p.shape[1]} coordinates, the deformation {d.ndim} spatial dimensions")
        q = (d.points_to_target(p[None]) if to_target else d.points_to_source(p[None]))[0]
        src, tgt = (p, q) if to_target else (q, p)
        nifti = str(args.deformation).lower().endswith((".nii", ".nii.gz"))  # its header holds the grid's affine
        affine = read_affine(args.deformation) if nifti else None
        write_trace(out, src, tgt, affine=affine, deformation=str(args.deformation), direction=args.direction, points_file=str(args.points))
        print(f"{len(p)} point(s) -> {out}")
        return 0
    mask = read_image(args.mask, normalization="none")
    if tuple(mask.shape[1:]) != d.shape:
        raise ValueError(f"{args.mask}: spatial size {tuple(mask.shape[1:])}, the deformation {d.shape}")
    if mask.shape[0] != 1:
        raise ValueError(f"{args.mask}: expected a single-channel label image, got {mask.shape[0]} channels")
    values = torch.unique(mask)
    if not bool((values == values.round()).all()):
        raise ValueError(f"{args.mask}: expected integer labels, found non-integer values (e.g. {float(values[values != values.round()][0])})")
    labels = torch.searchsorted(values, mask)[None]
    traced = d.labels_to_target(labels, len(values)) if to_target else d.labels_to_source(labels, len(values))
    result = values[traced[0]]
    if out.name.lower().endswith(".png"):
        if float(values.min()) < 0 or float(values.max()) > 255:
            raise ValueError(f"{out}: a PNG holds labels 0..255, the mask has {float(values.min())}..{float(values.max())} (write .nii.gz)")
        result = result / 255.0
    write_image(out, result, affine=read_affine(args.mask))
    print(f"{args.mask} -> {out}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from .demo import DEMO_3D, QUICK, DemoConfig, run_demo, run_demo_3d

    if args.volume and args.quick:
        raise ValueError("--quick and --3d: the 3D demo has its own quick settings; give one of the two")
    config = DEMO_3D if args.volume else QUICK if (args.quick and args.retrain) else DemoConfig()
    changes: dict[str, Any] = {}
    if args.diffusion_steps is not None:
        changes["diffusion_iterations"] = args.diffusion_steps
    if args.registration_steps is not None:
        changes["registration_iterations"] = args.registration_steps
    if args.seed is not None:
        changes["seed"] = args.seed
    if changes and not (args.retrain or args.volume) and set(changes) != {"seed"}:
        raise ValueError("--diffusion-steps and --registration-steps need --retrain")
    for key in ("diffusion_iterations", "registration_iterations"):
        if key in changes and changes[key] < 1:
            raise ValueError(f"--{key.split('_')[0]}-steps: expected an integer >= 1, got {changes[key]}")
    config = replace(config, **changes)
    if args.volume:
        output = "plasticine-demo-3d" if args.output == "plasticine-demo" else args.output
        run_demo_3d(output, config=config, checkpoint=args.checkpoint)
        return 0
    run_demo(args.output, retrain=args.retrain, quick=args.quick, checkpoint=args.checkpoint, config=config, figures=not args.no_figures)
    return 0


def _read_labels(args: argparse.Namespace, path: str, option: str, images: Any) -> torch.Tensor:
    """Integer label images read as the images were (same slicing, no normalisation), one per image."""
    from .io import ImageFolder

    labels = ImageFolder(path, axis=args.axis, slices=None if args.slices is None else tuple(args.slices), normalization="none")
    if len(labels) != len(images):
        raise ValueError(f"{option}: {path}: {len(labels)} label image(s) for {len(images)} image(s); expected one per image, paired by sorted name")
    out = []
    for i in range(len(labels)):
        lab, where = labels[i], labels.items[i].path
        if lab.shape[0] != 1:
            raise ValueError(f"{option}: {where}: expected a single-channel label image, got {lab.shape[0]} channels")
        if tuple(lab.shape[1:]) != tuple(images[i].shape[1:]):
            raise ValueError(f"{option}: {where}: spatial size {tuple(lab.shape[1:])}, its image {images.items[i].path} {tuple(images[i].shape[1:])}")
        if not bool((lab == lab.round()).all()) or float(lab.min()) < 0:
            raise ValueError(f"{option}: {where}: expected integer labels >= 0, found values in [{float(lab.min())}, {float(lab.max())}] that are not")
        out.append(lab.round().to(torch.int64))
    return torch.stack(out)


def _stack(images: Any, option: str) -> torch.Tensor:
    shapes = {tuple(images[i].shape) for i in range(len(images))}
    if len(shapes) != 1:
        raise ValueError(f"{option}: the images have shapes {sorted(shapes)}; expected one shape (C, *S): resample them to one size")
    return images.stack()


def _evaluate(args: argparse.Namespace) -> int:
    import csv
    import io as _io
    import json

    from .checkpoint import atomic_write, load_component, load_translator, save_component
    from .evaluation import EvaluationSettings, evaluate_translation, format_tables

    for name in ("segmentation_steps", "segmentation_width", "segmentation_depth", "ddib_sampler_steps", "batch_size", "bins"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected a positive integer, got {getattr(args, name)}")
    if args.ddib_steps < 1 and not args.no_ddib:
        raise ValueError(f"--ddib-steps: expected a positive integer (or --no-ddib), got {args.ddib_steps}")
    if args.classes is not None and args.classes < 2:
        raise ValueError(f"--classes: expected an integer >= 2 (background and one class at least), got {args.classes}")
    _check_option_number("--lr", args.lr, "a finite learning rate > 0", args.lr > 0)
    lo, hi = args.value_range
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"--value-range: expected finite LOW < HIGH, got {lo} {hi}")
    if args.spacing is not None and not all(math.isfinite(v) and v > 0 for v in args.spacing):
        raise ValueError(f"--spacing: expected positive voxel sizes in mm, got {args.spacing}")
    if args.save_segmentation is not None:
        _check_checkpoint_name("--save-segmentation", args.save_segmentation)
        if args.segmentation is not None:
            raise ValueError("--save-segmentation and --segmentation: a loaded network is not trained again; give one of the two")
    if not args.no_figures and importlib.util.find_spec("matplotlib") is None:
        raise ValueError("the figures need matplotlib (pip install 'plasticine[plot]'); or pass --no-figures")
    device = _device(args.device)
    translator = load_translator(args.model, map_location=device).eval()
    sources, targets = _load_images(args, args.source), _load_images(args, args.target)
    _check_unique_names(sources)
    xs, ys = _stack(sources, "--source"), _stack(targets, "--target")
    if xs.dim() != ys.dim() or xs.shape[1] != ys.shape[1]:
        raise ValueError(f"--source images have shape {tuple(xs.shape[1:])} (C, *S), --target images {tuple(ys.shape[1:])}: expected the same channels and dimensions")
    xl = _read_labels(args, args.source_labels, "--source-labels", sources)
    yl = _read_labels(args, args.target_labels, "--target-labels", targets)
    classes = args.classes if args.classes is not None else int(yl.max()) + 1
    if classes < 2:
        raise ValueError(f"--target-labels: {args.target_labels}: every label is 0; expected at least one foreground class")
    for option, labels in (("--source-labels", xl), ("--target-labels", yl)):
        if int(labels.max()) >= classes:
            raise ValueError(f"{option}: labels up to {int(labels.max())}, but {classes} classes ({'--classes' if args.classes is not None else 'from the target labels'}): expected labels in [0, {classes - 1}]")
    truth = None
    if args.truth is not None:
        truth_images = _load_images(args, args.truth)
        truth = _stack(truth_images, "--truth")
        if truth.shape != xs.shape:
            raise ValueError(f"--truth: {len(truth_images)} image(s) of shape {tuple(truth.shape[1:])}; expected one per source of shape {tuple(xs.shape[1:])}")
    if args.spacing is not None and len(args.spacing) != xs.dim() - 2:
        raise ValueError(f"--spacing: expected {xs.dim() - 2} voxel sizes (one per spatial axis), got {len(args.spacing)}")
    segmenter = None
    if args.segmentation is not None:
        from .segmentation import SegmentationUNet

        segmenter = load_component(args.segmentation, map_location=device, expected=SegmentationUNet)
        if segmenter.num_classes != classes or segmenter.in_channels != xs.shape[1] or segmenter.spatial_dims != xs.dim() - 2:
            raise ValueError(
                f"--segmentation: {args.segmentation}: a network for {segmenter.in_channels} channel(s), {segmenter.num_classes} classes, {segmenter.spatial_dims}D; "
                f"the data has {xs.shape[1]} channel(s), {classes} classes, {xs.dim() - 2}D"
            )
    settings = EvaluationSettings(
        segmentation_steps=args.segmentation_steps,
        segmentation_width=args.segmentation_width,
        segmentation_depth=args.segmentation_depth,
        ddib_steps=0 if args.no_ddib else args.ddib_steps,
        ddib_sampler_steps=args.ddib_sampler_steps,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        seed=args.seed,
        bins=args.bins,
        value_range=(lo, hi),
        spacing=None if args.spacing is None else tuple(args.spacing),
        progress=not args.quiet,
    )
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    names = [sources.name(i) for i in range(len(sources))]
    evaluation = evaluate_translation(
        translator,
        xs.to(device),
        xl.to(device),
        ys.to(device),
        yl.to(device),
        classes,
        settings,
        segmenter=segmenter,
        truth=None if truth is None else truth.to(device),
        names=names,
        figures=None if args.no_figures else out / "figures",
    )
    results = evaluation.results
    results["inputs"] = {
        "model": str(args.model),
        "source": [str(item.path) + ("" if item.slice is None else f" slice {item.slice}") for item in sources.items],
        "target": len(targets),
        "normalization": args.normalization,
        "classes_from": "--classes" if args.classes is not None else "1 + the largest target label",
    }
    if args.save_segmentation is not None:
        save_component(evaluation.segmenter, args.save_segmentation)
        results["segmentation"]["file"] = str(args.save_segmentation)
    elif args.segmentation is not None:
        results["segmentation"]["file"] = str(args.segmentation)
    atomic_write(out / "evaluation.json", (json.dumps(results, indent=1, allow_nan=False) + "\n").encode())
    mm = settings.spacing is not None
    table = _io.StringIO()
    w = csv.writer(table, lineterminator="\n")
    w.writerow(["method", "class", "accuracy", "dice", "iou", "hd95_voxels"] + (["hd95_mm"] if mm else []) + ["hd95_undefined", "cases"])
    dist = _io.StringIO()
    d = csv.writer(dist, lineterminator="\n")
    dist_keys = list(next(iter(results["methods"].values()))["distribution"])
    d.writerow(["method", *dist_keys])

    def cell(v: Any) -> str:
        return "" if v is None else repr(v) if isinstance(v, float) else str(v)

    for name, m in results["methods"].items():
        mean, cases = m["table"]["mean"], m["table"]["cases"]
        w.writerow([name, "mean", cell(mean["accuracy"]), cell(mean["dice"]), cell(mean["mean_iou"]), cell(mean.get("hd95"))] + ([cell(mean.get("hd95_mm"))] if mm else []) + [mean["hd95_undefined"], cases])
        for c, r in m["table"]["per_class"].items():
            w.writerow([name, c, cell(r["accuracy"]), cell(r["dice"]), cell(r["iou"]), cell(r["hd95"])] + ([cell(r.get("hd95_mm"))] if mm else []) + [r["hd95_undefined"], cases])
        d.writerow([name, *(cell(m["distribution"][k]) for k in dist_keys)])
    atomic_write(out / "table1.csv", table.getvalue().encode())
    atomic_write(out / "distribution.csv", dist.getvalue().encode())
    seeds = results["seeds"]
    print(f"{len(sources)} source and {len(targets)} target image(s), {classes} classes; seeds: segmentation {seeds['segmentation']}, translation of case i {seeds['translation_of_case_0']} + i" + ("" if evaluation.ddib is None else f", DDIB {seeds['ddib_source']} and {seeds['ddib_target']}"))
    print(format_tables(results))
    written = ["evaluation.json", "table1.csv", "distribution.csv"] + ([] if args.no_figures else [f"figures/ ({len(names)} PNG)"])
    print(f"wrote {', '.join(written)} to {out}")
    return 0


def _one_line(err: BaseException) -> str:
    """The message of an error on one line; errors that are not about the input also name their type."""
    text = " ".join(str(err).split()) or "no message"
    if isinstance(err, MemoryError):
        return f"out of memory ({text}); a setting or an input is far larger than this machine holds"
    if isinstance(err, (ValueError, OSError, ImportError, FloatingPointError)):
        return text
    return f"{type(err).__name__}: {text} (an unexpected error: run with --debug for the traceback and report it)"


def _view(args: argparse.Namespace) -> int:
    import json

    from .io import TRACE_FORMAT, ImageFolder, read_deformation, read_image
    from .viewer import write_viewer

    out, result = Path(args.output), Path(args.result)
    if not out.name.lower().endswith((".html", ".htm")):
        raise ValueError(f"--output: {out}: the viewer is one HTML page; expected a name ending in .html")
    try:
        doc = json.loads(result.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{result}: cannot read the trace file ({_one_line(err)})") from err
    keys = ("input", "translated", "deformation", "normalization")
    if not isinstance(doc, dict) or doc.get("format") != TRACE_FORMAT or not all(isinstance(doc.get(k), str) for k in keys):
        raise ValueError(f"{result}: expected a trace file written by plasticine translate (format {TRACE_FORMAT!r} naming {', '.join(keys)})")
    where = result.parent
    source_file = Path(args.source if args.source is not None else doc["input"])
    if args.source is None and not source_file.is_absolute() and not source_file.exists() and (where / source_file).exists():
        source_file = where / source_file  # the input was named relative to the trace file's folder
    slice_index = doc.get("slice")
    slices = None if slice_index is None else (slice_index, slice_index + 1)  # the 2D slice of a volume that translate read
    source = ImageFolder(source_file, axis=None if slices is None else doc.get("axis"), slices=slices, normalization=doc["normalization"])[0]
    translation = read_image(where / doc["translated"], normalization="none")
    deformation = read_deformation(where / doc["deformation"])
    labels = None
    if args.labels is not None:
        mask = read_image(args.labels, normalization="none")
        if mask.shape[0] != 1 or not bool((mask == mask.round()).all()):
            raise ValueError(f"{args.labels}: expected a single-channel image of integer labels, got {mask.shape[0]} channel(s)" + ("" if mask.shape[0] != 1 else " with non-integer values"))
        labels = mask.round().long()
    for name, image in (("source", source), ("translation", translation), ("--labels", labels)):
        if image is not None and tuple(image.shape[1:]) != deformation.shape:
            raise ValueError(f"{name}: spatial size {tuple(image.shape[1:])}, the deformation {deformation.shape}")
    write_viewer(out, source, translation, deformation, source_labels=labels, title=f"plasticine: {source_file.name} -> {doc['translated']}")
    print(f"{result} -> {out}")
    return 0


_COMMANDS = {"train": _train, "translate": _translate, "trace": _trace, "evaluate": _evaluate, "demo": _demo, "view": _view}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``plasticine`` command line.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 1 for bad input (one line on stderr, no traceback), 2 for a
        malformed command line (argparse's message).

    Shape:
        Not applicable.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    threads = getattr(args, "threads", None)
    if threads is not None:
        if threads < 1:
            parser.error(f"--threads: expected an integer >= 1, got {threads}")
        torch.set_num_threads(threads)
    try:
        return _COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print(f"plasticine {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if getattr(args, "debug", False):
            raise
        print(f"plasticine {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
