"""Command line: ``python -m geometry SUBCOMMAND ...`` (a stable contract; scripts rely on it).

Each subcommand is a ``cmd_<name>(args) -> int`` registered by ``_add_<name>_parser``, grouped by concept:
:mod:`~geometry.cli.analysis` (``info``, ``inclusion``, ``anatomy``, ``compress``, ``distances``),
:mod:`~geometry.cli.merging` (``evaluate``, ``merge``, ``pairwise``), :mod:`~geometry.cli.advise` (``advise``), :mod:`~geometry.cli.learned`
(``divmerge``, ``adamerging``), :mod:`~geometry.cli.survey` (``survey``, ``neighbours``),
:mod:`~geometry.cli.tokens` (``tokens``); what they share is in :mod:`~geometry.cli.common`. Every
command calls the library's public functions. Bad input exits with status 2 and one line on stderr
starting ``error:``, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from geometry.cli import advise, analysis, learned, merging, survey, tokens
from geometry.cli.common import default_cache_dir  # noqa: F401  (part of the CLI module's surface)
from geometry.errors import AtlasError
from geometry.version import __version__

#: The subcommands in the order ``--help`` lists them: their one-line help and the function that adds their
#: full parser (each module holds ``cmd_<name>(args) -> int`` and ``_add_<name>_parser``).
COMMANDS: dict[str, tuple[str, Callable[[argparse._SubParsersAction], None]]] = {
    "info": ("describe adapters (modules, ranks, scales, unmapped and non-LoRA tensors)", analysis._add_info_parser),
    "evaluate": ("score an adapter on a task split (accuracy + macro F1, or exact match + ROUGE-1 + ROUGE-L of generations)", merging._add_evaluate_parser),
    "merge": ("merge LoRA adapters into one peft adapter folder (with a model card and its recipe), or replay a recipe (--recipe FILE)", merging._add_merge_parser),
    "pairwise": ("pairwise merge study: merge loss delta(i, j), pairwise ANP, geometry correlations",
                 merging._add_pairwise_parser),
    "inclusion": ("spectral inclusion tau1 -> tau2 per module: S1, projected S2, L1, L2 (raw and normalized), REC, "
                  "entropies", analysis._add_inclusion_parser),
    "anatomy": ("per-module anatomy: ||tau||_F, singular values, numerical / effective / stable rank",
                analysis._add_anatomy_parser),
    "compress": ("rank per module (energy ranks, knee, hard threshold); with --rank / --energy, truncate and write the adapter",
                 analysis._add_compress_parser),
    "distances": ("L2 / cosine / Grassmann distances between adapters, per layer or averaged",
                  analysis._add_distances_parser),
    "advise": ("rank merge methods and settings without labels; write the recommended merge", advise._add_advise_parser),
    "divmerge": ("DivMerge: task-arithmetic coefficients learned without labels (JS / KL divergence)",
                 learned._add_divmerge_parser),
    "adamerging": ("AdaMerging: task-arithmetic coefficients minimising the merged model's prediction entropy",
                   learned._add_adamerging_parser),
    "survey": ("all-pairs distances of many adapters, module by module, into Parquet (out of core, Dask)",
               survey._add_survey_parser),
    "neighbours": ("nearest adapters to one adapter in a survey file", survey._add_neighbours_parser),
    "tokens": ("per-layer token clustering of a text, base vs adapter(s) (token dynamics)", tokens._add_tokens_parser),
}


class _Parser(argparse.ArgumentParser):
    """argparse with the contract's error shape: one ``error:`` line on stderr and exit status 2 (no usage dump)."""

    def error(self, message: str):  # noqa: D401  (argparse's hook)
        command = self.prog.removeprefix("python -m geometry").strip()
        print(f"error: {command + ': ' if command else ''}{message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The CLI's parser. ``only``: build the full options of that one subcommand and just the name and help
    line of the others (what :func:`main` does: a command, ``--help`` or ``--version`` imports only what it
    needs; some commands' options name choices that import the library's heavy parts)."""
    parser = _Parser(
        prog="python -m geometry",
        description="Adapter Atlas: exact geometry of LoRA adapters (task vectors).",
    )

    parser.add_argument("--version", action="version", version=f"adapter-atlas {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_line, register) in COMMANDS.items():
        if only is None or name == only:
            register(sub)
        else:
            sub.add_parser(name, help=help_line)
    return parser


def _command(argv: Sequence[str]) -> str:
    """The subcommand named in ``argv`` ("" for none: ``--help``, ``--version``), or None when unknown (then
    every parser is built, so that argparse names the choices)."""
    first = next((a for a in argv if not a.startswith("-")), "")
    return first if first in COMMANDS or first == "" else None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(only=_command(argv))
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
