"""Compile every fastnorm/_cuda/*.cu with nvcc, instantiating exactly the kernels CuPy will ask for.

Each launcher fastnorm/_cuda/<op>.py lists its kernels in NAME_EXPRESSIONS (e.g. "gn_stats<float>");
a stub that includes <op>.cu and takes the address of each forces nvcc to compile them all.
"""
import ast
import glob
import os
import subprocess
import sys
import tempfile

root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fastnorm", "_cuda")
sys.path.insert(0, os.path.join(root, "..", ".."))
failed = 0
for cu in sorted(glob.glob(os.path.join(root, "*.cu"))):
    op = os.path.splitext(os.path.basename(cu))[0]
    exprs = []
    try:
        import importlib
        mod = importlib.import_module(f"fastnorm._cuda.{op}")
        exprs = list(getattr(mod, "NAME_EXPRESSIONS", []))
    except Exception as e:   # a launcher that cannot import is itself an error
        print(f"nvcc_check: cannot import launcher fastnorm._cuda.{op}: {e}")
        failed += 1
    with tempfile.TemporaryDirectory() as tmp:
        stub = os.path.join(tmp, f"{op}_check.cu")
        with open(stub, "w") as f:
            f.write(f'#include "{os.path.abspath(cu)}"\n')
            if exprs:
                f.write("void* fastnorm_instantiations[] = {\n")
                f.write(",\n".join(f"  (void*)&{e}" for e in exprs))
                f.write("\n};\n")
        cmd = ["nvcc", "-std=c++17", "-arch=sm_90", "-I", root, "-c", stub,
               "-o", os.path.join(tmp, "x.o")]
        r = subprocess.run(cmd, capture_output=True, text=True)
        status = "ok" if r.returncode == 0 else "FAILED"
        print(f"nvcc {op}.cu ({len(exprs)} kernels instantiated): {status}")
        if r.returncode:
            print(r.stdout + r.stderr)
            failed += 1
sys.exit(1 if failed else 0)
