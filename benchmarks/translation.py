"""Seconds per translated image of a :class:`~plasticine.translator.TraceableTranslator`.

The translator is :func:`plasticine.recipes.build_translator` with the settings ``plasticine demo``
had before it was trained unpaired (``BENCH_OPTIONS``: k-means structure map with 4 classes, the learned registration network with
the noise cue and scaling and squaring, a conditional U-Net with 16, 32, 32 channels, the paper's
linear schedule with K = 2000, DDIM with 10 steps, concatenation conditioning, start step
0.6 K), built for 2D at 128x128 and 256x256 and, with the same widths, for 3D at 64^3.
**The weights are random** (freshly initialised from a seed): the work per image does not depend
on the weights, so the timings are those of a trained translator; the images are not meaningful.

The inputs are the real BrainWeb T1 slice (``plasticine.data.brainweb_slices``) resized to the
benchmark size; the 3D input stacks the 64x64 slice 64 times, scaled by a smooth profile along the
first axis. For each size and sampler (the default DDIM with 10 steps, and DPM-Solver++ with 10 and
20 steps) the table gives the median wall time of one translation of one image (batch 1) and of
its parts: the structure map, the registration (predicting the deformation and integrating it)
and the sampling (conditioning and denoising from the start step); the total is timed on its own,
by ``translate``.

Goal (issue 6): a 256x256 translation under 10 s on 2 CPU cores.

Threads: the default is 2 torch threads (the goal's setting). On a shared machine whose cores are
busy, OpenMP's barriers can make 2 threads far slower than 1; then run with ``--threads 1``.

Usage::

    python benchmarks/translation.py                     # 2D 128, 256 and 3D 64^3 (minutes on 2 cores)
    python benchmarks/translation.py --quick             # 2D 128x128 only (< 1 min)
    python benchmarks/translation.py --device cuda --threads 8
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _timing as T  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)

from plasticine.data import brainweb_slices  # noqa: E402
from plasticine.recipes import build_translator  # noqa: E402

#: The timed translator's settings (:func:`~plasticine.recipes.build_translator`): a learned registration network, 10 DDIM steps.
BENCH_OPTIONS = dict(structure="kmeans", classes=4, prediction="eps", data_range=None, clip=False, start="source", start_fraction=0.6, sampler_steps=10)
from plasticine.diffusion import DPMSolverPP, noise_like  # noqa: E402

GOAL_SECONDS = 10.0
"""Goal for one 256x256 translation on 2 CPU cores, seconds."""


def make_input(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The real T1 slice resized to ``shape`` (2D), or stacked into a volume (3D).

    Args:
        shape: ``(H, W)`` or ``(D, H, W)``.
        device: where the image goes.

    Returns:
        A float32 image in ``[0, 1]``.

    Shape:
        out: ``(1, 1, *shape)``.
    """
    t1 = torch.from_numpy(brainweb_slices()["t1"]).to(torch.float32)[None, None] / 255.0
    plane = F.interpolate(t1, size=shape[-2:], mode="bilinear", antialias=True, align_corners=False)
    if len(shape) == 2:
        return plane.to(device)
    depth = shape[0]
    profile = torch.sin(torch.linspace(0.2, 3.0, depth)).clamp(min=0.1)
    return (plane[:, :, None] * profile.view(1, 1, depth, 1, 1)).contiguous().to(device)


def bench_case(shape: tuple[int, ...], device: torch.device, repeats: int, seed: int = 0) -> list[dict[str, Any]]:
    """Time the parts and the whole of one translation at one size, for each sampler.

    Args:
        shape: spatial size.
        device: where it runs.
        repeats: timed calls of each measurement at most.
        seed: seed of the weights and of the sampler's noise.

    Returns:
        One record per sampler, times in seconds.

    Shape:
        Not applicable.
    """
    translator = build_translator(len(shape), 1, **BENCH_OPTIONS, seed=seed)
    translator.to(device).eval()
    x = make_input(shape, device)
    k0 = translator.default_start_step
    budget = dict(warmup=1, repeats=repeats, min_repeats=1, max_seconds=20.0)
    with torch.no_grad():
        t_struct = T.time_callable(lambda: translator.structure_map(x), device, **budget)
        t_reg = T.time_callable(lambda: translator.registration.register(x), device, **budget)
        phi = translator.registration.register(x)
        warped = phi.to_target(translator.structure_map(x))
    records = []
    samplers = (("DDIM 10 (default)", translator.sampler), ("DPM-Solver++ 10", DPMSolverPP(10)), ("DPM-Solver++ 20", DPMSolverPP(20)))
    for name, sampler in samplers:
        t = translator.replace(sampler=sampler)

        def sample() -> torch.Tensor:
            g = torch.Generator(device).manual_seed(seed)
            with torch.no_grad():
                cond = t.conditioning(warped)
                start = t.schedule.q_sample(x, k0, noise_like(x, g))
                return t.sampler.sample(t.denoiser, t.schedule, cond, start, k0, g)

        def whole() -> Any:
            return t.translate(x, generator=torch.Generator(device).manual_seed(seed))

        t_sample = T.time_callable(sample, device, **budget)
        t_total = T.time_callable(whole, device, **budget)
        records.append(
            {
                "size": "x".join(map(str, shape)),
                "sampler": name,
                "start_step": k0,
                "structure_s": t_struct.median_ms / 1e3,
                "registration_s": t_reg.median_ms / 1e3,
                "sampling_s": t_sample.median_ms / 1e3,
                "total_s": t_total.median_ms / 1e3,
                "total_repeats": len(t_total.times_ms),
            }
        )
        print(f"  {records[-1]['size']:>9}  {name}: {records[-1]['total_s']:.2f} s", file=sys.stderr, flush=True)
    return records


def main() -> None:
    """Parse the options, run the cases, print the table (and optionally write JSON)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2D 128x128 only (under a minute)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2, the goal's setting)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls of each measurement at most")
    p.add_argument("--json", type=Path, default=None, help="also write the records here")
    args = p.parse_args()
    if args.threads < 1:
        raise ValueError(f"--threads: expected an int >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shapes: list[tuple[int, ...]] = [(128, 128)] if args.quick else [(128, 128), (256, 256), (64, 64, 64)]
    records: list[dict[str, Any]] = []
    for shape in shapes:
        records += bench_case(shape, device, args.repeats)
    print(f"translation, seconds per image (batch 1, random weights, median), {device}: {json.dumps(T.machine_summary(device))}")
    rows = [[r["size"], r["sampler"], str(r["start_step"]), f"{r['structure_s']:.3f}", f"{r['registration_s']:.3f}", f"{r['sampling_s']:.3f}", f"{r['total_s']:.3f}"] for r in records]
    print(T.format_table(["size", "sampler", "k0", "structure s", "registration s", "sampling s", "total s"], rows, ["<", "<", ">", ">", ">", ">", ">"]))
    goal = [r for r in records if r["size"] == "256x256" and r["sampler"].startswith("DDIM")]
    if goal:
        ok = goal[0]["total_s"] < GOAL_SECONDS
        print(f"goal: 256x256 translation under {GOAL_SECONDS:.0f} s on 2 CPU cores: {goal[0]['total_s']:.2f} s with {args.threads} thread(s) on {device} ({'met' if ok else 'not met'})")
    else:
        print(f"goal: 256x256 translation under {GOAL_SECONDS:.0f} s on 2 CPU cores (not measured with --quick)")
    if args.json is not None:
        args.json.write_text(json.dumps({"machine": T.machine_summary(device), "records": records}, indent=1))


if __name__ == "__main__":
    main()
