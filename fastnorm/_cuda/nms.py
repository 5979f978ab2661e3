"""CUDA launcher for the NMS family: the same functions and signatures as ``fastnorm._cpu.nms``.

Ranking and output assembly are CuPy array operations on the device (stable sorts, one pass per
key: score with NaN last, then class, then image). Greedy suppression (nms.cu) runs in chunks of
ranks planned by :func:`_plan`: per chunk, ``nms_mask`` computes the suppression bits of each
rank against the later ranks of its own segment (image x class) only, and ``nms_sweep`` sweeps
the chunk's segments in parallel, a block each, in 64-rank tiles (three barriers per tile, the
tile's ranks resolved in registers), carrying a removed-bitmap from chunk to chunk.
Memory is O(m) plus one chunk's mask, at most about :data:`MASK_BYTES`; no host synchronisation
but the sizes (candidates, segment table, kept boxes). weighted_nms adds ``nms_assign`` (each
box's first kept suppressor) and ``weighted_fuse`` (per-cluster weighted mean in the CPU's
summation order, after a stable sort of the boxes by cluster); soft_nms runs ``soft_nms_seg``,
one block per image, which selects (block argmax) and decays on the device; softer_nms runs
``softer_nms_seg``, the same with the variance vote of each selected box (block reductions).
Rotated boxes: ``rotated_prepare`` turns them into ROT_W doubles each (centre, half sizes,
cos/sin, area, circumradius); ``nms_rotated`` runs the same greedy chunks on the prepared boxes
of the ranks with criterion CRIT_ROTATED (the exact rotated IoU, ``rotated_iou``), and
``box_iou_rotated`` computes the pairs of the prepared a and b (memory O(N + M) besides the
result). Decisions are made in double, as on the CPU.
"""
import numpy as np

from .._kernels import CRITERIA, DECAYS
from . import ctype, cupy, function, i64, instantiate, launch, run

_NS = "fastnorm::nms::"
_KERNELS = ("score_keys<{}>", "nms_mask<{}>", "nms_assign<{}>", "box_metric<{}>", "matrix_comp<{}>",
            "matrix_decay<{}>", "weighted_fuse<{}>", "soft_nms_seg<{}>", "softer_nms_seg<{}>",
            "cluster_max<{}>", "combined_flag<{}>", "combined_gather<{}>",
            "rotated_prepare<{}>", "box_iou_rotated<{}>")
_EXPRS = [_NS + e for k in _KERNELS for e in instantiate(k)] + [_NS + "nms_sweep",
                                                                 _NS + "segment_flags"]
SOFT_THREADS = 256          # SOFT_THREADS in nms.cu
ROT_W = 8                   # ROT_W in nms.cu: doubles per prepared rotated box
_SWEEP_THREADS = 256

#: Bound, in bytes, on one chunk of the greedy suppression mask (each chunk holds at least 64
#: ranks: a single segment of more than MASK_BYTES / 8 boxes takes 8 bytes per box per chunk).
MASK_BYTES = 256 << 20
_MAX_ROW_TILES = 65535      # grid.y of nms_mask: 64 ranks each


def _fn(expr, dtype=None):
    return function("nms", _NS + (expr.format(ctype(dtype)) if dtype is not None else expr),
                    _EXPRS)


def _score_order(cp, scores, cand=None):
    """Positions 0..m-1 of the candidates (input indices ``cand``, or all) in the ranking's
    score order: decreasing, -0 equal to +0, NaN last, ties in candidate order (one stable sort
    of score_keys)."""
    m = scores.shape[0] if cand is None else cand.shape[0]
    keys = cp.empty(m, dtype=cp.uint64)
    launch(_fn("score_keys<{}>", scores.dtype), m,
           (scores, cp.empty(0, dtype=cp.int64) if cand is None else cand, i64(m), keys))
    return cp.argsort(keys)                                  # CuPy sorts are stable


