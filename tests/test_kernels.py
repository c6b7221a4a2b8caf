"""The Triton kernels against the eager path, and the choice between them.

The kernel tests need triton and either CUDA or Triton's interpreter. ``TRITON_INTERPRET`` must be
set before triton is imported, so on a CPU machine :func:`test_kernels_through_interpreter` runs
this file again in a child pytest with ``TRITON_INTERPRET=1``, where the kernels execute on CPU
tensors; in this process they are skipped with that reason.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from plasticine.core import kernels, warp
from plasticine.losses import box_sum, joint_histogram, local_ncc, mutual_information
from plasticine.registration import scaling_and_squaring

HAVE_TRITON = importlib.util.find_spec("triton") is not None
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
RUN_HERE = HAVE_TRITON and (INTERPRETED or torch.cuda.is_available())
DEVICE = "cpu" if INTERPRETED or not torch.cuda.is_available() else "cuda"
REPO = Path(__file__).resolve().parents[1]

if not HAVE_TRITON:
    _WHY = "triton is not installed (the optional extra 'triton')"
else:
    _WHY = "the kernels run on CPU only through Triton's interpreter: see test_kernels_through_interpreter"
needs_kernels = pytest.mark.skipif(not RUN_HERE, reason=_WHY)

SHAPES = {2: (9, 11), 3: (5, 6, 7)}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _both(fn, *leaves):
    """``fn`` under the eager and the Triton backend: outputs and gradients of every leaf (same upstream gradient)."""
    results = []
    for name in ("eager", "triton"):
        xs = [x.detach().clone().requires_grad_(x.requires_grad) for x in leaves]
        with kernels.backend(name):
            out = fn(*xs)
            upstream = torch.randn(out.shape, generator=_gen(7), dtype=out.dtype).to(out.device)
            needs = [x for x in xs if x.requires_grad]
            grads = torch.autograd.grad((out * upstream).sum(), needs) if needs else ()
        results.append((out.detach(), [g.detach() for g in grads]))
    return results


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> None:
    scale = max(1.0, float(a.abs().max()))
    assert a.shape == b.shape and a.dtype == b.dtype
    assert torch.allclose(a, b, atol=tol * scale, rtol=0), f"max difference {float((a - b).abs().max())} (scale {scale})"


def _assert_same(results, tol: float = 1e-5) -> None:
    (out_e, grads_e), (out_t, grads_t) = results
    _close(out_e, out_t, tol)
    assert len(grads_e) == len(grads_t)
    for ge, gt in zip(grads_e, grads_t):
        _close(ge, gt, tol)


# ----------------------------------------------------------------------------------------------
# The choice of path (no kernel runs)


def test_backend_rejects_unknown_names():
    with pytest.raises(ValueError, match="backend: expected one of"):
        with kernels.backend("cuda"):
            pass


def test_backend_blocks_nest_and_restore():
    x = torch.zeros(1)
    assert kernels.selected(x) == "eager"  # auto: the kernels for CUDA tensors only
    with kernels.backend("eager"):
        assert kernels.selected(x) == "eager"
        with kernels.backend("auto"):
            assert kernels.selected(x) == "eager"
        assert kernels.selected(x) == "eager"


@pytest.mark.skipif(INTERPRETED, reason="the interpreter runs the kernels on CPU tensors")
def test_forcing_triton_on_a_cpu_tensor_is_refused():
    with kernels.backend("triton"):
        with pytest.raises(ValueError, match="backend\\('triton'\\)"):
            warp(torch.zeros(1, 1, 4, 4), torch.zeros(1, 2, 4, 4))


def test_tensors_too_large_for_int32_offsets_run_eagerly_or_are_refused():
    huge = torch.zeros(1).expand(2**31)  # no memory behind the elements
    assert kernels.selected(huge) == "eager"
    with kernels.backend("triton"):
        with pytest.raises(ValueError, match="int32"):
            kernels.selected(huge)


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_compiled_callers_trace_the_eager_path_without_graph_breaks(backend):
    """The dispatch adds no graph break: torch.compile(fullgraph=True) of the callers succeeds."""
    x = torch.rand(1, 1, 12, 12, generator=_gen(1))
    y = x**2 + 0.1 * torch.rand(1, 1, 12, 12, generator=_gen(2))

    def losses(a, b):
        return local_ncc(a, b, window=5) + mutual_information(a, b, bins=8)

    with kernels.backend(backend):
        compiled = torch.compile(losses, fullgraph=True, backend="eager")(x, y)
    with kernels.backend("eager"):
        assert torch.allclose(compiled, losses(x, y), atol=1e-6)


def test_importing_the_library_does_not_import_triton():
    code = "import sys, plasticine.core.kernels, plasticine.losses, plasticine.registration; print('triton' in sys.modules)"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_gpu_benchmark_without_cuda_says_so():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the benchmark would run")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu.py")], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 2
    assert "needs a CUDA device" in out.stderr
    assert out.stdout == ""


@pytest.mark.skipif(not HAVE_TRITON or INTERPRETED, reason=_WHY if not HAVE_TRITON else "already interpreted")
def test_kernels_through_interpreter():
    """Every kernel test below, in a child pytest with ``TRITON_INTERPRET=1`` (kernels on CPU tensors)."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", __file__, "-k", "kernel_"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=600,
    )
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    assert " passed" in out.stdout and "skipped" not in out.stdout, out.stdout[-3000:]


