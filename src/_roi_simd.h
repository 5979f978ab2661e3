/* Channel-vector kernels of the CPU RoIAlign (roi_ops.pyx).
 *
 * RoIAlign works on a block of FN_RL channels at a time, stored channel-block-last: a scratch
 * image S[pixel][FN_RL] (NCHW input transposed there, channels-last input copied there), so a
 * bilinear corner is one vector (one 64-byte line of float32) and every corner of every bin is a
 * vector multiply-add over the channels. Written with GCC/Clang vector extensions (as _simd.h):
 * the lanes are channels, nothing is reduced across lanes, so the results do not depend on the
 * vector width nor on the thread count. The arithmetic per lane is the scalar one of the
 * separable tables: s = sum_r Wy[r] * (sum_c Wx[c] * x[r, c]), out = s * inv.
 */
#ifndef FASTNORM_ROI_SIMD_H
#define FASTNORM_ROI_SIMD_H
#include <stddef.h>
#include <string.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#define FN_RL 16          /* channels per block: 64 bytes of float32 */

/* 32-byte vectors (AVX2 registers; GCC lowers them to SSE pairs on a baseline build): a block
 * is FN_RL / (32 / sizeof(T)) of them, kept as separate register accumulators */
typedef float fn_rvf __attribute__((vector_size(32), aligned(4), may_alias));
typedef double fn_rvd __attribute__((vector_size(32), aligned(8), may_alias));
typedef float fn_rvf16 __attribute__((vector_size(FN_RL * 4), aligned(4), may_alias));
typedef double fn_rvd16 __attribute__((vector_size(FN_RL * 8), aligned(8), may_alias));

/* one unrolled bin shape of fn_roi_bin_cl: NR rows x NC columns, per vector of channels */
#define FN_ROI_CASE(T, V, NR, NC)                                                                \
    case NR * 8 + NC:                                                                            \
        for (; c < cv; c += L) {                                                                 \
            V s = (V){0};                                                                        \
            _Pragma("GCC unroll 4") for (int a = 0; a < NR; a++) {                               \
                V u = (V){0};                                                                    \
                _Pragma("GCC unroll 4") for (int b = 0; b < NC; b++)                             \
                    u = u + cw[b] * *(const V*)(P[a * 4 + b] + c);                               \
                s = s + rw[a] * u;                                                               \
            }                                                                                    \
            *(V*)(dst + c) = s * inv;                                                            \
        }                                                                                        \
        break;
#define FN_ROI_CASES(T, V)                                                                       \
    FN_ROI_CASE(T, V, 4, 4) FN_ROI_CASE(T, V, 4, 3) FN_ROI_CASE(T, V, 3, 4)                      \
    FN_ROI_CASE(T, V, 3, 3) FN_ROI_CASE(T, V, 4, 2) FN_ROI_CASE(T, V, 2, 4)                      \
    FN_ROI_CASE(T, V, 3, 2) FN_ROI_CASE(T, V, 2, 3) FN_ROI_CASE(T, V, 2, 2)

#define FN_ROI_DEFS(T, V, VB, SFX)                                                               \
/* channels-last, all C channels of a bin at once: dst[0:C] = inv * sum_a rw[a] * sum_b cw[b] *   \
 * x[(ri[a] * W + ci[b]) * C + 0:C] (per channel s = sum_r Wy (sum_c Wx x), the scalar order);  \
 * vectors of channels outer, then rows, then the (<= 4) corners of a row, so every corner      \
 * pixel's channels are read front to back (streams the prefetchers follow). */                  \
