"""Plotly figure builders for the dashboard: data in, ``go.Figure`` out.

Pure functions (no Streamlit import) so that tests and the bench build exactly the figures the
pages show. Every figure has a title, axis titles (with units where there are any) and hover text
naming the adapters, the layer and the module kind. Colours are fixed perceptual scales (Viridis,
Cividis, RdBu) that read on both light and dark backgrounds; the pages draw them with
``st.plotly_chart(theme="streamlit")`` so fonts, grid and background follow the app theme.

This module holds the shared builders (heatmaps, maps, curves) and the style; the figures only one page
draws are in :mod:`ui.figures.merge`, :mod:`ui.figures.survey` and :mod:`ui.figures.tokens`.
"""

from __future__ import annotations

import copy
import hashlib
import math
import pickle
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio

from ui import cache

# Figures are drawn with theme="streamlit" (the app's colours, light or dark), so plotly's own default
# template would be overridden anyway; building figures without it is several times faster (a control
# change rebuilds them). Downloads apply a plain white template (ui.downloads.figure_bytes).
pio.templates.default = "none"

# Every builder writes its figure as one plain spec ``{"data": [...], "layout": {...}}`` and validates it
# once (``go.Figure(spec)``): Plotly's ``update_*`` / ``make_subplots`` / ``add_trace`` calls walk and
# re-validate the figure at each step, about 8x slower for the same JSON (17 ms against 2 ms for an
# 11 x 11 heatmap; a control change rebuilds three or four figures).

#: Sequential scale for distances / norms (low = dark purple, high = yellow).
SEQUENTIAL = "Viridis"
#: Scale for similarity-like scores in [0, 1] (REC): high = similar.
SIMILARITY = "Cividis"
#: Qualitative colours that keep contrast on white and on near-black backgrounds.
QUALITATIVE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f",
)
#: Height of a square matrix figure; the width follows the container.
MATRIX_HEIGHT = 520
MARGIN = dict(l=10, r=10, t=60, b=10)


def plotly_config(filename: str) -> dict:
    """``st.plotly_chart(config=...)``: the modebar camera button saves ``filename.png``."""
    return {
        "displaylogo": False,
        "toImageButtonOptions": {"format": "png", "filename": filename, "scale": 2},
    }


def _layout(
    title: str, height: int | None = None, legend_below: float | None = None, *, axes: Mapping[str, dict] | None = None,
    annotations: Sequence[dict] = (), **extra,
) -> dict:
    """Layout of a figure: title (a second line after ``\n`` becomes the subtitle), margins, hover, legend.

    ``axes``: ``{"xaxis": {...}, "yaxis2": {...}}`` (each gets ``automargin``); ``annotations``:
    subplot titles (from :func:`_grid`) or notes. The legend sits above the plot on the right;
    figures with subplot titles put it below the plot instead (``legend_below``: its offset in
    plot-height units) so it never covers a title.
    """
    main, _, sub = title.partition("\n")
    has_subplot_titles = any(a.get("yref") == "paper" and (a.get("y") or 0) >= 0.99 for a in annotations)
    top = (84 if sub else MARGIN["t"]) + (22 if has_subplot_titles else 0)
    if legend_below is None:
        legend = dict(orientation="h", yanchor="bottom", y=1.0, xanchor="right", x=1.0)
    else:
        legend = dict(orientation="h", yanchor="top", y=-legend_below, xanchor="left", x=0.0)
    axes = dict(axes or {"xaxis": {}, "yaxis": {}})
    layout = dict(
        title=dict(text=main, x=0.0, xanchor="left", **({"subtitle": dict(text=sub)} if sub else {})),
        margin=dict(MARGIN, t=top, l=_left_margin(axes.get("yaxis", {})), b=_bottom_margin(axes.get("xaxis", {}))),
        hoverlabel=dict(namelength=-1),
        legend=legend,
        **extra,
    )
    if height is not None:
        layout["height"] = height
    for name, axis in axes.items():
        layout[name] = dict(axis, automargin=True)
    if annotations:
        layout["annotations"] = list(annotations)
    return layout


#: Width of one character of tick text, in pixels per pixel of font size (the app's sans-serif font).
_CHAR_EM = 0.58


def _tick_extent(axis: dict) -> float:
    """Estimated width in pixels of the longest tick label of ``axis`` (numbers: about 5 characters)."""
    size = (axis.get("tickfont") or {}).get("size") or 12
    labels = axis.get("ticktext")
    chars = max((len(str(t)) for t in labels), default=1) if labels else 5
    return chars * _CHAR_EM * size


def _left_margin(axis: dict) -> int:
    """Left margin that fits the y tick labels and title, so that ``automargin`` does not have to redraw.

    Plotly's ``automargin`` measures the drawn labels and, when they do not fit, lays the figure out
    a second time; starting from a margin that already fits skips that pass (see :func:`fit_margins`).
    ``automargin`` stays on for the labels the estimate gets wrong.
    """
    return round(_tick_extent(axis) + 10 + (TITLE_STANDOFF + 20 if axis.get("title") else 0))


