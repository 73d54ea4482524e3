"""MkDocs hooks: pages that are generated from the code at build time, so that they never go stale.

* ``<!-- cli-summary -->`` and ``<!-- cli-reference -->`` (``docs/cli.md``): the table of subcommands and every
  subcommand's ``--help``, from the argparse parsers of :mod:`geometry.cli` (``COMMANDS``);
* ``<!-- merge-parameters -->`` (``docs/merging.md``): each merge method, its module and its parameters with
  their defaults (read from the method's signature) and help (:data:`geometry.merging.params.PARAMS`);
* in the rendered HTML, what is left of reST roles (``:func:`` before a code span) is dropped.
"""

from __future__ import annotations

import argparse
import inspect
import os
import re


def cli_reference() -> str:
    os.environ["COLUMNS"] = "100"  # argparse wraps help at the terminal width: fix it
    from geometry.cli import COMMANDS, build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    parts = ["## `python -m geometry` { #python-m-geometry }", "", "```text", parser.format_help().rstrip(), "```", ""]
    for name, (help_line, _) in COMMANDS.items():
        parts += [f"## `{name}` {{ #{name} }}", "", help_line[0].upper() + help_line[1:] + ".", "", "```text",
                  sub.choices[name].format_help().rstrip(), "```", ""]
    return "\n".join(parts)


#: where the documentation of a command's analysis lives (a command not listed gets no link)
_PAGES = {"distances": "analyses/distances.md", "inclusion": "analyses/inclusion.md", "anatomy": "analyses/anatomy.md",
          "evaluate": "evaluation.md", "pairwise": "evaluation.md", "merge": "merging.md", "divmerge": "learned.md",
          "adamerging": "learned.md", "survey": "analyses/survey.md", "neighbours": "analyses/survey.md",
          "tokens": "analyses/tokens.md"}


def cli_summary() -> str:
    from geometry.cli import COMMANDS

    rows = ["| command | what | page |", "|---|---|---|"]
    for name, (help_line, _) in COMMANDS.items():
        page = _PAGES.get(name)
        rows.append(f"| [`{name}`](#{name}) | {help_line.replace('|', '/')} | {f'[{page}]({page})' if page else ''} |")
    return "\n".join(rows)


def merge_parameters() -> str:
    from geometry.merging import MERGE_METHODS
    from geometry.merging.params import PARAMS

    rows = ["| method | module | parameters (default) |", "|---|---|---|"]
    used: list[str] = []
    for name, fn in MERGE_METHODS.items():
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.name not in ("adapters", "weights", "dtype", "device")
                  and (p.kind is p.KEYWORD_ONLY or p.name in PARAMS)]
        shown = ", ".join(f"`{p.name}={p.default!r}`" for p in params) or "weights only"
        used += [p.name for p in params if p.name not in used]
        rows.append(f"| `{name}` | `{fn.__module__}` | {shown} |")
    rows += ["", "| parameter | kind | range or choices | what |", "|---|---|---|---|"]
    for name in used:
        p = PARAMS.get(name)
        if p is None:
            continue
        number = int if p.kind == "int" else float
        domain = " / ".join(p.choices) if p.choices else ("" if p.low is None else f"{number(p.low):g} to {number(p.high):g}")
        if p.kind == "int" and p.low is not None:
            domain = f"{int(p.low)} to {int(p.high):,}"
        rows.append(f"| `{name}` | {p.kind} | {domain} | {p.help} |")
    return "\n".join(rows)


_MARKERS = {"<!-- cli-summary -->": cli_summary, "<!-- cli-reference -->": cli_reference, "<!-- merge-parameters -->": merge_parameters}
_ROLE_LEFT = re.compile(r":(?:func|class|mod|data|meth|attr|exc|obj):(?=<code>)")


def on_page_markdown(markdown: str, **kwargs) -> str:
    for marker, make in _MARKERS.items():
        if marker in markdown:
            markdown = markdown.replace(marker, make())
    return markdown


def on_page_content(html: str, **kwargs) -> str:
    return _ROLE_LEFT.sub("", html)
