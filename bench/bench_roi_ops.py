"""RoIAlign benchmark: the FPN level-P2 workload of a two-stage detector.

x (2, 256, 200, 272) float32, 1000 RoIs (random boxes of 16..256 px on a 1088 x 800 image),
output 7x7, sampling_ratio 2, aligned=True, spatial_scale 1/4; forward and backward, --threads
threads for every implementation (default 2).

    python bench/bench_roi_ops.py [--threads N] [--torchvision-python PATH] [--no-write | --out DIR]
                                  [--ops roi_align,roi_pool,ps_roi_align,...]

``--ops`` picks the sections (default: all: roi_align, roi_pool, ps_roi_align, deform_roi_pool,
multi_scale_roi_align).

roi_pool (torchvision's RoIPool): the same FPN P2 map and RoIs, output 7x7, spatial_scale 1/4,
forward and backward (grad_x, the argmax recomputed from x), NCHW (fastnorm's roi_pool has no
channels-last layout). ps_roi_align (R-FCN's position-sensitive score maps): x (2, 490, 50, 68)
float32 = 10 classes x 7 x 7 bins on the stride-16 map of the same 1088 x 800 image, the same
1000 RoIs, output 7x7, sampling_ratio 2, spatial_scale 1/16, forward and backward. Both beside
torchvision CPU (same method as roi_align; forward and gradient max diffs), with 1-thread rows.

The 1-thread rows ("scaling check") and the --threads rows they are compared with are timed in
interleaved rounds (``thread_times``): on a shared machine a load change between the two would
otherwise show up as a scaling change.

Peers
-----
* ONNX Runtime ``RoiAlign`` (opset 16, ``coordinate_transformation_mode="half_pixel"`` = aligned,
  mode avg), forward only, ``intra_op_num_threads`` = --threads.
* torchvision CPU ``roi_align`` forward and backward (autograd), ``torch.set_num_threads`` =
  --threads, on the very same inputs saved to .npy files, timed with the same method (best of
  11 repeats of an inner loop of >= 0.1 s after a warm-up call), with its max deviation from
  fastnorm's output. It runs in this process when torchvision imports here, else in the
  interpreter named by --torchvision-python or ``$FASTNORM_TV_PYTHON`` (a second environment:
  PyPI's torchvision does not import beside the CPU torch build, see the README's "Benchmarks").
* On a GPU (CuPy present): fastnorm CUDA, and torchvision CUDA when importable in this process.

roi_align_rotated: the same RoIs as (cx, cy, w, h, angle) with angles uniform in [-90, 90)
degrees, forward and backward, beside roi_align on the unrotated RoIs (the cost of rotation)
and beside the PyTorch way without detectron2/mmcv (``torch.nn.functional.grid_sample`` on a
rotated sampling grid per RoI, then ``avg_pool2d`` over each bin's samples; torch in this
process; forward only: autograd through the expanded image would allocate K x C x H x W).
grid_sample pads with zeros where RoIAlign clamps samples within one pixel of the border, so its
max deviation is reported over the RoIs whose samples all lie inside the map.

multi_scale_roi_align: the 4-level FPN P2-P5 of an 800 x 1088 image (2, 256, 200 x 272 / 100 x
136 / 50 x 68 / 25 x 34) float32, 1000 RoIs with sides log-uniform in 16..800 px (about 50 / 18 /
18 / 14 % on P2 / P3 / P4 / P5), 7x7, sampling_ratio 2, aligned=False (torchvision's
MultiScaleRoIAlign pools unaligned), forward and backward (grads of all four levels), against
torchvision's ``MultiScaleRoIAlign`` (scales inferred from the image size, as in Faster R-CNN)
in the torchvision interpreter, with the max deviations of its output and gradients.

deform_roi_pool (mmdet's modulated DeformRoIPoolPack): the same map and RoIs, offsets N(0, 0.1),
gamma 0.1, mask in (0, 1), forward, grad_x, and all gradients (x, offset, mask), beside roi_align
on the same RoIs and the PyTorch grid_sample way (forward; mmcv has no CPU kernel).

Cost model (roi_align)
----------------------
The "GB/s" columns count the compulsory memory traffic: every feature read once plus the output
written once (forward), grad_out read once plus grad_x written once (backward); their ceiling is
the measured copy bandwidth (``fastnorm._bench.copy_bandwidth``, bytes read + written). The work
is K * PH * PW * SR^2 bilinear samples, each 4 corners x C channels multiply-adds (2 flops each),
against the FMA peak measured as the float32 GEMM rate of NumPy's BLAS (OpenBLAS) at --threads
threads (a 2048^3 matmul, 2 n^3 flops; a tuned SGEMM runs at ~90% of the FMA units' peak). The
cost-model lines give, per case, samples/s, GB/s and GFLOP/s with their fractions of the two
ceilings and the time bound max(bytes / bandwidth, flops / peak): the distance to the limit.

Cost model (roi_pool, ps_roi_align)
-----------------------------------
roi_pool: the work is the bins' window pixels (summed over RoIs and bins) times C channels, one
compare-and-select each (counted as 1 flop against the same peak: optimistic, a select is not an
FMA); bytes: x read once + output written (forward), x + grad_out read + grad_x written
(backward). ps_roi_align: K * CO * PH * PW * SR^2 bilinear samples, each 4 corners x 1 channel
multiply-adds (2 flops each); bytes: x read once + output written (forward), grad_out read +
grad_x written (backward).
"""
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fastnorm  # noqa: E402
from fastnorm._bench import (Table, bench_args, copy_bandwidth, cuda_device,  # noqa: E402
                             cuda_profile, finish, onnx_op, run_torchvision, timeit,
                             timeit_many, torchvision_cuda)


def thread_times(fns, threads, rounds=4, repeat=3):
    """Best seconds per call of each ``fns[name]()`` at ``threads`` and at 1 thread, keyed
    (name, n): rounds that alternate the thread counts (timeit_many), so that the 1 -> N scaling
    lines compare times taken under the same machine load."""
    def at(n, fn):
        def call():
            with fastnorm.threads(n):
                return fn()
        return call
    return timeit_many({(name, n): at(n, fn) for name, fn in fns.items() for n in (threads, 1)},
                       rounds=rounds, repeat=repeat)


