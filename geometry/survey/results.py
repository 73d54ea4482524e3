"""Reading a survey's results: :class:`Survey` (adapter x adapter matrices, neighbours), :func:`open_survey`."""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from geometry.errors import AtlasError
from geometry.survey.format import _METADATA_KEY, MANIFEST, METRIC_COLUMNS, _write_atomic, finished_modules
from geometry.survey.index import AdapterRef


# ---------------------------------------------------------------------------------------------
# Reading results
@dataclass
class Survey:
    """A survey on disk (a folder of module files, or one Parquet file): adapters, modules, queries."""

    path: Path
    meta: dict

    @property
    def adapters(self) -> pd.DataFrame:
        """One row per adapter: ``name, base, r, alpha, target_modules, kinds, modules, location``."""
        frame = pd.DataFrame(self.meta["adapters"])
        return frame.drop(columns=["fingerprint"], errors="ignore")

    @property
    def names(self) -> list[str]:
        return [a["name"] for a in self.meta["adapters"]]

    def _dataset(self):
        import pyarrow.dataset as ds

        return ds.dataset(str(self.path), format="parquet")

    def table(self, columns: Sequence[str] | None = None, filter=None):
        """The rows (a ``pyarrow.Table``), optionally some columns and a ``pyarrow.dataset`` filter expression."""
        return self._dataset().to_table(columns=list(columns) if columns else None, filter=filter)

    def frame(self, columns: Sequence[str] | None = None, filter=None) -> pd.DataFrame:
        return self.table(columns, filter).to_pandas()

    def modules(self) -> pd.DataFrame:
        """The modules present: ``stack, layer, kind, module``."""
        t = self.table(["stack", "layer", "kind", "module"]).to_pandas()
        t = t.astype({"stack": str, "kind": str, "module": str})
        return t.drop_duplicates().reset_index(drop=True)

    def _module_filter(self, kind: str | Iterable[str] | None, layers: Iterable[int] | None):
        import pyarrow.dataset as ds

        expr = None
        if kind is not None:
            expr = ds.field("kind").isin([kind] if isinstance(kind, str) else list(kind))
        if layers is not None:
            e = ds.field("layer").isin([int(v) for v in layers])
            expr = e if expr is None else expr & e
        return expr

    def matrix(self, metric: str = "grassmann_ba", kind: str | Iterable[str] | None = None,
               layers: Iterable[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(values, counts)``, each ``[N, N]``: the mean of ``metric`` over the chosen modules where defined.

        NaN entries are skipped (``counts``: how many modules each pair averaged); a pair undefined
        at every module stays NaN. Zero diagonal (counts = modules present).
        """
        _check_metric(metric)
        t = self.table(["i", "j", metric], self._module_filter(kind, layers))
        n = len(self.names)
        i = t.column("i").to_numpy().astype(np.int64)
        j = t.column("j").to_numpy().astype(np.int64)
        v = t.column(metric).to_numpy(zero_copy_only=False).astype(np.float64)
        ok = np.isfinite(v)
        pos = i * n + j
        total = np.bincount(pos[ok], weights=v[ok], minlength=n * n).reshape(n, n)
        count = np.bincount(pos[ok], minlength=n * n).reshape(n, n)
        total, count = total + total.T, count + count.T
        with np.errstate(invalid="ignore", divide="ignore"):
            values = np.where(count > 0, total / np.maximum(count, 1), np.nan)
        np.fill_diagonal(values, 0.0)
        return values, count

    def neighbours(self, name: str, metric: str = "grassmann_ba", k: int = 10, kind: str | Iterable[str] | None = None,
                   layers: Iterable[int] | None = None) -> pd.DataFrame:
        """The ``k`` adapters nearest to ``name`` by the mean of ``metric`` over the chosen modules.

        Columns ``rank, adapter, distance, modules`` (how many modules the mean averaged); adapters
        whose distance is undefined at every module come last with NaN (never as 0).
        """
        import pyarrow.compute as pc
        import pyarrow.dataset as ds

        _check_metric(metric)
        names = self.names
        if name not in names:
            close = [n for n in names if name.lower() in n.lower()][:5]
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise AtlasError(f"no adapter named {name!r} in this survey ({len(names)} adapters){hint}")
        me = names.index(name)
        expr = (ds.field("i") == me) | (ds.field("j") == me)
        extra = self._module_filter(kind, layers)
        t = self.table(["i", "j", metric], expr if extra is None else expr & extra)
        i = t.column("i").to_numpy().astype(np.int64)
        j = t.column("j").to_numpy().astype(np.int64)
        other = np.where(i == me, j, i)
        v = pc.fill_null(t.column(metric), float("nan")).to_numpy().astype(np.float64)
        ok = np.isfinite(v)
        n = len(names)
        total = np.bincount(other[ok], weights=v[ok], minlength=n)
        count = np.bincount(other[ok], minlength=n)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(count > 0, total / np.maximum(count, 1), np.nan)
        frame = pd.DataFrame({"adapter": names, "distance": mean, "modules": count})
        frame = frame.drop(index=me).sort_values(["distance", "adapter"], na_position="last", kind="stable")
        frame = frame.head(int(k)).reset_index(drop=True)
        frame.insert(0, "rank", np.arange(1, len(frame) + 1))
        frame.attrs.update(adapter=name, metric=metric)
        return frame

    def save(self, path: str | os.PathLike) -> Path:
        """Write the whole survey as one Parquet file (the manifest in its schema metadata)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.table(), path, self.meta)
        return path

    def to_bytes(self) -> bytes:
        """The survey as one Parquet file, in memory (the page's download)."""

        import pyarrow.parquet as pq

        table = self.table()
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), _METADATA_KEY: json.dumps(self.meta)})
        buf = io.BytesIO()
        pq.write_table(table, buf)
        return buf.getvalue()


