"""RoI feature extractors: RoIAlign (avg/max, and rotated), RoIPool, PS-RoIAlign and deformable
RoI pooling.

Common conventions
------------------
* ``rois`` is a (K, 5) array ``[batch_index, x1, y1, x2, y2]`` of x's dtype, or a list of
  per-image (K_i, 4) arrays ``[x1, y1, x2, y2]`` (image i gets batch index i). Batch indices must
  be integers in [0, N): anything else raises ``ValueError`` naming `rois` before a kernel runs.
  On CUDA that check reads one flag back from the device (a synchronisation); per-image lists
  need no check.
* A RoI with a NaN/inf coordinate gives zeros in the forward and no gradient.
* K = 0 gives a (0, C, PH, PW) result (and a zero gradient).
* Adaptive sampling (``sampling_ratio <= 0``) uses ``ceil(roi_size / output_size)`` samples per bin
  and axis, capped at ``2 * L + 64`` for an axis of length L (H or W): RoIs inside the map never
  reach the cap, huge ones cannot make a call loop or allocate without bound. An explicit
  ``sampling_ratio`` is capped the same way.
* Backward passes are deterministic on the CPU (each thread owns whole channel planes of grad_x
  and visits the RoIs in a fixed order -- average RoIAlign and deformable pooling: spatial, by
  image and box centre; the others: index order -- so bitwise identical for any thread count).
  On CUDA the default accumulates with atomics; ``deterministic=True`` gives bitwise
  reproducible gradients without atomics: the gradient's contributions become records sorted by
  the grad_x pixel they land on (RoIAlign kinds: the samples; RoIPool: one per (RoI, channel,
  bin), at its argmax), and each pixel sums its records in a fixed order; past a workspace
  limit, each thread owns a block of grad_x rows and visits the RoIs of its image in order
  (slower: every thread scans all RoIs of its image).
* :func:`multi_scale_roi_align` pools each RoI on one level of a feature pyramid (torchvision's
  ``MultiScaleRoIAlign``); on CUDA it reads the per-level RoI counts back once (the per-level
  launches need their sizes).
* Rotated RoIs (:func:`roi_align_rotated`) are (K, 6) ``[batch_index, cx, cy, w, h, angle]`` or
  per-image (K_i, 5) ``[cx, cy, w, h, angle]``, angles counter-clockwise in degrees by default
  (detectron2); their adaptive grid is capped at ``2 * max(H, W) + 64`` per bin and axis (a bin's
  axes are not the map's).
"""
from . import _lists
from . import _validation as v
from ._cpu import roi_ops as cpu
from ._cuda import roi_ops as cuda
from ._dispatch import op, resolve
from ._kernels import (ROI_MODES, DeformRoiPoolBackward, DeformRoiPoolForward,
                       MultiScaleRoiAlignBackward, MultiScaleRoiAlignForward, PsRoiAlignBackward,
                       PsRoiAlignForward, RoiAlignBackward, RoiAlignForward,
                       RoiAlignRotatedBackward, RoiAlignRotatedForward, RoiPoolBackward,
                       RoiPoolForward)


# ---------------------------------------------------------------- argument handling

def _scalars(output_size, spatial_scale, sampling_ratio=0):
    """(pooled_h, pooled_w, spatial_scale, sampling_ratio), validated."""
    PH, PW = v.pair("output_size", output_size, min=1)
    scale = v.number("spatial_scale", spatial_scale)
    sr = v.integer("sampling_ratio", sampling_ratio, min=-2**31, max=2**31 - 1)
    return PH, PW, scale, sr


def _resolve(rois, **arrays):
    """resolve() with ``rois`` one array or a list of per-image arrays: (call, arrays, rois)."""
    is_list = _lists.is_list(rois)
    parts = {f"rois[{i}]": r for i, r in enumerate(rois)} if is_list else {"rois": rois}
    call, nat = resolve(**arrays, **parts)
    n = len(arrays)
    return call, nat[:n], (list(nat[n:]) if is_list else nat[n])


def _rois(call, rois, ref, ref_name, N, width=4):
    """Validated rois as one (K, width + 1) array of ``ref``'s dtype (per-image lists
    flattened); width 4: axis-aligned boxes, 5: rotated boxes."""
    v.rois(call, rois, ref, ref_name, N, width)
    return _lists.rois(call.xp, rois, ref.dtype, width) if _lists.is_list(rois) else rois


def _grad_out(call, grad_out, K, shape4):
    v.float_array(call, "grad_out", grad_out, ndim=4)
    v.shape("grad_out", grad_out, (K,) + tuple(shape4))


# ---------------------------------------------------------------- RoIAlign

