"""CUDA launchers of roi_ops.cu: the entry points of ``fastnorm._kernels`` (RoiAlignForward, ...),
as ``fastnorm._cpu.roi_ops`` (the trailing ``nthreads`` is ignored). The RoIAlign forward reads
and writes channels-last arrays as they lie; the backward kernels are NCHW: channels-last arrays
are transposed around them here."""
import functools

import numpy as np

from .._kernels import ROI_MODES
from . import MAX_GRID, cdiv, ctype, cupy, function, i64, instantiate, launch, run

_NS = "fastnorm::roi_ops::"
_KERNELS = ("align_fwd", "align_bwd", "align_bwd_count", "align_bwd_records", "align_bwd_tile",
            "align_bwd_det", "deform_bwd_offmask", "pool_fwd", "pool_bwd", "pool_bwd_det",
            "pool_bwd_records", "pool_bwd_gather", "rois_check", "fpn_levels")
_EXPRS = tuple(e for k in _KERNELS for e in instantiate(_NS + k + "<{}>"))
KIND_ALIGN, KIND_PS, KIND_DEFORM, KIND_ROTATED = 0, 1, 2, 3   # kernel family (KIND_* in roi_ops.cu)
AVG = ROI_MODES["avg"]   # the RoIAlign mode of multi-scale RoIAlign and the PS / deformable kinds
MAX = ROI_MODES["max"]
RB = 8      # rows of grad_x owned by one thread of the row-owner deterministic backward
TILE_THREADS, TILE_PIXELS = 256, 4   # the tiles of align_bwd_tile (TILE_* in roi_ops.cu)
# Bytes the deterministic RoIAlign backward may allocate for its records; past it the row-owner
# kernel align_bwd_det runs instead (same determinism, far fewer threads). The workspace is
# R x (32 + 4 x acc bytes) (a sort key, its sorted copy and permutation, the grad_out row and 4
# weights per record) + 16 bytes per anchor (planes x H x W + 1) + a transposed grad_out, with
# R = K x PH x PW x sr^2 records (avg; adaptive sampling: the bins' sample counts, summed) or
# K x C x PH x PW (max); planes = N (avg), N x PH x PW (PS), N x C (max). FPN P2 (1000 RoIs,
# 7x7, sr 2, 2 x 200 x 272, 256 channels): 196k records, ~61 MB with grad_out. Tests shrink it.
# The deterministic RoIPool backward (_pool_backward_records) keeps to the same limit with
# POOL_RECORD_BYTES per record, R = K x C x PH x PW records; past it pool_bwd_det runs instead.
# FPN P2 at 256 channels: 12.5M records, ~400 MB.
DET_WORKSPACE_BYTES = 1 << 30
POOL_RECORD_BYTES = 32    # its int64 sort key, the sorted copy and the sort's scratch, with room


def _k(name, dtype):
    return function("roi_ops", f"{_NS}{name}<{ctype(dtype)}>", _EXPRS)


def _params(K, N, C, CO, H, W, PH, PW, sr=0, kind=0, mode=0, aligned=0, has_offset=0,
            has_mask=0, scale=1.0, gamma=0.0, angle_scale=0.0):
    """The kernels' scalar parameters (PARAM_ARGS in roi_ops.cu). Only built for a launch: an
    empty result may have an output_size beyond int32, which a launch never sees."""
    i32 = np.int32
    return (i64(K), i64(N), i64(C), i64(CO), i64(H), i64(W), i32(PH), i32(PW), i32(sr),
            i32(kind), i32(mode), i32(aligned), i32(has_offset), i32(has_mask),
            np.float64(scale), np.float64(gamma), np.float64(angle_scale))


CHECK_THREADS = 1024      # the one block of rois_check


