r"""Conditional U-Net noise estimator :math:`\epsilon_\theta(y_k, \gamma_k, c)` for 2D and 3D images.

:class:`ConditionalUNet` is a Palette-style U-Net (Saharia et al. 2022, built on the ADM network of
Dhariwal and Nichol 2021): residual blocks of GroupNorm, SiLU, convolution and dropout whose second
normalisation is scaled and shifted by an embedding of the noise level, multi-head self-attention at
the coarse levels, strided-convolution downsampling and nearest-neighbour upsampling with skip
connections. The condition (a structure map, ``cond_channels > 0``) is concatenated to the noisy
image at the input, as in the paper; a :class:`~plasticine.diffusion.conditioning.LearnedConditioning`
given at construction adds spatially varying scale-and-shift (FiLM) of every block from a learned
feature pyramid of the same condition.

One implementation serves both dimensionalities (``UNetConfig.ndim`` picks ``Conv2d`` or ``Conv3d``).
No input size is stored: downsampling rounds up (``ceil(n / 2)``) and every upsampling resizes to the
size of the matching skip connection, so any spatial size works (37x50, 9x14x11, ...) without padding.

The noise level enters through :func:`noise_level_embedding`, sinusoidal features of the clipped
log signal-to-noise ratio :math:`\lambda = \log(\gamma / (1 - \gamma))` (see there for why).

References:
    C. Saharia et al., "Palette: Image-to-Image Diffusion Models", SIGGRAPH 2022.
    P. Dhariwal and A. Nichol, "Diffusion Models Beat GANs on Image Synthesis", NeurIPS 2021.
    D. Kingma et al., "Variational Diffusion Models", NeurIPS 2021 (conditioning on log-SNR).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import Configurable, register_settings
from ..core.shapes import check_shape
from ..core.validate import check_int, check_number, check_option, check_values

if TYPE_CHECKING:  # pragma: no cover
    from .conditioning import LearnedConditioning

__all__ = ["UNetConfig", "ConditionalUNet", "noise_level_embedding", "log_snr", "init_parameters", "MAX_LOG_SNR"]

MAX_LOG_SNR: float = 20.0
"""Clip of :math:`|\\lambda|` in :func:`log_snr` (:math:`\\gamma = 1` maps to ``+MAX_LOG_SNR``)."""


def log_snr(gamma: torch.Tensor, max_log_snr: float = MAX_LOG_SNR) -> torch.Tensor:
    r"""Clipped log signal-to-noise ratio of a cumulative signal level.

    :math:`\lambda(\gamma) = \operatorname{clip}(\log \gamma - \log(1 - \gamma), -\lambda_{max}, \lambda_{max})`.
    :math:`\gamma = 1` (a clean image) gives :math:`+\lambda_{max}`. Computed in at least float32.

    Args:
        gamma: cumulative signal levels :math:`\gamma_k \in (0, 1]`.
        max_log_snr: the clip :math:`\lambda_{max} > 0`.

    Returns:
        :math:`\lambda`, same shape as ``gamma``, dtype ``promote(gamma.dtype, float32)``.

    Raises:
        ValueError: if ``gamma`` is not floating or has values outside :math:`(0, 1]`.

    Shape:
        gamma: ``(*)``; out: ``(*)``.

    Example:
        >>> import torch
        >>> log_snr(torch.tensor([0.5, 1.0]))
        tensor([ 0., 20.])
    """
    gamma = _check_gamma_values(gamma)
    if not max_log_snr > 0:
        raise ValueError(f"max_log_snr: expected a positive number, got {max_log_snr}")
    g = gamma.to(torch.promote_types(gamma.dtype, torch.float32))
    return (torch.log(g) - torch.log1p(-g)).clamp(-max_log_snr, max_log_snr)


def noise_level_embedding(gamma: torch.Tensor, dim: int, max_log_snr: float = MAX_LOG_SNR) -> torch.Tensor:
    r"""Sinusoidal features of the log-SNR of :math:`\gamma`, spread over its whole range.

    With :math:`\lambda` the clipped log-SNR (:func:`log_snr`) and ``dim = 2 m``,

    .. math::

        e(\gamma) = \left[\sin(\omega_i \lambda), \cos(\omega_i \lambda)\right]_{i=0}^{m-1},
        \qquad \omega_i = \omega_{min} (\omega_{max} / \omega_{min})^{i / (m - 1)},

    with :math:`\omega_{min} = \pi / (2 \lambda_{max})` (the slowest feature is monotone over the whole
    clipped range) and :math:`\omega_{max} = 8` (the fastest resolves steps of about 0.1 in
    :math:`\lambda`).

    Why not Palette's embedding: Palette feeds :math:`\sqrt{\gamma} \in (0, 1]` to the transformer
    sinusoid with period up to 10000, i.e. frequencies :math:`10000^{-i/m} \le 1` on an input that
    spans at most 1: almost every feature is nearly constant, and :math:`\gamma = 0.999` and
    :math:`\gamma = 0.9999` map to almost the same vector. The log-SNR instead spreads the levels of
    a diffusion schedule evenly (the paper's linear schedule covers :math:`\lambda \approx -10` to
    :math:`14`), and the geometric frequencies match that span, so distinct levels get embeddings a
    sizeable fraction of :math:`\sqrt{m}` apart at both ends (see the tests).

    Args:
        gamma: cumulative signal levels :math:`\gamma \in (0, 1]`.
        dim: an even embedding size, at least 4.
        max_log_snr: the clip :math:`\lambda_{max}` of :func:`log_snr`.

    Returns:
        The embedding, dtype ``promote(gamma.dtype, float32)``; each entry in :math:`[-1, 1]`,
        each row of norm :math:`\sqrt{m}`.

    Raises:
        ValueError: for an odd or too small ``dim``, a non-1D ``gamma`` or values outside :math:`(0, 1]`.

    Shape:
        gamma: ``(B,)``; out: ``(B, dim)``.

    References:
        D. Kingma et al., "Variational Diffusion Models", NeurIPS 2021.
    """
    check_shape(gamma, "B", "gamma")
    if not isinstance(dim, int) or dim < 4 or dim % 2:
        raise ValueError(f"dim: expected an even int >= 4, got {dim!r}")
    lam = log_snr(gamma, max_log_snr)
    half = dim // 2
    w_min, w_max = math.pi / (2.0 * max_log_snr), 8.0
    omega = w_min * (w_max / w_min) ** (torch.arange(half, dtype=lam.dtype, device=lam.device) / (half - 1))
    arg = lam[:, None] * omega[None, :]
    return torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)


def _check_gamma_values(gamma: torch.Tensor) -> torch.Tensor:
    """``gamma`` if every level is in (0, 1]; a ValueError otherwise (NaN there under ``torch.compile``)."""
    if not isinstance(gamma, torch.Tensor) or not gamma.is_floating_point():
        what = gamma.dtype if isinstance(gamma, torch.Tensor) else type(gamma).__name__
        raise ValueError(f"gamma: expected a floating tensor of signal levels in (0, 1], got {what}")
    bad = ~((gamma > 0) & (gamma <= 1))  # also catches NaN
    return check_values(
        gamma,
        bad,
        lambda: f"gamma: expected cumulative signal levels in (0, 1], got values in [{float(gamma.min())}, {float(gamma.max())}] ({int(bad.sum())} outside)",
    )


def init_parameters(module: nn.Module, generator: torch.Generator | None = None) -> None:
    r"""Draw the weights of every convolution and linear layer in ``module`` from ``generator``.

    PyTorch's default initialisation, made replayable: weights :math:`\sim` Kaiming-uniform with
    :math:`a = \sqrt 5`, biases :math:`\sim U(-1/\sqrt{fan_{in}}, 1/\sqrt{fan_{in}})`; GroupNorm
    layers get unit scale and zero shift. Layers are visited in ``module.modules()`` order, so the
    same seed gives the same weights.

    Args:
        module: the network (modified in place).
        generator: source of the weights (on the CPU or the weights' device); None uses torch's
            global generator.

    Returns:
        None.

    Shape:
        Not applicable (parameters keep their shapes and memory format).
    """
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.Linear)):
                nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5), generator=generator)
                if m.bias is not None:
                    fan_in = m.weight.shape[1] * math.prod(m.weight.shape[2:])
                    bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                    nn.init.uniform_(m.bias, -bound, bound, generator=generator)
            elif isinstance(m, nn.GroupNorm):
                m.reset_parameters()


def _dropout(x: torch.Tensor, p: float, training: bool, generator: torch.Generator | None) -> torch.Tensor:
    """Inverted dropout; the mask comes from ``generator`` when one is given."""
    if not training or p == 0.0:
        return x
    if generator is None:
        return F.dropout(x, p, True)
    keep = torch.rand(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device) >= p
    return x * keep / (1.0 - p)


@register_settings
@dataclass(frozen=True)
class UNetConfig:
    """Hyper-parameters of :class:`ConditionalUNet` (frozen; written into configs by :func:`~plasticine.core.to_json`).

    Level ``i`` (``0 <= i < len(channel_mults)``) works at ``ceil(S / 2**i)`` with
    ``base_channels * channel_mults[i]`` channels. The default (about 1.2 M parameters in 2D) is
    tuned for CPU speed: one residual block per level and attention only at the coarsest level.

    Args:
        ndim: number of spatial dimensions, 2 or 3.
        in_channels: image channels ``C`` (the output has the same number).
        cond_channels: condition channels ``Cc`` concatenated at the input (0: unconditional).
        base_channels: channels of level 0.
        channel_mults: channel multiplier per level; its length is the number of levels.
        num_res_blocks: residual blocks per level on the way down (one more on the way up).
        attention_levels: levels with self-attention after each residual block; the middle
            block has attention when the coarsest level is listed.
        num_heads: attention heads (must divide the channels of every attention level).
        dropout: dropout probability inside the residual blocks.
        norm_groups: GroupNorm groups (must divide the channels of every level).
    """

    ndim: Literal[2, 3] = 2
    in_channels: int = 1
    cond_channels: int = 1
    base_channels: int = 32
    channel_mults: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    attention_levels: tuple[int, ...] = (2,)
    num_heads: int = 1
    dropout: float = 0.0
    norm_groups: int = 8

    def __post_init__(self) -> None:
        check_option(self.ndim, "UNetConfig.ndim", (2, 3))
        for name in ("in_channels", "cond_channels", "base_channels", "num_res_blocks", "num_heads", "norm_groups"):
            check_int(getattr(self, name), f"UNetConfig.{name}", 0 if name == "cond_channels" else 1)
        # lists (e.g. from JSON) become tuples so that the config stays hashable
        object.__setattr__(self, "channel_mults", tuple(self.channel_mults))
        object.__setattr__(self, "attention_levels", tuple(self.attention_levels))
        if not self.channel_mults:
            raise ValueError("UNetConfig.channel_mults: expected at least one level, got ()")
        for m in self.channel_mults:
            check_int(m, "UNetConfig.channel_mults[...]", 1)
        levels = len(self.channel_mults)
        for a in self.attention_levels:
            if not isinstance(a, int) or not 0 <= a < levels:
                raise ValueError(f"UNetConfig.attention_levels: expected level indices in [0, {levels}), got {self.attention_levels}")
        check_number(self.dropout, "UNetConfig.dropout", 0, 1, max_open=True)
        for i, m in enumerate(self.channel_mults):
            ch = self.base_channels * m
            if ch % self.norm_groups:
                raise ValueError(f"UNetConfig.norm_groups: {self.norm_groups} does not divide the {ch} channels of level {i}")
            if i in self.attention_levels and ch % self.num_heads:
                raise ValueError(f"UNetConfig.num_heads: {self.num_heads} does not divide the {ch} channels of attention level {i}")


def _conv(ndim: int, cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Module:
    cls = nn.Conv2d if ndim == 2 else nn.Conv3d
    return cls(cin, cout, kernel, stride=stride, padding=kernel // 2)


class _ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, scale-shift by the noise embedding (and FiLM features), dropout-conv, skip."""

    def __init__(self, ndim: int, cin: int, cout: int, emb_dim: int, groups: int, dropout: float, film_channels: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = _conv(ndim, cin, cout, 3)
        self.emb = nn.Linear(emb_dim, 2 * cout)
        self.film = _conv(ndim, film_channels, 2 * cout, 1) if film_channels else None
        self.norm2 = nn.GroupNorm(groups, cout)
        self.dropout = dropout
        self.conv2 = _conv(ndim, cout, cout, 3)
        self.skip = _conv(ndim, cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor, film: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        ss = self.emb(emb).view(emb.shape[0], -1, *([1] * (x.dim() - 2)))
        if self.film is not None:
            ss = ss + self.film(film)
        scale, shift = ss.chunk(2, dim=1)
        h = torch.addcmul(shift, self.norm2(h), 1 + scale)
        h = self.conv2(_dropout(F.silu(h), self.dropout, self.training, generator))
        return self.skip(x) + h


class _Attention(nn.Module):
    """Pre-norm multi-head self-attention over all voxels, residual."""

    def __init__(self, channels: int, heads: int, groups: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, T, C)
        t = tokens.shape[1]
        q, k, v = self.qkv(tokens).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, T, C / heads)
        out = self.proj(out.transpose(1, 2).reshape(b, t, c))
        return x + out.transpose(1, 2).reshape(x.shape)


class ConditionalUNet(Configurable, nn.Module, config_ignore=("generator",)):
    r"""Palette-style conditional U-Net, :math:`\epsilon_\theta(y_k, \gamma_k, c)`, for 2D and 3D images.

    Forward pass: :math:`e = \mathrm{MLP}(\text{noise\_level\_embedding}(\gamma))`; the input
    :math:`[y_k, c]` (channel concatenation) goes through a 3x3 convolution, then per level
    ``num_res_blocks`` residual blocks (with self-attention at ``attention_levels``) and a stride-2
    convolution, a middle block (residual, attention, residual), and back up with one more block per
    level, each fed the matching skip, and nearest upsampling to the skip's size. Each residual block
    computes

    .. math::

        h = \mathrm{conv}(\mathrm{SiLU}(\mathrm{GN}(x))), \quad
        h \leftarrow \mathrm{GN}(h) (1 + s) + t, \quad
        x + \mathrm{conv}(\mathrm{drop}(\mathrm{SiLU}(h))),

    with :math:`(s, t) = W e` (the same for every voxel), plus, when an ``encoder`` is given,
    :math:`(s', t') = \mathrm{conv}_{1\times1}(f_\ell(c))` from the encoder's features at the block's
    level :math:`\ell` (spatially varying FiLM). The output is a GroupNorm-SiLU-conv head.

    ``net.config`` holds the constructor arguments (``generator`` aside, see
    :class:`~plasticine.core.Configurable`); ``net.settings`` is the :class:`UNetConfig` in use.

    Args:
        config: the hyper-parameters (default: :class:`UNetConfig` ``()``, 2D, one image and one
            condition channel).
        encoder: optional learned condition encoder adding FiLM features at every level; its
            ``in_channels`` must equal ``config.cond_channels``, its number of levels
            ``len(config.channel_mults)``, its ``ndim`` ``config.ndim``. The condition is still
            concatenated at the input.
        channels_last: store the convolution weights in channels-last memory format
            (``channels_last_3d`` in 3D). The values are the same either way; on the CPU oneDNN then
            runs the network channels-last, about 20% faster per step in 2D (measured with
            ``benchmarks/diffusion.py``). The output is returned contiguous.
        generator: source of the initial weights (:func:`init_parameters`, the encoder's too);
            None keeps PyTorch's default initialisation from the global generator.

    Raises:
        ValueError: for an encoder that does not fit the config.

    Shape:
        noisy: ``(B, C, *S)``; gamma: ``(B,)``; condition: ``(B, Cc, *S)`` or None (exactly when
        ``cond_channels == 0``); out: ``(B, C, *S)``, any ``S``.

    Example:
        >>> import torch
        >>> net = ConditionalUNet(UNetConfig(ndim=2, base_channels=8, channel_mults=(1, 2), attention_levels=(1,)))
        >>> eps = net(torch.randn(2, 1, 13, 10), torch.tensor([0.3, 0.9]), torch.randn(2, 1, 13, 10))
        >>> eps.shape
        torch.Size([2, 1, 13, 10])

    References:
        C. Saharia et al., "Palette: Image-to-Image Diffusion Models", SIGGRAPH 2022.
        E. Perez et al., "FiLM: Visual Reasoning with a General Conditioning Layer", AAAI 2018.
    """

    def __init__(
        self,
        config: UNetConfig | None = None,
        encoder: "LearnedConditioning | None" = None,
        channels_last: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        config = UNetConfig() if config is None else config
        if not isinstance(config, UNetConfig):
            raise ValueError(f"config: expected a UNetConfig, got {type(config).__name__}")
        self.settings = config
        levels = len(config.channel_mults)
        film_ch: list[int] = [0] * levels
        if encoder is not None:
            if encoder.in_channels != config.cond_channels:
                raise ValueError(f"encoder: expected in_channels == cond_channels = {config.cond_channels}, got {encoder.in_channels}")
            if len(encoder.channels) != levels:
                raise ValueError(f"encoder: expected {levels} levels (len(channel_mults)), got {len(encoder.channels)}")
            if encoder.ndim != config.ndim:
                raise ValueError(f"encoder: expected ndim {config.ndim}, got {encoder.ndim}")
            film_ch = list(encoder.channels)
        self.encoder = encoder
        nd, groups, drop = config.ndim, config.norm_groups, config.dropout
        base = config.base_channels
        self.embed_dim = base
        emb_dim = 4 * base
        self.embed_mlp = nn.Sequential(nn.Linear(base, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim), nn.SiLU())
        self.stem = _conv(nd, config.in_channels + config.cond_channels, base, 3)

        chans = [base * m for m in config.channel_mults]
        skips = [base]
        self.down_blocks = nn.ModuleList()
        self.down_attn = nn.ModuleList()
        self.downsample = nn.ModuleList()
        ch = base
        for lvl, out_ch in enumerate(chans):
            blocks, attns = nn.ModuleList(), nn.ModuleList()
            for _ in range(config.num_res_blocks):
                blocks.append(_ResBlock(nd, ch, out_ch, emb_dim, groups, drop, film_ch[lvl]))
                attns.append(_Attention(out_ch, config.num_heads, groups) if lvl in config.attention_levels else nn.Identity())
                ch = out_ch
                skips.append(ch)
            self.down_blocks.append(blocks)
            self.down_attn.append(attns)
            if lvl < levels - 1:
                self.downsample.append(_conv(nd, ch, ch, 3, stride=2))
                skips.append(ch)
        mid_attn = (levels - 1) in config.attention_levels
        self.mid1 = _ResBlock(nd, ch, ch, emb_dim, groups, drop, film_ch[-1])
        self.mid_attn = _Attention(ch, config.num_heads, groups) if mid_attn else nn.Identity()
        self.mid2 = _ResBlock(nd, ch, ch, emb_dim, groups, drop, film_ch[-1])

        self.up_blocks = nn.ModuleList()
        self.up_attn = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for lvl in reversed(range(levels)):
            blocks, attns = nn.ModuleList(), nn.ModuleList()
            for _ in range(config.num_res_blocks + 1):
                blocks.append(_ResBlock(nd, ch + skips.pop(), chans[lvl], emb_dim, groups, drop, film_ch[lvl]))
                attns.append(_Attention(chans[lvl], config.num_heads, groups) if lvl in config.attention_levels else nn.Identity())
                ch = chans[lvl]
            self.up_blocks.append(blocks)
            self.up_attn.append(attns)
            if lvl > 0:
                self.upsample.append(_conv(nd, ch, ch, 3))
        self.head = nn.Sequential(nn.GroupNorm(groups, ch), nn.SiLU(), _conv(nd, ch, config.in_channels, 3))
        if generator is not None:
            init_parameters(self, generator)
        self.channels_last = bool(channels_last)
        if self.channels_last:
            # convolution weights channels-last: oneDNN then runs the whole network channels-last
            self.to(memory_format=torch.channels_last if nd == 2 else torch.channels_last_3d)

    def forward(
        self,
        noisy: torch.Tensor,
        gamma: torch.Tensor,
        condition: torch.Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Predict the noise in ``noisy`` at signal level ``gamma`` given ``condition``.

        Args:
            noisy: :math:`y_k = \\sqrt{\\gamma} y_0 + \\sqrt{1 - \\gamma} \\epsilon`.
            gamma: cumulative signal levels :math:`\\gamma_k \\in (0, 1]`, one per batch item (any
                floating dtype; float64 from a schedule is fine).
            condition: the condition, same dtype as ``noisy``; None exactly when ``cond_channels == 0``.
            generator: source of the dropout masks in training mode (None: torch's global
                generator); unused in eval mode or with ``dropout = 0``.

        Returns:
            :math:`\\hat\\epsilon`, same shape and dtype as ``noisy``.

        Raises:
            ValueError: for a wrong shape, channel count, dtype or dimensionality, a missing or
                unexpected condition, or ``gamma`` outside :math:`(0, 1]` (under ``torch.compile``
                the value check gives NaN instead, see :func:`~plasticine.core.check_values`).

        Shape:
            noisy: ``(B, C, *S)``; gamma: ``(B,)``; condition: ``(B, Cc, *S)`` or None; out: ``(B, C, *S)``.
        """
        cfg = self.settings
        dims = check_shape(noisy, "B C *S", "noisy", spatial=(cfg.ndim,))
        if dims["C"] != cfg.in_channels:
            raise ValueError(f"noisy: expected {cfg.in_channels} channels (UNetConfig.in_channels), got shape {tuple(noisy.shape)}")
        if not noisy.is_floating_point():
            raise ValueError(f"noisy: expected a floating tensor, got {noisy.dtype}")
        check_shape(gamma, "B", "gamma", bindings={"B": dims["B"]})
        gamma = _check_gamma_values(gamma)
        x = noisy
        if cfg.cond_channels == 0:
            if condition is not None:
                raise ValueError(f"condition: this network is unconditional (cond_channels=0), got a tensor of shape {tuple(condition.shape)}")
        else:
            if condition is None:
                raise ValueError(f"condition: expected a ({dims['B']}, {cfg.cond_channels}, *S) tensor (cond_channels={cfg.cond_channels}), got None")
            check_shape(condition, f"B {cfg.cond_channels} *S", "condition", bindings=dict(dims), spatial=(cfg.ndim,))
            if condition.dtype != noisy.dtype:
                raise ValueError(f"condition: expected dtype {noisy.dtype} (that of noisy), got {condition.dtype}")
            x = torch.cat([noisy, condition], dim=1)

        emb = self.embed_mlp(noise_level_embedding(gamma, self.embed_dim).to(device=noisy.device, dtype=noisy.dtype))
        feats: list[torch.Tensor | None] = [None] * len(cfg.channel_mults)
        if self.encoder is not None:
            feats = list(self.encoder.pyramid(condition))

        h = self.stem(x)
        skips = [h]
        for lvl, (blocks, attns) in enumerate(zip(self.down_blocks, self.down_attn)):
            for block, attn in zip(blocks, attns):
                h = attn(block(h, emb, feats[lvl], generator))
                skips.append(h)
            if lvl < len(self.downsample):
                h = self.downsample[lvl](h)
                skips.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb, feats[-1], generator)), emb, feats[-1], generator)
        levels = len(cfg.channel_mults)
        for i, (blocks, attns) in enumerate(zip(self.up_blocks, self.up_attn)):
            lvl = levels - 1 - i
            for block, attn in zip(blocks, attns):
                h = attn(block(torch.cat([h, skips.pop()], dim=1), emb, feats[lvl], generator))
            if lvl > 0:
                h = F.interpolate(h, size=skips[-1].shape[2:], mode="nearest")
                h = self.upsample[i](h)
        return self.head(h).contiguous()
