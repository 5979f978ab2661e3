"""Float64 oracle for deformable convolution (DCN v1/v2), written as the direct sum

    y[n, o, ho, wo] = b[o] + sum_{c in group(o)} sum_{i, j} w[o, c, i, j]
                      * m[n, g(c), k, ho, wo] * x_c(ho*sh - ph + i*dh + dy_k, wo*sw - pw + j*dw + dx_k)

with k = i*kw + j, (dy_k, dx_k) = offset[n, g*2K + 2k], offset[n, g*2K + 2k + 1] and x_c(y, x)
bilinear interpolation of channel c with zeros outside the map (torchvision's deform_conv2d: a
sample with y <= -1, y >= H, x <= -1 or x >= W is 0). Plain scalar loops, numba-jitted; shares
nothing with fastnorm.
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
