/* Vectorised reductions for the CPU kernels.
 *
 * Written with GCC/Clang vector extensions so that the accumulators are explicit registers:
 * contiguous sums keep FN_U independent vector accumulators (one would make the loop wait on the
 * add latency), and the channels-last column sums keep a tile of up to FN_NV vectors of channels
 * in registers while they stream down the rows. Partial sums run in the input precision over
 * short blocks and are flushed to double, so float32 data is summed at full vector width without
 * losing accuracy. The order of operations depends only on the shape (and the binary's vector
 * width), never on the thread count, so results are deterministic. The vector width is fixed at
 * compile time (64 bytes where the build targets AVX-512, else 32), as fastnorm's one SIMD policy
 * has it (setup.py): a FASTNORM_PORTABLE build sums in the same order on every x86-64 CPU.
 */
#ifndef FASTNORM_SIMD_H
#define FASTNORM_SIMD_H
#include <stddef.h>
#include <string.h>
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"   /* vectors wider than the baseline ABI, inline only */
#endif

#if defined(__AVX512F__)
#define FN_VB 64          /* vector bytes */
#define FN_NV 8           /* vectors per column tile (x2 accumulators: 16 of 32 registers) */
#else
#define FN_VB 32
#define FN_NV 4           /* 8 of 16 registers */
#endif
#define FN_U 4            /* accumulators per contiguous reduction */
#define FN_BLOCK 1024     /* elements per input-precision partial sum (contiguous) */
#define FN_SUBP 32        /* rows per input-precision partial sum (columns) */

typedef float fn_vf __attribute__((vector_size(FN_VB), aligned(4), may_alias));
typedef double fn_vd __attribute__((vector_size(FN_VB), aligned(8), may_alias));

#define FN_INLINE static inline __attribute__((always_inline))
#define FN_CLAMP(n) ((n) < FN_NV ? (n) : FN_NV)

/* ---------------------------------------------------------------- contiguous reductions
 * FN_REDUCE defines fn_NAME_SFX(x, n, PARAMS, double* s1, double* s2): s1 = sum F1(i),
 * s2 = sum F2(i) over i in [0, n), with BODY computing the vector terms f1, f2 at offset i. */
#define FN_REDUCE(T, V, SFX, NAME, PARAMS, BODY, SCALAR)                                          \
static inline void fn_##NAME##_##SFX(const T* x, ptrdiff_t n, PARAMS, double* s1, double* s2) {   \
    enum { W = FN_VB / sizeof(T) };                                                              \
    double r1 = 0, r2 = 0;                                                                       \
    for (ptrdiff_t i0 = 0; i0 < n; i0 += FN_BLOCK) {                                              \
        const ptrdiff_t e = i0 + FN_BLOCK < n ? i0 + FN_BLOCK : n;                                \
        V a1[FN_U], a2[FN_U];                                                                    \
        for (int u = 0; u < FN_U; u++) { a1[u] = (V){0}; a2[u] = (V){0}; }                       \
        ptrdiff_t i = i0;                                                                        \
        for (; i + FN_U * W <= e; i += FN_U * W) {                                                \
            _Pragma("GCC unroll 4")                                                              \
            for (int u = 0; u < FN_U; u++) {                                                     \
                const ptrdiff_t o = i + u * W; V f1, f2; BODY;                                   \
                a1[u] += f1; a2[u] += f2;                                                        \
            }                                                                                    \
        }                                                                                        \
        V b1 = a1[0], b2 = a2[0];                                                                \
        for (int u = 1; u < FN_U; u++) { b1 += a1[u]; b2 += a2[u]; }                             \
        T t1 = 0, t2 = 0;                                                                        \
        for (int l = 0; l < W; l++) { t1 += b1[l]; t2 += b2[l]; }                                 \
        for (; i < e; i++) { T f1, f2; SCALAR; t1 += f1; t2 += f2; }                              \
        r1 += t1; r2 += t2;                                                                      \
    }                                                                                            \
    *s1 = r1; *s2 = r2;                                                                          \
}

#define FN_LOAD(V, p) (*(const V*)(p))

#define FN_DEFINE(T, V, SFX)                                                                     \
/* sum of x (s2 unused) */                                                                       \
FN_REDUCE(T, V, SFX, sum2, int unused_,                                                           \
          (f1 = FN_LOAD(V, x + o), f2 = (V){0}), (f1 = x[i], f2 = 0))                             \
