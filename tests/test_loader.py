"""Loading peft adapters saved from tiny random models of each family, and every source / error path."""

from __future__ import annotations

import io
import json
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import geometry.io.loader as loader
from geometry.errors import AdapterLoadError
from geometry.io.loader import load_adapter, load_files, load_hub, load_zip_bytes
from geometry.io.summary import adapter_summary
from geometry.types import ModuleKey
from tests.families import FAMILIES, legacy_forward, peft_delta, save_adapter

ATOL = 1e-6


def _check_against_peft(adapter, peft_model):
    """Every loaded module reproduces peft's own delta weight (rows of it for split parts)."""
    assert adapter.modules
    for key, m in adapter.modules.items():
        assert m.key == key
        delta = peft_delta(peft_model, m.name)
        if m.rows is not None:
            delta = delta[m.rows[0] : m.rows[1]]
        assert m.dense().shape == delta.shape, m.name
        torch.testing.assert_close(m.dense(), delta, atol=ATOL, rtol=1e-5, msg=m.name)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_adapter(request, tmp_path_factory):
    fam = request.param
    path, peft_model = save_adapter(fam, tmp_path_factory.mktemp(fam) / "adapter")
    return fam, load_adapter(path), peft_model


def test_family_keys_and_kinds(family_adapter):
    fam, adapter, _ = family_adapter
    spec = FAMILIES[fam]
    for name, expected in spec.expected.items():
        got = sorted((k.stack, k.layer, k.kind) for k, m in adapter.modules.items() if m.name == name)
        assert got == sorted(expected), name
    expected_raw = {n for n, e in spec.expected.items() if e[0][0] == "raw"}
    assert set(adapter.unmapped) == expected_raw
    assert adapter.name == "adapter"
    assert len(adapter.content_hash) == 64


def test_family_factors_reproduce_peft_delta(family_adapter):
    fam, adapter, peft_model = family_adapter
    _check_against_peft(adapter, peft_model)
    for m in adapter.modules.values():
        assert m.A.shape[0] == m.B.shape[1] == m.r == 4
        assert m.scale == pytest.approx(2.0) and m.alpha == 8.0
        assert m.fan_in_fan_out is FAMILIES[fam].fan_in_fan_out


def test_gpt2_c_attn_split_rows(tmp_path):
    adapter = load_adapter(save_adapter("gpt2", tmp_path / "gpt2")[0])
    q, k, v = (adapter.modules[ModuleKey("model", 0, kind)] for kind in "qkv")
    assert (q.rows, k.rows, v.rows) == ((0, 32), (32, 64), (64, 96))
    assert q.A is k.A is v.A and q.shape == (32, 32)
    # the shared A is counted once
    assert adapter.n_params() == sum(int(t.numel()) for m in adapter.modules.values() for t in (m.B,)) + sum(
        int(m.A.numel()) for m in {id(m.A): m for m in adapter.modules.values()}.values()
    )


def test_phi3_qkv_proj_split_rows_and_gqa_kept_fused_with_a_note(tmp_path):
    path, peft_model = save_adapter("phi3", tmp_path / "phi3")
    adapter = load_adapter(path)
    q, k, v = (adapter.modules[ModuleKey("model", 0, kind)] for kind in "qkv")
    assert (q.rows, k.rows, v.rows) == ((0, 32), (32, 64), (64, 96))
    assert q.A is k.A is v.A and q.shape == k.shape == v.shape == (32, 32)
    full = peft_delta(peft_model, "model.layers.0.self_attn.qkv_proj")
    stacked = torch.cat([q.dense(), k.dense(), v.dense()])
    assert torch.equal(torch.cat([q.B, k.B, v.B]), peft_model.base_model.model.get_submodule(
        "model.layers.0.self_attn.qkv_proj").lora_B["default"].weight.detach())  # rows sliced, nothing else
    torch.testing.assert_close(stacked, full, atol=1e-7, rtol=1e-6)
    assert not any("kept fused" in w for w in adapter.warnings)
    gqa = load_adapter(save_adapter("phi3_gqa", tmp_path / "gqa")[0])
    fused = gqa.modules[ModuleKey("model", 0, "qkv")]
    assert fused.rows is None and fused.shape == (64, 32)
    notes = [w for w in gqa.warnings if "kept fused as 'qkv'" in w]
    assert len(notes) == 1 and "its output (64) is not 3 x its input (32)" in notes[0]
    assert "and 1 more such module" in notes[0]


