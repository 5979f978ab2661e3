# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False, embedsignature=True
"""GroupNorm forward and backward on the CPU (OpenMP, GIL released).

Work is cut into *units* whose boundaries depend only on the shape, never on the thread count:
NCHW: a unit is a chunk of at most ``CHUNK`` elements of one (n, c) row; channels-last: a block of
spatial positions of one image with at most about ``CHUNK`` elements. Each unit computes its
moments with a two-pass (mean, then squared deviations) sum in float64, and the units of a group
are merged in a fixed order with Chan's formula. So statistics are exact to float64 rounding, have
no E[x^2]-E[x]^2 cancellation, and results are bitwise identical for any thread count.

When a group fits in cache and there are at least as many groups as threads, each thread takes
whole groups and normalises them while they are still in cache ("fused"); otherwise statistics and
normalisation are two parallel sweeps over all units. Both paths do the same arithmetic.
"""
import numpy as np
cimport numpy as cnp
from cython.parallel cimport prange, parallel, threadid
from libc.math cimport sqrt, exp, expf, fabs, isfinite
from libc.stdlib cimport malloc, free

from _types cimport floating
from fastnorm._cpu import _pool as _cache   # output arrays from the caching allocator

cnp.import_array()

cdef Py_ssize_t CHUNK = 16384          # elements per statistics unit
cdef Py_ssize_t FUSE_BYTES = 1 << 20   # groups up to this size are normalised while in cache
cdef Py_ssize_t CACHE_BYTES = 4 << 20  # images per batch: input bytes kept in the last-level cache

# fused activations: fastnorm._kernels.ACTIVATIONS (tests/test_contract.py)
cdef enum:
    ACT_NONE = 0
    ACT_RELU = 1
    ACT_SILU = 2


# ---------------------------------------------------------------- scalar helpers

cdef inline floating _act(floating z, int act) noexcept nogil:
    if act == ACT_RELU:
        return z if z > 0 else 0
    if act == ACT_SILU:
        if floating is float:
            return z / (1.0 + expf(-z))
        else:
            return z / (1.0 + exp(-z))
    return z


cdef inline floating _act_grad(floating z, int act) noexcept nogil:
    """d act(z) / dz."""
    cdef floating s
    if act == ACT_RELU:
        return 1 if z > 0 else 0
    if act == ACT_SILU:
        if floating is float:
            s = 1.0 / (1.0 + expf(-z))
        else:
            s = 1.0 / (1.0 + exp(-z))
        return s * (1 + z * (1 - s))
    return 1


cdef extern from "_simd.h" nogil:
    void fn_colsum_f(const float* x, Py_ssize_t P, Py_ssize_t C, const float* unused,
                     double* s1, double* s2)
    void fn_colsum_d(const double* x, Py_ssize_t P, Py_ssize_t C, const double* unused,
                     double* s1, double* s2)
    void fn_coldev_f(const float* x, Py_ssize_t P, Py_ssize_t C, const float* k,
                     double* s1, double* s2)
    void fn_coldev_d(const double* x, Py_ssize_t P, Py_ssize_t C, const double* k,
                     double* s1, double* s2)
    void fn_colgrad_f(const float* dy, Py_ssize_t P, Py_ssize_t C, const float* x,
                      const float* m, const float* r, double* s1, double* s2)
    void fn_colgrad_d(const double* dy, Py_ssize_t P, Py_ssize_t C, const double* x,
                      const double* m, const double* r, double* s1, double* s2)
    double fn_sum_f(const float* x, Py_ssize_t n)
    double fn_sum_d(const double* x, Py_ssize_t n)
    void fn_dev_sums_f(const float* x, Py_ssize_t n, float k, double* sd, double* sq)
    void fn_dev_sums_d(const double* x, Py_ssize_t n, double k, double* sd, double* sq)
    void fn_act_f(float* y, Py_ssize_t n, int act)       # in place: 1 relu, 2 silu
    void fn_dz_f(const float* dy, const float* x, float* dz, Py_ssize_t n, float mean,
                 float rstd, float w, float b, int act)
    void fn_dzcols_f(Py_ssize_t P, Py_ssize_t C, const float* dy, const float* x, float* dz,
                     const float* m, const float* r, const float* w, const float* b, int act)
    void fn_axpb_f(Py_ssize_t P, Py_ssize_t C, const float* x, float* y, const float* a,
                   const float* b, int relu)
    void fn_axpb_d(Py_ssize_t P, Py_ssize_t C, const double* x, double* y, const double* a,
                   const double* b, int relu)
    void fn_gradx_f(Py_ssize_t P, Py_ssize_t C, const float* dy, const float* x, float* gx,
                    const float* a, const float* b, const float* d)
    void fn_gradx_d(Py_ssize_t P, Py_ssize_t C, const double* dy, const double* x, double* gx,
                    const double* a, const double* b, const double* d)
    void fn_grad_sums_f(const float* dy, Py_ssize_t n, const float* x, float mean, float rstd,
                        double* s_dy, double* s_dyx)
    void fn_grad_sums_d(const double* dy, Py_ssize_t n, const double* x, double mean, double rstd,
                        double* s_dy, double* s_dyx)


