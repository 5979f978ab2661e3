import numpy as np
import pytest

import fastnorm
from reference.nms import (batched, box_metric, greedy_nms, matrix, merge_by_score, soft,
                           weighted)

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


# ---------------------------------------------------------------- greedy nms

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [0, 1, 2, 7, 150, 3000])
@pytest.mark.parametrize("thr", [0.0, 0.3, 0.5, 0.75])
def test_nms_matches_oracle(rng, dtype, n, thr):
    b, s = clusters(rng, n, dtype, tie_levels=20 if n > 100 else None)
    got = fastnorm.nms(b, s, thr)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, greedy_nms(b, s, thr))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cell", [0.05, 1.0, 8.0])
def test_nms_large_single_segment_grid(rng, dtype, cell, monkeypatch):
    # the spatial grid at several cell sizes (tiny cells hit the cell-count cap), with outliers
    # that widen the window (one huge box), boxes in no cell (degenerate, NaN, infinite area),
    # far-away boxes and ties; 1 and 2 threads, with and without max_output
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


def test_nms_window_is_exact_at_touching_edges():
    # boxes whose overlap is a hair's width (and exactly zero) at large coordinates: the grid
    # window must not drop a pair that the IoU formula would suppress
    x = 1e7
    b = np.array([[x, 0, x + 1, 1], [x + 1 - 2 ** -29, 0, x + 2, 1], [x + 1, 0, x + 2, 1],
                  [x - 1 + 2 ** -29, 0, x + 2 ** -29, 1]], np.float64)
    for thr in (0.0, 1e-12):
        s = np.array([0.9, 0.8, 0.7, 0.6])
        np.testing.assert_array_equal(fastnorm.nms(b, s, thr), greedy_nms(b, s, thr))


def test_nms_100k(rng):
    b, s = clusters(rng, 100_000, np.float32, side=1200.0)
    np.testing.assert_array_equal(fastnorm.nms(b, s, 0.5), greedy_nms(b, s, 0.5))


def test_nms_edge_cases():
    b = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]], np.float32)
    s = np.array([0.5, 0.5, 0.5], np.float32)
    np.testing.assert_array_equal(fastnorm.nms(b, s, 0.5), [0])              # ties: lowest index
    np.testing.assert_array_equal(fastnorm.nms(b, s, 1.0), [0, 1, 2])        # IoU 1 is not > 1
    # degenerate (inverted, zero-width) and NaN boxes overlap nothing
    b = np.array([[0, 0, 10, 10], [10, 10, 0, 0], [5, 0, 5, 10], [np.nan, 0, 10, 10],
                  [0, 0, 10, 10]], np.float64)
    s = np.array([0.1, 0.9, 0.8, 0.7, 0.05])
    np.testing.assert_array_equal(fastnorm.nms(b, s, 0.0), [1, 2, 3, 0])
    # NaN scores rank below all numbers, -inf included
    b = np.array([[0, 0, 1, 1], [5, 5, 6, 6], [0, 0, 1, 1]], np.float32)
    s = np.array([np.nan, -np.inf, 0.0], np.float32)
    np.testing.assert_array_equal(fastnorm.nms(b, s, 0.5), [2, 1])
    # score_threshold keeps score > t (NaN dropped), max_output caps
    s = np.array([0.5, 0.2, 0.3], np.float32)
    np.testing.assert_array_equal(fastnorm.nms(b, s, 0.9, score_threshold=0.3), [0])
    np.testing.assert_array_equal(fastnorm.nms(b, s, 0.9, max_output=1), [0])
    np.testing.assert_array_equal(fastnorm.nms(b, s, 0.9, max_output=0), np.empty(0, int))
    # inf coordinates do not crash
    b = np.array([[0, 0, np.inf, 1], [0, 0, np.inf, 1], [-np.inf, -np.inf, np.inf, np.inf]],
                 np.float64)
    r = fastnorm.nms(b, np.array([0.3, 0.2, 0.1]), 0.5)
    np.testing.assert_array_equal(r, greedy_nms(b, np.array([0.3, 0.2, 0.1]), 0.5))
    # empty input
    e = fastnorm.nms(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), 0.5)
    assert e.shape == (0,) and e.dtype == np.int64


