"""Diffusion LoRAs: reading kohya and diffusers weight files (no ``adapter_config.json``), and the state dict
a merge of them is written back as (:func:`diffusion_weights`).

Formats read (detected by their key patterns when a folder, zip or upload has no
``adapter_config.json``: ``pytorch_lora_weights.safetensors`` or one ``*.safetensors`` file):

* **kohya** (sd-scripts, most files on model sharing sites): ``lora_unet_<path>.lora_down.weight``
  ``(r, in)``, ``.lora_up.weight`` ``(out, r)`` and an optional scalar ``.alpha`` per module
  (scale ``alpha / r``; no alpha: ``alpha = r``, scale 1). Text encoders: ``lora_te_`` (SD 1.x / 2.x),
  ``lora_te1_`` / ``lora_te2_`` (SDXL's two CLIPs; ``lora_te3_`` is read as ``text_encoder_3``, the T5
  of kohya's Flux scripts; ``lora_transformer_`` is a DiT in diffusers names). The UNet path is
  diffusers' (``down_blocks_0_attentions_0_...``, SD 1.x), the original LDM one (``input_blocks_4_1_transformer_blocks_0_attn1_to_q``, kohya's SDXL; converted to
  the diffusers block positions below), or BFL's Flux one (``double_blocks_N_img_attn_qkv``,
  ``single_blocks_N_linear1``).
* **diffusers**: keys start with ``unet.`` / ``text_encoder.`` / ``text_encoder_2.`` / ``transformer.``;
  factors ``<module>.lora_A.weight`` / ``lora_B.weight`` (peft-backed diffusers),
  ``<module>.lora.down.weight`` / ``.lora.up.weight``, ``<module>.lora_linear_layer.down/up.weight``
  or the older attention processors ``<attn>.processor.to_k_lora.down.weight``; an optional
  ``<module>.alpha`` (absent: scale 1).

``lora_down`` / ``down`` is ``A`` ``(r, in)`` and ``lora_up`` / ``up`` is ``B`` ``(out, r)``.
Convolution LoRAs (kohya LoCon, 4-D factors): ``A (r, in, kh, kw)`` is flattened to
``(r, in * kh * kw)`` and ``B (out, r, 1, 1)`` to ``(out, r)``, so ``tau = s * B @ A`` is the conv
weight's update flattened as ``(out, in * kh * kw)`` (exactly how kohya merges it); geometry treats
it as that matrix. The kernel size is kept in ``AdapterConfig.raw["conv_kernels"]`` so an export
writes the 4-D shapes back. Tucker-decomposed convs (``lora_mid``), LyCORIS LoHa / LoKr keys
(``hada_*``, ``lokr_*``) and kohya DoRA (``dora_scale``) in these files are refused with one line.

Module keys: :mod:`geometry.io.diffusion_naming` (stack ``unet`` / ``transformer`` / ``text_encoder*``,
the block position as the layer, ``to_q`` / ``to_k`` / ``ff_in``... as the kind).

Only the weights are read; no diffusion model is run (evaluating a diffusion LoRA needs one).
"""

from __future__ import annotations

import json
import re
from pathlib import PurePosixPath

import torch

from geometry.errors import AdapterLoadError
from geometry.io.diffusion_naming import (
    DIFFUSION_STACKS,
    KOHYA_PREFIXES,
    diffusers_path,
    diffusion_key,
    kohya_path,
)
from geometry.io.factors import _check_factor, _check_finite, _place
from geometry.io.naming import module_key
from geometry.io.weights import _read_weights, content_hash
from geometry.types import Adapter, AdapterConfig, LoraModule, ModuleKey

#: The weights file name diffusers' ``save_lora_weights`` writes.
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
#: Formats (``AdapterConfig.format``).
FORMATS = ("peft", "diffusers", "kohya")

_KOHYA_RE = re.compile(r"^(?P<mod>lora_(?:unet|te[123]?|transformer)_[A-Za-z0-9_]+)\.(?P<what>.+)$")
# diffusers factor suffixes: (regex on the key, slot, suffix written back)
_DIFFUSERS_FACTOR = re.compile(
    r"^(?P<mod>.+?)(?P<suf>\.lora_A\.weight|\.lora_B\.weight|\.lora\.down\.weight|\.lora\.up\.weight"
    r"|\.lora_linear_layer\.down\.weight|\.lora_linear_layer\.up\.weight|_lora\.down\.weight|_lora\.up\.weight)$")
