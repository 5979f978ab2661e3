"""``python -m fastnorm``: environment report, a detection-head demo pipeline and a quick benchmark.

    python -m fastnorm                      report + demo pipeline + compact benchmark (~20 s)
    python -m fastnorm bench [--op OP ...] [--device cpu|cuda] [--threads N] [--out DIR]
                             [--torchvision-python PATH] [--plot out.png]
                                            the full suites of bench/bench_<op>.py

The demo runs on synthetic CPU data: feature map -> GroupNorm + SiLU -> DCNv2 (offsets and mask
from a 3x3 conv, itself computed by deform_conv2d with zero offsets) -> RoIAlign on proposals ->
scoring (a linear classifier) -> class-aware batched NMS, and prints each stage's time.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import fastnorm
from fastnorm._bench import TV_HELP, TV_PYTHON_ENV, Table, machine, onnx_op, read_json, timeit_many

OPS = ("group_norm", "nms", "roi_ops", "deform_conv")


def report():
    print(f"fastnorm {fastnorm.__version__}")
    for k, v in fastnorm.info().items():
        print(f"  {k:14s} {v}")
    print(f"  machine        {machine()}")


# ---------------------------------------------------------------- demo pipeline

def _sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


def _proposals(rng, n, size):
    cx, cy = rng.uniform(0, size, (2, n))
    w = np.exp(rng.uniform(np.log(16), np.log(192), n))
    h = w * np.exp(rng.uniform(-0.5, 0.5, n))
    return np.clip(np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1), 0,
                   size).astype(np.float32)


def demo(N=2, C=64, S=64, stride=8, per_image=500, classes=10):
    """A detection head on a synthetic (N, C, S, S) float32 feature map of a stride-8 level."""
    rng = np.random.default_rng(0)
    f32 = np.float32
    x = rng.standard_normal((N, C, S, S), dtype=f32)
    gn_w, gn_b = np.ones(C, f32), np.zeros(C, f32)
    w_off = (0.01 * rng.standard_normal((27, C, 3, 3))).astype(f32)   # offset/mask predictor
    w_dcn = (rng.standard_normal((C, C, 3, 3)) / np.sqrt(9 * C)).astype(f32)
    w_cls = (rng.standard_normal((C, classes + 1)) / np.sqrt(C)).astype(f32)
    props = [_proposals(rng, per_image, S * stride) for _ in range(N)]
    stages = []

    def stage(name, fn):
        t0 = time.perf_counter()
        out = fn()
        stages.append((name, time.perf_counter() - t0, out))
        return out

    h = stage("GroupNorm(32) + SiLU", lambda: fastnorm.group_norm(x, 32, gn_w, gn_b,
                                                                  activation="silu"))
    zero = np.zeros((N, 18, S, S), f32)
    om = stage("offset/mask conv 3x3 (deform_conv2d, zero offsets)",
               lambda: fastnorm.deform_conv2d(h, zero, w_off, padding=1))
    offset, mask = np.ascontiguousarray(om[:, :18]), _sigmoid(om[:, 18:])
    feat = stage("DCNv2 3x3 (deform_conv2d with mask)",
                 lambda: fastnorm.deform_conv2d(h, offset, w_dcn, mask=mask, padding=1))
    pooled = stage(f"RoIAlign 7x7 on {N} x {per_image} proposals",
                   lambda: fastnorm.roi_align(feat, props, 7, 1 / stride, 2, True))

    def score():
        logits = pooled.mean(axis=(2, 3)) @ w_cls
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        labels = p[:, 1:].argmax(1)
        return p[np.arange(len(p)), labels + 1].astype(f32), labels
    scores, labels = stage("scoring (linear classifier + softmax)", score)
    boxes = np.concatenate(props)
    batch = np.repeat(np.arange(N), per_image)
    keep = stage("batched NMS (IoU 0.5, per image and class)",
                 lambda: fastnorm.batched_nms(boxes, scores, labels, 0.5, batch_idx=batch,
                                              max_output=100))
    print(f"\ndemo: detection head on a synthetic feature map ({N}, {C}, {S}, {S}) float32, "
          f"{fastnorm.get_num_threads()} threads")
    for name, t, out in stages:
        shape = "x".join(map(str, out.shape)) if hasattr(out, "shape") else \
            "x".join(map(str, out[0].shape))
        print(f"  {name:55s} {1e3 * t:8.2f} ms   -> {shape}")
    print(f"  {'total':55s} {1e3 * sum(t for _, t, _ in stages):8.2f} ms")
    per = np.bincount(batch[keep], minlength=N)
    print("  detections kept per image: " + ", ".join(map(str, per)))


# ---------------------------------------------------------------- quick benchmark

def _ort(op, feeds, attrs, opset, out_type=np.float32):
    return onnx_op(op, feeds, attrs, opset, fastnorm.get_num_threads(), out_type)


def quick_bench():
    """fastnorm vs the peers installed in this environment, one modest case per op."""
    threads = fastnorm.get_num_threads()
    rng = np.random.default_rng(1)
    f32 = np.float32
    try:
        import torch
        torch.set_num_threads(threads)
    except ImportError:
        torch = None
    try:
        import cv2
        cv2.setNumThreads(threads)
    except ImportError:
        cv2 = None
    table = Table(f"quick benchmark, float32, CPU, {threads} threads (speed-up = peer time / "
                  f"fastnorm time)", "GB/s")
    rows = {}                            # case -> [(impl, fn, work)], timed by flush()

    def add(case, impl, fn, work):
        if fn is not None:
            rows.setdefault(case, []).append((impl, fn, work))

    def flush():                         # interleaved rounds: a slow spell hits every impl alike
        for case, impls in rows.items():
            best = timeit_many({impl: fn for impl, fn, _ in impls}, rounds=2, repeat=3,
                               min_time=0.05)
            for impl, _, work in impls:
                table.add(case, impl, best[impl], work)
        rows.clear()

    # GroupNorm
    x = rng.standard_normal((8, 256, 32, 32), dtype=f32)
    w, b = np.ones(256, f32), np.zeros(256, f32)
    case, nb = "group_norm 8x256x32x32 G32", 2 * x.nbytes
    add(case, "fastnorm", lambda: fastnorm.group_norm(x, 32, w, b), nb)
    if torch is not None:
        xt, wt, bt = map(torch.from_numpy, (x, w, b))
        add(case, "torch", lambda: torch.nn.functional.group_norm(xt, 32, wt, bt), nb)
    add(case, "onnxruntime", _ort("GroupNormalization", {"x": x, "s": w, "b": b},
                                  dict(num_groups=32, epsilon=1e-5), 21), nb)
    flush()
    # RoIAlign
    feat = rng.standard_normal((2, 256, 100, 136), dtype=f32)
    props = [_proposals(rng, 500, 800) for _ in range(2)]
    rois = np.concatenate([np.concatenate([np.full((500, 1), i, f32), p], 1)
                           for i, p in enumerate(props)])
    case, nb = "roi_align 1000 RoIs 7x7 on 2x256x100x136", None
    add(case, "fastnorm", lambda: fastnorm.roi_align(feat, rois, 7, 0.125, 2, True), nb)
    add(case, "onnxruntime", _ort("RoiAlign", {"X": feat, "rois": np.ascontiguousarray(rois[:, 1:]),
                                               "idx": rois[:, 0].astype(np.int64)},
                                  dict(output_height=7, output_width=7, sampling_ratio=2,
                                       spatial_scale=0.125,
                                       coordinate_transformation_mode="half_pixel"), 16), nb)
    flush()
    # DCN v1
    xd = rng.standard_normal((2, 64, 48, 48), dtype=f32)
    wd = (rng.standard_normal((64, 64, 3, 3)) / 24).astype(f32)
    off = rng.normal(0, 2, (2, 18, 48, 48)).astype(f32)
    case, nb = "deform_conv2d 2x64x48x48, 64 out, 3x3", None
    add(case, "fastnorm", lambda: fastnorm.deform_conv2d(xd, off, wd, padding=1), nb)
    add(case, "onnxruntime", _ort("DeformConv", {"X": xd, "W": wd, "offset": off},
                                  dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1]), 19), nb)
    if torch is not None:
        xt, wt = torch.from_numpy(xd), torch.from_numpy(wd)
        add(case, "torch conv2d (no offsets, yardstick)",
            lambda: torch.nn.functional.conv2d(xt, wt, padding=1), nb)
    flush()
    # NMS
    n = 10_000
    centres = rng.uniform(0, 1000, (n // 16, 2)).repeat(16, 0) + rng.normal(0, 4, (n, 2))
    wh = rng.uniform(20, 60, (n // 16, 2)).repeat(16, 0)
    boxes = np.concatenate([centres - wh / 2, centres + wh / 2], 1).astype(f32)
    scores = rng.random(n, dtype=f32)
    case, nb = f"nms {n} clustered boxes, IoU 0.5", None
    add(case, "fastnorm", lambda: fastnorm.nms(boxes, scores, 0.5), nb)
    add(case, "onnxruntime", _ort("NonMaxSuppression",
                                  {"boxes": boxes[None], "scores": scores[None, None],
                                   "max": np.array([n], np.int64),
                                   "iou": np.array([0.5], f32)}, {}, 11, np.int64), nb)
    if cv2 is not None:
        xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1).astype(np.float64)
        add(case, "opencv NMSBoxes", lambda: cv2.dnn.NMSBoxes(xywh, scores, 0.0, 0.5), nb)
    flush()
    print()
    print(table.markdown())
    print("\nGB/s: bytes read + written by one group_norm call (the other ops are not "
          "bandwidth-bound; see the full suites for GFLOP/s and boxes/s).")
    print("Load average: " + ", ".join(f"{v:.2f}" for v in os.getloadavg()) +
          " (other processes on the cores slow every row, the peers' too).")
    print("Full suites with all peers: python -m fastnorm bench [--op OP] [--plot out.png]")


# ---------------------------------------------------------------- bench subcommand

def _bench_dir():
    return Path(fastnorm.__file__).resolve().parent.parent / "bench"


class _Progress:
    """tqdm when installed, else one text line per step."""

    def __init__(self, total):
        self.total, self.done, self.t0 = total, 0, time.perf_counter()
        try:
            from tqdm import tqdm
            self.bar = tqdm(total=total, unit="suite", file=sys.stderr, dynamic_ncols=True)
        except ImportError:
            self.bar = None

    def start(self, name):
        if self.bar is not None:
            self.bar.set_description(name)
        else:
            print(f"[{self.done}/{self.total}] {name} ...", file=sys.stderr, flush=True)

    def tick(self, line):
        if self.bar is not None and line.strip():
            self.bar.set_postfix_str(line.strip()[:40], refresh=True)

    def write(self, text):
        (self.bar.write if self.bar is not None else print)(text)

    def step(self, name, seconds):
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        else:
            print(f"[{self.done}/{self.total}] {name} done in {seconds:.0f} s", file=sys.stderr)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def plot_speedups(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib, which is not installed: pip install matplotlib",
              file=sys.stderr)
        return False
    labels = [f"{op}: {case} vs {peer}"[:90] for op, case, peer, _ in rows]
    values = [r[3] for r in rows]
    fig, ax = plt.subplots(figsize=(11, 0.32 * len(rows) + 1.5))
    ax.barh(range(len(rows)), values, color=["tab:green" if v >= 1 else "tab:red"
                                             for v in values])
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xlabel("speed-up of fastnorm (peer time / fastnorm time, log scale)")
    ax.set_title(f"fastnorm {fastnorm.__version__} vs peers")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"chart written to {path}")
    return True


def bench(ops, device, plot=None, threads=None, out=None, torchvision_python=None):
    """Run the suites ``bench/bench_<op>.py`` one by one, printing their output as it comes; the
    speed-ups are read from the JSON each suite writes (``--json``), not from its printed text.
    Result files are written only to ``out``."""
    root = _bench_dir()
    if not root.is_dir():
        print(f"The benchmark suites are not here ({root} is missing): they live in the source "
              f"tree. Clone the fastnorm repository, `pip install -e .` in it, and run "
              f"`python -m fastnorm bench` (or `python bench/bench_<op>.py`) there.",
              file=sys.stderr)
        return 2
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root.parent), env.get("PYTHONPATH"))
                                        if p)
    if torchvision_python:                        # a path stays valid in the suites' cwd
        env[TV_PYTHON_ENV] = os.path.abspath(torchvision_python) \
            if os.sep in torchvision_python else torchvision_python
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""          # the suites then skip their CUDA tables
    elif not fastnorm.info()["cuda_backend"]:
        print("--device cuda needs CuPy and a CUDA GPU; none is usable here "
              f"(cupy: {fastnorm.info()['cupy']}).", file=sys.stderr)
        return 2
    options = ["--out", os.path.abspath(out)] if out else ["--no-write"]
    if threads is not None:
        options += ["--threads", str(threads)]
    progress = _Progress(len(ops))
    results, failed = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for op in ops:
            script = root / f"bench_{op}.py"
            channel = os.path.join(tmp, f"{op}.json")
            progress.start(op)
            t0 = time.perf_counter()
            proc = subprocess.Popen([sys.executable, str(script), "--json", channel] + options,
                                    cwd=root.parent, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
            lines = []
            for line in proc.stdout:
                lines.append(line)
                progress.tick(line)
            rc = proc.wait()
            ok = rc == 0 and os.path.exists(channel)
            status = "ok" if ok else f"exit {rc}" if rc else "exit 0 but no results written"
            progress.write(f"\n===== bench_{op}.py ({status}) =====\n" + "".join(lines))
            if ok:
                results.append((op, read_json(channel)))
            else:
                failed.append(op)
            progress.step(op, time.perf_counter() - t0)
    progress.close()
    rows = [(op, case, peer, r) for op, tables in results for t in tables
            for case, peer, r in t.speedups()]
    if rows:
        print("\nspeed-ups of fastnorm (peer time / fastnorm time):")
        for op, case, peer, r in rows:
            print(f"  {r:7.2f}x  {op:12s} {case}  vs {peer}")
    if out:
        print(f"\nResult tables were written to {os.path.abspath(out)}.")
    else:
        print("\nNo result files were written (--out DIR writes them).")
    if plot:
        if not rows:
            print("no speed-ups to plot", file=sys.stderr)
        else:
            plot_speedups(rows, plot)
    if failed:
        print("failed: " + ", ".join(failed), file=sys.stderr)
        return 1
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m fastnorm", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command")
    b = sub.add_parser("bench", help="run the full benchmark suites (bench/bench_<op>.py)")
    b.add_argument("--op", action="append", choices=OPS,
                   help="suite to run (repeatable; default: all)")
    b.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu: hide GPUs from the suites; cuda: require a GPU and add the "
                        "suites' CUDA tables")
    b.add_argument("--threads", type=int, metavar="N",
                   help="threads for fastnorm and for every CPU peer (default: the suites', 2)")
    b.add_argument("--out", metavar="DIR",
                   help="write the suites' result files (<date>-<name>.md) to DIR; without it "
                        "nothing is written")
    b.add_argument("--torchvision-python", metavar="PATH", help=TV_HELP)
    b.add_argument("--plot", metavar="PNG", help="write a bar chart of the speed-ups "
                                                 "(needs matplotlib)")
    args = p.parse_args(argv)
    if args.command == "bench":
        if args.threads is not None and args.threads < 1:
            p.error(f"--threads must be >= 1, got {args.threads}")
        return bench(tuple(dict.fromkeys(args.op or OPS)), args.device, args.plot, args.threads,
                     args.out, args.torchvision_python)
    report()
    demo()
    quick_bench()
    return 0


if __name__ == "__main__":
    sys.exit(main())
