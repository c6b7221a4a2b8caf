r"""Training: the translator's two objectives as plain functions of a batch, and a small training loop.

**Objectives.** Both take a :class:`~plasticine.translator.TraceableTranslator` and a batch, draw
their randomness from a ``torch.Generator`` and return differentiable losses, so they fit any loop:

* :func:`diffusion_objective` (the paper's Algorithm 2): the structure map :math:`y_s` of a
  *target* image :math:`y` is the condition, and the denoiser learns the noise at a random level
  with the L1 loss,

  .. math::

      \mathcal{L}_{DM} = \mathbb{E}\,\big\| \epsilon_{\theta_1}\big(\sqrt{\gamma}\,y + \sqrt{1-\gamma}\,\epsilon,
      \ \gamma,\ \mathrm{conditioning}(y_s)\big) - \epsilon \big\|_1 ;

* :func:`deformation_objective` (eq. 6 and 7): :math:`y` is noised to a random level, the frozen
  denoiser's estimate :math:`\hat\epsilon` is the noise cue, and the registration network is
  trained with :func:`~plasticine.registration.network.registration_objective`,

  .. math::

      \mathcal{L}_{DF} = S(x \circ \phi, y) + S(x, y \circ \phi^{-1}) + \lambda R(v)
      + \beta \lVert A(x) - F(y, \hat\epsilon) \rVert^2 .

The paper trains the diffusion model first and the registration network second, each with its own
optimizer; one :class:`Trainer` per stage does the same.

**The loop.** :class:`Trainer` takes an objective ``(model, batch, generator) -> loss``, the model,
its optimizer, a resumable batch source (:class:`ShuffledBatches`) and a :class:`TrainConfig`; it adds
progress reporting (``tqdm`` when installed, else a printed line every ``log_every`` steps), an
exponential moving average of the weights (:class:`~plasticine.diffusion.EMA`), mixed precision on
CUDA (:func:`torch.autocast` with a :class:`torch.amp.GradScaler`), periodic checkpoints written
atomically, exact resumption, and data parallelism with :mod:`torch.distributed`.

**Exact resumption.** A checkpoint holds the model, the optimizer, the EMA, the gradient scaler, the
step, the position of the batch source and, for every process, the states of the objective's
generator and of torch's global generators. A run interrupted after a checkpoint and resumed from it
ends with the same weights, bit for bit on the CPU, as a run that was never interrupted.

**One rule for resuming.** The checkpoint also records every setting that changes the result: the
optimizer's class and hyper-parameters (learning rate, betas, weight decay, ...), the model's class,
config and parameter names, dtypes and shapes, ``TrainConfig.seed``, ``ema_decay``, ``grad_clip``
and the precision, and through the batch source its order settings (seed, shuffle, batch size,
world size) and a fingerprint of the data (item count and sha256). A resumed run whose setting
differs is refused with a one-line error naming the setting, the saved value and the new one; the
saved settings are never kept silently in place of the given ones. Only ``steps`` may grow (a
larger value continues training; one below the saved step is refused); the checkpoint cadence, the
progress reporting and the stage name may change freely.

**Data parallelism.** When :func:`torch.distributed.is_initialized` (e.g. launched by ``torchrun``),
the model is wrapped in :class:`~torch.nn.parallel.DistributedDataParallel` and handed to the
objective wrapped; :class:`ShuffledBatches` gives each process its share of every global batch (the
same permutation on every process, item ``r::world_size`` of each global batch on rank ``r``); each
process draws its own noise (generator seeded ``seed + rank``); only rank 0 writes checkpoints. With
a mean loss, the averaged gradient of ``world_size`` processes with batch ``b`` equals the gradient of
one process with batch ``b * world_size`` over the same items. A script launched by ``torchrun``
initialises the process group (and on GPUs selects its device) before building the trainer::

    dist.init_process_group("nccl")                  # "gloo" on CPUs
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    model = translator.denoiser.cuda()
    trainer = Trainer(lambda m, y, g: diffusion_objective(translator, y, g, denoiser=m),
                      model, torch.optim.Adam(model.parameters(), 1e-4),
                      ShuffledBatches(images, batch_size=8, seed=0), TrainConfig(steps=100_000,
                      checkpoint_path="dm.pt", checkpoint_every=1000, ema_decay=0.9999))
    trainer.fit()

``torchrun --nproc-per-node 4 train.py`` runs it on four GPUs, ``torchrun --nnodes 2 ...`` across
nodes; the checkpoint file must then sit on storage that every node reads, since every process
resumes from it.

References:
    Zhang, Cheng et al., "Plasticine: A Traceable Diffusion Model for Medical Image Translation",
    Algorithm 2, eq. 6 and 7.
    Li et al., "PyTorch Distributed: Experiences on Accelerating Data Parallel Training", VLDB 2020.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import torch
import torch.distributed as dist
from torch import nn

from .checkpoint import CheckpointError, fingerprint, load_state, save_state
from .core.shapes import check_shape
from .core.validate import check_image, check_int, check_number, check_option
from .diffusion.schedules import noise_like
from .diffusion.prediction import split_prediction
from .diffusion.training import EMA, LossKind, noise_prediction_loss
from .translator import TraceableTranslator

__all__ = [
    "diffusion_objective",
    "deformation_objective",
    "noise_cue",
    "Augmentation",
    "ContrastRandomization",
    "BatchSource",
    "ShuffledBatches",
    "TrainConfig",
    "Trainer",
    "distributed_info",
]

Precision = Literal["auto", "fp32", "fp16", "bf16"]
Progress = Literal["auto", "tqdm", "print", "none"]
Objective = Callable[[nn.Module, Any, torch.Generator], "torch.Tensor | Mapping[str, torch.Tensor]"]


# -- objectives -----------------------------------------------------------------------------------


def diffusion_objective(
    translator: TraceableTranslator,
    y: torch.Tensor,
    generator: torch.Generator | None = None,
    *,
    denoiser: nn.Module | Callable[..., torch.Tensor] | None = None,
    loss: LossKind = "l1",
    snr_gamma: float | None = None,
    condition: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""The diffusion loss of one batch of target images (the paper's Algorithm 2).

    :math:`y_s = \mathrm{structure}(y)` (no gradient), :math:`c = \mathrm{conditioning}(y_s)`, then
    :func:`~plasticine.diffusion.noise_prediction_loss` draws the level and the noise from
    ``generator`` and returns the mean L1 (or L2) error of the predicted noise. The images enter the
    diffusion through :meth:`~plasticine.TraceableTranslator.to_diffusion` (its ``data_range``), and the
    denoiser is trained in the parametrisation its sampler reads (``translator.sampler.prediction``,
    ``"eps"`` for a sampler without that option), so training and sampling agree by construction.

    Args:
        translator: gives the structure extractor, conditioning, schedule and denoiser.
        y: target-domain images, finite.
        generator: the source of randomness.
        denoiser: the denoiser to train in place of ``translator.denoiser`` (e.g. its
            :class:`~torch.nn.parallel.DistributedDataParallel` wrapper).
        loss: ``"l1"`` (the paper's) or ``"l2"``.
        snr_gamma: min-SNR weighting cap (Hang et al. 2023), or None (the paper's: no weighting).
        condition: a precomputed condition of ``y`` used instead of
            :math:`\mathrm{conditioning}(y_s)` (the data range and the parametrisation apply as
            always), or None.

    Returns:
        A scalar, differentiable in the denoiser's (and a learned conditioning's) parameters.

    Shape:
        y: ``(B, C, *S)``; out: ``()``.
    """
    check_image(y, "y")
    if condition is None:
        with torch.no_grad():
            ys = translator.structure_map(y)
        condition = translator.conditioning(ys)
    if condition is not None:
        condition = condition.to(y.dtype)
    net = translator.denoiser if denoiser is None else denoiser
    prediction = getattr(translator.sampler, "prediction", "eps")
    return noise_prediction_loss(net, translator.schedule, translator.to_diffusion(y), condition, generator, loss, prediction=prediction, snr_gamma=snr_gamma)