def batch_indices_ok(rois, N):
    """Whether every batch index of ``rois`` (column 0 of a non-empty 2-D array) is an integer in
    [0, N): one launch (rois_check) and one flag read back (a synchronisation)."""
    cp = cupy()
    rois = cp.ascontiguousarray(rois)                    # (a copy only when it is not)
    ok = cp.empty(1, dtype=np.int32)                     # rois_check writes it
    K = rois.shape[0]
    run(_k("rois_check", rois.dtype), 1, min(CHECK_THREADS, cdiv(K, 32) * 32),
        (rois, i64(K), i64(rois.shape[1]), i64(N), ok))
    return bool(ok.get()[0])


def _acc_dtype(dtype):
    return np.float64 if str(dtype) == "float64" else np.float32


def _segments(cp, rois, N):
    """RoI indices grouped by image, in index order within an image (unique sort keys, so the
    order does not depend on the sort's stability), and the per-image bounds."""
    K = rois.shape[0]
    b = rois[:, 0].astype(cp.int64)
    order = cp.argsort(b * K + cp.arange(K, dtype=cp.int64))
    order = cp.ascontiguousarray(order.astype(cp.int64))
    seg = cp.searchsorted(b[order], cp.arange(N + 1, dtype=cp.int64)).astype(cp.int64)
    return order, cp.ascontiguousarray(seg)


def _dummy(cp, dtype):
    return cp.zeros(1, dtype=dtype)


# The forward (align_fwd): one block of at most FWD_THREADS threads per (RoI, block of channels),
# about FWD_OUTPUTS outputs per block; the RoI's samples' corners and weights are tabled in
# FWD_TABLE_BYTES of shared memory (FWD_* in roi_ops.cu). 32-bit index arithmetic when every
# index into x and out (and a block's stride past the last) is at most INDEX32_MAX.
FWD_THREADS, FWD_TABLE_BYTES, FWD_OUTPUTS = 256, 16384, 1024
INDEX32_MAX = 2**31 - 1 - FWD_THREADS
# align_fwd_thread: the previous forward (one thread per output), the reference (tests)
_EXPRS += tuple(instantiate(_NS + "align_fwd_thread<{}>"))


def _align_forward(x, rois, offset, mask, PH, PW, CO, prm, *, channels_last=False, out=None,
                   level=None):
    """align_fwd on x (NCHW, or NHWC when channels_last) into a new (K, CO, PH, PW) array (NHWC:
    (K, PH, PW, CO)), or, with ``level`` = (lev, l, L) (a multi-scale level's launch: lev the
    RoIs' levels from fpn_levels), into the rows of ``out`` whose RoIs have level l (l = 0
    also writes zeros into the rows of level L); prm() gives the kernel's parameters (its K:
    the RoIs launched). No device operation besides the launch (absent arguments are empty
    arrays: NULL)."""
    cp = cupy()
    if out is None:
        K = rois.shape[0]
        out = cp.empty((K, PH, PW, CO) if channels_last else (K, CO, PH, PW), dtype=x.dtype)
        if out.size == 0:
            return out
    lev, lvl, L = level if level is not None else (cp.empty(0, dtype=cp.int64), -1, 0)
    if x.size == 0:                       # an empty map (N, C > 0 here): every output is 0
        if level is None:
            out[...] = 0
        else:
            rows = (lev == lvl) | ((lev == L) if lvl == 0 else False)
            out[...] = cp.where(rows.reshape((-1,) + (1,) * (out.ndim - 1)), 0, out)
        return out
    nb = PH * PW
    cb = min(CO, cdiv(FWD_OUTPUTS, nb))
    if channels_last and cb < CO:         # whole warps of channels
        cb = min(CO, cdiv(cb, 32) * 32)
    K = rois.shape[0]
    units = K * cdiv(CO, cb)
    threads = min(FWD_THREADS, cdiv(cb * nb, 32) * 32)
    none = cp.empty(0, dtype=x.dtype)
    idx32 = max(x.size, out.size) <= INDEX32_MAX
    run(_k("align_fwd", x.dtype), min(units, MAX_GRID[0]), threads,
        (x, rois, none if offset is None else offset, none if mask is None else mask, lev, out,
         np.int32(lvl), np.int32(L), np.int32(channels_last), np.int32(cb), np.int32(idx32))
        + prm(K))
    return out