@op
def roi_align(x, rois, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False, *,
              mode="avg", channels_last=False):
    """RoIAlign (He et al., Mask R-CNN) with torchvision's semantics, plus mmcv's max mode.

    Each RoI ``[x1, y1, x2, y2] * spatial_scale`` (minus 0.5 when ``aligned``) is cut into
    PH x PW bins; a bin samples ``gh x gw`` points on a regular grid (``sampling_ratio`` per axis,
    or ``ceil(roi_size / output_size)`` when ``sampling_ratio <= 0``), bilinearly interpolated
    (samples outside (-1, H) x (-1, W) are 0), and averages them (``mode="avg"``, dividing by
    gh * gw) or takes their maximum (``mode="max"``, ties: the first sample in row-major order).
    Without ``aligned`` RoI sizes are clamped to >= 1.

    Parameters
    ----------
    x : array (N, C, H, W), or (N, H, W, C) with ``channels_last=True``
        float32/float64 (and float16/bfloat16 on CUDA).
    rois : array (K, 5) ``[batch_index, x1, y1, x2, y2]`` or list of (K_i, 4) arrays
        Same dtype as x.
    output_size : int or (int, int)
        (PH, PW).
    spatial_scale : float
        Scale from RoI coordinates to x's pixels (e.g. 1/4 for FPN level P2).
    sampling_ratio : int
        Samples per bin and axis; <= 0 for adaptive (see the module notes for the cap).
    aligned : bool
        Half-pixel shift (torchvision ``aligned=True``, ONNX ``half_pixel``).
    mode : {"avg", "max"}
    channels_last : bool
        x is (N, H, W, C) and the result is (K, PH, PW, C).

    Returns
    -------
    out : array (K, C, PH, PW), or (K, PH, PW, C) with ``channels_last=True``

    Examples
    --------
    >>> import numpy as np, fastnorm
    >>> x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    >>> rois = np.array([[0, 0, 0, 2, 2]], dtype=np.float32)
    >>> fastnorm.roi_align(x, rois, 1, sampling_ratio=2, aligned=True)[0, 0, 0, 0]
    np.float32(2.5)
    >>> fastnorm.roi_align(x, [rois[:, 1:]], (2, 2), aligned=True).shape
    (1, 1, 2, 2)
    """
    PH, PW, scale, sr = _scalars(output_size, spatial_scale, sampling_ratio)
    mode = ROI_MODES[v.choice("mode", mode, tuple(ROI_MODES))]
    call, (x,), rois = _resolve(rois, x=x)
    v.float_array(call, "x", x, ndim=4)
    rois = _rois(call, rois, x, "x", x.shape[0])
    return call.wrap(call.run(cpu.roi_align_forward, cuda.roi_align_forward, RoiAlignForward(
        x=x, rois=rois, pooled_h=PH, pooled_w=PW, spatial_scale=scale, sampling_ratio=sr,
        aligned=bool(aligned), mode=mode, channels_last=bool(channels_last))))


@op
def roi_align_backward(grad_out, rois, input_shape, output_size, spatial_scale=1.0,
                       sampling_ratio=-1, aligned=False, *, mode="avg", x=None,
                       channels_last=False, deterministic=False):
    """Gradient of :func:`roi_align` with respect to x.

    Parameters
    ----------
    grad_out : array (K, C, PH, PW), or (K, PH, PW, C) with ``channels_last=True``
    rois : as in :func:`roi_align`
    input_shape : tuple of 4 ints
        The shape of x as laid out ((N, H, W, C) with ``channels_last=True``).
    output_size, spatial_scale, sampling_ratio, aligned, mode, channels_last :
        As in the forward call.
    x : array, shape ``input_shape``, optional
        The forward input; required for ``mode="max"`` (the argmax sample is recomputed, and the
        gradient goes to its four bilinear corners).
    deterministic : bool
        CUDA only (the CPU is always deterministic): bitwise reproducible gradients.

    Returns
    -------
    grad_x : array of shape ``input_shape``

    Examples
    --------
    >>> import numpy as np, fastnorm
    >>> rois = np.array([[0, 0, 0, 2, 2]], dtype=np.float64)
    >>> g = fastnorm.roi_align_backward(np.ones((1, 1, 1, 1)), rois, (1, 1, 4, 4), 1,
    ...                                 sampling_ratio=2, aligned=True)
    >>> float(g.sum())
    1.0
    """
    shape = v.input_shape("input_shape", input_shape)
    PH, PW, scale, sr = _scalars(output_size, spatial_scale, sampling_ratio)
    v.choice("mode", mode, tuple(ROI_MODES))
    if mode == "max" and x is None:
        raise ValueError("`x` is required by roi_align_backward with mode='max'")
    call, (grad_out, x), rois = _resolve(rois, grad_out=grad_out, x=x if mode == "max" else None)
    N, C = (shape[0], shape[3]) if channels_last else shape[:2]
    rois = _rois(call, rois, grad_out, "grad_out", N)
    _grad_out(call, grad_out, rois.shape[0], (PH, PW, C) if channels_last else (C, PH, PW))
    if x is not None:
        v.same_dtype("x", x, "grad_out", grad_out)
        v.shape("x", x, shape)
    return call.wrap(call.run(cpu.roi_align_backward, cuda.roi_align_backward, RoiAlignBackward(
        grad_out=grad_out, rois=rois, x=x, input_shape=shape, pooled_h=PH, pooled_w=PW,
        spatial_scale=scale, sampling_ratio=sr, aligned=bool(aligned), mode=ROI_MODES[mode],
        channels_last=bool(channels_last), deterministic=bool(deterministic))))


