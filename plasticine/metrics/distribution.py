r"""Distribution metrics: intensity histograms and their Bhattacharyya distance, NMI, Frechet distances.

These compare what two sets of images look like, not voxel by voxel, so they apply where no paired
truth exists (a translated MR against real CT of other subjects):

* :func:`intensity_histogram` and :func:`bhattacharyya_distance`: the intensity distributions
  (NumPy in, NumPy / float out);
* :func:`normalized_mutual_information`: how much one image's intensities tell about the other's,
  voxel by voxel but insensitive to any one-to-one remapping of intensities (Studholme et al. 1999);
* :func:`frechet_distance` and :func:`simplified_frechet_distance`: the distance between Gaussians
  fitted to feature vectors of two image sets (Heusel et al. 2017 with Inception-v3 features, the
  FID), on features of an extractor the caller chooses, e.g. :class:`~plasticine.metrics.RandomFeatures`.

References:
    Bhattacharyya, "On a measure of divergence between two statistical populations defined by
    their probability distributions", Bull. Calcutta Math. Soc. 35, 1943. Studholme, Hill and
    Hawkes, "An overlap invariant entropy measure of 3D medical image alignment", Pattern
    Recognition 32(1), 1999. Dowson and Landau, "The Frechet distance between multivariate normal
    distributions", J. Multivariate Analysis 12(3), 1982. Heusel et al., "GANs trained by a two
    time-scale update rule converge to a local Nash equilibrium", NeurIPS 2017.
"""

from __future__ import annotations

import numpy as np
import torch

from ..core.shapes import check_shape
from ..core.validate import check_image, check_int
from .image import check_mask

__all__ = [
    "bhattacharyya_distance",
    "frechet_distance",
    "intensity_histogram",
    "normalized_mutual_information",
    "simplified_frechet_distance",
]


