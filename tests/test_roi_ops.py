"""RoIAlign (avg/max), RoIPool, PS-RoIAlign and deformable RoI pooling vs float64 oracles."""
import numpy as np
import pytest

import fastnorm
from reference.roi_ops import (deform_roi_pool as ref_deform, ps_roi_align as ref_ps,
                               random_rois, roi_align as ref_align, roi_pool as ref_pool)

TOL = {np.float32: dict(rtol=2e-5, atol=2e-5), np.float64: dict(rtol=1e-11, atol=1e-11)}


def _case(rng, dtype, N=2, C=5, H=11, W=14, K=25, scale=0.5):
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    rois = random_rois(rng, K, N, H, W, scale).astype(dtype)
    return x, rois


def _fd(f, a, eps=1e-6):
    """Central finite differences of the scalar f() with respect to every element of a."""
    g = np.zeros_like(a)
    flat, gf = a.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        fp = f()
        flat[i] = old - eps
        fm = f()
        flat[i] = old
        gf[i] = (fp - fm) / (2 * eps)
    return g


# ---------------------------------------------------------------- forward vs oracle

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sr", [-1, 0, 1, 2, 3])
@pytest.mark.parametrize("mode", ["avg", "max"])
def test_roi_align_matches_oracle(rng, dtype, aligned, sr, mode):
    x, rois = _case(rng, dtype, scale=rng.choice([1.0, 0.5, 0.25]))
    scale = float(rng.choice([1.0, 0.5, 0.25]))
    PH, PW = int(rng.integers(1, 5)), int(rng.integers(1, 5))
    ref = ref_align(x.astype(np.float64), rois.astype(np.float64), PH, PW, scale, sr, aligned,
                    mode == "max")
    y = fastnorm.roi_align(x, rois, (PH, PW), scale, sr, aligned, mode=mode)
    assert y.dtype == dtype and y.shape == ref.shape
    np.testing.assert_allclose(y, ref, **TOL[dtype])
    xl = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    yl = fastnorm.roi_align(xl, rois, (PH, PW), scale, sr, aligned, mode=mode,
                            channels_last=True)
    np.testing.assert_allclose(yl.transpose(0, 3, 1, 2), ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_roi_pool_matches_oracle(rng, dtype):
    for _ in range(3):
        x, rois = _case(rng, dtype)
        scale = float(rng.choice([1.0, 0.5, 0.3]))
        PH, PW = int(rng.integers(1, 5)), int(rng.integers(1, 5))
        ref = ref_pool(x.astype(np.float64), rois.astype(np.float64), PH, PW, scale)
        np.testing.assert_allclose(fastnorm.roi_pool(x, rois, (PH, PW), scale), ref,
                                   **TOL[dtype])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("sr", [-1, 2])
def test_ps_roi_align_matches_oracle(rng, dtype, sr):
    PH, PW = 2, 3
    x = rng.standard_normal((2, 2 * PH * PW, 9, 12)).astype(dtype)
    rois = random_rois(rng, 20, 2, 9, 12, 0.5).astype(dtype)
    ref = ref_ps(x.astype(np.float64), rois.astype(np.float64), PH, PW, 0.5, sr)
    y = fastnorm.ps_roi_align(x, rois, (PH, PW), 0.5, sr)
    assert y.shape == (20, 2, PH, PW)
    np.testing.assert_allclose(y, ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("with_offset", [False, True])
@pytest.mark.parametrize("with_mask", [False, True])
def test_deform_roi_pool_matches_oracle(rng, dtype, with_offset, with_mask):
    x, rois = _case(rng, dtype)
    K, PH, PW = rois.shape[0], 3, 2
    off = rng.normal(0, 0.5, (K, 2, PH, PW)).astype(dtype) if with_offset else None
    mask = rng.uniform(0, 1, (K, 1, PH, PW)).astype(dtype) if with_mask else None
    sr = int(rng.choice([0, 2]))
    y = fastnorm.deform_roi_pool(x, rois, off, (PH, PW), 0.5, sr, 0.1, mask=mask)
    ref = ref_deform(x.astype(np.float64), rois.astype(np.float64),
                     np.zeros((K, 2, PH, PW)) if off is None else off.astype(np.float64),
                     np.ones((K, 1, PH, PW)) if mask is None else mask.astype(np.float64),
                     PH, PW, 0.5, sr, 0.1)
    np.testing.assert_allclose(y, ref, **TOL[dtype])


def test_deform_roi_pool_without_offset_is_aligned_roi_align(rng):
    x, rois = _case(rng, np.float64)
    a = fastnorm.deform_roi_pool(x, rois, None, 3, 0.5, 2)
    b = fastnorm.roi_align(x, rois, 3, 0.5, 2, aligned=True)
    np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-13)


# ---------------------------------------------------------------- backward

def _fd_check(fwd, bwd_x, x, g, tol=1e-6):
    gx = bwd_x()
    num = _fd(lambda: float((fwd() * g).sum()), x)
    np.testing.assert_allclose(gx, num, rtol=tol, atol=tol)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sr", [-1, 2])
@pytest.mark.parametrize("mode", ["avg", "max"])
def test_roi_align_backward_finite_differences(rng, aligned, sr, mode):
    x, rois = _case(rng, np.float64, N=2, C=2, H=6, W=7, K=6, scale=1.0)
    g = rng.standard_normal((6, 2, 2, 3))
    args = ((2, 3), 1.0, sr, aligned)
    _fd_check(lambda: fastnorm.roi_align(x, rois, *args, mode=mode),
              lambda: fastnorm.roi_align_backward(g, rois, x.shape, *args, mode=mode, x=x), x, g)
    # channels-last backward gives the same gradient
    gl = fastnorm.roi_align_backward(np.ascontiguousarray(g.transpose(0, 2, 3, 1)), rois,
                                     (2, 6, 7, 2), *args, mode=mode,
                                     x=np.ascontiguousarray(x.transpose(0, 2, 3, 1)),
                                     channels_last=True)
    np.testing.assert_allclose(gl.transpose(0, 3, 1, 2),
                               fastnorm.roi_align_backward(g, rois, x.shape, *args, mode=mode,
                                                           x=x), rtol=1e-12, atol=1e-12)


def test_roi_pool_backward_finite_differences(rng):
    x, rois = _case(rng, np.float64, N=2, C=2, H=6, W=7, K=6, scale=1.0)
    g = rng.standard_normal((6, 2, 2, 2))
    _fd_check(lambda: fastnorm.roi_pool(x, rois, 2), lambda: fastnorm.roi_pool_backward(
        g, rois, x.shape, 2, x=x), x, g)


def test_ps_roi_align_backward_finite_differences(rng):
    x = rng.standard_normal((2, 8, 6, 7))
    rois = random_rois(rng, 6, 2, 6, 7)
    g = rng.standard_normal((6, 2, 2, 2))
    _fd_check(lambda: fastnorm.ps_roi_align(x, rois, 2, 1.0, 2),
              lambda: fastnorm.ps_roi_align_backward(g, rois, x.shape, 2, 1.0, 2), x, g)


@pytest.mark.parametrize("with_mask", [False, True])
def test_deform_roi_pool_backward_finite_differences(rng, with_mask):
    x, rois = _case(rng, np.float64, N=2, C=3, H=7, W=8, K=5, scale=1.0)
    PH, PW = 2, 3
    off = rng.normal(0, 0.3, (5, 2, PH, PW))
    mask = rng.uniform(0.2, 1, (5, 1, PH, PW)) if with_mask else None
    g = rng.standard_normal((5, 3, PH, PW))

    def f():
        return float((fastnorm.deform_roi_pool(x, rois, off, (PH, PW), 1.0, 2, 0.1,
                                               mask=mask) * g).sum())

    gx, goff, gm = fastnorm.deform_roi_pool_backward(g, x, rois, off, (PH, PW), 1.0, 2, 0.1,
                                                     mask=mask)
    np.testing.assert_allclose(gx, _fd(f, x), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(goff, _fd(f, off), rtol=1e-5, atol=1e-5)
    if with_mask:
        np.testing.assert_allclose(gm, _fd(f, mask), rtol=1e-6, atol=1e-6)
    else:
        assert gm is None
    _, goff0, _ = fastnorm.deform_roi_pool_backward(g, x, rois, None, (PH, PW), 1.0, 2, 0.1,
                                                    mask=mask)
    assert goff0 is None


def test_backward_is_adjoint_at_scale(rng):
    """<g, A x> == <A^T g, x> on a larger random case (float64)."""
    x, rois = _case(rng, np.float64, N=3, C=7, H=23, W=31, K=60, scale=0.25)
    g = rng.standard_normal((60, 7, 7, 7))
    for sr, al in ((-1, False), (2, True), (0, True)):
        y = fastnorm.roi_align(x, rois, 7, 0.25, sr, al)
        gx = fastnorm.roi_align_backward(g, rois, x.shape, 7, 0.25, sr, al)
        assert abs((g * y).sum() - (gx * x).sum()) < 1e-9 * max(1, abs((g * y).sum()))


@pytest.mark.parametrize("fn", ["align", "align_max", "align_cl", "pool", "ps", "deform"])
def test_backward_deterministic_across_threads(rng, fn):
    x, rois = _case(rng, np.float32, N=2, C=16, H=20, W=24, K=80, scale=0.5)
    off = rng.normal(0, 0.3, (80, 2, 2, 2)).astype(np.float32)
    mask = rng.uniform(0, 1, (80, 1, 2, 2)).astype(np.float32)
    g = rng.standard_normal((80, 16, 2, 2)).astype(np.float32)
    xl = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    calls = {
        "align": lambda: fastnorm.roi_align_backward(g, rois, x.shape, 2, 0.5, 2, True),
        "align_max": lambda: fastnorm.roi_align_backward(g, rois, x.shape, 2, 0.5, -1, mode="max",
                                                         x=x),
        "align_cl": lambda: fastnorm.roi_align_backward(
            np.ascontiguousarray(g.transpose(0, 2, 3, 1)), rois, xl.shape, 2, 0.5, 2,
            channels_last=True),
        "pool": lambda: fastnorm.roi_pool_backward(g, rois, x.shape, 2, 0.5, x=x),
        "ps": lambda: fastnorm.ps_roi_align_backward(g[:, :4], rois, x.shape, 2, 0.5),
        "deform": lambda: fastnorm.deform_roi_pool_backward(g, x, rois, off, 2, 0.5, mask=mask),
    }
    with fastnorm.threads(1):
        a = calls[fn]()
    with fastnorm.threads(2):
        b = calls[fn]()
    for u, w in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
        assert np.array_equal(u, w)
    with fastnorm.threads(2):
        y1 = fastnorm.roi_align(x, rois, 2, 0.5, 2)
    with fastnorm.threads(1):
        y2 = fastnorm.roi_align(x, rois, 2, 0.5, 2)
    assert np.array_equal(y1, y2)


# ---------------------------------------------------------------- edge cases

def test_list_rois_equal_array_rois(rng):
    x = rng.standard_normal((3, 4, 9, 9))
    per = [random_rois(rng, k, 1, 9, 9)[:, 1:] for k in (3, 0, 4)]
    rois = np.concatenate([np.concatenate([np.full((len(r), 1), i), r], 1)
                           for i, r in enumerate(per)])
    for f in (lambda r: fastnorm.roi_align(x, r, 2, 1.0, 2),
              lambda r: fastnorm.roi_pool(x, r, 2),
              lambda r: fastnorm.deform_roi_pool(x, r, None, 2)):
        assert np.array_equal(f(per), f(rois))
    g = rng.standard_normal((7, 4, 2, 2))
    assert np.array_equal(fastnorm.roi_align_backward(g, per, x.shape, 2, 1.0, 2),
                          fastnorm.roi_align_backward(g, rois, x.shape, 2, 1.0, 2))


def test_empty_rois(rng):
    x = rng.standard_normal((2, 3, 5, 5)).astype(np.float32)
    r = np.zeros((0, 5), np.float32)
    assert fastnorm.roi_align(x, r, (2, 3)).shape == (0, 3, 2, 3)
    assert fastnorm.roi_align(x, [], 2).shape == (0, 3, 2, 2)
    assert fastnorm.roi_pool(x, r, 2).shape == (0, 3, 2, 2)
    assert fastnorm.ps_roi_align(np.zeros((2, 4, 5, 5), np.float32), r, 2).shape == (0, 1, 2, 2)
    assert fastnorm.deform_roi_pool(x, r, None, 2).shape == (0, 3, 2, 2)
    g = np.zeros((0, 3, 2, 2), np.float32)
    assert not fastnorm.roi_align_backward(g, r, x.shape, 2).any()
    gx, goff, gm = fastnorm.deform_roi_pool_backward(g, x, r, np.zeros((0, 2, 2, 2), np.float32),
                                                     2)
    assert gx.shape == x.shape and goff.shape == (0, 2, 2, 2)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_rois_give_zeros(rng, bad):
    x = rng.standard_normal((1, 2, 6, 6))
    rois = np.array([[0, 1, 1, 4, 4], [0, 1, bad, 4, 4], [0, 0, 0, bad, 5]], np.float64)
    g = np.ones((3, 2, 2, 2))
    for mode in ("avg", "max"):
        y = fastnorm.roi_align(x, rois, 2, 1.0, -1, mode=mode)
        assert np.isfinite(y).all() and not y[1:].any() and y[0].any()
        gx = fastnorm.roi_align_backward(g[1:], rois[1:], x.shape, 2, mode=mode, x=x)
        assert not gx.any()
    y = fastnorm.roi_pool(x, rois, 2)
    assert not y[1:].any() and np.isfinite(y).all()
    assert not fastnorm.roi_pool_backward(g[1:], rois[1:], x.shape, 2, x=x).any()
    assert not fastnorm.ps_roi_align(np.ones((1, 8, 6, 6)), rois, 2)[1:].any()
    y = fastnorm.deform_roi_pool(x, rois, np.ones((3, 2, 2, 2)), 2)
    assert not y[1:].any()


def test_huge_rois_are_capped_and_finite(rng):
    x = rng.standard_normal((1, 2, 8, 8)).astype(np.float32)
    rois = np.array([[0, -1e30, -1e30, 1e30, 1e30], [0, -1e6, -1e6, 1e6, 1e6],
                     [0, 0, 0, 1e4, 1e4]], np.float32)
    for mode in ("avg", "max"):
        y = fastnorm.roi_align(x, rois, 7, 1.0, -1, mode=mode)
        assert np.isfinite(y).all()
    assert np.isfinite(fastnorm.roi_align(x, rois, 7, 1.0, 10**6)).all()
    assert np.isfinite(fastnorm.roi_pool(x, rois, 7)).all()
    assert np.isfinite(fastnorm.deform_roi_pool(x, rois, None, 7)).all()
    g = np.ones((3, 2, 7, 7), np.float32)
    assert np.isfinite(fastnorm.roi_align_backward(g, rois, x.shape, 7)).all()


def test_degenerate_rois_match_oracle(rng):
    x = rng.standard_normal((1, 3, 7, 9))
    rois = np.array([[0, 3, 3, 3, 3], [0, 5, 5, 2, 2], [0, 2.5, 2.5, 2.6, 2.6],
                     [0, -3, -3, -1, -1], [0, 8.9, 6.9, 12, 12], [0, 0, 0, 9, 7]], np.float64)
    for aligned in (False, True):
        for sr in (-1, 2):
            np.testing.assert_allclose(
                fastnorm.roi_align(x, rois, 3, 1.0, sr, aligned),
                ref_align(x, rois, 3, 3, 1.0, sr, aligned, False), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(fastnorm.roi_pool(x, rois, 3), ref_pool(x, rois, 3, 3, 1.0))


def test_inputs_not_modified(rng):
    x, rois = _case(rng, np.float32)
    x0, r0 = x.copy(), rois.copy()
    g = np.ones((rois.shape[0], 5, 2, 2), np.float32)
    fastnorm.roi_align(x, rois, 2)
    fastnorm.roi_align_backward(g, rois, x.shape, 2, mode="max", x=x)
    fastnorm.roi_pool_backward(g, rois, x.shape, 2, x=x)
    assert np.array_equal(x, x0) and np.array_equal(rois, r0)


# ---------------------------------------------------------------- bad input

def test_bad_batch_indices():
    x = np.zeros((2, 1, 4, 4), np.float32)
    for b in (2, -1, 0.5, np.nan):
        rois = np.array([[b, 0, 0, 1, 1]], np.float32)
        with pytest.raises(ValueError, match="`rois`"):
            fastnorm.roi_align(x, rois, 2)
        with pytest.raises(ValueError, match="`rois`"):
            fastnorm.roi_pool(x, rois, 2)
        with pytest.raises(ValueError, match="`rois`"):
            fastnorm.roi_align_backward(np.zeros((1, 1, 2, 2), np.float32), rois, x.shape, 2)
    with pytest.raises(ValueError, match="`rois`"):
        fastnorm.roi_align(x, [np.zeros((1, 4), np.float32)] * 3, 2)


def test_bad_arguments():
    x = np.zeros((1, 4, 4, 4), np.float32)
    r = np.array([[0, 0, 0, 1, 1]], np.float32)
    with pytest.raises(ValueError, match="`rois`"):
        fastnorm.roi_align(x, r[:, 1:], 2)
    with pytest.raises(ValueError, match="`rois`"):
        fastnorm.roi_align(x, [r], 2)
    with pytest.raises(TypeError, match="`rois`"):
        fastnorm.roi_align(x, r.astype(np.float64), 2)
    with pytest.raises(TypeError, match="`x`"):
        fastnorm.roi_align(x.astype(np.float16), r.astype(np.float16), 2)
    with pytest.raises(ValueError, match="`x`"):
        fastnorm.roi_align(x[0], r, 2)
    with pytest.raises(ValueError, match="`output_size`"):
        fastnorm.roi_align(x, r, 0)
    with pytest.raises(ValueError, match="`mode`"):
        fastnorm.roi_align(x, r, 2, mode="sum")
    with pytest.raises(ValueError, match="`spatial_scale`"):
        fastnorm.roi_align(x, r, 2, np.nan)
    with pytest.raises(ValueError, match="`x`"):
        fastnorm.roi_align_backward(np.zeros((1, 4, 2, 2), np.float32), r, x.shape, 2,
                                    mode="max")
    with pytest.raises(ValueError, match="`grad_out`"):
        fastnorm.roi_align_backward(np.zeros((1, 4, 3, 2), np.float32), r, x.shape, 2)
    with pytest.raises(ValueError, match="`input_shape`"):
        fastnorm.roi_align_backward(np.zeros((1, 4, 2, 2), np.float32), r, (1, 4, 4), 2)
    with pytest.raises(ValueError, match="`x`"):
        fastnorm.roi_pool_backward(np.zeros((1, 4, 2, 2), np.float32), r, x.shape, 2)
    with pytest.raises(ValueError, match="`x`"):
        fastnorm.ps_roi_align(x, r, 3)
    with pytest.raises(ValueError, match="`offset`"):
        fastnorm.deform_roi_pool(x, r, np.zeros((1, 2, 3, 3), np.float32), 2)
    with pytest.raises(ValueError, match="`mask`"):
        fastnorm.deform_roi_pool(x, r, None, 2, mask=np.zeros((1, 2, 2, 2), np.float32))
    with pytest.raises(TypeError, match="`offset`"):
        fastnorm.deform_roi_pool(x, r, np.zeros((1, 2, 2, 2)), 2)


# ---------------------------------------------------------------- interop and CUDA

def test_torch_round_trip(rng):
    torch = pytest.importorskip("torch")
    x, rois = _case(rng, np.float32)
    y = fastnorm.roi_align(torch.from_numpy(x), torch.from_numpy(rois), 3, 0.5, 2, True)
    assert isinstance(y, torch.Tensor)
    np.testing.assert_array_equal(y.numpy(), fastnorm.roi_align(x, rois, 3, 0.5, 2, True))
    g = fastnorm.roi_align_backward(torch.ones(tuple(y.shape)), torch.from_numpy(rois), x.shape,
                                    3, 0.5, 2, True)
    assert isinstance(g, torch.Tensor) and tuple(g.shape) == x.shape


def _cuda_cases(rng, dtype):
    x, rois = _case(rng, dtype, N=2, C=8, H=15, W=19, K=40, scale=0.5)
    return x, rois


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("deterministic", [False, True])
def test_cuda_matches_cpu(rng, dtype, deterministic):
    cupy = pytest.importorskip("cupy")
    x, rois = _cuda_cases(rng, dtype)
    K = rois.shape[0]
    xd, rd = cupy.asarray(x), cupy.asarray(rois)
    tol = TOL[dtype] if dtype == np.float64 else dict(rtol=1e-4, atol=1e-4)
    g = rng.standard_normal((K, 8, 3, 3)).astype(dtype)
    gd = cupy.asarray(g)
    for mode in ("avg", "max"):
        for sr, al in ((-1, False), (2, True)):
            args = (3, 0.5, sr, al)
            np.testing.assert_allclose(
                cupy.asnumpy(fastnorm.roi_align(xd, rd, *args, mode=mode)),
                fastnorm.roi_align(x, rois, *args, mode=mode), **tol)
            np.testing.assert_allclose(
                cupy.asnumpy(fastnorm.roi_align_backward(gd, rd, x.shape, *args, mode=mode, x=xd,
                                                         deterministic=deterministic)),
                fastnorm.roi_align_backward(g, rois, x.shape, *args, mode=mode, x=x), **tol)
    np.testing.assert_allclose(cupy.asnumpy(fastnorm.roi_pool(xd, rd, 3, 0.5)),
                               fastnorm.roi_pool(x, rois, 3, 0.5), **tol)
    np.testing.assert_allclose(
        cupy.asnumpy(fastnorm.roi_pool_backward(gd, rd, x.shape, 3, 0.5, x=xd,
                                                deterministic=deterministic)),
        fastnorm.roi_pool_backward(g, rois, x.shape, 3, 0.5, x=x), **tol)
    xp = rng.standard_normal((2, 18, 15, 19)).astype(dtype)
    gp = rng.standard_normal((K, 2, 3, 3)).astype(dtype)
    np.testing.assert_allclose(cupy.asnumpy(fastnorm.ps_roi_align(cupy.asarray(xp), rd, 3, 0.5)),
                               fastnorm.ps_roi_align(xp, rois, 3, 0.5), **tol)
    np.testing.assert_allclose(
        cupy.asnumpy(fastnorm.ps_roi_align_backward(cupy.asarray(gp), rd, xp.shape, 3, 0.5,
                                                    deterministic=deterministic)),
        fastnorm.ps_roi_align_backward(gp, rois, xp.shape, 3, 0.5), **tol)
    off = rng.normal(0, 0.3, (K, 2, 3, 3)).astype(dtype)
    mask = rng.uniform(0, 1, (K, 1, 3, 3)).astype(dtype)
    np.testing.assert_allclose(
        cupy.asnumpy(fastnorm.deform_roi_pool(xd, rd, cupy.asarray(off), 3, 0.5,
                                              mask=cupy.asarray(mask))),
        fastnorm.deform_roi_pool(x, rois, off, 3, 0.5, mask=mask), **tol)
    for a, b in zip(fastnorm.deform_roi_pool_backward(gd, xd, rd, cupy.asarray(off), 3, 0.5,
                                                      mask=cupy.asarray(mask),
                                                      deterministic=deterministic),
                    fastnorm.deform_roi_pool_backward(g, x, rois, off, 3, 0.5, mask=mask)):
        np.testing.assert_allclose(cupy.asnumpy(a), b, **tol)
    if deterministic:
        a = fastnorm.roi_align_backward(gd, rd, x.shape, 3, 0.5, 2, True, deterministic=True)
        b = fastnorm.roi_align_backward(gd, rd, x.shape, 3, 0.5, 2, True, deterministic=True)
        assert bool((a == b).all())


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_cuda_half_types(rng, dtype):
    cupy = pytest.importorskip("cupy")
    x, rois = _cuda_cases(rng, np.float32)
    ref = fastnorm.roi_align(x, rois, 3, 0.5, 2, True)
    if dtype == "bfloat16":
        pytest.importorskip("ml_dtypes")
    xd = cupy.asarray(x).astype(dtype)
    y = fastnorm.roi_align(xd, cupy.asarray(rois).astype(dtype), 3, 0.5, 2, True)
    assert str(y.dtype) == dtype
    np.testing.assert_allclose(cupy.asnumpy(y.astype(cupy.float32)), ref, rtol=0.05, atol=0.05)
