"""Distances page in AppTest: the widgets change the figures, the figures show the library's numbers,
and a URL's query parameters reopen the same view."""

from __future__ import annotations

import numpy as np
import pytest

from tests.app_fixtures import decode, page_test, plotly_specs

pytestmark = pytest.mark.filterwarnings("ignore")


#: the tiny sample set of this module (the ``sample_set`` fixture, tests/conftest.py)
SAMPLE_SET = {"n": 3, "layers": 4}


@pytest.fixture(scope="module")
def library(sample_set):
    """The library's own distances on the same adapters (what the page must show)."""
    from geometry.analysis.distances import all_distances
    from geometry.io.loader import load_adapter

    adapters = [load_adapter(str(sample_set / f"task{k}"), name=f"task{k}") for k in range(3)]
    return all_distances(adapters)


def _heatmap(at) -> np.ndarray:
    return np.asarray(decode(plotly_specs(at)[0]["data"][0]["z"]), dtype=float)


def test_default_view_is_mean_cosine_on_value(sample_set, library):
    at = page_test("distances.py")
    assert not at.exception and not at.error
    np.testing.assert_allclose(_heatmap(at), library[("cosine", "ba", "model", "v")].reduce("all"), rtol=1e-12)
    assert len(plotly_specs(at)) == 3  # heatmap, 2-D map, per-layer lines
    assert len(at.get("download_button")) >= 6


def test_metric_factor_kind_and_layers_change_the_heatmap(sample_set, library):
    at = page_test("distances.py")
    seen = [_heatmap(at)]
    at.segmented_control(key="metric").set_value("Grassmann").run()
    seen.append(_heatmap(at))
    np.testing.assert_allclose(seen[-1], library[("grassmann", "ba", "model", "v")].reduce("all"), rtol=1e-12)
    assert any("different ranks" in c.value for c in at.caption)  # the Grassmann convention is named
    at.segmented_control(key="factor").set_value("A").run()  # not "b": d_G(BA) = d_G(B) (full-rank A)
    seen.append(_heatmap(at))
    at.segmented_control(key="kind").set_value("q").run()
    seen.append(_heatmap(at))
    at.segmented_control(key="layers").set_value("one layer").run()
    at.select_slider(key="layer").set_value(1).run()
    seen.append(_heatmap(at))
    np.testing.assert_allclose(seen[-1], library[("grassmann", "a", "model", "q")].values[:, :, 1], rtol=1e-12)
    at.segmented_control(key="layers").set_value("last k").run()
    at.slider(key="last_k").set_value(2).run()
    seen.append(_heatmap(at))
    np.testing.assert_allclose(seen[-1], library[("grassmann", "a", "model", "q")].reduce("last:2"), rtol=1e-12)
    for a, b in zip(seen, seen[1:]):
        assert not np.allclose(a, b)


def test_query_vs_value_side_by_side(sample_set, library):
    at = page_test("distances.py")
    at.toggle(key="qv").set_value(True).run()
    fig = plotly_specs(at)[-1]
    assert [t["type"] for t in fig["data"]] == ["heatmap", "heatmap"]
    for trace, kind in zip(fig["data"], ("q", "v")):
        np.testing.assert_allclose(
            np.asarray(decode(trace["z"]), dtype=float), library[("cosine", "ba", "model", kind)].reduce("all"),
            rtol=1e-12,
        )


def test_a_link_reopens_the_same_view(sample_set, library):
    at = page_test("distances.py", {"metric": "L2", "factor": "A", "kind": "q", "layers": "one layer", "layer": "2"})
    assert at.segmented_control(key="metric").value == "L2"
    np.testing.assert_allclose(_heatmap(at), library[("l2", "a", "model", "q")].values[:, :, 2], rtol=1e-12)


def test_map_methods(sample_set):
    at = page_test("distances.py")
    before = plotly_specs(at)[1]["data"][0]
    at.segmented_control(key="map").set_value("MDS").run()
    after = plotly_specs(at)[1]["data"][0]
    assert after["text"] == ["task0", "task1", "task2"]
    assert "MDS" in plotly_specs(at)[1]["layout"]["xaxis"]["title"]["text"]
    assert before != after
    at.segmented_control(key="map").set_value("UMAP").run()  # 3 adapters: too few for UMAP
    assert not at.exception
    assert any("UMAP needs at least" in c.value for c in at.caption)
    assert "PCA" in plotly_specs(at)[1]["layout"]["xaxis"]["title"]["text"]


def test_task_interference_beside_the_distances(sample_set):
    """TSV's interference: the mean over the chosen value modules of geometry.merging.tsv.task_interference."""
    from geometry.io.loader import load_adapter
    from geometry.merging.tsv import task_interference
    from geometry.types import ModuleKey

    adapters = [load_adapter(str(sample_set / f"task{k}"), name=f"task{k}") for k in range(3)]
    at = page_test("distances.py")
    n_before = len(plotly_specs(at))
    at.toggle(key="interference").set_value(True).run()
    assert not at.exception and not at.error
    specs = plotly_specs(at)
    assert len(specs) == n_before + 1
    fig = next(s for s in specs if "Task interference" in s["layout"]["title"]["text"])
    ref = np.mean([task_interference(adapters, score="overlap", module=ModuleKey("model", k, "v")).to_numpy()
                   for k in range(4)], axis=0)
    np.testing.assert_allclose(np.asarray(decode(fig["data"][0]["z"]), dtype=float), ref, rtol=1e-12)
    assert np.allclose(np.diag(ref), 1.0)  # a task's spaces contain themselves
    at.segmented_control(key="interference_score").set_value("STI").run()
    fig = next(s for s in plotly_specs(at) if "Task interference" in s["layout"]["title"]["text"])
    assert "STI" in fig["layout"]["title"]["text"]
