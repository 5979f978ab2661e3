"""Benchmark: fastnorm nms / batched_nms vs torchvision, ONNX Runtime NonMaxSuppression and
OpenCV cv2.dnn.NMSBoxes, float32, clustered random boxes, --threads threads for every
implementation (default 2); the NMS variants beside nms and their NumPy loops; combined_nms at a
YOLO head's size vs ONNX Runtime NonMaxSuppression + top-k; box_iou_rotated and nms_rotated vs
OpenCV (rotatedRectangleIntersection, dnn.NMSBoxesRotated) and shapely, with the IoU agreement.

    python bench/bench_nms.py [--threads N] [--torchvision-python PATH] [--no-write | --out DIR]

Run it in the environment that has fastnorm built (plus onnxruntime, onnx and
opencv-python-headless and shapely for those peers). torchvision is timed in this process when it imports
here; otherwise in the interpreter named by --torchvision-python or $FASTNORM_TV_PYTHON (a second
environment, see the README's "Benchmarks"), as a subprocess on the very same inputs saved as
.npy files. Every CPU peer's output is checked against fastnorm's (same kept indices) before it
is timed; on CUDA, fastnorm's kept set is checked against its CPU backend's and torchvision
CUDA's differences from it are counted in the table. The Mbox/s column counts input boxes per
second / 1e6.
"""
import os
import tempfile

import numpy as np

import fastnorm
from fastnorm._bench import (Table, bench_args, cuda_device, cuda_profile, finish, onnx_op,
                             run_torchvision, timeit, torchvision_cuda)

IOU = 0.5
SIZES = (1000, 10_000, 50_000, 100_000)
TARGETS = {("nms", 10_000): {"torchvision": 10, "onnxruntime": 3},
           ("nms", 50_000): {"torchvision": 10, "onnxruntime": 3},
           ("batched", 20_000): {"torchvision": 2}}


def clustered_boxes(n, seed=0, per_cluster=16, rotated=False):
    """Detector-like output: clusters of ~16 jittered boxes (16..120 px) around random objects in
    an image whose side grows as sqrt(n) (constant density); uniform scores. ``rotated``: the
    boxes as (cx, cy, w, h, angle), one orientation per cluster, uniform in [-90, 90) degrees,
    jittered by +-5 degrees per box (counter-clockwise, fastnorm's default convention)."""
    rng = np.random.default_rng(seed)
    k = max(1, n // per_cluster)
    side = 32.0 * np.sqrt(n)
    centres = rng.uniform(0, side, (k, 2))
    sizes = rng.uniform(16, 96, (k, 2))
    c = rng.integers(0, k, n)
    ctr = centres[c] + rng.normal(0, 0.1, (n, 2)) * sizes[c]
    wh = sizes[c] * rng.uniform(0.8, 1.25, (n, 2))
    scores = rng.random(n).astype(np.float32)
    if rotated:
        angle = rng.uniform(-90, 90, k)[c] + rng.uniform(-5, 5, n)
        return np.concatenate([ctr, wh, angle[:, None]], 1).astype(np.float32), scores
    return np.concatenate([ctr - wh / 2, ctr + wh / 2], 1).astype(np.float32), scores


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
    if args.cuda_only:
        return finish(args, "nms-cuda", cuda_tables(inputs))
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
    tables, lines = [table], []
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
             ". 'Mbox/s' = input boxes per second / 1e6.")
    for more in (variant_table, combined_table, lambda th: rotated_table(th, cv2)):
        t, more_lines = more(threads)
        tables.append(t)
        lines += more_lines
    notes += VARIANT_NOTES + ROTATED_NOTES + "\n\nTargets:\n" + "\n".join(lines)
    tables += cuda_tables(inputs)
    return finish(args, "nms", tables, notes)


# ---------------------------------------------------------------- the variants beside nms

