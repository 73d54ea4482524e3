"""Evaluation tasks read from JSON Lines: classification (``text`` [+ ``text_pair``] + ``label``) or
generation (``prompt`` or ``text`` + ``reference``).

A task is a folder ``<dir>/{train,validation,test}.jsonl`` with an optional ``labels.json``
(``{"labels": [names...], "task": name, ...}``), or a single ``.jsonl`` file (a ``labels.json`` next
to it is used when present). Labels may be integers (indices into the label names) or strings (label
names; without ``labels.json`` the sorted distinct strings become the names).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from geometry.errors import AtlasError, MissingTaskDataError, UnlabeledDataError
from geometry.types import Adapter

SPLITS = ("train", "validation", "test")


class TaskLoadError(AtlasError):
    """A task file is missing or malformed (the message names the file, the line and the field)."""


@dataclass
class TaskData:
    """One split of a task.

    Classification: ``texts``, optional ``text_pairs``, integer ``labels``, ``label_names``.
    Generation (``kind == "generation"``): ``texts`` are prompts and ``references`` the target texts;
    ``metric`` is the score that counts for the task (``labels.json``'s ``metric``: ``exact_match``,
    ``rouge_1`` or ``rouge_l``, the default) and ``max_new_tokens`` the decoding budget it declares (``None``:
    the caller's).
    """

    name: str
    split: str
    texts: list[str]
    labels: list[int] | None
    label_names: list[str]
    text_pairs: list[str] | None = None
    references: list[str] | None = None
    source: str = ""
    metric: str | None = None
    max_new_tokens: int | None = None

    @property
    def kind(self) -> str:
        return "generation" if self.references is not None else "classification"

    def __len__(self) -> int:
        return len(self.texts)

    def head(self, n: int | None) -> TaskData:
        """The first ``n`` examples (all when ``n`` is None)."""
        if n is None or n >= len(self):
            return self
        cut = slice(0, n)
        return TaskData(
            self.name, self.split, self.texts[cut], None if self.labels is None else self.labels[cut],
            self.label_names, None if self.text_pairs is None else self.text_pairs[cut],
            None if self.references is None else self.references[cut], self.source, self.metric,
            self.max_new_tokens,
        )


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        rows = rows_jsonl(fh, str(path), error=TaskLoadError)
    if not rows:
        raise TaskLoadError(f"{path}: no examples")
    return rows


def _read_meta(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TaskLoadError(f"{path}: not valid JSON ({exc.msg})") from None
    if isinstance(meta, list):  # a bare list of label names
        meta = {"labels": meta}
    if not isinstance(meta, dict) or not isinstance(meta.get("labels", []), list):
        raise TaskLoadError(f"{path}: expected {{\"labels\": [names...]}}")
    return meta


def task_file(dir_or_jsonl: str | os.PathLike[str], split: str = "test") -> Path:
    """The JSONL file of ``split`` for a task folder, or the file itself."""
    path = Path(dir_or_jsonl)
    if path.is_dir():
        file = path / f"{split}.jsonl"
        if not file.is_file():
            present = sorted(p.stem for p in path.glob("*.jsonl"))
            raise TaskLoadError(f"{path}: no {split}.jsonl (splits present: {', '.join(present) or 'none'})")
        return file
    if not path.is_file():
        raise TaskLoadError(f"{path}: no such task folder or .jsonl file")
    return path


def load_task(dir_or_jsonl: str | os.PathLike[str], split: str = "test") -> TaskData:
    """Read one split of a task folder (or a single JSONL file) into a :class:`TaskData`."""
    file = task_file(dir_or_jsonl, split)
    folder = file.parent
    meta = _read_meta(folder / "labels.json")
    rows = _read_jsonl(file)
    name = str(meta.get("task") or (folder.name if Path(dir_or_jsonl).is_dir() else file.stem))
    split_name = file.stem if not Path(dir_or_jsonl).is_dir() else split
    first = rows[0]
    if "reference" in first or "target" in first:
        return _generation(rows, file, name, split_name, meta)
    for i, row in enumerate(rows, 1):
        if "text" not in row or "label" not in row:
            raise TaskLoadError(f"{file}: line {i} lacks 'text' or 'label' (expected text [, text_pair], label)")
    names = [str(x) for x in meta.get("labels", [])]
    raw = [row["label"] for row in rows]
    if not names:
        if all(isinstance(x, str) for x in raw):
            names = sorted(set(raw))
        elif not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in raw):
            bad = next(i for i, x in enumerate(raw, 1) if not isinstance(x, int) or isinstance(x, bool) or x < 0)
            raise TaskLoadError(f"{file}: line {bad}: label {raw[bad - 1]!r}: labels must be all names (strings) "
                                "or all indices (integers >= 0) when there is no labels.json")
        else:
            names = [str(i) for i in range(max(int(x) for x in raw) + 1)]
    index = {n: i for i, n in enumerate(names)}
    labels = []
    for i, x in enumerate(raw, 1):
        if isinstance(x, str) and x in index:
            labels.append(index[x])
        elif isinstance(x, int) and not isinstance(x, bool) and 0 <= x < len(names):
            labels.append(x)
        else:
            raise TaskLoadError(f"{file}: line {i}: label {x!r} is not one of {names} nor an index below {len(names)}")
    pairs = [str(row.get("text_pair", "")) for row in rows] if "text_pair" in first else None
    return TaskData(name, split_name, [str(r["text"]) for r in rows], labels, names, pairs, source=str(file))


#: the scores of a generation task (:mod:`geometry.evaluation.metrics`); ``labels.json``'s ``metric`` picks one
GENERATION_METRICS = ("exact_match", "rouge_1", "rouge_l")


def _generation(rows: list[dict], file: Path, name: str, split: str, meta: dict | None = None) -> TaskData:
    meta = meta or {}
    metric = str(meta.get("metric", "rouge_l")).split(",")[0].strip()
    if metric not in GENERATION_METRICS:
        raise TaskLoadError(f"{file.parent / 'labels.json'}: metric {metric!r} is not one of {', '.join(GENERATION_METRICS)}")
    budget = meta.get("max_new_tokens")
    if budget is not None and (not isinstance(budget, int) or isinstance(budget, bool) or budget < 1):
        raise TaskLoadError(f"{file.parent / 'labels.json'}: max_new_tokens must be a positive integer, got {budget!r}")
    prompts, refs = [], []
    for i, row in enumerate(rows, 1):
        prompt = row.get("prompt", row.get("text"))
        ref = row.get("reference", row.get("target"))
        if not isinstance(prompt, str) or not isinstance(ref, str):
            raise TaskLoadError(f"{file}: line {i} needs string 'prompt' (or 'text') and 'reference' (or 'target')")
        prompts.append(prompt)
        refs.append(ref)
    return TaskData(name, split, prompts, None, [], None, refs, source=str(file), metric=metric, max_new_tokens=budget)


def task_metric(dir_or_jsonl: str | os.PathLike[str], split: str = "test") -> str:
    """The score that counts for a task: ``accuracy`` for classification, else its generation metric
    (:attr:`TaskData.metric`: ``exact_match``, ``rouge_1`` or ``rouge_l``)."""
    data = load_task(dir_or_jsonl, split)
    return (data.metric or "rouge_l") if data.kind == "generation" else "accuracy"


def write_uploaded_task(data: bytes | str, name: str, folder: str | os.PathLike[str],
                        labels_json: str | os.PathLike[str] | None = None) -> TaskData:
    """A test split uploaded as one ``.jsonl`` / ``.csv`` file called ``name``, written as the task folder
    ``folder`` (``test.jsonl``, and ``labels.json`` copied from ``labels_json`` when given), then read back
    with :func:`load_task` so that it is checked exactly as a task on disk.

    Rows need ``text`` (optionally ``text_pair``) and ``label``: the class index of the adapter's head
    (``0 .. C-1``), or a label name of ``labels_json``. CSV cells that are integers become integers.
    Errors are :class:`TaskLoadError` naming ``name`` (not the folder), the row and the field.
    """
    folder = Path(folder)
    try:
        text = data.decode("utf-8-sig") if isinstance(data, bytes) else data
    except UnicodeDecodeError:
        raise TaskLoadError(f"{name}: not UTF-8 text (expected a .jsonl or .csv file of labeled examples)") from None
    suffix = Path(name).suffix.lower()
    try:
        if suffix in (".jsonl", ".json", ".ndjson"):
            rows = rows_jsonl(text, name)
        elif suffix in (".csv", ".tsv"):
            rows = rows_csv(text, name, "\t" if suffix == ".tsv" else ",")
            for row in rows:
                label = row.get("label")
                if isinstance(label, str) and label.strip().lstrip("-").isdigit():
                    row["label"] = int(label.strip())
        else:
            raise TaskLoadError(f"{name}: expected a .jsonl or .csv file of labeled examples, got {suffix or 'no extension'}")
    except UnlabeledDataError as exc:
        raise TaskLoadError(str(exc)) from None
    if not rows:
        raise TaskLoadError(f"{name}: no examples")
    keep = ("text", "text_pair", "label")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "test.jsonl").write_text("\n".join(json.dumps({k: r[k] for k in keep if k in r}) for r in rows) + "\n",
                                       encoding="utf-8")
    if labels_json is not None and Path(labels_json).is_file():
        (folder / "labels.json").write_bytes(Path(labels_json).read_bytes())
    try:
        task = load_task(folder, "test")
    except TaskLoadError as exc:
        raise TaskLoadError(str(exc).replace(str(folder / "test.jsonl"), name)) from None
    if task.kind != "classification":
        raise TaskLoadError(f"{name}: expected labeled classification examples (text, label)")
    return task


# ---------------------------------------------------------------------------------------- finding and reading
def adapter_task_name(adapter: Adapter) -> str:
    """The task an adapter was trained on: ``training_info.json``'s ``task`` next to it, else its name."""
    if adapter.source:
        info = Path(adapter.source) / "training_info.json"
        if info.is_file():
            try:
                task = json.loads(info.read_text(encoding="utf-8")).get("task")
            except (json.JSONDecodeError, AttributeError):
                task = None
            if isinstance(task, str) and task:
                return task
    return adapter.name


def find_task_dir(adapter: Adapter, tasks: str | Path, split: str = "test") -> Path:
    """``tasks/<task>`` holding ``<split>.jsonl`` for ``adapter`` (see :func:`adapter_task_name`)."""
    tasks = Path(tasks)
    if not tasks.is_dir():
        raise MissingTaskDataError(f"task folder {tasks} does not exist")
    tried = []
    for name in dict.fromkeys([adapter_task_name(adapter), adapter.name]):
        folder = tasks / name
        tried.append(str(folder / f"{split}.jsonl"))
        if (folder / f"{split}.jsonl").is_file():
            return folder
    raise MissingTaskDataError(f"no task data for adapter {adapter.name!r}: looked for {' and '.join(tried)}")


def rows_jsonl(text: str | Iterable[str], name: str, *, error: type[AtlasError] = UnlabeledDataError) -> list[dict]:
    """The JSON objects of a JSON Lines text (or an iterable of lines, e.g. an open file) called ``name``;
    blank lines skipped; a line that is not a JSON object raises ``error`` naming ``name`` and the line."""
    rows = []
    lines = text.splitlines() if isinstance(text, str) else text
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise error(f"{name}: line {lineno} is not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise error(f"{name}: line {lineno} is not a JSON object")
        rows.append(row)
    return rows


def rows_csv(text: str, name: str, delimiter: str = ",") -> list[dict]:
    try:
        return list(csv.DictReader(io.StringIO(text), delimiter=delimiter))
    except csv.Error as exc:
        raise UnlabeledDataError(f"{name}: not a readable CSV file ({exc})") from None
