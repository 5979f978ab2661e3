# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False, embedsignature=True
"""Deformable convolution (DCN v1/v2) forward and backward on the CPU.

Forward (fused, no im2col buffer): per chunk of whole samples the input is copied channels-last
(OpenMP); then OpenMP over (sample, block of output positions) units: a unit samples its
columns (bilinear with zero padding) into a thread-local tile (positions, groups, kh * kw,
C_in / groups) of about TILE_BYTES, and while the tile is in cache multiplies it by the weight
with the register-blocked micro-kernel of deform_conv_gemm.h (weight packed once per call into
panels of output channels), writing y (+ bias) directly. No BLAS thread pool is involved, so
nothing competes with the OpenMP threads. The corners and weights of one (kernel point, output
position) are computed once per unit and used for every channel of the offset group, whose values
are contiguous (vectorised blend).

Backward: columns are recomputed (deformable im2col, OpenMP over (sample, offset group, output
row)) into a position-major buffer (nb, rows * Wo, groups, kh * kw, C_in / groups);
grad_weight += grad_out @ columns and grad_columns = grad_out^T @ weight (_gemm: the forward's
micro-kernel on packed panels, blocked along the reduction, GIL released); grad_x by col2im into a
channels-last buffer, parallel over (sample, offset group, block of input channels) -- each unit
owns its channels, so it is race-free and deterministic -- then added back to (N, C, H, W);
grad_offset / grad_mask by a coordinate-gradient pass over output rows (float64 across runs of
channels). The backward's work is chunked so the column buffer holds at most ``chunk_rows`` output
rows (whole samples when a sample fits, else blocks of rows of one sample): peak extra memory is
bounded for any batch size.

Memory: the forward's output and its workspace (the channels-last copy of a chunk, the packed
weight, the threads' column tiles) come from the output cache (_pool.pyx): freed at the end of the
call, kept there for the next call, under fastnorm.set_cache_limit / empty_cache / cached_bytes.

Unit boundaries depend on the shape only, so results are bitwise identical for any thread count.
"""
import numpy as np
cimport numpy as cnp
from cython.parallel cimport prange, parallel, threadid
from libc.stdlib cimport malloc, free
from libc.string cimport memset

from _types cimport floating
from _interp cimport zero_pad_bilinear

from fastnorm._cpu import _pool as _cache   # output arrays and workspaces: the output cache

cnp.import_array()

cdef extern from "deform_conv_gemm.h" nogil:
    # out[o * ldo + p] = (out[o * ldo + p] when accum +) (bias[o] +)
    #                    sum_k Wp[o, k] * tile[p * ldt + k]          for o < M, p < n
    void dc_gemm_f32(const float* tile, Py_ssize_t ldt, Py_ssize_t n, Py_ssize_t K,
                     const float* Wp, Py_ssize_t M, const float* bias, float* out, Py_ssize_t ldo,
                     int accum)
    void dc_gemm_f64(const double* tile, Py_ssize_t ldt, Py_ssize_t n, Py_ssize_t K,
                     const double* Wp, Py_ssize_t M, const double* bias, double* out,
                     Py_ssize_t ldo, int accum)
    void dc_blend_f32(float* dst, const float* p0, const float* p1, const float* p2,
                      const float* p3, float w0, float w1, float w2, float w3, Py_ssize_t n)
    void dc_blend_f64(double* dst, const double* p0, const double* p1, const double* p2,
                      const double* p3, double w0, double w1, double w2, double w3,
                      Py_ssize_t n)
    # the selected kernel's tile: mr positions (tile rows are read in blocks of mr) by nr output
    # channels (the packed weight's panel width)
    void dc_gemm_shape(Py_ssize_t itemsize, Py_ssize_t* mr, Py_ssize_t* nr)
    # the widest kernel family this build runs on this CPU, and the one in use (0 baseline,
    # 1 AVX2, 2 AVX-512)
    int dc_isa_best()
    int dc_isa()


_FAMILIES = ("baseline", "avx2", "avx512")

#: The GEMM micro-kernel families this build can run on this CPU, widest first: the build's
#: target's (-march=native), or in a portable build (FASTNORM_PORTABLE=1) those the CPU has. The
#: widest is used unless FASTNORM_GEMM_ISA=avx2|baseline (read at the first call) names a
#: narrower one. All families of one build give the same bits (same arithmetic, same order of
#: operations on each output); they differ in tile shape and registers only. See
#: deform_conv_gemm.h.
GEMM_ISAS = tuple(_FAMILIES[i] for i in range(dc_isa_best(), -1, -1))


def gemm_isa():
    """The GEMM micro-kernel family in use: "avx512", "avx2" or "baseline"."""
    return _FAMILIES[dc_isa()]


cdef enum:
    COL2IM_BLOCK = 32   # input channels per col2im unit


cdef struct Geo:
    Py_ssize_t N, C, H, W, Ho, Wo, kh, kw, K, sh, sw, ph, pw, dh, dw, G, Cpg
    Py_ssize_t Cw           # input channels per weight group (C_in / groups)
    bint has_mask


# ---------------------------------------------------------------- sampling of one output row

cdef inline int _corners(floating y, floating x, Py_ssize_t H, Py_ssize_t W, Py_ssize_t* o,
                         floating* wt, floating* dwy, floating* dwx) noexcept nogil:
    """zero_pad_bilinear plus which corners lie inside the map (bit j for corner j, 0 when the
    sample is outside) and, when dwy is not NULL, d wt_j / dy and d wt_j / dx (0 for outside
    corners)."""
    cdef Py_ssize_t y0, x0
    cdef floating ly, lx
    cdef int b
    if not zero_pad_bilinear(y, x, H, W, o, wt):
        if dwy != NULL:
            dwy[0] = 0; dwy[1] = 0; dwy[2] = 0; dwy[3] = 0
            dwx[0] = 0; dwx[1] = 0; dwx[2] = 0; dwx[3] = 0
        return 0
    y0 = <Py_ssize_t>y if y >= 0 else -1
    x0 = <Py_ssize_t>x if x >= 0 else -1
    b = ((y0 >= 0 and x0 >= 0) | ((y0 >= 0 and x0 + 1 < W) << 1)
         | ((y0 + 1 < H and x0 >= 0) << 2) | ((y0 + 1 < H and x0 + 1 < W) << 3))
    if dwy != NULL:
        ly = y - y0
        lx = x - x0
        dwy[0] = -(1 - lx) if b & 1 else 0
        dwy[1] = -lx if b & 2 else 0
        dwy[2] = (1 - lx) if b & 4 else 0
        dwy[3] = lx if b & 8 else 0
        dwx[0] = -(1 - ly) if b & 1 else 0
        dwx[1] = (1 - ly) if b & 2 else 0
        dwx[2] = -ly if b & 4 else 0
        dwx[3] = ly if b & 8 else 0
    return b


