"""DoRA: exact updates from the base weights (geometry, merges) and exact application by the runtime, against
peft on tiny random-weight models (bert: Linear; llama: Linear; gpt2: Conv1D with a fused c_attn split)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import geometry
from geometry.cli import main as cli_main
from geometry.errors import AdapterLoadError, AtlasError, IncompatibleAdaptersError
from geometry.io.loader import load_adapter
from geometry.io.summary import adapter_summary
from geometry.linalg.dora import (
    DIRECTION_ONLY,
    EXACT,
    base_weight,
    dora_note,
    dora_status,
    dora_update,
    resolve_dora,
)
from geometry.merging import merge
from geometry.runtime import Runtime, adapter_updates, apply_updates
from geometry.testing import random_adapter
from tests.families import make_peft_model, tiny_model

PREFIX = "base_model.model."


def _dora_folder(family: str, path, seed: int = 0, **kw):
    """A DoRA adapter saved by peft, its magnitudes moved away from ``||W0 + s B A||`` (else ``g = 1``)."""
    pm = make_peft_model(family, seed=seed, use_dora=True, **kw)
    gen = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(0.5 + torch.rand(p.shape, generator=gen))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(str(path))
    return path


def _peft(family: str, path):
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(tiny_model(family), str(path)).eval()


def _exact_deltas(family: str, path) -> dict[str, torch.Tensor]:
    """peft's own merged weight minus the base weight, as the (out, in) map, float64, by module path."""
    merged = _peft(family, path).merge_and_unload()
    base = tiny_model(family)
    out = {}
    for name, mod in merged.named_modules():
        if hasattr(mod, "weight") and isinstance(mod.weight, torch.Tensor) and mod.weight.dim() == 2:
            d = mod.weight.detach().double() - base.get_submodule(name).weight.detach().double()
            out[name] = d.T if type(mod).__name__ == "Conv1D" else d
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("dora")
    return {
        "bert": _dora_folder("bert", root / "bert"),
        "bert2": _dora_folder("bert", root / "bert2", seed=3),
        "llama": _dora_folder("llama", root / "llama"),
        "gpt2": _dora_folder("gpt2", root / "gpt2", target_modules=["c_attn", "c_proj"]),
    }


@pytest.mark.parametrize("family", ["bert", "llama", "gpt2"])
def test_exact_update_equals_peft_merged_weight(folders, family):
    adapter = load_adapter(folders[family])
    assert dora_status(adapter) == "direction"
    exact = resolve_dora(adapter, tiny_model(family))
    assert dora_status(exact) == "exact" and exact.content_hash != adapter.content_hash
    deltas = _exact_deltas(family, folders[family])
    for key, mod in exact.modules.items():
        assert mod.dora_exact and mod.scale == 1.0
        want = deltas[mod.name.removeprefix(PREFIX)]
        if mod.rows is not None:
            want = want[mod.rows[0]:mod.rows[1]]
        assert _rel(mod.dense(), want) < 1e-5, key
        # the direction alone is not the update (magnitudes were moved)
        assert _rel(adapter.modules[key].dense(), want) > 1e-2
        # the dense function itself, from the base weight
        W0 = base_weight(tiny_model(family), adapter.modules[key])
        assert _rel(dora_update(adapter.modules[key], W0), want) < 1e-5


def test_base_as_state_dict_and_runtime_give_the_same_update(folders):
    adapter = load_adapter(folders["gpt2"])
    model = tiny_model("gpt2")
    a = resolve_dora(adapter, model)
    b = resolve_dora(adapter, model.state_dict())
    c = resolve_dora(adapter, Runtime(tiny_model("gpt2")))
    for key in a.modules:
        assert torch.allclose(a.modules[key].dense(), b.modules[key].dense(), atol=1e-6)
        assert torch.allclose(a.modules[key].dense(), c.modules[key].dense(), atol=1e-6)
    assert a.content_hash == b.content_hash == c.content_hash


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_runtime_applies_dora_like_peft(folders, family):
    ids = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = _peft(family, folders[family])(input_ids=ids).logits
        base = tiny_model(family)
        runtime = Runtime(base)
        adapter = load_adapter(folders[family])
        with runtime.apply(adapter):  # direction-only adapter: the runtime holds W0 and applies DoRA exactly
            got = runtime.forward(input_ids=ids).logits
        with runtime.apply(resolve_dora(adapter, base)):  # exact updates, applied as factored LoRA
            got_exact = runtime.forward(input_ids=ids).logits
        adapter.config.base_model_name_or_path = "tiny"  # adapter_updates needs a base name
        with runtime.apply(adapter_updates(adapter)):  # LoraUpdates (B, A, scale, magnitude)
            got_updates = runtime.forward(input_ids=ids).logits
        plain = runtime.forward(input_ids=ids).logits
    scale = float(want.abs().max())
    assert float((got - want).abs().max()) < 1e-5 * scale
    assert float((got_exact - want).abs().max()) < 1e-5 * scale
    assert float((got_updates - want).abs().max()) < 1e-5 * scale
    assert float((plain - want).abs().max()) > 1e-3 * scale  # the adapter does something
    assert not any(m._forward_hooks for m in base.modules())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_dense_writing_of_dora_equals_peft(folders, family):
    """``apply_updates`` (the standalone-model path of ``load_classifier``) writes peft's merged DoRA weight."""
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(5))
    adapter = load_adapter(folders[family])
    adapter.config.base_model_name_or_path = "tiny"
    with torch.no_grad():
        want = _peft(family, folders[family])(input_ids=ids).logits
        got = apply_updates(tiny_model(family).eval(), adapter_updates(adapter).updates)(input_ids=ids).logits
    assert float((got - want).abs().max()) < 1e-5 * float(want.abs().max())


