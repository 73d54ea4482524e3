"""Commands that score and merge: ``evaluate``, ``merge``, ``pairwise``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from geometry.cli.common import add_cache_options, load_adapters, result_cache
from geometry.errors import AtlasError


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Score a peft adapter on a task split: accuracy and macro F1, or exact match, ROUGE-1 and ROUGE-L of generations."""

    from geometry.evaluation.evaluate import evaluate

    result = evaluate(args.adapter, args.task, split=args.split, batch_size=args.batch_size, limit=args.limit,
                      cache=result_cache(args))
    result = {"adapter": args.adapter, **result}
    if args.format == "csv":
        print(",".join(result))
        print(",".join(str(v) for v in result.values()))
    else:
        print(json.dumps(result, indent=1))
    return 0


def _add_evaluate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="score an adapter on a task split (accuracy + macro F1, or exact match + ROUGE-1 + ROUGE-L of generations)")
    p.add_argument("adapter", metavar="ADAPTER", help="peft adapter folder")
    p.add_argument("--tasks", "--task", dest="task", required=True, metavar="DIR_OR_JSONL",
                   help="task folder ({split}.jsonl + labels.json) or a .jsonl (--task: the old spelling)")
    p.add_argument("--split", default="test", help="split of a task folder (default: test)")
    p.add_argument("--format", choices=("json", "csv"), default="json")
    p.add_argument("--limit", type=int, default=None, help="score only the first N examples")
    p.add_argument("--batch-size", type=int, default=64)
    add_cache_options(p)
    p.set_defaults(func=cmd_evaluate)


def _merge_params(args: argparse.Namespace) -> tuple[list[float] | None, dict]:
    """``--weights`` / ``--density`` / ``--seed`` / ``--rank`` as merge arguments (unset ones omitted)."""
    from geometry.merging import METHOD_PARAMS
    from geometry.merging.params import parse
    from geometry.merging.weights import parse_weights

    weights = parse_weights(args.weights, label="--weights")
    takes = METHOD_PARAMS.get(args.method, ())
    params = {}
    for name in ("density", "seed", "rank"):
        value = getattr(args, name)
        if value is None:
            continue
        if name not in takes:
            if name == "rank":  # e.g. lora_average: truncate when writing instead
                continue
            raise ValueError(f"--{name} does not apply to --method {args.method} (it takes {', '.join(takes) or 'only --weights'})")
        params[name] = value

    for text in args.param or ():
        name, value = parse(text, takes, args.method)
        params[name] = value
    return weights, params


def _add_merge_options(p: argparse.ArgumentParser, recipe: bool = False) -> None:
    from geometry.merging import MERGE_METHODS

    if recipe:
        p.add_argument("paths", nargs="*", metavar="PATH",
                       help="adapter folders or .zip files (same base model); with --recipe: optional, in the "
                       "recipe's order (default: the recipe's own references, relative to its folder)")
        p.add_argument("--recipe", default=None, metavar="FILE",
                       help="run a merge recipe (mergekit YAML, or the recipe.yaml of an export) instead of "
                       "--method / --weights / parameters")
    else:
        p.add_argument("paths", nargs="+", metavar="PATH", help="adapter folders or .zip files (same base model)")
    p.add_argument("--method", required=not recipe, default=None, choices=list(MERGE_METHODS),
                   help="merge method" + (" (unless --recipe)" if recipe else ""))
    p.add_argument("--weights", default=None, metavar="W1,W2,...", help="one weight per adapter (method default if unset)")
    p.add_argument("--density", type=float, default=None, help="fraction of entries kept (ties, dare_*, magnitude_prune)")
    p.add_argument("--rank", type=int, default=None,
                   help="rank of each merged module (default: exact for task_arithmetic, the sum of "
                   "the input ranks for ties / dare_* / multislerp / magnitude_prune); "
                   "the energy kept is reported")
    p.add_argument("--seed", type=int, default=None, help="random seed (dare_*, della*)")
    p.add_argument("--param", action="append", default=None, metavar="NAME=VALUE",
                   help="any other parameter of the method, repeatable (e.g. gamma=0.01 for breadcrumbs, "
                   "epsilon=0.1 for della); see geometry/merging/params.py")


