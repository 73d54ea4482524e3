"""The Survey page's helpers: cached survey reads, a survey run on the session's adapters, and its figures.

Figures for N in the hundreds: the heatmap draws no per-cell text and no tick per adapter beyond 60
(the hover names both adapters), and the 2-D map is a WebGL ``scattergl`` (thousands of points
stay fluid), coloured by base model. The figure builders are pure (no Streamlit) and follow
``ui.figures``' conventions (title and subtitle, axis titles, hover text naming adapters).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from geometry import survey as sv
from ui import figures
from ui.figures import MATRIX_HEIGHT, QUALITATIVE, SEQUENTIAL, _layout, off_diagonal_range, short_name

#: Beyond this many adapters the heatmap hides its tick labels (the hover names both adapters).
TICKS_UP_TO = 60
METRIC_LABELS = {"l2": "L2", "cosine": "cosine", "grassmann": "Grassmann"}
FACTOR_LABELS = {"ba": "BA", "b": "B", "a": "A"}


def surveys_dir() -> Path:
    """Where surveys run from the page are written (under the app's disk cache)."""
    from ui.cache import cache_dir

    return cache_dir() / "surveys"


def _stamp(path: Path) -> tuple:
    """Changes when the survey on disk changes (a module added, a file replaced)."""
    if path.is_dir():
        parts = sorted(sv.finished_modules(path))
        return (len(parts), parts[-1] if parts else "", (path / sv.MANIFEST).stat().st_mtime_ns)
    st_ = path.stat()
    return (st_.st_size, st_.st_mtime_ns)


@st.cache_data(show_spinner=False, max_entries=32)
def _open(path: str, stamp: tuple) -> sv.Survey:
    return sv.open_survey(path)


def open_survey(path: str | Path) -> sv.Survey:
    """:func:`geometry.survey.open_survey`, memoised while the files do not change (raises ``AtlasError``)."""
    path = Path(path).expanduser()
    if not path.exists():
        return sv.open_survey(path)  # the library's message
    return _open(str(path), _stamp(path))


@st.cache_data(show_spinner=False, max_entries=64)
def _matrix(path: str, stamp: tuple, metric: str, kinds: tuple[str, ...] | None) -> tuple[np.ndarray, np.ndarray]:
    return sv.open_survey(path).matrix(metric, kind=kinds)


def matrix(survey: sv.Survey, metric: str, kinds: Sequence[str] | None) -> tuple[np.ndarray, np.ndarray]:
    """``Survey.matrix`` (mean over the chosen kinds' modules, NaN skipped; and counts), memoised."""
    return _matrix(str(survey.path), _stamp(survey.path), metric, tuple(kinds) if kinds else None)


@st.cache_data(show_spinner=False, max_entries=16)
def _modules(path: str, stamp: tuple) -> pd.DataFrame:
    return sv.open_survey(path).modules()


def modules(survey: sv.Survey) -> pd.DataFrame:
    return _modules(str(survey.path), _stamp(survey.path))


def saved_upload(data: bytes) -> Path:
    """An uploaded survey file, stored once under :func:`surveys_dir` by content (checked by the library)."""
    return sv.survey_bytes_to_file(data, surveys_dir() / "uploads")


def run_on_adapters(adapters: Sequence, progress=None) -> Path:
    """Survey the session's adapters (in memory) into a folder keyed by their content and names.

    A cancelled run (the progress bar's Cancel) keeps its finished modules: the next run resumes there.
    """
    text = "\n".join(f"{a.name}\t{a.content_hash or f'unhashed:{id(a)}'}" for a in adapters)
    out = surveys_dir() / hashlib.sha256(text.encode()).hexdigest()[:16] / "results.parquet"
    sv.run_survey(sv.refs_from_adapters(adapters), out, runner=sv.memory_runner(adapters), progress=progress)
    return out


def filter_names(adapters: pd.DataFrame, bases: Sequence[str], ranks: Sequence[int],
                 targets: Sequence[str]) -> list[str]:
    """Adapters of the chosen bases and ranks (empty choice: all) that target every chosen module name."""
    keep = []
    for row in adapters.itertuples():
        base = str(row.base or "not declared")
        if bases and base not in bases:
            continue
        if ranks and int(row.r) not in set(ranks):
            continue
        if targets and not set(targets) <= set(row.target_modules or []):
            continue
        keep.append(row.name)
    return keep


def cluster_order(values: np.ndarray) -> tuple[np.ndarray, int]:
    """Leaf order of average-linkage hierarchical clustering of ``values`` ``[n, n]``; and the NaN pairs.

    Undefined (NaN) distances are treated as the largest defined distance *for the ordering only*
    (the heatmap still shows them as undefined).
    """
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    n = values.shape[0]
    if n < 3:
        return np.arange(n), 0
    D = np.array(values, dtype=float)
    bad = ~np.isfinite(D)
    np.fill_diagonal(bad, False)
    finite = D[np.isfinite(D)]
    fill = float(finite.max()) if finite.size else 1.0
    D[bad] = fill
    D = (D + D.T) / 2
    np.fill_diagonal(D, 0.0)
    Z = linkage(squareform(np.clip(D, 0.0, None), checks=False), method="average")
    return leaves_list(Z), int(bad.sum() // 2)


def neighbours_frame(values: np.ndarray, counts: np.ndarray, names: Sequence[str], name: str, k: int) -> pd.DataFrame:
    """The ``k`` nearest to ``name`` among ``names`` (matrix row; NaN last, never as 0)."""
    i = list(names).index(name)
    frame = pd.DataFrame({"adapter": list(names), "distance": values[i], "modules averaged": counts[i]})
    frame = frame.drop(index=i).sort_values(["distance", "adapter"], na_position="last", kind="stable").head(k)
    frame.insert(0, "rank", np.arange(1, len(frame) + 1))
    return frame.reset_index(drop=True)


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
