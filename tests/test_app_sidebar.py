"""The sidebar's adapter set in AppTest: samples by default, uploads, a bad upload, rename, remove, URL."""

from __future__ import annotations

import pytest

from tests.app_fixtures import BASE, adapter_zip_bytes, app_test

pytestmark = pytest.mark.filterwarnings("ignore")


def _rows(at) -> list[str]:
    """One line per adapter of the sidebar's list."""
    block = next(m.value for m in at.sidebar.markdown if m.value.startswith("**"))
    return block.split("  \n")


def _names(at) -> list[str]:
    """The names listed in the sidebar (bold, in order), checked against the session's set."""
    import re

    shown = [re.match(r"\*\*(.+?)\*\*", line).group(1).replace("\\", "") for line in _rows(at)]
    assert shown == at.session_state["adapter_set"].names
    return shown


def test_samples_loaded_by_default(monkeypatch, tmp_path):
    at = app_test(monkeypatch, tmp_path, n=3)
    assert not at.exception
    assert _names(at) == ["task0", "task1", "task2"]
    # one base for the whole set: said once above the list, not repeated per adapter; full names wrap
    assert any(BASE.split("/")[-1].replace("-", "\\-") in c.value for c in at.sidebar.caption)
    rows = _rows(at)
    assert all("r 4 · α 8" in r for r in rows) and not any("base" in r for r in rows)


def test_mixed_bases_keep_the_base_column(monkeypatch, tmp_path):
    at = app_test(monkeypatch, tmp_path, n=2)
    at.sidebar.file_uploader[0].set_value(
        ("other.zip", adapter_zip_bytes(seed=5, base="someone/other-base"), "application/zip")
    )
    at.run()
    assert not at.exception
    rows = _rows(at)
    assert "other\\-base" in rows[-1] and "base" not in rows[0] and ":material/fiber_new:" in rows[-1]  # mixed bases: named per adapter


def test_upload_zip_adds_an_adapter(monkeypatch, tmp_path):
    at = app_test(monkeypatch, tmp_path, n=2)
    at.sidebar.file_uploader[0].set_value(("mine.zip", adapter_zip_bytes(seed=7), "application/zip"))
    at.run()
    assert not at.exception and not at.sidebar.error
    assert _names(at) == ["task0", "task1", "mine"]


def test_bad_upload_shows_error_and_keeps_the_set(monkeypatch, tmp_path):
    at = app_test(monkeypatch, tmp_path, n=2)
    at.sidebar.file_uploader[0].set_value(
        [("broken.zip", b"PK\x03\x04 not really a zip", "application/zip"),
         ("good.zip", adapter_zip_bytes(seed=3), "application/zip")]
    )
    at.run()
    assert not at.exception
    errors = [e.value for e in at.sidebar.error]
    assert len(errors) == 1 and "broken.zip" in errors[0]
    assert _names(at) == ["task0", "task1", "good"]  # the good file of the batch still loads


def test_bad_config_pair_names_the_problem(monkeypatch, tmp_path):
    at = app_test(monkeypatch, tmp_path, n=2)
    at.sidebar.file_uploader[0].set_value(
        [("adapter_config.json", b"{not json", "application/json"),
         ("adapter_model.safetensors", b"\x00" * 16, "application/octet-stream")]
    )
    at.run()
    assert not at.exception
    errors = [e.value for e in at.sidebar.error]
    assert len(errors) == 1 and "adapter_config.json" in errors[0]
    assert _names(at) == ["task0", "task1"]


def test_rename_and_remove(monkeypatch, tmp_path):
    at = app_test(monkeypatch, tmp_path, n=3)
    at.sidebar.selectbox(key="rename_from").set_value("task1")
    at.sidebar.text_input(key="rename_to").set_value("sentiment")
    at.sidebar.button[1].click()  # Load from hub is [0]; Rename is [1]
    at.run()
    assert _names(at) == ["task0", "sentiment", "task2"]
    at.sidebar.text_input(key="rename_to").set_value("task0")  # duplicate name: refused
    at.sidebar.selectbox(key="rename_from").set_value("task2")
    at.sidebar.button[1].click()
    at.run()
    assert "already in the set" in at.sidebar.error[0].value
    assert _names(at) == ["task0", "sentiment", "task2"]
    at.sidebar.multiselect(key="remove_names").set_value(["task0"])
    at.sidebar.button[2].click()
    at.run()
    assert _names(at) == ["sentiment", "task2"]
    assert at.query_params.get("adapters") == ["task1", "task2"]  # sample folders, renamed or not


