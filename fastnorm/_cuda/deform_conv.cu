// Deformable convolution (DCN v1/v2) on CUDA: im2col / col2im / coordinate-gradient kernels.
// The GEMMs run in cuBLAS (fastnorm/_cuda/deform_conv.py: GemmEx on the columns as they are).
//
// Columns of a chunk of nb samples and hb output rows: T cols[C*K][nb*hb*Wo] in the input type
// (half columns for half input, so that cuBLAS multiplies them on tensor cores; each entry is
// one rounding of its float32 value), row index c*K + k, column (sample in chunk) * hb*Wo +
// (row in chunk) * Wo + wo: the samples lie side by side, so that each GEMM of a chunk (and
// grad_weight's reduction over its samples and positions) is one product. The backward's column
// gradient overwrites the columns in place (same type and layout). One thread handles one
// (sample, offset group, kernel point, output position) and loops over a slice of `cpt` of the
// group's channels (im2col / col2im: slices chosen by the launcher so that the grid fills the
// GPU; dc_coord, a sum over the channels: all of them), so the bilinear corners/weights are
// computed once per slice and reused; consecutive threads take consecutive output positions
// (coalesced column reads/writes). Sums are in A = acc<T>::type.
#include "common.cuh"

namespace fastnorm {
namespace deform_conv {

// `msk`/`gmask` are read/written only when has_mask (else any valid pointer).
// The geometry, passed as scalars after the arrays (launcher: deform_conv.py `_Setup.geometry`).
struct DcGeo {
    i64 C, H, W, Ho, Wo, kh, kw, K, sh, sw, ph, pw, dh, dw, G, Cpg;
};
#define DC_GEO_ARGS i64 C, i64 H, i64 W, i64 Ho, i64 Wo, i64 kh, i64 kw, i64 K, i64 sh, i64 sw, \
    i64 ph, i64 pw, i64 dh, i64 dw, i64 G, i64 Cpg
#define DC_GEO_INIT const DcGeo g{C, H, W, Ho, Wo, kh, kw, K, sh, sw, ph, pw, dh, dw, G, Cpg}

// zero_pad_bilinear plus the corners inside the map (bit j) and, when dwy != nullptr,
// d wt_j / dy and d wt_j / dx (0 for corners outside the map).
template <typename A>
__device__ __forceinline__ int dc_corners(A y, A x, i64 H, i64 W, i64 o[4], A wt[4], A* dwy, A* dwx) {
    if (!zero_pad_bilinear(y, x, H, W, o, wt)) {
        if (dwy) for (int q = 0; q < 4; ++q) { dwy[q] = A(0); dwx[q] = A(0); }
        return 0;
    }
    A yf = floor(y), xf = floor(x);
    i64 y0 = (i64)yf, x0 = (i64)xf;
    int b = (y0 >= 0 && x0 >= 0) | ((y0 >= 0 && x0 + 1 < W) << 1) |
            ((y0 + 1 < H && x0 >= 0) << 2) | ((y0 + 1 < H && x0 + 1 < W) << 3);
    if (dwy) {
        A ly = y - yf, lx = x - xf;
        dwy[0] = (b & 1) ? -(A(1) - lx) : A(0);
        dwy[1] = (b & 2) ? -lx : A(0);
        dwy[2] = (b & 4) ? (A(1) - lx) : A(0);
        dwy[3] = (b & 8) ? lx : A(0);
        dwx[0] = (b & 1) ? -(A(1) - ly) : A(0);
        dwx[1] = (b & 2) ? (A(1) - ly) : A(0);
        dwx[2] = (b & 4) ? -ly : A(0);
        dwx[3] = (b & 8) ? ly : A(0);
    }
    return b;
}

// Decode a thread index into (sample in chunk, offset group, kernel point, row in chunk, column)
// and its channels [c0, c1) of the group: the group's channels are split into slices of `cpt`
// (the slowest index, so that consecutive threads still take consecutive positions); false past
// the end.
__device__ __forceinline__ bool dc_point(const DcGeo& g, i64 nb, i64 hb, i64 cpt, i64 t,
                                         i64& nl, i64& go, i64& k, i64& r, i64& wo, i64& c0,
                                         i64& c1) {
    const i64 points = nb * g.G * g.K * hb * g.Wo, slices = (g.Cpg + cpt - 1) / cpt;
    if (t >= points * slices) return false;
    c0 = t / points * cpt;
    c1 = min(g.Cpg, c0 + cpt);
    t %= points;
    wo = t % g.Wo; t /= g.Wo;
    r = t % hb; t /= hb;
    k = t % g.K; t /= g.K;
    go = t % g.G;
    nl = t / g.G;
    return true;
}

template <typename T, typename A>
__device__ __forceinline__ void dc_position(const DcGeo& g, const T* off, i64 n, i64 go, i64 k,
                                            i64 ho, i64 wo, A& y, A& x, i64& iy, i64& im) {
    const i64 HoWo = g.Ho * g.Wo;
    iy = ((n * g.G + go) * 2 * g.K + 2 * k) * HoWo + ho * g.Wo + wo;
    im = ((n * g.G + go) * g.K + k) * HoWo + ho * g.Wo + wo;
    y = A(ho * g.sh - g.ph + (k / g.kw) * g.dh) + load(off + iy);
    x = A(wo * g.sw - g.pw + (k % g.kw) * g.dw) + load(off + iy + HoWo);
}

template <typename T>
__global__ void dc_im2col(const T* __restrict__ x, const T* __restrict__ off,
                          const T* __restrict__ msk, T* __restrict__ cols,
                          i64 n0, i64 nb, i64 ho0, i64 hb, int has_mask, i64 cpt,
                          DC_GEO_ARGS) {
    typedef typename acc<T>::type A;
    DC_GEO_INIT;
    i64 nl, go, k, r, wo, c0, c1;
    const i64 t = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (!dc_point(g, nb, hb, cpt, t, nl, go, k, r, wo, c0, c1)) return;
    const i64 n = n0 + nl, L = hb * g.Wo, NL = nb * L, HW = g.H * g.W;
    A y, xx; i64 iy, im;
    dc_position<T, A>(g, off, n, go, k, ho0 + r, wo, y, xx, iy, im);
    i64 o[4]; A wt[4];
    const int b = dc_corners<A>(y, xx, g.H, g.W, o, wt, nullptr, nullptr);
    const A mk = has_mask ? load(msk + im) : A(1);
    const T* xs = x + (n * g.C + go * g.Cpg) * HW;
    T* col = cols + (go * g.Cpg * g.K + k) * NL + nl * L + r * g.Wo + wo;
    for (i64 c = c0; c < c1; ++c) {
        const T* xc = xs + c * HW;
        A s = A(0);
        #pragma unroll
        for (int q = 0; q < 4; ++q)
            if ((b >> q) & 1) s += wt[q] * load(xc + o[q]);
        store(col + c * g.K * NL, s * mk);
    }
}

// grad_x (accumulated with atomics into an A buffer: not bitwise deterministic).
template <typename T>
__global__ void dc_col2im(const T* __restrict__ off, const T* __restrict__ msk,
                          const T* __restrict__ gcols, typename acc<T>::type* __restrict__ gx,
                          i64 n0, i64 nb, i64 ho0, i64 hb, int has_mask, i64 cpt,
                          DC_GEO_ARGS) {
    typedef typename acc<T>::type A;
    DC_GEO_INIT;
    i64 nl, go, k, r, wo, c0, c1;
    const i64 t = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (!dc_point(g, nb, hb, cpt, t, nl, go, k, r, wo, c0, c1)) return;
    const i64 n = n0 + nl, L = hb * g.Wo, NL = nb * L, HW = g.H * g.W;
    A y, xx; i64 iy, im;
    dc_position<T, A>(g, off, n, go, k, ho0 + r, wo, y, xx, iy, im);
    i64 o[4]; A wt[4];
    const int b = dc_corners<A>(y, xx, g.H, g.W, o, wt, nullptr, nullptr);
    if (b == 0) return;
    const A mk = has_mask ? load(msk + im) : A(1);
    A* gxs = gx + (n * g.C + go * g.Cpg) * HW;
    const T* gc = gcols + (go * g.Cpg * g.K + k) * NL + nl * L + r * g.Wo + wo;
    for (i64 c = c0; c < c1; ++c) {
        const A v = load(gc + c * g.K * NL) * mk;
        #pragma unroll
        for (int q = 0; q < 4; ++q)
            if ((b >> q) & 1) atomic_add(gxs + c * HW + o[q], wt[q] * v);
    }
}

// grad_offset and grad_mask: one thread per (sample, offset group, kernel point, position).
template <typename T>
__global__ void dc_coord(const T* __restrict__ x, const T* __restrict__ off,
                         const T* __restrict__ msk, const T* __restrict__ gcols,
                         T* __restrict__ goff, T* __restrict__ gmask, i64 n0, i64 nb, i64 ho0,
                         i64 hb, int has_mask, i64 cpt, DC_GEO_ARGS) {
    typedef typename acc<T>::type A;
    DC_GEO_INIT;
    i64 nl, go, k, r, wo, c0, c1;           // cpt = Cpg: every thread sums all its channels
    const i64 t = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (!dc_point(g, nb, hb, cpt, t, nl, go, k, r, wo, c0, c1)) return;
    const i64 n = n0 + nl, L = hb * g.Wo, NL = nb * L, HW = g.H * g.W;
    A y, xx; i64 iy, im;
    dc_position<T, A>(g, off, n, go, k, ho0 + r, wo, y, xx, iy, im);
    i64 o[4]; A wt[4], dwy[4], dwx[4];
    const int b = dc_corners<A>(y, xx, g.H, g.W, o, wt, dwy, dwx);
    A ay = A(0), ax = A(0), am = A(0);
    if (b != 0) {
        const T* xs = x + (n * g.C + go * g.Cpg) * HW;
        const T* gc = gcols + (go * g.Cpg * g.K + k) * NL + nl * L + r * g.Wo + wo;
        for (i64 c = c0; c < c1; ++c) {
            const T* xc = xs + c * HW;
            A v[4];
            #pragma unroll
            for (int q = 0; q < 4; ++q) v[q] = ((b >> q) & 1) ? load(xc + o[q]) : A(0);
            const A gv = load(gc + c * g.K * NL);
            ay += gv * (dwy[0] * v[0] + dwy[1] * v[1] + dwy[2] * v[2] + dwy[3] * v[3]);
            ax += gv * (dwx[0] * v[0] + dwx[1] * v[1] + dwx[2] * v[2] + dwx[3] * v[3]);
            am += gv * (wt[0] * v[0] + wt[1] * v[1] + wt[2] * v[2] + wt[3] * v[3]);
        }
    }
    const A mk = has_mask ? load(msk + im) : A(1);
    store(goff + iy, ay * mk);
    store(goff + iy + g.Ho * g.Wo, ax * mk);
    if (has_mask) store(gmask + im, am);
}

}  // namespace deform_conv
}  // namespace fastnorm
