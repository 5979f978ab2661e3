"""The README's NumPy quickstart runs as written."""
import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_numpy_quickstart_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    ns = {}
    exec(blocks[0], ns)                      # the first block: NumPy (CPU)
    assert ns["y"].shape == (8, 64, 64, 256)
    assert ns["feats"].shape == (1000, 256, 7, 7)
    assert ns["keep"].dtype.name == "int64" and 0 < len(ns["keep"]) <= 1000
