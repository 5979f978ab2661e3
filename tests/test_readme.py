"""The README's NumPy quickstart, its CUDA emulator example and its main job (`python -m fastnorm`)
run as written."""
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_numpy_quickstart_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    ns = {}
    exec(blocks[0], ns)                      # the first block: NumPy (CPU)
    assert ns["y"].shape == (8, 64, 64, 256)
    assert ns["feats"].shape == (1000, 256, 7, 7)
    assert ns["keep"].dtype.name == "int64" and 0 < len(ns["keep"]) <= 1000
    assert ns["det_boxes"].shape == (8, 300, 4) and ns["num"].shape == (8,)
    assert (ns["num"] > 0).all() and (ns["det_scores"][:, :ns["num"].min()] > 0.25).all()


def test_rotated_example_runs():
    block = next(b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
                 if "rboxes" in b)
    ns = {}
    exec(block, ns)
    assert ns["iou"].shape == (3, 3) and ns["iou"].dtype.name == "float32"
    assert np.allclose(np.diag(ns["iou"]), 1) and 0.5 < ns["iou"][0, 1] < 1
    assert ns["keep"].tolist() == [0, 2] and ns["feats"].shape == (3, 8, 7, 7)


def test_multi_scale_example_runs():
    block = next(b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
                 if "multi_scale_roi_align" in b)
    ns = {}
    exec(block, ns)
    assert ns["pooled"].shape == (3, 16, 7, 7)
    assert [g.shape for g in ns["grads"]] == [p.shape for p in ns["pyramid"]]
    assert [bool(g.any()) for g in ns["grads"]] == [True, True, False, True]    # P2, P3, P5


def test_main_job_runs(tmp_path):
    # report + demo pipeline + quick benchmark, in a fresh interpreter outside the source tree
    out = subprocess.run([sys.executable, "-m", "fastnorm"], capture_output=True, text=True,
                         cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    for part in ("demo: detection head", "total", "quick benchmark", "group_norm", "nms"):
        assert part in out.stdout, part


@pytest.mark.emulated
def test_emulator_example_runs(capsys):
    block = next(b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
                 if "emulator as cp" in b)
    exec(block, {})
    diff, counts = capsys.readouterr().out.splitlines()
    assert float(diff) < 1e-5
    assert counts.startswith("Counts(launches=3, ops=0, gemms=0, syncs=0,") and "atomics=0" in counts


def test_torch_compile_export_and_onnx_example_runs(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    block = next(b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
                 if "onnx_translation_table" in b)
    monkeypatch.chdir(tmp_path)
    ns = {}
    exec(block, ns)
    assert ns["y"].shape == (2, 64, 7, 7) and (tmp_path / "head.onnx").stat().st_size > 0
    ops = {n.op_type for n in ns["onnx_program"].model_proto.graph.node}
    assert {"GroupNormalization", "DeformConv", "RoiAlign"} <= ops, ops
