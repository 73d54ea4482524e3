"""DivMerge / AdaMerging on a causal LM (a tiny random Qwen2 built from a config): greedy continuations of the
fine-tuned models, teacher-forced merged distributions, stored vs recomputed references, gradients,
the exported merge, ANP with ROUGE; ROUGE from rouge-score against the written-out formulas."""

from __future__ import annotations

import functools
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


def test_output_layer_on_the_continuation_only_equals_the_full_logits(causal):
    """``GenerationTerm._logp`` runs the output layer on the positions predicting the continuation only
    (``logits_to_keep``): the same log-probabilities and the same coefficient gradients as the full
    ``(b, L, V)`` logits gathered, for inputs of different prompt and continuation lengths (padding)."""
    from geometry.learned.terms import _keeps_logits

    adapters, tasks = causal
    run = DivMerge(adapters, tasks, level="layer", samples=8, max_new_tokens=6)
    run.prepare()
    term = run._terms[1]
    assert _keeps_logits(term.runtime.model)
    idx = list(range(8))
    conts = [len(term._continuations["continuation"][i]) for i in idx]
    prompts = [len(term._continuations["prompt"][i]) for i in idx]
    assert len(set(conts)) > 1 or len(set(prompts)) > 1  # padded rows
    enc, pos, mask = term._batch(idx)
    out = {}
    for full in (False, True):
        gamma = torch.tensor([[0.3, 0.8], [0.6, 0.4]], dtype=torch.float64, requires_grad=True)
        with term.runtime.apply(adapters, coefficients=run.layout.runtime_coefficients(gamma), head=term.head):
            logp = term._logp(enc, pos, full=full)
        (logp.exp()[mask] * torch.arange(logp.shape[-1])).sum().backward()  # any scalar reaching every row
        out[full] = (logp, gamma.grad)
    (kept, g_kept), (full, g_full) = out[False], out[True]
    assert kept.shape == full.shape == (8, pos.shape[1], term._vocab())
    assert torch.allclose(kept[mask], full[mask], atol=1e-5, rtol=0)
    assert torch.allclose(g_kept, g_full, rtol=1e-4, atol=1e-8) and float(g_full.abs().max()) > 0
    value, grad = run.objective_value(np.array([[0.3, 0.8], [0.6, 0.4]]), grad=True)
    for term_ in run._terms:  # the objective through full logits: the same value and gradient
        term_._logp = functools.partial(type(term_)._logp, term_, full=True)
    try:
        value_full, grad_full = run.objective_value(np.array([[0.3, 0.8], [0.6, 0.4]]), grad=True)
    finally:
        for term_ in run._terms:
            del term_._logp
    assert value == pytest.approx(value_full, rel=1e-5) and np.allclose(grad, grad_full, rtol=1e-4, atol=1e-8)


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


def test_a_static_merge_of_causal_adapters_is_scored_without_heads(causal):
    """Causal LM adapters have no classification head: a merge of them is scored with the base's own output layer
    (the merge evaluation asks for each task's head, which a headless merge ignores)."""
    from geometry.evaluation.merge_eval import performance
    from geometry.merging import merge

    adapters, tasks = causal
    merged = merge(adapters, "task_arithmetic", [0.5] * len(adapters))
    assert not any(merged.heads.values())
    for ad in adapters:  # the merge with each task's "head" asked for, as evaluate_merge does
        score = performance(merged, tasks / ad.name, head=ad.name, limit=4)
        assert 0.0 <= score <= 1.0