def cmd_merge(args: argparse.Namespace) -> int:
    """Merge adapters and write a peft adapter folder (PeftModel.from_pretrained loads it) with its model card;
    ``--tasks``: score it first (the scores and ANP go in the card); ``--push-to-hub``: upload it."""

    from geometry.merging import merge

    if args.out is None and args.push_to_hub is None:
        raise AtlasError("merge: give --out DIR (a new folder), --push-to-hub REPO_ID, or both")
    out = Path(args.out) if args.out is not None else None
    if out is not None and out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.force:
        what = "a file" if not out.is_dir() else "a folder that is not empty"
        raise AtlasError(f"--out {out} is {what}: choose a new folder, or pass --force to write into it")
    if args.limit is not None and args.tasks is None:
        raise AtlasError("--limit applies to the scores of --tasks DIR: give --tasks too")
    if args.recipe is not None:
        adapters, merged, refs = _run_recipe_file(args)
        params = {}
    else:
        if args.method is None:
            raise AtlasError("merge: give --method NAME (or --recipe FILE)")
        if not args.paths:
            raise AtlasError("merge: give the adapters to merge (PATH ...)")
        weights, params = _merge_params(args)
        adapters = load_adapters(args.paths)
        merged = merge(adapters, args.method, weights, **params)
        refs = list(args.paths)
    recipe = merged.recipe(refs=refs)
    write_rank = args.rank if "rank" not in params else None
    scores = None
    if args.tasks is not None:
        from geometry.evaluation.merge_eval import evaluate_merge

        scores = evaluate_merge(adapters, args.tasks, merged=merged, limit=args.limit, cache=result_cache(args))
        print(f"scored on {len(scores.frame)} tasks: ANP {scores.anp:.2f}% (in the model card, README.md)")
    if out is not None:
        folder = merged.to_peft_folder(out, rank=write_rank, head=args.head, scores=scores, recipe=recipe)
        info = json.loads((folder / "merge_info.json").read_text())
        ranks = sorted(set(info["ranks"].values()))
        print(f"wrote {folder}: {merged.method} of {len(adapters)} adapters, {len(info['ranks'])} modules, "
              f"rank {ranks[0] if len(ranks) == 1 else f'{ranks[0]}-{ranks[-1]}'}, "
              f"energy kept {100 * info['energy_kept_total']:.4g}%, head {info['head']}")
        energy = info["energy_kept"]
        worst = min(energy, key=energy.get)
        print(f"energy kept: {100 * info['energy_kept_total']:.4g}% of sum ||delta||_F^2 over "
              f"{len(energy)} modules (rank: {info['rank_rule']}; lowest {100 * energy[worst]:.4g}% at {worst}); "
              f"per module in {folder / 'merge_info.json'}")
    if args.push_to_hub is not None:
        token = args.token or os.environ.get("HF_TOKEN") or None
        url = merged.push_to_hub(args.push_to_hub, token=token, private=not args.public, rank=write_rank,
                                 head=args.head, scores=scores, recipe=recipe)
        print(f"pushed to {url}")
    return 0


