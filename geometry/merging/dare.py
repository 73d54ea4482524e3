"""DARE: Drop And REscale, then a linear sum (``dare_linear``) or TIES' sign election (``dare_ties``).

Reference: Yu et al. 2024, *Language Models are Super Mario: Absorbing Abilities from Homologous
Models as a Free Lunch* (ICML; code: ``yule-BUAA/MergeLM``); peft ``utils/merge_utils.dare_linear``
/ ``dare_ties`` (the same formulas as here); mergekit ``dare_linear`` / ``dare_ties`` (different
rescaling and mixing, see below).

Formula, per module, on the dense task vectors ``tau_t = s_t B_t A_t``, with drop probability
``p = 1 - density``:

    hat tau_t = m_t * tau_t / (1 - p),   m_t ~ Bernoulli(1 - p) entry-wise (so E[hat tau_t] = tau_t)
    dare_linear:  Delta = sum_t w_t hat tau_t
    dare_ties:    Delta = sum_{t in A} w_t hat tau_t / |A|   entry-wise,
                  A = {t : sign(hat tau_t) = sign(sum_u hat tau_u)}   (peft's dare_ties)

Steps: per module, draw one mask per task from a ``torch.Generator`` on the merge device
(:func:`~geometry.merging.base.merge_device`, CUDA when present) seeded with
:func:`~geometry.merging.elementwise.module_seed` ``(seed, module)``: the result depends on
``seed`` and the device type only, not on the order modules are visited. Masks are drawn as
``torch.bernoulli(full((m, n), density, float32), generator)`` task after task, which on the CPU is
exactly what peft draws from the global generator, so seeding peft with the same per-module seed
reproduces its ``dare_*_svd`` masks (tested with ``device="cpu"``). **CPU and CUDA masks differ**
for the same seed (different generators); each device is reproducible on its own, and the device
type is recorded in ``params["mask_device"]`` so that cached results of the two never mix.
The merged module is then stored as its factors at the sum of the input ranks (or ``rank``), see
:mod:`~geometry.merging.elementwise`.

How other implementations differ (read from their sources; mergekit: ``arcee-ai/mergekit``
``mergekit/sparsify.py``, ``mergekit/merge_methods/generalized_task_arithmetic.py`` and
``registry.py`` in v0.1.4 and on main at commit ``a6e4028``, June 2026):

- **mergekit's rescale is an L1-norm ratio, not 1/density** (since v0.1.0, commit ``a2dda31`` of
  February 2025): ``rescale: true``, the default of its ``dare_linear`` and ``dare_ties``, maps to
  ``RescaleNorm.l1``, so ``hat tau_t = m_t * tau_t * ||tau_t||_1 / ||m_t * tau_t||_1`` per tensor
  (no rescale when either norm is below ``1e-7``): a data-dependent factor close to, but not
  equal to, ``1 / density``. mergekit up to v0.0.6 divided by ``density`` as here and peft do.
- **mergekit's dare_ties sums the agreeing deltas without dividing**: its ``normalize`` defaults
  to false for ``dare_ties`` (true for ``ties``), so ``Delta = sum_{t in A} w_t hat tau_t``, with
  the sign elected on the *weighted* ``w_t hat tau_t`` (``consensus_method: sum``); with
  ``normalize: true`` it divides by ``sum_{t in A} w_t``, not by ``|A|``. Here (and in peft) the
  sign is elected on the unweighted ``hat tau_t`` and the sum is divided by the count ``|A|``.
- **The DARE paper's DARE + TIES keeps TIES's own magnitude trim**: MergeLM's ``mask_merging``
  with ``mask_apply_method="ties_merging"`` first drops and rescales by ``1 / (1 - p)``, then runs
  the whole TIES-merging, trim included (``param_value_mask_rate``, default 0.8: keep the top 20%
  of each model's flattened task vector), sign election and disjoint mean, times a scaling
  coefficient. peft's, mergekit's and this ``dare_ties`` skip that second trim.

Limits: random; ``density = 1`` gives plain task arithmetic (``dare_linear``) or TIES without
trimming (``dare_ties``). Element-wise: one module is materialized densely at a time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from geometry.errors import MergeParameterError
from geometry.merging.base import MergedAdapter, merge_device
from geometry.merging.elementwise import check_density, elementwise_merge, module_seed
from geometry.merging.ties import SignMethod, disjoint_mean, elect_sign
from geometry.merging.weights import WeightsSpec
from geometry.types import Adapter


def drop_and_rescale(taus: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """``m_t * tau_t / density`` with ``m_t ~ Bernoulli(density)``, one mask per task, in order.

    The masks are drawn on ``taus``' device; ``generator`` must live on that device.
    """
    if density >= 1.0:
        return taus
    out = []
    for tau in taus:
        prob = torch.full(tau.shape, density, dtype=torch.float32, device=tau.device)
        mask = torch.bernoulli(prob, generator=generator)
        out.append(tau * mask.to(tau.dtype) / density)
    return torch.stack(out)


def mask_generator(seed: int, key, device: torch.device) -> torch.Generator:
    """The seeded generator of one module's masks, on ``device`` (CPU and CUDA streams differ)."""
    return torch.Generator(device=device).manual_seed(module_seed(seed, key))


def _weighted(taus: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return taus * weights.reshape(-1, *([1] * (taus.dim() - 1)))


def dare_linear(
    adapters: Sequence[Adapter],
    weights: WeightsSpec = None,
    *,
    density: float = 0.5,
    seed: int = 0,
    rank: int | None = None,
    keep_dense: bool = False,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> MergedAdapter:
    """DARE then weighted sum (default ``w_t = 1``, ``density = 0.5``); see module docstring."""
    density = check_density(density)
    dev = merge_device(device)

    def combine(taus, w, key):
        dropped = drop_and_rescale(taus, density, mask_generator(seed, key, taus.device))
        return _weighted(dropped, w).sum(dim=0)

    return elementwise_merge(
        "dare_linear", adapters, weights, 1.0, combine,
        {"density": density, "seed": seed, "mask_device": dev.type},
        rank=rank, keep_dense=keep_dense, dtype=dtype, device=dev,
    )


def dare_ties(
    adapters: Sequence[Adapter],
    weights: WeightsSpec = None,
    *,
    density: float = 0.5,
    seed: int = 0,
    majority_sign_method: SignMethod = "total",
    rank: int | None = None,
    keep_dense: bool = False,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> MergedAdapter:
    """DARE then TIES' sign election and disjoint mean (no second trim); see module docstring."""
    density = check_density(density)
    if majority_sign_method not in ("total", "frequency"):
        raise MergeParameterError(f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}")
    dev = merge_device(device)

    def combine(taus, w, key):
        dropped = drop_and_rescale(taus, density, mask_generator(seed, key, taus.device))
        return disjoint_mean(_weighted(dropped, w), elect_sign(dropped, majority_sign_method))

    return elementwise_merge(
        "dare_ties", adapters, weights, 1.0, combine,
        {"density": density, "seed": seed, "majority_sign_method": majority_sign_method,
         "mask_device": dev.type},
        rank=rank, keep_dense=keep_dense, dtype=dtype, device=dev,
    )
