"""Update sets: what the runtime applies (an adapter, a merge, raw factors) as factored per-module updates,
with content hashes; and the tasks (adapter, base, head) a list of sources stands for."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from geometry.errors import AdapterLoadError, AtlasError
from geometry.io.config import PEFT_PREFIX
from geometry.types import Adapter, row_index, row_stop

Update = tuple[torch.Tensor, torch.Tensor, float] | tuple[torch.Tensor, torch.Tensor, float, torch.Tensor] | torch.Tensor


# ---------------------------------------------------------------------------------------------- update sets
@dataclass
class LoraUpdates:
    """A set of weight updates: ``{peft module name: (B, A, scale) or dense (out, in)}``.

    ``(B, A, scale)`` stands for ``scale * B @ A`` (``B (out, r)``, ``A (r, in)``); ``(B, A, scale, magnitude)``
    for a DoRA module's exact update ``mag (W0 + s B A) / ||W0 + s B A||_row - W0``, which the runtime computes
    from the base it holds (:mod:`geometry.linalg.dora`). ``head`` holds the
    classification head tensors (``classifier.weight`` ... with or without the ``base_model.model.``
    prefix). ``base`` is the base model name or path. ``layers`` optionally gives the block index of
    a module (for per-layer coefficients); missing names use the first all-digit path segment.
    """

    base: str
    updates: dict[str, Update]
    head: dict[str, torch.Tensor] = field(default_factory=dict)
    name: str = "updates"
    task_type: str = "SEQ_CLS"
    layers: dict[str, int] = field(default_factory=dict)

    def content_hash(self) -> str:
        h = hashlib.sha256(f"{self.base}|{self.task_type}".encode())
        for key in sorted(self.updates):
            h.update(key.encode())
            for t in _as_tuple(self.updates[key]):
                h.update(_tensor_bytes(t))
        for key in sorted(self.head):
            h.update(key.encode() + _tensor_bytes(self.head[key]))
        return h.hexdigest()


def _as_tuple(update: Update) -> tuple:
    return update if isinstance(update, tuple) else (update,)


def _tensor_bytes(t: Any) -> bytes:
    if isinstance(t, torch.Tensor):
        return t.detach().to("cpu", torch.float64).contiguous().numpy().tobytes() + str(tuple(t.shape)).encode()
    return repr(float(t)).encode()


def _check_not_dora(adapter: Adapter) -> None:
    """Refuse a DoRA adapter whose modules lack their magnitude vectors (``use_dora`` without them)."""
    for mod in adapter.modules.values():
        if adapter.config.use_dora and mod.magnitude is None and not mod.dora_exact:
            raise AtlasError(
                f"{adapter.name}: module {mod.name} is DoRA (use_dora) but has no lora_magnitude_vector: "
                "its update m (W0 + s B A) / ||W0 + s B A||_row - W0 is undefined")


def _dora_magnitude(name: str, parts: list) -> torch.Tensor | None:
    """The full ``(out,)`` magnitude of a module whose parts are DoRA (direction only), else None."""
    if all(p.magnitude is None or p.dora_exact for p in parts):
        return None
    if any(p.magnitude is None or p.dora_exact for p in parts):
        raise AtlasError(f"module {name}: some parts are DoRA and some are not")
    if len(parts) == 1 and parts[0].rows is None:
        return parts[0].magnitude
    out = max(row_stop(p.rows) for p in parts)
    mag = torch.full((out,), float("nan"), dtype=parts[0].magnitude.dtype)
    for p in parts:
        mag[row_index(p.rows)] = p.magnitude
    if bool(torch.isnan(mag).any()):
        raise AtlasError(f"module {name}: DoRA parts do not cover every output row")
    return mag


def _head_tensors(adapter: Adapter) -> dict[str, torch.Tensor]:
    """An adapter's head / ``modules_to_save`` tensors; LoRA biases are refused (not a head)."""
    biases = [k for k in adapter.other_tensors if k.endswith(".lora_B.bias")]
    if biases:
        raise AtlasError(f"{adapter.name}: tensor {biases[0]} is a LoRA bias (lora_bias=True), which the "
                         "runtime does not apply (expected LoRA factors and head tensors only)")
    return dict(adapter.other_tensors)