def test_nms_inputs_not_modified(rng):
    b, s = clusters(rng, 300)
    b0, s0 = b.copy(), s.copy()
    fastnorm.nms(b, s, 0.5)
    fastnorm.batched_nms(b, s, np.arange(300) % 3, 0.5)
    fastnorm.weighted_nms(b, s, 0.5)
    np.testing.assert_array_equal(b, b0)
    np.testing.assert_array_equal(s, s0)


def test_nms_score_threshold_and_max_output_vs_oracle(rng):
    b, s = clusters(rng, 500)
    got = fastnorm.nms(b, s, 0.4, score_threshold=0.25, max_output=40)
    np.testing.assert_array_equal(got, greedy_nms(b, s, 0.4, score_threshold=0.25,
                                                  max_output=40))


@pytest.mark.parametrize("dtype", DTYPES)
def test_batched_nms_matches_per_class(rng, dtype):
    b, s = clusters(rng, 2000, dtype, side=60.0, tie_levels=10)
    idxs = rng.integers(-3, 5, 2000)
    np.testing.assert_array_equal(fastnorm.batched_nms(b, s, idxs, 0.5), batched(b, s, idxs, 0.5))
    got = fastnorm.batched_nms(b, s, idxs.astype(np.int32), 0.5, score_threshold=0.3,
                               max_output=50)
    np.testing.assert_array_equal(got, batched(b, s, idxs, 0.5, score_threshold=0.3,
                                               max_output=50))


def test_batched_nms_exact_with_huge_coordinates():
    # the coordinate-offset trick would shift class 1 by ~1e8 and lose the float32 precision
    b = np.array([[1e7, 1e7, 1e7 + 4, 1e7 + 4], [1e7 + 2, 1e7, 1e7 + 6, 1e7 + 4],
                  [1e7, 1e7, 1e7 + 4, 1e7 + 4]], np.float32)
    s = np.array([0.9, 0.8, 0.7], np.float32)
    idxs = np.array([0, 0, 1])
    np.testing.assert_array_equal(fastnorm.batched_nms(b, s, idxs, 0.3), [0, 2])
    np.testing.assert_array_equal(fastnorm.batched_nms(b, s, idxs, 0.4), [0, 1, 2])


def test_batch_idx_and_lists(rng):
    imgs = [clusters(rng, n) for n in (50, 0, 120, 1)]
    bl, sl = [i[0] for i in imgs], [i[1] for i in imgs]
    per = [greedy_nms(b, s, 0.5, max_output=10) for b, s in zip(bl, sl)]
    got = fastnorm.nms(bl, sl, 0.5, max_output=10)
    assert len(got) == 4
    for g, r in zip(got, per):
        np.testing.assert_array_equal(g, r)
    # the same through batch_idx (images need not be contiguous)
    b, s = np.concatenate(bl), np.concatenate(sl)
    bi = np.repeat(np.arange(4), [50, 0, 120, 1])
    perm = rng.permutation(len(s))
    inv = np.argsort(perm)
    got = fastnorm.nms(b[perm], s[perm], 0.5, max_output=10, batch_idx=bi[perm])
    offs = np.concatenate([[0], np.cumsum([50, 0, 120, 1])])
    want = np.concatenate([inv[r + offs[i]] for i, r in enumerate(per)])
    np.testing.assert_array_equal(got, want)
    # batched_nms with lists of idxs
    il = [rng.integers(0, 3, len(x)) for x in sl]
    got = fastnorm.batched_nms(bl, sl, il, 0.5)
    for g, b_, s_, i_ in zip(got, bl, sl, il):
        np.testing.assert_array_equal(g, batched(b_, s_, i_, 0.5) if len(s_) else [])
    # soft/weighted/matrix accept lists too
    ks = fastnorm.soft_nms(bl, sl)
    assert len(ks) == 4 and len(ks[1][0]) == 0
    np.testing.assert_array_equal(ks[2][0], soft(bl[2], sl[2], "gaussian", 0.5, 0.3, 0.001)[0])
    kw = fastnorm.weighted_nms(bl, sl, 0.5)
    np.testing.assert_array_equal(kw[0][0], weighted(bl[0], sl[0], 0.5)[0])
    km = fastnorm.matrix_nms(bl, sl)
    np.testing.assert_allclose(km[2], matrix(bl[2], sl[2], "gaussian", 2.0), rtol=1e-12)


