"""fastnorm's CUDA emulator: the CUDA kernels run on the host, without a GPU.

This module stands in for the part of CuPy that fastnorm's CUDA launchers use, backed by NumPy:
device arrays (:class:`ndarray`, host memory that fastnorm treats as device memory), ``Device``
contexts (two emulated devices shaped like an H100: 132 SMs, 48 KiB of shared memory per block),
array functions, ``RawModule``, and the one cuBLAS call the launchers make
(``cuda.cublas.gemmStridedBatchedEx``, see :func:`_gemm_strided_batched_ex`). A ``RawModule``
compiles the *unmodified* ``.cu`` source with the host C++ compiler against a small CUDA header
(``fnemu.h``) and runs every CUDA thread of a block as a fiber, so ``__syncthreads()`` and warp
shuffles keep their meaning. Every launch is checked for what CuPy never checks (see
:mod:`._module`): launch limits, argument types against the kernel's parameters, out-of-bounds
accesses (guard pages and canaries around copies of the buffers), races (a second run in reverse
block and thread order must give the same bits, unless the kernel does floating-point atomics),
barrier and warp misuse. Failures raise :class:`EmulatorError`.

Arrays made here go through fastnorm's public functions like CuPy arrays, on the CUDA backend::

    import numpy as np, fastnorm
    from fastnorm._cuda import emulator as cp          # the stand-in for cupy
    x = cp.asarray(np.random.rand(2, 32, 8, 8).astype(np.float32))
    y = fastnorm.group_norm(x, 8)                       # the CUDA kernels, emulated
    y.get()                                             # back to NumPy

Needs a C++17 compiler (g++ or clang++, ``CXX``); builds are cached (``FASTNORM_EMULATOR_CACHE``).
``FASTNORM_EMULATOR_RACECHECK=0`` skips the second, reverse-order run of each launch.
What the emulator cannot check (the GPU memory model, FMA contraction, fast-math intrinsics and
flush-to-zero, occupancy, register limits, speed) is listed in docs/robustness.md.
"""
import contextlib
import ctypes
import functools
import math
import os
import threading
import time
import types
import weakref
from typing import NamedTuple

import numpy as np
from numpy.lib.mixins import NDArrayOperatorsMixin

from ._module import EmulatorError, Module

__version__ = "14.0.0+fastnorm.emulator"      # the CuPy API level this stands in for

NUM_DEVICES = 2
DEVICE_NAME = "fastnorm CUDA emulator (H100-shaped)"
ATTRIBUTES = {"MultiProcessorCount": 132, "MaxThreadsPerBlock": 1024,
              "MaxSharedMemoryPerBlock": 48 << 10, "WarpSize": 32,
              "ComputeCapabilityMajor": 9, "ComputeCapabilityMinor": 0}
ALIGNMENT = 256                                # CuPy's allocations are at least this aligned

inf, nan, newaxis, pi = np.inf, np.nan, np.newaxis, np.pi
(bool_, int8, int16, int32, int64, uint8, uint16, uint32, uint64, float16, float32, float64,
 intp, complex64, complex128) = (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8,
                                 np.uint16, np.uint32, np.uint64, np.float16, np.float32,
                                 np.float64, np.intp, np.complex64, np.complex128)
dtype = np.dtype

__all__ = ["EmulatorError", "ndarray", "Device", "RawModule", "asarray", "asnumpy", "cuda",
           "counting", "Gemm"]


def _race_check():
    return os.environ.get("FASTNORM_EMULATOR_RACECHECK", "1") != "0"


# ---------------------------------------------------------------- devices

_local = threading.local()           # the current device is per thread, as in CUDA


def _current():
    return getattr(_local, "device", 0)


