"""Anatomy of one adapter: per module, the exact spectrum of its task vector and what it says.

For each LoRA module the task vector ``tau = s * B @ A`` (``m x n``, nominal rank ``r``) is
decomposed by :func:`geometry.factored.lowrank_svd` (QR of ``B`` and ``A^T`` and an ``r x r`` core,
float64; never ``B @ A``), batched over the modules of equal shapes. Reported per module:

* ``rank``: numerical rank (singular values above ``max(m, n) * eps * sigma_1``), ``<= r``;
* ``fro_norm = ||tau||_F = ||S||_2`` and ``spectral_norm = ||tau||_2 = sigma_1``;
* ``singular_values``: the ``rank`` non-zero singular values, descending;
* ``effective_rank = exp(-sum_i p_i log p_i)``, ``p = S / sum S`` (Roy & Vetterli), in ``[1, rank]``,
  and ``entropy``, the same entropy normalised by ``log rank`` (the paper's ``H``, in ``[0, 1]``);
* ``stable_rank = ||tau||_F^2 / ||tau||_2^2``, in ``[1, rank]``.

A zero task vector (e.g. an untrained LoRA whose ``B`` is still 0) has rank 0, norms 0 and NaN
effective / stable rank and entropy.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from geometry.device import default_device
from geometry.factored import LowRankSVD, lowrank_svd
from geometry.spectra import effective_rank, entropy, stable_rank
from geometry.types import CANONICAL_KINDS, STACKS, Adapter, ModuleKey

__all__ = ["AdapterSVD", "decompose_adapter", "ordered_keys", "anatomy", "ANATOMY_COLUMNS"]

ANATOMY_COLUMNS: tuple[str, ...] = (
    "stack", "layer", "kind", "name", "m", "n", "r", "scale", "rank", "fro_norm", "spectral_norm",
    "singular_values", "effective_rank", "entropy", "stable_rank",
)


def ordered_keys(keys: Iterable[ModuleKey]) -> list[ModuleKey]:
    """Keys in display order: stack (``model``, ``encoder``, ``decoder``, ``raw``), layer, canonical kind."""

    def sort_key(k: ModuleKey):
        stack = STACKS.index(k.stack) if k.stack in STACKS else len(STACKS)
        kind = CANONICAL_KINDS.index(k.kind) if k.kind in CANONICAL_KINDS else len(CANONICAL_KINDS)
        return (stack, k.stack, k.layer, kind, k.kind)

    return sorted(set(keys), key=sort_key)


def stack_factors(adapter: Adapter, keys: list[ModuleKey], device: torch.device):
    """``B (L, m, r)``, ``A (L, r, n)`` float64 and ``scale (L,)`` for same-shaped modules ``keys``."""
    mods = [adapter.modules[k] for k in keys]
    B = torch.stack([m.B.detach().to(device=device, dtype=torch.float64) for m in mods])
    A = torch.stack([m.A.detach().to(device=device, dtype=torch.float64) for m in mods])
    scale = torch.tensor([float(m.scale) for m in mods], dtype=torch.float64, device=device)
    return B, A, scale


@dataclass
class AdapterSVD:
    """Thin SVDs of (some of) one adapter's task vectors, computed once, batched by shape.

    ``groups`` holds ``(keys, svd)`` pairs (``svd`` batched over ``keys``); :meth:`locate` gives a
    key's ``(group index, position)``.
    """

    adapter: str
    groups: list[tuple[list[ModuleKey], LowRankSVD]] = field(default_factory=list)
    where: dict[ModuleKey, tuple[int, int]] = field(default_factory=dict)

    def locate(self, key: ModuleKey) -> tuple[int, int]:
        return self.where[key]

    def __contains__(self, key: ModuleKey) -> bool:
        return key in self.where

    def get(self, key: ModuleKey) -> LowRankSVD:
        """The single (unbatched) decomposition of one module."""
        g, i = self.where[key]
        svd = self.groups[g][1]
        return LowRankSVD(svd.U[i], svd.S[i], svd.V[i], int(torch.as_tensor(svd.rank)[i]))


def decompose_adapter(
    adapter: Adapter, keys: Iterable[ModuleKey] | None = None, *, device: torch.device | str | None = None
) -> AdapterSVD:
    """Thin SVD of every task vector ``tau = s B A`` of ``adapter`` (or of ``keys``), one batched call per shape."""
    dev = torch.device(device) if device is not None else default_device()
    wanted = ordered_keys(adapter.modules if keys is None else keys)
    by_shape: dict[tuple[int, int, int], list[ModuleKey]] = defaultdict(list)
    for key in wanted:
        mod = adapter.modules[key]
        by_shape[(*mod.shape, mod.rank)].append(key)
    out = AdapterSVD(adapter.name)
    for group_keys in by_shape.values():
        B, A, scale = stack_factors(adapter, group_keys, dev)
        svd = lowrank_svd(B, A, scale, device=dev)
        g = len(out.groups)
        out.groups.append((group_keys, svd))
        out.where.update({k: (g, i) for i, k in enumerate(group_keys)})
    return out


def anatomy(
    adapter: Adapter, kinds: Iterable[str] | None = None, *, device: torch.device | str | None = None
) -> pd.DataFrame:
    """One row per module of ``adapter`` (optionally only ``kinds``): see the module docstring.

    Columns: ``stack, layer, kind, name, m, n, r, scale, rank, fro_norm, spectral_norm,
    singular_values (list), effective_rank, entropy, stable_rank``; rows in display order.
    """
    kind_set = None if kinds is None else {kinds} if isinstance(kinds, str) else set(kinds)
    keys = [k for k in adapter.modules if kind_set is None or k.kind in kind_set]
    dec = decompose_adapter(adapter, keys, device=device)
    rows: dict[ModuleKey, dict] = {}
    for group_keys, svd in dec.groups:
        S = svd.S.detach().cpu().numpy()
        rank = torch.as_tensor(svd.rank).cpu().numpy().reshape(-1)
        fro = np.linalg.norm(S, axis=-1)
        eff, ent, stab = effective_rank(S), entropy(S, n=rank), stable_rank(S)
        for i, key in enumerate(group_keys):
            mod = adapter.modules[key]
            rows[key] = {
                "stack": key.stack,
                "layer": key.layer,
                "kind": key.kind,
                "name": mod.name,
                "m": mod.shape[0],
                "n": mod.shape[1],
                "r": mod.rank,
                "scale": float(mod.scale),
                "rank": int(rank[i]),
                "fro_norm": float(fro[i]),
                "spectral_norm": float(S[i, 0]) if S.shape[-1] else 0.0,
                "singular_values": [float(v) for v in S[i, : rank[i]]],
                "effective_rank": float(eff[i]),
                "entropy": float(ent[i]),
                "stable_rank": float(stab[i]),
            }
    return pd.DataFrame([rows[k] for k in ordered_keys(rows)], columns=list(ANATOMY_COLUMNS))
