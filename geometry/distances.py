"""Distances between adapters, module by module and layer by layer (SCIENCE.md section 1).

``T_d(i, j, k)`` is distance ``d`` between adapters ``i`` and ``j`` at layer ``k`` for one projection
kind (the paper's ``T^q_d``, ``T^v_d``); ``Tbar_d`` is its mean over all layers or the last ``K``
(:meth:`DistanceTensor.reduce`).

Metrics, per **factor** (``tau = s B A``, ``B (m, r)``, ``A (r, n)``; ``s`` = peft's scale):

=========  ======================================  ==========================================
factor     ``l2`` and ``cosine`` compare            ``grassmann`` compares
=========  ======================================  ==========================================
``ba``     the task vectors ``tau`` (``m x n``)      column spaces ``Im(tau)`` in ``R^m``
``b``      the stored ``B`` matrices (no scale)     column spaces ``Im(B)`` in ``R^m``
``a``      the stored ``A`` matrices (no scale)     row spaces ``Im(A^T)`` in ``R^n``
=========  ======================================  ==========================================

* ``l2``: ``||X1 - X2||_F``. ``cosine``: ``1 - <X1, X2>_F / (||X1||_F ||X2||_F)`` in ``[0, 2]``
  (sign-sensitive: ``d(tau, -tau) = 2``; NaN when either matrix is zero).
* ``grassmann``: ``d_G = sqrt(sum_i theta_i^2)`` over the principal angles ``theta_i`` between the
  two subspaces (numerical ranks ``r1``, ``r2``). **Convention for r1 != r2** (:data:`GRASSMANN_CONVENTION`):
  the sum runs over the ``min(r1, r2)`` angles, i.e. the distance from the smaller subspace to the
  nearest subspace of the larger one (0 when one contains the other); ``pad=True`` adds
  ``|r1 - r2|`` angles of ``pi / 2``. ``d_G <= sqrt(min(r1, r2)) * pi / 2``. When ``A`` has full
  row rank ``Im(BA) = Im(B)``, so ``ba`` and ``b`` Grassmann distances coincide (paper, appendix A).
* L2 and cosine on ``a`` / ``b`` alone compare matrices entry by entry: they need equal ranks
  (NaN otherwise) and depend on LoRA's parametrisation (``B M``, ``M^-1 A`` give the same ``tau``);
  Grassmann on ``a`` / ``b`` does not.

Exact factored computation (never ``B @ A``, never an ``m x n`` SVD). Per adapter and kind, once,
batched over layers: ``B = Qb Rb``, ``A^T = Qa Ra`` (float64), the SVD of the ``r x r`` core
``Rb Ra^T``, and orthonormal bases of ``Im(B)``, ``Im(A^T)`` in ``Qb`` / ``Qa`` coordinates. The QR
is a Cholesky QR (``R = chol(M^T M)``, ``Q = M R^-1`` kept implicit) for layers whose factor has
condition number ``<= COND_MAX`` (100: orthogonality error ``~ eps cond^2 <= 1e-12``) and a
Householder QR for the others (rank-deficient or ill-conditioned factors). Per pair, the only
large products are ``X1^T X2`` on each side (``G = Q1^T Q2``). With ``Q2 = Q1 G + P T`` (``P``
orthonormal, orthogonal to ``Q1``) every matrix of both adapters has exact coordinates in the joint
orthonormal basis ``[Q1, P]`` of dimension ``r1 + r2``, where all metrics are computed on tiny
matrices: differences are formed there (no ``||a||^2 + ||b||^2 - 2<a, b>`` cancellation) and small
principal angles come from sines (``geometry.factored.principal_angles``). ``T`` is the Cholesky
factor of ``I - G^T G`` when every cosine satisfies ``cos^2 <= 1/2`` (then it is perfectly
conditioned) and the R factor of the explicit residual ``Q2 - Q1 G`` otherwise.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from geometry.align import check_compatible, common_groups, common_keys
from geometry.device import default_device
from geometry.errors import AtlasError
from geometry.factored import EPS64, principal_angles, rank_mask
from geometry.types import Adapter

METRICS: tuple[str, ...] = ("l2", "cosine", "grassmann")
FACTORS: tuple[str, ...] = ("ba", "a", "b")
#: One sentence for pages and exports: what the Grassmann distance means when ranks differ.
GRASSMANN_CONVENTION = (
    "Grassmann distance d_G = sqrt(sum theta_i^2) over the min(r1, r2) principal angles between the column "
    "spaces: the distance from the smaller subspace to the nearest subspace of the larger one (0 when one "
    "contains the other)."
)
GRASSMANN_CONVENTION_PADDED = (
    "Grassmann distance d_G = sqrt(sum theta_i^2 + |r1 - r2| (pi/2)^2): the min(r1, r2) principal angles plus "
    "|r1 - r2| right angles for the extra dimensions of the larger space."
)
Progress = Callable[[int, int, str], None]


# ---------------------------------------------------------------------------------------------
# Labelled result
@dataclass
class DistanceTensor:
    """``values[i, j, k]``: distance between adapters ``i`` and ``j`` at ``layers[k]``.

    Symmetric in ``i, j`` with a zero diagonal; NaN where undefined (see the module docstring).
    """

    values: np.ndarray
    adapters: list[str]
    layers: list[int]
    metric: str
    factor: str
    kind: str
    stack: str = "model"
    pad: bool = False
    notes: list[str] = field(default_factory=list)

    def reduce(self, layers: str | Iterable[int] = "all") -> np.ndarray:
        """``Tbar_d``: mean over the chosen layers (``select_layers`` spec or layer indices), ``[n, n]``.

        NaN entries are skipped (a pair undefined at every chosen layer stays NaN).
        """
        chosen = select_layers(self.layers, layers)
        if not chosen:
            raise AtlasError(f"no layer selected by {layers!r} among layers {_ranges(self.layers)}")
        idx = [self.layers.index(v) for v in chosen]
        sub = self.values[:, :, idx]
        with np.errstate(invalid="ignore"):
            finite = np.isfinite(sub)
            total = np.where(finite, sub, 0.0).sum(-1)
            count = finite.sum(-1)
            return np.where(count > 0, total / np.maximum(count, 1), np.nan)

    def to_frame(self) -> pd.DataFrame:
        """Long table: one row per ``(i, j, layer)`` with ``i, j, adapter_i, adapter_j, layer, kind, value``."""
        n, _, nl = self.values.shape
        ii, jj, kk = np.meshgrid(np.arange(n), np.arange(n), np.arange(nl), indexing="ij")
        return pd.DataFrame(
            {
                "i": ii.ravel(),
                "j": jj.ravel(),
                "adapter_i": [self.adapters[i] for i in ii.ravel()],
                "adapter_j": [self.adapters[j] for j in jj.ravel()],
                "layer": np.asarray(self.layers, dtype=int)[kk.ravel()] if nl else np.zeros(0, dtype=int),
                "stack": self.stack,
                "kind": self.kind,
                "metric": self.metric,
                "factor": self.factor,
                "value": self.values.ravel(),
            }
        )

    @property
    def convention(self) -> str:
        """What the number means (the Grassmann rank convention for ``grassmann``)."""
        if self.metric == "grassmann":
            return GRASSMANN_CONVENTION_PADDED if self.pad else GRASSMANN_CONVENTION
        return {"l2": "L2 = ||X1 - X2||_F", "cosine": "cosine distance = 1 - <X1, X2>_F / (||X1||_F ||X2||_F)"}[
            self.metric
        ]


def _ranges(values: Sequence[int]) -> str:
    return ", ".join(map(str, values)) if len(values) <= 8 else f"{values[0]}..{values[-1]} ({len(values)} layers)"


def select_layers(layers: Sequence[int], spec: str | Iterable[int] | range | None = "all") -> list[int]:
    """Layers of ``layers`` chosen by ``spec``: ``"all"``, ``"last:K"``, ``"N,N,..."``, ``"A-B"`` (inclusive), or ints.

    Raises :class:`AtlasError` naming the available layers when the spec is malformed or names a
    layer that is not there.
    """
    avail = sorted(int(v) for v in layers)
    if spec is None:
        return avail
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text in ("", "all"):
            return avail
        m = re.fullmatch(r"last:(\d+)", text)
        if m:
            k = int(m.group(1))
            if k <= 0:
                raise AtlasError(f"layers 'last:{k}': K must be at least 1")
            return avail[-k:]
        wanted: list[int] = []
        for part in text.split(","):
            part = part.strip()
            r = re.fullmatch(r"(-?\d+)\s*-\s*(-?\d+)", part)
            if r:
                lo, hi = sorted((int(r.group(1)), int(r.group(2))))
                wanted += [v for v in avail if lo <= v <= hi]
            elif re.fullmatch(r"-?\d+", part):
                wanted.append(int(part))
            else:
                raise AtlasError(f"layers {spec!r}: expected 'all', 'last:K', 'N,N' or 'A-B'")
    else:
        wanted = [int(v) for v in spec]
    bad = [v for v in wanted if v not in avail]
    if bad:
        raise AtlasError(f"layers {bad} are not available (available: {_ranges(avail)})")
    return sorted(set(wanted))


# ---------------------------------------------------------------------------------------------
# Per-adapter decomposition (once per adapter and (stack, kind); batched over layers)
@dataclass
class _Side:
    """One factor side, batched over layers: ``M = Q R`` (``M = B`` or ``A^T``), basis ``Q W`` of ``Im(M)``.

    ``Q = X @ Rinv`` is kept implicit: ``X = M`` and ``Rinv = R^-1`` for layers on the Cholesky path,
    ``X = Q`` (Householder) and ``Rinv = I`` for the others.
    """

    X: torch.Tensor  # (L, d, k)
    Rinv: torch.Tensor  # (L, k, k)
    R: torch.Tensor  # (L, k, r)
    W: torch.Tensor  # (L, k, k) basis coordinates, tail zeroed
    rank: torch.Tensor  # (L,)
    in_place: bool = False  # X is the input M itself (a view of the shared buffer)
    x_of: Callable[[torch.Tensor], torch.Tensor] | None = None  # X[idx] when X is not stored

    def Q(self, idx: torch.Tensor) -> torch.Tensor:
        """Explicit orthonormal ``Q`` of the batch items ``idx``."""
        X = self.X[idx] if self.x_of is None else self.x_of(idx)
        return X @ self.Rinv[idx]


@dataclass
class _Decomp:
    b: _Side
    a: _Side
    Uc: torch.Tensor  # (L, kb, k): U = Qb Uc
    S: torch.Tensor  # (L, k)
    Vc: torch.Tensor  # (L, ka, k): V = Qa Vc
    rank: torch.Tensor  # (L,)
    r: torch.Tensor  # (L,) nominal ranks


#: Largest condition number of a factor for the Cholesky path (errors ~ eps * cond^2 <= 1e-12).
COND_MAX = 100.0


def _side(M: torch.Tensor) -> _Side:
    """``M (L, d, r)`` float64. Cholesky of ``M^T M`` where ``cond(M) <= COND_MAX``, Householder QR elsewhere."""
    nl, d, r = M.shape
    eye = torch.eye(r, dtype=M.dtype, device=M.device).expand(nl, r, r)
    if d >= r and r > 0:
        C, info = torch.linalg.cholesky_ex(M.mT @ M)
        R = C.mT
        Ur, Sr, _ = torch.linalg.svd(R)
        ok = (info == 0) & (Sr[:, -1] * COND_MAX > Sr[:, 0])
        Rinv = torch.linalg.solve_triangular(torch.where(ok[:, None, None], R, eye), eye, upper=True)
        X = M
    else:
        ok = torch.zeros(nl, dtype=torch.bool, device=M.device)
    in_place = True
    if not bool(ok.all()):
        if not bool(ok.any()):
            Qh, R = torch.linalg.qr(M)
            Ur, Sr, _ = torch.linalg.svd(R, full_matrices=False)
            Rinv = torch.eye(Qh.shape[-1], dtype=M.dtype, device=M.device).expand(nl, -1, -1).clone()
            if Qh.shape == M.shape:  # d >= r: Q replaces M in place (M is not needed any more)
                M.copy_(Qh)
                X = M
            else:
                X, in_place = Qh, False
        else:  # d >= r: Householder only for the ill-conditioned layers, written over M in place
            bad = (~ok).nonzero().squeeze(-1)
            Qh, Rh = torch.linalg.qr(M[bad])
            R, Rinv, Ur, Sr = R.clone(), Rinv.clone(), Ur.clone(), Sr.clone()
            M[bad], R[bad], Rinv[bad] = Qh, Rh, eye[bad]
            Ur[bad], Sr[bad], _ = torch.linalg.svd(Rh)
            X = M
    keep = rank_mask(Sr, d, r)
    k = X.shape[-1]
    W = torch.zeros(nl, k, k, dtype=M.dtype, device=M.device)
    W[..., : Ur.shape[-1]] = Ur * keep.unsqueeze(-2)
    return _Side(X, Rinv, R, W, keep.sum(-1), in_place)


def _decompose(B: torch.Tensor, At: torch.Tensor, scale: torch.Tensor, r: torch.Tensor) -> _Decomp:
    """``B (L, m, r)``, ``At = A^T (L, n, r)`` float64 (overwritten), ``scale (L,)``: what the pairs need."""
    m, n = B.shape[-2], At.shape[-2]
    b, a = _side(B), _side(At)
    Uc, Sc, Vch = torch.linalg.svd(b.R @ a.R.mT, full_matrices=False)
    S = Sc * scale.abs().unsqueeze(-1)
    keep = rank_mask(S, m, n)
    sign = torch.where(scale < 0, -1.0, 1.0).to(S.dtype)[:, None, None]
    return _Decomp(b, a, Uc * keep.unsqueeze(-2) * sign, S * keep, Vch.mT * keep.unsqueeze(-2), keep.sum(-1), r)


def _buffer(pool: dict, name: str, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """A float64 tensor of ``shape`` carved from a reusable flat buffer (fresh pages cost time)."""
    need = math.prod(shape)
    flat = pool.get(name)
    if flat is None or flat.numel() < need or flat.device != device:
        flat = pool[name] = torch.empty(need, dtype=torch.float64, device=device)
    return flat[:need].view(shape)


def _stack_all(adapters: Sequence[Adapter], keys, device: torch.device, pool: dict | None = None):
    """Decompose every adapter's modules ``keys`` (one kind, several layers), batched over layers.

    The factors are converted to float64 straight into two shared buffers ``Mb (L, m, N rp)`` and
    ``Ma (L, n, N rp)`` (adapter ``i`` in columns ``i rp .. (i + 1) rp``, zero-padded to the largest
    rank ``rp``, which changes no subspace or product), so that the pair products ``X_i^T X_j`` of
    adapter ``i`` with all later adapters are one wide matrix product. Returns ``(decomps, Mb, Ma, rp)``.
    """
    mods = [[ad.modules[k] for k in keys] for ad in adapters]
    rp = max(mod.rank for ms in mods for mod in ms)
    nl, (m_, n_), na = len(keys), mods[0][0].shape, len(adapters)
    pool = {} if pool is None else pool
    Mb = _buffer(pool, "b", (nl, m_, na * rp), device)
    Ma = _buffer(pool, "a", (nl, n_, na * rp), device)
    for i, ms in enumerate(mods):
        for layer, mod in enumerate(ms):
            Mb[layer, :, i * rp : i * rp + mod.rank].copy_(mod.B.detach())
            Ma[layer, :, i * rp : i * rp + mod.rank].copy_(mod.A.detach().mT)
            if mod.rank < rp:
                Mb[layer, :, i * rp + mod.rank : (i + 1) * rp] = 0.0
                Ma[layer, :, i * rp + mod.rank : (i + 1) * rp] = 0.0
    decomps = []
    for i, ms in enumerate(mods):
        scale = torch.tensor([float(mod.scale) for mod in ms], dtype=torch.float64, device=device)
        r = torch.tensor([mod.rank for mod in ms], device=device)
        cols = slice(i * rp, (i + 1) * rp)
        decomps.append(_decompose(Mb[..., cols], Ma[..., cols], scale, r))
    return decomps, Mb, Ma, rp


def _all_pairs(
    decomps: list[_Decomp], bufs: dict[str, torch.Tensor], rp: int, wanted: set[tuple[str, str]], pad: bool
) -> tuple[list[tuple[int, int]], dict[tuple[str, str], torch.Tensor]]:
    """Every pair ``i < j`` at once: the small per-adapter tensors are stacked into one batch of
    ``pairs x layers`` items (few large kernels instead of many small ones). Needs every side in place."""
    na, nl = len(decomps), decomps[0].S.shape[0]
    pairs = [(i, j) for i in range(na) for j in range(i + 1, na)]
    dev = decomps[0].S.device
    left = torch.tensor([p[0] for p in pairs], device=dev)
    right = torch.tensor([p[1] for p in pairs], device=dev)

    def pick(values: list[torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
        return torch.stack(values)[idx].flatten(0, 1)

    def x_of(buf: torch.Tensor, owners: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        view = buf.unflatten(-1, (na, rp))  # (L, d, N, rp)

        def get(flat: torch.Tensor) -> torch.Tensor:
            return view[flat % nl, :, owners[flat // nl], :]

        return get

    def side(name: str, idx: torch.Tensor) -> _Side | None:
        if name not in bufs:
            return None
        sides = [getattr(d, name) for d in decomps]
        return _Side(
            None,  # type: ignore[arg-type]
            pick([s.Rinv for s in sides], idx),
            pick([s.R for s in sides], idx),
            pick([s.W for s in sides], idx),
            pick([s.rank for s in sides], idx),
            True,
            x_of(bufs[name], idx),
        )

    def decomp(idx: torch.Tensor) -> _Decomp:
        return _Decomp(
            side("b", idx),
            side("a", idx),
            pick([d.Uc for d in decomps], idx),
            pick([d.S for d in decomps], idx),
            pick([d.Vc for d in decomps], idx),
            pick([d.rank for d in decomps], idx),
            pick([d.r for d in decomps], idx),
        )

    crosses = {}
    for name, buf in bufs.items():
        blocks = []
        for i in range(na - 1):
            P = getattr(decomps[i], name).X.mT @ buf[..., (i + 1) * rp :]  # (L, rp, (N - 1 - i) rp)
            blocks.append(P.unflatten(-1, (na - 1 - i, rp)).permute(2, 0, 1, 3))  # (N - 1 - i, L, rp, rp)
        crosses[name] = torch.cat(blocks).flatten(0, 1) if blocks else None
    out = _pair(decomp(left), decomp(right), wanted, pad, crosses.get("b"), crosses.get("a"))
    return pairs, {k: v.reshape(len(pairs), nl) for k, v in out.items()}


def _cross_products(decomps: list[_Decomp], buf: torch.Tensor, rp: int, side: str) -> dict[tuple[int, int], torch.Tensor]:
    """``X_i^T X_j`` for all ``i < j`` from one product per ``i`` (empty when a side left the buffer)."""
    sides = [getattr(d, side) for d in decomps]
    if not all(s.in_place for s in sides):
        return {}
    out = {}
    na = len(decomps)
    for i in range(na - 1):
        P = sides[i].X.mT @ buf[..., (i + 1) * rp :]
        for j in range(i + 1, na):
            out[i, j] = P[..., (j - i - 1) * rp : (j - i) * rp]
    return out


# ---------------------------------------------------------------------------------------------
# Pairs: joint orthonormal coordinates, then tiny matrices
def _joint(s1: _Side, s2: _Side, cross: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(G, T)`` with ``Q2 = [Q1, P] [G; T]``, ``[Q1, P]`` orthonormal. See the module docstring."""
    if cross is None:
        cross = s1.X.mT @ s2.X  # the only large product
    G = s1.Rinv.mT @ cross @ s2.Rinv  # (L, k1, k2)
    k2 = G.shape[-1]
    eye = torch.eye(k2, dtype=G.dtype, device=G.device)
    cos_max = torch.linalg.matrix_norm(G, ord=2) if G.shape[-2] and k2 else torch.zeros(G.shape[0], device=G.device)
    chol, info = torch.linalg.cholesky_ex(eye - G.mT @ G)
    T = chol.mT
    exact = (cos_max * cos_max > 0.5) | (info != 0)
    if bool(exact.any()):
        idx = exact.nonzero().squeeze(-1)
        residual = s2.Q(idx) - s1.Q(idx) @ G[idx]
        T = T.clone()
        T[idx] = torch.linalg.qr(residual, mode="r")[1][..., :k2, :]
    return G, T


