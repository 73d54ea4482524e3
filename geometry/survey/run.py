"""Running a survey: planning the module tasks, writing each module's Parquet file atomically, resuming, and the
in-process runners."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from geometry.errors import AtlasError
from geometry.survey.compute import (
    ModuleTask,
    SurveySettings,
    compute_module,
    condensed_pairs,
    module_distances,
)
from geometry.survey.format import (
    FORMAT_VERSION,
    MANIFEST,
    METRIC_COLUMNS,
    Progress,
    _write_atomic,
    finished_modules,
)
from geometry.survey.index import AdapterRef, FactorRef, scan
from geometry.survey.results import Survey, open_survey
from geometry.types import ordered_keys


# ---------------------------------------------------------------------------------------------
# Planning and writing
def plan(refs: Sequence[AdapterRef], kind: str | Iterable[str] | None = None, settings: SurveySettings | None = None,
         layers: Iterable[int] | None = None) -> list[ModuleTask]:
    """One :class:`ModuleTask` per module common to all adapters (of ``kind``, one or several, / ``layers`` when given).

    Raises when a common module has different shapes (different base models), naming both adapters.
    """
    settings = settings or SurveySettings()
    if len(refs) < 2:
        raise AtlasError(f"a survey needs at least 2 adapters, got {len(refs)}")
    common = set(refs[0].factors)
    for ref in refs[1:]:
        common &= set(ref.factors)
    if kind is not None:
        kinds = [kind] if isinstance(kind, str) else list(kind)
        have = {k.kind for k in common}
        missing = [k for k in kinds if k not in have]
        if missing:
            raise AtlasError(
                f"kind(s) {', '.join(missing)} not common to all adapters (common: {', '.join(sorted(have))})")
        common = {k for k in common if k.kind in set(kinds)}
    if layers is not None:
        wanted = {int(v) for v in layers}
        common = {k for k in common if k.layer in wanted}
    if not common:
        raise AtlasError("these adapters have no module in common")
    tasks = []
    for index, key in enumerate(ordered_keys(common)):
        shape = refs[0].shapes[key]
        for ref in refs[1:]:
            if ref.shapes[key] != shape:
                raise AtlasError(
                    f"adapter {ref.name!r} has module {key.label} of shape {ref.shapes[key][0]}x{ref.shapes[key][1]} "
                    f"but {refs[0].name!r} has {shape[0]}x{shape[1]}: they adapt different base models")
        tasks.append(ModuleTask(index, key, shape, tuple(ref.factors[key] for ref in refs), settings))
    return tasks


def _part_name(task: ModuleTask) -> str:
    safe = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in task.label)[:80]
    return f"part-{task.index:05d}-{safe}.parquet"


def module_table(task: ModuleTask, result: dict, names: Sequence[str]):
    """The Parquet rows of one finished module: one per pair ``i < j``, every metric column (NaN kept)."""
    import pyarrow as pa

    n = len(names)
    ii, jj = condensed_pairs(n)
    cat = pa.array(list(names), pa.string())
    cols = {
        "i": pa.array(ii.astype(np.int32)), "j": pa.array(jj.astype(np.int32)),
        "adapter_i": pa.DictionaryArray.from_arrays(pa.array(ii.astype(np.int32)), cat),
        "adapter_j": pa.DictionaryArray.from_arrays(pa.array(jj.astype(np.int32)), cat),
        "stack": pa.DictionaryArray.from_arrays(pa.array(np.zeros(len(ii), np.int32)), pa.array([task.key.stack])),
        "layer": pa.array(np.full(len(ii), task.key.layer, np.int32)),
        "kind": pa.DictionaryArray.from_arrays(pa.array(np.zeros(len(ii), np.int32)), pa.array([task.key.kind])),
        "module": pa.DictionaryArray.from_arrays(pa.array(np.zeros(len(ii), np.int32)), pa.array([task.label])),
    }
    for c in METRIC_COLUMNS:
        cols[c] = pa.array(np.asarray(result["values"][c], dtype=np.float64))  # NaN stays NaN (not null)
    return pa.table(cols)


def manifest(refs: Sequence[AdapterRef], settings: SurveySettings) -> dict:
    return {"format": FORMAT_VERSION, "adapters": [r.describe() for r in refs], "settings": settings.numeric(),
            "metrics": list(METRIC_COLUMNS)}


def _check_manifest(out: Path, wanted: dict) -> None:
    path = out / MANIFEST
    if not path.is_file():
        return
    try:
        have = json.loads(path.read_text())
    except ValueError as exc:
        raise AtlasError(f"{path}: unreadable survey manifest ({exc})") from exc
    ours = [(a["name"], a["fingerprint"]) for a in wanted["adapters"]]
    theirs = [(a.get("name"), a.get("fingerprint")) for a in have.get("adapters", [])]
    if ours != theirs or have.get("settings") != wanted["settings"]:
        what = "other settings" if ours == theirs else "other adapters (or changed files)"
        raise AtlasError(f"{out}: holds a survey of {what}; choose another --out or delete it to start again")


def run_survey(
    sources, out: str | os.PathLike, *, kind: str | Iterable[str] | None = None, layers: Iterable[int] | None = None,
    settings: SurveySettings | None = None, progress: Progress | None = None, names: Sequence[str] | None = None,
    runner: Callable | None = None,
) -> Survey:
    """Survey every common module of the adapters of ``sources`` into the Parquet folder ``out``.

    ``sources``: see :func:`adapter_locations`, or a list of :class:`AdapterRef` from :func:`scan`.
    Modules already in ``out`` are skipped (resume). ``runner(tasks, on_result)``: how tasks run
    (default: one after the other in this process; :func:`geometry.survey.cluster.dask_runner` for a
    cluster); ``on_result`` writes each module as it finishes. ``progress(done, total, message)``
    counts modules (skipped ones included). Returns the :class:`Survey`.
    """
    settings = settings or SurveySettings()
    is_refs = isinstance(sources, Sequence) and not isinstance(sources, str) and sources and all(
        isinstance(s, AdapterRef) for s in sources)
    refs = list(sources) if is_refs else scan(sources, names)
    tasks = plan(refs, kind, settings, layers)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise AtlasError(f"{out}: exists and is not a survey folder")
    meta = manifest(refs, settings)
    _check_manifest(out, meta)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).write_text(json.dumps(meta, indent=1))
    done = finished_modules(out)
    todo = [t for t in tasks if _part_name(t) not in done]
    names_list = [r.name for r in refs]
    total, count = len(tasks), len(tasks) - len(todo)
    if progress:
        progress(count, total, f"{count} module(s) already done" if count else "starting")
    by_index = {t.index: t for t in todo}

    def on_result(result: dict) -> None:
        nonlocal count
        task = by_index[result["index"]]
        _write_atomic(module_table(task, result, names_list), out / _part_name(task))
        count += 1
        if progress:
            progress(count, total, f"{task.label} ({result['seconds']:.1f} s)")

    (runner or local_runner)(todo, on_result)
    return open_survey(out)


def local_runner(tasks: Sequence[ModuleTask], on_result: Callable[[dict], None]) -> None:
    """Run the tasks one after the other in this process (memory: one task's, bounded by the settings)."""
    for task in tasks:
        on_result(compute_module(task))


def refs_from_adapters(adapters: Sequence[Any]) -> list[AdapterRef]:
    """:class:`AdapterRef` entries for already loaded adapters (``geometry.load``): for :func:`memory_runner`."""
    refs = []
    for ad in adapters:
        target = ad.config.target_modules
        ref = AdapterRef(
            name=ad.name, location=ad.source or f"memory:{ad.name}", weights=f"memory:{ad.name}",
            base=ad.config.base_model_name_or_path, r=int(ad.config.r), alpha=float(ad.config.lora_alpha),
            target_modules=sorted([target] if isinstance(target, str) else list(target or [])),
            fingerprint=(ad.content_hash or f"unhashed:{id(ad)}")[:32],
        )
        for key, mod in ad.modules.items():
            ref.factors[key] = FactorRef(ref.weights, "", "", mod.rows, mod.rank, float(mod.scale))
            ref.shapes[key] = mod.shape
        refs.append(ref)
    return refs


def memory_runner(adapters: Sequence[Any]) -> Callable[[Sequence[ModuleTask], Callable[[dict], None]], None]:
    """A ``runner`` computing each module from loaded adapters' tensors (the dashboard's session set)."""

    def run(tasks: Sequence[ModuleTask], on_result: Callable[[dict], None]) -> None:
        for task in tasks:
            t0 = time.perf_counter()
            mods = [ad.modules[task.key] for ad in adapters]
            s = task.settings
            values = module_distances(
                [m.B for m in mods], [m.A for m in mods], [float(m.scale) for m in mods], [m.rank for m in mods],
                pad=s.pad, gram_dtype=s.gram_dtype, device=s.device, block=s.block, pair_chunk=s.pair_chunk,
                memory_gb=s.memory_gb,
            )
            on_result({"index": task.index, "label": task.label, "values": values,
                       "seconds": time.perf_counter() - t0, "device": str(s.device or "auto")})

    return run