static inline double fn_sum_##SFX(const T* x, ptrdiff_t n) {                                      \
    double s, unused; fn_sum2_##SFX(x, n, 0, &s, &unused); return s;                              \
}                                                                                                \
/* sum of d and of d*d, d = x - k */                                                             \
FN_REDUCE(T, V, SFX, dev_sums, T k,                                                               \
          (f1 = FN_LOAD(V, x + o) - k, f2 = f1 * f1), (f1 = x[i] - k, f2 = f1 * f1))              \
/* sum of dy and of dy * (x - mean) * rstd   (x is dy here, xx is the forward input) */          \
FN_REDUCE(T, V, SFX, grad_sums, const T* xx FN_COMMA T mean FN_COMMA T rstd,                      \
          (f1 = FN_LOAD(V, x + o), f2 = f1 * ((FN_LOAD(V, xx + o) - mean) * rstd)),                \
          (f1 = x[i], f2 = f1 * ((xx[i] - mean) * rstd)))

#define FN_COMMA ,
FN_DEFINE(float, fn_vf, f)
FN_DEFINE(double, fn_vd, d)
#undef FN_DEFINE

/* ---------------------------------------------------------------- channels-last column sums
 * Over a (P, C) row-major block, per channel c: s1[c] = sum_p F1(p, c), s2[c] = sum_p F2(p, c).
 * Channels go in tiles of NV vectors whose partial sums stay in registers while the tile streams
 * down the rows (for C <= FN_NV vectors that is the whole row: memory is read in order; wider rows
 * read partial rows, at ~60% of the contiguous sums' bandwidth from DRAM -- parking the partial
 * sums in L1 to walk windows of whole rows measured no better); partial sums are flushed to
 * double every FN_SUBP rows. Channels past the last whole vector are summed
 * one by one. FN_COLS(T, V, SFX, NAME, PARAMS, ARGS, SETUP, BODY, SCALAR): SETUP loads the tile's
 * per-channel vectors (index j, channel offset cj), BODY computes f1, f2 at element offset o,
 * SCALAR the same for one element i of channel c. */
