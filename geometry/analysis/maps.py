"""2-D maps of adapters from a distance matrix ``D [n, n]`` (e.g. ``Tbar_d`` of :mod:`geometry.analysis.distances`).

* ``pca``: as in the task-vector geometry paper, PCA on the **rows** of ``D`` (each adapter is
  described by its distances to all adapters); the first two principal component scores.
* ``mds``: classical (Torgerson) MDS: ``K = -1/2 J D^2 J`` with ``J = I - 11^T / n``, coordinates
  ``v_i sqrt(lambda_i)`` of the two largest eigenvalues (negative ones clipped to 0). Euclidean
  distances are reproduced exactly when ``D`` is Euclidean of dimension <= 2.
* ``umap``: ``umap-learn`` with ``metric="precomputed"``, ``n_neighbors = min(15, n - 1)`` and
  ``random_state=seed``. UMAP needs at least :data:`UMAP_MIN_POINTS` adapters; below that
  :func:`embed_2d` raises :class:`AtlasError` saying to use PCA or MDS.

Axes are only defined up to sign (and rotation for UMAP): each PCA / MDS axis is flipped so that
its largest-magnitude coordinate is positive, making maps reproducible. ``n = 1`` maps to the
origin; ``n = 2`` to two points on the first axis.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from geometry.errors import AtlasError

METHODS: tuple[str, ...] = ("pca", "mds", "umap")
UMAP_MIN_POINTS = 4
REPO = Path(__file__).resolve().parents[1]


def _check(D: np.ndarray) -> np.ndarray:
    D = np.asarray(D, dtype=np.float64)
    if D.ndim != 2 or D.shape[0] != D.shape[1]:
        raise AtlasError(f"a distance matrix must be square [n, n]; got shape {D.shape}")
    if not np.all(np.isfinite(D)):
        raise AtlasError("the distance matrix has NaN or infinite entries (undefined distances); cannot map it")
    return (D + D.T) / 2


def _orient(X: np.ndarray) -> np.ndarray:
    for k in range(X.shape[1]):
        col = X[:, k]
        if col.size and col[np.argmax(np.abs(col))] < 0:
            X[:, k] = -col
    return X


def _two_columns(X: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros((n, 2))
    out[:, : min(2, X.shape[1])] = X[:, :2]
    return out


def pca_rows(D: np.ndarray) -> np.ndarray:
    """PCA scores of the rows of ``D`` on the first two components, ``[n, 2]``."""
    X = D - D.mean(axis=0, keepdims=True)
    U, S, _ = np.linalg.svd(X, full_matrices=False)
    return _orient(_two_columns(U * S, D.shape[0]))


def classical_mds(D: np.ndarray) -> np.ndarray:
    """Classical MDS coordinates ``[n, 2]`` (double centering of ``D^2``, top-2 eigenpairs)."""
    n = D.shape[0]
    J = np.eye(n) - np.ones((n, n)) / n
    K = -0.5 * J @ (D * D) @ J
    vals, vecs = np.linalg.eigh((K + K.T) / 2)
    order = np.argsort(vals)[::-1][:2]
    coords = vecs[:, order] * np.sqrt(np.clip(vals[order], 0.0, None))
    return _orient(_two_columns(coords, n))


def numba_cache_dir() -> Path:
    """Where the dashboard has numba keep UMAP's compiled code (it sets ``NUMBA_CACHE_DIR`` to this): outside
    the repository, in the user's cache folder (``$XDG_CACHE_HOME`` or ``~/.cache``) under
    ``adapter-atlas/numba``. The library itself sets nothing: without ``NUMBA_CACHE_DIR`` UMAP compiles in
    memory for the process."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "adapter-atlas" / "numba"


def warm_umap() -> float:
    """Compile UMAP's numba code once (a fit on 8 random points); returns the seconds it took.

    The first UMAP fit of a process otherwise pays the compile (minutes on 2 cores without a warm
    numba cache); the dashboard runs this in a background thread at server start.
    """

    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    X = rng.normal(size=(8, 3))
    umap_embed(np.linalg.norm(X[:, None] - X[None], axis=-1), seed=0)
    return time.perf_counter() - t0


