// RoIAlign (avg/max, rotated), PS-RoIAlign, deformable RoI pooling and RoIPool on CUDA.
//
// Forward (torchvision / mmcv semantics, see fastnorm/roi_ops.py): one block per (RoI, block of
// output channels) computes the RoI's geometry and its samples' bilinear corners and weights once
// in shared memory, and its threads sum their outputs' bins from them (align_fwd); NCHW or NHWC.
// Backward:
//  * default: one thread per grad_out element, atomics into an accumulation buffer of type
//    acc<T> (float for float/half types, double for double) that the launcher casts to T;
//  * deterministic (RoIAlign, all kinds): records of the samples sorted by the pixel they land
//    on, then one block per tile of grad_x sums its pixels' records in a fixed order (see
//    "deterministic backward" below): no atomics, bitwise reproducible;
//  * deterministic RoIPool: one record per (RoI, channel, bin), keyed by its argmax pixel, sorted;
//    one thread per grad_x element sums its records in slot order (see "RoIPool deterministic
//    backward" below);
//  * deterministic, when those records would exceed the launcher's workspace limit: one thread
//    per (image, channel, block of RB rows) owns those rows of grad_x and visits the RoIs of its
//    image in index order (order/seg), adding only the corners (argmaxes) that fall into its
//    rows: no atomics, bitwise reproducible; every thread scans its image's RoIs.
// The grad_offset / grad_mask of deformable pooling are always one thread per (RoI, bin).
// Rotated RoIAlign (KIND_ROTATED, detectron2) is RoIAlign whose samples are placed by a rotation
// about the RoI's centre; its deterministic backward bounds a bin's rows by the bin's rotated
// rectangle's bounding box.
#include "common.cuh"

