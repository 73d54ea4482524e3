"""Surveys: all-pairs geometry over hundreds of adapters, out of core, module by module.

A survey of ``N`` adapters computes, for every common module (one ``(stack, layer, kind)``) and every
pair ``i < j``, every distance of :mod:`geometry.distances` (L2, cosine and Grassmann on ``ba``, ``a``
and ``b``). The factors of 500 Llama-3-8B r = 16 adapters are about 80 GB in float32, so nothing
holds them all:

* **Reading** (:func:`scan`): each adapter is indexed from its ``adapter_config.json`` and the
  safetensors *header* only (module keys, shapes, scales: the loader's own mapping,
  :func:`geometry.loader.fill_modules`, run on zero-stride placeholders). A module task then reads that
  module's two factors of each adapter with safetensors' lazy ``safe_open`` (a slice for the rows
  of a fused projection), or with byte-range reads through ``fsspec`` for a URL (``s3://``,
  ``gs://``, ``file://``...).
* **Computing** (:func:`compute_module`): per module, the factored engine of :mod:`geometry.gram`
  (one Gram product over all adapters' stacked factors, then ``r x r`` algebra per pair) and the
  metric definitions of :mod:`geometry.distances`, i.e. the same code as ``geometry.distances``,
  on one layer. When ``N r`` is large the adapters are split into blocks and the Gram product is
  formed per block pair ``(I, J)`` (``I <= J``: the pairs inside ``I`` when ``I = J``, across
  otherwise); pairs are processed in chunks. Block and chunk sizes follow from the memory limit
  (:func:`plan_blocks`), so the working memory is bounded whatever ``N``. Blocking changes only
  rounding (a layer is promoted to float64 Householder coordinates when one of its pairs in the
  block needs it, :mod:`geometry.gram`): blocked and unblocked results agree to ``~1e-12``.
* **Writing** (:func:`run_survey`): the output is a Parquet dataset (a folder ``results.parquet/``):
  one file per finished module, written atomically (temporary name, then rename), one row per
  ``(i, j, module)`` with ``i < j`` (distances are symmetric) and one float64 column per
  ``metric_factor`` (``l2_ba`` ... ``grassmann_b``); NaN where undefined (a zero task vector, A or
  B alone at different ranks), never 0. ``_survey.json`` beside them describes the adapters and the
  settings. A rerun skips the modules already written (resume after an interruption); it refuses
  a folder written for other adapters or settings.
* **Distributed**: :mod:`geometry.survey_dask` runs the same module tasks on a Dask cluster.

Reading results: :func:`open_survey` (a folder, or one Parquet file written by :meth:`Survey.save`),
:meth:`Survey.matrix` (adapter x adapter mean over modules), :meth:`Survey.neighbours`.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from geometry.errors import AtlasError
from geometry.types import ModuleKey, ordered_keys

Progress = Callable[[int, int, str], None]

#: The metric columns of a survey, ``metric_factor``, in this order.
METRIC_COLUMNS: tuple[str, ...] = tuple(f"{m}_{f}" for f in ("ba", "b", "a") for m in ("l2", "cosine", "grassmann"))
#: Column order of every survey table.
KEY_COLUMNS: tuple[str, ...] = ("i", "j", "adapter_i", "adapter_j", "stack", "layer", "kind", "module")
MANIFEST = "_survey.json"
#: Bumped when the meaning of a stored number changes (a folder of another version is refused).
FORMAT_VERSION = 1
#: Default memory limit of one process (or Dask worker) running module tasks.
DEFAULT_MEMORY_GB = 4.0
#: What a process holds besides a task's arrays (Python, torch, pyarrow): kept out of the task budget.
BASELINE_BYTES = 700 * 2**20
_METADATA_KEY = b"adapter_atlas.survey"
_ST_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


# ---------------------------------------------------------------------------------------------
# Indexing adapters from their headers
@dataclass(frozen=True)
class FactorRef:
    """Where one adapter's factors of one module are: enough for a worker to read them itself."""

    weights: str  #: path or URL of ``adapter_model.safetensors``
    a_key: str
    b_key: str
    rows: tuple[int, int] | None  #: rows of ``B`` for a part of a fused projection
    rank: int
    scale: float


