// GroupNorm forward and backward on CUDA (launched by group_norm.py).
//
// Both layouts use the same three steps, and every reduction runs in a fixed order, so results
// are deterministic (no atomics):
//
//   forward   1. partial moments  - NCHW: a block reduces one contiguous chunk of one group
//                                   (gn_stats_nchw); channels-last: a block reduces a tile of
//                                   positions of one sample, giving per-channel partials
//                                   (gn_stats_nhwc). A thread loads a batch of R vectors, takes
//                                   its mean/M2 in the compute type from sums of deviations from
//                                   the batch's rounded mean (exact for any shift) and merges it
//                                   into a float64 running state with Chan's formula, so there is
//                                   no E[x^2]-E[x]^2 cancellation; partials are float64, so a
//                                   large common offset loses nothing to their rounding either.
//             2. gn_finalize     - one block per (n, g) merges its partials in a fixed order
//                                   (float64), writes mean/rstd and the per-(n, c) mean (split
//                                   into its rounded value and the remainder) and scale.
//             3. gn_apply<false> - y = act(((x - mean_hi) - mean_lo) * scale + bias), vectorised,
//                                   grid-stride.
//   backward  1. partial sums of dz and dz*xhat per (n, c) (gn_grad_nchw / gn_grad_nhwc)
//             2. gn_bwd_coeffs   - per (n, g): per-channel sums, then grad_x coefficients
//                gn_bwd_wb       - grad_weight / grad_bias: a warp per channel sums over n
//             3. gn_apply<true>  - grad_x = s * dz + k2 * (x - mean) + k3
//
// T: float, double, __half, __nv_bfloat16; A = acc<T>::type (float, or double for double) is
// the compute type and the type of mean/rstd. V: elements per vector load (16 bytes, or 1).
// All indices are 64-bit.
#include "common.cuh"

