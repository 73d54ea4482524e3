"""A tiny on-disk cache of computed results (pickles), keyed by the content of what they depend on.

    value = cached("all_distances", content_hashes, lambda: all_distances(adapters))

Files live in ``cache_dir() / namespace / <sha256 of the key parts>.pkl``. Every key also holds
:func:`code_version`, a hash of the code that computes the results (the source of the
``geometry`` package and of the dashboard's ``ui`` package, plus the torch / numpy versions), so that
after any change to the maths old results are never returned. Writes are atomic
(temporary file then ``os.replace``), so a crash never leaves a half-written entry; an unreadable
or corrupt entry is recomputed and overwritten. When the directory is not writable the value is
still returned (just not stored). Only this program's own pickles are read back: the cache lives
in a directory the user owns, never in uploaded content.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[1]
ENV = "ADAPTER_ATLAS_CACHE"


def cache_dir() -> Path:
    """``$ADAPTER_ATLAS_CACHE`` when set, else ``<repo>/cache``."""
    env = os.environ.get(ENV)
    return Path(env).expanduser() if env else REPO / "cache"


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


def cache_path(namespace: str, key_parts: Iterable[Any]) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in namespace) or "default"
    return cache_dir() / safe / f"{cache_key((code_version(), *key_parts))}.pkl"


def cached(namespace: str, key_parts: Iterable[Any], compute: Callable[[], T]) -> T:
    """The stored value for ``(namespace, key_parts)``, or ``compute()`` stored atomically then returned."""
    path = cache_path(namespace, tuple(key_parts))
    try:
        with open(path, "rb") as fh:
            return pickle.load(fh)
    except Exception:  # missing, corrupt, truncated or from an incompatible version: recompute
        pass
    value = compute()
    _store(path, value)
    return value


def _store(path: Path, value: Any) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".pkl")
    except OSError:
        return
    try:
        with os.fdopen(fd, "wb") as fh:
            pickle.dump(value, fh, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, path)
    except Exception:
        try:
            os.unlink(tmp)
        except OSError:
            pass
