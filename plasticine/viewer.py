r"""An interactive tracing viewer: one self-contained HTML page of a translation and its deformation.

:func:`write_viewer` writes a single HTML file that needs no server and loads nothing from the
network: the images are embedded as ``data:`` PNG URIs (written by the built-in encoder of
:mod:`plasticine.io`), the displacement fields of :math:`\phi` and :math:`\phi^{-1}` and the label
maps as base64 arrays (little-endian float32 and int32), and the script and style sit in the page.
A ``Content-Security-Policy`` in the page forbids every fetch but ``data:`` images, so the browser
refuses a request even if one were attempted.

The page shows the source and the translation side by side, each scaled from its own minimum to
its maximum for display:

* **Pointer tracking.** Moving the pointer over one image puts a marker at the corresponding point
  of the other, with the conventions of :class:`~plasticine.core.Deformation`: a source point
  :math:`p` sits at :math:`\phi^{-1}(p) = p + u^{-1}(p)` in the translation
  (:meth:`~plasticine.core.Deformation.points_to_target`), a translation point :math:`q` at
  :math:`\phi(q) = q + u(q)` in the source (:meth:`~plasticine.core.Deformation.points_to_source`).
  The script interpolates the embedded displacement (bi- or trilinear, coordinates clamped to the
  grid as the border padding of :func:`~plasticine.core.sample_at_points`), so it agrees with the
  library to float32 rounding. The centre of voxel ``(y, x)`` is drawn at the centre of its
  pixel.
* **Traced regions.** With ``source_labels``, clicking a voxel of either image selects its label;
  the region is highlighted in the source (``source_labels == l``) and in the translation (the
  traced map ``labels o phi`` of :meth:`~plasticine.core.Deformation.labels_to_target`, computed
  here in Python, so the page only looks labels up). The page state records the label and the
  voxel count of the region in each image.
* **Overlays.** A deformation grid (a regular grid in the source, lines every ``grid_spacing``
  voxels, and the same grid carried into the translation, ``grid o phi``, so grid cells
  correspond) and the Jacobian determinant map (:func:`~plasticine.core.jacobian_determinant`:
  :math:`\det J_{\phi^{-1}}` on the source, :math:`\det J_\phi` on the translation; blue where it
  is below 1, red above, white at 1 on a log2 scale clipped to [1/2, 2], black where
  :math:`\det J \le 0`, a fold), each behind a toggle, and a colour map of the labels.
* **3D.** A volume ``(D, H, W)`` is shown one axial slice (an index along the first spatial axis)
  at a time, with a slider per view; every slice is embedded as its own PNG. Tracking the pointer
  also moves the other view to the slice nearest the corresponding point.

The page exposes its state as ``window.plasticineViewer.state`` (slices, marker, highlighted
label and counts, toggles), which the browser tests read.
"""

from __future__ import annotations

import base64
import html
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .core import Deformation, check_int, check_shape, jacobian_determinant
from .checkpoint import atomic_write
from .io import png_bytes

__all__ = ["write_viewer"]

_DISPLAY_PIXELS = 400
"""Largest side of an image on the page, in CSS pixels (small images are enlarged by a whole factor)."""


def _b64(array: np.ndarray, dtype: str) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype=dtype).tobytes()).decode("ascii")


def _png_uri(u8: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(u8)).decode("ascii")


def _slices(u8: np.ndarray) -> list[str]:
    """PNG URIs of a ``(C, *S)`` uint8 array: one for 2D, one per index of the first axis for 3D."""
    img = u8[0] if u8.shape[0] == 1 else np.moveaxis(u8, 0, -1)  # (*S) grey or (*S, 3) RGB
    if u8.ndim == 3:
        return [_png_uri(img)]
    return [_png_uri(img[z]) for z in range(img.shape[0])]


def _display(image: torch.Tensor) -> np.ndarray:
    """An image scaled from its own min..max to 8 bits (a constant image is black)."""
    a = image.detach().to("cpu", torch.float64).numpy()
    lo, hi = float(a.min()), float(a.max())
    scaled = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    return np.round(scaled * 255.0).astype(np.uint8)


