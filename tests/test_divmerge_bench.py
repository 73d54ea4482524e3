"""The DivMerge benchmark runs end to end in its quick mode and ends with its JSON line: ratios finite and
positive and equal to the reported times' ratios, as many timed runs as asked, the factored and dense
approaches giving the same gradient (no timing claims)."""

from __future__ import annotations

import json
import math

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("isolated_cache")]


def test_quick_divmerge_bench_prints_json_last(capsys, load_bench, timed_runs):
    bench = load_bench("divmerge_bench")
    timed = timed_runs(bench, "_median")
    assert bench.main(["--quick", "--threads", "1", "--repeats", "1"]) == 0
    data = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert data["quick"] is True and data["step_batch"] == [4, 4]
    # the step and the base step, then factored and dense for 2 models x (T = 2, 8): each --repeats times
    # after one warm-up call
    assert len(timed) == 2 + 2 * 2 * 2 and all(r == 1 and made == 2 for r, made, _ in timed), timed
    assert all(math.isfinite(t) and t > 0 for _, _, t in timed)
    assert data["step_vs_base"] == pytest.approx(data["t_divmerge_step_s"] / data["t_base_step_s"])
    for tag in ("minilm_T2", "minilm_T8", "qwen_T2", "qwen_T8"):
        ratio = data[f"time_vs_dense_{tag}"]
        assert math.isfinite(ratio) and ratio > 0
        assert ratio == pytest.approx(data[f"t_factored_{tag}_s"] / data[f"t_dense_{tag}_s"])
        assert data[f"grad_max_abs_diff_{tag}"] < 1e-5  # both approaches give the same gradient
    for key in ("step_vs_base", "time_vs_dense", "memory_vs_dense"):
        assert math.isfinite(data[key]) and data[key] > 0, key
    assert data["counted_factored_qwen_T8_bytes"] < data["counted_dense_qwen_T8_bytes"]
