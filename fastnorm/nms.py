"""Non-maximum suppression family (greedy, class-aware, soft, DIoU, weighted, matrix, IoU-guided,
softer, adaptive), the fixed-shape deployment form (:func:`combined_nms`) and box IoU metrics.

Conventions shared by every function here
-----------------------------------------
* ``boxes`` are (N, 4) ``[x1, y1, x2, y2]`` of a floating dtype (float32/float64; float16 and
  bfloat16 on CUDA). Integer boxes are rejected with ``TypeError`` (cast them yourself: an
  implicit cast would hide a copy and a rounding choice). ``scores`` are (N,) of the same dtype.
* Ranking: decreasing score; equal scores keep the lower index first (a stable sort); NaN scores
  rank below every number.
* A box with ``x2 <= x1`` or ``y2 <= y1`` has area 0 and overlaps nothing; a box with a NaN
  coordinate overlaps nothing either. Such boxes are never suppressed and suppress nothing.
* Suppression is strict: IoU (or the criterion) ``> iou_threshold``.
* ``score_threshold`` (greedy variants): only boxes with ``score > score_threshold`` take part
  (as ONNX ``NonMaxSuppression``); NaN scores are then dropped.
* Batches of images, two ways:

  - ``batch_idx=`` an integer (N,) array giving each box's image (>= 0). Images never interact;
    the result holds indices into the input, grouped by image in increasing image index, in
    decreasing score order within an image; ``max_output`` caps each image.
  - lists/tuples of per-image arrays (``boxes=[b0, b1, ...]``, ``scores=[s0, s1, ...]``, and
    ``idxs=[...]`` for :func:`batched_nms`): the result is a list with one entry per image,
    holding indices local to that image (as if called once per image), computed in one call.

* Rotated boxes (:func:`box_iou_rotated`, :func:`nms_rotated`, :func:`batched_nms_rotated`) are
  (N, 5) ``[cx, cy, w, h, angle]``; their IoU is that of the exact intersection polygon, and a
  box with ``w <= 0``, ``h <= 0`` or a non-finite field overlaps nothing. The angle convention
  is set by ``clockwise`` and ``angle_unit`` (see :func:`box_iou_rotated`).
* :func:`combined_nms` is the fixed-shape deployment form: batched (B, N, 4) boxes and
  (B, N, C) scores in, per-image padded (B, max_total, ...) detections and counts out.

Every kernel decides in float64 whatever the boxes' dtype (exact decisions for float32 boxes), on
the CPU and on CUDA alike, so both keep the same boxes.
"""
from . import _lists
from . import _validation as v
from ._cpu import nms as cpu
from ._cuda import nms as cuda
from ._dispatch import op, resolve
from ._kernels import (CRITERIA, DECAYS, METRICS, AdaptiveNms, BoxIou, BoxIouRotated, CombinedNms,
                       IouGuidedNms, MatrixNms, Nms, NmsRotated, SoftNms, SofterNms, WeightedNms)


# ---------------------------------------------------------------- argument handling

_BOX_SHAPED = {"variances"}      # per-box arrays shaped like the boxes, (N, 4); others (N,)


def _per_box(call, bname, boxes, name, a, at=""):
    """Validate the further per-box array ``name`` (``at``: "[i]" for image i of a list): (N,)
    like the scores, or (N, 4) like the boxes for the names in _BOX_SHAPED; the boxes' dtype."""
    shaped, name = name in _BOX_SHAPED, name + at
    if not shaped:
        v.boxes_and_scores(call, bname, boxes, name, a)
        return
    v.float_array(call, name, a)
    v.same_dtype(name, a, bname, boxes)
    v.shape(name, a, tuple(boxes.shape), f"{tuple(boxes.shape)} to match `{bname}`")


def _prepare(boxes, scores, idxs=None, batch_idx=None, *, width=4, **per_box):
    """Resolve and validate the arrays: (call, boxes, scores, idxs, batch), then the ``per_box``
    arrays if any (further per-box arrays, by keyword: ``localization=...``; see _per_box).
    ``width``: values per box (4: xyxy, 5: rotated boxes).
    Per-image lists stay lists here (validated entry by entry); ``_flatten`` flattens them."""
    for name, a in per_box.items():
        if a is None:
            raise TypeError(f"`{name}` must be an array with one entry per box, got None")
    if not _lists.is_list(boxes):
        call, (boxes, scores, idxs, batch, *extra) = resolve(
            boxes=boxes, scores=scores, idxs=idxs, batch_idx=batch_idx, **per_box)
        v.boxes_and_scores(call, "boxes", boxes, "scores", scores, width=width)
        for name, a in zip(per_box, extra):
            _per_box(call, "boxes", boxes, name, a)
        idxs = v.int_array("idxs", idxs, boxes.shape[0], "boxes")
        batch = v.int_array("batch_idx", batch, boxes.shape[0], "boxes")
        if batch is not None and batch.shape[0] and bool((batch < 0).any()):
            raise ValueError("`batch_idx` must be >= 0 (the image index of each box)")
        return (call, boxes, scores, idxs, batch, *extra)
    if batch_idx is not None:
        raise ValueError("`batch_idx` cannot be combined with lists of per-image `boxes`")
    B = len(boxes)
    if B == 0:
        raise ValueError("`boxes` must be a non-empty list of per-image arrays")
    v.same_list_length("scores", scores, B)
    if idxs is not None:
        v.same_list_length("idxs", idxs, B)
    for name, a in per_box.items():
        v.same_list_length(name, a, B)
    arrays = {f"{name}[{i}]": a[i] for name, a in (("boxes", boxes), ("scores", scores),
                                                   ("idxs", idxs), *per_box.items())
              if a is not None for i in range(B)}
    call, nat = resolve(**arrays)
    bl, sl = nat[:B], nat[B:2 * B]
    il = list(nat[2 * B:3 * B]) if idxs is not None else None
    extra = nat[(3 if idxs is not None else 2) * B:]
    extra = [list(extra[j * B:(j + 1) * B]) for j in range(len(per_box))]
    for i in range(B):
        v.boxes_and_scores(call, f"boxes[{i}]", bl[i], f"scores[{i}]", sl[i], width=width)
        for name, a in zip(per_box, extra):
            _per_box(call, f"boxes[{i}]", bl[i], name, a[i], f"[{i}]")
        v.same_dtype(f"boxes[{i}]", bl[i], "boxes[0]", bl[0])
        if il is not None:
            il[i] = v.int_array(f"idxs[{i}]", il[i], bl[i].shape[0], f"boxes[{i}]")
    return (call, list(bl), list(sl), il, None, *extra)


