/* Channel-lane kernels of RoIPool and PS-RoIAlign (fastnorm._cpu.roi_ops).
 *
 * RoIPool: a unit of 16 channels works on a channel-block-last scratch s[pixel][16] (NCHW rows
 * transposed into it by rp_tr_in_*). A bin's max runs per lane in row-major pixel order with
 * "take v when v > m" -- the scalar kernel's comparison, so ties keep the first maximum, NaN is
 * never taken, signed zeros keep the first one seen -- and (backward) records the pixel of each
 * lane's maximum (rp_pool_row_*: two chains per bin, merged exactly). The lanes are GCC/Clang
 * vectors (compare + blend, no max instruction whose operand order a compiler could swap), so
 * results are those of the scalar loop, bit for bit, on any CPU.
 *
 * PS-RoIAlign: a unit (image, bin) transposes its output channels' input planes (channel
 * co * PH * PW + bin) into s[pixel][CO]; a bin's separable sum then runs over the output channels
 * as lanes (rp_ps_dot_* / rp_ps_scatter_*), in the scalar kernel's order of operations.
 */
#ifndef FASTNORM_ROI_POOL_SIMD_H
#define FASTNORM_ROI_POOL_SIMD_H
#include <float.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include "_roi_simd.h"      /* fn_roi_tr8_regs */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#define RP_L 16     /* channels per RoIPool unit (lanes) */
_Static_assert(RP_L == FN_RL, "RoIPool's output tiles go through fn_roi_tile_out");
#define RP_INLINE static inline __attribute__((always_inline))

#if defined(__AVX512F__)
#define RP_VB 64          /* bytes per native vector: the lanes are RP_L * sizeof(T) / RP_VB of them */
#else
#define RP_VB 32
#endif
typedef float rp_vf __attribute__((vector_size(RP_VB), aligned(4), may_alias));
typedef int32_t rp_vif __attribute__((vector_size(RP_VB), aligned(4), may_alias));
typedef double rp_vd __attribute__((vector_size(RP_VB), aligned(8), may_alias));
typedef int64_t rp_vid __attribute__((vector_size(RP_VB), aligned(8), may_alias));

/* one pixel (at p, index pix) into the chain (m, a): take v where v > m; the index only when
 * track (a compile-time constant after inlining) */
#define RP_STEP(V, VI, I, m, a, p, pix, track)                                                   \
    do {                                                                                         \
        const VI cur_ = (VI){0} + (I)(pix);                                                      \
        _Pragma("GCC unroll 8")                                                                  \
        for (int q = 0; q < NV; q++) {                                                           \
            V v_ = *(const V*)((p) + q * VW);                                                    \
            VI k_ = v_ > m[q];                                                                   \
            m[q] = (V)(((VI)v_ & k_) | ((VI)m[q] & ~k_));                                        \
            if (track) a[q] = (cur_ & k_) | (a[q] & ~k_);                                        \
        }                                                                                        \
    } while (0)

/* Whole-block transposes of one row (all RP_L lanes): pixels [0, n) of the channel rows
 * r + c * plane <-> d[pixel * RP_L + c], in blocks of 8 pixels with AVX 8 x 8 float transposes
 * (4 pixels, 4 x 4 for double); they return how many pixels they moved (the caller's scalar loops
 * do the rest). Pure data movement: the same bits as the scalar loops. */
