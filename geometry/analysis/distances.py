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
* **Zero matrices** (a module whose ``B = 0``: peft's initialisation, or a module that never
  trained; or ``A = 0``): a zero task vector (factor) spans the zero subspace, which has no
  principal angle with anything. Its Grassmann distance to every other adapter is **undefined
  (NaN)** in both conventions: the unpadded sum over ``min(0, r2) = 0`` angles would be 0 (the
  zero space is contained in every space), which would break the triangle inequality and pull
  layer means down, and padding would make it ``sqrt(r2) pi / 2`` (maximally far) by convention
  only. Cosine is NaN as well; L2 stays defined (``||0 - X2|| = ||X2||``). The notes of the
  :class:`DistanceTensor` name the zero modules of each adapter (attribute ``zero``), and
  :meth:`DistanceTensor.reduce` can say how many layers each pair averaged.
* L2 and cosine on ``a`` / ``b`` alone compare matrices entry by entry: they need equal ranks
  (NaN otherwise) and depend on LoRA's parametrisation (``B M``, ``M^-1 A`` give the same ``tau``);
  Grassmann on ``a`` / ``b`` does not.

Exact factored computation (never ``B @ A``, never an ``m x n`` SVD): :mod:`geometry.linalg.gram`
decomposes every adapter's modules of a ``(stack, kind)`` once, batched over layers, from one Gram
matrix of all adapters' factors per side, and gives every pair exact coordinates in a joint
orthonormal basis of dimension ``<= 2 r`` (:func:`geometry.linalg.gram.lift`). This module evaluates the
metrics there, on tiny matrices: differences are formed in those coordinates (no
``||a||^2 + ||b||^2 - 2<a, b>`` cancellation) and small principal angles come from sines
(:func:`geometry.linalg.factored.principal_angles`). Precision and the float32 Gram path:
:mod:`geometry.linalg.gram` (float64 results; relative error below ``1e-6`` on the float32 path, float64
wherever a subspace pair is close or a factor ill-conditioned).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from geometry.device import default_device
from geometry.errors import AtlasError
from geometry.linalg.align import check_compatible, common_groups, common_keys
from geometry.linalg.factored import EPS64, grassmann_from_angles, principal_angles
from geometry.linalg.gram import PairBatch, all_pairs, bytes_per_layer, decompose_group, lift, single_thread
from geometry.text import module_span, ranges
from geometry.types import Adapter

METRICS: tuple[str, ...] = ("l2", "cosine", "grassmann")
FACTORS: tuple[str, ...] = ("ba", "a", "b")
#: One sentence for pages and exports: what the Grassmann distance means when ranks differ.
GRASSMANN_CONVENTION = (
    "Grassmann distance d_G = sqrt(sum theta_i^2) over the min(r1, r2) principal angles between the column "
    "spaces: the distance from the smaller subspace to the nearest subspace of the larger one (0 when one "
    "contains the other); undefined (NaN) when either matrix is zero."
)
GRASSMANN_CONVENTION_PADDED = (
    "Grassmann distance d_G = sqrt(sum theta_i^2 + |r1 - r2| (pi/2)^2): the min(r1, r2) principal angles plus "
    "|r1 - r2| right angles for the extra dimensions of the larger space; undefined (NaN) when either matrix "
    "is zero."
)
Progress = Callable[[int, int, str], None]