# ----------------------------------------------------------------------------------------------
# Warp


@needs_kernels
@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("mode", ["linear", "nearest"])
@pytest.mark.parametrize("padding", ["border", "zeros"])
def test_kernel_warp_equals_eager(ndim, mode, padding):
    g = _gen(ndim)
    image = torch.randn(2, 3, *SHAPES[ndim], generator=g).to(DEVICE).requires_grad_(True)
    u = (2.5 * torch.randn(2, ndim, *SHAPES[ndim], generator=g)).to(DEVICE).requires_grad_(mode == "linear")
    _assert_same(_both(lambda i, d: warp(i, d, mode, padding), image, u))


@needs_kernels
@pytest.mark.parametrize("ndim", [2, 3])
def test_kernel_warp_one_field_for_the_batch(ndim):
    g = _gen(10 + ndim)
    image = torch.randn(3, 2, *SHAPES[ndim], generator=g).to(DEVICE).requires_grad_(True)
    u = (1.5 * torch.randn(1, ndim, *SHAPES[ndim], generator=g)).to(DEVICE).requires_grad_(True)
    _assert_same(_both(lambda i, d: warp(i, d, "linear", "zeros"), image, u))


@needs_kernels
@settings(max_examples=5, phases=[Phase.explicit, Phase.reuse, Phase.generate])  # the interpreter makes shrinking slow
@given(
    shape=st.lists(st.integers(1, 6), min_size=2, max_size=3),
    amplitude=st.floats(0.0, 4.0),
    seed=st.integers(0, 2**16),
    padding=st.sampled_from(["border", "zeros"]),
)
def test_kernel_warp_property_equals_eager(shape, amplitude, seed, padding):
    """Any size (axes of size 1 included), any amplitude: kernel and eager warp agree, value and gradient.

    Positions keep a fraction in [0.05, 0.95]: at an integer position the interpolation has a
    kink, where the kernel takes the derivative from the right and ``grid_sample`` one side or
    the other, depending on how the normalised coordinate rounds.
    """
    g = _gen(seed)
    n = len(shape)
    image = torch.randn(1, 2, *shape, generator=g).to(DEVICE).requires_grad_(True)
    whole = (amplitude * torch.randn(1, n, *shape, generator=g)).round()
    u = (whole + 0.05 + 0.9 * torch.rand(1, n, *shape, generator=g)).to(DEVICE).requires_grad_(True)
    _assert_same(_both(lambda i, d: warp(i, d, "linear", padding), image, u))