namespace fastnorm {
namespace roi_ops {

// the kernel family (KIND_* in roi_ops.py) and RoIAlign's reduction (fastnorm._kernels.ROI_MODES)
enum { KIND_ALIGN = 0, KIND_PS = 1, KIND_DEFORM = 2, KIND_ROTATED = 3 };
enum { MODE_AVG = 0, MODE_MAX = 1 };

// gh x gw samples per bin: each up to 2 L + 64, so their product needs 64 bits. Rotated RoIs
// (rot): ys, xs are the local frame's start (-rh/2, -rw/2), rotated by (cs, sn) about (cy, cx).
template <typename A> struct Geo {
    A ys, xs, bh, bw, rh, rw;
    i64 gh, gw;
    i64 n;
    bool rot;
    A cy, cx, cs, sn;
};

__device__ __forceinline__ i64 grid_of(double size, int P, int sr, i64 L) {
    double g = sr > 0 ? double(sr) : ceil(size / P);
    if (!(g >= 0)) return 0;
    if (g > double(2 * L + 64)) return 2 * L + 64;
    return (i64)g;
}

// false for a non-finite RoI or an empty sample grid
template <typename T, typename A>
__device__ bool roi_geom(const T* roi, double scale, double off, bool clamp1, int PH, int PW,
                         int sr, i64 H, i64 W, Geo<A>& g) {
    A r[5];
    for (int i = 0; i < 5; ++i) r[i] = load(roi + i);
    for (int i = 1; i < 5; ++i)
        if (!isfinite(double(r[i]))) return false;
    g.n = (i64)r[0];
    g.xs = A(double(r[1]) * scale - off);
    g.ys = A(double(r[2]) * scale - off);
    A xe = A(double(r[3]) * scale - off), ye = A(double(r[4]) * scale - off);
    g.rw = xe - g.xs;
    g.rh = ye - g.ys;
    if (clamp1) {
        g.rw = g.rw > A(1) ? g.rw : A(1);
        g.rh = g.rh > A(1) ? g.rh : A(1);
    }
    g.bh = g.rh / A(PH);
    g.bw = g.rw / A(PW);
    g.gh = grid_of(double(g.rh), PH, sr, H);
    g.gw = grid_of(double(g.rw), PW, sr, W);
    g.rot = false;
    return g.gh > 0 && g.gw > 0;
}

// rotated RoI [n, cx, cy, w, h, angle] (detectron2); false also for a negative size when aligned
// (off > 0). Adaptive grids are capped at 2 max(H, W) + 64 (a bin's axes are not the map's).
template <typename T, typename A>
__device__ bool rot_geom(const T* roi, double scale, double off, bool clamp1, double ascale,
                         int PH, int PW, int sr, i64 H, i64 W, Geo<A>& g) {
    A r[6];
    for (int i = 0; i < 6; ++i) r[i] = load(roi + i);
    for (int i = 1; i < 6; ++i)
        if (!isfinite(double(r[i]))) return false;
    g.n = (i64)r[0];
    g.cx = A(double(r[1]) * scale - off);
    g.cy = A(double(r[2]) * scale - off);
    g.rw = A(double(r[3]) * scale);
    g.rh = A(double(r[4]) * scale);
    if (clamp1) {
        g.rw = g.rw > A(1) ? g.rw : A(1);
        g.rh = g.rh > A(1) ? g.rh : A(1);
    } else if (g.rw < A(0) || g.rh < A(0)) {
        return false;
    }
    const double t = double(r[5]) * ascale;
    g.cs = A(cos(t));
    g.sn = A(sin(t));
    g.ys = -g.rh / A(2);
    g.xs = -g.rw / A(2);
    g.bh = g.rh / A(PH);
    g.bw = g.rw / A(PW);
    const i64 L = H > W ? H : W;
    g.gh = grid_of(double(g.rh), PH, sr, L);
    g.gw = grid_of(double(g.rw), PW, sr, L);
    g.rot = true;
    return g.gh > 0 && g.gw > 0;
}

struct Params {
    i64 K, N, C, CO, H, W;
    int PH, PW, sr, kind, mode, aligned, has_offset, has_mask;
    double scale, gamma, angle_scale;   // angle_scale: radians per unit of a rotated RoI's angle
};
// kernels take the parameters as scalars (launcher: roi_ops.py `_params`)
#define PARAM_ARGS i64 K, i64 N, i64 C, i64 CO, i64 H, i64 W, int PH, int PW, int sr, int kind, \
    int mode, int aligned, int has_offset, int has_mask, double scale, double gamma, \
    double angle_scale
#define PARAM_INIT const Params p{K, N, C, CO, H, W, PH, PW, sr, kind, mode, aligned, has_offset, \
    has_mask, scale, gamma, angle_scale}
#define NEG_FLT_MAX (-3.402823466e+38f)

// geometry of RoI k (per RoI: the forward computes it once per block)
template <typename T, typename A>
__device__ bool roi_geometry(const T* rois, const Params& p, i64 k, Geo<A>& g) {
    const bool al = (p.kind != KIND_ALIGN && p.kind != KIND_ROTATED) || p.aligned;
    if (p.kind == KIND_ROTATED)
        return rot_geom<T, A>(rois + 6 * k, p.scale, al ? 0.5 : 0.0, !al, p.angle_scale, p.PH,
                              p.PW, p.sr, p.H, p.W, g);
    return roi_geom<T, A>(rois + 5 * k, p.scale, al ? 0.5 : 0.0, !al, p.PH, p.PW, p.sr, p.H, p.W,
                          g);
}

// per-bin shift (sy, sx) of bin (ph, pw) of RoI k: the deformable offset, else 0
template <typename T, typename A>
__device__ __forceinline__ void bin_shift(const T* offset, const Params& p, const Geo<A>& g,
                                          i64 k, int ph, int pw, A& sy, A& sx) {
    sy = A(0);
    sx = A(0);
    if (p.kind == KIND_DEFORM && p.has_offset) {
        const i64 nb = (i64)p.PH * p.PW, b = (i64)ph * p.PW + pw;
        sx = A(p.gamma) * g.rw * load(offset + (2 * k) * nb + b);
        sy = A(p.gamma) * g.rh * load(offset + (2 * k + 1) * nb + b);
    }
}

// geometry + per-bin shift (deformable) for RoI k, bin (ph, pw)
template <typename T, typename A>
__device__ bool bin_geom(const T* rois, const T* offset, const Params& p, i64 k, int ph, int pw,
                         Geo<A>& g, A& sy, A& sx) {
    if (!roi_geometry<T, A>(rois, p, k, g)) return false;
    bin_shift<T, A>(offset, p, g, k, ph, pw, sy, sx);
    return true;
}

// sample (iy, ix) of bin (ph, pw); samples are visited row-major, s = iy * gw + ix
template <typename A>
__device__ __forceinline__ A sample_y(const Geo<A>& g, int ph, A sy, i64 iy) {
    return g.ys + sy + A(ph) * g.bh + (A(iy) + A(0.5)) * g.bh / A(g.gh);
}
template <typename A>
__device__ __forceinline__ A sample_x(const Geo<A>& g, int pw, A sx, i64 ix) {
    return g.xs + sx + A(pw) * g.bw + (A(ix) + A(0.5)) * g.bw / A(g.gw);
}
// the map position of a sample at local (yy, xx) (rotated RoIs), or (yy, xx) itself
template <typename A>
__device__ __forceinline__ void place(const Geo<A>& g, A yy, A xx, A& y, A& x) {
    if (g.rot) {
        y = yy * g.cs - xx * g.sn + g.cy;
        x = yy * g.sn + xx * g.cs + g.cx;
    } else {
        y = yy;
        x = xx;
    }
}

// average (mode 0) or max (mode 1, *arg = argmax sample, first on ties) over a bin's samples,
// pixel o of the plane at plane[o * ps] (ps: 1, or C for a channels-last map); the sum goes row
// by row (a float sum of more than 2**24 samples would stall)
template <typename T, typename A>
__device__ A bin_value(const T* plane, i64 ps, const Geo<A>& g, int ph, int pw, A sy, A sx, i64 H,
                       i64 W, int mode, i64* arg) {
    A acc = A(0), best = A(0);
    i64 a = 0, s = 0;
    for (i64 iy = 0; iy < g.gh; ++iy) {
        const A yy = sample_y(g, ph, sy, iy);
        A row = A(0);
        for (i64 ix = 0; ix < g.gw; ++ix, ++s) {
            A wt[4], y, x;
            i64 o[4];
            A v = A(0);
            place(g, yy, sample_x(g, pw, sx, ix), y, x);
            if (roi_bilinear(y, x, H, W, o, wt))
                v = wt[0] * load(plane + o[0] * ps) + wt[1] * load(plane + o[1] * ps) +
                    wt[2] * load(plane + o[2] * ps) + wt[3] * load(plane + o[3] * ps);
            row += v;
            if (s == 0 || v > best) { best = v; a = s; }
        }
        acc += row;
    }
    if (arg) *arg = a;
    return mode == MODE_MAX ? best : acc / A(g.gh * g.gw);
}

// a bound on the rows bin (ph, pw)'s samples read: [lo, hi] (the bounding box of its rotated
// rectangle for rotated RoIs), widened by 2 for the bilinear corners and rounding
template <typename A>
__device__ void bin_rows(const Geo<A>& g, int ph, int pw, A sy, A& lo, A& hi) {
    const A ya = g.ys + sy + A(ph) * g.bh, yb = ya + g.bh;
    lo = ya < yb ? ya : yb;
    hi = ya < yb ? yb : ya;
    if (g.rot) {
        const A xa = g.xs + A(pw) * g.bw, xb = xa + g.bw;
        A y, x;
        place(g, ya, xa, y, x);
        lo = hi = y;
        const A cy[3] = {ya, yb, yb}, cx[3] = {xb, xa, xb};
        for (int c = 0; c < 3; ++c) {
            place(g, cy[c], cx[c], y, x);
            lo = y < lo ? y : lo;
            hi = y > hi ? y : hi;
        }
    }
    lo = lo - A(2);
    hi = hi + A(2);
}

// input channel read by output channel co at bin (ph, pw)
__device__ __forceinline__ i64 in_channel(const Params& p, i64 co, int ph, int pw) {
    return p.kind == KIND_PS ? (co * p.PH + ph) * p.PW + pw : co;
}

// ------------------------------------------------------------------ RoIAlign forward
// All kinds (plain avg/max, PS, deformable, rotated). One block per unit (RoI, block of `cb`
// output channels), grid-stride over the units: thread 0 computes the RoI's geometry
// (roi_geometry) into shared memory; when the RoI's PH x PW x gh x gw samples fit the table
// (FWD_TABLE_BYTES), the block computes every sample's bilinear corners (offsets in x, already
// multiplied by the pixel stride) and weights once into shared memory and each thread sums its
// outputs' bins from it; otherwise each thread walks its bins' samples from the shared geometry.
// Layouts: NCHW, or NHWC (channels_last: x (N, H, W, C), out (K, PH, PW, CO)). `level` >= 0
// (multi-scale RoIAlign: one launch per level, no gather, scatter or read-back): a unit whose
// RoI k has lev[k] != level is skipped, whole blocks at once, except that the level-0 launch
// writes zeros for the RoIs of level nlev (pooled nowhere, fpn_levels). Index arithmetic in
// I: int when every index of x and out fits (idx32, chosen by the launcher), else 64 bits.
// Per output, the values computed and the order of the sums are those of the one-thread-per-
// output kernel align_fwd_thread (kept as the reference): bitwise identical results where every
// operation rounds on its own (the emulator); on a GPU, NVRTC's FMA contraction can differ
// between the two by a rounding (seen: 2 ulp of a float64 output on an H100).
#define FWD_THREADS 256
#define FWD_TABLE_BYTES 16384

template <typename T, typename A, typename I>
__device__ void align_fwd_units(const T* __restrict__ x, const T* __restrict__ rois,
                                const T* __restrict__ offset, const T* __restrict__ mask,
                                const i64* __restrict__ lev, T* __restrict__ out, int level,
                                int nlev, bool cl, I cb, const Params& p, Geo<A>& sg,
                                int& sok, unsigned char* tab) {
    // the table: cap entries of 4 weights, then cap entries of 4 offsets (-1 first: off the map)
    const int cap = FWD_TABLE_BYTES / (4 * int(sizeof(A) + sizeof(I)));
    A* const tw = reinterpret_cast<A*>(tab);
    I* const to = reinterpret_cast<I*>(tab + 4 * sizeof(A) * cap);
    const int PW = p.PW;
    const I nb = I(p.PH) * PW, HW = I(p.H) * I(p.W), C = I(p.C), CO = I(p.CO);
    const I ps = cl ? C : I(1), chs = cl ? I(1) : HW;     // pixel and channel strides of x
    const I nchunk = (CO + cb - 1) / cb, units = I(p.K) * nchunk;
    for (i64 uu = blockIdx.x; uu < units; uu += gridDim.x) {   // (u + gridDim.x may pass 2**31)
        const I u = I(uu), c0 = (u % nchunk) * cb, nc = CO - c0 < cb ? CO - c0 : cb;
        const I k = u / nchunk;
        const bool mine = level < 0 || lev[k] == level;
        if (!mine && !(level == 0 && lev[k] == nlev)) continue;   // (the whole block)
        if (threadIdx.x == 0) sok = mine && roi_geometry<T, A>(rois, p, k, sg);
        __syncthreads();
        const bool ok = sok;
        Geo<A> g;
        if (ok) g = sg;
        // gh, gw <= cap first: their product (up to (2 L + 64)^2) cannot overflow
        const bool table = ok && g.gh <= cap && g.gw <= cap && g.gh * g.gw * nb <= cap;
        const I ns = table ? I(g.gh * g.gw) : I(0);
        if (table) {
            for (I e = threadIdx.x; e < nb * ns; e += blockDim.x) {
                const I b = e / ns, q = e % ns;
                const int ph = int(b / PW), pw = int(b % PW);
                A sy, sx, wt[4], y, xx;
                i64 o[4];
                bin_shift<T, A>(offset, p, g, k, ph, pw, sy, sx);
                const A yy = sample_y(g, ph, sy, (i64)(q / I(g.gw)));
                place(g, yy, sample_x(g, pw, sx, (i64)(q % I(g.gw))), y, xx);
                const bool inside = roi_bilinear(y, xx, p.H, p.W, o, wt);
                for (int c = 0; c < 4; ++c) {
                    tw[4 * e + c] = wt[c];
                    to[4 * e + c] = I(o[c]) * ps;
                }
                if (!inside) to[4 * e] = I(-1);
            }
            __syncthreads();
        }
        for (I j = threadIdx.x; j < nc * nb; j += blockDim.x) {
            // NHWC: channels fastest (a warp reads consecutive channels of one pixel)
            const I c = c0 + (cl ? j % nc : j / nb), b = cl ? j / nc : j % nb;
            const int ph = int(b / PW), pw = int(b % PW);
            A v = A(0);
            if (ok) {
                const I cin = p.kind == KIND_PS ? (c * p.PH + ph) * PW + pw : c;
                const T* src = x + I(g.n) * C * HW + cin * chs;
                if (table) {
                    const A* w = tw + 4 * b * ns;
                    const I* o = to + 4 * b * ns;
                    A acc = A(0), best = A(0);
                    I s = 0;
                    for (i64 iy = 0; iy < g.gh; ++iy) {
                        A row = A(0);
                        for (i64 ix = 0; ix < g.gw; ++ix, ++s, w += 4, o += 4) {
                            A vs = A(0);
                            if (o[0] >= 0)
                                vs = w[0] * load(src + o[0]) + w[1] * load(src + o[1]) +
                                     w[2] * load(src + o[2]) + w[3] * load(src + o[3]);
                            row += vs;
                            if (s == 0 || vs > best) best = vs;
                        }
                        acc += row;
                    }
                    v = p.mode == MODE_MAX ? best : acc / A(g.gh * g.gw);
                } else {
                    A sy, sx;
                    bin_shift<T, A>(offset, p, g, k, ph, pw, sy, sx);
                    v = bin_value<T, A>(src, ps, g, ph, pw, sy, sx, p.H, p.W, p.mode, nullptr);
                }
                if (p.kind == KIND_DEFORM && p.has_mask) v *= load(mask + k * nb + b);
            }
            store(out + (cl ? (k * nb + b) * CO + c : (k * CO + c) * nb + b), v);
        }
        __syncthreads();          // the next unit overwrites the geometry and the table
    }
}

template <typename T>
__global__ void __launch_bounds__(FWD_THREADS)
align_fwd(const T* __restrict__ x, const T* __restrict__ rois, const T* __restrict__ offset,
          const T* __restrict__ mask, const i64* __restrict__ lev, T* __restrict__ out,
          int level, int nlev, int channels_last, int cb, int idx32, PARAM_ARGS) {
    PARAM_INIT;
    typedef typename acc<T>::type A;
    __shared__ Geo<A> sg;
    __shared__ int sok;
    __shared__ double tab[FWD_TABLE_BYTES / sizeof(double)];     // (8-byte aligned)
    if (idx32)
        align_fwd_units<T, A, int>(x, rois, offset, mask, lev, out, level, nlev,
                                   channels_last != 0, cb, p, sg, sok,
                                   reinterpret_cast<unsigned char*>(tab));
    else
        align_fwd_units<T, A, i64>(x, rois, offset, mask, lev, out, level, nlev,
                                   channels_last != 0, (i64)cb, p, sg, sok,
                                   reinterpret_cast<unsigned char*>(tab));
}

// The previous forward, one thread per output element recomputing its RoI's geometry: the
// reference of align_fwd (tests; bitwise on the emulator), NCHW only.
template <typename T>
__global__ void align_fwd_thread(const T* __restrict__ x, const T* __restrict__ rois,
                                 const T* __restrict__ offset, const T* __restrict__ mask,
                                 T* __restrict__ out, PARAM_ARGS) {
    PARAM_INIT;
    typedef typename acc<T>::type A;
    const i64 total = p.K * p.CO * p.PH * p.PW;
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < total;
         i += (i64)blockDim.x * gridDim.x) {
        const int pw = int(i % p.PW), ph = int((i / p.PW) % p.PH);
        const i64 co = (i / ((i64)p.PW * p.PH)) % p.CO, k = i / ((i64)p.PW * p.PH * p.CO);
        Geo<A> g;
        A sy, sx, v = A(0);
        if (bin_geom<T, A>(rois, offset, p, k, ph, pw, g, sy, sx)) {
            const T* plane = x + (g.n * p.C + in_channel(p, co, ph, pw)) * p.H * p.W;
            v = bin_value<T, A>(plane, 1, g, ph, pw, sy, sx, p.H, p.W, p.mode, nullptr);
            if (p.kind == KIND_DEFORM && p.has_mask)
                v *= load(mask + k * p.PH * p.PW + (i64)ph * p.PW + pw);
        }
        store(out + i, v);
    }
}

