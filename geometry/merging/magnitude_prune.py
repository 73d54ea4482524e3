"""Magnitude pruning then task arithmetic.

Reference: peft ``utils/merge_utils.magnitude_prune`` (the trim step of TIES without the sign
election). mergekit registers no such method (its ``sparsify.magnitude`` is used by ``ties``, with
the sign consensus; ``breadcrumbs`` also drops the largest ``gamma`` fraction).

Formula, per module: ``Delta = sum_t w_t trim(tau_t, density)`` where ``trim`` keeps the
``floor(density * m * n)`` largest ``|tau_t|`` entries of that module (default ``w_t = 1``).

Limits: pruning is per module (peft / mergekit practice), not over the whole flattened model.
Element-wise: one module is materialized densely at a time (on the merge device) and stored as its
factors at the sum of the input ranks, or ``rank`` (:mod:`~geometry.merging.elementwise`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from geometry.merging.base import MergedAdapter
from geometry.merging.elementwise import check_density, elementwise_merge
from geometry.merging.ties import trim_top
from geometry.merging.weights import WeightsSpec
from geometry.types import Adapter


def magnitude_prune_tensors(taus: torch.Tensor, weights: torch.Tensor, density: float) -> torch.Tensor:
    """``sum_t w_t trim(tau_t)`` on stacked ``taus (T, m, n)``."""
    return sum(w * trim_top(t, density) for w, t in zip(weights, taus))


def magnitude_prune(
    adapters: Sequence[Adapter],
    weights: WeightsSpec = None,
    *,
    density: float = 0.2,
    rank: int | None = None,
    keep_dense: bool = False,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> MergedAdapter:
    """Keep the top ``density`` of each task vector (per module), then sum with weights."""
    density = check_density(density)
    return elementwise_merge(
        "magnitude_prune", adapters, weights, 1.0,
        lambda taus, w, key: magnitude_prune_tensors(taus, w, density),
        {"density": density}, rank=rank, keep_dense=keep_dense, dtype=dtype, device=device,
    )
