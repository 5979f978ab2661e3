"""Dask adapter: fastnorm's ops on dask arrays chunked along the batch axis, so a stack of
feature maps larger than one machine's memory is processed chunk by chunk on a Dask cluster.

``import fastnorm.dask`` needs ``dask[array]`` (and ``distributed`` for a cluster). Every
function builds a lazy graph; ``.compute()`` (or ``dask.compute(...)``) runs it, and the result
equals the in-memory call on the concatenated data.

* :func:`group_norm` and :func:`deform_conv2d`: one task per batch chunk
  (``dask.array.map_blocks``). Non-batch axes are merged into one chunk first (a sample is
  normalised/convolved as a whole).
* :func:`roi_align`, :func:`roi_pool`, :func:`ps_roi_align`, :func:`deform_roi_pool`,
  :func:`roi_align_rotated`, :func:`multi_scale_roi_align` (a list of levels, rechunked to the
  first level's batch chunks): one task per batch chunk of x with the RoIs of that chunk's images.
  ``rois`` is a list of per-image (K_i, 4) arrays ((K_i, 5) rotated boxes) (NumPy or dask) or a
  (K, 5) ((K, 6)) array with batch indices; the result has the in-memory call's RoI order.
* The NMS family (:func:`nms`, :func:`batched_nms`, :func:`diou_nms`, :func:`soft_nms`,
  :func:`weighted_nms`, :func:`matrix_nms`, :func:`iou_guided_nms`, :func:`softer_nms`,
  :func:`adaptive_nms`, :func:`nms_rotated`, :func:`batched_nms_rotated`): images are
  independent, so they are grouped ``images_per_task`` at a time. Boxes come as lists of
  per-image arrays (the result is a list of per-image dask arrays, like the in-memory list
  call) or as (N, 4) ((N, 5) rotated) arrays with a
  ``batch_idx`` (one dask array of indices into the input, grouped by image, like the in-memory
  call). Kept-box counts are unknown until computed, so those arrays have unknown (NaN) chunk
  sizes.
* :func:`combined_nms`: one task per batch chunk of the (B, N, C) scores (and their boxes); the
  outputs have fixed shapes, so their chunks are known.

Inside each task the CPU kernels use :func:`fastnorm.set_num_threads` threads of the worker
(``OMP_NUM_THREADS`` of the worker processes); give each worker process as many threads as the
cores it owns and one Dask thread (``threads_per_worker=1``). Small arrays such as weights and
biases are passed to every task.

Example
-------
>>> import numpy as np, dask.array as da, fastnorm, fastnorm.dask as fd
>>> x = np.random.default_rng(0).standard_normal((4, 8, 6, 6)).astype(np.float32)
>>> y = fd.group_norm(da.from_array(x, chunks=(2, 8, 6, 6)), 4)
>>> bool(np.array_equal(y.compute(), fastnorm.group_norm(x, 4)))
True
"""
import functools

import dask
import dask.array as da
import numpy as np

import fastnorm as _fn
from fastnorm import _lists

__all__ = ["group_norm", "deform_conv2d", "roi_align", "roi_pool", "ps_roi_align",
           "deform_roi_pool", "nms", "batched_nms", "diou_nms", "soft_nms", "weighted_nms",
           "matrix_nms", "iou_guided_nms", "softer_nms", "adaptive_nms", "combined_nms",
           "roi_align_rotated", "nms_rotated", "batched_nms_rotated", "multi_scale_roi_align"]


def _small(a):
    """Parameters (weights, biases): materialised once on the client."""
    if a is None:
        return None
    return np.asarray(a.compute() if isinstance(a, da.Array) else a)


def _batched(a, name, chunks0=None):
    """A dask array chunked along axis 0 only (rechunked to ``chunks0`` if given)."""
    if not isinstance(a, da.Array):
        if chunks0 is None:
            raise TypeError(f"`{name}` must be a dask array chunked along the batch axis, got "
                            f"{type(a).__name__}")
        a = da.from_array(np.asarray(a), chunks=-1)
    target = {i: -1 for i in range(1, a.ndim)}
    if chunks0 is not None:
        target[0] = chunks0
    return a.rechunk(target)


