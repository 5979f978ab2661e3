# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False, embedsignature=True
"""NMS family and box IoU metrics on the CPU (GIL released; images/classes in parallel).

Layout of one greedy NMS call (nms, batched_nms, diou_nms, weighted_nms)
----------------------------------------------------------------------
1. *Ranking* (``_rank_impl``, C, O(N)): the candidates (``score > score_threshold`` when a
   threshold is given) are stably sorted by (image, class, score descending) with an LSD radix
   sort: scores are mapped to unsigned keys (-0.0 == 0.0, NaN last), bytes on which all keys
   agree are skipped, and class/image passes follow the score passes (stability gives ties by
   index). Each run of equal (image, class) is a *segment*: different segments never interact.
2. *Spatial grid*, per segment (``_build``): the boxes that can overlap anything (x2 > x1,
   y2 > y1, finite area; anything else has IoU 0 or NaN with every box) are bucketed by their
   lower corner into a uniform grid of cells about CELL x the widest/tallest box, copied into
   grid-ordered float64 structure-of-arrays. Box q can only overlap box p when q.x1 lies in
   (p.x1 - W, p.x2) and q.y1 in (p.y1 - H, p.y2), W/H the widest/tallest box (rounded up), so
   p looks at the cells of that range only -- a few rows of contiguous cells. The cell count is
   capped at 2 per box: memory stays O(N) whatever the coordinates.
3. *Greedy sweep*, per segment (``_sweep``): ranks in order; a box not yet suppressed is kept
   and marks the boxes of its cells whose IoU with it is > threshold (one flag byte per box in
   grid order, so the scans are contiguous and branch-free). Only kept boxes compute IoU, over
   their neighbourhood only: clustered inputs cost O(kept x local density).
   Segments (classes, images) run in parallel (OpenMP, dynamic schedule); a single segment
   runs without any OpenMP region (no fork/barrier cost for plain ``nms``). The result is the
   same for any thread count.

IoU is evaluated in float64 for float32 and float64 input (exact decisions for float32 boxes:
their differences and products are exact in float64), as ``inter / (area_a + area_b - inter)``.

Rotated boxes (nms_rotated, batched_nms_rotated: criterion CRIT_ROTATED)
----------------------------------------------------------------------
The same ranking, grid and sweep, no second copy: ``_rank_impl`` copies the (cx, cy, w, h, angle)
rows in rank order, ``_prepare_rotated`` turns each into a *prepared* box (centre, half sizes,
cos and sin of its angle, area, circumradius; ROT_W doubles) and its axis-aligned bounding box,
widened beyond any rounding of the corners. The grid is built on the bounding boxes, so its
window stays conservative; the sweep (``_scan_generic``) tests a candidate by the exact rotated
IoU (``_rot_iou``: the other box clipped against the kept box's sides in its frame,
Sutherland-Hodgman, shoelace area) only when their bounding boxes overlap. A box that overlaps
nothing (w <= 0, h <= 0, a non-finite field) has a NaN bounding box and stays out of the grid.
Memory: O(N) (ROT_W + 4 doubles per box besides the axis-aligned path's). box_iou_rotated
prepares both sets once and evaluates the (N, M) pairs in parallel.
"""
import numpy as np
cimport numpy as cnp
from cython.parallel cimport prange, threadid
from libc.math cimport (exp, sqrt, atan2, pow, isnan, nextafter, nextafterf, NAN, INFINITY, M_PI,
                        cos, sin, fabs)
from libc.stdlib cimport malloc, calloc, free
from libc.string cimport memcpy, memset
from libc.float cimport DBL_MAX
from libc.stdint cimport int32_t, int64_t, uint64_t, uint32_t, uint8_t

from _types cimport floating

cnp.import_array()

# integer codes of fastnorm._kernels (CRITERIA, DECAYS, METRICS; tests/test_contract.py)
cdef enum:
    CRIT_IOU = 0
    CRIT_DIOU = 1
    CRIT_ROTATED = 2
cdef enum:
    DECAY_GAUSSIAN = 0
    DECAY_LINEAR = 1
    DECAY_HARD = 2
cdef enum:
    METRIC_IOU = 0
    METRIC_GIOU = 1
    METRIC_DIOU = 2
    METRIC_CIOU = 3

# Grid cells are CELL times the widest (tallest) box of their segment, so a kept box looks at
# about 4 x 4 cells (measured on clustered boxes: 0.5 beats 0.75, 1.0 and 1.5 by 10-40%).
CELL = 0.5


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
    """IoU with precomputed areas; 0 when the boxes do not overlap, and for a box of area 0
    (degenerate or with a NaN coordinate: NaN compares false, so _inter alone can see overlap)."""
    cdef double inter, r
    if aa > 0 and ba > 0:
        inter = _inter(ax1, ay1, ax2, ay2, bx1, by1, bx2, by2)
        if inter > 0:
            r = inter / (aa + ba - inter)
            if r > 0:          # not NaN (infinite boxes)
                return r
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


# ---------------------------------------------------------------- rotated boxes
#
# A rotated box (cx, cy, w, h, angle) is *prepared* once (ROT_W doubles): its centre, half
# sizes, cos/sin of theta = angle * angle_scale, area and circumradius. Its local point (u, v)
# is at (cx + u cos + v sin, cy - u sin + v cos). A box with a non-finite field, w <= 0, h <= 0
# or a bounding box of non-finite area is prepared with area 0: it overlaps nothing. The same
# layout and arithmetic are in fastnorm/_cuda/nms.cu (rotated_prepare, rotated_iou).

cdef enum:
    ROT_W = 8       # prepared box: cx, cy, w/2, h/2, cos, sin, area, circumradius


cdef inline void _rot_prepare(double cx, double cy, double w, double h, double angle,
                              double scale, double* p, double* bb) noexcept nogil:
    """Prepare one rotated box into p[0:ROT_W] and its padded bounding box xyxy into bb (NaN
    for a box that overlaps nothing). The bounding box is widened by 1e-12 of the box's size
    and 4e-16 of its centre's magnitude, beyond any rounding of the exact IoU's corners, so
    boxes whose bounding boxes do not meet have IoU 0."""
    cdef double hw = 0.5 * w, hh = 0.5 * h, t, c, sn, ex, ey, pad
    cdef int k
    p[6] = 0.0
    bb[0] = bb[1] = bb[2] = bb[3] = NAN
    if w > 0 and h > 0 and fabs(cx) <= DBL_MAX and fabs(cy) <= DBL_MAX and w * h <= DBL_MAX \
            and fabs(angle) <= DBL_MAX:
        t = angle * scale
        c = cos(t)
        sn = sin(t)
        ex = fabs(hw * c) + fabs(hh * sn)
        ey = fabs(hw * sn) + fabs(hh * c)
        pad = 1e-12 * (ex + ey)
        bb[0] = cx - ex - pad - 4e-16 * fabs(cx)
        bb[2] = cx + ex + pad + 4e-16 * fabs(cx)
        bb[1] = cy - ey - pad - 4e-16 * fabs(cy)
        bb[3] = cy + ey + pad + 4e-16 * fabs(cy)
        if (bb[2] - bb[0]) * (bb[3] - bb[1]) <= DBL_MAX:
            p[0] = cx; p[1] = cy; p[2] = hw; p[3] = hh; p[4] = c; p[5] = sn
            p[6] = w * h
            p[7] = sqrt(hw * hw + hh * hh)
            return
        bb[0] = bb[1] = bb[2] = bb[3] = NAN
    for k in range(ROT_W):
        p[k] = 0.0


cdef inline int _clip(const double* U, const double* V, int n, double* OU, double* OV,
                      double bound, double sgn) noexcept nogil:
    """Sutherland-Hodgman: the polygon (U, V)[0:n] clipped to the half-plane sgn * U <= bound
    -> (OU, OV)[0:count]. Points on the line are inside; a NaN vertex is outside."""
    cdef int i, prev, k = 0
    cdef double t
    cdef bint inc, inp
    for i in range(n):
        prev = i - 1 if i > 0 else n - 1
        inc = sgn * U[i] <= bound
        inp = sgn * U[prev] <= bound
        if inc != inp:
            t = (bound - sgn * U[prev]) / (sgn * U[i] - sgn * U[prev])
            OU[k] = sgn * bound
            OV[k] = V[prev] + t * (V[i] - V[prev])
            k += 1
        if inc:
            OU[k] = U[i]
            OV[k] = V[i]
            k += 1
    return k


