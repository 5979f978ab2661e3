"""The kernel contract: the parameters of every kernel entry point, defined once.

An op module builds one of these named tuples and hands it to ``Call.run`` with the two entry
points it names statically -- ``fastnorm._cpu.<op>.<entry>`` (Cython) and
``fastnorm._cuda.<op>.<entry>`` (the CUDA launcher); both take exactly these fields as keyword
arguments, plus ``nthreads`` (the CPU's thread count; ignored on CUDA). Arrays arrive
C-contiguous and validated, on one backend; per-image lists have been flattened (see
``fastnorm._lists``), so kernels see flat arrays and per-element image indices only.
``tests/test_contract.py`` checks that both entry points of every contract accept exactly its
fields, and that the integer codes below match the constants of the ``.pyx``/``.cu`` sources.

Integer codes shared with the kernel sources (their names there in brackets):
"""
import math
from typing import Any, NamedTuple, Optional

Array = Any          # a C-contiguous NumPy or CuPy array of the call's backend

#: GroupNorm's fused activation [ACT_NONE, ACT_RELU, ACT_SILU]
ACTIVATIONS = {None: 0, "relu": 1, "silu": 2}
#: RoIAlign reduction over a bin's samples [MODE_AVG, MODE_MAX]
ROI_MODES = {"avg": 0, "max": 1}
#: greedy NMS criterion [CRIT_IOU, CRIT_DIOU, CRIT_ROTATED]; "rotated": the exact IoU of rotated
#: boxes (nms_rotated's kernels; the greedy sweep sees their bounding boxes)
CRITERIA = {"iou": 0, "diou": 1, "rotated": 2}
#: how a selected box treats the boxes it overlaps [DECAY_GAUSSIAN, DECAY_LINEAR, DECAY_HARD]:
#: Soft-NMS decays (and Matrix-NMS kernels: gaussian and linear only), or removal ("hard")
DECAYS = {"gaussian": 0, "linear": 1, "hard": 2}
#: box_iou metrics [METRIC_IOU, METRIC_GIOU, METRIC_DIOU, METRIC_CIOU]
METRICS = {"iou": 0, "giou": 1, "diou": 2, "ciou": 3}
#: rotated boxes' angle units -> radians per unit (the kernels take ``angle_scale``: radians per
#: unit of the input's angles, negated for clockwise angles; see ``_validation.angle_scale``)
ANGLE_UNITS = {"degrees": math.pi / 180, "radians": 1.0}
#: the sources' names of these codes (checked by tests/test_contract.py)
SOURCE_NAMES = {
    "ACT": ACTIVATIONS, "MODE": ROI_MODES, "CRIT": CRITERIA, "DECAY": DECAYS, "METRIC": METRICS,
}


# ---------------------------------------------------------------- group_norm

class GroupNormForward(NamedTuple):
    """-> (y, mean, rstd); mean/rstd (N, G) float64 for float64 x, else float32."""
    x: Array                 # (N, C, *spatial), or (N, *spatial, C) with channels_last
    weight: Array            # (C,)
    bias: Array              # (C,)
    num_groups: int
    eps: float
    channels_last: bool
    activation: int          # ACTIVATIONS


class GroupNormBackward(NamedTuple):
    """-> (grad_x, grad_weight (C,), grad_bias (C,))."""
    grad_out: Array
    x: Array
    mean: Array
    rstd: Array
    weight: Array
    bias: Array
    num_groups: int
    channels_last: bool
    activation: int


# ---------------------------------------------------------------- deform_conv

class DeformConvForward(NamedTuple):
    """-> y (N, C_out, Ho, Wo)."""
    x: Array                 # (N, C, H, W)
    offset: Array            # (N, 2 * G * kh * kw, Ho, Wo)
    mask: Optional[Array]    # (N, G * kh * kw, Ho, Wo) or None (DCN v1)
    weight: Array            # (C_out, C / groups, kh, kw)
    bias: Optional[Array]    # (C_out,) or None
    stride: tuple            # (sh, sw)
    padding: tuple           # (ph, pw)
    dilation: tuple          # (dh, dw)
    chunk_rows: int          # output rows per im2col chunk (the workspace bound)


