"""deform_conv2d / deform_conv2d_backward: oracle, finite differences, edge cases, errors."""
import numpy as np
import pytest

import fastnorm
import fastnorm.deform_conv as dc_mod
from reference.deform_conv import deform_conv2d_ref


def _pair(v):
    return (v, v) if np.isscalar(v) else tuple(v)


def _out_size(H, W, kh, kw, stride, padding, dilation):
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    return (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1


def _case(rng, N=2, C=4, H=7, W=6, Cout=6, kh=3, kw=3, groups=1, goff=1, stride=1, padding=1,
          dilation=1, std=2.0, dtype=np.float64, with_mask=True, with_bias=True):
    Ho, Wo = _out_size(H, W, kh, kw, stride, padding, dilation)
    d = dict(
        x=rng.standard_normal((N, C, H, W)).astype(dtype),
        offset=(std * rng.standard_normal((N, 2 * goff * kh * kw, Ho, Wo))).astype(dtype),
        weight=rng.standard_normal((Cout, C // groups, kh, kw)).astype(dtype),
        bias=rng.standard_normal(Cout).astype(dtype) if with_bias else None,
        mask=rng.random((N, goff * kh * kw, Ho, Wo)).astype(dtype) if with_mask else None,
    )
    geo = dict(stride=stride, padding=padding, dilation=dilation)
    return d, geo


def _fwd(d, geo):
    return fastnorm.deform_conv2d(d["x"], d["offset"], d["weight"], d["bias"], mask=d["mask"], **geo)


def _ref(d, geo):
    return deform_conv2d_ref(d["x"], d["offset"], d["weight"], d["bias"], mask=d["mask"], **geo)


PARAMS = [  # N, C, H, W, Cout, kh, kw, groups, goff, stride, padding, dilation
    (2, 4, 7, 6, 6, 3, 3, 1, 1, 1, 1, 1),
    (1, 6, 9, 8, 4, 3, 2, 2, 3, (2, 1), (1, 2), (1, 2)),
    (3, 4, 5, 5, 4, 1, 1, 4, 2, 1, 0, 1),
    (2, 8, 10, 7, 8, 5, 3, 4, 2, 2, (2, 1), 1),
    (1, 3, 4, 9, 5, 2, 4, 1, 3, (1, 3), 0, (2, 1)),
    (2, 6, 6, 6, 3, 3, 3, 3, 6, 1, 3, 2),
]


@pytest.mark.parametrize("p", PARAMS)
@pytest.mark.parametrize("with_mask", [False, True])
def test_forward_matches_oracle(rng, p, with_mask):
    N, C, H, W, Cout, kh, kw, groups, goff, stride, padding, dilation = p
    d, geo = _case(rng, N, C, H, W, Cout, kh, kw, groups, goff, stride, padding, dilation,
                   with_mask=with_mask)
    np.testing.assert_allclose(_fwd(d, geo), _ref(d, geo), rtol=1e-12, atol=1e-12)
    d32 = {k: None if a is None else a.astype(np.float32) for k, a in d.items()}
    y32 = _fwd(d32, geo)
    assert y32.dtype == np.float32
    np.testing.assert_allclose(y32, _ref(d32, geo), rtol=1e-4, atol=1e-4)


def test_offsets_off_the_edge_and_integer_positions(rng):
    d, geo = _case(rng, H=6, W=6, std=6.0)            # many samples fully/partly outside
    d["offset"][:, ::3] = np.round(d["offset"][:, ::3])  # exact integer positions, incl. -1, H
    np.testing.assert_allclose(_fwd(d, geo), _ref(d, geo), rtol=1e-12, atol=1e-12)


def test_nan_and_huge_offsets_read_nothing_outside(rng):
    d, geo = _case(rng, H=5, W=5)
    d["offset"][0, 0] = np.nan
    d["offset"][0, 1, 0, 0] = 1e30
    d["offset"][1, 2:4] = -1e300
    d["offset"][1, 5, 1] = np.inf
    y = _fwd(d, geo)
    np.testing.assert_allclose(y, _ref(d, geo), rtol=1e-12, atol=1e-12)
    assert np.isfinite(y).all()
    grads = fastnorm.deform_conv2d_backward(np.ones_like(y), d["x"], d["offset"], d["weight"],
                                            mask=d["mask"], **geo)
    for g in grads:
        assert np.isfinite(g).all()


def test_v1_equals_v2_with_unit_mask(rng):
    d, geo = _case(rng, C=6, groups=2, goff=3, with_mask=False)
    y1 = _fwd(d, geo)
    d["mask"] = np.ones((2, 27) + d["offset"].shape[2:])
    np.testing.assert_array_equal(_fwd(d, geo), y1)


def test_zero_offsets_equal_convolution(rng):
    torch = pytest.importorskip("torch")
    for groups, stride, padding, dilation in [(1, 1, 1, 1), (2, (2, 1), (0, 2), (1, 2))]:
        d, geo = _case(rng, N=2, C=4, H=9, W=8, Cout=6, groups=groups, stride=stride,
                       padding=padding, dilation=dilation, with_mask=False)
        d["offset"][:] = 0
        want = torch.nn.functional.conv2d(torch.from_numpy(d["x"]), torch.from_numpy(d["weight"]),
                                          torch.from_numpy(d["bias"]), stride=stride,
                                          padding=padding, dilation=dilation, groups=groups)
        np.testing.assert_allclose(_fwd(d, geo), want.numpy(), rtol=1e-12, atol=1e-12)


def _numeric_grads(d, geo, gy, eps=1e-6):
    names = ["x", "offset", "mask", "weight", "bias"]
    out = []
    for name in names:
        a = d[name]
        num = np.zeros_like(a)
        for idx in np.ndindex(a.shape):
            old = a[idx]
            a[idx] = old + eps
            fp = (_fwd(d, geo) * gy).sum()
            a[idx] = old - eps
            fm = (_fwd(d, geo) * gy).sum()
            a[idx] = old
            num[idx] = (fp - fm) / (2 * eps)
        out.append(num)
    return out


@pytest.mark.parametrize("p", [
    (2, 4, 5, 6, 4, 3, 2, 2, 2, (1, 2), (1, 0), (2, 1)),
    (1, 3, 4, 4, 2, 2, 2, 1, 3, 1, 1, 1),
])
def test_backward_matches_finite_differences(rng, p):
    N, C, H, W, Cout, kh, kw, groups, goff, stride, padding, dilation = p
    d, geo = _case(rng, N, C, H, W, Cout, kh, kw, groups, goff, stride, padding, dilation, std=1.5)
    gy = rng.standard_normal(_fwd(d, geo).shape)
    got = fastnorm.deform_conv2d_backward(gy, d["x"], d["offset"], d["weight"], mask=d["mask"],
                                          **geo)
    for name, g, n in zip(["x", "offset", "mask", "weight", "bias"], got, _numeric_grads(d, geo, gy)):
        assert g.shape == n.shape, name
        np.testing.assert_allclose(g, n, rtol=1e-6, atol=1e-6, err_msg=name)


def test_backward_v1_has_no_mask_grad_and_matches_v2(rng):
    d, geo = _case(rng, with_mask=False)
    gy = rng.standard_normal(_fwd(d, geo).shape)
    g1 = fastnorm.deform_conv2d_backward(gy, d["x"], d["offset"], d["weight"], **geo)
    assert g1[2] is None
    ones = np.ones((2, 9) + d["offset"].shape[2:])
    g2 = fastnorm.deform_conv2d_backward(gy, d["x"], d["offset"], d["weight"], mask=ones, **geo)
    for a, b in zip(g1, g2):
        if a is not None:
            np.testing.assert_allclose(a, b, rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(g1[4], gy.sum(axis=(0, 2, 3)), rtol=1e-12)


@pytest.mark.parametrize("cap_rows", [1, 3, 7])
def test_chunked_workspace_gives_same_results(rng, monkeypatch, cap_rows):
    d, geo = _case(rng, N=3, C=4, H=7, W=6)
    gy = rng.standard_normal(_fwd(d, geo).shape)
    full_y = _fwd(d, geo)
    full_g = fastnorm.deform_conv2d_backward(gy, d["x"], d["offset"], d["weight"], mask=d["mask"],
                                             **geo)
    Wo = full_y.shape[3]
    monkeypatch.setattr(dc_mod, "WORKSPACE_BYTES", cap_rows * 4 * 9 * Wo * 8)
    np.testing.assert_allclose(_fwd(d, geo), full_y, rtol=1e-13, atol=1e-13)
    g = fastnorm.deform_conv2d_backward(gy, d["x"], d["offset"], d["weight"], mask=d["mask"], **geo)
    for a, b in zip(g, full_g):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("tile_bytes", [1, 3000, 1 << 20])
def test_forward_position_blocks_and_weight_panels(rng, monkeypatch, tile_bytes):
    # the fused forward splits each sample's positions into blocks of whole micro-tiles of MR
    # positions (tile_bytes=1: one micro-tile per block) and the output channels of each weight
    # group into panels of NR (MR x NR = 8 x 32 float32 with AVX-512, 6 x 16 AVX2, 3 x 16
    # baseline; half the NR for float64): 11 * 7 = 77 positions (a partial micro-tile) and 2
    # groups of 19 output channels (a partial panel)
    from fastnorm._cpu import deform_conv as kernel
    monkeypatch.setattr(kernel, "TILE_BYTES", tile_bytes)
    d, geo = _case(rng, N=2, C=6, H=11, W=7, Cout=38, groups=2, goff=3)
    np.testing.assert_allclose(_fwd(d, geo), _ref(d, geo), rtol=1e-12, atol=1e-12)
    d32 = {k: None if a is None else a.astype(np.float32) for k, a in d.items()}
    ys = []
    for n in (1, 2, 3):
        with fastnorm.threads(n):
            ys.append(_fwd(d32, geo))
    np.testing.assert_allclose(ys[0], _ref(d32, geo), rtol=1e-4, atol=1e-4)
    for y in ys[1:]:
        np.testing.assert_array_equal(y, ys[0])


@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_every_gemm_kernel_family(rng, tmp_path, isa):
    # the GEMM micro-kernel is picked per CPU (AVX-512, AVX2, baseline); FASTNORM_GEMM_ISA caps
    # the choice so that the narrower kernels run here too (in a fresh process: read once)
    import os
    import subprocess
    import sys
    d, geo = _case(rng, N=2, C=6, H=11, W=7, Cout=38, groups=2, goff=3)
    np.savez(tmp_path / "in.npz", **{k: a for k, a in d.items() if a is not None})
    code = ("import sys, numpy as np, fastnorm\n"
            "d = dict(np.load(sys.argv[1])); geo = eval(sys.argv[2])\n"
            "ys = [fastnorm.deform_conv2d(d['x'].astype(t), d['offset'].astype(t),\n"
            "      d['weight'].astype(t), d['bias'].astype(t), mask=d['mask'].astype(t), **geo)\n"
            "      for t in (np.float64, np.float32)]\n"
            "np.savez(sys.argv[3], y64=ys[0], y32=ys[1])\n")
    out = tmp_path / "out.npz"
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "in.npz"), repr(geo), str(out)],
                   check=True, env=dict(os.environ, FASTNORM_GEMM_ISA=isa))
    got = np.load(out)
    np.testing.assert_allclose(got["y64"], _ref(d, geo), rtol=1e-12, atol=1e-12)
    d32 = {k: a.astype(np.float32) for k, a in d.items()}
    np.testing.assert_allclose(got["y32"], _ref(d32, geo), rtol=1e-4, atol=1e-4)


def test_backward_is_the_adjoint_at_gemm_scale(rng):
    # y is linear in x and in the weight (offsets and mask fixed), so <grad_x, dx> and
    # <grad_weight, dw> must equal <grad_out, y(dx, weight)> and <grad_out, y(x, dw)> for any dx, dw,
    # checked against the oracle's forward. The sizes make the backward's two GEMMs block the
    # reduction (800 positions > 256 per block), leave partial panels (36 output channels per
    # group, 180 columns) and run two weight groups.
    d, geo = _case(rng, N=2, C=40, H=20, W=20, Cout=72, groups=2, goff=2, with_bias=False)
    gy = rng.standard_normal(_ref(d, geo).shape)
    gx, _, _, gw, _ = fastnorm.deform_conv2d_backward(gy, d["x"], d["offset"], d["weight"],
                                                       mask=d["mask"], **geo)
    dx, dw = rng.standard_normal(d["x"].shape), rng.standard_normal(d["weight"].shape)
    lin_x = np.vdot(gy, _ref(dict(d, x=dx), geo))
    lin_w = np.vdot(gy, _ref(dict(d, weight=dw), geo))
    assert abs(np.vdot(gx, dx) - lin_x) <= 1e-10 * (1 + abs(lin_x))
    assert abs(np.vdot(gw, dw) - lin_w) <= 1e-10 * (1 + abs(lin_w))


def test_deterministic_across_thread_counts(rng):
    d, geo = _case(rng, N=3, C=16, H=12, W=11, Cout=8, goff=2, dtype=np.float32)
    gy = rng.standard_normal(_fwd(d, geo).shape).astype(np.float32)
    res = []
    for n in (1, 2, 3):
        with fastnorm.threads(n):
            res.append((_fwd(d, geo),) + tuple(fastnorm.deform_conv2d_backward(
                gy, d["x"], d["offset"], d["weight"], mask=d["mask"], **geo)))
    for other in res[1:]:
        for a, b in zip(res[0], other):
            np.testing.assert_array_equal(a, b)


def test_inputs_not_modified(rng):
    d, geo = _case(rng)
    copies = {k: None if a is None else a.copy() for k, a in d.items()}
    y = _fwd(d, geo)
    fastnorm.deform_conv2d_backward(np.ones_like(y), d["x"], d["offset"], d["weight"],
                                    mask=d["mask"], **geo)
    for k, a in d.items():
        if a is not None:
            np.testing.assert_array_equal(a, copies[k])


@pytest.mark.parametrize("with_mask", [False, True])
def test_read_only_inputs(rng, with_mask):
    d, geo = _case(rng, with_mask=with_mask)
    y = _fwd(d, geo)
    gy = rng.standard_normal(y.shape)
    g = fastnorm.deform_conv2d_backward(gy, d["x"], d["offset"], d["weight"], mask=d["mask"],
                                        **geo)
    for a in list(d.values()) + [gy]:
        if a is not None:
            a.flags.writeable = False
    np.testing.assert_array_equal(_fwd(d, geo), y)
    g_ro = fastnorm.deform_conv2d_backward(gy, d["x"], d["offset"], d["weight"], mask=d["mask"],
                                           **geo)
    for a, b in zip(g_ro, g):
        if b is not None:
            np.testing.assert_array_equal(a, b)


def test_empty_batch_and_empty_output_channels(rng):
    d, geo = _case(rng, N=0)
    y = _fwd(d, geo)
    assert y.shape == (0, 6, 7, 6)
    g = fastnorm.deform_conv2d_backward(y, d["x"], d["offset"], d["weight"], mask=d["mask"], **geo)
    assert [a.shape for a in g] == [(0, 4, 7, 6), d["offset"].shape, d["mask"].shape, (6, 4, 3, 3), (6,)]
    assert not g[3].any() and not g[4].any()
    d, geo = _case(rng, Cout=0, with_bias=False)
    assert _fwd(d, geo).shape == (2, 0, 7, 6)


def test_non_contiguous_inputs(rng):
    d, geo = _case(rng)
    want = _fwd(d, geo)
    d2 = dict(d)
    d2["x"] = np.asfortranarray(d["x"])
    d2["offset"] = d["offset"][:, ::-1].copy()[:, ::-1]
    np.testing.assert_allclose(_fwd(d2, geo), want, rtol=1e-14, atol=1e-14)


def test_torch_round_trip(rng):
    torch = pytest.importorskip("torch")
    d, geo = _case(rng, dtype=np.float32)
    t = {k: None if a is None else torch.from_numpy(a) for k, a in d.items()}
    y = fastnorm.deform_conv2d(t["x"], t["offset"], t["weight"], t["bias"], mask=t["mask"], **geo)
    assert isinstance(y, torch.Tensor)
    np.testing.assert_array_equal(y.numpy(), _fwd(d, geo))
    g = fastnorm.deform_conv2d_backward(torch.ones_like(y), t["x"], t["offset"], t["weight"],
                                        mask=t["mask"], **geo)
    assert all(isinstance(a, torch.Tensor) for a in g)


@pytest.mark.parametrize("change, exc, match", [
    (dict(weight=np.zeros((6, 3, 3, 3))), ValueError, "`weight`"),
    (dict(weight=np.zeros((5, 2, 3, 3))), ValueError, "`weight`"),
    (dict(weight=np.zeros((6, 4, 3))), ValueError, "`weight`"),
    (dict(offset=np.zeros((2, 17, 7, 6))), ValueError, "`offset`"),
    (dict(offset=np.zeros((2, 54, 7, 6))), ValueError, "`offset`"),   # 3 offset groups, C=4
    (dict(offset=np.zeros((2, 18, 6, 6))), ValueError, "`offset`"),
    (dict(offset=np.zeros((1, 18, 7, 6))), ValueError, "`offset`"),
    (dict(mask=np.zeros((2, 18, 7, 6))), ValueError, "`mask`"),
    (dict(mask=np.zeros((2, 9, 7, 5))), ValueError, "`mask`"),
    (dict(bias=np.zeros(5)), ValueError, "`bias`"),
    (dict(x=np.zeros((2, 4, 7))), ValueError, "`x`"),
    (dict(stride=0), ValueError, "`stride`"),
    (dict(stride=(1, -1)), ValueError, "`stride`"),
    (dict(dilation=0), ValueError, "`dilation`"),
    (dict(padding=-1), ValueError, "`padding`"),
    (dict(padding=(1, 2, 3)), ValueError, "`padding`"),
    (dict(stride=1.5), TypeError, "`stride`"),
    (dict(offset=np.zeros((2, 18, 7, 6), np.float32)), TypeError, "`offset`"),
    (dict(mask=np.zeros((2, 9, 7, 6), np.float32)), TypeError, "`mask`"),
    (dict(x=np.zeros((2, 4, 7, 6), np.int64)), TypeError, "`x`"),
    (dict(x=np.zeros((2, 4, 7, 6), np.float16)), TypeError, "`x`"),
])
def test_bad_input(rng, change, exc, match):
    d, geo = _case(rng)
    args = {**d, **geo, **change}
    with pytest.raises(exc, match=match):
        fastnorm.deform_conv2d(args["x"], args["offset"], args["weight"], args["bias"],
                               mask=args["mask"], stride=args["stride"],
                               padding=args["padding"], dilation=args["dilation"])


def test_output_size_must_be_positive(rng):
    x = np.zeros((1, 2, 2, 2))
    with pytest.raises(ValueError, match="output size of `x`"):
        fastnorm.deform_conv2d(x, np.zeros((1, 18, 1, 1)), np.zeros((2, 2, 3, 3)))


def test_backward_bad_grad_out(rng):
    d, geo = _case(rng)
    with pytest.raises(ValueError, match="`grad_out`"):
        fastnorm.deform_conv2d_backward(np.zeros((2, 6, 7, 5)), d["x"], d["offset"], d["weight"],
                                        mask=d["mask"], **geo)
    with pytest.raises(TypeError, match="`grad_out`"):
        fastnorm.deform_conv2d_backward(np.zeros((2, 6, 7, 6), np.float32), d["x"], d["offset"],
                                        d["weight"], mask=d["mask"], **geo)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype, tol", [("float32", 1e-4), ("float64", 1e-11),
                                        ("float16", 3e-2), ("bfloat16", 2e-1)])
