"""Token dynamics: ``tokens``."""

from __future__ import annotations

import argparse

from geometry.cli.common import add_cache_options, result_cache, write_records
from geometry.errors import AtlasError


def cmd_tokens(args: argparse.Namespace) -> int:
    """Token dynamics: per-layer cluster counts, base-vs-adapted distance and pairwise cosine of a text's tokens."""
    from geometry.analysis.tokens import batch_dynamics, token_dynamics
    from geometry.io.loader import load_adapter

    adapters = [load_adapter(p) for p in args.adapters]
    if args.task is not None:
        table = batch_dynamics(adapters, task=args.task, split=args.split, limit=args.limit, threshold=args.threshold,
                               include_special=not args.no_special, base=args.base, cache=result_cache(args)).summary
    else:
        if args.text is None:
            raise AtlasError("tokens: give --text T (or --task DIR for batch mode)")
        table = token_dynamics(adapters, args.text, threshold=args.threshold, include_special=not args.no_special,
                               base=args.base, cache=result_cache(args)).table
    write_records(table, args.format, args.out, [])
    return 0


def _add_tokens_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tokens", help="per-layer token clustering of a text, base vs adapter(s) (token dynamics)",
        description="Run a text through the base model and the base with each adapter; print one row per "
        "(adapter, layer): tokens, clusters_base, clusters_adapted (agglomerative, cosine, average linkage, cut at "
        "--threshold), distance (mean cosine distance base vs adapted), pairwise_cosine_base, "
        "pairwise_cosine_adapted (NaN / null when undefined). Layer 0 is the embedding output. --task prints the "
        "mean / std / q10 / q90 over a task split's inputs instead.")
    p.add_argument("adapters", nargs="+", metavar="ADAPTER", help="peft adapter folder(s), .zip or hub:<repo_id>")
    p.add_argument("--text", default=None, metavar="T", help="the text whose tokens are followed")
    p.add_argument("--tasks", "--task", dest="task", default=None, metavar="DIR_OR_JSONL",
                   help="batch mode: the inputs of a task split (--task: the old spelling)")
    p.add_argument("--split", default="validation", help="split of --task (default: validation)")
    p.add_argument("--limit", type=int, default=32, help="batch mode: the first N inputs (default 32)")
    p.add_argument("--threshold", type=float, default=0.5, help="cluster cut, cosine distance (default 0.5)")
    p.add_argument("--no-special", action="store_true", help="leave the special tokens ([CLS], [SEP]) out")
    p.add_argument("--base", default=None, help="base model folder or hub id (default: the adapters' own)")
    p.add_argument("--format", choices=("csv", "json"), default="csv")
    p.add_argument("--out", default=None, metavar="FILE", help="write to FILE instead of stdout")
    add_cache_options(p)
    p.set_defaults(func=cmd_tokens)
