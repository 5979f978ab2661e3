// NMS family and box metrics on CUDA. Boxes arrive ranked (sorted by segment, then score desc);
// seg[r] is the segment (image x class) of rank r: boxes of different segments never interact.
// IoU in float (double for double); a box with x2 <= x1 or y2 <= y1 (or NaN) overlaps nothing.
#include "common.cuh"

using namespace fastnorm;
typedef unsigned long long u64;

template <typename A>
__device__ __forceinline__ A box_area(A x1, A y1, A x2, A y2) {
    return (x2 > x1 && y2 > y1) ? (x2 - x1) * (y2 - y1) : A(0);
}

template <typename A>
__device__ __forceinline__ A box_inter(const A* a, const A* b) {
    A w = fmin(a[2], b[2]) - fmax(a[0], b[0]);
    A h = fmin(a[3], b[3]) - fmax(a[1], b[1]);
    return (w > A(0) && h > A(0)) ? w * h : A(0);     // false for NaN
}

// criterion 0: IoU, 1: IoU - (d^2/c^2)^beta; 0 for non-overlapping boxes
template <typename A>
__device__ __forceinline__ A criterion(const A* a, const A* b, int crit, A beta) {
    A inter = box_inter(a, b);
    if (!(inter > A(0))) return A(0);
    A iou = inter / (box_area(a[0], a[1], a[2], a[3]) + box_area(b[0], b[1], b[2], b[3]) - inter);
    if (crit == 0) return iou;
    A dx = (a[0] + a[2] - b[0] - b[2]) * A(0.5), dy = (a[1] + a[3] - b[1] - b[3]) * A(0.5);
    A cw = fmax(a[2], b[2]) - fmin(a[0], b[0]), ch = fmax(a[3], b[3]) - fmin(a[1], b[1]);
    A pen = (dx * dx + dy * dy) / (cw * cw + ch * ch);
    if (beta != A(1)) pen = pow(pen, beta);
    return iou - pen;
}

template <typename T>
__device__ __forceinline__ void load_box(const T* boxes, i64 r, typename acc<T>::type* out) {
    for (int k = 0; k < 4; ++k) out[k] = load(boxes + 4 * r + k);
}

// Bitmask: mask[r * colblocks + cb] bit k set when rank r suppresses rank cb*64+k (> r, same
// segment). Grid (colblocks, rowblocks), 64 threads; tiles entirely across segments are zero.
template <typename T>
__global__ void nms_mask(const T* __restrict__ boxes, const long long* __restrict__ seg, i64 m,
                         i64 colblocks, double thr, int crit, double beta, u64* __restrict__ mask) {
    typedef typename acc<T>::type A;
    const i64 rb = blockIdx.y, cb = blockIdx.x;
    if (cb < rb) return;
    const i64 r0 = rb * 64, c0 = cb * 64;
    const int nr = (int)min((i64)64, m - r0), nc = (int)min((i64)64, m - c0);
    __shared__ A cbox[64 * 4];
    __shared__ long long cseg[64];
    if (threadIdx.x < nc) {
        load_box(boxes, c0 + threadIdx.x, &cbox[threadIdx.x * 4]);
        cseg[threadIdx.x] = seg[c0 + threadIdx.x];
    }
    __syncthreads();
    if (threadIdx.x >= nr) return;
    const i64 r = r0 + threadIdx.x;
    u64 bits = 0;
    const long long s = seg[r];
    if (s == cseg[0] || s == cseg[nc - 1] || (s > cseg[0] && s < cseg[nc - 1])) {
        A a[4];
        load_box(boxes, r, a);
        for (int k = (rb == cb ? threadIdx.x + 1 : 0); k < nc; ++k)
            if (cseg[k] == s && criterion(a, &cbox[k * 4], crit, A(beta)) > A(thr))
                bits |= 1ULL << k;
    }
    mask[r * colblocks + cb] = bits;
}

// On-device sweep, one block: rank order; a rank not removed is kept and ORs its mask row into
// `removed` (all threads, word-parallel). keep[r] = 1 for kept ranks; cap: at most `cap` kept.
// removed: colblocks words of global scratch (zeroed by the launcher).
__global__ void nms_sweep(const u64* __restrict__ mask, i64 m, i64 colblocks, i64 cap,
                          u64* __restrict__ removed, unsigned char* __restrict__ keep) {
    __shared__ int take;
    i64 count = 0;
    for (i64 r = 0; r < m; ++r) {
        if (threadIdx.x == 0) take = !((removed[r >> 6] >> (r & 63)) & 1ULL) && count < cap;
        __syncthreads();
        if (take) {
            ++count;
            if (threadIdx.x == 0) keep[r] = 1;
            const u64* row = mask + r * colblocks;
            for (i64 w = (r >> 6) + threadIdx.x; w < colblocks; w += blockDim.x) removed[w] |= row[w];
        }
        __syncthreads();
    }
}