def _rank(cp, scores, batch, classes, score_threshold):
    """Ranking: (order, seg, rstart, starts) -- input index of each rank, its segment (image x
    class), the first rank of each segment followed by m (device arrays, int64), and that table
    on the host (``starts``; one read-back of the segment flags with batch or classes, none
    without). Only boxes with score > score_threshold (when not None) are ranked. One stable sort
    of score keys (score_keys: decreasing, NaN last, ties by index), then one stable sort per
    segment key."""
    cand = (None if score_threshold is None
            else cp.flatnonzero(scores.astype(cp.float64) > score_threshold))
    order = _score_order(cp, scores, cand)
    if cand is not None:
        order = cand[order]
    for key in (classes, batch):
        if key is not None:
            order = order[cp.argsort(key[order])]
    order = order.astype(cp.int64, copy=False)
    m = order.shape[0]
    if batch is None and classes is None:                    # one segment
        return (order, cp.zeros(m, dtype=cp.int64), cp.asarray(np.array([0, m], np.int64)),
                np.array([0, m], np.int64))
    # the segment table: where the image or class changes along the ranking (segment_flags),
    # read back once, and the segment of every rank computed from it on the host
    flags = cp.empty(m, dtype=cp.uint8)
    none = cp.empty(0, dtype=cp.int64)
    launch(_fn("segment_flags"), m, (none if batch is None else batch,
                                     none if classes is None else classes, order, i64(m), flags))
    f = flags.get()
    starts = np.append(np.flatnonzero(f), m).astype(np.int64)
    seg = np.cumsum(f, dtype=np.int64) - 1
    return order, cp.asarray(seg), cp.asarray(starts), starts