def _bottom_margin(axis: dict) -> int:
    """Bottom margin for the x tick labels (rotated by ``tickangle``) and title (see :func:`_left_margin`)."""
    angle = math.radians(abs(axis.get("tickangle") or 0))
    size = (axis.get("tickfont") or {}).get("size") or 12
    extent = _tick_extent(axis) * math.sin(angle) + size * math.cos(angle) if axis.get("ticktext") else size
    return round(extent + 14 + (TITLE_STANDOFF + 20 if axis.get("title") else 0))


#: Gap in pixels between an axis' tick labels and its title (the app theme's own is 24 to 32 px, which
#: the margins would have to fit).
TITLE_STANDOFF = 8
#: Right margin that fits a colour bar beside the plot (bar, its tick labels and its side title).
COLORBAR_MARGIN = 124
_COLORBAR_TRACES = {"heatmap", "contour", "histogram2d", "histogram2dcontour"}
#: Plot width assumed when counting the rows of a horizontal legend (the app's main column, 1280 px window).
_LEGEND_WIDTH = 640


def fit_margins(data: Sequence[dict], layout: dict) -> dict:
    """``layout`` with margins that already fit what Plotly pushes into them: axis titles a fixed
    ``TITLE_STANDOFF`` from their tick labels, no plot padding, room for a colour bar on the right
    and for a legend below the plot.

    Why: with ``automargin`` (on every axis here, and in the app theme) Plotly draws the figure, measures
    what sticks out of the margins and, when something does, draws everything again with wider
    margins. In the browser that second pass was half the time of a control change (every figure of
    the Distances, Inclusion and Anatomy pages took it: ``bench/browser_latency.py``). Margins are only
    ever widened here, so a layout that sets wider ones keeps them.
    """
    layout = dict(layout)
    margin = dict(layout.get("margin") or {}, pad=0)
    for name, axis in list(layout.items()):
        if name.startswith(("xaxis", "yaxis")) and isinstance(axis, dict) and axis.get("title"):
            title = axis["title"] if isinstance(axis["title"], dict) else {"text": axis["title"]}
            layout[name] = dict(axis, title={"standoff": TITLE_STANDOFF, **title})
    if any(t.get("type") in _COLORBAR_TRACES and t.get("showscale", True) and "x" not in (t.get("colorbar") or {})
           for t in data):
        margin["r"] = max(margin.get("r", 0), COLORBAR_MARGIN)
    legend = layout.get("legend") or {}
    if (legend.get("y") or 0) < 0 and layout.get("showlegend", True) is not False:
        shown = list(dict.fromkeys(str(t.get("legendgroup") or t.get("name")) for t in data
                                   if t.get("showlegend", True) is not False and t.get("name") is not None))
        if len(shown) > 1 or layout.get("showlegend"):
            rows = math.ceil(sum(40 + len(n) * _CHAR_EM * 12 for n in shown) / _LEGEND_WIDTH) or 1
            height, top, below = layout.get("height") or 450, margin.get("t", 0), -legend["y"]
            # the legend hangs ``below`` plot heights under the plot: b >= below * (height - t - b) + its rows
            margin["b"] = max(margin.get("b", 0), math.ceil((below * (height - top) + 22 * rows + 18) / (1 + below)))
    layout["margin"] = margin
    return layout


class SharedFigure(go.Figure):
    """A validated figure built once per content and shared by every rerun and session that draws it.

    ``st.plotly_chart`` turns its figure into a dict on every script run (a deep copy with every array
    base64-encoded: 70 ms for the particle animation, 5 to 20 ms for a heatmap), and building the
    figure validates every property (110 ms for the animation). The same content gives the same
    object here (:func:`figure`), whose dict is computed once; :meth:`to_dict` hands out a deep copy
    of it (the encoded arrays are strings, so the copy is cheap: 5 ms for the animation).

    Because it is shared, it must not change: property assignment, ``update_*`` and ``add_*`` raise
    ``TypeError``. ``go.Figure(fig)`` is an ordinary, editable copy.
    """

    _frozen = False
    _dict_once: dict | None = None
    _content_hash: str | None = None  # its key in figure()'s cache

    def freeze(self) -> SharedFigure:
        self._dict_once = super().to_dict()
        self._frozen = True
        # in batch mode Plotly routes every property set to the figure (_relayout_child / _restyle_child,
        # which refuse) before storing it, so a refused change leaves the figure as it was
        self._in_batch_mode = True
        return self

    def to_dict(self) -> dict:
        return copy.deepcopy(self._dict_once) if self._frozen else super().to_dict()

    def _refuse(self, *args, **kwargs):
        if self._frozen:
            raise TypeError("this figure is shared between reruns and sessions (ui.figures.figure) and cannot "
                            "change: build it with the options you need, or edit a copy, go.Figure(fig)")

    def _relayout_child(self, *args, **kwargs):
        self._refuse()
        return super()._relayout_child(*args, **kwargs)

    def _restyle_child(self, *args, **kwargs):
        self._refuse()
        return super()._restyle_child(*args, **kwargs)

    def add_traces(self, *args, **kwargs):
        self._refuse()
        return super().add_traces(*args, **kwargs)

    def update(self, *args, **kwargs):
        self._refuse()
        return super().update(*args, **kwargs)

    def __setattr__(self, prop, value):
        if self._frozen and prop in ("data", "layout", "frames"):
            self._refuse()
        super().__setattr__(prop, value)


