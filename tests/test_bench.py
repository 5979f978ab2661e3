"""The benchmark harness (fastnorm._bench, bench/*.py) and `python -m fastnorm bench`: rates in
the table's own unit, results handed back as JSON rather than scraped from printed markdown, no
file written unless asked, --threads on every suite, and the torchvision peer found without any
machine path."""
import datetime
import importlib.util
import pathlib
import re
import sys
import types

import pytest

import fastnorm.__main__ as cli
from fastnorm import _bench
from fastnorm._bench import Table

BENCH = pathlib.Path(__file__).resolve().parent.parent / "bench"
SUITES = sorted(BENCH.glob("bench_*.py"))


def test_rates_count_in_the_tables_unit():
    t = Table("nms", unit="Mbox/s")
    t.add("10k", "fastnorm", 0.002, 10_000)          # work: boxes
    t.add("10k", "torchvision", 0.020, 10_000)
    assert t.rate(0.002, 10_000) == pytest.approx(5.0)
    rows = [r for r in t.markdown().splitlines() if r.startswith("| 10k")]
    assert rows[0].endswith("| 5.0 |") and rows[1].endswith("| 10.00x | 0.5 |")
    assert t.speedups() == [("10k", "torchvision", pytest.approx(10.0))]
    t.add("10k", "slow peer", 0.275, 10_000)
    assert t.markdown().splitlines()[-1].endswith("| 0.036 |")
    g = Table("gn", unit="GB/s")
    g.add("x", "fastnorm", 0.5, 4e9)                 # work: bytes
    assert g.rate(0.5, 4e9) == pytest.approx(8.0)
    with pytest.raises(ValueError, match="unit"):
        Table("t", unit="boxes/s")


def test_tables_round_trip_through_json_and_nothing_is_written_unasked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    t = Table("t", "GFLOP/s", ceiling=100.0)
    t.add("case", "fastnorm", 0.1, 2e9)
    t.add("case", "peer", 0.3, 2e9)
    t.notes.append("case fastnorm: host 9 us per call")
    text = _bench.write_results("demo", [t], "notes")
    assert "### t" in text and "notes" in text and "\n- case fastnorm: host 9 us" in text
    assert list(tmp_path.iterdir()) == []           # no directory named: no file
    path = tmp_path / "t.json"
    _bench.write_results("demo", [t], out=str(tmp_path / "res"), json_path=str(path))
    assert [p.name for p in (tmp_path / "res").iterdir()] == \
        [f"{datetime.date.today().isoformat()}-demo.md"]
    (back,) = _bench.read_json(path)
    assert (back.title, back.unit, back.ceiling, back.rows, back.notes) == \
        (t.title, t.unit, t.ceiling, t.rows, t.notes)
    assert back.speedups() == [("case", "peer", pytest.approx(3.0))]


def test_suite_command_line(tmp_path):
    script = str(BENCH / "bench_x.py")
    a = _bench.bench_args("doc", script, [])
    assert a.threads == 2 and a.results_dir == str(BENCH / "results") and a.json is None
    assert _bench.bench_args("doc", script, ["--no-write"]).results_dir is None
    a = _bench.bench_args("doc", script, ["--out", str(tmp_path), "--threads", "3",
                                          "--json", "r.json"])
    assert (a.results_dir, a.threads, a.json) == (str(tmp_path), 3, "r.json")
    assert _bench.bench_args("doc", script, ["--torchvision-python", "py"],
                             torchvision=True).torchvision_python == "py"
    for bad in (["--threads", "0"], ["--no-write", "--out", "d"], ["--torchvision-python", "p"]):
        with pytest.raises(SystemExit):
            _bench.bench_args("doc", script, bad)


