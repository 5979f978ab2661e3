"""CUDA launcher for the NMS family: the same functions and signatures as ``fastnorm._cpu.nms``.

Ranking and output assembly are CuPy array operations on the device (stable sorts, one pass per
key: score with NaN last, then class, then image); suppression is ``nms_mask`` (64-bit words,
class-aware: pairs of different segments are never compared) plus the one-block on-device sweep
``nms_sweep`` -- no per-box host synchronisation. soft_nms and weighted_nms are CPU-only for now.
"""
import numpy as np

from . import ctype, function, i64, instantiate, launch

_KERNELS = ("nms_mask<{}>", "box_metric<{}>", "matrix_comp<{}>", "matrix_decay<{}>")
_EXPRS = [e for k in _KERNELS for e in instantiate(k)] + ["nms_sweep"]


def _fn(expr, dtype=None):
    return function("nms", expr.format(ctype(dtype)) if dtype is not None else expr, _EXPRS)


def _rank(cp, scores, batch, classes, use_thr, thr):
    n = scores.shape[0]
    cand = cp.flatnonzero(scores > thr) if use_thr else cp.arange(n, dtype=cp.int64)
    s = scores[cand].astype(cp.float64 if scores.dtype == cp.float64 else cp.float32)
    nan = cp.isnan(s)
    order = cp.argsort(cp.where(nan, cp.inf, -s))            # CuPy sorts are stable
    order = order[cp.argsort(nan[order].astype(cp.uint8))]
    for key in (classes, batch):
        if key is not None:
            order = order[cp.argsort(key[cand][order])]
    order = cand[order].astype(cp.int64)
    m = order.shape[0]
    seg = cp.zeros(m, dtype=cp.int64)
    if m > 1:
        change = cp.zeros(m, dtype=cp.bool_)
        for key in (batch, classes):
            if key is not None:
                k = key[order]
                change[1:] |= k[1:] != k[:-1]
        seg = cp.cumsum(change).astype(cp.int64)
    return order, seg


def _assemble(cp, idx, scores, batch, cap, merge, num_images, split, extras=()):
    if merge and idx.shape[0] > 1:
        s = scores[idx].astype(cp.float64)
        nan = cp.isnan(s)
        o = cp.argsort(idx)
        o = o[cp.argsort(cp.where(nan, cp.inf, -s)[o])]
        o = o[cp.argsort(nan[o].astype(cp.uint8))]
        if batch is not None:
            o = o[cp.argsort(batch[idx][o])]
        idx = idx[o]
        extras = tuple(e[o] for e in extras)
    if batch is None:
        idx, extras = idx[:cap], tuple(e[:cap] for e in extras)
        if split:
            return [[idx, *extras]] if extras else [idx]
        return (idx, *extras) if extras else idx
    nimg = num_images if num_images >= 0 else (int(batch.max()) + 1 if batch.shape[0] else 1)
    b = batch[idx]
    starts = cp.searchsorted(b, cp.arange(nimg + 1))
    if cap < idx.shape[0]:
        sel = cp.arange(idx.shape[0]) - starts[b] < cap
        idx, b = idx[sel], b[sel]
        extras = tuple(e[sel] for e in extras)
        starts = cp.searchsorted(b, cp.arange(nimg + 1))
    if not split:
        return (idx, *extras) if extras else idx
    first = cp.searchsorted(batch, cp.arange(nimg))
    st = starts.get()
    out = []
    for i in range(nimg):
        local = idx[st[i]:st[i + 1]] - first[i]
        out.append([local] + [e[st[i]:st[i + 1]] for e in extras] if extras else local)
    return out


def nms(boxes, scores, batch, classes, iou_threshold, use_score_threshold, score_threshold,
        max_output, criterion, beta, num_images, split, nthreads):
    import cupy as cp
    n = scores.shape[0]
    cap = max_output if max_output >= 0 else n + 1
    order, seg = _rank(cp, scores, batch, classes, use_score_threshold, score_threshold)
    m = order.shape[0]
    keep = cp.zeros(m, dtype=cp.uint8)
    if m:
        rb = cp.ascontiguousarray(boxes[order])
        cb = (m + 63) // 64
        mask = cp.empty((m, cb), dtype=cp.uint64)
        _fn("nms_mask<{}>", boxes.dtype)((cb, cb), (64,), (rb, seg, i64(m), i64(cb),
                                         np.float64(iou_threshold), np.int32(criterion),
                                         np.float64(beta), mask))
        removed = cp.zeros(cb, dtype=cp.uint64)
        single = batch is None and classes is None
        _fn("nms_sweep")((1,), (256,), (mask, i64(m), i64(cb), i64(cap if single else m + 1),
                                        removed, keep))
    idx = order[cp.flatnonzero(keep)]
    return _assemble(cp, idx, scores, batch, cap, classes is not None, num_images, split)


def weighted_nms(*args):
    raise RuntimeError("fastnorm: weighted_nms has no CUDA kernel yet; call it on NumPy arrays")


def soft_nms(*args):
    raise RuntimeError("fastnorm: soft_nms has no CUDA kernel yet; call it on NumPy arrays")


def matrix_nms(boxes, scores, batch, kernel, sigma, num_images, split, nthreads):
    import cupy as cp
    order, seg = _rank(cp, scores, batch, None, False, 0.0)
    m = order.shape[0]
    out = cp.empty_like(scores)
    if m:
        rb = cp.ascontiguousarray(boxes[order])
        first = cp.searchsorted(seg, seg, side="left").astype(cp.int64)
        comp = cp.empty(m, dtype=cp.float64)
        decay = cp.empty(m, dtype=cp.float64)
        launch(_fn("matrix_comp<{}>", boxes.dtype), m, (rb, first, i64(m), comp))
        launch(_fn("matrix_decay<{}>", boxes.dtype), m,
               (rb, first, comp, i64(m), np.int32(kernel), np.float64(sigma), decay))
        out[order] = (scores[order].astype(cp.float64) * decay).astype(scores.dtype)
    if not split:
        return out
    nimg = num_images
    bounds = cp.searchsorted(batch, cp.arange(nimg + 1)).get()
    return [out[bounds[i]:bounds[i + 1]] for i in range(nimg)]


def box_iou(a, b, metric, nthreads):
    import cupy as cp
    out = cp.empty((a.shape[0], b.shape[0]), dtype=a.dtype)
    launch(_fn("box_metric<{}>", a.dtype), out.size,
           (a, b, i64(a.shape[0]), i64(b.shape[0]), np.int32(metric), out))
    return out
NAME_EXPRESSIONS = _EXPRS   # every instantiation CuPy may request (.ci/nvcc_check.py)
