"""Half precision and autocast: coordinates, squaring, Jacobians, histograms and NCC moments in float32.

Under ``torch.autocast("cpu", dtype=torch.bfloat16)`` with bfloat16 inputs, every public hot path
runs, gives finite values in the documented dtype, and equals the float32 computation on the same
(rounded) inputs; the difference to the float32 result of the unrounded inputs is then the input
rounding alone, bounded below.
"""

import pytest
import torch

from plasticine.core import compose, gaussian_smooth, jacobian_determinant, warp
from plasticine.losses import NCC, BendingEnergy, GradientSmoothness, LocalNCC, MutualInformation
from plasticine.registration import RegistrationNet, integrate_euler, integrate_rk4, scaling_and_squaring

from conftest import make_generator

BF16 = torch.bfloat16
ROUND = 2.0**-8  # bfloat16's relative rounding error bound (8 significant bits, round to nearest: 2^-9, doubled for slack)


def autocast():
    return torch.autocast("cpu", dtype=BF16)


def smooth_field(shape, amp, seed, sigma=3.0):
    f = gaussian_smooth(torch.randn(shape, generator=make_generator(seed)), sigma)
    return f * (amp / f.abs().max())


def rounded(x):
    return x.to(BF16).float()


SHAPES = {2: (2, 40, 36), 3: (1, 14, 12, 16)}

FIELD_FNS = {
    "compose": lambda u: compose(u, u.flip(0)),
    "squaring-lean": lambda u: scaling_and_squaring(u),
    "squaring-autograd": lambda u: scaling_and_squaring(u, memory="autograd"),
    "euler": lambda u: integrate_euler(u, 6),
    "rk4": lambda u: integrate_rk4(u, 2),
    "jacobian": jacobian_determinant,
    "smoothness": GradientSmoothness(),
    "bending": BendingEnergy(),
}


@pytest.mark.parametrize("name", list(FIELD_FNS))
def test_field_functions_under_autocast_compute_in_float32(ndim, name):
    b, *s = SHAPES[ndim]
    u = smooth_field((b, ndim, *s), 6.0, seed=ndim)
    fn = FIELD_FNS[name]
    with autocast():
        out = fn(u.to(BF16))
    assert out.dtype == torch.float32 and out.isfinite().all()
    # the float32 computation on the rounded field, to float32 rounding
    ref = fn(rounded(u))
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6 * float(ref.abs().max()))
    # outside autocast the same
    torch.testing.assert_close(fn(u.to(BF16)), ref, rtol=1e-6, atol=1e-6 * float(ref.abs().max()))


def test_squaring_of_half_velocity_is_accurate_to_its_rounding():
    # coordinates built in the field's dtype resolve a bfloat16 grid line of 64 voxels to 1/4 voxel
    # (the squared field was then 0.37 voxels off here, 5 times this bound); in float32 only the
    # rounding of the velocity itself is left
    v = smooth_field((1, 2, 64, 64), 12.0, seed=4, sigma=6.0)
    exact = scaling_and_squaring(v)
    with autocast():
        half = scaling_and_squaring(v.to(BF16))
    error = float((half - exact).abs().max())
    # exp is Lipschitz in v with constant e^G on smooth fields (G = max |grad v| here < 1)
    bound = 2.0**-9 * float(v.abs().max()) * 3.0
    assert error <= bound, (error, bound)


@pytest.mark.parametrize("padding", ["border", "zeros"])
def test_warp_of_half_inputs_keeps_subvoxel_accuracy(ndim, padding):
    b, *s = SHAPES[ndim]
    image = smooth_field((b, 2, *s), 1.0, seed=10, sigma=2.0)
    u = smooth_field((b, ndim, *s), 4.0, seed=11)
    with autocast():
        out = warp(image.to(BF16), u.to(BF16), padding=padding)
    assert out.dtype == torch.float32 and out.isfinite().all()  # float32 under autocast, as grid_sample
    torch.testing.assert_close(out, warp(rounded(image), rounded(u), padding=padding), rtol=1e-6, atol=1e-6)
    # outside autocast: the image's dtype, the float32 result rounded once
    plain = warp(image.to(BF16), u.to(BF16), padding=padding)
    assert plain.dtype == BF16
    assert torch.equal(plain, warp(rounded(image), rounded(u), padding=padding).to(BF16))
    # to the unrounded float32 result: Lipschitz constant of the linear interpolant per axis
    # (largest neighbour difference) times the rounding of u, plus the rounding of the image
    exact = warp(image, u, padding=padding)
    lipschitz = [float(image.diff(dim=2 + i).abs().max()) for i in range(ndim)]
    du = [float((rounded(u[:, i]) - u[:, i]).abs().max()) for i in range(ndim)]
    bound = sum(a * d for a, d in zip(lipschitz, du)) + float((rounded(image) - image).abs().max()) + 1e-6
    assert float((out - exact).abs().max()) <= bound


