"""All-pairs factored engine behind :mod:`geometry.analysis.distances`: one Gram matrix per module, then ``r x r`` algebra.

(Over 500 lines on purpose: one engine whose steps share the same padded-block layout and rounding rules;
split, each piece would need the others' invariants to be read.)

Setting (SCIENCE.md sections 1 and 6). For one module key (one layer of one projection kind) and
``N`` adapters, each factor side is a list of tall matrices ``X_i (d, r_i)`` (``X = B`` with
``d = m``, or ``X = A^T`` with ``d = n``), zero-padded to ``rp = max_i r_i`` columns (zero columns
change no subspace, norm or product). With ``M = [X_1 .. X_N] (d, N rp)`` the only product whose
cost grows with ``d`` is the Gram matrix

    K = M^T M   (N rp x N rp),    K_ij = X_i^T X_j,

one product per module for all adapters at once (batched over the layers of a kind; ``B`` and
``A^T`` give one each). Every other step is ``rp x rp`` algebra on the blocks of ``K``:

* **Per adapter** (Cholesky QR, ``Q_i = X_i R_i^-1`` never formed): ``R_i^T R_i = K_ii``. Zero
  columns (rank padding, a zero factor such as peft's ``B = 0`` init) are set aside: their
  diagonal entries of ``K_ii`` are replaced by ``max(diag K_ii)`` for the factorisation and their
  rows of ``R_i`` are zeroed, so ``Q_i`` has zero columns there and ``X_i = Q_i R_i`` holds
  exactly. The orthonormal basis of ``Im(X_i)`` is ``Q_i W_i`` with ``W_i = I`` on the non-zero
  columns (``R_i`` is invertible there) and 0 elsewhere (on promoted layers, below, ``W_i`` holds
  the left singular vectors of ``R_i`` above the numerical rank, :func:`geometry.linalg.factored.rank_mask`).
  A zero factor has rank 0.
* **Per pair** ``i < j``: ``G = Q_i^T Q_j = R_i^-T K_ij R_j^-1`` (its singular values are the
  cosines of the principal angles), and ``T`` with ``Q_j = [Q_i, P] [G; T]`` for an orthonormal
  ``P`` orthogonal to ``Q_i``. Every matrix of both adapters then has exact coordinates in the
  joint orthonormal basis ``[Q_i, P]`` (dimension ``2 rp``: :func:`lift`), where
  :mod:`geometry.analysis.distances` evaluates the metrics on tiny matrices. ``T = chol(I - G^T G)^T``
  when ``||G||_2^2 <= 1/2`` (every angle ``>= 45`` degrees, so ``I - G^T G >= I/2`` is perfectly
  conditioned).
* **Promoted layers** (nearly overlapping subspaces, where ``1 - cos^2`` would cancel; factors
  too ill-conditioned or rank-deficient for Cholesky QR): one Householder QR of the layer's
  ``M = F C`` in float64 (``F (d, k)`` orthonormal and never formed, ``C (k, N rp)``,
  ``k = min(d, N rp)``) gives every adapter's exact coordinates ``X_i = F C_i`` in a single
  orthonormal basis of the layer. Then ``C_i = Qc_i R_i`` (``k x rp`` QR), ``Q_i = F Qc_i``,
  ``G = Qc_i^T Qc_j`` and ``T`` the R factor of the residual ``Qc_j - Qc_i G`` (``k x rp``), so
  small angles keep full precision from their sines (a copy under another name: ``~1e-16``), at
  the cost of one ``d x N rp`` Householder QR per promoted layer instead of a ``d``-sized product
  per pair. ``W_i``: left singular vectors of ``R_i`` above the numerical rank.

Precision (all results are float64):

* **Cholesky QR needs a well-conditioned factor**: its orthogonality error is ``~ eps cond(X)^2``.
  A layer where some factor has ``cond(X_i) > COND_MAX`` (100: error ``<= 1e-12`` in float64), or
  whose Cholesky fails (rank-deficient), or where some pair has ``||G||_2^2 > 1/2``, is promoted
  (above): Householder QR, backward stable for any rank and conditioning.
* **float32 Gram** (``gram_dtype="float32"``; ``"auto"`` picks it for factors stored in 32 bits or
  less with ``d >= FLOAT32_MIN_ROWS``, where the Gram product is the cost): ``K`` is formed in
  float32 (entry errors ``~ 1e-7 ||x_k|| ||x_l||``), the ``rp x rp`` algebra in float64. A layer
  stays on that path only while every adapter's factor there has ``cond <= COND_FLOAT32`` (10) and
  every pair there is on the Cholesky branch (``||G||_2^2 <= 1/2``, angles ``>= 45`` degrees, so
  no output is a small difference of large float32 numbers). Any other layer is promoted
  (float64 Householder QR of the stored values), so nearly overlapping subspaces, self-distances
  (``~ 1e-16``) and ill-conditioned factors keep full float64 accuracy. Within those bounds
  ``tests/test_gram.py`` checks a relative error below ``1e-6`` on every output against float64
  references. Observed: ``<= 3e-8`` (L2; ``~ 1e-9`` for cosine and Grassmann) on independent
  random factors, Llama-3-8B sizes included; ``1.1e-7`` at the edge of the domain (angles of 46
  degrees, condition 9); ``1.4e-7`` on the trained sample adapters (most of their layers are
  promoted: shared initialisation puts the ``A`` subspaces close, and trained ``B`` factors often
  have ``cond > 10``).
  With CUDA TF32 matmuls enabled, ``"auto"`` uses float64 (TF32 keeps only 10 mantissa bits).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from geometry.errors import AtlasError
from geometry.linalg.factored import rank_mask

#: Largest condition number of a factor for Cholesky QR from a float64 Gram (error ~ eps cond^2 <= 1e-12).
COND_MAX = 100.0
#: Largest condition number of a factor for the float32 Gram path (larger ones are promoted to float64).
COND_FLOAT32 = 10.0
#: ``gram_dtype="auto"`` forms the Gram product in float32 from this many rows ``d`` on (for <= 32-bit factors).
FLOAT32_MIN_ROWS = 1024
#: A pair with ``||G||_2^2`` above this promotes its layer (float64 Householder coordinates, residual from sines).
COS2_EXACT = 0.5
GRAM_DTYPES: tuple[str, ...] = ("auto", "float32", "float64")
_F64 = torch.float64
#: Layers promoted to float64 at a time (bounds the float64 copy of the factors).
_PROMOTE_GROUP = 4


def _tf32_enabled() -> bool:
    try:
        if torch.get_float32_matmul_precision() != "highest":
            return True
        return bool(torch.backends.cuda.matmul.allow_tf32)
    except Exception:  # pragma: no cover - backends without the flag
        return False


def resolve_gram_dtype(
    requested: str | torch.dtype, factor_dtypes: Sequence[torch.dtype], rows: int, device: torch.device
) -> torch.dtype:
    """The dtype of the Gram product for one factor side (see the module docstring).

    ``requested``: ``"auto"``, ``"float32"``, ``"float64"`` (or the torch dtypes). ``"auto"``:
    float32 when every factor is stored in at most 32 bits and ``rows >= FLOAT32_MIN_ROWS``,
    float64 otherwise, and float64 on CUDA with TF32 matmuls enabled.
    """
    if isinstance(requested, torch.dtype):
        requested = {torch.float32: "float32", torch.float64: "float64"}.get(requested, str(requested))
    if requested not in GRAM_DTYPES:
        raise AtlasError(f"gram_dtype {requested!r}: expected one of {', '.join(GRAM_DTYPES)}")
    if requested == "float64":
        return _F64
    tf32 = device.type == "cuda" and _tf32_enabled()
    if requested == "float32":
        if tf32:
            raise AtlasError(
                "gram_dtype='float32' on CUDA with TF32 matmuls enabled would keep 10 mantissa bits; "
                "set torch.backends.cuda.matmul.allow_tf32 = False (precision 'highest') or use 'auto'"
            )
        return torch.float32
    narrow = all(dt.is_floating_point and dt.itemsize <= 4 for dt in factor_dtypes)
    return torch.float32 if narrow and rows >= FLOAT32_MIN_ROWS and not tf32 else _F64


_THREADS = threading.Lock()
_THREADS_STATE = {"depth": 0, "saved": 1}


@contextmanager
def single_thread(device: torch.device | None = None) -> Iterator[None]:
    """One torch CPU thread inside the block (restored after; nested and concurrent uses share one change).

    Householder QR of tall matrices is a chain of thin panel steps: on the 2-core machines two
    threads made it 2x slower when idle and 10x (up to 250x, SCIENCE.md section 6) slower when
    another job shares the cores, while the Gram products gain from both threads. So QR runs
    single-threaded. No effect on CUDA work.
    """
    if device is not None and device.type != "cpu":
        yield
        return
    with _THREADS:
        if _THREADS_STATE["depth"] == 0:
            _THREADS_STATE["saved"] = torch.get_num_threads()
            if _THREADS_STATE["saved"] != 1:
                torch.set_num_threads(1)
        _THREADS_STATE["depth"] += 1
    try:
        yield
    finally:
        with _THREADS:
            _THREADS_STATE["depth"] -= 1
            if _THREADS_STATE["depth"] == 0 and _THREADS_STATE["saved"] != 1:
                torch.set_num_threads(_THREADS_STATE["saved"])


def _eye(n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.eye(n, dtype=_F64, device=like.device)


class FactorSide:
    """One factor side (``B``, or ``A^T``) of ``N`` adapters over ``L`` layers, decomposed once.

    ``blocks[i][l]``: adapter ``i``'s factor at layer ``l`` as a ``(d, r_i)`` tensor (``B`` or
    ``A.mT``, any float dtype); ``rows``: gather ``M`` as rows ``(N rp, d)`` (for ``A``, whose rows
    are contiguous) rather than columns ``(d, N rp)`` (for ``B``). ``cross``: form the whole Gram
    matrix (pairs need it) rather than its diagonal blocks only. Layer by layer, ``M`` is gathered
    into one reused buffer and multiplied at once (the factors are read once, in cache).

    Per adapter and layer (arrays ``(N, L, ...)``): ``R`` (``X = Q R``), ``Rinv`` (``Q = X Rinv``
    on the Cholesky path), ``W`` (basis coordinates, tail zeroed), ``rank`` (numerical rank).
    ``promoted (L,)``: layers computed from joint coordinates (see :meth:`promote`); there
    ``coords[l] (N, k, rp)`` holds every adapter's orthonormal ``Q_i`` in the layer's joint basis.
    """

    def __init__(
        self,
        blocks: Sequence[Sequence[torch.Tensor]],
        rp: int,
        device: torch.device,
        dtype: torch.dtype,
        cross: bool,
        rows: bool = False,
    ):
        self.blocks = blocks
        self.N, self.L = len(blocks), len(blocks[0])
        self.d = int(blocks[0][0].shape[0])
        self.rp, self.cross, self.dtype, self.rows, self.device = rp, cross, dtype, rows, device
        self.float32 = dtype != _F64
        self._buffers: dict[torch.dtype, torch.Tensor] = {}
        N, L, rp = self.N, self.L, rp
        z = dict(dtype=_F64, device=device)
        shape = (L, N * rp, N * rp) if cross else (L, N, rp, rp)
        self.K = torch.empty(shape, **z)
        for layer in range(L):
            with single_thread(device):  # the copies are memory-bound: one thread, no synchronisation
                M = self._gather(layer, dtype)
            self.K[layer] = self._gram(M)  # the one product that gains from every thread
        self.R = torch.zeros(N, L, rp, rp, **z)
        self.Rinv = torch.zeros(N, L, rp, rp, **z)
        self.W = torch.zeros(N, L, rp, rp, **z)
        self.rank = torch.zeros(N, L, dtype=torch.long, device=device)
        self.promoted = torch.zeros(L, dtype=torch.bool, device=device)
        self.coords: dict[int, torch.Tensor] = {}
        with single_thread(device):  # tiny batched LAPACK calls: threads only add synchronisation
            ok = self._factor(torch.arange(L, device=device), self._diag(self.K), COND_FLOAT32 if self.float32 else COND_MAX)
            self.promote((~ok).any(0))

    # -- Gram blocks -------------------------------------------------------------------------
    def _gather(self, layer: int, dtype: torch.dtype) -> torch.Tensor:
        """``M`` of ``layer`` in ``dtype`` on the device, as rows ``(N rp, d)`` or columns ``(d, N rp)``.

        A reused buffer: valid until the next call with the same dtype.
        """
        N, rp, d = self.N, self.rp, self.d
        src = self.blocks[0][layer].device
        buf = self._buffers.get(dtype)
        if buf is None:
            buf = self._buffers[dtype] = torch.zeros((N * rp, d) if self.rows else (d, N * rp), dtype=dtype, device=src)
        for i in range(N):
            Xi = self.blocks[i][layer].detach()
            r = Xi.shape[1]
            if self.rows:
                buf[i * rp : i * rp + r].copy_(Xi.mT)
                if r < rp:
                    buf[i * rp + r : (i + 1) * rp] = 0
            else:
                buf[:, i * rp : i * rp + r].copy_(Xi)
                if r < rp:
                    buf[:, i * rp + r : (i + 1) * rp] = 0
        return buf.to(self.device)

    def _gram(self, M: torch.Tensor) -> torch.Tensor:
        """One layer's ``M`` -> its Gram matrix ``(N rp, N rp)`` (``cross``) or diagonal blocks ``(N, rp, rp)``."""
        if self.cross:
            return M @ M.mT if self.rows else M.mT @ M
        X = M.unflatten(0, (self.N, self.rp)).mT if self.rows else M.unflatten(1, (self.N, self.rp)).permute(1, 0, 2)
        return X.mT @ X

    def _diag(self, K: torch.Tensor) -> torch.Tensor:
        """Diagonal blocks ``K_ii`` of ``K (S, ...)`` as ``(N, S, rp, rp)``."""
        if self.cross:
            S = K.shape[0]
            return K.view(S, self.N, self.rp, self.N, self.rp).diagonal(dim1=1, dim2=3).permute(3, 0, 1, 2)
        return K.transpose(0, 1)

    # -- per adapter -------------------------------------------------------------------------
    def _factor(self, layers: torch.Tensor, D: torch.Tensor, cond_limit: float) -> torch.Tensor:
        """Cholesky QR of every adapter at ``layers`` from ``D = K_ii (N, S, rp, rp)``; returns ``ok (N, S)``.

        ``ok``: the Cholesky succeeded and ``cond <= cond_limit`` over the non-zero columns (then
        the numerical rank is their number). Layers with an entry that is not ok are promoted.
        """
        rp = self.rp
        diag = D.diagonal(dim1=-2, dim2=-1)
        zero = diag <= 0  # zero columns: padding or a zero factor (exact: sums of squares)
        big = diag.amax(-1, keepdim=True)
        fill = torch.where(big > 0, big, torch.ones_like(big))
        C, info = torch.linalg.cholesky_ex(D + torch.diag_embed(zero * fill))
        eye = _eye(rp, D)
        good = info == 0
        Rc = torch.where(good[..., None, None], C.mT, eye)
        R = Rc * (~zero).unsqueeze(-1)
        Sr = torch.linalg.svdvals(R)
        nz = (~zero).sum(-1)
        smin = torch.gather(Sr, -1, (nz - 1).clamp(min=0).unsqueeze(-1)).squeeze(-1)
        ok = good & ((nz == 0) | (smin * cond_limit >= Sr[..., 0]))
        Rinv = torch.linalg.solve_triangular(Rc, eye.expand_as(Rc), upper=True)
        self.R[:, layers] = R
        self.Rinv[:, layers] = Rinv
        # Where ok, R is invertible on the non-zero columns (cond <= cond_limit): the columns of Q
        # there are already an orthonormal basis of Im(X), so W = I on them (0 on zero columns).
        self.W[:, layers] = torch.diag_embed((~zero).to(_F64))
        self.rank[:, layers] = nz
        return ok

    def promote(self, mask: torch.Tensor) -> None:
        """Recompute the layers ``mask (L,)`` from float64 factors by Householder QR (no-op where done).

        ``M = F C`` (Householder QR of ``M (d, N rp)`` in float64, ``F`` never formed, ``C (k, N rp)``
        with ``k = min(d, N rp)``) gives every adapter's factor coordinates ``X_i = F C_i`` in one
        orthonormal basis of the layer; a small QR ``C_i = Qc_i R_i`` then gives ``Q_i = F Qc_i``
        (columns orthonormal, or zero where ``k < rp``) and ``R_i``; ``W_i`` are the left singular
        vectors of ``R_i`` above the numerical rank. Backward stable: no ``cond^2`` factor, any rank.
        """
        rp, d, N = self.rp, self.d, self.N
        for layer in (mask & ~self.promoted).nonzero().squeeze(-1).tolist():
            M = self._gather(layer, _F64)
            with single_thread(self.device):
                C = torch.linalg.qr(M.mT if self.rows else M, mode="r")[1]  # (k, N rp)
                Qc, Rc = torch.linalg.qr(C.unflatten(1, (N, rp)).permute(1, 0, 2))  # (N, k, m), (N, m, rp)
            k = C.shape[0]
            m = Qc.shape[-1]
            if m < rp:  # k < rp (tiny d): zero columns in Q, zero rows in R
                Qc = torch.cat([Qc, Qc.new_zeros(N, k, rp - m)], -1)
                Rc = torch.cat([Rc, Rc.new_zeros(N, rp - m, rp)], -2)
            Ur, Sr, _ = torch.linalg.svd(Rc)
            keep = rank_mask(Sr, d, rp)
            self.R[:, layer] = Rc
            self.W[:, layer] = Ur * keep.unsqueeze(-2)
            self.rank[:, layer] = keep.sum(-1)
            self.coords[layer] = Qc
            self.promoted[layer] = True

    # -- per pair ----------------------------------------------------------------------------
    def _G(self, left: torch.Tensor, right: torch.Tensor, layers: torch.Tensor) -> torch.Tensor:
        """``G = Q_i^T Q_j`` for the pairs ``(left[p], right[p])`` at ``layers``: ``(P, S, rp, rp)``.

        ``R_i^-T K_ij R_j^-1`` on Cholesky layers, ``Qc_i^T Qc_j`` on promoted ones.
        """
        S, rp, N = len(layers), self.rp, self.N
        K = self.K[layers].view(S, N, rp, N, rp)
        cross = K[:, left, :, right, :]  # (P, S, rp, rp): advanced indices first
        G = self.Rinv[left][:, layers].mT @ cross @ self.Rinv[right][:, layers]
        for s, layer in enumerate(layers.tolist()):
            if layer in self.coords:
                Qc = self.coords[layer]
                G[:, s] = Qc[left].mT @ Qc[right]
        return G

    def joint(self, left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(G, T)``, each ``(P, L, rp, rp)``, with ``Q_j = [Q_i, P] [G; T]`` (see the module docstring).

        A layer where some pair is not on the Cholesky branch (``||G||_2^2 > 1/2``) is promoted
        first; on promoted layers ``T`` is the R factor of the residual ``Qc_j - Qc_i G`` (``k x rp``).
        """
        if not self.cross:
            raise AtlasError("FactorSide.joint needs the cross Gram blocks (cross=True)")
        layers = torch.arange(self.L, device=self.K.device)
        G = self._G(left, right, layers)
        need = ~self._cholesky_ok(G)[1].all(0) & ~self.promoted
        if bool(need.any()):
            self.promote(need)
            sub = need.nonzero().squeeze(-1)
            G[:, sub] = self._G(left, right, sub)
        T, _ = self._cholesky_ok(G)
        if self.coords:
            T = T.clone()
            rp = self.rp
            for layer, Qc in self.coords.items():
                residual = Qc[right] - Qc[left] @ G[:, layer]  # (P, k, rp)
                with single_thread(self.device):
                    Rr = torch.linalg.qr(residual, mode="r")[1]  # (P, min(k, rp), rp)
                Tl = torch.zeros(len(left), rp, rp, dtype=_F64, device=Rr.device)
                Tl[:, : Rr.shape[-2]] = Rr[:, :rp]
                T[:, layer] = Tl
        return G, T

    @staticmethod
    def _cholesky_ok(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``T = chol(I - G^T G)^T`` and where it is used: ``||G||_2^2 <= COS2_EXACT`` and the Cholesky succeeded.

        ``||G||_2^2 <= c`` iff ``c I - G^T G`` is positive semi-definite, tested by its Cholesky
        (cheaper than the SVD; the branches agree to rounding at the boundary, where both are accurate).
        """
        eye = _eye(G.shape[-1], G)
        H = G.mT @ G
        C, info = torch.linalg.cholesky_ex(eye - H)
        _, info_c = torch.linalg.cholesky_ex(COS2_EXACT * eye - H)
        return C.mT, (info_c == 0) & (info == 0)


def lift(G: torch.Tensor, T: torch.Tensor, X1: torch.Tensor | None, X2: torch.Tensor | None) -> list[torch.Tensor]:
    """Joint coordinates of ``Q_1 X1`` and ``Q_2 X2`` in the basis ``[Q_1, P]``: ``[X1; 0]`` and ``[G X2; T X2]``."""
    out = []
    if X1 is not None:
        out.append(torch.cat([X1, X1.new_zeros(*X1.shape[:-2], T.shape[-2], X1.shape[-1])], -2))
    if X2 is not None:
        out.append(torch.cat([G @ X2, T @ X2], -2))
    return out


# ---------------------------------------------------------------------------------------------
# A group of modules (one kind, a chunk of layers) and all its pairs
@dataclass
class Group:
    """Every adapter's modules of one ``(stack, kind)`` layer chunk, decomposed (arrays ``(N, L, ...)``).

    ``b`` / ``a``: the factor sides (``None`` when not needed). ``r``: nominal ranks.
    ``Uc, S, Vc, rank`` (after :meth:`compute_core`; ``None`` when the factor ``ba`` is not
    needed): thin SVD of the task vector, ``tau = s B A = (Qb Uc) diag(S) (Qa Vc)^T`` from the SVD
    of the core ``Rb Ra^T``; a negative scale flips ``Uc``.
    """

    b: FactorSide | None
    a: FactorSide | None
    r: torch.Tensor
    scales: torch.Tensor
    shape: tuple[int, int]
    core: bool
    Uc: torch.Tensor | None = None
    S: torch.Tensor | None = None
    Vc: torch.Tensor | None = None
    rank: torch.Tensor | None = None

    def compute_core(self) -> None:
        """The thin SVD of ``tau`` from the current ``R`` factors (call again after a side is promoted)."""
        if not self.core:
            return
        if self.b is None or self.a is None:
            raise AtlasError("Group.compute_core: the task-vector SVD needs both factor sides")
        m, n = self.shape
        Uc, Sc, Vch = torch.linalg.svd(self.b.R @ self.a.R.mT)
        s = self.scales
        S = Sc * s.abs().unsqueeze(-1)
        keep = rank_mask(S, m, n)
        sign = torch.where(s < 0, -1.0, 1.0).to(_F64)[..., None, None]
        self.Uc, self.S, self.Vc = Uc * keep.unsqueeze(-2) * sign, S * keep, Vch.mT * keep.unsqueeze(-2)
        self.rank = keep.sum(-1)


def decompose_group(
    Bs: Sequence[Sequence[torch.Tensor]],
    As: Sequence[Sequence[torch.Tensor]],
    scales: torch.Tensor,
    ranks: torch.Tensor,
    *,
    sides: dict[str, bool],
    core: bool,
    device: torch.device,
    gram_dtype: str | torch.dtype = "auto",
) -> Group:
    """Decompose ``N`` adapters' factors ``Bs[i][l] (m, r_i)``, ``As[i][l] (r_i, n)`` with ``scales (N, L)``.

    ``sides``: ``{"b": cross, "a": cross}`` for the sides to decompose (``cross``: pairs will need
    their Gram cross blocks). ``core``: the thin SVD of ``tau`` is wanted (needs both sides); it is
    computed by :func:`all_pairs` after the pairs' promotions, or by :meth:`Group.compute_core`.
    """
    rp = max(1, max(int(X.shape[0]) for per in As for X in per))
    m, n = int(Bs[0][0].shape[0]), int(As[0][0].shape[1])
    dtypes = [X.dtype for per in (*Bs, *As) for X in per]
    built: dict[str, FactorSide] = {}
    for name, cross in sides.items():
        blocks = Bs if name == "b" else [[A.mT for A in per] for per in As]
        rows = m if name == "b" else n
        built[name] = FactorSide(
            blocks, rp, device, resolve_gram_dtype(gram_dtype, dtypes, rows, device), cross, rows=name == "a"
        )
    if core and ("b" not in built or "a" not in built):
        raise AtlasError("decompose_group: the task-vector SVD needs both factor sides")
    return Group(built.get("b"), built.get("a"), ranks.to(device), scales.to(device=device, dtype=_F64), (m, n), core)


@dataclass
class PairSide:
    """One factor side for a batch of pair-layers (flattened ``P * L``): joint coordinates and both ends."""

    G: torch.Tensor
    T: torch.Tensor
    R1: torch.Tensor
    R2: torch.Tensor
    W1: torch.Tensor
    W2: torch.Tensor
    rank1: torch.Tensor
    rank2: torch.Tensor


@dataclass
class PairBatch:
    """Everything the metrics need for every pair ``i < j`` and layer, flattened to ``P * L`` items."""

    pairs: list[tuple[int, int]]
    layers: int
    b: PairSide | None
    a: PairSide | None
    Uc1: torch.Tensor | None
    Uc2: torch.Tensor | None
    S1: torch.Tensor | None
    S2: torch.Tensor | None
    Vc1: torch.Tensor | None
    Vc2: torch.Tensor | None
    rank1: torch.Tensor | None
    rank2: torch.Tensor | None
    r1: torch.Tensor
    r2: torch.Tensor


def all_pairs(group: Group, cross: dict[str, bool]) -> PairBatch:
    """Joint coordinates of every pair ``i < j`` at every layer of ``group`` (sides with ``cross[name]``).

    The joints come first (they may promote layers to float64), then the task-vector SVD, so that
    every quantity of a layer comes from the same ``R`` factors.
    """
    N, L = group.r.shape
    pairs = [(i, j) for i in range(N) for j in range(i + 1, N)]
    dev = group.r.device
    left = torch.tensor([p[0] for p in pairs], device=dev, dtype=torch.long)
    right = torch.tensor([p[1] for p in pairs], device=dev, dtype=torch.long)
    with single_thread(dev):  # rp x rp algebra and small QRs (see single_thread)
        return pair_batch(group, cross, pairs, left, right)


def pair_batch(group: Group, cross: dict[str, bool], pairs, left, right) -> PairBatch:
    def flat(x: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor | None:
        return None if x is None else x[idx].flatten(0, 1)

    sides: dict[str, PairSide | None] = {}
    for name in ("b", "a"):
        side = getattr(group, name)
        if side is None or not cross.get(name):
            sides[name] = None
            continue
        G, T = side.joint(left, right)  # may promote layers: R, W, rank are read after
        sides[name] = PairSide(
            G.flatten(0, 1), T.flatten(0, 1), flat(side.R, left), flat(side.R, right), flat(side.W, left),
            flat(side.W, right), flat(side.rank, left), flat(side.rank, right),
        )
    group.compute_core()
    return PairBatch(
        pairs, group.r.shape[1], sides["b"], sides["a"], flat(group.Uc, left), flat(group.Uc, right), flat(group.S, left),
        flat(group.S, right), flat(group.Vc, left), flat(group.Vc, right), flat(group.rank, left),
        flat(group.rank, right), flat(group.r, left), flat(group.r, right),
    )


def bytes_per_layer(n_adapters: int, rp: int) -> int:
    """Working memory of one layer (float64 Gram matrices of both sides, per-adapter factors, pair batch), for chunking.

    The factors themselves are gathered one layer at a time into a reused ``d x N rp`` buffer, so
    they do not grow with the chunk.
    """
    pairs = n_adapters * (n_adapters - 1) // 2
    gram = 2 * 12 * (n_adapters * rp) ** 2  # float32 product, float64 copy, both sides
    adapters = 2 * 6 * 8 * n_adapters * rp * rp  # R, Rinv, W per side, the core's SVD
    batch = 64 * 8 * pairs * rp * rp  # G, T, gathered ends, lifted matrices, metric temporaries
    return gram + adapters + batch
