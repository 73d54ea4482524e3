"""Load peft LoRA adapters from a folder, a ``.zip`` (path or bytes), a config + weights pair, or the hub.

Every source ends in :func:`build_adapter`, which reads ``adapter_config.json`` (see
:mod:`geometry.config`), the weights (``adapter_model.safetensors``, or ``adapter_model.bin``
through ``torch.load(..., weights_only=True)`` only), separates LoRA factors from other tensors,
validates shapes, ranks and finiteness, and keys every module with :mod:`geometry.naming`.

Formats read:

* ``<module>.lora_A.weight`` ``(r, n)`` and ``<module>.lora_B.weight`` ``(m, r)`` (optionally with an
  adapter name before ``.weight``); ``tau = s * B @ A``.
* DoRA ``<module>.lora_magnitude_vector``: attached as ``LoraModule.magnitude``; tau is the LoRA part.
* Embedding LoRA ``lora_embedding_A (r, vocab)`` / ``lora_embedding_B (dim, r)``: kind ``embed``,
  ``is_embedding=True``, tau ``= s * B @ A`` of shape ``(dim, vocab)``.
* Legacy peft <= 0.2 merged LoRA (``enable_lora`` in the config, ``B`` a grouped ``Conv1d`` weight
  ``(m_g * G, r, 1)`` with ``G = sum(enable_lora)`` groups, ``A`` ``(G * r, n)``): peft 0.2 computed
  ``zero_pad(conv1d(A x, B, groups=G)) * alpha / r``, i.e. group ``g`` uses rows ``g*r .. (g+1)*r`` of
  ``A`` and writes the ``g``-th enabled block of ``out / len(enable_lora)`` output rows. This is loaded
  exactly as one fused module with ``A`` (all ``G * r`` rows) and a block-structured ``B`` of
  ``(out, G * r)`` (zero outside the enabled row blocks), or, where the module splits into
  contiguous thirds (GPT-2 ``c_attn``), as one part per enabled third with its own ``A`` group.
* Fused ``q|k|v`` in contiguous thirds (GPT-2 ``c_attn``, Phi-3 ``self_attn.qkv_proj`` without
  grouped-query attention, see :mod:`geometry.naming`): one :class:`LoraModule` per third, ``B``
  rows sliced, ``A`` shared, ``rows`` set. A fused module that cannot be split (Phi-4 / GQA shapes)
  stays ``qkv`` and ``Adapter.warnings`` says why.
  BLOOM's ``query_key_value`` interleaves heads, so its enabled thirds are not q / v: it stays ``qkv``.

Everything else in the weights file (``classifier.*``, ``score.weight``, ``modules_to_save`` copies,
``lora_B.bias``) is kept in ``Adapter.other_tensors``.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import stat
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from huggingface_hub import snapshot_download

from geometry.config import PEFT_PREFIX, parse_config, rank_and_alpha
from geometry.errors import AdapterLoadError
from geometry.naming import fused_qkv_note, has_two_stacks, module_key
from geometry.types import Adapter, AdapterConfig, LoraModule, ModuleKey, lora_scale

CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
#: Defaults for zip archives: total uncompressed bytes and number of members.
MAX_ZIP_BYTES = 2 * 1024**3
MAX_ZIP_MEMBERS = 10_000

_FACTOR_RE = re.compile(r"^(?P<mod>.+)\.lora_(?P<ab>A|B)(?:\.(?P<ad>[^.]+))?\.weight$")
_EMBED_RE = re.compile(r"^(?P<mod>.+)\.lora_embedding_(?P<ab>A|B)(?:\.(?P<ad>[^.]+))?$")
_MAGNITUDE_RE = re.compile(r"^(?P<mod>.+)\.lora_magnitude_vector(?:\.(?P<ad>[^.]+))?(?:\.weight)?$")
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------


def load_adapter(source: Any, name: str | None = None, **limits: int) -> Adapter:
    """Load one adapter from any supported source.

    ``source``: a folder path, a ``.zip`` path, zip ``bytes``, a ``{filename: bytes}`` dict
    (config + weights), ``"hub:<repo_id>"``, or a string that is not an existing path and looks
    like ``owner/name`` (downloaded with ``huggingface_hub.snapshot_download``). ``limits``:
    ``max_bytes`` / ``max_members`` for zips.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        return load_zip_bytes(bytes(source), name=name, **limits)
    if isinstance(source, dict):
        return load_files(source, name=name)
    if not isinstance(source, (str, Path)):
        raise AdapterLoadError(f"cannot load an adapter from a {type(source).__name__}")
    text = str(source)
    if text.startswith("hub:"):
        return load_hub(text[4:], name=name)
    path = Path(text).expanduser()
    if path.is_dir():
        return load_folder(path, name=name)
    if path.is_file():
        if zipfile.is_zipfile(path):
            return load_zip_bytes(path.read_bytes(), name=name or path.stem, source=str(path), **limits)
        if path.name == CONFIG_NAME or path.name in WEIGHT_NAMES:
            return load_folder(path.parent, name=name)
        raise AdapterLoadError(f"{path}: not a folder, a .zip, {CONFIG_NAME} or one of {', '.join(WEIGHT_NAMES)}")
    if isinstance(source, str) and _HUB_ID_RE.match(text) and not Path(text.split("/")[0]).exists():
        try:
            return load_hub(text, name=name)
        except AdapterLoadError as exc:
            raise AdapterLoadError(f"{text}: no such file or folder, and as a hub id: {exc}") from exc
    raise AdapterLoadError(f"{text}: no such file or folder")


