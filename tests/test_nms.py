"""The NMS family and box metrics against the float64 oracles, on every backend."""
import numpy as np
import pytest

import fastnorm
from reference.nms import (adaptive, batched, box_metric, combined, greedy_nms, iou_guided,
                           matrix, soft, softer, weighted)

DTYPES = [np.float32, np.float64]


def clusters(rng, n, dtype=np.float64, side=200.0, per=6, tie_levels=None):
    """Boxes in clusters of near-duplicates whose IoUs spread around 0.2..0.9, plus some
    degenerate boxes; scores optionally quantised to force ties."""
    k = max(1, n // per)
    c = rng.uniform(0, side, (k, 2))
    size = rng.uniform(5, 40, (k, 2))
    which = rng.integers(0, k, n)
    ctr = c[which] + rng.normal(0, 0.15, (n, 2)) * size[which]
    wh = size[which] * rng.uniform(0.7, 1.3, (n, 2))
    b = np.concatenate([ctr - wh / 2, ctr + wh / 2], 1)
    b = np.round(b * 4) / 4                      # exact in float32 too
    s = rng.random(n)
    if tie_levels:
        s = np.round(s * tie_levels) / tie_levels
    return b.astype(dtype), s.astype(dtype)


def rounded(dtype, *arrays):
    """Arrays rounded to ``dtype`` (float16/bfloat16 too), and their float64 values for the
    oracle."""
    dtype = _dtype(dtype)
    low = [np.asarray(a, np.float64).astype(dtype) for a in arrays]
    return low, [a.astype(np.float64) for a in low]


def _dtype(name):
    if str(name) == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


# ---------------------------------------------------------------- greedy nms

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [0, 1, 2, 7, 150, 3000])
@pytest.mark.parametrize("thr", [0.0, 0.3, 0.5, 0.75])
def test_nms_matches_oracle(backend, rng, dtype, n, thr):
    if backend.is_cuda and n == 3000 and thr in (0.3, 0.75):
        n = 1000                                   # the emulator's time is better spent below
    b, s = clusters(rng, n, dtype, tie_levels=20 if n > 100 else None)
    got = backend.asnumpy(fastnorm.nms(*backend.asarray((b, s)), thr))
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, greedy_nms(b, s, thr))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_nms_half_types(cuda_backend, rng, dtype):
    B = cuda_backend
    b, s = clusters(rng, 600, side=100.0, tie_levels=30)
    (bl, sl), (b64, s64) = rounded(dtype, b, s)
    bd, sd = B.asarray((bl, sl))
    np.testing.assert_array_equal(B.asnumpy(fastnorm.nms(bd, sd, 0.5)), greedy_nms(b64, s64, 0.5))
    idxs = rng.integers(0, 4, 600)
    np.testing.assert_array_equal(B.asnumpy(fastnorm.batched_nms(bd, sd, B.asarray(idxs), 0.5)),
                                  batched(b64, s64, idxs, 0.5))
    kh, fh = B.asnumpy(fastnorm.weighted_nms(bd, sd, 0.5))
    rk, rf = weighted(b64, s64, 0.5)
    np.testing.assert_array_equal(kh, rk)
    assert fh.dtype == _dtype(dtype) and fh.shape == (len(kh), 4)
    np.testing.assert_allclose(fh.astype(np.float64), rf, rtol=1e-2)
    kh, sh = B.asnumpy(fastnorm.soft_nms(bd, sd, score_threshold=0.05))
    rk, rs = soft(b64, s64, "gaussian", 0.5, 0.3, 0.05)
    np.testing.assert_array_equal(kh, rk)
    np.testing.assert_allclose(sh.astype(np.float64), rs, rtol=1e-2)
    got = B.asnumpy(fastnorm.matrix_nms(bd[:200], sd[:200])).astype(np.float64)
    np.testing.assert_allclose(got, matrix(b64[:200], s64[:200], "gaussian", 2.0), rtol=1e-2,
                               atol=1e-3)
    iou = B.asnumpy(fastnorm.box_iou(bd[:30], bd[:20], metric="ciou")).astype(np.float64)
    np.testing.assert_allclose(iou, box_metric(b64[:30], b64[:20], 3), rtol=1e-2, atol=1e-2)
    # rotated boxes: the same boxes turned (decisions in float64 on the rounded values)
    (rl,), (r64,) = rounded(dtype, np.c_[(b[:, :2] + b[:, 2:]) / 2, b[:, 2:] - b[:, :2],
                                         rng.uniform(-90, 90, 600)])
    rd = B.asarray(rl)
    np.testing.assert_array_equal(B.asnumpy(fastnorm.nms_rotated(rd, sd, 0.5)),
                                  greedy_nms_rotated(r64, s64, 0.5))
    np.testing.assert_array_equal(
        B.asnumpy(fastnorm.batched_nms_rotated(rd, sd, B.asarray(idxs), 0.5)),
        batched_rotated(r64, s64, idxs, 0.5))
    iou = B.asnumpy(fastnorm.box_iou_rotated(rd[:30], rd[:20]))
    assert iou.dtype == _dtype(dtype)
    np.testing.assert_allclose(iou.astype(np.float64), ref_iou_rotated(r64[:30], r64[:20]),
                               rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cell", [0.05, 1.0, 8.0])
def test_nms_large_single_segment_grid(rng, dtype, cell, monkeypatch):
    # CPU: the spatial grid at several cell sizes (tiny cells hit the cell-count cap), with
    # outliers that widen the window (one huge box), boxes in no cell (degenerate, NaN, infinite
    # area), far-away boxes and ties; 1 and 2 threads, with and without max_output
    from fastnorm._cpu import nms as kernels
    monkeypatch.setattr(kernels, "CELL", cell)
    b, s = clusters(rng, 20000, dtype, side=600.0, tie_levels=50)
    b[5] = [-1000, -1000, 2000, 2000]
    b[6] = [10, 10, 5, 5]
    b[7] = [np.nan, 0, 10, 10]
    b[8] = [0, 0, np.inf, 10]
    b[9] = [1e6, 1e6, 1e6 + 30, 1e6 + 30]
    b[10] = [1e6 + 1, 1e6, 1e6 + 31, 1e6 + 30]
    s[5:11] = [0.999, 0.998, 0.997, 0.996, 0.7, 0.6]
    ref = greedy_nms(b, s, 0.5)
    assert 9 in ref and 10 not in ref
    for t in (1, 2):
        with fastnorm.threads(t):
            np.testing.assert_array_equal(fastnorm.nms(b, s, 0.5), ref)
            np.testing.assert_array_equal(fastnorm.nms(b, s, 0.5, max_output=777), ref[:777])
    np.testing.assert_array_equal(fastnorm.diou_nms(b[:3000], s[:3000], 0.4),
                                  greedy_nms(b[:3000], s[:3000], 0.4, crit=1, beta=1.0))


@pytest.mark.parametrize("budget", [64 * 8 * 40, 64 * 8 * 200, 10 << 20])
def test_cuda_nms_in_chunks(cuda_backend, rng, monkeypatch, budget):
    # the greedy sweep on CUDA runs in chunks of a bounded mask: a big segment cut into pieces of
    # 64+ ranks, small segments packed together, max_output across chunks, outliers as above
    from fastnorm._cuda import nms as launcher
    monkeypatch.setattr(launcher, "MASK_BYTES", budget)
    B = cuda_backend
    b, s = clusters(rng, 2500, np.float32, side=250.0, tie_levels=50)
    b[5] = [-1000, -1000, 2000, 2000]
    b[6] = [10, 10, 5, 5]
    b[7] = [np.nan, 0, 10, 10]
    b[8] = [0, 0, np.inf, 10]
    s[5:9] = [0.999, 0.998, 0.997, 0.996]
    bd, sd = B.asarray((b, s))
    ref = greedy_nms(b, s, 0.5)
    np.testing.assert_array_equal(B.asnumpy(fastnorm.nms(bd, sd, 0.5)), ref)
    np.testing.assert_array_equal(B.asnumpy(fastnorm.nms(bd, sd, 0.5, max_output=301)), ref[:301])
    idxs = rng.integers(0, 7, 2500)
    bi = rng.integers(0, 3, 2500)
    np.testing.assert_array_equal(
        B.asnumpy(fastnorm.batched_nms(bd, sd, B.asarray(idxs), 0.5, max_output=90)),
        batched(b, s, idxs, 0.5, max_output=90))
    got = B.asnumpy(fastnorm.nms(bd, sd, 0.5, batch_idx=B.asarray(bi), max_output=40))
    want = np.concatenate([np.flatnonzero(bi == i)[greedy_nms(b[bi == i], s[bi == i], 0.5,
                                                              max_output=40)] for i in range(3)])
    np.testing.assert_array_equal(got, want)
    k, f = B.asnumpy(fastnorm.weighted_nms(bd, sd, 0.5))
    rk, rf = weighted(b, s, 0.5)
    np.testing.assert_array_equal(k, rk)
    np.testing.assert_allclose(f, rf, rtol=1e-6)


def test_cuda_nms_plan_bounds_memory_and_grid():
    from fastnorm._cuda.nms import _MAX_ROW_TILES, _plan
    starts = np.concatenate([[0], np.cumsum([5, 3000, 1, 1, 70, 200, 64, 9000, 2])])
    m = int(starts[-1])
    for budget in (64 * 10, 64 * 150, 10 ** 6, 10 ** 9):
        pieces, chunks = _plan(starts, budget)
        pa, pb, pe, pw, poff, pseg = pieces.T
        # the pieces tile the ranks in order, each inside its segment, one per segment per chunk
        np.testing.assert_array_equal(pa[1:], pb[:-1])
        assert pa[0] == 0 and pb[-1] == m
        np.testing.assert_array_equal(pe, starts[pseg + 1])
        assert (pa >= starts[pseg]).all() and (pb <= pe).all()
        np.testing.assert_array_equal(pw, (pe + 63) // 64 - pa // 64)
        for c0, c1, p0, p1, gx, words in chunks:
            assert pa[p0] == c0 and pb[p1 - 1] == c1
            assert len(set(pseg[p0:p1])) == p1 - p0
            np.testing.assert_array_equal(poff[p0:p1], np.cumsum(
                np.concatenate([[0], ((pb - pa) * pw)[p0:p1 - 1]])))
            assert words == int(((pb - pa) * pw)[p0:p1].sum())
            # within budget, unless a single piece of 64 ranks is already larger
            assert words <= budget or (p1 - p0 == 1 and pb[p0] - pa[p0] <= 64)
            assert (c1 - c0 + 63) // 64 <= _MAX_ROW_TILES
            # the mask grid reaches the end of every row tile's segments
            t0 = np.arange(c0, c1, 64)
            last = np.minimum(t0 + 63, c1 - 1)
            end = starts[np.searchsorted(starts, last, side="right")]
            assert gx == int(((end + 63) // 64 - t0 // 64).max())
    assert len(_plan(starts, 10 ** 9)[1]) == 1
    assert len(_plan(np.array([0, 100 * _MAX_ROW_TILES * 64]), 10 ** 15)[1]) == 100


def test_nms_window_is_exact_at_touching_edges(backend):
    # boxes whose overlap is a hair's width (and exactly zero) at large coordinates: the grid
    # window must not drop a pair that the IoU formula would suppress
    x = 1e7
    b = np.array([[x, 0, x + 1, 1], [x + 1 - 2 ** -29, 0, x + 2, 1], [x + 1, 0, x + 2, 1],
                  [x - 1 + 2 ** -29, 0, x + 2 ** -29, 1]], np.float64)
    for thr in (0.0, 1e-12):
        s = np.array([0.9, 0.8, 0.7, 0.6])
        np.testing.assert_array_equal(backend.asnumpy(fastnorm.nms(*backend.asarray((b, s)), thr)),
                                      greedy_nms(b, s, thr))


def test_float32_decisions_are_exact(backend):
    # IoU 0.49999998 in float64, 0.50000006 in float32 arithmetic: the CPU decides in float64,
    # and CUDA must keep and suppress the same boxes
    b = np.array([[6.519747257232666, 3.110861301422119, 22.38566017150879, 51.84260177612305],
                  [11.66566276550293, 3.5381288528442383, 25.05316162109375, 61.82369613647461]],
                 np.float32)
    s = np.array([0.9, 0.8], np.float32)
    bd, sd = backend.asarray((b, s))
    np.testing.assert_array_equal(backend.asnumpy(fastnorm.nms(bd, sd, 0.5)), [0, 1])
    np.testing.assert_array_equal(greedy_nms(b, s, 0.5), [0, 1])
    k, sc = backend.asnumpy(fastnorm.soft_nms(bd, sd, method="linear", iou_threshold=0.5))
    np.testing.assert_array_equal(sc, s)                 # linear: IoU not > 0.5, no decay


def test_nms_100k(rng):
    b, s = clusters(rng, 100_000, np.float32, side=1200.0)
    np.testing.assert_array_equal(fastnorm.nms(b, s, 0.5), greedy_nms(b, s, 0.5))


def test_nms_edge_cases(backend):
    B = backend

    def nms(b, s, thr, **kw):
        return B.asnumpy(fastnorm.nms(*B.asarray((b, s)), thr, **kw))

    b = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]], np.float32)
    s = np.array([0.5, 0.5, 0.5], np.float32)
    np.testing.assert_array_equal(nms(b, s, 0.5), [0])              # ties: lowest index
    np.testing.assert_array_equal(nms(b, s, 1.0), [0, 1, 2])        # IoU 1 is not > 1
    # degenerate (inverted, zero-width) and NaN boxes overlap nothing
    b = np.array([[0, 0, 10, 10], [10, 10, 0, 0], [5, 0, 5, 10], [np.nan, 0, 10, 10],
                  [0, 0, 10, 10]], np.float64)
    s = np.array([0.1, 0.9, 0.8, 0.7, 0.05])
    np.testing.assert_array_equal(nms(b, s, 0.0), [1, 2, 3, 0])
    for i in range(4):                  # a NaN in any coordinate, also of the higher box
        bn = np.array([[0, 0, 10, 10], [0, 0, 10, 10]], np.float64)
        bn[0, i] = np.nan
        np.testing.assert_array_equal(nms(bn, np.array([0.9, 0.8]), 0.0), [0, 1])
    # NaN scores rank below all numbers, -inf included
    b = np.array([[0, 0, 1, 1], [5, 5, 6, 6], [0, 0, 1, 1]], np.float32)
    s = np.array([np.nan, -np.inf, 0.0], np.float32)
    np.testing.assert_array_equal(nms(b, s, 0.5), [2, 1])
    # score_threshold keeps score > t (NaN dropped), max_output caps
    s = np.array([0.5, 0.2, 0.3], np.float32)
    np.testing.assert_array_equal(nms(b, s, 0.9, score_threshold=0.3), [0])
    np.testing.assert_array_equal(nms(b, s, 0.9, max_output=1), [0])
    np.testing.assert_array_equal(nms(b, s, 0.9, max_output=0), np.empty(0, int))
    # inf coordinates do not crash
    b = np.array([[0, 0, np.inf, 1], [0, 0, np.inf, 1], [-np.inf, -np.inf, np.inf, np.inf]],
                 np.float64)
    r = nms(b, np.array([0.3, 0.2, 0.1]), 0.5)
    np.testing.assert_array_equal(r, greedy_nms(b, np.array([0.3, 0.2, 0.1]), 0.5))
    # empty input
    e = nms(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), 0.5)
    assert e.shape == (0,) and e.dtype == np.int64


