"""How well does the merge advisor choose? ``python -m sample_adapters.advise_report`` -> ``<root>/ADVISE_RESULTS.md``.

For task sets drawn from a sample set's task adapters (every pair, then ``--subsets`` seeded subsets of each size
from 3 to ``--max-k``), :func:`geometry.evaluation.advise.advise` ranks its candidates without labels
(``--criterion``, ``--samples`` unlabeled validation inputs per task, ``--budget`` candidates) and every candidate
is also scored with labels: ANP on the first ``--limit`` test examples (the outcome) and on the first ``--limit``
validation examples (the classic, labelled model selection). Per task set:

* **pick**: the ANP of the advisor's choice (lowest criterion);
* **hindsight**: the best ANP among the candidates (picked after the fact, with the test labels: an upper bound
  no method can use);
* **validation pick**: the candidate with the best validation ANP (needs labels);
* **defaults**: task arithmetic lambda = 1, TIES (density 0.2, lambda = 1), Multi-SLERP (1/T): what a user who
  does not tune takes;
* **Spearman** between -criterion and ANP over the candidates (does the criterion rank them?).

Comparisons are paired over the task sets (two-sided Wilcoxon signed-rank test; a difference is called one only
when p < 0.05). Every cell (one task set's advice with its scores) is kept in ``<root>/results/advise.jsonl`` and
every score in the disk cache: a stopped run resumes, a re-run only formats. Generated: edit this script.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from itertools import combinations
from pathlib import Path

import numpy as np
import torch

from geometry.evaluation.advise import advise
from geometry.io.loader import load_adapter
from sample_adapters.learned_report import CAUSAL_GROUPS
from sample_adapters.merge_report import report_cache, task_adapters
from sample_adapters.store import MissingCell, ResultStore

ROOT = Path(__file__).resolve().parent / "real"
OUT_NAME = "ADVISE_RESULTS.md"
#: the fixed defaults compared with the pick: (method, params JSON as the advisor's table writes it)
DEFAULTS = {"task arithmetic (lambda = 1)": ("task_arithmetic", {"lambda": 1.0}),
            "TIES (keep 20%, lambda = 1)": ("ties", {"lambda": 1.0, "density": 0.2}),
            "Multi-SLERP (1/T)": ("multislerp", {"lambda": "1/T"})}


def task_sets(n: int, max_k: int, subsets: int, seed: int) -> list[tuple[int, ...]]:
    """Every pair, then ``subsets`` distinct seeded subsets of each size 3..``max_k`` (all of them when fewer)."""
    out = list(combinations(range(n), 2))
    rng = np.random.default_rng(seed)
    for k in range(3, min(max_k, n) + 1):
        every = list(combinations(range(n), k))
        pick = rng.choice(len(every), size=min(subsets, len(every)), replace=False)
        out += [every[i] for i in sorted(pick)]
    return out


def _cell(adapters: list, tasks: Path, args: argparse.Namespace) -> dict:
    """One task set: the advice with its measured test ANP, plus each candidate's validation ANP."""
    from geometry.evaluation.merge_eval import evaluate_merge

    advice = advise(adapters, tasks, budget=args.budget, criterion=args.criterion, samples=args.samples,
                    seed=args.seed, learned=not args.no_learned, measure=True, limit=args.limit, cache=args.cache)
    rows = advice.table.to_dict(orient="records")
    # validation ANP of every candidate: rebuild each merge (cheap) and score it on the validation split
    from geometry.evaluation.advise import candidate_grid

    grid = {c.label: c for c in candidate_grid(len(adapters), args.budget, None, not args.no_learned, args.criterion)}
    from geometry.merging import merge

    for row in rows:
        cand = grid[row["candidate"]]
        if cand.method in ("divmerge", "adamerging"):
            row["validation_anp"] = math.nan  # refitting costs as much as the fit: not re-scored (said in the report)
            continue
        merged = merge(adapters, cand.method, cand.weights(len(adapters)), **dict(cand.params))
        merged.source_adapters = list(adapters)
        row["validation_anp"] = evaluate_merge(adapters, tasks, merged=merged, limit=args.limit, split="validation",
                                               cache=args.cache).anp
    return {"rows": [{k: (v.item() if hasattr(v, "item") else v) for k, v in r.items()
                      if not k.startswith("P:")} for r in rows],
            "spearman": advice.spearman, "p_value": advice.p_value, "notes": advice.notes}


