"""The library's one disk cache, used only when asked: computed results keyed by what they depend on.

The policy: the library touches no disk unless a caller hands it a cache (``cache=`` takes a
:class:`ResultCache`, or a folder path, which :func:`as_cache` turns into one); the default ``None``
computes. Nothing here is created at import time, and no other module of ``geometry`` writes results to
disk. What keeps a cache (the CLI, the dashboard, a script) chooses its folder::

    cache = ResultCache("~/.cache/adapter-atlas/store", size_mb=512)
    geometry.evaluate_merge(merged, tasks="sample_adapters/real/tasks", cache=cache)
    value = cache.get_or_compute("all_distances", content_hashes, lambda: all_distances(adapters))

Storage is a :class:`diskcache.Cache` (SQLite index plus one file per large value) in the cache's
folder, used through diskcache's public API only. Every key also holds :func:`code_version`, a hash of
the ``geometry`` package's source (never anything outside it) and the torch / numpy versions, plus the
cache's ``salt`` (a caller whose own code shapes what it stores, such as the dashboard, passes a hash of
that code), so that after any change to the maths old results are never returned.

* Size cap: ``size_mb`` mebibytes (default 2048); past it the least recently *used* entries are evicted
  (``diskcache.Cache.cull``) after a new one is written, in batches of up to ten entries, until the
  store fits.
* Crash safety: a value file is written in full under a fresh random name before the SQLite row that
  points at it is committed, so a writer killed mid-way leaves at most an orphan file, never an entry.
  Orphans are outside the size cap's count, so :meth:`ResultCache.sweep_orphans` deletes the value
  files no entry points at once they are an hour old (a younger one may be a write in progress); it runs
  in a background thread when a cache first opens its store and then once a day while it writes.
  Every entry also stores the sha256 of its bytes; an entry whose bytes do not match (truncated,
  overwritten, a damaged row) is dropped and recomputed, never returned and never raised.
* Concurrency: two threads or processes writing the same key both get their value back and leave
  one valid entry (the last write wins; SQLite serialises the commits).
* Only this program's own results are read back: keys are sha256 hex of the key parts, the folder is
  the caller's own (never uploaded content), diskcache itself only handles bytes here (it never
  unpickles), and the one ``pickle.loads`` here runs on bytes whose sha256 matches the digest stored
  with them.
* When the folder is not writable (or SQLite is unusable) the value is still returned, just not
  stored; a value that cannot be pickled is returned and not stored.

This module imports nothing of ``geometry`` at load time (a child process can load it by path without
torch).
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import pickle
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import diskcache as _dc
from cachetools import LRUCache
from diskcache.core import MODE_BINARY, MODE_RAW

T = TypeVar("T")
#: The repository (or site-packages) folder holding the ``geometry`` package.
REPO = Path(__file__).resolve().parents[1]
DEFAULT_MB = 2048
EVICTION = "least-recently-used"
#: an unreferenced value file younger than this may belong to a write in progress (seconds)
ORPHAN_AGE_S = 3600.0
#: how often a long-running process sweeps orphans while it writes (seconds)
SWEEP_EVERY_S = 86400.0
#: Source folders whose code produces the library's results (relative to :data:`REPO`): the library only.
CODE_DIRS: tuple[str, ...] = ("geometry",)
_MISSING = object()


# ------------------------------------------------------------------------------------------ keys
@functools.lru_cache(maxsize=8)
def _code_version(root: str, dirs: tuple[str, ...]) -> str:
    import numpy
    import torch

    h = hashlib.sha256(f"torch={torch.__version__}|numpy={numpy.__version__}".encode())
    base = Path(root)
    for d in dirs:
        for file in sorted((base / d).rglob("*.py")):
            h.update(file.relative_to(base).as_posix().encode() + b"\0" + file.read_bytes() + b"\0")
    return h.hexdigest()


def code_version(root: str | os.PathLike[str] | None = None, dirs: Iterable[str] = CODE_DIRS) -> str:
    """sha256 of every ``*.py`` file under ``root / dirs`` (paths and bytes) and the torch / numpy versions.

    By default the ``geometry`` package only. Computed once per process for a tree (the code cannot
    change under a running process without a restart that recomputes it); ``code_version.cache_clear()``
    forgets it.
    """
    return _code_version(str(Path(root) if root is not None else REPO), tuple(dirs))


code_version.cache_clear = _code_version.cache_clear  # type: ignore[attr-defined]


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


def _digest(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


class _BytesOnlyDisk(_dc.Disk):
    """diskcache's serialiser, refusing to hand back anything but bytes (so it never unpickles)."""

    def fetch(self, mode, filename, value, read):
        if mode not in (MODE_RAW, MODE_BINARY):
            raise OSError(f"unexpected diskcache entry mode {mode}")  # read by Cache.get as a miss
        data = super().fetch(mode, filename, value, read)
        if not isinstance(data, bytes):
            raise OSError("unexpected diskcache entry type")
        return data


