"""The shared sidebar: the session's adapter set, how to add to it, rename and remove."""

from __future__ import annotations

import html
import os
import re
from contextlib import contextmanager

import streamlit as st

from geometry.io.limits import limits
from ui import demo, state
from ui.adapter_set import UPLOAD_TYPES, load_hub_id, load_uploads, sample_sets, samples_dir

UPLOAD_COUNTER = "upload_generation"
NEWEST_KEY = "newest_adapters"


def _md(text: str) -> str:
    """``text`` shown literally in markdown (names like ``sentiment_movies_r16`` must not turn italic)."""

    return re.sub(r"([\\`*_{}\[\]()#+\-.!|~<>])", r"\\\1", html.escape(str(text), quote=False))


def _uploader_key() -> str:
    return f"upload_{st.session_state.get(UPLOAD_COUNTER, 0)}"


def on_upload() -> None:
    """Uploader callback: load every uploaded file, then reset the uploader for the next batch."""
    files = st.session_state.get(_uploader_key()) or []
    if not isinstance(files, list):
        files = [files]
    full = _room(state.adapter_set())
    if files and full:
        state.report([f"{', '.join(f.name for f in files)}: {full}"], [])
        st.session_state[UPLOAD_COUNTER] = st.session_state.get(UPLOAD_COUNTER, 0) + 1
        return
    aset = state.adapter_set()
    payload = [(f.name, f.getvalue()) for f in files]
    st.session_state[UPLOAD_COUNTER] = st.session_state.get(UPLOAD_COUNTER, 0) + 1  # a fresh uploader next run
    _drop_raw_uploads(files)
    with _budgeted(payload) as refused:
        if refused:
            state.report([refused], [])
            return
        added, errors = load_uploads(aset, payload)
    st.session_state[NEWEST_KEY] = added
    state.report(errors, [f"loaded {n}" for n in added])


def _drop_raw_uploads(files) -> None:
    """Let Streamlit's upload manager forget the raw bytes of ``files`` once read: it keeps every uploaded file
    until the browser deletes it or the session ends (Streamlit 1.67 has no clean-up of a file uploader that is
    no longer drawn), so a visitor uploading 48 files of 16 MB held 770 MB of bytes already loaded or refused."""
    from streamlit.runtime.scriptrunner import get_script_run_ctx

    ctx = get_script_run_ctx()
    if ctx is None or ctx.uploaded_file_mgr is None:
        return
    for f in files:
        file_id = getattr(f, "file_id", None)
        if file_id:
            ctx.uploaded_file_mgr.remove_file(session_id=ctx.session_id, file_id=file_id)


@contextmanager
def _budgeted(payload):
    """Admit an upload into the server's memory budget (``ui.memory``; where it is enforced): yields ``None``,
    or the message saying why it was refused. The reservation is replaced by the session's real holding on the
    next script run."""
    from ui import memory

    if not memory.enforced() or state._session_id() is None:
        yield None
        return
    sid, need = state._session_id(), memory.upload_size(payload)
    label = ", ".join(name for name, _ in payload)
    with memory.LOAD_LOCK:  # one upload decoded at a time: its transient copies are not multiplied by visitors
        try:
            memory.ledger().admit(sid, need, label)
        except memory.OverBudget as exc:
            yield str(exc)
            return
        try:
            yield None
        finally:
            memory.ledger().cancel(sid, need)
            state.track_memory()  # what the session holds now (the upload loaded or not)


