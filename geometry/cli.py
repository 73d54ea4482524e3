"""Command line: ``python -m geometry SUBCOMMAND ...`` (a stable contract; scripts rely on it).

Each subcommand is a ``cmd_<name>(args) -> int`` registered by ``_add_<name>_parser``. Bad input
exits with status 2 and one line on stderr starting ``error:``, never a traceback.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from geometry.errors import AtlasError, IncompatibleAdaptersError
from geometry.io.summary import adapter_summary
from geometry.linalg.align import check_compatible, common_groups
from geometry.merging.params import parse
from geometry.merging.weights import parse_weights
from geometry.text import ranges
from geometry.version import __version__

#: Registration functions, one per subcommand, appended below their ``cmd_`` function.
_REGISTRY: list[Callable[[argparse._SubParsersAction], None]] = []


class _Parser(argparse.ArgumentParser):
    """argparse with the contract's error shape: one ``error:`` line on stderr and exit status 2 (no usage dump)."""

    def error(self, message: str):  # noqa: D401  (argparse's hook)
        command = self.prog.removeprefix("python -m geometry").strip()
        print(f"error: {command + ': ' if command else ''}{message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m geometry",
        description="Adapter Atlas: exact geometry of LoRA adapters (task vectors).",
    )

    parser.add_argument("--version", action="version", version=f"adapter-atlas {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in _REGISTRY:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        from geometry.device import configure_threads

        configure_threads()  # every core, or $ADAPTER_ATLAS_THREADS
        return int(args.func(args) or 0)
    except (AtlasError, OSError, ValueError, KeyError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


# -- the CLI's disk cache: its own choice (the library touches no disk unless given a cache) ------------
CACHE_ENV = "ADAPTER_ATLAS_CACHE"


def default_cache_dir() -> str:
    """``$ADAPTER_ATLAS_CACHE`` when set, else ``~/.cache/adapter-atlas`` (the store is its ``store/``)."""

    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "adapter-atlas")


def _add_cache_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache", default=None, metavar="DIR",
                   help=f"keep results under DIR/store (default: ${CACHE_ENV}, else ~/.cache/adapter-atlas)")
    p.add_argument("--no-cache", action="store_true", help="recompute, reading and writing no cache")


def _result_cache(args: argparse.Namespace):
    """The :class:`geometry.cache.ResultCache` of ``--cache`` (``None`` with ``--no-cache``)."""
    if getattr(args, "no_cache", False):
        return None

    from geometry.cache import ResultCache

    size = os.environ.get("ADAPTER_ATLAS_CACHE_MB")
    folder = os.path.join(os.path.expanduser(args.cache or default_cache_dir()), "store")
    return ResultCache(folder, **({"size_mb": size} if size else {}))


# ---------------------------------------------------------------------------------------------
# Subcommands are added below this line (each: cmd_<name>, _add_<name>_parser, _REGISTRY.append).
# ---------------------------------------------------------------------------------------------


def cmd_info(args: argparse.Namespace) -> int:
    """Describe adapters: name, base, r, alpha, scale rule, and every module's stack, layer, kind, shape, rank."""

    from geometry.io.loader import load_adapter

    summaries = [adapter_summary(load_adapter(p)) for p in args.paths]
    if args.json:
        print(json.dumps({"adapters": summaries}, indent=1))
    else:
        print("\n\n".join(format_summary(s) for s in summaries))
    return 0