def intensity_histogram(values: np.ndarray, bins: int, value_range: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """Normalised histogram: ``bins`` equal bins on ``value_range``, then one bin below it and one above.

    Values outside the range are counted in the two extra bins (not clipped into the edge bins).
    Record ``bins``, ``value_range`` and the mask that selected ``values`` with the distances
    computed from it: they are part of the metric.

    Args:
        values: the intensities (finite).
        bins: number of bins on the range.
        value_range: ``(lo, hi)``; the last range bin includes ``hi``.

    Returns:
        float64 probabilities summing to 1: ``[bins on the range..., below, above]``.

    Raises:
        ValueError: for no values, non-finite values or a bad range.

    Shape:
        values: any; out: ``(bins + 2,)``.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    lo, hi = value_range
    if v.size == 0 or not np.isfinite(v).all():
        raise ValueError(f"values: expected finite intensities, got {v.size} values, {int((~np.isfinite(v)).sum())} non-finite")
    if not lo < hi:
        raise ValueError(f"value_range: expected lo < hi, got {value_range}")
    inside = (v >= lo) & (v <= hi)
    counts = np.histogram(v[inside], bins=bins, range=(lo, hi))[0]
    out = np.concatenate([counts, [(v < lo).sum(), (v > hi).sum()]]).astype(np.float64)
    return out / v.size


def bhattacharyya_distance(p: np.ndarray, q: np.ndarray) -> float:
    r"""Bhattacharyya distance :math:`-\ln \sum_i \sqrt{p_i q_i}` of two normalised histograms.

    0 for equal histograms, ``inf`` for disjoint ones.

    Args:
        p: probabilities (non-negative, summing to 1).
        q: the same, on the same bins.

    Returns:
        The distance.

    Raises:
        ValueError: for shapes that differ or histograms that are not normalised.

    Shape:
        p, q: ``(bins,)``.
    """
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    if p.shape != q.shape:
        raise ValueError(f"q: expected the shape of p {p.shape}, got {q.shape}")
    for name, h in (("p", p), ("q", q)):
        if (h < 0).any() or not np.isclose(h.sum(), 1.0):
            raise ValueError(f"{name}: expected non-negative probabilities summing to 1, got sum {h.sum()}")
    coefficient = float(np.sqrt(p * q).sum())
    return float("inf") if coefficient == 0.0 else float(-np.log(min(coefficient, 1.0)))


def _bin_index(v: torch.Tensor, bins: int) -> torch.Tensor:
    """Bin of each value among ``bins`` equal bins on ``[min, max]``, exactly as ``numpy.histogramdd``."""
    lo, hi = v.min(), v.max()
    if lo == hi:  # numpy widens a degenerate range by 0.5 on either side
        lo, hi = lo - 0.5, hi + 0.5
    # numpy.linspace: arange * step + start, the last edge set to stop
    edges = torch.arange(bins + 1, dtype=torch.float64, device=v.device) * ((hi - lo) / bins) + lo
    edges[-1] = hi
    index = torch.searchsorted(edges, v, right=True) - 1
    return torch.where(v == edges[-1], index - 1, index)


def _entropy(counts: torch.Tensor) -> torch.Tensor:
    p = counts[counts > 0] / counts.sum()
    return -(p * p.log()).sum()


def normalized_mutual_information(a: torch.Tensor, b: torch.Tensor, bins: int = 100, mask: torch.Tensor | None = None) -> torch.Tensor:
    r"""Normalised mutual information :math:`(H(A) + H(B)) / H(A, B)` of Studholme et al. per item.

    The entropies (natural logarithm) are those of the joint histogram of the voxel pairs
    :math:`(a_{cx}, b_{cx})` over the channels and the selected voxels, with ``bins`` equal bins on
    each image's own ``[min, max]`` over those voxels (the last bin includes the maximum; a
    constant image gets the range ``[v - 0.5, v + 0.5]``) and of its two marginals. This is
    scikit-image's ``normalized_mutual_information(a, b, bins=bins)`` (``numpy.histogramdd``
    binning). The value lies in ``[1, 2]``: 1 for independent intensities, 2 when each image's
    bin determines the other's.

    Args:
        a: one image.
        b: the other, same shape.
        bins: bins per image (at least 1).
        mask: the voxels that count (bool), or None for all.

    Returns:
        float64 scores.

    Raises:
        ValueError: for shapes that differ, non-floating or non-finite images, a bad mask or
            ``bins``, or an item in which both images are constant over the selected voxels
            (:math:`H(A, B) = 0`, the ratio is undefined).

    Shape:
        a, b: ``(B, C, *S)``; mask: ``(B, 1, *S)``; out: ``(B,)``.
    """
    dims = check_image(a, "a")
    check_image(b, "b")
    check_shape(b, "B C *S", "b", bindings=dict(dims))
    mask = check_mask(mask, dims)
    bins = check_int(bins, "bins", 1)
    out = torch.empty(dims["B"], dtype=torch.float64, device=a.device)
    constant = []
    for i in range(dims["B"]):
        x, y = a[i].double(), b[i].double()
        if mask is not None:
            x, y = x[mask[i].expand_as(x)], y[mask[i].expand_as(y)]
        joint = torch.bincount(_bin_index(x.flatten(), bins) * bins + _bin_index(y.flatten(), bins), minlength=bins * bins)
        joint = joint.view(bins, bins).double()
        h_joint = _entropy(joint)
        if h_joint == 0:
            constant.append(i)
            continue
        out[i] = (_entropy(joint.sum(1)) + _entropy(joint.sum(0))) / h_joint
    if constant:
        raise ValueError(f"a, b: expected an image that is not constant over the mask, got both constant in items {constant}")
    return out


def _features(f: torch.Tensor, name: str, bindings: dict) -> torch.Tensor:
    check_shape(f, "N F", name, bindings=bindings, floating=True)
    if f.shape[0] < 2:
        raise ValueError(f"{name}: expected at least 2 feature vectors (a covariance needs two), got {f.shape[0]}")
    if not torch.isfinite(f).all():
        raise ValueError(f"{name}: expected finite features, got {int((~torch.isfinite(f)).sum())} non-finite values")
    return f.double()


def _feature_pair(feats_a: torch.Tensor, feats_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both feature sets checked (same ``F``) and in float64."""
    bindings: dict = {}
    a = _features(feats_a, "feats_a", bindings)
    return a, _features(feats_b, "feats_b", {"F": bindings["F"]})


