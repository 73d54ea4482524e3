"""The dashboard's compute layer: library calls cached by adapter content hash.

Two cache levels: ``st.cache_data`` in memory (per server process, keyed by content hashes only,
so renaming an adapter costs nothing) and the dashboard's disk cache, ``ui.cache.results()`` under
``cache/store`` (survives a restart; also handed to the library calls that take ``cache=``). Heavy
results are computed once per adapter set; pages then only re-slice them (``ui.views``). Results are
keyed by content, and display names are put back on afterwards.

Progress: a cached function must not draw (Streamlit replays what a cached function drew), so
the slow first computation runs outside ``st.cache_data`` with a progress bar, writes the disk
cache, and the in-memory layer then reads it back.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from geometry.errors import AtlasError
from geometry.types import Adapter
from ui import cache
from ui.views import relabel, slice_tensor

#: Bump when the meaning of a cached result changes (it is part of every cache key).
CACHE_VERSION = "dashboard-1"
_MISSING = object()

Progress = Callable[[int, int, str], None]


class _Miss(Exception):
    """Raised by the memory layer when the disk cache does not hold a result yet."""


def content_key(adapters: Sequence[Adapter]) -> tuple[str, ...]:
    """The content hashes of ``adapters`` in order (the cache key of an adapter set)."""
    return tuple(a.content_hash or f"unhashed:{id(a)}" for a in adapters)


def _disk_get(namespace: str, key: tuple) -> object:
    """The dashboard's disk cache entry, or :class:`_Miss`."""
    value = cache.results().get(namespace, (CACHE_VERSION, *key), _MISSING)
    if value is _MISSING:
        raise _Miss(namespace)
    return value


def _disk_compute(namespace: str, key: tuple, compute: Callable[[], object]) -> object:
    return cache.results().get_or_compute(namespace, (CACHE_VERSION, *key), compute)


@contextmanager
def progress_bar(label: str, *, cancel: bool = True, on_cancel: Callable[[], None] | None = None):
    """A visible progress bar (not in a collapsed box) with the count, the elapsed time and an estimate
    of what is left; yields a ``progress(done, total, message)`` callback.

    ``cancel``: a Cancel button beside the bar. Clicking it reruns the page, which stops this run at its
    next progress update; every step that finished is already in the disk cache (each evaluation,
    each pair), so nothing done is lost and a new run resumes from there. ``on_cancel`` runs first (a
    page whose run starts by itself turns off what started it there).
    """
    holder = st.empty()
    box = holder.container(border=True)
    bar = box.progress(0.0, text=f"{label}…")
    if cancel:
        box.button("Cancel (finished steps are kept)", key=f"cancel_{next(_BARS)}",
                   icon=":material/cancel:", on_click=on_cancel)
    start = time.perf_counter()

    def update(done: int, total: int, message: str = "") -> None:
        frac = 0.0 if total <= 0 else min(1.0, max(0.0, done / total))
        elapsed = time.perf_counter() - start
        left = f" · about {_seconds(elapsed / done * (total - done))} left" if 0 < done < total else ""
        detail = f" · {message}" if message else ""
        bar.progress(frac, text=f"{label}: {done}/{total} · {_seconds(elapsed)} elapsed{left}{detail}")

    yield update
    holder.empty()


#: Scoring throughput measured on the 2-core development machine (all-MiniLM-L6-v2 with a LoRA applied
#: by the runtime, 200 test examples in 1.1 s), plus the merge itself: for cost estimates only.
EXAMPLES_PER_SECOND = 180.0
SECONDS_PER_MERGE = 0.3


def estimate_seconds(evaluations: int, examples: int) -> str:
    """A rough wall time for ``evaluations`` scores of ``examples`` examples each (see EXAMPLES_PER_SECOND)."""
    return _seconds(evaluations * (examples / EXAMPLES_PER_SECOND + SECONDS_PER_MERGE / 2))


_BARS = itertools.count()


def _seconds(value: float) -> str:
    return f"{value:.0f} s" if value < 90 else f"{value / 60:.1f} min"


# -- distances ----------------------------------------------------------------------------------
@st.cache_data(show_spinner=False, max_entries=16)
def _distances_memory(key: tuple[str, ...]) -> dict:
    return _disk_get("all_distances", key)


