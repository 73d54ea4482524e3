"""Indexing adapters for a survey from their ``adapter_config.json`` and safetensors header only, and reading
one module's factors lazily (local files through ``safe_open``, URLs by byte ranges through ``fsspec``)."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from geometry.errors import AtlasError
from geometry.io.config import PEFT_PREFIX, parse_config
from geometry.survey.format import Progress
from geometry.types import Adapter, ModuleKey, row_index

_ST_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


# ---------------------------------------------------------------------------------------------
# Indexing adapters from their headers
@dataclass(frozen=True)
class FactorRef:
    """Where one adapter's factors of one module are: enough for a worker to read them itself."""

    weights: str  #: path or URL of ``adapter_model.safetensors``
    a_key: str
    b_key: str
    rows: tuple | None  #: rows of ``B`` for a part of a fused projection (geometry.types.Rows)
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
    :func:`geometry.io.loader.fill_modules`, run on zero-stride placeholders of the header's shapes), so a
    survey sees exactly the modules ``geometry.load`` would. Only ``.safetensors`` weights are
    supported (a ``.bin`` pickle cannot be read lazily).
    """
    from geometry.io.loader import CONFIG_NAME, EMBED_RE, FACTOR_RE, MAGNITUDE_RE, fill_modules

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
    if ref.rows is not None and not isinstance(ref.rows[0], int):  # per-head row blocks (GPT-NeoX): read all of B
        B, A = read_factors(FactorRef(ref.weights, ref.a_key, ref.b_key, None, ref.rank, ref.scale), header_cache)
        return B[row_index(ref.rows)], A
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