PH = PW = 7
SCALE, SR, ALIGNED = 0.25, 2, True


def workload(seed=0, K=1000):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 256, 200, 272), dtype=np.float32)
    cx, cy = rng.uniform(0, 1088, K), rng.uniform(0, 800, K)
    w = np.exp(rng.uniform(np.log(16), np.log(256), K))
    h = w * np.exp(rng.uniform(-0.7, 0.7, K))
    rois = np.stack([rng.integers(0, 2, K), cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2],
                    1).astype(np.float32)
    return x, rois


# the torchvision peer (fastnorm._bench.run_torchvision): in this process or in a second one
TV_SCRIPT = r"""
def run(d, threads, ph, scale, sr, aligned):
    import numpy as np, torch, torchvision
    torch.set_num_threads(threads)
    x = torch.from_numpy(np.load(d + "/x.npy"))
    rois = torch.from_numpy(np.load(d + "/rois.npy"))
    ref = np.load(d + "/y.npy")
    f = lambda: torchvision.ops.roi_align(x, rois, ph, scale, sr, aligned)
    err = float(np.abs(f().numpy() - ref).max())
    xg = x.clone().requires_grad_(True)
    y = torchvision.ops.roi_align(xg, rois, ph, scale, sr, aligned)
    g = torch.from_numpy(np.load(d + "/g.npy"))

    def bwd():
        torch.autograd.grad(y, xg, g, retain_graph=True)
    return {"fwd": timeit(f), "bwd": timeit(bwd), "err": err,
            "version": torchvision.__version__}
"""


# multi_scale_roi_align: torchvision's MultiScaleRoIAlign on the same pyramid and boxes
TV_MS_SCRIPT = r"""
def run(d, threads, repeat):
    import collections, numpy as np, torch, torchvision
    torch.set_num_threads(threads)
    z = np.load(d + "/ms.npz")
    names = ["p2", "p3", "p4", "p5"]
    feats = collections.OrderedDict((n, torch.from_numpy(z[n])) for n in names)
    rois = torch.from_numpy(z["rois"])
    boxes = [rois[rois[:, 0] == i, 1:] for i in range(int(z["n"]))]
    sizes = [tuple(int(v) for v in z["image"])] * len(boxes)
    m = torchvision.ops.MultiScaleRoIAlign(names, int(z["ph"]), int(z["sr"]))
    f = lambda: m(feats, boxes, sizes)
    err = float(np.abs(f().numpy() - z["y"]).max())
    leaves = [t.clone().requires_grad_(True) for t in feats.values()]
    y = m(collections.OrderedDict(zip(names, leaves)), boxes, sizes)
    g = torch.from_numpy(z["g"])
    grads = torch.autograd.grad(y, leaves, g, retain_graph=True)
    gerr = max(float(np.abs(a.numpy() - z[f"g{i}"]).max()) for i, a in enumerate(grads))

    def bwd():
        torch.autograd.grad(y, leaves, g, retain_graph=True)
    return {"fwd": timeit(f, repeat=repeat), "bwd": timeit(bwd, repeat=repeat), "err": err,
            "gerr": gerr, "scales": list(m.scales), "version": torchvision.__version__}
"""
IMAGE = (800, 1088)


def pyramid_workload(seed=4, K=1000):
    """FPN P2..P5 of an 800 x 1088 image (N = 2, C = 256) and K RoIs (K, 5), sides log-uniform
    in 16..800 px, grouped by image (torchvision's per-image lists keep that order)."""
    rng = np.random.default_rng(seed)
    feats = [rng.standard_normal((2, 256, 200 >> i, 272 >> i), dtype=np.float32)
             for i in range(4)]
    cx, cy = rng.uniform(0, IMAGE[1], K), rng.uniform(0, IMAGE[0], K)
    w = np.exp(rng.uniform(np.log(16), np.log(800), K))
    h = w * np.exp(rng.uniform(-0.7, 0.7, K))
    rois = np.stack([rng.integers(0, 2, K), cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2],
                    1).astype(np.float32)
    return feats, rois[np.argsort(rois[:, 0], kind="stable")]


def multi_scale_table(threads, python=None, repeat=11):
    """multi_scale_roi_align forward/backward vs torchvision's MultiScaleRoIAlign (CPU)."""
    feats, rois = pyramid_workload()
    K, C = rois.shape[0], feats[0].shape[1]
    g = np.random.default_rng(5).standard_normal((K, C, PH, PW), dtype=np.float32)
    kw = dict(spatial_scales=[0.25, 0.125, 0.0625, 0.03125], sampling_ratio=SR, aligned=False)
    shapes = [f.shape for f in feats]
    with fastnorm.threads(threads):
        y = fastnorm.multi_scale_roi_align(feats, rois, PH, **kw)
        grads = fastnorm.multi_scale_roi_align_backward(g, rois, shapes, PH, **kw)
        t_f = timeit(lambda: fastnorm.multi_scale_roi_align(feats, rois, PH, **kw),
                     repeat=repeat)
        t_b = timeit(lambda: fastnorm.multi_scale_roi_align_backward(g, rois, shapes, PH, **kw),
                     repeat=repeat)
    lv = np.clip(np.floor(4 + np.log2(np.sqrt((rois[:, 3] - rois[:, 1])
                                              * (rois[:, 4] - rois[:, 2])) / 224) + 1e-6), 2, 5)
    counts = "/".join(str(int((lv == k).sum())) for k in range(2, 6))
    fbytes = sum(f.nbytes for f in feats) + g.nbytes
    t = Table(f"multi_scale_roi_align, 4-level FPN P2-P5 of an 800x1088 image (2, 256, "
              f"200x272 .. 25x34) float32, {K} RoIs ({counts} on P2/P3/P4/P5), 7x7, sr 2, "
              f"aligned=False, {threads} threads (GB/s: levels read + output written)",
              unit="GB/s")
    t.add("forward", "fastnorm", t_f, fbytes)
    t.add("backward", "fastnorm", t_b, fbytes)
    with tempfile.TemporaryDirectory() as d:
        np.savez(f"{d}/ms.npz", rois=rois, y=y, g=g, n=2, image=np.array(IMAGE), ph=PH, sr=SR,
                 **{f"p{i + 2}": f for i, f in enumerate(feats)},
                 **{f"g{i}": a for i, a in enumerate(grads)})
        tv = run_torchvision(TV_MS_SCRIPT, d, threads, python, repeat=repeat)
    if tv is not None:
        assert tv["scales"] == kw["spatial_scales"], tv["scales"]
        t.add("forward", f"torchvision {tv['version']} MultiScaleRoIAlign (max diff "
              f"{tv['err']:.1e})", tv["fwd"], fbytes)
        t.add("backward", f"torchvision {tv['version']} (autograd, max grad diff "
              f"{tv['gerr']:.1e})", tv["bwd"], fbytes)
    return t, tv