def figure(data: Sequence[dict], layout: dict, frames: Sequence[dict] | None = None) -> SharedFigure:
    """The validated figure of trace dicts (each with its ``type``), a layout dict and optional
    animation frames: one :class:`SharedFigure` per content (a hash of the pickled spec), kept in
    ``ui.cache.FIGURES`` (least recently used first out, within ``ui.cache.FIGURE_BYTES`` of spec)."""
    spec = {"data": list(data), "layout": fit_margins(data, layout), **({"frames": list(frames)} if frames else {})}
    blob = pickle.dumps(spec, protocol=pickle.HIGHEST_PROTOCOL)
    key = hashlib.blake2b(blob, digest_size=20).hexdigest()

    def build() -> tuple[SharedFigure, int]:
        fig = SharedFigure(spec).freeze()
        fig._content_hash = key
        return fig, len(blob)

    return cache.shared_figure(key, build)


_figure = figure


def built(builder: Callable[..., go.Figure | None], *args, **kwargs) -> go.Figure | None:
    """``builder(*args, **kwargs)``, a builder of this module's kind (its figure from :func:`figure`), run
    once per distinct arguments: the key is a hash of the builder and of the arguments it is called with
    (``ui.cache.memoized_figure``: bound to its signature, defaults filled in, arrays and DataFrames by
    content), so it names exactly what the figure depends on. Later calls with the same arguments return
    the shared figure without building it or hashing its spec again (the token animation: 20 ms of a page
    run each time), for as long as :func:`figure` keeps it. A figure that is not shared (``None``, or not
    from :func:`figure`) is returned and not kept."""
    return cache.memoized_figure(builder)(*args, **kwargs)


def _grid(rows: int, cols: int, *, titles: Sequence[str] | None = None, hspace: float = 0.2,
          vspace: float = 0.3) -> tuple[dict[tuple[int, int], dict], list[dict]]:
    """Axes of a ``rows x cols`` grid of panels, as ``plotly.subplots.make_subplots`` lays them out.

    Returns ``({(row, col): {"xaxis": name, "yaxis": name, "x": ref, "y": ref, "xdomain": [..],
    "ydomain": [..]}}, subplot-title annotations)``; rows and columns count from 1, row 1 on top.
    """
    width = (1.0 - hspace * (cols - 1)) / cols
    height = (1.0 - vspace * (rows - 1)) / rows
    cells, notes = {}, []
    for r in range(1, rows + 1):
        for c in range(1, cols + 1):
            k = (r - 1) * cols + c
            x0 = (c - 1) * (width + hspace)
            y1 = 1.0 - (r - 1) * (height + vspace)
            cells[(r, c)] = {
                "xaxis": "xaxis" if k == 1 else f"xaxis{k}", "yaxis": "yaxis" if k == 1 else f"yaxis{k}",
                "x": "x" if k == 1 else f"x{k}", "y": "y" if k == 1 else f"y{k}",
                "xdomain": [round(x0, 12), round(min(x0 + width, 1.0), 12)],
                "ydomain": [round(max(y1 - height, 0.0), 12), round(y1, 12)],
            }
            if titles is not None and k <= len(titles) and titles[k - 1] is not None:
                notes.append(dict(text=titles[k - 1], x=x0 + width / 2, y=y1, xref="paper", yref="paper",
                                  xanchor="center", yanchor="bottom", showarrow=False, font=dict(size=16)))
    return cells, notes


def _grid_axes(cells: Mapping[tuple[int, int], dict], x: Mapping[tuple[int, int], dict] | None = None,
               y: Mapping[tuple[int, int], dict] | None = None, shared_y: bool = False) -> dict[str, dict]:
    """Layout axes of :func:`_grid` cells, with per-cell extra x / y settings.

    ``shared_y``: panels of a row share the first panel's y axis (``matches``, ticks on the first only).
    """
    axes: dict[str, dict] = {}
    first_y = {r: cell["y"] for (r, c), cell in cells.items() if c == 1}
    for rc, cell in cells.items():
        axes[cell["xaxis"]] = dict(anchor=cell["y"], domain=cell["xdomain"], **(x or {}).get(rc, {}))
        yaxis = dict(anchor=cell["x"], domain=cell["ydomain"], **(y or {}).get(rc, {}))
        if shared_y and rc[1] > 1:
            yaxis.update(matches=first_y[rc[0]], showticklabels=False)
        axes[cell["yaxis"]] = yaxis
    return axes


