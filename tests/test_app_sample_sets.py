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
