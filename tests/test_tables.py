"""Tables for papers (``geometry.tables``): LaTeX booktabs and Markdown from a DataFrame, and the dashboard's
``ui.downloads.table_bytes`` that offers them beside every CSV."""

from __future__ import annotations

import math
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

from geometry.tables import format_number, latex_escape, table_latex, table_markdown


def body_rows(tex: str) -> list[str]:
    """The rows between ``\\midrule`` and ``\\bottomrule``."""
    lines = tex.splitlines()
    return lines[lines.index(r"\midrule") + 1:lines.index(r"\bottomrule")]


def column_spec(tex: str) -> str:
    line = next(line for line in tex.splitlines() if line.startswith(r"\begin{tabular}"))
    return line.removeprefix(r"\begin{tabular}{").removesuffix("}")


# ------------------------------------------------------------------------------------------------ format_number
@pytest.mark.parametrize("value, text", [
    (3, "3"),
    (np.int64(-42), "-42"),
    (2.0, "2"),
    (100.0, "100"),
    (0.0, "0"),
    (-0.0, "0"),
    (1e-5, "1.000e-05"),
    (-2.5e-7, "-2.500e-07"),
    (3.14159265, "3.142"),
    (0.5, "0.5000"),
    (0.000123456, "0.0001235"),
    (12.3456, "12.35"),
    (-3.14159, "-3.142"),
    (12345.678, "12346"),
    (np.float32(0.25), "0.2500"),
    (math.inf, "inf"),
    (-math.inf, "-inf"),
])
def test_format_number(value, text):
    assert format_number(value) == text


def test_format_number_digits():
    assert format_number(math.pi, digits=2) == "3.1"
    assert format_number(math.pi, digits=6) == "3.14159"
    assert format_number(1e-5, digits=2) == "1.0e-05"


# ------------------------------------------------------------------------------------------------ LaTeX
@pytest.mark.parametrize("text, escaped", [
    ("a & b", r"a \& b"),
    ("50%", r"50\%"),
    ("x_y", r"x\_y"),
    ("#1", r"\#1"),
    ("$5", r"\$5"),
    ("{z}", r"\{z\}"),
    ("~", r"\textasciitilde{}"),
    ("^", r"\textasciicircum{}"),
    ("a\\b", r"a\textbackslash{}b"),
    ("α", r"$\alpha$"),
    ("τ", r"$\tau$"),
    ("Δ", r"$\Delta$"),
    ("‖τ‖", r"$\|$$\tau$$\|$"),
    ("a ≥ b", r"a $\geq$ b"),
    ("two\nlines", "two lines"),
])
def test_latex_escape(text, escaped):
    assert latex_escape(text) == escaped


def test_table_latex_escapes_cells_and_headers_nan_and_alignment():
    frame = pd.DataFrame({"name_of": ["a&b", "50%", "‖τ‖_F"], "score %": [0.5, np.nan, 12.3456],
                          "n": [1, 2, 3], "note": ["x", None, "#y"]})
    tex = table_latex(frame)
    assert tex.startswith(r"% \usepackage{booktabs}") and r"\begin{table}" not in tex
    assert column_spec(tex) == "lrrl"  # numbers right, text left
    assert r"name\_of & score \% & n & note \\" in tex
    lines = tex.splitlines()
    assert lines.index(r"\toprule") < lines.index(r"\midrule") < lines.index(r"\bottomrule")
    assert lines[-1] == r"\end{tabular}"
    assert body_rows(tex) == [
        r"a\&b & 0.5000 & 1 & x \\",
        r"50\% & -- & 2 & -- \\",
        r"$\|$$\tau$$\|$\_F & 12.35 & 3 & \#y \\",
    ]


def test_table_latex_every_special_character_in_a_cell():
    tex = table_latex(pd.DataFrame({"s": ["& % _ # $ { } ~ ^ \\"]}))
    assert body_rows(tex) == [
        r"\& \% \_ \# \$ \{ \} \textasciitilde{} \textasciicircum{} \textbackslash{} \\"]