def noise_cue(translator: TraceableTranslator, y: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    r"""The diffusion model's noise estimate :math:`\hat\epsilon` of a target, the registration cue.

    Draws a level :math:`\gamma` (as in training, ``schedule.sample_gamma`` from ``generator``) and
    noise :math:`\epsilon`, and returns :math:`\epsilon_{\theta_1}(\sqrt{\gamma} y' + \sqrt{1-\gamma}\epsilon,
    \gamma, \mathrm{conditioning}(y_s))` with :math:`y'` the target in the diffusion's range
    (:meth:`~plasticine.TraceableTranslator.to_diffusion`), without gradient, read as a noise estimate whatever the
    parametrisation (:func:`~plasticine.diffusion.prediction.split_prediction`).

    Args:
        translator: gives the structure extractor, conditioning, schedule and denoiser.
        y: target-domain images.
        generator: the source of randomness.

    Returns:
        :math:`\hat\epsilon` (detached).

    Shape:
        y: ``(B, C, *S)``; out: ``(B, C, *S)``.
    """
    dims = check_shape(y, "B C *S", "y")
    with torch.no_grad():
        ys = translator.structure_map(y)
        condition = translator.conditioning(ys)
        if condition is not None:
            condition = condition.to(y.dtype)
        _, gamma = translator.schedule.sample_gamma(dims["B"], generator, device=y.device)
        clean = translator.to_diffusion(y)
        noisy = translator.schedule.diffuse(clean, gamma, noise_like(clean, generator))
        out = translator.denoiser(noisy, gamma.to(torch.promote_types(y.dtype, torch.float32)), condition)
        prediction = getattr(translator.sampler, "prediction", "eps")
        eps = out if prediction == "eps" else split_prediction(out, noisy, gamma, prediction)[0]
    return eps.detach()


def deformation_objective(
    translator: TraceableTranslator,
    x: torch.Tensor,
    y: torch.Tensor,
    generator: torch.Generator | None = None,
    *,
    network: nn.Module | None = None,
    similarity: Callable[..., torch.Tensor] | None = None,
    regularizer: Callable[[torch.Tensor], torch.Tensor] | None = None,
    smoothness_weight: float = 1.0,
    align_weight: float = 1.0,
    mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    r"""The registration loss of one unpaired batch (the paper's eq. 6 and 7), with the noise cue.

    When the registration network reads a cue (``cue_channels > 0``), :func:`noise_cue` gives
    :math:`\hat\epsilon` from the translator's (frozen) denoiser; then
    :func:`~plasticine.registration.network.registration_objective` evaluates
    :math:`S(x \circ \phi, y) + S(x, y \circ \phi^{-1}) + \lambda R(v) + \beta \lVert A(x) - F(y,
    \hat\epsilon)\rVert^2`. The denoiser is used as it is: put it in evaluation mode.

    Args:
        translator: its ``registration`` must be a learned backend with ``network`` and
            ``integrator`` (:class:`~plasticine.registration.network.LearnedRegistration`).
        x: source-domain images.
        y: target-domain images (unpaired).
        generator: the source of randomness (the cue's level and noise).
        network: the network to train in place of ``translator.registration.network`` (e.g. its
            DDP wrapper).
        similarity: similarity loss (default: normalised mutual information).
        regularizer: velocity regulariser (default: gradient smoothness).
        smoothness_weight: :math:`\lambda`.
        align_weight: :math:`\beta`.
        mask: optional region of the similarity terms.

    Returns:
        ``{"total", "forward", "inverse", "smoothness", "align"}`` scalars; train on ``"total"``.

    Raises:
        ValueError: for a backend without a trainable network, or bad images.

    Shape:
        x, y: ``(B, C, *S)``; mask: ``(B, 1, *S)`` or None; outputs ``()``.
    """
    from .registration.network import registration_objective

    dims = check_image(x, "x")
    check_image(y, "y")
    check_shape(y, "B C *S", "y", bindings=dict(dims))
    reg = translator.registration
    inner = getattr(reg, "network", None)
    integrator = getattr(reg, "integrator", None)
    if not isinstance(inner, nn.Module) or integrator is None:
        raise ValueError(
            f"deformation_objective: the registration backend {type(reg).__name__} has no trainable network; "
            "expected a learned backend with .network and .integrator (LearnedRegistration)"
        )
    net: Any = inner if network is None else network
    cue = noise_cue(translator, y, generator) if inner.settings.cue_channels else None
    return registration_objective(
        net,
        integrator,
        x,
        y,
        cue,
        similarity=similarity,
        regularizer=regularizer,
        smoothness_weight=smoothness_weight,
        align_weight=align_weight,
        mask=mask,
    )


# -- data order -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Augmentation:
    r"""Random flips, small affine maps and intensity jitter of training batches (kornia), 2D and 3D.

    Each image of a batch gets its own draw: a left-right flip (the last axis) with probability
    ``flip``; an affine map (rotation up to ``degrees``, translation up to ``translate`` of the
    size, isotropic scale in ``scale``) resampled linearly with zero padding, by
    :class:`kornia.augmentation.RandomAffine` (2D) or
    :class:`~kornia.augmentation.RandomAffine3D` (3D); then :math:`x \mapsto (1 + a) x + b` with
    :math:`a, b \sim U(-\mathrm{intensity}, \mathrm{intensity})`. Maps given as ``aligned``
    (conditions, label one-hots) get the same flip and affine map, no jitter. The parameters come
    from ``generator`` alone (a seed drawn from it seeds kornia's draw, torch's global generator is
    left as it was), so a seeded run is reproducible and resumes exactly.

    Attributes:
        flip: probability of a left-right flip.
        degrees: largest rotation, degrees (about each axis in 3D).
        translate: largest translation as a fraction of the size along each axis.
        scale: range of the isotropic scale factor.
        intensity: half-width of the jitter of the gain and the offset.

    Shape:
        images: ``(B, C, *S)``; aligned: ``(B, L, *S)`` each; out: the same shapes.
    """

    flip: float = 0.5
    degrees: float = 5.0
    translate: float = 0.05
    scale: tuple[float, float] = (0.95, 1.05)
    intensity: float = 0.1

    def __post_init__(self) -> None:
        check_number(self.flip, "Augmentation.flip", 0.0, 1.0)
        check_number(self.degrees, "Augmentation.degrees", 0.0, 180.0)
        check_number(self.translate, "Augmentation.translate", 0.0, 0.5)
        check_number(self.intensity, "Augmentation.intensity", 0.0, 1.0)
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"Augmentation.scale: expected (low, high) with 0 < low <= high, got {self.scale!r}")

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None, aligned: Sequence[torch.Tensor] = ()) -> tuple[torch.Tensor, ...]:
        """Augment a batch and the maps aligned with it.

        Args:
            images: the batch.
            generator: the source of randomness.
            aligned: maps that must stay aligned with the images.

        Returns:
            ``(images, *aligned)`` augmented.

        Shape:
            images: ``(B, C, *S)``; aligned: ``(B, L, *S)``; out: the same shapes.
        """
        import kornia.augmentation as K

        dims = check_shape(images, "B C *S", "images", spatial=(2, 3), floating=True)
        for i, m in enumerate(aligned):
            check_shape(m, "B L *S", f"aligned[{i}]", bindings={"B": dims["B"], "S": dims["S"]})
        n, b = dims["N"], dims["B"]
        if n == 2:
            ops = [K.RandomHorizontalFlip(p=self.flip), K.RandomAffine(self.degrees, (self.translate,) * 2, self.scale, p=1.0, padding_mode="zeros")]
        else:
            ops = [K.RandomHorizontalFlip3D(p=self.flip), K.RandomAffine3D(self.degrees, (self.translate,) * 3, (self.scale,) * 3, p=1.0)]
        device = images.device if generator is None else generator.device
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=device))
        gain = (torch.rand((b, 2), generator=generator, device=device, dtype=torch.float64) * 2 - 1) * self.intensity
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            params = [op.forward_parameters(images.shape) for op in ops]
        out = []
        for j, x in enumerate((images, *aligned)):
            y = x.to(images.dtype) if j else x
            for op, prm in zip(ops, params):
                y = op(y, params=prm)
            out.append(y.to(x.dtype) if j else y)
        shape = (b,) + (1,) * (images.dim() - 1)
        g = gain.to(images.dtype).to(images.device)
        out[0] = out[0] * (1 + g[:, 0].view(shape)) + g[:, 1].view(shape)
        return tuple(out)



