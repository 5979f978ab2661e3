"""The CPU kernels' output cache: reuse, limits, and that reused memory never leaks into results."""
import gc
import subprocess
import sys

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
    # a reused block holds stale data: an op writing only part of it would show it here
    junk = fastnorm.group_norm(x * 0 + 7, 4)
    del junk
    gc.collect()
    r = fastnorm.roi_align(x, np.array([[0, 0, 0, 50, 50]] * 600, np.float32), 7)
    assert np.isfinite(r).all() and r.shape == (600, 16, 7, 7)


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


def test_cached_arrays_outlive_everything(tmp_path):
    # an output alive at interpreter exit, and arrays resized after allocation, stay valid
    code = ("import numpy as np, fastnorm; y = fastnorm.group_norm(np.ones((2, 4, 256, 256), "
            "np.float32), 2); z = y.copy(); y.resize(10, refcheck=False); print(z.sum() == 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=tmp_path)
    assert out.stdout.strip() == "True"


def test_environment_variable_sets_the_limit(tmp_path):
    import os
    code = "import fastnorm; print(fastnorm._memory.cache_limit())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=tmp_path, env=dict(os.environ, FASTNORM_OUTPUT_CACHE_MB="0"))
    assert out.stdout.strip() == "0"
