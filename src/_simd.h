/* Vectorised reductions for the CPU kernels.
 *
 * `#pragma omp simd reduction` lets the compiler keep one partial sum per vector lane; sums run in
 * the input precision over blocks of FN_BLOCK elements and are flushed to double, so float32 data
 * is summed at full vector width without losing accuracy. For a given binary the order is fixed,
 * so results are deterministic. Without OpenMP the pragmas are ignored (plain loops).
 */
#ifndef FASTNORM_SIMD_H
#define FASTNORM_SIMD_H
#include <stddef.h>

#define FN_BLOCK 512

#define FN_DEFINE(T, SFX)                                                                        \
/* sum of x[0:n] */                                                                              \
static inline double fn_sum_##SFX(const T* x, ptrdiff_t n) {                                      \
    double s = 0;                                                                                \
    for (ptrdiff_t i0 = 0; i0 < n; i0 += FN_BLOCK) {                                              \
        ptrdiff_t e = i0 + FN_BLOCK < n ? i0 + FN_BLOCK : n;                                      \
        T a = 0;                                                                                 \
        _Pragma("omp simd reduction(+:a)")                                                       \
        for (ptrdiff_t i = i0; i < e; i++) a += x[i];                                              \
        s += a;                                                                                  \
    }                                                                                            \
    return s;                                                                                    \
}                                                                                                \
/* sum of d and of d*d, d = x - k */                                                             \
static inline void fn_dev_sums_##SFX(const T* x, ptrdiff_t n, T k, double* sd, double* sq) {     \
    double s1 = 0, s2 = 0;                                                                       \
    for (ptrdiff_t i0 = 0; i0 < n; i0 += FN_BLOCK) {                                              \
        ptrdiff_t e = i0 + FN_BLOCK < n ? i0 + FN_BLOCK : n;                                      \
        T a = 0, b = 0;                                                                          \
        _Pragma("omp simd reduction(+:a,b)")                                                     \
        for (ptrdiff_t i = i0; i < e; i++) { T d = x[i] - k; a += d; b += d * d; }                 \
        s1 += a; s2 += b;                                                                        \
    }                                                                                            \
    *sd = s1; *sq = s2;                                                                          \
}                                                                                                \
/* sum of dy and of dy * (x - mean) * rstd */                                                    \
static inline void fn_grad_sums_##SFX(const T* dy, const T* x, ptrdiff_t n, T mean, T rstd,      \
                                      double* s_dy, double* s_dyx) {                             \
    double s1 = 0, s2 = 0;                                                                       \
    for (ptrdiff_t i0 = 0; i0 < n; i0 += FN_BLOCK) {                                              \
        ptrdiff_t e = i0 + FN_BLOCK < n ? i0 + FN_BLOCK : n;                                      \
        T a = 0, b = 0;                                                                          \
        _Pragma("omp simd reduction(+:a,b)")                                                     \
        for (ptrdiff_t i = i0; i < e; i++) { a += dy[i]; b += dy[i] * ((x[i] - mean) * rstd); }    \
        s1 += a; s2 += b;                                                                        \
    }                                                                                            \
    *s_dy = s1; *s_dyx = s2;                                                                     \
}

FN_DEFINE(float, f)
FN_DEFINE(double, d)
#undef FN_DEFINE

/* Column sums over a (P, C) row-major block, for channels-last layouts: per channel c,
 * s1[c] = sum_p f1(p, c) and s2[c] = sum_p f2(p, c). Channels go W at a time (one 64-byte vector)
 * with the partial sums held in registers; positions are summed in the input precision over
 * FN_SUBP rows and flushed to double. */
#define FN_SUBP 16
#if defined(__GNUC__) || defined(__clang__)
#define FN_PREFETCH(p) __builtin_prefetch((p), 0, 3)
#else
#define FN_PREFETCH(p) ((void)0)
#endif

#define FN_COLS(T, SFX, NAME, PARAMS, X2, DECL, F1, F2)                                            \
static inline void fn_##NAME##_##SFX(const T* x, ptrdiff_t P, ptrdiff_t C, PARAMS,               \
                                     double* s1, double* s2) {                                   \
    enum { W = 64 / sizeof(T) };                                                                 \
    for (ptrdiff_t c = 0; c < C; c++) { s1[c] = 0; s2[c] = 0; }                                   \
    for (ptrdiff_t p0 = 0; p0 < P; p0 += FN_SUBP) {       /* rows in order: streams memory */    \
        const ptrdiff_t pe = p0 + FN_SUBP < P ? p0 + FN_SUBP : P;                                 \
        const ptrdiff_t pn = pe + FN_SUBP < P ? pe + FN_SUBP : P;                                 \
        for (ptrdiff_t q = pe * C; q < pn * C; q += W) {  /* prefetch the next rows */         \
            FN_PREFETCH(x + q);                                                                  \
            if (X2) FN_PREFETCH((const T*)(X2) + q);                                              \
        }                                                                                        \
        ptrdiff_t c0 = 0;                                                                        \
        for (; c0 + W <= C; c0 += W) {                    /* W channels in registers */          \
            T a1[W], a2[W];                                                                      \
            for (int j = 0; j < W; j++) { a1[j] = 0; a2[j] = 0; }                                \
            for (ptrdiff_t p = p0; p < pe; p++) {                                                 \
                _Pragma("omp simd")                                                              \
                for (int j = 0; j < W; j++) {                                                    \
                    const ptrdiff_t c = c0 + j, i = p * C + c; DECL;                             \
                    a1[j] += F1; a2[j] += F2;                                                    \
                }                                                                                \
            }                                                                                    \
            for (int j = 0; j < W; j++) { s1[c0 + j] += a1[j]; s2[c0 + j] += a2[j]; }             \
        }                                                                                        \
        for (ptrdiff_t c = c0; c < C; c++) {                                                      \
            T a1 = 0, a2 = 0;                                                                    \
            for (ptrdiff_t p = p0; p < pe; p++) { const ptrdiff_t i = p * C + c; DECL;            \
                                                  a1 += F1; a2 += F2; }                          \
            s1[c] += a1; s2[c] += a2;                                                            \
        }                                                                                        \
    }                                                                                            \
}

#define FN_COMMA ,
/* s1 = sum x, s2 unused (0) */
FN_COLS(float, f, colsum, const float* unused_, NULL, (void)0, x[i], 0)
FN_COLS(double, d, colsum, const double* unused_, NULL, (void)0, x[i], 0)
/* s1 = sum d, s2 = sum d*d, d = x - k[c] */
FN_COLS(float, f, coldev, const float* k, NULL, const float dv = x[i] - k[c], dv, dv * dv)
FN_COLS(double, d, coldev, const double* k, NULL, const double dv = x[i] - k[c], dv, dv * dv)
/* s1 = sum dy, s2 = sum dy * (x - m[c]) * r[c]   (x is the dy argument here, see below) */
#define FN_GRAD_PARAMS(T) const T* xx, const T* m, const T* r
FN_COLS(float, f, colgrad, FN_GRAD_PARAMS(float), xx, (void)0, x[i], x[i] * ((xx[i] - m[c]) * r[c]))
FN_COLS(double, d, colgrad, FN_GRAD_PARAMS(double), xx, (void)0, x[i], x[i] * ((xx[i] - m[c]) * r[c]))

#endif
