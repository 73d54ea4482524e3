"""docs/notebook.md is executed: every python block, in order, in one namespace, from the repository root."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "notebook.md"


@pytest.mark.slow
def test_notebook_walkthrough_runs(monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("ADAPTER_ATLAS_CACHE", str(tmp_path / "cache"))
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    assert len(blocks) >= 8
    namespace: dict = {}
    for k, block in enumerate(blocks):
        try:
            exec(compile(block, f"{DOC.name} block {k + 1}", "exec"), namespace)
        except Exception as exc:  # name the block that broke
            pytest.fail(f"docs/notebook.md block {k + 1} failed: {type(exc).__name__}: {exc}\n{block}")
    result = namespace["result"]
    frame = result.frame
    # the ANP printed is the mean of the per-task normalized scores, each 100 * merged / fine-tuned
    assert result.anp == pytest.approx(float(frame["normalized"].mean()), rel=1e-12)
    assert (frame["normalized"] - 100 * frame["merged"] / frame["finetuned"]).abs().max() < 1e-9
    assert list(frame["adapter"]) == [a.name for a in namespace["m"].source_adapters]
    # the distance matrix shown is symmetric with a zero diagonal, and the nearest pair the doc asserts holds
    D = namespace["D"].to_numpy()
    assert abs(D - D.T).max() < 1e-12 and abs(D.diagonal()).max() < 1e-6