cdef enum:
    PILOT = 256     # elements (NCHW) whose mean is the shift of the deviation sums
    PILOT_ROWS = 8  # positions (channels-last) likewise


cdef void _dev_sums_double(const float* x, Py_ssize_t n, Py_ssize_t stride, double k,
                           double* sd, double* sq) noexcept nogil:
    """fn_dev_sums_f (stride 1) or one channel of fn_coldev_f (stride C) in double: sums of
    d = x[i * stride] - k and of d * d, i < n (the slow path for deviations whose float squares
    overflow; non-finite data stays non-finite)."""
    cdef Py_ssize_t i
    cdef double d
    sd[0] = 0
    sq[0] = 0
    for i in range(n):
        d = x[i * stride] - k
        sd[0] += d
        sq[0] += d * d


cdef inline void _moments(const floating* x, Py_ssize_t n, double* mean, double* m2) noexcept nogil:
    """Mean and sum of squared deviations of x[0:n], robustly, in one pass over memory.

    Sums of d = x - K and d*d give mean = K + sum(d)/n and M2 = sum(d^2) - sum(d)^2/n, exact for
    any shift K and well conditioned when K is near the mean. K is the mean of the first PILOT
    elements; if it turns out farther from the mean than one standard deviation (a pathological
    layout), the sums are redone around the mean just found (the data is then in cache).
    """
    cdef floating K
    cdef double sd, sq, mu, M2
    cdef Py_ssize_t n0 = min(n, <Py_ssize_t>PILOT), attempt
    if floating is float:
        K = <float>(fn_sum_f(x, n0) / n0)
    else:
        K = fn_sum_d(x, n0) / n0
    for attempt in range(2):
        if floating is float:
            fn_dev_sums_f(x, n, K, &sd, &sq)
            if not isfinite(sq):        # float squares overflowed (|d| > ~1.8e19): in double
                _dev_sums_double(x, n, 1, K, &sd, &sq)
        else:
            fn_dev_sums_d(x, n, K, &sd, &sq)
        mu = K + sd / n
        M2 = max(sq - sd * sd / n, 0.0)
        if not (sd * sd / n > M2):      # (mean - K)^2 <= variance: accurate
            break
        K = <floating>mu
    mean[0] = mu
    m2[0] = M2


cdef inline void _merge(const double* pmean, const double* pm2, const double* pcnt, Py_ssize_t k,
                        double* mean, double* m2, double* cnt) noexcept nogil:
    """Chan's pairwise merge of k partial moments, in order."""
    cdef double na = 0, ma = 0, sa = 0, nb, nn, delta
    cdef Py_ssize_t i
    for i in range(k):
        nb = pcnt[i]
        if nb == 0:
            continue
        nn = na + nb
        delta = pmean[i] - ma
        ma = ma + delta * (nb / nn)
        sa = sa + pm2[i] + delta * delta * (na * nb / nn)
        na = nn
    mean[0] = ma
    m2[0] = sa
    cnt[0] = na


cdef inline void _finish(double mean, double m2, double cnt, double eps, double* out_dmean,
                         floating* out_mean, floating* out_rstd) noexcept nogil:
    cdef double var = m2 / cnt if cnt > 0 else 0
    out_dmean[0] = mean
    out_mean[0] = <floating>mean
    out_rstd[0] = <floating>(1.0 / sqrt(var + eps))


cdef enum:
    SHIFT_FORM_LIMIT = 64   # |mean| * rstd up to which y = x * scale + shift is accurate enough


cdef inline void _normalize_row(const floating* x, floating* y, Py_ssize_t n, double mean,
                                double rstd, floating scale, floating shift, int act) noexcept nogil:
    """y = act((x - mean) * scale + shift).

    When the mean is within SHIFT_FORM_LIMIT standard deviations of 0 this is one FMA,
    x * scale + (shift - mean * scale) (rounding error <= ~70 ulp of the output scale). Otherwise
    (a large common offset) the mean is split into a rounded part and its remainder so that
    x - mean stays exact-ish in float32.
    """
    cdef Py_ssize_t i
    cdef floating hi = <floating>mean
    cdef floating lo = <floating>(mean - hi)
    cdef floating t = <floating>(<double>shift - mean * <double>scale)
    cdef int inner = 0 if floating is float else act    # float: activation vectorised after
    if fabs(mean) * rstd <= SHIFT_FORM_LIMIT:
        if inner == 0:
            for i in range(n):
                y[i] = x[i] * scale + t
        else:
            for i in range(n):
                y[i] = _act(x[i] * scale + t, inner)
    elif inner == 0:
        for i in range(n):
            y[i] = ((x[i] - hi) - lo) * scale + shift
    else:
        for i in range(n):
            y[i] = _act(((x[i] - hi) - lo) * scale + shift, inner)
    if floating is float:
        if act != 0:
            fn_act_f(y, n, act)


