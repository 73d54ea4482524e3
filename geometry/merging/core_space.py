"""Core Space merging: express every LoRA update in one pair of reference bases, merge the small cores.

Reference: Panariello, Marczak, Magistri, Porrello, Twardowski, Bagdanov, Calderara, van de Weijer
2025, *Accurate and Efficient Low-Rank Model Merging in Core Space* (NeurIPS); code
``apanariello4/core-space-merging`` (``task_merger.py``: ``MatrixPerLayerMerger.get_core_matrices``,
``_merge_tensors``, ``get_tsv_delta_w``, ``isotropize_matrix``; ``merging_functions.py``), read for
the conventions below.

Formula, per module, over the ``T`` adapters that have it (``tau_t = s_t B_t A_t``, ``R = sum r_t``)::

    U_B = orthonormal basis of Im([B_1, ..., B_T])        (m x min(m, R); SVD of the stacked B's)
    V_A = orthonormal basis of Im([A_1; ...; A_T]^T)      (n x min(n, R); SVD of the stacked A's)
    M_t = U_B^T tau_t V_A = s_t (U_B^T B_t)(A_t V_A)      (the task's core, min(m, R) x min(n, R))
    M   = merge(M_1, ..., M_T; lambda_1, ..., lambda_T)
    Delta = U_B M V_A^T

``tau_t = U_B M_t V_A^T`` exactly (``B_t`` lies in ``Im(U_B)``, ``A_t^T`` in ``Im(V_A)``), so any merge
that is linear in the task vectors is unchanged: Core Space task arithmetic **equals** task
arithmetic. Element-wise merges (TIES, DARE) acting on the ``R x R`` cores are **not** the same as
those merges on the dense ``m x n`` task vectors: trimming, sign election and dropping act on
entries of a different (aligned, much smaller) matrix. That is the method, not an approximation.

``merge_method`` (on the stacked cores):

- ``"task_arithmetic"``: ``sum_t lambda_t M_t`` (exact task arithmetic);
- ``"ties"`` (default): TIES with ``density`` (default 0.2) per core, ``majority_sign_method``;
- ``"dare_ties"`` / ``"dare_linear"``: DARE (``density`` kept, default 0.5, seeded per module)
  then sign election and disjoint mean / sum, as :mod:`~geometry.merging.dare`;
- ``"iso_c"``: Iso-C in the core: ``M = sum_t lambda_t M_t = U_M S_M V_M^T``, all non-zero singular
  values replaced by their mean (the authors' ``isotropize_matrix`` on the summed cores);
- ``"tsv"``: TSV-Merge in the core (the authors' ``get_tsv_delta_w``): SVD of each
  ``lambda_t M_t``, keep its top ``floor(min(core shape) / T)`` components (at most its rank),
  concatenate the kept ``U``'s (``Uc``), singular values (``s``) and ``V``'s (``Vc``), replace
  ``Uc`` and ``Vc`` by their orthogonal polar factors (``P Q^T`` from their SVDs), ``M = Uc diag(s) Vc^T``.

The element-wise ones share :func:`geometry.merging.knots.combine_stacked` with KnOTS.

Weights: ``lambda_t`` (per layer through :meth:`MergeWeights.at`) multiply the cores in the linear
methods, Iso-C and TSV; in TIES / DARE they enter the mean (or sum) after trim / drop and sign
election, as in :func:`~geometry.merging.ties.ties_tensors`. The reference bases never depend on
the weights or on the scales ``s_t``: they are built from the raw factors, as the authors do.

Computed factored: ``U_B`` and ``V_A`` come from :func:`geometry.linalg.factored.orthonormal_basis`
(QR of the ``m x R`` / ``n x R`` stacks, SVD of the ``R x R`` factor); the stored result is
``B = U_B M`` (``m x k``), ``A = V_A^T`` (``k x n``), ``k = rank of the stacked A's <= R``, never an
``m x n`` matrix. ``rank`` truncates it (factored SVD, :func:`~geometry.merging.truncate.truncate_factored`)
with ``energy_kept`` the fraction of ``||Delta||_F^2`` kept.

Conventions (where this differs from the authors' code):

- Basis columns beyond the numerical rank of the stacks (``rank_mask``: ``S_i > max(rows, R) eps S_1``)
  are exactly zero (theirs: arbitrary completions from ``torch.linalg.svd``); the core keeps the
  same shape ``min(m, R) x min(n, R)`` as theirs, so TIES trims the same number of entries, and
  those rows / columns of every core are exactly 0 instead of rounding noise.
- **Sign convention**: each column of ``U_B`` and of ``V_A`` is flipped so that its largest-magnitude
  entry is positive (:func:`geometry.merging.knots.canonical_signs`). All merges here are
  equivariant under those flips (TIES / DARE are odd entry-wise; Iso-C and TSV commute with
  ``M -> D1 M D2`` for diagonal ``+-1``), so the result is sign independent except where an elected
  mass is exactly 0 (elects ``+1``; frequent with ``majority_sign_method="frequency"``, where the
  result does depend on this convention, which makes it deterministic).
- Trim ``floor(density * numel)`` per core (theirs: ``topK`` percent, ties at the threshold kept);
  a zero elected sign is ``+1`` (theirs: the sign of the total). Their ``dare-ties`` keeps a TIES
  trim after DARE (``topK``, default 10%); ours does not (this library's ``dare_ties``). Their
  ``scaling_coeffs`` multiply the merged update (one coefficient); here one ``lambda_t`` per task.
- Iso-C: the mean is over the non-zero singular values of ``M`` and only those directions are
  isotropized (theirs: the mean over all ``min`` dimensions of the core, zeros included, spread over
  arbitrary directions when the summed core is rank-deficient); identical for a full-rank core.
- TSV: at most ``rank(M_t)`` components per task and no zero padding (theirs pads ``Uc`` to a square
  matrix and takes ``floor(R/T)`` components regardless of rank); identical for equal ranks and
  full-rank factors.

Limits: the bases are not invariant to the LoRA gauge ``(B_t G, G^{-1} A_t)`` (they are for linear
merges): element-wise results depend on how each adapter's factors are scaled. Adapters lacking a
module are left out of that module's bases and merge. Each task keeps its head.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from geometry.linalg.factored import orthonormal_basis, rank_mask
from geometry.merging.base import (
    MergedAdapter,
    MergedModule,
    all_keys,
    check_mergeable,
    check_rank,
    factored_module,
    iter_present,
    merge_device,
    template,
    wrap,
)
from geometry.merging.knots import (
    ELEMENTWISE_METHODS,
    canonical_signs,
    check_method,
    check_sign_method,
    combine_stacked,
    inner_params,
    resolve_density,
)
from geometry.merging.ties import SignMethod
from geometry.merging.truncate import truncate_factored
from geometry.merging.weights import MergeWeights, WeightsSpec
from geometry.types import Adapter, ModuleKey

#: parameters (besides ``weights``, ``dtype``, ``device``) of each method registered from this module
PARAMS: dict[str, tuple[str, ...]] = {
    "core_space": ("merge_method", "density", "seed", "majority_sign_method", "rank"),
}

#: merges available on the cores
CORE_METHODS: tuple[str, ...] = (*ELEMENTWISE_METHODS, "iso_c", "tsv")


def core_bases(
    Bs: Sequence[torch.Tensor], As: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, int, torch.Tensor, int]:
    """``(U_B (m, min(m, R)), rank_B, V_A (n, min(n, R)), rank_A)`` of the raw stacked factors.

    Orthonormal columns then zero columns past the numerical rank; canonical signs.
    """
    dev = Bs[0].device
    U_B, rank_B = orthonormal_basis(torch.cat(list(Bs), dim=1), device=dev)
    V_A, rank_A = orthonormal_basis(torch.cat(list(As), dim=0).T, device=dev)
    return U_B * canonical_signs(U_B), int(rank_B), V_A * canonical_signs(V_A), int(rank_A)


def isotropize(M: torch.Tensor) -> torch.Tensor:
    """``U diag(mean(S)) V^T`` over the non-zero singular triplets of ``M`` (0 for a zero matrix)."""
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    keep = rank_mask(S, int(M.shape[0]), int(M.shape[1]))
    k = int(keep.sum())
    if k == 0:
        return torch.zeros_like(M)
    return (U[:, :k] * S[:k].mean()) @ Vh[:k]


def _polar(X: torch.Tensor) -> torch.Tensor:
    """Orthogonal polar factor ``P Q^T`` of ``X = P S Q^T`` (thin SVD)."""
    P, _, Qh = torch.linalg.svd(X, full_matrices=False)
    return P @ Qh


def tsv_cores(cores: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """TSV-Merge of weighted cores ``(T, p, q)``: top ``floor(min(p, q) / T)`` components each, orthogonalised."""
    T, p, q = (int(s) for s in cores.shape)
    per_task = min(p, q) // T
    Us, ss, Vs = [], [], []
    for M, w in zip(cores, weights):
        U, S, Vh = torch.linalg.svd(w * M, full_matrices=False)
        k = min(per_task, int(rank_mask(S, p, q).sum()))
        Us.append(U[:, :k])
        ss.append(S[:k])
        Vs.append(Vh[:k].T)
    Uc, s, Vc = torch.cat(Us, dim=1), torch.cat(ss), torch.cat(Vs, dim=1)
    if s.numel() == 0:
        return cores.new_zeros(p, q)
    return (_polar(Uc) * s) @ _polar(Vc).T


def core_space(
    adapters: Sequence[Adapter],
    weights: WeightsSpec = None,
    *,
    merge_method: str = "ties",
    density: float | None = None,
    seed: int = 0,
    majority_sign_method: SignMethod = "total",
    rank: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> MergedAdapter:
    """Core Space merging: ``merge_method`` on the aligned ``R x R`` cores; see module docstring."""
    check_mergeable(adapters)
    check_method(merge_method, CORE_METHODS)
    check_sign_method(majority_sign_method)
    density = resolve_density(merge_method, density)
    rank = check_rank(rank)
    dev = merge_device(device)
    w = MergeWeights(weights, len(adapters), default=1.0)
    modules: dict[ModuleKey, MergedModule] = {}
    for key in all_keys(adapters):
        wk = w.at(key)
        present = list(iter_present(adapters, key))
        Bs = [mod.B.to(device=dev, dtype=torch.float64) for _, mod in present]
        As = [mod.A.to(device=dev, dtype=torch.float64) for _, mod in present]
        U_B, rank_B, V_A, rank_A = core_bases(Bs, As)
        cores = torch.stack([
            mod.scale * ((U_B.T @ B) @ (A @ V_A)) for (_, mod), B, A in zip(present, Bs, As)
        ])
        wt = torch.tensor([wk[t] for t, _ in present], dtype=torch.float64, device=dev)
        if merge_method == "iso_c":
            M = isotropize((cores * wt.reshape(-1, 1, 1)).sum(dim=0))
        elif merge_method == "tsv":
            M = tsv_cores(cores, wt)
        else:
            M = combine_stacked(cores, wt, merge_method, density=density, seed=seed,
                                majority_sign_method=majority_sign_method, key=key)
        B = U_B[:, :rank_B] @ M[:rank_B, :rank_A]  # the zero basis columns contribute nothing
        A = V_A[:, :rank_A].T.contiguous()
        kept = 1.0
        if rank is not None and rank_A > rank:
            B, A, kept = truncate_factored(B, A, rank, device=dev)
        rank_sum = sum(mod.rank for _, mod in present)
        modules[key] = factored_module(template(adapters, key), key, B, A, dtype, kept, rank_sum)
    params = {"merge_method": merge_method, "weights": w.describe(), "rank": rank,
              **inner_params(merge_method, density, majority_sign_method, seed, dev)}
    return wrap("core_space", params, adapters, modules)
