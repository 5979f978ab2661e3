"""RoIAlign benchmark: the FPN level-P2 workload of a two-stage detector.

x (2, 256, 200, 272) float32, 1000 RoIs (random boxes of 16..256 px on a 1088 x 800 image),
output 7x7, sampling_ratio 2, aligned=True, spatial_scale 1/4; forward and backward, 2 threads
for every implementation.

Peers
-----
* ONNX Runtime ``RoiAlign`` (opset 16, ``coordinate_transformation_mode="half_pixel"`` = aligned,
  mode avg), forward only, ``intra_op_num_threads=2``.
* torchvision CPU ``roi_align`` forward and backward (autograd). torchvision is not installed in
  fastnorm's environment, so it runs in a subprocess with the interpreter in ``$FASTNORM_TV_PYTHON``
  (default ``/work/venv-tv/bin/python``), ``torch.set_num_threads(2)``, on the very same inputs saved
  to .npy files, timed with the same method (median of 7 repeats of an inner loop of >= 0.05 s after
  a warm-up call); the script checks that its output matches fastnorm's before timing counts.
* On a GPU (CuPy present): fastnorm CUDA, and torchvision CUDA when importable in this process.

The "GB/s" column counts the bytes of the output (forward) or of grad_out + grad_x (backward).
"""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fastnorm  # noqa: E402
from fastnorm._bench import (Table, bench_args, cuda_device, onnx_op, timeit,  # noqa: E402
                             timeit_source, write_results)

THREADS = 2
PH = PW = 7
SCALE, SR, ALIGNED = 0.25, 2, True
TV_PYTHON = os.environ.get("FASTNORM_TV_PYTHON", "/work/venv-tv/bin/python")


def workload(seed=0, K=1000):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 256, 200, 272), dtype=np.float32)
    cx, cy = rng.uniform(0, 1088, K), rng.uniform(0, 800, K)
    w = np.exp(rng.uniform(np.log(16), np.log(256), K))
    h = w * np.exp(rng.uniform(-0.7, 0.7, K))
    rois = np.stack([rng.integers(0, 2, K), cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2],
                    1).astype(np.float32)
    return x, rois


TV_SCRIPT = r"""
import json, sys
import numpy as np, torch, torchvision
torch.set_num_threads(%(threads)d)
d = sys.argv[1]
x = torch.from_numpy(np.load(d + "/x.npy")); rois = torch.from_numpy(np.load(d + "/rois.npy"))
ref = np.load(d + "/y.npy")

f = lambda: torchvision.ops.roi_align(x, rois, %(ph)d, %(scale)r, %(sr)d, %(aligned)r)
err = float(np.abs(f().numpy() - ref).max())
xg = x.clone().requires_grad_(True)
y = torchvision.ops.roi_align(xg, rois, %(ph)d, %(scale)r, %(sr)d, %(aligned)r)
g = torch.from_numpy(np.load(d + "/g.npy"))
def bwd():
    torch.autograd.grad(y, xg, g, retain_graph=True)
print(json.dumps({"fwd": timeit(f), "bwd": timeit(bwd), "err": err,
                  "version": torchvision.__version__}))
"""


def torchvision_cpu(x, rois, y, g):
    """Times of torchvision CPU forward/backward in a subprocess, or None if unavailable."""
    if not os.path.exists(TV_PYTHON):
        return None
    with tempfile.TemporaryDirectory() as d:
        np.save(f"{d}/x.npy", x)
        np.save(f"{d}/rois.npy", rois)
        np.save(f"{d}/y.npy", y)
        np.save(f"{d}/g.npy", g)
        code = timeit_source() + TV_SCRIPT % dict(threads=THREADS, ph=PH, scale=SCALE, sr=SR, aligned=ALIGNED)
        r = subprocess.run([TV_PYTHON, "-c", code, d], capture_output=True, text=True)
    if r.returncode != 0:
        print("torchvision subprocess failed:", r.stderr[-500:], file=sys.stderr)
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


def onnxruntime_fwd(x, rois):
    """ONNX Runtime RoiAlign (opset 16) on the same inputs: run() or None."""
    return onnx_op("RoiAlign", {"X": x, "rois": np.ascontiguousarray(rois[:, 1:]),
                                "idx": rois[:, 0].astype(np.int64)},
                   dict(mode="avg", output_height=PH, output_width=PW, sampling_ratio=SR,
                        spatial_scale=SCALE,
                        coordinate_transformation_mode="half_pixel" if ALIGNED
                        else "output_half_pixel"), 16, THREADS)