VARIANT_SIZES = (1000, 10_000, 50_000)
NUMPY_MAX = {"hard": 50_000, "soft": 10_000}    # largest n the NumPy loops are timed at
HARD = ("iou_guided_nms", "adaptive_nms hard")  # the target: within 2x of nms at 10k
SIGMA_T = 0.05                                  # softer_nms' vote width in the bench
VARIANT_NOTES = (
    "\n\nNMS variants: the same clustered boxes as nms_<n>, with localization confidences "
    "uniform in [0.3, 1), densities in [0, 0.8) and coordinate variances in [0.5, 4); the "
    "'fastnorm nms, same input' row's ratio below 1 is how much slower the variant is than nms. "
    "'NumPy loop' is the textbook loop of each paper's algorithm, vectorised over the remaining "
    "boxes (float64), checked to keep the same boxes; timed up to 50k boxes for the greedy "
    "loops, 10k for the soft ones (one selection per box: O(n^2)). The 'within 2x of nms' "
    "target covers the greedy variants (iou_guided_nms, adaptive_nms hard); softer_nms 'hard' "
    "also votes every selection over its overlapping boxes, and is not held to it. "
    "combined_nms: ONNX Runtime's "
    "NonMaxSuppression takes scores as (B, C, N), transposed outside the timing; its per-image "
    "top-k runs in NumPy inside; the kept (image, class, box) triples are checked equal.")


def variant_inputs(n):
    """The clustered boxes and scores of nms_<n>, plus each variant's further per-box input:
    localization confidences, densities (up to 0.8), and coordinate variances."""
    b, s = clustered_boxes(n)
    rng = np.random.default_rng(3)
    return dict(boxes=b, scores=s, localization=rng.uniform(0.3, 1.0, n).astype(np.float32),
                densities=rng.uniform(0.0, 0.8, n).astype(np.float32),
                variances=rng.uniform(0.5, 4.0, (n, 4)).astype(np.float32))


def _variants(d):
    """name -> (fastnorm call, its NumPy loop, "hard"/"soft"): the same computation."""
    b, s, loc, dens, var = (d[k] for k in ("boxes", "scores", "localization", "densities",
                                            "variances"))
    return {
        "soft_nms": (lambda: fastnorm.soft_nms(b, s, iou_threshold=IOU),
                     lambda: np_soft(b, s, IOU, "gaussian"), "soft"),
        "iou_guided_nms": (lambda: fastnorm.iou_guided_nms(b, s, loc, IOU),
                           lambda: np_iou_guided(b, s, loc, IOU), "hard"),
        "adaptive_nms hard": (lambda: fastnorm.adaptive_nms(b, s, dens, IOU),
                              lambda: np_greedy(b, s, IOU, dens, score_thr=0.001), "hard"),
        "adaptive_nms linear": (lambda: fastnorm.adaptive_nms(b, s, dens, IOU, method="linear"),
                                lambda: np_soft(b, s, IOU, "linear", dens), "soft"),
        "softer_nms hard": (lambda: fastnorm.softer_nms(b, s, var, sigma_t=SIGMA_T,
                                                        method="hard", iou_threshold=IOU),
                            lambda: np_soft(b, s, IOU, "hard", variances=var), "soft"),
        "softer_nms gaussian": (lambda: fastnorm.softer_nms(b, s, var, sigma_t=SIGMA_T),
                                lambda: np_soft(b, s, IOU, "gaussian", variances=var), "soft"),
    }


def _corners(b):
    b = b.astype(np.float64)
    x1, y1, x2, y2 = b.T
    return b, x1, y1, x2, y2, (x2 - x1) * (y2 - y1)


def _iou_one(c, i, rest):
    """IoU of box i with the boxes ``rest`` (c: _corners), vectorised."""
    _, x1, y1, x2, y2, area = c
    w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]))
    h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]))
    inter = w * h
    return inter / (area[i] + area[rest] - inter)


