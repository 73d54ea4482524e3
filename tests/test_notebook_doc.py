"""docs/notebook.md is executed: every python block, in order, in one namespace, from the repository root."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "notebook.md"


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
    assert 0 < namespace["result"].anp < 200
