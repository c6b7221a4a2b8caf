"""How the start step trades faithfulness to the source against realism: a figure.

Loads the translator shipped with ``plasticine demo`` (T1 -> PD-like contrast with enlarged
ventricles, trained unpaired on the real BrainWeb slice), translates the real T1 slice from several
start steps ``k0`` (0.2, 0.4, 0.6, 0.8 and 1.0 of ``K``; the demo's default is 1.0, pure noise, in
the geometry of the warped source) with the same noise seed,
and saves the translations in a row, each titled with ``k0`` and ``sqrt(gamma_k0)``: the noised
start is ``sqrt(gamma_k0) x + sqrt(1 - gamma_k0) eps``, so ``sqrt(gamma_k0)`` is how much of the
source survives into the start. For a translator that predicts the noise unclipped a small
``k0`` keeps the source's intensities and a large one only what the condition (the warped
structure map) carries; the demo's translator predicts the clean image and clips it, so its
translations barely depend on ``k0``. It also prints, for each ``k0``, the mean absolute
difference from the source.

Run:
    python examples/start_step_figure.py                          # writes docs/_static/start_step.png
    python examples/start_step_figure.py --small --outdir /tmp/x  # 4 sampler steps (what CI runs)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from plasticine.checkpoint import load_translator
from plasticine.data import brainweb_slices
from plasticine.demo import DemoConfig, _resample, shipped_checkpoint

FRACTIONS = (0.2, 0.4, 0.6, 0.8, 1.0)


def main() -> None:
    """Translate at several start steps, print the numbers, save the figure."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="4 sampler steps instead of the demo's 20 (what CI runs)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampler's noise (the same for every start step)")
    parser.add_argument("--outdir", type=Path, default=Path("docs/_static"), help="where start_step.png goes")
    args = parser.parse_args()
    t_start = time.perf_counter()

    # the shipped translator and the real T1 slice on the demo's working grid (in [0, 1])
    translator = load_translator(shipped_checkpoint())
    if args.small:  # the same sampler (parametrisation, clipping), fewer steps
        s = translator.sampler
        translator = translator.replace(sampler=type(s).from_config({**s.config, "steps": 4}))
    x = _resample(brainweb_slices()["t1"] / 255.0, DemoConfig().shape).to(torch.float32)
    K = translator.num_steps
    gammas = translator.schedule.gammas

    rows = []
    for fraction in FRACTIONS:
        k0 = int(round(fraction * K))
        result = translator.translate(x, start_step=k0, generator=torch.Generator().manual_seed(args.seed))
        kept = float(gammas[k0].sqrt())
        mad = float((result.image - x).abs().mean())
        rows.append((fraction, k0, kept, result.image[0, 0].clamp(0, 1)))
        print(f"start step {k0:5d} ({fraction:.1f} K)  sqrt(gamma) = {kept:.3f}  mean |translation - source| = {mad:.3f}")

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("figure skipped: matplotlib is not installed (pip install 'plasticine[plot]')")
        print(f"done in {time.perf_counter() - t_start:.1f} s")
        return
    args.outdir.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(rows) + 1, figsize=(2.3 * (len(rows) + 1), 3.0))
    axes[0].imshow(x[0, 0].numpy(), cmap="gray", vmin=0, vmax=1)
    axes[0].set_title("source (real T1)", fontsize=9)
    for ax, (fraction, k0, kept, image) in zip(axes[1:], rows):
        ax.imshow(image.numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_title(f"k0 = {k0} ({fraction:.1f} K)\nsqrt(gamma) = {kept:.2f}", fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(f"start step: T1 -> PD-like translation, DDIM {getattr(translator.sampler, 'steps', '?')} steps, K = {K}", fontsize=9)
    fig.tight_layout()
    path = args.outdir / "start_step.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    print(f"wrote {path} ({path.stat().st_size / 1e3:.0f} kB) in {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main()