@dataclass(frozen=True)
class ContrastRandomization:
    r"""Random intensity remaps of the images whose structure maps condition the denoiser in training.

    The denoiser of Algorithm 2 learns from target images :math:`y` conditioned on their own
    structure maps :math:`s(y)`, and is used on the maps :math:`s(x \circ \phi)` of *source* images.
    When the structure map is not exactly invariant to the change of contrast between the domains
    (MIND-SSC, for one, is invariant to :math:`x \mapsto a x + b` but not to a non-monotone tissue
    remap), the two kinds of map differ and the translation blurs. Training on
    :math:`s(h(y))` for random remaps :math:`h` (domain randomisation, as in SynthSeg) teaches the
    denoiser to read the anatomy of a map whatever the contrast it came from, while it still
    generates :math:`y` itself.

    Each image of a batch gets its own :math:`h`: on the data range :math:`[a, b]` written
    :math:`v = (y - a) / (b - a)`, :math:`h` is the piecewise-linear curve through the knots
    :math:`(k / (K - 1), w_k)`, :math:`k = 0 \dots K - 1` (``K = knots``), with :math:`w_0 = 0`
    (the background stays background) and :math:`w_k \sim U(\mathrm{floor}, 1)` otherwise, so the
    map is in general non-monotone; with probability ``keep``, :math:`h` is the identity
    (:math:`w_k = k / (K - 1)`). :math:`h(y) = a + (b - a)\, h(v)`; values outside the data range
    follow the first or last segment (extended linearly, nothing is clamped). The draws come from
    ``generator`` alone.

    Attributes:
        knots: number of knots ``K`` of the curve, >= 2 (``K - 1`` linear pieces). The default 12
            was the best of 4 to 24 on the T1 -> PD case of ``benchmarks/crossmodal.py`` (see
            :doc:`/benchmarks`): fewer knots vary the contrast too little, more too roughly.
        keep: probability of the identity.
        floor: lower end of the knot values after the first, in [0, 1); above the head
            extractor's threshold (5 % of the range) it keeps the head a head.

    Shape:
        images: ``(B, C, *S)``; out: the same.
    """

    knots: int = 12
    keep: float = 0.25
    floor: float = 0.1

    def __post_init__(self) -> None:
        check_int(self.knots, "ContrastRandomization.knots", 2)
        check_number(self.keep, "ContrastRandomization.keep", 0.0, 1.0)
        check_number(self.floor, "ContrastRandomization.floor", 0.0, 1.0, max_open=True)

    def draw(self, batch: int, generator: torch.Generator | None = None, *, device: torch.device | str = "cpu") -> torch.Tensor:
        """The knot values :math:`w` of ``batch`` random curves (float64, on the generator's device).

        Args:
            batch: number of curves.
            generator: the source of randomness.
            device: where to draw without a generator.

        Returns:
            The knot values, :math:`w_{i0} = 0`.

        Shape:
            out: ``(batch, knots)``.
        """
        device = device if generator is None else generator.device
        k = self.knots
        w = self.floor + (1 - self.floor) * torch.rand((batch, k - 1), generator=generator, device=device, dtype=torch.float64)
        keep = torch.rand((batch,), generator=generator, device=device, dtype=torch.float64) < self.keep
        w = torch.cat([torch.zeros((batch, 1), device=device, dtype=torch.float64), w], 1)
        identity = torch.linspace(0, 1, k, device=device, dtype=torch.float64).expand(batch, k)
        return torch.where(keep[:, None], identity, w)

    def apply(self, images: torch.Tensor, values: torch.Tensor, data_range: tuple[float, float]) -> torch.Tensor:
        """Remap each image by its curve.

        Args:
            images: the batch.
            values: knot values from :meth:`draw`, one row per image.
            data_range: ``(a, b)``, ``a < b``.

        Returns:
            :math:`h_i(y_i)`, in the dtype of ``images``.

        Shape:
            images: ``(B, C, *S)``; values: ``(B, knots)``; out: ``(B, C, *S)``.
        """
        dims = check_shape(images, "B C *S", "images", floating=True)
        check_shape(values, "B K", "values", bindings={"B": dims["B"], "K": self.knots})
        lo, hi = (float(v) for v in data_range)
        if not lo < hi:
            raise ValueError(f"data_range: expected (low, high) with low < high, got {data_range!r}")
        b, k = values.shape
        v = ((images.to(torch.float64) - lo) / (hi - lo)) * (k - 1)
        i = v.floor().clamp(0, k - 2)
        t = (v - i).reshape(b, -1)
        idx = i.long().reshape(b, -1)
        w = values.to(device=images.device, dtype=torch.float64)
        left, right = w.gather(1, idx), w.gather(1, idx + 1)
        out = lo + (hi - lo) * (left + (right - left) * t)
        return out.reshape(images.shape).to(images.dtype)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None, data_range: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
        """Remap a batch, each image by a new random curve (:meth:`draw`, then :meth:`apply`).

        Args:
            images: the batch.
            generator: the source of randomness.
            data_range: ``(a, b)`` of the images.

        Returns:
            The remapped batch.

        Shape:
            images: ``(B, C, *S)``; out: the same.
        """
        dims = check_shape(images, "B C *S", "images", floating=True)
        return self.apply(images, self.draw(dims["B"], generator, device=images.device), data_range)


