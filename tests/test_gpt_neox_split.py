"""GPT-NeoX ``query_key_value`` split exactly into q / k / v by its per-head layout ``[heads, 3, head_dim]``,
checked against a random-weight GPTNeoX model's own q / k / v of the LoRA-adapted projection."""

from __future__ import annotations

import pytest
import torch

import geometry
from geometry.io import naming
from geometry.io.loader import load_adapter
from geometry.types import ModuleKey, row_index

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
neox = pytest.importorskip("transformers.models.gpt_neox.modeling_gpt_neox")

HIDDEN, HEADS = 32, 4
BASE = "tiny-random-neox"


def _model(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.GPTNeoXConfig(vocab_size=64, hidden_size=HIDDEN, num_attention_heads=HEADS, num_hidden_layers=2,
                                     intermediate_size=64, max_position_embeddings=32, rotary_pct=0.5)
    cfg._attn_implementation = "eager"
    return transformers.GPTNeoXForCausalLM(cfg).eval()


def _adapter(tmp_path, seed: int = 0, base: str = BASE):
    model = _model()
    lcfg = peft.LoraConfig(r=3, lora_alpha=6, target_modules=["query_key_value"], init_lora_weights=False)
    torch.manual_seed(100 + seed)
    pm = peft.get_peft_model(model, lcfg)
    pm.peft_config["default"].base_model_name_or_path = base
    pm.save_pretrained(tmp_path / f"neox{seed}")
    return pm, load_adapter(tmp_path / f"neox{seed}", name=f"neox{seed}")


def _own_qkv(pm, x: torch.Tensor) -> list[torch.Tensor]:
    """The model's q, k (before rotary) and v of layer 0, captured inside ``GPTNeoXAttention.forward``."""
    seen: dict[str, torch.Tensor] = {}
    rope, attn = neox.apply_rotary_pos_emb, neox.eager_attention_forward

    def cap_rope(q, k, *a, **kw):
        seen.setdefault("q", q.detach().clone())
        seen.setdefault("k", k.detach().clone())
        return rope(q, k, *a, **kw)

    def cap_attn(module, q, k, v, *a, **kw):
        seen.setdefault("v", v.detach().clone())
        return attn(module, q, k, v, *a, **kw)

    proj = pm.base_model.model.gpt_neox.layers[0].attention.query_key_value
    hook = proj.register_forward_pre_hook(lambda _m, args: seen.setdefault("x", args[0].detach().clone()))
    neox.apply_rotary_pos_emb, neox.eager_attention_forward = cap_rope, cap_attn
    try:
        with torch.no_grad():
            pm(inputs_embeds=x)
    finally:
        neox.apply_rotary_pos_emb, neox.eager_attention_forward = rope, attn
        hook.remove()
    return [seen["q"], seen["k"], seen["v"], seen["x"]]  # (batch, heads, seq, head_dim); the projection's input


@pytest.fixture
def known_base(monkeypatch):
    monkeypatch.setitem(naming.NEOX_HEADS, BASE, (HIDDEN, HEADS))


def test_split_parts_equal_the_models_own_q_k_v(tmp_path, known_base):
    pm, ad = _adapter(tmp_path)
    assert not any("kept fused" in w for w in ad.warnings)
    assert {k.kind for k in ad.modules} == {"q", "k", "v"} and ad.layers() == [0, 1]
    x = torch.randn(2, 5, HIDDEN, generator=torch.Generator().manual_seed(1))
    with_lora = _own_qkv(pm, x)
    with pm.disable_adapter():
        without = _own_qkv(pm, x)
    d = HIDDEN // HEADS
    assert torch.equal(with_lora[3], without[3])  # the input of layer 0's projection does not depend on the LoRA
    for i, kind in enumerate(("q", "k", "v")):
        part = ad.modules[ModuleKey("model", 0, kind)]
        assert part.shape == (HIDDEN, HIDDEN) and len(part.rows) == HEADS
        delta = (with_lora[3].double() @ part.dense().T).view(2, 5, HEADS, d).transpose(1, 2)  # rows are head-major
        got = with_lora[i].double() - without[i].double()
        assert torch.allclose(got, delta, rtol=1e-4, atol=1e-5), kind


def test_split_parts_put_back_the_fused_update(tmp_path, known_base):
    pm, ad = _adapter(tmp_path)
    layer = pm.base_model.model.gpt_neox.layers[1].attention.query_key_value
    fused = layer.get_delta_weight("default").double()
    got = torch.zeros_like(fused)
    for kind in "qkv":
        part = ad.modules[ModuleKey("model", 1, kind)]
        got[row_index(part.rows)] = part.dense()
    assert torch.allclose(got, fused, rtol=1e-6, atol=1e-7)


def test_merge_export_writes_the_fused_module_back(tmp_path, known_base):
    _, a = _adapter(tmp_path, 0)
    _, b = _adapter(tmp_path, 1)
    merged = geometry.merge([a, b], method="task_arithmetic")
    back = load_adapter(merged.to_peft_folder(tmp_path / "merged"))
    for key, mod in back.modules.items():
        want = a.modules[key].dense() + b.modules[key].dense()
        assert torch.allclose(mod.dense(), want, rtol=1e-5, atol=1e-6), key
    assert len(geometry.inclusion(a, b)) == len(a.modules)


def test_unknown_base_keeps_qkv_fused_with_a_note(tmp_path):
    _, ad = _adapter(tmp_path, base="someone/unknown-neox")
    assert {k.kind for k in ad.modules} == {"qkv"}
    assert any("NEOX_HEADS" in w and "interleaves" in w for w in ad.warnings)


def test_neox_rows_layout():
    q, k, v = naming.neox_rows(2, 3)
    assert q == ((0, 3), (9, 12)) and k == ((3, 6), (12, 15)) and v == ((6, 9), (15, 18))
    assert naming.neox_heads("EleutherAI/pythia-1.4b-deduped", 2048, 6144) == 16
    assert naming.neox_heads("EleutherAI/pythia-1b", 2048, 6144) == 8
    assert naming.neox_heads("EleutherAI/pythia-1b", 1024, 3072) is None  # shapes that do not fit


def test_runtime_puts_the_parts_back_into_the_fused_projection(tmp_path, known_base):
    from geometry.runtime.updates import adapter_updates

    pm, ad = _adapter(tmp_path)
    updates = adapter_updates(ad).updates
    for i in range(2):
        name = f"gpt_neox.layers.{i}.attention.query_key_value"
        B, A, scale = updates[name][:3]
        fused = pm.base_model.model.gpt_neox.layers[i].attention.query_key_value.get_delta_weight("default")
        assert torch.allclose(scale * B.double() @ A.double(), fused.double(), rtol=1e-6, atol=1e-7)