def torchvision_cpu(x, rois, y, g, threads, python=None):
    """Times of torchvision CPU forward/backward (``fastnorm._bench.run_torchvision``), or None
    if unavailable."""
    with tempfile.TemporaryDirectory() as d:
        for name, a in dict(x=x, rois=rois, y=y, g=g).items():
            np.save(f"{d}/{name}.npy", a)
        return run_torchvision(TV_SCRIPT, d, threads, python, ph=PH, scale=SCALE, sr=SR,
                               aligned=ALIGNED)


def onnxruntime_fwd(x, rois, threads):
    """ONNX Runtime RoiAlign (opset 16) on the same inputs: run() or None."""
    return onnx_op("RoiAlign", {"X": x, "rois": np.ascontiguousarray(rois[:, 1:]),
                                "idx": rois[:, 0].astype(np.int64)},
                   dict(mode="avg", output_height=PH, output_width=PW, sampling_ratio=SR,
                        spatial_scale=SCALE,
                        coordinate_transformation_mode="half_pixel" if ALIGNED
                        else "output_half_pixel"), 16, threads)


def _blas_threads(threads):
    """Set the thread count of NumPy's OpenBLAS (ctypes; no threadpoolctl needed): True if
    done."""
    import ctypes
    try:
        with open("/proc/self/maps") as f:
            libs = {line.split()[-1] for line in f if "openblas" in line.lower()}
    except OSError:
        return False
    for path in libs:
        lib = ctypes.CDLL(path)
        for sym in ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
                    "openblas_set_num_threads64_", "openblas_set_num_threads"):
            fn = getattr(lib, sym, None)
            if fn is not None:
                fn(ctypes.c_int(threads))
                return True
    return False


def fma_peak(threads, n=2048):
    """float32 GEMM rate in GFLOP/s (2 n^3 flops per n x n product) at ``threads`` BLAS
    threads, and whether the thread count could be set."""
    a = np.random.default_rng(3).standard_normal((n, n), dtype=np.float32)
    b = a.T.copy()
    np.matmul(a, b)                                  # loads the BLAS
    ok = _blas_threads(threads)
    c = np.empty_like(a)
    t = timeit(lambda: np.matmul(a, b, out=c), repeat=5)
    return 2 * n ** 3 / t / 1e9, ok


def cost_model(rows, samples, flops, bw, peak):
    """Lines: per (name, seconds, bytes) samples/s, GB/s, GFLOP/s against the ceilings."""
    out = []
    for name, t, nbytes in rows:
        gbs, gfl = nbytes / t / 1e9, flops / t / 1e9
        bound = max(nbytes / (bw * 1e9), flops / (peak * 1e9))
        out.append(f"{name}: {t * 1e3:.1f} ms, {samples / t / 1e6:.0f} Msamples/s, "
                   f"{gbs:.1f} GB/s ({100 * gbs / bw:.0f}% of copy bandwidth), "
                   f"{gfl:.1f} GFLOP/s ({100 * gfl / peak:.1f}% of FMA peak); bound "
                   f"{bound * 1e3:.1f} ms, {t / bound:.1f}x from it")
    return out


OPS = ("roi_align", "roi_pool", "ps_roi_align", "deform_roi_pool", "multi_scale_roi_align")


def _options(p):
    p.add_argument("--ops", default=",".join(OPS), metavar="OP[,OP...]",
                   help=f"the sections to run (default: all: {','.join(OPS)})")


def main(argv=None):
    args = bench_args(__doc__, __file__, argv, torchvision=True, extra=_options)
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    bad = [o for o in ops if o not in OPS]
    if bad:
        raise SystemExit(f"--ops: unknown {bad}; choose from {', '.join(OPS)}")
    threads = args.threads
    fastnorm.set_num_threads(threads)                # also what the report's machine line says
    if args.cuda_only:
        x, rois = workload()
        g = np.random.default_rng(1).standard_normal((len(rois), x.shape[1], PH, PW),
                                                     dtype=np.float32)
        return finish(args, "roi_ops-cuda", cuda_tables(x, rois, g))
    bw = copy_bandwidth()
    peak, blas_ok = fma_peak(threads)
    tables, notes = [], []
    if "roi_align" in ops:
        t, n = roi_align_section(args, bw, peak, blas_ok)
        tables += t
        notes.append(n)
    for op, section in (("roi_pool", pool_section), ("ps_roi_align", ps_section)):
        if op in ops:
            t, n = section(args, bw, peak)
            tables += t
            notes.append(n)
    if "deform_roi_pool" in ops:
        x, rois = workload()
        g = np.random.default_rng(1).standard_normal((len(rois), x.shape[1], PH, PW),
                                                     dtype=np.float32)
        t, lines = deform_table(x, rois, g, threads)
        tables.append(t)
        notes.append(f"deform_roi_pool targets (float32, {threads} threads):\n\n"
                     + "\n".join(f"- {s}" for s in lines))
    if "multi_scale_roi_align" in ops:
        t, tv = multi_scale_table(threads, args.torchvision_python)
        tables.append(t)
        notes.append("multi_scale_roi_align: torchvision "
                     + (f"{tv['version']} timed {tv['where']}" if tv else "unavailable") + ".")
    notes.append(stream_scaling(threads))
    notes.append("Load average during the run: " + ", ".join(f"{v:.2f}" for v in os.getloadavg())
                 + f" (on a shared machine the {threads}-thread rows only scale when the load is "
                 "low).")
    return finish(args, "roi_ops", tables, "\n\n".join(notes))