def _find_adapter_dir(root: Path) -> Path:
    if (root / CONFIG_NAME).is_file():
        return root
    found = sorted(str(p.relative_to(root).as_posix()) for p in root.rglob(CONFIG_NAME) if p.is_file())
    if not found:
        raise AdapterLoadError(f"{root}: no {CONFIG_NAME} in this folder or its subfolders")
    return root / PurePosixPath(_shallowest(found, str(root), "folder")[0]).parent


def _shallowest(configs: list[str], where: str, what: str) -> list[str]:
    """The one least nested config path (a training output with ``checkpoint-N/`` copies below it)."""
    depth = min(len(PurePosixPath(c).parts) for c in configs)
    top = [c for c in configs if len(PurePosixPath(c).parts) == depth]
    if len(top) > 1:
        raise AdapterLoadError(
            f"{where}: several {CONFIG_NAME} at the same level of this {what} ({', '.join(top[:5])}); give one adapter")
    return top


def load_folder(path: str | Path, name: str | None = None) -> Adapter:
    """Load the adapter in ``path`` (or in its single subfolder holding ``adapter_config.json``)."""
    root = Path(path)
    folder = _find_adapter_dir(root)
    files = {CONFIG_NAME: (folder / CONFIG_NAME).read_bytes()}
    for wname in WEIGHT_NAMES:
        if (folder / wname).is_file():
            files[wname] = (folder / wname).read_bytes()
            break
    else:
        raise AdapterLoadError(f"{folder}: no weights file ({' or '.join(WEIGHT_NAMES)})")
    return build_adapter(files, name=name or folder.resolve().name, source=str(folder))


def _check_zip_member(info: zipfile.ZipInfo, where: str) -> None:
    member = info.filename
    posix = PurePosixPath(member.replace("\\", "/"))
    if member.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", member) or posix.is_absolute():
        raise AdapterLoadError(f"{where}: unsafe zip member {member!r} (absolute path)")
    if ".." in posix.parts:
        raise AdapterLoadError(f"{where}: unsafe zip member {member!r} (contains '..')")
    if stat.S_ISLNK(info.external_attr >> 16):
        raise AdapterLoadError(f"{where}: unsafe zip member {member!r} (symbolic link)")


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, budget: int, where: str) -> bytes:
    """Read one member, never more than ``budget`` bytes whatever its header claims."""
    out = io.BytesIO()
    with zf.open(info) as fh:
        while chunk := fh.read(1 << 20):
            out.write(chunk)
            if out.tell() > budget:
                raise AdapterLoadError(f"{where}: zip member {info.filename!r} exceeds the size limit of {budget} bytes")
    return out.getvalue()