def _jacobian_colours(det: np.ndarray) -> np.ndarray:
    """``(1, *S)`` determinants -> ``(3, *S)`` uint8: blue below 1, red above, white at 1, black for det <= 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.clip(np.log2(np.where(det > 0, det, 1.0)), -1.0, 1.0)[0]
    r = np.where(t < 0, 1.0 + t, 1.0)
    g = 1.0 - np.abs(t)
    b = np.where(t > 0, 1.0 - t, 1.0)
    rgb = np.stack([r, g, b]) * (det[0] > 0)
    return np.round(rgb * 255.0).astype(np.uint8)


def _grid_lines(shape: tuple[int, ...], spacing: int) -> torch.Tensor:
    """``(1, 1, *S)`` float64: 1 on the voxels of every ``spacing``-th line of the last two axes."""
    h, w = shape[-2:]
    on = torch.zeros(h, w, dtype=torch.float64)
    on[::spacing, :] = 1.0
    on[:, ::spacing] = 1.0
    return on.expand(*shape).reshape(1, 1, *shape).clone()


def _grid_colours(g: torch.Tensor) -> np.ndarray:
    """``(1, 1, *S)`` grid in [0, 1] -> ``(3, *S)`` uint8 green lines on black (shown with a screen blend)."""
    a = g[0, 0].clamp(0, 1).numpy()
    return np.round(np.stack([0.3 * a, a, 0.3 * a]) * 255.0).astype(np.uint8)


def _labels(source_labels: Any, shape: tuple[int, ...], deformation: Deformation) -> dict[str, Any]:
    """The label values, the source map and the traced map (``labels o phi``) as indices into them."""
    check_shape(source_labels, "1 *S", "source_labels", bindings={"S": shape})
    if source_labels.is_floating_point() or source_labels.is_complex() or source_labels.dtype == torch.bool:
        raise ValueError(f"source_labels: expected an integer tensor, got {source_labels.dtype}")
    values, index = torch.unique(source_labels.to("cpu", torch.int64), return_inverse=True)
    traced = deformation.labels_to_target(index[None], len(values))[0, 0]
    return {
        "values": values.tolist(),
        "source": _b64(index[0].numpy(), "<i4"),
        "translation": _b64(traced.numpy(), "<i4"),
    }


def write_viewer(
    path: str | os.PathLike[str], source: torch.Tensor, translation: torch.Tensor, deformation: Deformation, *,
    source_labels: torch.Tensor | None = None, title: str = "plasticine tracing viewer", grid_spacing: int = 8,
) -> Path:
    r"""Write the interactive tracing viewer of one translation as one self-contained HTML file.

    See the module docstring for what the page shows. Pointer tracking maps a source point
    :math:`p` to :math:`\phi^{-1}(p) = p + u^{-1}(p)` in the translation and a translation point
    :math:`q` to :math:`\phi(q) = q + u(q)` in the source (the displacements interpolated
    linearly with border clamping, as :meth:`~plasticine.core.Deformation.points_to_target` and
    :meth:`~plasticine.core.Deformation.points_to_source`); a clicked label ``l`` is shown as
    ``source_labels == l`` in the source and as ``labels_to_target(source_labels) == l`` in the
    translation. Each image is scaled from its own minimum to its maximum for display. The file
    is replaced atomically; folders are created. Its size is about that of the PNGs plus
    :math:`2 N |S|` float32 values (the two fields) and :math:`2 |S|` int32 labels.

    Args:
        path: the HTML file.
        source: the source image (1 grey or 3 RGB channels).
        translation: the translation, in the target geometry of ``deformation``.
        deformation: phi and phi^-1 between them (batch of one).
        source_labels: optional integer label map in source geometry (any integer values).
        title: the page's title.
        grid_spacing: voxels between the lines of the deformation grid, >= 2.

    Returns:
        The path.

    Raises:
        ValueError: for a bad shape or channel count, non-finite images, a deformation of another
            size or batch, labels that are not integers, or a bad ``grid_spacing`` or ``title``.

    Shape:
        source, translation: ``(C, *S)`` with ``C`` 1 or 3 and ``S = (H, W)`` or ``(D, H, W)``;
        deformation fields: ``(1, N, *S)``; source_labels: ``(1, *S)``.
    """
    dims = check_shape(source, "C *S", "source", floating=True)
    if dims["C"] not in (1, 3):
        raise ValueError(f"source: expected 1 (grey) or 3 (RGB) channels, got {dims['C']}")
    check_shape(translation, "C *S", "translation", bindings=dims, floating=True)
    shape = tuple(dims["S"])
    if not isinstance(deformation, Deformation):
        raise ValueError(f"deformation: expected a plasticine.core.Deformation, got {type(deformation).__name__}")
    if deformation.forward.shape[0] != 1 or deformation.shape != shape:
        raise ValueError(f"deformation: expected fields of shape (1, {len(shape)}, {', '.join(map(str, shape))}), got {tuple(deformation.forward.shape)}")
    for name, image in (("source", source), ("translation", translation)):
        if not bool(torch.isfinite(image).all()):
            raise ValueError(f"{name}: expected finite values, found {int((~torch.isfinite(image)).sum())} NaN or infinite value(s)")
    grid_spacing = check_int(grid_spacing, "grid_spacing", minimum=2)
    if not isinstance(title, str):
        raise ValueError(f"title: expected a string, got {type(title).__name__}")
    deformation = Deformation(deformation.forward.detach().cpu(), deformation.inverse.detach().cpu())  # no autograd
    d64 = deformation.to(torch.float64)
    grid = _grid_lines(shape, grid_spacing)
    longest = max(shape[-2:])
    scale = float(_DISPLAY_PIXELS // longest) if longest <= _DISPLAY_PIXELS else _DISPLAY_PIXELS / longest
    data = {
        "shape": list(shape),
        "scale": scale,
        "title": title,
        "forward": _b64(deformation.forward[0].numpy(), "<f4"),
        "inverse": _b64(deformation.inverse[0].numpy(), "<f4"),
        "images": {"source": _slices(_display(source)), "translation": _slices(_display(translation))},
        "grid": {"source": _slices(_grid_colours(grid)), "translation": _slices(_grid_colours(d64.to_target(grid)))},
        "jacobian": {
            "source": _slices(_jacobian_colours(jacobian_determinant(d64.inverse)[0].numpy())),
            "translation": _slices(_jacobian_colours(jacobian_determinant(d64.forward)[0].numpy())),
        },
        "labels": None if source_labels is None else _labels(source_labels, shape, deformation),
    }
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    parts = {"__TITLE__": html.escape(title), "__DATA__": payload, "__SCRIPT__": _SCRIPT}
    page = re.sub("__TITLE__|__DATA__|__SCRIPT__", lambda m: parts[m.group(0)], _PAGE)  # one pass: nothing inserted is substituted again
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, page.encode("utf-8"))
    return path


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<title>__TITLE__</title>
<style>
body { font-family: sans-serif; margin: 12px; background: #202124; color: #e8eaed; }
h1 { font-size: 18px; margin: 0 0 8px 0; }
.controls { margin-bottom: 8px; }
.controls label { margin-right: 16px; }
.views { display: flex; gap: 24px; align-items: flex-start; }
figure { margin: 0; }
figcaption { margin-bottom: 4px; }
.stage { position: relative; background: #000; cursor: crosshair; }
.stage img, .stage canvas { position: absolute; left: 0; top: 0; width: 100%; height: 100%; image-rendering: pixelated; }
.stage img.grid { mix-blend-mode: screen; }
.stage img.jacobian { opacity: 0.6; }
.stage .hidden { display: none; }
.marker { position: absolute; width: 15px; height: 15px; margin: -7.5px 0 0 -7.5px; pointer-events: none; display: none; }
.marker::before, .marker::after { content: ""; position: absolute; background: #00e5ff; }
.marker::before { left: 7px; top: 0; width: 1px; height: 15px; }
.marker::after { top: 7px; left: 0; height: 1px; width: 15px; }
.slice { display: block; margin-top: 6px; }
#readout { margin-top: 8px; font-family: monospace; white-space: pre; }
.legend { margin-top: 4px; font-size: 12px; color: #bdc1c6; }
</style>
</head>
<body>
<h1 id="title">__TITLE__</h1>
<div class="controls">
<label><input type="checkbox" id="toggle-grid"> deformation grid</label>
<label><input type="checkbox" id="toggle-jacobian"> Jacobian determinant</label>
<label><input type="checkbox" id="toggle-labels"> labels</label>
</div>
<div class="views">
<figure id="view-source"><figcaption>source</figcaption>
<div class="stage"><img class="base" alt="source"><img class="grid hidden" alt=""><img class="jacobian hidden" alt=""><canvas class="overlay"></canvas><div class="marker"></div></div>
<label class="slice">slice <input type="range" min="0" value="0"> <span class="index"></span></label></figure>
<figure id="view-translation"><figcaption>translation</figcaption>
<div class="stage"><img class="base" alt="translation"><img class="grid hidden" alt=""><img class="jacobian hidden" alt=""><canvas class="overlay"></canvas><div class="marker"></div></div>
<label class="slice">slice <input type="range" min="0" value="0"> <span class="index"></span></label></figure>
</div>
<div id="readout">move the pointer over an image</div>
<div class="legend">a source point p sits at phi^-1(p) in the translation, a translation point q at phi(q) in the source.
Jacobian determinant: blue below 1 (shrinks), red above 1 (grows), black at or below 0 (folds); the source shows det J of phi^-1, the translation det J of phi.
Click a labelled region to highlight it and its traced region (yellow); the grid is green, the marker cyan.</div>
<script id="viewer-data" type="application/json">__DATA__</script>
<script>
__SCRIPT__
</script>
</body>
</html>
"""

