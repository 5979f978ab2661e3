"""Deformable convolution v1 (Dai et al., 2017) and v2 (Zhu et al., 2019), forward and backward.

Semantics are torchvision's ``torchvision.ops.deform_conv2d`` (= ONNX ``DeformConv``).

Memory: the CUDA kernels and the CPU backward sample into an im2col workspace of ``C_in * kh * kw``
rows (in the input type) that is filled chunk by chunk, whole samples at a time when a sample fits
in :data:`WORKSPACE_BYTES`, otherwise blocks of output rows of one sample. Any batch size works and
the extra memory stays about ``WORKSPACE_BYTES`` (at least one output row's columns), plus on CUDA a
copy of grad_out's chunk in the backward when a chunk holds several samples (``C_out`` rows beside
the columns' ``C_in * kh * kw``) and on the CPU a channels-last copy of the chunk's samples (and of
their gradient in the backward). The CPU forward is fused: each thread samples a block of output
positions into its own column tile (about 512 KiB) and multiplies it by the weight at once, so it
needs only those tiles, a packed copy of the weight and the channels-last copy of a chunk of
samples. This workspace and the output come from the CPU output cache, so repeated calls do not page
fresh memory in; it is bounded and released by :func:`fastnorm.set_cache_limit` /
:func:`fastnorm.empty_cache` and counted by :func:`fastnorm.cached_bytes`.

Threads: the CPU kernels use :func:`fastnorm.set_num_threads` threads (OpenMP); the forward's
matrix products run on these threads too (fastnorm's own micro-kernel, for the build's
instruction set: a build gives the same bits on every CPU it runs on; see docs/robustness.md,
Determinism; ``FASTNORM_GEMM_ISA=avx2|baseline`` selects a narrower kernel family, for tests).
The backward's two GEMMs use the same micro-kernel on the same threads (blocked along the
reduction in a fixed order, so no BLAS thread pool competes with the OpenMP threads and the
result does not depend on the thread count); on CUDA they run through CuPy (cuBLAS).

On CUDA, grad_x is accumulated with atomics, so it is not bitwise reproducible run to run.

CUDA precision: the columns are sampled in float32 (float64 for float64 input) and stored in the
input type; the GEMMs run in cuBLAS on the input type with float32 sums (float64 for float64).
float16/bfloat16 therefore run on tensor cores: products of half values, float32 sums, one
rounding of each result, the bias added in float32 before it (the columns and the backward's
column gradient are rounded to the half type too, grad_weight only once at the end). float32 is
full float32 by default; ``FASTNORM_TF32=1`` in the environment (read at each call, the format
of CuPy's ``CUPY_TF32``, which does not affect these GEMMs) lets its GEMMs use TF32 tensor cores
(inputs rounded to 10 mantissa bits, float32 sums: about float16's accuracy, several times
faster). Below compute capability 8.0 (no bfloat16 GEMMs in cuBLAS) bfloat16 operands are widened
to float32 copies for the GEMMs (same results, slower, more memory).
"""
from . import _validation as v
from ._cpu import deform_conv as cpu
from ._cuda import deform_conv as cuda
from ._dispatch import op, resolve
from ._kernels import DeformConvBackward, DeformConvForward

#: Upper bound, in bytes, of the im2col workspace of one call (at least one output row).
WORKSPACE_BYTES = 256 << 20


