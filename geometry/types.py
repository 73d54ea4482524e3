"""Core data types of Adapter Atlas: adapters, their LoRA modules and module keys.

A LoRA module adapts one linear layer ``W0`` of shape ``(m, n)`` (``m`` outputs, ``n`` inputs) with
factors ``A`` of shape ``(r, n)`` and ``B`` of shape ``(m, r)``. Its *task vector* is

    tau = s * B @ A,    s = lora_alpha / r    (or lora_alpha / sqrt(r) with use_rslora)

always oriented as the linear map ``(out, in)``, also for GPT-2 ``Conv1D`` layers
(``fan_in_fan_out = True``) whose stored weight is the transpose: peft stores ``A`` as
``[r, in]`` and ``B`` as ``[out, r]`` in both cases, so ``tau`` is the same expression.

Nothing here ever forms ``B @ A`` except :meth:`LoraModule.dense`, which exists for tests,
element-wise merges (one module at a time) and small models.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the tensors' type only: ``import geometry`` does not import torch
    import torch

#: Canonical projection kinds, in display order. Fused kinds are kept when they cannot be split.
CANONICAL_KINDS: tuple[str, ...] = (
    "q", "k", "v", "o", "qkv",
    "gate", "up", "down", "gate_up",
    "cross_q", "cross_k", "cross_v", "cross_o",
    "fc_in", "fc_out", "embed",
    # diffusion UNet / DiT (geometry.io.diffusion)
    "to_q", "to_k", "to_v", "to_out", "cross_to_q", "cross_to_k", "cross_to_v", "cross_to_out",
    "add_q", "add_k", "add_v", "to_add_out", "proj_in", "proj_out", "ff_in", "ff_out",
    "ff_context_in", "ff_context_out", "proj_mlp", "norm1", "norm1_context", "norm",
    "res_conv1", "res_conv2", "res_time_emb", "res_shortcut", "downsample", "upsample",
)
#: Stacks: ``model`` for a single-stack model, ``encoder`` / ``decoder`` for T5-like models,
#: ``raw`` for module names that could not be mapped (kept, never dropped).
#: Diffusion pipelines (:mod:`geometry.io.diffusion`): ``text_encoder*``, ``unet``, ``transformer``.
STACKS: tuple[str, ...] = (
    "model", "encoder", "decoder",
    "text_encoder", "text_encoder_2", "text_encoder_3", "unet", "transformer", "raw",
)


def kind_order(kind: str) -> tuple[int, str]:
    """Sort key of a projection kind: canonical kinds in :data:`CANONICAL_KINDS` order, then by name."""
    return (CANONICAL_KINDS.index(kind) if kind in CANONICAL_KINDS else len(CANONICAL_KINDS), kind)


def stack_order(stack: str) -> tuple[int, str]:
    """Sort key of a stack: :data:`STACKS` order, then by name."""
    return (STACKS.index(stack) if stack in STACKS else len(STACKS), stack)


def ordered_kinds(values: Iterable[str]) -> list[str]:
    """Distinct kinds in display order (the one ordering used by the library, the CLI and the pages)."""
    return sorted(set(values), key=kind_order)


def ordered_stacks(stacks: Iterable[str]) -> list[str]:
    return sorted(set(stacks), key=stack_order)


@dataclass(frozen=True, order=True)
class ModuleKey:
    """Where a module sits: ``(stack, layer, kind)``.

    ``layer`` is the block index (``-1`` when the module is outside the repeated blocks or
    unmapped). For an unmapped module, ``stack == "raw"`` and ``kind`` is its full peft path.
    """

    stack: str
    layer: int
    kind: str

    @property
    def order(self) -> tuple:
        """Display order: stack (``model``, ``encoder``, ``decoder``, ``raw``), layer, canonical kind."""
        return (*stack_order(self.stack), self.layer, *kind_order(self.kind))

    @property
    def label(self) -> str:
        """Short human label, e.g. ``model.3.v`` or ``encoder.0.cross_q``."""
        if self.stack == "raw":
            return self.kind
        return f"{self.stack}.{self.layer}.{self.kind}"


#: Fused output rows of a split part: ``(start, stop)``, or ``((start, stop), ...)`` row blocks for a fused
#: projection whose q / k / v rows are interleaved per head (GPT-NeoX ``query_key_value``).
Rows = tuple


def row_index(rows: Rows) -> slice | list[int]:
    """Indexer of a part's rows in the fused output (``B_fused[row_index(rows)] = B_part``): a slice for
    ``(start, stop)``, the list of row indices for row blocks."""
    if isinstance(rows[0], int):
        return slice(rows[0], rows[1])
    return [i for lo, hi in rows for i in range(lo, hi)]


def row_stop(rows: Rows) -> int:
    """One past the last fused output row a part holds."""
    return int(rows[1]) if isinstance(rows[0], int) else max(int(hi) for _, hi in rows)


def row_label(rows: Rows) -> str:
    """``start:stop``, or ``start:stop,start:stop,...`` (the first three blocks, then a count) for row blocks."""
    if isinstance(rows[0], int):
        return f"{rows[0]}:{rows[1]}"
    text = ",".join(f"{lo}:{hi}" for lo, hi in rows[:3])
    return text + (f",... ({len(rows)} blocks)" if len(rows) > 3 else "")


def ordered_keys(keys: Iterable[ModuleKey]) -> list[ModuleKey]:
    """Distinct keys in display order (:attr:`ModuleKey.order`)."""
    return sorted(set(keys), key=lambda k: k.order)


@dataclass
class LoraModule:
    """One adapted linear map: ``tau = scale * B @ A`` with ``A (r, n)``, ``B (m, r)``.

    ``name`` is the peft module path (``bert.encoder.layer.0.attention.self.query``). For a fused
    projection split into parts (GPT-2 ``c_attn`` into q / k / v), ``name`` stays the fused path
    and ``rows`` gives the slice of the fused output rows this part holds (``B`` is already
    sliced; ``A`` is shared by the parts): ``(start, stop)``, or a tuple of ``(start, stop)`` row blocks
    when the parts interleave per head (GPT-NeoX); index with :func:`row_index`.

    DoRA (``magnitude`` set): the stored update is only the LoRA direction; the effective weight is
    ``m * (W0 + s B A) / ||W0 + s B A||_row`` (one norm per output row, as peft computes it), which
    depends on ``W0``. Without the base weights Adapter Atlas analyses the LoRA direction ``s B A``
    (``dora_exact = False``: "DoRA: direction only, base weights not loaded"); with them,
    :func:`geometry.linalg.dora.resolve_dora` replaces ``(B, A, scale)`` by a factorisation of the
    exact update ``m * (W0 + s B A) / ||W0 + s B A||_row - W0`` and sets ``dora_exact = True``
    (``magnitude`` is kept for reference; it is no longer applied on top).
    Embedding LoRA (``is_embedding``): peft stores ``lora_embedding_A (r, vocab)`` and
    ``lora_embedding_B (dim, r)``; the task vector is ``s * (B @ A)`` of shape ``(dim, vocab)``,
    the transpose of the embedding table's update.
    """

    name: str
    key: ModuleKey
    A: torch.Tensor
    B: torch.Tensor
    r: int
    alpha: float
    scale: float
    fan_in_fan_out: bool = False
    magnitude: torch.Tensor | None = None
    is_embedding: bool = False
    rows: Rows | None = None
    dora_exact: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        """``(m, n)`` of the task vector."""
        return (int(self.B.shape[0]), int(self.A.shape[1]))

    @property
    def rank(self) -> int:
        """Nominal rank ``r`` (number of LoRA components; the numerical rank can be lower)."""
        return int(self.A.shape[0])

    @property
    def n_params(self) -> int:
        return int(self.A.numel() + self.B.numel())

    def dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense task vector ``scale * B @ A`` (m x n), float64 unless ``dtype``. For tests and
        one-module-at-a-time work."""
        if dtype is None:
            return self.scale * (self.B.double() @ self.A.double())
        return self.scale * (self.B.to(dtype) @ self.A.to(dtype))


