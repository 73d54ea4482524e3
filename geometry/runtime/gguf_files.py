"""GGUF base files: the header read cheaply (no tensor data), load errors as one :class:`AtlasError`.

transformers loads a GGUF file with ``from_pretrained(folder, gguf_file=name)`` and de-quantizes every
tensor to float32 (through the ``gguf`` package's ``GGUFReader``, which also parses the whole vocabulary:
about 5 s for SmolLM2-135M). :func:`read_header` reads only what the runtime needs before that (the
architecture, each tensor's type and extent) with ``struct`` on a memory map, in milliseconds, and checks
that the file is a GGUF file and holds all its tensor data, so that a corrupt or truncated file is one
sentence naming the file instead of a ``struct.error`` from deep inside transformers.
:func:`quantization_note` says what the de-quantization did (the dashboard and the CLI show it).
"""

from __future__ import annotations

import contextlib
import functools
import mmap
import os
import re
import struct
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from geometry.errors import AtlasError

GGUF_MAGIC = b"GGUF"
#: byte sizes of the scalar value types of GGUF metadata (gguf.GGUFValueType); 8 = string, 9 = array
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
#: tensor types stored as plain floats: converted, not de-quantized
_FLOAT_TYPES = {"F32", "F16", "BF16", "F64"}


@dataclass(frozen=True)
class GGUFHeader:
    """What :func:`read_header` reads: ``tensor_types`` counts tensors per type name (``Q4_1``, ``F32``...)."""

    path: str
    version: int
    architecture: str | None
    name: str | None
    tensor_types: dict[str, int]
    n_tensors: int

    @property
    def main_type(self) -> str | None:
        """The most frequent tensor type other than float32 (``None`` when every tensor is float32)."""
        counts = Counter({k: v for k, v in self.tensor_types.items() if k != "F32"})
        return counts.most_common(1)[0][0] if counts else None

    @property
    def quantized(self) -> bool:
        """Whether some tensor is stored quantized (not as a plain float)."""
        return any(k not in _FLOAT_TYPES for k in self.tensor_types)


def _bits(type_name: str) -> int | None:
    """Nominal bits per weight from a ggml type name: ``Q4_1`` 4, ``IQ2_XXS`` 2, ``Q8_0`` 8, ``MXFP4`` 4."""
    m = re.match(r"^(?:I|T)?Q(\d)", type_name) or re.search(r"FP(\d+)$", type_name)
    return int(m.group(1)) if m else None


def _gguf_types() -> tuple[dict[int, str], dict[int, tuple[int, int]]]:
    """``{type id: name}`` and ``{type id: (block size, bytes per block)}`` from the ``gguf`` package."""
    try:
        import gguf
    except ImportError:
        raise AtlasError("loading a base from a GGUF file needs the package gguf (pip install gguf==0.19.0)") from None
    names = {int(t): t.name for t in gguf.GGMLQuantizationType}
    sizes = {int(t): (int(b), int(s)) for t, (b, s) in gguf.GGML_QUANT_SIZES.items()}
    return names, sizes


class _Truncated(Exception):
    pass


