"""Figures of the Merge page (pure: data in, ``go.Figure`` out), styled like :mod:`ui.figures`."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ui.figures import MARGIN, QUALITATIVE

METRIC_NAMES = {"l2": "L2", "cosine": "cosine", "grassmann": "Grassmann"}


def performance_bars(frame: pd.DataFrame, *, title: str, metric_label: str = "accuracy") -> go.Figure:
    """Per task: the fine-tuned adapter's score next to the merged model's (same task head).

    ``frame`` columns: ``task``, ``adapter``, ``finetuned``, ``merged``, ``normalized`` (%).
    """
    labels = [f"{t} ({a})" if t != a else t for t, a in zip(frame["task"], frame["adapter"])]
    fig = go.Figure()
    for col, name, color in (("finetuned", "fine-tuned adapter", QUALITATIVE[0]), ("merged", "merged model", QUALITATIVE[1])):
        fig.add_trace(go.Bar(
            x=labels, y=frame[col], name=name, marker_color=color,
            customdata=frame["normalized"],
            hovertemplate=f"%{{x}}<br>{name}: %{{y:.4f}} {metric_label}"
            + ("<br>merged / fine-tuned: %{customdata:.1f}%" if col == "merged" else "") + "<extra></extra>",
        ))
    fig.update_layout(barmode="group", title=dict(text=title, x=0.0, xanchor="left"), margin=MARGIN, height=420,
                      legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="right", x=1.0))
    fig.update_yaxes(title_text=metric_label, rangemode="tozero")
    fig.update_xaxes(title_text="task (adapter)", tickangle=-25, automargin=True)
    return fig


def correlation_lines(frame: pd.DataFrame, *, title: str) -> go.Figure:
    """Mean Spearman correlation (± std over tasks) against ``k`` for the last-``k``-layers selections.

    One line per metric, one panel per kind; ``frame`` is :func:`geometry.merge_eval.correlation_study`.
    """
    last = frame[frame["layers"].str.startswith("last:")]
    kinds = list(dict.fromkeys(last["kind"]))
    fig = make_subplots(rows=1, cols=max(1, len(kinds)), shared_yaxes=True, horizontal_spacing=0.05,
                        subplot_titles=[f"{k} projections" for k in kinds])
    metrics = list(dict.fromkeys(last["metric"]))
    for c, kind in enumerate(kinds, start=1):
        for m_i, metric in enumerate(metrics):
            sub = last[(last["kind"] == kind) & (last["metric"] == metric)].sort_values("k")
            if sub.empty:
                continue
            name = METRIC_NAMES.get(metric, metric)
            fig.add_trace(go.Scatter(
                x=sub["k"], y=sub["mean"], error_y=dict(type="data", array=sub["std"], visible=True, thickness=1),
                mode="lines+markers", name=name, legendgroup=name, showlegend=c == 1,
                line=dict(color=QUALITATIVE[m_i % len(QUALITATIVE)]),
                hovertemplate=f"{kind} · {name}<br>last %{{x}} layers<br>Spearman: %{{y:.3f}}<extra></extra>",
            ), row=1, col=c)
        fig.update_xaxes(title_text="k (last k layers averaged)", dtick=1, row=1, col=c)
    fig.update_yaxes(title_text="Spearman ρ(δ(i,·), T̄_d(i,·)), mean over tasks", row=1, col=1)
    # Legend below the panels: above them it covered the title and the subplot titles.
    fig.update_layout(title=dict(text=title, x=0.0, xanchor="left"), margin=dict(MARGIN, t=max(MARGIN["t"], 80)),
                      height=460, legend=dict(orientation="h", yanchor="top", y=-0.22, xanchor="left", x=0.0))
    return fig


def method_comparison(frame: pd.DataFrame, anps: dict[str, float], *, title: str) -> go.Figure:
    """Grouped bars: per task, each method's merged score as % of the fine-tuned adapter's; ANP last.

    ``frame`` columns: ``method``, ``task``, ``normalized`` (%); ``anps``: method -> ANP (%).
    """
    fig = go.Figure()
    tasks = list(dict.fromkeys(frame["task"]))
    for i, (method, part) in enumerate(frame.groupby("method", sort=False)):
        by_task = dict(zip(part["task"], part["normalized"]))
        xs = [*tasks, "ANP (mean)"]
        ys = [by_task.get(t) for t in tasks] + [anps.get(method)]
        fig.add_trace(go.Bar(
            x=xs, y=ys, name=str(method), marker_color=QUALITATIVE[i % len(QUALITATIVE)],
            hovertemplate=f"{method}<br>%{{x}}: %{{y:.1f}}% of fine-tuned<extra></extra>",
        ))
    fig.add_hline(y=100, line_dash="dot", line_color="gray", annotation_text="fine-tuned", annotation_position="top left")
    fig.update_layout(barmode="group", title=dict(text=title, x=0.0, xanchor="left"), margin=dict(MARGIN, t=80),
                      height=460, legend=dict(orientation="h", yanchor="top", y=-0.25, xanchor="left", x=0.0))
    fig.update_yaxes(title_text="merged / fine-tuned score (%)", rangemode="tozero")
    fig.update_xaxes(title_text="task (with its own head)", tickangle=-25, automargin=True)
    return fig
