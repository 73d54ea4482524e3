"""Token dynamics page in AppTest: real sample adapters (the map and curves are the library's numbers, bad
text keeps the page), and the tiny set whose base cannot be loaded (a clear error, the toy model still works)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.app_fixtures import decode, page_test, plotly_specs, write_sample_set

pytestmark = pytest.mark.filterwarnings("ignore")
SAMPLES = Path(__file__).resolve().parents[1] / "sample_adapters" / "synthetic"


def _titles(at) -> list[str]:
    return [s["layout"]["title"]["text"] for s in plotly_specs(at)]


@pytest.fixture()
def real(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTER_ATLAS_SAMPLES", str(SAMPLES))
    monkeypatch.setenv("ADAPTER_ATLAS_CACHE", str(tmp_path / "cache"))
    return SAMPLES


@pytest.mark.slow
def test_real_model_view_text_error_and_batch(real):
    from geometry.analysis import tokens as tk
    from geometry.io.loader import load_adapter

    at = page_test("tokens.py", {"tok_adapters": "nli"})
    assert not at.exception and not at.error
    titles = _titles(at)
    assert titles[0].startswith("Tokens in the shared PCA plane · layer 6")
    assert titles[1].startswith("Per-layer token measures") and titles[2].startswith("Particles on the sphere")
    text = at.text_area(key="tok_text").value
    assert text == tk.task_texts(SAMPLES / "tasks" / "nli", "validation", 1)[0]  # the task's default example
    ref = tk.token_dynamics([load_adapter(SAMPLES / "nli")], text, threshold=0.5)
    specs = plotly_specs(at)
    assert len(specs[0]["frames"]) == 7  # one animation frame per layer
    base6 = ref.points[(ref.points["model"] == "base") & (ref.points["layer"] == 6)]
    np.testing.assert_allclose(decode(specs[0]["data"][1]["x"]), base6["x"], rtol=1e-6)
    assert specs[0]["data"][1]["text"] == base6["token"].tolist()
    curves = {t["name"]: t for t in specs[1]["data"] if t.get("xaxis") == "x2"}
    np.testing.assert_allclose(decode(curves["nli"]["y"]), ref.table["distance"], rtol=1e-6)

    at.select_slider(key="tok_layer").set_value(2)
    at.slider(key="tok_threshold").set_value(0.9).run()
    assert _titles(at)[0].startswith("Tokens in the shared PCA plane · layer 2")
    at.text_area(key="tok_text").set_value("   ").run()
    assert not at.exception
    assert any("the text is empty" in e.value for e in at.error)
    assert at.slider(key="tok_threshold").value == 0.9 and at.select_slider(key="tok_layer").value == 2  # state kept
    assert any("Showing the last text that ran" in c.value for c in at.caption)
    assert _titles(at)[0].startswith("Tokens in the shared PCA plane · layer 2")  # the last result stays shown
    assert any(t.startswith("Particles") for t in _titles(at))  # and the toy model
    at.text_area(key="tok_text").set_value("Two dogs run.")
    at.number_input(key="tok_limit").set_value(4)
    at.toggle(key="tok_batch").set_value(True).run()
    assert _titles(at)[0].startswith("Tokens in the shared PCA plane")
    assert not at.exception and not at.error
    batch = [s for s in plotly_specs(at) if "over nli/validation (4 inputs)" in s["layout"]["title"]["text"]]
    assert len(batch) == 1
    bands = [t for t in batch[0]["data"] if t.get("fill") == "toself"]
    assert bands  # the spread is drawn


def test_a_cancelled_batch_run_shows_what_finished_and_resumes(real, monkeypatch):
    """Cancel turns batch mode off and keeps the inputs done; turning it on again finishes the rest."""
    from streamlit.runtime.scriptrunner_utils.exceptions import StopException

    from geometry.analysis import tokens as tk
    from ui import compute as ui_tokens  # the cached token calls live in ui.compute

    monkeypatch.setattr(tk, "BATCH_CHUNK", 2)
    at = page_test("tokens.py", {"tok_adapters": "nli"})
    at.number_input(key="tok_limit").set_value(6)
    real_call = ui_tokens._batch_call

    def cancelled(*args, progress=None, partial=None, **kw):  # a Cancel click after the second step
        def stop(done, total, message):
            progress(done, total, message)
            if done == 4:
                raise StopException  # how Streamlit ends the script run that a click interrupts
        return real_call(*args, progress=stop if progress else None, partial=partial, **kw)

    monkeypatch.setattr(ui_tokens, "_batch_call", cancelled)
    at.toggle(key="tok_batch").set_value(True).run()
    monkeypatch.setattr(ui_tokens, "_batch_call", real_call)
    at.toggle(key="tok_batch").set_value(False).run()  # the Cancel button's callback, then the rerun
    assert not at.toggle(key="tok_batch").value
    assert any("Cancelled after 4 of 6 inputs" in w.value for w in at.warning)
    batch = [s for s in plotly_specs(at) if "4 of 6 finished" in s["layout"]["title"]["text"]]
    assert len(batch) == 1
    at.toggle(key="tok_batch").set_value(True).run()
    assert not at.warning and not at.exception
    assert [s for s in plotly_specs(at) if "over nli/validation (6 inputs)" in s["layout"]["title"]["text"]]


def test_unloadable_base_is_a_clear_error_and_toy_model_works(tmp_path, monkeypatch):
    samples = write_sample_set(tmp_path / "samples", n=2, layers=2)
    monkeypatch.setenv("ADAPTER_ATLAS_SAMPLES", str(samples))
    monkeypatch.setenv("ADAPTER_ATLAS_CACHE", str(tmp_path / "cache"))
    at = page_test("tokens.py")
    assert not at.exception
    errors = [e.value for e in at.error]
    assert len(errors) == 1 and "cannot load the base model 'tiny/bert-like'" in errors[0]
    assert _titles(at)[0].startswith("Particles on the sphere")
    at.number_input(key="pt_d").set_value(2).run()
    specs = plotly_specs(at)
    anim = next(s for s in specs if s["layout"]["title"]["text"].startswith("Particles on the circle"))
    assert anim["data"][0]["name"] == "unit circle" and len(anim["frames"]) == 41
    at.number_input(key="pt_d").set_value(5)
    at.number_input(key="pt_rank").set_value(5).run()
    assert not at.exception
    at.number_input(key="pt_d").set_value(4).run()  # a rank above d is clamped to d, said on the page
    assert not at.exception and len(at.error) == 1 and at.number_input(key="pt_rank").value == 5  # base error only
    assert any("using r = 4" in c.value for c in at.caption)
    assert any("d = 4 shows the curves only" in i.value for i in at.info)
