"""Float64 oracle for deformable convolution (DCN v1/v2), written as the direct sum

    y[n, o, ho, wo] = b[o] + sum_{c in group(o)} sum_{i, j} w[o, c, i, j]
                      * m[n, g(c), k, ho, wo] * x_c(ho*sh - ph + i*dh + dy_k, wo*sw - pw + j*dw + dx_k)

with k = i*kw + j, (dy_k, dx_k) = offset[n, g*2K + 2k], offset[n, g*2K + 2k + 1] and x_c(y, x)
bilinear interpolation of channel c with zeros outside the map (torchvision's deform_conv2d: a
sample with y <= -1, y >= H, x <= -1 or x >= W is 0). The backward differentiates the same sum
term by term: with x_c(y, x) = sum over the four corners of (1 - |y - y_q|)(1 - |x - x_q|) x_q,
d/dy and d/dx are taken on the cell [floor(y), floor(y) + 1) x [floor(x), floor(x) + 1) (the
right derivative at integer positions, as torchvision), and 0 outside the map or for NaN
positions; a sample outside the map gives its offsets, mask and x no gradient at all (not
NaN * 0 for a NaN weight). Plain scalar loops, numba-jitted; shares nothing with fastnorm.
"""
import math

import numpy as np
from numba import njit


@njit(cache=True)
def _pixel(x, n, c, yy, xx):
    H, W = x.shape[2], x.shape[3]
    if 0 <= yy < H and 0 <= xx < W:
        return x[n, c, yy, xx]
    return 0.0


@njit(cache=True)
def bilinear(x, n, c, y, xq):
    """x[n, c] sampled at (y, xq), zero padding; NaN -> 0."""
    H, W = x.shape[2], x.shape[3]
    if not (y > -1.0 and y < H and xq > -1.0 and xq < W):
        return 0.0
    y0 = math.floor(y)
    x0 = math.floor(xq)
    ly = y - y0
    lx = xq - x0
    y0 = int(y0)
    x0 = int(x0)
    return ((1 - ly) * (1 - lx) * _pixel(x, n, c, y0, x0) + (1 - ly) * lx * _pixel(x, n, c, y0, x0 + 1)
            + ly * (1 - lx) * _pixel(x, n, c, y0 + 1, x0) + ly * lx * _pixel(x, n, c, y0 + 1, x0 + 1))


@njit(cache=True)
def _bilinear_grad(x, n, c, y, xq, gcorner, gx):
    """(d x_c/dy, d x_c/dx) at (y, xq); adds gcorner * corner weight to gx at the 4 corners."""
    H, W = x.shape[2], x.shape[3]
    if not (y > -1.0 and y < H and xq > -1.0 and xq < W):
        return 0.0, 0.0
    y0 = int(math.floor(y))
    x0 = int(math.floor(xq))
    ly = y - y0
    lx = xq - x0
    v00 = _pixel(x, n, c, y0, x0)
    v01 = _pixel(x, n, c, y0, x0 + 1)
    v10 = _pixel(x, n, c, y0 + 1, x0)
    v11 = _pixel(x, n, c, y0 + 1, x0 + 1)
    for yy, xx, wt in ((y0, x0, (1 - ly) * (1 - lx)), (y0, x0 + 1, (1 - ly) * lx),
                       (y0 + 1, x0, ly * (1 - lx)), (y0 + 1, x0 + 1, ly * lx)):
        if 0 <= yy < H and 0 <= xx < W:
            gx[n, c, yy, xx] += gcorner * wt
    dvdy = (1 - lx) * (v10 - v00) + lx * (v11 - v01)
    dvdx = (1 - ly) * (v01 - v00) + ly * (v11 - v10)
    return dvdy, dvdx


