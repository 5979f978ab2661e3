# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False, embedsignature=True
"""RoIAlign (avg/max, rotated), RoIPool, PS-RoIAlign and deformable RoI pooling on the CPU
(OpenMP).

Geometry is separable: a RoIAlign sample's bilinear weight is the product of a row factor and a
column factor (``roi_linear`` in _interp.pxd), and a bin's average over its sample grid is

    out = 1/count * sum_r Wy[r] * sum_c Wx[c] * x[r, c]

with Wy/Wx the summed per-axis weights of the distinct rows/columns its samples touch. Per RoI and
bin these (index, weight) tables are built once and shared by every channel, so a bin costs
|rows| x |cols| multiply-adds per channel (<= 16 for sampling_ratio 2, fewer when samples share
pixels) and huge adaptive grids cost at most the pixels they cover.

Average RoIAlign (the hot path) is vectorised over channels (_roi_simd.h): a bin's corner is a
vector of contiguous channels, multiply-added with the per-axis weights, the same operations per
channel in every layout. Channels-last input is read in place: forward units are a few RoIs in
spatial order (_segments: by image, then in bands of box centres, so neighbours share the corner
pixels in cache), each bin reading its corners' C channels front to back. NCHW units are (image,
block of FN_RL = 16 channels): the rows that image's RoIs touch are transposed (8x8 AVX2 blocks)
into a per-thread channel-block-last scratch band, then its RoIs run the channels-last kernel
on it. Backward units are (image, channel block) in both layouts: the unit scatters into the
band in the fixed spatial RoI order and writes its whole part of grad_x back (grad_x comes
from the caching allocator, so no page faults), so gradients are race-free and bitwise identical
for any thread count. A band holds at most SCRATCH_BYTES (16 MiB: a whole FPN P2 map); on wider
or taller maps a unit's RoIs go in consecutive groups that each fit one band, and a RoI reading
more rows than a band holds is computed channel by channel on x / grad_x (same RoI order).
Deformable RoI pooling runs on the same units with per-bin tables (each bin's samples shifted by
its offset) and the mask folded into each bin's 1/count; its offset/mask gradients are a third
pass of those units over x, with derivative tables, leaving per-(RoI, bin, channel block) sums
that are then added in block order (deterministic). RoIPool and PS-RoIAlign have lane kernels
of the same kind (their section below). The other ops (max and rotated RoIAlign): forward units
(RoI, channel block), backward units (image, channel block), RoIs in index order. The adaptive
sampling grid is capped at ``2 * L + 64`` samples per bin along an axis of length L (never
reached by RoIs inside the map).
Non-finite RoIs give zeros (and no gradient).
"""
import numpy as np
cimport numpy as cnp
from cython.parallel cimport prange, parallel, threadid
from libc.math cimport ceil, floor, round, fabs, cos, sin, INFINITY
from libc.float cimport FLT_MAX
from libc.stdlib cimport malloc, free
from libc.string cimport memset, memcpy

from _types cimport floating
from fastnorm._cpu import _pool as _cache   # output arrays from the caching allocator
from _interp cimport roi_linear

cnp.import_array()

cdef double COORD_MAX = 1e15        # RoIPool coordinates are clamped here before int conversion

# fastnorm._kernels.ROI_MODES (tests/test_contract.py)
cdef enum:
    MODE_AVG = 0
    MODE_MAX = 1


# ---------------------------------------------------------------- geometry

cdef inline bint _finite4(const floating* r) noexcept nogil:
    cdef int i
    for i in range(1, 5):
        if not (fabs(r[i]) < INFINITY):
            return False
    return True


cdef inline Py_ssize_t _grid(floating size, Py_ssize_t P, int sr, Py_ssize_t L) noexcept nogil:
    """Samples per bin along one axis: sampling_ratio, or ceil(size / P), capped at 2 L + 64."""
    cdef double g
    if sr > 0:
        g = sr
    else:
        g = ceil(size / P)
    if not (g >= 0):
        return 0
    if g > 2 * L + 64:
        return 2 * L + 64
    return <Py_ssize_t>g


cdef inline bint _geom(const floating* r, double scale, double off, bint clamp1,
                       Py_ssize_t PH, Py_ssize_t PW, int sr, Py_ssize_t H, Py_ssize_t W,
                       floating* g, Py_ssize_t* grid) noexcept nogil:
    """RoIAlign geometry (torchvision): g = [y_start, x_start, bin_h, bin_w, roi_h, roi_w],
    grid = [gh, gw]. False for a non-finite RoI."""
    cdef floating ys, xs, ye, xe, rh, rw
    if not _finite4(r):
        return False
    xs = <floating>(r[1] * scale - off)
    ys = <floating>(r[2] * scale - off)
    xe = <floating>(r[3] * scale - off)
    ye = <floating>(r[4] * scale - off)
    rw = xe - xs
    rh = ye - ys
    if clamp1:
        rw = max(rw, <floating>1)
        rh = max(rh, <floating>1)
    g[0] = ys
    g[1] = xs
    g[2] = rh / PH
    g[3] = rw / PW
    g[4] = rh
    g[5] = rw
    grid[0] = _grid(rh, PH, sr, H)
    grid[1] = _grid(rw, PW, sr, W)
    return True


cdef inline Py_ssize_t _add(Py_ssize_t* idx, floating* wt, Py_ssize_t b0, Py_ssize_t n,
                            Py_ssize_t j, floating w) noexcept nogil:
    """Append (j, w) to the bin starting at b0 (n entries so far), merging with the last two."""
    if n > b0 and idx[n - 1] == j:
        wt[n - 1] += w
        return n
    if n - 1 > b0 and idx[n - 2] == j:
        wt[n - 2] += w
        return n
    idx[n] = j
    wt[n] = w
    return n + 1


cdef inline Py_ssize_t _axis(floating start, floating bin, Py_ssize_t p, Py_ssize_t g,
                             Py_ssize_t L, bint deriv, Py_ssize_t* idx, floating* wt,
                             Py_ssize_t n) noexcept nogil:
    """Append bin p's (index, weight) table along one axis at position n; returns the new end.

    Samples at start + p*bin + (i + .5) * bin / g, i < g (torchvision's expression). With
    ``deriv`` the weights are d(weight)/d(coordinate) instead (0 where the coordinate clamps)."""
    cdef Py_ssize_t i, i0, i1, b0 = n
    cdef floating y, l
    cdef int kind
    for i in range(g):
        y = start + p * bin + <floating>(i + 0.5) * bin / <floating>g
        kind = roi_linear(y, L, &i0, &i1, &l)
        if kind == 0:
            continue
        if deriv:
            if kind == 2:
                n = _add(idx, wt, b0, n, i0, -1)
                n = _add(idx, wt, b0, n, i1, 1)
        else:
            n = _add(idx, wt, b0, n, i0, 1 - l)
            n = _add(idx, wt, b0, n, i1, l)
    return n


cdef struct Tab:
    # per-bin CSR tables: rows of bin b are ri[rp[b]:rp[b+1]] (weights rw), columns ci/cw
    Py_ssize_t* rp
    Py_ssize_t* cp
    Py_ssize_t* ri
    Py_ssize_t* ci
    void* rw
    void* cw
    void* mem
    Py_ssize_t n        # batch index (separable tables of _sep_tables)
    double cnt          # samples per bin; 0: the RoI contributes nothing
    Py_ssize_t lo, hi   # rows read, lo..hi (lo > hi: none; separable tables of _sep_tables)


cdef inline bint _tab_alloc(Tab* t, Py_ssize_t nbins, Py_ssize_t gh, Py_ssize_t gw,
                            Py_ssize_t wsize) noexcept nogil:
    cdef Py_ssize_t nr = nbins * 2 * gh + 1, nc = nbins * 2 * gw + 1
    cdef char* m = <char*>malloc((2 * (nbins + 1) + nr + nc) * sizeof(Py_ssize_t)
                                 + (nr + nc) * wsize)
    t.mem = m
    if m == NULL:
        return False
    t.rp = <Py_ssize_t*>m
    t.cp = t.rp + nbins + 1
    t.ri = t.cp + nbins + 1
    t.ci = t.ri + nr
    t.rw = <void*>(t.ci + nc)
    t.cw = <void*>(<char*>t.rw + nr * wsize)
    return True


cdef inline void _tab_build(Tab* t, const floating* g, const Py_ssize_t* grid, Py_ssize_t PH,
                            Py_ssize_t PW, Py_ssize_t H, Py_ssize_t W, const floating* dyx,
                            Py_ssize_t dstride, bint dy_deriv, bint dx_deriv) noexcept nogil:
    """Per-bin tables of one RoI. ``dyx`` (optional): per-bin start shifts, dy at dyx[b] and dx
    at dyx[b + dstride] (deformable pooling); the *_deriv flags build derivative tables."""
    cdef Py_ssize_t ph, pw, b, nr = 0, nc = 0
    cdef floating ys, xs
    cdef floating* rw = <floating*>t.rw
    cdef floating* cw = <floating*>t.cw
    t.rp[0] = 0
    t.cp[0] = 0
    for ph in range(PH):
        for pw in range(PW):
            b = ph * PW + pw
            ys = g[0]
            xs = g[1]
            if dyx != NULL:
                ys = ys + dyx[b]
                xs = xs + dyx[b + dstride]
            nr = _axis(ys, g[2], ph, grid[0], H, dy_deriv, t.ri, rw, nr)
            nc = _axis(xs, g[3], pw, grid[1], W, dx_deriv, t.ci, cw, nc)
            t.rp[b + 1] = nr
            t.cp[b + 1] = nc


cdef inline floating _bin_dot(const floating* plane, Py_ssize_t W, const Tab* tr, Py_ssize_t rb,
                              const Tab* tc, Py_ssize_t cb) noexcept nogil:
    """sum_r Wy[r] sum_c Wx[c] plane[r, c] with the row table of bin rb in ``tr`` and the column
    table of bin cb in ``tc``."""
    cdef const floating* rw = <const floating*>tr.rw
    cdef const floating* cw = <const floating*>tc.cw
    cdef Py_ssize_t a, b
    cdef floating s = 0, u
    cdef const floating* row
    for a in range(tr.rp[rb], tr.rp[rb + 1]):
        row = plane + tr.ri[a] * W
        u = 0
        for b in range(tc.cp[cb], tc.cp[cb + 1]):
            u = u + cw[b] * row[tc.ci[b]]
        s = s + rw[a] * u
    return s


cdef inline void _bin_scatter(floating* plane, Py_ssize_t W, Py_ssize_t ps, const Tab* t,
                              Py_ssize_t rb, Py_ssize_t cb, floating gg) noexcept nogil:
    """The adjoint of _bin_dot (row and column tables of bin rb / cb of ``t``) on a plane whose
    pixels are ``ps`` apart (1; channels-last: C)."""
    cdef const floating* rw = <const floating*>t.rw
    cdef const floating* cw = <const floating*>t.cw
    cdef Py_ssize_t a, b
    cdef floating u
    cdef floating* row
    for a in range(t.rp[rb], t.rp[rb + 1]):
        row = plane + t.ri[a] * W * ps
        u = gg * rw[a]
        for b in range(t.cp[cb], t.cp[cb + 1]):
            row[t.ci[b] * ps] += u * cw[b]


# ---------------------------------------------------------------- RoIAlign kernels

cdef Py_ssize_t TABLE_BYTES = 32 << 20   # separable tables are built for RoI chunks up to this
cdef Py_ssize_t SETUP_SERIAL = 64         # per-RoI setup (tables, windows) of fewer RoIs: serial


cdef inline int _setup_threads(Py_ssize_t n, int nthreads) noexcept nogil:
    """Threads for a per-RoI setup loop of n RoIs: one below SETUP_SERIAL (a parallel region
    costs more than a few RoIs do)."""
    return nthreads if n >= SETUP_SERIAL else 1
# per-thread scratch of the channel-vector kernels, bytes: RoIAlign's bands of FN_RL-channel
# rows, RoIPool's / PS-RoIAlign's lane images (beyond it they take their smaller fallbacks)
cdef Py_ssize_t SCRATCH_BYTES = 16 << 20
# RoIAlign NCHW forward: per-RoI rectangles (_avg_rects) instead of a band when they move less
# than 1 / RECT_COST of its pixels (a short-row transpose costs about that many band pixels)
cdef Py_ssize_t RECT_COST = 3
# PS-RoIAlign: the lane path only when its transposes move at most LANE_READS times the elements
# the scalar path reads (few RoIs on a large map: the scalar path)
cdef Py_ssize_t LANE_READS = 6
# RoIAlign / RoIPool: outputs (forward) and RoIAlign's grad_x (backward) of at least this many
# bytes, too large to be read back from cache, are written with non-temporal stores (no
# read-for-ownership of their lines: a quarter less DRAM traffic for the NCHW forward); smaller
# ones stay in cache for the caller
cdef Py_ssize_t STREAM_BYTES = 8 << 20


def _set_limits(scratch_bytes=None, table_bytes=None, rect_cost=None, lane_reads=None,
                stream_bytes=None):
    """Set SCRATCH_BYTES, TABLE_BYTES, RECT_COST, LANE_READS and STREAM_BYTES (None:
    unchanged); returns the old values. A test hook: small values send small inputs down the
    banded, direct, fallback and chunked paths; rect_cost 0 / huge forces RoIAlign's per-RoI
    rectangles / bands, lane_reads 0 / huge PS-RoIAlign's scalar / lane path, stream_bytes 0
    the non-temporal stores of RoIAlign and RoIPool."""
    global SCRATCH_BYTES, TABLE_BYTES, RECT_COST, LANE_READS, STREAM_BYTES
    old = SCRATCH_BYTES, TABLE_BYTES, RECT_COST, LANE_READS, STREAM_BYTES
    if scratch_bytes is not None:
        SCRATCH_BYTES = scratch_bytes
    if table_bytes is not None:
        TABLE_BYTES = table_bytes
    if rect_cost is not None:
        RECT_COST = rect_cost
    if lane_reads is not None:
        LANE_READS = lane_reads
    if stream_bytes is not None:
        STREAM_BYTES = stream_bytes
    return old


cdef inline Py_ssize_t _al8(Py_ssize_t b) noexcept nogil:
    return (b + 7) & ~(<Py_ssize_t>7)


cdef struct Deform:
    # deformable RoI pooling's extras for the RoIAlign units: per-bin tables shifted by
    # gamma * roi size * offset (K, 2, PH, PW) (or not: NULL), outputs scaled by mask (K, 1, PH, PW)
    const void* offset
    const void* mask
    double gamma
    void* part          # non-NULL: the gradient pass of offset/mask instead of the forward:
                        # per (RoI, bin, channel block) sums (K, PH * PW, nblk, 3) of
                        # dy * bin (mask), dy * d bin / dy, dy * d bin / dx over the block
    Py_ssize_t nblk
    Tab* dtabs          # (gradient pass) per RoI of the chunk: derivative tables, rows d/dy,
                        # columns d/dx (built by _sep_tables beside the tables)


cdef Py_ssize_t _sep_tables(const floating* rois, const Py_ssize_t* order, Py_ssize_t k0,
                            Py_ssize_t K, double scale, double off, bint clamp1, Py_ssize_t PH,
                            Py_ssize_t PW, int sr, Py_ssize_t H, Py_ssize_t W, const Deform* dfm,
                            Tab* tabs, void** mem, int nthreads) noexcept nogil:
    """Separable (row tables per ph, column tables per pw) RoIAlign tables of the RoIs
    order[k0:k1] in tabs[0:k1-k0], as many RoIs as fit TABLE_BYTES (at least one); returns k1
    (k0 on failure).
    With ``dfm``: deformable RoI pooling's tables, per bin (rows and columns of bin b at rp[b],
    cp[b]) and shifted by its offsets. The memory is one block in mem[0] (free it)."""
    cdef floating g[6]
    cdef Py_ssize_t grid[2]
    cdef Py_ssize_t k, k1 = k0, total = 0, size, nr, nc, e
    cdef Py_ssize_t fs = sizeof(floating), nb = PH * PW
    cdef Py_ssize_t nrb = PH if dfm == NULL else nb, ncb = PW if dfm == NULL else nb
    cdef Py_ssize_t extra = 0 if dfm == NULL else _al8(2 * nb * fs)   # the bins' shifts
    cdef bint two = dfm != NULL and dfm.dtabs != NULL                   # + derivative tables
    cdef char* m
    cdef Tab* t
    cdef Tab* d
    while k1 < K:
        nr = 0
        nc = 0
        if _geom(rois + 5 * order[k1], scale, off, clamp1, PH, PW, sr, H, W, g, grid):
            nr = nrb * 2 * grid[0]
            nc = ncb * 2 * grid[1]
        size = ((nrb + ncb + 2 + nr + nc) * sizeof(Py_ssize_t) + _al8(nr * fs) + _al8(nc * fs))
        size = size * (2 if two else 1) + extra
        if k1 > k0 and total + size > TABLE_BYTES:
            break
        tabs[k1 - k0].mem = <void*>total          # byte offset for now
        tabs[k1 - k0].rp = <Py_ssize_t*>nr         # sizes for now
        tabs[k1 - k0].cp = <Py_ssize_t*>nc
        total += size
        k1 += 1
    m = <char*>malloc(total)
    mem[0] = m
    if m == NULL:
        return k0
    for k in range(k1 - k0):
        t = &tabs[k]
        nr = <Py_ssize_t>t.rp
        nc = <Py_ssize_t>t.cp
        t.rp = <Py_ssize_t*>(m + <Py_ssize_t>t.mem)
        t.cp = t.rp + nrb + 1
        t.ri = t.cp + ncb + 1
        t.ci = t.ri + nr
        t.rw = <void*>(t.ci + nc)
        t.cw = <void*>(<char*>t.rw + _al8(nr * fs))
        t.mem = <void*>(<char*>t.cw + _al8(nc * fs)) if dfm != NULL else NULL
        if two:
            d = &dfm.dtabs[k]
            d.rp = <Py_ssize_t*>(<char*>t.mem + extra)
            d.cp = d.rp + nrb + 1
            d.ri = d.cp + ncb + 1
            d.ci = d.ri + nr
            d.rw = <void*>(d.ci + nc)
            d.cw = <void*>(<char*>d.rw + _al8(nr * fs))
    for k in prange(k1 - k0, num_threads=_setup_threads(k1 - k0, nthreads), schedule="static"):
        if dfm == NULL:
            _sep_fill(&tabs[k], rois + 5 * order[k0 + k], scale, off, clamp1, PH, PW, sr, H, W)
        else:
            _dfm_fill(&tabs[k], rois, order[k0 + k], k, dfm, scale, off, clamp1, PH, PW, sr, H,
                      W)
    return k1


