"""Rank per module, truncation to a rank or an energy, and per-module merge compatibility: the answers
tools such as gradience give (energy ranks, knee, optimal hard threshold; truncation; subspace overlap and
magnitude balance), computed exactly from the factors.

Per module, the exact singular values ``S_1 >= ... >= S_rho > 0`` of ``tau = s B A`` come from
:func:`geometry.linalg.factored.lowrank_svd` (QR of ``B`` and ``A^T``, SVD of the ``r x r`` core; never
the ``m x n`` matrix):

- **energy rank** ``k_E = min{k : sum_{i<=k} S_i^2 >= E sum_i S_i^2}`` (the rank that keeps a fraction
  ``E`` of ``||tau||_F^2``);
- **knee**: ``argmax_k |y_k - k / rho|`` with ``y_k`` the cumulative energy fraction (the elbow of the
  energy curve against a flat spectrum; Thibeault et al. 2024, as gradience computes it);
- **optimal hard threshold** (Gavish & Donoho 2014, unknown noise): the count of ``S_i > omega(beta)
  median(S)`` with ``beta = min(m, n) / max(m, n)`` and ``omega(beta) = 0.56 beta^3 - 0.95 beta^2 + 1.82
  beta + 1.43``. Limit: the rule is asymptotic for a large noisy matrix; a LoRA update has only ``r``
  singular values, so the median is taken over those ``r``: a heuristic here, as in gradience, not a
  noise estimate.

:func:`compress` keeps, per module, the top ``R`` triplets (``rank=R``) or the top ``k_E`` (``energy=E``):
``B' = U_k S_k``, ``A' = V_k^T`` (Eckart-Young: the best rank-``k`` approximation), reporting the energy kept
``sum_{i<=k} S_i^2 / sum_i S_i^2`` per module and overall; the result is a
:class:`~geometry.merging.MergedAdapter` of one adapter (it writes a peft folder with its card).

:func:`compatibility` describes, per module shared by several adapters, the **subspace overlap** (the mean
over pairs of TSV-M's overlap, the mean squared cosine of the principal angles of the column and row spaces,
in [0, 1]: :func:`geometry.merging.tsv.pair_interference`) and the **magnitude balance** (each adapter's
share of ``sum_t ||tau_t||_F``; the dominant adapter and its share). The labels it adds ("overlapping"
when the overlap is at least ``OVERLAP_HIGH``, "dominated by X" when one share is at least
``DOMINANT_SHARE``) are reading aids with thresholds chosen here, not tested predictions of merge loss.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from geometry.errors import InvalidArgumentError
from geometry.linalg.factored import lowrank_svd
from geometry.merging.base import MergedModule, all_keys, stored, wrap
from geometry.merging.truncate import energy_kept
from geometry.merging.tsv import pair_interference, task_svds
from geometry.types import Adapter

#: ``compatibility`` labels: overlap at or above this is "overlapping"; a share at or above this "dominated"
OVERLAP_HIGH = 0.5
DOMINANT_SHARE = 0.75


def energy_rank(S: torch.Tensor, energy: float) -> int:
    """Smallest ``k`` whose top-``k`` singular values keep ``energy`` of ``sum S^2`` (0 for a zero update)."""
    s2 = S.double().pow(2)
    total = float(s2.sum())
    if total == 0.0:
        return 0
    cum = torch.cumsum(s2, 0) / total
    return int(torch.searchsorted(cum, torch.tensor([energy - 1e-12], dtype=torch.float64)).item()) + 1


def knee_rank(S: torch.Tensor) -> int:
    """``argmax_k |y_k - k / rho| + 1`` over the nonzero singular values (1 when at most one)."""
    s = S[S > 0].double()
    if s.numel() <= 1:
        return int(s.numel())
    n = s.numel()
    x = torch.arange(1, n + 1, dtype=torch.float64) / n
    y = torch.cumsum(s.pow(2), 0) / s.pow(2).sum()
    return int((y - x).abs().argmax().item()) + 1


def hard_threshold_rank(S: torch.Tensor, shape: tuple[int, int]) -> int:
    """Gavish-Donoho's unknown-noise rule on the nonzero singular values (see the module docstring)."""
    s = S[S > 0].double()
    if s.numel() <= 1:
        return int(s.numel())
    beta = min(shape) / max(shape)
    omega = 0.56 * beta**3 - 0.95 * beta**2 + 1.82 * beta + 1.43
    return int((s > omega * float(s.median())).sum().item())


