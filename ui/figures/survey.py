"""Figures of the Survey page for N in the hundreds: the heatmap draws no per-cell text and no tick per adapter beyond ``TICKS_UP_TO``."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go

from ui import figures
from ui.figures import MATRIX_HEIGHT, QUALITATIVE, SEQUENTIAL, _layout, off_diagonal_range, short_name

#: Beyond this many adapters the heatmap hides its tick labels (the hover names both adapters).
TICKS_UP_TO = 60


def survey_heatmap(values: np.ndarray, names: Sequence[str], *, title: str, value_label: str,
                   detail: str = "") -> go.Figure:
    """Adapter x adapter heatmap (already ordered); NaN cells are left empty and named as undefined in the hover."""
    values = np.asarray(values, dtype=float)
    names = [str(n) for n in names]
    lo, hi = off_diagonal_range(values)
    text = np.where(np.isfinite(values), "", "undefined (NaN)")
    hover = ("adapter: %{y}<br>adapter: %{x}<br>" + value_label + ": %{z:.4g}%{text}"
             + (f"<br>{detail}" if detail else "") + "<extra></extra>")
    trace = dict(type="heatmap", z=values, x=names, y=names, text=text, hovertemplate=hover, colorscale=SEQUENTIAL,
                 zmin=lo, zmax=hi, colorbar=dict(title=dict(text=value_label, side="right")), hoverongaps=True)
    show = len(names) <= TICKS_UP_TO
    ticks = dict(tickmode="array", tickvals=names, ticktext=[short_name(n) for n in names], tickfont=dict(size=9)) \
        if show else dict(showticklabels=False, ticks="")
    n = len(names)
    axes = {
        "xaxis": dict(ticks, type="category", tickangle=-50,
                      title=dict(text="adapter (hierarchical-clustering order)")),
        "yaxis": dict(ticks, type="category", autorange="reversed",
                      title=dict(text="adapter (hierarchical-clustering order)")),
    }
    height = max(MATRIX_HEIGHT, min(900, 14 * n + 200)) if show else 760
    return figures.figure([trace], _layout(title, height, axes=axes))


def survey_scatter(coords: np.ndarray, names: Sequence[str], groups: Sequence[str], *, title: str, method: str,
                   group_label: str = "base", detail: str = "") -> go.Figure:
    """WebGL 2-D map of the adapters (``scattergl``), one trace per group (colour), hover naming each adapter."""
    coords = np.asarray(coords, dtype=float).reshape(-1, 2)
    names = [str(n) for n in names]
    data = []
    for k, group in enumerate(dict.fromkeys(groups)):
        idx = [i for i, g in enumerate(groups) if g == group]
        data.append(dict(
            type="scattergl", mode="markers", name=short_name(str(group), 40), x=coords[idx, 0], y=coords[idx, 1],
            text=[names[i] for i in idx], marker=dict(size=8, color=QUALITATIVE[k % len(QUALITATIVE)], opacity=0.85,
                                                      line=dict(width=0.5, color="#333")),
            hovertemplate=(f"adapter: %{{text}}<br>{group_label}: {group}<br>{method} 1: %{{x:.3g}}<br>"
                           f"{method} 2: %{{y:.3g}}" + (f"<br>{detail}" if detail else "") + "<extra></extra>"),
        ))
    axes = {"xaxis": dict(title=dict(text=f"{method} component 1 (arbitrary units)"), zeroline=False),
            "yaxis": dict(title=dict(text=f"{method} component 2 (arbitrary units)"), zeroline=False)}
    return figures.figure(data, _layout(title, 620, axes=axes, showlegend=True))