cdef inline void _row_meta(const Geo* g, const floating* off, const floating* msk,
                           Py_ssize_t n, Py_ssize_t go, Py_ssize_t k, Py_ssize_t p0,
                           Py_ssize_t np_, Py_ssize_t* o, floating* wt, floating* dwy,
                           floating* dwx, int* bits, Py_ssize_t es) noexcept nogil:
    """Corners/weights of kernel point k of offset group go for the output positions
    p0 .. p0 + np_ - 1 (flat ho * Wo + wo) of sample n, entry of position p0 + j at j * es; the
    weights are multiplied by the mask when ``msk`` is not NULL."""
    cdef Py_ssize_t HoWo = g.Ho * g.Wo, j, q, e, ho, wo
    cdef const floating* offy = off + ((n * g.G + go) * 2 * g.K + 2 * k) * HoWo + p0
    cdef const floating* offx = offy + HoWo
    cdef const floating* m = NULL
    cdef Py_ssize_t yk = (k // g.kw) * g.dh - g.ph, xk = (k % g.kw) * g.dw - g.pw
    cdef floating mk
    if msk != NULL:
        m = msk + ((n * g.G + go) * g.K + k) * HoWo + p0
    ho = p0 // g.Wo
    wo = p0 - ho * g.Wo
    for j in range(np_):
        e = j * es
        bits[e] = _corners(<floating>(ho * g.sh + yk) + offy[j],
                           <floating>(wo * g.sw + xk) + offx[j], g.H, g.W,
                           &o[4 * e], &wt[4 * e],
                           &dwy[4 * e] if dwy != NULL else NULL,
                           &dwx[4 * e] if dwx != NULL else NULL)
        if m != NULL:
            mk = m[j]
            for q in range(4):
                wt[4 * e + q] = wt[4 * e + q] * mk
        wo += 1
        if wo == g.Wo:
            wo = 0
            ho += 1


cdef inline Py_ssize_t _align64(Py_ssize_t b) noexcept nogil:
    return (b + 63) // 64 * 64


cdef inline Py_ssize_t _meta_bytes(Py_ssize_t n) noexcept nogil:
    """Bytes of a thread's sampling buffer (see _meta), rounded up to 64 so that the buffers
    of consecutive threads stay aligned."""
    return _align64(n * (4 * sizeof(Py_ssize_t) + 12 * sizeof(double) + sizeof(int)))


cdef struct Meta:
    Py_ssize_t* o
    void* wt
    void* dwy
    void* dwx
    int* bits


cdef inline Meta _meta(char* buf, Py_ssize_t n) noexcept nogil:
    """Views of a thread's buffer for the sampling of n (kernel point, position) pairs."""
    cdef Meta m
    m.o = <Py_ssize_t*>buf
    m.wt = <void*>(buf + 4 * n * sizeof(Py_ssize_t))
    m.dwy = <void*>(buf + 4 * n * sizeof(Py_ssize_t) + 4 * n * sizeof(double))
    m.dwx = <void*>(buf + 4 * n * sizeof(Py_ssize_t) + 8 * n * sizeof(double))
    m.bits = <int*>(buf + 4 * n * sizeof(Py_ssize_t) + 12 * n * sizeof(double))
    return m


cdef inline void _unit_meta(const Geo* g, const floating* off, const floating* msk,
                            Py_ssize_t n, Py_ssize_t go, Py_ssize_t p0, Py_ssize_t np_, Meta* m,
                            bint grads) noexcept nogil:
    """Sampling of all kernel points of the positions p0 .. p0 + np_ - 1, laid out [j][k]."""
    cdef Py_ssize_t k
    for k in range(g.K):
        _row_meta(g, off, msk, n, go, k, p0, np_, &m.o[4 * k], &(<floating*>m.wt)[4 * k],
                  &(<floating*>m.dwy)[4 * k] if grads else NULL,
                  &(<floating*>m.dwx)[4 * k] if grads else NULL, &m.bits[k], g.K)


# ---------------------------------------------------------------- kernels
# Layouts of one chunk (nb samples, hb output rows, L = hb * Wo positions):
#   xt, gxt   (nb, H, W, C_in)           the chunk's input / its gradient, channels-last, so the
#                                        channels of one corner are contiguous (vector loads)
#   columns   (nb, L, groups, K, C_w)    position-major; the (K, C_w) block of one weight group is
#                                        one GEMM operand (the weight is reordered to match)
# A unit first computes the sampling of its output row for all kernel points once (_unit_meta,
# laid out [wo][k]); then, per (position, kernel point), the corners and weights are reused for
# every channel of the offset group, walked in runs that stay inside one weight group.

cdef inline Py_ssize_t _run_end(const Geo* g, Py_ssize_t c, Py_ssize_t cend) noexcept nogil:
    """End of the run of channels from c that stays in c's weight group (and below cend)."""
    return min(cend, (c // g.Cw + 1) * g.Cw)


cdef inline Py_ssize_t _col(const Geo* g, Py_ssize_t c, Py_ssize_t k) noexcept nogil:
    """Index of (channel c, kernel point k) inside one position's C_in * K columns."""
    return (c // g.Cw) * g.K * g.Cw + k * g.Cw + c % g.Cw


cdef void _sample(const Geo* g, const floating* xs, const floating* off, const floating* msk,
                  Py_ssize_t n, Py_ssize_t go, Py_ssize_t p0, Py_ssize_t np_, floating* rows,
                  Meta* m) noexcept nogil:
    """Columns of offset group go for the positions p0 .. p0 + np_ - 1 of sample n (whose
    channels-last input is xs): position p0 + j fills row j (C_in * K values) of ``rows``."""
    cdef Py_ssize_t CK = g.C * g.K, c, cend, i, n_, k, e, j, col
    cdef floating* wt = <floating*>m.wt
    cdef floating* row
    cdef floating* dst
    cdef const floating* p0_
    cdef const floating* p1
    cdef const floating* p2
    cdef const floating* p3
    cdef floating w0, w1, w2, w3, acc
    cdef int b
    _unit_meta(g, off, msk, n, go, p0, np_, m, False)
    c = go * g.Cpg
    while c < (go + 1) * g.Cpg:         # runs of channels inside one weight group
        cend = _run_end(g, c, (go + 1) * g.Cpg)
        n_ = cend - c
        col = _col(g, c, 0)             # + k * C_w for kernel point k
        for j in range(np_):
            row = rows + j * CK + col
            for k in range(g.K):
                e = j * g.K + k
                b = m.bits[e]
                w0 = wt[4 * e]; w1 = wt[4 * e + 1]; w2 = wt[4 * e + 2]; w3 = wt[4 * e + 3]
                dst = row + k * g.Cw
                p0_ = xs + m.o[4 * e] * g.C + c
                p1 = xs + m.o[4 * e + 1] * g.C + c
                p2 = xs + m.o[4 * e + 2] * g.C + c
                p3 = xs + m.o[4 * e + 3] * g.C + c
                if b == 15:
                    if floating is float:
                        dc_blend_f32(dst, p0_, p1, p2, p3, w0, w1, w2, w3, n_)
                    else:
                        dc_blend_f64(dst, p0_, p1, p2, p3, w0, w1, w2, w3, n_)
                elif b == 0:
                    for i in range(n_):
                        dst[i] = 0
                else:                       # corners outside the map are never read
                    for i in range(n_):
                        acc = 0
                        if b & 1:
                            acc = acc + w0 * p0_[i]
                        if b & 2:
                            acc = acc + w1 * p1[i]
                        if b & 4:
                            acc = acc + w2 * p2[i]
                        if b & 8:
                            acc = acc + w3 * p3[i]
                        dst[i] = acc
        c = cend


cdef void _im2col_unit(const Geo* g, const floating* xt, const floating* off,
                       const floating* msk, floating* cols, Py_ssize_t n0, Py_ssize_t ho0,
                       Py_ssize_t hb, Py_ssize_t u, char* buf) noexcept nogil:
    """Columns of one (sample, offset group, output row) of the chunk."""
    cdef Py_ssize_t r = u % hb, go = (u // hb) % g.G, nl = u // hb // g.G
    cdef Meta m = _meta(buf, g.K * g.Wo)
    _sample(g, xt + nl * g.H * g.W * g.C, off, msk, n0 + nl, go, (ho0 + r) * g.Wo, g.Wo,
            cols + (nl * hb + r) * g.Wo * g.C * g.K, &m)


cdef void _col2im_unit(const Geo* g, const floating* off, const floating* msk,
                       const floating* gcols, floating* gxt, Py_ssize_t n0, Py_ssize_t ho0,
                       Py_ssize_t hb, Py_ssize_t u, char* buf) noexcept nogil:
    """grad_x of one block of input channels of one sample: scatter of the column gradients
    (this unit owns these channels of the sample, so there are no races)."""
    cdef Py_ssize_t nblk = (g.Cpg + COL2IM_BLOCK - 1) // COL2IM_BLOCK
    cdef Py_ssize_t cb = u % nblk, go = (u // nblk) % g.G, nl = u // nblk // g.G
    cdef Py_ssize_t c0 = go * g.Cpg + cb * COL2IM_BLOCK
    cdef Py_ssize_t c1 = min((go + 1) * g.Cpg, c0 + COL2IM_BLOCK)
    cdef Py_ssize_t CK = g.C * g.K, k, e, r, c, cend, i, n, wo, q
    cdef Meta m = _meta(buf, g.K * g.Wo)
    cdef floating* wt = <floating*>m.wt
    cdef floating* gxs = gxt + nl * g.H * g.W * g.C
    cdef const floating* src
    cdef floating* d
    cdef floating w
    cdef int b
    for r in range(hb):
        _unit_meta(g, off, msk, n0 + nl, go, (ho0 + r) * g.Wo, g.Wo, &m, False)
        for wo in range(g.Wo):
            for k in range(g.K):
                e = wo * g.K + k
                b = m.bits[e]
                if b == 0:
                    continue
                c = c0
                while c < c1:
                    cend = _run_end(g, c, c1)
                    n = cend - c
                    src = gcols + (nl * hb * g.Wo + r * g.Wo + wo) * CK + _col(g, c, k)
                    for q in range(4):
                        if (b >> q) & 1:
                            w = wt[4 * e + q]
                            d = gxs + m.o[4 * e + q] * g.C + c
                            for i in range(n):
                                d[i] += w * src[i]
                    c = cend


cdef void _coord_unit(const Geo* g, const floating* xt, const floating* off, const floating* msk,
                      const floating* gcols, floating* goff, floating* gmask, Py_ssize_t n0,
                      Py_ssize_t ho0, Py_ssize_t hb, Py_ssize_t u, char* buf) noexcept nogil:
    """grad_offset (and grad_mask) of one (sample, offset group, output row): sums over the
    group's channels of grad_column * d(mask * sample) / d(dy, dx, mask)."""
    cdef Py_ssize_t r = u % hb, go = (u // hb) % g.G, nl = u // hb // g.G
    cdef Py_ssize_t n = n0 + nl, ho = ho0 + r
    cdef Py_ssize_t HoWo = g.Ho * g.Wo, CK = g.C * g.K, c, cend, i, k, e, wo, q
    cdef Meta m = _meta(buf, g.K * g.Wo)
    cdef floating* wt = <floating*>m.wt
    cdef floating* dwy = <floating*>m.dwy
    cdef floating* dwx = <floating*>m.dwx
    cdef const floating* xs = xt + nl * g.H * g.W * g.C
    cdef const floating* gc
    cdef const floating* pq[4]
    cdef floating v[4]
    cdef floating gv, sy, sx, sm, lx, ly, t0, t1, top, bot
    cdef double ay, ax, am, mk
    cdef int b
    cdef Py_ssize_t oy, om
    _unit_meta(g, off, NULL, n, go, ho * g.Wo, g.Wo, &m, True)
    for wo in range(g.Wo):
        for k in range(g.K):
            e = wo * g.K + k
            b = m.bits[e]
            ay = 0
            ax = 0
            am = 0
            if b != 0:
                c = go * g.Cpg
                while c < (go + 1) * g.Cpg:
                    cend = _run_end(g, c, (go + 1) * g.Cpg)
                    gc = gcols + (nl * hb * g.Wo + r * g.Wo + wo) * CK + _col(g, c, k)
                    for q in range(4):
                        pq[q] = xs + m.o[4 * e + q] * g.C + c
                    sy = 0
                    sx = 0
                    sm = 0
                    if b == 15:             # interior: lx = dwy[3], ly = dwx[3]
                        lx = dwy[4 * e + 3]
                        ly = dwx[4 * e + 3]
                        for i in range(cend - c):
                            gv = gc[i]
                            t0 = pq[1][i] - pq[0][i]
                            t1 = pq[3][i] - pq[2][i]
                            top = pq[0][i] + lx * t0
                            bot = pq[2][i] + lx * t1
                            sy = sy + gv * (bot - top)
                            sx = sx + gv * (t0 + ly * (t1 - t0))
                            sm = sm + gv * (top + ly * (bot - top))
                    for i in range(cend - c if b != 15 else 0):
                        for q in range(4):
                            v[q] = pq[q][i] if (b >> q) & 1 else 0
                        gv = gc[i]
                        sy = sy + gv * (dwy[4 * e] * v[0] + dwy[4 * e + 1] * v[1]
                                        + dwy[4 * e + 2] * v[2] + dwy[4 * e + 3] * v[3])
                        sx = sx + gv * (dwx[4 * e] * v[0] + dwx[4 * e + 1] * v[1]
                                        + dwx[4 * e + 2] * v[2] + dwx[4 * e + 3] * v[3])
                        sm = sm + gv * (wt[4 * e] * v[0] + wt[4 * e + 1] * v[1]
                                        + wt[4 * e + 2] * v[2] + wt[4 * e + 3] * v[3])
                    ay += sy                 # float64 across runs of channels
                    ax += sx
                    am += sm
                    c = cend
            oy = ((n * g.G + go) * 2 * g.K + 2 * k) * HoWo + ho * g.Wo + wo
            om = ((n * g.G + go) * g.K + k) * HoWo + ho * g.Wo + wo
            mk = msk[om] if g.has_mask else 1.0
            goff[oy] = <floating>(ay * mk)
            goff[oy + HoWo] = <floating>(ax * mk)
            if g.has_mask:
                gmask[om] = <floating>am


# ---------------------------------------------------------------- parallel drivers

cdef int _run(int which, const Geo* g, const floating* x, const floating* off,
              const floating* msk, floating* cols, floating* gx, floating* goff,
              floating* gmask, Py_ssize_t n0, Py_ssize_t nb, Py_ssize_t ho0, Py_ssize_t hb,
              int nthreads) noexcept nogil:
    """which: 0 im2col (x -> cols), 1 col2im (cols -> gx), 2 coordinate gradients; x and gx are
    the chunk's samples, channels-last (nb, H, W, C)."""
    cdef Py_ssize_t units, u, mb = _meta_bytes(g.K * g.Wo)
    cdef char* buf = <char*>malloc(nthreads * mb)
    cdef int tid
    if buf == NULL:
        return -1
    if which == 1:
        units = nb * g.G * ((g.Cpg + COL2IM_BLOCK - 1) // COL2IM_BLOCK)
    else:
        units = nb * g.G * hb
    for u in prange(units, num_threads=nthreads, schedule="dynamic", chunksize=1):
        tid = threadid()
        if which == 0:
            _im2col_unit(g, x, off, msk, cols, n0, ho0, hb, u, buf + tid * mb)
        elif which == 1:
            _col2im_unit(g, off, msk, cols, gx, n0, ho0, hb, u, buf + tid * mb)
        else:
            _coord_unit(g, x, off, msk, cols, goff, gmask, n0, ho0, hb, u, buf + tid * mb)
    free(buf)
    return 0


cdef void _pack_weight(const floating* w, floating* wp, Py_ssize_t Cout, Py_ssize_t groups,
                       Py_ssize_t Cw, Py_ssize_t K, Py_ssize_t NR, int nthreads) noexcept nogil:
    """weight (C_out, C_w, kh, kw) -> per weight group, panels of NR output channels (the GEMM
    kernel's) wp[group][panel][k * C_w + c][NR] in the columns' order (zero beyond the group's
    channels)."""
    cdef Py_ssize_t Cog = Cout // groups, KCw = K * Cw
    cdef Py_ssize_t npan = (Cog + NR - 1) // NR, u, gi, j, r, o, kk, c
    cdef floating* dst
    for u in prange(groups * npan, num_threads=nthreads, schedule="static"):
        gi = u // npan
        j = u % npan
        dst = wp + u * KCw * NR
        for r in range(NR):
            o = j * NR + r
            if o < Cog:
                o = o + gi * Cog
                for kk in range(K):
                    for c in range(Cw):
                        dst[(kk * Cw + c) * NR + r] = w[(o * Cw + c) * K + kk]
            else:
                for kk in range(KCw):
                    dst[kk * NR + r] = 0


cdef void _forward_fused(const Geo* g, const floating* xt, const floating* off,
                         const floating* msk, const floating* wp, const floating* bias,
                         floating* y, Py_ssize_t n0, Py_ssize_t nb, Py_ssize_t Cout,
                         Py_ssize_t groups, Py_ssize_t nblk, Py_ssize_t MR, Py_ssize_t NR,
                         char* buf, int nthreads) noexcept nogil:
    """y[n0:n0 + nb] of the chunk (channels-last input xt), parallel over (sample, block of
    output positions; nblk blocks per sample of whole micro-tiles of MR positions, sizes
    differing by at most one micro-tile): a unit samples its columns into a thread-local tile
    (P, groups, K * C_w) and, while it is in cache, multiplies it by each weight group's packed
    panels wp (register-blocked micro-kernel, deform_conv_gemm.h), writing y (+ bias) directly.
    Each output is one sum over k in a fixed order whatever thread computes it: any thread count
    gives the same bits."""
    cdef Py_ssize_t HoWo = g.Ho * g.Wo, CK = g.C * g.K, KCw = g.K * g.Cw, Cog = Cout // groups
    cdef Py_ssize_t npan = (Cog + NR - 1) // NR
    cdef Py_ssize_t mt = (HoWo + MR - 1) // MR                         # micro-tiles per sample
    cdef Py_ssize_t P = (mt + nblk - 1) // nblk * MR                   # positions per block, max
    cdef Py_ssize_t mb = _meta_bytes(g.K * P)
    cdef Py_ssize_t per = _fused_bytes(g, nblk, sizeof(floating), MR)
    cdef Py_ssize_t u, nl, b, p0, np_, go, gi, i
    cdef char* base
    cdef floating* tile
    cdef floating* out
    cdef Meta m
    for u in prange(nb * nblk, num_threads=nthreads, schedule="dynamic", chunksize=1):
        base = buf + threadid() * per
        m = _meta(base, g.K * P)
        tile = <floating*>(base + mb)
        nl = u // nblk
        b = u % nblk
        p0 = b * mt // nblk * MR
        np_ = min((b + 1) * mt // nblk * MR, HoWo) - p0
        for go in range(g.G):
            _sample(g, xt + nl * g.H * g.W * g.C, off, msk, n0 + nl, go, p0, np_, tile, &m)
        for i in range(np_ * CK, (np_ + MR - 1) // MR * MR * CK):
            tile[i] = 0                  # rows the last micro-tile reads but does not store
        for gi in range(groups):
            out = y + ((n0 + nl) * Cout + gi * Cog) * HoWo + p0
            if floating is float:
                dc_gemm_f32(tile + gi * KCw, CK, np_, KCw, wp + gi * npan * KCw * NR, Cog,
                            bias + gi * Cog if bias != NULL else NULL, out, HoWo, 0)
            else:
                dc_gemm_f64(tile + gi * KCw, CK, np_, KCw, wp + gi * npan * KCw * NR, Cog,
                            bias + gi * Cog if bias != NULL else NULL, out, HoWo, 0)


cdef inline Py_ssize_t _fused_bytes(const Geo* g, Py_ssize_t nblk, Py_ssize_t itemsize,
                                    Py_ssize_t MR) noexcept nogil:
    """Bytes of one thread's workspace in the fused forward (sampling metadata + column tile)."""
    cdef Py_ssize_t P = ((g.Ho * g.Wo + MR - 1) // MR + nblk - 1) // nblk * MR
    return _meta_bytes(g.K * P) + _align64(P * g.C * g.K * itemsize)


cdef _forward_fused_f(Geo g, const floating[::1] x, floating[::1] xt, const floating[::1] off,
                      const floating[::1] msk, const floating[::1] w, floating[::1] wp,
                      const floating[::1] bias, floating[::1] y, unsigned char[::1] tiles,
                      Py_ssize_t nbmax, Py_ssize_t Cout, Py_ssize_t groups, Py_ssize_t nblk,
                      Py_ssize_t MR, Py_ssize_t NR, bint has_bias, int nthreads):
    """All chunks of nbmax samples: channels-last copy into xt, then the fused kernel."""
    cdef Py_ssize_t n0, nb, chw = g.C * g.H * g.W
    nthreads = max(nthreads, 1)
    with nogil:
        _pack_weight(&w[0], &wp[0], Cout, groups, g.Cw, g.K, NR, nthreads)
        n0 = 0
        while n0 < g.N:
            nb = min(nbmax, g.N - n0)
            _relayout(True, &x[n0 * chw], &xt[0], nb, g.C, g.H, g.W, nthreads)
            _forward_fused(&g, &xt[0], &off[0], &msk[0] if g.has_mask else NULL, &wp[0],
                           &bias[0] if has_bias else NULL, &y[0], n0, nb, Cout, groups, nblk,
                           MR, NR, <char*>&tiles[0], nthreads)
            n0 += nb


cdef enum:
    RELAYOUT_C = 16      # channels per relayout unit (one cache line of float32)
    RELAYOUT_P = 1024    # positions per relayout unit
    RELAYOUT_Q = 64      # positions per transposed tile


cdef inline void _move(bint to_nhwc, const floating* src, floating* dst, Py_ssize_t i_nhwc,
                       Py_ssize_t i_nchw) noexcept nogil:
    if to_nhwc:
        dst[i_nhwc] = src[i_nchw]
    else:
        dst[i_nchw] += src[i_nhwc]


cdef void _relayout(bint to_nhwc, const floating* src, floating* dst, Py_ssize_t N,
                    Py_ssize_t C, Py_ssize_t H, Py_ssize_t W, int nthreads) noexcept nogil:
    """to_nhwc: dst (N, H, W, C) = src (N, C, H, W); else dst (N, C, H, W) += src (N, H, W, C).
    Parallel over (sample, block of RELAYOUT_C channels, block of positions), each unit owning
    its elements. The block's channel planes are walked together position by position (whole
    cache lines on the channels-last side) -- unless the plane size is a multiple of 4 KiB,
    where those RELAYOUT_C streams would share cache sets: then in RELAYOUT_Q-position runs
    per channel instead."""
    cdef Py_ssize_t HW = H * W, ncb = (C + RELAYOUT_C - 1) // RELAYOUT_C
    cdef Py_ssize_t npb = (HW + RELAYOUT_P - 1) // RELAYOUT_P, u, n, c0, c1, p0, p1, p, c, q, q1
    cdef bint runs = (HW * sizeof(floating)) % 4096 == 0
    for u in prange(N * ncb * npb, num_threads=nthreads, schedule="static"):
        n = u // (ncb * npb)
        c0 = (u // npb) % ncb * RELAYOUT_C
        c1 = min(C, c0 + RELAYOUT_C)
        p0 = u % npb * RELAYOUT_P
        p1 = min(HW, p0 + RELAYOUT_P)
        for q in range(p0 // RELAYOUT_Q, (p1 + RELAYOUT_Q - 1) // RELAYOUT_Q):
            q1 = min(p1, (q + 1) * RELAYOUT_Q)   # positions q * RELAYOUT_Q .. q1
            if runs:
                for c in range(c0, c1):
                    for p in range(q * RELAYOUT_Q, q1):
                        _move(to_nhwc, src, dst, (n * HW + p) * C + c, (n * C + c) * HW + p)
            else:
                for p in range(q * RELAYOUT_Q, q1):
                    for c in range(c0, c1):
                        _move(to_nhwc, src, dst, (n * HW + p) * C + c, (n * C + c) * HW + p)


cdef _relayout_f(bint to_nhwc, const floating[::1] src, floating[::1] dst, Py_ssize_t N,
                 Py_ssize_t C, Py_ssize_t H, Py_ssize_t W, int nthreads):
    with nogil:
        _relayout(to_nhwc, &src[0], &dst[0], N, C, H, W, max(nthreads, 1))


def _to_channels_last(x, int nthreads, out=None):
    """(N, C, H, W) -> C-contiguous (N, H, W, C): new, or written into the flat buffer out."""
    N, C, H, W = x.shape
    xt = np.empty((N, H, W, C), dtype=x.dtype) if out is None else \
        out[:N * H * W * C].reshape(N, H, W, C)
    if xt.size:
        if x.dtype == np.float32:
            _relayout_f[float](True, x.reshape(-1), xt.reshape(-1), N, C, H, W, nthreads)
        else:
            _relayout_f[double](True, x.reshape(-1), xt.reshape(-1), N, C, H, W, nthreads)
    return xt


def _add_channels_first(gx, gxt, int nthreads):
    """gx (N, C, H, W) += gxt (N, H, W, C); gx is a C-contiguous block of samples."""
    N, C, H, W = gx.shape
    if gx.size:
        if gx.dtype == np.float32:
            _relayout_f[float](False, gxt.reshape(-1), gx.reshape(-1), N, C, H, W, nthreads)
        else:
            _relayout_f[double](False, gxt.reshape(-1), gx.reshape(-1), N, C, H, W, nthreads)


cdef _dispatch(int which, Geo g, const floating[::1] x, const floating[::1] off,
               const floating[::1] msk, floating[::1] cols, floating[::1] gx,
               floating[::1] goff, floating[::1] gmask, Py_ssize_t n0, Py_ssize_t nb,
               Py_ssize_t ho0, Py_ssize_t hb, int nthreads):
    cdef int rc
    with nogil:
        rc = _run(which, &g, &x[0], &off[0], &msk[0] if g.has_mask else NULL, &cols[0],
                  &gx[0], &goff[0], &gmask[0], n0, nb, ho0, hb, max(nthreads, 1))
    if rc != 0:
        raise MemoryError("deform_conv2d: out of memory for the sampling workspace")


# ---------------------------------------------------------------- Python entry points

def _geometry(x, offset, mask, weight, stride, padding, dilation):
    cdef Geo g
    g.N, g.C, g.H, g.W = x.shape
    g.kh, g.kw = weight.shape[2], weight.shape[3]
    g.K = g.kh * g.kw
    g.Ho, g.Wo = offset.shape[2], offset.shape[3]
    (g.sh, g.sw), (g.ph, g.pw), (g.dh, g.dw) = stride, padding, dilation
    g.G = offset.shape[1] // (2 * g.K)
    g.Cpg = g.C // g.G
    g.has_mask = mask is not None
    g.Cw = weight.shape[1]
    return g


def _chunks(Py_ssize_t N, Py_ssize_t Ho, Py_ssize_t chunk_rows):
    """(n0, nb, ho0, hb) blocks of at most ``chunk_rows`` output rows: whole samples when one
    fits, else row blocks of one sample."""
    chunk_rows = max(chunk_rows, 1)
    if chunk_rows >= Ho:
        nb = chunk_rows // Ho
        return [(n0, min(nb, N - n0), 0, Ho) for n0 in range(0, N, nb)]
    return [(n, 1, h0, min(chunk_rows, Ho - h0)) for n in range(N) for h0 in range(0, Ho, chunk_rows)]


cdef _call(int which, Geo g, x, off, msk, cols, gx, goff, gmask, Py_ssize_t n0, Py_ssize_t nb,
           Py_ssize_t ho0, Py_ssize_t hb, int nthreads):
    """Run kernel ``which`` on one chunk; None arrays are replaced by a dummy that is never read."""
    dummy = np.zeros(1, dtype=x.dtype)     # writable: it may stand for an output
    a = [x, off, msk, cols, gx, goff, gmask]
    a = [dummy if v is None else v.reshape(-1) for v in a]
    if x.dtype == np.float32:
        _dispatch[float](which, g, a[0], a[1], a[2], a[3], a[4], a[5], a[6], n0, nb, ho0, hb,
                         nthreads)
    else:
        _dispatch[double](which, g, a[0], a[1], a[2], a[3], a[4], a[5], a[6], n0, nb, ho0, hb,
                          nthreads)


def _columns(cols_buf, nb, L, groups, KCw):
    """The chunk's columns (nb, L, groups, K * C_w) at the start of the workspace."""
    return cols_buf[:nb * L * groups * KCw].reshape(nb, L, groups, KCw)


def _weight_matrix(weight, groups):
    """weight (C_out, C_w, kh, kw) -> (groups, C_out/groups, kh * kw * C_w), the column order."""
    Cout = weight.shape[0]
    return np.ascontiguousarray(weight.transpose(0, 2, 3, 1)).reshape(groups, Cout // groups, -1)


def forward(x, offset, mask, weight, bias, stride, padding, dilation, Py_ssize_t chunk_rows,
            int nthreads):
    """y: the contract fastnorm._kernels.DeformConvForward (stride, padding, dilation are
    (h, w) pairs); shapes already validated (see fastnorm.deform_conv)."""
    cdef Geo g = _geometry(x, offset, mask, weight, stride, padding, dilation)
    Cout = weight.shape[0]
    groups = g.C // weight.shape[1]
    y = np.zeros((g.N, Cout, g.Ho, g.Wo), dtype=x.dtype) if g.N * Cout == 0 or g.H * g.W == 0 \
        else _cache.empty((g.N, Cout, g.Ho, g.Wo), x.dtype)        # every element is written
    if y.size == 0 or g.H * g.W == 0:
        if bias is not None:
            y += bias.reshape(-1, 1, 1)
        return y
    cdef Py_ssize_t item = x.dtype.itemsize, MR, NR
    dc_gemm_shape(item, &MR, &NR)
    nblk = _blocks(g, item, MR)
    nbmax = min(g.N, max(1, chunk_rows // g.Ho))  # whole samples per channels-last copy
    nthreads = max(nthreads, 1)
    sizes = [nbmax * g.C * g.H * g.W * item,                                 # channels-last x
             groups * -(-(Cout // groups) // NR) * NR * g.K * g.Cw * item,    # packed weight
             nthreads * _fused_bytes(&g, nblk, item, MR)]                     # per-thread tiles
    xt, wp, tiles = _workspace(sizes)
    xt, wp = xt.view(x.dtype), wp.view(x.dtype)
    dummy = offset.reshape(-1)[:1]
    a = [x, offset, dummy if mask is None else mask, weight, dummy if bias is None else bias, y]
    a = [v.reshape(-1) for v in a]
    if x.dtype == np.float32:
        _forward_fused_f[float](g, a[0], xt, a[1], a[2], a[3], wp, a[4], a[5], tiles, nbmax,
                                Cout, groups, nblk, MR, NR, bias is not None, nthreads)
    else:
        _forward_fused_f[double](g, a[0], xt, a[1], a[2], a[3], wp, a[4], a[5], tiles, nbmax,
                                 Cout, groups, nblk, MR, NR, bias is not None, nthreads)
    return y


def _workspace(sizes):
    """64-byte-aligned flat uint8 views of the given sizes, carved from one buffer of the output
    cache: it returns there when the views die at the end of the call, so repeated calls reuse
    resident memory (no fresh pages to fault in) under the cache's limit, and
    fastnorm.empty_cache() releases it (a buffer under 1 MiB comes from the C library, as small
    outputs do)."""
    sizes = [(s + 63) // 64 * 64 for s in sizes]
    buf = _cache.empty(sum(sizes) + 64, np.uint8)
    o = -buf.ctypes.data % 64
    views = []
    for s in sizes:
        views.append(buf[o:o + s])
        o += s
    return views


#: Target bytes of one thread's column tile in the fused forward (positions per block follow):
#: the tile and one weight panel should stay in a core's L2 while the panels sweep over it.
TILE_BYTES = 512 << 10


def _blocks(Geo g, Py_ssize_t itemsize, Py_ssize_t MR):
    """Blocks of output positions per sample in the fused forward: about TILE_BYTES of columns
    per block (between 1 and 64 micro-tiles of MR positions)."""
    cdef Py_ssize_t mt = (g.Ho * g.Wo + MR - 1) // MR
    per = min(64, max(1, TILE_BYTES // max(1, MR * g.C * g.K * itemsize)))
    return (mt + per - 1) // per


class _ChannelsLast:
    """x[n0:n0 + nb] as (nb, H, W, C), recomputed only when the chunk's samples change."""

    def __init__(self, x, nthreads):
        self.x, self.nthreads, self.key, self.xt = x, nthreads, None, None

    def get(self, n0, nb):
        if self.key != (n0, nb):
            self.key = (n0, nb)
            self.xt = _to_channels_last(self.x[n0:n0 + nb], self.nthreads)
        return self.xt


def backward(grad_out, x, offset, mask, weight, stride, padding, dilation, Py_ssize_t chunk_rows,
             int nthreads):
    """(grad_x, grad_offset, grad_mask|None, grad_weight, grad_bias) of :func:`forward`
    (fastnorm._kernels.DeformConvBackward)."""
    cdef Geo g = _geometry(x, offset, mask, weight, stride, padding, dilation)
    Cout = weight.shape[0]
    groups = g.C // weight.shape[1]
    gx = np.zeros_like(x)
    goff = np.zeros_like(offset)
    gmask = None if mask is None else np.zeros_like(mask)
    gb = grad_out.sum(axis=(0, 2, 3), dtype=np.float64).astype(x.dtype)
    if g.N * Cout * g.Ho * g.Wo == 0 or g.H * g.W == 0:
        return gx, goff, gmask, np.zeros_like(weight), gb
    wmat = _weight_matrix(weight, groups)
    gwk = np.zeros_like(wmat)                       # grad of the reordered weight matrix
    go3 = grad_out.reshape(g.N, groups, Cout // groups, g.Ho * g.Wo)
    _backward_chunks(g, x, offset, mask, wmat, go3, gx, goff, gmask, gwk, chunk_rows, nthreads)
    gw = np.ascontiguousarray(gwk.reshape(Cout, g.kh, g.kw, g.Cw).transpose(0, 3, 1, 2))
    return gx, goff, gmask, gw, gb


# ---------------------------------------------------------------- the backward's GEMMs

cdef enum:
    GEMM_KB = 256   # reduction block of the backward's GEMMs (rows of a packed panel)


cdef void _gemm(const floating* A, Py_ssize_t a_rs, Py_ssize_t a_cs, const floating* B,
                Py_ssize_t b_rs, Py_ssize_t b_cs, floating* Cm, Py_ssize_t c_rs, Py_ssize_t M,
                Py_ssize_t Nn, Py_ssize_t Kd, bint accumulate, Py_ssize_t MR, Py_ssize_t NR,
                floating* Wp, floating* Tt, int nthreads) noexcept nogil:
    """Cm[m * c_rs + n] (+)= sum_k A[m, k] * B[k, n] for m < M, n < Nn, with X[i, j] at
    X[i * x_rs + j * x_cs], on the forward's micro-kernel: per block of GEMM_KB k, A is packed
    into panels of NR rows (Wp) and B transposed into rows of n (Tt, padded to a multiple of MR),
    then each panel of C is one kernel call (parallel over panels). The k blocks are added in
    order, so the result does not depend on the thread count. Wp holds ceil(M / NR) * NR *
    min(Kd, GEMM_KB) values, Tt ceil(Nn / MR) * MR * min(Kd, GEMM_KB)."""
    cdef Py_ssize_t npan = (M + NR - 1) // NR, Np = (Nn + MR - 1) // MR * MR
    cdef Py_ssize_t nkb = (Kd + GEMM_KB - 1) // GEMM_KB, ib, k0, kb, j, r, k, n, n1, m
    for ib in range(nkb):
        k0 = ib * GEMM_KB
        kb = min(<Py_ssize_t>GEMM_KB, Kd - k0)
        with parallel(num_threads=nthreads):
            for j in prange(npan, schedule="static"):          # A's panels: Wp[j][k][r]
                if a_cs == 1:
                    for r in range(NR):
                        m = j * NR + r
                        for k in range(kb):
                            Wp[(j * kb + k) * NR + r] = A[m * a_rs + k0 + k] if m < M else 0
                else:
                    for k in range(kb):
                        for r in range(NR):
                            m = j * NR + r
                            Wp[(j * kb + k) * NR + r] = (A[m * a_rs + (k0 + k) * a_cs] if m < M
                                                         else 0)
            for n1 in prange((Np + 15) // 16, schedule="static"):   # B transposed: Tt[n][k]
                if b_rs == 1:
                    for n in range(n1 * 16, min(Np, n1 * 16 + 16)):
                        for k in range(kb):
                            Tt[n * kb + k] = B[k0 + k + n * b_cs] if n < Nn else 0
                else:
                    for k in range(kb):
                        for n in range(n1 * 16, min(Np, n1 * 16 + 16)):
                            Tt[n * kb + k] = B[(k0 + k) * b_rs + n * b_cs] if n < Nn else 0
            for j in prange(npan, schedule="static"):
                if floating is float:
                    dc_gemm_f32(Tt, kb, Nn, kb, Wp + j * kb * NR, min(NR, M - j * NR), NULL,
                                Cm + j * NR * c_rs, c_rs, accumulate or ib > 0)
                else:
                    dc_gemm_f64(Tt, kb, Nn, kb, Wp + j * kb * NR, min(NR, M - j * NR), NULL,
                                Cm + j * NR * c_rs, c_rs, accumulate or ib > 0)


cdef _gemm_f(const floating[::1] A, Py_ssize_t a_rs, Py_ssize_t a_cs, const floating[::1] B,
             Py_ssize_t b_rs, Py_ssize_t b_cs, floating[::1] Cm, Py_ssize_t c_rs, Py_ssize_t M,
             Py_ssize_t Nn, Py_ssize_t Kd, bint accumulate, Py_ssize_t MR, Py_ssize_t NR,
             floating[::1] Wp, floating[::1] Tt, int nthreads):
    with nogil:
        _gemm(&A[0], a_rs, a_cs, &B[0], b_rs, b_cs, &Cm[0], c_rs, M, Nn, Kd, accumulate, MR, NR,
              &Wp[0], &Tt[0], max(nthreads, 1))


def _gemm_call(A, a_rs, a_cs, B, b_rs, b_cs, Cm, c_rs, M, Nn, Kd, accumulate, MR, NR, Wp, Tt,
               nthreads):
    """_gemm on flat NumPy arrays (views starting at the operands' first elements)."""
    if A.dtype == np.float32:
        _gemm_f[float](A, a_rs, a_cs, B, b_rs, b_cs, Cm, c_rs, M, Nn, Kd, accumulate, MR, NR, Wp,
                       Tt, nthreads)
    else:
        _gemm_f[double](A, a_rs, a_cs, B, b_rs, b_cs, Cm, c_rs, M, Nn, Kd, accumulate, MR, NR,
                        Wp, Tt, nthreads)


def _gemm_buffers(Py_ssize_t M, Py_ssize_t Nn, Py_ssize_t Kd, Py_ssize_t MR, Py_ssize_t NR):
    """Sizes of _gemm's packing buffers (Wp, Tt)."""
    cdef Py_ssize_t kb = min(Kd, <Py_ssize_t>GEMM_KB)
    return (M + NR - 1) // NR * NR * kb, (Nn + MR - 1) // MR * MR * kb


cdef _backward_chunks(Geo g, x, offset, mask, wmat, go3, gx, goff, gmask, gw3,
                      Py_ssize_t chunk_rows, int nthreads):
    groups, Cout = wmat.shape[0], wmat.shape[0] * wmat.shape[1]
    cdef Py_ssize_t Cog = Cout // groups, KCw = g.K * g.Cw, L, MR, NR, gi
    dc_gemm_shape(x.dtype.itemsize, &MR, &NR)
    plan = _chunks(g.N, g.Ho, chunk_rows)
    Lmax = max(nb * hb for _, nb, _, hb in plan) * g.Wo
    cols_buf = np.empty(Lmax * g.C * g.K, dtype=x.dtype)
    gxt_buf = np.empty(max(nb for _, nb, _, _ in plan) * g.H * g.W * g.C, dtype=x.dtype)
    sizes = [_gemm_buffers(KCw, Cog, Lmax, MR, NR), _gemm_buffers(Lmax, KCw, Cog, MR, NR)]
    Wp = np.empty(max(s[0] for s in sizes), dtype=x.dtype)
    Tt = np.empty(max(s[1] for s in sizes), dtype=x.dtype)
    wflat = wmat.reshape(-1)
    gwt = np.zeros((groups, KCw, Cog), dtype=x.dtype)   # grad of the weight matrix, transposed
    gwflat = gwt.reshape(-1)
    xt = _ChannelsLast(x, nthreads)
    for n0, nb, ho0, hb in plan:
        L = nb * hb * g.Wo
        cols = _columns(cols_buf, nb, hb * g.Wo, groups, KCw)
        xtc = xt.get(n0, nb)
        _call(0, g, xtc, offset, mask, cols, None, None, None, n0, nb, ho0, hb, nthreads)
        # grad_out of the chunk as (groups, C_out/groups, L), for two GEMMs per group
        gout = np.ascontiguousarray(go3[n0:n0 + nb, :, :, ho0 * g.Wo:(ho0 + hb) * g.Wo]
                                    .transpose(1, 2, 0, 3)).reshape(-1)
        cflat = cols.reshape(-1)
        for gi in range(groups):
            # grad_weight[gi]^T (K C_w, C_out/groups) += columns[:, gi]^T @ grad_out[gi]^T: packs
            # rows of the columns and of grad_out as they lie
            _gemm_call(cflat[gi * KCw:], 1, groups * KCw, gout[gi * Cog * L:], 1, L,
                       gwflat[gi * KCw * Cog:], Cog, KCw, Cog, L, True, MR, NR, Wp, Tt, nthreads)
            # then the columns are replaced by their gradient grad_out[gi]^T @ wmat[gi]
            _gemm_call(gout[gi * Cog * L:], 1, L, wflat[gi * Cog * KCw:], KCw, 1,
                       cflat[gi * KCw:], groups * KCw, L, KCw, Cog, False, MR, NR, Wp, Tt,
                       nthreads)
        gxt = gxt_buf[:nb * g.H * g.W * g.C].reshape(nb, g.H, g.W, g.C)
        gxt[...] = 0
        _call(1, g, xtc, offset, mask, cols, gxt, None, None, n0, nb, ho0, hb, nthreads)
        _add_channels_first(gx[n0:n0 + nb], gxt, nthreads)
        _call(2, g, xtc, offset, mask, cols, None, goff, gmask, n0, nb, ho0, hb, nthreads)
    gw3 += gwt.transpose(0, 2, 1)