# ---------------------------------------------------------------- per batch chunk

def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, *, channels_last=False,
               activation=None):
    """:func:`fastnorm.group_norm` of a dask array x (N, C, *spatial), one task per batch chunk."""
    x = _batched(x, "x")
    fn = functools.partial(_fn.group_norm, num_groups=num_groups, weight=_small(weight),
                           bias=_small(bias), eps=eps, channels_last=channels_last,
                           activation=activation)
    return x.map_blocks(fn, dtype=x.dtype, meta=np.empty((0,) * x.ndim, x.dtype))


def _dcn_block(x, offset, mask=None, *, weight, bias, **kw):
    return _fn.deform_conv2d(x, offset, weight, bias, mask=mask, **kw)


def deform_conv2d(x, offset, weight, bias=None, *, mask=None, stride=1, padding=0, dilation=1):
    """:func:`fastnorm.deform_conv2d` of dask arrays x, offset (and mask) chunked along the
    batch axis (offset/mask are rechunked to x's batch chunks); one task per batch chunk."""
    x = _batched(x, "x")
    offset = _batched(offset, "offset", x.chunks[0])
    arrays = [x, offset] + ([_batched(mask, "mask", x.chunks[0])] if mask is not None else [])
    weight = _small(weight)
    fn = functools.partial(_dcn_block, weight=weight, bias=_small(bias), stride=stride,
                           padding=padding, dilation=dilation)
    chunks = (x.chunks[0], (weight.shape[0],), offset.chunks[2], offset.chunks[3])
    return da.map_blocks(fn, *arrays, chunks=chunks, dtype=x.dtype,
                         meta=np.empty((0, 0, 0, 0), x.dtype))


# ---------------------------------------------------------------- per image: RoI ops

def _roi_parts(rois, bounds, extra, width=4):
    """Split the RoIs (and per-RoI arrays ``extra``) by the batch chunks ``bounds``; ``width``:
    values per box of a per-image list (4, or 5 for rotated boxes).

    Returns per chunk (rois in the kernel's form with chunk-local image indices, extras), and the
    permutation that restores the caller's RoI order (None when already in order).
    """
    if _lists.is_list(rois):                  # -> (K, 1 + width), in image order (the caller's)
        rois = [np.asarray(r) for r in rois]
        rois = _lists.rois(np, rois, rois[0].dtype if rois else np.float32, width)
    rois = _small(rois)
    batch = rois[:, 0]
    order = np.argsort(batch, kind="stable")
    parts = []
    for a, b in bounds:
        sel = order[(batch[order] >= a) & (batch[order] < b)]
        local = rois[sel].copy()
        local[:, 0] -= a
        parts.append((local, [None if e is None else e[sel] for e in extra]))
    return parts, (None if np.array_equal(order, np.arange(len(order))) else np.argsort(order))


def _per_image_rois(fn, x, rois, out_channels, output_size, extra=(), width=4):
    x = _batched(x, "x")
    PH, PW = (output_size, output_size) if np.ndim(output_size) == 0 else tuple(output_size)
    edges = np.cumsum((0,) + x.chunks[0])
    bounds = list(zip(edges[:-1], edges[1:]))
    parts, inverse = _roi_parts(rois, bounds, extra, width)
    blocks = x.to_delayed().ravel()
    outs = []
    for blk, (r, ex) in zip(blocks, parts):
        K = len(r) if isinstance(r, np.ndarray) else sum(int(a.shape[0]) for a in r)
        outs.append(da.from_delayed(dask.delayed(fn)(blk, r, *ex),
                                    (K, out_channels, PH, PW), dtype=x.dtype))
    out = da.concatenate(outs, axis=0) if outs else da.zeros((0, out_channels, PH, PW), x.dtype)
    return out if inverse is None else out[inverse]


