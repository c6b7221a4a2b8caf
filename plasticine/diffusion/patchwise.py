r"""A denoiser run patch by patch: the diffusion model on images larger than it can hold at once.

:class:`PatchwiseDenoiser` evaluates :math:`\epsilon_\theta(y_k, \gamma_k, c)` on overlapping
patches of :math:`y_k` and :math:`c` and stitches the patch estimates with the blending weights of
:func:`plasticine.core.patches.sliding_window`. The sampler keeps running on the whole image with one
noise draw, so every step sees a single, seamless estimate; the stitching happens inside each
network call, not between independently sampled patches (which would disagree in their noise).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..core.patches import patch_grid, sliding_window

__all__ = ["PatchwiseDenoiser"]


class PatchwiseDenoiser(nn.Module):
    r"""A denoiser evaluated on overlapping patches and stitched: :math:`\hat\epsilon = \sum_p w_p \epsilon_\theta(y_k|_p, \gamma_k, c|_p) / \sum_p w_p`.

    Args:
        denoiser: the wrapped denoiser (a fully convolutional network: any patch size it accepts).
        patch: patch size, one integer or one per spatial axis.
        overlap: overlap of neighbouring patches (default ``patch // 4``), see
            :func:`~plasticine.core.patches.patch_grid`.
        margin: voxels next to a cut given no weight (default ``overlap // 4``).
        progress: called as ``progress(done, total)`` after each patch of each call, or None.

    Raises:
        ValueError: at the call, for a patch larger than the image or a bad overlap or margin.

    Shape:
        noisy: ``(B, C, *S)``; gamma: ``(B,)``; condition: ``(B, Cc, *S)`` or None; out: ``(B, C, *S)``.
    """

    def __init__(
        self,
        denoiser: nn.Module | Callable[..., torch.Tensor],
        patch: int | Sequence[int],
        *,
        overlap: int | Sequence[int] | None = None,
        margin: int | Sequence[int] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.patch, self.overlap, self.margin, self.progress = patch, overlap, margin, progress

    def patches(self, shape: Sequence[int]) -> int:
        """Number of patches per call for images of spatial size ``shape``."""
        return patch_grid(shape, self.patch, self.overlap, self.margin)[0].count

    def forward(self, noisy: torch.Tensor, gamma: torch.Tensor, condition: torch.Tensor | None = None, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """The stitched noise estimate (see the class docstring); ``generator`` goes to every patch's call (dropout in training)."""
        kwargs = {} if generator is None else {"generator": generator}
        return sliding_window(
            lambda y, c: self.denoiser(y, gamma, c, **kwargs),
            [noisy, condition],
            self.patch,
            overlap=self.overlap,
            margin=self.margin,
            progress=self.progress,
        )
