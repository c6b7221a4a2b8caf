r"""The dual-velocity registration network of Plasticine and its training objective.

The network :math:`f_{\theta_2}(x, y, \hat\epsilon)` is a VoxelMorph-style U-Net (four encoder and four
decoder levels, LeakyReLU, skip connections) that predicts a stationary velocity field :math:`v`;
:math:`\phi = \exp(v)` and, by default, :math:`\phi^{-1} = \exp(-v)` (``inverse="negate"``, exact by
construction). With ``inverse="learned"`` one final layer has two heads, :math:`v` and :math:`v^{-1}`,
and :math:`\phi^{-1} = \exp(v^{-1})` (the paper's variant, whose inverse consistency must be measured).

Its input layer sums two convolutions, one of the source ``x`` and one of the *reference* ``(y, eps_hat)``
(the target and the diffusion model's noise estimate, the "noise cue"). A feature-alignment block (four
3x3 convolutions of 64 channels) learns to predict the reference features from ``x`` alone, so that at
inference the network needs only ``x``. The cue can be switched off (``cue_channels=0``).

Two options help a small network learn in few steps (both off by default, which keeps the original
network and its saved weights): ``norm_groups`` adds group normalisation after every encoder and
decoder convolution, and ``velocity_level`` predicts :math:`v` on a coarser grid, upsampled linearly and
smoothed by a Gaussian, so that the field is smooth by construction, as anatomical deformations are.

Objective (the paper's eq. 6 and 7), for any similarity loss ``S`` (mutual information by default):

.. math::

    L_{DF} = S(x \circ \phi, y) + S(x, y \circ \phi^{-1}) + \lambda R(v)
             + \beta \lVert A(x) - F(y, \hat\epsilon) \rVert^2 .
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.config import Configurable, register_settings
from ..core.deformation import Deformation
from ..core.filters import gaussian_smooth
from ..core.shapes import check_shape
from ..core.validate import check_int
from ..core.warp import warp

__all__ = ["RegistrationNetConfig", "RegistrationNet", "RegistrationOutput", "registration_objective", "LearnedRegistration", "PatchwiseRegistration"]

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}


@register_settings
@dataclass(frozen=True)
class RegistrationNetConfig:
    """Settings of :class:`RegistrationNet`.

    Attributes:
        spatial_dims: 2 or 3.
        image_channels: channels of ``x`` and of ``y``.
        cue_channels: channels of the noise cue ``eps_hat``; 0 switches the cue off.
        features: channels of the input layer (the paper: 64 in 2D).
        encoder: channels of the four (or more) encoder levels; the decoder mirrors them.
        inverse: ``"negate"`` (phi^-1 = exp(-v)) or ``"learned"`` (a second velocity head).
        align_channels: width of the feature-alignment block.
        align_layers: number of 3x3 convolutions in the alignment block.
        velocity_level: decoder level at which the velocity head reads: ``0`` predicts it at full
            resolution; ``k > 0`` predicts it on the grid ``2**k`` times coarser (the last ``k``
            decoder levels are not built) and upsamples it linearly then smooths it with a Gaussian
            of ``2**(k-1)`` voxels, so the field is smooth by construction (the true fields of
            anatomy are) and the network has fewer full-resolution layers to run.
        norm_groups: ``G > 0`` puts a group normalisation of ``G`` groups (Wu and He, 2018) after
            every encoder and decoder convolution, which makes training from scratch much faster;
            ``0`` leaves them out (every channel count of ``encoder`` must be divisible by ``G``).
    """

    spatial_dims: int = 2
    image_channels: int = 1
    cue_channels: int = 1
    features: int = 64
    encoder: tuple[int, ...] = (64, 64, 64, 64)
    inverse: Literal["negate", "learned"] = "negate"
    align_channels: int = 64
    align_layers: int = 4
    velocity_level: int = 0
    norm_groups: int = 0

    def __post_init__(self):
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims: expected 2 or 3, got {self.spatial_dims}")
        if self.inverse not in ("negate", "learned"):
            raise ValueError(f"inverse: expected 'negate' or 'learned', got {self.inverse!r}")
        if self.cue_channels < 0 or self.image_channels < 1 or not self.encoder or self.align_layers < 1:
            raise ValueError(f"invalid RegistrationNetConfig: {self}")
        if self.norm_groups < 0 or (self.norm_groups and any(c % self.norm_groups for c in self.encoder)):
            raise ValueError(f"norm_groups: expected 0 or a divisor of every encoder width {self.encoder}, got {self.norm_groups}")
        if not 0 <= self.velocity_level < len(self.encoder):
            raise ValueError(f"velocity_level: expected an int in [0, {len(self.encoder) - 1}] (fewer than the {len(self.encoder)} encoder levels), got {self.velocity_level}")


class RegistrationOutput(NamedTuple):
    """What :class:`RegistrationNet` returns.

    Attributes:
        velocity: ``v``, ``(B, N, *S)`` in voxels.
        inverse_velocity: ``v^-1`` with ``inverse="learned"``, else ``-v``.
        reference_features: features of ``(y, eps_hat)`` (None when no target was given).
        aligned_features: features predicted from ``x`` by the alignment block.
    """

    velocity: torch.Tensor
    inverse_velocity: torch.Tensor
    reference_features: torch.Tensor | None
    aligned_features: torch.Tensor


def _block(conv: type, cin: int, cout: int, stride: int = 1, groups: int = 0) -> nn.Sequential:
    norm = [nn.GroupNorm(groups, cout)] if groups else []
    return nn.Sequential(conv(cin, cout, 3, stride=stride, padding=1), *norm, nn.LeakyReLU(0.2))


class RegistrationNet(Configurable, nn.Module):
    """VoxelMorph-style velocity U-Net with the noise cue and feature alignment (2D or 3D).

    Any spatial size works: inputs are padded (replicate) to a multiple of ``2**len(encoder)`` and the
    output is cropped back. ``net.config`` holds the constructor arguments (the ``config`` given and
    the keyword overrides, see :class:`~plasticine.core.Configurable`); ``net.settings`` is the
    :class:`RegistrationNetConfig` in use.

    Args:
        config: a :class:`RegistrationNetConfig`; keyword overrides may be given instead.

    Shape:
        x, y: ``(B, image_channels, *S)``; cue: ``(B, cue_channels, *S)``; velocities ``(B, N, *S)``;
        features ``(B, features, *S)``.
    """

    def __init__(self, config: RegistrationNetConfig | None = None, **overrides):
        super().__init__()
        cfg = config or RegistrationNetConfig()
        if overrides:
            cfg = RegistrationNetConfig(**{**cfg.__dict__, **overrides})
        self.settings = cfg
        conv, n = _CONV[cfg.spatial_dims], cfg.spatial_dims
        self.input_source = conv(cfg.image_channels, cfg.features, 3, padding=1)
        self.input_reference = conv(cfg.image_channels + cfg.cue_channels, cfg.features, 3, padding=1, bias=False)
        layers, c = [], cfg.image_channels
        for _ in range(cfg.align_layers):
            layers += [conv(c, cfg.align_channels, 3, padding=1), nn.LeakyReLU(0.2)]
            c = cfg.align_channels
        layers.append(conv(c, cfg.features, 1))
        self.align = nn.Sequential(*layers)
        self.down = nn.ModuleList()
        c, skips = cfg.features, [cfg.features]
        for ch in cfg.encoder:
            self.down.append(_block(conv, c, ch, stride=2, groups=cfg.norm_groups))
            c = ch
            skips.append(ch)
        skips.pop()
        self.up = nn.ModuleList()
        for ch, skip in list(zip(reversed(cfg.encoder), reversed(skips)))[: len(cfg.encoder) - cfg.velocity_level]:
            self.up.append(_block(conv, c + skip, ch, groups=cfg.norm_groups))
            c = ch
        heads = 2 if cfg.inverse == "learned" else 1
        self.head = conv(c, n * heads, 3, padding=1)
        nn.init.normal_(self.head.weight, std=1e-5)
        nn.init.zeros_(self.head.bias)

    def reference_features(self, y: torch.Tensor, cue: torch.Tensor | None) -> torch.Tensor:
        """Features of the reference ``(y, eps_hat)`` computed by the input layer.

        Shape:
            y: ``(B, image_channels, *S)``; cue: ``(B, cue_channels, *S)``; out: ``(B, features, *S)``.
        """
        cfg = self.settings
        if cfg.cue_channels and cue is None:
            raise ValueError(f"this network reads a noise cue of {cfg.cue_channels} channels; pass cue= (or build it with cue_channels=0)")
        if not cfg.cue_channels and cue is not None:
            raise ValueError("this network was built without a cue (cue_channels=0); pass cue=None")
        ref = y if cue is None else torch.cat([y, cue], dim=1)
        return self.input_reference(ref)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, cue: torch.Tensor | None = None) -> RegistrationOutput:
        """Predict the velocity of the map from ``x`` to ``y`` (or from ``x`` alone when ``y`` is None).

        Shape:
            x, y: ``(B, image_channels, *S)``; cue: ``(B, cue_channels, *S)``; see :class:`RegistrationOutput`.
        """
        cfg = self.settings
        dims = check_shape(x, f"B {cfg.image_channels} *S", "x", spatial=(cfg.spatial_dims,))
        if y is not None:
            check_shape(y, f"B {cfg.image_channels} *S", "y", bindings=dims, spatial=(cfg.spatial_dims,))
        if cue is not None:
            check_shape(cue, f"B {cfg.cue_channels} *S", "cue", bindings=dims, spatial=(cfg.spatial_dims,))
        shape = dims["S"]
        m = 2 ** len(cfg.encoder)
        pad = []
        for s in reversed(shape):
            pad += [0, (-s) % m]
        xp = F.pad(x, pad, mode="replicate") if any(pad) else x
        aligned = self.align(xp)
        if y is not None:
            yp = F.pad(y, pad, mode="replicate") if any(pad) else y
            cp = None if cue is None else (F.pad(cue, pad, mode="replicate") if any(pad) else cue)
            reference = self.reference_features(yp, cp)
            h = self.input_source(xp) + reference
        else:
            reference = None
            h = self.input_source(xp) + aligned
        h = F.leaky_relu(h, 0.2)
        skips = [h]
        for block in self.down:
            h = block(h)
            skips.append(h)
        skips.pop()
        for block in self.up:
            skip = skips.pop()
            h = F.interpolate(h, size=skip.shape[2:], mode="nearest")
            h = block(torch.cat([h, skip], dim=1))
        crop = (slice(None), slice(None)) + tuple(slice(0, s) for s in shape)
        out = self.head(h)
        if cfg.velocity_level:
            mode = "bilinear" if cfg.spatial_dims == 2 else "trilinear"
            out = F.interpolate(out, size=xp.shape[2:], mode=mode, align_corners=False)
            out = gaussian_smooth(out, 2.0 ** (cfg.velocity_level - 1))
        out = out[crop]
        n = cfg.spatial_dims
        v = out[:, :n]
        v_inv = out[:, n:] if cfg.inverse == "learned" else -v
        return RegistrationOutput(v, v_inv, None if reference is None else reference[crop], aligned[crop])


def registration_objective(
    network: RegistrationNet,
    integrator: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    cue: torch.Tensor | None = None,
    *,
    similarity: Callable[..., torch.Tensor] | None = None,
    regularizer: Callable[[torch.Tensor], torch.Tensor] | None = None,
    smoothness_weight: float = 1.0,
    align_weight: float = 1.0,
    mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    r"""The registration loss :math:`L_{DF}` of one batch (the paper's eq. 6 and 7).

    ``total = S(x o phi, y) + S(x, y o phi^-1) + smoothness_weight * R(v) + align_weight * mean((A(x) - F(y, eps))^2)``
    with the reference features detached in the alignment term, so that alignment follows the
    registration and does not steer it. With ``inverse="learned"`` the regulariser acts on both heads.

    Args:
        network: the registration network (or a wrapper such as DistributedDataParallel whose
            ``module`` is one).
        integrator: velocity -> displacement (e.g. :class:`~plasticine.registration.ScalingAndSquaring`).
        x: source images.
        y: target images.
        cue: noise estimate of the diffusion model (None when the network has no cue).
        similarity: loss, lower is better; default normalised mutual information.
        regularizer: default :class:`plasticine.losses.GradientSmoothness`.
        smoothness_weight: lambda.
        align_weight: weight of the alignment term.
        mask: optional ``(B, 1, *S)`` region for the similarity terms.

    Returns:
        dict with the scalars ``total``, ``forward``, ``inverse``, ``smoothness``, ``align`` and the
        predicted ``velocity`` ``(B, N, *S)`` (for extra terms such as a supervised one).

    Shape:
        x, y: ``(B, C, *S)``; cue: ``(B, Ce, *S)``.
    """
    from ..losses import GradientSmoothness, MutualInformation

    similarity = similarity if similarity is not None else MutualInformation()
    regularizer = regularizer if regularizer is not None else GradientSmoothness()
    out = network(x, y, cue)
    fwd, inv = integrator(out.velocity), integrator(out.inverse_velocity)
    terms = {
        "forward": similarity(warp(x, fwd), y, mask),
        "inverse": similarity(x, warp(y, inv), mask),
        "smoothness": regularizer(out.velocity)
        + (regularizer(out.inverse_velocity) if getattr(network, "module", network).settings.inverse == "learned" else 0.0),
        "align": (out.aligned_features - out.reference_features.detach()).pow(2).mean(),
        "velocity": out.velocity,
    }
    terms["total"] = terms["forward"] + terms["inverse"] + smoothness_weight * terms["smoothness"] + align_weight * terms["align"]
    return terms


class LearnedRegistration(Configurable, nn.Module):
    """Registration backend of a trained :class:`RegistrationNet` plus an integrator.

    ``register(x)`` predicts from the source alone (through the alignment block);
    ``register(x, y, cue=eps_hat)`` uses the target (and the cue, if the network reads one). An
    ``nn.Module`` holding the network (and the integrator), so that ``state_dict``, ``to``,
    ``train`` and ``eval`` reach the network; it has no ``forward``, call :meth:`register`.

    Args:
        network: the registration network (put in eval mode by the caller for inference).
        integrator: velocity -> displacement, :class:`~plasticine.registration.ScalingAndSquaring` by default.
        downsample: run the network on images resized by ``1 / downsample`` (linear, aligned
            corners) and resample its velocity back (:func:`~plasticine.core.filters.resize_field`)
            before integrating at full resolution; ``1`` runs at full resolution.

    Shape:
        source, target: ``(B, C, *S)``; returned Deformation fields ``(B, N, *S)``.
    """

    def __init__(self, network: RegistrationNet, integrator: Callable[[torch.Tensor], torch.Tensor] | None = None, downsample: int = 1):
        from .integrators import ScalingAndSquaring

        super().__init__()
        self.downsample = check_int(downsample, "downsample", 1)
        self.network = network
        self.integrator = integrator if integrator is not None else ScalingAndSquaring()

    def network_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Spatial size at which the network runs for inputs of size ``shape``."""
        return tuple(max(2, round((s - 1) / self.downsample) + 1) for s in shape)

    def register(self, source: torch.Tensor, target: torch.Tensor | None = None, *, cue: torch.Tensor | None = None) -> Deformation:
        """Predict phi and phi^-1 for ``source`` (towards ``target`` when given).

        Shape:
            source, target: ``(B, C, *S)``; cue: ``(B, Ce, *S)``; out: Deformation with ``(B, N, *S)`` fields.
        """
        if target is None and cue is not None:
            raise ValueError("a cue is only used together with a target; pass target= or drop cue=")
        shape = tuple(source.shape[2:])
        small = self.network_shape(shape)
        if small != shape:
            from ..core.filters import resize, resize_field

            source, target, cue = (None if t is None else resize(t, small) for t in (source, target, cue))
        out = self.network(source, target, cue)
        v, v_inv = out.velocity, out.inverse_velocity
        if small != shape:
            v, v_inv = resize_field(v, shape), resize_field(v_inv, shape)
        return Deformation(self.integrator(v), self.integrator(v_inv), v)


class PatchwiseRegistration(nn.Module):
    r"""A :class:`LearnedRegistration` run on overlapping patches: stitched velocities, integrated once.

    The network predicts :math:`v` (and :math:`v^{-1}`) on overlapping patches of the source (and of
    the target and the cue, when given); the patch velocities are blended into one field by
    :func:`~plasticine.core.patches.sliding_window`, and only then integrated over the whole image,
    :math:`\phi = \exp(v)`, :math:`\phi^{-1} = \exp(v^{-1})`. Stitching the velocity rather than the
    displacements keeps :math:`\phi` the exponential of one smooth field: diffeomorphic, its inverse
    exact (with ``inverse="negate"``), and free of the folds that blending two maps can make where
    patches disagree. (A patch's velocity near its cut lacks the context beyond it; the blending
    weights give those voxels little or no weight.)

    Args:
        backend: the learned backend whose network and integrator are used (``downsample=1``).
        patch: patch size, one integer or one per spatial axis.
        overlap: overlap of neighbouring patches (default ``patch // 4``).
        margin: voxels next to a cut given no weight (default ``overlap // 4``).

    Raises:
        ValueError: for a backend that downsamples, or (at :meth:`register`) a patch larger than
            the image.

    Shape:
        source, target: ``(B, C, *S)``; cue: ``(B, Ce, *S)``; out: Deformation with ``(B, N, *S)`` fields.
    """

    def __init__(
        self,
        backend: LearnedRegistration,
        patch: int | tuple[int, ...],
        *,
        overlap: int | tuple[int, ...] | None = None,
        margin: int | tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(backend, LearnedRegistration):
            raise ValueError(f"backend: expected a LearnedRegistration (a network and an integrator), got {type(backend).__name__}")
        if backend.downsample != 1:
            raise ValueError(f"backend: expected downsample=1 (patches are cut at full resolution), got downsample={backend.downsample}")
        self.backend = backend
        self.patch, self.overlap, self.margin = patch, overlap, margin

    def register(self, source: torch.Tensor, target: torch.Tensor | None = None, *, cue: torch.Tensor | None = None) -> Deformation:
        """Predict phi and phi^-1 for ``source`` (towards ``target`` when given) patch by patch.

        Shape:
            source, target: ``(B, C, *S)``; cue: ``(B, Ce, *S)``; out: Deformation with ``(B, N, *S)`` fields.
        """
        from ..core.patches import sliding_window

        if target is None and cue is not None:
            raise ValueError("a cue is only used together with a target; pass target= or drop cue=")
        net = self.backend.network

        def velocities(x: torch.Tensor, y: torch.Tensor | None, c: torch.Tensor | None) -> torch.Tensor:
            out = net(x, y, c)
            return torch.cat([out.velocity, out.inverse_velocity], dim=1)

        both = sliding_window(velocities, [source, target, cue], self.patch, overlap=self.overlap, margin=self.margin)
        n = source.dim() - 2
        v, v_inv = both[:, :n], both[:, n:]
        integrate = self.backend.integrator
        return Deformation(integrate(v), integrate(v_inv), v)