def roi_align(x, rois, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False, *,
              mode="avg"):
    """:func:`fastnorm.roi_align` of a dask x (N, C, H, W) chunked along the batch axis, with
    ``rois`` a list of per-image (K_i, 4) arrays or a (K, 5) array (image index first)."""
    fn = functools.partial(_fn.roi_align, output_size=output_size, spatial_scale=spatial_scale,
                           sampling_ratio=sampling_ratio, aligned=aligned, mode=mode)
    return _per_image_rois(fn, x, rois, x.shape[1], output_size)


def _multi_scale_block(*levels, rois, **kw):
    return _fn.multi_scale_roi_align(list(levels), rois, **kw)


def multi_scale_roi_align(features, rois, output_size, *, spatial_scales=None,
                          canonical_scale=224, canonical_level=4, sampling_ratio=2, aligned=True):
    """:func:`fastnorm.multi_scale_roi_align` of a list of dask levels (N, C, H_l, W_l) chunked
    along the batch axis (every level is rechunked to the first one's batch chunks): one task
    per batch chunk with all its levels and the RoIs of its images (see :func:`roi_align`)."""
    feats = [_batched(features[0], "features[0]")]
    feats += [_batched(f, f"features[{i}]", feats[0].chunks[0])
              for i, f in enumerate(features[1:], 1)]
    PH, PW = (output_size, output_size) if np.ndim(output_size) == 0 else tuple(output_size)
    edges = np.cumsum((0,) + feats[0].chunks[0])
    parts, inverse = _roi_parts(rois, list(zip(edges[:-1], edges[1:])), ())
    fn = functools.partial(_multi_scale_block, output_size=output_size,
                           spatial_scales=spatial_scales, canonical_scale=canonical_scale,
                           canonical_level=canonical_level, sampling_ratio=sampling_ratio,
                           aligned=aligned)
    blocks = [f.to_delayed().ravel() for f in feats]
    C, dtype = feats[0].shape[1], feats[0].dtype
    outs = [da.from_delayed(dask.delayed(fn)(*(b[j] for b in blocks), rois=r),
                            (len(r), C, PH, PW), dtype=dtype) for j, (r, _) in enumerate(parts)]
    out = da.concatenate(outs, axis=0) if outs else da.zeros((0, C, PH, PW), dtype)
    return out if inverse is None else out[inverse]


def roi_pool(x, rois, output_size, spatial_scale=1.0):
    """:func:`fastnorm.roi_pool`, per batch chunk (see :func:`roi_align`)."""
    fn = functools.partial(_fn.roi_pool, output_size=output_size, spatial_scale=spatial_scale)
    return _per_image_rois(fn, x, rois, x.shape[1], output_size)