def off_diagonal_range(*matrices: np.ndarray) -> tuple[float | None, float | None]:
    """Colour range of the off-diagonal entries of square matrices.

    A distance matrix has a trivial zero diagonal; scaling colours from 0 would paint every real
    pair the same colour when all distances are close (e.g. cosine distances near 1 between
    orthogonal task vectors). Returns ``(None, None)`` when nothing off the diagonal is finite.
    """
    values = []
    for m in matrices:
        m = np.asarray(m, dtype=float)
        if m.ndim == 2 and m.shape[0] == m.shape[1] and m.shape[0] > 1:
            values.append(m[~np.eye(m.shape[0], dtype=bool)])
    v = np.concatenate(values) if values else np.array([])
    v = v[np.isfinite(v)]
    if not v.size:
        return None, None
    lo, hi = float(v.min()), float(v.max())
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5 * abs(lo or 1.0), hi + 0.5 * abs(hi or 1.0)
    return lo, hi


#: Longest tick label on matrix axes; longer names are shortened in the middle (the hover shows them whole),
#: so that a 44-character hub name does not squash the heatmap to a strip.
TICK_CHARS = 22


def short_name(name: str, limit: int = TICK_CHARS) -> str:
    """``name`` cut to ``limit`` characters around a middle ellipsis (start and end kept: they tell names apart)."""
    name = str(name)
    if len(name) <= limit:
        return name
    head = (limit - 1) // 2
    return f"{name[:head]}…{name[-(limit - 1 - head):]}"


def _name_ticks(names: Sequence[str]) -> tuple[dict, dict]:
    """x and y axis settings that show every adapter name (Plotly would drop overlapping category
    labels), shortened in the middle when long (:func:`short_name`); the hover text names both
    adapters in full."""
    small = len(names) > 8
    font = dict(size=10) if small else None
    ticks = [short_name(n) for n in names]
    if len(set(ticks)) < len(set(names)):  # shortening made two names equal: keep them whole
        ticks = list(names)
    y = dict(tickmode="array", tickvals=list(names), ticktext=ticks, **({"tickfont": font} if font else {}))
    return dict(y, tickangle=-40), y


def _pair_names(names: Sequence[str]) -> np.ndarray:
    """``custom[i, j] = (names[i], names[j])``: the hover text of cell ``(i, j)`` of a matrix."""
    n = len(names)
    custom = np.empty((n, n, 2), dtype=object)
    custom[:, :, 0] = np.asarray(names, dtype=object)[:, None]
    custom[:, :, 1] = np.asarray(names, dtype=object)[None, :]
    return custom


def _matrix_height(n: int) -> int:
    return max(MATRIX_HEIGHT, 34 * n + 260)


def _layer_dtick(layers) -> int | None:
    """One tick per layer up to 12 layers; Plotly's automatic ticks beyond (labels would overlap)."""
    return 1 if len(set(np.asarray(layers).tolist())) <= 12 else None


def _cell_text(values: np.ndarray, n: int) -> str | None:
    """Print numbers in the cells of small matrices only (unreadable beyond ~8 at half width)."""
    if n > 8 or not np.isfinite(values).any():
        return None
    return "%{z:.3g}"


def matrix_heatmap(
    matrix: np.ndarray,
    names: Sequence[str],
    *,
    title: str,
    value_label: str,
    detail: str = "",
    colorscale: str = SEQUENTIAL,
    zmin: float | None = None,
    zmax: float | None = None,
    row_label: str = "adapter",
    col_label: str = "adapter",
    scale_off_diagonal: bool = True,
) -> go.Figure:
    """Adapter x adapter heatmap; hover names both adapters, the value and ``detail`` (kind, layers).

    ``scale_off_diagonal``: the colour range spans the off-diagonal values (see
    :func:`off_diagonal_range`) unless ``zmin`` / ``zmax`` are given.

    ``title``: one line, or two separated by ``\n`` (the second becomes the subtitle), as in
    every builder here.

    Row ``i`` is drawn at the top for ``i = 0`` (matrix order, like a printed table).
    """
    matrix = np.asarray(matrix, dtype=float)
    names = [str(n) for n in names]
    if scale_off_diagonal:
        lo, hi = off_diagonal_range(matrix)
        zmin = lo if zmin is None else zmin
        zmax = hi if zmax is None else zmax
    hover = (
        f"{row_label}: %{{customdata[0]}}<br>{col_label}: %{{customdata[1]}}<br>"
        f"{value_label}: %{{z:.4g}}" + (f"<br>{detail}" if detail else "") + "<extra></extra>"
    )
    trace = dict(
        type="heatmap", z=matrix, x=names, y=names, customdata=_pair_names(names), hovertemplate=hover,
        colorscale=colorscale, zmin=zmin, zmax=zmax, texttemplate=_cell_text(matrix, len(names)),
        colorbar=dict(title=dict(text=value_label, side="right")),
    )
    xt, yt = _name_ticks(names)
    axes = {"xaxis": dict(xt, title=dict(text=col_label), type="category"),
            "yaxis": dict(yt, autorange="reversed", title=dict(text=row_label), type="category")}
    return _figure([trace], _layout(title, _matrix_height(len(names)), axes=axes))


