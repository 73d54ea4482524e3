"""DELLA: drop by magnitude-ranked probabilities (MagPrune), rescale, elect signs, fuse.

Reference: Deep, Bhardwaj and Poria 2024, *DELLA-Merging: Reducing Interference in Model Merging
through Magnitude-Based Sampling* (code: ``declare-lab/della``, ``mergekit/mergekit/sparsify.py``
``rank_magnitude`` and ``merge_methods/__init__.py`` ``"della"``); mergekit ``della`` /
``della_linear`` (``mergekit/sparsify.py`` ``della_magprune``).

Formula, per module, on the dense task vectors ``tau_t = s_t B_t A_t`` (``(m, n)``):

1. **MagPrune**: within each row, rank the entries by ``|tau_t|`` ascending, ``rho = 1 .. n``;
   ``u = (rho - 1) / (n - 1)`` in ``[0, 1]``; keep probability
   ``p = (density - epsilon) + 2 epsilon u`` (the largest entry is kept with ``density + epsilon``,
   the smallest with ``density - epsilon``; mean ``density``); ``M_t ~ Bernoulli(p)`` entry-wise.
2. **Rescale** (``rescale="probability"``, the paper and its code): ``hat tau_t = M_t * tau_t / p``,
   so ``E[hat tau_t] = tau_t``. ``"l1"`` is mergekit's: ``M_t tau_t ||tau_t||_1 / ||M_t tau_t||_1``
   per module; ``"none"`` keeps ``M_t tau_t``.
3. **Elect** (``della``): ``gamma = sign(sum_t w_t hat tau_t)`` (+1 on ties); ``A = {t : sign(w_t hat
   tau_t) = gamma}``. **Fuse**: ``Delta = sum_{t in A} w_t hat tau_t / sum_{t in A} w_t`` (a
   divisor of 0 is replaced by 1), as the authors' code and mergekit do (election on the weighted
   deltas, ``normalize: true``), then times ``scaling`` (the paper's ``lambda``, mergekit's
   ``lambda``; default 1). The division cancels a common factor of the weights: use ``scaling``.
   ``della_linear`` (mergekit): no election, ``Delta = scaling * sum_t w_t hat tau_t``.

Masks are drawn per module from a generator seeded with
:func:`~geometry.merging.elementwise.module_seed` ``(seed, module)`` on the merge device (as DARE:
reproducible per device type, CPU and CUDA streams differ; ``params["mask_device"]`` records it).

Limits: ``0 < density - epsilon`` and ``density + epsilon <= 1`` are required (mergekit requires
``< 1``; a keep probability of exactly 1 is harmless here). A one-column module has no rank spread:
its ``u`` is set to ``1/2`` (``p = density``), where the authors' ``(rho - min)/(max - min)`` is
``0/0``. Magnitude ties are ranked in ``argsort`` order. Element-wise: one module is materialized
densely at a time and stored as its factors at the sum of the input ranks, or ``rank``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from geometry.errors import MergeParameterError
from geometry.merging.base import MergedAdapter, merge_device
from geometry.merging.dare import mask_generator
from geometry.merging.elementwise import check_density, elementwise_merge
from geometry.merging.weights import WeightsSpec
from geometry.types import Adapter

Rescale = Literal["probability", "l1", "none"]


def keep_probabilities(tau: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """MagPrune's per-entry keep probability: ``density - epsilon + 2 epsilon u`` (``u``: row rank in [0, 1])."""
    rows = tau.reshape(tau.shape[0], -1) if tau.dim() > 1 else tau.reshape(1, -1)
    n = rows.shape[1]
    rank = torch.argsort(torch.argsort(rows.abs(), dim=1), dim=1).to(torch.float64)  # 0 .. n-1
    u = rank / (n - 1) if n > 1 else torch.full_like(rank, 0.5)
    return ((density - epsilon) + 2.0 * epsilon * u).to(tau.dtype).reshape(tau.shape)


