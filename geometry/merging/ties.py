"""TIES-merging: trim, elect sign, disjoint merge.

Reference: Yadav et al. 2023, *TIES-Merging: Resolving Interference When Merging Models*
(NeurIPS); peft ``utils/merge_utils.ties``; DivMerge's baseline (mask rate 0.2: keep the top 20%).

Formula, per module, on the dense task vectors ``tau_t = s_t B_t A_t``:

1. **Trim**: ``hat tau_t`` keeps the ``k = floor(density * m * n)`` entries of largest ``|tau_t|``
   (per module, as peft and mergekit do; the paper trims the whole flattened model), zeros the rest.
2. **Elect**: ``gamma = sign(sum_t hat tau_t)`` (``"total"``, the paper's mass vote; ``+1`` on ties)
   or ``sign(sum_t sign(hat tau_t))`` (``"frequency"``).
3. **Disjoint merge**: ``Delta = sum_{t in A} w_t hat tau_t / |A|`` entry-wise, with
   ``A = {t : sign(hat tau_t) = gamma}`` (entries nobody keeps stay 0).

With all ``w_t = lambda`` this is the paper's ``lambda * tau_m``; default ``w_t = 1``.

Limits: the election uses the unweighted trimmed vectors and the mean divides by the count of
agreeing tasks, as the paper and peft do; mergekit instead elects on ``w_t hat tau_t`` and divides
by ``sum_{t in A} w_t`` (its ``normalize``, on by default for ``ties``), which cancels a common
``lambda``. Element-wise: one module is materialized densely at a time (on the merge device) and
stored as its factors at the sum of the input ranks, or ``rank`` (:mod:`~geometry.merging.elementwise`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from geometry.errors import MergeParameterError
from geometry.merging.base import MergedAdapter
from geometry.merging.elementwise import check_density, elementwise_merge
from geometry.merging.weights import WeightsSpec
from geometry.types import Adapter

SignMethod = Literal["total", "frequency"]


def trim_top(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``floor(density * numel)`` largest-magnitude entries of ``tau``, zero the rest."""
    if density >= 1.0:
        return tau
    k = int(density * tau.numel())
    flat = tau.reshape(-1)
    mask = torch.zeros_like(flat)
    if k > 0:
        mask[torch.topk(flat.abs(), k=k, largest=True).indices] = 1.0
    return (flat * mask).reshape(tau.shape)


def elect_sign(taus: torch.Tensor, method: SignMethod = "total") -> torch.Tensor:
    """Boolean mask (T, ...) of entries whose sign agrees with the elected sign."""
    sign = taus.sign()
    if method == "total":
        mass = taus.sum(dim=0)
    elif method == "frequency":
        mass = sign.sum(dim=0)
    else:
        raise MergeParameterError(f"majority_sign_method must be 'total' or 'frequency', got {method!r}")
    elected = torch.where(mass >= 0, 1.0, -1.0).to(taus.dtype)
    return sign == elected


def disjoint_mean(weighted: torch.Tensor, agree: torch.Tensor) -> torch.Tensor:
    """``sum_t agree_t * x_t / max(1, sum_t agree_t)``."""
    count = agree.sum(dim=0).to(weighted.dtype).clamp(min=1.0)
    return (weighted * agree).sum(dim=0) / count


def ties_tensors(
    taus: torch.Tensor, weights: torch.Tensor, density: float, majority_sign_method: SignMethod = "total"
) -> torch.Tensor:
    """TIES on stacked task vectors ``taus (T, m, n)`` with weights ``(T,)``."""
    trimmed = torch.stack([trim_top(t, density) for t in taus])
    agree = elect_sign(trimmed, majority_sign_method)
    weighted = trimmed * weights.reshape(-1, *([1] * (taus.dim() - 1)))
    return disjoint_mean(weighted, agree)


def ties(
    adapters: Sequence[Adapter],
    weights: WeightsSpec = None,
    *,
    density: float = 0.2,
    majority_sign_method: SignMethod = "total",
    rank: int | None = None,
    keep_dense: bool = False,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> MergedAdapter:
    """TIES-merging of the adapters' task vectors (keep ``density`` of each); see module docstring."""
    density = check_density(density)
    if majority_sign_method not in ("total", "frequency"):
        raise MergeParameterError(f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}")
    return elementwise_merge(
        "ties", adapters, weights, 1.0,
        lambda taus, w, key: ties_tensors(taus, w, density, majority_sign_method),
        {"density": density, "majority_sign_method": majority_sign_method},
        rank=rank, keep_dense=keep_dense, dtype=dtype, device=device,
    )