def stream_scaling(threads):
    """The 1 -> N thread scaling of a pure streaming pass on the workload's map (group_norm:
    read twice, written once, no reuse; timed as the scaling rows): how far memory bandwidth
    lets the memory-bound parts of the RoI passes scale on this machine."""
    x = workload()[0]
    tt = thread_times({"gn": lambda: fastnorm.group_norm(x, 32)}, threads)
    return (f"Streaming ceiling of the scaling lines: group_norm over the same (2, 256, 200, 272) "
            f"map scales {tt['gn', 1] / tt['gn', threads]:.2f}x from 1 to {threads} threads here "
            f"({tt['gn', 1] * 1e3:.1f} -> {tt['gn', threads] * 1e3:.1f} ms): the share of a "
            "pass that streams memory scales no better.")


def roi_align_section(args, bw, peak, blas_ok):
    """roi_align forward/backward tables, roi_align_rotated, CUDA, and the notes."""
    threads = args.threads
    x, rois = workload()
    K, C = rois.shape[0], x.shape[1]
    rng = np.random.default_rng(1)
    g = rng.standard_normal((K, C, PH, PW), dtype=np.float32)
    out_bytes = K * C * PH * PW * 4
    fwd = Table("roi_align forward, FPN P2 (2, 256, 200, 272) float32, 1000 RoIs, 7x7, sr 2, "
                f"aligned, {threads} threads (GB/s: x read + output written)", unit="GB/s",
                ceiling=bw)
    bwd = Table("roi_align backward (grad_x), same workload (GB/s: grad_out read + grad_x "
                "written)", unit="GB/s", ceiling=bw)
    with fastnorm.threads(threads):
        y = fastnorm.roi_align(x, rois, PH, SCALE, SR, ALIGNED)
        xl = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
        t_fl = timeit(lambda: fastnorm.roi_align(xl, rois, PH, SCALE, SR, ALIGNED,
                                                 channels_last=True))
        gl = np.ascontiguousarray(g.transpose(0, 2, 3, 1))
        t_bl = timeit(lambda: fastnorm.roi_align_backward(gl, rois, xl.shape, PH, SCALE, SR,
                                                          ALIGNED, channels_last=True))
    tt = thread_times({"f": lambda: fastnorm.roi_align(x, rois, PH, SCALE, SR, ALIGNED),
                       "b": lambda: fastnorm.roi_align_backward(g, rois, x.shape, PH, SCALE, SR,
                                                                ALIGNED)}, threads)
    t_f, t_b, t_f1, t_b1 = tt["f", threads], tt["b", threads], tt["f", 1], tt["b", 1]
    fwd_bytes = out_bytes + x.nbytes
    fwd.add("P2", "fastnorm", t_f, fwd_bytes)
    fwd.add("P2", "fastnorm, 1 thread (scaling check)", t_f1, fwd_bytes)
    fwd.add("P2", "fastnorm channels_last", t_fl, fwd_bytes)
    bwd.add("P2", "fastnorm", t_b, out_bytes + x.nbytes)
    bwd.add("P2", "fastnorm, 1 thread (scaling check)", t_b1, out_bytes + x.nbytes)
    bwd.add("P2", "fastnorm channels_last", t_bl, out_bytes + x.nbytes)
    results = {}
    run_ort = onnxruntime_fwd(x, rois, threads)
    if run_ort is not None:
        err = float(np.abs(run_ort() - y).max())
        results["ort"] = timeit(run_ort)
        fwd.add("P2", f"onnxruntime RoiAlign (max diff {err:.1e})", results["ort"], fwd_bytes)
    tv = torchvision_cpu(x, rois, y, g, threads, args.torchvision_python)
    if tv is not None:
        results["tv_fwd"], results["tv_bwd"] = tv["fwd"], tv["bwd"]
        fwd.add("P2", f"torchvision {tv['version']} CPU (max diff {tv['err']:.1e})", tv["fwd"],
                fwd_bytes)
        bwd.add("P2", f"torchvision {tv['version']} CPU (autograd)", tv["bwd"],
                out_bytes + x.nbytes)
    tables = [fwd, bwd, rotated_table(x, rois, g, threads)]
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
    # issue 17's targets on this workload (times in ms; at most)
    for name, t, want in (("forward NCHW <= 20 ms", t_f, 20e-3),
                          ("forward channels-last <= 12 ms", t_fl, 12e-3),
                          ("backward (grad_x) <= 40 ms", t_b, 40e-3)):
        lines.append(f"{'PASS' if t <= want else 'MISS'}: {name} (got {t * 1e3:.1f} ms)")
    for name, r in (("forward", t_f1 / t_f), ("backward", t_b1 / t_b)):
        lines.append(f"{'PASS' if r >= 1.8 else 'MISS'}: {name} 1 -> {threads} thread "
                     f"scaling >= 1.8x (got {r:.2f}x)")
    samples = K * PH * PW * SR * SR
    flops = samples * 4 * C * 2
    model = cost_model([("forward NCHW", t_f, fwd_bytes),
                        ("forward channels-last", t_fl, fwd_bytes),
                        ("backward NCHW", t_b, out_bytes + x.nbytes),
                        ("backward channels-last", t_bl, out_bytes + x.nbytes)],
                       samples, flops, bw, peak)
    tv_note = f"{tv['version']} timed {tv['where']}" if tv else "unavailable"
    notes = (f"Targets (float32, {threads} threads):\n\n" + "\n".join(f"- {s}" for s in lines)
             + f"\n\nCost model of roi_align ({threads} threads; see the script docstring): "
             f"{samples / 1e6:.2f} M samples x 4 corners x {C} channels = {flops / 1e9:.2f} "
             f"GFLOP; copy bandwidth {bw:.1f} GB/s, FMA peak {peak:.0f} GFLOP/s (float32 "
             f"2048^3 GEMM through NumPy's BLAS at {threads if blas_ok else 'its default'} "
             "threads)\n\n" + "\n".join(f"- {s}" for s in model)
             + f"\n\ntorchvision {tv_note} on the same inputs (see the script docstring).")
    return tables, notes


