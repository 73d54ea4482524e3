"""The studies' result store: every computed cell of a report as one JSON line, committed beside it.

A report (``merge_report``, ``learned_report``) asks the store for each cell it needs (a pairwise study of
one method, one merge's ANP, the divergence table) by a key naming what was computed and on what: the
method and its settings, the adapters' content hashes, the test examples. A cell found is used as it is;
a missing one is computed and appended (one line, flushed: a stopped run keeps what it finished). The
keys hold no hash of the library's code, so the store survives a refactor; after a change that alters a
number, delete the store to recompute.

``store_only=True`` refuses to compute: the report is re-rendered from the committed cells alone, which
is how a test checks that the committed Markdown is exactly what its cells give (nothing typed by hand).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


class MissingCell(LookupError):
    """A cell the report needs is not in the store and the store may not compute it."""


def _canonical(key: dict) -> str:
    return json.dumps(key, sort_keys=True, separators=(",", ":"))


def _encode(value: Any) -> Any:
    """JSON-safe: NaN and infinities as strings (the file stays strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return {"float": repr(value)}
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_encode(v) for v in value]
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"float"}:
            return float(value["float"])
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


class ResultStore:
    """Cells by key, read from and appended to a JSON Lines file (``{"key": {...}, "value": ...}`` per line)."""

    def __init__(self, path: Path | str, store_only: bool = False) -> None:
        self.path = Path(path)
        self.store_only = store_only
        self.cells: dict[str, Any] = {}
        self.seconds: dict[str, float] = {}
        self.computed = 0
        #: seconds of computation of every cell handed out so far (found or computed): a section's time is
        #: the difference of two readings, the same whether this run computed its cells or found them
        self.tally = 0.0
        self._offset = 0
        self._refresh()

    def _refresh(self) -> None:
        """Read the lines appended since the last read (another process of the same study may write them)."""
        if not self.path.is_file():
            return
        with open(self.path, encoding="utf-8") as fh:
            fh.seek(self._offset)
            while True:
                line = fh.readline()
                if not line.endswith("\n"):  # end of file, or a line still being written
                    break
                self._offset = fh.tell()
                if line.strip():
                    row = json.loads(line)
                    k = _canonical(row["key"])
                    self.cells[k] = _decode(row["value"])
                    self.seconds[k] = float(row.get("seconds", 0.0))

    def get(self, key: dict, compute: Callable[[], Any]) -> Any:
        """The cell at ``key``, computing (and appending) it when absent."""
        k = _canonical(key)
        if k not in self.cells:
            self._refresh()
        if k not in self.cells:
            if self.store_only:
                raise MissingCell(f"{self.path.name}: no cell {k}")
            start = time.perf_counter()
            value = compute()
            seconds = round(time.perf_counter() - start, 2)
            self.cells[k], self.seconds[k] = value, seconds
            self.computed += 1
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"key": key, "value": _encode(value), "seconds": seconds}, sort_keys=True) + "\n")
                fh.flush()
        self.tally += self.seconds[k]
        return self.cells[k]