#define FN_COLS(T, V, SFX, NAME, PARAMS, ARGS, SETUP_DECL, SETUP, BODY, SCALAR)                   \
FN_INLINE void fn_##NAME##_tile_##SFX(const T* x, ptrdiff_t P, ptrdiff_t C, ptrdiff_t c0,         \
                                      const int nv, PARAMS, double* s1, double* s2) {            \
    enum { W = FN_VB / sizeof(T) };                                                              \
    SETUP_DECL;                                                                                  \
    _Pragma("GCC unroll 8")                                                                      \
    for (int j = 0; j < nv; j++) { const ptrdiff_t cj = c0 + j * W; (void)cj; SETUP; }           \
    for (ptrdiff_t p0 = 0; p0 < P; p0 += FN_SUBP) {                                               \
        const ptrdiff_t pe = p0 + FN_SUBP < P ? p0 + FN_SUBP : P;                                 \
        V a1[FN_NV], a2[FN_NV];                                                                  \
        _Pragma("GCC unroll 8")                                                                  \
        for (int j = 0; j < nv; j++) { a1[j] = (V){0}; a2[j] = (V){0}; }                         \
        for (ptrdiff_t p = p0; p < pe; p++) {                                                     \
            _Pragma("GCC unroll 8")                                                              \
            for (int j = 0; j < nv; j++) {                                                       \
                const ptrdiff_t o = p * C + c0 + j * W; V f1, f2; BODY;                          \
                a1[j] += f1; a2[j] += f2;                                                        \
            }                                                                                    \
        }                                                                                        \
        for (int j = 0; j < nv; j++) {  /* lanes via memcpy, not subscripts of the may_alias */  \
            T t1[W], t2[W];             /* vectors (seen miscompiled: _roi_pool_simd.h)       */  \
            memcpy(t1, &a1[j], sizeof t1);                                                       \
            memcpy(t2, &a2[j], sizeof t2);                                                       \
            for (int l = 0; l < W; l++) { s1[c0 + j * W + l] += t1[l];                           \
                                          s2[c0 + j * W + l] += t2[l]; }                         \
        }                                                                                        \
    }                                                                                            \
}                                                                                                \
static inline void fn_##NAME##_##SFX(const T* x, ptrdiff_t P, ptrdiff_t C, PARAMS,               \
                                     double* s1, double* s2) {                                   \
    enum { W = FN_VB / sizeof(T) };                                                              \
    for (ptrdiff_t c = 0; c < C; c++) { s1[c] = 0; s2[c] = 0; }                                   \
    ptrdiff_t c0 = 0;                                                                            \
    while (c0 + W <= C) {                                                                        \
        const ptrdiff_t nv = (C - c0) / W;                                                       \
        switch (FN_CLAMP(nv)) {     /* a constant tile width per case: registers */         \
        case 8: fn_##NAME##_tile_##SFX(x, P, C, c0, FN_CLAMP(8), ARGS, s1, s2); break;           \
        case 7: fn_##NAME##_tile_##SFX(x, P, C, c0, FN_CLAMP(7), ARGS, s1, s2); break;           \
        case 6: fn_##NAME##_tile_##SFX(x, P, C, c0, FN_CLAMP(6), ARGS, s1, s2); break;           \
        case 5: fn_##NAME##_tile_##SFX(x, P, C, c0, FN_CLAMP(5), ARGS, s1, s2); break;           \
        case 4: fn_##NAME##_tile_##SFX(x, P, C, c0, 4, ARGS, s1, s2); break;                     \
        case 3: fn_##NAME##_tile_##SFX(x, P, C, c0, 3, ARGS, s1, s2); break;                     \
        case 2: fn_##NAME##_tile_##SFX(x, P, C, c0, 2, ARGS, s1, s2); break;                     \
        default: fn_##NAME##_tile_##SFX(x, P, C, c0, 1, ARGS, s1, s2); break;                    \
        }                                                                                        \
        c0 += FN_CLAMP(nv) * W;                                                                  \
    }                                                                                            \
    for (ptrdiff_t c = c0; c < C; c++) {                                                          \
        double r1 = 0, r2 = 0;                                                                   \
        for (ptrdiff_t p0 = 0; p0 < P; p0 += FN_SUBP) {                                           \
            const ptrdiff_t pe = p0 + FN_SUBP < P ? p0 + FN_SUBP : P;                             \
            T t1 = 0, t2 = 0;                                                                    \
            for (ptrdiff_t p = p0; p < pe; p++) { const ptrdiff_t i = p * C + c; T f1, f2;        \
                                                  SCALAR; t1 += f1; t2 += f2; }                  \
            r1 += t1; r2 += t2;                                                                  \
        }                                                                                        \
        s1[c] = r1; s2[c] = r2;                                                                  \
    }                                                                                            \
}

#define FN_DEFINE(T, V, SFX)                                                                     \
/* s1 = sum x, s2 unused (0) */                                                                  \
FN_COLS(T, V, SFX, colsum, const T* unused_, unused_, (void)0, (void)0,                          \
        (f1 = FN_LOAD(V, x + o), f2 = (V){0}), (f1 = x[i], f2 = 0))                               \
/* s1 = sum d, s2 = sum d*d, d = x - k[c] */                                                     \
FN_COLS(T, V, SFX, coldev, const T* k, k, V kv[FN_NV], kv[j] = FN_LOAD(V, k + cj),               \
        (f1 = FN_LOAD(V, x + o) - kv[j], f2 = f1 * f1), (f1 = x[i] - k[c], f2 = f1 * f1))         \
/* s1 = sum dy, s2 = sum dy * (x - m[c]) * r[c]   (x is dy here, xx is the forward input) */    \
FN_COLS(T, V, SFX, colgrad, const T* xx FN_COMMA const T* m FN_COMMA const T* r,                  \
        xx FN_COMMA m FN_COMMA r, V mv[FN_NV]; V rv[FN_NV],                                       \
        (mv[j] = FN_LOAD(V, m + cj), rv[j] = FN_LOAD(V, r + cj)),                                \
        (f1 = FN_LOAD(V, x + o), f2 = f1 * ((FN_LOAD(V, xx + o) - mv[j]) * rv[j])),              \
        (f1 = x[i], f2 = f1 * ((xx[i] - m[c]) * r[c])))

