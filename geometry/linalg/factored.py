"""Exact linear algebra of low-rank task vectors, without ever forming ``B @ A``.

A LoRA module's task vector is ``tau = s * B @ A`` with ``B (m, r)``, ``A (r, n)``. Everything the
geometry needs follows from two thin QR factorisations and an ``r x r`` *core*:

    B = Qb Rb,   A^T = Qa Ra        =>   tau = s * Qb (Rb Ra^T) Qa^T

so the thin SVD of ``tau`` is ``U = Qb Uc``, ``S = |s| Sc``, ``V = Qa Vc`` where ``Uc Sc Vc^T`` is
the SVD of the core ``Rb Ra^T``. Cost ``O((m + n) r^2)`` instead of ``O(m n min(m, n))``.

Conventions shared by every function here:

* Inputs of any float dtype (float16 / bfloat16 included) are cast to **float64**; results live on
  ``device`` (``geometry.device.default_device()`` when ``None``).
* Everything is **batched over leading dimensions**: ``B (..., m, r)``, ``A (..., r, n)`` (stack
  the same-shaped modules of all layers to get one call per module kind).
* **Numerical rank**: singular values ``<= max(m, n) * eps * sigma_1`` (float64 ``eps``) are
  treated as zero. Rank-deficient factors are fine: the tail singular values *and* their singular
  vectors are set to zero, so the non-zero columns of ``U`` (of ``V``) are an orthonormal basis of
  exactly ``Im(tau)`` (of ``Im(tau^T)``), and ``U @ U^T`` is the orthogonal projector on ``Im(tau)``.
  Shapes stay fixed (``k = min(m, n, r)`` columns) so that batches of different ranks stack.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from geometry.device import default_device
from geometry.errors import AtlasError

EPS64 = torch.finfo(torch.float64).eps


@dataclass
class LowRankSVD:
    """Thin SVD ``tau = U diag(S) V^T`` of a low-rank matrix, possibly batched.

    ``U (..., m, k)``, ``S (..., k)`` descending and ``>= 0``, ``V (..., n, k)``, float64.
    ``rank`` is the numerical rank: an ``int`` for a single matrix, a ``LongTensor (...)`` for a
    batch. Columns ``>= rank`` of ``U`` and ``V`` and entries of ``S`` are exactly zero.
    """

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor
    rank: int | torch.Tensor

    @property
    def mask(self) -> torch.Tensor:
        """Boolean ``(..., k)``: which singular triplets are kept (index ``< rank``)."""
        return self.S > 0

    def dense(self) -> torch.Tensor:
        """``U diag(S) V^T`` (``m x n``). For tests and small matrices only."""
        return (self.U * self.S.unsqueeze(-2)) @ self.V.mT

    def truncated(self) -> LowRankSVD:
        """For a single (unbatched) matrix: drop the zero tail, keeping ``rank`` columns."""
        if self.S.dim() != 1:
            raise AtlasError("LowRankSVD.truncated() needs a single matrix; batched ranks differ per item")
        k = int(self.rank)
        return LowRankSVD(self.U[:, :k], self.S[:k], self.V[:, :k], k)


def _float64(x: torch.Tensor, device: torch.device | str | None, what: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise AtlasError(f"{what}: expected a torch.Tensor, got {type(x).__name__}")
    if not (x.is_floating_point() or x.is_complex()):
        raise AtlasError(f"{what}: expected a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 2:
        raise AtlasError(f"{what}: expected a matrix (..., rows, cols), got shape {tuple(x.shape)}")
    dev = torch.device(device) if device is not None else default_device()
    return x.detach().to(device=dev, dtype=torch.float64)


def _scale_tensor(scale: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``scale`` as a float64 tensor broadcastable to ``like``'s batch shape ``(...)``."""
    s = torch.as_tensor(scale, dtype=torch.float64, device=like.device)
    return s