def format_summary(summary: dict) -> str:
    """Human-readable text of :func:`adapter_summary` (the ``info`` command's default output)."""
    s = summary
    lines = [
        f"adapter {s['name']}  ({s['source']})",
        f"  base: {s['base'] or '?'}   task: {s['task_type'] or '?'}   r: {s['r']}   alpha: {s['alpha']:g}   "
        f"scale: {s['scale_rule']} = {s['scale']:.4g}" + ("   DoRA" if s["use_dora"] else ""),
    ]
    if s["rank_pattern"] or s["alpha_pattern"]:
        lines.append(f"  rank_pattern: {s['rank_pattern']}   alpha_pattern: {s['alpha_pattern']}")
    lines.append(
        f"  {s['n_modules']} modules, {s['n_params']} LoRA parameters; stacks {', '.join(s['stacks'])}; "
        f"kinds {', '.join(s['kinds'])}; layers {ranges(s['layers'])}")
    lines.append(f"  {'stack':8} {'layer':>5} {'kind':8} {'shape':>12} {'rank':>4} {'scale':>8}  name")
    for m in s.get("modules", []):
        shape = f"{m['shape'][0]}x{m['shape'][1]}"
        extra = (f" rows {m['rows'][0]}:{m['rows'][1]}" if m["rows"] else "") + (" +magnitude" if m["dora"] else "")
        lines.append(f"  {m['stack']:8} {m['layer']:>5} {m['kind'][:8]:8} {shape:>12} {m['rank']:>4} "
                     f"{m['scale']:>8.4g}  {m['name']}{extra}")
    lines.append(f"  unmapped: {', '.join(s['unmapped']) if s['unmapped'] else 'none'}")
    if s["other_tensors"]:
        lines.append("  non-LoRA tensors:")
        lines.extend(f"    {k} {v}" for k, v in s["other_tensors"].items())
    else:
        lines.append("  non-LoRA tensors: none")
    lines.extend(f"  warning: {w}" for w in s["warnings"])
    return "\n".join(lines)


def _add_info_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="describe adapters (modules, ranks, scales, unmapped and non-LoRA tensors)")
    p.add_argument("paths", nargs="+", metavar="PATH", help="adapter folder, .zip, or hub:<repo_id>")
    p.add_argument("--json", action="store_true", help="JSON output: {\"adapters\": [summary, ...]}")
    p.set_defaults(func=cmd_info)


