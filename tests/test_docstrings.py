"""The Examples sections of the public modules' docstrings run as written (DESIGN.md, convention 5).

Every example of every module below must pass, and each module must run at least the examples it
has today, so this cannot pass by collecting nothing (a docstring that loses its examples, or a
module whose functions stop being found, fails here). The framework modules skip, each on its
own, when their framework does not import.
"""
import doctest
import importlib

import pytest

# module -> (framework it needs, docstrings with examples, examples) as of today: raise the
# numbers when adding examples; lowering one needs a reason
MODULES = {
    "fastnorm.group_norm": (None, 2, 10),
    "fastnorm.deform_conv": (None, 2, 16),
    "fastnorm.roi_ops": (None, 12, 56),
    "fastnorm.nms": (None, 14, 77),
    "fastnorm._threads": (None, 1, 2),          # fastnorm.threads
    "fastnorm.torch": ("torch", 1, 5),
    "fastnorm.jax": ("jax", 1, 6),
    "fastnorm.dask": ("dask.array", 1, 4),
}


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    framework, least_docstrings, least_examples = MODULES[name]
    if framework is not None:
        pytest.importorskip(framework)
    module = importlib.import_module(name)
    tests = [t for t in doctest.DocTestFinder(exclude_empty=True).find(module, name)
             if t.examples]
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report = []
    for test in sorted(tests, key=lambda t: t.name):
        runner.run(test, out=report.append)
    failed, attempted = runner.summarize(verbose=False)
    assert failed == 0, f"{failed} of {attempted} examples in {name} failed:\n" + "".join(report)
    assert len(tests) >= least_docstrings, \
        f"{name}: examples in {len(tests)} docstrings ({[t.name for t in tests]}), " \
        f"expected at least {least_docstrings}"
    assert attempted >= least_examples, \
        f"{name}: {attempted} examples ran, expected at least {least_examples}"