def rank_mask(S: torch.Tensor, rows: int, cols: int, rtol: float | None = None) -> torch.Tensor:
    """``S > tol`` with ``tol = rtol * sigma_1`` and default ``rtol = max(rows, cols) * eps``.

    ``S (..., k)`` descending. A zero matrix has rank 0 (every entry of the mask is False).
    """
    if rtol is None:
        rtol = max(rows, cols) * EPS64
    if S.shape[-1] == 0:
        return torch.zeros_like(S, dtype=torch.bool)
    return S > rtol * S[..., :1]


def broadcast_shapes(*shapes) -> tuple[int, ...]:
    """The broadcast of batch shapes (NumPy's rule), in plain Python.

    ``torch.broadcast_shapes`` imports sympy on its first call (about 0.8 s); this costs microseconds.
    """
    ndim = max((len(s) for s in shapes), default=0)
    out = [1] * ndim
    for shape in shapes:
        for i, size in enumerate(shape, start=ndim - len(shape)):
            size = int(size)
            if size != 1 and out[i] not in (1, size):
                raise AtlasError(f"batch shapes {[tuple(s) for s in shapes]} do not broadcast")
            if size != 1:
                out[i] = size
    return tuple(out)


def _rank_of(mask: torch.Tensor) -> int | torch.Tensor:
    rank = mask.sum(-1)
    return int(rank) if rank.dim() == 0 else rank


def lowrank_svd(
    B: torch.Tensor,
    A: torch.Tensor,
    scale: float | torch.Tensor = 1.0,
    *,
    device: torch.device | str | None = None,
    rtol: float | None = None,
) -> LowRankSVD:
    """Exact thin SVD of ``tau = scale * B @ A`` through QR(B), QR(A^T) and the ``r x r`` core.

    ``B (..., m, r)``, ``A (..., r, n)``; ``scale`` a float or a tensor broadcastable to the batch
    shape ``(...)`` (one scale per layer, e.g. from ``alpha_pattern``). A negative scale flips the
    sign of ``U`` (singular values stay ``>= 0``). Returns ``k = min(m, n, r)`` triplets with the
    numerical-rank tail zeroed (see the module docstring).
    """
    B = _float64(B, device, "B")
    A = _float64(A, B.device, "A")
    if B.shape[-1] != A.shape[-2]:
        raise AtlasError(f"lowrank_svd: B has {B.shape[-1]} columns but A has {A.shape[-2]} rows (B {tuple(B.shape)}, A {tuple(A.shape)})")
    m, n = B.shape[-2], A.shape[-1]
    batch = broadcast_shapes(B.shape[:-2], A.shape[:-2])
    B = B.expand(*batch, *B.shape[-2:])
    A = A.expand(*batch, *A.shape[-2:])
    Qb, Rb = torch.linalg.qr(B)  # (..., m, kb), (..., kb, r)
    Qa, Ra = torch.linalg.qr(A.mT)  # (..., n, ka), (..., ka, r)
    Uc, Sc, Vch = torch.linalg.svd(Rb @ Ra.mT, full_matrices=False)
    s = _scale_tensor(scale, Sc)
    S = Sc * s.abs().unsqueeze(-1)
    U = Qb @ Uc
    V = Qa @ Vch.mT
    U = U * torch.where(s < 0, -1.0, 1.0).to(U.dtype).unsqueeze(-1).unsqueeze(-1)
    keep = rank_mask(S, m, n, rtol)
    S = S * keep
    U = U * keep.unsqueeze(-2)
    V = V * keep.unsqueeze(-2)
    return LowRankSVD(U, S, V, _rank_of(keep))


