"""Re-slicing of precomputed geometry for the pages: what a slider or a toggle triggers.

Pure functions (no Streamlit import): they take the results the library computed once per adapter
set (``DistanceTensor`` objects, inclusion / anatomy tables) and the control values, and return
the matrices and long tables the figures draw. No geometry is computed here: averaging a
precomputed distance over the chosen layers is ``DistanceTensor.reduce``; inclusion tables are
only filtered and averaged over modules, exactly as ``geometry.analysis.inclusion.inclusion_matrix`` does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from geometry.types import ordered_kinds, ordered_stacks

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
    """A layer selection from the page control, as a ``geometry.analysis.distances.select_layers`` spec."""

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
    from geometry.analysis.distances import select_layers

    return [int(v) for v in select_layers(list(available), choice.spec)]


def distance_keys(dists: Mapping[tuple, object]) -> pd.DataFrame:
    """The (metric, factor, stack, kind) combinations present, as a table."""
    return pd.DataFrame(list(dists.keys()), columns=["metric", "factor", "stack", "kind"])


def kinds_of(dists: Mapping[tuple, object], stack: str | None = None) -> list[str]:

    return ordered_kinds(k[3] for k in dists if stack is None or k[2] == stack)


def stacks_of(dists: Mapping[tuple, object]) -> list[str]:

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










def spectra_at(table: pd.DataFrame, layer: int, kind: str, stack: str | None = None) -> dict[str, list[float]]:
    """``S1`` and ``S2`` of the module at ``(stack, layer, kind)`` in one inclusion table."""
    sub = table[(table["layer"] == layer) & (table["kind"] == kind)]
    if stack is not None:
        sub = sub[sub["stack"] == stack]
    if sub.empty:
        return {}
    row = sub.iloc[0]
    return {"S1 (τ1 spectrum)": list(map(float, row["s1"])), "S2 (τ2 projected on τ1's basis)": list(map(float, row["s2"]))}
