"""CUDA backend: the ``*.cu`` files beside this one, compiled on first use with ``cupy.RawModule``
(NVRTC) and memoised per (file, device).

Each op has ``<op>.cu`` (kernels templated on the scalar type, instantiated through
``name_expressions``) and ``<op>.py``, a launcher module exposing the same functions, with the same
signatures, as the CPU module ``fastnorm._cpu.<op>``; the trailing ``nthreads`` argument is
ignored here. Launchers run on the current CuPy device and stream; the dispatcher has already made
the arrays' device current. Importing this package does not import CuPy.

Launchers reach CuPy only through :func:`cupy`: real CuPy, or, inside a call on emulated arrays,
the CUDA emulator's stand-in (``fastnorm._cuda.emulator``), which runs the same ``.cu`` sources on
the host. The launchers cannot tell the two apart.
"""
import contextlib
import contextvars
import functools
import hashlib
import os
import re

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))

# dtype name -> C++ type in the .cu files
CTYPES = {"float32": "float", "float64": "double", "float16": "__half", "bfloat16": "__nv_bfloat16"}

# the module standing in for CuPy in the current call (None: CuPy itself)
_backend = contextvars.ContextVar("fastnorm_cuda_backend", default=None)


def cupy():
    """The CuPy module the launchers run on in this call."""
    module = _backend.get()
    if module is None:
        import cupy as module
    return module


@contextlib.contextmanager
def using(module):
    """Run the launchers on ``module`` (real CuPy or the emulator) inside this block."""
    token = _backend.set(module)
    try:
        yield
    finally:
        _backend.reset(token)


def ctype(dtype):
    """The C++ scalar type for a CuPy dtype."""
    return CTYPES[str(dtype)]


def instantiate(template, types=CTYPES.values()):
    """``"k<{}>"`` -> the list of its instantiations for every scalar type."""
    return [template.format(t) for t in types]


_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)


@functools.lru_cache(maxsize=None)
def source(name):
    """The text of ``<name>.cu`` as handed to the compiler: CuPy keys its kernel cache on this
    text alone, so it ends with a digest of the local headers it includes (an edit of
    ``common.cuh`` must not load a stale binary)."""
    with open(os.path.join(HERE, name + ".cu")) as f:
        code = f.read()
    digest, seen, todo = hashlib.sha256(), set(), _INCLUDE.findall(code)
    while todo:
        header = todo.pop(0)
        path = os.path.join(HERE, header)
        if header in seen or not os.path.exists(path):
            continue
        seen.add(header)
        with open(path) as f:
            text = f.read()
        digest.update(header.encode() + b"\0" + text.encode())
        todo += _INCLUDE.findall(text)
    return code + f"\n// local headers: {digest.hexdigest()}\n"


# CuPy's compile options for every module (the NVRTC gate compiles with exactly these)
OPTIONS = ("--std=c++17", f"-I{HERE}")


@functools.lru_cache(maxsize=None)
def _module(backend, name, device_id, name_expressions):
    return backend.RawModule(code=source(name), options=OPTIONS,
                             name_expressions=name_expressions)


class Kernel:
    """A compiled kernel and its name (CuPy's kernel objects carry none): what :func:`run`
    launches."""

    __slots__ = ("fn", "name")

    def __init__(self, fn, name):
        self.fn, self.name = fn, name


@functools.lru_cache(maxsize=None)
def _function(backend, name, device_id, name_expressions, expr):
    fn = _module(backend, name, device_id, name_expressions).get_function(expr)
    return Kernel(fn, expr.rsplit("::", 1)[-1])


def function(name, expr, name_expressions):
    """Kernel ``expr`` (e.g. ``"gn_stats<float>"``) of ``<name>.cu`` on the current device."""
    cp = cupy()
    return _function(cp, name, cp.cuda.Device().id, tuple(name_expressions), expr)


# the launches recorded by the innermost profile() block (None: not profiling)
_profile = contextvars.ContextVar("fastnorm_cuda_profile", default=None)


