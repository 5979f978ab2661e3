"""PyTorch adapter: autograd Functions and drop-in ``nn.Module``s backed by fastnorm's kernels.

``import fastnorm.torch`` needs PyTorch (fastnorm itself does not). Tensors cross into fastnorm
through DLPack, without copies for contiguous tensors: CPU tensors run on the Cython/OpenMP
kernels, CUDA tensors on the CUDA kernels through CuPy, on PyTorch's current stream (so the
kernels are ordered with the surrounding PyTorch work; nothing is synchronised, with one
exception: RoIs given as one (K, 5) tensor have their batch indices checked on the host, which
reads one flag back from the device; per-image lists of (K_i, 4) boxes, torchvision's other form,
need no check and no synchronisation).

Functions (differentiable; rois/offsets of the RoI ops are not differentiated except the
deformable RoI pooling offset and mask):

=========================  ==========================================================
``group_norm``             ``torch.nn.functional.group_norm`` + fused ``activation``
``deform_conv2d``          ``torchvision.ops.deform_conv2d`` (DCN v1, v2 with ``mask``)
``roi_align``              ``torchvision.ops.roi_align`` (+ ``mode="max"``)
``roi_pool``               ``torchvision.ops.roi_pool``
``ps_roi_align``           ``torchvision.ops.ps_roi_align``
``deform_roi_pool``        mmcv ``deform_roi_pool`` (offset and modulation ``mask``)
=========================  ==========================================================

Modules: :class:`GroupNorm` (a ``torch.nn.GroupNorm`` subclass: same parameters, same
``state_dict``), :class:`DeformConv2d` (``torchvision.ops.DeformConv2d``: ``weight``, ``bias``),
:class:`ModulatedDeformConv2d` (mmcv ``ModulatedDeformConv2dPack``: ``weight``, ``bias``,
``conv_offset.weight``, ``conv_offset.bias``), :class:`RoIAlign`, :class:`RoIPool`,
:class:`PSRoIAlign` (no parameters, as in torchvision).

Dtypes are fastnorm's: float32/float64 on the CPU, plus float16/bfloat16 on CUDA. Double
backward is not supported (the backward passes are fastnorm kernels, not differentiable graphs).

Examples
--------
>>> import torch, fastnorm.torch as ft
>>> gn = ft.GroupNorm(4, 8)
>>> x = torch.randn(2, 8, 5, 5, requires_grad=True)
>>> gn(x).square().sum().backward()
>>> x.grad.shape, gn.weight.grad.shape
(torch.Size([2, 8, 5, 5]), torch.Size([8]))
"""
import contextlib
import math

import torch
from torch import nn
from torch.nn.modules.utils import _pair

import fastnorm as _fn

__all__ = ["group_norm", "deform_conv2d", "roi_align", "roi_pool", "ps_roi_align",
           "deform_roi_pool", "GroupNormFunction", "DeformConv2dFunction", "RoIAlignFunction",
           "RoIPoolFunction", "PSRoIAlignFunction", "DeformRoIPoolFunction", "GroupNorm",
           "DeformConv2d", "ModulatedDeformConv2d", "RoIAlign", "RoIPool", "PSRoIAlign"]


@contextlib.contextmanager
def _stream(t):
    """Run fastnorm's CuPy launches for CUDA tensor ``t`` on torch's current stream."""
    if not t.is_cuda:
        yield
        return
    import cupy
    dev = t.device.index if t.device.index is not None else torch.cuda.current_device()
    ptr = torch.cuda.current_stream(dev).cuda_stream
    with cupy.cuda.Device(dev), cupy.cuda.ExternalStream(ptr, dev):
        yield


def _c(t):
    """Contiguous view (autograd's incoming gradients may be expanded or strided)."""
    return None if t is None else t.contiguous()


def _rois(rois, ref):
    """torchvision's rois forms, in ref's dtype: a (K, 5) tensor, or a list of per-image (K_i, 4)
    tensors (fastnorm flattens those itself)."""
    if isinstance(rois, (list, tuple)):
        return [r.to(ref.dtype) for r in rois]
    return rois


# ---------------------------------------------------------------- autograd Functions

