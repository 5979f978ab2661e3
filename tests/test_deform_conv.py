"""deform_conv2d / deform_conv2d_backward: one test body for every backend (cpu, cuda-emulated,
cuda) against the float64 oracle and finite differences; chunking, half types, edge cases,
errors. The CPU kernels' own tiling, GEMM families, threads and interop are tested CPU-only."""
import contextlib

import numpy as np
import pytest

import fastnorm
import fastnorm.deform_conv as dc_mod
from reference.deform_conv import deform_conv2d_backward_ref, deform_conv2d_ref

GRADS = ("x", "offset", "mask", "weight", "bias")       # the backward's outputs, in order

# comparison tolerance (relative to the result's largest magnitude) per dtype; half types: twice
# the unit roundoff (2**-11, 2**-8) of the one final rounding, everything else in float32
TOL = {"float64": 1e-12, "float32": 1e-5, "float16": 1e-3, "bfloat16": 8e-3}


def _pair(v):
    return (v, v) if np.isscalar(v) else tuple(v)


def _out_size(H, W, kh, kw, stride, padding, dilation):
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    return (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1


def _dtype(name):
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _case(rng, N=2, C=4, H=7, W=6, Cout=6, kh=3, kw=3, groups=1, goff=1, stride=1, padding=1,
          dilation=1, std=2.0, dtype=np.float64, with_mask=True, with_bias=True):
    Ho, Wo = _out_size(H, W, kh, kw, stride, padding, dilation)
    d = dict(
        x=rng.standard_normal((N, C, H, W)),
        offset=std * rng.standard_normal((N, 2 * goff * kh * kw, Ho, Wo)),
        weight=rng.standard_normal((Cout, C // groups, kh, kw)),
        bias=rng.standard_normal(Cout) if with_bias else None,
        mask=rng.random((N, goff * kh * kw, Ho, Wo)) if with_mask else None,
    )
    geo = dict(stride=stride, padding=padding, dilation=dilation)
    return _cast(d, dtype), geo


def _cast(d, dtype):
    dtype = _dtype(dtype) if isinstance(dtype, str) else np.dtype(dtype)
    return {k: None if a is None else a.astype(dtype) for k, a in d.items()}


def _on(backend, d):
    return {k: backend.asarray(a) for k, a in d.items()}


def _fwd(d, geo):
    return fastnorm.deform_conv2d(d["x"], d["offset"], d["weight"], d["bias"], mask=d["mask"],
                                  **geo)


def _bwd(gy, d, geo):
    return fastnorm.deform_conv2d_backward(gy, d["x"], d["offset"], d["weight"], mask=d["mask"],
                                           **geo)


def _ref(d, geo):
    return deform_conv2d_ref(d["x"], d["offset"], d["weight"], d["bias"], mask=d["mask"], **geo)


def _ref_bwd(gy, d, geo):
    return deform_conv2d_backward_ref(gy, d["x"], d["offset"], d["weight"], mask=d["mask"], **geo)


def _run(backend, d, geo, gy=None):
    """Forward (and backward for ``gy``) of NumPy inputs on ``backend``: NumPy results, after
    checking that they come back as the backend's arrays of the input dtype."""
    b = _on(backend, d)
    y = _fwd(b, geo)
    assert type(y) is type(b["x"]) and y.dtype == d["x"].dtype
    if gy is None:
        return backend.asnumpy(y)
    g = _bwd(backend.asarray(gy.astype(d["x"].dtype)), b, geo)
    for name, a in zip(GRADS, g):
        if name == "mask" and d["mask"] is None:
            assert a is None
        else:
            assert type(a) is type(b["x"]) and a.dtype == d["x"].dtype, name
    return backend.asnumpy(y), backend.asnumpy(g)


def _close(got, want, dtype, name=""):
    """got ~ want within TOL[dtype] of want's largest magnitude (and relatively)."""
    assert got.shape == want.shape, name
    tol = TOL[str(dtype)]
    scale = max(1.0, np.abs(want).max(initial=0))
    np.testing.assert_allclose(got.astype(np.float64), want, rtol=tol, atol=tol * scale,
                               err_msg=name)


def _check_all(backend, d, geo, rng, dtype=None):
    """Forward and all five gradients on ``backend`` against the oracle, for inputs rounded to
    ``dtype`` (the reference sees exactly the values the backend sees)."""
    dtype = str(d["x"].dtype) if dtype is None else dtype
    d = _cast(d, dtype)
    gy = rng.standard_normal(_out_shape(d, geo)).astype(_dtype(dtype))
    y, g = _run(backend, d, geo, gy)
    _close(y, _ref(d, geo), dtype, "y")
    for name, a, r in zip(GRADS, g, _ref_bwd(gy, d, geo)):
        if r is None:
            assert a is None, name
        else:
            _close(a, r, dtype, "grad_" + name)
    return y, g


def _out_shape(d, geo):
    return (d["x"].shape[0], d["weight"].shape[0]) + d["offset"].shape[2:]


def _counting(backend):
    """Kernel launches of the block on the emulated backend (``c.launches``); None elsewhere."""
    if backend.name == "cuda-emulated":
        return backend.xp.counting()
    return contextlib.nullcontext()


PARAMS = [  # N, C, H, W, Cout, kh, kw, groups, goff, stride, padding, dilation
    (2, 4, 7, 6, 6, 3, 3, 1, 1, 1, 1, 1),
    (1, 6, 9, 8, 4, 3, 2, 2, 3, (2, 1), (1, 2), (1, 2)),
    (3, 4, 5, 5, 4, 1, 1, 4, 2, 1, 0, 1),
    (2, 8, 10, 7, 8, 5, 3, 4, 2, 2, (2, 1), 1),
    (1, 3, 4, 9, 5, 2, 4, 1, 3, (1, 3), 0, (2, 1)),
    (2, 6, 6, 6, 3, 3, 3, 3, 6, 1, 3, 2),
    (2, 6, 9, 8, 4, 3, 3, 2, 3, (2, 1), 1, (1, 2)),
]


@pytest.mark.parametrize("p", PARAMS)
@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_matches_oracle(backend, rng, p, with_mask, dtype):
    N, C, H, W, Cout, kh, kw, groups, goff, stride, padding, dilation = p
    d, geo = _case(rng, N, C, H, W, Cout, kh, kw, groups, goff, stride, padding, dilation,
                   with_mask=with_mask)
    with _counting(backend) as c:
        _check_all(backend, d, geo, rng, dtype)
    if c is not None:
        assert c.launches == 4          # im2col (forward), im2col, col2im, coord (backward)


@pytest.mark.parametrize("p", [PARAMS[0], PARAMS[3], PARAMS[6]])
@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_types_match_oracle_on_rounded_inputs(cuda_backend, rng, p, with_mask, dtype):
    # float16/bfloat16 exist on CUDA only: float32 columns and accumulation, one rounding of each
    # result; the oracle gets the inputs rounded to the half type
    N, C, H, W, Cout, kh, kw, groups, goff, stride, padding, dilation = p
    d, geo = _case(rng, N, C, H, W, Cout, kh, kw, groups, goff, stride, padding, dilation,
                   with_mask=with_mask)
    _check_all(cuda_backend, d, geo, rng, dtype)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_bias_is_added_before_rounding(cuda_backend, dtype):
    # y = w * x + b with w * x = 1000 * (1 + 2u) not representable in the half type (u its unit
    # roundoff) and b = -1000: accumulated in float32 and rounded once, y = 2000u exactly; adding
    # the bias after rounding w * x to the half type gives 2 (fp16) or 8 (bf16)
    t = _dtype(dtype)
    u = {"float16": 2.0**-11, "bfloat16": 2.0**-8}[dtype]
    d = dict(x=np.full((1, 1, 1, 1), 1 + 2 * u), offset=np.zeros((1, 2, 1, 1)),
             weight=np.full((1, 1, 1, 1), 1000.0), bias=np.full(1, -1000.0), mask=None)
    d = _cast(d, t)
    assert d["x"].astype(np.float64)[0, 0, 0, 0] == 1 + 2 * u
    y = _run(cuda_backend, d, {})
    np.testing.assert_array_equal(y.astype(np.float64), [[[[2000 * u]]]])


def _numeric_grads(d, geo, gy, eps=1e-6):
    """Central differences of <gy, oracle forward> for every input of GRADS."""
    out = []
    for name in GRADS:
        a = d[name]
        num = np.zeros_like(a)
        for idx in np.ndindex(a.shape):
            old = a[idx]
            a[idx] = old + eps
            fp = np.vdot(_ref(d, geo), gy)
            a[idx] = old - eps
            fm = np.vdot(_ref(d, geo), gy)
            a[idx] = old
            num[idx] = (fp - fm) / (2 * eps)
        out.append(num)
    return out


FD_PARAMS = [
    (2, 4, 5, 6, 4, 3, 2, 2, 2, (1, 2), (1, 0), (2, 1)),
    (1, 3, 4, 4, 2, 2, 2, 1, 3, 1, 1, 1),
]


@pytest.mark.parametrize("p", FD_PARAMS)
def test_backward_oracle_matches_finite_differences(rng, p):
    # the backward oracle differentiates the forward oracle's formula term by term
    N, C, H, W, Cout, kh, kw, groups, goff, stride, padding, dilation = p
    d, geo = _case(rng, N, C, H, W, Cout, kh, kw, groups, goff, stride, padding, dilation, std=1.5)
    gy = rng.standard_normal(_out_shape(d, geo))
    for name, g, n in zip(GRADS, _ref_bwd(gy, d, geo), _numeric_grads(d, geo, gy)):
        np.testing.assert_allclose(g, n, rtol=1e-6, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("p", FD_PARAMS)
def test_backward_matches_finite_differences(backend, rng, p):
    N, C, H, W, Cout, kh, kw, groups, goff, stride, padding, dilation = p
    d, geo = _case(rng, N, C, H, W, Cout, kh, kw, groups, goff, stride, padding, dilation, std=1.5)
    gy = rng.standard_normal(_out_shape(d, geo))
    _, got = _run(backend, d, geo, gy)
    for name, g, n in zip(GRADS, got, _numeric_grads(d, geo, gy)):
        np.testing.assert_allclose(g, n, rtol=1e-6, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_offsets_off_the_edge_and_integer_positions(backend, rng, dtype):
    d, geo = _case(rng, H=6, W=6, std=6.0)              # many samples fully/partly outside
    d["offset"][:, ::3] = np.round(d["offset"][:, ::3])  # exact integer positions, incl. -1, H
    d["offset"][0, :, 0, 0] = [-2, -1, 6, 6] * 4 + [-1, 6]   # exactly on the zero border
    _check_all(backend, d, geo, rng, dtype)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")    # 1e30 -> half: inf
def test_nan_and_huge_offsets_read_nothing_outside(backend, rng):
    d, geo = _case(rng, H=5, W=5)
    d["offset"][0, 0] = np.nan
    d["offset"][0, 1, 0, 0] = 1e30
    d["offset"][1, 2:4] = -1e300
    d["offset"][1, 5, 1] = np.inf
    d["offset"][1, 7, 2] = -np.inf
    for dtype in backend.floats:
        y, g = _check_all(backend, d, geo, rng, dtype)
        assert np.isfinite(y.astype(np.float64)).all(), dtype
        for name, a in zip(GRADS, g):
            assert np.isfinite(a.astype(np.float64)).all(), (dtype, name)


@pytest.mark.filterwarnings("ignore:invalid value encountered")
@pytest.mark.parametrize("where", ["x_nan", "x_inf", "mask_nan", "weight_nan"])
def test_nan_and_inf_inputs_propagate_like_the_oracle(backend, rng, where):
    # a non-finite pixel reaches every sample whose four corners include it (also with weight 0:
    # 0 * inf is NaN), a NaN weight or mask their own terms; everything else stays finite and
    # exact. NaN vs +-inf in a gradient is left to IEEE arithmetic: only where results are finite
    # is checked, and their values
    d, geo = _case(rng, H=6, W=6, std=1.0)
    d["offset"][:, ::4] = np.round(d["offset"][:, ::4])       # corners with weight 0
    if where == "x_nan":
        d["x"][0, 1, 2, 3] = np.nan
    elif where == "x_inf":
        d["x"][1, 0, 4, 0], d["x"][1, 2, 0, 5] = np.inf, -np.inf
    elif where == "mask_nan":
        d["mask"][1, 3, 2, 2] = np.nan
    else:
        d["weight"][4, 2, 1, 1] = np.nan
    for dtype in backend.floats:
        dt = _cast(d, dtype)
        gy = rng.standard_normal(_out_shape(dt, geo)).astype(dt["x"].dtype)
        y, g = _run(backend, dt, geo, gy)
        for name, a, r in zip(("y",) + GRADS, (y,) + g, (_ref(dt, geo),) + _ref_bwd(gy, dt, geo)):
            a = a.astype(np.float64)
            finite = np.isfinite(r)
            np.testing.assert_array_equal(np.isfinite(a), finite, err_msg=f"{dtype} {name}")
            _close(a[finite], r[finite], dtype, f"{dtype} {name}")
        assert not np.isfinite(y.astype(np.float64)).all(), dtype


def test_v1_equals_v2_with_unit_mask(backend, rng):
    d, geo = _case(rng, C=6, groups=2, goff=3, with_mask=False)
    gy = rng.standard_normal(_out_shape(d, geo))
    y1, g1 = _run(backend, d, geo, gy)
    assert g1[2] is None
    y2, g2 = _run(backend, dict(d, mask=np.ones((2, 27) + d["offset"].shape[2:])), geo, gy)
    np.testing.assert_array_equal(y2, y1)
    for name, a, b in zip(GRADS, g1, g2):
        if a is not None:
            np.testing.assert_allclose(a, b, rtol=1e-14, atol=1e-14, err_msg=name)
    np.testing.assert_allclose(g1[4], gy.sum(axis=(0, 2, 3)), rtol=1e-12)


def test_zero_offsets_equal_convolution(backend, rng):
    torch = pytest.importorskip("torch")
    for groups, stride, padding, dilation in [(1, 1, 1, 1), (2, (2, 1), (0, 2), (1, 2))]:
        d, geo = _case(rng, N=2, C=4, H=9, W=8, Cout=6, groups=groups, stride=stride,
                       padding=padding, dilation=dilation, with_mask=False)
        d["offset"][:] = 0
        want = torch.nn.functional.conv2d(torch.from_numpy(d["x"]), torch.from_numpy(d["weight"]),
                                          torch.from_numpy(d["bias"]), stride=stride,
                                          padding=padding, dilation=dilation, groups=groups)
        np.testing.assert_allclose(_run(backend, d, geo), want.numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cap_rows, chunks", [
    (1, 21),     # one output row per chunk
    (3, 9),      # blocks of 3 rows: 3 + 3 + 1 per sample (a last partial block)
    (7, 3),      # one whole sample per chunk
    (14, 2),     # two whole samples per chunk: 2 + 1 (a last partial chunk)
])
def test_chunked_workspace_gives_same_results(backend, rng, monkeypatch, cap_rows, chunks):
    # WORKSPACE_BYTES bounds the im2col columns of one chunk (C * K rows of Wo columns per output
    # row, in the input type): the kernels see blocks of rows (hb < Ho) or of samples
    d, geo = _case(rng, N=3, C=4, H=7, W=6, goff=2)     # Ho = 7, Wo = 6
    gy = rng.standard_normal(_out_shape(d, geo))
    for dtype in backend.floats:
        dt = _cast(d, dtype)
        full_y, full_g = _run(backend, dt, geo, gy)
        item = dt["x"].itemsize                         # columns in the input type
        with monkeypatch.context() as mp:
            mp.setattr(dc_mod, "WORKSPACE_BYTES", cap_rows * 4 * 9 * 6 * item)
            with _counting(backend) as c:
                y, g = _run(backend, dt, geo, gy)
        if c is not None:
            assert c.launches == 4 * chunks             # 1 forward, 3 backward per chunk
        _close(y, full_y, dtype, "y")
        _close(y, _ref(dt, geo), dtype, "y")
        gy_t = gy.astype(dt["x"].dtype)
        for name, a, b, r in zip(GRADS, g, full_g, _ref_bwd(gy_t, dt, geo)):
            _close(a, b, dtype, "grad_" + name)
            _close(a, r, dtype, "grad_" + name)


def test_no_host_synchronisation(cuda_backend, rng, monkeypatch):
    # the launchers queue kernels and GEMMs only: no result size depends on data, so nothing
    # may wait for the device (also when the call is chunked)
    if cuda_backend.name != "cuda-emulated":
        pytest.skip("counts host synchronisations on the emulator")
    d, geo = _case(rng, N=3, C=4, H=7, W=6, goff=2)
    b = _on(cuda_backend, d)
    gy = cuda_backend.asarray(rng.standard_normal(_out_shape(d, geo)))
    for rows in (None, 3):
        if rows is not None:
            monkeypatch.setattr(dc_mod, "WORKSPACE_BYTES", rows * 4 * 9 * 6 * 8)
        with cuda_backend.xp.counting() as c:
            _fwd(b, geo)
            _bwd(gy, b, geo)
        assert c.syncs == 0 and c.launches == (4 if rows is None else 4 * 9), c


@pytest.mark.parametrize("cpg, goff", [(9, 1), (6, 2), (1, 1)])
def test_cuda_channel_slices(cuda_backend, rng, monkeypatch, cpg, goff):
    # im2col / col2im split each offset group's channels into slices across threads while the
    # grid is small (SPLIT_THREADS): the columns, hence y, grad_offset, grad_mask and
    # grad_weight, are bitwise those of one thread per point looping over all its channels;
    # grad_x (atomics) agrees to rounding
    from fastnorm._cuda import deform_conv as cuda_dc
    d, geo = _case(rng, N=2, C=cpg * goff, H=6, W=5, Cout=4, goff=goff)
    b = _on(cuda_backend, d)
    gy = cuda_backend.asarray(rng.standard_normal(_out_shape(d, geo)))
    runs = []
    for split in (cuda_dc.SPLIT_THREADS, 1):
        monkeypatch.setattr(cuda_dc, "SPLIT_THREADS", split)
        runs.append([cuda_backend.asnumpy(a) for a in (_fwd(b, geo), *_bwd(gy, b, geo))])
    (y, gx, *rest), (y1, gx1, *rest1) = runs
    assert y.tobytes() == y1.tobytes()
    for a, a1 in zip(rest, rest1):
        assert a is None and a1 is None or a.tobytes() == a1.tobytes()
    np.testing.assert_allclose(gx, gx1, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_workspace_stays_within_budget(cuda_backend, rng, monkeypatch, dtype):
    # the columns of a half-precision call are in the half type (the GEMMs take them as they
    # are): WORKSPACE_BYTES counts them at 2 bytes an entry, so a budget of one sample's half
    # columns gives one sample per chunk and no buffer beyond it
    d, geo = _case(rng, N=3, C=4, H=7, W=6, goff=2)     # Ho = 7, Wo = 6
    budget = 4 * 9 * 6 * 7 * 2
    monkeypatch.setattr(dc_mod, "WORKSPACE_BYTES", budget)
    xp, allocs = cuda_backend.xp, []
    empty = xp.empty

    def recording_empty(shape, dtype=float, order="C"):
        a = empty(shape, dtype, order)
        allocs.append(a.nbytes)
        return a
    monkeypatch.setattr(xp, "empty", recording_empty)
    with _counting(cuda_backend) as c:
        _check_all(cuda_backend, d, geo, rng, dtype)
    if c is not None:
        assert c.launches == 4 * 3                      # one chunk per sample
    column_buffers = [n for n in allocs if n >= budget // 2]
    assert column_buffers and max(column_buffers) <= budget, (allocs, budget)


def _recording_gemms(backend, monkeypatch):
    """Record every cuBLAS call of the CUDA launcher (real or emulated): a list of dicts of its
    (column-major) m, n, k, batch count, A/C data types and compute type, by CuPy's names."""
    cublas, rt = backend.xp.cuda.cublas, backend.xp.cuda.runtime
    names = {getattr(rt, t): t for t in ("CUDA_R_16F", "CUDA_R_16BF", "CUDA_R_32F", "CUDA_R_64F")}
    names.update({getattr(cublas, t): t for t in (
        "CUBLAS_COMPUTE_32F", "CUBLAS_COMPUTE_32F_FAST_TF32", "CUBLAS_COMPUTE_64F")})
    gemm, calls = cublas.gemmStridedBatchedEx, []

    def recording(*args):
        (_, _, _, m, n, k, _, _, a_type, _, _, _, b_type, _, _, _, _, c_type, _, _, batch,
         compute, _) = args
        calls.append(dict(m=m, n=n, k=k, batch=batch, a=names[a_type], b=names[b_type],
                          c=names[c_type], compute=names[compute]))
        return gemm(*args)
    monkeypatch.setattr(cublas, "gemmStridedBatchedEx", recording)
    return calls


@pytest.mark.parametrize("N, groups, forward", [(1, 1, 1), (1, 2, 1), (5, 1, 1), (5, 2, 2)])
def test_gemms_per_call(cuda_backend, rng, monkeypatch, N, groups, forward):
    # one chunk (the whole batch): the forward is one batched GEMM per weight group or per sample
    # (whichever is fewer), the backward two: grad_weight reduces over all samples and positions
    # of all weight groups in one call (k = N * Ho * Wo), the column gradient is one more
    calls = _recording_gemms(cuda_backend, monkeypatch)
    d, geo = _case(rng, N=N, C=6, Cout=4, groups=groups, goff=3)
    _check_all(cuda_backend, d, geo, rng)
    assert len(calls) == forward + 2, calls
    grad_w, grad_cols = calls[forward:]
    NL, CgK, Cog = N * 7 * 6, 6 // groups * 9, 4 // groups     # cuBLAS's column-major sizes:
    assert (grad_w["m"], grad_w["n"], grad_w["k"], grad_w["batch"]) == (CgK, Cog, NL, groups)
    assert (grad_cols["m"], grad_cols["n"], grad_cols["k"]) == (NL, CgK, Cog), grad_cols
    assert grad_cols["batch"] == groups, grad_cols


@pytest.mark.parametrize("dtype, ab, c_grad_w", [
    ("float16", "CUDA_R_16F", "CUDA_R_32F"), ("bfloat16", "CUDA_R_16BF", "CUDA_R_32F"),
    ("float32", "CUDA_R_32F", "CUDA_R_32F"), ("float64", "CUDA_R_64F", "CUDA_R_64F")])
def test_gemm_operand_types(cuda_backend, rng, monkeypatch, dtype, ab, c_grad_w):
    # half inputs: half columns, weights and grad_out go to cuBLAS as they are (tensor cores),
    # summed in float32 (CUBLAS_COMPUTE_32F); y and the column gradient come out in the half
    # type, grad_weight in float32 (rounded once at the end). float32 runs in full float32 by
    # default (no TF32), float64 in float64
    monkeypatch.delenv("FASTNORM_TF32", raising=False)
    calls = _recording_gemms(cuda_backend, monkeypatch)
    d, geo = _case(rng, N=2, C=4, Cout=6)
    _check_all(cuda_backend, d, geo, rng, dtype)
    compute = "CUBLAS_COMPUTE_64F" if dtype == "float64" else "CUBLAS_COMPUTE_32F"
    assert [(c["a"], c["b"], c["c"], c["compute"]) for c in calls] == [
        (ab, ab, ab, compute), (ab, ab, c_grad_w, compute), (ab, ab, ab, compute)], calls


@pytest.mark.parametrize("env, tf32", [(None, False), ("0", False), ("1", True)])
def test_tf32_is_an_explicit_opt_in(cuda_backend, rng, monkeypatch, env, tf32):
    # float32 GEMMs use TF32 tensor cores only with FASTNORM_TF32=1 (CuPy's CUPY_TF32 does not
    # switch them); half and float64 GEMMs are not affected
    from fastnorm._cuda import deform_conv as launcher
    monkeypatch.setenv("CUPY_TF32", "1")
    if env is None:
        monkeypatch.delenv(launcher.TF32_ENV, raising=False)
    else:
        monkeypatch.setenv(launcher.TF32_ENV, env)
    calls = _recording_gemms(cuda_backend, monkeypatch)
    # inputs with more mantissa bits than TF32 keeps (10): TF32 rounding shows in the results
    d, geo = _case(rng, N=2, C=8, Cout=8, std=0.7)
    d = {k: None if a is None else a * (1 + 2.0**-12) for k, a in d.items()}
    gy = rng.standard_normal(_out_shape(d, geo)).astype(np.float32)
    d32 = _cast(d, np.float32)
    y, g = _run(cuda_backend, d32, geo, gy)
    want = "CUBLAS_COMPUTE_32F_FAST_TF32" if tf32 else "CUBLAS_COMPUTE_32F"
    assert {c["compute"] for c in calls} == {want}, calls
    ref_y, ref_g = _ref(d32, geo), _ref_bwd(gy, d32, geo)
    if not tf32:
        _close(y, ref_y, "float32", "y")
        for name, a, r in zip(GRADS, g, ref_g):
            _close(a, r, "float32", "grad_" + name)
        return
    # TF32: the inputs of the GEMMs rounded to 11 significant bits (float16's precision), sums
    # in float32: within float16's tolerance of the oracle
    _close(y, ref_y, "float16", "y")
    for name, a, r in zip(GRADS, g, ref_g):
        _close(a, r, "float16", "grad_" + name)
    if cuda_backend.name == "cuda-emulated":       # the emulator always rounds to TF32
        assert np.abs(y - ref_y).max() > 1e-5 * np.abs(ref_y).max()
    calls.clear()
    _run(cuda_backend, d, geo, gy)                  # float64: never TF32
    assert {c["compute"] for c in calls} == {"CUBLAS_COMPUTE_64F"}, calls


def test_bfloat16_below_compute_capability_8(cuda_backend, rng, monkeypatch):
    # cuBLAS has no bfloat16 GEMMs before Ampere: the launcher widens the operands to float32
    # there (the emulated cuBLAS refuses bfloat16 on an emulated 7.0 device, as cuBLAS does)
    if cuda_backend.name != "cuda-emulated":
        pytest.skip("needs an emulated device of compute capability 7.0")
    monkeypatch.setitem(cuda_backend.xp.ATTRIBUTES, "ComputeCapabilityMajor", 7)
    assert cuda_backend.xp.cuda.Device().compute_capability == "70"
    calls = _recording_gemms(cuda_backend, monkeypatch)
    d, geo = _case(rng, N=2, C=6, Cout=4, groups=2, goff=3)
    _check_all(cuda_backend, d, geo, rng, "bfloat16")
    assert calls and {(c["a"], c["c"]) for c in calls} == {("CUDA_R_32F", "CUDA_R_32F")}, calls


def test_grad_weight_one_gemm_equals_chunked(cuda_backend, rng, monkeypatch):
    # grad_weight of the whole batch in one GEMM equals its sum over chunks (one GEMM each,
    # accumulating into it with beta = 1): chunks of 2 samples, of 1 sample, of 3 output rows
    calls = _recording_gemms(cuda_backend, monkeypatch)
    d, geo = _case(rng, N=5, C=6, Cout=4, groups=2, goff=3)      # Ho = 7, Wo = 6
    gy = rng.standard_normal(_out_shape(d, geo))

    def grad_w_gemms():                 # cuBLAS m = C_in/groups * K rows of grad_weight
        return [c for c in calls if c["m"] == 3 * 9]
    for dtype in cuda_backend.floats:
        dt = _cast(d, dtype)
        calls.clear()
        _, (_, _, _, one_gemm, _) = _run(cuda_backend, dt, geo, gy)
        assert [c["k"] for c in grad_w_gemms()] == [5 * 7 * 6], calls
        _close(one_gemm, _ref_bwd(gy.astype(dt["x"].dtype), dt, geo)[3], dtype, "grad_weight")
        for rows, ks in ((14, [84, 84, 42]), (7, [42] * 5), (3, [18, 18, 6] * 5)):
            with monkeypatch.context() as mp:
                mp.setattr(dc_mod, "WORKSPACE_BYTES", rows * 6 * 9 * 6 * dt["x"].itemsize)
                calls.clear()
                _, (_, _, _, chunked, _) = _run(cuda_backend, dt, geo, gy)
            assert [c["k"] for c in grad_w_gemms()] == ks, calls
            _close(chunked, one_gemm, dtype, "grad_weight")


@pytest.mark.parametrize("case", ["empty_batch", "no_output_channels", "empty_map", "tiny_map",
                                  "one_pixel_kernel"])
def test_edge_shapes(backend, rng, case):
    kw = dict(empty_batch=dict(N=0), no_output_channels=dict(Cout=0, with_bias=False),
              empty_map=dict(H=0, W=3, padding=2),           # Ho, Wo = 2, 5: bias only
              tiny_map=dict(N=3, H=1, W=1, goff=2, std=0.7),
              one_pixel_kernel=dict(H=2, W=1, kh=1, kw=1, padding=0, std=0.4))[case]
    d, geo = _case(rng, **kw)
    for dtype in backend.floats:
        y, g = _check_all(backend, d, geo, rng, dtype)
        assert y.shape == _out_shape(d, geo)
        assert [a.shape for a in g] == [d[k].shape for k in GRADS[:4]] + [(d["weight"].shape[0],)]


def test_runs_on_the_arrays_device(cuda_backend, rng):
    # arrays on device 1 while device 0 is current: every allocation and launch of the call
    # (geometry, columns, GEMMs) must happen on device 1
    xp = cuda_backend.xp
    if xp.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs two CUDA devices")
    d, geo = _case(rng, C=6, groups=2, goff=3)
    gy = rng.standard_normal(_out_shape(d, geo))
    with xp.cuda.Device(1):
        b = _on(cuda_backend, d)
        gyd = cuda_backend.asarray(gy)
    with xp.cuda.Device(0):
        y = _fwd(b, geo)
        g = _bwd(gyd, b, geo)
    assert y.device.id == 1 and all(a.device.id == 1 for a in g if a is not None)
    _close(cuda_backend.asnumpy(y), _ref(d, geo), "float64", "y")
    for name, a, r in zip(GRADS, cuda_backend.asnumpy(g), _ref_bwd(gy, d, geo)):
        _close(a, r, "float64", "grad_" + name)


def test_inputs_not_modified(backend, rng):
    d, geo = _case(rng)
    b = _on(backend, d)
    y = _fwd(b, geo)
    _bwd(backend.xp.ones_like(y), b, geo)
    for k, a in d.items():
        if a is not None:
            np.testing.assert_array_equal(backend.asnumpy(b[k]), a, err_msg=k)


def test_non_contiguous_inputs(backend, rng):
    d, geo = _case(rng)
    gy = rng.standard_normal(_out_shape(d, geo))
    want_y, want_g = _run(backend, d, geo, gy)
    # every input a strided view of a bigger array on the backend
    views = {k: backend.asarray(np.stack([a, np.full_like(a, np.nan)], axis=-1))[..., 0]
             for k, a in d.items()}
    assert not views["x"].flags.c_contiguous
    y = _fwd(views, geo)
    g = _bwd(backend.asarray(gy), views, geo)
    np.testing.assert_array_equal(backend.asnumpy(y), want_y)
    for name, a, b in zip(GRADS, backend.asnumpy(g), want_g):
        np.testing.assert_allclose(a, b, rtol=1e-14, atol=1e-14, err_msg=name)


def test_repeatable(backend, rng):
    # everything is bitwise repeatable, except grad_x on CUDA (accumulated with atomics)
    d, geo = _case(rng, N=3, C=8, H=9, W=8, goff=2, dtype=np.float32)
    gy = rng.standard_normal(_out_shape(d, geo))
    y0, g0 = _run(backend, d, geo, gy)
    y1, g1 = _run(backend, d, geo, gy)
    np.testing.assert_array_equal(y1, y0)
    for name, a, b in zip(GRADS, g1, g0):
        if name == "x" and backend.name == "cuda":
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        else:
            np.testing.assert_array_equal(a, b, err_msg=name)


@pytest.mark.parametrize("change, exc, match", [
    (dict(weight=np.zeros((6, 3, 3, 3))), ValueError, "`weight`"),
    (dict(weight=np.zeros((5, 2, 3, 3))), ValueError, "`weight`"),
    (dict(weight=np.zeros((6, 4, 3))), ValueError, "`weight`"),
    (dict(weight=np.zeros((6, 4, 0, 3))), ValueError, "`weight`"),
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
    (dict(bias=np.zeros(6, np.float32)), TypeError, "`bias`"),
    (dict(x=np.zeros((2, 4, 7, 6), np.int64)), TypeError, "`x`"),
    # float16: not a CPU dtype; on CUDA it differs from the other arguments' float64
    (dict(x=np.zeros((2, 4, 7, 6), np.float16)), TypeError, "`x`"),
])
def test_bad_input(backend, rng, change, exc, match):
    d, geo = _case(rng)
    args = {**d, **geo, **change}
    b = _on(backend, args)
    with pytest.raises(exc, match=match):
        fastnorm.deform_conv2d(b["x"], b["offset"], b["weight"], b["bias"], mask=b["mask"],
                               stride=b["stride"], padding=b["padding"], dilation=b["dilation"])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_types_are_cuda_only(backend, rng, dtype):
    d, geo = _case(rng)
    d = _cast(d, dtype)
    if backend.is_cuda:
        _run(backend, d, geo)
    else:
        with pytest.raises(TypeError, match=f"`x`.*{dtype}.*CUDA"):
            _run(backend, d, geo)


def test_mixed_frameworks_rejected(cuda_backend, rng):
    d, geo = _case(rng)
    b = dict(_on(cuda_backend, d), offset=d["offset"])
    with pytest.raises(TypeError, match="`offset`"):
        _fwd(b, geo)


def test_output_size_must_be_positive(backend):
    x = backend.asarray(np.zeros((1, 2, 2, 2)))
    with pytest.raises(ValueError, match="output size of `x`"):
        fastnorm.deform_conv2d(x, backend.asarray(np.zeros((1, 18, 1, 1))),
                               backend.asarray(np.zeros((2, 2, 3, 3))))


def test_backward_bad_grad_out(backend, rng):
    d, geo = _case(rng)
    b = _on(backend, d)
    with pytest.raises(ValueError, match="`grad_out`"):
        _bwd(backend.asarray(np.zeros((2, 6, 7, 5))), b, geo)
    with pytest.raises(ValueError, match="`grad_out`"):
        _bwd(backend.asarray(np.zeros((2, 6, 7))), b, geo)
    with pytest.raises(TypeError, match="`grad_out`"):
        _bwd(backend.asarray(np.zeros((2, 6, 7, 6), np.float32)), b, geo)


# ---------------------------------------------------------------- CPU kernels only

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
    d32 = _cast(d, np.float32)
    ys = []
    for n in (1, 2, 3):
        with fastnorm.threads(n):
            ys.append(_fwd(d32, geo))
    np.testing.assert_allclose(ys[0], _ref(d32, geo), rtol=1e-4, atol=1e-4)
    for y in ys[1:]:
        np.testing.assert_array_equal(y, ys[0])


@pytest.mark.parametrize("isa", ["avx512", "avx2", "baseline"])
def test_every_gemm_kernel_family(rng, tmp_path, isa):
    # A build runs up to three GEMM micro-kernel families (AVX-512, AVX2, baseline: its target's
    # widest and the narrower ones, or in a portable build those the CPU has; GEMM_ISAS). The
    # widest is used; FASTNORM_GEMM_ISA selects a narrower one (in a fresh process: read once),
    # so every family runs here, forward and backward, against the oracle. All families of one
    # build compute the same bits (same arithmetic and order of operations on each output; only
    # the tile shape and registers differ), so each must equal the default family exactly.
    import os
    import subprocess
    import sys
    from fastnorm._cpu import deform_conv as kernel
    if isa not in kernel.GEMM_ISAS:
        pytest.skip(f"this build runs no {isa} kernel on this CPU (it runs {kernel.GEMM_ISAS})")
    d, geo = _case(rng, N=2, C=6, H=11, W=7, Cout=38, groups=2, goff=3)
    gy = rng.standard_normal(_ref(d, geo).shape)
    np.savez(tmp_path / "in.npz", gy=gy, **{k: a for k, a in d.items() if a is not None})
    code = ("import sys, numpy as np, fastnorm\n"
            "from fastnorm._cpu import deform_conv\n"
            "d = dict(np.load(sys.argv[1])); geo = eval(sys.argv[2]); out = {}\n"
            "for t in (np.float64, np.float32):\n"
            "    a = {k: v.astype(t) for k, v in d.items()}\n"
            "    out[t.__name__] = fastnorm.deform_conv2d(a['x'], a['offset'], a['weight'],\n"
            "                                             a['bias'], mask=a['mask'], **geo)\n"
            "    g = fastnorm.deform_conv2d_backward(a['gy'], a['x'], a['offset'], a['weight'],\n"
            "                                        mask=a['mask'], **geo)\n"
            "    for i, gi in enumerate(g):\n"
            "        out[f'{t.__name__}_g{i}'] = gi\n"
            "np.savez(sys.argv[3], isa=deform_conv.gemm_isa(), **out)\n")
    out = tmp_path / "out.npz"
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "in.npz"), repr(geo), str(out)],
                   check=True, env=dict(os.environ, FASTNORM_GEMM_ISA=isa))
    got = np.load(out)
    assert str(got["isa"]) == isa
    np.testing.assert_allclose(got["float64"], _ref(d, geo), rtol=1e-12, atol=1e-12)
    d32 = _cast(d, np.float32)
    np.testing.assert_allclose(got["float32"], _ref(d32, geo), rtol=1e-4, atol=1e-4)
    for t, dd in (("float64", d), ("float32", d32)):
        gyt = gy.astype(t)
        for i, want in enumerate(_ref_bwd(gyt, dd, geo)):
            _close(got[f"{t}_g{i}"], want, t, "grad_" + GRADS[i])
        np.testing.assert_array_equal(got[t], _fwd(dd, geo))
        for i, g in enumerate(_bwd(gyt, dd, geo)):
            np.testing.assert_array_equal(got[f"{t}_g{i}"], g, err_msg="grad_" + GRADS[i])


def test_backward_is_the_adjoint_at_gemm_scale(rng):
    # y is linear in x and in the weight (offsets and mask fixed), so <grad_x, dx> and
    # <grad_weight, dw> must equal <grad_out, y(dx, weight)> and <grad_out, y(x, dw)> for any dx,
    # dw, checked against the oracle's forward. The sizes make the CPU backward's two GEMMs block
    # the reduction (800 positions > 256 per block), leave partial panels (36 output channels per
    # group, 180 columns) and run two weight groups.
    d, geo = _case(rng, N=2, C=40, H=20, W=20, Cout=72, groups=2, goff=2, with_bias=False)
    gy = rng.standard_normal(_ref(d, geo).shape)
    gx, _, _, gw, _ = _bwd(gy, d, geo)
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
            res.append((_fwd(d, geo),) + tuple(_bwd(gy, d, geo)))
    for other in res[1:]:
        for a, b in zip(res[0], other):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("with_mask", [False, True])
def test_read_only_inputs(rng, with_mask):
    d, geo = _case(rng, with_mask=with_mask)
    y = _fwd(d, geo)
    gy = rng.standard_normal(y.shape)
    g = _bwd(gy, d, geo)
    for a in list(d.values()) + [gy]:
        if a is not None:
            a.flags.writeable = False
    np.testing.assert_array_equal(_fwd(d, geo), y)
    for a, b in zip(_bwd(gy, d, geo), g):
        if b is not None:
            np.testing.assert_array_equal(a, b)


def test_torch_round_trip(rng):
    torch = pytest.importorskip("torch")
    d, geo = _case(rng, dtype=np.float32)
    t = {k: None if a is None else torch.from_numpy(a) for k, a in d.items()}
    y = _fwd(t, geo)
    assert isinstance(y, torch.Tensor)
    np.testing.assert_array_equal(y.numpy(), _fwd(d, geo))
    g = _bwd(torch.ones_like(y), t, geo)
    assert all(isinstance(a, torch.Tensor) for a in g)