def _symmetric_sqrt(m: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix by its eigendecomposition."""
    w, v = torch.linalg.eigh(m)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    r"""Frechet distance between Gaussians fitted to two sets of feature vectors (the FID's formula).

    .. math::

       d^2 = \lVert \mu_a - \mu_b \rVert^2 + \operatorname{Tr}\bigl(\Sigma_a + \Sigma_b - 2 (\Sigma_a \Sigma_b)^{1/2}\bigr)

    with the means :math:`\mu` and the unbiased covariances :math:`\Sigma` (divisor :math:`N - 1`,
    as ``numpy.cov`` and the reference FID code). The trace of the matrix square root is computed
    stably as :math:`\operatorname{Tr}(\Sigma_a \Sigma_b)^{1/2} = \sum_i \sqrt{\lambda_i}`, the
    eigenvalues :math:`\lambda_i` of the symmetric positive semi-definite
    :math:`\Sigma_a^{1/2} \Sigma_b \Sigma_a^{1/2}` (similar to :math:`\Sigma_a \Sigma_b`), in float64;
    eigenvalues that rounding makes slightly negative count as 0. It returns the squared distance
    :math:`d^2`, as the FID does. With fewer vectors than features the covariances are singular and
    the estimate is biased upwards; compare values only at equal set sizes.

    Args:
        feats_a: one set of feature vectors (finite, at least 2).
        feats_b: the other, with the same number of features (finite, at least 2).

    Returns:
        :math:`d^2 \ge 0`.

    Raises:
        ValueError: for a wrong shape, fewer than 2 vectors or non-finite features.

    Shape:
        feats_a: ``(N, F)``; feats_b: ``(M, F)``.
    """
    a, b = _feature_pair(feats_a, feats_b)
    cov_a, cov_b = torch.cov(a.T).reshape(a.shape[1], a.shape[1]), torch.cov(b.T).reshape(b.shape[1], b.shape[1])
    root_a = _symmetric_sqrt(cov_a)
    inner = root_a @ cov_b @ root_a
    trace_root = torch.linalg.eigvalsh(0.5 * (inner + inner.T)).clamp_min(0).sqrt().sum()
    d2 = ((a.mean(0) - b.mean(0)) ** 2).sum() + cov_a.trace() + cov_b.trace() - 2 * trace_root
    return max(float(d2), 0.0)


def simplified_frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    r"""Frechet distance between diagonal-covariance Gaussians fitted to two sets of feature vectors.

    .. math::

       d^2 = \lVert \mu_a - \mu_b \rVert^2 + \sum_f (s_{a,f} - s_{b,f})^2

    with the means :math:`\mu` and the per-feature standard deviations :math:`s` (divisor
    :math:`N - 1`): :func:`frechet_distance` with the covariances replaced by their diagonals
    (for diagonal :math:`\Sigma`, :math:`\operatorname{Tr}(\Sigma_a + \Sigma_b - 2(\Sigma_a\Sigma_b)^{1/2})
    = \sum_f (s_{a,f} - s_{b,f})^2`). It ignores correlations between features, needs no matrix
    square root and stays well defined with fewer vectors than features. This is the reading of the
    paper's "simplified Frechet distance" implemented here: the paper does not spell out its formula.

    Args:
        feats_a: the first set, ``N >= 2`` finite vectors.
        feats_b: the second set, ``M >= 2`` finite vectors of the same length ``F``.

    Returns:
        The squared distance (non-negative), symmetric in the two sets.

    Raises:
        ValueError: for sets that are not ``(N, F)`` matrices of one ``F``, have a single vector
            or hold a NaN or an infinity.

    Shape:
        feats_a: ``(N, F)``; feats_b: ``(M, F)``.
    """
    a, b = _feature_pair(feats_a, feats_b)
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + ((a.std(0) - b.std(0)) ** 2).sum())
