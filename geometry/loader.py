"""Load peft LoRA adapters from a folder, a ``.zip`` (path or bytes), a config + weights pair, or the hub.

Every source ends in :func:`build_adapter`, which reads ``adapter_config.json`` (see
:mod:`geometry.config`), the weights (``adapter_model.safetensors``, or ``adapter_model.bin``
through ``torch.load(..., weights_only=True)`` only), separates LoRA factors from other tensors,
validates shapes, ranks and finiteness, and keys every module with :mod:`geometry.naming`.

Formats read:

* ``<module>.lora_A.weight`` ``(r, n)`` and ``<module>.lora_B.weight`` ``(m, r)`` (optionally with an
  adapter name before ``.weight``); ``tau = s * B @ A``.
* DoRA ``<module>.lora_magnitude_vector``: attached as ``LoraModule.magnitude``; tau is the LoRA part.
* Embedding LoRA ``lora_embedding_A (r, vocab)`` / ``lora_embedding_B (dim, r)``: kind ``embed``,
  ``is_embedding=True``, tau ``= s * B @ A`` of shape ``(dim, vocab)``.
* Legacy peft <= 0.2 merged LoRA (``enable_lora`` in the config, ``B`` a grouped ``Conv1d`` weight
  ``(m_g * G, r, 1)`` with ``G = sum(enable_lora)`` groups, ``A`` ``(G * r, n)``): peft 0.2 computed
  ``zero_pad(conv1d(A x, B, groups=G)) * alpha / r``, i.e. group ``g`` uses rows ``g*r .. (g+1)*r`` of
  ``A`` and writes the ``g``-th enabled block of ``out / len(enable_lora)`` output rows. This is loaded
  exactly as one fused module with ``A`` (all ``G * r`` rows) and a block-structured ``B`` of
  ``(out, G * r)`` (zero outside the enabled row blocks), or, where the module splits into
  contiguous thirds (GPT-2 ``c_attn``), as one part per enabled third with its own ``A`` group.
* Fused ``q|k|v`` in contiguous thirds (GPT-2 ``c_attn``, Phi-3 ``self_attn.qkv_proj`` without
  grouped-query attention, see :mod:`geometry.naming`): one :class:`LoraModule` per third, ``B``
  rows sliced, ``A`` shared, ``rows`` set. A fused module that cannot be split (Phi-4 / GQA shapes)
  stays ``qkv`` and ``Adapter.warnings`` says why.
  BLOOM's ``query_key_value`` interleaves heads, so its enabled thirds are not q / v: it stays ``qkv``.

Everything else in the weights file (``classifier.*``, ``score.weight``, ``modules_to_save`` copies,
``lora_B.bias``) is kept in ``Adapter.other_tensors``.

Every input is untrusted (an upload to a shared page): whatever is wrong, the loader raises
:class:`~geometry.errors.AdapterLoadError` with one sentence naming the file, the member, tensor or
field, and what was expected; it never runs code from a file (``.bin`` pickles go through
``torch.load(weights_only=True)``, which refuses any global that is not a tensor type) and never
inflates more than the limits of :mod:`geometry.limits`:

* zips: the archive size (``max_upload_bytes``), the member count and the size of the zip directory
  are checked before it is parsed; members with absolute paths, ``..``, symbolic links, duplicate
  names, encryption or an unknown compression method are refused; the declared uncompressed total
  (``max_zip_bytes``) and every member's compression ratio (``max_ratio``, members over 1 MiB) are
  checked before anything is inflated, and reading stops at the budget in 1 MiB chunks whatever the
  headers claim (a header that lies about a size ends in a CRC error: "corrupted (bad CRC)").
  Zips inside the zip are never unpacked: they are ignored, and named in the error when the
  adapter seems to be inside one.
* ``.bin``: a torch zip archive gets the same size / ratio checks before ``torch.load``.
* weights: LoRA factors must be dense floating-point 2-D tensors with positive sizes and chained
  ranks; every floating tensor must be finite.
"""

from __future__ import annotations

import hashlib
import io
import json
import lzma
import math
import re
import stat
import struct
import warnings
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from huggingface_hub import HfApi, snapshot_download

from geometry.config import PEFT_PREFIX, parse_config, rank_and_alpha
from geometry.errors import AdapterLoadError
from geometry.limits import NORMAL, RATIO_MIN_BYTES, is_demo
from geometry.limits import limits as current_limits
from geometry.naming import fused_qkv_note, has_two_stacks, module_key
from geometry.types import Adapter, AdapterConfig, LoraModule, ModuleKey, lora_scale

CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
#: The normal zip limits (the defaults come from :func:`geometry.limits.limits` at each call).
MAX_ZIP_BYTES = NORMAL.max_zip_bytes
MAX_ZIP_MEMBERS = NORMAL.max_zip_members
#: Largest ``adapter_config.json`` read (real ones are a few KB; a huge MoE target list ~1 MB).
MAX_CONFIG_BYTES = 16 * 1024**2
#: Most rank_pattern / alpha_pattern regex matches (keys x modules) one adapter may cost.
MAX_PATTERN_MATCHES = 10_000_000
#: Floating dtypes accepted for LoRA factors and DoRA magnitudes.
FACTOR_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: Longest legacy ``enable_lora`` list (peft 0.2 used 3: q, k, v).
MAX_ENABLE_LORA = 8

FACTOR_RE = re.compile(r"^(?P<mod>.+)\.lora_(?P<ab>A|B)(?:\.(?P<ad>[^.]+))?\.weight$")
EMBED_RE = re.compile(r"^(?P<mod>.+)\.lora_embedding_(?P<ab>A|B)(?:\.(?P<ad>[^.]+))?$")
MAGNITUDE_RE = re.compile(r"^(?P<mod>.+)\.lora_magnitude_vector(?:\.(?P<ad>[^.]+))?(?:\.weight)?$")
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------


def load_adapter(
    source: Any,
    name: str | None = None,
    *,
    max_bytes: int | None = None,
    max_members: int | None = None,
    max_ratio: float | None = None,
    max_upload_bytes: int | None = None,
) -> Adapter:
    """Load one adapter from any supported source.

    ``source``: a folder path, a ``.zip`` path, zip ``bytes``, a ``{filename: bytes}`` dict
    (config + weights), ``"hub:<repo_id>"``, or a string that is not an existing path and looks
    like ``owner/name`` (downloaded with ``huggingface_hub.snapshot_download``). The limits
    (see :func:`load_zip_bytes`) default to :func:`geometry.limits.limits`; they apply to zips
    (bytes or a path) and to ``{filename: bytes}`` uploads, not to folders.
    """
    zip_limits = dict(max_bytes=max_bytes, max_members=max_members, max_ratio=max_ratio,
                      max_upload_bytes=max_upload_bytes)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return load_zip_bytes(bytes(source), name=name, **zip_limits)
    if isinstance(source, dict):
        return load_files(source, name=name, max_upload_bytes=max_upload_bytes)
    if not isinstance(source, (str, Path)):
        raise AdapterLoadError(f"cannot load an adapter from a {type(source).__name__}")
    text = str(source)
    if text.startswith("hub:"):
        return load_hub(text[4:], name=name)
    path = Path(text).expanduser()
    if path.is_dir():
        return load_folder(path, name=name)
    if path.is_file():
        if zipfile.is_zipfile(path):
            cap = current_limits().max_upload_bytes if max_upload_bytes is None else max_upload_bytes
            size = path.stat().st_size
            if size > cap:
                raise AdapterLoadError(f"{path}: zip archive is {size} bytes, more than the limit of {cap} bytes")
            return load_zip_bytes(_read_file(path), name=name or path.stem, source=str(path), **zip_limits)
        if path.name == CONFIG_NAME or path.name in WEIGHT_NAMES:
            return load_folder(path.parent, name=name)
        raise AdapterLoadError(f"{path}: not a folder, a .zip, {CONFIG_NAME} or one of {', '.join(WEIGHT_NAMES)}")
    if isinstance(source, str) and _HUB_ID_RE.match(text) and not Path(text.split("/")[0]).exists():
        try:
            return load_hub(text, name=name)
        except AdapterLoadError as exc:
            raise AdapterLoadError(f"{text}: no such file or folder, and as a hub id: {exc}") from exc
    raise AdapterLoadError(f"{text}: no such file or folder")


def _find_adapter_dir(root: Path) -> Path:
    if (root / CONFIG_NAME).is_file():
        return root
    found = sorted(str(p.relative_to(root).as_posix()) for p in root.rglob(CONFIG_NAME) if p.is_file())
    if not found:
        raise AdapterLoadError(f"{root}: no {CONFIG_NAME} in this folder or its subfolders")
    return root / PurePosixPath(_shallowest(found, str(root), "folder")[0]).parent


def _shallowest(configs: list[str], where: str, what: str) -> list[str]:
    """The one least nested config path (a training output with ``checkpoint-N/`` copies below it)."""
    depth = min(len(PurePosixPath(c).parts) for c in configs)
    top = [c for c in configs if len(PurePosixPath(c).parts) == depth]
    if len(top) > 1:
        raise AdapterLoadError(
            f"{where}: several {CONFIG_NAME} at the same level of this {what} ({', '.join(map(repr, top[:5]))}); "
            "give one adapter")
    return top


