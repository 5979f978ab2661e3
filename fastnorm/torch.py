"""PyTorch adapter: custom operators (``torch.ops.fastnorm.*``) and drop-in ``nn.Module``s backed
by fastnorm's kernels, usable eagerly, under ``torch.compile`` (``fullgraph=True``) and
``torch.export``.

``import fastnorm.torch`` needs PyTorch (fastnorm itself does not) and registers the operators.
Tensors cross into fastnorm through DLPack, without copies for contiguous tensors: CPU tensors
run on the Cython/OpenMP kernels, CUDA tensors on the CUDA kernels through CuPy, on PyTorch's
current stream (so the kernels are ordered with the surrounding PyTorch work; nothing is
synchronised, with one exception: the RoIs' batch indices are checked on the host, which reads
one flag back from the device). Per-image lists of (K_i, 4) boxes, torchvision's other RoI form,
are turned into one (K, 5) tensor first, as torchvision does.

Each op is a ``torch.library.custom_op`` in the ``fastnorm::`` namespace with a fake (shape)
implementation and, when differentiable, an autograd formula whose backward is a ``fastnorm::``
op too; none mutates its inputs, so compiled and exported graphs hold them as single nodes.
:func:`onnx_translation_table` exports them to ONNX (``torch.onnx.export(..., dynamo=True)``).

Functions (differentiable; rois/offsets of the RoI ops are not differentiated except the
deformable RoI pooling offset and mask; the NMS ops are not differentiable, and the number of
boxes they keep is a data-dependent size in compiled and exported graphs):

=========================  ==========================================================
``group_norm``             ``torch.nn.functional.group_norm`` + fused ``activation``
``deform_conv2d``          ``torchvision.ops.deform_conv2d`` (DCN v1, v2 with ``mask``)
``roi_align``              ``torchvision.ops.roi_align`` (+ ``mode="max"``)
``roi_pool``               ``torchvision.ops.roi_pool``
``ps_roi_align``           ``torchvision.ops.ps_roi_align``
``deform_roi_pool``        mmcv ``deform_roi_pool`` (offset and modulation ``mask``)
``nms``, ``batched_nms``   ``torchvision.ops.nms`` / ``batched_nms``
``roi_align_rotated``      detectron2 ``ROIAlignRotated`` / mmcv ``roi_align_rotated``
``box_iou_rotated``,       detectron2 ``pairwise_iou_rotated`` / ``nms_rotated`` /
``nms_rotated``,           ``batched_nms_rotated`` (rotated boxes (cx, cy, w, h, angle);
``batched_nms_rotated``    ``clockwise`` and ``angle_unit`` as in fastnorm)
``multi_scale_roi_align``  ``torchvision.ops.MultiScaleRoIAlign``'s pooling (a list of
                           feature tensors, finest first; ``aligned=True`` by default)
=========================  ==========================================================

Modules: :class:`GroupNorm` (a ``torch.nn.GroupNorm`` subclass: same parameters, same
``state_dict``), :class:`DeformConv2d` (``torchvision.ops.DeformConv2d``: ``weight``, ``bias``),
:class:`ModulatedDeformConv2d` (mmcv ``ModulatedDeformConv2dPack``: ``weight``, ``bias``,
``conv_offset.weight``, ``conv_offset.bias``), :class:`RoIAlign`, :class:`RoIPool`,
:class:`PSRoIAlign` (no parameters, as in torchvision), :class:`RoIAlignRotated` (detectron2's
``ROIAlignRotated``, mmcv's ``RoIAlignRotated``), :class:`MultiScaleRoIAlign` (torchvision's,
taking the pyramid as a list).

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
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

import fastnorm as _fn
from fastnorm.deform_conv import out_size

__all__ = ["group_norm", "deform_conv2d", "roi_align", "roi_pool", "ps_roi_align",
           "deform_roi_pool", "nms", "batched_nms", "roi_align_rotated", "box_iou_rotated",
           "nms_rotated", "batched_nms_rotated", "multi_scale_roi_align",
           "onnx_translation_table", "GroupNorm", "DeformConv2d", "ModulatedDeformConv2d",
           "RoIAlign", "RoIPool", "PSRoIAlign", "RoIAlignRotated", "MultiScaleRoIAlign"]


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


def _rois(rois, ref, width=4):
    """torchvision's rois forms as one (K, 1 + width) tensor [batch, box] in ref's dtype: a
    tensor as it is, a list of per-image (K_i, width) tensors with their image index prepended
    (as torchvision's convert_boxes_to_roi_format); ``width`` 5 for rotated boxes."""
    if not isinstance(rois, (list, tuple)):
        return rois
    if len(rois) == 0:
        raise ValueError(f"`rois` must be a (K, {width + 1}) tensor or a non-empty list of "
                         f"(K_i, {width}) tensors")
    return torch.cat([torch.cat([torch.full_like(r[:, :1], i, dtype=ref.dtype),
                                 r.to(ref.dtype)], 1) for i, r in enumerate(rois)])


# ---------------------------------------------------------------- custom operators
#
# Every op is a PyTorch custom operator in the ``fastnorm::`` namespace (torch.library): a real
# implementation that runs fastnorm's kernel on the tensors (through DLPack), a fake one that
# gives the output's shape and dtype from the inputs' alone (torch.compile, torch.export, meta
# tensors), and, for the differentiable ops, an autograd formula whose backward is itself a
# custom op. None of them mutates its inputs. Optional outputs (the gradient of an absent mask,
# weight or bias) are empty tensors inside the ops and None outside.

_EMPTY = (0,)


def _opt(t, ref):
    """An optional gradient as an op output: the tensor, or an empty placeholder."""
    return t if t is not None else ref.new_empty(_EMPTY)


def _act(activation):
    return None if activation == "none" else activation


def _stats_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# GroupNorm

@torch.library.custom_op("fastnorm::group_norm", mutates_args=())
def _group_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], num_groups: int,
                eps: float, activation: str) -> Tuple[Tensor, Tensor, Tensor]:
    with _stream(x):
        y, mean, rstd = _fn.group_norm(x, num_groups, weight, bias, eps,
                                       activation=_act(activation), return_stats=True)
    return y, mean, rstd


