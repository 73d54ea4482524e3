"""The result of a merge: :class:`MergedAdapter`, one :class:`MergedModule` per module key.

A merged module holds the merged update ``Delta`` of one linear map ``(out, in)``, either

- *factored*: ``Delta = B @ A`` with scale 1 (``B (m, k)``, ``A (k, n)``). Every method returns
  this form by default: the LoRA-level average (rank ``r``), exact task arithmetic (rank
  ``k = sum_t r_t``) and the element-wise methods (TIES, DARE, Multi-SLERP, magnitude pruning),
  whose dense result is replaced, module by module as it is computed, by its best rank-``k``
  factors with ``k`` = the sum of the inputs' ranks at that module (or the ``rank`` asked for);
  ``energy_kept`` is the fraction of ``||Delta||_F^2`` those factors keep;
- *dense*: the ``(m, n)`` matrix itself, only when an element-wise method is asked to
  ``keep_dense=True`` (tests, cross-checks against peft's dense merges, small models).

Tensors are stored on the CPU whatever device the merge ran on (:func:`merge_device`).
Each task keeps its own head: ``heads[adapter name]`` is that adapter's ``other_tensors``
(classification head, ``modules_to_save`` copies), untouched by the merge, as in both papers.

Writing a peft folder (:meth:`MergedAdapter.to_peft_folder`, :meth:`MergedAdapter.to_zip_bytes`)
lives in :mod:`geometry.merging.export`; the methods here delegate to it.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from geometry.device import default_device
from geometry.errors import IncompatibleAdaptersError, MergeParameterError
from geometry.io import hub  # light: huggingface_hub itself is imported on first use
from geometry.linalg.dora import dora_status
from geometry.merging import export
from geometry.merging.recipe import recipe_yaml
from geometry.merging.updates import PeftUpdate, factored_norm2, jsonable  # noqa: F401  (re-exported)
from geometry.types import Adapter, ModuleKey, row_index, row_stop

#: How the factored methods choose each module's rank (the element-wise ones: the sum of the input ranks).
RANK_RULES: dict[str, str] = {
    "lora_average": "the inputs' common rank",
    "task_arithmetic": "sum of the input ranks",
    "knots": "numerical rank of the concatenated task vectors",
    "core_space": "rank of the merged core",
    "tsv_m": "sum of the components kept per task",
    "iso_c": "rank of the task-arithmetic sum",
    "iso_cts": "common and task-specific directions kept",
}

#: Where merged tensors are kept between the merge and the export.
STORAGE_DEVICE = torch.device("cpu")


@dataclass
class MergedModule:
    """The merged update of one module key (one part of a fused projection when ``rows`` is set).

    Exactly one of ``(B, A)`` or ``delta`` is set. ``energy_kept`` is the fraction of the squared
    Frobenius norm kept when the update was truncated to a lower rank (1.0 when exact).
    ``rank_sum`` is the sum of the merged adapters' ranks at this module: the default rank of an
    element-wise merge's factors and of a dense module's export.
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
    rank_sum: int | None = None

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

    def norm2(self) -> float:
        """``||Delta||_F^2`` (factored: ``trace((B^T B)(A A^T))``, no ``m x n`` product)."""
        if self.delta is not None:
            return float(self.delta.double().pow(2).sum())
        return factored_norm2(self.B, self.A)


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
    #: The input adapters (every merge method sets them: what ``geometry.evaluate_merge`` needs for the
    #: fine-tuned scores); not part of the merge's identity, not saved, not pickled (a merge read back from
    #: a cache knows its sources by ``sources`` / ``source_hashes``; pass ``adapters=`` to score it).
    source_adapters: list[Adapter] | None = field(default=None, repr=False, compare=False)
    #: Scores measured for this merge (a ``geometry.evaluation.merge_eval.MergeEvaluation``), written in the model
    #: card (``README.md``) of every export unless the export is given ``scores=``; ``None``: "not measured".
    card_scores: Any = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["source_adapters"] = None  # the inputs' tensors stay out of caches and copies
        return state

    # ----------------------------------------------------------------------------------- queries
    @property
    def energy_kept(self) -> float:
        """Fraction of ``sum ||Delta||_F^2`` kept by truncation over all modules (1.0 when exact).

        Each module's update before truncation has ``||Delta||^2 = ||kept||^2 / energy_kept``.
        """
        kept = total = 0.0
        for mod in self.modules.values():
            norm2 = mod.norm2()
            total += norm2 / max(mod.energy_kept, 1e-300)
            kept += norm2
        return 1.0 if total == 0.0 else kept / total

    def energy_by_module(self) -> dict[str, float]:
        """``{module label: energy kept}`` (1.0 for an exact module), in module-key order."""
        return {key.label: float(mod.energy_kept) for key, mod in sorted(self.modules.items())}

    @property
    def content_hash(self) -> str:
        """sha256 of the sources' content hashes, the method and its parameters (cache key)."""
        payload = json.dumps(
            {"method": self.method, "params": jsonable(self.params), "sources": self.source_hashes},
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
        """``{peft module name: (B, A, 1.0) or dense}`` for ``geometry.evaluation.evaluate.apply_updates``."""
        return {name: up.as_update() for name, up in self.peft_updates().items()}

    def summary(self) -> dict[str, Any]:
        """JSON-ready description: counts, ranks, and the energy kept overall and per module.

        ``energy_kept`` is the fraction of ``sum_modules ||Delta||_F^2`` the stored factors keep
        (1.0 for exact merges); ``energy_kept_min`` the smallest per module;
        ``energy_kept_by_module`` maps each module label to its own fraction; ``rank_rule`` says
        how the rank of each module was chosen.
        """
        ranks = [m.rank for m in self.modules.values() if m.rank is not None]
        energy = self.energy_by_module()
        return {
            "method": self.method,
            "params": jsonable(self.params),
            "sources": list(self.sources),
            "n_modules": len(self.modules),
            "n_dense": sum(1 for m in self.modules.values() if not m.factored),
            "n_truncated": sum(1 for e in energy.values() if e < 1.0),
            "min_rank": min(ranks) if ranks else None,
            "max_rank": max(ranks) if ranks else None,
            "rank_rule": self.rank_rule,
            "energy_kept": self.energy_kept,
            "energy_kept_min": min(energy.values(), default=1.0),
            "energy_kept_by_module": energy,
            "heads": sorted(self.heads),
        }

    @property
    def rank_rule(self) -> str:
        """How each module's rank was chosen, in words (for summaries and the CLI)."""
        if self.params.get("keep_dense"):
            return "dense (kept)"
        rank = self.params.get("rank")
        if rank is not None:
            return f"at most {int(rank)}"
        return RANK_RULES.get(self.method, "sum of the input ranks")

    # ------------------------------------------------------------------------------------ output
    def to_peft_folder(self, path: str | Path, rank: int | None = None, head: str | None = None, *,
                       scores: Any = None, recipe: Any = None, license: str | None = None) -> Path:
        """Write a peft LoRA folder with its model card (``README.md``: ``scores``, a ``MergeEvaluation``, default
        :attr:`card_scores`; ``recipe``; ``license``); see :func:`geometry.merging.export.to_peft_folder`."""
        return export.to_peft_folder(self, path, rank=rank, head=head, scores=scores, recipe=recipe, license=license)

    def save(self, path: str | Path, rank: int | None = None, head: str | None = None, *,
             scores: Any = None, recipe: Any = None, license: str | None = None) -> Path:
        """Alias of :meth:`to_peft_folder` (the notebook API's ``m.save(path)``)."""
        return self.to_peft_folder(path, rank=rank, head=head, scores=scores, recipe=recipe, license=license)

    def to_zip_bytes(self, rank: int | None = None, head: str | None = None, *,
                     scores: Any = None, recipe: Any = None, license: str | None = None) -> bytes:
        """The :meth:`to_peft_folder` files as a zip; see :func:`geometry.merging.export.to_zip_bytes`."""
        return export.to_zip_bytes(self, rank=rank, head=head, scores=scores, recipe=recipe, license=license)

    def recipe(self, *, refs: Sequence[str] | None = None) -> str:
        """This merge's recipe as YAML (mergekit's shape; :mod:`geometry.merging.recipe`): ``refs`` name
        the adapters (default: their names); ``geometry.merge(adapters, recipe=...)`` replays it."""
        return recipe_yaml(self, refs=refs)

    def model_card(self, *, scores: Any = None, recipe: Any = None, license: str | None = None) -> str:
        """The Hub model card (``README.md`` text) of this merge; see :func:`geometry.merging.card.model_card`."""
        from geometry.merging.card import model_card

        return model_card(self, scores=scores, recipe=recipe, license=license)

    def push_to_hub(self, repo_id: str, *, token: str | None = None, private: bool = True,
                    commit_message: str | None = None, rank: int | None = None, head: str | None = None,
                    scores: Any = None, recipe: Any = None, license: str | None = None) -> str:
        """Upload this merge to the Hub model repository ``repo_id``; the repository's URL.

        Writes the :meth:`to_peft_folder` files (model card included) to a temporary folder and uploads them
        with ``huggingface_hub.HfApi``: ``create_repo(..., exist_ok=True)`` (``private`` when it is created)
        then ``upload_folder``. ``token``: a Hub token (default: ``huggingface_hub``'s own, e.g. ``HF_TOKEN``).
        A failure of the hub is one :class:`~geometry.errors.AtlasError` line.
        """
        with tempfile.TemporaryDirectory() as tmp:
            folder = self.to_peft_folder(Path(tmp) / "merged", rank=rank, head=head, scores=scores, recipe=recipe,
                                         license=license)
            message = commit_message or f"Upload {self.method} merge of {', '.join(self.sources)} (Adapter Atlas)"
            return hub.upload(str(folder), repo_id, token=token, private=private, commit_message=message)

    def _peft_payload(self, rank: int | None, head: str | None) -> tuple[dict, dict, dict]:
        return export.peft_payload(self, rank, head)


def _assemble(name: str, parts: list[MergedModule]) -> PeftUpdate:
    """Put the parts of one peft module back together (see :meth:`MergedAdapter.peft_updates`).

    ``rank_sum`` of a fused module is the sum over its parts (each part's default rank).
    """
    first = parts[0]
    flags = dict(is_embedding=first.is_embedding, fan_in_fan_out=first.fan_in_fan_out)
    if len(parts) == 1 and first.rows is None:
        return PeftUpdate(name, first.shape, first.B, first.A, first.delta, rank_sum=first.rank_sum, **flags)
    parts = sorted(parts, key=lambda p: p.rows or (0, p.shape[0]))
    m = max(row_stop(p.rows or (0, p.shape[0])) for p in parts)
    n = first.shape[1]
    sums = [p.rank_sum for p in parts]
    rank_sum = None if any(r is None for r in sums) else sum(sums)
    if any(not p.factored for p in parts):
        delta = torch.zeros(m, n, dtype=torch.float32)
        for p in parts:
            delta[row_index(p.rows or (0, p.shape[0]))] = p.dense(torch.float32)
        return PeftUpdate(name, (m, n), delta=delta, rank_sum=rank_sum, **flags)
    if all(p.A.shape == first.A.shape and torch.equal(p.A, first.A) for p in parts):
        B = torch.zeros(m, first.A.shape[0], dtype=first.B.dtype)
        for p in parts:
            B[row_index(p.rows or (0, p.shape[0]))] = p.B
        return PeftUpdate(name, (m, n), B, first.A, rank_sum=rank_sum, **flags)
    k = sum(p.A.shape[0] for p in parts)
    B = torch.zeros(m, k, dtype=first.B.dtype)
    col = 0
    for p in parts:
        B[row_index(p.rows or (0, p.shape[0])), col : col + p.A.shape[0]] = p.B
        col += p.A.shape[0]
    A = torch.cat([p.A for p in parts], dim=0)
    return PeftUpdate(name, (m, n), B, A, rank_sum=rank_sum, **flags)


# ------------------------------------------------------------------------------ input helpers
def merge_device(device: torch.device | str | None = None) -> torch.device:
    """The device a merge computes on: ``device``, else :func:`geometry.device.default_device`
    (CUDA when present, or ``ADAPTER_ATLAS_DEVICE``). Results are stored on the CPU."""
    return torch.device(device) if device is not None else default_device()


def check_rank(rank: int | None) -> int | None:
    """``None`` or a positive ``int``; ``ValueError`` otherwise."""
    if rank is None:
        return None
    if isinstance(rank, bool) or int(rank) != rank or int(rank) < 1:
        raise MergeParameterError(f"rank must be a positive integer, got {rank}")
    return int(rank)


def stored(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` as kept in a :class:`MergedModule`: on the CPU, in ``dtype``."""
    return t.detach().to(device=STORAGE_DEVICE, dtype=dtype)


def factored_module(first, key: ModuleKey, B: torch.Tensor, A: torch.Tensor, dtype: torch.dtype, kept: float = 1.0,
                    rank_sum: int | None = None) -> MergedModule:
    """The factored :class:`MergedModule` ``B @ A`` of ``key``, laid out like ``first`` (the module's template)."""
    return MergedModule(
        name=first.name, key=key, shape=first.shape, B=stored(B, dtype), A=stored(A, dtype), rows=first.rows,
        is_embedding=first.is_embedding, fan_in_fan_out=first.fan_in_fan_out, energy_kept=kept, rank_sum=rank_sum,
    )


def check_mergeable(adapters: Sequence[Adapter]) -> None:
    """Raise :class:`IncompatibleAdaptersError` for inputs no merge can combine.

    At least one adapter; one base model (when the configs name one); the same ``(m, n)`` shape for
    every module key present in several adapters; no DoRA adapter holding only its LoRA direction (its
    update depends on ``W0``, cf. peft issue #3761): :func:`geometry.linalg.dora.resolve_dora` with the
    base weights first, after which its exact updates are merged like any LoRA update.
    """
    if not adapters:
        raise IncompatibleAdaptersError("nothing to merge: give at least one adapter")
    bases = {a.name: a.config.base_model_name_or_path for a in adapters if a.config.base_model_name_or_path}
    if len(set(bases.values())) > 1:
        listed = ", ".join(f"{n}: {b}" for n, b in bases.items())
        raise IncompatibleAdaptersError(f"adapters are fine-tuned from different base models ({listed})")
    shapes: dict[ModuleKey, tuple[str, tuple[int, int]]] = {}
    for ad in adapters:
        if dora_status(ad) == "direction":
            raise IncompatibleAdaptersError(
                f"{ad.name}: DoRA adapter (use_dora) with its LoRA direction only; its update "
                "m (W0 + s B A) / ||W0 + s B A||_row - W0 depends on the base weights W0: attach them with "
                "geometry.linalg.dora.resolve_dora(adapter, base) to merge its exact updates"
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
            a.name: {"modules_to_save": a.config.modules_to_save, "task_type": a.config.task_type,
                     **({"dora": "exact"} if dora_status(a) == "exact" else {})} for a in adapters
        },
        source_adapters=list(adapters),
    )
