"""Module paths -> (stack, layer, kind) across families."""

from __future__ import annotations

import pytest

from geometry.io.naming import fused_qkv_note, has_two_stacks, module_key
from geometry.types import ModuleKey

CASES = [
    # Llama / Mistral / Qwen2 / Gemma
    ("base_model.model.model.layers.3.self_attn.q_proj", ("model", 3, "q")),
    ("model.layers.0.self_attn.k_proj", ("model", 0, "k")),
    ("model.layers.0.self_attn.v_proj", ("model", 0, "v")),
    ("model.layers.10.self_attn.o_proj", ("model", 10, "o")),
    ("model.layers.2.mlp.gate_proj", ("model", 2, "gate")),
    ("model.layers.2.mlp.up_proj", ("model", 2, "up")),
    ("model.layers.2.mlp.down_proj", ("model", 2, "down")),
    # OPT (decoder-only: a single stack)
    ("model.decoder.layers.1.self_attn.out_proj", ("model", 1, "o")),
    ("model.decoder.layers.1.fc1", ("model", 1, "fc_in")),
    ("model.decoder.layers.1.fc2", ("model", 1, "fc_out")),
    # GPT-Neo
    ("transformer.h.4.attn.attention.q_proj", ("model", 4, "q")),
    ("transformer.h.4.attn.attention.out_proj", ("model", 4, "o")),
    ("transformer.h.4.mlp.c_fc", ("model", 4, "up")),
    ("transformer.h.4.mlp.c_proj", ("model", 4, "down")),
    # Phi-3 fused
    ("model.layers.1.self_attn.qkv_proj", ("model", 1, "qkv")),
    ("model.layers.1.mlp.gate_up_proj", ("model", 1, "gate_up")),
    # GPT-2: same suffix c_proj, different modules
    ("transformer.h.7.attn.c_proj", ("model", 7, "o")),
    ("transformer.h.7.mlp.c_proj", ("model", 7, "down")),
    ("transformer.h.7.mlp.c_fc", ("model", 7, "up")),
    # BERT / RoBERTa / MiniLM
    ("bert.encoder.layer.5.attention.self.query", ("model", 5, "q")),
    ("roberta.encoder.layer.5.attention.self.key", ("model", 5, "k")),
    ("encoder.layer.5.attention.self.value", ("model", 5, "v")),
    ("bert.encoder.layer.5.attention.output.dense", ("model", 5, "o")),
    ("bert.encoder.layer.5.intermediate.dense", ("model", 5, "up")),
    ("bert.encoder.layer.5.output.dense", ("model", 5, "down")),
    # DistilBERT
    ("distilbert.transformer.layer.2.attention.q_lin", ("model", 2, "q")),
    ("distilbert.transformer.layer.2.attention.out_lin", ("model", 2, "o")),
    ("distilbert.transformer.layer.2.ffn.lin1", ("model", 2, "up")),
    ("distilbert.transformer.layer.2.ffn.lin2", ("model", 2, "down")),
    # T5: block index, not the sub-layer index
    ("encoder.block.3.layer.0.SelfAttention.q", ("encoder", 3, "q")),
    ("decoder.block.3.layer.0.SelfAttention.o", ("decoder", 3, "o")),
    ("decoder.block.3.layer.1.EncDecAttention.k", ("decoder", 3, "cross_k")),
    ("decoder.block.3.layer.1.EncDecAttention.v", ("decoder", 3, "cross_v")),
    ("encoder.block.0.layer.1.DenseReluDense.wi", ("encoder", 0, "up")),
    ("encoder.block.0.layer.1.DenseReluDense.wi_0", ("encoder", 0, "gate")),
    ("encoder.block.0.layer.1.DenseReluDense.wi_1", ("encoder", 0, "up")),
    ("decoder.block.0.layer.2.DenseReluDense.wo", ("decoder", 0, "down")),
    # BART cross-attention
    ("model.decoder.layers.0.encoder_attn.q_proj", ("decoder", 0, "cross_q")),
    ("model.decoder.layers.0.encoder_attn.out_proj", ("decoder", 0, "cross_o")),
    # BLOOM / Falcon / GPT-NeoX
    ("transformer.h.0.self_attention.query_key_value", ("model", 0, "qkv")),
    ("transformer.h.0.self_attention.dense", ("model", 0, "o")),
    ("gpt_neox.layers.0.attention.dense", ("model", 0, "o")),
    ("transformer.h.0.mlp.dense_h_to_4h", ("model", 0, "up")),
    ("transformer.h.0.mlp.dense_4h_to_h", ("model", 0, "down")),
    # blocks.N container, embeddings
    ("blocks.9.attn.q_proj", ("model", 9, "q")),
    ("model.embed_tokens", ("model", -1, "embed")),
]


@pytest.mark.parametrize("name, expected", CASES)
def test_module_key(name, expected):
    assert module_key(name) == [(ModuleKey(*expected), None)]


@pytest.mark.parametrize(
    "name",
    [
        "lm_head",
        "bert.pooler.dense",
        "model.layers.0.block_sparse_moe.experts.3.w1",  # extra index: no canonical place
        "model.layers.0.self_attn.rotary",
        "transformer.h.0.attn.q_attn",
    ],
)
def test_unmapped_names_are_raw(name):
    assert module_key(name) == [(ModuleKey("raw", -1, name), None)]