@_group_norm.register_fake
def _(x, weight, bias, num_groups, eps, activation):
    stats = x.new_empty((x.shape[0], num_groups), dtype=_stats_dtype(x))
    return torch.empty_like(x, memory_format=torch.contiguous_format), stats, stats.clone()


@torch.library.custom_op("fastnorm::group_norm_backward", mutates_args=())
def _group_norm_backward(grad_out: Tensor, x: Tensor, mean: Tensor, rstd: Tensor,
                         weight: Optional[Tensor], bias: Optional[Tensor], num_groups: int,
                         activation: str) -> Tuple[Tensor, Tensor, Tensor]:
    with _stream(x):
        gx, gw, gb = _fn.group_norm_backward(grad_out, x, mean, rstd, num_groups, weight, bias,
                                             activation=_act(activation))
    return gx, _opt(gw, x), _opt(gb, x)


@_group_norm_backward.register_fake
def _(grad_out, x, mean, rstd, weight, bias, num_groups, activation):
    gx = torch.empty_like(x, memory_format=torch.contiguous_format)
    return (gx, torch.empty_like(weight) if weight is not None else x.new_empty(_EMPTY),
            torch.empty_like(bias) if bias is not None else x.new_empty(_EMPTY))


def _group_norm_setup(ctx, inputs, output):
    x, weight, bias, num_groups, _, activation = inputs
    ctx.save_for_backward(x, weight, bias, output[1], output[2])
    ctx.cfg = (num_groups, activation)