// Pairwise metric (0 iou, 1 giou, 2 diou, 3 ciou) of a (N, 4) and b (M, 4); torchvision
// formulas with eps 1e-7, clamped widths, zero union -> IoU 0, NaN coordinate -> NaN.
template <typename T>
__global__ void box_metric(const T* __restrict__ a, const T* __restrict__ b, i64 N, i64 M,
                           int metric, T* __restrict__ out) {
    typedef typename acc<T>::type A;
    for (i64 t = blockIdx.x * (i64)blockDim.x + threadIdx.x; t < N * M;
         t += (i64)gridDim.x * blockDim.x) {
        A p[4], q[4];
        load_box(a, t / M, p);
        load_box(b, t % M, q);
        bool nan = false;
        for (int k = 0; k < 4; ++k) nan |= isnan(p[k]) || isnan(q[k]);
        A v;
        if (nan) {
            v = A(NAN);
        } else {
            A wa = fmax(p[2] - p[0], A(0)), ha = fmax(p[3] - p[1], A(0));
            A wb = fmax(q[2] - q[0], A(0)), hb = fmax(q[3] - q[1], A(0));
            A inter = box_inter(p, q), uni = wa * ha + wb * hb - inter;
            A iou = uni > A(0) ? inter / uni : A(0);
            A cw = fmax(p[2], q[2]) - fmin(p[0], q[0]), ch = fmax(p[3], q[3]) - fmin(p[1], q[1]);
            v = iou;
            if (metric == 1) {
                A c = fmax(cw, A(0)) * fmax(ch, A(0));
                if (c > A(0)) v = iou - (c - uni) / c;
            } else if (metric >= 2) {
                A dx = (p[0] + p[2] - q[0] - q[2]) * A(0.5), dy = (p[1] + p[3] - q[1] - q[3]) * A(0.5);
                v = iou - (dx * dx + dy * dy) / (cw * cw + ch * ch + A(1e-7));
                if (metric == 3) {
                    A d = atan2(wb, hb) - atan2(wa, ha);
                    A vv = A(4) / A(9.869604401089358) * d * d;
                    v -= vv / (A(1) - iou + vv + A(1e-7)) * vv;
                }
            }
        }
        store(out + t, v);
    }
}

// Matrix NMS on ranked boxes: comp[r] = max IoU with a higher rank of its segment (segstart[r]
// is the first rank of r's segment); then decay[r] = min(1, min f(iou)/f(comp)).
template <typename T>
__global__ void matrix_comp(const T* __restrict__ boxes, const long long* __restrict__ segstart,
                            i64 m, double* __restrict__ comp) {
    typedef typename acc<T>::type A;
    for (i64 r = blockIdx.x * (i64)blockDim.x + threadIdx.x; r < m; r += (i64)gridDim.x * blockDim.x) {
        A a[4], b[4];
        load_box(boxes, r, a);
        A c = A(0);
        for (i64 k = segstart[r]; k < r; ++k) {
            load_box(boxes, k, b);
            c = fmax(c, criterion(b, a, 0, A(1)));
        }
        comp[r] = c;
    }
}

template <typename T>
__global__ void matrix_decay(const T* __restrict__ boxes, const long long* __restrict__ segstart,
                             const double* __restrict__ comp, i64 m, int kernel, double sigma,
                             double* __restrict__ decay) {
    typedef typename acc<T>::type A;
    for (i64 r = blockIdx.x * (i64)blockDim.x + threadIdx.x; r < m; r += (i64)gridDim.x * blockDim.x) {
        A a[4], b[4];
        load_box(boxes, r, a);
        double d = 1.0;
        for (i64 k = segstart[r]; k < r; ++k) {
            load_box(boxes, k, b);
            double iou = criterion(b, a, 0, A(1)), c = comp[k];
            double fc = kernel == 0 ? exp(-sigma * c * c) : 1.0 - c;
            if (fc > 0) {
                double f = (kernel == 0 ? exp(-sigma * iou * iou) : 1.0 - iou) / fc;
                d = fmin(d, f);
            }
        }
        decay[r] = d;
    }
}

// Weighted NMS, step 1: assign[j] = the first kept rank of j's segment that suppresses j (mask
// bit), j itself when j is kept, -1 otherwise (segstart[j]: first rank of j's segment).
__global__ void nms_assign(const u64* __restrict__ mask, const unsigned char* __restrict__ keep,
                           const long long* __restrict__ segstart, i64 m, i64 colblocks,
                           long long* __restrict__ assign) {
    for (i64 j = blockIdx.x * (i64)blockDim.x + threadIdx.x; j < m; j += (i64)gridDim.x * blockDim.x) {
        long long a = -1;
        if (keep[j]) {
            a = j;
        } else {
            for (i64 i = segstart[j]; i < j; ++i)
                if (keep[i] && ((mask[i * colblocks + (j >> 6)] >> (j & 63)) & 1ULL)) { a = i; break; }
        }
        assign[j] = a;
    }
}