def distances(adapters: Sequence[Adapter], within: Sequence[Adapter] | None = None) -> dict:
    """``geometry.distance_tensors`` of the set, labelled with the current display names.

    Keys are ``(metric, factor, stack, kind)``; values are ``DistanceTensor``. ``within``: a larger
    set holding ``adapters`` (the session's comparable adapters). When the chosen adapters have the
    same common modules as ``within``, the result for ``within`` is computed once (or read from the
    caches) and sliced to the chosen rows and columns, so picking a subset recomputes nothing;
    otherwise (the subset shares more modules) the subset is computed on its own.
    """
    if within is not None and _sliceable(adapters, within):
        full = distances(within)
        hashes = [a.content_hash for a in within]
        idx = [hashes.index(a.content_hash) for a in adapters]
        notes = check(adapters)
        return {k: slice_tensor(v, idx, [a.name for a in adapters], notes) for k, v in full.items()}
    import geometry

    key = content_key(adapters)
    names = [a.name for a in adapters]
    try:
        raw = _distances_memory(key)
    except _Miss:
        with progress_bar("Computing distances (once per adapter set)") as update:
            raw = _disk_compute("all_distances", key, lambda: geometry.distance_tensors(list(adapters), progress=update))
        try:
            raw = _distances_memory(key)
        except _Miss:  # the disk cache is not writable: keep the fresh result
            pass
    return {k: relabel(v, names) for k, v in raw.items()}


def _sliceable(adapters: Sequence[Adapter], within: Sequence[Adapter]) -> bool:
    from geometry.linalg.align import common_keys

    hashes = [a.content_hash for a in within]
    if len(adapters) >= len(within) or len(set(hashes)) != len(hashes) or not all(a.content_hash for a in adapters):
        return False
    if not all(a.content_hash in hashes for a in adapters):
        return False
    return set(common_keys(list(adapters))) == set(common_keys(list(within)))


# -- anatomy ------------------------------------------------------------------------------------
@st.cache_data(show_spinner=False, max_entries=64)
def _anatomy_memory(content_hash: str, _adapter: Adapter) -> pd.DataFrame:
    import geometry

    return _disk_compute("anatomy", (content_hash,), lambda: geometry.anatomy(_adapter))


def anatomy(adapter: Adapter) -> pd.DataFrame:
    """``geometry.analysis.anatomy.anatomy(adapter)``: one row per module (norms, spectra, ranks)."""
    with st.spinner(f"Decomposing {adapter.name} (once per adapter)..."):
        return _anatomy_memory(adapter.content_hash or f"unhashed:{id(adapter)}", adapter)


# -- task interference (TSV) --------------------------------------------------------------------
@st.cache_data(show_spinner=False, max_entries=64)
def _interference_memory(key: tuple[str, ...], score: str, kind: str, layers: tuple[int, ...], stack: str,
                         _adapters: Sequence[Adapter]) -> pd.DataFrame:
    import geometry

    return _disk_compute("interference", (*key, score, kind, layers, stack), lambda: geometry.interference(
        list(_adapters), score=score, kind=kind, layers=list(layers), stack=stack))


def interference(adapters: Sequence[Adapter], score: str, kind: str, layers, stack: str) -> pd.DataFrame:
    """``geometry.interference``: the mean over the chosen modules of TSV's task interference, ``[n, n]``."""
    with st.spinner("Task singular vectors of the chosen modules..."):
        return _interference_memory(content_key(adapters), score, kind, tuple(int(v) for v in layers), stack,
                                    adapters)


# -- inclusion ----------------------------------------------------------------------------------
@st.cache_data(show_spinner=False, max_entries=1024)
def _inclusion_memory(h1: str, h2: str, lam: float, _a1: Adapter, _a2: Adapter) -> pd.DataFrame:
    import geometry

    return _disk_compute("inclusion", (h1, h2, float(lam)), lambda: geometry.inclusion(_a1, _a2, lam=float(lam)))


def inclusion_pair(a1: Adapter, a2: Adapter, lam: float = 0.0) -> pd.DataFrame:
    """``geometry.analysis.inclusion.inclusion(a1, a2, lam)``: ``tau1 -> tau2``, one row per common module."""
    return _inclusion_memory(a1.content_hash, a2.content_hash, float(lam), a1, a2)


