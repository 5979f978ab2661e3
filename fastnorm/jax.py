"""JAX adapter: differentiable (``jax.custom_vjp``) versions of fastnorm's ops that work under
``jax.jit``, ``jax.grad`` and ``jax.vmap``.

``import fastnorm.jax`` needs JAX (fastnorm itself does not). Each op's forward and backward run
fastnorm's kernels through :func:`jax.pure_callback`: inside a traced computation XLA hands the
operands to the host, fastnorm computes on NumPy arrays (Cython/OpenMP kernels), and the result
goes back. Output shapes and dtypes are derived from the operand shapes at trace time, so the ops
compose with everything else in a jitted function.

``vmap`` (inside or outside ``jit``) runs the callback sequentially (``vmap_method=
"sequential"``): once per element of the mapped axis, on that element's arrays, one after the
other, with unmapped operands (weights, RoIs) passed whole each time. Nothing is batched across
elements, and nothing needs to be: each call already uses every fastnorm thread. To process a
batch in one kernel call, give the op the batched array itself (every op takes a batch axis).

Devices
-------
* CPU: the callback costs no copy beyond XLA's own operand hand-off.
* GPU: JAX offers no zero-copy device callback through ``pure_callback``; inside ``jit`` the
  operands make a device -> host -> device round trip and the CPU kernels compute. For GPU
  speed call fastnorm's plain functions eagerly on ``jax.Array``s (``fastnorm.group_norm(x, 32)``
  with a GPU ``x``): those import the array through DLPack without a copy, run the CUDA kernels
  (CuPy) and return a ``jax.Array`` on the same device (forward and explicit ``*_backward``
  calls; no tracing).

Dtypes: float32 and float64 (``jax.config.update("jax_enable_x64", True)`` for float64).
Arguments other than arrays (sizes, scales, flags) are static. RoIs get a zero gradient; the
deformable RoI pooling offset and mask, and every deform_conv2d input, are differentiated.
Errors raised by fastnorm's validation (naming the argument) surface when the callback runs,
wrapped in JAX's runtime error.

Examples
--------
>>> import jax, jax.numpy as jnp, fastnorm.jax as fj
>>> x = jnp.ones((2, 4, 3, 3), jnp.float32) * jnp.arange(4, dtype=jnp.float32)[:, None, None]
>>> y = jax.jit(lambda x: fj.group_norm(x, 2))(x)
>>> y.shape, y.dtype
((2, 4, 3, 3), dtype('float32'))
>>> g = jax.grad(lambda x: (fj.group_norm(x, 2) ** 2).sum())(x)
>>> g.shape
(2, 4, 3, 3)
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

import fastnorm as _fn

__all__ = ["group_norm", "deform_conv2d", "roi_align", "roi_pool", "ps_roi_align",
           "deform_roi_pool"]


def _pair(v):
    return (int(v), int(v)) if np.ndim(v) == 0 else tuple(int(a) for a in v)


def _sds(shape, dtype):
    return jax.ShapeDtypeStruct(tuple(int(s) for s in shape), jnp.dtype(dtype))


def _host(fn, out, *args):
    """``fn(*numpy_args)`` on the host; ``out`` gives the result's ShapeDtypeStruct(s)."""
    def cb(*a):
        res = fn(*(np.asarray(v) for v in a))
        if isinstance(out, tuple):
            return tuple(np.asarray(r, dtype=o.dtype) for r, o in zip(res, out))
        return np.asarray(res, dtype=out.dtype)
    return jax.pure_callback(cb, out, *args, vmap_method="sequential")


def _or_none(a, present):
    return a if present else None


def _zeros(a):
    return jnp.zeros(a.shape, a.dtype)


# ---------------------------------------------------------------- GroupNorm

@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _group_norm(x, w, b, cfg):
    return _group_norm_fwd(x, w, b, cfg)[0]


def _group_norm_fwd(x, w, b, cfg):
    G, eps, act = cfg
    stats = _sds((x.shape[0], G), "float64" if x.dtype == jnp.float64 else "float32")
    y, mean, rstd = _host(lambda x, w, b: _fn.group_norm(x, G, w, b, eps, activation=act,
                                                          return_stats=True),
                          (_sds(x.shape, x.dtype), stats, stats), x, w, b)
    return y, (x, w, b, mean, rstd)


def _group_norm_bwd(cfg, res, gy):
    G, _, act = cfg
    x, w, b, mean, rstd = res
    return _host(lambda gy, x, m, r, w, b: _fn.group_norm_backward(gy, x, m, r, G, w, b,
                                                                   activation=act),
                 (_sds(x.shape, x.dtype), _sds(w.shape, w.dtype), _sds(b.shape, b.dtype)),
                 gy, x, mean, rstd, w, b)


