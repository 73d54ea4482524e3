"""The dashboard's compute layer: library calls cached by adapter content hash (distances, inclusion, anatomy,
interference, maps, merges and their scores, token dynamics, surveys). Run control (progress, Cancel, the
heavy-run queue, partial results) is in :mod:`ui.runs`; every cache's storage is in :mod:`ui.cache`.

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

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from geometry import survey as sv
from geometry.errors import AtlasError
from geometry.evaluation.tasks import adapter_task_name
from geometry.types import Adapter
from ui import cache
from ui.runs import _keep_partial, _mark_cancelled, partial, progress_bar, queued  # noqa: F401
from ui.views import relabel, slice_tensor

#: Bump when the meaning of a cached result changes (it is part of every cache key).
CACHE_VERSION = "dashboard-1"
_MISSING = object()


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
def _rank_memory(content_hash: str, energy: float, _adapter: Adapter) -> pd.DataFrame:
    import geometry

    return geometry.ranks(_adapter, energy=energy)


def rank_table(adapter: Adapter, energy: float) -> pd.DataFrame:
    """``geometry.ranks`` of one adapter at ``energy``, once per (contents, energy)."""
    return _rank_memory(adapter.content_hash, float(energy), adapter)


@st.cache_data(show_spinner=False, max_entries=8)
def _compressed_memory(content_hash: str, energy: float, _adapter: Adapter):
    import geometry

    return geometry.compress(_adapter, energy=energy)


def compressed(adapter: Adapter, energy: float):
    """``geometry.compress(adapter, energy=...)``, once per (contents, energy)."""
    return _compressed_memory(adapter.content_hash, float(energy), adapter)


@st.cache_data(show_spinner=False, max_entries=8)
def _recipe_memory(key: tuple, text: str, _adapters: tuple[Adapter, ...]):
    import geometry

    return geometry.merge(list(_adapters), recipe=text)


def merged_from_recipe(adapters: Sequence[Adapter], text: str):
    """``geometry.merge(adapters, recipe=text)`` once per (contents, recipe text); raises the library's error."""
    return _recipe_memory(content_key(adapters), text, tuple(adapters))


@st.cache_data(show_spinner=False, max_entries=32)
def _summary_memory(content_hash: str, _merged) -> dict:
    return _merged.summary()


def merged_summary(merged_adapter) -> dict:
    """``merged_adapter.summary()`` once per merge (its energy kept walks every module's factors)."""
    return _summary_memory(merged_adapter.content_hash, merged_adapter)


@st.cache_data(show_spinner=False, max_entries=16)
def _zip_memory(content_hash: str, rank: int | None, head: str | None, scores_key: str, _merged, _scores=None) -> bytes:
    return _merged.to_zip_bytes(rank=rank, head=head, scores=_scores)


def merged_zip(merged_adapter, rank: int | None, head: str | None, scores=None) -> bytes:
    """The merged adapter as a peft folder zip with its model card (``README.md``), built once per merge, rank,
    head and scores (``scores``: the page's ``MergeEvaluation``, written in the card; ``None``: "not measured")."""
    scores_key = "" if scores is None else f"{scores.anp!r}:{scores.tasks_total}:{scores.frame.to_json()}"
    return _zip_memory(merged_adapter.content_hash, rank, head, scores_key, merged_adapter, scores)


def _task_files_key(adapters: Sequence[Adapter], tasks: str) -> tuple[str, ...]:
    """Content hashes of each adapter's test split (what the scores depend on besides the models)."""
    from geometry.evaluation.tasks import find_task_dir

    return tuple(_file_digest(find_task_dir(a, tasks) / "test.jsonl") for a in adapters)