def _align_forward_thread(x, rois, offset, mask, PH, PW, CO, prm):
    """The previous forward (align_fwd_thread: one thread per output, NCHW): the reference of
    align_fwd in the tests (bitwise on the emulator)."""
    cp = cupy()
    out = cp.zeros((rois.shape[0], CO, PH, PW), dtype=x.dtype)
    d = _dummy(cp, x.dtype)
    launch(_k("align_fwd_thread", x.dtype), out.size if x.size else 0,
           (x, rois, d if offset is None else offset, d if mask is None else mask, out) +
           prm(rois.shape[0]))
    return out


def _align_backward(dy, x, rois, offset, mask, N, C, H, W, prm, deterministic, level=None):
    """grad_x (N, C, H, W) of the RoIAlign kinds (NCHW). ``level`` = (lev, l): a multi-scale
    level's atomic backward over all the RoIs, those of level l only (not deterministic)."""
    cp = cupy()
    dtype = dy.dtype
    if N * C * H * W == 0 or rois.shape[0] == 0:
        return cp.zeros((N, C, H, W), dtype=_acc_dtype(dtype)).astype(dtype, copy=False)
    d = _dummy(cp, dtype)
    xa = d if x is None else x
    off = d if offset is None else offset
    msk = d if mask is None else mask
    if deterministic:
        gx = _align_backward_tiles(dy, xa, rois, off, msk, prm)
        if gx is not None:
            return gx
    gacc = cp.zeros((N, C, H, W), dtype=_acc_dtype(dtype))
    if deterministic:
        order, seg = _segments(cp, rois, N)
        nrb = (H + RB - 1) // RB
        launch(_k("align_bwd_det", dtype), N * C * nrb,
               (dy, xa, rois, off, msk, order, seg, gacc, np.int32(RB)) + prm())
    else:
        lev, lvl = level if level is not None else (cp.empty(0, dtype=cp.int64), -1)
        launch(_k("align_bwd", dtype), dy.size,
               (dy, xa, rois, off, msk, gacc, lev, np.int32(lvl)) + prm())
    return gacc.astype(dtype, copy=False)


def _align_backward_tiles(dy, x, rois, offset, mask, prm):
    """The deterministic RoIAlign backward (all kinds) as records sorted by the pixel they land
    on, summed per tile of grad_x in a fixed order (roi_ops.cu, "deterministic backward"); None
    when the workspace would exceed DET_WORKSPACE_BYTES (or the sort keys 63 bits). One host
    synchronisation (the record count) with adaptive sampling in avg mode, none otherwise."""
    cp = cupy()
    K, N, C, CO, H, W, PH, PW, sr, kind, mode = (int(v) for v in prm()[:11])
    dtype, nb = dy.dtype, PH * PW
    planes = N * C if mode == MAX else N * nb if kind == KIND_PS else N   # det_plane in the .cu
    anchors = planes * H * W
    groups = K * CO * nb if mode == MAX else K * nb                      # det_groups
    if mode == MAX or sr > 0:            # sr x sr samples per bin (max: one)
        per = 1 if mode == MAX else sr * sr
        start = cp.arange(groups + 1, dtype=cp.int64) * per
        R = groups * per
    else:
        count = cp.empty(groups, dtype=cp.int64)
        launch(_k("align_bwd_count", dtype), groups, (rois, offset, count) + prm())
        start = cp.zeros(groups + 1, dtype=cp.int64)
        start[1:] = cp.cumsum(count)
        R = int(start[-1])
    acc = np.dtype(_acc_dtype(dtype))
    need = R * (4 * 8 + 4 * acc.itemsize) + (anchors + 1) * 16 + dy.nbytes + start.nbytes
    if need > DET_WORKSPACE_BYTES or (anchors + 1) * max(R, 1) >= 2**63:
        return None
    gx = cp.empty((N, C, H, W), dtype=dtype)
    if R == 0:
        gx[...] = 0
        return gx
    key = cp.empty(R, dtype=cp.int64)
    src = cp.empty(R, dtype=cp.int64)
    wt = cp.empty(4 * R, dtype=acc)
    launch(_k("align_bwd_records", dtype), groups,
           (x, rois, offset, mask, start, key, src, wt) + prm())
    perm = cp.ascontiguousarray(cp.argsort(key).astype(cp.int64))    # unique keys
    bounds = cp.searchsorted(key[perm], cp.arange(anchors + 1, dtype=cp.int64) * R)
    bounds = cp.ascontiguousarray(bounds.astype(cp.int64))
    dyt = cp.ascontiguousarray(dy.reshape(K, CO, nb).transpose(0, 2, 1))
    TC = min(32, 1 << ((CO if kind == KIND_PS else C) - 1).bit_length())   # channel lanes
    by = TILE_THREADS // TC
    groups_per_image = nb * cdiv(CO, TC) if kind == KIND_PS else cdiv(C, TC)  # tile_groups
    tiles = N * groups_per_image * cdiv(H * W, TILE_PIXELS * by)
    run(_k("align_bwd_tile", dtype), min(tiles, MAX_GRID[0]), (TC, by),
        (dyt, perm, bounds, src, wt, gx) + prm())
    return gx