# ---------------------------------------------------------------- multi-scale RoIAlign (FPN)

def _pyramid(output_size, sampling_ratio, canonical_scale, canonical_level):
    PH, PW = v.pair("output_size", output_size, min=1)
    sr = v.integer("sampling_ratio", sampling_ratio, min=-2**31, max=2**31 - 1)
    s0 = v.number("canonical_scale", canonical_scale, min=0, min_exclusive=True)
    k0 = v.integer("canonical_level", canonical_level, min=-2**31, max=2**31 - 1)
    return PH, PW, sr, s0, k0


@op
def multi_scale_roi_align(features, rois, output_size, *, spatial_scales=None,
                          canonical_scale=224, canonical_level=4, sampling_ratio=2, aligned=True,
                          channels_last=False):
    """RoIAlign over a feature pyramid: torchvision's ``MultiScaleRoIAlign`` (FPN, Lin et al.).

    RoI ``[x1, y1, x2, y2]`` (image coordinates) goes to pyramid level ``k = floor(
    canonical_level + log2(sqrt((x2 - x1) * (y2 - y1)) / canonical_scale) + 1e-6)`` clamped to
    ``[k_min, k_max]`` (``k_min = -log2(spatial_scales[0])``, ``k_max =
    -log2(spatial_scales[-1])``), i.e. to ``features[k - k_min]``, and is pooled there by
    :func:`roi_align` (mode avg) with that level's ``spatial_scale``, ``sampling_ratio`` and
    ``aligned``. The level is computed as torchvision's ``LevelMapper`` does, in the RoIs' dtype
    (float32 for float16/bfloat16 RoIs on CUDA, whose areas would overflow). A RoI whose level is
    NaN (a non-finite coordinate, or a negative area: a box inverted along one axis only) is
    pooled on no level and gives zeros and no gradient, as in torchvision; non-finite RoIs give
    zeros as in :func:`roi_align` anyway. With a single level every RoI is pooled there (no
    mapping, as torchvision). Output rows follow the RoI order.

    Note: torchvision's ``MultiScaleRoIAlign`` pools with ``aligned=False``; the default here is
    ``aligned=True`` (the half-pixel-correct RoIAlign). Pass ``aligned=False`` for torchvision's
    numbers.

    Parameters
    ----------
    features : list of L arrays (N, C, H_l, W_l), or (N, H_l, W_l, C) with ``channels_last``
        The pyramid, finest level first; one dtype (float32/float64, and float16/bfloat16 on
        CUDA), batch size, channel count and backend.
    rois : array (K, 5) ``[batch_index, x1, y1, x2, y2]`` or list of (K_i, 4) arrays
        In image coordinates; the dtype of the features.
    output_size : int or (int, int)
        (PH, PW).
    spatial_scales : sequence of L floats, optional
        Each level's scale from image coordinates to its pixels: powers of two halving from one
        level to the next (``2**-k, 2**-(k+1), ...``). Default: the FPN convention from P2, i.e.
        ``1/4, 1/8, 1/16, ...``. torchvision infers them from the sizes instead: ``2 **
        round(log2(H_l / image_height))`` with the largest image size of the batch
        (``_infer_scale``); pass those for its behaviour with other strides.
    canonical_scale : float
        Side (pixels) of the RoI that maps to ``canonical_level`` (FPN's 224).
    canonical_level : int
        FPN's k0 (4).
    sampling_ratio : int
        Samples per bin and axis; <= 0 for adaptive (as :func:`roi_align`).
    aligned : bool
        Half-pixel shift (default True; torchvision's MultiScaleRoIAlign uses False).
    channels_last : bool
        The maps are (N, H, W, C) and the result is (K, PH, PW, C).

    Returns
    -------
    out : array (K, C, PH, PW), or (K, PH, PW, C) with ``channels_last=True``

    Examples
    --------
    >>> import numpy as np, fastnorm
    >>> feats = [np.full((1, 2, 64 // 2**i, 64 // 2**i), float(i), np.float32) for i in range(4)]
    >>> rois = np.array([[0, 0, 0, 32, 32], [0, 0, 0, 256, 256]], np.float32)
    >>> y = fastnorm.multi_scale_roi_align(feats, rois, 7)   # P2..P5: scales 1/4 .. 1/32
    >>> y.shape, float(y[0, 0, 3, 3]), float(y[1, 0, 3, 3])     # levels P2 and P4
    ((2, 2, 7, 7), 0.0, 2.0)
    """
    PH, PW, sr, s0, k0 = _pyramid(output_size, sampling_ratio, canonical_scale, canonical_level)
    features = v.level_list("features", features)
    scales, kmin = v.pyramid_scales("spatial_scales", spatial_scales, len(features))
    call, feats, rois = _resolve(rois, **{f"features[{i}]": f for i, f in enumerate(features)})
    N, _ = v.feature_levels(call, "features", feats, bool(channels_last))
    rois = _rois(call, rois, feats[0], "features[0]", N)
    out = call.run(cpu.multi_scale_roi_align_forward, cuda.multi_scale_roi_align_forward,
                   MultiScaleRoiAlignForward(
                       features=tuple(feats), rois=rois, pooled_h=PH, pooled_w=PW,
                       spatial_scales=scales, level_min=kmin, canonical_scale=s0,
                       canonical_level=k0, sampling_ratio=sr, aligned=bool(aligned),
                       channels_last=bool(channels_last)))
    return call.wrap(out)


