"""Naming of diffusion modules (UNet, DiT, text encoders): kohya / diffusers / peft paths ->
:class:`~geometry.types.ModuleKey`. Pure string work (no torch), used by :mod:`geometry.io.naming` for peft
UNet / DiT adapters and by :mod:`geometry.io.diffusion` for kohya / diffusers files.

Module keys (``ModuleKey(stack, layer, kind)``):

* ``stack``: ``unet``, ``transformer`` (Flux / SD3 DiT), ``text_encoder``, ``text_encoder_2``, ``text_encoder_3``.
* UNet ``layer`` orders the transformer blocks: ``100 * P + 10 * a + t`` with ``P`` the UNet block
  (``down_blocks.i`` -> ``i``, ``mid_block`` -> 4, ``up_blocks.j`` -> ``5 + j``; SD 1.x has 4 down blocks,
  SDXL 3: the gap keeps one numbering for both), ``a`` the attention (or resnet) index in that block
  and ``t`` the ``transformer_blocks`` index in that attention (SDXL has up to 10). E.g.
  ``up_blocks.1.attentions.2.transformer_blocks.0`` -> 620. Down / up samplers: ``100 * P + 90``.
  Modules outside the blocks (``conv_in``, ``time_embedding.linear_1``...): layer -1, kind their path.
* DiT ``layer``: ``transformer_blocks.N`` / ``double_blocks.N`` -> ``N``;
  ``single_transformer_blocks.N`` / ``single_blocks.N`` -> ``100 + N``.
* UNet kinds: ``to_q to_k to_v to_out`` (self-attention ``attn1``), ``cross_to_q ... cross_to_out``
  (``attn2``), ``ff_in`` / ``ff_out`` (``ff.net.0.proj`` / ``ff.net.2``), ``proj_in``, ``proj_out``,
  resnets ``res_conv1 res_conv2 res_time_emb res_shortcut``, ``downsample`` / ``upsample``.
* DiT kinds (diffusers names): ``to_q to_k to_v to_out``, ``add_q add_k add_v to_add_out`` (the text
  stream), ``ff_in ff_out ff_context_in ff_context_out``, ``norm1 norm1_context norm`` (modulation),
  ``proj_mlp proj_out``. BFL's fused ``img_attn.qkv`` (``(K H D)`` layout: q | k | v in contiguous
  thirds) is split exactly into ``to_q / to_k / to_v`` parts (``rows``), ``txt_attn.qkv`` into
  ``add_q / add_k / add_v``; ``single_blocks.N.linear1`` (q | k | v | mlp, ``out = 7 * in``) into
  ``to_q / to_k / to_v / proj_mlp``. ``img_attn.proj`` -> ``to_out``, ``img_mlp.0 / 2`` -> ``ff_in / ff_out``,
  ``img_mod.lin`` -> ``norm1``, ``linear2`` -> ``proj_out``, ``modulation.lin`` -> ``norm``.
* text encoders (CLIP ``text_model.encoder.layers.N.self_attn.q_proj``, T5): the transformer rules
  of :mod:`geometry.io.naming` (``q k v o fc_in fc_out``), with the text encoder as the stack.
* anything else in a block: its path after the block as the kind (kept, not unmapped).

Text-encoder paths are keyed by :func:`geometry.io.naming.module_key` (the caller does it: see
:func:`geometry.io.diffusion.module_keys`); :func:`diffusion_key` returns ``raw`` for them.
"""

from __future__ import annotations

from geometry.types import ModuleKey

#: Stacks of diffusion pipelines (diffusers' component names).
DIFFUSION_STACKS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                  "lora_te2_": "text_encoder_2", "lora_te3_": "text_encoder_3", "lora_transformer_": "transformer"}

#: Multi-word path segments of UNet / DiT / CLIP / T5 module names (to undo kohya's ``.`` -> ``_``).
_VOCAB = frozenset("""
down_blocks up_blocks mid_block transformer_blocks single_transformer_blocks to_q to_k to_v to_out
proj_in proj_out time_emb_proj conv_shortcut conv_in conv_out conv_norm_out time_embedding linear_1
linear_2 add_embedding text_model self_attn q_proj k_proj v_proj out_proj layer_norm1 layer_norm2
final_layer_norm double_blocks single_blocks img_attn txt_attn img_mlp txt_mlp img_mod txt_mod
add_q_proj add_k_proj add_v_proj to_add_out ff_context norm1_context proj_mlp token_embedding
position_embedding embed_tokens wi_0 wi_1 input_blocks output_blocks middle_block in_layers out_layers
emb_layers skip_connection time_text_embed context_embedder x_embedder norm_out time_embed label_emb
""".split())
_VOCAB_MAX = max(w.count("_") + 1 for w in _VOCAB)


