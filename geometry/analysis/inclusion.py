"""Spectral inclusion ``tau1 -> tau2`` (Fosse et al., TALN 2025), by its exact closed form.

"Does the model fine-tuned on task 1 encode information about task 2?" Write the task vector of
task 1 as its thin SVD ``tau1 = U diag(S1) V^T`` (``S1`` has ``r1`` non-zero values, ``r1`` the
numerical rank) and project ``tau2`` on that singular basis:

    S2 = argmin over S >= 0 of  ||U diag(S) V^T - tau2||_F + lambda * ||S||_1      (paper, eq. 3-4)

The notation ``tau1 -> tau2`` reads "from the space of 1, project 2"; the measure is asymmetric.
``S1`` and ``S2`` are then compared with the metrics of :mod:`geometry.linalg.spectra` (L1, L2, REC,
normalised entropy).

Closed form. The rank-one matrices ``u_i v_i^T`` are orthonormal for the Frobenius inner product,
so with ``c_i = u_i^T tau2 v_i`` and the part of ``tau2`` outside their span
``rho^2 = ||tau2||_F^2 - ||c||^2``:

    ||U diag(S) V^T - tau2||_F^2 = ||S - c||^2 + rho^2.

``c`` is computed without any ``m x n`` matrix: ``c = s2 * diag((U^T B2)(A2 V))``. ``rho`` is taken
from the norm of the QR core of ``tau2 - U diag(c) V^T = [s2 B2, -U diag(c)] [A2; V^T]`` rather than
from the difference of squares, which loses half the digits when ``tau2`` lies almost in the span.

* ``lambda = 0`` (both objectives): ``S2_i = max(0, c_i)``.
* ``objective="frobenius"`` (default, the paper's eq. 4 exactly: non-squared norm plus
  ``lambda ||S||_1``): ``S2_i = max(0, c_i - t)`` with ``t = lambda * R*``, ``R*`` the optimal
  residual norm. Derivation: for ``R > 0`` the objective is differentiable in the interior;
  stationarity gives ``(S_i - c_i) / R + lambda = 0`` where ``S_i > 0`` and ``c_i / R <= lambda``
  where ``S_i = 0``, i.e. a soft threshold at ``t = lambda R``, and ``R`` must be consistent:
  ``t^2 = lambda^2 g(t)`` with ``g(t) = rho^2 + sum_i min(c_i, t)^2`` (``c_i <= 0`` terms contribute
  ``c_i^2``). ``g(t) / t^2`` is non-increasing, so the root is unique; on the segment where ``j``
  of the ``c_i`` exceed ``t`` it reads ``t = lambda sqrt(Q_j / (1 - lambda^2 j))`` with ``Q_j`` the
  sum of ``rho^2`` and the squares of the other ``c_i``. The solver evaluates every segment's
  candidate (clamped to its segment) and keeps the best objective, which also covers the
  degenerate case ``tau2 = U diag(c) V^T`` with ``c >= 0`` (the norm is not differentiable at a
  zero residual; for ``lambda * sqrt(#{c_i > 0}) <= 1`` the minimiser is ``S2 = c``, unshrunk). The level is relative: scaling ``tau2`` scales ``S2``. ``S2 = 0``
  exactly when ``lambda >= max_i c_i / ||tau2||_F``, so always for ``lambda >= 1`` (for ``S >= 0``,
  ``f(S) >= ||tau2|| - ||S||_2 + lambda ||S||_1 >= f(0)``).
* ``objective="squared"`` (``||.||_F^2 + lambda ||S||_1``): ``S2_i = max(0, c_i - lambda / 2)``, an
  absolute threshold in the units of ``tau2``.

The paper solved the problem with Adam (its Algorithm 1); :func:`adam_spectrum`,
:func:`adam_inclusion` and :func:`adam_inclusion_dense` reproduce it as a cross-check only.
Its Table 5 t-tests between per-module metric samples are :func:`geometry.analysis.stats.ttest`
(re-exported here).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
import torch

from geometry.errors import InvalidArgumentError
from geometry.linalg.align import check_compatible, common_keys
from geometry.linalg.decompose import AdapterSVD, decompose_adapter, stack_factors
from geometry.linalg.factored import LowRankSVD, diff_fro_norm
from geometry.linalg.spectra import entropy, lp, rec
from geometry.types import Adapter, ModuleKey, ordered_keys

Objective = Literal["frobenius", "squared"]
OBJECTIVES: tuple[str, ...] = ("frobenius", "squared")

__all__ = [
    "OBJECTIVES",
    "INCLUSION_COLUMNS",
    "INCLUSION_METRICS",
    "common_modules",
    "inclusion",
    "inclusion_matrices",
    "inclusion_tables",
    "inclusion_matrix",
    "lambda_sweep",
    "projection_coefficients",
    "projection_residual",
    "solve_spectrum",
    "project_spectrum",
    "inclusion_objective",
]


def _check_objective(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise InvalidArgumentError(f"objective must be one of {OBJECTIVES}, got {objective!r}")


def projection_coefficients(
    svd1: LowRankSVD, B2: torch.Tensor, A2: torch.Tensor, scale2: float | torch.Tensor = 1.0
) -> torch.Tensor:
    """``c_i = u_i^T tau2 v_i`` for ``tau2 = scale2 * B2 @ A2``, as ``s2 * diag((U^T B2)(A2 V))``.

    Batched over leading dimensions (``B2 (..., m, r2)``, ``A2 (..., r2, n)``, ``scale2`` a float or
    a ``(...)`` tensor). Directions beyond the numerical rank of ``tau1`` get ``c_i = 0``. Float64.
    Independent of the joint sign of ``(u_i, v_i)``.
    """
    U, V = svd1.U, svd1.V
    B2 = B2.to(device=U.device, dtype=torch.float64)
    A2 = A2.to(device=U.device, dtype=torch.float64)
    left = U.transpose(-1, -2) @ B2  # (..., k, r2)
    right = A2 @ V  # (..., r2, k)
    c = torch.einsum("...ij,...ji->...i", left, right)
    scale = torch.as_tensor(scale2, dtype=torch.float64, device=U.device)
    c = c * scale.unsqueeze(-1) if scale.ndim else c * scale
    return torch.where(svd1.mask, c, torch.zeros_like(c))


def projection_residual(
    svd1: LowRankSVD,
    B2: torch.Tensor,
    A2: torch.Tensor,
    scale2: float | torch.Tensor = 1.0,
    c: torch.Tensor | None = None,
) -> torch.Tensor:
    """``rho = ||tau2 - U diag(c) V^T||_F``, the part of ``tau2`` outside the span of the ``u_i v_i^T``.

    Computed as the Frobenius norm of the QR core of ``[s2 B2, -U diag(c)] [A2; V^T]`` (an
    ``(r2 + k) x (r2 + k)`` matrix, :func:`geometry.linalg.factored.diff_fro_norm`), never as
    ``sqrt(||tau2||^2 - ||c||^2)``. Batched, float64.
    """
    if c is None:
        c = projection_coefficients(svd1, B2, A2, scale2)
    U, V = svd1.U, svd1.V
    return diff_fro_norm(B2, A2, scale2, U * c.unsqueeze(-2), V.mT, 1.0, device=U.device)


def inclusion_objective(
    S: torch.Tensor, c: torch.Tensor, rho: torch.Tensor, lam: float, objective: Objective = "frobenius"
) -> torch.Tensor:
    """The objective in the ``r``-dimensional coordinates, from ``||U S V^T - tau2||^2 = ||S - c||^2 + rho^2``.

    ``frobenius``: ``sqrt(||S - c||^2 + rho^2) + lam * ||S||_1``; ``squared``: ``||S - c||^2 + rho^2 + lam * ||S||_1``.
    """
    _check_objective(objective)
    sq = ((S - c) ** 2).sum(-1) + rho**2
    fit = torch.sqrt(sq) if objective == "frobenius" else sq
    return fit + lam * S.abs().sum(-1)


def solve_spectrum(
    c: torch.Tensor, rho: torch.Tensor | float, lam: float = 0.0, objective: Objective = "frobenius"
) -> torch.Tensor:
    """Exact minimiser over ``S >= 0`` of :func:`inclusion_objective`, batched over leading dims.

    ``lam = 0``: ``max(0, c)``. ``squared``: ``max(0, c - lam / 2)``. ``frobenius``: ``max(0, c - t)``
    with ``t = lam * R*`` found exactly (see the module docstring). ``rho`` is only used for
    ``frobenius`` with ``lam > 0``.
    """
    _check_objective(objective)
    if lam < 0 or not math.isfinite(lam):
        raise InvalidArgumentError(f"lambda must be a finite number >= 0, got {lam}")
    c = c.to(torch.float64)
    if lam == 0:
        return c.clamp(min=0.0)
    if objective == "squared":
        return (c - lam / 2).clamp(min=0.0)
    rho = torch.as_tensor(rho, dtype=torch.float64, device=c.device).expand(c.shape[:-1])
    k = c.shape[-1]
    pos = c.clamp(min=0.0)
    ps = torch.sort(pos, dim=-1, descending=True).values  # (..., k)
    base = rho**2 + torch.where(c <= 0, c**2, torch.zeros_like(c)).sum(-1)  # (...)
    # tail[j] = sum_{i >= j} ps_i^2 for j = 0..k (tail[k] = 0): squares of the c_i not above t.
    sq = ps**2
    tail = torch.flip(torch.cumsum(torch.flip(sq, [-1]), -1), [-1])
    tail = torch.cat([tail, torch.zeros_like(tail[..., :1])], dim=-1)  # (..., k + 1)
    j = torch.arange(k + 1, dtype=torch.float64, device=c.device)
    Q = base.unsqueeze(-1) + tail
    denom = 1.0 - lam**2 * j
    t = torch.where(denom > 0, lam * torch.sqrt(Q / denom.clamp(min=1e-300)), torch.full_like(Q, math.inf))
    inf = torch.full_like(ps[..., :1], math.inf)
    upper = torch.cat([inf, ps], dim=-1)  # segment j: ps_j <= t <= ps_{j-1}
    lower = torch.cat([ps, torch.zeros_like(ps[..., :1])], dim=-1)
    t = torch.minimum(torch.maximum(t, lower), upper)
    # Evaluate each candidate threshold; the true one is among them.
    cand = (c.unsqueeze(-2) - t.unsqueeze(-1)).clamp(min=0.0)  # (..., k + 1, k)
    values = inclusion_objective(cand, c.unsqueeze(-2), rho.unsqueeze(-1), lam, "frobenius")
    best = torch.argmin(values, dim=-1)  # (...)
    index = best[..., None, None].expand(*best.shape, 1, k)
    return torch.gather(cand, -2, index).squeeze(-2)


def project_spectrum(
    svd1: LowRankSVD,
    B2: torch.Tensor,
    A2: torch.Tensor,
    scale2: float | torch.Tensor = 1.0,
    lam: float = 0.0,
    objective: Objective = "frobenius",
) -> torch.Tensor:
    """``S2`` of ``tau1 -> tau2`` by the closed form (``tau1`` given by its thin SVD ``svd1``).

    ``tau2 = scale2 * B2 @ A2``, batched like ``svd1``. Returns ``(..., k)`` float64 with zeros beyond
    the numerical rank of ``tau1``.
    """
    c = projection_coefficients(svd1, B2, A2, scale2)
    if lam > 0 and objective == "frobenius":
        rho = projection_residual(svd1, B2, A2, scale2, c=c)
    else:
        rho = torch.zeros(c.shape[:-1], dtype=torch.float64, device=c.device)
    S2 = solve_spectrum(c, rho, lam, objective)
    return torch.where(svd1.mask, S2, torch.zeros_like(S2))


# ----------------------------------------------------------------------------------------------
# Adapters: one row per common module, adapter-by-adapter matrices, the lambda sweep.
# ----------------------------------------------------------------------------------------------

#: Columns of :func:`inclusion` (``rank`` is the numerical rank of ``tau1``, the length of ``s1``, ``s2``).
INCLUSION_COLUMNS: tuple[str, ...] = (
    "stack", "layer", "kind", "rank", "s1", "s2",
    "l1", "l2", "l1_normalized", "l2_normalized", "rec", "h1", "h2",
)
#: Metrics available per module and for :func:`inclusion_matrix` / :func:`lambda_sweep`.
INCLUSION_METRICS: tuple[str, ...] = ("rec", "l1", "l2", "l1_normalized", "l2_normalized", "h1", "h2")


@dataclass
class _Batch:
    """Same-shaped modules of one ordered pair: ``S1``, ``c``, ``rho`` (if needed), numerical ranks."""

    keys: list[ModuleKey]
    S1: torch.Tensor
    c: torch.Tensor
    rank: np.ndarray
    rho: torch.Tensor | None


def _kind_set(kind: str | Iterable[str] | None) -> set[str] | None:
    return None if kind is None else {kind} if isinstance(kind, str) else set(kind)


def common_modules(
    adapter1: Adapter, adapter2: Adapter, *, kind: str | Iterable[str] | None = None, stack: str | None = None
) -> list[ModuleKey]:
    """Keys present in both adapters (optionally of ``kind``, one or several, and ``stack``), in display order.

    Raises :class:`IncompatibleAdaptersError` (:func:`geometry.linalg.align.check_compatible`) when a
    common module has different shapes in the two adapters.
    """
    check_compatible([adapter1, adapter2])
    kind_set = _kind_set(kind)
    return ordered_keys(k for k in common_keys([adapter1, adapter2], stack=stack)
                        if kind_set is None or k.kind in kind_set)


def _batches(dec1: AdapterSVD, ad2: Adapter, keys: list[ModuleKey], need_rho: bool) -> list[_Batch]:
    """Group ``keys`` by (decomposition group of tau1, rank of tau2) and compute ``c`` (and ``rho``)."""
    groups: dict[tuple[int, int], list[tuple[int, ModuleKey]]] = defaultdict(list)
    for key in keys:
        g, i = dec1.locate(key)
        groups[(g, ad2.modules[key].rank)].append((i, key))
    out = []
    for (g, _), items in groups.items():
        svd = dec1.groups[g][1]
        positions = [i for i, _ in items]
        rank = torch.as_tensor(svd.rank, device=svd.S.device).reshape(-1)
        if positions == list(range(svd.S.shape[0])):  # the whole group, in order: no copy
            sub = LowRankSVD(svd.U, svd.S, svd.V, rank)
        else:
            idx = torch.tensor(positions, device=svd.S.device)
            sub = LowRankSVD(svd.U[idx], svd.S[idx], svd.V[idx], rank[idx])
        sub_keys = [k for _, k in items]
        B2, A2, s2 = stack_factors(ad2, sub_keys, svd.S.device)
        c = projection_coefficients(sub, B2, A2, s2)
        rho = projection_residual(sub, B2, A2, s2, c=c) if need_rho else None
        out.append(_Batch(sub_keys, sub.S, c, sub.rank.cpu().numpy(), rho))
    return out


def _solve(batch: _Batch, lam: float, objective: Objective) -> torch.Tensor:
    rho = batch.rho if batch.rho is not None else torch.zeros(batch.c.shape[:-1], dtype=torch.float64)
    return solve_spectrum(batch.c, rho.to(batch.c.device), lam, objective)  # zeros beyond rank: c = 0 there


def _metrics(S1: np.ndarray, S2: np.ndarray, rank: np.ndarray) -> dict[str, np.ndarray]:
    """Every metric of :data:`INCLUSION_METRICS` for zero-padded spectra of ranks ``rank``."""
    with np.errstate(invalid="ignore"):
        return {
            "l1": lp(S1, S2, 1),
            "l2": lp(S1, S2, 2),
            "l1_normalized": lp(S1, S2, 1, normalized=True),
            "l2_normalized": lp(S1, S2, 2, normalized=True),
            "rec": rec(S1, S2),
            "h1": entropy(S1, n=rank),
            "h2": entropy(S2, n=rank),
        }


def _needs_rho(lam: float, objective: str) -> bool:
    _check_objective(objective)
    return lam > 0 and objective == "frobenius"


def inclusion(
    adapter1: Adapter,
    adapter2: Adapter,
    *,
    lam: float = 0.0,
    kind: str | Iterable[str] | None = None,
    objective: Objective = "frobenius",
    stack: str | None = None,
    device: torch.device | str | None = None,
) -> pd.DataFrame:
    """``tau1 -> tau2`` for every module the two adapters share: one row per module.

    Columns (:data:`INCLUSION_COLUMNS`): ``stack, layer, kind``; ``rank`` (numerical rank ``r1`` of
    ``tau1``); ``s1`` (the ``r1`` singular values of ``tau1``) and ``s2`` (the projected spectrum of
    ``tau2``, closed form, ``lam`` and ``objective`` as in :func:`solve_spectrum`); ``l1``, ``l2``
    (raw ``||S1 - S2||_p``, the paper's L_p); ``l1_normalized``, ``l2_normalized`` (on sum-normalised
    spectra); ``rec``; ``h1 = H(S1)``, ``h2 = H(S2)`` (normalised entropies over ``r1`` axes).
    Modules are batched by shape; rows in display order. No common module: an empty frame.
    A zero ``tau1`` (rank 0) or a zero ``S2`` gives NaN for the metrics that need a distribution.
    """
    keys = common_modules(adapter1, adapter2, kind=kind, stack=stack)
    if not keys:
        return pd.DataFrame(columns=list(INCLUSION_COLUMNS))
    return _table(decompose_adapter(adapter1, keys, device=device), adapter2, keys, lam, objective)


def _table(dec1: AdapterSVD, ad2: Adapter, keys: list[ModuleKey], lam: float, objective: Objective) -> pd.DataFrame:
    """The rows of :func:`inclusion` for ``keys``, from ``tau1``'s decomposition ``dec1``."""
    if not keys:
        return pd.DataFrame(columns=list(INCLUSION_COLUMNS))
    rows: dict[ModuleKey, dict] = {}
    for batch in _batches(dec1, ad2, keys, _needs_rho(lam, objective)):
        S1 = batch.S1.cpu().numpy()
        S2 = _solve(batch, lam, objective).cpu().numpy()
        metrics = _metrics(S1, S2, batch.rank)
        for i, key in enumerate(batch.keys):
            r1 = int(batch.rank[i])
            row = {"stack": key.stack, "layer": key.layer, "kind": key.kind, "rank": r1}
            row["s1"] = [float(v) for v in S1[i, :r1]]
            row["s2"] = [float(v) for v in S2[i, :r1]]
            row.update({name: float(values[i]) for name, values in metrics.items()})
            rows[key] = row
    return pd.DataFrame([rows[k] for k in ordered_keys(rows)], columns=list(INCLUSION_COLUMNS))


