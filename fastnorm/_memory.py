"""The CPU kernels' output cache.

Large outputs (>= 1 MiB) of the CPU kernels, and the workspace of ``deform_conv2d``'s forward,
come from a caching allocator: when such an array is freed its memory is kept and reused by the
next call, instead of being unmapped and, on the next call, mapped and zeroed again by the OS
(which costs more than a memory-bound kernel itself). The cache is one per process, shared by
all threads; it holds at most 512 MiB by default (``FASTNORM_OUTPUT_CACHE_MB`` sets the limit at
import, 0 disables it). The arrays are ordinary NumPy arrays.
"""
from . import _validation as v


def _pool():
    from ._cpu import _pool
    return _pool


def empty_cache():
    """Release every cached block to the OS (the limit is kept).

    That is all memory the cache holds: freed outputs and the workspaces of finished
    ``deform_conv2d`` calls, whichever thread made them. Memory still in use (arrays alive, calls
    running in other threads) is not touched; it returns to the cache when freed, within the
    limit.
    """
    p = _pool()
    limit = cache_limit()
    p.configure(limit)


def set_cache_limit(nbytes):
    """Keep at most ``nbytes`` of freed output and workspace memory for reuse (0 disables the
    cache); empties the cache first.

    Raises ``TypeError`` when ``nbytes`` is not an integer, ``ValueError`` when it is negative.
    """
    nbytes = v.integer("nbytes", nbytes, min=0, max=(1 << 63) - 1)
    global _limit
    _pool().configure(nbytes)
    _limit = nbytes


def cache_limit():
    """The cache's limit in bytes."""
    return _limit


def cached_bytes():
    """Bytes of freed output and workspace memory currently kept for reuse."""
    return _pool().cached_bytes()


def _initial_limit():
    import os
    env = os.environ.get("FASTNORM_OUTPUT_CACHE_MB", "").strip()
    return int(float(env) * (1 << 20)) if env else 512 << 20


_limit = _initial_limit()
