"""Summaries of spectral-inclusion tables (:func:`geometry.analysis.inclusion.inclusion`): what the Inclusion
page and the CLI show beside the per-module rows.

* :func:`inclusion_curves`: the per-layer rows of several directions ``tau1 -> tau2`` in one long table.
* :func:`inclusion_means`: per direction and kind, the mean over layers of ``l1``, ``l1_normalized``,
  ``rec``, ``h1 = H(S1)``, ``h2 = H(S2)`` (NaN rows, e.g. REC where ``S2 = 0``, are left out of a mean;
  a mean of nothing is NaN).
* :func:`entropy_table`: per ordered pair ``tau_i -> tau_j``, the mean ``H(S1)`` and ``H(S2)``.
* :func:`inclusion_margins`: per adapter, the row mean (as the basis ``tau1``) and the column mean
  (as the projected ``tau2``) of an inclusion matrix, off the diagonal, and its mean ``H(S1)``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

MEAN_COLUMNS = {"l1": "mean L1 (raw)", "l1_normalized": "mean L1 (normalized)", "rec": "mean REC",
                "h1": "mean H(S1)", "h2": "mean H(S2)"}


def _finite_mean(values: pd.Series) -> float:
    v = pd.to_numeric(values, errors="coerce").to_numpy(dtype=float)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else float("nan")


def inclusion_curves(
    tables: Mapping[str, pd.DataFrame], *, kind: str | Iterable[str] | None = None, stack: str | None = None
) -> pd.DataFrame:
    """The rows of each direction's table (``{"a -> b": table}``) of ``kind`` / ``stack``, with a ``direction``
    column first and without the spectra ``s1``, ``s2``."""
    kinds = None if kind is None else {kind} if isinstance(kind, str) else set(kind)
    parts = []
    for direction, table in tables.items():
        sub = table if kinds is None else table[table["kind"].isin(kinds)]
        if stack is not None:
            sub = sub[sub["stack"] == stack]
        sub = sub.drop(columns=[c for c in ("s1", "s2") if c in sub.columns]).copy()
        sub.insert(0, "direction", direction)
        parts.append(sub)
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def inclusion_means(curves: pd.DataFrame) -> pd.DataFrame:
    """Per ``direction`` and ``kind`` of :func:`inclusion_curves`, the mean over layers of each metric
    (columns named as in :data:`MEAN_COLUMNS`; undefined values left out, none defined: NaN)."""
    if curves.empty:
        return pd.DataFrame(columns=["direction", "kind", *MEAN_COLUMNS.values()])
    rows = []
    for (direction, kind), sub in curves.groupby(["direction", "kind"], sort=False):
        rows.append({"direction": direction, "kind": kind,
                     **{label: _finite_mean(sub[col]) for col, label in MEAN_COLUMNS.items()}})
    return pd.DataFrame(rows)


def entropy_table(tables: Mapping[tuple[int, int], pd.DataFrame], names: Sequence[str]) -> pd.DataFrame:
    """Per ordered pair ``(i, j)`` of :func:`~geometry.analysis.inclusion.inclusion_tables`: ``tau1 (basis)``,
    ``tau2 (projected)``, the mean ``H(S1)`` and ``H(S2)`` over modules, and the number of modules."""
    return pd.DataFrame([
        {"tau1 (basis)": names[i], "tau2 (projected)": names[j], "mean H(S1)": _finite_mean(t["h1"]),
         "mean H(S2)": _finite_mean(t["h2"]), "modules": int(len(t))}
        for (i, j), t in tables.items()
    ], columns=["tau1 (basis)", "tau2 (projected)", "mean H(S1)", "mean H(S2)", "modules"])


def inclusion_margins(matrix: pd.DataFrame, entropies: pd.DataFrame, *, label: str = "REC") -> pd.DataFrame:
    """Per adapter of the square ``matrix`` (row ``tau_i -> column tau_j``, e.g. ``geometry.inclusion_matrix``):
    the mean of its row (as the basis ``tau1``) and of its column (as the projected ``tau2``), both off
    the diagonal (an adapter with itself says nothing about the others), and its mean ``H(S1)`` as a basis
    from :func:`entropy_table`."""
    names = [str(c) for c in matrix.columns]
    m = matrix.to_numpy(dtype=float).copy()
    np.fill_diagonal(m, np.nan)
    m[~np.isfinite(m)] = np.nan
    with warnings.catch_warnings():  # an all-NaN row warns 'Mean of empty slice'; its NaN is the answer
        warnings.simplefilter("ignore", RuntimeWarning)
        rows = np.nanmean(m, axis=1) if m.size else np.array([])
        cols = np.nanmean(m, axis=0) if m.size else np.array([])
    h1 = entropies.groupby("tau1 (basis)")["mean H(S1)"].mean() if len(entropies) else pd.Series(dtype=float)
    return pd.DataFrame({
        "adapter": names,
        f"{label} as τ1 (row mean)": rows,
        f"{label} as τ2 (column mean)": cols,
        "mean H(S1)": [float(h1.get(n, np.nan)) for n in names],
    })

