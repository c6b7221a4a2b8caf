"""Data parallelism: two gloo processes on the CPU train in step, resume, equal one process with the whole
batch, and write one checkpoint that loads in a single process."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from plasticine.checkpoint import load_state
from plasticine.training import ShuffledBatches, TrainConfig, Trainer, diffusion_objective

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo is needed")


def _regression_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 3, generator=g)
    return x, x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.1 * torch.randn(12, 1, generator=g)


def _linear_run(out: str, batch: int, steps: int = 4, rank: int | None = None, world: int | None = None, seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    net = torch.nn.Linear(3, 1)
    x, y = _regression_data()
    data = ShuffledBatches(list(zip(x, y)), batch, seed=1, rank=rank, world_size=world)
    objective = lambda m, b, g: (m(b[0]) - b[1]).square().mean()  # noqa: E731
    cfg = TrainConfig(steps=steps, checkpoint_path=out, checkpoint_every=2, progress="none")
    Trainer(objective, net, torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), data, cfg).fit()
    return net


def _translator():
    from test_translator import make_translator, phantom

    t = make_translator(structure=_ThresholdStructure())
    return t, torch.cat([phantom((8, 8), batch=2, seed=s) for s in range(2)])


class _ThresholdStructure(torch.nn.Module):
    def forward(self, image: torch.Tensor) -> torch.Tensor:
        fg = (image >= 0.4).to(image.dtype)
        return torch.cat([1 - fg, fg], 1)


def _worker(rank: int, world: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world)
    try:
        # two steps, then a new run (other initial weights) that resumes from the checkpoint up to four
        _linear_run(os.path.join(folder, "linear.pt"), batch=2, steps=2)
        net = _linear_run(os.path.join(folder, "linear.pt"), batch=2, steps=4, seed=1)
        torch.save(net.state_dict(), os.path.join(folder, f"linear{rank}.pt"))
        t, images = _translator()
        data = ShuffledBatches(images, 1, seed=2)
        cfg = TrainConfig(steps=2, checkpoint_path=os.path.join(folder, "denoiser.pt"), ema_decay=0.9, progress="none")
        objective = lambda m, y, g: diffusion_objective(t, y, g, denoiser=m)  # noqa: E731
        trainer = Trainer(objective, t.denoiser, torch.optim.Adam(t.denoiser.parameters(), lr=1e-3), data, cfg)
        assert isinstance(trainer.wrapped, torch.nn.parallel.DistributedDataParallel)
        trainer.fit()
        torch.save(t.denoiser.state_dict(), os.path.join(folder, f"denoiser{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes(tmp_path):
    folder = str(tmp_path)
    mp.spawn(_worker, args=(2, folder), nprocs=2, join=True)
    lin = [torch.load(tmp_path / f"linear{r}.pt", weights_only=True) for r in range(2)]
    den = [torch.load(tmp_path / f"denoiser{r}.pt", weights_only=True) for r in range(2)]
    for a, b in ((lin[0], lin[1]), (den[0], den[1])):  # DDP keeps the ranks in step
        assert all(torch.equal(a[k], b[k]) for k in a)

    # one process with the whole batch (2 x 2 items), never interrupted, takes the same steps
    single = _linear_run(str(tmp_path / "single.pt"), batch=4, rank=0, world=1)
    assert load_state(tmp_path / "linear.pt")["step"] == 4
    for k, v in single.state_dict().items():
        torch.testing.assert_close(lin[0][k], v, rtol=1e-6, atol=1e-6)

    # the checkpoint, written by rank 0 only, loads in one process
    state = load_state(tmp_path / "denoiser.pt")
    assert state["step"] == 2 and state["world_size"] == 2 and len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["generator"], state["rng"][1]["generator"])  # own noise per rank
    t, images = _translator()
    t.denoiser.load_state_dict(state["model"])
    assert all(torch.equal(t.denoiser.state_dict()[k], v) for k, v in den[0].items())
    assert set(state["ema"]["shadow"]) == {n for n, _ in t.denoiser.named_parameters()}
    loss = diffusion_objective(t, images, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == sorted(["linear.pt", "linear0.pt", "linear1.pt", "denoiser.pt", "denoiser0.pt", "denoiser1.pt", "single.pt"])
