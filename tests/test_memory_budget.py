"""The server-wide memory budget (``ui.memory``): the ledger's arithmetic, refusals with a message that says what
to do, idle release with a notice, room made from caches before refusing, the heavy-run wait, the upload-size
estimate from safetensors headers, and the sidebar refusing an upload in AppTest."""

from __future__ import annotations

import io
import threading
import zipfile

import pytest
import torch
from safetensors.torch import save

from ui import memory
from ui.memory import MemoryBudget, OverBudget


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_parse_bytes_and_the_default_budget(monkeypatch):
    assert memory.parse_bytes("6G") == 6 * 2**30 and memory.parse_bytes("800 MB") == 800 * 2**20
    assert memory.parse_bytes("1.5GiB") == int(1.5 * 2**30) and memory.parse_bytes("123") == 123
    for bad in ("lots", "-1G", "0", "5 parsecs"):
        with pytest.raises(ValueError, match="ADAPTER_ATLAS_MEMORY_BUDGET"):
            memory.parse_bytes(bad)
    monkeypatch.delenv(memory.BUDGET_ENV, raising=False)
    assert memory.budget_from_env() == memory.machine_memory() // 2 > 0
    monkeypatch.setenv(memory.BUDGET_ENV, "2G")
    assert memory.budget_from_env() == 2 * 2**30


def test_admission_counts_sessions_and_gauges_and_refuses_with_a_message():
    clock = Clock()
    book = MemoryBudget(1000, idle_s=60, clock=clock)
    book.add_gauge("bases", lambda: 300)
    book.admit("a", 400, "a.zip")
    assert book.usage() == {"sessions": 400, "bases": 300, "total": 700}
    with pytest.raises(OverBudget) as err:
        book.admit("b", 400, "b.zip")
    text = str(err.value)
    assert text.startswith("b.zip: not loaded") and "Remove adapters" in text and "own machine" in text
    assert book.refusals == 1 and book.session_bytes("b") == 0
    book.touch("a", 350, ["x"])  # the upload loaded: its real size replaces the reservation
    assert book.session_bytes("a") == 350
    book.admit("b", 350, "b.zip")  # exactly at the budget is allowed
    assert book.held() == 1000
    book.cancel("b", 350)
    book.forget("a")
    assert book.held() == 300


def test_idle_sessions_are_released_before_a_refusal_and_told_when_they_come_back():
    clock = Clock()
    book = MemoryBudget(1000, idle_s=60, clock=clock)
    released = []
    book.touch("idle", 600, ["mine_1", "mine_2"], release=lambda: released.append("idle"))
    book.touch("busy", 300, ["theirs"], release=lambda: released.append("busy"))
    clock.now = 30
    book.touch("busy")  # still active
    with pytest.raises(OverBudget):
        book.admit("new", 200, "new.zip")  # nobody idle long enough: refused, nothing released
    assert released == []
    clock.now = 61
    book.admit("new", 200, "new.zip")  # "idle" has been idle 61 s: released to make room
    assert released == ["idle"] and book.session_bytes("idle") == 0 and book.session_bytes("busy") == 300
    note = book.notice("idle")
    assert "mine_1, mine_2" in note and "1 minutes without activity" in note and book.notice("idle") is None
    assert book.notice("busy") is None and book.released_sessions == 1


def test_shrinkable_caches_are_emptied_before_a_refusal():
    book = MemoryBudget(1000)
    cache = {"bytes": 700}
    book.add_gauge("figures", lambda: cache["bytes"], shrink=lambda: cache.update(bytes=0))
    book.admit("a", 500, "a.zip")
    assert cache["bytes"] == 0


def test_a_heavy_run_waits_for_memory():
    book = MemoryBudget(1000)
    book.touch("a", 900, ["big"])
    assert not book.wait_for(200, timeout=0)
    waits = []
    threading.Timer(0.3, lambda: book.touch("a", 100, ["small"])).start()
    assert book.wait_for(200, waiting=lambda s, free: waits.append(free), poll=0.05, timeout=30)
    assert waits and waits[0] == 100


def test_upload_size_reads_safetensors_headers_and_counts_half_precision_as_float32():
    tensors = {"a": torch.zeros(10, 20, dtype=torch.float16), "b": torch.zeros(5, dtype=torch.float32)}
    data = save(tensors)
    assert memory.upload_size([("adapter_model.safetensors", data)]) == 10 * 20 * 4 + 5 * 4
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("x/adapter_config.json", "{}")
        zf.writestr("x/adapter_model.safetensors", data)
    assert memory.upload_size([("x.zip", buf.getvalue())]) == 10 * 20 * 4 + 5 * 4
    assert memory.upload_size([("broken.zip", b"not a zip")]) == 9


def test_adapter_bytes_and_loaded_bases(tmp_path):
    import geometry
    from geometry.runtime import bases
    from tests.app_fixtures import adapter_zip_bytes

    adapter = geometry.load({"a.zip": adapter_zip_bytes(seed=1)})[0]
    expected = sum(m.A.numel() * 4 + m.B.numel() * 4 for m in adapter.modules.values()) + sum(
        t.numel() * t.element_size() for t in adapter.other_tensors.values())
    assert memory.adapter_bytes(adapter) == expected > 0
    assert bases.loaded_bytes() >= 0


def test_a_demo_session_is_in_the_ledger_with_the_shared_samples_counted_once(sample_set, monkeypatch):
    """AppTest in demo mode: the sample set is one gauge (not one per session), each session an entry."""
    from streamlit.testing.v1 import AppTest

    from tests.app_fixtures import APP

    monkeypatch.setenv("ADAPTER_ATLAS_DEMO", "1")
    memory.reset_ledger()
    try:
        first = AppTest.from_file(str(APP), default_timeout=120)
        first.run()
        assert not first.exception, first.exception
        book = memory.ledger()
        gauges = {k: v for k, v in book.usage().items() if k.startswith("sample set")}
        assert len(gauges) == 1 and next(iter(gauges.values())) > 0
        second = AppTest.from_file(str(APP), default_timeout=120)
        second.run()
        assert {k: v for k, v in book.usage().items() if k.startswith("sample set")} == gauges
        assert book.usage()["sessions"] == 0  # samples only: no session holds uploads
    finally:
        memory.reset_ledger()
