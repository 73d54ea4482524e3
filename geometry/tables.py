"""Tables for papers: a :class:`pandas.DataFrame` as a LaTeX ``booktabs`` tabular or a Markdown table.

Pure functions, no optional dependency (pandas' own ``to_latex`` needs jinja2 and ``to_markdown`` needs
tabulate): the dashboard's download row offers both beside every CSV (``ui.downloads``), and merged
adapters' model cards use :func:`table_markdown` for their scores.

- Numbers are rounded to ``digits`` significant digits (fixed notation; integral floats as integers;
  magnitudes below ``1e-4`` in scientific notation), right-aligned; NaN / None is ``--`` in LaTeX and
  empty in Markdown.
- LaTeX escapes ``\\ & % $ # _ { } ~ ^`` and writes common Unicode symbols (Greek letters, ``‖``, ``≥``,
  ``±``, ``–``...) as LaTeX commands, so the table compiles with pdfLaTeX (``\\usepackage{booktabs}``).
- Markdown escapes ``|`` and folds line breaks into spaces.
- ``index=True`` puts the index first (one column per level, headed by its name), as
  ``DataFrame.to_csv(index=True)`` does; MultiIndex column labels are joined with `` / ``.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import pandas as pd

__all__ = ["format_number", "latex_escape", "table_latex", "table_markdown"]

_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
}
_LATEX_UNICODE = {
    "α": r"$\alpha$", "β": r"$\beta$", "γ": r"$\gamma$", "δ": r"$\delta$", "ε": r"$\varepsilon$",
    "η": r"$\eta$", "θ": r"$\theta$", "λ": r"$\lambda$", "μ": r"$\mu$", "ρ": r"$\rho$", "σ": r"$\sigma$",
    "τ": r"$\tau$", "φ": r"$\varphi$", "ω": r"$\omega$", "Δ": r"$\Delta$", "Σ": r"$\Sigma$", "Ω": r"$\Omega$",
    "‖": r"$\|$", "≥": r"$\geq$", "≤": r"$\leq$", "≠": r"$\neq$", "≈": r"$\approx$", "±": r"$\pm$",
    "×": r"$\times$", "→": r"$\rightarrow$", "∞": r"$\infty$", "√": r"$\surd$", "²": r"$^2$", "·": r"$\cdot$",
    "–": "--", "—": "---", "…": r"\ldots{}", "°": r"$^\circ$",
}


def _is_missing(value: Any) -> bool:
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    return isinstance(value, float) and math.isnan(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Number) and not isinstance(value, bool)


def format_number(value: float, digits: int = 4) -> str:
    """``value`` rounded to ``digits`` significant digits in fixed notation (integral values as integers,
    ``|value| < 1e-4`` in scientific notation, infinities as ``inf`` / ``-inf``)."""
    if isinstance(value, numbers.Integral):
        return str(int(value))
    value = float(value)
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if value == 0:
        return "0"
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    if abs(value) < 1e-4:
        return f"{value:.{max(digits - 1, 0)}e}"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(value))))
    return f"{value:.{decimals}f}"


def latex_escape(text: str) -> str:
    """``text`` with LaTeX's special characters escaped and common Unicode symbols as LaTeX commands."""
    out = []
    for ch in str(text):
        out.append(_LATEX_SPECIAL.get(ch) or _LATEX_UNICODE.get(ch) or ch)
    return "".join(out).replace("\r\n", " ").replace("\n", " ")


def _label(value: Any) -> str:
    if isinstance(value, tuple):
        return " / ".join(str(v) for v in value if str(v) != "")
    return "" if value is None else str(value)


def _layout(frame: pd.DataFrame, index: bool) -> tuple[list[str], list[list[Any]], list[bool]]:
    """``(header, rows of raw values, numeric column flags)`` of ``frame`` (index first when ``index``)."""
    header = [_label(c) for c in frame.columns]
    rows = [list(r) for r in frame.itertuples(index=False, name=None)]
    if index:
        names = [_label(n) for n in frame.index.names]
        header = names + header
        keys = [k if isinstance(k, tuple) else (k,) for k in frame.index]
        rows = [list(k) + r for k, r in zip(keys, rows)]
    numeric = []
    for j in range(len(header)):
        column = [r[j] for r in rows if not _is_missing(r[j])]
        numeric.append(bool(column) and all(_is_number(v) for v in column))
    return header, rows, numeric


def _cell(value: Any, digits: int, missing: str) -> str:
    if _is_missing(value):
        return missing
    if _is_number(value):
        return format_number(value, digits)
    return str(value)


def table_latex(frame: pd.DataFrame, caption: str | None = None, *, index: bool = False, label: str | None = None,
                digits: int = 4) -> str:
    """``frame`` as a LaTeX ``booktabs`` tabular (``\\toprule`` / ``\\midrule`` / ``\\bottomrule``).

    With ``caption`` (or ``label``) the tabular is wrapped in a ``table`` float with ``\\caption`` (and
    ``\\label``). Missing values are ``--``; numeric columns are right-aligned, others left-aligned.
    """
    header, rows, numeric = _layout(frame, index)
    spec = "".join("r" if n else "l" for n in numeric) or "l"
    lines = [r"% \usepackage{booktabs}", rf"\begin{{tabular}}{{{spec}}}", r"\toprule"]
    lines.append(" & ".join(latex_escape(h) for h in header) + r" \\")
    lines.append(r"\midrule")
    for row in rows:
        cells = [latex_escape(_cell(v, digits, "--")) if not _is_missing(v) else "--" for v in row]
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    if caption is None and label is None:
        return "\n".join(lines) + "\n"
    body = [r"\begin{table}[htbp]", r"\centering"]
    if caption is not None:
        body.append(rf"\caption{{{latex_escape(caption)}}}")
    if label is not None:
        body.append(rf"\label{{{label}}}")
    return "\n".join([lines[0], *body, *lines[1:], r"\end{table}"]) + "\n"


def _md_escape(text: str) -> str:
    return str(text).replace("\r\n", " ").replace("\n", " ").replace("|", r"\|")


def table_markdown(frame: pd.DataFrame, *, index: bool = False, digits: int = 4) -> str:
    """``frame`` as a GitHub-flavoured Markdown table (numeric columns right-aligned, missing values empty)."""
    header, rows, numeric = _layout(frame, index)
    if not header:
        return ""
    head = [_md_escape(h) for h in header]
    body = [[_md_escape(_cell(v, digits, "")) for v in row] for row in rows]
    rule = ["---:" if n else "---" for n in numeric]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines) + "\n"
