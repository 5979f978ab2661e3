"""RoIAlign (avg/max), RoIPool, PS-RoIAlign and deformable RoI pooling, forward and backward, vs
float64 oracles: one test body for every backend (cpu, cuda-emulated, cuda; see conftest.py).

Half types exist on CUDA only (``cuda_backend``); their references are computed from the inputs
rounded to the half type. Gradients are checked against the oracles' gradients, and those against
finite differences of the forward oracles."""
import os

import numpy as np
import pytest

import fastnorm
from reference import roi_ops as ref
from reference.roi_ops import random_rois

# float32/half: accumulation order and float32 sample coordinates; half: one rounding of the
# result (2**-11 / 2**-8 relative) on top. Absolute parts scale with the result's magnitude.
TOL = {"float32": dict(rtol=2e-5, atol=2e-5), "float64": dict(rtol=1e-11, atol=1e-11),
       "float16": dict(rtol=2e-3, atol=2e-3), "bfloat16": dict(rtol=1.6e-2, atol=1.6e-2)}
HALF = ["float16", "bfloat16"]


def _dtype(name):
    if name == "bfloat16":
        return np.dtype(pytest.importorskip("ml_dtypes").bfloat16)
    return np.dtype(name)


def _f64(a):
    return None if a is None else np.asarray(a).astype(np.float64)


def _nhwc(a):
    return np.ascontiguousarray(np.moveaxis(a, 1, -1))


def _close(backend, got, want, dtype, tol=None):
    """got (a backend array of `dtype`) matches the float64 `want` within dtype's tolerance."""
    got = backend.asnumpy(got)
    assert str(got.dtype) == dtype and got.shape == want.shape
    tol = tol or TOL[dtype]
    atol = tol["atol"] * max(1.0, float(np.abs(want).max(initial=0)))
    np.testing.assert_allclose(got.astype(np.float64), want, rtol=tol["rtol"], atol=atol)


def _case(rng, dtype, N=2, C=5, H=11, W=14, K=25, scale=0.5):
    """x and rois in `dtype` (rounded to it: the oracles take these values)."""
    x = rng.standard_normal((N, C, H, W)).astype(_dtype(dtype))
    rois = random_rois(rng, K, N, H, W, scale).astype(_dtype(dtype))
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


# ---------------------------------------------------------------- the checks, per op
# Each runs an op forward and backward (default and deterministic) on `backend` and compares
# with the oracle; the half-type tests reuse them through `cuda_backend`.

def _check_roi_align(backend, rng, dtype, aligned, sr, mode, spatial_scale=0.5, **case):
    x, rois = _case(rng, dtype, **case)
    scale = spatial_scale
    PH, PW = int(rng.integers(1, 5)), int(rng.integers(1, 5))
    args = ((PH, PW), scale, sr, aligned)
    x64, r64 = _f64(x), _f64(rois)
    want = ref.roi_align(x64, r64, PH, PW, scale, sr, aligned, mode == "max")
    g = rng.standard_normal(want.shape).astype(x.dtype)
    gwant = ref.roi_align_backward(_f64(g), r64, x64, PH, PW, scale, sr, aligned, mode == "max")
    X, R, G = backend.asarray([x, rois, g])
    _close(backend, fastnorm.roi_align(X, R, *args, mode=mode), want, dtype)
    for det in (False, True):
        _close(backend, fastnorm.roi_align_backward(G, R, x.shape, *args, mode=mode, x=X,
                                                    deterministic=det), gwant, dtype)
    # channels-last (on CUDA: transposes around the NCHW kernels in the op module)
    XL, GL = backend.asarray([_nhwc(x), _nhwc(g)])
    _close(backend, fastnorm.roi_align(XL, R, *args, mode=mode, channels_last=True), _nhwc(want),
           dtype)
    for det in (False, True):
        gl = fastnorm.roi_align_backward(GL, R, XL.shape, *args, mode=mode, x=XL,
                                         channels_last=True, deterministic=det)
        _close(backend, gl, _nhwc(gwant), dtype)


def _check_roi_pool(backend, rng, dtype, **case):
    x, rois = _case(rng, dtype, **case)
    scale = float(rng.choice([1.0, 0.5, 0.3]))
    PH, PW = int(rng.integers(1, 5)), int(rng.integers(1, 5))
    x64, r64 = _f64(x), _f64(rois)
    want = ref.roi_pool(x64, r64, PH, PW, scale)
    g = rng.standard_normal(want.shape).astype(x.dtype)
    gwant = ref.roi_pool_backward(_f64(g), r64, x64, PH, PW, scale)
    X, R, G = backend.asarray([x, rois, g])
    _close(backend, fastnorm.roi_pool(X, R, (PH, PW), scale), want, dtype)
    for det in (False, True):
        _close(backend, fastnorm.roi_pool_backward(G, R, x.shape, (PH, PW), scale, x=X,
                                                   deterministic=det), gwant, dtype)


def _check_ps_roi_align(backend, rng, dtype, sr, PH=2, PW=3, N=2, H=9, W=12, K=20):
    x = rng.standard_normal((N, 2 * PH * PW, H, W)).astype(_dtype(dtype))
    rois = random_rois(rng, K, N, H, W, 0.5).astype(x.dtype)
    x64, r64 = _f64(x), _f64(rois)
    want = ref.ps_roi_align(x64, r64, PH, PW, 0.5, sr)
    g = rng.standard_normal(want.shape).astype(x.dtype)
    gwant = ref.ps_roi_align_backward(_f64(g), r64, x64, PH, PW, 0.5, sr)
    X, R, G = backend.asarray([x, rois, g])
    y = fastnorm.ps_roi_align(X, R, (PH, PW), 0.5, sr)
    assert y.shape == (K, 2, PH, PW)
    _close(backend, y, want, dtype)
    for det in (False, True):
        _close(backend, fastnorm.ps_roi_align_backward(G, R, x.shape, (PH, PW), 0.5, sr,
                                                       deterministic=det), gwant, dtype)


def _check_deform_roi_pool(backend, rng, dtype, with_offset, with_mask, sr=None, **case):
    x, rois = _case(rng, dtype, **case)
    K, PH, PW = rois.shape[0], 3, 2
    dt = x.dtype
    off = rng.normal(0, 0.5, (K, 2, PH, PW)).astype(dt) if with_offset else None
    mask = rng.uniform(0, 1, (K, 1, PH, PW)).astype(dt) if with_mask else None
    sr = int(rng.choice([0, 2])) if sr is None else sr
    x64, r64 = _f64(x), _f64(rois)
    o64 = np.zeros((K, 2, PH, PW)) if off is None else _f64(off)
    m64 = np.ones((K, 1, PH, PW)) if mask is None else _f64(mask)
    args = ((PH, PW), 0.5, sr, 0.1)

    def fwd():
        return ref.deform_roi_pool(x64, r64, o64, m64, PH, PW, 0.5, sr, 0.1)

    want = fwd()
    g = rng.standard_normal(want.shape).astype(dt)
    g64 = _f64(g)
    gx_want = ref.deform_roi_pool_backward(g64, r64, x64, o64, m64, PH, PW, 0.5, sr, 0.1)
    # offset and mask gradients: finite differences of the (smooth) float64 forward oracle
    goff_want = _fd(lambda: float((fwd() * g64).sum()), o64) if with_offset else None
    gm_want = _fd(lambda: float((fwd() * g64).sum()), m64) if with_mask else None
    X, R, O, M, G = backend.asarray([x, rois, off, mask, g])
    _close(backend, fastnorm.deform_roi_pool(X, R, O, *args, mask=M), want, dtype)
    # finite differences are good to ~1e-9 here (no sample within 1e-6 of a pixel edge)
    fd_tol = TOL[dtype] if dtype != "float64" else dict(rtol=1e-7, atol=1e-7)
    for det in (False, True):
        gx, goff, gm = fastnorm.deform_roi_pool_backward(G, X, R, O, *args, mask=M,
                                                         deterministic=det)
        _close(backend, gx, gx_want, dtype)
        for got, w in ((goff, goff_want), (gm, gm_want)):
            if w is None:
                assert got is None
            else:
                _close(backend, got, w, dtype, fd_tol)


# ---------------------------------------------------------------- forward and backward vs oracle