@op
def multi_scale_roi_align_backward(grad_out, rois, input_shapes, output_size, *,
                                   spatial_scales=None, canonical_scale=224, canonical_level=4,
                                   sampling_ratio=2, aligned=True, channels_last=False,
                                   deterministic=False):
    """Gradient of :func:`multi_scale_roi_align` with respect to each pyramid level.

    Parameters
    ----------
    grad_out : array (K, C, PH, PW), or (K, PH, PW, C) with ``channels_last=True``
    rois : as in :func:`multi_scale_roi_align`
    input_shapes : list of L tuples of 4 ints
        The shapes of the levels as laid out ((N, H_l, W_l, C) with ``channels_last``).
    output_size, spatial_scales, canonical_scale, canonical_level, sampling_ratio, aligned, \
channels_last :
        As in the forward call.
    deterministic : bool
        CUDA only (the CPU is always deterministic): bitwise reproducible gradients.

    Returns
    -------
    grads : list of L arrays, of shapes ``input_shapes``

    Examples
    --------
    >>> import numpy as np, fastnorm
    >>> shapes = [(1, 2, 64 // 2**i, 64 // 2**i) for i in range(4)]
    >>> rois = np.array([[0, 0, 0, 32, 32], [0, 0, 0, 256, 256]], np.float64)
    >>> g = fastnorm.multi_scale_roi_align_backward(np.ones((2, 2, 7, 7)), rois, shapes, 7)
    >>> [round(float(a.sum()), 9) for a in g]     # 2 x 49 bins of weight 1 on P2 and P4
    [98.0, 0.0, 98.0, 0.0]
    """
    PH, PW, sr, s0, k0 = _pyramid(output_size, sampling_ratio, canonical_scale, canonical_level)
    shapes = [v.input_shape(f"input_shapes[{i}]", s)
              for i, s in enumerate(v.level_list("input_shapes", input_shapes))]
    scales, kmin = v.pyramid_scales("spatial_scales", spatial_scales, len(shapes))
    cl = bool(channels_last)
    c_axis = 3 if cl else 1
    for i, s in enumerate(shapes[1:], 1):
        if s[0] != shapes[0][0] or s[c_axis] != shapes[0][c_axis]:
            raise ValueError(f"`input_shapes[{i}]` must have the batch size and channel count "
                             f"of `input_shapes[0]` {shapes[0]}, got {s}")
    N, C = shapes[0][0], shapes[0][c_axis]
    call, (grad_out,), rois = _resolve(rois, grad_out=grad_out)
    rois = _rois(call, rois, grad_out, "grad_out", N)
    _grad_out(call, grad_out, rois.shape[0], (PH, PW, C) if cl else (C, PH, PW))
    grads = call.run(cpu.multi_scale_roi_align_backward, cuda.multi_scale_roi_align_backward,
                     MultiScaleRoiAlignBackward(
                         grad_out=grad_out, rois=rois, input_shapes=tuple(shapes), pooled_h=PH,
                         pooled_w=PW, spatial_scales=scales, level_min=kmin,
                         canonical_scale=s0, canonical_level=k0, sampling_ratio=sr,
                         aligned=bool(aligned), channels_last=cl,
                         deterministic=bool(deterministic)))
    return call.wrap(grads)


# ---------------------------------------------------------------- rotated RoIAlign

