"""The merge advisor (geometry.advise): its candidate grid, its criterion against a direct computation, its ranking."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from geometry.errors import InvalidArgumentError
from geometry.evaluation.advise import Candidate, advise, candidate_criterion, candidate_grid
from geometry.learned.data import select, task_inputs
from geometry.learned.divergences import js_divergence
from geometry.learned.terms import make_term
from geometry.merging import MERGE_METHODS, merge

pytestmark = pytest.mark.usefixtures("isolated_cache")


def test_the_grid_puts_one_default_per_method_first_then_the_learned_merge_and_respects_the_budget():
    grid = candidate_grid(3)
    first = grid[:len(MERGE_METHODS)]
    assert [c.method for c in first] == list(MERGE_METHODS)
    assert grid[len(MERGE_METHODS)].method == "divmerge"
    ta = [c for c in grid if c.method == "task_arithmetic"]
    assert [c.lam for c in ta] == [1.0, None, 0.5]  # lambda = 1, 1/T (averaging), 0.5
    ties = [c for c in grid if c.method == "ties"]
    assert ties[0].params == (("density", 0.2),) and ties[0].lam == 1.0  # TIES' own default first
    assert {dict(c.params)["density"] for c in ties} == {0.2, 0.5, 0.8}
    assert all(c.lam is None for c in grid if c.method in ("multislerp", "lora_average"))
    assert {dict(c.params)["alpha"] for c in grid if c.method == "tsv_m"} == {0.5, 1.0, 1.5}
    assert len(set(grid)) == len(grid)
    assert len(candidate_grid(3, budget=5)) == 5 and candidate_grid(3, budget=5) == grid[:5]
    assert candidate_grid(2, criterion="entropy")[len(MERGE_METHODS)].method == "adamerging"
    assert all(c.method != "divmerge" for c in candidate_grid(2, learned=False))
    assert Candidate("ties", (("density", 0.2),), None).label == "ties (lambda=1/T, density=0.2)"
    assert Candidate("ties", (), 0.5).weights(4) == [0.5] * 4 and Candidate("ties").weights(4) == [0.25] * 4
    with pytest.raises(InvalidArgumentError, match="budget must be at least 1"):
        candidate_grid(2, budget=0)
    with pytest.raises(InvalidArgumentError, match="unknown merge method"):
        candidate_grid(2, methods=["tiess"])


def _terms(adapters, tasks, samples=6):
    return [make_term("classification", i, adapters, select(task_inputs(a, tasks), samples, 0))
            for i, a in enumerate(adapters)]


def test_the_criterion_equals_a_direct_computation(learned_tiny):
    adapters, tasks = learned_tiny
    terms = _terms(adapters, tasks)
    merged = merge(adapters, "task_arithmetic", [0.5, 0.5, 0.5])
    merged.source_adapters = list(adapters)
    ours = candidate_criterion(terms, merged, "js", batch_size=4)
    # direct: each task's fine-tuned and merged class distributions from the runtime's coefficient path
    # (exact task arithmetic), JS per input, mean over inputs, then over tasks
    direct = []
    for t in terms:
        idx = list(range(len(t)))
        logp, _ = t.reference(idx)
        logq, _ = t.merged(idx, torch.tensor([0.5, 0.5, 0.5], dtype=torch.float64), grad=False)
        direct.append(float(js_divergence(logp.double(), logq.double()).mean()))
    assert ours == pytest.approx(float(np.mean(direct)), rel=1e-6, abs=1e-9)
    assert ours > 1e-4  # the merge does move the distributions
    entropy = candidate_criterion(terms, merged, "entropy")
    logq, _ = terms[0].merged(list(range(len(terms[0]))), torch.tensor([0.5] * 3, dtype=torch.float64), grad=False)
    h0 = float((-(logq.exp() * logq).sum(-1)).mean())
    assert 0 < entropy <= math.log(max(t.reference([0])[0].shape[-1] for t in terms)) + 1e-9
    assert h0 > 0
    # a task's own adapter at coefficient 1, the others at 0, is the fine-tuned model: no divergence on that task
    alone = merge(adapters, "task_arithmetic", [1.0, 0.0, 0.0])
    alone.source_adapters = list(adapters)
    assert candidate_criterion(terms[:1], alone, "kl") == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(InvalidArgumentError, match="criterion must be one of"):
        candidate_criterion(terms, merged, "bleu")


def test_advise_ranks_by_the_criterion_recommends_the_first_and_scores_when_asked(learned_tiny):
    adapters, tasks = learned_tiny
    seen = []
    advice = advise(adapters[:2], tasks, budget=5, samples=6, learned=False, measure=True, limit=8,
                    progress=lambda done, total, label: seen.append((done, total)))
    table = advice.table
    assert list(table["rank"]) == [1, 2, 3, 4, 5] and table["criterion"].is_monotonic_increasing
    assert advice.recommended.method == table.iloc[0]["method"]
    assert {"anp", "P:alpha", "P:beta"} <= set(table.columns)
    assert seen[0] == (0, 5) and seen[-1] == (5, 5)
    assert math.isnan(advice.spearman) or -1 <= advice.spearman <= 1
    # the recommended merge's criterion is the table's first
    terms = _terms(adapters[:2], tasks)
    assert candidate_criterion(terms, advice.recommended, "js") == pytest.approx(table.iloc[0]["criterion"], rel=1e-6)
    stopped = advise(adapters[:2], tasks, budget=5, samples=6, learned=False, should_stop=iter([False, False, True]).__next__)
    assert len(stopped.table) == 2 and "stopped after 2 of 5 candidates" in stopped.notes


@pytest.mark.slow
def test_the_learned_candidate_fits_on_other_inputs_than_those_that_score(learned_tiny):
    adapters, tasks = learned_tiny
    advice = advise(adapters[:2], tasks, budget=len(MERGE_METHODS) + 1, samples=4, learned=True)
    assert "divmerge" in set(advice.table["method"])
    row = advice.table[advice.table["method"] == "divmerge"].iloc[0]
    assert np.isfinite(row["criterion"]) and row["seconds"] > 0


def test_the_cli_prints_the_ranked_table_and_writes_the_recommended_merge(learned_study_dirs, tmp_path, capsys):
    from geometry.cli import main

    folders, tasks = learned_study_dirs
    out = tmp_path / "pick"
    code = main(["advise", str(folders[0]), str(folders[1]), "--tasks", str(tasks), "--budget", "3", "--samples", "4",
                 "--no-learned", "--out", str(out), "--no-cache"])
    captured = capsys.readouterr()
    assert code == 0
    lines = captured.out.strip().splitlines()
    assert lines[0].startswith("rank,candidate,method,params,criterion,seconds") and len(lines) == 4
    assert "recommended: " in captured.err and (out / "adapter_config.json").is_file() and (out / "README.md").is_file()
    with pytest.raises(SystemExit) as stop:
        main(["advise", str(folders[0]), "--tasks", str(tasks), "--criterion", "bleu"])
    assert stop.value.code == 2
    assert main(["advise", str(folders[0]), str(folders[1]), "--tasks", str(tasks), "--out", str(out)]) == 2
    assert "not a new or empty folder" in capsys.readouterr().err


def test_the_report_draws_every_pair_then_seeded_subsets_and_compares_pick_with_defaults():
    from sample_adapters.advise_report import DEFAULTS, _summary, task_sets

    sets = task_sets(5, 4, 2, seed=0)
    assert sets[:10] == [(i, j) for i in range(5) for j in range(i + 1, 5)]
    assert [len(s) for s in sets[10:]] == [3, 3, 4, 4] and sets == task_sets(5, 4, 2, seed=0)
    rows = [{"method": "ties", "params": '{"lambda": 1.0, "density": 0.2}', "anp": 90.0, "validation_anp": 80.0},
            {"method": "task_arithmetic", "params": '{"lambda": 1.0}', "anp": 95.0, "validation_anp": 85.0},
            {"method": "divmerge", "params": '{"lambda": "1/T", "level": "task"}', "anp": 97.0,
             "validation_anp": float("nan")}]
    s = _summary([{"rows": rows, "spearman": -0.5, "p_value": 0.6}])
    assert s["pick"][0] == 90.0 and s["hindsight"][0] == 97.0 and s["validation pick"][0] == 95.0
    assert s["TIES (keep 20%, lambda = 1)"][0] == 90.0 and s["task arithmetic (lambda = 1)"][0] == 95.0
    assert np.isnan(s["Multi-SLERP (1/T)"][0]) and set(DEFAULTS) <= set(s)