class Device:
    """An emulated CUDA device; ``with Device(1):`` makes it current, as in CuPy."""

    def __init__(self, device=None):
        self.id = _current() if device is None else int(device)
        if not 0 <= self.id < NUM_DEVICES:
            raise EmulatorError(f"invalid device ordinal {self.id} (the emulator has "
                                f"{NUM_DEVICES} devices)")
        self._prev = []

    def __enter__(self):
        self._prev.append(_current())
        _local.device = self.id
        return self

    def __exit__(self, *exc):
        _local.device = self._prev.pop()

    def use(self):
        _local.device = self.id

    def synchronize(self):
        pass

    @property
    def attributes(self):
        return dict(ATTRIBUTES)

    @property
    def compute_capability(self):
        return f"{ATTRIBUTES['ComputeCapabilityMajor']}{ATTRIBUTES['ComputeCapabilityMinor']}"

    def __eq__(self, other):
        return isinstance(other, Device) and other.id == self.id

    def __hash__(self):
        return hash(self.id)

    def __repr__(self):
        return f"<emulated CUDA Device {self.id}>"


class _Stream:
    """Streams are accepted and ignored: the emulator runs every launch synchronously."""

    null = None

    def __init__(self, *args, **kwargs):
        self.ptr = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def synchronize(self):
        pass

    def use(self):
        return self


_Stream.null = _Stream()


class _Event:
    """A CUDA event: the host time of its record() (every launch here is synchronous)."""

    def __init__(self, *args, **kwargs):
        self.time = None

    def record(self, stream=None):
        self.time = time.perf_counter()

    def synchronize(self):
        pass

    @property
    def done(self):
        return self.time is not None


def _elapsed_ms(start, end):
    if start.time is None or end.time is None:
        raise EmulatorError("get_elapsed_time: an event was never recorded")
    return (end.time - start.time) * 1e3


def _properties(i):
    Device(i)                                  # validates the ordinal
    return {"name": DEVICE_NAME.encode(), "multiProcessorCount": ATTRIBUTES["MultiProcessorCount"],
            "major": 9, "minor": 0, "maxThreadsPerBlock": 1024, "sharedMemPerBlock": 48 << 10,
            "warpSize": 32, "totalGlobalMem": 80 << 30}


cuda = types.ModuleType(__name__ + ".cuda", "The emulated cupy.cuda namespace.")
cuda.Device = Device
cuda.Stream = cuda.ExternalStream = _Stream
cuda.get_current_stream = lambda device=None: _Stream.null
cuda.Event = _Event
cuda.get_elapsed_time = _elapsed_ms
cuda.runtime = types.SimpleNamespace(
    getDeviceCount=lambda: NUM_DEVICES, getDevice=_current, getDeviceProperties=_properties,
    deviceSynchronize=lambda: None, CUDARuntimeError=EmulatorError)


# ---------------------------------------------------------------- counters (for tests)

class Launch(NamedTuple):
    """What one kernel launch did (its first run; the cost model's inputs): ``blocks`` and
    ``threads`` (all blocks') launched, ``barriers`` (``__syncthreads()`` completed, once per
    block), ``warp_syncs`` (warp-synchronous calls completed, once per warp: shuffles, votes,
    ``__syncwarp``) and ``atomics`` (atomic operations, once per thread)."""
    kernel: str
    blocks: int
    threads: int
    barriers: int
    warp_syncs: int
    atomics: int


class Gemm(NamedTuple):
    """One emulated cuBLAS GEMM call: sizes (cuBLAS's column-major m, n, k and the batch count)
    and the cudaDataType / cublasComputeType numbers it was called with."""
    m: int
    n: int
    k: int
    batch: int
    a_type: int
    c_type: int
    compute: int


class Counts:
    """Launches and host synchronisations seen inside a :func:`counting` block; ``ops``: the
    other device operations, each a CuPy kernel, memset or transfer on a GPU (elementwise and
    array functions, sorts, scans, fancy indexing and assignment, copies, ``zeros``/``full``
    fills, host-to-device copies); ``log``: one :class:`Launch` per kernel launch,
    ``total(field)`` their sum; ``gemms``: one :class:`Gemm` per cuBLAS call (counted in
    neither ``launches`` nor ``ops``)."""

    def __init__(self):
        self.launches = 0
        self.syncs = 0
        self.ops = 0
        self.kernels = []
        self.log = []
        self.gemms = []

    def total(self, field):
        return sum(getattr(e, field) for e in self.log)

    def __repr__(self):
        return (f"Counts(launches={self.launches}, ops={self.ops}, gemms={len(self.gemms)}, "
                f"syncs={self.syncs}, "
                f"barriers={self.total('barriers')}, atomics={self.total('atomics')})")