def ps_roi_align(x, rois, output_size, spatial_scale=1.0, sampling_ratio=-1):
    """:func:`fastnorm.ps_roi_align`, per batch chunk (see :func:`roi_align`)."""
    PH, PW = (output_size, output_size) if np.ndim(output_size) == 0 else tuple(output_size)
    fn = functools.partial(_fn.ps_roi_align, output_size=output_size,
                           spatial_scale=spatial_scale, sampling_ratio=sampling_ratio)
    return _per_image_rois(fn, x, rois, x.shape[1] // (PH * PW), output_size)


def _deform_roi_pool_block(x, rois, offset=None, mask=None, **kw):
    return _fn.deform_roi_pool(x, rois, offset, mask=mask, **kw)


def deform_roi_pool(x, rois, offset=None, output_size=7, spatial_scale=1.0, sampling_ratio=0,
                    gamma=0.1, *, mask=None):
    """:func:`fastnorm.deform_roi_pool`, per batch chunk; ``offset``/``mask`` (K, ...) follow
    the RoIs (see :func:`roi_align`)."""
    fn = functools.partial(_deform_roi_pool_block, output_size=output_size,
                           spatial_scale=spatial_scale, sampling_ratio=sampling_ratio,
                           gamma=gamma)
    return _per_image_rois(fn, x, rois, x.shape[1], output_size, (offset, mask))


def roi_align_rotated(x, rois, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=True,
                      *, clockwise=False, angle_unit="degrees"):
    """:func:`fastnorm.roi_align_rotated`, per batch chunk (see :func:`roi_align`; rois a list of
    per-image (K_i, 5) arrays or a (K, 6) array)."""
    fn = functools.partial(_fn.roi_align_rotated, output_size=output_size,
                           spatial_scale=spatial_scale, sampling_ratio=sampling_ratio,
                           aligned=aligned, clockwise=clockwise, angle_unit=angle_unit)
    return _per_image_rois(fn, x, rois, x.shape[1], output_size, width=5)


# ---------------------------------------------------------------- per image: NMS family

# What each function returns per image, in order: "keep" (indices into the input), "scores"
# (one per kept box), "boxes" (K, 4) per kept box, "aligned" (matrix_nms: decayed scores aligned
# with the input). One part: an array; several: a list, as the in-memory call.
_KEEP, _SCORES, _BOXES, _VOTED = ("keep",), ("keep", "scores"), ("keep", "boxes"), ("keep", "boxes",
                                                                                 "scores")
_ALIGNED = ("aligned",)


def _nms_task(fn, members, parts, keys, *arrays, **kw):
    """Run ``fn`` on a group of images given as lists (the arrays named by ``keys`` passed by
    keyword, the others positionally); map kept indices back to global ones."""
    n_pos = len(arrays) - len(keys)
    lists = [list(a) for a in arrays]
    res = fn(*lists[:n_pos], **dict(zip(keys, lists[n_pos:])), **kw)
    if members is None or parts == _ALIGNED:
        return res
    if len(parts) == 1:
        return [members[i][r] for i, r in enumerate(res)]
    return [[members[i][r[0]], *r[1:]] for i, r in enumerate(res)]


def _nms_family(name, boxes, scores, *per_box, per_box_kw=None, parts=_KEEP, batch_idx=None,
                images_per_task=8, **kw):
    """``fastnorm.<name>`` per image, ``images_per_task`` images a task. ``per_box``: further
    (N,) arrays (or per-image lists) passed positionally after ``scores``; ``per_box_kw``: such
    arrays passed by keyword (None values left out)."""
    fn = getattr(_fn, name)
    per_box_kw = {k: a for k, a in (per_box_kw or {}).items() if a is not None}
    keys = list(per_box_kw)
    per_box = per_box + tuple(per_box_kw.values())
    if isinstance(boxes, (list, tuple)):
        if batch_idx is not None:
            raise ValueError("`batch_idx` cannot be combined with lists of per-image `boxes`")
        members = None
        lists = [list(a) for a in (boxes, scores) + per_box]
        lengths = [int(b.shape[0]) for b in boxes]
    else:
        if batch_idx is None:
            batch = np.zeros(int(boxes.shape[0]), np.int64)
        else:
            batch = np.asarray(_small(batch_idx)).astype(np.int64)
        order = np.argsort(batch, kind="stable")
        images, starts = np.unique(batch[order], return_index=True)
        members = np.split(order, starts[1:]) if len(order) else []
        lists = [[a[m] for m in members] for a in (boxes, scores) + per_box]
        lengths = [len(m) for m in members]
    dtype = np.dtype(str(scores[0].dtype if isinstance(scores, (list, tuple)) else scores.dtype))
    meta = {"keep": ((np.nan,), np.int64), "scores": ((np.nan,), dtype),
            "boxes": ((np.nan, 4), dtype)}
    per_image = []
    for s in range(0, len(lengths), images_per_task):
        e = min(s + images_per_task, len(lengths))
        task = dask.delayed(_nms_task, nout=e - s)(
            fn, None if members is None else members[s:e], parts, keys,
            *[lst[s:e] for lst in lists], **kw)
        for i in range(e - s):
            r = task[i]
            if parts == _ALIGNED:
                per_image.append(da.from_delayed(r, (lengths[s + i],), dtype))
            elif len(parts) == 1:
                per_image.append(da.from_delayed(r, *meta[parts[0]]))
            else:
                per_image.append([da.from_delayed(r[j], *meta[p]) for j, p in enumerate(parts)])
    if members is None:
        return per_image
    # one array (a list of them) over all images, grouped by increasing image index
    if parts == _ALIGNED:
        flat = da.concatenate(per_image) if per_image else da.zeros(0, dtype)
        return flat[np.argsort(np.concatenate(members))] if members else flat
    if len(parts) == 1:
        per_image = [[p] for p in per_image]
    out = [da.concatenate([p[j] for p in per_image]) if per_image
           else da.from_array(np.zeros((0,) + meta[part][0][1:], meta[part][1]))
           for j, part in enumerate(parts)]
    return out[0] if len(parts) == 1 else out


def nms(boxes, scores, iou_threshold, *, score_threshold=None, max_output=None, batch_idx=None,
        images_per_task=8):
    """:func:`fastnorm.nms` per image: ``boxes``/``scores`` as lists of per-image arrays (result:
    list of per-image dask arrays) or (N, 4)/(N,) arrays with ``batch_idx`` (result: one dask
    array of input indices, grouped by image, as the in-memory call)."""
    return _nms_family("nms", boxes, scores, batch_idx=batch_idx, images_per_task=images_per_task,
                       iou_threshold=iou_threshold, score_threshold=score_threshold,
                       max_output=max_output)


def batched_nms(boxes, scores, idxs, iou_threshold, *, score_threshold=None, max_output=None,
                batch_idx=None, images_per_task=8):
    """:func:`fastnorm.batched_nms` per image (see :func:`nms`)."""
    return _nms_family("batched_nms", boxes, scores, idxs, batch_idx=batch_idx,
                       images_per_task=images_per_task, iou_threshold=iou_threshold,
                       score_threshold=score_threshold, max_output=max_output)


def diou_nms(boxes, scores, iou_threshold, *, beta=1.0, score_threshold=None, max_output=None,
             batch_idx=None, images_per_task=8):
    """:func:`fastnorm.diou_nms` per image (see :func:`nms`)."""
    return _nms_family("diou_nms", boxes, scores, batch_idx=batch_idx,
                       images_per_task=images_per_task, iou_threshold=iou_threshold, beta=beta,
                       score_threshold=score_threshold, max_output=max_output)


def weighted_nms(boxes, scores, iou_threshold, *, score_threshold=None, max_output=None,
                 batch_idx=None, images_per_task=8):
    """:func:`fastnorm.weighted_nms` per image: ``[keep, fused]`` (per image for list input)."""
    return _nms_family("weighted_nms", boxes, scores, parts=_BOXES, batch_idx=batch_idx,
                       images_per_task=images_per_task, iou_threshold=iou_threshold,
                       score_threshold=score_threshold, max_output=max_output)


def soft_nms(boxes, scores, *, method="gaussian", sigma=0.5, iou_threshold=0.3,
             score_threshold=0.001, batch_idx=None, images_per_task=8):
    """:func:`fastnorm.soft_nms` per image: ``[keep, new_scores]`` (per image for list input)."""
    return _nms_family("soft_nms", boxes, scores, parts=_SCORES, batch_idx=batch_idx,
                       images_per_task=images_per_task, method=method, sigma=sigma,
                       iou_threshold=iou_threshold, score_threshold=score_threshold)


def matrix_nms(boxes, scores, *, kernel="gaussian", sigma=2.0, batch_idx=None,
               images_per_task=8):
    """:func:`fastnorm.matrix_nms` per image: decayed scores aligned with the input."""
    return _nms_family("matrix_nms", boxes, scores, parts=_ALIGNED, batch_idx=batch_idx,
                       images_per_task=images_per_task, kernel=kernel, sigma=sigma)


def iou_guided_nms(boxes, scores, localization, iou_threshold=0.5, *, idxs=None,
                   score_threshold=None, max_output=None, batch_idx=None, images_per_task=8):
    """:func:`fastnorm.iou_guided_nms` per image: ``[keep, new_scores]`` (per image for list
    input)."""
    return _nms_family("iou_guided_nms", boxes, scores, localization, parts=_SCORES,
                       batch_idx=batch_idx, images_per_task=images_per_task,
                       per_box_kw={"idxs": idxs}, iou_threshold=iou_threshold,
                       score_threshold=score_threshold, max_output=max_output)


def adaptive_nms(boxes, scores, densities, iou_threshold=0.5, *, method="hard", sigma=0.5,
                 score_threshold=0.001, batch_idx=None, images_per_task=8):
    """:func:`fastnorm.adaptive_nms` per image: indices ("hard") or ``[keep, new_scores]``
    (per image for list input)."""
    return _nms_family("adaptive_nms", boxes, scores, densities,
                       parts=_KEEP if method == "hard" else _SCORES, batch_idx=batch_idx,
                       images_per_task=images_per_task, iou_threshold=iou_threshold,
                       method=method, sigma=sigma, score_threshold=score_threshold)


def softer_nms(boxes, scores, variances, *, sigma_t=0.01, method="gaussian", sigma=0.5,
               iou_threshold=0.5, score_threshold=0.001, batch_idx=None, images_per_task=8):
    """:func:`fastnorm.softer_nms` per image: ``[keep, voted, new_scores]`` (per image for list
    input); ``variances`` as ``boxes`` (a list of per-image arrays, or an (N, 4) array)."""
    return _nms_family("softer_nms", boxes, scores, variances, parts=_VOTED, batch_idx=batch_idx,
                       images_per_task=images_per_task, sigma_t=sigma_t, method=method,
                       sigma=sigma, iou_threshold=iou_threshold, score_threshold=score_threshold)


def nms_rotated(boxes, scores, iou_threshold, *, score_threshold=None, max_output=None,
                batch_idx=None, clockwise=False, angle_unit="degrees", images_per_task=8):
    """:func:`fastnorm.nms_rotated` per image (see :func:`nms`; boxes (N, 5))."""
    return _nms_family("nms_rotated", boxes, scores, batch_idx=batch_idx,
                       images_per_task=images_per_task, iou_threshold=iou_threshold,
                       score_threshold=score_threshold, max_output=max_output,
                       clockwise=clockwise, angle_unit=angle_unit)


def batched_nms_rotated(boxes, scores, idxs, iou_threshold, *, score_threshold=None,
                        max_output=None, batch_idx=None, clockwise=False, angle_unit="degrees",
                        images_per_task=8):
    """:func:`fastnorm.batched_nms_rotated` per image (see :func:`nms`; boxes (N, 5))."""
    return _nms_family("batched_nms_rotated", boxes, scores, idxs, batch_idx=batch_idx,
                       images_per_task=images_per_task, iou_threshold=iou_threshold,
                       score_threshold=score_threshold, max_output=max_output,
                       clockwise=clockwise, angle_unit=angle_unit)


def combined_nms(boxes, scores, max_output_per_class, max_total, iou_threshold=0.5,
                 score_threshold=None, *, class_agnostic=False, pre_nms_top_k=None,
                 return_indices=False):
    """:func:`fastnorm.combined_nms` of a dask array ``scores`` (B, N, C) chunked along the batch
    axis, with ``boxes`` (B, N, 4) or (B, N, C, 4) (rechunked to the scores' batch chunks); one
    task per batch chunk. Returns dask arrays with the in-memory call's shapes."""
    scores = _batched(scores, "scores")
    boxes = _batched(boxes, "boxes", scores.chunks[0])
    fn = functools.partial(_fn.combined_nms, max_output_per_class=max_output_per_class,
                           max_total=max_total, iou_threshold=iou_threshold,
                           score_threshold=score_threshold, class_agnostic=class_agnostic,
                           pre_nms_top_k=pre_nms_top_k, return_indices=return_indices)
    # the call on no images checks every argument now and gives the outputs' shapes and dtypes
    meta = fn(np.empty((0,) + boxes.shape[1:], boxes.dtype),
              np.empty((0,) + scores.shape[1:], scores.dtype))
    parts = []
    for nb, bb, sb in zip(scores.chunks[0], boxes.to_delayed().ravel(),
                          scores.to_delayed().ravel()):
        task = dask.delayed(fn, nout=len(meta))(bb, sb)
        parts.append([da.from_delayed(task[j], (nb,) + m.shape[1:], m.dtype)
                      for j, m in enumerate(meta)])
    return tuple(da.concatenate([p[j] for p in parts]) for j in range(len(meta)))
