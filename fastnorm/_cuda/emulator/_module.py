"""Compile a CUDA source with the host C++ compiler and launch its kernels (the emulator's core).

``Module(code, options, name_expressions)`` builds ``code`` (an unmodified ``.cu`` text, as given
to ``cupy.RawModule``) into a shared object: the source is force-included after ``fnemu.h`` (the
CUDA subset) and followed by ``runtime.cpp`` (the fiber block executor) and a table that
instantiates every name expression. Builds are cached (see :func:`build`) in
``$FASTNORM_EMULATOR_CACHE`` (default ``~/.cache/fastnorm/emulator``).

``Kernel.launch`` checks what CuPy does not (launch limits, each argument against the kernel's
parameter type), runs the kernel on guarded copies of its buffers (twice, the second time in
reverse order, to catch races), and turns every failure into an :class:`EmulatorError` that names
the kernel, the thread and the argument.
"""
import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
INCLUDE = os.path.join(HERE, "include")

# limits checked at every launch (those of every GPU since compute capability 7.0)
MAX_THREADS_PER_BLOCK = 1024
MAX_BLOCK_DIM = (1024, 1024, 64)
MAX_GRID_DIM = (2**31 - 1, 65535, 65535)
MAX_SHARED_BYTES = 48 << 10

CXXFLAGS = ("-std=c++17", "-O1", "-fPIC", "-shared", "-fvisibility=hidden",
            "-fno-ipa-reference",        # shared values must not be cached across barriers
            "-ffp-contract=off",         # no FMA contraction (the device may contract)
            # a misaligned access traps, as the device faults ("misaligned address")
            "-fsanitize=alignment", "-fsanitize-undefined-trap-on-error",
            "-fno-strict-aliasing", "-Wno-unknown-pragmas", "-Wno-attributes")

# parameter kinds of runtime.cpp
K_OTHER, K_SIGNED, K_UNSIGNED, K_FLOAT, K_BOOL, K_POINTER, K_HALF, K_BFLOAT16, K_VOID = range(9)
_KIND_NAMES = {K_OTHER: "struct", K_SIGNED: "signed int", K_UNSIGNED: "unsigned int",
               K_FLOAT: "float", K_BOOL: "bool", K_POINTER: "pointer", K_HALF: "__half",
               K_BFLOAT16: "__nv_bfloat16", K_VOID: "void"}


class EmulatorError(RuntimeError):
    """A kernel failed in the emulator: a fault, a race, a barrier or warp misuse, or a launch
    that the device would reject."""


def _dtype_kind(dtype):
    """(kind, size) of a NumPy dtype in runtime.cpp's terms."""
    dtype = np.dtype(dtype)
    if dtype.name == "bfloat16":
        return K_BFLOAT16, 2
    if dtype == np.float16:
        return K_HALF, 2
    if dtype.kind == "f":
        return K_FLOAT, dtype.itemsize
    if dtype.kind == "b":
        return K_BOOL, 1
    if dtype.kind == "i":
        return K_SIGNED, dtype.itemsize
    if dtype.kind == "u":
        return K_UNSIGNED, dtype.itemsize
    return K_OTHER, dtype.itemsize


def _type_name(kind, size):
    if kind in (K_SIGNED, K_UNSIGNED, K_FLOAT):
        return f"{_KIND_NAMES[kind]} of {size} bytes"
    return _KIND_NAMES[kind]


# ---------------------------------------------------------------- ctypes mirror of runtime.cpp

class _Group(ctypes.Structure):
    _fields_ = [("host", ctypes.c_void_p), ("nbytes", ctypes.c_size_t), ("writable", ctypes.c_int)]


class _Arg(ctypes.Structure):
    _fields_ = [("group", ctypes.c_int), ("offset", ctypes.c_longlong),
                ("scalar", ctypes.c_void_p), ("scalar_size", ctypes.c_int)]


class _Result(ctypes.Structure):
    _fields_ = [("code", ctypes.c_int), ("group", ctypes.c_int), ("offset", ctypes.c_longlong),
                ("write", ctypes.c_int), ("block", ctypes.c_uint * 3),
                ("thread", ctypes.c_uint * 3), ("have_thread", ctypes.c_int),
                ("msg", ctypes.c_char * 1024)]


# ---------------------------------------------------------------- building