FN_DEFINE(float, fn_vf, f)
FN_DEFINE(double, fn_vd, d)
#undef FN_DEFINE

/* ---------------------------------------------------------------- channels-last maps
 * Over a (P, C) row-major block: out[p, c] = F(inputs at [p, c], per-channel coefficients of c).
 * When a row is at most FN_NV vectors its coefficients stay in registers while the rows stream by;
 * wider rows go row by row with the coefficients from L1 (a tile walking a partial row down the
 * block would read and write memory out of order, measured ~1.5x slower).
 * FN_CMAP(T, V, SFX, NAME, PARAMS, ARGS, SETUP_DECL, SETUP, BODY, SCALAR): SETUP loads tile vector
 * j (channel offset cj), BODY stores the result at element offset o, SCALAR does one element i of
 * channel c. */
#define FN_CMAP(T, V, SFX, NAME, PARAMS, ARGS, SETUP_DECL, SETUP, BODY, SCALAR)                   \
FN_INLINE void fn_##NAME##_tile_##SFX(ptrdiff_t P, ptrdiff_t C, ptrdiff_t c0, const int nv,      \
                                      PARAMS) {                                                  \
    enum { W = FN_VB / sizeof(T) };                                                              \
    SETUP_DECL;                                                                                  \
    _Pragma("GCC unroll 8")                                                                      \
    for (int j = 0; j < nv; j++) { const ptrdiff_t cj = c0 + j * W; SETUP; }                     \
    for (ptrdiff_t p = 0; p < P; p++) {                                                           \
        _Pragma("GCC unroll 8")                                                                  \
        for (int j = 0; j < nv; j++) { const ptrdiff_t o = p * C + c0 + j * W; BODY; }           \
    }                                                                                            \
}                                                                                                \
static inline void fn_##NAME##_##SFX(ptrdiff_t P, ptrdiff_t C, PARAMS) {                          \
    enum { W = FN_VB / sizeof(T) };                                                              \
    ptrdiff_t c0 = 0;                                                                            \
    if (C > FN_NV * W) {          /* wide rows: row by row, in memory order */                   \
        for (ptrdiff_t p = 0; p < P; p++) {                                                       \
            for (c0 = 0; c0 + W <= C; c0 += W) {                                                  \
                const int j = 0; const ptrdiff_t cj = c0, o = p * C + c0;                         \
                SETUP_DECL; SETUP; BODY;                                                         \
            }                                                                                    \
            for (ptrdiff_t c = c0; c < C; c++) { const ptrdiff_t i = p * C + c; SCALAR; }         \
        }                                                                                        \
        return;                                                                                  \
    }                                                                                            \
    while (c0 + W <= C) {                                                                        \
        const ptrdiff_t nv = (C - c0) / W;                                                       \
        switch (FN_CLAMP(nv)) {                                                                  \
        case 8: fn_##NAME##_tile_##SFX(P, C, c0, FN_CLAMP(8), ARGS); break;                      \
        case 7: fn_##NAME##_tile_##SFX(P, C, c0, FN_CLAMP(7), ARGS); break;                      \
        case 6: fn_##NAME##_tile_##SFX(P, C, c0, FN_CLAMP(6), ARGS); break;                      \
        case 5: fn_##NAME##_tile_##SFX(P, C, c0, FN_CLAMP(5), ARGS); break;                      \
        case 4: fn_##NAME##_tile_##SFX(P, C, c0, 4, ARGS); break;                                \
        case 3: fn_##NAME##_tile_##SFX(P, C, c0, 3, ARGS); break;                                \
        case 2: fn_##NAME##_tile_##SFX(P, C, c0, 2, ARGS); break;                                \
        default: fn_##NAME##_tile_##SFX(P, C, c0, 1, ARGS); break;                               \
        }                                                                                        \
        c0 += FN_CLAMP(nv) * W;                                                                  \
    }                                                                                            \
    for (ptrdiff_t p = 0; p < P; p++)                                                             \
        for (ptrdiff_t c = c0; c < C; c++) { const ptrdiff_t i = p * C + c; SCALAR; }             \
}

#define FN_RELU(V, VI, z) ((V)((VI)(z) & (VI)((z) > 0)))
typedef int fn_vi __attribute__((vector_size(FN_VB)));
typedef long long fn_vl __attribute__((vector_size(FN_VB)));

