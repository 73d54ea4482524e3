"""The learned merges: ``divmerge`` and ``adamerging``."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Sequence

from geometry.cli.common import add_cache_options, result_cache


def _learned_options(p: argparse.ArgumentParser, method: str) -> None:
    """Options shared by ``divmerge`` and ``adamerging`` (defaults: DivMerge's Table 9, per method)."""
    lr, epochs = ("1e-2", 4) if method == "divmerge" else ("1e-3 (1e-2 for causal LMs)", 5)
    p.add_argument("paths", nargs="+", metavar="PATH", help="adapter folders or .zip files (same base model)")
    p.add_argument("--tasks", required=True, metavar="DIR",
                   help="folder of task folders: unlabeled inputs from <task>/validation.jsonl, ANP on <task>/test.jsonl")
    p.add_argument("--level", choices=("task", "layer", "module"), default="task",
                   help="task: one coefficient per adapter (TL, default); layer: per adapter and transformer block "
                   "(LL); module: per adapter and adapted module")
    p.add_argument("--samples", type=int, default=None,
                   help="unlabeled inputs per task (default 200 for --level task, 400 otherwise; all there are when fewer)")
    p.add_argument("--epochs", type=int, default=None, help=f"passes over the inputs (default {epochs})")
    p.add_argument("--lr", type=float, default=None, help=f"Adam learning rate (default {lr})")
    p.add_argument("--init", default=None, metavar="0.5|uniform",
                   help="initial coefficients: a number (default 0.5, the paper's Table 9) or uniform (1/T)")
    p.add_argument("--batch-per-task", type=int, default=4, help="inputs of each task per step (default 4: batch 4 x T)")
    p.add_argument("--seed", type=int, default=0, help="seed of the input selection and order (default 0)")
    p.add_argument("--clamp", action="store_true", help="clip the coefficients to [0, 1] after every step")
    p.add_argument("--split", default="validation", help="split the unlabeled inputs come from (default validation)")
    p.add_argument("--data", action="append", default=[], metavar="NAME=FILE",
                   help="unlabeled inputs of adapter NAME from a .jsonl / .csv file (a text column, optionally "
                   "text_pair) instead of its task's split; repeatable")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimiser steps")
    p.add_argument("--max-length", type=int, default=128, help="token limit of each input (default 128)")
    p.add_argument("--max-new-tokens", type=int, default=32,
                   help="causal LMs: length limit of the fine-tuned models' greedy continuations (default 32)")
    p.add_argument("--limit", type=int, default=None, help="score ANP on the first N test examples of each task")
    p.add_argument("--no-eval", action="store_true", help="skip the ANP evaluation on the test splits")
    p.add_argument("--out", default=None, metavar="DIR", help="write the merged peft adapter folder here")
    p.add_argument("--head", default=None, metavar="NAME", help="whose head goes in the weights of --out (default: first)")
    p.add_argument("--format", choices=("json", "csv"), default="json",
                   help="json (default): adapters, level, divergence, coefficients, layers, history, anp, scores; "
                   "csv: one row per adapter with its scores and coefficients")
    p.add_argument("--quiet", action="store_true", help="no progress bar on stderr")
    add_cache_options(p)


def _learned_data(values: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in values:
        name, sep, file = item.partition("=")
        if not sep or not name or not file:
            raise ValueError(f"--data {item!r}: expected NAME=FILE (an adapter name and a .jsonl / .csv file)")
        out[name] = file
    return out


def _run_learned(args: argparse.Namespace, method: str) -> int:

    from geometry.io.loader import load_adapter
    from geometry.learned import METHODS

    adapters = [load_adapter(p) for p in args.paths]
    kwargs = dict(level=args.level, samples=args.samples, epochs=args.epochs, lr=args.lr, init=args.init,
                  batch_per_task=args.batch_per_task, seed=args.seed, clamp=args.clamp, split=args.split,
                  data=_learned_data(args.data), max_steps=args.max_steps, max_length=args.max_length,
                  max_new_tokens=args.max_new_tokens, cache=result_cache(args))
    if method == "divmerge":
        kwargs["divergence"] = args.divergence
    run = METHODS[method](adapters, args.tasks, **kwargs)
    result = run.fit(progress=not args.quiet, evaluate_at_end=not args.no_eval, limit=args.limit)
    if args.out:
        folder = result.save(args.out, head=args.head)
        print(f"wrote {folder}", file=sys.stderr)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    if args.format == "csv":

        last = result.evaluations[-1]["scores"] if result.evaluations else {}
        by_adapter = {s["adapter"]: (task, s) for task, s in last.items()}
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(["adapter", "task", "finetuned", "merged", "normalized",
                         *(f"coefficient[{c}]" for c in result.layers)])
        for t, name in enumerate(result.adapters):
            task, s = by_adapter.get(name, (result.tasks[t], {}))
            writer.writerow([name, task, s.get("finetuned", ""), s.get("merged", ""), s.get("normalized", ""),
                             *(repr(float(v)) for v in result.coefficients[t])])
        return 0
    print(json.dumps(result.to_dict(), indent=1))
    return 0


def cmd_divmerge(args: argparse.Namespace) -> int:
    """DivMerge: learn task-arithmetic coefficients minimising JS / KL to each fine-tuned model on unlabeled inputs."""
    return _run_learned(args, "divmerge")


def _add_divmerge_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "divmerge", help="DivMerge: task-arithmetic coefficients learned without labels (JS / KL divergence)",
        description="Minimise sum_t E_{x in X_t} D(p_finetuned_t(.|x) || p_merged(.|x)) over the task-arithmetic "
        "coefficients (Adam; the paper's Table 9 defaults), then score the merge (ANP) on the test splits.")
    _learned_options(p, "divmerge")
    p.add_argument("--divergence", choices=("js", "kl"), default="js",
                   help="js: Jensen-Shannon (default); kl: forward KL(p_finetuned || p_merged)")
    p.set_defaults(func=cmd_divmerge)


def cmd_adamerging(args: argparse.Namespace) -> int:
    """AdaMerging: learn task-arithmetic coefficients minimising the entropy of the merged predictions."""
    return _run_learned(args, "adamerging")


def _add_adamerging_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "adamerging", help="AdaMerging: task-arithmetic coefficients minimising the merged model's prediction entropy",
        description="Minimise sum_t E_{x in X_t} H(p_merged(.|x)) over the task-arithmetic coefficients (Adam; "
        "DivMerge's Table 9 defaults; the original code's --init 0.3 --clamp --split test --max-steps 500 as "
        "options), then score the merge (ANP) on the test splits.")
    _learned_options(p, "adamerging")
    p.set_defaults(func=cmd_adamerging)