def test_threads_deterministic(rng):
    b, s = clusters(rng, 6000, np.float32, side=300.0)
    idxs = rng.integers(0, 8, 6000)
    out = []
    for t in (1, 2):
        with fastnorm.threads(t):
            out.append((fastnorm.nms(b, s, 0.5), fastnorm.batched_nms(b, s, idxs, 0.5),
                        fastnorm.matrix_nms(b[:500], s[:500]),
                        fastnorm.box_iou(b[:300], b[:200], metric="ciou")))
    for x, y in zip(*out):
        assert x.tobytes() == y.tobytes()


# ---------------------------------------------------------------- variants

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("beta", [1.0, 0.6, 2.0])
def test_diou_nms(rng, dtype, beta):
    b, s = clusters(rng, 800, dtype)
    for thr in (0.0, 0.3, 0.5):
        np.testing.assert_array_equal(fastnorm.diou_nms(b, s, thr, beta=beta),
                                      greedy_nms(b, s, thr, crit=1, beta=beta))


@pytest.mark.parametrize("dtype", DTYPES)
def test_weighted_nms(rng, dtype):
    b, s = clusters(rng, 400, dtype)
    keep, fused = fastnorm.weighted_nms(b, s, 0.5)
    rk, rf = weighted(b, s, 0.5)
    np.testing.assert_array_equal(keep, rk)
    assert fused.dtype == dtype
    np.testing.assert_allclose(fused, rf, rtol=1e-6 if dtype == np.float32 else 1e-12)
    assert not np.array_equal(fused, b[keep])      # something was actually fused


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method,sigma,thr", [("gaussian", 0.5, 0.3), ("linear", 0.5, 0.3),
                                              ("linear", 0.5, 0.0), ("gaussian", 0.1, 0.3)])
def test_soft_nms(rng, dtype, method, sigma, thr):
    b, s = clusters(rng, 300, dtype)
    keep, sc = fastnorm.soft_nms(b, s, method=method, sigma=sigma, iou_threshold=thr,
                                 score_threshold=0.05)
    rk, rs = soft(b, s, method, sigma, thr, 0.05)
    np.testing.assert_array_equal(keep, rk)
    assert sc.dtype == dtype
    np.testing.assert_allclose(sc, rs, rtol=1e-6 if dtype == np.float32 else 1e-12)
    assert (sc < s[keep]).any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel,sigma", [("gaussian", 2.0), ("gaussian", 0.5), ("linear", 2.0)])
def test_matrix_nms(rng, dtype, kernel, sigma):
    b, s = clusters(rng, 150, dtype, tie_levels=10)
    got = fastnorm.matrix_nms(b, s, kernel=kernel, sigma=sigma)
    assert got.dtype == dtype and got.shape == s.shape
    np.testing.assert_allclose(got, matrix(b, s, kernel, sigma),
                               rtol=1e-6 if dtype == np.float32 else 1e-12, atol=1e-30)
    bi = (np.arange(150) % 2).astype(np.int64)
    got = fastnorm.matrix_nms(b, s, kernel=kernel, sigma=sigma, batch_idx=bi)
    for i in (0, 1):
        np.testing.assert_allclose(got[bi == i], matrix(b[bi == i], s[bi == i], kernel, sigma),
                                   rtol=1e-6 if dtype == np.float32 else 1e-12, atol=1e-30)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("metric", ["iou", "giou", "diou", "ciou"])
