"""Argument checks shared by the op modules, with one wording for every error.

ValueError for shapes and values, TypeError for dtypes and kinds of object; the message always
names the argument and says what was expected and what came.
"""
import math
import numbers

import numpy as np

from ._kernels import ANGLE_UNITS

CPU_FLOATS = ("float32", "float64")
CUDA_FLOATS = ("float32", "float64", "float16", "bfloat16")


def float_array(call, name, a, *, min_ndim=None, ndim=None):
    """Check that ``a`` is a floating array the backend supports, with the given rank."""
    dtype = a.dtype.name
    allowed = CPU_FLOATS if call.backend == "cpu" else CUDA_FLOATS
    if dtype not in allowed:
        extra = (" (float16/bfloat16 are supported on CUDA; cast to float32 for the CPU)"
                 if dtype in CUDA_FLOATS else "")
        raise TypeError(f"`{name}` must have a floating dtype in {allowed} on the "
                        f"{call.backend.upper()} backend, got {dtype}{extra}")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"`{name}` must be {ndim}-D, got shape {tuple(a.shape)}")
    if min_ndim is not None and a.ndim < min_ndim:
        raise ValueError(f"`{name}` must have at least {min_ndim} dimensions, got shape "
                         f"{tuple(a.shape)}")
    return a


def same_dtype(name, a, ref_name, ref):
    """``a`` must share ``ref``'s dtype (no silent mixed precision)."""
    if a is not None and a.dtype != ref.dtype:
        raise TypeError(f"`{name}` must have the dtype of `{ref_name}` ({ref.dtype}), got {a.dtype}")
    return a


def shape(name, a, expected, what=None):
    """``a.shape`` must equal ``expected`` (``None`` entries match any size)."""
    got = tuple(a.shape)
    if len(got) != len(expected) or any(e is not None and e != g for e, g in zip(expected, got)):
        want = what or "(" + ", ".join("*" if e is None else str(e) for e in expected) + \
            ("," if len(expected) == 1 else "") + ")"
        raise ValueError(f"`{name}` must have shape {want}, got {got}")
    return a


def integer(name, v, *, min=None, max=None):
    """A Python/NumPy integer (bool rejected) within bounds."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"`{name}` must be an int, got {type(v).__name__}")
    v = int(v)
    if min is not None and v < min:
        raise ValueError(f"`{name}` must be >= {min}, got {v}")
    if max is not None and v > max:
        raise ValueError(f"`{name}` must be <= {max}, got {v}")
    return v


def number(name, v, *, min=None, max=None, min_exclusive=False):
    """A finite real number within bounds, as a Python float."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"`{name}` must be a real number, got {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"`{name}` must be finite, got {v}")
    if min is not None and (v <= min if min_exclusive else v < min):
        raise ValueError(f"`{name}` must be {'>' if min_exclusive else '>='} {min}, got {v}")
    if max is not None and v > max:
        raise ValueError(f"`{name}` must be <= {max}, got {v}")
    return v


def choice(name, v, choices):
    """``v`` must be one of ``choices``."""
    if v not in choices:
        raise ValueError(f"`{name}` must be one of {choices}, got {v!r}")
    return v


def angle_scale(clockwise, angle_unit):
    """Rotated boxes' angle convention -> the kernels' ``angle_scale`` (radians per unit of the
    given angles; negative for clockwise angles, detectron2's counter-clockwise being positive)."""
    if not isinstance(clockwise, (bool, numbers.Integral)) or clockwise not in (0, 1):
        raise TypeError(f"`clockwise` must be a bool, got {clockwise!r}")
    scale = ANGLE_UNITS[choice("angle_unit", angle_unit, tuple(ANGLE_UNITS))]
    return -scale if clockwise else scale


def pair(name, v, *, min=None):
    """An int or a pair of ints -> tuple of two ints within bounds."""
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ValueError(f"`{name}` must be an int or a pair of ints, got {v!r}")
        return tuple(integer(name, e, min=min) for e in v)
    v = integer(name, v, min=min)
    return (v, v)


def int_array(name, a, n, ref_name):
    """None, or an integer array of shape (n,) (one entry per row of `ref_name`), as int64."""
    if a is None:
        return None
    if a.dtype.kind not in "iu":
        raise TypeError(f"`{name}` must be an integer array, got dtype {a.dtype}")
    if a.ndim != 1 or a.shape[0] != n:
        raise ValueError(f"`{name}` must have shape ({n},) to match `{ref_name}`, got "
                         f"{tuple(a.shape)}")
    return a.astype("int64", copy=False)


def boxes_and_scores(call, bname, boxes, sname=None, scores=None, *, width=4):
    """(N, width) floating boxes (4: xyxy, 5: rotated) and, when given, (N,) scores of the
    same dtype."""
    float_array(call, bname, boxes)
    shape(bname, boxes, (None, width), f"(N, {width})")
    if scores is not None:
        float_array(call, sname, scores)
        same_dtype(sname, scores, bname, boxes)
        shape(sname, scores, (boxes.shape[0],), f"({boxes.shape[0]},) to match `{bname}`")


