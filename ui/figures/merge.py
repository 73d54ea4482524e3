"""Figures of the Merge page (pure: data in, ``go.Figure`` out), styled like :mod:`ui.figures`.

Built as one spec each and validated once, like every builder in :mod:`ui.figures`.
"""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from ui import figures
from ui.figures import MARGIN, QUALITATIVE, _grid, _grid_axes

METRIC_NAMES = {"l2": "L2", "cosine": "cosine", "grassmann": "Grassmann"}


def _title(text: str) -> dict:
    return dict(text=text, x=0.0, xanchor="left")


def performance_bars(frame: pd.DataFrame, *, title: str, metric_label: str = "accuracy") -> go.Figure:
    """Per task: the fine-tuned adapter's score next to the merged model's (same task head).

    ``frame`` columns: ``task``, ``adapter``, ``finetuned``, ``merged``, ``normalized`` (%).
    """
    labels = [f"{t} ({a})" if t != a else t for t, a in zip(frame["task"], frame["adapter"])]
    data = [
        dict(type="bar", x=labels, y=frame[col].to_numpy(), name=name, marker=dict(color=color),
             customdata=frame["normalized"].to_numpy(),
             hovertemplate=f"%{{x}}<br>{name}: %{{y:.4f}} {metric_label}"
             + ("<br>merged / fine-tuned: %{customdata:.1f}%" if col == "merged" else "") + "<extra></extra>")
        for col, name, color in (("finetuned", "fine-tuned adapter", QUALITATIVE[0]),
                                 ("merged", "merged model", QUALITATIVE[1]))
    ]
    layout = dict(
        barmode="group", title=_title(title), margin=MARGIN, height=420,
        legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="right", x=1.0),
        yaxis=dict(title=dict(text=metric_label), rangemode="tozero"),
        xaxis=dict(title=dict(text="task (adapter)"), tickangle=-25, automargin=True),
    )
    return figures.figure(data, layout)


def correlation_lines(frame: pd.DataFrame, *, title: str) -> go.Figure:
    """Mean Spearman correlation (± std over tasks) against ``k`` for the last-``k``-layers selections.

    One line per metric, one panel per kind; ``frame`` is :func:`geometry.evaluation.merge_eval.correlation_study`.
    """
    last = frame[frame["layers"].str.startswith("last:")]
    kinds = list(dict.fromkeys(last["kind"]))
    cells, notes = _grid(1, max(1, len(kinds)), titles=[f"{k} projections" for k in kinds], hspace=0.05)
    metrics = list(dict.fromkeys(last["metric"]))
    data, x_extra = [], {}
    for c, kind in enumerate(kinds, start=1):
        for m_i, metric in enumerate(metrics):
            sub = last[(last["kind"] == kind) & (last["metric"] == metric)].sort_values("k")
            if sub.empty:
                continue
            name = METRIC_NAMES.get(metric, metric)
            data.append(dict(
                type="scatter", x=sub["k"].to_numpy(), y=sub["mean"].to_numpy(),
                error_y=dict(type="data", array=sub["std"].to_numpy(), visible=True, thickness=1),
                mode="lines+markers", name=name, legendgroup=name, showlegend=c == 1,
                line=dict(color=QUALITATIVE[m_i % len(QUALITATIVE)]),
                hovertemplate=f"{kind} · {name}<br>last %{{x}} layers<br>Spearman: %{{y:.3f}}<extra></extra>",
                xaxis=cells[(1, c)]["x"], yaxis=cells[(1, c)]["y"],
            ))
        x_extra[(1, c)] = dict(title=dict(text="k (last k layers averaged)"), dtick=1)
    axes = _grid_axes(cells, x_extra, {(1, 1): dict(title=dict(text="Spearman ρ(δ(i,·), T̄_d(i,·)), mean over tasks"))},
                      shared_y=True)
    # Legend below the panels: above them it covered the title and the subplot titles.
    layout = dict(title=_title(title), margin=dict(MARGIN, t=max(MARGIN["t"], 80)), height=460, annotations=notes,
                  legend=dict(orientation="h", yanchor="top", y=-0.22, xanchor="left", x=0.0), **axes)
    return figures.figure(data, layout)


