"""What merging costs each task, and whether the geometry predicted it.

Definitions (DivMerge 2025; task-vector geometry paper, TALN 2024):

- ``P(theta, t)``: performance of model ``theta`` on the test split of task ``t`` (accuracy for
  classification; for generation the task's metric: exact match of the generated answer for classification
  cast as generation, ROUGE-1 / ROUGE-L F1 otherwise, ``labels.json``'s ``metric``), with task ``t``'s own head.
- **ANP** (Average Normalized Performance) of a merge of ``T`` tasks:
  ``ANP = (1/T) sum_t P(merged, t) / P(theta_t, t)``, in %; ``theta_t`` is the fine-tuned model of
  task ``t`` (here: the base model plus adapter ``t``).
- **Merge loss** of the pair ``(i, j)``: ``delta(i, j) = P(theta_i, i) - P(merge(i, j), i)``
  (asymmetric; ``delta(i, i) = 0``). The pairwise ANP of ``(i, j)`` is the ANP of that 2-task merge.
- **Geometry vs loss** (the geometry paper's Table 3): for each task ``i``, the Spearman
  correlation between ``delta(i, .)`` and ``Tbar_d(i, .)`` over the partners ``j != i``, where
  ``Tbar_d(i, j)`` is distance ``d`` (L2, cosine, Grassmann) between the task vectors of ``i`` and
  ``j`` averaged over the chosen layers (all, or the last ``k``), for one projection kind (q or v);
  reported as mean and standard deviation (population, ``ddof = 0``) over tasks.

Each adapter's task data is found under ``tasks`` by :func:`find_task_dir` (its
``training_info.json`` ``task`` field, else its name). Scores come from
:func:`geometry.evaluation.evaluate.evaluate`, kept on disk by content hash (merge method, parameters and
source adapters; task file; example limit) only when a ``cache=`` is given (:mod:`geometry.cache`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from geometry.errors import IncompatibleAdaptersError, InvalidArgumentError
from geometry.evaluation.evaluate import evaluate, source_hash
from geometry.evaluation.tasks import adapter_task_name, find_task_dir, task_file, task_metric  # noqa: F401  (re-exported)
from geometry.types import Adapter

Progress = Callable[[int, int, str], None]


# ------------------------------------------------------------------------------------------ tasks
def _metric(result: dict[str, Any]) -> float:
    if "metric" in result:  # generation: the task's own score (exact match, ROUGE-1 or ROUGE-L)
        return float(result[result["metric"]])
    return float(result["rouge_l"] if "rouge_l" in result else result["accuracy"])


def performance(source: Any, task: str | Path, head: str | None = None, limit: int | None = None, *,
                split: str = "test", cache: Any = None) -> float:
    """``P(source, task)``: accuracy (classification) or the task's metric (generation) on ``split`` (the test split).

    ``cache``: a :class:`geometry.cache.ResultCache` (or a folder) keeping the score; ``None`` touches no disk."""
    return _metric(evaluate(source, task, split, limit=limit, head=head, cache=cache))


def anp(merged: Sequence[float], finetuned: Sequence[float]) -> float:
    """``100 / T * sum_t merged_t / finetuned_t``."""
    m, f = np.asarray(merged, dtype=float), np.asarray(finetuned, dtype=float)
    if len(m) == 0 or len(m) != len(f):
        raise InvalidArgumentError(f"ANP needs as many merged as fine-tuned scores, got {len(m)} and {len(f)}")
    if np.any(f <= 0):
        raise InvalidArgumentError("ANP is undefined when a fine-tuned model scores 0 on its task")
    return float(100.0 * np.mean(m / f))


def check_unique_names(adapters: Sequence[Adapter]) -> None:
    names = [a.name for a in adapters]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise IncompatibleAdaptersError(f"adapter names must be unique to keep one head per task; repeated: {dup}")


# ------------------------------------------------------------------------------- one merge, T tasks
@dataclass
class MergeEvaluation:
    """Per-task scores of one merge: ``frame`` has task, adapter, finetuned, merged, normalized (%) and metric
    (``accuracy``, or a generation task's ``exact_match`` / ``rouge_1`` / ``rouge_l``).

    ``tasks_total``: the tasks the run was asked to score; a run stopped half-way has fewer rows in
    ``frame`` (``complete`` is False) and its ``anp`` is over the scored tasks only.
    """

    method: str
    params: dict[str, Any]
    frame: pd.DataFrame
    anp: float
    tasks_total: int | None = None

    @property
    def complete(self) -> bool:
        return self.tasks_total is None or len(self.frame) == self.tasks_total


def evaluate_merge(
    adapters: Sequence[Adapter],
    tasks: str | Path,
    method: str = "task_arithmetic",
    weights: Any = None,
    *,
    limit: int | None = None,
    progress: Progress | None = None,
    merged: Any = None,
    partial: Callable[[MergeEvaluation], None] | None = None,
    split: str = "test",
    cache: Any = None,
    **params: Any,
) -> MergeEvaluation:
    """Merge ``adapters`` (or take ``merged``) and score it on ``split`` of every task with that task's head.

    ``partial``: called after each task with the evaluation of the tasks scored so far
    (``MergeEvaluation.complete`` is False until the last), so that a run stopped half-way can
    still show what it finished. ``cache``: a :class:`geometry.cache.ResultCache` (or a folder) keeping
    each score, so that a stopped run resumes where it stopped; ``None`` touches no disk.
    """
    from geometry.cache import as_cache
    from geometry.merging import merge

    cache = as_cache(cache)
    adapters = list(adapters)
    check_unique_names(adapters)
    dirs = [find_task_dir(a, tasks, split) for a in adapters]
    if merged is None:
        merged = merge(adapters, method, weights, **params)
    rows = []
    total = 2 * len(adapters)
    for t, (ad, folder) in enumerate(zip(adapters, dirs)):
        if progress:
            progress(2 * t, total, f"{ad.name}: fine-tuned")
        ft = performance(ad, folder, limit=limit, split=split, cache=cache)
        if progress:
            progress(2 * t + 1, total, f"{ad.name}: merged")
        mg = performance(merged, folder, head=ad.name, limit=limit, split=split, cache=cache)
        rows.append({"task": folder.name, "adapter": ad.name, "finetuned": ft, "merged": mg,
                     "normalized": 100.0 * mg / ft if ft > 0 else math.nan, "metric": task_metric(folder, split)})
        if partial and len(rows) < len(adapters):
            frame = pd.DataFrame(rows)
            partial(MergeEvaluation(merged.method, dict(merged.params), frame,
                                    anp(frame["merged"], frame["finetuned"]), tasks_total=len(adapters)))
    if progress:
        progress(total, total, "done")
    frame = pd.DataFrame(rows)
    return MergeEvaluation(merged.method, dict(merged.params), frame, anp(frame["merged"], frame["finetuned"]),
                           tasks_total=len(adapters))


def methods_table(evaluations: Mapping[str, MergeEvaluation]) -> pd.DataFrame:
    """Several merges of the same tasks side by side, long: one row per (label, task) with ``method`` (the
    label given, e.g. ``"ties (20%)"``), ``weights`` (the task weights used, as text), ``task``, ``adapter``,
    ``finetuned``, ``merged`` and ``normalized`` (%). Labels keep their order."""
    rows = []
    for label, ev in evaluations.items():
        weights = ", ".join(f"{w:g}" for w in (ev.params.get("weights") or []) if isinstance(w, (int, float)))
        for r in ev.frame.itertuples(index=False):
            rows.append({"method": label, "weights": weights, "task": r.task, "adapter": r.adapter,
                         "finetuned": r.finetuned, "merged": r.merged, "normalized": r.normalized})
    return pd.DataFrame(rows, columns=["method", "weights", "task", "adapter", "finetuned", "merged", "normalized"])


def methods_matrix(evaluations: Mapping[str, MergeEvaluation]) -> pd.DataFrame:
    """The same, wide: one row per label, one column per task (``normalized`` %), and ``ANP`` last."""
    table = methods_table(evaluations)
    wide = table.pivot_table(index="method", columns="task", values="normalized", sort=False)
    wide["ANP"] = [evaluations[m].anp for m in wide.index]
    return wide


# -------------------------------------------------------------------------------------- pairwise
@dataclass
class PairwiseResult:
    """All 2-task merges of ``n`` adapters with one method.

    ``finetuned[i] = P(theta_i, i)``; ``merged[i, j] = P(merge(i, j), i)`` (diagonal: fine-tuned);
    ``delta = finetuned[:, None] - merged`` (diagonal 0); ``anp[i, j]`` symmetric pairwise ANP in %
    (diagonal 100). A study stopped half-way has NaN for the pairs it did not merge
    (``complete`` False); its mean and std are over the finished pairs (``pairs_done`` of ``pairs_total``).
    """

    adapters: list[str]
    tasks: list[str]
    method: str
    params: dict[str, Any]
    finetuned: np.ndarray
    merged: np.ndarray
    max_examples: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def delta(self) -> np.ndarray:
        d = self.finetuned[:, None] - self.merged
        np.fill_diagonal(d, 0.0)
        return d

    @property
    def anp(self) -> np.ndarray:
        ratio = self.merged / self.finetuned[:, None]
        out = 50.0 * (ratio + ratio.T)
        np.fill_diagonal(out, 100.0)
        return out

    def _finished(self) -> np.ndarray:
        """ANP of the finished pairs ``i < j``."""
        iu = np.triu_indices(len(self.adapters), k=1)
        values = self.anp[iu]
        return values[np.isfinite(values)]

    @property
    def pairs_total(self) -> int:
        return len(self.adapters) * (len(self.adapters) - 1) // 2

    @property
    def pairs_done(self) -> int:
        return len(self._finished())

    @property
    def complete(self) -> bool:
        return self.pairs_done == self.pairs_total

    @property
    def mean_anp(self) -> float:
        """Mean pairwise ANP over the (finished) pairs ``i < j`` (DivMerge's Table 3 statistic)."""
        done = self._finished()
        return float(np.mean(done)) if len(done) else math.nan

    @property
    def std_anp(self) -> float:
        done = self._finished()
        return float(np.std(done)) if len(done) else math.nan

    def to_frame(self) -> pd.DataFrame:
        """Long table, one row per ordered pair ``i != j``."""
        rows = []
        delta, anp_m = self.delta, self.anp
        for i, j in np.ndindex(len(self.adapters), len(self.adapters)):
            if i == j:
                continue
            rows.append({
                "i": i, "j": j, "adapter_i": self.adapters[i], "adapter_j": self.adapters[j],
                "task_i": self.tasks[i], "finetuned_i": float(self.finetuned[i]),
                "merged_i": float(self.merged[i, j]), "delta": float(delta[i, j]), "anp": float(anp_m[i, j]),
            })
        return pd.DataFrame(rows)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method, "params": self.params, "adapters": self.adapters, "tasks": self.tasks,
            "max_examples": self.max_examples, "finetuned": self.finetuned.tolist(),
            "merged": self.merged.tolist(), "delta": self.delta.tolist(), "anp": self.anp.tolist(),
            "mean_anp": self.mean_anp, "std_anp": self.std_anp,
        }


def pairwise_study(
    adapters: Sequence[Adapter],
    tasks: str | Path,
    method: str = "lora_average",
    *,
    weights: Any = None,
    limit: int | None = None,
    progress: Progress | None = None,
    show_progress: bool = True,
    partial: Callable[[PairwiseResult], None] | None = None,
    cache: Any = None,
    **params: Any,
) -> PairwiseResult:
    """Merge every pair with ``method`` and score each merge on both tasks (with each task's head).

    ``weights`` (one per member of a pair, e.g. ``[0.5, 0.5]``) applies to every pair. Cost:
    ``n`` fine-tuned and ``n (n - 1)`` merged evaluations, each kept in ``cache`` when one is given
    (a :class:`geometry.cache.ResultCache` or a folder; ``None`` touches no disk).

    ``partial``: called after each pair with the result so far, the pairs not merged yet NaN
    (``PairwiseResult.complete`` is False until the last), so that a stopped run can show them.

    With a ``cache``, a checkpoint of the pairs finished is kept there after each pair: a study interrupted
    (stopped, or killed with its process) and run again with the same adapters, method, parameters, task files
    and ``limit`` goes on after its last finished pair, and says so (``result.extra["resumed_pairs"]``).
    """
    from tqdm.auto import tqdm

    from geometry.cache import as_cache
    from geometry.merging import merge

    cache = as_cache(cache)
    adapters = list(adapters)
    if len(adapters) < 2:
        raise IncompatibleAdaptersError(f"the pairwise study needs at least 2 adapters, got {len(adapters)}")
    check_unique_names(adapters)
    dirs = [find_task_dir(a, tasks) for a in adapters]
    n = len(adapters)
    pairs = list(combinations(range(n), 2))
    total = n + len(pairs)
    bar = tqdm(total=total, desc=f"pairwise {method}", unit="eval", disable=not show_progress, leave=False)
    done = 0
    checkpoint_key = (_pairwise_checkpoint_key(adapters, dirs, method, weights, limit, params)
                      if cache is not None else None)
    saved = cache.get("pairwise_checkpoint", checkpoint_key) if cache is not None else None
    resumed: dict[tuple[int, int], tuple[float, float]] = {}
    if isinstance(saved, dict) and saved.get("n") == n:
        resumed = {tuple(k): tuple(v) for k, v in saved.get("pairs", [])}

    def tick(message: str) -> None:
        nonlocal done
        done += 1
        bar.update(1)
        bar.set_postfix_str(message, refresh=False)
        if progress:
            progress(done, total, message)

    finetuned = np.zeros(n)
    for i, (ad, folder) in enumerate(zip(adapters, dirs)):
        finetuned[i] = performance(ad, folder, limit=limit, cache=cache)
        tick(f"{ad.name} fine-tuned")
    merged_scores = np.full((n, n), np.nan)  # NaN: this pair is not merged yet
    np.fill_diagonal(merged_scores, finetuned)
    params_used: dict[str, Any] = {}
    finished: list[tuple[tuple[int, int], tuple[float, float]]] = []
    extra = {"resumed_pairs": len(resumed)} if resumed else {}
    for i, j in pairs:
        if (i, j) in resumed:  # finished by an interrupted run with the same inputs (its checkpoint)
            merged_scores[i, j], merged_scores[j, i] = resumed[(i, j)]
            if not params_used:
                params_used = dict(saved.get("params", {}))
        else:
            m = merge([adapters[i], adapters[j]], method, weights, **params)
            params_used = dict(m.params)
            merged_scores[i, j] = performance(m, dirs[i], head=adapters[i].name, limit=limit, cache=cache)
            merged_scores[j, i] = performance(m, dirs[j], head=adapters[j].name, limit=limit, cache=cache)
        finished.append(((i, j), (float(merged_scores[i, j]), float(merged_scores[j, i]))))
        if cache is not None and (i, j) != pairs[-1]:
            cache.set("pairwise_checkpoint", checkpoint_key, {"n": n, "pairs": finished, "params": params_used})
        tick(f"{adapters[i].name} + {adapters[j].name}")
        if partial and (i, j) != pairs[-1]:
            partial(PairwiseResult([a.name for a in adapters], [d.name for d in dirs], method, params_used,
                                   finetuned.copy(), merged_scores.copy(), limit, dict(extra)))
    bar.close()
    if cache is not None:
        cache.delete("pairwise_checkpoint", checkpoint_key)
    return PairwiseResult([a.name for a in adapters], [d.name for d in dirs], method, params_used,
                          finetuned, merged_scores, limit, extra)


def _pairwise_checkpoint_key(adapters: Sequence[Adapter], dirs: Sequence[Path], method: str, weights: Any,
                             limit: int | None, params: dict[str, Any]) -> tuple:
    """What a pairwise study's scores depend on: the adapters' content, the test files' bytes, the method, its
    weights and parameters, and ``limit``."""
    files = tuple(hashlib.sha256(task_file(d, "test").read_bytes()).hexdigest() for d in dirs)
    return ("1", tuple(source_hash(a) for a in adapters), files, method, repr(weights),
            repr(sorted(params.items())), limit)


# ---------------------------------------------------------------------------- geometry vs loss
def layer_selections(n_layers: int) -> list[tuple[str, int]]:
    """``[("all", L), ("last:1", 1), ..., ("last:L", L)]``."""
    return [("all", n_layers)] + [(f"last:{k}", k) for k in range(1, n_layers + 1)]


def row_spearman(delta: np.ndarray, dist: np.ndarray) -> np.ndarray:
    """Per row ``i``: Spearman correlation of ``delta[i, j]`` and ``dist[i, j]`` over ``j != i``.

    NaN for a row where either side is constant (the correlation is undefined).
    """
    from scipy.stats import spearmanr

    n = delta.shape[0]
    out = np.full(n, np.nan)
    for i in range(n):
        mask = np.arange(n) != i
        x, y = delta[i, mask], dist[i, mask]
        if len(x) >= 2 and np.ptp(x) > 0 and np.ptp(y) > 0:
            out[i] = float(spearmanr(x, y).statistic)
    return out


def correlation_study(
    adapters: Sequence[Adapter],
    delta: np.ndarray,
    *,
    metrics: Sequence[str] = ("l2", "cosine", "grassmann"),
    kind: Sequence[str] = ("q", "v"),
    factor: str = "ba",
    stack: str | None = None,
    distances: Mapping[tuple[str, str, str, str], Any] | None = None,
    progress: Progress | None = None,
) -> pd.DataFrame:
    """The geometry paper's Table 3 on these adapters and merge losses ``delta [n, n]``.

    One row per (metric, kind, layer selection): ``layers`` (``all`` / ``last:k``), ``k``,
    ``mean`` and ``std`` over tasks of the per-task Spearman correlation, ``n_tasks`` (tasks with
    a defined correlation) and ``per_task`` (list). Kinds absent from the adapters are skipped.
    ``distances``: precomputed ``geometry.analysis.distances.all_distances`` output (keys ``(metric,
    factor, stack, kind)``, adapters in the same order) to reuse instead of recomputing.
    """
    from geometry.analysis.distances import pairwise_distances

    adapters = list(adapters)
    if stack is None:
        stacks = adapters[0].stacks() if adapters else []
        stack = "model" if "model" in stacks or not stacks else stacks[0]
    delta = np.asarray(delta, dtype=float)
    if delta.shape != (len(adapters), len(adapters)):
        raise InvalidArgumentError(f"delta must be {len(adapters)} x {len(adapters)}, got {delta.shape}")
    present = set.intersection(*(set(a.kinds()) for a in adapters))
    kinds = [kind] if isinstance(kind, str) else list(kind)
    jobs = [(m, k) for m in metrics for k in kinds if k in present]
    if not jobs:
        raise IncompatibleAdaptersError(f"none of the kinds {list(kinds)} is present in every adapter")
    rows = []
    for step, (metric, kind) in enumerate(jobs):
        if progress:
            progress(step, len(jobs), f"{metric} {kind}")
        tensor = (distances or {}).get((metric, factor, stack, kind))
        if tensor is None:
            tensor = pairwise_distances(adapters, metric=metric, factor=factor, kind=kind, stack=stack)
        for spec, k in layer_selections(len(tensor.layers)):
            rho = row_spearman(delta, tensor.reduce(layers=spec))
            valid = rho[~np.isnan(rho)]
            rows.append({
                "metric": metric, "kind": kind, "layers": spec, "k": k,
                "mean": float(valid.mean()) if len(valid) else math.nan,
                "std": float(valid.std()) if len(valid) else math.nan,
                "n_tasks": int(len(valid)), "per_task": [None if np.isnan(r) else float(r) for r in rho],
            })
    if progress:
        progress(len(jobs), len(jobs), "done")
    return pd.DataFrame(rows)


def correlation_table(frame: pd.DataFrame, layers: Sequence[str] | None = None) -> pd.DataFrame:
    """Wide table like the paper's Table 3: rows = kind, columns = (metric, layers), cells ``mean (std)``."""
    sel = frame if layers is None else frame[frame["layers"].isin(list(layers))]
    cells = sel.assign(cell=[f"{m:.2f} ({s:.2f})" if not math.isnan(m) else "n/a" for m, s in zip(sel["mean"], sel["std"])])
    table = cells.pivot_table(index="kind", columns=["metric", "layers"], values="cell", aggfunc="first")
    return table
