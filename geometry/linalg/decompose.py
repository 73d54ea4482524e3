"""Per-adapter thin SVDs of every task vector, computed once and batched by module shape.

For each module ``tau = s B A`` (``B (m, r)``, ``A (r, n)``), :func:`geometry.linalg.factored.lowrank_svd`
gives the exact thin SVD ``tau = U diag(S) V^T`` from QR(B), QR(A^T) and the ``r x r`` core (never
``B @ A``). :func:`decompose_adapter` batches the modules of equal ``(m, n, r)`` into one call;
:class:`AdapterSVD` finds a module's decomposition again. Anatomy (spectra, ranks) and spectral
inclusion (projection on ``tau1``'s singular basis) both start here.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from geometry.device import default_device
from geometry.linalg.factored import LowRankSVD, lowrank_svd
from geometry.types import Adapter, ModuleKey, ordered_keys

__all__ = ["AdapterSVD", "decompose_adapter", "stack_factors"]


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