def method_comparison(frame: pd.DataFrame, anps: dict[str, float], *, title: str) -> go.Figure:
    """Grouped bars: per task, each method's merged score as % of the fine-tuned adapter's; ANP last.

    ``frame`` columns: ``method``, ``task``, ``normalized`` (%); ``anps``: method -> ANP (%).
    """
    tasks = list(dict.fromkeys(frame["task"]))
    data = []
    for i, (method, part) in enumerate(frame.groupby("method", sort=False)):
        by_task = dict(zip(part["task"], part["normalized"]))
        data.append(dict(
            type="bar", x=[*tasks, "ANP (mean)"], y=[by_task.get(t) for t in tasks] + [anps.get(method)],
            name=str(method), marker=dict(color=QUALITATIVE[i % len(QUALITATIVE)]),
            hovertemplate=f"{method}<br>%{{x}}: %{{y:.1f}}% of fine-tuned<extra></extra>",
        ))
    layout = dict(
        barmode="group", title=_title(title), margin=dict(MARGIN, t=80), height=460,
        legend=dict(orientation="h", yanchor="top", y=-0.25, xanchor="left", x=0.0),
        yaxis=dict(title=dict(text="merged / fine-tuned score (%)"), rangemode="tozero"),
        xaxis=dict(title=dict(text="task (with its own head)"), tickangle=-25, automargin=True),
        # the fine-tuned level, 100 %: a dotted line across the plot, labelled on the left
        shapes=[dict(type="line", xref="x domain", x0=0, x1=1, yref="y", y0=100, y1=100,
                     line=dict(dash="dot", color="gray"))],
        annotations=[dict(text="fine-tuned", xref="x domain", x=0, yref="y", y=100, xanchor="left",
                          yanchor="bottom", showarrow=False)],
    )
    return figures.figure(data, layout)


def advice_scatter(table: pd.DataFrame, *, criterion: str) -> go.Figure:
    """The advisor's check: each candidate's label-free criterion (x, lower is better) against its measured ANP
    (y), one colour per method, the recommended candidate (rank 1) ringed; hover names the candidate."""
    names = {"js": "mean JS divergence to the fine-tuned models (nats)", "kl": "mean KL divergence (nats)",
             "entropy": "mean entropy of the merged predictions (nats)"}
    data = []
    for i, (method, sub) in enumerate(table.groupby("method", sort=False)):
        data.append(dict(
            type="scatter", mode="markers", x=sub["criterion"].to_numpy(), y=sub["anp"].to_numpy(), name=str(method),
            text=sub["candidate"].tolist(), customdata=sub["rank"].to_numpy(),
            marker=dict(size=9, color=QUALITATIVE[i % len(QUALITATIVE)]),
            hovertemplate="%{text}<br>rank %{customdata}<br>" + criterion + ": %{x:.4g}<br>ANP: %{y:.2f}%<extra></extra>"))
    best = table.iloc[0]
    data.append(dict(type="scatter", mode="markers", x=[best["criterion"]], y=[best["anp"]], name="recommended",
                     text=[best["candidate"]], marker=dict(size=18, color="rgba(0,0,0,0)", line=dict(width=2, color="black")),
                     hovertemplate="recommended: %{text}<extra></extra>"))
    layout = dict(title=_title("Label-free criterion against measured ANP, one point per candidate merge"),
                  margin=MARGIN, height=440, xaxis=dict(title=dict(text=names.get(criterion, criterion))),
                  yaxis=dict(title=dict(text="ANP on the test labels (%)")),
                  legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="right", x=1.0))
    return figures.figure(data, layout)
