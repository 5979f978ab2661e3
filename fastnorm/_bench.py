"""Benchmark harness shared by ``bench/`` and ``python -m fastnorm``.

Times callables (best-of-N after warm-up, CUDA-synchronised when asked), measures the machine's
copy-bandwidth ceiling, renders result tables with ratios and GB/s, GFLOP/s or Mbox/s, runs the
torchvision peer (in this process or in a second interpreter) and gives the suites one command
line. Nothing here writes a file except into a directory or path its caller names.
"""
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
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


def torchvision_cuda():
    """``(torch, torchvision, torch.cuda.synchronize)`` when torch sees a GPU and torchvision
    imports, else None (the CUDA tables' torchvision rows are left out, saying why)."""
    try:
        import torch
        import torchvision
        if not torch.cuda.is_available():
            raise RuntimeError("torch sees no GPU")
    except Exception as e:
        print("torchvision CUDA not timed:", type(e).__name__, e, file=sys.stderr)
        return None
    return torch, torchvision, torch.cuda.synchronize


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


def cuda_profile(fn, sync, repeat=20):
    """Where the time of one CUDA call ``fn()`` goes, as one line of text: its host time (the
    median over ``repeat`` calls, each timed without waiting for the device, then waited for
    so that the launch queue never fills) and its device time per fastnorm kernel (CUDA events,
    ``fastnorm._cuda.profile``); "other" is the rest of the call's device time: cuBLAS, CuPy's
    own operations and the gaps between launches. A call whose host time exceeds its device
    time is bound by the host."""
    from fastnorm import _cuda
    fn()
    sync()
    host = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        host.append(time.perf_counter() - t0)
        sync()
    with _cuda.profile() as p:
        fn()
    kernels = sorted(p.by_kernel().items(), key=lambda kv: -kv[1][1])
    parts = [f"{name} {ms * 1e3:.0f}" + (f" (x{n})" if n > 1 else "")
             for name, (n, ms) in kernels]
    other = max(p.total_ms - sum(ms for _, (_, ms) in kernels), 0.0)
    return (f"host {float(np.median(host)) * 1e6:.0f} us per call; device {p.total_ms * 1e3:.0f}"
            f" us: " + ", ".join(parts + [f"other {other * 1e3:.0f}"]))


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
    here = os.path.abspath(__file__)
    return ("import importlib.util as _iu\n"
            f"_spec = _iu.spec_from_file_location('fastnorm_bench', {here!r})\n"
            "_bench = _iu.module_from_spec(_spec)\n"
            "_spec.loader.exec_module(_bench)\n"
            "timeit = _bench.timeit\n")


TV_PYTHON_ENV = "FASTNORM_TV_PYTHON"
TV_HELP = ("Python interpreter of an environment with torchvision, for the torchvision CPU peer "
           f"(default: ${TV_PYTHON_ENV}; without either, torchvision is timed in this process "
           "when it imports here, else skipped). PyPI's torchvision does not import beside the "
           "CPU torch build: see the README, 'Benchmarks'.")


