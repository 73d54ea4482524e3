"""Switching sample sets in the sidebar: the real set by default, the synthetic one a click away, uploads kept,
task folders following the set, the choice in the link."""

from __future__ import annotations

import pytest

from tests.app_fixtures import APP, adapter_zip_bytes, write_adapter

pytestmark = pytest.mark.filterwarnings("ignore")


def _sets(monkeypatch, tmp_path):
    from streamlit.testing.v1 import AppTest

    root = tmp_path / "sets"
    for k in range(3):
        write_adapter(root / "real" / f"glue{k}", seed=k, layers=2)
    for k in range(2):
        write_adapter(root / "synthetic" / f"toy{k}", seed=10 + k, layers=2)
    (root / "real" / "tasks").mkdir()
    (root / "synthetic" / "tasks").mkdir()
    monkeypatch.delenv("ADAPTER_ATLAS_SAMPLES", raising=False)
    monkeypatch.setenv("ADAPTER_ATLAS_SAMPLE_SETS", str(root))
    monkeypatch.setenv("ADAPTER_ATLAS_CACHE", str(tmp_path / "cache"))
    return root, AppTest.from_file(str(APP), default_timeout=120)


def test_the_real_set_opens_by_default_and_the_sidebar_switches(monkeypatch, tmp_path):
    root, at = _sets(monkeypatch, tmp_path)
    at.run()
    assert not at.exception
    assert at.session_state["adapter_set"].names == ["glue0", "glue1", "glue2"]
    box = at.sidebar.selectbox(key="sample_set_choice")
    assert box.value == "real" and set(box.options) >= {"Real tasks: GLUE, AG News, emotion",
                                                         "Synthetic tasks: template grammars"}
    at.sidebar.file_uploader[0].set_value(("mine.zip", adapter_zip_bytes(seed=7, layers=2), "application/zip"))
    at.run()
    assert at.session_state["adapter_set"].names == ["glue0", "glue1", "glue2", "mine"]
    at.sidebar.selectbox(key="sample_set_choice").set_value("synthetic").run()
    assert not at.exception
    # the new set's samples replace the old ones; the upload stays
    assert at.session_state["adapter_set"].names == ["toy0", "toy1", "mine"]
    assert at.query_params["set"] in ("synthetic", ["synthetic"])
    assert any("Synthetic tasks" in c.value for c in at.sidebar.caption)


def test_a_link_naming_the_set_opens_it(monkeypatch, tmp_path):
    _, at = _sets(monkeypatch, tmp_path)
    at.query_params["set"] = "synthetic"
    at.run()
    assert not at.exception
    assert at.session_state["adapter_set"].names == ["toy0", "toy1"]


def test_task_folders_follow_the_set(monkeypatch, tmp_path):
    root, at = _sets(monkeypatch, tmp_path)
    at.switch_page("pages/merge.py").run()
    assert not at.exception
    field = at.text_input(key="merge_tasks")
    assert field.value == str(root / "real" / "tasks")
    at.sidebar.selectbox(key="sample_set_choice").set_value("synthetic").run()
    assert at.text_input(key="merge_tasks").value == str(root / "synthetic" / "tasks")


def test_the_smollm2_set_opens_from_a_link_with_its_training_table(monkeypatch, tmp_path):
    """The bundled causal set (SmolLM2-135M adapters) by link: the Overview lists how each adapter scored against
    the zero-shot base (nothing loads the 135M model to draw it)."""
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    repo = Path(APP).parent
    trained = sorted(p.parent.name for p in (repo / "sample_adapters" / "smollm2").glob("*/training_info.json"))
    if not trained:
        pytest.skip("no SmolLM2 sample adapter is trained in this checkout")
    monkeypatch.delenv("ADAPTER_ATLAS_SAMPLES", raising=False)
    monkeypatch.delenv("ADAPTER_ATLAS_SAMPLE_SETS", raising=False)
    monkeypatch.setenv("ADAPTER_ATLAS_CACHE", str(tmp_path / "cache"))
    at = AppTest.from_file(str(APP), default_timeout=300)
    at.query_params["set"] = "smollm2"
    at.run()
    assert not at.exception, at.exception
    present = sorted(p.parent.name for p in (repo / "sample_adapters" / "smollm2").glob("*/adapter_config.json"))
    assert at.session_state["adapter_set"].names == present
    table = next(df.value for df in at.dataframe if "zero-shot base" in df.value.columns)
    assert list(table["adapter"]) == trained and table["test score"].notna().all()
    assert any("zero-shot" in c.value for c in at.main.caption)


def test_the_overview_guides_a_first_visit(monkeypatch, tmp_path):
    """The Overview names the loaded sample set and suggests a path (distances, a merge, a learned merge), each a
    page link (links keep the session's state), plus what every page answers."""
    _, at = _sets(monkeypatch, tmp_path)
    at.run()
    assert not at.exception
    assert any("Real tasks" in c.value and "sample set" in c.value for c in at.main.caption)
    links = [el.proto.page for el in at.main.get("page_link")]
    assert links[:3] == ["distances", "merge", "learned"]  # the pages' url paths
    assert {"anatomy", "inclusion", "tokens", "survey"} <= set(links)
