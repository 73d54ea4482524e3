"""Module names -> :class:`~geometry.types.ModuleKey` ``(stack, layer, kind)``.

A peft module path such as ``model.layers.3.self_attn.v_proj`` becomes ``ModuleKey("model", 3, "v")``
so that adapters of one family (and pages, CLI, distances) talk about the same place in the network.

* **layer**: the first block index in the path, from ``layers.N``, ``layer.N``, ``h.N``, ``block.N``
  or ``blocks.N`` (T5's ``block.N.layer.M`` takes ``N``; ``M`` is the sub-layer).
* **stack**: ``encoder`` / ``decoder`` for encoder-decoder models (T5 ``SelfAttention`` /
  ``EncDecAttention`` / ``DenseReluDense``, BART-like ``encoder_attn``, or when the loader saw both
  stacks in one adapter), ``model`` otherwise (BERT's ``bert.encoder.layer`` and OPT's
  ``model.decoder.layers`` are single stacks).
* **kind**: canonical names ``q k v o gate up down`` (fused kept as ``qkv`` / ``gate_up``),
  ``cross_q .. cross_o`` for cross-attention, ``fc_in`` / ``fc_out`` for ``fc1`` / ``fc2`` style MLPs,
  ``embed`` for embeddings. Two fused projections hold ``q|k|v`` in contiguous thirds of their
  output rows and are split into three parts with ``rows`` (``B`` rows sliced, ``A`` shared) when
  ``out_features == 3 * in_features``:

  - GPT-2 ``attn.c_attn`` (``Conv1D``; ``split(n_embd, dim=2)``);
  - Phi-3 ``self_attn.qkv_proj`` (``qkv[..., :num_heads * head_dim]`` is q, then k, then v): its
    output is ``(num_heads + 2 * num_kv_heads) * head_dim``, which equals ``3 * hidden`` exactly
    when there is no grouped-query attention (Phi-3-mini / medium: ``num_kv_heads = num_heads``).
    With GQA (Phi-4, Phi-4-multimodal: ``output != 3 * input``) the q / k / v sizes need head
    counts the adapter does not carry, so it stays fused ``qkv``;
    :func:`fused_qkv_note` says why (the loader adds it to ``Adapter.warnings``).

  GPT-NeoX ``attention.query_key_value`` (Pythia, GPT-NeoX-20B, Dolly v2, OpenCALM) lays its rows out
  ``[heads, 3, head_dim]``: when the base model's head count is known (:data:`NEOX_HEADS`, by name) it is
  split exactly into q / k / v parts whose ``rows`` are per-head row blocks
  (:func:`geometry.types.row_index`); otherwise it stays ``qkv`` with a note.

  Other fused projections stay fused ``qkv``: BLOOM / Falcon ``query_key_value`` and
  GPT-BigCode ``c_attn`` interleave heads (or use multi-query shapes), CodeGen's ``attn.qkv_proj``
  interleaves four q|v|k partitions, MiniMax's lightning-attention ``self_attn.qkv_proj``
  interleaves q|k|v per head (kept fused when the base model names MiniMax or CodeGen; an adapter
  that names no base model is taken to be Phi-3 when its path and shapes fit). MPT ``Wqkv`` and
  other ``qkv_proj`` paths stay fused as well.
* Diffusion UNet / DiT paths (``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k``,
  ``transformer_blocks.3.attn.to_q``...) of peft UNet / transformer adapters are keyed by
  :func:`geometry.io.diffusion.diffusion_key` (stack ``unet`` / ``transformer``, the block position as
  the layer, ``to_q`` / ``to_k`` / ``ff_in``... as the kind).
* A name that matches no rule (or has an extra index after the block, e.g. MoE experts) is
  ``ModuleKey("raw", -1, name)``: kept, listed as unmapped, never dropped.
"""

from __future__ import annotations

from geometry.io.config import PEFT_PREFIX
from geometry.io.diffusion_naming import is_diffusion_name, peft_diffusion_key
from geometry.types import ModuleKey

#: Containers of repeated blocks, matched as ``<container>.<index>``.
LAYER_CONTAINERS = ("layers", "layer", "h", "block", "blocks")
#: Module names of embedding tables.
EMBEDDING_NAMES = ("embed_tokens", "wte", "word_embeddings", "shared", "embed_in", "tok_embeddings")

