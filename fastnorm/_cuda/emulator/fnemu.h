// fnemu.h: the subset of CUDA C++ that fastnorm's kernels use, for the host C++ compiler.
//
// Force-included (g++ -include fnemu.h) in front of an unmodified .cu file by the emulator's
// module builder (_build.py). Every CUDA thread runs as a fiber (runtime.cpp), so
// __syncthreads() and the warp-synchronous intrinsics suspend the calling thread until its block
// (or the lanes of its mask) arrive, as on the device. __shared__ variables are thread_local
// statics: one block runs at a time on one OS thread, so they are shared by the block's fibers,
// and the runtime poisons them (0xFF bytes) at every block start.
//
// What differs from the device is documented in docs/robustness.md ("The CUDA emulator").
#pragma once

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <stdio.h>
#include <type_traits>

// NVRTC does not see math.h: kernels must not rely on its macros (the NVRTC gate checks this too)
#undef NAN
#undef INFINITY

// ---------------------------------------------------------------- qualifiers
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __restrict__ __restrict
#define __shared__ static thread_local
#define __constant__ static
#define __managed__
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __grid_constant__

// ---------------------------------------------------------------- built-in vector types
struct uint3 { unsigned int x, y, z; };
struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1)
        : x(x_), y(y_), z(z_) {}
};
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) double2 { double x, y; };
struct alignas(8) int2 { int x, y; };
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(16) uint4 { unsigned int x, y, z, w; };
struct alignas(8) uint2 { unsigned int x, y; };

// ---------------------------------------------------------------- runtime interface
namespace fnemu {
// set by the scheduler whenever it switches to a thread (fibers of one block share an OS thread)
extern uint3 g_threadIdx, g_blockIdx;
extern dim3 g_blockDim, g_gridDim;

void block_barrier(const char* file, int line);
void warp_exchange(unsigned mask, const void* value, int src_lane, void* out, const char* what);
unsigned warp_vote(unsigned mask, int pred, const char* what);
void note_float_atomic();
void note_atomic();

inline void compiler_fence() { asm volatile("" ::: "memory"); }

inline int lane_id() {
    const unsigned t =
        g_threadIdx.x + g_blockDim.x * (g_threadIdx.y + g_blockDim.y * g_threadIdx.z);
    return (int)(t & 31u);
}
}  // namespace fnemu

#define threadIdx (::fnemu::g_threadIdx)
#define blockIdx (::fnemu::g_blockIdx)
#define blockDim (::fnemu::g_blockDim)
#define gridDim (::fnemu::g_gridDim)
static const int warpSize = 32;

// ---------------------------------------------------------------- barriers and warps
#define __syncthreads()                                                  \
    (::fnemu::compiler_fence(), ::fnemu::block_barrier(__FILE__, __LINE__), \
     ::fnemu::compiler_fence())

inline void __syncwarp(unsigned mask = 0xffffffffu) {
    fnemu::compiler_fence();
    fnemu::warp_vote(mask, 0, "__syncwarp");
    fnemu::compiler_fence();
}

namespace fnemu {
// source lane of a shuffle (CUDA's definition for a segment of `width` lanes); -1: own value
template <typename T>
inline T shuffle(unsigned mask, T v, int src, const char* what) {
    static_assert(sizeof(T) <= 8, "shuffles move at most 8 bytes");
    static_assert(std::is_trivially_copyable<T>::value,
                  "shuffled types must be trivially copyable");
    T out;
    compiler_fence();
    warp_exchange(mask, &v, src, &out, what);
    compiler_fence();
    return out;
}
}  // namespace fnemu

template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = warpSize) {
    const int lane = fnemu::lane_id(), base = lane & ~(width - 1);
    return fnemu::shuffle(mask, v, base + (src & (width - 1)), "__shfl_sync");
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = warpSize) {
    const int lane = fnemu::lane_id(), src = lane ^ lane_mask;
    const bool own = src >= ((lane + width) & ~(width - 1)) || src < 0;
    return fnemu::shuffle(mask, v, own ? -1 : src, "__shfl_xor_sync");
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = warpSize) {
    const int lane = fnemu::lane_id(), src = lane + (int)delta;
    const bool own = (lane & (width - 1)) + (int)delta >= width;
    return fnemu::shuffle(mask, v, own ? -1 : src, "__shfl_down_sync");
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = warpSize) {
    const int lane = fnemu::lane_id(), src = lane - (int)delta;
    const bool own = (lane & (width - 1)) < (int)delta;
    return fnemu::shuffle(mask, v, own ? -1 : src, "__shfl_up_sync");
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
    fnemu::compiler_fence();
    unsigned r = fnemu::warp_vote(mask, pred, "__ballot_sync");
    fnemu::compiler_fence();
    return r;
}
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
inline int __all_sync(unsigned mask, int pred) {
    return (__ballot_sync(mask, pred) & mask) == mask;
}