def load_folder(path: str | Path, name: str | None = None) -> Adapter:
    """Load the adapter in ``path`` (or in its single subfolder holding ``adapter_config.json``)."""
    root = Path(path)
    folder = _find_adapter_dir(root)
    cfg = folder / CONFIG_NAME
    if cfg.stat().st_size > MAX_CONFIG_BYTES:
        raise AdapterLoadError(
            f"{cfg}: {cfg.stat().st_size} bytes, more than the {MAX_CONFIG_BYTES} bytes a LoRA config can need")
    files = {CONFIG_NAME: _read_file(cfg)}
    for wname in WEIGHT_NAMES:
        if (folder / wname).is_file():
            files[wname] = _read_file(folder / wname)
            break
    else:
        raise AdapterLoadError(f"{folder}: no weights file ({' or '.join(WEIGHT_NAMES)})")
    return build_adapter(files, name=name or folder.resolve().name, source=str(folder))


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise AdapterLoadError(f"{path}: cannot read the file ({type(exc).__name__}: {exc.strerror or exc})") from exc


#: What zipfile raises for a damaged archive directory (ValueError includes a member name that is
#: not UTF-8; NotImplementedError a "zip version" from the future).
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, struct.error, OverflowError,
               IndexError, KeyError, NotImplementedError)
_COMPRESSION = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate", zipfile.ZIP_BZIP2: "bzip2",
                zipfile.ZIP_LZMA: "lzma"}


def _detail(exc: BaseException) -> str:
    """An exception's message on one short line (zipfile quotes raw header bytes in some)."""
    text = str(exc)
    if "File name in directory" in text:
        return "its local header names a different file"
    text = " ".join(text.split()) or type(exc).__name__
    return text if len(text) <= 150 else text[:150] + "..."


def _check_zip_member(info: zipfile.ZipInfo, where: str, max_ratio: float | None = None) -> None:
    member = info.filename
    if not member:
        raise AdapterLoadError(f"{where}: zip has a member with an empty name (a corrupted archive)")
    posix = PurePosixPath(member.replace("\\", "/"))
    if member.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", member) or posix.is_absolute():
        raise AdapterLoadError(f"{where}: unsafe zip member {member!r} (absolute path)")
    if ".." in posix.parts:
        raise AdapterLoadError(f"{where}: unsafe zip member {member!r} (contains '..')")
    if stat.S_ISLNK(info.external_attr >> 16):
        raise AdapterLoadError(f"{where}: unsafe zip member {member!r} (symbolic link)")
    if info.flag_bits & 0x1:
        raise AdapterLoadError(f"{where}: zip member {member!r} is encrypted; give an archive without a password")
    if info.compress_type not in _COMPRESSION:
        raise AdapterLoadError(
            f"{where}: zip member {member!r} uses compression method {info.compress_type}; only stored, "
            "deflate, bzip2 and lzma are read")
    if max_ratio is not None and info.file_size > RATIO_MIN_BYTES:
        ratio = info.file_size / max(info.compress_size, 1)
        if ratio > max_ratio:
            raise AdapterLoadError(
                f"{where}: zip member {member!r} would inflate {info.compress_size} bytes to {info.file_size} "
                f"({ratio:.0f}:1), more than the {max_ratio:g}:1 allowed (a zip bomb?)")


def _zip_directory(data: bytes, where: str, max_members: int) -> None:
    """Refuse, before :class:`zipfile.ZipFile` parses it, a zip directory too big for ``max_members``.

    ``ZipFile`` reads the whole central directory into objects up front: millions of entries in
    one upload would cost minutes and gigabytes before any member count could be checked.
    """
    try:
        end = zipfile._EndRecData(io.BytesIO(data))  # the end-of-central-directory record (zip64 aware)
    except _ZIP_ERRORS:
        return  # unreadable: ZipFile says so below
    if not end:
        return
    entries, size = end[zipfile._ECD_ENTRIES_TOTAL], end[zipfile._ECD_SIZE]
    if entries > max_members:
        raise AdapterLoadError(f"{where}: zip has {entries} members, more than the limit of {max_members}")
    cap = max(1024**2, 1024 * max_members)
    if size > cap:
        raise AdapterLoadError(
            f"{where}: zip directory is {size} bytes, more than the {cap} bytes that {max_members} members can need")


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, budget: int, where: str) -> bytes:
    """Read one member in 1 MiB chunks, never more than ``budget`` bytes whatever its header claims."""
    name = info.filename
    if info.file_size > budget:
        raise AdapterLoadError(
            f"{where}: zip member {name!r} ({info.file_size} bytes uncompressed) exceeds the size limit of "
            f"{budget} bytes left")
    out = io.BytesIO()
    try:
        with zf.open(info) as fh:
            while chunk := fh.read(1 << 20):
                out.write(chunk)
                if out.tell() > budget:
                    raise AdapterLoadError(f"{where}: zip member {name!r} exceeds the size limit of {budget} bytes")
    except zipfile.BadZipFile as exc:
        if "CRC" in str(exc):
            raise AdapterLoadError(f"{where}: zip member {name!r} is corrupted (bad CRC)") from exc
        raise AdapterLoadError(f"{where}: zip member {name!r} is corrupted ({_detail(exc)})") from exc
    except (zlib.error, lzma.LZMAError, OSError) as exc:  # bz2 raises OSError for bad data
        raise AdapterLoadError(
            f"{where}: zip member {name!r} is corrupted (invalid compressed data: {_detail(exc)})") from exc
    except EOFError as exc:
        raise AdapterLoadError(f"{where}: zip member {name!r} is corrupted (its compressed data ends early)") from exc
    except (ValueError, struct.error) as exc:  # e.g. a header offset outside the archive: negative seek value
        raise AdapterLoadError(f"{where}: zip member {name!r} is corrupted ({_detail(exc)})") from exc
    except (NotImplementedError, RuntimeError) as exc:  # compression method, encryption
        raise AdapterLoadError(f"{where}: zip member {name!r} cannot be read ({_detail(exc)})") from exc
    return out.getvalue()