def test_heads_are_other_tensors(family_adapter):
    fam, adapter, _ = family_adapter
    if FAMILIES[fam].task_type != "SEQ_CLS":
        assert adapter.other_tensors == {}
        return
    assert adapter.other_tensors and all("classifier" in k for k in adapter.other_tensors)
    assert not any("lora_" in k for k in adapter.other_tensors)


def test_rank_and_alpha_patterns_follow_peft(tmp_path):
    rank_pattern = {"q_proj": 2, "layers.1.mlp.down_proj": 6}
    alpha_pattern = {"v_proj": 32, r"layers\.0\.mlp\..*": 3}
    path, pm = save_adapter("llama", tmp_path / "a", rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    adapter = load_adapter(path)
    _check_against_peft(adapter, pm)
    for m in adapter.modules.values():
        layer = pm.base_model.model.get_submodule(m.name)
        assert m.r == layer.r["default"] == m.rank
        assert m.alpha == layer.lora_alpha["default"]
        assert m.scale == pytest.approx(layer.scaling["default"])
    assert adapter.modules[ModuleKey("model", 0, "q")].r == 2
    assert adapter.modules[ModuleKey("model", 1, "down")].r == 6
    assert adapter.modules[ModuleKey("model", 0, "down")].r == 4
    assert adapter.modules[ModuleKey("model", 1, "v")].scale == pytest.approx(32 / 4)
    assert adapter.modules[ModuleKey("model", 0, "gate")].scale == pytest.approx(3 / 4)


def test_rslora_scale(tmp_path):
    path, pm = save_adapter("qwen2", tmp_path / "a", r=4, lora_alpha=8, use_rslora=True)
    adapter = load_adapter(path)
    assert all(m.scale == pytest.approx(4.0) for m in adapter.modules.values())
    assert adapter_summary(adapter)["scale_rule"] == "alpha/sqrt(r)"
    _check_against_peft(adapter, pm)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path, pm = save_adapter("llama", tmp_path_factory.mktemp("llama") / "my_llama")
    return path, pm


def test_old_config_lacking_fields_loads(llama_dir, tmp_path):
    path, pm = llama_dir
    old = tmp_path / "old"
    shutil.copytree(path, old)
    (old / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "task_type": "CAUSAL_LM"}))
    adapter = load_adapter(old)
    assert adapter.config.rank_pattern == {} and adapter.config.use_rslora is False
    _check_against_peft(adapter, pm)


def test_folder_name_file_path_and_summary(llama_dir, tmp_path):
    path, _ = llama_dir
    adapter = load_adapter(path)
    assert adapter.name == "my_llama"
    shutil.copytree(path, tmp_path / "outer" / "inner")
    assert load_adapter(tmp_path / "outer").name == "inner"
    assert load_adapter(path / "adapter_config.json").content_hash == adapter.content_hash
    s = adapter_summary(adapter)
    assert s["r"] == 4 and s["alpha"] == 8 and s["scale_rule"] == "alpha/r" and s["scale"] == 2.0
    assert s["kinds"] == ["q", "k", "v", "o", "gate", "up", "down"] and s["layers"] == [0, 1]
    assert s["n_modules"] == 14 and s["n_params"] == adapter.n_params()
    assert [(m["stack"], m["layer"], m["kind"]) for m in s["modules"][:2]] == [("model", 0, "q"), ("model", 0, "k")]
    json.dumps(s)