# Suffix rules, most specific first: (path suffix segments, kind). Matched against the segments
# after the block index (or the whole path for modules outside blocks).
_RULES: tuple[tuple[tuple[str, ...], str], ...] = (
    # BERT / RoBERTa / MiniLM / ViT
    (("attention", "self", "query"), "q"),
    (("attention", "self", "key"), "k"),
    (("attention", "self", "value"), "v"),
    (("attention", "output", "dense"), "o"),
    (("intermediate", "dense"), "up"),
    (("output", "dense"), "down"),
    # T5
    (("EncDecAttention", "q"), "cross_q"),
    (("EncDecAttention", "k"), "cross_k"),
    (("EncDecAttention", "v"), "cross_v"),
    (("EncDecAttention", "o"), "cross_o"),
    (("SelfAttention", "q"), "q"),
    (("SelfAttention", "k"), "k"),
    (("SelfAttention", "v"), "v"),
    (("SelfAttention", "o"), "o"),
    (("DenseReluDense", "wi_0"), "gate"),
    (("DenseReluDense", "wi_1"), "up"),
    (("DenseReluDense", "wi"), "up"),
    (("DenseReluDense", "wo"), "down"),
    # BART / Whisper / mBART cross-attention
    (("encoder_attn", "q_proj"), "cross_q"),
    (("encoder_attn", "k_proj"), "cross_k"),
    (("encoder_attn", "v_proj"), "cross_v"),
    (("encoder_attn", "out_proj"), "cross_o"),
    # GPT-2 / GPT-Neo (same suffix c_proj, different modules)
    (("attn", "c_attn"), "c_attn"),
    (("attn", "c_proj"), "o"),
    (("mlp", "c_fc"), "up"),
    (("mlp", "c_proj"), "down"),
    # BLOOM / Falcon / GPT-NeoX / Phi
    (("self_attention", "dense"), "o"),
    (("attention", "dense"), "o"),
    (("self_attn", "dense"), "o"),
    (("query_key_value",), "qkv"),
    (("dense_h_to_4h",), "up"),
    (("dense_4h_to_h",), "down"),
    # DistilBERT
    (("q_lin",), "q"),
    (("k_lin",), "k"),
    (("v_lin",), "v"),
    (("out_lin",), "o"),
    (("ffn", "lin1"), "up"),
    (("ffn", "lin2"), "down"),
    # Llama / Mistral / Qwen2 / Gemma / OPT / GPT-J / GPT-Neo / Phi-3 / MPT
    (("q_proj",), "q"),
    (("k_proj",), "k"),
    (("v_proj",), "v"),
    (("o_proj",), "o"),
    (("out_proj",), "o"),
    (("self_attn", "qkv_proj"), "qkv_proj"),  # Phi-3: contiguous thirds when no GQA
    (("qkv_proj",), "qkv"),  # CodeGen ``attn.qkv_proj`` (interleaved) and others
    (("Wqkv",), "qkv"),
    (("gate_proj",), "gate"),
    (("up_proj",), "up"),
    (("down_proj",), "down"),
    (("gate_up_proj",), "gate_up"),
    (("fc1",), "fc_in"),
    (("fc2",), "fc_out"),
    (("fc_in",), "fc_in"),
    (("fc_out",), "fc_out"),
    # generic attention names (ViT ``attention.attention.query``)
    (("query",), "q"),
    (("key",), "k"),
    (("value",), "v"),
)
_T5_MARKERS = ("SelfAttention", "EncDecAttention", "DenseReluDense")
#: Fused kinds that are split into contiguous q / k / v thirds when ``out == 3 * in``, and the
#: base-model name fragments whose module of that path interleaves heads instead (kept fused).
_SPLIT_THIRDS: dict[str, tuple[str, ...]] = {
    "c_attn": ("bigcode", "starcoder", "santacoder", "gpt_bigcode"),
    "qkv_proj": ("minimax", "codegen"),
}


#: GPT-NeoX-family bases (Pythia, GPT-NeoX-20B, Dolly v2, OpenCALM): ``(hidden_size, num_attention_heads)`` by a
#: fragment of the base model's name (the longest fragment found in the lower-cased name wins; the adapter's
#: ``in_features`` must equal ``hidden_size``). ``attention.query_key_value`` of these models lays its output
#: rows out as ``[heads, 3, head_dim]`` (``modeling_gpt_neox``: ``view(..., -1, 3 * head_size)`` then
#: ``chunk(3)``), so q / k / v are exact row blocks once the head count is known; it is not in the shapes.
#: Add an entry for another GPT-NeoX checkpoint.
NEOX_HEADS: dict[str, tuple[int, int]] = {
    "pythia-70m": (512, 8), "pythia-160m": (768, 12), "pythia-410m": (1024, 16), "pythia-1b": (2048, 8),
    "pythia-1.4b": (2048, 16), "pythia-2.8b": (2560, 32), "pythia-6.9b": (4096, 32), "pythia-12b": (5120, 40),
    "gpt-neox-20b": (6144, 64), "dolly-v2-3b": (2560, 32), "dolly-v2-7b": (4096, 32), "dolly-v2-12b": (5120, 40),
    "open-calm-small": (768, 12), "open-calm-medium": (1024, 16), "open-calm-large": (1536, 16),
    "open-calm-1b": (2048, 16), "open-calm-3b": (2560, 32), "open-calm-7b": (4096, 32),
}