cdef void _dfm_fill(Tab* t, const floating* rois, Py_ssize_t k, Py_ssize_t i, const Deform* dfm,
                    double scale,
                    double off, bint clamp1, Py_ssize_t PH, Py_ssize_t PW, int sr, Py_ssize_t H,
                    Py_ssize_t W) noexcept nogil:
    """Fill RoI k's per-bin deformable tables (arrays placed by _sep_tables; t.mem: room for
    the bins' shifts), and its derivative tables dfm.dtabs[i] if asked."""
    cdef floating g[6]
    cdef Py_ssize_t grid[2]
    cdef Py_ssize_t b, nb = PH * PW
    t.n = <Py_ssize_t>rois[5 * k]
    t.cnt = 0
    t.lo = H
    t.hi = -1
    t.rp[0] = 0
    t.cp[0] = 0
    if not _geom(rois + 5 * k, scale, off, clamp1, PH, PW, sr, H, W, g, grid):
        for b in range(nb):
            t.rp[b + 1] = 0
            t.cp[b + 1] = 0
        return
    t.cnt = <double>(grid[0] * grid[1])
    _deform_shifts(g, <const floating*>dfm.offset, k, nb, <floating>dfm.gamma,
                   <floating*>t.mem)
    _tab_build(t, g, grid, PH, PW, H, W, <const floating*>t.mem, nb, False, False)
    if dfm.dtabs != NULL:
        _tab_build(&dfm.dtabs[i], g, grid, PH, PW, H, W, <const floating*>t.mem, nb, True,
                   True)
    for b in range(t.rp[nb]):
        t.lo = min(t.lo, t.ri[b])
        t.hi = max(t.hi, t.ri[b])


cdef void _sep_fill(Tab* t, const floating* r, double scale, double off, bint clamp1,
                    Py_ssize_t PH, Py_ssize_t PW, int sr, Py_ssize_t H, Py_ssize_t W) noexcept nogil:
    """Fill one RoI's separable tables (arrays already placed by _sep_tables)."""
    cdef floating g[6]
    cdef Py_ssize_t grid[2]
    cdef Py_ssize_t ph, pw, e = 0
    t.n = <Py_ssize_t>r[0]
    t.cnt = 0
    t.lo = H
    t.hi = -1
    t.rp[0] = 0
    t.cp[0] = 0
    if not _geom(r, scale, off, clamp1, PH, PW, sr, H, W, g, grid):
        for ph in range(PH):
            t.rp[ph + 1] = 0
        for pw in range(PW):
            t.cp[pw + 1] = 0
        return
    t.cnt = <double>(grid[0] * grid[1])
    for ph in range(PH):
        e = _axis(g[0], g[2], ph, grid[0], H, False, t.ri, <floating*>t.rw, e)
        t.rp[ph + 1] = e
    for ph in range(e):
        t.lo = min(t.lo, t.ri[ph])
        t.hi = max(t.hi, t.ri[ph])
    e = 0
    for pw in range(PW):
        e = _axis(g[1], g[3], pw, grid[1], W, False, t.ci, <floating*>t.cw, e)
        t.cp[pw + 1] = e


cdef extern from "_roi_simd.h" nogil:
    enum:
        FN_RL
    void fn_roi_scatter_f(float* S, Py_ssize_t ps, Py_ssize_t W, const Py_ssize_t* ri, const float* rw,
                          Py_ssize_t nr, const Py_ssize_t* ci, const float* cw, Py_ssize_t nc,
                          float inv, const float* g)
    void fn_roi_scatter_d(double* S, Py_ssize_t ps, Py_ssize_t W, const Py_ssize_t* ri, const double* rw,
                          Py_ssize_t nr, const Py_ssize_t* ci, const double* cw, Py_ssize_t nc,
                          double inv, const double* g)
    void fn_roi_band_fwd_f(const float* S, Py_ssize_t W, Py_ssize_t PH, Py_ssize_t PW,
                           const Py_ssize_t* rp, const Py_ssize_t* ri, const float* rw,
                           const Py_ssize_t* cp, const Py_ssize_t* ci, const float* cw,
                           int per_bin, float inv, const float* mask, float* tile)
    void fn_roi_band_fwd_d(const double* S, Py_ssize_t W, Py_ssize_t PH, Py_ssize_t PW,
                           const Py_ssize_t* rp, const Py_ssize_t* ri, const double* rw,
                           const Py_ssize_t* cp, const Py_ssize_t* ci, const double* cw,
                           int per_bin, double inv, const double* mask, double* tile)
    void fn_roi_bin_cl_f(const float* x, Py_ssize_t C, Py_ssize_t W, const Py_ssize_t* ri,
                         const float* rw, Py_ssize_t nr, const Py_ssize_t* ci, const float* cw,
                         Py_ssize_t nc, float inv, float* dst)
    void fn_roi_bin_cl_d(const double* x, Py_ssize_t C, Py_ssize_t W, const Py_ssize_t* ri,
                         const double* rw, Py_ssize_t nr, const Py_ssize_t* ci, const double* cw,
                         Py_ssize_t nc, double inv, double* dst)
    void fn_roi_stream_f(float* dst, const float* src, Py_ssize_t n)
    void fn_roi_stream_d(double* dst, const double* src, Py_ssize_t n)
    void fn_roi_sfence()
    void fn_roi_tile_out_f(const float* tile, Py_ssize_t nb, Py_ssize_t nch, float* out,
                           int stream)
    void fn_roi_tile_out_d(const double* tile, Py_ssize_t nb, Py_ssize_t nch, double* out,
                           int stream)
    void fn_roi_tile_in_f(const float* g, Py_ssize_t nb, Py_ssize_t nch, float* tile)
    void fn_roi_tile_in_d(const double* g, Py_ssize_t nb, Py_ssize_t nch, double* tile)
    void fn_roi_tr_in_f(const float* x, Py_ssize_t HW, Py_ssize_t nch, Py_ssize_t p0,
                        Py_ssize_t p1, float* S)
    void fn_roi_tr_in_d(const double* x, Py_ssize_t HW, Py_ssize_t nch, Py_ssize_t p0,
                        Py_ssize_t p1, double* S)
    void fn_roi_tr_out_f(const float* S, Py_ssize_t HW, Py_ssize_t nch, Py_ssize_t p0,
                         Py_ssize_t p1, float* x, int stream)
    void fn_roi_tr_out_d(const double* S, Py_ssize_t HW, Py_ssize_t nch, Py_ssize_t p0,
                         Py_ssize_t p1, double* x, int stream)


cdef inline void _cv_bin(const floating* x, Py_ssize_t C, Py_ssize_t W, const Tab* tr,
                         Py_ssize_t ph, const Tab* tc, Py_ssize_t pw, floating inv,
                         floating* dst) noexcept nogil:
    """dst[0:C] = bin (ph, pw) of one RoI over the C channels-last channels of x, with the row
    table ph of ``tr`` and the column table pw of ``tc`` (fn_roi_bin_cl, _roi_simd.h)."""
    cdef Py_ssize_t r0 = tr.rp[ph], c0 = tc.cp[pw]
    if floating is float:
        fn_roi_bin_cl_f(x, C, W, tr.ri + r0, <const float*>tr.rw + r0, tr.rp[ph + 1] - r0,
                        tc.ci + c0, <const float*>tc.cw + c0, tc.cp[pw + 1] - c0, inv, dst)
    else:
        fn_roi_bin_cl_d(x, C, W, tr.ri + r0, <const double*>tr.rw + r0, tr.rp[ph + 1] - r0,
                        tc.ci + c0, <const double*>tc.cw + c0, tc.cp[pw + 1] - c0, inv, dst)


cdef inline void _cv_scatter(floating* S, Py_ssize_t ps, Py_ssize_t W, const Tab* t,
                             Py_ssize_t ph, Py_ssize_t pw, floating inv,
                             const floating* g) noexcept nogil:
    """The adjoint of _cv_bin: S += g[0:FN_RL] * inv spread over bin (ph, pw)'s corners."""
    cdef Py_ssize_t r0 = t.rp[ph], c0 = t.cp[pw]
    if floating is float:
        fn_roi_scatter_f(S, ps, W, t.ri + r0, <const float*>t.rw + r0, t.rp[ph + 1] - r0,
                         t.ci + c0, <const float*>t.cw + c0, t.cp[pw + 1] - c0, inv, g)
    else:
        fn_roi_scatter_d(S, ps, W, t.ri + r0, <const double*>t.rw + r0, t.rp[ph + 1] - r0,
                         t.ci + c0, <const double*>t.cw + c0, t.cp[pw + 1] - c0, inv, g)


cdef enum:
    CL_STREAM = 1024      # channels-last forward: bins of up to this many channels are streamed


cdef void _cl_fwd_rois(const floating* x, floating* out, const Tab* tabs,
                       const Py_ssize_t* order, Py_ssize_t j0, Py_ssize_t j1, Py_ssize_t jc,
                       Py_ssize_t C, Py_ssize_t H, Py_ssize_t W, Py_ssize_t PH,
                       Py_ssize_t PW, bint stream) noexcept nogil:
    """Channels-last forward of the RoIs order[j0:j1] (spatially sorted: neighbours share
    corners in cache; their tables at tabs[j - jc]), straight from x: every bin one pass over
    its corners' contiguous channel vectors (fn_roi_bin_cl); ``stream``: non-temporal stores."""
    cdef Py_ssize_t nb = PH * PW, j, k, ph, pw
    cdef const Tab* t
    cdef floating inv
    cdef floating v[CL_STREAM]
    cdef floating* o
    for j in range(j0, j1):
        k = order[j]
        t = &tabs[j - jc]
        inv = <floating>(1 / t.cnt) if t.cnt > 0 else 0
        for ph in range(PH):
            for pw in range(PW):
                o = out + (k * nb + ph * PW + pw) * C
                if C > CL_STREAM or not stream:
                    _cv_bin(x + t.n * H * W * C, C, W, t, ph, t, pw, inv, o)
                    continue
                # through a small buffer to non-temporal stores: the output is not read back
                _cv_bin(x + t.n * H * W * C, C, W, t, ph, t, pw, inv, v)
                if floating is float:
                    fn_roi_stream_f(o, v, C)
                else:
                    fn_roi_stream_d(o, v, C)


cdef void _cv_load(const floating* x, floating* S, Py_ssize_t n, Py_ssize_t c0, Py_ssize_t nch,
                   Py_ssize_t C, Py_ssize_t HW, Py_ssize_t p0, Py_ssize_t p1,
                   bint cl) noexcept nogil:
    """S[p][0:nch] = channels c0..c0+nch of pixel p of image n, p in [p0, p1)."""
    cdef Py_ssize_t p, c
    cdef const floating* src
    if not cl:
        if floating is float:
            fn_roi_tr_in_f(x + (n * C + c0) * HW, HW, nch, p0, p1, S)
        else:
            fn_roi_tr_in_d(x + (n * C + c0) * HW, HW, nch, p0, p1, S)
        return
    for p in range(p0, p1):
        src = x + (n * HW + p) * C + c0
        if nch == FN_RL:                # a constant size: two vector moves
            memcpy(S + p * FN_RL, src, FN_RL * sizeof(floating))
            continue
        for c in range(nch):
            S[p * FN_RL + c] = src[c]
        for c in range(nch, FN_RL):     # lanes past the last channel: finite
            S[p * FN_RL + c] = 0


cdef void _cv_store(const floating* S, floating* x, Py_ssize_t n, Py_ssize_t c0, Py_ssize_t nch,
                    Py_ssize_t C, Py_ssize_t HW, Py_ssize_t p0, Py_ssize_t p1,
                    bint cl, bint stream) noexcept nogil:
    """The inverse of _cv_load (``stream``: non-temporal stores; this thread's later loads see
    them, other threads after the unit's fence)."""
    cdef Py_ssize_t p, c
    cdef floating* dst
    if not cl:
        if floating is float:
            fn_roi_tr_out_f(S, HW, nch, p0, p1, x + (n * C + c0) * HW, stream)
        else:
            fn_roi_tr_out_d(S, HW, nch, p0, p1, x + (n * C + c0) * HW, stream)
    else:
        for p in range(p0, p1):
            dst = x + (n * HW + p) * C + c0
            if nch < FN_RL:
                for c in range(nch):
                    dst[c] = S[p * FN_RL + c]
            elif not stream:
                memcpy(dst, S + p * FN_RL, FN_RL * sizeof(floating))
            elif floating is float:
                fn_roi_stream_f(dst, S + p * FN_RL, FN_RL)
            else:
                fn_roi_stream_d(dst, S + p * FN_RL, FN_RL)


cdef void _cv_zero(floating* x, Py_ssize_t n, Py_ssize_t c0, Py_ssize_t nch, Py_ssize_t C,
                   Py_ssize_t HW, Py_ssize_t p0, Py_ssize_t p1, bint cl) noexcept nogil:
    """Channels c0..c0+nch of pixels [p0, p1) of image n = 0."""
    cdef Py_ssize_t p, c
    cdef floating* d
    if p1 <= p0:
        return
    if cl:
        for p in range(p0, p1):
            d = x + (n * HW + p) * C + c0
            if nch == FN_RL:
                memset(d, 0, FN_RL * sizeof(floating))
                continue
            for c in range(nch):
                d[c] = 0
        return
    for c in range(nch):
        memset(x + (n * C + c0 + c) * HW + p0, 0, (p1 - p0) * sizeof(floating))


cdef inline Py_ssize_t _rbin(Py_ssize_t b, Py_ssize_t PW, const Deform* dfm) noexcept nogil:
    """The row table of bin b: ph (separable) or b (deformable, per-bin tables)."""
    return b if dfm != NULL else b // PW


cdef inline Py_ssize_t _cbin(Py_ssize_t b, Py_ssize_t PW, const Deform* dfm) noexcept nogil:
    return b if dfm != NULL else b % PW


cdef inline floating _binv(floating inv, const Deform* dfm, Py_ssize_t i) noexcept nogil:
    """1 / count of a bin, times deformable pooling's mask[i] if there is one (a RoI without
    samples stays 0 whatever its mask)."""
    if dfm != NULL and dfm.mask != NULL and inv != 0:
        return inv * (<const floating*>dfm.mask)[i]
    return inv


