r"""Fast structure-map baselines (k-means, multi-Otsu) and the clustering helpers they share with Potts.

A structure map is a coarse partition of an image into ``L`` classes, returned one-hot
``(B, L, *S)`` with the classes ordered by increasing mean intensity (class 0 is the darkest), so
that the same tissue gets the same channel across images. Every function here is deterministic and
works per image: the result of an image does not depend on the others in the batch.

* :func:`kmeans`: Lloyd's algorithm on the pixels (their channel vectors), initialised by
  intensity quantiles: the pixels are sorted by their mean over channels and cut into ``L`` equal
  groups, whose mean vectors are the initial centres.
* :func:`multi_otsu_thresholds`: the ``L - 1`` thresholds that maximise Otsu's between-class
  variance on an intensity histogram, found exactly by dynamic programming over the bins (the same
  optimum an exhaustive search over all threshold combinations finds, in
  :math:`O(L \cdot \text{bins}^2)` instead of :math:`O(\text{bins}^{L-1})`).
* :class:`KMeansExtractor` and :class:`MultiOtsuExtractor`: the
  :class:`~plasticine.core.protocols.StructureExtractor` modules, with optional Gaussian smoothing
  of the image first.

References:
    S. Lloyd, "Least squares quantization in PCM", IEEE Trans. Inf. Theory 28(2), 1982.
    N. Otsu, "A threshold selection method from gray-level histograms", IEEE Trans. Syst. Man
    Cybern. 9(1), 1979. P.-S. Liao, T.-S. Chen, P.-C. Chung, "A fast algorithm for multilevel
    thresholding", J. Inf. Sci. Eng. 17(5), 2001.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ..core.config import Configurable
from ..core.filters import gaussian_smooth
from ..core.shapes import check_shape
from ..core.validate import check_int, check_number

__all__ = [
    "KMeansResult",
    "kmeans",
    "one_hot",
    "multi_otsu_thresholds",
    "kmeans_structure_map",
    "multi_otsu_structure_map",
    "KMeansExtractor",
    "MultiOtsuExtractor",
]


def one_hot(labels: torch.Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One-hot map of an integer label map.

    Args:
        labels: integer labels in ``0 .. num_classes - 1``.
        num_classes: number of classes ``L``.
        dtype: dtype of the result.

    Returns:
        ``out[:, k] = (labels == k)``.

    Raises:
        ValueError: on a label outside ``0 .. L - 1`` or a non-integer dtype.

    Shape:
        labels: ``(B, 1, *S)``; out: ``(B, L, *S)``.

    Example:
        >>> one_hot(torch.tensor([[[[0, 2]]]]), 3)[0, :, 0, 0]
        tensor([1., 0., 0.])
    """
    check_shape(labels, "B 1 *S", "labels")
    check_int(num_classes, "num_classes", 1)
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"labels: expected an integer dtype, got {labels.dtype}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels: expected values in 0..{num_classes - 1}, got {int(labels.min())}..{int(labels.max())}")
    classes = torch.arange(num_classes, device=labels.device).view(1, -1, *([1] * (labels.dim() - 2)))
    return (labels == classes).to(dtype)


class KMeansResult(NamedTuple):
    """Result of :func:`kmeans`.

    Attributes:
        labels: class of every pixel, ``(B, 1, *S)`` int64, classes ordered by increasing mean
            intensity of their centre.
        centers: class centres ``(B, L, C)``, in the same order.
    """

    labels: torch.Tensor
    centers: torch.Tensor


