"""The seam between op modules and kernels: every contract of ``fastnorm._kernels`` is accepted
exactly, by name, by its CPU and its CUDA entry point, and the integer codes and launch constants
shared with the ``.pyx``/``.cu``/``.h`` sources agree with their Python definitions."""
import importlib
import inspect
import pathlib
import re

import pytest

from fastnorm import _kernels

ROOT = pathlib.Path(__file__).resolve().parent.parent
SOURCES = sorted((ROOT / "src").glob("*.pyx")) + sorted((ROOT / "src").glob("*.h")) + \
    sorted((ROOT / "fastnorm" / "_cuda").glob("*.cu"))


@pytest.mark.parametrize("op,entry", sorted(_kernels.CONTRACTS))
def test_cpu_and_cuda_entry_points_take_the_contract(op, entry):
    contract = _kernels.CONTRACTS[op, entry]
    want = list(contract._fields) + ["nthreads"]
    for backend in ("_cpu", "_cuda"):
        fn = getattr(importlib.import_module(f"fastnorm.{backend}.{op}"), entry)
        got = list(inspect.signature(fn).parameters)
        assert got == want, f"fastnorm.{backend}.{op}.{entry}{tuple(got)} != {contract.__name__}"


def test_every_op_module_calls_both_entry_points_with_a_contract():
    # op modules name their kernels statically: call.run(cpu.<entry>, cuda.<entry>, Contract(...))
    called = set()
    for op in {op for op, _ in _kernels.CONTRACTS}:
        text = (ROOT / "fastnorm" / f"{op}.py").read_text()
        for cpu_fn, cuda_fn, contract in re.findall(
                r"call\.run\(cpu\.(\w+), cuda\.(\w+),\s*(\w+)\(", text):
            assert cpu_fn == cuda_fn
            assert _kernels.CONTRACTS[op, cpu_fn].__name__ == contract
            called.add((op, cpu_fn))
        assert "call.run(\"" not in text
    assert called == set(_kernels.CONTRACTS)


def _named_ints(text):
    """Integer constants a source names: enum members, #defines, const ints, Python ints."""
    pairs = re.findall(r"\b([A-Z][A-Z0-9_]*)\s*=\s*(-?\d+)\b", text)
    pairs += re.findall(r"#define\s+([A-Z][A-Z0-9_]*)\s+(-?\d+)\b", text)
    out = {}
    for name, value in pairs:
        out.setdefault(name.removeprefix("FN_"), set()).add(int(value))
    return out


def test_integer_codes_match_the_sources():
    expected = {f"{prefix}_{'NONE' if key is None else key.upper()}": value
                for prefix, codes in _kernels.SOURCE_NAMES.items()
                for key, value in codes.items()}
    found = {}
    for path in SOURCES:
        for name, values in _named_ints(path.read_text()).items():
            if name in expected:
                assert values == {expected[name]}, f"{path.name}: {name} = {values}"
                found.setdefault(name, []).append(path.name)
    # every code is defined on both sides of the seam that compares it
    for prefix, cpu, cuda in (("ACT", "group_norm.pyx", "group_norm.cu"),
                              ("MODE", "roi_ops.pyx", "roi_ops.cu"),
                              ("CRIT", "nms.pyx", "nms.cu"), ("DECAY", "nms.pyx", "nms.cu"),
                              ("METRIC", "nms.pyx", "nms.cu")):
        for name in (n for n in expected if n.startswith(prefix + "_")):
            assert {cpu, cuda} <= set(found.get(name, ())), (name, found.get(name))


@pytest.mark.parametrize("op", ["group_norm", "roi_ops", "nms"])
def test_launch_constants_match_their_kernels(op):
    # constants a launcher shares with its .cu (block sizes the kernels are written for, kernel
    # families) carry the same name on both sides and must agree
    launcher = importlib.import_module(f"fastnorm._cuda.{op}")
    cu = _named_ints((ROOT / "fastnorm" / "_cuda" / f"{op}.cu").read_text())
    shared = {n: getattr(launcher, n) for n in dir(launcher)
              if n in cu and isinstance(getattr(launcher, n), int)}
    assert shared, f"no constant shared by fastnorm/_cuda/{op}.py and {op}.cu"
    for name, value in shared.items():
        assert cu[name] == {value}, f"{name}: {op}.py has {value}, {op}.cu {cu[name]}"
