"""Merged adapters as peft folders: round trip through PeftModel, and peft's add_weighted_adapter."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from peft import PeftModel
from peft.utils import merge_utils

from geometry.io.loader import load_adapter
from geometry.merging import MERGE_METHODS, merge
from geometry.merging.elementwise import module_seed
from geometry.types import ModuleKey
from tests.families import peft_delta, save_adapter, tiny_model


def _load_peft(family: str, folders: dict[str, object], seed: int = 0):
    base = tiny_model(family, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        names = list(folders)
        pm = PeftModel.from_pretrained(base, str(folders[names[0]]), adapter_name=names[0])
        for name in names[1:]:
            pm.load_adapter(str(folders[name]), adapter_name=name)
    return pm


def _check_round_trip(family, merged, folder, rank=None, tol=1e-5):
    base = tiny_model(family, 0)
    w0 = {k: v.clone().double() for k, v in base.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(base, str(folder)).merge_and_unload()
    sd = loaded.state_dict()
    ups = merged.peft_updates()
    assert ups
    for name, up in ups.items():
        w = sd[f"{name}.weight"].double()
        delta = up.dense().T if up.fan_in_fan_out else up.dense()
        if rank is None:
            assert float((w - w0[f"{name}.weight"] - delta).abs().max()) <= tol * float(delta.abs().max()), name
    return sd


@pytest.fixture(scope="module")
def bert_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert")
    p1, _ = save_adapter("bert", root / "sst", seed=1, r=4, lora_alpha=8)
    p2, _ = save_adapter("bert", root / "nli", seed=2, r=4, lora_alpha=16)
    return p1, p2


@pytest.mark.parametrize("method", sorted(MERGE_METHODS))
def test_round_trip_every_method(method, bert_pair, tmp_path):
    ads = [load_adapter(p) for p in bert_pair]
    merged = merge(ads, method)
    folder = merged.to_peft_folder(tmp_path / method, head="nli")
    sd = _check_round_trip("bert", merged, folder)
    # the chosen task's head is the classifier of the loaded model; every head is kept aside
    assert torch.equal(sd["classifier.weight"], ads[1].other_tensors["base_model.model.classifier.weight"])
    assert {p.name for p in (folder / "heads").iterdir()} == {"sst.safetensors", "nli.safetensors"}
    info = json.loads((folder / "merge_info.json").read_text())
    assert info["method"] == method and info["sources"] == ["sst", "nli"]
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["lora_alpha"] == config["r"] and not config["use_rslora"]


def test_round_trip_truncated_rank_and_energy(bert_pair, tmp_path):
    ads = [load_adapter(p) for p in bert_pair]
    merged = merge(ads, "ties", density=0.3)
    folder = merged.to_peft_folder(tmp_path / "r3", rank=3)
    info = json.loads((folder / "merge_info.json").read_text())
    assert set(info["ranks"].values()) == {3}
    assert 0.0 < info["energy_kept_total"] < 1.0
    loaded = load_adapter(folder)
    for key, mod in merged.modules.items():
        d = mod.dense()
        S = torch.linalg.svdvals(d)
        got = loaded.modules[key].dense()
        assert float((d - got).norm() ** 2) == pytest.approx(float((S[3:] ** 2).sum()), rel=1e-4)


def test_round_trip_rslora_rank_pattern_and_fused_gpt2(tmp_path):
    p1, _ = save_adapter("gpt2", tmp_path / "a", seed=1, r=4, lora_alpha=8, use_rslora=True,
                         rank_pattern={"c_fc": 2}, alpha_pattern={"c_proj": 3.0})
    p2, _ = save_adapter("gpt2", tmp_path / "b", seed=2, r=6, lora_alpha=6)
    ads = [load_adapter(p1), load_adapter(p2)]
    for method in ("task_arithmetic", "ties", "multislerp"):
        merged = merge(ads, method, weights=[0.7, -0.4] if method != "multislerp" else None)
        folder = merged.to_peft_folder(tmp_path / method)
        _check_round_trip("gpt2", merged, folder)
    # exact task arithmetic equals the weighted sum of peft's own delta weights
    pm = _load_peft("gpt2", {"a": p1, "b": p2})
    merged = merge(ads, "task_arithmetic", weights=[0.7, -0.4])
    for name, up in merged.peft_updates().items():
        ref = 0.7 * peft_delta(pm, name, "a") + -0.4 * peft_delta(pm, name, "b")
        assert float((up.dense() - ref).abs().max()) < 1e-5 * float(ref.abs().max())


@pytest.fixture(scope="module")
def headless_pair(tmp_path_factory):
    """peft refuses to combine adapters that each save a head (modules_to_save): no head here."""
    root = tmp_path_factory.mktemp("headless")
    p1, _ = save_adapter("bert", root / "sst", seed=1, r=4, lora_alpha=8, task_type=None)
    p2, _ = save_adapter("bert", root / "nli", seed=2, r=4, lora_alpha=16, task_type=None)
    return p1, p2


def _peft_merge(pm, combination_type, weights, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.add_weighted_adapter(["sst", "nli"], weights, "m", combination_type=combination_type, **kw)


def test_peft_cat_equals_exact_task_arithmetic(headless_pair):
    pm = _load_peft("bert", {"sst": headless_pair[0], "nli": headless_pair[1]})
    _peft_merge(pm, "cat", [0.6, 1.3])
    ours = merge([load_adapter(p) for p in headless_pair], "task_arithmetic", weights=[0.6, 1.3])
    for name, up in ours.peft_updates().items():
        ref = peft_delta(pm, name, "m")
        assert float((up.dense() - ref).abs().max()) < 1e-5 * float(ref.abs().max())


def test_peft_svd_equals_truncated_task_arithmetic(headless_pair):
    pm = _load_peft("bert", {"sst": headless_pair[0], "nli": headless_pair[1]})
    _peft_merge(pm, "svd", [1.0, 1.0], svd_rank=5)
    ours = merge([load_adapter(p) for p in headless_pair], "task_arithmetic", rank=5)
    for name, up in ours.peft_updates().items():
        ref = peft_delta(pm, name, "m")
        assert float((up.dense() - ref).abs().max()) < 1e-4 * float(ref.abs().max())


def test_peft_linear_is_lora_average_with_squared_weights(headless_pair):
    pm = _load_peft("bert", {"sst": headless_pair[0], "nli": headless_pair[1]})
    _peft_merge(pm, "linear", [0.25, 0.25])
    ours = merge([load_adapter(p) for p in headless_pair], "lora_average")  # w = 1/2 each
    for name, up in ours.peft_updates().items():
        ref = peft_delta(pm, name, "m")
        assert float((up.dense() - ref).abs().max()) < 1e-5 * float(ref.abs().max())


@pytest.mark.parametrize("ours, theirs", [("ties", "ties_svd"), ("magnitude_prune", "magnitude_prune_svd")])
def test_peft_full_rank_svd_variants_equal_our_dense_methods(headless_pair, ours, theirs):
    pm = _load_peft("bert", {"sst": headless_pair[0], "nli": headless_pair[1]})
    _peft_merge(pm, theirs, [1.0, 0.7], density=0.3, svd_rank=32)
    merged = merge([load_adapter(p) for p in headless_pair], ours, weights=[1.0, 0.7], density=0.3,
                   keep_dense=True)
    for name, up in merged.peft_updates().items():  # svd_rank = 32 = min(m, n) everywhere: exact
        ref = peft_delta(pm, name, "m")
        assert float((up.dense() - ref).abs().max()) < 1e-4 * float(ref.abs().max()), name


@pytest.mark.parametrize("ours", ["dare_linear", "dare_ties"])
def test_peft_dare_svd_with_the_same_masks(tmp_path, ours, monkeypatch):
    one = dict(target_modules=["query"], layers_to_transform=[0], r=4, task_type=None)
    p1, _ = save_adapter("bert", tmp_path / "sst", seed=1, lora_alpha=8, **one)
    p2, _ = save_adapter("bert", tmp_path / "nli", seed=2, lora_alpha=4, **one)
    pm = _load_peft("bert", {"sst": p1, "nli": p2})
    # peft draws its masks from the global generator after initialising the new adapter (which
    # draws too): seed it right before the first mask, then peft's own pruning runs unchanged
    original, seeded = merge_utils.random_pruning, []

    def seeded_pruning(*args, **kwargs):
        if not seeded:
            torch.manual_seed(module_seed(3, ModuleKey("model", 0, "q")))
            seeded.append(True)
        return original(*args, **kwargs)

    monkeypatch.setattr(merge_utils, "random_pruning", seeded_pruning)
    _peft_merge(pm, f"{ours}_svd", [1.0, 0.5], density=0.5, svd_rank=32)
    merged = merge([load_adapter(p1), load_adapter(p2)], ours, weights=[1.0, 0.5], density=0.5, seed=3,
                   keep_dense=True, device="cpu")  # peft's masks come from the CPU generator
    (name, up), = merged.peft_updates().items()
    ref = peft_delta(pm, name, "m")
    assert float((up.dense() - ref).abs().max()) < 1e-4 * float(ref.abs().max())


def test_phi3_qkv_proj_split_parts_merge_and_round_trip(tmp_path):
    """Phi-3 qkv_proj (no GQA) is split into q / k / v; merges are written back into qkv_proj."""
    p1, pm1 = save_adapter("phi3", tmp_path / "a", seed=1, r=4, lora_alpha=8)
    p2, _ = save_adapter("phi3", tmp_path / "b", seed=2, r=2, lora_alpha=4)
    ads = [load_adapter(p1), load_adapter(p2)]
    name = "model.layers.0.self_attn.qkv_proj"
    parts = [ads[0].modules[ModuleKey("model", 0, kind)] for kind in ("q", "k", "v")]
    assert [p.rows for p in parts] == [(0, 32), (32, 64), (64, 96)] and all(p.name == name for p in parts)
    full = peft_delta(pm1, name)
    for p in parts:  # each part's dense update is exactly its rows of peft's delta weight
        torch.testing.assert_close(p.dense(), full[p.rows[0] : p.rows[1]], atol=1e-7, rtol=1e-6)
    for method in ("task_arithmetic", "ties", "dare_linear", "multislerp"):
        merged = merge(ads, method)
        ups = merged.peft_updates()
        assert name in ups and ups[name].shape == (96, 32)
        folder = merged.to_peft_folder(tmp_path / method)
        config = json.loads((folder / "adapter_config.json").read_text())
        assert "model.layers.0.self_attn.qkv_proj" in config["target_modules"]
        _check_round_trip("phi3", merged, folder)
    pm = _load_peft("phi3", {"a": p1, "b": p2})
    merged = merge(ads, "task_arithmetic", weights=[0.7, -0.4])
    for mod_name, up in merged.peft_updates().items():
        ref = 0.7 * peft_delta(pm, mod_name, "a") + -0.4 * peft_delta(pm, mod_name, "b")
        assert float((up.dense() - ref).abs().max()) < 1e-5 * float(ref.abs().max()), mod_name


@pytest.mark.parametrize("method", ["ties", "magnitude_prune", "dare_ties"])
def test_dense_export_defaults_to_sum_of_input_ranks(method, bert_pair, tmp_path):
    """Without a rank, a dense merge is written at r_1 + r_2 = 8, not as a full-rank 'LoRA'."""
    ads = [load_adapter(p) for p in bert_pair]
    dense = merge(ads, method, keep_dense=True, device="cpu")
    factored = merge(ads, method, device="cpu")
    infos = []
    for tag, merged in (("dense", dense), ("factored", factored)):
        folder = merged.to_peft_folder(tmp_path / tag)
        info = json.loads((folder / "merge_info.json").read_text())
        assert set(info["ranks"].values()) == {8}, tag
        assert info["rank_rule"] in ("sum of the input ranks", "dense (kept)")
        infos.append(info)
        n_dense = sum(up.shape[0] * up.shape[1] for up in dense.peft_updates().values())
        n_lora = sum(t.numel() for t in load_adapter(folder).modules.values() for t in (t.A, t.B))
        assert n_lora < n_dense
    for name, up in dense.peft_updates().items():
        S = torch.linalg.svdvals(up.dense())
        want = float((S[:8] ** 2).sum() / (S**2).sum())
        for info in infos:  # merge-time (factored) or write-time (dense) truncation: the same energy
            assert info["energy_kept"][name] == pytest.approx(want, rel=1e-5), name
    assert infos[0]["energy_kept_total"] == pytest.approx(infos[1]["energy_kept_total"], rel=1e-5)
    assert infos[1]["energy_kept_total"] == pytest.approx(factored.energy_kept, rel=1e-6)
    assert infos[1]["energy_kept_total"] < 1


def test_export_energy_combines_merge_and_write_truncation(bert_pair, tmp_path):
    ads = [load_adapter(p) for p in bert_pair]
    dense = merge(ads, "ties", density=0.3, keep_dense=True)
    merged = merge(ads, "ties", density=0.3)  # rank 8 at merge time
    info = json.loads((merged.to_peft_folder(tmp_path / "r3", rank=3) / "merge_info.json").read_text())
    assert info["rank_rule"] == "at most 3" and set(info["ranks"].values()) == {3}
    kept = total = 0.0
    for name, up in dense.peft_updates().items():
        S2 = torch.linalg.svdvals(up.dense()) ** 2
        assert info["energy_kept"][name] == pytest.approx(float(S2[:3].sum() / S2.sum()), rel=1e-4), name
        kept, total = kept + float(S2[:3].sum()), total + float(S2.sum())
    assert info["energy_kept_total"] == pytest.approx(kept / total, rel=1e-4)
    assert info["energy_kept_min"] == min(info["energy_kept"].values())