def orthonormal_basis(
    M: torch.Tensor,
    *,
    device: torch.device | str | None = None,
    rtol: float | None = None,
    return_singular_values: bool = False,
):
    """Orthonormal basis of the column space ``Im(M)`` of ``M (..., m, r)``: ``(Q, rank)``.

    ``Q (..., m, k)``, ``k = min(m, r)``, from QR then the SVD of the small ``R`` factor
    (``M = Q0 R``, ``R = Ur Sr Vr^T``, ``Q = Q0 Ur``), with the numerical-rank tail zeroed as in
    :func:`lowrank_svd`. Use ``orthonormal_basis(B)`` for ``Im(B)`` and ``orthonormal_basis(A.mT)``
    for the row space ``Im(A^T)``. With ``return_singular_values`` also returns ``Sr``.
    """
    M = _float64(M, device, "M")
    m, r = M.shape[-2], M.shape[-1]
    Q0, R = torch.linalg.qr(M)
    Ur, Sr, _ = torch.linalg.svd(R, full_matrices=False)
    keep = rank_mask(Sr, m, r, rtol)
    Q = (Q0 @ Ur) * keep.unsqueeze(-2)
    rank = _rank_of(keep)
    if return_singular_values:
        return Q, rank, Sr * keep
    return Q, rank


def fro_norm(B: torch.Tensor, A: torch.Tensor, scale: float | torch.Tensor = 1.0, *, device=None) -> torch.Tensor:
    """``||scale * B @ A||_F = |scale| * ||Rb Ra^T||_F`` (QR cores), shape ``(...)``."""
    B = _float64(B, device, "B")
    A = _float64(A, B.device, "A")
    Rb = torch.linalg.qr(B, mode="r")[1]
    Ra = torch.linalg.qr(A.mT, mode="r")[1]
    s = _scale_tensor(scale, Rb)
    return torch.linalg.matrix_norm(Rb @ Ra.mT) * s.abs()


def fro_inner(B1, A1, s1, B2, A2, s2, *, device=None) -> torch.Tensor:
    """Frobenius inner product ``<tau1, tau2> = s1 s2 trace((B1^T B2)(A2 A1^T))``, shape ``(...)``.

    Only ``r1 x r2`` products are formed; ranks may differ.
    """
    B1 = _float64(B1, device, "B1")
    dev = B1.device
    A1, B2, A2 = (_float64(x, dev, w) for x, w in ((A1, "A1"), (B2, "B2"), (A2, "A2")))
    # trace(X Y) = sum(X * Y^T) with X = B1^T B2 (r1, r2), Y^T = A1 A2^T (r1, r2).
    val = ((B1.mT @ B2) * (A1 @ A2.mT)).sum((-2, -1))
    return val * _scale_tensor(s1, val) * _scale_tensor(s2, val)


def diff_fro_norm(B1, A1, s1, B2, A2, s2, *, device=None) -> torch.Tensor:
    """``||s1 B1 A1 - s2 B2 A2||_F`` without cancellation, shape ``(...)``.

    ``tau1 - tau2 = [s1 B1, -s2 B2] [A1; A2]`` is one low-rank product of rank ``<= r1 + r2``;
    its norm is that of the QR core (``||a||^2 + ||b||^2 - 2<a, b>`` would lose half the digits
    when the distance is small).
    """
    B1 = _float64(B1, device, "B1")
    dev = B1.device
    A1, B2, A2 = (_float64(x, dev, w) for x, w in ((A1, "A1"), (B2, "B2"), (A2, "A2")))
    batch = broadcast_shapes(B1.shape[:-2], A1.shape[:-2], B2.shape[:-2], A2.shape[:-2])
    s1t = _scale_tensor(s1, B1).expand(batch)[..., None, None]
    s2t = _scale_tensor(s2, B1).expand(batch)[..., None, None]
    Bc = torch.cat([(s1t * B1).expand(*batch, *B1.shape[-2:]), (-s2t * B2).expand(*batch, *B2.shape[-2:])], -1)
    Ac = torch.cat([A1.expand(*batch, *A1.shape[-2:]), A2.expand(*batch, *A2.shape[-2:])], -2)
    return fro_norm(Bc, Ac, device=dev)


