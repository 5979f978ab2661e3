"""Float64 oracles for the RoI ops, written as plain scalar loops straight from the formulas
(torchvision RoIAlign / RoIPool / PS-RoIAlign, mmcv max-mode RoIAlign and DeformRoIPool,
detectron2 ROIAlignRotated), and their gradients with respect to x (each forward loop with the
sample read turned into a scatter).

rois are (K, 5) [batch, x1, y1, x2, y2] (rotated: (K, 6) [batch, cx, cy, w, h, angle]);
everything is computed in float64. The adaptive sample grid is capped at 2 L + 64 per bin and
axis (L = H or W; max(H, W) for rotated RoIs), as fastnorm documents."""
import numpy as np
from numba import njit


@njit(cache=True)
def _corners(H, W, y, x):
    """torchvision's RoIAlign bilinear_interpolate geometry: (inside, y0, y1, x0, x1, ly, lx);
    a sample outside (-1, H) x (-1, W) (or NaN) reads nothing."""
    if y < -1.0 or y > H or x < -1.0 or x > W or not (y == y) or not (x == x):
        return False, 0, 0, 0, 0, 0.0, 0.0
    if y <= 0:
        y = 0.0
    if x <= 0:
        x = 0.0
    yl = int(y)
    xl = int(x)
    if yl >= H - 1:
        yh = yl = H - 1
        y = float(yl)
    else:
        yh = yl + 1
    if xl >= W - 1:
        xh = xl = W - 1
        x = float(xl)
    else:
        xh = xl + 1
    return True, yl, yh, xl, xh, y - yl, x - xl


@njit(cache=True)
def bilinear(plane, y, x):
    """torchvision's RoIAlign bilinear_interpolate (0 outside (-1, H) x (-1, W))."""
    ok, yl, yh, xl, xh, ly, lx = _corners(plane.shape[0], plane.shape[1], y, x)
    if not ok:
        return 0.0
    hy = 1.0 - ly
    hx = 1.0 - lx
    return (hy * hx * plane[yl, xl] + hy * lx * plane[yl, xh] + ly * hx * plane[yh, xl]
            + ly * lx * plane[yh, xh])


@njit(cache=True)
def scatter(gplane, y, x, v):
    """gplane += v * d bilinear(plane, y, x) / d plane (the adjoint of `bilinear`)."""
    ok, yl, yh, xl, xh, ly, lx = _corners(gplane.shape[0], gplane.shape[1], y, x)
    if not ok:
        return
    hy = 1.0 - ly
    hx = 1.0 - lx
    gplane[yl, xl] += hy * hx * v
    gplane[yl, xh] += hy * lx * v
    gplane[yh, xl] += ly * hx * v
    gplane[yh, xh] += ly * lx * v


@njit(cache=True)
def _grid(size, P, sr, L):
    """Samples per bin along an axis of length L: sr, or ceil(size / P); at most 2 L + 64."""
    g = float(sr) if sr > 0 else np.ceil(size / P)
    if not g >= 0:
        return 0
    return int(min(g, 2 * L + 64))


@njit(cache=True)
def roi_align(x, rois, PH, PW, scale, sr, aligned, mode_max):
    K = rois.shape[0]
    C = x.shape[1]
    out = np.zeros((K, C, PH, PW))
    off = 0.5 if aligned else 0.0
    for k in range(K):
        n = int(rois[k, 0])
        xs = rois[k, 1] * scale - off
        ys = rois[k, 2] * scale - off
        rw = rois[k, 3] * scale - off - xs
        rh = rois[k, 4] * scale - off - ys
        if not (np.isfinite(xs) and np.isfinite(ys) and np.isfinite(rw) and np.isfinite(rh)):
            continue
        if not aligned:
            rw = max(rw, 1.0)
            rh = max(rh, 1.0)
        bh = rh / PH
        bw = rw / PW
        gh = _grid(rh, PH, sr, x.shape[2])
        gw = _grid(rw, PW, sr, x.shape[3])
        if gh * gw == 0:
            continue
        for c in range(C):
            for ph in range(PH):
                for pw in range(PW):
                    acc = 0.0
                    best = 0.0
                    for iy in range(gh):
                        y = ys + ph * bh + (iy + 0.5) * bh / gh
                        for ix in range(gw):
                            xx = xs + pw * bw + (ix + 0.5) * bw / gw
                            val = bilinear(x[n, c], y, xx)
                            acc += val
                            if (iy == 0 and ix == 0) or val > best:
                                best = val
                    out[k, c, ph, pw] = best if mode_max else acc / (gh * gw)
    return out