def load_zip_bytes(
    data: bytes,
    name: str | None = None,
    *,
    source: str = "<zip>",
    max_bytes: int = MAX_ZIP_BYTES,
    max_members: int = MAX_ZIP_MEMBERS,
) -> Adapter:
    """Load the adapter in a zip archive given as bytes (an upload or a file's content).

    The adapter folder is the one directory of the archive holding ``adapter_config.json`` (top
    level or a subfolder). Members with absolute paths, ``..`` or symbolic links are refused, as are
    archives of more than ``max_members`` members or ``max_bytes`` uncompressed bytes.
    """
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError) as exc:
        raise AdapterLoadError(f"{source}: not a readable zip archive ({exc})") from exc
    with zf:
        infos = zf.infolist()
        if len(infos) > max_members:
            raise AdapterLoadError(f"{source}: zip has {len(infos)} members, more than the limit of {max_members}")
        total = 0
        for info in infos:
            _check_zip_member(info, source)
            total += info.file_size
        if total > max_bytes:
            raise AdapterLoadError(f"{source}: zip uncompressed size {total} bytes exceeds the limit of {max_bytes}")
        files = {
            i.filename: i for i in infos if not i.is_dir() and not i.filename.startswith("__MACOSX/")
        }
        configs = sorted(f for f in files if PurePosixPath(f).name == CONFIG_NAME)
        if not configs:
            raise AdapterLoadError(f"{source}: no {CONFIG_NAME} in the zip archive")
        configs = _shallowest(configs, source, "zip")
        folder = PurePosixPath(configs[0]).parent
        wanted = {CONFIG_NAME: configs[0]}
        for wname in WEIGHT_NAMES:
            member = str(folder / wname) if str(folder) != "." else wname
            if member in files:
                wanted[wname] = member
                break
        else:
            raise AdapterLoadError(f"{source}: no {' or '.join(WEIGHT_NAMES)} next to {configs[0]} in the zip")
        budget = max_bytes
        contents = {}
        for short, member in wanted.items():
            contents[short] = _read_member(zf, files[member], budget, source)
            budget -= len(contents[short])
    default = folder.name if str(folder) != "." else (Path(source).stem if source != "<zip>" else "adapter")
    return build_adapter(contents, name=name or default, source=source)


def load_files(files: dict[str, bytes], name: str | None = None) -> Adapter:
    """Load from a ``{filename: bytes}`` pair: a ``*.json`` config and a ``.safetensors`` / ``.bin`` weights file."""
    configs = [k for k in files if k.lower().endswith(".json")]
    weights = [k for k in files if k.lower().endswith((".safetensors", ".bin"))]
    if len(configs) != 1 or len(weights) != 1:
        raise AdapterLoadError(
            f"expected one config (.json) and one weights file (.safetensors or .bin), got {sorted(files)}"
        )
    wkey = weights[0]
    wname = WEIGHT_NAMES[0] if wkey.lower().endswith(".safetensors") else WEIGHT_NAMES[1]
    contents = {CONFIG_NAME: bytes(files[configs[0]]), wname: bytes(files[wkey])}
    return build_adapter(contents, name=name or "adapter", source=f"{configs[0]} + {wkey}", file_labels={
        CONFIG_NAME: configs[0], wname: wkey})


