"""Exact task arithmetic on LoRA task vectors, kept factored.

Reference: Ilharco et al. 2023, *Editing models with task arithmetic*; DivMerge (2025) section 3
(task level TL: one ``lambda_t``; layer level LL: one ``lambda_{t,l}``).

Formula, per module (``s_t`` the adapter's own scale, ``tau_t = s_t B_t A_t``)::

    Delta = sum_t lambda_t s_t B_t A_t = [l_1 s_1 B_1, ..., l_T s_T B_T] @ [A_1; ...; A_T]

The concatenated factors have rank ``sum_t r_t`` and represent ``Delta`` exactly: the ``m x n``
matrix is never formed. ``rank=R`` truncates each module to its best rank-``R`` approximation by
the factored SVD (QR of both factors, ``sum r_t``-sized core; :mod:`geometry.merging.truncate`),
and ``energy_kept`` reports ``sum_{i<=R} S_i^2 / sum S_i^2`` per module.

Steps: per module key, stack ``lambda_t s_t B_t`` column-wise and ``A_t`` row-wise over the adapters
that have the module (a missing module contributes 0), on the merge device
(:func:`~geometry.merging.base.merge_device`); optionally truncate; store on the CPU.

Limits: none on ranks (they may differ); the default ``lambda_t = 1`` is the plain sum (pass
``1/T`` for the average of task vectors, DivMerge's "model averaging" baseline).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from geometry.merging.base import (
    MergedAdapter,
    all_keys,
    check_mergeable,
    check_rank,
    factored_module,
    iter_present,
    merge_device,
    template,
    wrap,
)
from geometry.merging.truncate import truncate_factored
from geometry.merging.weights import MergeWeights, WeightsSpec
from geometry.types import Adapter


def task_arithmetic(
    adapters: Sequence[Adapter],
    weights: WeightsSpec = None,
    *,
    rank: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> MergedAdapter:
    """``sum_t lambda_t s_t B_t A_t`` per module, factored (rank sum) or truncated to ``rank``."""
    check_mergeable(adapters)
    rank = check_rank(rank)
    dev = merge_device(device)
    w = MergeWeights(weights, len(adapters), default=1.0)
    modules: dict = {}
    for key in all_keys(adapters):
        wk = w.at(key)
        Bs, As = [], []
        for t, mod in iter_present(adapters, key):
            Bs.append((wk[t] * mod.scale) * mod.B.to(device=dev, dtype=torch.float64))
            As.append(mod.A.to(device=dev, dtype=torch.float64))
        B, A = torch.cat(Bs, dim=1), torch.cat(As, dim=0)
        rank_sum = int(A.shape[0])
        kept = 1.0
        if rank is not None and rank_sum > rank:
            B, A, kept = truncate_factored(B, A, rank, device=dev)
        modules[key] = factored_module(template(adapters, key), key, B, A, dtype, kept, rank_sum)
    return wrap("task_arithmetic", {"weights": w.describe(), "rank": rank}, adapters, modules)
