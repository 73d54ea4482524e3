"""Tiny random-weight models of many families, wrapped with peft LoRA and saved as real adapters.

No download: every model is built from a ``transformers`` config with hidden size 32 and 2 blocks.
LoRA factors are random (``init_lora_weights=False``) so that the task vectors are non-zero.

    from tests.families import FAMILIES, make_peft_model, save_adapter
    path, peft_model = save_adapter("llama", tmp_path / "llama", r=4, lora_alpha=8)

Other helpers may reuse these builders for their own tests.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from transformers.utils import logging as hf_logging

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()

SMALL = dict(vocab_size=64)


@dataclass(frozen=True)
class Family:
    """How to build one tiny model and which modules a LoRA should target.

    ``expected`` maps a module path (inside the base model) to its ``(stack, layer, kind)``
    (several for a split fused module); ``fan_in_fan_out`` is True for GPT-2 ``Conv1D`` layers.
    """

    make_config: Callable[[], transformers.PretrainedConfig]
    auto: str
    targets: list[str]
    expected: dict[str, list[tuple[str, int, str]]]
    fan_in_fan_out: bool = False
    task_type: str | None = "CAUSAL_LM"


def _decoder(cls_name: str, **kw) -> Callable[[], transformers.PretrainedConfig]:
    base = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, **SMALL)
    base.update(kw)
    return lambda: getattr(transformers, cls_name)(**base)


_LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_LLAMA_EXPECTED = {
    "model.layers.0.self_attn.q_proj": [("model", 0, "q")],
    "model.layers.1.self_attn.k_proj": [("model", 1, "k")],
    "model.layers.1.self_attn.v_proj": [("model", 1, "v")],
    "model.layers.0.self_attn.o_proj": [("model", 0, "o")],
    "model.layers.1.mlp.gate_proj": [("model", 1, "gate")],
    "model.layers.0.mlp.up_proj": [("model", 0, "up")],
    "model.layers.1.mlp.down_proj": [("model", 1, "down")],
}

FAMILIES: dict[str, Family] = {
    "llama": Family(_decoder("LlamaConfig"), "AutoModelForCausalLM", _LLAMA_TARGETS, _LLAMA_EXPECTED),
    "mistral": Family(_decoder("MistralConfig"), "AutoModelForCausalLM", _LLAMA_TARGETS, _LLAMA_EXPECTED),
    "qwen2": Family(_decoder("Qwen2Config"), "AutoModelForCausalLM", _LLAMA_TARGETS, _LLAMA_EXPECTED),
    "gemma": Family(_decoder("GemmaConfig", head_dim=8), "AutoModelForCausalLM", _LLAMA_TARGETS, _LLAMA_EXPECTED),
    "opt": Family(
        lambda: transformers.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                       word_embed_proj_dim=32, max_position_embeddings=64, **SMALL),
        "AutoModelForCausalLM",
        ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
        {
            "model.decoder.layers.0.self_attn.q_proj": [("model", 0, "q")],
            "model.decoder.layers.1.self_attn.out_proj": [("model", 1, "o")],
            "model.decoder.layers.0.fc1": [("model", 0, "fc_in")],
            "model.decoder.layers.1.fc2": [("model", 1, "fc_out")],
        },
    ),
    "gpt_neo": Family(
        lambda: transformers.GPTNeoConfig(hidden_size=32, num_layers=2, num_heads=4,
                                          attention_types=[[["global", "local"], 1]], max_position_embeddings=64,
                                          **SMALL),
        "AutoModelForCausalLM",
        ["q_proj", "v_proj", "out_proj", "c_fc", "c_proj"],
        {
            "transformer.h.0.attn.attention.q_proj": [("model", 0, "q")],
            "transformer.h.1.attn.attention.v_proj": [("model", 1, "v")],
            "transformer.h.1.attn.attention.out_proj": [("model", 1, "o")],
            "transformer.h.0.mlp.c_fc": [("model", 0, "up")],
            "transformer.h.0.mlp.c_proj": [("model", 0, "down")],
        },
    ),
    # Phi-3-mini / medium: no GQA (num_key_value_heads = num_heads), qkv_proj is 3 * hidden: split
    "phi3": Family(
        _decoder("Phi3Config", num_key_value_heads=4, pad_token_id=0),
        "AutoModelForCausalLM",
        ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
        {
            "model.layers.0.self_attn.qkv_proj": [("model", 0, "q"), ("model", 0, "k"), ("model", 0, "v")],
            "model.layers.1.self_attn.qkv_proj": [("model", 1, "q"), ("model", 1, "k"), ("model", 1, "v")],
            "model.layers.1.self_attn.o_proj": [("model", 1, "o")],
            "model.layers.0.mlp.gate_up_proj": [("model", 0, "gate_up")],
            "model.layers.1.mlp.down_proj": [("model", 1, "down")],
        },
    ),
    # Phi-4-like GQA (2 kv heads for 4 heads): qkv_proj is (4 + 2 * 2) * 8 = 64 != 3 * 32: fused
    "phi3_gqa": Family(
        _decoder("Phi3Config", num_key_value_heads=2, pad_token_id=0),
        "AutoModelForCausalLM",
        ["qkv_proj", "o_proj"],
        {
            "model.layers.0.self_attn.qkv_proj": [("model", 0, "qkv")],
            "model.layers.1.self_attn.o_proj": [("model", 1, "o")],
        },
    ),
    "gpt2": Family(
        lambda: transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, **SMALL),
        "AutoModelForCausalLM",
        ["c_attn", "c_proj", "c_fc"],
        {
            "transformer.h.0.attn.c_attn": [("model", 0, "q"), ("model", 0, "k"), ("model", 0, "v")],
            "transformer.h.1.attn.c_proj": [("model", 1, "o")],
            "transformer.h.1.mlp.c_fc": [("model", 1, "up")],
            "transformer.h.1.mlp.c_proj": [("model", 1, "down")],
        },
        fan_in_fan_out=True,
    ),
    "bert": Family(
        lambda: transformers.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=64, num_labels=3, **SMALL),
        "AutoModelForSequenceClassification",
        ["query", "key", "value", "dense"],
        {
            "bert.encoder.layer.0.attention.self.query": [("model", 0, "q")],
            "bert.encoder.layer.1.attention.self.key": [("model", 1, "k")],
            "bert.encoder.layer.0.attention.self.value": [("model", 0, "v")],
            "bert.encoder.layer.1.attention.output.dense": [("model", 1, "o")],
            "bert.encoder.layer.0.intermediate.dense": [("model", 0, "up")],
            "bert.encoder.layer.1.output.dense": [("model", 1, "down")],
            "bert.pooler.dense": [("raw", -1, "bert.pooler.dense")],
        },
        task_type="SEQ_CLS",
    ),
    "roberta": Family(
        lambda: transformers.RobertaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, max_position_embeddings=66, num_labels=2,
                                           pad_token_id=1, **SMALL),
        "AutoModelForSequenceClassification",
        ["query", "value"],
        {
            "roberta.encoder.layer.0.attention.self.query": [("model", 0, "q")],
            "roberta.encoder.layer.1.attention.self.value": [("model", 1, "v")],
        },
        task_type="SEQ_CLS",
    ),
    "distilbert": Family(
        lambda: transformers.DistilBertConfig(dim=32, hidden_dim=64, n_layers=2, n_heads=4,
                                              max_position_embeddings=64, **SMALL),
        "AutoModel",
        ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"],
        {
            "transformer.layer.0.attention.q_lin": [("model", 0, "q")],
            "transformer.layer.1.attention.k_lin": [("model", 1, "k")],
            "transformer.layer.0.attention.v_lin": [("model", 0, "v")],
            "transformer.layer.1.attention.out_lin": [("model", 1, "o")],
            "transformer.layer.0.ffn.lin1": [("model", 0, "up")],
            "transformer.layer.1.ffn.lin2": [("model", 1, "down")],
        },
        task_type=None,
    ),
    "t5": Family(
        lambda: transformers.T5Config(d_model=32, d_ff=64, d_kv=8, num_layers=2, num_decoder_layers=2,
                                      num_heads=4, decoder_start_token_id=0, **SMALL),
        "AutoModelForSeq2SeqLM",
        ["q", "k", "v", "o", "wi", "wo"],
        {
            "encoder.block.0.layer.0.SelfAttention.q": [("encoder", 0, "q")],
            "encoder.block.1.layer.0.SelfAttention.o": [("encoder", 1, "o")],
            "encoder.block.1.layer.1.DenseReluDense.wi": [("encoder", 1, "up")],
            "decoder.block.0.layer.0.SelfAttention.v": [("decoder", 0, "v")],
            "decoder.block.1.layer.1.EncDecAttention.q": [("decoder", 1, "cross_q")],
            "decoder.block.0.layer.1.EncDecAttention.o": [("decoder", 0, "cross_o")],
            "decoder.block.1.layer.2.DenseReluDense.wo": [("decoder", 1, "down")],
        },
        task_type="SEQ_2_SEQ_LM",
    ),
    "t5_gated": Family(
        lambda: transformers.T5Config(d_model=32, d_ff=64, d_kv=8, num_layers=1, num_decoder_layers=1,
                                      num_heads=4, feed_forward_proj="gated-gelu", decoder_start_token_id=0,
                                      **SMALL),
        "AutoModelForSeq2SeqLM",
        ["wi_0", "wi_1", "wo"],
        {
            "encoder.block.0.layer.1.DenseReluDense.wi_0": [("encoder", 0, "gate")],
            "encoder.block.0.layer.1.DenseReluDense.wi_1": [("encoder", 0, "up")],
            "decoder.block.0.layer.2.DenseReluDense.wo": [("decoder", 0, "down")],
        },
        task_type="SEQ_2_SEQ_LM",
    ),
    "bloom": Family(
        lambda: transformers.BloomConfig(hidden_size=32, n_layer=2, n_head=4, **SMALL),
        "AutoModelForCausalLM",
        ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
        {
            "transformer.h.0.self_attention.query_key_value": [("model", 0, "qkv")],
            "transformer.h.1.self_attention.dense": [("model", 1, "o")],
            "transformer.h.0.mlp.dense_h_to_4h": [("model", 0, "up")],
            "transformer.h.1.mlp.dense_4h_to_h": [("model", 1, "down")],
        },
    ),
    "falcon": Family(
        lambda: transformers.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, **SMALL),
        "AutoModelForCausalLM",
        ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
        {
            "transformer.h.1.self_attention.query_key_value": [("model", 1, "qkv")],
            "transformer.h.0.self_attention.dense": [("model", 0, "o")],
            "transformer.h.1.mlp.dense_h_to_4h": [("model", 1, "up")],
            "transformer.h.0.mlp.dense_4h_to_h": [("model", 0, "down")],
        },
    ),
}


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised tiny model of ``family`` (see :data:`FAMILIES`)."""
    spec = FAMILIES[family]
    torch.manual_seed(seed)
    return getattr(transformers, spec.auto).from_config(spec.make_config())