cdef void _dfm_grads(const floating* Sb, const floating* dy, const Tab* t, const Tab* d,
                     const Deform* dfm, Py_ssize_t k, Py_ssize_t c0, Py_ssize_t nch,
                     Py_ssize_t C, Py_ssize_t W, Py_ssize_t nb, floating* tile) noexcept nogil:
    """The gradient pass of deformable RoI pooling, RoI k, channels c0..c0+nch of x in the band
    Sb: per bin, the sums over these channels (in order) of dy * bin, dy * d bin / dy and
    dy * d bin / dx (row / column derivative tables of ``d``) into dfm.part."""
    cdef floating v[3 * FN_RL]
    cdef floating* q
    cdef floating gg, s0 = 0, s1 = 0, s2 = 0
    cdef Py_ssize_t b, c
    memset(v, 0, 3 * FN_RL * sizeof(floating))      # the sums not asked for stay 0
    if floating is float:
        fn_roi_tile_in_f(dy + (k * C + c0) * nb, nb, nch, tile)
    else:
        fn_roi_tile_in_d(dy + (k * C + c0) * nb, nb, nch, tile)
    for b in range(nb):
        if dfm.mask != NULL:
            _cv_bin(Sb, FN_RL, W, t, b, t, b, 1, v)
        if dfm.offset != NULL:
            _cv_bin(Sb, FN_RL, W, d, b, t, b, 1, v + FN_RL)
            _cv_bin(Sb, FN_RL, W, t, b, d, b, 1, v + 2 * FN_RL)
        s0 = 0
        s1 = 0
        s2 = 0
        for c in range(nch):
            gg = tile[b * FN_RL + c]
            s0 = s0 + gg * v[c]
            s1 = s1 + gg * v[FN_RL + c]
            s2 = s2 + gg * v[2 * FN_RL + c]
        q = <floating*>dfm.part + ((k * nb + b) * dfm.nblk + c0 // FN_RL) * 3
        q[0] = s0
        q[1] = s1
        q[2] = s2


cdef void _band_roi_fwd(const floating* Sb, Py_ssize_t W, const Tab* t, Py_ssize_t k,
                        floating inv, const Deform* dfm, Py_ssize_t c0, Py_ssize_t nch,
                        Py_ssize_t C, Py_ssize_t PH, Py_ssize_t PW, bint cl, floating* out,
                        floating* tile, bint stream) noexcept nogil:
    """Forward of RoI k (tables t) over channels c0..c0+nch from a channel-block-last image Sb
    of width W (pixel (r, c) at Sb[(r * W + c) * FN_RL]; fn_roi_band_fwd) into its outputs
    (NCHW ``stream``: non-temporal stores)."""
    cdef Py_ssize_t nb = PH * PW, b, c
    cdef const floating* mask = NULL
    if dfm != NULL and dfm.mask != NULL:
        mask = <const floating*>dfm.mask + k * nb
    if floating is float:
        fn_roi_band_fwd_f(Sb, W, PH, PW, t.rp, t.ri, <const float*>t.rw, t.cp, t.ci,
                          <const float*>t.cw, dfm != NULL, inv, mask, tile)
    else:
        fn_roi_band_fwd_d(Sb, W, PH, PW, t.rp, t.ri, <const double*>t.rw, t.cp, t.ci,
                          <const double*>t.cw, dfm != NULL, inv, mask, tile)
    if cl:
        for b in range(nb):
            for c in range(nch):
                out[(k * nb + b) * C + c0 + c] = tile[b * FN_RL + c]
    elif floating is float:
        fn_roi_tile_out_f(tile, nb, nch, out + (k * C + c0) * nb, stream)
    else:
        fn_roi_tile_out_d(tile, nb, nch, out + (k * C + c0) * nb, stream)


cdef inline Py_ssize_t _tab_cols(const Tab* t, Py_ssize_t ncb, Py_ssize_t* clo) noexcept nogil:
    """The last column the column tables of ``ncb`` bins read; clo[0]: the first (none: -1, 0)."""
    cdef Py_ssize_t i, chi = -1
    clo[0] = 0
    for i in range(t.cp[ncb]):
        clo[0] = t.ci[i] if i == 0 else min(clo[0], t.ci[i])
        chi = max(chi, t.ci[i])
    return chi


cdef bint _rect_mode(const Tab* tabs, Py_ssize_t j0, Py_ssize_t j1, Py_ssize_t jc,
                     Py_ssize_t ncb, Py_ssize_t band) noexcept nogil:
    """True when the RoIs' own rectangles (rows lo..hi x the columns their tables read) add up to
    less than 1 / RECT_COST of the band of ``band`` pixels that holds them all (few RoIs on a
    large map: _avg_rects, which moves short rows, costs less than the band's transpose)."""
    cdef Py_ssize_t j, clo, chi, total = 0
    cdef const Tab* t
    for j in range(j0, j1):
        t = &tabs[j - jc]
        if t.lo > t.hi:
            continue
        chi = _tab_cols(t, ncb, &clo)
        if chi >= clo:
            total += (t.hi - t.lo + 1) * (chi - clo + 1)
        if RECT_COST * total >= band:
            return False
    return True


cdef void _avg_rects(const floating* x, floating* out, const Tab* tabs, const Py_ssize_t* order,
                     Py_ssize_t j0, Py_ssize_t j1, Py_ssize_t jc, Py_ssize_t n, Py_ssize_t c0,
                     Py_ssize_t C, Py_ssize_t H, Py_ssize_t W, Py_ssize_t PH, Py_ssize_t PW,
                     const Deform* dfm, floating* S, floating* tile, bint stream) noexcept nogil:
    """NCHW forward of the RoIs order[j0:j1] (as _avg_band, which chose this: _rect_mode), each
    from a transpose of only the rectangle its tables read into S."""
    cdef Py_ssize_t nch = min(FN_RL, C - c0), HW = H * W, nb = PH * PW
    cdef Py_ssize_t ncb = nb if dfm != NULL else PW
    cdef Py_ssize_t j, k, r, clo, chi, w
    cdef const floating* xn = x + (n * C + c0) * HW
    cdef const Tab* t
    cdef floating inv
    for j in range(j0, j1):
        k = order[j]
        t = &tabs[j - jc]
        inv = <floating>(1 / t.cnt) if t.cnt > 0 else 0
        chi = _tab_cols(t, ncb, &clo)
        if t.lo > t.hi or chi < clo:      # reads nothing: empty tables, zeros (S unused)
            _band_roi_fwd(S, 0, t, k, inv, dfm, c0, nch, C, PH, PW, False, out, tile, stream)
            continue
        w = min(W, (chi - clo + 8) // 8 * 8)   # whole 8-pixel transposes, inside the row
        clo = min(clo, W - w)
        for r in range(t.lo, t.hi + 1):
            if floating is float:
                fn_roi_tr_in_f(xn + r * W + clo, HW, nch, 0, w, S + (r - t.lo) * w * FN_RL)
            else:
                fn_roi_tr_in_d(xn + r * W + clo, HW, nch, 0, w, S + (r - t.lo) * w * FN_RL)
        _band_roi_fwd(S - (t.lo * w + clo) * FN_RL, w, t, k, inv, dfm, c0, nch, C, PH, PW, False,
                      out, tile, stream)


cdef void _avg_band(const floating* x, const floating* dy, floating* out, floating* gx,
                    const Tab* tabs, const Py_ssize_t* order, Py_ssize_t j0, Py_ssize_t j1,
                    Py_ssize_t jc, Py_ssize_t n, Py_ssize_t c0, Py_ssize_t C,
                    Py_ssize_t H, Py_ssize_t W, Py_ssize_t PH, Py_ssize_t PW, bint cl,
                    bint backward, const Deform* dfm, Py_ssize_t r0, Py_ssize_t r1, bint fresh,
                    floating* S, floating* tile, bint stream) noexcept nogil:
    """The RoIs order[j0:j1] (tables at tabs[j - jc]), all of whose rows lie in r0..r1-1, on
    image n, channels c0..c0+FN_RL (fewer at the end). Those rows are brought
    channel-block-last into the scratch S (NCHW: a transpose; channels-last: a strided copy),
    then every bin is one FN_RL-channel vector kernel. Backward scatters into S in the fixed RoI
    order and stores the rows back into grad_x (which this unit owns): race-free and the same for
    any thread count; ``fresh``: grad_x is uninitialised (caching allocator, no page faults), so
    the unit writes all of its part, zeros outside the band."""
    cdef Py_ssize_t nch = min(FN_RL, C - c0), HW = H * W, nb = PH * PW
    cdef Py_ssize_t j, k, a, ph, pw, b, c
    cdef Py_ssize_t p0 = r0 * W if r1 > r0 else 0, p1 = r1 * W if r1 > r0 else 0
    cdef floating* Sb = S - p0 * FN_RL        # pixel p of the band at Sb[p * FN_RL]
    cdef const Tab* t
    cdef floating inv
    if backward:
        if fresh:
            _cv_zero(gx, n, c0, nch, C, HW, 0, p0, cl)
            _cv_zero(gx, n, c0, nch, C, HW, p1, HW, cl)
            for a in range((p1 - p0) * FN_RL):
                S[a] = 0
        elif p1 > p0:
            _cv_load(gx, Sb, n, c0, nch, C, HW, p0, p1, cl)
        if p1 == p0:
            return
    elif p1 > p0:
        if not cl and (dfm == NULL or dfm.part == NULL) and _rect_mode(
                tabs, j0, j1, jc, nb if dfm != NULL else PW, p1 - p0):
            _avg_rects(x, out, tabs, order, j0, j1, jc, n, c0, C, H, W, PH, PW, dfm, S, tile,
                       stream)
            return
        _cv_load(x, Sb, n, c0, nch, C, HW, p0, p1, cl)
    for j in range(j0, j1):
        k = order[j]
        t = &tabs[j - jc]
        inv = <floating>(1 / t.cnt) if t.cnt > 0 else 0
        if backward:
            if t.cnt == 0:
                continue
            if cl:
                for b in range(nb):
                    if nch == FN_RL:
                        memcpy(tile + b * FN_RL, dy + (k * nb + b) * C + c0,
                               FN_RL * sizeof(floating))
                        continue
                    for c in range(nch):
                        tile[b * FN_RL + c] = dy[(k * nb + b) * C + c0 + c]
            elif floating is float:
                fn_roi_tile_in_f(dy + (k * C + c0) * nb, nb, nch, tile)
            else:
                fn_roi_tile_in_d(dy + (k * C + c0) * nb, nb, nch, tile)
            for ph in range(PH):
                for pw in range(PW):
                    b = ph * PW + pw
                    _cv_scatter(Sb, FN_RL, W, t, b if dfm != NULL else ph,
                                b if dfm != NULL else pw, _binv(inv, dfm, k * nb + b),
                                tile + b * FN_RL)
            continue
        if dfm != NULL and dfm.part != NULL:
            if t.cnt > 0:
                _dfm_grads(Sb, dy, t, &dfm.dtabs[j - jc], dfm, k, c0, nch, C, W, nb, tile)
            continue
        _band_roi_fwd(Sb, W, t, k, inv, dfm, c0, nch, C, PH, PW, cl, out, tile, stream)
    if backward:
        _cv_store(Sb, gx, n, c0, nch, C, HW, p0, p1, cl, stream)


cdef void _avg_direct(const floating* x, const floating* dy, floating* out, floating* gx,
                      const Tab* t, Py_ssize_t k, Py_ssize_t n, Py_ssize_t c0, Py_ssize_t C,
                      Py_ssize_t H, Py_ssize_t W, Py_ssize_t PH, Py_ssize_t PW, bint cl,
                      bint backward, const Deform* dfm, const Tab* d) noexcept nogil:
    """One RoI whose rows do not fit a thread's scratch band (_band_rows), channel by channel
    straight on x (forward, NCHW; deformable pooling's gradient pass with its derivative tables
    ``d``) or on this unit's part of grad_x (backward)."""
    cdef Py_ssize_t nch = min(FN_RL, C - c0), HW = H * W, nb = PH * PW, c, b, o
    cdef Py_ssize_t ps = C if cl else 1
    cdef floating inv = <floating>(1 / t.cnt) if t.cnt > 0 else 0
    cdef floating gg
    cdef floating* q
    if d != NULL:
        if t.cnt == 0:
            return
        for b in range(nb):
            q = <floating*>dfm.part + ((k * nb + b) * dfm.nblk + c0 // FN_RL) * 3
            q[0] = 0
            q[1] = 0
            q[2] = 0
            for c in range(c0, c0 + nch):
                o = (n * C + c) * HW
                gg = dy[(k * C + c) * nb + b]
                if dfm.mask != NULL:
                    q[0] = q[0] + gg * _bin_dot(x + o, W, t, b, t, b)
                if dfm.offset != NULL:
                    q[1] = q[1] + gg * _bin_dot(x + o, W, d, b, t, b)
                    q[2] = q[2] + gg * _bin_dot(x + o, W, t, b, d, b)
        return
    for c in range(c0, c0 + nch):
        o = n * HW * C + c if cl else (n * C + c) * HW
        for b in range(nb):       # (rare RoIs: per-bin divisions are fine here)
            if backward:
                _bin_scatter(gx + o, W, ps, t, _rbin(b, PW, dfm), _cbin(b, PW, dfm),
                                (dy[(k * nb + b) * C + c] if cl else dy[(k * C + c) * nb + b])
                                * _binv(inv, dfm, k * nb + b))
            else:
                out[(k * C + c) * nb + b] = (_bin_dot(x + o, W, t, _rbin(b, PW, dfm), t,
                                                      _cbin(b, PW, dfm))
                                             * _binv(inv, dfm, k * nb + b))


cdef void _avg_unit(const floating* x, const floating* dy, floating* out, floating* gx,
                    const Tab* tabs, const Py_ssize_t* order, Py_ssize_t j0, Py_ssize_t j1,
                    Py_ssize_t jc, Py_ssize_t n, Py_ssize_t c0, Py_ssize_t C,
                    Py_ssize_t H, Py_ssize_t W, Py_ssize_t PH, Py_ssize_t PW, bint cl,
                    bint backward, const Deform* dfm, Py_ssize_t cap, floating* S,
                    floating* tile, bint stream) noexcept nogil:
    """One unit: image n, channels c0..c0+FN_RL, the RoIs order[j0:j1] (spatially sorted,
    _segments; tables at tabs[j - jc], the chunk starting at jc), with a scratch of ``cap``
    rows. Usually one band holds every row they read (_avg_band); otherwise they go in
    consecutive groups that each fit one band, and a RoI reading more than ``cap`` rows goes
    direct (_avg_direct), in the same fixed RoI order (backward: bitwise the same for any thread
    count). Backward, the first chunk (jc == 0) writes all of the unit's part of grad_x."""
    cdef Py_ssize_t j, jg, lo = H, hi = -1, glo, ghi
    cdef bint big = False
    cdef const Tab* t
    for j in range(j0, j1):
        t = &tabs[j - jc]
        if t.lo <= t.hi:
            lo = min(lo, t.lo)
            hi = max(hi, t.hi)
            big = big or t.hi - t.lo >= cap
    if not big and hi - lo < cap:
        _avg_band(x, dy, out, gx, tabs, order, j0, j1, jc, n, c0, C, H, W, PH, PW, cl,
                  backward, dfm, lo, hi + 1, jc == 0, S, tile, stream)
        return
    if backward and jc == 0:
        _cv_zero(gx, n, c0, min(FN_RL, C - c0), C, H * W, 0, H * W, cl)
    j = j0
    while j < j1:
        jg = j
        glo = H
        ghi = -1
        while j < j1:
            t = &tabs[j - jc]
            if t.lo <= t.hi:
                if t.hi - t.lo >= cap or max(ghi, t.hi) - min(glo, t.lo) >= cap:
                    break
                glo = min(glo, t.lo)
                ghi = max(ghi, t.hi)
            j += 1
        _avg_band(x, dy, out, gx, tabs, order, jg, j, jc, n, c0, C, H, W, PH, PW, cl,
                  backward, dfm, glo, ghi + 1, False, S, tile, stream)
        if j < j1 and tabs[j - jc].hi - tabs[j - jc].lo >= cap:
            _avg_direct(x, dy, out, gx, &tabs[j - jc], order[j], n, c0, C, H, W, PH, PW, cl,
                        backward, dfm,
                        &dfm.dtabs[j - jc] if dfm != NULL and dfm.part != NULL else NULL)
            j += 1


cdef Py_ssize_t CL_ROIS = 8       # channels-last forward: spatially sorted RoIs per unit


cdef inline Py_ssize_t _band_rows(Py_ssize_t H, Py_ssize_t W, Py_ssize_t fs) noexcept nogil:
    """Rows of FN_RL channels in a thread's scratch band (0: not one; every RoI goes direct)."""
    return min(H, SCRATCH_BYTES // max(1, W * FN_RL * fs))


cdef inline Py_ssize_t _cv_per(Py_ssize_t H, Py_ssize_t W, Py_ssize_t PH, Py_ssize_t PW,
                              Py_ssize_t fs) noexcept nogil:
    """Scratch elements per thread of _align_avg: the band and a bin tile."""
    return _al8(_band_rows(H, W, fs) * W * FN_RL + PH * PW * FN_RL)


cdef int _align_avg(const floating* x, const floating* dy, const floating* rois, floating* out,
                    floating* gx, const Py_ssize_t* order, const Py_ssize_t* seg, Py_ssize_t K,
                    Py_ssize_t N, Py_ssize_t C, Py_ssize_t H, Py_ssize_t W, Py_ssize_t PH,
                    Py_ssize_t PW, double scale, double off, bint clamp1, int sr, bint cl,
                    bint backward, const Deform* dfm, floating* scratch,
                    int nthreads) noexcept nogil:
    """Average RoIAlign forward or backward (or deformable RoI pooling's: ``dfm``) of the RoIs
    order[0:K] (all of rois, or a subset such as one pyramid level's: outputs and grad_out rows
    are the RoIs' indices in rois; seg: per-image bounds in order), units (image, block of
    FN_RL channels) (_avg_unit), in chunks of order whose tables fit TABLE_BYTES;
    channels-last forward reads x in place, CL_ROIS RoIs per unit (_cl_fwd_rois). Each thread
    owns a band of _band_rows rows and a tile of PH x PW x FN_RL outputs in ``scratch``
    (nthreads x _cv_per elements, from the caching allocator: no page faults per call). Outputs
    or grad_x of STREAM_BYTES or more are written with non-temporal stores, fenced per unit."""
    cdef bint grads = dfm != NULL and dfm.part != NULL
    cdef Tab* tabs = <Tab*>malloc(max(K, 1) * (2 if grads else 1) * sizeof(Tab))
    cdef Deform dd                     # dfm with room for the derivative tables
    cdef void* mem = NULL
    cdef Py_ssize_t k0 = 0, k1, nblk = (C + FN_RL - 1) // FN_RL, u, n, tid
    cdef Py_ssize_t fs = sizeof(floating), cap = _band_rows(H, W, fs)
    cdef Py_ssize_t per = _cv_per(H, W, PH, PW, fs)
    cdef bint stream = (N * C * H * W if backward else K * C * PH * PW) * fs >= STREAM_BYTES
    if tabs == NULL:
        return -1
    if dfm != NULL:
        dd = dfm[0]
        dd.dtabs = tabs + K if grads else NULL
        dfm = &dd
    while k0 < K:
        k1 = _sep_tables(rois, order, k0, K, scale, off, clamp1, PH, PW, sr, H, W, dfm, tabs,
                         &mem, nthreads)
        if k1 == k0:
            free(tabs)
            return -1
        if cl and not backward:
            for u in prange((k1 - k0 + CL_ROIS - 1) // CL_ROIS, num_threads=nthreads,
                            schedule="dynamic"):
                _cl_fwd_rois(x, out, tabs, order, k0 + u * CL_ROIS,
                             min(k1, k0 + (u + 1) * CL_ROIS), k0, C, H, W, PH, PW, stream)
                if stream:
                    fn_roi_sfence()
            free(mem)
            k0 = k1
            continue
        for u in prange(N * nblk, num_threads=nthreads, schedule="dynamic"):
            n = u // nblk
            tid = threadid()
            _avg_unit(x, dy, out, gx, tabs, order, max(seg[n], k0),
                      max(min(seg[n + 1], k1), max(seg[n], k0)), k0, n, (u % nblk) * FN_RL, C,
                      H, W, PH, PW, cl, backward, dfm, cap, scratch + tid * per,
                      scratch + tid * per + cap * W * FN_RL, stream)
            if stream:
                fn_roi_sfence()
        free(mem)
        k0 = k1
    free(tabs)
    return 0


cdef void _samples(floating start, floating bin, Py_ssize_t p, Py_ssize_t g, Py_ssize_t L,
                   Py_ssize_t* ii, floating* ll) noexcept nogil:
    """Per-sample (i0, i1) pairs and weights of i1 along one axis of bin p (i0 = -1: outside)."""
    cdef Py_ssize_t i
    for i in range(g):
        if roi_linear(start + p * bin + <floating>(i + 0.5) * bin / <floating>g, L,
                      &ii[2 * i], &ii[2 * i + 1], &ll[i]) == 0:
            ii[2 * i] = -1


cdef inline Py_ssize_t _max_sample(const floating* plane, Py_ssize_t W, Py_ssize_t ps,
                                   const Py_ssize_t* yi, const floating* yl,
                                   const Py_ssize_t* xi, const floating* xl,
                                   Py_ssize_t gh, Py_ssize_t gw, floating* best) noexcept nogil:
    """Index iy*gw+ix of the largest bilinear sample of one bin (the first one on ties), its value
    in best (mmcv: samples outside the map are 0). Pixels of ``plane`` are ``ps`` apart."""
    cdef Py_ssize_t iy, ix, arg = 0
    cdef floating v, ly, hy, lx, hx
    for iy in range(gh):
        ly = yl[iy]
        hy = 1 - ly
        for ix in range(gw):
            if yi[2 * iy] < 0 or xi[2 * ix] < 0:
                v = 0
            else:
                lx = xl[ix]
                hx = 1 - lx
                v = (hy * hx * plane[(yi[2 * iy] * W + xi[2 * ix]) * ps]
                     + hy * lx * plane[(yi[2 * iy] * W + xi[2 * ix + 1]) * ps]
                     + ly * hx * plane[(yi[2 * iy + 1] * W + xi[2 * ix]) * ps]
                     + ly * lx * plane[(yi[2 * iy + 1] * W + xi[2 * ix + 1]) * ps])
            if (iy == 0 and ix == 0) or v > best[0]:
                best[0] = v
                arg = iy * gw + ix
    return arg


cdef void _max_unit(const floating* x, const floating* dy, const floating* rois, floating* out,
                    floating* gx, Py_ssize_t k, Py_ssize_t c0, Py_ssize_t c1, Py_ssize_t C,
                    Py_ssize_t H, Py_ssize_t W, Py_ssize_t PH, Py_ssize_t PW, double scale,
                    double off, bint clamp1, int sr, bint cl, bint backward) noexcept nogil:
    """Max-mode RoIAlign of RoI k, channels [c0, c1): forward into out, or backward into gx (the
    gradient goes to the four bilinear corners of the argmax sample)."""
    cdef floating g[6]
    cdef Py_ssize_t grid[2]
    cdef Py_ssize_t n = <Py_ssize_t>rois[5 * k], c, ph, pw, gh, gw, nb = PH * PW, arg, o, ps
    cdef Py_ssize_t* yi
    cdef floating* yl
    cdef Py_ssize_t* sy
    cdef Py_ssize_t* sx
    cdef floating best = 0, gg, ly, lx
    cdef floating* gp
    cdef bint ok = _geom(rois + 5 * k, scale, off, clamp1, PH, PW, sr, H, W, g, grid)
    gh = grid[0] if ok else 0
    gw = grid[1] if ok else 0
    ps = C if cl else 1
    yi = <Py_ssize_t*>malloc(2 * (PH * gh + PW * gw + 1) * sizeof(Py_ssize_t))
    yl = <floating*>malloc((PH * gh + PW * gw + 1) * sizeof(floating))
    if yi != NULL and yl != NULL:
        for ph in range(PH):
            _samples(g[0], g[2], ph, gh, H, yi + 2 * ph * gh, yl + ph * gh)
        for pw in range(PW):
            _samples(g[1], g[3], pw, gw, W, yi + 2 * (PH * gh + pw * gw), yl + PH * gh + pw * gw)
        for c in range(c0, c1):
            for ph in range(PH):
                for pw in range(PW):
                    o = (k * nb + ph * PW + pw) * C + c if cl else (k * C + c) * nb + ph * PW + pw
                    if gh * gw == 0:
                        if not backward:
                            out[o] = 0
                        continue
                    arg = _max_sample(x + (n * H * W * C + c if cl else (n * C + c) * H * W), W,
                                      ps, yi + 2 * ph * gh, yl + ph * gh,
                                      yi + 2 * (PH * gh + pw * gw), yl + PH * gh + pw * gw, gh, gw,
                                      &best)
                    if not backward:
                        out[o] = best
                        continue
                    gg = dy[o]
                    sy = yi + 2 * (ph * gh + arg // gw)
                    sx = yi + 2 * (PH * gh + pw * gw + arg % gw)
                    if sy[0] < 0 or sx[0] < 0:
                        continue
                    ly = yl[ph * gh + arg // gw]
                    lx = yl[PH * gh + pw * gw + arg % gw]
                    gp = gx + (n * H * W * C + c if cl else (n * C + c) * H * W)
                    gp[(sy[0] * W + sx[0]) * ps] += gg * (1 - ly) * (1 - lx)
                    gp[(sy[0] * W + sx[1]) * ps] += gg * (1 - ly) * lx
                    gp[(sy[1] * W + sx[0]) * ps] += gg * ly * (1 - lx)
                    gp[(sy[1] * W + sx[1]) * ps] += gg * ly * lx
    free(yi)
    free(yl)


cdef void _align_max(const floating* x, const floating* dy, const floating* rois, floating* out,
                     floating* gx, const Py_ssize_t* order, const Py_ssize_t* seg, Py_ssize_t K,
                     Py_ssize_t N, Py_ssize_t C, Py_ssize_t H, Py_ssize_t W, Py_ssize_t PH,
                     Py_ssize_t PW, double scale, double off, bint clamp1, int sr, bint cl,
                     bint backward, Py_ssize_t cb, int nthreads) noexcept nogil:
    cdef Py_ssize_t nblk = (C + cb - 1) // cb, u, m, c0, j
    for u in prange((N if backward else K) * nblk, num_threads=nthreads, schedule="dynamic"):
        m = u // nblk
        c0 = (u % nblk) * cb
        if backward:
            for j in range(seg[m], seg[m + 1]):
                _max_unit(x, dy, rois, out, gx, order[j], c0, min(C, c0 + cb), C, H, W, PH, PW,
                          scale, off, clamp1, sr, cl, True)
        else:
            _max_unit(x, dy, rois, out, gx, m, c0, min(C, c0 + cb), C, H, W, PH, PW, scale, off,
                      clamp1, sr, cl, False)


# ---------------------------------------------------------------- rotated RoIAlign (detectron2)
#
# The rotation breaks separability, so a RoI's table lists, per bin, each sample inside the map as
# one packed corner offset (its top-left corner y0 * W + x0, times 4, plus bit 0: x1 = x0 + 1 and
# bit 1: y1 = y0 + 1; clamped at the last row/column otherwise) and its two fractions (ly, lx):
# 16 bytes per sample in float32. Tables are built once per RoI (in parallel, for RoI chunks up
# to TABLE_BYTES) and shared by every channel; a RoI whose table alone would exceed ROT_TABLE_MAX
# (huge adaptive grids) samples on the fly.

cdef Py_ssize_t ROT_TABLE_MAX = 8 << 20
cdef enum:
    ROT_BLOCK = 8        # at most this many channels per unit (each sample decoded once for them)


cdef struct RTab:
    Py_ssize_t* bp      # bin b's samples: idx[bp[b]:bp[b + 1]], fractions wt[2 * s], wt[2 * s + 1]
    Py_ssize_t* idx
    void* wt
    Py_ssize_t n        # batch index
    double inv          # 1 / samples per bin; 0: the RoI contributes nothing
    bint direct         # no table: samples computed on the fly
    Py_ssize_t ne       # samples reserved


cdef inline bint _rgeom(const floating* r, double scale, double off, bint aligned, double ascale,
                        Py_ssize_t PH, Py_ssize_t PW, int sr, Py_ssize_t L, floating* g,
                        Py_ssize_t* grid) noexcept nogil:
    """Rotated RoIAlign geometry: g = [cy, cx, bin_h, bin_w, -roi_h/2, -roi_w/2, cos, sin],
    grid = [gh, gw] (adaptive grids capped at 2 L + 64, L = max(H, W)). False (zeros) for a
    non-finite RoI or, aligned, a negative size."""
    cdef floating rw, rh
    cdef double t
    cdef int i
    for i in range(1, 6):
        if not (fabs(r[i]) < INFINITY):
            return False
    rw = <floating>(r[3] * scale)
    rh = <floating>(r[4] * scale)
    if aligned:
        if rw < 0 or rh < 0:
            return False
    else:
        rw = max(rw, <floating>1)
        rh = max(rh, <floating>1)
    t = r[5] * ascale
    g[0] = <floating>(r[2] * scale - off)
    g[1] = <floating>(r[1] * scale - off)
    g[2] = rh / PH
    g[3] = rw / PW
    g[4] = -rh / 2
    g[5] = -rw / 2
    g[6] = <floating>cos(t)
    g[7] = <floating>sin(t)
    grid[0] = _grid(rh, PH, sr, L)
    grid[1] = _grid(rw, PW, sr, L)
    return True


cdef inline bint _rsample(const floating* g, const Py_ssize_t* grid, Py_ssize_t ph,
                          Py_ssize_t pw, Py_ssize_t iy, Py_ssize_t ix, Py_ssize_t H,
                          Py_ssize_t W, Py_ssize_t* o, floating* l) noexcept nogil:
    """Sample (iy, ix) of bin (ph, pw): its packed corner offset and fractions (ly, lx) in l;
    False when outside the map."""
    cdef floating yy, xx
    cdef Py_ssize_t y0, y1, x0, x1
    yy = g[4] + ph * g[2] + <floating>(iy + 0.5) * g[2] / <floating>grid[0]
    xx = g[5] + pw * g[3] + <floating>(ix + 0.5) * g[3] / <floating>grid[1]
    if roi_linear(yy * g[6] - xx * g[7] + g[0], H, &y0, &y1, &l[0]) == 0 or \
            roi_linear(yy * g[7] + xx * g[6] + g[1], W, &x0, &x1, &l[1]) == 0:
        return False
    o[0] = 4 * (y0 * W + x0) + (x1 - x0) + 2 * (y1 - y0)
    return True


cdef inline void _rweights(floating ly, floating lx, floating* w) noexcept nogil:
    """The four corner weights of fractions (ly, lx), in the order of the packed offset's
    corners: (y0, x0), (y0, x1), (y1, x0), (y1, x1)."""
    w[0] = (1 - ly) * (1 - lx)
    w[1] = (1 - ly) * lx
    w[2] = ly * (1 - lx)
    w[3] = ly * lx


cdef inline floating _rval(const floating* plane, Py_ssize_t o, const floating* w,
                           Py_ssize_t W) noexcept nogil:
    """The bilinear value of a sample (packed offset o, corner weights w)."""
    cdef const floating* q = plane + (o >> 2)
    cdef Py_ssize_t sx = o & 1, sy = W if o & 2 else 0
    return w[0] * q[0] + w[1] * q[sx] + w[2] * q[sy] + w[3] * q[sy + sx]


cdef inline void _radd(floating* plane, Py_ssize_t o, const floating* w, Py_ssize_t W,
                       floating gg) noexcept nogil:
    """The adjoint of _rval: plane += gg * d value / d plane."""
    cdef floating* q = plane + (o >> 2)
    cdef Py_ssize_t sx = o & 1, sy = W if o & 2 else 0
    q[0] += gg * w[0]
    q[sx] += gg * w[1]
    q[sy] += gg * w[2]
    q[sy + sx] += gg * w[3]


cdef double _rbin_direct(const floating* plane, floating* gplane, floating gg, const floating* g,
                         const Py_ssize_t* grid, Py_ssize_t ph, Py_ssize_t pw, Py_ssize_t H,
                         Py_ssize_t W) noexcept nogil:
    """Without a table: the sum of bin (ph, pw)'s samples of ``plane``, or (gplane not NULL)
    their adjoint, gplane += gg * weights."""
    cdef Py_ssize_t iy, ix, o
    cdef floating l[2]
    cdef floating w[4]
    cdef double s = 0
    for iy in range(grid[0]):
        for ix in range(grid[1]):
            if not _rsample(g, grid, ph, pw, iy, ix, H, W, &o, l):
                continue
            _rweights(l[0], l[1], w)
            if gplane != NULL:
                _radd(gplane, o, w, W, gg)
            else:
                s += _rval(plane, o, w, W)
    return s


cdef void _rfill(RTab* t, const floating* r, double scale, double off, bint aligned,
                 double ascale, Py_ssize_t PH, Py_ssize_t PW, int sr, Py_ssize_t H,
                 Py_ssize_t W) noexcept nogil:
    """Fill one RoI's table (arrays placed by _rot_tables)."""
    cdef floating g[8]
    cdef Py_ssize_t grid[2]
    cdef Py_ssize_t ph, pw, iy, ix, e = 0
    cdef floating* wt = <floating*>t.wt
    t.n = <Py_ssize_t>r[0]
    t.inv = 0
    t.bp[0] = 0
    if _rgeom(r, scale, off, aligned, ascale, PH, PW, sr, max(H, W), g, grid) \
            and grid[0] * grid[1] > 0:
        t.inv = 1.0 / (<double>grid[0] * <double>grid[1])
    for ph in range(PH):
        for pw in range(PW):
            if t.inv > 0 and not t.direct:
                for iy in range(grid[0]):
                    for ix in range(grid[1]):
                        if _rsample(g, grid, ph, pw, iy, ix, H, W, &t.idx[e], &wt[2 * e]):
                            e += 1
            t.bp[ph * PW + pw + 1] = e


cdef Py_ssize_t _rot_tables(const floating* rois, Py_ssize_t k0, Py_ssize_t K, double scale,
                            double off, bint aligned, double ascale, Py_ssize_t PH,
                            Py_ssize_t PW, int sr, Py_ssize_t H, Py_ssize_t W, RTab* tabs,
                            void** mem, int nthreads) noexcept nogil:
    """Tables of RoIs k0..k1-1 in tabs[0:k1-k0], as many RoIs as fit TABLE_BYTES (at least
    one); returns k1 (k0 on failure). The memory is one block in mem[0] (free it)."""
    cdef floating g[8]
    cdef Py_ssize_t grid[2]
    cdef Py_ssize_t k, k1 = k0, total = 0, size, ne, nb = PH * PW
    cdef Py_ssize_t fs = sizeof(floating)
    cdef double est
    cdef char* m
    cdef RTab* t
    while k1 < K:
        t = &tabs[k1 - k0]
        t.direct = False
        ne = 0
        if _rgeom(rois + 6 * k1, scale, off, aligned, ascale, PH, PW, sr, max(H, W), g, grid):
            est = <double>nb * grid[0] * grid[1]
            if est * (sizeof(Py_ssize_t) + 2 * fs) > ROT_TABLE_MAX:
                t.direct = True
            else:
                ne = <Py_ssize_t>est
        size = (nb + 1 + ne) * sizeof(Py_ssize_t) + _al8(2 * ne * fs)
        if k1 > k0 and total + size > TABLE_BYTES:
            break
        t.ne = ne
        t.bp = <Py_ssize_t*>total                  # byte offset for now
        total += size
        k1 += 1
    m = <char*>malloc(total)
    mem[0] = m
    if m == NULL:
        return k0
    for k in range(k1 - k0):
        t = &tabs[k]
        t.bp = <Py_ssize_t*>(m + <Py_ssize_t>t.bp)
        t.idx = t.bp + nb + 1
        t.wt = <void*>(t.idx + t.ne)
    for k in prange(k1 - k0, num_threads=nthreads, schedule="dynamic"):
        _rfill(&tabs[k], rois + 6 * (k0 + k), scale, off, aligned, ascale, PH, PW, sr, H, W)
    return k1


cdef void _rot_unit(const floating* x, const floating* dy, floating* out, floating* gx,
                    const floating* rois, const RTab* t, Py_ssize_t k, Py_ssize_t c0,
                    Py_ssize_t c1, Py_ssize_t C, Py_ssize_t H, Py_ssize_t W, Py_ssize_t PH,
                    Py_ssize_t PW, double scale, double off, bint aligned, double ascale, int sr,
                    bint backward) noexcept nogil:
    """RoI k, channels [c0, c1) (at most ROT_BLOCK): forward into out, or backward into gx.
    Each table sample is decoded once for all the unit's channels."""
    cdef floating g[8]
    cdef Py_ssize_t grid[2]
    cdef Py_ssize_t c, b, e, o, nb = PH * PW, nc = c1 - c0, HW = H * W
    cdef const floating* wt = <const floating*>t.wt
    cdef const floating* q
    cdef floating* p
    cdef floating w[4]
    cdef double acc[ROT_BLOCK]
    cdef floating gg[ROT_BLOCK]
    if t.inv == 0:
        if not backward:
            for c in range(c0, c1):
                for b in range(nb):
                    out[(k * C + c) * nb + b] = 0
        return
    if t.direct:
        _rgeom(rois + 6 * k, scale, off, aligned, ascale, PH, PW, sr, max(H, W), g, grid)
        for c in range(c0, c1):
            for b in range(nb):
                if backward:
                    _rbin_direct(NULL, gx + (t.n * C + c) * HW,
                                 <floating>(dy[(k * C + c) * nb + b] * t.inv), g, grid, b // PW,
                                 b % PW, H, W)
                else:
                    out[(k * C + c) * nb + b] = <floating>(
                        _rbin_direct(x + (t.n * C + c) * HW, NULL, 0, g, grid, b // PW, b % PW,
                                     H, W) * t.inv)
        return
    for b in range(nb):
        for c in range(nc):
            acc[c] = 0
            if backward:
                gg[c] = <floating>(dy[(k * C + c0 + c) * nb + b] * t.inv)
        for e in range(t.bp[b], t.bp[b + 1]):
            o = t.idx[e]
            _rweights(wt[2 * e], wt[2 * e + 1], w)
            if backward:
                p = gx + (t.n * C + c0) * HW
                for c in range(nc):
                    _radd(p, o, w, W, gg[c])
                    p = p + HW
            else:
                q = x + (t.n * C + c0) * HW
                for c in range(nc):
                    acc[c] += _rval(q, o, w, W)
                    q = q + HW
        if not backward:
            for c in range(nc):
                out[(k * C + c0 + c) * nb + b] = <floating>(acc[c] * t.inv)


cdef int _rot(const floating* x, const floating* dy, const floating* rois, floating* out,
              floating* gx, const Py_ssize_t* order, const Py_ssize_t* seg, Py_ssize_t K,
              Py_ssize_t N, Py_ssize_t C, Py_ssize_t H, Py_ssize_t W, Py_ssize_t PH,
              Py_ssize_t PW, double scale, double off, bint aligned, double ascale, int sr,
              bint backward, Py_ssize_t cb, int nthreads) noexcept nogil:
    """Rotated RoIAlign forward (units: channel block x RoI, RoIs in image order) or backward
    (units: image x channel block, RoIs in index order: race-free, the same bits for any thread
    count), in RoI chunks whose tables fit TABLE_BYTES."""
    cdef RTab* tabs = <RTab*>malloc(max(K, 1) * sizeof(RTab))
    cdef void* mem = NULL
    cdef Py_ssize_t k0 = 0, k1, nblk = (C + cb - 1) // cb, u, k, c0, n, j
    if tabs == NULL:
        return -1
    while k0 < K:
        k1 = _rot_tables(rois, k0, K, scale, off, aligned, ascale, PH, PW, sr, H, W, tabs, &mem,
                         nthreads)
        if k1 == k0:
            free(tabs)
            return -1
        if not backward:
            for u in prange(nblk * K, num_threads=nthreads, schedule="dynamic"):
                c0 = (u // K) * cb
                k = order[u % K]
                if k >= k0 and k < k1:
                    _rot_unit(x, dy, out, gx, rois, &tabs[k - k0], k, c0, min(C, c0 + cb), C, H,
                              W, PH, PW, scale, off, aligned, ascale, sr, False)
        else:
            for u in prange(N * nblk, num_threads=nthreads, schedule="dynamic"):
                n = u // nblk
                c0 = (u % nblk) * cb
                for j in range(seg[n], seg[n + 1]):
                    k = order[j]
                    if k >= k0 and k < k1:
                        _rot_unit(x, dy, out, gx, rois, &tabs[k - k0], k, c0, min(C, c0 + cb), C,
                                  H, W, PH, PW, scale, off, aligned, ascale, sr, True)
        free(mem)
        k0 = k1
    free(tabs)
    return 0


# ---------------------------------------------------------------- PS-RoIAlign

cdef void _ps_unit(const floating* x, const floating* dy, floating* out, floating* gx,
                   const floating* rois, const Py_ssize_t* order, Py_ssize_t k0, Py_ssize_t k1,
                   Py_ssize_t n, Py_ssize_t o0, Py_ssize_t o1, Py_ssize_t C, Py_ssize_t CO,
                   Py_ssize_t H, Py_ssize_t W, Py_ssize_t PH, Py_ssize_t PW, double scale, int sr,
                   bint backward) noexcept nogil:
    """Forward: RoIs order[k0:k1] (order NULL: k0..k1 directly) x output channels [o0, o1).
    Backward: the same loops, scattering into grad_x planes of image n."""
    cdef floating g[6]
    cdef Py_ssize_t grid[2]
    cdef Py_ssize_t j, k, co, bn, nb = PH * PW, ci
    cdef Tab t
    cdef floating cnt
    for j in range(k0, k1):
        k = order[j] if order != NULL else j
        if not _geom(rois + 5 * k, scale, 0.5, False, PH, PW, sr, H, W, g, grid) \
                or grid[0] * grid[1] == 0:
            if not backward:
                for co in range(o0, o1):
                    for bn in range(nb):
                        out[(k * CO + co) * nb + bn] = 0
            continue
        cnt = <floating>(grid[0] * grid[1])
        if not _tab_alloc(&t, nb, grid[0], grid[1], sizeof(floating)):
            return
        _tab_build(&t, g, grid, PH, PW, H, W, <floating*>NULL, 0, False, False)
        if not backward:
            n = <Py_ssize_t>rois[5 * k]
        for co in range(o0, o1):
            for bn in range(nb):
                ci = co * nb + bn
                if backward:
                    _bin_scatter(gx + (n * C + ci) * H * W, W, 1, &t, bn, bn,
                                 dy[(k * CO + co) * nb + bn] / cnt)
                else:
                    out[(k * CO + co) * nb + bn] = _bin_dot(x + (n * C + ci) * H * W, W, &t,
                                                            bn, &t, bn) / cnt
        free(t.mem)


cdef void _ps(const floating* x, const floating* dy, floating* out, floating* gx,
              const floating* rois, const Py_ssize_t* order, const Py_ssize_t* seg, Py_ssize_t K,
              Py_ssize_t N, Py_ssize_t C, Py_ssize_t CO, Py_ssize_t H, Py_ssize_t W,
              Py_ssize_t PH, Py_ssize_t PW, double scale, int sr, bint backward, Py_ssize_t cb,
              int nthreads) noexcept nogil:
    cdef Py_ssize_t nblk = (CO + cb - 1) // cb, u, m, o0
    cdef Py_ssize_t units = (N if backward else K) * nblk
    for u in prange(units, num_threads=nthreads, schedule="dynamic"):
        m = u // nblk
        o0 = (u % nblk) * cb
        if backward:
            _ps_unit(x, dy, out, gx, rois, order, seg[m], seg[m + 1], m, o0, min(CO, o0 + cb),
                     C, CO, H, W, PH, PW, scale, sr, True)
        else:
            _ps_unit(x, dy, out, gx, rois, <Py_ssize_t*>NULL, m, m + 1, 0, o0,
                     min(CO, o0 + cb), C, CO, H, W, PH, PW, scale, sr, False)


# Lane path: units (image, bin) own the input channels co * PH * PW + bin (co < CO) of their
# image; those CO planes, over the rectangle the image's RoIs sample, are transposed into a
# per-thread scratch s[pixel][CO], and each RoI's bin is one separable sum with the output channels
# as vector lanes (rp_ps_dot / rp_ps_scatter in _roi_pool_simd.h), from per-RoI row tables per ph
# and column tables per pw (the same entries as _tab_build's per-bin tables). Sums run in the
# scalar kernel's order per channel; backward accumulates in RoI index order into the scratch and
# transposes into the unit's own grad_x planes (race-free, identical for any thread count).

cdef void _ps_fill(const floating* r, double scale, Py_ssize_t PH, Py_ssize_t PW, int sr,
                   Py_ssize_t H, Py_ssize_t W, Py_ssize_t* rp, Py_ssize_t* cp, Py_ssize_t* ri,
                   Py_ssize_t* ci, floating* rw, floating* cw, Py_ssize_t* rect,
                   floating* cnt) noexcept nogil:
    """One RoI's row tables (bin row ph: ri/rw[rp[ph]:rp[ph+1]]), column tables, count and the
    rows [rect[0], rect[1]) and columns [rect[2], rect[3]) they touch (empty: 0, 0)."""
    cdef floating g[6]
    cdef Py_ssize_t grid[2]
    cdef Py_ssize_t ph, pw, e, i
    rect[0] = 0; rect[1] = 0; rect[2] = 0; rect[3] = 0
    cnt[0] = 0
    if not _geom(r, scale, 0.5, False, PH, PW, sr, H, W, g, grid) or grid[0] * grid[1] == 0:
        for ph in range(PH):
            rp[ph + 1] = rp[0]
        for pw in range(PW):
            cp[pw + 1] = cp[0]
        return
    cnt[0] = <floating>(grid[0] * grid[1])
    e = rp[0]
    for ph in range(PH):
        e = _axis(g[0], g[2], ph, grid[0], H, False, ri, rw, e)
        rp[ph + 1] = e
    e = cp[0]
    for pw in range(PW):
        e = _axis(g[1], g[3], pw, grid[1], W, False, ci, cw, e)
        cp[pw + 1] = e
    if rp[PH] > rp[0]:
        rect[0] = H
        for i in range(rp[0], rp[PH]):
            rect[0] = min(rect[0], ri[i])
            rect[1] = max(rect[1], ri[i] + 1)
    if cp[PW] > cp[0]:
        rect[2] = W
        for i in range(cp[0], cp[PW]):
            rect[2] = min(rect[2], ci[i])
            rect[3] = max(rect[3], ci[i] + 1)


cdef void _ps_lane_unit(const floating* x, const floating* dy, floating* out, floating* gx,
                        const Py_ssize_t* rp, const Py_ssize_t* cp, const Py_ssize_t* ri,
                        const Py_ssize_t* ci, const floating* rw, const floating* cw,
                        const floating* cnt, const Py_ssize_t* order, Py_ssize_t j0, Py_ssize_t j1,
                        Py_ssize_t n, Py_ssize_t bn, Py_ssize_t C, Py_ssize_t CO, Py_ssize_t H,
                        Py_ssize_t W, Py_ssize_t PH, Py_ssize_t PW, const Py_ssize_t* ur,
                        bint backward, floating* xs, floating* u,
                        floating* acc) noexcept nogil:
    cdef Py_ssize_t ph = bn // PW, pw = bn % PW, nb = PH * PW, HW = H * W, j, k, co, i
    cdef Py_ssize_t a0, a1, b0, b1, sw = ur[3] - ur[2]
    cdef Py_ssize_t base = (n * C + bn) * HW, cstride = nb * HW
    if backward:                           # grad_x comes uninitialised (the output cache)
        _zero_outside(gx + base, cstride, CO, H, W, ur)
    if _area(ur) == 0:                     # nothing sampled in the map: zeros / no gradient
        if not backward:
            for j in range(j0, j1):
                for co in range(CO):
                    out[(order[j] * CO + co) * nb + bn] = 0
        return
    if not backward:
        if floating is float:
            rp_ps_in_f(x + base, cstride, CO, W, ur[0], ur[1], ur[2], ur[3], xs)
        else:
            rp_ps_in_d(x + base, cstride, CO, W, ur[0], ur[1], ur[2], ur[3], xs)
    else:
        for i in range(_area(ur) * CO):
            xs[i] = 0
    for j in range(j0, j1):
        k = order[j]
        if cnt[k] == 0:
            if not backward:
                for co in range(CO):
                    out[(k * CO + co) * nb + bn] = 0
            continue
        a0 = rp[k * (PH + 1) + ph]
        a1 = rp[k * (PH + 1) + ph + 1]
        b0 = cp[k * (PW + 1) + pw]
        b1 = cp[k * (PW + 1) + pw + 1]
        if not backward:
            if floating is float:
                rp_ps_dot_f(xs, sw, CO, ri + a0, rw + a0, a1 - a0, ci + b0, cw + b0, b1 - b0,
                            ur[0], ur[2], acc, u)
            else:
                rp_ps_dot_d(xs, sw, CO, ri + a0, rw + a0, a1 - a0, ci + b0, cw + b0, b1 - b0,
                            ur[0], ur[2], acc, u)
            for co in range(CO):
                out[(k * CO + co) * nb + bn] = acc[co] / cnt[k]
        else:
            for co in range(CO):
                acc[co] = dy[(k * CO + co) * nb + bn] / cnt[k]
            if floating is float:
                rp_ps_scatter_f(xs, sw, CO, ri + a0, rw + a0, a1 - a0, ci + b0, cw + b0, b1 - b0,
                                ur[0], ur[2], acc, u)
            else:
                rp_ps_scatter_d(xs, sw, CO, ri + a0, rw + a0, a1 - a0, ci + b0, cw + b0, b1 - b0,
                                ur[0], ur[2], acc, u)
    if backward:
        if floating is float:
            rp_ps_out_f(gx + base, cstride, CO, W, ur[0], ur[1], ur[2], ur[3], xs)
        else:
            rp_ps_out_d(gx + base, cstride, CO, W, ur[0], ur[1], ur[2], ur[3], xs)


cdef inline double _ps_moves(const Py_ssize_t* urects, Py_ssize_t N,
                            Py_ssize_t per) noexcept nogil:
    """Elements the lane path's transposes move: per image, its rectangle x ``per``."""
    cdef double m = 0
    cdef Py_ssize_t n
    for n in range(N):
        m += <double>_area(urects + 4 * n) * per
    return m


cdef inline double _ps_reads(const floating* cnt, Py_ssize_t K, Py_ssize_t per) noexcept nogil:
    """Elements the scalar path reads: per RoI, its samples per bin x ``per``."""
    cdef double m = 0
    cdef Py_ssize_t k
    for k in range(K):
        m += <double>cnt[k] * per
    return m


cdef int _ps_lanes(const floating* x, const floating* dy, floating* out, floating* gx,
                   const floating* rois, const Py_ssize_t* order, const Py_ssize_t* seg,
                   Py_ssize_t K, Py_ssize_t N, Py_ssize_t C, Py_ssize_t CO, Py_ssize_t H,
                   Py_ssize_t W, Py_ssize_t PH, Py_ssize_t PW, double scale, int sr,
                   bint backward, int nthreads) noexcept nogil:
    """PS-RoIAlign over units (image, bin) (see above): 0 done, 1 when the tables or the scratch
    would exceed the SCRATCH_BYTES bounds (the caller runs _ps), -1 out of memory."""
    cdef floating g[6]
    cdef Py_ssize_t grid[2]
    cdef Py_ssize_t k, j, n, u, tr = 0, tc = 0, need = 0, nb = PH * PW, fs = sizeof(floating)
    cdef Py_ssize_t* roff
    cdef Py_ssize_t* coff
    cdef Py_ssize_t* rp
    cdef Py_ssize_t* cp
    cdef Py_ssize_t* ri
    cdef Py_ssize_t* ci
    cdef Py_ssize_t* rects
    cdef Py_ssize_t* urects
    cdef Py_ssize_t* rr
    cdef floating* rw
    cdef floating* cw
    cdef floating* cnt
    cdef floating* xs
    cdef floating* ub
    cdef char* mem
    cdef Py_ssize_t nbytes
    if SCRATCH_BYTES <= 0 or CO <= 0:
        return 1
    roff = <Py_ssize_t*>malloc((2 * K + 2) * sizeof(Py_ssize_t))
    if roff == NULL:
        return -1
    coff = roff + K + 1
    roff[0] = 0
    coff[0] = 0
    for k in range(K):
        roff[k + 1] = roff[k]
        coff[k + 1] = coff[k]
        if _geom(rois + 5 * k, scale, 0.5, False, PH, PW, sr, H, W, g, grid):
            roff[k + 1] += PH * 2 * grid[0]
            coff[k + 1] += PW * 2 * grid[1]
    tr = roff[K]
    tc = coff[K]
    nbytes = ((tr + tc + K * (PH + PW + 6) + 4 * N) * sizeof(Py_ssize_t) + (tr + tc + K) * fs)
    if nbytes > 4 * SCRATCH_BYTES:
        free(roff)
        return 1
    mem = <char*>malloc(nbytes)
    if mem == NULL:
        free(roff)
        return -1
    ri = <Py_ssize_t*>mem
    ci = ri + tr
    rp = ci + tc
    cp = rp + K * (PH + 1)
    rects = cp + K * (PW + 1)
    urects = rects + 4 * K
    rw = <floating*>(urects + 4 * N)
    cw = rw + tr
    cnt = cw + tc
    for k in prange(K, num_threads=_setup_threads(K, nthreads), schedule="static"):
        rp[k * (PH + 1)] = roff[k]
        cp[k * (PW + 1)] = coff[k]
        _ps_fill(rois + 5 * k, scale, PH, PW, sr, H, W, rp + k * (PH + 1), cp + k * (PW + 1),
                 ri, ci, rw, cw, rects + 4 * k, cnt + k)
    free(roff)
    for n in range(N):                     # rows and columns any RoI of image n samples
        rr = urects + 4 * n
        rr[0] = H; rr[1] = 0; rr[2] = W; rr[3] = 0
        for j in range(seg[n], seg[n + 1]):
            k = order[j]
            if rects[4 * k + 1] > rects[4 * k]:
                rr[0] = min(rr[0], rects[4 * k]); rr[1] = max(rr[1], rects[4 * k + 1])
            if rects[4 * k + 3] > rects[4 * k + 2]:
                rr[2] = min(rr[2], rects[4 * k + 2]); rr[3] = max(rr[3], rects[4 * k + 3])
        need = max(need, _area(rr))
    if need * CO * fs > SCRATCH_BYTES or _ps_moves(urects, N, CO * nb) > LANE_READS * _ps_reads(
            cnt, K, 4 * nb * CO):
        free(mem)
        return 1
    nbytes = max(need, 1) * CO + 2 * CO            # per thread: scratch, u, acc
    xs = <floating*>malloc(nthreads * nbytes * fs)
    if xs == NULL:
        free(mem)
        return -1
    for u in prange(N * nb, num_threads=nthreads, schedule="dynamic"):
        n = u // nb
        ub = xs + threadid() * nbytes
        _ps_lane_unit(x, dy, out, gx, rp, cp, ri, ci, rw, cw, cnt, order, seg[n], seg[n + 1], n,
                      u % nb, C, CO, H, W, PH, PW, urects + 4 * n, backward, ub,
                      ub + max(need, 1) * CO, ub + max(need, 1) * CO + CO)
    free(xs)
    free(mem)
    return 0


# ---------------------------------------------------------------- RoIPool (torchvision)

cdef inline bint _pool_window(const floating* r, double scale, Py_ssize_t ph, Py_ssize_t pw,
                              Py_ssize_t PH, Py_ssize_t PW, Py_ssize_t H, Py_ssize_t W,
                              Py_ssize_t* win) noexcept nogil:
    """[hstart, hend, wstart, wend] of bin (ph, pw); False for a non-finite RoI."""
    cdef double v[4]
    cdef int i
    cdef Py_ssize_t xs, ys, xe, ye
    cdef floating bh, bw
    if not _finite4(r):
        return False
    for i in range(4):
        v[i] = round(r[i + 1] * scale)
        v[i] = min(max(v[i], -COORD_MAX), COORD_MAX)
    xs = <Py_ssize_t>v[0]
    ys = <Py_ssize_t>v[1]
    xe = <Py_ssize_t>v[2]
    ye = <Py_ssize_t>v[3]
    bh = <floating>max(ye - ys + 1, 1) / <floating>PH
    bw = <floating>max(xe - xs + 1, 1) / <floating>PW
    win[0] = min(max(<Py_ssize_t>floor(ph * bh) + ys, 0), H)
    win[1] = min(max(<Py_ssize_t>ceil((ph + 1) * bh) + ys, 0), H)
    win[2] = min(max(<Py_ssize_t>floor(pw * bw) + xs, 0), W)
    win[3] = min(max(<Py_ssize_t>ceil((pw + 1) * bw) + xs, 0), W)
    return True


cdef inline Py_ssize_t _pool_argmax(const floating* plane, Py_ssize_t W, const Py_ssize_t* win,
                                    floating* best) noexcept nogil:
    cdef Py_ssize_t h, w, arg = -1
    cdef floating m = 0 if (win[1] <= win[0] or win[3] <= win[2]) else <floating>(-FLT_MAX)
    for h in range(win[0], win[1]):
        for w in range(win[2], win[3]):
            if plane[h * W + w] > m:
                m = plane[h * W + w]
                arg = h * W + w
    best[0] = m
    return arg


# Units (image, RP_L = 16 channels): the rows and columns any of the image's RoIs reads (their
# union rectangle) are transposed once into a per-thread channel-block-last scratch, and every bin
# is a lane-parallel max over it (_roi_pool_simd.h), in the scalar kernel's order and comparison,
# so values, argmaxes (first maximum in row-major order), NaN and signed-zero handling are those
# of the scalar loop bit for bit. The forward visits an image's RoIs in spatial order (_segments:
# neighbours share the scratch rows they read; each output is independent of the order).
# Backward gradients accumulate in a second scratch in RoI index order (the scalar order) and
# are transposed into the unit's own grad_x planes: race-free and bitwise identical for any
# thread count. A union larger than SCRATCH_BYTES falls back to
# transposing each RoI's rectangle (scattering gradients straight into grad_x, same order), and a
# RoI larger than that to the scalar loop over its planes.

cdef extern from "_roi_pool_simd.h" nogil:
    enum: RP_L
    void rp_pool_row_f(const float* s, Py_ssize_t sw, Py_ssize_t h0, Py_ssize_t h1,
                       const Py_ssize_t* ws, const Py_ssize_t* we, Py_ssize_t PW, Py_ssize_t sx0,
                       float* out, Py_ssize_t* idx, int track)
    void rp_pool_row_d(const double* s, Py_ssize_t sw, Py_ssize_t h0, Py_ssize_t h1,
                       const Py_ssize_t* ws, const Py_ssize_t* we, Py_ssize_t PW, Py_ssize_t sx0,
                       double* out, Py_ssize_t* idx, int track)
    void rp_tr_in_f(const float* x, Py_ssize_t plane, Py_ssize_t nc, Py_ssize_t W, Py_ssize_t y0,
                    Py_ssize_t y1, Py_ssize_t x0, Py_ssize_t x1, float* s)
    void rp_tr_in_d(const double* x, Py_ssize_t plane, Py_ssize_t nc, Py_ssize_t W,
                    Py_ssize_t y0, Py_ssize_t y1, Py_ssize_t x0, Py_ssize_t x1, double* s)
    void rp_tr_out_f(float* x, Py_ssize_t plane, Py_ssize_t nc, Py_ssize_t W, Py_ssize_t y0,
                     Py_ssize_t y1, Py_ssize_t x0, Py_ssize_t x1, const float* s)
    void rp_tr_out_d(double* x, Py_ssize_t plane, Py_ssize_t nc, Py_ssize_t W, Py_ssize_t y0,
                     Py_ssize_t y1, Py_ssize_t x0, Py_ssize_t x1, const double* s)
    void rp_ps_in_f(const float* x, Py_ssize_t cstride, Py_ssize_t L, Py_ssize_t W,
                    Py_ssize_t y0, Py_ssize_t y1, Py_ssize_t x0, Py_ssize_t x1, float* s)
    void rp_ps_in_d(const double* x, Py_ssize_t cstride, Py_ssize_t L, Py_ssize_t W,
                    Py_ssize_t y0, Py_ssize_t y1, Py_ssize_t x0, Py_ssize_t x1, double* s)
    void rp_ps_out_f(float* x, Py_ssize_t cstride, Py_ssize_t L, Py_ssize_t W, Py_ssize_t y0,
                     Py_ssize_t y1, Py_ssize_t x0, Py_ssize_t x1, const float* s)
    void rp_ps_out_d(double* x, Py_ssize_t cstride, Py_ssize_t L, Py_ssize_t W, Py_ssize_t y0,
                     Py_ssize_t y1, Py_ssize_t x0, Py_ssize_t x1, const double* s)
    void rp_ps_dot_f(const float* s, Py_ssize_t sw, Py_ssize_t L, const Py_ssize_t* ri,
                     const float* rw, Py_ssize_t nr, const Py_ssize_t* ci, const float* cw,
                     Py_ssize_t ncol, Py_ssize_t y0, Py_ssize_t x0, float* acc, float* u)
    void rp_ps_dot_d(const double* s, Py_ssize_t sw, Py_ssize_t L, const Py_ssize_t* ri,
                     const double* rw, Py_ssize_t nr, const Py_ssize_t* ci, const double* cw,
                     Py_ssize_t ncol, Py_ssize_t y0, Py_ssize_t x0, double* acc, double* u)
    void rp_ps_scatter_f(float* s, Py_ssize_t sw, Py_ssize_t L, const Py_ssize_t* ri,
                         const float* rw, Py_ssize_t nr, const Py_ssize_t* ci, const float* cw,
                         Py_ssize_t ncol, Py_ssize_t y0, Py_ssize_t x0, const float* gg, float* u)
    void rp_ps_scatter_d(double* s, Py_ssize_t sw, Py_ssize_t L, const Py_ssize_t* ri,
                         const double* rw, Py_ssize_t nr, const Py_ssize_t* ci,
                         const double* cw, Py_ssize_t ncol, Py_ssize_t y0, Py_ssize_t x0,
                         const double* gg, double* u)


cdef inline void _tr_in(const floating* x, Py_ssize_t plane, Py_ssize_t nc, Py_ssize_t W,
                        const Py_ssize_t* r, floating* s) noexcept nogil:
    if floating is float:
        rp_tr_in_f(x, plane, nc, W, r[0], r[1], r[2], r[3], s)
    else:
        rp_tr_in_d(x, plane, nc, W, r[0], r[1], r[2], r[3], s)


cdef void _pool_fill(const floating* r, double scale, Py_ssize_t PH, Py_ssize_t PW, Py_ssize_t H,
                     Py_ssize_t W, Py_ssize_t* w) noexcept nogil:
    """w = [y0, y1, x0, x1, hstart[PH], hend[PH], wstart[PW], wend[PW]] of one RoI, with
    [y0, y1) x [x0, x1) the union of its non-empty bins (all 0: it reads nothing)."""
    cdef Py_ssize_t win[4]
    cdef Py_ssize_t ph, pw, i
    cdef Py_ssize_t* hs = w + 4
    cdef Py_ssize_t* ws = w + 4 + 2 * PH
    for i in range(4 + 2 * PH + 2 * PW):
        w[i] = 0
    if not _finite4(r):
        return
    for ph in range(PH):
        _pool_window(r, scale, ph, 0, PH, PW, H, W, win)
        hs[ph] = win[0]
        hs[PH + ph] = win[1]
    for pw in range(PW):
        _pool_window(r, scale, 0, pw, PH, PW, H, W, win)
        ws[pw] = win[2]
        ws[PW + pw] = win[3]
    w[0] = H
    w[2] = W
    for ph in range(PH):
        if hs[PH + ph] > hs[ph]:
            w[0] = min(w[0], hs[ph])
            w[1] = max(w[1], hs[PH + ph])
    for pw in range(PW):
        if ws[PW + pw] > ws[pw]:
            w[2] = min(w[2], ws[pw])
            w[3] = max(w[3], ws[PW + pw])
    if w[1] <= w[0] or w[3] <= w[2]:
        w[0] = 0; w[1] = 0; w[2] = 0; w[3] = 0


cdef inline Py_ssize_t _area(const Py_ssize_t* r) noexcept nogil:
    return (r[1] - r[0]) * (r[3] - r[2]) if (r[1] > r[0] and r[3] > r[2]) else 0


cdef void _zero_outside(floating* p, Py_ssize_t plane, Py_ssize_t nc, Py_ssize_t H,
                       Py_ssize_t W, const Py_ssize_t* r) noexcept nogil:
    """Zero planes p + c * plane (c < nc) outside the rectangle r (everywhere if it is empty):
    the parts of a unit's grad_x planes that its scratch does not write back."""
    cdef Py_ssize_t c, y, i
    cdef floating* q
    cdef bint empty = _area(r) == 0
    for c in range(nc):
        q = p + c * plane
        for y in range(H):
            if empty or y < r[0] or y >= r[1]:
                for i in range(W):
                    q[y * W + i] = 0
            else:
                for i in range(r[2]):
                    q[y * W + i] = 0
                for i in range(r[3], W):
                    q[y * W + i] = 0


cdef void _pool_unit(const floating* x, const floating* dy, floating* out, floating* gx,
                     const Py_ssize_t* wins, Py_ssize_t wstride, const Py_ssize_t* order,
                     Py_ssize_t j0, Py_ssize_t j1, Py_ssize_t n, Py_ssize_t c0, Py_ssize_t C,
                     Py_ssize_t H, Py_ssize_t W, Py_ssize_t PH, Py_ssize_t PW,
                     const Py_ssize_t* urect, Py_ssize_t cap, bint backward, floating* xs,
                     floating* gs, bint stream) noexcept nogil:
    """Image n, channels [c0, c0 + RP_L) ∩ [0, C), RoIs order[j0:j1] (see above). cap: scratch
    pixels (0: the scalar loop only); ``stream``: outputs with non-temporal stores."""
    cdef Py_ssize_t nc = min(<Py_ssize_t>RP_L, C - c0), HW = H * W, nb = PH * PW
    cdef Py_ssize_t j, k, l, ph, pw, b, sw = 0, sy0 = 0, sx0 = 0, i, arg, y, xx
    cdef const Py_ssize_t* w
    cdef const Py_ssize_t* hs
    cdef const Py_ssize_t* ws
    cdef Py_ssize_t* idx = <Py_ssize_t*>malloc(nb * RP_L * sizeof(Py_ssize_t))
    cdef floating* val = <floating*>malloc(nb * RP_L * sizeof(floating))
    cdef Py_ssize_t win[4]
    cdef Py_ssize_t zr[4]
    cdef floating best
    cdef const floating* xn = x + (n * C + c0) * HW
    cdef const floating* g
    cdef bint whole = _area(urect) > 0 and _area(urect) <= cap
    cdef bint lanes
    zr[0] = 0; zr[1] = 0; zr[2] = 0; zr[3] = 0
    if idx == NULL or val == NULL:
        cap = 0                                # the scalar loop only
        whole = False
    if backward:                           # grad_x comes uninitialised (the output cache)
        _zero_outside(gx + (n * C + c0) * HW, HW, nc, H, W, urect if whole else zr)
    if whole:
        _tr_in(xn, HW, nc, W, urect, xs)
        if backward:
            for i in range(_area(urect) * RP_L):
                gs[i] = 0
    for j in range(j0, j1):
        k = order[j]
        w = wins + k * wstride
        hs = w + 4
        ws = w + 4 + 2 * PH
        if _area(w) == 0:                      # reads nothing: zeros
            if not backward:
                for l in range(nc):
                    for b in range(nb):
                        out[(k * C + c0 + l) * nb + b] = 0
            continue
        lanes = True
        if whole:
            sy0 = urect[0]; sx0 = urect[2]; sw = urect[3] - urect[2]
        elif _area(w) <= cap:
            _tr_in(xn, HW, nc, W, w, xs)
            sy0 = w[0]; sx0 = w[2]; sw = w[3] - w[2]
        else:
            lanes = False
        if not lanes:
            for ph in range(PH):
                for pw in range(PW):
                    b = ph * PW + pw
                    win[0] = hs[ph]; win[1] = hs[PH + ph]; win[2] = ws[pw]; win[3] = ws[PW + pw]
                    for l in range(nc):
                        best = 0
                        arg = _pool_argmax(xn + l * HW, W, win, &best)
                        if backward:
                            if arg >= 0:
                                gx[(n * C + c0 + l) * HW + arg] += dy[(k * C + c0 + l) * nb + b]
                        else:
                            out[(k * C + c0 + l) * nb + b] = best
            continue
        for ph in range(PH):
            if floating is float:
                if backward:
                    rp_pool_row_f(xs, sw, hs[ph] - sy0, hs[PH + ph] - sy0, ws, ws + PW, PW, sx0,
                                  val + ph * PW * RP_L, idx + ph * PW * RP_L, 1)
                else:
                    rp_pool_row_f(xs, sw, hs[ph] - sy0, hs[PH + ph] - sy0, ws, ws + PW, PW, sx0,
                                  val + ph * PW * RP_L, idx, 0)
            else:
                if backward:
                    rp_pool_row_d(xs, sw, hs[ph] - sy0, hs[PH + ph] - sy0, ws, ws + PW, PW, sx0,
                                  val + ph * PW * RP_L, idx + ph * PW * RP_L, 1)
                else:
                    rp_pool_row_d(xs, sw, hs[ph] - sy0, hs[PH + ph] - sy0, ws, ws + PW, PW, sx0,
                                  val + ph * PW * RP_L, idx, 0)
        if not backward:                       # the RoI's block of out is contiguous
            if floating is float:
                fn_roi_tile_out_f(val, nb, nc, out + (k * C + c0) * nb, stream)
            else:
                fn_roi_tile_out_d(val, nb, nc, out + (k * C + c0) * nb, stream)
            continue
        # per channel, bins in order (the scalar accumulation order), grad_out read contiguously
        for l in range(nc):
            g = dy + (k * C + c0 + l) * nb
            for b in range(nb):
                i = idx[b * RP_L + l]
                if i < 0:
                    continue
                if whole:
                    gs[i * RP_L + l] += g[b]
                else:
                    y = sy0 + i // sw
                    xx = sx0 + i % sw
                    gx[(n * C + c0 + l) * HW + y * W + xx] += g[b]
    if whole and backward:
        if floating is float:
            rp_tr_out_f(gx + (n * C + c0) * HW, HW, nc, W, urect[0], urect[1], urect[2],
                        urect[3], gs)
        else:
            rp_tr_out_d(gx + (n * C + c0) * HW, HW, nc, W, urect[0], urect[1], urect[2],
                        urect[3], gs)
    free(idx)
    free(val)


cdef Py_ssize_t _pool_prep(const floating* rois, const Py_ssize_t* order, const Py_ssize_t* seg,
                           Py_ssize_t K, Py_ssize_t N, Py_ssize_t H, Py_ssize_t W, Py_ssize_t PH,
                           Py_ssize_t PW, double scale, Py_ssize_t cap, Py_ssize_t* wins,
                           Py_ssize_t* urects, int nthreads) noexcept nogil:
    """Every RoI's windows (_pool_fill) into wins, each image's union rectangle into urects;
    returns the most scratch pixels a unit uses (unions up to cap, else RoIs up to cap)."""
    cdef Py_ssize_t ws_ = 4 + 2 * PH + 2 * PW, k, j, n, a, ua, need = 0
    cdef Py_ssize_t* r
    for k in prange(K, num_threads=_setup_threads(K, nthreads), schedule="static"):
        _pool_fill(rois + 5 * k, scale, PH, PW, H, W, wins + k * ws_)
    for n in range(N):
        r = urects + 4 * n
        r[0] = H; r[1] = 0; r[2] = W; r[3] = 0
        for j in range(seg[n], seg[n + 1]):
            k = order[j]
            if _area(wins + k * ws_) > 0:
                r[0] = min(r[0], wins[k * ws_]); r[1] = max(r[1], wins[k * ws_ + 1])
                r[2] = min(r[2], wins[k * ws_ + 2]); r[3] = max(r[3], wins[k * ws_ + 3])
        ua = _area(r)
        if ua <= cap:
            need = max(need, ua)
        else:
            for j in range(seg[n], seg[n + 1]):
                a = _area(wins + order[j] * ws_)
                if a <= cap:
                    need = max(need, a)
    return need


cdef void _pool(const floating* x, const floating* dy, floating* out, floating* gx,
                const Py_ssize_t* wins, const Py_ssize_t* urects, const Py_ssize_t* order,
                const Py_ssize_t* seg, Py_ssize_t N, Py_ssize_t C, Py_ssize_t H, Py_ssize_t W,
                Py_ssize_t PH, Py_ssize_t PW, bint backward, Py_ssize_t cap, floating* scratch,
                Py_ssize_t per_thread, int nthreads) noexcept nogil:
    """RoIPool forward/backward over units (image, RP_L channels); scratch: per_thread elements
    per thread (x's block, then grad_x's when backward). Outputs of STREAM_BYTES or more: non-
    temporal stores, fenced per unit."""
    cdef Py_ssize_t ws_ = 4 + 2 * PH + 2 * PW, nblk = (C + RP_L - 1) // RP_L, u, n
    cdef Py_ssize_t fs = sizeof(floating)
    cdef bint stream = not backward and seg[N] * C * PH * PW * fs >= STREAM_BYTES
    cdef floating* xs
    for u in prange(N * nblk, num_threads=nthreads, schedule="dynamic"):
        n = u // nblk
        xs = scratch + threadid() * per_thread
        _pool_unit(x, dy, out, gx, wins, ws_, order, seg[n], seg[n + 1], n, (u % nblk) * RP_L,
                   C, H, W, PH, PW, urects + 4 * n, cap, backward, xs,
                   xs + per_thread // 2 if backward else <floating*>NULL, stream)
        if stream:
            fn_roi_sfence()


def _pool_run(x, dy, rois, out, gx, Py_ssize_t N, Py_ssize_t C, Py_ssize_t H, Py_ssize_t W,
              Py_ssize_t PH, Py_ssize_t PW, double scale, bint backward, int nthreads):
    """RoIPool: windows, union rectangles and the per-thread scratch (from the output cache, so
    that repeated calls do not fault fresh pages in), then the units."""
    cdef Py_ssize_t K = rois.shape[0], ws_ = 4 + 2 * PH + 2 * PW, need, per
    # forward: neighbouring RoIs in turn (they share the scratch rows they read); backward: index
    # order, the scalar scan's order of the grad_x sums
    order, seg = _segments(rois, N, None if backward else scale)
    wins = _cache.empty((max(K, 1), ws_), np.intp)
    urects = np.empty((max(N, 1), 4), np.intp)
    cdef Py_ssize_t fs = x.dtype.itemsize
    cdef Py_ssize_t cap = SCRATCH_BYTES // (RP_L * fs * (2 if backward else 1))
    cdef void* pr = _p(rois)
    cdef Py_ssize_t* pw_ = <Py_ssize_t*>_p(wins)
    cdef Py_ssize_t* pu = <Py_ssize_t*>_p(urects)
    cdef Py_ssize_t* po = <Py_ssize_t*>_p(order)
    cdef Py_ssize_t* ps = <Py_ssize_t*>_p(seg)
    cdef bint f32 = x.dtype == np.float32
    with nogil:
        if f32:
            need = _pool_prep(<float*>pr, po, ps, K, N, H, W, PH, PW, scale, cap, pw_, pu,
                              nthreads)
        else:
            need = _pool_prep(<double*>pr, po, ps, K, N, H, W, PH, PW, scale, cap, pw_, pu,
                              nthreads)
    per = max(need, 1) * RP_L * (2 if backward else 1)
    scratch = _cache.empty((nthreads * per,), x.dtype)
    cdef void* px = _p(x)
    cdef void* pd = _p(dy)
    cdef void* pout = _p(out)
    cdef void* pg = _p(gx)
    cdef void* psc = _p(scratch)
    with nogil:
        if f32:
            _pool(<float*>px, <float*>pd, <float*>pout, <float*>pg, pw_, pu, po, ps, N, C, H, W,
                  PH, PW, backward, cap, <float*>psc, per, nthreads)
        else:
            _pool(<double*>px, <double*>pd, <double*>pout, <double*>pg, pw_, pu, po, ps, N, C, H,
                  W, PH, PW, backward, cap, <double*>psc, per, nthreads)


# ---------------------------------------------------------------- deformable RoI pooling (mmcv)

cdef inline void _deform_shifts(const floating* g, const floating* offset, Py_ssize_t k,
                                Py_ssize_t nb, floating gamma, floating* dyx) noexcept nogil:
    """dyx[b] = gamma * roi_h * offset[k, 1, b], dyx[nb + b] = gamma * roi_w * offset[k, 0, b]."""
    cdef Py_ssize_t b
    for b in range(nb):
        if offset == NULL:
            dyx[b] = 0
            dyx[nb + b] = 0
        else:
            dyx[b] = gamma * g[4] * offset[(2 * k + 1) * nb + b]
            dyx[nb + b] = gamma * g[5] * offset[2 * k * nb + b]


cdef void _dfm_reduce(const floating* rois, const floating* mask, const floating* part,
                      floating* goff, floating* gmask, Py_ssize_t k, Py_ssize_t nblk,
                      Py_ssize_t H, Py_ssize_t W, Py_ssize_t PH, Py_ssize_t PW, double scale,
                      int sr, floating gamma) noexcept nogil:
    """grad_offset / grad_mask of RoI k from the gradient pass's per-block sums (in block
    order)."""
    cdef floating g[6]
    cdef Py_ssize_t grid[2]
    cdef Py_ssize_t b, i, nb = PH * PW
    cdef floating cnt, m, sm, sy, sx
    cdef const floating* q
    if not _geom(rois + 5 * k, scale, 0.5, False, PH, PW, sr, H, W, g, grid) \
            or grid[0] * grid[1] == 0:
        return
    cnt = <floating>(grid[0] * grid[1])
    for b in range(nb):
        sm = 0
        sy = 0
        sx = 0
        for i in range(nblk):
            q = part + ((k * nb + b) * nblk + i) * 3
            sm = sm + q[0]
            sy = sy + q[1]
            sx = sx + q[2]
        m = mask[k * nb + b] if mask != NULL else 1
        if gmask != NULL:
            gmask[k * nb + b] = sm / cnt
        if goff != NULL:
            goff[(2 * k + 1) * nb + b] = m * gamma * g[4] * sy / cnt
            goff[2 * k * nb + b] = m * gamma * g[5] * sx / cnt


# ---------------------------------------------------------------- Python entry points

cdef double SPATIAL_BAND = 16     # feature rows per band of _segments' spatial order


cdef struct SKey:
    # a RoI's sort key in _segments: image, band of SPATIAL_BAND rows, centre column, index
    Py_ssize_t b
    double band
    double xc
    Py_ssize_t k


cdef inline bint _nan_lt(double a, double b) noexcept nogil:
    """a < b with NaN after every number (numpy's sort order)."""
    if a != a:
        return False
    return b != b or a < b


cdef inline bint _key_lt(const SKey* p, const SKey* q) noexcept nogil:
    if p.b != q.b:
        return p.b < q.b
    if _nan_lt(p.band, q.band) or _nan_lt(q.band, p.band):
        return _nan_lt(p.band, q.band)
    if _nan_lt(p.xc, q.xc) or _nan_lt(q.xc, p.xc):
        return _nan_lt(p.xc, q.xc)
    return p.k < q.k


cdef void _key_sort(SKey* a, SKey* t, Py_ssize_t n) noexcept nogil:
    """Merge sort of a[0:n] by _key_lt (t: n elements of room); insertion sort below 16."""
    cdef Py_ssize_t i, j, m, o
    cdef SKey v
    if n < 16:
        for i in range(1, n):
            v = a[i]
            j = i
            while j > 0 and _key_lt(&v, &a[j - 1]):
                a[j] = a[j - 1]
                j -= 1
            a[j] = v
        return
    m = n // 2
    _key_sort(a, t, m)
    _key_sort(a + m, t, n - m)
    i, j, o = 0, m, 0
    while i < m and j < n:
        if _key_lt(&a[j], &a[i]):
            t[o] = a[j]
            j += 1
        else:
            t[o] = a[i]
            i += 1
        o += 1
    while i < m:
        t[o] = a[i]
        i += 1
        o += 1
    memcpy(a, t, o * sizeof(SKey))


cdef int _order(const floating* rois, Py_ssize_t K, Py_ssize_t width, Py_ssize_t N, double scale,
                bint spatial, Py_ssize_t* order, Py_ssize_t* seg) noexcept nogil:
    """_segments' work: keys, a stable merge sort, per-image bounds; -1 out of memory. RoIs
    are rows of ``width`` (5: boxes; 6: rotated, not sorted spatially)."""
    cdef SKey* a = <SKey*>malloc(2 * max(K, 1) * sizeof(SKey))
    cdef const floating* r
    cdef Py_ssize_t k, n
    if a == NULL:
        return -1
    for k in range(K):
        r = rois + width * k
        a[k].b = <Py_ssize_t>r[0]
        a[k].k = k
        a[k].band = 0
        a[k].xc = 0
        if spatial:
            a[k].band = floor(((<double>r[2] + r[4]) * (0.5 * scale)) / SPATIAL_BAND)
            a[k].xc = (<double>r[1] + r[3]) * (0.5 * scale)
    _key_sort(a, a + K, K)
    for n in range(N + 1):
        seg[n] = 0
    for k in range(K):
        order[k] = a[k].k
        seg[a[k].b + 1] += 1
    for n in range(N):
        seg[n + 1] += seg[n]
    free(a)
    return 0


def _segments(rois, Py_ssize_t N, scale=None):
    """RoI indices grouped by image (stable) and the per-image segment bounds; with the spatial
    scale, in spatial order within each image instead: by image, band of SPATIAL_BAND feature
    rows of the box centre, then centre column, then index (so neighbouring RoIs share the
    pixels they read; deterministic: it depends on rois only). rois: validated batch indices."""
    cdef Py_ssize_t K = rois.shape[0], width = rois.shape[1]
    order = np.empty(K, dtype=np.intp)
    seg = np.empty(N + 1, dtype=np.intp)
    cdef void* pr = _p(rois)
    cdef Py_ssize_t* po = <Py_ssize_t*>_p(order)
    cdef Py_ssize_t* ps = <Py_ssize_t*>_p(seg)
    cdef double sc = 0 if scale is None else scale
    cdef bint spatial = scale is not None and width == 5, f32 = rois.dtype == np.float32
    cdef int rc
    with nogil:
        if f32:
            rc = _order(<float*>pr, K, width, N, sc, spatial, po, ps)
        else:
            rc = _order(<double*>pr, K, width, N, sc, spatial, po, ps)
    if rc != 0:
        raise MemoryError("out of memory ordering the RoIs")
    return order, seg


def _bwd_block(Py_ssize_t N, Py_ssize_t C, int nthreads):
    """Channels per backward unit: enough units for the threads (results do not depend on it)."""
    return max(1, min(32, (N * C) // max(1, 4 * nthreads)))


cdef inline void* _p(cnp.ndarray a):
    return NULL if a is None else <void*>cnp.PyArray_DATA(a)


# The contracts of fastnorm._kernels (RoiAlignForward, ...): rois (K, 5) with validated batch
# indices, every array C-contiguous.

def roi_align_forward(x, rois, Py_ssize_t pooled_h, Py_ssize_t pooled_w, double spatial_scale,
                      int sampling_ratio, bint aligned, int mode, bint channels_last, int nthreads):
    """out (K, C, PH, PW) or (K, PH, PW, C) from x (N, C, H, W) or (N, H, W, C)."""
    cdef Py_ssize_t K = rois.shape[0], N, C, H, W, PH = pooled_h, PW = pooled_w
    if channels_last:
        N, H, W, C = x.shape
        out = _cache.empty((K, PH, PW, C), x.dtype)
    else:
        N, C, H, W = x.shape
        out = _cache.empty((K, C, PH, PW), x.dtype)
    if out.size == 0:
        return out
    if H * W == 0:
        out[...] = 0
        return out
    _align(x, None, rois, out, None, N, C, H, W, PH, PW, spatial_scale, sampling_ratio, aligned,
           mode, channels_last, False, nthreads)
    return out


def roi_align_backward(grad_out, rois, x, input_shape, Py_ssize_t pooled_h,
                       Py_ssize_t pooled_w, double spatial_scale, int sampling_ratio, bint aligned,
                       int mode, bint channels_last, bint deterministic, int nthreads):
    """grad_x of roi_align (x needed for MODE_MAX only; always deterministic on the CPU)."""
    cdef Py_ssize_t N, C, H, W
    if channels_last:
        N, H, W, C = input_shape
    else:
        N, C, H, W = input_shape
    if mode == MODE_MAX or rois.shape[0] == 0 or np.prod(input_shape) == 0:
        gx = np.zeros(input_shape, dtype=grad_out.dtype)
        if gx.size == 0 or rois.shape[0] == 0:
            return gx
    else:
        gx = _cache.empty(input_shape, grad_out.dtype)     # every element written (_avg_unit)
    _align(x, grad_out, rois, None, gx, N, C, H, W, pooled_h, pooled_w, spatial_scale,
           sampling_ratio, aligned, mode, channels_last, True, nthreads)
    return gx


def _align(x, dy, rois, out, gx, Py_ssize_t N, Py_ssize_t C, Py_ssize_t H, Py_ssize_t W,
           Py_ssize_t PH, Py_ssize_t PW, double scale, int sr, bint aligned, int mode, bint cl,
           bint backward, int nthreads, subset=None, deform=None):
    """The RoIAlign kernels on all of rois, or (MODE_AVG) on the rows ``subset`` only: outputs
    and grad_out rows at those indices (multi_scale_roi_align: one pyramid level's RoIs).
    ``deform`` (MODE_AVG, aligned, NCHW): (offset, mask, gamma, part), deformable RoI pooling's
    per-bin tables and mask (Deform); with ``part`` its offset/mask gradient pass."""
    cdef Py_ssize_t K = rois.shape[0], cb
    cdef Deform d
    cdef Deform* pdf = NULL
    if deform is not None:
        offset, mask, gamma, part = deform
        d.offset = _p(offset)
        d.mask = _p(mask)
        d.gamma = gamma
        d.part = _p(part)
        d.nblk = 0 if part is None else part.shape[2]
        d.dtabs = NULL
        pdf = &d
    if subset is None:
        order, seg = _segments(rois, N, None if mode == MODE_MAX else scale)
    else:
        order, seg = _segments(rois[subset], N, scale)
        order = np.ascontiguousarray(subset[order], dtype=np.intp)
        K = len(order)
    cdef double off = 0.5 if aligned else 0.0
    cdef void* px = _p(x)
    cdef void* pd = _p(dy)
    cdef void* pr = _p(rois)
    cdef void* po = _p(out)
    cdef void* pg = _p(gx)
    cdef Py_ssize_t* pod = <Py_ssize_t*>_p(order)
    cdef Py_ssize_t* ps = <Py_ssize_t*>_p(seg)
    cdef bint f32 = rois.dtype == np.float32
    cdef int rc = 0
    scratch = None
    if mode != MODE_MAX and (backward or not cl):
        scratch = _cache.empty((max(nthreads, 1), _cv_per(H, W, PH, PW, rois.itemsize)),
                                rois.dtype)
    cdef void* psc = _p(scratch)
    if backward:
        cb = _bwd_block(N, C, nthreads) if cl else min(4, _bwd_block(N, C, nthreads))
    else:
        cb = min(C, 64)
    with nogil:
        if mode == MODE_MAX:
            if f32:
                _align_max(<float*>px, <float*>pd, <float*>pr, <float*>po, <float*>pg, pod, ps, K,
                           N, C, H, W, PH, PW, scale, off, not aligned, sr, cl, backward, cb,
                           nthreads)
            else:
                _align_max(<double*>px, <double*>pd, <double*>pr, <double*>po, <double*>pg, pod,
                           ps, K, N, C, H, W, PH, PW, scale, off, not aligned, sr, cl, backward,
                           cb, nthreads)
        elif f32:
            rc = _align_avg(<float*>px, <float*>pd, <float*>pr, <float*>po, <float*>pg, pod, ps,
                            K, N, C, H, W, PH, PW, scale, off, not aligned, sr, cl, backward,
                            pdf, <float*>psc, nthreads)
        else:
            rc = _align_avg(<double*>px, <double*>pd, <double*>pr, <double*>po, <double*>pg, pod,
                            ps, K, N, C, H, W, PH, PW, scale, off, not aligned, sr, cl, backward,
                            pdf, <double*>psc, nthreads)
    if rc != 0:
        raise MemoryError(("roi_align" if deform is None else "deform_roi_pool")
                          + ": out of memory for the sampling tables")


def roi_align_rotated_forward(x, rois, Py_ssize_t pooled_h, Py_ssize_t pooled_w,
                              double spatial_scale, int sampling_ratio, bint aligned,
                              double angle_scale, int nthreads):
    """out (K, C, PH, PW) from x (N, C, H, W) and rois (K, 6) [b, cx, cy, w, h, angle]."""
    cdef Py_ssize_t K = rois.shape[0]
    N, C, H, W = x.shape
    out = _cache.empty((K, C, pooled_h, pooled_w), x.dtype)
    if out.size == 0:
        return out
    if H * W == 0:
        out[...] = 0
        return out
    _rotated(x, None, rois, out, None, N, C, H, W, pooled_h, pooled_w, spatial_scale,
             sampling_ratio, aligned, angle_scale, False, nthreads)
    return out


def roi_align_rotated_backward(grad_out, rois, input_shape, Py_ssize_t pooled_h,
                               Py_ssize_t pooled_w, double spatial_scale, int sampling_ratio,
                               bint aligned, double angle_scale, bint deterministic, int nthreads):
    """grad_x (N, C, H, W) of roi_align_rotated (always deterministic on the CPU)."""
    N, C, H, W = input_shape
    gx = np.zeros(input_shape, dtype=grad_out.dtype)
    if gx.size == 0 or rois.shape[0] == 0:
        return gx
    _rotated(None, grad_out, rois, None, gx, N, C, H, W, pooled_h, pooled_w, spatial_scale,
             sampling_ratio, aligned, angle_scale, True, nthreads)
    return gx


def _rotated(x, dy, rois, out, gx, Py_ssize_t N, Py_ssize_t C, Py_ssize_t H, Py_ssize_t W,
             Py_ssize_t PH, Py_ssize_t PW, double scale, int sr, bint aligned, double ascale,
             bint backward, int nthreads):
    cdef Py_ssize_t K = rois.shape[0]
    order, seg = _segments(rois, N)
    cdef double off = 0.5 if aligned else 0.0
    cdef Py_ssize_t cb = min(ROT_BLOCK, _bwd_block(N, C, nthreads) if backward else C)
    cdef void* px = _p(x)
    cdef void* pd = _p(dy)
    cdef void* pr = _p(rois)
    cdef void* po = _p(out)
    cdef void* pg = _p(gx)
    cdef Py_ssize_t* pod = <Py_ssize_t*>_p(order)
    cdef Py_ssize_t* ps = <Py_ssize_t*>_p(seg)
    cdef bint f32 = rois.dtype == np.float32
    cdef int rc
    with nogil:
        if f32:
            rc = _rot(<float*>px, <float*>pd, <float*>pr, <float*>po, <float*>pg, pod, ps, K, N,
                      C, H, W, PH, PW, scale, off, aligned, ascale, sr, backward, cb, nthreads)
        else:
            rc = _rot(<double*>px, <double*>pd, <double*>pr, <double*>po, <double*>pg, pod, ps,
                      K, N, C, H, W, PH, PW, scale, off, aligned, ascale, sr, backward, cb,
                      nthreads)
    if rc != 0:
        raise MemoryError("roi_align_rotated: out of memory for the sampling tables")

def ps_roi_align_forward(x, rois, Py_ssize_t pooled_h, Py_ssize_t pooled_w,
                         double spatial_scale, int sampling_ratio, int nthreads):
    """out (K, C // (PH*PW), PH, PW)."""
    cdef Py_ssize_t PH = pooled_h, PW = pooled_w
    cdef double scale = spatial_scale
    cdef int sr = sampling_ratio
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t K = rois.shape[0], CO = C // (PH * PW)
    if K * CO * PH * PW == 0 or H * W == 0:
        return np.zeros((K, CO, PH, PW), dtype=x.dtype)
    out = _cache.empty((K, CO, PH, PW), x.dtype)     # every element is written
    order, seg = _segments(rois, N)
    cdef void* px = _p(x)
    cdef void* pr = _p(rois)
    cdef void* po = _p(out)
    cdef Py_ssize_t* pod = <Py_ssize_t*>_p(order)
    cdef Py_ssize_t* ps = <Py_ssize_t*>_p(seg)
    cdef bint f32 = x.dtype == np.float32
    cdef int rc
    with nogil:
        if f32:
            rc = _ps_lanes(<float*>px, <float*>NULL, <float*>po, <float*>NULL, <float*>pr, pod,
                           ps, K, N, C, CO, H, W, PH, PW, scale, sr, False, nthreads)
        else:
            rc = _ps_lanes(<double*>px, <double*>NULL, <double*>po, <double*>NULL, <double*>pr,
                           pod, ps, K, N, C, CO, H, W, PH, PW, scale, sr, False, nthreads)
    if rc == 1:                            # the per-RoI kernel
        out[...] = 0
        with nogil:
            if f32:
                _ps(<float*>px, <float*>NULL, <float*>po, <float*>NULL, <float*>pr, NULL, NULL,
                    K, N, C, CO, H, W, PH, PW, scale, sr, False, min(CO, 64), nthreads)
            else:
                _ps(<double*>px, <double*>NULL, <double*>po, <double*>NULL, <double*>pr, NULL,
                    NULL, K, N, C, CO, H, W, PH, PW, scale, sr, False, min(CO, 64), nthreads)
    if rc < 0:
        raise MemoryError("ps_roi_align: out of memory for the sampling tables")
    return out


def ps_roi_align_backward(grad_out, rois, input_shape, Py_ssize_t pooled_h, Py_ssize_t pooled_w,
                          double spatial_scale, int sampling_ratio, bint deterministic,
                          int nthreads):
    cdef Py_ssize_t N, C, H, W, PH = pooled_h, PW = pooled_w
    cdef double scale = spatial_scale
    cdef int sr = sampling_ratio
    N, C, H, W = input_shape
    if N * C * H * W == 0 or rois.shape[0] == 0:
        return np.zeros((N, C, H, W), dtype=grad_out.dtype)
    gx = _cache.empty((N, C, H, W), grad_out.dtype)   # every element is written
    cdef Py_ssize_t CO = C // (PH * PW), K = rois.shape[0]
    order, seg = _segments(rois, N)
    cdef Py_ssize_t cb = _bwd_block(N, CO, nthreads)
    cdef void* pd = _p(grad_out)
    cdef void* pr = _p(rois)
    cdef void* pg = _p(gx)
    cdef Py_ssize_t* po = <Py_ssize_t*>_p(order)
    cdef Py_ssize_t* ps = <Py_ssize_t*>_p(seg)
    cdef bint f32 = grad_out.dtype == np.float32
    cdef int rc
    with nogil:
        if f32:
            rc = _ps_lanes(<float*>NULL, <float*>pd, <float*>NULL, <float*>pg, <float*>pr, po,
                           ps, K, N, C, CO, H, W, PH, PW, scale, sr, True, nthreads)
        else:
            rc = _ps_lanes(<double*>NULL, <double*>pd, <double*>NULL, <double*>pg, <double*>pr,
                           po, ps, K, N, C, CO, H, W, PH, PW, scale, sr, True, nthreads)
    if rc == 1:                            # the per-RoI kernel scatters into a zeroed grad_x
        gx[...] = 0
        with nogil:
            if f32:
                _ps(<float*>NULL, <float*>pd, <float*>NULL, <float*>pg, <float*>pr, po, ps, K, N,
                    C, CO, H, W, PH, PW, scale, sr, True, cb, nthreads)
            else:
                _ps(<double*>NULL, <double*>pd, <double*>NULL, <double*>pg, <double*>pr, po, ps,
                    K, N, C, CO, H, W, PH, PW, scale, sr, True, cb, nthreads)
    if rc < 0:
        raise MemoryError("ps_roi_align: out of memory for the sampling tables")
    return gx


def roi_pool_forward(x, rois, Py_ssize_t pooled_h, Py_ssize_t pooled_w, double spatial_scale,
                     int nthreads):
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t K = rois.shape[0]
    out = _cache.empty((K, C, pooled_h, pooled_w), x.dtype)    # every element is written
    if out.size == 0:
        return out
    _pool_run(x, None, rois, out, None, N, C, H, W, pooled_h, pooled_w, spatial_scale, False,
              nthreads)
    return out


def roi_pool_backward(grad_out, rois, x, Py_ssize_t pooled_h, Py_ssize_t pooled_w,
                      double spatial_scale, bint deterministic, int nthreads):
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t K = rois.shape[0]
    if N * C * H * W == 0 or K == 0:
        return np.zeros((N, C, H, W), dtype=x.dtype)
    gx = _cache.empty((N, C, H, W), x.dtype)     # every element is written (zeros included)
    _pool_run(x, grad_out, rois, None, gx, N, C, H, W, pooled_h, pooled_w, spatial_scale, True,
              nthreads)
    return gx


def deform_roi_pool_forward(x, rois, offset, mask, Py_ssize_t pooled_h, Py_ssize_t pooled_w,
                            double spatial_scale, int sampling_ratio, double gamma, int nthreads):
    """out (K, C, PH, PW); offset (K, 2, PH, PW) or None; mask (K, 1, PH, PW) or None."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    out = _cache.empty((rois.shape[0], C, pooled_h, pooled_w), x.dtype)
    if out.size == 0:
        return out
    if H * W == 0:
        out[...] = 0
        return out
    _align(x, None, rois, out, None, N, C, H, W, pooled_h, pooled_w, spatial_scale,
           sampling_ratio, True, MODE_AVG, False, False, nthreads,
           deform=(offset, mask, gamma, None))
    return out


def deform_roi_pool_backward(grad_out, x, rois, offset, mask, Py_ssize_t pooled_h,
                             Py_ssize_t pooled_w, double spatial_scale, int sampling_ratio,
                             double gamma, bint deterministic, int nthreads):
    """(grad_x, grad_offset or None, grad_mask or None); always deterministic on the CPU."""
    cdef Py_ssize_t PH = pooled_h, PW = pooled_w
    cdef double scale = spatial_scale
    cdef int sr = sampling_ratio
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t K = rois.shape[0], k
    goff = None if offset is None else np.zeros((K, 2, PH, PW), dtype=x.dtype)
    gm = None if mask is None else np.zeros((K, 1, PH, PW), dtype=x.dtype)
    if x.size == 0 or K == 0:
        return np.zeros(x.shape, dtype=x.dtype), goff, gm
    gx = _cache.empty(x.shape, x.dtype)          # every element written (_avg_unit)
    _align(None, grad_out, rois, None, gx, N, C, H, W, PH, PW, scale, sr, True, MODE_AVG, False,
           True, nthreads, deform=(offset, mask, gamma, None))
    if goff is None and gm is None:
        return gx, goff, gm
    part = np.zeros((K, PH * PW, (C + FN_RL - 1) // FN_RL, 3), dtype=x.dtype)
    _align(x, grad_out, rois, None, None, N, C, H, W, PH, PW, scale, sr, True, MODE_AVG, False,
           False, nthreads, deform=(offset, mask, gamma, part))
    cdef void* pr = _p(rois)
    cdef void* pm = _p(mask)
    cdef void* pp = _p(part)
    cdef void* pgo = _p(goff)
    cdef void* pgm = _p(gm)
    cdef Py_ssize_t nblk = part.shape[2]
    cdef bint f32 = x.dtype == np.float32
    with nogil:
        for k in prange(K, num_threads=nthreads, schedule="static"):
            if f32:
                _dfm_reduce(<float*>pr, <float*>pm, <float*>pp, <float*>pgo, <float*>pgm, k,
                            nblk, H, W, PH, PW, scale, sr, <float>gamma)
            else:
                _dfm_reduce(<double*>pr, <double*>pm, <double*>pp, <double*>pgo, <double*>pgm,
                            k, nblk, H, W, PH, PW, scale, sr, gamma)
    return gx, goff, gm


# ---------------------------------------------------------------- multi-scale RoIAlign (FPN)
#
# torchvision's MultiScaleRoIAlign: each RoI is pooled by roi_align on the level that
# LevelMapper gives it. The RoIs are grouped by level once (_fpn_groups), and each level's RoIs
# run through the RoIAlign units (_align with a subset) writing their output rows in place
# (backward: reading their grad_out rows in place): no copy of RoIs, outputs or gradients.

from libc.math cimport sqrt, log2


cdef void _fpn_levels(const floating* rois, Py_ssize_t K, floating s0, floating lvl0,
                      double kmin, Py_ssize_t L, Py_ssize_t* lv) noexcept nogil:
    """torchvision's LevelMapper, in the RoIs' dtype as torchvision computes it:
    ``floor(lvl0 + log2(sqrt(area) / s0) + eps)`` (eps = 1e-6), clamped to [kmin, kmin + L - 1],
    minus kmin. A NaN level (a non-finite coordinate, or a negative area: a box inverted along
    one axis) gives L: pooled on no level (torchvision's rows of zeros)."""
    cdef Py_ssize_t k
    cdef const floating* r
    cdef floating area, q, t, v
    cdef floating eps = <floating>1e-6
    cdef double lev
    for k in range(K):
        r = rois + 5 * k
        area = (r[3] - r[1]) * (r[4] - r[2])
        q = <floating>sqrt(area)
        q = q / s0
        t = <floating>log2(q)
        v = lvl0 + t
        v = v + eps
        lev = floor(v)
        if lev != lev:
            lv[k] = L
        elif lev <= kmin:
            lv[k] = 0
        elif lev >= kmin + (L - 1):
            lv[k] = L - 1
        else:
            lv[k] = <Py_ssize_t>(lev - kmin)


def _fpn_groups(rois, Py_ssize_t L, Py_ssize_t level_min, double canonical_scale,
                Py_ssize_t canonical_level):
    """(order, bounds): RoI indices grouped by level, in RoI order within a level; level l's are
    ``order[bounds[l]:bounds[l + 1]]``, those pooled nowhere ``order[bounds[L]:]``."""
    cdef Py_ssize_t K = rois.shape[0]
    lv = np.empty(K, dtype=np.intp)
    cdef Py_ssize_t* pl = <Py_ssize_t*>_p(lv)
    cdef void* pr = _p(rois)
    cdef bint f32 = rois.dtype == np.float32
    with nogil:
        if f32:
            _fpn_levels(<float*>pr, K, <float>canonical_scale, <float>canonical_level,
                        level_min, L, pl)
        else:
            _fpn_levels(<double*>pr, K, canonical_scale, <double>canonical_level, level_min, L,
                        pl)
    order = np.argsort(lv, kind="stable")
    bounds = np.zeros(L + 2, dtype=np.intp)
    np.cumsum(np.bincount(lv, minlength=L + 1), out=bounds[1:])
    return order, bounds


# The contracts MultiScaleRoiAlignForward / MultiScaleRoiAlignBackward of fastnorm._kernels.

def multi_scale_roi_align_forward(features, rois, Py_ssize_t pooled_h, Py_ssize_t pooled_w,
                                  spatial_scales, Py_ssize_t level_min, double canonical_scale,
                                  Py_ssize_t canonical_level, int sampling_ratio, bint aligned,
                                  bint channels_last, int nthreads):
    """out (K, C, PH, PW) or (K, PH, PW, C): RoI k pooled on its level's map."""
    cdef Py_ssize_t L = len(features), K = rois.shape[0], l, N, C, H, W
    if L == 1:                          # no level mapping (torchvision pools every RoI there)
        return roi_align_forward(features[0], rois, pooled_h, pooled_w, spatial_scales[0],
                                 sampling_ratio, aligned, MODE_AVG, channels_last, nthreads)
    x0 = features[0]
    C = x0.shape[3] if channels_last else x0.shape[1]
    shape = (K, pooled_h, pooled_w, C) if channels_last else (K, C, pooled_h, pooled_w)
    out = _cache.empty(shape, x0.dtype)
    if out.size == 0:
        return out
    order, bounds = _fpn_groups(rois, L, level_min, canonical_scale, canonical_level)
    out[order[bounds[L]:]] = 0          # pooled on no level
    for l in range(L):
        x = features[l]
        if channels_last:
            N, H, W, C = x.shape
        else:
            N, C, H, W = x.shape
        if bounds[l] == bounds[l + 1]:
            continue
        if H * W == 0:
            out[order[bounds[l]:bounds[l + 1]]] = 0
            continue
        _align(x, None, rois, out, None, N, C, H, W, pooled_h, pooled_w, spatial_scales[l],
               sampling_ratio, aligned, MODE_AVG, channels_last, False, nthreads,
               order[bounds[l]:bounds[l + 1]])
    return out


def multi_scale_roi_align_backward(grad_out, rois, input_shapes, Py_ssize_t pooled_h,
                                   Py_ssize_t pooled_w, spatial_scales, Py_ssize_t level_min,
                                   double canonical_scale, Py_ssize_t canonical_level,
                                   int sampling_ratio, bint aligned, bint channels_last,
                                   bint deterministic, int nthreads):
    """[grad of each level's map]: each level's RoIs' grad_out rows through the RoIAlign
    backward units (deterministic, as roi_align_backward)."""
    cdef Py_ssize_t L = len(input_shapes), K = rois.shape[0], l, N, C, H, W
    if L == 1:
        return [roi_align_backward(grad_out, rois, None, input_shapes[0], pooled_h, pooled_w,
                                   spatial_scales[0], sampling_ratio, aligned, MODE_AVG,
                                   channels_last, deterministic, nthreads)]
    if K == 0:
        return [np.zeros(s, dtype=grad_out.dtype) for s in input_shapes]
    order, bounds = _fpn_groups(rois, L, level_min, canonical_scale, canonical_level)
    grads = []
    for l in range(L):
        shape = tuple(input_shapes[l])
        if bounds[l] == bounds[l + 1] or np.prod(shape) == 0:
            grads.append(np.zeros(shape, dtype=grad_out.dtype))
            continue
        if channels_last:
            N, H, W, C = shape
        else:
            N, C, H, W = shape
        gx = _cache.empty(shape, grad_out.dtype)     # every element written (_avg_unit)
        _align(None, grad_out, rois, None, gx, N, C, H, W, pooled_h, pooled_w,
               spatial_scales[l], sampling_ratio, aligned, MODE_AVG, channels_last, True,
               nthreads, order[bounds[l]:bounds[l + 1]])
        grads.append(gx)
    return grads
