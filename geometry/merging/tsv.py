"""TSV-M (task singular vectors merge) and the singular task interference, exact and factored.

Reference: Gargiulo et al. 2025, *Task Singular Vectors: Reducing Task Interference in Model
Merging* (CVPR); code ``github.com/AntoAndGar/task_singular_vectors``
``src/utils/TSVM_utils.py::compute_and_sum_svd_mem_reduction`` (the TSV-M of the paper; the same
function is copied in ``danielm1405/iso-merging`` and in FusionBench
``fusion_bench/method/task_singular_vector/utils/TSVM_utils.py``).

Formula, per module (``lambda_t`` the merge weight at the module, ``s_t`` the adapter's scale)::

    tau_t = lambda_t s_t B_t A_t = U_t diag(S_t) V_t^T                     (thin SVD, per task)
    U_cat = [U_1[:, :k_1], ..., U_T[:, :k_T]]   V_cat likewise   S_cat = [S_1[:k_1], ..., S_T[:k_T]]
    U_perp = polar(U_cat),  V_perp = polar(V_cat)     (polar(M) = P Q^T for M = P diag(.) Q^T)
    Delta = alpha * U_perp diag(S_cat) V_perp^T

Steps: each task's exact thin SVD comes from its factors (:func:`geometry.linalg.factored.lowrank_svd`:
QR of ``B_t`` and ``A_t^T``, ``r_t x r_t`` core), the polar factors from the SVDs of the
``(m, K)`` and ``(n, K)`` concatenations (``K = sum_t k_t``); the result is stored factored,
``B = alpha * U_perp diag(S_cat)``, ``A = V_perp^T``, rank ``K``. Cost ``O((m + n) K^2)``; no
``m x n`` matrix is formed. ``rank=R`` then truncates to the best rank-``R`` approximation of that
update (:func:`~geometry.merging.truncate.truncate_factored`; ``energy_kept`` is relative to the
untruncated TSV-M update).

Components kept per task (``fraction``):

- ``None`` (default, the authors' rule): ``k_t = min(rho_t, floor(min(m, n) / T))`` with ``rho_t``
  the numerical rank of ``tau_t`` and ``T`` the number of adapters that have the module. The
  authors keep ``int(min(m, n) / T)`` components of the dense SVD of every task; for a LoRA task
  vector only its ``rho_t <= r_t`` leading components have a non-zero singular value. In the usual
  LoRA case (``r_t <= min(m, n) / T``) every task keeps all its components and nothing is lost.
- a float ``f`` in ``(0, 1]``: ``k_t = ceil(f * rho_t)``, a fraction of each task's own rank (e.g.
  ``f = 1/T``: ``ceil(r_t / T)``, the authors' "1/T of the components" counted on the LoRA rank).

Weights: ``lambda_t`` (task or task-and-layer level, :class:`~geometry.merging.weights.MergeWeights`,
default 1) scales each ``tau_t`` before its SVD, as FusionBench does with a list ``alpha``
(a negative weight flips ``U_t``); ``alpha`` (default 1.0, the authors' code; their evaluation
picks the scaling on validation data from ``linspace(0, 3, 31)[1:]``) scales the merged update.
Adapters that lack a module are left out of that module (and of its ``T``).

Limits (where this differs from the authors' dense code, and why):

- Components with a zero singular value are dropped. The authors' dense code keeps
  ``int(min(m, n) / T)`` columns per task whatever the rank, so for a LoRA task it also
  concatenates ``int(min(m, n) / T) - rho_t`` singular vectors of singular value 0, whose choice by
  LAPACK is arbitrary (any orthonormal basis of the null space); they do not appear in the sum but
  they do change the polar factor of ``U_cat``, so that dense result is not a function of the
  task vectors. Both agree whenever no zero component is padded in: ``rho_t >= int(min(m, n) / T)``
  for every task (always the case for the full-rank task matrices of full fine-tuning), tested in
  ``tests/test_merge_svd_methods.py``.
- ``polar`` of a rank-deficient concatenation (e.g. two tasks sharing a singular vector) is taken
  as the canonical partial isometry ``P_+ Q_+^T`` over its non-zero singular values (numerical rank
  as in :mod:`geometry.linalg.factored`); the authors' ``P Q^T`` then depends on LAPACK's choice of ``P``'s
  null columns. Both agree when the concatenation has full rank ``min(m or n, K)``.
- Non-matrix parameters, ``text_projection`` and heads: not part of a LoRA update here; each task
  keeps its own head (:attr:`~geometry.merging.base.MergedAdapter.heads`).

Interference: :func:`task_interference` (adapters x adapters, per module or reduced over modules)
and :func:`interference_by_module` (all tasks, per module), the paper's *singular task
interference* ``STI = || (U^T U - I) diag(S) (V^T V - I) ||_1`` (entry-wise 1-norm) on the
concatenated full task SVDs, and a scale-free subspace overlap; all factored. The paper writes
``||.||_1`` without saying which matrix norm; the entry-wise sum of absolute values is used here.
FusionBench's ``utils/task_singular_interference.py`` concatenates ``U_t`` along rows
(``torch.cat(U, dim=0)``, which makes ``U^T U = T I``) and asks ``torch.linalg.norm`` for
``ord="1"``; the column concatenation of the paper is used here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import pandas as pd
import torch

from geometry.errors import MergeParameterError
from geometry.linalg.factored import lowrank_svd, rank_mask
from geometry.merging.base import (
    MergedAdapter,
    all_keys,
    check_mergeable,
    check_rank,
    factored_module,
    iter_present,
    merge_device,
    template,
    wrap,
)
from geometry.merging.truncate import truncate_factored
from geometry.merging.weights import MergeWeights, WeightsSpec
from geometry.types import Adapter, ModuleKey

#: parameters (besides ``weights``, ``dtype``, ``device``) each method registered here takes
PARAMS: dict[str, tuple[str, ...]] = {"tsv_m": ("alpha", "fraction", "rank")}

InterferenceScore = Literal["sti", "overlap"]


# ------------------------------------------------------------------------------------- helpers
@dataclass
class TaskSVD:
    """Thin SVD of one task vector at one module, zero tail dropped: ``tau = U diag(S) V^T``."""

    t: int
    U: torch.Tensor  # (m, rho)
    S: torch.Tensor  # (rho,)
    V: torch.Tensor  # (n, rho)

    @property
    def rank(self) -> int:
        return int(self.S.shape[0])


def task_svds(adapters: Sequence[Adapter], key: ModuleKey, wk: Sequence[float], dev: torch.device) -> list[TaskSVD]:
    """Exact thin SVDs of ``w_t s_t B_t A_t`` for the adapters that have ``key`` (float64, on ``dev``)."""
    out = []
    for t, mod in iter_present(adapters, key):
        svd = lowrank_svd(mod.B, mod.A, float(wk[t]) * float(mod.scale), device=dev).truncated()
        out.append(TaskSVD(t, svd.U, svd.S, svd.V))
    return out


def polar(M: torch.Tensor) -> torch.Tensor:
    """Orthogonal polar factor ``P_+ Q_+^T`` of ``M (p, q)`` (``M = P diag(s) Q^T``), float64.

    The nearest matrix with orthonormal columns (rows, when ``p < q``) to ``M`` in Frobenius norm
    (Procrustes; TSV-M's ``U_perp``). Only singular values above ``max(p, q) * eps * s_1`` count
    (as in :mod:`geometry.linalg.factored`): for a rank-deficient ``M`` this is the canonical partial
    isometry, unique where ``P Q^T`` would depend on the choice of ``P``'s null columns.
    """
    if M.shape[-1] == 0 or M.shape[-2] == 0:
        return M.clone()
    P, s, Qh = torch.linalg.svd(M, full_matrices=False)
    keep = rank_mask(s, M.shape[-2], M.shape[-1])
    return P[:, keep] @ Qh[keep]


def keep_count(rho: int, m: int, n: int, n_tasks: int, fraction: float | None) -> int:
    """Components TSV-M keeps of a task of numerical rank ``rho`` (see the module docstring)."""
    if fraction is None:
        return min(rho, min(m, n) // n_tasks)
    return min(rho, math.ceil(fraction * rho - 1e-9))


def check_fraction(fraction: float | None) -> float | None:
    if fraction is None:
        return None
    fraction = float(fraction)
    if not 0.0 < fraction <= 1.0:
        raise MergeParameterError(f"fraction must be in (0, 1] (the fraction of each task's rank kept), got {fraction}")
    return fraction



# ------------------------------------------------------------------------------------- TSV-M
def tsv_m_factors(
    svds: Sequence[TaskSVD], m: int, n: int, *, fraction: float | None = None, alpha: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` of the TSV-M update of the given task SVDs: ``B = alpha U_perp diag(S_cat)``, ``A = V_perp^T``."""
    Us, Ss, Vs = [], [], []
    for sv in svds:
        k = keep_count(sv.rank, m, n, len(svds), fraction)
        Us.append(sv.U[:, :k])
        Ss.append(sv.S[:k])
        Vs.append(sv.V[:, :k])
    ref = svds[0].U
    if not Ss or sum(int(s.shape[0]) for s in Ss) == 0:
        return ref.new_zeros(m, 0), ref.new_zeros(0, n)
    U_cat, S_cat, V_cat = torch.cat(Us, dim=1), torch.cat(Ss), torch.cat(Vs, dim=1)
    B = polar(U_cat) * (float(alpha) * S_cat)
    A = polar(V_cat).T.contiguous()
    return B, A


def tsv_m(
    adapters: Sequence[Adapter],
    weights: WeightsSpec = None,
    *,
    alpha: float = 1.0,
    fraction: float | None = None,
    rank: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> MergedAdapter:
    """TSV-M per module: orthogonalised concatenation of each task's top singular triplets; see module docstring."""
    check_mergeable(adapters)
    rank = check_rank(rank)
    fraction = check_fraction(fraction)
    dev = merge_device(device)
    w = MergeWeights(weights, len(adapters), default=1.0)
    modules: dict = {}
    for key in all_keys(adapters):
        first = template(adapters, key)
        m, n = first.shape
        svds = task_svds(adapters, key, w.at(key), dev)
        B, A = tsv_m_factors(svds, m, n, fraction=fraction, alpha=alpha)
        rank_sum = sum(int(mod.r) for _, mod in iter_present(adapters, key))
        kept = 1.0
        if rank is not None and A.shape[0] > rank:
            B, A, kept = truncate_factored(B, A, rank, device=dev)
        modules[key] = factored_module(first, key, B, A, dtype, kept, rank_sum)
    params = {"weights": w.describe(), "alpha": float(alpha), "fraction": fraction, "rank": rank}
    return wrap("tsv_m", params, adapters, modules)


# ------------------------------------------------------------------------------ interference
def singular_task_interference(svds: Sequence[TaskSVD]) -> float:
    """The paper's STI of the given tasks: ``|| (U^T U - I) diag(S) (V^T V - I) ||_1``, entry-wise.

    ``U = [U_1, ..., U_T]``, ``V = [V_1, ..., V_T]`` the concatenated full (numerical-rank) task
    SVDs and ``S`` their concatenated singular values: a ``K x K`` computation, ``K = sum rho_t``.
    0 for one task or mutually orthogonal tasks.
    """
    svds = [sv for sv in svds if sv.rank > 0]
    if len(svds) < 2:
        return 0.0
    U = torch.cat([sv.U for sv in svds], dim=1)
    V = torch.cat([sv.V for sv in svds], dim=1)
    S = torch.cat([sv.S for sv in svds])
    eye = torch.eye(U.shape[1], dtype=U.dtype, device=U.device)
    return float((((U.T @ U - eye) * S) @ (V.T @ V - eye)).abs().sum())


def pair_interference(a: TaskSVD, b: TaskSVD, score: InterferenceScore = "sti") -> float:
    """Interference of two tasks at one module (symmetric in ``a``, ``b``).

    ``"sti"``: STI of the pair; with ``X = U_a^T U_b`` and ``Y = V_a^T V_b`` the product is
    block-diagonal and ``STI = ||X S_b Y^T||_1 + ||X^T S_a Y||_1`` (``r_a x r_b`` matrices); a task
    paired with itself gives ``2 sum_i sigma_i``, orthogonal tasks 0. ``"overlap"``:
    ``(||U_a^T U_b||_F^2 + ||V_a^T V_b||_F^2) / (2 min(rho_a, rho_b))`` in ``[0, 1]`` (the mean
    squared cosine of the principal angles of the column and row spaces): 1 when one task's spaces
    contain the other's, 0 when orthogonal, NaN when a task is zero.
    """
    X = a.U.T @ b.U
    Y = a.V.T @ b.V
    if score == "sti":
        return float(((X * b.S) @ Y.T).abs().sum() + ((X.T * a.S) @ Y).abs().sum())
    if score == "overlap":
        p = min(a.rank, b.rank)
        if p == 0:
            return math.nan
        return float((X.pow(2).sum() + Y.pow(2).sum()) / (2 * p))
    raise MergeParameterError(f"score must be 'sti' or 'overlap', got {score!r}")


def _select_keys(adapters: Sequence[Adapter], module: ModuleKey | str | Sequence[ModuleKey] | None) -> list[ModuleKey]:
    keys = all_keys(adapters)
    if module is None:
        return keys
    wanted = list(module) if isinstance(module, (list, tuple, set)) and not isinstance(module, ModuleKey) else [module]
    picked = [k for k in keys if k in wanted or k.label in wanted]
    if not picked:
        raise MergeParameterError(f"no adapter has module {module!r}")
    return picked


def task_interference(
    adapters: Sequence[Adapter],
    weights: WeightsSpec = None,
    *,
    score: InterferenceScore = "sti",
    module: ModuleKey | str | Sequence[ModuleKey] | None = None,
    reduce: Literal["mean", "sum"] = "mean",
    device: torch.device | str | None = None,
) -> pd.DataFrame:
    """Pairwise interference, a symmetric DataFrame adapters x adapters labelled by adapter name.

    Per module (``module``: a :class:`~geometry.types.ModuleKey` or its label), over a list of
    modules, else the ``mean`` (or ``sum``) over the modules both adapters have (NaN when they share none). ``score``: see
    :func:`pair_interference`; task vectors are ``lambda_t s_t B_t A_t`` (``weights`` as in the merges).
    The diagonal is a task paired with itself (STI ``2 sum_i sigma_i``, overlap 1).
    All factored: per module one thin SVD per task and ``r_a x r_b`` products.
    """
    if score not in ("sti", "overlap"):
        raise MergeParameterError(f"score must be 'sti' or 'overlap', got {score!r}")
    if reduce not in ("mean", "sum"):
        raise MergeParameterError(f"reduce must be 'mean' or 'sum', got {reduce!r}")
    check_mergeable(adapters)
    dev = merge_device(device)
    w = MergeWeights(weights, len(adapters), default=1.0)
    T = len(adapters)
    total = torch.zeros(T, T, dtype=torch.float64)
    count = torch.zeros(T, T, dtype=torch.float64)
    for key in _select_keys(adapters, module):
        svds = task_svds(adapters, key, w.at(key), dev)
        for i, a in enumerate(svds):
            for b in svds[i:]:
                val = pair_interference(a, b, score)
                if math.isnan(val):
                    continue
                for x, y in {(a.t, b.t), (b.t, a.t)}:
                    total[x, y] += val
                    count[x, y] += 1
    values = total / count if reduce == "mean" else torch.where(count > 0, total, torch.nan)
    names = [a.name for a in adapters]
    return pd.DataFrame(values.numpy(), index=names, columns=names)


def interference_by_module(
    adapters: Sequence[Adapter],
    weights: WeightsSpec = None,
    *,
    device: torch.device | str | None = None,
) -> pd.DataFrame:
    """The paper's STI of all tasks together, one row per module: columns ``module``, ``tasks``, ``sti``.

    ``tasks`` is the number of adapters that have the module (the others are left out).
    """
    check_mergeable(adapters)
    dev = merge_device(device)
    w = MergeWeights(weights, len(adapters), default=1.0)
    rows = []
    for key in all_keys(adapters):
        svds = task_svds(adapters, key, w.at(key), dev)
        rows.append({"module": key.label, "tasks": len(svds), "sti": singular_task_interference(svds)})
    return pd.DataFrame(rows, columns=["module", "tasks", "sti"])
