"""Build the Cython/OpenMP CPU kernels: every ``src/<op>.pyx`` becomes ``fastnorm._cpu.<op>``.

Environment switches:

* ``FASTNORM_NO_OPENMP=1``   build serial kernels even when the compiler has OpenMP.
* ``FASTNORM_BUILD_ONLY=a,b`` build only these modules (development convenience).
* ``FASTNORM_NATIVE=1``       add ``-march=native`` (do not use for wheels you ship elsewhere).
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


def _compiler_has_openmp():
    if os.environ.get("FASTNORM_NO_OPENMP"):
        return False
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    cc = cc.split()
    src = "#include <omp.h>\nint main(void){return omp_get_max_threads() > 0 ? 0 : 1;}\n"
    with tempfile.TemporaryDirectory() as tmp:
        c = os.path.join(tmp, "t.c")
        with open(c, "w") as f:
            f.write(src)
        if not shutil.which(cc[0]):
            return False
        r = subprocess.run(cc + ["-fopenmp", c, "-o", os.path.join(tmp, "t")],
                           capture_output=True)
        return r.returncode == 0


OPENMP = _compiler_has_openmp()
if not OPENMP:
    print("fastnorm: WARNING: the C compiler has no OpenMP support; building SERIAL kernels. "
          "Install a compiler with OpenMP (gcc, or clang + libomp) for multi-threaded kernels.",
          file=sys.stderr)

compile_args = ["-O3", "-fno-math-errno", "-Wno-unused-function", "-Wno-unreachable-code"]
link_args = []
if OPENMP:
    compile_args.append("-fopenmp")
    link_args.append("-fopenmp")
if os.environ.get("FASTNORM_NATIVE"):
    compile_args.append("-march=native")

only = {s.strip() for s in os.environ.get("FASTNORM_BUILD_ONLY", "").split(",") if s.strip()}
extensions = []
for path in sorted(glob(os.path.join("src", "*.pyx"))):
    name = os.path.splitext(os.path.basename(path))[0]
    if only and name not in only and name != "_omp":
        continue
    extensions.append(Extension(
        f"fastnorm._cpu.{name}", [path],
        include_dirs=[np.get_include(), os.path.join(HERE, "src")],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_2_0_API_VERSION")],
        extra_compile_args=compile_args,
        extra_link_args=link_args,
    ))

setup(
    ext_modules=cythonize(
        extensions,
        include_path=["src"],
        compiler_directives={"language_level": 3},
        nthreads=int(os.environ.get("FASTNORM_CYTHON_JOBS", "0")) or None,
    ),
)
