"""Compiled Cython/OpenMP kernels (built from ``src/*.pyx`` by setup.py).

Each module ``fastnorm._cpu.<op>`` exposes plain functions that take C-contiguous NumPy arrays of
the dtype they were built for and a trailing ``nthreads`` argument, and return NumPy arrays.
They release the GIL and trust their inputs: validation happens in the public op modules.
"""
