"""Shared fixtures.

``backend``: the op tests take the backend as a parameter, so that one test body runs on

* ``cpu``            NumPy arrays, the Cython/OpenMP kernels;
* ``cuda-emulated``  arrays of the CUDA emulator (``fastnorm._cuda.emulator``): the CUDA
                     launchers and ``.cu`` kernels, run on the host (needs a C++ compiler);
* ``cuda``           CuPy arrays on a real GPU (skipped cleanly without CuPy and a GPU).

``cuda``-marked tests skip without CuPy and a GPU; ``emulated``-marked ones without a C++
compiler, unless ``FASTNORM_REQUIRE_EMULATOR=1`` (CI) makes that an error.
"""
import os
import shutil

import numpy as np
import pytest


def _cuda_available():
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


CUDA = _cuda_available()
EMULATOR = bool(shutil.which((os.environ.get("CXX") or "g++").split()[0]))
if not EMULATOR and os.environ.get("FASTNORM_REQUIRE_EMULATOR") == "1":
    raise RuntimeError("FASTNORM_REQUIRE_EMULATOR=1 but no C++ compiler (g++ or $CXX) was found")


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs CuPy and a CUDA GPU")
    skip_emu = pytest.mark.skip(reason="the CUDA emulator needs a C++ compiler (g++ or $CXX)")
    for item in items:
        if "cuda" in item.keywords and not CUDA:
            item.add_marker(skip_cuda)
        if "emulated" in item.keywords and not EMULATOR:
            item.add_marker(skip_emu)


@pytest.fixture
def rng(request):
    """A generator seeded from the test's name, so every test is reproducible on its own."""
    import zlib
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


class Backend:
    """The backend one test body runs on (see the module docstring).

    ``asarray`` moves NumPy inputs (also inside lists and tuples) to the backend, ``asnumpy``
    brings results back; ``floats`` lists the dtypes the backend supports.
    """

    def __init__(self, name):
        self.name = name
        if name == "cpu":
            self.xp = np
        elif name == "cuda-emulated":
            from fastnorm._cuda import emulator
            self.xp = emulator
        else:
            import cupy
            self.xp = cupy

    @property
    def is_cuda(self):
        return self.name != "cpu"

    @property
    def floats(self):
        return ("float32", "float64") + (("float16", "bfloat16") if self.is_cuda else ())

    def asarray(self, a):
        if isinstance(a, (list, tuple)):
            return type(a)(self.asarray(x) for x in a)
        if isinstance(a, np.ndarray) and self.name != "cpu":
            return self.xp.asarray(a)
        return a

    def asnumpy(self, a):
        if isinstance(a, (list, tuple)):
            return type(a)(self.asnumpy(x) for x in a)
        if a is None or isinstance(a, (np.ndarray, np.generic)):
            return a
        return a.get()

    def __repr__(self):
        return self.name


BACKENDS = [pytest.param("cpu"),
            pytest.param("cuda-emulated", marks=pytest.mark.emulated),
            pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Every backend: cpu, cuda-emulated (always), cuda (a real GPU)."""
    return Backend(request.param)


@pytest.fixture(params=BACKENDS[1:])
def cuda_backend(request):
    """The CUDA backends only: for what exists on CUDA alone (half types, deterministic=)."""
    return Backend(request.param)
