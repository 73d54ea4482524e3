"""Session state of the dashboard: the adapter set, its load messages, and the URL's ``adapters``.

The set lives in ``st.session_state["adapter_set"]`` (a :class:`ui.adapter_set.AdapterSet`). On a
session's first run it holds the sample adapters, restricted to the ``adapters`` query parameter
when the link names some (only sample adapters can be named in a URL: uploads are not on the
server for the next visitor).
"""

from __future__ import annotations

import os
from pathlib import Path

import streamlit as st

from ui import cache
from ui.adapter_set import (
    DEFAULT_SET,
    AdapterSet,
    list_sample_adapters,
    load_sample_set,
    sample_name,
    sample_sets,
    samples_dir,
)

SET_KEY = "adapter_set"
ERRORS_KEY = "load_errors"
NOTICES_KEY = "load_notices"
URL_ADAPTERS = "adapters"
#: the session's sample set (``ui.adapter_set.SAMPLE_SETS``), also in the URL as ``set`` when not the default
SAMPLE_SET_KEY = "sample_set"
URL_SET = "set"


def current_set() -> str:
    """The session's sample set: chosen in the sidebar, or named by the link (``?set=synthetic``)."""
    if SAMPLE_SET_KEY not in st.session_state:
        wanted = st.query_params.get(URL_SET)
        st.session_state[SAMPLE_SET_KEY] = wanted if wanted in sample_sets() else DEFAULT_SET
    return st.session_state[SAMPLE_SET_KEY]


def samples_root() -> Path:
    """The folder of the session's sample set (its adapters and its ``tasks/``)."""
    return samples_dir(current_set())


@st.cache_resource(show_spinner=False, max_entries=8)
def _sample_set(paths: tuple[str, ...], stamps: tuple[float, ...], root: str) -> tuple[AdapterSet, tuple[str, ...]]:
    """Load the sample adapters once per server; shared by every session (never changed: see
    :func:`fresh_sample_set`). ``st.cache_data`` would unpickle a copy of every tensor for each new
    session, 0.3 s of the server's time per visitor."""
    aset, errors = load_sample_set([Path(p) for p in paths], root)
    from ui import memory

    held = sum(memory.adapter_bytes(a) for a in aset.adapters)  # shared by every session: counted once
    memory.ledger().add_gauge(f"sample set {root} ({len(paths)} adapters)", lambda: held)
    return aset, tuple(errors)


def _folder_stamp(root: Path) -> tuple:
    """Modification times of ``root`` and of each folder in it: an adapter folder added, removed or
    renamed there, or an ``adapter_config.json`` written into one, changes one of them."""
    with os.scandir(root) as entries:
        inner = sorted((e.name, e.stat().st_mtime_ns) for e in entries if e.is_dir(follow_symlinks=False))
    return root.stat().st_mtime_ns, tuple(inner)


def sample_paths(root: Path | None = None) -> list[Path]:
    """The sample adapter folders under ``root``: the recursive search runs again only when the folders
    change (:func:`_folder_stamp`, looked at once per ``ui.cache.SAMPLE_PATHS_TTL`` seconds: the listing is
    kept in ``ui.cache.SAMPLE_PATHS``, a TTL cache, and per stamp in ``ui.cache.SAMPLE_LISTINGS``). It ran on
    every script run of every session before: 8 % of the server's script time under the soak's 8 visitors."""
    root = Path(root or samples_root())
    where = str(root)
    with cache.SAMPLE_LOCK:
        hit = cache.SAMPLE_PATHS.get(where)
        known = cache.SAMPLE_LISTINGS.get(where)
    if hit is not None:
        return list(hit)
    try:
        stamp = _folder_stamp(root)
    except OSError:
        return list_sample_adapters(root)
    paths = known[1] if known is not None and known[0] == stamp else list_sample_adapters(root)
    with cache.SAMPLE_LOCK:
        cache.SAMPLE_PATHS[where] = paths
        cache.SAMPLE_LISTINGS[where] = (stamp, paths)
    return list(paths)


