"""The CPU kernels' output cache: reuse, limits, and that reused memory never leaks into results;
deform_conv2d's forward workspace is under the same controls."""
import gc
import subprocess
import sys
import threading

import numpy as np
import pytest

import fastnorm


@pytest.fixture(autouse=True)
def _restore_limit():
    limit = fastnorm._memory.cache_limit()
    yield
    fastnorm.set_cache_limit(limit)


def test_freed_outputs_are_reused_and_results_stay_exact(rng):
    x = rng.standard_normal((2, 16, 128, 128)).astype(np.float32)     # 2 MiB outputs
    fastnorm.empty_cache()
    y1 = fastnorm.group_norm(x, 4)
    addr = y1.ctypes.data
    expected = y1.copy()
    del y1
    gc.collect()
    assert fastnorm.cached_bytes() >= x.nbytes
    y2 = fastnorm.group_norm(x, 4)
    assert y2.ctypes.data == addr                       # the freed block came back
    assert np.array_equal(y2, expected)
    # a reused block holds stale data: fill one with NaN, so that an op writing only part of its
    # output would show it here
    rois = np.array([[0, 0, 0, 50, 50]] * 600, np.float32)             # 1.8 MiB output
    fresh = fastnorm.roi_align(x, rois, 7)
    addr = _nan_block(x)
    r = fastnorm.roi_align(x, rois, 7)
    assert r.ctypes.data == addr                        # the NaN block came back
    assert np.isfinite(r).all() and r.shape == (600, 16, 7, 7)
    assert np.array_equal(r, fresh)


def _nan_block(x):
    """Leave one freed 2 MiB block full of NaN as the cache's only block; returns its address."""
    fastnorm.empty_cache()
    junk = fastnorm.group_norm(np.full_like(x, np.nan), 4)   # a group with a NaN is all NaN
    assert np.isnan(junk).all()
    addr = junk.ctypes.data
    del junk
    gc.collect()
    return addr


def test_deform_conv_output_reuses_stale_memory_safely(rng):
    # deform_conv2d's output (2 x 15 x 128 x 128 float32: 1.9 MiB) comes from the cache too: it
    # gets a block full of NaN, so an element the forward failed to write would show
    x = rng.standard_normal((2, 16, 128, 128)).astype(np.float32)
    xd = rng.standard_normal((2, 4, 128, 128)).astype(np.float32)
    off = rng.standard_normal((2, 18, 128, 128)).astype(np.float32)
    w = rng.standard_normal((15, 4, 3, 3)).astype(np.float32)
    expected = fastnorm.deform_conv2d(xd, off, w, padding=1)
    addr = _nan_block(x)
    y = fastnorm.deform_conv2d(xd, off, w, padding=1)
    assert y.ctypes.data == addr
    assert np.array_equal(y, expected)


def test_small_outputs_bypass_and_limit_is_respected(rng):
    x = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)          # 1 KiB: not cached
    fastnorm.empty_cache()
    del x
    fastnorm.set_cache_limit(3 << 20)
    big = [fastnorm.group_norm(np.ones((1, 4, 256, 256), np.float32), 2) for _ in range(4)]
    del big
    gc.collect()
    assert 0 < fastnorm.cached_bytes() <= 3 << 20
    fastnorm.empty_cache()
    assert fastnorm.cached_bytes() == 0
    fastnorm.set_cache_limit(0)
    y = fastnorm.group_norm(np.ones((1, 4, 256, 256), np.float32), 2)
    del y
    gc.collect()
    assert fastnorm.cached_bytes() == 0
    with pytest.raises(ValueError, match="`nbytes`"):
        fastnorm.set_cache_limit(-1)


def test_limit_argument_is_an_integer():
    # TypeError for what is not an integer (as every argument of the contract), NumPy ints accepted
    for bad in (1.5, "1", None, True, np.float64(2.0)):
        with pytest.raises(TypeError, match="`nbytes` must be an int"):
            fastnorm.set_cache_limit(bad)
    with pytest.raises(ValueError, match="`nbytes` must be >= 0"):
        fastnorm.set_cache_limit(np.int64(-1))
    fastnorm.set_cache_limit(np.int64(3 << 20))
    assert fastnorm._memory.cache_limit() == 3 << 20 and type(fastnorm._memory.cache_limit()) is int
    fastnorm.set_cache_limit(np.uint32(0))
    assert fastnorm._memory.cache_limit() == 0


