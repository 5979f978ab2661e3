"""Benchmark: two builds of fastnorm on the same inputs, in one run (no slowdown across a change).

    python bench/compare_builds.py BEFORE [AFTER] [--threads N] [--rounds R] [--quick]
                                   [--no-write | --out DIR]

BEFORE and AFTER (default: this checkout) are source trees with their extensions built in place
(`python setup.py build_ext --inplace`; for a commit: `git worktree add /tmp/before <commit>`,
then build there). Every public CPU op is timed, float32, on tiny inputs (where the Python layer
and the dispatch dominate: per-call overhead) and on a typical detection-model size (where the
kernel does), through the public API both builds share. The builds run in two processes whose
timings of a case alternate, R times each (which goes first alternates too), so that both see
the same machine load. The table gives each build's best time and AFTER / BEFORE: of the best
times, and the median of the R paired ratios with its interquartile range (the noise of the
machine: on a shared VM it is wide, and only a ratio outside it is a change).
"""
import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys

# run in each tree: times every case, prints {case: [best seconds of each repeat]} as JSON
WORKER = r"""
import json, sys, time
import numpy as np
import fastnorm

quick, threads = sys.argv[1] == "1", int(sys.argv[2])
fastnorm.set_num_threads(threads)
rng = np.random.default_rng(0)
f32 = np.float32


def randn(*shape):
    return rng.standard_normal(shape).astype(f32)


def boxes(n, side):
    xy = rng.uniform(0, side, (n, 2))
    wh = rng.uniform(8, 64, (n, 2))
    return np.concatenate([xy, xy + wh], 1).astype(f32), rng.random(n).astype(f32)


def rois(k, side, n_img=1):
    b, _ = boxes(k, side)
    return np.concatenate([rng.integers(0, n_img, (k, 1)).astype(f32), b], 1)


def cases(size):
    # size: "tiny" (per-call overhead) or "typical"
    t = size == "tiny"
    N, C, S = (1, 8, 6) if t else (4, 256, 32)
    G = 2 if t else 32
    x = randn(N, C, S, S)
    w, b = randn(C), randn(C)
    y, mean, rstd = fastnorm.group_norm(x, G, w, b, return_stats=True)
    gy = randn(*y.shape)
    nb = 12 if t else 10_000
    bx, sc = boxes(nb, 48 if t else 3000)
    cls = rng.integers(0, 4, nb)
    k = 2 if t else 512
    r = rois(k, 4 * S, N)
    ra = fastnorm.roi_align(x, r, 7, 0.25, 2, True)
    gra = randn(*ra.shape)
    Cp = 2 * 49 if t else 10 * 49
    xp = randn(N, Cp, S, S)
    Cd = 4 if t else 64
    xd, wd = randn(N, Cd, S, S), randn(Cd, Cd, 3, 3) * 0.1
    off, msk = randn(N, 18, S, S), rng.random((N, 9, S, S)).astype(f32)
    yd = fastnorm.deform_conv2d(xd, off, wd, mask=msk, padding=1)
    gyd = randn(*yd.shape)
    nm = 12 if t else 1000
    return {
        "group_norm": lambda: fastnorm.group_norm(x, G, w, b),
        "group_norm silu": lambda: fastnorm.group_norm(x, G, w, b, activation="silu"),
        "group_norm_backward": lambda: fastnorm.group_norm_backward(gy, x, mean, rstd, G, w, b),
        "nms": lambda: fastnorm.nms(bx, sc, 0.5),
        "batched_nms": lambda: fastnorm.batched_nms(bx, sc, cls, 0.5),
        "soft_nms": lambda: fastnorm.soft_nms(bx[:nm], sc[:nm]),
        "matrix_nms": lambda: fastnorm.matrix_nms(bx[:nm], sc[:nm]),
        "box_iou giou": lambda: fastnorm.box_iou(bx[:nm], bx[:nm], metric="giou"),
        "roi_align": lambda: fastnorm.roi_align(x, r, 7, 0.25, 2, True),
        "roi_align_backward": lambda: fastnorm.roi_align_backward(
            gra, r, x.shape, 7, 0.25, 2, True),
        "roi_pool": lambda: fastnorm.roi_pool(x, r, 7, 0.25),
        "ps_roi_align": lambda: fastnorm.ps_roi_align(xp, r, 7, 0.25, 2),
        "deform_roi_pool": lambda: fastnorm.deform_roi_pool(x, r, None, 7, 0.25, 2),
        "deform_conv2d": lambda: fastnorm.deform_conv2d(xd, off, wd, mask=msk, padding=1),
        "deform_conv2d_backward": lambda: fastnorm.deform_conv2d_backward(
            gyd, xd, off, wd, mask=msk, padding=1),
    }


SIZES = ("tiny",) if quick else ("tiny", "typical")
CASES = {f"{name} ({size})": fn for size in SIZES for name, fn in cases(size).items()}
calls = {}                               # case: calls per timing, so that one lasts min_time
min_time = float(sys.argv[3])
print(json.dumps(list(CASES)), flush=True)
for line in sys.stdin:                   # one case name per line: its seconds per call
    case = line.strip()
    fn = CASES[case]
    if case not in calls:
        fn()
        n = 1
        while True:
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            if time.perf_counter() - t0 >= min_time:
                break
            n *= 2
        calls[case] = n
    n = calls[case]
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    print((time.perf_counter() - t0) / n, flush=True)
"""