def _nchw(cp, a, channels_last):
    """The backward kernels are NCHW: channels-last arrays are transposed around them."""
    return cp.ascontiguousarray(a.transpose(0, 3, 1, 2)) if channels_last else a


def _nhwc(cp, a, channels_last):
    return cp.ascontiguousarray(a.transpose(0, 2, 3, 1)) if channels_last else a


# The contracts of fastnorm._kernels (RoiAlignForward, ...); ``nthreads`` is ignored.

def roi_align_forward(x, rois, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned, mode,
                      channels_last, nthreads):
    return _roi_align(x, rois, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned, mode,
                      channels_last)


def _roi_align(x, rois, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned, mode,
               channels_last, out=None, level=None):
    """RoIAlign forward (out, level: a multi-scale level's launch, see _align_forward). The
    kernel reads and writes channels-last arrays as they lie."""
    N, H, W, C = x.shape if channels_last else (x.shape[i] for i in (0, 2, 3, 1))

    def prm(K):
        return _params(K, N, C, C, H, W, pooled_h, pooled_w, sampling_ratio, KIND_ALIGN, mode,
                       int(aligned), scale=spatial_scale)
    return _align_forward(x, rois, None, None, pooled_h, pooled_w, C, prm,
                          channels_last=channels_last, out=out, level=level)


def roi_align_backward(grad_out, rois, x, input_shape, pooled_h, pooled_w, spatial_scale,
                       sampling_ratio, aligned, mode, channels_last, deterministic, nthreads):
    cp = cupy()
    return _roi_align_backward(_nchw(cp, grad_out, channels_last),
                               None if x is None else _nchw(cp, x, channels_last), rois,
                               input_shape, pooled_h, pooled_w, spatial_scale, sampling_ratio,
                               aligned, mode, channels_last, deterministic)


def _roi_align_backward(dy, x, rois, input_shape, pooled_h, pooled_w, spatial_scale,
                        sampling_ratio, aligned, mode, channels_last, deterministic, level=None):
    """roi_align_backward with grad_out (dy) and x already NCHW (``level``: a multi-scale
    level's launch, see _align_backward); grad_x in the layout of ``input_shape``."""
    cp = cupy()
    N, C, H, W = (input_shape[i] for i in ((0, 3, 1, 2) if channels_last else range(4)))
    prm = functools.partial(_params, rois.shape[0], N, C, C, H, W, pooled_h, pooled_w,
                            sampling_ratio, KIND_ALIGN, mode, int(aligned), scale=spatial_scale)
    gx = _align_backward(dy, x, rois, None, None, N, C, H, W, prm, deterministic, level)
    return _nhwc(cp, gx, channels_last)