_SCRIPT = r"""
"use strict";
(function () {
  const D = JSON.parse(document.getElementById("viewer-data").textContent);
  const S = D.shape, N = S.length, VOX = S.reduce((a, b) => a * b, 1);
  const H = S[N - 2], W = S[N - 1], PLANE = H * W;
  function decode(b64, Type) {
    const s = atob(b64), u = new Uint8Array(s.length);
    for (let i = 0; i < s.length; i++) u[i] = s.charCodeAt(i);
    return new Type(u.buffer);
  }
  const FIELDS = { source: decode(D.inverse, Float32Array), translation: decode(D.forward, Float32Array) };
  const LABELS = D.labels ? { source: decode(D.labels.source, Int32Array), translation: decode(D.labels.translation, Int32Array) } : null;
  const OTHER = { source: "translation", translation: "source" };
  const STRIDE = S.map((_, i) => S.slice(i + 1).reduce((a, b) => a * b, 1));
  const PALETTE = [[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212]];
  const state = {
    slice: { source: 0, translation: 0 }, marker: null, highlight: null,
    grid: false, jacobian: false, labels: false, scale: D.scale,
  };

  // p + u(p), u interpolated (bi/trilinear) with coordinates clamped to the grid (border padding).
  function mapPoint(view, p) {
    const f = FIELDS[view], lo = [], fr = [], hi = [];
    for (let i = 0; i < N; i++) {
      const c = Math.min(Math.max(p[i], 0), S[i] - 1);
      lo.push(Math.floor(c)); fr.push(c - Math.floor(c)); hi.push(Math.min(Math.floor(c) + 1, S[i] - 1));
    }
    const out = p.slice();
    for (let corner = 0; corner < (1 << N); corner++) {
      let w = 1, idx = 0;
      for (let i = 0; i < N; i++) {
        const up = (corner >> (N - 1 - i)) & 1;
        w *= up ? fr[i] : 1 - fr[i];
        idx += (up ? hi[i] : lo[i]) * STRIDE[i];
      }
      if (w === 0) continue;
      for (let ch = 0; ch < N; ch++) out[ch] += w * f[ch * VOX + idx];
    }
    return out;
  }

  const views = {};
  for (const name of ["source", "translation"]) {
    const fig = document.getElementById("view-" + name);
    const v = {
      name, fig, stage: fig.querySelector(".stage"), base: fig.querySelector("img.base"),
      grid: fig.querySelector("img.grid"), jacobian: fig.querySelector("img.jacobian"),
      overlay: fig.querySelector("canvas.overlay"), marker: fig.querySelector(".marker"),
      slider: fig.querySelector(".slice input"), index: fig.querySelector(".slice .index"),
    };
    v.stage.style.width = W * D.scale + "px";
    v.stage.style.height = H * D.scale + "px";
    v.overlay.width = W; v.overlay.height = H;
    if (N === 3) { v.slider.max = String(S[0] - 1); } else { fig.querySelector(".slice").style.display = "none"; }
    v.slider.addEventListener("input", () => setSlice(name, Number(v.slider.value)));
    v.stage.addEventListener("mousemove", (e) => track(name, pointOf(name, e)));
    v.stage.addEventListener("mouseleave", () => hideMarkers());
    v.stage.addEventListener("click", (e) => select(name, pointOf(name, e)));
    views[name] = v;
  }

  function pointOf(name, e) {
    const r = views[name].stage.getBoundingClientRect();
    const yx = [(e.clientY - r.top) / D.scale - 0.5, (e.clientX - r.left) / D.scale - 0.5];
    return N === 3 ? [state.slice[name], yx[0], yx[1]] : yx;
  }

  // The client (page) position of the centre of a voxel point of a view.
  function voxelToClient(name, p) {
    const r = views[name].stage.getBoundingClientRect();
    return { x: r.left + (p[N - 1] + 0.5) * D.scale, y: r.top + (p[N - 2] + 0.5) * D.scale };
  }

  function setSlice(name, z) {
    const v = views[name];
    z = Math.min(Math.max(Math.round(z), 0), N === 3 ? S[0] - 1 : 0);
    state.slice[name] = z;
    v.slider.value = String(z);
    v.index.textContent = N === 3 ? z + " / " + (S[0] - 1) : "";
    v.base.src = D.images[name][z];
    v.grid.src = D.grid[name][z];
    v.jacobian.src = D.jacobian[name][z];
    drawOverlay(name);
  }

  function drawOverlay(name) {
    const v = views[name], ctx = v.overlay.getContext("2d");
    ctx.clearRect(0, 0, W, H);
    if (!LABELS || (!state.labels && !state.highlight)) return;
    const lab = LABELS[name], off = state.slice[name] * PLANE, img = ctx.createImageData(W, H);
    for (let i = 0; i < PLANE; i++) {
      const l = lab[off + i];
      let c = null, a = 0;
      if (state.highlight && l === state.highlight.index) { c = [255, 255, 0]; a = 150; }
      else if (state.labels && D.labels.values[l] !== 0) { c = PALETTE[l % PALETTE.length]; a = 90; }
      if (c) { img.data.set([c[0], c[1], c[2], a], 4 * i); }
    }
    ctx.putImageData(img, 0, 0);
  }

  function showMarker(name, q) {
    const v = views[name];
    const inside = q.every((c, i) => c >= -0.5 && c <= S[i] - 0.5);
    v.marker.style.display = inside ? "block" : "none";
    v.marker.style.left = (q[N - 1] + 0.5) * D.scale + "px";
    v.marker.style.top = (q[N - 2] + 0.5) * D.scale + "px";
    return inside;
  }

  function hideMarkers() { for (const n in views) views[n].marker.style.display = "none"; }

  const fmt = (p) => "(" + p.map((c) => c.toFixed(2)).join(", ") + ")";

  function track(name, p) {
    const other = OTHER[name], q = mapPoint(name, p);
    if (N === 3) setSlice(other, q[0]);
    views[name].marker.style.display = "none";
    const inside = showMarker(other, q);
    state.marker = { from: name, to: other, point: p, mapped: q, inside };
    document.getElementById("readout").textContent =
      name + " " + fmt(p) + " -> " + other + " " + fmt(q) + (inside ? "" : " (outside the image)") + describe();
  }

  function describe() {
    const h = state.highlight;
    return h ? "\nlabel " + h.label + ": " + h.source + " voxels in the source, " + h.translation + " traced in the translation" : "";
  }

  function select(name, p) {
    if (!LABELS) return;
    const idx = p.map((c, i) => Math.min(Math.max(Math.round(c), 0), S[i] - 1)).reduce((a, c, i) => a + c * STRIDE[i], 0);
    const l = LABELS[name][idx];
    const count = (arr) => { let n = 0; for (let i = 0; i < VOX; i++) if (arr[i] === l) n++; return n; };
    state.highlight = { label: D.labels.values[l], index: l, from: name, source: count(LABELS.source), translation: count(LABELS.translation) };
    for (const n in views) drawOverlay(n);
    document.getElementById("readout").textContent = "selected in the " + name + describe();
  }

  function toggle(key) {
    const box = document.getElementById("toggle-" + key);
    box.addEventListener("change", () => {
      state[key] = box.checked;
      for (const n in views) {
        if (key === "labels") drawOverlay(n); else views[n][key].classList.toggle("hidden", !box.checked);
      }
    });
  }
  toggle("grid"); toggle("jacobian"); toggle("labels");
  if (!LABELS) document.getElementById("toggle-labels").disabled = true;
  for (const n in views) setSlice(n, 0);
  window.plasticineViewer = { state, mapPoint, voxelToClient, setSlice, track, select, shape: S };
})();
"""
