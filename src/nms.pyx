# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False, embedsignature=True
"""NMS family and box IoU metrics on the CPU (OpenMP, GIL released for the sweeps).

Layout of one NMS call
----------------------
1. *Ranking* (NumPy, in this module): the candidates (``score > score_threshold`` when a
   threshold is given) are stably sorted by (image, class, score descending); NaN scores sort
   last, equal scores keep the lower index first. Each run of equal (image, class) is a *segment*:
   boxes of different segments never interact.
2. *Spatial index*: within each segment the boxes that can overlap anything (x2 > x1 and y2 > y1;
   false for NaN) are also sorted by x1 and stored as float64 structure-of-arrays. A box can only
   overlap boxes whose x1 lies in (x1 - W, x2), W the segment's widest box: two binary searches
   give that window. Degenerate and NaN boxes are left out of the index: they neither suppress
   nor are suppressed (IoU 0).
3. *Greedy sweep*, one segment per task, segments in parallel (OpenMP, dynamic schedule): boxes
   in rank order; a box not yet suppressed is kept and marks every later box in its window whose
   IoU with it is > threshold. Only kept boxes ever compute IoU rows, and only over their window,
   so memory is O(N) (a byte per box, no N x N mask) and clustered inputs cost O(kept x window).
   Optionally (``BLOCKED_MIN``) a segment with many boxes is swept in blocks of 64 ranks: the parallel phase computes each
   live candidate's 64-bit word of in-block suppressors, a sequential sweep over the words keeps
   boxes, then the kept boxes of the block mark later boxes in parallel (only ever writing 1s).
   The result is the same for any thread count.

IoU is evaluated in float64 for float32 and float64 input (exact decisions for float32 boxes:
their differences and products are exact in float64), as ``inter / (area_a + area_b - inter)``.
"""
import numpy as np
cimport numpy as cnp
from cython.parallel cimport prange
from libc.math cimport exp, sqrt, atan2, pow, isnan, NAN, INFINITY, M_PI
from libc.stdlib cimport malloc, free
from libc.stdint cimport int64_t, uint64_t, uint8_t

from _types cimport floating

cnp.import_array()

cdef enum:
    CRIT_IOU = 0
    CRIT_DIOU = 1
    BLOCK = 64

# A single segment of at least this many boxes is swept with the blocked parallel sweep. Measured
# on 2 (shared) cores, the per-block OpenMP barriers cost more than the parallel IoU work saves
# for clustered boxes, so it is off by default (tests lower it to exercise that path).
BLOCKED_MIN = 1 << 62

METRICS = {"iou": 0, "giou": 1, "diou": 2, "ciou": 3}


# ---------------------------------------------------------------- geometry

cdef inline double _area(double x1, double y1, double x2, double y2) noexcept nogil:
    """Area of an xyxy box; 0 when x2 <= x1 or y2 <= y1 (and for NaN)."""
    if x2 > x1 and y2 > y1:
        return (x2 - x1) * (y2 - y1)
    return 0.0


cdef inline double _inter(double ax1, double ay1, double ax2, double ay2,
                          double bx1, double by1, double bx2, double by2) noexcept nogil:
    cdef double w = (ax2 if ax2 < bx2 else bx2) - (ax1 if ax1 > bx1 else bx1)
    cdef double h = (ay2 if ay2 < by2 else by2) - (ay1 if ay1 > by1 else by1)
    if w > 0 and h > 0:
        return w * h
    return 0.0


cdef inline double _iou(double ax1, double ay1, double ax2, double ay2, double aa,
                        double bx1, double by1, double bx2, double by2, double ba) noexcept nogil:
    """IoU with precomputed areas; 0 when the boxes do not overlap (degenerate, NaN)."""
    cdef double inter = _inter(ax1, ay1, ax2, ay2, bx1, by1, bx2, by2)
    if inter > 0:
        return inter / (aa + ba - inter)
    return 0.0


