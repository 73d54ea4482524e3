"""peft LoHa / LoKr adapters: loaded as the exact SVD factors of their update (geometry.io.lycoris),
checked against peft's own ``get_delta_weight``; other peft types refused with one line."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save

import geometry
from geometry.errors import AdapterLoadError
from geometry.io.loader import load_adapter, load_files
from geometry.io.summary import adapter_summary
from geometry.types import ModuleKey

peft = pytest.importorskip("peft")


class Tiny(torch.nn.Module):
    """Two llama-named blocks of linear layers (q / v / up), enough for peft to adapt."""

    def __init__(self, d: int = 12) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.ModuleDict({
            "q_proj": torch.nn.Linear(d, d), "v_proj": torch.nn.Linear(d, d), "up_proj": torch.nn.Linear(d, 2 * d),
        }) for _ in range(2))

    def forward(self, x):  # pragma: no cover - peft only wraps the modules
        return x


def _peft_model(kind: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    cfg_cls = peft.LoHaConfig if kind == "loha" else peft.LoKrConfig
    cfg = cfg_cls(r=3, alpha=5, target_modules=["q_proj", "v_proj", "up_proj"], init_weights=False, **kw)
    return peft.get_peft_model(Tiny(), cfg)


def _deltas(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "get_delta_weight") and hasattr(mod, "base_layer"):
            out[name.removeprefix("base_model.model.")] = mod.get_delta_weight("default").detach().double()
    return out


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_update_equals_peft_delta_weight(tmp_path, kind):
    model = _peft_model(kind, rank_pattern={"up_proj": 2}, alpha_pattern={"v_proj": 7})
    model.save_pretrained(tmp_path / kind)
    adapter = load_adapter(tmp_path / kind)
    deltas = _deltas(model)
    assert len(deltas) == 6 and len(adapter.modules) == 6
    assert adapter.config.peft_type == kind.upper()
    for mod in adapter.modules.values():
        want = deltas[mod.name]
        got = mod.dense()
        assert got.shape == want.shape
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max())), mod.name
        assert mod.scale == 1.0 and mod.r == mod.rank <= min(want.shape)
    assert {k.kind for k in adapter.modules} == {"q", "v", "up"}
    assert any("SVD" in w for w in adapter.warnings)
    summary = adapter_summary(adapter)
    assert summary["variant"] == ("LoHa" if kind == "loha" else "LoKr") and summary["format"] == "peft"


def test_loha_rank_is_up_to_r_squared_and_analyses_run(tmp_path):
    for seed in (0, 1):
        _peft_model("loha", seed).save_pretrained(tmp_path / f"h{seed}")
    a, b = (load_adapter(tmp_path / f"h{s}", name=f"h{s}") for s in (0, 1))
    q = a.modules[ModuleKey("model", 0, "q")]
    assert 3 < q.rank <= 9  # a Hadamard product of two rank-3 maps
    assert geometry.distances([a, b]).shape == (2, 2)
    assert len(geometry.anatomy(a)) > 0
    merged = geometry.merge([a, b], method="task_arithmetic")
    out = merged.to_peft_folder(tmp_path / "merged")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and "alpha" not in cfg
    back = load_adapter(out)
    for key, mod in back.modules.items():
        want = a.modules[key].dense() + b.modules[key].dense()
        assert torch.allclose(mod.dense(), want, rtol=1e-5, atol=1e-5)


def _cfg(**over) -> bytes:
    return json.dumps({"peft_type": "LOHA", "r": 2, "alpha": 2, "target_modules": ["q_proj"], **over}).encode()


P = "base_model.model.layers.0.q_proj."


@pytest.mark.parametrize("config, tensors, words", [
    (_cfg(), {P + "lora_A.weight": torch.ones(2, 4), P + "lora_B.weight": torch.ones(4, 2)},
     ["no LOHA tensors (hada_*)"]),
    (_cfg(), {P + "hada_w1_a": torch.ones(4, 2), P + "hada_w1_b": torch.ones(2, 4), P + "hada_w2_a": torch.ones(4, 2)},
     ["module layers.0.q_proj", "no hada_w2_b"]),
    (_cfg(), {P + "hada_w1_a": torch.ones(4, 2), P + "hada_w1_b": torch.ones(3, 4), P + "hada_w2_a": torch.ones(4, 2),
              P + "hada_w2_b": torch.ones(2, 4)}, ["hada_w1_a", "do not chain"]),
    (_cfg(), {P + "hada_w1_a": torch.ones(4, 2), P + "hada_w1_b": torch.ones(2, 4), P + "hada_w2_a": torch.ones(5, 2),
              P + "hada_w2_b": torch.ones(2, 4)}, ["w2_a @ w2_b is (5, 4)"]),
    (_cfg(), {P + "hada_w1_a": torch.ones(4, 2), P + "hada_w1_b": torch.ones(2, 4), P + "hada_w2_a": torch.ones(4, 2),
              P + "hada_w2_b": torch.ones(2, 4), P + "hada_t1": torch.ones(2, 2, 3, 3)}, ["hada_t1", "CP-decomposed"]),
    (_cfg(peft_type="LOKR"), {P + "lokr_w1": torch.ones(2, 2), P + "lokr_w2_a": torch.ones(2, 2, 3, 3),
                              P + "lokr_w2_b": torch.ones(2, 2)}, ["lokr_w2_a", "expected a 2-D factor"]),
    (_cfg(peft_type="LOKR"), {P + "lokr_w1": torch.ones(2, 2), P + "lokr_w2": torch.tensor([[1.0, float("nan")]])},
     ["lokr_w2", "NaN"]),
    (_cfg(alpha="x"), {}, ["'alpha' must be a number"]),
])
def test_malformed_loha_lokr_one_error(config, tensors, words):
    with pytest.raises(AdapterLoadError) as exc:
        load_files({"adapter_config.json": config, "adapter_model.safetensors": save(tensors or {"x": torch.ones(1)})})
    msg = str(exc.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


@pytest.mark.parametrize("peft_type", ["PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "IA3", "VERA", "OFT", "BOFT"])
def test_other_peft_types_refused_with_one_line(peft_type):
    with pytest.raises(AdapterLoadError) as exc:
        load_files({"adapter_config.json": _cfg(peft_type=peft_type),
                    "adapter_model.safetensors": save({"x": torch.ones(1)})})
    msg = str(exc.value)
    assert "\n" not in msg and f"peft_type is {peft_type!r}" in msg
    assert "LoRA, DoRA, AdaLoRA, LoHa and LoKr" in msg
