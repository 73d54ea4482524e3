"""Re-slicing of precomputed geometry for the pages: what a slider or a toggle triggers.

Pure functions (no Streamlit import): they take the results the library computed once per adapter
set (``DistanceTensor`` objects, inclusion / anatomy tables) and the control values, and return
the matrices and long tables the figures draw. No geometry is computed here: averaging a
precomputed distance over the chosen layers is ``DistanceTensor.reduce``; inclusion tables are
only filtered and averaged over modules, exactly as ``geometry.inclusion.inclusion_matrix`` does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

#: Layer-control modes and their labels in the UI.
LAYER_MODES: dict[str, str] = {
    "all": "all layers",
    "one": "one layer",
    "range": "range",
    "last": "last k",
}
#: Metric labels (distances).
METRIC_LABELS: dict[str, str] = {"l2": "L2", "cosine": "cosine", "grassmann": "Grassmann"}
#: Projection kinds as researchers say them.
KIND_LABELS: dict[str, str] = {"q": "query (q)", "k": "key (k)", "v": "value (v)", "o": "output (o)"}
#: Factor labels: which matrix each distance is taken on.
FACTOR_LABELS: dict[str, str] = {"ba": "BA", "a": "A", "b": "B"}
#: Unit / meaning of each distance, for axis and colour-bar titles.
METRIC_UNITS: dict[str, str] = {
    "l2": "‖τ1 − τ2‖_F",
    "cosine": "1 − cos(τ1, τ2)",
    "grassmann": "d_G (radians)",
}
#: Inclusion metrics as short labels (selectors and links).
INCLUSION_SHORT: dict[str, str] = {
    "rec": "REC", "l1": "L1 raw", "l1_normalized": "L1 normalized", "l2": "L2 raw", "l2_normalized": "L2 normalized",
}
#: Inclusion metrics: column of the inclusion table -> label.
INCLUSION_METRICS: dict[str, str] = {
    "rec": "REC (overlap, 0 to 1)",
    "l1": "L1 = ‖S1 − S2‖_1 (raw)",
    "l1_normalized": "L1 on sum-normalized spectra",
    "l2": "L2 = ‖S1 − S2‖_2 (raw)",
    "l2_normalized": "L2 on sum-normalized spectra",
}


@dataclass(frozen=True)
class LayerChoice:
    """A layer selection from the page control, as a ``geometry.distances.select_layers`` spec."""

    mode: str = "all"
    layer: int | None = None
    start: int | None = None
    stop: int | None = None
    k: int | None = None

    @property
    def spec(self) -> str:
        if self.mode == "one" and self.layer is not None:
            return str(self.layer)
        if self.mode == "range" and self.start is not None and self.stop is not None:
            return f"{min(self.start, self.stop)}-{max(self.start, self.stop)}"
        if self.mode == "last" and self.k:
            return f"last:{int(self.k)}"
        return "all"

    def describe(self, layers: Sequence[int]) -> str:
        """Human text for titles: ``layer 3``, ``layers 2-5 (mean)``, ``last 3 layers (mean)``."""
        if not layers:
            return "no layer"
        if len(layers) == 1:
            return f"layer {layers[0]}"
        if self.mode == "last":
            return f"last {len(layers)} layers (mean over {layers[0]}-{layers[-1]})"
        return f"layers {layers[0]}-{layers[-1]} (mean over {len(layers)})"


def pick_layers(available: Sequence[int], choice: LayerChoice) -> list[int]:
    """The layers of ``available`` that ``choice`` selects (through the library's ``select_layers``)."""
    from geometry.distances import select_layers

    return [int(v) for v in select_layers(list(available), choice.spec)]


def distance_keys(dists: Mapping[tuple, object]) -> pd.DataFrame:
    """The (metric, factor, stack, kind) combinations present, as a table."""
    return pd.DataFrame(list(dists.keys()), columns=["metric", "factor", "stack", "kind"])


def kinds_of(dists: Mapping[tuple, object], stack: str | None = None) -> list[str]:
    from geometry.types import ordered_kinds

    return ordered_kinds(k[3] for k in dists if stack is None or k[2] == stack)


def stacks_of(dists: Mapping[tuple, object]) -> list[str]:
    from geometry.types import ordered_stacks

    return ordered_stacks(k[2] for k in dists)


def relabel(tensor, names: Sequence[str]):
    """A copy of a ``DistanceTensor`` whose adapters carry the session's display names."""
    return replace(tensor, adapters=list(names))


def slice_tensor(tensor, idx: Sequence[int], names: Sequence[str], notes: Sequence[str]):
    """The rows and columns ``idx`` of a ``DistanceTensor`` (a subset of its adapters), named ``names``.

    ``notes`` are the compatibility notes of the subset; the note on undefined entry-wise distances
    is kept only when the slice still holds an undefined value.
    """
    values = tensor.values[np.ix_(list(idx), list(idx))]
    kept = list(notes)
    if np.isnan(values).any():
        kept += [n for n in tensor.notes if "is NaN" in n or "undefined" in n]
    return replace(tensor, values=values, adapters=list(names), notes=kept)


def distance_matrix(tensor, choice: LayerChoice) -> tuple[np.ndarray, list[int]]:
    """Mean over the chosen layers of ``T_d(i, j, k)``: the ``[n, n]`` matrix and the layers used."""
    layers = pick_layers(tensor.layers, choice)
    if not layers:
        n = len(tensor.adapters)
        return np.full((n, n), np.nan), []
    return np.asarray(tensor.reduce(layers), dtype=float), layers


def pair_layer_frame(tensor, pairs: Sequence[tuple[str, str]], kind_label: str | None = None) -> pd.DataFrame:
    """Long table (series, layer, value[, kind]) of ``T_d(i, j, k)`` over layers for chosen pairs."""
    index = {name: i for i, name in enumerate(tensor.adapters)}
    rows = []
    for a, b in pairs:
        if a not in index or b not in index:
            continue
        i, j = index[a], index[b]
        for li, layer in enumerate(tensor.layers):
            rows.append(
                {
                    "series": f"{a} ↔ {b}",
                    "layer": int(layer),
                    "value": float(tensor.values[i, j, li]),
                    "kind": kind_label or tensor.kind,
                }
            )
    return pd.DataFrame(rows, columns=["series", "layer", "value", "kind"])


def matrix_frame(matrix: np.ndarray, names: Sequence[str], value_name: str = "value") -> pd.DataFrame:
    """A square matrix as a labelled table (rows and columns named by adapter) for CSV download."""
    return pd.DataFrame(np.asarray(matrix), index=list(names), columns=list(names)).rename_axis(value_name)


def inclusion_curves_frame(
    tables: Mapping[str, pd.DataFrame], kinds: Sequence[str], stack: str | None = None
) -> pd.DataFrame:
    """Per-layer inclusion metrics for each direction label (``tau1 → tau2``) and kind, long format."""
    parts = []
    for direction, table in tables.items():
        sub = table[table["kind"].isin(list(kinds))]
        if stack is not None:
            sub = sub[sub["stack"] == stack]
        sub = sub.drop(columns=[c for c in ("s1", "s2") if c in sub.columns]).copy()
        sub.insert(0, "direction", direction)
        parts.append(sub)
    if not parts:
        return pd.DataFrame()
    return pd.concat(parts, ignore_index=True)


def module_mean(table: pd.DataFrame, metric: str, kind: str | None = None) -> float:
    """Mean of an inclusion metric over the modules of one pair (one kind, or all when None)."""
    sub = table if kind is None else table[table["kind"] == kind]
    values = pd.to_numeric(sub[metric], errors="coerce").to_numpy(dtype=float)
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else float("nan")


def inclusion_matrix_from_tables(
    tables: Mapping[tuple[int, int], pd.DataFrame], n: int, metric: str, kind: str | None = None
) -> np.ndarray:
    """Asymmetric matrix: entry ``(i, j)`` = mean over modules of ``metric`` for ``tau_i → tau_j``.

    The diagonal is the self-inclusion (REC = 1, L1 = 0) and is left as NaN unless given.
    """
    out = np.full((n, n), np.nan)
    for (i, j), table in tables.items():
        out[i, j] = module_mean(table, metric, kind)
    return out


def entropy_frame(tables: Mapping[tuple[int, int], pd.DataFrame], names: Sequence[str]) -> pd.DataFrame:
    """Mean normalized entropies ``H(S1)``, ``H(S2)`` per direction ``tau_i → tau_j``."""
    rows = []
    for (i, j), table in tables.items():
        rows.append(
            {
                "tau1 (basis)": names[i],
                "tau2 (projected)": names[j],
                "mean H(S1)": module_mean(table, "h1"),
                "mean H(S2)": module_mean(table, "h2"),
                "modules": int(len(table)),
            }
        )
    return pd.DataFrame(rows)


def spectra_at(table: pd.DataFrame, layer: int, kind: str, stack: str | None = None) -> dict[str, list[float]]:
    """``S1`` and ``S2`` of the module at ``(stack, layer, kind)`` in one inclusion table."""
    sub = table[(table["layer"] == layer) & (table["kind"] == kind)]
    if stack is not None:
        sub = sub[sub["stack"] == stack]
    if sub.empty:
        return {}
    row = sub.iloc[0]
    return {"S1 (τ1 spectrum)": list(map(float, row["s1"])), "S2 (τ2 projected on τ1's basis)": list(map(float, row["s2"]))}


def inclusion_margins(matrix: np.ndarray, names: Sequence[str], metric: str, entropies: pd.DataFrame) -> pd.DataFrame:
    """Per adapter: the row mean (as the basis τ1), the column mean (as the projected τ2) of the
    inclusion matrix, and its spectrum's mean entropy H(S1) as a basis."""
    m = np.asarray(matrix, dtype=float)
    with np.errstate(invalid="ignore"):
        rows = np.nanmean(np.where(np.isfinite(m), m, np.nan), axis=1) if m.size else np.array([])
        cols = np.nanmean(np.where(np.isfinite(m), m, np.nan), axis=0) if m.size else np.array([])
    h1 = entropies.groupby("tau1 (basis)")["mean H(S1)"].mean() if len(entropies) else pd.Series(dtype=float)
    return pd.DataFrame(
        {
            "adapter": list(names),
            f"{metric} as τ1 (row mean)": rows,
            f"{metric} as τ2 (column mean)": cols,
            "mean H(S1)": [float(h1.get(n, np.nan)) for n in names],
        }
    )
