"""Streamlit-side helpers of the dashboard (the library in ``geometry/`` never imports Streamlit).

``adapter_set``, ``views`` and ``figures`` are pure Python (tested without Streamlit); ``state``,
``sidebar``, ``compute``, ``downloads`` and ``controls`` draw or cache through Streamlit.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def quiet_environment() -> None:
    """Silence library chatter a dashboard user would see, and keep numba's cache in ``cache/``.

    Sets environment variables only (cheap; no heavy import): transformers / hub progress bars and
    advisory warnings off, ``NUMBA_CACHE_DIR`` to ``cache/numba`` (UMAP JIT-compiles with numba),
    and filters UMAP / sklearn warnings that do not concern the user.
    """
    os.environ.setdefault("NUMBA_CACHE_DIR", str(REPO / "cache" / "numba"))
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", module="umap")
    warnings.filterwarnings("ignore", message=".*n_jobs value.*")
    warnings.filterwarnings("ignore", message=".*force_all_finite.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module="sklearn")
