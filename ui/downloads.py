"""Download buttons: every matrix and table as CSV, every figure as a standalone HTML file.

The files are produced only when a button is clicked (``st.download_button`` with a callable), so
a slider move does not pay for serialising every figure. PNG export is the camera button in each
figure's modebar (``ui.figures.plotly_config``).
"""

from __future__ import annotations

import re

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from ui.figures import plotly_config


def slug(text: str) -> str:
    """A file-name-safe version of ``text``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:120] or "figure"


def csv_button(frame: pd.DataFrame, name: str, label: str = "CSV", index: bool = False, key: str | None = None):
    st.download_button(
        f":material/download: {label}",
        lambda: frame.to_csv(index=index).encode(),
        file_name=f"{slug(name)}.csv",
        mime="text/csv",
        key=key or f"csv_{slug(name)}",
        on_click="ignore",
    )


def html_button(fig: go.Figure, name: str, key: str | None = None):
    st.download_button(
        ":material/download: HTML",
        lambda: fig.to_html(include_plotlyjs="cdn", full_html=True).encode(),
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
        if frame is not None:
            csv_button(frame, name, index=index, key=f"csv_{key}")
