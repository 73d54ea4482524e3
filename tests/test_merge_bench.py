"""bench/ never imports tests/: its random factors come from bench/synthetic.py (same streams)."""

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


def test_merge_bench_does_not_import_tests():
    names = _imports(BENCH / "merge_bench.py")
    assert not any(n == "tests" or n.startswith("tests.") for n in names), names
    assert "bench.synthetic" in names


def test_bench_synthetic_matches_the_test_helpers():
    from bench.synthetic import LLAMA3_8B_SHAPES, random_factors
    from tests import synthetic

    assert LLAMA3_8B_SHAPES == synthetic.LLAMA3_8B_SHAPES
    for kw in ({}, {"rank_b": 2, "rank_a": 1}):
        ours = random_factors(12, 10, 4, seed=3, **kw)
        theirs = synthetic.random_factors(12, 10, 4, seed=3, **kw)
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


def test_dense_formulations_of_the_native_methods_equal_the_factored_merges():
    """The baselines of ``merge_bench.py --native`` compute the same updates as geometry.merging."""
    import pytest

    from bench.merge_bench import NATIVE_METHODS, _dense_merge
    from geometry.merging import merge
    from tests.synthetic import random_adapter

    ads = [random_adapter(f"t{i}", layers=1, kinds={"v": (24, 40)}, r=3, seed=i, dtype=torch.float64)
           for i in range(3)]
    key = next(iter(ads[0].modules))
    for method in NATIVE_METHODS:
        dense = _dense_merge(method, ads, key)
        factored = merge(ads, method, dtype=torch.float64).modules[key].dense()
        assert float((dense - factored).norm() / dense.norm()) == pytest.approx(0.0, abs=1e-10), method
