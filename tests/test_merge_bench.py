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