def kohya_path(name: str) -> str | None:
    """A kohya module name -> ``<stack>.<dotted path>`` (``lora_unet_down_blocks_0_..._to_k`` ->
    ``unet.down_blocks.0....to_k``), or None when the prefix is not kohya's. Segments are rebuilt with a
    vocabulary of known multi-word names; an unknown one becomes several segments, which only affects
    its key (the stored name is kept for export)."""
    for prefix in sorted(KOHYA_PREFIXES, key=len, reverse=True):
        if name.startswith(prefix):
            stack, rest = KOHYA_PREFIXES[prefix], name[len(prefix):]
            break
    else:
        return None
    tokens = rest.split("_")
    segs: list[str] = []
    i = 0
    while i < len(tokens):
        for n in range(min(_VOCAB_MAX, len(tokens) - i), 1, -1):
            word = "_".join(tokens[i : i + n])
            if word in _VOCAB:
                segs.append(word)
                i += n
                break
        else:
            segs.append(tokens[i])
            i += 1
    if stack == "unet" and segs and segs[0] in ("double_blocks", "single_blocks"):
        stack = "transformer"
    return ".".join([stack, *segs])


def diffusers_path(module: str) -> str:
    """A diffusers factor stem -> its module path (``attn1.processor.to_k_lora`` -> ``attn1.to_k``;
    ``.lora`` / ``.lora_linear_layer`` dropped; ``to_out_lora`` -> ``to_out.0``)."""
    path = module.removesuffix(".lora").removesuffix(".lora_linear_layer")
    if path.endswith("_lora"):
        head, _, last = path.removesuffix("_lora").rpartition(".")
        head = head.removesuffix(".processor")
        path = f"{head}.{last}.0" if last == "to_out" else f"{head}.{last}"
    return path


_UNET_TAIL = {
    ("attn1", "to_q"): "to_q", ("attn1", "to_k"): "to_k", ("attn1", "to_v"): "to_v",
    ("attn1", "to_out", "0"): "to_out", ("attn1", "to_out"): "to_out",
    ("attn2", "to_q"): "cross_to_q", ("attn2", "to_k"): "cross_to_k", ("attn2", "to_v"): "cross_to_v",
    ("attn2", "to_out", "0"): "cross_to_out", ("attn2", "to_out"): "cross_to_out",
    ("ff", "net", "0", "proj"): "ff_in", ("ff", "net", "2"): "ff_out",
    ("proj_in",): "proj_in", ("proj_out",): "proj_out",
    ("conv1",): "res_conv1", ("conv2",): "res_conv2", ("time_emb_proj",): "res_time_emb",
    ("conv_shortcut",): "res_shortcut",
    # LDM resnet names (kohya SDXL)
    ("in_layers", "2"): "res_conv1", ("out_layers", "3"): "res_conv2", ("emb_layers", "1"): "res_time_emb",
    ("skip_connection",): "res_shortcut",
}
_DIT_TAIL = {
    ("attn", "to_q"): "to_q", ("attn", "to_k"): "to_k", ("attn", "to_v"): "to_v",
    ("attn", "to_out", "0"): "to_out", ("attn", "to_out"): "to_out",
    ("attn", "add_q_proj"): "add_q", ("attn", "add_k_proj"): "add_k", ("attn", "add_v_proj"): "add_v",
    ("attn", "to_add_out"): "to_add_out",
    ("ff", "net", "0", "proj"): "ff_in", ("ff", "net", "2"): "ff_out",
    ("ff_context", "net", "0", "proj"): "ff_context_in", ("ff_context", "net", "2"): "ff_context_out",
    ("norm1", "linear"): "norm1", ("norm1_context", "linear"): "norm1_context", ("norm", "linear"): "norm",
    ("proj_mlp",): "proj_mlp", ("proj_out",): "proj_out",
    # BFL Flux (kohya)
    ("img_attn", "proj"): "to_out", ("txt_attn", "proj"): "to_add_out",
    ("img_mlp", "0"): "ff_in", ("img_mlp", "2"): "ff_out",
    ("txt_mlp", "0"): "ff_context_in", ("txt_mlp", "2"): "ff_context_out",
    ("img_mod", "lin"): "norm1", ("txt_mod", "lin"): "norm1_context",
    ("linear2",): "proj_out", ("modulation", "lin"): "norm",
}
#: Fused DiT projections split exactly: (kinds, size of each part as a multiple of in_features).
_DIT_FUSED = {
    ("img_attn", "qkv"): (("to_q", "to_k", "to_v"), (1, 1, 1)),
    ("txt_attn", "qkv"): (("add_q", "add_k", "add_v"), (1, 1, 1)),
    ("linear1",): (("to_q", "to_k", "to_v", "proj_mlp"), (1, 1, 1, 4)),
}