# ---------------------------------------------------------------- NCHW forward

cdef void _nchw_unit_stats(const floating* x, Py_ssize_t u, Py_ssize_t S, Py_ssize_t nch,
                           double* pmean, double* pm2, double* pcnt) noexcept nogil:
    cdef Py_ssize_t row = u // nch, k = u % nch
    cdef Py_ssize_t start = k * CHUNK
    cdef Py_ssize_t n = min(CHUNK, S - start)
    _moments(x + row * S + start, n, &pmean[u], &pm2[u])
    pcnt[u] = n


cdef void _group_finish(Py_ssize_t ng, Py_ssize_t units_per_group, double eps,
                        double* pmean, double* pm2, double* pcnt, double* dmean,
                        floating* mean, floating* rstd) noexcept nogil:
    """Merge the units of group ng (contiguous in the partial arrays) into its statistics."""
    cdef double mu, m2, cnt
    cdef Py_ssize_t u0 = ng * units_per_group
    _merge(&pmean[u0], &pm2[u0], &pcnt[u0], units_per_group, &mu, &m2, &cnt)
    _finish(mu, m2, cnt, eps, &dmean[ng], &mean[ng], &rstd[ng])


cdef void _nchw_unit_normalize(const floating* x, floating* y, Py_ssize_t u, Py_ssize_t C,
                               Py_ssize_t S, Py_ssize_t nch, Py_ssize_t Cg,
                               const floating* w, const floating* b,
                               const double* dmean, const floating* rstd, int act) noexcept nogil:
    cdef Py_ssize_t row = u // nch, k = u % nch
    cdef Py_ssize_t c = row % C, ng = row // Cg       # row = n*C + c, so row // Cg = n*G + g
    cdef Py_ssize_t start = row * S + k * CHUNK
    cdef Py_ssize_t n = min(CHUNK, S - k * CHUNK)
    _normalize_row(x + start, y + start, n, dmean[ng], rstd[ng], rstd[ng] * w[c], b[c], act)


cdef int _forward_nchw(const floating* x, floating* y, const floating* w, const floating* b,
                       floating* mean, floating* rstd, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                       Py_ssize_t G, double eps, int act, int nthreads) noexcept nogil:
    cdef Py_ssize_t Cg = C // G, nch = (S + CHUNK - 1) // CHUNK
    cdef Py_ssize_t units = N * C * nch, upg = Cg * nch, ng, u
    cdef double* pmean = <double*>malloc((3 * units + N * G) * sizeof(double))
    cdef double* pm2 = pmean + units
    cdef double* pcnt = pm2 + units
    cdef double* dmean = pcnt + units
    cdef bint fused = Cg * S * sizeof(floating) <= FUSE_BYTES and N * G >= nthreads
    if pmean == NULL:
        return -1
    if fused:
        for ng in prange(N * G, num_threads=nthreads, schedule="dynamic"):
            for u in range(ng * upg, (ng + 1) * upg):
                _nchw_unit_stats(x, u, S, nch, pmean, pm2, pcnt)
            _group_finish(ng, upg, eps, pmean, pm2, pcnt, dmean, mean, rstd)
            for u in range(ng * upg, (ng + 1) * upg):
                _nchw_unit_normalize(x, y, u, C, S, nch, Cg, w, b, dmean, rstd, act)
    else:
        for u in prange(units, num_threads=nthreads, schedule="static"):
            _nchw_unit_stats(x, u, S, nch, pmean, pm2, pcnt)
        for ng in range(N * G):          # cheap: serial, no fork/join
            _group_finish(ng, upg, eps, pmean, pm2, pcnt, dmean, mean, rstd)
        for u in prange(units, num_threads=nthreads, schedule="static"):
            _nchw_unit_normalize(x, y, u, C, S, nch, Cg, w, b, dmean, rstd, act)
    free(pmean)
    return 0


# ---------------------------------------------------------------- channels-last forward