def load_zip_bytes(
    data: bytes,
    name: str | None = None,
    *,
    source: str = "<zip>",
    max_bytes: int | None = None,
    max_members: int | None = None,
    max_ratio: float | None = None,
    max_upload_bytes: int | None = None,
) -> Adapter:
    """Load the adapter in a zip archive given as bytes (an upload or a file's content).

    The adapter folder is the one directory of the archive holding ``adapter_config.json`` (top
    level or a subfolder). Refused: archives over ``max_upload_bytes``, with more than
    ``max_members`` members or more than ``max_bytes`` uncompressed bytes in all, members with
    absolute paths, ``..``, symbolic links, duplicate names or encryption, and members over 1 MiB
    whose compression ratio exceeds ``max_ratio`` (checked before anything is inflated). Zips inside
    the archive are ignored, never unpacked. Each limit left ``None`` comes from
    :func:`geometry.limits.limits` (``ADAPTER_ATLAS_DEMO`` selects the demo ones).
    """
    lim = current_limits()
    max_bytes = lim.max_zip_bytes if max_bytes is None else max_bytes
    max_members = lim.max_zip_members if max_members is None else max_members
    max_ratio = lim.max_ratio if max_ratio is None else max_ratio
    max_upload_bytes = lim.max_upload_bytes if max_upload_bytes is None else max_upload_bytes
    if len(data) > max_upload_bytes:
        raise AdapterLoadError(f"{source}: zip archive is {len(data)} bytes, more than the limit of {max_upload_bytes}")
    _zip_directory(data, source, max_members)
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except _ZIP_ERRORS as exc:
        raise AdapterLoadError(f"{source}: not a readable zip archive ({_detail(exc)})") from exc
    with zf:
        infos = zf.infolist()
        if len(infos) > max_members:
            raise AdapterLoadError(f"{source}: zip has {len(infos)} members, more than the limit of {max_members}")
        total = 0
        seen: set[str] = set()
        for info in infos:
            _check_zip_member(info, source, max_ratio)
            norm = str(PurePosixPath(info.filename.replace("\\", "/")))
            if norm in seen and not info.is_dir():
                raise AdapterLoadError(f"{source}: zip has two members named {info.filename!r}; which one is meant?")
            seen.add(norm)
            total += info.file_size
        if total > max_bytes:
            raise AdapterLoadError(f"{source}: zip uncompressed size {total} bytes exceeds the limit of {max_bytes}")
        files = {
            i.filename: i for i in infos if not i.is_dir() and not i.filename.startswith("__MACOSX/")
        }
        configs = sorted(f for f in files if PurePosixPath(f).name == CONFIG_NAME)
        if not configs:
            inner = sorted(f for f in files if f.lower().endswith(".zip"))
            if inner:
                raise AdapterLoadError(
                    f"{source}: no {CONFIG_NAME} in the zip archive, only another zip ({inner[0]!r}), and zips "
                    "inside a zip are not unpacked; upload that inner zip itself")
            raise AdapterLoadError(f"{source}: no {CONFIG_NAME} in the zip archive")
        configs = _shallowest(configs, source, "zip")
        folder = PurePosixPath(configs[0]).parent
        wanted = {CONFIG_NAME: configs[0]}
        for wname in WEIGHT_NAMES:
            member = str(folder / wname) if str(folder) != "." else wname
            if member in files:
                wanted[wname] = member
                break
        else:
            raise AdapterLoadError(f"{source}: no {' or '.join(WEIGHT_NAMES)} next to {configs[0]!r} in the zip")
        budget = max_bytes
        contents = {}
        for short, member in wanted.items():
            cap = min(budget, MAX_CONFIG_BYTES) if short == CONFIG_NAME else budget
            contents[short] = _read_member(zf, files[member], cap, source)
            budget -= len(contents[short])
    default = folder.name if str(folder) != "." else (Path(source).stem if source != "<zip>" else "adapter")
    return build_adapter(contents, name=name or default, source=source)


