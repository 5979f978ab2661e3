/* Register-blocked GEMM micro-kernels for deformable convolution (fastnorm): the fused forward
 * and the backward's two GEMMs (deform_conv.pyx, _gemm), and the sampler's bilinear blend.
 *
 *   out[o * ldo + p] (+)= (bias[o] +) sum_k W[o, k] * Tt[p * ldt + k]    (o < M, p < np)
 *
 * (the += form, accum != 0, serves the backward's GEMMs, blocked along k).
 *
 * Tt is a thread's column tile as the sampler writes it (position-major rows of ldt values,
 * read in place; rows up to a multiple of the kernel's MR must be readable). W is packed once per
 * call into panels of the kernel's NR output channels, Wp[panel][k][NR], zero padded. Every
 * output is one sequential sum over k, in the same order whichever thread or block computes it,
 * so results do not depend on the thread count. There are three kernel families: AVX-512
 * (64-byte vectors, MR x NR = 8 x 32 float or 8 x 16 double tiles), AVX2 (32-byte vectors,
 * 6 x 16 float or 6 x 8 double) and the baseline (16-byte vectors, 3 x 16 / 3 x 8); all of one
 * build compute the same bits (below), and dc_gemm_shape tells the caller the chosen family's MR
 * and NR, which the tile padding, the position blocks and the weight packing follow.
 */
#ifndef FASTNORM_DEFORM_CONV_GEMM_H
#define FASTNORM_DEFORM_CONV_GEMM_H

#include <stddef.h>
#include <stdlib.h>
#include <string.h>