def _group_norm_grad(ctx, gy, _gmean, _grstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    gx, gw, gb = _group_norm_backward(gy.contiguous(), x, mean, rstd, weight, bias, *ctx.cfg)
    return (gx, gw if weight is not None else None, gb if bias is not None else None, None,
            None, None)


_group_norm.register_autograd(_group_norm_grad, setup_context=_group_norm_setup)


# deformable convolution

@torch.library.custom_op("fastnorm::deform_conv2d", mutates_args=())
def _deform_conv2d(x: Tensor, offset: Tensor, mask: Optional[Tensor], weight: Tensor,
                   bias: Optional[Tensor], stride: List[int], padding: List[int],
                   dilation: List[int]) -> Tensor:
    with _stream(x):
        return _fn.deform_conv2d(x, offset, weight, bias, mask=mask, stride=tuple(stride),
                                 padding=tuple(padding), dilation=tuple(dilation))


@_deform_conv2d.register_fake
def _(x, offset, mask, weight, bias, stride, padding, dilation):
    return x.new_empty((x.shape[0], weight.shape[0]) + tuple(
        out_size(x.shape[2 + i], weight.shape[2 + i], stride[i], padding[i], dilation[i])
        for i in range(2)))


@torch.library.custom_op("fastnorm::deform_conv2d_backward", mutates_args=())
def _deform_conv2d_backward(grad_out: Tensor, x: Tensor, offset: Tensor, mask: Optional[Tensor],
                            weight: Tensor, stride: List[int], padding: List[int],
                            dilation: List[int]) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    with _stream(x):
        gx, goff, gm, gw, gb = _fn.deform_conv2d_backward(
            grad_out, x, offset, weight, mask=mask, stride=tuple(stride), padding=tuple(padding),
            dilation=tuple(dilation))
    return gx, goff, _opt(gm, x), gw, gb


@_deform_conv2d_backward.register_fake
def _(grad_out, x, offset, mask, weight, stride, padding, dilation):
    like = lambda t: torch.empty_like(t, memory_format=torch.contiguous_format)   # noqa: E731
    return (like(x), like(offset), like(mask) if mask is not None else x.new_empty(_EMPTY),
            like(weight), x.new_empty((weight.shape[0],)))


def _deform_conv2d_setup(ctx, inputs, output):
    x, offset, mask, weight, bias, stride, padding, dilation = inputs
    ctx.save_for_backward(x, offset, mask, weight)
    ctx.cfg = (stride, padding, dilation, bias is not None)


def _deform_conv2d_grad(ctx, gy):
    x, offset, mask, weight = ctx.saved_tensors
    stride, padding, dilation, has_bias = ctx.cfg
    gx, goff, gm, gw, gb = _deform_conv2d_backward(gy.contiguous(), x, offset, mask, weight,
                                                   stride, padding, dilation)
    return (gx, goff, gm if mask is not None else None, gw, gb if has_bias else None, None, None,
            None)


_deform_conv2d.register_autograd(_deform_conv2d_grad, setup_context=_deform_conv2d_setup)


# RoI ops: rois as one (K, 5) tensor [batch, x1, y1, x2, y2] (lists are converted before)

@torch.library.custom_op("fastnorm::roi_align", mutates_args=())
def _roi_align(x: Tensor, rois: Tensor, output_size: List[int], spatial_scale: float,
               sampling_ratio: int, aligned: bool, mode: str) -> Tensor:
    with _stream(x):
        return _fn.roi_align(x, rois, tuple(output_size), spatial_scale, sampling_ratio,
                             aligned, mode=mode)


def _pooled(x, rois, output_size, channels=None):
    """A RoI op's output: (K, C, oh, ow) of x's dtype and device (``channels``: C if not x's)."""
    return x.new_empty((rois.shape[0], x.shape[1] if channels is None else channels,
                        output_size[0], output_size[1]))


@_roi_align.register_fake
def _(x, rois, output_size, spatial_scale, sampling_ratio, aligned, mode):
    return _pooled(x, rois, output_size)


@torch.library.custom_op("fastnorm::roi_align_backward", mutates_args=())
def _roi_align_backward(grad_out: Tensor, rois: Tensor, input_shape: List[int],
                        output_size: List[int], spatial_scale: float, sampling_ratio: int,
                        aligned: bool, mode: str, x: Optional[Tensor]) -> Tensor:
    with _stream(grad_out):
        return _fn.roi_align_backward(grad_out, rois, tuple(input_shape), tuple(output_size),
                                      spatial_scale, sampling_ratio, aligned, mode=mode, x=x)


@_roi_align_backward.register_fake
def _(grad_out, rois, input_shape, output_size, spatial_scale, sampling_ratio, aligned, mode, x):
    return grad_out.new_empty(input_shape)


def _roi_autograd(op, backward, needs_x):
    """Register a RoI op's autograd formula: x's gradient by its ``backward`` op, none for the
    rois and the other arguments. x itself is saved only where ``needs_x(inputs)`` (the
    backward reads it: roi_align's mode "max", roi_pool's argmax); else its shape is enough."""
    def setup(ctx, inputs, output):
        x, rois = inputs[:2]
        ctx.save_for_backward(rois, x if needs_x(inputs) else None)
        ctx.shape, ctx.cfg = list(x.shape), inputs[2:]

    def grad(ctx, gy):
        rois, x = ctx.saved_tensors
        return ((backward(gy.contiguous(), rois, ctx.shape, *ctx.cfg, x),)
                + (None,) * (1 + len(ctx.cfg)))
    op.register_autograd(grad, setup_context=setup)


_roi_autograd(_roi_align, _roi_align_backward, lambda inputs: inputs[6] == "max")


@torch.library.custom_op("fastnorm::roi_pool", mutates_args=())
def _roi_pool(x: Tensor, rois: Tensor, output_size: List[int], spatial_scale: float) -> Tensor:
    with _stream(x):
        return _fn.roi_pool(x, rois, tuple(output_size), spatial_scale)


@_roi_pool.register_fake
def _(x, rois, output_size, spatial_scale):
    return _pooled(x, rois, output_size)


@torch.library.custom_op("fastnorm::roi_pool_backward", mutates_args=())
def _roi_pool_backward(grad_out: Tensor, rois: Tensor, input_shape: List[int],
                       output_size: List[int], spatial_scale: float,
                       x: Optional[Tensor]) -> Tensor:
    with _stream(grad_out):
        return _fn.roi_pool_backward(grad_out, rois, tuple(input_shape), tuple(output_size),
                                     spatial_scale, x=x)


@_roi_pool_backward.register_fake
def _(grad_out, rois, input_shape, output_size, spatial_scale, x):
    return grad_out.new_empty(input_shape)


_roi_autograd(_roi_pool, _roi_pool_backward, lambda inputs: True)


@torch.library.custom_op("fastnorm::ps_roi_align", mutates_args=())
def _ps_roi_align(x: Tensor, rois: Tensor, output_size: List[int], spatial_scale: float,
                  sampling_ratio: int) -> Tensor:
    with _stream(x):
        return _fn.ps_roi_align(x, rois, tuple(output_size), spatial_scale, sampling_ratio)


@_ps_roi_align.register_fake
def _(x, rois, output_size, spatial_scale, sampling_ratio):
    return _pooled(x, rois, output_size, x.shape[1] // (output_size[0] * output_size[1]))


@torch.library.custom_op("fastnorm::ps_roi_align_backward", mutates_args=())
def _ps_roi_align_backward(grad_out: Tensor, rois: Tensor, input_shape: List[int],
                           output_size: List[int], spatial_scale: float, sampling_ratio: int,
                           x: Optional[Tensor]) -> Tensor:
    with _stream(grad_out):
        return _fn.ps_roi_align_backward(grad_out, rois, tuple(input_shape), tuple(output_size),
                                         spatial_scale, sampling_ratio)


@_ps_roi_align_backward.register_fake
def _(grad_out, rois, input_shape, output_size, spatial_scale, sampling_ratio, x):
    return grad_out.new_empty(input_shape)


_roi_autograd(_ps_roi_align, _ps_roi_align_backward, lambda inputs: False)


@torch.library.custom_op("fastnorm::deform_roi_pool", mutates_args=())
def _deform_roi_pool(x: Tensor, rois: Tensor, offset: Optional[Tensor], mask: Optional[Tensor],
                     output_size: List[int], spatial_scale: float, sampling_ratio: int,
                     gamma: float) -> Tensor:
    with _stream(x):
        return _fn.deform_roi_pool(x, rois, offset, tuple(output_size), spatial_scale,
                                   sampling_ratio, gamma, mask=mask)


@_deform_roi_pool.register_fake
def _(x, rois, offset, mask, output_size, spatial_scale, sampling_ratio, gamma):
    return _pooled(x, rois, output_size)


@torch.library.custom_op("fastnorm::deform_roi_pool_backward", mutates_args=())
def _deform_roi_pool_backward(grad_out: Tensor, x: Tensor, rois: Tensor, offset: Optional[Tensor],
                              mask: Optional[Tensor], output_size: List[int],
                              spatial_scale: float, sampling_ratio: int,
                              gamma: float) -> Tuple[Tensor, Tensor, Tensor]:
    with _stream(x):
        gx, goff, gm = _fn.deform_roi_pool_backward(grad_out, x, rois, offset, tuple(output_size),
                                                    spatial_scale, sampling_ratio, gamma,
                                                    mask=mask)
    return gx, _opt(goff, x), _opt(gm, x)


@_deform_roi_pool_backward.register_fake
def _(grad_out, x, rois, offset, mask, output_size, spatial_scale, sampling_ratio, gamma):
    like = lambda t: (torch.empty_like(t, memory_format=torch.contiguous_format)  # noqa: E731
                      if t is not None else x.new_empty(_EMPTY))
    return like(x), like(offset), like(mask)


def _deform_roi_pool_setup(ctx, inputs, output):
    x, rois, offset, mask = inputs[:4]
    ctx.save_for_backward(x, rois, offset, mask)
    ctx.cfg = inputs[4:]


def _deform_roi_pool_grad(ctx, gy):
    x, rois, offset, mask = ctx.saved_tensors
    gx, goff, gm = _deform_roi_pool_backward(gy.contiguous(), x, rois, offset, mask, *ctx.cfg)
    return (gx, None, goff if offset is not None else None, gm if mask is not None else None,
            None, None, None, None)


_deform_roi_pool.register_autograd(_deform_roi_pool_grad, setup_context=_deform_roi_pool_setup)


# NMS (not differentiable; the number of kept boxes is data-dependent)

@torch.library.custom_op("fastnorm::nms", mutates_args=())
def _nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    with _stream(boxes):
        return _fn.nms(boxes, scores, iou_threshold)


@_nms.register_fake
def _(boxes, scores, iou_threshold):
    return _kept(boxes)


@torch.library.custom_op("fastnorm::batched_nms", mutates_args=())
def _batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    with _stream(boxes):
        return _fn.batched_nms(boxes, scores, idxs, iou_threshold)


@_batched_nms.register_fake
def _(boxes, scores, idxs, iou_threshold):
    return _kept(boxes)


def _kept(boxes):
    """An NMS op's output: int64 indices of a data-dependent count."""
    return boxes.new_empty((torch.library.get_ctx().new_dynamic_size(),), dtype=torch.int64)


# Rotated boxes (cx, cy, w, h, angle); ``clockwise`` and ``angle_unit`` as in fastnorm

@torch.library.custom_op("fastnorm::roi_align_rotated", mutates_args=())
def _roi_align_rotated(x: Tensor, rois: Tensor, output_size: List[int], spatial_scale: float,
                       sampling_ratio: int, aligned: bool, clockwise: bool,
                       angle_unit: str) -> Tensor:
    with _stream(x):
        return _fn.roi_align_rotated(x, rois, tuple(output_size), spatial_scale, sampling_ratio,
                                     aligned, clockwise=clockwise, angle_unit=angle_unit)


@_roi_align_rotated.register_fake
def _(x, rois, output_size, spatial_scale, sampling_ratio, aligned, clockwise, angle_unit):
    return _pooled(x, rois, output_size)


@torch.library.custom_op("fastnorm::roi_align_rotated_backward", mutates_args=())
def _roi_align_rotated_backward(grad_out: Tensor, rois: Tensor, input_shape: List[int],
                                output_size: List[int], spatial_scale: float,
                                sampling_ratio: int, aligned: bool, clockwise: bool,
                                angle_unit: str, x: Optional[Tensor]) -> Tensor:
    with _stream(grad_out):
        return _fn.roi_align_rotated_backward(
            grad_out, rois, tuple(input_shape), tuple(output_size), spatial_scale,
            sampling_ratio, aligned, clockwise=clockwise, angle_unit=angle_unit)


@_roi_align_rotated_backward.register_fake
def _(grad_out, rois, input_shape, output_size, spatial_scale, sampling_ratio, aligned,
      clockwise, angle_unit, x):
    return grad_out.new_empty(input_shape)


_roi_autograd(_roi_align_rotated, _roi_align_rotated_backward, lambda inputs: False)


# Multi-scale RoIAlign over a feature pyramid (torchvision's MultiScaleRoIAlign); the levels'
# shapes travel to the backward flattened (4 ints per level: the schema has no int[][])

@torch.library.custom_op("fastnorm::multi_scale_roi_align", mutates_args=())
def _multi_scale_roi_align(features: List[Tensor], rois: Tensor, output_size: List[int],
                           spatial_scales: Optional[List[float]], canonical_scale: float,
                           canonical_level: int, sampling_ratio: int, aligned: bool) -> Tensor:
    with _stream(rois):
        return _fn.multi_scale_roi_align(
            list(features), rois, tuple(output_size), spatial_scales=spatial_scales,
            canonical_scale=canonical_scale, canonical_level=canonical_level,
            sampling_ratio=sampling_ratio, aligned=aligned)


@_multi_scale_roi_align.register_fake
def _(features, rois, output_size, spatial_scales, canonical_scale, canonical_level,
      sampling_ratio, aligned):
    return _pooled(features[0], rois, output_size)


@torch.library.custom_op("fastnorm::multi_scale_roi_align_backward", mutates_args=())
def _multi_scale_roi_align_backward(grad_out: Tensor, rois: Tensor, input_shapes: List[int],
                                    output_size: List[int],
                                    spatial_scales: Optional[List[float]],
                                    canonical_scale: float, canonical_level: int,
                                    sampling_ratio: int, aligned: bool) -> List[Tensor]:
    shapes = [tuple(input_shapes[i:i + 4]) for i in range(0, len(input_shapes), 4)]
    with _stream(grad_out):
        return _fn.multi_scale_roi_align_backward(
            grad_out, rois, shapes, tuple(output_size), spatial_scales=spatial_scales,
            canonical_scale=canonical_scale, canonical_level=canonical_level,
            sampling_ratio=sampling_ratio, aligned=aligned)


@_multi_scale_roi_align_backward.register_fake
def _(grad_out, rois, input_shapes, output_size, spatial_scales, canonical_scale,
      canonical_level, sampling_ratio, aligned):
    return [grad_out.new_empty(input_shapes[i:i + 4]) for i in range(0, len(input_shapes), 4)]


def _multi_scale_setup(ctx, inputs, output):
    features, rois = inputs[:2]
    ctx.save_for_backward(rois)
    ctx.shapes = [d for f in features for d in f.shape]
    ctx.cfg = inputs[2:]


def _multi_scale_grad(ctx, gy):
    rois, = ctx.saved_tensors
    grads = _multi_scale_roi_align_backward(gy.contiguous(), rois, ctx.shapes, *ctx.cfg)
    return (list(grads),) + (None,) * (1 + len(ctx.cfg))


_multi_scale_roi_align.register_autograd(_multi_scale_grad, setup_context=_multi_scale_setup)


@torch.library.custom_op("fastnorm::box_iou_rotated", mutates_args=())
def _box_iou_rotated(a: Tensor, b: Tensor, clockwise: bool, angle_unit: str) -> Tensor:
    with _stream(a):
        return _fn.box_iou_rotated(a, b, clockwise=clockwise, angle_unit=angle_unit)


@_box_iou_rotated.register_fake
def _(a, b, clockwise, angle_unit):
    return a.new_empty((a.shape[0], b.shape[0]))


@torch.library.custom_op("fastnorm::nms_rotated", mutates_args=())
def _nms_rotated(boxes: Tensor, scores: Tensor, iou_threshold: float, clockwise: bool,
                 angle_unit: str) -> Tensor:
    with _stream(boxes):
        return _fn.nms_rotated(boxes, scores, iou_threshold, clockwise=clockwise,
                               angle_unit=angle_unit)


@_nms_rotated.register_fake
def _(boxes, scores, iou_threshold, clockwise, angle_unit):
    return _kept(boxes)


@torch.library.custom_op("fastnorm::batched_nms_rotated", mutates_args=())
def _batched_nms_rotated(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float,
                         clockwise: bool, angle_unit: str) -> Tensor:
    with _stream(boxes):
        return _fn.batched_nms_rotated(boxes, scores, idxs, iou_threshold, clockwise=clockwise,
                                       angle_unit=angle_unit)


@_batched_nms_rotated.register_fake
def _(boxes, scores, idxs, iou_threshold, clockwise, angle_unit):
    return _kept(boxes)


# ---------------------------------------------------------------- functional API

def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, *, activation=None):
    """``torch.nn.functional.group_norm`` computed by fastnorm, optionally fused with
    ``activation`` (None, "relu" or "silu"); differentiable in x, weight and bias."""
    return _group_norm(x, weight, bias, int(num_groups), float(eps),
                       "none" if activation is None else activation)[0]


def deform_conv2d(input, offset, weight, bias=None, stride=(1, 1), padding=(0, 0),
                  dilation=(1, 1), mask=None):
    """``torchvision.ops.deform_conv2d`` (same signature); differentiable in every tensor."""
    return _deform_conv2d(input, offset, mask, weight, bias, list(_pair(stride)),
                          list(_pair(padding)), list(_pair(dilation)))


def roi_align(input, boxes, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False, *,
              mode="avg"):
    """``torchvision.ops.roi_align`` (boxes: (K, 5) tensor or list of (K_i, 4) tensors)."""
    return _roi_align(input, _rois(boxes, input), list(_pair(output_size)), float(spatial_scale),
                      int(sampling_ratio), bool(aligned), mode)


def roi_pool(input, boxes, output_size, spatial_scale=1.0):
    """``torchvision.ops.roi_pool``."""
    return _roi_pool(input, _rois(boxes, input), list(_pair(output_size)), float(spatial_scale))


def ps_roi_align(input, boxes, output_size, spatial_scale=1.0, sampling_ratio=-1):
    """``torchvision.ops.ps_roi_align``."""
    return _ps_roi_align(input, _rois(boxes, input), list(_pair(output_size)),
                         float(spatial_scale), int(sampling_ratio))


def deform_roi_pool(input, rois, offset=None, output_size=7, spatial_scale=1.0, sampling_ratio=0,
                    gamma=0.1, *, mask=None):
    """mmcv ``deform_roi_pool`` (offset (K, 2, PH, PW), optional mask (K, 1, PH, PW))."""
    return _deform_roi_pool(input, _rois(rois, input), offset, mask, list(_pair(output_size)),
                            float(spatial_scale), int(sampling_ratio), float(gamma))


def nms(boxes, scores, iou_threshold):
    """``torchvision.ops.nms``: int64 indices of the kept boxes by decreasing score."""
    return _nms(boxes, scores, float(iou_threshold))


def batched_nms(boxes, scores, idxs, iou_threshold):
    """``torchvision.ops.batched_nms``: class-aware (boxes of different ``idxs`` never
    interact), int64 indices by decreasing score."""
    return _batched_nms(boxes, scores, idxs, float(iou_threshold))


def roi_align_rotated(input, rois, output_size, spatial_scale=1.0, sampling_ratio=-1,
                      aligned=True, *, clockwise=False, angle_unit="degrees"):
    """detectron2 ``ROIAlignRotated`` / mmcv ``roi_align_rotated`` (rois: (K, 6) tensor
    [batch, cx, cy, w, h, angle] or list of (K_i, 5) tensors); differentiable in input."""
    return _roi_align_rotated(input, _rois(rois, input, 5), list(_pair(output_size)),
                              float(spatial_scale), int(sampling_ratio), bool(aligned),
                              bool(clockwise), angle_unit)


def multi_scale_roi_align(features, boxes, output_size, *, spatial_scales=None,
                          canonical_scale=224, canonical_level=4, sampling_ratio=2, aligned=True):
    """torchvision ``MultiScaleRoIAlign``'s pooling (see :func:`fastnorm.multi_scale_roi_align`)
    on a list of NCHW feature tensors (finest level first); boxes: (K, 5) tensor or list of
    (K_i, 4) tensors; differentiable in every level. ``aligned`` defaults to True (torchvision
    uses False)."""
    features = list(features.values()) if isinstance(features, dict) else list(features)
    if not features:
        raise ValueError("`features` must hold at least one pyramid level, got an empty list")
    return _multi_scale_roi_align(
        features, _rois(boxes, features[0]), list(_pair(output_size)),
        None if spatial_scales is None else [float(s) for s in spatial_scales],
        float(canonical_scale), int(canonical_level), int(sampling_ratio), bool(aligned))


def box_iou_rotated(boxes1, boxes2, *, clockwise=False, angle_unit="degrees"):
    """IoU (N, M) of rotated boxes (cx, cy, w, h, angle) (detectron2 ``pairwise_iou_rotated``)."""
    return _box_iou_rotated(boxes1, boxes2, bool(clockwise), angle_unit)


def nms_rotated(boxes, scores, iou_threshold, *, clockwise=False, angle_unit="degrees"):
    """detectron2 ``nms_rotated``: int64 indices of the kept rotated boxes by decreasing score."""
    return _nms_rotated(boxes, scores, float(iou_threshold), bool(clockwise), angle_unit)


def batched_nms_rotated(boxes, scores, idxs, iou_threshold, *, clockwise=False,
                        angle_unit="degrees"):
    """detectron2 ``batched_nms_rotated``: class-aware rotated NMS (exact, no offset trick)."""
    return _batched_nms_rotated(boxes, scores, idxs, float(iou_threshold), bool(clockwise),
                                angle_unit)


# ---------------------------------------------------------------- ONNX export

# The fastnorm-domain nodes of the ONNX export: name -> (inputs, optional inputs, attributes,
# output); an input or output is a name of type T (the float type) or a (name, type) pair
_INDICES = ("indices", "tensor(int64)")
_ROTATED = (("clockwise", "INT"), ("angle_unit", "STRING"))
_ONNX_CUSTOM = {
    "RoIAlign": (("X", "rois"), (), (("output_size", "INTS"), ("spatial_scale", "FLOAT"),
                                     ("sampling_ratio", "INT"), ("aligned", "INT"),
                                     ("mode", "STRING"))),
    "PSRoIAlign": (("X", "rois"), (), (("output_size", "INTS"), ("spatial_scale", "FLOAT"),
                                       ("sampling_ratio", "INT"))),
    "DeformRoIPool": (("X", "rois"), ("offset", "mask"),
                      (("output_size", "INTS"), ("spatial_scale", "FLOAT"),
                       ("sampling_ratio", "INT"), ("gamma", "FLOAT"))),
    "RoIAlignRotated": (("X", "rois"), (), (("output_size", "INTS"), ("spatial_scale", "FLOAT"),
                                            ("sampling_ratio", "INT"), ("aligned", "INT"))
                        + _ROTATED),
    "BoxIouRotated": (("boxes1", "boxes2"), (), _ROTATED),
    "NMSRotated": (("boxes", "scores"), (), (("iou_threshold", "FLOAT"),) + _ROTATED, _INDICES),
    "BatchedNMSRotated": (("boxes", "scores", ("idxs", "tensor(int64)")), (),
                          (("iou_threshold", "FLOAT"),) + _ROTATED, _INDICES),
    # one variadic input (a name ending in "..."): rois, then the pyramid's levels, finest
    # first (onnxscript binds a variadic after a plain input wrongly)
    "MultiScaleRoIAlign": (("rois_and_features...",), (),
                           (("output_size", "INTS"), ("spatial_scales", "FLOATS"),
                            ("canonical_scale", "FLOAT"), ("canonical_level", "INT"),
                            ("sampling_ratio", "INT"), ("aligned", "INT"))),
}


def _register_onnx_schemas():
    """Declare the fastnorm-domain nodes to onnx (once), so that onnxscript can emit them."""
    from onnx import defs
    S = defs.OpSchema
    def param(p, **kw):
        name, typ = (p, "T") if isinstance(p, str) else p
        if name.endswith("..."):                    # a variadic input
            name, kw = name[:-3], dict(kw, param_option=S.FormalParameterOption.Variadic)
        return S.FormalParameter(name, typ, **kw)
    for name, (inputs, optional, attrs, *output) in _ONNX_CUSTOM.items():
        if defs.has(name, "fastnorm"):
            continue
        params = [param(p) for p in inputs] + [
            param(p, param_option=S.FormalParameterOption.Optional) for p in optional]
        defs.register_schema(S(
            name, "fastnorm", 1, inputs=params, outputs=[param(output[0] if output else "Y")],
            type_constraints=[("T", ["tensor(float)", "tensor(double)", "tensor(float16)",
                                     "tensor(bfloat16)"], "")],
            attributes=[S.Attribute(a, getattr(S.AttrType, t), "", required=True)
                        for a, t in attrs]))


def onnx_translation_table():
    """The ``custom_translation_table`` for ``torch.onnx.export(..., dynamo=True,
    opset_version=21)`` (needs onnxscript): each ``fastnorm::`` op as standard ONNX operators
    where the semantics agree, else as a node of the custom domain ``fastnorm`` (which ONNX
    Runtime cannot run without a custom-op library).

    ==================  ===============================================================
    ``group_norm``      ``GroupNormalization`` (opset 21: per-channel scale and bias), then
                        ``x * Sigmoid(x)`` ("silu", no fused SiLU in ONNX) or ``Relu``
    ``deform_conv2d``   ``DeformConv`` (opset 19; the same (dy, dx) offset layout)
    ``roi_align``       ``RoiAlign`` (opset 16): ``coordinate_transformation_mode``
                        "half_pixel" when aligned, else "output_half_pixel";
                        ``sampling_ratio`` <= 0 becomes ONNX's adaptive 0. ``mode="max"``
                        (mmcv: max of the sampled values, not ONNX's max) is
                        ``fastnorm::RoIAlign``
    ``roi_pool``        ``MaxRoiPool`` (torchvision's rounding)
    ``nms``             ``NonMaxSuppression`` on one class, column 2 of its selection
    ``batched_nms``     ``NonMaxSuppression`` over the classes (a one-hot of ``idxs`` masks
                        the scores: exact, no coordinate-offset trick), then ``TopK`` by score
    ``ps_roi_align``    ``fastnorm::PSRoIAlign`` (no ONNX operator)
    ``deform_roi_pool`` ``fastnorm::DeformRoIPool`` (no ONNX operator)
    rotated boxes       ``fastnorm::RoIAlignRotated``, ``fastnorm::BoxIouRotated``,
                        ``fastnorm::NMSRotated``, ``fastnorm::BatchedNMSRotated`` (no ONNX
                        operator; ``clockwise`` as an int attribute)
    ``multi_scale_...`` ``fastnorm::MultiScaleRoIAlign(rois, *features)`` (no ONNX operator;
                        one variadic input: rois, then the levels; ``spatial_scales``
                        always explicit)
    ==================  ===============================================================

    The NMS translations drop boxes whose score is NaN or -inf (ONNX's score threshold),
    where fastnorm keeps them last; IoU there is ONNX Runtime's float32.
    """
    import numpy as np
    import onnxscript
    from onnxscript import ir
    from onnxscript import opset21 as op

    custom = onnxscript.values.Opset(domain="fastnorm", version=1)
    _register_onnx_schemas()

    def ints(*v):
        return op.Constant(value_ints=list(v))

    def column(t, lo, hi):                   # t[:, lo:hi]
        return op.Slice(t, ints(lo), ints(hi), ints(1))

    def channels_of(x, value):               # (C,) filled with value, x's dtype
        c = op.Slice(op.Shape(x), ints(1), ints(2))
        return op.CastLike(op.ConstantOfShape(c, value=ir.tensor(np.array([value], np.float32))),
                           x)

    def group_norm(x, weight, bias, num_groups, eps, activation):
        y = op.GroupNormalization(x, channels_of(x, 1.0) if weight is None else weight,
                                  channels_of(x, 0.0) if bias is None else bias,
                                  num_groups=num_groups, epsilon=eps)
        if activation == "silu":
            y = op.Mul(y, op.Sigmoid(y))
        elif activation == "relu":
            y = op.Relu(y)
        # the statistics outputs (unused in inference graphs, removed by the optimiser)
        xg = op.Reshape(x, op.Concat(op.Slice(op.Shape(x), ints(0), ints(1)),
                                     ints(num_groups, -1), axis=0))
        mean = op.ReduceMean(xg, ints(2), keepdims=0)
        d = op.Sub(xg, op.Unsqueeze(mean, ints(2)))
        var = op.ReduceMean(op.Mul(d, d), ints(2), keepdims=0)
        rstd = op.Reciprocal(op.Sqrt(op.Add(var, op.CastLike(op.Constant(value_float=eps), var))))
        return y, mean, rstd

    def deform_conv2d(x, offset, mask, weight, bias, stride, padding, dilation):
        kh, kw = weight.shape[2], weight.shape[3]
        return op.DeformConv(x, weight, offset, bias, mask, dilations=list(dilation),
                             group=x.shape[1] // weight.shape[1],
                             offset_group=offset.shape[1] // (2 * kh * kw), kernel_shape=[kh, kw],
                             pads=[padding[0], padding[1], padding[0], padding[1]],
                             strides=list(stride))

    def roi_align(x, rois, output_size, spatial_scale, sampling_ratio, aligned, mode):
        if mode != "avg":
            return custom.RoIAlign(x, rois, output_size=list(output_size),
                                   spatial_scale=spatial_scale, sampling_ratio=sampling_ratio,
                                   aligned=int(aligned), mode=mode)
        batch = op.Cast(op.Squeeze(column(rois, 0, 1), ints(1)), to=ir.DataType.INT64)
        return op.RoiAlign(x, column(rois, 1, 5), batch, mode="avg",
                           output_height=output_size[0], output_width=output_size[1],
                           sampling_ratio=max(sampling_ratio, 0), spatial_scale=spatial_scale,
                           coordinate_transformation_mode="half_pixel" if aligned
                           else "output_half_pixel")

    def roi_pool(x, rois, output_size, spatial_scale):
        return op.MaxRoiPool(x, rois, pooled_shape=list(output_size), spatial_scale=spatial_scale)

    def ps_roi_align(x, rois, output_size, spatial_scale, sampling_ratio):
        return custom.PSRoIAlign(x, rois, output_size=list(output_size),
                                 spatial_scale=spatial_scale, sampling_ratio=sampling_ratio)

    def deform_roi_pool(x, rois, offset, mask, output_size, spatial_scale, sampling_ratio, gamma):
        return custom.DeformRoIPool(x, rois, offset, mask, output_size=list(output_size),
                                    spatial_scale=spatial_scale, sampling_ratio=sampling_ratio,
                                    gamma=gamma)

    def selected(boxes, scores, iou_threshold):   # scores (1, classes, N) -> kept box indices
        sel = op.NonMaxSuppression(op.Unsqueeze(boxes, ints(0)), scores,
                                   op.Slice(op.Shape(boxes), ints(0), ints(1)),
                                   op.Constant(value_floats=[iou_threshold]),
                                   op.Constant(value_floats=[float(np.finfo(np.float32).min)]))
        return op.Squeeze(column(sel, 2, 3), ints(1))

    def nms(boxes, scores, iou_threshold):
        return selected(boxes, op.Unsqueeze(scores, ints(0, 1)), iou_threshold)

    def batched_nms(boxes, scores, idxs, iou_threshold):
        classes = op.Add(op.ReduceMax(idxs, keepdims=1), ints(1))
        mine = op.Cast(op.OneHot(idxs, classes, ints(0, 1), axis=0), to=ir.DataType.BOOL)
        masked = op.Where(mine, op.Unsqueeze(scores, ints(0)),
                          op.CastLike(op.Constant(value_float=float("-inf")), scores))
        keep = selected(boxes, op.Unsqueeze(masked, ints(0)), iou_threshold)
        _, order = op.TopK(op.Gather(scores, keep), op.Shape(keep), axis=0, largest=1, sorted=1)
        return op.Gather(keep, order)

    def roi_align_rotated(x, rois, output_size, spatial_scale, sampling_ratio, aligned, clockwise,
                          angle_unit):
        return custom.RoIAlignRotated(x, rois, output_size=list(output_size),
                                      spatial_scale=spatial_scale, sampling_ratio=sampling_ratio,
                                      aligned=int(aligned), clockwise=int(clockwise),
                                      angle_unit=angle_unit)

    def multi_scale_roi_align(features, rois, output_size, spatial_scales, canonical_scale,
                              canonical_level, sampling_ratio, aligned):
        scales = spatial_scales or [2.0 ** -(2 + i) for i in range(len(features))]
        return custom.MultiScaleRoIAlign(rois, *features, output_size=list(output_size),
                                         spatial_scales=[float(v) for v in scales],
                                         canonical_scale=canonical_scale,
                                         canonical_level=canonical_level,
                                         sampling_ratio=sampling_ratio, aligned=int(aligned))

    def box_iou_rotated(a, b, clockwise, angle_unit):
        return custom.BoxIouRotated(a, b, clockwise=int(clockwise), angle_unit=angle_unit)

    def nms_rotated(boxes, scores, iou_threshold, clockwise, angle_unit):
        return custom.NMSRotated(boxes, scores, iou_threshold=iou_threshold,
                                 clockwise=int(clockwise), angle_unit=angle_unit)

    def batched_nms_rotated(boxes, scores, idxs, iou_threshold, clockwise, angle_unit):
        return custom.BatchedNMSRotated(boxes, scores, idxs, iou_threshold=iou_threshold,
                                        clockwise=int(clockwise), angle_unit=angle_unit)

    ops = torch.ops.fastnorm
    return {ops.group_norm.default: group_norm, ops.deform_conv2d.default: deform_conv2d,
            ops.roi_align.default: roi_align, ops.roi_pool.default: roi_pool,
            ops.ps_roi_align.default: ps_roi_align, ops.deform_roi_pool.default: deform_roi_pool,
            ops.nms.default: nms, ops.batched_nms.default: batched_nms,
            ops.roi_align_rotated.default: roi_align_rotated,
            ops.box_iou_rotated.default: box_iou_rotated, ops.nms_rotated.default: nms_rotated,
            ops.batched_nms_rotated.default: batched_nms_rotated,
            ops.multi_scale_roi_align.default: multi_scale_roi_align}


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


class RoIAlignRotated(_RoIModule):
    """detectron2 ``ROIAlignRotated(output_size, spatial_scale, sampling_ratio)`` (always
    aligned) and mmcv ``RoIAlignRotated(output_size, spatial_scale, sampling_ratio, aligned,
    clockwise)`` (angles in radians: ``angle_unit="radians"``); ``forward(input, rois)``, rois
    (K, 6) [batch, cx, cy, w, h, angle] or a list of (K_i, 5). No parameters."""
    _fields = ("output_size", "spatial_scale", "sampling_ratio", "aligned", "clockwise",
               "angle_unit")

    def __init__(self, output_size, spatial_scale, sampling_ratio, aligned=True, clockwise=False,
                 angle_unit="degrees"):
        super().__init__()
        self.output_size, self.spatial_scale = output_size, spatial_scale
        self.sampling_ratio, self.aligned = sampling_ratio, aligned
        self.clockwise, self.angle_unit = clockwise, angle_unit

    def forward(self, input, rois):
        return roi_align_rotated(input, rois, self.output_size, self.spatial_scale,
                                 self.sampling_ratio, self.aligned, clockwise=self.clockwise,
                                 angle_unit=self.angle_unit)


class MultiScaleRoIAlign(_RoIModule):
    """torchvision ``MultiScaleRoIAlign(featmap_names, output_size, sampling_ratio, *,
    canonical_scale=224, canonical_level=4)`` without the names and the scale inference:
    ``forward(features, boxes)`` takes the pyramid as a list of tensors (or a dict: its values
    in order, finest first) and boxes as a (K, 5) tensor or a list of per-image (K_i, 4)
    tensors. ``spatial_scales`` default to 1/4, 1/8, ... (FPN from P2); torchvision infers
    ``2 ** round(log2(feature_size / image_size))`` per level. ``aligned`` defaults to True;
    ``aligned=False`` gives torchvision's numbers. No parameters."""
    _fields = ("output_size", "sampling_ratio", "canonical_scale", "canonical_level",
               "spatial_scales", "aligned")

    def __init__(self, output_size, sampling_ratio, *, canonical_scale=224, canonical_level=4,
                 spatial_scales=None, aligned=True):
        super().__init__()
        self.output_size, self.sampling_ratio = output_size, sampling_ratio
        self.canonical_scale, self.canonical_level = canonical_scale, canonical_level
        self.spatial_scales, self.aligned = spatial_scales, aligned

    def forward(self, features, boxes):
        return multi_scale_roi_align(features, boxes, self.output_size,
                                     spatial_scales=self.spatial_scales,
                                     canonical_scale=self.canonical_scale,
                                     canonical_level=self.canonical_level,
                                     sampling_ratio=self.sampling_ratio, aligned=self.aligned)


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
