"""Background warm-up at server start: UMAP's numba compile runs once, off the request path.

``start()`` (called by ``app.py``) launches one daemon thread per server process that runs
:func:`geometry.analysis.maps.warm_umap`; ``umap_ready()`` says whether it has finished, so the Distances page
shows PCA with a note meanwhile and the UMAP map as soon as it is ready (never a minutes-long spinner).
Then :func:`settle_heap` freezes what the imports and the compile left on the heap.
"""

from __future__ import annotations

import gc
import threading

from geometry.analysis.maps import warm_umap

_READY = threading.Event()
_LOCK = threading.Lock()
_STATE: dict[str, object] = {"thread": None, "seconds": None, "error": None}


def _run() -> None:

    try:
        _STATE["seconds"] = warm_umap()
    except Exception as exc:  # an unusable UMAP install: the page says so instead of waiting for ever
        _STATE["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        _READY.set()
    settle_heap()


def settle_heap() -> int:
    """Collect garbage once, then move every surviving object out of the collector's sight (``gc.freeze``).

    Streamlit runs ``gc.collect(2)`` after every script run. With torch, transformers, numba, plotly and
    pandas imported the heap holds about 570,000 tracked objects, module-level and never garbage, and
    each full collection walks them all: 0.3 s of holding the GIL per click, during which no other session
    is served and the finished page is not sent. Frozen, they are skipped (a full collection of what is
    left takes milliseconds); objects created later are collected as before. Returns the number frozen.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def start() -> None:
    """Start the warm-up thread once per process (later calls do nothing)."""
    with _LOCK:
        if _STATE["thread"] is None:
            thread = threading.Thread(target=_run, name="umap-warmup", daemon=True)
            _STATE["thread"] = thread
            thread.start()


def umap_ready() -> bool:
    return _READY.is_set()


def umap_error() -> str | None:
    return _STATE["error"]  # type: ignore[return-value]


def wait(timeout: float | None = None) -> bool:
    return _READY.wait(timeout)