def _run_recipe_file(args: argparse.Namespace) -> tuple[list, object, list[str]]:
    """``--recipe FILE``: read it, load its adapters (the PATHs given, else its references resolved
    against the recipe's folder, then as given: a folder, a zip or a hub id), run it."""
    from geometry.merging.recipe import read_recipe
    from geometry.merging.replay import run_recipe

    if args.method is not None or args.weights is not None or args.param or any(
            getattr(args, n) is not None for n in ("density", "seed")):
        raise AtlasError("--recipe replaces --method, --weights, --density, --seed and --param: give the recipe only")
    path = Path(args.recipe)
    if not path.is_file():
        raise AtlasError(f"--recipe {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AtlasError(f"--recipe {path}: cannot read it as text ({exc})") from None
    recipe = read_recipe(text, where=str(path))
    if args.paths:
        sources = list(args.paths)
    else:
        sources = []
        for m in recipe.adapters:
            local = path.parent / m.ref
            if local.exists():
                sources.append(str(local))
            elif Path(m.ref).exists() or m.ref.startswith("hub:"):
                sources.append(m.ref)
            elif "/" in m.ref and not m.ref.startswith((".", "/")):
                sources.append(f"hub:{m.ref}")  # an owner/name reference: the hub, as mergekit reads it
            else:
                raise AtlasError(f"--recipe {path}: adapter {m.ref!r} is neither next to the recipe nor a path here; "
                                 "give the adapters as PATH arguments, in the recipe's order")
    adapters = load_adapters(sources)
    merged = run_recipe(recipe, adapters)
    refs = [m.ref for m in recipe.adapters]
    print(f"recipe {path}: {recipe.merge_method} of {len(adapters)} adapters"
          + (" (Adapter Atlas's own call, from its adapter_atlas block)" if (recipe.atlas or {}).get("method")
             else " (mergekit's meaning)"))
    return adapters, merged, refs


def _add_merge_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="merge LoRA adapters into one peft adapter folder (with a model card and "
                       "its recipe), or replay a recipe (--recipe FILE)")
    _add_merge_options(p, recipe=True)
    p.add_argument("--out", default=None, metavar="DIR", help="output peft adapter folder (new or empty)")
    p.add_argument("--force", action="store_true", help="write into --out even when it is not empty")
    p.add_argument("--head", default=None, metavar="NAME", help="whose head goes in the weights (default: first); all go to heads/")
    p.add_argument("--tasks", default=None, metavar="DIR",
                   help="score the merge on each adapter's task under DIR (test split) and put the scores and ANP "
                   "in the model card (README.md); without it the card says 'not measured'")
    p.add_argument("--limit", type=int, default=None, help="with --tasks: score only the first N test examples")
    p.add_argument("--push-to-hub", default=None, metavar="REPO_ID",
                   help="upload the merged folder (model card included) to this Hub model repository")
    p.add_argument("--token", default=None, help="Hub token for --push-to-hub (default: $HF_TOKEN)")
    p.add_argument("--public", action="store_true", help="with --push-to-hub: create the repository public (default private)")
    add_cache_options(p)
    p.set_defaults(func=cmd_merge)


def cmd_pairwise(args: argparse.Namespace) -> int:
    """Merge every pair of adapters, score each task with its own head: merge loss delta(i, j) and pairwise ANP."""

    from geometry.evaluation.merge_eval import correlation_study, pairwise_study

    weights, params = _merge_params(args)
    adapters = load_adapters(args.paths)
    result = pairwise_study(adapters, args.tasks, args.method, weights=weights, limit=args.max_examples,
                            show_progress=sys.stderr.isatty(), cache=result_cache(args), **params)
    if args.format == "csv":
        print(result.to_frame().to_csv(index=False), end="")
        return 0
    out = result.to_dict()
    if args.correlations:
        corr = correlation_study(adapters, result.delta)
        out["correlations"] = corr.to_dict(orient="records")
    print(json.dumps(out, indent=1))
    return 0


def _add_pairwise_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pairwise", help="pairwise merge study: merge loss delta(i, j), pairwise ANP, geometry correlations")
    _add_merge_options(p)
    p.add_argument("--tasks", required=True, metavar="DIR", help="folder holding one task folder per adapter (test.jsonl)")
    p.add_argument("--format", choices=("json", "csv"), default="json")
    p.add_argument("--limit", "--max-examples", dest="max_examples", type=int, default=None,
                   help="score only the first N test examples of each task (--max-examples: the old spelling)")
    p.add_argument("--correlations", action="store_true",
                   help="json: add the Spearman correlations of delta(i, .) with each distance (paper's Table 3)")
    add_cache_options(p)
    p.set_defaults(func=cmd_pairwise)