def kmeans(image: torch.Tensor, num_classes: int, *, max_iter: int = 100) -> KMeansResult:
    r"""K-means clustering of the pixels of each image (Lloyd's algorithm, deterministic start).

    Minimises :math:`\sum_p \lVert x(p) - c_{k(p)} \rVert^2` over the labels :math:`k(p)` and the
    centres :math:`c_k` by alternating nearest-centre assignment (ties to the lower class) and
    centre update, from centres initialised at intensity quantiles: the pixels sorted by their mean
    over channels are cut into ``L`` groups of equal size and each group's mean vector is a centre.
    Stops when no label changes (a fixed point) or after ``max_iter`` iterations. A class that loses
    all its pixels keeps its centre (and stays empty). The classes are finally ordered by the mean
    over channels of their centres.

    Args:
        image: images whose pixels (channel vectors) are clustered.
        num_classes: number of clusters ``L``.
        max_iter: most Lloyd iterations.

    Returns:
        :class:`KMeansResult` with the labels and the centres.

    Raises:
        ValueError: on a shape or setting that does not fit.

    Shape:
        image: ``(B, C, *S)``; labels: ``(B, 1, *S)``; centers: ``(B, L, C)``.

    Reference:
        Lloyd, IEEE Trans. Inf. Theory 28(2), 129-137, 1982.

    Example:
        >>> x = torch.tensor([0.0, 0.1, 0.9, 1.0]).view(1, 1, 2, 2)
        >>> kmeans(x, 2).labels.view(-1).tolist()
        [0, 0, 1, 1]
    """
    check_shape(image, "B C *S", "image", floating=True)
    check_int(num_classes, "num_classes", 1)
    check_int(max_iter, "max_iter", 1)
    b, c = image.shape[:2]
    x = image.flatten(2).transpose(1, 2)  # (B, N, C)
    n = x.shape[1]
    if n == 0:
        raise ValueError(f"image: expected at least one pixel, got spatial size {tuple(image.shape[2:])}")
    order = x.mean(2).argsort(dim=1, stable=True)  # (B, N)
    group = (torch.arange(n, device=x.device) * num_classes) // n  # (N,) 0..L-1, equal sizes
    init = torch.zeros(b, num_classes, c, dtype=x.dtype, device=x.device)
    init.index_add_(1, group, x.gather(1, order[..., None].expand(b, n, c)))
    counts = torch.bincount(group, minlength=num_classes).clamp_min(1).to(x.dtype)
    centers = init / counts[None, :, None]
    labels = None
    for _ in range(max_iter):
        dist = torch.cdist(x, centers).square() if c > 1 else (x - centers.transpose(1, 2)).square()  # (B, N, L)
        new = dist.argmin(2)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        sums = torch.zeros_like(centers).scatter_add_(1, labels[..., None].expand(b, n, c), x)
        mass = torch.zeros(b, num_classes, dtype=x.dtype, device=x.device).scatter_add_(1, labels, torch.ones_like(labels, dtype=x.dtype))
        centers = torch.where(mass[..., None] > 0, sums / mass.clamp_min(1)[..., None], centers)
    return _ordered(labels, centers, image.shape)


def _ordered(labels: torch.Tensor, centers: torch.Tensor, shape: torch.Size) -> KMeansResult:
    """Relabel so that class 0 has the darkest centre (mean over channels)."""
    rank = centers.mean(2).argsort(dim=1, stable=True)  # (B, L): new class k is old class rank[k]
    inverse = rank.argsort(1)
    labels = inverse.gather(1, labels)
    centers = centers.gather(1, rank[..., None].expand_as(centers))
    return KMeansResult(labels.view(shape[0], 1, *shape[2:]), centers)


