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

Forward work units are (RoI, channel block); backward units are (image, channel block): a unit
owns its channel planes of grad_x and visits that image's RoIs in index order, so gradients are
race-free and bitwise identical for any thread count. The adaptive sampling grid is capped at
``2 * L + 64`` samples per bin along an axis of length L (never reached by RoIs inside the map).
Non-finite RoIs give zeros (and no gradient).
"""
import numpy as np
cimport numpy as cnp
from cython.parallel cimport prange, parallel, threadid
from libc.math cimport ceil, floor, round, fabs, cos, sin, INFINITY
from libc.float cimport FLT_MAX
from libc.stdlib cimport malloc, free

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
    Py_ssize_t c_lo     # separable tables: first column any bin touches
    Py_ssize_t c_span   # and the number of columns up to the last one (0: none)
    Py_ssize_t ncol_bins


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


cdef inline void _bin_scatter(floating* plane, Py_ssize_t W, const Tab* t, Py_ssize_t rb,
                              Py_ssize_t cb, floating gg) noexcept nogil:
    cdef const floating* rw = <const floating*>t.rw
    cdef const floating* cw = <const floating*>t.cw
    cdef Py_ssize_t a, b
    cdef floating u
    cdef floating* row
    for a in range(t.rp[rb], t.rp[rb + 1]):
        row = plane + t.ri[a] * W
        u = gg * rw[a]
        for b in range(t.cp[cb], t.cp[cb + 1]):
            row[t.ci[b]] += u * cw[b]


# ---------------------------------------------------------------- channels-last helpers

cdef inline void _bin_dot_cl(const floating* img, Py_ssize_t W, Py_ssize_t C, Py_ssize_t nc,
                             const Tab* t, Py_ssize_t rb, Py_ssize_t cb,
                             floating* acc) noexcept nogil:
    """acc[0:nc] = sum_r sum_c Wy Wx img[r, c, 0:nc] (img points at channel c0 of pixel 0)."""
    cdef const floating* rw = <const floating*>t.rw
    cdef const floating* cw = <const floating*>t.cw
    cdef Py_ssize_t a, b, c
    cdef floating w
    cdef const floating* p
    for c in range(nc):
        acc[c] = 0
    for a in range(t.rp[rb], t.rp[rb + 1]):
        for b in range(t.cp[cb], t.cp[cb + 1]):
            w = rw[a] * cw[b]
            p = img + (t.ri[a] * W + t.ci[b]) * C
            for c in range(nc):
                acc[c] += w * p[c]


cdef inline void _bin_scatter_cl(floating* img, Py_ssize_t W, Py_ssize_t C, Py_ssize_t nc,
                                 const Tab* t, Py_ssize_t rb, Py_ssize_t cb, const floating* g,
                                 floating scale) noexcept nogil:
    cdef const floating* rw = <const floating*>t.rw
    cdef const floating* cw = <const floating*>t.cw
    cdef Py_ssize_t a, b, c
    cdef floating w
    cdef floating* p
    for a in range(t.rp[rb], t.rp[rb + 1]):
        for b in range(t.cp[cb], t.cp[cb + 1]):
            w = rw[a] * cw[b] * scale
            p = img + (t.ri[a] * W + t.ci[b]) * C
            for c in range(nc):
                p[c] += w * g[c]


# ---------------------------------------------------------------- RoIAlign kernels

cdef Py_ssize_t TABLE_BYTES = 32 << 20   # separable tables are built for RoI chunks up to this
FWD_BLOCK = 2                            # NCHW forward: channels per unit (cache blocking)


cdef inline Py_ssize_t _al8(Py_ssize_t b) noexcept nogil:
    return (b + 7) & ~(<Py_ssize_t>7)


cdef Py_ssize_t _sep_tables(const floating* rois, Py_ssize_t k0, Py_ssize_t K, double scale,
                            double off, bint clamp1, Py_ssize_t PH, Py_ssize_t PW, int sr,
                            Py_ssize_t H, Py_ssize_t W, Tab* tabs, void** mem,
                            int nthreads) noexcept nogil:
    """Separable (row tables per ph, column tables per pw) RoIAlign tables of RoIs k0..k1-1 in
    tabs[0:k1-k0], as many RoIs as fit TABLE_BYTES (at least one); returns k1 (k0 on failure).
    The memory is one block in mem[0] (free it)."""
    cdef floating g[6]
    cdef Py_ssize_t grid[2]
    cdef Py_ssize_t k, k1 = k0, total = 0, size, nr, nc, ph, pw, e
    cdef char* m
    cdef Tab* t
    cdef Py_ssize_t fs = sizeof(floating)
    while k1 < K:
        nr = 0
        nc = 0
        if _geom(rois + 5 * k1, scale, off, clamp1, PH, PW, sr, H, W, g, grid):
            nr = PH * 2 * grid[0]
            nc = PW * 2 * grid[1]
        size = (PH + PW + 2 + nr + nc) * sizeof(Py_ssize_t) + _al8(nr * fs) + _al8(nc * fs)
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
        t.cp = t.rp + PH + 1
        t.ri = t.cp + PW + 1
        t.ci = t.ri + nr
        t.rw = <void*>(t.ci + nc)
        t.cw = <void*>(<char*>t.rw + _al8(nr * fs))
        t.mem = NULL
    for k in prange(k1 - k0, num_threads=nthreads, schedule="static"):
        _sep_fill(&tabs[k], rois + 5 * (k0 + k), scale, off, clamp1, PH, PW, sr, H, W)
    return k1


cdef void _sep_fill(Tab* t, const floating* r, double scale, double off, bint clamp1,
                    Py_ssize_t PH, Py_ssize_t PW, int sr, Py_ssize_t H, Py_ssize_t W) noexcept nogil:
    """Fill one RoI's separable tables (arrays already placed by _sep_tables)."""
    cdef floating g[6]
    cdef Py_ssize_t grid[2]
    cdef Py_ssize_t ph, pw, e = 0, lo, hi
    t.n = <Py_ssize_t>r[0]
    t.c_lo = 0
    t.c_span = 0
    t.ncol_bins = PW
    t.cnt = 0
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
    e = 0
    for pw in range(PW):
        e = _axis(g[1], g[3], pw, grid[1], W, False, t.ci, <floating*>t.cw, e)
        t.cp[pw + 1] = e
    t.c_lo = 0
    t.c_span = 0
    if e > 0:
        lo = t.ci[0]
        hi = t.ci[0]
        for pw in range(e):
            lo = min(lo, t.ci[pw])
            hi = max(hi, t.ci[pw])
        t.c_lo = lo
        t.c_span = hi - lo + 1