def cache_dir():
    return os.environ.get("FASTNORM_EMULATOR_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "fastnorm", "emulator")


def _cxx():
    cxx = os.environ.get("CXX") or "g++"
    if not shutil.which(cxx.split()[0]):
        raise RuntimeError("fastnorm's CUDA emulator needs a C++17 compiler (g++ or clang++; "
                           "set CXX): none found")
    return cxx.split()


def _include_dirs(options):
    dirs = []
    for i, opt in enumerate(options):
        if opt.startswith("-I") and len(opt) > 2:
            dirs.append(opt[2:])
        elif opt == "-I" and i + 1 < len(options):
            dirs.append(options[i + 1])
    return dirs


_build_lock = threading.Lock()
_built = {}                       # (code, options, name expressions) -> path, in this process


@functools.lru_cache(maxsize=None)
def _compiler_id(cxx):
    return subprocess.run(list(cxx) + ["--version"], capture_output=True, text=True).stdout


def _headers_digest(dirs):
    """Digest of every header-like file in ``dirs`` (what an #include "..." can reach)."""
    h = hashlib.sha256()
    for d in dirs:
        if not os.path.isdir(d):
            continue
        for name in sorted(os.listdir(d)):
            if name.endswith((".h", ".cuh", ".hpp", ".cpp", ".inc")):
                with open(os.path.join(d, name), "rb") as f:
                    h.update(name.encode() + b"\0" + f.read())
    return h.hexdigest()


def build(code, options, name_expressions):
    """Path of the shared object for ``code`` (built, or found in the cache). The cache key is
    the source, the name expressions, the compiler and its flags, and every header in the
    include directories (the emulator's and the ``-I`` options')."""
    memo = (code, tuple(options), tuple(name_expressions))
    if memo in _built:
        return _built[memo]
    cxx = _cxx()
    dirs = _include_dirs(options) + [INCLUDE, HERE]
    base = cxx + list(CXXFLAGS) + ["-include", os.path.join(HERE, "fnemu.h")] + \
        [f"-I{d}" for d in dirs]
    key = hashlib.sha256("\0".join([code, *name_expressions, _compiler_id(tuple(cxx)),
                                     " ".join(base), _headers_digest(dirs)]).encode())
    out = os.path.join(cache_dir(), key.hexdigest()[:32] + ".so")
    with _build_lock:
        if not os.path.exists(out):
            _compile(base, code, name_expressions, out)
    _built[memo] = out
    return out


def _compile(base, code, name_expressions, out):
    os.makedirs(cache_dir(), exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernels.cu")
        with open(src, "w") as f:
            f.write(code)
        stub = os.path.join(tmp, "module.cpp")
        with open(stub, "w") as f:
            f.write(_stub(src, name_expressions))
        tmp_out = os.path.join(tmp, "module.so")
        r = subprocess.run(base + ["-x", "c++", stub, "-o", tmp_out], capture_output=True,
                           text=True)
        if r.returncode:
            raise EmulatorError(f"emulator: the host compiler rejected the CUDA source:\n"
                                f"{r.stderr[-6000:]}")
        fd, part = tempfile.mkstemp(dir=cache_dir(), suffix=".part")
        os.close(fd)
        shutil.copyfile(tmp_out, part)
        os.replace(part, out)                      # atomic: concurrent builders agree


def _stub(src, name_expressions):
    lines = [f'#include "{src}"', '#include "runtime.cpp"',
             "const fnemu::KernelEntry fnemu_kernels[] = {"]
    for e in name_expressions:
        lines.append(f'    fnemu::Entry<&{e}>::make("{e}"),')
    if not name_expressions:
        lines.append('    {"", nullptr, 0, nullptr, nullptr},')
    lines.append("};")
    lines.append(f"const int fnemu_num_kernels = {len(name_expressions)};")
    return "\n".join(lines) + "\n"


def _static_shared(path):
    """{symbol offset: bytes of __shared__ variables declared in that function} via nm."""
    nm = shutil.which("nm")
    if nm is None:
        return None
    r = subprocess.run([nm, "-S", path], capture_output=True, text=True)
    if r.returncode:
        return None
    funcs, tls = {}, []
    for line in r.stdout.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[2] in "TtWw":
            funcs[int(parts[0], 16)] = parts[3]
        elif len(parts) == 4 and parts[3].startswith("_ZZ"):
            tls.append((parts[3], int(parts[1], 16)))
    out = {}
    for off, name in funcs.items():
        if name.startswith("_Z"):
            prefix = "_ZZ" + name[2:] + "E"
            out[off] = sum(size for sym, size in tls if sym.startswith(prefix))
    return out


# ---------------------------------------------------------------- loading and launching

class Param:
    __slots__ = ("kind", "size", "pointee_kind", "pointee_size", "pointee_const")

    def __init__(self, v):
        self.kind, self.size, self.pointee_kind, self.pointee_size, self.pointee_const = v

    def describe(self):
        if self.kind == K_POINTER:
            const = "const " if self.pointee_const else ""
            return f"{const}{_type_name(self.pointee_kind, self.pointee_size)}*"
        return _type_name(self.kind, self.size)


# One launch at a time in the whole process: __shared__ variables and the scheduler are per
# module but the fault handler is per process.
_launch_lock = threading.Lock()


class Module:
    """A built module: its kernels by name expression."""

    def __init__(self, code, options=(), name_expressions=()):
        self.path = build(code, tuple(options), list(name_expressions))
        self._lib = lib = ctypes.CDLL(self.path)
        lib.fnemu_kernel_name.restype = ctypes.c_char_p
        lib.fnemu_kernel_offset.restype = ctypes.c_longlong
        lib.fnemu_launch.argtypes = [
            ctypes.c_int, ctypes.POINTER(ctypes.c_uint), ctypes.POINTER(ctypes.c_uint),
            ctypes.c_int, ctypes.POINTER(_Arg), ctypes.c_int, ctypes.POINTER(_Group),
            ctypes.c_int, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(_Result)]
        assert lib.fnemu_result_size() == ctypes.sizeof(_Result)
        shared = _static_shared(self.path)
        self.kernels = {}
        for k in range(lib.fnemu_kernel_count()):
            name = lib.fnemu_kernel_name(k).decode()
            params = []
            for i in range(lib.fnemu_kernel_nparams(k)):
                v = (ctypes.c_int * 5)()
                lib.fnemu_kernel_param(k, i, v)
                params.append(Param(tuple(v)))
            static = None if shared is None else shared.get(lib.fnemu_kernel_offset(k), 0)
            self.kernels[name] = Kernel(self, k, name, params, static)

    def get(self, name):
        try:
            return self.kernels[name]
        except KeyError:
            raise EmulatorError(f"kernel {name!r} is not among the module's name expressions "
                                f"{sorted(self.kernels)}") from None


def _dims(v, what):
    if isinstance(v, (int, np.integer)):
        v = (v,)
    v = tuple(int(d) for d in v)
    if not 1 <= len(v) <= 3:
        raise EmulatorError(f"{what} must have 1 to 3 dimensions, got {v}")
    return v + (1,) * (3 - len(v))


# CuPy turns Python scalars into these before a launch
_PY_SCALARS = {bool: np.bool_, int: np.int64, float: np.float64}


class Kernel:
    def __init__(self, module, index, name, params, static_shared):
        self.module, self.index, self.name, self.params = module, index, name, params
        self.static_shared = static_shared

    def _fail(self, msg):
        raise EmulatorError(f"emulator: kernel {self.name}: {msg}")

    def check_launch(self, grid, block, shared_mem):
        grid, block = _dims(grid, "grid"), _dims(block, "block")
        for what, dims, lim in (("grid", grid, MAX_GRID_DIM), ("block", block, MAX_BLOCK_DIM)):
            for axis, d, m in zip("xyz", dims, lim):
                if not 1 <= d <= m:
                    self._fail(f"invalid launch: {what}.{axis} = {d} (the device allows 1 to {m})")
        nt = block[0] * block[1] * block[2]
        if nt > MAX_THREADS_PER_BLOCK:
            self._fail(f"invalid launch: {nt} threads per block (at most "
                       f"{MAX_THREADS_PER_BLOCK})")
        static = self.static_shared or 0
        if shared_mem < 0 or static + shared_mem > MAX_SHARED_BYTES:
            self._fail(f"invalid launch: {static} bytes of static + {shared_mem} of dynamic "
                       f"shared memory (at most {MAX_SHARED_BYTES} without opting in)")
        return grid, block

    def launch(self, grid, block, args, shared_mem, device_id, check_races=True):
        """Run the kernel on (grid, block) with ``args`` (emulated arrays and scalars)."""
        from . import ndarray
        grid, block = self.check_launch(grid, block, int(shared_mem))
        if len(args) != len(self.params):
            self._fail(f"{len(self.params)} parameters, launched with {len(args)} arguments")
        keep = []                        # scalar buffers alive during the call
        spans = []                       # (start, end, arg index, array) of the pointer args
        descs = (_Arg * max(1, len(args)))()
        for i, (a, p) in enumerate(zip(args, self.params)):
            where = f"argument #{i} ({p.describe()})"
            if isinstance(a, ndarray):
                if p.kind != K_POINTER:
                    self._fail(f"{where} got an array")
                if a.device.id != device_id:
                    self._fail(f"{where} lives on device {a.device.id}, the launch is on "
                               f"device {device_id}")
                if not a.flags.c_contiguous:
                    self._fail(f"{where} got a non-contiguous array of shape {a.shape}: a raw "
                               f"kernel sees only its data pointer")
                kind, size = _dtype_kind(a.dtype)
                if p.pointee_kind != K_VOID and (kind, size) != (p.pointee_kind, p.pointee_size):
                    self._fail(f"{where} got an array of {a.dtype}")
                if a.nbytes == 0:
                    descs[i].group = -2          # CuPy passes NULL for empty arrays
                else:
                    ptr = a.data.ptr
                    spans.append((ptr, ptr + a.nbytes, i, a))
                continue
            if isinstance(a, np.ndarray):
                self._fail(f"{where} got a NumPy array (host memory): pass a device array")
            scalar = a
            if type(a) in _PY_SCALARS:
                scalar = _PY_SCALARS[type(a)](a)
            if not isinstance(scalar, np.generic):
                self._fail(f"{where} got an unsupported {type(a).__name__}")
            kind, size = _dtype_kind(scalar.dtype)
            if p.kind == K_POINTER:
                self._fail(f"{where} got a scalar {scalar.dtype}")
            if p.kind == K_OTHER:
                ok = size == p.size
            else:
                ok = (kind, size) == (p.kind, p.size)
            if not ok:
                self._fail(f"{where} got a {scalar.dtype} scalar ({_type_name(kind, size)})")
            buf = ctypes.create_string_buffer(scalar.tobytes(), max(16, size))
            keep.append(buf)
            descs[i].group = -1
            descs[i].scalar = ctypes.cast(buf, ctypes.c_void_p)
            descs[i].scalar_size = size
        # overlapping pointer arguments share one copy (so that aliasing is preserved)
        spans.sort(key=lambda s: s[0])
        groups, members = [], []
        for s in spans:
            if groups and s[0] < groups[-1][1]:
                groups[-1][1] = max(groups[-1][1], s[1])
                members[-1].append(s)
            else:
                groups.append([s[0], s[1]])
                members.append([s])
        gdescs = (_Group * max(1, len(groups)))()
        for g, ((lo, hi), mem) in enumerate(zip(groups, members)):
            gdescs[g].host = lo
            gdescs[g].nbytes = hi - lo
            gdescs[g].writable = int(any(not self.params[i].pointee_const for _, _, i, _ in mem))
            for start, _, i, _ in mem:
                descs[i].group = g
                descs[i].offset = start - lo
        res = _Result()
        atomics = ctypes.c_int(0)
        g3, b3 = (ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block)
        with _launch_lock:
            code = self.module._lib.fnemu_launch(self.index, g3, b3, len(args), descs,
                                                 len(groups), gdescs, int(check_races),
                                                 ctypes.byref(atomics), ctypes.byref(res))
        if code:
            self._fail(self._describe(res, grid, block, members))
        counts = (ctypes.c_longlong * 3)()
        self.module._lib.fnemu_last_counts(counts)
        nb = grid[0] * grid[1] * grid[2]
        # blocks, threads, barriers, warp syncs, atomics (the first run; emulator.Launch)
        self.last_counts = (nb, nb * block[0] * block[1] * block[2]) + tuple(counts)
        return bool(atomics.value)

    def _describe(self, res, grid, block, members):
        msg = res.msg.decode(errors="replace")
        if res.have_thread:
            msg += (f" [block ({res.block[0]},{res.block[1]},{res.block[2]}) of grid {grid}, "
                    f"thread ({res.thread[0]},{res.thread[1]},{res.thread[2]}) of block {block}]")
        if res.group >= 0:
            msg += ": " + _locate(self.params, members[res.group], res.offset)
        return msg


def _locate(params, members, offset):
    """Name the argument (and element) at byte ``offset`` from the start of a buffer group."""
    addr = members[0][0] + offset
    start, end, i, a = min(members, key=lambda s: 0 if s[0] <= addr < s[1] else
                           min(abs(addr - s[0]), abs(addr - s[1] + 1)))
    what = (f"element {(addr - start) // a.itemsize} of argument #{i} "
            f"({params[i].describe()}, {a.dtype}{list(a.shape)})")
    if addr >= end:
        return what + f", {addr - end} bytes past its end"
    if addr < start:
        return what + f", {start - addr} bytes before its start"
    return what