@op
def roi_align_rotated(x, rois, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=True,
                      *, clockwise=False, angle_unit="degrees"):
    """RoIAlign over rotated boxes, with detectron2's ``ROIAlignRotated`` semantics.

    A RoI ``[cx, cy, w, h, angle]`` is scaled (``cx * spatial_scale - 0.5`` when ``aligned``,
    likewise cy; ``w * spatial_scale``, ``h * spatial_scale``, clamped to >= 1 without
    ``aligned``) and cut into PH x PW bins in its own frame; bin (ph, pw) samples ``gh x gw``
    points (``sampling_ratio`` per axis, or ``ceil(h / PH)`` and ``ceil(w / PW)`` when
    ``sampling_ratio <= 0``) at the local offsets ``yy = -h/2 + (ph + (iy + .5) / gh) * h / PH``,
    ``xx = -w/2 + (pw + (ix + .5) / gw) * w / PW``, placed in the map at
    ``x = xx * cos(t) + yy * sin(t) + cx``, ``y = yy * cos(t) - xx * sin(t) + cy``, and averages
    their bilinear interpolations as :func:`roi_align` does (samples outside (-1, H) x (-1, W)
    are 0). With angle 0 it is :func:`roi_align` on ``[cx - w/2, cy - h/2, cx + w/2, cy + h/2]``.

    The angle ``t`` is counter-clockwise in degrees (detectron2) unless ``clockwise`` /
    ``angle_unit`` say otherwise: mmcv's ``roi_align_rotated(..., clockwise=c)`` takes radians,
    i.e. ``angle_unit="radians", clockwise=c`` here. ``t`` is counter-clockwise as seen in the
    usual picture of an image (y pointing down), which detectron2 implements as the formulas
    above.

    A RoI with a non-finite entry, or (with ``aligned``) a negative scaled width or height, gives
    zeros and no gradient (detectron2 rejects negative sizes; without ``aligned`` they are
    clamped to 1 like any size below 1). A zero width or height gives zeros with adaptive
    sampling and samples along the centre line with an explicit ``sampling_ratio``.

    Parameters
    ----------
    x : array (N, C, H, W)
        float32/float64 (and float16/bfloat16 on CUDA, float32 accumulation).
    rois : array (K, 6) ``[batch_index, cx, cy, w, h, angle]`` or list of (K_i, 5) arrays
        Same dtype as x; list entry i holds image i's RoIs ``[cx, cy, w, h, angle]``.
    output_size : int or (int, int)
        (PH, PW).
    spatial_scale : float
        Scale from RoI coordinates to x's pixels.
    sampling_ratio : int
        Samples per bin and axis; <= 0 for adaptive (capped at ``2 * max(H, W) + 64``).
    aligned : bool
        Half-pixel shift of the centre (detectron2's default, True).
    clockwise : bool
        Angles are clockwise (mmcv ``clockwise=True``).
    angle_unit : {"degrees", "radians"}

    Returns
    -------
    out : array (K, C, PH, PW)

    Examples
    --------
    >>> import numpy as np, fastnorm
    >>> x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    >>> rois = np.array([[0, 2, 2, 2, 2, 90]], dtype=np.float32)   # a quarter turn
    >>> fastnorm.roi_align_rotated(x, rois, 2, sampling_ratio=1)[0, 0]
    array([[ 9.,  5.],
           [10.,  6.]], dtype=float32)
    >>> y = fastnorm.roi_align_rotated(x, [rois[:, 1:]], 2, sampling_ratio=1, clockwise=True)
    >>> y[0, 0]
    array([[ 6., 10.],
           [ 5.,  9.]], dtype=float32)
    """
    PH, PW, scale, sr = _scalars(output_size, spatial_scale, sampling_ratio)
    angle_scale = v.angle_scale(clockwise, angle_unit)
    call, (x,), rois = _resolve(rois, x=x)
    v.float_array(call, "x", x, ndim=4)
    rois = _rois(call, rois, x, "x", x.shape[0], width=5)
    return call.wrap(call.run(cpu.roi_align_rotated_forward, cuda.roi_align_rotated_forward,
                              RoiAlignRotatedForward(x=x, rois=rois, pooled_h=PH, pooled_w=PW,
                                                     spatial_scale=scale, sampling_ratio=sr,
                                                     aligned=bool(aligned),
                                                     angle_scale=angle_scale)))