def _zip_bytes(members: dict[str, bytes], symlink: str | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (0o120777 << 16)
            zf.writestr(info, "/etc/passwd")
    return buf.getvalue()


def _members(path: Path, prefix: str = "") -> dict[str, bytes]:
    return {prefix + p.name: p.read_bytes() for p in path.iterdir()}


def test_zip_path_bytes_and_subfolder(llama_dir, tmp_path):
    path, pm = llama_dir
    ref = load_adapter(path)
    flat = _zip_bytes(_members(path))
    (tmp_path / "flat.zip").write_bytes(flat)
    a = load_adapter(tmp_path / "flat.zip")
    assert a.name == "flat" and a.content_hash == ref.content_hash
    b = load_zip_bytes(_zip_bytes(_members(path, "outer/my_adapter/")))
    assert b.name == "my_adapter" and b.content_hash == ref.content_hash
    assert load_adapter(flat, name="x").name == "x"
    _check_against_peft(b, pm)


@pytest.mark.parametrize(
    "extra, words",
    [
        ({"../x": b"1"}, "'..'"),
        ({"/etc/x": b"1"}, "absolute"),
        ({"a/../../x": b"1"}, "'..'"),
    ],
)
def test_hostile_zip_members_are_refused(llama_dir, extra, words):
    path, _ = llama_dir
    with pytest.raises(AdapterLoadError, match=words):
        load_zip_bytes(_zip_bytes({**_members(path), **extra}))


def test_zip_symlink_oversize_and_count_limits(llama_dir):
    path, _ = llama_dir
    with pytest.raises(AdapterLoadError, match="symbolic link"):
        load_zip_bytes(_zip_bytes(_members(path), symlink="link"))
    big = _zip_bytes({**_members(path), "padding.bin": b"\0" * 200_000})
    with pytest.raises(AdapterLoadError, match="exceeds the limit"):
        load_zip_bytes(big, max_bytes=150_000)
    with pytest.raises(AdapterLoadError, match="members"):
        load_zip_bytes(_zip_bytes(_members(path)), max_members=2)
    with pytest.raises(AdapterLoadError, match="several adapter_config.json"):
        load_zip_bytes(_zip_bytes({**_members(path, "a/"), **_members(path, "b/")}))
    # a training output: the adapter on top, checkpoint copies below it -> the top one
    nested = load_zip_bytes(_zip_bytes({**_members(path, "run/"), **_members(path, "run/checkpoint-5/")}))
    assert nested.name == "run"
    with pytest.raises(AdapterLoadError, match="no adapter_config.json"):
        load_zip_bytes(_zip_bytes({"readme.txt": b"hi"}))
    with pytest.raises(AdapterLoadError, match="not a readable zip"):
        load_zip_bytes(b"not a zip")


def test_zip_member_larger_than_its_header_claims_is_stopped(llama_dir):
    path, _ = llama_dir
    data = _zip_bytes(_members(path))
    zf = zipfile.ZipFile(io.BytesIO(data))
    info = zf.getinfo("adapter_model.safetensors")
    with pytest.raises(AdapterLoadError, match="exceeds the size limit"):
        loader._read_member(zf, info, budget=1000, where="up.zip")


def test_file_pair(llama_dir):
    path, pm = llama_dir
    files = {"my_config.json": (path / "adapter_config.json").read_bytes(),
             "w.safetensors": (path / "adapter_model.safetensors").read_bytes()}
    adapter = load_adapter(files, name="pair")
    assert adapter.name == "pair" and adapter.content_hash == load_adapter(path).content_hash
    _check_against_peft(load_files(files), pm)
    with pytest.raises(AdapterLoadError, match="one config"):
        load_files({"adapter_config.json": b"{}"})


def test_hub_download_is_mocked(llama_dir, tmp_path, monkeypatch):
    path, pm = llama_dir
    calls = []

    def fake_snapshot_download(repo_id, revision=None, **kwargs):
        calls.append((repo_id, revision))
        dest = tmp_path / repo_id.replace("/", "--")
        if not dest.exists():
            shutil.copytree(path, dest)
        return str(dest)

    monkeypatch.setattr(loader.hub, "snapshot_download", fake_snapshot_download)
    a = load_adapter("hub:someone/tiny-lora")
    b = load_adapter("someone/tiny-lora")
    c = load_hub("someone/tiny-lora", revision="v1", name="named")
    assert calls == [("someone/tiny-lora", None)] * 2 + [("someone/tiny-lora", "v1")]
    assert a.name == "someone/tiny-lora" and a.source == "hub:someone/tiny-lora" and c.name == "named"
    assert a.content_hash == b.content_hash == load_adapter(path).content_hash
    _check_against_peft(a, pm)

    def failing(**kwargs):
        raise OSError("offline")

    monkeypatch.setattr(loader.hub, "snapshot_download", failing)
    with pytest.raises(AdapterLoadError, match="hub:someone/missing: download failed"):
        load_adapter("hub:someone/missing")
    with pytest.raises(AdapterLoadError, match="no such file or folder, and as a hub id: .*offline"):
        load_adapter("someone/missing")


def test_bin_weights_through_weights_only(tmp_path):
    path, pm = save_adapter("gpt2", tmp_path / "bin", safe_serialization=False)
    assert (path / "adapter_model.bin").is_file() and not (path / "adapter_model.safetensors").exists()
    _check_against_peft(load_adapter(path), pm)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_unsafe_pickle_is_refused(llama_dir, tmp_path):
    path, _ = llama_dir
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(path / "adapter_config.json", bad)
    torch.save({"x": _Evil()}, bad / "adapter_model.bin")
    with pytest.raises(AdapterLoadError, match=r"adapter_model\.bin: cannot read as torch pickle"):
        load_adapter(bad)


def test_dora_magnitude_attached(tmp_path):
    path, pm = save_adapter("llama", tmp_path / "dora", use_dora=True)
    adapter = load_adapter(path)
    assert adapter.config.use_dora and not adapter.other_tensors
    _check_against_peft(adapter, pm)
    for m in adapter.modules.values():
        layer = pm.base_model.model.get_submodule(m.name)
        assert m.magnitude is not None and m.magnitude.shape == (m.shape[0],)
        torch.testing.assert_close(m.magnitude, layer.lora_magnitude_vector["default"].weight.detach())
    assert all(r["dora"] for r in adapter_summary(adapter)["modules"])


def test_dora_on_gpt2_split_slices_magnitude(tmp_path):
    path, pm = save_adapter("gpt2", tmp_path / "dora2", use_dora=True, target_modules=["c_attn"])
    adapter = load_adapter(path)
    for m in adapter.modules.values():
        layer = pm.base_model.model.get_submodule(m.name)
        full = layer.lora_magnitude_vector["default"].weight.detach()
        torch.testing.assert_close(m.magnitude, full[m.rows[0] : m.rows[1]])


def test_embedding_lora(tmp_path):
    path, pm = save_adapter("llama", tmp_path / "emb", target_modules=["embed_tokens", "q_proj"])
    adapter = load_adapter(path)
    emb = adapter.modules[ModuleKey("model", -1, "embed")]
    assert emb.is_embedding and emb.shape == (32, 64) and emb.rank == 4
    _check_against_peft(adapter, pm)
    assert not any("lora_" in k for k in adapter.other_tensors)


def _write(folder: Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"))
    return folder


P = "base_model.model.model.layers.0.self_attn."
CFG = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]}


