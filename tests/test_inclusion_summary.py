"""The inclusion summaries the Inclusion page shows (geometry/analysis/inclusion_summary.py), against direct
computations and against geometry.inclusion_matrix."""

import numpy as np
import pandas as pd
import pytest

import geometry
from geometry.analysis.inclusion import inclusion_tables
from geometry.analysis.inclusion_summary import (
    entropy_table,
    inclusion_curves,
    inclusion_margins,
    inclusion_means,
)
from geometry.testing import random_adapter


def _ads():
    kinds = {"q": (12, 10), "v": (8, 10)}
    return geometry.load([random_adapter(f"t{i}", 3, kinds, r, seed=i) for i, r in enumerate((4, 2, 3))])


def test_curves_and_means_per_direction_and_kind():
    ads = _ads()
    t01, t10 = geometry.inclusion(ads["t0"], ads["t1"]), geometry.inclusion(ads["t1"], ads["t0"])
    curves = inclusion_curves({"a": t01, "b": t10}, kind="v")
    assert set(curves["kind"]) == {"v"} and "s1" not in curves and list(curves["direction"].unique()) == ["a", "b"]
    means = inclusion_means(curves)
    assert list(means["direction"]) == ["a", "b"]
    assert means.loc[0, "mean REC"] == pytest.approx(t01[t01.kind == "v"]["rec"].mean(), rel=1e-12)
    assert means.loc[1, "mean H(S2)"] == pytest.approx(t10[t10.kind == "v"]["h2"].mean(), rel=1e-12)


def test_a_mean_of_undefined_values_is_nan_not_zero():
    curves = pd.DataFrame({"direction": ["a", "a"], "kind": ["q", "q"], "l1": [1.0, 3.0], "l1_normalized": [0.1, 0.3],
                           "rec": [np.nan, np.nan], "h1": [0.5, 0.7], "h2": [np.nan, 0.2]})
    row = inclusion_means(curves).iloc[0]
    assert np.isnan(row["mean REC"]) and row["mean L1 (raw)"] == 2.0 and row["mean H(S2)"] == pytest.approx(0.2)


def test_margins_are_off_diagonal_row_and_column_means_of_the_library_matrix():
    ads = _ads()
    names = [a.name for a in ads.adapters]
    matrix = geometry.inclusion_matrix(ads, metric="rec")
    tables = inclusion_tables(ads.adapters)
    ent = entropy_table(tables, names)
    assert len(ent) == 6 and ent["modules"].tolist() == [6] * 6
    margins = inclusion_margins(matrix, ent, label="REC")
    m = matrix.to_numpy()
    for k, name in enumerate(names):
        others = [j for j in range(3) if j != k]
        assert margins.loc[k, "REC as τ1 (row mean)"] == pytest.approx(m[k, others].mean(), rel=1e-12)
        assert margins.loc[k, "REC as τ2 (column mean)"] == pytest.approx(m[others, k].mean(), rel=1e-12)
        assert margins.loc[k, "mean H(S1)"] == pytest.approx(ent[ent["tau1 (basis)"] == name]["mean H(S1)"].mean())
    # the library's matrix is the mean over modules of the pair's table (off the diagonal)
    assert m[0, 1] == pytest.approx(tables[0, 1]["rec"].mean(), rel=1e-12)