def inclusion_tables(
    adapters: Sequence[Adapter],
    *,
    lam: float = 0.0,
    kind: str | Iterable[str] | None = None,
    objective: Objective = "frobenius",
    stack: str | None = None,
    device: torch.device | str | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> dict[tuple[int, int], pd.DataFrame]:
    """:func:`inclusion` of every ordered pair ``(i, j), i != j`` (``tau_i -> tau_j``), keyed ``(i, j)``.

    Each adapter is decomposed once (all its modules of ``kind`` / ``stack``) and that decomposition
    serves every pair it is the basis of: ``n`` decompositions for ``n (n - 1)`` tables, equal to
    calling :func:`inclusion` pair by pair. ``progress(done, total, message)`` after each pair.
    """
    n = len(adapters)
    kind_set = _kind_set(kind)
    decs = [
        decompose_adapter(ad, [k for k in ad.modules if (kind_set is None or k.kind in kind_set)
                               and (stack is None or k.stack == stack)], device=device)
        for ad in adapters
    ]
    out: dict[tuple[int, int], pd.DataFrame] = {}
    total = n * (n - 1)
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            keys = common_modules(adapters[i], adapters[j], kind=kind, stack=stack)
            out[i, j] = _table(decs[i], adapters[j], keys, lam, objective)
            if progress is not None:
                progress(len(out), total, f"{adapters[i].name} -> {adapters[j].name}")
    return out


def inclusion_matrices(
    adapters: Sequence[Adapter],
    *,
    metrics: Iterable[str] = INCLUSION_METRICS,
    kind: str | None = None,
    lam: float = 0.0,
    objective: Objective = "frobenius",
    stack: str | None = None,
    device: torch.device | str | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> dict[str, np.ndarray]:
    """Asymmetric ``[n, n]`` matrices, one per metric: entry ``(i, j)`` is the mean over the modules
    common to adapters ``i`` and ``j`` (of ``kind`` when given) of the metric of ``tau_i -> tau_j``.

    Each adapter's modules are decomposed once. The diagonal is computed too (``REC = 1``,
    ``L1 = 0`` up to rounding: projecting ``tau`` on its own basis returns ``S1``). Modules with an
    undefined metric (NaN) are left out of the mean; a pair without common modules gives NaN.
    ``progress(done, total, message)`` is called after each ordered pair.
    """
    metrics = list(metrics)
    unknown = set(metrics) - set(INCLUSION_METRICS)
    if unknown:
        raise InvalidArgumentError(f"unknown inclusion metric(s) {sorted(unknown)}; expected some of {INCLUSION_METRICS}")
    need_rho = _needs_rho(lam, objective)
    n = len(adapters)
    decs = [
        decompose_adapter(ad, [k for k in ad.modules if (kind is None or k.kind == kind) and (stack is None or k.stack == stack)], device=device)
        for ad in adapters
    ]
    out = {m: np.full((n, n), np.nan) for m in metrics}
    done = 0
    for i in range(n):
        for j in range(n):
            keys = common_modules(adapters[i], adapters[j], kind=kind, stack=stack)
            values: dict[str, list[np.ndarray]] = defaultdict(list)
            for batch in _batches(decs[i], adapters[j], keys, need_rho):
                S2 = _solve(batch, lam, objective).cpu().numpy()
                for name, v in _metrics(batch.S1.cpu().numpy(), S2, batch.rank).items():
                    values[name].append(v)
            for m in metrics:
                if values[m]:
                    v = np.concatenate(values[m])
                    v = v[np.isfinite(v)]
                    out[m][i, j] = float(v.mean()) if v.size else np.nan
            done += 1
            if progress is not None:
                progress(done, n * n, f"{adapters[i].name} -> {adapters[j].name}")
    return out


def inclusion_matrix(
    adapters: Sequence[Adapter],
    *,
    metric: str = "rec",
    kind: str | None = None,
    lam: float = 0.0,
    objective: Objective = "frobenius",
    **kwargs,
) -> np.ndarray:
    """One metric of :func:`inclusion_matrices`: ``[n, n]``, row ``i`` = ``tau_i -> tau_j``."""
    return inclusion_matrices(adapters, metrics=[metric], kind=kind, lam=lam, objective=objective, **kwargs)[metric]


def lambda_sweep(
    adapter1: Adapter,
    adapter2: Adapter,
    *,
    lam: Iterable[float] = (0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0),
    objective: Objective = "frobenius",
    kind: str | Iterable[str] | None = None,
    stack: str | None = None,
    device: torch.device | str | None = None,
) -> pd.DataFrame:
    """The paper's appendix-A sweep (its Table 6): mean metrics of ``tau1 -> tau2`` for each ``lambda``.

    One row per ``lambda``: ``lam``, the means over modules of every metric of
    :data:`INCLUSION_METRICS` (NaN values left out), ``n_modules`` and ``n_zero`` (modules whose
    ``S2`` is entirely 0, where REC, ``h2`` and the normalised L_p are undefined). ``c`` and ``rho``
    are computed once; each ``lambda`` is a closed-form solve. With the default (paper's,
    non-squared) objective ``S2 = 0`` for every module once ``lambda >= 1``, so REC is NaN there
    and L1 is ``||S1||_1``; the paper's Adam iterates at ``lambda = 1`` were not at that optimum.
    """
    keys = common_modules(adapter1, adapter2, kind=kind, stack=stack)
    dec1 = decompose_adapter(adapter1, keys, device=device)
    batches = _batches(dec1, adapter2, keys, objective == "frobenius")
    rows = []
    for value in lam:
        values: dict[str, list[np.ndarray]] = defaultdict(list)
        n_zero = 0
        for batch in batches:
            S2 = _solve(batch, float(value), objective).cpu().numpy()
            n_zero += int((S2 <= 0).all(axis=-1).sum())
            for name, v in _metrics(batch.S1.cpu().numpy(), S2, batch.rank).items():
                values[name].append(v)
        row: dict[str, float | int] = {"lam": float(value)}
        for m in INCLUSION_METRICS:
            v = np.concatenate(values[m]) if values[m] else np.array([])
            v = v[np.isfinite(v)]
            row[m] = float(v.mean()) if v.size else float("nan")
        row["n_modules"] = len(keys)
        row["n_zero"] = n_zero
        rows.append(row)
    return pd.DataFrame(rows)