@njit(cache=True)
def _pool_bins(roi, scale, PH, PW, H, W):
    """RoIPool's bin windows [h0, h1) x [w0, w1), clipped to the map. Rounded corners are
    clamped to +-1e15, as the kernels do before their integer conversion: beyond that, float64
    bin arithmetic is coarser than a pixel and huge RoIs would have no single answer."""
    v = np.empty(4)
    for i in range(4):                 # C round(): half away from zero
        t = roi[i + 1] * scale
        v[i] = min(max(np.floor(abs(t) + 0.5) * (1.0 if t >= 0 else -1.0), -1e15), 1e15)
    xs, ys, xe, ye = v[0], v[1], v[2], v[3]
    bh = max(ye - ys + 1, 1.0) / PH
    bw = max(xe - xs + 1, 1.0) / PW
    h0 = np.empty(PH, np.int64)
    h1 = np.empty(PH, np.int64)
    w0 = np.empty(PW, np.int64)
    w1 = np.empty(PW, np.int64)
    for ph in range(PH):
        h0[ph] = int(min(max(np.floor(ph * bh) + ys, 0.0), H))
        h1[ph] = int(min(max(np.ceil((ph + 1) * bh) + ys, 0.0), H))
    for pw in range(PW):
        w0[pw] = int(min(max(np.floor(pw * bw) + xs, 0.0), W))
        w1[pw] = int(min(max(np.ceil((pw + 1) * bw) + xs, 0.0), W))
    return h0, h1, w0, w1


@njit(cache=True)
def roi_pool(x, rois, PH, PW, scale):
    K = rois.shape[0]
    C, H, W = x.shape[1], x.shape[2], x.shape[3]
    out = np.zeros((K, C, PH, PW))
    for k in range(K):
        n = int(rois[k, 0])
        if not np.all(np.isfinite(rois[k, 1:])):
            continue
        h0, h1, w0, w1 = _pool_bins(rois[k], scale, PH, PW, H, W)
        for ph in range(PH):
            for pw in range(PW):
                for c in range(C):
                    if h1[ph] <= h0[ph] or w1[pw] <= w0[pw]:
                        out[k, c, ph, pw] = 0.0
                        continue
                    m = -np.inf
                    for h in range(h0[ph], h1[ph]):
                        for w in range(w0[pw], w1[pw]):
                            m = max(m, x[n, c, h, w])
                    out[k, c, ph, pw] = m
    return out


@njit(cache=True)
def ps_roi_align(x, rois, PH, PW, scale, sr):
    K = rois.shape[0]
    CO = x.shape[1] // (PH * PW)
    out = np.zeros((K, CO, PH, PW))
    for k in range(K):
        n = int(rois[k, 0])
        xs = rois[k, 1] * scale - 0.5
        ys = rois[k, 2] * scale - 0.5
        rw = rois[k, 3] * scale - 0.5 - xs
        rh = rois[k, 4] * scale - 0.5 - ys
        if not (np.isfinite(xs) and np.isfinite(ys) and np.isfinite(rw) and np.isfinite(rh)):
            continue
        bh = rh / PH
        bw = rw / PW
        gh = _grid(rh, PH, sr, x.shape[2])
        gw = _grid(rw, PW, sr, x.shape[3])
        if gh * gw == 0:
            continue
        for co in range(CO):
            for ph in range(PH):
                for pw in range(PW):
                    ci = (co * PH + ph) * PW + pw
                    acc = 0.0
                    for iy in range(gh):
                        y = ys + ph * bh + (iy + 0.5) * bh / gh
                        for ix in range(gw):
                            xx = xs + pw * bw + (ix + 0.5) * bw / gw
                            acc += bilinear(x[n, ci], y, xx)
                    out[k, co, ph, pw] = acc / (gh * gw)
    return out


