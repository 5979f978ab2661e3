"""Benchmark: fastnorm nms / batched_nms vs torchvision, ONNX Runtime NonMaxSuppression and
OpenCV cv2.dnn.NMSBoxes, float32, clustered random boxes, --threads threads for every
implementation (default 2).

    python bench/bench_nms.py [--threads N] [--torchvision-python PATH] [--no-write | --out DIR]

Run it in the environment that has fastnorm built (plus onnxruntime, onnx and
opencv-python-headless for those peers). torchvision is timed in this process when it imports
here; otherwise in the interpreter named by --torchvision-python or $FASTNORM_TV_PYTHON (a second
environment, see the README's "Benchmarks"), as a subprocess on the very same inputs saved as
.npy files. Every peer's output is checked against fastnorm's (same kept indices) before it is
timed. The Mbox/s column counts input boxes per second / 1e6.
"""
import os
import sys
import tempfile

import numpy as np

import fastnorm
from fastnorm._bench import (Table, bench_args, cuda_device, finish, onnx_op, run_torchvision,
                             timeit)

IOU = 0.5
SIZES = (1000, 10_000, 50_000, 100_000)
TARGETS = {("nms", 10_000): {"torchvision": 10, "onnxruntime": 3},
           ("nms", 50_000): {"torchvision": 10, "onnxruntime": 3},
           ("batched", 20_000): {"torchvision": 2}}