@njit(cache=True)
def _backward(gy, x, offset, mask, has_mask, weight, sh, sw, ph, pw, dh, dw):
    N, C, H, W = x.shape
    Cout, Cg, kh, kw = weight.shape
    Ho, Wo = offset.shape[2], offset.shape[3]
    K = kh * kw
    G = offset.shape[1] // (2 * K)
    cpg = C // G
    groups = C // Cg
    cout_g = Cout // groups
    gx = np.zeros(x.shape)
    goff = np.zeros(offset.shape)
    gmask = np.zeros(mask.shape)
    gw = np.zeros(weight.shape)
    gb = np.zeros(Cout)
    for n in range(N):
        for o in range(Cout):
            grp = o // cout_g
            for ho in range(Ho):
                for wo in range(Wo):
                    go = gy[n, o, ho, wo]
                    gb[o] += go
                    for ci in range(Cg):
                        c = grp * Cg + ci
                        g = c // cpg
                        for i in range(kh):
                            for j in range(kw):
                                k = i * kw + j
                                dy = offset[n, g * 2 * K + 2 * k, ho, wo]
                                dx = offset[n, g * 2 * K + 2 * k + 1, ho, wo]
                                m = mask[n, g * K + k, ho, wo] if has_mask else 1.0
                                yy = ho * sh - ph + i * dh + dy
                                xx = wo * sw - pw + j * dw + dx
                                v = bilinear(x, n, c, yy, xx)
                                w = weight[o, ci, i, j]
                                gw[o, ci, i, j] += go * m * v
                                if not (yy > -1.0 and yy < H and xx > -1.0 and xx < W):
                                    continue        # reads nothing (even with a NaN weight)
                                if has_mask:
                                    gmask[n, g * K + k, ho, wo] += go * w * v
                                dvdy, dvdx = _bilinear_grad(x, n, c, yy, xx, go * w * m, gx)
                                goff[n, g * 2 * K + 2 * k, ho, wo] += go * w * m * dvdy
                                goff[n, g * 2 * K + 2 * k + 1, ho, wo] += go * w * m * dvdx
    return gx, goff, gmask, gw, gb


@njit(cache=True)
def _forward(x, offset, mask, has_mask, weight, bias, sh, sw, ph, pw, dh, dw):
    N, C, H, W = x.shape
    Cout, Cg, kh, kw = weight.shape
    Ho, Wo = offset.shape[2], offset.shape[3]
    K = kh * kw
    G = offset.shape[1] // (2 * K)
    cpg = C // G
    groups = C // Cg
    cout_g = Cout // groups
    y = np.zeros((N, Cout, Ho, Wo))
    for n in range(N):
        for o in range(Cout):
            grp = o // cout_g
            for ho in range(Ho):
                for wo in range(Wo):
                    s = bias[o]
                    for ci in range(Cg):
                        c = grp * Cg + ci
                        g = c // cpg
                        for i in range(kh):
                            for j in range(kw):
                                k = i * kw + j
                                dy = offset[n, g * 2 * K + 2 * k, ho, wo]
                                dx = offset[n, g * 2 * K + 2 * k + 1, ho, wo]
                                m = mask[n, g * K + k, ho, wo] if has_mask else 1.0
                                yy = ho * sh - ph + i * dh + dy
                                xx = wo * sw - pw + j * dw + dx
                                s += weight[o, ci, i, j] * m * bilinear(x, n, c, yy, xx)
                    y[n, o, ho, wo] = s
    return y


def _pair(v):
    return (v, v) if np.isscalar(v) else tuple(v)


def deform_conv2d_ref(x, offset, weight, bias=None, mask=None, stride=1, padding=0, dilation=1):
    """Float64 reference of deform_conv2d (NumPy arrays in, float64 (N, C_out, Ho, Wo) out)."""
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    x = np.asarray(x, np.float64)
    offset = np.asarray(offset, np.float64)
    weight = np.asarray(weight, np.float64)
    bias = np.zeros(weight.shape[0]) if bias is None else np.asarray(bias, np.float64)
    has_mask = mask is not None
    mask = np.asarray(mask, np.float64) if has_mask else np.zeros((1, 1, 1, 1))
    return _forward(x, offset, mask, has_mask, weight, bias, sh, sw, ph, pw, dh, dw)


def deform_conv2d_backward_ref(grad_out, x, offset, weight, mask=None, stride=1, padding=0,
                               dilation=1):
    """Float64 reference of deform_conv2d_backward: (grad_x, grad_offset, grad_mask or None,
    grad_weight, grad_bias), NumPy float64 arrays."""
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    gy = np.asarray(grad_out, np.float64)
    x = np.asarray(x, np.float64)
    offset = np.asarray(offset, np.float64)
    weight = np.asarray(weight, np.float64)
    has_mask = mask is not None
    m = np.asarray(mask, np.float64) if has_mask else np.zeros((1, 1, 1, 1))
    gx, goff, gmask, gw, gb = _backward(gy, x, offset, m, has_mask, weight, sh, sw, ph, pw, dh, dw)
    return gx, goff, gmask if has_mask else None, gw, gb
