"""Driver shared by the element-wise merges (TIES, DARE, Multi-SLERP, magnitude pruning).

These methods act on individual entries of the task vectors, so each module's task vectors
``tau_t = s_t B_t A_t`` are materialized as dense ``(m, n)`` matrices (float64) **one module at a
time**, on the merge device (:func:`~geometry.merging.base.merge_device`: CUDA when present),
combined, and the merged ``(m, n)`` update is replaced at once by its rank-``k`` factors
(:func:`~geometry.merging.truncate.factorize_dense`) with ``k = rank`` if given, else the sum of
the inputs' ranks at that module (``MergedModule.rank_sum``); the factors go to the CPU and the
dense matrices are dropped before the next module. Peak memory is therefore one module's task
vectors, the method's temporaries and the merged update (a few GB in float64 for four Llama-3-8B
``gate_proj`` adapters), not a whole model's dense updates (about 28 GB in float32 for
Llama-3-8B). ``energy_kept`` per module reports the
fraction of ``||Delta||_F^2`` the factors keep. ``keep_dense=True`` stores the dense update
instead (on the CPU): for tests, cross-checks and small models only.

Adapters lacking a module are left out of that module's combination (a zero task vector
contributes nothing to sums, is never elected by TIES and has no direction for Multi-SLERP).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import torch

from geometry.errors import MergeParameterError
from geometry.merging.base import (
    MergedAdapter,
    MergedModule,
    all_keys,
    check_mergeable,
    check_rank,
    iter_present,
    merge_device,
    stored,
    template,
    wrap,
)
from geometry.merging.truncate import factorize_dense
from geometry.merging.weights import MergeWeights, WeightsSpec
from geometry.types import Adapter, ModuleKey

#: ``combine(taus (T, m, n) float64, weights (T,) float64, key) -> (m, n)``, on the taus' device
Combine = Callable[[torch.Tensor, torch.Tensor, ModuleKey], torch.Tensor]


def module_seed(seed: int, key: ModuleKey) -> int:
    """A per-module seed derived from ``seed`` and the module label (order independent)."""
    digest = hashlib.sha256(f"{int(seed)}:{key.label}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def check_density(density: float) -> float:
    density = float(density)
    if not 0.0 < density <= 1.0:
        raise MergeParameterError(f"density must be in (0, 1] (the fraction of entries kept), got {density}")
    return density


def elementwise_merge(
    method: str,
    adapters: Sequence[Adapter],
    weights: WeightsSpec,
    default_weight: float,
    combine: Combine,
    params: dict[str, Any],
    *,
    rank: int | None = None,
    keep_dense: bool = False,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> MergedAdapter:
    """Run ``combine`` on each module's stacked dense task vectors; see the module docstring."""
    check_mergeable(adapters)
    rank = check_rank(rank)
    dev = merge_device(device)
    w = MergeWeights(weights, len(adapters), default=default_weight)
    modules: dict[ModuleKey, MergedModule] = {}
    for key in all_keys(adapters):
        present = list(iter_present(adapters, key))
        first = template(adapters, key)
        rank_sum = sum(mod.rank for _, mod in present)
        common = dict(
            name=first.name, key=key, shape=first.shape, rows=first.rows, rank_sum=rank_sum,
            is_embedding=first.is_embedding, fan_in_fan_out=first.fan_in_fan_out,
        )
        delta = _merged_dense(combine, present, w.at(key), key, dev)  # the one (m, n) update alive
        if keep_dense:
            modules[key] = MergedModule(delta=stored(delta, dtype), **common)
        else:
            k = rank if rank is not None else rank_sum
            B, A, kept = factorize_dense(delta, k, seed=module_seed(0, key))
            modules[key] = MergedModule(B=stored(B, dtype), A=stored(A, dtype), energy_kept=kept, **common)
            del B, A
        del delta
    return wrap(method, {**params, "weights": w.describe(), "rank": rank, "keep_dense": bool(keep_dense)},
                adapters, modules)


def _merged_dense(
    combine: Combine, present: list, wk: list[float], key: ModuleKey, dev: torch.device
) -> torch.Tensor:
    """``combine`` of the present adapters' dense task vectors at ``key``, computed on ``dev``."""
    taus = torch.stack([
        mod.scale * (mod.B.to(device=dev, dtype=torch.float64) @ mod.A.to(device=dev, dtype=torch.float64))
        for _, mod in present
    ])
    wt = torch.tensor([wk[t] for t, _ in present], dtype=torch.float64, device=dev)
    return combine(taus, wt, key)