class Worker:
    """A process importing fastnorm from ``tree``, with the cases' inputs made; ``time(case)``:
    seconds per call of one timing."""

    def __init__(self, tree, quick, threads, min_time):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [tree] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
        code = "import fastnorm, os, sys; sys.exit(0 if os.path.samefile(" \
               "os.path.dirname(os.path.dirname(fastnorm.__file__)), sys.argv[1]) else 1)"
        if subprocess.run([sys.executable, "-c", code, tree], env=env, cwd=tree).returncode:
            raise SystemExit(f"{tree}: `import fastnorm` there does not load its own tree")
        self.tree = tree
        self.p = subprocess.Popen([sys.executable, "-c", WORKER, "1" if quick else "0",
                                   str(threads), str(min_time)], env=env, cwd=tree,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.cases = json.loads(self._line())

    def _line(self):
        line = self.p.stdout.readline()
        if not line:
            raise SystemExit(f"{self.tree}: the timing worker failed (its error is above)")
        return line

    def time(self, case):
        self.p.stdin.write(case + "\n")
        self.p.stdin.flush()
        return float(self._line())

    def close(self):
        self.p.stdin.close()
        self.p.wait()


def commit(tree):
    r = subprocess.run(["git", "-C", tree, "describe", "--always", "--dirty"],
                       capture_output=True, text=True)
    return r.stdout.strip() or "?"


def compare(before, after, rounds, quick, threads):
    """{case: (best before, best after, [after / before of each round])}: the two builds'
    timings of a case alternate (which goes first alternates too), so that both see the same
    machine load."""
    workers = [Worker(t, quick, threads, 0.005 if quick else 0.03) for t in (before, after)]
    out = {}
    try:
        for case in workers[0].cases:
            t = [[], []]
            for i in range(rounds):
                for k in (0, 1) if i % 2 == 0 else (1, 0):
                    t[k].append(workers[k].time(case))
            out[case] = (min(t[0]), min(t[1]), [a / b for b, a in zip(*t)])
    finally:
        for w in workers:
            w.close()
    return out


def markdown(result, before, after, threads, rounds):
    from fastnorm._bench import machine
    lines = ["# compare-builds", "", f"Date: {datetime.date.today().isoformat()}", "",
             f"Machine: {machine()}", "",
             f"BEFORE: {commit(before)}; AFTER: {commit(after)}; {threads} thread(s), "
             f"{rounds} alternating timings per case, float32, CPU.", "",
             "| case | before (us) | after (us) | after / before, best | paired: median "
             "(quartiles) |", "|---|---|---|---|---|"]
    for case, (b, a, ratios) in result.items():
        q1, q2, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        lines.append(f"| {case} | {b * 1e6:.1f} | {a * 1e6:.1f} | {a / b:.2f} | "
                     f"{q2:.2f} ({q1:.2f}-{q3:.2f}) |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("before", help="source tree of the build before the change")
    p.add_argument("after", nargs="?", help="source tree after it (default: this checkout)")
    p.add_argument("--threads", type=int, default=2, metavar="N", help="threads (default: 2)")
    p.add_argument("--rounds", type=int, default=15, metavar="R",
                   help="timings of each case per build, alternating (default: 15)")
    p.add_argument("--quick", action="store_true", help="tiny inputs only, short repeats")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--no-write", action="store_true", help="print the table only")
    where.add_argument("--out", metavar="DIR", help="write the table to DIR (default: "
                                                    "results/ beside this script)")
    args = p.parse_args(argv)
    if args.threads < 1 or args.rounds < 1:
        p.error("--threads and --rounds must be >= 1")
    here = os.path.dirname(os.path.abspath(__file__))
    before = os.path.abspath(args.before)
    after = os.path.abspath(args.after or os.path.dirname(here))
    result = compare(before, after, args.rounds, args.quick, args.threads)
    text = markdown(result, before, after, args.threads, args.rounds)
    print(text)
    out = None if args.no_write else args.out or os.path.join(here, "results")
    if out:
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, f"{datetime.date.today().isoformat()}-compare-builds.md")
        with open(path, "w") as f:
            f.write(text + "\n")
    return result


if __name__ == "__main__":
    main()
