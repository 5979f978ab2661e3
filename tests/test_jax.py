"""fastnorm.jax: custom_vjp ops under jit/grad/vmap; gradients checked with
jax.test_util.check_grads in float64 (skips when JAX is not installed)."""
import numpy as np
import pytest

jax = pytest.importorskip("jax")
jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
from jax.test_util import check_grads  # noqa: E402

import fastnorm  # noqa: E402
import fastnorm.jax as fj  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    with fastnorm.threads(1):        # tiny arrays: skip OpenMP wake-ups on a loaded machine
        yield


def _rois(rng, K, N, size):
    xy = rng.uniform(0.3, size / 2, (K, 2))
    wh = rng.uniform(1.2, size / 2 - 0.3, (K, 2))
    return np.concatenate([rng.integers(0, N, (K, 1)), xy, xy + wh], 1)


def _check(f, *args):
    """Reverse-mode gradients vs central differences (custom_vjp has no forward mode)."""
    check_grads(f, args, order=1, modes=("rev",), eps=1e-6, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("activation", [None, "silu"])
def test_group_norm(rng, activation):
    x = rng.standard_normal((2, 6, 3, 4))
    w, b = rng.standard_normal(6), rng.standard_normal(6)
    y = jax.jit(lambda x, w, b: fj.group_norm(x, 3, w, b, activation=activation))(x, w, b)
    assert isinstance(y, jax.Array) and y.shape == x.shape and y.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(y),
                               fastnorm.group_norm(x, 3, w, b, activation=activation), rtol=1e-12)
    _check(lambda x, w, b: fj.group_norm(x, 3, w, b, activation=activation), x, w, b)
    _check(lambda x: fj.group_norm(x, 2), x)


def test_float32_and_grad_under_jit(rng):
    x = rng.standard_normal((2, 4, 5)).astype(np.float32)
    y = jax.jit(lambda x: fj.group_norm(x, 2))(x)
    assert y.dtype == jnp.float32
    g = jax.jit(jax.grad(lambda x: (fj.group_norm(x, 2, activation="relu") ** 2).sum()))(x)
    assert g.dtype == jnp.float32 and g.shape == x.shape
    # vmap over an extra leading axis loops over the callback
    xs = np.stack([x, 2 * x])
    ys = jax.vmap(lambda x: fj.group_norm(x, 2))(xs)
    np.testing.assert_allclose(np.asarray(ys[1]), fastnorm.group_norm(2 * x, 2), rtol=1e-5,
                               atol=1e-6)


