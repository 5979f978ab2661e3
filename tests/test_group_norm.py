"""GroupNorm forward/backward against the float64 oracle, finite differences, edge cases, errors."""
import numpy as np
import pytest

import fastnorm
from reference import group_norm as ref

ACTS = [None, "relu", "silu"]


def _case(rng, N, C, spatial, G, channels_last, dtype, affine=True, offset=0.0, scale=1.0):
    shape = (N, *spatial, C) if channels_last else (N, C, *spatial)
    x = (rng.standard_normal(shape) * scale + offset).astype(dtype)
    w = rng.standard_normal(C).astype(dtype) if affine else None
    b = rng.standard_normal(C).astype(dtype) if affine else None
    return x, w, b


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
    # channels-last image over the 4 MiB cache batch: one image per sweep
    (1, 64, (160, 128), 8),
]


@pytest.mark.parametrize("N,C,spatial,G", SHAPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("activation", ACTS)
def test_forward_matches_oracle(rng, N, C, spatial, G, channels_last, activation):
    for dtype, tol in ((np.float64, 1e-10), (np.float32, 2e-5)):
        x, w, b = _case(rng, N, C, spatial, G, channels_last, dtype, affine=rng.random() < 0.7)
        y, mean, rstd = fastnorm.group_norm(x, G, w, b, channels_last=channels_last,
                                            activation=activation, return_stats=True)
        ey, emean, erstd = ref.group_norm(x, G, w, b, channels_last=channels_last,
                                          activation=activation)
        assert y.dtype == dtype and y.shape == x.shape
        assert mean.dtype == dtype and mean.shape == (N, G) and rstd.shape == (N, G)
        scale = 1 + np.abs(ey)
        assert np.max(np.abs(y - ey) / scale) < tol * 10
        np.testing.assert_allclose(mean, emean, rtol=tol, atol=tol)
        np.testing.assert_allclose(rstd, erstd, rtol=tol * 10)


@pytest.mark.parametrize("channels_last", [False, True])
def test_saturated_activations(rng, channels_last):
    # |z| up to ~1000: the vectorised float32 exp saturates (silu -> z or -0) without inf/NaN
    x, _, _ = _case(rng, 2, 24, (7, 9), 6, channels_last, np.float32)
    w = np.full(24, 300.0, np.float32)
    b = rng.standard_normal(24).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    for act in ("relu", "silu"):
        y, mean, rstd = fastnorm.group_norm(x, 6, w, b, channels_last=channels_last,
                                            activation=act, return_stats=True)
        ey, _, _ = ref.group_norm(x, 6, w, b, channels_last=channels_last, activation=act)
        assert np.isfinite(y).all()
        assert np.max(np.abs(y - ey) / (1 + np.abs(ey))) < 1e-5
        gx, gw, gb = fastnorm.group_norm_backward(dy, x, mean, rstd, 6, w, b,
                                                  channels_last=channels_last, activation=act)
        egx, egw, egb = ref.group_norm_backward(dy, x, 6, w, b, channels_last=channels_last,
                                                activation=act)
        assert np.isfinite(gx).all() and np.isfinite(gw).all()
        np.testing.assert_allclose(gb, egb, rtol=1e-4, atol=1e-3)
        if act == "silu":                # (relu: float32 z may round across the kink)
            assert np.max(np.abs(gx - egx)) < 2e-4 * np.abs(egx).max()


def test_offset_1e4_is_robust(rng):
    # float32 data with a common offset: E[x^2]-E[x]^2 would lose everything here
    for channels_last in (False, True):
        x, w, b = _case(rng, 2, 32, (24, 24), 8, channels_last, np.float32, offset=1e4)
        y = fastnorm.group_norm(x, 8, w, b, channels_last=channels_last)
        ey, _, _ = ref.group_norm(x, 8, w, b, channels_last=channels_last)
        assert np.max(np.abs(y - ey)) < 2e-3
    # also a tiny spread on a huge offset
    x = (1e4 + 1e-2 * rng.standard_normal((1, 4, 4096))).astype(np.float32)
    y = fastnorm.group_norm(x, 2)
    ey, _, _ = ref.group_norm(x, 2)
    assert np.max(np.abs(y - ey)) < 2e-3


@pytest.mark.parametrize("N,C,spatial,G", SHAPES[:6] + SHAPES[-4:] + [(1, 4, (140, 130), 2)])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("activation", ACTS)
def test_backward_matches_oracle(rng, N, C, spatial, G, channels_last, activation):
    for dtype, tol in ((np.float64, 1e-9), (np.float32, 2e-4)):
        x, w, b = _case(rng, N, C, spatial, G, channels_last, dtype, affine=rng.random() < 0.7)
        dy = rng.standard_normal(x.shape).astype(dtype)
        _, mean, rstd = fastnorm.group_norm(x, G, w, b, channels_last=channels_last,
                                            return_stats=True)
        gx, gw, gb = fastnorm.group_norm_backward(dy, x, mean, rstd, G, w, b,
                                                  channels_last=channels_last,
                                                  activation=activation)
        egx, egw, egb = ref.group_norm_backward(dy, x, G, w, b, channels_last=channels_last,
                                                activation=activation)
        keep = np.ones(x.shape, bool)
        if activation == "relu" and dtype == np.float32:
            z, _, _ = ref.group_norm(x, G, w, b, channels_last=channels_last)
            keep = np.abs(z) > 1e-4          # float32 may round z across the kink
            if not keep.all():               # a flipped element changes its group's sums
                tol = 2e-2
        assert gx.dtype == dtype and gx.shape == x.shape
        # scale of the terms that cancel in grad_x (tiny groups give grad_x ~ 0)
        s = max(np.abs(egx).max(), np.abs(dy).max() * float(np.max(rstd)) *
                (1.0 if w is None else float(np.abs(w).max())))
        assert np.max(np.abs(gx - egx)[keep]) / s < tol
        if w is None:
            assert gw is None and gb is None
        else:
            np.testing.assert_allclose(gw, egw, rtol=tol * 10, atol=tol * np.abs(egw).max())
            np.testing.assert_allclose(gb, egb, rtol=tol * 10, atol=tol * np.abs(egb).max())


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("activation", ACTS)
def test_backward_finite_differences(rng, channels_last, activation):
    N, C, spatial, G = 2, 6, (3, 4), 3
    x, w, b = _case(rng, N, C, spatial, G, channels_last, np.float64)
    dy = rng.standard_normal(x.shape)
    kw = dict(channels_last=channels_last, activation=activation)
    loss = lambda x_, w_, b_: float(np.sum(dy * fastnorm.group_norm(x_, G, w_, b_, **kw)))
    _, mean, rstd = fastnorm.group_norm(x, G, w, b, channels_last=channels_last,
                                        return_stats=True)
    gx, gw, gb = fastnorm.group_norm_backward(dy, x, mean, rstd, G, w, b, **kw)
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
    x, w, b = _case(rng, N, C, spatial, G, channels_last, np.float32)
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


def test_empty_inputs():
    x = np.zeros((0, 8, 4, 4), np.float32)
    y, m, r = fastnorm.group_norm(x, 4, return_stats=True)
    assert y.shape == x.shape and m.shape == (0, 4) and r.shape == (0, 4)
    gx, gw, gb = fastnorm.group_norm_backward(x, x, m, r, 4, np.ones(8, np.float32),
                                              np.zeros(8, np.float32))
    assert gx.shape == x.shape and gw.shape == (8,) and not gw.any()
    x = np.zeros((2, 4, 0), np.float64)
    y, m, r = fastnorm.group_norm(x, 2, return_stats=True)
    assert y.shape == (2, 4, 0) and m.shape == (2, 2)


def test_noncontiguous_and_readonly_inputs_are_not_modified(rng):
    base = rng.standard_normal((4, 16, 10, 12))
    x = base[::2, :, 1:, ::2]                         # strided view
    w = rng.standard_normal(32)[::2]
    b = rng.standard_normal(16)
    for a in (base, w, b):
        a.flags.writeable = False
    before = base.copy()
    y = fastnorm.group_norm(x, 4, w, b, activation="relu")
    ey, _, _ = ref.group_norm(x, 4, w, b, activation="relu")
    np.testing.assert_allclose(y, ey, rtol=1e-10, atol=1e-12)
    assert np.array_equal(base, before)
    xcl = np.moveaxis(base, 1, -1)                   # channels-last view of NCHW memory
    y = fastnorm.group_norm(xcl, 4, channels_last=True)
    ey, _, _ = ref.group_norm(xcl, 4, channels_last=True)
    np.testing.assert_allclose(y, ey, rtol=1e-10, atol=1e-12)


def test_errors_name_the_argument():
    x = np.zeros((2, 6, 4), np.float32)
    w6 = np.ones(6, np.float32)
    with pytest.raises(ValueError, match="`num_groups` must divide"):
        fastnorm.group_norm(x, 4)
    with pytest.raises(ValueError, match="`num_groups`"):
        fastnorm.group_norm(x, 0)
    with pytest.raises(TypeError, match="`num_groups`"):
        fastnorm.group_norm(x, 2.0)
    with pytest.raises(ValueError, match="`x` must have at least 2"):
        fastnorm.group_norm(np.zeros(6, np.float32), 2)
    with pytest.raises(ValueError, match=r"`weight` must have shape \(6,\)"):
        fastnorm.group_norm(x, 2, np.ones(5, np.float32))
    with pytest.raises(TypeError, match="`bias` must have the dtype of `x`"):
        fastnorm.group_norm(x, 2, w6, np.ones(6, np.float64))
    with pytest.raises(TypeError, match="`x` must have a floating dtype"):
        fastnorm.group_norm(np.zeros((2, 6, 4), np.int32), 2)
    with pytest.raises(TypeError, match="float16/bfloat16 are supported on CUDA"):
        fastnorm.group_norm(x.astype(np.float16), 2)
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


# ------------------------------------------------------------------ CUDA parity

@pytest.mark.cuda
@pytest.mark.parametrize("N,C,spatial,G", SHAPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("activation", ACTS)
def test_cuda_matches_cpu(rng, N, C, spatial, G, channels_last, activation):
    import cupy as cp
    x, w, b = _case(rng, N, C, spatial, G, channels_last, np.float64)
    dy = rng.standard_normal(x.shape)
    cpu = fastnorm.group_norm(x, G, w, b, channels_last=channels_last, activation=activation,
                              return_stats=True)
    gpu = fastnorm.group_norm(cp.asarray(x), G, cp.asarray(w), cp.asarray(b),
                              channels_last=channels_last, activation=activation,
                              return_stats=True)
    for a, g in zip(cpu, gpu):
        assert isinstance(g, cp.ndarray)
        np.testing.assert_allclose(cp.asnumpy(g), a, rtol=1e-9, atol=1e-10)
    gcpu = fastnorm.group_norm_backward(dy, x, cpu[1], cpu[2], G, w, b,
                                        channels_last=channels_last, activation=activation)
    ggpu = fastnorm.group_norm_backward(cp.asarray(dy), cp.asarray(x), gpu[1], gpu[2], G,
                                        cp.asarray(w), cp.asarray(b),
                                        channels_last=channels_last, activation=activation)
    for a, g in zip(gcpu, ggpu):
        np.testing.assert_allclose(cp.asnumpy(g), a, rtol=1e-8, atol=1e-9)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_low_precision(rng, dtype, channels_last):
    torch = pytest.importorskip("torch")
    x, w, b = _case(rng, 2, 32, (16, 16), 8, channels_last, np.float32, offset=3.0)
    tdt = getattr(torch, dtype)
    xt = torch.from_numpy(x).cuda().to(tdt)
    y, m, r = fastnorm.group_norm(xt, 8, torch.from_numpy(w).cuda().to(tdt),
                                  torch.from_numpy(b).cuda().to(tdt),
                                  channels_last=channels_last, return_stats=True)
    assert y.dtype == tdt and y.is_cuda and m.dtype == torch.float32
    ey, _, _ = ref.group_norm(xt.float().cpu().numpy(), 8, torch.from_numpy(w).to(tdt).float(),
                              torch.from_numpy(b).to(tdt).float(), channels_last=channels_last)
    tol = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 1e-1}[dtype]
    assert np.max(np.abs(y.float().cpu().numpy() - ey)) < tol


@pytest.mark.cuda
def test_cuda_offset_and_determinism(rng):
    import cupy as cp
    x = cp.asarray((1e4 + rng.standard_normal((1, 64, 128, 128))).astype(np.float32))
    y1 = fastnorm.group_norm(x, 2)
    y2 = fastnorm.group_norm(x, 2)
    assert bool((y1 == y2).all())
    ey, _, _ = ref.group_norm(cp.asnumpy(x), 2)
    assert float(np.max(np.abs(cp.asnumpy(y1) - ey))) < 2e-3