@njit(cache=True)
def deform_roi_pool(x, rois, offset, mask, PH, PW, scale, sr, gamma):
    """offset (K, 2, PH, PW) [dx, dy] (zeros for none), mask (K, 1, PH, PW) (ones for none)."""
    K = rois.shape[0]
    C = x.shape[1]
    out = np.zeros((K, C, PH, PW))
    for k in range(K):
        n = int(rois[k, 0])
        xs = rois[k, 1] * scale - 0.5
        ys = rois[k, 2] * scale - 0.5
        rw = rois[k, 3] * scale - 0.5 - xs
        rh = rois[k, 4] * scale - 0.5 - ys
        if not (np.isfinite(xs) and np.isfinite(ys) and np.isfinite(rw) and np.isfinite(rh)):
            continue
        bh = rh / PH
        bw = rw / PW
        gh = _grid(rh, PH, sr, x.shape[2])
        gw = _grid(rw, PW, sr, x.shape[3])
        if gh * gw == 0:
            continue
        for c in range(C):
            for ph in range(PH):
                for pw in range(PW):
                    sx = xs + gamma * rw * offset[k, 0, ph, pw]
                    sy = ys + gamma * rh * offset[k, 1, ph, pw]
                    acc = 0.0
                    for iy in range(gh):
                        y = sy + ph * bh + (iy + 0.5) * bh / gh
                        for ix in range(gw):
                            xx = sx + pw * bw + (ix + 0.5) * bw / gw
                            acc += bilinear(x[n, c], y, xx)
                    out[k, c, ph, pw] = mask[k, 0, ph, pw] * acc / (gh * gw)
    return out


# ---------------------------------------------------------------- gradients with respect to x

