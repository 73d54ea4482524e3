"""KnOTS: align the task updates in the shared basis of their concatenation's SVD, then merge there.

Reference: Stoica, Ramesh, Ecsedi, Choshen, Hoffman 2025, *Model merging with SVD to tie the KnOTS*
(ICLR); code ``gstoica27/KnOTS`` (``task_merger.py``: ``SVDMerger.apply_svd`` / ``merge``,
``masking_ops.py``, ``configs/*knots*``), read for the conventions below.

Formula, per module, over the ``T`` adapters that have it (``tau_t = s_t B_t A_t``, ``m x n``)::

    [tau_1, ..., tau_T] = U S [V_1^T, ..., V_T^T]          (thin SVD of the m x Tn concatenation,
                                                             numerical rank k <= min(m, sum_t r_t))
    X_t   = S V_t^T   (k x n, ``scale_coordinates=True``)   or   V_t^T   (``False``)
    X     = merge(X_1, ..., X_T; lambda_1, ..., lambda_T)   element-wise, see ``merge_method``
    Delta = U X       (``scale_coordinates=True``)          or   U S X    (``False``)

so ``tau_t = U X_t`` (resp. ``U S X_t``) exactly: KnOTS only changes the coordinates in which the
element-wise merge acts. ``merge_method`` (the merge of the ``k x n`` coordinate matrices, with the
helpers of :mod:`~geometry.merging.ties` / :mod:`~geometry.merging.dare`, see :func:`combine_stacked`):

- ``"ties"`` (default, KnOTS-TIES): trim each ``X_t`` to its top ``density`` (default 0.2) entries,
  elect signs (``majority_sign_method``), disjoint mean of ``lambda_t X_t``;
- ``"dare_ties"`` (KnOTS-DARE-TIES): drop ``1 - density`` (default 0.5) of each ``X_t`` at random,
  rescale by ``1/density``, elect signs, disjoint mean (no second trim, as the authors' configs
  ``*_knots_dare_ties.py`` with ``topK: 100``);
- ``"dare_linear"``: drop and rescale, ``sum_t lambda_t hat X_t``;
- ``"task_arithmetic"``: ``sum_t lambda_t X_t``, which is exactly task arithmetic (a check).

Weights: ``lambda_t`` (per layer through :meth:`MergeWeights.at`) enter the element-wise merge, as in
:func:`~geometry.merging.ties.ties_tensors`: the SVD and the trim / sign election use the unweighted
``tau_t``, the mean (or sum) uses ``lambda_t X_t``. Default ``lambda_t = 1``.

Computed factored, never forming an ``m x n`` matrix: ``[tau_t] = [s_1 B_1, ..., s_T B_T]
blockdiag(A_1, ..., A_T)``; with ``[s_t B_t] = Q P`` (QR, ``Q`` ``m x min(m, R)``, ``R = sum r_t``)
and ``A_t^T = Qa_t Ra_t`` (QR) the concatenation is ``Q K blockdiag(Qa_t)^T`` with the small core
``K = [P_1 Ra_1^T, ..., P_T Ra_T^T]`` (``min(m, R) x R``) and ``blockdiag(Qa_t)`` orthonormal, so
``U = Q U_K`` and ``S = S_K`` from the SVD of ``K``; then ``S V_t^T = U^T tau_t = (U^T s_t B_t) A_t``.
Cost ``O((m + n) R^2 + T k n)``; the stored result is ``B = U`` (``U S``), ``A = X``: rank ``k``.
``rank`` truncates it (factored SVD, :func:`~geometry.merging.truncate.truncate_factored`) and
``energy_kept`` reports the fraction of ``||Delta||_F^2`` kept.

Conventions (where this differs from the authors' code):

- Concatenation along the input axis (``m x Tn``, their default ``concat_across_output=True``),
  SVD in float64; coordinates scaled by ``S`` before the merge (their default ``s_on_V=True``;
  ``scale_coordinates=False`` merges the unscaled ``V_t^T`` and multiplies by ``S`` after, as the
  ``knots`` merge space of ``apanariello4/core-space-merging``'s ``MatrixPerLayerMerger`` does).
  No row normalisation (their ``normalize_Vs_per_model`` is ``False`` and unused).
- Kept components: the numerical rank (``S_i > max(m, Tn) eps S_1``, :func:`geometry.linalg.factored.rank_mask`)
  instead of their absolute ``S_i > 1e-5``.
- Trim per module (``floor(density * k * n)`` entries of each ``X_t``), as this library's ``ties``;
  KnOTS trims each task's whole flattened model vector at once, keeping ties at the threshold.
- Weights ``lambda_t`` per task; their ``masked_merge`` multiplies every task by ``weights[0]``
  (one coefficient for all). A zero elected sign (mass exactly 0) is ``+1`` here, the sign of the
  total elected mass there. DARE masks come from a per-module seeded generator
  (:func:`~geometry.merging.dare.mask_generator`), theirs from ``torch.manual_seed`` and
  ``randint(...).bernoulli(1 - p)`` over the whole model; ``density = 1 - p``.
- **Sign convention**: singular vectors are defined up to sign; each column of ``U`` is flipped so
  that its entry of largest magnitude is positive (first such entry on ties), with ``V_t`` flipped
  alike. TIES and DARE are odd (``f(-X) = -f(X)`` entry-wise, same masks), so the result does not
  depend on the signs except where an elected mass is exactly 0, which elects ``+1``: rare with
  ``"total"``, frequent with ``"frequency"`` (e.g. one task ``+``, one ``-``, one trimmed), so
  there the result does depend on this convention, which makes it deterministic. Rotations within repeated singular values are not fixed (measure-zero for real
  adapters; an exact repeat makes the coordinates, hence TIES / DARE, basis-dependent).

Limits: element-wise in ``k x n`` coordinates (``k <= sum r_t``), never ``m x n``; memory ``T k n``.
Adapters lacking a module are left out of that module's SVD and merge. Each task keeps its head.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from geometry.errors import MergeParameterError
from geometry.linalg.factored import rank_mask
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
from geometry.merging.dare import drop_and_rescale, mask_generator
from geometry.merging.elementwise import check_density
from geometry.merging.ties import SignMethod, disjoint_mean, elect_sign, ties_tensors
from geometry.merging.truncate import truncate_factored
from geometry.merging.weights import MergeWeights, WeightsSpec
from geometry.types import Adapter, ModuleKey

#: parameters (besides ``weights``, ``dtype``, ``device``) of each method registered from this module
PARAMS: dict[str, tuple[str, ...]] = {
    "knots": ("merge_method", "density", "seed", "majority_sign_method", "scale_coordinates", "rank"),
}

#: element-wise merges of stacked coordinates available to KnOTS (and to Core Space merging)
ELEMENTWISE_METHODS: tuple[str, ...] = ("task_arithmetic", "ties", "dare_ties", "dare_linear")
#: default ``density`` of each method (this library's ``ties`` / ``dare_*`` defaults)
DEFAULT_DENSITY: dict[str, float] = {"ties": 0.2, "dare_ties": 0.5, "dare_linear": 0.5}


def check_method(merge_method: str, choices: Sequence[str]) -> str:
    if merge_method not in choices:
        raise MergeParameterError(f"merge_method must be one of {', '.join(choices)}; got {merge_method!r}")
    return merge_method


def check_sign_method(majority_sign_method: str) -> str:
    if majority_sign_method not in ("total", "frequency"):
        raise MergeParameterError(f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}")
    return majority_sign_method


def resolve_density(merge_method: str, density: float | None) -> float | None:
    """``density`` checked, or the method's default; ``None`` for methods that take none."""
    if merge_method not in DEFAULT_DENSITY:
        return None
    return check_density(DEFAULT_DENSITY[merge_method] if density is None else density)