cdef inline double _centre_penalty(double ax1, double ay1, double ax2, double ay2,
                                   double bx1, double by1, double bx2, double by2,
                                   double eps) noexcept nogil:
    """d^2 / (c^2 + eps): squared centre distance over the enclosing box's squared diagonal."""
    cdef double dx = (ax1 + ax2 - bx1 - bx2) * 0.5, dy = (ay1 + ay2 - by1 - by2) * 0.5
    cdef double cw = (ax2 if ax2 > bx2 else bx2) - (ax1 if ax1 < bx1 else bx1)
    cdef double ch = (ay2 if ay2 > by2 else by2) - (ay1 if ay1 < by1 else by1)
    cdef double c2 = cw * cw + ch * ch + eps
    if c2 > 0:
        return (dx * dx + dy * dy) / c2
    return 0.0


cdef inline bint _suppresses(const double* X1, const double* Y1, const double* X2,
                             const double* Y2, const double* A, Py_ssize_t i, Py_ssize_t j,
                             double thr, int crit, double beta) noexcept nogil:
    """Does x-ordered box i suppress x-ordered box j?"""
    cdef double iou = _iou(X1[i], Y1[i], X2[i], Y2[i], A[i], X1[j], Y1[j], X2[j], Y2[j], A[j])
    cdef double pen
    if crit == CRIT_IOU or iou <= 0:
        return iou > thr
    pen = _centre_penalty(X1[i], Y1[i], X2[i], Y2[i], X1[j], Y1[j], X2[j], Y2[j], 0.0)
    if beta != 1.0:
        pen = pow(pen, beta)
    return iou - pen > thr


cdef inline Py_ssize_t _lower_bound(const double* a, Py_ssize_t lo, Py_ssize_t hi,
                                    double v) noexcept nogil:
    """First position in a[lo:hi] (sorted ascending) with a[p] >= v."""
    cdef Py_ssize_t mid
    while lo < hi:
        mid = lo + (hi - lo) // 2
        if a[mid] < v:
            lo = mid + 1
        else:
            hi = mid
    return lo


# ---------------------------------------------------------------- the greedy sweep

cdef struct Index:
    # x-ordered structure of arrays over the active boxes of all segments
    const double* X1
    const double* Y1
    const double* X2
    const double* Y2
    const double* A
    const int64_t* R          # rank of each x-ordered box
    const int64_t* P          # x-position of each rank (-1: not in the index)
    const int64_t* xstart     # segment s owns x-positions [xstart[s], xstart[s+1])
    const double* W           # widest box of each segment


cdef inline void _push(const Index* ix, Py_ssize_t s, Py_ssize_t p, Py_ssize_t min_rank,
                       uint8_t* supp, int64_t* assign, double thr, int crit,
                       double beta) noexcept nogil:
    """Kept box at x-position p marks every box of rank >= min_rank in its window it suppresses."""
    cdef Py_ssize_t q, j
    cdef Py_ssize_t lo = _lower_bound(ix.X1, ix.xstart[s], ix.xstart[s + 1], ix.X1[p] - ix.W[s])
    cdef Py_ssize_t hi = _lower_bound(ix.X1, lo, ix.xstart[s + 1], ix.X2[p])
    cdef Py_ssize_t r = ix.R[p]
    for q in range(lo, hi):
        j = ix.R[q]
        if j < min_rank or supp[j]:
            continue
        if _suppresses(ix.X1, ix.Y1, ix.X2, ix.Y2, ix.A, p, q, thr, crit, beta):
            supp[j] = 1
            if assign != NULL:
                assign[j] = r


cdef Py_ssize_t _sweep_serial(const Index* ix, Py_ssize_t s, Py_ssize_t r0, Py_ssize_t r1,
                              uint8_t* supp, int64_t* assign, int64_t* kept, Py_ssize_t cap,
                              double thr, int crit, double beta) noexcept nogil:
    """Greedy NMS of ranks [r0, r1) (one segment); kept ranks go to kept[0:count]."""
    cdef Py_ssize_t r, p, count = 0
    for r in range(r0, r1):
        if count >= cap:
            break
        if supp[r]:
            continue
        kept[count] = r
        count += 1
        p = ix.P[r]
        if p >= 0:
            _push(ix, s, p, r + 1, supp, assign, thr, crit, beta)
    return count


