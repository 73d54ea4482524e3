"""The runtime benchmark runs end to end in its quick mode and ends with its JSON line (no timing claims)."""

from __future__ import annotations

import importlib.util
import json

from geometry.diskcache import REPO


def test_quick_runtime_bench_prints_json_last(capsys):
    spec = importlib.util.spec_from_file_location("runtime_bench", REPO / "bench" / "runtime_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--quick", "--threads", "1", "--batch", "4", "--repeats", "1"]) == 0
    data = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"overhead_vs_base", "time_vs_dense", "time_vs_dense_with_build", "memory_vs_dense"} <= set(data)
    assert data["quick"] is True and data["adapters"] == 8 and data["memory_adapters"] == 8
    assert all(data[k] > 0 for k in ("overhead_vs_base", "time_vs_dense", "memory_vs_dense"))
    assert data["max_abs_diff_logits"] < 1e-4  # the runtime and the dense weights compute the same model
    # bytes counted on meta tensors: 8 adapters of r = 16 hold 8 * 16 * (m + n) (+ weights) per module
    per_layer = sum(m + n for m, n in [(896, 896), (128, 896), (128, 896), (896, 896), (4864, 896),
                                       (4864, 896), (896, 4864)])
    assert data["runtime_bytes"] == 4 * data["qwen_layers"] * 7 * 8 * 16 + 4 * data["qwen_layers"] * 8 * 16 * per_layer
    assert data["dense_bytes"] == 4 * data["qwen_layers"] * (2 * 896 * 896 + 2 * 128 * 896 + 3 * 4864 * 896)