def roi_align_rotated_forward(x, rois, pooled_h, pooled_w, spatial_scale, sampling_ratio,
                              aligned, angle_scale, nthreads):
    N, C, H, W = x.shape
    prm = functools.partial(_params, N=N, C=C, CO=C, H=H, W=W, PH=pooled_h, PW=pooled_w,
                            sr=sampling_ratio, kind=KIND_ROTATED, mode=0, aligned=int(aligned),
                            scale=spatial_scale, angle_scale=angle_scale)
    return _align_forward(x, rois, None, None, pooled_h, pooled_w, C, prm)


def roi_align_rotated_backward(grad_out, rois, input_shape, pooled_h, pooled_w, spatial_scale,
                               sampling_ratio, aligned, angle_scale, deterministic, nthreads):
    N, C, H, W = input_shape
    prm = functools.partial(_params, rois.shape[0], N, C, C, H, W, pooled_h, pooled_w,
                            sampling_ratio, KIND_ROTATED, 0, int(aligned), scale=spatial_scale,
                            angle_scale=angle_scale)
    return _align_backward(grad_out, None, rois, None, None, N, C, H, W, prm, deterministic)


def _fpn_levels(cp, rois, L, level_min, canonical_scale, canonical_level):
    """Each RoI's level (fpn_levels: torchvision's LevelMapper, as fastnorm._cpu.roi_ops
    computes it; L for a NaN level, pooled nowhere), an int64 device array: one launch."""
    K = rois.shape[0]
    lev = cp.empty(K, dtype=cp.int64)                    # fpn_levels writes every entry
    launch(_k("fpn_levels", rois.dtype), K,
           (rois, i64(K), np.float64(canonical_scale), np.float64(canonical_level),
            np.float64(level_min), np.int32(L), lev))
    return lev


def _fpn_groups(cp, rois, L, level_min, canonical_scale, canonical_level):
    """(order, bounds): the RoI indices grouped by level (_fpn_levels), in RoI order within a
    level (unique sort keys), and the group bounds on the host -- one read-back of L + 2
    integers."""
    K = rois.shape[0]
    lev = _fpn_levels(cp, rois, L, level_min, canonical_scale, canonical_level)
    order = cp.argsort(lev * K + cp.arange(K, dtype=cp.int64))
    bounds = cp.zeros(L + 2, dtype=cp.int64)
    bounds[1:] = cp.cumsum(cp.bincount(lev, minlength=L + 1))
    return order, [int(b) for b in bounds.get()]


def multi_scale_roi_align_forward(features, rois, pooled_h, pooled_w, spatial_scales, level_min,
                                  canonical_scale, canonical_level, sampling_ratio, aligned,
                                  channels_last, nthreads):
    """The RoIs' levels (one launch), then one RoIAlign launch per level over all the RoIs,
    each pooling those of its level into their rows of the result: no gather, scatter or
    read-back."""
    cp = cupy()
    L, K = len(features), rois.shape[0]
    if L == 1:                            # no level mapping (torchvision pools every RoI there)
        return roi_align_forward(features[0], rois, pooled_h, pooled_w, spatial_scales[0],
                                 sampling_ratio, aligned, AVG, channels_last, nthreads)
    x0 = features[0]
    C = x0.shape[3] if channels_last else x0.shape[1]
    out = cp.empty((K, pooled_h, pooled_w, C) if channels_last else (K, C, pooled_h, pooled_w),
                   dtype=x0.dtype)
    if out.size == 0:
        return out
    lev = _fpn_levels(cp, rois, L, level_min, canonical_scale, canonical_level)
    for lvl in range(L):
        _roi_align(features[lvl], rois, pooled_h, pooled_w, spatial_scales[lvl], sampling_ratio,
                   aligned, AVG, channels_last, out=out, level=(lev, lvl, L))
    return out