_A_SUFFIXES = (".lora_A.weight", ".lora.down.weight", ".lora_linear_layer.down.weight", "_lora.down.weight")
_KOHYA_REFUSED = {
    "lora_mid.weight": "a Tucker-decomposed conv LoRA (lora_mid)",
    "dora_scale": "a kohya DoRA module (dora_scale)",
}

# ---------------------------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------------------------


def detect_format(keys) -> str | None:
    """``"kohya"``, ``"diffusers"`` or None (not a diffusion LoRA) from a weights file's tensor names."""
    keys = [k for k in keys if k != "__metadata__"]
    if not keys:
        return None
    if any(k.startswith(tuple(KOHYA_PREFIXES)) for k in keys):
        return "kohya"
    if any(k.split(".", 1)[0] in DIFFUSION_STACKS and _DIFFUSERS_FACTOR.match(k) for k in keys):
        return "diffusers"
    return None


def safetensors_keys(data: bytes) -> list[str] | None:
    """Tensor names of a safetensors file from its header alone, or None when it is not one."""
    if len(data) < 10:
        return None
    n = int.from_bytes(data[:8], "little")
    if n <= 0 or n > min(len(data) - 8, 100_000_000) or data[8:9] != b"{":
        return None
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return [str(k) for k in header if k != "__metadata__"] if isinstance(header, dict) else None