def rank_table(adapter: Adapter, *, energy: float = 0.9) -> pd.DataFrame:
    """One row per module of ``adapter``: its rank ``r``, numerical rank, the energy rank at ``energy`` and at
    0.99, knee, hard-threshold rank, and the energy the knee keeps (columns named by what they measure)."""
    _check_energy(energy)
    rows = []
    for key, mod in sorted(adapter.modules.items(), key=lambda kv: kv[0].order):
        svd = lowrank_svd(mod.B, mod.A, float(mod.scale))
        S = svd.S
        knee = knee_rank(S)
        rows.append({
            "adapter": adapter.name, "module": key.label, "stack": key.stack, "layer": key.layer, "kind": key.kind,
            "shape": f"{mod.shape[0]}x{mod.shape[1]}", "r": int(mod.rank), "numerical rank": int(svd.rank),
            f"rank for {100 * energy:g}% energy": energy_rank(S, energy), "rank for 99% energy": energy_rank(S, 0.99),
            "knee": knee, "hard threshold": hard_threshold_rank(S, tuple(mod.shape)),
            "energy at knee": energy_kept(S, knee),
        })
    return pd.DataFrame(rows)


def _check_energy(energy: float) -> None:
    if not 0.0 < float(energy) <= 1.0:
        raise InvalidArgumentError(f"energy must be in (0, 1] (the fraction of ||tau||_F^2 kept), got {energy}")


def compress(adapter: Adapter, *, rank: int | None = None, energy: float | None = None,
             dtype: torch.dtype = torch.float32):
    """``adapter`` truncated per module to ``rank`` or to the energy rank of ``energy`` (exactly one of them);
    a :class:`~geometry.merging.MergedAdapter` (method ``"compress"``) whose ``energy_by_module()`` and
    ``energy_kept`` report what each truncation keeps. Heads are kept."""
    if (rank is None) == (energy is None):
        raise InvalidArgumentError("compress: give exactly one of rank= or energy=")
    if rank is not None and int(rank) < 1:
        raise InvalidArgumentError(f"compress: rank must be a positive integer, got {rank}")
    if energy is not None:
        _check_energy(energy)
    modules = {}
    for key, mod in adapter.modules.items():
        svd = lowrank_svd(mod.B, mod.A, float(mod.scale))
        S = svd.S
        k = min(int(rank), int(svd.rank)) if rank is not None else energy_rank(S, float(energy))
        k = max(k, 1)
        B, A = svd.U[:, :k] * S[:k], svd.V[:, :k].T.contiguous()
        modules[key] = MergedModule(name=mod.name, key=key, shape=mod.shape, rows=mod.rows, rank_sum=int(mod.rank),
                                    is_embedding=mod.is_embedding, fan_in_fan_out=mod.fan_in_fan_out,
                                    B=stored(B, dtype), A=stored(A, dtype), energy_kept=energy_kept(S, k))
    params = {"rank": None if rank is None else int(rank), "energy": None if energy is None else float(energy)}
    return wrap("compress", params, [adapter], modules)


def compatibility(adapters: Sequence[Adapter], *, device: torch.device | str | None = None) -> pd.DataFrame:
    """One row per module that at least two adapters have: layer, kind, mean pairwise subspace overlap,
    the dominant adapter, its share of ``sum_t ||tau_t||_F``, each adapter's share, and a label."""
    adapters = list(adapters)
    if len(adapters) < 2:
        raise InvalidArgumentError("compatibility needs at least two adapters")
    names = [a.name for a in adapters]
    dev = torch.device(device) if device is not None else torch.device("cpu")
    rows = []
    for key in sorted(all_keys(adapters), key=lambda k: k.order):
        svds = task_svds(adapters, key, [1.0] * len(adapters), dev)
        if len(svds) < 2:
            continue
        overlaps = [pair_interference(a, b, "overlap") for i, a in enumerate(svds) for b in svds[i + 1:]]
        defined = [v for v in overlaps if not math.isnan(v)]
        norms = {names[s.t]: float(s.S.pow(2).sum().sqrt()) for s in svds}
        total = sum(norms.values())
        shares = {n: (v / total if total > 0 else math.nan) for n, v in norms.items()}
        dominant = max(shares, key=lambda n: -1 if math.isnan(shares[n]) else shares[n])
        overlap = float(np.mean(defined)) if defined else math.nan
        labels = []
        if not math.isnan(overlap) and overlap >= OVERLAP_HIGH:
            labels.append("overlapping")
        if not math.isnan(shares[dominant]) and shares[dominant] >= DOMINANT_SHARE:
            labels.append(f"dominated by {dominant}")
        rows.append({"module": key.label, "layer": key.layer, "kind": key.kind, "overlap": overlap,
                     "dominant": dominant, "dominant share": shares[dominant],
                     **{f"share:{n}": shares.get(n, math.nan) for n in names},
                     "label": ", ".join(labels) or "--"})
    return pd.DataFrame(rows)
