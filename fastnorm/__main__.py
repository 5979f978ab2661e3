"""``python -m fastnorm``: environment report, a small demo pipeline, and a quick benchmark."""
import sys
import time

import numpy as np

import fastnorm
from fastnorm._bench import Table, copy_bandwidth, machine, timeit


def report():
    print(f"fastnorm {fastnorm.__version__}")
    for k, v in fastnorm.info().items():
        print(f"  {k:14s} {v}")
    print(f"  machine        {machine()}")


def demo():
    """A GroupNorm(+SiLU) layer's forward and backward on a synthetic feature map."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 64, 56, 56), dtype=np.float32)
    w = rng.standard_normal(64, dtype=np.float32)
    b = rng.standard_normal(64, dtype=np.float32)
    t0 = time.perf_counter()
    y, mean, rstd = fastnorm.group_norm(x, 32, w, b, activation="silu", return_stats=True)
    t1 = time.perf_counter()
    gx, gw, gb = fastnorm.group_norm_backward(np.ones_like(y), x, mean, rstd, 32, w, b,
                                              activation="silu")
    t2 = time.perf_counter()
    print("\ndemo: GroupNorm(32 groups) + SiLU on x (2, 64, 56, 56) float32")
    print(f"  forward  {1e3 * (t1 - t0):7.2f} ms   y mean {float(y.mean()):+.4f}")
    print(f"  backward {1e3 * (t2 - t1):7.2f} ms   |grad_x| {float(np.abs(gx).mean()):.4f}, "
          f"grad_weight[:3] {np.round(gw[:3], 3)}")


def quick_bench():
    """fastnorm vs any installed peer on one GroupNorm shape."""
    shape, G = (8, 256, 64, 64), 32
    x = np.random.default_rng(1).standard_normal(shape, dtype=np.float32)
    w, b = np.ones(shape[1], np.float32), np.zeros(shape[1], np.float32)
    table = Table(f"quick benchmark: GroupNorm forward {shape} G{G}, float32, "
                  f"{fastnorm.get_num_threads()} threads", "GB/s", copy_bandwidth(64 << 20))
    case = "x".join(map(str, shape))
    table.add(case, "fastnorm", timeit(lambda: fastnorm.group_norm(x, G, w, b), repeat=3),
              2 * x.nbytes)
    try:
        import torch
        torch.set_num_threads(fastnorm.get_num_threads())
        xt, wt, bt = map(torch.from_numpy, (x, w, b))
        with torch.no_grad():
            table.add(case, "torch", timeit(lambda: torch.nn.functional.group_norm(xt, G, wt, bt),
                                            repeat=3), 2 * x.nbytes)
    except ImportError:
        pass
    print()
    print(table.markdown())
    print("\nFull suites: python bench/bench_<op>.py (see README).")


def main(argv=None):
    report()
    demo()
    quick_bench()
    return 0


if __name__ == "__main__":
    sys.exit(main())