_counters = []


@contextlib.contextmanager
def counting():
    """Count kernel launches, other device operations and device-to-host synchronisations
    (``.get()``, ``bool()``, ``int()``, ``float()``, ``.item()``, ``.tolist()``, and the
    operations whose output size depends on the data: ``nonzero``, ``flatnonzero``, boolean-mask
    indexing, ...) in this block."""
    c = Counts()
    _counters.append(c)
    try:
        yield c
    finally:
        _counters.remove(c)


def _note_sync():
    for c in _counters:
        c.syncs += 1


# functions whose output size depends on the data: CuPy reads a count back (a synchronisation)
_SIZED = {"nonzero", "flatnonzero", "argwhere", "unique", "compress", "extract"}


def _note_op():
    for c in _counters:
        c.ops += 1


# ---------------------------------------------------------------- arrays

# Device memory by address, for the library calls that take raw pointers (cuBLAS): every
# allocation of _alloc (its raw host block, by address), and every array whose ``.data.ptr`` a
# launcher took (the only way it gets a pointer), by the start address of its memory.
_raw_blocks = weakref.WeakValueDictionary()
_pointed = weakref.WeakValueDictionary()     # (start address, device) -> owner


def _alloc(shape, dtype, poison):
    """Host memory standing in for a fresh device allocation (256-byte aligned, like CuPy's;
    ``empty`` is filled with 0xFF bytes: NaN for floats, -1 for integers)."""
    dtype = np.dtype(dtype)
    shape = (int(shape),) if np.ndim(shape) == 0 else tuple(int(s) for s in shape)
    n = math.prod(shape) * dtype.itemsize
    raw = np.empty(n + ALIGNMENT, np.uint8)
    off = (-raw.__array_interface__["data"][0]) % ALIGNMENT
    buf = raw[off:off + n]
    _raw_blocks[raw.__array_interface__["data"][0]] = raw
    if poison:
        buf.fill(0xFF)
    return buf.view(dtype).reshape(shape)


def _allocation(a):
    """(start address, size in bytes, owner) of the memory holding NumPy array ``a``: the block
    of the _alloc call that made it (without its alignment padding), else NumPy's own block."""
    root = a
    while isinstance(root.base, np.ndarray):
        root = root.base
    addr = root.__array_interface__["data"][0]
    if _raw_blocks.get(addr) is root:
        return addr + (-addr) % ALIGNMENT, root.nbytes - ALIGNMENT, root
    return addr, root.nbytes, root


def _device_memory(ptr, nbytes, what):
    """The allocation (start, owner) holding the ``nbytes`` bytes at ``ptr``, which must be memory
    of the current device that a launcher took a pointer to; EmulatorError otherwise."""
    for (start, dev), owner in list(_pointed.items()):
        size = _allocation(owner)[1]
        if start <= ptr and ptr + nbytes <= start + size:
            if dev != _current():
                raise EmulatorError(f"{what}: memory of device {dev} used on device {_current()}")
            return start, owner
    raise EmulatorError(f"{what}: the {nbytes} bytes at {ptr:#x} are not inside one device "
                        f"allocation (out of bounds, or not a pointer taken from an array)")


class _MemoryPointer:
    def __init__(self, ptr, device_id):
        self.ptr = ptr
        self.device_id = device_id

    @property
    def device(self):
        return Device(self.device_id)


def _check_device(dev):
    cur = _current()
    if dev != cur:
        raise ValueError(f"Array device must be same as the current device: array device = "
                         f"{dev} while current = {cur} (emulated CuPy: a kernel runs on the "
                         f"current device)")