static inline void fn_roi_bin_cl_##SFX(const T* x, ptrdiff_t C, ptrdiff_t W, const ptrdiff_t* ri, \
                                       const T* rw, ptrdiff_t nr, const ptrdiff_t* ci,           \
                                       const T* cw, ptrdiff_t nc, T inv, T* dst) {               \
    enum { L = 32 / sizeof(T) };                                                                 \
    const T* P[16];                                                                              \
    const ptrdiff_t cv = C - C % L;                                                              \
    if (nr > 4 || nc > 4) {             /* adaptive grids: rows one at a time, through dst */    \
        for (ptrdiff_t c = 0; c < C; c++) dst[c] = 0;                                            \
        for (ptrdiff_t a = 0; a < nr; a++) {                                                     \
            const T* row = x + ri[a] * W * C;                                                    \
            for (ptrdiff_t c = 0; c < C; c++) {                                                  \
                T u = 0;                                                                         \
                for (ptrdiff_t b = 0; b < nc; b++) u = u + cw[b] * row[ci[b] * C + c];           \
                dst[c] = dst[c] + rw[a] * u;                                                     \
            }                                                                                    \
        }                                                                                        \
        for (ptrdiff_t c = 0; c < C; c++) dst[c] = dst[c] * inv;                                 \
        return;                                                                                  \
    }                                                                                            \
    for (ptrdiff_t a = 0; a < nr; a++)                                                           \
        for (ptrdiff_t b = 0; b < nc; b++) P[a * 4 + b] = x + (ri[a] * W + ci[b]) * C;           \
    ptrdiff_t c = 0;                                                                             \
    /* bins of sampling_ratio <= 2 have <= 4 rows and columns: the loops unrolled per shape */   \
    switch (nr * 8 + nc) {                                                                       \
    FN_ROI_CASES(T, V)                                                                           \
    default:                                                                                     \
        for (; c < cv; c += L) {                                                                 \
            V s = (V){0};                                                                        \
            for (ptrdiff_t a = 0; a < nr; a++) {                                                 \
                V u = (V){0};                                                                    \
                for (ptrdiff_t b = 0; b < nc; b++) u = u + cw[b] * *(const V*)(P[a * 4 + b] + c); \
                s = s + rw[a] * u;                                                               \
            }                                                                                    \
            *(V*)(dst + c) = s * inv;                                                            \
        }                                                                                        \
    }                                                                                            \
    for (; c < C; c++) {                                                                         \
        T s = 0;                                                                                 \
        for (ptrdiff_t a = 0; a < nr; a++) {                                                     \
            T u = 0;                                                                             \
            for (ptrdiff_t b = 0; b < nc; b++) u = u + cw[b] * P[a * 4 + b][c];                 \
            s = s + rw[a] * u;                                                                   \
        }                                                                                        \
        dst[c] = s * inv;                                                                        \
    }                                                                                            \
}                                                                                                \
/* the adjoint: S[(ri[a] * W + ci[b]) * ps + 0:FN_RL] += (g * inv * rw[a]) * cw[b] */            \
static inline void fn_roi_scatter_##SFX(T* S, ptrdiff_t ps, ptrdiff_t W, const ptrdiff_t* ri,    \
                                        const T* rw,                                             \
                                        ptrdiff_t nr, const ptrdiff_t* ci, const T* cw,          \
                                        ptrdiff_t nc, T inv, const T* g) {                       \
    enum { L = 32 / sizeof(T), NV = FN_RL / L };                                                 \
    V gg[NV];                                                                                    \
    _Pragma("GCC unroll 8") for (int v = 0; v < NV; v++) gg[v] = *(const V*)(g + v * L) * inv;   \
    if (nr == 4 && nc == 4) {           /* the common bin of sampling_ratio 2: unrolled */       \
        T* P[16];                                                                                \
        for (int a = 0; a < 4; a++)                                                              \
            for (int b = 0; b < 4; b++) P[a * 4 + b] = S + (ri[a] * W + ci[b]) * ps;             \
        const T w0 = cw[0], w1 = cw[1], w2 = cw[2], w3 = cw[3];                                  \
        _Pragma("GCC unroll 4") for (int a = 0; a < 4; a++) {                                    \
            const T wr = rw[a];                                                                  \
            _Pragma("GCC unroll 8") for (int v = 0; v < NV; v++) {                               \
                const V u = gg[v] * wr;                                                          \
                V* p0 = (V*)(P[a * 4] + v * L);                                                  \
                V* p1 = (V*)(P[a * 4 + 1] + v * L);                                              \
                V* p2 = (V*)(P[a * 4 + 2] + v * L);                                              \
                V* p3 = (V*)(P[a * 4 + 3] + v * L);                                              \
                *p0 = *p0 + u * w0;                                                              \
                *p1 = *p1 + u * w1;                                                              \
                *p2 = *p2 + u * w2;                                                              \
                *p3 = *p3 + u * w3;                                                              \
            }                                                                                    \
        }                                                                                        \
        return;                                                                                  \
    }                                                                                            \
    for (ptrdiff_t a = 0; a < nr; a++) {                                                         \
        T* row = S + ri[a] * W * ps;                                                             \
        V u[NV];                                                                                 \
        _Pragma("GCC unroll 8") for (int v = 0; v < NV; v++) u[v] = gg[v] * rw[a];               \
        for (ptrdiff_t b = 0; b < nc; b++) {                                                     \
            T* p = row + ci[b] * ps;                                                             \
            const T w = cw[b];                                                                   \
            _Pragma("GCC unroll 8") for (int v = 0; v < NV; v++)                                 \
                *(V*)(p + v * L) = *(V*)(p + v * L) + u[v] * w;                                  \
        }                                                                                        \
    }                                                                                            \
}                                                                                                \
/* one row of a band bin: s[0:NV] += wr * sum_b cw[b] * row[ci[b] * FN_RL + 0:FN_RL] (inlined:  \
 * a constant nc unrolls) */                                                                    \