# roi_pool / ps_roi_align peers: forward and backward (autograd) with max diffs, both ways
TV_OPS_SCRIPT = r"""
def run(d, threads, op, ph, scale, sr, repeat):
    import numpy as np, torch, torchvision
    torch.set_num_threads(threads)
    x = torch.from_numpy(np.load(d + "/x.npy"))
    rois = torch.from_numpy(np.load(d + "/rois.npy"))
    if op == "roi_pool":
        f = lambda xx: torchvision.ops.roi_pool(xx, rois, ph, scale)
    else:
        f = lambda xx: torchvision.ops.ps_roi_align(xx, rois, ph, scale, sr)
    err = float(np.abs(f(x).numpy() - np.load(d + "/y.npy")).max())
    xg = x.clone().requires_grad_(True)
    y = f(xg)
    g = torch.from_numpy(np.load(d + "/g.npy"))
    gerr = float(np.abs(torch.autograd.grad(y, xg, g, retain_graph=True)[0].numpy()
                        - np.load(d + "/gx.npy")).max())

    def bwd():
        torch.autograd.grad(y, xg, g, retain_graph=True)
    return {"fwd": timeit(lambda: f(x), repeat=repeat), "bwd": timeit(bwd, repeat=repeat),
            "err": err, "gerr": gerr, "version": torchvision.__version__}
"""


def torchvision_op(op, arrays, threads, python, repeat, **kw):
    """torchvision CPU forward/backward times and max diffs for roi_pool / ps_roi_align on
    ``arrays`` (x, rois, y, g, gx: fastnorm's output and gradient), or None."""
    with tempfile.TemporaryDirectory() as d:
        for name, a in arrays.items():
            np.save(f"{d}/{name}.npy", a)
        return run_torchvision(TV_OPS_SCRIPT, d, threads, python, op=op, repeat=repeat, **kw)


def pool_visits(rois, scale, H, W, ph=PH, pw=PW):
    """Window pixels summed over RoIs and bins (torchvision's RoIPool windows), per channel."""
    r = rois.astype(np.float64)
    ok = np.isfinite(r[:, 1:]).all(1)
    v = np.round(r[ok, 1:] * scale)
    xs, ys, xe, ye = v.T
    bh = np.maximum(ye - ys + 1, 1).astype(np.float32) / np.float32(ph)
    bw = np.maximum(xe - xs + 1, 1).astype(np.float32) / np.float32(pw)

    def span(b, s, n, L):
        p = np.arange(n)[None, :]
        lo = np.clip(np.floor(p * b[:, None]) + s[:, None], 0, L)
        hi = np.clip(np.ceil((p + 1) * b[:, None]) + s[:, None], 0, L)
        return np.maximum(hi - lo, 0).sum(1)
    return int((span(bh, ys, ph, H) * span(bw, xs, pw, W)).sum())


def _lane_section(name, args, bw, peak, x, rois, g, fwd_fn, bwd_fn, fwd_bytes, bwd_bytes,
                  samples, flops, unit_note, tv_kw):
    """Forward/backward tables (fastnorm at --threads and 1 thread, torchvision CPU), the cost
    model and the 1 -> N thread scaling lines of one op."""
    threads = args.threads
    with fastnorm.threads(threads):
        y = fwd_fn()
        gx = bwd_fn()
    tt = thread_times({"f": fwd_fn, "b": bwd_fn}, threads)
    t_f, t_b, t_f1, t_b1 = tt["f", threads], tt["b", threads], tt["f", 1], tt["b", 1]
    fwd = Table(f"{name} forward, {threads} threads (GB/s: compulsory traffic, see the "
                "docstring)", unit="GB/s", ceiling=bw)
    bwd = Table(f"{name} backward (grad_x), same workload", unit="GB/s", ceiling=bw)
    case = tv_kw.pop("case")
    fwd.add(case, "fastnorm", t_f, fwd_bytes)
    fwd.add(case, "fastnorm, 1 thread (scaling check)", t_f1, fwd_bytes)
    bwd.add(case, "fastnorm", t_b, bwd_bytes)
    bwd.add(case, "fastnorm, 1 thread (scaling check)", t_b1, bwd_bytes)
    tv = torchvision_op(name, dict(x=x, rois=rois, y=y, g=g, gx=gx), threads,
                        args.torchvision_python, **tv_kw)
    lines = []
    if tv is not None:
        fwd.add(case, f"torchvision {tv['version']} CPU (max diff {tv['err']:.1e})", tv["fwd"],
                fwd_bytes)
        bwd.add(case, f"torchvision {tv['version']} CPU (autograd; grad_x max diff "
                f"{tv['gerr']:.1e})", tv["bwd"], bwd_bytes)
        lines += [f"forward {tv['fwd'] / t_f:.1f}x torchvision CPU",
                  f"backward {tv['bwd'] / t_b:.1f}x torchvision CPU"]
    for what, r in (("forward", t_f1 / t_f), ("backward", t_b1 / t_b)):
        lines.append(f"{'PASS' if r >= 1.8 else 'MISS'}: {what} 1 -> {threads} thread scaling "
                     f">= 1.8x (got {r:.2f}x)")
    model = cost_model([("forward", t_f, fwd_bytes), ("backward", t_b, bwd_bytes)], samples,
                       flops, bw, peak)
    tv_note = f"{tv['version']} timed {tv['where']}" if tv else "unavailable"
    notes = (f"{name} ({threads} threads): " + "; ".join(lines) + f".\n\nCost model of {name}: "
             + unit_note + f" = {flops / 1e9:.2f} GFLOP; copy bandwidth {bw:.1f} GB/s, FMA peak "
             f"{peak:.0f} GFLOP/s\n\n" + "\n".join(f"- {s}" for s in model)
             + f"\n\ntorchvision {tv_note}.")
    return [fwd, bwd], notes