cdef void _avg_fwd_unit(const floating* x, floating* out, const Tab* t, Py_ssize_t k,
                        Py_ssize_t c0, Py_ssize_t c1, Py_ssize_t C, Py_ssize_t H, Py_ssize_t W,
                        Py_ssize_t PH, Py_ssize_t PW, bint cl, floating* acc) noexcept nogil:
    cdef Py_ssize_t c, ph, pw, nb = PH * PW
    cdef floating inv = <floating>(1 / t.cnt) if t.cnt > 0 else 0
    cdef const floating* plane
    cdef floating* o
    if cl:
        for ph in range(PH):
            for pw in range(PW):
                o = out + (k * nb + ph * PW + pw) * C
                _bin_dot_cl(x + t.n * H * W * C + c0, W, C, c1 - c0, t, ph, pw, acc)
                for c in range(c0, c1):
                    o[c] = acc[c - c0] * inv
        return
    for c in range(c0, c1):
        plane = x + (t.n * C + c) * H * W
        o = out + (k * C + c) * nb
        if acc != NULL:
            _vpass_fwd(plane, o, t, W, PH, PW, inv, acc)
            continue
        for ph in range(PH):
            for pw in range(PW):
                o[ph * PW + pw] = _bin_dot(plane, W, t, ph, t, pw) * inv