class Profile:
    """What :func:`profile` measured: ``launches``, ``(kernel, milliseconds)`` per launch in
    launch order, and ``total_ms``, the device time from the block's start to its end (kernels,
    cuBLAS GEMMs, CuPy's own operations and the gaps between them)."""

    def __init__(self):
        self.launches, self.total_ms = [], None

    def by_kernel(self):
        """``{kernel: (launches, milliseconds)}`` summed over the block."""
        out = {}
        for name, ms in self.launches:
            n, t = out.get(name, (0, 0.0))
            out[name] = (n + 1, t + ms)
        return out


@contextlib.contextmanager
def profile(xp=None):
    """Time every fastnorm kernel launched inside the block with CUDA events on the current
    stream, and the whole block (a development aid: the events cost a little each; results are
    ready after the block). ``xp``: the CuPy module (default: CuPy, or the emulator inside
    :func:`using`)::

        with fastnorm._cuda.profile() as p:
            fastnorm.group_norm(x, 32)
        print(p.total_ms, p.by_kernel())
    """
    xp = xp or cupy()
    p, events = Profile(), []
    token = _profile.set(events)
    start = xp.cuda.Event()
    start.record()
    try:
        yield p
    finally:
        _profile.reset(token)
        end = xp.cuda.Event()
        end.record()
        end.synchronize()
        p.total_ms = xp.cuda.get_elapsed_time(start, end)
        p.launches = [(name, m.cuda.get_elapsed_time(a, b)) for name, m, a, b in events]


# launch limits of every device fastnorm supports (compute capability >= 7.0)
MAX_GRID = (2**31 - 1, 65535, 65535)
MAX_BLOCK = (1024, 1024, 64)
MAX_THREADS_PER_BLOCK = 1024
#: FASTNORM_CUDA_SYNC=1 synchronises after every launch, so that a kernel's fault is raised with
#: its name instead of at some later call (debugging; slow)
SYNC = os.environ.get("FASTNORM_CUDA_SYNC") == "1"


def cdiv(a, b):
    return -(-a // b)


def _dims(v):
    return (v,) if isinstance(v, (int, np.integer)) else tuple(v)


def run(kernel, grid, block, args, shared_mem=0):
    """Launch ``kernel`` (a :class:`Kernel`) on ``grid`` x ``block`` (ints or tuples). A
    configuration the device would refuse raises ValueError naming the kernel (not a CUDA error
    at some later call)."""
    grid, block = _dims(grid), _dims(block)
    bad = [f"grid {grid}" for g, m in zip(grid, MAX_GRID) if not 1 <= g <= m] + \
        [f"block {block}" for b, m in zip(block, MAX_BLOCK) if not 1 <= b <= m]
    if bad or int(np.prod(block)) > MAX_THREADS_PER_BLOCK:
        raise ValueError(f"fastnorm: invalid launch of {kernel.name}: "
                         f"{', '.join(bad) or f'{int(np.prod(block))} threads per block'}")
    events = _profile.get()
    if events is not None:
        xp = cupy()
        before = xp.cuda.Event()
        before.record()
    kernel.fn(tuple(int(g) for g in grid), tuple(int(b) for b in block), args,
              shared_mem=shared_mem)
    if events is not None:
        after = xp.cuda.Event()
        after.record()
        events.append((kernel.name, xp, before, after))
    if SYNC:
        try:
            cupy().cuda.get_current_stream().synchronize()
        except Exception as e:
            raise RuntimeError(f"fastnorm: kernel {kernel.name} failed: "
                               f"{e}") from e


def launch(kernel, n_threads, args, block=256, shared_mem=0):
    """Launch a 1-D grid covering ``n_threads`` threads (no launch for 0; the grid is capped at
    the device's limit: these kernels loop over their items with a grid stride)."""
    if n_threads <= 0:
        return
    run(kernel, min(cdiv(n_threads, block), MAX_GRID[0]), block, args, shared_mem)


def i64(v):
    return np.int64(v)


def f32(v):
    return np.float32(v)