class DeformConvBackward(NamedTuple):
    """-> (grad_x, grad_offset, grad_mask or None, grad_weight, grad_bias)."""
    grad_out: Array
    x: Array
    offset: Array
    mask: Optional[Array]
    weight: Array
    stride: tuple
    padding: tuple
    dilation: tuple
    chunk_rows: int


# ---------------------------------------------------------------- roi_ops
#
# rois: (K, 5) [batch index, x1, y1, x2, y2] of x's dtype (rotated RoIs: (K, 6), below), batch
# indices validated.

class RoiAlignForward(NamedTuple):
    """-> (K, C, PH, PW), or (K, PH, PW, C) with channels_last."""
    x: Array                 # (N, C, H, W), or (N, H, W, C) with channels_last
    rois: Array
    pooled_h: int
    pooled_w: int
    spatial_scale: float
    sampling_ratio: int
    aligned: bool
    mode: int                # ROI_MODES
    channels_last: bool


class RoiAlignBackward(NamedTuple):
    """-> grad_x of shape input_shape."""
    grad_out: Array
    rois: Array
    x: Optional[Array]       # needed for mode max only
    input_shape: tuple       # (N, C, H, W), or (N, H, W, C) with channels_last
    pooled_h: int
    pooled_w: int
    spatial_scale: float
    sampling_ratio: int
    aligned: bool
    mode: int
    channels_last: bool
    deterministic: bool      # CUDA: no atomics (the CPU is always deterministic)


class RoiAlignRotatedForward(NamedTuple):
    """-> (K, C, PH, PW). rois: (K, 6) [batch index, cx, cy, w, h, angle]."""
    x: Array                 # (N, C, H, W)
    rois: Array
    pooled_h: int
    pooled_w: int
    spatial_scale: float
    sampling_ratio: int
    aligned: bool
    angle_scale: float       # radians per unit of rois[:, 5], negative for clockwise angles


class RoiAlignRotatedBackward(NamedTuple):
    """-> grad_x of shape input_shape."""
    grad_out: Array          # (K, C, PH, PW)
    rois: Array
    input_shape: tuple       # (N, C, H, W)
    pooled_h: int
    pooled_w: int
    spatial_scale: float
    sampling_ratio: int
    aligned: bool
    angle_scale: float
    deterministic: bool      # CUDA: no atomics (the CPU is always deterministic)


class MultiScaleRoiAlignForward(NamedTuple):
    """-> (K, C, PH, PW), or (K, PH, PW, C) with channels_last: RoI k pooled (RoIAlign avg) on
    the level torchvision's LevelMapper gives it (see fastnorm.roi_ops.multi_scale_roi_align)."""
    features: tuple          # L maps (N, C, H_l, W_l), or (N, H_l, W_l, C) with channels_last
    rois: Array
    pooled_h: int
    pooled_w: int
    spatial_scales: tuple    # L floats, spatial_scales[l] = 2 ** -(level_min + l)
    level_min: int           # k_min = -log2(spatial_scales[0])
    canonical_scale: float
    canonical_level: int
    sampling_ratio: int
    aligned: bool
    channels_last: bool


class MultiScaleRoiAlignBackward(NamedTuple):
    """-> [grad of features[l] of shape input_shapes[l] for each level l]."""
    grad_out: Array
    rois: Array
    input_shapes: tuple      # L shapes (N, C, H_l, W_l), or (N, H_l, W_l, C) with channels_last
    pooled_h: int
    pooled_w: int
    spatial_scales: tuple
    level_min: int
    canonical_scale: float
    canonical_level: int
    sampling_ratio: int
    aligned: bool
    channels_last: bool
    deterministic: bool      # CUDA: no atomics (the CPU is always deterministic)


class RoiPoolForward(NamedTuple):
    """-> (K, C, PH, PW)."""
    x: Array
    rois: Array
    pooled_h: int
    pooled_w: int
    spatial_scale: float


class RoiPoolBackward(NamedTuple):
    """-> grad_x (N, C, H, W) (the argmax is recomputed from x)."""
    grad_out: Array
    rois: Array
    x: Array
    pooled_h: int
    pooled_w: int
    spatial_scale: float
    deterministic: bool


class PsRoiAlignForward(NamedTuple):
    """-> (K, C / (PH * PW), PH, PW)."""
    x: Array
    rois: Array
    pooled_h: int
    pooled_w: int
    spatial_scale: float
    sampling_ratio: int