def side_by_side_heatmaps(
    matrices: Mapping[str, np.ndarray],
    names: Sequence[str],
    *,
    title: str,
    value_label: str,
    detail: str = "",
    colorscale: str = SEQUENTIAL,
) -> go.Figure:
    """One heatmap per module kind on a shared colour scale (the paper's Figure 3: query | value)."""
    kinds = list(matrices)
    names = [str(n) for n in names]
    cells, notes = _grid(1, len(kinds), titles=[f"{k} projections" for k in kinds], hspace=0.08)
    zmin, zmax = off_diagonal_range(*matrices.values())
    custom = _pair_names(names)
    xt, yt = _name_ticks(names)
    data, x_extra, y_extra = [], {}, {}
    for c, kind in enumerate(kinds, start=1):
        matrix = np.asarray(matrices[kind], dtype=float)
        data.append(dict(
            type="heatmap", z=matrix, x=names, y=names, customdata=custom, zmin=zmin, zmax=zmax,
            colorscale=colorscale, showscale=c == len(kinds), texttemplate=_cell_text(matrix, len(names)),
            colorbar=dict(title=dict(text=value_label, side="right")),
            hovertemplate=(
                f"kind: {kind}<br>adapter: %{{customdata[0]}}<br>adapter: %{{customdata[1]}}"
                f"<br>{value_label}: %{{z:.4g}}" + (f"<br>{detail}" if detail else "") + "<extra></extra>"
            ),
            xaxis=cells[(1, c)]["x"], yaxis=cells[(1, c)]["y"],
        ))
        x_extra[(1, c)] = dict(xt, type="category")
        y_extra[(1, c)] = dict(yt, autorange="reversed", type="category", showticklabels=c == 1)
    axes = _grid_axes(cells, x_extra, y_extra)
    return _figure(data, _layout(title, _matrix_height(len(names)), axes=axes, annotations=notes))


#: Candidate label positions around a marker, and their box offsets in pixels (dx, dy of the box centre;
#: y grows upwards) for a label of width w and height h.
_LABEL_SPOTS = {
    "top center": lambda w, h: (0.0, 9 + h / 2),
    "bottom center": lambda w, h: (0.0, -9 - h / 2),
    "middle right": lambda w, h: (9 + w / 2, 0.0),
    "middle left": lambda w, h: (-9 - w / 2, 0.0),
    "top right": lambda w, h: (6 + w / 2, 7 + h / 2),
    "top left": lambda w, h: (-6 - w / 2, 7 + h / 2),
    "bottom right": lambda w, h: (6 + w / 2, -7 - h / 2),
    "bottom left": lambda w, h: (-6 - w / 2, -7 - h / 2),
}



def label_positions(coords: np.ndarray, names: Sequence[str], x_range: Sequence[float], y_range: Sequence[float],
                    size: tuple[float, float] = (330.0, 330.0), char_px: float = 6.4, line_px: float = 14.0) -> list[str]:
    """A Plotly ``textposition`` per point that keeps labels off each other, off the markers and inside the plot.

    Greedy, most crowded points first: each label takes the candidate spot (above, below, right, left,
    diagonals) whose box, in pixels of a ``size`` plot area, overlaps least with the labels already
    placed, every marker and the plot's edges.
    """
    pts = np.asarray(coords, dtype=float).reshape(-1, 2)
    n = len(pts)
    if n == 0:
        return []
    (x0, x1), (y0, y1) = x_range, y_range
    W, H = size
    px = np.column_stack([(pts[:, 0] - x0) / ((x1 - x0) or 1.0) * W, (pts[:, 1] - y0) / ((y1 - y0) or 1.0) * H])
    boxes: list[tuple[float, float, float, float]] = []
    markers = [(x - 7, y - 7, x + 7, y + 7) for x, y in px]

    def overlap(a, b) -> float:
        return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))

    def outside(b) -> float:
        inner = (max(b[0], 0.0), max(b[1], 0.0), min(b[2], W), min(b[3], H))
        area = (b[2] - b[0]) * (b[3] - b[1])
        return area - max(0.0, inner[2] - inner[0]) * max(0.0, inner[3] - inner[1])

    dist = np.linalg.norm(px[:, None] - px[None], axis=-1) + np.eye(n) * 1e9
    order = np.argsort(dist.min(axis=1))
    out = ["top center"] * n
    for i in order:
        w, h = char_px * len(str(names[i])) + 4, line_px
        best, best_cost = "top center", float("inf")
        for k, (spot, offset) in enumerate(_LABEL_SPOTS.items()):
            dx, dy = offset(w, h)
            cx, cy = px[i, 0] + dx, px[i, 1] + dy
            box = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
            cost = sum(overlap(box, b) for b in boxes) + sum(overlap(box, m) for j, m in enumerate(markers) if j != i)
            cost += 4.0 * outside(box) + 0.01 * k  # prefer the plain spots on ties
            if cost < best_cost:
                best, best_cost, best_box = spot, cost, box
        out[i] = best
        boxes.append(best_box)
    return out