def np_greedy(b, s, thr, densities=None, key=None, score_thr=None):
    """The textbook NumPy NMS loop (py_cpu_nms): take the best remaining box, drop the rest
    above the threshold (max(thr, its density) for adaptive NMS); ranked by ``key`` (default
    the scores), over the boxes with score >= score_thr. Returns the kept indices and, per kept
    box, the boxes it removed."""
    c = _corners(b)
    key = s if key is None else key
    cand = np.arange(len(s)) if score_thr is None else np.flatnonzero(s >= score_thr)
    order = cand[np.argsort(-key[cand], kind="stable")]
    keep, removed = [], []
    while order.size:
        i, rest = order[0], order[1:]
        t = thr if densities is None else max(thr, float(densities[i]))
        over = _iou_one(c, i, rest) > t
        keep.append(i)
        removed.append(rest[over])
        order = rest[~over]
    return np.array(keep, np.int64), removed


def np_iou_guided(b, s, loc, thr):
    """IoU-guided NMS in NumPy: greedy by localization, each kept box lifted to the best score
    it removed, ordered by that score."""
    keep, removed = np_greedy(b, s, thr, key=loc)
    new = np.array([max(s[i], s[r].max()) if r.size else s[i] for i, r in zip(keep, removed)],
                   s.dtype)
    o = np.argsort(-new, kind="stable")
    return keep[o], new[o]


def np_soft(b, s, thr, method, densities=None, variances=None, sigma=0.5, score_thr=0.001):
    """Soft-NMS in NumPy (Bodla et al.'s loop): select the best live box, decay (or remove) the
    others, drop those below score_thr; adaptive thresholds with ``densities``, variance voting
    (softer_nms, weight exp(-(1 - IoU)^2 / SIGMA_T) / variance) with ``variances``."""
    c = _corners(b)
    cur = s.astype(np.float64)
    live = np.flatnonzero(cur >= score_thr)
    keep, kept_s, voted = [], [], []
    while live.size:
        j = live[np.argmax(cur[live])]
        rest = live[live != j]
        iou = _iou_one(c, j, rest)
        keep.append(j)
        kept_s.append(cur[j])
        if variances is not None:
            v = rest[iou > 0]
            p = np.exp(-(1 - iou[iou > 0]) ** 2 / SIGMA_T)[:, None] / variances[v]
            w = np.concatenate([1 / variances[j][None].astype(np.float64), p])
            voted.append((w * c[0][np.r_[j, v]]).sum(0) / w.sum(0))
        t = thr if densities is None else max(thr, float(densities[j]))
        if method == "gaussian" and densities is None:
            cur[rest] *= np.exp(-iou ** 2 / sigma)
        elif method == "gaussian":
            cur[rest] *= np.where(iou > t, np.exp(-iou ** 2 / sigma), 1.0)
        elif method == "linear":
            cur[rest] *= np.where(iou > t, 1 - iou, 1.0)
        else:
            rest = rest[~(iou > t)]
        live = rest[cur[rest] >= score_thr]
    return (np.array(keep, np.int64), np.array(voted).reshape(-1, 4),
            np.array(kept_s, s.dtype))