def _load(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", SUITES, ids=lambda p: p.stem)
def test_every_suite_takes_threads_and_names_no_machine_path(path, capsys):
    assert not re.search(r"""["'](/work|/home|/opt|/usr|/tmp)/""", path.read_text()), \
        "an absolute path in a suite"
    with pytest.raises(SystemExit) as e:
        _load(path).main(["--help"])
    assert e.value.code == 0
    help_text = capsys.readouterr().out
    for option in ("--threads", "--no-write", "--out", "--json", "Result files:"):
        assert option in help_text, option
    if path.stem not in ("bench_group_norm", "bench_cuda_model"):  # with a torchvision peer
        assert "--torchvision-python" in help_text


PEER = r'''
def run(d, threads, k):
    return {"k": k, "threads": threads, "d": d, "t": timeit(lambda: None, repeat=1, min_time=0)}
'''


def test_torchvision_peer_in_this_process(monkeypatch):
    monkeypatch.delenv(_bench.TV_PYTHON_ENV, raising=False)
    monkeypatch.setitem(sys.modules, "torchvision", types.ModuleType("torchvision"))
    out = _bench.run_torchvision(PEER, "dir", 3, k=[1, 2])
    assert out["k"] == [1, 2] and out["threads"] == 3 and out["d"] == "dir"
    assert out["t"] >= 0 and out["where"] == "in this process"


def test_torchvision_peer_in_a_named_interpreter(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torchvision", None)        # does not import here
    monkeypatch.delenv(_bench.TV_PYTHON_ENV, raising=False)
    assert _bench.run_torchvision(PEER, "dir", 1, k=0) is None
    assert "--torchvision-python" in capsys.readouterr().err
    out = _bench.run_torchvision(PEER, "dir", 2, sys.executable, k={"a": 1})
    assert out["k"] == {"a": 1} and out["threads"] == 2
    assert out["where"].startswith("in a second interpreter")
    monkeypatch.setenv(_bench.TV_PYTHON_ENV, sys.executable)      # the environment variable
    assert _bench.run_torchvision(PEER, "dir", 1, k=5)["k"] == 5
    monkeypatch.setenv(_bench.TV_PYTHON_ENV, "/nonexistent/python")
    assert _bench.run_torchvision(PEER, "dir", 1, k=5) is None
    assert "does not exist" in capsys.readouterr().err


FAKE_SUITE = r'''
"""A stand-in suite: real harness, instant timings."""
from fastnorm._bench import Table, bench_args, finish


def main(argv=None):
    args = bench_args(__doc__, __file__, argv)
    t = Table(f"fake, {args.threads} threads")
    t.add("case", "fastnorm", 1.0, 1e9)
    t.add("case", "peer", 3.0, 1e9)
    # a decoy: the old scraper of printed markdown would have read 99.00x here
    print("| case | decoy | 1.000 | 99.00x | |")
    return finish(args, "fake", [t])


if __name__ == "__main__":
    main()
'''


def test_bench_subcommand_reads_the_suites_json(tmp_path, monkeypatch, capsys):
    root = tmp_path / "bench"
    root.mkdir()
    (root / "bench_group_norm.py").write_text(FAKE_SUITE)
    monkeypatch.setattr(cli, "_bench_dir", lambda: root)
    assert cli.main(["bench", "--op", "group_norm", "--threads", "3"]) == 0
    out = capsys.readouterr().out
    assert "### fake, 3 threads" in out                          # the suite's output, streamed
    summary = out[out.index("speed-ups of fastnorm"):]
    assert "3.00x  group_norm   case  vs peer" in summary and "99.00x" not in summary
    assert "No result files were written" in summary
    assert not (root / "results").exists()                        # nothing written unasked
    results = tmp_path / "out"
    assert cli.main(["bench", "--op", "group_norm", "--out", str(results)]) == 0
    assert [p.name for p in results.iterdir()] == \
        [f"{datetime.date.today().isoformat()}-fake.md"]
    (root / "bench_group_norm.py").write_text("print('| case | peer | 1 | 2.00x | |')\n")
    assert cli.main(["bench", "--op", "group_norm"]) == 1          # exited 0 without results
    assert "no results" in capsys.readouterr().out


def test_compare_builds_times_both_trees_on_the_same_cases(tmp_path, capsys):
    # this checkout against itself: every case of both workers is timed and tabulated, a tree
    # whose `import fastnorm` loads another tree is refused, and nothing is written unasked
    tool = _load(BENCH / "compare_builds.py")
    root = str(BENCH.parent)
    result = tool.main([root, root, "--quick", "--rounds", "2", "--no-write"])
    assert len(result) == 15 and all(c.endswith("(tiny)") for c in result)
    for before, after, ratios in result.values():
        assert before > 0 and after > 0 and len(ratios) == 2
    table = capsys.readouterr().out
    assert table.count("(tiny) |") == 15 and "after / before" in table
    with pytest.raises(SystemExit, match="does not load its own tree"):
        tool.main([str(tmp_path), root, "--quick", "--rounds", "1", "--no-write"])
    assert not list(tmp_path.iterdir())


def test_nms_suite_numpy_loops_and_ort_peer_keep_what_fastnorm_keeps(monkeypatch):
    """bench_nms's peers compute the same thing as the fastnorm calls they are timed against."""
    import numpy as np
    suite = _load(BENCH / "bench_nms.py")
    for name, (ours, loop, _) in suite._variants(suite.variant_inputs(400)).items():
        res, ref = ours(), loop()
        keep = res[0] if isinstance(res, tuple) else res
        assert len(keep) > 0 and np.array_equal(np.sort(keep), np.sort(ref[0])), name
    pytest.importorskip("onnxruntime")
    monkeypatch.setitem(suite.COMBINED, "total", 30)
    boxes, scores = suite.combined_inputs(2, 300, 6)
    for thr in suite.COMBINED_CASES:
        _, _, cls, num, idx = suite.fastnorm.combined_nms(boxes, scores, 100, 30, 0.45, thr,
                                                          return_indices=True)
        mine = {(i, int(cls[i, k]), int(idx[i, k])) for i in range(2) for k in range(num[i])}
        assert len(mine) == 60 and mine == set(map(tuple, suite._ort_combined(
            boxes, scores, thr, 1)().tolist()))


def test_cuda_cost_model_counts_on_the_emulator(tmp_path):
    """bench_cuda_model runs the NMS kernels on the emulator (--quick) and turns their counts into
    implied H100 times: the single-class sweep's barrier chain bounds it above the per-class
    one, and more barriers, atomics, CuPy operations or syncs never make a call cheaper."""
    pytest.importorskip("fastnorm._cuda.emulator")
    m = _load(BENCH / "bench_cuda_model.py")
    path = tmp_path / "model.json"
    m.main(["--quick", "--no-write", "--json", str(path)])
    (t,) = _bench.read_json(path)
    got = {case: s for case, impl, s, _ in t.rows}
    assert got["nms 10k boxes"] > got["batched_nms 10k boxes, 80 classes"] > 0
    from fastnorm._cuda.emulator import Launch
    one = [Launch("k", 1, 256, 100, 0, 10)]
    assert m.implied(one, 0, 1e6, 1e6) < m.implied([one[0]._replace(barriers=200)], 0, 1e6, 1e6)
    assert m.implied(one, 0, 1e6, 1e6) < m.implied([one[0]._replace(atomics=10 ** 9)], 0, 1e6,
                                                   1e6)
    assert m.implied(one, 0, 1e6, 1e6) < m.implied(one, 0, 1e6, 1e6, ops=5) < \
        m.implied(one, 1, 1e6, 1e6, ops=5)


@pytest.mark.parametrize("name", ["roi_ops", "nms", "deform_conv", "group_norm"])
def test_cuda_only_runs_only_the_cuda_tables(name, monkeypatch, tmp_path):
    """``--cuda-only`` (a GPU session's bench stage) skips every CPU table and peer. The CUDA
    tables run here on a stand-in device whose arrays are NumPy's (fastnorm's CPU backend, no
    timing): each fastnorm row is there with its time breakdown, and the torchvision CUDA rows
    where torch sees a GPU.
    Without a GPU, group_norm's CUDA tables (torch tensors on the device) are left out."""
    import numpy as np
    suite = _load(BENCH / f"bench_{name}.py")
    fake = types.SimpleNamespace(asarray=np.asarray, asnumpy=np.asarray)
    monkeypatch.setattr(suite, "cuda_device", lambda: (fake, lambda: None))
    monkeypatch.setattr(suite, "timeit", lambda fn, **kw: (fn(), 1e-3)[1])
    if hasattr(suite, "cuda_profile"):
        monkeypatch.setattr(suite, "cuda_profile", lambda fn, sync: "profiled")
    for cpu_part in ("cpu_tables", "roi_align_section", "variant_table", "torchvision_cpu"):
        if hasattr(suite, cpu_part):
            monkeypatch.setattr(suite, cpu_part, None)      # called: a TypeError
    path = tmp_path / "t.json"
    suite.main(["--cuda-only", "--no-write", "--json", str(path)])
    tables = _bench.read_json(path)
    if name == "group_norm":
        assert tables == []
        return
    assert tables and all("CUDA" in t.title for t in tables)
    cases = {case for t in tables for case, impl, _, _ in t.rows if impl == "fastnorm"}
    want = {"roi_ops": 9, "nms": 4, "deform_conv": 8}[name]
    assert len(cases) == want, sorted(cases)
    notes = [n for t in tables for n in t.notes]        # a breakdown per fastnorm row
    assert len(notes) == want and all(n.endswith(": profiled") for n in notes)


def test_cuda_profile_breaks_a_call_down_by_kernel():
    """cuda_profile's line: the host time per call, the device time, each fastnorm kernel the
    call launched (on the emulator here), and the rest."""
    emu = pytest.importorskip("fastnorm._cuda.emulator")
    import numpy as np
    import fastnorm
    from fastnorm import _cuda
    x = emu.asarray(np.random.default_rng(0).standard_normal((2, 8, 6, 6)).astype(np.float32))
    with _cuda.using(emu):
        line = _bench.cuda_profile(lambda: fastnorm.group_norm(x, 4), lambda: None, repeat=2)
    assert re.fullmatch(r"host \d+ us per call; device \d+ us: (gn_\w+<[^>]+> \d+, ){3}"
                        r"other \d+", line), line
    assert {"gn_stats_nchw<float, 4>", "gn_finalize<float>"} < set(re.findall(r"gn_\w+<[^>]+>",
                                                                            line))
