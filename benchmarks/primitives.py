"""Speed and memory of plasticine's registration primitives against the peer libraries.

One run times every primitive in plasticine and in each installed peer (MONAI, VoxelMorph with
neurite, deepali, kornia, torchreg) on the same inputs, and prints one table per primitive with
the ratio plasticine / fastest peer (below 1: plasticine is faster). See ``benchmarks/README.md``
for what is measured, how, and where the peers' definitions differ.

Usage::

    python benchmarks/primitives.py                 # full run: 2D and 3D, CPU (and CUDA if present)
    python benchmarks/primitives.py --quick         # 2D only, 2-3 calls each (CI smoke run, about a minute on idle cores)
    python benchmarks/primitives.py --only warp --only mutual_information --json out.json
    python benchmarks/primitives.py --compiled      # plasticine's warp and squaring: torch.compile against eager

A primitive that plasticine does not provide yet is reported as ``missing``; a peer that cannot
be imported is reported as ``unavailable`` with the reason; a peer without the operation (or
without its 3D version) is listed under the table.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _timing as T  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)

InputKind = Literal["velocity", "warp", "pair", "field"]
Status = Literal["ok", "missing", "unavailable", "error"]

SHAPES: dict[int, tuple[int, ...]] = {2: (256, 256), 3: (96, 96, 96)}
"""Spatial size per number of dimensions (1x2x256x256 in 2D, 1x3x96x96x96 in 3D)."""

SQUARING_STEPS = 7
SQUARING_CALLS = 11
"""Timed calls of every library's scaling and squaring, interleaved: the lean / autograd and lean / peer time ratios are read from them."""
AUTOGRAD_VARIANT = "plasticine-autograd"
"""plasticine's scaling and squaring with ``memory='autograd'``: a row of its own, not a peer."""
LNCC_WINDOW = 9
SLOW_CALL_S = 1.0
"""A primitive whose forward takes longer than this (seconds) gets no warm-up of its backward."""
INTERIOR_MARGIN = 8
"""Voxels dropped at every border before comparing a peer's field with plasticine's (padding differs)."""

PEER_DISTRIBUTIONS = {
    "plasticine": "plasticine",
    "monai": "monai",
    "voxelmorph": "voxelmorph",
    "neurite": "neurite",
    "deepali": "hf-deepali",
    "kornia": "kornia",
    "torchreg": "torchreg",
}


# ----------------------------------------------------------------------------------------------
# Imports of plasticine and the peers, failing softly


class Unavailable(Exception):
    """A library (or one of its functions) cannot be used; the message says why."""


class Missing(Exception):
    """plasticine does not (yet) provide the primitive."""


_IMPORT_ERRORS: dict[str, str] = {}


def peer(module: str) -> Any:
    """Import a peer module, or raise :class:`Unavailable` with the import error (cached).

    Args:
        module: dotted module name, e.g. ``"monai.losses"``.

    Returns:
        The module.

    Raises:
        Unavailable: if the import fails for any reason; the message names the error.
    """
    if module in _IMPORT_ERRORS:
        raise Unavailable(_IMPORT_ERRORS[module])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module(module)
    except Exception as exc:  # any import failure makes the peer unavailable, never the run fail
        _IMPORT_ERRORS[module] = f"import {module} failed: {type(exc).__name__}: {exc}".splitlines()[0][:200]
        raise Unavailable(_IMPORT_ERRORS[module]) from None


def plasticine_fn(module: str, name: str) -> Callable[..., Any]:
    """``<module>.<name>`` of plasticine, or raise :class:`Missing` when it does not exist yet.

    Args:
        module: dotted module name, e.g. ``"plasticine.losses"``.
        name: attribute of that module.

    Returns:
        The function.

    Raises:
        Missing: if the module cannot be imported or lacks ``name``.
    """
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise Missing(f"{module} not importable ({exc})") from None
    fn = getattr(mod, name, None)
    if fn is None:
        raise Missing(f"{module}.{name} does not exist yet")
    return fn


def library_versions() -> dict[str, str]:
    """Installed version of plasticine and of each peer distribution.

    Returns:
        Library name -> version, or ``"not installed"``.
    """
    out = {}
    for lib, dist in PEER_DISTRIBUTIONS.items():
        try:
            out[lib] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[lib] = "not installed"
    return out


# ----------------------------------------------------------------------------------------------
# Inputs


def _smooth(channels: int, shape: tuple[int, ...], g: torch.Generator, cells: int = 8) -> torch.Tensor:
    """Smooth random field: Gaussian noise on a coarse grid, upsampled (bi/trilinearly)."""
    coarse = torch.randn(1, channels, *[cells] * len(shape), generator=g)
    mode = "bilinear" if len(shape) == 2 else "trilinear"
    return F.interpolate(coarse, size=shape, mode=mode, align_corners=True)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return (x - x.amin()) / (x.amax() - x.amin())


def make_inputs(
    kind: InputKind, ndim: int, device: torch.device, seed: int = 0, shape: tuple[int, ...] | None = None
) -> dict[str, torch.Tensor]:
    """Benchmark inputs (float32, batch 1), the same for every library.

    * ``velocity``: ``v`` ``(1, N, *S)``, smooth, largest vector 4 voxels;
    * ``warp``: ``image`` ``(1, 1, *S)`` in [0, 1] and displacement ``u`` ``(1, N, *S)``, up to 4 voxels;
    * ``pair``: ``moving`` and ``fixed`` ``(1, 1, *S)`` in [0, 1], related by a non-monotone
      intensity map plus noise (a multi-modal pair, as MI is for);
    * ``field``: displacement ``u`` ``(1, N, *S)``, up to 2 voxels.

    Args:
        kind: which inputs.
        ndim: 2 or 3 (sizes from :data:`SHAPES`).
        device: where the tensors live.
        seed: seed of the ``torch.Generator`` that draws them (on the CPU, then moved).
        shape: spatial size, or None for ``SHAPES[ndim]``.

    Returns:
        Name -> tensor, as listed above.

    Shape:
        ``v``, ``u``: ``(1, N, *S)``; ``image``, ``moving``, ``fixed``: ``(1, 1, *S)``.
    """
    shape = SHAPES[ndim] if shape is None else tuple(shape)
    g = torch.Generator().manual_seed(seed)
    if kind in ("velocity", "warp", "field"):
        u = _smooth(ndim, shape, g)
        u = u * ((2.0 if kind == "field" else 4.0) / u.norm(dim=1).amax())
        out = {"v" if kind == "velocity" else "u": u}
        if kind == "warp":
            out["image"] = _unit(_smooth(1, shape, g, cells=16) + 0.3 * _smooth(1, shape, g, cells=32))
    else:
        fixed = _unit(_smooth(1, shape, g, cells=12) + 0.5 * _smooth(1, shape, g, cells=32))
        moving = _unit(torch.sin(3.0 * fixed) ** 2 + 0.05 * torch.randn(fixed.shape, generator=g))
        out = {"moving": moving, "fixed": fixed}
    return {k: v.to(device).contiguous() for k, v in out.items()}