@st.cache_data(show_spinner=False, max_entries=32)
def _inclusion_tables_memory(key: tuple[str, ...], lam: float) -> dict:
    return _disk_get("inclusion_tables", (*key, float(lam)))


def inclusion_all_pairs(adapters: Sequence[Adapter], lam: float = 0.0) -> dict[tuple[int, int], pd.DataFrame]:
    """``geometry.analysis.inclusion.inclusion_tables``: every ordered pair ``(i, j), i != j``, each adapter
    decomposed once; a progress bar on first use, then memory and disk caches by content."""
    from geometry.analysis.inclusion import inclusion_tables

    key = content_key(adapters)
    try:
        return _inclusion_tables_memory(key, float(lam))
    except _Miss:
        n = len(adapters)
        with progress_bar(f"Spectral inclusion for {n * (n - 1)} ordered pairs (λ = {lam:g})") as update:
            tables = _disk_compute("inclusion_tables", (*key, float(lam)),
                                   lambda: inclusion_tables(list(adapters), lam=float(lam), progress=update))
    try:
        return _inclusion_tables_memory(key, float(lam))
    except _Miss:  # the disk cache is not writable: keep the fresh result
        return tables


@st.cache_data(show_spinner=False, max_entries=64)
def _inclusion_matrix_memory(key: tuple[str, ...], metric: str, kind: str | None, lam: float,
                             _adapters: Sequence[Adapter]) -> pd.DataFrame:
    import geometry

    return _disk_compute("inclusion_matrix", (*key, metric, kind, float(lam)), lambda: geometry.inclusion_matrix(
        list(_adapters), metric=metric, kind=kind, lam=float(lam)))


def inclusion_matrix(adapters: Sequence[Adapter], metric: str, kind: str | None, lam: float = 0.0) -> pd.DataFrame:
    """``geometry.inclusion_matrix``: row ``tau_i -> column tau_j``, the library's diagonal (an adapter with itself)."""
    return _inclusion_matrix_memory(content_key(adapters), metric, kind, float(lam), adapters)


# -- maps ---------------------------------------------------------------------------------------
@st.cache_data(show_spinner=False, max_entries=256)
def embedding(matrix: np.ndarray, names: tuple[str, ...], method: str, seed: int = 0):
    """``geometry.analysis.maps.embed_defined``: the 2-D map of the adapters with defined distances (memoised).

    Adapters with an undefined (NaN) distance are left out and named in ``.message``, never imputed.
    """
    from geometry.analysis.maps import embed_defined

    return embed_defined(np.asarray(matrix, dtype=float), list(names), method=method, seed=seed)


@dataclass
class MapView:
    """A 2-D map as the pages show it: ``mapped`` (:class:`geometry.analysis.maps.Map2D`), the ``method``
    actually used, a ``note`` saying why it is not the one asked for, and ``pending`` while UMAP compiles."""

    mapped: object
    method: str
    note: str | None = None
    pending: bool = False


def adapter_map(matrix: np.ndarray, names: Sequence[str], method: str, fallback: str = "pca") -> MapView:
    """The one map rule of the dashboard (Distances and Survey pages): UMAP still compiling in the background
    (numba, once per installation) or unavailable, or a method that fails on these points (too few for UMAP),
    gives the ``fallback`` method with a note; undefined distances leave adapters out, named (``embed_defined``)."""
    from geometry.analysis.maps import UMAP_MIN_POINTS
    from ui import warmup

    note, pending = None, False
    if method == "umap" and len(names) >= UMAP_MIN_POINTS and not warmup.umap_ready():
        warmup.start()  # normally started with the server (app.py); idempotent
        note, pending, method = (f"UMAP is being compiled in the background (numba, once per installation; about a "
                                 f"minute on 2 cores). Showing {fallback.upper()} until it is ready."), True, fallback
    elif method == "umap" and warmup.umap_error():
        note, method = f"UMAP is unavailable ({warmup.umap_error()}). Showing {fallback.upper()}.", fallback
    try:
        mapped = embedding(matrix, tuple(names), method)
    except AtlasError as exc:
        note, method = f"{exc}. Showing {fallback.upper()}.", fallback
        mapped = embedding(matrix, tuple(names), method)
    return MapView(mapped, method, note, pending)