// Visit the samples of bin (ph, pw) that its gradient flows to, in order: visit(inside, o, wt)
// with the sample's bilinear corners (roi_bilinear; inside false: off the map, o and wt 0);
// avg mode: all gh x gw samples row-major, max mode: only the argmax sample.
template <typename T, typename A, typename F>
__device__ void bin_samples(const T* xplane, const Geo<A>& g, int ph, int pw, A sy, A sx, i64 H,
                            i64 W, int mode, F visit) {
    i64 y0 = 0, y1 = g.gh, x0 = 0, x1 = g.gw;      // the samples [y0, y1) x [x0, x1)
    if (mode == MODE_MAX) {
        i64 arg;
        bin_value<T, A>(xplane, 1, g, ph, pw, sy, sx, H, W, MODE_MAX, &arg);
        y0 = arg / g.gw;
        x0 = arg % g.gw;
        y1 = y0 + 1;
        x1 = x0 + 1;
    }
    for (i64 iy = y0; iy < y1; ++iy) {
        const A yy = sample_y(g, ph, sy, iy);
        for (i64 ix = x0; ix < x1; ++ix) {
            A wt[4], y, x;
            i64 o[4];
            place(g, yy, sample_x(g, pw, sx, ix), y, x);
            const bool inside = roi_bilinear(y, x, H, W, o, wt);
            visit(inside, o, wt);
        }
    }
}

