"""Surveys of many adapters: ``survey`` and ``neighbours``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from geometry.cli.common import write_records
from geometry.errors import AtlasError


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
        write_records(frame, args.format, None, [])
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