def load_hub(repo_id: str, revision: str | None = None, name: str | None = None) -> Adapter:
    """Download the adapter files of ``repo_id`` with ``huggingface_hub.snapshot_download`` and load them."""
    try:
        folder = snapshot_download(
            repo_id=repo_id,
            revision=revision,
            allow_patterns=["*adapter_config.json", "*adapter_model.safetensors", "*adapter_model.bin"],
        )
    except Exception as exc:  # network, auth, missing repo: one sentence for the user
        raise AdapterLoadError(f"hub:{repo_id}: download failed ({type(exc).__name__}: {exc})") from exc
    adapter = load_folder(folder, name=name or repo_id)
    adapter.source = f"hub:{repo_id}" + (f"@{revision}" if revision else "")
    return adapter


# ---------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------


def content_hash(config: dict, weights: bytes) -> str:
    """sha256 hex of the canonical config JSON (sorted keys, compact) followed by the weights bytes."""
    h = hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode())
    h.update(b"\0")
    h.update(weights)
    return h.hexdigest()


def _read_weights(label: str, data: bytes, is_bin: bool) -> dict[str, torch.Tensor]:
    try:
        if is_bin:
            state = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
        else:
            from safetensors.torch import load as load_safetensors

            state = load_safetensors(data)
    except Exception as exc:  # corrupt or unsafe file: say which
        kind = "torch pickle (weights_only)" if is_bin else "safetensors"
        raise AdapterLoadError(f"{label}: cannot read as {kind} ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AdapterLoadError(f"{label}: expected a mapping of tensor names to tensors")
    return state


def build_adapter(
    files: dict[str, bytes],
    name: str,
    source: str = "",
    file_labels: dict[str, str] | None = None,
) -> Adapter:
    """Build an :class:`Adapter` from ``{"adapter_config.json": bytes, "adapter_model.<ext>": bytes}``."""
    labels = {k: (file_labels or {}).get(k) or (f"{source}/{k}" if source else k) for k in files}
    cfg_label = labels[CONFIG_NAME]
    try:
        raw = json.loads(files[CONFIG_NAME].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterLoadError(f"{cfg_label}: invalid JSON ({exc})") from exc
    config = parse_config(raw, source=cfg_label)
    wname = next(k for k in files if k in WEIGHT_NAMES)
    state = _read_weights(labels[wname], files[wname], is_bin=wname.endswith(".bin"))
    adapter = Adapter(
        name=name,
        config=config,
        modules={},
        source=source,
        content_hash=content_hash(raw, files[wname]),
    )
    _fill(adapter, state, labels[wname])
    return adapter


def _check_finite(label: str, key: str, t: torch.Tensor) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise AdapterLoadError(f"{label}: tensor {key} contains NaN or Inf values")


def _fill(adapter: Adapter, state: dict[str, torch.Tensor], label: str) -> None:
    """Sort ``state`` into LoRA modules and other tensors; validate; key every module."""
    config = adapter.config
    factors: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    embed: set[str] = set()
    magnitudes: dict[str, tuple[str, torch.Tensor]] = {}
    adapter_names: set[str] = set()
    for key, tensor in state.items():
        _check_finite(label, key, tensor)
        short = key.removeprefix(PEFT_PREFIX)
        m = _FACTOR_RE.match(short) or _EMBED_RE.match(short)
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
        m = _MAGNITUDE_RE.match(short)
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

    two_stacks = has_two_stacks(list(factors), config.task_type)
    entries: list[tuple[str, ModuleKey, LoraModule]] = []
    fused_notes: list[str] = []
    for mod in sorted(factors):
        slot = factors[mod]
        for ab, other in (("A", "B"), ("B", "A")):
            if ab not in slot:
                present = slot[other][0]
                raise AdapterLoadError(f"{label}: module {mod} has {present} but no lora_{ab} tensor")
        (a_key, A), (b_key, B) = slot["A"], slot["B"]
        r, alpha = rank_and_alpha(config, mod)
        scale = lora_scale(r, alpha, config.use_rslora)
        legacy = config.raw.get("enable_lora")
        if B.dim() == 3 and isinstance(legacy, list) and any(legacy):
            if not any("legacy peft" in w for w in adapter.warnings):
                adapter.warnings.append(
                    f"legacy peft<=0.2 merged-LoRA format (enable_lora={legacy}): grouped Conv1d B converted exactly "
                    "to (B, A) factors; a fused module keeps rank sum(enable_lora) * r")
            entries.extend(_legacy_parts(label, mod, a_key, A, b_key, B, config, legacy, r, alpha, scale, two_stacks))
            continue
        _validate_pair(label, mod, a_key, A, b_key, B, r)
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
            if magnitude.dim() != 1 or magnitude.shape[0] != B.shape[0]:
                raise AdapterLoadError(
                    f"{label}: tensor {mkey} has shape {tuple(magnitude.shape)}, expected ({B.shape[0]},) (one per output row)")
        for key, rows in parts:
            b_part = B if rows is None else B[rows[0] : rows[1]]
            mag_part = magnitude if magnitude is None or rows is None else magnitude[rows[0] : rows[1]]
            entries.append((mod, key, LoraModule(
                name=mod, key=key, A=A, B=b_part, r=r, alpha=alpha, scale=scale,
                fan_in_fan_out=config.fan_in_fan_out, magnitude=mag_part, is_embedding=is_emb, rows=rows,
            )))
    for mod, (mkey, _) in magnitudes.items():
        raise AdapterLoadError(f"{label}: tensor {mkey} (DoRA magnitude) has no lora_A / lora_B for module {mod}")
    if fused_notes:
        more = f" (and {len(fused_notes) - 1} more such module(s))" if len(fused_notes) > 1 else ""
        adapter.warnings.append(fused_notes[0] + more)
    _place(adapter, entries)


def _embedding_stack(mod: str, two_stacks: bool) -> str:
    segs = mod.split(".")
    if two_stacks:
        for seg in ("encoder", "decoder"):
            if seg in segs:
                return seg
    return "model"


def _validate_pair(label: str, mod: str, a_key: str, A: torch.Tensor, b_key: str, B: torch.Tensor, r: int) -> None:
    if A.dim() != 2:
        raise AdapterLoadError(f"{label}: tensor {a_key} has shape {tuple(A.shape)}, expected 2-D (r, in_features)")
    if B.dim() != 2:
        raise AdapterLoadError(f"{label}: tensor {b_key} has shape {tuple(B.shape)}, expected 2-D (out_features, r)")
    if A.shape[0] != B.shape[1]:
        raise AdapterLoadError(
            f"{label}: module {mod}: {a_key} has rank {A.shape[0]} (shape {tuple(A.shape)}) but {b_key} has rank "
            f"{B.shape[1]} (shape {tuple(B.shape)}); expected A (r, in) and B (out, r) with the same r")
    if A.shape[0] != r:
        raise AdapterLoadError(
            f"{label}: tensor {a_key} has rank {A.shape[0]} but adapter_config.json gives r={r} for module {mod} "
            "(r / rank_pattern)")


def _legacy_parts(label, mod, a_key, A, b_key, B, config: AdapterConfig, enable: list, r, alpha, scale, two_stacks):
    """peft <= 0.2 merged LoRA: grouped Conv1d ``B`` -> exact (B, A) parts (see the module docstring)."""
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
            raw_name = mod if lm.rows is None else f"{mod}[{lm.rows[0]}:{lm.rows[1]}]"
            key = ModuleKey("raw", -1, raw_name)
            lm.key = key
            if mod not in adapter.unmapped:
                adapter.unmapped.append(mod)
        adapter.modules[key] = lm
    if adapter.unmapped:
        adapter.warnings.append(
            f"{len(adapter.unmapped)} module(s) kept under their raw names (no canonical stack/layer/kind): "
            f"{', '.join(adapter.unmapped[:5])}")