def same_list_length(name, a, n):
    """A list/tuple of ``n`` per-image arrays, like the first list argument."""
    if not isinstance(a, (list, tuple)) or len(a) != n:
        raise ValueError(f"`{name}` must be a list of {n} arrays like `boxes`")


def input_shape(name, s):
    """Four non-negative ints (the shape of an (N, C, H, W) or (N, H, W, C) array)."""
    try:
        out = tuple(int(d) for d in s)
        ok = len(out) == 4 and all(d >= 0 for d in out) and all(int(d) == d for d in s)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"`{name}` must be 4 non-negative ints (the shape of x), got {s!r}")
    return out


def rois(call, rois, ref, ref_name, N, width=4):
    """(K, width + 1) RoIs ``[batch_index, <width coordinates>]`` of `ref_name`'s dtype (width 4:
    ``x1, y1, x2, y2``; 5: rotated ``cx, cy, w, h, angle``), batch indices integers in [0, N);
    or a list of per-image (K_i, width) arrays (at most N of them). Checking the indices of an
    array on CUDA reads one flag back from the device."""
    if isinstance(rois, (list, tuple)):
        if len(rois) > N:
            raise ValueError(f"`rois` has {len(rois)} per-image entries but `{ref_name}` has "
                             f"only {N} images")
        for i, r in enumerate(rois):
            if r.ndim != 2 or r.shape[1] != width:
                raise ValueError(f"`rois` entry {i} must have shape (K_{i}, {width}), got "
                                 f"{tuple(r.shape)}")
            if r.dtype != ref.dtype:
                raise TypeError(f"`rois` entry {i} must have the dtype of `{ref_name}` "
                                f"({ref.dtype}), got {r.dtype}")
        return
    shape("rois", rois, (None, width + 1), f"(K, {width + 1})")
    if rois.dtype != ref.dtype:
        raise TypeError(f"`rois` must have the dtype of `{ref_name}` ({ref.dtype}), "
                        f"got {rois.dtype}")
    if rois.shape[0]:
        if call.backend == "cuda":
            from ._cuda.roi_ops import batch_indices_ok
            ok = batch_indices_ok(rois, N)
        else:
            b = rois[:, 0]
            ok = bool(((b == np.floor(b)) & (b >= 0) & (b < N)).all())
        if not ok:
            raise ValueError(f"`rois` batch indices (column 0) must be integers in [0, {N}) "
                             f"(the batch size of `{ref_name}`)")


def feature_levels(call, name, features, channels_last):
    """A non-empty list of 4-D floating maps (one per pyramid level) of one dtype, batch size
    and channel count: -> (N, C)."""
    c_axis = 3 if channels_last else 1
    x0 = features[0]
    for i, f in enumerate(features):
        float_array(call, f"{name}[{i}]", f, ndim=4)
        if i == 0:
            continue
        same_dtype(f"{name}[{i}]", f, f"{name}[0]", x0)
        if f.shape[0] != x0.shape[0]:
            raise ValueError(f"`{name}[{i}]` must have the batch size of `{name}[0]` "
                             f"({x0.shape[0]}), got shape {tuple(f.shape)}")
        if f.shape[c_axis] != x0.shape[c_axis]:
            layout = "(N, H, W, C) with channels_last" if channels_last else "(N, C, H, W)"
            raise ValueError(f"`{name}[{i}]` must have the channel count of `{name}[0]` "
                             f"({x0.shape[c_axis]}; layout {layout}), got shape "
                             f"{tuple(f.shape)}")
    return x0.shape[0], x0.shape[c_axis]


def level_list(name, seq):
    """A non-empty list/tuple (one entry per pyramid level) -> list."""
    if not isinstance(seq, (list, tuple)):
        raise TypeError(f"`{name}` must be a list of arrays, one per pyramid level, got "
                        f"{type(seq).__name__}")
    if len(seq) == 0:
        raise ValueError(f"`{name}` must hold at least one pyramid level, got an empty list")
    return list(seq)


def pyramid_scales(name, scales, L, default_min=2):
    """Per-level spatial scales 2**-k, 2**-(k+1), ... (halving from one level to the next, as
    torchvision's level mapper assumes); None: 2**-default_min onwards (FPN P2 = 1/4, ...).
    -> (tuple of L floats, k)."""
    if scales is None:
        return tuple(2.0 ** -(default_min + i) for i in range(L)), default_min
    if not isinstance(scales, (list, tuple)):
        try:
            scales = [float(s) for s in scales]
        except TypeError:
            raise TypeError(f"`{name}` must be a sequence of {L} floats (one per level), got "
                            f"{type(scales).__name__}") from None
    if len(scales) != L:
        raise ValueError(f"`{name}` must have one scale per feature level ({L}), got "
                         f"{len(scales)}")
    scales = tuple(number(name, s, min=0, min_exclusive=True) for s in scales)
    k = round(-math.log2(scales[0]))
    if any(s != 2.0 ** -(k + i) for i, s in enumerate(scales)):
        raise ValueError(f"`{name}` must be powers of two halving from one level to the next "
                         f"(2**-k, 2**-(k+1), ...), got {list(scales)}")
    return scales, k
