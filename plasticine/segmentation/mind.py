r"""MIND and MIND-SSC: the modality-independent neighbourhood descriptor (Heinrich et al. 2012, 2013).

For an image :math:`I` (channels summed), offsets :math:`a, b` and a Gaussian patch weight
:math:`G_\sigma`, the patch distance is

.. math::

    D(x; a, b) = \sum_p G_\sigma(p) \, \lVert I(x + a + p) - I(x + b + p) \rVert^2
    = \big(G_\sigma * (I(\cdot + a) - I(\cdot + b))^2\big)(x),

with replicate padding at the border. Each channel of the descriptor is one pair :math:`(a, b)`:

* ``layout="ssc"`` (self-similarity context, MIND-SSC, 2013): the pairs of the six-neighbourhood
  :math:`\{\pm \delta e_i\}` whose members are :math:`\sqrt 2 \delta` apart, :math:`(s\,\delta e_i,
  s'\,\delta e_j)` for :math:`i < j` and signs :math:`s, s'`: 12 channels in 3D, 4 in 2D (the 2D
  analogue on the four-neighbourhood); the centre patch is never used, which makes it robust to noise
  at the centre;
* ``layout="mind"`` (MIND, 2012): the centre against each neighbour, :math:`(0, \pm \delta e_i)`:
  6 channels in 3D, 4 in 2D.

:math:`\delta` is ``dilation``. With :math:`D' = D - \min_k D_k` (the smallest distance of a pixel
subtracted), the variance estimate :math:`V(x) = \frac1K \sum_k D'_k(x)`, clamped to
:math:`[10^{-3} \bar V, 10^{3} \bar V]` with :math:`\bar V` its mean over the image, and

.. math::

    \text{MIND}_k(x) = \exp\!\big(-D'_k(x) / V(x)\big) \in (0, 1], \qquad \max_k \text{MIND}_k(x) = 1

(a pixel where every distance is 0, as in a constant image, gets 1 in every channel).

**Invariance.** The descriptor at :math:`x` depends only on the intensities within
:math:`\rho = \delta + \lceil 3 \sigma \rceil` pixels of :math:`x` (per axis; the Gaussian is cut at
:math:`3 \sigma`) and, through the clamp, on :math:`\bar V`. Hence:

* it is invariant to every affine remap :math:`I \mapsto a I + b` with :math:`a \neq 0`, contrast
  inversion included (:math:`D` scales by :math:`a^2` and so do :math:`V` and :math:`\bar V`): bit-exact
  for :math:`a` a power of two and :math:`b = 0`, otherwise up to rounding;
* a remap :math:`g`, monotone or not, leaves :math:`\text{MIND}(x)` unchanged wherever :math:`g` is
  affine with non-zero slope on the intensities of the window of radius :math:`\rho` around
  :math:`x` and the clamp is inactive at :math:`x` in both images: MIND compares the *shape* of the
  local patch-distance profile, not intensity rank, so a non-monotone remap changes it only where a
  window straddles a fold of :math:`g` (measured on BrainWeb in ``tests/test_segmentation_invariance.py``).

It is not a partition: its channels are not classes and do not sum to 1.

References:
    M. P. Heinrich et al., "MIND: Modality independent neighbourhood descriptor for multi-modal
    deformable registration", Medical Image Analysis 16(7), 2012. M. P. Heinrich, M. Jenkinson,
    B. W. Papiez, M. Brady, J. A. Schnabel, "Towards realtime multimodal fusion for image-guided
    interventions using self-similarities", MICCAI 2013.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import Configurable
from ..core.filters import gaussian_smooth
from ..core.shapes import check_shape
from ..core.validate import check_int, check_number, check_option

__all__ = ["mind_pairs", "mind_descriptor", "MINDExtractor"]

_CLAMP = 1e3


def mind_pairs(ndim: int, layout: str = "ssc", dilation: int = 1) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """The offset pairs ``(a, b)`` of the descriptor's channels, in channel order.

    Args:
        ndim: number of spatial dimensions (2 or 3).
        layout: ``"ssc"`` or ``"mind"`` (see the module).
        dilation: the neighbour distance ``delta`` in pixels.

    Returns:
        One ``(a, b)`` pair of offset tuples per channel.

    Shape:
        Not applicable.

    Example:
        >>> mind_pairs(2)
        [((1, 0), (0, 1)), ((1, 0), (0, -1)), ((-1, 0), (0, 1)), ((-1, 0), (0, -1))]
    """
    check_int(ndim, "ndim", 2, 3)
    check_option(layout, "layout", ("ssc", "mind"))
    check_int(dilation, "dilation", 1)

    def e(i: int, s: int) -> tuple[int, ...]:
        return tuple(s * dilation * int(i == d) for d in range(ndim))

    if layout == "mind":
        zero = (0,) * ndim
        return [(zero, e(i, s)) for i in range(ndim) for s in (1, -1)]
    return [(e(i, s), e(j, t)) for i in range(ndim) for j in range(i + 1, ndim) for s in (1, -1) for t in (1, -1)]


def _shift(padded: torch.Tensor, offset: tuple[int, ...], pad: int, shape: tuple[int, ...]) -> torch.Tensor:
    """``I(x + offset)`` read from ``I`` padded by ``pad`` on every side."""
    index = [slice(None), slice(None)] + [slice(pad + o, pad + o + n) for o, n in zip(offset, shape)]
    return padded[tuple(index)]


def mind_descriptor(image: torch.Tensor, *, sigma: float = 0.8, dilation: int = 2, layout: str = "ssc") -> torch.Tensor:
    """MIND / MIND-SSC descriptor of each image (see the module for the maths and invariances).

    Args:
        image: images; channels are summed in the patch distance.
        sigma: standard deviation (pixels) of the Gaussian patch weight.
        dilation: neighbour distance ``delta`` in pixels.
        layout: ``"ssc"`` (MIND-SSC) or ``"mind"`` (centre against neighbours).

    Returns:
        The descriptor, values in (0, 1], the largest channel 1 at every pixel, in the image's dtype;
        a NaN or infinite intensity gives NaN in the image's result.

    Raises:
        ValueError: on a shape or setting that does not fit.

    Shape:
        image: ``(B, C, *S)``; out: ``(B, K, *S)`` with ``K = len(mind_pairs(N, layout))`` (4 in 2D;
        12 for ``"ssc"`` and 6 for ``"mind"`` in 3D).

    Example:
        >>> x = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(0))
        >>> m = mind_descriptor(x)
        >>> m.shape, bool((m.amax(1) == 1).all())
        (torch.Size([1, 4, 16, 16]), True)
    """
    n = check_shape(image, "B C *S", "image", floating=True)["N"]
    check_number(sigma, "sigma", 0, min_open=True)
    pairs = mind_pairs(n, layout, dilation)
    shape = tuple(image.shape[2:])
    padded = F.pad(image, (dilation,) * (2 * n), mode="replicate")
    dist = torch.cat(
        [(_shift(padded, a, dilation, shape) - _shift(padded, b, dilation, shape)).square().sum(1, keepdim=True) for a, b in pairs], 1
    )
    dist = gaussian_smooth(dist, float(sigma))
    dist = dist - dist.amin(1, keepdim=True)
    var = dist.mean(1, keepdim=True)
    mean = var.flatten(1).mean(1).view(-1, *([1] * (var.dim() - 1)))
    var = torch.minimum(torch.maximum(var, mean / _CLAMP), mean * _CLAMP)
    safe = torch.where(var == 0, torch.ones_like(var), var)  # var = 0 only where every distance is 0; NaN stays NaN
    return torch.exp(-dist / safe)


class MINDExtractor(Configurable, nn.Module):
    """Structure extractor: the MIND-SSC (or MIND) self-similarity descriptor (see :func:`mind_descriptor`).

    A continuous map of ``K`` channels (4 in 2D, 12 in 3D for ``"ssc"``), not a partition; pair it with
    ``ConcatConditioning(K)`` (soft input). Invariant to every affine remap of the intensities,
    contrast inversion included, and locally to non-monotone ones (see
    :mod:`plasticine.segmentation.mind`).

    Args:
        sigma: standard deviation (pixels) of the Gaussian patch weight.
        dilation: neighbour distance in pixels.
        layout: ``"ssc"`` or ``"mind"``.

    Shape:
        image: ``(B, C, *S)``; out: ``(B, K, *S)``, values in (0, 1].
    """

    def __init__(self, sigma: float = 0.8, dilation: int = 2, layout: str = "ssc"):
        super().__init__()
        self.sigma = check_number(sigma, "sigma", 0, min_open=True)
        self.dilation = check_int(dilation, "dilation", 1)
        self.layout = check_option(layout, "layout", ("ssc", "mind"))

    def num_channels(self, ndim: int) -> int:
        """Channels ``K`` of the descriptor of ``ndim``-dimensional images (the condition's ``num_labels``).

        Shape:
            Not applicable.
        """
        return len(mind_pairs(ndim, self.layout, self.dilation))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Descriptor of ``image`` ``(B, C, *S)`` -> ``(B, K, *S)``."""
        return mind_descriptor(image, sigma=self.sigma, dilation=self.dilation, layout=self.layout)

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}, dilation={self.dilation}, layout={self.layout!r}"
