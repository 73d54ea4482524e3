"""From a state dict to LoRA modules: factor keys matched, shapes, ranks and finiteness validated, fused
projections split, legacy merged-LoRA layouts read, every module keyed (:mod:`geometry.io.naming`)."""

from __future__ import annotations

import json
import re

import torch

from geometry.errors import AdapterLoadError
from geometry.io.config import PEFT_PREFIX, adalora_masks, parse_config, rank_and_alpha
from geometry.io.limits import NORMAL
from geometry.io.lycoris import LYCORIS_TYPES, lycoris_entries
from geometry.io.naming import fused_qkv_note, has_two_stacks, module_key
from geometry.io.weights import _read_weights, content_hash
from geometry.types import Adapter, AdapterConfig, LoraModule, ModuleKey, lora_scale, row_index, row_label

CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
#: The normal zip limits (the defaults come from :func:`geometry.io.limits.limits` at each call).
MAX_ZIP_BYTES = NORMAL.max_zip_bytes
MAX_ZIP_MEMBERS = NORMAL.max_zip_members
#: Largest ``adapter_config.json`` read (real ones are a few KB; a huge MoE target list ~1 MB).
MAX_CONFIG_BYTES = 16 * 1024**2
#: Most rank_pattern / alpha_pattern regex matches (keys x modules) one adapter may cost.
MAX_PATTERN_MATCHES = 10_000_000
#: Floating dtypes accepted for LoRA factors and DoRA magnitudes.
FACTOR_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: Longest legacy ``enable_lora`` list (peft 0.2 used 3: q, k, v).
MAX_ENABLE_LORA = 8

FACTOR_RE = re.compile(r"^(?P<mod>.+)\.lora_(?P<ab>A|B)(?:\.(?P<ad>[^.]+))?\.weight$")
EMBED_RE = re.compile(r"^(?P<mod>.+)\.lora_embedding_(?P<ab>A|B)(?:\.(?P<ad>[^.]+))?$")
#: AdaLoRA (peft_type ADALORA): ``<module>.lora_A`` (r, in), ``lora_B`` (out, r), ``lora_E`` (r, 1), no ``.weight``.
ADALORA_RE = re.compile(r"^(?P<mod>.+)\.lora_(?P<ab>A|B|E)(?:\.(?P<ad>[^.]+))?$")
#: Half-precision factor dtypes: converted to float32 at load, so that no computation runs in half.
HALF_DTYPES = (torch.float16, torch.bfloat16)
MAGNITUDE_RE = re.compile(r"^(?P<mod>.+)\.lora_magnitude_vector(?:\.(?P<ad>[^.]+))?(?:\.weight)?$")
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

