"""CUDA launcher for deform_conv2d: im2col / col2im / coordinate-gradient RawKernels
(deform_conv.cu) + cuBLAS GEMMs through CuPy, chunked exactly like the CPU kernel.

The entry points of ``fastnorm._kernels`` (DeformConvForward/Backward), as
``fastnorm._cpu.deform_conv`` (``nthreads`` is ignored). Columns and accumulations are in
float32 for float16/bfloat16/float32 input and float64 for float64. grad_x is accumulated with
atomics, so it is not bitwise reproducible run to run (the other results are).
"""
import numpy as np

from . import ctype, cupy, function, i64, instantiate, launch

_NS = "fastnorm::deform_conv::"
_KERNELS = ("dc_im2col", "dc_col2im", "dc_coord")
_EXPRS = {k: instantiate(_NS + k + "<{}>") for k in _KERNELS}


def _kernel(name, dtype):
    return function("deform_conv", f"{_NS}{name}<{ctype(dtype)}>", _EXPRS[name])


def _chunks(N, Ho, chunk_rows):
    """(n0, nb, ho0, hb) blocks of at most ``chunk_rows`` output rows (the CPU kernel's plan)."""
    chunk_rows = max(int(chunk_rows), 1)
    if chunk_rows >= Ho:
        nb = chunk_rows // Ho
        return [(n0, min(nb, N - n0), 0, Ho) for n0 in range(0, N, nb)]
    return [(n, 1, h0, min(chunk_rows, Ho - h0)) for n in range(N) for h0 in range(0, Ho, chunk_rows)]


