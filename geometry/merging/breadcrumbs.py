"""Model Breadcrumbs: drop each task vector's largest outliers and its smallest entries, then sum.

Reference: Davari and Belilovsky 2024, *Model Breadcrumbs: Scaling Multi-Task Model Merging with
Sparse Masks* (ECCV; code: ``rezazzr/breadcrumbs`` ``src/task_vectors.py``,
``TaskVectorMiddleKeep``); mergekit ``breadcrumbs`` / ``breadcrumbs_ties``
(``mergekit/sparsify.py`` ``magnitude_outliers``, registry in ``merge_methods/registry.py``).

Formula, per module, on the dense task vectors ``tau_t = s_t B_t A_t`` (``N = m n`` entries):

    n_top = floor(gamma N),   n_keep = floor(density N)   (n_top lowered to N - n_keep if needed)
    M_t   = 1 on the entries ranked n_top + 1 .. n_top + n_keep by |tau_t| (largest first), else 0
    breadcrumbs:       Delta = sum_t w_t M_t * tau_t
    breadcrumbs_ties:  Delta = sum_{t in A} w_t M_t * tau_t,  A = {t : sign(w_t M_t tau_t) = gamma_e}
                       gamma_e = sign(sum_u w_u M_u tau_u)  (+1 on ties), no division (mergekit's)

``density`` is the fraction kept and ``gamma`` the fraction of largest magnitudes removed first, as
in mergekit (defaults 0.9 and 0.01 here; mergekit's own default density is 1, which keeps
everything but the outliers). With ``per_row=True`` the ranking is done within each row of the
``(m, n)`` update, as the authors' code does (``topk`` along the last dimension,
``int(n * fraction)`` per row); the default ranks the whole module, as mergekit does.

Conventions that differ elsewhere:

- mergekit's ``magnitude_outliers`` keeps **nothing** when ``floor(gamma N) = 0`` (its slice
  ``indices[n_bot:-n_top]`` is empty for ``n_top = 0``): a module of fewer than ``1 / gamma``
  entries (100 at ``gamma = 0.01``) is zeroed there. Here ``n_top = 0`` removes no outlier.
- mergekit's ``breadcrumbs_ties`` elects the sign on the *weighted* masked deltas and sums the
  agreeing ones without dividing (its ``normalize: false``); this module does the same. Our
  ``ties`` follows the TIES paper and peft instead (election on unweighted vectors, mean over the
  agreeing count).
- The paper scales the sum by one coefficient ``alpha``; pass it as the weights (``w_t = alpha``).

Limits: element-wise, so one module is materialized densely at a time and stored as its factors at
the sum of the input ranks, or ``rank`` (:mod:`~geometry.merging.elementwise`). Magnitude ties are
broken by ``torch.sort``'s order (not stable): equal magnitudes at the cut can swap.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from geometry.errors import MergeParameterError
from geometry.merging.base import MergedAdapter
from geometry.merging.elementwise import check_density, elementwise_merge
from geometry.merging.weights import WeightsSpec
from geometry.types import Adapter


def _keep_count(total: int, density: float, gamma: float) -> tuple[int, int]:
    """``(n_top removed, n_keep kept)`` for ``total`` entries (``n_top`` lowered to fit)."""
    n_keep = int(density * total)
    n_top = min(int(gamma * total), total - n_keep)
    return n_top, n_keep


def breadcrumb_mask(tau: torch.Tensor, density: float, gamma: float, *, per_row: bool = False) -> torch.Tensor:
    """0/1 mask (``tau``'s dtype) of the entries ranked ``n_top + 1 .. n_top + n_keep`` by magnitude."""
    if density >= 1.0 and gamma <= 0.0:
        return torch.ones_like(tau)
    rows = tau.reshape(tau.shape[0], -1) if per_row else tau.reshape(1, -1)
    n_top, n_keep = _keep_count(rows.shape[1], density, gamma)
    order = torch.sort(rows.abs(), dim=1, descending=True).indices[:, n_top:n_top + n_keep]
    mask = torch.zeros_like(rows).scatter_(1, order, 1.0)
    return mask.reshape(tau.shape)


def check_gamma(gamma: float) -> float:
    gamma = float(gamma)
    if not 0.0 <= gamma < 1.0:
        raise MergeParameterError(f"gamma must be in [0, 1) (the fraction of largest magnitudes removed), got {gamma}")
    return gamma


def breadcrumbs_tensors(
    taus: torch.Tensor, weights: torch.Tensor, density: float, gamma: float, *, per_row: bool = False,
    elect: bool = False,
) -> torch.Tensor:
    """Breadcrumbs on stacked ``taus (T, m, n)``; ``elect`` adds mergekit's sign election (no division)."""
    masked = torch.stack([breadcrumb_mask(t, density, gamma, per_row=per_row) * t for t in taus])
    weighted = masked * weights.reshape(-1, *([1] * (taus.dim() - 1)))
    if not elect:
        return weighted.sum(dim=0)
    elected = torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0).to(weighted.dtype)
    return (weighted * (weighted.sign() == elected)).sum(dim=0)


def _merge(name: str, adapters, weights, density, gamma, per_row, elect, rank, keep_dense, dtype, device):
    density = check_density(density)
    gamma = check_gamma(gamma)
    return elementwise_merge(
        name, adapters, weights, 1.0,
        lambda taus, w, key: breadcrumbs_tensors(taus, w, density, gamma, per_row=per_row, elect=elect),
        {"density": density, "gamma": gamma, "per_row": bool(per_row)},
        rank=rank, keep_dense=keep_dense, dtype=dtype, device=device,
    )


def breadcrumbs(
    adapters: Sequence[Adapter],
    weights: WeightsSpec = None,
    *,
    density: float = 0.9,
    gamma: float = 0.01,
    per_row: bool = False,
    rank: int | None = None,
    keep_dense: bool = False,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> MergedAdapter:
    """Model Breadcrumbs: drop the top ``gamma`` and keep the next ``density`` of each task vector, sum."""
    return _merge("breadcrumbs", adapters, weights, density, gamma, per_row, False, rank, keep_dense, dtype, device)


def breadcrumbs_ties(
    adapters: Sequence[Adapter],
    weights: WeightsSpec = None,
    *,
    density: float = 0.9,
    gamma: float = 0.01,
    per_row: bool = False,
    rank: int | None = None,
    keep_dense: bool = False,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> MergedAdapter:
    """Breadcrumbs masks, then mergekit's sign election on the weighted deltas (agreeing ones summed)."""
    return _merge("breadcrumbs_ties", adapters, weights, density, gamma, per_row, True, rank, keep_dense, dtype,
                  device)