@pytest.mark.parametrize("with_mask", [False, True])
def test_cuda_matches_cpu(rng, dtype, tol, with_mask):
    import cupy
    d, geo = _case(rng, N=2, C=6, H=9, W=8, Cout=4, groups=2, goff=3, stride=(2, 1), padding=1,
                   dilation=(1, 2), with_mask=with_mask)
    gy = rng.standard_normal(_fwd(d, geo).shape)
    cpu_y = _fwd(d, geo)
    cpu_g = fastnorm.deform_conv2d_backward(gy, d["x"], d["offset"], d["weight"], mask=d["mask"],
                                            **geo)
    dt = cupy.dtype(dtype) if dtype != "bfloat16" else __import__("ml_dtypes").bfloat16
    g = {k: None if a is None else cupy.asarray(a).astype(dt) for k, a in d.items()}
    y = fastnorm.deform_conv2d(g["x"], g["offset"], g["weight"], g["bias"], mask=g["mask"], **geo)
    assert isinstance(y, cupy.ndarray) and y.dtype == dt
    scale = 1 + np.abs(cpu_y).max()
    np.testing.assert_allclose(cupy.asnumpy(y.astype(cupy.float64)), cpu_y, atol=tol * scale,
                               rtol=tol)
    grads = fastnorm.deform_conv2d_backward(cupy.asarray(gy).astype(dt), g["x"], g["offset"],
                                            g["weight"], mask=g["mask"], **geo)
    for a, b in zip(grads, cpu_g):
        if b is None:
            assert a is None
            continue
        scale = 1 + np.abs(b).max()
        np.testing.assert_allclose(cupy.asnumpy(a.astype(cupy.float64)), b, atol=tol * scale * 4,
                                   rtol=tol)