def load_files(files: dict[str, bytes], name: str | None = None, *, max_upload_bytes: int | None = None) -> Adapter:
    """Load from a ``{filename: bytes}`` pair: a ``*.json`` config and a ``.safetensors`` / ``.bin`` weights file.

    Each file may have at most ``max_upload_bytes`` (default :func:`geometry.limits.limits`).
    """
    cap = current_limits().max_upload_bytes if max_upload_bytes is None else max_upload_bytes
    for key, data in files.items():
        if not isinstance(key, str) or not isinstance(data, (bytes, bytearray, memoryview)):
            raise AdapterLoadError(f"{key!r}: expected file names mapped to their bytes, got a {type(data).__name__}")
        if len(data) > cap:
            raise AdapterLoadError(f"{key}: {len(data)} bytes, more than the upload limit of {cap} bytes")
    configs = [k for k in files if k.lower().endswith(".json")]
    weights = [k for k in files if k.lower().endswith((".safetensors", ".bin"))]
    if len(configs) != 1 or len(weights) != 1:
        raise AdapterLoadError(
            f"expected one config (.json) and one weights file (.safetensors or .bin), got {sorted(files)}"
        )
    wkey = weights[0]
    wname = WEIGHT_NAMES[0] if wkey.lower().endswith(".safetensors") else WEIGHT_NAMES[1]
    contents = {CONFIG_NAME: bytes(files[configs[0]]), wname: bytes(files[wkey])}
    return build_adapter(contents, name=name or "adapter", source=f"{configs[0]} + {wkey}", file_labels={
        CONFIG_NAME: configs[0], wname: wkey})


HUB_PATTERNS = ["*adapter_config.json", "*adapter_model.safetensors", "*adapter_model.bin"]


def _hub_size(repo_id: str, revision: str | None) -> int:
    """Total bytes of the adapter files of ``repo_id`` (``HfApi.model_info`` with file sizes), before download."""
    import fnmatch

    info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
    sizes = [f.size for f in info.siblings or [] if any(fnmatch.fnmatch(f.rfilename, p) for p in HUB_PATTERNS)]
    if any(size is None for size in sizes):
        raise AdapterLoadError(f"hub:{repo_id}: the hub does not say how large its adapter files are, so this "
                               "server cannot check them against its limit before downloading")
    return sum(sizes)


def load_hub(repo_id: str, revision: str | None = None, name: str | None = None,
             max_bytes: int | None = None) -> Adapter:
    """Download the adapter files of ``repo_id`` with ``huggingface_hub.snapshot_download`` and load them.

    ``max_bytes``: refuse, before downloading anything, a repository whose adapter files are larger (their
    sizes come from the hub's file metadata). Default: the upload limit in demo mode
    (:mod:`geometry.limits`), no cap otherwise.
    """
    if max_bytes is None and is_demo():
        max_bytes = current_limits().max_upload_bytes
    try:
        total = _hub_size(repo_id, revision) if max_bytes is not None else None
        if total is not None and total > max_bytes:
            raise AdapterLoadError(f"hub:{repo_id}: its adapter files are {total} bytes, more than this server's "
                                   f"limit of {max_bytes} bytes; nothing was downloaded")
        folder = snapshot_download(repo_id=repo_id, revision=revision, allow_patterns=HUB_PATTERNS)
    except AdapterLoadError:
        raise
    except Exception as exc:  # network, auth, missing repo: one sentence for the user
        raise AdapterLoadError(f"hub:{repo_id}: download failed ({type(exc).__name__}: {exc})") from exc
    adapter = load_folder(folder, name=name or repo_id)
    adapter.source = f"hub:{repo_id}" + (f"@{revision}" if revision else "")
    return adapter


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