def fresh_sample_set(names: list[str] | None = None, root: Path | None = None) -> tuple[AdapterSet, list[str]]:
    """The sample set (only ``names`` when given and any of them exist), plus load errors."""
    root = root or samples_root()
    paths = sample_paths(root)
    if names:
        wanted = [p for p in paths if sample_name(p, root) in set(names)]
        paths = wanted or paths
    stamps = tuple((p / "adapter_config.json").stat().st_mtime for p in paths)
    shared, errors = _sample_set(tuple(str(p) for p in paths), stamps, str(root))
    return shared.copy(), list(errors)  # the session's own set of the shared adapters


def adapter_set() -> AdapterSet:
    """The session's adapter set, created from the sample adapters (and the URL) on first use."""
    if SET_KEY not in st.session_state:
        named = [n for n in st.query_params.get_all(URL_ADAPTERS) if n]
        aset, errors = fresh_sample_set(named or None)
        st.session_state[SET_KEY] = aset
        st.session_state[ERRORS_KEY] = list(errors)
    return st.session_state[SET_KEY]


def _session_id() -> str | None:
    from streamlit.runtime.scriptrunner import get_script_run_ctx

    ctx = get_script_run_ctx()
    return None if ctx is None else ctx.session_id


def track_memory() -> str | None:
    """Count this session's uploads in the server's memory budget (``ui.memory``) on each script run, release
    idle sessions' uploads, and return the notice for a visitor whose uploads were released while away. Nothing
    where the budget is not enforced (a researcher's own machine)."""
    from ui import memory

    sid = _session_id()
    if sid is None or not memory.enforced():
        return None
    aset = adapter_set()
    uploads = [(n, a) for n, a in aset.items() if not aset.origin.get(n, "upload").startswith("sample:")]
    from streamlit.runtime.scriptrunner import get_script_run_ctx

    ss = get_script_run_ctx().session_state  # the session's own (lock-protected) state, for another thread

    names = [n for n, _ in uploads]  # the closure holds names, not the adapters it is to let go of

    def release() -> None:  # runs in another session's thread, while this one is idle
        aset.remove(names)
        live = ss["learned_run"] if "learned_run" in ss else None
        if live is not None and not live.run.running:
            del ss["learned_run"]  # it holds the adapters too
    book = memory.ledger()
    book.touch(sid, sum(memory.adapter_bytes(a) for _, a in uploads), names, release)
    del uploads
    try:
        from streamlit.runtime import Runtime, exists

        if exists():
            book.forget_ended(Runtime.instance().is_active_session)
    except Exception:  # noqa: BLE001  (no runtime: nothing ended)
        pass
    book.expire_idle()
    return book.notice(sid)


def replace_set(aset: AdapterSet) -> None:
    st.session_state[SET_KEY] = aset


def report(errors: list[str], notices: list[str] | None = None) -> None:
    """Queue load messages for the sidebar to show on this run."""
    st.session_state[ERRORS_KEY] = list(errors)
    st.session_state[NOTICES_KEY] = list(notices or [])


def messages() -> tuple[list[str], list[str]]:
    return list(st.session_state.get(ERRORS_KEY, [])), list(st.session_state.get(NOTICES_KEY, []))


def sync_url(aset: AdapterSet) -> None:
    """Write the sample adapters of the set to the URL (nothing when it is the full sample set)."""
    chosen = current_set()
    if chosen != DEFAULT_SET and sample_sets():
        if st.query_params.get(URL_SET) != chosen:
            st.query_params[URL_SET] = chosen
    elif URL_SET in st.query_params:
        del st.query_params[URL_SET]
    samples = aset.sample_names()
    root = samples_root()
    all_samples = [sample_name(p, root) for p in sample_paths(root)]
    if samples and samples != all_samples:
        if st.query_params.get_all(URL_ADAPTERS) != samples:
            st.query_params[URL_ADAPTERS] = samples
    elif URL_ADAPTERS in st.query_params:
        del st.query_params[URL_ADAPTERS]
