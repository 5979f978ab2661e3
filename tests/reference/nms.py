"""Independent float64 oracles for the NMS family and box metrics: plain scalar loops straight
from the definitions (numba-jitted). Shares no code with fastnorm.

Conventions (the documented ones): boxes xyxy; a box with x2 <= x1 or y2 <= y1 (or NaN) has
area 0 and overlaps nothing; ranking by decreasing score, ties by lower index, NaN last.
"""
import math

import numpy as np
from numba import njit


def rank(scores, keep_mask=None):
    """Indices by decreasing score, ties lower index first, NaN last (plain stable sort)."""
    s = np.asarray(scores, dtype=np.float64)
    idx = [i for i in range(len(s)) if keep_mask is None or keep_mask[i]]
    return np.array(sorted(idx, key=lambda i: (math.isnan(s[i]), -s[i] if not math.isnan(s[i])
                                               else 0.0, i)), dtype=np.int64)


@njit(cache=True)
def _area(b):
    if b[2] > b[0] and b[3] > b[1]:
        return (b[2] - b[0]) * (b[3] - b[1])
    return 0.0


@njit(cache=True)
def _inter(a, b):
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w > 0 and h > 0:
        return w * h
    return 0.0


@njit(cache=True)
def iou_pair(a, b):
    inter = _inter(a, b)
    if inter > 0:
        return inter / (_area(a) + _area(b) - inter)
    return 0.0


@njit(cache=True)
def overlap(a, b):
    """IoU of two boxes of positive area, else 0 (degenerate and NaN boxes overlap nothing);
    0 too when it is not a positive number (infinite boxes)."""
    aa, ab = _area(a), _area(b)
    if not (aa > 0 and ab > 0):
        return 0.0
    inter = _inter(a, b)
    r = inter / (aa + ab - inter) if inter > 0 else 0.0
    return r if r > 0 else 0.0


@njit(cache=True)
def _iou_scalar(boxes, i, j):
    w = min(boxes[i, 2], boxes[j, 2]) - max(boxes[i, 0], boxes[j, 0])
    h = min(boxes[i, 3], boxes[j, 3]) - max(boxes[i, 1], boxes[j, 1])
    if w > 0 and h > 0:
        ai = (boxes[i, 2] - boxes[i, 0]) * (boxes[i, 3] - boxes[i, 1])
        aj = (boxes[j, 2] - boxes[j, 0]) * (boxes[j, 3] - boxes[j, 1])
        return w * h / (ai + aj - w * h)      # w, h > 0 implies both boxes are proper
    return 0.0


@njit(cache=True)
def _criterion(a, b, crit, beta):
    iou = iou_pair(a, b)
    if crit == 0 or iou <= 0:
        return iou
    d2 = ((a[0] + a[2]) / 2 - (b[0] + b[2]) / 2) ** 2 + ((a[1] + a[3]) / 2 - (b[1] + b[3]) / 2) ** 2
    c2 = (max(a[2], b[2]) - min(a[0], b[0])) ** 2 + (max(a[3], b[3]) - min(a[1], b[1])) ** 2
    return iou - (d2 / c2) ** beta


@njit(cache=True)
def _greedy(boxes, order, thr, crit, beta, max_output, suppressor):
    n = order.shape[0]
    removed = np.zeros(n, dtype=np.bool_)
    keep = []
    for a in range(n):
        if len(keep) >= max_output:
            break
        if removed[a]:
            continue
        i = order[a]
        keep.append(i)
        for c in range(a + 1, n):
            if removed[c]:
                continue
            j = order[c]
            if crit == 0:
                c_ij = _iou_scalar(boxes, i, j)
            else:
                c_ij = _criterion(boxes[i], boxes[j], crit, beta)
            if c_ij > thr:
                removed[c] = True
                suppressor[j] = i
    out = np.empty(len(keep), dtype=np.int64)
    for k in range(len(keep)):
        out[k] = keep[k]
    return out