#define FN_DEFINE(T, V, VI, SFX)                                                                 \
/* y = x * a[c] + b[c], then relu when relu != 0 */                                              \
FN_CMAP(T, V, SFX, axpb, const T* x FN_COMMA T* y FN_COMMA const T* a FN_COMMA const T* b        \
        FN_COMMA int relu, x FN_COMMA y FN_COMMA a FN_COMMA b FN_COMMA relu,                     \
        V av[FN_NV]; V bv[FN_NV], (av[j] = FN_LOAD(V, a + cj), bv[j] = FN_LOAD(V, b + cj)),      \
        { V z = FN_LOAD(V, x + o) * av[j] + bv[j]; if (relu) z = FN_RELU(V, VI, z);              \
          *(V*)(y + o) = z; },                                                                   \
        { T z = x[i] * a[c] + b[c]; y[i] = relu ? (z > 0 ? z : 0) : z; })                        \
/* gx = dy * a[c] + x * b[c] + d[c] */                                                           \
FN_CMAP(T, V, SFX, gradx, const T* dy FN_COMMA const T* x FN_COMMA T* gx FN_COMMA const T* a     \
        FN_COMMA const T* b FN_COMMA const T* d, dy FN_COMMA x FN_COMMA gx FN_COMMA a FN_COMMA b \
        FN_COMMA d, V av[FN_NV]; V bv[FN_NV]; V dv[FN_NV],                                       \
        (av[j] = FN_LOAD(V, a + cj), bv[j] = FN_LOAD(V, b + cj), dv[j] = FN_LOAD(V, d + cj)),    \
        *(V*)(gx + o) = FN_LOAD(V, dy + o) * av[j] + (FN_LOAD(V, x + o) * bv[j] + dv[j]),        \
        gx[i] = dy[i] * a[c] + (x[i] * b[c] + d[c]))

FN_DEFINE(float, fn_vf, fn_vi, f)
FN_DEFINE(double, fn_vd, fn_vl, d)
#undef FN_DEFINE

/* ---------------------------------------------------------------- activations (float)
 * exp for float vectors: 2^n * P(r), n = round(x log2 e), r = x - n ln 2 (two-part ln 2), P the
 * classic Cephes expf polynomial (relative error ~2 ulp); x is clamped to +-88.376 (exp then
 * saturates near FLT_MAX / 0), NaN stays NaN. GCC vectorises no libm expf without -ffast-math,
 * and a scalar expf per element made the fused SiLU ~15x slower than the normalisation itself. */
#define FN_SELF(m, a, b) ((fn_vf)(((fn_vi)(a) & (m)) | ((fn_vi)(b) & ~(m))))  /* m ? a : b */
FN_INLINE fn_vf fn_exp_vf(fn_vf x) {
    const fn_vf top = (fn_vf){0} + 88.3762626647949f;
    x = FN_SELF(x > top, top, x);
    x = FN_SELF(x < -top, -top, x);
    fn_vf fx = x * 1.44269504088896341f + 0.5f;
    fn_vf nf = __builtin_convertvector(__builtin_convertvector(fx, fn_vi), fn_vf);
    nf = nf - (fn_vf)((fn_vi)(nf > fx) & (fn_vi)((fn_vf){0} + 1.0f));     /* floor */
    x = x - nf * 0.693359375f;
    x = x - nf * -2.12194440e-4f;
    fn_vf y = (fn_vf){0} + 1.9875691500e-4f;
    y = y * x + 1.3981999507e-3f;
    y = y * x + 8.3334519073e-3f;
    y = y * x + 4.1665795894e-2f;
    y = y * x + 1.6666665459e-1f;
    y = y * x + 5.0000001201e-1f;
    y = y * (x * x) + x + 1.0f;
    fn_vi e = (__builtin_convertvector(nf, fn_vi) + 127) << 23;             /* 2^n */
    return y * (fn_vf)e;
}

/* the activation codes of fastnorm._kernels.ACTIVATIONS (ACT_* in group_norm.pyx / .cu); the
 * vector paths are only called with an activation (act != FN_ACT_NONE) */
enum { FN_ACT_NONE = 0, FN_ACT_RELU = 1, FN_ACT_SILU = 2 };

