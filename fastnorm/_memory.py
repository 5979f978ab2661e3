"""The CPU kernels' output cache.

Large outputs (>= 1 MiB) of the CPU kernels come from a caching allocator: when such an array is
freed its memory is kept and reused by the next call, instead of being unmapped and, on the next
call, mapped and zeroed again by the OS (which costs more than a memory-bound kernel itself).
The cache holds at most 512 MiB by default (``FASTNORM_OUTPUT_CACHE_MB`` sets the limit at
import, 0 disables it). The arrays are ordinary NumPy arrays.
"""


def _pool():
    from ._cpu import _pool
    return _pool


def empty_cache():
    """Release every cached block to the OS (the limit is kept)."""
    p = _pool()
    limit = cache_limit()
    p.configure(limit)


def set_cache_limit(nbytes):
    """Keep at most ``nbytes`` of freed output memory for reuse (0 disables the cache)."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError(f"`nbytes` must be a non-negative int, got {nbytes!r}")
    global _limit
    _pool().configure(nbytes)
    _limit = nbytes


def cache_limit():
    """The cache's limit in bytes."""
    return _limit


def cached_bytes():
    """Bytes of freed output memory currently kept for reuse."""
    return _pool().cached_bytes()


def _initial_limit():
    import os
    env = os.environ.get("FASTNORM_OUTPUT_CACHE_MB", "").strip()
    return int(float(env) * (1 << 20)) if env else 512 << 20


_limit = _initial_limit()