@op
def roi_align_rotated_backward(grad_out, rois, input_shape, output_size, spatial_scale=1.0,
                               sampling_ratio=-1, aligned=True, *, clockwise=False,
                               angle_unit="degrees", deterministic=False):
    """Gradient of :func:`roi_align_rotated` with respect to x.

    Parameters
    ----------
    grad_out : array (K, C, PH, PW)
    rois : as in :func:`roi_align_rotated`
    input_shape : tuple (N, C, H, W)
    output_size, spatial_scale, sampling_ratio, aligned, clockwise, angle_unit :
        As in the forward call.
    deterministic : bool
        CUDA only (the CPU is always deterministic): bitwise reproducible gradients.

    Returns
    -------
    grad_x : array (N, C, H, W)

    Examples
    --------
    >>> import numpy as np, fastnorm
    >>> rois = np.array([[0, 2, 2, 2, 2, 30]], dtype=np.float64)
    >>> g = fastnorm.roi_align_rotated_backward(np.ones((1, 1, 1, 1)), rois, (1, 1, 4, 4), 1,
    ...                                         sampling_ratio=2)
    >>> round(float(g.sum()), 12)
    1.0
    """
    shape = v.input_shape("input_shape", input_shape)
    PH, PW, scale, sr = _scalars(output_size, spatial_scale, sampling_ratio)
    angle_scale = v.angle_scale(clockwise, angle_unit)
    call, (grad_out,), rois = _resolve(rois, grad_out=grad_out)
    rois = _rois(call, rois, grad_out, "grad_out", shape[0], width=5)
    _grad_out(call, grad_out, rois.shape[0], (shape[1], PH, PW))
    return call.wrap(call.run(cpu.roi_align_rotated_backward, cuda.roi_align_rotated_backward,
                              RoiAlignRotatedBackward(grad_out=grad_out, rois=rois,
                                                      input_shape=shape, pooled_h=PH,
                                                      pooled_w=PW, spatial_scale=scale,
                                                      sampling_ratio=sr, aligned=bool(aligned),
                                                      angle_scale=angle_scale,
                                                      deterministic=bool(deterministic))))


# ---------------------------------------------------------------- RoIPool

@op
def roi_pool(x, rois, output_size, spatial_scale=1.0):
    """RoIPool (Fast R-CNN) with torchvision's rounding: max over integer bins.

    RoI corners are rounded (``round(c * spatial_scale)``, half away from zero), the RoI size is
    ``max(end - start + 1, 1)``, bin (ph, pw) covers rows ``floor(ph * bin_h) .. ceil((ph+1) *
    bin_h)`` (clipped to the map) and the output is the maximum there (0 for an empty bin).

    Parameters
    ----------
    x : array (N, C, H, W)
    rois : array (K, 5) or list of (K_i, 4) arrays
    output_size : int or (int, int)
    spatial_scale : float

    Returns
    -------
    out : array (K, C, PH, PW)

    Examples
    --------
    >>> import numpy as np, fastnorm
    >>> x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    >>> fastnorm.roi_pool(x, np.array([[0, 0, 0, 3, 3]], np.float32), 2)[0, 0]
    array([[ 5.,  7.],
           [13., 15.]], dtype=float32)
    """
    PH, PW, scale, _ = _scalars(output_size, spatial_scale)
    call, (x,), rois = _resolve(rois, x=x)
    v.float_array(call, "x", x, ndim=4)
    rois = _rois(call, rois, x, "x", x.shape[0])
    return call.wrap(call.run(cpu.roi_pool_forward, cuda.roi_pool_forward, RoiPoolForward(
        x=x, rois=rois, pooled_h=PH, pooled_w=PW, spatial_scale=scale)))


@op
def roi_pool_backward(grad_out, rois, input_shape, output_size, spatial_scale=1.0, *, x,
                      deterministic=False):
    """Gradient of :func:`roi_pool`: each output's gradient goes to its bin's argmax in x.

    Parameters
    ----------
    grad_out : array (K, C, PH, PW)
    rois, output_size, spatial_scale : as in the forward call
    input_shape : tuple (N, C, H, W)
    x : array (N, C, H, W)
        The forward input (required: the argmax is recomputed from it; ties go to the first
        maximum in row-major order, as in torchvision).
    deterministic : bool
        CUDA only (the CPU is always deterministic).

    Returns
    -------
    grad_x : array (N, C, H, W)

    Examples
    --------
    >>> import numpy as np, fastnorm
    >>> x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    >>> rois = np.array([[0, 0, 0, 3, 3]], np.float32)
    >>> g = fastnorm.roi_pool_backward(np.ones((1, 1, 1, 1), np.float32), rois, x.shape, 1, x=x)
    >>> float(g[0, 0, 3, 3])
    1.0
    """
    shape = v.input_shape("input_shape", input_shape)
    PH, PW, scale, _ = _scalars(output_size, spatial_scale)
    call, (grad_out, x), rois = _resolve(rois, grad_out=grad_out, x=x)
    v.same_dtype("x", x, "grad_out", grad_out)
    v.shape("x", x, shape)
    rois = _rois(call, rois, grad_out, "grad_out", shape[0])
    _grad_out(call, grad_out, rois.shape[0], (shape[1], PH, PW))
    return call.wrap(call.run(cpu.roi_pool_backward, cuda.roi_pool_backward, RoiPoolBackward(
        grad_out=grad_out, rois=rois, x=x, pooled_h=PH, pooled_w=PW, spatial_scale=scale,
        deterministic=bool(deterministic))))


