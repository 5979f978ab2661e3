"""CUDA launcher for deform_conv2d: im2col / col2im / coordinate-gradient RawKernels
(deform_conv.cu) + cuBLAS GEMMs (cublasGemmStridedBatchedEx through ``cupy.cuda.cublas``),
chunked exactly like the CPU kernel.

The entry points of ``fastnorm._kernels`` (DeformConvForward/Backward), as
``fastnorm._cpu.deform_conv`` (``nthreads`` is ignored). grad_x is accumulated with atomics, so it
is not bitwise reproducible run to run (the other results are).

The columns (and the column gradient, written over them in place) are in the input type T. The
GEMMs are called on the arrays as they lie (transposes and strided slices are cuBLAS operands, not
copies), with these operand types (A x B -> C, compute type):

===================  ==============================  ==================================
GEMM                 float16 / bfloat16 input        float32 (float64) input
===================  ==============================  ==================================
y = W cols (+ bias)  T x T -> T, 32F                 f32 x f32 -> f32, 32F (64F)
gW += gy cols^T      T x T -> float32, 32F           f32 x f32 -> f32, 32F (64F)
gcols = W^T gy       T x T -> T, 32F                 f32 x f32 -> f32, 32F (64F)
===================  ==============================  ==================================

Half inputs therefore run on tensor cores: products of half values (exact in float32), sums in
float32, one rounding of each result to T (the bias is read as C with beta = 1, so it is added in
float32 before that rounding). float32 runs in full float32 (CUBLAS_COMPUTE_32F) unless
``FASTNORM_TF32=1`` (read at each call; CuPy's ``CUPY_TF32`` convention, but fastnorm's own switch:
``CUPY_TF32`` does not affect these GEMMs) allows TF32 tensor cores (CUBLAS_COMPUTE_32F_FAST_TF32:
inputs rounded to 10 mantissa bits, float32 sums). cuBLAS has bfloat16 GEMMs from compute
capability 8.0 on; below, bfloat16 operands are widened to float32 copies for the GEMMs.
"""
import os

import numpy as np

from . import ctype, cupy, function, i64, instantiate, launch

_NS = "fastnorm::deform_conv::"
_KERNELS = ("dc_im2col", "dc_col2im", "dc_coord")
_EXPRS = {k: instantiate(_NS + k + "<{}>") for k in _KERNELS}

#: threads at which im2col / col2im stop splitting channels across threads (an H100 keeps about
#: 270k resident; below, each thread loops over a slice of its offset group's channels)
SPLIT_THREADS = 1 << 19

#: environment variable that opts float32 GEMMs into TF32 tensor cores (``1``; CUPY_TF32's format)
TF32_ENV = "FASTNORM_TF32"


def tf32():
    """Whether float32 GEMMs may use TF32 (``FASTNORM_TF32`` set to a positive integer)."""
    try:
        return int(os.environ.get(TF32_ENV, "0")) > 0
    except ValueError:
        return False


def _kernel(name, dtype):
    return function("deform_conv", f"{_NS}{name}<{ctype(dtype)}>", _EXPRS[name])


def _chunks(N, Ho, chunk_rows):
    """(n0, nb, ho0, hb) blocks of at most ``chunk_rows`` output rows (the CPU kernel's plan)."""
    chunk_rows = max(int(chunk_rows), 1)
    if chunk_rows >= Ho:
        nb = chunk_rows // Ho
        return [(n0, min(nb, N - n0), 0, Ho) for n0 in range(0, N, nb)]
    return [(n, 1, h0, min(chunk_rows, Ho - h0)) for n in range(N) for h0 in range(0, Ho, chunk_rows)]


class _Mat:
    """Row-major matrices inside array ``a``: matrix i of a batch has element (r, c) at
    ``offset + i * step + r * ld + c`` elements from the start of ``a``."""

    def __init__(self, a, offset, ld, step=0):
        self.a, self.offset, self.ld, self.step = a, int(offset), int(ld), int(step)

    def ptr(self):
        return self.a.data.ptr + self.offset * self.a.itemsize


