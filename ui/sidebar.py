"""The shared sidebar: the session's adapter set, how to add to it, rename and remove."""

from __future__ import annotations

import streamlit as st

from ui import state
from ui.adapter_set import UPLOAD_TYPES, load_hub_id, load_uploads

UPLOAD_COUNTER = "upload_generation"


def _uploader_key() -> str:
    return f"upload_{st.session_state.get(UPLOAD_COUNTER, 0)}"


def on_upload() -> None:
    """Uploader callback: load every uploaded file, then reset the uploader for the next batch."""
    files = st.session_state.get(_uploader_key()) or []
    if not isinstance(files, list):
        files = [files]
    aset = state.adapter_set()
    added, errors = load_uploads(aset, [(f.name, f.getvalue()) for f in files])
    state.report(errors, [f"loaded {n}" for n in added])
    st.session_state[UPLOAD_COUNTER] = st.session_state.get(UPLOAD_COUNTER, 0) + 1


def on_hub() -> None:
    aset = state.adapter_set()
    added, errors = load_hub_id(aset, st.session_state.get("hub_id", ""))
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


def on_reset() -> None:
    aset, errors = state.fresh_sample_set()
    state.replace_set(aset)
    state.report(errors, ["back to the sample adapters"])


def render() -> None:
    """Draw the sidebar; the adapter set is read with :func:`ui.state.adapter_set`."""
    aset = state.adapter_set()
    sb = st.sidebar
    sb.markdown("### Adapter set")
    errors, notices = state.messages()
    for message in errors:
        sb.error(message, icon=":material/error:")
    for message in notices:
        sb.caption(message)
    state.report([], [])  # shown once

    if len(aset):
        summary = aset.summary()
        if "base" in summary.columns and summary["base"].nunique(dropna=False) == 1:
            sb.caption(f"Base model of every adapter: **{summary['base'].iloc[0]}**")
            summary = summary.drop(columns=["base"])  # one base: say it once, keep the table narrow
        # Narrow: full names, rank and alpha (targets, modules and parameters are on the Overview page);
        # tall enough for every row, so a new upload (appended last) stays in view.
        shown = summary[[c for c in ("name", "base", "r", "alpha") if c in summary.columns]]
        sb.dataframe(
            shown,
            hide_index=True,
            width="stretch",
            height=min(38 + 35 * len(shown), 38 + 35 * 16),
            column_config={
                "name": st.column_config.TextColumn("name", width="large", help="display name (rename below)"),
                "base": st.column_config.TextColumn("base", width="small"),
                "r": st.column_config.NumberColumn("r", width=32),
                "alpha": st.column_config.NumberColumn("α", width=40, format="%g"),
            },
        )
        sb.caption("Targets, modules and parameters: the Overview page.")
    else:
        sb.info("No adapters loaded. Upload some below or reset to the samples.")

    with sb.expander("Add adapters", expanded=False):
        st.file_uploader(
            "Upload .zip files (one adapter each) or an adapter_config.json with its weights",
            type=list(UPLOAD_TYPES),
            accept_multiple_files=True,
            key=_uploader_key(),
            on_change=on_upload,
            help="A peft adapter folder zipped, or adapter_config.json + adapter_model.safetensors (or .bin).",
        )
        st.text_input("Hugging Face hub id", key="hub_id", placeholder="owner/name")
        st.button("Load from hub", on_click=on_hub, width="stretch")

    if len(aset):
        with sb.expander("Rename or remove", expanded=False):
            st.selectbox("Adapter", aset.names, key="rename_from")
            st.text_input("New name", key="rename_to")
            st.button("Rename", on_click=on_rename, width="stretch")
            st.multiselect("Remove adapters", aset.names, key="remove_names")
            st.button("Remove", on_click=on_remove, width="stretch", disabled=False)
    sb.button("Reset to the sample adapters", on_click=on_reset, width="stretch")
    state.sync_url(aset)