def greedy_nms(boxes, scores, thr, *, crit=0, beta=1.0, score_threshold=None, max_output=None,
               return_suppressor=False):
    """Greedy NMS: visit by rank; keep a box unless criterion(kept, box) > thr."""
    boxes = np.asarray(boxes, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    mask = None if score_threshold is None else scores > score_threshold
    order = rank(scores, mask)
    sup = np.full(len(scores), -1, dtype=np.int64)
    keep = _greedy(boxes, order, float(thr), crit, float(beta),
                   len(scores) + 1 if max_output is None else max_output, sup)
    return (keep, sup) if return_suppressor else keep


def merge_by_score(idx, scores):
    s = np.asarray(scores, dtype=np.float64)
    return np.array(sorted(idx, key=lambda i: (math.isnan(s[i]), -s[i] if not math.isnan(s[i])
                                               else 0.0, i)), dtype=np.int64)


def batched(boxes, scores, idxs, thr, *, score_threshold=None, max_output=None):
    """Per-class greedy NMS, merged by score."""
    kept = []
    for c in np.unique(idxs):
        sel = np.flatnonzero(idxs == c)
        k = greedy_nms(boxes[sel], scores[sel], thr, score_threshold=score_threshold)
        kept.extend(sel[k].tolist())
    out = merge_by_score(kept, scores)
    return out if max_output is None else out[:max_output]


def weighted(boxes, scores, thr):
    keep, sup = greedy_nms(boxes, scores, thr, return_suppressor=True)
    b = np.asarray(boxes, np.float64)
    s = np.asarray(scores, np.float64)
    fused = np.empty((len(keep), 4))
    for k, i in enumerate(keep):
        members = [i] + [j for j in range(len(s)) if sup[j] == i]
        w = sum(s[j] for j in members)
        fused[k] = sum(s[j] * b[j] for j in members) / w if w != 0 else b[i]
    return keep, fused


@njit(cache=True)
def _soft_loop(boxes, scores, dens, var, sigma_t, method, sigma, thr, gated, score_thr, out_i,
               out_b, out_s):
    n = scores.shape[0]
    cur = scores.copy()
    alive = np.zeros(n, dtype=np.bool_)
    for i in range(n):
        alive[i] = cur[i] >= score_thr
    count = 0
    while True:
        best = -1
        for i in range(n):
            if alive[i] and (best < 0 or cur[i] > cur[best]):   # index order: ties -> lower
                best = i
        if best < 0:
            break
        alive[best] = False
        out_i[count] = best
        out_s[count] = cur[best]
        # vote (var given): best itself (p = 1) and the live boxes overlapping it, per coordinate
        # weighted by p / variance; zero variances are certain (only they count), NaN/inf ones
        # count not
        for k in range(4 if var.shape[0] else 0):
            num, den, cnum, cden = 0.0, 0.0, 0.0, 0.0
            for j in range(n):
                if j == best:
                    p = 1.0
                elif alive[j] and overlap(boxes[best], boxes[j]) > 0:
                    p = math.exp(-(1 - overlap(boxes[best], boxes[j])) ** 2 / sigma_t)
                else:
                    continue
                v = var[j, k]
                if p > 0 and v == 0:
                    cnum += p * boxes[j, k]
                    cden += p
                elif p > 0 and 0 < v < math.inf:
                    num += p / v * boxes[j, k]
                    den += p / v
            if cden > 0:
                out_b[count, k] = cnum / cden
            elif den > 0:
                out_b[count, k] = num / den
            else:
                out_b[count, k] = boxes[best, k]
        count += 1
        t = thr if math.isnan(dens[best]) else max(thr, dens[best])
        for j in range(n):
            if not alive[j]:
                continue
            iou = overlap(boxes[best], boxes[j])
            if method == 2:
                if iou > t:
                    alive[j] = False
                continue
            if method == 0 and not gated:
                cur[j] *= math.exp(-iou * iou / sigma)
            elif iou > t:
                cur[j] *= math.exp(-iou * iou / sigma) if method == 0 else 1 - iou
            if not cur[j] >= score_thr:
                alive[j] = False
    return count


def _soft_family(boxes, scores, method, sigma, thr, score_thr, *, dens=None, var=None,
                 sigma_t=1.0):
    """The Soft-NMS loop from its definition (one image): repeatedly select the live box of
    highest current score (ties: lower index), then remove ("hard") or decay ("linear":
    1 - IoU, "gaussian": exp(-IoU^2 / sigma)) the live boxes above the threshold -- thr, or
    max(thr, density of the selected box) with ``dens`` (adaptive NMS, NaN: thr) -- except the
    plain Gaussian, which decays every live box; boxes below score_thr drop. With ``var``
    (Softer-NMS) each selected box is voted first. Returns (indices in selection order, voted
    boxes (empty without var), scores at selection), float64."""
    n = len(scores)
    oi, ob, os_ = np.empty(n, np.int64), np.empty((n, 4)), np.empty(n)
    c = _soft_loop(np.asarray(boxes, np.float64), np.asarray(scores, np.float64),
                   np.full(n, np.nan) if dens is None else np.asarray(dens, np.float64),
                   np.zeros((0, 4)) if var is None else np.asarray(var, np.float64), sigma_t,
                   ["gaussian", "linear", "hard"].index(method), sigma, thr, dens is not None,
                   score_thr, oi, ob, os_)
    return oi[:c], ob[:c] if var is not None else ob[:0], os_[:c]


def soft(boxes, scores, method, sigma, thr, score_thr):
    """Soft-NMS (Bodla et al.): (indices in selection order, scores at selection)."""
    return _soft_family(boxes, scores, method, sigma, thr, score_thr)[::2]


def matrix(boxes, scores, kernel, sigma):
    b = np.asarray(boxes, np.float64)
    s = np.asarray(scores, np.float64)
    order = rank(s)
    n = len(order)
    f = (lambda x: math.exp(-sigma * x * x)) if kernel == "gaussian" else (lambda x: 1 - x)
    comp = np.zeros(n)
    for a in range(n):
        for c in range(a):
            comp[a] = max(comp[a], iou_pair(b[order[c]], b[order[a]]))
    out = np.empty(n)
    for a in range(n):
        d = 1.0
        for c in range(a):
            fc = f(comp[c])
            if fc > 0:
                d = min(d, f(iou_pair(b[order[c]], b[order[a]])) / fc)
        out[order[a]] = s[order[a]] * d
    return out


@njit(cache=True)
def box_metric(a, b, metric):
    """torchvision box_iou / generalized / distance / complete (eps 1e-7), areas clamped at 0,
    zero union -> IoU 0."""
    N, M = a.shape[0], b.shape[0]
    out = np.empty((N, M))
    for i in range(N):
        for j in range(M):
            x, y = a[i], b[j]
            wa = max(x[2] - x[0], 0.0)
            ha = max(x[3] - x[1], 0.0)
            wb = max(y[2] - y[0], 0.0)
            hb = max(y[3] - y[1], 0.0)
            inter = max(min(x[2], y[2]) - max(x[0], y[0]), 0.0) * \
                max(min(x[3], y[3]) - max(x[1], y[1]), 0.0)
            union = wa * ha + wb * hb - inter
            iou = inter / union if union > 0 else 0.0
            cw = max(x[2], y[2]) - min(x[0], y[0])
            ch = max(x[3], y[3]) - min(x[1], y[1])
            if metric == 0:
                out[i, j] = iou
            elif metric == 1:
                c = max(cw, 0.0) * max(ch, 0.0)
                out[i, j] = iou - (c - union) / c if c > 0 else iou
            else:
                d2 = ((x[0] + x[2]) / 2 - (y[0] + y[2]) / 2) ** 2 + \
                    ((x[1] + x[3]) / 2 - (y[1] + y[3]) / 2) ** 2
                diou = iou - d2 / (cw * cw + ch * ch + 1e-7)
                if metric == 2:
                    out[i, j] = diou
                else:
                    v = 4 / math.pi ** 2 * (math.atan2(wb, hb) - math.atan2(wa, ha)) ** 2
                    alpha = v / (1 - iou + v + 1e-7)
                    out[i, j] = diou - alpha * v
    return out


# ---------------------------------------------------------------- IoU-guided and adaptive NMS

@njit(cache=True)
def _higher(x, y):
    """x above y, NaN below every number."""
    return x > y or (math.isnan(y) and not math.isnan(x))


@njit(cache=True)
def _iou_guided(boxes, scores, order, thr, new):
    """Greedy NMS visiting ``order``; new[i] of each kept i: the highest score among i and the
    boxes that i removed. Returns the kept boxes."""
    n = order.shape[0]
    removed = np.zeros(n, dtype=np.bool_)
    kept = []
    for a in range(n):
        if removed[a]:
            continue
        i = order[a]
        best = scores[i]
        for c in range(a + 1, n):
            j = order[c]
            if not removed[c] and overlap(boxes[i], boxes[j]) > thr:
                removed[c] = True
                if _higher(scores[j], best):
                    best = scores[j]
        kept.append(i)
        new[i] = best
    out = np.empty(len(kept), dtype=np.int64)
    for k in range(len(kept)):
        out[k] = kept[k]
    return out


def iou_guided(boxes, scores, loc, thr, *, idxs=None, score_threshold=None, max_output=None):
    """IoU-guided NMS (one image): per class, greedy in decreasing localization (ties lower
    index, NaN last); a kept box's score becomes the highest of its own and those of the boxes
    it removed. Returns (kept, new scores) by decreasing new score (ties lower index)."""
    b = np.asarray(boxes, np.float64)
    s = np.asarray(scores, np.float64)
    loc = np.asarray(loc, np.float64)
    n = len(s)
    part = np.array([score_threshold is None or s[i] > score_threshold for i in range(n)],
                    dtype=bool)
    classes = np.zeros(n, np.int64) if idxs is None else np.asarray(idxs)
    new = np.full(n, np.nan)
    kept = []
    for c in np.unique(classes[part]):
        sel = np.flatnonzero(part & (classes == c))
        order = sel[rank(loc[sel])]
        kept.extend(_iou_guided(b, s, order, float(thr), new).tolist())
    mask = np.zeros(n, dtype=bool)
    mask[kept] = True
    out = rank(new, mask)[:max_output]
    return out, new[out]


def adaptive(boxes, scores, dens, thr, method="hard", sigma=0.5, score_thr=0.001):
    """Adaptive NMS (one image): select by current score; the selected box M removes ("hard")
    or decays ("linear" 1 - IoU, "gaussian" exp(-IoU^2 / sigma)) the boxes with IoU above
    max(thr, d_M) (NaN d_M: thr); boxes below score_thr drop. Returns (selected, scores at
    selection) in selection order."""
    return _soft_family(boxes, scores, method, sigma, thr, score_thr, dens=dens)[::2]


# ---------------------------------------------------------------- Softer-NMS (variance voting)

def softer(boxes, scores, variances, sigma_t=0.01, method="gaussian", sigma=0.5, thr=0.5,
           score_thr=0.001):
    """Softer-NMS: (indices in selection order, voted boxes, scores at selection), float64."""
    return _soft_family(boxes, scores, method, sigma, thr, score_thr, var=variances,
                        sigma_t=sigma_t)


# ---------------------------------------------------------------- combined_nms

def combined(boxes, scores, max_output_per_class, max_total, iou_threshold,
             score_threshold=None, *, class_agnostic=False, pre_nms_top_k=None):
    """Fixed-shape batched NMS from its definition, per image b: the candidates are the pairs
    (n, c) with scores[b, n, c] > score_threshold (every non-NaN score without a threshold),
    index n * C + c, ranked by (score desc, index); the first pre_nms_top_k of them; greedy NMS
    in rank order within each class (over all of them when class_agnostic): a candidate is
    kept unless its IoU with a kept one of its group is > iou_threshold; then the kept ones in
    rank order, skipping those beyond max_output_per_class of their class, the first max_total.
    Returns float64 (boxes (B, K, 4), scores (B, K), classes, num (B,), box indices), padded
    with zeros (indices -1). boxes: (B, N, 4) shared or (B, N, C, 4) per class."""
    b = np.asarray(boxes, np.float64)
    s = np.asarray(scores, np.float64)
    B, N, C = s.shape
    K = max_total
    out = (np.zeros((B, K, 4)), np.zeros((B, K)), np.zeros((B, K), np.int64),
           np.zeros(B, np.int64), np.full((B, K), -1, np.int64))
    for i in range(B):
        cands = []                                    # (score, index, n, c, box)
        for n in range(N):
            for c in range(C):
                v = s[i, n, c]
                if math.isnan(v) or (score_threshold is not None and not v > score_threshold):
                    continue
                box = b[i, n, c] if b.ndim == 4 else b[i, n]
                cands.append((v, n * C + c, n, c, box))
        cands.sort(key=lambda t: (-t[0], t[1]))
        if pre_nms_top_k is not None:
            cands = cands[:pre_nms_top_k]
        groups = [cands] if class_agnostic else [[t for t in cands if t[3] == c]
                                                 for c in range(C)]
        kept = []
        for g in groups:
            kept_g = []
            for t in g:
                if not any(overlap(k[4], t[4]) > iou_threshold for k in kept_g):
                    kept_g.append(t)
            kept += kept_g
        kept.sort(key=lambda t: (-t[0], t[1]))
        per_class = [0] * C
        k = 0
        for t in kept:
            if k == K:
                break
            if max_output_per_class is not None and per_class[t[3]] >= max_output_per_class:
                continue
            per_class[t[3]] += 1
            out[0][i, k], out[1][i, k], out[2][i, k], out[4][i, k] = t[4], t[0], t[3], t[2]
            k += 1
        out[3][i] = k
    return out


# ---------------------------------------------------------------- rotated boxes
#
# A rotated box (cx, cy, w, h, angle): its point (u, v) (u along w, v along h, centred) is at
# x = cx + u cos t + v sin t, y = cy - u sin t + v cos t, t = angle * scale (radians). The
# intersection is built from its vertex set: the corners of each box inside the other and the
# crossings of their edges, ordered by angle around their centroid (a convex polygon), shoelace.
# A box with w <= 0, h <= 0 or a non-finite field overlaps nothing.

DEG = math.pi / 180


@njit(cache=True)
def _rot_valid(b):
    for k in range(5):
        if not math.isfinite(b[k]):
            return False
    return b[2] > 0 and b[3] > 0 and math.isfinite(b[2] * b[3])


@njit(cache=True)
def _rot_corners(cx, cy, w, h, t):
    c, s = math.cos(t), math.sin(t)
    out = np.empty((4, 2))
    us = np.array([-0.5, 0.5, 0.5, -0.5]) * w
    vs = np.array([-0.5, -0.5, 0.5, 0.5]) * h
    for k in range(4):
        out[k, 0] = cx + us[k] * c + vs[k] * s
        out[k, 1] = cy - us[k] * s + vs[k] * c
    return out


@njit(cache=True)
def _rot_inside(x, y, cx, cy, w, h, t, eps):
    """Is (x, y) inside (or within eps of) the box?"""
    c, s = math.cos(t), math.sin(t)
    dx, dy = x - cx, y - cy
    u = dx * c - dy * s
    v = dx * s + dy * c
    return abs(u) <= w / 2 + eps and abs(v) <= h / 2 + eps


@njit(cache=True)
def rotated_iou_pair(a, b, scale):
    """IoU of two rotated boxes (float64 (5,) each), angles times ``scale`` in radians."""
    if not (_rot_valid(a) and _rot_valid(b)):
        return 0.0
    # relative to a's centre (translation changes nothing but the rounding)
    bx, by = b[0] - a[0], b[1] - a[1]
    if math.hypot(bx, by) > math.hypot(a[2], a[3]) / 2 + math.hypot(b[2], b[3]) / 2:
        return 0.0
    ta, tb = a[4] * scale, b[4] * scale
    A = _rot_corners(0.0, 0.0, a[2], a[3], ta)
    B = _rot_corners(bx, by, b[2], b[3], tb)
    eps = 1e-12 * max(max(a[2], a[3]), max(b[2], b[3]))
    px = np.empty(24)
    py = np.empty(24)
    n = 0
    for k in range(4):
        if _rot_inside(A[k, 0], A[k, 1], bx, by, b[2], b[3], tb, eps):
            px[n], py[n] = A[k, 0], A[k, 1]
            n += 1
        if _rot_inside(B[k, 0], B[k, 1], 0.0, 0.0, a[2], a[3], ta, eps):
            px[n], py[n] = B[k, 0], B[k, 1]
            n += 1
    for i in range(4):
        p0x, p0y = A[i, 0], A[i, 1]
        rx, ry = A[(i + 1) % 4, 0] - p0x, A[(i + 1) % 4, 1] - p0y
        for j in range(4):
            q0x, q0y = B[j, 0], B[j, 1]
            sx, sy = B[(j + 1) % 4, 0] - q0x, B[(j + 1) % 4, 1] - q0y
            den = rx * sy - ry * sx
            if den == 0:
                continue                     # parallel: covered by the corners inside
            qpx, qpy = q0x - p0x, q0y - p0y
            t = (qpx * sy - qpy * sx) / den
            u = (qpx * ry - qpy * rx) / den
            if -1e-12 <= t <= 1 + 1e-12 and -1e-12 <= u <= 1 + 1e-12:
                px[n], py[n] = p0x + t * rx, p0y + t * ry
                n += 1
    if n < 3:
        return 0.0
    mx, my = 0.0, 0.0
    for k in range(n):
        mx += px[k]
        my += py[k]
    mx /= n
    my /= n
    ang = np.empty(n)
    for k in range(n):
        ang[k] = math.atan2(py[k] - my, px[k] - mx)
    o = np.argsort(ang)
    s = 0.0
    for k in range(n):
        i, j = o[k], o[(k + 1) % n]
        s += (px[i] - mx) * (py[j] - my) - (px[j] - mx) * (py[i] - my)
    inter = abs(s) / 2
    if not inter > 0:
        return 0.0
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


@njit(cache=True)
def _rot_matrix(a, b, scale, out):
    for i in range(a.shape[0]):
        for j in range(b.shape[0]):
            out[i, j] = rotated_iou_pair(a[i], b[j], scale)


def box_iou_rotated(a, b, scale=DEG):
    """(N, M) IoU of rotated boxes, float64."""
    a = np.asarray(a, np.float64).reshape(-1, 5)
    b = np.asarray(b, np.float64).reshape(-1, 5)
    out = np.empty((a.shape[0], b.shape[0]))
    _rot_matrix(a, b, float(scale), out)
    return out


@njit(cache=True)
def _greedy_rotated(boxes, order, thr, scale, max_output):
    n = order.shape[0]
    removed = np.zeros(n, dtype=np.bool_)
    keep = np.empty(n, dtype=np.int64)
    k = 0
    for a in range(n):
        if k >= max_output:
            break
        if removed[a]:
            continue
        keep[k] = order[a]
        k += 1
        for c in range(a + 1, n):
            if not removed[c] and rotated_iou_pair(boxes[order[a]], boxes[order[c]], scale) > thr:
                removed[c] = True
    return keep[:k]


def greedy_nms_rotated(boxes, scores, thr, *, scale=DEG, score_threshold=None, max_output=None):
    """Greedy NMS of rotated boxes: visit by rank; keep a box unless its IoU with a kept box is
    > thr."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 5)
    scores = np.asarray(scores, dtype=np.float64)
    mask = None if score_threshold is None else scores > score_threshold
    order = rank(scores, mask)
    return _greedy_rotated(boxes, order, float(thr), float(scale),
                           len(scores) + 1 if max_output is None else max_output)


def batched_rotated(boxes, scores, idxs, thr, *, scale=DEG, score_threshold=None,
                    max_output=None):
    """Per-class greedy rotated NMS, merged by score."""
    kept = []
    for c in np.unique(idxs):
        sel = np.flatnonzero(idxs == c)
        k = greedy_nms_rotated(boxes[sel], scores[sel], thr, scale=scale,
                               score_threshold=score_threshold)
        kept.extend(sel[k].tolist())
    out = merge_by_score(kept, scores)
    return out if max_output is None else out[:max_output]