def inner_params(merge_method: str, density: float | None, majority_sign_method: str, seed: int,
                 dev: torch.device) -> dict:
    """The parameters of the inner element-wise merge that its result depends on (for ``params``)."""
    out: dict = {} if density is None else {"density": density}
    if merge_method in ("ties", "dare_ties"):
        out["majority_sign_method"] = majority_sign_method
    if merge_method.startswith("dare"):
        out.update(seed=seed, mask_device=dev.type)
    return out


def combine_stacked(
    X: torch.Tensor,
    weights: torch.Tensor,
    merge_method: str,
    *,
    density: float | None = None,
    seed: int = 0,
    majority_sign_method: SignMethod = "total",
    key: ModuleKey | None = None,
) -> torch.Tensor:
    """Element-wise merge of stacked coordinates ``X (T, p, q)`` with weights ``(T,)`` -> ``(p, q)``.

    ``task_arithmetic``: ``sum_t w_t X_t``; ``ties``: :func:`~geometry.merging.ties.ties_tensors`;
    ``dare_linear`` / ``dare_ties``: :func:`~geometry.merging.dare.drop_and_rescale` with the
    module's seeded generator (``seed``, ``key``) on ``X``'s device, then sum / sign election and
    disjoint mean, exactly as :func:`~geometry.merging.dare.dare_linear` / ``dare_ties`` do on
    dense task vectors.
    """
    wv = weights.reshape(-1, *([1] * (X.dim() - 1))).to(X.dtype)
    if merge_method == "task_arithmetic":
        return (X * wv).sum(dim=0)
    if merge_method == "ties":
        return ties_tensors(X, weights.to(X.dtype), density, majority_sign_method)
    if merge_method in ("dare_ties", "dare_linear"):
        if key is None:
            raise MergeParameterError("DARE needs the module key (its masks are seeded per module)")
        dropped = drop_and_rescale(X, density, mask_generator(seed, key, X.device))
        if merge_method == "dare_linear":
            return (dropped * wv).sum(dim=0)
        return disjoint_mean(dropped * wv, elect_sign(dropped, majority_sign_method))
    raise MergeParameterError(f"unknown element-wise merge {merge_method!r}; choose one of {', '.join(ELEMENTWISE_METHODS)}")