def _plan(starts, budget_words):
    """Chunks of the greedy sweep for segments ``starts`` (first rank of each, then m; host).

    Returns ``(pieces, chunks)``: ``pieces`` is an int64 array of rows (pa, pb, pe, pw, poff,
    pseg) -- ranks [pa, pb) of segment pseg, which ends at rank pe, with pw mask words per rank
    at word poff of its chunk's mask (see nms.cu); ``chunks`` lists (c0, c1, p0, p1, grid_x,
    words): ranks [c0, c1) made of pieces [p0, p1), the mask kernel's grid width and the mask
    words. Whole segments are packed into a chunk while its mask stays within ``budget_words``
    and its ranks within the grid's row tiles; a larger segment is cut into pieces of as many
    ranks (a multiple of 64, at least 64) as fit.
    """
    max_rows = _MAX_ROW_TILES * 64
    pieces, chunks = [], []
    cur = []                                     # pieces of the chunk being packed

    def close():
        if cur:
            p0 = len(pieces)
            pieces.extend(cur)
            c0, c1 = cur[0][0], cur[-1][1]
            t0 = np.arange(c0, c1, 64, dtype=np.int64)          # row tiles of nms_mask
            last = np.minimum(t0 + 63, c1 - 1)
            s_of = np.searchsorted(starts, last, side="right") - 1
            gx = int(np.max((starts[s_of + 1] + 63) // 64 - t0 // 64))
            last_piece = cur[-1]
            words = last_piece[4] + (last_piece[1] - last_piece[0]) * last_piece[3]
            chunks.append((c0, c1, p0, len(pieces), gx, words))
            cur.clear()

    words = rows = 0
    for s in range(len(starts) - 1):
        a, e = int(starts[s]), int(starts[s + 1])
        while a < e:
            W = (e + 63) // 64 - a // 64
            take = e - a
            if take * W > budget_words:          # cut the segment: as many ranks as fit
                take = max(64, budget_words // W // 64 * 64)
                take = min(take, e - a)
            if cur and (words + take * W > budget_words or rows + take > max_rows):
                close()
                words = rows = 0
            take = min(take, max_rows - rows)
            cur.append((a, a + take, e, W, words, s))
            words += take * W
            rows += take
            a += take
            if a < e:                            # one piece per segment and chunk
                close()
                words = rows = 0
    close()
    return np.array(pieces, dtype=np.int64).reshape(-1, 6), chunks


def _greedy(cp, boxes, scores, batch, classes, iou_threshold, score_threshold, cap, criterion,
            beta, densities=None, angle_scale=0.0):
    """Ranking and greedy suppression: (order, seg, rstart, keep (uint8 per rank)). With
    ``densities``, each kept box suppresses above its own threshold (adaptive NMS). Criterion
    "rotated": boxes are (N, 5) rotated boxes, angles times ``angle_scale`` in radians."""
    order, seg, rstart, starts = _rank(cp, scores, batch, classes, score_threshold)
    m = order.shape[0]
    keep = cp.zeros(m, dtype=cp.uint8)
    if m == 0:
        return order, seg, rstart, keep
    pieces, chunks = _plan(starts, MASK_BYTES // 8)
    words = max(c[5] for c in chunks)
    try:
        mask = cp.empty(words, dtype=cp.uint64)
    except MemoryError as e:
        raise MemoryError(
            f"nms on CUDA: the suppression mask of {m} boxes needs {8 * words} bytes per chunk "
            f"(fastnorm._cuda.nms.MASK_BYTES = {MASK_BYTES}; a segment of n boxes needs at "
            f"least 8 * n bytes)") from e
    pa, pb, pe, pw, poff, pseg = cp.asarray(np.ascontiguousarray(pieces.T))   # one transfer
    rb = cp.ascontiguousarray(boxes[order])
    if criterion == CRITERIA["rotated"]:
        rb = _prepare_rotated(cp, rb, angle_scale)
    rthr = _thresholds(cp, iou_threshold, densities, order)
    removed = cp.zeros((m + 63) // 64, dtype=cp.uint64)
    count = cp.zeros(len(starts) - 1, dtype=cp.int64)
    seg_cap = cap if classes is None else m + 1  # with classes, the cap applies after merging
    mask_fn = _fn("nms_mask<{}>", rb.dtype)
    sweep_fn = _fn("nms_sweep")
    for c0, c1, p0, p1, gx, _ in chunks:
        s0 = int(pieces[p0, 5])
        run(mask_fn, (gx, (c1 - c0 + 63) // 64), 64,
            (rb, seg, pa, pe, pw, poff, i64(c0), i64(c1), i64(p0), i64(s0), removed, rthr,
             np.float64(iou_threshold), np.int32(criterion), np.float64(beta), mask))
        run(sweep_fn, p1 - p0, _SWEEP_THREADS,
            (mask, pa, pb, pe, pw, poff, pseg, i64(p0), i64(seg_cap), removed, count, keep))
    return order, seg, rstart, keep


def _assemble(cp, idx, scores, batch, cap, merge, extras=()):
    """Kept indices in output order: grouped by image, in decreasing score within an image
    (ties: lower index first; ``merge`` re-sorts the kept boxes of several classes), at most
    ``cap`` per image; ``extras`` follow their indices."""
    if merge and idx.shape[0] > 1:
        o = cp.argsort(idx)                                  # ties: lower index first
        o = o[_score_order(cp, scores, cp.ascontiguousarray(idx[o]))]
        if batch is not None:
            o = o[cp.argsort(batch[idx][o])]
        idx = idx[o]
        extras = tuple(e[o] for e in extras)
    if cap < idx.shape[0]:
        if batch is None:
            sel = slice(0, cap)
        else:                                    # position within its image, no image count
            b = batch[idx]
            sel = cp.flatnonzero(cp.arange(idx.shape[0]) - cp.searchsorted(b, b) < cap)
        idx = idx[sel]
        extras = tuple(e[sel] for e in extras)
    return (idx, *extras) if extras else idx


def nms(boxes, scores, batch, classes, iou_threshold, score_threshold, max_output, criterion,
        beta, nthreads):
    cp = cupy()
    cap = max_output if max_output >= 0 else scores.shape[0] + 1
    order, _, _, keep = _greedy(cp, boxes, scores, batch, classes, iou_threshold,
                                score_threshold, cap, criterion, beta)
    idx = order[cp.flatnonzero(keep)]
    return _assemble(cp, idx, scores, batch, cap, classes is not None)


def nms_rotated(boxes, scores, batch, classes, iou_threshold, score_threshold, max_output,
                angle_scale, nthreads):
    cp = cupy()
    cap = max_output if max_output >= 0 else scores.shape[0] + 1
    order, _, _, keep = _greedy(cp, boxes, scores, batch, classes, iou_threshold,
                                score_threshold, cap, CRITERIA["rotated"], 1.0,
                                angle_scale=angle_scale)
    idx = order[cp.flatnonzero(keep)]
    return _assemble(cp, idx, scores, batch, cap, classes is not None)


def weighted_nms(boxes, scores, batch, iou_threshold, score_threshold, max_output, nthreads):
    cp = cupy()
    cap = max_output if max_output >= 0 else scores.shape[0] + 1
    order, seg, rstart, keep = _greedy(cp, boxes, scores, batch, None, iou_threshold,
                                       score_threshold, cap, 0, 1.0)
    kept = cp.flatnonzero(keep).astype(cp.int64)
    k = kept.shape[0]
    fused = cp.empty((k, 4), dtype=boxes.dtype)
    if k:
        rb = cp.ascontiguousarray(boxes[order])
        members, lo, hi = _clusters(cp, rb, keep, seg, rstart, kept, iou_threshold)
        w = cp.ascontiguousarray(scores[order].astype(cp.float64))
        launch(_fn("weighted_fuse<{}>", boxes.dtype), k,
               (rb, w, members, lo, hi, kept, i64(k), fused))
    return _assemble(cp, order[kept], scores, batch, cap, False, (fused,))


def _clusters(cp, rb, keep, seg, rstart, kept, iou_threshold):
    """The greedy clusters of the ranked boxes ``rb`` (``nms_assign``): (members, lo, hi), the
    ranks sorted by cluster (rank order within one), kept rank kept[t]'s being
    members[lo[t]:hi[t]]."""
    m = keep.shape[0]
    assign = cp.empty(m, dtype=cp.int64)
    launch(_fn("nms_assign<{}>", rb.dtype), m,
           (rb, keep, seg, rstart, i64(m), np.float64(iou_threshold), assign))
    members = cp.argsort(assign).astype(cp.int64)        # stable: rank order per cluster
    sorted_assign = assign[members]
    lo = cp.searchsorted(sorted_assign, kept, side="left").astype(cp.int64)
    hi = cp.searchsorted(sorted_assign, kept, side="right").astype(cp.int64)
    return members, lo, hi


def soft_nms(boxes, scores, batch, method, sigma, iou_threshold, score_threshold, nthreads):
    return _soft(cupy(), boxes, scores, batch, method, sigma, iou_threshold, score_threshold)


def softer_nms(boxes, scores, variances, batch, sigma_t, method, sigma, iou_threshold,
               score_threshold, nthreads):
    return _soft(cupy(), boxes, scores, batch, method, sigma, iou_threshold, score_threshold,
                 variances=variances, sigma_t=sigma_t)


def _soft(cp, boxes, scores, batch, method, sigma, iou_threshold, score_threshold,
          densities=None, variances=None, sigma_t=None):
    """soft_nms_seg, one block per image (adaptive NMS's decays with ``densities``), or
    softer_nms_seg with ``variances``: (indices, scores at selection), or (indices, voted boxes,
    scores at selection) with variances."""
    order, seg, rstart, _ = _rank(cp, scores, batch, None, None)
    m = order.shape[0]
    sel = cp.empty(0, dtype=cp.int64)
    out_rank = cp.empty(m, dtype=cp.int64)
    out_score = cp.empty(m, dtype=cp.float64)
    out_box = cp.empty((0 if variances is None else m, 4), dtype=boxes.dtype)
    if m:
        S = rstart.shape[0] - 1
        rb = cp.ascontiguousarray(boxes[order])
        cur = cp.ascontiguousarray(scores[order].astype(cp.float64))
        alive = cp.zeros(m, dtype=cp.uint8)
        count = cp.zeros(S, dtype=cp.int64)
        decays = (np.int32(method), np.float64(sigma), np.float64(iou_threshold),
                  np.float64(score_threshold))
        if variances is None:
            rthr = _thresholds(cp, iou_threshold, densities, order)
            run(_fn("soft_nms_seg<{}>", boxes.dtype), S, SOFT_THREADS,
                (rb, rstart, order, cur, alive, rthr, *decays, out_rank, out_score, count))
        else:
            rv = cp.ascontiguousarray(variances[order])
            viou = cp.empty(m, dtype=cp.float64)
            run(_fn("softer_nms_seg<{}>", boxes.dtype), S, SOFT_THREADS,
                (rb, rv, rstart, order, cur, viou, alive, np.float64(sigma_t), *decays,
                 out_rank, out_score, out_box, count))
        pos = cp.arange(m, dtype=cp.int64) - rstart[seg]
        sel = cp.flatnonzero(pos < count[seg])
    res = (order[out_rank[sel]], out_score[sel].astype(scores.dtype))
    return res if variances is None else (res[0], out_box[sel], res[1])


def matrix_nms(boxes, scores, batch, kernel, sigma, nthreads):
    cp = cupy()
    order, seg, rstart, _ = _rank(cp, scores, batch, None, None)
    m = order.shape[0]
    out = cp.empty_like(scores)
    if m:
        rb = cp.ascontiguousarray(boxes[order])
        first = rstart[seg]
        comp = cp.empty(m, dtype=cp.float64)
        decay = cp.empty(m, dtype=cp.float64)
        launch(_fn("matrix_comp<{}>", boxes.dtype), m, (rb, first, i64(m), comp))
        launch(_fn("matrix_decay<{}>", boxes.dtype), m,
               (rb, first, comp, i64(m), np.int32(kernel), np.float64(sigma), decay))
        out[order] = (scores[order].astype(cp.float64) * decay).astype(scores.dtype)
    return out


def box_iou(a, b, metric, nthreads):
    cp = cupy()
    out = cp.empty((a.shape[0], b.shape[0]), dtype=a.dtype)
    launch(_fn("box_metric<{}>", a.dtype), out.size,
           (a, b, i64(a.shape[0]), i64(b.shape[0]), np.int32(metric), out))
    return out

def _prepare_rotated(cp, boxes, angle_scale):
    """Rotated boxes (n, 5) -> prepared (n, ROT_W) float64 (``rotated_prepare``)."""
    n = boxes.shape[0]
    out = cp.empty((n, ROT_W), dtype=cp.float64)
    launch(_fn("rotated_prepare<{}>", boxes.dtype), n,
           (boxes, i64(n), np.float64(angle_scale), out))
    return out


def box_iou_rotated(a, b, angle_scale, nthreads):
    cp = cupy()
    out = cp.empty((a.shape[0], b.shape[0]), dtype=a.dtype)
    if out.size:
        pa, pb = _prepare_rotated(cp, a, angle_scale), _prepare_rotated(cp, b, angle_scale)
        launch(_fn("box_iou_rotated<{}>", a.dtype), out.size,
               (pa, pb, i64(a.shape[0]), i64(b.shape[0]), out))
    return out


# ---------------------------------------------------------------- IoU-guided and adaptive NMS

def _thresholds(cp, iou_threshold, densities, order):
    """Adaptive NMS: each rank's own threshold, max(iou_threshold, density) in float64 (a NaN
    density counts as absent); without densities an empty array, which the kernels receive as
    a null pointer (one threshold for all)."""
    if densities is None:
        return cp.empty(0, dtype=cp.float64)
    return cp.ascontiguousarray(cp.fmax(iou_threshold, densities[order].astype(cp.float64)))


def iou_guided_nms(boxes, scores, localization, batch, classes, iou_threshold, score_threshold,
                   max_output, nthreads):
    cp = cupy()
    cap = max_output if max_output >= 0 else scores.shape[0] + 1
    cand = None
    if score_threshold is not None:
        cand = cp.flatnonzero(scores.astype(cp.float64) > score_threshold)
        boxes, scores, localization = boxes[cand], scores[cand], localization[cand]
        batch = None if batch is None else batch[cand]
        classes = None if classes is None else classes[cand]
    order, seg, rstart, keep = _greedy(cp, boxes, localization, batch, classes, iou_threshold,
                                       None, scores.shape[0] + 1, 0, 1.0)
    kept = cp.flatnonzero(keep).astype(cp.int64)
    k = kept.shape[0]
    new = cp.empty(k, dtype=scores.dtype)
    if k:
        rb = cp.ascontiguousarray(boxes[order])
        members, lo, hi = _clusters(cp, rb, keep, seg, rstart, kept, iou_threshold)
        launch(_fn("cluster_max<{}>", scores.dtype), k,
               (cp.ascontiguousarray(scores[order]), members, lo, hi, i64(k), new))
    idx = order[kept]
    by_index = cp.empty_like(scores)           # the new scores at their indices: the sort key
    by_index[idx] = new
    idx, new = _assemble(cp, idx, by_index, batch, cap, True, (new,))
    return (idx if cand is None else cand[idx]), new


def adaptive_nms(boxes, scores, densities, batch, method, sigma, iou_threshold, score_threshold,
                 nthreads):
    cp = cupy()
    if method != DECAYS["hard"]:
        return _soft(cp, boxes, scores, batch, method, sigma, iou_threshold, score_threshold,
                     densities)
    # score >= score_threshold, in float64: score > the double just below it
    order, _, _, keep = _greedy(cp, boxes, scores, batch, None, iou_threshold,
                                np.nextafter(score_threshold, -np.inf), scores.shape[0] + 1, 0,
                                1.0, densities)
    return order[cp.flatnonzero(keep)]


# ---------------------------------------------------------------- combined_nms
#
# Candidates (the (box, class) pairs whose score passes) are marked by combined_flag (in double)
# and compacted as their flat index g = b * N * C + n * C + c into scores; ranking, the per-image
# top-k and the merge are CuPy sorts (stable; ties keep the lower g); the greedy kernels above run
# on segments (image, class) -- one per image when class-agnostic -- with the per-class cap;
# combined_gather writes the padded outputs. Host synchronisations: the sizes only.

def _desc(cp, s):
    """Sort key of scores s, ascending in decreasing score (half types exactly in float32;
    -0.0 made +0.0, which a radix sort would order apart)."""
    return -(s.astype(cp.float64 if s.dtype == cp.float64 else cp.float32) + 0.0)


def _by_image_and_score(cp, key, img):
    """Stable order of items by (image, key): equal keys keep their order."""
    o = cp.argsort(key)
    return o[cp.argsort(img[o])]


def _rank_in_group(cp, group):
    """Position of each item among the items of its group, counted in the given order."""
    o = cp.argsort(group)
    g = group[o]
    pos = cp.empty(g.shape[0], dtype=cp.int64)
    pos[o] = cp.arange(g.shape[0], dtype=cp.int64) - cp.searchsorted(g, g)
    return pos


def combined_nms(boxes, scores, iou_threshold, score_threshold, max_output_per_class, max_total,
                 class_agnostic, pre_nms_top_k, nthreads):
    cp = cupy()
    B, N, C = scores.shape
    NC, K = N * C, max_total
    flat = scores.reshape(-1)
    flag = cp.empty(B * NC, dtype=cp.uint8)
    launch(_fn("combined_flag<{}>", scores.dtype), B * NC,
           (flat, i64(B * NC), np.int32(score_threshold is not None),
            np.float64(0.0 if score_threshold is None else score_threshold), flag))
    cand = cp.flatnonzero(flag).astype(cp.int64)             # ascending g
    if pre_nms_top_k >= 0:                                   # the image's best pre_nms_top_k
        o = _by_image_and_score(cp, _desc(cp, flat[cand]), cand // NC)
        cand = cp.sort(cand[o][_rank_in_group(cp, (cand // NC)[o]) < pre_nms_top_k])
    img = cand // NC
    f = cand - img * NC
    cls = f % C
    cap_c = max_output_per_class if max_output_per_class >= 0 else N + 1
    m = cand.shape[0]
    if class_agnostic:                                       # as the CPU kernel (nms.pyx)
        seg, seg_cap = img, (K if cap_c >= K else m + 1)
    else:
        seg, seg_cap = img * C + cls, min(cap_c, K)
    cboxes = boxes.reshape(-1, 4)[cand if boxes.ndim == 4 else img * N + f // C]
    order, _, _, keep = _greedy(cp, cboxes, flat[cand], seg, None, iou_threshold, None,
                                seg_cap, 0, 1.0)
    kept = cp.sort(order[cp.flatnonzero(keep)])              # candidate positions, ascending g
    kept = kept[_by_image_and_score(cp, _desc(cp, flat[cand[kept]]), img[kept])]
    if class_agnostic and cap_c < K:
        kept = kept[_rank_in_group(cp, img[kept] * C + cls[kept]) < cap_c]
    ik = img[kept]
    first = cp.searchsorted(ik, cp.arange(B, dtype=cp.int64)).astype(cp.int64)
    count = cp.minimum(cp.searchsorted(ik, cp.arange(B, dtype=cp.int64), side="right") - first,
                       K).astype(cp.int64)
    out_boxes = cp.empty((B, K, 4), dtype=boxes.dtype)
    out_scores = cp.empty((B, K), dtype=scores.dtype)
    out_classes = cp.empty((B, K), dtype=cp.int64)
    out_index = cp.empty((B, K), dtype=cp.int64)
    launch(_fn("combined_gather<{}>", scores.dtype), B * K,
           (boxes, flat, cp.ascontiguousarray(cand[kept]), first, count, i64(B), i64(N), i64(C),
            i64(K), np.int32(boxes.ndim == 4), out_boxes, out_scores, out_classes, out_index))
    return out_boxes, out_scores, out_classes, count, out_index


# every instantiation CuPy may request (the NVRTC gate, tests/test_cuda_compile.py)
NAME_EXPRESSIONS = _EXPRS
