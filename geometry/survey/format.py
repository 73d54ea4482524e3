"""The survey's on-disk format: its columns, the manifest, the format version, atomic writes of a module's
Parquet file, and which modules a folder already holds."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

Progress = Callable[[int, int, str], None]

#: The metric columns of a survey, ``metric_factor``, in this order.
METRIC_COLUMNS: tuple[str, ...] = tuple(f"{m}_{f}" for f in ("ba", "b", "a") for m in ("l2", "cosine", "grassmann"))
#: Column order of every survey table.
KEY_COLUMNS: tuple[str, ...] = ("i", "j", "adapter_i", "adapter_j", "stack", "layer", "kind", "module")
MANIFEST = "_survey.json"
#: Bumped when the meaning of a stored number changes (a folder of another version is refused).
FORMAT_VERSION = 1
#: Default memory limit of one process (or Dask worker) running module tasks.
DEFAULT_MEMORY_GB = 4.0
#: What a process holds besides a task's arrays (Python, torch, pyarrow): kept out of the task budget.
BASELINE_BYTES = 700 * 2**20
_METADATA_KEY = b"adapter_atlas.survey"


def _write_atomic(table, path: Path, metadata: dict | None = None) -> None:
    import pyarrow.parquet as pq

    if metadata is not None:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), _METADATA_KEY: json.dumps(metadata)})
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def finished_modules(out: str | os.PathLike) -> set[str]:
    """File names of the modules already written to the survey folder ``out``."""
    out = Path(out)
    return {p.name for p in out.glob("part-*.parquet")} if out.is_dir() else set()