@needs_kernels
def test_kernel_warp_gradcheck_float64():
    g = _gen(3)
    for n, padding in ((2, "border"), (3, "zeros")):
        shape = (3, 4) if n == 2 else (2, 3, 3)
        image = torch.randn(1, 1, *shape, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_(True)
        u = (0.7 * torch.randn(1, n, *shape, generator=g, dtype=torch.float64)).to(DEVICE).requires_grad_(True)
        assert torch.autograd.gradcheck(lambda i, d: kernels.warp_kernel(i, d, "linear", padding), (image, u), fast_mode=True)


@needs_kernels
def test_kernel_warp_non_finite_displacement_gives_nan():
    u = torch.zeros(1, 2, 4, 5, device=DEVICE)
    u[0, 1, 2, 3] = float("nan")
    u[0, 0, 1, 1] = float("inf")
    out = kernels.warp_kernel(torch.ones(1, 2, 4, 5, device=DEVICE), u)
    bad = torch.zeros(4, 5, dtype=torch.bool)
    bad[2, 3] = bad[1, 1] = True
    assert torch.isnan(out[0, :, bad.to(DEVICE)]).all()
    assert (out[0, :, ~bad.to(DEVICE)] == 1).all()


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_warp_half_precision_keeps_subpixel_accuracy(dtype):
    """On a 2048-wide image a quarter-voxel shift is exact up to the half-precision rounding of the values.

    In half precision the normalised coordinate of ``grid_sample`` has a spacing of half a voxel
    (float16) to 4 voxels (bfloat16) near the far edge; the kernel adds the identity in float32,
    so only the image and the displacement are rounded (the truth is computed from the rounded
    image; the shift 0.25 is exact).
    """
    w = 2048
    x = torch.arange(w, dtype=torch.float64)
    image = torch.sin(2 * torch.pi * x / 16).view(1, 1, 1, w).expand(1, 1, 2, w)
    u = torch.zeros(1, 2, 2, w, dtype=dtype)
    u[:, 1] = 0.25
    out = kernels.warp_kernel(image.to(dtype).to(DEVICE), u.to(DEVICE)).double().cpu()
    half = image.to(dtype).double()
    truth = 0.75 * half + 0.25 * torch.roll(half, -1, dims=-1)
    truth[..., -1] = half[..., -1]  # border
    eps = torch.finfo(dtype).eps
    assert float((out - truth).abs().max()) <= eps  # the rounding of the result alone


# ----------------------------------------------------------------------------------------------
# Scaling and squaring


@needs_kernels
@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("padding", ["border", "zeros"])
def test_kernel_scaling_and_squaring_equals_eager(ndim, padding):
    g = _gen(20 + ndim)
    v = (3.0 * torch.randn(1, ndim, *SHAPES[ndim], generator=g)).to(DEVICE).requires_grad_(True)
    _assert_same(_both(lambda x: scaling_and_squaring(x, 4, padding=padding), v))


@needs_kernels
def test_kernel_squaring_step_is_a_self_composition_and_gradchecks():
    from plasticine.core import compose

    g = _gen(5)
    for n in (2, 3):
        shape = (3, 4) if n == 2 else (2, 3, 3)
        u = (0.8 * torch.randn(2, n, *shape, generator=g, dtype=torch.float64)).to(DEVICE)
        with kernels.backend("eager"):
            expected = compose(u, u)
        _close(expected, kernels.squaring_step(u), 1e-12)
        assert torch.autograd.gradcheck(lambda x: kernels.squaring_step(x, "zeros"), (u.requires_grad_(True),), fast_mode=True)


# ----------------------------------------------------------------------------------------------
# Mutual information and local NCC


@needs_kernels
@pytest.mark.parametrize(
    "ndim,kernel,sigma,masked",
    [(2, "bspline", 0.5, False), (3, "bspline", 0.5, True), (2, "gaussian", 0.5, True), (3, "gaussian", 0.7, False)],
)
def test_kernel_joint_histogram_equals_eager(ndim, kernel, sigma, masked):
    g = _gen(30 + ndim)
    moving = torch.rand(2, 2, *SHAPES[ndim], generator=g).to(DEVICE).requires_grad_(True)
    fixed = torch.rand(2, 2, *SHAPES[ndim], generator=g).to(DEVICE).requires_grad_(True)
    leaves = [moving, fixed]
    if masked:
        leaves.append(torch.rand(2, 1, *SHAPES[ndim], generator=g).to(DEVICE).requires_grad_(True))

    def fn(m, f, *mask):
        return joint_histogram(m, f, *mask, bins=8, kernel=kernel, sigma=sigma)

    _assert_same(_both(fn, *leaves))


@needs_kernels
def test_kernel_mutual_information_equals_eager():
    g = _gen(40)
    fixed = torch.rand(1, 1, 12, 13, generator=g)
    moving = (torch.sin(3 * fixed) ** 2 + 0.05 * torch.randn(fixed.shape, generator=g)).to(DEVICE).requires_grad_(True)
    _assert_same(_both(lambda m: mutual_information(m, fixed.to(DEVICE), bins=16), moving))


@needs_kernels
def test_kernel_histogram_gradcheck_float64():
    g = _gen(41)
    for kernel, taps, sigma, radius in (("bspline", 4, 0.0, 2.0), ("gaussian", 5, 0.6, 2.4)):
        tm = (1.0 + 5.0 * torch.rand(2, 7, generator=g, dtype=torch.float64)).to(DEVICE).requires_grad_(True)
        tf = (1.0 + 5.0 * torch.rand(2, 7, generator=g, dtype=torch.float64)).to(DEVICE).requires_grad_(True)
        w = torch.rand(2, 7, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_(True)

        def fn(a, b, c):
            return kernels.joint_histogram_kernel(a, b, c, kernel, 8, taps, sigma, radius)

        assert torch.autograd.gradcheck(fn, (tm, tf, w), fast_mode=True)


@needs_kernels
@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("masked", [False, True])
def test_kernel_local_ncc_equals_eager(ndim, masked):
    g = _gen(50 + ndim)
    moving = torch.rand(2, 1, *SHAPES[ndim], generator=g).to(DEVICE).requires_grad_(True)
    fixed = (moving.detach() ** 2 + 0.3 * torch.rand(moving.shape, generator=g).to(DEVICE)).requires_grad_(True)
    leaves = [moving, fixed]
    if masked:
        leaves.append((torch.rand(2, 1, *SHAPES[ndim], generator=g) > 0.3).float().to(DEVICE).requires_grad_(True))
    window = 3 if ndim == 3 else (5, 3)
    _assert_same(_both(lambda m, f, *mask: local_ncc(m, f, *mask, window=window), *leaves))


@needs_kernels
def test_kernel_box_sum_equals_eager():
    g = _gen(60)
    x = torch.randn(2, 3, 6, 7, 8, generator=g).to(DEVICE).requires_grad_(True)
    _assert_same(_both(lambda t: box_sum(t, (3, 1, 5)), x))


@needs_kernels
def test_kernel_second_derivative_is_refused_with_the_way_out():
    image = torch.rand(1, 1, 4, 5, device=DEVICE)
    u = (0.3 * torch.rand(1, 2, 4, 5)).to(DEVICE).requires_grad_(True)
    out = kernels.warp_kernel(image, u).sum()
    with pytest.raises(RuntimeError, match="backend\\('eager'\\)"):
        torch.autograd.grad(out, u, create_graph=True)
