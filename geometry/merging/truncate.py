"""Low-rank factorisations of merged updates, with the energy each truncation keeps.

*Factored* (a rank-sum update ``Delta = B @ A``, ``B (m, k)``, ``A (k, n)``, e.g. exact task
arithmetic ``[l1 s1 B1, ..., lT sT BT] @ [A1; ...; AT]``): the exact thin SVD comes from
:func:`geometry.factored.lowrank_svd` (QR of ``B`` and ``A^T``, SVD of the ``k x k`` core in
float64), never from the ``m x n`` matrix. Truncating to rank ``R`` keeps the top ``R`` singular
triplets: ``B' = U_R S_R``, ``A' = V_R^T``, the best rank-``R`` approximation (Eckart-Young).

*Dense* (element-wise merges: TIES, DARE, ...): the update exists only as an ``(m, n)`` matrix, so
its SVD is the full one of that single module.

Energy kept = ``sum_{i <= R} S_i^2 / sum_i S_i^2`` (1.0 for a zero update): the fraction of
``||Delta||_F^2`` the truncated update keeps; the relative Frobenius error is
``sqrt(1 - energy)``. ``rank=None`` keeps the numerical rank (singular values above
``max(m, n) * eps * S_1``), which is exact to float tolerance.
"""

from __future__ import annotations

import torch

from geometry.factored import lowrank_svd


def energy_kept(S: torch.Tensor, k: int) -> float:
    """``sum(S[:k]^2) / sum(S^2)``; 1.0 when ``S`` is all zero."""
    s2 = S.double().pow(2)
    total = float(s2.sum())
    return 1.0 if total == 0.0 else float(s2[:k].sum()) / total


def _numerical_rank(S: torch.Tensor, m: int, n: int) -> int:
    if S.numel() == 0 or float(S[0]) == 0.0:
        return 0
    tol = max(m, n) * torch.finfo(torch.float64).eps * float(S[0])
    return int((S > tol).sum())


def truncate_factored(
    B: torch.Tensor,
    A: torch.Tensor,
    rank: int | None = None,
    scale: float = 1.0,
    *,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-``rank`` factors ``(B', A', energy kept)`` of ``scale * B @ A`` (factored SVD).

    ``B' = U S`` and ``A' = V^T`` (float64, on ``device``, default ``B``'s device);
    ``rank=None`` keeps the numerical rank.
    """
    svd = lowrank_svd(B, A, scale, device=device if device is not None else B.device)
    S = svd.S
    num = int(svd.rank)
    k = num if rank is None else min(int(rank), num)
    return svd.U[:, :k] * S[:k], svd.V[:, :k].T.contiguous(), energy_kept(S, k)


def factorize_dense(delta: torch.Tensor, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(B, A, energy kept)`` with ``B @ A`` the best rank-``rank`` approximation of ``delta``.

    One full SVD of this one ``(m, n)`` module in float64; ``rank=None`` keeps the numerical rank.
    """
    d = delta.double()
    U, S, Vh = torch.linalg.svd(d, full_matrices=False)
    num = _numerical_rank(S, int(d.shape[0]), int(d.shape[1]))
    k = num if rank is None else min(int(rank), num)
    return U[:, :k] * S[:k], Vh[:k].contiguous(), energy_kept(S, k)