def magprune(
    tau: torch.Tensor, density: float, epsilon: float, generator: torch.Generator, rescale: Rescale = "probability"
) -> torch.Tensor:
    """One task vector pruned by MagPrune and rescaled (see the module docstring)."""
    p = keep_probabilities(tau, density, epsilon)
    mask = torch.bernoulli(p, generator=generator)
    kept = tau * mask
    if rescale == "probability":
        return kept / p
    if rescale == "l1":
        before, after = float(tau.abs().sum()), float(kept.abs().sum())
        return kept if before < 1e-7 or after < 1e-7 else kept * (before / after)
    return kept


def della_tensors(
    taus: torch.Tensor, weights: torch.Tensor, density: float, epsilon: float, generator: torch.Generator,
    rescale: Rescale = "probability", elect: bool = True,
) -> torch.Tensor:
    """DELLA on stacked ``taus (T, m, n)`` with weights ``(T,)``; masks drawn task after task from ``generator``."""
    pruned = torch.stack([magprune(t, density, epsilon, generator, rescale) for t in taus])
    w = weights.reshape(-1, *([1] * (taus.dim() - 1)))
    weighted = pruned * w
    if not elect:
        return weighted.sum(dim=0)
    elected = torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0).to(weighted.dtype)
    agree = (weighted.sign() == elected).to(weighted.dtype)
    divisor = (w * agree).sum(dim=0)
    divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    return (weighted * agree).sum(dim=0) / divisor


def check_della(density: float, epsilon: float, rescale: str) -> tuple[float, float]:
    density, epsilon = check_density(density), float(epsilon)
    if not 0.0 <= epsilon or not density - epsilon > 0.0 or density + epsilon > 1.0:
        raise MergeParameterError(
            f"epsilon must keep density +/- epsilon in (0, 1] (keep probabilities), got density={density}, "
            f"epsilon={epsilon}")
    if rescale not in ("probability", "l1", "none"):
        raise MergeParameterError(f"rescale must be 'probability', 'l1' or 'none', got {rescale!r}")
    return density, epsilon


def _merge(name, adapters, weights, density, epsilon, rescale, scaling, seed, elect, rank, keep_dense, dtype,
           device):
    density, epsilon = check_della(density, epsilon, rescale)
    dev = merge_device(device)

    def combine(taus, w, key):
        gen = mask_generator(seed, key, taus.device)
        return float(scaling) * della_tensors(taus, w, density, epsilon, gen, rescale, elect)

    return elementwise_merge(
        name, adapters, weights, 1.0, combine,
        {"density": density, "epsilon": epsilon, "rescale": rescale, "scaling": float(scaling), "seed": seed,
         "mask_device": dev.type},
        rank=rank, keep_dense=keep_dense, dtype=dtype, device=dev,
    )


def della(
    adapters: Sequence[Adapter],
    weights: WeightsSpec = None,
    *,
    density: float = 0.5,
    epsilon: float = 0.15,
    rescale: Rescale = "probability",
    scaling: float = 1.0,
    seed: int = 0,
    rank: int | None = None,
    keep_dense: bool = False,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> MergedAdapter:
    """DELLA: MagPrune (keep ``density +/- epsilon`` by row rank), rescale, sign election, weighted mean."""
    return _merge("della", adapters, weights, density, epsilon, rescale, scaling, seed, True, rank, keep_dense,
                  dtype, device)


def della_linear(
    adapters: Sequence[Adapter],
    weights: WeightsSpec = None,
    *,
    density: float = 0.5,
    epsilon: float = 0.15,
    rescale: Rescale = "probability",
    scaling: float = 1.0,
    seed: int = 0,
    rank: int | None = None,
    keep_dense: bool = False,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> MergedAdapter:
    """Linear DELLA: MagPrune and rescale, then the weighted sum (no election)."""
    return _merge("della_linear", adapters, weights, density, epsilon, rescale, scaling, seed, False, rank,
                  keep_dense, dtype, device)
