"""No leaks: the resident set size stays flat over 2000 calls of each op, including error paths.

Bound: after 200 warm-up calls (allocator pools, caches, lazy imports), 2000 more calls of an op
(one valid call plus one call that fails validation, on tiny inputs) may grow RSS by at most
LEAK_BOUND = 2 MiB: a leak of 1 KiB per call or more fails.
"""
import gc
import os

import numpy as np
import pytest

import fastnorm

psutil = pytest.importorskip("psutil")
pytestmark = pytest.mark.skipif(
    bool(os.environ.get("FASTNORM_SANITIZED")),
    reason="under AddressSanitizer freed memory sits in ASan's quarantine, so RSS grows")

LEAK_BOUND = 2 << 20
CALLS = 2000


def _cases():
    rng = np.random.default_rng(1)
    f = np.float64
    x = rng.standard_normal((2, 4, 5, 5))
    y, mean, rstd = fastnorm.group_norm(x, 2, return_stats=True)
    rois = np.array([[0, 0.5, 0.5, 3.5, 4.0], [1, 1, 1, 2, 2], [0, np.nan, 0, 1, 1]], f)
    bad_rois = np.array([[5, 0, 0, 1, 1]], f)
    rrois = np.array([[0, 2, 2, 3, 2, 30], [1, 1, 3, 2, 2, -100], [0, np.nan, 0, 1, 1, 0]], f)
    g = rng.standard_normal((3, 4, 2, 2))
    off = rng.standard_normal((3, 2, 2, 2))
    xd, wd = rng.standard_normal((1, 2, 4, 4)), rng.standard_normal((3, 2, 3, 3))
    offd, gd = rng.standard_normal((1, 18, 2, 2)), rng.standard_normal((1, 3, 2, 2))
    boxes = np.array([[0, 0, 4, 4], [1, 1, 5, 5], [8, 8, 9, 9], [0, 0, 4, 4.5]], f)
    scores = np.array([0.9, 0.8, 0.7, np.nan])
    var = np.array([[1, 2, 1, 0], [1, 1, np.inf, 1], [1, 1, 1, 1], [0.5, 1, 1, 1]], f)
    rbox = np.array([[2, 2, 4, 4, 0], [3, 3, 4, 4, 30], [8.5, 8.5, 1, 1, 45],
                     [2, 2, 4, 4.5, np.nan]], f)
    F = fastnorm

    def err(fn, *a, **k):
        try:
            fn(*a, **k)
        except (ValueError, TypeError):
            return
        raise AssertionError("expected a validation error")
    return {
        "group_norm": (lambda: F.group_norm(x, 2, return_stats=True),
                       lambda: err(F.group_norm, x, 3)),
        "group_norm_backward": (lambda: F.group_norm_backward(y, x, mean, rstd, 2),
                                lambda: err(F.group_norm_backward, y, x, mean[:1], rstd, 2)),
        "roi_align": (lambda: F.roi_align(x, rois, 2, sampling_ratio=2, mode="max"),
                      lambda: err(F.roi_align, x, bad_rois, 2)),
        "roi_align_backward": (lambda: F.roi_align_backward(g, rois, x.shape, 2),
                               lambda: err(F.roi_align_backward, g[:1], rois, x.shape, 2)),
        "roi_pool": (lambda: F.roi_pool(x, rois, 2), lambda: err(F.roi_pool, x, rois, 0)),
        "roi_pool_backward": (lambda: F.roi_pool_backward(g, rois, x.shape, 2, x=x),
                              lambda: err(F.roi_pool_backward, g, rois, x.shape, 2)),
        "ps_roi_align": (lambda: F.ps_roi_align(x, rois, 2),
                         lambda: err(F.ps_roi_align, x, rois, 3)),
        "ps_roi_align_backward": (lambda: F.ps_roi_align_backward(g[:, :1], rois, x.shape, 2),
                                  lambda: err(F.ps_roi_align_backward, g, rois, x.shape, 2)),
        "deform_roi_pool": (lambda: F.deform_roi_pool(x, rois, off, 2),
                            lambda: err(F.deform_roi_pool, x, rois, off[:1], 2)),
        "deform_roi_pool_backward": (
            lambda: F.deform_roi_pool_backward(g, x, rois, off, 2),
            lambda: err(F.deform_roi_pool_backward, g, x, rois, off, 2, gamma=np.nan)),
        "roi_align_rotated": (lambda: F.roi_align_rotated(x, rrois, 2, sampling_ratio=2),
                              lambda: err(F.roi_align_rotated, x, rois, 2)),
        "roi_align_rotated_backward": (
            lambda: F.roi_align_rotated_backward(g, rrois, x.shape, 2),
            lambda: err(F.roi_align_rotated_backward, g, rrois, x.shape, 2, angle_unit="deg")),
        "multi_scale_roi_align": (
            lambda: F.multi_scale_roi_align([x, x[:, :, ::2, ::2]], rois, 2,
                                            spatial_scales=[1.0, 0.5], canonical_scale=2),
            lambda: err(F.multi_scale_roi_align, [x, x], rois, 2, spatial_scales=[1.0, 0.25])),
        "multi_scale_roi_align_backward": (
            lambda: F.multi_scale_roi_align_backward(g, rois, [x.shape, (2, 4, 3, 3)], 2,
                                                     spatial_scales=[1.0, 0.5],
                                                     canonical_scale=2),
            lambda: err(F.multi_scale_roi_align_backward, g, rois, [], 2)),
        "deform_conv2d": (lambda: F.deform_conv2d(xd, offd, wd),
                          lambda: err(F.deform_conv2d, xd, offd[:, :4], wd)),
        "deform_conv2d_backward": (lambda: F.deform_conv2d_backward(gd, xd, offd, wd),
                                   lambda: err(F.deform_conv2d_backward, gd, xd, offd, wd,
                                               stride=0)),
        "nms": (lambda: F.nms(boxes, scores, 0.5), lambda: err(F.nms, boxes, scores, -1.0)),
        "batched_nms": (lambda: F.batched_nms(boxes, scores, np.array([0, 1, 0, 1]), 0.5),
                        lambda: err(F.batched_nms, boxes, scores, scores, 0.5)),
        "diou_nms": (lambda: F.diou_nms([boxes, boxes[:2]], [scores, scores[:2]], 0.5),
                     lambda: err(F.diou_nms, boxes, scores, 0.5, beta=0)),
        "weighted_nms": (lambda: F.weighted_nms(boxes, scores, 0.5),
                         lambda: err(F.weighted_nms, boxes[:, :3], scores, 0.5)),
        "soft_nms": (lambda: F.soft_nms(boxes, scores, batch_idx=np.array([0, 0, 1, 1])),
                     lambda: err(F.soft_nms, boxes, scores, method="hard")),
        "softer_nms": (lambda: F.softer_nms(boxes, scores, var,
                                            batch_idx=np.array([0, 0, 1, 1])),
                       lambda: err(F.softer_nms, boxes, scores, -var)),
        "iou_guided_nms": (lambda: F.iou_guided_nms(boxes, scores, scores[::-1].copy(), 0.5,
                                                    idxs=np.array([0, 1, 0, 1])),
                           lambda: err(F.iou_guided_nms, boxes, scores, scores[:2])),
        "adaptive_nms": (lambda: F.adaptive_nms(boxes, scores, scores, 0.5, method="linear"),
                         lambda: err(F.adaptive_nms, boxes, scores, scores, method="box")),
        "matrix_nms": (lambda: F.matrix_nms(boxes, scores),
                       lambda: err(F.matrix_nms, boxes, scores, sigma=0.0)),
        "box_iou": (lambda: F.box_iou(boxes, boxes, metric="giou"),
                    lambda: err(F.box_iou, boxes, boxes.astype(np.float32))),
        "box_iou_rotated": (lambda: F.box_iou_rotated(rbox, rbox[:3], clockwise=True),
                            lambda: err(F.box_iou_rotated, rbox, boxes)),
        "nms_rotated": (lambda: F.nms_rotated([rbox, rbox[:2]], [scores, scores[:2]], 0.5),
                        lambda: err(F.nms_rotated, rbox, scores, 0.5, angle_unit="grad")),
        "batched_nms_rotated": (
            lambda: F.batched_nms_rotated(rbox, scores, np.array([0, 1, 0, 1]), 0.5,
                                          batch_idx=np.array([0, 0, 1, 1])),
            lambda: err(F.batched_nms_rotated, boxes, scores, np.array([0, 1, 0, 1]), 0.5)),
        "combined_nms": (lambda: F.combined_nms(boxes[None], scores.reshape(1, 4, 1), 2, 3,
                                                return_indices=True),
                         lambda: err(F.combined_nms, boxes[None], scores.reshape(1, 2, 2), 2, 3)),
    }


def _rss():
    gc.collect()
    return psutil.Process().memory_info().rss


@pytest.mark.parametrize("op", sorted(_cases()))
def test_rss_stays_flat(op):
    ok, bad = _cases()[op]
    for _ in range(200):
        ok()
        bad()
    before = _rss()
    for _ in range(CALLS):
        ok()
        bad()
    grown = _rss() - before
    assert grown <= LEAK_BOUND, f"{op}: RSS grew by {grown / 1024:.0f} KiB over {CALLS} calls"


def test_leak_detector_detects_a_leak():
    """The measurement sees a leak: keeping 64 KiB per call (128 MiB in all, more than the free
    heap earlier tests may leave behind for malloc to reuse) is caught. Freed memory that malloc
    reuses hides part of a small leak, so the bound is meant for leaks of ~1 KiB/call or more."""
    kept = []
    before = _rss()
    for _ in range(CALLS):
        kept.append(np.ones(8192))      # 64 KiB per call
    assert _rss() - before > LEAK_BOUND
