"""CUDA cost model: what each GPU design costs on an H100, measured without a GPU.

    python bench/bench_cuda_model.py [--no-write | --out DIR] [--json PATH] [--quick]

Every case runs fastnorm's unmodified CUDA launchers and kernels on the CUDA emulator
(``fastnorm._cuda.emulator``), whose ``counting()`` logs per kernel launch the blocks and threads
launched, the ``__syncthreads()`` each block completes, the warp-synchronous calls and the atomic
operations (``emulator.Launch``), plus the host synchronisations. Beside those counts the table
gives the DRAM bytes and FLOPs the design needs (from its formula: inputs read once, outputs and
intermediates written and read once) and the H100 time they imply, next to the peers' published
H100 figures. It is a lower bound: the sum of

* ``LAUNCH_S`` per kernel launch and per other CuPy device operation (``ops``: elementwise
  operations, sorts, scans, fancy indexing, fills and copies, each a kernel or memset on a GPU)
  and ``SYNC_S`` per host synchronisation (host overhead),
* max(DRAM bytes / ``HBM_BPS``, FLOPs / ``FP32_FLOPS``) (the roofline),
* per launch, max(atomics / ``ATOMIC_RATE``, serial barrier chain x ``BARRIER_S``): a block's
  barriers are serial (each waits for the slowest thread and, in the sweeps, a dependent global
  load); blocks in the same wave run theirs side by side, so the chain is the barriers per block
  times the waves (``blocks / (SMS * BLOCKS_PER_SM)``, rounded up);

loops inside a thread are not counted: where a design's threads are few (``occupancy``: threads
launched / the 270k an H100 keeps resident) and loop long (the row-owner deterministic RoIAlign
backward: each thread scans every RoI x bin pair of its image), the real time can be far above
the bound, so a bound is never compared with a peer's time as a speed-up. Use the counts to
compare designs (barriers per call before and after a sweep change, atomics of the atomic vs
the deterministic backward); a GPU measures the times (``.ci/gpu-session bench``).

Cases (counted on the emulator at the sizes given; ``scale`` multiplies counts that grow linearly
with channels when a case is counted on fewer channels than its workload):

* ``nms``: 10k boxes (uniform centres on a 1000 x 1000 image, sides 10..100 px), IoU 0.5, one
  class; ``batched_nms``: the same boxes in 80 classes (torchvision's benchmark of vision#8925:
  batched_nms 10k boxes / 80 classes 1.41 ms on an H100).
* ``roi_align`` backward on the FPN P2 workload (bench_roi_ops.py: 2 x 256 x 200 x 272, 1000
  RoIs, 7x7, sampling_ratio 2): atomic, deterministic (records sorted by pixel + one block per
  tile of grad_x) and the deterministic row-owner kernel it falls back to over its workspace
  limit; counted on 1 channel, scale 256 (the records' kernels: 1, they serve every channel).
* ``roi_pool`` backward on the same workload (7x7, spatial_scale 0.25): atomic, deterministic
  (one record per (RoI, channel, bin) keyed by its argmax pixel, sorted, then one thread per
  grad_x element) and the row-owner fallback; counted on 1 channel, scale 256.
* ``group_norm`` forward, (8, 256, 64, 64) float32, 32 groups, counted on batch 1, scale 8.
* ``deform_conv2d`` (DCNv2) forward and backward, (2, 64, 64, 64) 3x3 -> 64, float32 and float16:
  the GEMM FLOPs from the cuBLAS calls the emulator logs, float16 at the tensor-core rate
  ``FP16_TC_FLOPS``.
"""
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fastnorm  # noqa: E402
from fastnorm._bench import Table, bench_args, finish  # noqa: E402

# the H100 (SXM) the model implies times for
HBM_BPS = 3.0e12          # ~90% of the 3.35 TB/s HBM3 peak
FP32_FLOPS = 67e12        # SIMT float32 (no tensor cores)
FP16_TC_FLOPS = 989e12    # float16 / bfloat16 tensor cores, float32 accumulation (dense)
SMS, BLOCKS_PER_SM, RESIDENT_THREADS = 132, 8, 132 * 2048
LAUNCH_S = 3e-6           # back-to-back kernel launch from Python (CuPy) per kernel
SYNC_S = 10e-6            # one device-to-host synchronisation (a read-back)
BARRIER_S = 0.15e-6       # one step of a block's serial barrier chain
ATOMIC_RATE = 3e11        # float atomics to distinct addresses, per second (L2)

# peers' published H100 figures (seconds), by case
PUBLISHED = {
    "batched_nms 10k boxes, 80 classes": ("torchvision batched_nms (vision#8925)", 1.41e-3),
}


def scaled(scale, e):
    """The ``scale`` of launch ``e``: a number, or a function of the launch (kernels whose work
    does not grow with the channels)."""
    return scale(e) if callable(scale) else scale


