"""Demo mode (``ADAPTER_ATLAS_DEMO=1``): no server paths, no hub unless allowed, caps shown, a queue for
heavy runs, runs of a session that left are stopped."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from tests.app_fixtures import APP
from tests.merge_fixtures import write_study
from ui import demo

pytestmark = pytest.mark.filterwarnings("ignore")
TASKS = ("alpha", "beta", "gamma")


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_page") / "samples"
    write_study(root, TASKS, n_examples=12, seed=2)
    return root


def _page(monkeypatch, tmp_path, samples, page: str, demo_on: bool = True, allow: str | None = None):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("ADAPTER_ATLAS_SAMPLES", str(samples))
    monkeypatch.setenv("ADAPTER_ATLAS_CACHE", str(tmp_path / "cache"))
    if demo_on:
        monkeypatch.setenv(demo.DEMO_ENV, "1")
    else:
        monkeypatch.delenv(demo.DEMO_ENV, raising=False)
    if allow is not None:
        monkeypatch.setenv(demo.HUB_ALLOW_ENV, allow)
    else:
        monkeypatch.delenv(demo.HUB_ALLOW_ENV, raising=False)
    at = AppTest.from_file(str(APP), default_timeout=300)
    at.run()
    at.switch_page(page)
    return at.run()


@pytest.mark.parametrize("page, key", [("pages/merge.py", "merge_tasks"), ("pages/learned.py", "learned_tasks")])
def test_demo_pages_offer_bundled_task_sets_not_a_path(monkeypatch, tmp_path, samples, page, key):
    at = _page(monkeypatch, tmp_path, samples, page)
    assert not at.exception, at.exception
    assert not [t for t in at.text_input if t.key == key]  # no free path on a public server
    box = at.selectbox(key=key)
    assert box.options == ["sample tasks"] and box.label.startswith("Task data (bundled")
    assert any("Demo server limits" in c.value for c in at.main.caption)
    local = _page(monkeypatch, tmp_path, samples, page, demo_on=False)
    assert local.text_input(key=key).value.endswith("tasks")  # a local server still takes a path
    assert not any("Demo server limits" in c.value for c in local.main.caption)


def test_demo_caps_the_test_examples_and_the_merge_size(monkeypatch, tmp_path, samples):
    at = _page(monkeypatch, tmp_path, samples, "pages/merge.py")
    assert at.number_input(key="merge_limit").max == demo.DEMO_CAPS.max_test_examples
    at.button(key="merge_run").click()
    at.run()
    assert not at.exception, at.exception
    assert any(m.label.startswith("ANP") for m in at.metric)  # scoring works on the bundled tasks


def test_hub_is_off_in_demo_mode_unless_allowed(monkeypatch, tmp_path, samples):
    at = _page(monkeypatch, tmp_path, samples, "pages/home.py")
    assert not [t for t in at.sidebar.text_input if t.key == "hub_id"]
    assert any("Hub downloads are off" in c.value for c in at.sidebar.caption)
    allowed = _page(monkeypatch, tmp_path, samples, "pages/home.py", allow="owner/*")
    assert [t for t in allowed.sidebar.text_input if t.key == "hub_id"]
    # a refused id gets one sentence and the set keeps its adapters (the download is never called)
    import geometry.io.loader as loader

    monkeypatch.setattr(loader.hub, "snapshot_download", lambda **kw: pytest.fail("download attempted"))
    n = len(allowed.session_state["adapter_set"])
    allowed.sidebar.text_input(key="hub_id").set_value("someone/else")
    next(b for b in allowed.sidebar.button if b.label == "Load from hub").click()
    allowed.run()
    assert not allowed.exception
    assert any("not on this demo server's list" in e.value for e in allowed.sidebar.error)
    assert len(allowed.session_state["adapter_set"]) == n


def test_hub_allowed_patterns(monkeypatch):
    monkeypatch.delenv(demo.DEMO_ENV, raising=False)
    assert demo.hub_allowed("anyone/anything") == (True, "")
    monkeypatch.setenv(demo.DEMO_ENV, "1")
    monkeypatch.delenv(demo.HUB_ALLOW_ENV, raising=False)
    assert not demo.hub_allowed("a/b")[0]
    monkeypatch.setenv(demo.HUB_ALLOW_ENV, "lab/*, other/one")
    assert demo.hub_allowed("lab/x")[0] and demo.hub_allowed("other/one")[0]
    assert not demo.hub_allowed("other/two")[0] and not demo.hub_allowed("lab2/x")[0]


def test_heavy_runs_queue_behind_each_other(monkeypatch):
    monkeypatch.setenv(demo.DEMO_ENV, "1")
    monkeypatch.setattr(demo, "_SLOTS", None)
    order, waited = [], []
    first_in = threading.Event()

    def first():
        with demo.heavy_slot():
            order.append("first in")
            first_in.set()
            time.sleep(0.6)
            order.append("first out")

    t = threading.Thread(target=first)
    t.start()
    first_in.wait(5)
    with demo.heavy_slot(waiting=waited.append, poll=0.1):
        order.append("second in")
    t.join()
    assert order == ["first in", "first out", "second in"]
    assert waited and all(w >= 0 for w in waited)  # the page could say "queued" meanwhile


def test_a_run_whose_session_left_stops():
    from ui.runs import LiveRun

    class Run:
        stopped = False

        def stop(self):
            self.stopped = True

    class State:
        step, coefficients = 3, np.ones((2, 1))

    alive = [True]
    live = LiveRun(Run(), (), 5, None, alive=lambda: alive[0])
    live.record(State())
    assert not live.run.stopped
    alive[0] = False
    live.record(State())
    assert live.run.stopped and "session" in live.stopped_because
    assert demo.session_liveness()()  # outside a server: always alive


def test_demo_merge_page_scores_on_uploaded_test_files(monkeypatch, tmp_path, samples):
    """Issue 15: on a demo server a visitor uploads labeled test files (JSONL / CSV per task) instead of a path;
    a bad file gets one message and the rest of the page (and the adapters) stay."""
    import json

    rows = [json.loads(x) for x in (samples / "tasks" / "alpha" / "test.jsonl").read_text().splitlines()]
    csv_rows = "text,label\n" + "\n".join(f"{r['text']},{r['label']}" for r in rows)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    at = _page(monkeypatch, tmp_path, samples, "pages/merge.py")
    at.segmented_control(key="merge_tasks_source").set_value("Upload test files").run()
    assert not at.exception and not [t for t in at.text_input if t.key == "merge_tasks"]
    up = at.file_uploader(key="merge_tasks_files")
    up.set_value([("alpha.csv", csv_rows.encode(), "text/csv"),
                  ("beta.jsonl", (samples / "tasks" / "beta" / "test.jsonl").read_bytes(), "application/json"),
                  ("gamma.jsonl", b'{"text": "no label here"}\n', "application/json")]).run()
    assert not at.exception, at.exception
    assert any("gamma.jsonl: line 1 lacks 'text' or 'label'" in e.value for e in at.error)
    assert any("alpha.csv: 12 test examples, 2 classes" in c.value for c in at.main.caption)
    assert any("Scoring is off" in w.value and "gamma" in w.value for w in at.warning)  # gamma has no test data
    # two tasks only: merge the two adapters whose test files were accepted, then score
    at.multiselect(key="merge_set").set_value(["alpha", "beta"]).run()
    at.button(key="merge_run").click().run()
    assert not at.exception, at.exception
    assert any(m.label.startswith("ANP") for m in at.metric)
    written = list((tmp_path / "tmp" / "adapter-atlas-tasks").glob("*/*/test.jsonl"))
    assert sorted(p.parent.name for p in written) == ["alpha", "beta"]
