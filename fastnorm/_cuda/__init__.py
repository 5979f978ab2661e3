"""CUDA backend: the ``*.cu`` files beside this one, compiled on first use with ``cupy.RawModule``
(NVRTC) and memoised per (file, device).

Each op has ``<op>.cu`` (kernels templated on the scalar type, instantiated through
``name_expressions``) and ``<op>.py``, a launcher module exposing the same functions, with the same
signatures, as the CPU module ``fastnorm._cpu.<op>``; the trailing ``nthreads`` argument is
ignored here. Launchers run on the current CuPy device and stream; the dispatcher has already made
the arrays' device current. Importing this package does not import CuPy.
"""
import functools
import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))

# dtype name -> C++ type in the .cu files
CTYPES = {"float32": "float", "float64": "double", "float16": "__half", "bfloat16": "__nv_bfloat16"}


def ctype(dtype):
    """The C++ scalar type for a CuPy dtype."""
    return CTYPES[str(dtype)]


def instantiate(template, types=CTYPES.values()):
    """``"k<{}>"`` -> the list of its instantiations for every scalar type."""
    return [template.format(t) for t in types]


@functools.lru_cache(maxsize=None)
def _module(name, device_id, name_expressions):
    import cupy
    with open(os.path.join(HERE, name + ".cu")) as f:
        code = f.read()
    return cupy.RawModule(code=code, options=("--std=c++17", f"-I{HERE}"),
                          name_expressions=name_expressions)


def function(name, expr, name_expressions):
    """Kernel ``expr`` (e.g. ``"gn_stats<float>"``) of ``<name>.cu`` on the current device."""
    import cupy
    return _module(name, cupy.cuda.Device().id, tuple(name_expressions)).get_function(expr)


def launch(kernel, n_threads, args, block=256, shared_mem=0):
    """Launch a 1-D grid covering ``n_threads`` threads (no launch for 0)."""
    if n_threads <= 0:
        return
    grid = (int(min((n_threads + block - 1) // block, 2**31 - 1)),)
    kernel(grid, (block,), args, shared_mem=shared_mem)


def i64(v):
    return np.int64(v)


def f32(v):
    return np.float32(v)
