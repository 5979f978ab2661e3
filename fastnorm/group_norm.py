"""Group normalisation (Wu & He, 2018), forward and backward, with a fused activation."""
from . import _validation as v
from ._cpu import group_norm as cpu
from ._cuda import group_norm as cuda
from ._dispatch import op, resolve
from ._kernels import ACTIVATIONS, GroupNormBackward, GroupNormForward


def _check(call, x, num_groups, weight, bias, channels_last, activation):
    v.float_array(call, "x", x, min_ndim=2)
    C = x.shape[-1] if channels_last else x.shape[1]
    G = v.integer("num_groups", num_groups, min=1)
    if C % G:
        raise ValueError(f"`num_groups` must divide the number of channels ({C}), got {G}")
    for name, a in (("weight", weight), ("bias", bias)):
        if a is not None:
            v.same_dtype(name, a, "x", x)
            v.shape(name, a, (C,))
    v.choice("activation", activation, tuple(ACTIVATIONS))
    return C, G


# the default affine (ones, zeros) per (array module, device, C, dtype): made once, so that a
# call without weight or bias runs no fill on the device (read-only: never returned)
_IDENTITY = {}
_IDENTITY_MAX = 64


def _affine(call, x, C, weight, bias):
    if weight is not None and bias is not None:
        return weight, bias
    xp = call.xp
    key = (xp.__name__, getattr(getattr(x, "device", None), "id", None), C, str(x.dtype))
    pair = _IDENTITY.get(key)
    if pair is None:
        if len(_IDENTITY) >= _IDENTITY_MAX:
            _IDENTITY.clear()
        pair = (xp.ones(C, dtype=x.dtype), xp.zeros(C, dtype=x.dtype))
        if hasattr(xp, "cuda"):            # filled before any stream (not only this one) reads
            xp.cuda.get_current_stream().synchronize()
        _IDENTITY[key] = pair
    return (weight if weight is not None else pair[0]), (bias if bias is not None else pair[1])


def _stats_dtype(x):
    return "float64" if str(x.dtype) == "float64" else "float32"


@op
def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, *, channels_last=False,
               activation=None, return_stats=False):
    """Group normalisation: normalise each group of channels of each sample, then scale and shift.

    ``y = act((x - mean_g) / sqrt(var_g + eps) * weight[c] + bias[c])`` where mean_g and the
    biased variance var_g run over the channels of group g and all spatial positions of one sample.

    Parameters
    ----------
    x : array, (N, C, *spatial) or (N, *spatial, C) with ``channels_last=True``
        NumPy, CuPy or DLPack tensor; float32/float64 (and float16/bfloat16 on CUDA). Any number
        of spatial dimensions, including none. Non-contiguous input is accepted (copied).
    num_groups : int
        Number of groups G; must divide C.
    weight, bias : array (C,), optional
        Per-channel affine parameters of x's dtype.
    eps : float
        Added to the variance.
    channels_last : bool
        x is laid out (N, *spatial, C); computed natively, no layout copy.
    activation : {None, "relu", "silu"}
        Activation fused after the affine transform.
    return_stats : bool
        Also return ``mean`` and ``rstd = 1/sqrt(var + eps)``, each (N, G), float64 for float64
        input and float32 otherwise (as needed by :func:`group_norm_backward`).

    Returns
    -------
    y : array, same shape, dtype and framework as x
    mean, rstd : arrays (N, G), only with ``return_stats=True``

    Examples
    --------
    >>> import numpy as np, fastnorm
    >>> x = np.random.default_rng(0).standard_normal((2, 8, 4, 4), dtype=np.float32)
    >>> y, mean, rstd = fastnorm.group_norm(x, 4, return_stats=True)
    >>> y.shape, mean.shape
    ((2, 8, 4, 4), (2, 4))
    >>> bool(abs(y[0, :2].mean()) < 1e-5)
    True
    """
    call, (x, weight, bias) = resolve(x=x, weight=weight, bias=bias)
    C, G = _check(call, x, num_groups, weight, bias, channels_last, activation)
    eps = v.number("eps", eps, min=0, min_exclusive=True)
    w, b = _affine(call, x, C, weight, bias)
    y, mean, rstd = call.run(cpu.forward, cuda.forward, GroupNormForward(
        x=x, weight=w, bias=b, num_groups=G, eps=eps, channels_last=bool(channels_last),
        activation=ACTIVATIONS[activation]))
    return call.wrap((y, mean, rstd) if return_stats else y)


@op
def group_norm_backward(grad_out, x, mean, rstd, num_groups, weight=None, bias=None, *,
                        channels_last=False, activation=None):
    """Gradients of :func:`group_norm` with respect to x, weight and bias.

    Parameters
    ----------
    grad_out : array, shape of x
        Gradient of the loss with respect to the output y.
    x : array (N, C, *spatial) or (N, *spatial, C)
        The forward input.
    mean, rstd : arrays (N, G)
        The statistics returned by ``group_norm(..., return_stats=True)``.
    num_groups : int
    weight, bias : array (C,), optional
        As in the forward call (bias is needed to recompute a fused activation).
    channels_last : bool
    activation : {None, "relu", "silu"}
        The forward's fused activation.

    Returns
    -------
    grad_x : array, shape of x
    grad_weight, grad_bias : arrays (C,), or None when weight/bias was not given

    Examples
    --------
    >>> import numpy as np, fastnorm
    >>> x = np.random.default_rng(0).standard_normal((2, 8, 5), dtype=np.float64)
    >>> y, m, r = fastnorm.group_norm(x, 2, return_stats=True)
    >>> gx, gw, gb = fastnorm.group_norm_backward(np.ones_like(y), x, m, r, 2)
    >>> bool(np.abs(gx).max() < 1e-12), gw is None
    (True, True)
    """
    call, (grad_out, x, mean, rstd, weight, bias) = resolve(
        grad_out=grad_out, x=x, mean=mean, rstd=rstd, weight=weight, bias=bias)
    C, G = _check(call, x, num_groups, weight, bias, channels_last, activation)
    v.same_dtype("grad_out", grad_out, "x", x)
    v.shape("grad_out", grad_out, tuple(x.shape))
    for name, a in (("mean", mean), ("rstd", rstd)):
        if str(a.dtype) != _stats_dtype(x):
            raise TypeError(f"`{name}` must have dtype {_stats_dtype(x)} for {x.dtype} input, "
                            f"got {a.dtype}")
        v.shape(name, a, (x.shape[0], G))
    w, b = _affine(call, x, C, weight, bias)
    gx, gw, gb = call.run(cpu.backward, cuda.backward, GroupNormBackward(
        grad_out=grad_out, x=x, mean=mean, rstd=rstd, weight=w, bias=b, num_groups=G,
        channels_last=bool(channels_last), activation=ACTIVATIONS[activation]))
    return call.wrap((gx, gw if weight is not None else None, gb if bias is not None else None))
