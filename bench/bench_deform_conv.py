"""Deformable convolution (DCN v1/v2) benchmark, float32, --threads threads for every
implementation (default 2).

    python bench/bench_deform_conv.py [--threads N] [--torchvision-python PATH]
                                      [--no-write | --out DIR]

Workloads: x (2, 64, 64, 64) with weight (64, 64, 3, 3), padding 1 (a DCN layer of a detector
neck) and a ResNet stage x (8, 256, 28, 28) with weight (256, 256, 3, 3), padding 1; offsets
N(0, 2^2), mask U(0, 1) for v2; forward and forward+backward.

Peers
-----
* ONNX Runtime ``DeformConv`` (opset 19), forward only, ``intra_op_num_threads`` = --threads.
* torchvision CPU ``deform_conv2d`` forward and forward+backward (autograd, all five gradients),
  ``torch.set_num_threads`` = --threads, on the same inputs saved to .npy files, timed the same
  way, with its max deviation from fastnorm's output. It runs in this process when torchvision
  imports here, else in the interpreter named by --torchvision-python or ``$FASTNORM_TV_PYTHON``
  (a second environment: PyPI's torchvision does not import beside the CPU torch build, see the
  README's "Benchmarks").
* torch ``conv2d`` of the same shape (no offsets): the physical yardstick.
* On a GPU (CuPy present): fastnorm CUDA.

fastnorm's forward is fused (sampling + its own GEMM micro-kernel) and its backward's GEMMs use
the same micro-kernel, all on fastnorm's OpenMP threads (no BLAS). The GFLOP/s column counts the
convolution's multiply-adds (2 * N * C_out * Ho * Wo * C_in * kh * kw per forward; 3x that for
forward+backward).
"""
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fastnorm  # noqa: E402
from fastnorm._bench import (Table, bench_args, cuda_device, cuda_profile, finish,  # noqa: E402
                             onnx_op, run_torchvision, timeit, timeit_many, torchvision_cuda)

CASES = [("2x64x64x64", (2, 64, 64, 64)), ("8x256x28x28", (8, 256, 28, 28))]


def workload(shape, seed=0):
    N, C, H, W = shape
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape, dtype=np.float32)
    w = (rng.standard_normal((C, C, 3, 3)) / np.sqrt(9 * C)).astype(np.float32)
    b = rng.standard_normal(C).astype(np.float32)
    off = (2 * rng.standard_normal((N, 18, H, W))).astype(np.float32)
    mask = rng.random((N, 9, H, W), dtype=np.float32)
    gy = rng.standard_normal((N, C, H, W), dtype=np.float32)
    return x, w, b, off, mask, gy


# the torchvision peer (fastnorm._bench.run_torchvision): in this process or in a second one
TV_SCRIPT = r"""
def run(d, threads):
    import numpy as np, torch, torchvision
    torch.set_num_threads(threads)
    L = lambda n: torch.from_numpy(np.load(d + "/" + n + ".npy"))
    x, w, b, off, mask, gy = (L(n) for n in ("x", "w", "b", "off", "mask", "gy"))
    out = {"version": torchvision.__version__}
    for v, m in (("v1", None), ("v2", mask)):
        f = lambda: torchvision.ops.deform_conv2d(x, off, w, b, padding=1, mask=m)
        out[v + "_err"] = float(np.abs(f().numpy() - np.load(d + "/y_" + v + ".npy")).max())
        out[v + "_fwd"] = timeit(f)
        leaves = [t.clone().requires_grad_(True) for t in (x, off, w, b)] + \
            ([m.clone().requires_grad_(True)] if m is not None else [])

        def fb():
            y = torchvision.ops.deform_conv2d(*leaves[:4], padding=1,
                                              mask=leaves[4] if m is not None else None)
            torch.autograd.grad(y, leaves, gy)
        out[v + "_fwdbwd"] = timeit(fb)
    return out
"""


