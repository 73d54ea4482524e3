"""An on-disk cache of computed results, keyed by the content of what they depend on.

    value = cached("all_distances", content_hashes, lambda: all_distances(adapters))

Storage is a :class:`diskcache.Cache` (SQLite index plus one file per large value) in
``cache_dir() / "store"``. Every key also holds :func:`code_version`, a hash of the code that computes
the results (the source of the ``geometry`` package and of the dashboard's ``ui`` package, plus the
torch / numpy versions), so that after any change to the maths old results are never returned.

* Size cap: ``$ADAPTER_ATLAS_CACHE_MB`` mebibytes (default 2048); past it the least recently *used*
  entries are evicted when a new one is written.
* Crash safety: a value file is written in full under a fresh random name before the SQLite row that
  points at it is committed, so a writer killed mid-way leaves at most an orphan file, never an entry.
  Orphans are outside the size cap's count, so :func:`sweep_orphans` deletes the value files no entry
  points at once they are an hour old (a younger one may be a write in progress); it runs in the
  background when a process first opens the store and then once a day while it writes.
  Every entry also stores the sha256 of its bytes; an entry whose bytes do not match (truncated,
  overwritten, a damaged row) is dropped and recomputed, never returned and never raised.
* Concurrency: two threads or processes writing the same key both get their value back and leave
  one valid entry (the last write wins; SQLite serialises the commits).
* Only this program's own results are read back: keys are sha256 hex of the key parts, the directory
  is the user's own (never uploaded content), diskcache itself only handles bytes (it never
  unpickles), and the one ``pickle.loads`` here runs on bytes whose sha256 matches the digest stored
  with them.
* When the directory is not writable (or SQLite is unusable) the value is still returned, just not
  stored; a value that cannot be pickled is returned and not stored.

Entries of the earlier hand-written cache (``cache_dir() / namespace / <sha256>.pkl``) are ignored
and may be deleted.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import diskcache as _dc

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[1]
ENV = "ADAPTER_ATLAS_CACHE"
#: Size cap of the store in MiB (``2**20`` bytes); a float is accepted.
ENV_MB = "ADAPTER_ATLAS_CACHE_MB"
DEFAULT_MB = 2048
#: Sub-folder of :func:`cache_dir` holding the diskcache store.
STORE = "store"
EVICTION = "least-recently-used"
#: an unreferenced value file younger than this may belong to a write in progress (seconds)
ORPHAN_AGE_S = 3600.0
#: how often a long-running process sweeps orphans while it writes (seconds)
SWEEP_EVERY_S = 86400.0
_MISSING = object()


def cache_dir() -> Path:
    """``$ADAPTER_ATLAS_CACHE`` when set, else ``<repo>/cache``."""
    env = os.environ.get(ENV)
    return Path(env).expanduser() if env else REPO / "cache"


def store_dir() -> Path:
    """The folder of the diskcache store: ``cache_dir() / "store"``."""
    return cache_dir() / STORE


def size_limit() -> int:
    """The store's size cap in bytes, from ``$ADAPTER_ATLAS_CACHE_MB`` (default 2048 MiB)."""
    try:
        mb = float(os.environ.get(ENV_MB, DEFAULT_MB))
    except ValueError:
        mb = DEFAULT_MB
    return max(int(mb * 2**20), 0)


#: Source folders whose code produces cached results (relative to the repository root).
CODE_DIRS: tuple[str, ...] = ("geometry", "ui")
_CODE_VERSION: dict[tuple[str, ...], str] = {}