class _Gemm:
    """cuBLAS GEMMs of one call's dtype: the handle, data and compute types, scalars."""

    def __init__(self, cp, dtype):
        self.cp, self.cublas, rt = cp, cp.cuda.cublas, cp.cuda.runtime
        self.types = {"float32": rt.CUDA_R_32F, "float64": rt.CUDA_R_64F,
                      "float16": rt.CUDA_R_16F, "bfloat16": rt.CUDA_R_16BF}
        cb = self.cublas
        if dtype == np.float64:
            self.compute, scalar = cb.CUBLAS_COMPUTE_64F, np.float64
        elif dtype == np.float32 and tf32():
            self.compute, scalar = cb.CUBLAS_COMPUTE_32F_FAST_TF32, np.float32
        else:
            self.compute, scalar = cb.CUBLAS_COMPUTE_32F, np.float32
        # host scalars (cuBLAS reads them during the call): alpha = 1, beta = 0 or 1
        self.scalars = {b: (np.ones((), scalar), np.full((), b, scalar)) for b in (0, 1)}
        # cuBLAS has no bfloat16 GEMM below compute capability 8.0: there the operands are
        # widened to float32 copies (exact) and C is rounded back (slower, more memory)
        self.widen = str(dtype) == "bfloat16" and int(cp.cuda.Device().compute_capability) < 80

    def __call__(self, c, a, b, M, N, K, *, trans_a=False, trans_b=False, beta=0, count=1):
        """``C_i = op(A_i) op(B_i) + beta C_i`` for i < count (``_Mat``s, row-major, op(A) M x K,
        op(B) K x N, C M x N; op transposes when trans_*). cuBLAS is column-major, so it computes
        C^T = op(B)^T op(A)^T: the row-major matrices are its column-major transposes as they
        lie."""
        if self.widen:
            a, b = (_Mat(m.a.astype(np.float32), m.offset, m.ld, m.step) for m in (a, b))
            if c.a.dtype != np.float32:
                wide = _Mat(c.a.astype(np.float32), c.offset, c.ld, c.step)
                self._call(wide, a, b, M, N, K, trans_a, trans_b, beta, count)
                c.a[...] = wide.a                   # the rest of c round-trips exactly
                return
        self._call(c, a, b, M, N, K, trans_a, trans_b, beta, count)

    def _call(self, c, a, b, M, N, K, trans_a, trans_b, beta, count):
        cb = self.cublas
        one, bt = self.scalars[beta]
        handle = self.cp.cuda.get_cublas_handle()
        # CuPy binds its handle to a stream only inside its own calls: bind it to the current
        # stream, where this call's kernels run, or the GEMM may run on another one, unordered
        cb.setStream(handle, self.cp.cuda.get_current_stream().ptr)
        cb.gemmStridedBatchedEx(
            handle,
            cb.CUBLAS_OP_T if trans_b else cb.CUBLAS_OP_N,
            cb.CUBLAS_OP_T if trans_a else cb.CUBLAS_OP_N,
            N, M, K, one.ctypes.data,
            b.ptr(), self.types[str(b.a.dtype)], b.ld, b.step,
            a.ptr(), self.types[str(a.a.dtype)], a.ld, a.step,
            bt.ctypes.data,
            c.ptr(), self.types[str(c.a.dtype)], c.ld, c.step,
            count, self.compute, cb.CUBLAS_GEMM_DEFAULT)