def test_unmapped_names_are_kept_and_float16_read_as_float32(tmp_path):
    g = torch.Generator().manual_seed(0)
    t = {
        P + "q_proj.lora_A.weight": torch.randn(2, 8, generator=g).half(),
        P + "q_proj.lora_B.weight": torch.randn(8, 2, generator=g).half(),
        "base_model.model.my_head.proj.lora_A.weight": torch.randn(2, 8, generator=g).half(),
        "base_model.model.my_head.proj.lora_B.weight": torch.randn(3, 2, generator=g).half(),
        "base_model.model.score.weight": torch.randn(3, 8, generator=g),
    }
    adapter = load_adapter(_write(tmp_path / "u", CFG, t))
    raw = adapter.modules[ModuleKey("raw", -1, "my_head.proj")]
    assert adapter.unmapped == ["my_head.proj"] and raw.shape == (3, 2 * 4)
    assert any("raw names" in w for w in adapter.warnings)
    assert adapter.modules[ModuleKey("model", 0, "q")].A.dtype == torch.float32  # half factors: read as float32
    assert list(adapter.other_tensors) == ["base_model.model.score.weight"]
    assert adapter_summary(adapter)["other_tensors"] == {"base_model.model.score.weight": [3, 8]}


def test_keys_with_adapter_name_or_without_prefix(tmp_path):
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g)
    named = {P + "q_proj.lora_A.default.weight": A, P + "q_proj.lora_B.default.weight": B}
    bare = {"model.layers.0.self_attn.q_proj.lora_A.weight": A, "model.layers.0.self_attn.q_proj.lora_B.weight": B}
    for tensors in (named, bare):
        m = load_adapter(_write(tmp_path / str(len(list(tmp_path.iterdir()))), CFG, tensors)).modules[
            ModuleKey("model", 0, "q")]
        torch.testing.assert_close(m.dense(), 2.0 * (B.double() @ A.double()))
    two = {**named, P + "v_proj.lora_A.other.weight": A.clone(), P + "v_proj.lora_B.other.weight": B.clone()}
    with pytest.raises(AdapterLoadError, match="several adapters"):
        load_adapter(_write(tmp_path / "two", CFG, two))