// Scatter one bin's gradient gv to its bilinear corners through add(offset_in_plane, value);
// max mode: only the argmax sample's corners.
template <typename T, typename A, typename F>
__device__ void bin_scatter(const T* xplane, const Geo<A>& g, int ph, int pw, A sy, A sx, i64 H,
                            i64 W, int mode, A gv, F add) {
    if (mode != MODE_MAX) gv = gv / A(g.gh * g.gw);
    bin_samples<T, A>(xplane, g, ph, pw, sy, sx, H, W, mode,
                      [&](bool inside, const i64* o, const A* wt) {
                          if (inside)
                              for (int c = 0; c < 4; ++c) add(o[c], gv * wt[c]);
                      });
}

// The atomic backward: one thread per output (RoI, channel, bin) scatters its gradient.
// `level` >= 0 (multi-scale RoIAlign: one launch per level's map): only the RoIs k with
// lev[k] == level (fpn_levels).
template <typename T>
__global__ void align_bwd(const T* __restrict__ dy, const T* __restrict__ x,
                          const T* __restrict__ rois, const T* __restrict__ offset,
                          const T* __restrict__ mask, typename acc<T>::type* __restrict__ gx,
                          const i64* __restrict__ lev, int level, PARAM_ARGS) {
    PARAM_INIT;
    typedef typename acc<T>::type A;
    const i64 total = p.K * p.CO * p.PH * p.PW;
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < total;
         i += (i64)blockDim.x * gridDim.x) {
        const int pw = int(i % p.PW), ph = int((i / p.PW) % p.PH);
        const i64 co = (i / ((i64)p.PW * p.PH)) % p.CO, k = i / ((i64)p.PW * p.PH * p.CO);
        if (level >= 0 && lev[k] != level) continue;      // multi-scale: another level's RoI
        Geo<A> g;
        A sy, sx;
        if (!bin_geom<T, A>(rois, offset, p, k, ph, pw, g, sy, sx)) continue;
        A gv = load(dy + i);
        if (p.kind == KIND_DEFORM && p.has_mask)
            gv *= load(mask + k * p.PH * p.PW + (i64)ph * p.PW + pw);
        const i64 base = (g.n * p.C + in_channel(p, co, ph, pw)) * p.H * p.W;
        A* gp = gx + base;
        bin_scatter<T, A>(x + base, g, ph, pw, sy, sx, p.H, p.W, p.mode, gv,
                          [&](i64 o, A v) { atomic_add(gp + o, v); });
    }
}

