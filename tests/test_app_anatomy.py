"""Anatomy page in AppTest: norms heatmap = the library's anatomy table; widgets change the figures."""

from __future__ import annotations

import numpy as np
import pytest

from tests.app_fixtures import decode, page_test, plotly_specs

pytestmark = pytest.mark.filterwarnings("ignore")


#: the tiny sample set of this module (the ``sample_set`` fixture, tests/conftest.py)
SAMPLE_SET = {"n": 2, "layers": 3}


def _norm_grid(name: str, sample_set) -> np.ndarray:
    from geometry.analysis.anatomy import anatomy
    from geometry.io.loader import load_adapter

    table = anatomy(load_adapter(str(sample_set / name), name=name))
    return table.pivot(index="layer", columns="kind", values="fro_norm")[["q", "v"]].to_numpy()


def test_heatmap_spectrum_and_ranks(sample_set):
    at = page_test("anatomy.py")
    assert not at.exception and not at.error
    specs = plotly_specs(at)
    assert len(specs) == 4  # norms, ranks, spectrum, rank kept per module
    np.testing.assert_allclose(np.asarray(decode(specs[0]["data"][0]["z"])), _norm_grid("task0", sample_set), rtol=1e-12)
    assert "task0" in specs[0]["layout"]["title"]["subtitle"]["text"]
    spectrum = np.asarray(decode(specs[2]["data"][0]["y"]))
    assert spectrum.shape == (4,) and np.all(np.diff(spectrum) <= 0)
    # the rank section: the library's rank table at the page's 90% energy, and its truncated adapter to download
    import geometry
    from geometry.io.loader import load_adapter

    table = geometry.ranks(load_adapter(str(sample_set / "task0"), name="task0"), energy=0.9)
    q = table[table["kind"] == "q"].sort_values("layer")
    np.testing.assert_array_equal(np.asarray(decode(specs[3]["data"][0]["y"])), q["rank for 90% energy"].to_numpy())
    assert any(m.label.startswith("Sum of ranks at 90% energy") for m in at.metric)
    assert any(b.proto.label.startswith(":material/download: Truncated adapter") for b in at.get("download_button"))
    at.slider(key="a_energy").set_value(60).run()
    assert not at.exception
    q60 = geometry.ranks(load_adapter(str(sample_set / "task0"), name="task0"), energy=0.6)
    q60 = q60[q60["kind"] == "q"].sort_values("layer")["rank for 60% energy"].to_numpy()
    np.testing.assert_array_equal(np.asarray(decode(plotly_specs(at)[3]["data"][0]["y"])), q60)


def test_switching_adapter_layer_and_compare(sample_set):
    at = page_test("anatomy.py")
    before = plotly_specs(at)
    at.selectbox(key="adapter").set_value("task1").run()
    after = plotly_specs(at)
    np.testing.assert_allclose(np.asarray(decode(after[0]["data"][0]["z"])), _norm_grid("task1", sample_set), rtol=1e-12)
    at.select_slider(key="a_layer").set_value(0).run()
    moved = plotly_specs(at)
    assert decode(moved[2]["data"][0]["y"]) != decode(after[2]["data"][0]["y"])
    assert before[0]["data"][0]["z"] != after[0]["data"][0]["z"]
    at.toggle(key="compare2").set_value(True).run()
    specs = plotly_specs(at)
    heatmaps = [s for s in specs if s["data"][0]["type"] == "heatmap"]
    assert len(heatmaps) == 2  # one per adapter, on one colour scale
    assert heatmaps[0]["data"][0]["zmin"] == heatmaps[1]["data"][0]["zmin"]
    assert heatmaps[0]["data"][0]["zmax"] == heatmaps[1]["data"][0]["zmax"]
    spectrum = next(s for s in specs if "Singular values" in s["layout"]["title"]["text"])
    assert len(spectrum["data"]) == 2  # the spectrum figure shows both adapters
