"""Triton source of :mod:`plasticine.core.kernels` (imported only when a kernel runs; needs ``triton``).

Positions, weights and sums in the compute type ``CT`` (float32, float64 for float64 inputs);
2D fields run as 3D ones with a single slice (``D = 1``). See :mod:`plasticine.core.kernels` for
the maths and the callers.
"""

import triton
import triton.language as tl

__all__ = ["warp_fwd", "warp_bwd", "hist_fwd", "hist_bwd", "box_axis"]


@triton.jit
def _corner(pz, py, px, D, H, W, K: tl.constexpr, NDIM: tl.constexpr, LINEAR: tl.constexpr):
    # corner K of the interpolation stencil: flat index, weight, validity and the weight's
    # derivatives along z, y, x (the position already clipped for border padding)
    if LINEAR:
        cz: tl.constexpr = (K // 4) % 2
        cy: tl.constexpr = (K // 2) % 2
        cx: tl.constexpr = K % 2
        z0 = tl.floor(pz)
        y0 = tl.floor(py)
        x0 = tl.floor(px)
        fz = pz - z0
        fy = py - y0
        fx = px - x0
        wz = fz if cz == 1 else 1.0 - fz
        wy = fy if cy == 1 else 1.0 - fy
        wx = fx if cx == 1 else 1.0 - fx
        sz = 1.0 if cz == 1 else -1.0
        sy = 1.0 if cy == 1 else -1.0
        sx = 1.0 if cx == 1 else -1.0
        zi = z0.to(tl.int32) + cz
        yi = y0.to(tl.int32) + cy
        xi = x0.to(tl.int32) + cx
        if NDIM == 2:
            wz = wz * 0.0 + 1.0
            zi = zi * 0
        weight = wz * wy * wx
        dz = sz * wy * wx
        dy = wz * sy * wx
        dx = wz * wy * sx
    else:
        # round half to even, as grid_sample's nearbyint
        rz = tl.floor(pz + 0.5)
        ry = tl.floor(py + 0.5)
        rx = tl.floor(px + 0.5)
        rz = tl.where(((rz - pz) == 0.5) & ((rz - 2.0 * tl.floor(rz * 0.5)) == 1.0), rz - 1.0, rz)
        ry = tl.where(((ry - py) == 0.5) & ((ry - 2.0 * tl.floor(ry * 0.5)) == 1.0), ry - 1.0, ry)
        rx = tl.where(((rx - px) == 0.5) & ((rx - 2.0 * tl.floor(rx * 0.5)) == 1.0), rx - 1.0, rx)
        zi = rz.to(tl.int32)
        yi = ry.to(tl.int32)
        xi = rx.to(tl.int32)
        weight = px * 0.0 + 1.0
        dz = px * 0.0
        dy = dz
        dx = dz
    # out-of-bounds corners read 0; with border padding the position is clipped first, so only a
    # corner of weight 0 can lie outside (at the last voxel), and its derivative term is grid_sample's
    valid = (zi >= 0) & (zi < D) & (yi >= 0) & (yi < H) & (xi >= 0) & (xi < W)
    zi = tl.minimum(tl.maximum(zi, 0), D - 1)
    yi = tl.minimum(tl.maximum(yi, 0), H - 1)
    xi = tl.minimum(tl.maximum(xi, 0), W - 1)
    return (zi * H + yi) * W + xi, weight, valid, dz, dy, dx


@triton.jit
def _position(disp_ptr, dbase, vox, m, z, y, x, D, H, W, NDIM: tl.constexpr, ZEROS: tl.constexpr, CT: tl.constexpr):
    # sample position p + u(p) in voxels (float CT), whether u(p) is finite, and the clip
    # factors of the position's gradient (0 where border padding clipped it)
    if NDIM == 3:
        uz = tl.load(disp_ptr + dbase, mask=m, other=0.0).to(CT)
        uy = tl.load(disp_ptr + dbase + vox, mask=m, other=0.0).to(CT)
        ux = tl.load(disp_ptr + dbase + 2 * vox, mask=m, other=0.0).to(CT)
    else:
        uy = tl.load(disp_ptr + dbase, mask=m, other=0.0).to(CT)
        ux = tl.load(disp_ptr + dbase + vox, mask=m, other=0.0).to(CT)
        uz = ux * 0.0
    ok = (tl.abs(uz) + tl.abs(uy) + tl.abs(ux)) < float("inf")
    zero = ux * 0.0
    lz = zero + (D - 1)  # the last index along each axis, as tensors of the compute type
    ly = zero + (H - 1)
    lx = zero + (W - 1)
    pz = tl.where(ok & (lz > 0), z.to(CT) + uz, zero)
    py = tl.where(ok & (ly > 0), y.to(CT) + uy, zero)
    px = tl.where(ok & (lx > 0), x.to(CT) + ux, zero)
    gz = zero + 1.0
    gy = gz
    gx = gz
    if not ZEROS:
        gz = tl.where((pz < 0.0) | (pz > lz), 0.0, gz)
        gy = tl.where((py < 0.0) | (py > ly), 0.0, gy)
        gx = tl.where((px < 0.0) | (px > lx), 0.0, gx)
        pz = tl.minimum(tl.maximum(pz, 0.0), lz)
        py = tl.minimum(tl.maximum(py, 0.0), ly)
        px = tl.minimum(tl.maximum(px, 0.0), lx)
    gz = tl.where(lz > 0, gz, 0.0)
    gy = tl.where(ly > 0, gy, 0.0)
    gx = tl.where(lx > 0, gx, 0.0)
    return pz, py, px, ok, gz, gy, gx


@triton.jit
def _voxels(disp_ptr, D, H, W, total, disp_bs, NDIM: tl.constexpr, ZEROS: tl.constexpr, CT: tl.constexpr, BLOCK: tl.constexpr):
    # the block's voxels (mask, batch index, flat spatial index, voxels per image) and their sample positions
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    vox = D * H * W
    b = offs // vox
    p = offs % vox
    m = offs < total
    pz, py, px, ok, gz, gy, gx = _position(disp_ptr, b * disp_bs + p, vox, m, p // (H * W), (p // W) % H, p % W, D, H, W, NDIM, ZEROS, CT)
    return m, b, p, vox, pz, py, px, ok, gz, gy, gx


# Pull-back warp, one program per BLOCK output voxels: out[b, c, p] = image[b, c, p + u(p)] (identity added here).
@triton.jit
def warp_fwd(
    img_ptr, disp_ptr, out_ptr, C, D, H, W, total, img_bs, disp_bs,
    NDIM: tl.constexpr, LINEAR: tl.constexpr, ZEROS: tl.constexpr, ADD: tl.constexpr,
    CT: tl.constexpr, BLOCK: tl.constexpr,
):
    m, b, p, vox, pz, py, px, ok, gz, gy, gx = _voxels(disp_ptr, D, H, W, total, disp_bs, NDIM, ZEROS, CT, BLOCK)
    ibase = b * img_bs
    for c in range(C):
        acc = pz * 0.0
        for k in tl.static_range(2**NDIM if LINEAR else 1):
            idx, weight, valid, dz, dy, dx = _corner(pz, py, px, D, H, W, k, NDIM, LINEAR)
            v = tl.load(img_ptr + ibase + c * vox + idx, mask=m & valid, other=0.0).to(CT)
            acc += weight * v
        if ADD:
            acc += tl.load(img_ptr + ibase + c * vox + p, mask=m, other=0.0).to(CT)
        acc = tl.where(ok, acc, float("nan"))
        tl.store(out_ptr + b * C * vox + c * vox + p, acc.to(out_ptr.dtype.element_ty), mask=m)


# Its backward: scatters d(out) into d(image) by atomic adds and gathers d(out) . d(image)/dp into d(u).
@triton.jit
def warp_bwd(
    img_ptr, disp_ptr, gout_ptr, gimg_ptr, gdisp_ptr, C, D, H, W, total, img_bs, disp_bs,
    NDIM: tl.constexpr, LINEAR: tl.constexpr, ZEROS: tl.constexpr,
    NEED_IMG: tl.constexpr, NEED_DISP: tl.constexpr, CT: tl.constexpr, BLOCK: tl.constexpr,
):
    m, b, p, vox, pz, py, px, ok, gz, gy, gx = _voxels(disp_ptr, D, H, W, total, disp_bs, NDIM, ZEROS, CT, BLOCK)
    ibase = b * img_bs
    az = pz * 0.0
    ay = az
    ax = az
    for c in range(C):
        g = tl.load(gout_ptr + b * C * vox + c * vox + p, mask=m, other=0.0).to(CT)
        for k in tl.static_range(2**NDIM if LINEAR else 1):
            idx, weight, valid, dz, dy, dx = _corner(pz, py, px, D, H, W, k, NDIM, LINEAR)
            if NEED_IMG:
                tl.atomic_add(gimg_ptr + ibase + c * vox + idx, (g * weight).to(gimg_ptr.dtype.element_ty), mask=m & valid & ok)
            if NEED_DISP:
                if LINEAR:
                    v = tl.load(img_ptr + ibase + c * vox + idx, mask=m & valid, other=0.0).to(CT)
                    gv = g * v
                    az += gv * dz
                    ay += gv * dy
                    ax += gv * dx
    if NEED_DISP:
        az = tl.where(ok, az * gz, float("nan"))
        ay = tl.where(ok, ay * gy, float("nan"))
        ax = tl.where(ok, ax * gx, float("nan"))
        obase = b * NDIM * vox + p
        if NDIM == 3:
            tl.store(gdisp_ptr + obase, az.to(gdisp_ptr.dtype.element_ty), mask=m)
            tl.store(gdisp_ptr + obase + vox, ay.to(gdisp_ptr.dtype.element_ty), mask=m)
            tl.store(gdisp_ptr + obase + 2 * vox, ax.to(gdisp_ptr.dtype.element_ty), mask=m)
        else:
            tl.store(gdisp_ptr + obase, ay.to(gdisp_ptr.dtype.element_ty), mask=m)
            tl.store(gdisp_ptr + obase + vox, ax.to(gdisp_ptr.dtype.element_ty), mask=m)


@triton.jit
def _tap(t, first, j: tl.constexpr, bins, sigma, radius, BSPLINE: tl.constexpr):
    # bin index, weight and d weight / dt of tap j of a sample at bin position t
    if BSPLINE:
        f = t - first - 1.0  # first = i - 1, f = t - i
        if j == 0:
            w = (1.0 - f) * (1.0 - f) * (1.0 - f)
            dw = -3.0 * (1.0 - f) * (1.0 - f)
        elif j == 1:
            w = 4.0 - 6.0 * f * f + 3.0 * f * f * f
            dw = -12.0 * f + 9.0 * f * f
        elif j == 2:
            w = 1.0 + 3.0 * f + 3.0 * f * f - 3.0 * f * f * f
            dw = 3.0 + 6.0 * f - 9.0 * f * f
        else:
            w = f * f * f
            dw = 3.0 * f * f
        valid = t == t
    else:
        d = t - (first + j)
        inside = tl.abs(d) <= radius
        w = tl.where(inside, tl.exp(d * d * (-0.5 / (sigma * sigma))), 0.0)
        dw = w * d * (-1.0 / (sigma * sigma))
        idx0 = (first + j).to(tl.int32)
        valid = (idx0 >= 0) & (idx0 < bins)
    return (first + j).to(tl.int32), w, dw, valid


@triton.jit
def _first(t, bins, radius, BSPLINE: tl.constexpr):
    if BSPLINE:
        i = tl.minimum(tl.maximum(tl.floor(t), 1.0), t * 0.0 + (bins - 3))
        return i - 1.0
    else:
        return tl.ceil(t - radius)


@triton.jit
def _samples(tm_ptr, tf_ptr, w_ptr, n, bins, radius, HAS_W: tl.constexpr, BSPLINE: tl.constexpr, BLOCK: tl.constexpr):
    # the block's samples of one row: index, mask, both bin positions, weight and first taps
    row = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tm = tl.load(tm_ptr + row * n + offs, mask=m, other=0.0)
    tf = tl.load(tf_ptr + row * n + offs, mask=m, other=0.0)
    ww = tl.load(w_ptr + row * n + offs, mask=m, other=0.0) if HAS_W else tm * 0.0 + 1.0
    return row, offs, m, tm, tf, ww, _first(tm, bins, radius, BSPLINE), _first(tf, bins, radius, BSPLINE)


# Soft joint histogram of the MI loss: each sample adds its Parzen weights to its bins by atomic adds.
@triton.jit
def hist_fwd(
    tm_ptr, tf_ptr, w_ptr, hist_ptr, n, bins, sigma, radius, copies,
    HAS_W: tl.constexpr, BSPLINE: tl.constexpr, TAPS: tl.constexpr, BLOCK: tl.constexpr,
):
    # the blocks of a row add into `copies` histograms in turn (less contention on the atomics)
    row, offs, m, tm, tf, ww, fm, ff = _samples(tm_ptr, tf_ptr, w_ptr, n, bins, radius, HAS_W, BSPLINE, BLOCK)
    base = hist_ptr + (row * copies + tl.program_id(0) % copies) * bins * bins
    for a in tl.static_range(TAPS):
        ia, wa, dwa, va = _tap(tm, fm, a, bins, sigma, radius, BSPLINE)
        wa = wa * ww
        for c in tl.static_range(TAPS):
            jb, wb, dwb, vb = _tap(tf, ff, c, bins, sigma, radius, BSPLINE)
            tl.atomic_add(base + ia * bins + jb, wa * wb, mask=m & va & vb)


# Its backward: d(loss)/d(intensity) and d(loss)/d(weight) of each sample from the histogram gradient.
@triton.jit
def hist_bwd(
    tm_ptr, tf_ptr, w_ptr, g_ptr, gm_ptr, gf_ptr, gw_ptr, n, bins, sigma, radius,
    HAS_W: tl.constexpr, BSPLINE: tl.constexpr, TAPS: tl.constexpr,
    NEED_M: tl.constexpr, NEED_F: tl.constexpr, NEED_W: tl.constexpr, BLOCK: tl.constexpr,
):
    row, offs, m, tm, tf, ww, fm, ff = _samples(tm_ptr, tf_ptr, w_ptr, n, bins, radius, HAS_W, BSPLINE, BLOCK)
    base = g_ptr + row * bins * bins
    sm = tm * 0.0
    sf = sm
    s0 = sm
    for a in tl.static_range(TAPS):
        ia, wa, dwa, va = _tap(tm, fm, a, bins, sigma, radius, BSPLINE)
        for c in tl.static_range(TAPS):
            jb, wb, dwb, vb = _tap(tf, ff, c, bins, sigma, radius, BSPLINE)
            g = tl.load(base + ia * bins + jb, mask=m & va & vb, other=0.0)
            sm += g * dwa * wb
            sf += g * wa * dwb
            s0 += g * wa * wb
    if NEED_M:
        tl.store(gm_ptr + row * n + offs, sm * ww, mask=m)
    if NEED_F:
        tl.store(gf_ptr + row * n + offs, sf * ww, mask=m)
    if NEED_W:
        tl.store(gw_ptr + row * n + offs, s0, mask=m)


# Box sum along one axis (the window sums of local NCC), one program per BLOCK outputs.
@triton.jit
def box_axis(x_ptr, out_ptr, size, stride, total, R, CT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < total
    coord = (offs // stride) % size
    acc = tl.zeros([BLOCK], dtype=CT)
    for k in range(-R, R + 1):
        j = coord + k
        acc += tl.load(x_ptr + offs + k * stride, mask=m & (j >= 0) & (j < size), other=0.0).to(CT)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=m)