def looks_like_diffusion_lora(data: bytes) -> str | None:
    """The format of a safetensors file holding a kohya / diffusers LoRA, or None."""
    keys = safetensors_keys(data)
    return detect_format(keys) if keys else None


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def build_diffusion_adapter(weights: bytes, name: str, source: str = "", label: str = "") -> Adapter:
    """An :class:`Adapter` from a kohya / diffusers ``.safetensors`` file's bytes (no config)."""
    label = label or source or "weights"
    keys = safetensors_keys(weights)
    fmt = detect_format(keys or [])
    if fmt is None:
        raise AdapterLoadError(
            f"{label}: no adapter_config.json, and the file holds no kohya (lora_unet_* / lora_te_*) or diffusers "
            "(unet.* / text_encoder.* / transformer.* with lora_A / lora.down) LoRA tensors")
    state = _read_weights(label, weights, is_bin=False)
    slots: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    alphas: dict[str, tuple[str, torch.Tensor]] = {}
    others: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        _check_finite(label, key, t)
        if fmt == "kohya":
            m = _KOHYA_RE.match(key)
            if m is None:
                others[key] = t
                continue
            mod, what = m.group("mod"), m.group("what")
            if what in _KOHYA_REFUSED or what.startswith(("hada_", "lokr_")):
                why = _KOHYA_REFUSED.get(what, "a LyCORIS LoHa / LoKr module (hada_* / lokr_*)")
                raise AdapterLoadError(
                    f"{label}: tensor {key} belongs to {why}, which Adapter Atlas does not read in kohya files "
                    "(supported there: lora_down / lora_up / alpha)")
            if what == "alpha":
                alphas[mod] = (key, t)
            elif what in ("lora_down.weight", "lora_up.weight"):
                slot = slots.setdefault(mod, {})
                slot["A" if what == "lora_down.weight" else "B"] = (key, t)
            else:
                others[key] = t
            continue
        m = _DIFFUSERS_FACTOR.match(key)
        if m:
            ab = "A" if m.group("suf") in _A_SUFFIXES else "B"
            suf = m.group("suf")  # the stem keeps ".lora" / ".lora_linear_layer" / "_lora": an export writes it back
            mod = m.group("mod") + (suf.rsplit(".", 2)[0] if suf.endswith((".down.weight", ".up.weight")) else "")
            slot = slots.setdefault(mod, {})
            if ab in slot:
                raise AdapterLoadError(f"{label}: module {mod} has two {ab} factors ({slot[ab][0]}, {key})")
            slot[ab] = (key, t)
        elif key.endswith(".alpha"):
            alphas[key.removesuffix(".alpha")] = (key, t)
        else:
            others[key] = t
    if not slots:
        raise AdapterLoadError(f"{label}: no LoRA factors (lora_down / lora_up) in this {fmt} file")
    entries: list[tuple[str, ModuleKey, LoraModule]] = []
    kernels: dict[str, list[int]] = {}
    ranks: dict[int, int] = {}
    for mod in sorted(slots):
        slot = slots[mod]
        down, up = ("lora_down", "lora_up") if fmt == "kohya" else ("down / lora_A", "up / lora_B")
        for ab, word in (("A", down), ("B", up)):
            if ab not in slot:
                present = next(iter(slot.values()))[0]
                raise AdapterLoadError(f"{label}: module {mod} has {present} but no {word} tensor")
        (a_key, A), (b_key, B) = slot["A"], slot["B"]
        _check_factor(label, a_key, A, f"{down} (r, in_features)")
        _check_factor(label, b_key, B, f"{up} (out_features, r)")
        A, B, kernel = _matrices(label, mod, a_key, _float32(A), b_key, _float32(B))
        if kernel is not None:
            kernels[mod] = kernel
        r = int(A.shape[0])
        alpha = float(r)
        akey = _alpha_key(mod, alphas, fmt)
        if akey is not None:
            tkey, t = alphas.pop(akey)
            if t.numel() != 1 or not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64, torch.int16)):
                raise AdapterLoadError(
                    f"{label}: tensor {tkey} has shape {tuple(t.shape)} and dtype {t.dtype}, expected one number "
                    "(the module's alpha; scale = alpha / rank)")
            alpha = float(t.reshape(()).double())
            if alpha <= 0:
                raise AdapterLoadError(f"{label}: tensor {tkey} is {alpha:g}, expected a positive alpha")
        ranks[r] = ranks.get(r, 0) + 1
        path = kohya_path(mod) if fmt == "kohya" else diffusers_path(mod)
        parts = module_keys(path, out_features=int(B.shape[0]), in_features=int(A.shape[1]))
        for key, rows in parts:
            entries.append((mod, key, LoraModule(
                name=mod, key=key, A=A, B=B if rows is None else B[rows[0] : rows[1]], r=r, alpha=alpha,
                scale=alpha / r, rows=rows)))
    for tkey, t in alphas.values():
        others[tkey] = t
    r = max(ranks, key=lambda k: (ranks[k], k))
    raw = {"peft_type": "LORA", "format": fmt, "r": r, "lora_alpha": float(r), "conv_kernels": kernels,
           "target_modules": sorted(slots)}
    config = AdapterConfig(r=r, lora_alpha=float(r), target_modules=sorted(slots), raw=raw)
    config.format = fmt
    adapter = Adapter(name=name, config=config, modules={}, source=source,
                      content_hash=content_hash(raw, weights))
    adapter.other_tensors.update(others)
    if others:
        adapter.warnings.append(f"{len(others)} tensor(s) that are not LoRA factors kept in other_tensors: "
                                f"{', '.join(sorted(others)[:3])}")
    if kernels:
        adapter.warnings.append(f"{len(kernels)} convolution module(s): factors flattened to (r, in * kh * kw), "
                                "tau read as the (out, in * kh * kw) matrix of the conv update")
    _place(adapter, entries)
    return adapter


def module_keys(path: str, *, out_features: int, in_features: int) -> list[tuple[ModuleKey, tuple | None]]:
    """Keys of a module ``<stack>.<path>``: text encoders by :func:`geometry.io.naming.module_key` (CLIP / T5
    rules, the encoder as the stack), the rest by :func:`geometry.io.diffusion_naming.diffusion_key`."""
    stack, _, rest = path.partition(".")
    if not stack.startswith("text_encoder") or not rest:
        return diffusion_key(path, out_features=out_features, in_features=in_features)
    keys = module_key(rest, out_features=out_features, in_features=in_features, two_stacks=False)
    return [(ModuleKey("raw", -1, path) if k.stack == "raw" else ModuleKey(stack, k.layer, k.kind), rows)
            for k, rows in keys]


def _float32(t: torch.Tensor) -> torch.Tensor:
    """float16 / bfloat16 factors (most diffusion LoRAs) in float32: no computation runs in half."""
    return t.to(torch.float32) if t.dtype in (torch.float16, torch.bfloat16) else t


