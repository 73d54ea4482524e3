"""Dense formulations of the LoRA-native merges: the baselines of ``bench/merge_bench.py --native``.

What a careful practitioner writes from the papers (and what FusionBench does) when the task
vectors are dense ``(m, n)`` matrices: build each ``tau_t = s_t B_t A_t``, then thin SVDs
(``full_matrices=False``) of ``m x n`` (or ``m x T n``) matrices. Each function returns the merged
``(m, n)`` update of one module under the same definition as ``geometry/merging/`` (same rank rule,
same sign convention), so the factored result can be compared to it entry by entry.
"""

from __future__ import annotations

import torch

from geometry.merging.iso import cts_split
from geometry.merging.knots import canonical_signs
from geometry.merging.ties import ties_tensors


def _numerical_rank(S: torch.Tensor, m: int, n: int) -> int:
    if S.numel() == 0 or float(S[0]) == 0.0:
        return 0
    return int((S > max(m, n) * torch.finfo(S.dtype).eps * S[0]).sum())


def _polar(M: torch.Tensor) -> torch.Tensor:
    P, _, Qh = torch.linalg.svd(M, full_matrices=False)
    return P @ Qh


def tsv_m(taus: list[torch.Tensor], alpha: float = 1.0) -> torch.Tensor:
    """Each task's non-zero singular triplets (up to ``min(m, n) / T``), polar factors of the stacks, sum."""
    m, n = taus[0].shape
    cap = min(m, n) // len(taus)
    Us, Ss, Vs = [], [], []
    for tau in taus:
        U, S, Vh = torch.linalg.svd(tau, full_matrices=False)
        k = min(_numerical_rank(S, m, n), cap)
        Us.append(U[:, :k]), Ss.append(S[:k]), Vs.append(Vh[:k].T)
    return alpha * (_polar(torch.cat(Us, 1)) * torch.cat(Ss)) @ _polar(torch.cat(Vs, 1)).T


def iso_c(taus: list[torch.Tensor], alpha: float = 1.0) -> torch.Tensor:
    """SVD of the sum; every non-zero singular value replaced by their mean."""
    total = sum(taus)
    U, S, Vh = torch.linalg.svd(total, full_matrices=False)
    k = _numerical_rank(S, *total.shape)
    return alpha * float(S[:k].mean()) * U[:, :k] @ Vh[:k]


def iso_cts(taus: list[torch.Tensor], common_space_fraction: float = 0.8, alpha: float = 1.0) -> torch.Tensor:
    """Iso-CTS on the rank of the sum: common top directions, each task's residual top directions, polar, flat."""
    total = sum(taus)
    m, n = total.shape
    U, S, Vh = torch.linalg.svd(total, full_matrices=False)
    D = _numerical_rank(S, m, n)
    k_c, per_task = cts_split(D, len(taus), common_space_fraction)
    Uc, Vc = U[:, :k_c], Vh[:k_c].T
    Us, Ss, Vs = [Uc], [S[:k_c]], [Vc]
    for tau in taus:
        Ut, St, Vht = torch.linalg.svd(tau - Uc @ (Uc.T @ tau), full_matrices=False)
        k = min(per_task, _numerical_rank(St, m, n))
        Us.append(Ut[:, :k]), Ss.append(St[:k]), Vs.append(Vht[:k].T)
    S_all = torch.cat(Ss)
    return alpha * float(S_all.mean()) * _polar(torch.cat(Us, 1)) @ _polar(torch.cat(Vs, 1)).T


def knots_ties(taus: list[torch.Tensor], weights: torch.Tensor, density: float = 0.2) -> torch.Tensor:
    """SVD of ``[tau_1 .. tau_T]`` (m x Tn), TIES on the coordinates ``S V_t^T``, mapped back by ``U``."""
    m, n = taus[0].shape
    U, S, Vh = torch.linalg.svd(torch.cat(taus, dim=1), full_matrices=False)
    k = _numerical_rank(S, m, n * len(taus))
    U, S, Vh = U[:, :k], S[:k], Vh[:k]
    signs = canonical_signs(U)
    U, Vh = U * signs, Vh * signs[:, None]
    X = torch.stack([S[:, None] * Vh[:, t * n:(t + 1) * n] for t in range(len(taus))])
    return U @ ties_tensors(X, weights, density)


def core_space_ties(Bs: list[torch.Tensor], As: list[torch.Tensor], scales: list[float], weights: torch.Tensor,
                    density: float = 0.2) -> torch.Tensor:
    """Core Space TIES from the dense task vectors: ``M_t = U_B^T tau_t V_A``, TIES on the cores, back."""
    taus = [s * (B @ A) for s, B, A in zip(scales, Bs, As)]
    U_B, S_B, _ = torch.linalg.svd(torch.cat(Bs, dim=1), full_matrices=False)
    V_A, S_A, _ = torch.linalg.svd(torch.cat(As, dim=0).T, full_matrices=False)
    U_B = (U_B * canonical_signs(U_B))[:, :_numerical_rank(S_B, *U_B.shape)]
    V_A = (V_A * canonical_signs(V_A))[:, :_numerical_rank(S_A, *V_A.shape)]
    cores = torch.stack([U_B.T @ tau @ V_A for tau in taus])
    return U_B @ ties_tensors(cores, weights, density) @ V_A.T