static inline __attribute__((always_inline)) void fn_roi_band_row_##SFX(                        \
        const T* row, const ptrdiff_t* ci, const T* cw, ptrdiff_t nc, T wr, V* s) {             \
    enum { L = 32 / sizeof(T), NV = FN_RL / L };                                                 \
    V u[NV];                                                                                     \
    _Pragma("GCC unroll 8") for (int v = 0; v < NV; v++) u[v] = (V){0};                          \
    _Pragma("GCC unroll 4") for (ptrdiff_t b = 0; b < nc; b++) {                                 \
        const T* q = row + ci[b] * FN_RL;                                                        \
        _Pragma("GCC unroll 8") for (int v = 0; v < NV; v++)                                     \
            u[v] = u[v] + cw[b] * *(const V*)(q + v * L);                                        \
    }                                                                                            \
    _Pragma("GCC unroll 8") for (int v = 0; v < NV; v++) s[v] = s[v] + wr * u[v];                \
}                                                                                                \
/* one RoI of the NCHW band path: tile[b][0:FN_RL] (bin b = ph * PW + pw) = its bins over the   \
 * band S (pixel p at S[p * FN_RL]) times inv (times mask[b] when mask is given and inv != 0)    \
 * with its tables: rows ri[rp[rb]:rp[rb + 1]], columns ci[cp[cb]:cp[cb + 1]], where rb = ph,    \
 * cb = pw (separable tables) or rb = cb = b (per-bin tables: ``per_bin``, deformable pooling);   \
 * per lane the arithmetic of fn_roi_bin_cl, on whole FN_RL-lane vectors, one call per RoI. */   \