def make_peft_model(family: str, seed: int = 0, base: torch.nn.Module | None = None, **lora_kwargs):
    """``get_peft_model`` on a tiny model with random (non-zero) LoRA factors.

    ``lora_kwargs`` go to :class:`peft.LoraConfig` (defaults: the family's targets, ``r=4``,
    ``lora_alpha=8``, ``init_lora_weights=False``, the family's ``fan_in_fan_out`` and task type).
    """
    from peft import LoraConfig, get_peft_model

    spec = FAMILIES[family]
    model = base if base is not None else tiny_model(family, seed)
    kwargs = dict(target_modules=list(spec.targets), r=4, lora_alpha=8, init_lora_weights=False,
                  fan_in_fan_out=spec.fan_in_fan_out, task_type=spec.task_type)
    kwargs.update(lora_kwargs)
    torch.manual_seed(seed + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(model, LoraConfig(**kwargs))


def save_adapter(family: str, path: str | Path, seed: int = 0, safe_serialization: bool = True, **lora_kwargs):
    """Build, wrap and save a tiny adapter to ``path``; returns ``(path, peft_model)``."""
    peft_model = make_peft_model(family, seed=seed, **lora_kwargs)
    path = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.save_pretrained(str(path), safe_serialization=safe_serialization)
    return path, peft_model


def peft_delta(peft_model, module_name: str, adapter_name: str = "default") -> torch.Tensor:
    """peft's own ``get_delta_weight`` for ``module_name`` as the linear map ``(out, in)`` in float64.

    For ``fan_in_fan_out`` layers (GPT-2 ``Conv1D``) and embeddings peft returns the stored-weight
    orientation, which is transposed here.
    """
    layer = peft_model.base_model.model.get_submodule(module_name)
    delta = layer.get_delta_weight(adapter_name).detach().to(torch.float64)
    transposed = getattr(layer, "fan_in_fan_out", False) or adapter_name in getattr(layer, "lora_embedding_A", {})
    return delta.T if transposed else delta


def legacy_forward(x, A, B, enable, scale):
    """peft 0.2 MergedLinear LoRA branch: zero_pad(conv1d(A x, B, groups)) * scale, for inputs x (batch, in)."""
    groups = sum(enable)
    out = B.shape[0] // groups * len(enable)
    after_a = x @ A.T
    after_b = F.conv1d(after_a.unsqueeze(-1), B, groups=groups).squeeze(-1)
    ind = torch.zeros(len(enable), out // len(enable), dtype=torch.bool)
    ind[torch.tensor(enable)] = True
    result = x.new_zeros(x.shape[0], out)
    result[:, ind.view(-1)] = after_b
    return result * scale
