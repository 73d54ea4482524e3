"""bench/ imports the installed library only: its random factors come from geometry.testing, never from tests/."""

from __future__ import annotations

import ast
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_benches_import_neither_tests_nor_a_copy_of_the_generator():
    for path in sorted(BENCH.glob("*.py")):
        names = _imports(path)
        assert not any(n == "tests" or n.startswith("tests.") for n in names), (path.name, names)
        assert "bench.synthetic" not in names and "synthetic" not in names, path.name
    assert "geometry.testing" in _imports(BENCH / "merge_bench.py")
    assert not (BENCH / "synthetic.py").exists()


def test_benches_do_not_edit_sys_path_for_the_library():
    """The benches import the installed package (``pip install -e .``), not the checkout by path."""
    for path in sorted(BENCH.glob("*.py")):
        if path.name in ("structure.py", "crosscheck_fusionbench.py"):
            continue  # structure.py: owned elsewhere; crosscheck: FusionBench's --target folder, not ours
        assert "sys.path.insert" not in path.read_text(), path.name


def test_dense_formulations_of_the_native_methods_equal_the_factored_merges():
    """The baselines of ``merge_bench.py --native`` compute the same updates as geometry.merging."""
    import pytest

    from bench.merge_bench import NATIVE_METHODS, _dense_merge
    from geometry.merging import merge
    from geometry.testing import random_adapter

    ads = [random_adapter(f"t{i}", layers=1, kinds={"v": (24, 40)}, r=3, seed=i, dtype=torch.float64)
           for i in range(3)]
    key = next(iter(ads[0].modules))
    for method in NATIVE_METHODS:
        dense = _dense_merge(method, ads, key)
        factored = merge(ads, method, dtype=torch.float64).modules[key].dense()
        assert float((dense - factored).norm() / dense.norm()) == pytest.approx(0.0, abs=1e-10), method