def embedding_scatter(
    coords: np.ndarray, names: Sequence[str], *, title: str, method: str, detail: str = ""
) -> go.Figure:
    """Labelled 2-D map of the adapters (rows of the distance matrix embedded by PCA / MDS / UMAP).

    Coordinates below 1e-9 of the largest are rounding noise (a 2-point PCA's second axis is ~1e-16)
    and are drawn as 0; labels are placed around the markers so that they do not overlap.
    """
    coords = np.array(coords, dtype=float).reshape(-1, 2)
    names = [str(n) for n in names]
    colors = [QUALITATIVE[i % len(QUALITATIVE)] for i in range(len(names))]
    scale = float(np.abs(coords).max()) if coords.size else 1.0
    scale = scale if scale > 0 else 1.0
    coords[np.abs(coords) < 1e-9 * scale] = 0.0
    x_axis = dict(title=dict(text=f"{method} component 1 (arbitrary units)"), zeroline=False)
    y_axis = dict(title=dict(text=f"{method} component 2 (arbitrary units)"), zeroline=False)
    positions: list[str] = []
    if len(coords):  # room for the text labels around the outermost points
        span = np.ptp(coords, axis=0)
        span = np.where(span > 1e-9 * scale, span, scale)
        lo, hi = coords.min(axis=0), coords.max(axis=0)
        x_axis["range"] = [lo[0] - 0.25 * span[0], hi[0] + 0.25 * span[0]]
        y_axis["range"] = [lo[1] - 0.15 * span[1], hi[1] + 0.18 * span[1]]
        positions = label_positions(coords, names, x_axis["range"], y_axis["range"])
    trace = dict(
        type="scatter", x=coords[:, 0], y=coords[:, 1], mode="markers+text", text=names,
        textposition=positions or "top center", marker=dict(size=13, color=colors, line=dict(width=1, color="#444")),
        hovertemplate=(
            f"adapter: %{{text}}<br>{method} 1: %{{x:.3g}}<br>{method} 2: %{{y:.3g}}"
            + (f"<br>{detail}" if detail else "") + "<extra></extra>"
        ),
        cliponaxis=False,
    )
    return _figure([trace], _layout(title, MATRIX_HEIGHT, axes={"xaxis": x_axis, "yaxis": y_axis}))


def layer_lines(
    frame: pd.DataFrame,
    *,
    title: str,
    value_label: str,
    series: str = "series",
    x: str = "layer",
    y: str = "value",
    facet: str | None = None,
    y_range: tuple[float, float] | None = None,
    x_label: str = "layer",
) -> go.Figure:
    """One line per ``series`` value over layers; optional facets side by side (e.g. per kind).

    ``frame`` columns: ``series``, ``x``, ``y`` and optionally ``facet``; hover names the series
    (a pair of adapters, a direction, a kind), the layer and the value. ``x_label`` other than
    ``"layer"`` (an optimiser step) names the x axis and hover, without the layers' tick spacing.
    """
    facets = list(dict.fromkeys(frame[facet])) if facet and len(frame) else [None]
    cells, notes = _grid(1, len(facets), titles=[f"{f} projections" for f in facets] if facet else None, hspace=0.05)
    names = list(dict.fromkeys(frame[series])) if len(frame) else []
    groups = {key: part.sort_values(x) for key, part in frame.groupby(
        [facet, series] if facet else [series], sort=False)} if len(frame) else {}
    dtick = _layer_dtick(frame[x] if len(frame) else []) if x_label == "layer" else None
    data, x_extra = [], {}
    for c, fv in enumerate(facets, start=1):
        for s_i, name in enumerate(names):
            sub = groups.get((fv, name) if facet else (name,))
            if sub is None or sub.empty:
                continue
            label = f"{fv} · " if fv is not None else ""
            data.append(dict(
                type="scatter", x=sub[x].to_numpy(), y=sub[y].to_numpy(), mode="lines+markers", name=str(name),
                legendgroup=str(name), showlegend=c == 1, line=dict(color=QUALITATIVE[s_i % len(QUALITATIVE)]),
                hovertemplate=f"{label}{name}<br>{x_label}: %{{x}}<br>{value_label}: %{{y:.4g}}<extra></extra>",
                xaxis=cells[(1, c)]["x"], yaxis=cells[(1, c)]["y"],
            ))
        x_extra[(1, c)] = dict(title=dict(text=x_label), **({"dtick": dtick} if dtick else {}))
    y_extra = {(1, 1): dict(title=dict(text=value_label))}
    if y_range is not None:
        y_extra = {rc: dict(y_extra.get(rc, {}), range=list(y_range)) for rc in cells}
    axes = _grid_axes(cells, x_extra, y_extra, shared_y=True)
    return _figure(data, _layout(title, 460, legend_below=0.22, axes=axes, annotations=notes))


