"""One module task of a survey: settings, the memory plan (blocks and chunks), and the all-pairs distances of
one module by the factored Gram engine (:mod:`geometry.linalg.gram`)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from geometry.errors import AtlasError
from geometry.survey.format import BASELINE_BYTES, DEFAULT_MEMORY_GB, FORMAT_VERSION, METRIC_COLUMNS
from geometry.survey.index import FactorRef, read_factors
from geometry.types import ModuleKey


# ---------------------------------------------------------------------------------------------
# Settings, memory plan, one module
@dataclass(frozen=True)
class SurveySettings:
    """What a survey computes and how (``memory_gb`` bounds one process / worker)."""

    pad: bool = False
    gram_dtype: str = "auto"
    memory_gb: float = DEFAULT_MEMORY_GB
    device: str | None = None  #: None: CUDA when present, else CPU (decided where the task runs)
    threads: int | None = None  #: torch CPU threads in a task (None: leave as is)
    block: int | None = None  #: adapters per block (None: from the memory limit)
    pair_chunk: int | None = None  #: pairs per chunk (None: from the memory limit)

    def numeric(self) -> dict:
        """The settings that change the stored numbers (beyond rounding): checked on resume."""
        return {"pad": self.pad, "gram_dtype": self.gram_dtype, "format": FORMAT_VERSION}


@dataclass(frozen=True)
class ModuleTask:
    """One module of every adapter: the unit of work (serialisable; a worker reads the files itself)."""

    index: int
    key: ModuleKey
    shape: tuple[int, int]
    refs: tuple[FactorRef, ...]
    settings: SurveySettings

    @property
    def label(self) -> str:
        return self.key.label


def _pair_bytes(rp: int) -> int:
    return 64 * 8 * rp * rp  # G, T, gathered ends, lifted matrices, metric temporaries (geometry.linalg.gram.bytes_per_layer)


def task_bytes(n: int, pairs: int, rp: int, shape: tuple[int, int], itemsize: int = 4) -> int:
    """Working memory of one block-pair step: ``n`` adapters' factors and Gram matrices, ``pairs`` pairs at once."""
    m, k = shape
    d = m + k
    factors = n * d * rp * itemsize
    gather = n * d * rp * (4 + 8 + 8)  # float32 buffer, float64 buffer and Householder copy on promotion
    gram = 2 * 12 * (n * rp) ** 2
    coords = 8 * n * rp * (min(m, n * rp) + min(k, n * rp))
    adapters = 2 * 6 * 8 * n * rp * rp
    return factors + gather + gram + coords + adapters + pairs * _pair_bytes(rp)