def test_nms_inputs_not_modified(backend, rng):
    b, s = clusters(rng, 300)
    bd, sd = backend.asarray((b, s))
    b, s = b.copy(), s.copy()                   # (on the CPU bd is b)
    idxs = backend.asarray(np.arange(300) % 3)
    fastnorm.nms(bd, sd, 0.5)
    fastnorm.batched_nms(bd, sd, idxs, 0.5)
    fastnorm.weighted_nms(bd, sd, 0.5)
    fastnorm.soft_nms(bd, sd)
    fastnorm.matrix_nms(bd, sd)
    np.testing.assert_array_equal(backend.asnumpy(bd), b)
    np.testing.assert_array_equal(backend.asnumpy(sd), s)


def test_nms_score_threshold_and_max_output_vs_oracle(backend, rng):
    b, s = clusters(rng, 500)
    got = backend.asnumpy(fastnorm.nms(*backend.asarray((b, s)), 0.4, score_threshold=0.25,
                                       max_output=40))
    np.testing.assert_array_equal(got, greedy_nms(b, s, 0.4, score_threshold=0.25,
                                                  max_output=40))


@pytest.mark.parametrize("dtype", DTYPES)
def test_batched_nms_matches_per_class(backend, rng, dtype):
    B = backend
    b, s = clusters(rng, 2000, dtype, side=60.0, tie_levels=10)
    idxs = rng.integers(-3, 5, 2000)
    bd, sd = B.asarray((b, s))
    np.testing.assert_array_equal(B.asnumpy(fastnorm.batched_nms(bd, sd, B.asarray(idxs), 0.5)),
                                  batched(b, s, idxs, 0.5))
    got = fastnorm.batched_nms(bd, sd, B.asarray(idxs.astype(np.int32)), 0.5,
                               score_threshold=0.3, max_output=50)
    np.testing.assert_array_equal(B.asnumpy(got), batched(b, s, idxs, 0.5, score_threshold=0.3,
                                                          max_output=50))


def test_batched_nms_exact_with_huge_coordinates(backend):
    # the coordinate-offset trick would shift class 1 by ~1e8 and lose the float32 precision
    b = np.array([[1e7, 1e7, 1e7 + 4, 1e7 + 4], [1e7 + 2, 1e7, 1e7 + 6, 1e7 + 4],
                  [1e7, 1e7, 1e7 + 4, 1e7 + 4]], np.float32)
    s = np.array([0.9, 0.8, 0.7], np.float32)
    bd, sd, idxs = backend.asarray((b, s, np.array([0, 0, 1])))
    np.testing.assert_array_equal(backend.asnumpy(fastnorm.batched_nms(bd, sd, idxs, 0.3)), [0, 2])
    np.testing.assert_array_equal(backend.asnumpy(fastnorm.batched_nms(bd, sd, idxs, 0.4)),
                                  [0, 1, 2])


def check_lists_and_batch_idx(B, rng, imgs, nms_fn, oracle, batched_fn, batched_oracle):
    """On per-image lists ``imgs`` of (boxes, scores): ``nms_fn(boxes, scores, **kw)`` equals
    ``oracle(b, s)`` image by image, and through ``batch_idx`` (the boxes of all images
    shuffled) the same, grouped by image; ``batched_fn(boxes, scores, idxs)`` with lists of
    class labels equals ``batched_oracle(b, s, i)``. Returns the lists and ``B``'s arrays."""
    bl, sl = [i[0] for i in imgs], [i[1] for i in imgs]
    bld, sld = B.asarray(bl), B.asarray(sl)
    per = [oracle(b, s) for b, s in zip(bl, sl)]
    got = B.asnumpy(nms_fn(bld, sld))
    assert isinstance(got, list) and len(got) == len(bl)
    for g, r in zip(got, per):
        np.testing.assert_array_equal(g, r)
    sizes = [len(s) for s in sl]
    b, s = np.concatenate(bl), np.concatenate(sl)
    bi = np.repeat(np.arange(len(sizes)), sizes)
    perm = rng.permutation(len(s))
    inv = np.argsort(perm)
    got = nms_fn(*B.asarray((b[perm], s[perm])), batch_idx=B.asarray(bi[perm]))
    offs = np.concatenate([[0], np.cumsum(sizes)])
    want = np.concatenate([inv[r + offs[i]] for i, r in enumerate(per)])
    np.testing.assert_array_equal(B.asnumpy(got), want)
    il = [rng.integers(0, 3, len(x)) for x in sl]
    got = B.asnumpy(batched_fn(bld, sld, B.asarray(il)))
    for g, b_, s_, i_ in zip(got, bl, sl, il):
        np.testing.assert_array_equal(g, batched_oracle(b_, s_, i_) if len(s_) else [])
    return bl, sl, bld, sld


def test_batch_idx_and_lists(backend, rng):
    B = backend
    bl, sl, bld, sld = check_lists_and_batch_idx(
        B, rng, [clusters(rng, n) for n in (50, 0, 120, 1)],
        lambda b, s, **kw: fastnorm.nms(b, s, 0.5, max_output=10, **kw),
        lambda b, s: greedy_nms(b, s, 0.5, max_output=10),
        lambda b, s, i: fastnorm.batched_nms(b, s, i, 0.5), lambda b, s, i: batched(b, s, i, 0.5))
    # soft/weighted/matrix accept lists too
    ks = B.asnumpy(fastnorm.soft_nms(bld, sld))
    assert len(ks) == 4 and len(ks[1][0]) == 0
    np.testing.assert_array_equal(ks[2][0], soft(bl[2], sl[2], "gaussian", 0.5, 0.3, 0.001)[0])
    kw = B.asnumpy(fastnorm.weighted_nms(bld, sld, 0.5))
    np.testing.assert_array_equal(kw[0][0], weighted(bl[0], sl[0], 0.5)[0])
    km = B.asnumpy(fastnorm.matrix_nms(bld, sld))
    np.testing.assert_allclose(km[2], matrix(bl[2], sl[2], "gaussian", 2.0), rtol=1e-12)


def test_threads_deterministic(rng):
    b, s = clusters(rng, 6000, np.float32, side=300.0)
    idxs = rng.integers(0, 8, 6000)
    r = np.c_[(b[:, :2] + b[:, 2:]) / 2, b[:, 2:] - b[:, :2],
              rng.uniform(-90, 90, 6000)].astype(np.float32)      # rotated boxes
    out = []
    for t in (1, 2):
        with fastnorm.threads(t):
            out.append((fastnorm.nms(b, s, 0.5), fastnorm.batched_nms(b, s, idxs, 0.5),
                        fastnorm.nms_rotated(r, s, 0.5), fastnorm.batched_nms_rotated(
                            r, s, idxs, 0.5), fastnorm.box_iou_rotated(r[:300], r[:200]),
                        fastnorm.matrix_nms(b[:500], s[:500]),
                        fastnorm.box_iou(b[:300], b[:200], metric="ciou")))
    for x, y in zip(*out):
        assert x.tobytes() == y.tobytes()