def _unwrap(obj):
    """Emulated arrays -> their NumPy memory, checking they live on the current device."""
    if isinstance(obj, ndarray):
        _check_device(obj._dev)
        return obj._a
    if isinstance(obj, np.ndarray):
        raise TypeError(f"Unsupported type {type(obj)}: NumPy arrays are host memory (emulated "
                        f"CuPy: use asarray() to copy them to the device)")
    if isinstance(obj, (list, tuple)):
        return type(obj)(_unwrap(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _unwrap(v) for k, v in obj.items()}
    return obj


def _stable(name, kwargs):
    """CuPy's sorts are stable: so are the emulator's (NumPy's default quicksort is not)."""
    if name in ("argsort", "sort") and kwargs.get("kind") is None:
        kwargs = dict(kwargs, kind="stable")
    return kwargs


def _wrap(r, dev=None):
    """NumPy results -> emulated arrays on ``dev`` (default: the current device); reductions
    give 0-d arrays, as CuPy's do."""
    if isinstance(r, np.ndarray):
        return ndarray._of(r, _current() if dev is None else dev)
    if isinstance(r, np.generic):
        return ndarray._of(np.asarray(r), _current() if dev is None else dev)
    if isinstance(r, (list, tuple)):
        return type(r)(_wrap(x, dev) for x in r)
    return r


class ndarray(NDArrayOperatorsMixin):
    """An emulated CuPy array: host memory that fastnorm treats as memory of an emulated device.

    Operations that would launch a CuPy kernel (arithmetic, reductions, copies, fancy indexing)
    require the array's device to be the current one, as CuPy does; views do not. Implicit
    conversion to NumPy raises, as in CuPy: use :meth:`get`.
    """

    __array_priority__ = 100

    def __init__(self, shape, dtype=float, memptr=None, strides=None, order="C"):
        if memptr is not None or strides is not None or order != "C":
            raise NotImplementedError("emulated ndarray(): only shape and dtype")
        self._a = _alloc(shape, dtype, poison=True)
        self._dev = _current()

    @classmethod
    def _of(cls, a, dev):
        self = cls.__new__(cls)
        self._a = a
        self._dev = dev
        return self

    # --- attributes
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    nbytes = property(lambda self: self._a.nbytes)
    itemsize = property(lambda self: self._a.itemsize)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    T = property(lambda self: ndarray._of(self._a.T, self._dev))

    @property
    def data(self):
        ptr = self._a.__array_interface__["data"][0] if self._a.nbytes else 0
        if ptr:
            start, _, owner = _allocation(self._a)
            _pointed[start, self._dev] = owner
        return _MemoryPointer(ptr, self._dev)

    @property
    def device(self):
        return Device(self._dev)

    # --- host transfers (explicit only)
    def get(self, stream=None, order="C", out=None, blocking=True):
        _note_sync()
        a = np.array(self._a, order=order, copy=True)
        if out is not None:
            out[...] = a
            return out
        return a

    def __array__(self, *args, **kwargs):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. Please use "
                        "`.get()` to construct a NumPy array explicitly (emulated CuPy).")

    def _scalar(self):
        _note_sync()
        return self._a

    def __bool__(self):
        return bool(self._scalar())

    def __int__(self):
        return int(self._scalar())

    def __float__(self):
        return float(self._scalar())

    def __index__(self):
        return self._scalar().__index__()

    def item(self, *args):
        return self._scalar().item(*args)

    def tolist(self):
        return self._scalar().tolist()

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        for i in range(len(self._a)):
            yield self[i]

    def __repr__(self):
        return f"emulated cupy.ndarray({self._a!r}, device={self._dev})"

    # --- NumPy protocols: every operation runs "on the current device"
    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        _note_op()
        out = kwargs.get("out")
        r = getattr(ufunc, method)(*_unwrap(inputs), **_unwrap(kwargs))
        if out is not None:
            return out[0] if len(out) == 1 else out
        return _wrap(r)

    def __array_function__(self, func, types, args, kwargs):
        _note_op()
        if func.__name__ in _SIZED:
            _note_sync()
        return _wrap(func(*_unwrap(args), **_stable(func.__name__, _unwrap(kwargs))))

    def __getitem__(self, key):
        key = _unwrap(key)
        if any(isinstance(k, np.ndarray) and k.dtype == np.bool_
               for k in (key if isinstance(key, tuple) else (key,))):
            _note_sync()                                # a boolean mask: the size is read back
        r = self._a[key]
        if np.may_share_memory(r, self._a):             # a view: no kernel, stays put
            return ndarray._of(r, self._dev)
        _check_device(self._dev)
        _note_op()
        return _wrap(r)

    def __setitem__(self, key, value):
        _check_device(self._dev)
        _note_op()
        self._a[_unwrap(key)] = _unwrap(value)

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        attr = getattr(self._a, name)
        if not callable(attr):
            return _wrap(attr, self._dev)

        @functools.wraps(attr)
        def method(*args, **kwargs):
            if name in _SIZED:
                _note_sync()
            r = attr(*_unwrap(args), **_stable(name, _unwrap(kwargs)))
            if isinstance(r, np.ndarray) and np.may_share_memory(r, self._a):
                return ndarray._of(r, self._dev)        # reshape, view, transpose, ...
            if r is not None:
                _check_device(self._dev)
                _note_op()
            return _wrap(r)
        return method


