r"""Segmentation scores: confusion matrix, Dice, IoU, accuracy and the 95th-percentile Hausdorff distance.

Every function compares a ``prediction`` with a ``target`` given in either of two forms, which may be
mixed:

* an integer label map ``(B, 1, *S)`` (any integer dtype, values in ``0 .. num_classes - 1``;
  ``num_classes`` is then required unless the other input is one-hot; it is never guessed from
  the label values);
* a one-hot map ``(B, L, *S)`` (bool or floating, every voxel exactly one channel equal to 1 and the
  others 0). A network's logits are turned into either form first, e.g.
  ``logits.argmax(1, keepdim=True)``; soft probabilities are rejected, not thresholded.

Class 0 is the background. ``include_background=False`` drops it from the per-class results (and from
their means). Scores per class and sample form a ``(B, L)`` tensor (``(B, L - 1)`` without the
background) which ``reduction`` averages:

* ``"none"``: ``(B, L)``, one score per sample and class;
* ``"mean_class"``: ``(B,)``, the class average of each sample (the "mean Dice", "mean IoU" of a case);
* ``"mean_batch"``: ``(L,)``, the per-class average over the batch (the rows of a results table);
* ``"mean"``: ``()``, the average of all entries.

The means skip NaN entries (:func:`torch.nanmean`); they do not skip ``inf``.

Empty masks. When a class is absent from both prediction and target the overlap scores are 0/0; the
``empty`` option decides: ``"perfect"`` (default) scores agreement on absence as perfect (Dice, IoU and
accuracy 1, HD95 0); ``"nan"`` returns NaN so that the means leave the case out (the convention of
MONAI's ``ignore_empty`` and of nnU-Net's evaluation). The default keeps every score finite and
bounded, which is what a per-slice table or a training monitor needs; it equals the limit of the usual
smoothed Dice :math:`(2|A \cap B| + \epsilon) / (|A| + |B| + \epsilon)`. Use ``"nan"`` when averaging
over a data set in which a class is often absent, so that trivial agreements do not inflate the means.
When a class is present in exactly one of the two masks the prediction is wrong in the worst way:
Dice, IoU and accuracy are 0 and HD95 is ``inf`` (the Hausdorff distance to an empty set), whatever
``empty`` says.

Outputs are float64 (int64 for the confusion matrix) on the input's device. Only
:func:`hausdorff95` leaves the device: it copies the label maps to host memory and uses SciPy's exact
Euclidean distance transform, so it synchronises with a GPU.

References:
    Dice, "Measures of the amount of ecologic association between species", Ecology 26(3), 1945.
    Long, Shelhamer and Darrell, "Fully convolutional networks for semantic segmentation", CVPR 2015
    (pixel accuracy, mean accuracy, mean IoU). Huttenlocher, Klanderman and Rucklidge, "Comparing
    images using the Hausdorff distance", IEEE TPAMI 15(9), 1993. Maier-Hein et al., "Metrics
    reloaded", Nature Methods 21, 2024.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from ..core.shapes import check_shape
from ..core.validate import check_int, check_number, check_option

__all__ = ["confusion_matrix", "dice", "iou", "accuracy", "pixel_accuracy", "hausdorff95", "Reduction", "Empty"]

Reduction = Literal["none", "mean_class", "mean_batch", "mean"]
Empty = Literal["perfect", "nan"]

_REDUCTIONS = ("none", "mean_class", "mean_batch", "mean")
_EMPTY = ("perfect", "nan")


def _as_labels(x: torch.Tensor, num_classes: int | None, name: str, bindings: dict) -> tuple[torch.Tensor, int]:
    """Validate one input and return it as an int64 label map ``(B, *S)`` with the class count."""
    check_shape(x, "B C *S", name, bindings=bindings)
    bindings.pop("C")  # the channel count may differ: integer (1) against one-hot (L)
    if num_classes is not None:
        check_int(num_classes, "num_classes", 1)
    if x.dtype == torch.bool or x.dtype.is_floating_point:
        channels = x.shape[1]
        if num_classes is not None and channels != num_classes:
            hint = "; a binary mask? pass mask.long() as an integer label map" if channels == 1 else ""
            raise ValueError(f"{name}: a {x.dtype} map is read as one-hot and needs num_classes={num_classes} channels, got shape {tuple(x.shape)}{hint}")
        if x.dtype.is_floating_point and not bool(((x == 0) | (x == 1)).all()):
            raise ValueError(
                f"{name}: a floating map is read as one-hot and must hold only 0 and 1; got other values "
                "(take argmax of probabilities or logits first)"
            )
        ones = x.to(torch.int64).sum(1)
        if not bool((ones == 1).all()):
            hint = " (a binary mask? pass mask.long() with num_classes=2)" if channels == 1 else ""
            raise ValueError(f"{name}: a one-hot map {tuple(x.shape)} must have exactly one channel equal to 1 at every voxel{hint}")
        return x.to(torch.int64).argmax(1), channels
    if x.dtype.is_complex:
        raise ValueError(f"{name}: expected an integer label map or a bool/floating one-hot map, got dtype {x.dtype}")
    if x.shape[1] != 1:
        raise ValueError(f"{name}: an integer label map must have shape (B, 1, *S), got {tuple(x.shape)}; one-hot maps must be bool or floating")
    if num_classes is None:
        raise ValueError(f"{name}: num_classes is required when both inputs are integer label maps (it is never inferred from the label values)")
    labels = x[:, 0].to(torch.int64)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"{name}: labels must lie in [0, {num_classes - 1}], found [{int(labels.min())}, {int(labels.max())}]")
    return labels, num_classes


def _pair(prediction: torch.Tensor, target: torch.Tensor, num_classes: int | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    bindings: dict = {}
    if num_classes is None:  # a one-hot input states the class count for both
        for x in (prediction, target):
            if isinstance(x, torch.Tensor) and x.dim() >= 2 and (x.dtype == torch.bool or x.dtype.is_floating_point):
                num_classes = int(x.shape[1])
                break
    pred, lp = _as_labels(prediction, num_classes, "prediction", bindings)
    true, lt = _as_labels(target, num_classes, "target", bindings)
    if lp != lt:
        raise ValueError(f"prediction has {lp} classes but target has {lt}")
    if pred.device != true.device:
        raise ValueError(f"prediction is on {pred.device} but target on {true.device}")
    return pred, true, lp


def _check_options(reduction: str, empty: str) -> None:
    check_option(reduction, "reduction", _REDUCTIONS)
    check_option(empty, "empty", _EMPTY)


def _finish(scores: torch.Tensor, include_background: bool, reduction: str) -> torch.Tensor:
    """Drop the background column if asked and reduce ``(B, L)`` scores."""
    if not include_background:
        if scores.shape[1] < 2:
            raise ValueError(f"include_background=False needs at least 2 classes, got {scores.shape[1]}")
        scores = scores[:, 1:]
    if reduction == "none":
        return scores
    if reduction == "mean_class":
        return torch.nanmean(scores, dim=1)
    if reduction == "mean_batch":
        return torch.nanmean(scores, dim=0)
    return torch.nanmean(scores)


def _confusion(pred: torch.Tensor, true: torch.Tensor, num_classes: int) -> torch.Tensor:
    b = pred.shape[0]
    offset = torch.arange(b, device=pred.device).view(b, *([1] * (pred.dim() - 1))) * num_classes * num_classes
    index = offset + true * num_classes + pred
    counts = torch.bincount(index.reshape(-1), minlength=b * num_classes * num_classes)
    return counts.view(b, num_classes, num_classes)


def _ratio(num: torch.Tensor, den: torch.Tensor, both_empty: torch.Tensor, empty: str) -> torch.Tensor:
    """``num / den`` in float64, with ``both_empty`` set to 1 or NaN and other 0/0 set to 0."""
    num = num.to(torch.float64)
    den = den.to(torch.float64)
    out = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num))
    fill = 1.0 if empty == "perfect" else float("nan")
    return torch.where(both_empty, torch.full_like(out, fill), out)


def confusion_matrix(prediction: torch.Tensor, target: torch.Tensor, num_classes: int | None = None) -> torch.Tensor:
    r"""Per-sample confusion matrix: ``C[b, i, j]`` voxels of true class ``i`` predicted as ``j``.

    Rows are the truth, columns the prediction (scikit-learn's order), so the row sums
    :math:`|T_i|` count the target voxels of class ``i``, the column sums :math:`|P_j|` the
    predicted ones and the diagonal the true positives :math:`|P_i \cap T_i|`. All other scores of
    this module are functions of it.

    Args:
        prediction: integer label map or one-hot map (see the module notes).
        target: the same, on the same device, same batch size and spatial size.
        num_classes: number of classes ``L``; required when both inputs are integer label maps,
            and must match the channels of a one-hot input.

    Returns:
        int64 counts.

    Raises:
        ValueError: on shapes or sizes that disagree, labels outside ``0 .. L - 1``, non-one-hot maps.

    Shape:
        prediction, target: ``(B, 1, *S)`` integer or ``(B, L, *S)`` one-hot; out: ``(B, L, L)``.

    Example:
        >>> p = torch.tensor([[[0, 1, 1, 2]]]).view(1, 1, 2, 2)
        >>> t = torch.tensor([[[0, 1, 2, 2]]]).view(1, 1, 2, 2)
        >>> confusion_matrix(p, t, 3)[0].tolist()
        [[1, 0, 0], [0, 1, 0], [0, 1, 1]]
    """
    pred, true, n = _pair(prediction, target, num_classes)
    return _confusion(pred, true, n)


def dice(
    prediction: torch.Tensor,
    target: torch.Tensor,
    num_classes: int | None = None,
    *,
    include_background: bool = True,
    reduction: Reduction = "none",
    empty: Empty = "perfect",
) -> torch.Tensor:
    r"""Dice similarity coefficient (F1 score) per sample and class.

    .. math::

        \mathrm{Dice}_c = \frac{2\,|P_c \cap T_c|}{|P_c| + |T_c|} = \frac{2\,TP}{2\,TP + FP + FN}
        \in [0, 1],

    where :math:`P_c` and :math:`T_c` are the voxels labelled ``c`` in the prediction and the target.
    Symmetric in its two arguments; :math:`\mathrm{Dice} = 2\,\mathrm{IoU} / (1 + \mathrm{IoU})`.

    Args:
        prediction: integer label map or one-hot map (see the module notes).
        target: the same, on the same device.
        num_classes: number of classes ``L`` (required when both inputs are integer label maps).
        include_background: keep class 0 in the result.
        reduction: ``"none"``, ``"mean_class"``, ``"mean_batch"`` or ``"mean"`` (NaN-skipping means).
        empty: value when class ``c`` is absent from both: ``"perfect"`` (1) or ``"nan"``.

    Returns:
        float64 scores.

    Shape:
        prediction, target: ``(B, 1, *S)`` integer or ``(B, L, *S)`` one-hot; out: ``(B, L')`` for
        ``"none"``, ``(B,)``, ``(L',)`` or ``()`` for the reductions, with ``L' = L`` or ``L - 1``
        without the background.

    Reference:
        Dice, Ecology 26(3), 297-302, 1945.

    Example:
        >>> p = torch.tensor([0, 1, 1, 1]).view(1, 1, 2, 2)
        >>> t = torch.tensor([0, 0, 1, 1]).view(1, 1, 2, 2)
        >>> dice(p, t, 2).tolist()  # class 0: 2*1/(1+2); class 1: 2*2/(3+2)
        [[0.6666666666666666, 0.8]]
    """
    _check_options(reduction, empty)
    pred, true, n = _pair(prediction, target, num_classes)
    cm = _confusion(pred, true, n)
    tp = cm.diagonal(dim1=1, dim2=2)
    den = cm.sum(2) + cm.sum(1)
    return _finish(_ratio(2 * tp, den, den == 0, empty), include_background, reduction)


def iou(
    prediction: torch.Tensor,
    target: torch.Tensor,
    num_classes: int | None = None,
    *,
    include_background: bool = True,
    reduction: Reduction = "none",
    empty: Empty = "perfect",
) -> torch.Tensor:
    r"""Intersection over union (Jaccard index) per sample and class; its class mean is the mean IoU.

    .. math::

        \mathrm{IoU}_c = \frac{|P_c \cap T_c|}{|P_c \cup T_c|} = \frac{TP}{TP + FP + FN} \in [0, 1].

    ``reduction="mean_class"`` gives the mean IoU (mIoU) of each sample, ``"mean"`` its batch
    average.

    Args:
        prediction: integer label map or one-hot map (see the module notes).
        target: the same, on the same device.
        num_classes: number of classes ``L`` (required when both inputs are integer label maps).
        include_background: keep class 0 in the result.
        reduction: ``"none"``, ``"mean_class"``, ``"mean_batch"`` or ``"mean"`` (NaN-skipping means).
        empty: value when class ``c`` is absent from both: ``"perfect"`` (1) or ``"nan"``.

    Returns:
        float64 scores.

    Shape:
        prediction, target: ``(B, 1, *S)`` integer or ``(B, L, *S)`` one-hot; out: ``(B, L')``,
        ``(B,)``, ``(L',)`` or ``()`` as for :func:`dice`.

    Reference:
        Jaccard, "The distribution of the flora in the alpine zone", New Phytologist 11(2), 1912;
        Long et al., CVPR 2015 (mean IoU).

    Example:
        >>> p = torch.tensor([0, 1, 1, 1]).view(1, 1, 2, 2)
        >>> t = torch.tensor([0, 0, 1, 1]).view(1, 1, 2, 2)
        >>> iou(p, t, 2).tolist()  # class 0: 1/2; class 1: 2/3
        [[0.5, 0.6666666666666666]]
    """
    _check_options(reduction, empty)
    pred, true, n = _pair(prediction, target, num_classes)
    cm = _confusion(pred, true, n)
    tp = cm.diagonal(dim1=1, dim2=2)
    union = cm.sum(2) + cm.sum(1) - tp
    return _finish(_ratio(tp, union, union == 0, empty), include_background, reduction)


def accuracy(
    prediction: torch.Tensor,
    target: torch.Tensor,
    num_classes: int | None = None,
    *,
    include_background: bool = True,
    reduction: Reduction = "none",
    empty: Empty = "perfect",
) -> torch.Tensor:
    r"""Per-class accuracy, i.e. the sensitivity (recall, true-positive rate) of each class.

    .. math::

        \mathrm{Acc}_c = \frac{|P_c \cap T_c|}{|T_c|} = \frac{TP}{TP + FN} \in [0, 1],

    the fraction of the voxels of class ``c`` that are labelled ``c``. Its class mean
    (``reduction="mean_class"``) is the "mean accuracy" of Long et al. (balanced accuracy). This
    is not the one-vs-rest accuracy :math:`(TP + TN) / N`, which the true negatives of the
    background dominate; for the fraction of all voxels labelled correctly see
    :func:`pixel_accuracy`.

    When :math:`T_c` is empty the ratio is undefined: it is ``empty`` (1 or NaN) if the prediction
    has no ``c`` either, and 0 if it has (false positives only).

    Args:
        prediction: integer label map or one-hot map (see the module notes).
        target: the same, on the same device.
        num_classes: number of classes ``L`` (required when both inputs are integer label maps).
        include_background: keep class 0 in the result.
        reduction: ``"none"``, ``"mean_class"``, ``"mean_batch"`` or ``"mean"`` (NaN-skipping means).
        empty: value when class ``c`` is absent from both: ``"perfect"`` (1) or ``"nan"``.

    Returns:
        float64 scores.

    Shape:
        prediction, target: ``(B, 1, *S)`` integer or ``(B, L, *S)`` one-hot; out: ``(B, L')``,
        ``(B,)``, ``(L',)`` or ``()`` as for :func:`dice`.

    Reference:
        Long, Shelhamer and Darrell, "Fully convolutional networks for semantic segmentation", CVPR 2015.

    Example:
        >>> p = torch.tensor([0, 1, 1, 1]).view(1, 1, 2, 2)
        >>> t = torch.tensor([0, 0, 1, 1]).view(1, 1, 2, 2)
        >>> accuracy(p, t, 2).tolist()  # class 0: 1 of 2 found; class 1: 2 of 2
        [[0.5, 1.0]]
    """
    _check_options(reduction, empty)
    pred, true, n = _pair(prediction, target, num_classes)
    cm = _confusion(pred, true, n)
    tp = cm.diagonal(dim1=1, dim2=2)
    truth = cm.sum(2)
    both_empty = (truth == 0) & (cm.sum(1) == 0)
    return _finish(_ratio(tp, truth, both_empty, empty), include_background, reduction)


def pixel_accuracy(
    prediction: torch.Tensor,
    target: torch.Tensor,
    num_classes: int | None = None,
    *,
    reduction: Literal["none", "mean"] = "none",
) -> torch.Tensor:
    r"""Fraction of voxels whose predicted label equals the true label.

    .. math::

        \mathrm{PA} = \frac{\sum_c |P_c \cap T_c|}{|S|} = \frac{\operatorname{tr} C}{\sum_{ij} C_{ij}}.

    Args:
        prediction: integer label map or one-hot map (see the module notes).
        target: the same, on the same device.
        num_classes: number of classes ``L`` (required when both inputs are integer label maps).
        reduction: ``"none"`` (one value per sample) or ``"mean"`` (their average).

    Returns:
        float64 fractions in [0, 1].

    Shape:
        prediction, target: ``(B, 1, *S)`` integer or ``(B, L, *S)`` one-hot; out: ``(B,)`` or ``()``.

    Reference:
        Long, Shelhamer and Darrell, CVPR 2015.

    Example:
        >>> p = torch.tensor([0, 1, 1, 1]).view(1, 1, 2, 2)
        >>> t = torch.tensor([0, 0, 1, 1]).view(1, 1, 2, 2)
        >>> pixel_accuracy(p, t, 2).tolist()
        [0.75]
    """
    if reduction not in ("none", "mean"):
        raise ValueError(f"reduction: expected 'none' or 'mean', got {reduction!r}")
    pred, true, n = _pair(prediction, target, num_classes)
    cm = _confusion(pred, true, n).to(torch.float64)
    out = cm.diagonal(dim1=1, dim2=2).sum(1) / cm.sum((1, 2))
    return out if reduction == "none" else out.mean()


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with a face neighbour outside it (voxels beyond the image count as outside)."""
    from scipy import ndimage

    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def _surface_distances(a: np.ndarray, b: np.ndarray, spacing: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Distances from each surface voxel of ``a`` to the surface of ``b``, and back (both non-empty)."""
    from scipy import ndimage

    union = a | b
    # Crop to the bounding box of both masks grown by one voxel: erosion and the distance transform
    # then see the same neighbourhoods as on the full grid, and every nearest surface voxel is inside.
    box = tuple(slice(max(int(ix.min()) - 1, 0), int(ix.max()) + 2) for ix in np.nonzero(union))
    a, b = a[box], b[box]
    sa, sb = _surface(a), _surface(b)
    to_b = ndimage.distance_transform_edt(~sb, sampling=spacing)
    to_a = ndimage.distance_transform_edt(~sa, sampling=spacing)
    return to_b[sa], to_a[sb]


def hausdorff95(
    prediction: torch.Tensor,
    target: torch.Tensor,
    num_classes: int | None = None,
    *,
    spacing: float | Sequence[float] = 1.0,
    percentile: float = 95.0,
    aggregate: Literal["pooled", "max"] = "pooled",
    include_background: bool = True,
    reduction: Reduction = "none",
    empty: Empty = "perfect",
) -> torch.Tensor:
    r"""95th-percentile Hausdorff distance (HD95) between the class boundaries, in physical units.

    The surface :math:`\partial A` of a mask is the set of its voxels that have a face neighbour
    (4-neighbourhood in 2D, 6 in 3D) outside it, found by a binary erosion; voxels beyond the image
    edge count as outside, so a mask touching the edge has its surface there. With
    :math:`d(p, \partial B) = \min_{q \in \partial B} \lVert (p - q) \odot s \rVert_2` (``s`` the
    voxel spacing) for every :math:`p \in \partial A` and symmetrically from :math:`\partial B`, the
    default ``aggregate="pooled"`` returns the ``percentile`` of the union of both sets of distances
    (the "95th percentile of the symmetric surface distances", as in MedPy's ``hd95``);
    ``aggregate="max"`` returns the larger of the two directed percentiles (MONAI's
    ``compute_hausdorff_distance``). With ``percentile=100`` both give the Hausdorff distance
    between the two surfaces,

    .. math::

        H(\partial A, \partial B) = \max\Big(\max_{p \in \partial A} d(p, \partial B),\
        \max_{q \in \partial B} d(q, \partial A)\Big).

    Percentiles interpolate linearly between order statistics (:func:`numpy.percentile`). The
    distances are exact, from SciPy's Euclidean distance transform on the bounding box of the two
    masks.

    Empty masks: a class absent from both gives 0 (``empty="perfect"``) or NaN (``empty="nan"``);
    a class present in only one gives ``inf``.

    Runs on the host: the label maps are copied to CPU memory (synchronising with a GPU) and the
    result is moved back to the input's device. Cost: two distance transforms per sample and class
    on the bounding box of the class.

    Args:
        prediction: integer label map or one-hot map (see the module notes).
        target: the same, on the same device.
        num_classes: number of classes ``L`` (required when both inputs are integer label maps).
        spacing: voxel size along each spatial axis, in the tensor's axis order (one number for
            isotropic voxels); the result is in its unit.
        percentile: which percentile of the surface distances, in ``(0, 100]``.
        aggregate: ``"pooled"`` or ``"max"`` (see above).
        include_background: keep class 0 in the result.
        reduction: ``"none"``, ``"mean_class"``, ``"mean_batch"`` or ``"mean"`` (NaN-skipping
            means; an ``inf`` entry makes its mean ``inf``).
        empty: value when class ``c`` is absent from both: ``"perfect"`` (0) or ``"nan"``.

    Returns:
        float64 distances, non-negative, possibly ``inf``.

    Shape:
        prediction, target: ``(B, 1, *S)`` integer or ``(B, L, *S)`` one-hot; out: ``(B, L')``,
        ``(B,)``, ``(L',)`` or ``()`` as for :func:`dice`.

    References:
        Huttenlocher, Klanderman and Rucklidge, IEEE TPAMI 15(9), 1993; Maier-Hein et al.,
        "Metrics reloaded", Nature Methods 21, 2024.

    Example:
        >>> p = torch.zeros(1, 1, 8, 8, dtype=torch.long)
        >>> t = torch.zeros(1, 1, 8, 8, dtype=torch.long)
        >>> p[0, 0, 1, 1] = 1
        >>> t[0, 0, 4, 5] = 1
        >>> hausdorff95(p, t, 2, include_background=False).tolist()
        [[5.0]]
    """
    _check_options(reduction, empty)
    check_option(aggregate, "aggregate", ("pooled", "max"))
    check_number(percentile, "percentile", 0, 100, min_open=True)
    pred, true, n = _pair(prediction, target, num_classes)
    ndim = pred.dim() - 1
    if isinstance(spacing, (int, float)) and not isinstance(spacing, bool):
        spacing_t = (float(spacing),) * ndim
    else:
        spacing_t = tuple(float(s) for s in spacing)
    if len(spacing_t) != ndim or not all(np.isfinite(s) and s > 0 for s in spacing_t):
        raise ValueError(f"spacing: expected one positive number or {ndim} of them (one per spatial axis), got {spacing!r}")
    classes = range(0 if include_background else 1, n)
    p_np, t_np = pred.cpu().numpy(), true.cpu().numpy()
    out = np.zeros((pred.shape[0], n), dtype=np.float64)
    for b in range(pred.shape[0]):
        for c in classes:
            a, t = p_np[b] == c, t_np[b] == c
            has_a, has_t = bool(a.any()), bool(t.any())
            if not has_a and not has_t:
                out[b, c] = 0.0 if empty == "perfect" else np.nan
            elif not has_a or not has_t:
                out[b, c] = np.inf
            else:
                d_ab, d_ba = _surface_distances(a, t, spacing_t)
                if aggregate == "pooled":
                    out[b, c] = np.percentile(np.concatenate([d_ab, d_ba]), percentile)
                else:
                    out[b, c] = max(np.percentile(d_ab, percentile), np.percentile(d_ba, percentile))
    return _finish(torch.from_numpy(out).to(pred.device), include_background, reduction)