def test_gpt2_c_attn_splits_into_thirds_given_shapes():
    parts = module_key("transformer.h.2.attn.c_attn", out_features=2304, in_features=768)
    assert parts == [
        (ModuleKey("model", 2, "q"), (0, 768)),
        (ModuleKey("model", 2, "k"), (768, 1536)),
        (ModuleKey("model", 2, "v"), (1536, 2304)),
    ]


def test_c_attn_stays_fused_without_shapes_or_for_bigcode():
    assert module_key("transformer.h.2.attn.c_attn") == [(ModuleKey("model", 2, "qkv"), None)]
    # GPT-BigCode multi-query: out = hidden + 2 * head_dim
    assert module_key("transformer.h.2.attn.c_attn", out_features=768 + 128, in_features=768) == [
        (ModuleKey("model", 2, "qkv"), None)
    ]
    assert module_key("transformer.h.2.attn.c_attn", out_features=2304, in_features=768,
                      base_model="bigcode/gpt_bigcode-santacoder") == [(ModuleKey("model", 2, "qkv"), None)]


def test_two_stacks_decided_per_adapter():
    opt = ["model.decoder.layers.0.self_attn.q_proj", "model.decoder.layers.1.self_attn.q_proj"]
    bert = ["bert.encoder.layer.0.attention.self.query"]
    bart = ["model.encoder.layers.0.self_attn.q_proj", "model.decoder.layers.0.self_attn.q_proj"]
    assert not has_two_stacks(opt) and not has_two_stacks(bert)
    assert has_two_stacks(bart)
    assert has_two_stacks(opt, task_type="SEQ_2_SEQ_LM")
    assert has_two_stacks(["decoder.block.0.layer.1.EncDecAttention.q"])
    assert module_key(bart[0], two_stacks=True) == [(ModuleKey("encoder", 0, "q"), None)]
    assert module_key(bart[1], two_stacks=True) == [(ModuleKey("decoder", 0, "q"), None)]
    assert module_key(opt[0], two_stacks=False) == [(ModuleKey("model", 0, "q"), None)]


def test_phi3_qkv_proj_splits_into_thirds_without_gqa():
    # Phi-3-mini: hidden 3072, 32 heads, 32 kv heads: qkv_proj is 3 * 3072 rows, q | k | v contiguous
    name = "base_model.model.model.layers.5.self_attn.qkv_proj"
    parts = module_key(name, out_features=9216, in_features=3072)
    assert parts == [
        (ModuleKey("model", 5, "q"), (0, 3072)),
        (ModuleKey("model", 5, "k"), (3072, 6144)),
        (ModuleKey("model", 5, "v"), (6144, 9216)),
    ]
    assert fused_qkv_note("model.layers.5.self_attn.qkv_proj", out_features=9216, in_features=3072) is None


@pytest.mark.parametrize("name, out, inp, base, why", [
    ("model.layers.2.self_attn.qkv_proj", None, None, None, "output size is unknown"),
    # Phi-4: hidden 5120, 40 heads, 10 kv heads of 128: 5120 + 2 * 1280 rows
    ("model.layers.2.self_attn.qkv_proj", 7680, 5120, "microsoft/phi-4", "is not 3 x its input"),
    # Phi-3-small-like GQA shapes on the qkv_proj path
    ("model.layers.2.self_attn.qkv_proj", 6144, 4096, None, "is not 3 x its input"),
    # MiniMax lightning attention: 3 * hidden rows, but q | k | v interleaved per head
    ("model.layers.2.self_attn.qkv_proj", 18432, 6144, "MiniMaxAI/MiniMax-Text-01", "interleaves"),
])
def test_qkv_proj_stays_fused_with_a_reason(name, out, inp, base, why):
    fused = [(ModuleKey("model", 2, "qkv"), None)]
    assert module_key(name, out_features=out, in_features=inp, base_model=base) == fused
    note = fused_qkv_note(name, out_features=out, in_features=inp, base_model=base)
    assert note is not None and "kept fused as 'qkv'" in note and why in note


def test_other_fused_qkv_paths_are_never_split():
    # CodeGen attn.qkv_proj: 3 * hidden rows in four interleaved q | v | k partitions
    for base in ("Salesforce/codegen-350M-mono", None):
        parts = module_key("transformer.h.2.attn.qkv_proj", out_features=3072, in_features=1024,
                           base_model=base)
        assert parts == [(ModuleKey("model", 2, "qkv"), None)]
    assert module_key("transformer.blocks.2.attn.Wqkv", out_features=3072, in_features=1024) == [
        (ModuleKey("model", 2, "qkv"), None)]
    bloom = "transformer.h.0.self_attention.query_key_value"
    assert module_key(bloom, out_features=96, in_features=32) == [(ModuleKey("model", 0, "qkv"), None)]
    assert fused_qkv_note(bloom, out_features=96, in_features=32) is None  # always fused: no note
    assert fused_qkv_note("transformer.h.2.attn.qkv_proj", out_features=3072, in_features=1024) is None


def test_peft_prefix_has_one_definition():
    """``geometry.io.config.PEFT_PREFIX`` is the only spelling of peft's prefix in naming / loader / merging."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "geometry"
    files = [*sorted((root / "io").glob("*.py")), *sorted((root / "merging").glob("*.py"))]
    offenders = [f.name for f in files if '"base_model.model."' in f.read_text() and f.name != "config.py"]
    assert offenders == []
    assert '"base_model.model."' in (root / "io" / "config.py").read_text()
