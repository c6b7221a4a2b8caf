"""Scaling and squaring with the lean backward against plain autograd and finite differences."""

from __future__ import annotations

import pytest
import torch
from conftest import make_generator
from hypothesis import given
from hypothesis import strategies as st

from plasticine.core import from_json, to_json
from plasticine.registration import ScalingAndSquaring, scaling_and_squaring

PADDINGS = ["border", "zeros", "reflection"]


def _velocity(seed: int, shape: tuple[int, ...], dtype=torch.float64, scale: float = 1.5) -> torch.Tensor:
    return (torch.randn(*shape, generator=make_generator(seed), dtype=dtype) * scale).requires_grad_(True)


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("shape", [(2, 2, 6, 7), (1, 3, 3, 4, 3)])
def test_gradcheck(shape, padding):
    v = _velocity(0, shape)
    # gradcheck runs several backwards through one graph (retain_graph): the second one recomputes
    assert torch.autograd.gradcheck(lambda x: scaling_and_squaring(x, 3, padding, memory="lean"), (v,))


@given(
    seed=st.integers(0, 2**31 - 1),
    ndim=st.sampled_from([2, 3]),
    batch=st.integers(1, 2),
    steps=st.integers(0, 7),
    padding=st.sampled_from(PADDINGS),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_same_output_and_gradient_as_autograd(seed, ndim, batch, steps, padding, dtype):
    shape = (batch, ndim) + ((9, 11) if ndim == 2 else (5, 6, 7))
    v = _velocity(seed, shape, dtype, scale=3.0)
    weight = torch.randn(*shape, generator=make_generator(seed + 1), dtype=dtype)
    outs, grads = [], []
    for memory in ("lean", "autograd"):
        out = scaling_and_squaring(v, steps, padding, memory=memory)
        (g,) = torch.autograd.grad((out * weight).sum(), v)
        outs.append(out.detach())
        grads.append(g)
    # the same operations on the same values, the gradient terms added in autograd's order
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(grads[0], grads[1])


def test_second_backward_through_the_same_graph():
    v = _velocity(3, (1, 2, 8, 8))
    out = scaling_and_squaring(v, 5, memory="lean")
    (g1,) = torch.autograd.grad(out.square().sum(), v, retain_graph=True)
    (g2,) = torch.autograd.grad(out.square().sum(), v)
    assert torch.equal(g1, g2)


def test_double_backward_is_refused():
    v = _velocity(4, (1, 2, 6, 6))
    out = scaling_and_squaring(v, 4, memory="lean")
    with pytest.raises(RuntimeError, match="differentiable once.*memory='autograd'"):
        torch.autograd.grad(out.square().sum(), v, create_graph=True)
    # the autograd path supports it
    out = scaling_and_squaring(v, 4, memory="autograd")
    (g,) = torch.autograd.grad(out.square().sum(), v, create_graph=True)
    (gg,) = torch.autograd.grad(g.sum(), v)
    assert torch.isfinite(gg).all()


def test_without_gradient_and_module_option():
    v = _velocity(5, (1, 3, 4, 5, 6)).detach()
    with torch.no_grad():
        ref = scaling_and_squaring(v, 6, memory="autograd")
    assert torch.equal(ScalingAndSquaring(6, memory="lean")(v), ref)
    m = ScalingAndSquaring(6, "zeros", memory="autograd")
    assert "memory='autograd'" in repr(m)
    assert from_json(to_json(m)).config == m.config
    with pytest.raises(ValueError, match="memory"):
        ScalingAndSquaring(7, memory="small")
    with pytest.raises(ValueError, match="memory"):
        scaling_and_squaring(v, 3, memory="checkpoint")


def test_gradient_reaches_a_non_leaf_velocity():
    base = _velocity(6, (1, 2, 7, 7))
    out = scaling_and_squaring(base * 2.0, 4, memory="lean")
    (g,) = torch.autograd.grad(out.sum(), base)
    out = scaling_and_squaring(base * 2.0, 4, memory="autograd")
    (ref,) = torch.autograd.grad(out.sum(), base)
    assert torch.equal(g, ref)


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 8, 12, 20])
def test_long_schedules_match_autograd(steps):
    v = _velocity(7, (1, 2, 6, 5), scale=2.0)
    weight = torch.randn(1, 2, 6, 5, generator=make_generator(8), dtype=torch.float64)
    grads = []
    for memory in ("lean", "autograd"):
        (g,) = torch.autograd.grad((scaling_and_squaring(v, steps, memory=memory) * weight).sum(), v)
        grads.append(g)
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("steps", range(1, 21))
def test_backward_holds_at_most_the_slots(steps, monkeypatch):
    # every step's field is produced exactly once, in order T-1, ..., 0, from the right values (and
    # its grid, when kept, equal to a rebuilt one), with at most _LEAN_SLOTS other tensors held at
    # every step (a kept grid counts as one), and no more squarings than fields not kept
    from plasticine.registration import integrators

    lean = integrators._LeanSquaring
    v = _velocity(9, (1, 2, 5, 6))
    with torch.no_grad():
        frame = integrators.NormalisedFrame(v, "linear", "border")
        ref = [lean.start(v, frame, steps)]
        for _ in range(steps - 1):
            ref.append(frame.sample(ref[-1], ref[-1]) + ref[-1])
    kept_by_forward = integrators._lean_kept(steps)
    assert len(kept_by_forward) <= 3
    seen, grids, original = [], [], lean.field
    reads, read = [], integrators.NormalisedFrame.read

    def field(velocity, frame, steps, i, kept):
        w, grid = original(velocity, frame, steps, i, kept)
        assert sum(1 if g is None else 2 for _, _, g in kept) <= integrators._LEAN_SLOTS
        assert all(k < i for k, _, _ in kept)
        seen.append(i)
        assert torch.equal(w, ref[i])
        if grid is not None:
            grids.append(i)
            assert torch.equal(grid, frame.grid(ref[i]))
        return w, grid

    def counting_read(self, field, grid):
        reads.append(1)
        return read(self, field, grid)

    monkeypatch.setattr(lean, "field", staticmethod(field))
    out = scaling_and_squaring(v, steps, memory="lean")
    monkeypatch.setattr(integrators.NormalisedFrame, "read", counting_read)
    torch.autograd.grad(out.sum(), v)
    assert seen == list(reversed(range(steps)))
    # up to T = 9 every field w_1 .. w_{T-1} not kept by the forward is recomputed exactly once
    # (the fewest squarings possible); longer schedules recompute some fields more than once
    if steps <= 9:
        assert len(reads) == max(0, steps - 1 - len(kept_by_forward))
    assert len(reads) <= steps * (steps - 1) // 2
    if steps == 7:
        assert grids == [3, 1]
