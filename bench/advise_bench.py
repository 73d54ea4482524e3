"""The merge advisor's candidates per second against scoring each candidate with dense merged weights.

Both sides run the same candidate grid (:func:`geometry.evaluation.advise.candidate_grid`, learned candidates
left out: they cost the same either way) on the real sample set (all-MiniLM-L6-v2, LoRA r = 8 on query / value),
build each candidate the same way (``geometry.merging.merge``) and compute the same label-free criterion (mean
Jensen-Shannon divergence to each fine-tuned model on ``--samples`` unlabeled validation inputs per task, the
references computed once, outside the timing):

* **advisor** (what ``geometry.advise`` does): :meth:`geometry.learned.terms.TaskTerm.candidate`, the runtime's
  hooks add ``s B (A x)`` per adapted module (factored: never an ``out x in`` matrix);
* **dense** (what a careful practitioner writes without the runtime): per candidate, ``W = W0 + B A`` for every
  adapted module (``PeftUpdate.dense``, built once per candidate and shared by the tasks), the forward with
  ``torch.func.functional_call`` on the base with those weights and the task's head swapped in.

The two criteria are checked equal (relative 1e-5) for every candidate. Printed: candidates per second of each
(merge included, and scoring only), and the ratios advisor / dense, medians of ``--repeats`` passes, the two
sides interleaved. The last line is one JSON object.

    .venv/bin/python -m bench.advise_bench                       # T = 3 and T = 8 on the real set
    OMP_NUM_THREADS=1 .venv/bin/python -m bench.advise_bench --threads 1 --tasks 3 --budget 8 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from geometry.evaluation.advise import _terms, candidate_criterion, candidate_grid
from geometry.io.loader import load_adapter
from geometry.learned.divergences import js_divergence
from geometry.merging import merge
from geometry.runtime.modules import _module_path

ROOT = Path(__file__).resolve().parents[1] / "sample_adapters" / "real"
TASKS = ("sst2", "mrpc", "qnli", "rte", "cola", "stsb", "agnews", "emotion")


def dense_weights(model: torch.nn.Module, merged) -> dict[str, torch.Tensor]:
    """``{param: W0 + dense(B A)}`` for every module ``merged`` adapts (the baseline's per-candidate build)."""
    params = dict(model.named_parameters())
    weights = {}
    for name, up in merged.peft_updates().items():
        path = _module_path(name) + ".weight"
        W0 = params[path]
        delta = up.dense(torch.float64)
        if up.fan_in_fan_out:
            delta = delta.T
        weights[path] = (W0.double() + delta).to(W0.dtype)
    return weights


def dense_criterion(terms, merged, batch_size: int = 16) -> float:
    """The JS criterion with ``W0 + dense(B A)`` per adapted module through ``functional_call`` (the weights built
    once per candidate and base model: the terms share a runtime when their heads have as many labels)."""
    built: dict[int, dict] = {}
    values = []
    for term in terms:
        rt = term.runtime
        weights = built.setdefault(id(rt), dense_weights(rt.model, merged))
        total, count = 0.0, 0
        with torch.no_grad(), rt.apply([], head=merged.heads.get(term.name) or False):
            for start in range(0, len(term), batch_size):
                idx = list(range(start, min(len(term), start + batch_size)))
                texts, pairs = term._texts(idx)
                enc = rt.encode(texts, pairs, term.max_length)
                logits = torch.func.functional_call(rt.model, weights, args=(), kwargs=enc).logits
                logq = torch.log_softmax(logits.double(), dim=-1)
                logp, _ = term.reference(idx)
                total += float(js_divergence(logp.double(), logq).mean()) * len(idx)
                count += len(idx)
        values.append(total / count)
    return float(np.mean(values))


def run(n_tasks: int, budget: int, samples: int, repeats: int) -> dict:
    adapters = [load_adapter(ROOT / t) for t in TASKS[:n_tasks]]
    _, terms, _ = _terms(adapters, ROOT / "tasks", samples, 0, None, 128, 32)
    for t in terms:
        t.prepare()
    grid = candidate_grid(len(adapters), budget, None, False, "js")
    merged = [merge(adapters, c.method, c.weights(len(adapters)), **dict(c.params)) for c in grid]
    for m in merged[:1]:  # warm-up of both paths
        candidate_criterion(terms, m, "js")
        dense_criterion(terms, m)
    times = {"advisor": [], "dense": [], "merge": []}
    for _ in range(repeats):
        t_merge = 0.0
        for c in grid:
            t0 = time.perf_counter()
            merge(adapters, c.method, c.weights(len(adapters)), **dict(c.params))
            t_merge += time.perf_counter() - t0
        times["merge"].append(t_merge)
        for side in ("advisor", "dense") if _ % 2 == 0 else ("dense", "advisor"):
            t0 = time.perf_counter()
            vals = [candidate_criterion(terms, m, "js") if side == "advisor" else dense_criterion(terms, m)
                    for m in merged]
            times[side].append(time.perf_counter() - t0)
            if side == "advisor":
                ours = vals
            else:
                theirs = vals
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-9)
    med = {k: statistics.median(v) for k, v in times.items()}
    n = len(grid)
    out = {
        "tasks": n_tasks, "candidates": n, "samples": samples,
        "advisor_candidates_per_s": n / (med["merge"] + med["advisor"]),
        "dense_candidates_per_s": n / (med["merge"] + med["dense"]),
        "advisor_scoring_s": med["advisor"], "dense_scoring_s": med["dense"], "merge_s": med["merge"],
    }
    out["ratio"] = out["advisor_candidates_per_s"] / out["dense_candidates_per_s"]
    out["ratio_scoring_only"] = med["dense"] / med["advisor"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, nargs="+", default=[3, 8])
    p.add_argument("--budget", type=int, default=20)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {}
    for n in args.tasks:
        r = run(n, args.budget, args.samples, args.repeats)
        results[f"T{n}"] = r
        print(f"T = {n}: {r['candidates']} candidates, {args.samples} inputs per task: advisor "
              f"{r['advisor_candidates_per_s']:.2f} candidates/s, dense functional_call {r['dense_candidates_per_s']:.2f} "
              f"(merge {r['merge_s']:.2f} s of the pass); ratio {r['ratio']:.2f}x, scoring only "
              f"{r['ratio_scoring_only']:.2f}x; criteria equal (rtol 1e-5)")
    print(json.dumps({"device": "cpu", "threads": torch.get_num_threads(), **results}))


if __name__ == "__main__":
    main()
