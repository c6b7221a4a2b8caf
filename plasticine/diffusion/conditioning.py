r"""Condition encoders: structure map :math:`(B, L, *S)` to what the denoiser reads.

Two implementations of :class:`~plasticine.core.ConditionEncoder`:

* :class:`ConcatConditioning` (the paper): the structure map itself is the condition, passed to the
  U-Net as ``cond_channels = L`` extra input channels. It checks the channel count and dtype, and
  can turn an integer label map ``(B, 1, *S)`` into one-hot channels.
* :class:`LearnedConditioning`: a small convolutional encoder whose feature pyramid modulates every
  residual block of :class:`~plasticine.diffusion.unet.ConditionalUNet` by spatially varying
  scale-and-shift (FiLM / SPADE style). It is trained with the U-Net, so it is given to the U-Net at
  construction (``ConditionalUNet(config, encoder=LearnedConditioning(...))``); the U-Net still
  receives the structure map as ``condition`` (prepared by :class:`ConcatConditioning`) and
  concatenates it at the input. Called on its own it returns its full-resolution features.

References:
    E. Perez et al., "FiLM: Visual Reasoning with a General Conditioning Layer", AAAI 2018.
    T. Park et al., "Semantic Image Synthesis with Spatially-Adaptive Normalization", CVPR 2019.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import Configurable
from ..core.shapes import check_shape
from ..core.validate import check_int, check_option

__all__ = ["structure_condition", "ConcatConditioning", "LearnedConditioning"]


def structure_condition(
    structure: torch.Tensor,
    num_labels: int,
    one_hot: bool = False,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    r"""Validate a structure map and return it as floating condition channels.

    A floating map ``(B, L, *S)`` (one-hot, soft or any feature channels) is returned as is (in
    ``dtype`` if given). An integer or boolean label map ``(B, 1, *S)`` with labels in
    ``[0, num_labels)`` becomes one-hot channels when ``one_hot=True``:
    :math:`c_l(p) = [\text{label}(p) = l]`.

    Args:
        structure: the structure map.
        num_labels: ``L``, the number of condition channels.
        one_hot: expect an integer label map and one-hot encode it.
        dtype: floating dtype of the result; None keeps a floating input's dtype and gives
            ``torch.get_default_dtype()`` for one-hot channels.

    Returns:
        The condition.

    Raises:
        ValueError: for a wrong channel count, a floating map with ``one_hot=True``, an integer map
            without it, labels outside ``[0, num_labels)``, non-finite values or a non-floating ``dtype``.

    Shape:
        structure: ``(B, L, *S)`` floating, or ``(B, 1, *S)`` integer with ``one_hot``; out: ``(B, L, *S)``.

    Example:
        >>> import torch
        >>> labels = torch.tensor([[[[0, 2], [1, 1]]]])
        >>> structure_condition(labels, 3, one_hot=True)[0, :, 0, 1]
        tensor([0., 0., 1.])
    """
    if not isinstance(num_labels, int) or num_labels < 1:
        raise ValueError(f"num_labels: expected a positive int, got {num_labels!r}")
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"dtype: expected a floating dtype, got {dtype}")
    if one_hot:
        check_shape(structure, "B 1 *S", "structure")
        if structure.is_floating_point() or structure.is_complex():
            raise ValueError(f"structure: one_hot=True expects an integer label map, got {structure.dtype}")
        labels = structure.long()
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_labels):
            raise ValueError(f"structure: expected labels in [0, {num_labels}), got [{int(labels.min())}, {int(labels.max())}]")
        out = F.one_hot(labels[:, 0], num_labels).movedim(-1, 1)
        return out.to(dtype if dtype is not None else torch.get_default_dtype())
    check_shape(structure, f"B {num_labels} *S", "structure")
    if not structure.is_floating_point():
        raise ValueError(
            f"structure: expected a floating ({num_labels}-channel) map, got {structure.dtype}; "
            "pass one_hot=True to encode an integer (B, 1, *S) label map"
        )
    if not bool(torch.isfinite(structure).all()):
        raise ValueError("structure: expected finite values, found NaN or inf")
    return structure if dtype is None else structure.to(dtype)


class ConcatConditioning(Configurable, nn.Module):
    """The paper's conditioning: the structure map is the condition, concatenated at the U-Net input.

    Calls :func:`structure_condition`; pair it with a U-Net built with ``cond_channels = num_labels``.

    Args:
        num_labels: ``L``, the number of structure channels.
        one_hot: expect integer label maps ``(B, 1, *S)`` and one-hot encode them.
        dtype: floating dtype of the condition (None: see :func:`structure_condition`).

    Shape:
        structure: ``(B, L, *S)`` floating, or ``(B, 1, *S)`` integer with ``one_hot``; out: ``(B, L, *S)``.

    Example:
        >>> import torch
        >>> ConcatConditioning(2)(torch.rand(1, 2, 5, 6)).shape
        torch.Size([1, 2, 5, 6])
    """

    def __init__(self, num_labels: int, one_hot: bool = False, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        check_int(num_labels, "num_labels", 1)
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"dtype: expected a floating dtype, got {dtype}")
        self.num_labels = num_labels
        self.one_hot = one_hot
        self.dtype = dtype

    @property
    def out_channels(self) -> int:
        """Channels of the condition (``num_labels``): the U-Net's ``cond_channels``."""
        return self.num_labels

    def forward(self, structure: torch.Tensor) -> torch.Tensor:
        """Validate (and one-hot encode) the structure map.

        Args:
            structure: the structure map.

        Returns:
            The condition channels.

        Shape:
            structure: ``(B, L, *S)`` or ``(B, 1, *S)``; out: ``(B, L, *S)``.
        """
        return structure_condition(structure, self.num_labels, self.one_hot, self.dtype)

    def extra_repr(self) -> str:
        return f"num_labels={self.num_labels}, one_hot={self.one_hot}, dtype={self.dtype}"