def principal_angles(
    Q1: torch.Tensor,
    rank1: int | torch.Tensor,
    Q2: torch.Tensor,
    rank2: int | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Principal angles between ``Im(Q1)`` and ``Im(Q2)`` (Bjorck & Golub 1973), ascending.

    ``Q1 (..., m, k1)``, ``Q2 (..., m, k2)``: orthonormal columns followed by zero columns (as
    returned by :func:`lowrank_svd` / :func:`orthonormal_basis`), of ranks ``rank1``, ``rank2``.
    There are ``p = min(rank1, rank2)`` angles. Returns ``(theta (..., P), p (...))`` with
    ``P = min(k1, k2)`` and ``theta[..., i] = 0`` for ``i >= p``.

    Precision (SCIENCE.md section 6): ``arccos`` of the cosines (singular values of ``Q1^T Q2``)
    loses accuracy near 0, so angles below 45 degrees are taken from their sines, the singular
    values of the residual ``Q2 - Q1 (Q1^T Q2)``; a self-angle comes out ~1e-16, not ~1e-8.
    The residual's singular values are ``rank2 - p`` ones (directions of the larger space outside
    the smaller), then the ``p`` sines, then zeros: the sines are picked by position.
    """
    dev = Q1.device
    Q1 = Q1.to(torch.float64)
    Q2 = Q2.to(device=dev, dtype=torch.float64)
    batch = broadcast_shapes(Q1.shape[:-2], Q2.shape[:-2])
    r1 = torch.as_tensor(rank1, device=dev).expand(batch)
    r2 = torch.as_tensor(rank2, device=dev).expand(batch)
    M = Q1.mT @ Q2
    cos = torch.linalg.svdvals(M).clamp(0.0, 1.0)  # (..., P) descending
    if not bool((cos * cos >= 0.5).any()):  # every angle >= 45 degrees: arccos is accurate
        return _angles_from(cos, cos.new_zeros(cos.shape), r1, r2)
    residual = Q2 - Q1 @ M
    sines = torch.linalg.svdvals(residual).clamp(0.0, 1.0)  # (..., min(m, k2)) descending
    return _angles_from(cos, sines, r1, r2)


def _angles_from(cos: torch.Tensor, sines: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor):
    """Combine cosines (descending) and the residual's singular values (descending) into angles."""
    P = cos.shape[-1]
    p = torch.minimum(r1, r2)
    i = torch.arange(P, device=cos.device)
    valid = i < p.unsqueeze(-1)
    # i-th smallest angle: its sine is at position rank2 - 1 - i of the descending residual spectrum.
    if sines.shape[-1] == 0:
        sin_i = torch.zeros_like(cos)
    else:
        idx = (r2.unsqueeze(-1) - 1 - i).clamp(0, sines.shape[-1] - 1)
        sin_i = torch.gather(sines.expand(*cos.shape[:-1], sines.shape[-1]), -1, idx)
    from_sin = torch.arcsin(sin_i)
    from_cos = torch.arccos(cos)
    theta = torch.where(cos * cos >= 0.5, from_sin, from_cos)
    return torch.where(valid, theta, torch.zeros_like(theta)), p


def grassmann_from_angles(
    theta: torch.Tensor, rank1: int | torch.Tensor, rank2: int | torch.Tensor, pad: bool = False
) -> torch.Tensor:
    """``d_G = sqrt(sum_i theta_i^2)`` over the ``min(rank1, rank2)`` angles; NaN when either rank is 0.

    ``pad=False`` (default): the distance from the smaller subspace to the nearest subspace of the
    larger one (0 when one contains the other). ``pad=True``: add ``|rank1 - rank2|`` angles of
    ``pi / 2`` (the larger space's extra directions count as orthogonal).

    The zero subspace (a zero matrix, rank 0) has no principal angle with any subspace, so its
    distance is undefined in both conventions: NaN (not the 0 of an empty sum, which would make it
    contained in, hence at distance 0 from, everything; nor the padded ``sqrt(r) pi / 2``, a value
    set by convention only).
    """
    sq = (theta * theta).sum(-1)
    r1 = torch.as_tensor(rank1, device=theta.device)
    r2 = torch.as_tensor(rank2, device=theta.device)
    if pad:
        sq = sq + (r1 - r2).abs().to(sq.dtype) * (math.pi / 2) ** 2
    d = sq.sqrt()
    return torch.where((r1 > 0) & (r2 > 0), d, torch.full_like(d, math.nan))