#if defined(__AVX__)
RP_INLINE ptrdiff_t rp_tr8_in_f(const float* r, ptrdiff_t plane, ptrdiff_t n, float* d) {
    ptrdiff_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int half = 0; half < RP_L / 8; half++) {
            __m256 v[8];
            for (int c = 0; c < 8; c++) v[c] = _mm256_loadu_ps(r + (half * 8 + c) * plane + i);
            fn_roi_tr8_regs(v);
            for (int p = 0; p < 8; p++) _mm256_storeu_ps(d + (i + p) * RP_L + half * 8, v[p]);
        }
    return i;
}
RP_INLINE ptrdiff_t rp_tr8_out_f(float* r, ptrdiff_t plane, ptrdiff_t n, const float* d) {
    ptrdiff_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int half = 0; half < RP_L / 8; half++) {
            __m256 v[8];
            for (int p = 0; p < 8; p++) v[p] = _mm256_loadu_ps(d + (i + p) * RP_L + half * 8);
            fn_roi_tr8_regs(v);
            for (int c = 0; c < 8; c++) _mm256_storeu_ps(r + (half * 8 + c) * plane + i, v[c]);
        }
    return i;
}
#else
RP_INLINE ptrdiff_t rp_tr8_in_f(const float* r, ptrdiff_t plane, ptrdiff_t n, float* d) {
    (void)r; (void)plane; (void)n; (void)d; return 0;
}
RP_INLINE ptrdiff_t rp_tr8_out_f(float* r, ptrdiff_t plane, ptrdiff_t n, const float* d) {
    (void)r; (void)plane; (void)n; (void)d; return 0;
}
#endif
#if defined(__AVX__)
/* 4 x 4 double transposes: pixels [0, n) in blocks of 4 */
RP_INLINE void rp_tr4d(__m256d* r) {
    __m256d t0 = _mm256_unpacklo_pd(r[0], r[1]), t1 = _mm256_unpackhi_pd(r[0], r[1]);
    __m256d t2 = _mm256_unpacklo_pd(r[2], r[3]), t3 = _mm256_unpackhi_pd(r[2], r[3]);
    r[0] = _mm256_permute2f128_pd(t0, t2, 0x20);
    r[1] = _mm256_permute2f128_pd(t1, t3, 0x20);
    r[2] = _mm256_permute2f128_pd(t0, t2, 0x31);
    r[3] = _mm256_permute2f128_pd(t1, t3, 0x31);
}
RP_INLINE ptrdiff_t rp_tr8_in_d(const double* r, ptrdiff_t plane, ptrdiff_t n, double* d) {
    ptrdiff_t i = 0;
    for (; i + 4 <= n; i += 4)
        for (int q = 0; q < RP_L / 4; q++) {
            __m256d v[4];
            for (int c = 0; c < 4; c++) v[c] = _mm256_loadu_pd(r + (q * 4 + c) * plane + i);
            rp_tr4d(v);
            for (int p = 0; p < 4; p++) _mm256_storeu_pd(d + (i + p) * RP_L + q * 4, v[p]);
        }
    return i;
}
RP_INLINE ptrdiff_t rp_tr8_out_d(double* r, ptrdiff_t plane, ptrdiff_t n, const double* d) {
    ptrdiff_t i = 0;
    for (; i + 4 <= n; i += 4)
        for (int q = 0; q < RP_L / 4; q++) {
            __m256d v[4];
            for (int p = 0; p < 4; p++) v[p] = _mm256_loadu_pd(d + (i + p) * RP_L + q * 4);
            rp_tr4d(v);
            for (int c = 0; c < 4; c++) _mm256_storeu_pd(r + (q * 4 + c) * plane + i, v[c]);
        }
    return i;
}
#else
RP_INLINE ptrdiff_t rp_tr8_in_d(const double* r, ptrdiff_t plane, ptrdiff_t n, double* d) {
    (void)r; (void)plane; (void)n; (void)d; return 0;
}
RP_INLINE ptrdiff_t rp_tr8_out_d(double* r, ptrdiff_t plane, ptrdiff_t n, const double* d) {
    (void)r; (void)plane; (void)n; (void)d; return 0;
}
#endif

