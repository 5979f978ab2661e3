"""The NVRTC gate: every fastnorm/_cuda/*.cu compiles exactly as CuPy's RawModule compiles it at
run time -- NVRTC, CuPy's own compiler options and include path, the launcher's source text and
every name expression it can request -- for sm_80 and sm_90, without a GPU.

It needs CuPy >= 14 and an NVRTC from PyPI (``.ci/run`` installs ``cupy-cuda13x`` and
``cuda-toolkit[nvrtc,cudart]``); it skips without them unless ``FASTNORM_REQUIRE_NVRTC=1``.
Each kernel's resources are read off the cubin (static shared memory must fit the 48 KiB a block
gets without opting in; registers must allow the largest block the launchers use);
``FASTNORM_NVRTC_REPORT=<file>`` writes them as a Markdown table.
"""
import importlib
import io
import os
import struct

import pytest

import fastnorm._cuda as fcuda

OPS = ("group_norm", "roi_ops", "deform_conv", "nms")
ARCHS = ("80", "90")
MAX_STATIC_SHARED = 48 << 10
MAX_BLOCK = 256                 # the largest block any launcher uses
REGISTERS_PER_SM_BLOCK = 65536


def _nvrtc():
    try:
        from cupy._core import core
        from cupy.cuda import compiler, nvrtc
        version = nvrtc.getVersion()
    except Exception as e:      # no CuPy, or no NVRTC library
        if os.environ.get("FASTNORM_REQUIRE_NVRTC") == "1":
            raise RuntimeError(f"FASTNORM_REQUIRE_NVRTC=1 but NVRTC is unavailable: {e}") from e
        pytest.skip(f"the NVRTC gate needs CuPy >= 14 and NVRTC ({type(e).__name__}: {e})")
    return core, compiler, version


def cupy_options(arch):
    """The options CuPy's RawModule hands NVRTC for fastnorm's modules on a device of compute
    capability ``arch`` (cupy._core.core.compile_with_cache, cupy.cuda.compiler.
    _compile_with_cache_cuda and _compile_using_nvrtc_no_warning, CuPy 14)."""
    core, compiler, version = _nvrtc()
    options = core.assemble_cupy_compiler_options(fcuda.OPTIONS) + ("-ftz=true",)
    options += (f"-arch=sm_{arch}", "--device-as-default-execution-space")
    if (version[0] >= 13 or version >= (12, 8)) and compiler._use_pch:
        options += ("--pch",)
    return options


def compile_module(op, arch):
    """(cubin, {name expression: lowered name}, log) of ``op``.cu, all its instantiations."""
    _, compiler, _ = _nvrtc()
    exprs = list(importlib.import_module(f"fastnorm._cuda.{op}").NAME_EXPRESSIONS)
    prog = compiler._NVRTCProgram(fcuda.source(op), "", name_expressions=exprs, method="cubin")
    log = io.StringIO()
    try:
        cubin, mapping = prog.compile(cupy_options(arch), log)
    except compiler.CompileException as e:
        pytest.fail(f"NVRTC rejects fastnorm/_cuda/{op}.cu for sm_{arch}:\n{e}")
    return cubin, mapping, log.getvalue()


def kernel_resources(cubin):
    """{mangled kernel name: (registers, static shared bytes, stack frame bytes)} of a cubin."""
    shoff, = struct.unpack_from("<Q", cubin, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", cubin, 0x3A)
    hdrs = [struct.unpack_from("<IIQQQQIIQQ", cubin, shoff + i * shentsize) for i in range(shnum)]

    def cstr(off):
        return cubin[off:cubin.index(b"\0", off)].decode()
    secs = {cstr(hdrs[shstrndx][4] + h[0]): h for h in hdrs}
    symtab = secs[".symtab"]
    strtab = hdrs[symtab[6]][4]
    syms = [cstr(strtab + struct.unpack_from("<I", cubin, symtab[4] + 24 * i)[0])
            for i in range(symtab[5] // 24)]
    kernels = {n[len(".text."):]: [0, 0, 0] for n in secs if n.startswith(".text.")}
    for name, h in secs.items():
        if name.startswith(".nv.shared.") and name[len(".nv.shared."):] in kernels:
            kernels[name[len(".nv.shared."):]][1] = h[5]
    info = secs[".nv.info"]
    data, i = cubin[info[4]:info[4] + info[5]], 0
    while i < len(data):                 # EIATTR records: format, attribute, value
        fmt, attr = data[i], data[i + 1]
        if fmt == 4:                     # sized value
            size, = struct.unpack_from("<H", data, i + 2)
            if attr in (0x2F, 0x11) and size >= 8:      # REGCOUNT, FRAME_SIZE: (symbol, value)
                sym, value = struct.unpack_from("<II", data, i + 4)
                if syms[sym] in kernels:
                    kernels[syms[sym]][0 if attr == 0x2F else 2] = value
            i += 4 + size
        else:
            i += 4 if fmt == 3 else 2
    return {k: tuple(v) for k, v in kernels.items()}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("op", OPS)
def test_every_kernel_compiles_with_nvrtc(op, arch):
    cubin, mapping, log = compile_module(op, arch)
    exprs = importlib.import_module(f"fastnorm._cuda.{op}").NAME_EXPRESSIONS
    assert set(mapping) == set(exprs) and all(mapping.values())
    res = kernel_resources(cubin)
    for expr in exprs:
        regs, shared, frame = res[mapping[expr]]
        assert 0 < regs <= 255, (expr, regs)
        assert shared <= MAX_STATIC_SHARED, f"{expr}: {shared} bytes of static shared memory"
        assert regs * MAX_BLOCK <= REGISTERS_PER_SM_BLOCK, f"{expr}: {regs} registers"
    assert "warning" not in log.lower(), log
    report = os.environ.get("FASTNORM_NVRTC_REPORT")
    if report:
        _, _, version = _nvrtc()
        new = not os.path.exists(report)
        with open(report, "a") as f:
            if new:
                f.write(f"# CUDA kernel resources (NVRTC {version[0]}.{version[1]}, CuPy's "
                        f"options)\n\n| kernel | arch | registers | static shared (B) | "
                        f"stack frame (B) |\n|---|---|---|---|---|\n")
            for expr in exprs:
                regs, shared, frame = res[mapping[expr]]
                f.write(f"| `{expr}` | sm_{arch} | {regs} | {shared} | {frame} |\n")


def test_cuda_sources_hash_their_headers(tmp_path, monkeypatch):
    # CuPy keys its kernel cache on the source text alone: an edit of common.cuh must change it
    import shutil
    for f in os.listdir(fcuda.HERE):
        if f.endswith((".cu", ".cuh")):
            shutil.copy(os.path.join(fcuda.HERE, f), tmp_path / f)
    monkeypatch.setattr(fcuda, "HERE", str(tmp_path))
    fcuda.source.cache_clear()
    try:
        before = fcuda.source("nms")
        with open(tmp_path / "common.cuh", "a") as f:
            f.write("\n// edited\n")
        fcuda.source.cache_clear()
        assert fcuda.source("nms") != before
    finally:
        fcuda.source.cache_clear()
