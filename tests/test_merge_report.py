"""MERGE_RESULTS.md generator: pre-registered headline cell, best-of-many labelled and tested by a permutation
null for the same selection, atomic writes (no merges evaluated here)."""

from __future__ import annotations

import numpy as np
import pytest

from geometry.analysis.distances import all_distances
from geometry.evaluation.merge_eval import correlation_study, row_spearman
from geometry.testing import random_adapter
from sample_adapters import merge_report


def _random_case(n=8, cells=5, seed=0):
    rng = np.random.default_rng(seed)
    delta = np.round(rng.normal(size=(n, n)), 1)  # rounding makes ties
    delta[3] = 0.5  # a constant row: undefined for that task
    mats = []
    for _ in range(cells):
        D = rng.random((n, n))
        mats.append((D + D.T) / 2)
    mats[1][2] = 1.0  # a constant distance row
    return delta, mats


def test_spearman_cells_observed_means_equal_row_spearman():
    delta, mats = _random_case()
    observed, null = merge_report.spearman_cells(delta, mats, n_perm=50)
    for c, D in enumerate(mats):
        rho = row_spearman(delta, D)
        assert observed[c] == pytest.approx(np.nanmean(rho), rel=1e-12)
    assert null.shape == (50, len(mats))


def test_permutation_null_finds_a_real_relation_and_penalises_selection():
    rng = np.random.default_rng(1)
    n = 8
    D = rng.random((n, n))
    D = (D + D.T) / 2
    delta = D + 1e-3 * rng.random((n, n))  # merge loss increases with distance: Spearman 1 per task
    observed, null = merge_report.spearman_cells(delta, [D], n_perm=2000, seed=2)
    assert observed[0] == pytest.approx(1.0) and merge_report.p_value(null[:, 0], observed[0]) < 0.001
    # 42 unrelated cells: the best looks good alone, not once its selection is accounted for.
    delta = rng.normal(size=(n, n))
    mats = [(lambda M: (M + M.T) / 2)(rng.random((n, n))) for _ in range(42)]
    observed, null = merge_report.spearman_cells(delta, mats, n_perm=2000, seed=3)
    best = int(np.argmax(observed))
    p_alone = merge_report.p_value(null[:, best], observed[best])
    p_selected = merge_report.p_value(null.max(1), observed[best])
    assert p_alone < 0.05 < p_selected


def test_selection_lines_headline_is_the_preregistered_cell():
    kinds = {"q": (12, 10), "v": (12, 10)}
    ads = [random_adapter(f"t{i}", layers=6, kinds=kinds, r=3, seed=500 + i) for i in range(5)]
    distances = all_distances(ads, device="cpu", factors=["ba"])
    delta = np.random.default_rng(0).normal(size=(5, 5))
    corr = correlation_study(ads, delta, distances=distances)
    assert len(corr) == 42
    lines = merge_report.selection_lines(delta, corr, distances, n_perm=200)
    assert lines[0].startswith("**Pre-registered cell**") and "grassmann on v over the last layers" in lines[0]
    assert "here the last 5 of 6" in lines[0] and "permutation p = " in lines[0]
    assert "of the 42 cells, **selected after the fact**" in lines[1] and "p = " in lines[1]
    # the real set's cell: the last 3 of 6 layers (fixed before its results), a different number
    real = merge_report.selection_lines(delta, corr, distances, n_perm=200, prereg_k=3)
    assert "here the last 3 of 6" in real[0] and real[0] != lines[0]
    assert merge_report.PREREGISTERED_K == {"real": 3, "synthetic": 5}


