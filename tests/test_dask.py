"""fastnorm.dask on a dask.distributed LocalCluster with two worker processes: every op equals
the in-memory call (skips when dask/distributed are not installed)."""
import os
from pathlib import Path

import numpy as np
import pytest

da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")

import dask  # noqa: E402

import fastnorm  # noqa: E402
import fastnorm.dask as fd  # noqa: E402


@pytest.fixture(scope="module")
def client():
    """Two single-threaded worker processes that import this source tree's fastnorm."""
    root = str(Path(fastnorm.__file__).resolve().parent.parent)
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "OMP_NUM_THREADS")}
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, saved["PYTHONPATH"]) if p)
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                      dashboard_address=None) as cluster, \
                distributed.Client(cluster) as c:
            yield c
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _boxes(rng, n, size=100.0):
    xy = rng.uniform(0, size, (n, 2))
    wh = rng.uniform(5, 30, (n, 2))
    return np.concatenate([xy, xy + wh], 1), rng.random(n)


def _ran_on_workers(client):
    """Work really went to the worker processes (not the client's threads)."""
    return sum(client.run(lambda dask_worker: dask_worker.state.executed_count).values()) > 0


def test_group_norm_and_deform_conv2d(client, rng):
    x = rng.standard_normal((5, 8, 6, 6)).astype(np.float32)
    w, b = rng.standard_normal(8).astype(np.float32), rng.standard_normal(8).astype(np.float32)
    xd = da.from_array(x, chunks=(2, 4, 6, 6))              # channel chunks get merged
    y = fd.group_norm(xd, 4, w, b, activation="silu")
    assert y.chunks[0] == (2, 2, 1)
    np.testing.assert_array_equal(y.compute(), fastnorm.group_norm(x, 4, w, b,
                                                                   activation="silu"))
    wc = rng.standard_normal((3, 8, 3, 3)).astype(np.float32)
    off = rng.uniform(-2, 2, (5, 18, 3, 3)).astype(np.float32)
    mask = rng.random((5, 9, 3, 3)).astype(np.float32)
    yd = fd.deform_conv2d(xd, da.from_array(off, chunks=(5, 18, 3, 3)), wc, b[:3],
                          mask=da.from_array(mask, chunks=(1, 9, 3, 3)), stride=2, padding=1)
    assert yd.shape == (5, 3, 3, 3) and yd.chunks[0] == (2, 2, 1)
    ref = fastnorm.deform_conv2d(x, off, wc, b[:3], mask=mask, stride=2, padding=1)
    np.testing.assert_allclose(yd.compute(), ref, rtol=1e-5, atol=1e-5)
    assert _ran_on_workers(client)


def test_roi_ops_per_image(client, rng):
    N = 5
    x = rng.standard_normal((N, 8, 10, 10))
    xd = da.from_array(x, chunks=(2, 8, 10, 10))
    per_image = [_boxes(rng, int(rng.integers(0, 4)), 8.0)[0] for _ in range(N)]
    per_image[1] = per_image[1][:0]                          # an image without RoIs
    ref = fastnorm.roi_align(x, per_image, 2, 1.0, 2, True)
    np.testing.assert_array_equal(fd.roi_align(xd, per_image, 2, 1.0, 2, True).compute(), ref)
    # (K, 5) form in a shuffled order: the result keeps the caller's RoI order
    rois = np.concatenate([np.concatenate([np.full((len(r), 1), i), r], 1)
                           for i, r in enumerate(per_image)])
    rois = rois[rng.permutation(len(rois))]
    for name, args in (("roi_align", (2, 0.5, 2, True)), ("roi_pool", (2, 0.5)),
                       ("ps_roi_align", (2, 0.5, 2))):
        got = getattr(fd, name)(xd, rois, *args).compute()
        np.testing.assert_array_equal(got, getattr(fastnorm, name)(x, rois, *args), err_msg=name)
    off = rng.uniform(-0.2, 0.2, (len(rois), 2, 2, 2))
    m = rng.random((len(rois), 1, 2, 2))
    np.testing.assert_array_equal(
        fd.deform_roi_pool(xd, rois, off, 2, 1.0, 2, mask=m).compute(),
        fastnorm.deform_roi_pool(x, rois, off, 2, 1.0, 2, mask=m))