/* act(z): relu (0 for NaN, as the scalar path), silu z / (1 + e^-z) */
FN_INLINE fn_vf fn_act_vf(fn_vf z, int act) {
    if (act == FN_ACT_RELU)
        return FN_RELU(fn_vf, fn_vi, z);
    return z / (1.0f + fn_exp_vf(-z));
}

/* y[i] = act(y[i]) in place */
static inline void fn_act_f(float* y, ptrdiff_t n, int act) {
    enum { W = FN_VB / sizeof(float) };
    ptrdiff_t i = 0;
    for (; i + W <= n; i += W)
        *(fn_vf*)(y + i) = fn_act_vf(FN_LOAD(fn_vf, y + i), act);
    if (i < n) {                         /* the tail (< W) through one padded vector */
        fn_vf z = {0};
        for (int j = 0; j < W && i + j < n; j++) z[j] = y[i + j];
        z = fn_act_vf(z, act);
        for (int j = 0; j < W && i + j < n; j++) y[i + j] = z[j];
    }
}

/* g * act'(z): relu (g * 0 or g * 1, as the scalar path); silu, s (1 + z (1 - s)) with
 * s = sigmoid(z) */
FN_INLINE fn_vf fn_act_grad_vf(fn_vf z, fn_vf g, int act) {
    if (act == FN_ACT_RELU)
        return g * (fn_vf)((fn_vi)((fn_vf){0} + 1.0f) & (fn_vi)(z > 0));
    const fn_vf s = 1.0f / (1.0f + fn_exp_vf(-z));
    return g * (s * (1.0f + z * (1.0f - s)));
}

/* dz = dy * act'(((x - mean) * rstd) * w + b) over a row of one channel */
static inline void fn_dz_f(const float* dy, const float* x, float* dz, ptrdiff_t n, float mean,
                           float rstd, float w, float b, int act) {
    enum { W = FN_VB / sizeof(float) };
    ptrdiff_t i = 0;
    for (; i + W <= n; i += W) {
        const fn_vf z = ((FN_LOAD(fn_vf, x + i) - mean) * rstd) * w + b;
        *(fn_vf*)(dz + i) = fn_act_grad_vf(z, FN_LOAD(fn_vf, dy + i), act);
    }
    if (i < n) {                         /* the tail (< W) through one padded vector */
        fn_vf xv = {0}, gv = {0};
        for (int j = 0; j < W && i + j < n; j++) { xv[j] = x[i + j]; gv[j] = dy[i + j]; }
        const fn_vf d = fn_act_grad_vf(((xv - mean) * rstd) * w + b, gv, act);
        for (int j = 0; j < W && i + j < n; j++) dz[i + j] = d[j];
    }
}

/* channels-last: dz[p, c] = dy[p, c] * act'(((x[p, c] - m[c]) * r[c]) * w[c] + b[c]) */
static inline void fn_dzcols_f(ptrdiff_t P, ptrdiff_t C, const float* dy, const float* x,
                               float* dz, const float* m, const float* r, const float* w,
                               const float* b, int act) {
    enum { W = FN_VB / sizeof(float) };
#define FN_Z(X, c) ((((X) - FN_LOAD(fn_vf, m + (c))) * FN_LOAD(fn_vf, r + (c)))                  \
                    * FN_LOAD(fn_vf, w + (c)) + FN_LOAD(fn_vf, b + (c)))
    for (ptrdiff_t p = 0; p < P; p++) {
        const ptrdiff_t o = p * C;
        ptrdiff_t c = 0;
        for (; c + W <= C; c += W)
            *(fn_vf*)(dz + o + c) = fn_act_grad_vf(FN_Z(FN_LOAD(fn_vf, x + o + c), c),
                                                   FN_LOAD(fn_vf, dy + o + c), act);
        for (; c < C; c++) {             /* single channels: lane 0 of a vector */
            fn_vf xv = {0}, gv = {0}, mv = {0}, rv = {0}, wv = {0}, bv = {0};
            xv[0] = x[o + c]; gv[0] = dy[o + c]; mv[0] = m[c]; rv[0] = r[c]; wv[0] = w[c];
            bv[0] = b[c];
            dz[o + c] = fn_act_grad_vf(((xv - mv) * rv) * wv + bv, gv, act)[0];
        }
    }
#undef FN_Z
}

#endif