def _summary(cells: list[dict]) -> dict[str, np.ndarray]:
    out: dict[str, list[float]] = {"pick": [], "hindsight": [], "validation pick": [], "spearman": [],
                                   **{name: [] for name in DEFAULTS}}
    for cell in cells:
        rows = cell["rows"]
        out["pick"].append(rows[0]["anp"])
        out["hindsight"].append(max(r["anp"] for r in rows))
        valid = [r for r in rows if isinstance(r.get("validation_anp"), float) and math.isfinite(r["validation_anp"])]
        out["validation pick"].append(max(valid, key=lambda r: r["validation_anp"])["anp"] if valid else math.nan)
        out["spearman"].append(cell["spearman"])
        for name, (method, params) in DEFAULTS.items():
            match = [r for r in rows if r["method"] == method and json.loads(r["params"]) == params]
            out[name].append(match[0]["anp"] if match else math.nan)
    return {k: np.asarray(v, dtype=float) for k, v in out.items()}


def _paired(a: np.ndarray, b: np.ndarray) -> str:
    verdict, diff, p = _verdict(a, b)
    if verdict == "undefined":
        return "no task set has both"
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    return (f"{diff:+.2f} ANP points ({verdict}; higher on {int(np.sum(a > b))}, lower on {int(np.sum(a < b))} of "
            f"{len(a)} task sets; Wilcoxon p = {p:.2g})")


def _verdict(a: np.ndarray, b: np.ndarray) -> tuple[str, float, float]:
    """(``"higher"`` / ``"lower"`` / ``"not distinguishable"``, mean difference, p) of paired ``a - b``."""
    from scipy.stats import wilcoxon

    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    if len(a) == 0:
        return "undefined", math.nan, math.nan
    diff = float(np.mean(a - b))
    p = float(wilcoxon(a, b).pvalue) if np.any(a != b) else 1.0
    return (("higher" if diff > 0 else "lower") if p < 0.05 else "not distinguishable"), diff, p


def _verdicts(s: dict[str, np.ndarray]) -> list[str]:
    """Plain sentences from the numbers: the pick against each default, labelled selection and hindsight, and
    whether the criterion orders the candidates as ANP does."""
    out = []
    by = {"higher": [], "lower": [], "not distinguishable": []}
    for name in DEFAULTS:
        verdict, diff, p = _verdict(s["pick"], s[name])
        if verdict in by:
            by[verdict].append(f"{name} ({diff:+.2f}, p = {p:.2g})")
    if by["higher"]:
        out.append("The label-free pick beats " + "; ".join(by["higher"]) + ".")
    if by["lower"]:
        out.append("It falls short of " + "; ".join(by["lower"]) + ": there, a fixed default is the better choice.")
    if by["not distinguishable"]:
        out.append("It is not distinguishable from " + "; ".join(by["not distinguishable"]) + ".")
    verdict, diff, p = _verdict(s["pick"], s["validation pick"])
    if verdict != "undefined":
        out.append(f"Against choosing with labelled validation data: {diff:+.2f} ANP points, {verdict} (p = {p:.2g}).")
    gap = s["hindsight"] - s["pick"]
    ok = np.isfinite(gap)
    if ok.any():
        out.append(f"The pick is {float(np.mean(gap[ok])):.2f} points below the best candidate in hindsight on average "
                   f"and is that candidate in {int(np.sum(gap[ok] <= 1e-9))} of {int(ok.sum())} task sets.")
    rho = s["spearman"][np.isfinite(s["spearman"])]
    if len(rho):
        works = "orders the candidates as their ANP does" if np.median(rho) > 0.3 else (
            "orders them only weakly" if np.median(rho) > 0 else "does not order them as their ANP does")
        out.append(f"Across a task set's candidates the criterion {works} (median Spearman {np.median(rho):.2f}, "
                   f"positive in {int(np.sum(rho > 0))} of {len(rho)}).")
    return out