_group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, *, activation=None):
    """:func:`fastnorm.group_norm` (NCHW / (N, C, *spatial)) as a differentiable JAX op.

    Missing ``weight``/``bias`` act as ones/zeros. Returns y of x's shape and dtype.
    """
    C = x.shape[1]
    w = jnp.ones((C,), x.dtype) if weight is None else weight
    b = jnp.zeros((C,), x.dtype) if bias is None else bias
    return _group_norm(x, w, b, (int(num_groups), float(eps), activation))


# ---------------------------------------------------------------- deformable convolution

@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _deform_conv2d(x, offset, mask, weight, bias, cfg):
    return _deform_conv2d_fwd(x, offset, mask, weight, bias, cfg)[0]


def _dcn_kw(cfg):
    stride, padding, dilation, _, _ = cfg
    return dict(stride=stride, padding=padding, dilation=dilation)


def _deform_conv2d_fwd(x, offset, mask, weight, bias, cfg):
    has_mask, has_bias = cfg[3], cfg[4]
    out = _sds((x.shape[0], weight.shape[0]) + tuple(offset.shape[2:]), x.dtype)
    y = _host(lambda x, o, m, w, b: _fn.deform_conv2d(x, o, w, _or_none(b, has_bias),
                                                      mask=_or_none(m, has_mask), **_dcn_kw(cfg)),
              out, x, offset, mask, weight, bias)
    return y, (x, offset, mask, weight, bias)


def _deform_conv2d_bwd(cfg, res, gy):
    x, offset, mask, weight, bias = res
    has_mask = cfg[3]

    def back(gy, x, o, m, w):
        # JAX hands the callback read-only buffers, which the CPU deform_conv2d backward kernel
        # does not accept yet (its memoryviews are not const): copy those only
        gy, x, o, m, w = (np.require(a, requirements="W") for a in (gy, x, o, m, w))
        gx, go, gm, gw, gb = _fn.deform_conv2d_backward(gy, x, o, w, mask=_or_none(m, has_mask),
                                                        **_dcn_kw(cfg))
        return gx, go, (gm if has_mask else np.zeros(m.shape, m.dtype)), gw, gb
    shapes = tuple(_sds(a.shape, a.dtype) for a in (x, offset, mask, weight))
    gx, go, gm, gw, gb = _host(back, shapes + (_sds((weight.shape[0],), x.dtype),),
                               gy, x, offset, mask, weight)
    return gx, go, gm, gw, (gb.astype(bias.dtype) if cfg[4] else _zeros(bias))


_deform_conv2d.defvjp(_deform_conv2d_fwd, _deform_conv2d_bwd)


def deform_conv2d(x, offset, weight, bias=None, *, mask=None, stride=1, padding=0, dilation=1):
    """:func:`fastnorm.deform_conv2d` (torchvision semantics) as a differentiable JAX op:
    gradients for x, offset, mask, weight and bias."""
    has_mask, has_bias = mask is not None, bias is not None
    mask = mask if has_mask else jnp.zeros((0,), x.dtype)
    bias = bias if has_bias else jnp.zeros((0,), x.dtype)
    cfg = (_pair(stride), _pair(padding), _pair(dilation), has_mask, has_bias)
    return _deform_conv2d(x, offset, mask, weight, bias, cfg)


# ---------------------------------------------------------------- RoI ops (gradient w.r.t. x)

def _rois(rois, x):
    """(K, 5) rois, or a list of per-image (K_i, 4) arrays -> (K, 5) of x's dtype."""
    if isinstance(rois, (list, tuple)):
        parts = [jnp.concatenate([jnp.full((r.shape[0], 1), i, x.dtype), r.astype(x.dtype)], 1)
                 for i, r in enumerate(rois)]
        return jnp.concatenate(parts, 0) if parts else jnp.zeros((0, 5), x.dtype)
    return rois


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _roi_op(x, rois, cfg):
    return _roi_op_fwd(x, rois, cfg)[0]