def pool_section(args, bw, peak):
    """roi_pool on the FPN P2 workload (torchvision's RoIPool), NCHW."""
    x, rois = workload()
    K, (_, C, H, W) = len(rois), x.shape
    g = np.random.default_rng(1).standard_normal((K, C, PH, PW), dtype=np.float32)
    visits = pool_visits(rois, SCALE, H, W)
    out_bytes = g.nbytes
    return _lane_section(
        "roi_pool", args, bw, peak, x, rois, g,
        lambda: fastnorm.roi_pool(x, rois, PH, SCALE),
        lambda: fastnorm.roi_pool_backward(g, rois, x.shape, PH, SCALE, x=x),
        x.nbytes + out_bytes, 2 * x.nbytes + out_bytes, visits, visits * C,
        f"{visits / 1e6:.2f} M window pixels x {C} channels, one compare each",
        dict(case="P2 (2, 256, 200, 272), 7x7", ph=PH, scale=SCALE, sr=0, repeat=5))


def ps_workload(seed=5):
    """R-FCN position-sensitive score maps: (2, 10 * 7 * 7, 50, 68) float32 (stride 16 of the
    workload's 1088 x 800 image), with the workload's RoIs."""
    _, rois = workload()
    x = np.random.default_rng(seed).standard_normal((2, 10 * PH * PW, 50, 68), dtype=np.float32)
    return x, rois


def ps_section(args, bw, peak):
    """ps_roi_align on R-FCN-shaped score maps."""
    x, rois = ps_workload()
    K, CO, scale = len(rois), x.shape[1] // (PH * PW), 1 / 16
    g = np.random.default_rng(6).standard_normal((K, CO, PH, PW), dtype=np.float32)
    samples = K * CO * PH * PW * SR * SR
    return _lane_section(
        "ps_roi_align", args, bw, peak, x, rois, g,
        lambda: fastnorm.ps_roi_align(x, rois, PH, scale, SR),
        lambda: fastnorm.ps_roi_align_backward(g, rois, x.shape, PH, scale, SR),
        x.nbytes + g.nbytes, x.nbytes + g.nbytes, samples, samples * 4 * 2,
        f"{samples / 1e6:.2f} M samples x 4 corners x 1 channel",
        dict(case="R-FCN (2, 490, 50, 68), 7x7, sr 2", ph=PH, scale=scale, sr=SR, repeat=11))


def rotated(rois, seed=2):
    """(K, 5) RoIs -> (K, 6) [batch, cx, cy, w, h, angle] with angles uniform in [-90, 90)."""
    a = np.random.default_rng(seed).uniform(-90, 90, len(rois))
    return np.stack([rois[:, 0], (rois[:, 1] + rois[:, 3]) / 2, (rois[:, 2] + rois[:, 4]) / 2,
                     rois[:, 3] - rois[:, 1], rois[:, 4] - rois[:, 2], a], 1).astype(rois.dtype)


def torch_rotated(x, rrois, threads):
    """roi_align_rotated the PyTorch way: a rotated grid of each bin's SR x SR sample points per
    RoI, grid_sample (bilinear, zero padding) on the RoI's image (expanded to the RoI count
    without a copy), avg_pool2d per bin. Returns (forward, output, inside: RoIs whose samples
    all lie in the map) or None. Its backward is not timed: the gradient of the expanded image
    is materialised, K x C x H x W floats (27 GB here)."""
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(threads)
    r = torch.from_numpy(rrois.astype(np.float64))
    t = torch.deg2rad(r[:, 5])
    cx, cy = r[:, 1] * SCALE - 0.5, r[:, 2] * SCALE - 0.5
    w, h = r[:, 3] * SCALE, r[:, 4] * SCALE
    steps = (torch.arange(PH * SR, dtype=torch.float64) + 0.5) / (PH * SR) - 0.5
    yy = steps[None, :, None] * h[:, None, None]            # local sample offsets (K, PH*SR, 1)
    xx = steps[None, None, :] * w[:, None, None]            # (K, 1, PW*SR)
    c, s = torch.cos(t)[:, None, None], torch.sin(t)[:, None, None]
    px = xx * c + yy * s + cx[:, None, None]
    py = yy * c - xx * s + cy[:, None, None]
    return _grid_pool(torch, x, r[:, 0], px, py)


def _grid_pool(torch, x, batch, px, py, mask=None):
    """The PyTorch way's common part: sample points (px, py) (K, PH * SR, PW * SR) in pixels,
    grid_sample (bilinear, zero padding) on each RoI's image expanded to its RoI count,
    avg_pool2d per bin (times ``mask``). Returns (forward, output, inside)."""
    import torch.nn.functional as F
    N, C, H, W = x.shape
    grid = torch.stack([(2 * px + 1) / W - 1, (2 * py + 1) / H - 1], -1).float()
    inside = ((px >= 0) & (px <= W - 1) & (py >= 0) & (py <= H - 1)).flatten(1).all(1).numpy()
    groups = [torch.nonzero(batch.long() == b).flatten() for b in range(N)]
    xt = torch.from_numpy(x)
    mt = None if mask is None else torch.from_numpy(mask)

    def forward():
        out = xt.new_empty((len(px), C, PH, PW))
        for b, sel in enumerate(groups):
            xs = xt[b:b + 1].expand(len(sel), C, H, W)
            y = F.avg_pool2d(F.grid_sample(xs, grid[sel], "bilinear", "zeros",
                                           align_corners=False), SR)
            out[sel] = y if mt is None else y * mt[sel]
        return out
    return forward, forward().numpy(), inside