// deterministic: thread = (image n, input channel ci, rows [r0, r0 + RB))
template <typename T>
__global__ void align_bwd_det(const T* __restrict__ dy, const T* __restrict__ x,
                              const T* __restrict__ rois, const T* __restrict__ offset,
                              const T* __restrict__ mask, const i64* __restrict__ order,
                              const i64* __restrict__ seg, typename acc<T>::type* __restrict__ gx,
                              int RB, PARAM_ARGS) {
    PARAM_INIT;
    typedef typename acc<T>::type A;
    const i64 nrb = (p.H + RB - 1) / RB, total = p.N * p.C * nrb;
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < total;
         i += (i64)blockDim.x * gridDim.x) {
        const i64 rb = i % nrb, ci = (i / nrb) % p.C, n = i / (nrb * p.C);
        const i64 r0 = rb * RB, r1 = min(r0 + RB, p.H);
        const i64 base = (n * p.C + ci) * p.H * p.W;
        A* gp = gx + base;
        const i64 nb = (i64)p.PH * p.PW;
        // bins that read channel ci
        i64 co = ci;
        int b0 = 0, b1 = (int)nb;
        if (p.kind == KIND_PS) {
            co = ci / nb;
            b0 = int(ci % nb);
            b1 = b0 + 1;
            if (co >= p.CO) continue;
        }
        auto add = [&](i64 o, A v) {
            const i64 r = o / p.W;
            if (r >= r0 && r < r1) gp[o] += v;
        };
        for (i64 j = seg[n]; j < seg[n + 1]; ++j) {
            const i64 k = order[j];
            for (int b = b0; b < b1; ++b) {
                const int ph = b / p.PW, pw = b % p.PW;
                Geo<A> g;
                A sy, sx;
                if (!bin_geom<T, A>(rois, offset, p, k, ph, pw, g, sy, sx)) break;
                // rows this bin can touch: [y_first - 1, y_last + 1]
                A lo, hi;
                bin_rows(g, ph, pw, sy, lo, hi);
                if (!(hi >= A(r0) - A(1)) || !(lo <= A(r1))) continue;
                A gv = load(dy + ((k * p.CO + co) * nb + b));
                if (p.kind == KIND_DEFORM && p.has_mask) gv *= load(mask + k * nb + b);
                bin_scatter<T, A>(x + base, g, ph, pw, sy, sx, p.H, p.W, p.mode, gv, add);
            }
        }
    }
}

// ------------------------------------------------- deterministic backward (records and tiles)
// grad_x as a gather: every sample the gradient flows to becomes a record in a slot fixed by its
// (RoI, bin, sample) index, holding its anchor (top-left bilinear corner, as a (plane, pixel)
// key), the grad_out row it reads and its 4 corner weights. Sorting the records by (anchor, slot)
// lists, for every pixel, the samples anchored there in slot order; a pixel's corners come from
// the samples anchored at it and at its left, upper and upper-left neighbours (roi_bilinear: the
// other corners are +1 row / column, or the same one at the last). One block per tile of grad_x
// (pixels x channels) sums those four lists in that fixed order, channel per lane: no atomics,
// the same bits on every run, each grad_x element written once.
//
// Records are keyed per "plane": shared by all channels of an image (avg), by the channels that
// read one bin (PS: channel ci reads bin ci % (PH PW)), or per channel (max: the argmax sample
// depends on the channel). det_plane(p, p.N, 0) is the number of planes.
__device__ __forceinline__ i64 det_plane(const Params& p, i64 n, i64 ci) {
    const i64 nb = (i64)p.PH * p.PW;
    if (p.mode == MODE_MAX) return n * p.C + ci;
    if (p.kind == KIND_PS) return n * nb + ci % nb;
    return n;
}

// record groups: (RoI, bin) with gh x gw records (avg), (RoI, channel, bin) with one (max)
__device__ __forceinline__ i64 det_groups(const Params& p) {
    return (p.mode == MODE_MAX ? p.K * p.CO : p.K) * p.PH * p.PW;
}

// records per (RoI, bin) group (avg mode, adaptive sampling: the launcher's prefix sum)
template <typename T>
__global__ void align_bwd_count(const T* __restrict__ rois, const T* __restrict__ offset,
                                i64* __restrict__ count, PARAM_ARGS) {
    PARAM_INIT;
    typedef typename acc<T>::type A;
    const i64 nb = (i64)p.PH * p.PW, total = det_groups(p);
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < total;
         i += (i64)blockDim.x * gridDim.x) {
        Geo<A> g;
        A sy, sx;
        const int ph = int(i % nb / p.PW), pw = int(i % nb % p.PW);
        count[i] = bin_geom<T, A>(rois, offset, p, i / nb, ph, pw, g, sy, sx) ? g.gh * g.gw : 0;
    }
}

// Group i's records fill slots [start[i], start[i + 1]) (R = start[groups] in all): key[s] =
// anchor * R + s (unique keys, so the sort's order does not depend on its stability; anchor =
// plane * H * W + pixel, or planes * H * W for a sample off the map or a bin without geometry),
// src[s] = RoI * PH * PW + bin (the row of grad_out as (K, PH PW, CO)), wt[4 s + c] = corner c's
// weight times the bin's factor (1 / samples for avg, times the mask for deformable pooling).
template <typename T>
__global__ void align_bwd_records(const T* __restrict__ x, const T* __restrict__ rois,
                                  const T* __restrict__ offset, const T* __restrict__ mask,
                                  const i64* __restrict__ start, i64* __restrict__ key,
                                  i64* __restrict__ src, typename acc<T>::type* __restrict__ wt,
                                  PARAM_ARGS) {
    PARAM_INIT;
    typedef typename acc<T>::type A;
    const i64 nb = (i64)p.PH * p.PW, total = det_groups(p), HW = p.H * p.W;
    const i64 R = start[total], none = det_plane(p, p.N, 0) * HW;
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < total;
         i += (i64)blockDim.x * gridDim.x) {
        const i64 b = i % nb, k = i / nb / (p.mode == MODE_MAX ? p.CO : 1);
        const i64 co = p.mode == MODE_MAX ? i / nb % p.CO : 0;
        const int ph = int(b / p.PW), pw = int(b % p.PW);
        i64 s = start[i];
        Geo<A> g;
        A sy, sx;
        if (bin_geom<T, A>(rois, offset, p, k, ph, pw, g, sy, sx)) {
            const i64 ci = in_channel(p, co, ph, pw), plane = det_plane(p, g.n, ci);
            A f = p.mode == MODE_MAX ? A(1) : A(1) / A(g.gh * g.gw);
            if (p.kind == KIND_DEFORM && p.has_mask) f *= load(mask + k * nb + b);
            bin_samples<T, A>(x + (g.n * p.C + ci) * HW, g, ph, pw, sy, sx, p.H, p.W, p.mode,
                              [&](bool inside, const i64* o, const A* w) {
                                  key[s] = (inside ? plane * HW + o[0] : none) * R + s;
                                  src[s] = k * nb + b;
                                  for (int c = 0; c < 4; ++c) wt[4 * s + c] = w[c] * f;
                                  ++s;
                              });
        }
        for (; s < start[i + 1]; ++s) {       // a bin without geometry: its slots stay empty
            key[s] = none * R + s;
            src[s] = 0;
            for (int c = 0; c < 4; ++c) wt[4 * s + c] = A(0);
        }
    }
}

