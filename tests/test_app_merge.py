"""The Merge page in AppTest: merge, score (ANP, bars), pairwise heatmaps, correlations, download."""

from __future__ import annotations

import io
import zipfile

import pytest

from tests.app_fixtures import APP
from tests.merge_fixtures import write_study

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore")]  # a tiny saved BERT study per module
TASKS = ("alpha", "beta", "gamma")


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    """3 peft adapters on a tiny saved BERT (random LoRA on q/v, random heads) and their task data."""
    root = tmp_path_factory.mktemp("merge_page") / "samples"
    write_study(root, TASKS, n_examples=12, seed=1)
    return root


def _merge_page(monkeypatch, tmp_path, samples, query=None):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("ADAPTER_ATLAS_SAMPLES", str(samples))
    monkeypatch.setenv("ADAPTER_ATLAS_CACHE", str(tmp_path / "cache"))
    at = AppTest.from_file(str(APP), default_timeout=300)
    for key, value in (query or {}).items():
        at.query_params[key] = value
    at.run()
    at.switch_page("pages/merge.py")
    return at.run()


def test_merge_page_scores_pairs_and_downloads(monkeypatch, tmp_path, samples):
    at = _merge_page(monkeypatch, tmp_path, samples)
    assert not at.exception, at.exception
    assert at.selectbox(key="merge_method").value == "task_arithmetic"
    at.text_input(key="merge_weights").set_value("0.5,0.5,0.5")
    at.button(key="merge_run").click()
    at.run()
    assert not at.exception, at.exception
    labels = [m.label for m in at.metric]
    assert "ANP (average normalized performance)" in labels
    anp = next(m for m in at.metric if m.label.startswith("ANP")).value
    assert anp.endswith("%") and float(anp[:-1]) > 0
    at.button(key="merge_pairwise").click()
    at.run()
    assert not at.exception, at.exception
    assert any(m.label == "Mean pairwise ANP" for m in at.metric)
    # 3 adapters: 2 partners per task, so the Spearman table is undefined and says so (not a table of +-1)
    assert any("Undefined here" in i.value for i in at.main.info)
    # the download is a peft folder zip (config, weights, merge_info, one head per task)
    data = at.get("download_button")
    assert data  # rendered; the zip itself is checked below through the library call the page makes
    from geometry.io.loader import load_adapter
    from geometry.merging import merge

    ads = [load_adapter(samples / t) for t in TASKS]
    blob = merge(ads, "task_arithmetic", [0.5, 0.5, 0.5]).to_zip_bytes(head="alpha")
    names = zipfile.ZipFile(io.BytesIO(blob)).namelist()
    assert {"adapter_config.json", "adapter_model.safetensors", "merge_info.json"} <= set(names)
    assert {f"heads/{t}.safetensors" for t in TASKS} <= set(names)


def test_merge_page_errors_are_messages(monkeypatch, tmp_path, samples):
    at = _merge_page(monkeypatch, tmp_path, samples)
    at.text_input(key="merge_weights").set_value("1,x")
    at.run()
    assert not at.exception and "expected comma-separated numbers" in at.main.error[0].value
    at.text_input(key="merge_weights").set_value("")
    at.text_input(key="merge_tasks").set_value(str(tmp_path))
    at.run()
    assert not at.exception and "no task data for adapter" in at.main.warning[0].value
    assert at.button(key="merge_run").disabled