cdef inline Py_ssize_t _block_positions(Py_ssize_t C) noexcept nogil:
    return max(1, CHUNK // max(C, 1))


cdef void _nhwc_unit_stats(const floating* x, Py_ssize_t u, Py_ssize_t C, Py_ssize_t S,
                           Py_ssize_t G, Py_ssize_t T, Py_ssize_t nb, double* scratch,
                           double* pmean, double* pm2, double* pcnt) noexcept nogil:
    """Block u = (n, blk): per-group moments as in ``_moments`` (approximate mean K, then
    corrected sums of d = x - K), from per-channel column sums along the contiguous channel
    axis. ``scratch`` holds 3*C doubles."""
    cdef Py_ssize_t n = u // nb, blk = u % nb, Cg = C // G
    cdef Py_ssize_t p0 = blk * T, P = min(T, S - p0), c, g, idx
    cdef const floating* xb = x + (n * S + p0) * C
    cdef double* s1 = scratch
    cdef double* s2 = scratch + C
    cdef floating* k = <floating*>(scratch + 2 * C)
    cdef double sd, sq, mu, M2, cnt = <double>(P * Cg)
    cdef Py_ssize_t P0 = min(P, <Py_ssize_t>PILOT_ROWS), attempt
    cdef bint redo
    if floating is float:
        fn_colsum_f(xb, P0, C, NULL, s1, s2)
    else:
        fn_colsum_d(xb, P0, C, NULL, s1, s2)
    for g in range(G):
        sd = 0
        for c in range(g * Cg, (g + 1) * Cg):
            sd += s1[c]
        for c in range(g * Cg, (g + 1) * Cg):
            k[c] = <floating>(sd / (P0 * Cg))
    for attempt in range(2):
        if floating is float:
            fn_coldev_f(xb, P, C, k, s1, s2)
            for c in range(C):          # float squares overflowed (|d| > ~1.8e19): in double
                if not isfinite(s2[c]):
                    _dev_sums_double(xb + c, P, C, k[c], s1 + c, s2 + c)
        else:
            fn_coldev_d(xb, P, C, k, s1, s2)
        redo = False
        for g in range(G):
            sd = 0
            sq = 0
            for c in range(g * Cg, (g + 1) * Cg):
                sd += s1[c]
                sq += s2[c]
            mu = k[g * Cg] + sd / cnt
            M2 = max(sq - sd * sd / cnt, 0.0)
            idx = (n * G + g) * nb + blk                # a group's blocks are contiguous
            pmean[idx] = mu
            pm2[idx] = M2
            pcnt[idx] = cnt
            if sd * sd / cnt > M2:                      # shift too far from the mean: redo
                redo = True
                for c in range(g * Cg, (g + 1) * Cg):
                    k[c] = <floating>mu
        if not redo:
            break


cdef void _nhwc_unit_normalize(const floating* x, floating* y, Py_ssize_t u, Py_ssize_t C,
                               Py_ssize_t S, Py_ssize_t T, Py_ssize_t nb,
                               const floating* cmean, const floating* cscale, const floating* b,
                               const double* shift_form, int act) noexcept nogil:
    """Per channel: cmean holds the rounded group mean (N*C) then its remainder (N*C), or, for
    an image in shift form (see _normalize_row), the shift b - mean * scale then zeros."""
    cdef Py_ssize_t n = u // nb, blk = u % nb, p0 = blk * T, P = min(T, S - p0), p, c
    cdef Py_ssize_t off = (n * S + p0) * C
    cdef const floating* xb = x + off
    cdef floating* yb = y + off
    cdef const floating* m = cmean + 2 * n * C
    cdef const floating* lo = m + C
    cdef const floating* sc = cscale + n * C
    cdef bint fma = shift_form[n] != 0
    cdef int inner = 0 if floating is float else act    # float: activation vectorised after
    if fma and inner <= 1:                   # identity or relu: vector tiles
        if floating is float:
            fn_axpb_f(P, C, xb, yb, sc, m, 0)
        else:
            fn_axpb_d(P, C, xb, yb, sc, m, inner)
    else:
        for p in range(P):
            if fma:
                for c in range(C):
                    yb[p * C + c] = _act(xb[p * C + c] * sc[c] + m[c], inner)
            elif inner == 0:
                for c in range(C):
                    yb[p * C + c] = ((xb[p * C + c] - m[c]) - lo[c]) * sc[c] + b[c]
            else:
                for c in range(C):
                    yb[p * C + c] = _act(((xb[p * C + c] - m[c]) - lo[c]) * sc[c] + b[c], inner)
    if floating is float:
        if act != 0:
            fn_act_f(yb, P * C, act)


cdef void _channel_coeffs(Py_ssize_t N, Py_ssize_t C, Py_ssize_t G, const floating* w,
                          const floating* b, const double* dmean, const floating* rstd,
                          floating* cmean, floating* cscale, double* shift_form) noexcept nogil:
    """Per-channel normalisation coefficients of each image (see _nhwc_unit_normalize)."""
    cdef Py_ssize_t n, c, g, Cg = C // G
    cdef floating hi
    cdef double mu
    for n in range(N):
        shift_form[n] = 1
        for g in range(G):
            if not (fabs(dmean[n * G + g]) * rstd[n * G + g] <= SHIFT_FORM_LIMIT):
                shift_form[n] = 0
        for c in range(C):
            mu = dmean[n * G + c // Cg]
            cscale[n * C + c] = rstd[n * G + c // Cg] * w[c]
            if shift_form[n] != 0:
                cmean[2 * n * C + c] = <floating>(<double>b[c] - mu * <double>cscale[n * C + c])
                cmean[2 * n * C + C + c] = 0
            else:
                hi = <floating>mu
                cmean[2 * n * C + c] = hi
                cmean[2 * n * C + C + c] = <floating>(mu - hi)


cdef int _forward_nhwc(const floating* x, floating* y, const floating* w, const floating* b,
                       floating* mean, floating* rstd, floating* cmean, floating* cscale,
                       Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, Py_ssize_t G, double eps,
                       int act, int nthreads) noexcept nogil:
    cdef Py_ssize_t T = _block_positions(C), nb = (S + T - 1) // T, units = N * nb, u, ng
    cdef double* pmean = <double*>malloc(((3 * nb + 1) * N * G + N) * sizeof(double))
    cdef double* pm2 = pmean + N * G * nb
    cdef double* pcnt = pm2 + N * G * nb
    cdef double* dmean = pcnt + N * G * nb
    cdef double* shift_form = dmean + N * G
    cdef double* acc
    cdef double* accs = <double*>malloc(nthreads * 3 * C * sizeof(double))
    if pmean == NULL or accs == NULL:
        free(pmean)
        free(accs)
        return -1
    with parallel(num_threads=nthreads):
        acc = accs + threadid() * 3 * C          # per-thread scratch
        for u in prange(units, schedule="static"):
            _nhwc_unit_stats(x, u, C, S, G, T, nb, acc, pmean, pm2, pcnt)
    free(accs)
    for ng in range(N * G):              # cheap: serial, no fork/join
        _group_finish(ng, nb, eps, pmean, pm2, pcnt, dmean, mean, rstd)
    _channel_coeffs(N, C, G, w, b, dmean, rstd, cmean, cscale, shift_form)
    for u in prange(units, num_threads=nthreads, schedule="static"):
        _nhwc_unit_normalize(x, y, u, C, S, T, nb, cmean, cscale, b, shift_form, act)
    free(pmean)
    return 0


# ---------------------------------------------------------------- backward

cdef inline void _row_dz(const floating* dy, const floating* x, floating* dz, Py_ssize_t n,
                         floating mean, floating rstd, floating w, floating b,
                         int act) noexcept nogil:
    """dz = dy * act'(z), z = xhat * w + b, over one row segment (float: vectorised)."""
    cdef Py_ssize_t i
    if floating is float:
        fn_dz_f(dy, x, dz, n, mean, rstd, w, b, act)
    else:
        for i in range(n):
            dz[i] = dy[i] * _act_grad((x[i] - mean) * rstd * w + b, act)


cdef inline void _row_grad_sums(const floating* dy, const floating* x, floating* gx,
                                Py_ssize_t n, floating mean, floating rstd, floating w,
                                floating b, int act, double* sdz, double* sdzx) noexcept nogil:
    """sum(dz) and sum(dz * xhat) over one row segment, dz = dy * act'(z); with an activation
    dz is first written to gx (the grad_x pass then reads it there, see _row_grad_x)."""
    if act != 0:
        _row_dz(dy, x, gx, n, mean, rstd, w, b, act)
        dy = gx
    if floating is float:
        fn_grad_sums_f(dy, n, x, mean, rstd, sdz, sdzx)
    else:
        fn_grad_sums_d(dy, n, x, mean, rstd, sdz, sdzx)


cdef inline void _row_grad_x(const floating* dy, const floating* x, floating* gx, Py_ssize_t n,
                             floating mean, floating k1, floating k2, floating k3,
                             int act) noexcept nogil:
    """gx = k1 * dz + k2 * (x - mean) + k3 (dz = dy, or with an activation already in gx)."""
    cdef Py_ssize_t i
    if act != 0:
        dy = gx
    for i in range(n):
        gx[i] = k1 * dy[i] + k2 * (x[i] - mean) + k3


cdef void _grad_weight_bias(Py_ssize_t N, Py_ssize_t C, const double* sdz, const double* sdzx,
                            floating* gw, floating* gb) noexcept nogil:
    """grad_weight[c] = sum_n sum(dz xhat), grad_bias[c] = sum_n sum(dz), in batch order."""
    cdef Py_ssize_t n, c
    cdef double sw, sb
    for c in range(C):
        sw = 0
        sb = 0
        for n in range(N):
            sw += sdzx[n * C + c]
            sb += sdz[n * C + c]
        gw[c] = <floating>sw
        gb[c] = <floating>sb


cdef void _group_coeffs(Py_ssize_t ng, Py_ssize_t C, Py_ssize_t G, double M,
                        const double* sdz, const double* sdzx, const floating* w,
                        const floating* rstd, floating* k1, floating* k2,
                        floating* k3) noexcept nogil:
    """Per-(n, c) coefficients of grad_x = k1 dz + k2 (x - mean) + k3 for group ng = n*G + g,
    from grad_x = rstd (w dz - A/M - xhat B/M), A = sum_g w dz, B = sum_g w dz xhat."""
    cdef Py_ssize_t Cg = C // G, n = ng // G, g = ng % G, c
    cdef double A = 0, B = 0, r = rstd[ng]
    for c in range(g * Cg, (g + 1) * Cg):
        A += w[c] * sdz[n * C + c]
        B += w[c] * sdzx[n * C + c]
    for c in range(g * Cg, (g + 1) * Cg):
        k1[n * C + c] = <floating>(w[c] * r)
        k2[n * C + c] = <floating>(-B * r * r / M)
        k3[n * C + c] = <floating>(-A * r / M)


cdef void _nchw_unit_grad_sums(const floating* dy, const floating* x, floating* gx,
                               Py_ssize_t u, Py_ssize_t C, Py_ssize_t S, Py_ssize_t nch,
                               Py_ssize_t Cg, const floating* mean, const floating* rstd,
                               const floating* w, const floating* b, int act,
                               double* part) noexcept nogil:
    cdef Py_ssize_t row = u // nch, k = u % nch, c = row % C, ng = row // Cg
    cdef Py_ssize_t start = row * S + k * CHUNK, n = min(CHUNK, S - k * CHUNK)
    _row_grad_sums(dy + start, x + start, gx + start, n, mean[ng], rstd[ng], w[c], b[c], act,
                   &part[2 * u], &part[2 * u + 1])


cdef void _nchw_row_sums(Py_ssize_t row, Py_ssize_t nch, const double* part, double* sdz,
                         double* sdzx) noexcept nogil:
    """Merge the chunks of one (n, c) row, in order."""
    cdef Py_ssize_t i
    sdz[row] = 0
    sdzx[row] = 0
    for i in range(nch):
        sdz[row] += part[2 * (row * nch + i)]
        sdzx[row] += part[2 * (row * nch + i) + 1]


cdef void _nchw_unit_grad_x(const floating* dy, const floating* x, floating* gx, Py_ssize_t u,
                            Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, Py_ssize_t nch,
                            Py_ssize_t Cg, const floating* mean, const floating* k,
                            int act) noexcept nogil:
    cdef Py_ssize_t row = u // nch, kk = u % nch, ng = row // Cg
    cdef Py_ssize_t start = row * S + kk * CHUNK, n = min(CHUNK, S - kk * CHUNK)
    _row_grad_x(dy + start, x + start, gx + start, n, mean[ng], k[row], k[N * C + row],
                k[2 * N * C + row], act)


cdef int _backward_nchw(const floating* dy, const floating* x, const floating* mean,
                        const floating* rstd, const floating* w, const floating* b,
                        floating* gx, double* sdz, double* sdzx, floating* k,
                        Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, Py_ssize_t G, int act,
                        int nthreads) noexcept nogil:
    """Like the forward: whole groups per thread while they fit in cache (dy and x read from
    memory once), else parallel sweeps over all units. Both paths do the same arithmetic."""
    cdef Py_ssize_t Cg = C // G, nch = (S + CHUNK - 1) // CHUNK, units = N * C * nch
    cdef Py_ssize_t upg = Cg * nch, u, row, ng
    cdef double M = <double>(Cg * S)
    cdef double* part = <double*>malloc(2 * units * sizeof(double))
    cdef floating* k2 = k + N * C
    cdef floating* k3 = k + 2 * N * C
    cdef bint fused = 2 * Cg * S * sizeof(floating) <= FUSE_BYTES and N * G >= nthreads
    if part == NULL:
        return -1
    if fused:
        for ng in prange(N * G, num_threads=nthreads, schedule="dynamic"):
            for u in range(ng * upg, (ng + 1) * upg):
                _nchw_unit_grad_sums(dy, x, gx, u, C, S, nch, Cg, mean, rstd, w, b, act, part)
            for row in range(ng * Cg, (ng + 1) * Cg):
                _nchw_row_sums(row, nch, part, sdz, sdzx)
            _group_coeffs(ng, C, G, M, sdz, sdzx, w, rstd, k, k2, k3)
            for u in range(ng * upg, (ng + 1) * upg):
                _nchw_unit_grad_x(dy, x, gx, u, N, C, S, nch, Cg, mean, k, act)
    else:
        for u in prange(units, num_threads=nthreads, schedule="static"):
            _nchw_unit_grad_sums(dy, x, gx, u, C, S, nch, Cg, mean, rstd, w, b, act, part)
        for row in range(N * C):
            _nchw_row_sums(row, nch, part, sdz, sdzx)
        for ng in range(N * G):
            _group_coeffs(ng, C, G, M, sdz, sdzx, w, rstd, k, k2, k3)
        for u in prange(units, num_threads=nthreads, schedule="static"):
            _nchw_unit_grad_x(dy, x, gx, u, N, C, S, nch, Cg, mean, k, act)
    free(part)
    return 0


cdef int _backward_nhwc(const floating* dy, const floating* x, const floating* mean,
                        const floating* rstd, const floating* w, const floating* b,
                        floating* gx, double* sdz, double* sdzx, floating* k, floating* cmean,
                        floating* crstd, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, Py_ssize_t G,
                        int act, int nthreads) noexcept nogil:
    cdef Py_ssize_t Cg = C // G, T = _block_positions(C), nb = (S + T - 1) // T
    cdef Py_ssize_t units = N * nb, u, n, blk, p0, P, p, c, i, off
    cdef double* part = <double*>malloc((2 * units * C + N) * sizeof(double))
    cdef double* shift_form = part + 2 * units * C
    cdef double* a1
    cdef double* a2
    cdef const floating* g
    cdef const floating* m
    cdef const floating* r
    cdef const floating* k1
    cdef const floating* k2
    cdef const floating* k3
    if part == NULL:
        return -1
    for n in range(N):
        for c in range(C):
            cmean[n * C + c] = mean[n * G + c // Cg]
            crstd[n * C + c] = rstd[n * G + c // Cg]
    for u in prange(units, num_threads=nthreads, schedule="static"):
        n = u // nb
        blk = u % nb
        p0 = blk * T
        P = min(T, S - p0)
        off = (n * S + p0) * C
        a1 = part + 2 * u * C
        a2 = a1 + C
        m = cmean + n * C
        r = crstd + n * C
        g = dy + off
        if act != 0:                     # dz = dy * act'(z) into gx, read there again below
            if floating is float:
                fn_dzcols_f(P, C, dy + off, x + off, gx + off, m, r, w, b, act)
            else:
                for p in range(P):
                    for c in range(C):
                        i = off + p * C + c
                        gx[i] = dy[i] * _act_grad((x[i] - m[c]) * r[c] * w[c] + b[c], act)
            g = gx + off
        if floating is float:
            fn_colgrad_f(g, P, C, x + off, m, r, a1, a2)
        else:
            fn_colgrad_d(g, P, C, x + off, m, r, a1, a2)
    for n in range(N):
        for c in range(C):
            sdz[n * C + c] = 0
            sdzx[n * C + c] = 0
            for i in range(nb):
                sdz[n * C + c] += part[2 * (n * nb + i) * C + c]
                sdzx[n * C + c] += part[(2 * (n * nb + i) + 1) * C + c]
    for ng in range(N * G):
        _group_coeffs(ng, C, G, <double>(Cg * S), sdz, sdzx, w, rstd, k, k + N * C, k + 2 * N * C)
    for n in range(N):       # shift form (see _normalize_row): gx = k1 dy + k2 x + (k3 - k2 mean)
        shift_form[n] = 1
        for c in range(C):
            if not (fabs(cmean[n * C + c]) * crstd[n * C + c] <= SHIFT_FORM_LIMIT):
                shift_form[n] = 0
        if shift_form[n] != 0:
            for i in range(n * C, (n + 1) * C):
                k[2 * N * C + i] = <floating>(k[2 * N * C + i] - <double>k[N * C + i] * cmean[i])
    for u in prange(units, num_threads=nthreads, schedule="static"):
        n = u // nb
        blk = u % nb
        p0 = blk * T
        P = min(T, S - p0)
        off = (n * S + p0) * C
        m = cmean + n * C
        r = crstd + n * C
        k1 = k + n * C
        k2 = k + N * C + n * C
        k3 = k + 2 * N * C + n * C
        g = dy + off
        if act != 0:
            g = gx + off                 # dz, in place
        if shift_form[n] != 0:
            if floating is float:
                fn_gradx_f(P, C, g, x + off, gx + off, k1, k2, k3)
            else:
                fn_gradx_d(P, C, g, x + off, gx + off, k1, k2, k3)
            continue
        for p in range(P):
            for c in range(C):
                gx[off + p * C + c] = (k1[c] * g[p * C + c]
                                       + k2[c] * (x[off + p * C + c] - m[c]) + k3[c])
    free(part)
    return 0


# ---------------------------------------------------------------- Python entry points

def _dims(x, bint channels_last):
    cdef Py_ssize_t N = x.shape[0]
    cdef Py_ssize_t C = x.shape[x.ndim - 1] if channels_last else x.shape[1]
    cdef Py_ssize_t S = x.size // (N * C) if N * C > 0 else 0
    return N, C, S


def forward(x, weight, bias, int num_groups, double eps, bint channels_last, int activation,
            int nthreads):
    """y, mean, rstd = forward(x, weight, bias, G, eps, channels_last, act, nthreads).

    ``x`` C-contiguous float32/float64 of shape (N, C, *S) or (N, *S, C); weight/bias (C,) of the
    same dtype. mean/rstd come back as (N, G) arrays of x's dtype.
    """
    N, C, S = _dims(x, channels_last)
    y = _cache.empty_like(x)
    mean = np.zeros((N, num_groups), dtype=x.dtype)
    rstd = np.zeros((N, num_groups), dtype=x.dtype)
    if N * C * S == 0:
        if N * C > 0:
            rstd[...] = 1.0 / np.sqrt(eps)
        return y, mean, rstd
    if x.dtype == np.float32:
        _forward_f[float](x.reshape(-1), weight, bias, y.reshape(-1), mean.reshape(-1),
                          rstd.reshape(-1), N, C, S, num_groups, eps, channels_last,
                          activation, nthreads)
    else:
        _forward_f[double](x.reshape(-1), weight, bias, y.reshape(-1), mean.reshape(-1),
                           rstd.reshape(-1), N, C, S, num_groups, eps, channels_last,
                           activation, nthreads)
    return y, mean, rstd


cdef inline Py_ssize_t _images_per_batch(Py_ssize_t N, Py_ssize_t image_bytes) noexcept nogil:
    """Images processed together: as many as keep a batch's input within CACHE_BYTES, so that
    the second pass over it (normalise, grad_x) finds it in the last-level cache."""
    return max(1, min(N, CACHE_BYTES // max(image_bytes, 1)))


cdef _forward_f(const floating[::1] x, const floating[::1] w, const floating[::1] b,
                floating[::1] y, floating[::1] mean, floating[::1] rstd, Py_ssize_t N,
                Py_ssize_t C, Py_ssize_t S, Py_ssize_t G, double eps, bint channels_last,
                int act, int nthreads):
    cdef floating[::1] cm, cs
    cdef int rc = 0
    cdef Py_ssize_t bi, n0, nn, B = _images_per_batch(N, C * S * sizeof(floating))
    if channels_last:                                           # per-batch scratch
        cm = np.empty(2 * B * C, dtype=np.asarray(y).dtype)
        cs = np.empty(B * C, dtype=np.asarray(y).dtype)
    with nogil:
        for bi in range((N + B - 1) // B):
            n0 = bi * B
            nn = min(B, N - n0)
            if channels_last:
                rc = _forward_nhwc(&x[n0 * S * C], &y[n0 * S * C], &w[0], &b[0], &mean[n0 * G],
                                   &rstd[n0 * G], &cm[0], &cs[0], nn, C, S, G,
                                   eps, act, nthreads)
            else:
                rc = _forward_nchw(&x[n0 * S * C], &y[n0 * S * C], &w[0], &b[0], &mean[n0 * G],
                                   &rstd[n0 * G], nn, C, S, G, eps, act, nthreads)
            if rc != 0:
                break
    if rc != 0:
        raise MemoryError("group_norm: out of memory for the workspace")


def backward(grad_out, x, mean, rstd, weight, bias, int num_groups, bint channels_last,
             int activation, int nthreads):
    """grad_x, grad_weight, grad_bias = backward(dy, x, mean, rstd, w, b, G, channels_last, act, nthreads)."""
    N, C, S = _dims(x, channels_last)
    gx = _cache.empty_like(x)
    gw = np.zeros(C, dtype=x.dtype)
    gb = np.zeros(C, dtype=x.dtype)
    if N * C * S == 0:
        return gx, gw, gb
    if x.dtype == np.float32:
        _backward_f[float](grad_out.reshape(-1), x.reshape(-1), mean.reshape(-1),
                           rstd.reshape(-1), weight, bias, gx.reshape(-1), gw, gb,
                           N, C, S, num_groups, channels_last, activation, nthreads)
    else:
        _backward_f[double](grad_out.reshape(-1), x.reshape(-1), mean.reshape(-1),
                            rstd.reshape(-1), weight, bias, gx.reshape(-1), gw, gb,
                            N, C, S, num_groups, channels_last, activation, nthreads)
    return gx, gw, gb


cdef _backward_f(const floating[::1] dy, const floating[::1] x, const floating[::1] mean,
                 const floating[::1] rstd, const floating[::1] w, const floating[::1] b,
                 floating[::1] gx, floating[::1] gw, floating[::1] gb, Py_ssize_t N, Py_ssize_t C,
                 Py_ssize_t S, Py_ssize_t G, bint channels_last, int act, int nthreads):
    dtype = np.asarray(gx).dtype
    cdef Py_ssize_t B = _images_per_batch(N, 2 * C * S * sizeof(floating))   # dy and x
    cdef floating[::1] k = np.empty(3 * B * C, dtype=dtype)     # per-batch scratch
    cdef floating[::1] cm = np.empty(B * C, dtype=dtype)
    cdef floating[::1] cr = np.empty(B * C, dtype=dtype)
    cdef double[::1] sums = np.empty(2 * N * C, dtype=np.float64)   # per (n, c): dz, dz*xhat
    cdef int rc = 0
    cdef Py_ssize_t bi, n0, nn, NC = N * C, o
    with nogil:
        for bi in range((N + B - 1) // B):
            n0 = bi * B
            nn = min(B, N - n0)
            o = n0 * S * C
            if channels_last:
                rc = _backward_nhwc(&dy[o], &x[o], &mean[n0 * G], &rstd[n0 * G], &w[0], &b[0],
                                    &gx[o], &sums[n0 * C], &sums[NC + n0 * C], &k[0],
                                    &cm[0], &cr[0], nn, C, S, G, act, nthreads)
            else:
                rc = _backward_nchw(&dy[o], &x[o], &mean[n0 * G], &rstd[n0 * G], &w[0], &b[0],
                                    &gx[o], &sums[n0 * C], &sums[NC + n0 * C], &k[0],
                                    nn, C, S, G, act, nthreads)
            if rc != 0:
                break
        if rc == 0:
            _grad_weight_bias(N, C, &sums[0], &sums[NC], &gw[0], &gb[0])
    if rc != 0:
        raise MemoryError("group_norm: out of memory for the workspace")
