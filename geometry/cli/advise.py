"""``advise``: rank candidate merges without labels and write the recommended one (:func:`geometry.advise`)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from geometry.cli.common import add_cache_options, load_adapters, result_cache, write_records
from geometry.errors import AtlasError


def cmd_advise(args: argparse.Namespace) -> int:
    """Rank every registered merge method over a small parameter grid (plus DivMerge / AdaMerging) by a label-free
    criterion on each task's unlabeled validation inputs; print the ranked table; ``--out``: write the pick."""
    from geometry.evaluation.advise import advise

    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise AtlasError(f"--out {out} is not a new or empty folder")
    adapters = load_adapters(args.paths)
    bar = None
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=None, unit="candidate", file=sys.stderr)

    def progress(done: int, total: int, label: str) -> None:
        if bar is not None:
            bar.total = total
            bar.n = done
            bar.set_postfix_str(label[:60])
            bar.refresh()

    t0 = time.perf_counter()
    advice = advise(adapters, args.tasks, budget=args.budget, criterion=args.criterion, samples=args.samples,
                    seed=args.seed, learned=not args.no_learned, measure=args.score, limit=args.limit,
                    progress=progress, cache=result_cache(args))
    if bar is not None:
        bar.close()
    write_records(advice.table, args.format, None, [])
    best = advice.best
    print(f"recommended: {best['candidate']} ({args.criterion} = {best['criterion']:.4g}, lowest of {len(advice.table)} "
          f"candidates, {time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    if args.score and advice.spearman == advice.spearman:
        print(f"Spearman(-criterion, ANP) over the candidates: {advice.spearman:.3f} (p = {advice.p_value:.2g})",
              file=sys.stderr)
    for note in advice.notes:
        print(f"note: {note}", file=sys.stderr)
    for line in advice.explanation():
        print(f"why: {line}", file=sys.stderr)
    if out is not None:
        folder = advice.recommended.to_peft_folder(out)
        print(f"wrote {folder}", file=sys.stderr)
    return 0


def _add_advise_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("advise", help="rank merge methods and settings without labels; write the recommended merge")
    p.add_argument("paths", nargs="+", metavar="PATH", help="peft adapter folders (or zips / files) to merge")
    p.add_argument("--tasks", required=True, metavar="DIR",
                   help="folder of task folders: each adapter's validation split gives the unlabeled inputs")
    p.add_argument("--budget", type=int, default=24, help="most candidates (default 24; the defaults of every method first)")
    p.add_argument("--criterion", choices=("js", "kl", "entropy"), default="js",
                   help="JS / KL divergence to each fine-tuned model (DivMerge), or the merged entropy (AdaMerging)")
    p.add_argument("--samples", type=int, default=16, help="unlabeled inputs per task (default 16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-learned", action="store_true", help="leave DivMerge / AdaMerging out of the candidates")
    p.add_argument("--score", action="store_true",
                   help="also score every candidate on the test splits (labels) and report ANP beside the criterion")
    p.add_argument("--limit", type=int, default=None, help="with --score: test examples per task")
    p.add_argument("--format", choices=("json", "csv"), default="csv")
    p.add_argument("--out", default=None, metavar="DIR", help="write the recommended merge here (peft folder, model card)")
    add_cache_options(p)
    p.set_defaults(func=cmd_advise)