def test_runtime_dora_on_conv1d_with_fused_split(folders):
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = _peft("gpt2", folders["gpt2"])(input_ids=ids).logits
        runtime = Runtime(tiny_model("gpt2"))
        with runtime.apply(load_adapter(folders["gpt2"])):
            got = runtime.forward(input_ids=ids).logits
    assert float((got - want).abs().max()) < 1e-5 * float(want.abs().max())


def test_runtime_dora_coefficient_scales_the_exact_update(folders):
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(3))
    adapter = load_adapter(folders["llama"])
    base = tiny_model("llama")
    exact = resolve_dora(adapter, base)
    runtime = Runtime(base)
    with torch.no_grad():
        with runtime.apply(adapter, coefficients=0.5, head=False):
            got = runtime.forward(input_ids=ids).logits
        with runtime.apply(exact, coefficients=0.5, head=False):
            want = runtime.forward(input_ids=ids).logits
        with runtime.apply([adapter, adapter], coefficients=torch.tensor([0.25, 0.25]), head=False):
            two = runtime.forward(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(two, want, atol=1e-5)


def test_direction_only_is_labelled(folders, capsys):
    adapter = load_adapter(folders["llama"])
    assert dora_note(adapter) == DIRECTION_ONLY == "DoRA: direction only, base weights not loaded"
    assert adapter_summary(adapter)["notes"] == [DIRECTION_ONLY]
    assert cli_main(["info", str(folders["llama"])]) == 0
    assert DIRECTION_ONLY in capsys.readouterr().out
    exact = resolve_dora(adapter, tiny_model("llama"))
    assert adapter_summary(exact)["notes"] == [EXACT]
    assert all(m["dora_exact"] for m in adapter_summary(exact)["modules"])
    other = load_adapter(folders["bert"])
    frame = geometry.distances([adapter, load_adapter(folders["llama"])], kind="q")
    assert any(DIRECTION_ONLY in n for n in frame.attrs["notes"])
    assert not any("DoRA" in n for n in geometry.distances([exact, exact], kind="q").attrs["notes"])
    assert any(DIRECTION_ONLY in n for n in geometry.anatomy(other).attrs["notes"])
    assert dora_note(random_adapter("plain")) is None


@pytest.mark.slow
def test_geometry_uses_the_exact_update(folders):
    a = load_adapter(folders["bert"])
    b = load_adapter(folders["bert2"])
    base = tiny_model("bert")
    ea, eb = resolve_dora(a, base), resolve_dora(b, base)
    got = geometry.distances([ea, eb], metric="cosine", kind="q").iloc[0, 1]
    deltas_a, deltas_b = _exact_deltas("bert", folders["bert"]), _exact_deltas("bert", folders["bert2"])
    cos = []
    for layer in (0, 1):
        name = f"bert.encoder.layer.{layer}.attention.self.query"
        da, db = deltas_a[name], deltas_b[name]
        cos.append(1 - float((da * db).sum() / (da.norm() * db.norm())))
    assert got == pytest.approx(sum(cos) / 2, rel=1e-5)
    direction = geometry.distances([a, b], metric="cosine", kind="q").iloc[0, 1]
    assert abs(direction - got) > 1e-4  # the direction's geometry is another thing


@pytest.mark.slow
def test_merges_refuse_direction_only_and_merge_exact_updates(folders, tmp_path):
    a, b = load_adapter(folders["bert"]), load_adapter(folders["bert2"])
    with pytest.raises(IncompatibleAdaptersError, match="DoRA adapter.*resolve_dora"):
        merge([a, b], "task_arithmetic")
    base = tiny_model("bert")
    ea, eb = resolve_dora(a, base), resolve_dora(b, base)
    merged = merge([ea, eb], "task_arithmetic", weights=[0.5, 0.5])
    da, db = _exact_deltas("bert", folders["bert"]), _exact_deltas("bert", folders["bert2"])
    for mod in merged.modules.values():
        want = 0.5 * da[mod.name.removeprefix(PREFIX)] + 0.5 * db[mod.name.removeprefix(PREFIX)]
        assert _rel(mod.dense(), want) < 1e-5
    ties = merge([ea, eb], "ties", density=0.5, keep_dense=True)
    assert all(torch.isfinite(m.dense()).all() for m in ties.modules.values())
    folder = merged.to_peft_folder(tmp_path / "merged", head=a.name)
    info = json.loads((folder / "merge_info.json").read_text())
    config = json.loads((folder / "adapter_config.json").read_text())
    assert "dense-derived LoRA" in info["dora"] and config["use_dora"] is False
    # the exported LoRA, loaded by peft, computes what the runtime computes with both DoRA adapters at 0.5
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = _peft("bert", folder)(input_ids=ids).logits
        runtime = Runtime(tiny_model("bert"))
        with runtime.apply([a, b], coefficients=torch.tensor([0.5, 0.5]), head=a.name):
            want = runtime.forward(input_ids=ids).logits
    assert float((got - want).abs().max()) < 1e-5 * float(want.abs().max())


def test_truncated_resolution_records_energy(folders):
    adapter = load_adapter(folders["llama"])
    exact = resolve_dora(adapter, tiny_model("llama"), rank=4)
    assert all(m.rank <= 4 for m in exact.modules.values())
    assert any("energy kept" in w for w in exact.warnings)
    with pytest.raises(AtlasError, match="rank must be a positive integer"):
        resolve_dora(adapter, tiny_model("llama"), rank=0)


def test_bad_bases_and_bad_dora_files_are_one_clear_error(folders, tmp_path):
    adapter = load_adapter(folders["llama"])
    with pytest.raises(AtlasError, match="the base has no weight"):
        resolve_dora(adapter, {"nothing.weight": torch.zeros(2, 2)})
    with pytest.raises(AtlasError, match="cannot read base weights"):
        resolve_dora(adapter, 42)
    with pytest.raises(AtlasError, match="the base has no weight|base weight of shape"):
        resolve_dora(adapter, tiny_model("bert"))  # another model: no such module, or the wrong shape
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((folders["llama"] / "adapter_config.json").read_text())
    state = load_file(str(folders["llama"] / "adapter_model.safetensors"))
    key = next(k for k in state if "lora_magnitude_vector" in k)
    state[key] = state[key][:-1].contiguous()
    save_file(state, str(bad / "adapter_model.safetensors"))
    with pytest.raises(AdapterLoadError, match=r"expected \(32,\) \(one per output row\)"):
        load_adapter(bad)


def test_embedding_dora_resolves_exactly_and_the_runtime_asks_for_it(tmp_path):
    folder = _dora_folder("llama", tmp_path / "emb", target_modules=["embed_tokens", "q_proj"])
    adapter = load_adapter(folder)
    base = tiny_model("llama")
    exact = resolve_dora(adapter, base)
    deltas = _exact_deltas("llama", folder)
    merged = _peft("llama", folder).merge_and_unload()
    for mod in exact.modules.values():
        if mod.is_embedding:  # the table (vocab, dim); the update is the map (dim, vocab)
            want = (merged.get_submodule(mod.name).weight.double() - base.get_submodule(mod.name).weight.double()).T
        else:
            want = deltas[mod.name]
        assert _rel(mod.dense(), want) < 1e-5
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(6))
    runtime = Runtime(base)
    with torch.no_grad():
        want = _peft("llama", folder)(input_ids=ids).logits
        with runtime.apply(exact, head=False):
            got = runtime.forward(input_ids=ids).logits
    assert float((got - want).abs().max()) < 1e-5 * float(want.abs().max())
    with pytest.raises(AtlasError, match="DoRA on an embedding.*resolve_dora"):
        runtime.apply(adapter, head=False)
    assert not runtime._active  # the refusal left nothing applied (and released the lock)