cdef inline double _rot_iou(const double* a, const double* b) noexcept nogil:
    """IoU of two prepared rotated boxes, in float64: b's corners in a's frame (a becomes
    [-w/2, w/2] x [-h/2, h/2]), clipped against a's four sides, shoelace area clamped to the
    smaller box. 0 when either box has area 0 or they do not overlap."""
    cdef double x[16], y[16], X[16], Y[16]
    cdef double dx, dy, rr, cd, sd, px, py, uc, us, vc, vs, inter, r
    cdef int n, i, j
    if not (a[6] > 0 and b[6] > 0):
        return 0.0
    dx = b[0] - a[0]
    dy = b[1] - a[1]
    rr = a[7] + b[7]
    if dx * dx + dy * dy > rr * rr * (1.0 + 1e-9):      # circumcircles apart
        return 0.0
    if a[4] == b[4] and a[5] == b[5]:                      # same angle: exactly aligned
        cd = 1.0
        sd = 0.0
    else:                                                  # cos / sin of theta_b - theta_a
        cd = b[4] * a[4] + b[5] * a[5]
        sd = b[5] * a[4] - b[4] * a[5]
    px = dx * a[4] - dy * a[5]                             # b's centre in a's frame
    py = dx * a[5] + dy * a[4]
    uc = b[2] * cd; us = b[2] * sd; vc = b[3] * cd; vs = b[3] * sd
    x[0] = px - uc - vs; y[0] = py + us - vc
    x[1] = px + uc - vs; y[1] = py - us - vc
    x[2] = px + uc + vs; y[2] = py - us + vc
    x[3] = px - uc + vs; y[3] = py + us + vc
    n = _clip(x, y, 4, X, Y, a[2], 1.0)
    n = _clip(X, Y, n, x, y, a[2], -1.0)
    n = _clip(y, x, n, Y, X, a[3], 1.0)
    n = _clip(Y, X, n, y, x, a[3], -1.0)
    inter = 0.0
    for i in range(n):
        j = i + 1 if i + 1 < n else 0
        inter += x[i] * y[j] - x[j] * y[i]
    inter = 0.5 * fabs(inter)
    r = a[6] if a[6] < b[6] else b[6]
    if inter > r:
        inter = r
    if not (inter > 0):
        return 0.0
    r = inter / (a[6] + b[6] - inter)
    return r if r > 0 else 0.0


cdef void _rot_prepare_all(const floating* boxes, Py_ssize_t n, double scale, double* p,
                           double* bb) noexcept nogil:
    cdef Py_ssize_t i
    cdef double scratch[4]
    for i in range(n):
        _rot_prepare(boxes[5 * i], boxes[5 * i + 1], boxes[5 * i + 2], boxes[5 * i + 3],
                     boxes[5 * i + 4], scale, p + ROT_W * i, bb + 4 * i if bb != NULL else scratch)


def _prepare_rotated(boxes, double angle_scale, bint bounding):
    """Prepared rotated boxes (n, ROT_W) float64 of (n, 5) boxes, and, with ``bounding``, their
    bounding boxes (n, 4) (else None)."""
    cdef Py_ssize_t n = boxes.shape[0]
    prep = np.empty((n + 1, ROT_W), dtype=np.float64)
    bbox = np.empty((n + 1, 4), dtype=np.float64) if bounding else None
    cdef double[:, ::1] pv = prep
    cdef double[:, ::1] bv
    cdef double* bp = NULL
    cdef const float[:, ::1] bf
    cdef const double[:, ::1] bd
    if bounding:
        bv = bbox
        bp = &bv[0, 0]
    if n:
        if boxes.dtype == np.float32:
            bf = boxes
            with nogil:
                _rot_prepare_all(&bf[0, 0], n, angle_scale, &pv[0, 0], bp)
        else:
            bd = boxes
            with nogil:
                _rot_prepare_all(&bd[0, 0], n, angle_scale, &pv[0, 0], bp)
    return prep[:n], (bbox[:n] if bounding else None)


# ---------------------------------------------------------------- ranking (stable LSD radix)

cdef inline uint64_t _flip32(float v) noexcept nogil:
    """uint key ascending in decreasing v, for numbers (not NaN), branch-free: -0.0 + 0.0
    is +0.0, so -0.0 == 0.0."""
    cdef uint32_t u
    v = v + 0.0
    memcpy(&u, &v, 4)
    u = u ^ (<uint32_t>((<int32_t>u) >> 31) | 0x80000000u)
    return <uint64_t>(~u)


cdef inline uint64_t _flip64(double v) noexcept nogil:
    """As _flip32."""
    cdef uint64_t u
    v = v + 0.0
    memcpy(&u, &v, 8)
    u = u ^ (<uint64_t>((<int64_t>u) >> 63) | 0x8000000000000000u)
    return ~u


cdef inline uint64_t _desc_key32(float v) noexcept nogil:
    """uint key ascending in decreasing v; -0.0 == 0.0; NaN largest (last)."""
    return 0xFFFFFFFFu if v != v else _flip32(v)


cdef inline uint64_t _desc_key64(double v) noexcept nogil:
    return 0xFFFFFFFFFFFFFFFFu if v != v else _flip64(v)


cdef void _radix(uint64_t* key, int64_t* val, uint64_t* tkey, int64_t* tval, Py_ssize_t m,
                 int nbytes) noexcept nogil:
    """Stable sort of (key, val) by key's low nbytes bytes, in place (tkey/tval: scratch).
    Bytes on which all keys agree are skipped."""
    cdef Py_ssize_t hist[8 * 256]
    cdef Py_ssize_t i, d, tot, c
    cdef int b, sh
    cdef uint64_t* k0 = key
    cdef int64_t* v0 = val
    cdef uint64_t* kt
    cdef int64_t* vt
    if m < 2 or nbytes == 0:
        return
    memset(hist, 0, sizeof(hist))
    for i in range(m):
        for b in range(nbytes):
            hist[256 * b + ((key[i] >> (8 * b)) & 255)] += 1
    for b in range(nbytes):
        sh = 8 * b
        if hist[256 * b + ((key[0] >> sh) & 255)] == m:
            continue
        tot = 0
        for d in range(256):
            c = hist[256 * b + d]
            hist[256 * b + d] = tot
            tot += c
        for i in range(m):
            d = 256 * b + ((key[i] >> sh) & 255)
            tkey[hist[d]] = key[i]
            tval[hist[d]] = val[i]
            hist[d] += 1
        kt, vt = key, val
        key, val = tkey, tval
        tkey, tval = kt, vt
    if key != k0:
        memcpy(k0, key, m * sizeof(uint64_t))
        memcpy(v0, val, m * sizeof(int64_t))


cdef int _range_bytes(uint64_t r) noexcept nogil:
    cdef int nb = 0
    while r:
        nb += 1
        r >>= 8
    return nb


cdef void _radix_by(const int64_t* a, const int64_t* idx, uint64_t* key, int64_t* val,
                    uint64_t* tkey, int64_t* tval, Py_ssize_t m) noexcept nogil:
    """Stable sort of val[0:m] by a[idx[val[i]]] (idx NULL: a[val[i]])."""
    cdef Py_ssize_t i
    cdef int64_t lo, hi, x
    if m < 2:
        return
    lo = hi = a[idx[val[0]] if idx != NULL else val[0]]
    for i in range(m):
        x = a[idx[val[i]] if idx != NULL else val[i]]
        key[i] = <uint64_t>x
        if x < lo:
            lo = x
        if x > hi:
            hi = x
    for i in range(m):
        key[i] -= <uint64_t>lo
    _radix(key, val, tkey, tval, m, _range_bytes(<uint64_t>hi - <uint64_t>lo))


cdef Py_ssize_t _rank_impl(const floating* boxes, const floating* scores, const int64_t* batch,
                           const int64_t* classes, Py_ssize_t n, int width, bint use_thr,
                           double thr, int64_t* order, int64_t* spos, int64_t* rstart,
                           double* rb, Py_ssize_t* S_out) noexcept nogil:
    """Candidates in (image, class, score desc, index) order: order[r] the input index of rank r,
    spos[r] its position in the (score desc, index) order of all candidates, segments of equal
    (image, class) rstart[0:S+1], rank-ordered boxes rb (float64, ``width`` values per box: 4
    xyxy, 5 rotated). Returns m (-1: no memory)."""
    cdef Py_ssize_t i, r, m = 0, S = 0
    cdef int64_t o
    cdef uint64_t* key = <uint64_t*>malloc((n + 1) * sizeof(uint64_t))
    cdef uint64_t* tkey = <uint64_t*>malloc((n + 1) * sizeof(uint64_t))
    cdef int64_t* tval = <int64_t*>malloc((n + 1) * sizeof(int64_t))
    if key == NULL or tkey == NULL or tval == NULL:
        free(key); free(tkey); free(tval)
        return -1
    for i in range(n):
        if use_thr and not (scores[i] > thr):
            continue
        if floating is float:
            key[m] = _desc_key32(scores[i])
        else:
            key[m] = _desc_key64(scores[i])
        order[m] = i
        m += 1
    _radix(key, order, tkey, tval, m, 4 if floating is float else 8)
    if classes != NULL or batch != NULL:
        # order holds the score order; sort score positions by class, then image (stable)
        for r in range(m):
            spos[r] = r
        if classes != NULL:
            _radix_by(classes, order, key, spos, tkey, tval, m)
        if batch != NULL:
            _radix_by(batch, order, key, spos, tkey, tval, m)
        for r in range(m):
            tval[r] = order[spos[r]]
        memcpy(order, tval, m * sizeof(int64_t))
    else:
        for r in range(m):
            spos[r] = r
    for r in range(m):
        o = order[r]
        if r == 0 or (classes != NULL and classes[o] != classes[order[r - 1]]) or \
                (batch != NULL and batch[o] != batch[order[r - 1]]):
            rstart[S] = r
            S += 1
        for i in range(width):
            rb[width * r + i] = boxes[width * o + i]
    rstart[S] = m
    S_out[0] = S
    free(key); free(tkey); free(tval)
    return m


