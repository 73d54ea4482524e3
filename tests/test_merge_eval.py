"""ANP, pairwise merge losses and the geometry-vs-loss correlation on a tiny BERT with 3 tasks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from geometry.errors import MissingTaskDataError
from geometry.evaluation.merge_eval import (
    anp,
    evaluate_merge,
    layer_selections,
    pairwise_study,
    row_spearman,
)
from geometry.evaluation.tasks import find_task_dir
from geometry.io.loader import load_adapter
from tests.merge_fixtures import write_study

TASKS = ("alpha", "beta", "gamma")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A tiny base model, 3 adapters (random LoRA on q/v + random head) and their task data."""
    folders, tasks = write_study(tmp_path_factory.mktemp("merge_eval") / "study", TASKS,
                                 names=[f"adapter_{t}" for t in range(len(TASKS))])
    return [load_adapter(f) for f in folders], tasks


def test_anp_definition():
    assert anp([0.8, 0.45], [0.8, 0.9]) == pytest.approx(75.0)
    with pytest.raises(ValueError, match="as many"):
        anp([0.5], [0.5, 0.6])


def test_find_task_dir_uses_training_info_and_reports_missing(study, tmp_path):
    adapters, tasks = study
    assert find_task_dir(adapters[1], tasks).name == "beta"
    with pytest.raises(MissingTaskDataError, match=r"no task data for adapter 'adapter_0'"):
        find_task_dir(adapters[0], tmp_path)


def test_pairwise_study_consistent_with_direct_evaluation(study):
    adapters, tasks = study
    seen = []
    res = pairwise_study(adapters, tasks, "task_arithmetic", weights=[0.5, 0.5], show_progress=False,
                         progress=lambda done, total, msg: seen.append((done, total)))
    assert seen[-1] == (6, 6)
    assert res.tasks == list(TASKS)
    n = len(adapters)
    assert res.delta.shape == (n, n) and np.all(np.diag(res.delta) == 0)
    assert np.allclose(res.anp, res.anp.T) and np.all(np.diag(res.anp) == 100)
    # one merge, scored with each task's own head, equals the matrix entries
    ev = evaluate_merge(adapters[:2], tasks, "task_arithmetic", weights=[0.5, 0.5])
    assert ev.frame["merged"].tolist() == pytest.approx([res.merged[0, 1], res.merged[1, 0]])
    assert ev.frame["finetuned"].tolist() == pytest.approx(res.finetuned[:2].tolist())
    assert ev.anp == pytest.approx(res.anp[0, 1])
    frame = res.to_frame()
    assert len(frame) == n * (n - 1)
    assert frame["delta"].tolist() == pytest.approx((frame["finetuned_i"] - frame["merged_i"]).tolist())
    assert res.mean_anp == pytest.approx(np.mean([res.anp[0, 1], res.anp[0, 2], res.anp[1, 2]]))


def test_partial_results_of_a_stopped_run_name_what_finished(study):
    """A run stopped half-way can show what it finished: NaN for the pairs not merged, means over the rest."""
    adapters, tasks = study
    seen = []
    full = pairwise_study(adapters, tasks, "task_arithmetic", weights=[0.5, 0.5], show_progress=False,
                          partial=seen.append)
    assert [r.pairs_done for r in seen] == [1, 2] and not any(r.complete for r in seen)
    assert full.complete and full.pairs_done == full.pairs_total == 3
    first = seen[0]  # after the pair (0, 1): the others are NaN, not 0
    assert np.isfinite(first.merged[0, 1]) and np.isnan(first.merged[0, 2]) and np.isnan(first.anp[1, 2])
    assert first.mean_anp == pytest.approx(full.anp[0, 1]) and first.std_anp == 0.0
    assert first.merged[0, 1] == pytest.approx(full.merged[0, 1])
    rows = []
    ev = evaluate_merge(adapters, tasks, "task_arithmetic", weights=[0.5, 0.5, 0.5], partial=rows.append)
    assert [len(r.frame) for r in rows] == [1, 2] and [r.complete for r in rows] == [False, False]
    assert ev.complete and ev.tasks_total == 3
    assert rows[0].anp == pytest.approx(ev.frame["normalized"].iloc[0])


def test_evaluate_merge_scores_the_split_asked_for_and_writes_only_to_a_cache_given(study, tmp_path):
    import shutil

    from geometry.cache import ResultCache

    adapters, tasks = study
    only_validation = tmp_path / "tasks"
    shutil.copytree(tasks, only_validation)
    for folder in only_validation.iterdir():
        if folder.is_dir() and (folder / "test.jsonl").is_file():
            lines = (folder / "test.jsonl").read_text().splitlines()
            (folder / "validation.jsonl").write_text("\n".join(lines[:4]))
            (folder / "test.jsonl").unlink()
    before = sorted(tmp_path.rglob("*"))
    ev = evaluate_merge(adapters[:2], only_validation, "task_arithmetic", split="validation")
    assert ev.complete and sorted(tmp_path.rglob("*")) == before  # no cache: nothing written
    cache = ResultCache(tmp_path / "cache")
    again = evaluate_merge(adapters[:2], only_validation, "task_arithmetic", split="validation", cache=cache)
    assert again.anp == ev.anp and len(cache) == 4  # two fine-tuned and two merged scores
    with pytest.raises(MissingTaskDataError):
        evaluate_merge(adapters[:2], only_validation, "task_arithmetic")  # the test split is not there


def test_merge_of_one_adapter_scores_like_the_adapter(study):
    adapters, tasks = study
    ev = evaluate_merge(adapters[:1], tasks, "task_arithmetic")
    assert ev.anp == pytest.approx(100.0)


