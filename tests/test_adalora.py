"""AdaLoRA (peft_type ADALORA): loaded exactly as LoRA factors ``B, diag(E) A`` with peft's scale
``lora_alpha / (init_r + 1e-5)`` and the ranks left after pruning, against peft on tiny random models."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import geometry
from geometry.errors import AdapterLoadError
from geometry.io.loader import load_adapter
from geometry.io.summary import adapter_summary
from geometry.merging import merge
from geometry.runtime import Runtime
from tests.families import FAMILIES, peft_delta, tiny_model

PREFIX = "base_model.model."
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "bert": ["query", "value", "dense"],
           "gpt2": ["c_attn", "c_proj"]}


def _adalora_folder(family: str, path, seed: int = 0, prune: bool = True, zero_e: bool = False, **kw):
    """An AdaLoRA adapter built and saved by peft, with random ``E`` and (``prune``) a rank_pattern that keeps
    4 of 6 components in most modules, none in one (rank 0) and all in another."""
    from peft import AdaLoraConfig, get_peft_model

    spec = FAMILIES[family]
    torch.manual_seed(seed + 1)
    cfg = dict(target_modules=TARGETS[family], init_r=6, target_r=3, lora_alpha=16, total_step=10,
               task_type=spec.task_type, init_lora_weights=False, fan_in_fan_out=spec.fan_in_fan_out)
    cfg.update(kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(tiny_model(family, seed), AdaLoraConfig(**cfg))
    gen = torch.Generator().manual_seed(seed + 5)
    pattern = {}
    names = [n for n, _ in pm.named_parameters() if ".lora_E." in n]
    with torch.no_grad():
        for i, n in enumerate(names):
            p = pm.get_parameter(n)
            p.copy_(torch.randn(p.shape, generator=gen))
            if zero_e:
                p[1:3] = 0.0
            mask = [True, False, True, True, False, True]
            if i == 0:
                mask = [False] * 6
            elif i == 1:
                mask = [True] * 6
            pattern[n.removeprefix(PREFIX)] = mask
    if prune:
        pm.peft_config["default"].rank_pattern = pattern
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(str(path))
    return path


def _peft(family: str, path):
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(tiny_model(family), str(path)).eval()


def _rel(a, b):
    return float((a - b).abs().max() / max(float(b.abs().max()), 1e-30))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("adalora")
    return {
        "llama": _adalora_folder("llama", root / "llama"),
        "llama2": _adalora_folder("llama", root / "llama2", seed=2),
        "bert": _adalora_folder("bert", root / "bert"),
        "zero_e": _adalora_folder("llama", root / "zero_e", prune=False, zero_e=True),
        "alpha0": _adalora_folder("llama", root / "alpha0", lora_alpha=0),
        "gpt2": _adalora_folder("gpt2", root / "gpt2"),
    }


@pytest.mark.parametrize("which", ["llama", "bert", "zero_e", "alpha0", "gpt2"])
def test_update_equals_peft_delta_weight(folders, which):
    family = which if which in ("bert", "gpt2") else "llama"
    adapter = load_adapter(folders[which])
    assert adapter.config.peft_type == "ADALORA"
    pm = _peft(family, folders[which])
    seen = set()
    for key, mod in adapter.modules.items():
        want = peft_delta(pm, mod.name.removeprefix(PREFIX))
        if mod.rows is not None:  # a part of GPT-2's fused c_attn
            want = want[mod.rows[0]:mod.rows[1]]
        assert _rel(mod.dense(), want) < 1e-6, key
        assert mod.A.dtype == torch.float32 and mod.rank == mod.r
        seen.add(mod.name)
    # every module peft holds with a non-zero update is loaded; rank-0 modules are left out with a warning
    for name, layer in pm.base_model.model.named_modules():
        if hasattr(layer, "lora_E") and "default" in layer.lora_E:
            if layer.lora_A["default"].shape[0] == 0:
                assert name not in seen
            else:
                assert name in seen
    if which in ("llama", "bert", "gpt2"):
        assert any("pruned to rank 0" in w for w in adapter.warnings)
        assert sorted({m.rank for m in adapter.modules.values()}) == [4, 6]
    if which == "zero_e":  # components with E = 0 are dropped: rank 6 -> 4, same update
        assert {m.rank for m in adapter.modules.values()} == {4}


@pytest.mark.parametrize("family", ["llama", "bert", "gpt2"])
def test_runtime_equals_peft_logits(folders, family):
    ids = torch.randint(0, 64, (3, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = _peft(family, folders[family])(input_ids=ids).logits
        runtime = Runtime(tiny_model(family))
        with runtime.apply(load_adapter(folders[family])):
            got = runtime.forward(input_ids=ids).logits
    assert float((got - want).abs().max()) < 1e-5 * float(want.abs().max())


def test_geometry_and_merges_are_factored_as_for_lora(folders, tmp_path):
    a, b = load_adapter(folders["llama"]), load_adapter(folders["llama2"])
    assert a.config.peft_type == "ADALORA" and not adapter_summary(a)["notes"]
    frame = geometry.distances([a, b], metric="cosine", kind="down")
    assert frame.shape == (2, 2) and 0 < frame.iloc[0, 1] < 2
    merged = merge([a, b], "task_arithmetic", weights=[1.0, 1.0])
    for key, mod in merged.modules.items():
        want = sum(ad.modules[key].dense() for ad in (a, b) if key in ad.modules)
        assert _rel(mod.dense(), want) < 1e-6
    folder = merged.to_peft_folder(tmp_path / "merged")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = _peft("llama", folder)(input_ids=ids).logits
        runtime = Runtime(tiny_model("llama"))
        with runtime.apply([a, b], head=False):
            want = runtime.forward(input_ids=ids).logits
    assert float((got - want).abs().max()) < 1e-5 * float(want.abs().max())


def _rewrite(src, dst, config_edit=None, state_edit=None):
    dst.mkdir()
    config = json.loads((src / "adapter_config.json").read_text())
    if config_edit:
        config_edit(config)
    (dst / "adapter_config.json").write_text(json.dumps(config))
    state = load_file(str(src / "adapter_model.safetensors"))
    if state_edit:
        state_edit(state)
    save_file(state, str(dst / "adapter_model.safetensors"))
    return dst


def _drop_e(state):
    del state[next(k for k in state if k.endswith(".lora_E"))]


def _bad_e_shape(state):
    k = next(k for k in state if k.endswith(".lora_E") and state[k].shape[0] == 4)
    state[k] = torch.ones(3, 1)


def _int_e(state):
    k = next(k for k in state if k.endswith(".lora_E"))
    state[k] = state[k].to(torch.int32)


@pytest.mark.parametrize("case, config_edit, state_edit, match", [
    ("no-E", None, _drop_e, "has no lora_E"),
    ("E-shape", None, _bad_e_shape, "expected A \\(r, in\\), B \\(out, r\\) and E \\(r, 1\\)"),
    ("int-E", None, _int_e, "dtype torch.int32"),
    ("pattern-not-list", lambda c: c.update(rank_pattern={"x.lora_E": "yes"}), None, "list of true / false"),
    ("pattern-key", lambda c: c.update(rank_pattern={"model.layers.0.self_attn.q_proj": [True]}), None,
     "does not name a lora_E"),
    ("pattern-count", lambda c: c["rank_pattern"].update(
        {k: [True] * 5 + [False] for k, v in c["rank_pattern"].items() if sum(v) == 4}), None, "rank_pattern keeps"),
    ("init_r", lambda c: c.update(init_r="six"), None, "init_r"),
    ("all-pruned", lambda c: c.update(rank_pattern={k: [False] * 6 for k in c["rank_pattern"]}),
     lambda st: st.update({k: v[:0] if not k.endswith("lora_B") else v[:, :0] for k, v in st.items()}),
     "every AdaLoRA module is pruned"),
    ("dora", lambda c: c.update(use_dora=True), None, "does not support DoRA"),
])
def test_malformed_adalora_is_one_clear_error(folders, tmp_path, case, config_edit, state_edit, match):
    bad = _rewrite(folders["llama"], tmp_path / case, config_edit, state_edit)
    with pytest.raises(AdapterLoadError, match=match):
        load_adapter(bad)


def test_other_peft_types_still_refused(folders, tmp_path):
    bad = _rewrite(folders["llama"], tmp_path / "ia3", lambda c: c.update(peft_type="IA3"))
    with pytest.raises(AdapterLoadError, match="peft_type is 'IA3'"):
        load_adapter(bad)
