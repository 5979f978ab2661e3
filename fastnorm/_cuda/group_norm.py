"""GroupNorm on CUDA: launchers for the kernels of ``group_norm.cu``.

Exposes the same functions and signatures as ``fastnorm._cpu.group_norm`` (``nthreads`` is
ignored). Inputs are C-contiguous CuPy arrays that the public module has validated; mean/rstd are
float64 for float64 input and float32 otherwise.

Forward: partial moments (NCHW: chunks of each contiguous group; channels-last: per-channel
partials of position tiles) -> ``gn_finalize`` (one block per (n, g), fixed-order Chan merge) ->
``gn_apply`` (vectorised elementwise pass). Partial moments are float64, and the mean reaches
the elementwise pass split into its rounded value and the remainder, so a large common offset
costs no accuracy. Backward: per-(n, c) partial sums -> ``gn_bwd_coeffs`` and ``gn_bwd_wb`` ->
``gn_apply``. Work is split so that a few groups still fill the GPU, and every reduction has a
fixed order, so results are deterministic.

Host work per call: the launch plans (kernels, grids, scalars) are cached per shape, dtype,
layout, vector width and device (``_stats_plan``, ``_apply_plan``); outputs the kernels write
whole are ``empty`` (no fills); the workspaces are one allocation per dtype; no synchronisation.
"""
import functools
import math

import numpy as np

from . import cdiv, ctype, cupy, function, i64, run

_NS = "fastnorm::group_norm::"
TILE_THREADS = 256       # threads of the channels-last kernels (TILE_THREADS in the .cu)
_MAX_PARTS = 16384       # partials merged per group by gn_finalize


def _exprs(t, vec):
    """All kernel instantiations for C++ type t (vector width vec and 1)."""
    out = []
    for v in sorted({vec, 1}):
        out += [f"{_NS}gn_stats_nchw<{t}, {v}>", f"{_NS}gn_stats_nhwc<{t}, {v}>",
                f"{_NS}gn_grad_nchw<{t}, {v}>", f"{_NS}gn_grad_nhwc<{t}, {v}>",
                f"{_NS}gn_apply<{t}, {v}, false>", f"{_NS}gn_apply<{t}, {v}, true>"]
    return out + [f"{_NS}gn_finalize<{t}>", f"{_NS}gn_bwd_coeffs<{t}>", f"{_NS}gn_bwd_wb<{t}>"]


def _kernel(dtype, name, v=None):
    t = ctype(dtype)
    vec = 16 // np.dtype(dtype).itemsize
    if name == "gn_apply":
        expr = f"{_NS}gn_apply<{t}, {v[0]}, {'true' if v[1] else 'false'}>"
    elif v is None:
        expr = f"{_NS}{name}<{t}>"
    else:
        expr = f"{_NS}{name}<{t}, {v}>"
    return function("group_norm", expr, _exprs(t, vec))


@functools.lru_cache(maxsize=None)
def _sm_count(backend, device_id):
    return int(backend.cuda.Device(device_id).attributes["MultiProcessorCount"])


def _sms():
    cp = cupy()
    return _sm_count(cp, cp.cuda.Device().id)


def _pow2_block(n):
    """Smallest power of two >= n in [32, 256] (threads for a reduction over n batches)."""
    b = 32
    while b < 256 and b < n:
        b *= 2
    return b


def _vec_width(dtype, arrays, extent):
    """16-byte vectors when every array is 16-byte aligned and ``extent`` splits into them."""
    vec = 16 // np.dtype(dtype).itemsize
    if extent % vec == 0 and all(a.data.ptr % 16 == 0 for a in arrays):
        return vec
    return 1


def _dims(x, channels_last):
    N = x.shape[0]
    C = x.shape[-1] if channels_last else x.shape[1]
    S = x.size // (N * C) if N * C > 0 else 0
    return int(N), int(C), int(S)


def _stats_dtype(dtype):
    return np.float64 if dtype == np.float64 else np.float32