class _Setup:
    """Geometry of one call and the launch helpers shared by forward and backward."""

    def __init__(self, x, offset, mask, weight, stride, padding, dilation):
        self.cp = cp = cupy()
        self.N, self.C, self.H, self.W = (int(s) for s in x.shape)
        self.Cout, Cg, self.kh, self.kw = (int(s) for s in weight.shape)
        self.K = self.kh * self.kw
        self.Ho, self.Wo = int(offset.shape[2]), int(offset.shape[3])
        self.HoWo = self.Ho * self.Wo
        self.G = int(offset.shape[1]) // (2 * self.K)
        self.groups = self.C // Cg
        self.Cog = self.Cout // self.groups               # output channels per weight group
        self.CgK = Cg * self.K                            # column rows per weight group
        self.acc = cp.float64 if x.dtype == cp.float64 else cp.float32
        # DC_GEO_ARGS of deform_conv.cu, scalars after each kernel's arrays
        self.geometry = tuple(i64(v) for v in (
            self.C, self.H, self.W, self.Ho, self.Wo, self.kh, self.kw, self.K, *stride,
            *padding, *dilation, self.G, self.C // self.G))
        self.has_mask = mask is not None
        self.dtype = x.dtype
        self.gemm = _Gemm(cp, x.dtype)

    def run(self, name, args, n0, nb, ho0, hb):
        """Launch kernel ``name`` on a chunk: one thread per (point, channel slice); im2col and
        col2im split each offset group's channels into slices (cpt channels each) until the grid
        has about SPLIT_THREADS threads, dc_coord (a sum over them) does not."""
        points = nb * self.G * self.K * hb * self.Wo
        cpg = self.C // self.G
        cpt = cpg
        if name != "dc_coord" and points < SPLIT_THREADS:
            cpt = max(1, -(-cpg // min(cpg, -(-SPLIT_THREADS // points))))
        launch(_kernel(name, self.dtype), points * -(-cpg // cpt),
               tuple(args) + (i64(n0), i64(nb), i64(ho0), i64(hb), np.int32(self.has_mask),
                              i64(cpt)) + self.geometry)

    def workspace(self, plan):
        """The column buffer of the largest chunk, in the input type: (groups, C_in/groups * K,
        nb * hb * Wo) at its start for a chunk, the chunk's samples side by side, so that each
        GEMM is one product per weight group."""
        return self.cp.empty(max(nb * hb for _, nb, _, hb in plan) * self.C * self.K * self.Wo,
                             dtype=self.dtype)


def forward(x, offset, mask, weight, bias, stride, padding, dilation, chunk_rows, nthreads):
    s = _Setup(x, offset, mask, weight, stride, padding, dilation)
    cp = s.cp
    if s.N * s.Cout * s.Ho * s.Wo == 0 or s.H * s.W == 0:
        y = cp.zeros((s.N, s.Cout, s.Ho, s.Wo), dtype=x.dtype)
        if bias is not None:
            y += bias.reshape(-1, 1, 1)
        return y
    # the GEMMs write y in place: each chunk's C is a strided block of y (ld = Ho * Wo); with a
    # bias y starts as the bias and the GEMMs add to it (beta = 1: in the compute type, before
    # the one rounding), without one every chunk overwrites its part (beta = 0: not read)
    y = cp.empty((s.N, s.Cout, s.Ho, s.Wo), dtype=x.dtype)
    if bias is not None:
        y[...] = bias.reshape(-1, 1, 1)
    plan = _chunks(s.N, s.Ho, chunk_rows)
    buf = s.workspace(plan)
    m = mask if mask is not None else offset
    beta = 0 if bias is None else 1
    for n0, nb, ho0, hb in plan:
        s.run("dc_im2col", (x, offset, m, buf), n0, nb, ho0, hb)
        L = hb * s.Wo
        NL = nb * L
        # y[n0 + i, group g, chunk positions] = W_g cols_g[:, sample i]: one batched GEMM over
        # the samples per weight group, or over the groups per sample, whichever batch is longer
        y0 = n0 * s.Cout * s.HoWo + ho0 * s.Wo
        y_g, y_i = s.Cog * s.HoWo, s.Cout * s.HoWo      # offset steps per group, per sample
        w_g, c_g, c_i = s.Cog * s.CgK, s.CgK * NL, L
        if nb >= s.groups:
            for g in range(s.groups):
                s.gemm(_Mat(y, y0 + g * y_g, s.HoWo, y_i), _Mat(weight, g * w_g, s.CgK),
                       _Mat(buf, g * c_g, NL, c_i), s.Cog, L, s.CgK, beta=beta, count=nb)
        else:
            for i in range(nb):
                s.gemm(_Mat(y, y0 + i * y_i, s.HoWo, y_g), _Mat(weight, 0, s.CgK, w_g),
                       _Mat(buf, i * c_i, NL, c_g), s.Cog, L, s.CgK, beta=beta, count=s.groups)
    return y


def backward(grad_out, x, offset, mask, weight, stride, padding, dilation, chunk_rows,
             nthreads):
    s = _Setup(x, offset, mask, weight, stride, padding, dilation)
    cp = s.cp
    gx_acc = cp.zeros(x.shape, dtype=s.acc)
    goff = cp.zeros_like(offset)
    gmask = cp.zeros_like(mask) if mask is not None else None
    gb = grad_out.astype(s.acc, copy=False).sum(axis=(0, 2, 3)).astype(x.dtype, copy=False)
    if s.N * s.Cout * s.Ho * s.Wo == 0 or s.H * s.W == 0:
        gw = cp.zeros(weight.shape, dtype=x.dtype)
        return (gx_acc.astype(x.dtype, copy=False), goff, gmask, gw, gb)
    # grad_weight in the accumulation type, summed over the chunks by the GEMMs themselves (the
    # first overwrites it: beta = 0, later ones add: beta = 1)
    gw = cp.empty((s.groups, s.Cog, s.CgK), dtype=s.acc)
    plan = _chunks(s.N, s.Ho, chunk_rows)
    buf = s.workspace(plan)
    # a chunk of several samples needs grad_out's chunk as (groups, C_out/groups, samples *
    # positions) (one GEMM reduces over samples and positions together): one copy into this
    # staging buffer; a chunk of one sample (or of its rows) reads grad_out where it lies
    multi = max(nb for _, nb, _, _ in plan) > 1
    gstage = cp.empty(max(nb * hb for _, nb, _, hb in plan) * s.Cout * s.Wo,
                      dtype=x.dtype) if multi else None
    m = mask if mask is not None else offset
    gm = gmask if gmask is not None else goff
    for ci, (n0, nb, ho0, hb) in enumerate(plan):
        L = hb * s.Wo
        NL = nb * L
        s.run("dc_im2col", (x, offset, m, buf), n0, nb, ho0, hb)
        # gy_g: grad_out of the chunk, weight group g, as (C_out/groups, nb * hb * Wo) rows
        if nb > 1:                                  # whole samples (hb = Ho): staged
            gstage[:s.Cout * NL].reshape(s.groups, s.Cog, nb, L)[...] = grad_out[
                n0:n0 + nb].reshape(nb, s.groups, s.Cog, L).transpose(1, 2, 0, 3)
            gy = _Mat(gstage, 0, NL, s.Cog * NL)
        else:                                       # where it lies (ld = Ho * Wo)
            gy = _Mat(grad_out, n0 * s.Cout * s.HoWo + ho0 * s.Wo, s.HoWo, s.Cog * s.HoWo)
        # gW_g (+)= gy_g cols_g^T: one GEMM per chunk for all weight groups, reducing over the
        # chunk's samples and positions (K = nb * hb * Wo)
        s.gemm(_Mat(gw, 0, s.CgK, s.Cog * s.CgK), gy, _Mat(buf, 0, NL, s.CgK * NL),
               s.Cog, s.CgK, NL, trans_b=True, beta=0 if ci == 0 else 1, count=s.groups)
        # the column gradient W_g^T gy_g, written over the columns (beta = 0)
        s.gemm(_Mat(buf, 0, NL, s.CgK * NL), _Mat(weight, 0, s.CgK, s.Cog * s.CgK), gy,
               s.CgK, NL, s.Cog, trans_a=True, count=s.groups)
        # dc_col2im/dc_coord take the *masked* column gradient and apply the mask themselves
        s.run("dc_col2im", (offset, m, buf, gx_acc), n0, nb, ho0, hb)
        s.run("dc_coord", (x, offset, m, buf, goff, gm), n0, nb, ho0, hb)
    return (gx_acc.astype(x.dtype, copy=False), goff, gmask,
            gw.reshape(weight.shape).astype(x.dtype, copy=False), gb)


# every instantiation CuPy may request (the NVRTC gate, tests/test_cuda_compile.py)
NAME_EXPRESSIONS = [e for exprs in _EXPRS.values() for e in exprs]
