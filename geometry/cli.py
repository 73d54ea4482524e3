"""Command line: ``python -m geometry SUBCOMMAND ...`` (a stable contract; scripts rely on it).

Each subcommand is a ``cmd_<name>(args) -> int`` registered by ``_add_<name>_parser``. Bad input
exits with status 2 and one line on stderr starting ``error:``, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from geometry.errors import AtlasError

#: Registration functions, one per subcommand, appended below their ``cmd_`` function.
_REGISTRY: list[Callable[[argparse._SubParsersAction], None]] = []


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m geometry",
        description="Adapter Atlas: exact geometry of LoRA adapters (task vectors).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in _REGISTRY:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (AtlasError, OSError, ValueError, KeyError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


# ---------------------------------------------------------------------------------------------
# Subcommands are added below this line (each: cmd_<name>, _add_<name>_parser, _REGISTRY.append).
# ---------------------------------------------------------------------------------------------


def cmd_info(args: argparse.Namespace) -> int:
    """Describe adapters: name, base, r, alpha, scale rule, and every module's stack, layer, kind, shape, rank."""
    import json

    from geometry.loader import adapter_summary, format_summary, load_adapter

    summaries = [adapter_summary(load_adapter(p)) for p in args.paths]
    if args.json:
        print(json.dumps({"adapters": summaries}, indent=1))
    else:
        print("\n\n".join(format_summary(s) for s in summaries))
    return 0


def _add_info_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="describe adapters (modules, ranks, scales, unmapped and non-LoRA tensors)")
    p.add_argument("paths", nargs="+", metavar="PATH", help="adapter folder, .zip, or hub:<repo_id>")
    p.add_argument("--json", action="store_true", help="JSON output: {\"adapters\": [summary, ...]}")
    p.set_defaults(func=cmd_info)


_REGISTRY.append(_add_info_parser)
