"""The Triton kernels against plasticine's eager path and the peers, on a CUDA device.

For warping, scaling and squaring (7 steps), mutual information (32 bins) and local NCC
(window 9), at 2D ``1x2x512x512`` and 3D ``1x3x160x192x224``, in float32, bfloat16 and float16,
one run measures for ``plasticine-triton`` (``kernels.backend("triton")``),
``plasticine-eager`` (``kernels.backend("eager")``) and every installed peer (MONAI, deepali,
VoxelMorph with neurite, FireANTs): the forward time, the forward+backward time (median of a few
calls, the device synchronised) and the peak CUDA memory of forward+backward (above what was
allocated before). It prints the ratios kernel / eager and kernel / fastest peer (below 1: the
kernel is faster or smaller).

Bandwidth limit: the card's copy bandwidth is measured first (a device-to-device copy of
1 GiB); a warp moves at least ``(2 C + N) * bytes`` per output voxel (read the displacement and
the image once, write the result: 20 bytes for a float32 trilinear warp of one channel), a
squaring step ``3 N * bytes`` (read the field at the voxel and at the sample, write the result).
The lower bound on the forward time is ``voxels * bytes per voxel / bandwidth``; the tables
print the measured forward time as a multiple of it.

Usage::

    python benchmarks/gpu.py                  # everything
    python benchmarks/gpu.py --only warp --dtype float32 --ndim 3

Without CUDA it prints why on stderr and exits with status 2, measuring nothing.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _timing as T  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)
import primitives as P  # noqa: E402

SHAPES: dict[int, tuple[int, ...]] = {2: (512, 512), 3: (160, 192, 224)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STEPS = P.SQUARING_STEPS
BINS = 32
WINDOW = P.LNCC_WINDOW


# ----------------------------------------------------------------------------------------------
# FireANTs (optional; its losses are classes in fireants.losses)


def _mi_fireants(inp, p):
    mod = P.peer("fireants.losses.mi")
    m = mod.GlobalMutualInformationLoss(num_bins=p["bins"])
    mov, fix = P.leaf(inp["moving"]), inp["fixed"]
    return P.Bound(lambda: m(mov, fix), [mov])


def _lncc_fireants(inp, p):
    mod = P.peer("fireants.losses.cc")
    m = mod.LocalNormalizedCrossCorrelationLoss(spatial_dims=inp["moving"].dim() - 2, kernel_size=p["window"])
    mov, fix = P.leaf(inp["moving"]), inp["fixed"]
    return P.Bound(lambda: m(mov, fix), [mov])


# name: (input kind, parameters, plasticine builder, {peer: builder}, bytes moved per voxel per element size)
PRIMITIVES: dict[str, tuple[str, dict[str, Any], Callable, dict[str, Callable], Callable[[int], float] | None]] = {
    "warp": (
        "warp",
        {},
        P._warp_plasticine,
        {"monai": P._warp_monai, "voxelmorph": P._warp_voxelmorph, "deepali": P._warp_deepali},
        lambda n: 2 * 1 + n,
    ),
    "scaling_and_squaring": (
        "velocity",
        {"steps": STEPS},
        P._sas_plasticine,
        {"monai": P._sas_monai, "voxelmorph": P._sas_voxelmorph, "deepali": P._sas_deepali},
        lambda n: STEPS * 3 * n,
    ),
    "mutual_information": (
        "pair",
        {"bins": BINS},
        P._mi_plasticine,
        {"monai": P._mi_monai, "deepali": P._mi_deepali, "fireants": _mi_fireants},
        None,
    ),
    "local_ncc": (
        "pair",
        {"window": WINDOW},
        P._lncc_plasticine,
        {"monai": P._lncc_monai, "voxelmorph": P._lncc_voxelmorph, "deepali": P._lncc_deepali, "fireants": _lncc_fireants},
        None,
    ),
}


def copy_bandwidth(device: torch.device) -> float:
    """Device-to-device copy bandwidth in bytes per second (1 GiB read and written)."""
    x = torch.empty(2**28, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    t = T.time_callable(lambda: y.copy_(x), device, warmup=2, repeats=10)
    return 2 * x.numel() * 4 / (t.min_ms * 1e-3)


def _fwd_bwd(bound: P.Bound) -> Callable[[], None]:
    def call():
        for leaf in bound.leaves:
            leaf.grad = None
        out = bound.fn()
        (out if out.dim() == 0 else out.float().sum()).backward()

    return call


def _under(backend: str | None, fn: Callable[[], Any]) -> Callable[[], Any]:
    from plasticine.core import kernels

    if backend is None:
        return fn

    def call():
        with kernels.backend(backend):
            return fn()

    return call


def measure(build: Callable, inp: dict, params: dict, device: torch.device, backend: str | None, repeats: int) -> dict:
    """Forward and forward+backward time and forward+backward peak memory of one implementation."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bound = build(inp, params)
            fwd = _under(backend, lambda: bound.fn().detach())
            both = _under(backend, _fwd_bwd(bound))
            t_fwd = T.time_callable(fwd, device, warmup=1, repeats=repeats, min_repeats=1)
            t_both = T.time_callable(both, device, warmup=1, repeats=repeats, min_repeats=1)
            peak = T.peak_memory_mb(both, device)
        return {"fwd_ms": t_fwd.median_ms, "fwd_min_ms": t_fwd.min_ms, "both_ms": t_both.median_ms, "peak_mb": peak}
    except (P.Unavailable, P.Missing) as exc:
        return {"error": f"unavailable: {exc}"}
    except Exception as exc:  # a peer that fails on these inputs (e.g. a half dtype) is reported, not fatal
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:90] if str(exc) else ''}"}
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", choices=sorted(PRIMITIVES), help="primitives to run (default: all)")
    parser.add_argument("--dtype", action="append", choices=sorted(DTYPES), help="dtypes (default: all)")
    parser.add_argument("--ndim", action="append", type=int, choices=(2, 3), help="2 and/or 3 (default: both)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/gpu.py needs a CUDA device (torch.cuda.is_available() is False here); nothing was measured", file=sys.stderr)
        return 2
    from plasticine.core import kernels

    if not kernels.triton_available():
        print("benchmarks/gpu.py needs triton (pip install 'plasticine[triton]'); nothing was measured", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    bandwidth = copy_bandwidth(device)
    print(f"device: {torch.cuda.get_device_name(device)}; copy bandwidth {bandwidth / 1e9:.0f} GB/s; torch {torch.__version__}")
    report(device, bandwidth, args.only or list(PRIMITIVES), args.ndim or (2, 3), args.dtype or list(DTYPES), args.repeats, SHAPES)
    return 0


def report(device, bandwidth: float, names, ndims, dtypes, repeats: int, shapes: dict[int, tuple[int, ...]]) -> None:
    """Measure and print one table per primitive, number of dimensions and dtype."""
    for name in names:
        kind, params, mine, peers, bytes_per_voxel = PRIMITIVES[name]
        for ndim in ndims:
            base = P.make_inputs(kind, ndim, device, shape=shapes[ndim])
            voxels = next(iter(base.values()))[0, 0].numel()
            for dname in dtypes:
                dtype = DTYPES[dname]
                inp = {k: v.to(dtype) for k, v in base.items()}
                rows = {"plasticine-triton": measure(mine, inp, params, device, "triton", repeats)}
                rows["plasticine-eager"] = measure(mine, inp, params, device, "eager", repeats)
                for peer, build in peers.items():
                    rows[peer] = measure(build, inp, params, device, None, repeats)
                limit_ms = None
                if bytes_per_voxel is not None:
                    size = torch.finfo(dtype).bits // 8
                    limit_ms = voxels * bytes_per_voxel(ndim) * size / bandwidth * 1e3
                shape = "x".join(str(s) for s in next(iter(base.values())).shape)
                print(f"\n{name}, {ndim}D {shape}, {dname}" + (f"; bandwidth limit of the forward {limit_ms:.3f} ms" if limit_ms else ""))
                table = []
                for lib, r in rows.items():
                    if "error" in r:
                        table.append([lib, "-", "-", "-", "-", r["error"]])
                        continue
                    bound = T.format_ratio(T.ratio(r["fwd_min_ms"], limit_ms)) + "x" if limit_ms else "-"
                    table.append([lib, T.format_ms(r["fwd_ms"]), T.format_ms(r["both_ms"]), T.format_mb(r["peak_mb"]), bound, ""])
                print(T.format_table(["library", "fwd", "fwd+bwd", "peak fwd+bwd", "fwd / bandwidth limit", "note"], table))
                mine_r = rows["plasticine-triton"]
                if "error" not in mine_r:
                    eager = rows["plasticine-eager"]
                    ok_peers = [r for lib, r in rows.items() if lib not in ("plasticine-triton", "plasticine-eager") and "error" not in r]
                    line = [f"triton / eager: time {T.format_ratio(T.ratio(mine_r['both_ms'], eager.get('both_ms')))}, "
                            f"memory {T.format_ratio(T.ratio(mine_r['peak_mb'], eager.get('peak_mb')))}"]
                    if ok_peers:
                        fastest = min(r["both_ms"] for r in ok_peers)
                        smallest = min(r["peak_mb"] for r in ok_peers)
                        line.append(f"triton / fastest peer: time {T.format_ratio(T.ratio(mine_r['both_ms'], fastest))}, "
                                    f"memory {T.format_ratio(T.ratio(mine_r['peak_mb'], smallest))}")
                    print("; ".join(line))


if __name__ == "__main__":
    sys.exit(main())