cdef Py_ssize_t _sweep_blocked(const Index* ix, Py_ssize_t s, Py_ssize_t r0, Py_ssize_t r1,
                               uint8_t* supp, int64_t* kept, Py_ssize_t cap, double thr,
                               int crit, double beta, uint64_t* words,
                               int nthreads) noexcept nogil:
    """Greedy NMS of one large segment, parallel inside: blocks of 64 ranks.

    words[c] = bit k set when the k-th box of the block suppresses its c-th box (k < c); computed
    in parallel for the live candidates, then swept sequentially; the block's kept boxes then
    push their suppression to later ranks in parallel (only ever writing 1s).
    """
    cdef Py_ssize_t b0, b1, c, k, n, r, p, pk, t, nk, count = 0
    cdef uint64_t keptbits, w
    cdef int64_t blockkept[BLOCK]
    b0 = r0
    while b0 < r1 and count < cap:
        b1 = min(b0 + BLOCK, r1)
        n = b1 - b0
        for c in prange(n, num_threads=nthreads, schedule="static"):
            w = 0
            r = b0 + c
            p = ix.P[r]
            if not supp[r] and p >= 0:
                for k in range(c):
                    pk = ix.P[b0 + k]
                    if pk >= 0 and not supp[b0 + k] and _suppresses(
                            ix.X1, ix.Y1, ix.X2, ix.Y2, ix.A, pk, p, thr, crit, beta):
                        w = w | ((<uint64_t>1) << k)
            words[c] = w
        keptbits = 0
        nk = 0
        for c in range(n):
            if count >= cap:
                break
            if supp[b0 + c] or (words[c] & keptbits):
                continue
            keptbits = keptbits | ((<uint64_t>1) << c)
            kept[count] = b0 + c
            count += 1
            blockkept[nk] = b0 + c
            nk += 1
        for t in prange(nk, num_threads=nthreads, schedule="dynamic"):
            p = ix.P[blockkept[t]]
            if p >= 0:
                _push(ix, s, p, b1, supp, NULL, thr, crit, beta)
        b0 = b1
    return count


cdef void _sweep_all(const Index* ix, Py_ssize_t S, const int64_t* rstart, uint8_t* supp,
                     int64_t* assign, int64_t* kept, int64_t* nkept, Py_ssize_t cap, double thr,
                     int crit, double beta, uint64_t* words, int nthreads,
                     Py_ssize_t blocked_min) noexcept nogil:
    """Every segment; segment s writes its kept ranks to kept[rstart[s]:] and the count to nkept[s]."""
    cdef Py_ssize_t s
    if S == 1 and nthreads > 1 and assign == NULL and rstart[1] - rstart[0] >= blocked_min:
        nkept[0] = _sweep_blocked(ix, 0, rstart[0], rstart[1], supp, kept, cap, thr, crit, beta,
                                  words, nthreads)
        return
    for s in prange(S, num_threads=nthreads, schedule="dynamic"):
        nkept[s] = _sweep_serial(ix, s, rstart[s], rstart[s + 1], supp, assign, kept + rstart[s],
                                 cap, thr, crit, beta)


# ---------------------------------------------------------------- ranking (NumPy, with the GIL)