def test_table_latex_index_first_and_caption_float():
    frame = pd.DataFrame({"d": [0.1, 0.25]}, index=pd.Index(["mrpc", "stsb"], name="adapter_name"))
    tex = table_latex(frame, index=True)
    assert r"adapter\_name & d \\" in tex and column_spec(tex) == "lr"
    assert body_rows(tex) == [r"mrpc & 0.1000 \\", r"stsb & 0.2500 \\"]
    assert "mrpc" not in table_latex(frame)  # index=False: the index is left out, as in to_csv(index=False)
    multi = frame.set_index(pd.MultiIndex.from_tuples([("a", 1), ("b", 2)], names=["task", "seed"]))
    tex = table_latex(multi, index=True)
    assert r"task & seed & d \\" in tex and column_spec(tex) == "lrr"
    floated = table_latex(frame, "Distances & 50% of it", index=True, label="tab:d")
    lines = floated.splitlines()
    assert lines[1] == r"\begin{table}[htbp]" and lines[-1] == r"\end{table}"
    assert r"\caption{Distances \& 50\% of it}" in lines and r"\label{tab:d}" in lines
    assert lines.index(r"\caption{Distances \& 50\% of it}") < lines.index(r"\begin{tabular}{lr}")
    assert r"\begin{table}" in table_latex(frame, label="tab:only")


def test_table_latex_multiindex_columns_are_joined():
    frame = pd.DataFrame([[1.0, 2.0]], columns=pd.MultiIndex.from_tuples([("q", "cos"), ("v", "cos")]))
    assert r"q / cos & v / cos \\" in table_latex(frame)


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex is not installed")
def test_table_latex_compiles(tmp_path):
    frame = pd.DataFrame({"adapter_name": ["a&b", "‖τ‖ ≥ 50%", "x^2 ~ {y}", "back\\slash #1 $"],
                          "value": [0.5, np.nan, 1e-5, math.inf]}).set_index("adapter_name")
    table = table_latex(frame, "Caption with _ & %", index=True, label="tab:t")
    doc = ("\\documentclass{article}\n\\usepackage[utf8]{inputenc}\n\\usepackage{booktabs}\n"
           f"\\begin{{document}}\n{table}\\end{{document}}\n")
    (tmp_path / "t.tex").write_text(doc, encoding="utf-8")
    run = subprocess.run([shutil.which("pdflatex"), "-interaction=nonstopmode", "-halt-on-error", "t.tex"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-3000:]
    assert (tmp_path / "t.pdf").stat().st_size > 0


# ------------------------------------------------------------------------------------------------ Markdown
def test_table_markdown_escapes_pipes_nan_empty_and_separator_row():
    frame = pd.DataFrame({"a|b": ["x|y", None, "two\nlines"], "n": [1.23456, np.nan, 3]})
    lines = table_markdown(frame).splitlines()
    assert lines == [
        r"| a\|b | n |",
        "| --- | ---: |",
        r"| x\|y | 1.235 |",
        "|  |  |",
        "| two lines | 3 |",
    ]


def test_table_markdown_index_and_empty_frame():
    frame = pd.DataFrame({"d": [0.5]}, index=pd.Index(["mrpc"], name="adapter"))
    assert table_markdown(frame, index=True).splitlines() == ["| adapter | d |", "| --- | ---: |", "| mrpc | 0.5000 |"]
    assert table_markdown(pd.DataFrame()) == ""


# ------------------------------------------------------------------------------------------------ downloads
def test_table_bytes_csv_tex_md():
    from ui.downloads import table_bytes

    frame = pd.DataFrame({"x_y": [1.5, np.nan]}, index=pd.Index(["a", "b"], name="name"))
    assert table_bytes(frame, "csv") == frame.to_csv(index=False).encode()
    assert table_bytes(frame, "csv", index=True) == frame.to_csv(index=True).encode()
    tex = table_bytes(frame, "tex", index=True, caption="my table").decode()
    assert tex == table_latex(frame, "my table", index=True) and r"\caption{my table}" in tex
    assert table_bytes(frame, "tex").decode() == table_latex(frame)
    assert table_bytes(frame, "md", index=True).decode() == table_markdown(frame, index=True)
    with pytest.raises(ValueError, match="unknown table format 'xlsx'"):
        table_bytes(frame, "xlsx")