# op name -> (forward(x, rois, cfg), backward(gy, x, rois, cfg), output channels(C, PH, PW))
_ROI = {
    "roi_align": (
        lambda x, r, c: _fn.roi_align(x, r, c[1], c[2], c[3], c[4], mode=c[5]),
        lambda g, x, r, c: _fn.roi_align_backward(g, r, x.shape, c[1], c[2], c[3], c[4],
                                                  mode=c[5], x=x),
        lambda C, PH, PW: C),
    "roi_pool": (
        lambda x, r, c: _fn.roi_pool(x, r, c[1], c[2]),
        lambda g, x, r, c: _fn.roi_pool_backward(g, r, x.shape, c[1], c[2], x=x),
        lambda C, PH, PW: C),
    "ps_roi_align": (
        lambda x, r, c: _fn.ps_roi_align(x, r, c[1], c[2], c[3]),
        lambda g, x, r, c: _fn.ps_roi_align_backward(g, r, x.shape, c[1], c[2], c[3]),
        lambda C, PH, PW: C // (PH * PW)),
}


def _roi_op_fwd(x, rois, cfg):
    fwd, _, channels = _ROI[cfg[0]]
    PH, PW = cfg[1]
    out = _sds((rois.shape[0], channels(x.shape[1], PH, PW), PH, PW), x.dtype)
    return _host(lambda x, r: fwd(x, r, cfg), out, x, rois), (x, rois)


def _roi_op_bwd(cfg, res, gy):
    x, rois = res
    bwd = _ROI[cfg[0]][1]
    gx = _host(lambda g, x, r: bwd(g, x, r, cfg), _sds(x.shape, x.dtype), gy, x, rois)
    return gx, _zeros(rois)


_roi_op.defvjp(_roi_op_fwd, _roi_op_bwd)


def roi_align(x, rois, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False, *,
              mode="avg"):
    """:func:`fastnorm.roi_align` as a differentiable JAX op (gradient w.r.t. x).

    rois: (K, 5) ``[batch_index, x1, y1, x2, y2]`` or a list of per-image (K_i, 4) arrays.
    """
    cfg = ("roi_align", _pair(output_size), float(spatial_scale), int(sampling_ratio),
           bool(aligned), mode)
    return _roi_op(x, _rois(rois, x), cfg)


def roi_pool(x, rois, output_size, spatial_scale=1.0):
    """:func:`fastnorm.roi_pool` as a differentiable JAX op (gradient w.r.t. x)."""
    return _roi_op(x, _rois(rois, x), ("roi_pool", _pair(output_size), float(spatial_scale)))


def ps_roi_align(x, rois, output_size, spatial_scale=1.0, sampling_ratio=-1):
    """:func:`fastnorm.ps_roi_align` as a differentiable JAX op (gradient w.r.t. x)."""
    cfg = ("ps_roi_align", _pair(output_size), float(spatial_scale), int(sampling_ratio))
    return _roi_op(x, _rois(rois, x), cfg)


# ---------------------------------------------------------------- deformable RoI pooling

@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _deform_roi_pool(x, rois, offset, mask, cfg):
    return _deform_roi_pool_fwd(x, rois, offset, mask, cfg)[0]


def _drp_args(cfg):
    out, scale, sr, gamma, has_off, has_mask = cfg
    return (out, scale, sr, gamma), has_off, has_mask


def _deform_roi_pool_fwd(x, rois, offset, mask, cfg):
    args, has_off, has_mask = _drp_args(cfg)
    PH, PW = args[0]
    y = _host(lambda x, r, o, m: _fn.deform_roi_pool(x, r, _or_none(o, has_off), *args,
                                                     mask=_or_none(m, has_mask)),
              _sds((rois.shape[0], x.shape[1], PH, PW), x.dtype), x, rois, offset, mask)
    return y, (x, rois, offset, mask)


def _deform_roi_pool_bwd(cfg, res, gy):
    x, rois, offset, mask = res
    args, has_off, has_mask = _drp_args(cfg)

    def back(g, x, r, o, m):
        gx, go, gm = _fn.deform_roi_pool_backward(g, x, r, _or_none(o, has_off), *args,
                                                  mask=_or_none(m, has_mask))
        return (gx, go if has_off else np.zeros(o.shape, o.dtype),
                gm if has_mask else np.zeros(m.shape, m.dtype))
    gx, go, gm = _host(back, tuple(_sds(a.shape, a.dtype) for a in (x, offset, mask)),
                       gy, x, rois, offset, mask)
    return gx, _zeros(rois), go, gm


_deform_roi_pool.defvjp(_deform_roi_pool_fwd, _deform_roi_pool_bwd)


def deform_roi_pool(x, rois, offset=None, output_size=7, spatial_scale=1.0, sampling_ratio=0,
                    gamma=0.1, *, mask=None):
    """:func:`fastnorm.deform_roi_pool` (mmcv semantics) as a differentiable JAX op: gradients
    for x, offset (K, 2, PH, PW) and mask (K, 1, PH, PW)."""
    has_off, has_mask = offset is not None, mask is not None
    offset = offset if has_off else jnp.zeros((0,), x.dtype)
    mask = mask if has_mask else jnp.zeros((0,), x.dtype)
    cfg = (_pair(output_size), float(spatial_scale), int(sampling_ratio), float(gamma),
           has_off, has_mask)
    return _deform_roi_pool(x, _rois(rois, x), offset, mask, cfg)
