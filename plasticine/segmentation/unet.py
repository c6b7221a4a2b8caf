r"""A plain U-Net for 2D and 3D segmentation, its loss and a minimal training loop.

:class:`SegmentationUNet` is the encoder-decoder of Ronneberger et al. (2015) and Cicek et al.
(2016) in one implementation for both dimensions: at each of ``depth + 1`` levels a few
convolution-normalisation-activation blocks, 2x max pooling on the way down, 2x transposed
convolutions and skip concatenation on the way up, and a 1x1 convolution to one logit per class.
Inputs of any spatial size are padded (edge replication) to a multiple of :math:`2^{depth}`,
then the logits are cropped back, so every output voxel belongs to an input voxel.

:func:`segmentation_loss` is cross entropy plus soft Dice, the usual objective of nnU-Net and
MONAI's ``DiceCELoss``; :func:`train_segmentation` fits a network to a small in-memory set of
images with Adam and random flips, all randomness drawn from one :class:`torch.Generator`.
The paper scores traceability with such a network trained on the target domain: a mask predicted
on the translated image is traced back to the source through :math:`\phi^{-1}`.

References:
    Ronneberger, Fischer and Brox, "U-Net: convolutional networks for biomedical image
    segmentation", MICCAI 2015. Cicek et al., "3D U-Net: learning dense volumetric segmentation from
    sparse annotation", MICCAI 2016. Isensee et al., "nnU-Net: a self-configuring method for deep
    learning-based biomedical image segmentation", Nature Methods 18, 2021. Milletari, Navab and
    Ahmadi, "V-Net", 3DV 2016 (soft Dice).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import Configurable, register_settings
from ..core.shapes import check_shape
from ..core.validate import check_int, check_number, check_option

__all__ = ["SegmentationUNetConfig", "SegmentationUNet", "segmentation_loss", "SegmentationLoss", "train_segmentation"]

Norm = Literal["instance", "group", "batch", "none"]
Activation = Literal["leaky_relu", "relu", "gelu"]

_NORMS = ("instance", "group", "batch", "none")
_ACTIVATIONS = ("leaky_relu", "relu", "gelu")


@register_settings
@dataclass(frozen=True)
class SegmentationUNetConfig:
    """Architecture of a :class:`SegmentationUNet`.

    Attributes:
        depth: number of 2x downsamplings (the network has ``depth + 1`` resolution levels).
        base_width: channels at the first level.
        channel_multipliers: width of level ``i`` is ``base_width * channel_multipliers[i]``;
            ``depth + 1`` positive ints. ``None`` doubles at every level: ``(1, 2, 4, ...)``.
        norm: ``"instance"`` (default, nnU-Net's choice; affine), ``"group"``, ``"batch"`` or ``"none"``.
        groups: number of groups for ``norm="group"``; must divide every level's width.
        dropout: probability of zeroing an activation after every block (0 disables dropout).
        activation: ``"leaky_relu"`` (slope 0.01, default), ``"relu"`` or ``"gelu"``.
        blocks: convolution blocks per level and direction.
        kernel_size: odd size of the convolution kernels.

    Raises:
        ValueError: on values out of range or widths that ``groups`` does not divide.

    Shape:
        Not applicable (settings only).
    """

    depth: int = 4
    base_width: int = 16
    channel_multipliers: tuple[int, ...] | None = None
    norm: Norm = "instance"
    groups: int = 8
    dropout: float = 0.0
    activation: Activation = "leaky_relu"
    blocks: int = 2
    kernel_size: int = 3

    def __post_init__(self) -> None:
        for name in ("depth", "base_width", "groups", "blocks", "kernel_size"):
            check_int(getattr(self, name), f"SegmentationUNetConfig.{name}", 0 if name == "depth" else 1)
        if self.kernel_size % 2 == 0:
            raise ValueError(f"SegmentationUNetConfig.kernel_size: expected an odd size, got {self.kernel_size}")
        check_option(self.norm, "SegmentationUNetConfig.norm", _NORMS)
        check_option(self.activation, "SegmentationUNetConfig.activation", _ACTIVATIONS)
        check_number(self.dropout, "SegmentationUNetConfig.dropout", 0, 1, max_open=True)
        if self.channel_multipliers is not None:
            m = tuple(self.channel_multipliers)
            if len(m) != self.depth + 1:
                raise ValueError(
                    f"SegmentationUNetConfig.channel_multipliers: expected depth + 1 = {self.depth + 1} positive ints, got {self.channel_multipliers!r}"
                )
            for v in m:
                check_int(v, "SegmentationUNetConfig.channel_multipliers[...]", 1)
            object.__setattr__(self, "channel_multipliers", m)
        if self.norm == "group":
            bad = [w for w in self.widths if w % self.groups]
            if bad:
                raise ValueError(f"SegmentationUNetConfig.groups: {self.groups} groups must divide every level width {self.widths}; they do not divide {bad}")

    @property
    def widths(self) -> tuple[int, ...]:
        """Channels at each level, ``depth + 1`` of them."""
        mult = self.channel_multipliers or tuple(2**i for i in range(self.depth + 1))
        return tuple(self.base_width * m for m in mult)


def _dropout(x: torch.Tensor, p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Inverted elementwise dropout whose mask is drawn from ``generator`` (on its own device)."""
    device = generator.device if generator is not None else x.device
    keep = torch.rand(x.shape, generator=generator, device=device, dtype=x.dtype) >= p
    return x * keep.to(x.device) / (1.0 - p)


class _Block(nn.Module):
    """Convolution, normalisation, activation (then dropout when training)."""

    def __init__(self, cin: int, cout: int, n: int, config: SegmentationUNetConfig) -> None:
        super().__init__()
        conv = getattr(nn, f"Conv{n}d")
        self.conv = conv(cin, cout, config.kernel_size, padding=config.kernel_size // 2, bias=config.norm == "none")
        if config.norm == "instance":
            self.norm: nn.Module = getattr(nn, f"InstanceNorm{n}d")(cout, affine=True)
        elif config.norm == "group":
            self.norm = nn.GroupNorm(config.groups, cout)
        elif config.norm == "batch":
            self.norm = getattr(nn, f"BatchNorm{n}d")(cout)
        else:
            self.norm = nn.Identity()
        self.act: nn.Module = {"leaky_relu": nn.LeakyReLU(0.01), "relu": nn.ReLU(), "gelu": nn.GELU()}[config.activation]
        self.p = float(config.dropout)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = self.act(self.norm(self.conv(x)))
        return _dropout(x, self.p, generator) if self.training and self.p > 0 else x


class _Level(nn.Module):
    def __init__(self, cin: int, cout: int, n: int, config: SegmentationUNetConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_Block(cin if i == 0 else cout, cout, n, config) for i in range(config.blocks))

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, generator)
        return x


class SegmentationUNet(Configurable, nn.Module, config_ignore=("generator",)):
    r"""Plain U-Net returning per-class logits, for 2D or 3D images of any size.

    Level ``i`` has ``config.widths[i]`` channels. The encoder applies ``blocks`` conv-norm-act
    blocks per level and 2x max pooling between levels; the decoder upsamples by 2x transposed
    convolutions, concatenates the encoder features of the same level and applies ``blocks``
    blocks; a 1x1 convolution maps to ``num_classes`` logits. The input is padded by edge
    replication to a multiple of :math:`2^{depth}` along every spatial axis (split evenly before
    and after) and the logits are cropped back to the input's size. ``net.config`` holds the
    constructor arguments (``generator`` aside, see :class:`~plasticine.core.Configurable`);
    ``net.settings`` is the :class:`SegmentationUNetConfig` in use.

    Args:
        in_channels: image channels ``C``.
        num_classes: output channels ``L`` (one logit per class, background included; use
            softmax / argmax over them).
        spatial_dims: 2 or 3; selects ``Conv2d`` or ``Conv3d`` layers. Inputs must match it.
        config: the architecture (:class:`SegmentationUNetConfig`); the default is a 5-level network with 16
            base channels and instance normalisation.
        generator: source of the initial weights (see :meth:`reset_parameters`); ``None`` keeps
            PyTorch's default initialisation from the global generator.

    Raises:
        ValueError: on bad arguments, on inputs of the wrong shape, or on inputs so small that
            instance normalisation would see a single voxel at the coarsest level.

    Shape:
        image: ``(B, C, *S)``; logits: ``(B, L, *S)``, same ``S``, 2 or 3 spatial dimensions.

    Reference:
        Ronneberger et al., MICCAI 2015; Cicek et al., MICCAI 2016.

    Example:
        >>> net = SegmentationUNet(1, 3, spatial_dims=2, config=SegmentationUNetConfig(depth=2, base_width=4))
        >>> net(torch.zeros(2, 1, 21, 17)).shape
        torch.Size([2, 3, 21, 17])
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        spatial_dims: Literal[2, 3] = 2,
        config: SegmentationUNetConfig | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        check_int(in_channels, "in_channels", 1)
        check_int(num_classes, "num_classes", 1)
        check_option(spatial_dims, "spatial_dims", (2, 3))
        config = config if config is not None else SegmentationUNetConfig()
        if not isinstance(config, SegmentationUNetConfig):
            raise ValueError(f"config: expected a SegmentationUNetConfig, got {type(config).__name__}")
        self.in_channels, self.num_classes, self.spatial_dims, self.settings = in_channels, num_classes, spatial_dims, config
        n, widths = spatial_dims, config.widths
        self.encoder = nn.ModuleList(_Level(in_channels if i == 0 else widths[i - 1], w, n, config) for i, w in enumerate(widths))
        up = getattr(nn, f"ConvTranspose{n}d")
        self.up = nn.ModuleList(up(widths[i + 1], widths[i], 2, stride=2) for i in range(config.depth))
        self.decoder = nn.ModuleList(_Level(2 * widths[i], widths[i], n, config) for i in range(config.depth))
        self.head = getattr(nn, f"Conv{n}d")(widths[0], num_classes, 1)
        if generator is not None:
            self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        r"""Draw new weights with PyTorch's default initialisation, from ``generator``.

        Convolution weights :math:`\sim` Kaiming-uniform with :math:`a = \sqrt 5`, biases
        :math:`\sim U(-1/\sqrt{fan_{in}}, 1/\sqrt{fan_{in}})` (what ``nn.Conv*d`` does with the
        global generator); normalisation layers get unit scale and zero shift.

        Args:
            generator: source of the weights (on the CPU or the weights' device); ``None`` uses
                torch's global generator.

        Shape:
            Not applicable.
        """
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
                    nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
                    if module.bias is not None:
                        fan_in = module.weight.shape[1] * math.prod(module.weight.shape[2:])
                        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                        nn.init.uniform_(module.bias, -bound, bound, generator=generator)
                elif isinstance(module, (nn.InstanceNorm2d, nn.InstanceNorm3d, nn.GroupNorm, nn.BatchNorm2d, nn.BatchNorm3d)):
                    module.reset_parameters()

    def forward(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Logits of every class at every voxel.

        Args:
            image: the input images.
            generator: source of the dropout masks in training mode (drawn on the generator's
                device); ``None`` uses torch's global generator. Unused without dropout.

        Returns:
            Unnormalised class scores.

        Shape:
            image: ``(B, C, *S)``; out: ``(B, L, *S)``.
        """
        dims = check_shape(image, f"B {self.in_channels} *S", "image", spatial=(self.spatial_dims,))
        if not image.dtype.is_floating_point:
            raise ValueError(f"image: expected a floating dtype, got {image.dtype}")
        size = dims["S"]
        m = 2**self.settings.depth
        padded = [math.ceil(s / m) * m for s in size]
        if self.settings.norm == "instance" and math.prod(p // m for p in padded) < 2:
            raise ValueError(
                f"image: spatial size {tuple(size)} leaves one voxel at the coarsest level of a depth-{self.settings.depth} "
                "U-Net, where instance normalisation is undefined; use a larger image or a smaller depth"
            )
        pad: list[int] = []
        for s, p in reversed(list(zip(size, padded))):
            pad += [(p - s) // 2, p - s - (p - s) // 2]
        x = F.pad(image, pad, mode="replicate") if any(pad) else image
        pool = getattr(F, f"max_pool{self.spatial_dims}d")
        skips = []
        for i, level in enumerate(self.encoder):
            if i > 0:
                x = pool(x, 2)
            x = level(x, generator)
            skips.append(x)
        for i in reversed(range(self.settings.depth)):
            x = self.decoder[i](torch.cat([skips[i], self.up[i](x)], dim=1), generator)
        logits = self.head(x)
        crop = (slice(None), slice(None)) + tuple(slice((p - s) // 2, (p - s) // 2 + s) for s, p in zip(size, padded))
        return logits[crop]


def _target_probabilities(labels: torch.Tensor, num_classes: int, bindings: dict) -> torch.Tensor:
    """One-hot (or given soft) targets as a float tensor ``(B, L, *S)``."""
    check_shape(labels, "B K *S", "labels", bindings=bindings)
    if labels.dtype.is_floating_point:
        if labels.shape[1] != num_classes:
            raise ValueError(f"labels: floating labels are class probabilities (B, {num_classes}, *S), got {tuple(labels.shape)}")
        if not bool(((labels >= 0) & (labels <= 1)).all()) or not bool(torch.allclose(labels.sum(1), labels.new_ones(()), atol=1e-4)):
            raise ValueError("labels: floating labels must be class probabilities: values in [0, 1] summing to 1 over the channels")
        return labels
    if labels.dtype == torch.bool:
        raise ValueError("labels: expected integer labels (B, 1, *S) or float one-hot/probabilities (B, L, *S), got bool; use .long() or .float()")
    if labels.dtype.is_complex:
        raise ValueError(f"labels: expected integer or floating labels, got {labels.dtype}")
    if labels.shape[1] != 1:
        raise ValueError(f"labels: integer labels must have shape (B, 1, *S), got {tuple(labels.shape)}")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"labels: expected labels in [0, {num_classes - 1}], found [{lo}, {hi}]")
    return F.one_hot(labels[:, 0].long(), num_classes).movedim(-1, 1)


def segmentation_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ce_weight: float = 1.0,
    dice_weight: float = 1.0,
    include_background: bool = True,
    batch_dice: bool = False,
    smooth: float = 1e-5,
) -> torch.Tensor:
    r"""Cross entropy plus soft Dice loss of class logits against labels.

    With :math:`p = \mathrm{softmax}(z)` over the classes and the one-hot (or soft) target
    :math:`t`,

    .. math::

        \mathcal{L} = w_{ce}\, \frac{1}{|S|} \sum_{x} -\sum_c t_c(x) \log p_c(x)
        \;+\; w_{dice} \Big(1 - \frac{1}{|B||C|} \sum_{b, c}
        \frac{2 \sum_x p_{bc}(x)\, t_{bc}(x) + \epsilon}{\sum_x p_{bc}(x) + \sum_x t_{bc}(x) + \epsilon}\Big),

    the cross entropy averaged over voxels and batch. With ``batch_dice=True`` the Dice sums run
    over the batch as well (one Dice per class, more stable for structures absent from some
    samples). ``smooth`` (:math:`\epsilon`) makes a class absent from both sides score 1, like
    ``empty="perfect"`` in :mod:`plasticine.segmentation.metrics`.

    Args:
        logits: class scores of a network.
        labels: integer labels ``(B, 1, *S)`` in ``0 .. L-1``, or floating one-hot / class
            probabilities ``(B, L, *S)``.
        ce_weight: weight :math:`w_{ce}` of the cross entropy (>= 0).
        dice_weight: weight :math:`w_{dice}` of the soft Dice term (>= 0).
        include_background: let class 0 take part in the Dice term (the cross entropy always uses
            every class).
        batch_dice: one Dice per class over the whole batch instead of one per sample and class.
        smooth: :math:`\epsilon > 0` added to the numerator and the denominator of every Dice.

    Returns:
        The scalar loss.

    Raises:
        ValueError: on mismatched shapes, labels out of range, or bad weights.

    Shape:
        logits: ``(B, L, *S)``, ``L >= 2``; labels: ``(B, 1, *S)`` or ``(B, L, *S)``; out: ``()``.

    Reference:
        Milletari et al., "V-Net", 3DV 2016; Isensee et al., nnU-Net, Nature Methods 2021.
    """
    bindings: dict = {}
    dims = check_shape(logits, "B L *S", "logits", bindings=bindings)
    if not logits.dtype.is_floating_point:
        raise ValueError(f"logits: expected a floating dtype, got {logits.dtype}")
    num_classes = dims["L"]
    if num_classes < 2:
        raise ValueError(f"logits: expected at least 2 classes (softmax over L), got L={num_classes}")
    for name, value in (("ce_weight", ce_weight), ("dice_weight", dice_weight)):
        check_number(value, name, 0)
    if not isinstance(smooth, (int, float)) or not smooth > 0:
        raise ValueError(f"smooth: expected a number > 0, got {smooth!r}")
    target = _target_probabilities(labels, num_classes, {"B": bindings["B"], "S": bindings["S"]}).to(logits.dtype)
    loss = logits.new_zeros(())
    if ce_weight:
        loss = loss + ce_weight * F.cross_entropy(logits, target)
    if dice_weight:
        prob = logits.softmax(1)
        if not include_background:
            prob, target = prob[:, 1:], target[:, 1:]
        sum_dims = tuple(range(2, logits.dim()))
        if batch_dice:
            sum_dims = (0,) + sum_dims
        inter = (prob * target).sum(sum_dims)
        den = prob.sum(sum_dims) + target.sum(sum_dims)
        loss = loss + dice_weight * (1 - ((2 * inter + smooth) / (den + smooth)).mean())
    return loss


class SegmentationLoss(nn.Module):
    """Module form of :func:`segmentation_loss`: stores the settings and calls it.

    Args:
        ce_weight: weight of the cross entropy.
        dice_weight: weight of the soft Dice term.
        include_background: let class 0 take part in the Dice term.
        batch_dice: one Dice per class over the whole batch.
        smooth: smoothing constant of the Dice.

    Shape:
        logits: ``(B, L, *S)``; labels: ``(B, 1, *S)`` or ``(B, L, *S)``; out: ``()``.
    """

    def __init__(
        self,
        ce_weight: float = 1.0,
        dice_weight: float = 1.0,
        include_background: bool = True,
        batch_dice: bool = False,
        smooth: float = 1e-5,
    ) -> None:
        super().__init__()
        self.ce_weight, self.dice_weight = ce_weight, dice_weight
        self.include_background, self.batch_dice, self.smooth = include_background, batch_dice, smooth

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The loss of ``logits`` against ``labels`` (see :func:`segmentation_loss`).

        Shape:
            logits: ``(B, L, *S)``; labels: ``(B, 1, *S)`` or ``(B, L, *S)``; out: ``()``.
        """
        return segmentation_loss(
            logits,
            labels,
            ce_weight=self.ce_weight,
            dice_weight=self.dice_weight,
            include_background=self.include_background,
            batch_dice=self.batch_dice,
            smooth=self.smooth,
        )


def train_segmentation(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    steps: int,
    generator: torch.Generator,
    *,
    batch_size: int = 4,
    lr: float = 1e-3,
    flips: bool = True,
    loss: nn.Module | None = None,
    callback: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Fit a segmentation network to a small in-memory training set with Adam.

    Each step draws ``batch_size`` indices uniformly with replacement, flips each drawn sample
    along each spatial axis with probability 1/2 (when ``flips``), and takes one Adam step on
    ``loss`` (default :class:`SegmentationLoss`). All randomness (indices, flips, and the dropout
    masks of a :class:`SegmentationUNet`) comes from ``generator``, so the same seed and initial
    weights give the same run on CPU. The model is left with its weights trained and its
    train/eval mode as it was.

    Args:
        model: a network mapping ``(B, C, *S)`` images to ``(B, L, *S)`` logits, on the device of
            ``images``.
        images: the training images, floating.
        labels: their labels, integer ``(M, 1, *S)`` or floating one-hot ``(M, L, *S)``.
        steps: number of optimisation steps (>= 1).
        generator: the source of every random draw.
        batch_size: samples per step.
        lr: Adam learning rate.
        flips: random flips along every spatial axis as augmentation.
        loss: the objective ``loss(logits, labels) -> scalar``.
        callback: called after every step as ``callback(step, loss)`` (steps from 1), e.g. to
            report progress; None for none.

    Returns:
        The loss of every step, in order.

    Raises:
        ValueError: on mismatched shapes or bad settings.

    Shape:
        images: ``(M, C, *S)``; labels: ``(M, 1, *S)`` or ``(M, L, *S)``.
    """
    bindings: dict = {}
    check_shape(images, "M C *S", "images", bindings=bindings)
    check_shape(labels, "M K *S", "labels", bindings=bindings)
    if not images.dtype.is_floating_point:
        raise ValueError(f"images: expected a floating dtype, got {images.dtype}")
    check_int(steps, "steps", 1)
    check_int(batch_size, "batch_size", 1)
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator: expected a torch.Generator, got {type(generator).__name__}")
    loss_fn = loss if loss is not None else SegmentationLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    was_training = model.training
    model.train()
    m, n = images.shape[0], images.dim() - 2
    history: list[float] = []
    try:
        for _ in range(steps):
            index = torch.randint(m, (batch_size,), generator=generator, device=generator.device).to(images.device)
            x, y = images[index], labels[index]
            if flips:
                flip = torch.rand(batch_size, n, generator=generator, device=generator.device).to(images.device) < 0.5
                for axis in range(n):
                    f = flip[:, axis].view(batch_size, *([1] * (n + 1)))
                    x = torch.where(f, x.flip(axis + 2), x)
                    y = torch.where(f, y.flip(axis + 2), y)
            logits = model(x, generator=generator) if isinstance(model, SegmentationUNet) else model(x)
            value = loss_fn(logits, y)
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            history.append(float(value.detach()))
            if callback is not None:
                callback(len(history), history[-1])
    finally:
        model.train(was_training)
    return history