def test_row_spearman_and_layer_selections():
    delta = np.array([[0, 1, 2, 3], [3, 0, 2, 1], [1, 1, 0, 1], [0, 1, 2, 0]], dtype=float)
    dist = np.array([[0, 5, 6, 7], [7, 0, 6, 5], [1, 2, 0, 3], [0, 3, 2, 0.0]])
    rho = row_spearman(delta, dist)
    assert rho[0] == pytest.approx(1.0) and rho[1] == pytest.approx(1.0)
    assert np.isnan(rho[2])  # constant merge loss: undefined
    assert rho[3] == pytest.approx(0.5)  # ranks (1, 2, 3) vs (1, 3, 2): 1 - 6 * 2 / 24
    assert layer_selections(3) == [("all", 3), ("last:1", 1), ("last:2", 2), ("last:3", 3)]


def test_pairwise_cli_csv_json_and_missing_tasks(study, tmp_path, capsys, isolated_cache):
    from geometry.cli import main

    adapters, tasks = study
    paths = [a.source for a in adapters]
    assert main(["pairwise", *paths, "--tasks", str(tasks), "--method", "task_arithmetic", "--weights", "0.5,0.5",
                 "--format", "csv"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("i,j,adapter_i,adapter_j,task_i,finetuned_i,merged_i,delta,anp") and len(lines) == 7
    assert main(["pairwise", *paths, "--tasks", str(tasks), "--method", "task_arithmetic", "--weights", "0.5,0.5"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tasks"] == list(TASKS) and len(out["delta"]) == 3
    assert main(["pairwise", *paths, "--tasks", str(tmp_path), "--method", "ties"]) == 2
    assert "error: no task data for adapter 'adapter_0'" in capsys.readouterr().err


def test_correlation_study_matches_dense_cosine(study):
    from scipy.stats import spearmanr

    from geometry.evaluation.merge_eval import correlation_study, correlation_table
    from geometry.types import ModuleKey

    adapters, _ = study
    n = len(adapters)
    delta = np.array([[0, 0.1, 0.3], [0.2, 0, 0.05], [0.4, 0.1, 0]])
    frame = correlation_study(adapters, delta)
    assert len(frame) == 3 * 2 * (1 + 3)  # metrics x kinds x (all, last:1..3)
    row = frame[(frame.metric == "cosine") & (frame.kind == "v") & (frame.layers == "last:2")].iloc[0]
    # independent: dense cosine distances of the last two layers' value task vectors
    dist = np.zeros((n, n))
    for layer in (1, 2):
        taus = [a.modules[ModuleKey("model", layer, "v")].dense().flatten() for a in adapters]
        for i in range(n):
            for j in range(n):
                c = float(taus[i] @ taus[j] / (taus[i].norm() * taus[j].norm()))
                dist[i, j] += (1 - c) / 2
    rho = [spearmanr(np.delete(delta[i], i), np.delete(dist[i], i)).statistic for i in range(n)]
    assert row["mean"] == pytest.approx(np.mean(rho)) and row["std"] == pytest.approx(np.std(rho))
    table = correlation_table(frame, layers=["all", "last:2"])
    assert list(table.index) == ["q", "v"] and ("cosine", "last:2") in table.columns


def test_merge_report_on_a_study(tmp_path, monkeypatch):
    from sample_adapters import merge_report

    monkeypatch.setenv("ADAPTER_ATLAS_CACHE", str(tmp_path / "cache"))  # the report keeps its scores there
    folders, _ = write_study(tmp_path / "samples", TASKS, n_examples=8, seed=3)
    assert merge_report.main(["--root", str(tmp_path / "samples"), "--methods", "task_arithmetic,ties,iso_c"]) == 0
    text = (tmp_path / "samples" / "MERGE_RESULTS.md").read_text()
    assert "| `task_arithmetic` |" in text and "| `ties` |" in text and "| `iso_c` |" in text
    # the LoRA-native method is compared with the best classic one, which is labelled as picked after the fact
    assert "picked after the fact" in text and "- `iso_c`: " in text and "all-task merge" in text
    assert "| v | grassmann |" in text and "Merge loss delta(i, j)" in text
    assert merge_report.main(["--root", str(tmp_path / "nothing")]) == 2
    assert len(merge_report.report_cache()) > 0  # on purpose: a re-run reads them back


def test_an_interrupted_pairwise_study_resumes_after_its_last_finished_pair(study, tmp_path, monkeypatch):
    """Killed after two of three pairs (an exception from the progress callback, as a dying process leaves it):
    the next run with the same inputs merges only the third pair, says it resumed, and equals an uninterrupted
    study; the checkpoint is gone once the study is complete."""
    from geometry import merging
    from geometry.cache import ResultCache

    adapters, tasks = study
    whole = pairwise_study(adapters, tasks, "ties", density=0.5, show_progress=False)
    cache = ResultCache(tmp_path / "cache")

    def die(done, total, msg):
        if done == len(adapters) + 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pairwise_study(adapters, tasks, "ties", density=0.5, show_progress=False, progress=die, cache=cache)
    merges = []
    real_merge = merging.merge
    monkeypatch.setattr(merging, "merge", lambda *a, **k: merges.append(a) or real_merge(*a, **k))
    again = pairwise_study(adapters, tasks, "ties", density=0.5, show_progress=False, cache=cache)
    assert again.extra["resumed_pairs"] == 2 and len(merges) == 1
    np.testing.assert_array_equal(again.merged, whole.merged)
    assert again.params == whole.params and not whole.extra
    assert cache.get("pairwise_checkpoint", ("anything",)) is None and len(
        [k for k in cache.store() if str(k).startswith("pairwise_checkpoint/")]) == 0
    other = pairwise_study(adapters, tasks, "ties", density=0.6, show_progress=False, cache=cache)
    assert "resumed_pairs" not in other.extra  # other parameters: nothing to resume
