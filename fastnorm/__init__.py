"""fastnorm: fast, framework-agnostic kernels for detection and segmentation models.

Functions take NumPy arrays (CPU: Cython + OpenMP), CuPy arrays (CUDA: RawKernels) or any
DLPack tensor (torch, JAX, ...) and return the same kind of array.
"""
__version__ = "0.1.0"

from ._threads import get_num_threads, set_num_threads, threads
from ._memory import cached_bytes, empty_cache, set_cache_limit
from .group_norm import group_norm, group_norm_backward
from .roi_ops import (roi_align, roi_align_backward, roi_pool, roi_pool_backward, ps_roi_align,
                      ps_roi_align_backward, deform_roi_pool, deform_roi_pool_backward,
                      roi_align_rotated, roi_align_rotated_backward, multi_scale_roi_align,
                      multi_scale_roi_align_backward)
from .deform_conv import deform_conv2d, deform_conv2d_backward
from .nms import (nms, batched_nms, soft_nms, diou_nms, weighted_nms, matrix_nms, box_iou,
                  iou_guided_nms, softer_nms, adaptive_nms, combined_nms, box_iou_rotated,
                  nms_rotated, batched_nms_rotated)

__all__ = [
    "__version__", "info", "get_num_threads", "set_num_threads", "threads",
    "empty_cache", "set_cache_limit", "cached_bytes",
    "group_norm", "group_norm_backward",
    "roi_align", "roi_align_backward", "roi_pool", "roi_pool_backward", "ps_roi_align",
    "ps_roi_align_backward", "deform_roi_pool", "deform_roi_pool_backward",
    "roi_align_rotated", "roi_align_rotated_backward",
    "multi_scale_roi_align", "multi_scale_roi_align_backward",
    "deform_conv2d", "deform_conv2d_backward",
    "nms", "batched_nms", "soft_nms", "diou_nms", "weighted_nms", "matrix_nms", "box_iou",
    "iou_guided_nms", "softer_nms", "adaptive_nms", "combined_nms",
    "box_iou_rotated", "nms_rotated", "batched_nms_rotated",
]


def info():
    """Version, available backends, OpenMP threads, and the CUDA device/CuPy version if any.

    Returns a dict; importing CuPy happens only here (and on the first CuPy input).
    """
    import importlib.util
    import numpy as np
    from ._threads import openmp_available
    d = {"version": __version__, "numpy": np.__version__, "openmp": openmp_available(),
         "num_threads": get_num_threads()}
    try:
        from ._cpu import _omp  # noqa: F401
        d["cpu_backend"] = True
    except ImportError:
        d["cpu_backend"] = False
    d["cupy"] = None
    d["cuda_device"] = None
    if importlib.util.find_spec("cupy") is not None:
        try:
            import cupy
            d["cupy"] = cupy.__version__
            if cupy.cuda.runtime.getDeviceCount() > 0:
                dev = cupy.cuda.Device()
                props = cupy.cuda.runtime.getDeviceProperties(dev.id)
                name = props["name"]
                d["cuda_device"] = f"{dev.id}: {name.decode() if isinstance(name, bytes) else name}"
        except Exception as e:  # CuPy present but no usable GPU/driver
            d["cuda_device"] = f"unavailable ({type(e).__name__}: {e})"
    d["cuda_backend"] = bool(d["cuda_device"]) and not str(d["cuda_device"]).startswith("unavail")
    return d