def lora_scale(r: int, alpha: float, use_rslora: bool = False) -> float:
    """peft's scaling: ``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA."""
    return float(alpha) / (math.sqrt(r) if use_rslora else float(r))


@dataclass
class AdapterConfig:
    """The fields of ``adapter_config.json`` that matter for geometry; ``raw`` keeps them all."""

    r: int = 8
    lora_alpha: float = 8.0
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    target_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    use_dora: bool = False
    modules_to_save: list[str] | None = None
    base_model_name_or_path: str | None = None
    task_type: str | None = None
    peft_type: str = "LORA"
    raw: dict[str, Any] = field(default_factory=dict)
    #: The file format it came in: ``peft`` (``adapter_config.json``), ``diffusers`` or ``kohya``
    #: (:mod:`geometry.io.diffusion`); an export writes the same format.
    format: str = "peft"


@dataclass
class Adapter:
    """A loaded LoRA adapter: its config, its LoRA modules by key, and its other tensors.

    ``other_tensors`` holds every non-LoRA tensor of the weights file (classification heads such
    as ``classifier.*`` or ``score.weight``, ``modules_to_save`` copies), by their stored key.
    ``unmapped`` lists peft module names whose kind could not be recognised (they are in
    ``modules`` under ``ModuleKey("raw", -1, name)``).
    """

    name: str
    config: AdapterConfig
    modules: dict[ModuleKey, LoraModule]
    other_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    unmapped: list[str] = field(default_factory=list)
    source: str = ""
    content_hash: str = ""
    warnings: list[str] = field(default_factory=list)

    def kinds(self) -> list[str]:
        """Projection kinds present, canonical ones first in canonical order."""
        return ordered_kinds(k.kind for k in self.modules)

    def stacks(self) -> list[str]:
        return ordered_stacks(k.stack for k in self.modules)

    def layers(self, kind: str | None = None, stack: str | None = None) -> list[int]:
        """Sorted layer indices having a module of ``kind`` (any kind if None) in ``stack``."""
        return sorted(
            {k.layer for k in self.modules if (kind is None or k.kind == kind) and (stack is None or k.stack == stack)}
        )

    def n_params(self) -> int:
        """LoRA parameters (fused modules split into parts count their shared A once)."""
        seen: set[str] = set()
        total = 0
        for m in self.modules.values():
            total += int(m.B.numel())
            if m.name not in seen:
                seen.add(m.name)
                total += int(m.A.numel())
        return total
