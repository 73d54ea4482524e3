"""DARE: Drop And REscale, then a linear sum (``dare_linear``) or TIES' sign election (``dare_ties``).

Reference: Yu et al. 2024, *Language Models are Super Mario: Absorbing Abilities from Homologous
Models as a Free Lunch* (ICML); peft ``utils/merge_utils.dare_linear`` / ``dare_ties``; mergekit
``dare_linear`` / ``dare_ties``.

Formula, per module, on the dense task vectors ``tau_t = s_t B_t A_t``, with drop probability
``p = 1 - density``:

    hat tau_t = m_t * tau_t / (1 - p),   m_t ~ Bernoulli(1 - p) entry-wise (so E[hat tau_t] = tau_t)
    dare_linear:  Delta = sum_t w_t hat tau_t
    dare_ties:    Delta = disjoint_mean_{t agreeing with sign(sum_t hat tau_t)} (w_t hat tau_t)

Steps: per module, draw one mask per task from a ``torch.Generator`` seeded with
:func:`~geometry.merging.elementwise.module_seed` ``(seed, module)``: the result depends on
``seed`` only, not on the order modules are visited. Masks are drawn as
``torch.bernoulli(full((m, n), density, float32), generator)`` task after task, which is exactly
what peft draws from the global generator, so seeding peft with the same per-module seed
reproduces its ``dare_*_svd`` masks (tested).

Limits: random; ``density = 1`` gives plain task arithmetic (``dare_linear``) or TIES without
trimming (``dare_ties``). Element-wise: one module is materialized densely at a time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from geometry.merging.base import MergedAdapter
from geometry.merging.elementwise import check_density, elementwise_merge, module_seed
from geometry.merging.ties import SignMethod, disjoint_mean, elect_sign
from geometry.merging.weights import WeightsSpec
from geometry.types import Adapter


def drop_and_rescale(taus: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """``m_t * tau_t / density`` with ``m_t ~ Bernoulli(density)``, one mask per task, in order."""
    if density >= 1.0:
        return taus
    out = []
    for tau in taus:
        mask = torch.bernoulli(torch.full(tau.shape, density, dtype=torch.float32), generator=generator)
        out.append(tau * mask.to(tau.dtype) / density)
    return torch.stack(out)


def _weighted(taus: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return taus * weights.reshape(-1, *([1] * (taus.dim() - 1)))


def dare_linear(
    adapters: Sequence[Adapter],
    weights: WeightsSpec = None,
    *,
    density: float = 0.5,
    seed: int = 0,
    rank: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> MergedAdapter:
    """DARE then weighted sum (default ``w_t = 1``, ``density = 0.5``); see module docstring."""
    density = check_density(density)

    def combine(taus, w, key):
        gen = torch.Generator().manual_seed(module_seed(seed, key))
        return _weighted(drop_and_rescale(taus, density, gen), w).sum(dim=0)

    return elementwise_merge(
        "dare_linear", adapters, weights, 1.0, combine, {"density": density, "seed": seed}, rank=rank, dtype=dtype
    )


def dare_ties(
    adapters: Sequence[Adapter],
    weights: WeightsSpec = None,
    *,
    density: float = 0.5,
    seed: int = 0,
    majority_sign_method: SignMethod = "total",
    rank: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> MergedAdapter:
    """DARE then TIES' sign election and disjoint mean; see module docstring."""
    density = check_density(density)
    if majority_sign_method not in ("total", "frequency"):
        raise ValueError(f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}")

    def combine(taus, w, key):
        gen = torch.Generator().manual_seed(module_seed(seed, key))
        dropped = drop_and_rescale(taus, density, gen)
        return disjoint_mean(_weighted(dropped, w), elect_sign(dropped, majority_sign_method))

    return elementwise_merge(
        "dare_ties", adapters, weights, 1.0, combine,
        {"density": density, "seed": seed, "majority_sign_method": majority_sign_method},
        rank=rank, dtype=dtype,
    )
