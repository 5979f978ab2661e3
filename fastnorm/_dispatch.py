"""Which backend serves the arrays of one call; DLPack in, the same framework out.

The public op modules use exactly these from here::

    @op
    def group_norm(x, ...):
        call, (x, weight) = resolve(x=x, weight=weight)    # None entries pass through
        ...validation...
        y = call.run(cpu.forward, cuda.forward, GroupNormForward(x=x, ...))
        return call.wrap(y)

* NumPy arrays go to the CPU kernels, CuPy arrays to the CUDA kernels (on the arrays' device, on
  CuPy's current stream), and any other object with ``__dlpack__``/``__dlpack_device__`` (torch,
  JAX, ...) is imported zero-copy, computed on, and handed back through its own framework.
* ``resolve`` only imports: it copies nothing, so arguments are validated before any work.
  ``Call.run`` makes the array fields of the kernel parameters C-contiguous (a copy only when
  they are not) and calls the backend's entry point with them (see ``fastnorm._kernels``);
  inputs are never written to.
* Every public op is decorated with :func:`op`: once ``resolve`` has found the arrays' CUDA
  device, that device (and the CuPy module serving it: CuPy, or the CUDA emulator's stand-in
  for emulated arrays) stays current for the rest of the call -- layout copies, default
  arguments, validation and kernels all run there, whatever device the caller had current.
* Importing this module does not import CuPy.
"""
import contextlib
import contextvars
import functools
import importlib
import sys

import numpy as np

from ._threads import get_num_threads

_DL_CPU, _DL_CUDA, _DL_CUDA_MANAGED = 1, 2, 13


def _type_name(obj):
    t = type(obj)
    mod = t.__module__.split(".")[0]
    return f"{mod}.{t.__qualname__}"


MIN_CUPY = 14        # bfloat16 (through ml_dtypes), ndarray `repeats` in repeat()


def _cupy():
    try:
        import cupy
    except ImportError as e:
        raise RuntimeError(
            "fastnorm: CUDA arrays need CuPy, which is not installed: `pip install "
            "'fastnorm[cuda12]'` (CUDA 12 drivers) or 'fastnorm[cuda13]' (CUDA 13)") from e
    major = str(getattr(cupy, "__version__", "0")).split(".")[0]
    if not major.isdigit() or int(major) < MIN_CUPY:
        raise RuntimeError(
            f"fastnorm: CUDA arrays need CuPy >= {MIN_CUPY}, found {cupy.__version__}: `pip "
            f"install -U 'fastnorm[cuda12]'` (CUDA 12 drivers) or 'fastnorm[cuda13]' (CUDA 13)")
    return cupy


def _emulated(obj):
    """The CUDA emulator's module if ``obj`` is one of its arrays (it is imported only by those
    who make them)."""
    emu = sys.modules.get("fastnorm._cuda.emulator")
    return emu if emu is not None and isinstance(obj, emu.ndarray) else None


class _Arg:
    """What one array argument is: its framework, its device and how to import it."""

    __slots__ = ("name", "obj", "framework", "device", "cupy")

    def __init__(self, name, obj):
        self.name, self.obj, self.cupy = name, obj, None
        if isinstance(obj, np.ndarray):
            self.framework, self.device = "numpy", "cpu"
            return
        tname = _type_name(obj)
        if tname == "cupy.ndarray":
            self.framework, self.device = "cupy", f"cuda:{obj.device.id}"
            return
        emu = _emulated(obj)
        if emu is not None:
            self.framework, self.device, self.cupy = "cupy (emulated)", f"cuda:{obj.device.id}", emu
            return
        if hasattr(obj, "__dlpack__") and hasattr(obj, "__dlpack_device__"):
            dev_type, dev_id = obj.__dlpack_device__()
            dev_type = int(dev_type)
            if dev_type == _DL_CPU:
                self.device = "cpu"
            elif dev_type in (_DL_CUDA, _DL_CUDA_MANAGED):
                self.device = f"cuda:{int(dev_id)}"
            else:
                raise TypeError(f"`{name}` lives on DLPack device type {dev_type}; fastnorm "
                                f"supports CPU and CUDA arrays only")
            self.framework = type(obj).__module__.split(".")[0]
            return
        raise TypeError(f"`{name}` must be a NumPy array, a CuPy array or a DLPack tensor "
                        f"(torch, JAX, ...), got {tname}")

    def describe(self):
        return f"`{self.name}` is a {_type_name(self.obj)} on {self.device}"

    def native(self):
        """The argument as a NumPy (CPU) or CuPy (CUDA) array, without a copy."""
        obj = self.obj
        if self.framework not in _NATIVE:
            if getattr(obj, "requires_grad", False) and hasattr(obj, "detach"):
                obj = obj.detach()          # torch refuses to export tensors that need grad
            try:
                obj = np.from_dlpack(obj) if self.device == "cpu" else _cupy().from_dlpack(obj)
            except (BufferError, TypeError, ValueError, RuntimeError) as e:
                dtype = getattr(self.obj, "dtype", "?")
                raise TypeError(f"`{self.name}` ({_type_name(self.obj)} of dtype {dtype} on "
                                f"{self.device}) cannot be imported through DLPack: {e}") from e
        return obj


# frameworks whose arrays the kernels take as they are
_NATIVE = ("numpy", "cupy", "cupy (emulated)")