_REGISTRY.append(_add_info_parser)


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Score a peft adapter on a task split: accuracy and macro F1, or ROUGE-L for generation."""

    from geometry.evaluation.evaluate import evaluate

    result = evaluate(args.adapter, args.task, split=args.split, batch_size=args.batch_size, limit=args.limit,
                      cache=_result_cache(args))
    result = {"adapter": args.adapter, **result}
    if args.format == "csv":
        print(",".join(result))
        print(",".join(str(v) for v in result.values()))
    else:
        print(json.dumps(result, indent=1))
    return 0


def _add_evaluate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="score an adapter on a task split (accuracy + macro F1, or ROUGE-L)")
    p.add_argument("adapter", metavar="ADAPTER", help="peft adapter folder")
    p.add_argument("--tasks", "--task", dest="task", required=True, metavar="DIR_OR_JSONL",
                   help="task folder ({split}.jsonl + labels.json) or a .jsonl (--task: the old spelling)")
    p.add_argument("--split", default="test", help="split of a task folder (default: test)")
    p.add_argument("--format", choices=("json", "csv"), default="json")
    p.add_argument("--limit", type=int, default=None, help="score only the first N examples")
    p.add_argument("--batch-size", type=int, default=64)
    _add_cache_options(p)
    p.set_defaults(func=cmd_evaluate)


_REGISTRY.append(_add_evaluate_parser)


def _merge_params(args: argparse.Namespace) -> tuple[list[float] | None, dict]:
    """``--weights`` / ``--density`` / ``--seed`` / ``--rank`` as merge arguments (unset ones omitted)."""
    from geometry.merging import METHOD_PARAMS

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


def _add_merge_options(p: argparse.ArgumentParser) -> None:
    from geometry.merging import MERGE_METHODS

    p.add_argument("paths", nargs="+", metavar="PATH", help="adapter folders or .zip files (same base model)")
    p.add_argument("--method", required=True, choices=list(MERGE_METHODS), help="merge method")
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
    """Merge adapters and write a peft adapter folder (PeftModel.from_pretrained loads it)."""

    from geometry.io.loader import load_adapter
    from geometry.merging import merge

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.force:
        what = "a file" if not out.is_dir() else "a folder that is not empty"
        raise AtlasError(f"--out {out} is {what}: choose a new folder, or pass --force to write into it")
    weights, params = _merge_params(args)
    merged = merge([load_adapter(p) for p in args.paths], args.method, weights, **params)
    write_rank = args.rank if "rank" not in params else None
    folder = merged.to_peft_folder(args.out, rank=write_rank, head=args.head)
    info = json.loads((folder / "merge_info.json").read_text())
    ranks = sorted(set(info["ranks"].values()))
    print(f"wrote {folder}: {args.method} of {len(args.paths)} adapters, {len(info['ranks'])} modules, "
          f"rank {ranks[0] if len(ranks) == 1 else f'{ranks[0]}-{ranks[-1]}'}, "
          f"energy kept {100 * info['energy_kept_total']:.4g}%, head {info['head']}")
    energy = info["energy_kept"]
    worst = min(energy, key=energy.get)
    print(f"energy kept: {100 * info['energy_kept_total']:.4g}% of sum ||delta||_F^2 over "
          f"{len(energy)} modules (rank: {info['rank_rule']}; lowest {100 * energy[worst]:.4g}% at {worst}); "
          f"per module in {folder / 'merge_info.json'}")
    return 0


def _add_merge_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="merge LoRA adapters into one peft adapter folder")
    _add_merge_options(p)
    p.add_argument("--out", required=True, metavar="DIR", help="output peft adapter folder (new or empty)")
    p.add_argument("--force", action="store_true", help="write into --out even when it is not empty")
    p.add_argument("--head", default=None, metavar="NAME", help="whose head goes in the weights (default: first); all go to heads/")
    p.set_defaults(func=cmd_merge)


_REGISTRY.append(_add_merge_parser)


def cmd_pairwise(args: argparse.Namespace) -> int:
    """Merge every pair of adapters, score each task with its own head: merge loss delta(i, j) and pairwise ANP."""

    from geometry.evaluation.merge_eval import correlation_study, pairwise_study
    from geometry.io.loader import load_adapter

    weights, params = _merge_params(args)
    adapters = [load_adapter(p) for p in args.paths]
    result = pairwise_study(adapters, args.tasks, args.method, weights=weights, limit=args.max_examples,
                            show_progress=sys.stderr.isatty(), cache=_result_cache(args), **params)
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
    _add_cache_options(p)
    p.set_defaults(func=cmd_pairwise)


_REGISTRY.append(_add_pairwise_parser)


def _write_records(frame, fmt: str, out: str | None, list_columns: Sequence[str]) -> None:
    """``frame`` as CSV (list columns as JSON arrays) or a JSON list of records (NaN as null)."""

    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value.item() if hasattr(value, "item") else value

    records = [{k: clean(v) for k, v in row.items()} for row in frame.to_dict(orient="records")]
    if fmt == "json":
        text = "[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n"
    else:
        table = frame.copy()
        for col in list_columns:
            table[col] = [json.dumps(clean(list(v))) for v in table[col]]
        text = table.to_csv(index=False)
    if out:
        with open(out, "w", encoding="utf-8") as fh:
            fh.write(text)
    else:
        sys.stdout.write(text)


def _kinds_option(value: str | None) -> list[str] | None:
    return [k.strip() for k in value.split(",") if k.strip()] if value else None


def cmd_inclusion(args: argparse.Namespace) -> int:
    """Spectral inclusion tau1 -> tau2 (closed form): one record per common module."""

    from geometry.analysis.inclusion import inclusion
    from geometry.io.loader import load_adapter

    if not args.lam >= 0:
        raise ValueError(f"--lambda must be >= 0, got {args.lam}")
    ad1, ad2 = load_adapter(args.path1), load_adapter(args.path2)
    frame = inclusion(ad1, ad2, lam=args.lam, kind=_kinds_option(args.kind), objective=args.objective)
    if frame.empty:
        raise IncompatibleAdaptersError(
            f"{args.path1} and {args.path2} share no LoRA module"
            + (f" of kind {args.kind}" if args.kind else "")
            + " (same (stack, layer, kind) keys expected)"
        )
    _write_records(frame, args.format, args.out, ["s1", "s2"])
    return 0


def _add_inclusion_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inclusion",
        help="spectral inclusion tau1 -> tau2 per module: S1, projected S2, L1, L2 (raw and normalized), REC, entropies",
        description=(
            "Project tau2 on the singular basis of tau1 (closed form): S2 = argmin_{S>=0} ||U S V^T - tau2||_F "
            "+ lambda ||S||_1. Keys: stack, layer, kind, rank, s1, s2, l1, l2, l1_normalized, l2_normalized, "
            "rec, h1, h2."
        ),
    )
    p.add_argument("path1", metavar="PATH1", help="adapter whose basis is used (tau1): folder, .zip or hub:<repo_id>")
    p.add_argument("path2", metavar="PATH2", help="adapter projected (tau2)")
    p.add_argument("--lam", "--lambda", dest="lam", type=float, default=0.0, metavar="L",
                   help="sparsity weight lambda >= 0 (default 0; --lambda: the old spelling)")
    p.add_argument(
        "--objective", choices=("frobenius", "squared"), default="frobenius",
        help="frobenius: the paper's ||.||_F + lambda ||S||_1 (threshold lambda * optimal residual); "
        "squared: ||.||_F^2 + lambda ||S||_1 (threshold lambda / 2). Identical for lambda = 0",
    )
    p.add_argument("--kind", default=None, metavar="K[,K...]", help="only these module kinds (e.g. q,v)")
    p.add_argument("--format", choices=("csv", "json"), default="csv", help="csv (default; s1, s2 as JSON arrays) or json records")
    p.add_argument("--out", default=None, metavar="FILE", help="write to FILE instead of stdout")
    p.set_defaults(func=cmd_inclusion)


_REGISTRY.append(_add_inclusion_parser)


def cmd_anatomy(args: argparse.Namespace) -> int:
    """Per-module anatomy of one adapter: norms, singular values, effective and stable rank."""

    from geometry.analysis.anatomy import anatomy
    from geometry.io.loader import load_adapter

    frame = anatomy(load_adapter(args.path), kind=_kinds_option(args.kind))
    _write_records(frame, args.format, args.out, ["singular_values"])
    return 0


def _add_anatomy_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "anatomy",
        help="per-module anatomy: ||tau||_F, singular values, numerical / effective / stable rank",
        description=(
            "Keys: stack, layer, kind, name, m, n, r, scale, rank, fro_norm, spectral_norm, singular_values, "
            "effective_rank (exp of the spectral entropy), entropy (normalized, 0 to 1), stable_rank."
        ),
    )
    p.add_argument("path", metavar="PATH", help="adapter folder, .zip or hub:<repo_id>")
    p.add_argument("--kind", default=None, metavar="K[,K...]", help="only these module kinds")
    p.add_argument("--format", choices=("csv", "json"), default="csv", help="csv (default; singular_values as JSON arrays) or json records")
    p.add_argument("--out", default=None, metavar="FILE", help="write to FILE instead of stdout")
    p.set_defaults(func=cmd_anatomy)


_REGISTRY.append(_add_anatomy_parser)


def cmd_distances(args: argparse.Namespace) -> int:
    """Distance matrix (mean over the chosen layers) or per-layer records between adapters.

    One metric and one kind (the defaults): the output shape of the contract, unchanged. Several
    (``--metric grassmann,cosine --kind q,v``): every pair computed in this one call, each adapter's
    modules decomposed once per kind and shared by the metrics; records and CSV rows gain a
    ``metric`` column, the JSON matrix form lists one matrix per ``(metric, kind)`` under ``results``.
    """

    from geometry.analysis.distances import all_distances, pairwise_distances, select_layers
    from geometry.io.loader import load_adapter

    if len(args.paths) < 2:
        raise AtlasError("distances need at least two adapters (PATH PATH [PATH...])")
    adapters = [load_adapter(p) for p in args.paths]
    seen: dict[str, int] = {}
    for ad in adapters:  # two folders with the same stem: keep the names apart
        seen[ad.name] = seen.get(ad.name, 0) + 1
        if seen[ad.name] > 1:
            ad.name = f"{ad.name}#{seen[ad.name]}"
    warnings = check_compatible(adapters)  # printed after a successful run (errors stay one line)
    metrics, kinds = args.metric, args.kind or [None]
    several = len(metrics) > 1 or len(kinds) > 1
    if not several:
        tensors = [pairwise_distances(adapters, metrics[0], args.factor, kind=kinds[0], stack=args.stack, pad=args.pad)]
    else:  # one all_distances call per (stack, kind): the decompositions serve every metric
        groups = common_groups(adapters)
        if not groups:
            raise AtlasError(f"adapters {[a.name for a in adapters]} have no module in common")
        common = list(dict.fromkeys(k for _, k in groups))
        by_kind = {}
        for kind in kinds:
            if kind is None:
                kind = "v" if "v" in common else common[0]
            if kind not in common:
                raise AtlasError(f"kind {kind!r} is not common to all adapters; common kinds: {', '.join(common)}")
            stack = args.stack or next(s for s, k in groups if k == kind)
            if (stack, kind) not in groups:
                raise AtlasError(f"no common module of kind {kind!r} in stack {stack!r}")
            by_kind[kind] = (stack, all_distances(adapters, [kind], metrics, [args.factor], stacks=[stack], pad=args.pad))
        tensors = [res[metric, args.factor, stack, kind] for metric in metrics for kind, (stack, res) in by_kind.items()]
    chosen = [select_layers(dt.layers, args.layers) for dt in tensors]
    names = list(tensors[0].adapters)

    def num(v: float) -> float | None:
        return float(v) if math.isfinite(v) else None

    def cell(name: str) -> str:
        return json.dumps(name) if "," in name or '"' in name else name

    if args.per_layer:
        records = [
            {"i": i, "j": j, "adapter_i": names[i], "adapter_j": names[j], "layer": layer, "kind": dt.kind,
             **({"metric": dt.metric} if several else {}), "value": num(dt.values[i, j, dt.layers.index(layer)])}
            for dt, layers in zip(tensors, chosen)
            for i in range(len(names))
            for j in range(len(names))
            for layer in layers
        ]
        if args.format == "json":
            text = json.dumps(records, indent=1) + "\n"
        else:
            rows = ["i,j,adapter_i,adapter_j,layer,kind," + ("metric," if several else "") + "value"]
            rows += [f"{r['i']},{r['j']},{cell(r['adapter_i'])},{cell(r['adapter_j'])},{r['layer']},{r['kind']},"
                     + (f"{r['metric']}," if several else "")
                     + f"{'' if r['value'] is None else repr(r['value'])}" for r in records]
            text = "\n".join(rows) + "\n"
    else:
        results = [
            {"metric": dt.metric, "factor": dt.factor, "kind": dt.kind, "stack": dt.stack, "layers": layers,
             "matrix": [[num(v) for v in row] for row in dt.reduce(layers)], "convention": dt.convention}
            for dt, layers in zip(tensors, chosen)
        ]
        if args.format == "json":
            if several:
                payload = {"adapters": names, "factor": args.factor, "results": results}
            else:
                r = results[0]
                payload = {"adapters": names, **{k: r[k] for k in ("metric", "factor", "kind", "stack", "layers", "matrix",
                                                                      "convention")}}
            text = json.dumps(payload, indent=1) + "\n"
        else:
            def quoted(name: str) -> str:
                return json.dumps(name) if "," in name else name

            head = ["metric", "kind"] if several else []
            rows = [",".join([*head, "adapter", *(quoted(n) for n in names)])]
            for r in results:
                for name, row in zip(names, r["matrix"]):
                    cells = ["" if v is None else repr(float(v)) for v in row]
                    rows.append(",".join([*([r["metric"], r["kind"]] if several else []), quoted(name), *cells]))
            text = "\n".join(rows) + "\n"
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(text)
    else:
        sys.stdout.write(text)
    if args.pad:  # the rank note states the default convention; say the one used
        warnings = [w.replace("Grassmann distances use min(r1, r2) principal angles",
                              "Grassmann distances (--pad) add |r1 - r2| right angles to the min(r1, r2) principal angles")
                    for w in warnings]
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    grassmann = next((dt for dt in tensors if dt.metric == "grassmann"), None)
    if grassmann is not None:
        print(f"note: {grassmann.convention}", file=sys.stderr)
    return 0


def _comma_list(choices: Sequence[str] | None):
    """argparse ``type``: one value or several comma-separated (each among ``choices`` when given)."""

    def parse(text: str) -> list[str]:
        values = list(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))
        bad = [v for v in values if choices is not None and v not in choices]
        if not values or bad:
            raise argparse.ArgumentTypeError(
                f"invalid choice: {', '.join(map(repr, bad)) or repr(text)} (choose from {', '.join(choices or ())}; "
                "several: comma-separated)")
        return values

    return parse


def _add_distances_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("distances", help="L2 / cosine / Grassmann distances between adapters, per layer or averaged")
    p.add_argument("paths", nargs="+", metavar="PATH", help="two or more adapter folders, .zip files, or hub:<repo_id>")
    p.add_argument("--metric", type=_comma_list(("l2", "cosine", "grassmann")), default=["cosine"],
                   metavar="{l2,cosine,grassmann}[,...]",
                   help="one metric, or several comma-separated (computed in one pass; adds a metric column)")
    p.add_argument("--factor", choices=("ba", "a", "b"), default="ba", help="tau = s B A (default), A alone, or B alone")
    p.add_argument("--kind", type=_comma_list(None), default=None, metavar="KIND[,...]",
                   help="projection kind (q, k, v, o, gate, up, down, ...), or several comma-separated; default v if present")
    p.add_argument("--stack", default=None, help="model / encoder / decoder (default: the first having the kind)")
    p.add_argument("--layers", default="all", help="all | last:K | N,N | A-B (mean over these layers)")
    p.add_argument("--per-layer", action="store_true", help="one record per (i, j, layer) instead of the mean matrix")
    p.add_argument("--pad", action="store_true", help="Grassmann: count |r1 - r2| extra right angles")
    p.add_argument("--format", choices=("csv", "json"), default="json")
    p.add_argument("--out", default=None, metavar="FILE", help="write here instead of stdout")
    p.set_defaults(func=cmd_distances)


_REGISTRY.append(_add_distances_parser)


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
    _add_cache_options(p)


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
                  max_new_tokens=args.max_new_tokens, cache=_result_cache(args))
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


_REGISTRY.append(_add_divmerge_parser)


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


_REGISTRY.append(_add_adamerging_parser)


# -- survey (issue 14): all-pairs geometry over hundreds of adapters, out of core or on Dask ----------
def _survey_kinds(values: Sequence[str] | None) -> list[str] | None:
    if not values:
        return None
    return [k.strip() for v in values for k in v.split(",") if k.strip()] or None


def cmd_survey(args: argparse.Namespace) -> int:
    """Every distance between every pair of adapters, module by module, into a Parquet folder (resumable)."""
    from geometry.survey import SurveySettings, factors_gb, plan, run_survey, scan

    if args.memory_limit <= 0:
        raise AtlasError(f"--memory-limit {args.memory_limit:g}: expected a positive number of GB")
    if args.workers is not None and args.workers < 1:
        raise AtlasError(f"--workers {args.workers}: expected at least 1")
    settings = SurveySettings(pad=args.pad, gram_dtype=args.gram_dtype, memory_gb=args.memory_limit,
                              device=args.device, block=args.block)
    refs = scan(args.sources)
    tasks = plan(refs, _survey_kinds(args.kinds), settings)  # checks kinds and shapes before anything starts
    print(f"{len(refs)} adapters, {len(tasks)} modules, {factors_gb(refs):.2f} GB of factors (float32)", file=sys.stderr)
    client = None
    runner = None
    if args.scheduler or args.workers:
        from geometry.survey.cluster import dask_runner, start_client, worker_count

        client = start_client(args.scheduler, args.workers, memory_gb=args.memory_limit)
        runner = dask_runner(client)
        where = args.scheduler or "a local cluster"
        print(f"dask: {worker_count(client)} worker(s) on {where}", file=sys.stderr)
    bar = None
    try:
        from tqdm import tqdm

        def progress(done: int, total: int, message: str = "") -> None:
            nonlocal bar
            if bar is None:
                bar = tqdm(total=total, initial=done, unit="module", disable=args.quiet, file=sys.stderr)
            bar.n = done
            bar.set_postfix_str(message[:40], refresh=True)

        survey = run_survey(refs, args.out, kind=_survey_kinds(args.kinds), settings=settings, progress=progress,
                            runner=runner)
    finally:
        if bar is not None:
            bar.close()
        if client is not None:
            cluster = getattr(client, "cluster", None)
            client.close()
            if cluster is not None and not args.scheduler:
                cluster.close()
    modules = len(survey.modules())
    n = len(survey.names)
    print(f"wrote {modules} module(s) x {n * (n - 1) // 2} pairs to {args.out}", file=sys.stderr)
    return 0


def _add_survey_parser(sub: argparse._SubParsersAction) -> None:
    from geometry.survey import DEFAULT_MEMORY_GB

    p = sub.add_parser(
        "survey", help="all-pairs distances of many adapters, module by module, into Parquet (out of core, Dask)",
        description="Every metric (L2, cosine, Grassmann on BA, B, A) for every pair of adapters and every common "
        "module, one row per (i, j, module), written to a Parquet folder as modules finish; a rerun resumes.")
    p.add_argument("sources", nargs="+", metavar="DIR_OR_LIST",
                   help="a folder of adapter folders, a text file listing adapter folders / URLs, or adapter folders")
    p.add_argument("--out", required=True, help="the Parquet folder to write (results.parquet)")
    p.add_argument("--scheduler", default=None, help="a Dask scheduler address (tcp://host:8786) to run on a cluster")
    p.add_argument("--workers", type=int, default=None,
                   help="run on a local Dask cluster of this many worker processes (default: in this process)")
    p.add_argument("--kind", "--kinds", dest="kinds", nargs="+", default=None,
                   help="projection kinds to survey (q v, or q,v; default: all; --kinds: the old spelling)")
    p.add_argument("--memory-limit", type=float, default=DEFAULT_MEMORY_GB, metavar="GB",
                   help=f"memory of this process (or of each worker) for the computation "
                   f"(default {DEFAULT_MEMORY_GB:g})")
    p.add_argument("--block", type=int, default=None, help="adapters per Gram block (default: from --memory-limit)")
    p.add_argument("--gram-dtype", choices=("auto", "float32", "float64"), default="auto")
    p.add_argument("--device", default=None, help="cpu / cuda (default: CUDA when present, where the task runs)")
    p.add_argument("--pad", action="store_true", help="Grassmann: add |r1 - r2| right angles between different ranks")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_survey)


_REGISTRY.append(_add_survey_parser)


def cmd_neighbours(args: argparse.Namespace) -> int:
    """The k adapters nearest to one adapter in a survey (mean of a metric over the chosen modules)."""
    from geometry.survey import open_survey

    survey = open_survey(args.survey)
    metric = args.metric if "_" in args.metric else f"{args.metric}_{args.factor}"
    layers = None
    if args.layers != "all":
        from geometry.analysis.distances import select_layers

        layers = select_layers(sorted(set(survey.modules()["layer"].tolist())), args.layers)
    frame = survey.neighbours(args.name, metric, args.k, kind=_survey_kinds(args.kinds), layers=layers)
    if args.format == "text":
        print(f"nearest to {args.name} by mean {metric} over modules:")
        for row in frame.itertuples():
            value = "undefined (NaN)" if row.distance != row.distance else f"{row.distance:.6g}"
            print(f"{row.rank:>4}  {row.adapter}  {value}  ({row.modules} modules)")
    else:
        _write_records(frame, args.format, None, [])
    return 0


def _add_neighbours_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("neighbours", help="nearest adapters to one adapter in a survey file")
    p.add_argument("survey", metavar="RESULTS", help="a survey folder (results.parquet) or a saved survey file")
    p.add_argument("name", metavar="NAME", help="the adapter's name in the survey")
    p.add_argument("--metric", default="grassmann",
                   help="l2 | cosine | grassmann (with --factor), or a column such as cosine_ba (default grassmann)")
    p.add_argument("--factor", choices=("ba", "a", "b"), default="ba")
    p.add_argument("--k", type=int, default=10, help="how many neighbours (default 10)")
    p.add_argument("--kind", "--kinds", dest="kinds", nargs="+", default=None,
                   help="only these projection kinds (--kinds: the old spelling)")
    p.add_argument("--layers", default="all", help="all | last:K | N,N | A-B")
    p.add_argument("--format", choices=("text", "csv", "json"), default="text")
    p.set_defaults(func=cmd_neighbours)


_REGISTRY.append(_add_neighbours_parser)


def cmd_tokens(args: argparse.Namespace) -> int:
    """Token dynamics: per-layer cluster counts, base-vs-adapted distance and pairwise cosine of a text's tokens."""
    from geometry.analysis.tokens import batch_dynamics, token_dynamics
    from geometry.io.loader import load_adapter

    adapters = [load_adapter(p) for p in args.adapters]
    if args.task is not None:
        table = batch_dynamics(adapters, task=args.task, split=args.split, limit=args.limit, threshold=args.threshold,
                               include_special=not args.no_special, base=args.base, cache=_result_cache(args)).summary
    else:
        if args.text is None:
            raise AtlasError("tokens: give --text T (or --task DIR for batch mode)")
        table = token_dynamics(adapters, args.text, threshold=args.threshold, include_special=not args.no_special,
                               base=args.base, cache=_result_cache(args)).table
    _write_records(table, args.format, args.out, [])
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
    _add_cache_options(p)
    p.set_defaults(func=cmd_tokens)


_REGISTRY.append(_add_tokens_parser)
