"""Property-based hostile-input tests (hypothesis) for every public function.

Every example either corrupts exactly one argument -- then the call must raise the expected
ValueError/TypeError with that argument's name in backticks -- or is valid, and then the result
must be correct: compared with the float64 oracles of tests/reference/ where that is cheap, else
checked through exact identities (the backward of a function linear in x is its adjoint:
``<f(x), g> == <x, f^T(g)>``) and invariants (shape, dtype, finite where the inputs are finite,
zeros for non-finite RoIs, kept indices unique and in score order). Inputs include zero sizes,
non-contiguous and negative-stride views, Fortran order, NaN, +-inf, huge and denormal values.
No other exception is allowed, inputs must come back unmodified, and the process must not crash
(run under .ci/sanitize for out-of-bounds reads).

Every test body runs on every backend (``backend`` fixture: cpu, cuda-emulated, cuda): device
inputs keep the generated layout, and CUDA must raise the same errors, give the same results and
leave its inputs unmodified. float16, a wrong dtype on the CPU, is valid on CUDA.

Budget: the "fastnorm-ci" settings profile (derandomized, so CI is reproducible), about 40
examples per test; ``FASTNORM_HYPOTHESIS_PROFILE=fastnorm-fuzz`` runs 1000 per test with a
random seed for local fuzzing.
"""
import os
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import fastnorm
from reference import deform_conv as ref_dc
from reference import group_norm as ref_gn
from reference import nms as ref_nms
from reference import roi_ops as ref_roi

settings.register_profile(
    "fastnorm-ci", max_examples=int(os.environ.get("FASTNORM_HYPOTHESIS_EXAMPLES", "40")),
    deadline=None, derandomize=True, database=None, print_blob=True,
    suppress_health_check=list(HealthCheck))
settings.register_profile(
    "fastnorm-fuzz", max_examples=1000, deadline=None, database=None, print_blob=True,
    suppress_health_check=list(HealthCheck))
PROFILE = settings.get_profile(os.environ.get("FASTNORM_HYPOTHESIS_PROFILE", "fastnorm-ci"))
fuzz = settings(PROFILE)

DTYPES = st.sampled_from([np.float32, np.float64])
NAMED = re.compile(r"`[A-Za-z_][\w\[\]]*`")
FLAVOURS = ["plain", "plain", "ties", "offset", "huge", "tiny", "denormal", "special", "special"]


# ---------------------------------------------------------------- value and layout generators

def _huge(dtype):
    return 1e30 if dtype == np.float32 else 1e150


def _fill(rng, shape, dtype, flavour):
    """Values of one flavour; 'special' sprinkles NaN, +-inf, huge, denormal and -0."""
    a = rng.standard_normal(shape)
    if flavour == "ties":
        a = np.round(a * 2) / 2
    elif flavour == "offset":
        a = a + 1e4
    elif flavour == "huge":
        a = a * _huge(dtype)
    elif flavour == "tiny":
        a = a * 1e-30
    elif flavour == "denormal":
        a = a * float(np.finfo(dtype).smallest_subnormal) * 64
    elif flavour == "special" and a.size:
        sp = np.array([np.nan, np.inf, -np.inf, _huge(dtype), -_huge(dtype),
                       float(np.finfo(dtype).smallest_subnormal), -0.0])
        hit = rng.random(shape) < rng.choice([0.05, 0.3])
        a = np.where(hit, sp[rng.integers(0, len(sp), shape)], a)
    return a.astype(dtype)


def _layout(a, how):
    """The same values as a C-contiguous, Fortran, strided or negative-stride array."""
    if how == "f":
        return np.asfortranarray(a)
    if how == "strided" and a.ndim:
        big = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
        big[..., ::2] = a
        return big[..., ::2]
    if how == "reversed" and a.ndim:
        return np.ascontiguousarray(a[..., ::-1])[..., ::-1]
    return a


@st.composite
def arrays(draw, shape, dtype, flavour=None):
    flavour = flavour or draw(st.sampled_from(FLAVOURS))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    a = _fill(rng, tuple(shape), dtype, flavour)
    return _layout(a, draw(st.sampled_from(["c", "c", "f", "strided", "reversed"])))


def _finite(*arrays):
    return all(a is None or bool(np.isfinite(a).all()) for a in arrays)


def _to(backend, a):
    """``a`` on the backend, in the same layout: C or Fortran order, strided, negative strides."""
    if not isinstance(a, np.ndarray) or not backend.is_cuda:
        return a
    if a.flags.c_contiguous:
        return backend.asarray(a)
    if a.flags.f_contiguous:
        return backend.asarray(np.ascontiguousarray(a.T)).T
    if a.strides[-1] < 0:
        return backend.asarray(np.ascontiguousarray(a[..., ::-1]))[..., ::-1]
    return backend.asarray(np.repeat(a, 2, axis=-1))[..., ::2]


def _convert(backend, v):
    if isinstance(v, (list, tuple)):
        return type(v)(_convert(backend, x) for x in v)
    if isinstance(v, dict):
        return {k: _convert(backend, x) for k, x in v.items()}
    return _to(backend, v)


def _arrays_in(v):
    if isinstance(v, (list, tuple)):
        return [a for x in v for a in _arrays_in(x)]
    if isinstance(v, dict):
        return _arrays_in(list(v.values()))
    return [] if v is None or isinstance(v, (str, int, float, np.generic)) else [v]


def _run(fn, args, kwargs, bad, backend):
    """Call fn on ``backend``'s arrays; with ``bad = (exc, name)`` it must raise exc naming
    `name`, otherwise succeed (the result comes back as NumPy). Array arguments must come back
    unmodified either way."""
    args, kwargs = _convert(backend, list(args)), _convert(backend, dict(kwargs))
    arrs = [a for a in _arrays_in([args, kwargs]) if hasattr(a, "dtype")]
    before = [backend.asnumpy(a).copy() for a in arrs]
    try:
        if bad is not None:
            exc, name = bad
            with pytest.raises(exc) as info:
                fn(*args, **kwargs)
            msg = str(info.value)
            assert f"`{name}" in msg, f"{exc.__name__} should name `{name}`: {msg}"
            return None
        try:
            return backend.asnumpy(fn(*args, **kwargs))
        except (ValueError, TypeError) as e:   # unexpected, but at least say which
            assert NAMED.search(str(e)), f"error without a named argument: {e!r}"
            raise
    finally:
        for a, b in zip(arrs, before):
            np.testing.assert_array_equal(backend.asnumpy(a), b, err_msg="an input was modified")


def _valid_on(backend, err, array):
    """float16 is a supported dtype on CUDA: the 'wrong dtype' example is valid there."""
    return backend.is_cuda and err is not None and err[0] is TypeError and \
        getattr(array, "dtype", None) == np.float16


def _tol(dtype):
    return 2e-4 if dtype == np.float32 else 1e-9


def _adjoint(lhs, rhs, scale, dtype):
    """<f(x), g> == <x, f^T(g)> up to rounding of sums of |terms| ~ scale (and, for terms in
    the subnormal range, where rounding is absolute, a few subnormal steps)."""
    slack = 64 * float(np.finfo(dtype).smallest_subnormal)
    assert abs(lhs - rhs) <= _tol(dtype) * 10 * (scale + 1e-300) + slack, (lhs, rhs, scale)


def _dot(a, b):
    return float(np.sum(np.asarray(a, np.float64) * np.asarray(b, np.float64)))


def _absdot(a, b):
    return float(np.sum(np.abs(np.asarray(a, np.float64) * np.asarray(b, np.float64))))


# ---------------------------------------------------------------- GroupNorm