// the tile: blockDim.x channel lanes x TILE_PIXELS * blockDim.y pixels of one plane of grad_x
enum { TILE_THREADS = 256, TILE_PIXELS = 4 };

// channel groups of blockDim.x lanes per image; PS groups hold the channels of one bin, so that
// a group's lanes share their records
__device__ __forceinline__ i64 tile_groups(const Params& p, int TC) {
    return p.kind == KIND_PS ? (i64)p.PH * p.PW * ((p.CO + TC - 1) / TC) : (p.C + TC - 1) / TC;
}

// lane of channel group cg: grad_x channel ci, grad_out channel co (false: past the last)
__device__ __forceinline__ bool tile_channel(const Params& p, i64 cg, int lane, int TC, i64& ci,
                                             i64& co) {
    if (p.kind == KIND_PS) {
        const i64 nb = (i64)p.PH * p.PW;
        co = cg / nb * TC + lane;
        ci = co * nb + cg % nb;
        return co < p.CO;
    }
    ci = co = cg * TC + lane;
    return ci < p.C;
}

// One block per tile (grid-stride over n, channel group, pixel range): thread (lane, y) sums
// TILE_PIXELS pixels of channel lane from the sorted records (perm: slots by key; bounds[a]:
// the first sorted record of anchor a); dyt: grad_out as (K, PH PW, CO), so the lanes of a
// record read adjacent values. The tile leaves through shared memory, pixel-contiguous.
template <typename T>
__global__ void align_bwd_tile(const T* __restrict__ dyt, const i64* __restrict__ perm,
                               const i64* __restrict__ bounds, const i64* __restrict__ src,
                               const typename acc<T>::type* __restrict__ wt, T* __restrict__ gx,
                               PARAM_ARGS) {
    PARAM_INIT;
    typedef typename acc<T>::type A;
    __shared__ A tile[TILE_THREADS * TILE_PIXELS + 32];     // [lane][pixel], rows padded by 1
    const int TC = blockDim.x, TP = TILE_PIXELS * blockDim.y, lane = threadIdx.x;
    const int tid = threadIdx.y * TC + lane, nt = TC * blockDim.y;
    const i64 HW = p.H * p.W, npt = (HW + TP - 1) / TP, CG = tile_groups(p, TC);
    const i64 tiles = p.N * CG * npt;
    for (i64 t = blockIdx.x; t < tiles; t += gridDim.x) {
        const i64 p0 = t % npt * TP, cg = t / npt % CG, n = t / npt / CG;
        i64 ci, co;
        const bool ok = tile_channel(p, cg, lane, TC, ci, co);
        const i64 plane = ok ? det_plane(p, n, ci) : 0;
        for (int j = threadIdx.y; j < TP; j += blockDim.y) {
            const i64 pix = p0 + j, r = pix / p.W, c = pix % p.W;
            A v = A(0);
            if (ok && pix < HW) {
                // anchors up-left, up, left, here; a sample's corners in roi_bilinear's order
                for (i64 ay = r - 1; ay <= r; ++ay)
                    for (i64 ax = c - 1; ax <= c; ++ax) {
                        if (ay < 0 || ax < 0) continue;
                        const i64 y1 = ay < p.H - 1 ? ay + 1 : ay, x1 = ax < p.W - 1 ? ax + 1 : ax;
                        const bool on[4] = {ay == r && ax == c, ay == r && x1 == c,
                                            y1 == r && ax == c, y1 == r && x1 == c};
                        const i64 a = plane * HW + ay * p.W + ax;
                        for (i64 q = bounds[a]; q < bounds[a + 1]; ++q) {
                            const i64 s = perm[q];
                            const A gv = load(dyt + src[s] * p.CO + co);
                            for (int m = 0; m < 4; ++m)
                                if (on[m]) v += gv * wt[4 * s + m];
                        }
                    }
            }
            tile[lane * (TP + 1) + j] = v;
        }
        __syncthreads();
        for (int e = tid; e < TC * TP; e += nt) {
            const int l = e / TP, j = e % TP;
            i64 cl, col;
            if (tile_channel(p, cg, l, TC, cl, col) && p0 + j < HW)
                store(gx + (n * p.C + cl) * HW + p0 + j, tile[l * (TP + 1) + j]);
        }
        __syncthreads();
    }
}

// deformable pooling: grad_offset and grad_mask, one thread per (RoI, bin), exact derivative
// of the computed forward (coordinates that clamp contribute 0)
template <typename A>
__device__ __forceinline__ int axis1(A y, i64 L, i64& i0, i64& i1, A& l) {
    int kind = 2;
    if (!(y >= A(-1) && y <= A(L)) || L <= 0) return 0;
    if (y <= A(0)) { y = A(0); kind = 1; }
    i0 = (i64)y;
    if (i0 >= L - 1) { i0 = i1 = L - 1; y = A(i0); kind = 1; } else i1 = i0 + 1;
    l = y - A(i0);
    return kind;
}

