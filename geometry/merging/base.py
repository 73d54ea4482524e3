"""The result of a merge: :class:`MergedAdapter`, one :class:`MergedModule` per module key.

A merged module holds the merged update ``Delta`` of one linear map ``(out, in)``, either

- *factored*: ``Delta = B @ A`` with scale 1 (``B (m, k)``, ``A (k, n)``), as produced by the
  LoRA-level average and by exact task arithmetic (rank ``k = sum_t r_t``), or
- *dense*: the ``(m, n)`` matrix itself, as produced by the element-wise methods (TIES, DARE,
  Multi-SLERP, magnitude pruning), which need every entry.

Each task keeps its own head: ``heads[adapter name]`` is that adapter's ``other_tensors``
(classification head, ``modules_to_save`` copies), untouched by the merge, as in both papers.

:meth:`MergedAdapter.to_peft_folder` writes a peft LoRA folder (``adapter_config.json`` +
``adapter_model.safetensors``) that ``PeftModel.from_pretrained`` loads on the base model:
``lora_alpha = r`` per module (``rank_pattern`` = ``alpha_pattern``), so peft's scale is exactly 1
and the stored ``B @ A`` is the merged update. Dense modules are written as their exact SVD
``U S V^T`` with ``B = U S``, ``A = V^T`` (numerical rank, or a chosen rank with the energy kept
reported); factored ones are written as they are, or truncated by the factored SVD
(:mod:`geometry.merging.truncate`) when a rank is asked for.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from geometry.config import PEFT_PREFIX
from geometry.errors import IncompatibleAdaptersError
from geometry.merging.truncate import factorize_dense, truncate_factored
from geometry.types import Adapter, ModuleKey

#: Files written next to the peft weights.
MERGE_INFO = "merge_info.json"
HEADS_DIR = "heads"


@dataclass
class MergedModule:
    """The merged update of one module key (one part of a fused projection when ``rows`` is set).

    Exactly one of ``(B, A)`` or ``delta`` is set. ``energy_kept`` is the fraction of the squared
    Frobenius norm kept when the update was truncated to a lower rank (1.0 when exact).
    """

    name: str
    key: ModuleKey
    shape: tuple[int, int]
    B: torch.Tensor | None = None
    A: torch.Tensor | None = None
    delta: torch.Tensor | None = None
    rows: tuple[int, int] | None = None
    is_embedding: bool = False
    fan_in_fan_out: bool = False
    energy_kept: float = 1.0

    @property
    def factored(self) -> bool:
        return self.delta is None

    @property
    def rank(self) -> int | None:
        """Number of factored components ``k`` (``None`` for a dense module)."""
        return None if self.A is None else int(self.A.shape[0])

    def dense(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The ``(m, n)`` update. Materializes ``B @ A``: for tests and one module at a time."""
        if self.delta is not None:
            return self.delta.to(dtype)
        return self.B.to(dtype) @ self.A.to(dtype)


