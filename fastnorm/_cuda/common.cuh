// Shared device helpers for fastnorm's CUDA kernels (included by every <op>.cu).
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>

namespace fastnorm {

typedef long long i64;

// ---- scalar conversion: half types compute in float, store back rounded
template <typename T> __device__ __forceinline__ float to_f(T v) { return static_cast<float>(v); }
template <> __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// compute type: double for double, float otherwise
template <typename T> struct acc { typedef float type; };
template <> struct acc<double> { typedef double type; };

template <typename T> __device__ __forceinline__ typename acc<T>::type load(const T* p) {
    return static_cast<typename acc<T>::type>(to_f(*p));
}
template <> __device__ __forceinline__ double load<double>(const double* p) { return *p; }
template <typename T> __device__ __forceinline__ void store(T* p, typename acc<T>::type v) {
    *p = from_f<T>(static_cast<float>(v));
}
template <> __device__ __forceinline__ void store<double>(double* p, double v) { *p = v; }

// ---- atomics for gradient accumulation (fast, non-deterministic paths only)
__device__ __forceinline__ void atomic_add(float* p, float v) { atomicAdd(p, v); }
__device__ __forceinline__ void atomic_add(double* p, double v) { atomicAdd(p, v); }

// ---- reductions
template <typename V> __device__ __forceinline__ V warp_sum(V v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Block-wide sum (blockDim.x a multiple of 32, <= 1024); every thread gets the result.
// `smem` needs 32 elements of V; the fixed tree makes the sum deterministic.
template <typename V> __device__ __forceinline__ V block_sum(V v, V* smem) {
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) smem[wid] = v;
    __syncthreads();
    v = (threadIdx.x < nw) ? smem[threadIdx.x] : V(0);
    if (wid == 0) v = warp_sum(v);
    if (threadIdx.x == 0) smem[0] = v;
    __syncthreads();
    v = smem[0];
    __syncthreads();
    return v;
}

// ---- bilinear sampling
// RoIAlign convention (torchvision): a sample outside (-1, H) x (-1, W) (or NaN) contributes 0;
// coordinates in (-1, 0] clamp to 0, and the last row/column clamps. Returns false when outside.
template <typename A>
__device__ __forceinline__ bool roi_bilinear(A y, A x, i64 H, i64 W, i64 o[4], A wt[4]) {
    if (!(y >= A(-1) && y <= A(H) && x >= A(-1) && x <= A(W))) {
        o[0] = o[1] = o[2] = o[3] = 0; wt[0] = wt[1] = wt[2] = wt[3] = A(0);
        return false;
    }
    if (y <= A(0)) y = A(0);
    if (x <= A(0)) x = A(0);
    i64 y0 = (i64)y, x0 = (i64)x, y1, x1;
    if (y0 >= H - 1) { y1 = y0 = H - 1; y = A(y0); } else y1 = y0 + 1;
    if (x0 >= W - 1) { x1 = x0 = W - 1; x = A(x0); } else x1 = x0 + 1;
    A ly = y - A(y0), lx = x - A(x0), hy = A(1) - ly, hx = A(1) - lx;
    o[0] = y0 * W + x0; o[1] = y0 * W + x1; o[2] = y1 * W + x0; o[3] = y1 * W + x1;
    wt[0] = hy * hx; wt[1] = hy * lx; wt[2] = ly * hx; wt[3] = ly * lx;
    return true;
}

// Deformable-convolution convention (torchvision deform_conv2d): zero padding around the map;
// a sample with y <= -1, y >= H, x <= -1, x >= W (or NaN) is 0. Out-of-map corners get weight 0
// and offset 0 (so reads stay in bounds).
template <typename A>
__device__ __forceinline__ bool zero_pad_bilinear(A y, A x, i64 H, i64 W, i64 o[4], A wt[4]) {
    o[0] = o[1] = o[2] = o[3] = 0; wt[0] = wt[1] = wt[2] = wt[3] = A(0);
    if (!(y > A(-1) && y < A(H) && x > A(-1) && x < A(W))) return false;
    A yf = floor(y), xf = floor(x);
    i64 y0 = (i64)yf, x0 = (i64)xf, y1 = y0 + 1, x1 = x0 + 1;
    A ly = y - yf, lx = x - xf, hy = A(1) - ly, hx = A(1) - lx;
    if (y0 >= 0 && x0 >= 0)         { o[0] = y0 * W + x0; wt[0] = hy * hx; }
    if (y0 >= 0 && x1 <= W - 1)     { o[1] = y0 * W + x1; wt[1] = hy * lx; }
    if (y1 <= H - 1 && x0 >= 0)     { o[2] = y1 * W + x0; wt[2] = ly * hx; }
    if (y1 <= H - 1 && x1 <= W - 1) { o[3] = y1 * W + x1; wt[3] = ly * lx; }
    return true;
}

}  // namespace fastnorm