static inline void fn_roi_band_fwd_##SFX(const T* S, ptrdiff_t W, ptrdiff_t PH, ptrdiff_t PW,    \
                                         const ptrdiff_t* rp, const ptrdiff_t* ri, const T* rw,  \
                                         const ptrdiff_t* cp, const ptrdiff_t* ci, const T* cw,  \
                                         int per_bin, T inv, const T* mask, T* tile) {           \
    enum { L = 32 / sizeof(T), NV = FN_RL / L };                                                 \
    for (ptrdiff_t ph = 0; ph < PH; ph++) {                                                      \
        for (ptrdiff_t pw = 0; pw < PW; pw++) {                                                  \
            const ptrdiff_t bin = ph * PW + pw, rb = per_bin ? bin : ph, cb = per_bin ? bin : pw; \
            const ptrdiff_t r0 = rp[rb], nr = rp[rb + 1] - r0;                                   \
            const ptrdiff_t c0 = cp[cb], nc = cp[cb + 1] - c0;                                   \
            const T sc = mask != NULL && inv != 0 ? inv * mask[bin] : inv;                       \
            V s[NV];                                                                             \
            _Pragma("GCC unroll 8") for (int v = 0; v < NV; v++) s[v] = (V){0};                  \
            if (nr == 4 && nc == 4) {   /* the common bin of sampling_ratio 2: unrolled */       \
                _Pragma("GCC unroll 4") for (int a = 0; a < 4; a++)                              \
                    fn_roi_band_row_##SFX(S + ri[r0 + a] * W * FN_RL, ci + c0, cw + c0, 4,      \
                                          rw[r0 + a], s);                                        \
            } else {                                                                             \
                for (ptrdiff_t a = 0; a < nr; a++)                                               \
                    fn_roi_band_row_##SFX(S + ri[r0 + a] * W * FN_RL, ci + c0, cw + c0, nc,     \
                                          rw[r0 + a], s);                                        \
            }                                                                                    \
            T* d = tile + bin * FN_RL;                                                           \
            _Pragma("GCC unroll 8") for (int v = 0; v < NV; v++) *(V*)(d + v * L) = s[v] * sc;   \
        }                                                                                        \
    }                                                                                            \
}                                                                                                \
/* S[p][c] = x[c * HW + p] for p in [p0, p1), c < nch (lanes c >= nch: 0); x: nch planes */       \
static inline void fn_roi_tr_in_s##SFX(const T* x, ptrdiff_t HW, ptrdiff_t nch, ptrdiff_t p0,     \
                                      ptrdiff_t p1, T* S) {                                      \
    T blk[FN_RL][FN_RL];                                                                         \
    memset(blk, 0, sizeof(blk));                                                                 \
    for (ptrdiff_t p = p0; p < p1; p += FN_RL) {                                                 \
        const ptrdiff_t m = p1 - p < FN_RL ? p1 - p : FN_RL;                                     \
        if (m == FN_RL) {                                                                        \
            for (ptrdiff_t c = 0; c < nch; c++)                                                  \
                memcpy(blk[c], x + c * HW + p, sizeof(blk[c]));                                  \
            for (int j = 0; j < FN_RL; j++) {                                                    \
                VB v;                                                                             \
                for (int c = 0; c < FN_RL; c++) v[c] = blk[c][j];                                \
                *(VB*)(S + (p + j) * FN_RL) = v;                                                  \
            }                                                                                    \
        } else {                                                                                 \
            for (ptrdiff_t j = 0; j < m; j++)                                                    \
                for (ptrdiff_t c = 0; c < FN_RL; c++)                                            \
                    S[(p + j) * FN_RL + c] = c < nch ? x[c * HW + p + j] : 0;                   \
        }                                                                                        \
    }                                                                                            \
}                                                                                                \
/* x[c * HW + p] = S[p][c] for p in [p0, p1), c < nch (the inverse of fn_roi_tr_in) */           \
static inline void fn_roi_tr_out_s##SFX(const T* S, ptrdiff_t HW, ptrdiff_t nch, ptrdiff_t p0,    \
                                       ptrdiff_t p1, T* x) {                                     \
    T blk[FN_RL][FN_RL];                                                                         \
    for (ptrdiff_t p = p0; p < p1; p += FN_RL) {                                                 \
        const ptrdiff_t m = p1 - p < FN_RL ? p1 - p : FN_RL;                                     \
        if (m == FN_RL) {                                                                        \
            for (int j = 0; j < FN_RL; j++) {                                                    \
                const VB v = *(const VB*)(S + (p + j) * FN_RL);                                    \
                for (int c = 0; c < FN_RL; c++) blk[c][j] = v[c];                                \
            }                                                                                    \
            for (ptrdiff_t c = 0; c < nch; c++)                                                  \
                memcpy(x + c * HW + p, blk[c], sizeof(blk[c]));                                  \
        } else {                                                                                 \
            for (ptrdiff_t j = 0; j < m; j++)                                                    \
                for (ptrdiff_t c = 0; c < nch; c++)                                              \
                    x[c * HW + p + j] = S[(p + j) * FN_RL + c];                                 \
        }                                                                                        \
    }                                                                                            \
}

FN_ROI_DEFS(float, fn_rvf, fn_rvf16, f)
FN_ROI_DEFS(double, fn_rvd, fn_rvd16, d)

#if defined(__AVX__)
/* r[0:8] (8 rows of 8 floats) transposed in registers (AVX shuffles); also the RoIPool lane
 * kernels' (_roi_pool_simd.h) */