class _Ranked:
    """Ranked candidates (see _rank_impl): m, S, order, spos, rstart, rb (m, width) float64;
    ``score_threshold`` None: every box is a candidate."""

    def __init__(self, boxes, scores, batch, classes, score_threshold):
        cdef Py_ssize_t n = scores.shape[0], S = 0, m
        cdef int width = boxes.shape[1]
        order = np.empty(n + 1, dtype=np.int64)
        spos = np.empty(n + 1, dtype=np.int64)
        rstart = np.empty(n + 2, dtype=np.int64)
        rb = np.empty((n + 1, width), dtype=np.float64)
        cdef int64_t[::1] ov = order, sv = spos, rv = rstart
        cdef double[:, ::1] bv = rb
        cdef const int64_t* bp = NULL
        cdef const int64_t* cp = NULL
        cdef const int64_t[::1] bt, ct
        cdef const float[:, ::1] bf
        cdef const float[::1] sf
        cdef const double[:, ::1] bd
        cdef const double[::1] sd
        cdef bint ut = score_threshold is not None
        cdef double t = score_threshold if ut else 0.0
        if batch is not None:
            bt = batch
            bp = &bt[0] if n else NULL
        if classes is not None:
            ct = classes
            cp = &ct[0] if n else NULL
        if n == 0:
            m = 0
            rstart[0] = 0
        elif scores.dtype == np.float32:
            bf, sf = boxes, scores
            with nogil:
                m = _rank_impl(&bf[0, 0], &sf[0], bp, cp, n, width, ut, t, &ov[0], &sv[0],
                               &rv[0], &bv[0, 0], &S)
        else:
            bd, sd = boxes, scores
            with nogil:
                m = _rank_impl(&bd[0, 0], &sd[0], bp, cp, n, width, ut, t, &ov[0], &sv[0],
                               &rv[0], &bv[0, 0], &S)
        if m < 0:
            raise MemoryError()
        self.m, self.S = m, S
        self.order, self.spos, self.rstart, self.rb = order[:m], spos[:m], rstart[:S + 1], rb[:m]


# ---------------------------------------------------------------- spatial grid + greedy sweep

cdef struct Seg:
    Py_ssize_t r0, r1       # ranks of the segment; its grid positions are [r0, r0 + boxes in it)
    Py_ssize_t c0           # its cell starts are cs[c0 : c0 + nx*ny + 1]
    Py_ssize_t nx, ny
    double xmin, ymin, icx, icy, W, H


cdef struct Grid:
    # grid-ordered (cell by cell, rank order inside a cell) structure of arrays
    double* X1
    double* Y1
    double* X2
    double* Y2
    double* A
    int64_t* R              # rank of each grid position
    int64_t* P              # grid position of each rank; -1: not in the grid (overlaps nothing)
    int64_t* cs
    uint8_t* done           # kept or suppressed, by grid position
    Seg* seg
    const double* rot       # CRIT_ROTATED: the prepared rotated box of each rank (ROT_W each)


cdef inline Py_ssize_t _cell(double v, double lo, double inv, Py_ssize_t n) noexcept nogil:
    """Monotone (non-decreasing in v) cell coordinate in [0, n)."""
    cdef double t = (v - lo) * inv
    if not (t > 0):
        return 0
    if t >= n:
        return n - 1
    return <Py_ssize_t>t


cdef inline Py_ssize_t _dim(double extent, double cell, Py_ssize_t maxc) noexcept nogil:
    cdef double t = extent / cell
    if not (t > 0) or t != t or t > 1e18:
        return 1 if not (t > 1e18) else maxc
    if t > maxc:
        return maxc
    return <Py_ssize_t>t + 1


cdef void _build(Grid* g, Py_ssize_t s, const double* rb, double cellscale) noexcept nogil:
    """Bucket the boxes of segment s that can overlap anything into a uniform grid.

    A box is in the grid when x2 > x1, y2 > y1 and its area is finite; any other box has IoU 0
    (or NaN) with everything. Cells are indexed by the lower corner (x1, y1); box q can only
    overlap box p when q.x1 is in (p.x1 - W, p.x2) and q.y1 in (p.y1 - H, p.y2), W/H the widest
    and tallest box (rounded up), so p looks at the cells of that range only.
    """
    cdef Seg* sg = &g.seg[s]
    cdef Py_ssize_t r, c, pos, cnt, run, nreg = 0, maxc, nx, ny, base = sg.c0
    cdef double x1, y1, x2, y2, w, h, a, W = 0, H = 0
    cdef double xmin = INFINITY, xmax = -INFINITY, ymin = INFINITY, ymax = -INFINITY
    for r in range(sg.r0, sg.r1):
        x1 = rb[4 * r]; y1 = rb[4 * r + 1]; x2 = rb[4 * r + 2]; y2 = rb[4 * r + 3]
        g.P[r] = -1
        if x2 > x1 and y2 > y1:
            w = x2 - x1
            h = y2 - y1
            if w * h <= DBL_MAX:
                g.P[r] = 0
                nreg += 1
                W = w if w > W else W
                H = h if h > H else H
                xmin = x1 if x1 < xmin else xmin
                xmax = x1 if x1 > xmax else xmax
                ymin = y1 if y1 < ymin else ymin
                ymax = y1 if y1 > ymax else ymax
    W = W * (1 + 1e-15)         # >= every exact width: the window test stays conservative
    H = H * (1 + 1e-15)
    nx = ny = 1
    if nreg > 1:
        maxc = 2 * nreg
        nx = _dim(xmax - xmin, W * cellscale, maxc)
        ny = _dim(ymax - ymin, H * cellscale, maxc)
        while nx * ny > maxc:
            if nx >= ny:
                nx = (nx + 1) // 2
            else:
                ny = (ny + 1) // 2
    sg.nx, sg.ny, sg.xmin, sg.ymin, sg.W, sg.H = nx, ny, xmin, ymin, W, H
    sg.icx = (nx - 1) / (xmax - xmin) if nx > 1 else 0.0
    sg.icy = (ny - 1) / (ymax - ymin) if ny > 1 else 0.0
    if not (0 < sg.icx < INFINITY):     # one column (also when the extent overflows)
        sg.icx, sg.nx = 0.0, 1
    if not (0 < sg.icy < INFINITY):
        sg.icy, sg.ny = 0.0, 1
    nx, ny = sg.nx, sg.ny
    for c in range(nx * ny + 1):
        g.cs[base + c] = 0
    for r in range(sg.r0, sg.r1):
        if g.P[r] >= 0:
            c = _cell(rb[4 * r], xmin, sg.icx, nx) + nx * _cell(rb[4 * r + 1], ymin, sg.icy, ny)
            g.P[r] = c
            g.cs[base + 1 + c] += 1
    run = sg.r0
    g.cs[base] = run
    for c in range(nx * ny):
        cnt = g.cs[base + 1 + c]
        g.cs[base + 1 + c] = run
        run += cnt
    for r in range(sg.r0, sg.r1):       # afterwards cs[base + 1 + c] is the end of cell c
        if g.P[r] >= 0:
            c = g.P[r]
            pos = g.cs[base + 1 + c]
            g.cs[base + 1 + c] = pos + 1
            x1 = rb[4 * r]; y1 = rb[4 * r + 1]; x2 = rb[4 * r + 2]; y2 = rb[4 * r + 3]
            g.X1[pos] = x1; g.Y1[pos] = y1; g.X2[pos] = x2; g.Y2[pos] = y2
            g.A[pos] = (x2 - x1) * (y2 - y1)
            g.R[pos] = r
            g.done[pos] = 0
            g.P[r] = pos


cdef inline void _scan_iou(const Grid* g, Py_ssize_t p, Py_ssize_t lo, Py_ssize_t hi,
                           double thr) noexcept nogil:
    """Mark every grid box in [lo, hi) whose IoU with box p is > thr (branch-free, SIMD-able;
    marking boxes already done is harmless)."""
    cdef Py_ssize_t q
    cdef double px1 = g.X1[p], py1 = g.Y1[p], px2 = g.X2[p], py2 = g.Y2[p], pa = g.A[p]
    cdef double w, h, inter
    cdef const double* X1 = g.X1
    cdef const double* Y1 = g.Y1
    cdef const double* X2 = g.X2
    cdef const double* Y2 = g.Y2
    cdef const double* A = g.A
    cdef uint8_t* done = g.done
    for q in range(lo, hi):
        w = (px2 if px2 < X2[q] else X2[q]) - (px1 if px1 > X1[q] else X1[q])
        h = (py2 if py2 < Y2[q] else Y2[q]) - (py1 if py1 > Y1[q] else Y1[q])
        inter = w * h if (w > 0) & (h > 0) else 0.0
        done[q] |= (inter / (pa + A[q] - inter)) > thr


cdef inline void _scan_generic(const Grid* g, Py_ssize_t p, Py_ssize_t lo, Py_ssize_t hi,
                               Py_ssize_t r, double thr, int crit, double beta,
                               int64_t* assign) noexcept nogil:
    """As _scan_iou for DIoU and/or recording each newly suppressed rank's suppressor."""
    cdef Py_ssize_t q
    cdef double iou, pen
    for q in range(lo, hi):
        if g.done[q]:
            continue
        if crit == CRIT_ROTATED:      # the grid holds bounding boxes: exact IoU where they meet
            iou = 0.0
            if _inter(g.X1[p], g.Y1[p], g.X2[p], g.Y2[p],
                      g.X1[q], g.Y1[q], g.X2[q], g.Y2[q]) > 0:
                iou = _rot_iou(g.rot + ROT_W * g.R[p], g.rot + ROT_W * g.R[q])
        else:
            iou = _iou(g.X1[p], g.Y1[p], g.X2[p], g.Y2[p], g.A[p],
                       g.X1[q], g.Y1[q], g.X2[q], g.Y2[q], g.A[q])
        if crit == CRIT_DIOU and iou > 0:
            pen = _centre_penalty(g.X1[p], g.Y1[p], g.X2[p], g.Y2[p],
                                  g.X1[q], g.Y1[q], g.X2[q], g.Y2[q], 0.0)
            if beta != 1.0:
                pen = pow(pen, beta)
            iou = iou - pen
        if iou > thr:
            g.done[q] = 1
            if assign != NULL:
                assign[g.R[q]] = r


