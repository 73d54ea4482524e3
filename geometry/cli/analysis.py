"""Commands that describe and compare adapters: ``info``, ``inclusion``, ``anatomy``, ``distances``."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from geometry.cli.common import comma_list, kinds_option, load_adapters, write_records
from geometry.errors import AtlasError, IncompatibleAdaptersError
from geometry.io.summary import adapter_summary
from geometry.linalg.align import check_compatible, common_groups
from geometry.text import ranges
from geometry.types import row_label


def cmd_info(args: argparse.Namespace) -> int:
    """Describe adapters: name, base, r, alpha, scale rule, and every module's stack, layer, kind, shape, rank."""


    summaries = [adapter_summary(ad) for ad in load_adapters(args.paths)]
    if args.json:
        print(json.dumps({"adapters": summaries}, indent=1))
    else:
        print("\n\n".join(format_summary(s) for s in summaries))
    return 0


def format_summary(summary: dict) -> str:
    """Human-readable text of :func:`adapter_summary` (the ``info`` command's default output)."""
    s = summary
    lines = [
        f"adapter {s['name']}  ({s['source']})   format: {s.get('format', 'peft')}   "
        f"variant: {s.get('variant', 'LoRA')}",
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
        extra = (f" rows {row_label(m['rows'])}" if m["rows"] else "") + (" +magnitude" if m["dora"] else "")
        lines.append(f"  {m['stack']:8} {m['layer']:>5} {m['kind'][:8]:8} {shape:>12} {m['rank']:>4} "
                     f"{m['scale']:>8.4g}  {m['name']}{extra}")
    lines.append(f"  unmapped: {', '.join(s['unmapped']) if s['unmapped'] else 'none'}")
    if s["other_tensors"]:
        lines.append("  non-LoRA tensors:")
        lines.extend(f"    {k} {v}" for k, v in s["other_tensors"].items())
    else:
        lines.append("  non-LoRA tensors: none")
    lines.extend(f"  note: {n}" for n in s.get("notes", []))
    lines.extend(f"  warning: {w}" for w in s["warnings"])
    return "\n".join(lines)


def _add_info_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="describe adapters (modules, ranks, scales, unmapped and non-LoRA tensors)")
    p.add_argument("paths", nargs="+", metavar="PATH", help="adapter folder, .zip, or hub:<repo_id>")
    p.add_argument("--json", action="store_true", help="JSON output: {\"adapters\": [summary, ...]}")
    p.set_defaults(func=cmd_info)


def cmd_inclusion(args: argparse.Namespace) -> int:
    """Spectral inclusion tau1 -> tau2 (closed form): one record per common module."""

    from geometry.analysis.inclusion import inclusion

    if not args.lam >= 0:
        raise ValueError(f"--lambda must be >= 0, got {args.lam}")
    ad1, ad2 = load_adapters([args.path1, args.path2])
    frame = inclusion(ad1, ad2, lam=args.lam, kind=kinds_option(args.kind), objective=args.objective)
    if frame.empty:
        raise IncompatibleAdaptersError(
            f"{args.path1} and {args.path2} share no LoRA module"
            + (f" of kind {args.kind}" if args.kind else "")
            + " (same (stack, layer, kind) keys expected)"
        )
    write_records(frame, args.format, args.out, ["s1", "s2"])
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


def cmd_anatomy(args: argparse.Namespace) -> int:
    """Per-module anatomy of one adapter: norms, singular values, effective and stable rank."""

    from geometry.analysis.anatomy import anatomy

    frame = anatomy(load_adapters([args.path])[0], kind=kinds_option(args.kind))
    write_records(frame, args.format, args.out, ["singular_values"])
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


