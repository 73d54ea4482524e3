"""Multi-SLERP: barycentric spherical interpolation of the task vectors.

Reference: Goddard, *Multi-SLERP* (goddard.blog, 2025), implemented as mergekit's ``multislerp``
(``mergekit/merge_methods/multislerp.py``) and used with weights ``1/T`` as a baseline by DivMerge.
With a base model, mergekit interpolates the task vectors ``theta_t - theta_0``; here those are
``tau_t = s_t B_t A_t`` per module.

Formula, per module, on flattened ``tau_t`` with weights normalised to ``sum w_t = 1``
(default ``1/T``) and ``eps = 1e-8``:

    u_t = tau_t / (||tau_t|| + eps)                      (project to the unit sphere)
    mu  = sum_t w_t u_t / ||sum_t w_t u_t||              (weighted Euclidean mean, re-normalised)
    v_t = u_t - <u_t, mu> mu                             (log map: tangent space at mu)
    v   = sum_t w_t v_t,   theta = ||v|| + eps
    Delta = (mu cos(theta) + v sin(theta) / theta) * sum_t w_t ||tau_t||   (exp map, mean norm)

Limits: undefined when ``sum_t w_t u_t = 0`` (antipodal task vectors with balancing weights):
two tasks fall back to the linear mix ``sum_t w_t tau_t`` as mergekit does, more raise
``ValueError``. A single adapter is returned unchanged. Only the weights' ratios matter.
Element-wise in the sense of needing dense vectors: one module is materialized at a time (on the
merge device) and stored as its factors at the sum of the input ranks, or ``rank``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from geometry.errors import MergeParameterError
from geometry.merging.base import MergedAdapter
from geometry.merging.elementwise import elementwise_merge
from geometry.merging.weights import WeightsSpec
from geometry.types import Adapter, ModuleKey

EPS = 1e-8


def multislerp_tensors(taus: torch.Tensor, weights: torch.Tensor, key: ModuleKey | None = None) -> torch.Tensor:
    """Multi-SLERP of stacked task vectors ``taus (T, m, n)`` with weights ``(T,)`` (normalised)."""
    if taus.shape[0] == 1:
        return taus[0]
    flat = taus.reshape(taus.shape[0], -1)
    total = float(weights.sum())
    if total == 0.0:
        raise MergeParameterError("multislerp weights sum to 0; they are normalised to sum to 1")
    w = (weights / total).to(flat.dtype)
    norms = flat.norm(dim=-1, keepdim=True)
    unit = flat / (norms + EPS)
    mean = (unit * w[:, None]).sum(0)
    mean_norm = mean.norm()
    if mean_norm < EPS:
        if taus.shape[0] == 2:
            return (w[0] * taus[0] + w[1] * taus[1]).reshape(taus.shape[1:])
        where = f" at module {key.label}" if key is not None else ""
        raise MergeParameterError(f"multislerp: the weighted mean of the unit task vectors is 0{where} (antipodal inputs)")
    mean = mean / mean_norm
    tangent = unit - (unit @ mean)[:, None] * mean
    v = (tangent * w[:, None]).sum(0)
    theta = v.norm() + EPS
    result = mean * torch.cos(theta) + v * (torch.sin(theta) / theta)
    return (result * (norms.squeeze(-1) * w).sum()).reshape(taus.shape[1:])


def multislerp(
    adapters: Sequence[Adapter],
    weights: WeightsSpec = None,
    *,
    rank: int | None = None,
    keep_dense: bool = False,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> MergedAdapter:
    """Multi-SLERP of the task vectors, per module (default weights ``1/T``); see module docstring."""
    n = len(adapters)
    return elementwise_merge(
        "multislerp", adapters, weights, 1.0 / max(n, 1), multislerp_tensors, {},
        rank=rank, keep_dense=keep_dense, dtype=dtype, device=device,
    )
