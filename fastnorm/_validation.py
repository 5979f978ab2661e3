"""Argument checks shared by the op modules, with one wording for every error.

ValueError for shapes and values, TypeError for dtypes and kinds of object; the message always
names the argument and says what was expected and what came.
"""
import math
import numbers

CPU_FLOATS = ("float32", "float64")
CUDA_FLOATS = ("float32", "float64", "float16", "bfloat16")


def float_array(call, name, a, *, min_ndim=None, ndim=None):
    """Check that ``a`` is a floating array the backend supports, with the given rank."""
    dtype = str(a.dtype)
    allowed = CPU_FLOATS if call.backend == "cpu" else CUDA_FLOATS
    if dtype not in allowed:
        extra = (" (float16/bfloat16 are supported on CUDA; cast to float32 for the CPU)"
                 if dtype in CUDA_FLOATS else "")
        raise TypeError(f"`{name}` must have a floating dtype in {allowed} on the "
                        f"{call.backend.upper()} backend, got {dtype}{extra}")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"`{name}` must be {ndim}-D, got shape {tuple(a.shape)}")
    if min_ndim is not None and a.ndim < min_ndim:
        raise ValueError(f"`{name}` must have at least {min_ndim} dimensions, got shape "
                         f"{tuple(a.shape)}")
    return a


def same_dtype(name, a, ref_name, ref):
    """``a`` must share ``ref``'s dtype (no silent mixed precision)."""
    if a is not None and a.dtype != ref.dtype:
        raise TypeError(f"`{name}` must have the dtype of `{ref_name}` ({ref.dtype}), got {a.dtype}")
    return a


def shape(name, a, expected, what=None):
    """``a.shape`` must equal ``expected`` (``None`` entries match any size)."""
    got = tuple(a.shape)
    if len(got) != len(expected) or any(e is not None and e != g for e, g in zip(expected, got)):
        want = what or "(" + ", ".join("*" if e is None else str(e) for e in expected) + \
            ("," if len(expected) == 1 else "") + ")"
        raise ValueError(f"`{name}` must have shape {want}, got {got}")
    return a


def integer(name, v, *, min=None, max=None):
    """A Python/NumPy integer (bool rejected) within bounds."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"`{name}` must be an int, got {type(v).__name__}")
    v = int(v)
    if min is not None and v < min:
        raise ValueError(f"`{name}` must be >= {min}, got {v}")
    if max is not None and v > max:
        raise ValueError(f"`{name}` must be <= {max}, got {v}")
    return v


def number(name, v, *, min=None, max=None, min_exclusive=False):
    """A finite real number within bounds, as a Python float."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"`{name}` must be a real number, got {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"`{name}` must be finite, got {v}")
    if min is not None and (v <= min if min_exclusive else v < min):
        raise ValueError(f"`{name}` must be {'>' if min_exclusive else '>='} {min}, got {v}")
    if max is not None and v > max:
        raise ValueError(f"`{name}` must be <= {max}, got {v}")
    return v


def choice(name, v, choices):
    """``v`` must be one of ``choices``."""
    if v not in choices:
        raise ValueError(f"`{name}` must be one of {choices}, got {v!r}")
    return v


def pair(name, v, *, min=None):
    """An int or a pair of ints -> tuple of two ints within bounds."""
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ValueError(f"`{name}` must be an int or a pair of ints, got {v!r}")
        return tuple(integer(name, e, min=min) for e in v)
    v = integer(name, v, min=min)
    return (v, v)