@st.composite
def gn_case(draw):
    dtype = draw(DTYPES)
    G = draw(st.integers(1, 4))
    C = G * draw(st.integers(0, 3))
    N = draw(st.integers(0, 3))
    spatial = draw(st.one_of(st.lists(st.integers(0, 5), max_size=3),
                             st.just([16384 + 3])))          # longer than one stats chunk
    cl = draw(st.booleans())
    shape = (N, *spatial, C) if cl else (N, C, *spatial)
    flavour = draw(st.sampled_from(FLAVOURS))
    x = draw(arrays(shape, dtype, flavour))
    w = draw(st.none() | arrays((C,), dtype, "plain"))
    b = draw(st.none() | arrays((C,), dtype, "plain"))
    kw = dict(eps=draw(st.sampled_from([1e-5, 1e-3, 1.0, 1e-20])), channels_last=cl,
              activation=draw(st.sampled_from([None, "relu", "silu"])))
    bad = draw(st.sampled_from([None] * 10 + list(range(9))))
    args = [x, G, w, b]
    err = None
    if bad == 0 and C:
        args[1], err = C + 1, (ValueError, "num_groups")
    elif bad == 1:
        args[1], err = draw(st.sampled_from([0, -1])), (ValueError, "num_groups")
    elif bad == 2:
        args[1], err = draw(st.sampled_from([1.5, "2", None, True])), (TypeError, "num_groups")
    elif bad == 3:
        kw["eps"], err = draw(st.sampled_from([0.0, -1e-5, np.nan, np.inf])), (ValueError, "eps")
    elif bad == 4:
        args[2], err = np.ones(C + 1, dtype), (ValueError, "weight")
    elif bad == 5:
        args[3], err = np.zeros(C, np.float16 if dtype == np.float32 else np.float32), \
            (TypeError, "bias")
    elif bad == 6:
        args[0], err = x.astype(draw(st.sampled_from([np.int32, np.float16, np.complex64,
                                                      np.bool_]))), (TypeError, "x")
    elif bad == 7:
        args[0], err = x.reshape(-1), (ValueError, "x")
    elif bad == 8:
        kw["activation"], err = draw(st.sampled_from(["gelu", "", 1])), (ValueError, "activation")
    return args, kw, err, flavour


def _groups(a, G, cl):
    """(N, C, S) -> (N, G, Cg*S) view of an (N, C, *S) / (N, *S, C) array."""
    a = np.moveaxis(a, -1, 1) if cl else a
    return a.reshape(a.shape[0], G, -1)


@fuzz
@given(case=gn_case())
def test_group_norm_hostile(backend, case):
    (x, G, w, b), kw, err, flavour = case
    assume(not _valid_on(backend, err, x))
    res = _run(fastnorm.group_norm, (x, G, w, b), dict(kw, return_stats=True), err, backend)
    if res is None:
        return
    y, mean, rstd = res
    assert y.shape == x.shape and y.dtype == x.dtype
    assert mean.shape == rstd.shape == (x.shape[0], G)
    if y.size == 0:
        return
    yr, mr, rr = ref_gn.group_norm(x, G, w, b, kw["eps"], kw["channels_last"], kw["activation"])
    ok = np.isfinite(_groups(x, G, kw["channels_last"])).all(-1)       # (N, G) finite groups
    if flavour == "huge" and x.dtype == np.float64:
        ok &= np.isfinite(rr)                      # sum of squares overflows float64 too
    tol = _tol(x.dtype)
    yg, yrg = _groups(y, G, kw["channels_last"]), _groups(yr, G, kw["channels_last"])
    scale = 1 + np.nanmax(np.abs(np.where(np.isfinite(yrg), yrg, 0)))
    np.testing.assert_allclose(yg[ok], yrg[ok], rtol=tol, atol=tol * scale)
    np.testing.assert_allclose(mean[ok], mr[ok], rtol=tol, atol=tol * np.abs(mr[ok]).max(
        initial=1e-300))
    np.testing.assert_allclose(rstd[ok], rr[ok], rtol=tol)

    # backward on the same (valid) case: float64 against the oracle, float32 invariants
    rng = np.random.default_rng(0)
    dy = rng.standard_normal(x.shape).astype(x.dtype)
    gx, gw, gb = _run(fastnorm.group_norm_backward, (dy, x, mean, rstd, G, w, b),
                      dict(channels_last=kw["channels_last"], activation=kw["activation"]), None,
                      backend)
    assert gx.shape == x.shape and gx.dtype == x.dtype
    assert (gw is None) == (w is None) and (gb is None) == (b is None)
    if x.dtype == np.float64 and flavour in ("plain", "ties") and ok.all():
        gxr, gwr, gbr = ref_gn.group_norm_backward(dy, x, G, w, b, kw["eps"],
                                                   kw["channels_last"], kw["activation"])
        s = 1 + np.abs(gxr).max()
        np.testing.assert_allclose(gx, gxr, rtol=1e-7, atol=1e-7 * s)
        if w is not None:
            np.testing.assert_allclose(gw, gwr, rtol=1e-7, atol=1e-7 * (1 + np.abs(gwr).max()))
    elif ok.all() and flavour not in ("huge",):
        assert np.isfinite(gx).all()


# ---------------------------------------------------------------- RoI ops

ROI_OPS = ["roi_align", "roi_pool", "ps_roi_align", "deform_roi_pool", "roi_align_rotated"]
ANGLES = [0, 90, -45, 360, 1e4, 33.3]