cdef Py_ssize_t _sweep(const Grid* g, Py_ssize_t s, int64_t* kept, Py_ssize_t cap, double thr,
                       int crit, double beta, int64_t* assign, const double* rthr) noexcept nogil:
    """Greedy NMS of segment s in rank order; kept ranks go to kept[0:count]. rthr: the
    threshold of each (kept) rank, >= 0 (adaptive NMS); NULL: thr for every rank."""
    cdef const Seg* sg = &g.seg[s]
    cdef Py_ssize_t r, p, cx0, cx1, cy0, cy1, cy, lo, hi, count = 0
    cdef double t = thr
    cdef Py_ssize_t nx = sg.nx
    cdef const int64_t* cs = g.cs + sg.c0
    cdef bint fast = crit == CRIT_IOU and assign == NULL
    for r in range(sg.r0, sg.r1):
        if count >= cap:
            break
        p = g.P[r]
        if p >= 0:
            if g.done[p]:
                continue
            g.done[p] = 1
        kept[count] = r
        count += 1
        if p < 0:
            continue
        if rthr != NULL:
            t = rthr[r]
        _window(g, sg, p, &cx0, &cx1, &cy0, &cy1)
        for cy in range(cy0, cy1 + 1):
            lo = cs[cy * nx + cx0]          # cells cx0..cx1 of a row are contiguous
            hi = cs[cy * nx + cx1 + 1]
            if fast:
                _scan_iou(g, p, lo, hi, t)
            else:
                _scan_generic(g, p, lo, hi, r, t, crit, beta, assign)
    return count


cdef int _grid_alloc(Grid* g, const int64_t* rstart, Py_ssize_t m, Py_ssize_t S) noexcept nogil:
    """Room for the grids of the S segments of m ranks (rstart): 0, or -1 (memory; then
    _grid_free is still the way out)."""
    cdef Py_ssize_t s, ncs = 0
    g.X1 = NULL; g.R = NULL; g.cs = NULL; g.done = NULL; g.rot = NULL
    g.seg = <Seg*>malloc((S + 1) * sizeof(Seg))
    if g.seg == NULL:
        return -1
    for s in range(S):
        g.seg[s].r0 = rstart[s]
        g.seg[s].r1 = rstart[s + 1]
        g.seg[s].c0 = ncs
        ncs += 2 * (rstart[s + 1] - rstart[s]) + 2
    g.X1 = <double*>malloc((5 * m + 1) * sizeof(double))
    g.R = <int64_t*>malloc((2 * m + 1) * sizeof(int64_t))
    g.cs = <int64_t*>malloc((ncs + 1) * sizeof(int64_t))
    g.done = <uint8_t*>malloc(m + 1)
    if g.X1 == NULL or g.R == NULL or g.cs == NULL or g.done == NULL:
        return -1
    g.Y1 = g.X1 + m
    g.X2 = g.X1 + 2 * m
    g.Y2 = g.X1 + 3 * m
    g.A = g.X1 + 4 * m
    g.P = g.R + m
    return 0


cdef void _grid_free(Grid* g) noexcept nogil:
    free(g.seg); free(g.X1); free(g.R); free(g.cs); free(g.done)


cdef inline void _window(const Grid* g, const Seg* sg, Py_ssize_t p, Py_ssize_t* cx0,
                         Py_ssize_t* cx1, Py_ssize_t* cy0, Py_ssize_t* cy1) noexcept nogil:
    """The cells whose boxes can overlap grid box p: columns cx0..cx1, rows cy0..cy1 (the
    boxes of one row's columns are contiguous: cs[cy * nx + cx0] .. cs[cy * nx + cx1 + 1])."""
    cx0[0] = _cell(g.X1[p] - sg.W, sg.xmin, sg.icx, sg.nx)
    cx1[0] = _cell(g.X2[p], sg.xmin, sg.icx, sg.nx)
    cy0[0] = _cell(g.Y1[p] - sg.H, sg.ymin, sg.icy, sg.ny)
    cy1[0] = _cell(g.Y2[p], sg.ymin, sg.icy, sg.ny)


cdef int _greedy_impl(const double* rb, const int64_t* rstart, Py_ssize_t m, Py_ssize_t S,
                      int64_t* kept, int64_t* nkept, Py_ssize_t cap, double thr, int crit,
                      double beta, int64_t* assign, const double* rthr, const double* rot,
                      double cellscale, int nthreads) noexcept nogil:
    """Build each segment's grid and sweep it; segment s writes its kept ranks to
    kept[rstart[s]:] and their count to nkept[s]. Segments run in parallel. 0 or -1 (memory).
    CRIT_ROTATED: rb holds the bounding boxes of the prepared rotated boxes ``rot``."""
    cdef Grid g
    cdef Py_ssize_t s
    cdef int err = _grid_alloc(&g, rstart, m, S)
    g.rot = rot
    if err == 0:
        if S == 1 or nthreads <= 1:
            for s in range(S):
                _build(&g, s, rb, cellscale)
                nkept[s] = _sweep(&g, s, kept + rstart[s], cap, thr, crit, beta, assign, rthr)
        else:
            for s in prange(S, num_threads=nthreads, schedule="dynamic"):
                _build(&g, s, rb, cellscale)
                nkept[s] = _sweep(&g, s, kept + rstart[s], cap, thr, crit, beta, assign, rthr)
    _grid_free(&g)
    return err


cdef Py_ssize_t _collect(const int64_t* kept, const int64_t* nkept, const int64_t* rstart,
                         Py_ssize_t S, const int64_t* order, const int64_t* spos,
                         const int64_t* batch, bint merge, Py_ssize_t cap, int64_t* out_rank,
                         uint64_t* key, uint64_t* tkey, int64_t* tval) noexcept nogil:
    """Kept ranks in output order: grouped by image, decreasing score (ties: lower index) inside
    an image, at most cap per image. Without merge (segments are images, already capped) that is
    segment order; with merge (class segments) the kept ranks are re-sorted by (image, spos)."""
    cdef Py_ssize_t s, i, k = 0, j, run
    for s in range(S):
        for i in range(nkept[s]):
            out_rank[k] = kept[rstart[s] + i]
            k += 1
    if not merge:
        return k
    for i in range(k):
        key[i] = <uint64_t>spos[out_rank[i]]
    _radix(key, out_rank, tkey, tval, k, _range_bytes(<uint64_t>(rstart[S])))
    if batch != NULL:
        _radix_by(batch, order, key, out_rank, tkey, tval, k)
    j = 0
    run = 0
    for i in range(k):
        if i > 0 and batch != NULL and batch[order[out_rank[i]]] != batch[order[out_rank[i - 1]]]:
            run = 0
        if run < cap:
            out_rank[j] = out_rank[i]
            j += 1
        run += 1
    return j


def _greedy(rk, batch, bint merge, double thr, int crit, double beta, Py_ssize_t cap,
            bint want_assign, int nthreads, rthr=None, double angle_scale=0.0):
    """Kept ranks in output order (see _collect) and, optionally, each rank's suppressor.
    ``rthr``: float64 (m,) threshold of each rank, >= 0 (see _sweep), or None. CRIT_ROTATED:
    ``rk.rb`` holds rotated boxes, their angles times ``angle_scale`` in radians."""
    cdef Py_ssize_t m = rk.m, S = rk.S, k = 0
    out = np.empty(m + 1, dtype=np.int64)
    assign_np = np.full(m + 1, -1, dtype=np.int64) if want_assign else None
    if m == 0:
        return out[:0], assign_np
    cdef int64_t[::1] ov = out
    cdef const double[:, ::1] rb = rk.rb
    cdef const double* rotp = NULL
    cdef double[:, ::1] rotv
    if crit == CRIT_ROTATED:        # the grid sees bounding boxes, the sweep the rotated boxes
        rot, rb = _prepare_rotated(rk.rb, angle_scale, True)
        rotv = rot
        rotp = &rotv[0, 0]
    cdef const int64_t[::1] rs = rk.rstart, order = rk.order, spos = rk.spos
    cdef const int64_t[::1] bt
    cdef const int64_t* bp = NULL
    cdef int64_t[::1] av
    cdef int64_t* ap = NULL
    cdef const double[::1] tv
    cdef const double* tp = NULL
    cdef double cellscale = CELL
    cdef int err = 0
    if batch is not None:
        bt = batch
        bp = &bt[0]
    if want_assign:
        av = assign_np
        ap = &av[0]
    if rthr is not None:
        tv = rthr
        tp = &tv[0]
    cdef int64_t* kept = <int64_t*>malloc((m + 1) * sizeof(int64_t))
    cdef int64_t* nkept = <int64_t*>malloc((S + 1) * sizeof(int64_t))
    cdef uint64_t* key = <uint64_t*>malloc((2 * m + 2) * sizeof(uint64_t))
    cdef int64_t* tval = <int64_t*>malloc((m + 1) * sizeof(int64_t))
    if kept == NULL or nkept == NULL or key == NULL or tval == NULL:
        err = -1
    else:
        with nogil:
            err = _greedy_impl(&rb[0, 0], &rs[0], m, S, kept, nkept, cap, thr, crit, beta, ap,
                               tp, rotp, cellscale, nthreads)
            if err == 0:
                k = _collect(kept, nkept, &rs[0], S, &order[0], &spos[0], bp, merge, cap,
                             &ov[0], key, key + m + 1, tval)
    free(kept); free(nkept); free(key); free(tval)
    if err:
        raise MemoryError()
    return out[:k], (assign_np[:m] if want_assign else None)