def _flatten(call, boxes, scores, idxs, batch):
    """Per-image lists -> flat arrays and image indices (``_lists``): (boxes, scores, idxs,
    batch, lengths of the lists or None for flat input)."""
    if not _lists.is_list(boxes):
        return boxes, scores, idxs, batch, None
    xp = call.xp
    width = boxes[0].shape[1]
    boxes, batch, lengths = _lists.flatten(xp, boxes)
    return (boxes.reshape(-1, width), xp.concatenate(scores),
            xp.concatenate(idxs) if idxs is not None else None, batch, lengths)


def _flat_per_box(call, a):
    """A per-box array, or its per-image list flattened (as ``_flatten`` flattens scores)."""
    return call.xp.concatenate(a) if _lists.is_list(a) else a


def _grouped(call, result, batch, lengths):
    """Kernel result (indices grouped by image, with extras) in the caller's form."""
    if lengths is None:
        return call.wrap(result)
    idx, extras = (result[0], result[1:]) if isinstance(result, tuple) else (result, ())
    return call.wrap(_lists.split_grouped(call.xp, idx, batch, lengths, extras))


def _greedy_args(iou_threshold, score_threshold, max_output):
    """The greedy variants' scalar arguments, validated: (iou_threshold, score_threshold or
    None, max_output or -1)."""
    return (v.number("iou_threshold", iou_threshold, min=0),
            None if score_threshold is None else v.number("score_threshold", score_threshold),
            -1 if max_output is None else v.integer("max_output", max_output, min=0))


def _greedy(boxes, scores, idxs, batch_idx, iou_threshold, score_threshold, max_output, *,
            criterion="iou", beta=1.0, angles=None):
    """nms, batched_nms (``idxs``), diou_nms (``criterion="diou"``, ``beta``) and, with
    ``angles`` = (clockwise, angle_unit), nms_rotated and batched_nms_rotated: the arrays
    validated, then the scalars, then one call of the greedy kernel."""
    call, boxes, scores, idxs, batch = _prepare(boxes, scores, idxs, batch_idx,
                                                width=4 if angles is None else 5)
    thr, st, cap = _greedy_args(iou_threshold, score_threshold, max_output)
    beta = v.number("beta", beta, min=0, min_exclusive=True)
    scale = None if angles is None else v.angle_scale(*angles)
    boxes, scores, idxs, batch, lengths = _flatten(call, boxes, scores, idxs, batch)
    if angles is None:
        res = call.run(cpu.nms, cuda.nms, Nms(
            boxes=boxes, scores=scores, batch=batch, classes=idxs, iou_threshold=thr,
            score_threshold=st, max_output=cap, criterion=CRITERIA[criterion], beta=beta))
    else:
        res = call.run(cpu.nms_rotated, cuda.nms_rotated, NmsRotated(
            boxes=boxes, scores=scores, batch=batch, classes=idxs, iou_threshold=thr,
            score_threshold=st, max_output=cap, angle_scale=scale))
    return _grouped(call, res, batch, lengths)


# ---------------------------------------------------------------- public functions

@op
def nms(boxes, scores, iou_threshold, *, score_threshold=None, max_output=None, batch_idx=None):
    """Greedy non-maximum suppression (torchvision ``nms`` semantics).

    Boxes are visited in decreasing score order; a box is kept unless its IoU with an already
    kept box is ``> iou_threshold``.

    Parameters
    ----------
    boxes : array (N, 4), or list of (N_i, 4) arrays (one per image)
        ``[x1, y1, x2, y2]``, float32/float64 (float16/bfloat16 on CUDA). NumPy, CuPy or DLPack.
    scores : array (N,), or list of (N_i,) arrays
        Same dtype as boxes. NaN ranks below every number.
    iou_threshold : float
        Finite, >= 0; suppression when IoU > iou_threshold.
    score_threshold : float, optional
        Only boxes with ``score > score_threshold`` take part (NaN scores are then dropped).
    max_output : int, optional
        Keep at most this many boxes (per image with a batch).
    batch_idx : integer array (N,), optional
        Image index (>= 0) of each box; images are suppressed independently in one call.

    Returns
    -------
    keep : int64 array (K,)
        Indices into ``boxes``, in decreasing score order (ties: lower index first); with
        ``batch_idx``, grouped by increasing image index. With list input, a list of per-image
        int64 arrays of image-local indices.

    Examples
    --------
    >>> import numpy as np, fastnorm
    >>> boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]], np.float32)
    >>> scores = np.array([0.9, 0.8, 0.7], np.float32)
    >>> fastnorm.nms(boxes, scores, 0.5)
    array([0, 2])
    >>> fastnorm.nms(boxes, scores, 0.5, batch_idx=np.array([0, 1, 1]))
    array([0, 1, 2])
    >>> fastnorm.nms([boxes, boxes[:2]], [scores, scores[:2]], 0.5)
    [array([0, 2]), array([0])]
    """
    return _greedy(boxes, scores, None, batch_idx, iou_threshold, score_threshold, max_output)


@op
def batched_nms(boxes, scores, idxs, iou_threshold, *, score_threshold=None, max_output=None,
                batch_idx=None):
    """Class-aware NMS: boxes of different ``idxs`` (classes) never suppress each other.

    Exact: the result equals running :func:`nms` on each class and merging the kept boxes by
    decreasing score (ties: lower index first) -- no coordinate-offset trick, so no precision is
    lost with huge coordinates or half precision. Classes run in parallel.

    Parameters
    ----------
    boxes : array (N, 4), or list of per-image arrays
    scores : array (N,), or list of per-image arrays
    idxs : integer array (N,), or list of per-image arrays
        Class label of each box (any integers).
    iou_threshold : float
        Finite, >= 0.
    score_threshold : float, optional
        Only boxes with ``score > score_threshold`` take part.
    max_output : int, optional
        At most this many boxes in total (over all classes) per image.
    batch_idx : integer array (N,), optional
        Image index of each box (see :func:`nms`).

    Returns
    -------
    keep : int64 array (K,) (list of arrays for list input)
        Indices in decreasing score order (grouped by image with ``batch_idx``).

    Examples
    --------
    >>> import numpy as np, fastnorm
    >>> boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 10, 10]], np.float64)
    >>> scores = np.array([0.9, 0.8, 0.7])
    >>> fastnorm.batched_nms(boxes, scores, np.array([0, 0, 1]), 0.5)
    array([0, 2])
    """
    if idxs is None:
        raise TypeError("`idxs` must be an integer array of class labels, got None")
    return _greedy(boxes, scores, idxs, batch_idx, iou_threshold, score_threshold, max_output)