def _lift(G: torch.Tensor, T: torch.Tensor, X1: torch.Tensor | None, X2: torch.Tensor | None):
    """Joint coordinates of ``Q1 X1`` and ``Q2 X2``: ``[X1; 0]`` and ``[G X2; T X2]``."""
    out = []
    if X1 is not None:
        out.append(torch.cat([X1, X1.new_zeros(*X1.shape[:-2], T.shape[-2], X1.shape[-1])], -2))
    if X2 is not None:
        out.append(torch.cat([G @ X2, T @ X2], -2))
    return out


def _pad_cols(X: torch.Tensor, width: int) -> torch.Tensor:
    return X if X.shape[-1] == width else torch.nn.functional.pad(X, (0, width - X.shape[-1]))


def _cos_dist(X1: torch.Tensor, X2: torch.Tensor) -> torch.Tensor:
    n1 = torch.linalg.matrix_norm(X1)
    n2 = torch.linalg.matrix_norm(X2)
    d = 1.0 - (X1 * X2).sum((-2, -1)) / (n1 * n2)
    return torch.where((n1 > 0) & (n2 > 0), d.clamp(0.0, 2.0), torch.full_like(d, math.nan))


def _grassmann(X1, r1, X2, r2, pad: bool) -> torch.Tensor:
    theta, _ = principal_angles(X1, r1, X2, r2)
    sq = (theta * theta).sum(-1)
    if pad:
        sq = sq + (r1 - r2).abs().to(sq.dtype) * (math.pi / 2) ** 2
    return sq.sqrt()


