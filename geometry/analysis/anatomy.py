"""Anatomy of one adapter: per module, the exact spectrum of its task vector and what it says.

For each LoRA module the task vector ``tau = s * B @ A`` (``m x n``, nominal rank ``r``) is
decomposed by :func:`geometry.linalg.factored.lowrank_svd` (QR of ``B`` and ``A^T`` and an ``r x r`` core,
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

from collections.abc import Iterable

import numpy as np
import pandas as pd
import torch

from geometry.linalg.decompose import AdapterSVD, decompose_adapter
from geometry.linalg.spectra import effective_rank, entropy, stable_rank
from geometry.types import Adapter, ModuleKey, ordered_keys

__all__ = ["AdapterSVD", "decompose_adapter", "ordered_keys", "anatomy", "ANATOMY_COLUMNS"]

ANATOMY_COLUMNS: tuple[str, ...] = (
    "stack", "layer", "kind", "name", "m", "n", "r", "scale", "rank", "fro_norm", "spectral_norm",
    "singular_values", "effective_rank", "entropy", "stable_rank",
)


def anatomy(
    adapter: Adapter, *, kind: str | Iterable[str] | None = None, device: torch.device | str | None = None
) -> pd.DataFrame:
    """One row per module of ``adapter`` (optionally only of ``kind``, one or several): see the module docstring.

    Columns: ``stack, layer, kind, name, m, n, r, scale, rank, fro_norm, spectral_norm,
    singular_values (list), effective_rank, entropy, stable_rank``; rows in display order.
    """
    kind_set = None if kind is None else {kind} if isinstance(kind, str) else set(kind)
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