def test_colliding_keys_fall_back_to_raw(tmp_path):
    g = torch.Generator().manual_seed(0)
    t = {}
    for e in (0, 1):
        pre = f"base_model.model.model.layers.0.mlp.experts.{e}.gate_proj."
        t[pre + "lora_A.weight"] = torch.randn(2, 8, generator=g)
        t[pre + "lora_B.weight"] = torch.randn(8, 2, generator=g)
    adapter = load_adapter(_write(tmp_path / "moe", CFG, t))
    assert all(k.stack == "raw" for k in adapter.modules) and len(adapter.unmapped) == 2


@pytest.mark.parametrize(
    "tensors, words",
    [
        ({P + "q_proj.lora_A.weight": torch.ones(2, 8)}, [P + "q_proj.lora_A.weight", "no lora_B"]),
        ({P + "q_proj.lora_B.weight": torch.ones(8, 2)}, [P + "q_proj.lora_B.weight", "no lora_A"]),
        ({P + "q_proj.lora_A.weight": torch.ones(2, 8), P + "q_proj.lora_B.weight": torch.ones(8, 3)},
         [P + "q_proj.lora_A.weight", P + "q_proj.lora_B.weight", "rank 3"]),
        ({P + "q_proj.lora_A.weight": torch.ones(3, 8), P + "q_proj.lora_B.weight": torch.ones(8, 3)},
         [P + "q_proj.lora_A.weight", "r=2"]),
        ({P + "q_proj.lora_A.weight": torch.ones(2, 8), P + "q_proj.lora_B.weight": torch.ones(8, 2, 1)},
         [P + "q_proj.lora_B.weight", "2-D"]),
        ({P + "q_proj.lora_A.weight": torch.tensor([[float("nan")] * 8] * 2), P + "q_proj.lora_B.weight": torch.ones(8, 2)},
         [P + "q_proj.lora_A.weight", "NaN or Inf"]),
        ({P + "q_proj.lora_A.weight": torch.ones(2, 8), P + "q_proj.lora_B.weight": torch.full((8, 2), float("inf"))},
         [P + "q_proj.lora_B.weight", "NaN or Inf"]),
        ({"base_model.model.score.weight": torch.ones(2, 2)}, ["no LoRA tensors"]),
        ({P + "q_proj.lora_A.weight": torch.ones(2, 8), P + "q_proj.lora_B.weight": torch.ones(8, 2),
          P + "q_proj.lora_magnitude_vector": torch.ones(5)}, [P + "q_proj.lora_magnitude_vector", "(8,)"]),
    ],
)
def test_bad_tensors_name_file_and_tensor(tmp_path, tensors, words):
    folder = _write(tmp_path / "bad", CFG, tensors)
    with pytest.raises(AdapterLoadError) as err:
        load_adapter(folder)
    msg = str(err.value)
    assert "adapter_model.safetensors" in msg
    for w in words:
        assert w in msg