@op
def diou_nms(boxes, scores, iou_threshold, *, beta=1.0, score_threshold=None, max_output=None,
             batch_idx=None):
    """DIoU-NMS (Zheng et al., AAAI 2020): suppress when ``IoU - (d^2 / c^2)**beta >
    iou_threshold``, d the distance between the box centres and c the diagonal of their
    enclosing box. Boxes that do not overlap never suppress each other (iou_threshold >= 0).

    Parameters
    ----------
    boxes, scores, iou_threshold, score_threshold, max_output, batch_idx
        As in :func:`nms`.
    beta : float
        Exponent of the centre-distance penalty, > 0.

    Returns
    -------
    keep : int64 array (K,) (list of arrays for list input)

    Examples
    --------
    >>> import numpy as np, fastnorm
    >>> boxes = np.array([[0, 0, 10, 10], [2.4, 0, 12.4, 10], [20, 20, 30, 30]], np.float32)
    >>> scores = np.array([0.9, 0.8, 0.7], np.float32)
    >>> fastnorm.nms(boxes, scores, 0.6), fastnorm.diou_nms(boxes, scores, 0.6)
    (array([0, 2]), array([0, 1, 2]))
    >>> fastnorm.diou_nms(boxes, scores, 0.6, beta=2.0)
    array([0, 2])
    """
    return _greedy(boxes, scores, None, batch_idx, iou_threshold, score_threshold, max_output,
                   criterion="diou", beta=beta)


@op
def weighted_nms(boxes, scores, iou_threshold, *, score_threshold=None, max_output=None,
                 batch_idx=None):
    """Weighted NMS: greedy NMS whose kept boxes become the score-weighted mean of themselves
    and the boxes they suppress.

    A suppressed box joins the cluster of the first (highest-scored) kept box that suppresses it.
    Weights are the scores (use non-negative scores); a cluster whose weights sum to 0 keeps its
    box unchanged.

    Parameters
    ----------
    boxes, scores, iou_threshold, score_threshold, max_output, batch_idx
        As in :func:`nms`.

    Returns
    -------
    keep : int64 array (K,)
        As :func:`nms`.
    fused : array (K, 4) of boxes' dtype
        The fused box of each kept index. With list input, a list of per-image [keep, fused].

    Examples
    --------
    >>> import numpy as np, fastnorm
    >>> boxes = np.array([[0, 0, 10, 10], [2, 2, 12, 12], [20, 20, 30, 30]], np.float64)
    >>> scores = np.array([3.0, 1.0, 0.5])
    >>> keep, fused = fastnorm.weighted_nms(boxes, scores, 0.3)
    >>> keep, fused[0]
    (array([0, 2]), array([ 0.5,  0.5, 10.5, 10.5]))
    """
    call, boxes, scores, _, batch = _prepare(boxes, scores, None, batch_idx)
    thr, st, cap = _greedy_args(iou_threshold, score_threshold, max_output)
    boxes, scores, _, batch, lengths = _flatten(call, boxes, scores, None, batch)
    res = call.run(cpu.weighted_nms, cuda.weighted_nms, WeightedNms(
        boxes=boxes, scores=scores, batch=batch, iou_threshold=thr, score_threshold=st,
        max_output=cap))
    return _grouped(call, res, batch, lengths)


@op
def soft_nms(boxes, scores, *, method="gaussian", sigma=0.5, iou_threshold=0.3,
             score_threshold=0.001, batch_idx=None):
    """Soft-NMS (Bodla et al., 2017), as in OpenCV ``softNMSBoxes`` / ensemble-boxes.

    Repeatedly select the remaining box of highest current score (ties: lower index first), then
    decay every remaining box j by ``exp(-IoU^2 / sigma)`` ("gaussian") or, when IoU >
    iou_threshold, by ``1 - IoU`` ("linear"). Boxes whose score is (or falls) below
    ``score_threshold`` are dropped (NaN scores too).

    Parameters
    ----------
    boxes, scores : arrays (N, 4), (N,) or lists of per-image arrays
    method : {"gaussian", "linear"}
    sigma : float
        Gaussian width, > 0.
    iou_threshold : float
        Linear method only, finite, >= 0.
    score_threshold : float
        Finite.
    batch_idx : integer array (N,), optional
        Image index of each box (images run in parallel).

    Returns
    -------
    keep : int64 array (K,)
        Indices in selection order (grouped by image with ``batch_idx``).
    new_scores : array (K,) of scores' dtype
        The decayed score of each selected box at selection. With list input, a list of
        per-image [keep, new_scores].

    Examples
    --------
    >>> import numpy as np, fastnorm
    >>> boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 5], [20, 20, 30, 30]], np.float64)
    >>> scores = np.array([0.9, 0.8, 0.7])
    >>> keep, s = fastnorm.soft_nms(boxes, scores, method="linear", iou_threshold=0.3)
    >>> keep, s.round(3)
    (array([0, 2, 1]), array([0.9, 0.7, 0.4]))
    """
    call, boxes, scores, _, batch = _prepare(boxes, scores, None, batch_idx)
    method = DECAYS[v.choice("method", method, ("gaussian", "linear"))]
    sigma = v.number("sigma", sigma, min=0, min_exclusive=True)
    thr = v.number("iou_threshold", iou_threshold, min=0)
    st = v.number("score_threshold", score_threshold)
    boxes, scores, _, batch, lengths = _flatten(call, boxes, scores, None, batch)
    res = call.run(cpu.soft_nms, cuda.soft_nms, SoftNms(
        boxes=boxes, scores=scores, batch=batch, method=method, sigma=sigma, iou_threshold=thr,
        score_threshold=st))
    return _grouped(call, res, batch, lengths)