def test_write_is_atomic(tmp_path, monkeypatch):
    out = tmp_path / "MERGE_RESULTS.md"
    merge_report._write(out, ["# head"], ["| `m` | 1 | 2 | 3 |"], ["body"], ["m"], 0.0)
    assert out.read_text().startswith("# head") and list(tmp_path.iterdir()) == [out]
    before = out.read_text()

    def broken(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(merge_report.os, "replace", broken)
    with pytest.raises(OSError):
        merge_report._write(out, ["# other"], [], [], ["m"], 0.0)
    assert out.read_text() == before and list(tmp_path.iterdir()) == [out]


def test_results_merging_section_carries_the_learned_table():
    from sample_adapters.report import merge_section

    merge_md = "# x\n\n## Summary\n\n| method | weights |\n|---|---|\n| `ties` | λ = 1 |\n"
    learned_md = ("# y\n\n8 task adapters on all-MiniLM-L6-v2 (LoRA r = 8 on query, value): ... **25 unlabeled ...\n\n"
                  "## Table 3: pairwise ANP\n\n| method | ANP here | paper |\n|---|---|---|\n| DivMerge TL (JS) | 95.1 (2.0) | 95.54 |\n\n"
                  "Best baseline: TIES (94.0).\n- DivMerge TL (JS) beats it on average (+1.10 ANP points).\n\n"
                  "## Not run yet\n\nThis run stopped (or is still running) before: Figure 2 / Table 6.\n")
    lines = merge_section(merge_md, learned_md)
    text = "\n".join(lines)
    assert "| DivMerge TL (JS) | 95.1 (2.0) | 95.54 |" in text and "Best baseline: TIES" in text
    assert "25 unlabeled" in text and "before: Figure 2 / Table 6" in text
    assert "LEARNED_RESULTS.md" not in "\n".join(merge_section(merge_md))  # no learned file: nothing about it


def test_results_merging_section_carries_the_verdicts_and_the_task_count_curves():
    from sample_adapters.report import merge_section

    merge_md = ("# x\n\n## Summary\n\n| method | weights |\n|---|---|\n| `ties` | λ = 1 |\n\n"
                "Which helps here: the best classic method on pairs is `ties` (94.0, picked after the fact). Against it:\n\n"
                "- `iso_c`: not distinguishable (+0.10 ANP points on average, p = 0.8); all-task merge 80.0 against 75.0.\n\n"
                "## `ties`: TIES\n\nbody\n")
    curves_md = ("# z\n\n8 task adapters on all-MiniLM-L6-v2 (LoRA r = 8 on query, value): ... 100 test examples\n\n"
                 "## Table 3: pairwise ANP\n\n| method | ANP |\n|---|---|\n| TIES | 94 |\n\n"
                 "## Figure 2 / Table 6: ANP against the number of merged tasks\n\nMean ± 95% t-interval over subsets.\n\n"
                 "| k | subsets | TIES |\n|---|---|---|\n| 2 | 28 | 94.00 ± 1.00 [96.02] |\n| 8 | 1 | 70.00 (one subset: no interval) |\n")
    text = "\n".join(merge_section(merge_md, None, curves_md))
    assert "picked after the fact" in text and "- `iso_c`: not distinguishable" in text
    assert "MERGE_CURVES.md" in text and "| 8 | 1 | 70.00 (one subset: no interval) |" in text
    assert "100 test examples" in text and "Mean ± 95% t-interval" in text
    assert "MERGE_CURVES.md" not in "\n".join(merge_section(merge_md))


def test_results_merging_section_carries_the_learned_figure2_and_its_verdicts():
    from sample_adapters.report import merge_section

    merge_md = "# x\n\n## Summary\n\n| method | weights |\n|---|---|\n| `ties` | λ = 1 |\n"
    learned_md = ("# y\n\n## Table 3: pairwise ANP\n\n| method | ANP |\n|---|---|\n| TIES | 94 |\n\n"
                  "## Figure 2 / Table 6: ANP against the number of merged tasks\n\nMean ± 95% t-interval.\n\n"
                  "| k | subsets | DivMerge TL (JS) |\n|---|---|---|\n| 3 | 2 | 90.00 ± 1.00 [95.0] |\n\n"
                  "Best baseline over the 11 subsets with k = 3 to 8: TIES (85.00), picked after the fact.\n"
                  "- DivMerge TL (JS) is not distinguishable from it: +0.50 ANP points (k = 3: +0.20).\n")
    text = "\n".join(merge_section(merge_md, learned_md))
    assert "| 3 | 2 | 90.00 ± 1.00 [95.0] |" in text and "Best baseline over the 11 subsets" in text
    assert "- DivMerge TL (JS) is not distinguishable from it" in text and "learned merges beside" in text


def test_figure2_verdicts_pair_each_learned_merge_with_the_best_baseline():
    from sample_adapters.learned_report import _figure2_verdicts

    by_k = {3: {"ties": [80.0, 82.0], "averaging": [70.0, 71.0], "js_tl": [85.0, 86.0]},
            4: {"ties": [78.0, 79.0], "averaging": [69.0, 70.0], "js_tl": [77.0, 80.0]}}
    lines = _figure2_verdicts(by_k, [3, 4], ["averaging", "ties", "js_tl"])
    assert lines[0].startswith("Best baseline over the 4 subsets with k = 3 to 4: TIES (keep 20%, lambda = 1) (79.75)")
    assert "higher on 3 and lower on 1 of 4 subsets" in lines[1] and "k = 3: +4.50, k = 4: +0.00" in lines[1]
    assert "is not distinguishable from it" in lines[1]  # 4 pairs cannot reach p < 0.05
