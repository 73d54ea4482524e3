"""Which merge should I use? Rank candidate merges without labels: :func:`advise`.

Candidates (:func:`candidate_grid`): every registered merge method over a small grid of its main parameters,
its defaults first, then, round-robin over the methods, the other grid points until ``budget`` candidates:

* ``lambda`` (the same weight on every task): ``1/T`` (averaging), ``0.5``, ``1`` for the summing methods
  (task arithmetic, TIES, DARE, magnitude pruning, Breadcrumbs, DELLA, KnOTS, Core Space); Multi-SLERP and
  the LoRA average take their interpolation weights ``1/T`` only;
* ``density`` (the fraction kept): ``0.2``, ``0.5``, ``0.8`` (Breadcrumbs ``0.8``, ``0.9``);
* ``alpha`` (TSV-M, Iso-C, Iso-CTS): ``0.5``, ``1``, ``1.5``;

plus, with ``learned=True``, DivMerge (task level, the chosen divergence; entropy: AdaMerging) fitted on a
*separate* draw of unlabeled inputs from the one that scores the candidates, so that it is not graded on the
inputs it was fitted to (it still optimises the criterion itself: read its rank with that in mind).

Criterion, per task ``t`` (adapter ``t``, its head, ``n`` unlabeled inputs ``X_t`` of its validation split), of a
merged model ``Phi`` (DivMerge's objective, Touayouch et al. 2025, and AdaMerging's, Yang et al. 2024):

* ``js``: ``mean_{x in X_t} JS(p_t(.|x), p_Phi(.|x))``; ``kl``: ``mean KL(p_t || p_Phi)``;
* ``entropy``: ``mean H(p_Phi(.|x))`` (no reference model);

with ``p_t`` the fine-tuned model (base + adapter ``t`` alone), computed once per input and kept
(:mod:`geometry.learned.terms`); for a causal LM the distributions are next-token distributions along the
fine-tuned model's greedy continuation, teacher-forced (DivMerge appendix B.1), averaged over its tokens.
The candidate's criterion is the mean over tasks; lower is better. Every forward runs through the runtime with
the candidate's factored updates (a dense ``(m, n)`` update only where the method makes one, e.g. TIES).

``measure=True`` also measures each candidate's true per-task scores on the test split (``limit`` examples) and
ANP, and the Spearman correlation between criterion and ANP over the candidates (with its p-value): the check of
whether label-free ranking worked on these tasks. No label is read unless ``measure`` is true.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from geometry.analysis.ranks import compatibility
from geometry.errors import InvalidArgumentError

Progress = Callable[[int, int, str], None]
CRITERIA = ("js", "kl", "entropy")
#: methods whose weights are interpolation weights (only 1/T is on the grid)
_INTERPOLATING = ("multislerp", "lora_average")
_LAMBDAS = (0.5, 1.0)
_DENSITIES = (0.2, 0.5, 0.8)
_ALPHAS = (0.5, 1.0, 1.5)


@dataclass(frozen=True)
class Candidate:
    """One merge to try: ``method`` (a registered name, or ``divmerge`` / ``adamerging``), its parameters and the
    same weight ``lam`` on every task (``None``: 1/T)."""

    method: str
    params: tuple[tuple[str, Any], ...] = ()
    lam: float | None = None

    @property
    def label(self) -> str:
        parts = [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.params]
        parts.insert(0, "lambda=1/T" if self.lam is None else f"lambda={self.lam:g}")
        return f"{self.method} ({', '.join(parts)})"

    def weights(self, n: int) -> list[float]:
        return [1.0 / n if self.lam is None else float(self.lam)] * n


def candidate_grid(n_tasks: int, budget: int | None = None, methods: Sequence[str] | None = None,
                   learned: bool = True, criterion: str = "js") -> list[Candidate]:
    """The candidates, defaults first (one per method), then the rest of each method's grid round-robin, cut at
    ``budget`` (learned candidates count against it and come right after the defaults)."""
    from geometry.merging import MERGE_METHODS, METHOD_PARAMS

    if n_tasks < 1:
        raise InvalidArgumentError("advise needs at least one adapter")
    if budget is not None and budget < 1:
        raise InvalidArgumentError(f"budget must be at least 1 candidate, got {budget}")
    names = list(methods) if methods is not None else list(MERGE_METHODS)
    unknown = [m for m in names if m not in MERGE_METHODS]
    if unknown:
        raise InvalidArgumentError(f"unknown merge method(s) {unknown}; choose from {', '.join(MERGE_METHODS)}")
    per_method: list[list[Candidate]] = []
    for m in names:
        takes = METHOD_PARAMS.get(m, ())
        lams: tuple[float | None, ...] = (None,) if m in _INTERPOLATING else (1.0, None, *(x for x in _LAMBDAS if x != 1.0))
        if "alpha" in takes:
            grid = [(("alpha", a),) for a in (1.0, *(x for x in _ALPHAS if x != 1.0))]
        elif "density" in takes and m not in ("knots", "core_space"):
            from geometry.merging.params import default

            first = default(MERGE_METHODS[m], "density")
            dens = (0.9, 0.8) if m.startswith("breadcrumbs") else _DENSITIES
            grid = [(("density", float(d)),) for d in dict.fromkeys((first, *dens)) if d is not None]
        else:
            grid = [()]
        if "alpha" in takes:
            lams = (1.0,)  # alpha is the scale of these methods: one lambda
        ordered = [Candidate(m, params, lam) for params in grid for lam in lams]
        per_method.append(ordered)
    out = [c[0] for c in per_method]
    if learned:
        out.append(Candidate("adamerging" if criterion == "entropy" else "divmerge", (("level", "task"),)))
    rest = [c[1:] for c in per_method]
    k = 0
    while any(rest):
        for lst in rest:
            if k < len(lst):
                out.append(lst[k])
        k += 1
        if all(k >= len(lst) for lst in rest):
            break
    seen, unique = set(), []
    for c in out:
        if c not in seen:
            seen.add(c)
            unique.append(c)
    return unique[:budget] if budget is not None else unique


@dataclass
class Advice:
    """What :func:`advise` found: ``table`` (one row per candidate, best first: rank, candidate, method,
    params (JSON), criterion, seconds, and with ``measure=True`` anp and one ``P:<task>`` column per task),
    ``recommended`` (the best candidate's :class:`geometry.merging.MergedAdapter`), the criterion's name,
    ``spearman`` / ``p_value`` (criterion against ANP over the candidates; ``NaN`` without scores or with a
    constant column) and ``notes``."""

    table: pd.DataFrame
    recommended: Any
    criterion: str
    spearman: float = math.nan
    p_value: float = math.nan
    notes: list[str] = field(default_factory=list)
    #: per module: subspace overlap of the adapters and which one dominates the update norms
    #: (:func:`geometry.analysis.ranks.compatibility`), the explanation beside the pick
    compatibility: pd.DataFrame | None = None

    @property
    def best(self) -> pd.Series:
        return self.table.iloc[0]

    def explanation(self, top: int = 3) -> list[str]:
        """A few lines on what the adapters look like module by module (measured, labelled by what they measure):
        the most overlapping modules, the modules one adapter dominates, and the mean overlap."""
        frame = self.compatibility
        if frame is None or frame.empty:
            return []
        lines = [f"mean subspace overlap over {len(frame)} modules: {frame['overlap'].mean():.3f} "
                 "(mean cos^2 of the principal angles; 0 = orthogonal updates, 1 = nested)"]
        worst = frame.sort_values("overlap", ascending=False).head(top)
        lines.append("most overlapping modules (where the updates share directions and can conflict): "
                     + ", ".join(f"{r.module} ({r.overlap:.2f})" for r in worst.itertuples()))
        dominated = frame[frame["label"].str.contains("dominated", na=False)]
        if len(dominated):
            counts = dominated["dominant"].value_counts()
            lines.append("modules where one adapter holds most of the update norm: "
                         + ", ".join(f"{name}: {n}" for name, n in counts.items()))
        else:
            by = frame["dominant"].value_counts()
            lines.append(f"no adapter dominates a module (largest share {frame['dominant share'].max():.2f}; "
                         f"largest in most modules: {by.index[0]}, {by.iloc[0]} of {len(frame)})")
        return lines


def _terms(adapters: list, tasks: Any, samples: int, seed: int, cache: Any, max_length: int, max_new_tokens: int):
    from geometry.learned.data import select, task_inputs
    from geometry.learned.terms import make_term, term_kind

    kind = term_kind(adapters)
    pools = [task_inputs(a, tasks, "validation") for a in adapters]
    scoring = [select(p, samples, seed) for p in pools]
    terms = [make_term(kind, i, adapters, scoring[i], max_length=max_length, cache=cache,
                       **({"max_new_tokens": max_new_tokens} if kind == "generation" else {}))
             for i in range(len(adapters))]
    return kind, terms, pools


def _fit_inputs(pools: list, scoring_terms: list, samples: int, seed: int) -> dict:
    """For the learned candidates: ``samples`` inputs per task drawn from those the criterion does not use
    (all the rest when fewer remain; the scoring ones only when nothing else exists)."""
    from geometry.learned.data import UnlabeledInputs, select

    out = {}
    for pool, term in zip(pools, scoring_terms):
        used = set(zip(term.inputs.texts, term.inputs.pairs or [None] * len(term.inputs)))
        keep = [i for i, key in enumerate(zip(pool.texts, pool.pairs or [None] * len(pool))) if key not in used]
        if not keep:
            out[term.name] = term.inputs
            continue
        rest = UnlabeledInputs(pool.task, [pool.texts[i] for i in keep],
                               None if pool.pairs is None else [pool.pairs[i] for i in keep], pool.source, len(keep))
        out[term.name] = select(rest, samples, seed + 1)
    return out


def candidate_criterion(terms: Sequence[Any], merged: Any, criterion: str = "js", batch_size: int = 16) -> float:
    """The criterion of ``merged`` (a :class:`MergedAdapter` of the terms' adapters): the mean over the terms of
    the mean over each term's inputs (and generated tokens) of JS / KL to the fine-tuned model, or of the
    merged model's entropy."""
    from geometry.learned.divergences import js_divergence, kl_divergence
    from geometry.learned.terms import reduce_term

    if criterion not in CRITERIA:
        raise InvalidArgumentError(f"criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")
    values = []
    for term in terms:
        total, count = 0.0, 0
        for start in range(0, len(term), batch_size):
            idx = list(range(start, min(len(term), start + batch_size)))
            logq, mask = term.candidate(idx, merged)
            if criterion == "entropy":
                logq = logq.double()
                per = -(logq.exp() * torch.where(torch.isfinite(logq), logq, torch.zeros_like(logq))).sum(-1)
            else:
                logp, _ = term.reference(idx)
                per = (js_divergence if criterion == "js" else kl_divergence)(logp.double(), logq.double())
            total += float(reduce_term(per, mask)) * len(idx)
            count += len(idx)
        values.append(total / max(count, 1))
    return float(np.mean(values))


def advise(adapters: Sequence[Any], tasks: Any = None, *, budget: int | None = 24, criterion: str = "js",
           samples: int = 16, seed: int = 0, methods: Sequence[str] | None = None, learned: bool = True,
           measure: bool = False, limit: int | None = None, progress: Progress | None = None,
           should_stop: Callable[[], bool] | None = None, cache: Any = None, max_length: int = 128,
           max_new_tokens: int = 32) -> Advice:
    """Rank candidate merges of ``adapters`` by a label-free criterion (module docstring) and recommend the best.

    ``tasks``: the folder of the task folders (each adapter's validation split gives the unlabeled inputs; with
    ``measure=True`` its test split gives the true scores). ``budget``: most candidates (``None``: the whole grid).
    ``samples``: unlabeled inputs per task for the criterion (the learned candidates fit on as many others).
    ``progress(done, total, label)`` is called per candidate; ``should_stop()`` returning true stops after the
    current candidate (the table then holds those done, and ``notes`` says so).
    """
    from geometry.cache import as_cache
    from geometry.merging import merge

    if criterion not in CRITERIA:
        raise InvalidArgumentError(f"criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")
    adapters = list(adapters)
    cache = as_cache(cache)
    grid = candidate_grid(len(adapters), budget, methods, learned, criterion)
    kind, terms, pools = _terms(adapters, tasks, samples, seed, cache, max_length, max_new_tokens)
    notes = [t.inputs.note for t in terms if t.inputs.note]
    for t in terms:  # the reference distributions, once (memory, and ``cache`` when given)
        t.prepare()
    rows, merges = [], []
    for k, cand in enumerate(grid):
        if should_stop is not None and should_stop():
            notes.append(f"stopped after {k} of {len(grid)} candidates")
            break
        if progress is not None:
            progress(k, len(grid), cand.label)
        t0 = time.perf_counter()
        if cand.method in ("divmerge", "adamerging"):
            from geometry.learned import AdaMerging, DivMerge

            fit_data = _fit_inputs(pools, terms, samples, seed)
            run = (AdaMerging(adapters, tasks, level="task", samples=samples, seed=seed, data=fit_data, cache=cache,
                              max_length=max_length)
                   if cand.method == "adamerging" else
                   DivMerge(adapters, tasks, level="task", divergence=criterion, samples=samples, seed=seed,
                            data=fit_data, cache=cache, max_length=max_length))
            merged = run.fit().merge()
        else:
            merged = merge(adapters, cand.method, cand.weights(len(adapters)), **dict(cand.params))
        merged.source_adapters = list(adapters)
        value = candidate_criterion(terms, merged, criterion)
        row = {"candidate": cand.label, "method": cand.method,
               "params": json.dumps({"lambda": "1/T" if cand.lam is None else cand.lam, **dict(cand.params)}),
               "criterion": value, "seconds": time.perf_counter() - t0}
        if measure:
            from geometry.evaluation.merge_eval import evaluate_merge

            ev = evaluate_merge(adapters, tasks, merged=merged, limit=limit, cache=cache)
            row["anp"] = ev.anp
            for r in ev.frame.itertuples(index=False):
                row[f"P:{r.task}"] = r.merged
        rows.append(row)
        merges.append(merged)
    if progress is not None:
        progress(len(rows), len(grid), "done")
    if not rows:
        raise InvalidArgumentError("advise stopped before its first candidate: nothing to recommend")
    table = pd.DataFrame(rows)
    order = np.argsort(table["criterion"].to_numpy(), kind="stable")
    table = table.iloc[order].reset_index(drop=True)
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    recommended = merges[int(order[0])]
    rho, p = math.nan, math.nan
    if measure and len(table) > 2 and np.ptp(table["anp"]) > 0 and np.ptp(table["criterion"]) > 0:
        from scipy.stats import spearmanr

        res = spearmanr(-table["criterion"], table["anp"])
        rho, p = float(res.statistic), float(res.pvalue)
    compat = compatibility(adapters) if len(adapters) > 1 else None
    return Advice(table, recommended, criterion, rho, p, notes, compat)
