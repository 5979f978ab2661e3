"""GroupNorm forward/backward against the float64 oracle on every backend (cpu, cuda-emulated,
cuda), finite differences, the CUDA launcher's vector widths and work splits, edge cases, errors."""
import contextlib
import math

import numpy as np
import pytest

import fastnorm
from fastnorm._cuda import group_norm as gn_cuda
from reference import group_norm as ref

ACTS = [None, "relu", "silu"]
# max |y - oracle| / (1 + |oracle|): accumulation order for float32/64, the output's rounding
# for the half types (whose oracle reads the same rounded inputs)
TOL = {"float64": 1e-10, "float32": 2e-5, "float16": 1e-3, "bfloat16": 8e-3}


def _dtype(name):
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _stats_tol(dtype):
    """mean/rstd are float32 for the half types, computed from their (exact) rounded inputs."""
    return TOL[dtype] if dtype == "float64" else TOL["float32"]


def _case(rng, N, C, spatial, G, channels_last, dtype, affine=True, offset=0.0, scale=1.0):
    """x, weight, bias as NumPy arrays of ``dtype``: the oracle reads these rounded values."""
    dt = _dtype(dtype)
    shape = (N, *spatial, C) if channels_last else (N, C, *spatial)
    x = (rng.standard_normal(shape) * scale + offset).astype(dt)
    w = rng.standard_normal(C).astype(dt) if affine else None
    b = rng.standard_normal(C).astype(dt) if affine else None
    return x, w, b


def _run(backend, fn, *args, **kwargs):
    """fn on the backend's copies of the NumPy arguments; results come back as NumPy, after a
    check that they are arrays of the backend's kind."""
    dev = backend.asarray(args)
    out = fn(*dev, **kwargs)
    for r in out if isinstance(out, tuple) else (out,):
        assert r is None or type(r) is type(dev[0])
    return backend.asnumpy(out)


def _f64(a):
    return None if a is None else np.asarray(a, np.float64)


def _counting(backend):
    """Kernel launches of the emulated backend (None elsewhere)."""
    if backend.name == "cuda-emulated":
        return backend.xp.counting()
    return contextlib.nullcontext()


SHAPES = [  # (N, C, spatial, G)
    (2, 6, (), 3),
    (3, 8, (17,), 4),
    (2, 12, (5, 7), 3),
    (1, 16, (3, 4, 5), 8),
    (4, 4, (9, 9), 1),
    (2, 32, (6, 6), 32),
    (1, 4, (130, 131), 2),      # several statistics units per row (S > 16384)
    (1, 3, (40, 41, 11), 3),    # channels-last: many position blocks
    # channels-last vector tiles: whole tiles plus a partial tile plus single channels, and
    # more rows than one input-precision partial sum
    (2, 144, (9, 11), 12),
    (1, 40, (33, 7), 5),
    (1, 264, (6, 11), 4),
    # channels-last image over the 4 MiB cache batch: one image per sweep; on CUDA (float32/64)
    # a grid-stride elementwise pass (more vectors than 256 threads x 8 blocks per SM)
    (1, 64, (160, 128), 8),
]


