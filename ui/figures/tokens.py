"""Figures of the Token dynamics page (pure: data in, ``go.Figure`` out): token projections, per-layer curves, the particle model."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from ui.figures import QUALITATIVE, _figure, _grid, _grid_axes, _layer_dtick, _layout

BASE_COLOR = "#7f7f7f"


PERTURBED_COLOR = "#ff7f0e"


#: Panels of the per-layer figure: (title, base column or None, adapted column, y-axis label).
PANELS = (
    ("Clusters per layer", "clusters_base", "clusters_adapted", "clusters (count)"),
    ("Base vs adapted: when do they separate?", None, "distance", "mean cosine distance (1 − cos)"),
    ("Do the tokens collapse?", "pairwise_cosine_base", "pairwise_cosine_adapted", "mean pairwise cosine"),
)


def _color(i: int) -> str:
    return QUALITATIVE[i % len(QUALITATIVE)]


def _padded_range(values: np.ndarray, pad: float = 0.12) -> list[float]:
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if not len(values):
        return [-1.0, 1.0]
    lo, hi = float(values.min()), float(values.max())
    span = hi - lo if hi > lo else max(abs(hi), 1.0)
    return [lo - pad * span, hi + pad * span]


def _projection_traces(groups: dict, adapter: str, layer: int, color: str) -> list[dict]:
    """Traces of one layer; ``groups``: the points' rows by ``(model, layer)`` (one groupby for all frames)."""
    empty = next(iter(groups.values())).iloc[:0]
    base = groups.get(("base", layer), empty)
    ad = groups.get((adapter, layer), empty)
    seg_x, seg_y = [], []
    for (bx, by), (ax, ay) in zip(base[["x", "y"]].to_numpy(), ad[["x", "y"]].to_numpy()):
        seg_x += [bx, ax, None]
        seg_y += [by, ay, None]

    def trace(frame: pd.DataFrame, name: str, c: str, symbol: str, where: str) -> dict:
        return dict(
            type="scatter", x=frame["x"].to_numpy(), y=frame["y"].to_numpy(), mode="markers+text", name=name,
            text=frame["token"].tolist(), textposition=where, textfont=dict(size=11, color=c),
            marker=dict(size=10, color=c, symbol=symbol, line=dict(width=1, color="#444")),
            customdata=frame["token_index"].to_numpy(),
            hovertemplate=(f"token %{{customdata}}: %{{text}}<br>model: {name}<br>layer: {layer}"
                           "<br>PC 1: %{x:.3g}<br>PC 2: %{y:.3g}<extra></extra>"),
            cliponaxis=False)

    return [
        dict(type="scatter", x=seg_x, y=seg_y, mode="lines", name="same token, base → adapted",
             line=dict(color="rgba(127,127,127,0.45)", width=1), hoverinfo="skip"),
        trace(base, "base", BASE_COLOR, "circle", "bottom center"),
        trace(ad, adapter, color, "diamond", "top center"),
    ]


def projection_figure(dyn, adapter: str, layer: int, color: str = QUALITATIVE[1]) -> go.Figure:
    """The tokens of the base and of ``adapter`` in the shared PCA plane, one animation frame per layer
    (play button and slider in the figure; ``layer`` is the frame shown first)."""
    points = dyn.points[dyn.points["model"].isin(["base", adapter])]
    layers = dyn.layers
    ev = dyn.pca.explained * 100
    pcs = "unit-normalised states" if dyn.pca.normalize else "raw states"
    groups = {key: part for key, part in points.groupby(["model", "layer"], sort=False)}
    frames = [dict(name=str(ly), data=_projection_traces(groups, adapter, ly, color),
                   layout=dict(title=dict(text=f"Tokens in the shared PCA plane · layer {ly}"))) for ly in layers]
    slider = dict(
        active=layers.index(layer), x=0.1, len=0.9, y=-0.16, yanchor="top", pad=dict(t=10),
        currentvalue=dict(prefix="layer ", font=dict(size=13)),
        steps=[dict(label=str(ly), method="animate",
                    args=[[str(ly)], dict(mode="immediate", frame=dict(duration=0, redraw=False),
                                          transition=dict(duration=0))]) for ly in layers])
    play = dict(type="buttons", direction="left", x=0.0, y=-0.16, xanchor="left", yanchor="top", showactive=False,
                pad=dict(t=40),
                buttons=[dict(label="▶", method="animate",
                              args=[None, dict(frame=dict(duration=700, redraw=False), fromcurrent=True,
                                               transition=dict(duration=300))]),
                         dict(label="❚❚", method="animate",
                              args=[[None], dict(mode="immediate", frame=dict(duration=0, redraw=False))])])
    axes = {
        "xaxis": dict(title=dict(text=f"PC 1 ({ev[0]:.0f} % of variance; {pcs}, no unit)"),
                      range=_padded_range(points["x"]), zeroline=False),
        "yaxis": dict(title=dict(text=f"PC 2 ({ev[1]:.0f} % of variance, no unit)"),
                      range=_padded_range(points["y"]), zeroline=False),
    }
    special = "special tokens included" if dyn.include_special else "special tokens left out"
    layout = _layout(
        f"Tokens in the shared PCA plane · layer {layer}\nbase (grey circles) vs {adapter} (diamonds) · one PCA fitted "
        f"on every layer of the base and of all {len(dyn.adapters)} adapter(s) · {special}",
        720, legend_below=0.42, axes=axes, sliders=[slider], updatemenus=[play])
    layout["margin"]["b"] = 210
    return _figure(_projection_traces(groups, adapter, layer, color), layout, frames=frames)