def variant_table(threads):
    """Each NMS variant at VARIANT_SIZES beside plain nms on the same input (ratio < 1: the
    variant is slower than nms) and beside its NumPy loop (checked to give the same boxes)."""
    t = Table(f"NMS variants beside nms, float32, IoU {IOU}, {threads} threads, clustered boxes",
              unit="Mbox/s")
    ratios = {}
    for n in VARIANT_SIZES:
        d = variant_inputs(n)
        b, s = d["boxes"], d["scores"]
        t_nms = timeit(lambda: fastnorm.nms(b, s, IOU), **_timer(n))
        for name, (ours, loop, kind) in _variants(d).items():
            res = ours()
            keep = res[0] if isinstance(res, tuple) else res
            case = f"{name} {n} ({len(keep)} kept)"
            t_ours = timeit(ours, **_timer(n))
            t.add(case, "fastnorm", t_ours, n)
            t.add(case, "fastnorm nms, same input", t_nms, n)
            ratios[(name, n, "nms")] = t_nms / t_ours
            if n <= NUMPY_MAX[kind]:
                ref = loop()
                ref_keep = ref[0] if isinstance(ref, tuple) else ref
                assert np.array_equal(np.sort(ref_keep), np.sort(keep)), (name, n)
                t_np = timeit(loop, repeat=1 if n >= 10_000 else 3, min_time=0.0)
                t.add(case, "NumPy loop", t_np, n)
                ratios[(name, n, "numpy")] = t_np / t_ours
    lines = []
    for name in _variants(variant_inputs(10)):
        got = ratios.get((name, 10_000, "numpy"))
        verdict = "n/a" if got is None else f"{'PASS' if got >= 10 else 'MISS'} ({got:.0f}x)"
        lines.append(f"- {name} 10000: >= 10x its NumPy loop: {verdict}")
        if name in HARD:
            got = ratios[(name, 10_000, "nms")]
            lines.append(f"- {name} 10000: within 2x of nms: "
                         f"{'PASS' if got >= 0.5 else 'MISS'} ({1 / got:.2f}x nms's time)")
    return t, lines


# ---------------------------------------------------------------- rotated boxes

ROTATED_SIZES = (1000, 10_000)
ROTATED_TARGET = ("nms_rotated", 10_000, "opencv NMSBoxesRotated", 10)   # >= 10x OpenCV at 10k
IOU_SIDE = 1000                   # box_iou_rotated IOU_SIDE x IOU_SIDE
LOOP_ROWS = 50                    # rows of that matrix the per-pair peers are timed on (scaled)
ROTATED_NOTES = (
    "\n\nRotated boxes: the clustered boxes of nms_<n> with one orientation per cluster "
    "(uniform in [-90, 90) degrees, +-5 per box), float32, generated in OpenCV's clockwise "
    "degrees and passed to fastnorm with `clockwise=True`. OpenCV `cv2.dnn.NMSBoxesRotated` gets "
    "its RotatedRect list prepared outside the timing; shapely 2 runs vectorised over the "
    "remaining boxes (`shapely.intersection` on polygons built outside the timing), with a NumPy "
    "bounding-box prefilter in the NMS loop. box_iou_rotated's per-pair peers (shapely, OpenCV "
    "`rotatedRectangleIntersection` + `contourArea`) are timed on the first "
    f"{LOOP_ROWS} rows of the {IOU_SIDE}x{IOU_SIDE} matrix and scaled to the whole matrix; "
    "the 'Mbox/s' column there counts box pairs. OpenCV's NMSBoxesRotated keeps fewer boxes: "
    "its rotated IoU is 1 for a box lying entirely inside another (`rotatedRectIOU` returns 1 "
    "for INTERSECT_FULL), so nested boxes are suppressed whatever their IoU (e.g. a 20x10 box "
    "centred in a 40x20 one, IoU 0.25, is removed at threshold 0.5); fastnorm's kept sets are "
    "checked equal to the shapely loop's instead.")


def _rects(b):
    """OpenCV RotatedRects ((cx, cy), (w, h), angle) of (cx, cy, w, h, clockwise degrees) rows."""
    return [((float(r[0]), float(r[1])), (float(r[2]), float(r[3])), float(r[4])) for r in b]


def _polygons(b):
    """shapely polygons of (cx, cy, w, h, clockwise degrees) rows (OpenCV's corners)."""
    import shapely
    t = np.deg2rad(b[:, 4].astype(np.float64))
    c, s = np.cos(t), np.sin(t)
    u = np.array([-0.5, 0.5, 0.5, -0.5])[None] * b[:, 2:3]
    v = np.array([-0.5, -0.5, 0.5, 0.5])[None] * b[:, 3:4]
    xy = np.stack([b[:, :1] + c[:, None] * u - s[:, None] * v,
                   b[:, 1:2] + s[:, None] * u + c[:, None] * v], -1)
    return shapely.polygons(xy), xy