# ---------------------------------------------------------------- entry points
#
# The contracts of fastnorm._kernels (Nms, WeightedNms, SoftNms, MatrixNms, BoxIou): results are
# indices into the input grouped by image (batch) and in decreasing score order within an image;
# per-image lists were flattened (and are split back) by the op module.

def nms(boxes, scores, batch, classes, double iou_threshold, score_threshold,
        Py_ssize_t max_output, int criterion, double beta, int nthreads):
    """Greedy NMS (criterion CRIT_IOU or CRIT_DIOU with exponent beta), class-aware when
    ``classes``; max_output < 0: unlimited (per image). Returns int64 indices."""
    cap = max_output if max_output >= 0 else scores.shape[0] + 1
    rk = _Ranked(boxes, scores, batch, classes, score_threshold)
    ranks, _ = _greedy(rk, batch, classes is not None, iou_threshold, criterion, beta, cap,
                       False, nthreads)
    return rk.order[ranks]


def nms_rotated(boxes, scores, batch, classes, double iou_threshold, score_threshold,
                Py_ssize_t max_output, double angle_scale, int nthreads):
    """Greedy NMS of rotated boxes (N, 5), class-aware when ``classes``: the sweep of
    :func:`nms` on the boxes' bounding boxes, deciding by the exact rotated IoU (CRIT_ROTATED).
    Returns int64 indices."""
    cap = max_output if max_output >= 0 else scores.shape[0] + 1
    rk = _Ranked(boxes, scores, batch, classes, score_threshold)
    ranks, _ = _greedy(rk, batch, classes is not None, iou_threshold, CRIT_ROTATED, 1.0, cap,
                       False, nthreads, angle_scale=angle_scale)
    return rk.order[ranks]


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


def weighted_nms(boxes, scores, batch, double iou_threshold, score_threshold,
                 Py_ssize_t max_output, int nthreads):
    """Greedy NMS whose kept boxes become the score-weighted mean of their cluster.

    Returns (indices, fused boxes (K, 4) of boxes' dtype), ordered as :func:`nms`. A box
    belongs to the cluster of the first (highest-ranked) kept box that suppresses it. When the
    cluster's weights sum to 0 (or are not finite) the kept box is returned unchanged.
    """
    cap = max_output if max_output >= 0 else scores.shape[0] + 1
    rk = _Ranked(boxes, scores, batch, None, score_threshold)
    ranks, assign = _greedy(rk, batch, False, iou_threshold, CRIT_IOU, 1.0, cap, True,
                            nthreads)
    cdef Py_ssize_t m = rk.m
    is_kept = np.zeros(m + 1, dtype=np.uint8)
    is_kept[ranks] = 1
    acc = np.zeros((m + 1, 5), dtype=np.float64)
    w = np.ascontiguousarray(scores[rk.order], dtype=np.float64)
    cdef const double[:, ::1] rb
    cdef double[::1] wv
    cdef int64_t[::1] av
    cdef uint8_t[::1] kv = is_kept
    cdef double[:, ::1] accv = acc
    if m:
        rb, wv, av = rk.rb, w, assign
        with nogil:
            _fuse(&rb[0, 0], &wv[0], &av[0], &kv[0], m, &accv[0, 0])
    a = acc[ranks]
    good = (a[:, 4] != 0) & np.isfinite(a[:, 4])
    fused = np.where(good[:, None], a[:, :4] / np.where(good, a[:, 4], 1.0)[:, None],
                     rk.rb[ranks])
    fused = fused.astype(boxes.dtype)
    return rk.order[ranks], fused


# Soft-NMS family (soft_nms, adaptive_nms's decays): per segment, the live boxes sit in a binary
# max-heap keyed by (current score, lower input index first), so each selection costs O(log n);
# the selected box decays only the live boxes of its grid window (IoU > 0 needs an overlap), so
# clustered inputs cost O(selected x local density x log n) instead of O(n^2). The selections
# and decays are those of the textbook loop, in the same order and arithmetic.

cdef inline bint _above(const double* cur, const int64_t* orig, int64_t a,
                        int64_t b) noexcept nogil:
    """Rank a selected before rank b: higher current score, ties to the lower input index."""
    return cur[a] > cur[b] or (cur[a] == cur[b] and orig[a] < orig[b])


cdef void _sift_down(int64_t* heap, int64_t* hpos, Py_ssize_t n, Py_ssize_t i, const double* cur,
                     const int64_t* orig) noexcept nogil:
    cdef int64_t x = heap[i]
    cdef Py_ssize_t c
    while True:
        c = 2 * i + 1
        if c >= n:
            break
        if c + 1 < n and _above(cur, orig, heap[c + 1], heap[c]):
            c += 1
        if not _above(cur, orig, heap[c], x):
            break
        heap[i] = heap[c]
        hpos[heap[i]] = i
        i = c
    heap[i] = x
    hpos[x] = i


cdef void _sift_up(int64_t* heap, int64_t* hpos, Py_ssize_t i, const double* cur,
                   const int64_t* orig) noexcept nogil:
    cdef int64_t x = heap[i]
    cdef Py_ssize_t q
    while i > 0:
        q = (i - 1) // 2
        if not _above(cur, orig, x, heap[q]):
            break
        heap[i] = heap[q]
        hpos[heap[i]] = i
        i = q
    heap[i] = x
    hpos[x] = i