# -- compatibility ------------------------------------------------------------------------------
def compatible_default(adapters: Sequence[Adapter]) -> list[str]:
    """Names of the largest group of adapters sharing a base model (the default comparison set)."""
    groups: dict[str, list[str]] = {}
    for a in adapters:
        groups.setdefault(str(a.config.base_model_name_or_path or "?"), []).append(a.name)
    if not groups:
        return []
    return max(groups.values(), key=len)


def check(adapters: Sequence[Adapter]) -> list[str]:
    """``geometry.linalg.align.check_compatible``: warnings, or raises ``IncompatibleAdaptersError``."""
    from geometry.linalg.align import check_compatible

    return list(check_compatible(list(adapters)))


# -- lambda sweep -------------------------------------------------------------------------------
SWEEP_LAMBDAS = (0.0, 1e-4, 1e-3, 1e-2, 0.05, 0.1, 0.2, 0.5, 1.0)


@st.cache_data(show_spinner=False, max_entries=256)
def _sweep_memory(h1: str, h2: str, lams: tuple[float, ...], _a1: Adapter, _a2: Adapter) -> pd.DataFrame:
    from geometry.analysis.inclusion import lambda_sweep as sweep

    return _disk_compute("lambda_sweep", (h1, h2, lams), lambda: sweep(_a1, _a2, lam=lams))


def lambda_sweep(a1: Adapter, a2: Adapter, lams: Sequence[float] = SWEEP_LAMBDAS) -> pd.DataFrame:
    """``geometry.analysis.inclusion.lambda_sweep``: mean metrics of ``tau1 -> tau2`` for each λ."""
    return _sweep_memory(a1.content_hash, a2.content_hash, tuple(float(v) for v in lams), a1, a2)


# -- merging ------------------------------------------------------------------------------------
def _merge_key(adapters: Sequence[Adapter], method: str, weights, params: dict) -> tuple:
    return (content_key(adapters), method, None if weights is None else tuple(map(float, weights)),
            tuple(sorted((k, v) for k, v in params.items())))


@st.cache_data(show_spinner=False, max_entries=16)
def _merged_memory(key: tuple, _adapters: tuple[Adapter, ...]):
    import geometry

    _, method, weights, params = key
    return geometry.merge(list(_adapters), method=method, weights=None if weights is None else list(weights),
                          **dict(params))


def merged(adapters: Sequence[Adapter], method: str, weights=None, params: dict | None = None):
    """``geometry.merge`` of the adapters, once per (contents, method, weights, parameters).

    Raises the library's ``AtlasError`` / ``ValueError`` on a bad choice (the page shows it).
    """
    return _merged_memory(_merge_key(adapters, method, weights, params or {}), tuple(adapters))


@st.cache_data(show_spinner=False, max_entries=32)
def _summary_memory(content_hash: str, _merged) -> dict:
    return _merged.summary()


def merged_summary(merged_adapter) -> dict:
    """``merged_adapter.summary()`` once per merge (its energy kept walks every module's factors)."""
    return _summary_memory(merged_adapter.content_hash, merged_adapter)


@st.cache_data(show_spinner=False, max_entries=16)
def _zip_memory(content_hash: str, rank: int | None, head: str | None, _merged) -> bytes:
    return _merged.to_zip_bytes(rank=rank, head=head)


def merged_zip(merged_adapter, rank: int | None, head: str | None) -> bytes:
    """The merged adapter as a peft folder zip (built once per merge, rank and head)."""
    return _zip_memory(merged_adapter.content_hash, rank, head, merged_adapter)


def _task_files_key(adapters: Sequence[Adapter], tasks_dir: str) -> tuple[str, ...]:
    """Content hashes of each adapter's test split (what the scores depend on besides the models)."""
    from geometry.evaluation.tasks import find_task_dir

    return tuple(_file_digest(find_task_dir(a, tasks_dir) / "test.jsonl") for a in adapters)


