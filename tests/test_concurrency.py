"""Thread safety: every public op called from 8 Python threads at once on shared read-only inputs
gives results bitwise identical to serial calls, and the kernels release the GIL."""
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import fastnorm


def _ro(*arrays):
    for a in arrays:
        a.flags.writeable = False       # shared inputs are read-only: a kernel must not need more
    return arrays


def _inputs(read_only=False):
    rng = np.random.default_rng(7)
    f = np.float32
    x = rng.standard_normal((2, 8, 9, 11)).astype(f)
    w, b = rng.standard_normal(8).astype(f), rng.standard_normal(8).astype(f)
    y, mean, rstd = fastnorm.group_norm(x, 4, w, b, return_stats=True)
    dy = rng.standard_normal(x.shape).astype(f)
    rois = np.c_[rng.integers(0, 2, 12), rng.uniform(-2, 6, (12, 2)),
                 rng.uniform(4, 12, (12, 2))].astype(f)
    g_ra = rng.standard_normal((12, 8, 3, 3)).astype(f)
    g_ps = rng.standard_normal((12, 2, 2, 2)).astype(f)
    rrois = np.c_[rng.integers(0, 2, 12), rng.uniform(0, 11, (12, 2)), rng.uniform(1, 9, (12, 2)),
                  rng.uniform(-180, 180, 12)].astype(f)
    off_r = rng.standard_normal((12, 2, 3, 3)).astype(f)
    mask_r = rng.random((12, 1, 3, 3)).astype(f)
    xd = rng.standard_normal((2, 4, 7, 7)).astype(f)
    wd = rng.standard_normal((6, 4, 3, 3)).astype(f)
    offd = rng.standard_normal((2, 18, 7, 7)).astype(f)
    maskd = rng.random((2, 9, 7, 7)).astype(f)
    gd = rng.standard_normal((2, 6, 7, 7)).astype(f)
    boxes = np.c_[rng.uniform(0, 50, (300, 2)), rng.uniform(0, 50, (300, 2)) + 5].astype(f)
    boxes[:, 2:] = boxes[:, :2] + rng.uniform(1, 20, (300, 2))
    scores = rng.random(300).astype(f)
    classes = rng.integers(0, 5, 300)
    var = rng.uniform(0.1, 4, (300, 4)).astype(f)
    rbox = np.c_[(boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2],
                 rng.uniform(-90, 90, 300)].astype(f)
    (_ro if read_only else lambda *a: a)(x, w, b, mean, rstd, dy, rois, rrois, g_ra, g_ps, off_r, mask_r, xd, wd, offd, maskd, gd, boxes,
        scores, classes, var, rbox)
    F = fastnorm
    return {
        "group_norm": lambda: F.group_norm(x, 4, w, b, activation="silu"),
        "group_norm_cl": lambda: F.group_norm(x, 11, channels_last=True),
        "group_norm_backward": lambda: F.group_norm_backward(dy, x, mean, rstd, 4, w, b),
        "roi_align": lambda: F.roi_align(x, rois, 3, 0.5, 2, True),
        "roi_align_max": lambda: F.roi_align(x, rois, 3, 0.5, -1, mode="max"),
        "roi_align_backward": lambda: F.roi_align_backward(g_ra, rois, x.shape, 3, 0.5, 2, True),
        "roi_align_rotated": lambda: F.roi_align_rotated(x, rrois, 3, 0.5, 2),
        "roi_align_rotated_backward": lambda: F.roi_align_rotated_backward(g_ra, rrois, x.shape,
                                                                           3, 0.5, 2),
        "multi_scale_roi_align": lambda: F.multi_scale_roi_align(
            [x, x[:, :, ::2, ::2], x[:, :, ::4, ::4]], rois, 3, spatial_scales=[1, 0.5, 0.25],
            canonical_scale=4, canonical_level=1),
        "multi_scale_roi_align_backward": lambda: F.multi_scale_roi_align_backward(
            g_ra, rois, [x.shape, (2, 8, 5, 6), (2, 8, 3, 3)], 3,
            spatial_scales=[1, 0.5, 0.25], canonical_scale=4, canonical_level=1),
        "roi_pool": lambda: F.roi_pool(x, rois, 3, 0.5),
        "roi_pool_backward": lambda: F.roi_pool_backward(g_ra, rois, x.shape, 3, 0.5, x=x),
        "ps_roi_align": lambda: F.ps_roi_align(x, rois, 2, 0.5, 2),
        "ps_roi_align_backward": lambda: F.ps_roi_align_backward(g_ps, rois, x.shape, 2, 0.5),
        "deform_roi_pool": lambda: F.deform_roi_pool(x, rois, off_r, 3, 0.5, 2, mask=mask_r),
        "deform_roi_pool_backward": lambda: F.deform_roi_pool_backward(
            g_ra, x, rois, off_r, 3, 0.5, 2, mask=mask_r),
        "deform_conv2d": lambda: F.deform_conv2d(xd, offd, wd, mask=maskd, padding=1),
        "deform_conv2d_backward": lambda: F.deform_conv2d_backward(gd, xd, offd, wd, mask=maskd,
                                                                   padding=1),
        "nms": lambda: F.nms(boxes, scores, 0.5),
        "batched_nms": lambda: F.batched_nms(boxes, scores, classes, 0.5),
        "diou_nms": lambda: F.diou_nms(boxes, scores, 0.5),
        "weighted_nms": lambda: F.weighted_nms(boxes, scores, 0.5),
        "soft_nms": lambda: F.soft_nms(boxes, scores),
        "softer_nms": lambda: F.softer_nms(boxes, scores, var),
        "iou_guided_nms": lambda: F.iou_guided_nms(boxes, scores, scores[::-1], 0.5,
                                                   idxs=classes),
        "adaptive_nms": lambda: F.adaptive_nms(boxes, scores, scores[::-1], 0.5),
        "matrix_nms": lambda: F.matrix_nms(boxes, scores),
        "box_iou": lambda: F.box_iou(boxes, boxes[:50], metric="ciou"),
        "box_iou_rotated": lambda: F.box_iou_rotated(rbox, rbox[:50]),
        "nms_rotated": lambda: F.nms_rotated(rbox, scores, 0.5),
        "batched_nms_rotated": lambda: F.batched_nms_rotated(rbox, scores, classes, 0.5),
        "combined_nms": lambda: F.combined_nms(boxes[:150].reshape(3, 50, 4),
                                               scores.reshape(3, 50, 2), 20, 50, 0.5, 0.1,
                                               return_indices=True),
    }