def test_merge_page_reruns_reuse_the_merge_and_keep_the_scores(monkeypatch, tmp_path, samples):
    import streamlit as st

    import geometry.merging as gm

    st.cache_data.clear()  # the merge of an earlier test would be served from memory
    calls = []
    real = gm.merge
    monkeypatch.setattr(gm, "merge", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    at = _merge_page(monkeypatch, tmp_path, samples)
    assert calls == ["task_arithmetic"]
    at.button(key="merge_run").click()
    at.run()
    at.selectbox(key="merge_head").set_value("beta").run()  # a control that does not change the merge
    assert not at.exception and calls == ["task_arithmetic"]
    assert any(m.label.startswith("ANP") for m in at.metric)  # the scores stay on screen (cached, no click)
    assert any("Rank per module" == m.label for m in at.metric)
    assert any(c.value.startswith("Weights used") for c in at.caption)
    at.button(key="merge_pairwise").click()
    at.run()
    assert not at.exception
    assert any("Undefined here" in i.value for i in at.main.info)  # 3 adapters: 2 partners per task


def test_pairwise_study_states_its_cost_first(monkeypatch, tmp_path, samples):
    at = _merge_page(monkeypatch, tmp_path, samples)
    cost = [c.value for c in at.caption if "merged evaluations" in c.value]
    assert cost and "3 fine-tuned and 6 merged evaluations" in cost[0] and "about" in cost[0]


def test_methods_side_by_side(monkeypatch, tmp_path, samples):
    at = _merge_page(monkeypatch, tmp_path, samples)
    at.multiselect(key="merge_compare").set_value(["task_arithmetic", "ties"])
    at.button(key="merge_compare_run").click()
    at.run()
    assert not at.exception, at.exception
    wide = at.main.dataframe[0].value
    assert list(wide.index) == ["task_arithmetic", "ties"] and "ANP" in wide.columns
    assert set(TASKS) <= set(wide.columns)
    assert any(f["layout"]["barmode"] == "group" for f in __import__("tests.app_fixtures", fromlist=["x"]).plotly_specs(at))


def _stop_at_merged_evaluation(monkeypatch, n: int):
    """The ``n``-th merged evaluation stops the script (``st.stop``), as a Cancel click's rerun stops a run at
    its next Streamlit call; returns the function that puts the real evaluation back."""
    import streamlit as st

    import geometry.evaluation.merge_eval as merge_eval

    real, calls = merge_eval.performance, []

    def stopping(source, *args, **kwargs):
        if kwargs.get("head") is not None:  # a merged evaluation
            calls.append(1)
            if len(calls) == n:
                st.stop()
        return real(source, *args, **kwargs)

    monkeypatch.setattr(merge_eval, "performance", stopping)
    return lambda: monkeypatch.setattr(merge_eval, "performance", real)


def test_a_cancelled_pairwise_study_shows_the_pairs_it_finished(monkeypatch, tmp_path, samples):
    """Cancel reruns the page, which stops the run at its next Streamlit call; here the third merged
    evaluation stops the script the same way (``st.stop``). The next run shows the finished pair."""
    at = _merge_page(monkeypatch, tmp_path, samples)
    restore = _stop_at_merged_evaluation(monkeypatch, 3)
    at.button(key="merge_pairwise").click()
    at.run()
    restore()
    at.run()  # the rerun after the cancel: no click
    assert not at.exception, at.exception
    assert any("Cancelled after 1 of 3 pairs" in w.value for w in at.main.warning)
    metric = next(m for m in at.metric if "1 finished pair (partial)" in m.label)
    assert "partial" in metric.label and metric.value.endswith("%")
    assert any("Undefined until the study is complete" in i.value for i in at.main.info)
    at.button(key="merge_pairwise").click()  # run again: finishes (the first pair comes from the cache)
    at.run()
    assert any(m.label == "Mean pairwise ANP" for m in at.metric)
    assert not any("Cancelled" in w.value for w in at.main.warning)


@pytest.mark.parametrize("button, said, done", [
    ("merge_run", "Cancelled before the first task was scored", "ANP (average normalized performance)"),
    ("merge_pairwise", "Cancelled before the first pair was merged", "Mean pairwise ANP"),
])
def test_a_run_cancelled_before_its_first_result_says_so(monkeypatch, tmp_path, samples, button, said, done):
    """Cancel before the first task (scoring) or the first pair (pairwise study) is complete: the page says the
    run was cancelled (not a silent nothing), and the next press finishes the run."""
    at = _merge_page(monkeypatch, tmp_path, samples)
    restore = _stop_at_merged_evaluation(monkeypatch, 1)
    at.button(key=button).click()
    at.run()
    restore()
    cancel = next(b for b in at.button if (b.key or "").startswith("cancel_"))
    cancel.click()
    at.run()
    assert not at.exception, at.exception
    assert any(said in i.value for i in at.main.info)
    at.button(key=button).click()
    at.run()
    assert any(m.label == done for m in at.metric)
    assert not any("Cancelled before" in i.value for i in at.main.info)


def test_method_specific_parameters_get_widgets_and_reach_the_merge(monkeypatch, tmp_path, samples):
    """Breadcrumbs' gamma and DELLA's epsilon / rescale: widgets from geometry.merging.params, defaults from
    the method's signature, values passed to the merge (its info caption shows the method's parameters)."""
    at = _merge_page(monkeypatch, tmp_path, samples)
    at.selectbox(key="merge_method").set_value("breadcrumbs").run()
    assert not at.exception, at.exception
    assert at.number_input(key="merge_gamma_breadcrumbs").value == pytest.approx(0.01)
    assert at.slider(key="merge_density_breadcrumbs").value == pytest.approx(0.9)
    at.selectbox(key="merge_method").set_value("della").run()
    assert at.selectbox(key="merge_rescale_della").value == "probability"
    at.number_input(key="merge_epsilon_della").set_value(0.45).run()  # density 0.5 +/- 0.45: allowed
    assert not at.exception and not at.error, (at.exception, [e.value for e in at.error])
    at.slider(key="merge_density_della").set_value(0.3).run()  # 0.3 - 0.45 < 0: the method's own error
    assert any("epsilon must keep density" in e.value for e in at.error)


def test_knots_density_follows_the_inner_merge(monkeypatch, tmp_path, samples):
    at = _merge_page(monkeypatch, tmp_path, samples)
    at.selectbox(key="merge_method").set_value("knots").run()
    assert at.slider(key="merge_density_knots_ties").value == pytest.approx(0.2)
    at.selectbox(key="merge_merge_method_knots").set_value("dare_linear").run()
    assert at.slider(key="merge_density_knots_dare_linear").value == pytest.approx(0.5)
    at.selectbox(key="merge_merge_method_knots").set_value("task_arithmetic").run()  # takes no density
    assert not [s for s in at.slider if s.key.startswith("merge_density")]
    assert not at.exception and not at.error


def test_the_advisor_ranks_candidates_and_hands_its_pick_to_the_page(monkeypatch, tmp_path):
    from tests.learned_fixtures import learned_study

    folders, tasks = learned_study(tmp_path / "advise")
    assert tasks.parent == folders[0].parent  # the sample folder holds the adapters and tasks/
    at = _merge_page(monkeypatch, tmp_path, folders[0].parent)
    assert not at.exception, at.exception
    at.number_input(key="advise_budget").set_value(5)
    at.number_input(key="advise_samples").set_value(4)
    at.checkbox(key="advise_learned").uncheck()
    at.checkbox(key="advise_measure").check()
    at.number_input(key="merge_limit").set_value(10)
    at.button(key="advise_run").click()
    at.run()
    assert not at.exception, at.exception
    assert any(s.value.startswith("Recommended: **") for s in at.main.success)
    table = next(df.value for df in at.dataframe if "criterion" in df.value.columns)
    assert len(table) == 5 and table["criterion"].is_monotonic_increasing and "anp" in table.columns
    compat = next(df.value for df in at.dataframe if "overlap" in df.value.columns)  # the explanation beside the pick
    assert {"module", "dominant", "dominant share", "label"} <= set(compat.columns) and len(compat)
    assert any("mean subspace overlap" in m.value for m in at.main.markdown)
    best = table.iloc[0]
    at.button(key="advise_take").click()
    at.run()
    assert not at.exception, at.exception
    method = at.selectbox(key="merge_method").value
    assert method == best["method"] or best["method"] in ("divmerge", "adamerging")
    weights = at.text_input(key="merge_weights").value
    assert weights and len(weights.split(",")) == len(folders)


def test_merge_page_runs_and_writes_recipes(monkeypatch, tmp_path, samples):
    """A mergekit recipe uploaded on the page merges the adapters it names (mergekit's meaning); the recipe of
    the merge shown downloads; a bad recipe is one message naming the file and the field, and the page stays."""
    at = _merge_page(monkeypatch, tmp_path, samples)
    assert not at.exception, at.exception
    downloads = [b for b in at.get("download_button") if b.proto.label.startswith(":material/receipt_long:")]
    assert downloads, "the recipe download is on the page"
    recipe = ("models:\n  - model: alpha\n    parameters: {weight: 1.0, density: 0.5}\n"
              "  - model: beta\n    parameters: {weight: 0.5, density: [1, 0.5]}\n"
              "merge_method: ties\nparameters: {normalize: true}\n")
    at.file_uploader(key="merge_recipe_file").set_value(("mk.yaml", recipe.encode(), "application/x-yaml"))
    at.run()
    assert not at.exception, at.exception
    assert any("Merged by the recipe **mk.yaml** (`mergekit:ties`)" in i.value for i in at.main.info)
    bad = "models:\n  - model: alpha\n    parameters: {weight: 1.0, temperature: 2}\nmerge_method: ties\n"
    at.file_uploader(key="merge_recipe_file").set_value(("bad.yaml", bad.encode(), "application/x-yaml"))
    at.run()
    assert not at.exception, at.exception
    assert any("bad.yaml: recipe" in e.value and "models[0].parameters.temperature" in e.value for e in at.main.error)
    assert at.selectbox(key="merge_method").value == "task_arithmetic"  # the controls' state is kept