def _cv2_iou(cv2, ra, rb):
    """IoU of two RotatedRects by OpenCV (rotatedRectangleIntersection + contourArea)."""
    ret, pts = cv2.rotatedRectangleIntersection(ra, rb)
    inter = 0.0 if pts is None or ret == cv2.INTERSECT_NONE else \
        float(cv2.contourArea(cv2.convexHull(pts)))
    aa, ab = ra[1][0] * ra[1][1], rb[1][0] * rb[1][1]
    return inter / (aa + ab - inter)


def shapely_nms(polys, xy, scores, thr):
    """Greedy rotated NMS with shapely: the best remaining box, IoU with the remaining boxes whose
    bounding boxes overlap it (vectorised), drop those above thr."""
    import shapely
    lo, hi = xy.min(1), xy.max(1)
    area = shapely.area(polys)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        near = rest[(lo[rest] < hi[i]).all(1) & (hi[rest] > lo[i]).all(1)]
        inter = shapely.area(shapely.intersection(polys[i], polys[near]))
        drop = near[inter / (area[i] + area[near] - inter) > thr]
        order = rest[~np.isin(rest, drop)]
    return np.array(keep, np.int64)


def rotated_table(threads, cv2):
    """box_iou_rotated and nms_rotated against OpenCV and shapely, and the IoU agreement with
    OpenCV's rotatedRectangleIntersection."""
    t = Table(f"rotated boxes, float32, IoU {IOU}, {threads} threads, clustered boxes",
              unit="Mbox/s")
    lines = []
    try:
        import shapely
    except ImportError:
        shapely = None
    b, _ = clustered_boxes(IOU_SIDE, seed=5, rotated=True)
    pairs = IOU_SIDE * IOU_SIDE
    case = f"box_iou_rotated {IOU_SIDE}x{IOU_SIDE}"
    ours = fastnorm.box_iou_rotated(b, b, clockwise=True)
    t.add(case, "fastnorm", timeit(lambda: fastnorm.box_iou_rotated(b, b, clockwise=True)), pairs)
    rows = b[:LOOP_ROWS]
    scale = IOU_SIDE / LOOP_ROWS
    if shapely is not None:
        polys, _ = _polygons(b)
        fn = lambda: shapely.area(shapely.intersection(polys[:LOOP_ROWS, None], polys[None]))
        t.add(case, f"shapely (timed on {LOOP_ROWS} rows, scaled)",
              timeit(fn, repeat=3, min_time=0.0) * scale, pairs)
        area = shapely.area(polys)
        inter = fn()
        ref = inter / (area[:LOOP_ROWS, None] + area[None] - inter)
        lines.append(f"- box_iou_rotated vs shapely on {ref.size} pairs (float32 boxes): max |diff| "
                     f"{np.abs(ref - ours[:LOOP_ROWS]).max():.1e}")
    if cv2 is not None:
        ra, rb = _rects(rows), _rects(b)
        fn = lambda: [[_cv2_iou(cv2, p, q) for q in rb] for p in ra]
        t.add(case, f"opencv rotatedRectangleIntersection (timed on {LOOP_ROWS} rows, scaled)",
              timeit(fn, repeat=1, min_time=0.0) * scale, pairs)
        d = np.abs(np.array(fn()) - ours[:LOOP_ROWS])
        lines.append(f"- IoU agreement with OpenCV rotatedRectangleIntersection on {d.size} pairs: "
                     f"max |diff| {d.max():.1e}, {int((d > 1e-3).sum())} pairs differ by > 1e-3, "
                     f"{int((d > 1e-5).sum())} by > 1e-5 (OpenCV intersects in float32)")
    for n in ROTATED_SIZES:
        b, s = clustered_boxes(n, seed=6, rotated=True)
        keep = fastnorm.nms_rotated(b, s, IOU, clockwise=True)
        case = f"nms_rotated {n} ({len(keep)} kept)"
        t_ours = timeit(lambda: fastnorm.nms_rotated(b, s, IOU, clockwise=True), **_timer(n))
        t.add(case, "fastnorm", t_ours, n)
        if cv2 is not None:
            rects, sl = _rects(b), s.tolist()
            fn = lambda: cv2.dnn.NMSBoxesRotated(rects, sl, 0.0, IOU)
            kc = np.asarray(fn(), np.int64).ravel()
            t_cv = timeit(fn, **_timer(n))
            t.add(case, "opencv NMSBoxesRotated", t_cv, n)
            diff = len(set(kc.tolist()) ^ set(keep.tolist()))
            lines.append(f"- nms_rotated {n}: OpenCV keeps {len(kc)} boxes, fastnorm "
                         f"{len(keep)}; {diff} differ")
            if (ROTATED_TARGET[0], n) == ROTATED_TARGET[:2]:
                x = t_cv / t_ours
                lines.append(f"- nms_rotated {n}: >= {ROTATED_TARGET[3]}x OpenCV NMSBoxesRotated: "
                             f"{'PASS' if x >= ROTATED_TARGET[3] else 'MISS'} ({x:.1f}x)")
        if shapely is not None:
            polys, xy = _polygons(b)
            ks = shapely_nms(polys, xy, s, IOU)
            assert np.array_equal(ks, keep), n
            t.add(case, "shapely loop", timeit(lambda: shapely_nms(polys, xy, s, IOU),
                                               repeat=1 if n >= 10_000 else 3, min_time=0.0), n)
    return t, lines


