"""The geometry benchmark runs end to end on tiny shapes and ends with its JSON line (no timing claims)."""

from __future__ import annotations

import importlib.util
import json

from geometry.diskcache import REPO


def test_quick_bench_prints_json_last(capsys):
    spec = importlib.util.spec_from_file_location("geometry_bench", REPO / "bench" / "geometry_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--quick", "--adapters", "2", "--layers", "1"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    data = json.loads(last)
    assert {"factored_s", "dense_s_extrapolated", "ratio"} <= set(data) and data["quick"] is True
    assert data["factored_s"] > 0 and data["dense_s_extrapolated"] > 0
