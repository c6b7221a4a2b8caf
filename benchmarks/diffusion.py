"""Speed of the conditional U-Net against diffusers, and few-step translation against the paper's sampler.

One run measures, on one device:

1. **Seconds per denoising step** of :class:`plasticine.diffusion.ConditionalUNet` and of diffusers'
   ``UNet2DModel`` at about the same parameter count, at 64x64 and 128x128, batch 1, one image and one
   condition channel (``in_channels=2`` for diffusers, which takes the concatenation). Two matched
   pairs: one residual block per level (plasticine's default against ``layers_per_block=1``) and two
   (``num_res_blocks=2`` against ``layers_per_block=2``); both nets have channels (32, 64, 64) and
   attention only at the coarsest level. plasticine stores its convolution weights channels-last by
   default; diffusers is timed as it comes and also converted to channels-last (same weights).
   Calls alternate between the nets so that load on a shared machine hits all alike; the median
   of each is reported with the ratios plasticine / diffusers (below 1: plasticine is faster).
2. **A translation-style sampling** at 128x128 (64x64 with ``--quick``) with the default U-Net:
   start from a clean source image noised to the middle of the paper's schedule (linear betas
   1e-6..1e-2, K = 2000, ``start_step = 1000``), then DDIM (50 steps, eta 0) and DPM-Solver++(2M)
   (10, 15, 20 steps); the wall time of the whole call.
3. **Accuracy of the few-step samplers** against the paper's sampler, the 1000-step ancestral
   (DDPM) chain from the same start. The weights of an untrained U-Net would make this difference
   meaningless, so this part uses the exact noise predictor of a Gaussian image model around the
   real BrainWeb PD slice, :math:`y_0 \\sim \\mathcal{N}(m, s^2 I)` with ``m`` the PD slice in
   [-1, 1] and ``s = 0.05``:
   :math:`\\epsilon^*(y, \\gamma) = \\sqrt{1-\\gamma}\\,(y - \\sqrt\\gamma\\, m) / (\\gamma s^2 + 1 - \\gamma)`,
   starting from the T1 slice (217x181, the uneven real size). For it the probability-flow ODE
   has the closed-form end point :math:`m + s (y_k - \\sqrt{\\gamma_k} m) / \\sqrt{\\gamma_k s^2 + 1 - \\gamma_k}`,
   reported as the exact target of DDIM and DPM-Solver++; the spread of two ancestral chains with
   different seeds is the floor of any difference to an ancestral sample.

Usage::

    python benchmarks/diffusion.py            # full run
    python benchmarks/diffusion.py --quick    # one block per level, fewer repeats, 64x64 translation (< 1 min)
    python benchmarks/diffusion.py --device cuda --json out.json

A part whose plasticine pieces do not exist is reported as ``missing``; diffusers not installed is
reported as ``unavailable``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _timing as T  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)

from plasticine.diffusion.unet import ConditionalUNet, UNetConfig  # noqa: E402

START_STEP = 1000
GAUSSIAN_STD = 0.05


def count(module: torch.nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in module.parameters())


def diffusers_unet(layers_per_block: int) -> torch.nn.Module:
    """diffusers' UNet2DModel with channels (32, 64, 64), attention at the coarsest level, 2 inputs, 1 output."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)  # diffusers draws its initial weights from the global generator
    return UNet2DModel(
        in_channels=2,
        out_channels=1,
        block_out_channels=(32, 64, 64),
        layers_per_block=layers_per_block,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )


def interleaved_medians(fns: dict[str, Callable[[], Any]], device: torch.device, rounds: int, warmup: int = 2) -> dict[str, T.Timing]:
    """Time each callable once per round, alternating, and return each one's timing over the rounds."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].extend(T.time_callable(fn, device, warmup=0, repeats=1, min_repeats=1).times_ms)
    return {k: T.Timing(statistics.median(v), min(v), tuple(v), warmup) for k, v in times.items()}


def step_speed(device: torch.device, sizes: tuple[int, ...], block_counts: tuple[int, ...], rounds: int) -> list[dict[str, Any]]:
    """Part 1: milliseconds per denoising step, plasticine against diffusers."""
    try:
        import diffusers  # noqa: F401
    except Exception as exc:  # noqa: BLE001  (reported, not fatal)
        print(f"diffusers: unavailable ({type(exc).__name__}: {exc})")
        return []
    rows = []
    for blocks in block_counts:
        ours = ConditionalUNet(UNetConfig(num_res_blocks=blocks), generator=torch.Generator().manual_seed(0)).to(device).eval()
        theirs = diffusers_unet(blocks).to(device).eval()
        theirs_cl = diffusers_unet(blocks).to(device).eval().to(memory_format=torch.channels_last)
        theirs_cl.load_state_dict(theirs.state_dict())
        for size in sizes:
            g = torch.Generator().manual_seed(size)
            x = torch.randn(1, 1, size, size, generator=g).to(device)
            c = torch.randn(1, 1, size, size, generator=g).to(device)
            xc = torch.cat([x, c], dim=1)
            xc_cl = xc.contiguous(memory_format=torch.channels_last)
            gamma = torch.tensor([0.5], device=device)
            t = torch.tensor([500], device=device)
            with torch.inference_mode():
                res = interleaved_medians(
                    {
                        "plasticine": lambda: ours(x, gamma, c),
                        "diffusers": lambda: theirs(xc, t).sample,
                        "diffusers_cl": lambda: theirs_cl(xc_cl, t).sample,
                    },
                    device,
                    rounds,
                )
            rows.append(
                {
                    "blocks_per_level": blocks,
                    "size": size,
                    "params_plasticine": count(ours),
                    "params_diffusers": count(theirs),
                    "ms_plasticine": res["plasticine"].median_ms,
                    "ms_diffusers": res["diffusers"].median_ms,
                    "ms_diffusers_channels_last": res["diffusers_cl"].median_ms,
                    "ratio": T.ratio(res["plasticine"].median_ms, res["diffusers"].median_ms),
                    "ratio_channels_last": T.ratio(res["plasticine"].median_ms, res["diffusers_cl"].median_ms),
                }
            )
    print("\nPer denoising step (batch 1, 1 image + 1 condition channel), median ms:")
    print(
        T.format_table(
            ["blocks/level", "size", "params ours", "params diffusers", "ours ms", "diffusers ms", "ours/diffusers",
             "diffusers channels_last ms", "ours/that"],
            [
                [str(r["blocks_per_level"]), f"{r['size']}x{r['size']}", f"{r['params_plasticine']:,}", f"{r['params_diffusers']:,}",
                 T.format_ms(r["ms_plasticine"]), T.format_ms(r["ms_diffusers"]), T.format_ratio(r["ratio"]),
                 T.format_ms(r["ms_diffusers_channels_last"]), T.format_ratio(r["ratio_channels_last"])]
                for r in rows
            ],
            align=["<", "<", ">", ">", ">", ">", ">", ">", ">"],
        )
    )
    return rows


def _samplers() -> dict[str, Any] | None:
    try:
        from plasticine.diffusion import AncestralSampler, DDIMSampler, DPMSolverPP, LinearSchedule, noise_like
    except ImportError as exc:
        print(f"samplers: missing ({exc})")
        return None
    return {"Ancestral": AncestralSampler, "DDIM": DDIMSampler, "DPMSolverPP": DPMSolverPP, "LinearSchedule": LinearSchedule, "noise_like": noise_like}


def _brainweb(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The real T1 (source) and PD (target) slices in [-1, 1], ``(1, 1, 217, 181)`` each."""
    import numpy as np

    from plasticine.data import brainweb_slices

    d = brainweb_slices()
    t1, pd = (torch.from_numpy(d[k].astype(np.float32) / 127.5 - 1.0)[None, None].to(device) for k in ("t1", "pd"))
    return t1, pd


def translation_time(device: torch.device, size: int, repeats: int) -> list[dict[str, Any]]:
    """Part 2: wall time of a whole translation-style sampling with the default U-Net."""
    S = _samplers()
    if S is None:
        return []
    net = ConditionalUNet(UNetConfig(), generator=torch.Generator().manual_seed(0)).to(device).eval()
    schedule = S["LinearSchedule"]()
    t1, _ = _brainweb(device)
    top, left = (217 - size) // 2, (181 - size) // 2 if size <= 181 else 0
    src = torch.nn.functional.interpolate(t1, size=(size, size), mode="bilinear", align_corners=False) if size > 181 else t1[..., top : top + size, left : left + size]
    cond = src.clone()  # stands for the warped structure map: one condition channel
    rows = []
    for name, sampler in (("DDIM 50", S["DDIM"](steps=50)), ("DPM-Solver++ 10", S["DPMSolverPP"](steps=10)),
                          ("DPM-Solver++ 15", S["DPMSolverPP"](steps=15)), ("DPM-Solver++ 20", S["DPMSolverPP"](steps=20))):
        def run() -> torch.Tensor:
            g = torch.Generator().manual_seed(0)
            start = schedule.q_sample(src, START_STEP, S["noise_like"](src, g))
            return sampler.sample(net, schedule, cond, start, START_STEP, g)

        with torch.inference_mode():
            tm = T.time_callable(run, device, warmup=1 if repeats > 1 else 0, repeats=repeats, min_repeats=1)
        rows.append({"sampler": name, "size": size, "seconds": tm.median_ms / 1e3})
    print(f"\nTranslation at {size}x{size} from step {START_STEP} of 2000 with the default U-Net ({count(net):,} parameters), median s:")
    print(T.format_table(["sampler", "seconds", "ms / step"],
                         [[r["sampler"], f"{r['seconds']:.2f}", T.format_ms(1e3 * r["seconds"] / int(r["sampler"].split()[-1]))] for r in rows],
                         align=["<", ">", ">"]))
    return rows