def neox_heads(base_model: str | None, in_features: int | None, out_features: int | None) -> int | None:
    """The head count of a GPT-NeoX base from :data:`NEOX_HEADS`, or None (unknown base, or shapes that do
    not fit: ``in != hidden`` or ``out != 3 * in``)."""
    name = (base_model or "").lower()
    hits = [frag for frag in NEOX_HEADS if frag in name]
    if not hits or in_features is None or out_features != 3 * in_features:
        return None
    hidden, heads = NEOX_HEADS[max(hits, key=len)]
    return heads if hidden == in_features and hidden % heads == 0 else None


def neox_rows(heads: int, head_dim: int) -> list[tuple[tuple[int, int], ...]]:
    """Row blocks of q, k and v in GPT-NeoX's fused output ``[heads, 3, head_dim]``: part ``i`` of head ``h``
    is rows ``h * 3 d + i * d .. h * 3 d + (i + 1) * d``."""
    return [tuple((h * 3 * head_dim + i * head_dim, h * 3 * head_dim + (i + 1) * head_dim) for h in range(heads))
            for i in range(3)]


def _layer_position(parts: list[str]) -> int | None:
    """Index in ``parts`` of the first ``<container>.<N>`` block index, or None."""
    for i in range(len(parts) - 1):
        if parts[i] in LAYER_CONTAINERS and parts[i + 1].isdigit():
            return i + 1
    return None


def _match_rule(tail: list[str]) -> str | None:
    for suffix, kind in _RULES:
        n = len(suffix)
        if len(tail) >= n and tuple(tail[-n:]) == suffix:
            return kind
    return None


def is_encoder_decoder_name(module_name: str) -> bool:
    """True when the name alone says the model has encoder and decoder stacks (T5, BART cross-attention)."""
    parts = module_name.split(".")
    return any(m in parts for m in _T5_MARKERS) or "encoder_attn" in parts


def _stack(parts: list[str], layer_pos: int | None, two_stacks: bool) -> str:
    if not two_stacks:
        return "model"
    head = parts[: layer_pos - 1] if layer_pos is not None else parts
    for seg in reversed(head):
        if seg in ("encoder", "decoder"):
            return seg
    return "model"