class Call:
    """The backend resolved for one call: runs kernels there and wraps results back."""

    def __init__(self, backend, framework, device, like, cupy=None):
        self.backend = backend        # "cpu" or "cuda"
        self.framework = framework    # "numpy", "cupy", "cupy (emulated)", "torch", "jax", ...
        self.device = device          # "cpu" or "cuda:<id>"
        self._like = like             # one original argument, for the framework's from_dlpack
        self._cupy = cupy             # the CUDA emulator's module for emulated arrays

    @property
    def xp(self):
        """The array module of the native arrays (numpy, cupy or the emulator's stand-in)."""
        if self.backend == "cpu":
            return np
        return self._cupy if self._cupy is not None else _cupy()

    @contextlib.contextmanager
    def on_device(self):
        """Make this call's CUDA device (and CuPy module) current inside the block."""
        if self.backend == "cpu":
            yield
            return
        from . import _cuda
        xp = self.xp
        with xp.cuda.Device(int(self.device.split(":")[1])), _cuda.using(xp):
            yield

    def contiguous(self, a):
        """``a`` C-contiguous (copied only when it is not), also each array of a tuple (a
        contract's sequence of arrays); anything else as it is."""
        if isinstance(a, tuple):
            return tuple(self.contiguous(e) for e in a)
        if isinstance(a, np.ndarray):
            return a if a.flags.c_contiguous else np.ascontiguousarray(a)
        if self.backend == "cuda" and isinstance(a, self.xp.ndarray):
            return a if a.flags.c_contiguous else self.xp.ascontiguousarray(a)
        return a

    def run(self, cpu, cuda, params):
        """Run ``params`` (a contract of ``fastnorm._kernels``) on this backend's entry point:
        ``cpu`` (with the thread count) or ``cuda`` (on the arrays' device)."""
        contiguous = self.contiguous
        kwargs = {k: contiguous(a) for k, a in zip(params._fields, params)}
        if self.backend == "cpu":
            return cpu(**kwargs, nthreads=get_num_threads())
        self.xp                      # CuPy must be installed (unless emulated)
        with self.on_device():
            return cuda(**kwargs, nthreads=0)

    def wrap(self, result):
        """Native result(s) -> the caller's framework (tuples, lists and None pass through)."""
        if isinstance(result, (tuple, list)):
            return type(result)(self.wrap(r) for r in result)
        if result is None or self.framework in _NATIVE:
            return result
        from_dlpack = _from_dlpack_of(self._like)
        return result if from_dlpack is None else from_dlpack(result)


# array types defined in a module other than their framework's public one
_FRAMEWORK_OF_MODULE = {"jaxlib": "jax"}


_FROM_DLPACK = {}             # array type -> its framework's from_dlpack (or None)


def _from_dlpack_of(obj):
    """The ``from_dlpack`` of ``obj``'s framework, or None if it has none (then NumPy/CuPy come
    back); looked up once per array type (a failed import is not cached by Python and costs a
    search of sys.path every time)."""
    t = type(obj)
    if t not in _FROM_DLPACK:
        _FROM_DLPACK[t] = _find_from_dlpack(obj)
    return _FROM_DLPACK[t]


def _find_from_dlpack(obj):
    try:
        from array_api_compat import array_namespace
        return array_namespace(obj).from_dlpack
    except Exception:
        pass
    top = type(obj).__module__.split(".")[0]
    top = _FRAMEWORK_OF_MODULE.get(top, top)
    for modname in (top, top + ".numpy"):
        mod = sys.modules.get(modname)
        if mod is None:
            try:
                mod = importlib.import_module(modname)
            except ImportError:
                continue
        if hasattr(mod, "from_dlpack"):
            return mod.from_dlpack
    return None


def resolve(**arrays):
    """Resolve the backend of one call from its array arguments (keyword order = argument order).

    Returns ``(call, natives)`` where ``natives`` lists the arguments, in order, as C-contiguous
    NumPy/CuPy arrays (``None`` stays ``None``). All arrays must come from one framework
    (``TypeError`` otherwise) on one device (``ValueError`` otherwise).
    """
    args = [_Arg(name, obj) for name, obj in arrays.items() if obj is not None]
    if not args:
        raise TypeError("fastnorm: no array argument given")
    first = args[0]
    for a in args[1:]:
        if a.framework != first.framework:
            raise TypeError(f"{first.describe()} but {a.describe()}: pass arrays of one "
                            f"framework in one call")
        if a.device != first.device:
            raise ValueError(f"{first.describe()} but {a.describe()}: fastnorm makes no implicit "
                             f"transfers, move them to one device first")
    backend = "cpu" if first.device == "cpu" else "cuda"
    call = Call(backend, first.framework, first.device, first.obj, first.cupy)
    by_name = {a.name: a for a in args}
    if backend == "cpu":                          # no device to make current
        return call, tuple(by_name[name].native() if obj is not None else None
                           for name, obj in arrays.items())
    scope = _scope.get()
    if scope is not None:
        scope.enter_context(call.on_device())      # current until the op returns
    with contextlib.nullcontext() if scope is not None else call.on_device():
        natives = tuple(by_name[name].native() if obj is not None else None
                        for name, obj in arrays.items())
    return call, natives


_scope = contextvars.ContextVar("fastnorm_op_scope", default=None)


def op(func):
    """Decorator of the public ops: the device that ``resolve`` finds stays current until the op
    returns (see the module docstring)."""
    @functools.wraps(func)
    def call_op(*args, **kwargs):
        with contextlib.ExitStack() as stack:
            token = _scope.set(stack)
            try:
                return func(*args, **kwargs)
            finally:
                _scope.reset(token)
    return call_op