def test_nms_family_lists(client, rng):
    B = 5
    boxes, scores = zip(*[_boxes(rng, int(rng.integers(0, 40))) for _ in range(B)])
    labels = [rng.integers(0, 3, len(s)) for s in scores]
    got = dask.compute(fd.nms(list(boxes), list(scores), 0.5, images_per_task=2))[0]
    for g, r in zip(got, fastnorm.nms(list(boxes), list(scores), 0.5)):
        np.testing.assert_array_equal(g, r)
    got = dask.compute(fd.batched_nms(list(boxes), list(scores), labels, 0.5))[0]
    for g, r in zip(got, fastnorm.batched_nms(list(boxes), list(scores), labels, 0.5)):
        np.testing.assert_array_equal(g, r)
    got = dask.compute(fd.soft_nms(list(boxes), list(scores), images_per_task=3))[0]
    for (gk, gs), (rk, rs) in zip(got, fastnorm.soft_nms(list(boxes), list(scores))):
        np.testing.assert_array_equal(gk, rk)
        np.testing.assert_array_equal(gs, rs)
    dens = [rng.random(len(s)) for s in scores]
    got = dask.compute(fd.adaptive_nms(list(boxes), list(scores), dens, method="linear",
                                       images_per_task=2))[0]
    for (gk, gs), (rk, rs) in zip(got, fastnorm.adaptive_nms(list(boxes), list(scores), dens,
                                                             method="linear")):
        np.testing.assert_array_equal(gk, rk)
        np.testing.assert_array_equal(gs, rs)
    got = dask.compute(fd.iou_guided_nms(list(boxes), list(scores), dens, idxs=labels))[0]
    for (gk, gs), (rk, rs) in zip(got, fastnorm.iou_guided_nms(list(boxes), list(scores), dens,
                                                               idxs=labels)):
        np.testing.assert_array_equal(gk, rk)
        np.testing.assert_array_equal(gs, rs)
    var = [rng.uniform(0.1, 2.0, b.shape) for b in boxes]
    got = dask.compute(fd.softer_nms(list(boxes), list(scores), var, sigma_t=0.1,
                                     images_per_task=3))[0]
    ref = fastnorm.softer_nms(list(boxes), list(scores), var, sigma_t=0.1)
    assert len(got) == B
    for g, r in zip(got, ref):
        assert len(g) == 3
        for x, y in zip(g, r):
            np.testing.assert_array_equal(x, y)


def test_nms_family_batch_idx(client, rng):
    n = 300
    b, s = _boxes(rng, n)
    batch = rng.integers(0, 7, n)
    batch[batch == 3] = 4                                   # an image index without boxes
    labels = rng.integers(0, 4, n)
    bd, sd = da.from_array(b, chunks=100), da.from_array(s, chunks=100)
    kw = dict(batch_idx=batch, images_per_task=2)
    np.testing.assert_array_equal(fd.nms(bd, sd, 0.4, **kw).compute(),
                                  fastnorm.nms(b, s, 0.4, batch_idx=batch))
    np.testing.assert_array_equal(fd.batched_nms(b, s, labels, 0.4, **kw).compute(),
                                  fastnorm.batched_nms(b, s, labels, 0.4, batch_idx=batch))
    np.testing.assert_array_equal(fd.diou_nms(bd, sd, 0.4, max_output=5, **kw).compute(),
                                  fastnorm.diou_nms(b, s, 0.4, max_output=5, batch_idx=batch))
    np.testing.assert_array_equal(fd.matrix_nms(bd, sd, **kw).compute(),
                                  fastnorm.matrix_nms(b, s, batch_idx=batch))
    var = rng.uniform(0.1, 2.0, (n, 4))
    for name, args, dargs in (("weighted_nms", (0.4,), (0.4,)), ("soft_nms", (), ()),
                              ("softer_nms", (var,), (da.from_array(var, chunks=(100, 4)),))):
        got = dask.compute(*getattr(fd, name)(bd, sd, *dargs, **kw))
        ref = getattr(fastnorm, name)(b, s, *args, batch_idx=batch)
        assert len(got) == len(ref)
        for g, r in zip(got, ref):
            np.testing.assert_array_equal(g, r, err_msg=name)
    # the variants with a further per-box array
    loc = rng.random(n)
    got = dask.compute(*fd.iou_guided_nms(bd, sd, loc, 0.4, idxs=labels, **kw))
    ref = fastnorm.iou_guided_nms(b, s, loc, 0.4, idxs=labels, batch_idx=batch)
    for g, r in zip(got, ref):
        np.testing.assert_array_equal(g, r)
    np.testing.assert_array_equal(fd.adaptive_nms(bd, sd, loc, 0.4, **kw).compute(),
                                  fastnorm.adaptive_nms(b, s, loc, 0.4, batch_idx=batch))
    # no batch_idx: one image
    np.testing.assert_array_equal(fd.nms(bd, sd, 0.4).compute(), fastnorm.nms(b, s, 0.4))


def _rotated(boxes):
    """xyxy boxes as (cx, cy, w, h, angle) rotated boxes with angles in [-90, 90)."""
    angle = np.linspace(-90, 89, len(boxes))[:, None]
    return np.concatenate([(boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2],
                           angle], 1)