# ---------------------------------------------------------------- combined_nms vs ONNX Runtime

COMBINED = dict(B=8, N=8400, C=80, iou=0.45, per_class=100, total=300)   # a YOLO head
COMBINED_CASES = (0.25, 0.001)                  # score thresholds: deployment, evaluation


def combined_inputs(B, N, C, seed=4):
    """Per image the clustered boxes of nms_<N>; scores as a detector's sigmoid outputs: one
    class per box scored uniformly in [0, 1), the others log-uniform in [1e-6, 1e-2)."""
    rng = np.random.default_rng(seed)
    boxes = np.stack([clustered_boxes(N, seed=10 + i)[0] for i in range(B)])
    scores = (10.0 ** rng.uniform(-6, -2, (B, N, C))).astype(np.float32)
    cls = rng.integers(0, C, (B, N))
    np.put_along_axis(scores, cls[..., None], rng.random((B, N, 1)).astype(np.float32), 2)
    return boxes, scores


def _ort_combined(boxes, scores, thr, threads):
    """ONNX Runtime NonMaxSuppression (scores in its (B, C, N) layout, made outside the timing)
    followed by the per-image top-k in NumPy: () -> (image, class, box) triples kept, in
    per-image score order. None when ONNX Runtime is unavailable."""
    p = COMBINED
    st = np.ascontiguousarray(scores.transpose(0, 2, 1))
    run = onnx_op("NonMaxSuppression",
                  {"boxes": boxes, "scores": st,
                   "max": np.array([p["per_class"]], np.int64),
                   "iou": np.array([p["iou"]], np.float32),
                   "score": np.array([thr], np.float32)}, {}, 13, threads, np.int64)
    if run is None:
        return None

    def top_k():
        sel = run()
        s = st[sel[:, 0], sel[:, 1], sel[:, 2]]
        parts = []
        for i in range(boxes.shape[0]):
            mine = np.flatnonzero(sel[:, 0] == i)
            parts.append(sel[mine[np.argsort(-s[mine], kind="stable")[:p["total"]]]])
        return np.concatenate(parts)
    return top_k