def to_cube(u: torch.Tensor) -> torch.Tensor:
    """Voxel displacement in tensor axis order -> normalised [-1, 1] units, x component first.

    The convention of deepali (``align_corners=True``) and torchreg: component ``k`` is along
    the spatial axis ``N - 1 - k`` and measured in units of half the grid's extent.

    Args:
        u: displacement in voxels, channel ``i`` along axis ``i``.

    Returns:
        The same field in normalised units.

    Shape:
        u: ``(B, N, *S)``; out: ``(B, N, *S)``.
    """
    shape = u.shape[2:]
    scale = torch.tensor([2.0 / (s - 1) for s in shape], dtype=u.dtype, device=u.device)
    return (u * scale.view(1, -1, *[1] * len(shape))).flip(1)


def from_cube(w: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_cube`.

    Args:
        w: displacement in normalised units, x component first.

    Returns:
        The field in voxels, channel ``i`` along axis ``i``.

    Shape:
        w: ``(B, N, *S)``; out: ``(B, N, *S)``.
    """
    shape = w.shape[2:]
    scale = torch.tensor([(s - 1) / 2.0 for s in shape], dtype=w.dtype, device=w.device)
    return w.flip(1) * scale.view(1, -1, *[1] * len(shape))


def leaf(x: torch.Tensor) -> torch.Tensor:
    """A fresh leaf copy of ``x`` that requires grad.

    Args:
        x: any tensor.

    Returns:
        A detached copy with ``requires_grad=True``.
    """
    return x.detach().clone().requires_grad_(True)


# ----------------------------------------------------------------------------------------------
# Implementations: each builder returns the zero-argument call to time and the leaves to
# differentiate with respect to.


@dataclass
class Bound:
    """One library's primitive bound to its inputs.

    Attributes:
        fn: computes the output from the leaves (tensor or scalar).
        leaves: inputs that require grad (the backward pass differentiates with respect to them).
        to_ref: maps the output to plasticine's convention for the agreement check, or None.
    """

    fn: Callable[[], torch.Tensor]
    leaves: list[torch.Tensor]
    to_ref: Callable[[torch.Tensor], torch.Tensor] | None = None


Builder = Callable[[dict[str, torch.Tensor], dict[str, Any]], Bound]


@dataclass(frozen=True)
class Impl:
    """A library's implementation of a primitive.

    Attributes:
        library: name shown in the table.
        build: builds a :class:`Bound` from the inputs and the primitive's parameters.
        dims: numbers of spatial dimensions it supports.
        note: how its call or definition differs (shown under the table).
    """

    library: str
    build: Builder
    dims: tuple[int, ...] = (2, 3)
    note: str = ""


@dataclass(frozen=True)
class Primitive:
    """A benchmarked operation.

    Attributes:
        name: selector for ``--only`` (prefix match).
        title: table heading.
        inputs: which inputs it takes (see :func:`make_inputs`).
        backward: whether fwd+bwd is timed (False: forward only).
        params: parameters passed to every builder (bins, window, steps).
        impls: plasticine first, then the peers.
        absent: peers that do not offer the operation, with a word on why.
        calls: timed calls per library and pass, as many whatever the time budget (0: the
            settings' repeats and budget); more calls for a comparison that must hold on a loaded
            machine. Its table is followed by plasticine's ratio to every other row.
    """

    name: str
    title: str
    inputs: InputKind
    backward: bool
    params: dict[str, Any]
    impls: tuple[Impl, ...]
    absent: str = ""
    calls: int = 0


# -- scaling and squaring --------------------------------------------------------------------


def _sas_plasticine(inp, p):
    f = plasticine_fn("plasticine.registration", "scaling_and_squaring")
    v = leaf(inp["v"])
    return Bound(lambda: f(v, p["steps"]), [v])


def _sas_plasticine_autograd(inp, p):
    f = plasticine_fn("plasticine.registration", "scaling_and_squaring")
    v = leaf(inp["v"])
    return Bound(lambda: f(v, p["steps"], memory="autograd"), [v])


def _sas_monai(inp, p):
    blocks = peer("monai.networks.blocks")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = blocks.DVF2DDF(num_steps=p["steps"], mode="bilinear", padding_mode="border")
    v = leaf(inp["v"])
    return Bound(lambda: m(v), [v])


def _sas_voxelmorph(inp, p):
    modules = peer("voxelmorph.nn.modules")
    m = modules.IntegrateVelocityField(steps=p["steps"])
    v = leaf(inp["v"])
    return Bound(lambda: m(v), [v])


def _sas_deepali(inp, p):
    flow = peer("deepali.core.flow")
    w = leaf(to_cube(inp["v"]))
    return Bound(lambda: flow.expv(w, steps=p["steps"]), [w], from_cube)


def _sas_torchreg(inp, p):
    syn = peer("torchreg.syn")
    base = syn.SyNBase(time_steps=p["steps"])
    w = leaf(to_cube(inp["v"]))
    return Bound(lambda: base.diffeomorphic_transform(w), [w], from_cube)


# -- warp ------------------------------------------------------------------------------------


def _warp_plasticine(inp, p):
    f = plasticine_fn("plasticine.core", "warp")
    u, img = leaf(inp["u"]), inp["image"]
    return Bound(lambda: f(img, u), [u])


def _warp_monai(inp, p):
    blocks = peer("monai.networks.blocks")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = blocks.Warp(mode="bilinear", padding_mode="border")
    u, img = leaf(inp["u"]), inp["image"]
    return Bound(lambda: m(img, u), [u])


def _warp_voxelmorph(inp, p):
    modules = peer("voxelmorph.nn.modules")
    m = modules.SpatialTransformer(interpolation_mode="linear")
    u, img = leaf(inp["u"]), inp["image"]
    return Bound(lambda: m(img, u), [u])


def _warp_deepali(inp, p):
    flow = peer("deepali.core.flow")
    grid_mod = peer("deepali.core.grid")
    img = inp["image"]
    grid = grid_mod.Grid(shape=img.shape[2:], align_corners=True).coords(dtype=img.dtype, device=img.device)
    w = leaf(to_cube(inp["u"]))
    return Bound(
        lambda: flow.warp_image(img, grid, flow=w.movedim(1, -1), mode="linear", padding="border", align_corners=True), [w]
    )


def _warp_kornia(inp, p):
    tf = peer("kornia.geometry.transform")
    kgrid = peer("kornia.geometry.grid")
    img = inp["image"]
    h, w = img.shape[2:]
    base = kgrid.create_meshgrid(h, w, normalized_coordinates=False, device=img.device, dtype=img.dtype)
    bx, by = base[..., 0], base[..., 1]
    u = leaf(inp["u"])
    return Bound(
        lambda: tf.remap(img, bx + u[:, 1], by + u[:, 0], mode="bilinear", padding_mode="border", align_corners=True), [u]
    )


def _warp_torchreg(inp, p):
    syn = peer("torchreg.syn")
    base = syn.SyNBase()
    img = inp["image"]
    w = leaf(to_cube(inp["u"]))
    return Bound(lambda: base.spatial_transform(img, w), [w])


# -- mutual information ----------------------------------------------------------------------


def _mi_plasticine(inp, p):
    f = plasticine_fn("plasticine.losses", "mutual_information")
    mov, fix = leaf(inp["moving"]), inp["fixed"]
    return Bound(lambda: f(mov, fix, bins=p["bins"], normalized=False), [mov])


def _mi_monai(inp, p):
    losses = peer("monai.losses")
    m = losses.GlobalMutualInformationLoss(num_bins=p["bins"])
    mov, fix = leaf(inp["moving"]), inp["fixed"]
    return Bound(lambda: m(mov, fix), [mov])


def _mi_kornia(inp, p):
    losses = peer("kornia.losses")
    mov, fix = leaf(inp["moving"]), inp["fixed"]
    return Bound(lambda: losses.mutual_information_loss(mov.reshape(1, -1), fix.reshape(1, -1), num_bins=p["bins"]), [mov])


def _mi_deepali(inp, p):
    lf = peer("deepali.losses.functional")
    mov, fix = leaf(inp["moving"]), inp["fixed"]
    return Bound(lambda: lf.mi_loss(mov, fix, num_bins=p["bins"]), [mov])


# -- local NCC -------------------------------------------------------------------------------


def _lncc_plasticine(inp, p):
    f = plasticine_fn("plasticine.losses", "local_ncc")
    mov, fix = leaf(inp["moving"]), inp["fixed"]
    return Bound(lambda: f(mov, fix, window=p["window"]), [mov])


def _lncc_monai(inp, p):
    losses = peer("monai.losses")
    mov, fix = leaf(inp["moving"]), inp["fixed"]
    m = losses.LocalNormalizedCrossCorrelationLoss(spatial_dims=mov.dim() - 2, kernel_size=p["window"])
    return Bound(lambda: m(mov, fix), [mov])


def _lncc_voxelmorph(inp, p):
    peer("voxelmorph")
    modules = peer("neurite.nn.modules")
    m = modules.NCC(window_size=p["window"])
    mov, fix = leaf(inp["moving"]), inp["fixed"]
    return Bound(lambda: m(mov, fix), [mov])


def _lncc_deepali(inp, p):
    lf = peer("deepali.losses.functional")
    mov, fix = leaf(inp["moving"]), inp["fixed"]
    return Bound(lambda: lf.lcc_loss(mov, fix, kernel_size=p["window"]), [mov])


def _lncc_torchreg(inp, p):
    metrics = peer("torchreg.metrics")
    m = metrics.NCC(kernel_size=p["window"])
    mov, fix = leaf(inp["moving"]), inp["fixed"]
    return Bound(lambda: m(mov, fix), [mov])


# -- Jacobian determinant --------------------------------------------------------------------


def _jac_plasticine(inp, p):
    f = plasticine_fn("plasticine.core", "jacobian_determinant")
    u = leaf(inp["u"])
    return Bound(lambda: f(u), [u])


def _jac_deepali(inp, p):
    flow = peer("deepali.core.flow")
    w = leaf(inp["u"].flip(1))  # deepali orders vector components x first; spacing 1 keeps voxel units
    return Bound(lambda: flow.jacobian_det(w, spacing=1.0), [w])


def _jac_torchreg(inp, p):
    utils = peer("torchreg.utils")
    w = leaf(to_cube(inp["u"]).movedim(1, -1))
    return Bound(lambda: utils.jacobi_determinant(w), [w], lambda d: d[None, None])


# -- bending energy --------------------------------------------------------------------------


def _be_plasticine(inp, p):
    f = plasticine_fn("plasticine.losses", "bending_energy")
    u = leaf(inp["u"])
    return Bound(lambda: f(u), [u])


def _be_monai(inp, p):
    losses = peer("monai.losses")
    m = losses.BendingEnergyLoss()
    u = leaf(inp["u"])
    return Bound(lambda: m(u), [u])


def _be_deepali(inp, p):
    lf = peer("deepali.losses.functional")
    u = leaf(inp["u"])
    return Bound(lambda: lf.bending_loss(u, mode="forward_central_backward", spacing=1.0), [u])


# -- gradient regulariser --------------------------------------------------------------------


def _grad_plasticine(inp, p):
    f = plasticine_fn("plasticine.losses", "gradient_smoothness")
    u = leaf(inp["u"])
    return Bound(lambda: f(u), [u])


def _grad_monai(inp, p):
    losses = peer("monai.losses")
    m = losses.DiffusionLoss()
    u = leaf(inp["u"])
    return Bound(lambda: m(u), [u])


def _grad_voxelmorph(inp, p):
    peer("voxelmorph")
    modules = peer("neurite.nn.modules")
    m = modules.SpatialGradient(penalty="l2")
    u = leaf(inp["u"])
    return Bound(lambda: m(u), [u])


def _grad_deepali(inp, p):
    lf = peer("deepali.losses.functional")
    u = leaf(inp["u"])
    return Bound(lambda: lf.grad_loss(u, p=2, q=1, spacing=1.0), [u])


def _mi_primitive(bins: int) -> Primitive:
    return Primitive(
        name=f"mutual_information_{bins}",
        title=f"Mutual information, {bins} bins (image pair, moving differentiated)",
        inputs="pair",
        backward=True,
        params={"bins": bins},
        impls=(
            Impl("plasticine", _mi_plasticine, note="normalized=False (plain MI like the peers); sparse cubic B-spline Parzen kernel, range min-max"),
            Impl("monai", _mi_monai, note="Gaussian Parzen window (sigma = bin width / 2), intensities clamped to [0, 1]"),
            Impl("kornia", _mi_kornia, note="Xu polynomial kernel, range min-max per image, on flattened signals"),
            Impl("deepali", _mi_deepali, note="Gaussian Parzen window (FWHM = bin width), range from data via .item()"),
        ),
        absent="voxelmorph (no MI loss in 0.3.4 / neurite), torchreg (none)",
    )


PRIMITIVES: tuple[Primitive, ...] = (
    Primitive(
        name="scaling_and_squaring",
        title=f"Scaling and squaring, {SQUARING_STEPS} steps (velocity differentiated)",
        inputs="velocity",
        backward=True,
        params={"steps": SQUARING_STEPS},
        impls=(
            Impl("plasticine", _sas_plasticine, note="border padding, memory='lean' (the default: per-step fields kept, grid_sample backward step by step)"),
            Impl(AUTOGRAD_VARIANT, _sas_plasticine_autograd, note="memory='autograd': plain autograd through the 7 steps (not a peer: the row shows lean / autograd)"),
            Impl("monai", _sas_monai, note="DVF2DDF(padding_mode='border')"),
            Impl("voxelmorph", _sas_voxelmorph, note="IntegrateVelocityField: zeros padding (fixed)"),
            Impl("deepali", _sas_deepali, note="expv on normalised coordinates, border padding"),
            Impl("torchreg", _sas_torchreg, dims=(3,), note="SyNBase.diffeomorphic_transform: 3D only, reflection padding"),
        ),
        absent="kornia (no SVF integrator)",
        calls=SQUARING_CALLS,
    ),
    Primitive(
        name="warp",
        title="Warp, linear (displacement differentiated)",
        inputs="warp",
        backward=True,
        params={},
        impls=(
            Impl("plasticine", _warp_plasticine, note="border padding; builds its grid on every call"),
            Impl("monai", _warp_monai, note="Warp(bilinear, border); caches its reference grid"),
            Impl("voxelmorph", _warp_voxelmorph, note="SpatialTransformer: zeros padding (fixed); caches its grid"),
            Impl("deepali", _warp_deepali, note="warp_image on a precomputed Grid.coords(), border padding"),
            Impl("kornia", _warp_kornia, dims=(2,), note="remap on a precomputed meshgrid: 2D only"),
            Impl("torchreg", _warp_torchreg, dims=(3,), note="SyNBase.spatial_transform: 3D only, reflection padding"),
        ),
    ),
    _mi_primitive(32),
    _mi_primitive(64),
    Primitive(
        name="local_ncc",
        title=f"Local NCC, window {LNCC_WINDOW} (moving differentiated)",
        inputs="pair",
        backward=True,
        params={"window": LNCC_WINDOW},
        impls=(
            Impl("plasticine", _lncc_plasticine, note="signed NCC (the peers square it), border windows shrink to the image"),
            Impl("monai", _lncc_monai, note="squared NCC, separable box filter, zero padding"),
            Impl("voxelmorph", _lncc_voxelmorph, note="neurite.nn.modules.NCC (vxm 0.3.4's NCC is a stub): squared NCC"),
            Impl("deepali", _lncc_deepali, note="lcc_loss: 1 - NCC^2 of mean-subtracted windows (two passes)"),
            Impl("torchreg", _lncc_torchreg, dims=(3,), note="metrics.NCC: 3D only, dense 9^3 conv3d (not separable)"),
        ),
        absent="kornia (none)",
    ),
    Primitive(
        name="jacobian_determinant",
        title="Jacobian determinant (forward only)",
        inputs="field",
        backward=False,
        params={},
        impls=(
            Impl("plasticine", _jac_plasticine, note="central differences, one-sided at the edges"),
            Impl("deepali", _jac_deepali, note="jacobian_det (forward_central_backward): same definition"),
            Impl("torchreg", _jac_torchreg, dims=(3,), note="jacobi_determinant: 3D only, edges replicated from 2 voxels in"),
        ),
        absent="monai, voxelmorph (torch), kornia (none)",
    ),
    Primitive(
        name="bending_energy",
        title="Bending energy (displacement differentiated)",
        inputs="field",
        backward=True,
        params={},
        impls=(
            Impl("plasticine", _be_plasticine, note="compact [1,-2,1] and 2x2 forward-difference mixed stencils"),
            Impl("monai", _be_monai, note="BendingEnergyLoss: compact [1,-2,1] and 4-point mixed stencils, interior only"),
            Impl("deepali", _be_deepali, note="bending_loss(mode='forward_central_backward'): repeated central differences"),
        ),
        absent="voxelmorph, kornia, torchreg (none)",
    ),
    Primitive(
        name="gradient_smoothness",
        title="Gradient regulariser, squared first differences (displacement differentiated)",
        inputs="field",
        backward=True,
        params={},
        impls=(
            Impl("plasticine", _grad_plasticine, note="forward differences, mean per axis, summed over axes"),
            Impl("monai", _grad_monai, note="DiffusionLoss: central differences, interior only"),
            Impl("voxelmorph", _grad_voxelmorph, note="neurite SpatialGradient('l2') (vxm Grad('l2') is a stub): forward differences"),
            Impl("deepali", _grad_deepali, note="grad_loss(p=2, q=1): central differences, one-sided at edges"),
        ),
        absent="kornia, torchreg (none)",
    ),
)


# ----------------------------------------------------------------------------------------------
# Running one case


@dataclass
class Settings:
    """How long to measure."""

    warmup: int
    repeats: int
    min_repeats: int
    max_seconds: float | None


@dataclass
class Result:
    """Measurements of one library on one primitive, size and device."""

    primitive: str
    library: str
    ndim: int
    size: str
    device: str
    status: Status
    reason: str = ""
    fwd: T.Timing | None = None
    fwdbwd: T.Timing | None = None
    value: float | None = None
    max_abs_diff: float | None = None
    peak_mb_fwd: float | None = None
    peak_mb_fwdbwd: float | None = None
    ref_out: torch.Tensor | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON form (timings in ms, memory in MiB)."""
        return {
            "primitive": self.primitive,
            "library": self.library,
            "ndim": self.ndim,
            "size": self.size,
            "device": self.device,
            "status": self.status,
            "reason": self.reason,
            "fwd_ms": None if self.fwd is None else self.fwd.median_ms,
            "fwdbwd_ms": None if self.fwdbwd is None else self.fwdbwd.median_ms,
            "fwd_times_ms": None if self.fwd is None else list(self.fwd.times_ms),
            "fwdbwd_times_ms": None if self.fwdbwd is None else list(self.fwdbwd.times_ms),
            "fwd_cpu_times_ms": None if self.fwd is None else list(self.fwd.cpu_times_ms),
            "fwdbwd_cpu_times_ms": None if self.fwdbwd is None else list(self.fwdbwd.cpu_times_ms),
            "value": self.value,
            "max_abs_diff_vs_plasticine": self.max_abs_diff,
            "peak_mb_fwd": self.peak_mb_fwd,
            "peak_mb_fwdbwd": self.peak_mb_fwdbwd,
        }


def _size_label(prim: Primitive, ndim: int) -> str:
    channels = {"velocity": ndim, "warp": ndim, "field": ndim, "pair": 1}[prim.inputs]
    return "x".join(str(s) for s in (1, channels, *SHAPES[ndim]))


def _bind(prim: Primitive, impl: Impl, ndim: int, device: torch.device) -> Bound:
    inputs = make_inputs(prim.inputs, ndim, device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return impl.build(inputs, prim.params)


def _forward(b: Bound) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        with torch.no_grad():
            return b.fn()

    return run


def _forward_backward(b: Bound) -> Callable[[], tuple[torch.Tensor, ...]]:
    def run() -> tuple[torch.Tensor, ...]:
        out = b.fn()
        return torch.autograd.grad(out.sum() if out.dim() else out, b.leaves)

    return run


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:160]


def bind_case(prim: Primitive, impl: Impl, ndim: int, device: torch.device) -> tuple[Result, Bound | None]:
    """Build one library's call on fresh inputs.

    Args:
        prim: the primitive.
        impl: the library's implementation.
        ndim: 2 or 3.
        device: where to run.

    Returns:
        ``(result, bound)``: ``bound`` is None when the call cannot be built, and then
        ``result.status`` says why (``missing``, ``unavailable`` or ``error``).
    """
    res = Result(prim.name, impl.library, ndim, _size_label(prim, ndim), str(device), "ok")
    try:
        return res, _bind(prim, impl, ndim, device)
    except Missing as exc:
        res.status, res.reason = "missing", str(exc)
    except Unavailable as exc:
        res.status, res.reason = "unavailable", str(exc)
    except Exception as exc:
        res.status, res.reason = "error", _error(exc)
    return res, None


def time_group(prim: Primitive, ndim: int, device: torch.device, settings: Settings) -> list[Result]:
    """Time every library of one primitive on one size, round-robin (see ``time_interleaved``).

    The forward pass (no grad) of all libraries is timed first, then the forward+backward pass.
    One untimed forward of each library gives the value shown in the table (the loss, or the
    field compared with plasticine's).

    Args:
        prim: the primitive.
        ndim: 2 or 3.
        device: where to run.
        settings: repeats and time budget.

    Returns:
        One :class:`Result` per library that supports ``ndim`` (memory not yet filled in).
    """
    results: list[Result] = []
    bound: dict[str, Bound] = {}
    for impl in prim.impls:
        if ndim in impl.dims:
            r, b = bind_case(prim, impl, ndim, device)
            results.append(r)
            if b is not None:
                bound[impl.library] = b
    by_lib = {r.library: r for r in results}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        slow = False
        for lib, b in list(bound.items()):
            r = by_lib[lib]
            try:
                t0 = time.perf_counter()
                out = _forward(b)()
                slow = slow or time.perf_counter() - t0 > SLOW_CALL_S
                if out.numel() == 1:
                    r.value = float(out)
                else:
                    r.ref_out = (b.to_ref(out) if b.to_ref is not None else out).detach().float().cpu()
                del out
            except Exception as exc:
                r.status, r.reason = "error", _error(exc)
                del bound[lib]
        kwargs = dict(repeats=settings.repeats, min_repeats=settings.min_repeats, max_seconds=settings.max_seconds)
        if prim.calls:
            kwargs = dict(repeats=prim.calls, min_repeats=prim.calls, max_seconds=None)
        # the forward above was the forward's warm-up; the backward gets its own unless the calls
        # take seconds (then first-call costs are noise and a warm-up round would double the run)
        fwd, errors = T.time_interleaved({k: _forward(b) for k, b in bound.items()}, device, warmup=0, **kwargs)
        fwdbwd: dict[str, T.Timing] = {}
        if prim.backward:
            fwdbwd, errors_b = T.time_interleaved(
                {k: _forward_backward(b) for k, b in bound.items() if k not in errors}, device,
                warmup=0 if slow else settings.warmup, **kwargs,
            )
            errors.update(errors_b)
    for lib in bound:
        r = by_lib[lib]
        r.fwd, r.fwdbwd = fwd.get(lib), fwdbwd.get(lib)
        if lib in errors:
            r.status, r.reason = "error", errors[lib]
    return results


def memory_case(prim: Primitive, impl: Impl, ndim: int, device: torch.device) -> dict[str, float | None]:
    """Peak memory of the first call: one forward+backward, or one forward for a forward-only primitive.

    Being the first call, it includes what the callee caches on first use (a reference grid,
    say). On the CPU, call it in a process started with ``_timing.memory_worker_env``.

    Args:
        prim: the primitive.
        impl: the library's implementation.
        ndim: 2 or 3.
        device: where to run.

    Returns:
        ``{"peak_mb_fwd": ..., "peak_mb_fwdbwd": ...}`` in MiB (None where not measured).
    """
    b = _bind(prim, impl, ndim, device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if prim.backward:
            return {"peak_mb_fwd": None, "peak_mb_fwdbwd": T.peak_memory_mb(_forward_backward(b), device)}
        return {"peak_mb_fwd": T.peak_memory_mb(_forward(b), device), "peak_mb_fwdbwd": None}


def _warm_up_torch() -> None:
    """Start torch's thread pools and kernels once, so the first measured case does not pay for it."""
    for n in (2, 3):
        x = torch.rand(1, 2, *[8] * n, requires_grad=True)
        grid = torch.rand(1, *[8] * n, n) * 2 - 1
        pool = F.avg_pool2d if n == 2 else F.avg_pool3d
        y = F.grid_sample(x, grid, align_corners=True).sum() + pool(x, 3, stride=1).sum()
        torch.autograd.grad(y, x)
    torch.bmm(torch.rand(1, 64, 256), torch.rand(1, 256, 64))


def _find(prim_name: str, library: str) -> tuple[Primitive, Impl]:
    prim = next(p for p in PRIMITIVES if p.name == prim_name)
    return prim, next(i for i in prim.impls if i.library == library)


def _memory_request(req: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(int(req["threads"]))
    prim, impl = _find(req["primitive"], req["library"])
    return memory_case(prim, impl, int(req["ndim"]), torch.device(req["device"]))


# ----------------------------------------------------------------------------------------------
# Tables


def _interior(x: torch.Tensor) -> torch.Tensor:
    m = INTERIOR_MARGIN
    return x[(slice(None), slice(None)) + tuple(slice(m, s - m) for s in x.shape[2:])]


def compare_with_plasticine(results: list[Result]) -> None:
    """Fill ``max_abs_diff`` of each peer's field output against plasticine's, then drop the fields.

    The difference is taken over the interior (:data:`INTERIOR_MARGIN` voxels dropped at every
    border, where the paddings differ).

    Args:
        results: the results of one primitive, size and device.
    """
    ref = next((r.ref_out for r in results if r.library == "plasticine" and r.ref_out is not None), None)
    for r in results:
        if ref is not None and r.ref_out is not None and r.library != "plasticine" and r.ref_out.shape == ref.shape:
            r.max_abs_diff = float((_interior(r.ref_out) - _interior(ref)).abs().max())
        r.ref_out = None


def _fastest_peer(results: list[Result], key: Callable[[Result], float | None]) -> tuple[float | None, str]:
    best: tuple[float | None, str] = (None, "")
    for r in results:
        v = key(r)
        if r.library not in ("plasticine", AUTOGRAD_VARIANT) and r.status == "ok" and v is not None and (best[0] is None or v < best[0]):
            best = (v, r.library)
    return best


def _ms(t: T.Timing | None, stat: str = "median") -> float | None:
    if t is None:
        return None
    return t.median_ms if stat == "median" else t.min_ms


def _peak(r: Result) -> float | None:
    return r.peak_mb_fwdbwd if r.peak_mb_fwdbwd is not None else r.peak_mb_fwd


RATIO_KEYS: dict[str, Callable[[Result], float | None]] = {
    "fwd": lambda r: _ms(r.fwd),
    "fwdbwd": lambda r: _ms(r.fwdbwd),
    "memory": _peak,
    "fwd_min": lambda r: _ms(r.fwd, "min"),
    "fwdbwd_min": lambda r: _ms(r.fwdbwd, "min"),
}


def ratios(results: list[Result]) -> dict[str, dict[str, Any]]:
    """plasticine / best peer of one size and device.

    Keys: ``fwd`` and ``fwdbwd`` (median times), ``memory`` (peak of fwd+bwd, or of fwd for a
    forward-only primitive), ``fwd_min`` and ``fwdbwd_min`` (fastest call, less sensitive to
    load from other processes). Each value holds the ratio, the best peer and both numbers.

    Args:
        results: the results of one primitive, size and device.

    Returns:
        Key -> ``{"ratio", "peer", "peer_value", "plasticine"}`` (None where not measurable).
    """
    own = next((r for r in results if r.library == "plasticine" and r.status == "ok"), None)
    out = {}
    for name, key in RATIO_KEYS.items():
        best, lib = _fastest_peer(results, key)
        mine = None if own is None else key(own)
        out[name] = {"ratio": T.ratio(mine, best), "peer": lib, "peer_value": best, "plasticine": mine}
    return out


def variant_ratios(results: list[Result]) -> dict[str, float | None]:
    """plasticine's default / its ``memory='autograd'`` variant of one size and device (scaling and squaring).

    Args:
        results: the results of one primitive, size and device.

    Returns:
        ``{"fwdbwd", "fwdbwd_min", "memory"}`` ratios (None where either side is missing).
    """
    own = next((r for r in results if r.library == "plasticine" and r.status == "ok"), None)
    other = next((r for r in results if r.library == AUTOGRAD_VARIANT and r.status == "ok"), None)
    if own is None or other is None:
        return {"fwdbwd": None, "fwdbwd_min": None, "memory": None}
    return {k: T.ratio(RATIO_KEYS[k](own), RATIO_KEYS[k](other)) for k in ("fwdbwd", "fwdbwd_min", "memory")}


PAIR_KEYS: dict[str, Callable[[T.Timing], float | None]] = {
    "wall median": lambda t: t.median_ms,
    "wall min": lambda t: t.min_ms,
    "CPU median": lambda t: t.cpu_median_ms,
    "CPU min": lambda t: t.cpu_min_ms,
}
"""The statistics of the timed calls compared by :func:`pair_ratios`."""


def pair_ratios(results: list[Result], backward: bool) -> list[dict[str, Any]]:
    """plasticine / each other library of one size and device: time (four statistics) and peak memory.

    Args:
        results: the results of one primitive, size and device.
        backward: compare the fwd+bwd times (else the forward's).

    Returns:
        One record per other library measured: ``library``, ``time`` (statistic -> ratio, see
        :data:`PAIR_KEYS`) and ``memory`` (None where either side is missing).
    """
    own = next((r for r in results if r.library == "plasticine" and r.status == "ok"), None)
    if own is None:
        return []
    mine = own.fwdbwd if backward else own.fwd
    out = []
    for r in results:
        if r.library == "plasticine" or r.status != "ok":
            continue
        other = r.fwdbwd if backward else r.fwd
        time_ratios = {k: (T.ratio(f(mine), f(other)) if mine is not None and other is not None else None) for k, f in PAIR_KEYS.items()}
        out.append({"library": r.library, "time": time_ratios, "memory": T.ratio(_peak(own), _peak(r))})
    return out


def render_pair_ratios(prim: Primitive, by_size: dict[int, list[Result]]) -> str:
    """The table of plasticine's time and memory ratio to every other library (one row per library and size).

    Args:
        prim: the primitive.
        by_size: ndim -> the results of that size.

    Returns:
        The table with its heading.
    """
    rows = []
    for results in by_size.values():
        calls = {len(t.times_ms) for r in results for t in ([r.fwdbwd if prim.backward else r.fwd]) if t is not None}
        for rec in pair_ratios(results, prim.backward):
            rows.append([rec["library"], results[0].size, "/".join(map(str, sorted(calls))),
                         *(T.format_ratio(rec["time"][k]) for k in PAIR_KEYS), T.format_ratio(rec["memory"])])
    kind = "fwd+bwd" if prim.backward else "fwd"
    heading = (f"-- plasticine / each library [{prim.name}], {kind} time over the calls (interleaved; CPU time = "
               "time.process_time) and peak memory; < 1: plasticine faster / smaller --")
    return heading + "\n" + T.format_table(["library", "size", "calls", *PAIR_KEYS, "memory"], rows,
                                           align=["<", "<", ">", ">", ">", ">", ">", ">"])


def _variant_cell(rat: dict[str, float | None]) -> str:
    return (f"lean / this: f+b {T.format_ratio(rat['fwdbwd'])} (by min {T.format_ratio(rat['fwdbwd_min'])}), "
            f"mem {T.format_ratio(rat['memory'])}")


def _output_cell(r: Result) -> str:
    if r.value is not None:
        return f"{r.value:.4g}"
    if r.max_abs_diff is not None:
        return f"d={r.max_abs_diff:.1e}"
    return ""


def _ratio_cell(rat: dict[str, dict[str, Any]], backward: bool) -> str:
    def part(key: str, label: str, with_peer: bool = True) -> str:
        q = rat[key]
        return f"{label} {T.format_ratio(q['ratio'])}" + (f" ({q['peer']})" if with_peer and q["peer"] else "")

    median = [part("fwd", "fwd")] + ([part("fwdbwd", "f+b")] if backward else []) + [part("memory", "mem")]
    fastest = [part("fwd_min", "fwd")] + ([part("fwdbwd_min", "f+b")] if backward else [])
    return ", ".join(median) + "; by min: " + ", ".join(fastest)


def render_table(prim: Primitive, device: str, by_size: dict[int, list[Result]]) -> str:
    """The table of one primitive on one device: one row per library and size, then the notes.

    Times are "median (min)" in ms; the plasticine row carries the ratios to the fastest peer.

    Args:
        prim: the primitive.
        device: device name for the heading.
        by_size: ndim -> the results of that size.

    Returns:
        The table with its heading and notes.
    """
    headers = ["library", "size", "fwd ms", "fwd+bwd ms", "peak MB", "output", "plasticine / fastest peer"]
    rows = []

    def cell(t: T.Timing | None) -> str:
        return "-" if t is None else f"{T.format_ms(t.median_ms)} ({T.format_ms(t.min_ms)})"

    for results in by_size.values():
        rat = ratios(results)
        for r in results:
            if r.status != "ok":
                rows.append([r.library, r.size, r.status, "", "", "", r.reason[:90]])
                continue
            last = (_ratio_cell(rat, prim.backward) if r.library == "plasticine"
                    else _variant_cell(variant_ratios(results)) if r.library == AUTOGRAD_VARIANT else r.reason[:90])
            rows.append([
                r.library, r.size, cell(r.fwd), cell(r.fwdbwd) if prim.backward else "n/a",
                T.format_mb(_peak(r)), _output_cell(r), last,
            ])
    title = f"== {prim.title} [{prim.name}] on {device} =="
    table = T.format_table(headers, rows, align=["<", "<", ">", ">", ">", ">", "<"])
    notes = [f"  {i.library}: {i.note}" for i in prim.impls if i.note]
    if prim.absent:
        notes.append(f"  not offered by: {prim.absent}")
    notes.append("  times: median (min) in ms; output: loss value, or d = max |peer - plasticine| over interior "
                 f"voxels (margin {INTERIOR_MARGIN}) in plasticine's convention")
    return "\n".join([title, table, "notes:", *notes])


# ----------------------------------------------------------------------------------------------
# Main


def _selected(only: Sequence[str] | None) -> list[Primitive]:
    if not only:
        return list(PRIMITIVES)
    names = [n for arg in only for n in arg.split(",") if n]
    chosen = [p for p in PRIMITIVES if any(p.name == n or p.name.startswith(n) for n in names)]
    if not chosen:
        raise SystemExit(f"--only {names}: no primitive matches; choose from {[p.name for p in PRIMITIVES]}")
    return chosen


def _devices(arg: str) -> list[torch.device]:
    if arg == "auto":
        return [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    dev = torch.device(arg)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available in this torch build / machine")
    return [dev]


def compiled_against_eager(dims: Sequence[int], device: torch.device, settings: Settings) -> list[dict[str, Any]]:
    """Time plasticine's warp and scaling and squaring eagerly and under ``torch.compile``; print the ratios.

    ``torch.compile(fn, fullgraph=True)`` with the default (inductor) backend, compiled and run once
    before the clock starts (the compile time is printed apart); eager and compiled calls
    interleaved (:func:`_timing.time_interleaved`). Forward without grad, and forward+backward of
    the sum. Scaling and squaring with ``memory="lean"`` (the default; compiled it runs as one
    opaque operator) and ``"autograd"`` (compiled as a whole).

    Args:
        dims: spatial dimensions (the sizes of :data:`SHAPES`).
        device: where to run.
        settings: repeats and time budget per measurement.

    Returns:
        One record per case: name, size, eager and compiled medians (ms), ratio, compile seconds.
    """
    from plasticine.core import warp
    from plasticine.registration import scaling_and_squaring

    cases: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
        "warp": lambda img, u: warp(img, u),
        "scaling_and_squaring lean": lambda img, u: scaling_and_squaring(u, SQUARING_STEPS),
        "scaling_and_squaring autograd": lambda img, u: scaling_and_squaring(u, SQUARING_STEPS, memory="autograd"),
    }
    records: list[dict[str, Any]] = []
    rows = []
    for ndim in dims:
        inp = make_inputs("warp", ndim, device)
        img, u = inp["image"], inp["u"]
        for name, fn in cases.items():
            for grad in (False, True):
                torch._dynamo.reset()
                comp = torch.compile(fn, fullgraph=True)
                x = u.detach().clone().requires_grad_(grad)

                def call(f, x=x, grad=grad):
                    if not grad:
                        with torch.no_grad():
                            return f(img, x)
                    out = f(img, x)
                    return torch.autograd.grad(out.sum(), x)

                t0 = time.perf_counter()
                call(comp)
                compile_s = time.perf_counter() - t0
                times, _ = T.time_interleaved({"eager": lambda: call(fn), "compiled": lambda: call(comp)}, device,
                                              warmup=settings.warmup, repeats=settings.repeats,
                                              min_repeats=settings.min_repeats, max_seconds=settings.max_seconds)
                e, c = times["eager"].median_ms, times["compiled"].median_ms
                label = f"1x{ndim}x" + "x".join(map(str, SHAPES[ndim]))
                kind = "fwd+bwd" if grad else "fwd"
                records.append({"case": name, "kind": kind, "size": label, "eager_ms": e, "compiled_ms": c,
                                "ratio": T.ratio(c, e), "compile_s": compile_s})
                rows.append([name, kind, label, T.format_ms(e), T.format_ms(c), T.format_ratio(T.ratio(c, e)), f"{compile_s:.1f}"])
                print(f"  {name} {kind} {label}: eager {e:.3g} ms, compiled {c:.3g} ms", file=sys.stderr, flush=True)
    print(f"== torch.compile (inductor, fullgraph) against eager, {device}; ratio < 1: compiled faster ==")
    print(T.format_table(["primitive", "pass", "size", "eager ms", "compiled ms", "ratio", "compile s"], rows,
                         ["<", "<", "<", ">", ">", ">", ">"]))
    return records


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring and ``--help``).

    Args:
        argv: arguments, or None for ``sys.argv[1:]``.

    Returns:
        The parsed options.
    """
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2D only, 2-3 calls per library (CI smoke run)")
    ap.add_argument("--only", action="append", metavar="NAME",
                    help="primitive(s) to run, prefix match, repeatable or comma-separated: "
                    + ", ".join(p.name for p in PRIMITIVES))
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (CPU, and CUDA when available)")
    ap.add_argument("--dims", type=int, nargs="+", choices=(2, 3), help="spatial dimensions (default 2 3; --quick: 2)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument("--repeats", type=int, help="timed calls per measurement at most (default 11; --quick: 3)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    ap.add_argument("--json", type=Path, metavar="PATH", help="write all results and ratios to PATH")
    ap.add_argument("--compiled", action="store_true",
                    help="instead: plasticine's warp and scaling and squaring under torch.compile against eager")
    ap.add_argument("--memory-worker", action="store_true", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print one table per primitive.

    Args:
        argv: arguments, or None for ``sys.argv[1:]``.

    Returns:
        The process exit code (0; missing or unavailable libraries are reported, not fatal).
    """
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    if args.memory_worker:
        _warm_up_torch()
        T.serve_json_lines(_memory_request)
        return 0

    dims = args.dims or ([2] if args.quick else [2, 3])
    repeats = args.repeats or (3 if args.quick else 11)
    settings = Settings(warmup=0 if args.quick else 1, repeats=repeats, min_repeats=min(2 if args.quick else 3, repeats),
                        max_seconds=0.2 if args.quick else 2.0)
    prims = _selected(args.only)
    devices = _devices(args.device)
    t_start = time.perf_counter()
    if args.compiled:
        print(f"plasticine under torch.compile  torch {torch.__version__}, {args.threads} threads, "
              f"load {T.machine_summary(devices[-1]).get('load_average')}", flush=True)
        records = [dict(r, device=str(d)) for d in devices for r in compiled_against_eager(dims, d, settings)]
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"compiled_against_eager": records}, indent=1))
        print(f"total {time.perf_counter() - t_start:.0f} s")
        return 0

    meta = {"machine": T.machine_summary(devices[-1]), "versions": library_versions(), "dims": dims,
            "settings": vars(settings), "shapes": {str(k): v for k, v in SHAPES.items()},
            "memory": "CPU: VmHWM - VmRSS of one call in a worker with MALLOC_MMAP_THRESHOLD_=65536; "
                      "CUDA: max_memory_allocated - memory_allocated"}
    print(f"plasticine primitives benchmark  torch {torch.__version__}, {args.threads} threads, "
          f"{meta['machine']['cpu_count']} CPUs, load {meta['machine'].get('load_average')}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()))
    print(f"times: median (and min) of up to {settings.repeats} calls per library, libraries called in turn, "
          f"at least {settings.min_repeats} and until {settings.max_seconds} s each; {settings.warmup} warm-up call(s) "
          f"of fwd+bwd (none when a forward takes over {SLOW_CALL_S:.0f} s); fwd without grad; scaling and squaring: "
          f"{SQUARING_CALLS} calls each, whatever the time. "
          "peak MB: memory one fwd+bwd (fwd for forward-only) needed above its inputs. "
          "ratio < 1: plasticine faster / smaller\n", flush=True)

    worker = None if args.no_memory else T.JsonLineWorker(
        [str(Path(__file__).resolve()), "--memory-worker", "--threads", str(args.threads)],
        env=T.memory_worker_env(args.threads),
    )
    all_results: list[Result] = []
    all_ratios: list[dict[str, Any]] = []
    slower: list[str] = []
    try:
        for device in devices:
            for prim in prims:
                by_size: dict[int, list[Result]] = {}
                for ndim in dims:
                    t0 = time.perf_counter()
                    results = time_group(prim, ndim, device, settings)
                    for r in results:
                        if r.status == "ok" and not args.no_memory:
                            if device.type == "cpu":
                                assert worker is not None
                                mem = worker.request({"primitive": prim.name, "library": r.library, "ndim": ndim,
                                                      "device": str(device), "threads": args.threads})
                            else:
                                try:
                                    mem = memory_case(*_find(prim.name, r.library), ndim, device)
                                except Exception as exc:
                                    mem = {"error": _error(exc)}
                            r.peak_mb_fwd, r.peak_mb_fwdbwd = mem.get("peak_mb_fwd"), mem.get("peak_mb_fwdbwd")
                            if "error" in mem:
                                r.reason = f"memory: {mem['error']}"
                    print(f"  [{time.perf_counter() - t_start:6.1f} s] {prim.name} {_size_label(prim, ndim)}: "
                          + ", ".join(f"{r.library} {r.status}" for r in results)
                          + f" ({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
                    compare_with_plasticine(results)
                    by_size[ndim] = results
                    rat = ratios(results)
                    all_ratios.append({"primitive": prim.name, "ndim": ndim, "device": str(device), **rat,
                                       "plasticine_over_autograd": variant_ratios(results),
                                       "plasticine_over_each": pair_ratios(results, prim.backward)})
                    for key in ("fwd", "fwdbwd"):
                        q, qm = rat[key], rat[key + "_min"]
                        if q["ratio"] is not None and q["ratio"] > 1.0:
                            slower.append(f"{prim.name} {_size_label(prim, ndim)} {device} {key}: plasticine "
                                          f"{q['plasticine']:.3g} ms vs {q['peer']} {q['peer_value']:.3g} ms "
                                          f"(median {q['ratio']:.2f}x; by min {T.format_ratio(qm['ratio'])}"
                                          f" vs {qm['peer']})")
                    all_results.extend(results)
                print(render_table(prim, str(device), by_size) + "\n", flush=True)
                if prim.calls:
                    print(render_pair_ratios(prim, by_size) + "\n", flush=True)
    finally:
        if worker is not None:
            worker.close()

    print("== plasticine slower than the fastest peer ==")
    print("\n".join(f"  {s}" for s in slower) if slower else "  none")
    missing = sorted({f"{r.primitive}" for r in all_results if r.library == "plasticine" and r.status != "ok"})
    if missing:
        print("== plasticine primitives missing or failing: " + ", ".join(missing))
    unavailable = sorted({f"{r.library}: {r.reason}" for r in all_results if r.status == "unavailable"})
    if unavailable:
        print("== peers unavailable ==\n" + "\n".join(f"  {u}" for u in unavailable))
    print(f"total {time.perf_counter() - t_start:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"meta": meta, "results": [r.to_dict() for r in all_results], "ratios": all_ratios,
                   "plasticine_slower": slower}
        args.json.write_text(json.dumps(payload, indent=1, default=lambda o: None if isinstance(o, float) and math.isnan(o) else str(o)))
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
