"""Every cache of the dashboard, in one place (the library keeps none: it touches disk only when handed one).

* :func:`results`: the dashboard's disk cache, a :class:`geometry.cache.ResultCache` in
  ``$ADAPTER_ATLAS_CACHE/store`` (default ``<repo>/cache/store``), capped at ``$ADAPTER_ATLAS_CACHE_MB``
  MiB (default 2048), its keys salted with :func:`ui_version` (a hash of the ``ui/`` sources) so that a
  change to the dashboard's code invalidates what it stored. Re-created when those variables change.
  ``ui.compute`` reads and writes it, and hands it to the library calls that take ``cache=``.
* In memory, bounded, made with ``cachetools`` (each with its lock; :func:`clear_memory` empties them):
  :data:`FIGURES` (shared figures by content, LRU within :data:`FIGURE_BYTES` of pickled spec),
  :data:`BUILT` (a builder's arguments -> its figure's content hash, see :func:`memoized_figure`),
  :data:`SAMPLE_PATHS` (the sample folders' listing, TTL :data:`SAMPLE_PATHS_TTL` seconds) with
  :data:`SAMPLE_LISTINGS` (the listing per folder stamp), and :data:`FILE_DIGESTS` (file sha256 by
  path, size and modification time).
* Streamlit's own ``st.cache_data`` / ``st.cache_resource`` (``max_entries`` on each) live beside the
  functions they wrap in ``ui.compute`` and ``ui.state``.

Pure Python: no Streamlit import (the figure builders and tests use it without a server).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import os
import pickle
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from cachetools import LRUCache, TTLCache

from geometry.cache import ResultCache

REPO = Path(__file__).resolve().parents[1]
ENV = "ADAPTER_ATLAS_CACHE"
#: Size cap of the disk cache in MiB (``2**20`` bytes); a float is accepted.
ENV_MB = "ADAPTER_ATLAS_CACHE_MB"
DEFAULT_MB = 2048.0
#: Sub-folder of :func:`cache_dir` holding the disk cache (``surveys/`` beside it: ``ui.compute.surveys_dir``).
STORE = "store"


# ------------------------------------------------------------------------------------------ disk
def cache_dir() -> Path:
    """``$ADAPTER_ATLAS_CACHE`` when set, else ``<repo>/cache``."""
    env = os.environ.get(ENV)
    return Path(env).expanduser() if env else REPO / "cache"


def store_dir() -> Path:
    """The folder of the disk cache: ``cache_dir() / "store"``."""
    return cache_dir() / STORE


def size_mb() -> float:
    """The disk cache's cap in MiB, from ``$ADAPTER_ATLAS_CACHE_MB`` (default 2048; unreadable: the default)."""
    try:
        mb = float(os.environ.get(ENV_MB, DEFAULT_MB))
    except ValueError:
        return DEFAULT_MB
    return mb if mb == mb else DEFAULT_MB


@functools.lru_cache(maxsize=1)
def ui_version() -> str:
    """sha256 of every ``*.py`` file under ``ui/`` (paths and bytes): the salt of :func:`results`' keys."""
    h = hashlib.sha256()
    for file in sorted((REPO / "ui").rglob("*.py")):
        h.update(file.relative_to(REPO).as_posix().encode() + b"\0" + file.read_bytes() + b"\0")
    return h.hexdigest()


_RESULTS_LOCK = threading.Lock()
_RESULTS: dict[str, Any] = {}  # {"where": (folder, MiB), "cache": ResultCache}: one entry


def results() -> ResultCache:
    """The dashboard's :class:`~geometry.cache.ResultCache` (see the module docstring); the same object until
    ``$ADAPTER_ATLAS_CACHE`` or ``$ADAPTER_ATLAS_CACHE_MB`` change. A folder that cannot be written gives a
    cache that computes and stores nothing."""
    where = (str(store_dir()), size_mb())
    with _RESULTS_LOCK:
        if _RESULTS.get("where") == where:
            return _RESULTS["cache"]
        old = _RESULTS.get("cache")
        cache = ResultCache(where[0], size_mb=where[1], salt=ui_version())
        _RESULTS.update(where=where, cache=cache)
    if old is not None:
        old.close()
    return cache


# ------------------------------------------------------------------------------------------ memory
#: Pickled spec bytes of the shared figures kept (the figures themselves take about three times that).
FIGURE_BYTES = 64 * 2**20
#: Builder calls remembered (each: the content hash of its figure in :data:`FIGURES`).
BUILT_KEYS = 4096
#: Seconds a sample folder's listing is used without looking at the folders again.
SAMPLE_PATHS_TTL = 2.0


def figure_cache(max_bytes: int = FIGURE_BYTES) -> LRUCache:
    """An LRU of ``content hash -> (figure, pickled spec bytes)`` bounded by the sum of those bytes."""
    return LRUCache(maxsize=max_bytes, getsizeof=lambda entry: entry[1])