def multi_scale_roi_align_backward(grad_out, rois, input_shapes, pooled_h, pooled_w,
                                   spatial_scales, level_min, canonical_scale, canonical_level,
                                   sampling_ratio, aligned, channels_last, deterministic,
                                   nthreads):
    """Atomic: the RoIs' levels (one launch), then one align_bwd launch per level over all the
    RoIs, each scattering those of its level (no gather, no read-back). Deterministic: each
    level's grad_out rows gathered (the grouping read back) through roi_align_backward."""
    cp = cupy()
    L, K = len(input_shapes), rois.shape[0]
    if L == 1:
        return [roi_align_backward(grad_out, rois, None, input_shapes[0], pooled_h, pooled_w,
                                   spatial_scales[0], sampling_ratio, aligned, AVG, channels_last,
                                   deterministic, nthreads)]
    if K == 0:
        return [cp.zeros(s, dtype=grad_out.dtype) for s in input_shapes]
    if not deterministic:
        lev = _fpn_levels(cp, rois, L, level_min, canonical_scale, canonical_level)
        dy = _nchw(cp, grad_out, channels_last)                  # once for every level
        return [_roi_align_backward(dy, None, rois, shape, pooled_h, pooled_w,
                                    spatial_scales[lvl], sampling_ratio, aligned, AVG,
                                    channels_last, False, level=(lev, lvl))
                for lvl, shape in enumerate(input_shapes)]
    order, bounds = _fpn_groups(cp, rois, L, level_min, canonical_scale, canonical_level)
    grads = []
    for lvl in range(L):
        a, b = bounds[lvl], bounds[lvl + 1]
        if a == b:
            grads.append(cp.zeros(input_shapes[lvl], dtype=grad_out.dtype))
            continue
        idx = order[a:b]
        grads.append(roi_align_backward(cp.ascontiguousarray(grad_out[idx]),
                                        cp.ascontiguousarray(rois[idx]), None,
                                        input_shapes[lvl], pooled_h, pooled_w,
                                        spatial_scales[lvl], sampling_ratio, aligned, AVG,
                                        channels_last, True, nthreads))
    return grads


def ps_roi_align_forward(x, rois, pooled_h, pooled_w, spatial_scale, sampling_ratio, nthreads):
    N, C, H, W = x.shape
    CO = C // (pooled_h * pooled_w)
    prm = functools.partial(_params, N=N, C=C, CO=CO, H=H, W=W, PH=pooled_h, PW=pooled_w,
                            sr=sampling_ratio, kind=KIND_PS, mode=AVG, aligned=1,
                            scale=spatial_scale)
    return _align_forward(x, rois, None, None, pooled_h, pooled_w, CO, prm)


def ps_roi_align_backward(grad_out, rois, input_shape, pooled_h, pooled_w, spatial_scale,
                          sampling_ratio, deterministic, nthreads):
    N, C, H, W = input_shape
    prm = functools.partial(_params, rois.shape[0], N, C, C // (pooled_h * pooled_w), H, W,
                            pooled_h, pooled_w, sampling_ratio, KIND_PS, AVG, 1,
                            scale=spatial_scale)
    return _align_backward(grad_out, None, rois, None, None, N, C, H, W, prm, deterministic)


def deform_roi_pool_forward(x, rois, offset, mask, pooled_h, pooled_w, spatial_scale,
                            sampling_ratio, gamma, nthreads):
    N, C, H, W = x.shape
    prm = functools.partial(_params, N=N, C=C, CO=C, H=H, W=W, PH=pooled_h, PW=pooled_w,
                            sr=sampling_ratio, kind=KIND_DEFORM, mode=AVG, aligned=1,
                            has_offset=offset is not None, has_mask=mask is not None,
                            scale=spatial_scale, gamma=gamma)
    return _align_forward(x, rois, offset, mask, pooled_h, pooled_w, C, prm)