def _pair(
    d1: _Decomp, d2: _Decomp, wanted: set[tuple[str, str]], pad: bool, cross_b=None, cross_a=None
) -> dict[tuple[str, str], torch.Tensor]:
    """All wanted ``(metric, factor)`` values for one pair, each ``(L,)`` (``cross_*``: precomputed ``X1^T X2``)."""
    factors = {f for _, f in wanted}
    out: dict[tuple[str, str], torch.Tensor] = {}
    need_b = bool(factors & {"ba", "b"})
    need_a = "a" in factors or bool({("l2", "ba"), ("cosine", "ba")} & wanted)
    Gb, Tb = _joint(d1.b, d2.b, cross_b) if need_b else (None, None)
    Ga, Ta = _joint(d1.a, d2.a, cross_a) if need_a else (None, None)
    same_r = d1.r == d2.r
    nan = torch.full(same_r.shape, math.nan, dtype=torch.float64, device=same_r.device)
    if {("l2", "ba"), ("cosine", "ba")} & wanted:
        U1, U2 = _lift(Gb, Tb, d1.Uc * d1.S.unsqueeze(-2), d2.Uc * d2.S.unsqueeze(-2))
        V1, V2 = _lift(Ga, Ta, d1.Vc, d2.Vc)
        tau1, tau2 = U1 @ V1.mT, U2 @ V2.mT
        if ("l2", "ba") in wanted:
            out["l2", "ba"] = torch.linalg.matrix_norm(tau1 - tau2)
        if ("cosine", "ba") in wanted:
            out["cosine", "ba"] = _cos_dist(tau1, tau2)
    if ("grassmann", "ba") in wanted:
        X1, X2 = _lift(Gb, Tb, d1.Uc, d2.Uc)
        out["grassmann", "ba"] = _grassmann(X1, d1.rank, X2, d2.rank, pad)
    for f, G, T, s1, s2 in (("b", Gb, Tb, d1.b, d2.b), ("a", Ga, Ta, d1.a, d2.a)):
        if f not in factors:
            continue
        if {("l2", f), ("cosine", f)} & wanted:
            width = max(s1.R.shape[-1], s2.R.shape[-1])  # zero-padded ranks (rank_pattern) line up
            X1, X2 = _lift(G, T, _pad_cols(s1.R, width), _pad_cols(s2.R, width))
            if ("l2", f) in wanted:
                out["l2", f] = torch.where(same_r, torch.linalg.matrix_norm(X1 - X2), nan)
            if ("cosine", f) in wanted:
                out["cosine", f] = torch.where(same_r, _cos_dist(X1, X2), nan)
        if ("grassmann", f) in wanted:
            X1, X2 = _lift(G, T, s1.W, s2.W)
            out["grassmann", f] = _grassmann(X1, s1.rank, X2, s2.rank, pad)
    return out