def _ldm_block(segs: list[str]) -> tuple[int, int, list[str]] | None:
    """LDM ``input_blocks.i.j`` / ``middle_block.j`` / ``output_blocks.i.j`` -> ``(P, a, rest)`` in the
    diffusers numbering (``P`` as in the module docstring; ``a`` the attention / resnet index, 9 for a
    sampler), or None."""
    if len(segs) < 3 or not segs[1].isdecimal():
        return None
    if segs[0] == "middle_block":
        j = int(segs[1])
        return 4, (0 if j < 2 else 1), segs[2:]
    if not (segs[1].isdecimal() and segs[2].isdecimal()):
        return None
    i, j = int(segs[1]), int(segs[2])
    if segs[0] == "input_blocks":
        if i == 0:
            return None
        if i % 3 == 0:  # input_blocks.3/6/9.0.op: the downsampler of the previous level
            return i // 3 - 1, 9, ["downsample", *segs[3:]]
        return (i - 1) // 3, (i - 1) % 3, segs[3:]
    if segs[0] == "output_blocks":
        up, a = divmod(i, 3)
        if j == 2 or (j == 1 and segs[3:4] == ["conv"]):
            return 5 + up, 9, ["upsample", *segs[3:]]
        return 5 + up, a, segs[3:]
    return None


def diffusion_key(path: str, *, out_features: int | None = None,
                  in_features: int | None = None) -> list[tuple[ModuleKey, tuple[int, int] | None]]:
    """Keys of one diffusion module ``<stack>.<path>`` (see the module docstring): ``[(key, rows)]``,
    several parts for a fused Flux projection that splits exactly."""
    segs = path.split(".")
    stack, rest = segs[0], segs[1:]
    raw = [(ModuleKey("raw", -1, path), None)]
    if stack not in DIFFUSION_STACKS or not rest:
        return raw
    if stack.startswith("text_encoder"):  # keyed by geometry.io.naming.module_key (see the module docstring)
        return raw
    head = rest[0]
    if head in ("transformer_blocks", "double_blocks", "single_transformer_blocks", "single_blocks") \
            and len(rest) > 2 and rest[1].isdecimal():
        stack = "transformer" if stack == "unet" else stack
        layer = int(rest[1]) + (100 if head.startswith("single") else 0)
        tail = tuple(rest[2:])
        if tail in _DIT_FUSED:
            kinds, mult = _DIT_FUSED[tail]
            if in_features and out_features == sum(mult) * in_features:
                out, lo = [], 0
                for kind, k in zip(kinds, mult, strict=True):
                    out.append((ModuleKey(stack, layer, kind), (lo, lo + k * in_features)))
                    lo += k * in_features
                return out
            return [(ModuleKey(stack, layer, ".".join(tail)), None)]
        return [(ModuleKey(stack, layer, _DIT_TAIL.get(tail, ".".join(tail))), None)]
    if head in ("down_blocks", "up_blocks") and len(rest) > 3 and rest[1].isdecimal():
        block = int(rest[1]) + (5 if head == "up_blocks" else 0)
        rest2 = rest[2:]
    elif head == "mid_block" and len(rest) > 2:
        block, rest2 = 4, rest[1:]
    elif head in ("input_blocks", "middle_block", "output_blocks"):
        ldm = _ldm_block(rest)
        if ldm is None:
            return [(ModuleKey(stack, -1, ".".join(rest)), None)]
        block, a, tail = ldm
        if a == 9:
            return [(ModuleKey(stack, 100 * block + 90, tail[0]), None)]
        return _unet_tail(stack, 100 * block + 10 * a, tail)
    else:  # conv_in, time_embedding..., outside the blocks
        return [(ModuleKey(stack, -1, ".".join(rest)), None)]
    if len(rest2) >= 2 and rest2[0] in ("downsamplers", "upsamplers") and rest2[1].isdecimal():
        kind = "downsample" if rest2[0] == "downsamplers" else "upsample"
        return [(ModuleKey(stack, 100 * block + 90, kind), None)]
    if len(rest2) >= 3 and rest2[0] in ("attentions", "resnets") and rest2[1].isdecimal():
        return _unet_tail(stack, 100 * block + 10 * int(rest2[1]), rest2[2:])
    return [(ModuleKey(stack, 100 * block, ".".join(rest2)), None)]


def _unet_tail(stack: str, layer: int, tail: list[str]) -> list[tuple[ModuleKey, None]]:
    if len(tail) > 2 and tail[0] == "transformer_blocks" and tail[1].isdecimal():
        layer += int(tail[1])
        tail = tail[2:]
    return [(ModuleKey(stack, layer, _UNET_TAIL.get(tuple(tail), ".".join(tail))), None)]


def is_diffusion_name(module_name: str) -> bool:
    """Whether a peft module path is a diffusers UNet / DiT one (``down_blocks.0....``,
    ``transformer_blocks.3.attn.to_q``...), to be named with :func:`diffusion_key`."""
    head = module_name.split(".", 1)[0]
    return head in ("down_blocks", "up_blocks", "mid_block", "single_transformer_blocks", "conv_in",
                    "time_embedding") or (head == "transformer_blocks" and ".attn." in module_name)


def peft_diffusion_key(module_name: str, **shapes) -> list[tuple[ModuleKey, tuple[int, int] | None]]:
    """:func:`diffusion_key` of a peft UNet / DiT adapter's module (its paths have no stack prefix)."""
    stack = "transformer" if module_name.startswith(("transformer_blocks", "single_transformer_blocks")) else "unet"
    return diffusion_key(f"{stack}.{module_name}", **shapes)