class GroupNormFunction(torch.autograd.Function):
    """``y = group_norm(x, G, weight, bias, eps, activation)`` with fastnorm's backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, num_groups, eps, activation):
        with _stream(x):
            y, mean, rstd = _fn.group_norm(x, num_groups, weight, bias, eps,
                                           activation=activation, return_stats=True)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.cfg = (num_groups, activation)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        G, activation = ctx.cfg
        with _stream(x):
            gx, gw, gb = _fn.group_norm_backward(_c(gy), x, mean, rstd, G, weight, bias,
                                                 activation=activation)
        return gx, gw, gb, None, None, None


class DeformConv2dFunction(torch.autograd.Function):
    """torchvision ``deform_conv2d`` with fastnorm's forward and backward."""

    @staticmethod
    def forward(ctx, x, offset, mask, weight, bias, stride, padding, dilation):
        with _stream(x):
            y = _fn.deform_conv2d(x, offset, weight, bias, mask=mask, stride=stride,
                                  padding=padding, dilation=dilation)
        ctx.save_for_backward(x, offset, mask, weight)
        ctx.cfg = (stride, padding, dilation, bias is not None)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, offset, mask, weight = ctx.saved_tensors
        stride, padding, dilation, has_bias = ctx.cfg
        with _stream(x):
            gx, goff, gm, gw, gb = _fn.deform_conv2d_backward(
                _c(gy), x, offset, weight, mask=mask, stride=stride, padding=padding,
                dilation=dilation)
        return gx, goff, gm, gw, (gb if has_bias else None), None, None, None


class RoIAlignFunction(torch.autograd.Function):
    """torchvision ``roi_align`` (plus mmcv's ``mode="max"``); gradient with respect to x."""

    @staticmethod
    def forward(ctx, x, rois, output_size, spatial_scale, sampling_ratio, aligned, mode):
        with _stream(x):
            y = _fn.roi_align(x, rois, output_size, spatial_scale, sampling_ratio, aligned,
                              mode=mode)
        ctx.save_for_backward(x if mode == "max" else None)
        ctx.rois = rois                 # a tensor, or a list of them
        ctx.cfg = (tuple(x.shape), output_size, spatial_scale, sampling_ratio, aligned, mode)
        return y

    @staticmethod
    def backward(ctx, gy):
        (x,), rois = ctx.saved_tensors, ctx.rois
        shape, out, scale, sr, aligned, mode = ctx.cfg
        with _stream(gy):
            gx = _fn.roi_align_backward(_c(gy), rois, shape, out, scale, sr, aligned, mode=mode,
                                        x=x)
        return gx, None, None, None, None, None, None


class RoIPoolFunction(torch.autograd.Function):
    """torchvision ``roi_pool``; gradient with respect to x (to each bin's argmax)."""

    @staticmethod
    def forward(ctx, x, rois, output_size, spatial_scale):
        with _stream(x):
            y = _fn.roi_pool(x, rois, output_size, spatial_scale)
        ctx.save_for_backward(x)
        ctx.rois = rois
        ctx.cfg = (output_size, spatial_scale)
        return y

    @staticmethod
    def backward(ctx, gy):
        (x,), rois = ctx.saved_tensors, ctx.rois
        out, scale = ctx.cfg
        with _stream(x):
            gx = _fn.roi_pool_backward(_c(gy), rois, tuple(x.shape), out, scale, x=x)
        return gx, None, None, None


class PSRoIAlignFunction(torch.autograd.Function):
    """torchvision ``ps_roi_align``; gradient with respect to x."""

    @staticmethod
    def forward(ctx, x, rois, output_size, spatial_scale, sampling_ratio):
        with _stream(x):
            y = _fn.ps_roi_align(x, rois, output_size, spatial_scale, sampling_ratio)
        ctx.rois = rois
        ctx.cfg = (tuple(x.shape), output_size, spatial_scale, sampling_ratio)
        return y

    @staticmethod
    def backward(ctx, gy):
        rois = ctx.rois
        shape, out, scale, sr = ctx.cfg
        with _stream(gy):
            gx = _fn.ps_roi_align_backward(_c(gy), rois, shape, out, scale, sr)
        return gx, None, None, None, None


