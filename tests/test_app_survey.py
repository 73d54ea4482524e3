"""Survey page in AppTest: a survey folder opened by path, filters, neighbours = the library's, NaN kept undefined,
and a survey run on the session's adapters."""

from __future__ import annotations

import numpy as np
import pytest

from geometry import survey as sv
from geometry.testing import random_adapter, save_peft_folder
from tests.app_fixtures import decode, page_test, plotly_specs, write_sample_set

pytestmark = pytest.mark.filterwarnings("ignore")
KINDS = {"q": (20, 12), "v": (16, 12)}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("app_survey")
    ads = root / "ads"
    for k in range(9):
        base = "org/base-a" if k < 6 else "org/base-b"
        ad = random_adapter(f"s{k:02d}", layers=2, kinds=KINDS, r=4 if k % 3 else 8, seed=k, base=base)
        if k == 8:  # every B = 0: Grassmann undefined at every module
            for mod in ad.modules.values():
                mod.B.zero_()
        save_peft_folder(ad, ads / f"s{k:02d}")
    survey = sv.run_survey(ads, root / "results.parquet")
    samples = write_sample_set(root / "samples", n=3, layers=2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ADAPTER_ATLAS_SAMPLES", str(samples))
        mp.setenv("ADAPTER_ATLAS_CACHE", str(root / "cache"))
        yield survey


def _opened(survey):
    at = page_test("survey.py")
    assert not at.exception
    at.text_input(key="survey_path").set_value(str(survey.path)).run()
    assert not at.exception and not at.error
    return at


def test_open_survey_heatmap_neighbours_map(env):
    at = _opened(env)
    specs = plotly_specs(at)
    heat = next(s for s in specs if s["data"][0]["type"] == "heatmap")
    scatter = next(s for s in specs if s["data"][0]["type"] == "scattergl")
    names = heat["data"][0]["x"]
    assert sorted(names) == env.names  # every adapter, in clustering order
    values, _ = env.matrix("grassmann_ba")
    idx = [env.names.index(n) for n in names]
    z = np.asarray(decode(heat["data"][0]["z"]), dtype=float)
    np.testing.assert_allclose(z, values[np.ix_(idx, idx)], rtol=1e-12)
    s08 = names.index("s08")
    off = np.delete(z[s08], s08)
    assert np.isnan(off).all()  # undefined everywhere: shown empty, never 0
    assert "Grassmann" in heat["layout"]["title"]["text"]
    shown = [n for tr in scatter["data"] for n in tr["text"]]
    assert "s08" not in shown and len(shown) == 8  # left out of the map, and said so
    assert any("s08" in w.value for w in at.warning)
    assert {tr["name"] for tr in scatter["data"]} == {"org/base-a", "org/base-b"}
    table = at.dataframe[0].value
    lib = env.neighbours("s00", "grassmann_ba", k=8)
    assert table["adapter"].tolist() == lib["adapter"].tolist()
    np.testing.assert_allclose(table["distance"].to_numpy(float), lib["distance"].to_numpy(float), rtol=1e-12)
    assert table["adapter"].tolist()[-1] == "s08" and np.isnan(table["distance"].to_numpy(float)[-1])


def test_filters_metric_and_kinds(env):
    at = _opened(env)
    at.multiselect(key="survey_bases").set_value(["org/base-b"]).run()
    heat = next(s for s in plotly_specs(at) if s["data"][0]["type"] == "heatmap")
    assert sorted(heat["data"][0]["x"]) == ["s06", "s07", "s08"]
    at.multiselect(key="survey_bases").set_value([]).run()
    at.multiselect(key="survey_ranks").set_value([8]).run()
    heat = next(s for s in plotly_specs(at) if s["data"][0]["type"] == "heatmap")
    assert sorted(heat["data"][0]["x"]) == ["s00", "s03", "s06"]
    at.multiselect(key="survey_ranks").set_value([]).run()
    at.segmented_control(key="survey_metric").set_value("cosine").run()
    at.segmented_control(key="survey_factor").set_value("B").run()
    at.multiselect(key="survey_kind").set_value(["q"]).run()
    assert not at.exception
    heat = next(s for s in plotly_specs(at) if s["data"][0]["type"] == "heatmap")
    names = heat["data"][0]["x"]
    values, _ = env.matrix("cosine_b", kind=["q"])
    idx = [env.names.index(n) for n in names]
    np.testing.assert_allclose(np.asarray(decode(heat["data"][0]["z"]), dtype=float), values[np.ix_(idx, idx)],
                               rtol=1e-12)


def test_run_on_session_adapters(env):
    at = page_test("survey.py")
    at.segmented_control(key="survey_source").set_value("Run on this session's adapters").run()
    at.button(key="survey_run").click().run()
    assert not at.exception and not at.error
    heat = next(s for s in plotly_specs(at) if s["data"][0]["type"] == "heatmap")
    assert sorted(heat["data"][0]["x"]) == ["task0", "task1", "task2"]


def test_bad_path_is_one_message(env, tmp_path):
    at = page_test("survey.py")
    at.text_input(key="survey_path").set_value(str(tmp_path / "missing.parquet")).run()
    assert not at.exception
    assert any("no such file or folder" in e.value for e in at.error)
