"""Token dynamics on the real sample base (all-MiniLM-L6-v2): measures, shared PCA, zero LoRA, batch, CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from safetensors.torch import load_file, save_file

from geometry.analysis import tokens as tk
from geometry.errors import AtlasError, IncompatibleAdaptersError
from tests.app_fixtures import write_adapter

REPO_SAMPLES = Path(__file__).resolve().parents[1] / "sample_adapters" / "synthetic"
TEXT = "A man is playing a guitar on the stage."


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokens")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ADAPTER_ATLAS_CACHE", str(root / "cache"))
        yield root


@pytest.fixture(scope="module")
def adapters(env):
    from geometry.io.loader import load_adapter

    return [load_adapter(REPO_SAMPLES / "nli"), load_adapter(REPO_SAMPLES / "negation")]


@pytest.fixture(scope="module")
def zero_adapter(env):
    """The nli adapter with every lora_B set to zero: tau = 0, the adapted model is the base."""
    from geometry.io.loader import load_adapter

    folder = env / "nli_zero"
    folder.mkdir()
    shutil.copy(REPO_SAMPLES / "nli" / "adapter_config.json", folder)
    tensors = load_file(str(REPO_SAMPLES / "nli" / "adapter_model.safetensors"))
    tensors = {k: (v * 0 if "lora_B" in k else v) for k, v in tensors.items()}
    assert any("lora_B" in k for k in tensors)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return load_adapter(folder, name="nli_zero")


@pytest.fixture(scope="module")
def dyn(adapters):
    return tk.token_dynamics(adapters, TEXT, threshold=0.5)


# ---------------------------------------------------------------------------------------------- measures
def _groups(centres: np.ndarray, per: int, noise: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([c + noise * rng.standard_normal((per, len(c))) for c in centres])


def test_cluster_count_of_known_configurations():
    eye = np.eye(6)
    assert tk.cluster_count(_groups(eye[:3], 5, 0.01), 0.1) == 3  # three tight groups on orthogonal axes
    assert tk.cluster_count(_groups(eye[:3], 5, 0.01) * 7.0, 0.1) == 3  # cosine: the scale does not matter
    assert tk.cluster_count(eye, 0.5) == 6  # orthogonal: cosine distance 1 > 0.5
    assert tk.cluster_count(eye, 1.01) == 1  # ... merged once the cut passes 1
    assert tk.cluster_count(np.ones((4, 3)), 0.0) == 1  # identical points merge even at a zero cut
    assert tk.cluster_count(np.ones((1, 3)), 0.5) == 1
    assert np.isnan(tk.cluster_count(np.zeros((0, 3)), 0.5))
    labels = tk.cluster_labels(_groups(eye[:2], 3, 0.01), 0.1)
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_clustering_is_sklearns_agglomerative_average_cosine():
    from sklearn.cluster import AgglomerativeClustering
    from sklearn.metrics import adjusted_rand_score

    rng = np.random.default_rng(1)
    for _ in range(60):
        n, d, cut = int(rng.integers(2, 30)), int(rng.integers(2, 12)), float(rng.uniform(0.05, 1.5))
        x = rng.standard_normal((n, d))
        ref = AgglomerativeClustering(n_clusters=None, metric="cosine", linkage="average",
                                      distance_threshold=cut).fit_predict(x)
        assert adjusted_rand_score(tk.cluster_labels(x, cut), ref) == 1.0


def test_pairwise_cosine_and_distance_values_and_nan():
    x = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    c = np.sqrt(0.5)
    assert tk.mean_pairwise_cosine(x) == pytest.approx((0.0 + c + c) / 3)
    assert np.isnan(tk.mean_pairwise_cosine(x[:1]))  # one token: no pair, undefined (not 0)
    assert tk.mean_cosine_distance(x, x * 3) == pytest.approx(0.0, abs=1e-15)
    assert tk.mean_cosine_distance(x[:2], x[[1, 0]]) == pytest.approx(1.0)
    table = tk.layer_table(np.ones((3, 1, 4)), np.ones((3, 1, 4)), 0.5, "a")
    assert table["pairwise_cosine_base"].isna().all() and (table["clusters_base"] == 1).all()


# ---------------------------------------------------------------------------------------------- real model
def test_table_shape_and_layer_zero(dyn, adapters):
    t = dyn.table
    assert list(t["adapter"].unique()) == ["nli", "negation"]
    assert sorted(t["layer"].unique()) == list(range(7))  # embeddings + 6 blocks of MiniLM-L6
    assert (t["tokens"] == len(dyn.tokens)).all() and dyn.tokens[0] == "[CLS]" and dyn.tokens[-1] == "[SEP]"
    assert (t.loc[t["layer"] == 0, "distance"] == 0).all()  # LoRA on q / v: the embeddings are untouched
    assert (t.loc[t["layer"] == 6, "distance"] > 0.05).all()  # ... and the trajectories have separated at the end
    base = t[t["adapter"] == "nli"][["clusters_base", "pairwise_cosine_base"]].to_numpy()
    assert np.array_equal(base, t[t["adapter"] == "negation"][["clusters_base", "pairwise_cosine_base"]].to_numpy())
    # the table's numbers are the measures of the stored states
    s = dyn.states
    np.testing.assert_allclose(t["distance"].iloc[3], tk.mean_cosine_distance(s.base[3], s.adapted["nli"][3]))
    assert t["clusters_adapted"].iloc[5] == tk.cluster_count(s.adapted["nli"][5], 0.5)


def test_pca_is_one_fit_shared_by_layers_and_models(dyn):
    s = dyn.states
    ref = tk.fit_pca([s.base, *s.adapted.values()], 2, normalize=True)
    np.testing.assert_allclose(dyn.pca.components, ref.components, atol=1e-10)
    for model, arr in [("base", s.base), *s.adapted.items()]:
        for layer in (0, 3, 6):
            pts = dyn.points[(dyn.points["model"] == model) & (dyn.points["layer"] == layer)]
            np.testing.assert_allclose(pts[["x", "y"]].to_numpy(), ref.transform(arr[layer]), atol=1e-10)
    # a fit per layer (or per model) would give other axes: the shared fit is not that
    own = tk.fit_pca([s.base[6]], 2)
    assert not np.allclose(np.abs(own.components), np.abs(ref.components), atol=1e-3)
    assert set(dyn.points["model"]) == {"base", "nli", "negation"}
    assert len(dyn.points) == 3 * 7 * len(dyn.tokens)


def test_zero_lora_gives_the_base(zero_adapter, adapters):
    (states,) = tk.hidden_states([zero_adapter, adapters[0]], [TEXT])
    assert np.array_equal(states.adapted["nli_zero"], states.base)
    assert not np.allclose(states.adapted["nli"][1:], states.base[1:])
    t = tk.token_dynamics([zero_adapter], TEXT).table
    assert (t["distance"] == 0).all()
    assert np.array_equal(t["clusters_base"], t["clusters_adapted"])
    assert np.array_equal(t["pairwise_cosine_base"], t["pairwise_cosine_adapted"])


def test_padding_ignored_and_special_tokens_option(adapters):
    short, long = "Hi there.", "A much longer sentence that forces padding of the short one in the same batch."
    both = tk.hidden_states(adapters[:1], [short, long])
    (alone,) = tk.hidden_states(adapters[:1], [short])
    assert both[0].tokens == alone.tokens == ["[CLS]", "hi", "there", ".", "[SEP]"]
    np.testing.assert_allclose(both[0].base, alone.base, atol=2e-5)
    np.testing.assert_allclose(both[0].adapted["nli"], alone.adapted["nli"], atol=2e-5)
    plain = tk.token_dynamics(adapters[:1], short, include_special=False)
    assert plain.tokens == ["hi", "there", "."] and (plain.table["tokens"] == 3).all()
    one = tk.token_dynamics(adapters[:1], "Hi", include_special=False)  # one token: pairwise undefined
    assert one.table["pairwise_cosine_base"].isna().all() and any("undefined" in n for n in one.notes)


def test_batch_mode_mean_and_spread(adapters):
    res = tk.batch_dynamics(adapters, task=REPO_SAMPLES / "tasks" / "nli", limit=4, threshold=0.5)
    assert len(res.texts) == 4 and res.texts == tk.task_texts(REPO_SAMPLES / "tasks" / "nli", "validation", 4)
    assert len(res.per_text) == 4 * 7 * 2
    row = res.summary[(res.summary["adapter"] == "negation") & (res.summary["layer"] == 4)
                      & (res.summary["metric"] == "distance")].iloc[0]
    vals = res.per_text[(res.per_text["adapter"] == "negation") & (res.per_text["layer"] == 4)]["distance"]
    assert row["n"] == 4 and row["mean"] == pytest.approx(vals.mean()) and row["std"] == pytest.approx(vals.std())
    single = tk.token_dynamics(adapters, res.texts[2], threshold=0.5).table
    mine = res.per_text[res.per_text["text_index"] == 2].drop(columns="text_index").reset_index(drop=True)
    pd.testing.assert_frame_equal(mine, single, check_exact=False, atol=1e-6)


def test_batch_mode_reports_progress_and_an_interrupted_run_keeps_and_resumes(adapters, monkeypatch, tmp_path):
    from geometry.cache import ResultCache

    task = REPO_SAMPLES / "tasks" / "nli"
    cache = ResultCache(tmp_path / "cache")  # what an interrupted run kept: the finished steps
    monkeypatch.setattr(tk, "BATCH_CHUNK", 2)
    steps, partials, stop_at = [], [], [4]

    class Stop(Exception):
        pass

    def progress(done, total, message):
        steps.append((done, total))
        if done in stop_at:
            raise Stop  # a Cancel click stops the script at its next progress update

    assert tk.batch_dynamics(adapters[:1], task=task, limit=5, threshold=0.45, cached_only=True, cache=cache) is None
    with pytest.raises(Stop):
        tk.batch_dynamics(adapters[:1], task=task, limit=5, threshold=0.45, progress=progress,
                          partial=partials.append, cache=cache)
    assert steps == [(2, 5), (4, 5)]
    kept = partials[-1]
    assert len(kept.texts) == 4 and sorted(kept.per_text["text_index"].unique()) == [0, 1, 2, 3]
    assert "4 of 5 finished" in kept.source and kept.summary["n"].max() == 4
    calls = []
    real = tk.hidden_states
    monkeypatch.setattr(tk, "hidden_states", lambda ads, chunk, **kw: calls.append(list(chunk)) or real(ads, chunk, **kw))
    steps.clear()
    stop_at.clear()
    full = tk.batch_dynamics(adapters[:1], task=task, limit=5, threshold=0.45, progress=progress, cache=cache)
    assert calls == [tk.task_texts(task, "validation", 5)[4:]]  # only the input not done before runs
    assert steps == [(2, 5), (4, 5), (5, 5)] and len(full.texts) == 5 and "finished" not in full.source
    whole = tk.batch_dynamics(adapters[:1], task=task, limit=5, threshold=0.45)
    pd.testing.assert_frame_equal(full.per_text, whole.per_text)  # the steps add up to one run
    pd.testing.assert_frame_equal(kept.per_text, whole.per_text[whole.per_text["text_index"] < 4])
    cached = tk.batch_dynamics(adapters[:1], task=task, limit=5, threshold=0.45, cached_only=True, cache=cache)
    pd.testing.assert_frame_equal(cached.per_text, full.per_text)
    assert tk.batch_dynamics(adapters[:1], task=task, limit=5, threshold=0.45, cached_only=True) is None  # no cache


def test_errors_are_clear(adapters, tmp_path):
    from geometry.io.loader import load_adapter

    with pytest.raises(tk.TokenInputError, match="empty"):
        tk.token_dynamics(adapters, "   ")
    tiny = load_adapter(write_adapter(tmp_path / "tiny", seed=0))
    with pytest.raises(tk.BaseLoadError, match=r"cannot load the base model 'tiny/bert-like' of tiny"):
        tk.token_dynamics([tiny], TEXT)
    with pytest.raises(IncompatibleAdaptersError, match="different base models"):
        tk.token_dynamics([tiny, adapters[0]], TEXT)
    with pytest.raises(AtlasError, match="threshold"):
        tk.token_dynamics(adapters, TEXT, threshold=-1)


# ---------------------------------------------------------------------------------------------- command line
def test_cli_csv_json_and_empty_text(capsys, dyn, monkeypatch):
    from geometry.cli import main

    monkeypatch.setenv("ADAPTER_ATLAS_THREADS", "1")  # main() sets torch's thread count: keep this process's

    nli = str(REPO_SAMPLES / "nli")
    assert main(["tokens", nli, "--text", TEXT, "--format", "csv"]) == 0
    out = capsys.readouterr().out
    import io

    table = pd.read_csv(io.StringIO(out))
    assert list(table.columns) == ["adapter", "layer", "tokens", *tk.METRICS] and len(table) == 7
    ref = dyn.table[dyn.table["adapter"] == "nli"].reset_index(drop=True)
    np.testing.assert_allclose(table["distance"], ref["distance"], rtol=1e-9)
    assert main(["tokens", nli, "--text", "Hi", "--no-special", "--format", "json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert len(records) == 7 and records[0]["pairwise_cosine_base"] is None  # NaN is written as null
    assert main(["tokens", nli, "--text", ""]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "empty" in err[0]