class DeformRoIPoolFunction(torch.autograd.Function):
    """mmcv ``deform_roi_pool``; gradients with respect to x, offset and mask."""

    @staticmethod
    def forward(ctx, x, rois, offset, mask, output_size, spatial_scale, sampling_ratio, gamma):
        with _stream(x):
            y = _fn.deform_roi_pool(x, rois, offset, output_size, spatial_scale, sampling_ratio,
                                    gamma, mask=mask)
        ctx.save_for_backward(x, offset, mask)
        ctx.rois = rois
        ctx.cfg = (output_size, spatial_scale, sampling_ratio, gamma)
        return y

    @staticmethod
    def backward(ctx, gy):
        (x, offset, mask), rois = ctx.saved_tensors, ctx.rois
        out, scale, sr, gamma = ctx.cfg
        with _stream(x):
            gx, goff, gm = _fn.deform_roi_pool_backward(_c(gy), x, rois, offset, out, scale, sr,
                                                        gamma, mask=mask)
        return gx, None, goff, gm, None, None, None, None


# ---------------------------------------------------------------- functional API

def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, *, activation=None):
    """``torch.nn.functional.group_norm`` computed by fastnorm, optionally fused with
    ``activation`` (None, "relu" or "silu"); differentiable in x, weight and bias."""
    return GroupNormFunction.apply(x, weight, bias, num_groups, eps, activation)


def deform_conv2d(input, offset, weight, bias=None, stride=(1, 1), padding=(0, 0),
                  dilation=(1, 1), mask=None):
    """``torchvision.ops.deform_conv2d`` (same signature); differentiable in every tensor."""
    return DeformConv2dFunction.apply(input, offset, mask, weight, bias, _pair(stride),
                                      _pair(padding), _pair(dilation))


def roi_align(input, boxes, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False, *,
              mode="avg"):
    """``torchvision.ops.roi_align`` (boxes: (K, 5) tensor or list of (K_i, 4) tensors)."""
    return RoIAlignFunction.apply(input, _rois(boxes, input), _pair(output_size),
                                  float(spatial_scale), int(sampling_ratio), bool(aligned), mode)


def roi_pool(input, boxes, output_size, spatial_scale=1.0):
    """``torchvision.ops.roi_pool``."""
    return RoIPoolFunction.apply(input, _rois(boxes, input), _pair(output_size),
                                 float(spatial_scale))


def ps_roi_align(input, boxes, output_size, spatial_scale=1.0, sampling_ratio=-1):
    """``torchvision.ops.ps_roi_align``."""
    return PSRoIAlignFunction.apply(input, _rois(boxes, input), _pair(output_size),
                                    float(spatial_scale), int(sampling_ratio))


def deform_roi_pool(input, rois, offset=None, output_size=7, spatial_scale=1.0, sampling_ratio=0,
                    gamma=0.1, *, mask=None):
    """mmcv ``deform_roi_pool`` (offset (K, 2, PH, PW), optional mask (K, 1, PH, PW))."""
    return DeformRoIPoolFunction.apply(input, _rois(rois, input), offset, mask,
                                       _pair(output_size), float(spatial_scale),
                                       int(sampling_ratio), float(gamma))


# ---------------------------------------------------------------- modules

class GroupNorm(nn.GroupNorm):
    """Drop-in ``torch.nn.GroupNorm`` (same arguments, parameters and ``state_dict``) computed by
    fastnorm, with an optional fused ``activation`` ("relu" or "silu")."""

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, device=None, dtype=None,
                 activation=None):
        super().__init__(num_groups, num_channels, eps, affine, device, dtype)
        self.activation = activation

    def forward(self, input):
        return group_norm(input, self.num_groups, self.weight, self.bias, self.eps,
                          activation=self.activation)

    def extra_repr(self):
        act = f", activation={self.activation!r}" if self.activation else ""
        return super().extra_repr() + act


