"""Spectral inclusion (the 2025 paper) on the sample adapters -> ``<root>/INCLUSION_RESULTS.md``.

    .venv/bin/python -m sample_adapters.inclusion_report [--root sample_adapters/real]

For the task adapters of a sample set (``training_info.json`` ``variant == "task"``):

1. the asymmetric adapter-by-adapter matrices of the mean over modules (query and value of every layer)
   of ``tau_i -> tau_j``: raw L1 (the paper's L_p), L1 on sum-normalised spectra, REC, and the mean
   entropies ``H(S1)`` and ``H(S2)`` (:func:`geometry.analysis.inclusion.inclusion_matrices`, closed form,
   lambda = 0, Frobenius objective);
2. the per-layer curves (L1 and REC, q and v, both directions) of two pairs fixed in advance
   (:data:`CURVE_PAIRS`);
3. the paper's Table 5 tests on real pairs, fixed in advance (:data:`RELATED`): does a task's update
   include more of a related task's spectrum than of an unrelated one? For each related pair (a, b)
   and each direction, REC(a -> b) against REC(a -> c) for every other task c of the set, over the
   modules: Student's t-test as the paper (independent samples; two-sided and one-sided
   ``H1: REC(a -> b) > REC(a -> c)``), the paired test on matched modules beside it, and Holm's
   correction over the family of one-sided tests.

Every number is computed from the adapters by the library (nothing typed by hand); the report is
written atomically. It is generated: edit this script, not the Markdown.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from geometry.analysis.inclusion import inclusion, inclusion_matrices
from geometry.analysis.stats import compare_projections
from geometry.io.loader import load_adapter
from sample_adapters.merge_report import task_adapters

ROOT = Path(__file__).resolve().parent / "real"
OUT_NAME = "INCLUSION_RESULTS.md"
#: pairs of related tasks, fixed before any result: (sentiment, sentiment), (paraphrase, similarity),
#: (entailment, entailment); the synthetic set's designed pairs
RELATED = {
    "real": [("sst2", "emotion"), ("mrpc", "stsb"), ("rte", "qnli")],
    "synthetic": [("sentiment_movies", "sentiment_products"), ("nli", "paraphrase")],
}
#: the two pairs whose per-layer curves are shown: the first related pair, and its first task against an
#: unrelated one (topic)
CURVE_PAIRS = {"real": [("sst2", "emotion"), ("sst2", "agnews")],
               "synthetic": [("sentiment_movies", "sentiment_products"), ("sentiment_movies", "news_topic")]}
#: the paper's reported means (Mistral-7B Instruct; SCIENCE.md section 2)
PAPER = "SUM -> NER: L1 0.271, REC 0.644; NER -> SUM: L1 0.660, REC 0.535; entropies 0.77 to 0.87"
METRICS = ("l1", "l1_normalized", "rec", "h1", "h2")


def _matrix_md(values: np.ndarray, names: list[str], fmt: str = ".3f") -> list[str]:
    out = ["| from \\ to | " + " | ".join(f"`{n}`" for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    for name, row in zip(names, values):
        out.append(f"| `{name}` | " + " | ".join("n/a" if not np.isfinite(v) else format(v, fmt) for v in row) + " |")
    return out


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error), in the input order."""
    p = np.asarray(pvalues, dtype=float)
    order = np.argsort(p)
    m = len(p)
    adjusted = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()


def curve_lines(ad_a, ad_b) -> list[str]:
    """Per-layer L1 and REC of ``a -> b`` and ``b -> a`` for q and v."""
    ab, ba = inclusion(ad_a, ad_b), inclusion(ad_b, ad_a)
    lines = [f"### `{ad_a.name}` and `{ad_b.name}`", "",
             "| layer | kind | L1 a -> b | REC a -> b | L1 b -> a | REC b -> a |", "|---|---|---|---|---|---|"]
    merged = ab.merge(ba, on=["stack", "layer", "kind"], suffixes=("_ab", "_ba"))
    for row in merged.sort_values(["kind", "layer"]).itertuples(index=False):
        lines.append(f"| {row.layer} | {row.kind} | {row.l1_ab:.3f} | {row.rec_ab:.3f} | {row.l1_ba:.3f} | {row.rec_ba:.3f} |")
    return lines + ["", f"(a = `{ad_a.name}`, b = `{ad_b.name}`.)", ""]


def tests(adapters: dict, related: list[tuple[str, str]]) -> tuple[list[dict], list[str]]:
    """Every pre-registered comparison REC(a -> b) vs REC(a -> c): rows and Markdown lines."""
    rows = []
    for x, y in related:
        for a, b in ((x, y), (y, x)):
            if a not in adapters or b not in adapters:
                continue
            to_b = inclusion(adapters[a], adapters[b])
            for c in adapters:
                if c in (a, b):
                    continue
                to_c = inclusion(adapters[a], adapters[c])
                ind = compare_projections(to_b, to_c, "rec")
                pair = compare_projections(to_b, to_c, "rec", paired=True)
                rows.append({"a": a, "b": b, "c": c, "rec_b": ind["mean_a"], "rec_c": ind["mean_b"], "n": ind["n_a"],
                             "p_two": ind["p_two_sided"], "p_greater": ind["p_greater"],
                             "p_paired_greater": pair["p_greater"]})
    if not rows:
        return rows, ["No related pair of this set is present."]
    adj = holm([r["p_greater"] for r in rows])
    for r, p in zip(rows, adj):
        r["p_holm"] = p
    lines = ["| a | related b | other c | REC(a -> b) | REC(a -> c) | modules | Student p, two-sided | "
             "Student p, one-sided (b > c) | Holm-adjusted | paired p, one-sided |", "|---" * 10 + "|"]
    for r in rows:
        lines.append(f"| `{r['a']}` | `{r['b']}` | `{r['c']}` | {r['rec_b']:.3f} | {r['rec_c']:.3f} | {r['n']} | "
                     f"{r['p_two']:.2g} | {r['p_greater']:.2g} | {r['p_holm']:.2g} | {r['p_paired_greater']:.2g} |")
    return rows, lines


