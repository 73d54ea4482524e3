"""Picking a subset of the adapters slices the full set's cached distances instead of recomputing."""

from __future__ import annotations

import numpy as np
import pytest

from tests.app_fixtures import decode, page_test, plotly_specs, write_sample_set

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture()
def samples(tmp_path, monkeypatch):
    root = write_sample_set(tmp_path / "samples", n=4, layers=3)
    monkeypatch.setenv("ADAPTER_ATLAS_SAMPLES", str(root))
    monkeypatch.setenv("ADAPTER_ATLAS_CACHE", str(tmp_path / "cache"))
    return root


@pytest.mark.slow
def test_subset_is_sliced_from_the_full_set(samples, monkeypatch):
    import geometry.analysis.distances as gd
    from geometry.io.loader import load_adapter

    calls = []
    real = gd.all_distances
    monkeypatch.setattr(gd, "all_distances", lambda ads, *a, **k: calls.append(len(ads)) or real(ads, *a, **k))
    at = page_test("distances.py")
    assert not at.exception and calls == [4]
    at.multiselect(key="compare").set_value(["task0", "task2", "task3"]).run()
    assert not at.exception and calls == [4]  # nothing recomputed
    shown = np.asarray(decode(plotly_specs(at)[0]["data"][0]["z"]), dtype=float)
    subset = [load_adapter(str(samples / n), name=n) for n in ("task0", "task2", "task3")]
    expected = real(subset)["cosine", "ba", "model", "v"].reduce("all")
    np.testing.assert_allclose(shown, expected, rtol=1e-12, atol=1e-15)
    assert plotly_specs(at)[1]["data"][0]["text"] == ["task0", "task2", "task3"]


def test_umap_while_compiling_shows_pca_and_says_so(samples, monkeypatch):
    from ui import warmup

    monkeypatch.setattr(warmup, "start", lambda: None)
    monkeypatch.setattr(warmup, "umap_ready", lambda: False)
    at = page_test("distances.py", {"map": "UMAP"})
    assert not at.exception
    assert any("UMAP is being compiled" in c.value for c in at.caption)
    assert "PCA" in plotly_specs(at)[1]["layout"]["xaxis"]["title"]["text"]
    monkeypatch.setattr(warmup, "umap_ready", lambda: True)
    monkeypatch.setattr(warmup, "umap_error", lambda: "ImportError: no umap")
    at.run()
    assert any("UMAP is unavailable (ImportError: no umap)" in c.value for c in at.caption)
