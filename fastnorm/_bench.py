"""Benchmark harness shared by ``bench/`` and ``python -m fastnorm``.

Times callables (best-of-N after warm-up, CUDA-synchronised when asked), measures the machine's
copy-bandwidth ceiling, and renders result tables with ratios and GB/s or GFLOP/s.
"""
import datetime
import os
import platform
import time

import numpy as np


def cuda_device():
    """``(cupy, synchronize)`` when CuPy sees a GPU, else None (the CUDA tables are skipped)."""
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() == 0:
            return None
    except Exception:
        return None
    return cupy, cupy.cuda.Device().synchronize


def timeit(fn, *, repeat=11, min_time=0.1, sync=None):
    """Best (minimum) seconds per call of ``fn()`` over ``repeat`` samples, each looping until
    ``min_time``; ``sync`` (e.g. a CUDA synchronise) ends each sample. The minimum is the least
    disturbed by other load, and every implementation is timed the same way."""
    fn()
    if sync:
        sync()
    t0 = time.perf_counter()
    fn()
    if sync:
        sync()
    one = max(time.perf_counter() - t0, 1e-7)
    inner = max(1, int(min_time / one))
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        if sync:
            sync()
        samples.append((time.perf_counter() - t0) / inner)
    return float(min(samples))


def timeit_many(fns, *, rounds=4, repeat=3, min_time=0.1, sync=None):
    """Best seconds per call of each ``fns[name]()``, timed in interleaved rounds (each round
    times every function with ``timeit(repeat=repeat)``): on a shared machine, slow periods then
    hit every implementation alike instead of whichever happened to run during them."""
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            best[name] = min(best[name], timeit(fn, repeat=repeat, min_time=min_time, sync=sync))
    return best


def timeit_source():
    """Python source defining ``timeit`` (this module's) for a peer timed in another interpreter,
    e.g. torchvision in its own environment run as a subprocess: it loads this file by path and
    needs only NumPy there. Prepend it to the subprocess's script."""
    return ("import importlib.util as _iu\n"
            f"_spec = _iu.spec_from_file_location('fastnorm_bench', {os.path.abspath(__file__)!r})\n"
            "_bench = _iu.module_from_spec(_spec)\n"
            "_spec.loader.exec_module(_bench)\n"
            "timeit = _bench.timeit\n")


def copy_bandwidth(nbytes=256 << 20, xp=np, sync=None):
    """Measured copy bandwidth in GB/s, counting bytes read plus bytes written."""
    src = xp.ones(nbytes // 4, dtype=xp.float32)
    dst = xp.empty_like(src)
    t = timeit(lambda: xp.copyto(dst, src), repeat=5, sync=sync)
    return 2 * nbytes / t / 1e9


def onnx_op(op, feeds, attrs, opset, threads, out_type=np.float32):
    """A one-node ONNX Runtime model running ``op`` on ``feeds`` (input name -> array, in the
    op's input order) with ``attrs``, on ``threads`` intra-op threads.

    Returns ``run()``, which returns the op's output, or None when ONNX Runtime (or this op in
    it) is unavailable.
    """
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper
    except ImportError:
        return None
    types = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float64): TensorProto.DOUBLE,
             np.dtype(np.int64): TensorProto.INT64}
    try:
        node = helper.make_node(op, list(feeds), ["y"], **attrs)
        graph = helper.make_graph(
            [node], op, [helper.make_tensor_value_info(k, types[v.dtype], list(v.shape))
                         for k, v in feeds.items()],
            [helper.make_tensor_value_info("y", types[np.dtype(out_type)], None)])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        sess = ort.InferenceSession(model.SerializeToString(), so,
                                    providers=["CPUExecutionProvider"])
        sess.run(None, feeds)
    except Exception as e:  # an onnxruntime without this op
        import sys
        print(f"  (onnxruntime {op} unavailable: {type(e).__name__}: {e})", file=sys.stderr)
        return None
    return lambda: sess.run(None, feeds)[0]


def machine():
    """A one-line description of the machine and software."""
    import fastnorm
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, fastnorm {fastnorm.__version__} "
            f"({fastnorm.get_num_threads()} threads), numpy {np.__version__}, "
            f"python {platform.python_version()}")


def peer_versions():
    out = {}
    for mod in ("torch", "torchvision", "onnxruntime", "cv2", "cupy"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            pass
    return out


class Table:
    """Rows of (case, impl, seconds, work units); ratios are peer time / fastnorm time."""

    def __init__(self, title, unit="GB/s", ceiling=None):
        self.title, self.unit, self.ceiling = title, unit, ceiling
        self.rows = []

    def add(self, case, impl, seconds, work=None):
        """``work``: bytes (GB/s tables) or flops (GFLOP/s tables) moved/done by one call."""
        self.rows.append((case, impl, seconds, work))

    def markdown(self):
        head = f"| case | impl | time (ms) | speed-up of fastnorm | {self.unit} |"
        if self.ceiling:
            head += " % of ceiling |"
        lines = [f"### {self.title}", "", head,
                 "|" + "---|" * (head.count("|") - 1)]
        ours = {case: s for case, impl, s, _ in self.rows if impl == "fastnorm"}
        for case, impl, s, work in self.rows:
            ratio = f"{s / ours[case]:.2f}x" if case in ours and impl != "fastnorm" else ""
            rate = work / s / 1e9 if work else None
            line = f"| {case} | {impl} | {s * 1e3:.3f} | {ratio} | " + \
                (f"{rate:.1f}" if rate else "") + " |"
            if self.ceiling:
                line += (f" {100 * rate / self.ceiling:.0f}% |" if rate else " |")
            lines.append(line)
        if self.ceiling:
            lines.append("")
            lines.append(f"Ceiling: {self.ceiling:.1f} {self.unit} (measured).")
        return "\n".join(lines)


def bench_args(doc, argv=None):
    """The suites' command line: ``--help`` shows the script's docstring; ``--no-write`` prints
    the tables without writing bench/results/."""
    import argparse
    p = argparse.ArgumentParser(description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--no-write", action="store_true", help="do not write bench/results/")
    return p.parse_args(argv)


def write_results(name, tables, notes="", write=True):
    """Write ``bench/results/<date>-<name>.md`` (when run from a source tree and ``write``) and
    return the text."""
    text = [f"# {name}", "", f"Date: {datetime.date.today().isoformat()}", "",
            f"Machine: {machine()}", "",
            "Peers: " + ", ".join(f"{k} {v}" for k, v in peer_versions().items()), ""]
    if notes:
        text += [notes, ""]
    for t in tables:
        text += [t.markdown(), ""]
    text = "\n".join(text)
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench",
                        "results")
    if write and os.path.isdir(root):
        path = os.path.join(root, f"{datetime.date.today().isoformat()}-{name}.md")
        with open(path, "w") as f:
            f.write(text)
    return text
