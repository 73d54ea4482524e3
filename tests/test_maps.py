"""2-D maps: PCA on rows, classical MDS, UMAP (precomputed), small n."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import pdist, squareform

from geometry.analysis.maps import embed_2d
from geometry.errors import AtlasError

RNG = np.random.default_rng(0)


def planar(n: int) -> tuple[np.ndarray, np.ndarray]:
    X = RNG.normal(size=(n, 2)) * [3.0, 1.0]
    return X, squareform(pdist(X))


def test_mds_reproduces_planar_distances_exactly():
    _, D = planar(7)
    Y = embed_2d(D, "mds")
    np.testing.assert_allclose(squareform(pdist(Y)), D, atol=1e-10)


def test_pca_on_rows_matches_sklearn_up_to_sign():
    from sklearn.decomposition import PCA

    _, D = planar(6)
    Y = embed_2d(D, "pca")
    ref = PCA(n_components=2).fit_transform(D)
    np.testing.assert_allclose(np.abs(Y), np.abs(ref), atol=1e-10)
    # Orientation is deterministic: the largest coordinate of each axis is positive.
    assert all(Y[np.argmax(np.abs(Y[:, k])), k] > 0 for k in range(2))


def test_two_clusters_separate_on_first_axis():
    X = np.vstack([RNG.normal(0, 0.05, (4, 2)), RNG.normal(5, 0.05, (4, 2))])
    D = squareform(pdist(X))
    for method in ("pca", "mds"):
        first = embed_2d(D, method)[:, 0]
        assert np.sign(first[:4]).tolist() == [np.sign(first[0])] * 4
        assert np.sign(first[4:]).tolist() == [-np.sign(first[0])] * 4


@pytest.mark.parametrize("n", [1, 2, 3])
def test_small_sets(n):
    _, D = planar(n)
    for method in ("pca", "mds"):
        Y = embed_2d(D, method)
        assert Y.shape == (n, 2) and np.all(np.isfinite(Y))
    if n >= 2:
        np.testing.assert_allclose(squareform(pdist(embed_2d(D, "mds"))), D, atol=1e-10)
        with pytest.raises(AtlasError, match="UMAP needs at least 4"):
            embed_2d(D, "umap")


def test_umap_precomputed_is_seeded():
    X = np.vstack([RNG.normal(0, 0.1, (6, 3)), RNG.normal(4, 0.1, (6, 3))])
    D = squareform(pdist(X))
    a = embed_2d(D, "umap", seed=1)
    b = embed_2d(D, "umap", seed=1)
    assert a.shape == (12, 2) and np.all(np.isfinite(a))
    np.testing.assert_allclose(a, b)
    centre0, centre1 = a[:6].mean(0), a[6:].mean(0)
    spread = max(np.linalg.norm(a[:6] - centre0, axis=1).max(), np.linalg.norm(a[6:] - centre1, axis=1).max())
    assert np.linalg.norm(centre0 - centre1) > spread


def test_umap_jit_is_cached_on_disk():
    """umap-learn's uncached jitted functions get numba's disk cache (17.6 s of compile per process before)."""
    import os
    import sys

    from numba.core.caching import NullCache
    from numba.core.dispatcher import Dispatcher

    X = RNG.normal(size=(8, 3))
    embed_2d(squareform(pdist(X)), "umap")
    jitted = [(name, key) for name, module in list(sys.modules.items()) if name.startswith("umap")
              for key, value in vars(module).items() if isinstance(value, Dispatcher)]
    uncached = [(name, key) for name, key in jitted if isinstance(getattr(sys.modules[name], key)._cache, NullCache)]
    assert jitted and not uncached
    index = [f for _, _, files in os.walk(os.environ["NUMBA_CACHE_DIR"]) for f in files
             if f.startswith("umap_.smooth_knn_dist") and f.endswith(".nbi")]
    assert index, "smooth_knn_dist's compiled code is not in the numba cache"


def test_bad_inputs():
    with pytest.raises(AtlasError, match="square"):
        embed_2d(np.zeros((2, 3)))
    with pytest.raises(AtlasError, match="NaN"):
        embed_2d(np.array([[0, np.nan], [np.nan, 0]]))
    with pytest.raises(AtlasError, match="unknown map method"):
        embed_2d(np.zeros((3, 3)), "tsne")


def test_undefined_distances_are_left_out_and_named_not_imputed():
    from geometry.analysis.maps import embed_defined

    rng = np.random.default_rng(0)
    X = rng.normal(size=(5, 3))
    D = np.linalg.norm(X[:, None] - X[None], axis=-1)
    D[4, :4] = D[:4, 4] = np.nan  # adapter "e" has an undefined distance to every other
    names = ["a", "b", "c", "d", "e"]
    mapped = embed_defined(D, names, "mds")
    assert mapped.names == ["a", "b", "c", "d"] and mapped.left_out == ["e"]
    assert ("a", "e") in mapped.undefined and len(mapped.undefined) == 4
    assert "e" in mapped.message and "not imputed" in mapped.message
    np.testing.assert_allclose(mapped.coords, embed_2d(D[:4, :4], "mds"))
    full = embed_defined(np.nan_to_num(D), names, "mds")
    assert full.message is None and full.left_out == []


def test_one_undefined_pair_drops_one_adapter():
    from geometry.analysis.maps import embed_defined

    D = np.ones((4, 4)) - np.eye(4)
    D[1, 2] = D[2, 1] = np.nan
    mapped = embed_defined(D, ["a", "b", "c", "d"], "pca")
    assert mapped.left_out == ["c"] and mapped.names == ["a", "b", "d"]
    assert mapped.undefined == [("b", "c")]