cdef void _vpass_fwd(const floating* plane, floating* o, const Tab* t, Py_ssize_t W,
                     Py_ssize_t PH, Py_ssize_t PW, floating inv, floating* V) noexcept nogil:
    """One channel of one RoI: for each bin row ph, V = sum_r Wy[r] x[r, lo:lo+span] (contiguous,
    vectorised), then each bin is a short dot of its column table with V."""
    cdef const floating* rw = <const floating*>t.rw
    cdef const floating* cw = <const floating*>t.cw
    cdef Py_ssize_t ph, pw, a, b, j, lo = t.c_lo, span = t.c_span
    cdef const floating* row
    cdef floating w, s
    for ph in range(PH):
        if t.rp[ph + 1] == t.rp[ph]:
            for pw in range(PW):
                o[ph * PW + pw] = 0
            continue
        a = t.rp[ph]
        row = plane + t.ri[a] * W + lo
        w = rw[a]
        for j in range(span):
            V[j] = w * row[j]
        for a in range(t.rp[ph] + 1, t.rp[ph + 1]):
            row = plane + t.ri[a] * W + lo
            w = rw[a]
            for j in range(span):
                V[j] += w * row[j]
        for pw in range(PW):
            s = 0
            for b in range(t.cp[pw], t.cp[pw + 1]):
                s = s + cw[b] * V[t.ci[b] - lo]
            o[ph * PW + pw] = s * inv


cdef void _vpass_bwd(floating* plane, const floating* g, const Tab* t, Py_ssize_t W,
                     Py_ssize_t PH, Py_ssize_t PW, floating inv, floating* V) noexcept nogil:
    """Adjoint of _vpass_fwd: V = column-table scatter of a bin row's gradients, then one
    contiguous axpy per row."""
    cdef const floating* rw = <const floating*>t.rw
    cdef const floating* cw = <const floating*>t.cw
    cdef Py_ssize_t ph, pw, a, b, j, lo = t.c_lo, span = t.c_span
    cdef floating* row
    cdef floating w, gg
    for ph in range(PH):
        if t.rp[ph + 1] == t.rp[ph]:
            continue
        for j in range(span):
            V[j] = 0
        for pw in range(PW):
            gg = g[ph * PW + pw] * inv
            for b in range(t.cp[pw], t.cp[pw + 1]):
                V[t.ci[b] - lo] += gg * cw[b]
        for a in range(t.rp[ph], t.rp[ph + 1]):
            row = plane + t.ri[a] * W + lo
            w = rw[a]
            for j in range(span):
                row[j] += w * V[j]


cdef void _avg_bwd_unit(const floating* dy, floating* gx, const Tab* t, Py_ssize_t k,
                        Py_ssize_t c0, Py_ssize_t c1, Py_ssize_t C, Py_ssize_t H, Py_ssize_t W,
                        Py_ssize_t PH, Py_ssize_t PW, bint cl, floating* V) noexcept nogil:
    cdef Py_ssize_t c, ph, pw, nb = PH * PW
    cdef floating inv = <floating>(1 / t.cnt) if t.cnt > 0 else 0
    cdef floating* plane
    cdef const floating* g
    if t.cnt == 0:
        return
    if cl:
        for ph in range(PH):
            for pw in range(PW):
                _bin_scatter_cl(gx + t.n * H * W * C + c0, W, C, c1 - c0, t, ph, pw,
                                dy + (k * nb + ph * PW + pw) * C + c0, inv)
        return
    for c in range(c0, c1):
        plane = gx + (t.n * C + c) * H * W
        g = dy + (k * C + c) * nb
        if V != NULL:
            _vpass_bwd(plane, g, t, W, PH, PW, inv, V)
            continue
        for ph in range(PH):
            for pw in range(PW):
                _bin_scatter(plane, W, t, ph, pw, g[ph * PW + pw] * inv)


cdef inline bint _use_vpass(const Tab* t, bint cl) noexcept nogil:
    """Channels-last units always need their accumulators; NCHW units use the vertical-pass form
    when the RoI's column span is not much wider than its column tables (a contiguous,
    vectorised row sweep beats gathers then), else the gather form."""
    return cl or (t.c_span > 0 and t.c_span <= 4 * t.cp[t.ncol_bins])