@op
def matrix_nms(boxes, scores, *, kernel="gaussian", sigma=2.0, batch_idx=None):
    """Matrix NMS (SOLOv2, Wang et al., 2020): every box's score decayed in parallel.

    With boxes ranked by score, ``decay_j = min(1, min_{i ranked above j} f(IoU_ij) /
    f(comp_i))`` where ``comp_i`` is the largest IoU of box i with a box ranked above it and
    ``f(x) = exp(-sigma x^2)`` ("gaussian") or ``1 - x`` ("linear"; a ratio whose denominator is
    0 imposes no decay). Returns ``scores * decay``.

    Parameters
    ----------
    boxes, scores : arrays (N, 4), (N,) or lists of per-image arrays
    kernel : {"gaussian", "linear"}
    sigma : float
        Gaussian kernel strength, > 0.
    batch_idx : integer array (N,), optional
        Image index of each box; only boxes of one image interact.

    Returns
    -------
    decayed : array (N,) of scores' dtype, aligned with the input (list for list input)

    Examples
    --------
    >>> import numpy as np, fastnorm
    >>> boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 5], [20, 20, 30, 30]], np.float64)
    >>> fastnorm.matrix_nms(boxes, np.array([0.9, 0.8, 0.7]), kernel="linear")
    array([0.9, 0.4, 0.7])
    """
    call, boxes, scores, _, batch = _prepare(boxes, scores, None, batch_idx)
    kernel = DECAYS[v.choice("kernel", kernel, ("gaussian", "linear"))]
    sigma = v.number("sigma", sigma, min=0, min_exclusive=True)
    boxes, scores, _, batch, lengths = _flatten(call, boxes, scores, None, batch)
    out = call.run(cpu.matrix_nms, cuda.matrix_nms, MatrixNms(
        boxes=boxes, scores=scores, batch=batch, kernel=kernel, sigma=sigma))
    return call.wrap(out if lengths is None else _lists.split_aligned(out, lengths))


@op
def box_iou(a, b, *, metric="iou"):
    """Pairwise IoU / GIoU / DIoU / CIoU of two sets of boxes (torchvision's ``box_iou``,
    ``generalized_box_iou``, ``distance_box_iou``, ``complete_box_iou``, eps=1e-7).

    Widths and heights are clamped at 0 (an inverted box has area 0), and a pair with zero union
    has IoU 0 rather than NaN; a NaN coordinate gives NaN. Computed in float64 on the CPU.

    Parameters
    ----------
    a : array (N, 4)
    b : array (M, 4), same dtype as ``a``
    metric : {"iou", "giou", "diou", "ciou"}

    Returns
    -------
    out : array (N, M) of the boxes' dtype

    Examples
    --------
    >>> import numpy as np, fastnorm
    >>> a = np.array([[0, 0, 2, 2]], np.float32)
    >>> b = np.array([[1, 1, 3, 3], [4, 4, 5, 5]], np.float32)
    >>> fastnorm.box_iou(a, b)
    array([[0.14285715, 0.        ]], dtype=float32)
    >>> fastnorm.box_iou(a, b, metric="giou").round(3)
    array([[-0.079, -0.8  ]], dtype=float32)
    """
    metric = METRICS[v.choice("metric", metric, tuple(METRICS))]
    call, (a, b) = resolve(a=a, b=b)
    v.boxes_and_scores(call, "a", a)
    v.boxes_and_scores(call, "b", b)
    v.same_dtype("b", b, "a", a)
    return call.wrap(call.run(cpu.box_iou, cuda.box_iou, BoxIou(a=a, b=b, metric=metric)))


# ---------------------------------------------------------------- IoU-guided and adaptive NMS

@op
def iou_guided_nms(boxes, scores, localization, iou_threshold=0.5, *, idxs=None,
                   score_threshold=None, max_output=None, batch_idx=None):
    """IoU-guided NMS (IoU-Net, Jiang et al., ECCV 2018): greedy NMS ranked by the predicted
    localization confidence; each kept box takes the highest classification score of the boxes
    it suppresses.

    Repeatedly take the remaining box m of highest ``localization`` (ties: lower index first;
    NaN ranks last), remove every remaining box j with IoU(m, j) > iou_threshold, and give m the
    score ``max(s_m, max of s_j over the boxes m removed)`` (NaN below every number). The kept
    boxes come by decreasing updated score, as in the OpenMMLab IoU-Net reimplementation
    (``batched_iou_nms``, "rank" guide); class-aware with ``idxs``, exactly (boxes of different
    classes never interact; no coordinate-offset trick).

    Parameters
    ----------
    boxes, scores : arrays (N, 4), (N,) or lists of per-image arrays
        ``scores``: the classification scores.
    localization : array (N,), or list of (N_i,) arrays
        Localization confidence (the predicted IoU with the object), same dtype as ``scores``.
    iou_threshold : float
        Finite, >= 0; suppression when IoU > iou_threshold.
    idxs : integer array (N,), or list of per-image arrays, optional
        Class label of each box; boxes of different classes never interact.
    score_threshold : float, optional
        Only boxes with ``score > score_threshold`` take part (NaN scores are then dropped).
    max_output : int, optional
        Keep at most this many boxes per image: the highest updated scores.
    batch_idx : integer array (N,), optional
        Image index of each box (see :func:`nms`).

    Returns
    -------
    keep : int64 array (K,)
        Indices into ``boxes`` by decreasing updated score (ties: lower index first); with
        ``batch_idx``, grouped by increasing image index.
    new_scores : array (K,) of scores' dtype
        The updated score of each kept box. With list input, a list of per-image
        [keep, new_scores].

    Examples
    --------
    >>> import numpy as np, fastnorm
    >>> boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]], np.float32)
    >>> scores = np.array([0.9, 0.6, 0.7], np.float32)
    >>> localization = np.array([0.7, 0.95, 0.8], np.float32)
    >>> fastnorm.iou_guided_nms(boxes, scores, localization, 0.5)
    (array([1, 2]), array([0.9, 0.7], dtype=float32))
    >>> fastnorm.iou_guided_nms(boxes, scores, localization, 0.5, idxs=np.array([0, 1, 0]))
    (array([0, 2, 1]), array([0.9, 0.7, 0.6], dtype=float32))
    """
    call, boxes, scores, idxs, batch, loc = _prepare(boxes, scores, idxs, batch_idx,
                                                     localization=localization)
    thr, st, cap = _greedy_args(iou_threshold, score_threshold, max_output)
    loc = _flat_per_box(call, loc)
    boxes, scores, idxs, batch, lengths = _flatten(call, boxes, scores, idxs, batch)
    res = call.run(cpu.iou_guided_nms, cuda.iou_guided_nms, IouGuidedNms(
        boxes=boxes, scores=scores, localization=loc, batch=batch, classes=idxs,
        iou_threshold=thr, score_threshold=st, max_output=cap))
    return _grouped(call, res, batch, lengths)