class LearnedConditioning(Configurable, nn.Module, config_ignore=("generator",)):
    r"""Convolutional feature pyramid of a structure map, for FiLM inside :class:`~plasticine.diffusion.unet.ConditionalUNet`.

    Level 0 is two 3x3 convolutions with SiLU at full resolution; level :math:`i > 0` is a stride-2
    3x3 convolution then a 3x3 convolution, both with SiLU, so level :math:`i` has size
    :math:`\lceil S / 2^i \rceil`, exactly the U-Net's level sizes:

    .. math::

        f_0 = \sigma(W_{0b} * \sigma(W_{0a} * c)), \qquad
        f_i = \sigma(W_{ib} * \sigma(W_{ia} *_{2} f_{i-1})).

    The U-Net maps :math:`f_\ell` by a 1x1 convolution to a per-voxel scale and shift
    :math:`(s', t')` in every residual block of level :math:`\ell`.

    Args:
        in_channels: ``L``, the structure channels (the U-Net's ``cond_channels``).
        channels: feature channels per level; its length must equal the U-Net's number of levels.
        ndim: number of spatial dimensions, 2 or 3.
        generator: source of the initial weights (see
            :func:`~plasticine.diffusion.unet.init_parameters`); None keeps PyTorch's default
            initialisation from the global generator.

    Shape:
        structure: ``(B, L, *S)``; out (``forward``): ``(B, channels[0], *S)``;
        ``pyramid``: level ``i`` ``(B, channels[i], *ceil(S / 2**i))``.

    Example:
        >>> import torch
        >>> enc = LearnedConditioning(3, channels=(4, 8), ndim=2)
        >>> [f.shape[2:] for f in enc.pyramid(torch.rand(1, 3, 9, 6))]
        [torch.Size([9, 6]), torch.Size([5, 3])]

    References:
        T. Park et al., "Semantic Image Synthesis with Spatially-Adaptive Normalization", CVPR 2019.
    """

    def __init__(
        self,
        in_channels: int,
        channels: Sequence[int] = (16, 32, 32),
        ndim: Literal[2, 3] = 2,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        check_int(in_channels, "in_channels", 1)
        channels = tuple(channels)
        if not channels:
            raise ValueError("channels: expected a non-empty sequence of positive ints, got ()")
        for c in channels:
            check_int(c, "channels[...]", 1)
        check_option(ndim, "ndim", (2, 3))
        self.in_channels = in_channels
        self.channels = channels
        self.ndim = ndim
        conv = nn.Conv2d if ndim == 2 else nn.Conv3d
        self.levels = nn.ModuleList()
        prev = in_channels
        for i, ch in enumerate(channels):
            self.levels.append(
                nn.Sequential(
                    conv(prev, ch, 3, stride=1 if i == 0 else 2, padding=1), nn.SiLU(), conv(ch, ch, 3, padding=1), nn.SiLU()
                )
            )
            prev = ch
        if generator is not None:
            from .unet import init_parameters

            init_parameters(self, generator)

    @property
    def out_channels(self) -> int:
        """Channels of the full-resolution features returned by ``forward`` (``channels[0]``)."""
        return self.channels[0]

    def _check(self, structure: torch.Tensor) -> None:
        check_shape(structure, f"B {self.in_channels} *S", "structure", spatial=(self.ndim,))
        if not structure.is_floating_point():
            raise ValueError(
                f"structure: expected a floating map, got {structure.dtype}; one-hot encode label maps with ConcatConditioning(one_hot=True)"
            )

    def pyramid(self, structure: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Features of every level, finest first.

        Args:
            structure: the structure map (floating).

        Returns:
            One feature map per level.

        Raises:
            ValueError: for a wrong shape, channel count, dimensionality or a non-floating map.

        Shape:
            structure: ``(B, L, *S)``; level ``i``: ``(B, channels[i], *ceil(S / 2**i))``.
        """
        self._check(structure)
        feats = []
        h = structure
        for level in self.levels:
            h = level(h)
            feats.append(h)
        return tuple(feats)

    def forward(self, structure: torch.Tensor) -> torch.Tensor:
        """Full-resolution features (level 0), the :class:`~plasticine.core.ConditionEncoder` view.

        Args:
            structure: the structure map (floating).

        Returns:
            The level-0 features.

        Shape:
            structure: ``(B, L, *S)``; out: ``(B, channels[0], *S)``.
        """
        self._check(structure)
        return self.levels[0](structure)