def code_version(root: Path | None = None, dirs: Iterable[str] = CODE_DIRS) -> str:
    """sha256 of every ``*.py`` file under ``root / dirs`` (paths and bytes) and the torch / numpy versions.

    Computed once per process for the installed tree (the code cannot change under a running process
    without a restart that recomputes it).
    """
    import numpy
    import torch

    root = Path(root) if root is not None else REPO
    memo = (str(root), *dirs)
    if memo in _CODE_VERSION:
        return _CODE_VERSION[memo]
    h = hashlib.sha256(f"torch={torch.__version__}|numpy={numpy.__version__}".encode())
    for d in dirs:
        for file in sorted((root / d).rglob("*.py")):
            h.update(file.relative_to(root).as_posix().encode() + b"\0" + file.read_bytes() + b"\0")
    _CODE_VERSION[memo] = h.hexdigest()
    return _CODE_VERSION[memo]


def cache_key(key_parts: Iterable[Any]) -> str:
    """sha256 hex of the key parts (``repr`` of each, so tuples of str / int / float are stable)."""
    h = hashlib.sha256()
    for part in key_parts:
        data = part if isinstance(part, bytes) else repr(part).encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def _safe(namespace: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in namespace) or "default"


def entry_key(namespace: str, key_parts: Iterable[Any]) -> str:
    """The store's key of ``(namespace, key_parts)``: ``<namespace>/<sha256 of code_version and parts>``."""
    return f"{_safe(namespace)}/{cache_key((code_version(), *key_parts))}"


# ------------------------------------------------------------------------------------------ the store
class _BytesOnlyDisk(_dc.Disk):
    """diskcache's serialiser, refusing to hand back anything but bytes (so it never unpickles)."""

    def fetch(self, mode, filename, value, read):
        if mode not in (_dc.core.MODE_RAW, _dc.core.MODE_BINARY):
            raise OSError(f"unexpected diskcache entry mode {mode}")  # read by Cache.get as a miss
        data = super().fetch(mode, filename, value, read)
        if not isinstance(data, bytes):
            raise OSError("unexpected diskcache entry type")
        return data


_LOCK = threading.Lock()
_OPEN: dict[str, Any] = {}  # {"where": (directory, size_limit), "cache": Cache}


def open_store() -> _dc.Cache | None:
    """The :class:`diskcache.Cache` at :func:`store_dir` with the current size cap, or ``None`` when it
    cannot be opened (directory not writable, ...). Opened once and re-opened when ``$ADAPTER_ATLAS_CACHE``
    or ``$ADAPTER_ATLAS_CACHE_MB`` change; safe to share between threads and across ``fork``."""
    where = (str(store_dir()), size_limit())
    with _LOCK:
        if _OPEN.get("where") == where:
            return _OPEN["cache"]
        try:
            # cull_limit=0: diskcache would evict 10 entries at a time inside each write; _evict below
            # evicts one least recently used entry at a time until the store fits the cap
            cache = _dc.Cache(where[0], disk=_BytesOnlyDisk, size_limit=where[1], eviction_policy=EVICTION,
                              cull_limit=0)
        except Exception:  # not writable, not a directory, SQLite unusable: run without a disk cache
            return None
        old = _OPEN.get("cache")
        _OPEN.update(where=where, cache=cache)
    if old is not None:
        try:
            old.close()
        except Exception:
            pass
    _sweep_in_background(cache)
    return cache


_SWEPT: dict[str, float] = {}  # store directory -> time of its last sweep in this process


def sweep_orphans(cache: _dc.Cache | None = None, min_age_s: float = ORPHAN_AGE_S) -> int:
    """Delete the value files (``*.val``) of the store that no entry points at and that are at least
    ``min_age_s`` seconds old; returns how many were deleted.

    A writer killed between writing its value file and committing the row that points at it leaves
    such a file; diskcache's ``Cache.check(fix=True)`` would delete it too, but it also rebuilds the
    size count under a lock and warns for each finding. Younger files are kept: a concurrent writer
    writes its file before its row. Emptied sub-folders go too; nothing else is touched (the SQLite
    file, the rows)."""
    cache = cache if cache is not None else open_store()
    if cache is None:
        return 0
    root = Path(cache.directory)
    try:
        referenced = {row[0] for row in cache._sql("SELECT filename FROM Cache WHERE filename IS NOT NULL")}
    except Exception:  # busy past its timeout or damaged: try again next time
        return 0
    now, deleted = time.time(), 0
    for path in root.glob("*/*/*.val"):  # diskcache's layout: two levels of sub-folders
        try:
            if path.relative_to(root).as_posix() in referenced or now - path.stat().st_mtime < min_age_s:
                continue
            path.unlink()
            deleted += 1
        except OSError:  # deleted meanwhile, or not ours to delete
            continue
        for folder in (path.parent, path.parent.parent):  # as diskcache does when it deletes a file
            try:
                folder.rmdir()
            except OSError:  # not empty
                break
    return deleted