def rotated_table(x, rois, g, threads):
    """roi_align_rotated forward/backward beside roi_align and the PyTorch way (see above)."""
    rr = rotated(rois)
    out_bytes = g.nbytes
    t = Table(f"roi_align_rotated, same workload, angles in [-90, 90), {threads} threads",
              unit="GB/s")
    with fastnorm.threads(threads):
        y = fastnorm.roi_align_rotated(x, rr, PH, SCALE, SR, True)
        t.add("forward", "fastnorm", timeit(lambda: fastnorm.roi_align_rotated(
            x, rr, PH, SCALE, SR, True)), out_bytes)
        t.add("forward", "fastnorm roi_align, unrotated RoIs", timeit(
            lambda: fastnorm.roi_align(x, rois, PH, SCALE, SR, True)), out_bytes)
        t.add("backward", "fastnorm", timeit(lambda: fastnorm.roi_align_rotated_backward(
            g, rr, x.shape, PH, SCALE, SR, True)), out_bytes + x.nbytes)
        t.add("backward", "fastnorm roi_align, unrotated RoIs", timeit(
            lambda: fastnorm.roi_align_backward(g, rois, x.shape, PH, SCALE, SR, True)),
            out_bytes + x.nbytes)
    peer = torch_rotated(x, rr, threads)
    if peer is not None:
        fwd, ref, inside = peer
        err = float(np.abs(ref - y)[inside].max()) if inside.any() else float("nan")
        t.add("forward", f"torch grid_sample + avg_pool2d (max diff {err:.1e})",
              timeit(fwd, repeat=3), out_bytes)
    return t


def deform_inputs(K, seed=3):
    """mmdet's modulated deformable RoI pooling on the same RoIs: offsets N(0, 0.1) (an fc
    layer's output), gamma 0.1, mask in (0, 1)."""
    rng = np.random.default_rng(seed)
    return (rng.normal(0, 0.1, (K, 2, PH, PW)).astype(np.float32),
            rng.uniform(0, 1, (K, 1, PH, PW)).astype(np.float32))


def torch_deform(x, rois, off, mask, threads, gamma=0.1):
    """deform_roi_pool the PyTorch way (mmcv has no CPU kernel): each bin's SR x SR sample
    points shifted by gamma * RoI size * offset, grid_sample (bilinear, zero padding) on the
    RoI's image expanded to the RoI count, avg_pool2d per bin, times the mask. Returns (forward,
    output, inside: RoIs whose samples all lie in the map, where zero padding and mmcv's border
    rule agree) or None."""
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(threads)
    r = torch.from_numpy(rois.astype(np.float64))
    x1, y1 = r[:, 1] * SCALE - 0.5, r[:, 2] * SCALE - 0.5
    w, h = (r[:, 3] - r[:, 1]) * SCALE, (r[:, 4] - r[:, 2]) * SCALE
    o = torch.from_numpy(off.astype(np.float64))
    sy = (gamma * h[:, None, None] * o[:, 1]).repeat_interleave(SR, 1).repeat_interleave(SR, 2)
    sx = (gamma * w[:, None, None] * o[:, 0]).repeat_interleave(SR, 1).repeat_interleave(SR, 2)
    steps = (torch.arange(PH * SR, dtype=torch.float64) + 0.5) / SR    # in bins
    py = y1[:, None, None] + steps[None, :, None] * (h / PH)[:, None, None] + sy
    px = x1[:, None, None] + steps[None, None, :] * (w / PW)[:, None, None] + sx
    return _grid_pool(torch, x, r[:, 0], px, py, mask)


def deform_table(x, rois, g, threads):
    """deform_roi_pool forward / backward beside roi_align on the same RoIs (the same work plus
    per-bin shifts; its targets carry over as ratios) and the PyTorch way; returns the table
    and PASS/MISS lines."""
    off, mask = deform_inputs(len(rois))
    b_out, b_x = g.nbytes, x.nbytes
    t = Table(f"deform_roi_pool (modulated, gamma 0.1), same workload, {threads} threads",
              unit="GB/s")
    times = thread_times({
        "fwd": lambda: fastnorm.deform_roi_pool(x, rois, off, PH, SCALE, SR, mask=mask),
        "gx": lambda: fastnorm.deform_roi_pool_backward(g, x, rois, None, PH, SCALE, SR),
        "all": lambda: fastnorm.deform_roi_pool_backward(g, x, rois, off, PH, SCALE, SR,
                                                         mask=mask)}, threads)
    with fastnorm.threads(threads):
        y = fastnorm.deform_roi_pool(x, rois, off, PH, SCALE, SR, mask=mask)
        t_af = timeit(lambda: fastnorm.roi_align(x, rois, PH, SCALE, SR, True))
        t_ab = timeit(lambda: fastnorm.roi_align_backward(g, rois, x.shape, PH, SCALE, SR,
                                                          True))
    t.add("forward", "fastnorm", times["fwd", threads], b_out + b_x)
    t.add("forward", "fastnorm, 1 thread (scaling check)", times["fwd", 1], b_out + b_x)
    t.add("forward", "fastnorm roi_align, same RoIs", t_af, b_out + b_x)
    t.add("backward grad_x", "fastnorm", times["gx", threads], b_out + b_x)
    t.add("backward grad_x", "fastnorm, 1 thread (scaling check)", times["gx", 1], b_out + b_x)
    t.add("backward grad_x", "fastnorm roi_align, same RoIs", t_ab, b_out + b_x)
    t.add("backward grad_x, grad_offset, grad_mask", "fastnorm", times["all", threads],
          b_out + 2 * b_x)
    t.add("backward grad_x, grad_offset, grad_mask", "fastnorm, 1 thread (scaling check)",
          times["all", 1], b_out + 2 * b_x)
    peer = torch_deform(x, rois, off, mask, threads)
    if peer is not None:
        fwd, ref, inside = peer
        err = float(np.abs(ref - y)[inside].max()) if inside.any() else float("nan")
        t.add("forward", f"torch grid_sample + avg_pool2d (max diff {err:.1e})",
              timeit(fwd, repeat=3), b_out + b_x)
    lines = []
    for name, a, b in (("forward", times["fwd", threads], t_af),
                       ("grad_x", times["gx", threads], t_ab)):
        lines.append(f"{'PASS' if a <= 1.3 * b else 'MISS'}: deform_roi_pool {name} <= 1.3x "
                     f"roi_align's on the same RoIs (got {a / b:.2f}x)")
    for name in ("fwd", "gx", "all"):
        r = times[name, 1] / times[name, threads]
        lines.append(f"{'PASS' if r >= 1.8 else 'MISS'}: deform_roi_pool {name} 1 -> {threads} "
                     f"thread scaling >= 1.8x (got {r:.2f}x)")
    return t, lines