# ---------------------------------------------------------------------------------------------
# Labelled result
@dataclass
class DistanceTensor:
    """``values[i, j, k]``: distance between adapters ``i`` and ``j`` at ``layers[k]``.

    Symmetric in ``i, j`` with a zero diagonal; NaN where undefined (see the module docstring).
    ``zero``: for each adapter with zero modules (of this factor: ``tau``, ``B`` or ``A``), their
    layers; ``notes`` name them in words.
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
    zero: dict[str, list[int]] = field(default_factory=dict)

    def _chosen(self, layers: str | Iterable[int]) -> list[int]:
        chosen = select_layers(self.layers, layers)
        if not chosen:
            raise AtlasError(f"no layer selected by {layers!r} among layers {ranges(self.layers)}")
        return [self.layers.index(v) for v in chosen]

    def reduce(self, layers: str | Iterable[int] = "all", return_counts: bool = False):
        """``Tbar_d``: mean over the chosen layers (``select_layers`` spec or layer indices), ``[n, n]``.

        ``Tbar(i, j) = sum_k T(i, j, k) / c(i, j)`` over the chosen layers ``k`` where ``T(i, j, k)``
        is defined, ``c(i, j)`` their number: NaN entries are skipped, so a pair may average fewer
        layers than chosen (:meth:`counts`, :meth:`coverage_notes`); a pair undefined at every
        chosen layer stays NaN. ``return_counts=True`` returns ``(values, counts)``.
        """
        sub = self.values[:, :, self._chosen(layers)]
        with np.errstate(invalid="ignore"):
            finite = np.isfinite(sub)
            total = np.where(finite, sub, 0.0).sum(-1)
            count = finite.sum(-1)
            values = np.where(count > 0, total / np.maximum(count, 1), np.nan)
        return (values, count) if return_counts else values

    def counts(self, layers: str | Iterable[int] = "all") -> np.ndarray:
        """``[n, n]`` integers: how many of the chosen layers each pair's mean in :meth:`reduce` averaged."""
        return np.isfinite(self.values[:, :, self._chosen(layers)]).sum(-1)

    def coverage_notes(self, layers: str | Iterable[int] = "all") -> list[str]:
        """One sentence per pair ``i < j`` whose mean averaged fewer layers than chosen (empty when none)."""
        idx = self._chosen(layers)
        count = self.counts(layers)
        n = len(self.adapters)
        return [
            f"pair ({self.adapters[i]!r}, {self.adapters[j]!r}) averaged {count[i, j]} of {len(idx)} layers "
            f"({self.metric} on {self.factor!r} is undefined at the others)"
            for i in range(n)
            for j in range(i + 1, n)
            if count[i, j] < len(idx)
        ]

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
        raise AtlasError(f"layers {bad} are not available (available: {ranges(avail)})")
    return sorted(set(wanted))


# ---------------------------------------------------------------------------------------------
# Metric definitions, evaluated in the joint coordinates of geometry.linalg.gram
def _cos_dist(X1: torch.Tensor, X2: torch.Tensor) -> torch.Tensor:
    """``1 - <X1, X2>_F / (||X1||_F ||X2||_F)`` clipped to ``[0, 2]``; NaN when either is zero."""
    n1 = torch.linalg.matrix_norm(X1)
    n2 = torch.linalg.matrix_norm(X2)
    d = 1.0 - (X1 * X2).sum((-2, -1)) / (n1 * n2)
    return torch.where((n1 > 0) & (n2 > 0), d.clamp(0.0, 2.0), torch.full_like(d, math.nan))


def _grassmann(X1, r1, X2, r2, pad: bool) -> torch.Tensor:
    """``d_G`` between ``Im(X1)`` and ``Im(X2)`` (orthonormal-then-zero columns); NaN when a rank is 0."""
    theta, _ = principal_angles(X1, r1, X2, r2)
    return grassmann_from_angles(theta, r1, r2, pad)


def pair_metrics(pb: PairBatch, wanted: set[tuple[str, str]], pad: bool) -> dict[tuple[str, str], torch.Tensor]:
    """All wanted ``(metric, factor)`` values for a :class:`geometry.linalg.gram.PairBatch`, each ``(pairs * layers,)``.

    With ``Q_2 = [Q_1, P] [G; T]`` (per factor side), the adapters' matrices in joint coordinates are
    ``tau_1 = [Uc_1 S_1; 0] [Vc_1; 0]^T`` and ``tau_2 = [G_b Uc_2 S_2; T_b Uc_2 S_2] [G_a Vc_2; T_a Vc_2]^T``
    (``2r x 2r``), ``B_k``, ``A_k^T`` are lifted ``R`` factors and the bases lifted ``W`` (or ``Uc``).
    """
    factors = {f for _, f in wanted}
    out: dict[tuple[str, str], torch.Tensor] = {}
    b, a = pb.b, pb.a
    same_r = pb.r1 == pb.r2
    nan = torch.full(same_r.shape, math.nan, dtype=torch.float64, device=same_r.device)
    if {("l2", "ba"), ("cosine", "ba")} & wanted:
        U1, U2 = lift(b.G, b.T, pb.Uc1 * pb.S1.unsqueeze(-2), pb.Uc2 * pb.S2.unsqueeze(-2))
        V1, V2 = lift(a.G, a.T, pb.Vc1, pb.Vc2)
        tau1, tau2 = U1 @ V1.mT, U2 @ V2.mT
        if ("l2", "ba") in wanted:
            out["l2", "ba"] = torch.linalg.matrix_norm(tau1 - tau2)
        if ("cosine", "ba") in wanted:
            out["cosine", "ba"] = _cos_dist(tau1, tau2)
    if ("grassmann", "ba") in wanted:
        X1, X2 = lift(b.G, b.T, pb.Uc1, pb.Uc2)
        out["grassmann", "ba"] = _grassmann(X1, pb.rank1, X2, pb.rank2, pad)
    for f, side in (("b", b), ("a", a)):
        if f not in factors:
            continue
        if {("l2", f), ("cosine", f)} & wanted:
            X1, X2 = lift(side.G, side.T, side.R1, side.R2)  # zero-padded ranks (rank_pattern) line up
            if ("l2", f) in wanted:
                out["l2", f] = torch.where(same_r, torch.linalg.matrix_norm(X1 - X2), nan)
            if ("cosine", f) in wanted:
                out["cosine", f] = torch.where(same_r, _cos_dist(X1, X2), nan)
        if ("grassmann", f) in wanted:
            X1, X2 = lift(side.G, side.T, side.W1, side.W2)
            out["grassmann", f] = _grassmann(X1, side.rank1, X2, side.rank2, pad)
    return out


