"""Low-rank factorisations of merged updates, with the energy each truncation keeps.

*Factored* (a rank-sum update ``Delta = B @ A``, ``B (m, k)``, ``A (k, n)``, e.g. exact task
arithmetic ``[l1 s1 B1, ..., lT sT BT] @ [A1; ...; AT]``): the exact thin SVD comes from
:func:`geometry.linalg.factored.lowrank_svd` (QR of ``B`` and ``A^T``, SVD of the ``k x k`` core in
float64), never from the ``m x n`` matrix. Truncating to rank ``R`` keeps the top ``R`` singular
triplets: ``B' = U_R S_R``, ``A' = V_R^T``, the best rank-``R`` approximation (Eckart-Young).

*Dense* (element-wise merges: TIES, DARE, ...): the update exists only as an ``(m, n)`` matrix, one
module at a time. :func:`factorize_dense` takes the full SVD of that module when
``min(m, n) <= EXACT_SVD_MAX`` (or no rank is given), else a seeded randomized SVD (range finder
``Y = Delta Omega`` with ``q = R + OVERSAMPLE`` columns, ``POWER_ITERATIONS`` QR-stabilised power
iterations, then the SVD of the ``q x n`` matrix ``Q^T Delta``): ``O(m n q)`` instead of
``O(m n min(m, n))``. ``Omega`` is drawn on the CPU from a generator seeded with ``seed`` and moved
to the module's device, so CPU and CUDA runs factor the same way. Its factors are
``U_R S_R V_R^T = U_R U_R^T Delta``, an orthogonal projection of ``Delta``, so the reported energy
``sum_{i<=R} S_i^2 / ||Delta||_F^2`` (norm computed exactly) is exactly the energy they keep and
``||Delta - B A||_F^2 = (1 - energy) ||Delta||_F^2`` holds; only the optimality of the subspace is
approximate (close to the exact top ``R`` for spectra that decay past ``R``).

Energy kept = ``sum_{i <= R} S_i^2 / sum_i S_i^2`` (1.0 for a zero update): the fraction of
``||Delta||_F^2`` the truncated update keeps; the relative Frobenius error is
``sqrt(1 - energy)``. ``rank=None`` keeps the numerical rank (singular values above
``max(m, n) * eps * S_1``), which is exact to float tolerance.
"""

from __future__ import annotations

import torch

from geometry.linalg.factored import lowrank_svd

#: Largest ``min(m, n)`` whose dense SVD is taken in full (above: randomized SVD).
EXACT_SVD_MAX = 1024
#: Extra columns of the randomized range finder, and its power iterations.
OVERSAMPLE = 16
POWER_ITERATIONS = 4


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


def factorize_dense(
    delta: torch.Tensor,
    rank: int | None = None,
    *,
    device: torch.device | str | None = None,
    seed: int = 0,
    exact_max: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(B, A, energy kept)`` with ``B @ A`` a rank-``rank`` approximation of ``delta``.

    float64, on ``device`` (default ``delta``'s device). ``rank=None`` keeps the numerical rank
    (full SVD, exact). With a rank, the SVD is full (the best approximation, Eckart-Young) when
    ``min(m, n) <= exact_max`` (default :data:`EXACT_SVD_MAX`) or the rank is at least half of
    ``min(m, n)``, randomized otherwise (see the module docstring; the energy is exact either way).
    """
    d = delta.detach().to(device=device if device is not None else delta.device, dtype=torch.float64)
    m, n = int(d.shape[0]), int(d.shape[1])
    small = min(m, n)
    limit = EXACT_SVD_MAX if exact_max is None else int(exact_max)
    if rank is None or small <= limit or 2 * (int(rank) + OVERSAMPLE) >= small:
        U, S, Vh = torch.linalg.svd(d, full_matrices=False)
        num = _numerical_rank(S, m, n)
        k = num if rank is None else min(int(rank), num)
        return U[:, :k] * S[:k], Vh[:k].contiguous(), energy_kept(S, k)
    total = float(d.pow(2).sum())
    if total == 0.0:
        return d.new_zeros(m, 0), d.new_zeros(0, n), 1.0
    U, S, Vh = _randomized_svd(d, int(rank) + OVERSAMPLE, seed)
    k = min(int(rank), _numerical_rank(S, m, n))
    kept = float(S[:k].pow(2).sum()) / total
    return U[:, :k] * S[:k], Vh[:k].contiguous(), min(1.0, kept)


def _randomized_svd(d: torch.Tensor, q: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of ``Q^T d`` lifted by ``Q`` (``Q``: orthonormal basis of a ``q``-column range sketch)."""
    gen = torch.Generator().manual_seed(int(seed))
    omega = torch.randn(d.shape[1], q, generator=gen, dtype=torch.float64).to(d.device)
    Q, _ = torch.linalg.qr(d @ omega)
    for _ in range(POWER_ITERATIONS):
        Z, _ = torch.linalg.qr(d.T @ Q)
        Q, _ = torch.linalg.qr(d @ Z)
    Ub, S, Vh = torch.linalg.svd(Q.T @ d, full_matrices=False)
    return Q @ Ub, S, Vh