def render(cells_by_group: dict[str, list[dict]], args: argparse.Namespace, names: list[str], seconds: float) -> str:
    lines = ["# Which merge? The advisor against defaults, hindsight and labelled selection", "",
             "Generated by `python -m sample_adapters.advise_report" + "".join(f" {a}" for a in args.argv)
             + "` (do not edit by hand).", "",
             f"Adapters: {', '.join(f'`{n}`' for n in names)} (`{args.root.name}` set). Advisor: "
             f"`geometry.advise(..., criterion='{args.criterion}', samples={args.samples}, budget={args.budget}"
             + (", learned=False" if args.no_learned else "") + ")`: the candidates ranked by the criterion on "
             f"{args.samples} unlabeled validation inputs per task. ANP on the first {args.limit} test examples of each "
             f"task; the validation pick uses the first {args.limit} validation examples (learned candidates are not "
             "re-scored on validation: they cannot be the validation pick).", ""]
    for group, cells in cells_by_group.items():
        if not cells:
            continue
        s = _summary(cells)
        lines += [f"## {group} ({len(cells)} task sets)", "",
                  "| choice | mean ANP | std |", "|---|---|---|"]
        for name in ("pick", "validation pick", *DEFAULTS, "hindsight"):
            v = s[name][np.isfinite(s[name])]
            label = {"pick": "advisor's pick (no labels)", "hindsight": "best candidate in hindsight (test labels, "
                     "picked after the fact)", "validation pick": "best on validation (labels)"}.get(name, name)
            lines.append(f"| {label} | {v.mean():.2f} | {v.std():.2f} |" if len(v) else f"| {label} | -- | -- |")
        lines += ["", "Paired differences, pick minus each:", ""]
        for name in ("validation pick", *DEFAULTS, "hindsight"):
            lines.append(f"- {name}: {_paired(s['pick'], s[name])}")
        rho = s["spearman"][np.isfinite(s["spearman"])]
        undefined = len(s["spearman"]) - len(rho)
        lines += ["", f"Spearman(-criterion, ANP) over each task set's candidates: mean {rho.mean():.3f}, "
                  f"median {np.median(rho):.3f}, positive in {int(np.sum(rho > 0))} of {len(rho)}"
                  + (f" ({undefined} undefined: a constant column)" if undefined else "") + "." if len(rho) else
                  "Spearman undefined everywhere.", ""]
    if getattr(args, "missing", None):
        lines += [f"Task sets left out (not computed yet; `--skip-missing` rendered the others): "
                  f"{', '.join(args.missing)}.", ""]
    lines += ["## Where label-free choice works and where it does not", ""]
    for group, cells in cells_by_group.items():
        if cells:
            lines += [f"**{group}.** " + " ".join(_verdicts(_summary(cells))), ""]
    lines += ["The hindsight row is an upper bound (it sees the test labels); the validation pick needs labelled "
              "validation data the advisor does not use.", "",
              f"Time: {seconds:.0f} s of computation for the cells (recorded in the store), 1 torch thread.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sample_adapters.advise_report", description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, default=ROOT)
    p.add_argument("--criterion", choices=("js", "kl", "entropy"), default="js")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--budget", type=int, default=20)
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--max-k", type=int, default=8)
    p.add_argument("--subsets", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-learned", action="store_true")
    p.add_argument("--pairs-only", action="store_true", help="only the pairs (no larger subsets)")
    p.add_argument("--within-kind", action="store_true",
                   help="the causal set: only pairs of two tasks of the same kind (classification as generation, "
                        "generation), as its Table 3; implies --pairs-only")
    p.add_argument("--max-sets", type=int, default=None, help="stop after this many task sets (smoke runs)")
    p.add_argument("--store-only", action="store_true", help="compute nothing: render from the store")
    p.add_argument("--skip-missing", action="store_true",
                   help="with --store-only: leave out the task sets not in the store (and name them)")
    p.add_argument("--reverse", action="store_true",
                   help="compute the task sets last to first (a second process on the same store meets the first)")
    args = p.parse_args(argv)
    args.argv = [a for a in (sys.argv[1:] if argv is None else argv) if a not in ("--store-only", "--reverse")]
    torch.set_num_threads(1)
    args.cache = report_cache()
    store = ResultStore(args.root / "results" / "advise.jsonl", store_only=args.store_only)
    adapters = [load_adapter(f) for f in task_adapters(args.root)]
    names = [a.name for a in adapters]
    sets = task_sets(len(adapters), 2 if args.pairs_only or args.within_kind else args.max_k, args.subsets,
                     args.seed)
    kind_of = {task: kind for kind, tasks in CAUSAL_GROUPS.items() for task in tasks}
    if args.within_kind:
        sets = [idx for idx in sets if kind_of.get(names[idx[0]], "?") == kind_of.get(names[idx[1]], "")]
    sets = sets[:args.max_sets]
    groups: dict[str, list[dict]] = {"Pairs": [], "Subsets of 3 or more tasks": []}
    if args.within_kind:
        groups.update({f"Pairs of {kind} tasks": [] for kind in CAUSAL_GROUPS})
    args.missing = []
    t0 = time.perf_counter()
    for k, idx in (reversed(list(enumerate(sets))) if args.reverse else enumerate(sets)):
        chosen = [adapters[i] for i in idx]
        key = {"study": "advise", "adapters": [a.name for a in chosen], "hashes": [a.content_hash for a in chosen],
               "criterion": args.criterion, "samples": args.samples, "budget": args.budget, "limit": args.limit,
               "seed": args.seed, "learned": not args.no_learned}
        try:
            cell = store.get(key, lambda chosen=chosen: _cell(chosen, args.root / "tasks", args))
        except MissingCell:
            if not args.skip_missing:
                raise
            args.missing.append("+".join(a.name for a in chosen))
            continue
        groups["Pairs" if len(idx) == 2 else "Subsets of 3 or more tasks"].append(cell)
        if args.within_kind:
            groups[f"Pairs of {kind_of[names[idx[0]]]} tasks"].append(cell)
        print(f"[{time.perf_counter() - t0:7.1f} s] {k + 1}/{len(sets)} {'+'.join(a.name for a in chosen)}",
              file=sys.stderr, flush=True)
    out = args.root / OUT_NAME
    out.write_text(render(groups, args, names, store.tally), encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
