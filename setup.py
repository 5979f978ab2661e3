"""Build the Cython/OpenMP CPU kernels: every ``src/<op>.pyx`` becomes ``fastnorm._cpu.<op>``.

Environment switches:

* ``FASTNORM_NO_OPENMP=1``   build serial kernels even when the compiler has OpenMP.
* ``FASTNORM_BUILD_ONLY=a,b`` build only these modules (development convenience).
* ``FASTNORM_BUILD_JOBS=n``    parallel Cython/C compile jobs (default: all cores).
* ``FASTNORM_PORTABLE=1``     compute the x86-64 baseline's arithmetic instead of targeting the
                              build machine (``-march=native``): set this when the build will run
                              on other machines (wheels, container images built elsewhere); it
                              gives the same bits on every x86-64 CPU.
* ``FASTNORM_SANITIZE=1``     AddressSanitizer + UBSan build (``-O1 -g``) for ``.ci/sanitize``;
  the result only loads with libasan preloaded (``LD_PRELOAD=$(gcc -print-file-name=libasan.so)``).
"""
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from glob import glob

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _compiles(flags, src="int main(void){return 0;}\n"):
    """True when the C compiler builds ``src`` with ``flags``."""
    cc = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()
    if not shutil.which(cc[0]):
        return False
    with tempfile.TemporaryDirectory() as tmp:
        c = os.path.join(tmp, "t.c")
        with open(c, "w") as f:
            f.write(src)
        r = subprocess.run(cc + flags + [c, "-o", os.path.join(tmp, "t")], capture_output=True)
        return r.returncode == 0


SERIAL_REQUESTED = bool(os.environ.get("FASTNORM_NO_OPENMP"))
OPENMP = not SERIAL_REQUESTED and _compiles(
    ["-fopenmp"], "#include <omp.h>\nint main(void){return omp_get_max_threads() > 0 ? 0 : 1;}\n")
if not OPENMP and not SERIAL_REQUESTED:
    print("fastnorm: WARNING: the C compiler has no OpenMP support; building SERIAL kernels. "
          "Install a compiler with OpenMP (gcc, or clang + libomp) for multi-threaded kernels.",
          file=sys.stderr)

compile_args = ["-O3", "-fno-math-errno", "-Wno-unused-function", "-Wno-unreachable-code"]
link_args = []
if OPENMP:
    compile_args.append("-fopenmp")
    link_args.append("-fopenmp")
# One SIMD policy for every kernel: what each computes, bit for bit, is fixed here, at build
# time. Source builds target the building machine's instruction set (AVX2/AVX-512 and FMA where
# present). FASTNORM_PORTABLE builds compute the x86-64 baseline's arithmetic (named, not left to
# the compiler's default, which some distributions raise; no FMA contraction anywhere), so that
# they give the same bits on every x86-64 CPU; kernels that run it in wider registers where the
# CPU has them (the DCN GEMM: deform_conv_gemm.h) keep those bits.
if os.environ.get("FASTNORM_PORTABLE"):
    compile_args += ["-ffp-contract=off", "-DFASTNORM_PORTABLE=1"]
    if _compiles(["-march=x86-64"]):
        compile_args.append("-march=x86-64")
elif _compiles(["-march=native"]):
    compile_args.append("-march=native")
if os.environ.get("FASTNORM_SANITIZE"):
    san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-O1", "-g"]
    compile_args = [a for a in compile_args if a != "-O3"] + san
    link_args += san

only = {s.strip() for s in os.environ.get("FASTNORM_BUILD_ONLY", "").split(",") if s.strip()}
extensions = []
for path in sorted(glob(os.path.join("src", "*.pyx"))):
    name = os.path.splitext(os.path.basename(path))[0]
    if only and name not in only and name != "_omp":
        continue
    extensions.append(Extension(
        f"fastnorm._cpu.{name}", [path],
        include_dirs=[np.get_include(), os.path.join(HERE, "src")],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_2_0_API_VERSION"),
                       # what this build chose, for fastnorm._omp (tests/test_dispatch.py): 1
                       # OpenMP, 0 serial as FASTNORM_NO_OPENMP asked, -1 serial for want of
                       # compiler support
                       ("FASTNORM_BUILD_OPENMP", "1" if OPENMP else "0" if SERIAL_REQUESTED
                        else "-1")],
        extra_compile_args=compile_args,
        extra_link_args=link_args,
    ))

jobs = int(os.environ.get("FASTNORM_BUILD_JOBS", "0")) or os.cpu_count() or 1
setup(
    ext_modules=cythonize(
        extensions,
        include_path=["src"],
        compiler_directives={"language_level": 3},
        nthreads=jobs,
    ),
    options={"build_ext": {"parallel": jobs}},    # compile the extensions concurrently
)
