"""Figure of the Anatomy page's rank section (pure: data in, ``go.Figure`` out), styled like :mod:`ui.figures`."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from ui import figures
from ui.figures import QUALITATIVE, _layer_dtick, _layout


def rank_suggestions(frame: pd.DataFrame, *, adapter: str, title: str, energy: float) -> go.Figure:
    """Per module kind, by layer: the rank that keeps ``energy`` of ``||tau||_F^2`` (solid), the knee (dotted)
    and the adapter's rank ``r`` (dashed grey); hover names adapter, layer and module.

    ``frame``: :func:`geometry.analysis.ranks.rank_table` rows (``layer``, ``kind``, ``module``, ``r``, the
    energy-rank column, ``knee``, ``hard threshold``)."""
    col = f"rank for {100 * energy:g}% energy"
    data = []
    for k_i, (kind, part) in enumerate(frame.groupby("kind", sort=False)):
        part = part.sort_values("layer")
        color = QUALITATIVE[k_i % len(QUALITATIVE)]
        for column, dash, label in ((col, "solid", f"{kind}: rank for {100 * energy:g}% energy"),
                                    ("knee", "dot", f"{kind}: knee")):
            data.append(dict(
                type="scatter", x=part["layer"].to_numpy(), y=part[column].to_numpy(), mode="lines+markers",
                name=label, line=dict(color=color, dash=dash), customdata=part[["module", "r", "hard threshold"]].to_numpy(),
                hovertemplate=(f"adapter: {adapter}<br>module: %{{customdata[0]}}<br>layer: %{{x}}<br>{label}: %{{y}}"
                               "<br>r: %{customdata[1]}<br>hard threshold: %{customdata[2]}<extra></extra>"),
            ))
    if len(frame):
        by_layer = frame.groupby("layer")["r"].max().sort_index()
        data.append(dict(type="scatter", x=by_layer.index.to_numpy(), y=by_layer.to_numpy(), mode="lines",
                         name="r (adapter's rank)", line=dict(color="#999999", dash="dash"),
                         hovertemplate=f"adapter: {adapter}<br>layer: %{{x}}<br>r: %{{y}}<extra></extra>"))
    dtick = _layer_dtick(frame["layer"] if len(frame) else [])
    axes = {"xaxis": dict(title=dict(text="layer"), **({"dtick": dtick} if dtick else {})),
            "yaxis": dict(title=dict(text="rank (singular directions)"), rangemode="tozero")}
    return figures.figure(data, _layout(title, 400, axes=axes))
