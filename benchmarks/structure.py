"""Speed and quality of the structure-map extractors against Pottslab and scikit-image.

One run partitions the real BrainWeb T1 and PD slices (``plasticine.data.brainweb_slices``, resized
to 128x128 and 256x256, intensities in [0, 1]) with

* plasticine's Potts solver (:func:`plasticine.segmentation.potts`) and ``pottslab`` (PyPI, the Rust
  port of Storath and Weinmann's Pottslab) with the same per-pixel ``gamma`` and neighbourhood
  (``axes`` = Pottslab ``isotropic=False``, ``diagonals`` = ``isotropic=True``), both scored with
  the same energy (:func:`plasticine.segmentation.potts_energy`);
* plasticine's k-means and multi-Otsu structure maps, and scikit-image's ``threshold_multiotsu``.

It prints the median wall time of single images, the time per image of a batch of 8 (plasticine
only: Pottslab takes one image per call), the Potts energies and their ratio. Pottslab's result is
scored twice: as returned (``quantize=True``, values rounded to 1/255, its default) and unrounded
with jumps below 1e-6 ignored (its split copies agree only up to its stopping tolerance).

Threads: the default is one torch thread. The solver runs many small operations, and on a shared
machine whose cores are busy, OpenMP's barriers made two threads 50 times slower than one (measured:
a 128x128 partition took 251 s with 2 threads and 5 s with 1 at a load average of 14 on 2 cores).
Pottslab uses all cores (rayon) either way; so does plasticine's compiled 1-D Potts loop (the
``numba`` backend, :func:`plasticine.segmentation.line_backend`, used on CPU tensors when numba is
installed), which hands pieces of lines to helper threads without barriers. ``--backend torch``
times the tensor path instead. Both backends give the same partitions.

Usage::

    python benchmarks/structure.py              # full run (several minutes on 2 CPU cores)
    python benchmarks/structure.py --quick      # 128x128, one image, one neighbourhood (< 1 min)
    python benchmarks/structure.py --device cuda --threads 8
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _timing as T  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)

from plasticine.core.filters import resize  # noqa: E402
from plasticine.data import brainweb_slices  # noqa: E402
from plasticine.segmentation import (  # noqa: E402
    kmeans_structure_map,
    line_backend,
    multi_otsu_structure_map,
    pixel_gamma,
    potts,
    potts_energy,
)

GAMMA = 0.5
"""Jump penalty at the reference size 256 (the PottsExtractor default); per pixel it is scaled by size."""


def _images(size: int, device: torch.device) -> dict[str, torch.Tensor]:
    data = brainweb_slices()
    out = {}
    for name in ("t1", "pd"):
        x = torch.tensor(data[name], dtype=torch.float64)[None, None] / 255.0
        out[name] = resize(x, (size, size)).clamp(0, 1).to(device)
    return out


def _pottslab():
    try:
        import pottslab
    except Exception as exc:  # noqa: BLE001 - report any import failure
        return None, f"unavailable ({type(exc).__name__}: {exc})"
    return pottslab, f"pottslab {getattr(pottslab, '__version__', '?')}"


def _skimage():
    try:
        from skimage.filters import threshold_multiotsu
    except Exception as exc:  # noqa: BLE001
        return None, f"unavailable ({type(exc).__name__}: {exc})"
    import skimage

    return threshold_multiotsu, f"scikit-image {skimage.__version__}"


def run(
    sizes: list[int],
    names: list[str],
    neighborhoods: list[str],
    repeats: int,
    batch: int,
    device: torch.device,
    backend: str = "auto",
) -> None:
    pl, pl_version = _pottslab()
    sk, sk_version = _skimage()
    print(T.machine_summary(device))
    print(f"torch threads: {torch.get_num_threads()}; device: {device}; {pl_version}; {sk_version}")
    print(f"Potts 1-D solver: {line_backend(backend, device)} (backend={backend!r})")
    print(f"gamma = {GAMMA} at 256x256, scaled by side length (pixel_gamma)\n")
    rows = []
    for size in sizes:
        imgs = _images(size, device)
        gamma = pixel_gamma(GAMMA, (size, size))
        for nb in neighborhoods:
            for name in names:
                x32 = imgs[name].float()
                x64 = imgs[name]
                t_ours = T.time_callable(lambda: potts(x32, gamma, neighborhood=nb, backend=backend), device, warmup=1, repeats=repeats, min_repeats=1)
                u = potts(x32, gamma, neighborhood=nb, backend=backend)
                e_ours = potts_energy(u, x64, gamma, neighborhood=nb).item()
                xb = x32.expand(batch, -1, -1, -1).contiguous()
                t_batch = T.time_callable(lambda: potts(xb, gamma, neighborhood=nb, backend=backend), device, warmup=0, repeats=1, min_repeats=1)
                row = {
                    "size": f"{size}x{size}",
                    "nb": nb,
                    "image": name,
                    "ours_ms": t_ours.median_ms,
                    "ours_batch_ms_per_image": t_batch.median_ms / batch,
                    "E_ours": e_ours,
                    "regions_ours": int(u.unique().numel()),
                }
                if pl is not None:
                    f = x64[0, 0].cpu().numpy()
                    iso = nb == "diagonals"
                    t_pl = T.time_callable(lambda: pl.min_l2_potts_2d(f, gamma, isotropic=iso), "cpu", warmup=1, repeats=repeats, min_repeats=1)
                    up = torch.from_numpy(pl.min_l2_potts_2d(f, gamma, isotropic=iso))[None, None]
                    upr = torch.from_numpy(pl.min_l2_potts_2d(f, gamma, isotropic=iso, quantize=False))[None, None]
                    row["pottslab_ms"] = t_pl.median_ms
                    row["E_pottslab"] = potts_energy(up, x64.cpu(), gamma, neighborhood=nb).item()
                    row["E_pottslab_raw"] = potts_energy(upr, x64.cpu(), gamma, neighborhood=nb, tol=1e-6).item()
                rows.append(row)
                print(_format_potts(row), flush=True)
    print()
    for size in sizes:
        imgs = _images(size, device)
        for name in names:
            x = imgs[name].float()
            for classes in (2, 3):
                t_km = T.time_callable(lambda: kmeans_structure_map(x, classes), device, repeats=repeats, min_repeats=1)
                t_mo = T.time_callable(lambda: multi_otsu_structure_map(x, classes), device, repeats=repeats, min_repeats=1)
                line = f"{size}x{size} {name} L={classes}: k-means {T.format_ms(t_km.median_ms)}, multi-Otsu {T.format_ms(t_mo.median_ms)}"
                if sk is not None:
                    xn = x[0, 0].cpu().numpy().astype(np.float64)
                    t_sk = T.time_callable(lambda: sk(xn, classes=classes), "cpu", repeats=repeats, min_repeats=1)
                    ours = multi_otsu_structure_map(x, classes)[0].argmax(0).cpu().numpy()
                    theirs = np.digitize(xn, sk(xn, classes=classes))
                    agree = float((ours == theirs).mean())
                    line += f", skimage threshold_multiotsu {T.format_ms(t_sk.median_ms)} (labels agree on {agree:.4f} of the pixels)"
                print(line, flush=True)


def _format_potts(row: dict) -> str:
    s = (
        f"{row['size']} {row['nb']:9s} {row['image']}: ours {T.format_ms(row['ours_ms'])} "
        f"(batch: {T.format_ms(row['ours_batch_ms_per_image'])}/image), E={row['E_ours']:.3f}, {row['regions_ours']} values"
    )
    if "pottslab_ms" in row:
        s += (
            f" | pottslab {T.format_ms(row['pottslab_ms'])}, E={row['E_pottslab']:.3f} (unrounded: {row['E_pottslab_raw']:.3f})"
            f" | time ratio ours/pottslab {row['ours_ms'] / row['pottslab_ms']:.2f},"
            f" batched {row['ours_batch_ms_per_image'] / row['pottslab_ms']:.2f};"
            f" energy ratio {row['E_ours'] / row['E_pottslab']:.4f}"
        )
    return s


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="128x128, the T1 slice, axes only, one repeat")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, see the notes)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument(
        "--backend", default="auto", choices=["auto", "numba", "torch"], help="the Potts 1-D solver (default: auto)"
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.quick:
        run([128], ["t1"], ["axes"], repeats=1, batch=args.batch, device=device, backend=args.backend)
    else:
        run([128, 256], ["t1", "pd"], ["axes", "diagonals"], repeats=2, batch=args.batch, device=device, backend=args.backend)


if __name__ == "__main__":
    main()