// Weighted NMS, step 2: kept box t (rank kept[t]) becomes the w-weighted mean of the ranks
// members[lo[t]:hi[t]] (its cluster, in rank order: the CPU's summation order, in double);
// a cluster whose weights sum to 0 or a non-finite value keeps its box.
template <typename T>
__global__ void weighted_fuse(const T* __restrict__ boxes, const double* __restrict__ w,
                              const long long* __restrict__ members, const long long* __restrict__ lo,
                              const long long* __restrict__ hi, const long long* __restrict__ kept,
                              i64 k, T* __restrict__ out) {
    typedef typename acc<T>::type A;
    for (i64 t = blockIdx.x * (i64)blockDim.x + threadIdx.x; t < k; t += (i64)gridDim.x * blockDim.x) {
        double s[4] = {0, 0, 0, 0}, ws = 0;
        for (i64 p = lo[t]; p < hi[t]; ++p) {
            const i64 j = members[p];
            for (int c = 0; c < 4; ++c) s[c] += w[j] * (double)load(boxes + 4 * j + c);
            ws += w[j];
        }
        const bool good = ws != 0 && isfinite(ws);
        for (int c = 0; c < 4; ++c)
            store(out + 4 * t + c, good ? (A)(s[c] / ws) : load(boxes + 4 * kept[t] + c));
    }
}

// Soft-NMS, one block (SOFT_THREADS threads) per segment [rstart[b], rstart[b+1]) of ranked
// boxes: repeatedly select the live box of highest current score (ties: lower input index
// orig), then decay the other live boxes (IoU in double, as on the CPU) and drop those below
// score_thr. cur: current scores (double, updated in place); out_rank/out_score: selection
// order, written from the segment's first rank on; count[b]: how many were selected.
#define SOFT_THREADS 256
template <typename T>
__global__ void __launch_bounds__(SOFT_THREADS)
soft_nms_seg(const T* __restrict__ boxes, const long long* __restrict__ rstart,
             const long long* __restrict__ orig, double* __restrict__ cur,
             unsigned char* __restrict__ alive, int method, double sigma, double thr,
             double score_thr, long long* __restrict__ out_rank, double* __restrict__ out_score,
             long long* __restrict__ count) {
    __shared__ double bs[SOFT_THREADS];
    __shared__ long long bo[SOFT_THREADS], br[SOFT_THREADS];
    const i64 r0 = rstart[blockIdx.x], r1 = rstart[blockIdx.x + 1];
    const int t = threadIdx.x;
    for (i64 r = r0 + t; r < r1; r += SOFT_THREADS) alive[r] = cur[r] >= score_thr;
    __syncthreads();
    i64 n = 0;
    while (true) {
        long long b = -1, bor = 0;
        double bsc = 0;
        for (i64 r = r0 + t; r < r1; r += SOFT_THREADS)
            if (alive[r] && (b < 0 || cur[r] > bsc || (cur[r] == bsc && orig[r] < bor))) {
                b = r; bsc = cur[r]; bor = orig[r];
            }
        bs[t] = bsc; bo[t] = bor; br[t] = b;
        __syncthreads();
        for (int h = SOFT_THREADS / 2; h > 0; h >>= 1) {
            if (t < h && br[t + h] >= 0 &&
                (br[t] < 0 || bs[t + h] > bs[t] || (bs[t + h] == bs[t] && bo[t + h] < bo[t]))) {
                bs[t] = bs[t + h]; bo[t] = bo[t + h]; br[t] = br[t + h];
            }
            __syncthreads();
        }
        b = br[0];
        bsc = bs[0];
        __syncthreads();                       // everyone has read the winner
        if (b < 0) break;
        if (t == 0) {
            alive[b] = 0;
            out_rank[r0 + n] = b;
            out_score[r0 + n] = bsc;
        }
        ++n;
        double p[4];
        for (int c = 0; c < 4; ++c) p[c] = (double)load(boxes + 4 * b + c);
        const double pa = box_area(p[0], p[1], p[2], p[3]);
        for (i64 j = r0 + t; j < r1; j += SOFT_THREADS) {
            if (j == b || !alive[j]) continue;
            double q[4];
            for (int c = 0; c < 4; ++c) q[c] = (double)load(boxes + 4 * j + c);
            const double inter = box_inter(p, q);
            if (!(inter > 0)) continue;
            const double iou = inter / (pa + box_area(q[0], q[1], q[2], q[3]) - inter);
            if (!(iou > 0)) continue;
            const double f = method == 0 ? exp(-iou * iou / sigma) : (iou > thr ? 1.0 - iou : 1.0);
            cur[j] *= f;
            if (!(cur[j] >= score_thr)) alive[j] = 0;
        }
        __syncthreads();
    }
    if (t == 0) count[blockIdx.x] = n;
}
