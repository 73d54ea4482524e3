"""Inclusion page in AppTest: curves both directions, λ, the asymmetric matrix against the library's
``inclusion_matrix``, and the t-test table against ``geometry.analysis.stats.ttest``."""

from __future__ import annotations

import numpy as np
import pytest

from tests.app_fixtures import decode, page_test, plotly_specs

pytestmark = pytest.mark.filterwarnings("ignore")


#: the tiny sample set of this module (the ``sample_set`` fixture, tests/conftest.py)
SAMPLE_SET = {"n": 3, "layers": 3}


@pytest.fixture(scope="module")
def adapters(sample_set):
    from geometry.io.loader import load_adapter

    return [load_adapter(str(sample_set / f"task{k}"), name=f"task{k}") for k in range(3)]


def _traces(spec) -> list:
    return [decode(t.get("y")) for t in spec["data"]]


def test_pair_curves_both_directions_and_lambda(sample_set, adapters):
    from geometry.analysis.inclusion import inclusion

    at = page_test("inclusion.py")
    assert not at.exception and not at.error
    fig2 = plotly_specs(at)[0]
    names = {t["name"] for t in fig2["data"]}
    assert names == {"task0 → task1", "task1 → task0"}
    assert len(fig2["data"]) == 2 * 2 * 2  # (L1, REC) x (q, v) x two directions
    expected = inclusion(adapters[0], adapters[1])
    rec_q = expected[expected["kind"] == "q"].sort_values("layer")["rec"].to_numpy()
    shown = [t for t in fig2["data"] if t["name"] == "task0 → task1" and t["yaxis"] == "y3"][0]
    np.testing.assert_allclose(np.asarray(decode(shown["y"]), dtype=float), rec_q, rtol=1e-12)
    at.selectbox(key="tau2").set_value("task2").run()
    assert _traces(plotly_specs(at)[0]) != _traces(fig2)
    at.number_input(key="lam").set_value(0.3).run()
    assert not at.exception
    assert _traces(plotly_specs(at)[0]) != _traces(fig2)
    assert "λ sweep" in [s.value.split(" (")[0] for s in at.subheader]


def test_l1_choice_redraws_the_curves_and_leaves_the_sweep_as_it_was(sample_set, adapters):
    """The λ sweep shows REC and both L1 variants, so "L1 on" changes only the per-layer curves (a changed
    figure is a new chart for the browser to mount)."""
    def sweep(at):
        return next(f for f in plotly_specs(at) if "λ grows" in f["layout"]["title"]["text"])

    at = page_test("inclusion.py")
    before_curves, before_sweep = plotly_specs(at)[0], sweep(at)
    panels = [a["text"] for a in before_sweep["layout"]["annotations"]]
    assert panels[:3] == ["mean REC", "mean L1 (raw)", "mean L1 (normalized)"]
    at.segmented_control(key="l1").set_value("normalized").run()
    assert not at.exception
    assert _traces(plotly_specs(at)[0]) != _traces(before_curves)
    assert sweep(at) == before_sweep


def test_figures_follow_every_choice_they_are_built_for(sample_set, adapters):
    """The page's figures are kept per the builder's arguments (ui.figures.built): a choice that changes a figure gets a
    new one, going back gives the first one again."""
    def spectra(at):
        return next(f for f in plotly_specs(at) if "spectra at layer" in f["layout"]["title"]["text"])

    at = page_test("inclusion.py")
    linear = spectra(at)
    at.toggle(key="s_log").set_value(True).run()
    assert spectra(at)["layout"]["yaxis"].get("type") == "log" != linear["layout"]["yaxis"].get("type")
    at.radio(key="direction").set_value(at.radio(key="direction").options[1]).run()
    assert "task1 → task0" in spectra(at)["layout"]["title"]["text"]
    at.radio(key="direction").set_value(at.radio(key="direction").options[0]).run()
    at.toggle(key="s_log").set_value(False).run()
    assert spectra(at) == linear


def test_all_pairs_matrix_matches_library(sample_set, adapters):
    from geometry.analysis.inclusion import inclusion_matrix

    at = page_test("inclusion.py", {"mode": "all pairs"})
    assert not at.exception
    shown = np.asarray(decode(plotly_specs(at)[0]["data"][0]["z"]), dtype=float)
    expected = inclusion_matrix(adapters, metric="rec")
    off = ~np.eye(3, dtype=bool)
    np.testing.assert_allclose(shown[off], expected[off], rtol=1e-10)
    assert not np.allclose(shown, shown.T, equal_nan=True)  # asymmetric
    assert any("row τ_i → column τ_j" in c.value for c in at.caption)
    at.selectbox(key="inc_metric").set_value("L1 raw").run()
    l1 = np.asarray(decode(plotly_specs(at)[0]["data"][0]["z"]), dtype=float)
    np.testing.assert_allclose(l1[off], inclusion_matrix(adapters, metric="l1")[off], rtol=1e-10)


def test_ttest_table_matches_stats(sample_set, adapters):
    from geometry.analysis.inclusion import inclusion
    from geometry.analysis.stats import ttest

    at = page_test("inclusion.py")
    table = at.dataframe[-1].value
    x = inclusion(adapters[0], adapters[1])["rec"].to_numpy(dtype=float)
    y = inclusion(adapters[0], adapters[2])["rec"].to_numpy(dtype=float)
    res = ttest(x, y)
    assert table.loc[0, "X"] == "task0 → task1" and table.loc[0, "Y"] == "task0 → task2"
    for col, key in (("p (two-sided)", "p_two_sided"), ("p (X > Y)", "p_greater"), ("p (X < Y)", "p_less"), ("t", "t")):
        assert table.loc[0, col] == pytest.approx(res[key], rel=1e-9)
    at.selectbox(key="tt_kind").set_value("v").run()
    assert at.dataframe[-1].value.loc[0, "n X"] == 3
    assert at.selectbox(key="tt_kind").options == ["all modules", "q only", "v only"]  # the kinds present
    at.selectbox(key="tt_x").set_value(("task1", "task2")).run()
    assert at.dataframe[-1].value.loc[0, "X"] == "task1 → task2"
