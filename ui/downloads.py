"""Download buttons: every matrix and table as CSV (and, for a paper, LaTeX booktabs and Markdown, in a small
popover beside the CSV button), every figure as HTML, SVG and PDF.

The files are produced only when a button is clicked (``st.download_button`` with a callable), so
a slider move does not pay for serialising every figure. HTML embeds plotly.js (about 4.7 MB), so the
file opens offline. SVG and PDF (for a paper) come from ``kaleido``, which drives a headless
Chromium: the system's ``chromium`` (Debian's package) unless ``BROWSER_PATH`` names another;
without one, the buttons are replaced by a note. PNG export is the camera button in each figure's
modebar (``ui.figures.plotly_config``).
"""

from __future__ import annotations

import functools
import os
import re
import shutil

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from geometry.tables import table_latex, table_markdown
from ui.figures import plotly_config


def slug(text: str) -> str:
    """A file-name-safe version of ``text``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:120] or "figure"


def table_bytes(frame: pd.DataFrame, fmt: str, index: bool = False, caption: str | None = None) -> bytes:
    """``frame`` as ``csv``, ``tex`` (LaTeX booktabs, :func:`geometry.tables.table_latex`) or ``md`` (Markdown,
    :func:`geometry.tables.table_markdown`); ``index`` as in ``DataFrame.to_csv``."""
    if fmt == "csv":
        return frame.to_csv(index=index).encode()
    if fmt == "tex":
        return table_latex(frame, caption, index=index).encode()
    if fmt == "md":
        return table_markdown(frame, index=index).encode()
    raise ValueError(f"unknown table format {fmt!r}; expected csv, tex or md")


def _table_buttons(frame: pd.DataFrame, name: str, label: str, index: bool, key: str) -> None:
    """The CSV button, then a small popover holding the LaTeX and Markdown buttons (keys ``<key>_tex`` / ``_md``)."""
    st.download_button(
        f":material/download: {label}",
        lambda: table_bytes(frame, "csv", index),
        file_name=f"{slug(name)}.csv",
        mime="text/csv",
        key=key,
        on_click="ignore",
    )
    with st.popover(":material/table: LaTeX, Markdown", help="The same table for a paper: LaTeX (booktabs) or "
                    "Markdown"):
        for fmt, text, mime in (("tex", "LaTeX (booktabs)", "text/x-tex"), ("md", "Markdown", "text/markdown")):
            st.download_button(
                f":material/download: {text}",
                lambda fmt=fmt: table_bytes(frame, fmt, index, caption=name.replace("_", " ")),
                file_name=f"{slug(name)}.{fmt}",
                mime=mime,
                key=f"{key}_{fmt}",
                on_click="ignore",
            )


def csv_button(frame: pd.DataFrame, name: str, label: str = "CSV", index: bool = False, key: str | None = None):
    """A CSV download of ``frame``, with LaTeX and Markdown downloads of the same table in a popover beside it."""
    with st.container(horizontal=True, gap="small"):
        _table_buttons(frame, name, label, index, key or f"csv_{slug(name)}")


def chromium_path() -> str | None:
    """The browser kaleido drives: ``$BROWSER_PATH``, else the system ``chromium`` (or ``None``)."""
    return os.environ.get("BROWSER_PATH") or _which_chromium(os.environ.get("PATH", ""))


@functools.lru_cache(maxsize=4)
def _which_chromium(path: str) -> str | None:
    """``chromium`` on ``path`` (looked up once per ``$PATH``: every figure of every run asks)."""
    return shutil.which("chromium", path=path) or shutil.which("chromium-browser", path=path)


def figure_bytes(fig: go.Figure, fmt: str) -> bytes:
    """``fig`` as ``html`` (plotly.js embedded: opens offline), ``svg`` or ``pdf`` (kaleido + Chromium)."""
    if fig.layout.template is None or not fig.layout.template.to_plotly_json():  # built without one (ui.figures)
        fig = go.Figure(fig).update_layout(template="plotly_white")
    if fmt == "html":
        return fig.to_html(include_plotlyjs=True, full_html=True).encode()
    if fmt not in ("svg", "pdf"):
        raise ValueError(f"unknown figure format {fmt!r}; expected html, svg or pdf")
    browser = chromium_path()
    if browser is None:
        raise RuntimeError("SVG / PDF export needs Chromium (apt-get install chromium) or BROWSER_PATH")
    os.environ.setdefault("BROWSER_PATH", browser)
    width = fig.layout.width or 1000
    height = fig.layout.height or 600
    return fig.to_image(format=fmt, width=width, height=height)


def html_button(fig: go.Figure, name: str, key: str | None = None):
    st.download_button(
        ":material/download: HTML",
        lambda: figure_bytes(fig, "html"),
        file_name=f"{slug(name)}.html",
        mime="text/html",
        key=key or f"html_{slug(name)}",
        on_click="ignore",
    )


def show(
    fig: go.Figure,
    name: str,
    frame: pd.DataFrame | None = None,
    index: bool = False,
    key: str | None = None,
) -> None:
    """Draw ``fig`` themed like the app, with HTML (and CSV of ``frame``) download buttons under it."""
    key = key or slug(name)
    st.plotly_chart(fig, theme="streamlit", config=plotly_config(slug(name)), key=f"chart_{key}")
    with st.container(horizontal=True, gap="small"):
        html_button(fig, name, key=f"html_{key}")
        if chromium_path() is not None:
            for fmt, mime in (("svg", "image/svg+xml"), ("pdf", "application/pdf")):
                st.download_button(
                    f":material/download: {fmt.upper()}", lambda fmt=fmt: figure_bytes(fig, fmt),
                    file_name=f"{slug(name)}.{fmt}", mime=mime, key=f"{fmt}_{key}", on_click="ignore",
                )
        if frame is not None:
            _table_buttons(frame, name, "CSV", index, f"csv_{key}")