@dataclass
class PeftUpdate:
    """The update of one peft module (fused parts put back together), in ``(out, in)`` orientation."""

    name: str
    shape: tuple[int, int]
    B: torch.Tensor | None = None
    A: torch.Tensor | None = None
    delta: torch.Tensor | None = None
    is_embedding: bool = False
    fan_in_fan_out: bool = False

    def dense(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        if self.delta is not None:
            return self.delta.to(dtype)
        return self.B.to(dtype) @ self.A.to(dtype)

    def as_update(self) -> tuple[torch.Tensor, torch.Tensor, float] | torch.Tensor:
        """``(B, A, 1.0)`` or the dense matrix: the form ``geometry.evaluate.apply_updates`` takes."""
        return self.delta if self.delta is not None else (self.B, self.A, 1.0)


@dataclass
class MergedAdapter:
    """A merged set of LoRA adapters: merged updates per module, the per-task heads, provenance."""

    method: str
    params: dict[str, Any]
    modules: dict[ModuleKey, MergedModule]
    heads: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)
    source_hashes: list[str] = field(default_factory=list)
    base_model: str | None = None
    config_raw: dict[str, Any] = field(default_factory=dict)
    head_configs: dict[str, dict[str, Any]] = field(default_factory=dict)

    # ----------------------------------------------------------------------------------- queries
    @property
    def energy_kept(self) -> float:
        """Fraction of ``sum ||Delta||_F^2`` kept by truncation over all modules (1.0 when exact)."""
        kept = total = 0.0
        for mod in self.modules.values():
            norm2 = float(mod.dense().pow(2).sum()) if mod.delta is not None else _factored_norm2(mod.B, mod.A)
            total += norm2 / max(mod.energy_kept, 1e-300)
            kept += norm2
        return 1.0 if total == 0.0 else kept / total

    @property
    def content_hash(self) -> str:
        """sha256 of the sources' content hashes, the method and its parameters (cache key)."""
        payload = json.dumps(
            {"method": self.method, "params": _jsonable(self.params), "sources": self.source_hashes},
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()

    def peft_updates(self) -> dict[str, PeftUpdate]:
        """Updates by peft module name, fused parts (``rows``) put back into one matrix.

        Parts sharing the very same ``A`` (as the LoRA-level average of fused q / k / v keeps)
        stack their ``B`` rows over that ``A``; otherwise the parts' factors are placed block-wise,
        ``B = blockdiag-rows(B_q, B_k, B_v)`` and ``A = [A_q; A_k; A_v]`` (rank = sum of parts).
        A dense part makes the whole fused module dense.
        """
        groups: dict[str, list[MergedModule]] = {}
        for mod in self.modules.values():
            groups.setdefault(mod.name, []).append(mod)
        out: dict[str, PeftUpdate] = {}
        for name, parts in groups.items():
            out[name] = _assemble(name, parts)
        return out

    def updates(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, float] | torch.Tensor]:
        """``{peft module name: (B, A, 1.0) or dense}`` for ``geometry.evaluate.apply_updates``."""
        return {name: up.as_update() for name, up in self.peft_updates().items()}

    def summary(self) -> dict[str, Any]:
        ranks = [m.rank for m in self.modules.values() if m.rank is not None]
        return {
            "method": self.method,
            "params": _jsonable(self.params),
            "sources": list(self.sources),
            "n_modules": len(self.modules),
            "n_dense": sum(1 for m in self.modules.values() if not m.factored),
            "max_rank": max(ranks) if ranks else None,
            "energy_kept": self.energy_kept,
            "heads": sorted(self.heads),
        }

    # ------------------------------------------------------------------------------------ output
    def to_peft_folder(self, path: str | Path, rank: int | None = None, head: str | None = None) -> Path:
        """Write a peft LoRA adapter folder loadable by ``PeftModel.from_pretrained(base, path)``.

        ``rank``: ``None`` keeps factored updates as they are and writes dense ones at their
        numerical rank (exact to float tolerance); an integer truncates every module above that
        rank by its exact SVD (factored: QR + core; dense: full SVD of that one module), keeping
        the top singular directions; the energy kept per module goes to ``merge_info.json``.
        ``head``: the source adapter whose head (``other_tensors``, ``modules_to_save``) is put in
        the weights file so the folder is a complete classifier for that task; every head is also
        written under ``heads/<name>.safetensors``. Default: the first source that has a head.
        """
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        weights, config, info = self._peft_payload(rank, head)
        save_file(weights, str(path / "adapter_model.safetensors"))
        (path / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        (path / MERGE_INFO).write_text(json.dumps(info, indent=2, sort_keys=True))
        if self.heads:
            (path / HEADS_DIR).mkdir(exist_ok=True)
            for name, tensors in self.heads.items():
                if tensors:
                    save_file(_contiguous(tensors), str(path / HEADS_DIR / f"{_safe(name)}.safetensors"))
        return path

    def to_zip_bytes(self, rank: int | None = None, head: str | None = None) -> bytes:
        """The :meth:`to_peft_folder` files as a zip (for a download button)."""
        import tempfile

        buf = io.BytesIO()
        with tempfile.TemporaryDirectory() as tmp:
            folder = self.to_peft_folder(Path(tmp) / "merged", rank=rank, head=head)
            with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
                for file in sorted(folder.rglob("*")):
                    if file.is_file():
                        zf.write(file, file.relative_to(folder).as_posix())
        return buf.getvalue()

    def _peft_payload(self, rank: int | None, head: str | None) -> tuple[dict, dict, dict]:
        if rank is not None and int(rank) < 1:
            raise ValueError(f"rank must be a positive integer, got {rank}")
        head = self._choose_head(head)
        weights: dict[str, torch.Tensor] = {}
        ranks: dict[str, int] = {}
        energy: dict[str, float] = {}
        fan_in_fan_out = False
        for name, up in sorted(self.peft_updates().items()):
            B, A, kept = _factors_for_output(up, rank)
            k = int(A.shape[0])
            if k == 0:  # an all-zero update: peft needs r >= 1
                B, A, k = torch.zeros(up.shape[0], 1), torch.zeros(1, up.shape[1]), 1
            ranks[name] = k
            energy[name] = kept
            fan_in_fan_out = fan_in_fan_out or up.fan_in_fan_out
            prefix = name if name.startswith(PEFT_PREFIX) else PEFT_PREFIX + name
            if up.is_embedding:
                weights[f"{prefix}.lora_embedding_A"] = A.float().contiguous()
                weights[f"{prefix}.lora_embedding_B"] = B.float().contiguous()
            else:
                weights[f"{prefix}.lora_A.weight"] = A.float().contiguous()
                weights[f"{prefix}.lora_B.weight"] = B.float().contiguous()
        if not ranks:
            raise IncompatibleAdaptersError(f"merge {self.method!r} has no module to write")
        r = max(ranks.values())
        pattern = {re.escape(_short(name)): k for name, k in ranks.items() if k != r}
        config = {k: v for k, v in self.config_raw.items() if k not in _DROPPED_CONFIG_FIELDS}
        config.update(
            peft_type="LORA",
            r=r,
            lora_alpha=r,
            use_rslora=False,
            use_dora=False,
            rank_pattern=pattern,
            alpha_pattern=dict(pattern),
            target_modules=sorted(_short(n) for n in ranks),
            fan_in_fan_out=fan_in_fan_out,
            base_model_name_or_path=self.base_model,
            modules_to_save=None,
            bias="none",
        )
        if head is not None:
            weights.update(_contiguous(self.heads[head]))
            config["modules_to_save"] = self.head_configs.get(head, {}).get("modules_to_save")
            if self.head_configs.get(head, {}).get("task_type"):
                config["task_type"] = self.head_configs[head]["task_type"]
        info = {
            "method": self.method,
            "params": _jsonable(self.params),
            "sources": list(self.sources),
            "source_hashes": list(self.source_hashes),
            "head": head,
            "heads": sorted(self.heads),
            "rank": rank,
            "ranks": ranks,
            "energy_kept": energy,
            "energy_kept_total": _total_energy(self, energy),
        }
        return weights, config, info

    def _choose_head(self, head: str | None) -> str | None:
        if head is not None:
            if head not in self.heads:
                raise IncompatibleAdaptersError(
                    f"head {head!r} is not one of the merged adapters' heads {sorted(self.heads)}"
                )
            return head if self.heads[head] else None
        for name in self.sources:
            if self.heads.get(name):
                return name
        return None


# config fields that describe the sources' placement or variants, not the merged adapter
_DROPPED_CONFIG_FIELDS = {
    "layers_to_transform", "layers_pattern", "exclude_modules", "target_parameters", "loftq_config",
    "eva_config", "corda_config", "megatron_config", "lora_bias", "trainable_token_indices",
    "revision", "auto_mapping",
}


def _short(name: str) -> str:
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "head"


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in tensors.items()}