def _zero_notes(
    names: Sequence[str], layers: Sequence[int], stack: str, kind: str, metric: str, factor: str,
    ranks: dict[str, np.ndarray],
) -> tuple[dict[str, list[int]], list[str]]:
    """Zero modules of ``factor`` per adapter (``ranks[f] (N, layers)`` numerical ranks) and one note per adapter."""
    rank = ranks.get(factor)
    if rank is None:
        return {}, []
    zero: dict[str, list[int]] = {}
    notes = []
    what = {"b": "B", "a": "A"}
    for i, name in enumerate(names):
        at = [layers[k] for k in np.flatnonzero(rank[i] == 0)]
        if not at:
            continue
        zero[name] = at
        if factor == "ba":
            causes: dict[str, list[int]] = {}
            for k in np.flatnonzero(rank[i] == 0):
                cause = "B = 0" if ranks["b"][i, k] == 0 else "A = 0" if ranks["a"][i, k] == 0 else "B A = 0"
                causes.setdefault(cause, []).append(layers[k])
            cause = next(iter(causes)) if len(causes) == 1 else "; ".join(
                f"{c} at layer{'s' if len(v) > 1 else ''} {ranges(v)}" for c, v in causes.items()
            )
            thing = "module"
        else:
            cause, thing = f"{what[factor]} = 0", f"{what[factor]} of module"
        plural = len(at) > 1
        head = f"{thing}{'s' if plural and thing == 'module' else ''} {module_span(stack, at, kind)} of adapter {name!r} "
        head += f"{'are' if plural else 'is'} zero ({cause}): {'their' if plural else 'its'} Grassmann and cosine distances are undefined (NaN)"
        if metric == "l2":
            head += "; L2 to it is the norm of the other adapter's matrix"
        notes.append(head)
    return zero, notes


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
    kind: str | Iterable[str] | None = None,
    metrics: Iterable[str] = METRICS,
    factors: Iterable[str] = FACTORS,
    progress: Progress | None = None,
    *,
    stacks: Iterable[str] | None = None,
    pad: bool = False,
    device: torch.device | str | None = None,
    layer_chunk: int | None = None,
    gram_dtype: str | torch.dtype = "auto",
) -> dict[tuple[str, str, str, str], DistanceTensor]:
    """Every ``(metric, factor, stack, kind)`` distance tensor of an adapter set.

    Modules are aligned on the keys common to all adapters (see :mod:`geometry.linalg.align`; shapes must
    agree). Each adapter's modules of a ``(stack, kind)`` are decomposed once, batched over layers
    (``layer_chunk`` layers at a time to bound memory), and reused for every pair, metric and
    factor. ``progress(done, total, message)`` is called after each ``(stack, kind)`` chunk.
    ``gram_dtype``: ``"auto"`` (default), ``"float32"`` or ``"float64"``, the precision of the Gram
    products (see :mod:`geometry.linalg.gram`; results are float64 either way).
    """
    metrics, factors = tuple(metrics), tuple(factors)
    _check(metrics, factors)
    if len(adapters) < 1:
        raise AtlasError("distances need at least one adapter")
    names = [a.name for a in adapters]
    notes = check_compatible(adapters)
    dev = torch.device(device) if device is not None else default_device()
    kinds_set = None if kind is None else {kind} if isinstance(kind, str) else set(kind)
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
    need_core = "ba" in factors
    cross = {"b": bool({"ba", "b"} & set(factors)), "a": "a" in factors or bool({("l2", "ba"), ("cosine", "ba")} & wanted)}
    sides = {name: cross[name] for name in ("b", "a") if need_core or name in factors}
    n = len(adapters)
    plan = []
    for stack, kind in groups:
        keys = common_keys(adapters, kind=kind, stack=stack)
        per = layer_chunk or _auto_chunk(adapters, keys[0], len(keys))
        plan += [(stack, kind, keys, keys[c : c + per], c) for c in range(0, len(keys), per)]
    total = len(plan)
    results: dict[tuple[str, str, str, str], DistanceTensor] = {}
    values: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    rank_store: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for done, (stack, kind, keys, chunk, start) in enumerate(plan, 1):
        if (stack, kind) not in values:
            values[stack, kind] = {f"{m}/{f}": np.zeros((n, n, len(keys))) for m, f in wanted}
            rank_store[stack, kind] = {f: np.zeros((n, len(keys)), dtype=np.int64) for f in (*sides, "ba")}
        store = values[stack, kind]
        span = slice(start, start + len(chunk))
        mods = [[ad.modules[k] for k in chunk] for ad in adapters]
        with torch.no_grad():
            group = decompose_group(
                [[mod.B for mod in ms] for ms in mods],
                [[mod.A for mod in ms] for ms in mods],
                torch.tensor([[float(mod.scale) for mod in ms] for ms in mods], dtype=torch.float64),
                torch.tensor([[mod.rank for mod in ms] for ms in mods]),
                sides=sides,
                core=need_core,
                device=dev,
                gram_dtype=gram_dtype,
            )
            if n > 1:
                batch = all_pairs(group, cross)
                ii = np.array([p[0] for p in batch.pairs])
                jj = np.array([p[1] for p in batch.pairs])
                with single_thread(dev):
                    out = pair_metrics(batch, wanted, pad)
                for (m, f), v in out.items():
                    arr = v.reshape(len(batch.pairs), len(chunk)).cpu().numpy()
                    store[f"{m}/{f}"][ii, jj, span] = arr
                    store[f"{m}/{f}"][jj, ii, span] = arr
            else:
                with single_thread(dev):
                    group.compute_core()
            for f, side in (("b", group.b), ("a", group.a), ("ba", group)):
                if side is not None and side.rank is not None:
                    rank_store[stack, kind][f][:, span] = side.rank.cpu().numpy()
            del group
        if progress is not None:
            progress(done, total, f"{stack}.{kind} layers {chunk[0].layer}-{chunk[-1].layer}")
    for stack, kind in groups:
        layers = [k.layer for k in common_keys(adapters, kind=kind, stack=stack)]
        for m, f in sorted(wanted):
            vals = values[stack, kind][f"{m}/{f}"]
            note = list(notes)
            if m != "grassmann" and f != "ba" and np.isnan(vals).any():
                note.append(f"{m} on factor {f!r} is NaN between adapters of different ranks (entry-wise comparison)")
            zero, zero_notes = _zero_notes(names, layers, stack, kind, m, f, rank_store[stack, kind])
            note += zero_notes
            results[m, f, stack, kind] = DistanceTensor(vals, list(names), layers, m, f, kind, stack, pad, note, zero)
    return results