template <typename T>
__global__ void deform_bwd_offmask(const T* __restrict__ dy, const T* __restrict__ x,
                                   const T* __restrict__ rois, const T* __restrict__ offset,
                                   const T* __restrict__ mask, T* __restrict__ goff,
                                   T* __restrict__ gmask, PARAM_ARGS) {
    PARAM_INIT;
    typedef typename acc<T>::type A;
    const i64 nb = (i64)p.PH * p.PW, total = p.K * nb;
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < total;
         i += (i64)blockDim.x * gridDim.x) {
        const i64 k = i / nb, b = i % nb;
        const int ph = int(b / p.PW), pw = int(b % p.PW);
        Geo<A> g;
        A sy, sx, gy = A(0), gxo = A(0), gm = A(0);
        if (bin_geom<T, A>(rois, offset, p, k, ph, pw, g, sy, sx)) {
            const i64 ns = g.gh * g.gw;
            for (i64 c = 0; c < p.C; ++c) {
                const T* plane = x + (g.n * p.C + c) * p.H * p.W;
                const A gv = load(dy + (k * p.C + c) * nb + b);
                A val = A(0), dvy = A(0), dvx = A(0);
                for (i64 iy = 0; iy < g.gh; ++iy) {      // row by row, as in bin_value
                    A ly, rval = A(0), rdy = A(0), rdx = A(0);
                    i64 y0, y1;
                    const int ky = axis1(sample_y(g, ph, sy, iy), p.H, y0, y1, ly);
                    if (!ky) continue;
                    for (i64 ix = 0; ix < g.gw; ++ix) {
                        A lx;
                        i64 x0, x1;
                        const int kx = axis1(sample_x(g, pw, sx, ix), p.W, x0, x1, lx);
                        if (!kx) continue;
                        const A v00 = load(plane + y0 * p.W + x0);
                        const A v01 = load(plane + y0 * p.W + x1);
                        const A v10 = load(plane + y1 * p.W + x0);
                        const A v11 = load(plane + y1 * p.W + x1);
                        const A hy = A(1) - ly, hx = A(1) - lx;
                        rval += hy * (hx * v00 + lx * v01) + ly * (hx * v10 + lx * v11);
                        if (ky == 2) rdy += hx * (v10 - v00) + lx * (v11 - v01);
                        if (kx == 2) rdx += hy * (v01 - v00) + ly * (v11 - v10);
                    }
                    val += rval;
                    dvy += rdy;
                    dvx += rdx;
                }
                gm += gv * val;
                gy += gv * dvy;
                gxo += gv * dvx;
            }
            const A m = p.has_mask ? load(mask + i) : A(1);
            gm /= A(ns);
            gy = m * A(p.gamma) * g.rh * gy / A(ns);
            gxo = m * A(p.gamma) * g.rw * gxo / A(ns);
        }
        if (p.has_mask) store(gmask + i, gm);
        if (p.has_offset) {
            store(goff + (2 * k) * nb + b, gxo);
            store(goff + (2 * k + 1) * nb + b, gy);
        }
    }
}

// ------------------------------------------------------------------ RoIPool (torchvision)

// window [h0, h1) x [w0, w1) of bin (ph, pw); false for a non-finite RoI
template <typename T>
__device__ bool pool_window(const T* roi, double scale, int ph, int pw, int PH, int PW, i64 H,
                            i64 W, i64& n, i64 win[4]) {
    typedef typename acc<T>::type A;
    double v[4];
    for (int i = 0; i < 4; ++i) {
        const double c = double(load(roi + i + 1));
        if (!isfinite(c)) return false;
        v[i] = fmin(fmax(round(c * scale), -1e15), 1e15);
    }
    n = (i64)double(load(roi));
    const i64 xs = (i64)v[0], ys = (i64)v[1], xe = (i64)v[2], ye = (i64)v[3];
    const A bh = A(ye - ys + 1 > 1 ? ye - ys + 1 : 1) / A(PH);
    const A bw = A(xe - xs + 1 > 1 ? xe - xs + 1 : 1) / A(PW);
    win[0] = min(max((i64)floor(A(ph) * bh) + ys, (i64)0), H);
    win[1] = min(max((i64)ceil(A(ph + 1) * bh) + ys, (i64)0), H);
    win[2] = min(max((i64)floor(A(pw) * bw) + xs, (i64)0), W);
    win[3] = min(max((i64)ceil(A(pw + 1) * bw) + xs, (i64)0), W);
    return true;
}

template <typename T>
__device__ i64 pool_argmax(const T* plane, i64 W, const i64 win[4], typename acc<T>::type& best) {
    typedef typename acc<T>::type A;
    const bool empty = win[1] <= win[0] || win[3] <= win[2];
    A m = empty ? A(0) : A(NEG_FLT_MAX);
    i64 arg = -1;
    for (i64 h = win[0]; h < win[1]; ++h)
        for (i64 w = win[2]; w < win[3]; ++w) {
            const A v = load(plane + h * W + w);
            if (v > m) { m = v; arg = h * W + w; }
        }
    best = m;
    return arg;
}

template <typename T>
__global__ void pool_fwd(const T* __restrict__ x, const T* __restrict__ rois, T* __restrict__ out,
                         PARAM_ARGS) {
    PARAM_INIT;
    typedef typename acc<T>::type A;
    const i64 total = p.K * p.C * p.PH * p.PW;
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < total;
         i += (i64)blockDim.x * gridDim.x) {
        const int pw = int(i % p.PW), ph = int((i / p.PW) % p.PH);
        const i64 c = (i / ((i64)p.PW * p.PH)) % p.C, k = i / ((i64)p.PW * p.PH * p.C);
        i64 n, win[4];
        A best = A(0);
        if (pool_window(rois + 5 * k, p.scale, ph, pw, p.PH, p.PW, p.H, p.W, n, win))
            pool_argmax(x + (n * p.C + c) * p.H * p.W, p.W, win, best);
        store(out + i, best);
    }
}

template <typename T>
__global__ void pool_bwd(const T* __restrict__ dy, const T* __restrict__ x,
                         const T* __restrict__ rois, typename acc<T>::type* __restrict__ gx,
                         PARAM_ARGS) {
    PARAM_INIT;
    typedef typename acc<T>::type A;
    const i64 total = p.K * p.C * p.PH * p.PW;
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < total;
         i += (i64)blockDim.x * gridDim.x) {
        const int pw = int(i % p.PW), ph = int((i / p.PW) % p.PH);
        const i64 c = (i / ((i64)p.PW * p.PH)) % p.C, k = i / ((i64)p.PW * p.PH * p.C);
        i64 n, win[4];
        A best;
        if (!pool_window(rois + 5 * k, p.scale, ph, pw, p.PH, p.PW, p.H, p.W, n, win)) continue;
        const i64 base = (n * p.C + c) * p.H * p.W;
        const i64 arg = pool_argmax(x + base, p.W, win, best);
        if (arg >= 0) atomic_add(gx + base + arg, load(dy + i));
    }
}

