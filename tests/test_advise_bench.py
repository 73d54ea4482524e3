"""bench/advise_bench.py: the dense functional_call baseline computes the advisor's criterion (checked inside the
bench for every candidate), and the bench prints its ratios and a JSON line last."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow  # loads all-MiniLM-L6-v2 and scores a few candidates (~20 s)


def test_advise_bench_smoke(capsys, load_bench, monkeypatch):
    bench = load_bench("advise_bench")
    monkeypatch.setattr("sys.argv", ["advise_bench", "--tasks", "2", "--budget", "3", "--samples", "4",
                                     "--repeats", "1"])
    bench.main()
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("T = 2: 3 candidates") and "criteria equal" in lines[0]
    result = json.loads(lines[-1])["T2"]
    assert result["candidates"] == 3 and result["ratio"] > 0 and result["ratio_scoring_only"] > 0