def test_bad_files(tmp_path):
    folder = _write(tmp_path / "j", CFG, {P + "q_proj.lora_A.weight": torch.ones(2, 8), P + "q_proj.lora_B.weight": torch.ones(8, 2)})
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterLoadError, match=r"adapter_config\.json: invalid JSON"):
        load_adapter(folder)
    (folder / "adapter_config.json").write_text(json.dumps(CFG))
    (folder / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(AdapterLoadError, match=r"adapter_model\.safetensors: cannot read as safetensors"):
        load_adapter(folder)
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterLoadError, match="no weights file"):
        load_adapter(folder)
    with pytest.raises(AdapterLoadError, match="no such file or folder"):
        load_adapter(tmp_path / "missing")
    two = tmp_path / "two"
    for sub in ("a", "b"):
        shutil.copytree(tmp_path / "j", two / sub)
    with pytest.raises(AdapterLoadError, match="several adapter_config.json"):
        load_adapter(two)
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterLoadError, match="no adapter_config.json"):
        load_adapter(tmp_path / "empty")


def test_content_hash_changes_with_weights_and_config(tmp_path):
    t = {P + "q_proj.lora_A.weight": torch.ones(2, 8), P + "q_proj.lora_B.weight": torch.ones(8, 2)}
    h1 = load_adapter(_write(tmp_path / "h1", CFG, t)).content_hash
    h2 = load_adapter(_write(tmp_path / "h2", {**CFG, "lora_alpha": 5}, t)).content_hash
    t[P + "q_proj.lora_B.weight"] = torch.ones(8, 2) * 2
    h3 = load_adapter(_write(tmp_path / "h3", CFG, t)).content_hash
    reordered = dict(reversed(list(CFG.items())))
    h4 = load_adapter(_write(tmp_path / "h4", reordered, {P + "q_proj.lora_A.weight": torch.ones(2, 8),
                                                          P + "q_proj.lora_B.weight": torch.ones(8, 2)})).content_hash
    assert len({h1, h2, h3}) == 3 and h1 == h4


# --- legacy peft <= 0.2 merged LoRA --------------------------------------------------------------


def _legacy(tmp_path, name, module, n, enable, r=2, alpha=6):
    g = torch.Generator().manual_seed(1)
    groups = sum(enable)
    A = torch.randn(groups * r, n, generator=g, dtype=torch.float64)
    B = torch.randn(groups * n, r, 1, generator=g, dtype=torch.float64)
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "enable_lora": enable, "fan_in_fan_out": True,
           "target_modules": [module.split(".")[-1]], "base_model_name_or_path": "legacy"}
    key = f"base_model.model.{module}"
    folder = tmp_path / name
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    torch.save({key + ".lora_A.weight": A, key + ".lora_B.weight": B}, folder / "adapter_model.bin")
    return load_adapter(folder), A, B, alpha / r


def _dense_full(adapter, out, n):
    full = torch.zeros(out, n, dtype=torch.float64)
    for m in adapter.modules.values():
        rows = m.rows or (0, out)
        full[rows[0] : rows[1]] += m.dense()
    return full


def test_legacy_fused_qkv_is_exact(tmp_path):
    enable = [True, False, True]
    adapter, A, B, scale = _legacy(tmp_path, "bloomish", "transformer.h.0.self_attention.query_key_value", 8, enable)
    (m,) = adapter.modules.values()
    assert m.key == ModuleKey("model", 0, "qkv") and m.shape == (24, 8) and m.rank == 4 and m.r == 2
    x = torch.randn(5, 8, dtype=torch.float64)
    torch.testing.assert_close(x @ m.dense().T, legacy_forward(x, A, B, enable, scale))
    assert any("legacy peft<=0.2" in w for w in adapter.warnings)