class _Ranked:
    """Candidates in (image, class, score desc, index) order, their segments and spatial index."""

    def __init__(self, boxes, scores, batch, classes, use_thr, double thr, bint index=True):
        n = scores.shape[0]
        cand = np.flatnonzero(scores > thr) if use_thr else np.arange(n, dtype=np.int64)
        keys = [-scores[cand]]                   # NaN sorts last; stable: ties keep index order
        if classes is not None:
            keys.append(classes[cand])
        if batch is not None:
            keys.append(batch[cand])
        o = np.argsort(keys[0], kind="stable") if len(keys) == 1 else np.lexsort(keys)
        self.order = cand[o].astype(np.int64)
        m = self.order.shape[0]
        change = np.zeros(m, dtype=bool)
        if m:
            change[0] = True
        for key in (batch, classes):
            if key is not None and m > 1:
                k = key[self.order]
                change[1:] |= k[1:] != k[:m - 1]
        self.rstart = np.append(np.flatnonzero(change), m).astype(np.int64)
        self.S = self.rstart.shape[0] - 1
        self.rb = np.ascontiguousarray(boxes[self.order], dtype=np.float64).reshape(m, 4)
        if index:
            self._index(m)

    def _index(self, m):
        rb = self.rb
        seg = np.repeat(np.arange(self.S, dtype=np.int64), np.diff(self.rstart))
        act = np.flatnonzero((rb[:, 2] > rb[:, 0]) & (rb[:, 3] > rb[:, 1]))
        if self.S == 1:         # any x1 order will do (the window test is by value)
            xo = act[np.argsort(rb[act, 0])]
        else:
            xo = act[np.lexsort((rb[act, 0], seg[act]))] if act.size else act.astype(np.int64)
        self.R = xo.astype(np.int64)
        self.P = np.full(m, -1, dtype=np.int64)
        self.P[self.R] = np.arange(self.R.shape[0], dtype=np.int64)
        self.xstart = np.searchsorted(seg[self.R], np.arange(self.S + 1)).astype(np.int64)
        soa = np.ascontiguousarray(rb[self.R].T)
        self.X1, self.Y1, self.X2, self.Y2 = soa
        w = soa[2] - soa[0]
        self.A = w * (soa[3] - soa[1])
        self.W = np.zeros(self.S, dtype=np.float64)
        if self.R.shape[0]:
            starts = self.xstart[:self.S]
            nonempty = starts < self.xstart[1:]
            self.W[nonempty] = np.maximum.reduceat(w, starts[nonempty])


cdef Index _make_index(double[::1] X1, double[::1] Y1, double[::1] X2, double[::1] Y2,
                       double[::1] A, int64_t[::1] R, int64_t[::1] P, int64_t[::1] xstart,
                       double[::1] W):
    cdef Index ix
    cdef double dummy = 0
    cdef int64_t idummy = 0
    ix.X1 = &X1[0] if X1.shape[0] else &dummy
    ix.Y1 = &Y1[0] if Y1.shape[0] else &dummy
    ix.X2 = &X2[0] if X2.shape[0] else &dummy
    ix.Y2 = &Y2[0] if Y2.shape[0] else &dummy
    ix.A = &A[0] if A.shape[0] else &dummy
    ix.R = &R[0] if R.shape[0] else &idummy
    ix.P = &P[0] if P.shape[0] else &idummy
    ix.xstart = &xstart[0]
    ix.W = &W[0] if W.shape[0] else &dummy
    return ix


def _greedy(rk, double thr, int crit, double beta, Py_ssize_t cap, bint want_assign,
            int nthreads):
    """Kept ranks (segment by segment, rank order) and, optionally, each rank's suppressor."""
    cdef Py_ssize_t m = rk.order.shape[0], S = rk.S, s
    cdef uint8_t[::1] supp = np.zeros(m + 1, dtype=np.uint8)
    cdef int64_t[::1] kept = np.empty(m + 1, dtype=np.int64)
    cdef int64_t[::1] nkept = np.zeros(S + 1, dtype=np.int64)
    cdef int64_t[::1] rstart = rk.rstart
    assign_arr = np.full(m + 1, -1, dtype=np.int64)
    cdef int64_t[::1] assign = assign_arr
    cdef uint64_t[::1] words = np.zeros(BLOCK, dtype=np.uint64)
    cdef Index ix = _make_index(rk.X1, rk.Y1, rk.X2, rk.Y2, rk.A, rk.R, rk.P, rk.xstart,
                                rk.W)
    cdef int64_t* ap = &assign[0] if want_assign else NULL
    cdef Py_ssize_t blocked_min = BLOCKED_MIN
    if m:
        with nogil:
            _sweep_all(&ix, S, &rstart[0], &supp[0], ap, &kept[0], &nkept[0], cap, thr, crit,
                       beta, &words[0], nthreads, blocked_min)
    kept_np = np.asarray(kept)
    nk = np.asarray(nkept)
    if S == 0:
        ranks = np.empty(0, dtype=np.int64)
    elif S == 1:
        ranks = kept_np[:nk[0]].copy()
    else:
        ranks = np.concatenate([kept_np[rk.rstart[i]:rk.rstart[i] + nk[i]] for i in range(S)])
    return ranks, (assign_arr[:m] if want_assign else None)