def _split(length, n_rows, v, block, r):
    """Chunk length L (a multiple of block*v) and chunk count of rows of ``length`` elements, so
    that n_rows * chunks blocks fill the GPU while each thread keeps at least one batch."""
    target = _sms() * (2048 // block)
    unit = block * v
    max_chunks = max(1, length // (unit * r))
    chunks = max(1, min(cdiv(target, n_rows), max_chunks, _MAX_PARTS))
    L = cdiv(cdiv(length, chunks), unit) * unit
    return L, cdiv(length, L)


def _tiles(N, S, C, Cg, v):
    """Channels-last position tiles: (positions per tile TP, number of tiles per sample)."""
    tcols = min(C // v, TILE_THREADS)
    trows = TILE_THREADS // tcols
    r = 8 if v == 1 else 4
    target = _sms() * 4
    nptile = max(1, min(cdiv(target, N), cdiv(S, 2 * trows * r), max(1, _MAX_PARTS // Cg)))
    TP = cdiv(S, nptile)
    return TP, cdiv(S, TP)


def _workspace(cp, dtype, *sizes):
    """Consecutive 1-D views of one fresh allocation of ``dtype``, one per size (one allocation
    per call instead of one per buffer: allocations are most of a small call's host time)."""
    ws = cp.empty(sum(sizes), dtype=dtype)
    views, o = [], 0
    for n in sizes:
        views.append(ws[o:o + n])
        o += n
    return views


@functools.lru_cache(maxsize=512)
def _stats_plan(backend, device_id, dtype, N, C, S, G, channels_last, v, backward):
    """The launch plan of one call's partial-sum kernel and of what reduces them, per (array
    module, device, dtype, shape, layout, vector width, direction): (kernel, grid, block, its
    trailing scalars), the partials per plane and their count, cached so that a repeated call
    does no planning, kernel lookup or scalar packing."""
    Cg, NG = C // G, N * G
    if channels_last:
        TP, nparts = _tiles(N, S, C, Cg, v)
        kern = _kernel(dtype, "gn_grad_nhwc" if backward else "gn_stats_nhwc", v)
        parts = N * nparts * C
        if backward:
            scal = (i64(S), i64(C), i64(G), i64(TP), i64(nparts), i64(N * nparts))
        else:
            scal = (i64(S), i64(C), i64(TP), i64(nparts), i64(N * nparts))
        stats = (kern, N * nparts, TILE_THREADS, scal)
        L, nfin = TP, nparts * Cg
    else:
        M = S if backward else Cg * S
        rows = N * C if backward else NG
        r = 8 if v == 1 else 4
        block = _pow2_block(cdiv(M, v * r))
        L, nparts = _split(M, rows, v, block, r)
        kern = _kernel(dtype, "gn_grad_nchw" if backward else "gn_stats_nchw", v)
        parts = rows * nparts
        if backward:
            scal = (i64(C), i64(S), i64(Cg), i64(L), i64(nparts), i64(parts))
        else:
            scal = (i64(M), i64(L), i64(nparts), i64(parts))
        stats = (kern, parts, block, scal)
        nfin = nparts
    if backward:
        reduce_ = (_kernel(dtype, "gn_bwd_coeffs"), NG, min(256, 32 * Cg),
                   (i64(NG), i64(G), i64(C), i64(S), i64(nparts), np.int32(channels_last)))
    else:
        reduce_ = (_kernel(dtype, "gn_finalize"), NG, _pow2_block(nfin),
                   (i64(NG), i64(G), i64(C), i64(S), i64(L), i64(nfin),
                    np.int32(channels_last)))
    return stats, parts, reduce_


@functools.lru_cache(maxsize=512)
def _apply_plan(backend, device_id, dtype, N, C, S, channels_last, act, v, bwd):
    """gn_apply's (kernel, grid, scalars) for one shape, dtype, vector width and direction."""
    nvec = N * C * S // v
    return (_kernel(dtype, "gn_apply", (v, bwd)), min(cdiv(nvec, 256), _sms() * 8),
            (i64(nvec), i64(S), i64(C), np.float64(1.0 / S), np.float64(1.0 / C),
             np.int32(channels_last), np.int32(act)))


def _apply(x, dy, out, cm, cs, k2, k3, b, N, C, S, channels_last, act, bwd):
    cp = cupy()
    arrays = (x, out) if dy is None else (x, out, dy)
    v = _vec_width(x.dtype, arrays, C if channels_last else S)
    kern, grid, scal = _apply_plan(cp, cp.cuda.Device().id, x.dtype, N, C, S, channels_last,
                                   act, v, bwd)
    run(kern, grid, 256, (x, x if dy is None else dy, out, cm, cs, k2, k3, b) + scal)


def forward(x, weight, bias, num_groups, eps, channels_last, activation, nthreads):
    """y, mean, rstd = forward(x, weight, bias, G, eps, channels_last, act, nthreads)."""
    cp = cupy()
    N, C, S = _dims(x, channels_last)
    G = int(num_groups)
    sdt = _stats_dtype(x.dtype)
    y = cp.empty_like(x)
    if N * C * S == 0:
        mean = cp.zeros((N, G), dtype=sdt)
        rstd = cp.zeros((N, G), dtype=sdt)
        if N * C > 0:
            rstd[...] = 1.0 / math.sqrt(eps)
        return y, mean, rstd
    mean = cp.empty((N, G), dtype=sdt)              # gn_finalize writes every (n, g)
    rstd = cp.empty((N, G), dtype=sdt)
    v = _vec_width(x.dtype, (x,), C if channels_last else (C // G) * S)
    (kern, grid, block, scal), parts, (fin, fgrid, fblock, fscal) = _stats_plan(
        cp, cp.cuda.Device().id, x.dtype, N, C, S, G, channels_last, v, False)
    pmean, pm2 = _workspace(cp, np.float64, parts, parts)
    run(kern, grid, block, (x, pmean, pm2) + scal)
    cm, cl, cs = _workspace(cp, sdt, N * C, N * C, N * C)
    run(fin, fgrid, fblock,
        (pmean, pm2, weight, mean, rstd, cm, cl, cs) + fscal + (np.float64(eps),))
    _apply(x, None, y, cm, cs, cl, cs, bias, N, C, S, channels_last, activation, False)
    return y, mean, rstd


def backward(grad_out, x, mean, rstd, weight, bias, num_groups, channels_last, activation,
             nthreads):
    """grad_x, grad_weight, grad_bias = backward(dy, x, mean, rstd, w, b, G, channels_last, act,
    nthreads)."""
    cp = cupy()
    N, C, S = _dims(x, channels_last)
    G = int(num_groups)
    sdt = _stats_dtype(x.dtype)
    gx = cp.empty_like(x)
    if N * C * S == 0:
        return gx, cp.zeros(C, dtype=x.dtype), cp.zeros(C, dtype=x.dtype)
    gw = cp.empty(C, dtype=x.dtype)                  # gn_bwd_wb writes every channel
    gb = cp.empty(C, dtype=x.dtype)
    v = _vec_width(x.dtype, (x, grad_out), C if channels_last else S)
    (kern, grid, block, scal), parts, (coef, cgrid, cblock, cscal) = _stats_plan(
        cp, cp.cuda.Device().id, x.dtype, N, C, S, G, channels_last, v, True)
    p1, p2, cm, cs, k2, k3 = _workspace(cp, sdt, parts, parts, *(N * C,) * 4)
    run(kern, grid, block, (grad_out, x, mean, rstd, weight, bias, p1, p2) + scal
        + (np.int32(activation),))
    sdz, sdzx = _workspace(cp, np.float64, N * C, N * C)
    run(coef, cgrid, cblock, (p1, p2, mean, rstd, weight, sdz, sdzx, cm, cs, k2, k3) + cscal)
    run(_kernel(x.dtype, "gn_bwd_wb"), cdiv(C * 32, 256), 256,
        (sdz, sdzx, gw, gb, i64(N), i64(C)))
    _apply(x, grad_out, gx, cm, cs, k2, k3, bias, N, C, S, channels_last, activation, True)
    return gx, gw, gb


# Every instantiation CuPy may request (the NVRTC gate, tests/test_cuda_compile.py, compiles them).
_WIDTH = {"float": 4, "double": 2, "__half": 8, "__nv_bfloat16": 8}
NAME_EXPRESSIONS = [e for t, vec in _WIDTH.items() for e in _exprs(t, vec)]
