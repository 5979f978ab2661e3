"""Float64 GroupNorm oracle: scalar loops over (N, C, S) straight from the definition.

y[n,c,s] = act(z), z = (x - mu[n,g]) / sqrt(var[n,g] + eps) * w[c] + b[c], with mu/var the mean
and biased variance over the Cg channels of group g and all S positions (two-pass sums).
Backward from the textbook derivative:
dz = dy * act'(z); gw[c] = sum dz xhat; gb[c] = sum dz;
gx = rstd/M * (M * w dz - sum_g(w dz) - xhat * sum_g(w dz xhat)).
Channels-last inputs are handled by the caller transposing to (N, C, S).
"""
import numba
import numpy as np


@numba.njit(cache=True)
def _act(z, act):
    if act == 1:
        return z if z > 0 else 0.0
    if act == 2:
        return z / (1.0 + np.exp(-z))
    return z


@numba.njit(cache=True)
def _dact(z, act):
    if act == 1:
        return 1.0 if z > 0 else 0.0
    if act == 2:
        s = 1.0 / (1.0 + np.exp(-z))
        return s + z * s * (1.0 - s)
    return 1.0


@numba.njit(cache=True)
def _forward(x, G, w, b, eps, act):
    N, C, S = x.shape
    Cg = C // G
    y = np.empty((N, C, S))
    mean = np.empty((N, G))
    rstd = np.empty((N, G))
    for n in range(N):
        for g in range(G):
            s = 0.0
            for c in range(g * Cg, (g + 1) * Cg):
                for i in range(S):
                    s += x[n, c, i]
            mu = s / (Cg * S)
            v = 0.0
            for c in range(g * Cg, (g + 1) * Cg):
                for i in range(S):
                    v += (x[n, c, i] - mu) ** 2
            r = 1.0 / np.sqrt(v / (Cg * S) + eps)
            mean[n, g] = mu
            rstd[n, g] = r
            for c in range(g * Cg, (g + 1) * Cg):
                for i in range(S):
                    y[n, c, i] = _act((x[n, c, i] - mu) * r * w[c] + b[c], act)
    return y, mean, rstd


@numba.njit(cache=True)
def _backward(dy, x, G, w, b, eps, act):
    N, C, S = x.shape
    Cg = C // G
    M = Cg * S
    _, mean, rstd = _forward(x, G, w, b, eps, 0)
    gx = np.empty((N, C, S))
    gw = np.zeros(C)
    gb = np.zeros(C)
    for n in range(N):
        for g in range(G):
            mu = mean[n, g]
            r = rstd[n, g]
            a = 0.0
            bb = 0.0
            for c in range(g * Cg, (g + 1) * Cg):
                for i in range(S):
                    xh = (x[n, c, i] - mu) * r
                    dz = dy[n, c, i] * _dact(xh * w[c] + b[c], act)
                    gw[c] += dz * xh
                    gb[c] += dz
                    a += w[c] * dz
                    bb += w[c] * dz * xh
            for c in range(g * Cg, (g + 1) * Cg):
                for i in range(S):
                    xh = (x[n, c, i] - mu) * r
                    dz = dy[n, c, i] * _dact(xh * w[c] + b[c], act)
                    gx[n, c, i] = r / M * (M * w[c] * dz - a - xh * bb)
    return gx, gw, gb


ACT = {None: 0, "relu": 1, "silu": 2}


def _ncs(a, channels_last):
    a = np.asarray(a, dtype=np.float64)
    if channels_last:
        a = np.moveaxis(a, -1, 1)
    return np.ascontiguousarray(a.reshape(a.shape[0], a.shape[1], -1)), a.shape


def _back(a, shape, channels_last):
    a = a.reshape(shape)
    return np.moveaxis(a, 1, -1) if channels_last else a


def group_norm(x, G, w=None, b=None, eps=1e-5, channels_last=False, activation=None):
    """(y, mean, rstd) in float64."""
    x3, shape = _ncs(x, channels_last)
    C = x3.shape[1]
    w = np.ones(C) if w is None else np.asarray(w, np.float64)
    b = np.zeros(C) if b is None else np.asarray(b, np.float64)
    y, mean, rstd = _forward(x3, G, w, b, eps, ACT[activation])
    return _back(y, shape, channels_last), mean, rstd


def group_norm_backward(dy, x, G, w=None, b=None, eps=1e-5, channels_last=False,
                        activation=None):
    """(grad_x, grad_w, grad_b) in float64."""
    x3, shape = _ncs(x, channels_last)
    dy3, _ = _ncs(dy, channels_last)
    C = x3.shape[1]
    w = np.ones(C) if w is None else np.asarray(w, np.float64)
    b = np.zeros(C) if b is None else np.asarray(b, np.float64)
    gx, gw, gb = _backward(dy3, x3, G, w, b, eps, ACT[activation])
    return _back(gx, shape, channels_last), gw, gb