def clustered_boxes(n, seed=0, per_cluster=16):
    """Detector-like output: clusters of ~16 jittered boxes (16..120 px) around random objects in
    an image whose side grows as sqrt(n) (constant density); uniform scores."""
    rng = np.random.default_rng(seed)
    k = max(1, n // per_cluster)
    side = 32.0 * np.sqrt(n)
    centres = rng.uniform(0, side, (k, 2))
    sizes = rng.uniform(16, 96, (k, 2))
    c = rng.integers(0, k, n)
    ctr = centres[c] + rng.normal(0, 0.1, (n, 2)) * sizes[c]
    wh = sizes[c] * rng.uniform(0.8, 1.25, (n, 2))
    boxes = np.concatenate([ctr - wh / 2, ctr + wh / 2], 1).astype(np.float32)
    return boxes, rng.random(n).astype(np.float32)


def _timer(n):
    return dict(repeat=3, min_time=0.0) if n >= 50_000 else dict(repeat=7, min_time=0.05)


# the torchvision peer (fastnorm._bench.run_torchvision): in this process or in a second one
_TV_SCRIPT = r"""
def run(d, threads, cases, iou):
    import numpy as np, torch, torchvision
    torch.set_num_threads(threads)
    out = {}
    for case, timer in cases.items():
        b = torch.from_numpy(np.load(f"{d}/{case}_b.npy"))
        s = torch.from_numpy(np.load(f"{d}/{case}_s.npy"))
        if case.startswith("batched"):
            i = torch.from_numpy(np.load(f"{d}/{case}_i.npy"))
            fn = lambda: torchvision.ops.batched_nms(b, s, i, iou)
        else:
            fn = lambda: torchvision.ops.nms(b, s, iou)
        np.save(f"{d}/{case}_tvkeep.npy", fn().numpy())
        out[case] = timeit(fn, **timer)
    return {"versions": [torch.__version__, torchvision.__version__], "times": out}
"""


def main(argv=None):
    args = bench_args(__doc__, __file__, argv, torchvision=True)
    threads = args.threads
    fastnorm.set_num_threads(threads)
    try:
        import cv2
        cv2.setNumThreads(threads)
    except ImportError:
        cv2 = None
    table = Table(f"nms / batched_nms, float32, IoU {IOU}, {threads} threads, clustered boxes",
                  unit="Mbox/s")
    inputs = {}
    for n in SIZES:
        inputs[f"nms_{n}"] = clustered_boxes(n)
    b, s = clustered_boxes(20_000, seed=1)
    inputs["batched_20000"] = (b, s, np.random.default_rng(2).integers(0, 80, 20_000))
    with tempfile.TemporaryDirectory() as tmp:
        for case, arrs in inputs.items():
            for suffix, a in zip("bsi", arrs):
                np.save(os.path.join(tmp, f"{case}_{suffix}.npy"), a)
        tv = run_torchvision(_TV_SCRIPT, tmp, threads, args.torchvision_python,
                             cases={case: _timer(len(arrs[0])) for case, arrs in inputs.items()},
                             iou=IOU)
        tv_keep = {case: np.load(os.path.join(tmp, f"{case}_tvkeep.npy")) for case in inputs} \
            if tv is not None else {}
    ratios = {}
    for case, arrs in inputs.items():
        n = work = len(arrs[0])             # boxes: the Mbox/s column
        if case.startswith("batched"):
            b, s, i = arrs
            ours = fastnorm.batched_nms(b, s, i, IOU)
            t_ours = timeit(lambda: fastnorm.batched_nms(b, s, i, IOU), **_timer(n))
        else:
            b, s = arrs
            ours = fastnorm.nms(b, s, IOU)
            t_ours = timeit(lambda: fastnorm.nms(b, s, IOU), **_timer(n))
        label = f"{case} ({len(ours)} kept)"
        table.add(label, "fastnorm", t_ours, work)
        peers = {}
        if tv is not None:
            # torchvision's final merge sort in batched_nms is not stable: compare as sets
            assert np.array_equal(np.sort(tv_keep[case]), np.sort(ours)), case
            peers["torchvision"] = tv["times"][case]
        if not case.startswith("batched"):
            run = onnx_op("NonMaxSuppression",
                          {"boxes": b[None], "scores": s[None, None],
                           "max": np.array([n], np.int64), "iou": np.array([IOU], np.float32)},
                          {}, 13, threads, np.int64)
            if run is not None:
                sel = run()[:, 2]
                assert np.array_equal(np.sort(sel), np.sort(ours)), case
                peers["onnxruntime"] = timeit(run, **_timer(n))
        if cv2 is not None:
            xywh = np.concatenate([b[:, :2], b[:, 2:] - b[:, :2]], 1).astype(np.float64)
            if case.startswith("batched"):
                fn = lambda: cv2.dnn.NMSBoxesBatched(xywh, s, i.astype(np.int32), 0.0, IOU)
            else:
                fn = lambda: cv2.dnn.NMSBoxes(xywh, s, 0.0, IOU)
            peers["opencv"] = timeit(fn, **_timer(n))
        for name, t in peers.items():
            table.add(label, name, t, work)
            ratios[(case.split("_")[0], n, name)] = t / t_ours
    lines = []
    for (kind, n), want in TARGETS.items():
        for peer, x in want.items():
            got = ratios.get((kind, n, peer))
            status = "n/a" if got is None else ("PASS" if got >= x else "MISS")
            lines.append(f"- {kind} {n}: >= {x}x {peer}: {status}"
                         + ("" if got is None else f" ({got:.1f}x)"))
    notes = ("Speed-up = peer time / fastnorm time (same inputs, identical kept index sets checked "
             "for torchvision and ONNX Runtime). OpenCV NMSBoxes is timed on xywh float64 input "
             "prepared outside the timing (its IoU convention differs slightly; not checked). "
             "torchvision " + (" ".join(tv["versions"]) + f" timed {tv['where']}"
                               if tv else "unavailable") +
             ". 'Mbox/s' = input boxes per second / 1e6.\n\nTargets:\n" + "\n".join(lines))
    tables = [table] + cuda_tables(inputs)
    return finish(args, "nms", tables, notes)


CUDA_TARGETS = ("nms_1000", "nms_10000", "nms_100000", "batched_20000")


def cuda_tables(inputs):
    """fastnorm on CuPy arrays vs torchvision CUDA, same inputs, same kept sets (needs a GPU)."""
    dev = cuda_device()
    if dev is None:
        return []
    cupy, sync = dev
    t = Table(f"nms / batched_nms on CUDA, float32, IoU {IOU}", unit="Mbox/s")
    try:
        import torch
        import torchvision
        assert torch.cuda.is_available(), "torch sees no GPU"
        ts = torch.cuda.synchronize
    except Exception as e:
        print("torchvision CUDA not timed:", type(e).__name__, e, file=sys.stderr)
        torchvision = None
    for case in CUDA_TARGETS:
        arrs = inputs[case]
        n = len(arrs[0])
        dev = [cupy.asarray(a) for a in arrs]
        fn = (lambda: fastnorm.batched_nms(*dev, IOU)) if len(dev) == 3 else \
            (lambda: fastnorm.nms(*dev, IOU))
        ours = cupy.asnumpy(fn())
        t.add(f"{case} ({len(ours)} kept)", "fastnorm", timeit(fn, sync=sync, **_timer(n)), n)
        if torchvision is not None:
            tt = [torch.as_tensor(a, device="cuda") for a in arrs]
            tfn = (lambda: torchvision.ops.batched_nms(*tt, IOU)) if len(tt) == 3 else \
                (lambda: torchvision.ops.nms(*tt, IOU))
            assert np.array_equal(np.sort(tfn().cpu().numpy()), np.sort(ours)), case
            t.add(f"{case} ({len(ours)} kept)", "torchvision CUDA",
                  timeit(tfn, sync=ts, **_timer(n)), n)
    return [t]


if __name__ == "__main__":
    main()
