"""Compiled Cython/OpenMP kernels (built from ``src/*.pyx`` by setup.py).

Each module ``fastnorm._cpu.<op>`` exposes the entry points of ``fastnorm._kernels``: plain
functions that take the contract's fields as keyword arguments (C-contiguous NumPy arrays of the
dtype they were built for) and ``nthreads``, and return NumPy arrays. They release the GIL and
trust their inputs: validation happens in the public op modules.

The op modules import them statically (``from ._cpu import group_norm as cpu``); when the
extensions were not built, that import still succeeds and the first use raises a
``RuntimeError`` saying how to build them.
"""
import importlib

OPS = ("group_norm", "deform_conv", "roi_ops", "nms")


class _Missing:
    """Stands in for a kernel module that is not built."""

    def __init__(self, name, error):
        self._name, self._error = name, error

    def __getattr__(self, attr):
        raise RuntimeError(
            f"fastnorm: the CPU kernels are not built (fastnorm._cpu.{self._name} is missing: "
            f"{self._error}): install fastnorm from source with a C compiler, e.g. "
            f"`pip install .`")


def __getattr__(name):
    if name not in OPS:
        raise AttributeError(name)
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ImportError as e:
        return _Missing(name, e)