namespace fastnorm {
namespace group_norm {

// fused activations: fastnorm._kernels.ACTIVATIONS (tests/test_contract.py)
enum { ACT_NONE = 0, ACT_RELU = 1, ACT_SILU = 2 };

template <typename T, int V> struct alignas(sizeof(T) * V) Vec { T v[V]; };

template <typename T, int V>
__device__ __forceinline__ void load_vec(const T* p, typename acc<T>::type out[V]) {
    Vec<T, V> q = *reinterpret_cast<const Vec<T, V>*>(p);
#pragma unroll
    for (int i = 0; i < V; ++i) out[i] = load(&q.v[i]);
}

template <typename T, int V>
__device__ __forceinline__ void store_vec(T* p, const typename acc<T>::type in[V]) {
    Vec<T, V> q;
#pragma unroll
    for (int i = 0; i < V; ++i) store(&q.v[i], in[i]);
    *reinterpret_cast<Vec<T, V>*>(p) = q;
}

// loads per thread per batch: enough bytes in flight for scalar loads too
template <int V> struct Batch { static const int R = V == 1 ? 8 : 4; };

__device__ __forceinline__ float ex(float z) { return expf(z); }
__device__ __forceinline__ double ex(double z) { return exp(z); }

template <typename A> __device__ __forceinline__ A act_f(A z, int act) {
    if (act == ACT_RELU) return z > A(0) ? z : A(0);
    if (act == ACT_SILU) return z / (A(1) + ex(-z));
    return z;
}

template <typename A> __device__ __forceinline__ A act_grad(A z, int act) {
    if (act == ACT_RELU) return z > A(0) ? A(1) : A(0);
    if (act == ACT_SILU) {
        A s = A(1) / (A(1) + ex(-z));
        return s * (A(1) + z * (A(1) - s));
    }
    return A(1);
}

// a / d for 0 <= a < 2^52 with a precomputed 1/d (one multiply and one correction step)
__device__ __forceinline__ i64 fdiv(i64 a, i64 d, double inv) {
    i64 q = (i64)((double)a * inv);
    i64 r = a - q * d;
    if (r < 0) --q; else if (r >= d) ++q;
    return q;
}

// ------------------------------------------------------------------ moments (Chan)

struct Mom { double n, mean, m2; };

// merge (nb, mb, m2b) into a; the order of merges is always fixed by the caller
__device__ __forceinline__ void chan(Mom& a, double nb, double mb, double m2b) {
    if (nb == 0) return;
    double n = a.n + nb, d = mb - a.mean, f = nb / n;
    a.mean += d * f;
    a.m2 += m2b + d * d * a.n * f;
    a.n = n;
}

// Block-wide merge in a fixed tree; the result is valid in thread 0. smem: 32 entries.
__device__ __forceinline__ Mom block_merge(Mom a, Mom* smem) {
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        double n = __shfl_down_sync(0xffffffffu, a.n, o);
        double m = __shfl_down_sync(0xffffffffu, a.mean, o);
        double s = __shfl_down_sync(0xffffffffu, a.m2, o);
        if (lane + o < 32) chan(a, n, m, s);
    }
    __syncthreads();
    if (lane == 0) smem[wid] = a;
    __syncthreads();
    if (threadIdx.x == 0)
        for (int w = 1; w < nw; ++w) chan(a, smem[w].n, smem[w].mean, smem[w].m2);
    __syncthreads();
    return a;
}

// Merge n values whose deviations d from a shift k sum to sd (and d^2 to q) into st: mean =
// k + sd/n and M2 = q - sd^2/n hold for any k. With k the values' mean rounded to the compute
// type, d is (nearly) exact and the rounding of k costs nothing, however large the mean.
template <typename A>
__device__ __forceinline__ void chan_shifted(Mom& st, double n, A k, A sd, A q) {
    const double dsd = (double)sd;
    chan(st, n, (double)k + dsd / n, (double)q - dsd * dsd / n);
}

// shifted sums (see chan_shifted) of the first `nv` rows of the columns [c0, c1) of v[R][V] in
// type B: mean mu of the values, then sd = sum of (v - mu) and q of its squares
template <typename B, typename A, int R, int V>
__device__ __forceinline__ void batch_sums(const A v[R][V], int nv, int c0, int c1, B& mu,
                                           B& sd, B& q) {
    B s = B(0);
#pragma unroll
    for (int i = 0; i < R; ++i)
#pragma unroll
        for (int j = 0; j < V; ++j) s += i < nv && j >= c0 && j < c1 ? B(v[i][j]) : B(0);
    mu = s / B(nv * (c1 - c0));
    sd = B(0);
    q = B(0);
#pragma unroll
    for (int i = 0; i < R; ++i)
#pragma unroll
        for (int j = 0; j < V; ++j) {
            const B d = i < nv && j >= c0 && j < c1 ? B(v[i][j]) - mu : B(0);
            sd += d;
            q += d * d;
        }
}

// the moments of those values merged into st: summed in the compute type A, or in double when
// A's squares overflow (float: deviations beyond ~1.8e19; finite data must not give rstd 0)
template <typename A, int R, int V>
__device__ __forceinline__ void batch_merge(const A v[R][V], int nv, int c0, int c1, Mom& st) {
    A mu, sd, q;
    batch_sums<A, A, R, V>(v, nv, c0, c1, mu, sd, q);
    if (!isfinite((double)q)) {
        double dm, dsd, dq;
        batch_sums<double, A, R, V>(v, nv, c0, c1, dm, dsd, dq);
        chan_shifted(st, (double)(nv * (c1 - c0)), dm, dsd, dq);
        return;
    }
    chan_shifted(st, (double)(nv * (c1 - c0)), mu, sd, q);
}

// mean / M2 of the first `nv` rows of v[R][V] (compute type), merged into st
template <typename A, int R, int V>
__device__ __forceinline__ void batch_moments(const A v[R][V], int nv, Mom& st) {
    if (nv == 0) return;
    batch_merge<A, R, V>(v, nv, 0, V, st);
}

// ------------------------------------------------------------------ forward step 1, NCHW

// Item = (ng, k): chunk k (length L, a multiple of V) of group ng, whose M elements are contiguous.
template <typename T, int V>
__global__ void gn_stats_nchw(const T* __restrict__ x, double* pmean, double* pm2, i64 M, i64 L,
                              i64 nsplit, i64 nitems) {
    typedef typename acc<T>::type A;
    const int R = Batch<V>::R;
    __shared__ Mom smem[32];
    for (i64 item = blockIdx.x; item < nitems; item += gridDim.x) {
        const i64 ng = item / nsplit, k = item - ng * nsplit, start = k * L;
        const i64 nvec = min(L, M - start) / V;
        const T* xb = x + ng * M + start;
        Mom st = {0, 0, 0};
        for (i64 base = threadIdx.x; base < nvec; base += (i64)R * blockDim.x) {
            A v[R][V];
            int nv = 0;
#pragma unroll
            for (int i = 0; i < R; ++i) {
                const i64 vi = base + (i64)i * blockDim.x;
                if (vi < nvec) { load_vec<T, V>(xb + vi * V, v[i]); ++nv; }
            }
            batch_moments<A, R, V>(v, nv, st);
        }
        st = block_merge(st, smem);
        if (threadIdx.x == 0) { pmean[item] = st.mean; pm2[item] = st.m2; }
    }
}

// ------------------------------------------------------------------ channels-last tiles

// A 256-thread block covers a tile of positions of one sample: thread (r, j) of a
// trows x tcols grid owns channel vector cv0 + j and positions p0 + r, p0 + r + trows, ...
// The per-thread states of one channel are merged over r = 0..trows-1 in order.
struct Tile {
    int tcols, trows, r, j;
    __device__ Tile(i64 CV) {
        tcols = (int)min(CV, (i64)blockDim.x);
        trows = blockDim.x / tcols;
        r = threadIdx.x / tcols;
        j = threadIdx.x - r * tcols;
    }
    // positions row r sees in a tile of P positions
    __device__ double count(int row, i64 P) const {
        return row < P ? (double)((P - row + trows - 1) / trows) : 0.0;
    }
};

const int TILE_THREADS = 256;     // TILE_THREADS in group_norm.py

// forward step 1, channels-last: per-(n, tile k, c) partial moments, item = n * nptile + k
template <typename T, int V>
__global__ void __launch_bounds__(TILE_THREADS)
gn_stats_nhwc(const T* __restrict__ x, double* pmean, double* pm2, i64 S, i64 C, i64 TP,
              i64 nptile, i64 nitems) {
    typedef typename acc<T>::type A;
    const int R = Batch<V>::R;
    __shared__ double sm[2][TILE_THREADS * V];
    const i64 CV = C / V;
    const Tile t(CV);
    for (i64 item = blockIdx.x; item < nitems; item += gridDim.x) {
        const i64 n = item / nptile, k = item - n * nptile, p0 = k * TP, P = min(TP, S - p0);
        const T* xb = x + (n * S + p0) * C;
        for (i64 cv0 = 0; cv0 < CV; cv0 += t.tcols) {
            const i64 cv = cv0 + t.j;
            Mom st[V];
#pragma unroll
            for (int c = 0; c < V; ++c) st[c] = Mom{0, 0, 0};
            if (t.r < t.trows && cv < CV) {
                for (i64 p = t.r; p < P; p += (i64)R * t.trows) {
                    A v[R][V];
                    int nv = 0;
#pragma unroll
                    for (int i = 0; i < R; ++i) {
                        const i64 pi = p + (i64)i * t.trows;
                        if (pi < P) { load_vec<T, V>(xb + pi * C + cv * V, v[i]); ++nv; }
                    }
                    // per-channel shifted sums over the batch (see chan_shifted)
#pragma unroll
                    for (int c = 0; c < V; ++c) batch_merge<A, R, V>(v, nv, c, c + 1, st[c]);
                }
            }
#pragma unroll
            for (int c = 0; c < V; ++c) {
                sm[0][threadIdx.x * V + c] = st[c].mean;
                sm[1][threadIdx.x * V + c] = st[c].m2;
            }
            __syncthreads();
            // thread q merges channel slot q = j * V + c over the rows in order
            for (int q = threadIdx.x; q < t.tcols * V; q += blockDim.x) {
                if (cv0 + q / V >= CV) break;
                Mom a = {0, 0, 0};
                for (int row = 0; row < t.trows; ++row) {
                    const int s = (row * t.tcols) * V + q;
                    chan(a, t.count(row, P), sm[0][s], sm[1][s]);
                }
                const i64 o = item * C + cv0 * V + q;
                pmean[o] = a.mean;
                pm2[o] = a.m2;
            }
            __syncthreads();
        }
    }
}

// ------------------------------------------------------------------ forward step 2

// Per (n, g): merge the partials in a fixed order, write mean/rstd (N, G) and the per-(n, c)
// coefficients cm = mean rounded to the compute type, cl = mean - cm (so that x - mean stays
// accurate under a large common offset), cs = rstd * w[c]. Partials of group ng:
//   NCHW:          ng * nsplit + j,                   count min(L, M - j * L)
//   channels-last: (n * nptile + k) * C + g * Cg + cc, count min(L, S - k * L), j = k * Cg + cc
template <typename T>
__global__ void gn_finalize(const double* pmean, const double* pm2, const T* __restrict__ w,
                            typename acc<T>::type* mean, typename acc<T>::type* rstd,
                            typename acc<T>::type* cm, typename acc<T>::type* cl,
                            typename acc<T>::type* cs, i64 NG, i64 G, i64 C, i64 S, i64 L,
                            i64 nparts, int channels_last, double eps) {
    typedef typename acc<T>::type A;
    __shared__ Mom smem[32];
    __shared__ double res[2];
    const i64 Cg = C / G, M = Cg * S;
    for (i64 ng = blockIdx.x; ng < NG; ng += gridDim.x) {
        const i64 n = ng / G, g = ng - n * G;
        Mom st = {0, 0, 0};
        for (i64 j = threadIdx.x; j < nparts; j += blockDim.x) {
            i64 idx, cnt;
            if (channels_last) {
                const i64 k = j / Cg, cc = j - k * Cg;
                idx = (n * (nparts / Cg) + k) * C + g * Cg + cc;
                cnt = min(L, S - k * L);
            } else {
                idx = ng * nparts + j;
                cnt = min(L, M - j * L);
            }
            chan(st, (double)cnt, pmean[idx], pm2[idx]);
        }
        st = block_merge(st, smem);
        if (threadIdx.x == 0) {
            const double var = st.n > 0 ? st.m2 / st.n : 0.0;
            res[0] = st.mean;
            res[1] = 1.0 / sqrt(var + eps);
            mean[ng] = (A)res[0];
            rstd[ng] = (A)res[1];
        }
        __syncthreads();
        const A hi = (A)res[0], lo = (A)(res[0] - (double)hi), r = (A)res[1];
        for (i64 cc = threadIdx.x; cc < Cg; cc += blockDim.x) {
            const i64 c = g * Cg + cc;
            cm[n * C + c] = hi;
            cl[n * C + c] = lo;
            cs[n * C + c] = r * load(&w[c]);
        }
        __syncthreads();
    }
}

// ------------------------------------------------------------------ step 3 (elementwise)

// forward:  y  = act(((x - cm) - k2) * cs + b)   (k2 = cl: the remainder of the mean)
// backward: gx = cs * dz + k2 * (x - cm) + k3,  dz = dy * act'((x - cm) * cs + b)
// Vector vi covers elements e = vi*V .. +V-1, all in one (n, c) row for NCHW (S % V == 0) or
// in one position for channels-last (C % V == 0). Runs back to front, so that the data the
// reduction read last is still in L2.
template <typename T, int V, bool BWD>
__global__ void gn_apply(const T* __restrict__ x, const T* __restrict__ dy, T* __restrict__ out,
                         const typename acc<T>::type* __restrict__ cm,
                         const typename acc<T>::type* __restrict__ cs,
                         const typename acc<T>::type* __restrict__ k2,
                         const typename acc<T>::type* __restrict__ k3,
                         const T* __restrict__ b, i64 nvec, i64 S, i64 C, double inv_S,
                         double inv_C, int channels_last, int act) {
    typedef typename acc<T>::type A;
    const i64 stride = (i64)gridDim.x * blockDim.x;
    for (i64 t = (i64)blockIdx.x * blockDim.x + threadIdx.x; t < nvec; t += stride) {
        const i64 vi = nvec - 1 - t, e = vi * V;
        i64 nc, c;                                   // coefficient index of element 0
        if (channels_last) {
            const i64 pos = fdiv(e, C, inv_C);       // n * S + p
            c = e - pos * C;
            nc = fdiv(pos, S, inv_S) * C + c;
        } else {
            nc = fdiv(e, S, inv_S);                  // n * C + c
            c = nc - fdiv(nc, C, inv_C) * C;
        }
        A xv[V], r[V], gv[V];
        load_vec<T, V>(x + e, xv);
        if (BWD) load_vec<T, V>(dy + e, gv);
#pragma unroll
        for (int i = 0; i < V; ++i) {
            const int di = channels_last ? i : 0;
            const A m = cm[nc + di], s = cs[nc + di], bb = load(&b[c + di]);
            const A d = BWD ? xv[i] - m : (xv[i] - m) - k2[nc + di];
            if (!BWD) {
                r[i] = act ? act_f(d * s + bb, act) : d * s + bb;
            } else {
                const A dz = act ? gv[i] * act_grad(d * s + bb, act) : gv[i];
                r[i] = s * dz + k2[nc + di] * d + k3[nc + di];
            }
        }
        store_vec<T, V>(out + e, r);
    }
}

// ------------------------------------------------------------------ backward step 1

// per-element contributions to sum(dz) and sum(dz * xhat)
template <typename A>
__device__ __forceinline__ void grad_terms(A xv, A g, A m, A r, A w, A b, int act, A& dz, A& dzx) {
    const A xh = (xv - m) * r;
    dz = act ? g * act_grad(xh * w + b, act) : g;
    dzx = dz * xh;
}

// NCHW: item = (row, k), row = n * C + c of length S, chunk k of length L (a multiple of V)
template <typename T, int V>
__global__ void gn_grad_nchw(const T* __restrict__ dy, const T* __restrict__ x,
                             const typename acc<T>::type* mean, const typename acc<T>::type* rstd,
                             const T* w, const T* b, typename acc<T>::type* p1,
                             typename acc<T>::type* p2, i64 C, i64 S, i64 Cg, i64 L, i64 nch,
                             i64 nitems, int act) {
    typedef typename acc<T>::type A;
    const int R = Batch<V>::R;
    __shared__ double smem[32];
    for (i64 item = blockIdx.x; item < nitems; item += gridDim.x) {
        const i64 row = item / nch, k = item - row * nch, c = row % C, ng = row / Cg;
        const i64 start = row * S + k * L, nvec = min(L, S - k * L) / V;
        const A m = mean[ng], r = rstd[ng], ww = load(&w[c]), bb = load(&b[c]);
        double s1 = 0, s2 = 0;
        for (i64 base = threadIdx.x; base < nvec; base += (i64)R * blockDim.x) {
            A a1 = A(0), a2 = A(0);
#pragma unroll
            for (int i = 0; i < R; ++i) {
                const i64 vi = base + (i64)i * blockDim.x;
                if (vi < nvec) {
                    A xv[V], gv[V];
                    load_vec<T, V>(x + start + vi * V, xv);
                    load_vec<T, V>(dy + start + vi * V, gv);
#pragma unroll
                    for (int j = 0; j < V; ++j) {
                        A dz, dzx;
                        grad_terms(xv[j], gv[j], m, r, ww, bb, act, dz, dzx);
                        a1 += dz;
                        a2 += dzx;
                    }
                }
            }
            s1 += (double)a1;
            s2 += (double)a2;
        }
        s1 = block_sum(s1, smem);
        s2 = block_sum(s2, smem);
        if (threadIdx.x == 0) { p1[item] = (A)s1; p2[item] = (A)s2; }
    }
}

// channels-last: per-(n, tile k, c) partial sums, item = n * nptile + k (see Tile)
template <typename T, int V>
__global__ void __launch_bounds__(TILE_THREADS)
gn_grad_nhwc(const T* __restrict__ dy, const T* __restrict__ x,
             const typename acc<T>::type* mean, const typename acc<T>::type* rstd,
             const T* w, const T* b, typename acc<T>::type* p1, typename acc<T>::type* p2,
             i64 S, i64 C, i64 G, i64 TP, i64 nptile, i64 nitems, int act) {
    typedef typename acc<T>::type A;
    const int R = Batch<V>::R;
    __shared__ double sm[2][TILE_THREADS * V];
    const i64 CV = C / V, Cg = C / G;
    const Tile t(CV);
    for (i64 item = blockIdx.x; item < nitems; item += gridDim.x) {
        const i64 n = item / nptile, k = item - n * nptile, p0 = k * TP, P = min(TP, S - p0);
        const i64 off = (n * S + p0) * C;
        for (i64 cv0 = 0; cv0 < CV; cv0 += t.tcols) {
            const i64 cv = cv0 + t.j;
            double s1[V], s2[V];
#pragma unroll
            for (int c = 0; c < V; ++c) s1[c] = s2[c] = 0;
            if (t.r < t.trows && cv < CV) {
                A m[V], r[V], ww[V], bb[V];
#pragma unroll
                for (int c = 0; c < V; ++c) {
                    const i64 ch = cv * V + c, ng = n * G + ch / Cg;
                    m[c] = mean[ng]; r[c] = rstd[ng]; ww[c] = load(&w[ch]); bb[c] = load(&b[ch]);
                }
                for (i64 p = t.r; p < P; p += (i64)R * t.trows) {
                    A a1[V], a2[V];
#pragma unroll
                    for (int c = 0; c < V; ++c) a1[c] = a2[c] = A(0);
#pragma unroll
                    for (int i = 0; i < R; ++i) {
                        const i64 pi = p + (i64)i * t.trows;
                        if (pi < P) {
                            A xv[V], gv[V];
                            load_vec<T, V>(x + off + pi * C + cv * V, xv);
                            load_vec<T, V>(dy + off + pi * C + cv * V, gv);
#pragma unroll
                            for (int c = 0; c < V; ++c) {
                                A dz, dzx;
                                grad_terms(xv[c], gv[c], m[c], r[c], ww[c], bb[c], act, dz, dzx);
                                a1[c] += dz;
                                a2[c] += dzx;
                            }
                        }
                    }
#pragma unroll
                    for (int c = 0; c < V; ++c) { s1[c] += (double)a1[c]; s2[c] += (double)a2[c]; }
                }
            }
#pragma unroll
            for (int c = 0; c < V; ++c) {
                sm[0][threadIdx.x * V + c] = s1[c];
                sm[1][threadIdx.x * V + c] = s2[c];
            }
            __syncthreads();
            for (int q = threadIdx.x; q < t.tcols * V; q += blockDim.x) {
                if (cv0 + q / V >= CV) break;
                double a = 0, z = 0;
                for (int row = 0; row < t.trows; ++row) {
                    const int s = (row * t.tcols) * V + q;
                    a += sm[0][s];
                    z += sm[1][s];
                }
                const i64 o = item * C + cv0 * V + q;
                p1[o] = (A)a;
                p2[o] = (A)z;
            }
            __syncthreads();
        }
    }
}

// ------------------------------------------------------------------ backward step 2

// Per (n, g), a warp per channel: sdz/sdzx[n, c] = sum of the channel's nk partials (NCHW:
// (n*C + c) * nk + k; channels-last: (n*nk + k) * C + c); then A = sum w*sdz, B = sum w*sdzx
// over the group and the grad_x coefficients cm = mean, cs = rstd*w, k2 = -B rstd^2 / M,
// k3 = -A rstd / M.
template <typename T>
__global__ void gn_bwd_coeffs(const typename acc<T>::type* p1, const typename acc<T>::type* p2,
                              const typename acc<T>::type* mean,
                              const typename acc<T>::type* rstd, const T* w, double* sdz,
                              double* sdzx, typename acc<T>::type* cm, typename acc<T>::type* cs,
                              typename acc<T>::type* k2, typename acc<T>::type* k3, i64 NG, i64 G,
                              i64 C, i64 S, i64 nk, int channels_last) {
    typedef typename acc<T>::type A;
    __shared__ double wsum[2][32];
    __shared__ double AB[2];
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
    const i64 Cg = C / G;
    for (i64 ng = blockIdx.x; ng < NG; ng += gridDim.x) {
        const i64 n = ng / G, g = ng - n * G;
        double a = 0, bsum = 0;
        for (i64 cc = wid; cc < Cg; cc += nw) {
            const i64 c = g * Cg + cc;
            double s1 = 0, s2 = 0;
            for (i64 k = lane; k < nk; k += 32) {
                const i64 idx = channels_last ? (n * nk + k) * C + c : (n * C + c) * nk + k;
                s1 += (double)p1[idx];
                s2 += (double)p2[idx];
            }
            s1 = warp_sum(s1);
            s2 = warp_sum(s2);
            if (lane == 0) {
                sdz[n * C + c] = s1;
                sdzx[n * C + c] = s2;
                const double wc = (double)load(&w[c]);
                a += wc * s1;
                bsum += wc * s2;
            }
        }
        if (lane == 0) { wsum[0][wid] = a; wsum[1][wid] = bsum; }
        __syncthreads();
        if (threadIdx.x == 0) {
            double sa = 0, sb = 0;
            for (int i = 0; i < nw; ++i) { sa += wsum[0][i]; sb += wsum[1][i]; }
            AB[0] = sa;
            AB[1] = sb;
        }
        __syncthreads();
        const double r = (double)rstd[ng], M = (double)(Cg * S);
        const A mu = mean[ng];
        const A c2 = (A)(-AB[1] * r * r / M), c3 = (A)(-AB[0] * r / M);
        for (i64 cc = threadIdx.x; cc < Cg; cc += blockDim.x) {
            const i64 o = n * C + g * Cg + cc;
            cm[o] = mu;
            cs[o] = rstd[ng] * load(&w[g * Cg + cc]);
            k2[o] = c2;
            k3[o] = c3;
        }
        __syncthreads();
    }
}

// grad_weight[c] = sum_n sdzx[n, c], grad_bias[c] = sum_n sdz[n, c]: a warp per channel
template <typename T>
__global__ void gn_bwd_wb(const double* sdz, const double* sdzx, T* gw, T* gb, i64 N, i64 C) {
    const int lane = threadIdx.x & 31;
    const i64 nwarps = (i64)gridDim.x * (blockDim.x >> 5);
    for (i64 c = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5; c < C; c += nwarps) {
        double s1 = 0, s2 = 0;
        for (i64 n = lane; n < N; n += 32) { s1 += sdz[n * C + c]; s2 += sdzx[n * C + c]; }
        s1 = warp_sum(s1);
        s2 = warp_sum(s2);
        if (lane == 0) {
            store(&gw[c], (typename acc<T>::type)s2);
            store(&gb[c], (typename acc<T>::type)s1);
        }
    }
}

}  // namespace group_norm
}  // namespace fastnorm