def canonical_signs(U: torch.Tensor) -> torch.Tensor:
    """``(k,)`` of ``+-1``: the sign making each column's largest-magnitude entry positive (first on ties).

    A zero column gets ``+1``.
    """
    if U.shape[-1] == 0:
        return U.new_ones(0)
    idx = U.abs().argmax(dim=0)
    vals = U.gather(0, idx.unsqueeze(0)).squeeze(0)
    return torch.where(vals < 0, -1.0, 1.0).to(U.dtype)


def knots_basis(
    Bs: Sequence[torch.Tensor], As: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """``(U (m, k), S (k,), [S V_t^T (k, n)])`` of ``[B_1 A_1, ..., B_T A_T]`` (scales folded in ``B_t``).

    Factored (module docstring): QR of the stacked ``B``'s and of each ``A_t^T``, SVD of the
    ``min(m, R) x R`` core; numerical rank ``k`` (tolerance of an ``m x Tn`` matrix); canonical signs.
    """
    m, n, T = int(Bs[0].shape[0]), int(As[0].shape[1]), len(Bs)
    Q, P = torch.linalg.qr(torch.cat(list(Bs), dim=1))
    blocks, col = [], 0
    for A in As:
        r = int(A.shape[0])
        Ra = torch.linalg.qr(A.T, mode="r")[1]  # A^T = Qa Ra, Qa has orthonormal columns
        blocks.append(P[:, col : col + r] @ Ra.T)
        col += r
    Uk, S, _ = torch.linalg.svd(torch.cat(blocks, dim=1), full_matrices=False)
    keep = rank_mask(S, m, T * n)
    U = Q @ Uk[:, keep]
    S = S[keep]
    U = U * canonical_signs(U)
    coords = [(U.T @ B) @ A for B, A in zip(Bs, As)]
    return U, S, coords


def knots(
    adapters: Sequence[Adapter],
    weights: WeightsSpec = None,
    *,
    merge_method: str = "ties",
    density: float | None = None,
    seed: int = 0,
    majority_sign_method: SignMethod = "total",
    scale_coordinates: bool = True,
    rank: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> MergedAdapter:
    """KnOTS: element-wise merge of the coordinates in the concatenation's SVD basis; see module docstring."""
    check_mergeable(adapters)
    check_method(merge_method, ELEMENTWISE_METHODS)
    check_sign_method(majority_sign_method)
    density = resolve_density(merge_method, density)
    rank = check_rank(rank)
    dev = merge_device(device)
    w = MergeWeights(weights, len(adapters), default=1.0)
    modules: dict[ModuleKey, MergedModule] = {}
    for key in all_keys(adapters):
        wk = w.at(key)
        present = list(iter_present(adapters, key))
        Bs = [mod.scale * mod.B.to(device=dev, dtype=torch.float64) for _, mod in present]
        As = [mod.A.to(device=dev, dtype=torch.float64) for _, mod in present]
        U, S, coords = knots_basis(Bs, As)
        X = torch.stack(coords)  # (T, k, n): S V_t^T
        if not scale_coordinates:
            X = X / S.reshape(1, -1, 1)  # V_t^T (S > 0 on the kept components)
        wt = torch.tensor([wk[t] for t, _ in present], dtype=torch.float64, device=dev)
        Xm = combine_stacked(X, wt, merge_method, density=density, seed=seed,
                             majority_sign_method=majority_sign_method, key=key)
        B = U if scale_coordinates else U * S
        A = Xm
        kept = 1.0
        if rank is not None and int(A.shape[0]) > rank:
            B, A, kept = truncate_factored(B, A, rank, device=dev)
        rank_sum = sum(mod.rank for _, mod in present)
        modules[key] = factored_module(template(adapters, key), key, B, A, dtype, kept, rank_sum)
    params = {"merge_method": merge_method, "scale_coordinates": bool(scale_coordinates),
              "weights": w.describe(), "rank": rank,
              **inner_params(merge_method, density, majority_sign_method, seed, dev)}
    return wrap("knots", params, adapters, modules)
