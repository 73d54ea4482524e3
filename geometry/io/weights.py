"""Reading weight files safely: content hashes, safetensors headers diagnosed before parsing, torch pickles
through ``weights_only`` after the same size checks as zips, and each tensor checked to be dense."""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import warnings
import zipfile
from typing import Any

import torch

from geometry.errors import AdapterLoadError
from geometry.io.limits import RATIO_MIN_BYTES
from geometry.io.limits import limits as current_limits
from geometry.io.zipsafe import _ZIP_ERRORS, _detail

# ---------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------


def content_hash(config: dict, weights: bytes) -> str:
    """sha256 hex of the canonical config JSON (sorted keys, compact) followed by the weights bytes."""
    h = hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode())
    h.update(b"\0")
    h.update(weights)
    return h.hexdigest()


#: Bytes per element of each safetensors dtype (to say which header entry is wrong).
_ST_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
                "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}
_ST_MAX_HEADER = 100_000_000  # safetensors' own limit


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _diagnose_safetensors(data: bytes) -> str | None:
    """What is wrong with a safetensors file the library refused, naming the tensor and field, or None."""
    if len(data) < 8:
        return f"the file is {len(data)} bytes, too short for a safetensors header (an 8-byte length, then JSON)"
    n = int.from_bytes(data[:8], "little")
    if n > _ST_MAX_HEADER:
        return (f"the header length field (first 8 bytes) says {n} bytes, more than safetensors' limit of "
                f"{_ST_MAX_HEADER} (not a safetensors file, or corrupted)")
    if n > len(data) - 8:
        return f"the header length field says {n} bytes but only {len(data) - 8} follow (a truncated file?)"
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        return f"the JSON header is invalid ({_detail(exc)})"
    if not isinstance(header, dict):
        return f"the JSON header is a {type(header).__name__}, expected an object of tensor entries"
    body = len(data) - 8 - n
    spans, unknown = [], None
    for key, info in header.items():
        if key == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                return "the header's __metadata__ must map strings to strings"
            continue
        if not isinstance(info, dict):
            return f"header entry of tensor {key} is a {type(info).__name__}, expected {{dtype, shape, data_offsets}}"
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str):
            return f"tensor {key} has dtype {dtype!r}, expected a safetensors dtype name such as 'F32'"
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            return f"tensor {key} has shape {shape!r}, expected a list of non-negative integers"
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
                and offsets[0] <= offsets[1]):
            return f"tensor {key} has data_offsets {offsets!r}, expected [begin, end] with 0 <= begin <= end"
        if dtype not in _ST_ITEMSIZE:
            unknown = unknown or f"tensor {key} has dtype {dtype!r}, not a safetensors dtype (F16, BF16, F32...)"
        else:
            need = math.prod(shape) * _ST_ITEMSIZE[dtype]
            if offsets[1] - offsets[0] != need:
                return (f"tensor {key} has shape {shape} of {dtype} ({need} bytes) but data_offsets {offsets} "
                        f"span {offsets[1] - offsets[0]} bytes")
        if offsets[1] > body:
            return f"tensor {key} has data_offsets {offsets} past the {body} bytes of data (a truncated file?)"
        spans.append((offsets[0], offsets[1], key))
    pos = 0
    for begin, end, key in sorted(spans):
        if begin != pos:
            return (f"tensor {key} has data_offsets starting at {begin}, expected {pos} (tensor data must follow "
                    "each other without gaps or overlaps)")
        pos = end
    if pos != body:
        return f"the tensors cover {pos} bytes of data but {body} follow the header (truncated or extra bytes)"
    return unknown  # last: this list may lack a dtype newer than this code


def _check_torch_archive(label: str, data: bytes) -> None:
    """Size / ratio checks on a torch zip-format ``.bin`` before ``torch.load`` inflates anything."""
    if not data.startswith(b"PK\x03\x04"):
        return
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            infos = zf.infolist()
    except _ZIP_ERRORS:
        return  # torch.load reports it
    lim = current_limits()
    total = 0
    for info in infos:
        total += info.file_size
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size > RATIO_MIN_BYTES and ratio > lim.max_ratio:
            raise AdapterLoadError(
                f"{label}: torch archive record {info.filename!r} would inflate {info.compress_size} bytes to "
                f"{info.file_size} ({ratio:.0f}:1), more than the {lim.max_ratio:g}:1 allowed (torch.save stores "
                "records uncompressed)")
    if total > lim.max_zip_bytes:
        raise AdapterLoadError(
            f"{label}: torch archive records total {total} bytes uncompressed, more than the limit of {lim.max_zip_bytes}")


def _pickle_error(label: str, exc: Exception) -> AdapterLoadError:
    """One sentence for a refused or broken ``.bin`` (torch's own message is a page long)."""
    text = str(exc)
    glob = re.search(r"GLOBAL ([\w.]+)", text)
    if glob:
        return AdapterLoadError(
            f"{label}: cannot read as torch pickle: it asks for {glob.group(1)}, which is not a tensor type "
            "(refused: torch.load(weights_only=True) loads tensors only and never runs code from the file)")
    parts = [p.strip() for p in text.split("\n\n") if p.strip()]
    useful = [p for p in parts if not p.startswith(("Weights only load failed", "Check the documentation"))]
    detail = " ".join((useful[0] if useful else (parts[0] if parts else type(exc).__name__)).split())
    detail = detail.split(". This is an internal miniz error")[0]
    if len(detail) > 200:
        detail = detail[:200] + "..."
    return AdapterLoadError(f"{label}: cannot read as torch pickle ({type(exc).__name__}: {detail})")


def _read_weights(label: str, data: bytes, is_bin: bool) -> dict[str, torch.Tensor]:
    if is_bin:
        _check_torch_archive(label, data)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # pickle protocol / TypedStorage notices
                state = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
        except Exception as exc:  # torch.load raises many types for a corrupt or unsafe file
            raise _pickle_error(label, exc) from exc
    else:
        from safetensors.torch import load as load_safetensors

        try:
            state = load_safetensors(data)
        except Exception as exc:  # SafetensorError (and whatever the Rust side raises): say which field
            diag = _diagnose_safetensors(data)
            raise AdapterLoadError(
                f"{label}: cannot read as safetensors: {diag}" if diag
                else f"{label}: cannot read as safetensors ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict):
        raise AdapterLoadError(
            f"{label}: holds a value of type {type(state).__name__}, expected a mapping of tensor names to tensors")
    for key, value in state.items():
        if not isinstance(key, str):
            raise AdapterLoadError(
                f"{label}: key {key!r} (of type {type(key).__name__}) is not a tensor name; expected strings")
        if not isinstance(value, torch.Tensor):
            raise AdapterLoadError(f"{label}: entry {key} holds a value of type {type(value).__name__}, expected a tensor")
        if value.layout != torch.strided:
            raise AdapterLoadError(f"{label}: tensor {key} is a {value.layout} tensor, expected a dense one")
    return state
