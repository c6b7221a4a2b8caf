"""Quickstart: a diffeomorphism on a real MR slice, and everything traced through it.

Loads the shipped BrainWeb T1 slice, draws a smooth random stationary velocity ``v`` (seeded),
integrates it by scaling and squaring into ``phi = exp(v)`` and ``phi^-1 = exp(-v)``, warps the
image into the target geometry, traces the ventricle mask and a few landmarks forward and back,
and prints the quality of the maps: the smallest Jacobian determinant, the folding fraction, the
inverse consistency and the landmark round-trip error. With matplotlib installed it also saves a
figure.

Run:
    python examples/quickstart.py              # full 217 x 181 slice
    python examples/quickstart.py --small      # half resolution (what CI runs)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from plasticine.core import Deformation
from plasticine.data import brainweb_slices
from plasticine.data.synthetic import random_velocity
from plasticine.registration import ScalingAndSquaring


def dice(a: torch.Tensor, b: torch.Tensor) -> float:
    """Dice overlap of two boolean masks."""
    a, b = a.bool(), b.bool()
    return float(2 * (a & b).sum() / (a.sum() + b.sum()).clamp(min=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="run on the slice at half resolution")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random velocity")
    parser.add_argument("--max-displacement", type=float, default=8.0, help="largest velocity in voxels")
    parser.add_argument("--outdir", type=Path, default=Path("example_output"), help="where the figure goes")
    args = parser.parse_args()
    t_start = time.perf_counter()

    # 1. Real anatomy: a (1, 1, H, W) float image in [0, 1] and an integer (1, 1, H, W) label map.
    data = brainweb_slices()
    image = torch.from_numpy(data["t1"]).to(torch.float32)[None, None] / 255.0
    mask = torch.from_numpy(data["ventricles"]).to(torch.int64)[None, None]
    max_disp = args.max_displacement
    if args.small:
        image = F.avg_pool2d(image, 2)
        mask = F.max_pool2d(mask.float(), 2).long()
        max_disp = max_disp / 2
    shape = tuple(image.shape[2:])
    print(f"T1 slice {tuple(image.shape)}, ventricles {int(mask.sum())} voxels")

    # 2. A smooth random velocity (B, 2, H, W) in voxels, channel 0 along rows (dy), 1 along columns (dx).
    generator = torch.Generator().manual_seed(args.seed)
    velocity = random_velocity(shape, max_disp, control_points=6, generator=generator)

    # 3. phi = exp(v) and phi^-1 = exp(-v) by scaling and squaring (7 squarings, as in the paper).
    integrate = ScalingAndSquaring(steps=7)
    phi = Deformation(forward=integrate(velocity), inverse=integrate(-velocity), velocity=velocity)
    print(phi)

    # 4. The source image in the target geometry: image o phi (pull-back).
    warped = phi.to_target(image)

    # 5. Trace the ventricle mask to the target and back (one-hot channels, linear, argmax).
    mask_target = phi.labels_to_target(mask, num_classes=2)
    mask_back = phi.labels_to_source(mask_target, num_classes=2)

    # 6. Landmarks in (y, x) voxel coordinates: a source point p sits at phi^-1(p) in the target.
    ys, xs = torch.nonzero(mask[0, 0], as_tuple=True)
    centroid = torch.stack([ys.float().mean(), xs.float().mean()])
    h, w = shape
    landmarks = torch.stack(
        [centroid, torch.tensor([0.3 * h, 0.5 * w]), torch.tensor([0.7 * h, 0.35 * w]), torch.tensor([0.5 * h, 0.8 * w])]
    )[None]  # (1, P, 2)
    landmarks_target = phi.points_to_target(landmarks)
    landmarks_back = phi.points_to_source(landmarks_target)

    # Images and points are traced consistently: the centroid of the traced mask equals the mean
    # of phi^-1(p) over the source mask voxels p, weighted by the area change det J_{phi^-1}(p).
    ys_t, xs_t = torch.nonzero(mask_target[0, 0], as_tuple=True)
    centroid_of_traced = torch.stack([ys_t.float().mean(), xs_t.float().mean()])
    mask_points = torch.stack([ys, xs], dim=-1).float()[None]  # (1, M, 2)
    area = phi.inverted().jacobian_determinant()[0, 0, ys, xs]  # det J of phi^-1 at each p
    centroid_predicted = (phi.points_to_target(mask_points)[0] * area[:, None]).sum(0) / area.sum()

    # 7. Quality of the maps.
    det = phi.jacobian_determinant()
    folding = float(phi.folding_fraction())
    ic_mean = float(phi.inverse_consistency())
    ic_max = float(phi.inverse_consistency(reduction="max"))
    roundtrip = (landmarks_back - landmarks).norm(dim=-1)
    moved = (landmarks_target - landmarks).norm(dim=-1)

    print(f"max |u| of phi                    {float(phi.forward.norm(dim=1).max()):.3f} voxels")
    print(f"Jacobian determinant min / max    {float(det.min()):.4f} / {float(det.max()):.4f}")
    print(f"folding fraction (det J <= 0)     {folding:.6f}")
    print(f"inverse consistency mean / max    {ic_mean:.2e} / {ic_max:.2e} voxels")
    for i in range(landmarks.shape[1]):
        p, q = landmarks[0, i].tolist(), landmarks_target[0, i].tolist()
        print(f"landmark {i}: source ({p[0]:6.2f}, {p[1]:6.2f}) -> target ({q[0]:6.2f}, {q[1]:6.2f}), moved {float(moved[0, i]):.3f}")
    print(f"landmark round-trip error max     {float(roundtrip.max()):.2e} voxels")
    print(
        f"ventricle centroid in the target: of the traced mask ({centroid_of_traced[0]:.2f}, {centroid_of_traced[1]:.2f}), "
        f"from the traced points ({centroid_predicted[0]:.2f}, {centroid_predicted[1]:.2f})"
    )
    print(f"ventricle mask Dice source vs traced-and-back {dice(mask, mask_back):.4f}; source vs target {dice(mask, mask_target):.4f}")

    # Sanity checks that make this script fail loudly if the conventions ever break.
    if folding != 0.0 or float(det.min()) <= 0:
        raise SystemExit("the random map folds: det J <= 0 somewhere")
    if float(roundtrip.max()) > 0.1:
        raise SystemExit(f"landmark round trip too large: {float(roundtrip.max()):.3f} voxels")
    if float((centroid_of_traced - centroid_predicted).norm()) > 0.5:
        raise SystemExit("the traced mask and the traced points disagree by more than half a voxel")

    save_figure(args.outdir / "quickstart.png", image, warped, mask, mask_target, landmarks, landmarks_target, det)
    print(f"done in {time.perf_counter() - t_start:.2f} s")


def save_figure(path, image, warped, mask, mask_target, landmarks, landmarks_target, det) -> None:
    """Source with mask and landmarks | target with traced mask and landmarks | det J."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("figure skipped: matplotlib is not installed (pip install matplotlib)")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.6))
    panels = [
        ("source T1, ventricles, landmarks p", image, mask, landmarks),
        ("target = T1 o phi, traced mask, phi^-1(p)", warped, mask_target, landmarks_target),
    ]
    for ax, (title, img, m, pts) in zip(axes, panels):
        ax.imshow(img[0, 0].numpy(), cmap="gray")
        ax.contour(m[0, 0].numpy().astype(np.float32), levels=[0.5], colors="tab:orange", linewidths=1)
        ax.scatter(pts[0, :, 1].numpy(), pts[0, :, 0].numpy(), s=30, c="tab:cyan", marker="+")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    im = axes[2].imshow(det[0, 0].numpy(), cmap="RdBu_r", vmin=0.0, vmax=2.0)
    axes[2].set_title("Jacobian determinant of phi", fontsize=9)
    axes[2].axis("off")
    fig.colorbar(im, ax=axes[2], fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"figure saved to {path}")


if __name__ == "__main__":
    torch.set_num_threads(min(2, torch.get_num_threads()))
    main()