def test_rotated_ops(client, rng):
    n = 200
    b, s = _boxes(rng, n)
    rb, batch, labels = _rotated(b), rng.integers(0, 5, n), rng.integers(0, 3, n)
    kw = dict(batch_idx=batch, images_per_task=2)
    np.testing.assert_array_equal(
        fd.nms_rotated(da.from_array(rb, chunks=(50, 5)), s, 0.3, **kw).compute(),
        fastnorm.nms_rotated(rb, s, 0.3, batch_idx=batch))
    np.testing.assert_array_equal(
        fd.batched_nms_rotated(rb, s, labels, 0.3, clockwise=True, **kw).compute(),
        fastnorm.batched_nms_rotated(rb, s, labels, 0.3, clockwise=True, batch_idx=batch))
    lists = [rb[batch == i] for i in range(5)], [s[batch == i] for i in range(5)]
    got = dask.compute(fd.nms_rotated(*lists, 0.3, angle_unit="radians"))[0]
    for g, r in zip(got, fastnorm.nms_rotated(*lists, 0.3, angle_unit="radians")):
        np.testing.assert_array_equal(g, r)
    x = rng.standard_normal((5, 4, 10, 10))
    xd = da.from_array(x, chunks=(2, 4, 10, 10))
    per_image = [_rotated(_boxes(rng, int(rng.integers(0, 4)), 8.0)[0]) for _ in range(5)]
    per_image[1] = per_image[1][:0]                          # an image without RoIs
    np.testing.assert_array_equal(
        fd.roi_align_rotated(xd, per_image, 2, 1.0, 2).compute(),
        fastnorm.roi_align_rotated(x, per_image, 2, 1.0, 2))
    rois = np.concatenate([np.concatenate([np.full((len(r), 1), i), r], 1)
                           for i, r in enumerate(per_image)])
    rois = rois[rng.permutation(len(rois))]
    np.testing.assert_array_equal(
        fd.roi_align_rotated(xd, rois, 2, 0.5, 2, False, clockwise=True).compute(),
        fastnorm.roi_align_rotated(x, rois, 2, 0.5, 2, False, clockwise=True))


def test_needs_dask_input():
    with pytest.raises(TypeError, match="`x`"):
        fd.group_norm(np.zeros((2, 4, 3)), 2)


def test_combined_nms(client, rng):
    B, N, C = 5, 60, 3
    boxes = np.stack([_boxes(rng, N)[0] for _ in range(B)]).astype(np.float32)
    scores = rng.random((B, N, C)).astype(np.float32)
    sd = da.from_array(scores, chunks=(2, 30, 3))             # non-batch chunks get merged
    for kw in (dict(score_threshold=0.3), dict(class_agnostic=True, return_indices=True)):
        got = fd.combined_nms(da.from_array(boxes, chunks=(3, N, 4)), sd, 4, 10, 0.5, **kw)
        want = fastnorm.combined_nms(boxes, scores, 4, 10, 0.5, **kw)
        assert len(got) == len(want) and got[0].chunks[0] == (2, 2, 1)
        for g, w in zip(dask.compute(*got), want):
            assert g.dtype == w.dtype
            np.testing.assert_array_equal(g, w)
    with pytest.raises(ValueError, match="`max_total`"):
        fd.combined_nms(boxes, sd, 4, -1)


def test_multi_scale_roi_align_per_batch_chunk(rng):
    """A pyramid of dask levels (chunked differently: rechunked to the first level's batch
    chunks), per-image lists and shuffled (K, 5) RoIs: the in-memory result, in RoI order."""
    feats = [rng.standard_normal((5, 3, 32 >> i, 40 >> i)) for i in range(3)]
    fds = [da.from_array(f, chunks=(c, 3, 32 >> i, 40 >> i)) for i, (f, c) in
           enumerate(zip(feats, (2, 3, 5)))]
    per_image = []
    for _ in range(5):
        k = int(rng.integers(0, 5))
        xy = rng.uniform(0, 60, (k, 2))
        per_image.append(np.c_[xy, xy + rng.uniform(1, 120, (k, 2))])
    per_image[1] = per_image[1][:0]
    kw = dict(spatial_scales=[0.5, 0.25, 0.125], canonical_scale=16, canonical_level=2)
    np.testing.assert_array_equal(fd.multi_scale_roi_align(fds, per_image, 2, **kw).compute(),
                                  fastnorm.multi_scale_roi_align(feats, per_image, 2, **kw))
    rois = np.concatenate([np.c_[np.full(len(r), i), r] for i, r in enumerate(per_image)])
    rois = rois[rng.permutation(len(rois))]
    np.testing.assert_array_equal(
        fd.multi_scale_roi_align(fds, rois, (2, 3), aligned=False, **kw).compute(),
        fastnorm.multi_scale_roi_align(feats, rois, (2, 3), aligned=False, **kw))