ndarray.__module__ = "cupy (emulated)"


# ---------------------------------------------------------------- array creation

def empty(shape, dtype=float, order="C"):
    return ndarray._of(_alloc(shape, dtype, poison=True), _current())


def zeros(shape, dtype=float, order="C"):
    _note_op()                                      # a memset on the device
    a = _alloc(shape, dtype, poison=False)
    a.fill(0)
    return ndarray._of(a, _current())


def ones(shape, dtype=float, order="C"):
    return full(shape, 1, dtype)


def full(shape, fill_value, dtype=None, order="C"):
    if dtype is None:
        dtype = np.asarray(fill_value).dtype
    _note_op()
    a = _alloc(shape, dtype, poison=False)
    a.fill(_unwrap(fill_value))
    return ndarray._of(a, _current())


def empty_like(a, dtype=None, order="K", shape=None):
    return empty(a.shape if shape is None else shape, a.dtype if dtype is None else dtype)


def zeros_like(a, dtype=None, order="K", shape=None):
    return zeros(a.shape if shape is None else shape, a.dtype if dtype is None else dtype)


def ones_like(a, dtype=None, order="K", shape=None):
    return ones(a.shape if shape is None else shape, a.dtype if dtype is None else dtype)


def full_like(a, fill_value, dtype=None, order="K", shape=None):
    return full(a.shape if shape is None else shape, fill_value,
                a.dtype if dtype is None else dtype)


def _to_device(a, dtype=None):
    """Host data -> a fresh emulated array on the current device (an explicit transfer)."""
    a = np.asarray(a, dtype=dtype)
    _note_op()                                      # a host-to-device copy
    out = _alloc(a.shape, a.dtype, poison=False)
    out[...] = a
    return ndarray._of(out, _current())


def array(obj, dtype=None, copy=True, order="K", ndmin=0):
    if isinstance(obj, ndarray):
        if not copy and (dtype is None or np.dtype(dtype) == obj.dtype):
            return obj
        _check_device(obj._dev)
        r = _to_device(obj._a, dtype)
    else:
        r = _to_device(obj, dtype)
    return r if r.ndim >= ndmin else r.reshape((1,) * (ndmin - r.ndim) + r.shape)


def asarray(a, dtype=None, order=None):
    """Host data (NumPy, lists, scalars) is copied to the current device; emulated arrays are
    returned as they are (cast if ``dtype`` differs)."""
    if isinstance(a, ndarray):
        return a if dtype is None or np.dtype(dtype) == a.dtype else a.astype(dtype)
    return _to_device(a, dtype)


def ascontiguousarray(a, dtype=None):
    if not isinstance(a, ndarray):
        return _to_device(np.ascontiguousarray(a), dtype)
    if a.flags.c_contiguous and (dtype is None or np.dtype(dtype) == a.dtype):
        return a
    _check_device(a._dev)
    _note_op()
    return _wrap(np.ascontiguousarray(a._a, dtype=dtype))


def asnumpy(a, stream=None, order="C", out=None):
    if isinstance(a, ndarray):
        return a.get(order=order, out=out)
    return np.asarray(a, order=order)


def get_array_module(*args):
    import sys
    return sys.modules[__name__]