@op
def adaptive_nms(boxes, scores, densities, iou_threshold=0.5, *, method="hard", sigma=0.5,
                 score_threshold=0.001, batch_idx=None):
    """Adaptive NMS (Liu et al., CVPR 2019): the suppression threshold follows the predicted
    object density around each selected box.

    Repeatedly select the remaining box M of highest score (ties: lower index first); its
    threshold is ``N_M = max(iou_threshold, d_M)``, d_M its density. Every remaining box i with
    ``IoU(M, i) > N_M`` is removed ("hard") or has its score decayed, ``s_i * (1 - IoU)``
    ("linear") or ``s_i * exp(-IoU^2 / sigma)`` ("gaussian"). Both decays apply only above
    N_M, as the paper writes them (:func:`soft_nms`'s gaussian decays every overlap). As in
    :func:`soft_nms`, boxes whose score is (or falls) below ``score_threshold`` are dropped
    (NaN scores too): only boxes with ``score >= score_threshold`` take part.

    Densities are used as given: a NaN density counts as absent (``N_M = iou_threshold``), and
    a density >= 1 means that M suppresses nothing (IoU <= 1). Boxes of different images never
    interact; there is no ``idxs`` (run one call per class, or use ``batch_idx`` for classes).

    Parameters
    ----------
    boxes, scores : arrays (N, 4), (N,) or lists of per-image arrays
    densities : array (N,), or list of (N_i,) arrays
        Predicted object density of each box (typically in [0, 1]), same dtype as ``scores``.
    iou_threshold : float
        Finite, >= 0: the threshold in sparse regions.
    method : {"hard", "linear", "gaussian"}
    sigma : float
        Gaussian width, > 0.
    score_threshold : float
        Finite.
    batch_idx : integer array (N,), optional
        Image index of each box (images run in parallel).

    Returns
    -------
    keep : int64 array (K,)
        "hard": indices in decreasing score order, as :func:`nms`; "linear" and "gaussian":
        in selection order, as :func:`soft_nms`. Grouped by image with ``batch_idx``.
    new_scores : array (K,) of scores' dtype
        "linear" and "gaussian" only: the decayed score of each selected box at selection.
        With list input, a list of per-image results.

    Examples
    --------
    >>> import numpy as np, fastnorm
    >>> boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]], np.float64)
    >>> scores = np.array([0.9, 0.8, 0.7])
    >>> fastnorm.adaptive_nms(boxes, scores, np.array([0.2, 0.2, 0.2]), 0.5)
    array([0, 2])
    >>> fastnorm.adaptive_nms(boxes, scores, np.array([0.75, 0.2, 0.2]), 0.5)  # a crowd
    array([0, 1, 2])
    >>> keep, s = fastnorm.adaptive_nms(boxes, scores, np.array([0.6, 0.2, 0.2]), 0.5,
    ...                                 method="linear")
    >>> keep, s.round(3)
    (array([0, 2, 1]), array([0.9  , 0.7  , 0.255]))
    """
    call, boxes, scores, _, batch, dens = _prepare(boxes, scores, None, batch_idx,
                                                   densities=densities)
    method = DECAYS[v.choice("method", method, ("hard", "linear", "gaussian"))]
    sigma = v.number("sigma", sigma, min=0, min_exclusive=True)
    thr = v.number("iou_threshold", iou_threshold, min=0)
    st = v.number("score_threshold", score_threshold)
    dens = _flat_per_box(call, dens)
    boxes, scores, _, batch, lengths = _flatten(call, boxes, scores, None, batch)
    res = call.run(cpu.adaptive_nms, cuda.adaptive_nms, AdaptiveNms(
        boxes=boxes, scores=scores, densities=dens, batch=batch, method=method, sigma=sigma,
        iou_threshold=thr, score_threshold=st))
    return _grouped(call, res, batch, lengths)


# ---------------------------------------------------------------- rotated boxes

@op
def box_iou_rotated(a, b, *, clockwise=False, angle_unit="degrees"):
    """Pairwise IoU of two sets of rotated boxes (detectron2's ``pairwise_iou_rotated``, mmcv's
    ``box_iou_rotated``), from their exact intersection polygon.

    A rotated box is ``[cx, cy, w, h, angle]``: its point ``(u, v)`` in box coordinates (``u``
    along the width, ``v`` along the height, both centred) is at
    ``x = cx + u*cos(t) + v*sin(t)``, ``y = cy - u*sin(t) + v*cos(t)`` with ``t`` the angle in
    radians: counter-clockwise on an image whose y axis points down (detectron2's convention,
    ``clockwise=False``). ``clockwise=True`` negates the angles: it is mmcv's default convention
    (with ``angle_unit="radians"``: mmcv ``box_iou_rotated(..., clockwise=True)`` and
    ``nms_rotated``) and OpenCV's ``RotatedRect`` (clockwise degrees, ``angle_unit="degrees"``).

    IoU is ``inter / (area_a + area_b - inter)``, computed in float64 (also for float32 input):
    b is brought into a's frame, clipped against a's four sides (Sutherland-Hodgman) and its
    area taken (shoelace), clamped to the smaller box. Identical boxes give 1, touching boxes
    0. A box with ``w <= 0``, ``h <= 0``, a non-finite field or a bounding box of non-finite
    area has area 0 and IoU 0 with every box (itself included); there is no NaN in the result.

    Parameters
    ----------
    a : array (N, 5)
        ``[cx, cy, w, h, angle]``, float32/float64 (float16/bfloat16 on CUDA). NumPy, CuPy or
        DLPack.
    b : array (M, 5), same dtype as ``a``
    clockwise : bool
        The angles turn clockwise on screen (mmcv's ``clockwise=True``, OpenCV).
    angle_unit : {"degrees", "radians"}

    Returns
    -------
    out : array (N, M) of the boxes' dtype

    Examples
    --------
    >>> import numpy as np, fastnorm
    >>> a = np.array([[0, 0, 4, 2, 0]], np.float64)
    >>> b = np.array([[0, 0, 4, 2, 90], [0, 0, 4, 2, 0], [4, 0, 4, 2, 0]], np.float64)
    >>> fastnorm.box_iou_rotated(a, b).round(4)
    array([[0.3333, 1.    , 0.    ]])
    >>> rad = np.array([1, 1, 1, 1, np.pi / 180])
    >>> fastnorm.box_iou_rotated(a * rad, b * rad, angle_unit="radians").round(4)
    array([[0.3333, 1.    , 0.    ]])
    >>> fastnorm.box_iou_rotated(a, np.array([[1, 0, 4, 2, 30.0]]), clockwise=True).round(4)
    array([[0.4518]])
    """
    call, (a, b) = resolve(a=a, b=b)
    v.boxes_and_scores(call, "a", a, width=5)
    v.boxes_and_scores(call, "b", b, width=5)
    v.same_dtype("b", b, "a", a)
    scale = v.angle_scale(clockwise, angle_unit)
    return call.wrap(call.run(cpu.box_iou_rotated, cuda.box_iou_rotated,
                              BoxIouRotated(a=a, b=b, angle_scale=scale)))