#define RP_DEFINE(T, V, VI, I, SFX)                                                              \
/* One row of bins: bin pw's window is [h0, h1) x [ws[pw] - sx0, we[pw] - sx0) of the scratch  \
 * s (row stride sw pixels); out[pw * RP_L + l] gets lane l's maximum with the scalar kernel's   \
 * semantics -- m starts at -FLT_MAX (0 for an empty window) and takes v when v > m, in          \
 * row-major order -- and, when track, idx[pw * RP_L + l] the pixel h * sw + w it came from (-1  \
 * when none was taken). Each bin runs as two chains over the two halves of its rows (upper     \
 * [h0, hm), lower [hm, h1)), interleaved, so that a lane's compare-and-blend latency and the   \
 * loads of two rows overlap; the lower chain starts from -FLT_MAX and is merged into the upper \
 * with the same "take when greater" step, which is exactly the row-major sweep: a lower pixel  \
 * wins only when it beats every upper one, and among the lower ones the first maximum wins. */ \
RP_INLINE void rp_pool_row_##SFX(const T* s, ptrdiff_t sw, ptrdiff_t h0, ptrdiff_t h1,           \
                                 const ptrdiff_t* ws, const ptrdiff_t* we, ptrdiff_t PW,         \
                                 ptrdiff_t sx0, T* out, ptrdiff_t* idx, int track) {             \
    enum { NV = RP_L * sizeof(T) / RP_VB, VW = RP_VB / sizeof(T) };                              \
    const ptrdiff_t half = h1 > h0 ? (h1 - h0) / 2 : 0, hm = h0 + half;                          \
    for (ptrdiff_t pw = 0; pw < PW; pw++) {                                                      \
        const ptrdiff_t w0 = ws[pw] - sx0, w1 = we[pw] - sx0;                                    \
        const int empty = h1 <= h0 || w1 <= w0;                                                  \
        V m[NV], mb[NV];                                                                         \
        VI a[NV], ab[NV];                                                                        \
        for (int q = 0; q < NV; q++) {                                                           \
            m[q] = (V){0} + (empty ? (T)0 : (T)(-FLT_MAX));                                      \
            mb[q] = (V){0} + (T)(-FLT_MAX);                                                      \
            a[q] = (VI){0} - 1;                                                                  \
            ab[q] = a[q];                                                                        \
        }                                                                                        \
        if (!empty) {                                                                            \
            for (ptrdiff_t i = 0; i < half; i++) {                                               \
                const T* ru = s + (h0 + i) * sw * RP_L;                                          \
                const T* rl = s + (hm + i) * sw * RP_L;                                          \
                for (ptrdiff_t w = w0; w < w1; w++) {                                            \
                    RP_STEP(V, VI, I, m, a, ru + w * RP_L, (h0 + i) * sw + w, track);            \
                    RP_STEP(V, VI, I, mb, ab, rl + w * RP_L, (hm + i) * sw + w, track);          \
                }                                                                                \
            }                                                                                    \
            for (ptrdiff_t h = hm + half; h < h1; h++)     /* the odd row: the lower chain's */  \
                for (ptrdiff_t w = w0; w < w1; w++)                                              \
                    RP_STEP(V, VI, I, mb, ab, s + (h * sw + w) * RP_L, h * sw + w, track);       \
            for (int q = 0; q < NV; q++) {                                                       \
                const VI k_ = mb[q] > m[q];                                                      \
                m[q] = (V)(((VI)mb[q] & k_) | ((VI)m[q] & ~k_));                                 \
                if (track) a[q] = (ab[q] & k_) | (a[q] & ~k_);                                   \
            }                                                                                    \
        }                                                                                        \
        for (int q = 0; q < NV; q++) {                                                           \
            *(V*)(out + pw * RP_L + q * VW) = m[q];                                              \
            if (track) {   /* lanes via memcpy: GCC was seen to miscompile a subscript of a */  \
                I t_[VW];  /* may_alias vector here after inlining (strict aliasing)        */  \
                memcpy(t_, &a[q], sizeof t_);                                                    \
                for (int l = 0; l < VW; l++) idx[pw * RP_L + q * VW + l] = (ptrdiff_t)t_[l];     \
            }                                                                                    \
        }                                                                                        \
    }                                                                                            \
}                                                                                                \
/* s[((y - y0) * (x1 - x0) + x - x0) * RP_L + c] = x[c * plane + y * W + x] for c < nc, 0 for   \
 * the lanes nc..RP_L-1 (x points at the first channel's plane) */                               \