template <typename T>
__global__ void pool_bwd_det(const T* __restrict__ dy, const T* __restrict__ x,
                             const T* __restrict__ rois, const i64* __restrict__ order,
                             const i64* __restrict__ seg, typename acc<T>::type* __restrict__ gx,
                             int RB, PARAM_ARGS) {
    PARAM_INIT;
    typedef typename acc<T>::type A;
    const i64 nrb = (p.H + RB - 1) / RB, total = p.N * p.C * nrb;
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < total;
         i += (i64)blockDim.x * gridDim.x) {
        const i64 rb = i % nrb, c = (i / nrb) % p.C, n = i / (nrb * p.C);
        const i64 r0 = rb * RB, r1 = min(r0 + RB, p.H), base = (n * p.C + c) * p.H * p.W;
        for (i64 j = seg[n]; j < seg[n + 1]; ++j) {
            const i64 k = order[j];
            for (int ph = 0; ph < p.PH; ++ph)
                for (int pw = 0; pw < p.PW; ++pw) {
                    i64 nn, win[4];
                    A best;
                    if (!pool_window(rois + 5 * k, p.scale, ph, pw, p.PH, p.PW, p.H, p.W, nn, win))
                        continue;
                    if (win[1] <= r0 || win[0] >= r1) continue;
                    const i64 arg = pool_argmax(x + base, p.W, win, best);
                    if (arg >= 0 && arg / p.W >= r0 && arg / p.W < r1)
                        gx[base + arg] += load(dy + ((k * p.C + c) * p.PH + ph) * p.PW + pw);
                }
        }
    }
}

// ------------------------------------------------- RoIPool deterministic backward (records)
// The gradient of bin (k, c, ph, pw) flows to one pixel, the argmax of its window in channel c
// (pool_window / pool_argmax: pool_bwd's pixel, ties to the first in row-major order, NaN never
// taken); an empty window, a window of values all <= -FLT_MAX or NaN, or a non-finite RoI sends
// it nowhere. Record i (the grad_out element i = ((k C + c) PH + ph) PW + pw) is the key
// anchor * R + i, R = K C PH PW, anchor = the grad_x element it lands on, or N C H W for
// nowhere: unique keys, so the sorted keys are the same whatever the sort, and each key holds
// both its destination and its grad_out element. After the sort a grad_x element e's records
// are the keys in [e R, (e + 1) R), in slot order: for a fixed channel that is RoI index, then
// bin row-major -- the order in which pool_bwd_det (and the CPU kernel) add them.
template <typename T>
__global__ void pool_bwd_records(const T* __restrict__ x, const T* __restrict__ rois,
                                 i64* __restrict__ key, PARAM_ARGS) {
    PARAM_INIT;
    typedef typename acc<T>::type A;
    const i64 total = p.K * p.C * p.PH * p.PW, HW = p.H * p.W, none = p.N * p.C * HW;
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < total;
         i += (i64)blockDim.x * gridDim.x) {
        const int pw = int(i % p.PW), ph = int((i / p.PW) % p.PH);
        const i64 c = (i / ((i64)p.PW * p.PH)) % p.C, k = i / ((i64)p.PW * p.PH * p.C);
        i64 n, win[4], anchor = none;
        A best;
        if (pool_window(rois + 5 * k, p.scale, ph, pw, p.PH, p.PW, p.H, p.W, n, win)) {
            const i64 base = (n * p.C + c) * HW;
            const i64 arg = pool_argmax(x + base, p.W, win, best);
            if (arg >= 0) anchor = base + arg;
        }
        key[i] = anchor * total + i;
    }
}

// One thread per grad_x element e (grid-stride: a block's threads take consecutive elements,
// so their writes coalesce and their binary searches walk nearly the same path): the first
// sorted key >= e R, then the run of keys below (e + 1) R, summed in that (slot) order from 0
// in acc<T> and written once. No atomics, no shared memory, no barriers. (A bounds array from
// searchsorted would cost the same searches plus 16 bytes per grad_x element.)
template <typename T>
__global__ void pool_bwd_gather(const T* __restrict__ dy, const i64* __restrict__ skey,
                                T* __restrict__ gx, PARAM_ARGS) {
    PARAM_INIT;
    typedef typename acc<T>::type A;
    const i64 R = p.K * p.C * p.PH * p.PW, total = p.N * p.C * p.H * p.W;
    for (i64 e = blockIdx.x * (i64)blockDim.x + threadIdx.x; e < total;
         e += (i64)blockDim.x * gridDim.x) {
        const i64 lo = e * R, hi = lo + R;
        i64 a = 0, b = R;
        while (a < b) {
            const i64 m = a + (b - a) / 2;
            if (skey[m] < lo) a = m + 1; else b = m;
        }
        A v = A(0);
        for (; a < R && skey[a] < hi; ++a) v += load(dy + (skey[a] - lo));
        store(gx + e, v);
    }
}

// ------------------------------------------------------------------ multi-scale levels
// torchvision's LevelMapper per RoI, as fastnorm._cpu.roi_ops._fpn_levels computes it (the
// compute type, sqrt and log2 in double rounded to it): lev[k] = floor(lvl0 + log2(sqrt(area)
// / s0) + 1e-6) clamped to [kmin, kmin + L - 1], minus kmin; L for a NaN level (a non-finite
// coordinate or a negative area: pooled on no level).
template <typename T>
__global__ void fpn_levels(const T* __restrict__ rois, i64 K, double s0, double lvl0,
                           double kmin, int L, i64* __restrict__ lev) {
    typedef typename acc<T>::type A;
    for (i64 k = blockIdx.x * (i64)blockDim.x + threadIdx.x; k < K;
         k += (i64)blockDim.x * gridDim.x) {
        const T* r = rois + 5 * k;
        const A area = (load(r + 3) - load(r + 1)) * (load(r + 4) - load(r + 2));
        const A q = A(sqrt((double)area)) / A(s0);
        const A v = A(A(lvl0) + A(log2((double)q))) + A(1e-6);
        const double l = floor((double)v);
        lev[k] = l != l ? L : l <= kmin ? 0 : l >= kmin + (L - 1) ? L - 1 : i64(l - kmin);
    }
}

// ------------------------------------------------------------------ argument check
// ok[0] = 1 when every batch index rois[k * stride] (k < K) is an integer in [0, N) (NaN and
// infinities are not), else 0: the RoI ops' validation in one launch of one block, instead of
// an array operation per condition. The block's threads only ever write 1 to `bad`.
template <typename T>
__global__ void rois_check(const T* __restrict__ rois, i64 K, i64 stride, i64 N,
                           int* __restrict__ ok) {
    __shared__ int bad;
    if (threadIdx.x == 0) bad = 0;
    __syncthreads();
    for (i64 k = threadIdx.x; k < K; k += blockDim.x) {
        const double b = (double)load(rois + k * stride);
        if (!(b == floor(b) && b >= 0.0 && b < (double)N)) bad = 1;
    }
    __syncthreads();
    if (threadIdx.x == 0) ok[0] = !bad;
}

}  // namespace roi_ops
}  // namespace fastnorm