@op
def nms_rotated(boxes, scores, iou_threshold, *, score_threshold=None, max_output=None,
                batch_idx=None, clockwise=False, angle_unit="degrees"):
    """Greedy non-maximum suppression of rotated boxes (detectron2 / mmcv ``nms_rotated``).

    :func:`nms` with the IoU of rotated boxes (:func:`box_iou_rotated`): boxes are visited in
    decreasing score order (ties: lower index first; NaN scores last); a box is kept unless its
    IoU with an already kept box is ``> iou_threshold``. A box that overlaps nothing (``w <= 0``,
    ``h <= 0``, a non-finite field) is never suppressed and suppresses nothing.

    Parameters
    ----------
    boxes : array (N, 5), or list of (N_i, 5) arrays (one per image)
        ``[cx, cy, w, h, angle]``, float32/float64 (float16/bfloat16 on CUDA). NumPy, CuPy or
        DLPack.
    scores, iou_threshold, score_threshold, max_output, batch_idx
        As in :func:`nms`.
    clockwise : bool
        The angles turn clockwise on screen (mmcv's default, OpenCV); see
        :func:`box_iou_rotated`.
    angle_unit : {"degrees", "radians"}

    Returns
    -------
    keep : int64 array (K,)
        Indices into ``boxes``, in decreasing score order (grouped by increasing image index
        with ``batch_idx``). With list input, a list of per-image arrays of local indices.

    Notes
    -----
    On the CPU the greedy sweep of :func:`nms` runs on the boxes' bounding boxes (its spatial
    grid), and each pair whose bounding boxes meet is decided by the exact rotated IoU; memory
    is O(N). mmcv's ``nms_rotated`` takes ``(boxes, scores, iou_threshold, labels=None,
    clockwise=True)`` with angles in radians: ``nms_rotated(boxes, scores, thr,
    clockwise=True, angle_unit="radians")`` here (``batched_nms_rotated`` for labels).
    detectron2's CPU ``nms_rotated`` suppresses at IoU ``>=`` the threshold (its CUDA kernel
    and torchvision's ``nms`` at ``>``): they differ only on an exact tie. OpenCV's
    ``NMSBoxesRotated`` counts a box lying entirely inside another as IoU 1 and suppresses it
    whatever their true IoU; here its IoU is its area ratio.

    Examples
    --------
    >>> import numpy as np, fastnorm
    >>> boxes = np.array([[5, 5, 10, 4, 0], [5, 5, 10, 4, 10], [5, 5, 10, 4, 90]], np.float32)
    >>> scores = np.array([0.9, 0.8, 0.7], np.float32)
    >>> fastnorm.nms_rotated(boxes, scores, 0.5)
    array([0, 2])
    >>> fastnorm.nms_rotated([boxes, boxes[1:]], [scores, scores[1:]], 0.5)
    [array([0, 2]), array([0, 1])]
    """
    return _greedy(boxes, scores, None, batch_idx, iou_threshold, score_threshold, max_output,
                   angles=(clockwise, angle_unit))


@op
def batched_nms_rotated(boxes, scores, idxs, iou_threshold, *, score_threshold=None,
                        max_output=None, batch_idx=None, clockwise=False, angle_unit="degrees"):
    """Class-aware NMS of rotated boxes: boxes of different ``idxs`` never suppress each other.

    Exact, as :func:`batched_nms`: the result equals :func:`nms_rotated` of each class merged
    by decreasing score (ties: lower index first), without a coordinate offset.

    Parameters
    ----------
    boxes : array (N, 5), or list of per-image arrays
        ``[cx, cy, w, h, angle]`` (see :func:`box_iou_rotated`).
    scores, idxs, iou_threshold, score_threshold, max_output, batch_idx
        As in :func:`batched_nms`.
    clockwise, angle_unit
        The angle convention, as in :func:`box_iou_rotated`.

    Returns
    -------
    keep : int64 array (K,) (list of arrays for list input)
        Indices in decreasing score order (grouped by image with ``batch_idx``).

    Examples
    --------
    >>> import numpy as np, fastnorm
    >>> boxes = np.array([[5, 5, 10, 4, 0], [5, 5, 10, 4, 10], [5, 5, 10, 4, 10]], np.float64)
    >>> scores = np.array([0.9, 0.8, 0.7])
    >>> fastnorm.batched_nms_rotated(boxes, scores, np.array([0, 0, 1]), 0.5)
    array([0, 2])
    """
    if idxs is None:
        raise TypeError("`idxs` must be an integer array of class labels, got None")
    return _greedy(boxes, scores, idxs, batch_idx, iou_threshold, score_threshold, max_output,
                   angles=(clockwise, angle_unit))


# ---------------------------------------------------------------- softer_nms

