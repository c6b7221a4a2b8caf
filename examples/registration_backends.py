"""Train the registration network on generated pairs from real anatomy, save, reload, swap backends.

Every training pair is exact truth built from the real BrainWeb slices: the source is the T1 slice
under a random smooth deformation psi (for variety), the target is the real PD slice of the same
anatomy under psi o phi with another random diffeomorphism phi, so that ``source o phi`` and
``target`` show the same anatomy in two contrasts. The network
(:class:`~plasticine.registration.network.RegistrationNet`, without the noise cue since no diffusion
model is involved here) runs at half resolution and learns from the paper's objective (symmetric
mutual information, smoothness) plus, since phi is known, the squared error of its velocity.

It is then saved (weights as a plain state dict, loaded with ``weights_only=True``; config as JSON),
reloaded, and one registration call is made with three backends, each swapped in one line, on
held-out cases, printing endpoint error, folding, inverse consistency and time per pair.

Run:
    python examples/registration_backends.py            # a few minutes of training on 2 cores
    python examples/registration_backends.py --small    # seconds (what CI runs)
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from plasticine.core import compose, warp
from plasticine.core.filters import resize, resize_field
from plasticine.data import brainweb_slices
from plasticine.data.synthetic import random_deformation
from plasticine.registration.integrators import ScalingAndSquaring
from plasticine.registration.iterative import IterativeRegistration
from plasticine.registration.network import LearnedRegistration, RegistrationNet, RegistrationNetConfig, registration_objective


def real_slices() -> tuple[torch.Tensor, torch.Tensor]:
    d = brainweb_slices()
    return tuple(torch.from_numpy(d[k].astype(np.float32))[None, None] / 255.0 for k in ("t1", "pd"))


def make_pair(t1, pd, generator, max_norm, vary=True):
    """(source, target, true velocity, true forward displacement): source o phi ~ target."""
    phi = random_deformation(t1.shape[2:], max_norm, generator=generator)
    if not vary:
        return t1, phi.to_target(pd), phi.velocity, phi.forward
    psi = random_deformation(t1.shape[2:], 4.0, generator=generator)
    return psi.to_target(t1), warp(pd, compose(psi.forward, phi.forward)), phi.velocity, phi.forward


def make_pool(t1, pd, generator, size, max_norm, shape, vary):
    """``size`` generated cases resized to the network grid ``shape``: sources, targets, true velocities."""
    cases = [make_pair(t1, pd, generator, max_norm, vary=vary) for _ in range(size)]
    x, y = (resize(torch.cat([c[i] for c in cases]), shape) for i in (0, 1))
    return x, y, resize_field(torch.cat([c[2] for c in cases]), shape)


def network_config(args) -> RegistrationNetConfig:
    """A small U-Net of three levels with group normalisation, predicting v on a grid 2x coarser."""
    w = args.width
    return RegistrationNetConfig(cue_channels=0, features=w, encoder=(w, 2 * w, 2 * w), align_channels=w, velocity_level=1, norm_groups=4)


def train(args, t1, pd) -> RegistrationNet:
    """Supervised velocity error (plus the alignment term) first, then the paper's objective is added.

    The cases come from a pool generated once (generation costs as much as a step), a few of which
    are replaced by fresh ones at every step, so that the network keeps seeing new deformations.
    """
    torch.manual_seed(args.seed)
    net = RegistrationNet(network_config(args))
    backend = LearnedRegistration(net, downsample=args.downsample)
    small = backend.network_shape(tuple(t1.shape[2:]))
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    X, Y, V = make_pool(t1, pd, g, args.pool, args.max_norm, small, args.vary)
    print(f"pool of {args.pool} cases at {small[0]}x{small[1]} generated in {time.perf_counter() - t0:.0f} s", flush=True)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    ss = ScalingAndSquaring()
    start = round(args.objective_from * args.steps)
    t0, run = time.perf_counter(), []
    for step in range(args.steps):
        if args.refresh:
            slots = torch.randint(0, args.pool, (args.refresh,), generator=g)
            X[slots], Y[slots], V[slots] = make_pool(t1, pd, g, args.refresh, args.max_norm, small, args.vary)
        idx = torch.randint(0, args.pool, (args.batch,), generator=g)
        x, y, v_true = X[idx], Y[idx], V[idx]
        if step >= start:
            terms = registration_objective(net, ss, x, y, smoothness_weight=0.1, align_weight=0.1)
            velocity, objective = terms["velocity"], args.objective_weight * terms["total"]
        else:
            out = net(x, y)
            velocity, objective = out.velocity, 0.1 * (out.aligned_features - out.reference_features.detach()).pow(2).mean()
        supervised = (velocity - v_true).pow(2).sum(1).mean()
        loss = supervised + objective
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        run.append(supervised.item())
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            rms = args.downsample * np.sqrt(np.mean(run[-50:]))
            print(f"step {step:5d}  loss {loss.item():8.4f}  velocity error {rms:.3f} vx (rms, full-size voxels)  ({time.perf_counter() - t0:.0f} s)", flush=True)
    return net.eval()


def save(net: RegistrationNet, folder: Path) -> None:
    """Weights and config, each written to a temporary file and renamed (never half-written)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, write in (("weights.pt", lambda f: torch.save(net.state_dict(), f)), ("config.json", lambda f: f.write(json.dumps(dataclasses.asdict(net.config)).encode()))):
        fd, tmp = tempfile.mkstemp(dir=folder)
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, folder / name)


