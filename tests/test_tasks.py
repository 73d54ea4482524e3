"""Sample task generators (deterministic, held-out words and templates, noise) and geometry.evaluation.tasks."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from geometry.evaluation.tasks import TaskLoadError, load_task
from sample_adapters.taskgen import TASKS, generate, write_task
from sample_adapters.taskgen.common import heldout_templates

SHIPPED = Path(__file__).resolve().parents[1] / "sample_adapters" / "synthetic" / "tasks"
SMALL = {"train": 150, "validation": 40, "test": 60}


@pytest.mark.parametrize("name", list(TASKS))
def test_generator_is_deterministic_and_seeded(name):
    spec = TASKS[name]
    assert generate(spec, 0, SMALL) == generate(spec, 0, SMALL)
    assert generate(spec, 1, SMALL) != generate(spec, 0, SMALL)


@pytest.mark.parametrize("name", list(TASKS))
def test_shipped_task_files_are_the_generator_output(name, tmp_path):
    """The shipped split files are exactly what ``python -m sample_adapters.train --only-data`` writes."""
    if not (SHIPPED / name).is_dir():
        pytest.skip("sample_adapters/tasks not generated")
    meta = json.loads((SHIPPED / name / "labels.json").read_text())
    folder = write_task(TASKS[name], tmp_path, seed=meta["seed"])
    for file in ("train.jsonl", "validation.jsonl", "test.jsonl", "labels.json"):
        assert (folder / file).read_bytes() == (SHIPPED / name / file).read_bytes(), file


def _words_in(text: str, phrase: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(phrase)}(?![\w-])", text) is not None


@pytest.mark.parametrize("name", list(TASKS))
def test_splits_hold_out_words_and_templates(name):
    spec = TASKS[name]
    families: dict[str, int] = {}
    splits = generate(spec, 0, SMALL, families)
    held_words = spec.lexicon(0).heldout_words()
    held_templates = {f"{f}:{i}" for f, n in families.items() for i in heldout_templates(0, f, n)}
    assert held_words and held_templates
    for row in splits["train"]:
        text = row["text"] + " || " + (row.get("text_pair") or "")
        assert not [w for w in held_words if _words_in(text, w)], row
        assert not set(row["template"].split("+")) & held_templates, row
    for split in ("validation", "test"):
        assert all(row["heldout"] for row in splits[split])
        used = [row for row in splits[split] if set(row["template"].split("+")) & held_templates]
        assert len(used) > 0.1 * len(splits[split])
    texts = [{(r["text"], r.get("text_pair")) for r in rows} for rows in splits.values()]
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])


@pytest.mark.parametrize("name", list(TASKS))
def test_labels_balanced_and_noise_documented(name):
    spec = TASKS[name]
    splits = generate(spec, 0, SMALL)
    for split, rows in splits.items():
        flipped = [r for r in rows if r["flipped"]]
        assert len(flipped) == round(spec.noise * len(rows))
        counts = [sum(r["label"] == k for r in rows if not r["flipped"]) for k in range(len(spec.labels))]
        assert max(counts) - min(counts) <= 0.2 * len(rows) / len(spec.labels) + 2, (split, counts)
        assert all(("text_pair" in r) == spec.pair for r in rows)


def test_at_least_eight_tasks_with_designed_families():
    assert len(TASKS) >= 8
    assert {"sentiment_movies", "sentiment_products", "nli", "paraphrase"} <= set(TASKS)
    assert len(TASKS["news_topic"].labels) >= 3
    assert TASKS["nli"].pair and TASKS["paraphrase"].pair


def test_load_task_folder_and_single_file(tmp_path):
    folder = write_task(TASKS["nli"], tmp_path, seed=0, sizes=SMALL)
    data = load_task(folder, "validation")
    assert data.name == "nli" and data.split == "validation" and len(data) == SMALL["validation"]
    assert data.label_names == TASKS["nli"].labels and data.text_pairs is not None
    single = load_task(folder / "test.jsonl")
    assert single.labels == load_task(folder, "test").labels and single.label_names == data.label_names


def test_load_task_string_labels_and_generation(tmp_path):
    f = tmp_path / "mini.jsonl"
    f.write_text('{"text": "a", "label": "pos"}\n{"text": "b", "label": "neg"}\n')
    data = load_task(f)
    assert data.label_names == ["neg", "pos"] and data.labels == [1, 0] and data.kind == "classification"
    g = tmp_path / "gen.jsonl"
    g.write_text('{"prompt": "hello", "reference": "world"}\n')
    assert load_task(g).kind == "generation" and load_task(g).references == ["world"]


@pytest.mark.parametrize(
    "content, match",
    [
        ('{"text": "a"}\n', "lacks 'text' or 'label'"),
        ("not json\n", "line 1 is not valid JSON"),
        ('{"text": "a", "label": 7}\n{"text": "b", "label": "x"}\n', "label"),
        ("", "no examples"),
    ],
)
def test_load_task_errors_name_the_file(tmp_path, content, match):
    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    with pytest.raises(TaskLoadError, match=match) as info:
        load_task(f)
    assert "bad.jsonl" in str(info.value)


def test_load_task_missing_split(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"text": "a", "label": 0}\n')
    with pytest.raises(TaskLoadError, match="no test.jsonl"):
        load_task(tmp_path, "test")


def test_write_uploaded_task_checks_like_a_task_on_disk(tmp_path):
    import json

    import pytest

    from geometry.evaluation.tasks import TaskLoadError, write_uploaded_task

    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"labels": ["neg", "pos"], "task": "s"}))
    task = write_uploaded_task(b"text,label\ngood film,1\nbad film,neg\n", "s.csv", tmp_path / "s", labels)
    assert task.labels == [1, 0] and task.label_names == ["neg", "pos"] and task.texts == ["good film", "bad film"]
    pairs = write_uploaded_task(b'{"text": "a", "text_pair": "b", "label": 0}\n', "p.jsonl", tmp_path / "p")
    assert pairs.text_pairs == ["b"] and pairs.label_names == ["0"]
    for data, name, message in (
        (b"\xff\xfe", "x.csv", "x.csv: not UTF-8"),
        (b"text,label\n", "e.csv", "e.csv: no examples"),
        (b"a,b\n", "y.txt", "expected a .jsonl or .csv file"),
        (b'{"text": "a", "label": 7}\n{"text": "b", "label": "zz"}\n', "m.jsonl", "m.jsonl: line 2"),
    ):
        with pytest.raises(TaskLoadError, match=message):
            write_uploaded_task(data, name, tmp_path / name.split(".")[0])