def _check_metric(metric: str) -> None:
    if metric not in METRIC_COLUMNS:
        raise AtlasError(f"unknown metric {metric!r}; expected one of {', '.join(METRIC_COLUMNS)}")


def open_survey(path: str | os.PathLike) -> Survey:
    """Open a survey folder written by :func:`run_survey`, or one Parquet file written by :meth:`Survey.save`."""
    import pyarrow.parquet as pq

    path = Path(path).expanduser()
    if path.is_dir():
        if not (path / MANIFEST).is_file():
            raise AtlasError(f"{path}: not a survey folder (no {MANIFEST})")
        meta = json.loads((path / MANIFEST).read_text())
        if not finished_modules(path):
            raise AtlasError(f"{path}: the survey has no finished module yet")
        return Survey(path, meta)
    if not path.is_file():
        raise AtlasError(f"{path}: no such file or folder")
    try:
        schema = pq.read_schema(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for non-Parquet bytes
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise AtlasError(f"{path}: not a Parquet file ({detail})") from exc
    raw = (schema.metadata or {}).get(_METADATA_KEY)
    if raw is None:
        raise AtlasError(f"{path}: a Parquet file without survey metadata (write it with Survey.save)")
    return Survey(path, json.loads(raw))


def survey_bytes_to_file(data: bytes, folder: str | os.PathLike) -> Path:
    """Write an uploaded survey file into ``folder`` and return its path (checked by :func:`open_survey`)."""
    digest = hashlib.sha256(data).hexdigest()[:16]
    path = Path(folder) / f"survey-{digest}.parquet"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    open_survey(path)
    return path


def factors_gb(refs: Sequence[AdapterRef]) -> float:
    """Size of every adapter's factors of the common modules as float32, in GB (for messages)."""
    total = 0
    for ref in refs:
        for key, f in ref.factors.items():
            m, n = ref.shapes[key]
            total += (m + n) * f.rank * 4
    return total / 1e9


def filter_adapters(adapters: pd.DataFrame, *, bases: Sequence[str] = (), ranks: Sequence[int] = (),
                    targets: Sequence[str] = ()) -> list[str]:
    """Names of the adapters of :meth:`Survey.adapters` (``adapters``) of the chosen bases and ranks (an empty
    choice: all) that target every chosen module name."""
    keep = []
    for row in adapters.itertuples():
        base = str(row.base or "not declared")
        if bases and base not in bases:
            continue
        if ranks and int(row.r) not in set(ranks):
            continue
        if targets and not set(targets) <= set(row.target_modules or []):
            continue
        keep.append(row.name)
    return keep


def cluster_order(values: np.ndarray) -> tuple[np.ndarray, int]:
    """Leaf order of average-linkage hierarchical clustering of ``values`` ``[n, n]``; and the NaN pairs.

    Undefined (NaN) distances are treated as the largest defined distance *for the ordering only*
    (the heatmap still shows them as undefined).
    """
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    n = values.shape[0]
    if n < 3:
        return np.arange(n), 0
    D = np.array(values, dtype=float)
    bad = ~np.isfinite(D)
    np.fill_diagonal(bad, False)
    finite = D[np.isfinite(D)]
    fill = float(finite.max()) if finite.size else 1.0
    D[bad] = fill
    D = (D + D.T) / 2
    np.fill_diagonal(D, 0.0)
    Z = linkage(squareform(np.clip(D, 0.0, None), checks=False), method="average")
    return leaves_list(Z), int(bad.sum() // 2)


def nearest(values: np.ndarray, counts: np.ndarray, names: Sequence[str], name: str, k: int) -> pd.DataFrame:
    """The ``k`` nearest to ``name`` among ``names`` in a (filtered) survey matrix ``values`` with its module
    ``counts`` (:meth:`Survey.matrix`): ``rank, adapter, distance, modules averaged``; NaN last, never as 0."""
    i = list(names).index(name)
    frame = pd.DataFrame({"adapter": list(names), "distance": values[i], "modules averaged": counts[i]})
    frame = frame.drop(index=i).sort_values(["distance", "adapter"], na_position="last", kind="stable").head(k)
    frame.insert(0, "rank", np.arange(1, len(frame) + 1))
    return frame.reset_index(drop=True)