# ---------------------------------------------------------------- PS-RoIAlign

@op
def ps_roi_align(x, rois, output_size, spatial_scale=1.0, sampling_ratio=-1):
    """Position-sensitive RoIAlign (R-FCN) with torchvision's semantics.

    Output channel c, bin (ph, pw) averages the bilinear samples of input channel
    ``(c * PH + ph) * PW + pw``; RoIs are half-pixel aligned (``* spatial_scale - 0.5``) and not
    clamped. A bin with no samples (a RoI of negative size with adaptive sampling) is 0.

    Parameters
    ----------
    x : array (N, C, H, W) with C a multiple of PH * PW
    rois : array (K, 5) or list of (K_i, 4) arrays
    output_size : int or (int, int)
    spatial_scale : float
    sampling_ratio : int

    Returns
    -------
    out : array (K, C // (PH * PW), PH, PW)

    Examples
    --------
    >>> import numpy as np, fastnorm
    >>> x = np.ones((1, 8, 5, 5), np.float32)
    >>> fastnorm.ps_roi_align(x, np.array([[0, 1, 1, 3, 3]], np.float32), 2).shape
    (1, 2, 2, 2)
    """
    PH, PW, scale, sr = _scalars(output_size, spatial_scale, sampling_ratio)
    call, (x,), rois = _resolve(rois, x=x)
    v.float_array(call, "x", x, ndim=4)
    if x.shape[1] % (PH * PW):
        raise ValueError(f"`x` must have a multiple of PH * PW = {PH * PW} channels for "
                         f"ps_roi_align, got {x.shape[1]}")
    rois = _rois(call, rois, x, "x", x.shape[0])
    return call.wrap(call.run(cpu.ps_roi_align_forward, cuda.ps_roi_align_forward,
                              PsRoiAlignForward(x=x, rois=rois, pooled_h=PH, pooled_w=PW,
                                                spatial_scale=scale, sampling_ratio=sr)))


