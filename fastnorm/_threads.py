"""Thread count of the CPU kernels.

Every CPU kernel receives the count explicitly (OpenMP's own setting is per OS thread, so a value
set with ``omp_set_num_threads`` in one Python thread would not reach kernels started from another).
The default is OpenMP's, i.e. ``OMP_NUM_THREADS`` when set, else the number of cores.
"""
import contextlib
import os
import threading

from . import _validation as v

_lock = threading.Lock()
_num_threads = None          # None: use the default
_local = threading.local()   # per-thread override set by ``threads(n)``


def _default():
    try:
        from ._cpu import _omp
        return max(1, int(_omp.default_threads()))
    except ImportError:
        env = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
        return int(env) if env.isdigit() and int(env) > 0 else (os.cpu_count() or 1)


def openmp_available():
    """True when the CPU kernels were built with OpenMP."""
    try:
        from ._cpu import _omp
    except ImportError:
        return False
    return bool(_omp.OPENMP)


def get_num_threads():
    """Number of threads the CPU kernels use in the calling thread."""
    n = getattr(_local, "n", None)
    if n is not None:
        return n
    n = _num_threads
    return n if n is not None else _default()


def set_num_threads(n):
    """Set the number of threads used by the CPU kernels (process-wide); ``None`` restores the default."""
    global _num_threads
    with _lock:
        _num_threads = None if n is None else v.integer("n", n, min=1)


@contextlib.contextmanager
def threads(n):
    """Context manager: use ``n`` threads for CPU kernels called from this thread inside the block.

    >>> import fastnorm
    >>> with fastnorm.threads(1):
    ...     fastnorm.get_num_threads()
    1
    """
    n = v.integer("n", n, min=1)
    prev = getattr(_local, "n", None)
    _local.n = n
    try:
        yield n
    finally:
        _local.n = prev