static inline void fn_roi_tr8_regs(__m256* r) {
    __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
    __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
    __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
    __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
    __m256 u0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
    __m256 u1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
    __m256 u2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
    __m256 u3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
    __m256 u4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0));
    __m256 u5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
    __m256 u6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0));
    __m256 u7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
    r[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
    r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
    r[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
    r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
    r[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
    r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
    r[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
    r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}
#endif

#if defined(__AVX2__)
/* dst[j * ds + i] = src[i * ss + j], i, j < 8 (float32) */
static inline void fn_roi_tr8(const float* src, ptrdiff_t ss, float* dst, ptrdiff_t ds) {
    __m256 r[8];
    for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_ps(src + i * ss);
    fn_roi_tr8_regs(r);
    for (int i = 0; i < 8; i++) _mm256_storeu_ps(dst + i * ds, r[i]);
}
#endif

/* dst[0:n] = src[0:n] with non-temporal stores where dst is 32-byte aligned (results that are
 * not read again soon, e.g. RoIAlign's large outputs: no read-for-ownership of the lines, half
 * the output's DRAM traffic); fn_roi_sfence() orders them before the unit ends. */
static inline void fn_roi_stream_f(float* dst, const float* src, ptrdiff_t n) {
    ptrdiff_t i = 0;
#if defined(__AVX__)
    if (((size_t)dst & 31) == 0)
        for (; i + 8 <= n; i += 8) _mm256_stream_ps(dst + i, _mm256_loadu_ps(src + i));
#endif
    for (; i < n; i++) dst[i] = src[i];
}
static inline void fn_roi_stream_d(double* dst, const double* src, ptrdiff_t n) {
    ptrdiff_t i = 0;
#if defined(__AVX__)
    if (((size_t)dst & 31) == 0)
        for (; i + 4 <= n; i += 4) _mm256_stream_pd(dst + i, _mm256_loadu_pd(src + i));
#endif
    for (; i < n; i++) dst[i] = src[i];
}
static inline void fn_roi_sfence(void) {
#if defined(__SSE__) && (defined(__x86_64__) || defined(__i386__))
    _mm_sfence();
#endif
}

/* NCHW outputs of one RoI and channel block: out[c * nb + b] = tile[b][c] (c < nch, b < nb),
 * and the reverse for grad_out (tile lanes c >= nch are left alone). stream (outputs too large
 * to stay in cache): the block, nch * nb contiguous values, is transposed into an L1 buffer and
 * written with non-temporal stores (fn_roi_stream; the caller fences before other threads read
 * them). */
#define FN_STREAM_NB 256  /* bins of the largest streamed block (16 KB of float32 buffer) */
static inline void fn_roi_tile_out_f(const float* tile, ptrdiff_t nb, ptrdiff_t nch, float* out,
                                     int stream) {
    float buf[FN_STREAM_NB * FN_RL] __attribute__((aligned(64)));
    float* d = stream && nb <= FN_STREAM_NB ? buf : out;
    ptrdiff_t b = 0;
#if defined(__AVX2__)
    if (nch == FN_RL)
        for (; b + 8 <= nb; b += 8) {
            for (int q = 0; q < FN_RL; q += 8)
                fn_roi_tr8(tile + b * FN_RL + q, FN_RL, d + q * nb + b, nb);
        }
#endif
    for (; b < nb; b++)
        for (ptrdiff_t c = 0; c < nch; c++) d[c * nb + b] = tile[b * FN_RL + c];
    if (d == buf)
        fn_roi_stream_f(out, buf, nch * nb);
}

static inline void fn_roi_tile_in_f(const float* g, ptrdiff_t nb, ptrdiff_t nch, float* tile) {
    ptrdiff_t b = 0;
#if defined(__AVX2__)
    if (nch == FN_RL)
        for (; b + 8 <= nb; b += 8) {
            for (int q = 0; q < FN_RL; q += 8)
                fn_roi_tr8(g + q * nb + b, nb, tile + b * FN_RL + q, FN_RL);
        }
#endif
    for (; b < nb; b++)
        for (ptrdiff_t c = 0; c < nch; c++) tile[b * FN_RL + c] = g[c * nb + b];
}

static inline void fn_roi_tile_out_d(const double* tile, ptrdiff_t nb, ptrdiff_t nch,
                                     double* out, int stream) {
    double buf[FN_STREAM_NB * FN_RL / 2] __attribute__((aligned(64)));
    double* d = stream && 2 * nb <= FN_STREAM_NB ? buf : out;
    for (ptrdiff_t b = 0; b < nb; b++)
        for (ptrdiff_t c = 0; c < nch; c++) d[c * nb + b] = tile[b * FN_RL + c];
    if (d == buf)
        fn_roi_stream_d(out, buf, nch * nb);
}

static inline void fn_roi_tile_in_d(const double* g, ptrdiff_t nb, ptrdiff_t nch, double* tile) {
    for (ptrdiff_t b = 0; b < nb; b++)
        for (ptrdiff_t c = 0; c < nch; c++) tile[b * FN_RL + c] = g[c * nb + b];
}

/* S[p][c] = x[c * HW + p] for p in [p0, p1), c < nch (lanes c >= nch: 0); x: nch planes */
static inline void fn_roi_tr_in_f(const float* x, ptrdiff_t HW, ptrdiff_t nch, ptrdiff_t p0,
                                  ptrdiff_t p1, float* S) {
#if defined(__AVX2__)
    if (nch == FN_RL) {
        ptrdiff_t p = p0;
        for (; p + 8 <= p1; p += 8) {
            for (int q = 0; q < FN_RL; q += 8)
                fn_roi_tr8(x + q * HW + p, HW, S + p * FN_RL + q, FN_RL);
        }
        fn_roi_tr_in_sf(x, HW, nch, p, p1, S);
        return;
    }
#endif
    fn_roi_tr_in_sf(x, HW, nch, p0, p1, S);
}

static inline void fn_roi_tr_in_d(const double* x, ptrdiff_t HW, ptrdiff_t nch, ptrdiff_t p0,
                                  ptrdiff_t p1, double* S) {
    fn_roi_tr_in_sd(x, HW, nch, p0, p1, S);
}

/* x[c * HW + p] = S[p][c] for p in [p0, p1), c < nch (the inverse of fn_roi_tr_in). stream
 * (grad_x too large to stay in cache): whole 64-byte lines of every plane, 16 pixels per step,
 * with non-temporal stores (when the planes share their alignment, HW % 16 == 0; the caller
 * fences before other threads read them) */
static inline void fn_roi_tr_out_f(const float* S, ptrdiff_t HW, ptrdiff_t nch, ptrdiff_t p0,
                                   ptrdiff_t p1, float* x, int stream) {
#if defined(__AVX2__)
    if (nch == FN_RL) {
        ptrdiff_t p = p0;
        const ptrdiff_t a = p0 + (ptrdiff_t)((-(size_t)(x + p0) & 63) / sizeof(float));
        if (stream && HW % 16 == 0 && ((size_t)x & 3) == 0 && a + 16 <= p1) {
            fn_roi_tr_out_sf(S, HW, nch, p0, a, x);            /* up to the first whole line */
            for (p = a; p + 16 <= p1; p += 16)
                for (int q = 0; q < FN_RL; q += 8) {
                    __m256 r[8], t[8];
                    for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_ps(S + (p + i) * FN_RL + q);
                    for (int i = 0; i < 8; i++) t[i] = _mm256_loadu_ps(S + (p + 8 + i) * FN_RL + q);
                    fn_roi_tr8_regs(r);
                    fn_roi_tr8_regs(t);
                    for (int i = 0; i < 8; i++) {
                        _mm256_stream_ps(x + (q + i) * HW + p, r[i]);
                        _mm256_stream_ps(x + (q + i) * HW + p + 8, t[i]);
                    }
                }
        }
        for (; p + 8 <= p1; p += 8) {
            for (int q = 0; q < FN_RL; q += 8)
                fn_roi_tr8(S + p * FN_RL + q, FN_RL, x + q * HW + p, HW);
        }
        fn_roi_tr_out_sf(S, HW, nch, p, p1, x);
        return;
    }
#endif
    fn_roi_tr_out_sf(S, HW, nch, p0, p1, x);
}

static inline void fn_roi_tr_out_d(const double* S, ptrdiff_t HW, ptrdiff_t nch, ptrdiff_t p0,
                                   ptrdiff_t p1, double* x, int stream) {
    (void)stream;                       /* float64 grad_x: ordinary stores */
    fn_roi_tr_out_sd(S, HW, nch, p0, p1, x);
}

#endif