/* One kernel: T element, vectors of VB bytes, MR positions x NR output channels per tile. */
#define DC_KERNEL(T, VB, MR, NR, ATTR, NAME)                                                   \
typedef T NAME##_v __attribute__((vector_size(VB)));                                           \
ATTR static void NAME(const T* Tt, ptrdiff_t ldt, ptrdiff_t np, ptrdiff_t K, const T* Wp,      \
                      ptrdiff_t M, const T* bias, T* out, ptrdiff_t ldo, int accum)            \
{                                                                                              \
    enum { VL = VB / sizeof(T), NV = NR / VL };                                                \
    for (ptrdiff_t j = 0; j * NR < M; j++) {                                                   \
        const T* wp = Wp + j * K * NR;                                                         \
        ptrdiff_t mo = M - j * NR < NR ? M - j * NR : NR;                                      \
        for (ptrdiff_t p0 = 0; p0 < np; p0 += MR) {                                            \
            const T* t0 = Tt + p0 * ldt;                                                       \
            NAME##_v acc[MR][NV];                                                              \
            for (int r = 0; r < MR; r++)                                                       \
                for (int v = 0; v < NV; v++)                                                   \
                    acc[r][v] = (NAME##_v){0};                                                 \
            for (ptrdiff_t k = 0; k < K; k++) {                                                \
                NAME##_v w[NV];                                                                \
                for (int v = 0; v < NV; v++)                                                   \
                    memcpy(&w[v], wp + k * NR + v * VL, VB);                                   \
                for (int r = 0; r < MR; r++) {                                                 \
                    T t = t0[r * ldt + k];                                                     \
                    for (int v = 0; v < NV; v++)                                               \
                        acc[r][v] += t * w[v];                                                 \
                }                                                                              \
            }                                                                                  \
            T res[MR][NR];                                                                     \
            memcpy(res, acc, sizeof res);                                                      \
            ptrdiff_t pr = np - p0 < MR ? np - p0 : MR;                                        \
            for (ptrdiff_t r = 0; r < mo; r++) {                                               \
                ptrdiff_t o = j * NR + r;                                                      \
                T* dst = out + o * ldo + p0;                                                   \
                for (ptrdiff_t q = 0; q < pr; q++) {                                           \
                    T v = bias ? res[q][r] + bias[o] : res[q][r];                              \
                    dst[q] = accum ? dst[q] + v : v;                                           \
                }                                                                              \
            }                                                                                  \
        }                                                                                      \
    }                                                                                          \
}

/* Tile shapes (MR positions, NR output channels) of the kernels below. The accumulators take
 * 6 (baseline), 12 (AVX2) and 16 (AVX-512) vector registers, enough independent FMA chains to
 * cover two FMA pipes' latency. (On AMD Zen 4, whose 512-bit FMAs are double-pumped, the AVX-512
 * kernel runs at the same FMA peak as the AVX2 one; 8 x 32, 6 x 32 and 14 x 32 measured alike
 * in the fused forward, 4 x 32 markedly slower.) */
#define DC_BASE_MR 3
#define DC_BASE_NR(T) ((int)(64 / sizeof(T)))
#define DC_AVX2_MR 6
#define DC_AVX2_NR(T) ((int)(64 / sizeof(T)))
#define DC_AVX512_MR 8
#define DC_AVX512_NR(T) ((int)(128 / sizeof(T)))

/* Which families a build has, and how one is chosen. What a kernel computes, bit for bit, is
 * fixed when fastnorm is built (as for every CPU kernel); the family only sets the tile shape and
 * the registers used, never the operations on each output or their order:
 *
 * - a native build (-march=native) targets the build machine: its widest family (2 AVX-512 F, VL
 *   and BW; 1 AVX2 + FMA; 0 baseline) is compiled for the build's target, the narrower ones too
 *   (same flags, the same contraction of a * b + c into FMAs: same bits), so that the tests can
 *   run each on one machine;
 * - a portable build (FASTNORM_PORTABLE: x86-64 baseline, -ffp-contract=off) computes the
 *   baseline's arithmetic, without FMA; its AVX2 and AVX-512 kernels do exactly that in wider
 *   registers (compiled with target attributes, contraction off: a multiply then an add, as the
 *   baseline), and the widest one the CPU has is picked at run time. They give the baseline's
 *   bits on every x86-64 CPU. (The DCN forward on Zen 3, 1 thread: 325 ms with the baseline
 *   kernel, 88 ms with the portable AVX2 one, 81 ms in a native build with FMA; CPUs whose adds
 *   share the FMA ports, as Intel's, lose more to the separate multiply and add.)
 *
 * FASTNORM_GEMM_ISA=avx2|baseline (read once per process; for the tests) selects a narrower
 * family. */
#if defined(__x86_64__) && defined(__AVX512F__) && defined(__AVX512VL__)                      \
    && defined(__AVX512BW__) && defined(__AVX2__) && defined(__FMA__)
#define DC_ISA_MAX 2
#define DC_AVX2
#define DC_AVX512
#elif defined(__x86_64__) && defined(__AVX2__) && defined(__FMA__)
#define DC_ISA_MAX 1
#define DC_AVX2
#elif defined(__x86_64__) && defined(__GNUC__) && defined(FASTNORM_PORTABLE) && !defined(__AVX2__)
#define DC_ISA_MAX 2
#define DC_RUNTIME 1
#define DC_AVX2 __attribute__((target("avx2")))
#define DC_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx2")))
#else
#define DC_ISA_MAX 0
#endif

DC_KERNEL(float, 16, DC_BASE_MR, DC_BASE_NR(float), , dc_gemm_f32_base)
DC_KERNEL(double, 16, DC_BASE_MR, DC_BASE_NR(double), , dc_gemm_f64_base)
#if DC_ISA_MAX >= 1
DC_KERNEL(float, 32, DC_AVX2_MR, DC_AVX2_NR(float), DC_AVX2, dc_gemm_f32_avx2)
DC_KERNEL(double, 32, DC_AVX2_MR, DC_AVX2_NR(double), DC_AVX2, dc_gemm_f64_avx2)
#endif
#if DC_ISA_MAX >= 2
DC_KERNEL(float, 64, DC_AVX512_MR, DC_AVX512_NR(float), DC_AVX512, dc_gemm_f32_avx512)
DC_KERNEL(double, 64, DC_AVX512_MR, DC_AVX512_NR(double), DC_AVX512, dc_gemm_f64_avx512)
#endif

/* The widest family this build runs on this CPU: DC_ISA_MAX, or in a portable build what the
 * CPU has. */
static int dc_isa_best(void)
{
#ifdef DC_RUNTIME
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx2"))
        return 0;
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl")
                   && __builtin_cpu_supports("avx512bw")
               ? 2
               : 1;
#else
    return DC_ISA_MAX;
#endif
}

/* The family in use: dc_isa_best(), unless FASTNORM_GEMM_ISA names a narrower one. */
static int dc_isa(void)
{
    static int isa = -1;
    if (isa < 0) {
        const char* cap = getenv("FASTNORM_GEMM_ISA");
        int best = dc_isa_best();
        if (cap && strcmp(cap, "baseline") == 0)
            best = 0;
        else if (cap && strcmp(cap, "avx2") == 0 && best > 1)
            best = 1;
        isa = best;
    }
    return isa;
}

#if DC_ISA_MAX == 2
#define DC_DISPATCH(F, ...)                                                                    \
    (dc_isa() == 2 ? F##_avx512(__VA_ARGS__)                                                   \
                   : dc_isa() == 1 ? F##_avx2(__VA_ARGS__) : F##_base(__VA_ARGS__))
#define DC_SHAPE(T, mr, nr)                                                                    \
    (*(mr) = dc_isa() == 2 ? DC_AVX512_MR : dc_isa() == 1 ? DC_AVX2_MR : DC_BASE_MR,           \
     *(nr) = dc_isa() == 2 ? DC_AVX512_NR(T) : dc_isa() == 1 ? DC_AVX2_NR(T) : DC_BASE_NR(T))
#elif DC_ISA_MAX == 1
#define DC_DISPATCH(F, ...) (dc_isa() == 1 ? F##_avx2(__VA_ARGS__) : F##_base(__VA_ARGS__))
#define DC_SHAPE(T, mr, nr)                                                                    \
    (*(mr) = dc_isa() == 1 ? DC_AVX2_MR : DC_BASE_MR,                                          \
     *(nr) = dc_isa() == 1 ? DC_AVX2_NR(T) : DC_BASE_NR(T))
#else
#define DC_DISPATCH(F, ...) F##_base(__VA_ARGS__)
#define DC_SHAPE(T, mr, nr) (*(mr) = DC_BASE_MR, *(nr) = DC_BASE_NR(T))
#endif

/* The selected kernel's tile for elements of itemsize bytes (4 float, else double): *mr
 * positions (the tile's rows are read in blocks of *mr) by *nr output channels (the panel width
 * of the packed weight). */
static void dc_gemm_shape(ptrdiff_t itemsize, ptrdiff_t* mr, ptrdiff_t* nr)
{
    if (itemsize == sizeof(float))
        DC_SHAPE(float, mr, nr);
    else
        DC_SHAPE(double, mr, nr);
}

/* dst[i] = w0 * p0[i] + w1 * p1[i] + w2 * p2[i] + w3 * p3[i] (the sampler's interior case),
 * vectorised by the compiler: at the build's width, or in a portable build at the CPU's width
 * (dispatched like the GEMM; no contraction, so the same bits). */
#define DC_BLEND(T, ATTR, NAME)                                                                \
ATTR static void NAME(T* dst, const T* p0, const T* p1, const T* p2, const T* p3, T w0, T w1,  \
                      T w2, T w3, ptrdiff_t n)                                                 \
{                                                                                              \
    for (ptrdiff_t i = 0; i < n; i++)                                                          \
        dst[i] = w0 * p0[i] + w1 * p1[i] + w2 * p2[i] + w3 * p3[i];                            \
}
DC_BLEND(float, , dc_blend_f32_base)
DC_BLEND(double, , dc_blend_f64_base)
#ifdef DC_RUNTIME
DC_BLEND(float, DC_AVX2, dc_blend_f32_avx2)
DC_BLEND(double, DC_AVX2, dc_blend_f64_avx2)
DC_BLEND(float, DC_AVX512, dc_blend_f32_avx512)
DC_BLEND(double, DC_AVX512, dc_blend_f64_avx512)
#define DC_BLEND_CALL DC_DISPATCH
#else
#define DC_BLEND_CALL(F, ...) F##_base(__VA_ARGS__)
#endif

static void dc_blend_f32(float* dst, const float* p0, const float* p1, const float* p2,
                         const float* p3, float w0, float w1, float w2, float w3, ptrdiff_t n)
{
    DC_BLEND_CALL(dc_blend_f32, dst, p0, p1, p2, p3, w0, w1, w2, w3, n);
}

static void dc_blend_f64(double* dst, const double* p0, const double* p1, const double* p2,
                         const double* p3, double w0, double w1, double w2, double w3,
                         ptrdiff_t n)
{
    DC_BLEND_CALL(dc_blend_f64, dst, p0, p1, p2, p3, w0, w1, w2, w3, n);
}

static void dc_gemm_f32(const float* Tt, ptrdiff_t ldt, ptrdiff_t np, ptrdiff_t K,
                        const float* Wp, ptrdiff_t M, const float* bias, float* out,
                        ptrdiff_t ldo, int accum)
{
    DC_DISPATCH(dc_gemm_f32, Tt, ldt, np, K, Wp, M, bias, out, ldo, accum);
}

static void dc_gemm_f64(const double* Tt, ptrdiff_t ldt, ptrdiff_t np, ptrdiff_t K,
                        const double* Wp, ptrdiff_t M, const double* bias, double* out,
                        ptrdiff_t ldo, int accum)
{
    DC_DISPATCH(dc_gemm_f64, Tt, ldt, np, K, Wp, M, bias, out, ldo, accum);
}

#endif