def from_dlpack(obj):
    raise TypeError("the CUDA emulator cannot import DLPack tensors (their memory is on a real "
                    "device or the host): use emulator.asarray() on host data")


def argsort(a, axis=-1, kind=None):
    return np.argsort(a, axis=axis, kind=kind)       # stable: see _stable


def sort(a, axis=-1, kind=None):
    return np.sort(a, axis=axis, kind=kind)


def __getattr__(name):
    """Any other NumPy function, run "on the current device" (array arguments must live there)."""
    f = getattr(np, name, None)
    if f is None or not callable(f):
        raise AttributeError(f"the CUDA emulator has no {name!r}")

    @functools.wraps(f)
    def kernel(*args, **kwargs):
        _note_op()
        if name in _SIZED:
            _note_sync()
        return _wrap(f(*_unwrap(args), **_unwrap(kwargs)))
    return kernel


# ---------------------------------------------------------------- kernels

class RawModule:
    """``cupy.RawModule(code=..., options=..., name_expressions=...)``, built with the host C++
    compiler (see the module docstring)."""

    def __init__(self, code=None, path=None, options=(), backend="nvrtc",
                 translate_cucomplex=False, enable_cooperative_groups=False,
                 name_expressions=None, jitify=False):
        if code is None:
            with open(path) as f:
                code = f.read()
        self._module = Module(code, tuple(options), tuple(name_expressions or ()))

    def get_function(self, name):
        return RawKernel(self._module.get(name))


class RawKernel:
    """A kernel of a :class:`RawModule`: ``kernel(grid, block, args, shared_mem=0)``."""

    def __init__(self, kernel):
        self._kernel = kernel
        self.name = kernel.name

    def __call__(self, grid, block, args, *, shared_mem=0, stream=None,
                 enable_cooperative_groups=False):
        for c in _counters:
            c.launches += 1
            c.kernels.append(self.name)
        self._kernel.launch(grid, block, tuple(args), shared_mem, _current(),
                            check_races=_race_check())
        if _counters:
            entry = Launch(self.name, *self._kernel.last_counts)
            for c in _counters:
                c.log.append(entry)


# ---------------------------------------------------------------- cuBLAS

# cudaDataType (library_types.h) and cuBLAS enum values, as CuPy exposes them
# (cupy.cuda.runtime.CUDA_R_*, cupy.cuda.cublas.*)
CUDA_R_32F, CUDA_R_64F, CUDA_R_16F, CUDA_R_16BF = 0, 1, 2, 14
CUBLAS_OP_N, CUBLAS_OP_T = 0, 1
CUBLAS_COMPUTE_32F, CUBLAS_COMPUTE_32F_PEDANTIC, CUBLAS_COMPUTE_64F = 68, 69, 70
CUBLAS_COMPUTE_32F_FAST_TF32 = 77
CUBLAS_GEMM_DEFAULT, CUBLAS_GEMM_DEFAULT_TENSOR_OP = -1, 99


def _bfloat16():
    import ml_dtypes
    return np.dtype(ml_dtypes.bfloat16)


_CUDA_TYPES = {CUDA_R_32F: lambda: np.dtype(np.float32), CUDA_R_64F: lambda: np.dtype(np.float64),
               CUDA_R_16F: lambda: np.dtype(np.float16), CUDA_R_16BF: _bfloat16}
# (A and B type, C type) -> the compute types cublasGemmEx accepts for them (the subset of its
# table that the emulator runs); bfloat16 inputs need compute capability 8.0
_GEMM_EX = {(CUDA_R_16F, CUDA_R_16F): (CUBLAS_COMPUTE_32F, CUBLAS_COMPUTE_32F_PEDANTIC),
            (CUDA_R_16F, CUDA_R_32F): (CUBLAS_COMPUTE_32F, CUBLAS_COMPUTE_32F_PEDANTIC),
            (CUDA_R_16BF, CUDA_R_16BF): (CUBLAS_COMPUTE_32F, CUBLAS_COMPUTE_32F_PEDANTIC),
            (CUDA_R_16BF, CUDA_R_32F): (CUBLAS_COMPUTE_32F, CUBLAS_COMPUTE_32F_PEDANTIC),
            (CUDA_R_32F, CUDA_R_32F): (CUBLAS_COMPUTE_32F, CUBLAS_COMPUTE_32F_PEDANTIC,
                                       CUBLAS_COMPUTE_32F_FAST_TF32),
            (CUDA_R_64F, CUDA_R_64F): (CUBLAS_COMPUTE_64F,)}