// ---------------------------------------------------------------- atomics
// One block runs at a time and its threads switch only at barriers, so a plain read-modify-write
// is atomic here. Floating-point atomics make a result depend on the order of the threads: the
// runtime notes them, and the reverse-order re-run then accepts differing results. Every atomic
// is counted (fnemu_last_counts: the cost model).
#define FNEMU_ATOMIC(name, T, expr)                  \
    inline T name(T* p, T v) {                       \
        fnemu::note_atomic();                        \
        T old = *p;                                  \
        *p = (expr);                                 \
        return old;                                  \
    }
inline float atomicAdd(float* p, float v) {
    fnemu::note_float_atomic();
    fnemu::note_atomic();
    const float o = *p;
    *p = o + v;
    return o;
}
inline double atomicAdd(double* p, double v) {
    fnemu::note_float_atomic();
    fnemu::note_atomic();
    const double o = *p;
    *p = o + v;
    return o;
}
FNEMU_ATOMIC(atomicAdd, int, old + v)
FNEMU_ATOMIC(atomicAdd, unsigned int, old + v)
FNEMU_ATOMIC(atomicAdd, unsigned long long, old + v)
FNEMU_ATOMIC(atomicMax, int, old > v ? old : v)
FNEMU_ATOMIC(atomicMax, unsigned int, old > v ? old : v)
FNEMU_ATOMIC(atomicMax, long long, old > v ? old : v)
FNEMU_ATOMIC(atomicMax, unsigned long long, old > v ? old : v)
FNEMU_ATOMIC(atomicMin, int, old < v ? old : v)
FNEMU_ATOMIC(atomicMin, unsigned int, old < v ? old : v)
FNEMU_ATOMIC(atomicMin, long long, old < v ? old : v)
FNEMU_ATOMIC(atomicMin, unsigned long long, old < v ? old : v)
FNEMU_ATOMIC(atomicOr, unsigned int, old | v)
FNEMU_ATOMIC(atomicOr, unsigned long long, old | v)
FNEMU_ATOMIC(atomicAnd, unsigned int, old & v)
FNEMU_ATOMIC(atomicAnd, unsigned long long, old & v)
FNEMU_ATOMIC(atomicExch, int, v)
FNEMU_ATOMIC(atomicExch, unsigned int, v)
FNEMU_ATOMIC(atomicExch, unsigned long long, v)
#undef FNEMU_ATOMIC
template <typename T>
inline T atomicCAS(T* p, T cmp, T v) {
    fnemu::note_atomic();
    T old = *p;
    if (old == cmp) *p = v;
    return old;
}
inline void __trap() { __builtin_trap(); }
inline void __threadfence() { fnemu::compiler_fence(); }
inline void __threadfence_block() { fnemu::compiler_fence(); }

// ---------------------------------------------------------------- device math (global namespace)
// math.h (C++) already brings the float/double overloads of floor, exp, pow, fmin, isnan, ...
// into the global namespace, as CUDA's device headers do. What CUDA adds:
#define FNEMU_MINMAX(T)                                                       \
    inline T min(T a, T b) { return a < b ? a : b; }                         \
    inline T max(T a, T b) { return a > b ? a : b; }
FNEMU_MINMAX(int)
FNEMU_MINMAX(unsigned int)
FNEMU_MINMAX(long)
FNEMU_MINMAX(unsigned long)
FNEMU_MINMAX(long long)
FNEMU_MINMAX(unsigned long long)
#undef FNEMU_MINMAX
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __int_as_float(int v) { float f; memcpy(&f, &v, 4); return f; }
inline int __float_as_int(float f) { int v; memcpy(&v, &f, 4); return v; }
inline unsigned __float_as_uint(float f) { unsigned v; memcpy(&v, &f, 4); return v; }
inline float __uint_as_float(unsigned v) { float f; memcpy(&f, &v, 4); return f; }
inline double __longlong_as_double(long long v) { double f; memcpy(&f, &v, 8); return f; }
inline long long __double_as_longlong(double f) { long long v; memcpy(&v, &f, 8); return v; }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
inline int __clz(int v) { return v ? __builtin_clz((unsigned)v) : 32; }
inline int __clzll(long long v) { return v ? __builtin_clzll((unsigned long long)v) : 64; }
inline int __ffs(int v) { return __builtin_ffs(v); }
inline int __ffsll(long long v) { return __builtin_ffsll(v); }
template <typename T> inline T __ldg(const T* p) { return *p; }