def verdict_lines(rows: list[dict], matrices: dict, names: list[str], related: list[tuple[str, str]]) -> list[str]:
    lines = []
    rec = matrices["rec"]
    for x, y in related:
        for a, b in ((x, y), (y, x)):
            if a not in names or b not in names:
                continue
            i, j = names.index(a), names.index(b)
            others = [rec[i, k] for k in range(len(names)) if k != i]
            rank = 1 + sum(v > rec[i, j] for v in others)
            mine = [r for r in rows if r["a"] == a and r["b"] == b]
            sig = sum(r["p_holm"] < 0.05 for r in mine)
            lines.append(f"- `{a}` -> `{b}`: mean REC {rec[i, j]:.3f}, rank {rank} of {len(others)} partners of `{a}`; "
                         f"higher than the other task's at Holm-adjusted p < 0.05 against {sig} of {len(mine)} others.")
    total = len(rows)
    sig = sum(r["p_holm"] < 0.05 for r in rows)
    lines.append(f"- Over the family: {sig} of {total} one-sided comparisons significant after Holm's correction.")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="folder of the adapters (default: the real set)")
    parser.add_argument("--out", type=Path, default=None, help=f"default: <root>/{OUT_NAME}")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    folders = task_adapters(args.root)
    if len(folders) < 3:
        print(f"error: need at least 3 task adapters under {args.root}, found {len(folders)}", file=sys.stderr)
        return 2
    adapters = {f.name: load_adapter(f) for f in folders}
    names = list(adapters)
    set_name = args.root.name
    related = RELATED.get(set_name, [])
    matrices = inclusion_matrices(list(adapters.values()), metrics=METRICS)
    offdiag = ~np.eye(len(names), dtype=bool)
    lines = ["# Spectral inclusion on the sample adapters", "",
             f"Generated by `.venv/bin/python -m sample_adapters.inclusion_report --root {args.root.relative_to(Path.cwd()) if args.root.is_relative_to(Path.cwd()) else args.root}` "
             "(do not edit by hand).", "",
             f"{len(names)} task adapters: " + ", ".join(f"`{n}`" for n in names) + ". tau1 -> tau2: tau2 projected on "
             "tau1's singular basis (closed form, lambda = 0, Frobenius objective), one value per module (query and "
             "value of each layer), then the mean over modules.", "",
             "## Mean over modules, every ordered pair", "",
             f"Off-diagonal means: raw L1 {np.nanmean(matrices['l1'][offdiag]):.3f}, normalised L1 "
             f"{np.nanmean(matrices['l1_normalized'][offdiag]):.3f}, REC {np.nanmean(matrices['rec'][offdiag]):.3f}, "
             f"H(S1) {np.nanmean(matrices['h1'][offdiag]):.3f}, H(S2) {np.nanmean(matrices['h2'][offdiag]):.3f}. "
             f"The paper (Mistral-7B Instruct, r = 8 adapters of summarisation and NER): {PAPER}.", ""]
    for metric, title in (("rec", "REC (overlap of the normalised spectra, 1 = tau2's energy on tau1's axes in the same proportions)"),
                          ("l1", "raw L1 = ||S1 - S2||_1 (the paper's L_p; depends on the adapters' scales)"),
                          ("l1_normalized", "L1 on sum-normalised spectra (= 2 (1 - REC))"),
                          ("h2", "H(S2), normalised entropy of the projected spectrum"),
                          ("h1", "H(S1), normalised entropy of the basis adapter's spectrum (one value per row)")):
        lines += [f"### {title}", "", *_matrix_md(matrices[metric], names), ""]
    curves = CURVE_PAIRS.get(set_name, [])
    if curves:
        lines += ["## Per-layer curves of two pairs fixed in advance", ""]
        for a, b in curves:
            if a in adapters and b in adapters:
                lines += curve_lines(adapters[a], adapters[b])
    if related:
        rows, table = tests(adapters, related)
        lines += ["## Table 5 on real pairs: related against unrelated", "",
                  "Pairs fixed before any result: " + ", ".join(f"`{a}` and `{b}`" for a, b in related)
                  + ". For each direction a -> b, REC(a -> b) is compared with REC(a -> c) for every other task c, over "
                  "the modules (Student's t-test as in the paper, independent samples; the paired test on matched "
                  "modules beside it). Holm's correction is over every one-sided test of the table.", "",
                  *table, "", "Verdicts:", "", *verdict_lines(rows, matrices, names, related), ""]
    lines += [f"Wall time: {time.perf_counter() - start:.1f} s on {os.cpu_count()} CPU cores.", ""]
    out = args.out or args.root / OUT_NAME
    tmp = out.with_suffix(".tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