def plan_blocks(n: int, rp: int, shape: tuple[int, int], memory_gb: float, block: int | None = None,
                pair_chunk: int | None = None) -> tuple[int, int]:
    """``(block, pair_chunk)``: adapters per block and pairs per chunk within ``memory_gb`` (minus a baseline).

    One block (``block = n``) when every adapter fits with a chunk of at least 256 pairs; else the
    largest ``block`` whose block pairs (``2 block`` adapters) fit. Raises when one pair does not fit.
    """
    budget = int(memory_gb * 2**30) - BASELINE_BYTES
    out_bytes = n * (n - 1) // 2 * len(METRIC_COLUMNS) * 8  # the module's condensed results
    budget -= out_bytes
    min_chunk = 256
    if block is None:
        if task_bytes(n, min_chunk, rp, shape) <= budget:
            block = n
        else:
            lo, hi = 1, max(1, n // 2)
            if task_bytes(2, 1, rp, shape) > budget:
                raise AtlasError(
                    f"memory limit {memory_gb:g} GB is too small for one pair of modules of shape "
                    f"{shape[0]}x{shape[1]} (r = {rp}); raise --memory-limit")
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if task_bytes(2 * mid, min_chunk, rp, shape) <= budget:
                    lo = mid
                else:
                    hi = mid - 1
            block = lo
    block = max(1, min(int(block), n))
    group = n if block >= n else 2 * block
    if pair_chunk is None:
        free = budget - task_bytes(group, 0, rp, shape)
        pair_chunk = max(min_chunk, free // _pair_bytes(rp))
    return block, int(max(1, min(pair_chunk, max(1, group * (group - 1) // 2))))


def _pair_index(i: np.ndarray, j: np.ndarray, n: int) -> np.ndarray:
    """Position of pair ``i < j`` in the condensed (row-major upper triangle) order."""
    return i * n - i * (i + 1) // 2 + (j - i - 1)


def condensed_pairs(n: int) -> tuple[np.ndarray, np.ndarray]:
    """``(i, j)`` of every pair ``i < j`` in condensed order."""
    ii, jj = np.triu_indices(n, k=1)
    return ii.astype(np.int64), jj.astype(np.int64)


def _wanted() -> set[tuple[str, str]]:
    return {tuple(c.rsplit("_", 1)) for c in METRIC_COLUMNS}


def module_distances(
    Bs: Sequence[torch.Tensor], As: Sequence[torch.Tensor], scales: Sequence[float], ranks: Sequence[int], *,
    pad: bool = False, gram_dtype: str = "auto", device: torch.device | str | None = None,
    block: int | None = None, pair_chunk: int | None = None, memory_gb: float = DEFAULT_MEMORY_GB,
    fetch: Callable[[Sequence[int]], tuple[list, list]] | None = None,
) -> dict[str, np.ndarray]:
    """Every metric of :data:`METRIC_COLUMNS` for every pair ``i < j`` of one module, condensed order.

    ``Bs[i] (m, r_i)``, ``As[i] (r_i, n)``, ``scales[i]`` (peft's ``s``), ``ranks[i]``. The numbers
    are :mod:`geometry.analysis.distances`' (``decompose_group`` + the pair algebra of :mod:`geometry.linalg.gram` +
    ``pair_metrics``, on one layer). ``block``: adapters per block (Gram products per block pair, see the
    module docstring); ``pair_chunk``: pairs per batch; both default from ``memory_gb``.
    ``fetch(indices) -> (Bs, As)`` reads factors on demand instead (then ``Bs`` / ``As`` may be ``None``).
    """
    from geometry.analysis.distances import pair_metrics
    from geometry.device import default_device
    from geometry.linalg.gram import decompose_group, pair_batch, single_thread

    n = len(scales)
    dev = torch.device(device) if device is not None else default_device()
    out = {c: np.full(n * (n - 1) // 2, np.nan) for c in METRIC_COLUMNS}
    if n < 2:
        return out
    if fetch is None:
        def fetch(idx):
            return [Bs[g] for g in idx], [As[g] for g in idx]
    rp = max(1, max(int(r) for r in ranks))
    first_b, first_a = fetch([0])
    shape = (int(first_b[0].shape[0]), int(first_a[0].shape[1]))
    block, pair_chunk = plan_blocks(n, rp, shape, memory_gb, block, pair_chunk)
    wanted = _wanted()
    cross = {"b": True, "a": True}
    blocks = [list(range(s, min(s + block, n))) for s in range(0, n, block)]
    for bi, rows in enumerate(blocks):
        rows_b, rows_a = fetch(rows)  # the row block is read once, each column block once per row block
        for cols in blocks[bi:]:
            same = cols is rows
            idx = rows if same else rows + cols
            if same:
                la, lb = np.triu_indices(len(rows), k=1)
            else:
                la, lb = np.meshgrid(np.arange(len(rows)), len(rows) + np.arange(len(cols)), indexing="ij")
                la, lb = la.ravel(), lb.ravel()
            if not len(la):
                continue
            if same:
                b_list, a_list = rows_b, rows_a
            else:
                col_b, col_a = fetch(cols)
                b_list, a_list = rows_b + col_b, rows_a + col_a
                del col_b, col_a
            with torch.no_grad():
                group = decompose_group(
                    [[B] for B in b_list], [[A] for A in a_list],
                    torch.tensor([[float(scales[g])] for g in idx], dtype=torch.float64),
                    torch.tensor([[int(ranks[g])] for g in idx]), sides=cross, core=True, device=dev,
                    gram_dtype=gram_dtype,
                )
                del b_list, a_list
                gi, gj = np.asarray(idx)[la], np.asarray(idx)[lb]
                pos = _pair_index(gi, gj, n)
                left_all = torch.as_tensor(la, dtype=torch.long, device=dev)
                right_all = torch.as_tensor(lb, dtype=torch.long, device=dev)
                with single_thread(dev):
                    if len(la) > pair_chunk:  # one chunk: FactorSide.joint decides over all pairs itself
                        _promote(group, left_all, right_all, pair_chunk)
                    for s in range(0, len(la), pair_chunk):
                        left, right = left_all[s : s + pair_chunk], right_all[s : s + pair_chunk]
                        pairs = list(zip(la[s : s + pair_chunk].tolist(), lb[s : s + pair_chunk].tolist(), strict=True))
                        batch = pair_batch(group, cross, pairs, left, right)
                        values = pair_metrics(batch, wanted, pad)
                        for (m, f), v in values.items():
                            out[f"{m}_{f}"][pos[s : s + pair_chunk]] = v.reshape(-1).cpu().numpy()
                        del batch, values
                del group
        del rows_b, rows_a
    return out


def _promote(group, left: torch.Tensor, right: torch.Tensor, chunk: int) -> None:
    """Promote every layer some pair of the block needs promoted, before any chunk is computed.

    ``FactorSide.joint`` promotes a layer when one of *its* pairs needs it; doing that per chunk
    would compute earlier chunks before a later chunk's promotion. Deciding over all pairs first
    makes a chunked run equal to an unchunked one.
    """
    for side in (group.b, group.a):
        if side is None:
            continue
        layers = torch.arange(side.L, device=side.K.device)
        need = torch.zeros(side.L, dtype=torch.bool, device=side.K.device)
        for s in range(0, len(left), chunk):
            G = side._G(left[s : s + chunk], right[s : s + chunk], layers)
            need |= ~side._cholesky_ok(G)[1].all(0)
        need &= ~side.promoted
        if bool(need.any()):
            side.promote(need)


def compute_module(task: ModuleTask) -> dict[str, Any]:
    """Run one :class:`ModuleTask` where it is (this process or a Dask worker): read, compute, return arrays.

    Returns ``{"index", "label", "values": {column: (P,) float64}, "seconds", "device"}``.
    """
    t0 = time.perf_counter()
    s = task.settings
    if s.threads:
        torch.set_num_threads(int(s.threads))
    cache: dict = {}

    def fetch(idx):
        Bs, As = [], []
        for g in idx:
            B, A = read_factors(task.refs[g], cache)
            Bs.append(B)
            As.append(A)
        return Bs, As

    from geometry.device import default_device

    dev = torch.device(s.device) if s.device else default_device()
    values = module_distances(
        None, None, [r.scale for r in task.refs], [r.rank for r in task.refs], pad=s.pad, gram_dtype=s.gram_dtype,
        device=dev, block=s.block, pair_chunk=s.pair_chunk, memory_gb=s.memory_gb, fetch=fetch,
    )
    return {"index": task.index, "label": task.label, "values": values, "seconds": time.perf_counter() - t0,
            "device": str(dev)}