def test_half_image_meets_float32_displacement():
    image = smooth_field((1, 1, 20, 24), 1.0, seed=12)
    u = smooth_field((1, 2, 20, 24), 3.0, seed=13)
    out = warp(image.to(BF16), u)
    assert out.dtype == BF16 and torch.equal(out, warp(rounded(image), u).to(BF16))
    with pytest.raises(ValueError, match=r"displacement: expected the image's dtype torch.float32, got torch.float64"):
        warp(image, u.double())


def test_large_half_grid_keeps_quarter_voxel_shifts():
    # 512 voxels: a grid coordinate in bfloat16 near the far edge is resolved to 2 voxels; formed in
    # float32 a shift of a quarter voxel survives
    x = torch.arange(512.0)
    image = torch.sin(x / 20.0).view(1, 1, 1, 512).expand(1, 1, 4, 512).contiguous()
    u = torch.zeros(1, 2, 4, 512)
    u[:, 1] = 0.25
    out = warp(image.to(BF16), u.to(BF16)).float()
    exact = warp(image, u)
    assert float((out - exact).abs().max()) <= 2.0**-8  # the image's own rounding (values in [-1, 1])


LOSSES = {"mi": MutualInformation(), "lncc": LocalNCC(window=5), "ncc": NCC()}


@pytest.mark.parametrize("name", list(LOSSES))
def test_similarities_under_autocast_compute_in_float32(ndim, name):
    b, *s = SHAPES[ndim]
    moving = smooth_field((b, 1, *s), 1.0, seed=20, sigma=2.0) + 1.0
    fixed = (moving - 1.0).square() + 0.1 * smooth_field((b, 1, *s), 1.0, seed=21, sigma=1.0)
    loss = LOSSES[name]
    with autocast():
        out = loss(moving.to(BF16), fixed.to(BF16))
    assert out.dtype == torch.float32 and out.isfinite().all()
    torch.testing.assert_close(out, loss(rounded(moving), rounded(fixed)), rtol=1e-5, atol=1e-6)
    assert abs(float(out) - float(loss(moving, fixed))) <= 0.02  # the rounding of the inputs, measured 7e-5 for MI


def test_registration_step_under_autocast():
    # the network runs its convolutions in bfloat16; the velocity is integrated, the image warped
    # and the loss taken in float32, and the gradient is finite and close to the float32 one
    torch.manual_seed(0)
    net = RegistrationNet(encoder=(8, 8), features=8, align_channels=8, align_layers=1)
    x, y = torch.rand(1, 1, 24, 24, generator=make_generator(0)), torch.rand(1, 1, 24, 24, generator=make_generator(1))
    cue = torch.rand(1, 1, 24, 24, generator=make_generator(2))
    mi = MutualInformation()

    def step():
        out = net(x, y, cue=cue)
        u = scaling_and_squaring(out.velocity * 20.0)
        return mi(warp(x, u), y) + 0.1 * GradientSmoothness()(u), out.velocity, u

    loss32, v32, u32 = step()
    with autocast():
        loss16, v16, u16 = step()
    assert v16.dtype == BF16 and u16.dtype == torch.float32 and loss16.dtype == torch.float32
    params = [p for p in net.parameters() if p.dim() > 1]
    g16 = torch.autograd.grad(loss16, params, allow_unused=True)
    g32 = torch.autograd.grad(loss32, params, allow_unused=True)
    assert all(g is None or g.isfinite().all() for g in g16)
    # the velocity is only as accurate as the bfloat16 convolutions; from it on everything is float32
    torch.testing.assert_close(u16, scaling_and_squaring(v16.float() * 20.0), rtol=1e-6, atol=1e-6)
    assert abs(float(loss16.detach()) - float(loss32.detach())) <= 0.01
    num = sum(float((a - b).square().sum()) for a, b in zip(g16, g32) if b is not None)
    den = sum(float(b.square().sum()) for b in g32 if b is not None)
    assert (num / den) ** 0.5 <= 0.25  # the convolutions' bfloat16 gradients (measured 0.08)


def test_learned_registration_under_autocast_gives_float32_maps():
    from plasticine.registration import LearnedRegistration

    torch.manual_seed(0)
    reg = LearnedRegistration(RegistrationNet(encoder=(8, 8), features=8, align_channels=8, align_layers=1))
    x, y = torch.rand(1, 1, 16, 20, generator=make_generator(3)), torch.rand(1, 1, 16, 20, generator=make_generator(4))
    with torch.no_grad(), autocast():
        phi = reg.register(x, y, cue=torch.rand(1, 1, 16, 20, generator=make_generator(5)))
    assert phi.velocity.dtype == BF16 and phi.forward.dtype == phi.inverse.dtype == torch.float32
    # a bfloat16 image is warped with the float32 field (not the field rounded to bfloat16)
    image = smooth_field((1, 1, 16, 20), 1.0, seed=6)
    moved = phi.to_target(image.to(BF16))
    assert moved.dtype == BF16 and torch.equal(moved, warp(rounded(image), phi.forward).to(BF16))