def _panel_traces(frame: pd.DataFrame, names: Sequence[str], cells: dict, value: str = "value",
                  band: tuple[str, str] | None = None) -> list[dict]:
    """Lines per layer for each (panel, series) of a long frame with columns ``panel, series, layer, value``."""
    data = []
    for c, (title, base_col, ad_col, label) in enumerate(PANELS, start=1):
        cell = cells[(1, c)]
        series = ([("base", base_col, BASE_COLOR, "dash")] if base_col else []) + [
            (n, ad_col, _color(i), "solid") for i, n in enumerate(names)]
        for name, col, color, dash in series:
            sub = frame[(frame["metric"] == col) & (frame["adapter"] == (names[0] if name == "base" else name))]
            sub = sub.sort_values("layer")
            if sub.empty:
                continue
            x, y = sub["layer"].to_numpy(), sub[value].to_numpy(dtype=float)
            if band is not None:
                lo, hi = sub[band[0]].to_numpy(dtype=float), sub[band[1]].to_numpy(dtype=float)
                ok = np.isfinite(lo) & np.isfinite(hi)
                if ok.any():
                    data.append(dict(
                        type="scatter", x=np.concatenate([x[ok], x[ok][::-1]]), y=np.concatenate([hi[ok], lo[ok][::-1]]),
                        fill="toself", fillcolor=_rgba(color, 0.18), line=dict(width=0), mode="lines",
                        name=f"{name} band", legendgroup=name, showlegend=False, hoverinfo="skip",
                        xaxis=cell["x"], yaxis=cell["y"]))
            extra = ""
            if band is not None:
                extra = f"<br>{band[0]}–{band[1]}: %{{customdata[0]:.4g}} – %{{customdata[1]:.4g}}<br>texts: %{{customdata[2]}}"
            custom = (np.stack([sub[band[0]], sub[band[1]], sub["n"]], axis=1) if band is not None else None)
            data.append(dict(
                type="scatter", x=x, y=y, mode="lines+markers", name=name, legendgroup=name,
                showlegend=c == 1,  # the first panel has every series
                line=dict(color=color, dash=dash), marker=dict(size=6),
                hovertemplate=f"{name}<br>layer: %{{x}}<br>{label}: %{{y:.4g}}{extra}<extra>{title}</extra>",
                **({"customdata": custom} if custom is not None else {}),
                xaxis=cell["x"], yaxis=cell["y"]))
    return data