@st.composite
def roi_case(draw, op):
    dtype = draw(DTYPES)
    N, H, W = draw(st.integers(0, 2)), draw(st.integers(0, 6)), draw(st.integers(0, 6))
    PH, PW = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    C = draw(st.integers(0, 2)) * PH * PW if op == "ps_roi_align" else draw(st.integers(0, 3))
    cl = op == "roi_align" and draw(st.booleans())
    xflav = draw(st.sampled_from(FLAVOURS))
    x = draw(arrays((N, H, W, C) if cl else (N, C, H, W), dtype, xflav))
    K = draw(st.integers(0, 5)) if N else 0
    scale = draw(st.sampled_from([1.0, 0.5, 2.0, 0.25, 0.0, -1.0]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    L = max(H, W, 1) / (abs(scale) or 1.0)
    rot = op == "roi_align_rotated"            # [b, cx, cy, w, h, angle], else [b, x1, y1, x2, y2]
    r = np.empty((K, 6 if rot else 5))
    r[:, 0] = rng.integers(0, max(N, 1), K)
    r[:, 1:3] = rng.uniform(-0.5 * L, 1.2 * L, (K, 2))
    r[:, 3:5] = (0 if rot else r[:, 1:3]) + rng.uniform(-0.2 * L, 1.2 * L, (K, 2))
    if rot:
        r[:, 5] = rng.choice(ANGLES, K)
    rflav = draw(st.sampled_from(["plain", "plain", "special", "huge"]))
    if rflav == "special" and K:
        hit = rng.random(r[:, 1:].shape) < 0.3
        r[:, 1:] = np.where(hit, rng.choice([np.nan, np.inf, -np.inf, 1e30], hit.shape), r[:, 1:])
    elif rflav == "huge" and K:
        r[:, 1:5] = r[:, 1:5] * rng.choice([1e6, 1e15, -1e30], (K, 1))
    rois = _layout(r.astype(dtype), draw(st.sampled_from(["c", "f", "strided"])))
    kw = dict(output_size=(PH, PW) if draw(st.booleans()) else None, spatial_scale=scale)
    if kw["output_size"] is None:
        kw["output_size"] = PH if PH == PW else (PH, PW)
    if op != "roi_pool":
        kw["sampling_ratio"] = draw(st.sampled_from([-1, 0, 1, 2, 3, 10**6, 2**31 - 1, -5]))
    if op == "roi_align":
        kw.update(aligned=draw(st.booleans()), mode=draw(st.sampled_from(["avg", "max"])),
                  channels_last=cl)
    if rot:
        kw.update(aligned=draw(st.booleans()), clockwise=draw(st.booleans()),
                  angle_unit=draw(st.sampled_from(["degrees", "radians"])))
    offset = mask = None
    if op == "deform_roi_pool":
        offset = draw(st.none() | arrays((K, 2, PH, PW), dtype))
        mask = draw(st.none() | arrays((K, 1, PH, PW), dtype, "plain"))
        kw.update(offset=offset, mask=mask, gamma=draw(st.sampled_from([0.1, 0.0, 1.0, -2.0])))
    as_list = draw(st.booleans()) and K
    if as_list:
        rois = [np.ascontiguousarray(r[r[:, 0] == i, 1:]).astype(dtype) for i in range(N)]
    err = None
    bad = draw(st.sampled_from([None] * 8 + list(range(8))))
    if bad == 0:
        kw["output_size"], err = draw(st.sampled_from([0, (2, 0), -1, (1, 2, 3)])), \
            (ValueError, "output_size")
    elif bad == 1:
        kw["spatial_scale"], err = draw(st.sampled_from([np.nan, np.inf])), \
            (ValueError, "spatial_scale")
    elif bad == 2 and K and not as_list:
        rois = rois.copy()
        rois[rng.integers(0, K), 0] = draw(st.sampled_from([-1, N, 0.5, np.nan, np.inf]))
        err = (ValueError, "rois")
    elif bad == 3 and not as_list:
        rois = np.zeros((K, r.shape[1] + draw(st.sampled_from([-1, 1]))), dtype)
        err = (ValueError, "rois")
    elif bad == 4 and not as_list:
        rois, err = rois.astype(np.float32 if dtype == np.float64 else np.float64), \
            (TypeError, "rois")
    elif bad == 5:
        x, err = x.astype(draw(st.sampled_from([np.int64, np.float16]))), (TypeError, "x")
    elif bad == 6:
        x, err = np.zeros(x.shape[:3], x.dtype), (ValueError, "x")
    elif bad == 7 and rot:
        kw["angle_unit"], err = draw(st.sampled_from(["deg", None])), (ValueError, "angle_unit")
    return x, rois, kw, err, xflav


def _roi_zero(rois, kw):
    """(RoIs whose outputs must be 0, the rois as one array): a non-finite entry; a rotated RoI
    with a negative scaled size when aligned."""
    if isinstance(rois, list):
        rois = np.concatenate([np.c_[np.full(len(r), i), r] for i, r in enumerate(rois)]
                              or [np.zeros((0, 6 if "angle_unit" in kw else 5))])
    r64 = np.asarray(rois, np.float64)
    zero = ~np.isfinite(r64[:, 1:]).all(1)
    if "angle_unit" in kw and kw["aligned"]:
        with np.errstate(invalid="ignore"):
            zero |= (r64[:, 3:5] * kw["spatial_scale"] < 0).any(1)
    return zero, rois


def _angle_scale(kw):
    return (np.pi / 180 if kw["angle_unit"] == "degrees" else 1.0) * (-1 if kw["clockwise"]
                                                                      else 1)


def _forward_ref(op, x, rois, kw, PH, PW):
    sr = kw.get("sampling_ratio", 0)
    if op == "roi_align":
        xx = np.moveaxis(x, -1, 1) if kw["channels_last"] else x
        out = ref_roi.roi_align(np.asarray(xx, np.float64), np.asarray(rois, np.float64), PH, PW,
                                kw["spatial_scale"], sr, kw["aligned"], kw["mode"] == "max")
        return np.moveaxis(out, 1, -1) if kw["channels_last"] else out
    x64, r64 = np.asarray(x, np.float64), np.asarray(rois, np.float64)
    if op == "roi_pool":
        return ref_roi.roi_pool(x64, r64, PH, PW, kw["spatial_scale"])
    if op == "ps_roi_align":
        return ref_roi.ps_roi_align(x64, r64, PH, PW, kw["spatial_scale"], sr)
    if op == "roi_align_rotated":
        return ref_roi.roi_align_rotated(x64, r64, PH, PW, kw["spatial_scale"], sr, kw["aligned"],
                                         _angle_scale(kw))
    K = len(r64)
    off = np.zeros((K, 2, PH, PW)) if kw["offset"] is None else np.asarray(kw["offset"], float)
    mask = np.ones((K, 1, PH, PW)) if kw["mask"] is None else np.asarray(kw["mask"], float)
    return ref_roi.deform_roi_pool(x64, r64, off, mask, PH, PW, kw["spatial_scale"], sr,
                                   kw["gamma"])


def _backward(op, g, x, rois, kw):
    common = {k: kw[k] for k in ("output_size", "spatial_scale")}
    if op == "roi_align":
        return fastnorm.roi_align_backward(g, rois, x.shape, sampling_ratio=kw["sampling_ratio"],
                                           aligned=kw["aligned"], mode=kw["mode"], x=x,
                                           channels_last=kw["channels_last"], **common)
    if op == "roi_pool":
        return fastnorm.roi_pool_backward(g, rois, x.shape, x=x, **common)
    if op == "ps_roi_align":
        return fastnorm.ps_roi_align_backward(g, rois, x.shape,
                                              sampling_ratio=kw["sampling_ratio"], **common)
    if op == "roi_align_rotated":
        return fastnorm.roi_align_rotated_backward(
            g, rois, x.shape, sampling_ratio=kw["sampling_ratio"], aligned=kw["aligned"],
            clockwise=kw["clockwise"], angle_unit=kw["angle_unit"],
            deterministic=len(g) % 2 == 1, **common)
    return fastnorm.deform_roi_pool_backward(g, x, rois, kw["offset"], kw["output_size"],
                                             kw["spatial_scale"], kw["sampling_ratio"],
                                             kw["gamma"], mask=kw["mask"])


@pytest.mark.parametrize("op", ROI_OPS)
@fuzz
@given(data=st.data())
def test_roi_ops_hostile(backend, op, data):
    x, rois, kw, err, xflav = data.draw(roi_case(op))
    assume(not _valid_on(backend, err, x))
    fn = getattr(fastnorm, op)
    if op == "deform_roi_pool":
        kw = dict(kw)
        args = (x, rois, kw.pop("offset"), kw.pop("output_size"), kw.pop("spatial_scale"),
                kw.pop("sampling_ratio"), kw.pop("gamma"))
        out = _run(fn, args, kw, err, backend)
        kw.update(zip(("offset", "output_size", "spatial_scale", "sampling_ratio", "gamma"),
                      args[2:]))
    else:
        out = _run(fn, (x, rois), kw, err, backend)
    if out is None:
        return
    PH, PW = (kw["output_size"],) * 2 if np.isscalar(kw["output_size"]) else kw["output_size"]
    bad_roi, r5 = _roi_zero(rois, kw)
    K = len(r5)
    cl = kw.get("channels_last", False)
    Cout = x.shape[1] // (PH * PW) if op == "ps_roi_align" else x.shape[-1 if cl else 1]
    assert out.shape == ((K, PH, PW, Cout) if cl else (K, Cout, PH, PW))
    assert out.dtype == x.dtype
    assert not out[bad_roi].any(), "a RoI with a non-finite coordinate (or, rotated and " \
        "aligned, a negative size) must give zeros"
    if op == "deform_roi_pool":
        x_ok = _finite(x, kw["offset"], kw["mask"])
    else:
        x_ok = _finite(x)
    if x_ok:
        assert np.isfinite(out).all()
    if 0 in x.shape[2:4] or 0 in x.shape[1:3] and cl:
        assert not out.any(), "an empty feature map must give zeros"
    r64 = np.asarray(r5, np.float64)
    cheap = (x_ok and 0 not in x.shape and -5 <= kw.get("sampling_ratio", 0) <= 3
             and np.isfinite(r64).all()
             and np.abs(r64[:, 1:5] * kw["spatial_scale"]).max(initial=0) < 60
             and (kw.get("offset") is None or np.abs(kw["offset"]).max(initial=0) < 1e3))
    if cheap:
        ref = _forward_ref(op, x, r5, kw, PH, PW)
        s = 1 + np.abs(ref).max(initial=0)
        np.testing.assert_allclose(out, ref, rtol=_tol(x.dtype), atol=_tol(x.dtype) * s)

    # backward: the adjoint identity <f(x), g> == <x, df^T g> (exact for these ops in x)
    g = np.random.default_rng(K).standard_normal(out.shape).astype(x.dtype)
    res = _run(_backward, (op, g, x, rois, kw), {}, None, backend)
    gx = res[0] if op == "deform_roi_pool" else res
    assert gx.shape == x.shape and gx.dtype == x.dtype
    if not x_ok or not np.isfinite(out).all():
        return
    assert np.isfinite(gx).all()
    if xflav in ("huge",):
        return
    _adjoint(_dot(out, g), _dot(x, gx), _absdot(out, g) + _absdot(x, gx), x.dtype)
    if op == "deform_roi_pool":
        goff, gmask = res[1], res[2]
        assert (goff is None) == (kw["offset"] is None) and (gmask is None) == (kw["mask"] is None)
        if gmask is not None:
            _adjoint(_dot(out, g), _dot(kw["mask"], gmask),
                     _absdot(out, g) + _absdot(kw["mask"], gmask), x.dtype)


@st.composite
def pyramid_case(draw):
    """multi_scale_roi_align: 1..3 levels (each half the last, possibly empty maps), RoIs of
    every size and flavour, one argument possibly corrupted."""
    dtype = draw(DTYPES)
    L, N, C = draw(st.integers(1, 3)), draw(st.integers(0, 2)), draw(st.integers(0, 3))
    H, W = draw(st.integers(0, 12)), draw(st.integers(0, 12))
    cl = draw(st.booleans())
    kmin = draw(st.integers(0, 2))
    scales = [2.0 ** -(kmin + i) for i in range(L)]
    xflav = draw(st.sampled_from(FLAVOURS))
    feats = [draw(arrays((N, H >> i, W >> i, C) if cl else (N, C, H >> i, W >> i), dtype, xflav))
             for i in range(L)]
    K = draw(st.integers(0, 6)) if N else 0
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    img = max(H, W, 1) / scales[0]
    r = np.empty((K, 5))
    r[:, 0] = rng.integers(0, max(N, 1), K)
    r[:, 1:3] = rng.uniform(-0.5 * img, 1.2 * img, (K, 2))
    r[:, 3:5] = r[:, 1:3] + rng.uniform(-0.2 * img, 1.5 * img, (K, 2)) * rng.choice(
        [0.05, 0.3, 1, 4], (K, 1))
    rflav = draw(st.sampled_from(["plain", "plain", "special", "huge"]))
    if rflav == "special" and K:
        hit = rng.random(r[:, 1:].shape) < 0.3
        r[:, 1:] = np.where(hit, rng.choice([np.nan, np.inf, -np.inf, 1e30], hit.shape), r[:, 1:])
    elif rflav == "huge" and K:
        r[:, 1:5] = r[:, 1:5] * rng.choice([1e6, 1e15, -1e30], (K, 1))
    rois = _layout(r.astype(dtype), draw(st.sampled_from(["c", "f", "strided"])))
    kw = dict(output_size=draw(st.sampled_from([1, 2, (2, 3)])),
              spatial_scales=scales if kmin != 2 or draw(st.booleans()) else None,
              canonical_scale=draw(st.sampled_from([224, 8, 3.5])),
              canonical_level=draw(st.sampled_from([4, 1, 0, -3])),
              sampling_ratio=draw(st.sampled_from([-1, 0, 1, 2, 10**6])),
              aligned=draw(st.booleans()), channels_last=cl)
    if kw["spatial_scales"] is None:
        kw.pop("spatial_scales")
    as_list = draw(st.booleans()) and K
    if as_list:
        rois = [np.ascontiguousarray(r[r[:, 0] == i, 1:]).astype(dtype) for i in range(N)]
    err = None
    bad = draw(st.sampled_from([None] * 8 + list(range(7))))
    if bad == 0:
        kw["output_size"], err = draw(st.sampled_from([0, (2, 0), -1, (1, 2, 3)])), \
            (ValueError, "output_size")
    elif bad == 1:
        kw["spatial_scales"] = draw(st.sampled_from([scales[:-1] + [scales[-1] * 3],
                                                      scales + [scales[-1] / 2], [np.nan] * L,
                                                      [0.0] * L]))
        err = (ValueError, "spatial_scales")
    elif bad == 2 and K and not as_list:
        rois = rois.copy()
        rois[rng.integers(0, K), 0] = draw(st.sampled_from([-1, N, 0.5, np.nan, np.inf]))
        err = (ValueError, "rois")
    elif bad == 3 and not as_list:
        rois, err = rois.astype(np.float32 if dtype == np.float64 else np.float64), \
            (TypeError, "rois")
    elif bad == 4:
        feats[-1], err = feats[-1].astype(draw(st.sampled_from([np.int64, np.float16]))), \
            (TypeError, f"features[{L - 1}]")
    elif bad == 5 and L > 1:
        shape = list(feats[-1].shape)
        shape[3 if cl else 1] += 1
        feats[-1], err = np.zeros(shape, dtype), (ValueError, f"features[{L - 1}]")
    elif bad == 6:
        kw["canonical_scale"], err = draw(st.sampled_from([0.0, -1.0, np.nan])), \
            (ValueError, "canonical_scale")
    return feats, rois, kw, err, xflav


@fuzz
@given(data=st.data())
def test_multi_scale_roi_align_hostile(backend, data):
    feats, rois, kw, err, xflav = data.draw(pyramid_case())
    assume(not _valid_on(backend, err, feats[-1]))
    out = _run(fastnorm.multi_scale_roi_align, (feats, rois), kw, err, backend)
    if out is None:
        return
    PH, PW = (kw["output_size"],) * 2 if np.isscalar(kw["output_size"]) else kw["output_size"]
    bad_roi, r5 = _roi_zero(rois, kw)
    K, cl, x0 = len(r5), kw["channels_last"], feats[0]
    C = x0.shape[-1 if cl else 1]
    assert out.shape == ((K, PH, PW, C) if cl else (K, C, PH, PW)) and out.dtype == x0.dtype
    assert not out[bad_roi].any(), "a RoI with a non-finite coordinate must give zeros"
    x_ok = _finite(*feats)
    if x_ok:
        assert np.isfinite(out).all()
    r64 = np.asarray(r5, np.float64)
    scales = kw.get("spatial_scales") or [2.0 ** -(2 + i) for i in range(len(feats))]
    if x_ok and np.isfinite(r64).all() and np.abs(r64[:, 1:5]).max(initial=0) < 1e4 \
            and kw["sampling_ratio"] < 10 and not cl and 0 not in x0.shape:
        with np.errstate(all="ignore"):
            ref = ref_roi.multi_scale_roi_align(
                [np.asarray(f, np.float64) for f in feats], r64, PH, PW, scales,
                kw["canonical_scale"], kw["canonical_level"], kw["sampling_ratio"],
                kw["aligned"])
        s = 1 + np.abs(ref).max(initial=0)
        np.testing.assert_allclose(out, ref, rtol=_tol(x0.dtype), atol=_tol(x0.dtype) * s)
    # backward: the adjoint identity over every level
    g = np.random.default_rng(K).standard_normal(out.shape).astype(x0.dtype)
    bkw = {k: v for k, v in kw.items()}
    bkw["deterministic"] = K % 2 == 1
    grads = _run(fastnorm.multi_scale_roi_align_backward,
                 (g, rois, [f.shape for f in feats], bkw.pop("output_size")), bkw, None, backend)
    assert [(a.shape, a.dtype) for a in grads] == [(f.shape, f.dtype) for f in feats]
    if not x_ok or not np.isfinite(out).all():
        return
    assert all(np.isfinite(a).all() for a in grads)
    if xflav in ("huge",):
        return
    _adjoint(_dot(out, g), sum(_dot(f, a) for f, a in zip(feats, grads)),
             _absdot(out, g) + sum(_absdot(f, a) for f, a in zip(feats, grads)), x0.dtype)


# ---------------------------------------------------------------- NMS family and box_iou

def _scores_and_layouts(draw, rng, b, dtype):
    """Scores for the boxes b (ties, NaN, inf sometimes), then both in drawn memory layouts."""
    n = len(b)
    s = rng.choice([0.1, 0.5, 0.9, 0.5], n) if draw(st.booleans()) else rng.random(n)
    if draw(st.booleans()) and n:
        s = np.where(rng.random(n) < 0.2, rng.choice([np.nan, np.inf, -np.inf, -1.0], n), s)
    boxes = _layout(b.astype(dtype), draw(st.sampled_from(["c", "f", "strided", "reversed"])))
    scores = _layout(s.astype(dtype), draw(st.sampled_from(["c", "strided", "reversed"])))
    return boxes, scores


@st.composite
def boxes_case(draw, n_max=24, n=None):
    dtype = draw(DTYPES)
    n = draw(st.integers(0, n_max)) if n is None else n
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    xy = rng.integers(0, 12, (n, 2))
    wh = rng.integers(-2, 9, (n, 2))
    b = np.concatenate([xy, xy + wh], 1).astype(np.float64)
    flav = draw(st.sampled_from(["plain", "plain", "huge", "denormal", "special"]))
    if flav == "huge":        # powers of two keep every coordinate and area exact
        b *= 2.0 ** (100 if dtype == np.float32 else 400)
    elif flav == "denormal":
        b *= 2.0 ** (-140 if dtype == np.float32 else -1060)
    elif flav == "special" and n:
        hit = rng.random((n, 4)) < 0.15
        b = np.where(hit, rng.choice([np.nan, np.inf, -np.inf], (n, 4)), b)
    return (*_scores_and_layouts(draw, rng, b, dtype), flav, rng)


def _box_errors(draw, boxes, scores, kw, thr_name="iou_threshold"):
    """One corrupted argument (or None) for the NMS functions."""
    bad = draw(st.sampled_from([None] * 8 + list(range(6))))
    args = [boxes, scores]
    if bad == 0 and thr_name in kw:
        kw[thr_name] = draw(st.sampled_from([np.nan, -0.1, np.inf]))
        return args, (ValueError, thr_name)
    if bad == 1:
        args[0] = np.zeros((len(boxes), draw(st.sampled_from([3, 5]))), boxes.dtype)
        return args, (ValueError, "boxes")
    if bad == 2:
        args[1] = np.zeros(len(scores) + 1, scores.dtype)
        return args, (ValueError, "scores")
    if bad == 3:
        with np.errstate(invalid="ignore"):     # NaN/inf coordinates: any integer will do
            args[0] = boxes.astype(np.int64)
        return args, (TypeError, "boxes")
    if bad == 4:
        args[1] = scores.astype(np.float32 if scores.dtype == np.float64 else np.float64)
        return args, (TypeError, "scores")
    if bad == 5:
        kw["batch_idx"] = np.full(len(boxes), -1) if len(boxes) else np.zeros(1, np.int64)
        return args, (ValueError, "batch_idx")
    return args, None


def _check_keep(keep, scores, n, max_output=None):
    assert keep.dtype == np.int64 and keep.ndim == 1
    assert len(np.unique(keep)) == len(keep) and ((keep >= 0) & (keep < n)).all()
    if max_output is not None:
        assert len(keep) <= max_output


GREEDY = ["nms", "batched_nms", "diou_nms", "weighted_nms"]


@pytest.mark.parametrize("op", GREEDY)
@fuzz
@given(data=st.data())
def test_greedy_nms_hostile(backend, op, data):
    boxes, scores, flav, rng = data.draw(boxes_case())
    n = len(boxes)
    kw = dict(iou_threshold=data.draw(st.sampled_from([0.0, 0.3, 0.5, 0.7, 1.0, 2.0])),
              score_threshold=data.draw(st.sampled_from([None, None, 0.2, -np.inf, 0.9])),
              max_output=data.draw(st.sampled_from([None, None, 0, 1, 3])))
    if op == "diou_nms":
        kw["beta"] = data.draw(st.sampled_from([1.0, 0.5, 3.0]))
    idxs = rng.integers(-1, 3, n) if op == "batched_nms" else None
    if kw["score_threshold"] == -np.inf:
        kw["score_threshold"] = float("-inf")
        err_st = True
    else:
        err_st = False
    use_batch = data.draw(st.booleans())
    if use_batch:
        kw["batch_idx"] = rng.integers(0, 3, n)
    (boxes, scores), err = _box_errors(data.draw, boxes, scores, kw)
    if err is None and err_st:
        err = (ValueError, "score_threshold")
    if err is None and op == "diou_nms" and data.draw(st.booleans()):
        kw["beta"], err = data.draw(st.sampled_from([0.0, -1.0, np.nan])), (ValueError, "beta")
    if err is None and op == "batched_nms" and data.draw(st.booleans()):
        idxs, err = np.zeros(n, np.float32), (TypeError, "idxs")
    fn = getattr(fastnorm, op)
    thr = kw.pop("iou_threshold")
    args = (boxes, scores, idxs, thr) if op == "batched_nms" else (boxes, scores, thr)
    res = _run(fn, args, kw, err, backend)
    if res is None:
        return
    keep, fused = res if op == "weighted_nms" else (res, None)
    nimg = len(np.unique(kw["batch_idx"])) if "batch_idx" in kw else 1
    _check_keep(keep, scores, n, None if kw["max_output"] is None else kw["max_output"] * nimg)
    if fused is not None:
        assert fused.shape == (len(keep), 4) and fused.dtype == boxes.dtype
    if np.isinf(np.asarray(boxes, np.float64)).any() or (
            flav == "denormal" and boxes.dtype == np.float64):   # areas underflow to 0
        return
    # oracle: per image (batch_idx), per class (batched), greedy on the rest
    images = kw.get("batch_idx", np.zeros(n, np.int64))
    expected = []
    for im in np.unique(images):
        sel = np.flatnonzero(images == im)
        b, s = np.asarray(boxes, np.float64)[sel], np.asarray(scores, np.float64)[sel]
        if op == "batched_nms":
            k = ref_nms.batched(b, s, idxs[sel], thr, score_threshold=kw["score_threshold"],
                                max_output=kw["max_output"])
        elif op == "weighted_nms" and kw["score_threshold"] is None:
            k, fz = ref_nms.weighted(b, s, thr)
            k = k[:kw["max_output"]] if kw["max_output"] is not None else k
        else:
            k = ref_nms.greedy_nms(b, s, thr, crit=1 if op == "diou_nms" else 0,
                                   beta=kw.get("beta", 1.0), score_threshold=kw["score_threshold"],
                                   max_output=kw["max_output"])
        expected.extend(sel[k].tolist())
    np.testing.assert_array_equal(keep, expected)


@pytest.mark.parametrize("op", ["soft_nms", "matrix_nms", "box_iou"])
@fuzz
@given(data=st.data())
def test_score_decay_and_iou_hostile(backend, op, data):
    boxes, scores, flav, rng = data.draw(boxes_case())
    n = len(boxes)
    finite = _finite(boxes)
    no_inf = not np.isinf(np.asarray(boxes, np.float64)).any()   # NaN boxes overlap nothing
    if op == "box_iou":
        b2 = data.draw(boxes_case(8))[0].astype(boxes.dtype)
        metric = data.draw(st.sampled_from(["iou", "giou", "diou", "ciou", "dice"]))
        err = (ValueError, "metric") if metric == "dice" else None
        if err is None and data.draw(st.integers(0, 4)) == 0:
            b2, err = b2.astype(np.float32 if b2.dtype == np.float64 else np.float64), \
                (TypeError, "b")
        out = _run(fastnorm.box_iou, (boxes, b2), dict(metric=metric), err, backend)
        if out is None:
            return
        assert out.shape == (n, len(b2)) and out.dtype == boxes.dtype
        if finite and _finite(b2) and flav == "plain":
            ref = ref_nms.box_metric(np.asarray(boxes, float), np.asarray(b2, float),
                                     ["iou", "giou", "diou", "ciou"].index(metric))
            np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
        if finite and _finite(b2):
            assert not np.isnan(out).any() or flav != "plain"
        return
    kw = {}
    if op == "soft_nms":
        kw = dict(method=data.draw(st.sampled_from(["gaussian", "linear"])),
                  sigma=data.draw(st.sampled_from([0.5, 0.01, 10.0])),
                  iou_threshold=data.draw(st.sampled_from([0.0, 0.3, 1.0])),
                  score_threshold=data.draw(st.sampled_from([0.001, 0.0, -1.0, 0.5])))
    else:
        kw = dict(kernel=data.draw(st.sampled_from(["gaussian", "linear"])),
                  sigma=data.draw(st.sampled_from([2.0, 0.1, 50.0])))
    (boxes, scores), err = _box_errors(data.draw, boxes, scores, kw)
    if err is None and data.draw(st.integers(0, 3)) == 0:
        kw["sigma"], err = data.draw(st.sampled_from([0.0, -1.0, np.nan])), (ValueError, "sigma")
    if err is None and data.draw(st.integers(0, 5)) == 0:
        name = "method" if op == "soft_nms" else "kernel"
        kw[name], err = "box", (ValueError, name)
    res = _run(getattr(fastnorm, op), (boxes, scores), kw, err, backend)
    if res is None:
        return
    s64 = np.asarray(scores, np.float64)
    b64 = np.asarray(boxes, np.float64)
    if op == "matrix_nms":
        assert res.shape == (n,) and res.dtype == scores.dtype
        if no_inf and not np.isinf(s64).any() and flav in ("plain", "special"):
            ref = ref_nms.matrix(b64, s64, kw["kernel"], kw["sigma"])
            np.testing.assert_allclose(res, ref, rtol=_tol(scores.dtype) * 10, atol=1e-7)
        return
    keep, new = res
    _check_keep(keep, scores, n)
    assert new.shape == keep.shape and new.dtype == scores.dtype
    assert (new >= kw["score_threshold"]).all()
    if no_inf and scores.dtype == np.float64 and flav in ("plain", "special") \
            and "batch_idx" not in kw:
        ki, ks = ref_nms.soft(b64, s64, kw["method"], kw["sigma"], kw["iou_threshold"],
                              kw["score_threshold"])
        np.testing.assert_array_equal(keep, ki)
        np.testing.assert_allclose(new, ks, rtol=1e-12)


@st.composite
def rotated_case(draw, n_max=20, n=None):
    """Rotated boxes (cx, cy, w, h, degrees): small integer centres and sizes (some <= 0),
    angles of every kind; flavours as boxes_case."""
    dtype = draw(DTYPES)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n = int(rng.integers(0, n_max + 1)) if n is None else n     # not shrunk towards 0
    b = np.concatenate([rng.integers(0, 12, (n, 2)), rng.integers(-2, 9, (n, 2)),
                        np.zeros((n, 1))], 1).astype(np.float64)
    angles = draw(st.sampled_from(["random", "random", "right", "mixed", "huge"]))
    b[:, 4] = {"random": rng.uniform(-360, 360, n), "right": rng.integers(-4, 5, n) * 90.0,
               "mixed": rng.choice([0.0, 15.0, 30.0, 45.0, 60.0, -90.0, 180.0], n),
               "huge": rng.uniform(-1e6, 1e6, n)}[angles]
    flav = draw(st.sampled_from(["plain", "plain", "plain", "huge", "special"]))
    if flav == "huge":
        b[:, :4] *= 2.0 ** (50 if dtype == np.float32 else 200)
    elif flav == "special" and n:
        hit = rng.random((n, 5)) < 0.1
        b = np.where(hit, rng.choice([np.nan, np.inf, -np.inf], (n, 5)), b)
    return (*_scores_and_layouts(draw, rng, b, dtype), flav, rng)


ROTATED = ["box_iou_rotated", "nms_rotated", "batched_nms_rotated"]


@pytest.mark.parametrize("op", ROTATED)
@fuzz
@given(data=st.data())
def test_rotated_hostile(backend, op, data):
    boxes, scores, flav, rng = data.draw(rotated_case(8 if op == "box_iou_rotated" else 32))
    n = len(boxes)
    conv = dict(clockwise=data.draw(st.booleans()),
                angle_unit=data.draw(st.sampled_from(["degrees", "radians"])))
    scale = (-1 if conv["clockwise"] else 1) * (ref_nms.DEG if conv["angle_unit"] == "degrees"
                                                else 1.0)
    err = None
    if data.draw(st.integers(0, 9)) == 0:
        conv["angle_unit"], err = "gradians", (ValueError, "angle_unit")
    b64 = np.asarray(boxes, np.float64)
    if op == "box_iou_rotated":
        with np.errstate(over="ignore"):              # huge float64 boxes: inf in float32
            b2 = data.draw(rotated_case(8))[0].astype(boxes.dtype)
        if err is None and data.draw(st.integers(0, 4)) == 0:
            b2, err = np.zeros((len(b2), 4), b2.dtype), (ValueError, "b")
        out = _run(fastnorm.box_iou_rotated, (boxes, b2), conv, err, backend)
        if out is None:
            return
        assert out.shape == (n, len(b2)) and out.dtype == boxes.dtype
        assert ((out >= 0) & (out <= 1)).all()           # no NaN, whatever the boxes
        if flav != "special":
            ref = ref_nms.box_iou_rotated(b64, np.asarray(b2, np.float64), scale)
            np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-9)
        return
    # the options from the case's generator: varied, not shrunk towards the simplest
    kw = dict(iou_threshold=float(rng.choice([0.05, 0.137, 0.137, 0.37, 0.61, 1.0])),
              score_threshold=[None, None, 0.2, 0.9][rng.integers(4)],
              max_output=[None, None, None, 0, 3][rng.integers(5)], **conv)
    idxs = rng.integers(-1, 1, n) if op == "batched_nms_rotated" else None
    if data.draw(st.booleans()):
        kw["batch_idx"] = rng.integers(0, 3, n)
    if err is None and data.draw(st.integers(0, 2)) == 0:    # mostly valid calls: the oracle
        (boxes, scores), err = _box_errors(data.draw, boxes, scores, kw)
        if err is not None and err[1] == "boxes" and boxes.ndim == 2 and boxes.shape[1] == 5:
            boxes = np.zeros((n, 4), boxes.dtype)          # wrong width for rotated boxes
    thr = kw.pop("iou_threshold")
    fn = getattr(fastnorm, op)
    args = (boxes, scores, idxs, thr) if idxs is not None else (boxes, scores, thr)
    keep = _run(fn, args, kw, err, backend)
    if keep is None:
        return
    nimg = len(np.unique(kw["batch_idx"])) if "batch_idx" in kw else 1
    _check_keep(keep, scores, n, None if kw["max_output"] is None else kw["max_output"] * nimg)
    if flav == "special":          # (huge: scaled by a power of two, the same decisions)
        return
    images = kw.get("batch_idx", np.zeros(n, np.int64))
    for t in (thr, 0.05, 0.3):          # (more decisions per example against the oracle)
        if t != thr:
            keep = _run(fn, args[:-1] + (t,), kw, None, backend)
        expected = []
        for im in np.unique(images):
            sel = np.flatnonzero(images == im)
            b, s = b64[sel], np.asarray(scores, np.float64)[sel]
            opts = dict(scale=scale, score_threshold=kw["score_threshold"],
                        max_output=kw["max_output"])
            k = ref_nms.batched_rotated(b, s, idxs[sel], t, **opts) if idxs is not None \
                else ref_nms.greedy_nms_rotated(b, s, t, **opts)
            expected.extend(sel[k].tolist())
        np.testing.assert_array_equal(keep, expected)


@fuzz
@given(data=st.data())
def test_softer_nms_hostile(backend, data):
    boxes, scores, flav, rng = data.draw(boxes_case())
    n = len(boxes)
    var = np.abs(data.draw(arrays((n, 4), boxes.dtype, data.draw(st.sampled_from(
        ["plain", "plain", "plain", "ties", "special", "huge", "tiny", "denormal"])))))
    if n and data.draw(st.booleans()):              # certain coordinates
        var = np.where(rng.random((n, 4)) < 0.2, 0.0, var).astype(boxes.dtype)
    kw = dict(sigma_t=data.draw(st.sampled_from([0.01, 0.5, 1e-300, 1e300])),
              method=data.draw(st.sampled_from(["gaussian", "linear", "hard"])),
              sigma=data.draw(st.sampled_from([0.5, 0.01])),
              iou_threshold=data.draw(st.sampled_from([0.0, 0.3, 1.0])),
              score_threshold=data.draw(st.sampled_from([0.001, 0.0, -1.0, 0.5])))
    (boxes, scores), err = _box_errors(data.draw, boxes, scores, kw)
    bad = data.draw(st.sampled_from([None] * 6 + list(range(5)))) if err is None else None
    if bad == 0:
        kw["sigma_t"], err = data.draw(st.sampled_from([0.0, -1.0, np.nan])), (ValueError,
                                                                                 "sigma_t")
    elif bad == 1:
        kw["method"], err = "box", (ValueError, "method")
    elif bad == 2 and n:
        var, err = -var - 1, (ValueError, "variances")
    elif bad == 3:
        var, err = np.ones((n, 2), var.dtype), (ValueError, "variances")
    elif bad == 4:
        with np.errstate(over="ignore"):
            var = var.astype(np.float32 if var.dtype == np.float64 else np.float64)
        err = (TypeError, "variances")
    res = _run(fastnorm.softer_nms, (boxes, scores, var), kw, err, backend)
    if res is None:
        return
    keep, voted, new = res
    _check_keep(keep, scores, n)
    assert voted.shape == (len(keep), 4) and voted.dtype == boxes.dtype
    assert new.shape == keep.shape and new.dtype == scores.dtype
    assert (new >= kw["score_threshold"]).all()
    b64, v64 = np.asarray(boxes, np.float64), np.asarray(var, np.float64)
    if n and _finite(boxes):                        # weighted means of the boxes' coordinates
        lo, hi = b64.min(0), b64.max(0)
        slack = _tol(boxes.dtype) * np.maximum(np.abs(lo), np.abs(hi))
        assert ((voted >= lo - slack) & (voted <= hi + slack)).all()
    pos = v64[np.isfinite(v64) & (v64 > 0)]         # the oracle's p / v must not overflow
    if not np.isinf(b64).any() and flav in ("plain", "special") and "batch_idx" not in kw \
            and ((pos > 1e-150) & (pos < 1e150)).all():
        ki, kb, ks = ref_nms.softer(b64, np.asarray(scores, np.float64), v64, kw["sigma_t"],
                                    kw["method"], kw["sigma"], kw["iou_threshold"],
                                    kw["score_threshold"])
        np.testing.assert_array_equal(keep, ki)
        np.testing.assert_allclose(voted, kb, rtol=_tol(boxes.dtype), atol=1e-12)
        np.testing.assert_allclose(new, ks, rtol=_tol(scores.dtype))


@pytest.mark.parametrize("op", ["iou_guided_nms", "adaptive_nms"])
@fuzz
@given(data=st.data())
def test_guided_and_adaptive_nms_hostile(backend, op, data):
    boxes, scores, flav, rng = data.draw(boxes_case())
    n = len(boxes)
    name = "localization" if op == "iou_guided_nms" else "densities"
    extra = data.draw(arrays((n,), scores.dtype, data.draw(st.sampled_from(
        ["plain", "plain", "ties", "special", "huge"]))))
    kw = dict(iou_threshold=data.draw(st.sampled_from([0.0, 0.3, 0.5, 1.0])))
    if op == "iou_guided_nms":
        kw.update(score_threshold=data.draw(st.sampled_from([None, None, 0.2])),
                  max_output=data.draw(st.sampled_from([None, None, 0, 3])))
        if data.draw(st.booleans()):
            kw["idxs"] = rng.integers(-1, 3, n)
    else:
        kw.update(method=data.draw(st.sampled_from(["hard", "linear", "gaussian"])),
                  score_threshold=data.draw(st.sampled_from([0.001, 0.0, -1.0, 0.5])))
    if data.draw(st.booleans()):
        kw["batch_idx"] = rng.integers(0, 3, n)
    (boxes, scores), err = _box_errors(data.draw, boxes, scores, kw)
    bad = data.draw(st.sampled_from([None] * 6 + [0, 1])) if err is None else None
    if bad == 0:
        extra, err = np.ones(n + 1, extra.dtype), (ValueError, name)
    elif bad == 1:
        with np.errstate(over="ignore"):
            extra = extra.astype(np.float32 if extra.dtype == np.float64 else np.float64)
        err = (TypeError, name)
    res = _run(getattr(fastnorm, op), (boxes, scores, extra), kw, err, backend)
    if res is None:
        return
    soft = op == "iou_guided_nms" or kw["method"] != "hard"
    keep, new = res if soft else (res, None)
    nimg = len(np.unique(kw["batch_idx"])) if "batch_idx" in kw else 1
    cap = kw.get("max_output")
    _check_keep(keep, scores, n, None if cap is None else cap * nimg)
    if new is not None:
        assert new.shape == keep.shape and new.dtype == scores.dtype
    b64, s64, e64 = (np.asarray(a, np.float64) for a in (boxes, scores, extra))
    if np.isinf(b64).any() or (flav == "denormal" and boxes.dtype == np.float64) \
            or "batch_idx" in kw:
        return
    if op == "iou_guided_nms":
        ki, ks = ref_nms.iou_guided(b64, s64, e64, kw["iou_threshold"], idxs=kw.get("idxs"),
                                    score_threshold=kw["score_threshold"], max_output=cap)
    else:
        ki, ks = ref_nms.adaptive(b64, s64, e64, kw["iou_threshold"], kw["method"], 0.5,
                                  kw["score_threshold"])
    np.testing.assert_array_equal(keep, ki)
    if new is not None and not np.isinf(s64).any():
        np.testing.assert_allclose(new, ks, rtol=_tol(scores.dtype))


@fuzz
@given(data=st.data())
def test_combined_nms_hostile(backend, data):
    B, N, C = (data.draw(st.integers(0, 3)), data.draw(st.integers(0, 8)),
               data.draw(st.integers(0, 3)))
    specific = data.draw(st.booleans())
    boxes, scores, flav, rng = data.draw(boxes_case(n=B * N * (C if specific else 1)))
    layout = st.sampled_from(["c", "f", "strided", "reversed"])
    boxes = _layout(np.ascontiguousarray(boxes).reshape((B, N) + (C,) * specific + (4,)),
                    data.draw(layout))
    s = rng.choice([0.1, 0.5, 0.9], (B, N, C)) if data.draw(st.booleans()) else \
        rng.random((B, N, C))
    if data.draw(st.booleans()):
        s = np.where(rng.random(s.shape) < 0.2, rng.choice([np.nan, np.inf, -np.inf], s.shape), s)
    scores = _layout(s.astype(boxes.dtype), data.draw(layout))
    kw = dict(max_output_per_class=data.draw(st.sampled_from([None, 0, 1, 3])),
              max_total=data.draw(st.sampled_from([0, 1, 5, 40])),
              iou_threshold=data.draw(st.sampled_from([0.0, 0.3, 0.5, 1.0, 2.0])),
              score_threshold=data.draw(st.sampled_from([None, None, 0.2, -1.0, 0.9])),
              class_agnostic=data.draw(st.booleans()),
              pre_nms_top_k=data.draw(st.sampled_from([None, None, 1, 4])))
    bad = data.draw(st.sampled_from([None] * 8 + list(range(9))))
    err = None
    if bad == 0:
        boxes, err = np.zeros((B, N, 5), boxes.dtype), (ValueError, "boxes")
    elif bad == 1:
        scores, err = np.zeros((B, N), scores.dtype), (ValueError, "scores")
    elif bad == 2:
        with np.errstate(invalid="ignore"):
            boxes, err = boxes.astype(np.int64), (TypeError, "boxes")
    elif bad == 3:
        scores = scores.astype(np.float32 if scores.dtype == np.float64 else np.float64)
        err = (TypeError, "boxes")               # the dtype of `scores`, which is checked first
    elif bad in (4, 5, 6, 7, 8):
        name, value = [("max_total", -1), ("max_output_per_class", -2),
                       ("iou_threshold", np.nan), ("score_threshold", np.inf),
                       ("pre_nms_top_k", 0)][bad - 4]
        kw[name], err = value, (ValueError, name)
    res = _run(fastnorm.combined_nms, (boxes, scores), dict(kw, return_indices=True), err,
               backend)
    if res is None:
        return
    K = kw["max_total"]
    out_boxes, out_scores, classes, num, idx = res
    assert [a.shape for a in res] == [(B, K, 4), (B, K), (B, K), (B,), (B, K)]
    assert out_boxes.dtype == out_scores.dtype == boxes.dtype
    assert classes.dtype == num.dtype == idx.dtype == np.int64
    assert ((num >= 0) & (num <= K)).all()
    filled = np.arange(K) < num[:, None]
    assert (idx[filled] >= 0).all() and (idx[filled] < N).all() and (idx[~filled] == -1).all()
    assert not out_boxes[~filled].any() and not out_scores[~filled].any()
    if np.isinf(np.asarray(boxes, np.float64)).any() or (
            flav == "denormal" and boxes.dtype == np.float64):   # areas underflow to 0
        return
    want = ref_nms.combined(boxes, scores, **kw)
    for g, w, name in zip(res, want, ("boxes", "scores", "classes", "num", "indices")):
        np.testing.assert_array_equal(g.astype(np.float64), w, err_msg=name)


# ---------------------------------------------------------------- deformable convolution

@st.composite
def dc_case(draw):
    dtype = draw(DTYPES)
    N = draw(st.integers(0, 2))
    groups, Goff = draw(st.sampled_from([(1, 1), (2, 1), (1, 2), (2, 2)]))
    C = max(groups, Goff) * draw(st.integers(1, 2))
    Cout = groups * draw(st.integers(1, 2))
    kh, kw_ = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    H, W = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    stride, pad, dil = (draw(st.integers(1, 2)), draw(st.integers(0, 2)),
                        draw(st.integers(1, 2)))
    Ho = (H + 2 * pad - dil * (kh - 1) - 1) // stride + 1
    Wo = (W + 2 * pad - dil * (kw_ - 1) - 1) // stride + 1
    flav = draw(st.sampled_from(FLAVOURS))
    x = draw(arrays((N, C, H, W), dtype, flav))
    weight = draw(arrays((Cout, C // groups, kh, kw_), dtype, "plain"))
    oshape = (N, 2 * Goff * kh * kw_, max(Ho, 1), max(Wo, 1))
    oflav = draw(st.sampled_from(["plain", "huge", "special", "offset"]))
    offset = draw(arrays(oshape, dtype, oflav))
    mask = draw(st.none() | arrays((N, Goff * kh * kw_) + oshape[2:], dtype, "plain"))
    bias = draw(st.none() | arrays((Cout,), dtype, "plain"))
    kw = dict(mask=mask, stride=stride, padding=pad, dilation=dil)
    err = None if Ho > 0 and Wo > 0 else (ValueError, "x")
    bad = draw(st.sampled_from([None] * 8 + list(range(6))))
    if err is None and bad == 0:
        offset, err = offset[:, :-1], (ValueError, "offset")
    elif err is None and bad == 1:
        kw["stride"], err = draw(st.sampled_from([0, (1, 0), -1])), (ValueError, "stride")
    elif err is None and bad == 2:
        kw["padding"], err = -1, (ValueError, "padding")
    elif err is None and bad == 3:
        weight, err = weight.astype(np.float16), (TypeError, "weight")
    elif err is None and bad == 4 and mask is not None:
        kw["mask"], err = mask[:, :, :-1], (ValueError, "mask")
    elif err is None and bad == 5:
        bias, err = np.zeros(Cout + 1, dtype), (ValueError, "bias")
    return x, offset, weight, bias, kw, err, flav


@fuzz
@given(case=dc_case())
def test_deform_conv2d_hostile(backend, case):
    x, offset, weight, bias, kw, err, flav = case
    y = _run(fastnorm.deform_conv2d, (x, offset, weight, bias), kw, err, backend)
    if y is None:
        return
    N, Cout = x.shape[0], weight.shape[0]
    assert y.shape == (N, Cout) + offset.shape[2:] and y.dtype == x.dtype
    ok = _finite(x, weight, bias, kw["mask"])
    if ok:
        assert np.isfinite(y).all(), "non-finite offsets must sample as outside (0)"
    if ok and flav != "huge":
        ref = ref_dc.deform_conv2d_ref(x, offset, weight, bias, kw["mask"], kw["stride"],
                                       kw["padding"], kw["dilation"])
        s = 1 + (np.abs(weight).sum((1, 2, 3)).max() * np.abs(x).max(initial=0)
                 * (1 if kw["mask"] is None else np.abs(kw["mask"]).max(initial=0)))
        np.testing.assert_allclose(y, ref, rtol=_tol(x.dtype), atol=_tol(x.dtype) * s)
    # backward: y - bias is linear in x, in weight and in mask: all three adjoints agree
    g = np.random.default_rng(0).standard_normal(y.shape).astype(x.dtype)
    gx, goff, gm, gw, gb = _run(fastnorm.deform_conv2d_backward, (g, x, offset, weight), kw,
                                None, backend)
    assert gx.shape == x.shape and goff.shape == offset.shape and gw.shape == weight.shape
    assert (gm is None) == (kw["mask"] is None) and gb.shape == (Cout,)
    np.testing.assert_allclose(gb, np.asarray(g, np.float64).sum((0, 2, 3)),
                               rtol=_tol(x.dtype), atol=_tol(x.dtype) * (1 + np.abs(g).sum()))
    if not ok or flav == "huge":
        return
    assert np.isfinite(gx).all() and np.isfinite(gw).all()
    y0 = np.asarray(y, np.float64) - (0 if bias is None else np.asarray(bias, float)[:, None, None])
    lhs, s = _dot(y0, g), _absdot(y0, g)
    _adjoint(lhs, _dot(x, gx), s + _absdot(x, gx), x.dtype)
    _adjoint(lhs, _dot(weight, gw), s + _absdot(weight, gw), x.dtype)
    if gm is not None:
        _adjoint(lhs, _dot(kw["mask"], gm), s + _absdot(kw["mask"], gm), x.dtype)


def test_matrix_nms_nan_box_overlaps_nothing(backend):
    """Found by the fuzzer: a box with a NaN coordinate ranked first decays the others to 0
    (documented: it overlaps nothing, so no decay)."""
    boxes, scores = backend.asarray((np.array([[0, 0, 1, 1], [0, 0, np.nan, 1]]),
                                     np.array([0.5, 0.9])))
    np.testing.assert_array_equal(backend.asnumpy(fastnorm.matrix_nms(boxes, scores)), [0.5, 0.9])


def test_every_public_function_is_fuzzed():
    """A new public op must get a property test here."""
    covered = {"group_norm", "group_norm_backward", "deform_conv2d", "deform_conv2d_backward",
               "box_iou", "soft_nms", "matrix_nms", "softer_nms", "iou_guided_nms",
               "adaptive_nms", "combined_nms", "multi_scale_roi_align",
               "multi_scale_roi_align_backward", *GREEDY, *ROTATED, *ROI_OPS,
               *(f"{op}_backward" for op in ROI_OPS)}
    public = {n for n in fastnorm.__all__ if callable(getattr(fastnorm, n))} - {
        "info", "get_num_threads", "set_num_threads", "threads",           # configuration,
        "empty_cache", "set_cache_limit", "cached_bytes"}                   # not ops
    assert public <= covered, sorted(public - covered)