cdef void _heap_remove(int64_t* heap, int64_t* hpos, Py_ssize_t* n, Py_ssize_t i,
                       const double* cur, const int64_t* orig) noexcept nogil:
    """Take heap[i] out (its hpos becomes -1)."""
    hpos[heap[i]] = -1
    n[0] -= 1
    if i == n[0]:
        return
    heap[i] = heap[n[0]]
    hpos[heap[i]] = i
    if i > 0 and _above(cur, orig, heap[i], heap[(i - 1) // 2]):
        _sift_up(heap, hpos, i, cur, orig)
    else:
        _sift_down(heap, hpos, n[0], i, cur, orig)


cdef inline double _vote_weight(double p, double v, double vmin) noexcept nogil:
    """Weight p / v of one voter, scaled by the smallest variance vmin (> 0: ratios <= 1, no
    overflow); vmin == 0: the zero-variance voters alone count (the limit v -> 0); a NaN
    variance, or p == 0, gives no weight."""
    if p == 0:
        return 0.0
    if vmin == 0:
        return p if v == 0 else 0.0
    return p * (vmin / v) if v == v else 0.0


cdef void _vote(const double* rb, const double* rv, Py_ssize_t b, const int64_t* vr,
                const double* vp, Py_ssize_t nv, double* out) noexcept nogil:
    """Softer-NMS's voted box of selected rank b: per coordinate k, the mean of its own (weight
    p = 1) and its voters' (ranks vr, weights vp) coordinates weighted by p / variance (rb, rv:
    boxes and variances by rank). Variances that are NaN or +inf give no weight; when no voter
    has any, the coordinate stays (bitwise)."""
    cdef Py_ssize_t i, k
    cdef double vmin, v, w, sw, sx
    for k in range(4):
        vmin = INFINITY
        v = rv[4 * b + k]
        if v < vmin:
            vmin = v
        for i in range(nv):
            v = rv[4 * vr[i] + k]
            if vp[i] > 0 and v < vmin:
                vmin = v
        if not (vmin < INFINITY):
            out[k] = rb[4 * b + k]
            continue
        sw = _vote_weight(1.0, rv[4 * b + k], vmin)
        sx = sw * rb[4 * b + k]
        for i in range(nv):
            w = _vote_weight(vp[i], rv[4 * vr[i] + k], vmin)
            sw += w
            sx += w * rb[4 * vr[i] + k]
        out[k] = sx / sw


cdef struct Soft:
    # the parameters of one Soft-NMS family call (_soft_sweep)
    int method              # DECAYS
    double sigma, thr, score_thr, sigma_t
    const double* rthr      # adaptive NMS: each rank's own threshold; NULL: thr
    const double* rb        # the boxes by rank
    const double* rv        # Softer-NMS: the variances by rank; NULL: no vote


cdef Py_ssize_t _soft_sweep(const Grid* g, Py_ssize_t s, const Soft* a, double* cur,
                            const int64_t* orig, int64_t* heap, int64_t* hpos, int64_t* vr,
                            double* vp, int64_t* out_rank, double* out_score,
                            double* out_box) noexcept nogil:
    """Soft-NMS of segment s: repeatedly take the live box of highest current score (ties:
    lower input index), decay the live boxes that overlap it, drop those whose score falls
    below score_thr (see Soft for a). With rthr (adaptive NMS), a selected rank b decays only
    the boxes whose IoU with it is > rthr[b], with either method; DECAY_HARD removes them. With
    rv (Softer-NMS), each selection's voted box goes to out_box, its voters (the live boxes it
    overlaps, weight exp(-(1 - IoU)^2 / sigma_t)) gathered in vr/vp first."""
    cdef int method = a.method
    cdef double sigma = a.sigma, score_thr = a.score_thr, sigma_t = a.sigma_t
    cdef const double* rthr = a.rthr
    cdef const double* rv = a.rv
    cdef const Seg* sg = &g.seg[s]
    cdef Py_ssize_t r, n = 0, b, p, q, j, cx0, cx1, cy0, cy1, cy, count = 0, nv
    cdef double iou, f, t = a.thr
    cdef const int64_t* cs = g.cs + sg.c0
    heap += sg.r0
    for r in range(sg.r0, sg.r1):
        hpos[r] = -1
        if cur[r] >= score_thr:
            heap[n] = r
            hpos[r] = n
            n += 1
    for r in range(n // 2 - 1, -1, -1):
        _sift_down(heap, hpos, n, r, cur, orig)
    while n > 0:
        b = heap[0]
        _heap_remove(heap, hpos, &n, 0, cur, orig)
        out_rank[count] = b
        out_score[count] = cur[b]
        count += 1
        nv = 0
        p = g.P[b]
        if p >= 0:                          # else it overlaps nothing
            if rthr != NULL:
                t = rthr[b]
            _window(g, sg, p, &cx0, &cx1, &cy0, &cy1)
        else:
            cx0, cx1, cy0, cy1 = 0, 0, 0, -1
        for cy in range(cy0, cy1 + 1):
            for q in range(cs[cy * sg.nx + cx0], cs[cy * sg.nx + cx1 + 1]):
                j = g.R[q]
                if hpos[j] < 0:
                    continue
                iou = _iou(g.X1[p], g.Y1[p], g.X2[p], g.Y2[p], g.A[p],
                           g.X1[q], g.Y1[q], g.X2[q], g.Y2[q], g.A[q])
                if iou <= 0:
                    continue
                if rv != NULL:
                    vr[nv] = j
                    vp[nv] = exp(-(1.0 - iou) * (1.0 - iou) / sigma_t)
                    nv += 1
                if (method != DECAY_GAUSSIAN or rthr != NULL) and not (iou > t):
                    continue
                if method == DECAY_HARD:
                    _heap_remove(heap, hpos, &n, hpos[j], cur, orig)
                    continue
                f = exp(-iou * iou / sigma) if method == DECAY_GAUSSIAN else 1.0 - iou
                cur[j] = cur[j] * f
                if not (cur[j] >= score_thr):
                    _heap_remove(heap, hpos, &n, hpos[j], cur, orig)
                else:
                    _sift_down(heap, hpos, n, hpos[j], cur, orig)
        if rv != NULL:
            _vote(a.rb, rv, b, vr, vp, nv, out_box + 4 * (count - 1))
    return count


cdef int _soft_impl(const Soft* a, const int64_t* rstart, Py_ssize_t m, Py_ssize_t S,
                    double* cur, const int64_t* orig, int64_t* out_rank, double* out_score,
                    double* out_box, int64_t* cnt, double cellscale, int nthreads) noexcept nogil:
    """_soft_sweep of every segment (in parallel); segment s writes its selections (and voted
    boxes) from rank rstart[s] on and their count to cnt[s]. 0 or -1 (memory)."""
    cdef Grid g
    cdef Py_ssize_t s
    cdef int64_t* heap = <int64_t*>malloc((3 * m + 3) * sizeof(int64_t))   # heap, hpos, vr
    cdef double* vp = <double*>malloc((m + 1) * sizeof(double))
    cdef int err = _grid_alloc(&g, rstart, m, S)
    if err == 0 and heap != NULL and vp != NULL:
        if S == 1 or nthreads <= 1:
            for s in range(S):
                _build(&g, s, a.rb, cellscale)
                cnt[s] = _soft_sweep(&g, s, a, cur, orig, heap, heap + m + 1,
                                     heap + 2 * m + 2 + rstart[s], vp + rstart[s],
                                     out_rank + rstart[s], out_score + rstart[s],
                                     out_box + 4 * rstart[s])
        else:
            for s in prange(S, num_threads=nthreads, schedule="dynamic"):
                _build(&g, s, a.rb, cellscale)
                cnt[s] = _soft_sweep(&g, s, a, cur, orig, heap, heap + m + 1,
                                     heap + 2 * m + 2 + rstart[s], vp + rstart[s],
                                     out_rank + rstart[s], out_score + rstart[s],
                                     out_box + 4 * rstart[s])
    else:
        err = -1
    _grid_free(&g)
    free(heap)
    free(vp)
    return err


def soft_nms(boxes, scores, batch, int method, double sigma, double iou_threshold,
             double score_threshold, int nthreads):
    """Soft-NMS (method DECAY_GAUSSIAN or DECAY_LINEAR). Returns (indices, scores at selection,
    of the scores' dtype) in selection order, grouped by image; images run in parallel."""
    return _soft(boxes, scores, batch, method, sigma, iou_threshold, score_threshold, nthreads)


def softer_nms(boxes, scores, variances, batch, double sigma_t, int method, double sigma,
               double iou_threshold, double score_threshold, int nthreads):
    """Softer-NMS (method DECAY_GAUSSIAN, DECAY_LINEAR or DECAY_HARD) with variance voting.
    Returns (indices, voted boxes (K, 4) of the boxes' dtype, scores at selection of the scores'
    dtype) in selection order, grouped by image; images run in parallel."""
    return _soft(boxes, scores, batch, method, sigma, iou_threshold, score_threshold, nthreads,
                 variances=variances, sigma_t=sigma_t)


def _soft(boxes, scores, batch, int method, double sigma, double iou_threshold,
          double score_threshold, int nthreads, densities=None, variances=None,
          double sigma_t=1.0):
    """soft_nms, adaptive NMS's decays with ``densities``, softer_nms with ``variances`` (then
    the voted boxes come second in the result); see _soft_sweep."""
    rk = _Ranked(boxes, scores, batch, None, None)
    cdef Py_ssize_t m = rk.order.shape[0], S = rk.S
    cdef double[::1] cur = np.append(scores[rk.order].astype(np.float64), 0.0)
    cdef const double[:, ::1] rb = np.vstack([rk.rb, np.zeros((1, 4))])
    cdef const int64_t[::1] orig = np.append(rk.order, 0)
    cdef const int64_t[::1] rstart = rk.rstart
    cdef int64_t[::1] out_rank = np.empty(m + 1, dtype=np.int64)
    out_score_np = np.empty(m + 1, dtype=np.float64)
    out_box_np = np.empty((m + 1 if variances is not None else 1, 4), dtype=np.float64)
    cdef double[::1] out_score = out_score_np
    cdef double[:, ::1] out_box = out_box_np
    cdef int64_t[::1] cnt = np.zeros(S + 1, dtype=np.int64)
    cdef const double[::1] tv
    cdef const double[:, ::1] vv
    cdef Soft a
    cdef double cellscale = CELL
    cdef int err = 0
    a.method, a.sigma, a.thr, a.score_thr, a.sigma_t = (method, sigma, iou_threshold,
                                                         score_threshold, sigma_t)
    a.rb, a.rthr, a.rv = &rb[0, 0], NULL, NULL
    if densities is not None:
        tv = np.append(_thresholds(iou_threshold, densities[rk.order]), 0.0)
        a.rthr = &tv[0]
    if variances is not None:
        vv = np.vstack([variances[rk.order].astype(np.float64), np.zeros((1, 4))])
        a.rv = &vv[0, 0]
    if m:
        with nogil:
            err = _soft_impl(&a, &rstart[0], m, S, &cur[0], &orig[0], &out_rank[0],
                             &out_score[0], &out_box[0, 0], &cnt[0], cellscale, nthreads)
    if err:
        raise MemoryError()
    orr = np.asarray(out_rank)
    parts = [np.arange(rk.rstart[i], rk.rstart[i] + cnt[i]) for i in range(S)]
    sel = np.concatenate(parts).astype(np.int64) if parts else np.empty(0, dtype=np.int64)
    res = (rk.order[orr[sel]], out_score_np[sel].astype(scores.dtype))
    if variances is None:
        return res
    return res[0], out_box_np[sel].astype(boxes.dtype), res[1]


cdef inline double _mkernel(double iou, int kernel, double sigma) noexcept nogil:
    if kernel == DECAY_GAUSSIAN:
        return exp(-sigma * iou * iou)
    return 1.0 - iou


def matrix_nms(boxes, scores, batch, int kernel, double sigma, int nthreads):
    """Matrix NMS (SOLOv2) decayed scores, (N,) aligned with the input (kernel 0: gaussian
    exp(-sigma iou^2), 1: linear 1 - iou). decay_j = min(1, min over higher-ranked i of the same
    image of f(iou_ij) / f(comp_i)), comp_i = max IoU of i with boxes ranked above it. A ratio
    with f(comp_i) = 0 (linear kernel, comp_i = 1) imposes no decay. Parallel over boxes."""
    rk = _Ranked(boxes, scores, batch, None, None)
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
    return out


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
    if metric == METRIC_IOU:
        return iou
    if metric == METRIC_GIOU:
        cw = (ax2 if ax2 > bx2 else bx2) - (ax1 if ax1 < bx1 else bx1)
        ch = (ay2 if ay2 > by2 else by2) - (ay1 if ay1 < by1 else by1)
        carea = (cw if cw > 0 else 0.0) * (ch if ch > 0 else 0.0)
        return iou - (carea - union) / carea if carea > 0 else iou
    iou = iou - _centre_penalty(ax1, ay1, ax2, ay2, bx1, by1, bx2, by2, 1e-7)
    if metric == METRIC_DIOU:
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
    cdef const float[:, ::1] af, bf
    cdef const double[:, ::1] ad, bd
    cdef float[:, ::1] of
    cdef double[:, ::1] od
    if a.dtype == np.float32:
        af, bf, of = a, b, out
        with nogil:
            _box_iou_f(&af[0, 0], &bf[0, 0], &of[0, 0], N, M, metric, nthreads)
    else:
        ad, bd, od = a, b, out
        with nogil:
            _box_iou_f(&ad[0, 0], &bd[0, 0], &od[0, 0], N, M, metric, nthreads)
    return out


cdef void _box_iou_rotated_f(const double* pa, const double* pb, floating* out, Py_ssize_t N,
                             Py_ssize_t M, int nthreads) noexcept nogil:
    cdef Py_ssize_t i, j
    for i in prange(N, num_threads=nthreads, schedule="dynamic", chunksize=8):
        for j in range(M):
            out[i * M + j] = <floating>_rot_iou(&pa[ROT_W * i], &pb[ROT_W * j])


def box_iou_rotated(a, b, double angle_scale, int nthreads):
    """(N, M) IoU of rotated boxes a (N, 5) and b (M, 5), computed in float64 and returned in
    the boxes' dtype."""
    cdef Py_ssize_t N = a.shape[0], M = b.shape[0]
    out = np.empty((N, M), dtype=a.dtype)
    if N == 0 or M == 0:
        return out
    pa_np, _ = _prepare_rotated(a, angle_scale, False)
    pb_np, _ = _prepare_rotated(b, angle_scale, False)
    cdef const double[:, ::1] pa = pa_np, pb = pb_np
    cdef float[:, ::1] of
    cdef double[:, ::1] od
    if a.dtype == np.float32:
        of = out
        with nogil:
            _box_iou_rotated_f(&pa[0, 0], &pb[0, 0], &of[0, 0], N, M, nthreads)
    else:
        od = out
        with nogil:
            _box_iou_rotated_f(&pa[0, 0], &pb[0, 0], &od[0, 0], N, M, nthreads)
    return out


# ---------------------------------------------------------------- IoU-guided and adaptive NMS

def _thresholds(double iou_threshold, densities):
    """Adaptive NMS: each box's own threshold, max(iou_threshold, density) in float64; a NaN
    density counts as absent."""
    return np.fmax(iou_threshold, np.asarray(densities, dtype=np.float64))


cdef void _cluster_best(const double* s, const int64_t* assign, const uint8_t* is_kept,
                        Py_ssize_t m, int64_t* best) noexcept nogil:
    """best[t]: the rank of the highest score s in the cluster of kept rank t -- t and the ranks
    it suppressed (assign), all ranked after it. NaN is below every number; ties: first rank."""
    cdef Py_ssize_t r, t
    for r in range(m):
        t = r if is_kept[r] else assign[r]
        if t == r or s[r] > s[best[t]] or (s[best[t]] != s[best[t]] and s[r] == s[r]):
            best[t] = r


def iou_guided_nms(boxes, scores, localization, batch, classes, double iou_threshold,
                   score_threshold, Py_ssize_t max_output, int nthreads):
    """IoU-guided NMS: greedy NMS ranked by localization (class-aware with ``classes``); each
    kept box takes the highest score of its cluster. Returns (indices, updated scores of the
    scores' dtype) grouped by image, in decreasing updated score (ties: lower index), at most
    max_output per image (< 0: unlimited)."""
    cap = max_output if max_output >= 0 else scores.shape[0] + 1
    cand = None
    if score_threshold is not None:         # decided in float64, like _rank_impl's threshold
        cand = np.flatnonzero(scores.astype(np.float64) > score_threshold)
        boxes, scores, localization = boxes[cand], scores[cand], localization[cand]
        batch = None if batch is None else batch[cand]
        classes = None if classes is None else classes[cand]
    rk = _Ranked(boxes, localization, batch, classes, None)
    ranks, assign = _greedy(rk, batch, False, iou_threshold, CRIT_IOU, 1.0,
                            scores.shape[0] + 1, True, nthreads)
    cdef Py_ssize_t m = rk.m
    is_kept = np.zeros(m + 1, dtype=np.uint8)
    is_kept[ranks] = 1
    best = np.zeros(m + 1, dtype=np.int64)
    s = np.ascontiguousarray(scores[rk.order], dtype=np.float64)
    cdef const double[::1] sv
    cdef const int64_t[::1] av
    cdef const uint8_t[::1] kv = is_kept
    cdef int64_t[::1] bv = best
    if m:
        sv, av = s, assign
        with nogil:
            _cluster_best(&sv[0], &av[0], &kv[0], m, &bv[0])
    kept = rk.order[ranks]
    srt = np.argsort(kept)
    kept, new = kept[srt], scores[rk.order[best[ranks]]][srt]
    # output order: the family's ranking of the kept boxes by their new scores, per image
    fin = _Ranked(boxes[kept], new, None if batch is None else batch[kept], None, None)
    pos = np.arange(fin.m) - np.repeat(fin.rstart[:fin.S], np.diff(fin.rstart))
    sel = fin.order[pos < cap]
    idx = kept[sel]
    return (idx if cand is None else cand[idx]), new[sel]


def adaptive_nms(boxes, scores, densities, batch, int method, double sigma,
                 double iou_threshold, double score_threshold, int nthreads):
    """Adaptive NMS: a selected box's threshold is max(iou_threshold, its density). DECAY_HARD:
    greedy NMS, indices as :func:`nms`; DECAY_LINEAR / DECAY_GAUSSIAN: decays above that
    threshold, (indices, scores at selection) as :func:`soft_nms`. Boxes with score <
    score_threshold (or NaN) never take part."""
    if method != DECAY_HARD:
        return _soft(boxes, scores, batch, method, sigma, iou_threshold, score_threshold,
                     nthreads, densities=densities)
    # score >= score_threshold, in float64: score > the double just below it
    rk = _Ranked(boxes, scores, batch, None, np.nextafter(score_threshold, -np.inf))
    ranks, _ = _greedy(rk, batch, False, iou_threshold, CRIT_IOU, 1.0, scores.shape[0] + 1,
                       False, nthreads, _thresholds(iou_threshold, densities[rk.order]))
    return rk.order[ranks]


# ---------------------------------------------------------------- combined_nms
#
# Fixed-shape batched NMS (fastnorm._kernels.CombinedNms). A candidate is a (box n, class c) pair
# of image b whose score passes the threshold, indexed f = n * C + c (its position in
# scores[b].ravel()). Images run in parallel, each in one pass over its scores plus work that
# grows with its detections, not with its candidates:
# 1. collect the candidates with their rank keys (score descending, then f: a stable sort of
#    candidates collected in f order) and a histogram of the keys' top 16 bits;
# 2. take the candidates in rank order, a batch at a time: the histogram gives the smallest
#    range of top bits holding the next T candidates, which are gathered and radix-sorted (T
#    doubles from batch to batch);
# 3. each candidate, in rank order, goes through its class's greedy NMS incrementally: it is
#    kept unless a kept candidate of its class (of its image when class-agnostic) overlaps it
#    with IoU > iou_threshold, and a kept one is a detection while its class has fewer than
#    max_output_per_class. The image is done at max_total detections (or pre_nms_top_k
#    candidates). A class-aware class that reached its cap is skipped: its later candidates can
#    be neither detections nor suppressors of another class.
# That is per-class greedy NMS of the ranked candidates followed by the caps, exactly.

cdef inline const floating* _cand_box(const floating* boxes, Py_ssize_t b, Py_ssize_t N,
                                      Py_ssize_t C, bint specific, int64_t f) noexcept nogil:
    """The box of candidate f of image b: boxes (B, N, C, 4) when specific, else (B, N, 4)."""
    if specific:
        return boxes + 4 * (b * N * C + f)
    return boxes + 4 * (b * N + f // C)


cdef inline float _thr32(double thr) noexcept nogil:
    """The largest float <= thr: a float s is > thr (compared in double) exactly when it is >
    this, so that the candidate scans compare in float."""
    cdef float t = <float>thr
    if <double>t > thr:
        t = nextafterf(t, -INFINITY)
    return t


cdef extern from *:
    int __builtin_ctz(unsigned int) nogil


cdef enum:
    TOPBITS = 16                # the histogram of step 2: 2^16 counts
    SCAN = 32                   # scores tested at once in step 1


cdef struct Combined:
    # the parameters of one combined_nms call and the image-independent scratch sizes
    Py_ssize_t N, C, K, cap_c, topk
    bint specific, agnostic, use_thr
    double thr, iou_thr


cdef struct CombinedScratch:
    # one thread's scratch for _combined_image, sized for any image of the call
    uint64_t* key           # 3 * N * C: the candidates' keys, then a batch and its sort scratch
    int64_t* val            # 3 * N * C: their f, likewise
    uint32_t* hist          # 2^TOPBITS
    int64_t* head           # C + 1: the last kept candidate of each class (group), -1: none
    int64_t* cnt            # C + 1: detections of each class
    int64_t* nxt            # L + 1: the kept candidate kept before this one in its group
    double* kb              # 5 * (L + 1): the kept boxes (x1, y1, x2, y2, area), L = min(N C, topk)


cdef Py_ssize_t _combined_image(const Combined* a, const floating* boxes,
                                const floating* s, Py_ssize_t b, CombinedScratch* w,
                                floating* ob, floating* osc, int64_t* ocls,
                                int64_t* oidx) noexcept nogil:
    """Image b's detections into its output rows (see the section comment); their count."""
    cdef Py_ssize_t nc = a.N * a.C, C = a.C, m = 0, f, i, j, t, lo, hi, done = 0, nb, k
    cdef Py_ssize_t nkept = 0, emitted = 0, batch = 4 * a.K + 256, limit, grp, q
    cdef int shift = 16 if floating is float else 48, nbytes = 4 if floating is float else 8
    cdef floating lo_s
    cdef Py_ssize_t f0, f1
    cdef uint32_t bits
    cdef uint64_t kk
    cdef double x1, y1, x2, y2, ar
    cdef bint keep
    cdef const floating* src
    cdef uint64_t* key = w.key
    cdef int64_t* val = w.val
    cdef uint32_t* hist = w.hist
    cdef int64_t* head = w.head
    cdef int64_t* cnt = w.cnt
    cdef int64_t* nxt = w.nxt
    cdef double* kb = w.kb
    memset(hist, 0, (1 << TOPBITS) * sizeof(uint32_t))
    for i in range(C + 1):
        head[i] = -1
        cnt[i] = 0
    # 1. the candidates, in f order, and the histogram of their keys' top bits: blocks of SCAN
    # scores without a candidate are skipped after a vectorised test, the others appended
    # branch-free (a candidate is score >= lo: NaN never is)
    if floating is float:
        lo_s = nextafterf(_thr32(a.thr), INFINITY) if a.use_thr else -INFINITY
    else:
        lo_s = nextafter(a.thr, INFINITY) if a.use_thr else -INFINITY
    f1 = 0
    while f1 < nc:
        f0 = f1
        f1 = f0 + SCAN if f0 + SCAN < nc else nc
        bits = 0
        for f in range(f0, f1):                 # vectorised
            bits = bits | (s[f] >= lo_s)
        if not bits:
            continue
        bits = 0
        for f in range(f0, f1):
            bits = bits | (<uint32_t>(s[f] >= lo_s) << (f - f0))
        while bits:                             # the candidates of the block, in f order
            f = f0 + __builtin_ctz(bits)
            bits = bits & (bits - 1)
            if floating is float:
                kk = _flip32(s[f])
            else:
                kk = _flip64(s[f])
            key[m] = kk
            val[m] = f
            hist[kk >> shift] += 1
            m += 1
    limit = m if m < a.topk else a.topk
    # 2. + 3. batches of candidates in rank order through the incremental greedy NMS
    lo = 0
    while done < limit and emitted < a.K and lo < (1 << TOPBITS):
        hi, nb = lo, hist[lo]
        while hi + 1 < (1 << TOPBITS) and nb < batch:
            hi += 1
            nb += hist[hi]
        j = 0
        for i in range(m):                      # gather, in f order, the batch's candidates
            t = <Py_ssize_t>(key[i] >> shift)
            if lo <= t <= hi:
                key[m + j] = key[i]
                val[m + j] = val[i]
                j += 1
        _radix(key + m, val + m, key + m + nb, val + m + nb, nb, nbytes)
        for i in range(nb):
            if done >= limit or emitted >= a.K:
                break
            done += 1
            f = val[m + i]
            grp = 0 if a.agnostic else f % C
            if not a.agnostic and cnt[grp] >= a.cap_c:
                continue
            src = _cand_box(boxes, b, a.N, C, a.specific, f)
            x1, y1, x2, y2 = src[0], src[1], src[2], src[3]
            ar = _area(x1, y1, x2, y2)
            keep = True
            if ar > 0:
                q = head[grp]
                while q >= 0:
                    if _iou(kb[5 * q], kb[5 * q + 1], kb[5 * q + 2], kb[5 * q + 3], kb[5 * q + 4],
                            x1, y1, x2, y2, ar) > a.iou_thr:
                        keep = False
                        break
                    q = nxt[q]
            if not keep:
                continue
            if ar > 0:                          # a box of area 0 suppresses nothing
                kb[5 * nkept], kb[5 * nkept + 1], kb[5 * nkept + 2] = x1, y1, x2
                kb[5 * nkept + 3], kb[5 * nkept + 4] = y2, ar
                nxt[nkept] = head[grp]
                head[grp] = nkept
                nkept += 1
            t = f % C
            if cnt[t] < a.cap_c:
                cnt[t] += 1
                for k in range(4):
                    ob[4 * emitted + k] = src[k]
                osc[emitted] = s[f]
                ocls[emitted] = t
                oidx[emitted] = f // C
                emitted += 1
        lo = hi + 1
        batch *= 2
    return emitted


cdef int _combined_impl(const Combined* a, const floating* boxes, const floating* scores,
                        Py_ssize_t B, floating* ob, floating* osc, int64_t* ocls, int64_t* oidx,
                        int64_t* num, int nthreads) noexcept nogil:
    """_combined_image of every image, in parallel (scratch per thread); 0, or -1 when out of
    memory."""
    cdef Py_ssize_t b, nc = a.N * a.C, K = a.K, C = a.C, i
    cdef Py_ssize_t L = (nc if nc < a.topk else a.topk) + 1
    cdef int T = nthreads if nthreads < B else <int>B, err = 0
    cdef CombinedScratch* w = <CombinedScratch*>calloc(T, sizeof(CombinedScratch))
    if w == NULL:
        return -1
    for i in range(T):
        w[i].key = <uint64_t*>malloc((3 * nc + 1) * sizeof(uint64_t))
        w[i].val = <int64_t*>malloc((3 * nc + 1) * sizeof(int64_t))
        w[i].hist = <uint32_t*>malloc((1 << TOPBITS) * sizeof(uint32_t))
        w[i].head = <int64_t*>malloc((C + 1) * sizeof(int64_t))
        w[i].cnt = <int64_t*>malloc((C + 1) * sizeof(int64_t))
        w[i].nxt = <int64_t*>malloc(L * sizeof(int64_t))
        w[i].kb = <double*>malloc(5 * L * sizeof(double))
        if w[i].key == NULL or w[i].val == NULL or w[i].hist == NULL or w[i].head == NULL or \
                w[i].cnt == NULL or w[i].nxt == NULL or w[i].kb == NULL:
            err = -1
    if err == 0:
        for b in prange(B, num_threads=T, schedule="dynamic"):
            num[b] = _combined_image(a, boxes, scores + b * nc, b, &w[threadid()],
                                     ob + 4 * b * K, osc + b * K, ocls + b * K, oidx + b * K)
    for i in range(T):
        free(w[i].key); free(w[i].val); free(w[i].hist); free(w[i].head); free(w[i].cnt)
        free(w[i].nxt); free(w[i].kb)
    free(w)
    return err


def _combined_typed(Combined a, const floating[::1] boxes, const floating[::1] scores,
                    floating[::1] ob, floating[::1] osc, int64_t[::1] ocls, int64_t[::1] oidx,
                    int64_t[::1] num, int nthreads):
    """_combined_impl on flat C-contiguous arrays of one float type: 0, or -1 (memory)."""
    cdef int err
    with nogil:
        err = _combined_impl(&a, &boxes[0], &scores[0], num.shape[0], &ob[0], &osc[0], &ocls[0],
                             &oidx[0], &num[0], nthreads)
    return err


def combined_nms(boxes, scores, double iou_threshold, score_threshold,
                 Py_ssize_t max_output_per_class, Py_ssize_t max_total, bint class_agnostic,
                 Py_ssize_t pre_nms_top_k, int nthreads):
    """Fixed-shape batched NMS (see the section comment and fastnorm._kernels.CombinedNms):
    (boxes (B, K, 4), scores (B, K), classes (B, K), num_detections (B,), indices (B, K))."""
    cdef Py_ssize_t B = scores.shape[0], N = scores.shape[1], C = scores.shape[2]
    cdef Py_ssize_t K = max_total
    cdef Combined a
    a.N, a.C, a.K = N, C, K
    a.cap_c = max_output_per_class if max_output_per_class >= 0 else N + 1
    a.topk = pre_nms_top_k if pre_nms_top_k >= 0 else N * C + 1
    a.specific, a.agnostic = boxes.ndim == 4, class_agnostic
    a.use_thr = score_threshold is not None
    a.thr = score_threshold if a.use_thr else 0.0
    a.iou_thr = iou_threshold
    cdef int err = 0
    ob = np.zeros((B, K, 4), dtype=boxes.dtype)
    osc = np.zeros((B, K), dtype=scores.dtype)
    ocls = np.zeros((B, K), dtype=np.int64)
    oidx = np.full((B, K), -1, dtype=np.int64)
    num = np.zeros(B, dtype=np.int64)
    if B * N * C == 0 or K == 0 or a.cap_c == 0:
        return ob, osc, ocls, num, oidx
    err = _combined_typed(a, boxes.reshape(-1), scores.reshape(-1), ob.reshape(-1),
                          osc.reshape(-1), ocls.reshape(-1), oidx.reshape(-1), num, nthreads)
    if err:
        raise MemoryError()
    return ob, osc, ocls, num, oidx