def build_adapter(
    files: dict[str, bytes],
    name: str,
    source: str = "",
    file_labels: dict[str, str] | None = None,
) -> Adapter:
    """Build an :class:`Adapter` from ``{"adapter_config.json": bytes, "adapter_model.<ext>": bytes}``."""
    labels = {k: (file_labels or {}).get(k) or (f"{source}/{k}" if source else k) for k in files}
    where = source or "adapter"
    if CONFIG_NAME not in files:
        raise AdapterLoadError(f"{where}: no {CONFIG_NAME}")
    wname = next((k for k in WEIGHT_NAMES if k in files), None)
    if wname is None:
        raise AdapterLoadError(f"{where}: no weights file ({' or '.join(WEIGHT_NAMES)})")
    cfg_label = labels[CONFIG_NAME]
    if len(files[CONFIG_NAME]) > MAX_CONFIG_BYTES:
        raise AdapterLoadError(
            f"{cfg_label}: {len(files[CONFIG_NAME])} bytes, more than the {MAX_CONFIG_BYTES} bytes a LoRA config can need")
    try:
        raw = json.loads(bytes(files[CONFIG_NAME]).decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise AdapterLoadError(f"{cfg_label}: invalid JSON (not UTF-8 text: {exc.reason} at byte {exc.start})") from exc
    except RecursionError as exc:
        raise AdapterLoadError(f"{cfg_label}: invalid JSON (nested too deeply)") from exc
    except ValueError as exc:  # JSONDecodeError, or an integer of more than 4300 digits
        raise AdapterLoadError(f"{cfg_label}: invalid JSON ({exc})") from exc
    config = parse_config(raw, source=cfg_label)
    weights = bytes(files[wname])
    state = _read_weights(labels[wname], weights, is_bin=wname.endswith(".bin"))
    try:
        digest = content_hash(raw, weights)
    except (ValueError, RecursionError) as exc:
        raise AdapterLoadError(f"{cfg_label}: the config cannot be hashed ({exc})") from exc
    adapter = Adapter(name=name, config=config, modules={}, source=source, content_hash=digest)
    fill_modules(adapter, state, labels[wname], cfg_label)
    return adapter


def _check_finite(label: str, key: str, t: torch.Tensor) -> None:
    if t.is_quantized or not (t.is_floating_point() or t.is_complex()):
        return
    if t.dtype not in FACTOR_DTYPES and not t.is_complex():
        t = t.to(torch.float32)  # float8 and other small floats: isfinite is not implemented for them
    if not bool(torch.isfinite(t).all()):
        raise AdapterLoadError(f"{label}: tensor {key} contains NaN or Inf values")


def _check_factor(label: str, key: str, t: torch.Tensor, expected: str) -> None:
    """A LoRA factor (or DoRA magnitude): floating point, ``expected`` names its axes."""
    if t.dtype not in FACTOR_DTYPES:
        raise AdapterLoadError(
            f"{label}: tensor {key} has dtype {t.dtype}, expected a floating-point {expected} "
            "(float16, bfloat16, float32 or float64)")
    if t.numel() == 0:
        raise AdapterLoadError(
            f"{label}: tensor {key} has shape {tuple(t.shape)}, an empty factor; expected {expected} with every "
            "size >= 1 (rank 0?)")


def fill_modules(adapter: Adapter, state: dict[str, torch.Tensor], label: str, cfg_label: str = CONFIG_NAME) -> None:
    """Sort ``state`` into LoRA modules and other tensors; validate; key every module."""
    config = adapter.config
    factors: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    embed: set[str] = set()
    magnitudes: dict[str, tuple[str, torch.Tensor]] = {}
    adapter_names: set[str] = set()
    for key, tensor in state.items():
        _check_finite(label, key, tensor)
        short = key.removeprefix(PEFT_PREFIX)
        m = FACTOR_RE.match(short) or EMBED_RE.match(short)
        if m:
            mod = m.group("mod")
            slot = factors.setdefault(mod, {})
            if m.group("ab") in slot:
                raise AdapterLoadError(f"{label}: module {mod} has two lora_{m.group('ab')} tensors ({slot[m.group('ab')][0]}, {key})")
            slot[m.group("ab")] = (key, tensor)
            if "lora_embedding_" in short:
                embed.add(mod)
            if m.group("ad"):
                adapter_names.add(m.group("ad"))
            continue
        m = MAGNITUDE_RE.match(short)
        if m:
            magnitudes[m.group("mod")] = (key, tensor)
            continue
        if short.endswith(".lora_B.bias"):
            adapter.warnings.append(f"{key}: LoRA bias (lora_bias=True) kept in other_tensors; tau covers the weight only")
        adapter.other_tensors[key] = tensor
    if len(adapter_names) > 1:
        raise AdapterLoadError(f"{label}: tensors of several adapters ({', '.join(sorted(adapter_names))}); save one adapter per file")
    if not factors:
        raise AdapterLoadError(f"{label}: no LoRA tensors (*.lora_A.weight / *.lora_B.weight) in the weights file")

    n_keys = len(config.rank_pattern) + len(config.alpha_pattern)
    if n_keys * len(factors) > MAX_PATTERN_MATCHES:
        raise AdapterLoadError(
            f"{cfg_label}: rank_pattern / alpha_pattern have {n_keys} keys for {len(factors)} modules, more than "
            f"{MAX_PATTERN_MATCHES} regex matches to run; give fewer keys")
    two_stacks = has_two_stacks(list(factors), config.task_type)
    entries: list[tuple[str, ModuleKey, LoraModule]] = []
    fused_notes: list[str] = []
    for mod in sorted(factors):
        slot = factors[mod]
        for ab, other in (("A", "B"), ("B", "A")):
            if ab not in slot:
                present = slot[other][0]
                raise AdapterLoadError(f"{label}: module {mod} has {present} but no lora_{ab} tensor")
        (a_key, A), (b_key, B) = slot["A"], slot["B"]
        _check_factor(label, a_key, A, "lora_A (r, in_features)")
        _check_factor(label, b_key, B, "lora_B (out_features, r)")
        r, alpha = rank_and_alpha(config, mod, source=cfg_label)
        scale = lora_scale(r, alpha, config.use_rslora)
        legacy = config.raw.get("enable_lora")
        if B.dim() == 3 and isinstance(legacy, list) and any(legacy):
            if not any("legacy peft" in w for w in adapter.warnings):
                adapter.warnings.append(
                    f"legacy peft<=0.2 merged-LoRA format (enable_lora={legacy}): grouped Conv1d B converted exactly "
                    "to (B, A) factors; a fused module keeps rank sum(enable_lora) * r")
            entries.extend(_legacy_parts(label, mod, a_key, A, b_key, B, config, legacy, r, alpha, scale, two_stacks))
            continue
        _validate_pair(label, mod, a_key, A, b_key, B, r, r_given=config.raw.get("r") is not None or r != config.r)
        is_emb = mod in embed
        parts = (
            [(ModuleKey(_embedding_stack(mod, two_stacks), -1, "embed"), None)]
            if is_emb
            else module_key(mod, out_features=B.shape[0], in_features=A.shape[1], two_stacks=two_stacks,
                            base_model=config.base_model_name_or_path)
        )
        if len(parts) == 1 and parts[0][0].kind == "qkv":
            note = fused_qkv_note(mod, out_features=B.shape[0], in_features=A.shape[1],
                                  base_model=config.base_model_name_or_path)
            if note:
                fused_notes.append(note)
        magnitude = None
        if mod in magnitudes:
            mkey, magnitude = magnitudes.pop(mod)
            _check_factor(label, mkey, magnitude, f"DoRA magnitude ({B.shape[0]},)")
            if magnitude.dim() != 1 or magnitude.shape[0] != B.shape[0]:
                raise AdapterLoadError(
                    f"{label}: tensor {mkey} has shape {tuple(magnitude.shape)}, expected ({B.shape[0]},) (one per output row)")
        for key, rows in parts:
            b_part = B if rows is None else B[rows[0] : rows[1]]
            mag_part = magnitude if magnitude is None or rows is None else magnitude[rows[0] : rows[1]]
            entries.append((mod, key, LoraModule(
                name=mod, key=key, A=A, B=b_part, r=r, alpha=alpha, scale=scale,
                fan_in_fan_out=config.fan_in_fan_out, magnitude=mag_part, is_embedding=is_emb, rows=rows,
            )))
    for mod, (mkey, _) in magnitudes.items():
        raise AdapterLoadError(f"{label}: tensor {mkey} (DoRA magnitude) has no lora_A / lora_B for module {mod}")
    if fused_notes:
        more = f" (and {len(fused_notes) - 1} more such module(s))" if len(fused_notes) > 1 else ""
        adapter.warnings.append(fused_notes[0] + more)
    _place(adapter, entries)


def _embedding_stack(mod: str, two_stacks: bool) -> str:
    segs = mod.split(".")
    if two_stacks:
        for seg in ("encoder", "decoder"):
            if seg in segs:
                return seg
    return "model"


def _validate_pair(
    label: str, mod: str, a_key: str, A: torch.Tensor, b_key: str, B: torch.Tensor, r: int, r_given: bool = True,
) -> None:
    if A.dim() != 2:
        raise AdapterLoadError(f"{label}: tensor {a_key} has shape {tuple(A.shape)}, expected 2-D (r, in_features)")
    if B.dim() != 2:
        raise AdapterLoadError(f"{label}: tensor {b_key} has shape {tuple(B.shape)}, expected 2-D (out_features, r)")
    if A.shape[0] != B.shape[1]:
        raise AdapterLoadError(
            f"{label}: module {mod}: {a_key} has rank {A.shape[0]} (shape {tuple(A.shape)}) but {b_key} has rank "
            f"{B.shape[1]} (shape {tuple(B.shape)}); expected A (r, in) and B (out, r) with the same r")
    if A.shape[0] != r:
        if not r_given:
            raise AdapterLoadError(
                f"{label}: tensor {a_key} has rank {A.shape[0]} but adapter_config.json has no 'r' field, so peft's "
                f"default r={r} applies to module {mod}; add \"r\": {A.shape[0]} to the config")
        raise AdapterLoadError(
            f"{label}: tensor {a_key} has rank {A.shape[0]} but adapter_config.json gives r={r} for module {mod} "
            "(r / rank_pattern)")


def _legacy_parts(label, mod, a_key, A, b_key, B, config: AdapterConfig, enable: list, r, alpha, scale, two_stacks):
    """peft <= 0.2 merged LoRA: grouped Conv1d ``B`` -> exact (B, A) parts (see the module docstring)."""
    if len(enable) > MAX_ENABLE_LORA:
        raise AdapterLoadError(
            f"{label}: legacy peft<=0.2 merged-LoRA format: enable_lora in adapter_config.json has {len(enable)} "
            f"entries, expected at most {MAX_ENABLE_LORA} true / false values (one per fused projection)")
    if not all(isinstance(e, bool) for e in enable):
        raise AdapterLoadError(
            f"{label}: legacy peft<=0.2 merged-LoRA format: enable_lora={enable!r} in adapter_config.json, "
            "expected true / false values (one per fused projection)")
    groups = sum(bool(e) for e in enable)
    if A.dim() != 2 or A.shape[0] != groups * r:
        raise AdapterLoadError(
            f"{label}: legacy peft<=0.2 merged-LoRA format (enable_lora={enable}): tensor {a_key} has shape "
            f"{tuple(A.shape)}, expected ({groups * r}, in_features) = (sum(enable_lora) * r, in)")
    if B.shape[1] != r or B.shape[2] != 1 or B.shape[0] % groups:
        raise AdapterLoadError(
            f"{label}: legacy peft<=0.2 merged-LoRA format (enable_lora={enable}): tensor {b_key} has shape "
            f"{tuple(B.shape)}, expected (G * out_block, {r}, 1) with G = {groups}")
    block = B.shape[0] // groups
    out = block * len(enable)
    enabled = [i for i, e in enumerate(enable) if e]
    # group g: A rows g*r..(g+1)*r, B rows g*block..(g+1)*block, written to output block enabled[g]
    grp = [(A[g * r : (g + 1) * r], B[g * block : (g + 1) * block, :, 0], enabled[g]) for g in range(groups)]
    parts = module_key(mod, out_features=out, in_features=A.shape[1], two_stacks=two_stacks,
                       base_model=config.base_model_name_or_path)
    thirds = len(enable) == 3 and len(parts) == 3 and all(p[1] is not None for p in parts)
    common = dict(name=mod, alpha=alpha, scale=scale, fan_in_fan_out=config.fan_in_fan_out)
    if thirds:
        return [(mod, parts[blk][0], LoraModule(key=parts[blk][0], A=a_g, B=b_g, r=r, rows=parts[blk][1], **common))
                for a_g, b_g, blk in grp]
    key = parts[0][0] if len(parts) == 1 else ModuleKey(parts[0][0].stack, parts[0][0].layer, "qkv")
    b_full = B.new_zeros((out, groups * r))
    for g, (_, b_g, blk) in enumerate(grp):
        b_full[blk * block : (blk + 1) * block, g * r : (g + 1) * r] = b_g
    return [(mod, key, LoraModule(key=key, A=A, B=b_full, r=r, **common))]


def _place(adapter: Adapter, entries: list[tuple[str, ModuleKey, LoraModule]]) -> None:
    """Put modules under their keys. Unmapped names, and names whose keys collide (MoE experts,
    two embeddings...), go under ``ModuleKey("raw", -1, name)`` (a split part: ``name[start:stop]``)."""
    owners: dict[ModuleKey, set[str]] = {}
    for mod, key, _ in entries:
        owners.setdefault(key, set()).add(mod)
    clashing = sorted({mod for key, mods in owners.items() if len(mods) > 1 for mod in mods})
    if clashing:
        adapter.warnings.append(
            f"{len(clashing)} module(s) share a canonical key with another module and are kept under their raw "
            f"names: {', '.join(clashing[:5])}")
    for mod, key, lm in entries:
        if mod in clashing or key.stack == "raw":
            raw_name = mod if lm.rows is None else f"{mod}[{lm.rows[0]}:{lm.rows[1]}]"
            key = ModuleKey("raw", -1, raw_name)
            lm.key = key
            if mod not in adapter.unmapped:
                adapter.unmapped.append(mod)
        adapter.modules[key] = lm
    if adapter.unmapped:
        adapter.warnings.append(
            f"{len(adapter.unmapped)} module(s) kept under their raw names (no canonical stack/layer/kind): "
            f"{', '.join(adapter.unmapped[:5])}")
