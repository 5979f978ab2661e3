// NMS family and box metrics on CUDA. Boxes arrive ranked (sorted by segment, then score desc);
// seg[r] is the segment (image x class) of rank r, rstart[s] the first rank of segment s: boxes
// of different segments never interact.
//
// Every geometric decision is made in double, whatever the box dtype, with the CPU kernels'
// formulas (src/nms.pyx), so that both backends keep and suppress the same boxes: a box with
// x2 <= x1 or y2 <= y1, or with a NaN coordinate, has area 0 and overlaps nothing.
#include "common.cuh"

namespace fastnorm {
namespace nms {

typedef unsigned long long u64;

// integer codes of fastnorm._kernels: CRITERIA, DECAYS, METRICS (tests/test_contract.py)
enum { CRIT_IOU = 0, CRIT_DIOU = 1, CRIT_ROTATED = 2 };
enum { DECAY_GAUSSIAN = 0, DECAY_LINEAR = 1, DECAY_HARD = 2 };
enum { METRIC_IOU = 0, METRIC_GIOU = 1, METRIC_DIOU = 2, METRIC_CIOU = 3 };

__device__ __forceinline__ double box_area(const double* b) {
    return (b[2] > b[0] && b[3] > b[1]) ? (b[2] - b[0]) * (b[3] - b[1]) : 0.0;
}

// intersection of two boxes (0 when they do not overlap); comparisons, not fmin/fmax, so that a
// NaN coordinate gives no overlap rather than the other box's edge
__device__ __forceinline__ double box_inter(const double* a, const double* b) {
    const double w = (a[2] < b[2] ? a[2] : b[2]) - (a[0] > b[0] ? a[0] : b[0]);
    const double h = (a[3] < b[3] ? a[3] : b[3]) - (a[1] > b[1] ? a[1] : b[1]);
    return (w > 0 && h > 0) ? w * h : 0.0;
}

// IoU with the areas given; 0 unless both boxes have positive area and overlap (and for the NaN
// that infinite boxes give)
__device__ __forceinline__ double box_iou(const double* a, double aa, const double* b, double ba) {
    if (!(aa > 0 && ba > 0)) return 0.0;
    const double inter = box_inter(a, b);
    if (!(inter > 0)) return 0.0;
    const double r = inter / (aa + ba - inter);
    return r > 0 ? r : 0.0;
}

// ------------------------------------------------------------------ rotated boxes
//
// A rotated box (cx, cy, w, h, angle) is prepared once into ROT_W doubles: cx, cy, w/2, h/2,
// cos, sin of theta = angle * angle_scale, area, circumradius; its local point (u, v) is at
// (cx + u cos + v sin, cy - u sin + v cos). A box with a non-finite field, w <= 0, h <= 0 or a
// bounding box of non-finite area gets area 0: it overlaps nothing. The CPU's arithmetic
// (src/nms.pyx _rot_prepare, _rot_iou), step for step.
const int ROT_W = 8;               // ROT_W in nms.py

__device__ __forceinline__ void rotated_prepare_one(double cx, double cy, double w, double h,
                                                    double angle, double scale, double* p) {
    const double hw = 0.5 * w, hh = 0.5 * h;
    for (int k = 0; k < ROT_W; ++k) p[k] = 0.0;
    if (!(w > 0 && h > 0 && isfinite(cx) && isfinite(cy) && isfinite(w * h) && isfinite(angle)))
        return;
    const double t = angle * scale, c = cos(t), s = sin(t);
    const double ex = fabs(hw * c) + fabs(hh * s), ey = fabs(hw * s) + fabs(hh * c);
    const double pad = 1e-12 * (ex + ey);
    const double bw = (cx + ex + pad + 4e-16 * fabs(cx)) - (cx - ex - pad - 4e-16 * fabs(cx));
    const double bh = (cy + ey + pad + 4e-16 * fabs(cy)) - (cy - ey - pad - 4e-16 * fabs(cy));
    if (!isfinite(bw * bh)) return;
    p[0] = cx; p[1] = cy; p[2] = hw; p[3] = hh; p[4] = c; p[5] = s;
    p[6] = w * h;
    p[7] = sqrt(hw * hw + hh * hh);
}

// Sutherland-Hodgman: polygon (U, V)[0:n] clipped to sgn * U <= bound -> (OU, OV); points on
// the line are inside, a NaN vertex is outside.
__device__ __forceinline__ int clip_half_plane(const double* U, const double* V, int n,
                                               double* OU, double* OV, double bound, double sgn) {
    int k = 0;
    for (int i = 0; i < n; ++i) {
        const int prev = i > 0 ? i - 1 : n - 1;
        const bool inc = sgn * U[i] <= bound, inp = sgn * U[prev] <= bound;
        if (inc != inp) {
            const double t = (bound - sgn * U[prev]) / (sgn * U[i] - sgn * U[prev]);
            OU[k] = sgn * bound;
            OV[k] = V[prev] + t * (V[i] - V[prev]);
            ++k;
        }
        if (inc) { OU[k] = U[i]; OV[k] = V[i]; ++k; }
    }
    return k;
}

// IoU of two prepared rotated boxes: b's corners in a's frame, clipped against a's sides,
// shoelace area clamped to the smaller box; 0 for a box of area 0 or no overlap.
__device__ __forceinline__ double rotated_iou(const double* a, const double* b) {
    if (!(a[6] > 0 && b[6] > 0)) return 0.0;
    const double dx = b[0] - a[0], dy = b[1] - a[1], rr = a[7] + b[7];
    if (dx * dx + dy * dy > rr * rr * (1.0 + 1e-9)) return 0.0;     // circumcircles apart
    double cd = 1.0, sd = 0.0;                                        // same angle: aligned
    if (!(a[4] == b[4] && a[5] == b[5])) {
        cd = b[4] * a[4] + b[5] * a[5];
        sd = b[5] * a[4] - b[4] * a[5];
    }
    const double px = dx * a[4] - dy * a[5], py = dx * a[5] + dy * a[4];
    const double uc = b[2] * cd, us = b[2] * sd, vc = b[3] * cd, vs = b[3] * sd;
    double x[16], y[16], X[16], Y[16];
    x[0] = px - uc - vs; y[0] = py + us - vc;
    x[1] = px + uc - vs; y[1] = py - us - vc;
    x[2] = px + uc + vs; y[2] = py - us + vc;
    x[3] = px - uc + vs; y[3] = py + us + vc;
    int n = clip_half_plane(x, y, 4, X, Y, a[2], 1.0);
    n = clip_half_plane(X, Y, n, x, y, a[2], -1.0);
    n = clip_half_plane(y, x, n, Y, X, a[3], 1.0);
    n = clip_half_plane(Y, X, n, y, x, a[3], -1.0);
    double inter = 0.0;
    for (int i = 0; i < n; ++i) {
        const int j = i + 1 < n ? i + 1 : 0;
        inter += x[i] * y[j] - x[j] * y[i];
    }
    inter = 0.5 * fabs(inter);
    const double amin = a[6] < b[6] ? a[6] : b[6];
    if (inter > amin) inter = amin;
    if (!(inter > 0)) return 0.0;
    const double r = inter / (a[6] + b[6] - inter);
    return r > 0 ? r : 0.0;
}

// criterion 0: IoU; 1: DIoU, IoU - (d^2 / c^2)^beta for overlapping boxes; 2: the IoU of
// prepared rotated boxes
__device__ __forceinline__ double criterion(const double* a, const double* b, int crit,
                                            double beta) {
    if (crit == CRIT_ROTATED) return rotated_iou(a, b);
    double v = box_iou(a, box_area(a), b, box_area(b));
    if (crit == CRIT_IOU || !(v > 0)) return v;
    const double dx = (a[0] + a[2] - b[0] - b[2]) * 0.5, dy = (a[1] + a[3] - b[1] - b[3]) * 0.5;
    const double cw = (a[2] > b[2] ? a[2] : b[2]) - (a[0] < b[0] ? a[0] : b[0]);
    const double ch = (a[3] > b[3] ? a[3] : b[3]) - (a[1] < b[1] ? a[1] : b[1]);
    const double c2 = cw * cw + ch * ch;
    double pen = c2 > 0 ? (dx * dx + dy * dy) / c2 : 0.0;
    if (beta != 1.0) pen = pow(pen, beta);
    return v - pen;
}

template <typename T>
__device__ __forceinline__ void load_box(const T* boxes, i64 r, double* out, int width = 4) {
    for (int k = 0; k < width; ++k) out[k] = (double)load(boxes + width * r + k);
}

__device__ __forceinline__ double quiet_nan() { return __longlong_as_double(0x7ff8000000000000LL); }
__device__ __forceinline__ double infinity() { return __longlong_as_double(0x7ff0000000000000LL); }

// ------------------------------------------------------------------ ranking
//
// keys[i] for candidate i (input index cand[i], or i without cand): an unsigned key whose
// ascending order is the ranking's score order -- decreasing score, -0 equal to +0, NaN after
// everything -- so that one stable sort (ties: lower index first) ranks the boxes. The key of a
// value v is the order-preserving map of -v's bits (negative: all bits flipped; otherwise the
// sign bit set), in double for double scores and in float for the others (exact).
__device__ __forceinline__ u64 desc_key(double v) {
    if (v != v) return ~0ULL;
    const double w = v == 0.0 ? 0.0 : -v;                   // -0 and +0: one key
    const u64 b = (u64)__double_as_longlong(w);
    return (b >> 63) ? ~b : b | (1ULL << 63);
}
__device__ __forceinline__ u64 desc_key(float v) {
    if (v != v) return ~0ULL;
    const float w = v == 0.0f ? 0.0f : -v;
    const unsigned b = (unsigned)__float_as_int(w);
    return (u64)((b >> 31) ? ~b : b | 0x80000000u);
}

template <typename T>
__global__ void score_keys(const T* __restrict__ scores, const i64* __restrict__ cand, i64 m,
                           u64* __restrict__ keys) {
    typedef typename acc<T>::type A;                        // float, or double for double
    const i64 stride = (i64)gridDim.x * blockDim.x;
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < m; i += stride)
        keys[i] = desc_key((A)load(scores + (cand ? cand[i] : i)));
}

// flags[r] = 1 where rank r starts a segment: r == 0, or its image (batch) or class differs
// from rank r - 1's (keys read through the ranking order; a null key array: absent)
__global__ void segment_flags(const i64* __restrict__ batch, const i64* __restrict__ classes,
                              const i64* __restrict__ order, i64 m,
                              unsigned char* __restrict__ flags) {
    const i64 stride = (i64)gridDim.x * blockDim.x;
    for (i64 r = blockIdx.x * (i64)blockDim.x + threadIdx.x; r < m; r += stride) {
        bool f = r == 0;
        if (!f && batch) f = batch[order[r]] != batch[order[r - 1]];
        if (!f && classes) f = classes[order[r]] != classes[order[r - 1]];
        flags[r] = f;
    }
}

// ------------------------------------------------------------------ greedy NMS
//
// The ranks are processed in chunks (planned by the launcher, nms.py `_plan`); each chunk holds
// pieces, one per segment that has ranks in the chunk: ranks [pa, pb) of a segment ending at
// rank pe. A piece's suppression mask has pw = ceil(pe / 64) - pa / 64 words per rank, word w
// covering ranks (pa / 64 + w) * 64 .. + 63, and starts at word poff of the chunk's mask buffer:
// memory is the sum over pieces of (pb - pa) * pw words, bounded per chunk by the launcher.
// `removed` (one bit per rank) carries suppression from chunk to chunk.

// Mask of one chunk: block (x, y) takes the ranks c0 + 64 y .. + 63 (one per thread) against the
// 64 ranks of word (c0 + 64 y) / 64 + x. Ranks already removed by earlier chunks are skipped
// (their rows are never read). rthr: each rank's own threshold (adaptive NMS), or null: thr.
// CRIT_ROTATED: boxes are the prepared rotated boxes (double, ROT_W each).
template <typename T>
__global__ void nms_mask(const T* __restrict__ boxes, const i64* __restrict__ seg,
                         const i64* __restrict__ pa, const i64* __restrict__ pe,
                         const i64* __restrict__ pw, const i64* __restrict__ poff, i64 c0,
                         i64 c1, i64 p0, i64 s0, const u64* __restrict__ removed,
                         const double* __restrict__ rthr, double thr, int crit, double beta,
                         u64* __restrict__ mask) {
    __shared__ double cbox[64 * ROT_W];
    const int bw = crit == CRIT_ROTATED ? ROT_W : 4;
    const i64 row0 = c0 + 64 * (i64)blockIdx.y;
    const i64 w = (row0 >> 6) + blockIdx.x, col0 = w * 64;
    const i64 r = row0 + threadIdx.x;
    i64 end = 0;                                     // end of the block's last segment
    {
        const i64 last = min(row0 + 63, c1 - 1);
        end = pe[p0 + seg[last] - s0];
    }
    if (col0 >= end) return;                         // uniform: the whole block leaves
    const i64 ncol = min((i64)64, end - col0);
    if (threadIdx.x < ncol) load_box(boxes, col0 + threadIdx.x, &cbox[threadIdx.x * bw], bw);
    __syncthreads();
    if (r >= c1 || ((removed[r >> 6] >> (r & 63)) & 1ULL)) return;
    const i64 p = p0 + seg[r] - s0, e = pe[p];
    if (col0 >= e) return;                           // past this rank's segment
    double a[ROT_W];
    load_box(boxes, r, a, bw);
    const double t = rthr ? rthr[r] : thr;
    u64 bits = 0;
    for (int k = 0; k < ncol; ++k) {
        const i64 c = col0 + k;
        if (c > r && c < e && criterion(a, &cbox[k * bw], crit, beta) > t) bits |= 1ULL << k;
    }
    mask[poff[p] + (r - pa[p]) * pw[p] + (w - (pa[p] >> 6))] = bits;
}

// Sweep of one chunk, a block per piece: the piece's ranks in 64-rank tiles (one removed-bitmap
// word each). Per tile: the block loads the tile's diagonal mask words (each rank's row at the
// tile's own word) into shared memory; thread 0 resolves the tile's ranks in order in registers
// (a rank not yet removed is kept, while the segment has kept fewer than `cap`, and ORs its
// diagonal word into the tile's bits); then the block ORs the kept ranks' rows into `removed`
// for the tile's word and the later ones (atomicOr: a word may hold two segments). Three
// barriers per tile and no global load on the serial path, where a per-rank sweep crosses a
// barrier and waits for a global load per kept rank. count[s]: kept so far.
__global__ void nms_sweep(const u64* __restrict__ mask, const i64* __restrict__ pa,
                          const i64* __restrict__ pb, const i64* __restrict__ pe,
                          const i64* __restrict__ pw, const i64* __restrict__ poff,
                          const i64* __restrict__ pseg, i64 p0, i64 cap,
                          u64* __restrict__ removed, i64* __restrict__ count,
                          unsigned char* __restrict__ keep) {
    __shared__ u64 diag[64];
    __shared__ u64 s_kept;
    __shared__ i64 s_n;
    const i64 p = p0 + blockIdx.x, a = pa[p], b = pb[p], W = pw[p];
    const i64 wend = (pe[p] + 63) >> 6;
    const u64* rows = mask + poff[p] - (a >> 6);   // rank r's row: rows + (r - a) * W, by word
    if (threadIdx.x == 0) s_n = count[pseg[p]];
    __syncthreads();
    i64 n = s_n;
    for (i64 t = a >> 6; t <= (b - 1) >> 6 && n < cap; ++t) {
        const i64 r0 = max(a, t << 6), r1 = min(b, (t + 1) << 6);
        for (i64 i = threadIdx.x; i < r1 - r0; i += blockDim.x)
            diag[i] = rows[(r0 + i - a) * W + t];
        __syncthreads();
        if (threadIdx.x == 0) {
            u64 cur = removed[t], kept = 0;
            for (i64 r = r0; r < r1 && n < cap; ++r) {
                if ((cur >> (r & 63)) & 1ULL) continue;
                kept |= 1ULL << (r & 63);
                keep[r] = 1;
                ++n;
                cur |= diag[r - r0];
            }
            s_kept = kept;
            s_n = n;
        }
        __syncthreads();
        const u64 kept = s_kept;
        n = s_n;
        for (i64 w = t + threadIdx.x; kept && w < wend; w += blockDim.x) {
            u64 acc = 0;
            for (u64 k = kept; k; k &= k - 1)
                acc |= rows[((t << 6) + __ffsll((long long)k) - 1 - a) * W + w];
            if (acc) atomicOr(&removed[w], acc);
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) count[pseg[p]] = n;
}

// Weighted NMS: assign[j] = the first kept rank of j's segment that suppresses j (IoU > thr),
// j itself when j is kept, -1 otherwise.
template <typename T>
__global__ void nms_assign(const T* __restrict__ boxes, const unsigned char* __restrict__ keep,
                           const i64* __restrict__ seg, const i64* __restrict__ rstart, i64 m,
                           double thr, i64* __restrict__ assign) {
    const i64 stride = (i64)gridDim.x * blockDim.x;
    for (i64 j = blockIdx.x * (i64)blockDim.x + threadIdx.x; j < m; j += stride) {
        i64 a = -1;
        if (keep[j]) {
            a = j;
        } else {
            double q[4], b[4];
            load_box(boxes, j, q);
            const double qa = box_area(q);
            for (i64 i = rstart[seg[j]]; i < j; ++i) {
                if (!keep[i]) continue;
                load_box(boxes, i, b);
                if (box_iou(b, box_area(b), q, qa) > thr) { a = i; break; }
            }
        }
        assign[j] = a;
    }
}

// Weighted NMS: kept box t (rank kept[t]) becomes the w-weighted mean of the ranks
// members[lo[t]:hi[t]] (its cluster, in rank order: the CPU's summation order, in double);
// a cluster whose weights sum to 0 or a non-finite value keeps its box.
template <typename T>
__global__ void weighted_fuse(const T* __restrict__ boxes, const double* __restrict__ w,
                              const i64* __restrict__ members, const i64* __restrict__ lo,
                              const i64* __restrict__ hi, const i64* __restrict__ kept,
                              i64 k, T* __restrict__ out) {
    typedef typename acc<T>::type A;
    const i64 stride = (i64)gridDim.x * blockDim.x;
    for (i64 t = blockIdx.x * (i64)blockDim.x + threadIdx.x; t < k; t += stride) {
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

// ------------------------------------------------------------------ box metrics

// Pairwise metric (0 iou, 1 giou, 2 diou, 3 ciou) of a (N, 4) and b (M, 4); torchvision
// formulas with eps 1e-7, clamped widths, zero union -> IoU 0, NaN coordinate -> NaN.
template <typename T>
__global__ void box_metric(const T* __restrict__ a, const T* __restrict__ b, i64 N, i64 M,
                           int metric, T* __restrict__ out) {
    for (i64 t = blockIdx.x * (i64)blockDim.x + threadIdx.x; t < N * M;
         t += (i64)gridDim.x * blockDim.x) {
        double p[4], q[4];
        load_box(a, t / M, p);
        load_box(b, t % M, q);
        bool nan = false;
        for (int k = 0; k < 4; ++k) nan |= isnan(p[k]) || isnan(q[k]);
        double v;
        if (nan) {
            v = quiet_nan();
        } else {
            const double inter = box_inter(p, q), uni = box_area(p) + box_area(q) - inter;
            const double iou = uni > 0 ? inter / uni : 0.0;
            const double cw = (p[2] > q[2] ? p[2] : q[2]) - (p[0] < q[0] ? p[0] : q[0]);
            const double ch = (p[3] > q[3] ? p[3] : q[3]) - (p[1] < q[1] ? p[1] : q[1]);
            v = iou;
            if (metric == METRIC_GIOU) {
                const double c = (cw > 0 ? cw : 0.0) * (ch > 0 ? ch : 0.0);
                if (c > 0) v = iou - (c - uni) / c;
            } else if (metric == METRIC_DIOU || metric == METRIC_CIOU) {
                const double dx = (p[0] + p[2] - q[0] - q[2]) * 0.5;
                const double dy = (p[1] + p[3] - q[1] - q[3]) * 0.5;
                const double c2 = cw * cw + ch * ch + 1e-7;
                v = iou - (c2 > 0 ? (dx * dx + dy * dy) / c2 : 0.0);
                if (metric == METRIC_CIOU) {
                    const double wa = p[2] > p[0] ? p[2] - p[0] : 0.0;
                    const double ha = p[3] > p[1] ? p[3] - p[1] : 0.0;
                    const double wb = q[2] > q[0] ? q[2] - q[0] : 0.0;
                    const double hb = q[3] > q[1] ? q[3] - q[1] : 0.0;
                    const double d = atan2(wb, hb) - atan2(wa, ha);
                    const double vv = 4.0 / 9.869604401089358 * d * d;
                    v -= vv / (1.0 - iou + vv + 1e-7) * vv;
                }
            }
        }
        store(out + t, (typename acc<T>::type)v);
    }
}

// Rotated boxes (n, 5) -> prepared (n, ROT_W) double (rotated_prepare_one).
template <typename T>
__global__ void rotated_prepare(const T* __restrict__ boxes, i64 n, double scale,
                                double* __restrict__ out) {
    const i64 stride = (i64)gridDim.x * blockDim.x;
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += stride) {
        double b[5];
        load_box(boxes, i, b, 5);
        rotated_prepare_one(b[0], b[1], b[2], b[3], b[4], scale, out + ROT_W * i);
    }
}

// Pairwise IoU of prepared rotated boxes pa (N, ROT_W) and pb (M, ROT_W), in double, stored as T.
template <typename T>
__global__ void box_iou_rotated(const double* __restrict__ pa, const double* __restrict__ pb,
                                i64 N, i64 M, T* __restrict__ out) {
    for (i64 t = blockIdx.x * (i64)blockDim.x + threadIdx.x; t < N * M;
         t += (i64)gridDim.x * blockDim.x)
        store(out + t, (typename acc<T>::type)rotated_iou(pa + ROT_W * (t / M),
                                                          pb + ROT_W * (t % M)));
}

// ------------------------------------------------------------------ Matrix NMS

// comp[r] = max IoU of rank r with a higher rank of its segment (segstart[r]: the segment's
// first rank); then decay[r] = min(1, min f(iou) / f(comp)).
template <typename T>
__global__ void matrix_comp(const T* __restrict__ boxes, const i64* __restrict__ segstart,
                            i64 m, double* __restrict__ comp) {
    const i64 stride = (i64)gridDim.x * blockDim.x;
    for (i64 r = blockIdx.x * (i64)blockDim.x + threadIdx.x; r < m; r += stride) {
        double a[4], b[4];
        load_box(boxes, r, a);
        const double aa = box_area(a);
        double c = 0;
        for (i64 k = segstart[r]; k < r; ++k) {
            load_box(boxes, k, b);
            const double iou = box_iou(b, box_area(b), a, aa);
            if (iou > c) c = iou;
        }
        comp[r] = c;
    }
}

template <typename T>
__global__ void matrix_decay(const T* __restrict__ boxes, const i64* __restrict__ segstart,
                             const double* __restrict__ comp, i64 m, int kernel, double sigma,
                             double* __restrict__ decay) {
    const i64 stride = (i64)gridDim.x * blockDim.x;
    for (i64 r = blockIdx.x * (i64)blockDim.x + threadIdx.x; r < m; r += stride) {
        double a[4], b[4];
        load_box(boxes, r, a);
        const double aa = box_area(a);
        double d = 1.0;
        for (i64 k = segstart[r]; k < r; ++k) {
            load_box(boxes, k, b);
            const double iou = box_iou(b, box_area(b), a, aa), c = comp[k];
            const double fc = kernel == DECAY_GAUSSIAN ? exp(-sigma * c * c) : 1.0 - c;
            if (fc > 0) {
                const double f = (kernel == DECAY_GAUSSIAN ? exp(-sigma * iou * iou) : 1.0 - iou)
                                 / fc;
                if (f < d) d = f;
            }
        }
        decay[r] = d;
    }
}

// ------------------------------------------------------------------ Soft-NMS and Softer-NMS
//
// One block (SOFT_THREADS threads) per segment [rstart[b], rstart[b+1]) of ranked boxes:
// repeatedly select the live box of highest current score (ties: lower input index orig), then
// decay the other live boxes and drop those below score_thr. cur: current scores (double,
// updated in place); out_rank/out_score: selection order, written from the segment's first rank
// on; count[b]: how many were selected. With rthr (adaptive NMS), a selected rank b decays only
// the boxes whose IoU with it is > rthr[b], with either method.
const int SOFT_THREADS = 256;      // SOFT_THREADS in nms.py

// The live rank of [r0, r1) of highest cur (ties: lower orig), -1 when none; its score in *score.
// Called by the whole block; sh*: SOFT_THREADS-sized shared scratch.
__device__ __forceinline__ i64 seg_argmax(i64 r0, i64 r1, const i64* __restrict__ orig,
                                          const double* __restrict__ cur,
                                          const unsigned char* __restrict__ alive, double* bs,
                                          i64* bo, i64* br, double* score) {
    const int t = threadIdx.x;
    i64 b = -1, bor = 0;
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
    *score = bs[0];
    __syncthreads();                           // everyone has read the winner
    return b;
}

// Decay (or, DECAY_HARD, remove) a live box of IoU iou > 0 with the selected one, as the CPU's
// _soft_sweep: "linear" and "hard" act when iou > thr, "gaussian" on every overlap unless gated
// (adaptive NMS: only above the selected box's own threshold thr); a box whose score falls below
// score_thr is dropped.
__device__ __forceinline__ void decay(double* cur, unsigned char* alive, double iou, int method,
                                      double sigma, double thr, bool gated, double score_thr) {
    if ((method != DECAY_GAUSSIAN || gated) && !(iou > thr)) return;
    if (method == DECAY_HARD) {
        *alive = 0;
        return;
    }
    *cur *= method == DECAY_GAUSSIAN ? exp(-iou * iou / sigma) : 1.0 - iou;
    if (!(*cur >= score_thr)) *alive = 0;
}

template <typename T>
__global__ void __launch_bounds__(SOFT_THREADS)
soft_nms_seg(const T* __restrict__ boxes, const i64* __restrict__ rstart,
             const i64* __restrict__ orig, double* __restrict__ cur,
             unsigned char* __restrict__ alive, const double* __restrict__ rthr, int method,
             double sigma, double thr, double score_thr, i64* __restrict__ out_rank,
             double* __restrict__ out_score, i64* __restrict__ count) {
    __shared__ double bs[SOFT_THREADS];
    __shared__ i64 bo[SOFT_THREADS], br[SOFT_THREADS];
    const i64 r0 = rstart[blockIdx.x], r1 = rstart[blockIdx.x + 1];
    const int t = threadIdx.x;
    for (i64 r = r0 + t; r < r1; r += SOFT_THREADS) alive[r] = cur[r] >= score_thr;
    __syncthreads();
    i64 n = 0;
    while (true) {
        double bsc;
        const i64 b = seg_argmax(r0, r1, orig, cur, alive, bs, bo, br, &bsc);
        if (b < 0) break;
        if (t == 0) {
            alive[b] = 0;
            out_rank[r0 + n] = b;
            out_score[r0 + n] = bsc;
        }
        ++n;
        double p[4];
        load_box(boxes, b, p);
        const double pa = box_area(p), bt = rthr ? rthr[b] : thr;
        for (i64 j = r0 + t; j < r1; j += SOFT_THREADS) {
            if (j == b || !alive[j]) continue;
            double q[4];
            load_box(boxes, j, q);
            const double iou = box_iou(p, pa, q, box_area(q));
            if (iou > 0)
                decay(&cur[j], &alive[j], iou, method, sigma, bt, rthr != nullptr, score_thr);
        }
        __syncthreads();
    }
    if (t == 0) count[blockIdx.x] = n;
}

// Variance voting: the weight p / v of a voter (p > 0 its IoU weight, v its variance of the
// coordinate) scaled by the smallest variance vmin of the voters (ratios <= 1: no overflow);
// vmin == 0: only the zero-variance voters count; a NaN variance gives no weight (as the CPU's
// _vote_weight).
__device__ __forceinline__ double vote_weight(double p, double v, double vmin) {
    if (p == 0) return 0.0;
    if (vmin == 0) return v == 0 ? p : 0.0;
    return v == v ? p * (vmin / v) : 0.0;
}

// Block-wide reduction (fixed tree, deterministic) of K values per thread, minimum or sum;
// every thread gets the results in v. sh: K * SOFT_THREADS shared doubles.
template <int K, bool MIN>
__device__ __forceinline__ void block_reduce(double* v, double* sh) {
    const int t = threadIdx.x;
    for (int k = 0; k < K; ++k) sh[k * SOFT_THREADS + t] = v[k];
    __syncthreads();
    for (int h = SOFT_THREADS / 2; h > 0; h >>= 1) {
        if (t < h)
            for (int k = 0; k < K; ++k) {
                double& a = sh[k * SOFT_THREADS + t];
                const double b = sh[k * SOFT_THREADS + t + h];
                a = MIN ? (b < a ? b : a) : a + b;
            }
        __syncthreads();
    }
    for (int k = 0; k < K; ++k) v[k] = sh[k * SOFT_THREADS];
    __syncthreads();
}

// Softer-NMS (Soft-NMS with variance voting): as soft_nms_seg, and the selected box M's
// coordinates become, per coordinate k, the mean of M (weight 1) and of the live boxes i with
// IoU(M, i) > 0 (weight p_i = exp(-(1 - IoU)^2 / sigma_t)), weighted by p / var[., k]; a
// coordinate for which no voter has a finite variance stays. var: variances in rank order;
// out_box: the voted boxes, in selection order as out_rank; viou: scratch (IoU with M per rank).
template <typename T>
__global__ void __launch_bounds__(SOFT_THREADS)
softer_nms_seg(const T* __restrict__ boxes, const T* __restrict__ var,
               const i64* __restrict__ rstart, const i64* __restrict__ orig,
               double* __restrict__ cur, double* __restrict__ viou,
               unsigned char* __restrict__ alive, double sigma_t, int method, double sigma,
               double thr, double score_thr, i64* __restrict__ out_rank,
               double* __restrict__ out_score, T* __restrict__ out_box, i64* __restrict__ count) {
    typedef typename acc<T>::type A;
    __shared__ double bs[SOFT_THREADS], red[8 * SOFT_THREADS];
    __shared__ i64 bo[SOFT_THREADS], br[SOFT_THREADS];
    const i64 r0 = rstart[blockIdx.x], r1 = rstart[blockIdx.x + 1];
    const int t = threadIdx.x;
    for (i64 r = r0 + t; r < r1; r += SOFT_THREADS) alive[r] = cur[r] >= score_thr;
    __syncthreads();
    i64 n = 0;
    while (true) {
        double bsc;
        const i64 b = seg_argmax(r0, r1, orig, cur, alive, bs, bo, br, &bsc);
        if (b < 0) break;
        double p[4], mv[4], vmin[4], acc8[8];
        load_box(boxes, b, p);
        load_box(var, b, mv);
        const double pa = box_area(p);
        // the voters (their IoU with M in viou) and the smallest variance of each coordinate
        const double inf = infinity();
        for (int k = 0; k < 4; ++k) vmin[k] = mv[k] < inf ? mv[k] : inf;
        for (i64 j = r0 + t; j < r1; j += SOFT_THREADS) {
            double iou = 0;
            if (j != b && alive[j]) {
                double q[4];
                load_box(boxes, j, q);
                iou = box_iou(p, pa, q, box_area(q));
                if (iou > 0 && exp(-(1.0 - iou) * (1.0 - iou) / sigma_t) > 0)
                    for (int k = 0; k < 4; ++k) {
                        const double v = (double)load(var + 4 * j + k);
                        if (v < vmin[k]) vmin[k] = v;
                    }
            }
            viou[j] = iou;
        }
        block_reduce<4, true>(vmin, red);
        // the weighted sums (M's own term from thread 0; -0.0, the exact identity of the sum,
        // elsewhere: a box without voters is itself, bitwise), then the decays
        for (int k = 0; k < 4; ++k) {
            const double w = vote_weight(1.0, mv[k], vmin[k]);
            acc8[k] = t == 0 ? w * p[k] : -0.0;
            acc8[4 + k] = t == 0 ? w : -0.0;
        }
        for (i64 j = r0 + t; j < r1; j += SOFT_THREADS) {
            const double iou = viou[j];
            if (!(iou > 0)) continue;
            const double pj = exp(-(1.0 - iou) * (1.0 - iou) / sigma_t);
            for (int k = 0; k < 4; ++k) {
                const double w = vote_weight(pj, (double)load(var + 4 * j + k), vmin[k]);
                acc8[k] += w * (double)load(boxes + 4 * j + k);
                acc8[4 + k] += w;
            }
            decay(&cur[j], &alive[j], iou, method, sigma, thr, false, score_thr);
        }
        block_reduce<8, false>(acc8, red);
        if (t == 0) {
            alive[b] = 0;
            out_rank[r0 + n] = b;
            out_score[r0 + n] = bsc;
            for (int k = 0; k < 4; ++k)
                store(out_box + 4 * (r0 + n) + k,
                      vmin[k] < inf ? (A)(acc8[k] / acc8[4 + k]) : load(boxes + 4 * b + k));
        }
        ++n;
        __syncthreads();
    }
    if (t == 0) count[blockIdx.x] = n;
}

// ------------------------------------------------------------------ IoU-guided NMS

// out[t] = the highest score s (ranked) of kept box t's cluster, the ranks members[lo[t]:hi[t]]
// (rank order, the kept rank first: never empty); NaN is below every number, ties: first rank.
template <typename T>
__global__ void cluster_max(const T* __restrict__ s, const i64* __restrict__ members,
                            const i64* __restrict__ lo, const i64* __restrict__ hi, i64 k,
                            T* __restrict__ out) {
    const i64 stride = (i64)gridDim.x * blockDim.x;
    for (i64 t = blockIdx.x * (i64)blockDim.x + threadIdx.x; t < k; t += stride) {
        i64 b = members[lo[t]];
        double bv = (double)load(s + b);
        for (i64 p = lo[t] + 1; p < hi[t]; ++p) {
            const double v = (double)load(s + members[p]);
            if (v > bv || (bv != bv && v == v)) { b = members[p]; bv = v; }
        }
        out[t] = s[b];
    }
}

// ------------------------------------------------------------------ combined NMS
//
// Fixed-shape batched NMS (nms.py `combined_nms`): combined_flag marks the candidates, the
// launcher compacts and ranks them and runs the greedy kernels above on (image, class) segments,
// combined_gather writes the padded outputs.

// flag[i] = scores[i] > thr (decided in double), or, without a threshold, scores[i] is not NaN.
template <typename T>
__global__ void combined_flag(const T* __restrict__ scores, i64 n, int use_thr, double thr,
                              unsigned char* __restrict__ flag) {
    const i64 stride = (i64)gridDim.x * blockDim.x;
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += stride) {
        const double v = (double)load(scores + i);
        flag[i] = use_thr ? v > thr : v == v;
    }
}

// Output slot t of image b (one thread each): while t < count[b], detection t of the image,
// the candidate of flat index g = sel[first[b] + t] = b * N * C + n * C + c into scores (its box
// from boxes (B, N, C, 4) when `specific`, else (B, N, 4)); after that, padding (zeros, index -1).
template <typename T>
__global__ void combined_gather(const T* __restrict__ boxes, const T* __restrict__ scores,
                                const i64* __restrict__ sel, const i64* __restrict__ first,
                                const i64* __restrict__ count, i64 B, i64 N, i64 C, i64 K,
                                int specific, T* __restrict__ out_boxes,
                                T* __restrict__ out_scores, i64* __restrict__ out_classes,
                                i64* __restrict__ out_index) {
    typedef typename acc<T>::type A;
    const i64 stride = (i64)gridDim.x * blockDim.x;
    for (i64 o = blockIdx.x * (i64)blockDim.x + threadIdx.x; o < B * K; o += stride) {
        const i64 b = o / K, t = o - b * K;
        if (t < count[b]) {
            const i64 g = sel[first[b] + t], f = g - b * N * C, n = f / C;
            const T* src = boxes + 4 * (specific ? g : b * N + n);
            for (int k = 0; k < 4; ++k) out_boxes[4 * o + k] = src[k];
            out_scores[o] = scores[g];
            out_classes[o] = f - n * C;
            out_index[o] = n;
        } else {
            for (int k = 0; k < 4; ++k) store(out_boxes + 4 * o + k, (A)0);
            store(out_scores + o, (A)0);
            out_classes[o] = 0;
            out_index[o] = -1;
        }
    }
}

}  // namespace nms
}  // namespace fastnorm