def test_cuda_host_synchronisations_do_not_grow_with_the_input(rng):
    # no host synchronisation per box: the emulator counts device-to-host reads
    from fastnorm._cuda import emulator
    counts = []
    for n in (300, 3000):
        b, s = clusters(rng, n, np.float32, side=300.0)
        idxs = emulator.asarray(rng.integers(0, 5, n))
        bd, sd = emulator.asarray(b), emulator.asarray(s)
        vd = emulator.asarray(variances(rng, n, np.float32))
        row = []
        for f in (lambda: fastnorm.nms(bd, sd, 0.5),
                  lambda: fastnorm.batched_nms(bd, sd, idxs, 0.5),
                  lambda: fastnorm.soft_nms(bd, sd), lambda: fastnorm.matrix_nms(bd, sd),
                  lambda: fastnorm.softer_nms(bd, sd, vd),
                  lambda: fastnorm.combined_nms(bd.reshape(1, n, 4), sd.reshape(1, n, 1),
                                                20, 50, 0.5, 0.2, pre_nms_top_k=n // 2)):
            with emulator.counting() as c:
                f()
            row.append(c.syncs)
        counts.append(row)
    # (data-dependent sizes count too: nms reads back the number of segments, the segment table
    # and the kept count; combined_nms also the counts of its candidates and of top-k's)
    assert counts[0] == counts[1] and max(counts[0][:5]) <= 3 and counts[0][5] <= 5, counts


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
def test_ranking_order_signed_zeros_infinities_nan(backend, dtype):
    """The ranking (CUDA: one stable sort of score keys): decreasing score, -0 and +0 equal
    (ties by index), +inf first, -inf after every number, NaN after -inf; disjoint boxes keep
    all, in that order."""
    if backend.name == "cpu" and dtype in ("float16", "bfloat16"):
        pytest.skip("half types are CUDA-only")
    vals = [0.0, -0.0, np.inf, -np.inf, np.nan, 1.5, -1.5, -0.0, 0.0, np.nan, 2.0 ** -14]
    n = len(vals)
    b = np.array([[10 * i, 0, 10 * i + 5, 5] for i in range(n)], np.float64)
    (bd, s), _ = rounded(dtype, b, np.array(vals))
    want = [2, 5, 10, 0, 1, 7, 8, 6, 3, 4, 9]
    got = backend.asnumpy(fastnorm.nms(*backend.asarray((bd, s)), 0.5))
    np.testing.assert_array_equal(got, want)
    cls = np.array([1, 0] * (n // 2) + [1])
    got = backend.asnumpy(fastnorm.batched_nms(*backend.asarray((bd, s, cls)), 0.5))
    np.testing.assert_array_equal(got, want)


def test_cuda_nms_host_work(rng):
    """Host work per call (emulator counts): nms ranks with one sort of score keys and needs no
    segment table read-back (one synchronisation: the kept count); batched_nms reads its segment
    table back once (two)."""
    from fastnorm._cuda import emulator
    b, s = clusters(rng, 500, np.float32)
    bd, sd = emulator.asarray(b), emulator.asarray(s)
    idxs = emulator.asarray(rng.integers(0, 5, 500))
    for f, syncs, ops in ((lambda: fastnorm.nms(bd, sd, 0.5), 1, 10),
                          (lambda: fastnorm.batched_nms(bd, sd, idxs, 0.5), 2, 18)):
        f()
        with emulator.counting() as c:
            f()
        assert c.syncs == syncs and c.ops <= ops, c


def test_cuda_sweep_barriers_per_tile_not_per_kept_rank(rng):
    """The sweep (nms_sweep) crosses three barriers per 64-rank tile of a segment, not one per
    kept rank: 3000 scattered boxes (most kept) in one class, then in 5 classes."""
    from fastnorm._cuda import emulator
    n = 3000
    xy = rng.uniform(0, 3000, (n, 2))
    b = np.concatenate([xy, xy + rng.uniform(5, 30, (n, 2))], 1).astype(np.float32)
    s = rng.uniform(0, 1, n).astype(np.float32)
    bd, sd = emulator.asarray(b), emulator.asarray(s)
    idxs = rng.integers(0, 5, n)
    for f, tiles in ((lambda: fastnorm.nms(bd, sd, 0.5), -(-n // 64)),
                     (lambda: fastnorm.batched_nms(bd, sd, emulator.asarray(idxs), 0.5),
                      sum(-(-int(m) // 64) + 1 for m in np.bincount(idxs)))):
        with emulator.counting() as c:
            kept = len(f())
        (sweep,) = [e for e in c.log if e.kernel.endswith("nms_sweep")]
        assert kept > 2000 and sweep.barriers <= 3 * tiles + sweep.blocks, (kept, sweep)


# ---------------------------------------------------------------- variants

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("beta", [1.0, 0.6, 2.0])
def test_diou_nms(backend, rng, dtype, beta):
    b, s = clusters(rng, 800, dtype)
    bd, sd = backend.asarray((b, s))
    for thr in (0.0, 0.3, 0.5):
        np.testing.assert_array_equal(backend.asnumpy(fastnorm.diou_nms(bd, sd, thr, beta=beta)),
                                      greedy_nms(b, s, thr, crit=1, beta=beta))


@pytest.mark.parametrize("dtype", DTYPES)
def test_weighted_nms(backend, rng, dtype):
    b, s = clusters(rng, 400, dtype)
    keep, fused = backend.asnumpy(fastnorm.weighted_nms(*backend.asarray((b, s)), 0.5))
    rk, rf = weighted(b, s, 0.5)
    np.testing.assert_array_equal(keep, rk)
    assert fused.dtype == dtype
    np.testing.assert_allclose(fused, rf, rtol=1e-6 if dtype == np.float32 else 1e-12)
    assert not np.array_equal(fused, b[keep])      # something was actually fused


@pytest.mark.parametrize("dtype", DTYPES)
def test_weighted_and_soft_with_batches(backend, rng, dtype):
    B = backend
    b, s = clusters(rng, 1500, dtype, side=150.0)
    bi = rng.integers(0, 3, 1500)
    bd, sd, bid = B.asarray((b, s, bi))
    tol = 1e-6 if dtype == np.float32 else 1e-12
    for kw in ({}, {"max_output": 50}, {"score_threshold": 0.4}):
        k, f = B.asnumpy(fastnorm.weighted_nms(bd, sd, 0.5, batch_idx=bid, **kw))
        want_k, want_f = [], []
        for i in range(3):
            sel = np.flatnonzero(bi == i)
            st = kw.get("score_threshold")
            sub = sel if st is None else sel[s[sel] > st]
            rk, rf = weighted(b[sub], s[sub], 0.5)
            cap = kw.get("max_output", len(rk))
            want_k.append(sub[rk][:cap])
            want_f.append(rf[:cap])
        np.testing.assert_array_equal(k, np.concatenate(want_k))
        np.testing.assert_allclose(f, np.concatenate(want_f), rtol=tol)
    for method in ("gaussian", "linear"):
        k, sc = B.asnumpy(fastnorm.soft_nms(bd, sd, method=method, score_threshold=0.05,
                                            batch_idx=bid))
        want_k, want_s = [], []
        for i in range(3):
            sel = np.flatnonzero(bi == i)
            rk, rs = soft(b[sel], s[sel], method, 0.5, 0.3, 0.05)
            want_k.append(sel[rk])
            want_s.append(rs)
        np.testing.assert_array_equal(k, np.concatenate(want_k))
        np.testing.assert_allclose(sc, np.concatenate(want_s), rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method,sigma,thr", [("gaussian", 0.5, 0.3), ("linear", 0.5, 0.3),
                                              ("linear", 0.5, 0.0), ("gaussian", 0.1, 0.3)])
def test_soft_nms(backend, rng, dtype, method, sigma, thr):
    b, s = clusters(rng, 300, dtype)
    keep, sc = backend.asnumpy(fastnorm.soft_nms(*backend.asarray((b, s)), method=method,
                                                 sigma=sigma, iou_threshold=thr,
                                                 score_threshold=0.05))
    rk, rs = soft(b, s, method, sigma, thr, 0.05)
    np.testing.assert_array_equal(keep, rk)
    assert sc.dtype == dtype
    np.testing.assert_allclose(sc, rs, rtol=1e-6 if dtype == np.float32 else 1e-12)
    assert (sc < s[keep]).any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel,sigma", [("gaussian", 2.0), ("gaussian", 0.5), ("linear", 2.0)])
def test_matrix_nms(backend, rng, dtype, kernel, sigma):
    B = backend
    b, s = clusters(rng, 150, dtype, tie_levels=10)
    got = B.asnumpy(fastnorm.matrix_nms(*B.asarray((b, s)), kernel=kernel, sigma=sigma))
    assert got.dtype == dtype and got.shape == s.shape
    np.testing.assert_allclose(got, matrix(b, s, kernel, sigma),
                               rtol=1e-6 if dtype == np.float32 else 1e-12, atol=1e-30)
    bi = (np.arange(150) % 2).astype(np.int64)
    got = B.asnumpy(fastnorm.matrix_nms(*B.asarray((b, s)), kernel=kernel, sigma=sigma,
                                        batch_idx=B.asarray(bi)))
    for i in (0, 1):
        np.testing.assert_allclose(got[bi == i], matrix(b[bi == i], s[bi == i], kernel, sigma),
                                   rtol=1e-6 if dtype == np.float32 else 1e-12, atol=1e-30)


def test_matrix_and_soft_nms_nan_boxes(backend):
    # a NaN box overlaps nothing: it neither decays others nor is decayed
    b = np.array([[0, 0, 10, 10], [np.nan, 0, 10, 10], [0, 0, 10, 10]], np.float64)
    s = np.array([0.5, 0.9, 0.4])
    bd, sd = backend.asarray((b, s))
    got = backend.asnumpy(fastnorm.matrix_nms(bd, sd, kernel="linear"))
    np.testing.assert_array_equal(got, [0.5, 0.9, 0.0])
    k, sc = backend.asnumpy(fastnorm.soft_nms(bd, sd, method="linear", iou_threshold=0.5))
    np.testing.assert_array_equal(k, [1, 0])
    np.testing.assert_array_equal(sc, [0.9, 0.5])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("metric", ["iou", "giou", "diou", "ciou"])
def test_box_iou(backend, rng, dtype, metric):
    a, _ = clusters(rng, 40, dtype, side=30)
    b, _ = clusters(rng, 33, dtype, side=30)
    a[0] = [5, 5, 5, 5]                 # degenerate point box
    a[1] = [3, 3, 1, 1]                 # inverted
    b[0] = [5, 5, 5, 5]
    ad, bd = backend.asarray((a, b))
    got = backend.asnumpy(fastnorm.box_iou(ad, bd, metric=metric))
    ref = box_metric(a.astype(np.float64), b.astype(np.float64), ["iou", "giou", "diou",
                                                                   "ciou"].index(metric))
    assert got.shape == (40, 33) and got.dtype == dtype and np.isfinite(got).all()
    np.testing.assert_allclose(got, ref, rtol=1e-6 if dtype == np.float32 else 1e-12,
                               atol=1e-6 if dtype == np.float32 else 1e-14)
    assert got[0, 0] == ref[0, 0]
    assert backend.asnumpy(fastnorm.box_iou(ad[:0], bd, metric=metric)).shape == (0, 33)


def test_box_iou_nan(backend):
    a = backend.asarray(np.array([[0, 0, np.nan, 1]], np.float32))
    assert np.isnan(backend.asnumpy(fastnorm.box_iou(a, a))).all()


# ---------------------------------------------------------------- softer_nms

def variances(rng, n, dtype=np.float64):
    """Box-coordinate variances over a factor of 80."""
    return rng.uniform(0.05, 4.0, (n, 4)).astype(dtype)


def softer_call(B, b, s, v, **kw):
    """fastnorm.softer_nms on backend B, results as NumPy; checks the inputs are not modified."""
    copies = [np.array(x, copy=True) for x in (b, s, v)]
    res = B.asnumpy(fastnorm.softer_nms(*B.asarray((b, s, v)), **kw))
    for x, c in zip((b, s, v), copies):
        np.testing.assert_array_equal(x, c)
    return res


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [0, 1, 2, 7, 300, 2500])
@pytest.mark.parametrize("method,sigma_t", [("gaussian", 0.01), ("linear", 0.1), ("hard", 0.05)])
def test_softer_nms_matches_oracle(backend, rng, dtype, n, method, sigma_t):
    if backend.is_cuda and n == 2500:
        n = 600                                   # the emulator
    b, s = clusters(rng, n, dtype, tie_levels=20 if n > 100 else None)
    v = variances(rng, n, dtype)
    bd, sd, vd = backend.asarray((b, s, v))
    keep, voted, sc = softer_call(backend, b, s, v, sigma_t=sigma_t, method=method,
                                  score_threshold=0.01)
    rk, rb, rs = softer(b, s, v, sigma_t, method, 0.5, 0.5, 0.01)
    assert keep.dtype == np.int64 and voted.dtype == dtype and sc.dtype == dtype
    assert voted.shape == (len(rk), 4)
    np.testing.assert_array_equal(keep, rk)
    tol = 1e-6 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(voted, rb, rtol=tol, atol=1e-12)
    np.testing.assert_allclose(sc, rs, rtol=tol)
    if n >= 300:
        assert not np.array_equal(voted, b[keep])          # something was actually voted


@pytest.mark.parametrize("dtype", DTYPES)
def test_softer_nms_batches_and_lists(backend, rng, dtype):
    B = backend
    n = 900 if backend.name == "cpu" else 300
    b, s = clusters(rng, n, dtype, side=100.0)
    v = variances(rng, n, dtype)
    bi = rng.integers(0, 3, n)
    bi[bi == 1] = 2                                       # an image without boxes
    kw = dict(method="linear", sigma_t=0.05, iou_threshold=0.3, score_threshold=0.05)
    k, vb, sc = B.asnumpy(fastnorm.softer_nms(*B.asarray((b, s, v)), batch_idx=B.asarray(bi),
                                              **kw))
    per = [(sel, softer_call(B, b[sel], s[sel], v[sel], **kw))
           for sel in (np.flatnonzero(bi == i) for i in range(3))]
    np.testing.assert_array_equal(k, np.concatenate([sel[r[0]] for sel, r in per]))
    np.testing.assert_array_equal(vb, np.concatenate([r[1] for _, r in per]))
    np.testing.assert_array_equal(sc, np.concatenate([r[2] for _, r in per]))
    rk, rb, rs = softer(b[bi == 2], s[bi == 2], v[bi == 2], 0.05, "linear", 0.5, 0.3, 0.05)
    np.testing.assert_array_equal(per[2][1][0], rk)
    np.testing.assert_allclose(per[2][1][1], rb, rtol=1e-6 if dtype == np.float32 else 1e-12)
    # per-image lists: a list of [keep, voted, scores], as the per-image calls
    lists = [[x[bi == i] for i in range(3)] for x in (b, s, v)]
    got = B.asnumpy(fastnorm.softer_nms(*B.asarray(lists), **kw))
    assert len(got) == 3 and got[1][0].shape == (0,) and got[1][1].shape == (0, 4)
    for g, (_, r) in zip(got, per):
        for x, y in zip(g, r):
            np.testing.assert_array_equal(x, y)


def test_softer_nms_edge_cases(backend):
    B = backend

    def run(b, s, v, **kw):
        b, s, v = (np.asarray(x, np.float64) for x in (b, s, v))
        return softer_call(B, b, s, np.broadcast_to(v, b.shape).copy(), **kw)

    one = np.ones(4)
    # empty input, and every score below the threshold: correctly shaped empties
    for b, s in ((np.zeros((0, 4)), np.zeros(0)), ([[0, 0, 1, 1]] * 2, [0.1, np.nan])):
        k, vb, sc = run(b, s, one, score_threshold=0.5)
        assert k.shape == (0,) and k.dtype == np.int64 and vb.shape == (0, 4) and sc.shape == (0,)
    # ties select the lower index first; identical boxes vote for themselves
    b = [[0, 0, 10, 10]] * 3
    k, vb, sc = run(b, [0.5] * 3, one, method="hard")
    np.testing.assert_array_equal(k, [0])
    np.testing.assert_array_equal(vb, [[0, 0, 10, 10]])
    # NaN and degenerate boxes overlap nothing: selected on their own score, never decayed, and
    # their voted box is themselves (bitwise); NaN scores are dropped
    b = [[0, 0, 10, 10], [np.nan, 0, 10, 10], [5, 0, 5, 10], [10, 10, 0, 0], [1, 0, 11, 10],
         [0, 0, 10, 10]]
    s = [0.5, 0.9, 0.8, 0.7, 0.4, np.nan]
    k, vb, sc = run(b, s, one, method="linear", iou_threshold=0.0)
    np.testing.assert_array_equal(k, [1, 2, 3, 0, 4])
    np.testing.assert_array_equal(vb[:3], np.asarray(b)[[1, 2, 3]])
    np.testing.assert_array_equal(sc[:4], [0.9, 0.8, 0.7, 0.5])
    assert 0 < vb[3, 0] < 1 and 10 < vb[3, 2] < 11 and sc[4] < 0.4
    np.testing.assert_allclose(vb[3, [1, 3]], [0, 10], rtol=1e-15)
    # variances: 0 is certain, inf and NaN give no say, nobody with a say keeps the coordinate
    b = [[0, 0, 10, 10], [1, 1, 11, 11]]
    v = [[np.inf, 0, 1, np.nan], [1, 1, 0, np.nan]]
    k, vb, sc = run(b, [0.9, 0.8], v, sigma_t=1e9)
    np.testing.assert_allclose(vb[0], [1, 0, 11, 10], rtol=1e-12)
    rk, rb, rs = softer(np.array(b, float), np.array([0.9, 0.8]), np.array(v), 1e9)
    np.testing.assert_array_equal(k, rk)
    np.testing.assert_allclose(vb, rb, rtol=1e-12)
    # weights are relative: scaled variances (also subnormal ones) give the same vote
    rng = np.random.default_rng(5)
    b, s = clusters(rng, 60, side=40.0)
    v = variances(rng, 60)
    ref = run(b, s, v, sigma_t=0.1)
    for scale in (2.0 ** -1000, 2.0 ** 1000):
        got = run(b, s, v * scale, sigma_t=0.1)
        np.testing.assert_array_equal(got[0], ref[0])
        np.testing.assert_allclose(got[1], ref[1], rtol=1e-12)
    np.testing.assert_array_equal(run(b, s, np.full(4, 5e-324), sigma_t=0.1)[1],
                                  run(b, s, one, sigma_t=0.1)[1])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_softer_nms_half_types(cuda_backend, rng, dtype):
    B = cuda_backend
    b, s = clusters(rng, 300, side=100.0, tie_levels=30)
    (bl, sl, vl), (b64, s64, v64) = rounded(dtype, b, s, variances(rng, 300))
    k, vb, sc = B.asnumpy(fastnorm.softer_nms(*B.asarray((bl, sl, vl)), sigma_t=0.1,
                                              score_threshold=0.05))
    rk, rb, rs = softer(b64, s64, v64, 0.1, "gaussian", 0.5, 0.5, 0.05)
    np.testing.assert_array_equal(k, rk)
    assert vb.dtype == sc.dtype == _dtype(dtype) and vb.shape == (len(rk), 4)
    np.testing.assert_allclose(vb.astype(np.float64), rb, rtol=1e-2)
    np.testing.assert_allclose(sc.astype(np.float64), rs, rtol=1e-2)


def test_softer_nms_errors(backend):
    A = backend.asarray
    b = A(np.zeros((3, 4), np.float32))
    s = A(np.zeros(3, np.float32))
    v = A(np.ones((3, 4), np.float32))
    with pytest.raises(ValueError, match="`method`"):
        fastnorm.softer_nms(b, s, v, method="box")
    for bad in (0.0, -1.0, np.nan):
        with pytest.raises(ValueError, match="`sigma_t`"):
            fastnorm.softer_nms(b, s, v, sigma_t=bad)
    with pytest.raises(ValueError, match="`variances`"):
        fastnorm.softer_nms(b, s, A(-np.ones((3, 4), np.float32)))
    with pytest.raises(ValueError, match="`variances`"):
        fastnorm.softer_nms(b, s, A(np.ones((3, 2), np.float32)))
    with pytest.raises(TypeError, match="`variances`"):
        fastnorm.softer_nms(b, s, A(np.ones((3, 4), np.float64)))
    with pytest.raises(TypeError, match="`variances`"):
        fastnorm.softer_nms(b, s, None)
    with pytest.raises(ValueError, match="`variances`"):
        fastnorm.softer_nms([b, b], [s, s], [v])
    with pytest.raises(ValueError, match=r"`variances\[1\]`"):
        fastnorm.softer_nms([b, b], [s, s], [v, v[:2]])


# ---------------------------------------------------------------- combined_nms

COMBINED_OUT = ("boxes", "scores", "classes", "num_detections", "indices")


def detections(rng, B, N, C, dtype=np.float64, *, specific=False, tie_levels=20, nan=0.0):
    """Batched YOLO-like inputs: per image clustered boxes (B, N, 4) -- (B, N, C, 4), one per
    class, when ``specific`` -- and scores (B, N, C), quantised to force ties; a fraction
    ``nan`` of the scores and of the boxes (one coordinate) NaN."""
    shape = (B, N, C, 4) if specific else (B, N, 4)
    boxes = np.stack([clusters(rng, N * (C if specific else 1), side=100.0)[0]
                      for _ in range(B)]).reshape(shape)
    hit = rng.random(shape[:-1]) < nan
    boxes[hit, rng.integers(0, 4, np.count_nonzero(hit))] = np.nan
    s = rng.random((B, N, C))
    if tie_levels:
        s = np.round(s * tie_levels) / tie_levels
    s[rng.random(s.shape) < nan] = np.nan
    return boxes.astype(dtype), s.astype(dtype)


def assert_combined(got, want, dtype):
    """combined_nms outputs (with indices) equal the oracle's, with the documented dtypes."""
    assert len(got) == 5
    for g, w, name in zip(got, want, COMBINED_OUT):
        assert g.dtype == (_dtype(dtype) if name in ("boxes", "scores") else np.int64), name
        assert g.shape == w.shape, name
        np.testing.assert_array_equal(g.astype(np.float64), w, err_msg=name)


COMBINED_OPTIONS = [
    dict(max_output_per_class=None, max_total=1000),
    dict(max_output_per_class=3, max_total=10, score_threshold=0.25),
    dict(max_output_per_class=50, max_total=7, iou_threshold=0.3),
    dict(max_output_per_class=2, max_total=1000, score_threshold=0.0, pre_nms_top_k=25),
    dict(max_output_per_class=None, max_total=12, score_threshold=0.1, class_agnostic=True),
    dict(max_output_per_class=2, max_total=1000, iou_threshold=0.0, class_agnostic=True),
    dict(max_output_per_class=4, max_total=9, score_threshold=0.2, class_agnostic=True,
         pre_nms_top_k=30),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("specific", [False, True])
@pytest.mark.parametrize("opts", COMBINED_OPTIONS)
def test_combined_nms_matches_oracle(backend, rng, dtype, specific, opts):
    kw = dict(iou_threshold=0.5) | opts
    shapes = [(3, 40, 4), (1, 90, 2), (2, 25, 7)] + ([] if backend.is_cuda else [(4, 300, 3)])
    for B, N, C in shapes:
        b, s = detections(rng, B, N, C, dtype, specific=specific, nan=0.03)
        want = combined(b, s, **kw)
        assert want[3].min() > 0
        got = fastnorm.combined_nms(*backend.asarray((b, s)), return_indices=True, **kw)
        assert_combined(backend.asnumpy(got), want, dtype)


def _rank_order(f, flat_scores):
    """Candidate indices f by decreasing score, ties by lower index."""
    return f[np.lexsort((f, -flat_scores[f]))]


def _first_per_class(f, C, cap):
    """The ranked candidates f that are among the first ``cap`` of their class."""
    cls = f % C
    return f[[np.count_nonzero(cls[:j] == cls[j]) < cap for j in range(len(f))]]


@pytest.mark.parametrize("class_agnostic", [False, True])
def test_combined_nms_equals_per_class_nms(backend, rng, class_agnostic):
    # per image (and class): fastnorm.nms, then the per-class cap and max_total
    B, N, C = (2, 150, 5) if backend.is_cuda else (3, 3000, 6)
    b, s = detections(rng, B, N, C, np.float32, tie_levels=50)
    cap, K, thr, st = 15, 60, 0.5, 0.3
    got = backend.asnumpy(fastnorm.combined_nms(
        *backend.asarray((b, s)), cap, K, thr, st, class_agnostic=class_agnostic,
        return_indices=True))
    for i in range(B):
        flat = s[i].ravel()
        if class_agnostic:
            f = fastnorm.nms(np.repeat(b[i], C, axis=0), flat, thr, score_threshold=st)
        else:
            f = np.concatenate([fastnorm.nms(b[i], s[i, :, c], thr, score_threshold=st,
                                             max_output=cap) * C + c for c in range(C)])
        f = _first_per_class(_rank_order(f, flat), C, cap)[:K]
        k = len(f)
        assert 0 < got[3][i] == k <= K
        np.testing.assert_array_equal(got[4][i, :k], f // C)
        np.testing.assert_array_equal(got[2][i, :k], f % C)
        np.testing.assert_array_equal(got[1][i, :k], flat[f])
        np.testing.assert_array_equal(got[0][i, :k], b[i, f // C])
    if not backend.is_cuda:                    # any thread count gives the same bytes
        for t in (1, 3):
            with fastnorm.threads(t):
                again = fastnorm.combined_nms(b, s, cap, K, thr, st,
                                              class_agnostic=class_agnostic, return_indices=True)
            assert all(x.tobytes() == y.tobytes() for x, y in zip(got, again))


def test_combined_nms_edge_cases(backend):
    B = backend

    def run(b, s, *args, **kw):
        return B.asnumpy(fastnorm.combined_nms(*B.asarray((np.asarray(b, np.float32),
                                                           np.asarray(s, np.float32))),
                                               *args, return_indices=True, **kw))

    # empty batches, boxes, classes, outputs: correctly shaped, padded
    for (nb, n, c), k in [((0, 5, 3), 4), ((2, 0, 3), 4), ((2, 5, 0), 4), ((2, 5, 3), 0)]:
        out = run(np.ones((nb, n, 4)), np.ones((nb, n, c)), None, k)
        assert [o.shape for o in out] == [(nb, k, 4), (nb, k), (nb, k), (nb,), (nb, k)]
        assert not out[3].any() and (out[4] == -1).all() and not out[0].any()
    box = [[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]]
    s = [[0.9, 0.1], [0.8, 0.7], [0.2, 0.6]]
    # all scores below the threshold (strict: equal is below), or a cap of 0: padding only
    for args in ((5, 4, 0.5, 0.9), (0, 4, 0.5)):
        bo, sc, cl, num, idx = run([box], [s], *args)
        assert num[0] == 0 and not bo.any() and not sc.any() and not cl.any()
        assert (idx == -1).all()
    # padding after the detections: zero boxes/scores/classes, index -1
    bo, sc, cl, num, idx = run([box], [s], 5, 6, 0.5, 0.3)
    np.testing.assert_array_equal(num, [3])
    np.testing.assert_array_equal(idx, [[0, 1, 2, -1, -1, -1]])
    np.testing.assert_array_equal(cl, [[0, 1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(sc, np.float32([[0.9, 0.7, 0.6, 0, 0, 0]]))
    np.testing.assert_array_equal(bo[0, 3:], 0)
    # (B, N, 1, 4) boxes are shared boxes
    for g, w in zip(run(np.array([box])[:, :, None], [s], 5, 6, 0.5, 0.3),
                    run([box], [s], 5, 6, 0.5, 0.3)):
        np.testing.assert_array_equal(g, w)
    # ties: the lower candidate index n * C + c first, and it suppresses the others
    same = [[0, 0, 10, 10]] * 3
    ties = [[0.5, 0.5]] * 3
    np.testing.assert_array_equal(run([same], [ties], None, 5, 0.5)[4], [[0, 0, -1, -1, -1]])
    np.testing.assert_array_equal(run([same], [ties], None, 5, 0.5)[2], [[0, 1, 0, 0, 0]])
    _, _, cl, num, idx = run([same], [ties], None, 5, 0.5, class_agnostic=True)
    assert num[0] == 1 and idx[0, 0] == 0 and cl[0, 0] == 0
    _, _, cl, num, idx = run([same], [ties], None, 5, 1.0)       # IoU 1 is not > 1
    np.testing.assert_array_equal(idx, [[0, 0, 1, 1, 2]])
    np.testing.assert_array_equal(cl, [[0, 1, 0, 1, 0]])
    # NaN scores are never candidates (with or without a threshold); NaN boxes overlap nothing
    nan_b = [[0, 0, 10, 10], [np.nan, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]]
    nan_s = [[0.5], [0.9], [np.nan], [0.4]]
    for st in (None, 0.0):
        bo, sc, cl, num, idx = run([nan_b], [nan_s], None, 4, 0.5, st)
        np.testing.assert_array_equal(idx, [[1, 0, -1, -1]])
        assert np.isnan(bo[0, 0, 0]) and (bo[0, 0, 1:] == [0, 10, 10]).all()
    # -inf scores are candidates without a threshold
    np.testing.assert_array_equal(run([box], [[[-np.inf], [0.1], [np.nan]]], None, 3, 1.0)[4],
                                  [[1, 0, -1]])


def test_combined_nms_inputs_not_modified(backend, rng):
    for specific in (False, True):
        b, s = detections(rng, 2, 60, 3, specific=specific, nan=0.05)
        bd, sd = backend.asarray((b, s))
        fastnorm.combined_nms(bd, sd, 5, 20, 0.5, 0.1, pre_nms_top_k=40)
        fastnorm.combined_nms(bd, sd, None, 20, 0.5, class_agnostic=True)
        np.testing.assert_array_equal(backend.asnumpy(bd), b)
        np.testing.assert_array_equal(backend.asnumpy(sd), s)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("specific", [False, True])
def test_combined_nms_half_types(cuda_backend, rng, dtype, specific):
    B = cuda_backend
    b, s = detections(rng, 2, 60, 4, specific=specific, tie_levels=None, nan=0.03)
    (bl, sl), (b64, s64) = rounded(dtype, b, s)
    for kw in (dict(score_threshold=0.2), dict(class_agnostic=True, pre_nms_top_k=70)):
        got = B.asnumpy(fastnorm.combined_nms(*B.asarray((bl, sl)), 6, 30, 0.5,
                                              return_indices=True, **kw))
        assert_combined(got, combined(b64, s64, 6, 30, 0.5, **kw), dtype)


def test_combined_nms_onnxruntime_parity(backend, rng):
    # ONNX NonMaxSuppression (scores (B, C, N)) selects the same (image, class, box) triples;
    # its selection ranked by score and cut equals max_total. Scores are distinct (ONNX Runtime
    # leaves the order of equal scores to its heap), boxes well-formed (it reorders corners),
    # coordinates on a 1/4 grid so that its float32 IoU is exact; a score threshold of 0.25
    # is exact in float32 too.
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper
    inputs = [("boxes", TensorProto.FLOAT, [None, None, 4]),
              ("scores", TensorProto.FLOAT, [None, None, None]),
              ("max_output_boxes_per_class", TensorProto.INT64, [1]),
              ("iou_threshold", TensorProto.FLOAT, [1]),
              ("score_threshold", TensorProto.FLOAT, [1])]
    node = helper.make_node("NonMaxSuppression", [i[0] for i in inputs], ["selected"],
                            center_point_box=0)
    graph = helper.make_graph([node], "nms", [helper.make_tensor_value_info(*i) for i in inputs],
                              [helper.make_tensor_value_info("selected", TensorProto.INT64,
                                                             [None, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 7
    session = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    B, N, C = (2, 80, 3) if backend.is_cuda else (3, 600, 5)
    b = np.stack([clusters(rng, N, np.float32)[0] for _ in range(B)])
    s = ((rng.permutation(B * N * C) + 1) / (B * N * C + 1)).astype(np.float32).reshape(B, N, C)
    for cap, thr, st in ((1000, 0.5, 0.25), (4, 0.3, 0.0), (10, 0.65, 0.5)):
        sel = session.run(None, {"boxes": b, "scores": np.ascontiguousarray(s.transpose(0, 2, 1)),
                                 "max_output_boxes_per_class": np.array([cap], np.int64),
                                 "iou_threshold": np.array([thr], np.float32),
                                 "score_threshold": np.array([st], np.float32)})[0]
        for K in (N * C, 20):
            _, sc, cl, num, idx = backend.asnumpy(fastnorm.combined_nms(
                *backend.asarray((b, s)), cap, K, thr, st, return_indices=True))
            for i in range(B):
                f = sel[sel[:, 0] == i, 2] * C + sel[sel[:, 0] == i, 1]
                f = _rank_order(f, s[i].ravel())[:K]
                assert num[i] == len(f) > 5
                np.testing.assert_array_equal(idx[i, :num[i]], f // C)
                np.testing.assert_array_equal(cl[i, :num[i]], f % C)


def test_combined_nms_errors(backend):
    A = backend.asarray
    b = A(np.zeros((2, 3, 4), np.float32))
    s = A(np.zeros((2, 3, 5), np.float32))
    for bad in ((2, 3, 5), (2, 4, 4), (1, 3, 4), (2, 3, 2, 4), (2, 3, 5, 3), (6, 4)):
        with pytest.raises(ValueError, match="`boxes`"):
            fastnorm.combined_nms(A(np.zeros(bad, np.float32)), s, 5, 10)
    with pytest.raises(ValueError, match="`scores`"):
        fastnorm.combined_nms(b, A(np.zeros((2, 3), np.float32)), 5, 10)
    with pytest.raises(TypeError, match="`boxes`"):
        fastnorm.combined_nms(A(np.zeros((2, 3, 4), np.int64)), s, 5, 10)
    with pytest.raises(TypeError, match="`boxes`"):
        fastnorm.combined_nms(A(np.zeros((2, 3, 4), np.float64)), s, 5, 10)
    with pytest.raises(TypeError, match="`scores`"):
        fastnorm.combined_nms(b, A(np.zeros((2, 3, 5), np.int32)), 5, 10)
    for name, kw in (("max_output_per_class", dict(max_output_per_class=-1)),
                     ("max_total", dict(max_total=-1)),
                     ("pre_nms_top_k", dict(pre_nms_top_k=0)),
                     ("iou_threshold", dict(iou_threshold=-0.1)),
                     ("iou_threshold", dict(iou_threshold=np.nan)),
                     ("score_threshold", dict(score_threshold=np.inf)),
                     ("score_threshold", dict(score_threshold=np.nan))):
        with pytest.raises(ValueError, match=f"`{name}`"):
            fastnorm.combined_nms(b, s, **(dict(max_output_per_class=5, max_total=10) | kw))
    with pytest.raises(TypeError, match="`max_total`"):
        fastnorm.combined_nms(b, s, 5, 10.0)
    if backend.is_cuda:
        with pytest.raises(TypeError, match="`scores` is a numpy.ndarray"):
            fastnorm.combined_nms(b, np.zeros((2, 3, 5), np.float32), 5, 10)


# ---------------------------------------------------------------- interop and errors

def test_torch_round_trip(rng):
    torch = pytest.importorskip("torch")
    b, s = clusters(rng, 200, np.float32)
    keep = fastnorm.nms(torch.from_numpy(b), torch.from_numpy(s), 0.5)
    assert isinstance(keep, torch.Tensor) and keep.dtype == torch.int64
    np.testing.assert_array_equal(keep.numpy(), greedy_nms(b, s, 0.5))
    k, f = fastnorm.weighted_nms(torch.from_numpy(b), torch.from_numpy(s), 0.5)
    assert isinstance(f, torch.Tensor) and f.shape == (len(k), 4)
    iou = fastnorm.box_iou(torch.from_numpy(b[:5]), torch.from_numpy(b[:7]))
    assert isinstance(iou, torch.Tensor) and iou.shape == (5, 7)
    s3 = np.stack([s, s[::-1]], 1)[None]
    out = fastnorm.combined_nms(torch.from_numpy(b[None]), torch.from_numpy(s3), 10, 15,
                                return_indices=True)
    assert all(isinstance(o, torch.Tensor) for o in out) and out[4].dtype == torch.int64
    for g, w in zip(out, fastnorm.combined_nms(b[None], s3, 10, 15, return_indices=True)):
        np.testing.assert_array_equal(g.numpy(), w)


def test_errors(backend):
    A = backend.asarray
    b = A(np.zeros((3, 4), np.float32))
    s = A(np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="`boxes`"):
        fastnorm.nms(A(np.zeros((3, 5), np.float32)), s, 0.5)
    with pytest.raises(ValueError, match="`boxes`"):
        fastnorm.nms(A(np.zeros(12, np.float32)), s, 0.5)
    with pytest.raises(TypeError, match="`boxes`"):
        fastnorm.nms(A(np.zeros((3, 4), np.int64)), s, 0.5)
    with pytest.raises(ValueError, match="`scores`"):
        fastnorm.nms(b, A(np.zeros(4, np.float32)), 0.5)
    with pytest.raises(TypeError, match="`scores`"):
        fastnorm.nms(b, A(np.zeros(3, np.float64)), 0.5)
    for bad in (np.nan, -0.1, np.inf):
        with pytest.raises(ValueError, match="`iou_threshold`"):
            fastnorm.nms(b, s, bad)
    with pytest.raises(ValueError, match="`idxs`"):
        fastnorm.batched_nms(b, s, A(np.zeros(2, np.int64)), 0.5)
    with pytest.raises(TypeError, match="`idxs`"):
        fastnorm.batched_nms(b, s, A(np.zeros(3, np.float32)), 0.5)
    with pytest.raises(ValueError, match="`batch_idx`"):
        fastnorm.nms(b, s, 0.5, batch_idx=A(np.array([0, -1, 0])))
    with pytest.raises(ValueError, match="`batch_idx`"):
        fastnorm.nms(b, s, 0.5, batch_idx=A(np.array([0, 1])))
    with pytest.raises(ValueError, match="`max_output`"):
        fastnorm.nms(b, s, 0.5, max_output=-1)
    with pytest.raises(ValueError, match="`score_threshold`"):
        fastnorm.nms(b, s, 0.5, score_threshold=np.nan)
    with pytest.raises(ValueError, match="`method`"):
        fastnorm.soft_nms(b, s, method="hard")
    with pytest.raises(ValueError, match="`sigma`"):
        fastnorm.soft_nms(b, s, sigma=0.0)
    with pytest.raises(ValueError, match="`kernel`"):
        fastnorm.matrix_nms(b, s, kernel="box")
    with pytest.raises(ValueError, match="`beta`"):
        fastnorm.diou_nms(b, s, 0.5, beta=0)
    with pytest.raises(ValueError, match="`metric`"):
        fastnorm.box_iou(b, b, metric="dice")
    with pytest.raises(TypeError, match="`b`"):
        fastnorm.box_iou(b, A(np.zeros((3, 4), np.float64)))
    with pytest.raises(ValueError, match="`scores`"):
        fastnorm.nms([b, b], [s], 0.5)
    with pytest.raises(ValueError, match=r"`scores\[1\]`"):
        fastnorm.nms([b, b], [s, s[:2]], 0.5)
    with pytest.raises(TypeError, match=r"`boxes\[0\]`"):
        fastnorm.nms([[0, 0, 1, 1]], [0.5], 0.5)
    if backend.is_cuda:                # mixing host and device arrays is refused, not copied
        with pytest.raises(TypeError, match="`scores` is a numpy.ndarray"):
            fastnorm.nms(b, np.zeros(3, np.float32), 0.5)


# ---------------------------------------------------------------- iou_guided_nms, adaptive_nms

def _per_image(fn, bi, *arrays):
    """``fn`` run on each image of ``bi`` in turn: (kept input indices, extras) concatenated."""
    keep, extra = [], []
    for i in np.unique(bi):
        sel = np.flatnonzero(bi == i)
        r = fn(*(a[sel] for a in arrays))
        k, e = r if isinstance(r, tuple) else (r, None)
        keep.append(sel[k])
        extra.append(e)
    return np.concatenate(keep or [np.zeros(0, np.int64)]), \
        (None if not extra or extra[0] is None else np.concatenate(extra))


def _confidences(rng, n, dtype, ties=None):
    c = rng.random(n)
    if ties:
        c = np.round(c * ties) / ties
    return c.astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [0, 1, 2, 7, 150, 2500])
@pytest.mark.parametrize("thr", [0.0, 0.3, 0.5, 0.75])
def test_iou_guided_nms_matches_oracle(backend, rng, dtype, n, thr):
    if backend.is_cuda and n == 2500:
        n = 800                                    # the emulator's time
    b, s = clusters(rng, n, dtype, tie_levels=20 if n > 100 else None)
    loc = _confidences(rng, n, dtype, ties=15 if n > 100 else None)
    keep, new = backend.asnumpy(fastnorm.iou_guided_nms(*backend.asarray((b, s, loc)), thr))
    rk, rs = iou_guided(b, s, loc, thr)
    assert keep.dtype == np.int64 and new.dtype == dtype
    np.testing.assert_array_equal(keep, rk)
    np.testing.assert_array_equal(new, rs.astype(dtype))      # a score of the input: exact
    if n > 100:                        # clusters did take a higher score than their kept box
        assert (new > s[keep]).any() and (new == s[keep]).any()
        np.testing.assert_array_equal(np.sort(keep), greedy_nms(b, loc, thr)[
            np.argsort(greedy_nms(b, loc, thr))])


@pytest.mark.parametrize("dtype", DTYPES)
def test_iou_guided_nms_options(backend, rng, dtype):
    # idxs (class-aware), score_threshold, max_output, batch_idx: against per-image oracles
    B = backend
    n = 600 if backend.is_cuda else 2000
    b, s = clusters(rng, n, dtype, side=80.0, tie_levels=10)
    loc = _confidences(rng, n, dtype, ties=10)
    idxs = rng.integers(-2, 4, n)
    bi = rng.integers(0, 3, n)
    bd, sd, ld, idd, bid = B.asarray((b, s, loc, idxs, bi))
    for kw in ({}, {"score_threshold": 0.4}, {"max_output": 17},
               {"score_threshold": 0.25, "max_output": 40}):
        got = B.asnumpy(fastnorm.iou_guided_nms(bd, sd, ld, 0.45, idxs=idd, **kw))
        want = iou_guided(b, s, loc, 0.45, idxs=idxs, **kw)
        np.testing.assert_array_equal(got[0], want[0], err_msg=str(kw))
        np.testing.assert_array_equal(got[1], want[1].astype(dtype))
        got = B.asnumpy(fastnorm.iou_guided_nms(bd, sd, ld, 0.45, idxs=idd, batch_idx=bid, **kw))
        want = _per_image(lambda b_, s_, l_, i_: iou_guided(b_, s_, l_, 0.45, idxs=i_, **kw),
                          bi, b, s, loc, idxs)
        np.testing.assert_array_equal(got[0], want[0], err_msg=str(kw))
        np.testing.assert_array_equal(got[1], want[1].astype(dtype))
    # class-aware: no box suppresses a box of another class
    plain = B.asnumpy(fastnorm.iou_guided_nms(bd, sd, ld, 0.45))[0]
    aware = B.asnumpy(fastnorm.iou_guided_nms(bd, sd, ld, 0.45, idxs=idd))[0]
    assert len(aware) > len(plain)
    np.testing.assert_array_equal(
        np.sort(aware), np.sort(np.concatenate([np.flatnonzero(idxs == c)[greedy_nms(
            b[idxs == c], loc[idxs == c], 0.45)] for c in np.unique(idxs)])))


def test_iou_guided_nms_edge_cases(backend):
    B = backend

    def run(b, s, loc, thr=0.5, **kw):
        return B.asnumpy(fastnorm.iou_guided_nms(*B.asarray((np.asarray(b, np.float64),
                                                             np.asarray(s, np.float64),
                                                             np.asarray(loc, np.float64))),
                                                 thr, **kw))

    same = [[0, 0, 10, 10]] * 3
    # ties of localization: the lower index is kept and takes the cluster's best score
    k, s = run(same, [0.2, 0.9, 0.5], [0.7, 0.7, 0.7])
    np.testing.assert_array_equal(k, [0])
    np.testing.assert_array_equal(s, [0.9])
    # NaN localization ranks last; NaN scores are below every number (all NaN: NaN)
    k, s = run(same, [0.2, 0.9, 0.5], [np.nan, 0.1, 0.3])
    np.testing.assert_array_equal(k, [2])
    np.testing.assert_array_equal(s, [0.9])
    k, s = run(same, [np.nan, 0.3, np.nan], [0.9, 0.1, 0.3])
    np.testing.assert_array_equal(s, [0.3])
    k, s = run(same[:2] + [[20, 20, 30, 30]], [np.nan, np.nan, 0.1], [0.9, 0.1, 0.3])
    np.testing.assert_array_equal(k, [2, 0])
    assert s[0] == 0.1 and np.isnan(s[1])
    # score_threshold drops boxes before NMS (NaN scores too); IoU 1 is not > 1
    k, s = run(same, [0.2, 0.9, np.nan], [0.7, 0.6, 0.9], score_threshold=0.5)
    np.testing.assert_array_equal(k, [1])
    k, s = run(same, [0.2, 0.9, 0.5], [0.7, 0.6, 0.9], 1.0)
    np.testing.assert_array_equal(k, [1, 2, 0])
    np.testing.assert_array_equal(s, [0.9, 0.5, 0.2])
    # degenerate and NaN boxes overlap nothing: kept, with their own score
    b = [[0, 0, 10, 10], [10, 10, 0, 0], [5, 0, 5, 10], [np.nan, 0, 10, 10], [0, 0, 10, 10]]
    k, s = run(b, [0.1, 0.9, 0.8, 0.7, 0.6], [0.5, 0.9, 0.8, 0.7, 0.6], 0.0)
    np.testing.assert_array_equal(k, [1, 2, 3, 4])
    np.testing.assert_array_equal(s, [0.9, 0.8, 0.7, 0.6])
    # max_output keeps the highest new scores, not the first in localization order
    k, s = run(same[:2] + [[20, 20, 30, 30]], [0.1, 0.9, 0.5], [0.9, 0.1, 0.8], max_output=1)
    np.testing.assert_array_equal(k, [0])
    np.testing.assert_array_equal(s, [0.9])
    k, _ = run(same, [0.1, 0.2, 0.3], [0.1, 0.2, 0.3], max_output=0)
    assert k.shape == (0,)
    # empty input
    k, s = run(np.zeros((0, 4)), np.zeros(0), np.zeros(0))
    assert k.shape == s.shape == (0,) and k.dtype == np.int64 and s.dtype == np.float64


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["hard", "linear", "gaussian"])
@pytest.mark.parametrize("n", [0, 1, 2, 7, 300, 2500])
def test_adaptive_nms_matches_oracle(backend, rng, dtype, method, n):
    if n == 2500 and (method != "hard" or backend.is_cuda):
        n = 800                                    # O(n^2) oracle and emulator time
    b, s = clusters(rng, n, dtype, tie_levels=20 if n > 100 else None)
    dens = _confidences(rng, n, dtype, ties=10 if n > 100 else None)
    bd, sd, dd = backend.asarray((b, s, dens))
    for thr, st in ((0.3, 0.001), (0.5, 0.2), (0.0, 0.5)):
        res = backend.asnumpy(fastnorm.adaptive_nms(bd, sd, dd, thr, method=method,
                                                    score_threshold=st))
        rk, rs = adaptive(b, s, dens, thr, method, 0.5, st)
        if method == "hard":
            assert res.dtype == np.int64
            np.testing.assert_array_equal(res, rk)
            continue
        keep, new = res
        np.testing.assert_array_equal(keep, rk)
        assert new.dtype == dtype
        np.testing.assert_allclose(new, rs, rtol=1e-6 if dtype == np.float32 else 1e-12)
    if n > 100 and method == "hard":
        # the density matters: densities 0 give greedy NMS, dense regions keep more
        got0 = backend.asnumpy(fastnorm.adaptive_nms(bd, sd, backend.asarray(0 * dens), 0.3))
        np.testing.assert_array_equal(got0, greedy_nms(b, s, 0.3, score_threshold=0.001))
        assert len(res) > len(greedy_nms(b, s, 0.0, score_threshold=0.5))


def test_adaptive_nms_gaussian_decays_only_above_the_threshold(backend):
    b = np.array([[0, 0, 10, 10], [0, 0, 10, 6], [0, 0, 10, 3]], np.float64)   # IoU .6, .3
    s = np.array([0.9, 0.8, 0.7])
    d = np.array([0.4, 0.0, 0.0])
    k, new = backend.asnumpy(fastnorm.adaptive_nms(*backend.asarray((b, s, d)), 0.1,
                                                   method="gaussian", sigma=0.5))
    # box 0 (threshold .4) decays box 1 (IoU .6), not box 2 (IoU .3); box 2 (threshold .1)
    # then decays box 1 (IoU .5)
    np.testing.assert_array_equal(k, [0, 2, 1])
    np.testing.assert_allclose(new, [0.9, 0.7, 0.8 * np.exp(-0.36 / 0.5) * np.exp(-0.25 / 0.5)],
                               rtol=1e-14)
    ks, ss = backend.asnumpy(fastnorm.soft_nms(*backend.asarray((b, s)), sigma=0.5))
    assert ks[1] == 2 and ss[1] < 0.7                 # Soft-NMS decays every overlap


def test_adaptive_nms_edge_cases(backend):
    B = backend

    def run(b, s, d, thr=0.5, **kw):
        return B.asnumpy(fastnorm.adaptive_nms(*B.asarray((np.asarray(b, np.float64),
                                                           np.asarray(s, np.float64),
                                                           np.asarray(d, np.float64))),
                                               thr, **kw))

    b = [[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]]         # IoU(0, 1) = 81/119
    s = [0.9, 0.8, 0.7]
    np.testing.assert_array_equal(run(b, s, [0.0, 0.0, 0.0]), [0, 2])
    np.testing.assert_array_equal(run(b, s, [0.69, 0.0, 0.0]), [0, 1, 2])
    np.testing.assert_array_equal(run(b, s, [0.0, 0.69, 0.0]), [0, 2])  # the selected box's
    np.testing.assert_array_equal(run(b, s, [np.inf, 0.0, 0.0]), [0, 1, 2])
    same = [[0, 0, 10, 10]] * 2
    np.testing.assert_array_equal(run(same, s[:2], [1.0, 0.0]), [0, 1])   # IoU 1 is not > 1
    np.testing.assert_array_equal(run(same, s[:2], [0.99, 0.0]), [0])
    # NaN (and negative) densities: the iou_threshold alone
    np.testing.assert_array_equal(run(b, s, [np.nan, 0.0, 0.0], 0.69), [0, 1, 2])
    np.testing.assert_array_equal(run(b, s, [np.nan, 0.0, 0.0], 0.6), [0, 2])
    np.testing.assert_array_equal(run(b, s, [-np.inf, 0.0, 0.0], 0.6), [0, 2])
    # score_threshold: score >= t takes part (equality included), NaN scores never
    np.testing.assert_array_equal(run(b, s, [1, 1, 1], score_threshold=0.8), [0, 1])
    np.testing.assert_array_equal(run(b, [np.nan, 0.8, 0.7], [0, 0, 0]), [1, 2])
    np.testing.assert_array_equal(run(b, [0.9, 0.8, np.nan], [0, 0, 0],
                                      score_threshold=-1.0), [0])
    # linear: 1 decays to 0.8 (1 - IoU); a decay below score_threshold drops the box
    k, new = run(b, s, [0.0, 0.0, 0.0], method="linear")
    np.testing.assert_array_equal(k, [0, 2, 1])
    np.testing.assert_allclose(new, [0.9, 0.7, 0.8 * (1 - 81 / 119)], rtol=1e-14)
    k, new = run(b, s, [0.0, 0.0, 0.0], method="linear", score_threshold=0.26)
    np.testing.assert_array_equal(k, [0, 2])
    np.testing.assert_array_equal(new, [0.9, 0.7])
    # degenerate and NaN boxes overlap nothing
    b = [[0, 0, 10, 10], [10, 10, 0, 0], [5, 0, 5, 10], [np.nan, 0, 10, 10], [0, 0, 10, 10]]
    np.testing.assert_array_equal(run(b, [0.1, 0.9, 0.8, 0.7, 0.6], [0] * 5, 0.0), [1, 2, 3, 4])
    # empty
    e = run(np.zeros((0, 4)), np.zeros(0), np.zeros(0))
    assert e.shape == (0,) and e.dtype == np.int64
    k, new = run(np.zeros((0, 4)), np.zeros(0), np.zeros(0), method="gaussian")
    assert k.shape == new.shape == (0,) and new.dtype == np.float64


@pytest.mark.parametrize("method", ["hard", "linear"])
def test_adaptive_nms_batches_and_lists(backend, rng, method):
    B = backend
    imgs = [clusters(rng, n) for n in (60, 0, 150, 1)]
    dl = [_confidences(rng, len(s), np.float64, ties=5) for _, s in imgs]
    bl, sl = [i[0] for i in imgs], [i[1] for i in imgs]
    got = B.asnumpy(fastnorm.adaptive_nms(B.asarray(bl), B.asarray(sl), B.asarray(dl), 0.4,
                                          method=method))
    assert len(got) == 4
    for g, b, s, d in zip(got, bl, sl, dl):
        rk, rs = adaptive(b, s, d, 0.4, method)
        if method == "hard":
            np.testing.assert_array_equal(g, rk)
        else:
            np.testing.assert_array_equal(g[0], rk)
            np.testing.assert_allclose(g[1], rs, rtol=1e-12)
    b, s, d = (np.concatenate(x) for x in (bl, sl, dl))
    bi = np.repeat(np.arange(4), [60, 0, 150, 1])
    perm = rng.permutation(len(s))
    got = B.asnumpy(fastnorm.adaptive_nms(*B.asarray((b[perm], s[perm], d[perm])), 0.4,
                                          method=method, batch_idx=B.asarray(bi[perm])))
    want = _per_image(lambda *a: adaptive(*a, 0.4, method), bi[perm], b[perm], s[perm], d[perm])
    if method == "hard":
        np.testing.assert_array_equal(got, want[0])
    else:
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_allclose(got[1], want[1], rtol=1e-12)


def test_iou_guided_nms_lists(backend, rng):
    B = backend
    imgs = [clusters(rng, n, tie_levels=8) for n in (40, 0, 130)]
    bl, sl = [i[0] for i in imgs], [i[1] for i in imgs]
    ll = [_confidences(rng, len(s), np.float64) for s in sl]
    il = [rng.integers(0, 3, len(s)) for s in sl]
    got = B.asnumpy(fastnorm.iou_guided_nms(B.asarray(bl), B.asarray(sl), B.asarray(ll), 0.5,
                                            idxs=B.asarray(il), max_output=9))
    assert len(got) == 3 and got[1][0].shape == (0,)
    for (gk, gs), b, s, loc, i in zip(got, bl, sl, ll, il):
        rk, rs = iou_guided(b, s, loc, 0.5, idxs=i, max_output=9)
        np.testing.assert_array_equal(gk, rk)
        np.testing.assert_array_equal(gs, rs)


def test_new_variants_do_not_modify_inputs(backend, rng):
    b, s = clusters(rng, 300)
    aux = _confidences(rng, 300, np.float64)
    idxs = np.arange(300) % 3
    bi = np.arange(300) % 2
    bd, sd, ad, idd, bid = backend.asarray((b, s, aux, idxs, bi))
    fastnorm.iou_guided_nms(bd, sd, ad, 0.5, idxs=idd, score_threshold=0.2, batch_idx=bid)
    for method in ("hard", "linear", "gaussian"):
        fastnorm.adaptive_nms(bd, sd, ad, 0.3, method=method, batch_idx=bid)
    for x, y in zip(backend.asnumpy((bd, sd, ad, idd, bid)), (b, s, aux, idxs, bi)):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_new_variants_half_types(cuda_backend, rng, dtype):
    B = cuda_backend
    b, s = clusters(rng, 500, side=100.0, tie_levels=30)
    loc = _confidences(rng, 500, np.float64, ties=20)
    (bl, sl, ll), (b64, s64, l64) = rounded(dtype, b, s, loc)
    bd, sd, ld = B.asarray((bl, sl, ll))
    idxs = rng.integers(0, 3, 500)
    k, new = B.asnumpy(fastnorm.iou_guided_nms(bd, sd, ld, 0.5, idxs=B.asarray(idxs)))
    rk, rs = iou_guided(b64, s64, l64, 0.5, idxs=idxs)
    np.testing.assert_array_equal(k, rk)
    assert new.dtype == _dtype(dtype)
    np.testing.assert_array_equal(new.astype(np.float64), rs)
    np.testing.assert_array_equal(B.asnumpy(fastnorm.adaptive_nms(bd, sd, ld, 0.3)),
                                  adaptive(b64, s64, l64, 0.3)[0])
    k, new = B.asnumpy(fastnorm.adaptive_nms(bd, sd, ld, 0.3, method="gaussian",
                                             score_threshold=0.05))
    rk, rs = adaptive(b64, s64, l64, 0.3, "gaussian", 0.5, 0.05)
    np.testing.assert_array_equal(k, rk)
    np.testing.assert_allclose(new.astype(np.float64), rs, rtol=1e-2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_new_variants_large_single_image(rng, dtype):
    # CPU: thousands of boxes in one segment, 1 and 2 threads, with outliers in no grid cell
    b, s = clusters(rng, 12000, dtype, side=500.0, tie_levels=40)
    aux = _confidences(rng, 12000, dtype, ties=30)
    b[5] = [-1000, -1000, 2000, 2000]
    b[6] = [10, 10, 5, 5]
    b[7] = [np.nan, 0, 10, 10]
    aux[8] = np.nan
    rk, rs = iou_guided(b, s, aux, 0.5)
    ra = adaptive(b, s, aux, 0.3)[0]
    for t in (1, 2):
        with fastnorm.threads(t):
            k, new = fastnorm.iou_guided_nms(b, s, aux, 0.5)
            np.testing.assert_array_equal(k, rk)
            np.testing.assert_array_equal(new, rs.astype(dtype))
            np.testing.assert_array_equal(fastnorm.adaptive_nms(b, s, aux, 0.3), ra)


@pytest.mark.parametrize("budget", [64 * 8 * 40, 10 << 20])
def test_cuda_new_variants_in_chunks(cuda_backend, rng, monkeypatch, budget):
    # the per-rank thresholds and the clusters follow the ranks across mask chunks
    from fastnorm._cuda import nms as launcher
    monkeypatch.setattr(launcher, "MASK_BYTES", budget)
    B = cuda_backend
    b, s = clusters(rng, 1500, np.float32, side=200.0, tie_levels=50)
    aux = _confidences(rng, 1500, np.float32, ties=20)
    bi = rng.integers(0, 2, 1500)
    bd, sd, ad, bid = B.asarray((b, s, aux, bi))
    np.testing.assert_array_equal(B.asnumpy(fastnorm.adaptive_nms(bd, sd, ad, 0.3)),
                                  adaptive(b, s, aux, 0.3)[0])
    k, new = B.asnumpy(fastnorm.iou_guided_nms(bd, sd, ad, 0.5, batch_idx=bid, max_output=50))
    want = _per_image(lambda *a: iou_guided(*a, 0.5, max_output=50), bi, b, s, aux)
    np.testing.assert_array_equal(k, want[0])
    np.testing.assert_array_equal(new, want[1].astype(np.float32))


def test_score_threshold_is_decided_in_float64(backend):
    # a float32 score equal to float32(t) is > t in float64 (0.3f = 0.30000001192...): kept on
    # every backend, as the CPU decides
    b = backend.asarray(np.array([[0, 0, 1, 1], [2, 2, 3, 3]], np.float32))
    s = backend.asarray(np.array([0.3, 0.5], np.float32))
    np.testing.assert_array_equal(backend.asnumpy(fastnorm.nms(b, s, 0.5, score_threshold=0.3)),
                                  [1, 0])
    k, _ = backend.asnumpy(fastnorm.iou_guided_nms(b, s, s, 0.5, score_threshold=0.3))
    np.testing.assert_array_equal(k, [1, 0])
    t = float(np.float32(0.3)) + 1e-12               # above 0.3f in float64 only
    np.testing.assert_array_equal(backend.asnumpy(fastnorm.adaptive_nms(b, s, s, 0.5,
                                                                        score_threshold=t)), [1])


def test_cuda_new_variants_host_synchronisations_do_not_grow(rng):
    from fastnorm._cuda import emulator
    counts = []
    for n in (300, 3000):
        b, s = clusters(rng, n, np.float32, side=300.0)
        aux = _confidences(rng, n, np.float32)
        bd, sd, ad = emulator.asarray(b), emulator.asarray(s), emulator.asarray(aux)
        idxs = emulator.asarray(rng.integers(0, 5, n))
        row = []
        for f in (lambda: fastnorm.iou_guided_nms(bd, sd, ad, 0.5, idxs=idxs),
                  lambda: fastnorm.iou_guided_nms(bd, sd, ad, 0.5, score_threshold=0.2),
                  lambda: fastnorm.adaptive_nms(bd, sd, ad, 0.5),
                  lambda: fastnorm.adaptive_nms(bd, sd, ad, 0.5, method="gaussian")):
            with emulator.counting() as c:
                f()
            row.append(c.syncs)
        counts.append(row)
    assert counts[0] == counts[1] and max(counts[0]) <= 4, counts


def test_new_variants_errors(backend):
    A = backend.asarray
    b = A(np.zeros((3, 4), np.float32))
    s = A(np.zeros(3, np.float32))
    for fn, name in ((fastnorm.iou_guided_nms, "localization"),
                     (fastnorm.adaptive_nms, "densities")):
        with pytest.raises(TypeError, match=f"`{name}`"):
            fn(b, s, A(np.zeros(3, np.float64)), 0.5)
        with pytest.raises(ValueError, match=f"`{name}`"):
            fn(b, s, A(np.zeros(4, np.float32)), 0.5)
        with pytest.raises(TypeError, match=f"`{name}`"):
            fn(b, s, None, 0.5)
        with pytest.raises(TypeError, match=f"`{name}`"):
            fn(b, s, [0.0, 0.0, 0.0], 0.5)
        with pytest.raises(ValueError, match=f"`{name}`"):
            fn([b, b], [s, s], [s], 0.5)
        with pytest.raises(ValueError, match=rf"`{name}\[1\]`"):
            fn([b, b], [s, s], [s, s[:2]], 0.5)
        with pytest.raises(ValueError, match="`boxes`"):
            fn(A(np.zeros((3, 5), np.float32)), s, s, 0.5)
        with pytest.raises(TypeError, match="`scores`"):
            fn(b, A(np.zeros(3, np.float64)), s, 0.5)
        for bad in (np.nan, -0.1, np.inf):
            with pytest.raises(ValueError, match="`iou_threshold`"):
                fn(b, s, s, bad)
        with pytest.raises(ValueError, match="`batch_idx`"):
            fn(b, s, s, 0.5, batch_idx=A(np.array([0, -1, 0])))
    with pytest.raises(TypeError, match="`idxs`"):
        fastnorm.iou_guided_nms(b, s, s, 0.5, idxs=A(np.zeros(3, np.float32)))
    with pytest.raises(ValueError, match="`idxs`"):
        fastnorm.iou_guided_nms(b, s, s, 0.5, idxs=A(np.zeros(2, np.int64)))
    with pytest.raises(ValueError, match="`max_output`"):
        fastnorm.iou_guided_nms(b, s, s, 0.5, max_output=-1)
    with pytest.raises(ValueError, match="`score_threshold`"):
        fastnorm.iou_guided_nms(b, s, s, 0.5, score_threshold=np.nan)
    with pytest.raises(ValueError, match="`method`"):
        fastnorm.adaptive_nms(b, s, s, method="soft")
    with pytest.raises(ValueError, match="`sigma`"):
        fastnorm.adaptive_nms(b, s, s, method="gaussian", sigma=0.0)
    with pytest.raises(ValueError, match="`score_threshold`"):
        fastnorm.adaptive_nms(b, s, s, score_threshold=-np.inf)
    with pytest.raises(TypeError, match="`score_threshold`"):
        fastnorm.adaptive_nms(b, s, s, score_threshold=None)
    if backend.is_cuda:
        with pytest.raises(TypeError, match="`localization` is a numpy.ndarray"):
            fastnorm.iou_guided_nms(b, s, np.zeros(3, np.float32), 0.5)


# ---------------------------------------------------------------- rotated boxes

from reference.nms import (DEG, batched_rotated, box_iou_rotated as ref_iou_rotated,  # noqa: E402
                           greedy_nms_rotated, rotated_iou_pair)


def rotated_clusters(rng, n, dtype=np.float64, side=200.0, per=6, tie_levels=None):
    """Rotated boxes (cx, cy, w, h, degrees) in clusters of near-duplicates of similar angle,
    plus a few degenerate ones; scores optionally quantised to force ties."""
    k = max(1, n // per)
    c = rng.uniform(0, side, (k, 2))
    size = rng.uniform(5, 40, (k, 2))
    ang = rng.uniform(-180, 180, k)
    which = rng.integers(0, k, n)
    ctr = c[which] + rng.normal(0, 0.15, (n, 2)) * size[which]
    wh = size[which] * rng.uniform(0.7, 1.3, (n, 2))
    a = ang[which] + rng.normal(0, 12, n)
    b = np.round(np.concatenate([ctr, wh, a[:, None]], 1) * 4) / 4   # exact in float32 too
    if n >= 20:
        b[rng.choice(n, n // 20, replace=False), 2] = 0.0           # degenerate: w = 0
    s = rng.random(n)
    if tie_levels:
        s = np.round(s * tie_levels) / tie_levels
    return b.astype(dtype), s.astype(dtype)


def random_rotated(rng, n, side=20.0):
    return np.concatenate([rng.uniform(0, side, (n, 2)), rng.uniform(0.5, 10, (n, 2)),
                           rng.uniform(-360, 360, (n, 1))], 1)


def xyxy(r):
    """Axis-aligned boxes of rotated boxes whose angles are multiples of 90 degrees."""
    r = np.asarray(r, np.float64)
    swap = (np.round(r[:, 4] / 90).astype(int) % 2).astype(bool)
    w = np.where(swap, r[:, 3], r[:, 2])
    h = np.where(swap, r[:, 2], r[:, 3])
    return np.stack([r[:, 0] - w / 2, r[:, 1] - h / 2, r[:, 0] + w / 2, r[:, 1] + h / 2], 1)


def test_rotated_oracle_matches_shapely(rng):
    shapely = pytest.importorskip("shapely")
    from shapely.geometry import Polygon

    def poly(b):
        c, s = np.cos(b[4] * DEG), np.sin(b[4] * DEG)
        u = np.array([-1, 1, 1, -1]) * b[2] / 2
        v = np.array([-1, -1, 1, 1]) * b[3] / 2
        return Polygon(np.stack([b[0] + u * c + v * s, b[1] - u * s + v * c], 1))

    assert shapely.__version__ >= "2"
    a, b = random_rotated(rng, 400), random_rotated(rng, 400)
    b[:100, :2] = a[:100, :2] + rng.normal(0, 0.5, (100, 2))       # many heavy overlaps
    b[100:150] = a[100:150]                                          # identical
    b[150:200, 4] = a[150:200, 4] + 90                               # crossing
    n_overlap = 0
    for p, q in zip(a, b):
        pa, pb = poly(p), poly(q)
        inter = pa.intersection(pb).area
        want = inter / (pa.area + pb.area - inter)
        n_overlap += want > 0
        assert abs(rotated_iou_pair(p, q, DEG) - want) < 1e-9, (p, q)
    assert n_overlap > 200


@pytest.mark.parametrize("dtype", DTYPES)
def test_box_iou_rotated_matches_oracle(backend, rng, dtype):
    a = random_rotated(rng, 60).astype(dtype)
    b = random_rotated(rng, 45).astype(dtype)
    b[:20, :2] = a[:20, :2]                  # concentric pairs of every relative angle
    b[20:25] = a[20:25]                      # identical
    ad, bd = backend.asarray((a, b))
    got = backend.asnumpy(fastnorm.box_iou_rotated(ad, bd))
    ref = ref_iou_rotated(a.astype(np.float64), b.astype(np.float64))
    assert got.shape == (60, 45) and got.dtype == dtype
    assert (ref > 0).mean() > 0.2
    tol = 1e-6 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(got, ref, rtol=tol, atol=tol)
    np.testing.assert_array_equal(np.diagonal(got[20:25, 20:25]), 1)
    assert backend.asnumpy(fastnorm.box_iou_rotated(ad[:0], bd)).shape == (0, 45)
    assert backend.asnumpy(fastnorm.box_iou_rotated(ad, bd[:0])).shape == (60, 0)


def test_box_iou_rotated_edge_cases(backend):
    B = backend

    def iou(a, b, **kw):
        a = np.asarray(a, np.float64).reshape(-1, 5)
        b = np.asarray(b, np.float64).reshape(-1, 5)
        return B.asnumpy(fastnorm.box_iou_rotated(*B.asarray((a, b)), **kw))

    # identical, at any angle and position (huge coordinates too)
    for ang in (0.0, 30.0, 45.0, 90.0, -137.5, 1000.0):
        for off in (0.0, 1e7):
            b = [off + 3, off - 4, 6.0, 2.0, ang]
            assert abs(iou(b, b)[0, 0] - 1) <= 1e-15
    # nested: a small box inside a large one, any angles
    assert abs(iou([0, 0, 10, 10, 0], [1, 1, 2, 2, 33])[0, 0] - 0.04) < 1e-14
    assert abs(iou([0, 0, 10, 10, 17], [0, 0, 2, 2, 80])[0, 0] - 0.04) < 1e-14
    # touching edges and corners: 0 (exactly when axis-aligned)
    assert iou([0, 0, 2, 2, 0], [[2, 0, 2, 2, 0], [2, 2, 2, 2, 0], [0, -2, 2, 2, 0]]).max() == 0
    c, s = np.cos(30 * DEG), np.sin(30 * DEG)
    side = [2 * c, -2 * s, 2, 2, 30]          # the neighbour along the rotated u axis
    corner = [2 * c + 2 * s, -2 * s + 2 * c, 2, 2, 30]
    assert iou([0, 0, 2, 2, 30], [side, corner]).max() < 1e-12
    assert iou([0, 0, 2, 2, 45], [np.sqrt(2) * 2, 0, 2, 2, 45])[0, 0] < 1e-12   # tips touch
    # shared edge, half overlapping along it; collinear edges
    np.testing.assert_allclose(iou([0, 0, 4, 2, 0], [[2, 0, 4, 2, 0], [0, 1, 4, 4, 0]]),
                               [[1 / 3, 8 / (8 + 16 - 8)]], rtol=1e-14)
    np.testing.assert_allclose(iou([0, 0, 4, 2, 30], [2 * c, -2 * s, 4, 2, 30]), [[1 / 3]],
                               rtol=1e-12)
    # multiples of 90 degrees agree with box_iou on the axis-aligned boxes
    rng = np.random.default_rng(5)
    a = random_rotated(rng, 40, side=10)
    b = random_rotated(rng, 30, side=10)
    a[:, 4] = rng.integers(-4, 5, 40) * 90.0
    b[:, 4] = rng.integers(-4, 5, 30) * 90.0
    want = B.asnumpy(fastnorm.box_iou(*B.asarray((xyxy(a), xyxy(b)))))
    assert (want > 0).mean() > 0.2
    np.testing.assert_allclose(iou(a, b), want, rtol=1e-12, atol=1e-12)
    # degenerate and non-finite boxes have IoU 0 with everything, themselves included
    bad = [[0, 0, 0, 2, 0], [0, 0, 2, 0, 10], [0, 0, -2, 2, 0], [0, 0, 2, -2, 45],
           [0, 0, 1e200, 1e200, 0], [0, 0, 1e300, 1e-300, 45]]
    for k in range(5):
        for v in (np.nan, np.inf, -np.inf):
            b = [0.0, 0.0, 2.0, 2.0, 10.0]
            b[k] = v
            bad.append(b)
    got = iou(bad, bad + [[0, 0, 2, 2, 0], [0, 0, 4, 4, 10]])
    np.testing.assert_array_equal(got, 0)
    # huge coordinates: computed relative to the box centres
    h = iou([1e7 + 0.5, -1e7, 4, 2, 30], [[1e7 + 0.5, -1e7, 4, 2, 0], [1e7 + 1.5, -1e7, 4, 2, 30]])
    np.testing.assert_allclose(h, iou([0, 0, 4, 2, 30], [[0, 0, 4, 2, 0], [1, 0, 4, 2, 30]]),
                               rtol=1e-9)
    assert iou(np.zeros((0, 5)), np.zeros((3, 5))).shape == (0, 3)


def test_rotated_angle_conventions(backend, rng):
    B = backend
    a, b = random_rotated(rng, 20, side=8), random_rotated(rng, 15, side=8)
    ad, bd = B.asarray((a, b))
    ref = B.asnumpy(fastnorm.box_iou_rotated(ad, bd))
    np.testing.assert_allclose(ref, ref_iou_rotated(a, b), rtol=1e-12, atol=1e-12)
    neg = np.array([1, 1, 1, 1, -1.0])
    cw = B.asnumpy(fastnorm.box_iou_rotated(*B.asarray((a * neg, b * neg)), clockwise=True))
    np.testing.assert_allclose(cw, ref, rtol=1e-13, atol=1e-14)
    rad = np.array([1, 1, 1, 1, np.pi / 180])
    got = B.asnumpy(fastnorm.box_iou_rotated(*B.asarray((a * rad, b * rad)),
                                             angle_unit="radians"))
    np.testing.assert_allclose(got, ref, rtol=1e-13, atol=1e-14)
    # a clockwise angle is not a counter-clockwise one (the sign matters)
    assert np.abs(B.asnumpy(fastnorm.box_iou_rotated(ad, bd, clockwise=True)) - ref).max() > 0.1
    # mmcv: clockwise radians; OpenCV RotatedRect: clockwise degrees
    bb, s = rotated_clusters(rng, 300)
    want = greedy_nms_rotated(bb, s, 0.3)
    for kw, f in (({"clockwise": True, "angle_unit": "radians"}, -np.pi / 180),
                  ({"clockwise": True}, -1.0), ({"angle_unit": "radians"}, np.pi / 180)):
        got = fastnorm.nms_rotated(*B.asarray((bb * [1, 1, 1, 1, f], s)), 0.3, **kw)
        np.testing.assert_array_equal(B.asnumpy(got), want)
        got = fastnorm.batched_nms_rotated(*B.asarray((bb * [1, 1, 1, 1, f], s,
                                                       np.zeros(300, np.int64))), 0.3, **kw)
        np.testing.assert_array_equal(B.asnumpy(got), want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [0, 1, 2, 7, 150, 1500])
@pytest.mark.parametrize("thr", [0.0, 0.3, 0.5, 0.75])
def test_nms_rotated_matches_oracle(backend, rng, dtype, n, thr):
    if backend.is_cuda and n == 1500 and thr in (0.3, 0.75):
        n = 600
    b, s = rotated_clusters(rng, n, dtype, tie_levels=20 if n > 100 else None)
    got = backend.asnumpy(fastnorm.nms_rotated(*backend.asarray((b, s)), thr))
    assert got.dtype == np.int64
    want = greedy_nms_rotated(b, s, thr)
    np.testing.assert_array_equal(got, want)
    if n >= 150:
        assert 1 < len(want) < n                # some kept, some suppressed


def test_nms_rotated_large_single_image(rng):
    b, s = rotated_clusters(rng, 5000, side=600.0, tie_levels=50)
    b[::97, 2] = 300.0                          # a few very wide boxes: a coarse grid
    with fastnorm.threads(2):
        got = fastnorm.nms_rotated(b, s, 0.4)
    np.testing.assert_array_equal(got, greedy_nms_rotated(b, s, 0.4))


def test_nms_rotated_angle_zero_equals_nms(backend, rng):
    B = backend
    b, s = clusters(rng, 800, tie_levels=15)
    r = np.concatenate([(b[:, :2] + b[:, 2:]) / 2, b[:, 2:] - b[:, :2], np.zeros((800, 1))], 1)
    r[::50, 2] = -1.0                           # inverted boxes: x2 < x1
    b = np.concatenate([r[:, :2] - r[:, 2:4] / 2, r[:, :2] + r[:, 2:4] / 2], 1)
    idxs = rng.integers(0, 3, 800)
    for thr in (0.0, 0.5):
        np.testing.assert_array_equal(
            B.asnumpy(fastnorm.nms_rotated(*B.asarray((r, s)), thr)),
            B.asnumpy(fastnorm.nms(*B.asarray((b, s)), thr)))
        np.testing.assert_array_equal(
            B.asnumpy(fastnorm.batched_nms_rotated(*B.asarray((r, s, idxs)), thr)),
            B.asnumpy(fastnorm.batched_nms(*B.asarray((b, s, idxs)), thr)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_batched_nms_rotated_matches_per_class(backend, rng, dtype):
    B = backend
    n = 1200 if not B.is_cuda else 500
    b, s = rotated_clusters(rng, n, dtype, side=60.0, tie_levels=10)
    idxs = rng.integers(-3, 5, n)
    bd, sd = B.asarray((b, s))
    np.testing.assert_array_equal(
        B.asnumpy(fastnorm.batched_nms_rotated(bd, sd, B.asarray(idxs), 0.5)),
        batched_rotated(b, s, idxs, 0.5))
    got = fastnorm.batched_nms_rotated(bd, sd, B.asarray(idxs.astype(np.int32)), 0.5,
                                       score_threshold=0.3, max_output=50)
    np.testing.assert_array_equal(B.asnumpy(got), batched_rotated(
        b, s, idxs, 0.5, score_threshold=0.3, max_output=50))
    got = fastnorm.nms_rotated(bd, sd, 0.4, score_threshold=0.25, max_output=40)
    np.testing.assert_array_equal(B.asnumpy(got), greedy_nms_rotated(
        b, s, 0.4, score_threshold=0.25, max_output=40))


def test_nms_rotated_batches_and_lists(backend, rng):
    B = backend
    check_lists_and_batch_idx(
        B, rng, [rotated_clusters(rng, n) for n in (60, 0, 140, 1)],
        lambda b, s, **kw: fastnorm.nms_rotated(b, s, 0.5, max_output=12, **kw),
        lambda b, s: greedy_nms_rotated(b, s, 0.5, max_output=12),
        lambda b, s, i: fastnorm.batched_nms_rotated(b, s, i, 0.5),
        lambda b, s, i: batched_rotated(b, s, i, 0.5))


def test_nms_rotated_nan_and_degenerate(backend):
    B = backend
    box = [5.0, 5.0, 10.0, 4.0, 30.0]
    b = np.array([box, box, [5, 5, 0, 4, 30], [5, 5, 10, -4, 30], [5, 5, np.nan, 4, 30],
                  [5, 5, 10, 4, np.inf], box, box], np.float64)
    s = np.array([0.9, np.nan, 0.95, 0.8, 0.7, 0.6, 0.5, 0.5])
    got = B.asnumpy(fastnorm.nms_rotated(*B.asarray((b, s)), 0.5))
    np.testing.assert_array_equal(got, [2, 0, 3, 4, 5])         # NaN score last, suppressed
    np.testing.assert_array_equal(got, greedy_nms_rotated(b, s, 0.5))
    got = B.asnumpy(fastnorm.nms_rotated(*B.asarray((b, s)), 0.5, score_threshold=0.55))
    np.testing.assert_array_equal(got, [2, 0, 3, 4, 5])
    got = B.asnumpy(fastnorm.nms_rotated(*B.asarray((b[[0, 6, 7]], s[[0, 6, 7]])), 0.5))
    np.testing.assert_array_equal(got, [0])                     # ties: lower index first
    got = B.asnumpy(fastnorm.nms_rotated(*B.asarray((b[[7, 6]], s[[7, 6]])), 0.5))
    np.testing.assert_array_equal(got, [0])
    assert B.asnumpy(fastnorm.nms_rotated(*B.asarray((b[:0], s[:0])), 0.5)).shape == (0,)


def test_rotated_inputs_not_modified(backend, rng):
    b, s = rotated_clusters(rng, 300)
    bd, sd = backend.asarray((b, s))
    b, s = b.copy(), s.copy()                   # (on the CPU bd is b)
    idxs = backend.asarray(np.arange(300) % 3)
    fastnorm.nms_rotated(bd, sd, 0.5, clockwise=True)
    fastnorm.batched_nms_rotated(bd, sd, idxs, 0.5, angle_unit="radians")
    fastnorm.box_iou_rotated(bd, bd[:20])
    np.testing.assert_array_equal(backend.asnumpy(bd), b)
    np.testing.assert_array_equal(backend.asnumpy(sd), s)


def test_cuda_nms_rotated_in_chunks(cuda_backend, rng, monkeypatch):
    from fastnorm._cuda import nms as cuda_nms
    monkeypatch.setattr(cuda_nms, "MASK_BYTES", 64 * 8 * 40)
    B = cuda_backend
    b, s = rotated_clusters(rng, 700, side=80.0)
    idxs = rng.integers(0, 3, 700)
    np.testing.assert_array_equal(B.asnumpy(fastnorm.nms_rotated(*B.asarray((b, s)), 0.5)),
                                  greedy_nms_rotated(b, s, 0.5))
    np.testing.assert_array_equal(
        B.asnumpy(fastnorm.batched_nms_rotated(*B.asarray((b, s, idxs)), 0.5, max_output=30)),
        batched_rotated(b, s, idxs, 0.5, max_output=30))


def test_rotated_errors(backend):
    A = backend.asarray
    b = A(np.zeros((3, 5), np.float32))
    s = A(np.zeros(3, np.float32))
    for fn, extra in ((fastnorm.nms_rotated, ()),
                      (fastnorm.batched_nms_rotated, (A(np.zeros(3, np.int64)),))):
        with pytest.raises(ValueError, match=r"`boxes` must have shape \(N, 5\)"):
            fn(A(np.zeros((3, 4), np.float32)), s, *extra, 0.5)
        with pytest.raises(ValueError, match=r"`boxes\[1\]` must have shape \(N, 5\)"):
            fn([b, A(np.zeros((3, 4), np.float32))], [s, s],
               *([list(extra) * 2] if extra else []), 0.5)
        with pytest.raises(TypeError, match="`boxes`"):
            fn(A(np.zeros((3, 5), np.int64)), s, *extra, 0.5)
        with pytest.raises(ValueError, match="`scores`"):
            fn(b, A(np.zeros(4, np.float32)), *extra, 0.5)
        with pytest.raises(TypeError, match="`scores`"):
            fn(b, A(np.zeros(3, np.float64)), *extra, 0.5)
        with pytest.raises(ValueError, match="`angle_unit`"):
            fn(b, s, *extra, 0.5, angle_unit="grad")
        with pytest.raises(TypeError, match="`clockwise`"):
            fn(b, s, *extra, 0.5, clockwise="yes")
        with pytest.raises(ValueError, match="`iou_threshold`"):
            fn(b, s, *extra, np.nan)
        with pytest.raises(ValueError, match="`max_output`"):
            fn(b, s, *extra, 0.5, max_output=-2)
        with pytest.raises(ValueError, match="`batch_idx`"):
            fn(b, s, *extra, 0.5, batch_idx=A(np.array([0, -1, 0])))
    with pytest.raises(ValueError, match="`idxs`"):
        fastnorm.batched_nms_rotated(b, s, A(np.zeros(2, np.int64)), 0.5)
    with pytest.raises(TypeError, match="`idxs`"):
        fastnorm.batched_nms_rotated(b, s, None, 0.5)
    with pytest.raises(ValueError, match=r"`a` must have shape \(N, 5\)"):
        fastnorm.box_iou_rotated(A(np.zeros((3, 4), np.float32)), b)
    with pytest.raises(ValueError, match=r"`b` must have shape \(N, 5\)"):
        fastnorm.box_iou_rotated(b, A(np.zeros(5, np.float32)))
    with pytest.raises(TypeError, match="`b`"):
        fastnorm.box_iou_rotated(b, A(np.zeros((3, 5), np.float64)))
    with pytest.raises(TypeError, match="`a`"):
        fastnorm.box_iou_rotated(A(np.zeros((3, 5), np.int32)), b)
    with pytest.raises(ValueError, match="`angle_unit`"):
        fastnorm.box_iou_rotated(b, b, angle_unit="turns")
    if backend.is_cuda:
        with pytest.raises(TypeError, match="`scores` is a numpy.ndarray"):
            fastnorm.nms_rotated(b, np.zeros(3, np.float32), 0.5)