@op
def ps_roi_align_backward(grad_out, rois, input_shape, output_size, spatial_scale=1.0,
                          sampling_ratio=-1, *, deterministic=False):
    """Gradient of :func:`ps_roi_align` with respect to x.

    Parameters
    ----------
    grad_out : array (K, C // (PH * PW), PH, PW)
    rois, output_size, spatial_scale, sampling_ratio : as in the forward call
    input_shape : tuple (N, C, H, W)
    deterministic : bool
        CUDA only (the CPU is always deterministic).

    Returns
    -------
    grad_x : array (N, C, H, W)

    Examples
    --------
    >>> import numpy as np, fastnorm
    >>> rois = np.array([[0, 1, 1, 3, 3]], np.float64)
    >>> g = fastnorm.ps_roi_align_backward(np.ones((1, 2, 2, 2)), rois, (1, 8, 5, 5), 2)
    >>> float(g.sum())
    8.0
    """
    shape = v.input_shape("input_shape", input_shape)
    PH, PW, scale, sr = _scalars(output_size, spatial_scale, sampling_ratio)
    N, C = shape[:2]
    if C % (PH * PW):
        raise ValueError(f"`input_shape` must have a multiple of PH * PW = {PH * PW} channels, "
                         f"got {C}")
    call, (grad_out,), rois = _resolve(rois, grad_out=grad_out)
    rois = _rois(call, rois, grad_out, "grad_out", N)
    _grad_out(call, grad_out, rois.shape[0], (C // (PH * PW), PH, PW))
    return call.wrap(call.run(cpu.ps_roi_align_backward, cuda.ps_roi_align_backward,
                              PsRoiAlignBackward(grad_out=grad_out, rois=rois, input_shape=shape,
                                                 pooled_h=PH, pooled_w=PW, spatial_scale=scale,
                                                 sampling_ratio=sr,
                                                 deterministic=bool(deterministic))))


# ---------------------------------------------------------------- deformable RoI pooling

def _deform_args(call, x, offset, mask, K, PH, PW):
    if offset is not None:
        v.same_dtype("offset", offset, "x", x)
        v.shape("offset", offset, (K, 2, PH, PW))
    if mask is not None:
        v.same_dtype("mask", mask, "x", x)
        v.shape("mask", mask, (K, 1, PH, PW))


@op
def deform_roi_pool(x, rois, offset=None, output_size=7, spatial_scale=1.0, sampling_ratio=0,
                    gamma=0.1, *, mask=None):
    """Deformable RoI pooling (Dai et al., DCN; mmcv ``DeformRoIPool`` semantics).

    Aligned RoIAlign averaging (``* spatial_scale - 0.5``, no size clamp, adaptive sampling for
    ``sampling_ratio <= 0``) where bin (ph, pw) is shifted by
    ``(gamma * roi_w * offset[k, 0, ph, pw], gamma * roi_h * offset[k, 1, ph, pw])`` in (x, y).
    With ``mask`` (modulated variant, mmcv ``ModulatedDeformRoIPoolPack``), the result is
    multiplied by ``mask[k, 0, ph, pw]``.

    Parameters
    ----------
    x : array (N, C, H, W)
    rois : array (K, 5) or list of (K_i, 4) arrays
    offset : array (K, 2, PH, PW), optional
        Normalised (dx, dy) per bin; None: plain aligned RoIAlign.
    output_size : int or (int, int)
    spatial_scale : float
    sampling_ratio : int
    gamma : float
        Offset scale.
    mask : array (K, 1, PH, PW), optional
        Modulation (usually a sigmoid output).

    Returns
    -------
    out : array (K, C, PH, PW)

    Examples
    --------
    >>> import numpy as np, fastnorm
    >>> x = np.ones((1, 3, 8, 8), np.float32)
    >>> rois = np.array([[0, 1, 1, 6, 6]], np.float32)
    >>> off = np.zeros((1, 2, 2, 2), np.float32)
    >>> fastnorm.deform_roi_pool(x, rois, off, 2, sampling_ratio=2)[0, 0]
    array([[1., 1.],
           [1., 1.]], dtype=float32)
    """
    PH, PW, scale, sr = _scalars(output_size, spatial_scale, sampling_ratio)
    gamma = v.number("gamma", gamma)
    call, (x, offset, mask), rois = _resolve(rois, x=x, offset=offset, mask=mask)
    v.float_array(call, "x", x, ndim=4)
    rois = _rois(call, rois, x, "x", x.shape[0])
    _deform_args(call, x, offset, mask, rois.shape[0], PH, PW)
    return call.wrap(call.run(cpu.deform_roi_pool_forward, cuda.deform_roi_pool_forward,
                              DeformRoiPoolForward(x=x, rois=rois, offset=offset, mask=mask,
                                                   pooled_h=PH, pooled_w=PW, spatial_scale=scale,
                                                   sampling_ratio=sr, gamma=gamma)))


@op
def deform_roi_pool_backward(grad_out, x, rois, offset=None, output_size=7, spatial_scale=1.0,
                             sampling_ratio=0, gamma=0.1, *, mask=None, deterministic=False):
    """Gradients of :func:`deform_roi_pool` with respect to x, offset and mask.

    The offset gradient is the exact derivative of the computed forward (sample coordinates that
    clamp at the map border contribute 0), so it matches finite differences; mmcv's CUDA kernel
    extrapolates there instead.

    Parameters
    ----------
    grad_out : array (K, C, PH, PW)
    x, rois, offset, output_size, spatial_scale, sampling_ratio, gamma, mask :
        As in the forward call.
    deterministic : bool
        CUDA only (the CPU is always deterministic); grad_offset and grad_mask are always
        deterministic (one writer per element).

    Returns
    -------
    grad_x : array (N, C, H, W)
    grad_offset : array (K, 2, PH, PW), or None without offset
    grad_mask : array (K, 1, PH, PW), or None without mask

    Examples
    --------
    >>> import numpy as np, fastnorm
    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal((1, 2, 8, 8))
    >>> rois = np.array([[0, 1, 1, 6, 6]], np.float64)
    >>> off = np.zeros((1, 2, 2, 2))
    >>> gx, goff, gm = fastnorm.deform_roi_pool_backward(np.ones((1, 2, 2, 2)), x, rois, off, 2)
    >>> gx.shape, goff.shape, gm is None
    ((1, 2, 8, 8), (1, 2, 2, 2), True)
    """
    PH, PW, scale, sr = _scalars(output_size, spatial_scale, sampling_ratio)
    gamma = v.number("gamma", gamma)
    call, (grad_out, x, offset, mask), rois = _resolve(rois, grad_out=grad_out, x=x,
                                                       offset=offset, mask=mask)
    v.float_array(call, "x", x, ndim=4)
    v.same_dtype("grad_out", grad_out, "x", x)
    rois = _rois(call, rois, x, "x", x.shape[0])
    _deform_args(call, x, offset, mask, rois.shape[0], PH, PW)
    _grad_out(call, grad_out, rois.shape[0], (x.shape[1], PH, PW))
    return call.wrap(call.run(cpu.deform_roi_pool_backward, cuda.deform_roi_pool_backward,
                              DeformRoiPoolBackward(grad_out=grad_out, x=x, rois=rois,
                                                    offset=offset, mask=mask, pooled_h=PH,
                                                    pooled_w=PW, spatial_scale=scale,
                                                    sampling_ratio=sr, gamma=gamma,
                                                    deterministic=bool(deterministic))))