def implied(log, syncs, nbytes, flops, scale=1, ops=0, rate=FP32_FLOPS):
    """The model's H100 time (see the docstring) of one call that made the launches ``log``,
    ``ops`` other CuPy device operations and ``syncs`` host synchronisations; its FLOPs run at
    ``rate`` (float32 SIMT, or tensor cores for half GEMMs)."""
    t = (len(log) + ops) * LAUNCH_S + syncs * SYNC_S + max(nbytes / HBM_BPS, flops / rate)
    for e in log:
        blocks = e.blocks * scaled(scale, e)
        waves = max(1, math.ceil(blocks / (SMS * BLOCKS_PER_SM)))
        chain = e.barriers / max(e.blocks, 1) * waves
        t += max(e.atomics * scaled(scale, e) / ATOMIC_RATE, chain * BARRIER_S)
    return t


def count(emu, call):
    """The counts of a warm call (the first one compiles kernels and fills caches)."""
    call()
    with emu.counting() as c:
        call()
    return c


def nms_cases(emu, rng, n=10_000):
    xy = rng.uniform(0, 1000, (n, 2))
    wh = rng.uniform(10, 100, (n, 2))
    b = emu.asarray(np.concatenate([xy, xy + wh], 1).astype(np.float32))
    s = emu.asarray(rng.uniform(0, 1, n).astype(np.float32))
    cls = rng.integers(0, 80, n)
    words = -(-n // 64)
    # the mask: one 64-bit word per (box, 64-box column block) of the pairs it compares
    per_class = sum(int(m) * -(-int(m) // 64) for m in np.bincount(cls, minlength=80)) * 8
    yield ("nms 10k boxes", count(emu, lambda: fastnorm.nms(b, s, 0.5)),
           n * 20 + n * words * 8 * 2, n * n * 0.5 * 20, 1)
    c = emu.asarray(cls)
    yield ("batched_nms 10k boxes, 80 classes",
           count(emu, lambda: fastnorm.batched_nms(b, s, c, 0.5)),
           n * 28 + per_class * 2, sum(int(m) ** 2 for m in np.bincount(cls)) * 0.5 * 20, 1)


def roi_cases(emu, rng):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_roi_ops import workload
    from fastnorm._cuda import roi_ops as cuda_roi_ops
    x, rois = workload()
    C, K, nb = 256, len(rois), 49
    g = emu.asarray(rng.standard_normal((K, 1, 7, 7)).astype(np.float32))
    r = emu.asarray(rois)
    nbytes = (K * C * nb + 2 * C * 200 * 272) * 4       # grad_out read, grad_x written
    flops = K * nb * 4 * 4 * C * 2                       # 4 samples x 4 corners x C, mul-add
    records = K * nb * 4 * 72          # the tiled backward's records, written, sorted, read

    def call(det):
        return lambda: fastnorm.roi_align_backward(g, r, (2, 1, 200, 272), 7, 0.25, 2, True,
                                                   deterministic=det)
    yield "roi_align backward FPN P2, atomic", count(emu, call(False)), nbytes, flops, C
    # the records do not depend on the channels: only the tiles scale with them
    yield ("roi_align backward FPN P2, deterministic (records + tiles)", count(emu, call(True)),
           nbytes + records, flops, lambda e: C if "align_bwd_tile" in e.kernel else 1)
    limit = cuda_roi_ops.DET_WORKSPACE_BYTES
    cuda_roi_ops.DET_WORKSPACE_BYTES = 0               # the row-owner kernel it falls back to
    try:
        c = count(emu, call(True))
    finally:
        cuda_roi_ops.DET_WORKSPACE_BYTES = limit
    yield "roi_align backward FPN P2, deterministic row-owner fallback", c, nbytes, flops, C
    # roi_pool backward on the same RoIs, 7x7, spatial_scale 0.25: every kernel scales with C
    x1 = emu.asarray(np.ascontiguousarray(x[:, :1]))
    nbytes = (K * C * nb + 2 * 2 * C * 200 * 272) * 4   # grad_out, x read; grad_x written
    records = K * C * nb * 32          # keys written, sorted (read, written), read by the gather

    def pool(det):
        return lambda: fastnorm.roi_pool_backward(g, r, x1.shape, 7, 0.25, x=x1,
                                                  deterministic=det)
    yield "roi_pool backward FPN P2, atomic", count(emu, pool(False)), nbytes, 0, C
    yield ("roi_pool backward FPN P2, deterministic (records + gather)", count(emu, pool(True)),
           nbytes + records, 0, C)
    cuda_roi_ops.DET_WORKSPACE_BYTES = 0
    try:
        c = count(emu, pool(True))
    finally:
        cuda_roi_ops.DET_WORKSPACE_BYTES = limit
    yield "roi_pool backward FPN P2, deterministic row-owner fallback", c, nbytes, 0, C


def gn_cases(emu, rng):
    x = emu.asarray(rng.standard_normal((1, 256, 64, 64)).astype(np.float32))
    nbytes = 8 * 256 * 64 * 64 * 4 * 3                   # read twice (stats, apply), write once
    yield ("group_norm forward (8, 256, 64, 64)", count(emu, lambda: fastnorm.group_norm(x, 32)),
           nbytes, 8 * 256 * 64 * 64 * 8, 8)


def dcn_cases(emu, rng, N=2, C=64, H=64, W=64, O=64):
    """deform_conv2d 3x3 (DCNv2: offsets and mask), float32 and float16, forward and backward:
    the GEMMs' FLOPs from the cuBLAS calls the emulator logs (float16 on tensor cores); DRAM:
    inputs and outputs once, the column buffer written and read (backward: the columns and the
    column gradient over them)."""
    HW, K = H * W, 9
    for dt in (np.float32, np.float16):
        isz = np.dtype(dt).itemsize
        x = emu.asarray(rng.standard_normal((N, C, H, W)).astype(dt))
        off = emu.asarray((rng.standard_normal((N, 2 * K, H, W)) * 0.5).astype(dt))
        m = emu.asarray(rng.uniform(0, 1, (N, K, H, W)).astype(dt))
        w = emu.asarray((rng.standard_normal((O, C, 3, 3)) * 0.05).astype(dt))
        g = emu.asarray(rng.standard_normal((N, O, H, W)).astype(dt))
        io = (N * (C + 3 * K) * HW + O * C * K) * isz        # x, offsets, mask, weight
        cols = N * C * K * HW * isz
        rate = FP16_TC_FLOPS if dt == np.float16 else FP32_FLOPS
        for name, call, nbytes in (
                ("forward", lambda: fastnorm.deform_conv2d(x, off, w, mask=m, padding=1),
                 io + N * O * HW * isz + 2 * cols),
                ("backward", lambda: fastnorm.deform_conv2d_backward(g, x, off, w, mask=m,
                                                                    padding=1),
                 2 * io + N * O * HW * isz + 4 * cols)):
            c = count(emu, call)
            flops = sum(2 * e.m * e.n * e.k * e.batch for e in c.gemms)
            yield (f"deform_conv2d {name} ({N}, {C}, {H}, {W}) 3x3 -> {O}, {np.dtype(dt).name}",
                   c, nbytes, flops, 1, rate)


def main(argv=None):
    args = bench_args(__doc__, __file__, argv, quick=True)
    from fastnorm._cuda import emulator as emu
    rng = np.random.default_rng(0)
    t = Table("CUDA cost model: implied H100 time, a lower bound (see the docstring; GB/s: the "
              "design's DRAM bytes over it)", unit="GB/s")
    lines = ["| case | launches (kernels + cuBLAS GEMMs) | CuPy ops | host syncs | blocks | threads | occupancy | barriers per "
             "block (max) | atomics | DRAM MB | GFLOP | implied H100 us (bound) | peer, "
             "published H100 |", "|---" * 13 + "|"]
    cases = [nms_cases(emu, rng)] + ([] if getattr(args, "quick", False) else
                                     [roi_cases(emu, rng), gn_cases(emu, rng),
                                      dcn_cases(emu, rng)])
    for gen in cases:
        for name, c, nbytes, flops, scale, *rate in gen:
            sec = implied(c.log, c.syncs, nbytes, flops, scale, c.ops + len(c.gemms), *rate)
            t.add(name, "fastnorm", sec, nbytes)
            who, peer_s = PUBLISHED.get(name, (None, None))
            peer = f"{who}: {peer_s * 1e3:.2f} ms" if who else ""
            blocks, threads, atomics = (sum(getattr(e, f) * scaled(scale, e) for e in c.log)
                                        for f in ("blocks", "threads", "atomics"))
            chain = max((e.barriers / max(e.blocks, 1) for e in c.log), default=0)
            lines.append(
                f"| {name} | {c.launches + len(c.gemms)} | {c.ops} | {c.syncs} | {blocks} | "
                f"{threads} | "
                f"{threads / RESIDENT_THREADS:.0%} | {chain:.0f} | {atomics} | "
                f"{nbytes / 1e6:.1f} | {flops / 1e9:.2f} | {sec * 1e6:.0f} | {peer} |")
            for e in c.log:
                k = scaled(scale, e)
                lines.append(f"| &nbsp; {e.kernel} | 1 | | | {e.blocks * k} | "
                             f"{e.threads * k} | | {e.barriers / max(e.blocks, 1):.0f} | "
                             f"{e.atomics * k} | | | | |")
    notes = ("Counts per call (emulator; `scale` applied), model constants: HBM "
             f"{HBM_BPS / 1e12:.1f} TB/s, FP32 {FP32_FLOPS / 1e12:.0f} TFLOP/s, launch "
             f"{LAUNCH_S * 1e6:.0f} us, host sync {SYNC_S * 1e6:.0f} us, barrier step "
             f"{BARRIER_S * 1e9:.0f} ns, atomics {ATOMIC_RATE / 1e9:.0f} G/s, {SMS} SMs.\n\n"
             + "\n".join(lines))
    return finish(args, "cuda_model", [t], notes)


if __name__ == "__main__":
    main()