def _auto_chunk(adapters: Sequence[Adapter], key, n_layers: int, budget_bytes: int = 768 * 2**20) -> int:
    """Layers per chunk so that Gram matrices, per-adapter factors and pair batches stay within ``budget_bytes``."""
    rp = max(max(ad.modules[key].rank, 1) for ad in adapters)
    per_layer = bytes_per_layer(len(adapters), rp)
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
    gram_dtype: str | torch.dtype = "auto",
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
        adapters, [kind], [metric], [factor], progress, stacks=[stack], pad=pad, device=device, gram_dtype=gram_dtype
    )
    return res[metric, factor, stack, kind]


def dense_distance(tau1: torch.Tensor, tau2: torch.Tensor, metric: str, pad: bool = False) -> float:
    """Reference on dense matrices (``m x n`` SVDs: for tests and the benchmark only).

    Same conventions as the factored path: Grassmann is NaN when either matrix is zero (rank 0),
    cosine is NaN when either norm is 0.
    """
    t1, t2 = tau1.to(torch.float64), tau2.to(torch.float64)
    if metric == "l2":
        return float(torch.linalg.matrix_norm(t1 - t2))
    if metric == "cosine":
        n1, n2 = torch.linalg.matrix_norm(t1), torch.linalg.matrix_norm(t2)
        if n1 == 0 or n2 == 0:
            return math.nan
        return float(1 - (t1 * t2).sum() / (n1 * n2))
    bases = []
    for t in (t1, t2):
        U, S, _ = torch.linalg.svd(t, full_matrices=False)
        rank = int((S > max(t.shape) * EPS64 * S[0]).sum()) if S.numel() and S[0] > 0 else 0
        bases.append((U[:, :rank], rank))
    if min(bases[0][1], bases[1][1]) == 0:
        return math.nan
    theta, _ = principal_angles(bases[0][0], bases[0][1], bases[1][0], bases[1][1])
    return float(grassmann_from_angles(theta, bases[0][1], bases[1][1], pad))