# ---------------------------------------------------------------- output assembly

def _num_images(batch, num_images):
    if num_images >= 0:
        return num_images
    return int(batch.max()) + 1 if batch is not None and batch.shape[0] else 1


def _assemble(idx, scores, batch, Py_ssize_t cap, bint merge, Py_ssize_t num_images, bint split,
              extras=()):
    """Final order and per-image split of the kept original indices ``idx``.

    merge: re-sort by (image, score desc, index) (needed when classes were segments); cap: per
    image; split: a list with one array per image, indices local to the image (its first box
    in the input is 0). ``extras`` are arrays aligned with ``idx`` that follow the same order.
    """
    if merge and idx.shape[0] > 1:
        keys = [idx, -scores[idx]] + ([batch[idx]] if batch is not None else [])
        o = np.lexsort(keys)
        idx = idx[o]
        extras = tuple(e[o] for e in extras)
    if batch is None:
        if idx.shape[0] > cap:
            idx = idx[:cap]
            extras = tuple(e[:cap] for e in extras)
        outs = (idx,) + tuple(extras)
        if split:
            return [list(outs)] if extras else [idx]
        return outs if extras else idx
    nimg = _num_images(batch, num_images)
    b = batch[idx]
    starts = np.searchsorted(b, np.arange(nimg + 1))
    if cap < idx.shape[0]:
        pos = np.arange(idx.shape[0]) - starts[b]
        sel = pos < cap
        idx, b = idx[sel], b[sel]
        extras = tuple(e[sel] for e in extras)
        starts = np.searchsorted(b, np.arange(nimg + 1))
    if not split:
        outs = (idx,) + tuple(extras)
        return outs if extras else idx
    first = np.searchsorted(batch, np.arange(nimg))       # list input: batch is sorted
    res = []
    for i in range(nimg):
        sl = slice(starts[i], starts[i + 1])
        local = idx[sl] - first[i]
        res.append([local] + [e[sl] for e in extras] if extras else local)
    return res


# ---------------------------------------------------------------- entry points

def nms(boxes, scores, batch, classes, double iou_threshold, use_score_threshold,
        double score_threshold, Py_ssize_t max_output, int criterion, double beta,
        Py_ssize_t num_images, bint split, int nthreads):
    """Greedy NMS (criterion 0: IoU, 1: DIoU with exponent beta), class-aware when ``classes``.

    boxes (N, 4) float32/float64, scores (N,) same dtype, batch/classes int64 (N,) or None,
    max_output < 0: unlimited. Returns int64 indices into the input, grouped by image (batch)
    and in decreasing score order within an image; with ``split`` a list of per-image arrays of
    image-local indices (``num_images`` entries, or max(batch) + 1 when negative).
    """
    cap = max_output if max_output >= 0 else scores.shape[0] + 1
    rk = _Ranked(boxes, scores, batch, classes, use_score_threshold, score_threshold)
    ranks, _ = _greedy(rk, iou_threshold, criterion, beta, cap, False, nthreads)
    idx = rk.order[ranks]
    return _assemble(idx, scores, batch, cap, classes is not None, num_images, split)


cdef void _fuse(const double* rb, const double* w, const int64_t* assign, const uint8_t* is_kept,
                Py_ssize_t m, double* acc) noexcept nogil:
    """acc[r] (5 per rank: weighted coordinates and the weight) for every kept rank r."""
    cdef Py_ssize_t r, t, k
    for r in range(m):
        t = r if is_kept[r] else assign[r]
        if t < 0:
            continue
        for k in range(4):
            acc[5 * t + k] += w[r] * rb[4 * r + k]
        acc[5 * t + 4] += w[r]