def build_adapter(
    files: dict[str, bytes],
    name: str,
    source: str = "",
    file_labels: dict[str, str] | None = None,
) -> Adapter:
    """Build an :class:`Adapter` from ``{"adapter_config.json": bytes, "adapter_model.<ext>": bytes}``."""
    labels = {k: (file_labels or {}).get(k) or (f"{source}/{k}" if source else k) for k in files}
    where = source or "adapter"
    if CONFIG_NAME not in files:
        raise AdapterLoadError(f"{where}: no {CONFIG_NAME}")
    wname = next((k for k in WEIGHT_NAMES if k in files), None)
    if wname is None:
        raise AdapterLoadError(f"{where}: no weights file ({' or '.join(WEIGHT_NAMES)})")
    cfg_label = labels[CONFIG_NAME]
    if len(files[CONFIG_NAME]) > MAX_CONFIG_BYTES:
        raise AdapterLoadError(
            f"{cfg_label}: {len(files[CONFIG_NAME])} bytes, more than the {MAX_CONFIG_BYTES} bytes a LoRA config can need")
    try:
        raw = json.loads(bytes(files[CONFIG_NAME]).decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise AdapterLoadError(f"{cfg_label}: invalid JSON (not UTF-8 text: {exc.reason} at byte {exc.start})") from exc
    except RecursionError as exc:
        raise AdapterLoadError(f"{cfg_label}: invalid JSON (nested too deeply)") from exc
    except ValueError as exc:  # JSONDecodeError, or an integer of more than 4300 digits
        raise AdapterLoadError(f"{cfg_label}: invalid JSON ({exc})") from exc
    config = parse_config(raw, source=cfg_label)
    weights = bytes(files[wname])
    state = _read_weights(labels[wname], weights, is_bin=wname.endswith(".bin"))
    try:
        digest = content_hash(raw, weights)
    except (ValueError, RecursionError) as exc:
        raise AdapterLoadError(f"{cfg_label}: the config cannot be hashed ({exc})") from exc
    adapter = Adapter(name=name, config=config, modules={}, source=source, content_hash=digest)
    if config.peft_type in LYCORIS_TYPES:  # dense update -> exact SVD factors (geometry.io.lycoris)
        _place(adapter, lycoris_entries(adapter, state, labels[wname], cfg_label))
        return adapter
    fill_modules(adapter, state, labels[wname], cfg_label)
    return adapter


def _check_finite(label: str, key: str, t: torch.Tensor) -> None:
    if t.is_quantized or not (t.is_floating_point() or t.is_complex()):
        return
    if t.dtype not in FACTOR_DTYPES and not t.is_complex():
        t = t.to(torch.float32)  # float8 and other small floats: isfinite is not implemented for them
    if not bool(torch.isfinite(t).all()):
        raise AdapterLoadError(f"{label}: tensor {key} contains NaN or Inf values")


def _check_factor(label: str, key: str, t: torch.Tensor, expected: str) -> None:
    """A LoRA factor (or DoRA magnitude): floating point, ``expected`` names its axes."""
    if t.dtype not in FACTOR_DTYPES:
        raise AdapterLoadError(
            f"{label}: tensor {key} has dtype {t.dtype}, expected a floating-point {expected} "
            "(float16, bfloat16, float32 or float64)")
    if t.numel() == 0:
        raise AdapterLoadError(
            f"{label}: tensor {key} has shape {tuple(t.shape)}, an empty factor; expected {expected} with every "
            "size >= 1 (rank 0?)")


def _float(t: torch.Tensor) -> torch.Tensor:
    """A factor in float32 when stored in float16 / bfloat16 (every computation then runs in float32 or
    float64, never in half); float32 / float64 factors are kept as they are."""
    return t.to(torch.float32) if t.dtype in HALF_DTYPES else t


def fill_modules(adapter: Adapter, state: dict[str, torch.Tensor], label: str, cfg_label: str = CONFIG_NAME) -> None:
    """Sort ``state`` into LoRA modules and other tensors; validate; key every module."""
    config = adapter.config
    factors: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    embed: set[str] = set()
    magnitudes: dict[str, tuple[str, torch.Tensor]] = {}
    adapter_names: set[str] = set()
    for key, tensor in state.items():
        _check_finite(label, key, tensor)
        short = key.removeprefix(PEFT_PREFIX)
        m = FACTOR_RE.match(short) or EMBED_RE.match(short)
        if m is None and config.peft_type == "ADALORA":
            m = ADALORA_RE.match(short)
        if m:
            mod = m.group("mod")
            slot = factors.setdefault(mod, {})
            if m.group("ab") in slot:
                raise AdapterLoadError(f"{label}: module {mod} has two lora_{m.group('ab')} tensors ({slot[m.group('ab')][0]}, {key})")
            slot[m.group("ab")] = (key, tensor)
            if "lora_embedding_" in short:
                embed.add(mod)
            if m.group("ad"):
                adapter_names.add(m.group("ad"))
            continue
        m = MAGNITUDE_RE.match(short)
        if m:
            magnitudes[m.group("mod")] = (key, tensor)
            continue
        if short.endswith(".lora_B.bias"):
            adapter.warnings.append(f"{key}: LoRA bias (lora_bias=True) kept in other_tensors; tau covers the weight only")
        adapter.other_tensors[key] = tensor
    if len(adapter_names) > 1:
        raise AdapterLoadError(f"{label}: tensors of several adapters ({', '.join(sorted(adapter_names))}); save one adapter per file")
    if not factors:
        raise AdapterLoadError(f"{label}: no LoRA tensors (*.lora_A.weight / *.lora_B.weight) in the weights file")
    masks = adalora_masks(config, cfg_label) if config.peft_type == "ADALORA" else {}
    pruned: list[str] = []

    n_keys = len(config.rank_pattern) + len(config.alpha_pattern)
    if n_keys * len(factors) > MAX_PATTERN_MATCHES:
        raise AdapterLoadError(
            f"{cfg_label}: rank_pattern / alpha_pattern have {n_keys} keys for {len(factors)} modules, more than "
            f"{MAX_PATTERN_MATCHES} regex matches to run; give fewer keys")
    two_stacks = has_two_stacks(list(factors), config.task_type)
    entries: list[tuple[str, ModuleKey, LoraModule]] = []
    fused_notes: list[str] = []
    for mod in sorted(factors):
        slot = factors[mod]
        for ab in ("A", "B"):
            if ab not in slot:
                present = next(v[0] for v in slot.values())
                raise AdapterLoadError(f"{label}: module {mod} has {present} but no lora_{ab} tensor")
        (a_key, A), (b_key, B) = slot["A"], slot["B"]
        if config.peft_type == "ADALORA":
            found = _adalora_factors(label, mod, slot, config, masks.get(mod))
            if found is None:
                pruned.append(mod)
                continue
            A, B, r, alpha, scale = found
        else:
            _check_factor(label, a_key, A, "lora_A (r, in_features)")
            _check_factor(label, b_key, B, "lora_B (out_features, r)")
            A, B = _float(A), _float(B)
            r, alpha = rank_and_alpha(config, mod, source=cfg_label)
            scale = lora_scale(r, alpha, config.use_rslora)
        legacy = config.raw.get("enable_lora")
        if B.dim() == 3 and isinstance(legacy, list) and any(legacy):
            if not any("legacy peft" in w for w in adapter.warnings):
                adapter.warnings.append(
                    f"legacy peft<=0.2 merged-LoRA format (enable_lora={legacy}): grouped Conv1d B converted exactly "
                    "to (B, A) factors; a fused module keeps rank sum(enable_lora) * r")
            entries.extend(_legacy_parts(label, mod, a_key, A, b_key, B, config, legacy, r, alpha, scale, two_stacks))
            continue
        _validate_pair(label, mod, a_key, A, b_key, B, r, r_given=config.raw.get("r") is not None or r != config.r)
        is_emb = mod in embed
        parts = (
            [(ModuleKey(_embedding_stack(mod, two_stacks), -1, "embed"), None)]
            if is_emb
            else module_key(mod, out_features=B.shape[0], in_features=A.shape[1], two_stacks=two_stacks,
                            base_model=config.base_model_name_or_path)
        )
        if len(parts) == 1 and parts[0][0].kind == "qkv":
            note = fused_qkv_note(mod, out_features=B.shape[0], in_features=A.shape[1],
                                  base_model=config.base_model_name_or_path)
            if note:
                fused_notes.append(note)
        magnitude = None
        if mod in magnitudes:
            mkey, magnitude = magnitudes.pop(mod)
            _check_factor(label, mkey, magnitude, f"DoRA magnitude ({B.shape[0]},)")
            magnitude = _float(magnitude)
            if magnitude.dim() != 1 or magnitude.shape[0] != B.shape[0]:
                raise AdapterLoadError(
                    f"{label}: tensor {mkey} has shape {tuple(magnitude.shape)}, expected ({B.shape[0]},) (one per output row)")
        for key, rows in parts:
            b_part = B if rows is None else B[row_index(rows)]
            mag_part = magnitude if magnitude is None or rows is None else magnitude[row_index(rows)]
            entries.append((mod, key, LoraModule(
                name=mod, key=key, A=A, B=b_part, r=r, alpha=alpha, scale=scale,
                fan_in_fan_out=config.fan_in_fan_out, magnitude=mag_part, is_embedding=is_emb, rows=rows,
            )))
    for mod, (mkey, _) in magnitudes.items():
        raise AdapterLoadError(f"{label}: tensor {mkey} (DoRA magnitude) has no lora_A / lora_B for module {mod}")
    if pruned and not entries:
        raise AdapterLoadError(f"{label}: every AdaLoRA module is pruned to rank 0 (rank_pattern keeps no component, "
                               "or lora_E is all zero): the adapter changes nothing")
    if pruned:
        adapter.warnings.append(
            f"{len(pruned)} AdaLoRA module(s) pruned to rank 0 (no update, left out): {', '.join(pruned[:5])}")
    if fused_notes:
        more = f" (and {len(fused_notes) - 1} more such module(s))" if len(fused_notes) > 1 else ""
        adapter.warnings.append(fused_notes[0] + more)
    _place(adapter, entries)


def _adalora_factors(label: str, mod: str, slot: dict, config: AdapterConfig, mask: list[bool] | None):
    """AdaLoRA ``scaling * B @ (A * E) / (ranknum + 1e-5)`` as LoRA factors ``(A', B, r, alpha, scale)``
    with ``A' = diag(E) A`` (components with ``E = 0``, i.e. masked by the rank allocator, left out), or
    ``None`` for a module pruned to rank 0.

    peft (``AdaLoraLayer.update_layer``, ``AdaLoraModel.resize_modules_by_rank_pattern``): ``ranknum`` is
    ``init_r`` for every module; ``scaling = lora_alpha``, or the module's rank when ``lora_alpha <= 0``
    (``init_r``, or ``sum(mask)`` for a module resized by ``rank_pattern``).
    """
    for ab, what in (("A", "lora_A (r, in_features)"), ("B", "lora_B (out_features, r)"), ("E", "lora_E (r, 1)")):
        if ab not in slot:
            raise AdapterLoadError(f"{label}: AdaLoRA module {mod} has no {what} tensor")
    (a_key, A), (b_key, B), (e_key, E) = slot["A"], slot["B"], slot["E"]
    for key, t, what in ((a_key, A, "lora_A (r, in_features)"), (b_key, B, "lora_B (out_features, r)"),
                         (e_key, E, "lora_E (r, 1)")):
        if t.dtype not in FACTOR_DTYPES:
            raise AdapterLoadError(f"{label}: tensor {key} has dtype {t.dtype}, expected a floating-point {what} "
                                   "(float16, bfloat16, float32 or float64)")
    if A.dim() != 2 or B.dim() != 2:
        bad, t = (a_key, A) if A.dim() != 2 else (b_key, B)
        raise AdapterLoadError(f"{label}: tensor {bad} has shape {tuple(t.shape)}, expected 2-D")
    k = int(A.shape[0])
    if E.dim() == 2 and E.shape[1] == 1:
        E = E[:, 0]
    if E.dim() != 1 or int(E.shape[0]) != k or int(B.shape[1]) != k:
        raise AdapterLoadError(
            f"{label}: AdaLoRA module {mod}: {a_key} {tuple(A.shape)}, {b_key} {tuple(B.shape)}, {e_key} "
            f"{tuple(slot['E'][1].shape)}; expected A (r, in), B (out, r) and E (r, 1) with the same r")
    init_r = int(config.r)
    if mask is not None:
        kept = sum(mask)
        if k == len(mask) and k != kept:  # saved unresized: keep the masked components, as peft's save does
            idx = torch.tensor(mask, dtype=torch.bool)
            A, B, E = A[idx], B[:, idx], E[idx]
        elif k != kept:
            raise AdapterLoadError(
                f"{label}: AdaLoRA module {mod} has {k} rank components but rank_pattern keeps {kept} of {len(mask)}")
    if k > init_r and mask is None:
        raise AdapterLoadError(f"{label}: AdaLoRA module {mod} has {k} rank components, more than init_r = {init_r}")
    rank_now = int(A.shape[0])
    alpha = float(config.lora_alpha)
    scaling = alpha if alpha > 0 else float(rank_now if mask is not None else init_r)
    scale = scaling / (init_r + 1e-5)
    A, B, E = _float(A), _float(B), _float(E)
    live = E != 0
    if not bool(live.all()):
        A, B, E = A[live], B[:, live], E[live]
    if int(A.shape[0]) == 0:
        return None
    A = A * E.to(A.dtype)[:, None]
    return A, B, int(A.shape[0]), alpha, scale


def _embedding_stack(mod: str, two_stacks: bool) -> str:
    segs = mod.split(".")
    if two_stacks:
        for seg in ("encoder", "decoder"):
            if seg in segs:
                return seg
    return "model"


def _validate_pair(
    label: str, mod: str, a_key: str, A: torch.Tensor, b_key: str, B: torch.Tensor, r: int, r_given: bool = True,
) -> None:
    if A.dim() != 2:
        raise AdapterLoadError(f"{label}: tensor {a_key} has shape {tuple(A.shape)}, expected 2-D (r, in_features)")
    if B.dim() != 2:
        raise AdapterLoadError(f"{label}: tensor {b_key} has shape {tuple(B.shape)}, expected 2-D (out_features, r)")
    if A.shape[0] != B.shape[1]:
        raise AdapterLoadError(
            f"{label}: module {mod}: {a_key} has rank {A.shape[0]} (shape {tuple(A.shape)}) but {b_key} has rank "
            f"{B.shape[1]} (shape {tuple(B.shape)}); expected A (r, in) and B (out, r) with the same r")
    if A.shape[0] != r:
        if not r_given:
            raise AdapterLoadError(
                f"{label}: tensor {a_key} has rank {A.shape[0]} but adapter_config.json has no 'r' field, so peft's "
                f"default r={r} applies to module {mod}; add \"r\": {A.shape[0]} to the config")
        raise AdapterLoadError(
            f"{label}: tensor {a_key} has rank {A.shape[0]} but adapter_config.json gives r={r} for module {mod} "
            "(r / rank_pattern)")


def _legacy_parts(label, mod, a_key, A, b_key, B, config: AdapterConfig, enable: list, r, alpha, scale, two_stacks):
    """peft <= 0.2 merged LoRA: grouped Conv1d ``B`` -> exact (B, A) parts (see the module docstring)."""
    if len(enable) > MAX_ENABLE_LORA:
        raise AdapterLoadError(
            f"{label}: legacy peft<=0.2 merged-LoRA format: enable_lora in adapter_config.json has {len(enable)} "
            f"entries, expected at most {MAX_ENABLE_LORA} true / false values (one per fused projection)")
    if not all(isinstance(e, bool) for e in enable):
        raise AdapterLoadError(
            f"{label}: legacy peft<=0.2 merged-LoRA format: enable_lora={enable!r} in adapter_config.json, "
            "expected true / false values (one per fused projection)")
    groups = sum(bool(e) for e in enable)
    if A.dim() != 2 or A.shape[0] != groups * r:
        raise AdapterLoadError(
            f"{label}: legacy peft<=0.2 merged-LoRA format (enable_lora={enable}): tensor {a_key} has shape "
            f"{tuple(A.shape)}, expected ({groups * r}, in_features) = (sum(enable_lora) * r, in)")
    if B.shape[1] != r or B.shape[2] != 1 or B.shape[0] % groups:
        raise AdapterLoadError(
            f"{label}: legacy peft<=0.2 merged-LoRA format (enable_lora={enable}): tensor {b_key} has shape "
            f"{tuple(B.shape)}, expected (G * out_block, {r}, 1) with G = {groups}")
    block = B.shape[0] // groups
    out = block * len(enable)
    enabled = [i for i, e in enumerate(enable) if e]
    # group g: A rows g*r..(g+1)*r, B rows g*block..(g+1)*block, written to output block enabled[g]
    grp = [(A[g * r : (g + 1) * r], B[g * block : (g + 1) * block, :, 0], enabled[g]) for g in range(groups)]
    parts = module_key(mod, out_features=out, in_features=A.shape[1], two_stacks=two_stacks,
                       base_model=config.base_model_name_or_path)
    thirds = len(enable) == 3 and len(parts) == 3 and all(p[1] is not None for p in parts)
    common = dict(name=mod, alpha=alpha, scale=scale, fan_in_fan_out=config.fan_in_fan_out)
    if thirds:
        return [(mod, parts[blk][0], LoraModule(key=parts[blk][0], A=a_g, B=b_g, r=r, rows=parts[blk][1], **common))
                for a_g, b_g, blk in grp]
    key = parts[0][0] if len(parts) == 1 else ModuleKey(parts[0][0].stack, parts[0][0].layer, "qkv")
    b_full = B.new_zeros((out, groups * r))
    for g, (_, b_g, blk) in enumerate(grp):
        b_full[blk * block : (blk + 1) * block, g * r : (g + 1) * r] = b_g
    return [(mod, key, LoraModule(key=key, A=A, B=b_full, r=r, **common))]


def _place(adapter: Adapter, entries: list[tuple[str, ModuleKey, LoraModule]]) -> None:
    """Put modules under their keys. Unmapped names, and names whose keys collide (MoE experts,
    two embeddings...), go under ``ModuleKey("raw", -1, name)`` (a split part: ``name[start:stop]``)."""
    owners: dict[ModuleKey, set[str]] = {}
    for mod, key, _ in entries:
        owners.setdefault(key, set()).add(mod)
    clashing = sorted({mod for key, mods in owners.items() if len(mods) > 1 for mod in mods})
    if clashing:
        adapter.warnings.append(
            f"{len(clashing)} module(s) share a canonical key with another module and are kept under their raw "
            f"names: {', '.join(clashing[:5])}")
    for mod, key, lm in entries:
        if mod in clashing or key.stack == "raw":
            raw_name = mod if lm.rows is None else f"{mod}[{row_label(lm.rows)}]"
            key = ModuleKey("raw", -1, raw_name)
            lm.key = key
            if mod not in adapter.unmapped:
                adapter.unmapped.append(mod)
        adapter.modules[key] = lm
    if adapter.unmapped:
        adapter.warnings.append(
            f"{len(adapter.unmapped)} module(s) kept under their raw names (no canonical stack/layer/kind): "
            f"{', '.join(adapter.unmapped[:5])}")