@op
def softer_nms(boxes, scores, variances, *, sigma_t=0.01, method="gaussian", sigma=0.5,
               iou_threshold=0.5, score_threshold=0.001, batch_idx=None):
    """Softer-NMS (He et al., "Bounding Box Regression with Uncertainty for Accurate Object
    Detection", CVPR 2019): Soft-NMS with variance voting.

    Repeatedly select the remaining box M of highest current score (ties: lower index first).
    Its coordinates become the weighted mean over M and the remaining boxes i with
    ``IoU(M, i) > 0``, each coordinate k weighted by ``p_i / variances[i, k]`` with
    ``p_i = exp(-(1 - IoU(M, i))^2 / sigma_t)`` (``p_M = 1``); the classification score
    plays no part in the vote. Then the remaining boxes are decayed as by :func:`soft_nms`:
    ``s * exp(-IoU^2 / sigma)`` ("gaussian"), ``s * (1 - IoU)`` when ``IoU > iou_threshold``
    ("linear"), or removed when ``IoU > iou_threshold`` ("hard"); boxes whose score is (or
    falls) below ``score_threshold`` are dropped (NaN scores too), as in :func:`soft_nms`.
    IoUs (votes and decays) use the original coordinates, never the voted ones; "remaining"
    means neither selected nor dropped, so a selected box votes for no later box.

    Variances: the weight of a box on coordinate k is ``p_i / variances[i, k]`` in the limit
    sense. A variance of 0 means certain: when voters with ``p_i > 0`` have variance 0 on a
    coordinate, it is their p-weighted mean alone (the limit as those variances go to 0; e.g.
    an ``exp(log_var)`` that underflowed in half precision). A variance of +inf or NaN gives
    that box no say on that coordinate; if no voter has a say, M keeps its coordinate. Negative
    variances raise ``ValueError`` (a log-variance passed by mistake). Weights are normalised
    by the smallest variance among the voters, so no variance (float64 subnormals included)
    overflows them.

    A box that overlaps nothing (degenerate, NaN coordinate, infinite area) votes for nobody,
    is never decayed, and its voted box is itself (bitwise), as is that of any box without
    overlapping remaining boxes.

    Differences from the official code (``ethanhe42/KL-Loss``,
    ``detectron/utils/py_cpu_nms.py::soft``, ``STD.METHOD = 'stdiou'``,
    ``STD.IOU_SIGMA = 0.01``): there, the voters are the remaining boxes with IoU > 0.01
    (``STD_TH`` 0.9 is lowered to 0.01 for 'stdiou'; here IoU > 0, which adds voters of weight
    at most ``exp(-0.98 / sigma_t)``, 3e-43 at the default); its Gaussian decay has a fixed
    ``sigma`` of 0.5 and no linear method; "hard" removes by ``TEST.NMS`` (0.5 by default); it
    takes standard deviations (``confidence``) and squares them, here the variances are given;
    IoUs use Detectron's legacy ``+1`` pixel convention (here continuous coordinates, as the
    rest of this module); its drop threshold is fixed (``< 0.001``) and applies only to
    decayed boxes (here boxes starting below ``score_threshold`` are dropped too, as
    :func:`soft_nms` does); its ties go to whichever box its swaps left first (here: lower
    index); a zero variance divides by zero (NaN boxes).

    Parameters
    ----------
    boxes, scores : arrays (N, 4), (N,) or lists of per-image arrays
        ``[x1, y1, x2, y2]`` and scores, float32/float64 (float16/bfloat16 on CUDA).
    variances : array (N, 4), or list of (N_i, 4) arrays
        Variance (sigma^2) of each predicted coordinate, boxes' dtype, >= 0 (0: certain;
        +inf or NaN: no say).
    sigma_t : float
        Width of the IoU weighting of the votes, > 0 (0.01: the official default).
    method : {"gaussian", "linear", "hard"}
    sigma : float
        Gaussian decay width, > 0.
    iou_threshold : float
        Linear and hard methods, finite, >= 0.
    score_threshold : float
        Finite.
    batch_idx : integer array (N,), optional
        Image index of each box (images run in parallel).

    Returns
    -------
    keep : int64 array (K,)
        Indices in selection order (grouped by image with ``batch_idx``).
    voted : array (K, 4) of boxes' dtype
        The voted box of each selected index (computed in float64 on every backend, rounded
        once to the boxes' dtype).
    new_scores : array (K,) of scores' dtype
        The decayed score of each selected box at selection. With list input, a list of
        per-image [keep, voted, new_scores].

    Examples
    --------
    >>> import numpy as np, fastnorm
    >>> boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30]], np.float64)
    >>> scores = np.array([0.9, 0.8, 0.7])
    >>> variances = np.array([[4, 1, 4, 1], [1, 1, 1, 1], [1, 1, 1, 1]], np.float64)
    >>> keep, voted, s = fastnorm.softer_nms(boxes, scores, variances, sigma_t=0.5)
    >>> keep, s.round(3)
    (array([0, 2, 1]), array([0.9 , 0.7 , 0.21]))
    >>> voted[0].round(3)      # x1, x2 pulled towards box 1, whose variance is lower
    array([ 0.789,  0.   , 10.789, 10.   ])
    """
    call, boxes, scores, _, batch, variances = _prepare(boxes, scores, None, batch_idx,
                                                        variances=variances)
    for i, var in enumerate(variances if _lists.is_list(variances) else [variances]):
        if var.shape[0] and bool((var < 0).any()):
            name = f"variances[{i}]" if _lists.is_list(variances) else "variances"
            raise ValueError(f"`{name}` must be >= 0 (the variances sigma^2 of the box "
                             "coordinates, not their logarithms), got a negative value")
    sigma_t = v.number("sigma_t", sigma_t, min=0, min_exclusive=True)
    method = DECAYS[v.choice("method", method, tuple(DECAYS))]
    sigma = v.number("sigma", sigma, min=0, min_exclusive=True)
    thr = v.number("iou_threshold", iou_threshold, min=0)
    st = v.number("score_threshold", score_threshold)
    variances = _flat_per_box(call, variances)
    boxes, scores, _, batch, lengths = _flatten(call, boxes, scores, None, batch)
    res = call.run(cpu.softer_nms, cuda.softer_nms, SofterNms(
        boxes=boxes, scores=scores, variances=variances, batch=batch, sigma_t=sigma_t,
        method=method, sigma=sigma, iou_threshold=thr, score_threshold=st))
    return _grouped(call, res, batch, lengths)


# ---------------------------------------------------------------- combined_nms