@pytest.mark.parametrize("N,C,spatial,G", SHAPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("activation", ACTS)
def test_forward_matches_oracle(backend, rng, N, C, spatial, G, channels_last, activation):
    for dtype in backend.floats:
        tol = TOL[dtype]
        x, w, b = _case(rng, N, C, spatial, G, channels_last, dtype, affine=rng.random() < 0.7)
        y, mean, rstd = _run(backend, fastnorm.group_norm, x, G, w, b,
                             channels_last=channels_last, activation=activation,
                             return_stats=True)
        ey, emean, erstd = ref.group_norm(x, G, _f64(w), _f64(b), channels_last=channels_last,
                                          activation=activation)
        sdt = np.float64 if dtype == "float64" else np.float32
        assert y.dtype == x.dtype and y.shape == x.shape
        assert mean.dtype == sdt and mean.shape == (N, G) and rstd.shape == (N, G)
        y = y.astype(np.float64)
        assert np.max(np.abs(y - ey) / (1 + np.abs(ey))) < tol * 10, dtype
        stol = _stats_tol(dtype)
        np.testing.assert_allclose(mean, emean, rtol=stol, atol=stol)
        np.testing.assert_allclose(rstd, erstd, rtol=stol * 10)


def _check_backward(dtype, got, dy, x, rstd, G, w, b, channels_last, activation):
    """(grad_x, grad_weight, grad_bias) from a backend against the oracle."""
    gx, gw, gb = got
    tol = TOL[dtype]
    w64, b64 = _f64(w), _f64(b)
    egx, egw, egb = ref.group_norm_backward(dy, x, G, w64, b64, channels_last=channels_last,
                                            activation=activation)
    assert gx.dtype == x.dtype and gx.shape == x.shape
    keep = np.ones(x.shape, bool)
    if activation == "relu" and dtype != "float64":
        z, _, _ = ref.group_norm(x, G, w64, b64, channels_last=channels_last)
        keep = np.abs(z) > 1e-4          # float32 may round z across the kink
        if not keep.all():               # a flipped element changes its group's sums
            tol = max(tol, 2e-2)
    # scale of the terms that cancel in grad_x (tiny groups give grad_x ~ 0)
    s = max(np.abs(egx).max(), np.abs(dy.astype(np.float64)).max() * float(np.max(rstd)) *
            (1.0 if w is None else float(np.abs(w64).max())))
    assert np.max(np.abs(gx.astype(np.float64) - egx)[keep]) / s < tol, dtype
    if w is None:
        assert gw is None and gb is None
    else:
        assert gw.dtype == x.dtype and gb.dtype == x.dtype
        np.testing.assert_allclose(gw.astype(np.float64), egw, rtol=tol * 10,
                                   atol=tol * np.abs(egw).max())
        np.testing.assert_allclose(gb.astype(np.float64), egb, rtol=tol * 10,
                                   atol=tol * np.abs(egb).max())


@pytest.mark.parametrize("N,C,spatial,G", SHAPES[:6] + SHAPES[-4:] + [(1, 4, (140, 130), 2)])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("activation", ACTS)
def test_backward_matches_oracle(backend, rng, N, C, spatial, G, channels_last, activation):
    for dtype in backend.floats:
        x, w, b = _case(rng, N, C, spatial, G, channels_last, dtype, affine=rng.random() < 0.7)
        dy = rng.standard_normal(x.shape).astype(x.dtype)
        _, mean, rstd = _run(backend, fastnorm.group_norm, x, G, w, b,
                             channels_last=channels_last, return_stats=True)
        got = _run(backend, fastnorm.group_norm_backward, dy, x, mean, rstd, G, w, b,
                   channels_last=channels_last, activation=activation)
        _check_backward(dtype, got, dy, x, rstd, G, w, b, channels_last, activation)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("activation", ACTS)
def test_backward_finite_differences(backend, rng, channels_last, activation):
    N, C, spatial, G = 2, 6, (3, 4), 3
    x, w, b = _case(rng, N, C, spatial, G, channels_last, "float64")
    dy = rng.standard_normal(x.shape)
    kw = dict(channels_last=channels_last, activation=activation)

    def loss(x_, w_, b_):
        return float(np.sum(dy * _run(backend, fastnorm.group_norm, x_, G, w_, b_, **kw)))

    _, mean, rstd = _run(backend, fastnorm.group_norm, x, G, w, b,
                         channels_last=channels_last, return_stats=True)
    gx, gw, gb = _run(backend, fastnorm.group_norm_backward, dy, x, mean, rstd, G, w, b, **kw)
    h = 1e-6
    for arr, grad, which in ((x, gx, 0), (w, gw, 1), (b, gb, 2)):
        flat = arr.reshape(-1)
        for i in rng.choice(flat.size, size=min(flat.size, 12), replace=False):
            args_p = [x.copy(), w.copy(), b.copy()]
            args_m = [x.copy(), w.copy(), b.copy()]
            args_p[which].reshape(-1)[i] += h
            args_m[which].reshape(-1)[i] -= h
            fd = (loss(*args_p) - loss(*args_m)) / (2 * h)
            assert abs(fd - grad.reshape(-1)[i]) < 1e-6 * (1 + abs(fd)), (which, i)


# ------------------------------------------------------------------ the CUDA launcher's paths

# fastnorm/_cuda/group_norm.py picks 16-byte vectors, V = 16 / itemsize, for a pass when all its
# pointers are 16-byte aligned and its extent splits into them (NCHW statistics: Cg*S; NCHW
# gradient sums and elementwise passes: S; channels-last: C), else V = 1. Few long NCHW rows split
# into several chunks (_split: statistics per (n, g), gradient sums per (n, c)); channels-last
# samples into several position tiles (_tiles), and channels into tiles of 256 vectors, the last
# one partial when C / V is not a multiple of 256. Each case below: (N, C, spatial, G,
# channels_last, misaligned input: None | "x" | "dy", activation, what it must reach).
PATHS = [
    (2, 16, (5, 8), 4, False, None, "silu", ""),            # every pass vectorised
    (2, 16, (5, 7), 2, False, None, "relu", ""),            # statistics vectorised, rest V = 1
    (3, 9, (5, 7), 3, False, None, None, ""),               # every pass V = 1
    (2, 16, (5, 8), 4, False, "x", "silu", ""),             # misaligned x: V = 1
    (2, 16, (5, 8), 4, False, "dy", None, ""),              # misaligned grad_out: backward V = 1
    (1, 4, (128, 128), 2, False, None, "silu", "chunks"),   # few long rows, vectorised
    (1, 3, (65, 67), 3, False, None, "relu", "chunks"),     # few long rows, V = 1
    (48, 64, (3, 3), 32, False, None, "silu", ""),          # N*G = 1536 short rows, N > 32
    (2, 24, (5, 7), 3, True, None, "silu", ""),             # channels-last vectorised
    (2, 15, (5, 7), 5, True, None, "relu", ""),             # channels-last V = 1
    (2, 24, (5, 7), 3, True, "x", None, ""),
    (2, 24, (5, 7), 3, True, "dy", "silu", ""),
    (1, 8, (60, 50), 2, True, None, "silu", "tiles"),       # several position tiles
    (1, 5, (60, 50), 1, True, None, None, "tiles"),
    (1, 2056, (3, 3), 8, True, None, "relu", "ctile"),      # C / V = 257, 514, 1028: partial
    (1, 261, (3, 3), 3, True, None, "silu", "ctile"),       # last channel tile, either width
    (40, 64, (2, 3), 32, True, None, None, ""),             # N*G = 1280
]

CUDA_FLOATS = ["float64", "float32", "float16", "bfloat16"]


def _widths(dtype, N, C, spatial, G, channels_last, misaligned):
    """V of (statistics, forward elementwise, gradient sums, backward elementwise), by the rule
    above (the test's own statement of it, not the launcher's code)."""
    vec = 16 // _dtype(dtype).itemsize
    S = math.prod(spatial)
    stats, rows = (C, C) if channels_last else (C // G * S, S)

    def v(extent, *arrays):
        return vec if extent % vec == 0 and misaligned not in arrays else 1
    return v(stats, "x"), v(rows, "x"), v(rows, "x", "dy"), v(rows, "x", "dy")


def _expected_kernels(dtype, N, C, spatial, G, channels_last, misaligned):
    t = gn_cuda.ctype(dtype)
    vs, vf, vg, vb = _widths(dtype, N, C, spatial, G, channels_last, misaligned)
    lay = "nhwc" if channels_last else "nchw"
    return {f"gn_stats_{lay}<{t}, {vs}>", f"gn_finalize<{t}>", f"gn_apply<{t}, {vf}, false>",
            f"gn_grad_{lay}<{t}, {vg}>", f"gn_bwd_coeffs<{t}>", f"gn_bwd_wb<{t}>",
            f"gn_apply<{t}, {vb}, true>"}


def _recording(f, seen):
    def wrapper(*args):
        seen.append(f(*args))
        return seen[-1]
    return wrapper


def _misaligned(backend, a):
    """A C-contiguous view of ``a`` on the backend that starts one element past a 16-byte
    boundary (reaches the kernels as it is: the dispatcher copies only non-contiguous arrays)."""
    h = np.empty(a.size + 1, a.dtype)
    h[1:] = a.reshape(-1)
    return backend.asarray(h)[1:].reshape(a.shape)


@pytest.mark.parametrize("dtype", CUDA_FLOATS)
@pytest.mark.parametrize("N,C,spatial,G,channels_last,misaligned,activation,reach", PATHS)
def test_cuda_paths_every_dtype_and_width(cuda_backend, rng, monkeypatch, dtype, N, C, spatial,
                                          G, channels_last, misaligned, activation, reach):
    backend = cuda_backend
    splits = {}                   # the launcher's work splits: chunk / tile counts it chose
    for name in ("_split", "_tiles"):
        monkeypatch.setattr(gn_cuda, name, _recording(getattr(gn_cuda, name),
                                                      splits.setdefault(name, [])))
    x, w, b = _case(rng, N, C, spatial, G, channels_last, dtype, offset=3.0)   # mean off 0
    dy = rng.standard_normal(x.shape).astype(x.dtype)
    dev = {"x": backend.asarray(x), "dy": backend.asarray(dy)}
    if misaligned:
        dev[misaligned] = _misaligned(backend, {"x": x, "dy": dy}[misaligned])
        assert dev[misaligned].data.ptr % 16 != 0
    wd, bd = backend.asarray((w, b))
    kw = dict(channels_last=channels_last, activation=activation)
    with _counting(backend) as counts:
        y, mean, rstd = fastnorm.group_norm(dev["x"], G, wd, bd, return_stats=True, **kw)
        gx, gw, gb = fastnorm.group_norm_backward(dev["dy"], dev["x"], mean, rstd, G, wd, bd,
                                                  **kw)
    if counts is not None:
        launched = {k.split("::")[-1] for k in counts.kernels}
        assert launched == _expected_kernels(dtype, N, C, spatial, G, channels_last,
                                             misaligned)
        # host work: its own kernels only (no zero-fills, copies or other CuPy operations, no
        # synchronisation), forward 3 launches, backward 4
        assert (counts.launches, counts.ops, counts.syncs) == (7, 0, 0), counts
    if reach in ("chunks", "tiles"):   # forward statistics and backward sums both split
        chosen = [n for _, n in splits["_split" if reach == "chunks" else "_tiles"]]
        assert len(chosen) == 2 and min(chosen) >= 2, chosen
    if reach == "ctile":
        cv = C // _widths(dtype, N, C, spatial, G, channels_last, misaligned)[0]
        assert cv > gn_cuda.TILE_THREADS and cv % gn_cuda.TILE_THREADS
    y, mean, rstd, *got = backend.asnumpy((y, mean, rstd, gx, gw, gb))
    ey, emean, erstd = ref.group_norm(x, G, _f64(w), _f64(b), **kw)
    assert np.max(np.abs(y.astype(np.float64) - ey) / (1 + np.abs(ey))) < TOL[dtype] * 10
    stol = _stats_tol(dtype)
    np.testing.assert_allclose(mean, emean, rtol=stol, atol=stol)
    np.testing.assert_allclose(rstd, erstd, rtol=stol * 10)
    _check_backward(dtype, got, dy, x, rstd, G, w, b, channels_last, activation)


@pytest.mark.parametrize("channels_last", [False, True])
def test_float32_deviations_whose_squares_overflow(backend, rng, channels_last):
    # finite float32 data whose deviations square past FLT_MAX (|d| > ~1.8e19): the moments are
    # redone in double, not rstd = 0 (which gave y = bias)
    x = np.array([[[1.26e29, -1.32e29, 3e28, -2.5e29]]], np.float32)       # (1, 1, 4)
    x = np.concatenate([x, x * np.float32(1e-30)], 1)                       # and a normal channel
    if channels_last:
        x = np.ascontiguousarray(x.transpose(0, 2, 1))
    y = backend.asnumpy(fastnorm.group_norm(backend.asarray(x), 2, channels_last=channels_last))
    want, _, _ = ref.group_norm(x.astype(np.float64), 2, channels_last=channels_last)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    assert np.abs(y).max() > 1


def test_cuda_launch_plans_are_cached(rng):
    # a repeated call (same shape, dtype, layout, device) reuses its launch plans: no planning,
    # kernel lookup or scalar packing per call; another shape gets its own plans
    from fastnorm._cuda import emulator as emu
    x = emu.asarray(rng.standard_normal((2, 8, 5, 5)).astype(np.float32))
    fastnorm.group_norm(x, 4)
    before = (gn_cuda._stats_plan.cache_info(), gn_cuda._apply_plan.cache_info())
    y = fastnorm.group_norm(x, 4)
    after = (gn_cuda._stats_plan.cache_info(), gn_cuda._apply_plan.cache_info())
    assert [a.hits - b.hits for a, b in zip(after, before)] == [1, 1]
    assert [a.misses - b.misses for a, b in zip(after, before)] == [0, 0]
    fastnorm.group_norm(x.reshape(2, 8, 25), 2)
    assert gn_cuda._stats_plan.cache_info().misses == after[0].misses + 1
    np.testing.assert_allclose(y.get(), fastnorm.group_norm(x.get(), 4), rtol=1e-5, atol=1e-5)


def test_paths_cover_every_kernel_and_width():
    # every instantiation the launcher can pick, for every dtype, is what some PATHS case expects
    # (test_cuda_paths_every_dtype_and_width checks that the case really launches it)
    for dtype in CUDA_FLOATS:
        t = gn_cuda.ctype(dtype)
        expected = set().union(*(_expected_kernels(dtype, *case[:6]) for case in PATHS))
        all_kernels = {e.split("::")[-1] for e in gn_cuda._exprs(t, 16 // _dtype(dtype).itemsize)}
        assert expected == all_kernels, dtype
        # chunked rows, position tiles and partial channel tiles each at both widths
        for reach in ("chunks", "tiles", "ctile"):
            for k in (0, 2):          # the forward statistics, the backward sums
                widths = {_widths(dtype, *case[:6])[k] for case in PATHS if case[7] == reach}
                assert widths == {1, 16 // _dtype(dtype).itemsize}, (dtype, reach)


# ------------------------------------------------------------------ edge cases

@pytest.mark.parametrize("channels_last", [False, True])
def test_saturated_activations(backend, rng, channels_last):
    # |z| up to ~1000: the vectorised float32 exp saturates (silu -> z or -0) without inf/NaN
    x, _, _ = _case(rng, 2, 24, (7, 9), 6, channels_last, "float32")
    w = np.full(24, 300.0, np.float32)
    b = rng.standard_normal(24).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    for act in ("relu", "silu"):
        y, mean, rstd = _run(backend, fastnorm.group_norm, x, 6, w, b,
                             channels_last=channels_last, activation=act, return_stats=True)
        ey, _, _ = ref.group_norm(x, 6, w, b, channels_last=channels_last, activation=act)
        assert np.isfinite(y).all()
        assert np.max(np.abs(y - ey) / (1 + np.abs(ey))) < 1e-5
        gx, gw, gb = _run(backend, fastnorm.group_norm_backward, dy, x, mean, rstd, 6, w, b,
                          channels_last=channels_last, activation=act)
        egx, egw, egb = ref.group_norm_backward(dy, x, 6, w, b, channels_last=channels_last,
                                                activation=act)
        assert np.isfinite(gx).all() and np.isfinite(gw).all()
        np.testing.assert_allclose(gb, egb, rtol=1e-4, atol=1e-3)
        if act == "silu":                # (relu: float32 z may round across the kink)
            assert np.max(np.abs(gx - egx)) < 2e-4 * np.abs(egx).max()


@pytest.mark.parametrize("channels_last", [False, True])
def test_offset_1e4_is_robust(backend, rng, channels_last):
    # float32 data with a common offset: E[x^2]-E[x]^2 would lose everything here, and so would
    # means rounded to float32 (error up to ulp(1e4)/2 = 5e-4): in the moments of a batch or of
    # a partial (rstd off by ~1e-5 .. 5e-3), or as the mean subtracted from x (y off by 5e-4 x
    # rstd, up to 5e-2)
    cases = [((2, 32, (24, 24), 8), 1.0),
             ((1, 4, (4096,), 2), 1e-2),           # a tiny spread on a huge offset
             ((1, 8, (96, 96), 2), 1e-2)]          # the same, in several chunks / tiles
    for (N, C, spatial, G), scale in cases:
        x, w, b = _case(rng, N, C, spatial, G, channels_last, "float32", offset=1e4,
                        scale=scale)
        y, mean, rstd = _run(backend, fastnorm.group_norm, x, G, w, b,
                             channels_last=channels_last, return_stats=True)
        ey, emean, erstd = ref.group_norm(x, G, w, b, channels_last=channels_last)
        assert np.max(np.abs(y - ey) / (1 + np.abs(ey))) < TOL["float32"], (spatial, scale)
        np.testing.assert_allclose(mean, emean, rtol=1e-7)
        np.testing.assert_allclose(rstd, erstd, rtol=1e-5)
        if scale == 1.0:     # (the backward takes the float32 mean: with a tiny spread its
            dy = rng.standard_normal(x.shape).astype(np.float32)   # rounding dominates)
            gx, gw, gb = _run(backend, fastnorm.group_norm_backward, dy, x, mean, rstd, G, w,
                              b, channels_last=channels_last)
            egx, egw, egb = ref.group_norm_backward(dy, x, G, w, b, channels_last=channels_last)
            for got, want in ((gx, egx), (gw, egw), (gb, egb)):
                assert np.max(np.abs(got - want)) < 1e-3 * np.abs(want).max()


@pytest.mark.parametrize("channels_last", [False, True])
def test_repeated_calls_are_bitwise_identical(backend, rng, channels_last):
    # several chunks / position tiles per group: the fixed-order reductions give the same bits
    shape = (1, 128, 128, 64) if channels_last else (1, 64, 128, 128)
    x = (1e4 + rng.standard_normal(shape)).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    w = rng.standard_normal(64).astype(np.float32)
    b = rng.standard_normal(64).astype(np.float32)
    xd, dyd, wd, bd = backend.asarray((x, dy, w, b))
    kw = dict(channels_last=channels_last, activation="silu")
    runs = []
    for _ in range(2):
        y, m, r = fastnorm.group_norm(xd, 2, wd, bd, return_stats=True, **kw)
        g = fastnorm.group_norm_backward(dyd, xd, m, r, 2, wd, bd, **kw)
        runs.append(backend.asnumpy((y, m, r) + tuple(g)))
    for a, b_ in zip(*runs):
        assert np.array_equal(a, b_)
    ey, _, _ = ref.group_norm(x, 2, w, b, **kw)
    assert np.max(np.abs(runs[0][0] - ey) / (1 + np.abs(ey))) < TOL["float32"]


@pytest.mark.parametrize("channels_last", [False, True])
def test_nan_inf_and_constant_groups(backend, rng, channels_last):
    # a NaN or inf poisons its own group only; a constant group normalises to exactly the bias
    x, w, b = _case(rng, 2, 16, (5, 6), 4, channels_last, "float32")
    xv = x if not channels_last else np.moveaxis(x, -1, 1)     # (N, C, ...) view
    xv[0, 1, 2, 3] = np.nan
    xv[1, 5, 0, 0] = np.inf
    xv[0, 12:16] = 3.7
    xv[1, 8:12] = -1e4
    y, mean, rstd = _run(backend, fastnorm.group_norm, x, 4, w, b, channels_last=channels_last,
                         return_stats=True)
    ey, _, _ = ref.group_norm(x, 4, w, b, channels_last=channels_last)
    yv = y if not channels_last else np.moveaxis(y, -1, 1)
    eyv = ey if not channels_last else np.moveaxis(ey, -1, 1)
    assert np.isnan(yv[0, 0:4]).all() and np.isnan(yv[1, 4:8]).all()
    assert np.isnan(mean[0, 0]) and np.isnan(rstd[1, 1])
    fine = np.ones(yv.shape, bool)
    fine[0, 0:4] = fine[1, 4:8] = False
    assert np.isfinite(yv[fine]).all()
    assert np.max(np.abs(yv - eyv)[fine] / (1 + np.abs(eyv[fine]))) < 2e-4
    assert np.array_equal(yv[0, 12:16], np.broadcast_to(b[12:16, None, None], (4, 5, 6)))
    assert np.array_equal(yv[1, 8:12], np.broadcast_to(b[8:12, None, None], (4, 5, 6)))


def test_empty_inputs(backend):
    for dtype in backend.floats:
        dt = _dtype(dtype)
        sdt = np.float64 if dtype == "float64" else np.float32
        x = np.zeros((0, 8, 4, 4), dt)
        y, m, r = _run(backend, fastnorm.group_norm, x, 4, return_stats=True)
        assert y.shape == x.shape and y.dtype == dt
        assert m.shape == (0, 4) and r.shape == (0, 4) and m.dtype == sdt
        gx, gw, gb = _run(backend, fastnorm.group_norm_backward, x, x, m, r, 4,
                          np.ones(8, dt), np.zeros(8, dt))
        assert gx.shape == x.shape and gw.shape == (8,) and gw.dtype == dt and not gw.any()
        for shape, G in (((2, 4, 0), 2), ((2, 4, 0, 3), 4), ((2, 0, 5), 1)):
            x = np.zeros(shape, dt)
            y, m, r = _run(backend, fastnorm.group_norm, x, G, return_stats=True)
            assert y.shape == shape and m.shape == (2, G) and not m.any()
            # no elements: variance 0, rstd = 1/sqrt(eps) (CPU and CUDA agree)
            np.testing.assert_allclose(r, 1 / np.sqrt(1e-5) if shape[1] else 0, rtol=1e-6)
            gx, gw, gb = _run(backend, fastnorm.group_norm_backward, x, x, m, r, G,
                              np.ones(shape[1], dt), np.zeros(shape[1], dt))
            assert gx.shape == shape and gw.shape == (shape[1],) and not gw.any()


def test_noncontiguous_and_readonly_inputs_are_not_modified(backend, rng):
    base = rng.standard_normal((4, 16, 10, 12))
    w_base = rng.standard_normal(32)
    b = rng.standard_normal(16)
    if backend.is_cuda:
        dbase, dw, db = backend.asarray((base, w_base, b))
    else:
        for a in (base, w_base, b):
            a.flags.writeable = False
        dbase, dw, db = base, w_base, b
    before = [a.copy() for a in (base, w_base, b)]
    x = base[::2, :, 1:, ::2]                         # strided views
    y = backend.asnumpy(fastnorm.group_norm(dbase[::2, :, 1:, ::2], 4, dw[::2], db,
                                            activation="relu"))
    ey, _, _ = ref.group_norm(x, 4, w_base[::2], b, activation="relu")
    np.testing.assert_allclose(y, ey, rtol=1e-10, atol=1e-12)
    # a channels-last view of NCHW memory
    y, m, r = backend.asnumpy(fastnorm.group_norm(backend.xp.moveaxis(dbase, 1, -1), 4,
                                                  channels_last=True, return_stats=True))
    ey, _, _ = ref.group_norm(np.moveaxis(base, 1, -1), 4, channels_last=True)
    np.testing.assert_allclose(y, ey, rtol=1e-10, atol=1e-12)
    dy = rng.standard_normal(base.shape)
    ddy = backend.asarray(dy) if backend.is_cuda else dy
    gx, gw, gb = backend.asnumpy(fastnorm.group_norm_backward(
        backend.xp.moveaxis(ddy, 1, -1), backend.xp.moveaxis(dbase, 1, -1),
        backend.asarray(m), backend.asarray(r), 4, dw[::2], db, channels_last=True))
    egx, egw, egb = ref.group_norm_backward(np.moveaxis(dy, 1, -1), np.moveaxis(base, 1, -1), 4,
                                            w_base[::2], b, channels_last=True)
    np.testing.assert_allclose(gx, egx, rtol=1e-8, atol=1e-9 * np.abs(egx).max())
    np.testing.assert_allclose(gw, egw, rtol=1e-9, atol=1e-9)
    after = backend.asnumpy((dbase, dw, db)) if backend.is_cuda else (base, w_base, b)
    for a, a0 in zip(after, before):
        assert np.array_equal(a, a0)


def test_errors_name_the_argument(backend):
    A = backend.asarray
    x = A(np.zeros((2, 6, 4), np.float32))
    w6 = A(np.ones(6, np.float32))
    with pytest.raises(ValueError, match="`num_groups` must divide"):
        fastnorm.group_norm(x, 4)
    with pytest.raises(ValueError, match="`num_groups`"):
        fastnorm.group_norm(x, 0)
    with pytest.raises(TypeError, match="`num_groups`"):
        fastnorm.group_norm(x, 2.0)
    with pytest.raises(ValueError, match="`x` must have at least 2"):
        fastnorm.group_norm(A(np.zeros(6, np.float32)), 2)
    with pytest.raises(ValueError, match=r"`weight` must have shape \(6,\)"):
        fastnorm.group_norm(x, 2, A(np.ones(5, np.float32)))
    with pytest.raises(TypeError, match="`bias` must have the dtype of `x`"):
        fastnorm.group_norm(x, 2, w6, A(np.ones(6, np.float64)))
    with pytest.raises(TypeError, match="`x` must have a floating dtype"):
        fastnorm.group_norm(A(np.zeros((2, 6, 4), np.int32)), 2)
    x16 = A(np.zeros((2, 6, 4), np.float16))
    if backend.is_cuda:
        with pytest.raises(TypeError, match="`weight` must have the dtype of `x`"):
            fastnorm.group_norm(x16, 2, w6)
        _, m16, r16 = fastnorm.group_norm(x16, 2, return_stats=True)
        with pytest.raises(TypeError, match="`rstd` must have dtype float32 for float16"):
            fastnorm.group_norm_backward(x16, x16, m16, r16.astype(np.float16), 2)
        with pytest.raises(TypeError, match="pass arrays of one framework"):
            fastnorm.group_norm(x, 2, np.ones(6, np.float32))
    else:
        with pytest.raises(TypeError, match="float16/bfloat16 are supported on CUDA"):
            fastnorm.group_norm(x16, 2)
    with pytest.raises(TypeError, match="`x` must be a NumPy array"):
        fastnorm.group_norm([[1.0, 2.0]], 1)
    with pytest.raises(ValueError, match="`eps`"):
        fastnorm.group_norm(x, 2, eps=0)
    with pytest.raises(ValueError, match="`activation`"):
        fastnorm.group_norm(x, 2, activation="gelu")
    y, m, r = fastnorm.group_norm(x, 2, return_stats=True)
    with pytest.raises(ValueError, match="`mean` must have shape"):
        fastnorm.group_norm_backward(x, x, m[:1], r, 2)
    with pytest.raises(TypeError, match="`rstd` must have dtype float32"):
        fastnorm.group_norm_backward(x, x, m, r.astype(np.float64), 2)
    with pytest.raises(ValueError, match="`grad_out` must have shape"):
        fastnorm.group_norm_backward(x[:1], x, m, r, 2)


# ------------------------------------------------------------------ CPU only

@pytest.mark.parametrize("shape,G,channels_last", [
    ((1, 4, 200, 200), 2, False),   # N*G < threads: split statistics
    ((8, 16, 32, 32), 4, False),    # fused in-cache path
    ((1, 64, 64, 8), 2, True),
    ((3, 5, 7, 8), 4, True),
])
def test_bitwise_identical_across_thread_counts(rng, shape, G, channels_last):
    x = rng.standard_normal(shape).astype(np.float32)
    C = shape[-1] if channels_last else shape[1]
    w = rng.standard_normal(C).astype(np.float32)
    b = rng.standard_normal(C).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    results = []
    for n in (1, 2, 3):
        with fastnorm.threads(n):
            y, m, r = fastnorm.group_norm(x, G, w, b, channels_last=channels_last,
                                          activation="silu", return_stats=True)
            g = fastnorm.group_norm_backward(dy, x, m, r, G, w, b, channels_last=channels_last,
                                             activation="silu")
        results.append((y, m, r) + tuple(g))
    for other in results[1:]:
        for a, b_ in zip(results[0], other):
            assert np.array_equal(a, b_)


@pytest.mark.parametrize("channels_last", [False, True])
def test_images_processed_in_cache_sized_batches(rng, channels_last):
    # 3 images of 2 MiB: the kernels work on batches of images (4 MiB of input at a time), so
    # this crosses a batch boundary; grad_weight/grad_bias still sum over the whole batch
    N, C, spatial, G = 3, 32, (128, 128), 4
    x, w, b = _case(rng, N, C, spatial, G, channels_last, "float32")
    dy = rng.standard_normal(x.shape).astype(np.float32)
    y, m, r = fastnorm.group_norm(x, G, w, b, channels_last=channels_last, return_stats=True)
    ey, em, er = ref.group_norm(x, G, w, b, channels_last=channels_last)
    assert np.max(np.abs(y - ey)) < 1e-4
    np.testing.assert_allclose(m, em, atol=1e-6)
    gx, gw, gb = fastnorm.group_norm_backward(dy, x, m, r, G, w, b, channels_last=channels_last)
    egx, egw, egb = ref.group_norm_backward(dy, x, G, w, b, channels_last=channels_last)
    assert np.max(np.abs(gx - egx)) < 1e-4 * np.abs(egx).max() + 1e-5
    np.testing.assert_allclose(gw, egw, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(gb, egb, rtol=1e-4, atol=1e-3)


def test_torch_tensors_round_trip(rng):
    torch = pytest.importorskip("torch")
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64)
    y, m, r = fastnorm.group_norm(x, 4, w, None, return_stats=True)
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float64
    assert isinstance(m, torch.Tensor) and m.shape == (2, 4)
    expected = torch.nn.functional.group_norm(x.detach(), 4, w, None, 1e-5)
    assert torch.allclose(y, expected, atol=1e-12)
    xcl = x.detach().movedim(1, -1)            # non-contiguous torch view
    ycl = fastnorm.group_norm(xcl, 4, w, channels_last=True)
    assert torch.allclose(ycl.movedim(-1, 1), expected, atol=1e-12)
    gx, gw, gb = fastnorm.group_norm_backward(torch.ones_like(y), x, m, r, 4, w)
    assert isinstance(gx, torch.Tensor) and gb is None
    with pytest.raises(TypeError, match="`weight` is a numpy.ndarray"):
        fastnorm.group_norm(x, 4, w.numpy())
