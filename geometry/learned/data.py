"""Unlabeled inputs of each task for a learned merge: which examples, from where, how many.

DivMerge and AdaMerging never read labels. For each adapter ``t`` the inputs ``X_t`` are

* by default ``samples`` examples of the ``validation`` split of its task folder
  (``tasks/<task>/validation.jsonl``, found by :func:`geometry.evaluation.merge_eval.find_task_dir`),
  drawn without replacement by a generator seeded with ``(seed, task name)`` (the same inputs for a
  task whatever the other adapters); when the split has fewer examples, all of them are used and
  :attr:`UnlabeledInputs.note` says so;
* or a file given for that adapter: JSON Lines (``.jsonl``) or CSV (``.csv``) with a ``text`` column
  (``prompt`` also accepted for generation) and optionally ``text_pair``; other columns (labels...)
  are ignored. A file without ``text`` raises :class:`UnlabeledDataError`.
"""

from __future__ import annotations

import hashlib
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from geometry.errors import AtlasError, MissingTaskDataError, UnlabeledDataError  # noqa: F401  (re-exported)
from geometry.evaluation.tasks import adapter_task_name, rows_csv, rows_jsonl


@dataclass
class UnlabeledInputs:
    """The inputs ``X_t`` of one task: ``texts`` (and ``pairs``), where they came from, what was kept."""

    task: str
    texts: list[str]
    pairs: list[str] | None
    source: str
    available: int
    note: str = ""

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def content_hash(self) -> str:
        """sha256 of the texts and pairs (the cache key of reference distributions)."""
        h = hashlib.sha256()
        for i, text in enumerate(self.texts):
            h.update(text.encode("utf-8") + b"\0")
            if self.pairs is not None:
                h.update(self.pairs[i].encode("utf-8") + b"\1")
        return h.hexdigest()


def parse_unlabeled(data: bytes | str, name: str, task: str | None = None) -> UnlabeledInputs:
    """Unlabeled inputs from the bytes of a ``.jsonl`` / ``.csv`` file called ``name`` (e.g. an upload; a
    name without either extension is read as JSON Lines when it starts with ``{``, else as CSV)."""
    text = data.decode("utf-8-sig") if isinstance(data, bytes) else data
    suffix = Path(name).suffix.lower()
    if suffix not in (".jsonl", ".json", ".ndjson", ".csv", ".tsv", ".txt"):  # no extension: look at it
        suffix = ".jsonl" if text.lstrip().startswith("{") else suffix if suffix else ".csv"
    if suffix in (".jsonl", ".json", ".ndjson"):
        rows = rows_jsonl(text, name)
    elif suffix in (".csv", ".tsv", ".txt"):
        rows = rows_csv(text, name, "\t" if suffix == ".tsv" else ",")
    else:
        raise UnlabeledDataError(f"{name}: expected a .jsonl or .csv file of unlabeled inputs, got {suffix}")
    if not rows:
        raise UnlabeledDataError(f"{name}: no examples")
    columns = list(rows[0])
    field = "text" if "text" in columns else "prompt" if "prompt" in columns else None
    if field is None:
        raise UnlabeledDataError(f"{name}: no 'text' column (columns: {', '.join(map(str, columns)) or 'none'}); "
                                 "expected text [, text_pair]")
    texts, pairs = [], [] if "text_pair" in columns else None
    for i, row in enumerate(rows, 1):
        value = row.get(field)
        if not isinstance(value, str) or not value.strip():
            where = f"line {i}" if suffix != ".csv" else f"row {i}"
            raise UnlabeledDataError(f"{name}: {where} has no {field!r} text")
        texts.append(value)
        if pairs is not None:
            pairs.append(str(row.get("text_pair") or ""))
    label = task or Path(name).stem
    return UnlabeledInputs(label, texts, pairs, str(name), len(texts))


def read_unlabeled(path: str | os.PathLike[str], task: str | None = None) -> UnlabeledInputs:
    """Unlabeled inputs from a ``.jsonl`` or ``.csv`` file (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise UnlabeledDataError(f"{path}: no such file of unlabeled inputs")
    return parse_unlabeled(path.read_bytes(), str(path), task)


def task_inputs(adapter: Any, tasks: str | os.PathLike[str] | None, split: str = "validation") -> UnlabeledInputs:
    """All inputs of ``split`` of ``adapter``'s task folder under ``tasks``."""

    if tasks is None:
        raise UnlabeledDataError(f"no unlabeled inputs for adapter {adapter.name!r}: pass a tasks folder "
                                 "or a data file for it")
    tasks = Path(tasks)
    if not tasks.is_dir():
        raise MissingTaskDataError(f"task folder {tasks} does not exist")
    names = list(dict.fromkeys([adapter_task_name(adapter), adapter.name]))
    for name in names:
        folder = tasks / name
        if (folder / f"{split}.jsonl").is_file():
            return read_unlabeled(folder / f"{split}.jsonl", task=folder.name)
    for name in names:
        folder = tasks / name
        if folder.is_dir():
            present = sorted(p.stem for p in folder.glob("*.jsonl"))
            raise UnlabeledDataError(
                f"task folder {folder} has no {split}.jsonl (splits present: {', '.join(present) or 'none'}): "
                f"the unlabeled inputs come from the {split} split; give a data file for {adapter.name!r} instead")
    raise MissingTaskDataError(f"no task data for adapter {adapter.name!r} in {tasks}: looked for "
                               + " and ".join(str(tasks / n) for n in names))


def select(inputs: UnlabeledInputs, samples: int | None, seed: int = 0) -> UnlabeledInputs:
    """``samples`` inputs drawn without replacement (generator seeded with ``seed`` and the task name);
    all of them (with a note) when there are fewer; all when ``samples`` is None."""
    n = len(inputs)
    if samples is not None and samples < 1:
        raise AtlasError(f"samples must be at least 1, got {samples}")
    if samples is None or samples >= n:
        note = "" if samples is None or samples == n else (
            f"{inputs.task}: {samples} samples asked, {n} available in {inputs.source}: using all {n}")
        return UnlabeledInputs(inputs.task, list(inputs.texts), None if inputs.pairs is None else list(inputs.pairs),
                               inputs.source, n, note)
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(inputs.task.encode("utf-8"))])
    idx = sorted(rng.choice(n, size=samples, replace=False).tolist())
    return UnlabeledInputs(inputs.task, [inputs.texts[i] for i in idx],
                           None if inputs.pairs is None else [inputs.pairs[i] for i in idx], inputs.source, n)