def _cache_umap_jit() -> int:
    """Turn on numba's disk cache for umap-learn's jitted functions that do not ask for it.

    ``smooth_knn_dist``, ``compute_membership_strengths``, ``fast_knn_indices`` and the layout epoch are
    ``@numba.njit`` without ``cache=True``, so every new process compiled them again: 17.6 s of one core
    at each server start, on the path of the first UMAP map and beside every session's clicks. With the
    cache on (``NUMBA_CACHE_DIR``) a later process loads them. Returns the number of functions switched.
    """

    from numba.core.caching import NullCache
    from numba.core.dispatcher import Dispatcher

    switched = 0
    for name, module in list(sys.modules.items()):
        if name == "umap" or name.startswith("umap."):
            for value in list(vars(module).values()):
                if isinstance(value, Dispatcher) and isinstance(value._cache, NullCache):
                    value.enable_caching()
                    switched += 1
    return switched


def umap_embed(D: np.ndarray, seed: int = 0) -> np.ndarray:
    """UMAP on the precomputed distances (``umap-learn``, imported lazily)."""
    n = D.shape[0]
    if n < UMAP_MIN_POINTS:
        raise AtlasError(
            f"UMAP needs at least {UMAP_MIN_POINTS} adapters to build a neighbour graph (got {n}); use PCA or MDS"
        )
    import umap  # slow import (numba): only when asked for

    if os.environ.get("NUMBA_CACHE_DIR"):  # the caller chose a compile cache (the dashboard does): use it
        _cache_umap_jit()
    reducer = umap.UMAP(
        n_components=2, metric="precomputed", n_neighbors=min(15, n - 1), random_state=seed, init="random" if n < 8 else "spectral"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # precomputed-metric and random_state/n_jobs notices
        return np.asarray(reducer.fit_transform(D), dtype=np.float64)


def embed_2d(D: np.ndarray, method: str = "pca", seed: int = 0) -> np.ndarray:
    """2-D coordinates ``[n, 2]`` of the ``n`` adapters whose distance matrix is ``D``."""
    D = _check(D)
    n = D.shape[0]
    if n == 0:
        return np.zeros((0, 2))
    if n == 1:
        return np.zeros((1, 2))
    if method == "pca":
        return pca_rows(D)
    if method == "mds":
        return classical_mds(D)
    if method == "umap":
        return umap_embed(D, seed)
    raise AtlasError(f"unknown map method {method!r}; expected one of {', '.join(METHODS)}")


@dataclass
class Map2D:
    """A 2-D map of the adapters whose distances are all defined.

    ``coords [k, 2]`` for ``names`` (the adapters kept); ``left_out`` are adapters dropped because
    some of their distances are undefined (NaN), with ``undefined`` the pairs that were NaN.
    Undefined distances are never imputed: an adapter is either mapped from true distances or named.
    """

    coords: np.ndarray
    names: list[str]
    left_out: list[str]
    undefined: list[tuple[str, str]]
    method: str

    @property
    def message(self) -> str | None:
        """One sentence naming the adapters left out and the pairs that caused it (``None`` when none)."""
        if not self.left_out:
            return None
        shown = ", ".join(f"{a} ↔ {b}" for a, b in self.undefined[:6])
        more = f" and {len(self.undefined) - 6} more" if len(self.undefined) > 6 else ""
        return (
            f"Left out of the map: {', '.join(self.left_out)} (undefined distance for {shown}{more}; "
            "undefined distances are not imputed)"
        )


def embed_defined(D: np.ndarray, names: list[str], method: str = "pca", seed: int = 0) -> Map2D:
    """:func:`embed_2d` of the largest set of adapters found whose pairwise distances are all defined.

    Greedy: while an undefined (NaN / infinite) entry remains, drop the adapter with the most of them
    (the later one on ties). The undefined pairs and the adapters dropped are returned, named.
    """
    D = np.asarray(D, dtype=np.float64)
    if D.ndim != 2 or D.shape[0] != D.shape[1] or D.shape[0] != len(names):
        raise AtlasError(f"a distance matrix [n, n] for {len(names)} adapters is needed; got shape {D.shape}")
    bad = ~np.isfinite(D)
    undefined = [(names[i], names[j]) for i in range(len(names)) for j in range(i + 1, len(names)) if bad[i, j] or bad[j, i]]
    keep = list(range(len(names)))
    while keep:
        sub = bad[np.ix_(keep, keep)]
        counts = sub.sum(0) + sub.sum(1)
        if not counts.any():
            break
        worst = max(range(len(keep)), key=lambda k: (counts[k], k))
        keep.pop(worst)
    left_out = [names[i] for i in range(len(names)) if i not in keep]
    coords = embed_2d(D[np.ix_(keep, keep)], method=method, seed=seed)
    return Map2D(coords, [names[i] for i in keep], left_out, undefined, method)