@op
def combined_nms(boxes, scores, max_output_per_class, max_total, iou_threshold=0.5,
                 score_threshold=None, *, class_agnostic=False, pre_nms_top_k=None,
                 return_indices=False):
    """Batched multi-class NMS with fixed-shape padded outputs: the deployment form of
    TensorFlow's ``combined_non_max_suppression``, TensorRT's ``EfficientNMS`` and ONNX
    ``NonMaxSuppression`` followed by a top-k.

    Per image, the *candidates* are the (box ``n``, class ``c``) pairs with ``scores[b, n, c] >
    score_threshold``; a candidate's *index* is ``n * C + c``, its position in
    ``scores[b].ravel()``. Candidates rank by decreasing score, equal scores by lower index
    (so: lower box index, then lower class). The result is exactly: per image and class, greedy
    :func:`nms` of that class's candidates (strict ``IoU > iou_threshold``, the family's
    conventions below), keeping at most ``max_output_per_class``; then the kept candidates of
    the image in rank order, the first ``max_total``. Images and classes run in parallel.

    Parameters
    ----------
    boxes : array (B, N, 4) or (B, N, C, 4)
        ``[x1, y1, x2, y2]`` shared by all classes, or one box per class (``(B, N, 1, 4)`` is
        shared too). float32/float64 (float16/bfloat16 on CUDA). NumPy, CuPy or DLPack.
    scores : array (B, N, C)
        Same dtype as boxes. (ONNX's scores are (B, C, N): transpose them.)
    max_output_per_class : int or None
        At most this many detections per image and class (>= 0); None: no per-class cap.
    max_total : int
        K, the number of output slots per image (>= 0).
    iou_threshold : float
        Finite, >= 0; a candidate is suppressed when its IoU with a kept one is > this.
    score_threshold : float, optional
        Finite; candidates have ``score > score_threshold`` (strict, as ONNX and TensorFlow;
        TensorRT keeps ``>=``). None: every score is a candidate. NaN scores never are.
    class_agnostic : bool
        One NMS over all candidates of an image, whatever their class (TensorRT
        ``class_agnostic``): a candidate suppresses any other of the image, including the same
        box's other classes. Detections keep their class, and ``max_output_per_class`` then
        caps the kept candidates of each class before ``max_total``.
    pre_nms_top_k : int, optional
        Keep only the best ``pre_nms_top_k`` candidates of each image (rank order, all classes
        together) before NMS, as TensorRT EfficientNMS (4096) and mmdetection's ``nms_pre``;
        >= 1. None: all.
    return_indices : bool
        Also return the box index ``n`` of each detection (to gather masks or features).

    Returns
    -------
    boxes : array (B, max_total, 4) of boxes' dtype
        The detections' boxes (copied unchanged, not clipped), in rank order.
    scores : array (B, max_total) of scores' dtype
    classes : int64 array (B, max_total)
    num_detections : int64 array (B,)
        Image b's detections fill its first ``num_detections[b]`` slots; the rest are 0.
    indices : int64 array (B, max_total), only with ``return_indices=True``
        The box index ``n`` into ``boxes[b]``/``scores[b]`` of each detection; -1 in the
        padding (mask with ``num_detections`` or ``indices >= 0`` before gathering).

    Notes
    -----
    Conventions of the family: a box with ``x2 <= x1`` or ``y2 <= y1`` or a NaN coordinate has
    area 0 and overlaps nothing (TensorFlow and ONNX reorder the corners instead; x and y are
    interchangeable, so their ``[y1, x1, y2, x2]`` boxes work unchanged); every decision is made
    in float64. Where the peers disagree: ties break by the candidate index (TensorFlow's sort
    is not stable, TensorRT's order of equal scores is not defined); the thresholds are strict
    (ONNX, TensorFlow); ``pre_nms_top_k`` is per image (TensorRT EfficientNMS), not per class
    (the older TensorRT BatchedNMS); ``classes`` is int64 (TensorFlow gives float32, TensorRT
    int32) and ``num_detections`` has shape (B,) (TensorFlow; TensorRT (B, 1)). Not provided:
    TensorFlow's ``clip_boxes`` (default on: clips to [0, 1]) and ``pad_per_class``, TensorRT's
    ``background_class``, ``score_activation`` and centre-size boxes (convert first). The
    greedy kernels are those of :func:`batched_nms`, so the result equals
    ``batched_nms`` of each image's candidates, capped.

    Examples
    --------
    >>> import numpy as np, fastnorm
    >>> boxes = np.array([[[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]]], np.float32)
    >>> scores = np.array([[[0.9, 0.1], [0.8, 0.7], [0.2, 0.6]]], np.float32)
    >>> b, s, c, n = fastnorm.combined_nms(boxes, scores, 5, 4, 0.5, score_threshold=0.3)
    >>> n, c, s
    (array([3]), array([[0, 1, 1, 0]]), array([[0.9, 0.7, 0.6, 0. ]], dtype=float32))
    >>> b[0, :n[0]]
    array([[ 0.,  0., 10., 10.],
           [ 1.,  1., 11., 11.],
           [20., 20., 30., 30.]], dtype=float32)
    >>> _, _, c, n, idx = fastnorm.combined_nms(boxes, scores, 5, 4, 0.5, score_threshold=0.3,
    ...                                         class_agnostic=True, return_indices=True)
    >>> n, c, idx
    (array([2]), array([[0, 1, 0, 0]]), array([[ 0,  2, -1, -1]]))
    """
    call, (boxes, scores) = resolve(boxes=boxes, scores=scores)
    v.float_array(call, "scores", scores, ndim=3)
    v.float_array(call, "boxes", boxes)
    v.same_dtype("boxes", boxes, "scores", scores)
    B, N, C = scores.shape
    want = f"(B, N, 4) or (B, N, C, 4) with (B, N, C) = {(B, N, C)} of `scores`"
    if tuple(boxes.shape[:2]) != (B, N) or boxes.ndim not in (3, 4) or boxes.shape[-1] != 4 \
            or (boxes.ndim == 4 and boxes.shape[2] not in (1, C)):
        raise ValueError(f"`boxes` must have shape {want}, got {tuple(boxes.shape)}")
    if boxes.ndim == 4 and boxes.shape[2] == 1:
        boxes = boxes.reshape(B, N, 4)
    cap = -1 if max_output_per_class is None else \
        v.integer("max_output_per_class", max_output_per_class, min=0)
    total = v.integer("max_total", max_total, min=0)
    thr = v.number("iou_threshold", iou_threshold, min=0)
    st = None if score_threshold is None else v.number("score_threshold", score_threshold)
    top = -1 if pre_nms_top_k is None else v.integer("pre_nms_top_k", pre_nms_top_k, min=1)
    res = call.run(cpu.combined_nms, cuda.combined_nms, CombinedNms(
        boxes=boxes, scores=scores, iou_threshold=thr, score_threshold=st,
        max_output_per_class=cap, max_total=total, class_agnostic=bool(class_agnostic),
        pre_nms_top_k=top))
    return call.wrap(res if return_indices else res[:4])