def grid_curves(
    frame: pd.DataFrame,
    *,
    title: str,
    rows: Sequence[str],
    cols: Sequence[str],
    row_labels: Mapping[str, str],
    series: str = "direction",
    col_key: str = "kind",
) -> go.Figure:
    """The paper's Figure 2: metrics (rows: L1, REC) x kinds (cols: q, v), one line per direction.

    ``frame``: long table with columns ``series``, ``col_key``, ``layer`` and one column per metric
    in ``rows``.
    """
    titles = [f"{row_labels.get(r, r)} · {c} projections" for r in rows for c in cols]
    cells, notes = _grid(len(rows), len(cols), titles=titles, vspace=0.16, hspace=0.08)
    names = list(dict.fromkeys(frame[series])) if len(frame) else []
    groups = {key: part.sort_values("layer") for key, part in frame.groupby([col_key, series], sort=False)} \
        if len(frame) else {}
    dtick = _layer_dtick(frame["layer"] if len(frame) else [])
    data, x_extra, y_extra = [], {}, {}
    for ri, metric in enumerate(rows, start=1):
        for ci, kind in enumerate(cols, start=1):
            for s_i, name in enumerate(names):
                sub = groups.get((kind, name))
                if sub is None or sub.empty:
                    continue
                data.append(dict(
                    type="scatter", x=sub["layer"].to_numpy(), y=sub[metric].to_numpy(), mode="lines+markers",
                    name=str(name), legendgroup=str(name), showlegend=ri == 1 and ci == 1,
                    line=dict(color=QUALITATIVE[s_i % len(QUALITATIVE)]),
                    hovertemplate=(
                        f"{name}<br>kind: {kind}<br>layer: %{{x}}<br>{row_labels.get(metric, metric)}: "
                        "%{y:.4g}<extra></extra>"
                    ),
                    xaxis=cells[(ri, ci)]["x"], yaxis=cells[(ri, ci)]["y"],
                ))
            x_extra[(ri, ci)] = dict(title=dict(text="layer"), **({"dtick": dtick} if dtick else {}))
            if ci == 1:
                y_extra[(ri, ci)] = dict(title=dict(text=row_labels.get(metric, metric).split(" (")[0]))
    axes = _grid_axes(cells, x_extra, y_extra)
    return _figure(data, _layout(title, 300 * len(rows) + 120, legend_below=0.12, axes=axes, annotations=notes))


def norm_heatmap(
    frame: pd.DataFrame, *, adapter: str, title: str, zmin: float | None = None, zmax: float | None = None
) -> go.Figure:
    """Layer x module-kind heatmap of ``||tau||_F`` from an anatomy table (one stack).

    ``frame`` columns: ``layer``, ``kind``, ``fro_norm`` and optionally ``r``, ``rank``, ``m``, ``n``.
    """
    kinds = list(dict.fromkeys(frame["kind"])) if len(frame) else []
    layers = sorted(frame["layer"].unique()) if len(frame) else []
    z = np.full((len(layers), len(kinds)), np.nan)
    custom = np.full((len(layers), len(kinds), 3), "", dtype=object)
    li = {v: i for i, v in enumerate(layers)}
    ki = {v: i for i, v in enumerate(kinds)}
    for row in frame.itertuples(index=False):
        i, j = li[row.layer], ki[row.kind]
        z[i, j] = float(row.fro_norm)
        shape = f"{getattr(row, 'm', '?')} x {getattr(row, 'n', '?')}"
        custom[i, j] = [adapter, shape, str(getattr(row, "rank", getattr(row, "r", "?")))]
    trace = dict(
        type="heatmap", z=z, x=kinds, y=[str(v) for v in layers], customdata=custom, colorscale=SEQUENTIAL,
        zmin=zmin, zmax=zmax, texttemplate="%{z:.3g}" if z.size and z.size <= 200 else None,
        colorbar=dict(title=dict(text="‖τ‖_F", side="right")),
        hovertemplate=(
            "adapter: %{customdata[0]}<br>layer: %{y}<br>kind: %{x}<br>‖τ‖_F: %{z:.4g}"
            "<br>shape (out x in): %{customdata[1]}<br>numerical rank: %{customdata[2]}<extra></extra>"
        ),
    )
    axes = {"xaxis": dict(title=dict(text="module kind"), type="category"),
            "yaxis": dict(title=dict(text="layer"), type="category", autorange="reversed")}
    return _figure([trace], _layout(title, max(320, 28 * len(layers) + 160), axes=axes))


def spectra_bars(spectra: Mapping[str, Sequence[float]], *, title: str, detail: str = "", log: bool = False) -> go.Figure:
    """Grouped bars of singular values (index i = 1..r), one group per named spectrum (``log``: log y axis)."""
    data = []
    for s_i, (name, values) in enumerate(spectra.items()):
        values = np.asarray(values, dtype=float)
        data.append(dict(
            type="bar", x=np.arange(1, len(values) + 1), y=values, name=str(name),
            marker=dict(color=QUALITATIVE[s_i % len(QUALITATIVE)]),
            hovertemplate=(
                f"{name}" + (f"<br>{detail}" if detail else "") + "<br>i = %{x}<br>σ_i: %{y:.4g}<extra></extra>"
            ),
        ))
    axes = {"xaxis": dict(title=dict(text="singular value index i"), dtick=1),
            "yaxis": dict(title=dict(text="singular value σ_i (log scale)"), type="log") if log
            else dict(title=dict(text="singular value σ_i"))}
    return _figure(data, _layout(title, 380, axes=axes, barmode="group"))