def _dcn(rng):
    """A deform_conv2d call whose forward workspace is large (the channels-last copy of x alone is
    x.nbytes = 4 MiB) and whose output is small (0.25 MiB: not cached)."""
    x = rng.standard_normal((4, 64, 64, 64)).astype(np.float32)
    off = rng.standard_normal((4, 18, 64, 64)).astype(np.float32)
    w = rng.standard_normal((4, 64, 3, 3)).astype(np.float32)
    return lambda: fastnorm.deform_conv2d(x, off, w, padding=1), x.nbytes


def test_deform_conv_workspace_is_under_the_cache_controls(rng):
    f, xbytes = _dcn(rng)
    expected = f()
    fastnorm.empty_cache()
    # a call from another thread: its workspace returns to the one cache of the process
    out = []
    t = threading.Thread(target=lambda: out.append(f()))
    t.start()
    t.join()
    ws = fastnorm.cached_bytes()                  # the output is alive: this is the workspace
    assert ws >= xbytes
    assert np.array_equal(out[0], expected)
    y = f()                                       # reused, not allocated again
    assert fastnorm.cached_bytes() == ws
    assert np.array_equal(y, expected)
    fastnorm.empty_cache()                        # frees it, whichever thread used it
    assert fastnorm.cached_bytes() == 0
    fastnorm.set_cache_limit(ws - 1)              # bounded by the limit: too large to keep
    assert np.array_equal(f(), expected)
    assert fastnorm.cached_bytes() == 0
    fastnorm.set_cache_limit(ws)
    assert np.array_equal(f(), expected)
    assert fastnorm.cached_bytes() == ws
    fastnorm.set_cache_limit(0)                   # disabled
    assert np.array_equal(f(), expected)
    assert fastnorm.cached_bytes() == 0


def test_workspaces_of_many_threads_are_freed_by_empty_cache(rng):
    f, xbytes = _dcn(rng)
    expected = f()
    fastnorm.empty_cache()
    out = [None] * 4
    go = threading.Barrier(4)

    def work(i):
        go.wait()
        out[i] = f()

    ts = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert all(np.array_equal(y, expected) for y in out)
    assert xbytes <= fastnorm.cached_bytes() <= fastnorm._memory.cache_limit()
    fastnorm.empty_cache()
    assert fastnorm.cached_bytes() == 0


def test_cached_arrays_outlive_everything(tmp_path):
    # an output alive at interpreter exit, and arrays resized after allocation, stay valid
    code = ("import numpy as np, fastnorm; y = fastnorm.group_norm(np.ones((2, 4, 256, 256), "
            "np.float32), 2); z = y.copy(); y.resize(10, refcheck=False); print(z.sum() == 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=tmp_path)
    assert out.stdout.strip() == "True"


def test_environment_variable_sets_the_limit(tmp_path):
    # FASTNORM_OUTPUT_CACHE_MB sets the limit of the cache, which holds deform_conv2d's forward
    # workspace too (its output, 0.25 MiB, is not cached; its workspace is 4 MiB and more)
    import os
    code = ("import numpy as np, fastnorm\n"
            "x = np.ones((4, 64, 64, 64), np.float32)\n"
            "y = fastnorm.deform_conv2d(x, np.zeros((4, 18, 64, 64), np.float32),\n"
            "                           np.ones((4, 64, 3, 3), np.float32), padding=1)\n"
            "print(fastnorm._memory.cache_limit(), fastnorm.cached_bytes())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=tmp_path, env=dict(os.environ, FASTNORM_OUTPUT_CACHE_MB="0"))
    assert out.stdout.split() == ["0", "0"]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=tmp_path, env=dict(os.environ, FASTNORM_OUTPUT_CACHE_MB="64"))
    limit, cached = map(int, out.stdout.split())
    assert limit == 64 << 20 and 4 << 20 <= cached <= limit