def torchvision_cpu(x, w, b, off, mask, gy, y1, y2, threads, python=None):
    """torchvision CPU timings (``fastnorm._bench.run_torchvision``), or None when it is
    unavailable."""
    with tempfile.TemporaryDirectory() as d:
        for n, a in dict(x=x, w=w, b=b, off=off, mask=mask, gy=gy, y_v1=y1, y_v2=y2).items():
            np.save(f"{d}/{n}.npy", a)
        return run_torchvision(TV_SCRIPT, d, threads, python)


def onnxruntime_session(x, w, b, off, mask, threads):
    """ONNX Runtime DeformConv (opset 19) runs for v1 and v2, or None if unavailable."""
    out = {}
    for v, m in (("v1", None), ("v2", mask)):
        feeds = dict(X=x, W=w, offset=off, B=b, **({"mask": m} if m is not None else {}))
        run = onnx_op("DeformConv", feeds,
                      dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1],
                           dilations=[1, 1], group=1, offset_group=1), 19, threads)
        if run is None:
            return None
        out[v] = run
    return out


def main(argv=None):
    args = bench_args(__doc__, __file__, argv, torchvision=True)
    threads = args.threads
    if args.cuda_only:
        gpu = cuda_tables()
        return finish(args, "deform_conv-cuda", [gpu] if gpu is not None else [])
    import torch
    torch.set_num_threads(threads)
    fastnorm.set_num_threads(threads)
    fwd = Table(f"deform_conv2d forward, float32, CPU, {threads} threads", unit="GFLOP/s")
    fb = Table(f"deform_conv2d forward + backward, float32, CPU, {threads} threads",
               unit="GFLOP/s")
    checks, tv_where = [], None
    for name, shape in CASES:
        x, w, b, off, mask, gy = workload(shape)
        N, C, H, W = shape
        flops = 2.0 * N * C * H * W * C * 9
        y = {"v1": fastnorm.deform_conv2d(x, off, w, b, padding=1),
             "v2": fastnorm.deform_conv2d(x, off, w, b, padding=1, mask=mask)}
        tv = torchvision_cpu(x, w, b, off, mask, gy, y["v1"], y["v2"], threads,
                             args.torchvision_python)
        t_fb = {}
        for v, m in (("v1", None), ("v2", mask)):
            def fwd_bwd():
                fastnorm.deform_conv2d(x, off, w, b, padding=1, mask=m)
                fastnorm.deform_conv2d_backward(gy, x, off, w, padding=1, mask=m)
            t_fb[v] = timeit(fwd_bwd, repeat=5)
        # fastnorm's forwards and the conv2d yardstick in interleaved rounds (fastnorm._bench);
        # ONNX Runtime after them, since its thread pool spins between runs
        tx, tw, tb = torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b)
        t_f = timeit_many({
            "v1": lambda: fastnorm.deform_conv2d(x, off, w, b, padding=1),
            "v2": lambda: fastnorm.deform_conv2d(x, off, w, b, padding=1, mask=mask),
            "conv2d": lambda: torch.nn.functional.conv2d(tx, tw, tb, padding=1)})
        t_conv = t_f["conv2d"]
        ort_s = onnxruntime_session(x, w, b, off, mask, threads)
        for v in ("v1", "v2"):
            case = f"{name} {v}"
            fwd.add(case, "fastnorm", t_f[v], flops)
            fb.add(case, "fastnorm", t_fb[v], 3 * flops)
            checks.append((f"{case} fwd within 1.5x of torch conv2d", t_f[v] <= 1.5 * t_conv))
            if ort_s is not None:
                err = float(np.abs(ort_s[v]() - y[v]).max())
                t_o = timeit(ort_s[v])
                fwd.add(case, f"onnxruntime DeformConv (max diff {err:.1e})", t_o, flops)
                checks.append((f"{case} fwd >= 1.2x onnxruntime", t_o >= 1.2 * t_f[v]))
            if tv is not None:
                tv_where = f"{tv['version']}, CPU, {threads} threads, timed {tv['where']}"
                fwd.add(case, f"torchvision CPU (max diff {tv[v + '_err']:.1e})", tv[v + "_fwd"],
                        flops)
                fb.add(case, "torchvision CPU", tv[v + "_fwdbwd"], 3 * flops)
                checks.append((f"{case} fwd >= 8x torchvision", tv[v + "_fwd"] >= 8 * t_f[v]))
                checks.append((f"{case} fwd+bwd >= 5x torchvision",
                               tv[v + "_fwdbwd"] >= 5 * t_fb[v]))
            fwd.add(case, "torch conv2d (no offsets, yardstick)", t_conv, flops)
        del ort_s                      # join the session's thread pool before the next case
    tables = [fwd, fb]
    notes = [f"torchvision: {tv_where or 'unavailable'}"]
    gpu = cuda_tables()
    if gpu is not None:
        tables.append(gpu)
    notes.append("Targets: " + "; ".join(f"{c}: {'PASS' if ok else 'MISS'}" for c, ok in checks))
    finish(args, "deform_conv", tables, "\n\n".join(notes))
    for c, ok in checks:
        print(("PASS " if ok else "MISS ") + c)
    return tables