# ---------------------------------------------------------------------------------------------
# Public API
def _check(metrics: Iterable[str], factors: Iterable[str]) -> None:
    for m in metrics:
        if m not in METRICS:
            raise AtlasError(f"unknown metric {m!r}; expected one of {', '.join(METRICS)}")
    for f in factors:
        if f not in FACTORS:
            raise AtlasError(f"unknown factor {f!r}; expected one of {', '.join(FACTORS)}")


def all_distances(
    adapters: Sequence[Adapter],
    kinds: Iterable[str] | None = None,
    metrics: Iterable[str] = METRICS,
    factors: Iterable[str] = FACTORS,
    progress: Progress | None = None,
    *,
    stacks: Iterable[str] | None = None,
    pad: bool = False,
    device: torch.device | str | None = None,
    layer_chunk: int | None = None,
) -> dict[tuple[str, str, str, str], DistanceTensor]:
    """Every ``(metric, factor, stack, kind)`` distance tensor of an adapter set.

    Modules are aligned on the keys common to all adapters (see :mod:`geometry.align`; shapes must
    agree). Each adapter's modules of a ``(stack, kind)`` are decomposed once, batched over layers
    (``layer_chunk`` layers at a time to bound memory), and reused for every pair, metric and
    factor. ``progress(done, total, message)`` is called after each ``(stack, kind)`` chunk.
    """
    metrics, factors = tuple(metrics), tuple(factors)
    _check(metrics, factors)
    if len(adapters) < 1:
        raise AtlasError("distances need at least one adapter")
    names = [a.name for a in adapters]
    notes = check_compatible(adapters)
    dev = torch.device(device) if device is not None else default_device()
    kinds_set = set(kinds) if kinds is not None else None
    stacks_set = set(stacks) if stacks is not None else None
    groups = [
        g for g in common_groups(adapters) if (kinds_set is None or g[1] in kinds_set) and (stacks_set is None or g[0] in stacks_set)
    ]
    if kinds_set is not None:
        found = {g[1] for g in groups}
        missing = sorted(kinds_set - found)
        if missing:
            raise AtlasError(f"kind(s) {', '.join(missing)} not common to all adapters {names}")
    wanted = {(m, f) for m in metrics for f in factors}
    need_b = bool(set(factors) & {"ba", "b"})
    need_a = "a" in factors or bool({("l2", "ba"), ("cosine", "ba")} & wanted)
    n = len(adapters)
    plan = []
    for stack, kind in groups:
        keys = common_keys(adapters, kind=kind, stack=stack)
        per = layer_chunk or _auto_chunk(adapters, keys[0], len(keys))
        plan += [(stack, kind, keys, keys[c : c + per], c) for c in range(0, len(keys), per)]
    total = len(plan)
    pool: dict[str, torch.Tensor] = {}
    results: dict[tuple[str, str, str, str], DistanceTensor] = {}
    values: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for done, (stack, kind, keys, chunk, start) in enumerate(plan, 1):
        if (stack, kind) not in values:
            values[stack, kind] = {f"{m}/{f}": np.zeros((n, n, len(keys))) for m, f in wanted}
        store = values[stack, kind]
        with torch.no_grad():
            dec, Mb, Ma, rp = _stack_all(adapters, chunk, dev, pool)
            bufs = {name: buf for name, buf, need in (("b", Mb, need_b), ("a", Ma, need_a)) if need}
            span = slice(start, start + len(chunk))
            if n > 1 and all(getattr(d, name).in_place for d in dec for name in bufs):
                pairs, batch = _all_pairs(dec, bufs, rp, wanted, pad)
                for (m, f), v in batch.items():
                    arr = v.detach().cpu().numpy()
                    for p, (i, j) in enumerate(pairs):
                        store[f"{m}/{f}"][i, j, span] = arr[p]
                        store[f"{m}/{f}"][j, i, span] = arr[p]
            else:
                cross_b = _cross_products(dec, Mb, rp, "b") if need_b else {}
                cross_a = _cross_products(dec, Ma, rp, "a") if need_a else {}
                for i in range(n):
                    for j in range(i + 1, n):
                        pair = _pair(dec[i], dec[j], wanted, pad, cross_b.get((i, j)), cross_a.get((i, j)))
                        for (m, f), v in pair.items():
                            arr = v.detach().cpu().numpy()
                            store[f"{m}/{f}"][i, j, span] = arr
                            store[f"{m}/{f}"][j, i, span] = arr
        del dec, Mb, Ma, bufs
        if progress is not None:
            progress(done, total, f"{stack}.{kind} layers {chunk[0].layer}-{chunk[-1].layer}")
    for stack, kind in groups:
        layers = [k.layer for k in common_keys(adapters, kind=kind, stack=stack)]
        for m, f in sorted(wanted):
            vals = values[stack, kind][f"{m}/{f}"]
            note = list(notes)
            if m != "grassmann" and f != "ba" and np.isnan(vals).any():
                note.append(f"{m} on factor {f!r} is NaN between adapters of different ranks (entry-wise comparison)")
            results[m, f, stack, kind] = DistanceTensor(vals, list(names), layers, m, f, kind, stack, pad, note)
    return results


