"""Reading untrusted zip archives safely: sizes, member counts, ratios, paths and compression checked before
anything is inflated, and reading stopped at a byte budget whatever the headers claim (see
:mod:`geometry.io.loader` for the whole list)."""

from __future__ import annotations

import io
import lzma
import re
import stat
import struct
import zipfile
import zlib
from pathlib import PurePosixPath

from geometry.errors import AdapterLoadError
from geometry.io.limits import RATIO_MIN_BYTES

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