def _rgba(hex_color: str, alpha: float) -> str:
    h = hex_color.lstrip("#")
    r, g, b = (int(h[i:i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


def _long(table: pd.DataFrame) -> pd.DataFrame:
    from geometry.analysis.tokens import METRICS

    return table.melt(id_vars=["adapter", "layer"], value_vars=list(METRICS), var_name="metric", value_name="value")


def _curves_figure(data: list[dict], cells: dict, notes: list[dict], layers: Sequence[int], title: str) -> go.Figure:
    dtick = _layer_dtick(layers)
    x_extra = {rc: dict(title=dict(text="layer (0 = embeddings)"), **({"dtick": dtick} if dtick else {}))
               for rc in cells}
    y_extra = {(1, c): dict(title=dict(text=p[3]), **({"rangemode": "tozero"} if c == 2 else {}))
               for c, p in enumerate(PANELS, start=1)}
    axes = _grid_axes(cells, x_extra, y_extra)
    return _figure(data, _layout(title, 440, legend_below=0.3, axes=axes, annotations=notes))


def layer_curves(table: pd.DataFrame, *, title: str) -> go.Figure:
    """Per-layer measures of one text: clusters, base-vs-adapted distance, pairwise cosine; one line per
    adapter (solid) and the base (grey, dashed). NaN (undefined) leaves a gap."""
    names = list(dict.fromkeys(table["adapter"]))
    cells, notes = _grid(1, 3, titles=[p[0] for p in PANELS], hspace=0.08)
    data = _panel_traces(_long(table), names, cells)
    return _curves_figure(data, cells, notes, table["layer"].unique(), title)


def batch_curves(summary: pd.DataFrame, *, title: str) -> go.Figure:
    """The batch means of the per-layer measures with a band of ± one standard deviation over the texts."""
    s = summary.copy()
    s["lo"], s["hi"] = s["mean"] - s["std"], s["mean"] + s["std"]
    s = s.rename(columns={"mean": "value"})
    names = list(dict.fromkeys(s["adapter"]))
    cells, notes = _grid(1, 3, titles=[p[0] for p in PANELS], hspace=0.08)
    data = _panel_traces(s, names, cells, band=("lo", "hi"))
    return _curves_figure(data, cells, notes, s["layer"].unique(), title)


def frame_steps(steps: int, max_frames: int = 60) -> list[int]:
    """At most ``max_frames`` evenly spaced steps from 0 to ``steps`` (both included)."""
    return sorted({int(round(s)) for s in np.linspace(0, steps, min(max_frames, steps + 1))})


def _sphere_wire(n: int = 9) -> list[dict]:
    lines = []
    t = np.linspace(0, 2 * math.pi, 61)
    for lat in np.linspace(-math.pi / 2, math.pi / 2, n)[1:-1]:
        lines.append((np.cos(lat) * np.cos(t), np.cos(lat) * np.sin(t), np.full_like(t, np.sin(lat))))
    for lon in np.linspace(0, math.pi, n // 2 + 1)[:-1]:
        lines.append((np.cos(t) * np.cos(lon), np.cos(t) * np.sin(lon), np.sin(t)))
    xs, ys, zs = [], [], []
    for x, y, z in lines:
        xs += [*x, None]
        ys += [*y, None]
        zs += [*z, None]
    return [dict(type="scatter3d", x=xs, y=ys, z=zs, mode="lines", line=dict(color="rgba(120,120,120,0.55)", width=2),
                 hoverinfo="skip", showlegend=False, name="sphere")]


def particle_animation(run, max_frames: int = 41) -> go.Figure | None:
    """Both trajectories on the circle (d = 2) or the sphere (d = 3), one frame per shown step; ``None`` for d > 3."""
    d = run.base.shape[2]
    if d not in (2, 3):
        return None
    steps = frame_steps(len(run.times) - 1, max_frames)
    idx = np.arange(run.base.shape[1])

    def points(step: int) -> list[dict]:
        out = []
        for name, arr, color, symbol in (("base", run.base, BASE_COLOR, "circle-open"),
                                         ("LoRA-perturbed", run.perturbed, PERTURBED_COLOR, "diamond")):
            big = symbol == "circle-open"  # open and larger: a base point stays visible under its twin
            x = arr[step]
            hover = f"token %{{customdata}}<br>{name}<br>t = {run.times[step]:.3g}<extra></extra>"
            if d == 2:
                out.append(dict(type="scatter", x=x[:, 0], y=x[:, 1], mode="markers", name=name, customdata=idx,
                                marker=dict(size=13 if big else 8, color=color, symbol=symbol, opacity=0.9,
                                            line=dict(width=2 if big else 0.5, color=color if big else "#444")),
                                hovertemplate=hover))
            else:
                out.append(dict(type="scatter3d", x=x[:, 0], y=x[:, 1], z=x[:, 2], mode="markers", name=name,
                                customdata=idx, marker=dict(size=7 if big else 4, color=color, symbol=symbol,
                                                            opacity=0.9),
                                hovertemplate=hover))
        return out

    if d == 2:
        t = np.linspace(0, 2 * math.pi, 181)
        static = [dict(type="scatter", x=np.cos(t), y=np.sin(t), mode="lines", hoverinfo="skip", showlegend=False,
                       line=dict(color="rgba(150,150,150,0.5)", width=1), name="unit circle")]
    else:
        static = _sphere_wire()
    n_static = len(static)
    redraw = d == 3
    frames = [dict(name=str(s), data=points(s), traces=[n_static, n_static + 1],
                   layout=dict(title=dict(text=f"Particles on the {'circle' if d == 2 else 'sphere'} · t = "
                                               f"{run.times[s]:.3g}"))) for s in steps]
    slider = dict(
        active=0, x=0.1, len=0.9, y=-0.16 if d == 2 else 0.0, yanchor="top", pad=dict(t=10), font=dict(size=9),
        currentvalue=dict(prefix="t = ", font=dict(size=13)),
        steps=[dict(label=f"{run.times[s]:.3g}", method="animate",
                    args=[[str(s)], dict(mode="immediate", frame=dict(duration=0, redraw=redraw),
                                         transition=dict(duration=0))]) for s in steps])
    play = dict(type="buttons", direction="left", x=0.0, y=-0.16 if d == 2 else 0.0, xanchor="left", yanchor="top",
                showactive=False, pad=dict(t=40),
                buttons=[dict(label="▶", method="animate",
                              args=[None, dict(frame=dict(duration=120, redraw=redraw), fromcurrent=True,
                                               transition=dict(duration=0))]),
                         dict(label="❚❚", method="animate",
                              args=[[None], dict(mode="immediate", frame=dict(duration=0, redraw=redraw))])])
    p = run.params
    title = (f"Particles on the {'circle' if d == 2 else 'sphere'} · t = 0\n"
             f"n = {p['n']}, β = {p['beta']:g}, LoRA rank {p['rank']}, strength ε = {p['strength']:g}, seed {p['seed']} · "
             "same initial points for both")
    if d == 2:
        axes = {"xaxis": dict(title=dict(text="x₁ (unit sphere, no unit)"), range=[-1.25, 1.25], zeroline=False),
                "yaxis": dict(title=dict(text="x₂ (no unit)"), range=[-1.25, 1.25], zeroline=False,
                              scaleanchor="x", scaleratio=1)}
        layout = _layout(title, 760, legend_below=0.42, axes=axes, sliders=[slider], updatemenus=[play])
    else:
        layout = _layout(title, 760, legend_below=0.26, axes={}, sliders=[slider], updatemenus=[play],
                         scene=dict(domain=dict(x=[0, 1], y=[0.05, 1]),xaxis=dict(title="x₁", range=[-1.1, 1.1]), yaxis=dict(title="x₂", range=[-1.1, 1.1]),
                                    zaxis=dict(title="x₃", range=[-1.1, 1.1]), aspectmode="cube"))
    layout["margin"]["b"] = 210 if d == 2 else 190
    return _figure(static + points(0), layout, frames=frames)


def particle_curves(run) -> go.Figure:
    """Cluster counts of both trajectories over time, and their mean geodesic distance with the separation
    threshold δ and the separation time."""
    t = run.table
    cells, notes = _grid(1, 2, titles=["Clusters over time", "Base vs perturbed: mean geodesic distance"], hspace=0.1)
    data = []
    for name, col, color, dash in (("base", "clusters_base", BASE_COLOR, "dash"),
                                   ("LoRA-perturbed", "clusters_perturbed", PERTURBED_COLOR, "solid")):
        data.append(dict(type="scatter", x=t["time"].to_numpy(), y=t[col].to_numpy(), mode="lines", name=name,
                         line=dict(color=color, dash=dash, shape="hv"), legendgroup=name, xaxis="x", yaxis="y",
                         hovertemplate=f"{name}<br>t = %{{x:.3g}}<br>clusters: %{{y}}<extra></extra>"))
    data.append(dict(type="scatter", x=t["time"].to_numpy(), y=t["distance"].to_numpy(), mode="lines",
                     name="mean geodesic distance", line=dict(color=QUALITATIVE[0]), xaxis="x2", yaxis="y2",
                     hovertemplate="t = %{x:.3g}<br>mean geodesic distance: %{y:.4g} rad<extra></extra>"))
    shapes = [dict(type="line", xref="x2", yref="y2", x0=float(t["time"].iloc[0]), x1=float(t["time"].iloc[-1]),
                   y0=run.separation, y1=run.separation, line=dict(color="#d62728", dash="dot", width=1))]
    if np.isfinite(run.separation_time):
        shapes.append(dict(type="line", xref="x2", yref="paper", x0=run.separation_time, x1=run.separation_time,
                           y0=0, y1=1, line=dict(color="#d62728", dash="dash", width=1)))
    sep = f"T_sep = {run.separation_time:.3g}" if np.isfinite(run.separation_time) else "no separation"
    x_extra = {rc: dict(title=dict(text="time t (layers; step × dt)")) for rc in cells}
    y_extra = {(1, 1): dict(title=dict(text="clusters (count)"), rangemode="tozero"),
               (1, 2): dict(title=dict(text="mean geodesic distance (rad)"), rangemode="tozero")}
    base, pert = run.final_clusters
    title = (f"Clusters and separation over time · {sep} (first t with distance > δ = {run.separation:g} rad)\n"
             f"final clusters: base {base}, perturbed {pert} · cluster cut: cosine distance {run.threshold:g}")
    return _figure(data, _layout(title, 420, legend_below=0.3, axes=_grid_axes(cells, x_extra, y_extra),
                                 annotations=notes, shapes=shapes))
