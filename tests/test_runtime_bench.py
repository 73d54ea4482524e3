"""The runtime benchmark runs end to end in its quick mode and ends with its JSON line: ratios finite and
positive, as many timed runs as asked, the runtime and dense weights computing the same logits, and the
bytes it counts equal to the formula (no timing claims)."""

from __future__ import annotations

import json
import math

import pytest


@pytest.mark.slow
def test_quick_runtime_bench_prints_json_last(capsys, load_bench, timed_runs):
    bench = load_bench("runtime_bench")
    timed = timed_runs(bench, "_median_time")
    assert bench.main(["--quick", "--threads", "1", "--batch", "4", "--repeats", "2"]) == 0
    data = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert data["quick"] is True and data["adapters"] == 8 and data["memory_adapters"] == 8
    # base, runtime and dense timed --repeats times (after one warm-up call), the build at least 3 times
    assert [r for r, _, _ in timed] == [2, 2, 3, 2] and all(made == r + 1 for r, made, _ in timed)
    assert all(math.isfinite(t) and t > 0 for _, _, t in timed)
    assert [data[f"t_{k}_s"] for k in ("base", "runtime", "dense_build", "dense")] == [t for _, _, t in timed]
    for key in ("overhead_vs_base", "time_vs_dense", "time_vs_dense_with_build", "memory_vs_dense"):
        assert math.isfinite(data[key]) and data[key] > 0, key
    assert data["overhead_vs_base"] == pytest.approx(data["t_runtime_s"] / data["t_base_s"])
    assert data["time_vs_dense"] == pytest.approx(data["t_runtime_s"] / data["t_dense_s"])
    assert data["max_abs_diff_logits"] < 1e-4  # the runtime and the dense weights compute the same model
    # bytes counted on meta tensors: 8 adapters of r = 16 hold 8 * 16 * (m + n) (+ weights) per module
    per_layer = sum(m + n for m, n in [(896, 896), (128, 896), (128, 896), (896, 896), (4864, 896),
                                       (4864, 896), (896, 4864)])
    assert data["runtime_bytes"] == 4 * data["qwen_layers"] * 7 * 8 * 16 + 4 * data["qwen_layers"] * 8 * 16 * per_layer
    assert data["dense_bytes"] == 4 * data["qwen_layers"] * (2 * 896 * 896 + 2 * 128 * 896 + 3 * 4864 * 896)
    assert data["memory_vs_dense"] == pytest.approx(data["runtime_bytes"] / data["dense_bytes"])