def weighted_nms(boxes, scores, batch, classes, double iou_threshold, use_score_threshold,
                 double score_threshold, Py_ssize_t max_output, Py_ssize_t num_images,
                 bint split, int nthreads):
    """Greedy NMS whose kept boxes become the score-weighted mean of their cluster.

    Returns (indices, fused boxes (K, 4) of boxes' dtype), ordered/split as :func:`nms`. A box
    belongs to the cluster of the first (highest-ranked) kept box that suppresses it. When the
    cluster's weights sum to 0 (or are not finite) the kept box is returned unchanged.
    """
    cap = max_output if max_output >= 0 else scores.shape[0] + 1
    rk = _Ranked(boxes, scores, batch, classes, use_score_threshold, score_threshold)
    ranks, assign = _greedy(rk, iou_threshold, CRIT_IOU, 1.0, cap, True, nthreads)
    cdef Py_ssize_t m = rk.order.shape[0]
    is_kept = np.zeros(m + 1, dtype=np.uint8)
    is_kept[ranks] = 1
    acc = np.zeros((m + 1, 5), dtype=np.float64)
    w = np.ascontiguousarray(scores[rk.order], dtype=np.float64)
    cdef double[:, ::1] rb = rk.rb
    cdef double[::1] wv = w
    cdef int64_t[::1] av = assign if m else np.zeros(1, dtype=np.int64)
    cdef uint8_t[::1] kv = is_kept
    cdef double[:, ::1] accv = acc
    if m:
        with nogil:
            _fuse(&rb[0, 0], &wv[0], &av[0], &kv[0], m, &accv[0, 0])
    a = acc[ranks]
    good = (a[:, 4] != 0) & np.isfinite(a[:, 4])
    fused = np.where(good[:, None], a[:, :4] / np.where(good, a[:, 4], 1.0)[:, None],
                     rk.rb[ranks])
    fused = fused.astype(boxes.dtype)
    idx = rk.order[ranks]
    return _assemble(idx, scores, batch, cap, classes is not None, num_images, split, (fused,))


cdef Py_ssize_t _soft_segment(const double* rb, double* cur, const int64_t* orig, Py_ssize_t r0,
                              Py_ssize_t r1, int method, double sigma, double thr,
                              double score_thr, int64_t* out_rank, double* out_score,
                              uint8_t* alive) noexcept nogil:
    """Soft-NMS of ranks [r0, r1): repeatedly take the live box of highest current score (ties:
    lower input index), decay the others, drop those whose score falls below score_thr."""
    cdef Py_ssize_t r, j, best, count = 0
    cdef double iou, a_b, a_j, f
    for r in range(r0, r1):
        alive[r] = cur[r] >= score_thr
    while True:
        best = -1
        for r in range(r0, r1):
            if alive[r] and (best < 0 or cur[r] > cur[best] or
                             (cur[r] == cur[best] and orig[r] < orig[best])):
                best = r
        if best < 0:
            break
        alive[best] = 0
        out_rank[count] = best
        out_score[count] = cur[best]
        count += 1
        a_b = _area(rb[4 * best], rb[4 * best + 1], rb[4 * best + 2], rb[4 * best + 3])
        for j in range(r0, r1):
            if not alive[j]:
                continue
            a_j = _area(rb[4 * j], rb[4 * j + 1], rb[4 * j + 2], rb[4 * j + 3])
            iou = _iou(rb[4 * best], rb[4 * best + 1], rb[4 * best + 2], rb[4 * best + 3], a_b,
                       rb[4 * j], rb[4 * j + 1], rb[4 * j + 2], rb[4 * j + 3], a_j)
            if iou <= 0:
                continue
            if method == 0:
                f = exp(-iou * iou / sigma)
            elif iou > thr:
                f = 1.0 - iou
            else:
                f = 1.0
            cur[j] = cur[j] * f
            if not (cur[j] >= score_thr):
                alive[j] = 0
    return count