def _factored_norm2(B: torch.Tensor, A: torch.Tensor) -> float:
    """``||B A||_F^2 = trace((B^T B)(A A^T))`` without forming ``B A``."""
    Bd, Ad = B.double(), A.double()
    return float(((Bd.T @ Bd) * (Ad @ Ad.T)).sum())


def _total_energy(merged: MergedAdapter, written: dict[str, float]) -> float:
    """Energy kept over all modules: merge-time truncation times write-time truncation."""
    kept = total = 0.0
    for name, up in merged.peft_updates().items():
        norm2 = float(up.dense().pow(2).sum()) if up.delta is not None else _factored_norm2(up.B, up.A)
        parts = [m for m in merged.modules.values() if m.name == name]
        before = min((m.energy_kept for m in parts), default=1.0)
        total += norm2 / max(before, 1e-300)
        kept += norm2 * written.get(name, 1.0)
    return 1.0 if total == 0.0 else kept / total


def _factors_for_output(up: PeftUpdate, rank: int | None) -> tuple[torch.Tensor, torch.Tensor, float]:
    if up.delta is not None:
        return factorize_dense(up.delta, rank)
    if rank is not None and up.A.shape[0] > rank:
        return truncate_factored(up.B, up.A, rank)
    return up.B, up.A, 1.0