def rank_lines(frame: pd.DataFrame, *, adapter: str, title: str) -> go.Figure:
    """Effective rank (exp of spectral entropy) and stable rank (‖τ‖_F² / σ_1²) by layer, per kind."""
    cells, notes = _grid(1, 2, titles=["effective rank", "stable rank"], hspace=0.1)
    kinds = list(dict.fromkeys(frame["kind"])) if len(frame) else []
    groups = {k: part.sort_values("layer") for k, part in frame.groupby("kind", sort=False)} if len(frame) else {}
    dtick = _layer_dtick(frame["layer"] if len(frame) else [])
    data, x_extra, y_extra = [], {}, {}
    for c, col in enumerate(("effective_rank", "stable_rank"), start=1):
        for k_i, kind in enumerate(kinds):
            sub = groups[kind]
            data.append(dict(
                type="scatter", x=sub["layer"].to_numpy(), y=sub[col].to_numpy(), mode="lines+markers", name=kind,
                legendgroup=kind, showlegend=c == 1, line=dict(color=QUALITATIVE[k_i % len(QUALITATIVE)]),
                hovertemplate=(
                    f"adapter: {adapter}<br>kind: {kind}<br>layer: %{{x}}<br>{col.replace('_', ' ')}: "
                    "%{y:.3g}<extra></extra>"
                ),
                xaxis=cells[(1, c)]["x"], yaxis=cells[(1, c)]["y"],
            ))
        x_extra[(1, c)] = dict(title=dict(text="layer"), **({"dtick": dtick} if dtick else {}))
        y_extra[(1, c)] = dict(rangemode="tozero", **({"title": dict(text="rank (directions)")} if c == 1 else {}))
    axes = _grid_axes(cells, x_extra, y_extra)
    return _figure(data, _layout(title, 420, legend_below=0.25, axes=axes, annotations=notes))


def figure_arrays(fig: go.Figure) -> list[np.ndarray]:
    """The numeric payload (``z`` or ``y``) of each trace, for tests that compare figures."""
    out = []
    for trace in fig.data:
        values = getattr(trace, "z", None)
        if values is None:
            values = getattr(trace, "y", None)
        out.append(np.asarray(values, dtype=float) if values is not None else np.array([]))
    return out


def sweep_lines(frame: pd.DataFrame, *, title: str, metrics: Mapping[str, str], series: str = "direction") -> go.Figure:
    """Mean inclusion metrics against the sparsity penalty λ (the paper's appendix-A sweep).

    ``frame``: one row per ``(series, lam)`` with a column per metric key of ``metrics``; λ is
    drawn as categories (``0`` cannot sit on a log axis).
    """
    cells, notes = _grid(1, len(metrics), titles=list(metrics.values()), hspace=0.1)
    names = list(dict.fromkeys(frame[series])) if len(frame) else []
    data, x_extra = [], {}
    for c, metric in enumerate(metrics, start=1):
        for s_i, name in enumerate(names):
            sub = frame[frame[series] == name].sort_values("lam")
            data.append(dict(
                type="scatter", x=[f"{v:g}" for v in sub["lam"]], y=sub[metric].to_numpy(), mode="lines+markers",
                name=str(name), legendgroup=str(name), showlegend=c == 1,
                line=dict(color=QUALITATIVE[s_i % len(QUALITATIVE)]),
                hovertemplate=f"{name}<br>λ = %{{x}}<br>{metrics[metric]}: %{{y:.4g}}<extra></extra>",
                xaxis=cells[(1, c)]["x"], yaxis=cells[(1, c)]["y"],
            ))
        x_extra[(1, c)] = dict(title=dict(text="λ (sparsity penalty)"), type="category")
    axes = _grid_axes(cells, x_extra, {(1, 1): dict(title=dict(text="mean over modules"))})
    return _figure(data, _layout(title, 420, legend_below=0.25, axes=axes, annotations=notes))


def coefficient_heatmap(table: pd.DataFrame, *, title: str, value_label: str = "Γ") -> go.Figure:
    """Task x layer heatmap of learned coefficients (``table``: rows adapters, columns layers)."""
    rows = [str(r) for r in table.index]
    cols = [str(c) for c in table.columns]
    trace = dict(
        type="heatmap", z=table.to_numpy(dtype=float), x=cols, y=rows, colorscale="RdBu", zmid=0.0,
        colorbar=dict(title=dict(text=value_label, side="right")),
        hovertemplate=f"adapter: %{{y}}<br>layer: %{{x}}<br>{value_label}: %{{z:.4g}}<extra></extra>",
    )
    axes = {"xaxis": dict(title=dict(text="layer (transformer block)"), type="category"),
            "yaxis": dict(title=dict(text="adapter (task)"), autorange="reversed", type="category")}
    return _figure([trace], _layout(title, max(320, 40 * len(rows) + 220), axes=axes))
