"""DivMerge / AdaMerging on a causal LM (a tiny random Qwen2 built from a config): greedy continuations of the
fine-tuned models, teacher-forced merged distributions, stored vs recomputed references, gradients,
the exported merge, ANP with ROUGE; ROUGE from rouge-score against the written-out formulas."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from geometry.errors import AtlasError
from geometry.evaluation import metrics
from geometry.io.loader import load_adapter
from geometry.learned import AdaMerging, DivMerge
from geometry.runtime import Runtime
from tests.learned_fixtures import causal_study

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("isolated_cache")]  # a tiny causal LM per module


@pytest.fixture(scope="module")
def causal(tmp_path_factory):
    folders, tasks = causal_study(tmp_path_factory.mktemp("causal"))
    return [load_adapter(f) for f in folders], tasks


def test_one_task_recovers_one_and_references_stored_or_recomputed_agree(causal):
    adapters, tasks = causal
    run = DivMerge(adapters[:1], tasks, samples=12, epochs=20, lr=0.05, max_new_tokens=6)
    start, _ = run.objective_value()
    cont = run._terms[0]._continuations["continuation"]
    assert len(cont) == 12 and all(1 <= len(c) <= 6 for c in cont)
    recomputed = DivMerge(adapters[:1], tasks, samples=12, max_new_tokens=6, reference_budget=0)
    again, _ = recomputed.objective_value()
    assert again == pytest.approx(start, rel=1e-5) and any("recomputed teacher-forced" in n for n in recomputed.notes)
    result = run.fit()
    end, _ = run.objective_value()
    assert start > 1e-2 and abs(float(result.coefficients[0, 0]) - 1.0) < 0.05 and end < 1e-2 * start


def test_gradients_equal_finite_differences_on_the_causal_lm(causal):
    adapters, tasks = causal
    run = DivMerge(adapters, tasks, level="layer", divergence="kl", samples=6, max_new_tokens=4)
    assert run.layout.shape == (2, 2)
    gamma = np.array([[0.3, 0.8], [0.6, 0.4]])
    value, grad = run.objective_value(gamma, grad=True)
    eps = 1e-3
    for i, j in np.ndindex(2, 2):
        up, down = gamma.copy(), gamma.copy()
        up[i, j] += eps
        down[i, j] -= eps
        fd = (run.objective_value(up)[0] - run.objective_value(down)[0]) / (2 * eps)
        assert fd == pytest.approx(grad[i, j], rel=5e-3, abs=1e-5)
    assert value > 0


def test_merge_anp_with_rouge_and_adamerging(causal, tmp_path):
    adapters, tasks = causal
    # references of the test split: the fine-tuned models' own greedy outputs, so that ANP is defined
    for ad in adapters:
        rt = Runtime.for_sources(ad)
        rows = [json.loads(line) for line in (tasks / ad.name / "test.jsonl").read_text().splitlines()]
        with rt.apply(ad):
            outputs = rt.generate([r["prompt"] for r in rows], max_new_tokens=32)
        (tasks / ad.name / "test.jsonl").write_text(
            "\n".join(json.dumps({"prompt": r["prompt"], "reference": o or "x"}) for r, o in zip(rows, outputs)))
    run = DivMerge(adapters, tasks, samples=8, max_steps=3, lr=0.1, max_new_tokens=6)
    state = list(run.steps(evaluate_every=3, limit=6))[-1]
    assert state.anp is not None and 0 < state.anp["anp"] < 200
    assert all(s["finetuned"] > 0 for s in state.anp["scores"].values())
    merged = run.merge()
    rt = Runtime.for_sources(adapters)
    enc = rt.encode(["good red cat dog"])
    coefficients = run.layout.runtime_coefficients(torch.tensor(run.coefficients))
    with torch.no_grad():
        with rt.apply(adapters, coefficients=coefficients):
            want = rt.forward(**enc).logits
        with rt.apply(merged):
            got = rt.forward(**enc).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    ada = AdaMerging(adapters, tasks, samples=8, max_new_tokens=6)
    assert ada.settings.lr == 1e-2  # the Table 9 generation setting
    before, _ = ada.objective_value()
    ada.fit()
    assert ada.objective_value()[0] < before


def test_encoder_decoder_is_refused_clearly(tmp_path):
    from tests.families import save_adapter

    path, _ = save_adapter("t5", tmp_path / "t5")
    with pytest.raises(AtlasError, match="encoder-decoder .* not supported"):
        DivMerge([load_adapter(path)], tmp_path)


def test_rouge_from_rouge_score_equals_the_written_formulas():
    pytest.importorskip("rouge_score")
    pairs = [("the cat sat on the mat", "the cat is on a mat"), ("", "a b"), ("A b, c!", "a c b c"),
             ("one two three", "four five")]
    for cand, ref in pairs:
        assert metrics.rouge_1(cand, ref) == pytest.approx(metrics.rouge_1_reference(cand, ref))
        assert metrics.rouge_l(cand, ref) == pytest.approx(metrics.rouge_l_reference(cand, ref))
    assert metrics.rouge_1("the cat sat on the mat", "the cat is on a mat") == pytest.approx(2 / 3)