@njit(cache=True)
def roi_align_backward(g, rois, x, PH, PW, scale, sr, aligned, mode_max):
    """x: the forward input (its shape; its values pick the max-mode argmax sample)."""
    gx = np.zeros(x.shape)
    off = 0.5 if aligned else 0.0
    for k in range(rois.shape[0]):
        n = int(rois[k, 0])
        xs = rois[k, 1] * scale - off
        ys = rois[k, 2] * scale - off
        rw = rois[k, 3] * scale - off - xs
        rh = rois[k, 4] * scale - off - ys
        if not (np.isfinite(xs) and np.isfinite(ys) and np.isfinite(rw) and np.isfinite(rh)):
            continue
        if not aligned:
            rw = max(rw, 1.0)
            rh = max(rh, 1.0)
        bh = rh / PH
        bw = rw / PW
        gh = _grid(rh, PH, sr, x.shape[2])
        gw = _grid(rw, PW, sr, x.shape[3])
        if gh * gw == 0:
            continue
        for c in range(x.shape[1]):
            for ph in range(PH):
                for pw in range(PW):
                    # max mode: the first sample of the largest value gets the whole gradient
                    am = 0
                    best = 0.0
                    if mode_max:
                        for s in range(gh * gw):
                            y = ys + ph * bh + (s // gw + 0.5) * bh / gh
                            xx = xs + pw * bw + (s % gw + 0.5) * bw / gw
                            val = bilinear(x[n, c], y, xx)
                            if s == 0 or val > best:
                                best = val
                                am = s
                    for s in range(gh * gw):
                        if mode_max and s != am:
                            continue
                        y = ys + ph * bh + (s // gw + 0.5) * bh / gh
                        xx = xs + pw * bw + (s % gw + 0.5) * bw / gw
                        v = g[k, c, ph, pw] if mode_max else g[k, c, ph, pw] / (gh * gw)
                        scatter(gx[n, c], y, xx, v)
    return gx


@njit(cache=True)
def ps_roi_align_backward(g, rois, x, PH, PW, scale, sr):
    """x: an array of the forward input's shape (only the shape is used)."""
    gx = np.zeros(x.shape)
    for k in range(rois.shape[0]):
        n = int(rois[k, 0])
        xs = rois[k, 1] * scale - 0.5
        ys = rois[k, 2] * scale - 0.5
        rw = rois[k, 3] * scale - 0.5 - xs
        rh = rois[k, 4] * scale - 0.5 - ys
        if not (np.isfinite(xs) and np.isfinite(ys) and np.isfinite(rw) and np.isfinite(rh)):
            continue
        bh = rh / PH
        bw = rw / PW
        gh = _grid(rh, PH, sr, x.shape[2])
        gw = _grid(rw, PW, sr, x.shape[3])
        if gh * gw == 0:
            continue
        for co in range(g.shape[1]):
            for ph in range(PH):
                for pw in range(PW):
                    ci = (co * PH + ph) * PW + pw
                    for iy in range(gh):
                        y = ys + ph * bh + (iy + 0.5) * bh / gh
                        for ix in range(gw):
                            xx = xs + pw * bw + (ix + 0.5) * bw / gw
                            scatter(gx[n, ci], y, xx, g[k, co, ph, pw] / (gh * gw))
    return gx


@njit(cache=True)
def deform_roi_pool_backward(g, rois, x, offset, mask, PH, PW, scale, sr, gamma):
    """Gradient with respect to x only (offset and mask: differentiate the forward oracle)."""
    gx = np.zeros(x.shape)
    for k in range(rois.shape[0]):
        n = int(rois[k, 0])
        xs = rois[k, 1] * scale - 0.5
        ys = rois[k, 2] * scale - 0.5
        rw = rois[k, 3] * scale - 0.5 - xs
        rh = rois[k, 4] * scale - 0.5 - ys
        if not (np.isfinite(xs) and np.isfinite(ys) and np.isfinite(rw) and np.isfinite(rh)):
            continue
        bh = rh / PH
        bw = rw / PW
        gh = _grid(rh, PH, sr, x.shape[2])
        gw = _grid(rw, PW, sr, x.shape[3])
        if gh * gw == 0:
            continue
        for c in range(x.shape[1]):
            for ph in range(PH):
                for pw in range(PW):
                    sx = xs + gamma * rw * offset[k, 0, ph, pw]
                    sy = ys + gamma * rh * offset[k, 1, ph, pw]
                    v = mask[k, 0, ph, pw] * g[k, c, ph, pw] / (gh * gw)
                    for iy in range(gh):
                        y = sy + ph * bh + (iy + 0.5) * bh / gh
                        for ix in range(gw):
                            xx = sx + pw * bw + (ix + 0.5) * bw / gw
                            scatter(gx[n, c], y, xx, v)
    return gx


@njit(cache=True)
def roi_pool_backward(g, rois, x, PH, PW, scale):
    """Each bin's gradient goes to the first maximum of its window (row-major)."""
    H, W = x.shape[2], x.shape[3]
    gx = np.zeros(x.shape)
    for k in range(rois.shape[0]):
        n = int(rois[k, 0])
        if not np.all(np.isfinite(rois[k, 1:])):
            continue
        h0, h1, w0, w1 = _pool_bins(rois[k], scale, PH, PW, H, W)
        for ph in range(PH):
            for pw in range(PW):
                for c in range(x.shape[1]):
                    m = -np.inf
                    hm = wm = -1
                    for h in range(h0[ph], h1[ph]):
                        for w in range(w0[pw], w1[pw]):
                            if x[n, c, h, w] > m:
                                m = x[n, c, h, w]
                                hm, wm = h, w
                    if hm >= 0:
                        gx[n, c, hm, wm] += g[k, c, ph, pw]
    return gx


@njit(cache=True)
def _rot_geom(roi, PH, PW, L, scale, sr, aligned, angle_scale):
    """detectron2's ROIAlignRotated geometry of roi [b, cx, cy, w, h, angle]:
    (ok, cy, cx, rh, rw, cos, sin, gh, gw). Not ok (zeros, no gradient): a non-finite entry, a
    negative size when aligned, or an empty sample grid (capped at 2 L + 64, L = max(H, W))."""
    off = 0.5 if aligned else 0.0
    rw = roi[3] * scale
    rh = roi[4] * scale
    ok = np.all(np.isfinite(roi[1:6])) and not (aligned and (rw < 0 or rh < 0))
    if not aligned:
        rw = max(rw, 1.0)
        rh = max(rh, 1.0)
    t = roi[5] * angle_scale
    gh = _grid(rh, PH, sr, L) if ok else 0
    gw = _grid(rw, PW, sr, L) if ok else 0
    return (gh * gw > 0, roi[2] * scale - off, roi[1] * scale - off, rh, rw, np.cos(t),
            np.sin(t), gh, gw)


@njit(cache=True)
def _rot_point(cy, cx, rh, rw, c, s, PH, PW, gh, gw, ph, pw, iy, ix):
    """Sample (iy, ix) of bin (ph, pw): local (yy, xx) from the RoI's centre, rotated."""
    yy = -rh / 2 + ph * rh / PH + (iy + 0.5) * rh / PH / gh
    xx = -rw / 2 + pw * rw / PW + (ix + 0.5) * rw / PW / gw
    return yy * c - xx * s + cy, yy * s + xx * c + cx


@njit(cache=True)
def _rotated(x, g, rois, PH, PW, scale, sr, aligned, angle_scale, backward):
    """Forward (out) or, with ``backward``, grad_x for grad_out g."""
    K = rois.shape[0]
    N, C, H, W = x.shape
    out = np.zeros((K, C, PH, PW))
    gx = np.zeros(x.shape)
    for k in range(K):
        n = int(rois[k, 0])
        ok, cy, cx, rh, rw, cs, sn, gh, gw = _rot_geom(rois[k], PH, PW, max(H, W), scale, sr,
                                                       aligned, angle_scale)
        if not ok:
            continue
        for c in range(C):
            for ph in range(PH):
                for pw in range(PW):
                    acc = 0.0
                    for iy in range(gh):
                        for ix in range(gw):
                            y, xx = _rot_point(cy, cx, rh, rw, cs, sn, PH, PW, gh, gw, ph, pw,
                                               iy, ix)
                            if backward:
                                scatter(gx[n, c], y, xx, g[k, c, ph, pw] / (gh * gw))
                            else:
                                acc += bilinear(x[n, c], y, xx)
                    out[k, c, ph, pw] = acc / (gh * gw)
    return gx if backward else out


def roi_align_rotated(x, rois, PH, PW, scale, sr, aligned, angle_scale):
    """rois (K, 6) [b, cx, cy, w, h, angle]; angle * angle_scale: counter-clockwise radians."""
    return _rotated(x, np.zeros((1, 1, 1, 1)), rois, PH, PW, scale, sr, aligned, angle_scale,
                    False)


def roi_align_rotated_backward(g, rois, x_shape, PH, PW, scale, sr, aligned, angle_scale):
    return _rotated(np.zeros(x_shape), g, rois, PH, PW, scale, sr, aligned, angle_scale, True)


def random_rotated_rois(rng, K, N, H, W, scale=1.0):
    """K random rotated RoIs [b, cx, cy, w, h, angle_degrees] in image coordinates: centres
    partly outside the map, tiny to map-sized boxes, some of zero or negative size, angles
    anywhere (negative, beyond 360, multiples of 90)."""
    Wi, Hi = W / scale, H / scale
    cx = rng.uniform(-0.3 * Wi, 1.3 * Wi, K)
    cy = rng.uniform(-0.3 * Hi, 1.3 * Hi, K)
    ms = max(Wi, Hi)
    w = rng.uniform(-0.05, 1.0, K) * ms * rng.choice([0.05, 0.3, 1.0], K)
    h = rng.uniform(-0.05, 1.0, K) * ms * rng.choice([0.05, 0.3, 1.0], K)
    w[rng.random(K) < 0.05] = 0
    a = np.where(rng.random(K) < 0.3, rng.choice([0, 90, -90, 180, 270, 360, -720, 450], K),
                 rng.uniform(-800, 800, K))
    return np.stack([rng.integers(0, N, K), cx, cy, w, h, a], 1).astype(np.float64)


def random_rois(rng, K, N, H, W, scale=1.0, lo=-0.3, hi=1.3, max_size=None):
    """K random RoIs in image coordinates (x's pixels / scale), partly outside the map,
    including tiny and degenerate (x2 < x1) ones."""
    Wi, Hi = W / scale, H / scale
    x1 = rng.uniform(lo * Wi, hi * Wi, K)
    y1 = rng.uniform(lo * Hi, hi * Hi, K)
    ms = max_size or max(Wi, Hi)
    w = rng.uniform(-0.05, 1.0, K) * ms * rng.choice([0.05, 0.3, 1.0], K)
    h = rng.uniform(-0.05, 1.0, K) * ms * rng.choice([0.05, 0.3, 1.0], K)
    b = rng.integers(0, N, K)
    return np.stack([b, x1, y1, x1 + w, y1 + h], 1).astype(np.float64)


def fpn_level(roi, k0, s0, kmin, kmax):
    """torchvision's LevelMapper (FPN eq. 1) for one RoI [b, x1, y1, x2, y2]: the pyramid level
    floor(k0 + log2(sqrt(area) / s0) + 1e-6) clamped to [kmin, kmax], or None when it is NaN
    (a non-finite coordinate, a negative area), which torchvision pools on no level."""
    area = (roi[3] - roi[1]) * (roi[4] - roi[2])
    if not area >= 0:                              # NaN, or a box inverted along one axis
        return None
    if area == 0:                                  # log2(0) = -inf
        return kmin
    k = np.floor(k0 + np.log2(np.sqrt(area) / s0) + 1e-6)
    if np.isnan(k):                                # inf - inf inside the area
        return None
    return int(min(max(k, kmin), kmax))


def multi_scale_roi_align(features, rois, PH, PW, scales, s0, k0, sr, aligned):
    """torchvision's MultiScaleRoIAlign: RoI k pooled by the RoIAlign oracle on the map of its
    level (scales[l] = 2**-(kmin + l)); zeros for a RoI of no level. One level: no mapping."""
    L = len(features)
    kmin = int(round(-np.log2(scales[0])))
    K, C = rois.shape[0], features[0].shape[1]
    out = np.zeros((K, C, PH, PW))
    for k in range(K):
        lev = kmin if L == 1 else fpn_level(rois[k], k0, s0, kmin, kmin + L - 1)
        if lev is None:
            continue
        out[k] = roi_align(features[lev - kmin], rois[k:k + 1], PH, PW, scales[lev - kmin], sr,
                           aligned, False)[0]
    return out


def multi_scale_roi_align_backward(g, rois, features, PH, PW, scales, s0, k0, sr, aligned):
    """The gradient of :func:`multi_scale_roi_align` with respect to each level's map."""
    L = len(features)
    kmin = int(round(-np.log2(scales[0])))
    grads = [np.zeros(f.shape) for f in features]
    for k in range(rois.shape[0]):
        lev = kmin if L == 1 else fpn_level(rois[k], k0, s0, kmin, kmin + L - 1)
        if lev is None:
            continue
        i = lev - kmin
        grads[i] += roi_align_backward(g[k:k + 1], rois[k:k + 1], features[i], PH, PW,
                                       scales[i], sr, aligned, False)
    return grads


def pyramid_rois(rng, K, N, img_h, img_w, s0=224.0, k0=4, margin=1e-3):
    """K random RoIs in image coordinates whose sides span 1/8 .. 2x the image (log-uniform),
    so that every level of a pyramid gets some, none within `margin` of a level boundary (the
    float32 level computations would be free to round either way there), a few inside out."""
    out = []
    while len(out) < K:
        side = np.exp(rng.uniform(np.log(2.0), np.log(2.0 * max(img_h, img_w))))
        w, h = side * np.exp(rng.uniform(-0.5, 0.5, 2))
        x1, y1 = rng.uniform(-0.2 * img_w, img_w), rng.uniform(-0.2 * img_h, img_h)
        t = k0 + np.log2(np.sqrt(np.float32(w) * np.float32(h)) / s0) + 1e-6
        if abs(t - np.round(t)) < margin:
            continue
        out.append([rng.integers(0, N), x1, y1, x1 + w, y1 + h])
    return np.array(out, np.float64)