# ------------------------------------------------------------------------------------------ the cache
class ResultCache:
    """A size-capped disk cache of computed results in ``directory`` (see the module docstring).

    ``size_mb``: the cap in MiB (a float is accepted); ``salt``: mixed into every key (e.g. a hash of
    the caller's own code). The store is opened on first use, not by the constructor. Safe to share
    between threads; pickles as its settings (a process that unpickles it opens the store itself).
    """

    def __init__(self, directory: str | os.PathLike[str], *, size_mb: float = DEFAULT_MB, salt: str = ""):
        self.directory = Path(directory).expanduser()
        try:
            mb = float(size_mb)
        except (TypeError, ValueError):
            mb = DEFAULT_MB
        self.size_mb = mb if mb == mb else DEFAULT_MB  # NaN: the default
        self.size_limit = max(int(self.size_mb * 2**20), 0)
        self.salt = str(salt)
        self._lock = threading.Lock()
        self._sweep_lock = threading.Lock()
        self._store: _dc.Cache | None = None
        self._swept_at = -float("inf")

    def __repr__(self) -> str:
        return f"ResultCache({str(self.directory)!r}, size_mb={self.size_mb:g}, salt={self.salt!r})"

    def __getstate__(self) -> dict[str, Any]:
        return {"directory": self.directory, "size_mb": self.size_mb, "salt": self.salt}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["directory"], size_mb=state["size_mb"], salt=state["salt"])

    # -------------------------------------------------------------------------------------- store
    def store(self) -> _dc.Cache | None:
        """The :class:`diskcache.Cache` behind this cache, opened on first use; ``None`` when it cannot be
        opened (folder not writable, not a folder, SQLite unusable; tried again on the next call)."""
        with self._lock:
            if self._store is not None:
                return self._store
            try:
                # cull_limit=0: no eviction inside each write; set() culls to the cap once the entry is in
                cache = _dc.Cache(str(self.directory), disk=_BytesOnlyDisk, size_limit=self.size_limit,
                                  eviction_policy=EVICTION, cull_limit=0)
            except Exception:  # not writable, not a directory, SQLite unusable: run without a disk cache
                return None
            self._store = cache
        self._sweep_in_background()
        return cache

    def key(self, namespace: str, key_parts: Iterable[Any]) -> str:
        """The store's key of ``(namespace, key_parts)``: ``<namespace>/<sha256 of the code version, the
        salt and the parts>``."""
        return f"{_safe(namespace)}/{cache_key((code_version(), self.salt, *key_parts))}"

    def get(self, namespace: str, key_parts: Iterable[Any], default: Any = None) -> Any:
        """The stored value for ``(namespace, key_parts)``, or ``default`` when there is none (or it is
        damaged, in which case the entry is dropped)."""
        cache = self.store()
        if cache is None:
            return default
        key = self.key(namespace, tuple(key_parts))
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

    def set(self, namespace: str, key_parts: Iterable[Any], value: Any) -> bool:
        """Store ``value`` for ``(namespace, key_parts)``; ``False`` when it was not stored (the value cannot
        be pickled, the folder is not writable, the database stayed locked past its timeout)."""
        cache = self.store()
        if cache is None:
            return False
        key = self.key(namespace, tuple(key_parts))
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
            cache.cull()  # least recently used first, ten at a time, until the store fits its cap
        except Exception:  # busy past the timeout: the next write evicts
            pass
        self._sweep_in_background()
        return stored

    def delete(self, namespace: str, key_parts: Iterable[Any]) -> bool:
        """Drop the entry for ``(namespace, key_parts)``; whether one was there (``False`` also when the store
        cannot be opened or stayed busy)."""
        cache = self.store()
        if cache is None:
            return False
        try:
            return bool(cache.delete(self.key(namespace, tuple(key_parts))))
        except Exception:
            return False

    def get_or_compute(self, namespace: str, key_parts: Iterable[Any], compute: Callable[[], T]) -> T:
        """The stored value for ``(namespace, key_parts)``, or ``compute()`` stored then returned.

        An exception from ``compute`` propagates and nothing is stored."""
        key_parts = tuple(key_parts)
        value = self.get(namespace, key_parts, _MISSING)
        if value is not _MISSING:
            return value
        value = compute()
        self.set(namespace, key_parts, value)
        return value

    def __len__(self) -> int:
        cache = self.store()
        try:
            return len(cache) if cache is not None else 0
        except Exception:
            return 0

    def volume(self) -> int:
        """Bytes the store takes on disk (its database and value files), 0 when it cannot be opened."""
        cache = self.store()
        try:
            return int(cache.volume()) if cache is not None else 0
        except Exception:
            return 0

    def clear(self) -> int:
        """Delete every entry (whatever its namespace, code version or salt); returns how many."""
        cache = self.store()
        if cache is None:
            return 0
        try:
            return int(cache.clear())
        except Exception:
            return 0

    def close(self) -> None:
        """Close the store's database connections (a later call opens it again)."""
        with self._lock:
            cache, self._store = self._store, None
        if cache is not None:
            try:
                cache.close()
            except Exception:
                pass

    # -------------------------------------------------------------------------------------- orphans
    def sweep_orphans(self, min_age_s: float = ORPHAN_AGE_S) -> int:
        """Delete the value files (``*.val``) of the store that no entry points at and that are at least
        ``min_age_s`` seconds old; returns how many were deleted.

        A writer killed between writing its value file and committing the row that points at it leaves
        such a file. They are found by diskcache's ``Cache.check(fix=False)``, whose ``unknown file``
        warnings name them; ``check(fix=True)`` would delete them too, but also files being written
        (a concurrent writer writes its file before its row), so only files older than ``min_age_s`` go
        here. Emptied sub-folders go too; nothing else is touched (the SQLite file, the rows).
        ``check`` records its findings through the ``warnings`` module, which is process-wide: a warning
        another thread raises during the sweep (milliseconds, once a day) may be recorded instead of shown.
        """
        cache = self.store()
        if cache is None:
            return 0
        with self._sweep_lock:  # one sweep at a time (a background one finishes first)
            root = Path(cache.directory)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("always")  # every finding is recorded (not "once", not an error)
                    found = cache.check(fix=False)
            except Exception:  # busy past its timeout, or damaged: try again next time
                return 0
            now, deleted = time.time(), 0
            for w in found:
                if not issubclass(w.category, _dc.UnknownFileWarning):
                    continue
                path = Path(str(w.message).partition("unknown file: ")[2])
                try:
                    parts = path.relative_to(root).parts
                except ValueError:
                    continue
                if path.suffix != ".val" or len(parts) != 3:  # diskcache's layout: two levels of sub-folders
                    continue
                try:
                    if now - path.stat().st_mtime < min_age_s:
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

    def _sweep_in_background(self) -> None:
        """Start :meth:`sweep_orphans` in a daemon thread unless this cache swept less than
        ``SWEEP_EVERY_S`` ago."""
        now = time.time()
        with self._lock:
            if now - self._swept_at < SWEEP_EVERY_S:
                return
            self._swept_at = now
        threading.Thread(target=lambda: self.sweep_orphans(ORPHAN_AGE_S), name="result-cache-orphan-sweep",
                         daemon=True).start()