def test_box_iou(rng, dtype, metric):
    a, _ = clusters(rng, 40, dtype, side=30)
    b, _ = clusters(rng, 33, dtype, side=30)
    a[0] = [5, 5, 5, 5]                 # degenerate point box
    a[1] = [3, 3, 1, 1]                 # inverted
    b[0] = [5, 5, 5, 5]
    got = fastnorm.box_iou(a, b, metric=metric)
    ref = box_metric(a.astype(np.float64), b.astype(np.float64), ["iou", "giou", "diou",
                                                                   "ciou"].index(metric))
    assert got.shape == (40, 33) and got.dtype == dtype and np.isfinite(got).all()
    np.testing.assert_allclose(got, ref, rtol=1e-6 if dtype == np.float32 else 1e-12,
                               atol=1e-6 if dtype == np.float32 else 1e-14)
    assert got[0, 0] == ref[0, 0]
    assert fastnorm.box_iou(a[:0], b, metric=metric).shape == (0, 33)


def test_box_iou_nan():
    a = np.array([[0, 0, np.nan, 1]], np.float32)
    assert np.isnan(fastnorm.box_iou(a, a)).all()


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


def test_errors():
    b = np.zeros((3, 4), np.float32)
    s = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="`boxes`"):
        fastnorm.nms(np.zeros((3, 5), np.float32), s, 0.5)
    with pytest.raises(ValueError, match="`boxes`"):
        fastnorm.nms(np.zeros(12, np.float32), s, 0.5)
    with pytest.raises(TypeError, match="`boxes`"):
        fastnorm.nms(np.zeros((3, 4), np.int64), s, 0.5)
    with pytest.raises(ValueError, match="`scores`"):
        fastnorm.nms(b, np.zeros(4, np.float32), 0.5)
    with pytest.raises(TypeError, match="`scores`"):
        fastnorm.nms(b, np.zeros(3, np.float64), 0.5)
    for bad in (np.nan, -0.1, np.inf):
        with pytest.raises(ValueError, match="`iou_threshold`"):
            fastnorm.nms(b, s, bad)
    with pytest.raises(ValueError, match="`idxs`"):
        fastnorm.batched_nms(b, s, np.zeros(2, np.int64), 0.5)
    with pytest.raises(TypeError, match="`idxs`"):
        fastnorm.batched_nms(b, s, np.zeros(3, np.float32), 0.5)
    with pytest.raises(ValueError, match="`batch_idx`"):
        fastnorm.nms(b, s, 0.5, batch_idx=np.array([0, -1, 0]))
    with pytest.raises(ValueError, match="`batch_idx`"):
        fastnorm.nms(b, s, 0.5, batch_idx=np.array([0, 1]))
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
        fastnorm.box_iou(b, b.astype(np.float64))
    with pytest.raises(ValueError, match="`scores`"):
        fastnorm.nms([b, b], [s], 0.5)
    with pytest.raises(ValueError, match=r"`scores\[1\]`"):
        fastnorm.nms([b, b], [s, s[:2]], 0.5)
    with pytest.raises(TypeError, match=r"`boxes\[0\]`"):
        fastnorm.nms([[0, 0, 1, 1]], [0.5], 0.5)