def adapter_updates(adapter: Adapter) -> LoraUpdates:
    """An :class:`Adapter`'s factors and its other tensors (the head) as :class:`LoraUpdates`.

    Parts of a fused projection (``rows`` set) sharing one ``A`` are put back as one factored update:
    ``B`` gets the parts' rows (``(max stop, r)``, zero elsewhere) over the shared ``A``; parts with
    their own ``A`` (legacy peft) are placed block-wise, ``B = [B_1 0; 0 B_2]`` rows, ``A = [A_1; A_2]``.
    Nothing is multiplied out.
    """
    _check_not_dora(adapter)
    updates: dict[str, Update] = {}
    layers: dict[str, int] = {}
    fused: dict[str, list] = {}
    for mod in adapter.modules.values():
        layers.setdefault(mod.name, mod.key.layer if mod.key.layer >= 0 else _layer_of(mod.name))
        if mod.rows is None:
            mag = _dora_magnitude(mod.name, [mod])
            updates[mod.name] = (mod.B, mod.A, mod.scale) if mag is None else (mod.B, mod.A, mod.scale, mag)
        else:
            fused.setdefault(mod.name, []).append(mod)
    for name, parts in fused.items():
        out = max(row_stop(p.rows) for p in parts)
        groups: dict[int, list] = {}
        for p in parts:
            groups.setdefault(id(p.A), []).append(p)
        k = sum(int(g[0].A.shape[0]) for g in groups.values())
        B = parts[0].B.new_zeros((out, k))
        col = 0
        for g in groups.values():
            r = int(g[0].A.shape[0])
            for p in g:
                B[row_index(p.rows), col:col + r] = p.B
            col += r
        A = torch.cat([g[0].A for g in groups.values()], dim=0) if len(groups) > 1 else parts[0].A
        mag = _dora_magnitude(name, parts)
        updates[name] = (B, A, parts[0].scale) if mag is None else (B, A, parts[0].scale, mag)
    base = adapter.config.base_model_name_or_path
    if not base:
        raise AdapterLoadError(f"{adapter.name}: adapter_config.json has no base_model_name_or_path")
    return LoraUpdates(base, updates, _head_tensors(adapter), name=adapter.name,
                       task_type=adapter.config.task_type or "SEQ_CLS", layers=layers)


def _is_merge(source: Any) -> bool:
    return hasattr(source, "updates") and hasattr(source, "heads") and callable(source.updates)


def merge_updates(source: Any, head: str | None) -> LoraUpdates:
    """A merge result (``updates()``, ``heads``, ``base_model``) as :class:`LoraUpdates` with one head."""
    heads: dict[str, dict[str, torch.Tensor]] = dict(getattr(source, "heads", {}) or {})
    if head is None and len(heads) > 1:
        raise AtlasError(f"the merge carries {len(heads)} heads ({', '.join(heads)}): pass head=NAME")
    if head is not None and head not in heads:
        raise AtlasError(f"no head named {head!r} in the merge (heads: {', '.join(heads) or 'none'})")
    chosen = heads[head] if head is not None else next(iter(heads.values()), {})
    base = getattr(source, "base_model", None)
    if not base:
        raise AtlasError("the merge records no base_model: build LoraUpdates(base=..., ...) instead")
    config = getattr(source, "config_raw", {}) or {}
    return LoraUpdates(str(base), dict(source.updates()), dict(chosen),
                       name=f"merge:{getattr(source, 'method', '')}", task_type=config.get("task_type") or "SEQ_CLS",
                       layers=_merge_layers(source))


def _merge_layers(source: Any) -> dict[str, int]:
    """Block index of each peft module of a merge, from its module keys (``MergedModule.key.layer``)."""
    return {m.name: m.key.layer for m in (getattr(source, "modules", None) or {}).values()
            if hasattr(m, "name") and hasattr(m, "key") and m.key.layer >= 0}


def as_updates(source: Any, head: str | None = None) -> LoraUpdates:
    """:class:`LoraUpdates` of an :class:`Adapter`, :class:`LoraUpdates` or merge (``head``: the merge's head)."""
    if isinstance(source, LoraUpdates):
        return source
    if isinstance(source, Adapter):
        return adapter_updates(source)
    if _is_merge(source):
        return merge_updates(source, head)
    raise AtlasError(f"cannot evaluate a {type(source).__name__}: expected a peft folder, Adapter, LoraUpdates "
                     "or merge")


_DIGITS = re.compile(r"^\d+$")


