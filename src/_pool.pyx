# cython: language_level=3, boundscheck=False, wraparound=False
"""Output arrays (and workspaces) of the CPU kernels, from a caching allocator (see _pool.h).

``empty(shape, dtype)`` / ``empty_like(a)`` allocate through NumPy's NEP 49 handler mechanism, so
the arrays are ordinary NumPy arrays; when one is freed its block is kept for the next call
(at most ``fastnorm._memory.cache_limit()`` bytes; see fastnorm/_memory.py).
"""
import numpy as np
cimport numpy as cnp
from cpython.pycapsule cimport PyCapsule_New

cnp.import_array()

cdef extern from "_pool.h":
    ctypedef struct PyDataMem_Handler:
        pass
    PyDataMem_Handler fn_pool_handler
    void fn_pool_configure(size_t limit) nogil
    size_t fn_pool_cached() nogil

cdef extern from "numpy/arrayobject.h":
    object PyDataMem_SetHandler(object handler)

_HANDLER = PyCapsule_New(&fn_pool_handler, "mem_handler", NULL)


def configure(limit_bytes):
    """Empty the cache and set its limit in bytes (0 disables caching)."""
    fn_pool_configure(<size_t>max(0, int(limit_bytes)))


def cached_bytes():
    """Bytes currently held by the cache."""
    return fn_pool_cached()


def empty(shape, dtype):
    """``np.empty(shape, dtype)`` whose memory comes from (and returns to) the cache."""
    old = PyDataMem_SetHandler(_HANDLER)
    try:
        return np.empty(shape, dtype)
    finally:
        PyDataMem_SetHandler(old)


def empty_like(a):
    """``np.empty_like(a)`` (C order) whose memory comes from (and returns to) the cache."""
    return empty(a.shape, a.dtype)


from fastnorm._memory import cache_limit as _limit   # honours FASTNORM_OUTPUT_CACHE_MB
configure(_limit())
