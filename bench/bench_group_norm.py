"""GroupNorm benchmark: fastnorm vs PyTorch (F.group_norm, autograd) and ONNX Runtime
(GroupNormalization, opset 21), same inputs, same thread count, NCHW and channels-last, float32.

    python bench/bench_group_norm.py [--threads N] [--quick] [--no-write | --out DIR]

Reports time, speed-up of fastnorm over each peer, achieved GB/s (bytes read + written by one
call) and the percentage of the measured copy bandwidth, then checks the issue's CPU targets.
--threads (default 2) is the thread count of fastnorm, PyTorch and ONNX Runtime alike.
fastnorm's large outputs come from its output cache (README, "Memory"); the forward table also
shows fastnorm with the cache off, paying fresh-page faults and zeroing on every call as the
peers do. The implementations of one case are timed in interleaved rounds (best of each), so a
slow period of a shared machine does not favour one of them.
On a machine with CuPy and a GPU the CUDA table (vs torch CUDA) is added.
"""
import os
import sys

import numpy as np

import fastnorm
from fastnorm._bench import (Table, bench_args, copy_bandwidth, cuda_device, cuda_profile, finish,
                             onnx_op, timeit, timeit_many)

SHAPES = [((8, 256, 64, 64), 32), ((1, 512, 128, 128), 32), ((2, 64, 8, 56, 56), 32),
          ((1, 64, 256, 256), 2)]
LARGE = SHAPES[:2]


def _name(shape, G, cl):
    return f"{'x'.join(map(str, shape))} G{G} {'NHWC' if cl else 'NCHW'}"


def cpu_tables(threads, quick=False):
    try:
        import torch
        torch.set_num_threads(threads)
    except ImportError:
        torch = None
    fastnorm.set_num_threads(threads)
    ceiling = copy_bandwidth()
    fwd = Table(f"GroupNorm forward, float32, CPU, {threads} threads", "GB/s", ceiling)
    fb = Table(f"GroupNorm forward+backward, float32, CPU, {threads} threads", "GB/s", ceiling)
    rng = np.random.default_rng(0)
    checks = []
    for shape, G in (SHAPES[:1] if quick else SHAPES):
        C = shape[1]
        x = rng.standard_normal(shape, dtype=np.float32)
        w = rng.standard_normal(C, dtype=np.float32)
        b = rng.standard_normal(C, dtype=np.float32)
        dy = rng.standard_normal(shape, dtype=np.float32)
        for cl in (False, True):
            xs = np.ascontiguousarray(np.moveaxis(x, 1, -1)) if cl else x
            dys = np.ascontiguousarray(np.moveaxis(dy, 1, -1)) if cl else dy
            case = _name(shape, G, cl)
            limit = fastnorm._memory.cache_limit()

            def fwd_ours():
                return fastnorm.group_norm(xs, G, w, b, channels_last=cl)

            def fwd_fresh():                   # every call gets fresh pages, as the peers do
                fastnorm.set_cache_limit(0)
                try:
                    return fwd_ours()
                finally:
                    fastnorm.set_cache_limit(limit)

            def fb_ours():
                y, m, r = fastnorm.group_norm(xs, G, w, b, channels_last=cl, return_stats=True)
                fastnorm.group_norm_backward(dys, xs, m, r, G, w, b, channels_last=cl)
            fwd_fns = {"fastnorm": fwd_ours, "fastnorm, output cache off": fwd_fresh}
            fb_fns = {"fastnorm": fb_ours}
            if torch is not None:
                fmt = (torch.channels_last if x.ndim == 4 else torch.channels_last_3d) if cl \
                    else torch.contiguous_format
                xt = torch.from_numpy(x).contiguous(memory_format=fmt)
                wt, bt = torch.from_numpy(w), torch.from_numpy(b)
                dyt = torch.from_numpy(dy).contiguous(memory_format=fmt)
                xg = xt.clone().requires_grad_()
                wg, bg = wt.clone().requires_grad_(), bt.clone().requires_grad_()

                def fwd_torch():
                    with torch.no_grad():
                        return torch.nn.functional.group_norm(xt, G, wt, bt)

                def fb_torch():
                    torch.nn.functional.group_norm(xg, G, wg, bg).backward(dyt)
                    xg.grad = wg.grad = bg.grad = None
                fwd_fns["torch"] = fwd_torch
                fb_fns["torch autograd"] = fb_torch
            run = None if cl else onnx_op("GroupNormalization", {"x": x, "s": w, "b": b},
                                          dict(num_groups=G, epsilon=1e-5), 21, threads)
            if run is not None:
                fwd_fns["onnxruntime"] = run
            t_fwd = timeit_many(fwd_fns)       # interleaved rounds: see fastnorm._bench
            t_fb = timeit_many(fb_fns)
            for name, t in t_fwd.items():
                fwd.add(case, name, t, 2 * x.nbytes)
            for name, t in t_fb.items():
                fb.add(case, name, t, 5 * x.nbytes)
            if torch is not None:
                t_ours, t_torch = t_fwd["fastnorm"], t_fwd["torch"]
                big = (shape, G) in LARGE
                checks.append((f"fwd {case}: >= {'2' if big else '1'}x torch",
                               t_torch / t_ours >= (2.0 if big else 1.0)))
                checks.append((f"fwd+bwd {case}: >= 2x torch autograd",
                               t_fb["torch autograd"] / t_fb["fastnorm"] >= 2.0))
                if big:
                    checks.append((f"fwd {case}: >= 60% of copy bandwidth",
                                   2 * x.nbytes / t_ours / 1e9 >= 0.6 * ceiling))
    if torch is not None:
        _silu_rows(torch, fwd, fb, rng)
    return [fwd, fb], checks