def main(argv=None):
    args = bench_args(__doc__, argv)
    x, rois = workload()
    K, C = rois.shape[0], x.shape[1]
    rng = np.random.default_rng(1)
    g = rng.standard_normal((K, C, PH, PW), dtype=np.float32)
    out_bytes = K * C * PH * PW * 4
    fwd = Table("roi_align forward, FPN P2 (2, 256, 200, 272) float32, 1000 RoIs, 7x7, sr 2, "
                f"aligned, {THREADS} threads", unit="GB/s")
    bwd = Table("roi_align backward (grad_x), same workload", unit="GB/s")
    with fastnorm.threads(THREADS):
        y = fastnorm.roi_align(x, rois, PH, SCALE, SR, ALIGNED)
        t_f = timeit(lambda: fastnorm.roi_align(x, rois, PH, SCALE, SR, ALIGNED))
        t_b = timeit(lambda: fastnorm.roi_align_backward(g, rois, x.shape, PH, SCALE, SR,
                                                         ALIGNED))
        xl = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
        t_fl = timeit(lambda: fastnorm.roi_align(xl, rois, PH, SCALE, SR, ALIGNED,
                                                 channels_last=True))
        gl = np.ascontiguousarray(g.transpose(0, 2, 3, 1))
        t_bl = timeit(lambda: fastnorm.roi_align_backward(gl, rois, xl.shape, PH, SCALE, SR,
                                                          ALIGNED, channels_last=True))
    with fastnorm.threads(1):
        t_f1 = timeit(lambda: fastnorm.roi_align(x, rois, PH, SCALE, SR, ALIGNED))
        t_b1 = timeit(lambda: fastnorm.roi_align_backward(g, rois, x.shape, PH, SCALE, SR,
                                                          ALIGNED))
    fwd.add("P2", "fastnorm", t_f, out_bytes)
    fwd.add("P2", "fastnorm, 1 thread (scaling check)", t_f1, out_bytes)
    fwd.add("P2", "fastnorm channels_last", t_fl, out_bytes)
    bwd.add("P2", "fastnorm", t_b, out_bytes + x.nbytes)
    bwd.add("P2", "fastnorm, 1 thread (scaling check)", t_b1, out_bytes + x.nbytes)
    bwd.add("P2", "fastnorm channels_last", t_bl, out_bytes + x.nbytes)
    results = {}
    run_ort = onnxruntime_fwd(x, rois)
    if run_ort is not None:
        err = float(np.abs(run_ort() - y).max())
        results["ort"] = timeit(run_ort)
        fwd.add("P2", f"onnxruntime RoiAlign (max diff {err:.1e})", results["ort"], out_bytes)
    tv = torchvision_cpu(x, rois, y, g)
    if tv is not None:
        results["tv_fwd"], results["tv_bwd"] = tv["fwd"], tv["bwd"]
        fwd.add("P2", f"torchvision {tv['version']} CPU (max diff {tv['err']:.1e})", tv["fwd"],
                out_bytes)
        bwd.add("P2", f"torchvision {tv['version']} CPU (autograd)", tv["bwd"],
                out_bytes + x.nbytes)
    tables = [fwd, bwd]
    cuda = cuda_tables(x, rois, g)
    tables += cuda
    checks = []
    if "tv_fwd" in results:
        checks.append(("forward >= 4x torchvision CPU", results["tv_fwd"] / t_f, 4.0))
        checks.append(("backward >= 4x torchvision CPU", results["tv_bwd"] / t_b, 4.0))
    if "ort" in results:
        checks.append(("forward >= 2x ONNX Runtime", results["ort"] / t_f, 2.0))
    lines = [f"{'PASS' if r >= want else 'MISS'}: {name} (got {r:.2f}x)"
             for name, r, want in checks]
    notes = ("Targets (float32, 2 threads):\n\n" + "\n".join(f"- {s}" for s in lines) +
             "\n\ntorchvision timed in a subprocess on the same .npy inputs (see the script "
             "docstring). Load average during the run: "
             + ", ".join(f"{v:.2f}" for v in os.getloadavg()) +
             " (on a shared 2-core machine the 2-thread rows only scale when the load is low).")
    text = write_results("roi_ops", tables, notes, write=not args.no_write)
    print(text)


def cuda_tables(x, rois, g):
    dev = cuda_device()
    if dev is None:
        return []
    cupy, sync = dev
    xd, rd, gd = cupy.asarray(x), cupy.asarray(rois), cupy.asarray(g)
    t = Table("roi_align on CUDA, same workload", unit="GB/s")
    ob = g.nbytes
    t.add("forward", "fastnorm", timeit(lambda: fastnorm.roi_align(xd, rd, PH, SCALE, SR,
                                                                   ALIGNED), sync=sync), ob)
    t.add("backward", "fastnorm", timeit(lambda: fastnorm.roi_align_backward(
        gd, rd, x.shape, PH, SCALE, SR, ALIGNED), sync=sync), ob + x.nbytes)
    t.add("backward det.", "fastnorm", timeit(lambda: fastnorm.roi_align_backward(
        gd, rd, x.shape, PH, SCALE, SR, ALIGNED, deterministic=True), sync=sync), ob + x.nbytes)
    try:
        import torch
        import torchvision
        xt, rt, gt = (torch.as_tensor(a, device="cuda") for a in (x, rois, g))
        ts = torch.cuda.synchronize
        t.add("forward", "torchvision CUDA", timeit(lambda: torchvision.ops.roi_align(
            xt, rt, PH, SCALE, SR, ALIGNED), sync=ts), ob)
        xg = xt.clone().requires_grad_(True)
        yt = torchvision.ops.roi_align(xg, rt, PH, SCALE, SR, ALIGNED)
        t.add("backward", "torchvision CUDA", timeit(lambda: torch.autograd.grad(
            yt, xg, gt, retain_graph=True), sync=ts), ob + x.nbytes)
    except Exception as e:  # torchvision CUDA not available
        print("torchvision CUDA not timed:", type(e).__name__, e, file=sys.stderr)
    return [t]


if __name__ == "__main__":
    main()