class _Setup:
    """Geometry of one call and the launch helper shared by forward and backward."""

    def __init__(self, x, offset, mask, weight, stride, padding, dilation):
        self.cp = cp = cupy()
        self.N, self.C, self.H, self.W = (int(s) for s in x.shape)
        self.Cout, Cg, self.kh, self.kw = (int(s) for s in weight.shape)
        self.K = self.kh * self.kw
        self.Ho, self.Wo = int(offset.shape[2]), int(offset.shape[3])
        self.G = int(offset.shape[1]) // (2 * self.K)
        self.groups = self.C // Cg
        self.acc = cp.float64 if x.dtype == cp.float64 else cp.float32
        # DC_GEO_ARGS of deform_conv.cu, scalars after each kernel's arrays
        self.geometry = tuple(i64(v) for v in (
            self.C, self.H, self.W, self.Ho, self.Wo, self.kh, self.kw, self.K, *stride,
            *padding, *dilation, self.G, self.C // self.G))
        self.has_mask = mask is not None
        self.dtype = x.dtype

    def run(self, name, args, n0, nb, ho0, hb):
        total = nb * self.G * self.K * hb * self.Wo
        launch(_kernel(name, self.dtype), total,
               tuple(args) + (i64(n0), i64(nb), i64(ho0), i64(hb), np.int32(self.has_mask))
               + self.geometry)

    def columns(self, buf, nb, hb):
        """Chunk columns (groups, C_in/groups * K, nb * hb * Wo) at the start of ``buf``: the
        chunk's samples side by side, so that each GEMM is one product per weight group."""
        NL = nb * hb * self.Wo
        CgK = self.C // self.groups * self.K
        return buf[:self.groups * CgK * NL].reshape(self.groups, CgK, NL)


def forward(x, offset, mask, weight, bias, stride, padding, dilation, chunk_rows, nthreads):
    s = _Setup(x, offset, mask, weight, stride, padding, dilation)
    cp = s.cp
    if s.N * s.Cout * s.Ho * s.Wo == 0 or s.H * s.W == 0:
        y = cp.zeros((s.N, s.Cout, s.Ho, s.Wo), dtype=x.dtype)
        if bias is not None:
            y += bias.reshape(-1, 1, 1)
        return y
    y = cp.empty((s.N, s.Cout, s.Ho, s.Wo), dtype=x.dtype)     # every chunk writes its part
    wmat = weight.astype(s.acc).reshape(s.groups, s.Cout // s.groups, -1)
    # the bias is added in the accumulation type, before the one rounding to a half type
    bacc = None if bias is None else bias.astype(s.acc).reshape(s.groups, -1, 1)
    y3 = y.reshape(s.N, s.groups, s.Cout // s.groups, s.Ho * s.Wo)
    plan = _chunks(s.N, s.Ho, chunk_rows)
    buf = cp.empty(max(nb * hb for _, nb, _, hb in plan) * s.C * s.K * s.Wo, dtype=s.acc)
    m = mask if mask is not None else offset
    for n0, nb, ho0, hb in plan:
        cols = s.columns(buf, nb, hb)
        s.run("dc_im2col", (x, offset, m, buf), n0, nb, ho0, hb)
        r = cp.matmul(wmat, cols)                  # (groups, C_out/groups, nb * hb * Wo)
        if bacc is not None:
            r += bacc
        r = r.reshape(s.groups, -1, nb, hb * s.Wo).transpose(2, 0, 1, 3)
        y3[n0:n0 + nb, :, :, ho0 * s.Wo:(ho0 + hb) * s.Wo] = r.astype(x.dtype, copy=False)
    return y


def backward(grad_out, x, offset, mask, weight, stride, padding, dilation, chunk_rows,
             nthreads):
    s = _Setup(x, offset, mask, weight, stride, padding, dilation)
    cp = s.cp
    gx_acc = cp.zeros(x.shape, dtype=s.acc)
    goff = cp.zeros_like(offset)
    gmask = cp.zeros_like(mask) if mask is not None else None
    gw = cp.zeros((s.groups, s.Cout // s.groups, s.C // s.groups * s.K), dtype=s.acc)
    gb = grad_out.astype(s.acc).sum(axis=(0, 2, 3)).astype(x.dtype)
    if s.N * s.Cout * s.Ho * s.Wo == 0 or s.H * s.W == 0:
        return (gx_acc.astype(x.dtype), goff, gmask, gw.reshape(weight.shape).astype(x.dtype), gb)
    wmat = weight.astype(s.acc).reshape(s.groups, s.Cout // s.groups, -1)
    go3 = grad_out.reshape(s.N, s.groups, s.Cout // s.groups, s.Ho * s.Wo)
    plan = _chunks(s.N, s.Ho, chunk_rows)
    buf = cp.empty(max(nb * hb for _, nb, _, hb in plan) * s.C * s.K * s.Wo, dtype=s.acc)
    m = mask if mask is not None else offset
    gm = gmask if gmask is not None else goff
    for n0, nb, ho0, hb in plan:
        cols = s.columns(buf, nb, hb)
        s.run("dc_im2col", (x, offset, m, buf), n0, nb, ho0, hb)
        gout = go3[n0:n0 + nb, :, :, ho0 * s.Wo:(ho0 + hb) * s.Wo].transpose(1, 2, 0, 3)
        gout = cp.ascontiguousarray(gout, dtype=s.acc).reshape(s.groups, -1, nb * hb * s.Wo)
        gw += cp.matmul(gout, cols.transpose(0, 2, 1))    # summed over the chunk's samples
        cp.matmul(wmat.transpose(0, 2, 1), gout, out=cols)    # column gradients, in place
        # dc_col2im/dc_coord take the *masked* column gradient and apply the mask themselves
        s.run("dc_col2im", (offset, m, buf, gx_acc), n0, nb, ho0, hb)
        s.run("dc_coord", (x, offset, m, buf, goff, gm), n0, nb, ho0, hb)
    return (gx_acc.astype(x.dtype), goff, gmask, gw.reshape(weight.shape).astype(x.dtype), gb)

# every instantiation CuPy may request (the NVRTC gate, tests/test_cuda_compile.py)
NAME_EXPRESSIONS = [e for exprs in _EXPRS.values() for e in exprs]
