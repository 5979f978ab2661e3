"""Tensors of more than 2**31 elements (no int32 overflow anywhere in the index arithmetic).

Slow and memory hungry (GroupNorm: 16 GiB, RoIAlign: 8 GiB): marked ``slow`` and skipped unless
asked for with ``pytest -m slow`` or ``FASTNORM_SLOW=1``, and skipped when psutil reports too
little available memory. Expectations are exact and cheap: GroupNorm's input is built so that each
group's mean and variance are known analytically; RoIAlign's results near the end of the tensor
are compared with the float64 oracle on a small crop around each RoI.
"""
import os

import numpy as np
import pytest

import fastnorm

pytestmark = pytest.mark.slow
BIG = 2**31


@pytest.fixture(autouse=True)
def _only_when_asked(request):
    expr = request.config.getoption("markexpr") or ""
    asked = os.environ.get("FASTNORM_SLOW") == "1" or ("slow" in expr and "not slow" not in expr)
    if not asked:
        pytest.skip("huge-tensor test: run with `pytest -m slow` or FASTNORM_SLOW=1")


def _need(nbytes):
    psutil = pytest.importorskip("psutil")
    avail = psutil.virtual_memory().available
    if avail < nbytes * 1.1 + (1 << 30):
        pytest.skip(f"needs {nbytes * 1.1 / 2**30 + 1:.1f} GiB available, "
                    f"psutil reports {avail / 2**30:.1f} GiB")


def test_group_norm_over_2_31_elements():
    S = 2**30 + 64                      # (1, 2, S): 2**31 + 128 elements, float32
    _need(2 * 2 * S * 4)
    x = np.empty((1, 2, S), np.float32)
    x[0, 0, 0::2], x[0, 0, 1::2] = 1, -1          # group 0: mean 0, variance 1
    x[0, 1, 0::2], x[0, 1, 1::2] = 7, 3           # group 1: mean 5, variance 4
    eps = 1e-5
    y, mean, rstd = fastnorm.group_norm(x, 2, eps=eps, return_stats=True)
    del x
    np.testing.assert_allclose(mean, [[0, 5]], atol=1e-6)
    np.testing.assert_allclose(rstd, [[1 / np.sqrt(1 + eps), 1 / np.sqrt(4 + eps)]], rtol=1e-6)
    a, b = 1 / np.sqrt(1 + eps), 2 / np.sqrt(4 + eps)
    # slices at the start, around 2**31 - S (= channel 1's 2**30-th element) and at the end
    for c, lo in ((0, 0), (0, S - 64), (1, 0), (1, BIG - S - 64), (1, S - 128)):
        seg = y[0, c, lo:lo + 128]
        want = np.where(np.arange(lo, lo + len(seg)) % 2 == 0, a if c == 0 else b,
                        -a if c == 0 else -b)
        np.testing.assert_allclose(seg, want, rtol=1e-5, err_msg=f"channel {c} at {lo}")
    assert np.isfinite(y[0, 1, -(1 << 20):]).all()


def test_roi_align_over_2_31_elements():
    from reference.roi_ops import roi_align as ref
    C, H, W = 2, 32800, 32800           # 2 * 32800**2 = 2.15e9 > 2**31 elements, float32
    assert C * H * W > BIG
    _need(C * H * W * 4)
    # x[c, h, w] = 100 c + sin(h / 37) + cos(w / 53), filled in row blocks: smooth, because
    # float32 sample coordinates near 32768 are only good to ~0.004 pixels (as in torchvision),
    # while a wrapped index would land in another channel (off by 100) or row
    x = np.empty((1, C, H, W), np.float32)
    col = np.cos(np.arange(W) / 53).astype(np.float32)
    for c in range(C):
        row = (np.sin(np.arange(H) / 37) + 100 * c).astype(np.float32)
        for h0 in range(0, H, 4096):
            np.add(row[h0:h0 + 4096, None], col[None, :], out=x[0, c, h0:h0 + 4096])
    rois = np.array([[0, 10.3, 20.7, 40.2, 45.9],                     # start of the tensor
                     [0, W - 40.5, H - 30.2, W - 2.1, H - 1.4],        # flat index > 2**31
                     [0, W / 2, H - 20, W / 2 + 17, H + 5],            # beyond the bottom edge
                     [0, W - 9, 0.5, W + 3, 12.25]], np.float32)
    out = fastnorm.roi_align(x, rois, 5, 1.0, 2, True)
    assert out.shape == (4, C, 5, 5)
    for k, r in enumerate(rois.astype(np.float64)):
        x0, y0 = max(int(r[1]) - 4, 0), max(int(r[2]) - 4, 0)
        x1, y1 = min(int(r[3]) + 6, W), min(int(r[4]) + 6, H)
        crop = x[:, :, y0:y1, x0:x1].astype(np.float64)
        rr = r.copy()
        rr[[1, 3]] -= x0
        rr[[2, 4]] -= y0
        # the crop ends where the map ends, so border handling is the same
        want = ref(crop, rr[None], 5, 5, 1.0, 2, True, False)
        np.testing.assert_allclose(out[k], want[0], rtol=0, atol=2e-3, err_msg=f"roi {k}")