def _sweep_in_background(cache: _dc.Cache) -> None:
    """Start :func:`sweep_orphans` in a daemon thread unless this process swept this store less than
    ``SWEEP_EVERY_S`` ago."""
    now = time.time()
    with _LOCK:
        if now - _SWEPT.get(cache.directory, -float("inf")) < SWEEP_EVERY_S:
            return
        _SWEPT[cache.directory] = now
    threading.Thread(target=sweep_orphans, args=(cache,), name="diskcache-orphan-sweep", daemon=True).start()


def _digest(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def load(namespace: str, key_parts: Iterable[Any], default: Any = None) -> Any:
    """The stored value for ``(namespace, key_parts)``, or ``default`` when there is none (or it is damaged,
    in which case the entry is dropped)."""
    cache = open_store()
    if cache is None:
        return default
    key = entry_key(namespace, tuple(key_parts))
    try:
        data, digest = cache.get(key, default=_MISSING, tag=True)
    except Exception:  # SQLite busy past its timeout, damaged database, unreadable file: a miss
        return default
    if data is _MISSING:
        return default
    try:
        if isinstance(data, bytes) and digest == _digest(data):
            return pickle.loads(data)
    except Exception:  # digest matched but the pickle needs what this process lacks: recompute
        pass
    try:
        cache.delete(key)
    except Exception:
        pass
    return default


def store(namespace: str, key_parts: Iterable[Any], value: Any) -> bool:
    """Store ``value`` for ``(namespace, key_parts)``; ``False`` when it was not stored (the value cannot
    be pickled, the directory is not writable, the database stayed locked past its timeout)."""
    cache = open_store()
    if cache is None:
        return False
    key = entry_key(namespace, tuple(key_parts))
    try:
        data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:
        return False
    try:
        digest = _digest(data)
        if len(data) < cache.disk.min_file_size:  # kept inside the SQLite row
            stored = bool(cache.set(key, data, tag=digest))
        else:  # a file; as a reader it is copied in 4 MiB chunks (bytes would be written line by line)
            stored = bool(cache.set(key, io.BytesIO(data), read=True, tag=digest))
    except Exception:
        return False
    try:
        _evict(cache)
    except Exception:  # busy past the timeout: the next write evicts
        pass
    _sweep_in_background(cache)
    return stored


def _evict(cache: _dc.Cache) -> int:
    """Drop least recently used entries, one at a time, until the store's volume fits its size cap
    (``Cache.cull`` would drop ten at a time). Returns how many were dropped."""
    dropped = 0
    for _ in range(100_000):
        if cache.volume() <= cache.size_limit:
            break
        # every key this module writes is a str, stored raw (raw = 1)
        rows = cache._sql("SELECT key FROM Cache WHERE raw = 1 ORDER BY access_time LIMIT 1").fetchall()
        if not rows or not cache.delete(rows[0][0]):
            break
        dropped += 1
    return dropped


def cached(namespace: str, key_parts: Iterable[Any], compute: Callable[[], T]) -> T:
    """The stored value for ``(namespace, key_parts)``, or ``compute()`` stored then returned.

    An exception from ``compute`` propagates and nothing is stored."""
    key_parts = tuple(key_parts)
    value = load(namespace, key_parts, _MISSING)
    if value is not _MISSING:
        return value
    value = compute()
    store(namespace, key_parts, value)
    return value