class PsRoiAlignBackward(NamedTuple):
    """-> grad_x of shape input_shape (N, C, H, W)."""
    grad_out: Array
    rois: Array
    input_shape: tuple
    pooled_h: int
    pooled_w: int
    spatial_scale: float
    sampling_ratio: int
    deterministic: bool


class DeformRoiPoolForward(NamedTuple):
    """-> (K, C, PH, PW)."""
    x: Array
    rois: Array
    offset: Optional[Array]  # (K, 2, PH, PW) or None
    mask: Optional[Array]    # (K, 1, PH, PW) or None
    pooled_h: int
    pooled_w: int
    spatial_scale: float
    sampling_ratio: int
    gamma: float


class DeformRoiPoolBackward(NamedTuple):
    """-> (grad_x, grad_offset or None, grad_mask or None)."""
    grad_out: Array
    x: Array
    rois: Array
    offset: Optional[Array]
    mask: Optional[Array]
    pooled_h: int
    pooled_w: int
    spatial_scale: float
    sampling_ratio: int
    gamma: float
    deterministic: bool


# ---------------------------------------------------------------- nms
#
# boxes (N, 4) xyxy, scores (N,) of the same dtype; batch: int64 (N,) image index per box, or
# None (one image). Results are indices into the input, grouped by increasing image index and in
# decreasing score order within an image (ties: lower index first).

class Nms(NamedTuple):
    """Greedy NMS -> int64 indices."""
    boxes: Array
    scores: Array
    batch: Optional[Array]
    classes: Optional[Array]           # int64 (N,) class of each box (class-aware), or None
    iou_threshold: float
    score_threshold: Optional[float]   # only boxes with score > this take part; None: all
    max_output: int                    # per image; -1: unlimited
    criterion: int                     # CRITERIA
    beta: float                        # DIoU exponent


class WeightedNms(NamedTuple):
    """Greedy NMS whose kept boxes become their cluster's score-weighted mean -> (indices,
    fused boxes (K, 4))."""
    boxes: Array
    scores: Array
    batch: Optional[Array]
    iou_threshold: float
    score_threshold: Optional[float]
    max_output: int


class SoftNms(NamedTuple):
    """-> (indices in selection order, scores at selection)."""
    boxes: Array
    scores: Array
    batch: Optional[Array]
    method: int                        # DECAYS
    sigma: float
    iou_threshold: float
    score_threshold: float


class MatrixNms(NamedTuple):
    """-> decayed scores (N,), aligned with the input."""
    boxes: Array
    scores: Array
    batch: Optional[Array]
    kernel: int                        # DECAYS
    sigma: float


class BoxIou(NamedTuple):
    """-> (N, M) metric of the boxes' dtype."""
    a: Array
    b: Array
    metric: int                        # METRICS


class NmsRotated(NamedTuple):
    """Greedy NMS of rotated boxes (the IoU of the exact intersection polygon) -> int64
    indices, as Nms."""
    boxes: Array                       # (N, 5) (cx, cy, w, h, angle)
    scores: Array
    batch: Optional[Array]
    classes: Optional[Array]           # int64 (N,) class of each box (class-aware), or None
    iou_threshold: float
    score_threshold: Optional[float]   # only boxes with score > this take part; None: all
    max_output: int                    # per image; -1: unlimited
    angle_scale: float                 # radians per unit of angle, negative for clockwise


class BoxIouRotated(NamedTuple):
    """-> (N, M) IoU of rotated boxes, of the boxes' dtype (computed in float64)."""
    a: Array                           # (N, 5) (cx, cy, w, h, angle)
    b: Array                           # (M, 5)
    angle_scale: float                 # radians per unit of angle, negative for clockwise


class IouGuidedNms(NamedTuple):
    """IoU-guided NMS (IoU-Net) -> (indices, updated scores of the scores' dtype), grouped by
    image, in decreasing updated score within an image (ties: lower index first). Greedy NMS
    ranked by localization; a kept box takes the highest score of the boxes it removed."""
    boxes: Array
    scores: Array                      # classification scores
    localization: Array                # (N,) localization confidence: the ranking key
    batch: Optional[Array]
    classes: Optional[Array]           # int64 (N,) class of each box (class-aware), or None
    iou_threshold: float
    score_threshold: Optional[float]   # only boxes with score > this take part; None: all
    max_output: int                    # per image, by updated score; -1: unlimited