@pytest.mark.parametrize("name", sorted(_inputs()))
def test_read_only_inputs_are_accepted(name):
    ops = _inputs(read_only=True)
    assert _flat(ops[name]()) == _flat(_inputs()[name]())


def _flat(res):
    """Bytes of every array in a (nested) result, for bitwise comparison."""
    if isinstance(res, (tuple, list)):
        return [b for r in res for b in _flat(r)]
    return [None if res is None else (res.dtype.str, res.shape, res.tobytes())]


def test_8_threads_bitwise_equal_to_serial():
    ops = _inputs()
    serial = {name: _flat(fn()) for name, fn in ops.items()}
    names = sorted(ops)
    barrier = threading.Barrier(8)

    def worker(i):
        barrier.wait()
        out = []
        for r in range(3):
            order = names[i % len(names):] + names[:i % len(names)]   # different op mixes
            for name in (order if r % 2 == 0 else order[::-1]):
                with fastnorm.threads(1 + (i + r) % 2):
                    out.append((name, _flat(ops[name]())))
        return out

    with ThreadPoolExecutor(8) as ex:
        results = list(ex.map(worker, range(8)))
    for out in results:
        assert len(out) == 3 * len(names)
        for name, flat in out:
            assert flat == serial[name], f"{name}: a concurrent call differs from the serial one"


def _overlap(fn, min_seconds=0.25):
    """Fraction of the main thread's normal Python speed while ``fn`` runs in another thread.

    A kernel that holds the GIL freezes the main thread (fraction ~0); one that releases it lets
    the main thread run on the other core (fraction ~1, less when cores are shared)."""
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min_seconds / 4:      # calibrate repetitions
        fn()
        reps += 1
    reps = max(1, int(reps * 4 * (min_seconds / 4) / (time.perf_counter() - t0)) + 1)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 0.05:
        n += 1
    rate = n / (time.perf_counter() - t0)
    done = threading.Event()

    def work():
        with fastnorm.threads(1):
            for _ in range(reps):
                fn()
        done.set()
    th = threading.Thread(target=work)
    n, t0 = 0, time.perf_counter()
    th.start()
    while not done.is_set():
        n += 1
    elapsed = time.perf_counter() - t0
    th.join()
    return n / (rate * elapsed)


def _gil_cases():
    rng = np.random.default_rng(3)
    f = np.float32
    x = rng.standard_normal((1, 64, 160, 160)).astype(f)
    rois = np.c_[np.zeros(2000), rng.uniform(0, 100, (2000, 2)),
                 rng.uniform(100, 160, (2000, 2))].astype(f)
    xd = rng.standard_normal((1, 16, 48, 48)).astype(f)
    wd = rng.standard_normal((16, 16, 3, 3)).astype(f)
    offd = rng.standard_normal((1, 18, 48, 48)).astype(f)
    rrois = np.c_[np.zeros(2000), rng.uniform(20, 140, (2000, 2)), rng.uniform(10, 60, (2000, 2)),
                  rng.uniform(-90, 90, 2000)].astype(f)
    boxes = rng.uniform(0, 1000, (6000, 4)).astype(f)
    boxes[:, 2:] = boxes[:, :2] + rng.uniform(5, 60, (6000, 2)).astype(f)
    scores = rng.random(6000).astype(f)
    return {
        "group_norm": lambda: fastnorm.group_norm(x, 8),
        "roi_ops": lambda: fastnorm.roi_align(x, rois, 7, 1.0, 2),
        "roi_align_rotated": lambda: fastnorm.roi_align_rotated(x, rrois, 7, 1.0, 2),
        "multi_scale_roi_align": lambda: fastnorm.multi_scale_roi_align(
            [x, x[:, :, ::2, ::2]], rois, 7, spatial_scales=[1.0, 0.5], canonical_scale=64,
            canonical_level=1),
        "deform_conv": lambda: fastnorm.deform_conv2d(xd, offd, wd, padding=1),
        "nms": lambda: fastnorm.soft_nms(boxes, scores),
    }


@pytest.mark.parametrize("module", ["group_norm", "roi_ops", "roi_align_rotated", "deform_conv",
                                    "nms", "multi_scale_roi_align"])
def test_kernels_release_the_gil(module):
    fn = _gil_cases()[module]
    frac = max(_overlap(fn) for _ in range(2))       # best of two: tolerate a busy machine
    assert frac > 0.5, f"{module}: the main thread ran at {frac:.0%} of its speed during the " \
                        f"kernel: the GIL seems to be held"
