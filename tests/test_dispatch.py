"""Dispatch, DLPack interop, thread control, info() and missing-backend errors."""
import subprocess
import sys

import numpy as np
import pytest

import fastnorm
from fastnorm import _dispatch


class Producer:
    """A minimal third-party DLPack producer (not NumPy, not torch)."""

    def __init__(self, a):
        self._a = a

    def __dlpack__(self, **kwargs):
        return self._a.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._a.__dlpack_device__()


def test_generic_dlpack_producer(rng):
    x = rng.standard_normal((2, 4, 3))
    y = fastnorm.group_norm(Producer(x), 2)
    assert isinstance(y, np.ndarray)       # its framework has no from_dlpack: NumPy comes back
    np.testing.assert_array_equal(y, fastnorm.group_norm(x, 2))


def test_torch_cpu_zero_copy_import(rng):
    torch = pytest.importorskip("torch")
    t = torch.randn(2, 4, 3, dtype=torch.float32)
    call, (a,) = _dispatch.resolve(x=t)
    assert call.backend == "cpu" and call.framework == "torch"
    assert a.ctypes.data == t.data_ptr()   # no copy for contiguous input
    out = call.wrap(np.ones(3, np.float32))
    assert isinstance(out, torch.Tensor)


def test_mixed_frameworks_and_devices_are_rejected():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="`x` is a torch.Tensor on cpu but `weight` is a "
                                        "numpy.ndarray"):
        _dispatch.resolve(x=torch.zeros(2), weight=np.zeros(2))

    class FakeCuda(Producer):
        def __dlpack_device__(self):
            return (2, 1)
    with pytest.raises(ValueError, match="no implicit transfers"):
        _dispatch.resolve(x=Producer(np.zeros(2)), weight=FakeCuda(np.zeros(2)))


def test_unsupported_objects():
    with pytest.raises(TypeError, match="`x` must be a NumPy array, a CuPy array or a DLPack"):
        fastnorm.group_norm(3.0, 1)

    class Weird(Producer):
        def __dlpack_device__(self):
            return (14, 0)   # OneAPI
    with pytest.raises(TypeError, match="DLPack device type 14"):
        fastnorm.group_norm(Weird(np.zeros((1, 2))), 1)


def test_bfloat16_cpu_tensor_gives_a_clear_error():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="`x`"):
        fastnorm.group_norm(torch.zeros(2, 4, dtype=torch.bfloat16), 2)


def test_missing_cpu_extension_message(monkeypatch):
    # an op module imports its CPU kernels statically: unbuilt, the import works and the first
    # call says how to build them
    import fastnorm._cpu as kernels
    monkeypatch.delattr(kernels, "group_norm")
    monkeypatch.setitem(sys.modules, "fastnorm._cpu.group_norm", None)
    from fastnorm._cpu import group_norm as missing
    with pytest.raises(RuntimeError, match="CPU kernels are not built .*`pip install .`"):
        missing.forward


def test_missing_cupy_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    with pytest.raises(RuntimeError, match=r"need CuPy, which is not installed: `pip install "
                                           r"'fastnorm\[cuda12\]'"):
        _dispatch._cupy()


def test_old_cupy_message(monkeypatch):
    import types
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(__version__="13.6.0"))
    with pytest.raises(RuntimeError, match=r"need CuPy >= 14, found 13.6.0"):
        _dispatch._cupy()


def _run(code, tmp_path, **env):
    """Run code in a fresh interpreter outside the source tree (so the installed package loads)."""
    import os
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, cwd=tmp_path, env=dict(os.environ, **env)).stdout


def test_import_does_not_import_cupy(tmp_path):
    code = "import sys, fastnorm; fastnorm.group_norm(__import__('numpy').ones((1, 2)), 1); " \
           "print('cupy' in sys.modules)"
    assert _run(code, tmp_path).strip() == "False"


def test_thread_control():
    default = fastnorm.get_num_threads()
    assert default >= 1
    with fastnorm.threads(1):
        assert fastnorm.get_num_threads() == 1
        with fastnorm.threads(3):
            assert fastnorm.get_num_threads() == 3
        assert fastnorm.get_num_threads() == 1
    assert fastnorm.get_num_threads() == default
    fastnorm.set_num_threads(2)
    try:
        assert fastnorm.get_num_threads() == 2
    finally:
        fastnorm.set_num_threads(None)
    assert fastnorm.get_num_threads() == default
    with pytest.raises(ValueError, match="`n`"):
        fastnorm.set_num_threads(0)
    with pytest.raises(TypeError, match="`n`"):
        fastnorm.threads(1.5).__enter__()


def _compiler_has_openmp(tmp_path):
    """setup.py's test: the C compiler ($CC, else Python's) builds an OpenMP program."""
    import os
    import shutil
    import sysconfig
    cc = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()
    if not shutil.which(cc[0]):
        return False
    src = tmp_path / "omp.c"
    src.write_text("#include <omp.h>\nint main(void){return omp_get_max_threads() > 0 ? 0 : 1;}\n")
    r = subprocess.run(cc + ["-fopenmp", str(src), "-o", str(tmp_path / "omp")],
                       capture_output=True)
    return r.returncode == 0