def test_vmap_under_jit_runs_the_kernel_once_per_element(rng, monkeypatch):
    """vmap_method="sequential", as documented: one host call per mapped element, on that
    element's arrays; the unmapped weight is passed whole."""
    calls, real = [], fastnorm.group_norm

    def counting(x, G, w, *args, **kw):
        calls.append((x.shape, w.shape))
        return real(x, G, w, *args, **kw)
    monkeypatch.setattr(fj._fn, "group_norm", counting)
    xs = rng.standard_normal((3, 2, 4, 5)).astype(np.float32)
    w = rng.standard_normal(4).astype(np.float32)
    ys = np.asarray(jax.jit(jax.vmap(lambda x: fj.group_norm(x, 2, w)))(xs))
    assert calls == [((2, 4, 5), (4,))] * 3
    for i in range(3):
        np.testing.assert_allclose(ys[i], real(xs[i], 2, w), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("v2,bias", [(False, True), (True, False)])
def test_deform_conv2d(rng, v2, bias):
    x = rng.standard_normal((1, 4, 5, 5))
    w = rng.standard_normal((2, 4, 3, 3))
    b = rng.standard_normal(2) if bias else None
    off = rng.uniform(-1.5, 1.5, (1, 18, 3, 3))
    mask = rng.random((1, 9, 3, 3)) if v2 else None
    y = jax.jit(lambda x, o, m: fj.deform_conv2d(x, o, w, b, mask=m, stride=2, padding=1))(
        x, off, mask)
    np.testing.assert_allclose(np.asarray(y), fastnorm.deform_conv2d(
        x, off, w, b, mask=mask, stride=2, padding=1), rtol=1e-10)
    if v2:
        _check(lambda x, o, m, w: fj.deform_conv2d(x, o, w, mask=m, stride=2, padding=1),
               x, off, mask, w)
    else:
        _check(lambda x, o, w, b: fj.deform_conv2d(x, o, w, b, stride=2, padding=1),
               x, off, w, b)


@pytest.mark.parametrize("op", ["roi_align", "roi_align_max", "roi_pool", "ps_roi_align"])
def test_roi_ops(rng, op):
    x = rng.standard_normal((2, 8, 8, 8))
    rois = _rois(rng, 3, 2, 8)
    f = {"roi_align": lambda x: fj.roi_align(x, rois, (2, 2), 1.0, 2, True),
         "roi_align_max": lambda x: fj.roi_align(x, rois, 2, 1.0, 2, True, mode="max"),
         "roi_pool": lambda x: fj.roi_pool(x, rois, 2, 1.0),
         "ps_roi_align": lambda x: fj.ps_roi_align(x, rois, 2, 1.0, 2)}[op]
    ref = {"roi_align": lambda: fastnorm.roi_align(x, rois, 2, 1.0, 2, True),
           "roi_align_max": lambda: fastnorm.roi_align(x, rois, 2, 1.0, 2, True, mode="max"),
           "roi_pool": lambda: fastnorm.roi_pool(x, rois, 2, 1.0),
           "ps_roi_align": lambda: fastnorm.ps_roi_align(x, rois, 2, 1.0, 2)}[op]()
    y = jax.jit(f)(x)
    assert y.shape == ref.shape
    np.testing.assert_array_equal(np.asarray(y), ref)
    _check(f, x)


def test_roi_align_list_rois(rng):
    x = rng.standard_normal((2, 3, 8, 8))
    per_image = [_rois(rng, 2, 1, 8)[:, 1:], _rois(rng, 3, 1, 8)[:, 1:]]
    y = jax.jit(lambda x, a, b: fj.roi_align(x, [a, b], 2, 1.0, 2, True))(x, *per_image)
    np.testing.assert_array_equal(np.asarray(y), fastnorm.roi_align(x, per_image, 2, 1.0, 2,
                                                                     True))


@pytest.mark.parametrize("with_mask", [False, True])
def test_deform_roi_pool(rng, with_mask):
    x = rng.standard_normal((2, 3, 10, 10))
    rois = _rois(rng, 3, 2, 8)
    off = rng.uniform(-0.3, 0.3, (3, 2, 2, 2))
    mask = rng.random((3, 1, 2, 2))
    if with_mask:
        f = lambda x, o, m: fj.deform_roi_pool(x, rois, o, 2, 1.0, 2, 0.1, mask=m)  # noqa: E731
        args = (x, off, mask)
    else:
        f = lambda x, o: fj.deform_roi_pool(x, rois, o, 2, 1.0, 2, 0.1)  # noqa: E731
        args = (x, off)
    np.testing.assert_array_equal(np.asarray(jax.jit(f)(*args)), fastnorm.deform_roi_pool(
        x, rois, off, 2, 1.0, 2, 0.1, mask=mask if with_mask else None))
    _check(f, *args)


def test_training_step_reduces_loss(rng):
    """A jitted SGD step through group_norm -> deform_conv2d -> roi_align lowers the loss."""
    x = rng.standard_normal((2, 4, 8, 8))
    rois = _rois(rng, 4, 2, 8)
    target = rng.standard_normal((4, 3, 2, 2))
    params = {"w": 0.3 * rng.standard_normal((3, 4, 3, 3)), "b": np.zeros(3),
              "gw": np.ones(4), "gb": np.zeros(4)}
    off = np.zeros((2, 18, 8, 8))

    def loss(p):
        h = fj.group_norm(x, 2, p["gw"], p["gb"], activation="silu")
        h = fj.deform_conv2d(h, off, p["w"], p["b"], padding=1)
        return ((fj.roi_align(h, rois, 2, 1.0, 2, True) - target) ** 2).mean()

    step = jax.jit(lambda p: jax.tree_util.tree_map(lambda a, g: a - 0.2 * g, p,
                                                    jax.grad(loss)(p)))
    l0 = float(loss(params))
    for _ in range(15):
        params = step(params)
    assert float(loss(params)) < 0.7 * l0