def _cublas_handle():
    """``cupy.cuda.get_cublas_handle()``: the current device's handle (a number here)."""
    return 0xB1A5 + _current()


def _tf32(a):
    """float32 -> TF32 (10 explicit mantissa bits, round to nearest, ties away from zero, as
    ``cvt.rna.tf32.f32``), kept in float32; inf and NaN unchanged."""
    u = np.ascontiguousarray(a, np.float32).view(np.uint32)
    finite = (u & 0x7F800000) != 0x7F800000
    return np.where(finite, (u + np.uint32(0x1000)) & np.uint32(0xFFFFE000), u).view(np.float32)


def _matrices(ptr, dtype, rows, cols, ld, stride, count, what):
    """The ``count`` column-major ``rows`` x ``cols`` matrices at ``ptr`` (leading dimension
    ``ld``, ``stride`` elements apart) as a NumPy view (count, rows, cols), and the byte range
    they span, after checking that it lies inside one allocation of the current device."""
    if ld < max(1, rows):
        raise EmulatorError(f"cuBLAS: ld{what} = {ld} < max(1, {rows}) "
                            f"(CUBLAS_STATUS_INVALID_VALUE)")
    if stride < 0:
        raise EmulatorError(f"cuBLAS: stride{what} = {stride} < 0")
    isz = dtype.itemsize
    span = ((count - 1) * stride + (cols - 1) * ld + rows) * isz
    _device_memory(ptr, span, f"cuBLAS {what}")
    mem = np.ctypeslib.as_array((ctypes.c_uint8 * span).from_address(ptr))
    view = np.lib.stride_tricks.as_strided(mem.view(dtype), shape=(count, rows, cols),
                                           strides=(stride * isz, isz, ld * isz))
    return view, (ptr, ptr + span)