def test_omp_num_threads_is_honoured(tmp_path):
    # An OpenMP build takes its default thread count from OMP_NUM_THREADS; a serial build runs
    # one thread. Serial is right only when asked for (FASTNORM_NO_OPENMP at build time) or when
    # the compiler has no OpenMP: setup.py records its choice (_omp.BUILD_OPENMP), so a build
    # that chose OpenMP but lost it, or that went serial beside a compiler with OpenMP, fails.
    from fastnorm._cpu import _omp
    code = "import fastnorm; print(fastnorm.get_num_threads(), fastnorm.info()['openmp'])"
    n, omp = _run(code, tmp_path, OMP_NUM_THREADS="3").split()
    build = _omp.BUILD_OPENMP
    if build == "openmp":
        want = True
    elif build == "serial (FASTNORM_NO_OPENMP)":
        want = False
    else:      # "serial (no compiler support)", or "unknown" (built without setup.py)
        want = _compiler_has_openmp(tmp_path)
    assert omp == str(want), (f"the build has OpenMP: {omp}; setup.py chose {build!r}; the "
                              f"compiler has OpenMP: {_compiler_has_openmp(tmp_path)}")
    assert n == ("3" if want else "1")


def test_info():
    d = fastnorm.info()
    assert d["version"] == fastnorm.__version__
    assert d["cpu_backend"] is True
    assert isinstance(d["num_threads"], int)
    assert "cuda_backend" in d


@pytest.mark.cuda
def test_cupy_round_trip_and_torch_cuda(rng):
    import cupy as cp
    x = rng.standard_normal((2, 4, 8)).astype(np.float32)
    y = fastnorm.group_norm(cp.asarray(x), 2)
    assert isinstance(y, cp.ndarray)
    np.testing.assert_allclose(cp.asnumpy(y), fastnorm.group_norm(x, 2), rtol=1e-5, atol=1e-5)
    torch = pytest.importorskip("torch")
    t = torch.from_numpy(x).cuda()
    yt = fastnorm.group_norm(t, 2)
    assert isinstance(yt, torch.Tensor) and yt.is_cuda
    with pytest.raises(ValueError, match="no implicit transfers"):
        fastnorm.group_norm(t, 2, torch.ones(4))


def test_jax_arrays_round_trip(rng):
    jnp = pytest.importorskip("jax.numpy")
    x = jnp.asarray(rng.standard_normal((2, 4, 3)).astype(np.float32))
    y = fastnorm.group_norm(x, 2)
    assert type(y) is type(x)
    np.testing.assert_allclose(np.asarray(y), fastnorm.group_norm(np.asarray(x), 2), rtol=1e-6)


# ---------------------------------------------------------------- CUDA: devices and frameworks

def _second_device(backend):
    if backend.xp.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs two CUDA devices")
    return backend.xp.cuda.Device(1)


def test_cuda_ops_run_on_the_arrays_device(cuda_backend, rng):
    # everything an op does before and around its kernels (default weight/bias, per-image RoI
    # lists, batch-index validation, per-image NMS lists, channels-last transposes, non-contiguous
    # copies) runs on the arrays' device, whatever device is current
    B = cuda_backend
    x = rng.standard_normal((2, 8, 6, 6)).astype(np.float32)
    rois = [np.array([[0, 0, 4, 4], [1, 1, 5, 3]], np.float32), np.array([[2, 0, 5, 5]],
                                                                           np.float32)]
    boxes = np.array([[0, 0, 4, 4], [0, 0, 4, 4.5], [5, 5, 9, 9]], np.float32)
    scores = np.array([0.9, 0.8, 0.7], np.float32)
    with _second_device(B):
        xd, rd, bd, sd = B.asarray((x, rois, boxes, scores))
        xcl = B.asarray(np.ascontiguousarray(x.transpose(0, 2, 3, 1)))
        xnc = B.asarray(np.ones((2, 8, 6, 12), np.float32))[..., ::2]
        r5 = B.asarray(np.array([[1, 0, 0, 4, 4]], np.float32))
        bi = B.asarray(np.array([0, 0, 1]))
    assert B.xp.cuda.Device().id == 0
    results = [
        fastnorm.group_norm(xd, 4), fastnorm.group_norm(xnc, 4),
        fastnorm.roi_align(xd, rd, 2), fastnorm.roi_align(xcl, rd, 2, channels_last=True),
        fastnorm.roi_align(xd, r5, 2), fastnorm.roi_pool(xd, rd, 2),
        *fastnorm.nms([bd, bd[:2]], [sd, sd[:2]], 0.5), fastnorm.box_iou(bd, bd),
        fastnorm.nms(bd, sd, 0.5, batch_idx=bi), fastnorm.batched_nms(bd, sd, bi, 0.5),
    ]
    assert all(r.device.id == 1 for r in results)
    assert B.xp.cuda.Device().id == 0
    np.testing.assert_allclose(B.asnumpy(results[0]), fastnorm.group_norm(x, 4), rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_array_equal(B.asnumpy(results[6]), [0, 2])
    np.testing.assert_array_equal(B.asnumpy(results[9]), [0, 2])


def test_cuda_arrays_of_two_devices_or_frameworks_are_refused(cuda_backend):
    B = cuda_backend
    x = B.asarray(np.zeros((2, 4, 3), np.float32))
    with pytest.raises(TypeError, match=r"`weight` is a numpy.ndarray on cpu"):
        fastnorm.group_norm(x, 2, np.ones(4, np.float32))
    with _second_device(B):
        w1 = B.asarray(np.ones(4, np.float32))
    with pytest.raises(ValueError, match="`weight` .* on cuda:1: fastnorm makes no implicit"):
        fastnorm.group_norm(x, 2, w1)


def test_emulated_and_real_cupy_arrays_do_not_mix():
    from fastnorm._cuda import emulator
    cupy = pytest.importorskip("cupy")
    if not _cuda_available():
        pytest.skip("needs a CUDA GPU")
    with pytest.raises(TypeError, match="emulated"):
        fastnorm.group_norm(emulator.zeros((2, 4, 3), np.float32), 2,
                            cupy.ones(4, np.float32))


def _cuda_available():
    from conftest import CUDA
    return CUDA
