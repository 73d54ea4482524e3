"""Driver shared by the element-wise merges (TIES, DARE, Multi-SLERP, magnitude pruning).

These methods act on individual entries of the task vectors, so each module's task vectors
``tau_t = s_t B_t A_t`` are materialized as dense ``(m, n)`` matrices (float64) **one module at a
time**, combined, and dropped before the next module. The merged module is kept dense, or, with
``rank=R``, replaced at once by its best rank-``R`` factors (full SVD of that module, energy kept
reported), so a whole model's dense updates never coexist.

Adapters lacking a module are left out of that module's combination (a zero task vector
contributes nothing to sums, is never elected by TIES and has no direction for Multi-SLERP).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import torch

from geometry.merging.base import (
    MergedAdapter,
    MergedModule,
    all_keys,
    check_mergeable,
    iter_present,
    template,
    wrap,
)
from geometry.merging.truncate import factorize_dense
from geometry.merging.weights import MergeWeights, WeightsSpec
from geometry.types import Adapter, ModuleKey

#: ``combine(taus (T, m, n) float64, weights (T,) float64, key) -> (m, n)``
Combine = Callable[[torch.Tensor, torch.Tensor, ModuleKey], torch.Tensor]


def module_seed(seed: int, key: ModuleKey) -> int:
    """A per-module seed derived from ``seed`` and the module label (order independent)."""
    digest = hashlib.sha256(f"{int(seed)}:{key.label}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def check_density(density: float) -> float:
    density = float(density)
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1] (the fraction of entries kept), got {density}")
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
    dtype: torch.dtype = torch.float32,
) -> MergedAdapter:
    """Run ``combine`` on each module's stacked dense task vectors; see the module docstring."""
    check_mergeable(adapters)
    if rank is not None and int(rank) < 1:
        raise ValueError(f"rank must be a positive integer, got {rank}")
    w = MergeWeights(weights, len(adapters), default=default_weight)
    modules: dict[ModuleKey, MergedModule] = {}
    for key in all_keys(adapters):
        wk = w.at(key)
        present = list(iter_present(adapters, key))
        taus = torch.stack([mod.dense(torch.float64) for _, mod in present])
        wt = torch.tensor([wk[t] for t, _ in present], dtype=torch.float64)
        delta = combine(taus, wt, key)
        del taus
        first = template(adapters, key)
        common = dict(
            name=first.name, key=key, shape=first.shape, rows=first.rows,
            is_embedding=first.is_embedding, fan_in_fan_out=first.fan_in_fan_out,
        )
        if rank is None:
            modules[key] = MergedModule(delta=delta.to(dtype), **common)
        else:
            B, A, kept = factorize_dense(delta, int(rank))
            modules[key] = MergedModule(B=B.to(dtype), A=A.to(dtype), energy_kept=kept, **common)
    return wrap(method, {**params, "weights": w.describe(), "rank": rank}, adapters, modules)
