"""The real-task folders (``sample_adapters/real/tasks``): splits without shared text, sizes, provenance,
hashes against the manifest, and a rebuild from ``../shared/datasets`` when it is present."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from geometry.evaluation.tasks import load_task
from sample_adapters import realdata

ROOT = Path(__file__).resolve().parents[1] / "sample_adapters" / "real"
TASKS = ROOT / "tasks"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
REQUIRED = {"sst2", "cola", "mrpc", "rte", "qnli"}


def _rows(task: str, split: str) -> list[dict]:
    with open(TASKS / task / f"{split}.jsonl", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def test_at_least_eight_real_tasks_glue_first():
    names = {p.name for p in TASKS.iterdir() if p.is_dir()}
    assert REQUIRED <= names
    assert len(names) >= 8
    assert names == set(realdata.TASKS)


@pytest.mark.parametrize("task", sorted(realdata.TASKS))
def test_no_text_is_in_two_splits(task):
    keys = {s: [realdata._key(r) for r in _rows(task, s)] for s in ("train", "validation", "test")}
    for split, k in keys.items():
        assert len(set(k)) == len(k), f"{task}/{split} repeats a text"
    assert not set(keys["train"]) & set(keys["test"])
    assert not set(keys["train"]) & set(keys["validation"])
    assert not set(keys["validation"]) & set(keys["test"])


@pytest.mark.parametrize("task", sorted(realdata.TASKS))
def test_splits_load_with_their_labels_and_sizes(task):
    meta = json.loads((TASKS / task / "labels.json").read_text())
    for split in ("train", "validation", "test"):
        data = load_task(TASKS / task, split)
        assert len(data) == meta["sizes"][split]
        assert set(data.labels) <= set(range(len(meta["labels"])))
        assert len(set(data.labels)) == len(meta["labels"]), f"{task}/{split} lacks a class"
        assert (data.text_pairs is not None) == ("text_pair" in meta["text_fields"])
    # at least 500 test rows where the source has that many labelled held-out rows (RTE's dev: 277)
    assert meta["sizes"]["test"] >= (277 if task == "rte" else 500)


@pytest.mark.parametrize("task", sorted(realdata.TASKS))
def test_every_task_names_its_provenance(task):
    meta = json.loads((TASKS / task / "labels.json").read_text())
    data_md = (ROOT / "DATA.md").read_text()
    assert meta["sources"]
    for file, src in meta["sources"].items():
        assert src["repo"] and len(src["commit"]) >= 7 and src["path"] and src["licence"]
        assert f"`{file}`" in data_md and src["repo"] in data_md
    assert meta["splits"] and f"`{task}`" in data_md


def test_committed_files_match_the_manifest():
    manifest = json.loads((TASKS / "MANIFEST.json").read_text())
    assert len(manifest["outputs"]) == 4 * len(realdata.TASKS)
    for name, digest in manifest["outputs"].items():
        assert realdata._sha(TASKS / name) == digest, name


def test_a_rebuild_from_the_shared_datasets_gives_the_same_bytes():
    if not SHARED.is_dir():
        pytest.skip("../shared/datasets is absent")
    assert realdata.check(SHARED, TASKS / "MANIFEST.json") == []


def test_the_check_names_a_changed_file(tmp_path):
    if not SHARED.is_dir():
        pytest.skip("../shared/datasets is absent")
    manifest = json.loads((TASKS / "MANIFEST.json").read_text())
    manifest["outputs"]["sst2/test.jsonl"] = "0" * 64
    (tmp_path / "MANIFEST.json").write_text(json.dumps(manifest))
    problems = realdata.check(SHARED, tmp_path / "MANIFEST.json")
    assert any("sst2/test.jsonl" in p for p in problems)