def deform_roi_pool_backward(grad_out, x, rois, offset, mask, pooled_h, pooled_w, spatial_scale,
                             sampling_ratio, gamma, deterministic, nthreads):
    cp = cupy()
    N, C, H, W = x.shape
    K, PH, PW = rois.shape[0], pooled_h, pooled_w
    prm = functools.partial(_params, K, N, C, C, H, W, PH, PW, sampling_ratio, KIND_DEFORM, AVG,
                            1, offset is not None, mask is not None, spatial_scale, gamma)
    gx = _align_backward(grad_out, x, rois, offset, mask, N, C, H, W, prm, deterministic)
    goff = None if offset is None else cp.zeros((K, 2, PH, PW), dtype=x.dtype)
    gm = None if mask is None else cp.zeros((K, 1, PH, PW), dtype=x.dtype)
    if (goff is not None or gm is not None) and K > 0 and H * W > 0:
        d = _dummy(cp, x.dtype)
        launch(_k("deform_bwd_offmask", x.dtype), K * PH * PW,
               (grad_out, x, rois, d if offset is None else offset, d if mask is None else mask,
                d if goff is None else goff, d if gm is None else gm) + prm())
    return gx, goff, gm


def roi_pool_forward(x, rois, pooled_h, pooled_w, spatial_scale, nthreads):
    cp = cupy()
    N, C, H, W = x.shape
    K = rois.shape[0]
    out = cp.empty((K, C, pooled_h, pooled_w), dtype=x.dtype)
    if out.size:
        launch(_k("pool_fwd", x.dtype), out.size,
               (x, rois, out) + _params(K, N, C, C, H, W, pooled_h, pooled_w,
                                        scale=spatial_scale))
    return out


def _pool_backward_records(grad_out, rois, x, prm):
    """The deterministic RoIPool backward as one record per (RoI, channel, bin), a sort key that
    holds the grad_x element it lands on (its bin's argmax) and its grad_out element, sorted;
    then one thread per grad_x element sums its records in slot order (roi_ops.cu, "RoIPool
    deterministic backward"): the bits of pool_bwd_det, which adds them in the same order. None
    when the workspace would exceed DET_WORKSPACE_BYTES or the keys 63 bits. No host
    synchronisation."""
    cp = cupy()
    N, C, H, W = x.shape
    R = grad_out.size
    if R * POOL_RECORD_BYTES > DET_WORKSPACE_BYTES or (N * C * H * W + 1) * R >= 2**63:
        return None
    key = cp.empty(R, dtype=cp.int64)
    launch(_k("pool_bwd_records", x.dtype), R, (x, rois, key) + prm)
    skey = cp.sort(key)                     # unique keys: the same order from any sort
    gx = cp.empty((N, C, H, W), dtype=x.dtype)
    launch(_k("pool_bwd_gather", x.dtype), gx.size, (grad_out, skey, gx) + prm)
    return gx


def roi_pool_backward(grad_out, rois, x, pooled_h, pooled_w, spatial_scale, deterministic,
                      nthreads):
    cp = cupy()
    N, C, H, W = x.shape
    K = rois.shape[0]
    if deterministic and N * C * H * W and K:
        prm = _params(K, N, C, C, H, W, pooled_h, pooled_w, scale=spatial_scale)
        gx = _pool_backward_records(grad_out, rois, x, prm)
        if gx is not None:
            return gx
    gacc = cp.zeros((N, C, H, W), dtype=_acc_dtype(x.dtype))
    if gacc.size and K:
        prm = _params(K, N, C, C, H, W, pooled_h, pooled_w, scale=spatial_scale)
        if deterministic:           # over the workspace limit: the row owners
            order, seg = _segments(cp, rois, N)
            launch(_k("pool_bwd_det", x.dtype), N * C * ((H + RB - 1) // RB),
                   (grad_out, x, rois, order, seg, gacc, np.int32(RB)) + prm)
        else:
            launch(_k("pool_bwd", x.dtype), grad_out.size, (grad_out, x, rois, gacc) + prm)
    return gacc.astype(x.dtype, copy=False)


# every instantiation CuPy may request (the NVRTC gate, tests/test_cuda_compile.py)
NAME_EXPRESSIONS = list(_EXPRS)