class _Cursor:
    def __init__(self, buf: mmap.mmap | bytes, endian: str):
        self.buf, self.pos, self.endian = buf, 0, endian

    def take(self, fmt: str) -> tuple:
        size = struct.calcsize(self.endian + fmt)
        if self.pos + size > len(self.buf):
            raise _Truncated(f"needs {self.pos + size} bytes of header")
        value = struct.unpack_from(self.endian + fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        (n,) = self.take("Q")
        if self.pos + n > len(self.buf):
            raise _Truncated(f"a string of {n} bytes at offset {self.pos} runs past the end")
        text = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return text

    def skip_value(self, vtype: int) -> None:
        if vtype == 8:
            (n,) = self.take("Q")
            self.pos += n
        elif vtype == 9:
            (item, count) = self.take("IQ")
            if item in _SCALAR:
                self.pos += count * struct.calcsize(_SCALAR[item])
            else:
                for _ in range(count):
                    self.skip_value(item)
        elif vtype in _SCALAR:
            self.pos += struct.calcsize(_SCALAR[vtype])
        else:
            raise ValueError(f"unknown metadata value type {vtype} at offset {self.pos}")
        if self.pos > len(self.buf):
            raise _Truncated("a metadata value runs past the end")


@contextlib.contextmanager
def _mapped(path: str) -> Iterator[mmap.mmap | bytes]:
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            yield b""
            return
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            yield buf


def read_header(path: str | os.PathLike[str]) -> GGUFHeader:
    """The header of the GGUF file at ``path`` (architecture, tensor types), checked: the magic bytes,
    the metadata and tensor table parse, and the file holds every tensor's data. Raises one
    :class:`AtlasError` naming the file otherwise. Cached per (path, size, modification time)."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError as exc:
        raise AtlasError(f"no GGUF file at {p} ({exc.strerror or exc})") from None
    if not p.is_file():
        raise AtlasError(f"{p} is not a file (a GGUF base is one .gguf file)")
    return _read_header(str(p.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _read_header(path: str, size: int, mtime_ns: int) -> GGUFHeader:
    names, sizes = _gguf_types()
    bad = f"the GGUF file {path} ({size} bytes) is corrupt or truncated"
    try:
        with _mapped(path) as buf:
            if bytes(buf[:4]) != GGUF_MAGIC:
                found = bytes(buf[:4])
                raise AtlasError(f"{path} is not a GGUF file: it starts with {found!r}, not the magic bytes b'GGUF'"
                                 + (" (the file is empty)" if size == 0 else ""))
            endian = "<"
            (version,) = struct.unpack_from("<I", buf, 4) if len(buf) >= 8 else (0,)
            if version & 0xFFFF == 0 and version:  # a big-endian file
                endian, version = ">", struct.unpack_from(">I", buf, 4)[0]
            if version not in (2, 3):
                raise AtlasError(f"{path}: GGUF version {version}, expected 2 or 3 (the file may be corrupt)")
            cur = _Cursor(buf, endian)
            cur.pos = 8
            n_tensors, n_kv = cur.take("QQ")
            if n_tensors > size or n_kv > size:
                raise ValueError(f"the header counts {n_tensors} tensors and {n_kv} metadata entries")
            meta: dict[str, object] = {}
            for _ in range(n_kv):
                key = cur.string()
                (vtype,) = cur.take("I")
                if key in ("general.architecture", "general.name") and vtype == 8:
                    meta[key] = cur.string()
                elif key == "general.alignment" and vtype in _SCALAR and vtype not in (6, 12):
                    (meta[key],) = cur.take(_SCALAR[vtype])
                else:
                    cur.skip_value(vtype)
            tensors = []
            for _ in range(n_tensors):
                tname = cur.string()
                (n_dims,) = cur.take("I")
                if n_dims > 8:
                    raise ValueError(f"tensor {tname!r} has {n_dims} dimensions")
                dims = cur.take("Q" * n_dims)
                ttype, offset = cur.take("IQ")
                if ttype not in names:
                    raise ValueError(f"tensor {tname!r} has the unknown type {ttype}")
                tensors.append((tname, dims, ttype, offset))
            alignment = int(meta.get("general.alignment", 32) or 32)
            data_start = -(-cur.pos // alignment) * alignment
            end = data_start
            for _name, dims, ttype, offset in tensors:
                block, nbytes = sizes.get(ttype, (1, 0))
                count = 1
                for d in dims:
                    count *= d
                end = max(end, data_start + offset + count // block * nbytes)
            if end > size:
                raise _Truncated(f"its tensor data ends at byte {end}")
    except AtlasError:
        raise
    except _Truncated as exc:
        raise AtlasError(f"{bad}: {exc} (the file has {size} bytes)") from None
    except (ValueError, struct.error, OverflowError, MemoryError) as exc:
        raise AtlasError(f"{bad}: {exc}") from None
    except OSError as exc:
        raise AtlasError(f"cannot read the GGUF file {path}: {exc.strerror or exc}") from None
    arch, name = meta.get("general.architecture"), meta.get("general.name")
    return GGUFHeader(path=path, version=version, architecture=arch if isinstance(arch, str) else None,
                      name=name if isinstance(name, str) else None,
                      tensor_types=dict(Counter(names[t] for _, _, t, _ in tensors).most_common()),
                      n_tensors=len(tensors))


def supported_architectures() -> list[str]:
    """The GGUF architectures this transformers loads (``GGUF_SUPPORTED_ARCHITECTURES``; empty if unknown)."""
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    except ImportError:
        return []
    return sorted(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer", "tokenizer_config"))


@contextlib.contextmanager
def _no_progress_bar() -> Iterator[None]:
    """Hide transformers' "Converting and de-quantizing GGUF tensors" bar (a plain ``tqdm``, which its
    ``disable_progress_bar`` does not reach) for the ``with`` block."""
    try:
        from transformers import modeling_gguf_pytorch_utils as loader
    except ImportError:
        yield
        return
    bar = getattr(loader, "tqdm", None)
    if bar is None:
        yield
        return
    loader.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        loader.tqdm = bar


@contextlib.contextmanager
def load_errors(path: str, what: str = "model") -> Iterator[GGUFHeader]:
    """Check the GGUF file at ``path`` (:func:`read_header`), then run the ``with`` block (transformers'
    load of the ``what``) turning any error of it into one :class:`AtlasError` naming the file, its
    architecture and what went wrong (an unsupported architecture says which ones are supported)."""
    header = read_header(path)
    try:
        with _no_progress_bar():
            yield header
    except AtlasError:
        raise
    except Exception as exc:
        arch = header.architecture or "(none recorded)"
        if "not supported" in str(exc) and "architecture" in str(exc):
            import transformers

            supported = supported_architectures()
            raise AtlasError(
                f"the GGUF file {path} holds a model of architecture {arch!r}, which transformers "
                f"{transformers.__version__} cannot load from GGUF"
                + (f" (it loads: {', '.join(supported)})" if supported else "")) from None
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise AtlasError(f"cannot load the {what} of the GGUF file {path} (architecture {arch!r}): "
                         f"{type(exc).__name__}{': ' + first if first else ''}") from exc


def quantization_note(path: str | os.PathLike[str], dtype: str = "float32") -> str | None:
    """``"de-quantized to float32 from SmolLM2-135M-Instruct.Q4_1.gguf (4-bit Q4_1: 210 of 272 tensors; ...)"``
    for a GGUF file whose tensors are not all float32 (``"converted to ..."`` for 16-bit floats), else ``None``."""
    header = read_header(path)
    main = header.main_type
    if main is None:
        return None
    bits = _bits(main)
    counts = "; ".join(f"{k}: {v}" for k, v in header.tensor_types.items() if k != main)
    detail = f"{f'{bits}-bit ' if bits else ''}{main}: {header.tensor_types[main]} of {header.n_tensors} tensors"
    verb = "de-quantized" if header.quantized else "converted"
    return f"{verb} to {dtype} from {Path(path).name} ({detail}{'; ' + counts if counts else ''})"