def cuda_tables(x, rois, g):
    """fastnorm on CuPy arrays against torchvision CUDA (its autograd for the backwards), same
    inputs and timing, with the max deviation of each peer's result from ours: roi_align,
    roi_pool and ps_roi_align on their CPU workloads, multi_scale_roi_align on the pyramid."""
    dev = cuda_device()
    if dev is None:
        return []
    cupy, sync = dev
    peer = torchvision_cuda()
    tvo = None
    if peer is not None:
        torch, torchvision, ts = peer
        tvo = torchvision.ops
    xp, rp = ps_workload()
    gp = np.random.default_rng(6).standard_normal((len(rp), xp.shape[1] // (PH * PW), PH, PW),
                                                  dtype=np.float32)
    sp = 1 / 16
    cases = [   # name, x, rois, grad_out, ours(x, rois), ours_backward(g, rois, x), peer(x, rois)
        ("roi_align", x, rois, g,
         lambda a, r: fastnorm.roi_align(a, r, PH, SCALE, SR, ALIGNED),
         lambda d, r, a: fastnorm.roi_align_backward(d, r, a.shape, PH, SCALE, SR, ALIGNED),
         lambda a, r: tvo.roi_align(a, r, PH, SCALE, SR, ALIGNED)),
        ("roi_align deterministic", x, rois, g, None,
         lambda d, r, a: fastnorm.roi_align_backward(d, r, a.shape, PH, SCALE, SR, ALIGNED,
                                                     deterministic=True), None),
        ("roi_pool", x, rois, g,
         lambda a, r: fastnorm.roi_pool(a, r, PH, SCALE),
         lambda d, r, a: fastnorm.roi_pool_backward(d, r, a.shape, PH, SCALE, x=a),
         lambda a, r: tvo.roi_pool(a, r, PH, SCALE)),
        ("ps_roi_align", xp, rp, gp,
         lambda a, r: fastnorm.ps_roi_align(a, r, PH, sp, SR),
         lambda d, r, a: fastnorm.ps_roi_align_backward(d, r, a.shape, PH, sp, SR),
         lambda a, r: tvo.ps_roi_align(a, r, PH, sp, SR)),
    ]
    t = Table("RoI ops on CUDA, float32, the CPU tables' workloads (GB/s: input read + output "
              "written)", unit="GB/s")
    for name, a, r, d, fwd, bwd, peer in cases:
        ad, rd, dd = cupy.asarray(a), cupy.asarray(r), cupy.asarray(d)
        nbytes = a.nbytes + d.nbytes
        if fwd is not None:
            y = cupy.asnumpy(fwd(ad, rd))
            t.add(f"{name} forward", "fastnorm", timeit(lambda: fwd(ad, rd), sync=sync), nbytes)
            t.notes.append(f"{name} forward: " + cuda_profile(lambda: fwd(ad, rd), sync))
        t.add(f"{name} backward", "fastnorm", timeit(lambda: bwd(dd, rd, ad), sync=sync), nbytes)
        t.notes.append(f"{name} backward: " + cuda_profile(lambda: bwd(dd, rd, ad), sync))
        if peer is None or tvo is None:
            continue
        at, rt, dt = (torch.as_tensor(v, device="cuda") for v in (a, r, d))
        err = float(np.abs(peer(at, rt).cpu().numpy() - y).max())
        t.add(f"{name} forward", f"torchvision CUDA (max diff {err:.1e})",
              timeit(lambda: peer(at, rt), sync=ts), nbytes)
        ag = at.clone().requires_grad_(True)
        yt = peer(ag, rt)
        t.add(f"{name} backward", "torchvision CUDA (autograd)",
              timeit(lambda: torch.autograd.grad(yt, ag, dt, retain_graph=True), sync=ts),
              nbytes)
    feats, rois_ms = pyramid_workload()
    fd, rd = [cupy.asarray(f) for f in feats], cupy.asarray(rois_ms)
    kw = dict(spatial_scales=[0.25, 0.125, 0.0625, 0.03125], sampling_ratio=SR, aligned=False)
    gm = cupy.asarray(np.random.default_rng(5).standard_normal(
        (len(rois_ms), feats[0].shape[1], PH, PW), dtype=np.float32))
    shapes = [f.shape for f in feats]
    nbytes = sum(f.nbytes for f in feats) + gm.nbytes
    y = cupy.asnumpy(fastnorm.multi_scale_roi_align(fd, rd, PH, **kw))
    for what, fn in (("forward", lambda: fastnorm.multi_scale_roi_align(fd, rd, PH, **kw)),
                     ("backward", lambda: fastnorm.multi_scale_roi_align_backward(
                         gm, rd, shapes, PH, **kw))):
        t.add(f"multi_scale_roi_align {what}", "fastnorm", timeit(fn, sync=sync), nbytes)
        t.notes.append(f"multi_scale_roi_align {what}: " + cuda_profile(fn, sync))
    if tvo is not None:
        names = ["p2", "p3", "p4", "p5"]
        leaves = [torch.as_tensor(f, device="cuda").requires_grad_(True) for f in feats]
        rt = torch.as_tensor(rois_ms, device="cuda")
        boxes = [rt[rt[:, 0] == i, 1:] for i in range(feats[0].shape[0])]
        sizes = [IMAGE] * len(boxes)
        m = tvo.MultiScaleRoIAlign(names, PH, SR)
        fm = lambda: m(dict(zip(names, leaves)), boxes, sizes)  # noqa: E731
        yt = fm()
        err = float(np.abs(yt.detach().cpu().numpy() - y).max())
        gt = torch.as_tensor(cupy.asnumpy(gm), device="cuda")
        with torch.no_grad():
            t.add("multi_scale_roi_align forward",
                  f"torchvision MultiScaleRoIAlign CUDA (max diff {err:.1e})",
                  timeit(fm, sync=ts), nbytes)
        t.add("multi_scale_roi_align backward", "torchvision MultiScaleRoIAlign CUDA (autograd)",
              timeit(lambda: torch.autograd.grad(yt, leaves, gt, retain_graph=True), sync=ts),
              nbytes)
    return [t]


if __name__ == "__main__":
    main()