def _demo_upload_mb() -> int | None:
    if not demo.demo_mode():
        return None

    return max(1, limits().max_upload_bytes // 2**20)


def _room(aset) -> str | None:
    """Why no more adapters fit in this session's set (a demo server's cap), or ``None``."""
    cap = demo.caps().max_adapters
    if cap is not None and len(aset) >= cap:
        return f"this demo server keeps at most {cap} adapters per session: remove some first"
    return None


def on_hub() -> None:
    aset = state.adapter_set()
    repo_id = st.session_state.get("hub_id", "").strip()
    ok, why = demo.hub_allowed(repo_id)
    full = _room(aset)
    if not ok or full:
        state.report([f"{repo_id or 'hub'}: {why or full}"], [])
        return
    with _budgeted([(repo_id, b"")]) as refused:  # its size is known after the download: admitted when not full
        if refused:
            state.report([refused], [])
            return
        added, errors = load_hub_id(aset, repo_id)
    st.session_state[NEWEST_KEY] = added
    state.report(errors, [f"loaded {n}" for n in added])


def on_rename() -> None:
    aset = state.adapter_set()
    old, new = st.session_state.get("rename_from"), st.session_state.get("rename_to", "")
    try:
        name = aset.rename(old, new)
        state.report([], [f"renamed {old} to {name}"])
        st.session_state["rename_to"] = ""
    except ValueError as exc:
        state.report([str(exc)])


def on_remove() -> None:
    aset = state.adapter_set()
    gone = list(st.session_state.get("remove_names") or [])
    aset.remove(gone)
    st.session_state["remove_names"] = []
    state.report([], [f"removed {', '.join(gone)}"] if gone else [])


def on_switch_set() -> None:
    """Sample set picked in the sidebar: its adapters replace the previous set's samples; uploads and hub
    adapters stay, and task-folder fields that pointed at the previous set's tasks follow the new one."""
    old = st.session_state.get(state.SAMPLE_SET_KEY)
    new = st.session_state.get("sample_set_choice") or old
    if new == old:
        return
    old_tasks = str(samples_dir(old) / "tasks")
    for key in [k for k, v in st.session_state.items() if isinstance(v, str) and v == old_tasks]:
        del st.session_state[key]
    st.session_state[state.SAMPLE_SET_KEY] = new
    aset, errors = state.fresh_sample_set()
    kept = state.adapter_set()
    for name, adapter in kept.items():
        origin = kept.origin.get(name, "upload")
        if not origin.startswith("sample:"):
            aset.add(adapter, origin=origin, name=name)
    state.replace_set(aset)
    state.report(errors, [f"sample set: {sample_sets().get(new, new)}"])


def on_reset() -> None:
    aset, errors = state.fresh_sample_set()
    state.replace_set(aset)
    state.report(errors, ["back to the sample adapters"])


def render() -> None:
    """Draw the sidebar; the adapter set is read with :func:`ui.state.adapter_set`."""
    aset = state.adapter_set()
    sb = st.sidebar
    sb.markdown("### Adapter set")
    sets = sample_sets()
    if len(sets) > 1:
        current = state.current_set()
        st.session_state["sample_set_choice"] = current
        sb.selectbox("Sample set", list(sets), format_func=sets.get, key="sample_set_choice", on_change=on_switch_set,
                     help="The bundled sample adapters and their tasks. Real tasks: LoRA adapters trained on GLUE "
                          "(SST-2, CoLA, MRPC, RTE, QNLI, STS-B), AG News and emotion on all-MiniLM-L6-v2; SmolLM2-135M: "
                          "LoRA adapters of a causal language model (SmolLM2-135M-Instruct) that generate the label "
                          "word of five GLUE tasks or the answer of BoolQ, ARC-Easy and OpenBookQA; synthetic: "
                          "template-grammar tasks. Switching keeps your uploads.")
    released = state.track_memory()
    if released:
        sb.warning(released, icon=":material/memory:")
    errors, notices = state.messages()
    for message in errors:
        sb.error(message, icon=":material/error:")
    for message in notices:
        sb.caption(message)
    state.report([], [])  # shown once

    if len(aset):
        summary = aset.summary()
        if summary["base"].nunique(dropna=False) == 1:
            sb.caption(f"Base model of every adapter: **{_md(summary['base'].iloc[0])}**")
        # A wrapped list, not a table: every name is shown whole (four sentiment_... names stay apart); one
        # line per adapter, all in view up to 20 adapters (beyond, the list scrolls and new uploads come first).
        newest = set(st.session_state.get(NEWEST_KEY) or [])
        common = summary["base"].mode().iloc[0] if len(summary) else ""
        lines = []
        for row in summary.itertuples(index=False):
            mark = " :material/fiber_new:" if row.name in newest else ""
            base = f" · base {_md(str(row.base))}" if row.base != common else ""
            lines.append(f"**{_md(row.name)}**{mark} <small>r {row.r} · α {row.alpha:g}{base}</small>")
        if len(lines) > 20:
            lines = [ln for ln in lines if ":material/fiber_new:" in ln] + [ln for ln in lines if "fiber_new" not in ln]
        box = sb.container(height=40 + 24 * 20, border=True) if len(lines) > 20 else sb.container(border=True)
        box.markdown("  \n".join(lines), unsafe_allow_html=True)
        sb.caption("Targets, modules and parameters: the Overview page.")
    else:
        sb.info("No adapters loaded. Upload some below or reset to the samples.")

    with sb.expander("Add adapters", expanded=False):
        st.file_uploader(
            "Upload .zip files (one adapter each), an adapter_config.json with its weights, or kohya / diffusers "
            ".safetensors LoRAs (one adapter each)",
            type=list(UPLOAD_TYPES),
            accept_multiple_files=True,
            key=_uploader_key(),
            on_change=on_upload,
            help="A peft adapter folder zipped, or adapter_config.json + adapter_model.safetensors (or .bin).",
            # a demo server's cap, refused by the browser before the upload (the library checks again)
            max_upload_size=_demo_upload_mb(),
        )
        if demo.demo_mode():

            cap = demo.caps().max_adapters
            st.caption(f":material/speed: Demo server: uploads up to {limits().max_upload_bytes // 2**20} MB each "
                       f"(uncompressed), {cap} adapters per session; they stay in this session's memory and go "
                       "when you close the tab.")
        if demo.hub_allowed("")[0] or os.environ.get(demo.HUB_ALLOW_ENV):
            st.text_input("Hugging Face hub id", key="hub_id", placeholder="owner/name")
            st.button("Load from hub", on_click=on_hub, width="stretch")
        else:
            st.caption(":material/cloud_off: Hub downloads are off on this demo server.")

    if len(aset):
        with sb.expander("Rename or remove", expanded=False):
            st.selectbox("Adapter", aset.names, key="rename_from")
            st.text_input("New name", key="rename_to")
            st.button("Rename", on_click=on_rename, width="stretch")
            st.multiselect("Remove adapters", aset.names, key="remove_names")
            st.button("Remove", on_click=on_remove, width="stretch", disabled=False)
    sb.button("Reset to the sample adapters", on_click=on_reset, width="stretch")
    state.sync_url(aset)