class AdaptiveNms(NamedTuple):
    """Adaptive NMS -> indices as Nms (method DECAY_HARD), or (indices in selection order,
    scores at selection) as SoftNms. A selected box suppresses (decays) above the threshold
    max(iou_threshold, its density); a NaN density counts as absent."""
    boxes: Array
    scores: Array
    densities: Array                   # (N,) predicted object density of each box
    batch: Optional[Array]
    method: int                        # DECAYS
    sigma: float
    iou_threshold: float
    score_threshold: float             # only boxes with score >= this take part (and stay)


class SofterNms(NamedTuple):
    """Soft-NMS with variance voting -> (indices in selection order, voted boxes (K, 4) of the
    boxes' dtype, scores at selection)."""
    boxes: Array
    scores: Array
    variances: Array                   # (N, 4), boxes' dtype; no negative values (validated)
    batch: Optional[Array]
    sigma_t: float                     # voting weight exp(-(1 - IoU)^2 / sigma_t)
    method: int                        # DECAYS (gaussian, linear or hard)
    sigma: float
    iou_threshold: float
    score_threshold: float
class CombinedNms(NamedTuple):
    """Fixed-shape batched NMS -> (boxes (B, K, 4), scores (B, K), classes (B, K) int64,
    num_detections (B,) int64, indices (B, K) int64 box index or -1), K = max_total; the
    detections of image b in its first num_detections[b] slots, the rest zero (indices -1).
    Candidates are (box n, class c) pairs of an image, indexed f = n * C + c."""
    boxes: Array                       # (B, N, 4) shared by the classes, or (B, N, C, 4)
    scores: Array                      # (B, N, C)
    iou_threshold: float
    score_threshold: Optional[float]   # candidates: score > this; None: every non-NaN score
    max_output_per_class: int          # per image and class; -1: unlimited
    max_total: int                     # K, per image
    class_agnostic: bool               # one NMS over all the classes of an image
    pre_nms_top_k: int                 # best candidates per image kept before NMS; -1: all


#: (op module, entry point) -> its contract, for tests/test_contract.py
CONTRACTS = {
    ("group_norm", "forward"): GroupNormForward,
    ("group_norm", "backward"): GroupNormBackward,
    ("deform_conv", "forward"): DeformConvForward,
    ("deform_conv", "backward"): DeformConvBackward,
    ("roi_ops", "roi_align_forward"): RoiAlignForward,
    ("roi_ops", "roi_align_backward"): RoiAlignBackward,
    ("roi_ops", "roi_align_rotated_forward"): RoiAlignRotatedForward,
    ("roi_ops", "roi_align_rotated_backward"): RoiAlignRotatedBackward,
    ("roi_ops", "multi_scale_roi_align_forward"): MultiScaleRoiAlignForward,
    ("roi_ops", "multi_scale_roi_align_backward"): MultiScaleRoiAlignBackward,
    ("roi_ops", "roi_pool_forward"): RoiPoolForward,
    ("roi_ops", "roi_pool_backward"): RoiPoolBackward,
    ("roi_ops", "ps_roi_align_forward"): PsRoiAlignForward,
    ("roi_ops", "ps_roi_align_backward"): PsRoiAlignBackward,
    ("roi_ops", "deform_roi_pool_forward"): DeformRoiPoolForward,
    ("roi_ops", "deform_roi_pool_backward"): DeformRoiPoolBackward,
    ("nms", "nms"): Nms,
    ("nms", "weighted_nms"): WeightedNms,
    ("nms", "soft_nms"): SoftNms,
    ("nms", "matrix_nms"): MatrixNms,
    ("nms", "box_iou"): BoxIou,
    ("nms", "nms_rotated"): NmsRotated,
    ("nms", "box_iou_rotated"): BoxIouRotated,
    ("nms", "iou_guided_nms"): IouGuidedNms,
    ("nms", "adaptive_nms"): AdaptiveNms,
    ("nms", "softer_nms"): SofterNms,
    ("nms", "combined_nms"): CombinedNms,
}