class GaussianOracle:
    """Exact noise predictor of the image model ``y0 ~ N(m, s^2 I)`` (a Denoiser)."""

    def __init__(self, mean: torch.Tensor, std: float) -> None:
        self.mean, self.var = mean, std**2

    def __call__(self, noisy: torch.Tensor, gamma: torch.Tensor, condition: torch.Tensor | None) -> torch.Tensor:
        g = gamma.to(noisy.dtype).view(-1, *([1] * (noisy.dim() - 1)))
        return (1 - g).sqrt() * (noisy - g.sqrt() * self.mean) / (g * self.var + 1 - g)


def sampler_accuracy(device: torch.device) -> list[dict[str, Any]]:
    """Part 3: few-step samplers against the 1000-step ancestral chain, with an exact denoiser."""
    S = _samplers()
    if S is None:
        return []
    schedule = S["LinearSchedule"]()
    t1, pd = _brainweb(device)
    t1, pd = t1.double(), pd.double()
    oracle = GaussianOracle(pd, GAUSSIAN_STD)
    gk = float(schedule.gammas[START_STEP])

    def noised(seed: int) -> torch.Tensor:
        # the start of run(seed): the noise is the first draw from the generator
        noise = torch.randn(t1.shape, generator=torch.Generator().manual_seed(seed), dtype=t1.dtype).to(device)
        return math.sqrt(gk) * t1 + math.sqrt(1 - gk) * noise

    exact_ode = pd + GAUSSIAN_STD * (noised(0) - math.sqrt(gk) * pd) / math.sqrt(gk * GAUSSIAN_STD**2 + 1 - gk)

    def run(sampler: Any, seed: int) -> tuple[torch.Tensor, float]:
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(seed)
        start = schedule.q_sample(t1, START_STEP, S["noise_like"](t1, g))
        out = sampler.sample(oracle, schedule, None, start, START_STEP, g)
        return out, time.perf_counter() - t0

    ref, _ = run(S["Ancestral"](), 0)
    ref2, _ = run(S["Ancestral"](), 1)
    mae = lambda a, b: float((a - b).abs().mean())  # noqa: E731
    rows = [{"sampler": "Ancestral 1000 (seed 1)", "mae_to_ancestral": mae(ref2, ref), "mae_to_exact_ode": mae(ref2, exact_ode)}]
    for name, sampler in (("DDIM 50", S["DDIM"](steps=50)), ("DPM-Solver++ 10", S["DPMSolverPP"](steps=10)),
                          ("DPM-Solver++ 15", S["DPMSolverPP"](steps=15)), ("DPM-Solver++ 20", S["DPMSolverPP"](steps=20))):
        out, _ = run(sampler, 0)
        rows.append({"sampler": name, "mae_to_ancestral": mae(out, ref), "mae_to_exact_ode": mae(out, exact_ode)})
    print(f"\nSampler accuracy on the real 217x181 slices (exact Gaussian denoiser around PD, s={GAUSSIAN_STD}, "
          f"start T1 at step {START_STEP}; images in [-1, 1]); mean absolute difference:")
    print(T.format_table(["sampler", "to ancestral 1000 (seed 0)", "to exact ODE end point"],
                         [[r["sampler"], f"{r['mae_to_ancestral']:.2e}", f"{r['mae_to_exact_ode']:.2e}"] for r in rows],
                         align=["<", ">", ">"]))
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its tables (and write JSON when asked)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one matched pair, fewer repeats, a 64x64 translation (under a minute)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    info = T.machine_summary(device)
    print("machine:", json.dumps(info))
    t0 = time.perf_counter()
    results = {
        "machine": info,
        "step": step_speed(device, (64, 128), (1,) if args.quick else (1, 2), rounds=5 if args.quick else 15),
        "translation": translation_time(device, 64 if args.quick else 128, repeats=1 if args.quick else 3),
        "accuracy": sampler_accuracy(device),
    }
    info_after = T.machine_summary(device)
    load = info_after.get("load_average")
    print(f"\nTotal {time.perf_counter() - t0:.0f} s; load average at the end {load} on {info_after['cpu_count']} CPUs")
    if load is not None and load[0] > (info_after["cpu_count"] or 1):
        print("note: measured under load (load average above the CPU count): times are inflated and noisy; compare ratios")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