# ------------------------------------------------------------------------------------------ helpers
#: the caches :func:`as_cache` made from folder paths, the most recently used few
_BY_PATH: LRUCache = LRUCache(maxsize=8)
_BY_PATH_LOCK = threading.Lock()


def as_cache(cache: ResultCache | str | os.PathLike[str] | None) -> ResultCache | None:
    """``None`` -> ``None`` (no disk); a :class:`ResultCache` -> itself; a folder path -> a
    :class:`ResultCache` there (the same object for the same folder while it is among the last few used).
    Anything else raises :class:`geometry.errors.InvalidArgumentError`."""
    if cache is None or isinstance(cache, ResultCache):
        return cache
    if isinstance(cache, (str, os.PathLike)):
        where = str(Path(cache).expanduser().resolve())
        with _BY_PATH_LOCK:
            found = _BY_PATH.get(where)
            if found is None:
                found = _BY_PATH[where] = ResultCache(where)
        return found
    from geometry.errors import InvalidArgumentError

    raise InvalidArgumentError(f"cache must be None, a ResultCache or a folder path, got {type(cache).__name__}")


def cached(cache: ResultCache | str | os.PathLike[str] | None, namespace: str, key_parts: Iterable[Any],
           compute: Callable[[], T]) -> T:
    """``compute()`` through ``cache`` (see :func:`as_cache`): ``None`` just computes."""
    store = as_cache(cache)
    if store is None:
        return compute()
    return store.get_or_compute(namespace, key_parts, compute)