def load(folder: Path) -> RegistrationNet:
    cfg = json.loads((folder / "config.json").read_text())
    cfg["encoder"] = tuple(cfg["encoder"])
    net = RegistrationNet(RegistrationNetConfig(**cfg))
    net.load_state_dict(torch.load(folder / "weights.pt", weights_only=True))
    return net.eval()


def evaluate(name, backend, cases) -> None:
    errs, folds, ics, secs = [], [], [], []
    for source, target, _, truth, brain in cases:
        t = time.perf_counter()
        with torch.no_grad():
            d = backend.register(source, target)
        secs.append(time.perf_counter() - t)
        errs.append(float((d.forward - truth).norm(dim=1, keepdim=True)[brain].mean()))
        folds.append(float(d.folding_fraction()))
        ics.append(float(d.inverse_consistency()))
    print(f"{name:10s} EPE {np.mean(errs):.3f} vx   folding {np.mean(folds):.4f}   inv.cons. {np.mean(ics):.4f} vx   {1000 * np.mean(secs):7.1f} ms/pair")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="a few training steps at a small size")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--pool", type=int, default=256, help="generated cases held at once")
    p.add_argument("--refresh", type=int, default=1, help="cases of the pool replaced by fresh ones at each step")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--objective-from", type=float, default=1.0, help="fraction of the steps after which the paper's objective is added")
    p.add_argument("--objective-weight", type=float, default=1.0, help="weight of the paper's objective once added")
    p.add_argument("--max-norm", type=float, default=10.0)
    p.add_argument("--downsample", type=int, default=8, help="the network runs at 1/downsample of the image size")
    p.add_argument("--vary", action="store_true", help="also deform the source anatomy of each training pair")
    p.add_argument("--cases", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--outdir", type=Path, default=Path("registration_model"), help="where the model is saved")
    args = p.parse_args()
    t1, pd = real_slices()
    if args.small:
        args.steps, args.batch, args.width, args.cases, args.pool, args.downsample = 3, 2, 4, 1, 4, 4
        t1, pd = resize(t1, (72, 60)), resize(pd, (72, 60))
    net = train(args, t1, pd)
    save(net, args.outdir)
    net = load(args.outdir)
    print(f"saved and reloaded from {args.outdir}/")

    g = torch.Generator().manual_seed(10_000 + args.seed)  # held-out cases
    cases = []
    for _ in range(args.cases):
        source, target, v, fwd = make_pair(t1, pd, g, args.max_norm, vary=False)
        cases.append((source, target, v, fwd, warp((t1 > 0.05).float(), fwd) > 0.5))

    backend = LearnedRegistration(net, downsample=args.downsample)
    evaluate("learned", backend, cases)
    backend = IterativeRegistration()
    evaluate("iterative", backend, cases)
    if importlib.util.find_spec("ants") is not None:
        from plasticine.registration.ants import AntsRegistration

        backend = AntsRegistration()
        evaluate("ants", backend, cases)
    else:
        print("ants      skipped: pip install 'plasticine[ants]'")


if __name__ == "__main__":
    main()