@dataclass
class AdapterRef:
    """An adapter indexed without reading its tensors: metadata and a :class:`FactorRef` per module."""

    name: str
    location: str
    weights: str
    base: str | None
    r: int
    alpha: float
    target_modules: list[str]
    fingerprint: str
    shapes: dict[ModuleKey, tuple[int, int]] = field(default_factory=dict)
    factors: dict[ModuleKey, FactorRef] = field(default_factory=dict)

    def describe(self) -> dict:
        """The manifest entry (JSON-able)."""
        kinds = sorted({k.kind for k in self.factors})
        return {
            "name": self.name, "location": self.location, "base": self.base, "r": self.r, "alpha": self.alpha,
            "target_modules": self.target_modules, "kinds": kinds, "modules": len(self.factors),
            "fingerprint": self.fingerprint,
        }


def _is_url(location: str) -> bool:
    return "://" in location


def _join(location: str, name: str) -> str:
    return f"{location.rstrip('/')}/{name}" if _is_url(location) else str(Path(location) / name)


def _open(location: str):
    if _is_url(location):
        import fsspec

        return fsspec.open(location, "rb").open()
    return open(location, "rb")


def _exists(location: str) -> bool:
    if _is_url(location):
        import fsspec

        fs, path = fsspec.core.url_to_fs(location)
        return fs.exists(path)
    return Path(location).is_file()


def read_header(weights: str) -> tuple[dict, int, bytes]:
    """``(header, data_start, raw_header)`` of a safetensors file (local path or URL), reading the header only."""
    try:
        with _open(weights) as fh:
            head = fh.read(8)
            if len(head) != 8:
                raise AtlasError(f"{weights}: not a safetensors file (shorter than 8 bytes)")
            (size,) = struct.unpack("<Q", head)
            if size > 100_000_000:
                raise AtlasError(f"{weights}: safetensors header of {size} bytes (corrupt file?)")
            raw = fh.read(size)
    except FileNotFoundError as exc:
        raise AtlasError(f"{weights}: no such file") from exc
    try:
        header = json.loads(raw)
    except ValueError as exc:
        raise AtlasError(f"{weights}: unreadable safetensors header ({exc})") from exc
    header.pop("__metadata__", None)
    return header, 8 + size, raw


def _placeholder(info: dict, weights: str, key: str) -> torch.Tensor:
    dtype = _ST_DTYPES.get(info.get("dtype"))
    if dtype is None:
        raise AtlasError(f"{weights}: tensor {key} has dtype {info.get('dtype')}, expected F16, BF16, F32 or F64")
    return torch.zeros((), dtype=dtype).expand(*[int(s) for s in info["shape"]])


