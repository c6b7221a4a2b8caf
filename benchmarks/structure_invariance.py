"""How much each structure extractor's map means the same anatomy in two contrasts: T1 against PD.

The shipped BrainWeb T1 and PD slices (``plasticine.data.brainweb_slices``, 217 x 181, intensities
divided by 255) are pixel-aligned images of one head in two contrasts (CSF dark in T1, bright in
PD). Each extractor maps both; the table gives the agreement of the two maps:

* label maps (one-hot partitions, the contour maps): the mean over classes of the Dice of class k
  in T1 against class k in PD ("Dice"), and the same after the best permutation of the PD classes
  ("Dice, matched": what a matching of classes across domains could reach; the foreground and
  contour maps have a fixed meaning per channel, so there both are the same);
* continuous maps (MIND-SSC, and the raw intensities as a reference): the normalised (Pearson)
  correlation of all channels and pixels.

Each is computed over the whole slice and inside the head (the union of the two foreground masks of
:class:`~plasticine.segmentation.ForegroundExtractor`, which leaves the background's noise out; for
label maps over the classes that cover at least 5 percent of the head in T1 or PD).

Usage::

    python benchmarks/structure_invariance.py          # about a minute on 2 CPU cores
"""

from __future__ import annotations

import itertools

import torch

from plasticine.data import brainweb_slices
from plasticine.segmentation import (
    ContourExtractor,
    ForegroundExtractor,
    KMeansExtractor,
    MINDExtractor,
    MultiOtsuExtractor,
    PottsExtractor,
)


def mean_dice(a: torch.Tensor, b: torch.Tensor, region: torch.Tensor | None = None) -> float:
    """Mean over channels of the Dice of channel k of ``a`` against channel k of ``b`` ((1, L, *S) 0/1 maps).

    With a ``region`` (1, 1, *S) mask the Dice is taken on its pixels, over the classes that cover at
    least 5 percent of it in ``a`` or ``b`` (every class of a one-channel map).
    """
    if region is not None:
        a, b = a * region, b * region
    inter = (a * b).flatten(2).sum(2)
    total = (a + b).flatten(2).sum(2)
    dice = 2 * inter / total.clamp_min(1)
    if region is None or a.shape[1] == 1:
        return float(dice.mean())
    share = torch.maximum(a.flatten(2).sum(2), b.flatten(2).sum(2)) / region.sum()
    return float(dice[share >= 0.05].mean())


def matched_dice(a: torch.Tensor, b: torch.Tensor, region: torch.Tensor | None = None) -> float:
    """:func:`mean_dice` after the best permutation of the channels of ``b``."""
    return max(mean_dice(a, b[:, list(p)], region) for p in itertools.permutations(range(b.shape[1])))


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of all values of two maps."""
    a = a.flatten().double() - a.double().mean()
    b = b.flatten().double() - b.double().mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


EXTRACTORS = {
    "k-means, 4 classes": (KMeansExtractor(4), "labels"),
    "multi-Otsu, 4 classes": (MultiOtsuExtractor(4), "labels"),
    "Potts, 2 classes (paper)": (PottsExtractor(2), "labels"),
    "Potts, 4 classes": (PottsExtractor(4), "labels"),
    "foreground mask": (ForegroundExtractor(), "labels"),
    "contours of Potts, 2 classes": (ContourExtractor(), "labels"),
    "contours of k-means, 4 classes": (ContourExtractor(KMeansExtractor(4)), "labels"),
    "MIND-SSC (Heinrich's sigma 0.8, dilation 2)": (MINDExtractor(), "continuous"),
    "MIND-SSC, sigma 2.5": (MINDExtractor(sigma=2.5), "continuous"),
}


def _agreement(a: torch.Tensor, b: torch.Tensor, kind: str, region: torch.Tensor | None = None) -> tuple[str, float, float | None]:
    if kind == "continuous":
        if region is not None:
            a, b = a[region.expand_as(a)], b[region.expand_as(b)]
        return "correlation", correlation(a, b), None
    if a.shape[1] == 1:  # a contour map: Dice of the edge pixels
        return "Dice", mean_dice(a, b, region), None
    return "Dice", mean_dice(a, b, region), matched_dice(a, b, region)


def table() -> list[tuple[str, str, float, float | None, float, float | None]]:
    """Rows ``(extractor, measure, agreement, matched, agreement in the head, matched in the head)``."""
    d = brainweb_slices()
    t1 = torch.tensor(d["t1"], dtype=torch.float32)[None, None] / 255
    pd = torch.tensor(d["pd"], dtype=torch.float32)[None, None] / 255
    head = (ForegroundExtractor()(t1)[:, 1:] + ForegroundExtractor()(pd)[:, 1:]) > 0
    maps = {"raw intensities (reference)": ((t1, pd), "continuous")}
    maps.update({name: ((ext(t1), ext(pd)), kind) for name, (ext, kind) in EXTRACTORS.items()})
    rows = []
    for name, ((a, b), kind) in maps.items():
        measure, whole, matched = _agreement(a, b, kind)
        _, inside, matched_inside = _agreement(a, b, kind, head)
        rows.append((name, measure, whole, matched, inside, matched_inside))
    return rows


def _fmt(x: float | None) -> str:
    return "" if x is None else f"{x:.3f}"


def main() -> None:
    torch.set_num_threads(1)
    print("| extractor | measure | T1 vs PD | classes matched | T1 vs PD in the head | matched, in the head |")
    print("|---|---|---|---|---|---|")
    for name, measure, whole, matched, inside, matched_inside in table():
        print(f"| {name} | {measure} | {whole:.3f} | {_fmt(matched)} | {inside:.3f} | {_fmt(matched_inside)} |")


if __name__ == "__main__":
    main()
