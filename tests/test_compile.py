"""``torch.compile`` of the hot paths: whole graphs (``fullgraph=True``, so a graph break fails the
test), the same values and gradients as eager, and the argument checks kept.

Dynamo traces with the ``eager`` or ``aot_eager`` backends (fast on the CPU: the graph is run by
torch's own kernels, ``aot_eager`` also traces the backward as a graph); one case goes through
the default inductor backend.
"""

import pytest
import torch
import torch._dynamo as dynamo

from plasticine.core import check_values, compose, gaussian_smooth, jacobian_determinant, warp
from plasticine.diffusion import ConditionalUNet, LinearSchedule, UNetConfig, noise_prediction_loss
from plasticine.losses import NCC, BendingEnergy, GradientSmoothness, LocalNCC, MutualInformation
from plasticine.registration import RegistrationNet, integrate_euler, integrate_rk4, scaling_and_squaring

from conftest import make_generator

# aot_eager also traces the backward; the plain eager backend is the slow variant of each test
BACKENDS = [pytest.param("eager", marks=pytest.mark.slow), "aot_eager"]
NDIMS = [2, pytest.param(3, marks=pytest.mark.slow)]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    dynamo.reset()
    yield
    dynamo.reset()


def compiled(fn, backend):
    return torch.compile(fn, fullgraph=True, backend=backend)


def field(shape, amp, seed, sigma=1.5):
    return gaussian_smooth(torch.randn(shape, generator=make_generator(seed)), sigma) * amp


SHAPES = {2: (2, 12, 14), 3: (1, 6, 7, 8)}