def index_adapter(location: str, name: str | None = None) -> AdapterRef:
    """Index the peft adapter folder (or URL) ``location`` from its config and safetensors header.

    The module keys, ranks, scales and fused-projection splits are the loader's (the same
    :func:`geometry.loader.fill_modules`, run on zero-stride placeholders of the header's shapes), so a
    survey sees exactly the modules ``geometry.load`` would. Only ``.safetensors`` weights are
    supported (a ``.bin`` pickle cannot be read lazily).
    """
    from geometry.config import PEFT_PREFIX, parse_config
    from geometry.loader import CONFIG_NAME, EMBED_RE, FACTOR_RE, MAGNITUDE_RE, fill_modules
    from geometry.types import Adapter

    location = str(location)
    if not _is_url(location):
        path = Path(location).expanduser()
        if not path.exists():
            raise AtlasError(f"{location}: no such file or folder")
        if not path.is_dir():
            raise AtlasError(f"{location}: a survey reads adapter folders (unzip archives first)")
        location = str(path)
    cfg_path = _join(location, CONFIG_NAME)
    weights = _join(location, "adapter_model.safetensors")
    if not _exists(cfg_path):
        raise AtlasError(f"{location}: no {CONFIG_NAME}")
    if not _exists(weights):
        raise AtlasError(f"{location}: no adapter_model.safetensors (a survey cannot read .bin weights lazily)")
    with _open(cfg_path) as fh:
        cfg_bytes = fh.read()
    try:
        raw_cfg = json.loads(cfg_bytes)
    except ValueError as exc:
        raise AtlasError(f"{cfg_path}: invalid JSON ({exc})") from exc
    config = parse_config(raw_cfg, source=cfg_path)
    header, _, raw_header = read_header(weights)
    state: dict[str, torch.Tensor] = {}
    keys: dict[str, dict[str, str]] = {}
    for key, info in header.items():
        short = key.removeprefix(PEFT_PREFIX)
        m = FACTOR_RE.match(short) or EMBED_RE.match(short)
        if m:
            if len(info.get("shape", [])) != 2:
                raise AtlasError(f"{weights}: tensor {key} has shape {info.get('shape')}: a survey reads 2-D LoRA "
                                 "factors only (legacy merged-LoRA files: load them with geometry.load)")
            state[key] = _placeholder(info, weights, key)
            keys.setdefault(m.group("mod"), {})[m.group("ab")] = key
        elif MAGNITUDE_RE.match(short):
            state[key] = _placeholder(info, weights, key)
    skeleton = Adapter(name=name or Path(location.rstrip("/")).name, config=config, modules={}, source=location)
    fill_modules(skeleton, state, weights, cfg_path)
    try:
        stat = os.stat(weights) if not _is_url(location) else None
    except OSError:
        stat = None
    digest = hashlib.sha256(cfg_bytes + raw_header)
    digest.update(str(stat.st_size if stat else "").encode() + str(stat.st_mtime_ns if stat else "").encode())
    target = config.target_modules
    ref = AdapterRef(
        name=skeleton.name, location=location, weights=weights, base=config.base_model_name_or_path, r=int(config.r),
        alpha=float(config.lora_alpha),
        target_modules=sorted([target] if isinstance(target, str) else list(target or [])),
        fingerprint=digest.hexdigest()[:32],
    )
    for key, mod in skeleton.modules.items():
        slot = keys[mod.name]
        ref.factors[key] = FactorRef(weights, slot["A"], slot["B"], mod.rows, mod.rank, float(mod.scale))
        ref.shapes[key] = mod.shape
    return ref