def test_legacy_gpt2_c_attn_splits_into_enabled_thirds(tmp_path):
    enable = [True, False, True]
    adapter, A, B, scale = _legacy(tmp_path, "gpt2ish", "transformer.h.1.attn.c_attn", 8, enable)
    assert sorted(k.kind for k in adapter.modules) == ["q", "v"]
    q, v = adapter.modules[ModuleKey("model", 1, "q")], adapter.modules[ModuleKey("model", 1, "v")]
    assert (q.rows, v.rows, q.rank, v.rank) == ((0, 8), (16, 24), 2, 2)
    x = torch.randn(5, 8, dtype=torch.float64)
    torch.testing.assert_close(x @ _dense_full(adapter, 24, 8).T, legacy_forward(x, A, B, enable, scale))


def test_legacy_bad_shapes_say_what_the_format_is(tmp_path):
    folder = tmp_path / "legacy_bad"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 4, "enable_lora": [True, False, True]}))
    key = "base_model.model.transformer.h.0.self_attention.query_key_value"
    torch.save({key + ".lora_A.weight": torch.ones(3, 8), key + ".lora_B.weight": torch.ones(16, 2, 1)},
               folder / "adapter_model.bin")
    with pytest.raises(AdapterLoadError, match=r"legacy peft<=0.2 merged-LoRA format \(enable_lora="):
        load_adapter(folder)


def test_hub_size_is_checked_before_downloading_in_demo_mode(llama_dir, tmp_path, monkeypatch):
    """A demo server refuses a hub adapter larger than its upload limit without downloading it (sizes come
    from the hub's file metadata, mocked here like the download)."""
    from types import SimpleNamespace

    path, _ = llama_dir
    downloads = []

    def fake_snapshot_download(repo_id, revision=None, **kwargs):
        downloads.append(repo_id)
        return str(path)

    def fake_api(sizes):
        files = [SimpleNamespace(rfilename=name, size=size) for name, size in sizes.items()]
        return lambda: SimpleNamespace(model_info=lambda repo_id, revision=None, files_metadata=False:
                                       SimpleNamespace(siblings=files))

    monkeypatch.setattr(loader.hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setenv("ADAPTER_ATLAS_DEMO", "1")
    monkeypatch.setattr(loader.hub, "HfApi", fake_api({"adapter_config.json": 500, "adapter_model.safetensors": 3 * 2**30,
                                                    "README.md": 10}))
    with pytest.raises(AdapterLoadError, match=r"hub:big/lora: its adapter files are 3221225972 bytes, more than"):
        load_hub("big/lora")
    assert downloads == []
    monkeypatch.setattr(loader.hub, "HfApi", fake_api({"adapter_config.json": 500, "adapter_model.safetensors": None}))
    with pytest.raises(AdapterLoadError, match="does not say how large"):
        load_hub("odd/lora")
    monkeypatch.setattr(loader.hub, "HfApi", fake_api({"adapter_config.json": 500, "adapter_model.safetensors": 9000}))
    assert load_hub("small/lora").source == "hub:small/lora" and downloads == ["small/lora"]
    monkeypatch.delenv("ADAPTER_ATLAS_DEMO")
    monkeypatch.setattr(loader.hub, "HfApi", lambda: pytest.fail("no size check outside demo mode"))
    load_hub("any/lora")  # a researcher's own server: no cap, no metadata call


def test_selecting_an_adapter_twice_is_an_error(llama_dir):
    from geometry.adapter_set import AdapterSet

    path, _ = llama_dir
    ads = AdapterSet()
    ads.add(load_adapter(path), name="a")
    with pytest.raises(ValueError, match="named more than once: 'a'"):
        ads[["a", "a"]]