def distributed_info() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised process group, or ``(0, 1)``.

    Returns:
        The rank and the number of processes.

    Shape:
        Not applicable.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@runtime_checkable
class BatchSource(Protocol):
    """An endless iterator of batches whose position can be saved and restored."""

    def __next__(self) -> Any: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def _collate(items: list[Any]) -> Any:
    first = items[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(items)
    if isinstance(first, (tuple, list)):
        return tuple(_collate([it[i] for it in items]) for i in range(len(first)))
    raise ValueError(f"dataset items: expected tensors or tuples of tensors, got {type(first).__name__}")


class ShuffledBatches:
    r"""Endless, resumable, shardable batches from an indexable dataset.

    Epoch ``e`` visits the items in the order ``torch.randperm(n)`` drawn from a generator seeded
    ``seed + e`` (or ``0..n-1`` without ``shuffle``), in global batches of
    ``batch_size * world_size`` items (an incomplete last batch is dropped); rank ``r`` gets items
    ``r::world_size`` of each global batch. The position ``(epoch, batch)`` is the whole state; it is
    saved with the settings that define the order and a fingerprint of the data (the number of items
    and the sha256 of every item's dtypes, shapes and values, computed once, at the first save or
    restore: the data must not change meanwhile), which a restore checks.

    Args:
        data: a tensor (items along the first dimension) or a sequence of tensors or of tuples of
            tensors (stacked per field).
        batch_size: items per batch on this process.
        seed: seed of the permutations.
        shuffle: permute every epoch.
        rank: this process (default: from :func:`torch.distributed`, else 0).
        world_size: number of processes (default: from :func:`torch.distributed`, else 1).

    Shape:
        Batches: ``(batch_size, *item)`` per field.
    """

    def __init__(
        self,
        data: torch.Tensor | Sequence[Any],
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        r0, w0 = distributed_info()
        rank = r0 if rank is None else rank
        world_size = w0 if world_size is None else world_size
        check_int(batch_size, "batch_size", 1)
        if not isinstance(world_size, int) or world_size < 1 or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank, world_size: expected 0 <= rank < world_size, got {rank!r}, {world_size!r}")
        n = len(data)
        if n < batch_size * world_size:
            raise ValueError(f"data: expected at least batch_size * world_size = {batch_size * world_size} items, got {n}")
        self.data, self.batch_size, self.seed, self.shuffle = data, batch_size, int(seed), bool(shuffle)
        self.rank, self.world_size = rank, world_size
        self.batches_per_epoch = n // (batch_size * world_size)
        self.epoch, self.position = 0, 0
        self._data_sha256: str | None = None

    def fingerprint(self) -> dict[str, Any]:
        """The identity of the data: the number of items and the sha256 of their content.

        Computed once (it reads every item) and cached.

        Returns:
            ``{"items": int, "data_sha256": str}``.

        Shape:
            Not applicable.
        """
        if self._data_sha256 is None:
            if isinstance(self.data, torch.Tensor):
                self._data_sha256 = fingerprint(self.data)[0]
            else:
                h = hashlib.sha256()
                for i in range(len(self.data)):
                    h.update(fingerprint(self.data[i])[0].encode())
                self._data_sha256 = h.hexdigest()
        return {"items": len(self.data), "data_sha256": self._data_sha256}

    def indices(self, epoch: int, position: int) -> torch.Tensor:
        """The dataset indices of batch ``position`` of epoch ``epoch`` on this rank.

        Args:
            epoch: the epoch.
            position: the batch within the epoch, ``< batches_per_epoch``.

        Returns:
            int64 indices.

        Shape:
            out: ``(batch_size,)``.
        """
        n = len(self.data)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch)) if self.shuffle else torch.arange(n)
        g = self.batch_size * self.world_size
        return order[position * g : (position + 1) * g][self.rank :: self.world_size]

    def __iter__(self) -> "ShuffledBatches":
        return self

    def __next__(self) -> Any:
        idx = self.indices(self.epoch, self.position)
        self.position += 1
        if self.position == self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        if isinstance(self.data, torch.Tensor):
            return self.data[idx]
        return _collate([self.data[int(i)] for i in idx])

    def state_dict(self) -> dict[str, Any]:
        """The position, the settings that define the order, and the data's :meth:`fingerprint`.

        Returns:
            ``{"epoch", "position", "seed", "shuffle", "batch_size", "world_size", "items", "data_sha256"}``.

        Shape:
            Not applicable.
        """
        order = {"epoch": self.epoch, "position": self.position, "seed": self.seed, "shuffle": self.shuffle, "batch_size": self.batch_size, "world_size": self.world_size}
        return {**order, **self.fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the position; the settings and the data must match (the order would differ otherwise).

        Args:
            state: from :meth:`state_dict`.

        Returns:
            None.

        Raises:
            ValueError: naming the first setting (``seed``, ``shuffle``, ``batch_size``,
                ``world_size``, ``items``, ``data_sha256``) that differs, with both values.

        Shape:
            Not applicable.
        """
        mine = self.state_dict()
        for key in ("seed", "shuffle", "batch_size", "world_size", "items", "data_sha256"):
            if state.get(key) != mine[key]:
                what = "the data differ" if key in ("items", "data_sha256") else "the batch order would differ"
                raise ValueError(f"ShuffledBatches.load_state_dict: {key} is {state.get(key)!r} in the saved state, {mine[key]!r} in this source ({what})")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.batches_per_epoch:
            raise ValueError(f"ShuffledBatches.load_state_dict: position {position} outside [0, {self.batches_per_epoch})")
        self.epoch, self.position = epoch, position


# -- the loop -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    """Settings of a :class:`Trainer`.

    Attributes:
        steps: total optimizer steps of the run (a resumed run continues up to this number).
        checkpoint_path: file of the training checkpoint (overwritten atomically), or None.
        checkpoint_every: write a checkpoint every this many steps (0: only at the end).
        resume: continue from ``checkpoint_path`` when it exists.
        ema_decay: decay of the weight average (None: no average).
        precision: ``"auto"`` (``"fp16"`` on CUDA, ``"fp32"`` elsewhere), ``"fp32"``, ``"fp16"``
            (autocast with a gradient scaler; CUDA only) or ``"bf16"`` (autocast, CPU or CUDA).
        grad_clip: clip the gradient norm to this value (None: no clipping).
        seed: seed of the objective's generator (rank ``r`` uses ``seed + r``).
        log_every: steps between printed lines (when tqdm is not used).
        progress: ``"auto"`` (tqdm when installed, else printed lines), ``"tqdm"``, ``"print"`` or
            ``"none"``; only rank 0 reports.
        name: the stage's name, shown in the progress bar and at the start of every printed line
            (e.g. ``"denoiser"``, ``"registration"``).

    A run resumed from ``checkpoint_path`` must have the saved ``seed``, ``ema_decay``,
    ``grad_clip`` and precision and at least the saved step as ``steps`` (see the module docstring);
    the other fields may change.
    """

    steps: int
    checkpoint_path: str | None = None
    checkpoint_every: int = 0
    resume: bool = True
    ema_decay: float | None = None
    precision: Precision = "auto"
    grad_clip: float | None = None
    seed: int = 0
    log_every: int = 50
    progress: Progress = "auto"
    name: str = "train"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip() or not self.name.isprintable():
            raise ValueError(f"TrainConfig.name: expected a non-empty one-line string, got {self.name!r}")
        for name in ("steps", "checkpoint_every", "log_every", "seed"):
            check_int(getattr(self, name), f"TrainConfig.{name}", 1 if name in ("steps", "log_every") else 0)
        check_option(self.precision, "TrainConfig.precision", ("auto", "fp32", "fp16", "bf16"))
        check_option(self.progress, "TrainConfig.progress", ("auto", "tqdm", "print", "none"))
        if self.ema_decay is not None:
            check_number(self.ema_decay, "TrainConfig.ema_decay", 0, 1, max_open=True)
        if self.grad_clip is not None:
            check_number(self.grad_clip, "TrainConfig.grad_clip", 0, min_open=True)


def _plain(value: Any) -> Any:
    """A setting as plain data that a checkpoint holds and ``==`` compares (tensors as lists, others as repr)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return repr(value)


class _Absent:
    def __repr__(self) -> str:
        return "absent"


_ABSENT = _Absent()


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


class Trainer:
    r"""A training loop for one model and one objective (see the module docstring).

    Each step: ``batch = next(data)`` (moved to the model's device); ``out = objective(model,
    batch, generator)`` under autocast when mixed precision is on (``model`` is the DDP wrapper in a
    distributed run); the loss is ``out`` or ``out["total"]``; backward (scaled with ``fp16``),
    optional gradient clipping, the optimizer step, the EMA update.

    Args:
        objective: ``(model, batch, generator) -> loss`` (a scalar or a dict with ``"total"``).
        model: the module whose parameters ``optimizer`` updates.
        optimizer: the optimizer.
        data: a :class:`BatchSource` (e.g. :class:`ShuffledBatches`); it must be resumable when
            checkpoints are written.
        config: the settings, kept as ``trainer.settings``.
        generator: the objective's generator (default: one on the model's device seeded
            ``config.seed + rank``).

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(2, 1)
        >>> data = ShuffledBatches(torch.randn(8, 2), 4)
        >>> objective = lambda m, b, g: m(b).square().mean()
        >>> trainer = Trainer(objective, net, torch.optim.SGD(net.parameters(), lr=0.1), data, TrainConfig(steps=3, progress="none"))
        >>> trainer.fit()["total"] >= 0
        True

    Shape:
        Not applicable.
    """

    def __init__(
        self,
        objective: Objective,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        data: BatchSource,
        config: TrainConfig,
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        if not callable(objective):
            raise ValueError(f"objective: expected a callable (model, batch, generator) -> loss, got {type(objective).__name__}")
        if not isinstance(model, nn.Module):
            raise ValueError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not isinstance(config, TrainConfig):
            raise ValueError(f"config: expected a TrainConfig, got {type(config).__name__}")
        if not hasattr(data, "__next__"):
            raise ValueError(f"data: expected an iterator of batches (e.g. ShuffledBatches), got {type(data).__name__}")
        if config.checkpoint_path is not None and not isinstance(data, BatchSource):
            raise ValueError(
                f"data: checkpoints need a resumable batch source with state_dict/load_state_dict (e.g. ShuffledBatches), got {type(data).__name__}"
            )
        params = list(model.parameters())
        if not params:
            raise ValueError("model: has no parameters to train")
        self.objective, self.model, self.optimizer, self.data, self.settings = objective, model, optimizer, data, config
        self.device = params[0].device
        self.rank, self.world_size = distributed_info()
        precision = config.precision
        if precision == "auto":
            precision = "fp16" if self.device.type == "cuda" else "fp32"
        if precision == "fp16" and self.device.type != "cuda":
            raise ValueError(f"TrainConfig.precision='fp16' needs a CUDA model (float16 autocast with a gradient scaler), the model is on {self.device}; use 'fp32' or 'bf16'")
        self.precision: Literal["fp32", "fp16", "bf16"] = precision  # type: ignore[assignment]
        self.scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
        if generator is None:
            generator = torch.Generator(self.device).manual_seed(config.seed + self.rank)
        self.generator = generator
        self.ema = EMA(model, config.ema_decay) if config.ema_decay is not None else None
        self.step = 0
        self.last: dict[str, float] = {}
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.wrapped: nn.Module = DistributedDataParallel(model, device_ids=ids)
        else:
            self.wrapped = model

    # -- state ------------------------------------------------------------------------------------
    def _local_rng(self) -> dict[str, Any]:
        return {
            "generator": self.generator.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
        }

    def _gather_rng(self) -> list[dict[str, Any]]:
        local = self._local_rng()
        if self.world_size == 1:
            return [local]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, local)
        return out

    def resume_settings(self) -> dict[str, Any]:
        """The settings a resumed run must share with its checkpoint (a change would change the result).

        Returns:
            ``{name: value}`` of plain data: ``"TrainConfig.seed"``, ``"TrainConfig.ema_decay"``,
            ``"TrainConfig.grad_clip"``, ``"precision"``, ``"optimizer"`` (its class) and its
            hyper-parameters (``"optimizer lr"``, ... or ``"optimizer group 1 lr"``, ... with several
            groups, and the number of parameters of each group), ``"model"`` (its class), the fields
            of its ``settings`` dataclass when it has one (``"model config.<field>"``, the key
            written by earlier versions) and the dtype
            and shape of every entry of its state dict (``"model tensor <name>"``).

        Shape:
            Not applicable.
        """
        cfg, opt, model = self.settings, self.optimizer, self.model
        out: dict[str, Any] = {
            "TrainConfig.seed": cfg.seed,
            "TrainConfig.ema_decay": cfg.ema_decay,
            "TrainConfig.grad_clip": cfg.grad_clip,
            "precision": self.precision,
            "optimizer": f"{type(opt).__module__}.{type(opt).__qualname__}",
        }
        for i, group in enumerate(opt.param_groups):
            prefix = "optimizer " if len(opt.param_groups) == 1 else f"optimizer group {i} "
            out[f"{prefix}parameters"] = len(group["params"])
            out.update({f"{prefix}{k}": _plain(v) for k, v in group.items() if k != "params"})
        out["model"] = f"{type(model).__module__}.{type(model).__qualname__}"
        model_settings = getattr(model, "settings", None)
        if dataclasses.is_dataclass(model_settings) and not isinstance(model_settings, type):
            out.update({f"model config.{f.name}": _plain(getattr(model_settings, f.name)) for f in dataclasses.fields(model_settings)})
        out.update({f"model tensor {k}": f"{v.dtype} {tuple(v.shape)}" for k, v in model.state_dict().items()})
        return out

    def _check_settings(self, saved: Any) -> None:
        """Refuse a checkpoint whose settings differ from this run's, naming the first difference."""
        if not isinstance(saved, dict):
            raise ValueError("cannot resume: the checkpoint records no settings (written by an older plasticine); delete it to start over")
        new = self.resume_settings()
        for key in list(new) + [k for k in saved if k not in new]:
            old, now = saved.get(key, _ABSENT), new.get(key, _ABSENT)
            # an optimizer option that only one torch version knows is not a changed setting
            if old != now and not (key.startswith("optimizer ") and not key.endswith("parameters") and _ABSENT in (old, now)):
                raise ValueError(
                    f"cannot resume: {key} is {old!r} in the checkpoint, {now!r} in this run; "
                    "resume with the saved setting, or delete the checkpoint to start over"
                )

    def state_dict(self, rng: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Everything a resumed run needs (tensors and plain data only).

        Args:
            rng: the RNG states of every rank (default: this process's only).

        Returns:
            ``{"format", "step", "world_size", "model", "optimizer", "ema", "scaler", "data", "rng",
            "config", "settings"}`` (``settings`` from :meth:`resume_settings`).

        Shape:
            Not applicable.
        """
        data_state = self.data.state_dict() if isinstance(self.data, BatchSource) else None
        return {
            "format": "plasticine-training",
            "step": self.step,
            "world_size": self.world_size,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "ema": None if self.ema is None else self.ema.state_dict(),
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
            "data": data_state,
            "rng": rng if rng is not None else [self._local_rng()],
            "config": dataclasses.asdict(self.settings),
            "settings": self.resume_settings(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; every setting that changes the result must match.

        Nothing is restored unless all checks pass: the world size, ``steps`` at least the saved
        step, the :meth:`resume_settings` and the batch source's settings and data fingerprint.

        Args:
            state: the state.

        Returns:
            None.

        Raises:
            ValueError: for a state of another kind, another world size, a saved step beyond
                ``TrainConfig.steps``, or a setting that differs (naming it, the saved and the new
                value).

        Shape:
            Not applicable.
        """
        if state.get("format") != "plasticine-training":
            raise ValueError(f"expected a plasticine training checkpoint, got format {state.get('format')!r}")
        if state["world_size"] != self.world_size:
            raise ValueError(
                f"checkpoint written by {state['world_size']} process(es), this run has {self.world_size}: "
                "an exact resume needs the same number (load the model weights with plasticine.checkpoint.load_state(path)['model'] instead)"
            )
        if (state["ema"] is None) != (self.ema is None):
            raise ValueError(f"checkpoint ema is {'absent' if state['ema'] is None else 'present'}, but TrainConfig.ema_decay is {self.settings.ema_decay!r}")
        if (state["scaler"] is None) != (self.scaler is None):
            raise ValueError(f"checkpoint was trained with a different precision (gradient scaler {'absent' if state['scaler'] is None else 'present'}), this run uses {self.precision!r}")
        if int(state["step"]) > self.settings.steps:
            raise ValueError(f"cannot resume: the checkpoint is at step {int(state['step'])}, beyond TrainConfig.steps {self.settings.steps}; give steps >= {int(state['step'])}")
        self._check_settings(state.get("settings"))
        if state["data"] is not None:  # checks its settings and data before it changes anything
            if not isinstance(self.data, BatchSource):
                raise ValueError(f"checkpoint holds a data position, but data ({type(self.data).__name__}) cannot restore one")
            self.data.load_state_dict(state["data"])
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        if self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
        rng = state["rng"][self.rank]
        self.generator.set_state(rng["generator"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        self.step = int(state["step"])

    def save_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Write the training state atomically; collective in a distributed run, only rank 0 writes.

        Args:
            path: the file.

        Returns:
            None.

        Shape:
            Not applicable.
        """
        rng = self._gather_rng()
        if self.rank == 0:
            save_state(path, self.state_dict(rng))
        if self.world_size > 1:
            dist.barrier()

    def load_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Resume from a file written by :meth:`save_checkpoint` (never unpickles code).

        Args:
            path: the file.

        Returns:
            None.

        Raises:
            plasticine.checkpoint.CheckpointError: naming the file, for a file that cannot be read
                or fails its integrity check, and for a state that :meth:`load_state_dict` refuses.

        Shape:
            Not applicable.
        """
        # on the CPU: generator states must stay CPU byte tensors; model, optimizer and EMA copy to their devices
        state = load_state(path, map_location="cpu")
        try:
            self.load_state_dict(state)
        except CheckpointError:
            raise
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"{path}: {err}") from err

    # -- running ----------------------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.float16 if self.precision == "fp16" else torch.bfloat16
        return torch.autocast(self.device.type, dtype=dtype)

    def train_step(self) -> dict[str, float]:
        """Run one optimizer step.

        Returns:
            The loss terms of the step as floats (``"total"`` and any others the objective returned).

        Raises:
            FloatingPointError: when the loss is not finite.

        Shape:
            Not applicable.
        """
        batch = _to_device(next(self.data), self.device)
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            out = self.objective(self.wrapped, batch, self.generator)
        terms = dict(out) if isinstance(out, Mapping) else {"total": out}
        if "total" not in terms or not isinstance(terms["total"], torch.Tensor) or terms["total"].dim() != 0:
            raise ValueError(f"objective: expected a scalar tensor or a dict with a scalar 'total', got {type(out).__name__} with keys {sorted(terms)}")
        loss = terms["total"].float()
        if not bool(torch.isfinite(loss)):
            raise FloatingPointError(f"step {self.step + 1}: the loss is {float(loss.detach())}; lower the learning rate or check the data")
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            if self.settings.grad_clip is not None:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            if self.settings.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.grad_clip)
            self.optimizer.step()
        if self.ema is not None:
            self.ema.update()
        self.step += 1
        self.last = {k: float(v.detach()) for k, v in terms.items() if isinstance(v, torch.Tensor) and v.dim() == 0}
        return self.last

    def _progress(self) -> tuple[Any, str]:
        mode = self.settings.progress
        if self.rank != 0 or mode == "none":
            return None, "none"
        if mode in ("auto", "tqdm"):
            try:
                from tqdm.auto import tqdm
            except ImportError:
                if mode == "tqdm":
                    raise ValueError("TrainConfig.progress='tqdm' needs the tqdm package (pip install tqdm), or use 'auto'/'print'") from None
            else:
                return tqdm(total=self.settings.steps, initial=self.step, desc=self.settings.name, dynamic_ncols=True), "tqdm"
        return None, "print"

    def fit(self) -> dict[str, float]:
        """Train until ``config.steps``, resuming from ``config.checkpoint_path`` when it exists.

        Writes a checkpoint every ``checkpoint_every`` steps and at the end (rank 0).

        Returns:
            The loss terms of the last step (empty when nothing was left to run).

        Shape:
            Not applicable.
        """
        cfg = self.settings
        path = None if cfg.checkpoint_path is None else Path(cfg.checkpoint_path)
        if path is not None and cfg.resume and path.is_file():
            self.load_checkpoint(path)
            if self.rank == 0 and cfg.progress != "none":
                print(f"{cfg.name}: resuming from {path} at step {self.step}", file=sys.stderr)
        self.model.train()
        bar, mode = self._progress()
        try:
            while self.step < cfg.steps:
                terms = self.train_step()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{terms['total']:.4g}")
                elif mode == "print" and (self.step % cfg.log_every == 0 or self.step == cfg.steps):
                    print(f"{cfg.name}: step {self.step}/{cfg.steps} loss {terms['total']:.4g}", file=sys.stderr)
                if path is not None and cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < cfg.steps:
                    self.save_checkpoint(path)
        finally:
            if bar is not None:
                bar.close()
        if path is not None:
            self.save_checkpoint(path)
        return self.last