def test_roi_align_over_2_31_elements_cuda_emulated(monkeypatch):
    """The CUDA forward (align_fwd) on the emulator past 2**31 elements, NCHW and channels-last:
    the launcher must take its 64-bit index path (channels-last, a pixel's offset times C passes
    2**31: a wrapped 32-bit index reads before the buffer, which the emulator's guard pages
    report, or elsewhere in the map). float16 (4.3 GiB, about twice that at the launch: the
    emulator's guarded copy), one layout at a time, without the reverse-order re-run."""
    emu = pytest.importorskip("fastnorm._cuda.emulator")
    from reference.roi_ops import roi_align as ref
    C, H, W = 2, 32800, 32800
    _need(2 * C * H * W * 2)
    monkeypatch.setenv("FASTNORM_EMULATOR_RACECHECK", "0")
    col = np.cos(np.arange(W) / 53)

    def rows(c, h0):          # x[c, h0:h0 + 2048, :] = 100 c + sin(h / 37) + cos(w / 53)
        row = np.sin(np.arange(h0, min(h0 + 2048, H)) / 37) + 100 * c
        return (row[:, None] + col[None, :]).astype(np.float16)

    rois = np.array([[0, 10.3, 20.7, 40.2, 45.9],
                     [0, W - 40.5, H - 30.2, W - 2.1, H - 1.4],
                     [0, W / 2, H - 20, W / 2 + 17, H + 5],
                     [0, W - 9, 0.5, W + 3, 12.25]], np.float16)
    R = emu.asarray(rois)
    want = []
    for cl in (False, True):
        X = emu.empty((1, H, W, C) if cl else (1, C, H, W), np.float16)
        for c in range(C):
            for h0 in range(0, H, 2048):
                if cl:
                    X[0, h0:h0 + 2048, :, c] = emu.asarray(rows(c, h0))
                else:
                    X[0, c, h0:h0 + 2048] = emu.asarray(rows(c, h0))
        out = fastnorm.roi_align(X, R, 5, 1.0, 2, True, channels_last=cl).get()
        del X
        if cl:
            out = np.moveaxis(out, -1, 1)
        assert out.shape == (4, C, 5, 5) and out.dtype == np.float16
        for k, r in enumerate(rois.astype(np.float64)):
            x0, y0 = max(int(r[1]) - 4, 0), max(int(r[2]) - 4, 0)
            x1, y1 = min(int(r[3]) + 6, W), min(int(r[4]) + 6, H)
            if not cl:
                crop = np.stack([np.concatenate([rows(c, h0)[:, x0:x1] for h0 in
                                                 range(y0 - y0 % 2048, y1, 2048)])
                                 [y0 % 2048:y0 % 2048 + y1 - y0] for c in range(C)])[None]
                rr = r.copy()
                rr[[1, 3]] -= x0
                rr[[2, 4]] -= y0
                want.append(ref(crop.astype(np.float64), rr[None], 5, 5, 1.0, 2, True, False))
            np.testing.assert_allclose(out[k].astype(np.float64), want[k][0], rtol=0, atol=0.1,
                                       err_msg=f"roi {k}, channels_last {cl}")
