"""The DivMerge benchmark runs end to end in its quick mode and ends with its JSON line (no timing claims)."""

from __future__ import annotations

import importlib.util
import json

from geometry.cache import REPO


def test_quick_divmerge_bench_prints_json_last(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTER_ATLAS_CACHE", str(tmp_path / "cache"))
    spec = importlib.util.spec_from_file_location("divmerge_bench", REPO / "bench" / "divmerge_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--quick", "--threads", "1", "--repeats", "1"]) == 0
    data = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"step_vs_base", "time_vs_dense", "memory_vs_dense"} <= set(data)
    assert data["quick"] is True and data["step_batch"] == [4, 4]
    for tag in ("minilm_T2", "minilm_T8", "qwen_T2", "qwen_T8"):
        assert data[f"time_vs_dense_{tag}"] > 0
        assert data[f"grad_max_abs_diff_{tag}"] < 1e-5  # both approaches give the same gradient
    assert all(data[k] > 0 for k in ("step_vs_base", "time_vs_dense", "memory_vs_dense"))
    assert data["counted_factored_qwen_T8_bytes"] < data["counted_dense_qwen_T8_bytes"]
