"""CUDA launcher for the NMS family: the same functions and signatures as ``fastnorm._cpu.nms``.

Ranking and output assembly are CuPy array operations on the device (stable sorts, one pass per
key: score with NaN last, then class, then image); suppression is ``nms_mask`` (64-bit words,
class-aware: pairs of different segments are never compared) plus the one-block on-device sweep
``nms_sweep`` -- no per-box host synchronisation. weighted_nms adds ``nms_assign`` (each box's
first kept suppressor) and ``weighted_fuse`` (per-cluster weighted mean in the CPU's summation
order, after a stable sort of the boxes by cluster); soft_nms runs ``soft_nms_seg``, one block per
image, which selects (block argmax) and decays on the device.
"""
import numpy as np

from . import ctype, cupy, function, i64, instantiate, launch

_KERNELS = ("nms_mask<{}>", "box_metric<{}>", "matrix_comp<{}>", "matrix_decay<{}>",
            "weighted_fuse<{}>", "soft_nms_seg<{}>")
_EXPRS = [e for k in _KERNELS for e in instantiate(k)] + ["nms_sweep", "nms_assign"]
_SOFT_THREADS = 256         # SOFT_THREADS in nms.cu


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


def _greedy(cp, boxes, scores, batch, classes, iou_threshold, use_score_threshold,
            score_threshold, cap, criterion, beta):
    """Ranking, suppression mask and sweep: (order, seg, keep (uint8 per rank), mask, colblocks)."""
    order, seg = _rank(cp, scores, batch, classes, use_score_threshold, score_threshold)
    m = order.shape[0]
    keep = cp.zeros(m, dtype=cp.uint8)
    mask, cb = None, (m + 63) // 64
    if m:
        rb = cp.ascontiguousarray(boxes[order])
        mask = cp.empty((m, cb), dtype=cp.uint64)
        _fn("nms_mask<{}>", boxes.dtype)((cb, cb), (64,), (rb, seg, i64(m), i64(cb),
                                         np.float64(iou_threshold), np.int32(criterion),
                                         np.float64(beta), mask))
        removed = cp.zeros(cb, dtype=cp.uint64)
        single = batch is None and classes is None
        _fn("nms_sweep")((1,), (256,), (mask, i64(m), i64(cb), i64(cap if single else m + 1),
                                        removed, keep))
    return order, seg, keep, mask, cb


def nms(boxes, scores, batch, classes, iou_threshold, use_score_threshold, score_threshold,
        max_output, criterion, beta, num_images, split, nthreads):
    cp = cupy()
    cap = max_output if max_output >= 0 else scores.shape[0] + 1
    order, _, keep, _, _ = _greedy(cp, boxes, scores, batch, classes, iou_threshold,
                                   use_score_threshold, score_threshold, cap, criterion, beta)
    idx = order[cp.flatnonzero(keep)]
    return _assemble(cp, idx, scores, batch, cap, classes is not None, num_images, split)


def weighted_nms(boxes, scores, batch, classes, iou_threshold, use_score_threshold,
                 score_threshold, max_output, num_images, split, nthreads):
    cp = cupy()
    cap = max_output if max_output >= 0 else scores.shape[0] + 1
    order, seg, keep, mask, cb = _greedy(cp, boxes, scores, batch, classes, iou_threshold,
                                         use_score_threshold, score_threshold, cap, 0, 1.0)
    m = order.shape[0]
    kept = cp.flatnonzero(keep).astype(cp.int64)
    k = kept.shape[0]
    fused = cp.empty((k, 4), dtype=boxes.dtype)
    if k:
        rb = cp.ascontiguousarray(boxes[order])
        segstart = cp.searchsorted(seg, seg, side="left").astype(cp.int64)
        assign = cp.empty(m, dtype=cp.int64)
        launch(_fn("nms_assign"), m, (mask, keep, segstart, i64(m), i64(cb), assign))
        members = cp.argsort(assign).astype(cp.int64)        # stable: rank order per cluster
        sorted_assign = assign[members]
        lo = cp.searchsorted(sorted_assign, kept, side="left").astype(cp.int64)
        hi = cp.searchsorted(sorted_assign, kept, side="right").astype(cp.int64)
        w = cp.ascontiguousarray(scores[order].astype(cp.float64))
        launch(_fn("weighted_fuse<{}>", boxes.dtype), k,
               (rb, w, members, lo, hi, kept, i64(k), fused))
    idx = order[kept]
    return _assemble(cp, idx, scores, batch, cap, classes is not None, num_images, split,
                     (fused,))


def soft_nms(boxes, scores, batch, method, sigma, iou_threshold, score_threshold, num_images,
             split, nthreads):
    cp = cupy()
    n = scores.shape[0]
    order, seg = _rank(cp, scores, batch, None, False, 0.0)
    m = order.shape[0]
    sel = cp.empty(0, dtype=cp.int64)
    out_rank = cp.empty(m, dtype=cp.int64)
    out_score = cp.empty(m, dtype=cp.float64)
    if m:
        rstart = cp.flatnonzero(cp.concatenate([cp.ones(1, dtype=cp.bool_),
                                                seg[1:] != seg[:-1]])).astype(cp.int64)
        S = rstart.shape[0]
        rstart = cp.concatenate([rstart, cp.full(1, m, dtype=cp.int64)])
        rb = cp.ascontiguousarray(boxes[order])
        cur = cp.ascontiguousarray(scores[order].astype(cp.float64))
        alive = cp.zeros(m, dtype=cp.uint8)
        count = cp.zeros(S, dtype=cp.int64)
        _fn("soft_nms_seg<{}>", boxes.dtype)(
            (S,), (_SOFT_THREADS,),
            (rb, rstart, order, cur, alive, np.int32(method), np.float64(sigma),
             np.float64(iou_threshold), np.float64(score_threshold), out_rank, out_score, count))
        pos = cp.arange(m, dtype=cp.int64) - rstart[seg]
        sel = cp.flatnonzero(pos < count[seg])
    idx = order[out_rank[sel]]
    sc = out_score[sel].astype(scores.dtype)
    return _assemble(cp, idx, scores, batch, n + 1, False, num_images, split, (sc,))


def matrix_nms(boxes, scores, batch, kernel, sigma, num_images, split, nthreads):
    cp = cupy()
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
    cp = cupy()
    out = cp.empty((a.shape[0], b.shape[0]), dtype=a.dtype)
    launch(_fn("box_metric<{}>", a.dtype), out.size,
           (a, b, i64(a.shape[0]), i64(b.shape[0]), np.int32(metric), out))
    return out
NAME_EXPRESSIONS = _EXPRS   # every instantiation CuPy may request (.ci/nvcc_check.py)