def _histogram(image: torch.Tensor, bins: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image histogram on ``bins`` equal bins over ``[min, max]``: (bin index map, counts, lo, width)."""
    x = image.flatten(1)
    lo = x.amin(1)
    hi = x.amax(1)
    width = (hi - lo) / bins
    width = torch.where(width > 0, width, torch.ones_like(width))
    idx = ((x - lo[:, None]) / width[:, None]).floor().clamp(0, bins - 1).long()
    counts = torch.zeros(x.shape[0], bins, dtype=torch.float64, device=x.device).scatter_add_(
        1, idx, torch.ones_like(idx, dtype=torch.float64)
    )
    return idx, counts, lo, width


def _otsu_bins(counts: torch.Tensor, num_classes: int) -> torch.Tensor:
    """First bin of classes 1..L-1 that minimise the within-class variance of a histogram ``(B, bins)``.

    Dynamic programme: ``E_k[j] = min_{i<j} E_{k-1}[i] + cost(i, j)`` over prefixes of the bins,
    ``cost(i, j)`` the weighted squared deviation of the bin indices ``i..j-1`` from their mean.
    """
    b, nb = counts.shape
    dev = counts.device
    pos = torch.arange(nb, dtype=torch.float64, device=dev)
    z = counts.new_zeros(b, 1)
    cw = torch.cat([z, counts.cumsum(1)], 1)
    c1 = torch.cat([z, (counts * pos).cumsum(1)], 1)
    c2 = torch.cat([z, (counts * pos * pos).cumsum(1)], 1)
    # cost[b, i, j] for bins [i, j), i < j (inf elsewhere)
    dw = cw[:, None, :] - cw[:, :, None]
    d1 = c1[:, None, :] - c1[:, :, None]
    d2 = c2[:, None, :] - c2[:, :, None]
    cost = (d2 - d1.square() / dw.clamp_min(1e-300)).clamp_min(0)
    ii = torch.arange(nb + 1, device=dev)
    cost = cost.masked_fill(ii[:, None] >= ii[None, :], float("inf"))
    energy = cost[:, 0, :]  # (B, nb+1): one class on bins [0, j)
    back = []
    for _ in range(num_classes - 1):
        vals, arg = (energy[:, :, None] + cost).min(1)  # over i
        energy = vals
        back.append(arg)
    starts = []
    j = torch.full((b,), nb, dtype=torch.long, device=dev)
    for arg in reversed(back):
        j = arg.gather(1, j[:, None])[:, 0]
        starts.append(j)
    if not starts:
        return torch.zeros(b, 0, dtype=torch.long, device=dev)
    return torch.stack(starts[::-1], 1)


def multi_otsu_thresholds(image: torch.Tensor, num_classes: int, *, bins: int = 256) -> torch.Tensor:
    r"""Multi-level Otsu thresholds of each image.

    The intensities of each image are binned into ``bins`` equal bins over ``[min, max]``; the
    ``L - 1`` thresholds, placed on bin edges, split the bins into ``L`` non-empty runs that maximise
    the between-class variance :math:`\sum_k \omega_k (\mu_k - \mu)^2`, equivalently minimise the
    within-class variance :math:`\sum_k \sum_{p \in k} (x_p - \mu_k)^2` of the binned intensities.
    The optimum is exact (dynamic programming over the bins, the same result as an exhaustive search
    up to ties). A pixel belongs to class ``k`` when ``t_{k-1} <= x < t_k`` (with the maximum in the
    last class).

    Args:
        image: single-channel images.
        num_classes: number of classes ``L`` (``L - 1`` thresholds), at most ``bins``.
        bins: number of histogram bins.

    Returns:
        The thresholds in increasing order, in intensity units.

    Raises:
        ValueError: on a multi-channel image or a setting that does not fit.

    Shape:
        image: ``(B, 1, *S)``; out: ``(B, L - 1)``.

    Reference:
        Otsu, IEEE Trans. Syst. Man Cybern. 9(1), 1979; Liao, Chen and Chung, J. Inf. Sci. Eng.
        17(5), 2001.
    """
    labels_thr = _multi_otsu(image, num_classes, bins)
    return labels_thr[1]


def _multi_otsu(image: torch.Tensor, num_classes: int, bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    check_shape(image, "B 1 *S", "image", floating=True)
    check_int(num_classes, "num_classes", 1)
    check_int(bins, "bins", num_classes)  # at least one bin per class
    idx, counts, lo, width = _histogram(image, bins)
    starts = _otsu_bins(counts, num_classes)  # (B, L-1) first bin of classes 1..L-1
    labels = (idx[:, :, None] >= starts[:, None, :]).sum(2).view(image.shape[0], 1, *image.shape[2:])
    thresholds = lo[:, None] + starts.to(image.dtype) * width[:, None]
    return labels, thresholds


def _smoothed(image: torch.Tensor, sigma: float | None) -> torch.Tensor:
    if sigma is None:
        return image
    if not float(sigma) > 0:
        raise ValueError(f"smoothing_sigma: expected None or a number > 0, got {sigma}")
    return gaussian_smooth(image, float(sigma))


def kmeans_structure_map(
    image: torch.Tensor, num_classes: int, *, smoothing_sigma: float | None = None, max_iter: int = 100
) -> torch.Tensor:
    """One-hot structure map by k-means on the (optionally Gaussian-smoothed) pixels.

    Args:
        image: images (channels are clustered jointly).
        num_classes: number of classes ``L``.
        smoothing_sigma: standard deviation in pixels of a Gaussian applied first; None for none.
        max_iter: most Lloyd iterations (see :func:`kmeans`).

    Returns:
        One-hot map, classes ordered by mean intensity, in the image's dtype.

    Shape:
        image: ``(B, C, *S)``; out: ``(B, L, *S)``.
    """
    check_shape(image, "B C *S", "image", floating=True)
    labels = kmeans(_smoothed(image, smoothing_sigma), num_classes, max_iter=max_iter).labels
    return one_hot(labels, num_classes, image.dtype)


def multi_otsu_structure_map(
    image: torch.Tensor, num_classes: int, *, smoothing_sigma: float | None = None, bins: int = 256
) -> torch.Tensor:
    """One-hot structure map by multi-level Otsu thresholds of the (optionally smoothed) image.

    Args:
        image: single-channel images.
        num_classes: number of classes ``L``.
        smoothing_sigma: standard deviation in pixels of a Gaussian applied first; None for none.
        bins: number of histogram bins (see :func:`multi_otsu_thresholds`).

    Returns:
        One-hot map, class 0 the darkest, in the image's dtype.

    Shape:
        image: ``(B, 1, *S)``; out: ``(B, L, *S)``.
    """
    check_shape(image, "B C *S", "image", floating=True)
    labels, _ = _multi_otsu(_smoothed(image, smoothing_sigma), num_classes, bins)
    return one_hot(labels, num_classes, image.dtype)


class KMeansExtractor(Configurable, nn.Module):
    """Structure extractor: k-means on the pixels (see :func:`kmeans_structure_map`).

    Args:
        num_classes: number of classes ``L``.
        smoothing_sigma: Gaussian smoothing (pixels) applied first; None for none.
        max_iter: most Lloyd iterations.

    Shape:
        image: ``(B, C, *S)``; out: ``(B, L, *S)`` one-hot.

    Example:
        >>> ext = KMeansExtractor(2)
        >>> ext(torch.tensor([0.0, 0.1, 0.9, 1.0]).view(1, 1, 2, 2))[0, 1].tolist()
        [[0.0, 0.0], [1.0, 1.0]]
    """

    def __init__(self, num_classes: int, smoothing_sigma: float | None = None, max_iter: int = 100):
        super().__init__()
        self.num_classes = check_int(num_classes, "num_classes", 1)
        self.smoothing_sigma = None if smoothing_sigma is None else check_number(smoothing_sigma, "smoothing_sigma", 0, min_open=True)
        self.max_iter = check_int(max_iter, "max_iter", 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Structure map of ``image`` ``(B, C, *S)`` -> ``(B, L, *S)``."""
        return kmeans_structure_map(image, self.num_classes, smoothing_sigma=self.smoothing_sigma, max_iter=self.max_iter)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, smoothing_sigma={self.smoothing_sigma}"


class MultiOtsuExtractor(Configurable, nn.Module):
    """Structure extractor: multi-level Otsu thresholds (see :func:`multi_otsu_structure_map`).

    Args:
        num_classes: number of classes ``L``.
        smoothing_sigma: Gaussian smoothing (pixels) applied first; None for none.
        bins: number of histogram bins.

    Shape:
        image: ``(B, 1, *S)``; out: ``(B, L, *S)`` one-hot.
    """

    def __init__(self, num_classes: int, smoothing_sigma: float | None = None, bins: int = 256):
        super().__init__()
        self.num_classes = check_int(num_classes, "num_classes", 1)
        self.smoothing_sigma = None if smoothing_sigma is None else check_number(smoothing_sigma, "smoothing_sigma", 0, min_open=True)
        self.bins = check_int(bins, "bins", num_classes)  # at least one bin per class

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Structure map of ``image`` ``(B, 1, *S)`` -> ``(B, L, *S)``."""
        return multi_otsu_structure_map(image, self.num_classes, smoothing_sigma=self.smoothing_sigma, bins=self.bins)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, smoothing_sigma={self.smoothing_sigma}, bins={self.bins}"