def adapter_locations(sources: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Adapter folders / URLs from ``sources``: a folder of adapter folders, a text file listing them
    (one per line, ``#`` comments), an adapter folder, or a list of any of these."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    out: list[str] = []
    for src in sources:
        text = str(src)
        if _is_url(text):
            import fsspec

            fs, path = fsspec.core.url_to_fs(text)
            if fs.exists(f"{path.rstrip('/')}/adapter_config.json"):
                out.append(text)
                continue
            proto = text.split("://", 1)[0]
            found = sorted(p for p in fs.ls(path, detail=False) if fs.exists(f"{p.rstrip('/')}/adapter_config.json"))
            if not found:
                raise AtlasError(f"{text}: no adapter folder (with adapter_config.json) there")
            out += [f"{proto}://{p.lstrip('/')}" if proto != "file" else f"file://{p}" for p in found]
            continue
        path = Path(text).expanduser()
        if not path.exists():
            raise AtlasError(f"{text}: no such file or folder")
        if path.is_file():
            lines = [ln.strip() for ln in path.read_text().splitlines()]
            listed = [ln for ln in lines if ln and not ln.startswith("#")]
            if not listed:
                raise AtlasError(f"{text}: an empty list of adapters")
            out += [ln if _is_url(ln) else str((path.parent / ln).expanduser()) if not Path(ln).is_absolute() else ln
                    for ln in listed]
        elif (path / "adapter_config.json").is_file():
            out.append(str(path))
        else:
            found = sorted(p for p in path.iterdir() if p.is_dir() and (p / "adapter_config.json").is_file())
            if not found:
                raise AtlasError(f"{text}: no adapter folder (with adapter_config.json) in this folder")
            out += [str(p) for p in found]
    return out


def scan(sources, names: Sequence[str] | None = None, progress: Progress | None = None) -> list[AdapterRef]:
    """Index every adapter of ``sources`` (see :func:`adapter_locations`); names made unique with ``-2``, ``-3``."""
    locations = adapter_locations(sources)
    if names is not None and len(names) != len(locations):
        raise AtlasError(f"{len(names)} names for {len(locations)} adapters")
    refs, seen = [], set()
    for k, loc in enumerate(locations):
        ref = index_adapter(loc, names[k] if names is not None else None)
        base, n = ref.name, 2
        while ref.name in seen:
            ref.name, n = f"{base}-{n}", n + 1
        seen.add(ref.name)
        refs.append(ref)
        if progress:
            progress(k + 1, len(locations), f"indexed {ref.name}")
    return refs


# ---------------------------------------------------------------------------------------------
# Reading one module's factors
def _read_range(fh, start: int, length: int) -> bytes:
    fh.seek(start)
    data = fh.read(length)
    if len(data) != length:
        raise AtlasError(f"short read ({len(data)} of {length} bytes): truncated safetensors file?")
    return data


def read_factors(ref: FactorRef, header_cache: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` of one module of one adapter: ``safe_open`` slices for a path, byte ranges for a URL."""
    r0, r1 = ref.rows if ref.rows is not None else (None, None)
    if not _is_url(ref.weights):
        from safetensors import safe_open

        with safe_open(ref.weights, framework="pt") as f:
            A = f.get_tensor(ref.a_key)
            B = f.get_slice(ref.b_key)[r0:r1] if ref.rows is not None else f.get_tensor(ref.b_key)
        return B, A
    cache = header_cache if header_cache is not None else {}
    if ref.weights not in cache:
        cache[ref.weights] = read_header(ref.weights)[:2]
    header, start = cache[ref.weights]
    out = []
    with _open(ref.weights) as fh:
        for key, rows in ((ref.b_key, ref.rows), (ref.a_key, None)):
            info = header[key]
            dtype = _ST_DTYPES[info["dtype"]]
            shape = [int(s) for s in info["shape"]]
            lo, hi = (int(v) for v in info["data_offsets"])
            if rows is not None:  # contiguous rows of a row-major (m, r) matrix
                row_bytes = shape[1] * dtype.itemsize
                lo, hi, shape = lo + rows[0] * row_bytes, lo + rows[1] * row_bytes, [rows[1] - rows[0], shape[1]]
            data = bytearray(_read_range(fh, start + lo, hi - lo))
            out.append(torch.frombuffer(data, dtype=dtype).reshape(shape) if data else torch.zeros(shape, dtype=dtype))
    return out[0], out[1]


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
    return 64 * 8 * rp * rp  # G, T, gathered ends, lifted matrices, metric temporaries (geometry.gram.bytes_per_layer)


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
    are :mod:`geometry.distances`' (``decompose_group`` + the pair algebra of :mod:`geometry.gram` +
    ``pair_metrics``, on one layer). ``block``: adapters per block (Gram products per block pair, see the
    module docstring); ``pair_chunk``: pairs per batch; both default from ``memory_gb``.
    ``fetch(indices) -> (Bs, As)`` reads factors on demand instead (then ``Bs`` / ``As`` may be ``None``).
    """
    from geometry.device import default_device
    from geometry.distances import pair_metrics
    from geometry.gram import decompose_group, pair_batch, single_thread

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


# ---------------------------------------------------------------------------------------------
# Planning and writing
def plan(refs: Sequence[AdapterRef], kinds: Iterable[str] | None = None, settings: SurveySettings | None = None,
         layers: Iterable[int] | None = None) -> list[ModuleTask]:
    """One :class:`ModuleTask` per module common to all adapters (of ``kinds`` / ``layers`` when given).

    Raises when a common module has different shapes (different base models), naming both adapters.
    """
    settings = settings or SurveySettings()
    if len(refs) < 2:
        raise AtlasError(f"a survey needs at least 2 adapters, got {len(refs)}")
    common = set(refs[0].factors)
    for ref in refs[1:]:
        common &= set(ref.factors)
    if kinds is not None:
        kinds = list(kinds)
        have = {k.kind for k in common}
        missing = [k for k in kinds if k not in have]
        if missing:
            raise AtlasError(
                f"kind(s) {', '.join(missing)} not common to all adapters (common: {', '.join(sorted(have))})")
        common = {k for k in common if k.kind in set(kinds)}
    if layers is not None:
        wanted = {int(v) for v in layers}
        common = {k for k in common if k.layer in wanted}
    if not common:
        raise AtlasError("these adapters have no module in common")
    tasks = []
    for index, key in enumerate(ordered_keys(common)):
        shape = refs[0].shapes[key]
        for ref in refs[1:]:
            if ref.shapes[key] != shape:
                raise AtlasError(
                    f"adapter {ref.name!r} has module {key.label} of shape {ref.shapes[key][0]}x{ref.shapes[key][1]} "
                    f"but {refs[0].name!r} has {shape[0]}x{shape[1]}: they adapt different base models")
        tasks.append(ModuleTask(index, key, shape, tuple(ref.factors[key] for ref in refs), settings))
    return tasks


def _part_name(task: ModuleTask) -> str:
    safe = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in task.label)[:80]
    return f"part-{task.index:05d}-{safe}.parquet"


def module_table(task: ModuleTask, result: dict, names: Sequence[str]):
    """The Parquet rows of one finished module: one per pair ``i < j``, every metric column (NaN kept)."""
    import pyarrow as pa

    n = len(names)
    ii, jj = condensed_pairs(n)
    cat = pa.array(list(names), pa.string())
    cols = {
        "i": pa.array(ii.astype(np.int32)), "j": pa.array(jj.astype(np.int32)),
        "adapter_i": pa.DictionaryArray.from_arrays(pa.array(ii.astype(np.int32)), cat),
        "adapter_j": pa.DictionaryArray.from_arrays(pa.array(jj.astype(np.int32)), cat),
        "stack": pa.DictionaryArray.from_arrays(pa.array(np.zeros(len(ii), np.int32)), pa.array([task.key.stack])),
        "layer": pa.array(np.full(len(ii), task.key.layer, np.int32)),
        "kind": pa.DictionaryArray.from_arrays(pa.array(np.zeros(len(ii), np.int32)), pa.array([task.key.kind])),
        "module": pa.DictionaryArray.from_arrays(pa.array(np.zeros(len(ii), np.int32)), pa.array([task.label])),
    }
    for c in METRIC_COLUMNS:
        cols[c] = pa.array(np.asarray(result["values"][c], dtype=np.float64))  # NaN stays NaN (not null)
    return pa.table(cols)


def _write_atomic(table, path: Path, metadata: dict | None = None) -> None:
    import pyarrow.parquet as pq

    if metadata is not None:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), _METADATA_KEY: json.dumps(metadata)})
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def manifest(refs: Sequence[AdapterRef], settings: SurveySettings) -> dict:
    return {"format": FORMAT_VERSION, "adapters": [r.describe() for r in refs], "settings": settings.numeric(),
            "metrics": list(METRIC_COLUMNS)}


def _check_manifest(out: Path, wanted: dict) -> None:
    path = out / MANIFEST
    if not path.is_file():
        return
    try:
        have = json.loads(path.read_text())
    except ValueError as exc:
        raise AtlasError(f"{path}: unreadable survey manifest ({exc})") from exc
    ours = [(a["name"], a["fingerprint"]) for a in wanted["adapters"]]
    theirs = [(a.get("name"), a.get("fingerprint")) for a in have.get("adapters", [])]
    if ours != theirs or have.get("settings") != wanted["settings"]:
        what = "other settings" if ours == theirs else "other adapters (or changed files)"
        raise AtlasError(f"{out}: holds a survey of {what}; choose another --out or delete it to start again")


def finished_modules(out: str | os.PathLike) -> set[str]:
    """File names of the modules already written to the survey folder ``out``."""
    out = Path(out)
    return {p.name for p in out.glob("part-*.parquet")} if out.is_dir() else set()


def run_survey(
    sources, out: str | os.PathLike, *, kinds: Iterable[str] | None = None, layers: Iterable[int] | None = None,
    settings: SurveySettings | None = None, progress: Progress | None = None, names: Sequence[str] | None = None,
    runner: Callable | None = None,
) -> Survey:
    """Survey every common module of the adapters of ``sources`` into the Parquet folder ``out``.

    ``sources``: see :func:`adapter_locations`, or a list of :class:`AdapterRef` from :func:`scan`.
    Modules already in ``out`` are skipped (resume). ``runner(tasks, on_result)``: how tasks run
    (default: one after the other in this process; :func:`geometry.survey_dask.dask_runner` for a
    cluster); ``on_result`` writes each module as it finishes. ``progress(done, total, message)``
    counts modules (skipped ones included). Returns the :class:`Survey`.
    """
    settings = settings or SurveySettings()
    is_refs = isinstance(sources, Sequence) and not isinstance(sources, str) and sources and all(
        isinstance(s, AdapterRef) for s in sources)
    refs = list(sources) if is_refs else scan(sources, names)
    tasks = plan(refs, kinds, settings, layers)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise AtlasError(f"{out}: exists and is not a survey folder")
    meta = manifest(refs, settings)
    _check_manifest(out, meta)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).write_text(json.dumps(meta, indent=1))
    done = finished_modules(out)
    todo = [t for t in tasks if _part_name(t) not in done]
    names_list = [r.name for r in refs]
    total, count = len(tasks), len(tasks) - len(todo)
    if progress:
        progress(count, total, f"{count} module(s) already done" if count else "starting")
    by_index = {t.index: t for t in todo}

    def on_result(result: dict) -> None:
        nonlocal count
        task = by_index[result["index"]]
        _write_atomic(module_table(task, result, names_list), out / _part_name(task))
        count += 1
        if progress:
            progress(count, total, f"{task.label} ({result['seconds']:.1f} s)")

    (runner or local_runner)(todo, on_result)
    return open_survey(out)


def local_runner(tasks: Sequence[ModuleTask], on_result: Callable[[dict], None]) -> None:
    """Run the tasks one after the other in this process (memory: one task's, bounded by the settings)."""
    for task in tasks:
        on_result(compute_module(task))


def refs_from_adapters(adapters: Sequence[Any]) -> list[AdapterRef]:
    """:class:`AdapterRef` entries for already loaded adapters (``geometry.load``): for :func:`memory_runner`."""
    refs = []
    for ad in adapters:
        target = ad.config.target_modules
        ref = AdapterRef(
            name=ad.name, location=ad.source or f"memory:{ad.name}", weights=f"memory:{ad.name}",
            base=ad.config.base_model_name_or_path, r=int(ad.config.r), alpha=float(ad.config.lora_alpha),
            target_modules=sorted([target] if isinstance(target, str) else list(target or [])),
            fingerprint=(ad.content_hash or f"unhashed:{id(ad)}")[:32],
        )
        for key, mod in ad.modules.items():
            ref.factors[key] = FactorRef(ref.weights, "", "", mod.rows, mod.rank, float(mod.scale))
            ref.shapes[key] = mod.shape
        refs.append(ref)
    return refs


def memory_runner(adapters: Sequence[Any]) -> Callable[[Sequence[ModuleTask], Callable[[dict], None]], None]:
    """A ``runner`` computing each module from loaded adapters' tensors (the dashboard's session set)."""

    def run(tasks: Sequence[ModuleTask], on_result: Callable[[dict], None]) -> None:
        for task in tasks:
            t0 = time.perf_counter()
            mods = [ad.modules[task.key] for ad in adapters]
            s = task.settings
            values = module_distances(
                [m.B for m in mods], [m.A for m in mods], [float(m.scale) for m in mods], [m.rank for m in mods],
                pad=s.pad, gram_dtype=s.gram_dtype, device=s.device, block=s.block, pair_chunk=s.pair_chunk,
                memory_gb=s.memory_gb,
            )
            on_result({"index": task.index, "label": task.label, "values": values,
                       "seconds": time.perf_counter() - t0, "device": str(s.device or "auto")})

    return run


# ---------------------------------------------------------------------------------------------
# Reading results
@dataclass
class Survey:
    """A survey on disk (a folder of module files, or one Parquet file): adapters, modules, queries."""

    path: Path
    meta: dict

    @property
    def adapters(self) -> pd.DataFrame:
        """One row per adapter: ``name, base, r, alpha, target_modules, kinds, modules, location``."""
        frame = pd.DataFrame(self.meta["adapters"])
        return frame.drop(columns=["fingerprint"], errors="ignore")

    @property
    def names(self) -> list[str]:
        return [a["name"] for a in self.meta["adapters"]]

    def _dataset(self):
        import pyarrow.dataset as ds

        return ds.dataset(str(self.path), format="parquet")

    def table(self, columns: Sequence[str] | None = None, filter=None):
        """The rows (a ``pyarrow.Table``), optionally some columns and a ``pyarrow.dataset`` filter expression."""
        return self._dataset().to_table(columns=list(columns) if columns else None, filter=filter)

    def frame(self, columns: Sequence[str] | None = None, filter=None) -> pd.DataFrame:
        return self.table(columns, filter).to_pandas()

    def modules(self) -> pd.DataFrame:
        """The modules present: ``stack, layer, kind, module``."""
        t = self.table(["stack", "layer", "kind", "module"]).to_pandas()
        t = t.astype({"stack": str, "kind": str, "module": str})
        return t.drop_duplicates().reset_index(drop=True)

    def _module_filter(self, kinds: Iterable[str] | None, layers: Iterable[int] | None):
        import pyarrow.dataset as ds

        expr = None
        if kinds is not None:
            expr = ds.field("kind").isin(list(kinds))
        if layers is not None:
            e = ds.field("layer").isin([int(v) for v in layers])
            expr = e if expr is None else expr & e
        return expr

    def matrix(self, metric: str = "grassmann_ba", kinds: Iterable[str] | None = None,
               layers: Iterable[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(values, counts)``, each ``[N, N]``: the mean of ``metric`` over the chosen modules where defined.

        NaN entries are skipped (``counts``: how many modules each pair averaged); a pair undefined
        at every module stays NaN. Zero diagonal (counts = modules present).
        """
        _check_metric(metric)
        t = self.table(["i", "j", metric], self._module_filter(kinds, layers))
        n = len(self.names)
        i = t.column("i").to_numpy().astype(np.int64)
        j = t.column("j").to_numpy().astype(np.int64)
        v = t.column(metric).to_numpy(zero_copy_only=False).astype(np.float64)
        ok = np.isfinite(v)
        pos = i * n + j
        total = np.bincount(pos[ok], weights=v[ok], minlength=n * n).reshape(n, n)
        count = np.bincount(pos[ok], minlength=n * n).reshape(n, n)
        total, count = total + total.T, count + count.T
        with np.errstate(invalid="ignore", divide="ignore"):
            values = np.where(count > 0, total / np.maximum(count, 1), np.nan)
        np.fill_diagonal(values, 0.0)
        return values, count

    def neighbours(self, name: str, metric: str = "grassmann_ba", k: int = 10, kinds: Iterable[str] | None = None,
                   layers: Iterable[int] | None = None) -> pd.DataFrame:
        """The ``k`` adapters nearest to ``name`` by the mean of ``metric`` over the chosen modules.

        Columns ``rank, adapter, distance, modules`` (how many modules the mean averaged); adapters
        whose distance is undefined at every module come last with NaN (never as 0).
        """
        import pyarrow.compute as pc
        import pyarrow.dataset as ds

        _check_metric(metric)
        names = self.names
        if name not in names:
            close = [n for n in names if name.lower() in n.lower()][:5]
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise AtlasError(f"no adapter named {name!r} in this survey ({len(names)} adapters){hint}")
        me = names.index(name)
        expr = (ds.field("i") == me) | (ds.field("j") == me)
        extra = self._module_filter(kinds, layers)
        t = self.table(["i", "j", metric], expr if extra is None else expr & extra)
        i = t.column("i").to_numpy().astype(np.int64)
        j = t.column("j").to_numpy().astype(np.int64)
        other = np.where(i == me, j, i)
        v = pc.fill_null(t.column(metric), float("nan")).to_numpy().astype(np.float64)
        ok = np.isfinite(v)
        n = len(names)
        total = np.bincount(other[ok], weights=v[ok], minlength=n)
        count = np.bincount(other[ok], minlength=n)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(count > 0, total / np.maximum(count, 1), np.nan)
        frame = pd.DataFrame({"adapter": names, "distance": mean, "modules": count})
        frame = frame.drop(index=me).sort_values(["distance", "adapter"], na_position="last", kind="stable")
        frame = frame.head(int(k)).reset_index(drop=True)
        frame.insert(0, "rank", np.arange(1, len(frame) + 1))
        frame.attrs.update(adapter=name, metric=metric)
        return frame

    def save(self, path: str | os.PathLike) -> Path:
        """Write the whole survey as one Parquet file (the manifest in its schema metadata)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.table(), path, self.meta)
        return path

    def to_bytes(self) -> bytes:
        """The survey as one Parquet file, in memory (the page's download)."""
        import io

        import pyarrow.parquet as pq

        table = self.table()
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), _METADATA_KEY: json.dumps(self.meta)})
        buf = io.BytesIO()
        pq.write_table(table, buf)
        return buf.getvalue()


def _check_metric(metric: str) -> None:
    if metric not in METRIC_COLUMNS:
        raise AtlasError(f"unknown metric {metric!r}; expected one of {', '.join(METRIC_COLUMNS)}")


def open_survey(path: str | os.PathLike) -> Survey:
    """Open a survey folder written by :func:`run_survey`, or one Parquet file written by :meth:`Survey.save`."""
    import pyarrow.parquet as pq

    path = Path(path).expanduser()
    if path.is_dir():
        if not (path / MANIFEST).is_file():
            raise AtlasError(f"{path}: not a survey folder (no {MANIFEST})")
        meta = json.loads((path / MANIFEST).read_text())
        if not finished_modules(path):
            raise AtlasError(f"{path}: the survey has no finished module yet")
        return Survey(path, meta)
    if not path.is_file():
        raise AtlasError(f"{path}: no such file or folder")
    try:
        schema = pq.read_schema(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for non-Parquet bytes
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise AtlasError(f"{path}: not a Parquet file ({detail})") from exc
    raw = (schema.metadata or {}).get(_METADATA_KEY)
    if raw is None:
        raise AtlasError(f"{path}: a Parquet file without survey metadata (write it with Survey.save)")
    return Survey(path, json.loads(raw))


def survey_bytes_to_file(data: bytes, folder: str | os.PathLike) -> Path:
    """Write an uploaded survey file into ``folder`` and return its path (checked by :func:`open_survey`)."""
    digest = hashlib.sha256(data).hexdigest()[:16]
    path = Path(folder) / f"survey-{digest}.parquet"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    open_survey(path)
    return path


def factors_gb(refs: Sequence[AdapterRef]) -> float:
    """Size of every adapter's factors of the common modules as float32, in GB (for messages)."""
    total = 0
    for ref in refs:
        for key, f in ref.factors.items():
            m, n = ref.shapes[key]
            total += (m + n) * f.rank * 4
    return total / 1e9


__all__ = [
    "METRIC_COLUMNS", "AdapterRef", "FactorRef", "ModuleTask", "Survey", "SurveySettings", "compute_module",
    "index_adapter", "module_distances", "open_survey", "plan", "plan_blocks", "run_survey", "scan",
]