def soft_nms(boxes, scores, batch, int method, double sigma, double iou_threshold,
             double score_threshold, Py_ssize_t num_images, bint split, int nthreads):
    """Soft-NMS (method 0: gaussian, 1: linear). Returns (indices, scores at selection, of the
    scores' dtype) in selection order, grouped by image; images run in parallel."""
    rk = _Ranked(boxes, scores, batch, None, False, 0.0, index=False)
    cdef Py_ssize_t m = rk.order.shape[0], S = rk.S, s
    cur_np = np.ascontiguousarray(scores[rk.order], dtype=np.float64)
    cdef double[::1] cur = np.append(cur_np, 0.0)
    cdef double[:, ::1] rb = np.vstack([rk.rb, np.zeros((1, 4))])
    cdef int64_t[::1] orig = np.append(rk.order, 0)
    cdef int64_t[::1] rstart = rk.rstart
    cdef int64_t[::1] out_rank = np.empty(m + 1, dtype=np.int64)
    out_score_np = np.empty(m + 1, dtype=np.float64)
    cdef double[::1] out_score = out_score_np
    cdef uint8_t[::1] alive = np.zeros(m + 1, dtype=np.uint8)
    cdef int64_t[::1] cnt = np.zeros(S + 1, dtype=np.int64)
    if m:
        with nogil:
            for s in prange(S, num_threads=nthreads, schedule="dynamic"):
                cnt[s] = _soft_segment(&rb[0, 0], &cur[0], &orig[0], rstart[s], rstart[s + 1],
                                       method, sigma, iou_threshold, score_threshold,
                                       &out_rank[rstart[s]], &out_score[rstart[s]], &alive[0])
    orr = np.asarray(out_rank)
    parts = [np.arange(rk.rstart[i], rk.rstart[i] + cnt[i]) for i in range(S)]
    sel = np.concatenate(parts).astype(np.int64) if parts else np.empty(0, dtype=np.int64)
    idx = rk.order[orr[sel]]
    sc = out_score_np[sel].astype(scores.dtype)
    return _assemble(idx, scores, batch, scores.shape[0] + 1, False, num_images, split, (sc,))


cdef inline double _mkernel(double iou, int kernel, double sigma) noexcept nogil:
    if kernel == 0:
        return exp(-sigma * iou * iou)
    return 1.0 - iou


def matrix_nms(boxes, scores, batch, int kernel, double sigma, Py_ssize_t num_images, bint split,
               int nthreads):
    """Matrix NMS (SOLOv2) decayed scores, (N,) aligned with the input (kernel 0: gaussian
    exp(-sigma iou^2), 1: linear 1 - iou). decay_j = min(1, min over higher-ranked i of the same
    image of f(iou_ij) / f(comp_i)), comp_i = max IoU of i with boxes ranked above it. A ratio
    with f(comp_i) = 0 (linear kernel, comp_i = 1) imposes no decay. Parallel over boxes."""
    rk = _Ranked(boxes, scores, batch, None, False, 0.0, index=False)
    cdef Py_ssize_t m = rk.order.shape[0], S = rk.S, i, j, k, s0
    cdef double[:, ::1] rb = np.vstack([rk.rb, np.zeros((1, 4))])
    seg_of = np.repeat(np.arange(S, dtype=np.int64), np.diff(rk.rstart)) if S else \
        np.zeros(0, dtype=np.int64)
    cdef int64_t[::1] segstart = np.append(rk.rstart[seg_of], 0).astype(np.int64)
    cdef double[::1] comp = np.zeros(m + 1)
    cdef double[::1] area = np.zeros(m + 1)
    decay_np = np.ones(m + 1)
    cdef double[::1] decay = decay_np
    cdef double iou, c, d, fc
    with nogil:
        for i in prange(m, num_threads=nthreads, schedule="static"):
            area[i] = _area(rb[i, 0], rb[i, 1], rb[i, 2], rb[i, 3])
        for i in prange(m, num_threads=nthreads, schedule="dynamic", chunksize=16):
            c = 0
            for k in range(segstart[i], i):
                iou = _iou(rb[k, 0], rb[k, 1], rb[k, 2], rb[k, 3], area[k],
                           rb[i, 0], rb[i, 1], rb[i, 2], rb[i, 3], area[i])
                if iou > c:
                    c = iou
            comp[i] = c
        for j in prange(m, num_threads=nthreads, schedule="dynamic", chunksize=16):
            d = 1.0
            for i in range(segstart[j], j):
                iou = _iou(rb[i, 0], rb[i, 1], rb[i, 2], rb[i, 3], area[i],
                           rb[j, 0], rb[j, 1], rb[j, 2], rb[j, 3], area[j])
                fc = _mkernel(comp[i], kernel, sigma)
                if fc > 0:
                    c = _mkernel(iou, kernel, sigma) / fc
                    if c < d:
                        d = c
            decay[j] = d
    out = np.empty(scores.shape[0], dtype=scores.dtype)
    out[rk.order] = (scores[rk.order] * decay_np[:m]).astype(scores.dtype)
    if not split:
        return out
    nimg = _num_images(batch, num_images)
    bounds = np.searchsorted(batch, np.arange(nimg + 1))
    return [out[bounds[i]:bounds[i + 1]] for i in range(nimg)]