def combined_table(threads):
    """combined_nms at a YOLO head's size against ONNX Runtime NonMaxSuppression + top-k."""
    p = COMBINED
    B, N, C = p["B"], p["N"], p["C"]
    boxes, scores = combined_inputs(B, N, C)
    t = Table(f"combined_nms, B={B} N={N} C={C}, IoU {p['iou']}, max {p['per_class']} per class "
              f"and {p['total']} per image, float32, {threads} threads", unit="Mbox/s")
    lines = []
    for thr in COMBINED_CASES:
        def ours():
            return fastnorm.combined_nms(boxes, scores, p["per_class"], p["total"], p["iou"], thr,
                                         return_indices=True)
        _, _, cls, num, idx = ours()
        case = f"score > {thr} ({int(num.sum())} detections)"
        t_ours = timeit(ours, repeat=5, min_time=0.2)
        t.add(case, "fastnorm", t_ours, B * N)
        ort = _ort_combined(boxes, scores, thr, threads)
        if ort is None:
            continue
        mine = {(i, int(cls[i, k]), int(idx[i, k])) for i in range(B) for k in range(num[i])}
        assert mine == set(map(tuple, ort().tolist())), thr
        t_ort = timeit(ort, repeat=3, min_time=0.0)
        t.add(case, "onnxruntime NMS + top-k", t_ort, B * N)
        lines.append(f"- combined_nms, score > {thr}: >= 5x ONNX Runtime NMS + top-k: "
                     f"{'PASS' if t_ort / t_ours >= 5 else 'MISS'} ({t_ort / t_ours:.1f}x)")
    return t, lines


CUDA_TARGETS = ("nms_1000", "nms_10000", "nms_100000", "batched_20000")


def cuda_tables(inputs):
    """fastnorm on CuPy arrays vs torchvision CUDA, same inputs (needs a GPU); fastnorm's kept
    set is checked against its CPU backend's, torchvision's differences from it are counted."""
    dev = cuda_device()
    if dev is None:
        return []
    cupy, sync = dev
    t = Table(f"nms / batched_nms on CUDA, float32, IoU {IOU}", unit="Mbox/s")
    peer = torchvision_cuda()
    if peer is not None:
        torch, torchvision, ts = peer
    for case in CUDA_TARGETS:
        arrs = inputs[case]
        n = len(arrs[0])
        dev = [cupy.asarray(a) for a in arrs]
        fn = (lambda: fastnorm.batched_nms(*dev, IOU)) if len(dev) == 3 else \
            (lambda: fastnorm.nms(*dev, IOU))
        ours = cupy.asnumpy(fn())
        cpu = fastnorm.batched_nms(*arrs, IOU) if len(arrs) == 3 else fastnorm.nms(*arrs, IOU)
        assert np.array_equal(np.sort(ours), np.sort(cpu)), case     # the CPU's decisions
        t.add(f"{case} ({len(ours)} kept)", "fastnorm", timeit(fn, sync=sync, **_timer(n)), n)
        t.notes.append(f"{case}: " + cuda_profile(fn, sync))
        if peer is not None:
            tt = [torch.as_tensor(a, device="cuda") for a in arrs]
            tfn = (lambda: torchvision.ops.batched_nms(*tt, IOU)) if len(tt) == 3 else \
                (lambda: torchvision.ops.nms(*tt, IOU))
            # torchvision's CUDA kernel decides IoU > threshold in its own float arithmetic: on
            # an H100 its batched_20000 kept set differed from its own CPU's (and ours) in one
            # box, so the difference is reported, not asserted
            diff = len(np.setxor1d(tfn().cpu().numpy(), ours))
            t.add(f"{case} ({len(ours)} kept)",
                  "torchvision CUDA" + (f" ({diff} boxes differ)" if diff else ""),
                  timeit(tfn, sync=ts, **_timer(n)), n)
    return [t]


if __name__ == "__main__":
    main()