def _silu_rows(torch, fwd, fb, rng):
    """GroupNorm + SiLU (the diffusion-UNet block): fastnorm's fused activation vs torch's
    group_norm followed by silu, forward and forward+backward, on the first shape."""
    (shape, G), F = SHAPES[0], torch.nn.functional
    x = rng.standard_normal(shape, dtype=np.float32)
    w, b = rng.standard_normal(shape[1], dtype=np.float32), rng.standard_normal(shape[1],
                                                                                dtype=np.float32)
    dy = rng.standard_normal(shape, dtype=np.float32)
    case = _name(shape, G, False) + " + SiLU"

    def fb_ours():
        y, m, r = fastnorm.group_norm(x, G, w, b, activation="silu", return_stats=True)
        fastnorm.group_norm_backward(dy, x, m, r, G, w, b, activation="silu")
    xt, wt, bt, dyt = (torch.from_numpy(a) for a in (x, w, b, dy))
    xg, wg, bg = (t.clone().requires_grad_() for t in (xt, wt, bt))

    def fwd_torch():
        with torch.no_grad():
            return F.silu(F.group_norm(xt, G, wt, bt))

    def fb_torch():
        F.silu(F.group_norm(xg, G, wg, bg)).backward(dyt)
        xg.grad = wg.grad = bg.grad = None
    t_fwd = timeit_many({"fastnorm": lambda: fastnorm.group_norm(x, G, w, b, activation="silu"),
                         "torch": fwd_torch})
    t_fb = timeit_many({"fastnorm": fb_ours, "torch autograd": fb_torch})
    for name, t in t_fwd.items():
        fwd.add(case, name, t, 2 * x.nbytes)
    for name, t in t_fb.items():
        fb.add(case, name, t, 5 * x.nbytes)


def cuda_tables(quick=False):
    dev = cuda_device()
    try:
        import torch
        if dev is None or not torch.cuda.is_available():
            return [], []
    except ImportError:
        return [], []
    cp, sync = dev
    ceiling = copy_bandwidth(1 << 30, xp=cp, sync=sync)
    tables, checks = [], []
    for dtype in ("float32", "float16", "bfloat16"):
        tdt = getattr(torch, dtype)
        fwd = Table(f"GroupNorm forward, {dtype}, CUDA", "GB/s", ceiling)
        fb = Table(f"GroupNorm forward+backward, {dtype}, CUDA", "GB/s", ceiling)
        for shape, G in (SHAPES[:1] if quick else SHAPES):
            for cl in (False, True):
                fmt = (torch.channels_last if len(shape) == 4 else torch.channels_last_3d) \
                    if cl else torch.contiguous_format
                xt = torch.randn(shape, device="cuda", dtype=tdt).contiguous(memory_format=fmt)
                wt = torch.randn(shape[1], device="cuda", dtype=tdt)
                bt = torch.randn(shape[1], device="cuda", dtype=tdt)
                dyt = torch.randn_like(xt)
                xs = xt.movedim(1, -1) if cl else xt     # the (N, *S, C) view of the same memory
                dys = dyt.movedim(1, -1) if cl else dyt
                nbytes = xt.numel() * xt.element_size()
                case = _name(shape, G, cl)
                t_ours = timeit(lambda: fastnorm.group_norm(xs, G, wt, bt, channels_last=cl),
                                sync=sync)
                with torch.no_grad():
                    t_torch = timeit(lambda: torch.nn.functional.group_norm(xt, G, wt, bt),
                                     sync=sync)
                fwd.add(case, "fastnorm", t_ours, 2 * nbytes)
                fwd.add(case, "torch", t_torch, 2 * nbytes)

                def fb_ours():
                    y, m, r = fastnorm.group_norm(xs, G, wt, bt, channels_last=cl,
                                                  return_stats=True)
                    fastnorm.group_norm_backward(dys, xs, m, r, G, wt, bt, channels_last=cl)
                xg = xt.clone().requires_grad_()
                wg, bg = wt.clone().requires_grad_(), bt.clone().requires_grad_()

                def fb_torch():
                    torch.nn.functional.group_norm(xg, G, wg, bg).backward(dyt)
                    xg.grad = wg.grad = bg.grad = None
                fwd.notes.append(f"{case} fastnorm: " + cuda_profile(
                    lambda: fastnorm.group_norm(xs, G, wt, bt, channels_last=cl), sync))
                fb.notes.append(f"{case} fastnorm: " + cuda_profile(fb_ours, sync))
                t_ours_fb = timeit(fb_ours, sync=sync)
                t_torch_fb = timeit(fb_torch, sync=sync)
                fb.add(case, "fastnorm", t_ours_fb, 5 * nbytes)
                fb.add(case, "torch autograd", t_torch_fb, 5 * nbytes)
                checks.append((f"CUDA {dtype} fwd {case}: >= torch", t_torch >= t_ours))
                checks.append((f"CUDA {dtype} fwd+bwd {case}: >= torch", t_torch_fb >= t_ours_fb))
                if (shape, G) in LARGE:
                    checks.append((f"CUDA {dtype} fwd {case}: >= 75% of DRAM bandwidth",
                                   2 * nbytes / t_ours / 1e9 >= 0.75 * ceiling))
        tables += [fwd, fb]
    return tables, checks


def main(argv=None):
    args = bench_args(__doc__, __file__, argv, quick=True)
    tables, checks = ([], []) if args.cuda_only else cpu_tables(args.threads, args.quick)
    t2, c2 = cuda_tables(args.quick)
    tables += t2
    checks += c2
    notes = "Targets:\n\n" + "\n".join(f"- {'PASS' if ok else 'MISS'} {what}"
                                       for what, ok in checks)
    return finish(args, f"group_norm-{'cuda' if t2 else 'cpu'}", tables, notes)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