cdef inline double _metric(const floating* a, const floating* b, int metric) noexcept nogil:
    cdef double ax1 = a[0], ay1 = a[1], ax2 = a[2], ay2 = a[3]
    cdef double bx1 = b[0], by1 = b[1], bx2 = b[2], by2 = b[3]
    cdef double aa, ba, inter, union, iou, cw, ch, carea, v, alpha, wa, ha, wb, hb
    if isnan(ax1) or isnan(ay1) or isnan(ax2) or isnan(ay2) or \
            isnan(bx1) or isnan(by1) or isnan(bx2) or isnan(by2):
        return NAN
    aa = _area(ax1, ay1, ax2, ay2)
    ba = _area(bx1, by1, bx2, by2)
    inter = _inter(ax1, ay1, ax2, ay2, bx1, by1, bx2, by2)
    union = aa + ba - inter
    iou = inter / union if union > 0 else 0.0
    if metric == 0:
        return iou
    if metric == 1:
        cw = (ax2 if ax2 > bx2 else bx2) - (ax1 if ax1 < bx1 else bx1)
        ch = (ay2 if ay2 > by2 else by2) - (ay1 if ay1 < by1 else by1)
        carea = (cw if cw > 0 else 0.0) * (ch if ch > 0 else 0.0)
        return iou - (carea - union) / carea if carea > 0 else iou
    iou = iou - _centre_penalty(ax1, ay1, ax2, ay2, bx1, by1, bx2, by2, 1e-7)
    if metric == 2:
        return iou
    wa = ax2 - ax1 if ax2 > ax1 else 0.0
    ha = ay2 - ay1 if ay2 > ay1 else 0.0
    wb = bx2 - bx1 if bx2 > bx1 else 0.0
    hb = by2 - by1 if by2 > by1 else 0.0
    v = atan2(wb, hb) - atan2(wa, ha)
    v = 4.0 / (M_PI * M_PI) * v * v
    alpha = v / (1.0 - (inter / union if union > 0 else 0.0) + v + 1e-7)
    return iou - alpha * v


cdef void _box_iou_f(const floating* a, const floating* b, floating* out, Py_ssize_t N,
                     Py_ssize_t M, int metric, int nthreads) noexcept nogil:
    cdef Py_ssize_t i, j
    for i in prange(N, num_threads=nthreads, schedule="static"):
        for j in range(M):
            out[i * M + j] = <floating>_metric(&a[4 * i], &b[4 * j], metric)


def box_iou(a, b, int metric, int nthreads):
    """(N, M) pairwise metric (0 iou, 1 giou, 2 diou, 3 ciou) of a (N, 4) and b (M, 4) boxes,
    computed in float64 and returned in the boxes' dtype."""
    cdef Py_ssize_t N = a.shape[0], M = b.shape[0]
    out = np.empty((N, M), dtype=a.dtype)
    if N == 0 or M == 0:
        return out
    cdef float[:, ::1] af, bf, of
    cdef double[:, ::1] ad, bd, od
    if a.dtype == np.float32:
        af, bf, of = a, b, out
        with nogil:
            _box_iou_f(&af[0, 0], &bf[0, 0], &of[0, 0], N, M, metric, nthreads)
    else:
        ad, bd, od = a, b, out
        with nogil:
            _box_iou_f(&ad[0, 0], &bd[0, 0], &od[0, 0], N, M, metric, nthreads)
    return out