static inline void rp_tr_in_##SFX(const T* x, ptrdiff_t plane, ptrdiff_t nc, ptrdiff_t W,        \
                                  ptrdiff_t y0, ptrdiff_t y1, ptrdiff_t x0, ptrdiff_t x1,        \
                                  T* restrict s) {                                               \
    const ptrdiff_t sw = x1 - x0;                                                                \
    for (ptrdiff_t y = y0; y < y1; y++) {                                                        \
        T* restrict d = s + (y - y0) * sw * RP_L;                                                \
        ptrdiff_t i = 0;                                                                         \
        if (nc == RP_L) {                                                                        \
            const T* r = x + y * W + x0;                                                         \
            i = rp_tr8_in_##SFX(r, plane, sw, d);                                                \
            for (; i + 4 <= sw; i += 4) {                                                        \
                for (int c = 0; c < RP_L; c++) {                                                 \
                    const T* rc = r + c * plane + i;                                             \
                    d[i * RP_L + c] = rc[0];                                                     \
                    d[(i + 1) * RP_L + c] = rc[1];                                               \
                    d[(i + 2) * RP_L + c] = rc[2];                                               \
                    d[(i + 3) * RP_L + c] = rc[3];                                               \
                }                                                                                \
            }                                                                                    \
        }                                                                                        \
        for (ptrdiff_t c = 0; c < RP_L; c++) {                                                   \
            if (c < nc) {                                                                        \
                const T* r = x + c * plane + y * W + x0;                                         \
                for (ptrdiff_t j = i; j < sw; j++) d[j * RP_L + c] = r[j];                       \
            } else {                                                                             \
                for (ptrdiff_t j = i; j < sw; j++) d[j * RP_L + c] = 0;                          \
            }                                                                                    \
        }                                                                                        \
    }                                                                                            \
}                                                                                                \
/* the inverse for lanes c < nc: x[c * plane + y * W + x] = s[...] */                            \
static inline void rp_tr_out_##SFX(T* restrict x, ptrdiff_t plane, ptrdiff_t nc, ptrdiff_t W,    \
                                   ptrdiff_t y0, ptrdiff_t y1, ptrdiff_t x0, ptrdiff_t x1,       \
                                   const T* restrict s) {                                        \
    const ptrdiff_t sw = x1 - x0;                                                                \
    for (ptrdiff_t y = y0; y < y1; y++) {                                                        \
        const T* d = s + (y - y0) * sw * RP_L;                                                   \
        const ptrdiff_t i = nc == RP_L ? rp_tr8_out_##SFX(x + y * W + x0, plane, sw, d) : 0;     \
        for (ptrdiff_t c = 0; c < nc; c++) {                                                     \
            T* r = x + c * plane + y * W + x0;                                                   \
            for (ptrdiff_t j = i; j < sw; j++) r[j] = d[j * RP_L + c];                           \
        }                                                                                        \
    }                                                                                            \
}                                                                                                \
/* PS-RoIAlign: s[((y - y0) * (x1 - x0) + x - x0) * L + co] = x[co * cstride + y * W + x] */     \
static inline void rp_ps_in_##SFX(const T* x, ptrdiff_t cstride, ptrdiff_t L, ptrdiff_t W,       \
                                  ptrdiff_t y0, ptrdiff_t y1, ptrdiff_t x0, ptrdiff_t x1,        \
                                  T* restrict s) {                                               \
    const ptrdiff_t sw = x1 - x0;                                                                \
    for (ptrdiff_t y = y0; y < y1; y++) {                                                        \
        T* restrict d = s + (y - y0) * sw * L;                                                   \
        for (ptrdiff_t co = 0; co < L; co++) {                                                   \
            const T* r = x + co * cstride + y * W + x0;                                          \
            for (ptrdiff_t j = 0; j < sw; j++) d[j * L + co] = r[j];                             \
        }                                                                                        \
    }                                                                                            \
}                                                                                                \
static inline void rp_ps_out_##SFX(T* restrict x, ptrdiff_t cstride, ptrdiff_t L, ptrdiff_t W,   \
                                   ptrdiff_t y0, ptrdiff_t y1, ptrdiff_t x0, ptrdiff_t x1,       \
                                   const T* restrict s) {                                        \
    const ptrdiff_t sw = x1 - x0;                                                                \
    for (ptrdiff_t y = y0; y < y1; y++) {                                                        \
        const T* d = s + (y - y0) * sw * L;                                                      \
        for (ptrdiff_t co = 0; co < L; co++) {                                                   \
            T* r = x + co * cstride + y * W + x0;                                                \
            for (ptrdiff_t j = 0; j < sw; j++) r[j] = d[j * L + co];                             \
        }                                                                                        \
    }                                                                                            \
}                                                                                                \
/* acc[0:L] = sum_a rw[a] * (sum_b cw[b] * s[ri[a], ci[b], 0:L]) (ri/ci relative to the scratch \
 * origin, row stride sw pixels); u: L scratch values */                                         \