# ---------------------------------------------------------------- CUDA parity

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_cuda_parity(rng, dtype):
    import cupy
    b, s = clusters(rng, 5000, np.dtype(dtype), side=400.0)
    idxs = rng.integers(0, 10, 5000)
    gb, gs, gi = cupy.asarray(b), cupy.asarray(s), cupy.asarray(idxs)
    for kw in ({}, {"score_threshold": 0.3}, {"max_output": 100}):
        np.testing.assert_array_equal(fastnorm.nms(gb, gs, 0.5, **kw).get(),
                                      fastnorm.nms(b, s, 0.5, **kw))
        np.testing.assert_array_equal(fastnorm.batched_nms(gb, gs, gi, 0.5, **kw).get(),
                                      fastnorm.batched_nms(b, s, idxs, 0.5, **kw))
    np.testing.assert_array_equal(fastnorm.diou_nms(gb, gs, 0.4).get(), fastnorm.diou_nms(b, s, 0.4))
    np.testing.assert_array_equal(fastnorm.nms(gb, gs, 0.5, batch_idx=gi).get(),
                                  fastnorm.nms(b, s, 0.5, batch_idx=idxs))
    for metric in ("iou", "giou", "diou", "ciou"):
        np.testing.assert_allclose(fastnorm.box_iou(gb[:300], gb[:200], metric=metric).get(),
                                   fastnorm.box_iou(b[:300], b[:200], metric=metric),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
def test_cuda_half_and_variants(rng):
    import cupy
    b, s = clusters(rng, 600, np.float32)
    gb, gs = cupy.asarray(b), cupy.asarray(s)
    k = fastnorm.nms(gb.astype(cupy.float16), gs.astype(cupy.float16), 0.5)
    assert k.dtype == cupy.int64 and len(k) > 0
    kh, fh = fastnorm.weighted_nms(gb.astype(cupy.float16), gs.astype(cupy.float16), 0.5)
    assert fh.dtype == cupy.float16 and fh.shape == (len(kh), 4)
    kh, sh = fastnorm.soft_nms(gb.astype(cupy.float16), gs.astype(cupy.float16))
    assert sh.dtype == cupy.float16 and len(kh) == len(sh) > 0
    np.testing.assert_allclose(fastnorm.matrix_nms(gb[:200], gs[:200]).get(),
                               fastnorm.matrix_nms(b[:200], s[:200]), rtol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_cuda_weighted_and_soft_parity(rng, dtype):
    import cupy
    b, s = clusters(rng, 3000, np.dtype(dtype), side=300.0)
    bi = rng.integers(0, 3, 3000)
    idxs = rng.integers(0, 4, 3000)
    gb, gs, gbi = cupy.asarray(b), cupy.asarray(s), cupy.asarray(bi)
    tol = 1e-6 if dtype == "float32" else 1e-12
    for kw in ({}, {"max_output": 50}, {"score_threshold": 0.4}, {"batch_idx": None}):
        kw = {"batch_idx": bi} if "batch_idx" in kw else kw
        gkw = {k: (gbi if k == "batch_idx" else x) for k, x in kw.items()}
        kc, fc = fastnorm.weighted_nms(b, s, 0.5, **kw)
        kg, fg = fastnorm.weighted_nms(gb, gs, 0.5, **gkw)
        np.testing.assert_array_equal(kg.get(), kc)
        np.testing.assert_allclose(fg.get(), fc, rtol=tol)
    for method, thr in (("gaussian", 0.3), ("linear", 0.3)):
        kc, sc = fastnorm.soft_nms(b[:800], s[:800], method=method, iou_threshold=thr,
                                   score_threshold=0.05, batch_idx=bi[:800])
        kg, sg = fastnorm.soft_nms(gb[:800], gs[:800], method=method, iou_threshold=thr,
                                   score_threshold=0.05, batch_idx=gbi[:800])
        np.testing.assert_array_equal(kg.get(), kc)
        np.testing.assert_allclose(sg.get(), sc, rtol=1e-9)
    # list input on the device, like the CPU
    kl = fastnorm.soft_nms([gb[:100], gb[100:250]], [gs[:100], gs[100:250]])
    kc = fastnorm.soft_nms([b[:100], b[100:250]], [s[:100], s[100:250]])
    for (g1, g2), (c1, c2) in zip(kl, kc):
        np.testing.assert_array_equal(g1.get(), c1)
        np.testing.assert_allclose(g2.get(), c2, rtol=1e-9)