def _file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes, read again only when its size or modification time changes (``ui.cache``)."""
    return cache.file_digest(path)


def merge_scores_key(adapters: Sequence[Adapter], tasks: str, merged_adapter, limit: int | None) -> tuple:
    return (merged_adapter.content_hash, content_key(adapters), _task_files_key(adapters, tasks), limit)


def merge_scores(adapters: Sequence[Adapter], tasks: str, merged_adapter, limit: int | None, *,
                 run: bool):
    """``geometry.evaluation.merge_eval.evaluate_merge`` (per-task scores and ANP) when cached, or when ``run``
    (then with a progress bar; every evaluation is cached on disk). When neither: the tasks a
    cancelled run finished (``complete`` False), or ``None``."""
    from geometry.evaluation.merge_eval import evaluate_merge

    key = merge_scores_key(adapters, tasks, merged_adapter, limit)
    try:
        return _disk_get("merge_scores", key)
    except _Miss:
        if not run:
            return partial("merge_scores", key)
    with progress_bar("Scoring fine-tuned and merged models", on_cancel=_mark_cancelled("merge_scores", key)) as update, \
            queued(update):
        return _disk_compute("merge_scores", key, lambda: evaluate_merge(
            list(adapters), tasks, merged=merged_adapter, limit=limit, progress=update,
            partial=_keep_partial("merge_scores", key), cache=cache.results()))


def advice_key(adapters: Sequence[Adapter], tasks: str, settings: dict) -> tuple:
    return (content_key(adapters), _task_files_key(adapters, tasks), tuple(sorted(settings.items())))


def advice(adapters: Sequence[Adapter], tasks: str, settings: dict, *, run: bool):
    """``geometry.advise`` (candidate merges ranked without labels) when cached, or when ``run`` (then with a
    progress bar, time left and Cancel; every score it measures is cached on disk, so a cancelled run resumes
    faster). ``settings``: ``budget``, ``criterion``, ``samples``, ``learned``, ``measure``, ``limit``.
    ``None`` when neither cached nor run."""
    from geometry.evaluation.advise import advise

    key = advice_key(adapters, tasks, settings)
    try:
        return _disk_get("advice", key)
    except _Miss:
        if not run:
            return None
    with progress_bar("Ranking candidate merges", on_cancel=_mark_cancelled("advice", key)) as update, queued(update):
        return _disk_compute("advice", key, lambda: advise(list(adapters), tasks, progress=update, cache=cache.results(),
                                                           **settings))


def pairwise_key(adapters: Sequence[Adapter], tasks: str, method: str, params: dict,
                 limit: int | None) -> tuple:
    return (*_merge_key(adapters, method, None, params), _task_files_key(adapters, tasks), limit)


def pairwise(adapters: Sequence[Adapter], tasks: str, method: str, params: dict, limit: int | None, *,
             run: bool):
    """``geometry.evaluation.merge_eval.pairwise_study`` labelled with the current names, when cached or when ``run``.

    When neither: the pairs a cancelled run finished (``complete`` False, the others NaN), or ``None``.
    """
    import dataclasses

    from geometry.evaluation.merge_eval import pairwise_study

    key = pairwise_key(adapters, tasks, method, params, limit)
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
                    list(adapters), tasks, method, limit=limit, progress=update,
                    show_progress=False, partial=_keep_partial("pairwise", key), cache=cache.results(), **params))
    return dataclasses.replace(result, adapters=[a.name for a in adapters])  # a copy: cached results stay as they are


@st.cache_data(show_spinner=False, max_entries=64)
def _dynamics_memory(key: tuple[str, ...], names: tuple[str, ...], text: str, threshold: float,
                     include_special: bool, _adapters: Sequence[Adapter]):
    from geometry.analysis.tokens import token_dynamics

    return token_dynamics(list(_adapters), text, threshold=threshold, include_special=include_special,
                          cache=cache.results())


def dynamics(adapters: Sequence[Adapter], text: str, threshold: float, include_special: bool):
    """``geometry.analysis.tokens.token_dynamics`` of the chosen adapters (raises ``AtlasError`` on bad input)."""
    with st.spinner("Running the base model and the adapters on the text (the base is loaded once)…"):
        return _dynamics_memory(content_key(adapters), tuple(a.name for a in adapters), text, float(threshold),
                                bool(include_special), list(adapters))


def _batch_call(adapters: Sequence[Adapter], task: str, limit: int, threshold: float, include_special: bool,
                split: str, **extra):
    from geometry.analysis.tokens import batch_dynamics

    return batch_dynamics(list(adapters), task=task, split=split, limit=int(limit), threshold=float(threshold),
                          include_special=bool(include_special), cache=cache.results(), **extra)


def batch_key(adapters: Sequence[Adapter], task: str, limit: int, threshold: float, include_special: bool,
              split: str = "validation") -> tuple:
    return (content_key(adapters), tuple(a.name for a in adapters), str(task), split, int(limit), float(threshold),
            bool(include_special))


def batch(adapters: Sequence[Adapter], task: str, limit: int, threshold: float, include_special: bool,
          split: str = "validation", *, on_cancel=None):
    """``geometry.analysis.tokens.batch_dynamics`` over the first ``limit`` inputs of ``split`` of ``task``: from the
    disk cache when it is there, else run with a progress bar (inputs done / total, time left, Cancel).
    Each step's inputs are cached and the latest partial result is kept in the session
    (:func:`batch_partial`), so a cancelled run keeps what finished and a new run resumes there."""

    args = (adapters, str(task), limit, threshold, include_special, split)
    key = batch_key(*args)
    done = _batch_call(*args, cached_only=True)
    if done is None:
        with progress_bar(f"Running {limit} inputs of {Path(task).name} through the base and "
                                  f"{len(adapters)} adapter(s)", on_cancel=on_cancel) as update:
            done = _batch_call(*args, progress=update, partial=_keep_partial("token_batch", key))
    st.session_state.get("_partial_results", {}).pop(("token_batch", key), None)  # finished: nothing partial
    return done


def batch_partial(adapters: Sequence[Adapter], task: str, limit: int, threshold: float, include_special: bool,
                  split: str = "validation"):
    """What a cancelled batch run of these settings finished (a ``BatchDynamics`` of fewer inputs), or ``None``."""

    return partial("token_batch", batch_key(adapters, str(task), limit, threshold, include_special, split))


@st.cache_data(show_spinner=False, max_entries=32)
def particles(**params):
    """``geometry.analysis.particles.simulate(**params)``, cached by its parameters."""
    from geometry.analysis.particles import simulate

    return simulate(**params)


def example_texts(adapters: Sequence[Adapter], tasks: Path) -> dict[str, str]:
    """``{task name: first validation input}`` for the chosen adapters' tasks found under ``tasks``, then the
    other tasks there; a neutral sentence when there is none."""

    names = [adapter_task_name(a) for a in adapters] + [a.name for a in adapters]
    if tasks.is_dir():
        names += sorted(p.name for p in tasks.iterdir() if p.is_dir())
    return dict(_first_inputs(str(tasks), tuple(dict.fromkeys(names))))


@st.cache_data(show_spinner=False, max_entries=32, ttl=600)
def _first_inputs(tasks: str, names: tuple[str, ...]) -> dict[str, str]:
    from geometry.analysis.tokens import task_texts

    out: dict[str, str] = {}
    for name in names:
        folder = Path(tasks) / name
        if (folder / "validation.jsonl").is_file():
            try:
                out[name] = task_texts(folder, "validation", 1)[0]
            except Exception:  # noqa: BLE001  (an unreadable task is just not offered as an example)
                continue
    return out or {"example": "The quick brown fox jumps over the lazy dog."}


def task_folders(tasks: Path) -> list[str]:
    """Task folders under ``tasks`` that have a validation split."""
    if not tasks.is_dir():
        return []
    return sorted(p.name for p in tasks.iterdir() if (p / "validation.jsonl").is_file())


def surveys_dir() -> Path:
    """Where surveys run from the page are written (under the app's disk cache)."""
    from ui.cache import cache_dir

    return cache_dir() / "surveys"


def _survey_stamp(path: Path) -> tuple:
    """Changes when the survey on disk changes (a module added, a file replaced)."""
    if path.is_dir():
        parts = sorted(sv.finished_modules(path))
        return (len(parts), parts[-1] if parts else "", (path / sv.MANIFEST).stat().st_mtime_ns)
    st_ = path.stat()
    return (st_.st_size, st_.st_mtime_ns)


@st.cache_data(show_spinner=False, max_entries=32)
def _open_survey(path: str, stamp: tuple) -> sv.Survey:
    return sv.open_survey(path)


def open_survey(path: str | Path) -> sv.Survey:
    """:func:`geometry.survey.open_survey`, memoised while the files do not change (raises ``AtlasError``)."""
    path = Path(path).expanduser()
    if not path.exists():
        return sv.open_survey(path)  # the library's message
    return _open_survey(str(path), _survey_stamp(path))


@st.cache_data(show_spinner=False, max_entries=64)
def _survey_matrix(path: str, stamp: tuple, metric: str, kinds: tuple[str, ...] | None) -> tuple[np.ndarray, np.ndarray]:
    return sv.open_survey(path).matrix(metric, kind=kinds)


def survey_matrix(survey: sv.Survey, metric: str, kinds: Sequence[str] | None) -> tuple[np.ndarray, np.ndarray]:
    """``Survey.matrix`` (mean over the chosen kinds' modules, NaN skipped; and counts), memoised."""
    return _survey_matrix(str(survey.path), _survey_stamp(survey.path), metric, tuple(kinds) if kinds else None)


@st.cache_data(show_spinner=False, max_entries=16)
def _survey_modules(path: str, stamp: tuple) -> pd.DataFrame:
    return sv.open_survey(path).modules()


def survey_modules(survey: sv.Survey) -> pd.DataFrame:
    return _survey_modules(str(survey.path), _survey_stamp(survey.path))


def saved_survey_upload(data: bytes) -> Path:
    """An uploaded survey file, stored once under :func:`surveys_dir` by content (checked by the library)."""
    return sv.survey_bytes_to_file(data, surveys_dir() / "uploads")


def run_survey_on(adapters: Sequence, progress=None) -> Path:
    """Survey the session's adapters (in memory) into a folder keyed by their content and names.

    A cancelled run (the progress bar's Cancel) keeps its finished modules: the next run resumes there.
    """
    text = "\n".join(f"{a.name}\t{a.content_hash or f'unhashed:{id(a)}'}" for a in adapters)
    out = surveys_dir() / hashlib.sha256(text.encode()).hexdigest()[:16] / "results.parquet"
    sv.run_survey(sv.refs_from_adapters(adapters), out, runner=sv.memory_runner(adapters), progress=progress)
    return out