def cmd_compress(args: argparse.Namespace) -> int:
    """Rank per module (energy ranks, knee, hard threshold) and, with --rank or --energy, the truncated adapter."""

    from geometry.api import compress, ranks

    adapter = load_adapters([args.path])[0]
    table = ranks(adapter, energy=args.energy if args.energy is not None else 0.9)
    if args.rank is not None or args.energy is not None:
        if args.out is None:
            raise AtlasError("compress: --rank / --energy writes a peft folder: give --out DIR")
        out = Path(args.out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise AtlasError(f"--out {out} exists and is not an empty folder: choose a new folder")
        small = compress(adapter, rank=args.rank, energy=args.energy)
        kept = small.energy_by_module()
        new_rank = {key.label: int(mod.B.shape[1]) for key, mod in small.modules.items()}
        table = table.assign(**{"kept rank": table["module"].map(new_rank), "energy kept": table["module"].map(kept)})
        small.to_peft_folder(out)
        before = int(table["r"].sum())
        print(f"wrote {out}: {args.path} truncated to {'rank ' + str(args.rank) if args.rank else f'{100 * args.energy:g}% energy per module'}; "
              f"sum of ranks {before} -> {int(table['kept rank'].sum())}, energy kept {100 * small.energy_kept:.4g}% of "
              f"sum ||tau||_F^2 (lowest {100 * min(kept.values()):.4g}% at {min(kept, key=kept.get)})", file=sys.stderr)
    write_records(table, args.format, args.table, [])
    return 0


def _add_compress_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compress",
        help="rank per module (energy ranks, knee, hard threshold); with --rank / --energy, truncate and write the adapter",
        description=("Prints one row per module: r, numerical rank, the ranks keeping --energy (default 90%%) and 99%% "
                     "of ||tau||_F^2, knee, Gavish-Donoho hard threshold, energy at the knee; with --rank R or "
                     "--energy E writes the truncated peft adapter to --out (exact factored SVD, Eckart-Young) and "
                     "adds the kept rank and energy per module."),
    )
    p.add_argument("path", metavar="ADAPTER", help="adapter folder, .zip or hub:<repo_id>")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--rank", type=int, default=None, help="keep this rank in every module")
    group.add_argument("--energy", type=float, default=None, help="keep this fraction of each module's ||tau||_F^2 (0 to 1]")
    p.add_argument("--out", default=None, metavar="DIR", help="with --rank / --energy: the new peft adapter folder")
    p.add_argument("--format", choices=("csv", "json"), default="csv")
    p.add_argument("--table", default=None, metavar="FILE", help="write the table to FILE instead of stdout")
    p.set_defaults(func=cmd_compress)


def cmd_distances(args: argparse.Namespace) -> int:
    """Distance matrix (mean over the chosen layers) or per-layer records between adapters.

    One metric and one kind (the defaults): the output shape of the contract, unchanged. Several
    (``--metric grassmann,cosine --kind q,v``): every pair computed in this one call, each adapter's
    modules decomposed once per kind and shared by the metrics; records and CSV rows gain a
    ``metric`` column, the JSON matrix form lists one matrix per ``(metric, kind)`` under ``results``.
    """

    import geometry
    from geometry.analysis.distances import select_layers

    if len(args.paths) < 2:
        raise AtlasError("distances need at least two adapters (PATH PATH [PATH...])")
    adapters = load_adapters(args.paths)
    seen: dict[str, int] = {}
    for ad in adapters:  # two folders with the same stem: keep the names apart
        seen[ad.name] = seen.get(ad.name, 0) + 1
        if seen[ad.name] > 1:
            ad.name = f"{ad.name}#{seen[ad.name]}"
    warnings = check_compatible(adapters)  # printed after a successful run (errors stay one line)
    metrics, kinds = args.metric, args.kind or [None]
    several = len(metrics) > 1 or len(kinds) > 1
    groups = common_groups(adapters)
    if not groups:
        raise AtlasError(f"adapters {[a.name for a in adapters]} have no module in common")
    common = list(dict.fromkeys(k for _, k in groups))
    by_kind = {}
    for kind in kinds:  # one pass per (stack, kind): each adapter decomposed once, shared by every metric
        if kind is None:
            kind = "v" if "v" in common else common[0]
        if kind not in common:
            raise AtlasError(f"kind {kind!r} is not common to all adapters; common kinds: {', '.join(common)}")
        stack = args.stack or next(s for s, k in groups if k == kind)
        if (stack, kind) not in groups:
            raise AtlasError(f"no common module of kind {kind!r} in stack {stack!r}")
        by_kind[kind] = (stack, geometry.distance_tensors(adapters, metric=metrics, factor=args.factor, kind=kind,
                                                          stack=stack, pad=args.pad))
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


def _add_distances_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("distances", help="L2 / cosine / Grassmann distances between adapters, per layer or averaged")
    p.add_argument("paths", nargs="+", metavar="PATH", help="two or more adapter folders, .zip files, or hub:<repo_id>")
    p.add_argument("--metric", type=comma_list(("l2", "cosine", "grassmann")), default=["cosine"],
                   metavar="{l2,cosine,grassmann}[,...]",
                   help="one metric, or several comma-separated (computed in one pass; adds a metric column)")
    p.add_argument("--factor", choices=("ba", "a", "b"), default="ba", help="tau = s B A (default), A alone, or B alone")
    p.add_argument("--kind", type=comma_list(None), default=None, metavar="KIND[,...]",
                   help="projection kind (q, k, v, o, gate, up, down, ...), or several comma-separated; default v if present")
    p.add_argument("--stack", default=None, help="model / encoder / decoder (default: the first having the kind)")
    p.add_argument("--layers", default="all", help="all | last:K | N,N | A-B (mean over these layers)")
    p.add_argument("--per-layer", action="store_true", help="one record per (i, j, layer) instead of the mean matrix")
    p.add_argument("--pad", action="store_true", help="Grassmann: count |r1 - r2| extra right angles")
    p.add_argument("--format", choices=("csv", "json"), default="json")
    p.add_argument("--out", default=None, metavar="FILE", help="write here instead of stdout")
    p.set_defaults(func=cmd_distances)