def sample_paths_cache(ttl: float = SAMPLE_PATHS_TTL) -> TTLCache:
    """A TTL cache of ``folder -> its sample adapter paths``."""
    return TTLCache(maxsize=64, ttl=ttl)


FIGURES: LRUCache = figure_cache()
BUILT: LRUCache = LRUCache(maxsize=BUILT_KEYS)
FIGURES_LOCK = threading.RLock()
SAMPLE_PATHS: TTLCache = sample_paths_cache()
#: ``folder -> (its stamp, its sample adapter paths)``: the recursive search runs again only on a new stamp
SAMPLE_LISTINGS: LRUCache = LRUCache(maxsize=64)
SAMPLE_LOCK = threading.Lock()
FILE_DIGESTS: LRUCache = LRUCache(maxsize=4096)
FILE_DIGESTS_LOCK = threading.Lock()


def clear_memory() -> None:
    """Empty every in-memory cache of this module (the disk cache and Streamlit's caches stay)."""
    for cache, lock in ((FIGURES, FIGURES_LOCK), (BUILT, FIGURES_LOCK), (SAMPLE_PATHS, SAMPLE_LOCK),
                        (SAMPLE_LISTINGS, SAMPLE_LOCK), (FILE_DIGESTS, FILE_DIGESTS_LOCK)):
        with lock:
            cache.clear()


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes, read again only when its size or modification time changes."""
    st_ = path.stat()
    key = (str(path), st_.st_mtime_ns, st_.st_size)
    with FILE_DIGESTS_LOCK:
        hit = FILE_DIGESTS.get(key)
    if hit is None:
        hit = hashlib.sha256(path.read_bytes()).hexdigest()
        with FILE_DIGESTS_LOCK:
            FILE_DIGESTS[key] = hit
    return hit


# ------------------------------------------------------------------------------------------ figures
def shared_figure(key: str, build: Callable[[], tuple[Any, int]]) -> Any:
    """The figure kept in :data:`FIGURES` under ``key`` (a content hash), else ``build()``'s
    ``(figure, pickled spec bytes)`` kept then returned (``ui.figures.figure``)."""
    with FIGURES_LOCK:
        hit = FIGURES.get(key)
    if hit is not None:
        return hit[0]
    fig, size = build()
    with FIGURES_LOCK:
        try:
            FIGURES[key] = (fig, size)
        except ValueError:  # larger than the whole budget: returned, not kept
            pass
    return fig


@functools.lru_cache(maxsize=256)
def _signature(fn: Callable[..., Any]) -> inspect.Signature:
    return inspect.signature(fn)


def _name(fn: Callable[..., Any]) -> str:
    code = getattr(fn, "__code__", None)
    where = f"{code.co_filename}:{code.co_firstlineno}" if code is not None else ""
    return f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}@{where}"


def argument_key(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> str:
    """A hash of ``fn`` (module, qualified name, where it is defined) and of the arguments it is called with,
    bound to its signature with the defaults filled in (so ``f(x)``, ``f(x=x)`` and ``f(x, title=<its default>)``
    agree), each argument hashed by content (:func:`content_hash`)."""
    try:
        bound = _signature(fn).bind(*args, **kwargs)
        bound.apply_defaults()
        arguments: Any = dict(bound.arguments)
    except (TypeError, ValueError):  # no signature to bind to: the call as given
        arguments = (args, kwargs)
    h = hashlib.blake2b(digest_size=20)
    h.update(_name(fn).encode())
    _feed(h, arguments, 0)
    return h.hexdigest()


def memoized_figure(builder: Callable[..., Any]) -> Callable[..., Any]:
    """``builder`` (a pure function of its arguments returning a figure of ``ui.figures.figure``), run once per
    distinct arguments (:func:`argument_key`): a later call with the same arguments returns the shared figure
    without building it, as long as :data:`FIGURES` keeps it. A figure that is not shared (``None``, or not from
    ``ui.figures.figure``) is returned and not kept."""

    @functools.wraps(builder)
    def memoized(*args: Any, **kwargs: Any) -> Any:
        key = argument_key(builder, *args, **kwargs)
        with FIGURES_LOCK:
            content = BUILT.get(key)
            hit = FIGURES.get(content) if content is not None else None
        if hit is not None:
            return hit[0]
        fig = builder(*args, **kwargs)
        content = getattr(fig, "_content_hash", None)
        if content is not None:
            with FIGURES_LOCK:
                BUILT[key] = content
        return fig

    return memoized


# ------------------------------------------------------------------------------------------ content hashing
def content_hash(value: Any) -> str:
    """blake2b of ``value``'s content: arrays and tensors by dtype, shape and bytes, DataFrames / Series /
    indexes by their values, labels and ``attrs``, containers and dataclasses element by element, other
    objects by their type and attributes (or their pickle)."""
    h = hashlib.blake2b(digest_size=20)
    _feed(h, value, 0)
    return h.hexdigest()


_MAX_DEPTH = 40


def _tag(h: Any, value: Any, extra: str = "") -> None:
    t = type(value)
    h.update(f"\0{t.__module__}.{t.__qualname__}{extra}\0".encode())


def _feed(h: Any, value: Any, depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise TypeError("content_hash: nested too deeply (a cycle?)")
    d = depth + 1
    if value is None or isinstance(value, (bool, int, float, complex, str)):
        _tag(h, value, repr(value))
        return
    if isinstance(value, (bytes, bytearray, memoryview)):
        _tag(h, value, str(len(value)))
        h.update(value)
        return
    module = type(value).__module__.split(".")[0]
    if module == "numpy":
        _feed_numpy(h, value, d)
        return
    if module == "pandas":
        _feed_pandas(h, value, d)
        return
    if module == "torch" and hasattr(value, "detach"):
        _feed_numpy(h, value.detach().cpu().numpy(), d)
        return
    if isinstance(value, Mapping):
        _tag(h, value, str(len(value)))
        for k, v in value.items():
            _feed(h, k, d)
            _feed(h, v, d)
        return
    if isinstance(value, (list, tuple)):
        _tag(h, value, str(len(value)))
        for v in value:
            _feed(h, v, d)
        return
    if isinstance(value, (set, frozenset)):
        _tag(h, value, str(len(value)))
        for digest in sorted(content_hash(v) for v in value):
            h.update(digest.encode())
        return
    if isinstance(value, Path):
        _tag(h, value, str(value))
        return
    if inspect.isroutine(value) or inspect.isclass(value):
        _tag(h, value, _name(value))
        return
    fields = getattr(value, "__dataclass_fields__", None)
    if fields is not None:
        _tag(h, value)
        for name in fields:
            h.update(name.encode())
            _feed(h, getattr(value, name, None), d)
        return
    attrs = getattr(value, "__dict__", None)
    if isinstance(attrs, dict):
        _tag(h, value)
        _feed(h, attrs, d)
        return
    _feed_pickled(h, value)


def _feed_numpy(h: Any, value: Any, depth: int) -> None:
    import numpy as np

    if isinstance(value, np.ndarray):
        _tag(h, value, f"{value.dtype.str}{value.shape}")
        if value.dtype.hasobject:
            for v in value.ravel(order="C"):
                _feed(h, v, depth)
        else:
            h.update(np.ascontiguousarray(value).reshape(-1))
        return
    if isinstance(value, np.generic):
        _tag(h, value, f"{value.dtype.str}{value!r}")
        return
    _tag(h, value, repr(value))


def _feed_pandas(h: Any, value: Any, depth: int) -> None:
    import pandas as pd

    if isinstance(value, pd.DataFrame):
        _tag(h, value, str(value.shape))
        _feed(h, list(value.columns), depth)
        _feed_pandas(h, value.index, depth)
        for _, column in value.items():
            _feed_values(h, column, depth)
        _feed(h, dict(value.attrs), depth)
        return
    if isinstance(value, pd.Series):
        _tag(h, value, str(len(value)))
        _feed(h, value.name, depth)
        _feed_pandas(h, value.index, depth)
        _feed_values(h, value, depth)
        _feed(h, dict(value.attrs), depth)
        return
    if isinstance(value, pd.Index):
        _tag(h, value, str(len(value)))
        _feed(h, list(value.names), depth)
        if isinstance(value, pd.RangeIndex):
            h.update(f"{value.start}:{value.stop}:{value.step}".encode())
        else:
            _feed_values(h, value, depth)
        return
    _feed_pickled(h, value)


def _feed_values(h: Any, values: Any, depth: int) -> None:
    """The values of a Series or Index (not its labels): vectorised where pandas can hash them."""
    import pandas as pd

    h.update(str(values.dtype).encode())
    # pandas hashes object cells it cannot hash by their str(), which elides long arrays: those go one by one
    if values.dtype == object and pd.api.types.infer_dtype(values, skipna=False) not in _PLAIN:
        for v in values:
            _feed(h, v, depth)
        return
    h.update(pd.util.hash_pandas_object(values, index=False, categorize=False).to_numpy().tobytes())


#: what ``pandas.api.types.infer_dtype`` calls an object column pandas hashes exactly (by value)
_PLAIN = frozenset({"string", "empty", "boolean", "integer", "bytes"})


def _feed_pickled(h: Any, value: Any) -> None:
    """A value with no structure to walk: its pickle (its repr when it cannot be pickled)."""
    try:
        data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:
        _tag(h, value, repr(value))
        return
    _tag(h, value, str(len(data)))
    h.update(data)
