"""Iso-C and Iso-CTS: isotropic merging in the common (and task-specific) subspaces, factored.

Reference: Marczak et al. 2025, *No Task Left Behind: Isotropic Model Merging with Common and
Task-Specific Subspaces* (ICML); code ``github.com/danielm1405/iso-merging``
``src/utils/iso.py`` (``iso_c``, ``iso_cts``; ``config/method/iso_cts.yaml``:
``common_space_fraction: 0.8``), copied in FusionBench ``fusion_bench/method/isotropic_merging/``.

Per module, with ``tau_t = lambda_t s_t B_t A_t`` and ``Delta_TA = sum_t tau_t = U diag(S) V^T``:

**Iso-C**::

    Delta = alpha * sigma_bar * U V^T,     sigma_bar = mean of the singular values of Delta_TA

**Iso-CTS** (``f = common_space_fraction``, ``D`` directions in all, ``T`` tasks)::

    k_c = D - round((D - int(f D)) / T) * T,   n = (D - k_c) / T          (the authors' split)
    common:        U[:, :k_c], S[:k_c], V[:, :k_c]                        (top of Delta_TA)
    task-specific: top n triplets of tau_t - U_c U_c^T tau_t,  t = 1..T
    U_perp = polar([U_c, U_1', ..., U_T']),  V_perp likewise               (as TSV-M)
    Delta = alpha * sigma_bar * U_perp V_perp^T,   sigma_bar = mean of the combined singular values

Factored (no ``m x n`` matrix): everything lives in ``Im[B_1..B_T]`` and ``Im[A_1^T..A_T^T]``, of
dimension ``<= K = sum_t r_t``. One orthonormal basis of each (``Qb``, ``Qa``, QR + SVD of the
stacked factors, :func:`geometry.linalg.factored.orthonormal_basis`) turns every task into a
``K x K`` core ``C_t = Qb^T tau_t Qa`` (exact: ``tau_t = Qb C_t Qa^T``); Delta_TA, the projections,
the residual SVDs and the polar factors (``polar(Qb X) = Qb polar(X)``) are all computed on cores.
Cost ``O((m + n) K^2 + T K^3)``. Stored as ``B = alpha sigma_bar Qb polar(U')``, ``A = (Qa polar(V'))^T``.

``spectrum`` fixes the size the authors take as ``min(m, n)`` (their dense SVD has ``min(m, n)``
singular values, and both ``S.mean()`` and the Iso-CTS split count all of them, zeros included):

- ``"rank"`` (default): ``D = R``, the numerical rank of ``Delta_TA``, and ``sigma_bar`` is the
  mean over the directions kept (for Iso-C, ``sum_i sigma_i / R``). For a full-rank ``Delta_TA``
  (full fine-tuning, or ``sum r_t >= min(m, n)``) ``R = min(m, n)`` and this *is* the authors'
  definition; for a LoRA sum it is the same construction on the subspace the update lives in.
- ``"full"``: the authors' code literally, ``D = min(m, n)`` and ``sigma_bar = sum / min(m, n)``
  (zeros included), directions of singular value 0 dropped. For Iso-C this equals the authors'
  output compressed to the determined subspaces, ``U U^T M V V^T`` (tested). For a LoRA sum the
  mean is divided by ``min(m, n) >> R``: the update shrinks by ``R / min(m, n)``.

Weights: ``lambda_t`` (task or task-and-layer level, default 1) scales each ``tau_t`` first (so
``Delta_TA`` is the weighted task arithmetic sum); ``alpha`` (default 1.0) scales the result. The
authors pick ``alpha`` on validation data from ``linspace(0, 3, 31)[1:]`` (``src/eval/eval.py``),
FusionBench requires a ``scaling_factor``; there is no published default. Adapters lacking a module
are left out of it (and of its ``T``). ``rank=R`` keeps the ``R`` directions with the largest
singular values before flattening (Iso-C: the top of ``Delta_TA``); their singular values all
equal ``alpha sigma_bar``, so ``energy_kept = R / D``.

Limits:

- The authors' dense output on a rank-``R`` sum also holds ``sigma_bar`` times ``min(m, n) - R``
  directions of singular value 0, whose singular vectors LAPACK picks arbitrarily (for Iso-CTS they
  also enter the polar factors and the projection of the residuals): that part is not a function
  of the task vectors and is left out here. With ``spectrum="full"`` and ``R <= int(f min(m, n))``
  (any LoRA sum with ``sum r_t`` well below ``min(m, n)``), the authors' split puts all of
  ``Delta_TA`` into the common space, every residual ``tau_t - U_c U_c^T tau_t`` is zero when
  ``Im(tau_t)`` lies in ``Im(Delta_TA)``, and Iso-CTS reduces to Iso-C: ``spectrum="rank"`` is
  the setting in which Iso-CTS keeps task-specific directions for LoRA.
- Everything agrees with the authors' dense code (both settings) when ``Delta_TA`` has full rank
  ``min(m, n)``, each residual has at least ``n`` non-zero singular values and the concatenations
  have full rank (tested on such modules).
- The split is the authors' formula; when rounding would ask for more than ``D`` task directions
  (``round`` up with ``int(f D)`` close to ``D``), ``T`` fewer are taken (the authors' code would
  index past its arrays). A residual with fewer than ``n`` non-zero singular values contributes
  only those. Numerical zero (Iso-CTS): ``max(m, n) * eps`` times the largest singular value among
  ``Delta_TA`` and the ``tau_t`` (float64); Iso-C: that of :func:`geometry.linalg.factored.lowrank_svd`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from geometry.errors import MergeParameterError
from geometry.linalg.factored import EPS64, lowrank_svd, orthonormal_basis
from geometry.merging.base import (
    MergedAdapter,
    all_keys,
    check_mergeable,
    check_rank,
    factored_module,
    factored_norm2,
    iter_present,
    merge_device,
    template,
    wrap,
)
from geometry.merging.tsv import polar
from geometry.merging.weights import MergeWeights, WeightsSpec
from geometry.types import Adapter, ModuleKey

#: parameters (besides ``weights``, ``dtype``, ``device``) each method registered here takes
PARAMS: dict[str, tuple[str, ...]] = {
    "iso_c": ("alpha", "spectrum", "rank"),
    "iso_cts": ("alpha", "common_space_fraction", "spectrum", "rank"),
}

Spectrum = Literal["rank", "full"]


def check_spectrum(spectrum: str) -> str:
    if spectrum not in ("rank", "full"):
        raise MergeParameterError(f"spectrum must be 'rank' or 'full', got {spectrum!r}")
    return spectrum


def cts_split(D: int, n_tasks: int, common_space_fraction: float) -> tuple[int, int]:
    """``(k_c, n)``: common directions and directions per task out of ``D`` (the authors' rounding)."""
    k_c = int(D * common_space_fraction)
    specific = round((D - k_c) / n_tasks) * n_tasks
    if specific > D:
        specific -= n_tasks
    k_c = D - specific
    return k_c, specific // n_tasks


def _stacked(adapters: Sequence[Adapter], key: ModuleKey, wk: Sequence[float], dev: torch.device):
    """``[(lambda_t s_t B_t, A_t)]`` in float64 on ``dev`` for the adapters that have ``key``."""
    out = []
    for t, mod in iter_present(adapters, key):
        B = (float(wk[t]) * float(mod.scale)) * mod.B.to(device=dev, dtype=torch.float64)
        out.append((B, mod.A.to(device=dev, dtype=torch.float64)))
    return out


def _keep_top(B: torch.Tensor, A: torch.Tensor, rank: int | None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """First ``rank`` components of ``B @ A`` (columns already in order), with the energy they keep."""
    if rank is None or A.shape[0] <= rank:
        return B, A, 1.0
    total = factored_norm2(B, A)
    B2, A2 = B[:, :rank], A[:rank]
    return B2, A2, (1.0 if total == 0.0 else factored_norm2(B2, A2) / total)



# --------------------------------------------------------------------------------------- Iso-C
def iso_c_factors(
    parts: Sequence[tuple[torch.Tensor, torch.Tensor]],
    m: int,
    n: int,
    *,
    alpha: float = 1.0,
    spectrum: Spectrum = "rank",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` of Iso-C for weighted factors ``[(lambda_t s_t B_t, A_t)]``: ``alpha sigma_bar U``, ``V^T``."""
    B_cat = torch.cat([b for b, _ in parts], dim=1)
    A_cat = torch.cat([a for _, a in parts], dim=0)
    svd = lowrank_svd(B_cat, A_cat, device=B_cat.device).truncated()
    R = int(svd.rank)
    if R == 0:
        return B_cat.new_zeros(m, 0), B_cat.new_zeros(0, n)
    sigma_bar = float(svd.S.sum()) / (R if spectrum == "rank" else min(m, n))
    return svd.U * (float(alpha) * sigma_bar), svd.V.T.contiguous()


def iso_c(
    adapters: Sequence[Adapter],
    weights: WeightsSpec = None,
    *,
    alpha: float = 1.0,
    spectrum: Spectrum = "rank",
    rank: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> MergedAdapter:
    """Iso-C per module: task arithmetic with a flat spectrum, ``alpha sigma_bar U V^T``; see module docstring."""
    check_mergeable(adapters)
    rank = check_rank(rank)
    spectrum = check_spectrum(spectrum)
    dev = merge_device(device)
    w = MergeWeights(weights, len(adapters), default=1.0)
    modules: dict = {}
    for key in all_keys(adapters):
        first = template(adapters, key)
        m, n = first.shape
        B, A = iso_c_factors(_stacked(adapters, key, w.at(key), dev), m, n, alpha=alpha, spectrum=spectrum)
        B, A, kept = _keep_top(B, A, rank)
        rank_sum = sum(int(mod.r) for _, mod in iter_present(adapters, key))
        modules[key] = factored_module(first, key, B, A, dtype, kept, rank_sum)
    params = {"weights": w.describe(), "alpha": float(alpha), "spectrum": spectrum, "rank": rank}
    return wrap("iso_c", params, adapters, modules)


# ------------------------------------------------------------------------------------- Iso-CTS
def _svd_above(M: torch.Tensor, tol: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``(U, S, V)`` of ``M`` keeping the singular values ``> tol``."""
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    k = int((S > tol).sum())
    return U[:, :k], S[:k], Vh[:k].T


def iso_cts_factors(
    parts: Sequence[tuple[torch.Tensor, torch.Tensor]],
    m: int,
    n: int,
    *,
    common_space_fraction: float = 0.8,
    alpha: float = 1.0,
    spectrum: Spectrum = "rank",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` of Iso-CTS for weighted factors ``[(lambda_t s_t B_t, A_t)]``, columns by decreasing
    singular value before flattening (common first)."""
    B_cat = torch.cat([b for b, _ in parts], dim=1)
    A_cat = torch.cat([a for _, a in parts], dim=0)
    dev = B_cat.device
    Qb, kb = orthonormal_basis(B_cat, device=dev)
    Qa, ka = orthonormal_basis(A_cat.T, device=dev)
    if kb == 0 or ka == 0:
        return B_cat.new_zeros(m, 0), B_cat.new_zeros(0, n)
    Qb, Qa = Qb[:, :kb], Qa[:, :ka]
    cores = [(Qb.T @ b) @ (a @ Qa) for b, a in parts]  # tau_t = Qb C_t Qa^T
    C = sum(cores)
    scale = max([float(torch.linalg.matrix_norm(c, ord=2)) for c in [C, *cores]])
    tol = max(m, n) * EPS64 * scale
    Uc, Sc, Vc = _svd_above(C, tol)
    R = int(Sc.shape[0])
    T = len(parts)
    D = R if spectrum == "rank" else min(m, n)
    k_c, n_per = cts_split(D, T, common_space_fraction)
    k_c = min(k_c, R)
    Ucom, Scom, Vcom = Uc[:, :k_c], Sc[:k_c], Vc[:, :k_c]
    Us, Ss, Vs = [Ucom], [Scom], [Vcom]
    if n_per > 0:
        for core in cores:
            resid = core - Ucom @ (Ucom.T @ core)
            Ut, St, Vt = _svd_above(resid, tol)
            Us.append(Ut[:, :n_per])
            Ss.append(St[:n_per])
            Vs.append(Vt[:, :n_per])
    S_comb = torch.cat(Ss)
    k = int(S_comb.shape[0])
    if k == 0:
        return B_cat.new_zeros(m, 0), B_cat.new_zeros(0, n)
    order = torch.argsort(S_comb, descending=True, stable=True)
    U_comb, V_comb = torch.cat(Us, dim=1)[:, order], torch.cat(Vs, dim=1)[:, order]
    sigma_bar = float(S_comb.sum()) / (k if spectrum == "rank" else min(m, n))
    B = (Qb @ polar(U_comb)) * (float(alpha) * sigma_bar)
    A = (Qa @ polar(V_comb)).T.contiguous()
    return B, A


def iso_cts(
    adapters: Sequence[Adapter],
    weights: WeightsSpec = None,
    *,
    alpha: float = 1.0,
    common_space_fraction: float = 0.8,
    spectrum: Spectrum = "rank",
    rank: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> MergedAdapter:
    """Iso-CTS per module: common top of Delta_TA plus task-specific residual directions, flat spectrum."""
    check_mergeable(adapters)
    rank = check_rank(rank)
    spectrum = check_spectrum(spectrum)
    f = float(common_space_fraction)
    if not 0.0 <= f <= 1.0:
        raise MergeParameterError(f"common_space_fraction must be in [0, 1], got {common_space_fraction}")
    dev = merge_device(device)
    w = MergeWeights(weights, len(adapters), default=1.0)
    modules: dict = {}
    for key in all_keys(adapters):
        first = template(adapters, key)
        m, n = first.shape
        parts = _stacked(adapters, key, w.at(key), dev)
        B, A = iso_cts_factors(parts, m, n, common_space_fraction=f, alpha=alpha, spectrum=spectrum)
        B, A, kept = _keep_top(B, A, rank)
        rank_sum = sum(int(mod.r) for _, mod in iter_present(adapters, key))
        modules[key] = factored_module(first, key, B, A, dtype, kept, rank_sum)
    params = {
        "weights": w.describe(), "alpha": float(alpha), "common_space_fraction": f, "spectrum": spectrum, "rank": rank,
    }
    return wrap("iso_cts", params, adapters, modules)