def _auto_chunk(adapters: Sequence[Adapter], key, n_layers: int, budget_bytes: int = 768 * 2**20) -> int:
    """Layers per chunk so that all adapters' float64 factors and bases stay within ``budget_bytes``."""
    m, n = adapters[0].modules[key].shape
    per_layer = sum(3 * 8 * (m + n) * max(ad.modules[key].rank, 1) for ad in adapters)
    return max(1, min(n_layers, budget_bytes // max(per_layer, 1)))


def pairwise_distances(
    adapters: Sequence[Adapter],
    metric: str = "cosine",
    factor: str = "ba",
    kind: str | None = "v",
    stack: str | None = None,
    *,
    pad: bool = False,
    device: torch.device | str | None = None,
    progress: Progress | None = None,
) -> DistanceTensor:
    """One :class:`DistanceTensor` ``[n, n, layers]`` for ``metric``, ``factor``, ``kind`` (and ``stack``).

    ``kind=None`` picks ``"v"`` when common to all adapters, else the first common kind; ``stack=None``
    picks the first stack having that kind.
    """
    _check([metric], [factor])
    groups = common_groups(adapters)
    if not groups:
        raise AtlasError(f"adapters {[a.name for a in adapters]} have no module in common")
    kinds = [k for _, k in groups]
    if kind is None:
        kind = "v" if "v" in kinds else kinds[0]
    if kind not in kinds:
        raise AtlasError(f"kind {kind!r} is not common to all adapters; common kinds: {', '.join(dict.fromkeys(kinds))}")
    if stack is None:
        stack = next(s for s, k in groups if k == kind)
    elif (stack, kind) not in groups:
        raise AtlasError(f"no common module of kind {kind!r} in stack {stack!r}")
    res = all_distances(
        adapters, [kind], [metric], [factor], progress, stacks=[stack], pad=pad, device=device
    )
    return res[metric, factor, stack, kind]


def dense_distance(tau1: torch.Tensor, tau2: torch.Tensor, metric: str, pad: bool = False) -> float:
    """Reference on dense matrices (``m x n`` SVDs: for tests and the benchmark only)."""
    t1, t2 = tau1.to(torch.float64), tau2.to(torch.float64)
    if metric == "l2":
        return float(torch.linalg.matrix_norm(t1 - t2))
    if metric == "cosine":
        return float(1 - (t1 * t2).sum() / (torch.linalg.matrix_norm(t1) * torch.linalg.matrix_norm(t2)))
    bases = []
    for t in (t1, t2):
        U, S, _ = torch.linalg.svd(t, full_matrices=False)
        rank = int((S > max(t.shape) * EPS64 * S[0]).sum()) if S.numel() and S[0] > 0 else 0
        bases.append((U[:, :rank], rank))
    theta, _ = principal_angles(bases[0][0], bases[0][1], bases[1][0], bases[1][1])
    sq = float((theta**2).sum())
    if pad:
        sq += abs(int(bases[0][1]) - int(bases[1][1])) * (math.pi / 2) ** 2
    return math.sqrt(sq)