class DeformConv2d(nn.Module):
    """Drop-in ``torchvision.ops.DeformConv2d``: ``forward(input, offset, mask=None)``;
    parameters ``weight`` (C_out, C_in / groups, kh, kw) and ``bias`` (C_out,) or None,
    initialised as torchvision does."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, device=None, dtype=None):
        super().__init__()
        if in_channels % groups != 0:
            raise ValueError("in_channels must be divisible by groups")
        if out_channels % groups != 0:
            raise ValueError("out_channels must be divisible by groups")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.padding, self.dilation = _pair(padding), _pair(dilation)
        kw = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups,
                                               *self.kernel_size, **kw))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, **kw))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.weight[0].numel())
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, input, offset, mask=None):
        return deform_conv2d(input, offset, self.weight, self.bias, self.stride, self.padding,
                             self.dilation, mask)

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"groups={self.groups}, bias={self.bias is not None}")


class ModulatedDeformConv2d(DeformConv2d):
    """DCN v2 layer whose offsets and mask come from an internal convolution (mmcv
    ``ModulatedDeformConv2dPack``): ``conv_offset`` (a ``nn.Conv2d`` with the layer's kernel,
    stride, padding and dilation, 3 * deform_groups * kh * kw output channels, zero-initialised)
    gives ``offset = out[:, :2/3]`` and ``mask = sigmoid(out[:, 2/3:])``.

    ``state_dict`` keys: ``weight``, ``bias``, ``conv_offset.weight``, ``conv_offset.bias``
    (mmcv's). Weights are initialised as mmcv does (uniform(+-1/sqrt(C_in * kh * kw)), zero bias).
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, deform_groups=1, bias=True, device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias, device, dtype)
        self.deform_groups = deform_groups
        kh, kw = self.kernel_size
        self.conv_offset = nn.Conv2d(in_channels, 3 * deform_groups * kh * kw, self.kernel_size,
                                     self.stride, self.padding, self.dilation, bias=True,
                                     device=device, dtype=dtype)
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def reset_parameters(self):
        stdv = 1.0 / math.sqrt(self.in_channels * self.kernel_size[0] * self.kernel_size[1])
        nn.init.uniform_(self.weight, -stdv, stdv)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, input):
        out = self.conv_offset(input)
        n = 2 * out.shape[1] // 3
        return deform_conv2d(input, out[:, :n], self.weight, self.bias, self.stride,
                             self.padding, self.dilation, torch.sigmoid(out[:, n:]))

    def extra_repr(self):
        return super().extra_repr() + f", deform_groups={self.deform_groups}"


class _RoIModule(nn.Module):
    _fields = ()

    def extra_repr(self):
        return ", ".join(f"{k}={getattr(self, k)}" for k in self._fields)


class RoIAlign(_RoIModule):
    """Drop-in ``torchvision.ops.RoIAlign(output_size, spatial_scale, sampling_ratio,
    aligned=False)``; ``forward(input, rois)``. No parameters."""
    _fields = ("output_size", "spatial_scale", "sampling_ratio", "aligned")

    def __init__(self, output_size, spatial_scale, sampling_ratio, aligned=False):
        super().__init__()
        self.output_size, self.spatial_scale = output_size, spatial_scale
        self.sampling_ratio, self.aligned = sampling_ratio, aligned

    def forward(self, input, rois):
        return roi_align(input, rois, self.output_size, self.spatial_scale, self.sampling_ratio,
                         self.aligned)


class RoIPool(_RoIModule):
    """Drop-in ``torchvision.ops.RoIPool(output_size, spatial_scale)``."""
    _fields = ("output_size", "spatial_scale")

    def __init__(self, output_size, spatial_scale):
        super().__init__()
        self.output_size, self.spatial_scale = output_size, spatial_scale

    def forward(self, input, rois):
        return roi_pool(input, rois, self.output_size, self.spatial_scale)


class PSRoIAlign(_RoIModule):
    """Drop-in ``torchvision.ops.PSRoIAlign(output_size, spatial_scale, sampling_ratio)``."""
    _fields = ("output_size", "spatial_scale", "sampling_ratio")

    def __init__(self, output_size, spatial_scale, sampling_ratio):
        super().__init__()
        self.output_size, self.spatial_scale = output_size, spatial_scale
        self.sampling_ratio = sampling_ratio

    def forward(self, input, rois):
        return ps_roi_align(input, rois, self.output_size, self.spatial_scale,
                            self.sampling_ratio)