RP_INLINE void rp_ps_dot_##SFX(const T* s, ptrdiff_t sw, ptrdiff_t L, const ptrdiff_t* ri,       \
                               const T* rw, ptrdiff_t nr, const ptrdiff_t* ci, const T* cw,      \
                               ptrdiff_t ncol, ptrdiff_t y0, ptrdiff_t x0, T* restrict acc,      \
                               T* restrict u) {                                                  \
    for (ptrdiff_t l = 0; l < L; l++) acc[l] = 0;                                                \
    for (ptrdiff_t a = 0; a < nr; a++) {                                                         \
        const T* row = s + (ri[a] - y0) * sw * L;                                                \
        for (ptrdiff_t l = 0; l < L; l++) u[l] = 0;                                              \
        for (ptrdiff_t b = 0; b < ncol; b++) {                                                   \
            const T* p = row + (ci[b] - x0) * L;                                                 \
            const T w = cw[b];                                                                   \
            for (ptrdiff_t l = 0; l < L; l++) u[l] = u[l] + w * p[l];                            \
        }                                                                                        \
        const T w = rw[a];                                                                       \
        for (ptrdiff_t l = 0; l < L; l++) acc[l] = acc[l] + w * u[l];                            \
    }                                                                                            \
}                                                                                                \
/* s[ri[a], ci[b], 0:L] += (gg[0:L] * rw[a]) * cw[b] */                                          \
RP_INLINE void rp_ps_scatter_##SFX(T* s, ptrdiff_t sw, ptrdiff_t L, const ptrdiff_t* ri,         \
                                   const T* rw, ptrdiff_t nr, const ptrdiff_t* ci, const T* cw,  \
                                   ptrdiff_t ncol, ptrdiff_t y0, ptrdiff_t x0,                   \
                                   const T* restrict gg, T* restrict u) {                        \
    for (ptrdiff_t a = 0; a < nr; a++) {                                                         \
        T* row = s + (ri[a] - y0) * sw * L;                                                      \
        const T wa = rw[a];                                                                      \
        for (ptrdiff_t l = 0; l < L; l++) u[l] = gg[l] * wa;                                     \
        for (ptrdiff_t b = 0; b < ncol; b++) {                                                   \
            T* restrict p = row + (ci[b] - x0) * L;                                              \
            const T w = cw[b];                                                                   \
            for (ptrdiff_t l = 0; l < L; l++) p[l] += u[l] * w;                                  \
        }                                                                                        \
    }                                                                                            \
}

RP_DEFINE(float, rp_vf, rp_vif, int32_t, f)
RP_DEFINE(double, rp_vd, rp_vid, int64_t, d)

#endif