cdef int _align_avg(const floating* x, const floating* dy, const floating* rois, floating* out,
                    floating* gx, const Py_ssize_t* order, const Py_ssize_t* seg, Py_ssize_t K,
                    Py_ssize_t N, Py_ssize_t C, Py_ssize_t H, Py_ssize_t W, Py_ssize_t PH,
                    Py_ssize_t PW, double scale, double off, bint clamp1, int sr, bint cl,
                    bint backward, Py_ssize_t cb, int nthreads) noexcept nogil:
    """Average RoIAlign forward (units: channel block x RoI, channel-block-major so that a block
    of x stays in cache across RoIs) or backward (units: image x channel block, RoIs in index
    order), in RoI chunks whose tables fit TABLE_BYTES."""
    cdef Tab* tabs = <Tab*>malloc(max(K, 1) * sizeof(Tab))
    cdef void* mem = NULL
    cdef Py_ssize_t k0 = 0, k1, Kc, nblk = (C + cb - 1) // cb, u, k, c0, n, j
    cdef floating* buf
    if tabs == NULL:
        return -1
    while k0 < K:
        k1 = _sep_tables(rois, k0, K, scale, off, clamp1, PH, PW, sr, H, W, tabs, &mem,
                         nthreads)
        if k1 == k0:
            free(tabs)
            return -1
        Kc = k1 - k0
        with parallel(num_threads=nthreads):
            buf = <floating*>malloc(max(cb, W) * sizeof(floating))    # per-thread scratch
            if not backward:
                # RoIs in image order: a unit's working set is cb planes of one image
                for u in prange(nblk * K, schedule="dynamic"):
                    c0 = (u // K) * cb
                    k = order[u % K]
                    if k >= k0 and k < k1 and buf != NULL:
                        _avg_fwd_unit(x, out, &tabs[k - k0], k, c0, min(C, c0 + cb), C, H, W,
                                      PH, PW, cl, buf if _use_vpass(&tabs[k - k0], cl) else NULL)
            else:
                for u in prange(N * nblk, schedule="dynamic"):
                    n = u // nblk
                    c0 = (u % nblk) * cb
                    for j in range(seg[n], seg[n + 1]):
                        k = order[j]
                        if k >= k0 and k < k1 and buf != NULL:
                            _avg_bwd_unit(dy, gx, &tabs[k - k0], k, c0, min(C, c0 + cb), C, H,
                                          W, PH, PW, cl,
                                          buf if _use_vpass(&tabs[k - k0], cl) else NULL)
            free(buf)
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
                    _bin_scatter(gx + (n * C + ci) * H * W, W, &t, bn, bn,
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


cdef int _ps_lanes(const floating* x, const floating* dy, floating* out, floating* gx,
                   const floating* rois, const Py_ssize_t* order, const Py_ssize_t* seg,
                   Py_ssize_t K, Py_ssize_t N, Py_ssize_t C, Py_ssize_t CO, Py_ssize_t H,
                   Py_ssize_t W, Py_ssize_t PH, Py_ssize_t PW, double scale, int sr,
                   bint backward, int nthreads) noexcept nogil:
    """PS-RoIAlign over units (image, bin) (see above): 0 done, 1 when the tables or the scratch
    would exceed the LANE_SCRATCH_BYTES bounds (the caller runs _ps), -1 out of memory."""
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
    if LANE_SCRATCH_BYTES <= 0 or CO <= 0:
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
    if nbytes > 4 * LANE_SCRATCH_BYTES:
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
    for k in prange(K, num_threads=nthreads, schedule="static"):
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
    if need * CO * fs > LANE_SCRATCH_BYTES:
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
# of the scalar loop bit for bit. Backward gradients accumulate in a second scratch in RoI index
# order (the scalar order) and are transposed into the unit's own grad_x planes: race-free and
# bitwise identical for any thread count. A union larger than LANE_SCRATCH_BYTES falls back to
# transposing each RoI's rectangle (scattering gradients straight into grad_x, same order), and a
# RoI larger than that to the scalar loop over its planes.

cdef extern from "_roi_pool_simd.h" nogil:
    enum: RP_L
    void rp_pool_row_f(const float* s, Py_ssize_t sw, Py_ssize_t h0, Py_ssize_t h1,
                       const Py_ssize_t* ws, const Py_ssize_t* we, Py_ssize_t PW, Py_ssize_t sx0,
                       float* out, Py_ssize_t* idx, void* abuf, int track)
    void rp_pool_row_d(const double* s, Py_ssize_t sw, Py_ssize_t h0, Py_ssize_t h1,
                       const Py_ssize_t* ws, const Py_ssize_t* we, Py_ssize_t PW, Py_ssize_t sx0,
                       double* out, Py_ssize_t* idx, void* abuf, int track)
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


# per-thread scratch of the lane kernels (RoIPool, PS-RoIAlign), bytes; _set_lane_scratch_bytes
cdef Py_ssize_t LANE_SCRATCH_BYTES = 16 << 20


def _set_lane_scratch_bytes(Py_ssize_t nbytes):
    """Set the per-thread scratch bound of the RoIPool / PS-RoIAlign lane kernels (tests force
    their fallbacks with it); returns the previous value."""
    global LANE_SCRATCH_BYTES
    old = LANE_SCRATCH_BYTES
    LANE_SCRATCH_BYTES = nbytes
    return old


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
                     floating* gs) noexcept nogil:
    """Image n, channels [c0, c0 + RP_L) ∩ [0, C), RoIs order[j0:j1] (see above). cap: scratch
    pixels (0: the scalar loop only)."""
    cdef Py_ssize_t nc = min(<Py_ssize_t>RP_L, C - c0), HW = H * W, nb = PH * PW
    cdef Py_ssize_t j, k, l, ph, pw, b, sw = 0, sy0 = 0, sx0 = 0, i, arg, y, xx
    cdef const Py_ssize_t* w
    cdef const Py_ssize_t* hs
    cdef const Py_ssize_t* ws
    cdef Py_ssize_t* idx = <Py_ssize_t*>malloc(nb * RP_L * sizeof(Py_ssize_t))
    cdef floating* val = <floating*>malloc(nb * RP_L * sizeof(floating))
    cdef void* abuf = malloc(PW * RP_L * 8)
    cdef Py_ssize_t win[4]
    cdef Py_ssize_t zr[4]
    cdef floating best
    cdef const floating* xn = x + (n * C + c0) * HW
    cdef const floating* g
    cdef bint whole = _area(urect) > 0 and _area(urect) <= cap
    cdef bint lanes
    zr[0] = 0; zr[1] = 0; zr[2] = 0; zr[3] = 0
    if idx == NULL or val == NULL or abuf == NULL:
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
                                  val + ph * PW * RP_L, idx + ph * PW * RP_L, abuf, 1)
                else:
                    rp_pool_row_f(xs, sw, hs[ph] - sy0, hs[PH + ph] - sy0, ws, ws + PW, PW, sx0,
                                  val + ph * PW * RP_L, idx, abuf, 0)
            else:
                if backward:
                    rp_pool_row_d(xs, sw, hs[ph] - sy0, hs[PH + ph] - sy0, ws, ws + PW, PW, sx0,
                                  val + ph * PW * RP_L, idx + ph * PW * RP_L, abuf, 1)
                else:
                    rp_pool_row_d(xs, sw, hs[ph] - sy0, hs[PH + ph] - sy0, ws, ws + PW, PW, sx0,
                                  val + ph * PW * RP_L, idx, abuf, 0)
        if not backward:                       # the RoI's block of out is contiguous
            for l in range(nc):
                for b in range(nb):
                    out[(k * C + c0 + l) * nb + b] = val[b * RP_L + l]
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
    free(abuf)