def _layer_of(name: str) -> int:
    """Block index of a module path: its first all-digit segment (``...layer.3.attention...`` -> 3), else -1."""
    for seg in name.removeprefix(PEFT_PREFIX).split("."):
        if _DIGITS.match(seg):
            return int(seg)
    return -1


@dataclass
class _Term:
    """One task's update of one module: factored ``scale * B @ A`` or ``dense``; ``B`` may be row parts."""

    name: str
    layer: int
    scale: float = 1.0
    A: torch.Tensor | None = None
    B: torch.Tensor | None = None
    parts: list[tuple[tuple[int, int], torch.Tensor]] | None = None
    dense: torch.Tensor | None = None
    magnitude: torch.Tensor | None = None  # DoRA (direction only): applied exactly from the base's W0


@dataclass
class _Task:
    """A source normalised: its terms, the heads it can provide (by name), base and task type."""

    name: str
    terms: list[_Term]
    heads: dict[str, dict[str, torch.Tensor]]
    base: str | None
    task_type: str | None


def _check_not_diffusion(adapter: Adapter) -> None:
    """A diffusion LoRA (kohya / diffusers file, or a UNet / DiT adapter) needs a diffusion model to be scored."""
    fmt = getattr(adapter.config, "format", "peft")
    stacks = {k.stack for k in adapter.modules}
    if fmt in ("kohya", "diffusers") or stacks & {"unet", "transformer"}:
        raise AtlasError(
            f"{adapter.name} is a diffusion LoRA ({fmt} format): scoring it needs a diffusion model, which Adapter "
            "Atlas does not run; its geometry, inclusion, anatomy and merges work without one")


def _task(source: Any) -> _Task:
    if isinstance(source, (str, os.PathLike)):
        from geometry.io.loader import load_adapter

        source = load_adapter(source)
    if isinstance(source, Adapter):
        _check_not_dora(source)
        _check_not_diffusion(source)
        groups: dict[tuple[str, int], list] = {}
        for mod in source.modules.values():
            groups.setdefault((mod.name, id(mod.A)), []).append(mod)
        terms = []
        for (name, _), mods in groups.items():
            layer = next((m.key.layer for m in mods if m.key.layer >= 0), _layer_of(name))
            first = mods[0]
            mag = _dora_magnitude(name, mods)
            if first.rows is None:
                terms.append(_Term(name, layer, first.scale, first.A, first.B, magnitude=mag))
            else:
                terms.append(_Term(name, layer, first.scale, first.A, parts=[(m.rows, m.B) for m in mods],
                                   magnitude=mag))
        head = _head_tensors(source)
        return _Task(source.name, terms, {source.name: head} if head else {},
                     source.config.base_model_name_or_path, source.config.task_type)
    if isinstance(source, LoraUpdates) or _is_merge(source):
        if isinstance(source, LoraUpdates):
            updates, layers = source.updates, source.layers
            heads = {source.name: dict(source.head)} if source.head else {}
            name, base, task_type = source.name, source.base, source.task_type
        else:
            updates, layers = dict(source.updates()), _merge_layers(source)
            heads = {k: dict(v) for k, v in (source.heads or {}).items() if v}
            name, base = f"merge:{getattr(source, 'method', '')}", getattr(source, "base_model", None)
            task_type = (getattr(source, "config_raw", {}) or {}).get("task_type")
        terms = []
        for mod_name, update in updates.items():
            layer = layers.get(mod_name, _layer_of(mod_name))
            if isinstance(update, tuple) and len(update) in (3, 4):
                B, A, scale = update[:3]
                mag = update[3] if len(update) == 4 else None
                terms.append(_Term(mod_name, layer, float(scale), A, B, magnitude=mag))
            elif isinstance(update, torch.Tensor):
                terms.append(_Term(mod_name, layer, dense=update))
            else:
                raise AtlasError(f"update {mod_name!r}: expected (B, A, scale), (B, A, scale, magnitude) or a dense "
                                 "(out, in) tensor, "
                                 f"got {type(update).__name__}")
        return _Task(name, terms, heads, base, task_type)
    raise AtlasError(f"cannot apply a {type(source).__name__}: expected an Adapter, LoraUpdates, a merge result "
                     "(updates() / heads / base_model) or an adapter folder")


def _tasks(sources: Any) -> list[_Task]:
    if isinstance(sources, (list, tuple)):
        return [_task(s) for s in sources]
    return [_task(sources)]