def module_key(
    module_name: str,
    *,
    out_features: int | None = None,
    in_features: int | None = None,
    two_stacks: bool | None = None,
    base_model: str | None = None,
) -> list[tuple[ModuleKey, tuple[int, int] | None]]:
    """Keys of one peft module: ``[(key, rows)]``, several parts for a split fused projection.

    ``rows`` is ``(start, stop)`` of the fused output rows a part holds, else None.
    ``out_features`` / ``in_features`` (``B.shape[0]`` / ``A.shape[1]``) enable the GPT-2 ``c_attn``
    and Phi-3 ``self_attn.qkv_proj`` splits (``out == 3 * in``); without them both stay fused
    ``qkv``. ``two_stacks`` says whether the adapter has encoder and decoder stacks (None: infer
    from this name alone). ``base_model`` lets GPT-BigCode ``c_attn`` and MiniMax / CodeGen
    ``qkv_proj`` (heads interleaved / multi-query) stay fused.
    """
    name = module_name.removeprefix(PEFT_PREFIX)
    parts = name.split(".")
    if two_stacks is None:
        two_stacks = is_encoder_decoder_name(name)
    if is_diffusion_name(name):  # a peft UNet / DiT adapter (diffusers module paths)
        return peft_diffusion_key(name, out_features=out_features, in_features=in_features)
    raw = [(ModuleKey("raw", -1, name), None)]
    pos = _layer_position(parts)
    if pos is None:
        if parts[-1] in EMBEDDING_NAMES:
            return [(ModuleKey(_stack(parts, None, two_stacks), -1, "embed"), None)]
        return raw
    tail = parts[pos + 1 :]
    # T5 ``block.N.layer.M.<...>``: the sub-layer index M is not a separate block.
    if len(tail) >= 2 and tail[0] == "layer" and tail[1].isdigit() and any(m in tail for m in _T5_MARKERS):
        tail = tail[2:]
    if any(seg.isdigit() for seg in tail):
        return raw  # an extra index (MoE experts, ...): no canonical place
    kind = _match_rule(tail)
    if kind is None:
        return raw
    layer = int(parts[pos])
    stack = _stack(parts, pos, two_stacks)
    if kind == "qkv" and tail[-2:] == ["attention", "query_key_value"]:  # GPT-NeoX: per-head q | k | v
        heads = neox_heads(base_model, in_features, out_features)
        if heads is not None:
            blocks = neox_rows(heads, in_features // heads)
            return [(ModuleKey(stack, layer, k), rows) for k, rows in zip(("q", "k", "v"), blocks, strict=True)]
    if kind in _SPLIT_THIRDS:
        if _split_refusal(kind, out_features, in_features, base_model) is not None:
            return [(ModuleKey(stack, layer, "qkv"), None)]
        third = out_features // 3
        return [(ModuleKey(stack, layer, k), (i * third, (i + 1) * third)) for i, k in enumerate(("q", "k", "v"))]
    return [(ModuleKey(stack, layer, kind), None)]


def _split_refusal(
    kind: str, out_features: int | None, in_features: int | None, base_model: str | None
) -> str | None:
    """Why a fused ``kind`` (``c_attn`` / ``qkv_proj``) is not split into thirds, or None when it is."""
    base = (base_model or "").lower()
    hit = next((b for b in _SPLIT_THIRDS[kind] if b in base), None)
    if hit is not None:
        return f"the base model {base_model!r} interleaves the heads of its fused projection"
    if out_features is None:
        return "its output size is unknown"
    if kind == "c_attn":  # GPT-2 checkpoints name no base: shapes decide (in_features optional)
        if out_features % 3 == 0 and (in_features is None or out_features == 3 * in_features):
            return None
    elif in_features is not None and out_features == 3 * in_features:
        return None
    return (f"its output ({out_features}) is not 3 x its input ({in_features}): grouped-query or multi-query "
            "attention, whose q / k / v sizes need head counts the adapter does not carry")


def fused_qkv_note(
    module_name: str,
    *,
    out_features: int | None = None,
    in_features: int | None = None,
    base_model: str | None = None,
) -> str | None:
    """A sentence saying why a splittable fused projection stays fused ``qkv``; None otherwise.

    Only for the kinds :func:`module_key` splits when it can (GPT-2 ``c_attn``, Phi-3
    ``self_attn.qkv_proj``); BLOOM-style ``query_key_value`` is always fused and gets no note.
    """
    name = module_name.removeprefix(PEFT_PREFIX)
    parts = name.split(".")
    pos = _layer_position(parts)
    if pos is None:
        return None
    kind = _match_rule(parts[pos + 1 :])
    if kind == "qkv" and parts[-2:] == ["attention", "query_key_value"]:
        if neox_heads(base_model, in_features, out_features) is not None:
            return None
        return (f"{name} kept fused as 'qkv' (not split into q / k / v): GPT-NeoX interleaves q / k / v per head, "
                f"and the head count of the base model {base_model!r} with hidden size {in_features} is not in "
                "geometry.io.naming.NEOX_HEADS")
    if kind not in _SPLIT_THIRDS:
        return None
    why = _split_refusal(kind, out_features, in_features, base_model)
    return None if why is None else f"{name} kept fused as 'qkv' (not split into q / k / v): {why}"


def has_two_stacks(module_names: list[str], task_type: str | None = None) -> bool:
    """Whether an adapter's modules live in an encoder and a decoder stack.

    True for ``SEQ_2_SEQ_LM`` adapters, T5 / BART cross-attention names, or when both an
    ``encoder`` and a ``decoder`` path segment occur before block indices.
    """
    if (task_type or "").upper() == "SEQ_2_SEQ_LM":
        return True
    seen: set[str] = set()
    for full in module_names:
        name = full.removeprefix(PEFT_PREFIX)
        if is_encoder_decoder_name(name):
            return True
        parts = name.split(".")
        pos = _layer_position(parts)
        head = parts[: pos - 1] if pos is not None else parts
        seen.update(seg for seg in head if seg in ("encoder", "decoder"))
    return seen == {"encoder", "decoder"}