def test_hub_failure_is_an_error_not_a_traceback(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    at = app_test(monkeypatch, tmp_path, n=2)
    at.sidebar.text_input(key="hub_id").set_value("nobody/no-such-adapter")
    at.sidebar.button[0].click()
    at.run()
    assert not at.exception
    assert "nobody/no-such-adapter" in at.sidebar.error[0].value
    assert _names(at) == ["task0", "task1"]


def test_url_names_the_sample_adapters(monkeypatch, tmp_path):
    at = app_test(monkeypatch, tmp_path, n=3, query={"adapters": ["task0", "task2"]})
    assert _names(at) == ["task0", "task2"]


def test_adapters_on_another_base_are_named_where_they_are_left_out(monkeypatch, tmp_path):
    at = app_test(monkeypatch, tmp_path, n=2)
    at.sidebar.file_uploader[0].set_value(
        ("other.zip", adapter_zip_bytes(seed=5, base="someone/other-base"), "application/zip")
    )
    at.run()
    at.switch_page("pages/distances.py").run()
    assert not at.exception
    captions = [c.value for c in at.caption]
    assert any("Not compared" in c and "other (base other-base)" in c for c in captions), captions


def test_sessions_share_the_loaded_sample_adapters_but_not_their_sets(tmp_path):
    """The sample adapters are loaded once per server and shared; each session's set is its own."""
    from tests.app_fixtures import write_sample_set
    from ui import state

    root = write_sample_set(tmp_path / "samples", n=3)
    first, _ = state.fresh_sample_set(root=root)
    second, _ = state.fresh_sample_set(root=root)
    assert first is not second and first.names == second.names
    assert all(a is b for a, b in zip(first, second))  # the same tensors, not a copy per visitor
    first.rename(first.names[0], "renamed")
    first.remove([first.names[1]])
    assert second.names == [a.name for a in state.fresh_sample_set(root=root)[0]]
    assert "renamed" not in second.names and len(second) == 3
    assert second[0].name != "renamed"  # renaming replaced the adapter in the first set only


def test_sample_paths_are_cached_until_the_folders_change(tmp_path, monkeypatch):
    """The recursive search of the samples folder runs once; an adapter folder added, nested or removed
    is seen on the next call once the listing's few seconds are over."""
    import shutil

    from ui import cache, state

    monkeypatch.setattr(cache, "SAMPLE_PATHS", cache.sample_paths_cache(ttl=0.0))  # look at the folders every call

    def add(rel: str) -> None:
        (tmp_path / rel).mkdir(parents=True)
        (tmp_path / rel / "adapter_config.json").write_text("{}")

    add("a")
    add("b")
    assert [p.name for p in state.sample_paths(tmp_path)] == ["a", "b"]
    calls = []
    real = state.list_sample_adapters
    state.list_sample_adapters = lambda root: calls.append(root) or real(root)
    try:
        assert [p.name for p in state.sample_paths(tmp_path)] == ["a", "b"] and calls == []  # cached
        add("c")
        assert [p.name for p in state.sample_paths(tmp_path)] == ["a", "b", "c"]
        add("group/d")  # an adapter inside a folder of adapters
        assert [p.name for p in state.sample_paths(tmp_path)] == ["a", "b", "c", "d"]
        (tmp_path / "group" / "e").mkdir()
        (tmp_path / "group" / "e" / "adapter_config.json").write_text("{}")
        assert [p.name for p in state.sample_paths(tmp_path)][-1] == "e"
        shutil.rmtree(tmp_path / "a")
        assert [p.name for p in state.sample_paths(tmp_path)] == ["b", "c", "d", "e"]
        assert len(calls) == 4
    finally:
        state.list_sample_adapters = real


def test_sample_paths_look_at_the_folders_once_per_ttl(tmp_path, monkeypatch):
    from ui import cache, state

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text("{}")
    monkeypatch.setattr(cache, "SAMPLE_PATHS", cache.sample_paths_cache(ttl=3600.0))
    assert [p.name for p in state.sample_paths(tmp_path)] == ["a"]
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "adapter_config.json").write_text("{}")
    assert [p.name for p in state.sample_paths(tmp_path)] == ["a"]  # within the TTL: the listing kept
    monkeypatch.setattr(cache, "SAMPLE_PATHS", cache.sample_paths_cache(ttl=0.0))
    assert [p.name for p in state.sample_paths(tmp_path)] == ["a", "b"]