def _alpha_key(mod: str, alphas: dict, fmt: str) -> str | None:
    if mod in alphas:
        return mod
    if fmt == "diffusers":
        path = diffusers_path(mod)
        for cand in (path, path.removesuffix(".0")):
            if cand in alphas:
                return cand
    return None


def _matrices(label, mod, a_key, A, b_key, B):
    """2-D ``(A, B)`` and the conv kernel ``[kh, kw]`` (None for a linear module)."""
    kernel = None
    if A.dim() == 4:
        if B.dim() != 4 or tuple(B.shape[2:]) != (1, 1):
            raise AdapterLoadError(
                f"{label}: module {mod}: {a_key} is a conv factor {tuple(A.shape)} but {b_key} has shape "
                f"{tuple(B.shape)}, expected (out, r, 1, 1)")
        kernel = [int(A.shape[2]), int(A.shape[3])]
        A, B = A.reshape(A.shape[0], -1), B.reshape(B.shape[0], B.shape[1])
    if A.dim() != 2:
        raise AdapterLoadError(f"{label}: tensor {a_key} has shape {tuple(A.shape)}, expected 2-D (r, in) or 4-D conv")
    if B.dim() != 2:
        raise AdapterLoadError(f"{label}: tensor {b_key} has shape {tuple(B.shape)}, expected 2-D (out, r)")
    if A.shape[0] != B.shape[1]:
        raise AdapterLoadError(
            f"{label}: module {mod}: {a_key} has rank {A.shape[0]} (shape {tuple(A.shape)}) but {b_key} has rank "
            f"{B.shape[1]} (shape {tuple(B.shape)}); expected down (r, in) and up (out, r) with the same r")
    return A, B, kernel


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


def diffusion_weights(updates: dict[str, tuple[torch.Tensor, torch.Tensor]], fmt: str,
                      kernels: dict[str, list[int]] | None = None) -> dict[str, torch.Tensor]:
    """``{module name: (B, A)}`` (scale 1) as a ``fmt`` state dict with the names the inputs had.

    kohya: ``<name>.lora_down.weight``, ``.lora_up.weight`` and ``.alpha = r`` (scale 1); diffusers: the
    factor suffix each input name implies (``.lora_A.weight`` / ``.lora.down.weight`` / ``_lora.down.weight``
    ...), no alpha (scale 1). Conv modules get their 4-D shapes back from ``kernels``.
    """
    out: dict[str, torch.Tensor] = {}
    kernels = kernels or {}
    for name, (B, A) in sorted(updates.items()):
        B = B.detach().to("cpu", torch.float32).contiguous()
        A = A.detach().to("cpu", torch.float32).contiguous()
        if name in kernels:
            kh, kw = kernels[name]
            A = A.reshape(A.shape[0], -1, kh, kw).contiguous()
            B = B.reshape(B.shape[0], B.shape[1], 1, 1).contiguous()
        if fmt == "kohya":
            out[f"{name}.lora_down.weight"] = A
            out[f"{name}.lora_up.weight"] = B
            out[f"{name}.alpha"] = torch.tensor(float(A.shape[0]))
        elif name.endswith(("_lora", ".lora", ".lora_linear_layer")):
            out[f"{name}.down.weight"] = A
            out[f"{name}.up.weight"] = B
        else:
            out[f"{name}.lora_A.weight"] = A
            out[f"{name}.lora_B.weight"] = B
    return out


def pick_weights(names: list[str], where: str) -> str | None:
    """The weights file of a config-less folder / zip: ``pytorch_lora_weights.safetensors``, else the one
    ``*.safetensors`` at the least nested level (None when there is none; several: refused)."""
    found = [n for n in names if n.lower().endswith(".safetensors") and not n.startswith("__MACOSX/")]
    if not found:
        return None
    depth = min(len(PurePosixPath(n).parts) for n in found)
    top = sorted(n for n in found if len(PurePosixPath(n).parts) == depth)
    named = [n for n in top if PurePosixPath(n).name == DIFFUSERS_WEIGHT_NAME]
    if named:
        return named[0]
    if len(top) > 1:
        raise AdapterLoadError(
            f"{where}: no adapter_config.json and several .safetensors files ({', '.join(map(repr, top[:5]))}); "
            "give one kohya / diffusers LoRA file")
    return top[0]