def run_torchvision(code, data_dir, threads, python=None, **kwargs):
    """Run the torchvision peer ``code`` and return its result, or None when torchvision is
    unavailable (the reason goes to stderr).

    ``code`` is Python source defining ``run(d, threads, **kwargs)``, which reads its inputs from
    the .npy files in directory ``d``, times torchvision with ``timeit`` (in scope) on ``threads``
    torch threads and returns a JSON-serialisable dict. Where it runs: in the interpreter
    ``python`` (``--torchvision-python``), else ``$FASTNORM_TV_PYTHON``, as a subprocess on the
    same files; with neither, in this process if torchvision imports here. No interpreter path
    is assumed. The dict gains ``"where"``, for the report: ``"in this process"`` or ``"in a
    second interpreter (--torchvision-python)"``.
    """
    python = python or os.environ.get(TV_PYTHON_ENV) or None
    if python is None:
        try:
            import torchvision  # noqa: F401
        except Exception as e:  # not installed, or built for another torch (RuntimeError)
            print(f"torchvision not timed: it does not import here ({type(e).__name__}: "
                  f"{str(e).strip()[:200]}); name an interpreter that has it with "
                  f"--torchvision-python PATH or ${TV_PYTHON_ENV} (README, 'Benchmarks')",
                  file=sys.stderr)
            return None
        ns = {"timeit": timeit, "__name__": "fastnorm_torchvision_peer"}
        exec(compile(code, "<torchvision peer>", "exec"), ns)
        out = ns["run"](data_dir, threads, **kwargs)
        out["where"] = "in this process"
        return out
    if shutil.which(python) is None:          # a path, or a command on PATH
        print(f"torchvision not timed: the interpreter {python!r} (--torchvision-python or "
              f"${TV_PYTHON_ENV}) does not exist", file=sys.stderr)
        return None
    source = (timeit_source() + code + "\nimport json as _json, sys as _sys\n"
              "print(_json.dumps(run(_sys.argv[1], int(_sys.argv[2]), "
              "**_json.loads(_sys.argv[3]))))\n")
    r = subprocess.run([python, "-c", source, data_dir, str(threads), json.dumps(kwargs)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        print(f"torchvision not timed: {python} failed:\n{r.stderr[-800:]}", file=sys.stderr)
        return None
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["where"] = "in a second interpreter (--torchvision-python)"
    return out


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
    info = fastnorm.info()
    gpu = info["cuda_device"] if info.get("cuda_backend") else None
    return (f"{cpu}, {os.cpu_count()} cores, " + (f"GPU {gpu}, " if gpu else "")
            + f"fastnorm {fastnorm.__version__} ({fastnorm.get_num_threads()} threads), "
            f"numpy {np.__version__}, python {platform.python_version()}")


def peer_versions():
    out = {}
    for mod in ("torch", "torchvision", "onnxruntime", "cv2", "cupy"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            pass
    return out


# what one unit of each rate column counts: work / seconds / scale
UNITS = {"GB/s": 1e9, "GFLOP/s": 1e9, "Mbox/s": 1e6}


class Table:
    """Rows of (case, impl, seconds, work); ratios are peer time / fastnorm time.

    ``unit`` names the rate column: ``"GB/s"`` (work in bytes), ``"GFLOP/s"`` (flops) or
    ``"Mbox/s"`` (boxes); ``ceiling`` is the measured limit in that unit, if any. ``notes``:
    lines printed under the table (e.g. :func:`cuda_profile`'s breakdowns).
    """

    def __init__(self, title, unit="GB/s", ceiling=None):
        if unit not in UNITS:
            raise ValueError(f"`unit` must be one of {sorted(UNITS)}, got {unit!r}")
        self.title, self.unit, self.ceiling = title, unit, ceiling
        self.rows, self.notes = [], []

    def add(self, case, impl, seconds, work=None):
        """``work``: what one call moves or does, in the unit's base quantity (bytes, flops or
        boxes); None leaves the rate cell empty."""
        self.rows.append((case, impl, float(seconds), work))

    def rate(self, seconds, work):
        """Work per second in ``unit``, or None."""
        return work / seconds / UNITS[self.unit] if work else None

    def speedups(self):
        """``(case, peer, peer time / fastnorm time)`` for every peer row of a case that has a
        fastnorm row."""
        ours = {case: s for case, impl, s, _ in self.rows if impl == "fastnorm"}
        return [(case, impl, s / ours[case]) for case, impl, s, _ in self.rows
                if impl != "fastnorm" and case in ours]

    def to_dict(self):
        return {"title": self.title, "unit": self.unit, "ceiling": self.ceiling,
                "rows": [list(r) for r in self.rows], "notes": list(self.notes)}

    @classmethod
    def from_dict(cls, d):
        t = cls(d["title"], d["unit"], d["ceiling"])
        for row in d["rows"]:
            t.add(*row)
        t.notes = list(d.get("notes", []))
        return t

    def markdown(self):
        head = f"| case | impl | time (ms) | speed-up of fastnorm | {self.unit} |"
        if self.ceiling:
            head += " % of ceiling |"
        lines = [f"### {self.title}", "", head,
                 "|" + "---|" * (head.count("|") - 1)]
        ours = {case: s for case, impl, s, _ in self.rows if impl == "fastnorm"}
        for case, impl, s, work in self.rows:
            ratio = f"{s / ours[case]:.2f}x" if case in ours and impl != "fastnorm" else ""
            rate = self.rate(s, work)
            # two significant digits below 0.1 (a slow peer's Mbox/s), not a row of 0.0
            cell = "" if not rate else f"{rate:.1f}" if rate >= 0.1 else f"{rate:.2g}"
            line = f"| {case} | {impl} | {s * 1e3:.3f} | {ratio} | {cell} |"
            if self.ceiling:
                line += (f" {100 * rate / self.ceiling:.0f}% |" if rate else " |")
            lines.append(line)
        if self.ceiling:
            lines.append("")
            lines.append(f"Ceiling: {self.ceiling:.1f} {self.unit} (measured).")
        if self.notes:
            lines.append("")
            lines += [f"- {n}" for n in self.notes]
        return "\n".join(lines)


WRITE_RULE = """\
Result files: run as `python bench/bench_<op>.py`, a suite writes its tables to
results/<date>-<name>.md beside the script (bench/results/ in a source checkout); --no-write
only prints them, --out DIR writes them to DIR instead. `python -m fastnorm bench` writes
nothing unless given --out DIR. --json PATH also writes the tables as JSON (what
`python -m fastnorm bench` reads)."""


def bench_args(doc, script, argv=None, *, quick=False, torchvision=False, extra=None):
    """The suites' command line. ``--help`` shows the script's docstring and the rule for result
    files; ``script`` is the suite's ``__file__`` (its results/ folder is the default output);
    ``extra(parser)`` adds a suite's own options.

    Returns the parsed arguments, with ``results_dir``: where to write the result file (None:
    nowhere).
    """
    import argparse
    p = argparse.ArgumentParser(description=doc, epilog=WRITE_RULE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, metavar="N",
                   help="threads for fastnorm and for every CPU peer (torch, torchvision, ONNX "
                        "Runtime, OpenCV) (default: 2)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--no-write", action="store_true", help="print the tables only")
    where.add_argument("--out", metavar="DIR",
                       help="write the result file to DIR instead of results/ beside the script")
    p.add_argument("--json", metavar="PATH", help="also write the tables as JSON to PATH")
    p.add_argument("--cuda-only", action="store_true",
                   help="only the CUDA tables, against torch/torchvision CUDA (a GPU session: "
                        "needs CuPy and a GPU)")
    if quick:
        p.add_argument("--quick", action="store_true", help="one shape only")
    if torchvision:
        p.add_argument("--torchvision-python", metavar="PATH", help=TV_HELP)
    if extra is not None:
        extra(p)
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    args.results_dir = None if args.no_write else \
        (args.out or os.path.join(os.path.dirname(os.path.abspath(script)), "results"))
    return args


def report(name, tables, notes=""):
    """The text of a result file: ``name``, date, machine, peer versions, ``notes``, tables."""
    text = [f"# {name}", "", f"Date: {datetime.date.today().isoformat()}", "",
            f"Machine: {machine()}", "",
            "Peers: " + ", ".join(f"{k} {v}" for k, v in peer_versions().items()), ""]
    if notes:
        text += [notes, ""]
    for t in tables:
        text += [t.markdown(), ""]
    return "\n".join(text)


def write_results(name, tables, notes="", out=None, json_path=None):
    """Return the report of ``tables``; write it to ``<out>/<date>-<name>.md`` when ``out`` is
    given, and the tables as JSON to ``json_path`` when given. Writes nothing else."""
    text = report(name, tables, notes)
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, f"{datetime.date.today().isoformat()}-{name}.md"), "w") as f:
            f.write(text)
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"name": name, "machine": machine(), "notes": notes,
                       "tables": [t.to_dict() for t in tables]}, f)
    return text


def finish(args, name, tables, notes=""):
    """A suite's end: print the report, write it where ``args`` say (``bench_args``) and return
    ``tables``."""
    print(write_results(name, tables, notes, args.results_dir, args.json))
    return tables


def read_json(path):
    """The tables that ``write_results(..., json_path=path)`` wrote."""
    with open(path) as f:
        return [Table.from_dict(t) for t in json.load(f)["tables"]]