def out_size(size, kernel, stride, padding, dilation):
    """Output size along one spatial axis: (size + 2 padding - dilation (kernel - 1) - 1) //
    stride + 1 (also for fastnorm.torch's shape inference)."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _check(call, x, offset, weight, bias, mask, stride, padding, dilation):
    """Validate; returns the kernel's geometry arguments and the output shape."""
    v.float_array(call, "x", x, ndim=4)
    v.float_array(call, "offset", offset, ndim=4)
    v.float_array(call, "weight", weight, ndim=4)
    for name, a in (("offset", offset), ("weight", weight), ("bias", bias), ("mask", mask)):
        v.same_dtype(name, a, "x", x)
    sh, sw = v.pair("stride", stride, min=1)
    ph, pw = v.pair("padding", padding, min=0)
    dh, dw = v.pair("dilation", dilation, min=1)
    N, C, H, W = x.shape
    Cout, Cg, kh, kw = weight.shape
    if Cg < 1 or kh < 1 or kw < 1:
        raise ValueError(f"`weight` must have shape (C_out, C_in/groups, kh, kw) with positive "
                         f"C_in/groups, kh and kw, got {tuple(weight.shape)}")
    if C % Cg:
        raise ValueError(f"`weight`'s input channels ({Cg}) must divide the channels of `x` "
                         f"({C}), got weight shape {tuple(weight.shape)}")
    groups = C // Cg
    if Cout % groups:
        raise ValueError(f"`weight`'s output channels ({Cout}) must be divisible by the number "
                         f"of groups ({groups} = {C} // {Cg})")
    Ho, Wo = out_size(H, kh, sh, ph, dh), out_size(W, kw, sw, pw, dw)
    if Ho <= 0 or Wo <= 0:
        raise ValueError(f"the output size of `x` {tuple(x.shape)} with kernel ({kh}, {kw}), "
                         f"stride ({sh}, {sw}), padding ({ph}, {pw}), dilation ({dh}, {dw}) "
                         f"would be ({Ho}, {Wo}): it must be positive")
    K = kh * kw
    Goff = offset.shape[1] // (2 * K)
    if Goff < 1 or offset.shape[1] != 2 * K * Goff or C % Goff:
        raise ValueError(f"`offset` must have 2 * offset_groups * kh * kw = 2 * G * {K} channels "
                         f"with G dividing C_in ({C}), got {offset.shape[1]}")
    v.shape("offset", offset, (N, 2 * K * Goff, Ho, Wo))
    if mask is not None:
        v.float_array(call, "mask", mask, ndim=4)
        v.shape("mask", mask, (N, K * Goff, Ho, Wo))
    if bias is not None:
        v.float_array(call, "bias", bias, ndim=1)
        v.shape("bias", bias, (Cout,))
    # the columns are in the input type (half columns for half input on CUDA)
    rows = max(1, WORKSPACE_BYTES // max(1, C * K * Wo * x.dtype.itemsize))
    return dict(stride=(sh, sw), padding=(ph, pw), dilation=(dh, dw), chunk_rows=rows), \
        (N, Cout, Ho, Wo)


@op
def deform_conv2d(x, offset, weight, bias=None, *, mask=None, stride=1, padding=0, dilation=1):
    """Deformable 2-D convolution (DCN v1; v2 with ``mask``), torchvision/ONNX semantics.

    ``y[n, o, p] = bias[o] + sum_c sum_k weight[o, c, k] * mask[n, g, k, p]
    * x[n, c](p * stride - padding + k * dilation + offset[n, g, k, p])`` where ``x[n, c](.)`` is
    bilinear interpolation with zeros outside the map and g is the offset group of channel c.

    Parameters
    ----------
    x : array (N, C_in, H, W)
        NumPy, CuPy or DLPack tensor; float32/float64 (and float16/bfloat16 on CUDA: tensor-core
        GEMMs with float32 sums; see the module docstring for the precision of each dtype).
    offset : array (N, 2 * G * kh * kw, Ho, Wo)
        (dy, dx) per kernel point, kernel points in row-major order, for G offset groups
        (G = offset.shape[1] // (2 * kh * kw) must divide C_in).
    weight : array (C_out, C_in / groups, kh, kw)
        groups = C_in // weight.shape[1]; C_out must be divisible by groups.
    bias : array (C_out,), optional
    mask : array (N, G * kh * kw, Ho, Wo), optional
        Modulation scalars (DCN v2). Without it every kernel point has weight 1 (DCN v1).
    stride, padding, dilation : int or (int, int)
        ``Ho = (H + 2 * pad_h - dil_h * (kh - 1) - 1) // stride_h + 1`` (same for Wo).

    Returns
    -------
    y : array (N, C_out, Ho, Wo), dtype and framework of x

    Examples
    --------
    >>> import numpy as np, fastnorm
    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    >>> w = rng.standard_normal((6, 4, 3, 3)).astype(np.float32)
    >>> off = np.zeros((2, 18, 8, 8), np.float32)
    >>> y = fastnorm.deform_conv2d(x, off, w, padding=1)
    >>> y.shape
    (2, 6, 8, 8)
    """
    call, (x, offset, weight, bias, mask) = resolve(x=x, offset=offset, weight=weight, bias=bias,
                                                    mask=mask)
    geo, _ = _check(call, x, offset, weight, bias, mask, stride, padding, dilation)
    return call.wrap(call.run(cpu.forward, cuda.forward, DeformConvForward(
        x=x, offset=offset, mask=mask, weight=weight, bias=bias, **geo)))


@op
def deform_conv2d_backward(grad_out, x, offset, weight, *, mask=None, stride=1, padding=0,
                           dilation=1):
    """Gradients of :func:`deform_conv2d` with respect to all its inputs.

    Parameters
    ----------
    grad_out : array (N, C_out, Ho, Wo)
        Gradient of the loss with respect to the output.
    x, offset, weight, mask, stride, padding, dilation
        As in the forward call (the bias is not needed).

    Returns
    -------
    grad_x : array (N, C_in, H, W)
    grad_offset : array, shape of offset
    grad_mask : array, shape of mask, or None when no mask was given
    grad_weight : array, shape of weight
    grad_bias : array (C_out,)
        ``grad_out`` summed over batch and positions (the gradient a bias would get).

    Examples
    --------
    >>> import numpy as np, fastnorm
    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal((1, 2, 5, 5))
    >>> w = rng.standard_normal((3, 2, 3, 3))
    >>> off = rng.standard_normal((1, 18, 3, 3))
    >>> m = rng.random((1, 9, 3, 3))
    >>> gy = np.ones((1, 3, 3, 3))
    >>> gx, goff, gm, gw, gb = fastnorm.deform_conv2d_backward(gy, x, off, w, mask=m)
    >>> gx.shape, goff.shape, gm.shape, gw.shape, gb.tolist()
    ((1, 2, 5, 5), (1, 18, 3, 3), (1, 9, 3, 3), (3, 2, 3, 3), [9.0, 9.0, 9.0])
    """
    call, (grad_out, x, offset, weight, mask) = resolve(grad_out=grad_out, x=x, offset=offset,
                                                        weight=weight, mask=mask)
    geo, out_shape = _check(call, x, offset, weight, None, mask, stride, padding, dilation)
    v.float_array(call, "grad_out", grad_out, ndim=4)
    v.same_dtype("grad_out", grad_out, "x", x)
    v.shape("grad_out", grad_out, out_shape)
    return call.wrap(tuple(call.run(cpu.backward, cuda.backward, DeformConvBackward(
        grad_out=grad_out, x=x, offset=offset, mask=mask, weight=weight, **geo))))