def cuda_tables():
    """fastnorm on CuPy arrays against torchvision's CUDA deform_conv2d (its autograd for the
    backward: grads of x, offset, weight, mask and bias), same inputs, with the peer's max
    deviation from our output."""
    dev = cuda_device()
    if dev is None:
        return None
    cupy, sync = dev
    peer = torchvision_cuda()
    if peer is not None:
        torch, torchvision, ts = peer
    t = Table("deform_conv2d on CUDA, float32 (backward: every gradient)", unit="GFLOP/s")
    for name, shape in CASES:
        host = workload(shape)
        x, w, b, off, mask, gy = (cupy.asarray(a) for a in host)
        N, C, H, W = shape
        flops = 2.0 * N * C * H * W * C * 9
        for v, m in (("v1", None), ("v2", mask)):
            y = cupy.asnumpy(fastnorm.deform_conv2d(x, off, w, b, padding=1, mask=m))
            for what, fn, work in (
                    ("fwd", lambda: fastnorm.deform_conv2d(x, off, w, b, padding=1, mask=m),
                     flops),
                    ("bwd", lambda: fastnorm.deform_conv2d_backward(gy, x, off, w, padding=1,
                                                                    mask=m), 2 * flops)):
                t.add(f"{name} {v} {what}", "fastnorm", timeit(fn, sync=sync), work)
                t.notes.append(f"{name} {v} {what}: " + cuda_profile(fn, sync))
            if peer is None:
                continue
            xt, wt, bt, ot, mt, gt = (torch.as_tensor(a, device="cuda") for a in host)
            mt = mt if v == "v2" else None
            leaves = [a.clone().requires_grad_(True) for a in (xt, ot, wt, bt)] + \
                ([mt.clone().requires_grad_(True)] if mt is not None else [])
            xl, ol, wl, bl = leaves[:4]
            ml = leaves[4] if mt is not None else None

            def tv(a=xt, o=ot, wgt=wt, bias=bt, msk=mt):
                return torchvision.ops.deform_conv2d(a, o, wgt, bias, padding=1, mask=msk)
            err = float(np.abs(tv().cpu().numpy() - y).max())
            with torch.no_grad():
                t.add(f"{name} {v} fwd", f"torchvision CUDA (max diff {err:.1e})",
                      timeit(tv, sync=ts), flops)
            yt = tv(xl, ol, wl, bl, ml)
            t.add(f"{name} {v} bwd", "torchvision CUDA (autograd)",
                  timeit(lambda: torch.autograd.grad(yt, leaves, gt, retain_graph=True),
                         sync=ts), 2 * flops)
    return t


if __name__ == "__main__":
    main()
