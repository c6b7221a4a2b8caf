"""Registration backends on the exact-truth benchmark built from real brain MR.

2D: source = the real BrainWeb T1 slice, target = the real PD slice of the same anatomy warped by a
known random diffeomorphism phi (smooth velocity on a 6x6 control grid, up to ``--max-norm`` voxels,
scaling and squaring). The AAL labels of Colin27 slice 94 (which is the same anatomy, see
``plasticine.data.system``) and the shipped ventricle mask are traced with the estimated phi and
compared with the same labels traced by the true phi. 3D: Colin27 at 2 mm as source, a synthetic
second contrast (random piecewise-linear intensity map) of it warped by a known 3D field as target.

Per backend and case: endpoint error inside the brain (mean, 95th percentile, voxels), mean AAL Dice,
ventricle Dice, folding fraction (central-difference det J <= 0, and over all one-sided stencils)
and the non-diffeomorphic volume (``plasticine.core.folding_report``), inverse consistency (voxels) and seconds per pair.

    python benchmarks/registration.py               # 5 cases 2D + 1 case 3D, every available backend
    python benchmarks/registration.py --quick       # 2 small 2D cases (CI)
    python benchmarks/registration.py --backends iterative ants
    python benchmarks/registration.py --cases 0 --backends iterative ants --threads 1   # the 3D case alone

``--threads N`` sets torch's threads and ANTs' (``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS``, read when
ANTs is first loaded) to the same count; both are printed. After the tables, the mean time and EPE
of the iterative backend over ANTs SyN are printed per dimension.
    python benchmarks/registration.py --learned registration_model   # after examples/registration_backends.py
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import format_table, machine_summary  # noqa: E402

from plasticine.core import Deformation  # noqa: E402
from plasticine.data import brainweb_slices  # noqa: E402
from plasticine.data.synthetic import random_deformation, random_intensity_map  # noqa: E402
from plasticine.segmentation.metrics import dice  # noqa: E402


def load_2d(size: tuple[int, int] | None):
    d = brainweb_slices()
    t1 = torch.from_numpy(d["t1"].astype(np.float32))[None, None] / 255.0
    pd = torch.from_numpy(d["pd"].astype(np.float32))[None, None] / 255.0
    vent = torch.from_numpy(d["ventricles"].astype(np.int64))[None, None]
    try:
        from plasticine.data.system import aal_slice

        aal = torch.from_numpy(aal_slice())[None, None]
        codes = torch.unique(aal)
        aal = torch.searchsorted(codes, aal)  # 0..L-1
    except (FileNotFoundError, ImportError) as exc:
        print(f"AAL labels unavailable ({exc}); AAL Dice is skipped")
        aal = None
    if size is not None:
        t1, pd = (F.interpolate(a, size=size, mode="area") for a in (t1, pd))
        vent = F.interpolate(vent.float(), size=size, mode="nearest").long()
        aal = None if aal is None else F.interpolate(aal.float(), size=size, mode="nearest").long()
    return t1, pd, vent, aal


def load_3d():
    from plasticine.data.system import colin27

    vol, _ = colin27("ch2bet.nii.gz")
    x = torch.from_numpy(vol.astype(np.float32))[None, None]
    x = F.avg_pool3d(x, 2)  # 2 mm
    x = x / x.amax()
    return x


def load_learned(folder: Path | None):
    """The backend saved by examples/registration_backends.py (``registration.pt``: network, integrator, downsampling)."""
    if folder is None:
        return None
    from plasticine.checkpoint import load_component
    from plasticine.registration import LearnedRegistration

    return load_component(folder / "registration.pt", expected=LearnedRegistration)


def backends(names: list[str], quick: bool, learned=None):
    out = {}
    for name in names:
        if name == "iterative":
            from plasticine.registration.iterative import IterativeRegistration

            out[name] = IterativeRegistration()
        elif name == "ants":
            if importlib.util.find_spec("ants") is None:
                print("ants: unavailable (pip install 'plasticine[ants]')")
                continue
            from plasticine.registration.ants import AntsRegistration

            out[name] = AntsRegistration()
        elif name == "identity":
            out[name] = None
        elif name == "learned":
            if learned is None:
                print("learned: skipped (give --learned DIR, a model saved by examples/registration_backends.py)")
                continue
            out[name] = learned
        else:
            raise SystemExit(f"unknown backend {name!r}")
    return out


COLUMNS = ("epe", "epe95", "aal", "vent", "fold", "fold1", "ndv", "ic", "sec")
"""Row keys in table order; ``fold`` central-difference, ``fold1`` one-sided folding fraction, ``ndv`` the NDV fraction."""


def _cell(key: str, value: float) -> str:
    return f"{value:.2e}" if key in ("fold1", "ndv") else f"{value:.3f}"


def score(est: Deformation, truth: Deformation, brain: torch.Tensor, labels: dict[str, torch.Tensor]) -> dict[str, float]:
    err = (est.forward - truth.forward).norm(dim=1, keepdim=True)[brain]
    row = {"epe": float(err.mean()), "epe95": float(torch.quantile(err, 0.95))}
    for name, lab in labels.items():
        k = int(lab.max()) + 1
        ref = truth.labels_to_target(lab, k)
        got = est.labels_to_target(lab, k)
        row[name] = float(dice(got, ref, num_classes=k, include_background=False).mean())
    rep = est.folding_report()
    row["fold"] = float(rep.central)
    row["fold1"] = float(rep.one_sided)
    row["ndv"] = float(rep.non_diffeomorphic_volume)
    row["ic"] = float(est.inverse_consistency())
    return row


def run(args) -> None:
    torch.set_num_threads(args.threads)
    # ANTs (ITK) reads its thread count when it is first loaded: the same count as torch's, for a fair time
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)
    print(machine_summary())
    print(f"threads: torch {torch.get_num_threads()}, ANTs (ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS) {args.threads}")
    size = (108, 90) if args.quick else None
    t1, pd, vent, aal = load_2d(size)
    labels = {"vent": vent} | ({"aal": aal} if aal is not None else {})
    cases = []
    for seed in range(args.cases):
        truth = random_deformation(t1.shape[2:], args.max_norm * (0.5 if args.quick else 1.0), generator=torch.Generator().manual_seed(seed))
        cases.append(("2d", seed, t1, truth.to_target(pd), truth, truth.to_target((t1 > 0.05).float()) > 0.5, labels))
    if not args.quick and not args.no_3d:
        try:
            x = load_3d()
            g = torch.Generator().manual_seed(100)
            truth = random_deformation(x.shape[2:], args.max_norm * 0.6, control_points=5, generator=g)
            y = truth.to_target(random_intensity_map(x, generator=g))
            cases.append(("3d", 100, x, y, truth, truth.to_target((x > 0.05).float()) > 0.5, {}))
        except (FileNotFoundError, ImportError) as exc:
            print(f"3D case skipped: {exc}")
    rows = []
    summary: dict[tuple[str, str], list[dict[str, float]]] = {}
    learned = load_learned(args.learned)
    for name, backend in backends(args.backends, args.quick, learned).items():
        for dim, seed, src, tgt, truth, brain, labs in cases:
            t = time.perf_counter()
            if backend is None:
                z = torch.zeros_like(truth.forward)
                est = Deformation(z, z)
            elif name == "learned" and dim == "3d":
                continue  # the example trains a 2D network
            else:
                with torch.no_grad():
                    est = backend.register(src, tgt)
            sec = time.perf_counter() - t
            r = score(est, truth, brain, labs) | {"sec": sec}
            summary.setdefault((name, dim), []).append(r)
            rows.append([name, dim, str(seed)] + [_cell(k, r.get(k, float("nan"))) for k in COLUMNS])
    head = ["backend", "dim", "case", "EPE mean", "EPE p95", "AAL Dice", "vent Dice", "folding", "fold 1-sided", "NDV", "inv.cons.", "s/pair"]
    print(format_table(head, rows, ["<", "<", ">"] + [">"] * len(COLUMNS)))
    print("\nmeans over cases")
    mrows = []
    for (name, dim), rs in summary.items():
        mrows.append([name, dim, str(len(rs))] + [_cell(k, np.mean([r.get(k, np.nan) for r in rs])) for k in COLUMNS])
    print(format_table(["backend", "dim", "n"] + head[3:], mrows, ["<", "<", ">"] + [">"] * len(COLUMNS)))
    for dim in ("2d", "3d"):
        own, ants = summary.get(("iterative", dim)), summary.get(("ants", dim))
        if own and ants:
            t_own, t_ants = (float(np.mean([r["sec"] for r in rs])) for rs in (own, ants))
            e_own, e_ants = (float(np.mean([r["epe"] for r in rs])) for rs in (own, ants))
            print(f"{dim}: iterative {t_own:.2f} s EPE {e_own:.3f}, ANTs SyN {t_ants:.2f} s EPE {e_ants:.3f}: "
                  f"time iterative / ANTs {t_own / t_ants:.2f}x, EPE iterative / ANTs {e_own / e_ants:.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="two small 2D cases")
    p.add_argument("--cases", type=int, default=None, help="number of 2D cases (default 5, quick 2)")
    p.add_argument("--max-norm", type=float, default=10.0, help="largest velocity of the true field, voxels")
    p.add_argument("--backends", nargs="+", default=["identity", "learned", "iterative", "ants"])
    p.add_argument("--learned", type=Path, default=None, help="folder of a network saved by examples/registration_backends.py")
    p.add_argument("--no-3d", action="store_true", help="skip the 3D case")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if args.cases is None:
        args.cases = 2 if args.quick else 5
    run(args)


if __name__ == "__main__":
    main()