def image_and_field(ndim, seed=0, amp=3.0):
    b, *s = SHAPES[ndim]
    img = torch.rand(b, 2, *s, generator=make_generator(seed))
    return img, field((b, ndim, *s), amp, seed + 1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode,padding", [("linear", "border"), *(pytest.param(*c, marks=pytest.mark.slow) for c in (("linear", "zeros"), ("nearest", "reflection")))])
def test_warp_and_compose_compile_to_eager_values(ndim, backend, mode, padding):
    img, u = image_and_field(ndim)
    out = compiled(lambda i, d: warp(i, d, mode, padding), backend)(img, u)
    torch.testing.assert_close(out, warp(img, u, mode, padding), rtol=0, atol=0)
    c = compiled(lambda a, b: compose(a, b, padding), backend)(u, u.flip(0))
    torch.testing.assert_close(c, compose(u, u.flip(0), padding), rtol=0, atol=0)


@pytest.mark.parametrize("ndim", NDIMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_warp_gradients_compile_to_eager_values(ndim, backend):
    img, u = image_and_field(ndim)
    img.requires_grad_()
    u.requires_grad_()

    def loss(i, d):
        return warp(i, d).square().sum()

    g_eager = torch.autograd.grad(loss(img, u), (img, u))
    g_comp = torch.autograd.grad(compiled(loss, backend)(img, u), (img, u))
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("memory", ["lean", pytest.param("autograd", marks=pytest.mark.slow)])
@pytest.mark.parametrize("steps", [pytest.param(2, marks=pytest.mark.slow), 5])
def test_scaling_and_squaring_compiles_with_the_same_gradient(ndim, backend, memory, steps):
    # memory="lean" (the default) runs as the plasticine::lean_squaring operator under compile
    _, v = image_and_field(ndim, seed=3, amp=4.0)
    v.requires_grad_()
    weight = torch.rand(v.shape, generator=make_generator(9))

    def loss(x):
        return (scaling_and_squaring(x, steps, memory=memory) * weight).sum()

    out = compiled(lambda x: scaling_and_squaring(x, steps, memory=memory), backend)(v)
    torch.testing.assert_close(out, scaling_and_squaring(v, steps, memory=memory), rtol=0, atol=0)
    (g_comp,) = torch.autograd.grad(compiled(loss, backend)(v), v)
    (g_eager,) = torch.autograd.grad(loss(v), v)
    tol = 0 if memory == "lean" else 1e-6  # the lean operator runs the eager code itself
    torch.testing.assert_close(g_comp, g_eager, rtol=tol, atol=tol)


@pytest.mark.parametrize("ndim", NDIMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_euler_rk4_and_jacobian_compile_to_eager_values(ndim, backend):
    _, v = image_and_field(ndim, seed=5, amp=2.0)
    for fn in (lambda x: integrate_euler(x, 5), lambda x: integrate_rk4(x, 2), jacobian_determinant, lambda x: scaling_and_squaring(x)):
        dynamo.reset()
        torch.testing.assert_close(compiled(fn, backend)(v), fn(v), rtol=0, atol=0)


LOSSES = {
    "mi": lambda: MutualInformation(),
    "mi-gaussian": lambda: MutualInformation(kernel="gaussian", normalized=False),
    "lncc": lambda: LocalNCC(window=5),
    "ncc": lambda: NCC(),
    "smoothness": lambda: GradientSmoothness(),
    "bending": lambda: BendingEnergy(),
}


@pytest.mark.parametrize("ndim", NDIMS)
@pytest.mark.parametrize("backend", ["eager", pytest.param("aot_eager", marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", list(LOSSES))
def test_losses_and_regularisers_compile_with_their_gradients(ndim, backend, name):
    img, u = image_and_field(ndim, seed=7)
    moving = img[:, :1].clone().requires_grad_()
    fixed = torch.rand(moving.shape, generator=make_generator(8)) * 0.3 + moving.detach().square()
    mask = torch.rand(moving.shape, generator=make_generator(10)) > 0.3
    u.requires_grad_()
    module = LOSSES[name]()
    args = {"mi": (moving, fixed), "mi-gaussian": (moving, fixed, mask), "lncc": (moving, fixed), "ncc": (moving, fixed, mask)}.get(name, (u,))
    inputs = [a for a in args if a.requires_grad]
    eager = module(*args)
    comp = compiled(module, backend)(*args)
    torch.testing.assert_close(comp, eager, rtol=1e-6, atol=1e-7)
    for a, b in zip(torch.autograd.grad(comp, inputs), torch.autograd.grad(eager, inputs)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def small_unet(ndim=2):
    torch.manual_seed(0)
    return ConditionalUNet(UNetConfig(ndim=ndim, base_channels=8, channel_mults=(1, 2), attention_levels=(1,), dropout=0.0))


NETWORK_BACKENDS = ["eager", pytest.param("aot_eager", marks=pytest.mark.slow)]


@pytest.mark.parametrize("backend", NETWORK_BACKENDS)
def test_denoiser_forward_and_training_loss_compile(backend):
    net = small_unet()
    x = torch.randn(2, 1, 13, 10, generator=make_generator(0))
    cond = torch.randn(2, 1, 13, 10, generator=make_generator(1))
    gamma = torch.tensor([0.3, 0.9])
    torch.testing.assert_close(compiled(net, backend)(x, gamma, cond), net(x, gamma, cond), rtol=1e-5, atol=1e-6)

    schedule = LinearSchedule(num_steps=20)

    def step(y, c):
        # a torch.Generator cannot enter a compiled graph (Dynamo): torch's global one, seeded
        return noise_prediction_loss(net, schedule, y, c, None, "l1")

    torch.manual_seed(4)
    loss_c = compiled(step, backend)(x, cond)
    grads_c = torch.autograd.grad(loss_c, list(net.parameters()))
    torch.manual_seed(4)
    loss_e = step(x, cond)
    grads_e = torch.autograd.grad(loss_e, list(net.parameters()))
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", NETWORK_BACKENDS)
def test_registration_network_forward_and_objective_compile(backend):
    torch.manual_seed(0)
    net = RegistrationNet(encoder=(8, 8), features=8, align_channels=8, align_layers=1)
    x = torch.rand(2, 1, 20, 18, generator=make_generator(0))
    y = torch.rand(2, 1, 20, 18, generator=make_generator(1))
    cue = torch.rand(2, 1, 20, 18, generator=make_generator(2))
    out_c = compiled(lambda a, b, c: net(a, b, cue=c), backend)(x, y, cue)
    out_e = net(x, y, cue=cue)
    for a, b in zip(out_c, out_e):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    mi, smooth = MutualInformation(), GradientSmoothness()

    def step(a, b, c):  # one training step's loss: network, default integrator, warp, MI, smoothness
        u = scaling_and_squaring(net(a, b, cue=c).velocity * 4.0)
        return mi(warp(a, u), b) + 0.1 * smooth(u)

    loss_c = compiled(step, backend)(x, y, cue)
    params = list(net.parameters())  # the feature-alignment branch is unused with a target y
    grads_c = torch.autograd.grad(loss_c, params, allow_unused=True)
    loss_e = step(x, y, cue)
    grads_e = torch.autograd.grad(loss_e, params, allow_unused=True)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    assert [g is None for g in grads_c] == [g is None for g in grads_e] and any(g is not None for g in grads_e)
    for a, b in zip(grads_c, grads_e):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_shape_errors_stay_value_errors_under_compile():
    img, u = torch.rand(1, 1, 5, 5), torch.rand(1, 2, 5, 6)
    with pytest.raises(ValueError, match=r"displacement: expected shape \(B, N, \*S\), got \(1, 2, 5, 6\)"):
        torch.compile(warp, backend="eager")(img, u)  # the break falls back to eager: the ValueError itself
    dynamo.reset()
    with pytest.raises(Exception, match=r"ValueError\('displacement: expected shape"):
        compiled(warp, "eager")(img, u)  # fullgraph: Dynamo names the ValueError it met
    dynamo.reset()
    with pytest.raises(ValueError, match="steps: expected an int >= 0"):
        torch.compile(lambda v: scaling_and_squaring(v, -1), backend="eager")(u[..., :5])


def test_value_checks_give_nan_under_compile_and_raise_eagerly():
    net = small_unet()
    x = torch.randn(2, 1, 8, 8, generator=make_generator(0))
    cond = torch.randn(2, 1, 8, 8, generator=make_generator(1))
    bad = torch.tensor([0.5, 1.5])
    with pytest.raises(ValueError, match=r"gamma: expected cumulative signal levels in \(0, 1\]"):
        net(x, bad, cond)
    out = compiled(net, "eager")(x, bad, cond)
    assert out[1].isnan().all(), "a refused gamma gives NaN, never a finite result"
    assert out[0].isfinite().all()  # the items of the batch stay apart
    good = compiled(net, "eager")(x, torch.tensor([0.5, 0.25]), cond)
    assert good.isfinite().all()
    g = torch.tensor([0.2, 2.0, 0.7])
    traced = compiled(lambda t: check_values(t, t > 1, lambda: "unused"), "eager")(g)
    assert traced.isnan().tolist() == [False, True, False] and traced[0] == g[0]


@pytest.mark.slow
def test_inductor_compiles_warp_and_squaring():
    # the default backend (C++ code generated and built with the system compiler), one tiny case
    img, u = image_and_field(2, seed=11)

    def fn(i, d):
        return warp(i, scaling_and_squaring(d, 3, memory="autograd"))

    out = torch.compile(fn, fullgraph=True)(img, u)
    torch.testing.assert_close(out, fn(img, u), rtol=1e-5, atol=1e-5)
