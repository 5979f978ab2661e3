"""Per-image lists of arrays, handled once for every op and adapter.

Batched ops take either flat arrays with a per-element image index, or lists with one array per
image. Lists are flattened here, in the op layer, before the kernels (which see flat arrays and
image indices only), and results are split back here.
"""


def is_list(a):
    return isinstance(a, (list, tuple))


def flatten(xp, parts, dtype=None):
    """Per-image arrays -> (flat array, int64 image index of each row, per-image lengths)."""
    lengths = [int(p.shape[0]) for p in parts]            # host ints: no device round trip
    flat = xp.concatenate([xp.asarray(p, dtype=dtype) for p in parts]) if parts else None
    image = xp.repeat(xp.arange(len(parts), dtype="int64"), lengths)
    return flat, image, lengths


def rois(xp, parts, dtype, width=4):
    """Per-image (K_i, width) boxes -> (K, width + 1) ``[image index, *box]`` of ``dtype``
    (width 4: ``x1, y1, x2, y2``; 5: rotated ``cx, cy, w, h, angle``)."""
    if not parts:
        return xp.zeros((0, width + 1), dtype=dtype)
    flat, image, _ = flatten(xp, parts, dtype)
    return xp.ascontiguousarray(xp.concatenate([image[:, None].astype(dtype), flat], axis=1))


def split_aligned(result, lengths):
    """A result aligned with the flat input -> one slice per image."""
    out, start = [], 0
    for n in lengths:
        out.append(result[start:start + n])
        start += n
    return out


def split_grouped(xp, idx, image, lengths, extras=()):
    """Indices into the flat input grouped by image (and per-index ``extras``) -> per image,
    the image-local indices (and their extras: ``[idx, *extras]`` when there are extras). The
    boundaries come to the host once: the list's sizes need them."""
    starts = xp.searchsorted(image[idx], xp.arange(len(lengths) + 1))
    starts = starts.get() if hasattr(starts, "get") else starts
    out, first = [], 0
    for i, n in enumerate(lengths):
        sl = slice(int(starts[i]), int(starts[i + 1]))
        local = idx[sl] - first
        out.append([local] + [e[sl] for e in extras] if extras else local)
        first += n
    return out