def _gemm_strided_batched_ex(handle, transa, transb, m, n, k, alpha, A, Atype, lda, strideA, B,
                             Btype, ldb, strideB, beta, C, Ctype, ldc, strideC, batchCount,
                             computeType, algo):
    """``cupy.cuda.cublas.gemmStridedBatchedEx`` (cublasGemmStridedBatchedEx), column-major as
    in cuBLAS: ``C_i = alpha op(A_i) op(B_i) + beta C_i`` for i < batchCount. Computed as the
    device does for the supported types: the inputs widened exactly to the compute type (float32
    or float64; TF32 compute rounds float32 inputs to TF32 first), products summed in it (the
    order of the sums is cuBLAS's business), alpha and beta applied in it, one rounding to the
    C type; C is not read when beta == 0 (it may hold garbage). Checks what cuBLAS would refuse
    or leave undefined: unsupported type/compute combinations, bad leading dimensions, memory
    outside an allocation of the current device, C overlapping A or B, overlapping C matrices.
    """
    if handle != _cublas_handle():
        raise EmulatorError(f"cuBLAS: handle {handle} is not the current device's "
                            f"({_cublas_handle()}): use get_cublas_handle() on the current device")
    if (Atype != Btype or (Atype, Ctype) not in _GEMM_EX
            or computeType not in _GEMM_EX[Atype, Ctype]):
        raise EmulatorError(f"cuBLAS: GemmEx with A/B/C types {Atype}/{Btype}/{Ctype} and compute "
                            f"type {computeType} is not supported (CUBLAS_STATUS_NOT_SUPPORTED)")
    if Atype == CUDA_R_16BF and ATTRIBUTES["ComputeCapabilityMajor"] < 8:
        raise EmulatorError("cuBLAS: bfloat16 GEMMs need compute capability 8.0 "
                            "(CUBLAS_STATUS_ARCH_MISMATCH)")
    if transa not in (CUBLAS_OP_N, CUBLAS_OP_T) or transb not in (CUBLAS_OP_N, CUBLAS_OP_T):
        raise EmulatorError(f"cuBLAS: transa/transb {transa}/{transb} (only N and T are real)")
    if min(m, n, k, batchCount) < 0:
        raise EmulatorError(f"cuBLAS: negative size m={m} n={n} k={k} batch={batchCount}")
    for c in _counters:
        c.gemms.append(Gemm(m, n, k, batchCount, Atype, Ctype, computeType))
    if m == 0 or n == 0 or batchCount == 0:
        return
    f = np.float64 if computeType == CUBLAS_COMPUTE_64F else np.float32   # also alpha's type
    alpha_v = ctypes.cast(alpha, ctypes.POINTER(np.ctypeslib.as_ctypes_type(f)))[0]
    beta_v = ctypes.cast(beta, ctypes.POINTER(np.ctypeslib.as_ctypes_type(f)))[0]
    ab, c_t = _CUDA_TYPES[Atype](), _CUDA_TYPES[Ctype]()
    c, rc = _matrices(C, c_t, m, n, ldc, strideC, batchCount, "C")
    if k:                                    # k = 0: C = beta C, A and B are not read
        a, ra = _matrices(A, ab, *((m, k) if transa == CUBLAS_OP_N else (k, m)), lda, strideA,
                          batchCount, "A")
        b, rb = _matrices(B, ab, *((k, n) if transb == CUBLAS_OP_N else (n, k)), ldb, strideB,
                          batchCount, "B")
        for r, name in ((ra, "A"), (rb, "B")):
            if r[0] < rc[1] and rc[0] < r[1]:
                raise EmulatorError(f"cuBLAS: C overlaps {name} (undefined)")
    if batchCount > 1 and strideC < (n - 1) * ldc + m:
        offsets = (np.arange(batchCount)[:, None, None] * strideC + np.arange(m)[:, None]
                   + np.arange(n) * ldc)
        if np.unique(offsets).size != offsets.size:
            raise EmulatorError("cuBLAS: the C matrices of the batch overlap (a race)")
    if k:
        a = a.astype(f) if transa == CUBLAS_OP_N else a.transpose(0, 2, 1).astype(f)
        b = b.astype(f) if transb == CUBLAS_OP_N else b.transpose(0, 2, 1).astype(f)
        if computeType == CUBLAS_COMPUTE_32F_FAST_TF32:
            a, b = _tf32(a), _tf32(b)
        r = np.matmul(a, b)
    else:
        r = np.zeros((batchCount, m, n), f)
    r *= f(alpha_v)
    if beta_v != 0:
        r += f(beta_v) * c.astype(f)
    c[...] = r.astype(c_t)


cuda.get_cublas_handle = _cublas_handle
cuda.device = types.SimpleNamespace(get_cublas_handle=_cublas_handle, Device=Device)
cuda.cublas = types.ModuleType(__name__ + ".cuda.cublas",
                               "The emulated cupy.cuda.cublas (the calls fastnorm makes).")
for _name in ("CUBLAS_OP_N", "CUBLAS_OP_T", "CUBLAS_COMPUTE_32F", "CUBLAS_COMPUTE_32F_PEDANTIC",
              "CUBLAS_COMPUTE_64F", "CUBLAS_COMPUTE_32F_FAST_TF32", "CUBLAS_GEMM_DEFAULT",
              "CUBLAS_GEMM_DEFAULT_TENSOR_OP"):
    setattr(cuda.cublas, _name, globals()[_name])
cuda.cublas.gemmStridedBatchedEx = _gemm_strided_batched_ex


def _set_stream(handle, stream):
    """``cupy.cuda.cublas.setStream``: launches run in order here; the handle is checked."""
    if handle != _cublas_handle():
        raise EmulatorError(f"cuBLAS: setStream on handle {handle}, not the current device's")


cuda.cublas.setStream = _set_stream
for _name in ("CUDA_R_32F", "CUDA_R_64F", "CUDA_R_16F", "CUDA_R_16BF"):
    setattr(cuda.runtime, _name, globals()[_name])