@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sr", [-1, 0, 1, 2, 3])
@pytest.mark.parametrize("mode", ["avg", "max"])
def test_roi_align_matches_oracle(backend, rng, dtype, aligned, sr, mode):
    # RoIs drawn for one scale, pooled at another: some tiny, some far outside the map
    s1, s2 = (float(s) for s in rng.choice([1.0, 0.5, 0.25], 2))
    _check_roi_align(backend, rng, dtype, aligned, sr, mode, spatial_scale=s1, scale=s2)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_roi_pool_matches_oracle(backend, rng, dtype):
    for _ in range(3):
        _check_roi_pool(backend, rng, dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("sr", [-1, 2])
def test_ps_roi_align_matches_oracle(backend, rng, dtype, sr):
    _check_ps_roi_align(backend, rng, dtype, sr)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("with_offset", [False, True])
@pytest.mark.parametrize("with_mask", [False, True])
def test_deform_roi_pool_matches_oracle(backend, rng, dtype, with_offset, with_mask):
    _check_deform_roi_pool(backend, rng, dtype, with_offset, with_mask)


@pytest.mark.parametrize("dtype", HALF)
def test_half_types_match_oracle(cuda_backend, rng, dtype):
    """float16/bfloat16 forward and backward (float32 accumulation, results rounded once)."""
    for aligned, sr, mode in ((True, 2, "avg"), (False, -1, "max"), (False, 0, "avg")):
        _check_roi_align(cuda_backend, rng, dtype, aligned, sr, mode, N=3, K=40)
    _check_roi_pool(cuda_backend, rng, dtype)
    _check_ps_roi_align(cuda_backend, rng, dtype, -1)
    _check_deform_roi_pool(cuda_backend, rng, dtype, True, True)


def test_several_images_and_rois_per_image(backend, rng):
    """Three images with many RoIs each (the deterministic CUDA backward walks them per image)
    and bigger planes (several row blocks per plane)."""
    for mode in ("avg", "max"):
        _check_roi_align(backend, rng, "float32", True, 2, mode, N=3, C=4, H=29, W=23, K=90)
    _check_roi_pool(backend, rng, "float32", N=3, C=4, H=29, W=23, K=90)
    _check_ps_roi_align(backend, rng, "float32", 2, N=3, H=29, W=23, K=90)
    _check_deform_roi_pool(backend, rng, "float32", True, False, N=3, C=4, H=29, W=23, K=60)


def test_deform_roi_pool_without_offset_is_aligned_roi_align(backend, rng):
    x, rois = backend.asarray(list(_case(rng, "float64")))
    a = fastnorm.deform_roi_pool(x, rois, None, 3, 0.5, 2)
    b = fastnorm.roi_align(x, rois, 3, 0.5, 2, aligned=True)
    np.testing.assert_allclose(backend.asnumpy(a), backend.asnumpy(b), rtol=1e-13, atol=1e-13)


def test_backward_is_adjoint_at_scale(backend, rng):
    """<g, A x> == <A^T g, x> on a larger random case (float64)."""
    x, rois = _case(rng, "float64", N=3, C=7, H=23, W=31, K=60, scale=0.25)
    g = rng.standard_normal((60, 7, 7, 7))
    X, R, G = backend.asarray([x, rois, g])
    for sr, al in ((-1, False), (2, True), (0, True)):
        y = backend.asnumpy(fastnorm.roi_align(X, R, 7, 0.25, sr, al))
        gx = backend.asnumpy(fastnorm.roi_align_backward(G, R, x.shape, 7, 0.25, sr, al))
        assert abs((g * y).sum() - (gx * x).sum()) < 1e-9 * max(1, abs((g * y).sum()))


def test_reference_backward_matches_finite_differences(rng):
    """The gradient oracles are the derivatives of the forward oracles (float64)."""
    x, rois = _case(rng, "float64", N=2, C=2, H=6, W=7, K=6, scale=1.0)
    g = rng.standard_normal((6, 2, 2, 3))
    for aligned in (False, True):
        for sr in (-1, 2):
            for mm in (False, True):
                got = ref.roi_align_backward(g, rois, x, 2, 3, 1.0, sr, aligned, mm)
                num = _fd(lambda: float((ref.roi_align(x, rois, 2, 3, 1.0, sr, aligned, mm)
                                         * g).sum()), x)
                np.testing.assert_allclose(got, num, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        ref.roi_pool_backward(g, rois, x, 2, 3, 1.0),
        _fd(lambda: float((ref.roi_pool(x, rois, 2, 3, 1.0) * g).sum()), x), rtol=1e-6,
        atol=1e-6)
    xp = rng.standard_normal((2, 12, 6, 7))
    gp = rng.standard_normal((6, 2, 2, 3))
    np.testing.assert_allclose(
        ref.ps_roi_align_backward(gp, rois, xp, 2, 3, 1.0, 2),
        _fd(lambda: float((ref.ps_roi_align(xp, rois, 2, 3, 1.0, 2) * gp).sum()), xp),
        rtol=1e-6, atol=1e-6)
    off = rng.normal(0, 0.3, (6, 2, 2, 3))
    mask = rng.uniform(0.2, 1, (6, 1, 2, 3))
    np.testing.assert_allclose(
        ref.deform_roi_pool_backward(g, rois, x, off, mask, 2, 3, 1.0, 0, 0.1),
        _fd(lambda: float((ref.deform_roi_pool(x, rois, off, mask, 2, 3, 1.0, 0, 0.1)
                           * g).sum()), x), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- determinism

@pytest.mark.parametrize("fn", ["align", "align_max", "align_cl", "pool", "ps", "deform"])
def test_deterministic_backward_is_bitwise_repeatable(cuda_backend, rng, fn):
    """CUDA's deterministic=True: the default's result within tolerance, and the same bits on
    every run (the emulator also re-runs each launch in reverse order and compares bits)."""
    x, rois = _case(rng, "float32", N=3, C=6, H=20, W=24, K=80, scale=0.5)
    off = rng.normal(0, 0.3, (80, 2, 2, 2)).astype(np.float32)
    mask = rng.uniform(0, 1, (80, 1, 2, 2)).astype(np.float32)
    g = rng.standard_normal((80, 6, 2, 2)).astype(np.float32)
    X, R, O, M, G = cuda_backend.asarray([x, rois, off, mask, g])
    XL, GL = cuda_backend.asarray([_nhwc(x), _nhwc(g)])
    calls = {
        "align": lambda d: fastnorm.roi_align_backward(G, R, x.shape, 2, 0.5, 2, True,
                                                       deterministic=d),
        "align_max": lambda d: fastnorm.roi_align_backward(G, R, x.shape, 2, 0.5, -1, mode="max",
                                                           x=X, deterministic=d),
        "align_cl": lambda d: fastnorm.roi_align_backward(GL, R, XL.shape, 2, 0.5, 2,
                                                          channels_last=True, deterministic=d),
        "pool": lambda d: fastnorm.roi_pool_backward(G, R, x.shape, 2, 0.5, x=X,
                                                     deterministic=d),
        "ps": lambda d: fastnorm.ps_roi_align_backward(G[:, :1], R, (3, 4, 20, 24), 2, 0.5,
                                                       deterministic=d),
        "deform": lambda d: fastnorm.deform_roi_pool_backward(G, X, R, O, 2, 0.5, mask=M,
                                                              deterministic=d),
    }

    def run(d):
        out = calls[fn](d)
        return [cuda_backend.asnumpy(a) for a in (out if isinstance(out, tuple) else (out,))]

    default, det1, det2 = run(False), run(True), run(True)
    for a, b, c in zip(default, det1, det2):
        assert np.any(a)
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
        assert np.array_equal(b.view(np.uint32), c.view(np.uint32))


@pytest.mark.emulated
def test_deterministic_backward_launches_its_own_kernels(rng):
    """deterministic=True really takes its own kernels (no atomics) on CUDA: RoIAlign's tiles,
    RoIPool's records and gather."""
    emu = pytest.importorskip("fastnorm._cuda.emulator")
    x, rois = _case(rng, "float32", K=10)
    X, R = emu.asarray(x), emu.asarray(rois)
    G = emu.asarray(rng.standard_normal((10, 5, 2, 2)).astype(np.float32))
    for d, want in ((False, "align_bwd<float>"), (True, "align_bwd_tile<float>")):
        with emu.counting() as c:
            fastnorm.roi_align_backward(G, R, x.shape, 2, deterministic=d)
        assert want in {k.split("::")[-1] for k in c.kernels}
        assert c.total("atomics") == 0 or not d
    for d, want in ((False, "pool_bwd<float>"), (True, "pool_bwd_gather<float>")):
        with emu.counting() as c:
            fastnorm.roi_pool_backward(G, R, x.shape, 2, x=X, deterministic=d)
        assert want in {k.split("::")[-1] for k in c.kernels}
        assert c.total("atomics") == 0 or not d


def _tile_case(rng, N=3, C=40, H=23, W=37, K=70):
    """float64 inputs for the deterministic RoIAlign backward's tiles: C = 40 gives two channel
    groups of 32 lanes (32-pixel tiles, so most RoIs straddle tiles), image 2 has no RoIs (all
    its tiles empty), and RoIs sit outside the map, on its last row and column (clamped
    corners), inside one pixel and across the whole map."""
    x = rng.standard_normal((N, C, H, W))
    rois = random_rois(rng, K, N - 1, H, W, 1.0)
    rois[:6, 1:] = [[-30, -30, -5, -5], [W + 3, 0, W + 9, 4], [W - 3, H - 3, W + 1, H + 1],
                    [W - 1.2, 0, W - 1, H], [4.2, 5.1, 4.4, 5.3], [-2, -2, W + 2, H + 2]]
    return x, rois


@pytest.mark.parametrize("fn", ["align", "align_adaptive", "align_max", "ps", "deform",
                                "rotated"])
def test_deterministic_backward_tiles(cuda_backend, rng, fn):
    """The tiled deterministic backward (every RoIAlign kind) equals the atomic one to rounding
    in float64, on a case with many tiles per plane, empty tiles and edge RoIs, and repeats its
    bits (the emulator also re-runs every launch in reverse order)."""
    x, rois = _tile_case(rng)
    K, C = len(rois), x.shape[1]
    g = rng.standard_normal((K, C, 3, 2))
    gp = rng.standard_normal((K, C // 6, 3, 2))
    off = rng.normal(0, 0.5, (K, 2, 3, 2))
    mask = rng.uniform(0, 1, (K, 1, 3, 2))
    rr = np.concatenate([rois[:, :1], (rois[:, 1:3] + rois[:, 3:5]) / 2,
                         np.abs(rois[:, 3:5] - rois[:, 1:3]) + 1,
                         rng.uniform(-180, 180, (K, 1))], 1)
    xp = x[:, :36]
    X, R, G, GP, O, M, RR = cuda_backend.asarray([x, rois, g, gp, off, mask, rr])
    calls = {
        "align": lambda d: fastnorm.roi_align_backward(G, R, x.shape, (3, 2), 1.0, 2, True,
                                                       deterministic=d),
        "align_adaptive": lambda d: fastnorm.roi_align_backward(G, R, x.shape, (3, 2), 0.5, -1,
                                                                deterministic=d),
        "align_max": lambda d: fastnorm.roi_align_backward(G, R, x.shape, (3, 2), 1.0, -1,
                                                           mode="max", x=X, deterministic=d),
        "ps": lambda d: fastnorm.ps_roi_align_backward(GP[:, :6], R, xp.shape, (3, 2), 1.0, 2,
                                                       deterministic=d),
        "deform": lambda d: fastnorm.deform_roi_pool_backward(G, X, R, O, (3, 2), 1.0, 0,
                                                              mask=M, deterministic=d)[0],
        "rotated": lambda d: fastnorm.roi_align_rotated_backward(G, RR, x.shape, (3, 2), 1.0, 2,
                                                                 deterministic=d),
    }
    a, b, c = (cuda_backend.asnumpy(calls[fn](d)) for d in (False, True, True))
    assert np.any(a) and not np.any(b[2])
    np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-12)
    assert np.array_equal(b.view(np.uint64), c.view(np.uint64))


@pytest.mark.emulated
def test_deterministic_backward_host_syncs_and_kernels(rng):
    """The tiled backward syncs with the host only to size the records of adaptive sampling;
    records of RoIs without geometry (non-finite) leave every tile empty: zeros."""
    emu = pytest.importorskip("fastnorm._cuda.emulator")
    x, rois = _tile_case(rng, C=3, K=12)
    G, R, X = (emu.asarray(a) for a in (rng.standard_normal((12, 3, 2, 2)), rois, x))
    for kw, syncs in ((dict(sampling_ratio=2), 0), (dict(mode="max", x=X), 0),
                      (dict(sampling_ratio=0), 1)):
        with emu.counting() as base:          # the op layer's own checks
            fastnorm.roi_align_backward(G, R, x.shape, 2, deterministic=False, **kw)
        with emu.counting() as c:
            fastnorm.roi_align_backward(G, R, x.shape, 2, deterministic=True, **kw)
        assert c.syncs == base.syncs + syncs
        assert [k.split("::")[-1] for k in c.kernels][-2:] == ["align_bwd_records<double>",
                                                              "align_bwd_tile<double>"]
        assert c.total("atomics") == 0
    bad = rois.copy()
    bad[:, 3] = np.nan
    for sr in (0, 2):
        gx = fastnorm.roi_align_backward(G, emu.asarray(bad), x.shape, 2, 1.0, sr,
                                         deterministic=True).get()
        assert gx.shape == x.shape and not gx.any()


def test_deterministic_backward_over_the_workspace_limit(cuda_backend, rng, monkeypatch):
    """Records that would pass DET_WORKSPACE_BYTES: the row-owner kernel instead, same results
    to rounding, same bits on every run."""
    from fastnorm._cuda import roi_ops as cuda_roi_ops
    x, rois = _tile_case(rng, C=5, K=30)
    G, R, X = cuda_backend.asarray([rng.standard_normal((30, 5, 2, 2)), rois, x])

    def run():
        return [cuda_backend.asnumpy(fastnorm.roi_align_backward(
            G, R, x.shape, 2, 1.0, sr, mode=mode, x=X, deterministic=True))
            for sr, mode in ((2, "avg"), (0, "avg"), (-1, "max"))]
    tiles = run()
    monkeypatch.setattr(cuda_roi_ops, "DET_WORKSPACE_BYTES", 1000)
    rows, again = run(), run()
    for a, b, c in zip(tiles, rows, again):
        assert np.any(a)
        np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-12)
        assert np.array_equal(b.view(np.uint64), c.view(np.uint64))
    if cuda_backend.name == "cuda-emulated":
        emu = cuda_backend.xp
        with emu.counting() as c:
            fastnorm.roi_align_backward(G, R, x.shape, 2, deterministic=True)
        assert "align_bwd_det<double>" in {k.split("::")[-1] for k in c.kernels}


def _pool_records_case(rng, dtype, N=3, C=7, H=23, W=37, K=60):
    """RoIPool inputs for the deterministic backward's records: x full of ties, +-0, NaN and
    infinities (_tie_case), image N - 1 without RoIs (its grad_x all zeros), RoIs off the map
    (every window empty), inside one pixel, across the whole map, non-finite, and bins of small
    RoIs whose windows are empty at 5 x 4 bins; N C H W = 17.8k grad_x elements: 70 blocks."""
    x, rois = _tie_case(rng, dtype, N, C, H, W, K)
    rois[:, 0] = rng.integers(0, N - 1, K)
    rois[4:10, 1:] = [[-60, -60, -10, -10], [2 * W + 6, 0, 2 * W + 20, 8],
                      [0, 2 * H + 4, 10, 2 * H + 30], [8.2, 10.1, 8.6, 10.5],
                      [2 * W - 2, 2 * H - 2, 2 * W + 4, 2 * H + 4], [-4, -4, 2 * W + 4, 2 * H + 4]]
    return x, rois


def _pool_det(backend, G, R, shape, X, PH=5, PW=4):
    return backend.asnumpy(fastnorm.roi_pool_backward(G, R, shape, (PH, PW), 0.5, x=X,
                                                      deterministic=True))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_roi_pool_deterministic_backward_records(cuda_backend, rng, monkeypatch, dtype):
    """The deterministic RoIPool backward (records keyed by their argmax pixel, one thread per
    grad_x element) adds each pixel's gradients in RoI, then bin order, from 0, as the row-owner
    kernel it falls back to and the CPU's sequential scan do: the same bits as both (ties, NaN,
    infinities, empty windows, RoIs off the map, an image without RoIs), on every run, and the
    atomic path's values to rounding."""
    from fastnorm._cuda import roi_ops as cuda_roi_ops
    x, rois = _pool_records_case(rng, _dtype(dtype))
    PH, PW = 5, 4
    g = rng.standard_normal((len(rois), x.shape[1], PH, PW)).astype(x.dtype)
    _, gwant = _pool_scan(x, rois, PH, PW, 0.5, g)
    X, R, G = cuda_backend.asarray([x, rois, g])
    a, b = _pool_det(cuda_backend, G, R, x.shape, X), _pool_det(cuda_backend, G, R, x.shape, X)
    assert np.any(a) and not np.any(a[-1])
    assert a.tobytes() == b.tobytes() == gwant.tobytes()
    atomic = fastnorm.roi_pool_backward(G, R, x.shape, (PH, PW), 0.5, x=X, deterministic=False)
    np.testing.assert_allclose(a, cuda_backend.asnumpy(atomic), rtol=TOL[dtype]["rtol"],
                               atol=TOL[dtype]["atol"])
    monkeypatch.setattr(cuda_roi_ops, "DET_WORKSPACE_BYTES", 1000)
    assert _pool_det(cuda_backend, G, R, x.shape, X).tobytes() == a.tobytes()


@pytest.mark.parametrize("dtype", HALF)
def test_roi_pool_deterministic_backward_records_half(cuda_backend, rng, monkeypatch, dtype):
    """Half types: float32 sums rounded once, the row-owner fallback's bits, repeated."""
    from fastnorm._cuda import roi_ops as cuda_roi_ops
    x, rois = _pool_records_case(rng, np.float32)
    with np.errstate(over="ignore"):          # -FLT_MAX: -inf in float16
        x, rois = x.astype(_dtype(dtype)), rois.astype(_dtype(dtype))
    g = rng.standard_normal((len(rois), x.shape[1], 5, 4)).astype(x.dtype)
    X, R, G = cuda_backend.asarray([x, rois, g])
    a, b = _pool_det(cuda_backend, G, R, x.shape, X), _pool_det(cuda_backend, G, R, x.shape, X)
    assert np.any(a.astype(np.float32)) and not np.any(a[-1].astype(np.float32))
    assert a.tobytes() == b.tobytes()
    monkeypatch.setattr(cuda_roi_ops, "DET_WORKSPACE_BYTES", 1000)
    assert _pool_det(cuda_backend, G, R, x.shape, X).tobytes() == a.tobytes()


def test_roi_pool_deterministic_backward_workspace_limit(cuda_backend, rng, monkeypatch):
    """Records up to DET_WORKSPACE_BYTES (POOL_RECORD_BYTES each) take the records' kernels,
    one byte less the row-owner kernel: the same bits either way."""
    from fastnorm._cuda import roi_ops as cuda_roi_ops
    x, rois = _pool_records_case(rng, np.float64, C=3, K=20)
    g = rng.standard_normal((20, 3, 5, 4))
    X, R, G = cuda_backend.asarray([x, rois, g])
    limit = g.size * cuda_roi_ops.POOL_RECORD_BYTES
    got = {}
    for lim, kernel in ((limit, "pool_bwd_gather<double>"), (limit - 1, "pool_bwd_det<double>")):
        monkeypatch.setattr(cuda_roi_ops, "DET_WORKSPACE_BYTES", lim)
        got[lim] = _pool_det(cuda_backend, G, R, x.shape, X)
        if cuda_backend.name == "cuda-emulated":
            with cuda_backend.xp.counting() as c:
                _pool_det(cuda_backend, G, R, x.shape, X)
            assert kernel in {k.split("::")[-1] for k in c.kernels}
            assert c.total("atomics") == 0
    assert np.any(got[limit])
    assert got[limit].tobytes() == got[limit - 1].tobytes()


@pytest.mark.emulated
def test_roi_pool_deterministic_backward_syncs_and_kernels(rng):
    """The records' backward adds no host synchronisation to the atomic path's (the op layer's
    own checks), launches records, sort and gather, and gives zeros where no record lands (all
    RoIs non-finite, or every window off the map)."""
    emu = pytest.importorskip("fastnorm._cuda.emulator")
    x, rois = _pool_records_case(rng, np.float32, C=2, K=12)
    G, R, X = (emu.asarray(a) for a in (rng.standard_normal((12, 2, 5, 4)).astype(np.float32),
                                         rois, x))
    with emu.counting() as base:
        fastnorm.roi_pool_backward(G, R, x.shape, (5, 4), 0.5, x=X, deterministic=False)
    with emu.counting() as c:
        fastnorm.roi_pool_backward(G, R, x.shape, (5, 4), 0.5, x=X, deterministic=True)
    assert c.syncs == base.syncs
    assert [k.split("::")[-1] for k in c.kernels] == ["rois_check<float>",
                                                     "pool_bwd_records<float>",
                                                     "pool_bwd_gather<float>"]
    assert c.total("atomics") == 0
    for bad in (np.nan, 1e6):
        r = rois.copy()
        r[:, 1] = bad
        if bad == 1e6:
            r[:, 3] = 2e6
        gx = fastnorm.roi_pool_backward(G, emu.asarray(r), x.shape, (5, 4), 0.5, x=X,
                                        deterministic=True).get()
        assert gx.shape == x.shape and not gx.any()


@pytest.mark.parametrize("fn", ["align", "align_max", "align_cl", "pool", "ps", "deform"])
def test_backward_deterministic_across_threads(rng, fn):
    """CPU: bitwise identical gradients for any thread count."""
    x, rois = _case(rng, "float32", N=2, C=16, H=20, W=24, K=80, scale=0.5)
    off = rng.normal(0, 0.3, (80, 2, 2, 2)).astype(np.float32)
    mask = rng.uniform(0, 1, (80, 1, 2, 2)).astype(np.float32)
    g = rng.standard_normal((80, 16, 2, 2)).astype(np.float32)
    xl = _nhwc(x)
    calls = {
        "align": lambda: fastnorm.roi_align_backward(g, rois, x.shape, 2, 0.5, 2, True),
        "align_max": lambda: fastnorm.roi_align_backward(g, rois, x.shape, 2, 0.5, -1, mode="max",
                                                         x=x),
        "align_cl": lambda: fastnorm.roi_align_backward(_nhwc(g), rois, xl.shape, 2, 0.5, 2,
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


@pytest.mark.parametrize("rows, table_bytes", [(0, 1 << 25), (1, 1), (3, 1 << 25), (7, 3000),
                                               (None, 1 << 25)])
@pytest.mark.parametrize("rects", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_roi_align_scratch_bands_and_chunks(rng, dtype, rows, table_bytes, rects):
    """CPU: a per-thread scratch of only ``rows`` feature rows (maps wider than the budget, as in
    test_huge.py; None: the default) splits a unit's RoIs into bands and sends taller RoIs
    straight to x / grad_x; small table budgets split the RoIs into chunks (1: one RoI each);
    ``rects``: the NCHW forward transposes each RoI's own rectangle instead of the band (as for
    few RoIs on a large map). Same results as the oracle (RoIAlign and deformable RoI pooling,
    which shares its units), bitwise the same for any thread count and either forward path."""
    from conftest import Backend
    cpu = pytest.importorskip("fastnorm._cpu.roi_ops")
    for sr in (2, -1):
        x, rois = _case(rng, dtype, N=2, C=19, H=23, W=17, K=40, scale=0.5)
        itemsize = np.dtype(_dtype(dtype)).itemsize
        old = cpu._set_limits(None if rows is None else rows * 17 * 16 * itemsize, table_bytes,
                              rect_cost=0 if rects else 1 << 40)
        try:
            _check_roi_align(Backend("cpu"), rng, dtype, True, sr, "avg", N=2, C=19, H=23, W=17,
                             K=40)
            _check_deform_roi_pool(Backend("cpu"), rng, dtype, True, True, N=2, C=19, H=23,
                                   W=17, K=40)
            g = rng.standard_normal((40, 19, 3, 2)).astype(x.dtype)
            got = []
            for n in (1, 2, 3):
                with fastnorm.threads(n):
                    got.append((fastnorm.roi_align(x, rois, (3, 2), 0.5, sr, True),
                                fastnorm.roi_align_backward(g, rois, x.shape, (3, 2), 0.5, sr,
                                                            True)))
            cpu._set_limits(rect_cost=1 << 40 if rects else 0)     # the other forward path
            other = fastnorm.roi_align(x, rois, (3, 2), 0.5, sr, True)
        finally:
            cpu._set_limits(*old)
        for y, gx in got[1:]:
            assert np.array_equal(y, got[0][0]) and np.array_equal(gx, got[0][1])
        assert np.array_equal(other, got[0][0])
        want = fastnorm.roi_align_backward(g, rois, x.shape, (3, 2), 0.5, sr, True)
        np.testing.assert_allclose(got[0][1], want, **TOL[dtype])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("C", [32, 35])
def test_roi_align_streamed_stores_bitwise(rng, dtype, C):
    """CPU: outputs and grad_x of STREAM_BYTES or more are written with non-temporal stores
    (NCHW forward through an L1 buffer; NCHW grad_x in whole 64-byte lines of every plane after
    an unaligned head, HW % 16 == 0 here; channels-last pixel vectors). Forced on for these
    inputs (stream_bytes 0), every path gives the same bits as ordinary stores, also with a
    partial last channel block (C = 35), at any thread count: RoIAlign and deformable RoI
    pooling, forward and backward, NCHW and channels-last, band and per-RoI-rectangle forward,
    and RoIPool's forward; one band per unit or bands of 9 rows (rows of 24 pixels: bands
    starting on odd rows start half a line into grad_x's planes). The outputs (>= 1 MiB) get
    cached blocks full of NaN, so an element left unwritten shows."""
    cpu = pytest.importorskip("fastnorm._cpu.roi_ops")
    pool = pytest.importorskip("fastnorm._cpu._pool")
    K = 200
    x, rois = _case(rng, dtype, N=2, C=C, H=176, W=24, K=K, scale=0.5)
    g = rng.standard_normal((K, C, 7, 7)).astype(x.dtype)
    off = rng.normal(0, 0.1, (K, 2, 7, 7)).astype(x.dtype)
    xl, gl = (np.ascontiguousarray(a.transpose(0, 2, 3, 1)) for a in (x, g))

    def run():
        return (fastnorm.roi_align(x, rois, 7, 0.5, 2, True),
                fastnorm.roi_align_backward(g, rois, x.shape, 7, 0.5, 2, True),
                fastnorm.roi_align(xl, rois, 7, 0.5, 2, True, channels_last=True),
                fastnorm.roi_align_backward(gl, rois, xl.shape, 7, 0.5, 2, True,
                                            channels_last=True),
                fastnorm.deform_roi_pool(x, rois, off, 7, 0.5, 2),
                fastnorm.deform_roi_pool_backward(g, x, rois, off, 7, 0.5, 2)[0],
                fastnorm.roi_pool(x, rois, 7, 0.5))
    old = cpu._set_limits()
    try:
        for rect_cost, rows in ((0, None), (1 << 40, None), (1 << 40, 9)):
            cpu._set_limits(old[0] if rows is None else rows * 24 * 16 * x.itemsize,
                            rect_cost=rect_cost, stream_bytes=1 << 62)
            want = run()
            assert all(a.nbytes >= 1 << 20 for a in want)
            cpu._set_limits(stream_bytes=0)
            for n in (1, 3):
                fastnorm.empty_cache()
                junk = [pool.empty(a.shape, a.dtype) for a in want]
                for a in junk:
                    a.fill(np.nan)
                del junk, a
                with fastnorm.threads(n):
                    got = run()
                for a, b in zip(got, want):
                    assert np.array_equal(a, b)
    finally:
        cpu._set_limits(*old)


# ---------------------------------------------------------------- edge cases

def test_list_rois_equal_array_rois(backend, rng):
    x = rng.standard_normal((3, 4, 9, 9))
    per = [random_rois(rng, k, 1, 9, 9)[:, 1:] for k in (3, 0, 4)]
    rois = np.concatenate([np.concatenate([np.full((len(r), 1), i), r], 1)
                           for i, r in enumerate(per)])
    xp = rng.standard_normal((3, 8, 9, 9))
    off = rng.normal(0, 0.3, (7, 2, 2, 2))
    g = rng.standard_normal((7, 4, 2, 2))
    X, XP, O, G, P, R = backend.asarray([x, xp, off, g, per, rois])
    XL, GL = backend.asarray([_nhwc(x), _nhwc(g)])
    calls = (lambda r: fastnorm.roi_align(X, r, 2, 1.0, 2),
             lambda r: fastnorm.roi_align(XL, r, 2, 1.0, 2, channels_last=True),
             lambda r: fastnorm.roi_pool(X, r, 2),
             lambda r: fastnorm.ps_roi_align(XP, r, 2),
             lambda r: fastnorm.deform_roi_pool(X, r, O, 2),
             lambda r: fastnorm.roi_align_backward(G, r, x.shape, 2, 1.0, 2),
             lambda r: fastnorm.roi_align_backward(GL, r, XL.shape, 2, 1.0, 2, mode="max",
                                                   x=XL, channels_last=True),
             lambda r: fastnorm.roi_pool_backward(G, r, x.shape, 2, x=X, deterministic=True),
             lambda r: fastnorm.ps_roi_align_backward(G[:, :2], r, xp.shape, 2),
             lambda r: fastnorm.deform_roi_pool_backward(G, X, r, O, 2)[:2])
    for f in calls:
        a, b = backend.asnumpy(f(P)), backend.asnumpy(f(R))
        for u, w in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
            assert np.array_equal(u, w)
    # the list form equals the oracle on the concatenated RoIs
    np.testing.assert_allclose(backend.asnumpy(calls[0](P)),
                               ref.roi_align(x, rois, 2, 2, 1.0, 2, False, False), rtol=1e-11,
                               atol=1e-11)


def test_empty_rois(backend, rng):
    x = rng.standard_normal((2, 3, 5, 5)).astype(np.float32)
    X = backend.asarray(x)
    R = backend.asarray(np.zeros((0, 5), np.float32))
    G = backend.asarray(np.zeros((0, 3, 2, 2), np.float32))
    A = backend.asnumpy
    assert A(fastnorm.roi_align(X, R, (2, 3))).shape == (0, 3, 2, 3)
    assert A(fastnorm.roi_align(X, [], 2)).shape == (0, 3, 2, 2)
    assert A(fastnorm.roi_align(X, [R[:, 1:], R[:, 1:]], 2)).shape == (0, 3, 2, 2)
    assert A(fastnorm.roi_align(backend.asarray(_nhwc(x)), R, (2, 3),
                                channels_last=True)).shape == (0, 2, 3, 3)
    assert A(fastnorm.roi_pool(X, R, 2)).shape == (0, 3, 2, 2)
    XP = backend.asarray(np.zeros((2, 4, 5, 5), np.float32))
    assert A(fastnorm.ps_roi_align(XP, R, 2)).shape == (0, 1, 2, 2)
    assert A(fastnorm.deform_roi_pool(X, R, None, 2)).shape == (0, 3, 2, 2)
    for det in (False, True):
        gx = A(fastnorm.roi_align_backward(G, R, x.shape, 2, mode="max", x=X, deterministic=det))
        assert gx.shape == x.shape and not gx.any()
        gx = A(fastnorm.roi_align_backward(backend.asarray(np.zeros((0, 2, 2, 3), np.float32)), R,
                                           (2, 5, 5, 3), 2, channels_last=True,
                                           deterministic=det))
        assert gx.shape == (2, 5, 5, 3) and not gx.any()
        gx = A(fastnorm.roi_pool_backward(G, R, x.shape, 2, x=X, deterministic=det))
        assert gx.shape == x.shape and not gx.any()
        gx = A(fastnorm.ps_roi_align_backward(G[:, :1], R, (2, 4, 5, 5), 2, deterministic=det))
        assert gx.shape == (2, 4, 5, 5) and not gx.any()
        gx, goff, gm = A(fastnorm.deform_roi_pool_backward(
            G, X, R, backend.asarray(np.zeros((0, 2, 2, 2), np.float32)), 2,
            mask=backend.asarray(np.zeros((0, 1, 2, 2), np.float32)), deterministic=det))
        assert gx.shape == x.shape and not gx.any()
        assert goff.shape == (0, 2, 2, 2) and gm.shape == (0, 1, 2, 2)


def test_empty_results_with_outsized_output_size(backend, rng):
    """An output_size beyond int32 with an empty result (K = 0 or C = 0) is still just an empty
    result, as on the CPU (CUDA once built the int32 kernel parameters first: OverflowError)."""
    big = 2**31
    X = backend.asarray(rng.standard_normal((1, 2, 4, 4)).astype(np.float32))
    R0 = backend.asarray(np.zeros((0, 5), np.float32))
    R1 = backend.asarray(np.array([[0, 0, 0, 3, 3]], np.float32))
    A = backend.asnumpy
    assert A(fastnorm.roi_align(X, R0, (big, 1))).shape == (0, 2, big, 1)
    assert A(fastnorm.roi_align(X, R0, (1, big), mode="max")).shape == (0, 2, 1, big)
    assert A(fastnorm.roi_pool(X, R0, (big, 1))).shape == (0, 2, big, 1)
    assert A(fastnorm.deform_roi_pool(X, R0, None, (big, 1))).shape == (0, 2, big, 1)
    X0 = backend.asarray(np.zeros((1, 0, 4, 4), np.float32))
    assert A(fastnorm.ps_roi_align(X0, R1, (big, 1))).shape == (1, 0, big, 1)
    gb = backend.asarray(np.zeros((0, 2, big, 1), np.float32))
    for det in (False, True):
        gx = A(fastnorm.roi_align_backward(gb, R0, (1, 2, 4, 4), (big, 1), deterministic=det))
        assert gx.shape == (1, 2, 4, 4) and not gx.any()
        gx = A(fastnorm.ps_roi_align_backward(gb[:, :0], R0, (1, 0, 4, 4), (big, 1),
                                              deterministic=det))
        assert gx.shape == (1, 0, 4, 4)
        gx, goff, gm = A(fastnorm.deform_roi_pool_backward(gb, X, R0, None, (big, 1),
                                                           deterministic=det))
        assert gx.shape == (1, 2, 4, 4) and not gx.any() and goff is None and gm is None


@pytest.mark.parametrize("shape", [(2, 3, 0, 5), (2, 3, 5, 0), (2, 0, 5, 5), (0, 3, 5, 5)])
def test_empty_maps(backend, shape):
    """Empty feature maps: zeros (nothing to sample) and zero gradients, of the right shapes."""
    N, C, H, W = shape
    x = np.zeros(shape, np.float32)
    rois = np.array([[0, 1, 1, 3, 3], [N - 1, -2, 0, 9, 4]] if N else np.zeros((0, 5)),
                    np.float32)
    K = len(rois)
    X, R = backend.asarray([x, rois])
    G = backend.asarray(np.ones((K, C, 2, 2), np.float32))
    A = backend.asnumpy
    for y in (fastnorm.roi_align(X, R, 2), fastnorm.roi_align(X, R, 2, mode="max"),
              fastnorm.roi_pool(X, R, 2), fastnorm.deform_roi_pool(X, R, None, 2)):
        y = A(y)
        assert y.shape == (K, C, 2, 2) and not y.any()
    y = A(fastnorm.ps_roi_align(X, R, 1))
    assert y.shape == (K, C, 1, 1) and not y.any()
    y = A(fastnorm.roi_align(backend.asarray(_nhwc(x)), R, 2, channels_last=True))
    assert y.shape == (K, 2, 2, C) and not y.any()
    for det in (False, True):
        for gx in (fastnorm.roi_align_backward(G, R, shape, 2, mode="max", x=X, deterministic=det),
                   fastnorm.roi_pool_backward(G, R, shape, 2, x=X, deterministic=det),
                   fastnorm.ps_roi_align_backward(G[:, :, :1, :1], R, shape, 1,
                                                  deterministic=det),
                   fastnorm.deform_roi_pool_backward(G, X, R, None, 2, deterministic=det)[0]):
            gx = A(gx)
            assert gx.shape == shape and not gx.any()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_rois_give_zeros(backend, rng, bad):
    x = rng.standard_normal((1, 2, 6, 6))
    rois = np.array([[0, 1, 1, 4, 4], [0, 1, bad, 4, 4], [0, 0, 0, bad, 5]], np.float64)
    g = np.ones((3, 2, 2, 2))
    X, R, G, O = backend.asarray([x, rois, g, np.ones((3, 2, 2, 2))])
    X8 = backend.asarray(np.ones((1, 8, 6, 6)))
    A = backend.asnumpy
    for mode in ("avg", "max"):
        y = A(fastnorm.roi_align(X, R, 2, 1.0, -1, mode=mode))
        assert np.isfinite(y).all() and not y[1:].any() and y[0].any()
        for det in (False, True):
            gx = A(fastnorm.roi_align_backward(G[1:], R[1:], x.shape, 2, mode=mode, x=X,
                                               deterministic=det))
            assert not gx.any()
    y = A(fastnorm.roi_pool(X, R, 2))
    assert not y[1:].any() and np.isfinite(y).all() and y[0].any()
    y = A(fastnorm.ps_roi_align(X8, R, 2))
    assert not y[1:].any() and y[0].all()
    y = A(fastnorm.deform_roi_pool(X, R, O, 2))
    assert not y[1:].any() and np.isfinite(y).all()
    for det in (False, True):
        assert not A(fastnorm.roi_pool_backward(G[1:], R[1:], x.shape, 2, x=X,
                                                deterministic=det)).any()
        assert not A(fastnorm.ps_roi_align_backward(G[1:, :2], R[1:], (1, 8, 6, 6), 2,
                                                    deterministic=det)).any()
        gx, goff, _ = A(fastnorm.deform_roi_pool_backward(G[1:], X, R[1:], O[1:], 2,
                                                          deterministic=det))
        assert not gx.any() and not goff.any()


def _check_all_ops(backend, x, rois, PH, PW, sr=-1, tol=TOL["float64"]):
    """Every op, forward and (x-)backward, on float64 inputs vs the oracles."""
    K, C = rois.shape[0], x.shape[1]
    rng = np.random.default_rng(0)
    g = rng.standard_normal((K, C, PH, PW))
    X, R, G = backend.asarray([x, rois, g])
    A = backend.asnumpy
    for aligned in (False, True):
        for mode in ("avg", "max"):
            mm = mode == "max"
            args = ((PH, PW), 1.0, sr, aligned)
            np.testing.assert_allclose(A(fastnorm.roi_align(X, R, *args, mode=mode)),
                                       ref.roi_align(x, rois, PH, PW, 1.0, sr, aligned, mm),
                                       **tol)
            want = ref.roi_align_backward(g, rois, x, PH, PW, 1.0, sr, aligned, mm)
            for det in (False, True):
                np.testing.assert_allclose(A(fastnorm.roi_align_backward(
                    G, R, x.shape, *args, mode=mode, x=X, deterministic=det)), want, **tol)
    np.testing.assert_allclose(A(fastnorm.roi_pool(X, R, (PH, PW))),
                               ref.roi_pool(x, rois, PH, PW, 1.0), **tol)
    for det in (False, True):
        np.testing.assert_allclose(
            A(fastnorm.roi_pool_backward(G, R, x.shape, (PH, PW), x=X, deterministic=det)),
            ref.roi_pool_backward(g, rois, x, PH, PW, 1.0), **tol)
    o = np.zeros((K, 2, PH, PW))
    m = np.ones((K, 1, PH, PW))
    np.testing.assert_allclose(A(fastnorm.deform_roi_pool(X, R, None, (PH, PW), 1.0, sr)),
                               ref.deform_roi_pool(x, rois, o, m, PH, PW, 1.0, sr, 0.1), **tol)
    np.testing.assert_allclose(
        A(fastnorm.deform_roi_pool_backward(G, X, R, None, (PH, PW), 1.0, sr)[0]),
        ref.deform_roi_pool_backward(g, rois, x, o, m, PH, PW, 1.0, sr, 0.1), **tol)
    if C % (PH * PW) == 0:
        gp = np.ascontiguousarray(g[:, :C // (PH * PW)])
        np.testing.assert_allclose(A(fastnorm.ps_roi_align(X, R, (PH, PW), 1.0, sr)),
                                   ref.ps_roi_align(x, rois, PH, PW, 1.0, sr), **tol)
        np.testing.assert_allclose(
            A(fastnorm.ps_roi_align_backward(backend.asarray(gp), R, x.shape, (PH, PW), 1.0,
                                             sr, deterministic=True)),
            ref.ps_roi_align_backward(gp, rois, x, PH, PW, 1.0, sr), **tol)


def test_degenerate_rois_match_oracle(backend, rng):
    """Points, inverted boxes, sub-pixel boxes, boxes straddling the edges."""
    x = rng.standard_normal((1, 4, 7, 9))
    rois = np.array([[0, 3, 3, 3, 3], [0, 5, 5, 2, 2], [0, 2.5, 2.5, 2.6, 2.6],
                     [0, -3, -3, -1, -1], [0, 8.9, 6.9, 12, 12], [0, 0, 0, 9, 7],
                     [0, -1, -1, 0, 0], [0, 8, 6, 8, 6], [0, 0, 3, 9, 3]], np.float64)
    for sr in (-1, 2):
        _check_all_ops(backend, x, rois, 2, 2, sr)


def test_rois_far_outside_give_zeros(backend, rng):
    x = rng.standard_normal((1, 4, 7, 9))
    rois = np.array([[0, -50, -50, -10, -10], [0, 30, 2, 60, 5], [0, 2, 30, 5, 90],
                     [0, -1e5, 0, -1e4, 7], [0, 1e7, 1e7, 2e7, 2e7]], np.float64)
    _check_all_ops(backend, x, rois, 2, 2)
    A = backend.asnumpy
    X, R = backend.asarray([x, rois])
    assert not A(fastnorm.roi_align(X, R, 2)).any()
    assert not A(fastnorm.roi_pool(X, R, 2)).any()


def test_huge_rois_hit_the_sample_cap(backend, rng):
    """RoIs far bigger than the map: the sample grid is capped at 2 L + 64 per axis (the oracle
    caps it too), results stay finite and match; the float32 path stays finite."""
    x = rng.standard_normal((2, 4, 8, 6))
    rois = np.array([[0, -1e30, -1e30, 1e30, 1e30], [0, -1e6, -1e6, 1e6, 1e6],
                     [0, 0, 0, 1e4, 1e4], [1, -1, -1, 1000, 700], [1, -300, 2, 400, 5],
                     [0, 3, -2000, 4, 3000]], np.float64)
    _check_all_ops(backend, x, rois, 2, 2, -1)
    _check_all_ops(backend, x, rois, 2, 2, 10**6)
    X, R = backend.asarray([x.astype(np.float32), rois.astype(np.float32)])
    A = backend.asnumpy
    for mode in ("avg", "max"):
        assert np.isfinite(A(fastnorm.roi_align(X, R, 7, 1.0, -1, mode=mode))).all()
    assert np.isfinite(A(fastnorm.roi_align(X, R, 7, 1.0, 10**6))).all()
    assert np.isfinite(A(fastnorm.roi_pool(X, R, 7))).all()
    assert np.isfinite(A(fastnorm.deform_roi_pool(X, R, None, 7))).all()
    G = backend.asarray(np.ones((6, 4, 7, 7), np.float32))
    for det in (False, True):
        assert np.isfinite(A(fastnorm.roi_align_backward(G, R, x.shape, 7,
                                                         deterministic=det))).all()


def test_inputs_not_modified(backend, rng):
    x, rois = _case(rng, "float32")
    off = rng.normal(0, 0.3, (25, 2, 2, 2)).astype(np.float32)
    g = np.ones((rois.shape[0], 5, 2, 2), np.float32)
    X, R, O, G = backend.asarray([x, rois, off, g])
    fastnorm.roi_align(X, R, 2)
    fastnorm.roi_align_backward(G, R, x.shape, 2, mode="max", x=X)
    fastnorm.roi_align_backward(G, R, x.shape, 2, mode="max", x=X, deterministic=True)
    fastnorm.roi_pool_backward(G, R, x.shape, 2, x=X)
    fastnorm.deform_roi_pool_backward(G, X, R, O, 2)
    for a, b in ((X, x), (R, rois), (O, off), (G, g)):
        assert np.array_equal(backend.asnumpy(a), b)


# ---------------------------------------------------------------- bad input

def test_bad_batch_indices(backend):
    x = backend.asarray(np.zeros((2, 1, 4, 4), np.float32))
    g = backend.asarray(np.zeros((1, 1, 2, 2), np.float32))
    for b in (2, -1, 0.5, np.nan, np.inf):
        rois = backend.asarray(np.array([[b, 0, 0, 1, 1]], np.float32))
        for f in (lambda: fastnorm.roi_align(x, rois, 2),
                  lambda: fastnorm.roi_pool(x, rois, 2),
                  lambda: fastnorm.ps_roi_align(x, rois, 1),
                  lambda: fastnorm.deform_roi_pool(x, rois, None, 2),
                  lambda: fastnorm.roi_align_backward(g, rois, (2, 1, 4, 4), 2),
                  lambda: fastnorm.roi_align_backward(g, rois, (2, 1, 4, 4), 2,
                                                      deterministic=True),
                  lambda: fastnorm.roi_pool_backward(g, rois, (2, 1, 4, 4), 2, x=x,
                                                     deterministic=True)):
            with pytest.raises(ValueError, match="`rois`"):
                f()
    r4 = backend.asarray(np.zeros((1, 4), np.float32))
    with pytest.raises(ValueError, match="`rois`"):
        fastnorm.roi_align(x, [r4] * 3, 2)
    # many RoIs, the bad one past the first 1024 (CUDA: the check's one block loops over them),
    # axis-aligned and rotated (a row stride of 5 and of 6), in every dtype
    for dtype in backend.floats:
        dt = _dtype(dtype)
        xd = backend.asarray(np.zeros((2, 1, 4, 4), dt))
        for width, f in ((5, fastnorm.roi_align), (6, fastnorm.roi_align_rotated)):
            many = np.zeros((2500, width), dt)
            many[:, 0] = np.arange(2500) % 2
            many[:, 3:5] = 1
            assert f(xd, backend.asarray(many), 2).shape == (2500, 1, 2, 2)
            many[2300, 0] = 2
            with pytest.raises(ValueError, match="`rois`"):
                f(xd, backend.asarray(many), 2)


def test_bad_arguments(backend):
    A = backend.asarray
    x = A(np.zeros((1, 4, 4, 4), np.float32))
    r = A(np.array([[0, 0, 0, 1, 1]], np.float32))
    g = A(np.zeros((1, 4, 2, 2), np.float32))
    with pytest.raises(ValueError, match="`rois`"):
        fastnorm.roi_align(x, r[:, 1:], 2)
    with pytest.raises(ValueError, match="`rois`"):
        fastnorm.roi_align(x, [r], 2)
    with pytest.raises(TypeError, match="`rois`"):
        fastnorm.roi_align(x, A(np.array([[0, 0, 0, 1, 1]], np.float64)), 2)
    with pytest.raises(TypeError, match="`rois`"):
        fastnorm.roi_align(x, [A(np.zeros((1, 4), np.float64))], 2)
    with pytest.raises(TypeError, match="`x`"):
        fastnorm.roi_align(A(np.zeros((1, 4, 4, 4), np.int32)), r, 2)
    if not backend.is_cuda:             # half types exist on CUDA only
        with pytest.raises(TypeError, match="`x`"):
            fastnorm.roi_align(x.astype(np.float16), r.astype(np.float16), 2)
    else:                               # no implicit host <-> device transfers
        with pytest.raises(TypeError, match="`rois`"):
            fastnorm.roi_align(x, np.array([[0, 0, 0, 1, 1]], np.float32), 2)
    with pytest.raises(ValueError, match="`x`"):
        fastnorm.roi_align(x[0], r, 2)
    with pytest.raises(ValueError, match="`output_size`"):
        fastnorm.roi_align(x, r, 0)
    with pytest.raises(ValueError, match="`mode`"):
        fastnorm.roi_align(x, r, 2, mode="sum")
    with pytest.raises(ValueError, match="`spatial_scale`"):
        fastnorm.roi_align(x, r, 2, np.nan)
    with pytest.raises(ValueError, match="`sampling_ratio`"):
        fastnorm.roi_align(x, r, 2, 1.0, 2**31)
    with pytest.raises(ValueError, match="`x`"):
        fastnorm.roi_align_backward(g, r, (1, 4, 4, 4), 2, mode="max")
    with pytest.raises(ValueError, match="`grad_out`"):
        fastnorm.roi_align_backward(A(np.zeros((1, 4, 3, 2), np.float32)), r, (1, 4, 4, 4), 2)
    with pytest.raises(ValueError, match="`grad_out`"):
        fastnorm.roi_align_backward(g, r, (1, 4, 4, 4), 2, channels_last=True)
    with pytest.raises(ValueError, match="`input_shape`"):
        fastnorm.roi_align_backward(g, r, (1, 4, 4), 2)
    with pytest.raises(TypeError, match="required keyword-only argument: 'x'"):
        fastnorm.roi_pool_backward(g, r, (1, 4, 4, 4), 2)    # the argmax is recomputed from x
    with pytest.raises(ValueError, match="`x`"):
        fastnorm.ps_roi_align(x, r, 3)
    with pytest.raises(ValueError, match="`input_shape`"):
        fastnorm.ps_roi_align_backward(g, r, (1, 4, 4, 4), 3)
    with pytest.raises(ValueError, match="`offset`"):
        fastnorm.deform_roi_pool(x, r, A(np.zeros((1, 2, 3, 3), np.float32)), 2)
    with pytest.raises(ValueError, match="`mask`"):
        fastnorm.deform_roi_pool(x, r, None, 2, mask=A(np.zeros((1, 2, 2, 2), np.float32)))
    with pytest.raises(TypeError, match="`offset`"):
        fastnorm.deform_roi_pool(x, r, A(np.zeros((1, 2, 2, 2))), 2)
    with pytest.raises(TypeError, match="`grad_out`"):
        fastnorm.deform_roi_pool_backward(A(np.zeros((1, 4, 2, 2))), x, r, None, 2)


def test_huge_bins_average_accurately(backend, monkeypatch):
    """A bin of 66 x (2**18 + 64) = 1.7e7 > 2**24 samples of a map of ones averages to 1 in
    float32 (the forward, and the mask gradient of deformable pooling, which is the same
    average). CUDA once summed a bin's samples in one float, which stops growing at 2**24 (0.97
    here; 0.48 at twice the width): the sums now go row by row. Single-thread launches: the
    emulator's reverse-order re-run is skipped (nothing to race, half the time)."""
    monkeypatch.setenv("FASTNORM_EMULATOR_RACECHECK", "0")
    W = 2**17
    X = backend.asarray(np.ones((1, 1, 1, W), np.float32))
    R = backend.asarray(np.array([[0, 0, 0, W, 1]], np.float32))
    RA = backend.asarray(np.array([[0, 0.5, 0.5, W + 0.5, 1.5]], np.float32))   # aligned
    one = backend.asarray(np.ones((1, 1, 1, 1), np.float32))
    sr = 2**31 - 1                      # the cap binds: 2 H + 64 rows, 2 W + 64 columns
    _, _, gm = fastnorm.deform_roi_pool_backward(one, X, RA, None, 1, 1.0, sr, mask=one)
    for y in (fastnorm.roi_align(X, R, 1, 1.0, sr), gm):
        np.testing.assert_allclose(backend.asnumpy(y), 1, rtol=1e-4)


# ---------------------------------------------------------------- 64-bit sample counts

@pytest.mark.slow
def test_sample_count_beyond_int32(backend, request, monkeypatch):
    """A bin of 66 x (2**25 + 64) > 2**31 samples (a 1 x 2**24 map, RoI over all of it, the
    largest sampling_ratio: the cap 2 L + 64 per axis binds). CUDA once counted them in an int:
    the count wrapped negative and the bin came out 0. Slow (~2.2e9 samples in one thread):
    runs with ``pytest -m slow`` or FASTNORM_SLOW=1, on the emulator without its reverse-order
    re-run (one thread: nothing to race)."""
    expr = request.config.getoption("markexpr") or ""
    if os.environ.get("FASTNORM_SLOW") != "1" and ("slow" not in expr or "not slow" in expr):
        pytest.skip("2.2e9 samples in one thread: run with `pytest -m slow` or FASTNORM_SLOW=1")
    W = 2**24
    x = np.ones((1, 1, 1, W), np.float32)
    rois = np.array([[0, 0, 0, W, 1]], np.float32)
    monkeypatch.setenv("FASTNORM_EMULATOR_RACECHECK", "0")
    y = backend.asnumpy(fastnorm.roi_align(backend.asarray(x), backend.asarray(rois), 1, 1.0,
                                           2**31 - 1, mode="max"))
    np.testing.assert_allclose(y, 1, rtol=1e-6)


# ---------------------------------------------------------------- rotated RoIAlign

DEG = np.pi / 180


def _rcase(rng, dtype, N=2, C=4, H=11, W=14, K=30, scale=0.5):
    """x and rotated rois (K, 6) in `dtype` (rounded to it: the oracles take these values)."""
    x = rng.standard_normal((N, C, H, W)).astype(_dtype(dtype))
    rois = ref.random_rotated_rois(rng, K, N, H, W, scale).astype(_dtype(dtype))
    return x, rois


def _check_roi_align_rotated(backend, rng, dtype, aligned, sr, spatial_scale=0.5, **case):
    """Forward and backward (atomics and deterministic) vs the oracle, degrees counter-clockwise
    and the same RoIs as clockwise radians (mmcv's convention)."""
    x, rois = _rcase(rng, dtype, scale=spatial_scale, **case)
    PH, PW = int(rng.integers(1, 5)), int(rng.integers(1, 5))
    args = ((PH, PW), spatial_scale, sr, aligned)
    r64 = _f64(rois)
    want = ref.roi_align_rotated(_f64(x), r64, PH, PW, spatial_scale, sr, aligned, DEG)
    g = rng.standard_normal(want.shape).astype(x.dtype)
    gwant = ref.roi_align_rotated_backward(_f64(g), r64, x.shape, PH, PW, spatial_scale, sr,
                                           aligned, DEG)
    rad = rois.copy()
    rad[:, 5] = (-r64[:, 5] * DEG).astype(x.dtype)
    rwant = ref.roi_align_rotated(_f64(x), _f64(rad), PH, PW, spatial_scale, sr, aligned, -1.0)
    X, R, RR, G = backend.asarray([x, rois, rad, g])
    _close(backend, fastnorm.roi_align_rotated(X, R, *args), want, dtype)
    _close(backend, fastnorm.roi_align_rotated(X, RR, *args, clockwise=True,
                                               angle_unit="radians"), rwant, dtype)
    for det in (False, True):
        _close(backend, fastnorm.roi_align_rotated_backward(G, R, x.shape, *args,
                                                            deterministic=det), gwant, dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sr", [-1, 0, 1, 2, 3])
def test_roi_align_rotated_matches_oracle(backend, rng, dtype, aligned, sr):
    s = float(rng.choice([1.0, 0.5, 0.25]))
    _check_roi_align_rotated(backend, rng, dtype, aligned, sr, spatial_scale=s)


@pytest.mark.parametrize("dtype", HALF)
def test_roi_align_rotated_half_types_match_oracle(cuda_backend, rng, dtype):
    for aligned, sr in ((True, 2), (False, -1)):
        _check_roi_align_rotated(cuda_backend, rng, dtype, aligned, sr, N=3, K=40)


def test_roi_align_rotated_several_images(backend, rng):
    """Many RoIs per image on bigger planes (several row blocks per plane in CUDA's
    deterministic backward)."""
    _check_roi_align_rotated(backend, rng, "float32", True, 2, N=3, C=3, H=29, W=23, K=90)
    _check_roi_align_rotated(backend, rng, "float64", False, -1, N=3, C=2, H=37, W=19, K=60)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sr", [-1, 2])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_roi_align_rotated_at_angle_zero_is_roi_align(backend, rng, aligned, sr, dtype):
    """Angle 0 (and 360) is roi_align on the box [cx - w/2, cy - h/2, cx + w/2, cy + h/2],
    forward and backward. Without aligned, sizes below 1 are clamped about the centre (roi_align
    clamps about the top-left corner): the box is then 1 pixel, centred."""
    x, r = _rcase(rng, "float64", K=40)
    # sizes whose adaptive grids ceil(size * 0.5 / P) are not at a step (the two compute the
    # size differently in float32: one rounding could change the grid); a quarter are tiny
    for col, P in ((3, 2), (4, 3)):
        r[:, col] = (rng.integers(1, 6, len(r)) + rng.uniform(0.1, 0.9, len(r))) * P / 0.5
        r[::4, col] = rng.uniform(0, 2, len(r[::4]))
    r[:, 5] = rng.choice([0.0, 360.0, -720.0], len(r))
    half = r[:, 3:5] / 2 if aligned else np.maximum(r[:, 3:5] * 0.5, 1) / 0.5 / 2
    boxes = np.c_[r[:, 0], r[:, 1:3] - half, r[:, 1:3] + half]
    g = rng.standard_normal((len(r), x.shape[1], 3, 2))
    X, R, B, G = backend.asarray([x.astype(dtype), r.astype(dtype), boxes.astype(dtype),
                                  g.astype(dtype)])
    args = ((3, 2), 0.5, sr, aligned)
    a = fastnorm.roi_align_rotated(X, R, *args)
    b = fastnorm.roi_align(X, B, *args)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == "float64" else TOL[dtype]
    _close(backend, a, _f64(backend.asnumpy(b)), dtype, tol)
    ga = fastnorm.roi_align_rotated_backward(G, R, x.shape, *args)
    gb = fastnorm.roi_align_backward(G, B, x.shape, *args)
    _close(backend, ga, _f64(backend.asnumpy(gb)), dtype, tol)


def test_roi_align_rotated_angle_conventions(backend, rng):
    """clockwise negates the angle, radians = degrees * pi / 180, a turn changes nothing, and a
    quarter turn of a square RoI with sampling_ratio 1 reads the bins rotated."""
    x, r = _rcase(rng, "float64", K=20)
    X, R = backend.asarray([x, r])
    A = backend.asnumpy
    f = fastnorm.roi_align_rotated
    base = A(f(X, R, 3, 0.5, 2))
    neg = r.copy()
    neg[:, 5] *= -1
    rad = r.copy()
    rad[:, 5] *= DEG
    turn = r.copy()
    turn[:, 5] += 360
    N = backend.asarray(neg)
    np.testing.assert_array_equal(A(f(X, N, 3, 0.5, 2, clockwise=True)), base)
    np.testing.assert_allclose(A(f(X, backend.asarray(rad), 3, 0.5, 2, angle_unit="radians")),
                               base, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(A(f(X, backend.asarray(turn), 3, 0.5, 2)), base, rtol=1e-10,
                               atol=1e-10)
    # a quarter turn of the 2 x 2 RoI centred on pixel (1.5, 1.5) of x[i, j] = 4 i + j, one
    # sample per bin: counter-clockwise (detectron2) local +x (bin column) points up the map (-y)
    x = np.arange(16.0).reshape(1, 1, 4, 4)
    sq = backend.asarray(np.array([[0, 2, 2, 2, 2, 90]], np.float64))
    X = backend.asarray(x)
    np.testing.assert_array_equal(A(f(X, sq, 2, 1.0, 1))[0, 0], [[9, 5], [10, 6]])
    np.testing.assert_array_equal(A(f(X, sq, 2, 1.0, 1, clockwise=True))[0, 0], [[6, 10], [5, 9]])


def test_roi_align_rotated_backward_matches_finite_differences(backend, rng):
    """float64: the gradient is the derivative of the computed forward (finite differences on
    x), and the oracle's gradient is the derivative of the oracle's forward."""
    x, r = _rcase(rng, "float64", N=2, C=2, H=6, W=7, K=6, scale=1.0)
    g = rng.standard_normal((6, 2, 2, 3))
    X, R, G = backend.asarray([x, r, g])
    for aligned, sr in ((True, 2), (False, -1), (True, 0)):
        args = ((2, 3), 1.0, sr, aligned)
        got = backend.asnumpy(fastnorm.roi_align_rotated_backward(G, R, x.shape, *args))

        def fwd():
            return float((backend.asnumpy(fastnorm.roi_align_rotated(backend.asarray(x), R,
                                                                     *args)) * g).sum())
        np.testing.assert_allclose(got, _fd(fwd, x), rtol=1e-7, atol=1e-7)
        num = _fd(lambda: float((ref.roi_align_rotated(x, r, 2, 3, 1.0, sr, aligned, DEG)
                                 * g).sum()), x)
        np.testing.assert_allclose(ref.roi_align_rotated_backward(g, r, x.shape, 2, 3, 1.0, sr,
                                                                  aligned, DEG), num,
                                   rtol=1e-7, atol=1e-7)


def test_roi_align_rotated_backward_is_adjoint(backend, rng):
    """<grad_x, dx> == <g, f(dx)> on a larger random case (float64)."""
    x, r = _rcase(rng, "float64", N=3, C=5, H=23, W=31, K=60, scale=0.25)
    g = rng.standard_normal((60, 5, 7, 7))
    X, R, G = backend.asarray([x, r, g])
    for sr, al in ((-1, False), (2, True), (0, True)):
        for det in (False, True):
            y = backend.asnumpy(fastnorm.roi_align_rotated(X, R, 7, 0.25, sr, al))
            gx = backend.asnumpy(fastnorm.roi_align_rotated_backward(G, R, x.shape, 7, 0.25, sr,
                                                                     al, deterministic=det))
            lhs = (g * y).sum()
            assert abs(lhs - (gx * x).sum()) < 1e-10 * max(1, abs(lhs))
            assert np.abs(gx).max() > 0


def test_roi_align_rotated_deterministic_backward(cuda_backend, rng):
    """CUDA: deterministic=True takes the tiled kernels, agrees with the atomics to
    rounding and gives the same bits on every run."""
    x, r = _rcase(rng, "float32", N=3, C=4, H=20, W=24, K=80)
    g = rng.standard_normal((80, 4, 2, 3)).astype(np.float32)
    G, R = cuda_backend.asarray([g, r])

    def run(d):
        return cuda_backend.asnumpy(fastnorm.roi_align_rotated_backward(G, R, x.shape, (2, 3),
                                                                        0.5, 2, deterministic=d))
    a, b, c = run(False), run(True), run(True)
    assert np.any(a)
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    assert np.array_equal(b.view(np.uint32), c.view(np.uint32))


@pytest.mark.emulated
def test_roi_align_rotated_deterministic_backward_launches_its_own_kernel(rng):
    emu = pytest.importorskip("fastnorm._cuda.emulator")
    x, r = _rcase(rng, "float32", K=10)
    G, R = emu.asarray(rng.standard_normal((10, 4, 2, 2)).astype(np.float32)), emu.asarray(r)
    for d, want in ((False, "align_bwd<float>"), (True, "align_bwd_tile<float>")):
        with emu.counting() as c:
            fastnorm.roi_align_rotated_backward(G, R, x.shape, 2, deterministic=d)
        assert want in {k.split("::")[-1] for k in c.kernels}


def test_roi_align_rotated_across_threads(rng):
    """CPU: forward and backward bitwise identical for 1, 2 and 3 threads."""
    x, r = _rcase(rng, "float32", N=2, C=16, H=20, W=24, K=80)
    g = rng.standard_normal((80, 16, 3, 2)).astype(np.float32)
    outs = []
    for n in (1, 2, 3):
        with fastnorm.threads(n):
            outs.append((fastnorm.roi_align_rotated(x, r, (3, 2), 0.5, 2),
                         fastnorm.roi_align_rotated_backward(g, r, x.shape, (3, 2), 0.5, 2)))
    assert np.any(outs[0][1])
    for y, gx in outs[1:]:
        assert np.array_equal(y, outs[0][0]) and np.array_equal(gx, outs[0][1])


def test_roi_align_rotated_lists_equal_arrays(backend, rng):
    x = rng.standard_normal((3, 2, 9, 9))
    per = [ref.random_rotated_rois(rng, k, 1, 9, 9)[:, 1:] for k in (3, 0, 4)]
    rois = np.concatenate([np.c_[np.full(len(p), i), p] for i, p in enumerate(per)])
    g = rng.standard_normal((7, 2, 2, 2))
    X, G, P, R = backend.asarray([x, g, per, rois])
    for f in (lambda r: fastnorm.roi_align_rotated(X, r, 2, 1.0, 2),
              lambda r: fastnorm.roi_align_rotated_backward(G, r, x.shape, 2, 1.0, 2)):
        assert np.array_equal(backend.asnumpy(f(P)), backend.asnumpy(f(R)))
    np.testing.assert_allclose(backend.asnumpy(fastnorm.roi_align_rotated(X, P, 2, 1.0, 2)),
                               ref.roi_align_rotated(x, rois, 2, 2, 1.0, 2, True, DEG),
                               rtol=1e-11, atol=1e-11)


def test_roi_align_rotated_empty(backend, rng):
    x = rng.standard_normal((2, 3, 5, 5)).astype(np.float32)
    X = backend.asarray(x)
    R = backend.asarray(np.zeros((0, 6), np.float32))
    A = backend.asnumpy
    assert A(fastnorm.roi_align_rotated(X, R, (2, 3))).shape == (0, 3, 2, 3)
    assert A(fastnorm.roi_align_rotated(X, [], 2)).shape == (0, 3, 2, 2)
    assert A(fastnorm.roi_align_rotated(X, [R[:, 1:], R[:, 1:]], 2)).shape == (0, 3, 2, 2)
    G = backend.asarray(np.zeros((0, 3, 2, 2), np.float32))
    for det in (False, True):
        gx = A(fastnorm.roi_align_rotated_backward(G, R, x.shape, 2, deterministic=det))
        assert gx.shape == x.shape and gx.dtype == np.float32 and not gx.any()
    # empty maps, and an image without RoIs
    r = np.array([[1, 2, 2, 3, 2, 30]], np.float32)
    for shape in ((2, 3, 0, 5), (2, 3, 5, 0), (2, 0, 5, 5)):
        y = A(fastnorm.roi_align_rotated(backend.asarray(np.zeros(shape, np.float32)),
                                         backend.asarray(r), 2))
        assert y.shape == (1, shape[1], 2, 2) and not y.any()
        G1 = backend.asarray(np.ones((1, shape[1], 2, 2), np.float32))
        for det in (False, True):
            gx = A(fastnorm.roi_align_rotated_backward(G1, backend.asarray(r), shape, 2,
                                                       deterministic=det))
            assert gx.shape == shape and not gx.any()
    G1 = backend.asarray(np.ones((1, 3, 2, 2), np.float32))
    gx = A(fastnorm.roi_align_rotated_backward(G1, backend.asarray(r), x.shape, 2))
    assert not gx[0].any() and gx[1].any()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_roi_align_rotated_non_finite_and_negative_rois(backend, rng, bad):
    """A non-finite entry (angle included) gives zeros and no gradient; so does a negative size
    when aligned; without aligned a negative size is clamped to 1 like any size below 1."""
    x = rng.standard_normal((1, 3, 8, 8))
    ok = [0, 4, 4, 3, 2, 20]
    rows = [ok]
    for i in range(1, 6):
        r = list(ok)
        r[i] = bad
        rows.append(r)
    rows += [[0, 4, 4, -3, 2, 20], [0, 4, 4, 3, -0.5, 20]]
    rois = np.array(rows, np.float64)
    g = np.ones((len(rois), 3, 2, 2))
    X, R, G = backend.asarray([x, rois, g])
    A = backend.asnumpy
    y = A(fastnorm.roi_align_rotated(X, R, 2, 1.0, 2))
    assert y[0].all() and not y[1:].any()
    for det in (False, True):
        assert not A(fastnorm.roi_align_rotated_backward(G[1:], R[1:], x.shape, 2, 1.0, 2,
                                                         deterministic=det)).any()
    # without aligned: negative sizes clamp to 1, as a size of 1 (non-finite RoIs still zeros)
    clamp = rois[-2:].copy()
    clamp[:, 3:5] = np.maximum(clamp[:, 3:5], 1)
    y = A(fastnorm.roi_align_rotated(X, R, 2, 1.0, 2, aligned=False))
    assert not y[1:6].any()
    np.testing.assert_allclose(y[-2:], A(fastnorm.roi_align_rotated(X, backend.asarray(clamp), 2,
                                                                    1.0, 2, aligned=False)),
                               rtol=1e-13, atol=1e-13)


def test_roi_align_rotated_degenerate_and_huge_rois(backend, rng):
    """Zero width/height, points, RoIs far outside, huge RoIs whose adaptive grid hits the cap
    (2 max(H, W) + 64; the last two with samples inside the map), huge angles: the oracle, and
    finite float32 results."""
    x = rng.standard_normal((2, 2, 7, 9))
    rois = np.array([[0, 3, 3, 0, 4, 30], [0, 3, 3, 4, 0, -30], [1, 3, 3, 0, 0, 45],
                     [0, 0, 0, 2, 2, 1e6], [1, -50, -50, 10, 10, 10], [0, 4, 3, 9, 7, 90],
                     [1, 4, 3, 9, 7, -270], [0, 4, 4, 1e4, 1e4, 33], [1, 0, 0, 1e6, 5, 0],
                     [0, 4.5, 3.5, 1e30, 1e30, 12], [1, 1e7, 1e7, 10, 10, 0],
                     [0, 4, 3, 200, 150, 30], [1, 5, 2, 150, 200, -60]], np.float64)
    g = rng.standard_normal((len(rois), 2, 2, 2))
    X, R, G = backend.asarray([x, rois, g])
    A = backend.asnumpy
    for al, sr in ((True, -1), (False, -1), (True, 2), (False, 3)):
        np.testing.assert_allclose(A(fastnorm.roi_align_rotated(X, R, 2, 1.0, sr, al)),
                                   ref.roi_align_rotated(x, rois, 2, 2, 1.0, sr, al, DEG),
                                   rtol=1e-11, atol=1e-11)
        want = ref.roi_align_rotated_backward(g, rois, x.shape, 2, 2, 1.0, sr, al, DEG)
        for det in (False, True):
            np.testing.assert_allclose(A(fastnorm.roi_align_rotated_backward(
                G, R, x.shape, 2, 1.0, sr, al, deterministic=det)), want, rtol=1e-11,
                atol=1e-11)
    X32, R32 = backend.asarray([x.astype(np.float32), rois.astype(np.float32)])
    assert np.isfinite(A(fastnorm.roi_align_rotated(X32, R32, 7, 1.0, -1))).all()
    G32 = backend.asarray(np.ones((len(rois), 2, 7, 7), np.float32))
    assert np.isfinite(A(fastnorm.roi_align_rotated_backward(G32, R32, x.shape, 7))).all()


def test_roi_align_rotated_without_a_table(backend, rng):
    """A RoI whose per-sample table would be too big (here 7 x 7 bins of 100 x 100 float64
    samples: 11.8 MB) is sampled on the fly on the CPU: the same results as the oracle."""
    x = rng.standard_normal((1, 2, 9, 11))
    rois = np.array([[0, 5, 4, 8, 6, 25], [0, 5, 4, 3, 2, -60]], np.float64)
    g = rng.standard_normal((2, 2, 7, 7))
    X, R, G = backend.asarray([x, rois, g])
    A = backend.asnumpy
    np.testing.assert_allclose(A(fastnorm.roi_align_rotated(X, R, 7, 1.0, 100)),
                               ref.roi_align_rotated(x, rois, 7, 7, 1.0, 100, True, DEG),
                               rtol=1e-11, atol=1e-11)
    np.testing.assert_allclose(A(fastnorm.roi_align_rotated_backward(G, R, x.shape, 7, 1.0, 100)),
                               ref.roi_align_rotated_backward(g, rois, x.shape, 7, 7, 1.0, 100,
                                                              True, DEG), rtol=1e-11, atol=1e-11)


def test_roi_align_rotated_inputs_not_modified(backend, rng):
    x, r = _rcase(rng, "float32")
    g = np.ones((len(r), 4, 2, 2), np.float32)
    X, R, G = backend.asarray([x, r, g])
    fastnorm.roi_align_rotated(X, R, 2)
    for det in (False, True):
        fastnorm.roi_align_rotated_backward(G, R, x.shape, 2, deterministic=det)
    for a, b in ((X, x), (R, r), (G, g)):
        assert np.array_equal(backend.asnumpy(a), b)


def test_roi_align_rotated_bad_arguments(backend):
    A = backend.asarray
    x = A(np.zeros((2, 4, 4, 4), np.float32))
    r = A(np.array([[0, 1, 1, 2, 2, 30]], np.float32))
    g = A(np.zeros((1, 4, 2, 2), np.float32))
    f, fb = fastnorm.roi_align_rotated, fastnorm.roi_align_rotated_backward
    with pytest.raises(ValueError, match=r"`rois` must have shape \(K, 6\)"):
        f(x, r[:, :5], 2)
    with pytest.raises(ValueError, match=r"`rois` entry 0 must have shape \(K_0, 5\)"):
        f(x, [r[:, 1:5]], 2)
    with pytest.raises(ValueError, match=r"`rois` must have shape \(K, 6\)"):
        fb(g, r[:, :5], (2, 4, 4, 4), 2)
    for b in (2, -1, 0.5, np.nan):
        rb = A(np.array([[b, 1, 1, 2, 2, 30]], np.float32))
        with pytest.raises(ValueError, match="`rois`"):
            f(x, rb, 2)
        for det in (False, True):
            with pytest.raises(ValueError, match="`rois`"):
                fb(g, rb, (2, 4, 4, 4), 2, deterministic=det)
    with pytest.raises(ValueError, match="`rois`"):
        f(x, [r[:, 1:]] * 3, 2)
    with pytest.raises(TypeError, match="`rois`"):
        f(x, A(np.array([[0, 1, 1, 2, 2, 30]], np.float64)), 2)
    with pytest.raises(TypeError, match="`rois`"):
        fb(g, A(np.array([[0, 1, 1, 2, 2, 30]], np.float64)), (2, 4, 4, 4), 2)
    with pytest.raises(TypeError, match="`x`"):
        f(A(np.zeros((1, 4, 4, 4), np.int32)), r, 2)
    with pytest.raises(ValueError, match="`x`"):
        f(x[0], r, 2)
    with pytest.raises(ValueError, match="`angle_unit`"):
        f(x, r, 2, angle_unit="gradians")
    with pytest.raises(ValueError, match="`angle_unit`"):
        fb(g, r, (2, 4, 4, 4), 2, angle_unit="deg")
    with pytest.raises(TypeError, match="`clockwise`"):
        f(x, r, 2, clockwise="yes")
    for bad in (0, (2, 0), -1, (1, 2, 3)):
        with pytest.raises(ValueError, match="`output_size`"):
            f(x, r, bad)
    with pytest.raises(ValueError, match="`spatial_scale`"):
        f(x, r, 2, np.inf)
    with pytest.raises(ValueError, match="`grad_out`"):
        fb(A(np.zeros((1, 4, 3, 2), np.float32)), r, (2, 4, 4, 4), 2)
    with pytest.raises(ValueError, match="`input_shape`"):
        fb(g, r, (2, 4, 4), 2)


# ---------------------------------------------------------------- devices and interop

def test_arrays_on_another_device(cuda_backend, rng):
    """Every step (list concatenation, validation, transposes, kernels) runs on the arrays'
    device, not on the current one."""
    cp = cuda_backend.xp
    if cp.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs two CUDA devices")
    x, rois = _case(rng, "float32", K=12)
    want = ref.roi_align(_f64(x), _f64(rois), 2, 2, 0.5, 2, True, True)
    per = [rois[rois[:, 0] == i, 1:] for i in range(2)]
    g = rng.standard_normal((12, 5, 2, 2)).astype(np.float32)
    gwant = ref.roi_align_backward(_f64(g), _f64(rois[np.argsort(rois[:, 0], kind="stable")]),
                                   _f64(x), 2, 2, 0.5, 2, True, False)
    with cp.cuda.Device(1):
        XL, P, GL = cuda_backend.asarray([_nhwc(x), per, _nhwc(g)])
        R = cuda_backend.asarray(rois)
    with cp.cuda.Device(0):
        y = fastnorm.roi_align(XL, R, 2, 0.5, 2, True, mode="max", channels_last=True)
        gx = fastnorm.roi_align_backward(GL, P, XL.shape, 2, 0.5, 2, True, channels_last=True,
                                         deterministic=True)
    assert y.device.id == 1 and gx.device.id == 1
    np.testing.assert_allclose(cuda_backend.asnumpy(y), _nhwc(want), **TOL["float32"])
    np.testing.assert_allclose(cuda_backend.asnumpy(gx), _nhwc(gwant), **TOL["float32"])


def test_torch_round_trip(rng):
    torch = pytest.importorskip("torch")
    x, rois = _case(rng, "float32")
    y = fastnorm.roi_align(torch.from_numpy(x), torch.from_numpy(rois), 3, 0.5, 2, True)
    assert isinstance(y, torch.Tensor)
    np.testing.assert_array_equal(y.numpy(), fastnorm.roi_align(x, rois, 3, 0.5, 2, True))
    g = fastnorm.roi_align_backward(torch.ones(tuple(y.shape)), torch.from_numpy(rois), x.shape,
                                    3, 0.5, 2, True)
    assert isinstance(g, torch.Tensor) and tuple(g.shape) == x.shape


# ---------------------------------------------------------------- multi-scale RoIAlign (FPN)
# A 64 x 96 image, levels at scales 1/2 .. 1/16 (k = 1..4); canonical_scale 32 and
# canonical_level 3 put RoI sides < 16 on k 1, 16..32 on 2, 32..64 on 3, >= 64 on 4: every
# level gets RoIs, and the RoIs beyond either end are clamped.

MS_IMG = (64, 96)
MS_KW = dict(canonical_scale=32, canonical_level=3)


def _ms_case(rng, dtype, N=2, C=3, K=40, levels=4, kmin=1, channels_last=False):
    """(features, rois, scales): a pyramid in `dtype` and RoIs spanning every level."""
    scales = [2.0 ** -(kmin + i) for i in range(levels)]
    feats = [rng.standard_normal((N, C, int(MS_IMG[0] * s), int(MS_IMG[1] * s)))
             .astype(_dtype(dtype)) for s in scales]
    rois = ref.pyramid_rois(rng, K, N, *MS_IMG, s0=MS_KW["canonical_scale"],
                            k0=MS_KW["canonical_level"]).astype(_dtype(dtype))
    return feats, rois, scales


def _ms_levels(rois, scales, s0=32, k0=3):
    kmin = int(round(-np.log2(scales[0])))
    return [ref.fpn_level(r, k0, s0, kmin, kmin + len(scales) - 1) for r in _f64(rois)]


def _check_msra(backend, rng, dtype, aligned, sr, channels_last=False, **case):
    feats, rois, scales = _ms_case(rng, dtype, **case)
    PH, PW = int(rng.integers(1, 5)), int(rng.integers(1, 5))
    f64 = [_f64(f) for f in feats]
    r64 = _f64(rois)
    want = ref.multi_scale_roi_align(f64, r64, PH, PW, scales, 32, 3, sr, aligned)
    g = rng.standard_normal(want.shape).astype(feats[0].dtype)
    gwant = ref.multi_scale_roi_align_backward(_f64(g), r64, f64, PH, PW, scales, 32, 3, sr,
                                               aligned)
    kw = dict(spatial_scales=scales, sampling_ratio=sr, aligned=aligned, **MS_KW)
    if channels_last:
        feats, g = [_nhwc(f) for f in feats], _nhwc(g)
        want, gwant = _nhwc(want), [_nhwc(a) for a in gwant]
    F, R, G = backend.asarray([feats, rois, g])
    kw["channels_last"] = channels_last
    _close(backend, fastnorm.multi_scale_roi_align(F, R, (PH, PW), **kw), want, dtype)
    for det in (False, True):
        grads = fastnorm.multi_scale_roi_align_backward(G, R, [f.shape for f in feats],
                                                        (PH, PW), deterministic=det, **kw)
        assert isinstance(grads, list) and len(grads) == len(feats)
        for got, w in zip(grads, gwant):
            _close(backend, got, w, dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sr", [-1, 2])
@pytest.mark.parametrize("channels_last", [False, True])
def test_multi_scale_roi_align_matches_oracle(backend, rng, dtype, aligned, sr, channels_last):
    _check_msra(backend, rng, dtype, aligned, sr, channels_last)


def test_multi_scale_roi_align_every_level_used(rng):
    """The random cases reach every level, and both clamps."""
    _, rois, scales = _ms_case(rng, "float64", K=40)
    kmin = int(round(-np.log2(scales[0])))
    raw = [np.floor(3 + np.log2(np.sqrt((r[3] - r[1]) * (r[4] - r[2])) / 32) + 1e-6)
           for r in rois]
    assert set(_ms_levels(rois, scales)) == {1, 2, 3, 4}
    assert min(raw) < kmin and max(raw) > kmin + 3


@pytest.mark.parametrize("levels,kmin", [(1, 2), (2, 1), (3, 0), (5, 1)])
def test_multi_scale_roi_align_level_counts(backend, rng, levels, kmin):
    """One level (no mapping: every RoI there, as torchvision), and pyramids of 2..5 levels
    starting at other scales (1, 1/2)."""
    if levels == 5:
        feats, rois, scales = _ms_case(rng, "float64", levels=4, kmin=kmin)
        scales = scales + [scales[-1] / 2]
        feats = feats + [rng.standard_normal((2, 3, 2, 3))]
    else:
        feats, rois, scales = _ms_case(rng, "float64", levels=levels, kmin=kmin)
    want = ref.multi_scale_roi_align(feats, rois, 3, 2, scales, 32, 3, 2, True)
    g = rng.standard_normal(want.shape)
    gwant = ref.multi_scale_roi_align_backward(g, rois, feats, 3, 2, scales, 32, 3, 2, True)
    F, R, G = backend.asarray([feats, rois, g])
    kw = dict(spatial_scales=scales, **MS_KW)
    _close(backend, fastnorm.multi_scale_roi_align(F, R, (3, 2), **kw), want, "float64")
    for got, w in zip(fastnorm.multi_scale_roi_align_backward(G, R, [f.shape for f in feats],
                                                              (3, 2), **kw), gwant):
        _close(backend, got, w, "float64")


@pytest.mark.parametrize("dtype", HALF)
def test_multi_scale_roi_align_half_types(cuda_backend, rng, dtype):
    """float16/bfloat16 (levels computed in float32: a half area overflows past 65504)."""
    _check_msra(cuda_backend, rng, dtype, True, 2)
    _check_msra(cuda_backend, rng, dtype, False, -1, channels_last=True)


def test_multi_scale_roi_align_default_pyramid(backend, rng):
    """Defaults: scales 1/4 .. (FPN P2..), canonical 224 / level 4, sampling_ratio 2, aligned;
    boxes of side exactly 224 * 2**j sit on level 4 + j (the 1e-6 of LevelMapper)."""
    feats = [rng.standard_normal((1, 2, 256 >> i, 256 >> i)) for i in range(4)]
    sides = [28.0, 56.0, 111.9, 112.0, 224.0, 447.0, 448.0, 896.0, 5.0, 1000.0]
    rois = np.array([[0, 10, 20, 10 + s, 20 + s] for s in sides])
    # 224 less 2 float32 ulps: log2(side / 224) = -2e-7, level 4 only thanks to the 1e-6
    below = float(np.nextafter(np.nextafter(np.float32(224), 0), 0))
    rois = np.r_[rois, [[0, 0, 0, below, below]]]
    assert np.floor(4 + np.log2(below / 224)) == 3
    scales = [0.25, 0.125, 0.0625, 0.03125]
    assert [ref.fpn_level(r, 4, 224, 2, 5) for r in rois] == [2, 2, 2, 3, 4, 4, 5, 5, 2, 5, 4]
    want = ref.multi_scale_roi_align(feats, rois, 7, 7, scales, 224, 4, 2, True)
    F, R = backend.asarray([feats, rois])
    _close(backend, fastnorm.multi_scale_roi_align(F, R, 7), want, "float64")
    for dt in ("float32",):
        F32, R32 = backend.asarray([[f.astype(dt) for f in feats], rois.astype(dt)])
        _close(backend, fastnorm.multi_scale_roi_align(F32, R32, 7), want, dt)


def test_multi_scale_roi_align_backward_finite_differences(backend, rng):
    """float64: the gradients are the derivatives of the computed forward (central differences
    at 12 elements of each level, where the oracle's gradient is largest and at random), and
    the oracle's are those of the oracle's forward (every element)."""
    feats, rois, scales = _ms_case(rng, "float64", N=1, C=1, K=30)
    g = rng.standard_normal((30, 1, 2, 3))
    kw = dict(spatial_scales=scales, **MS_KW)
    R, G = backend.asarray([rois, g])
    for aligned, sr in ((True, 2), (False, -1)):
        grads = backend.asnumpy(fastnorm.multi_scale_roi_align_backward(
            G, R, [f.shape for f in feats], (2, 3), sampling_ratio=sr, aligned=aligned, **kw))
        want = ref.multi_scale_roi_align_backward(g, rois, feats, 2, 3, scales, 32, 3, sr,
                                                  aligned)

        def fwd():
            y = fastnorm.multi_scale_roi_align(backend.asarray(feats), R, (2, 3),
                                               sampling_ratio=sr, aligned=aligned, **kw)
            return float((backend.asnumpy(y) * g).sum())
        for i, f in enumerate(feats):
            assert np.abs(want[i]).max() > 0
            flat, eps = f.reshape(-1), 1e-6
            pick = np.r_[np.argsort(-np.abs(want[i]).reshape(-1))[:8],
                         rng.integers(0, flat.size, 4)]
            for j in pick:
                old = flat[j]
                flat[j] = old + eps
                fp = fwd()
                flat[j] = old - eps
                fm = fwd()
                flat[j] = old
                assert abs(grads[i].reshape(-1)[j] - (fp - fm) / (2 * eps)) < 1e-7
            np.testing.assert_allclose(grads[i], want[i], rtol=1e-11, atol=1e-11)
            if i == 0:
                small = [a[:, :, :5, :6].copy() for a in feats]     # the oracle, everywhere
                num = _fd(lambda: float((ref.multi_scale_roi_align(
                    small, rois, 2, 3, scales, 32, 3, sr, aligned) * g).sum()), small[0])
                np.testing.assert_allclose(ref.multi_scale_roi_align_backward(
                    g, rois, small, 2, 3, scales, 32, 3, sr, aligned)[0], num, rtol=1e-7,
                    atol=1e-7)


def test_multi_scale_roi_align_backward_is_adjoint(backend, rng):
    feats, rois, scales = _ms_case(rng, "float64", N=3, C=5, K=80)
    g = rng.standard_normal((80, 5, 7, 7))
    F, R, G = backend.asarray([feats, rois, g])
    kw = dict(spatial_scales=scales, **MS_KW)
    for sr, al in ((-1, False), (2, True), (0, True)):
        for det in (False, True):
            y = backend.asnumpy(fastnorm.multi_scale_roi_align(F, R, 7, sampling_ratio=sr,
                                                               aligned=al, **kw))
            gs = backend.asnumpy(fastnorm.multi_scale_roi_align_backward(
                G, R, [f.shape for f in feats], 7, sampling_ratio=sr, aligned=al,
                deterministic=det, **kw))
            lhs = (g * y).sum()
            rhs = sum((a * f).sum() for a, f in zip(gs, feats))
            assert abs(lhs - rhs) < 1e-10 * max(1, abs(lhs))
            assert all(np.abs(a).max() > 0 for a in gs)


def test_multi_scale_roi_align_lists_equal_arrays(backend, rng):
    feats, rois, scales = _ms_case(rng, "float64", N=3, K=30)
    order = np.argsort(rois[:, 0], kind="stable")
    rois = rois[order]
    per = [rois[rois[:, 0] == i, 1:] for i in range(3)]
    g = rng.standard_normal((30, 3, 2, 2))
    F, P, R, G = backend.asarray([feats, per, rois, g])
    kw = dict(spatial_scales=scales, **MS_KW)
    A = backend.asnumpy
    assert np.array_equal(A(fastnorm.multi_scale_roi_align(F, P, 2, **kw)),
                          A(fastnorm.multi_scale_roi_align(F, R, 2, **kw)))
    shapes = [f.shape for f in feats]
    for a, b in zip(A(fastnorm.multi_scale_roi_align_backward(G, P, shapes, 2, **kw)),
                    A(fastnorm.multi_scale_roi_align_backward(G, R, shapes, 2, **kw))):
        assert np.array_equal(a, b)


def test_multi_scale_roi_align_empty(backend, rng):
    """K = 0 (array, empty list, lists of empties), levels without RoIs, empty maps."""
    feats, rois, scales = _ms_case(rng, "float32", K=4)
    kw = dict(spatial_scales=scales, **MS_KW)
    F = backend.asarray(feats)
    A = backend.asnumpy
    shapes = [f.shape for f in feats]
    R0 = backend.asarray(np.zeros((0, 5), np.float32))
    for r in (R0, [], [R0[:, 1:], R0[:, 1:]]):
        y = A(fastnorm.multi_scale_roi_align(F, r, (2, 3), **kw))
        assert y.shape == (0, 3, 2, 3) and y.dtype == np.float32
        gs = A(fastnorm.multi_scale_roi_align_backward(
            backend.asarray(np.zeros((0, 3, 2, 3), np.float32)), r, shapes, (2, 3), **kw))
        assert [a.shape for a in gs] == shapes and not any(a.any() for a in gs)
    FL = backend.asarray([_nhwc(f) for f in feats])
    y = A(fastnorm.multi_scale_roi_align(FL, R0, (2, 3), channels_last=True, **kw))
    assert y.shape == (0, 2, 3, 3)
    # one RoI: three levels have none (zero gradients there)
    r1 = backend.asarray(np.array([[1, 5, 5, 40, 40]], np.float32))     # side 35: level 3
    g1 = backend.asarray(np.ones((1, 3, 2, 2), np.float32))
    gs = A(fastnorm.multi_scale_roi_align_backward(g1, r1, shapes, 2, **kw))
    assert [bool(a.any()) for a in gs] == [False, False, True, False]
    assert not gs[2][0].any() and gs[2][1].any()
    # empty maps: zeros of the right shapes
    E = backend.asarray([np.zeros((2, 3, 0, 5), np.float32)] * 2)
    y = A(fastnorm.multi_scale_roi_align(E, r1, 2, spatial_scales=[0.5, 0.25]))
    assert y.shape == (1, 3, 2, 2) and not y.any()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_multi_scale_roi_align_non_finite_and_inverted_rois(backend, rng, bad):
    """Non-finite RoIs and boxes inverted along one axis (negative area: a NaN level) give
    zeros and no gradient, as torchvision; inverted along both axes (positive area) is pooled
    like any RoI on its level; zero-area RoIs go to the first level."""
    feats, _, scales = _ms_case(rng, "float64", N=1, K=1)
    rois = np.array([[0, 4, 4, 40, 30], [0, 4, bad, 40, 30], [0, 4, 4, bad, 30],
                     [0, 40, 4, 4, 30], [0, 4, 30, 40, 4], [0, 40, 30, 4, 4],
                     [0, 8, 8, 8, 30], [0, 8, 8, 8, 8]], np.float64)
    levels = _ms_levels(rois, scales)
    assert levels[3:5] == [None, None] and levels[5] == 2 and levels[6:] == [1, 1]
    g = np.ones((len(rois), 3, 2, 2))
    F, R, G = backend.asarray([feats, rois, g])
    kw = dict(spatial_scales=scales, **MS_KW)
    A = backend.asnumpy
    for al in (True, False):
        y = A(fastnorm.multi_scale_roi_align(F, R, 2, aligned=al, **kw))
        assert np.isfinite(y).all() and y[0].any() and not y[1:5].any()
        np.testing.assert_allclose(y, ref.multi_scale_roi_align(feats, rois, 2, 2, scales, 32,
                                                                3, 2, al), rtol=1e-12,
                                   atol=1e-12)
        gs = A(fastnorm.multi_scale_roi_align_backward(G[1:5], R[1:5], [f.shape for f in feats],
                                                       2, aligned=al, **kw))
        assert not any(a.any() for a in gs)


def test_multi_scale_roi_align_across_threads(rng):
    """CPU: forward and backward bitwise identical for 1 and 2 threads."""
    feats, rois, scales = _ms_case(rng, "float32", N=2, C=16, K=60)
    g = rng.standard_normal((60, 16, 3, 2)).astype(np.float32)
    kw = dict(spatial_scales=scales, **MS_KW)
    outs = []
    for n in (1, 2):
        with fastnorm.threads(n):
            outs.append((fastnorm.multi_scale_roi_align(feats, rois, (3, 2), **kw),
                         fastnorm.multi_scale_roi_align_backward(
                             g, rois, [f.shape for f in feats], (3, 2), **kw)))
    assert np.array_equal(outs[0][0], outs[1][0])
    assert all(np.array_equal(a, b) for a, b in zip(outs[0][1], outs[1][1]))


def test_multi_scale_roi_align_deterministic_cuda(cuda_backend, rng):
    feats, rois, scales = _ms_case(rng, "float32", N=3, C=4, K=80)
    g = rng.standard_normal((80, 4, 2, 3)).astype(np.float32)
    G, R = cuda_backend.asarray([g, rois])
    kw = dict(spatial_scales=scales, **MS_KW)

    def run(d):
        return cuda_backend.asnumpy(fastnorm.multi_scale_roi_align_backward(
            G, R, [f.shape for f in feats], (2, 3), deterministic=d, **kw))
    a, b, c = run(False), run(True), run(True)
    for u, v, w in zip(a, b, c):
        assert np.any(u)
        np.testing.assert_allclose(v, u, rtol=1e-5, atol=1e-5)
        assert np.array_equal(v.view(np.uint32), w.view(np.uint32))


@pytest.mark.emulated
def test_multi_scale_roi_align_launches_per_level(rng):
    """CUDA: the batch-index check, the levels (fpn_levels), one roi_align launch per level over
    all the RoIs, and nothing else: no device operation, no read-back besides the check's. The
    atomic backward likewise (one align_bwd per level; its gradients' zero fills besides)."""
    emu = pytest.importorskip("fastnorm._cuda.emulator")
    feats, rois, scales = _ms_case(rng, "float32", K=40)
    F, R = [emu.asarray(f) for f in feats], emu.asarray(rois)
    kw = dict(spatial_scales=scales, **MS_KW)
    with emu.counting() as c0:
        fastnorm.roi_align(F[0], R, 2)
    with emu.counting() as c:
        fastnorm.multi_scale_roi_align(F, R, 2, **kw)
    assert [k.split("::")[-1] for k in c.kernels] == ["rois_check<float>",
                                                     "fpn_levels<float>"] + \
        ["align_fwd<float>"] * 4
    assert c.syncs == c0.syncs and c.ops == c0.ops == 0
    g = emu.asarray(rng.standard_normal((40, feats[0].shape[1], 2, 2)).astype(np.float32))
    with emu.counting() as c:
        fastnorm.multi_scale_roi_align_backward(g, R, [f.shape for f in feats], 2, **kw)
    assert [k.split("::")[-1] for k in c.kernels] == ["rois_check<float>",
                                                     "fpn_levels<float>"] + \
        ["align_bwd<float>"] * 4
    assert c.syncs == c0.syncs


# ---------------------------------------------------------------- the CUDA forward (align_fwd)
# align_fwd: one block per (RoI, block of channels), the RoI's geometry and sample table in
# shared memory, 32-bit indices where they fit, channels-last and the multi-scale levels' RoI
# rows handled in the kernel. Its results must be those of the previous forward, one thread per
# output (align_fwd_thread, kept in roi_ops.cu as the reference): bitwise on the emulator, within
# roundings on a GPU (FMA contraction).

def _previous_forward(x, rois, offset, mask, PH, PW, CO, prm, *, channels_last=False, out=None,
                      level=None):
    """The launcher's _align_forward as it was: channels-last transposed around the NCHW
    per-thread kernel, a multi-scale level's RoIs gathered and their rows scattered back (the
    rows of RoIs pooled nowhere zeroed with level 0)."""
    from fastnorm._cuda import roi_ops as L
    cp = L.cupy()
    if channels_last:
        x = cp.ascontiguousarray(x.transpose(0, 3, 1, 2))
    index = None
    if level is not None:
        lev, lvl, nlev = level
        index = cp.flatnonzero(lev == lvl)
    y = L._align_forward_thread(x, rois if index is None else cp.ascontiguousarray(rois[index]),
                                offset, mask, PH, PW, CO, prm)
    if channels_last:
        y = cp.ascontiguousarray(y.transpose(0, 2, 3, 1))
    if index is None:
        return y
    out[index] = y
    if lvl == 0:
        out[cp.flatnonzero(lev == nlev)] = 0
    return out


def _fwd_cases(rng, dtype):
    """(name, call) pairs: every kind and mode of the forward, both layouts of RoIAlign, fixed
    and adaptive sampling. The table holds at most 512 samples per RoI (float; 256 for double
    with 64-bit indices): sr 2 fits it, sr 12 never does (the per-thread path), and adaptive
    sampling mixes both (the big RoIs below have up to ~900 samples per bin)."""
    dt = _dtype(dtype)
    N, C, H, W = 2, 3, 11, 14
    x = rng.standard_normal((N, C, H, W)).astype(dt)
    rois = random_rois(rng, 16, N, H, W, 0.5)
    extra = np.array([[0, -40, -30, 90, 70], [1, 3, 4, 60, 50], [1, np.nan, 2, 5, 6],
                      [0, 1, 2, np.inf, 6], [1, 500, 500, 520, 530], [0, 5, 6, 5, 6]])
    rois = np.concatenate([rois, extra]).astype(dt)
    rot = np.concatenate([ref.random_rotated_rois(rng, 14, N, H, W, 0.5),
                          [[0, 10, 12, 80, 60, 30], [1, 5, 5, np.nan, 4, 0]]]).astype(dt)
    K = len(rois)
    xl = _nhwc(x)
    for PH, PW in ((2, 3), (1, 1), (4, 2)):
        for sr in (-1, 2, 12):
            for aligned in (False, True):
                for mode in ("avg", "max"):
                    yield (f"roi_align {PH}x{PW} sr {sr} aligned {aligned} {mode}",
                           lambda A, a=(PH, PW), s=sr, al=aligned, m=mode:
                           fastnorm.roi_align(A(x), A(rois), a, 0.5, s, al, mode=m))
                    yield (f"roi_align NHWC {PH}x{PW} sr {sr} aligned {aligned} {mode}",
                           lambda A, a=(PH, PW), s=sr, al=aligned, m=mode:
                           fastnorm.roi_align(A(xl), A(rois), a, 0.5, s, al, mode=m,
                                              channels_last=True))
                yield (f"roi_align_rotated {PH}x{PW} sr {sr} aligned {aligned}",
                       lambda A, a=(PH, PW), s=sr, al=aligned:
                       fastnorm.roi_align_rotated(A(x), A(rot), a, 0.5, s, al))
            xp = rng.standard_normal((N, 2 * PH * PW, H, W)).astype(dt)
            yield (f"ps_roi_align {PH}x{PW} sr {sr}",
                   lambda A, a=(PH, PW), s=sr, xp=xp: fastnorm.ps_roi_align(A(xp), A(rois), a,
                                                                            0.5, s))
            off = (0.3 * rng.standard_normal((K, 2, PH, PW))).astype(dt)
            msk = rng.random((K, 1, PH, PW)).astype(dt)
            for o, m in ((None, None), (off, None), (off, msk), (None, msk)):
                yield (f"deform_roi_pool {PH}x{PW} sr {sr} offset {o is not None} "
                       f"mask {m is not None}",
                       lambda A, a=(PH, PW), s=sr, o=o, m=m:
                       fastnorm.deform_roi_pool(A(x), A(rois), None if o is None else A(o), a,
                                                0.5, s, mask=None if m is None else A(m)))
    for cl in (False, True):
        feats, mrois, scales = _ms_case(rng, dtype, K=30)
        mrois = np.concatenate([mrois, np.array([[0, np.nan, 1, 2, 3], [1, 9, 9, 2, 3]],
                                                mrois.dtype)])
        if cl:
            feats = [_nhwc(f) for f in feats]
        for sr in (-1, 2):
            yield (f"multi_scale_roi_align channels_last {cl} sr {sr}",
                   lambda A, f=feats, r=mrois, s=sr, cl=cl, sc=scales:
                   fastnorm.multi_scale_roi_align([A(a) for a in f], A(r), (3, 2),
                                                  spatial_scales=sc, sampling_ratio=s,
                                                  channels_last=cl, **MS_KW))


def _bits(backend, y):
    y = backend.asnumpy(y)
    return y.view(np.dtype(f"u{y.dtype.itemsize}"))


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
def test_forward_bitwise_equals_previous_kernel(cuda_backend, rng, dtype, monkeypatch):
    """align_fwd, with 32-bit and with 64-bit indices, gives the bits of the per-thread
    forward, for every kind, mode and layout, table or not.

    On a GPU the two kernels' bits may differ by a rounding: NVRTC contracts a * b + c into
    fused multiply-adds (CuPy compiles with --fmad=true) wherever it sees fit, and the two
    kernels' code gives it different chances (seen on an H100: 2 ulp of one float64 output).
    There they must agree to a few roundings of the output type; the emulator computes every
    operation separately (no contraction) and checks the bits. 32- and 64-bit indices run the
    same arithmetic and must agree bitwise everywhere."""
    from fastnorm._cuda import roi_ops as L
    monkeypatch.setenv("FASTNORM_EMULATOR_RACECHECK", "0")   # (each launch run once: faster)
    cases = list(_fwd_cases(rng, dtype))
    got = [_bits(cuda_backend, call(cuda_backend.asarray)) for _, call in cases]
    monkeypatch.setattr(L, "INDEX32_MAX", -1)            # every launch takes 64-bit indices
    got64 = [_bits(cuda_backend, call(cuda_backend.asarray)) for _, call in cases]
    monkeypatch.setattr(L, "_align_forward", _previous_forward)
    contracted = cuda_backend.name == "cuda"
    eps = {"float16": 2.0**-10, "bfloat16": 2.0**-7, "float32": 2.0**-23, "float64": 2.0**-52}
    tol = (2 if dtype in HALF else 16) * eps[dtype]
    for (name, call), a, b in zip(cases, got, got64):
        want = _bits(cuda_backend, call(cuda_backend.asarray))
        assert np.array_equal(a, b), name + " (64-bit indices)"
        assert a.shape == want.shape, name
        if not contracted:
            assert np.array_equal(a, want), name
            continue
        av, wv = (v.view(_dtype(dtype)).astype(np.float64) for v in (a, want))
        np.testing.assert_allclose(av, wv, rtol=tol, atol=tol, equal_nan=True, err_msg=name)
    assert any(np.any(w != 0) for w in got)


@pytest.mark.emulated
def test_forward_units_beyond_the_grid(rng, monkeypatch):
    """More units (RoI, channel block) than blocks: each block loops over several, reusing its
    shared geometry and table (the emulator checks races, bounds, shared-memory poison and
    barriers on every launch)."""
    emu = pytest.importorskip("fastnorm._cuda.emulator")
    from fastnorm._cuda import roi_ops as L
    x = rng.standard_normal((2, 40, 9, 12)).astype(np.float32)
    rois = np.concatenate([random_rois(rng, 9, 2, 9, 12, 0.5),
                           [[1, -30, -30, 60, 60]]]).astype(np.float32)
    X, XL, R = emu.asarray(x), emu.asarray(_nhwc(x)), emu.asarray(rois)
    want = fastnorm.roi_align(X, R, 3, 0.5, -1).get()
    monkeypatch.setattr(L, "MAX_GRID", (3, 1, 1))
    with emu.counting() as c:
        y = fastnorm.roi_align(X, R, 3, 0.5, -1).get()
        yl = fastnorm.roi_align(XL, R, 3, 0.5, -1, channels_last=True).get()
    assert [e.blocks for e in c.log] == [1, 3] * 2        # the batch-index check, the forward
    np.testing.assert_array_equal(y, want)
    np.testing.assert_array_equal(yl, _nhwc(want))


@pytest.mark.emulated
def test_forward_launches_and_device_operations(rng):
    """Each forward is one launch and no other device operation or host synchronisation: the
    other launch and the synchronisation counted are the op layer's batch-index check
    (_validation.py: one rois_check launch, its flag read back; 7 array operations before it),
    the multi-scale forward adds the level mapping (one fpn_levels launch; before it, 21
    operations and a read-back of the level counts) and launches once per level over all the
    RoIs. Before the per-RoI forward: roi_align (1, 8, 1), channels-last (1, 10, 1),
    multi-scale 4 levels (4, 40, 2), channels-last (4, 48, 2). FPN P2 layout (7 x 7, sr 2):
    one block of 256 threads per (RoI, 21 channels), 32 channels when channels-last."""
    emu = pytest.importorskip("fastnorm._cuda.emulator")
    N, C, H, W, K = 2, 8, 20, 27, 6
    x = rng.standard_normal((N, C, H, W)).astype(np.float32)
    rois = random_rois(rng, K, N, H, W, 0.25).astype(np.float32)
    X, XL, R = emu.asarray(x), emu.asarray(_nhwc(x)), emu.asarray(rois)
    XP = emu.asarray(rng.standard_normal((N, 2 * 9, H, W)).astype(np.float32))
    OFF = emu.asarray((0.1 * rng.standard_normal((K, 2, 7, 7))).astype(np.float32))
    MSK = emu.asarray(rng.random((K, 1, 7, 7)).astype(np.float32))
    feats, mrois, scales = _ms_case(rng, "float32", K=40)
    F, FL, MR = [emu.asarray(f) for f in feats], [emu.asarray(_nhwc(f)) for f in feats], \
        emu.asarray(mrois)
    ms = dict(spatial_scales=scales, sampling_ratio=2, **MS_KW)
    calls = [(lambda: fastnorm.roi_align(X, R, 7, 0.25, 2), (2, 0, 1)),
             (lambda: fastnorm.roi_align(XL, R, 7, 0.25, 2, channels_last=True), (2, 0, 1)),
             (lambda: fastnorm.roi_align(X, R, 7, 0.25, 2, mode="max"), (2, 0, 1)),
             (lambda: fastnorm.ps_roi_align(XP, R, 3, 0.25, 2), (2, 0, 1)),
             (lambda: fastnorm.deform_roi_pool(X, R, OFF, 7, 0.25, 2, mask=MSK), (2, 0, 1)),
             (lambda: fastnorm.multi_scale_roi_align(F, MR, 7, **ms), (6, 0, 1)),
             (lambda: fastnorm.multi_scale_roi_align(FL, MR, 7, channels_last=True, **ms),
              (6, 0, 1))]
    for i, (call, counts) in enumerate(calls):
        call()                                             # warm (module build)
        with emu.counting() as c:
            call()
        assert (c.launches, c.ops, c.syncs) == counts, (i, c)
        assert all(e.atomics == 0 for e in c.log), (i, c.log)
        assert all(e.barriers > 0 for e in c.log if "align_fwd" in e.kernel), (i, c.log)
    with emu.counting() as c:
        fastnorm.roi_align(X, R, 7, 0.25, 2)
        fastnorm.roi_align(XL, R, 7, 0.25, 2, channels_last=True)
    assert [(e.blocks, e.threads) for e in c.log] == [(1, 32), (K, K * 256)] * 2
    # the launcher itself: one launch, nothing else
    from fastnorm._cuda import roi_ops as L, using
    with using(emu), emu.counting() as c:
        L.roi_align_forward(X, R, 7, 7, 0.25, 2, False, 0, False, 1)
        L.roi_align_forward(XL, R, 7, 7, 0.25, 2, False, 0, True, 1)
    assert (c.launches, c.ops, c.syncs) == (2, 0, 0)


def test_multi_scale_roi_align_inputs_not_modified(backend, rng):
    feats, rois, scales = _ms_case(rng, "float32")
    g = np.ones((len(rois), 3, 2, 2), np.float32)
    F, R, G = backend.asarray([feats, rois, g])
    kw = dict(spatial_scales=scales, **MS_KW)
    fastnorm.multi_scale_roi_align(F, R, 2, **kw)
    for det in (False, True):
        fastnorm.multi_scale_roi_align_backward(G, R, [f.shape for f in feats], 2,
                                                deterministic=det, **kw)
    for a, b in list(zip(F, feats)) + [(R, rois), (G, g)]:
        assert np.array_equal(backend.asnumpy(a), b)


def test_multi_scale_roi_align_bad_arguments(backend):
    A = backend.asarray
    feats = [A(np.zeros((2, 3, 8 >> i, 8 >> i), np.float32)) for i in range(3)]
    r = A(np.array([[0, 1, 1, 5, 5]], np.float32))
    g = A(np.zeros((1, 3, 2, 2), np.float32))
    shapes = [tuple(f.shape) for f in feats]
    f, fb = fastnorm.multi_scale_roi_align, fastnorm.multi_scale_roi_align_backward
    with pytest.raises(ValueError, match="`features`.*empty"):
        f([], r, 2)
    with pytest.raises(TypeError, match="`features` must be a list"):
        f(feats[0], r, 2)
    with pytest.raises(ValueError, match=r"`features\[1\]`.*batch size"):
        f([feats[0], A(np.zeros((1, 3, 4, 4), np.float32))], r, 2)
    with pytest.raises(ValueError, match=r"`features\[2\]`.*channel"):
        f(feats[:2] + [A(np.zeros((2, 4, 2, 2), np.float32))], r, 2)
    with pytest.raises(ValueError, match=r"`features\[1\]`.*channel"):     # mixed layouts
        f([feats[0], A(np.zeros((2, 4, 4, 3), np.float32))], r, 2)
    with pytest.raises(TypeError, match=r"`features\[1\]`.*dtype"):
        f([feats[0], A(np.zeros((2, 3, 4, 4), np.float64))], r, 2)
    with pytest.raises(ValueError, match=r"`features\[1\]` must be 4-D"):
        f([feats[0], A(np.zeros((3, 4, 4), np.float32))], r, 2)
    with pytest.raises(TypeError, match=r"`features\[0\]`"):
        f([A(np.zeros((2, 3, 4, 4), np.int32))], r, 2)
    if backend.is_cuda:                 # one backend per call, no implicit transfers
        with pytest.raises(TypeError, match=r"`features\[1\]`"):
            f([feats[0], np.zeros((2, 3, 4, 4), np.float32)], r, 2)
    else:
        emu = pytest.importorskip("fastnorm._cuda.emulator")
        with pytest.raises(TypeError, match=r"`features\[1\]`"):
            f([feats[0], emu.asarray(np.zeros((2, 3, 4, 4), np.float32))], r, 2)
    for bad, what in (([0.25, 0.125], "one scale per feature level"),
                      ([0.25, 0.125, 0.0625, 0.03125], "one scale per feature level"),
                      ([0.25, 0.125, 0.03125], "powers of two halving"),
                      ([0.3, 0.15, 0.075], "powers of two halving"),
                      ([0.25, 0.5, 1.0], "powers of two halving"),
                      ([0.25, 0.125, 0.0], "must be >"), ([0.25, 0.125, np.nan], "finite")):
        with pytest.raises(ValueError, match="`spatial_scales`.*" + what):
            f(feats, r, 2, spatial_scales=bad)
        with pytest.raises(ValueError, match="`spatial_scales`"):
            fb(g, r, shapes, 2, spatial_scales=bad)
    with pytest.raises(TypeError, match="`spatial_scales`"):
        f(feats, r, 2, spatial_scales=0.25)
    for bad in (0, (2, 0), -1, (1, 2, 3)):
        with pytest.raises(ValueError, match="`output_size`"):
            f(feats, r, bad)
    with pytest.raises(ValueError, match="`sampling_ratio`"):
        f(feats, r, 2, sampling_ratio=2**31)
    with pytest.raises(TypeError, match="`sampling_ratio`"):
        f(feats, r, 2, sampling_ratio=1.5)
    with pytest.raises(ValueError, match="`canonical_scale`"):
        f(feats, r, 2, canonical_scale=0)
    with pytest.raises(TypeError, match="`canonical_level`"):
        f(feats, r, 2, canonical_level=4.5)
    with pytest.raises(ValueError, match=r"`rois` must have shape \(K, 5\)"):
        f(feats, r[:, 1:], 2)
    with pytest.raises(ValueError, match=r"`rois` entry 0"):
        f(feats, [r], 2)
    with pytest.raises(ValueError, match="`rois`"):
        f(feats, [r[:, 1:]] * 3, 2)
    with pytest.raises(TypeError, match="`rois`"):
        f(feats, A(np.array([[0, 1, 1, 5, 5]], np.float64)), 2)
    for b in (2, -1, 0.5, np.nan):
        rb = A(np.array([[b, 1, 1, 5, 5]], np.float32))
        with pytest.raises(ValueError, match="`rois`"):
            f(feats, rb, 2)
        with pytest.raises(ValueError, match="`rois`"):
            fb(g, rb, shapes, 2)
    with pytest.raises(ValueError, match="`input_shapes`.*empty"):
        fb(g, r, [], 2)
    with pytest.raises(ValueError, match=r"`input_shapes\[1\]`"):
        fb(g, r, [shapes[0], (2, 3, 4)], 2)
    with pytest.raises(ValueError, match=r"`input_shapes\[1\]`"):
        fb(g, r, [shapes[0], (2, 4, 4, 4)], 2)
    with pytest.raises(ValueError, match="`grad_out`"):
        fb(A(np.zeros((1, 3, 3, 2), np.float32)), r, shapes, 2)
    with pytest.raises(ValueError, match="`grad_out`"):
        fb(g, r, [(2, 8 >> i, 8 >> i, 3) for i in range(3)], 2, channels_last=True)


# torchvision's MultiScaleRoIAlign on the same inputs, in the interpreter that has torchvision
# (fastnorm._bench.run_torchvision: this process if torchvision imports here, else
# $FASTNORM_TV_PYTHON, e.g. FASTNORM_TV_PYTHON=/path/to/venv-with-torchvision/bin/python)
TV_MSRA = r"""
def run(d, threads, levels, images, image_hw, output_size, sr):
    import collections, numpy as np, torch, torchvision
    torch.set_num_threads(threads)
    z = np.load(d + "/in.npz")
    names = [f"p{i}" for i in range(levels)]
    feats = [torch.from_numpy(z[n]).requires_grad_(True) for n in names]
    boxes = [torch.from_numpy(z[f"b{i}"]) for i in range(images)]
    m = torchvision.ops.MultiScaleRoIAlign(names, output_size, sr)
    y = m(collections.OrderedDict(zip(names, feats)), boxes, [tuple(image_hw)] * images)
    grads = torch.autograd.grad(y, feats, torch.from_numpy(z["g"]))
    np.savez(d + "/out.npz", y=y.detach().numpy(), **{f"g{i}": g.numpy()
                                                      for i, g in enumerate(grads)})
    return {"version": torchvision.__version__, "scales": list(m.scales)}
"""


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("levels", [4, 1])
def test_multi_scale_roi_align_matches_torchvision(backend, rng, tmp_path, dtype, levels):
    """torchvision.ops.MultiScaleRoIAlign (aligned=False, its inferred scales, canonical 224 /
    level 4): the same output and gradients, including the RoIs on level boundaries, beyond
    the clamps, and inverted along one axis (zeros)."""
    from fastnorm._bench import run_torchvision
    N, C, img = 2, 4, (256, 320)
    feats = [rng.standard_normal((N, C, img[0] >> (2 + i), img[1] >> (2 + i))).astype(dtype)
             for i in range(levels)]
    per = []
    for _ in range(N):
        r = ref.pyramid_rois(rng, 30, 1, *img)[:, 1:] * rng.choice([1, 2], (30, 1))
        below = float(np.nextafter(np.nextafter(np.float32(224), 0), 0))
        extra = [[0, 0, below, below], [5, 5, 700, 900], [3, 3, 4, 4], [40, 9, 20, 60]]
        per.append(np.r_[r, extra].astype(dtype))
    K = sum(len(p) for p in per)
    g = rng.standard_normal((K, C, 7, 7)).astype(dtype)
    np.savez(tmp_path / "in.npz", g=g, **{f"p{i}": f for i, f in enumerate(feats)},
             **{f"b{i}": b for i, b in enumerate(per)})
    tv = run_torchvision(TV_MSRA, str(tmp_path), 1, levels=levels, images=N, image_hw=img,
                         output_size=7, sr=2)
    if tv is None:
        pytest.skip("torchvision unavailable: set FASTNORM_TV_PYTHON to an interpreter with it")
    z = np.load(tmp_path / "out.npz")
    assert tv["scales"] == [2.0 ** -(2 + i) for i in range(levels)]
    F, P, G = backend.asarray([feats, per, g])
    kw = dict(spatial_scales=tv["scales"], sampling_ratio=2, aligned=False)
    y = backend.asnumpy(fastnorm.multi_scale_roi_align(F, P, 7, **kw))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == "float32" else dict(rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(y, z["y"], **tol)
    # the box inverted along one axis: zeros on a pyramid, pooled when there is one level
    assert y[30 + 1].any() and bool(y[30 + 3].any()) == (levels == 1)
    grads = backend.asnumpy(fastnorm.multi_scale_roi_align_backward(
        G, P, [f.shape for f in feats], 7, **kw))
    for i, a in enumerate(grads):
        np.testing.assert_allclose(a, z[f"g{i}"], **tol)


# ---------------------------------------------------------------- CPU lane kernels (issue 17)
# RoIPool and PS-RoIAlign run 16-channel (RoIPool) or output-channel (PS-RoIAlign) lanes over a
# per-thread transposed scratch, falling back to per-RoI scratch and to the scalar loop when the
# scratch bound (fastnorm._cpu.roi_ops._set_limits) is too small, and PS-RoIAlign to the scalar
# loop when its RoIs read too little for the lanes' transposes: every path and every thread count
# must give the same bits. Paths: (scratch bytes, lane_reads) for _set_limits (None: default).

SCRATCH = {"auto": (None, None), "lanes": (None, 1 << 40), "per-roi": (64 * 24, 1 << 40),
           "scalar": (0, None)}


@pytest.fixture
def lane_scratch():
    from fastnorm._cpu import roi_ops as cpu_roi
    old = cpu_roi._set_limits()

    def set_(name):
        scratch, reads = SCRATCH[name]
        cpu_roi._set_limits(old[0] if scratch is None else scratch,
                            lane_reads=old[3] if reads is None else reads)
    yield set_
    cpu_roi._set_limits(*old)


def _pool_scan(x, rois, PH, PW, scale, g=None):
    """RoIPool in the scalar kernel's exact semantics (torchvision's CPU loop): m starts at
    -FLT_MAX (0 for an empty bin) and takes v when v > m in row-major order (NaN never, ties keep
    the first, -0/+0 the first seen); the gradient goes to that pixel, summed in RoI then bin order
    in x's dtype."""
    dt = x.dtype.type
    K, (_, C, H, W) = len(rois), x.shape
    out = np.zeros((K, C, PH, PW), x.dtype)
    gx = np.zeros_like(x)
    fmax = dt(-np.finfo(np.float32).max)
    for k, r in enumerate(rois):
        if not np.all(np.isfinite(r[1:])):
            continue
        n = int(r[0])
        v = [min(max(np.round(float(c) * scale), -1e15), 1e15) for c in r[1:]]
        xs, ys, xe, ye = (int(t) for t in v)
        bh = dt(max(ye - ys + 1, 1)) / dt(PH)
        bw = dt(max(xe - xs + 1, 1)) / dt(PW)
        for ph in range(PH):
            h0 = min(max(int(np.floor(ph * bh)) + ys, 0), H)
            h1 = min(max(int(np.ceil((ph + 1) * bh)) + ys, 0), H)
            for pw in range(PW):
                w0 = min(max(int(np.floor(pw * bw)) + xs, 0), W)
                w1 = min(max(int(np.ceil((pw + 1) * bw)) + xs, 0), W)
                for c in range(C):
                    m, arg = (dt(0) if (h1 <= h0 or w1 <= w0) else fmax), None
                    for h in range(h0, h1):
                        for w in range(w0, w1):
                            if x[n, c, h, w] > m:
                                m, arg = x[n, c, h, w], (h, w)
                    out[k, c, ph, pw] = m
                    if g is not None and arg is not None:
                        gx[n, c, arg[0], arg[1]] += g[k, c, ph, pw]
    return out, gx


def _tie_case(rng, dtype, N, C, H, W, K):
    """x full of ties, signed zeros, NaN and infinities; RoIs of every kind (tiny, huge, outside,
    non-finite)."""
    vals = np.array([0.0, -0.0, 1.0, -1.0, 2.0, np.nan, -np.inf, np.inf, -np.finfo(np.float32).max], dtype)
    x = rng.choice(vals, size=(N, C, H, W), p=[.2, .2, .15, .15, .1, .08, .05, .02, .05])
    x = np.where(rng.uniform(size=x.shape) < 0.3, rng.standard_normal(x.shape), x).astype(dtype)
    if dtype == np.float64:
        x.flat[::7] = -1e300                   # below -FLT_MAX: never taken
    rois = random_rois(rng, K, N, H, W, 0.5).astype(dtype)
    rois[0, 1:] = [-40, -40, 2 * W + 40, 2 * H + 40]
    rois[1, 1:] = [4 * W, 4 * H, 4 * W + 9, 4 * H + 9]
    rois[2, 2] = np.nan
    rois[3, 1:] = [3, 3, 3, 3]
    return x, rois


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("C", [5, 16, 37])
def test_roi_pool_lanes_bitwise_scalar_semantics(rng, lane_scratch, dtype, C):
    """Every path (whole-image scratch, per-RoI scratch, scalar), at 1 and 2 threads, gives the
    sequential scan's values, argmaxes and sums bit for bit: ties, NaN, +-0, -inf, the channel
    tail C % 16."""
    x, rois = _tie_case(rng, dtype, 2, C, 13, 17, 24)
    PH, PW, scale = 3, 4, 0.5
    g = rng.standard_normal((len(rois), C, PH, PW)).astype(dtype)
    want, gwant = _pool_scan(x, rois, PH, PW, scale, g)
    for path in SCRATCH:
        lane_scratch(path)
        for t in (1, 2):
            with fastnorm.threads(t):
                y = fastnorm.roi_pool(x, rois, (PH, PW), scale)
                gx = fastnorm.roi_pool_backward(g, rois, x.shape, (PH, PW), scale, x=x)
            assert y.tobytes() == want.tobytes(), (path, t)
            assert gx.tobytes() == gwant.tobytes(), (path, t)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("CO", [1, 3, 10])
def test_ps_roi_align_lanes_paths_and_threads(rng, lane_scratch, dtype, CO):
    """The lane path (units image x bin) is bitwise identical at 1 and 2 threads, forward and
    backward, and matches the per-RoI scalar path (taken when the scratch bound is 0, or when
    the RoIs read too little: "auto" with few RoIs) and the float64 oracle."""
    PH, PW, N, H, W, K = 3, 2, 2, 15, 19, 40
    x = rng.standard_normal((N, CO * PH * PW, H, W)).astype(dtype)
    rois = random_rois(rng, K, N, H, W, 0.5).astype(dtype)
    rois[0, 1:] = [-30, -30, 2 * W + 30, 2 * H + 30]
    rois[1, 1:] = [4 * W, 4 * H, 4 * W + 9, 4 * H + 9]
    rois[2, 3] = np.inf
    g = rng.standard_normal((K, CO, PH, PW)).astype(dtype)
    res = {}
    for path in ("auto", "lanes", "scalar"):
        lane_scratch(path)
        for t in (1, 2):
            with fastnorm.threads(t):
                res[path, t] = (fastnorm.ps_roi_align(x, rois, (PH, PW), 0.5, 2),
                                fastnorm.ps_roi_align_backward(g, rois, x.shape, (PH, PW), 0.5, 2))
    for path in ("auto", "lanes", "scalar"):
        for a, b in zip(res[path, 1], res[path, 2]):
            assert a.tobytes() == b.tobytes(), path
    want = ref.ps_roi_align(_f64(x), _f64(rois), PH, PW, 0.5, 2)
    gwant = ref.ps_roi_align_backward(_f64(g), _f64(rois), _f64(x), PH, PW, 0.5, 2)
    name = np.dtype(dtype).name
    for path in ("auto", "lanes", "scalar"):
        y, gx = res[path, 1]
        _close(_CPU, y, want, name)
        _close(_CPU, gx, gwant, name)


class _CPU:
    asnumpy = staticmethod(np.asarray)
