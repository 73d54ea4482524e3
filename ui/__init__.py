"""Streamlit-side helpers of the dashboard (the library in ``geometry/`` never imports Streamlit).

``adapter_set``, ``views`` and ``figures`` are pure Python (tested without Streamlit); ``state``,
``sidebar``, ``compute``, ``downloads`` and ``controls`` draw or cache through Streamlit.
"""

from __future__ import annotations

import os
import runpy
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path

from geometry.analysis.maps import numba_cache_dir

REPO = Path(__file__).resolve().parents[1]


def quiet_environment() -> None:
    """Silence library chatter a dashboard user would see, and keep numba's cache out of the repository.

    Sets environment variables only (cheap; no heavy import): transformers / hub progress bars and
    advisory warnings off, ``NUMBA_CACHE_DIR`` to ``~/.cache/adapter-atlas/numba`` (UMAP JIT-compiles with numba),
    and filters UMAP / sklearn warnings that do not concern the user.
    """

    os.environ.setdefault("NUMBA_CACHE_DIR", str(numba_cache_dir()))
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", module="umap")
    warnings.filterwarnings("ignore", message=".*n_jobs value.*")
    warnings.filterwarnings("ignore", message=".*force_all_finite.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module="sklearn")



_RUN = threading.local()


class PageDone(Exception):
    """Raised by :func:`stop_page` and caught by ``app.py``: the page has drawn all it can."""


def stop_page():
    """A page's ``st.stop()``. Inside ``app.py`` the page ends here and ``app.py`` still draws the shared sidebar,
    which it draws after the page (so that the page's heading and first figure reach the browser before the
    sidebar's widgets; ``st.stop()`` would stop the sidebar too). A page run on its own stops as with ``st.stop()``."""
    if getattr(_RUN, "inside", False):
        raise PageDone
    import streamlit as st

    st.stop()


@contextmanager
def app_run():
    """``app.py`` runs the chosen page inside this block: :func:`require_app` then knows the app is around it."""
    _RUN.inside = True
    try:
        yield
    finally:
        _RUN.inside = False


def require_app() -> None:
    """First line of every page: make sure the page runs inside ``app.py`` (navigation and sidebar).

    Streamlit keeps a v1 multipage fallback: while its class-level flag
    ``PagesManager.uses_pages_directory`` is set (a freshly started server whose first request is a
    page URL such as ``/distances``, requests arriving before ``app.py``'s first run reached
    ``st.navigation``, and every run of Streamlit's AppTest), a ``pages/`` folder next to the entry
    script makes it run ``pages/<page>.py`` on its own: file names as navigation, no sidebar.
    A page run by ``app.py`` is inside :func:`app_run` (a per-thread mark: each session's script
    runs in its own thread, so concurrent first requests are told apart). Otherwise, when the
    server's entry script is ``app.py``, the page clears the flag as ``st.navigation`` would and
    runs ``app.py`` right here, in the same script run (so a button click of this run is not lost):
    its ``st.navigation`` resolves the same URL (a page's identity is the hash of its URL path) to
    this page, drawn with the shared sidebar; then this outer run stops. A page file run as its own
    main script (Streamlit's AppTest of one page) is left alone.
    """
    if getattr(_RUN, "inside", False):
        return

    import streamlit as st
    from streamlit.runtime.pages_manager import PagesManager
    from streamlit.runtime.scriptrunner import get_script_run_ctx

    ctx = get_script_run_ctx()
    app = REPO / "app.py"
    if ctx is None or Path(ctx.pages_manager.main_script_path).resolve() != app:
        return
    PagesManager.uses_pages_directory = False
    runpy.run_path(str(app), run_name="__main__")
    st.stop()
