"""The measures of token dynamics on one layer's token states (numpy only): threshold clustering and its count,
mean pairwise cosine, mean base-vs-adapted cosine distance, a shared 2-D PCA, and the per-layer table.
Used by :mod:`geometry.analysis.tokens`, which computes the states."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from geometry.errors import AtlasError

#: The per-layer measures, in the order of the tables' columns.
METRICS = ("clusters_base", "clusters_adapted", "distance", "pairwise_cosine_base", "pairwise_cosine_adapted")



def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def cluster_labels(x: np.ndarray, threshold: float, linkage: str = "average") -> np.ndarray:
    """Cluster label (0, 1, ...) of each row of ``x (n, d)``: agglomerative clustering on the cosine distance
    with ``linkage``, cut at ``threshold``.

    The partition is sklearn's ``AgglomerativeClustering(n_clusters=None, metric="cosine", linkage=linkage,
    distance_threshold=threshold)`` (groups are merged while their linkage distance is below the threshold;
    ``tests/test_tokens.py`` checks the two agree), computed with scipy's hierarchy: two to three times
    faster on the few dozen points of a text (a batch or a particle run clusters hundreds of point sets).
    Points at distance 0 are merged even at a zero threshold.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise AtlasError(f"cluster_labels: expected an (n, d) array, got shape {x.shape}")
    if not np.isfinite(threshold) or threshold < 0:
        raise AtlasError(f"cluster threshold must be a cosine distance >= 0, got {threshold}")
    n = x.shape[0]
    if n <= 1:
        return np.zeros(n, dtype=int)
    from scipy.cluster.hierarchy import fcluster
    from scipy.cluster.hierarchy import linkage as hierarchy

    u = _unit(x)
    dist = np.clip(1.0 - u @ u.T, 0.0, 2.0)
    condensed = dist[np.triu_indices(n, 1)]
    tree = hierarchy(condensed, method=linkage)
    cut = np.nextafter(max(float(threshold), 1e-12), 0.0)  # merge heights strictly below the threshold
    labels = fcluster(tree, t=cut, criterion="distance")
    _, dense = np.unique(labels, return_inverse=True)
    return dense.astype(int)


def cluster_count(x: np.ndarray, threshold: float, linkage: str = "average") -> float:
    """Number of clusters of the rows of ``x`` (see :func:`cluster_labels`); NaN for no row."""
    if np.asarray(x).shape[0] == 0:
        return float("nan")
    return float(len(np.unique(cluster_labels(x, threshold, linkage))))


def mean_pairwise_cosine(x: np.ndarray) -> float:
    """``mean_{i<j} cos(x_i, x_j)``; NaN with fewer than two rows (no pair)."""
    u = _unit(x)
    n = u.shape[0]
    if n < 2:
        return float("nan")
    gram = u @ u.T
    return float((gram.sum() - np.trace(gram)) / (n * (n - 1)))


def mean_cosine_distance(x: np.ndarray, y: np.ndarray) -> float:
    """``mean_i (1 - cos(x_i, y_i))`` between matched rows; NaN for no row."""
    if np.asarray(x).shape != np.asarray(y).shape:
        raise AtlasError(f"mean_cosine_distance: shapes {np.shape(x)} and {np.shape(y)} differ")
    if np.asarray(x).shape[0] == 0:
        return float("nan")
    # 1 - cos(x, y) = ||u - v||^2 / 2 for the unit vectors u, v: exactly 0 for equal directions (no 1e-17)
    return float(np.mean(0.5 * np.sum((_unit(x) - _unit(y)) ** 2, axis=-1)))


@dataclass
class PCA2:
    """A PCA fit: ``coords = (x - mean) @ components.T`` (``x`` unit-normalised first when ``normalize``)."""

    mean: np.ndarray
    components: np.ndarray
    explained: np.ndarray
    normalize: bool = True

    def transform(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        x = _unit(x) if self.normalize else x
        return (x.reshape(-1, x.shape[-1]) - self.mean) @ self.components.T


def fit_pca(arrays: Iterable[np.ndarray], n_components: int = 2, normalize: bool = True) -> PCA2:
    """One PCA fitted on every row of every array (``(..., d)`` each), signs fixed (largest loading > 0).

    Fewer rows or dimensions than ``n_components`` give zero components for the missing axes.
    """
    rows = [np.asarray(a, dtype=np.float64).reshape(-1, np.shape(a)[-1]) for a in arrays]
    x = np.concatenate(rows) if rows else np.zeros((0, 1))
    if normalize:
        x = _unit(x)
    d = x.shape[1]
    mean = x.mean(axis=0) if len(x) else np.zeros(d)
    centered = x - mean
    if len(x) >= 2:
        from threadpoolctl import threadpool_limits

        # a few hundred rows: one BLAS thread is faster (a multi-threaded LAPACK call took 0.3-3 s here, 0.05 s
        # with one thread, on a shared 2-core machine)
        with threadpool_limits(1, user_api="blas"):
            _, s, vt = np.linalg.svd(centered, full_matrices=False)
    else:
        s, vt = np.zeros(0), np.zeros((0, d))
    comps = np.zeros((n_components, d))
    k = min(n_components, vt.shape[0])
    comps[:k] = vt[:k]
    for i in range(k):
        j = int(np.argmax(np.abs(comps[i])))
        if comps[i, j] < 0:
            comps[i] = -comps[i]
    var = s**2
    explained = np.zeros(n_components)
    if var.sum() > 0:
        explained[:k] = var[:k] / var.sum()
    return PCA2(mean, comps, explained, normalize)


def layer_table(base: np.ndarray, adapted: np.ndarray, threshold: float, adapter: str = "adapter") -> pd.DataFrame:
    """Per-layer measures of one adapter against the base: ``base``, ``adapted`` of shape ``(layers, n, d)``.

    Columns ``adapter, layer, tokens`` and :data:`METRICS` (see the module docstring).
    """
    base, adapted = np.asarray(base), np.asarray(adapted)
    if base.shape != adapted.shape or base.ndim != 3:
        raise AtlasError(f"layer_table: base {base.shape} and adapted {adapted.shape} must be the same (layers, n, d)")
    rows = []
    for layer in range(base.shape[0]):
        b, a = base[layer], adapted[layer]
        rows.append({
            "adapter": adapter, "layer": layer, "tokens": int(b.shape[0]),
            "clusters_base": cluster_count(b, threshold), "clusters_adapted": cluster_count(a, threshold),
            "distance": mean_cosine_distance(b, a),
            "pairwise_cosine_base": mean_pairwise_cosine(b), "pairwise_cosine_adapted": mean_pairwise_cosine(a),
        })
    return pd.DataFrame(rows, columns=["adapter", "layer", "tokens", *METRICS])