def _assemble(name: str, parts: list[MergedModule]) -> PeftUpdate:
    first = parts[0]
    if len(parts) == 1 and first.rows is None:
        return PeftUpdate(name, first.shape, first.B, first.A, first.delta, first.is_embedding, first.fan_in_fan_out)
    parts = sorted(parts, key=lambda p: p.rows or (0, p.shape[0]))
    m = max((p.rows or (0, p.shape[0]))[1] for p in parts)
    n = first.shape[1]
    if any(not p.factored for p in parts):
        delta = torch.zeros(m, n, dtype=torch.float32)
        for p in parts:
            lo, hi = p.rows or (0, p.shape[0])
            delta[lo:hi] = p.dense(torch.float32)
        return PeftUpdate(name, (m, n), delta=delta, is_embedding=first.is_embedding, fan_in_fan_out=first.fan_in_fan_out)
    if all(p.A.shape == first.A.shape and torch.equal(p.A, first.A) for p in parts):
        B = torch.zeros(m, first.A.shape[0], dtype=first.B.dtype)
        for p in parts:
            lo, hi = p.rows or (0, p.shape[0])
            B[lo:hi] = p.B
        return PeftUpdate(name, (m, n), B, first.A, is_embedding=first.is_embedding, fan_in_fan_out=first.fan_in_fan_out)
    k = sum(p.A.shape[0] for p in parts)
    B = torch.zeros(m, k, dtype=first.B.dtype)
    col = 0
    for p in parts:
        lo, hi = p.rows or (0, p.shape[0])
        B[lo:hi, col : col + p.A.shape[0]] = p.B
        col += p.A.shape[0]
    A = torch.cat([p.A for p in parts], dim=0)
    return PeftUpdate(name, (m, n), B, A, is_embedding=first.is_embedding, fan_in_fan_out=first.fan_in_fan_out)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


# ------------------------------------------------------------------------------ input helpers
def check_mergeable(adapters: Sequence[Adapter]) -> None:
    """Raise :class:`IncompatibleAdaptersError` for inputs no merge can combine.

    At least one adapter; one base model (when the configs name one); the same ``(m, n)`` shape for
    every module key present in several adapters; no DoRA (its magnitude vector depends on
    ``W0`` and has no defined combination, cf. peft issue #3761).
    """
    if not adapters:
        raise IncompatibleAdaptersError("nothing to merge: give at least one adapter")
    bases = {a.name: a.config.base_model_name_or_path for a in adapters if a.config.base_model_name_or_path}
    if len(set(bases.values())) > 1:
        listed = ", ".join(f"{n}: {b}" for n, b in bases.items())
        raise IncompatibleAdaptersError(f"adapters are fine-tuned from different base models ({listed})")
    shapes: dict[ModuleKey, tuple[str, tuple[int, int]]] = {}
    for ad in adapters:
        if ad.config.use_dora:
            raise IncompatibleAdaptersError(
                f"{ad.name}: DoRA adapter (use_dora); its magnitude vector depends on W0 and cannot be merged"
            )
        for key, mod in ad.modules.items():
            if key in shapes and shapes[key][1] != mod.shape:
                other, shape = shapes[key]
                raise IncompatibleAdaptersError(
                    f"module {key.label}: {ad.name} has shape {mod.shape} but {other} has {shape}"
                )
            shapes.setdefault(key, (ad.name, mod.shape))


def all_keys(adapters: Sequence[Adapter]) -> list[ModuleKey]:
    """Union of the adapters' module keys, sorted (a module missing from an adapter counts as 0)."""
    keys: set[ModuleKey] = set()
    for ad in adapters:
        keys.update(ad.modules)
    return sorted(keys)


def template(adapters: Sequence[Adapter], key: ModuleKey):
    """The first adapter's :class:`LoraModule` at ``key`` (name, rows, embedding flag, shape)."""
    for ad in adapters:
        if key in ad.modules:
            return ad.modules[key]
    raise KeyError(key)


def iter_present(adapters: Sequence[Adapter], key: ModuleKey) -> Iterator[tuple[int, Any]]:
    """``(t, LoraModule)`` for the adapters that have ``key``."""
    for t, ad in enumerate(adapters):
        mod = ad.modules.get(key)
        if mod is not None:
            yield t, mod


def wrap(method: str, params: dict[str, Any], adapters: Sequence[Adapter], modules: dict[ModuleKey, MergedModule]) -> MergedAdapter:
    """Build the :class:`MergedAdapter` with heads and provenance of ``adapters``."""
    base = next((a.config.base_model_name_or_path for a in adapters if a.config.base_model_name_or_path), None)
    return MergedAdapter(
        method=method,
        params=dict(params),
        modules=modules,
        heads={a.name: dict(a.other_tensors) for a in adapters},
        sources=[a.name for a in adapters],
        source_hashes=[a.content_hash or a.name for a in adapters],
        base_model=base,
        config_raw=dict(adapters[0].config.raw),
        head_configs={
            a.name: {"modules_to_save": a.config.modules_to_save, "task_type": a.config.task_type} for a in adapters
        },
    )