cdef Py_ssize_t _pool_prep(const floating* rois, const Py_ssize_t* order, const Py_ssize_t* seg,
                           Py_ssize_t K, Py_ssize_t N, Py_ssize_t H, Py_ssize_t W, Py_ssize_t PH,
                           Py_ssize_t PW, double scale, Py_ssize_t cap, Py_ssize_t* wins,
                           Py_ssize_t* urects, int nthreads) noexcept nogil:
    """Every RoI's windows (_pool_fill) into wins, each image's union rectangle into urects;
    returns the most scratch pixels a unit uses (unions up to cap, else RoIs up to cap)."""
    cdef Py_ssize_t ws_ = 4 + 2 * PH + 2 * PW, k, j, n, a, ua, need = 0
    cdef Py_ssize_t* r
    for k in prange(K, num_threads=nthreads, schedule="static"):
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
    per thread (x's block, then grad_x's when backward)."""
    cdef Py_ssize_t ws_ = 4 + 2 * PH + 2 * PW, nblk = (C + RP_L - 1) // RP_L, u, n
    cdef floating* xs
    for u in prange(N * nblk, num_threads=nthreads, schedule="dynamic"):
        n = u // nblk
        xs = scratch + threadid() * per_thread
        _pool_unit(x, dy, out, gx, wins, ws_, order, seg[n], seg[n + 1], n, (u % nblk) * RP_L,
                   C, H, W, PH, PW, urects + 4 * n, cap, backward, xs,
                   xs + per_thread // 2 if backward else <floating*>NULL)


def _pool_run(x, dy, rois, out, gx, Py_ssize_t N, Py_ssize_t C, Py_ssize_t H, Py_ssize_t W,
              Py_ssize_t PH, Py_ssize_t PW, double scale, bint backward, int nthreads):
    """RoIPool: windows, union rectangles and the per-thread scratch (from the output cache, so
    that repeated calls do not fault fresh pages in), then the units."""
    cdef Py_ssize_t K = rois.shape[0], ws_ = 4 + 2 * PH + 2 * PW, need, per
    order, seg = _segments(rois, N)
    wins = _cache.empty((max(K, 1), ws_), np.intp)
    urects = np.empty((max(N, 1), 4), np.intp)
    cdef Py_ssize_t fs = x.dtype.itemsize
    cdef Py_ssize_t cap = LANE_SCRATCH_BYTES // (RP_L * fs * (2 if backward else 1))
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


cdef void _deform_unit(const floating* x, const floating* dy, const floating* rois,
                       const floating* offset, const floating* mask, floating* out, floating* gx,
                       floating* goff, floating* gmask, const Py_ssize_t* order, Py_ssize_t k0,
                       Py_ssize_t k1, Py_ssize_t c0, Py_ssize_t c1, Py_ssize_t C, Py_ssize_t H,
                       Py_ssize_t W, Py_ssize_t PH, Py_ssize_t PW, double scale, int sr,
                       floating gamma, int what) noexcept nogil:
    """what 0: forward; 1: grad_x (channels [c0, c1)); 2: grad_offset/grad_mask of RoIs k0..k1
    (all channels)."""
    cdef floating g[6]
    cdef Py_ssize_t grid[2]
    cdef Py_ssize_t j, k, n, c, bn, nb = PH * PW
    cdef Tab t, ty, tx
    cdef floating cnt, m, gg, sy, sx, sm, v
    cdef floating* dyx = <floating*>malloc(2 * nb * sizeof(floating))
    cdef const floating* plane
    if dyx == NULL:
        return
    for j in range(k0, k1):
        k = order[j] if order != NULL else j
        n = <Py_ssize_t>rois[5 * k]
        if not _geom(rois + 5 * k, scale, 0.5, False, PH, PW, sr, H, W, g, grid) \
                or grid[0] * grid[1] == 0:
            if what == 0:
                for c in range(c0, c1):
                    for bn in range(nb):
                        out[(k * C + c) * nb + bn] = 0
            continue
        cnt = <floating>(grid[0] * grid[1])
        _deform_shifts(g, offset, k, nb, gamma, dyx)
        if not _tab_alloc(&t, nb, grid[0], grid[1], sizeof(floating)):
            break
        _tab_build(&t, g, grid, PH, PW, H, W, dyx, nb, False, False)
        if what == 2:
            if not _tab_alloc(&ty, nb, grid[0], grid[1], sizeof(floating)):
                free(t.mem)
                break
            if not _tab_alloc(&tx, nb, grid[0], grid[1], sizeof(floating)):
                free(t.mem)
                free(ty.mem)
                break
            _tab_build(&ty, g, grid, PH, PW, H, W, dyx, nb, True, False)
            _tab_build(&tx, g, grid, PH, PW, H, W, dyx, nb, False, True)
            for bn in range(nb):
                m = mask[k * nb + bn] if mask != NULL else 1
                sy = 0
                sx = 0
                sm = 0
                for c in range(C):
                    plane = x + (n * C + c) * H * W
                    gg = dy[(k * C + c) * nb + bn]
                    if mask != NULL:
                        sm = sm + gg * _bin_dot(plane, W, &t, bn, &t, bn)
                    if offset != NULL:
                        # d/dy: derivative rows x weight columns; d/dx: weight rows x derivative
                        # columns (row tables of ty, column tables of tx are the derivatives)
                        sy = sy + gg * _bin_dot(plane, W, &ty, bn, &t, bn)
                        sx = sx + gg * _bin_dot(plane, W, &t, bn, &tx, bn)
                if mask != NULL:
                    gmask[k * nb + bn] = sm / cnt
                if offset != NULL:
                    goff[(2 * k + 1) * nb + bn] = m * gamma * g[4] * sy / cnt
                    goff[2 * k * nb + bn] = m * gamma * g[5] * sx / cnt
            free(ty.mem)
            free(tx.mem)
        else:
            for c in range(c0, c1):
                plane = x + (n * C + c) * H * W
                for bn in range(nb):
                    m = mask[k * nb + bn] if mask != NULL else 1
                    if what == 0:
                        out[(k * C + c) * nb + bn] = m * (_bin_dot(plane, W, &t, bn, &t, bn) / cnt)
                    else:
                        _bin_scatter(gx + (n * C + c) * H * W, W, &t, bn, bn,
                                     dy[(k * C + c) * nb + bn] * m / cnt)
        free(t.mem)
    free(dyx)


cdef void _deform(const floating* x, const floating* dy, const floating* rois,
                  const floating* offset, const floating* mask, floating* out, floating* gx,
                  floating* goff, floating* gmask, const Py_ssize_t* order, const Py_ssize_t* seg,
                  Py_ssize_t K, Py_ssize_t N, Py_ssize_t C, Py_ssize_t H, Py_ssize_t W,
                  Py_ssize_t PH, Py_ssize_t PW, double scale, int sr, floating gamma, int what,
                  Py_ssize_t cb, int nthreads) noexcept nogil:
    cdef Py_ssize_t nblk = (C + cb - 1) // cb, u, m, c0
    if what == 2:
        for u in prange(K, num_threads=nthreads, schedule="dynamic"):
            _deform_unit(x, dy, rois, offset, mask, out, gx, goff, gmask, <Py_ssize_t*>NULL,
                         u, u + 1, 0, C, C, H, W, PH, PW, scale, sr, gamma, 2)
        return
    for u in prange((N if what == 1 else K) * nblk, num_threads=nthreads, schedule="dynamic"):
        m = u // nblk
        c0 = (u % nblk) * cb
        if what == 1:
            _deform_unit(x, dy, rois, offset, mask, out, gx, goff, gmask, order, seg[m],
                         seg[m + 1], c0, min(C, c0 + cb), C, H, W, PH, PW, scale, sr, gamma, 1)
        else:
            _deform_unit(x, dy, rois, offset, mask, out, gx, goff, gmask, <Py_ssize_t*>NULL, m,
                         m + 1, c0, min(C, c0 + cb), C, H, W, PH, PW, scale, sr, gamma, 0)


# ---------------------------------------------------------------- Python entry points

def _segments(rois, Py_ssize_t N):
    """RoI indices grouped by image (stable) and the per-image segment bounds."""
    b = rois[:, 0].astype(np.int64)
    order = np.argsort(b, kind="stable").astype(np.intp)
    seg = np.searchsorted(b[order], np.arange(N + 1)).astype(np.intp)
    return np.ascontiguousarray(order), np.ascontiguousarray(seg)


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
    gx = np.zeros(input_shape, dtype=grad_out.dtype)
    if gx.size == 0 or rois.shape[0] == 0:
        return gx
    _align(x, grad_out, rois, None, gx, N, C, H, W, pooled_h, pooled_w, spatial_scale,
           sampling_ratio, aligned, mode, channels_last, True, nthreads)
    return gx


def _align(x, dy, rois, out, gx, Py_ssize_t N, Py_ssize_t C, Py_ssize_t H, Py_ssize_t W,
           Py_ssize_t PH, Py_ssize_t PW, double scale, int sr, bint aligned, int mode, bint cl,
           bint backward, int nthreads):
    cdef Py_ssize_t K = rois.shape[0], cb
    order, seg = _segments(rois, N)
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
    if backward:
        cb = _bwd_block(N, C, nthreads) if cl else min(4, _bwd_block(N, C, nthreads))
    else:
        cb = min(C, 64) if (cl or mode == MODE_MAX) else min(C, FWD_BLOCK)
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
                            K, N, C, H, W, PH, PW, scale, off, not aligned, sr, cl, backward, cb,
                            nthreads)
        else:
            rc = _align_avg(<double*>px, <double*>pd, <double*>pr, <double*>po, <double*>pg, pod,
                            ps, K, N, C, H, W, PH, PW, scale, off, not aligned, sr, cl, backward,
                            cb, nthreads)
    if rc != 0:
        raise MemoryError("roi_align: out of memory for the sampling tables")


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
    cdef Py_ssize_t PH = pooled_h, PW = pooled_w
    cdef double scale = spatial_scale
    cdef int sr = sampling_ratio
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t K = rois.shape[0]
    out = np.zeros((K, C, PH, PW), dtype=x.dtype)
    if out.size == 0 or H * W == 0:
        return out
    cdef void* px = _p(x)
    cdef void* pr = _p(rois)
    cdef void* pf = _p(offset)
    cdef void* pm = _p(mask)
    cdef void* po = _p(out)
    cdef bint f32 = x.dtype == np.float32
    with nogil:
        if f32:
            _deform(<float*>px, <float*>NULL, <float*>pr, <float*>pf, <float*>pm, <float*>po,
                    <float*>NULL, <float*>NULL, <float*>NULL, NULL, NULL, K, N, C, H, W, PH, PW, scale, sr, <float>gamma, 0,
                    min(C, 64), nthreads)
        else:
            _deform(<double*>px, <double*>NULL, <double*>pr, <double*>pf, <double*>pm,
                    <double*>po, <double*>NULL, <double*>NULL, <double*>NULL, NULL, NULL, K, N, C, H, W, PH, PW, scale, sr, gamma, 0,
                    min(C, 64), nthreads)
    return out


def deform_roi_pool_backward(grad_out, x, rois, offset, mask, Py_ssize_t pooled_h,
                             Py_ssize_t pooled_w, double spatial_scale, int sampling_ratio,
                             double gamma, bint deterministic, int nthreads):
    """(grad_x, grad_offset or None, grad_mask or None)."""
    cdef Py_ssize_t PH = pooled_h, PW = pooled_w
    cdef double scale = spatial_scale
    cdef int sr = sampling_ratio
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t K = rois.shape[0]
    gx = np.zeros((N, C, H, W), dtype=x.dtype)
    goff = None if offset is None else np.zeros((K, 2, PH, PW), dtype=x.dtype)
    gm = None if mask is None else np.zeros((K, 1, PH, PW), dtype=x.dtype)
    if gx.size == 0 or K == 0:
        return gx, goff, gm
    order, seg = _segments(rois, N)
    cdef Py_ssize_t cb = _bwd_block(N, C, nthreads)
    cdef void* px = _p(x)
    cdef void* pd = _p(grad_out)
    cdef void* pr = _p(rois)
    cdef void* pf = _p(offset)
    cdef void* pm = _p(mask)
    cdef void* pg = _p(gx)
    cdef void* pgo = _p(goff)
    cdef void* pgm = _p(gm)
    cdef Py_ssize_t* po = <Py_ssize_t*>_p(order)
    cdef Py_ssize_t* ps = <Py_ssize_t*>_p(seg)
    cdef int what
    cdef bint f32 = x.dtype == np.float32
    with nogil:
        for what in range(1, 3):
            if what == 2 and pgo == NULL and pgm == NULL:
                break
            if f32:
                _deform(<float*>px, <float*>pd, <float*>pr, <float*>pf, <float*>pm, <float*>NULL,
                        <float*>pg, <float*>pgo, <float*>pgm, po, ps, K, N, C, H, W, PH, PW,
                        scale, sr, <float>gamma, what, cb, nthreads)
            else:
                _deform(<double*>px, <double*>pd, <double*>pr, <double*>pf, <double*>pm, <double*>NULL,
                        <double*>pg, <double*>pgo, <double*>pgm, po, ps, K, N, C, H, W, PH, PW,
                        scale, sr, gamma, what, cb, nthreads)
    return gx, goff, gm