def _file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes, read again only when its size or modification time changes (``ui.cache``)."""
    return cache.file_digest(path)


def queued(update):
    """A heavy run's slot in the server-wide queue of a demo server (``ui.demo.heavy_slot``); while it
    waits, the progress bar says so (and its Cancel button still works)."""
    from ui import demo

    return demo.heavy_slot(waiting=lambda s: update(0, 1, f"queued behind another visitor's run ({s:.0f} s)"))


def _keep_partial(namespace: str, key: tuple):
    """A callback that keeps the latest partial result of a run in the session (see :func:`partial`)."""
    def keep(result) -> None:
        st.session_state.setdefault("_partial_results", {})[(namespace, key)] = result
    return keep


def _mark_cancelled(namespace: str, key: tuple):
    """``on_cancel`` of the bar of a run starting now: forgets an earlier cancel of this run and remembers in
    the session that this one was cancelled if its Cancel is clicked (see :func:`cancelled`)."""
    st.session_state.get("_cancelled_runs", set()).discard((namespace, key))

    def mark() -> None:
        st.session_state.setdefault("_cancelled_runs", set()).add((namespace, key))
    return mark


def cancelled(namespace: str, key: tuple) -> bool:
    """Whether the last run of ``namespace`` on ``key`` in this session was cancelled (with or without a
    step finished: before the first one :func:`partial` has nothing, and the page says so)."""
    return (namespace, key) in st.session_state.get("_cancelled_runs", set())


def partial(namespace: str, key: tuple):
    """What a run of ``namespace`` on ``key`` finished before it was cancelled (or ``None``).

    Runs report their partial results after each step; a Cancel click reruns the page, which stops the
    run, and the page shows this until a complete result exists (labelled as partial).
    """
    return st.session_state.get("_partial_results", {}).get((namespace, key))


def merge_scores_key(adapters: Sequence[Adapter], tasks_dir: str, merged_adapter, max_examples: int | None) -> tuple:
    return (merged_adapter.content_hash, content_key(adapters), _task_files_key(adapters, tasks_dir), max_examples)


def merge_scores(adapters: Sequence[Adapter], tasks_dir: str, merged_adapter, max_examples: int | None, *,
                 run: bool):
    """``geometry.evaluation.merge_eval.evaluate_merge`` (per-task scores and ANP) when cached, or when ``run``
    (then with a progress bar; every evaluation is cached on disk). When neither: the tasks a
    cancelled run finished (``complete`` False), or ``None``."""
    from geometry.evaluation.merge_eval import evaluate_merge

    key = merge_scores_key(adapters, tasks_dir, merged_adapter, max_examples)
    try:
        return _disk_get("merge_scores", key)
    except _Miss:
        if not run:
            return partial("merge_scores", key)
    with progress_bar("Scoring fine-tuned and merged models", on_cancel=_mark_cancelled("merge_scores", key)) as update, \
            queued(update):
        return _disk_compute("merge_scores", key, lambda: evaluate_merge(
            list(adapters), tasks_dir, merged=merged_adapter, limit=max_examples, progress=update,
            partial=_keep_partial("merge_scores", key), cache=cache.results()))


def pairwise_key(adapters: Sequence[Adapter], tasks_dir: str, method: str, params: dict,
                 max_examples: int | None) -> tuple:
    return (*_merge_key(adapters, method, None, params), _task_files_key(adapters, tasks_dir), max_examples)


def pairwise(adapters: Sequence[Adapter], tasks_dir: str, method: str, params: dict, max_examples: int | None, *,
             run: bool):
    """``geometry.evaluation.merge_eval.pairwise_study`` labelled with the current names, when cached or when ``run``.

    When neither: the pairs a cancelled run finished (``complete`` False, the others NaN), or ``None``.
    """
    import dataclasses

    from geometry.evaluation.merge_eval import pairwise_study

    key = pairwise_key(adapters, tasks_dir, method, params, max_examples)
    try:
        result = _disk_get("pairwise", key)
    except _Miss:
        if not run:
            result = partial("pairwise", key)
            if result is None:
                return None
        else:
            with progress_bar(f"Pairwise {method} merges", on_cancel=_mark_cancelled("pairwise", key)) as update, \
                    queued(update):
                result = _disk_compute("pairwise", key, lambda: pairwise_study(
                    list(adapters), tasks_dir, method, limit=max_examples, progress=update,
                    show_progress=False, partial=_keep_partial("pairwise", key), cache=cache.results(), **params))
    return dataclasses.replace(result, adapters=[a.name for a in adapters])  # a copy: cached results stay as they are
