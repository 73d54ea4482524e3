"""Widgets shared by the pages: adapter choice, layer control, "how to read this" notes.

Widgets that describe the view are bound to the URL (``bind="query-params"``): their key is the
query parameter, so a copied link reopens the same metric, kind and layers.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import streamlit as st

from geometry.errors import AtlasError
from geometry.evaluation.tasks import TaskLoadError, load_task, write_uploaded_task
from geometry.merging.params import choices, default
from geometry.types import Adapter
from ui import compute, state, stop_page
from ui.views import LAYER_MODES, LayerChoice

URL = "query-params"


def how_to_read(markdown: str, formulas: Sequence[str] = ()) -> None:
    """A collapsed "How to read this" note: plain words first, then the formulas."""
    with st.expander("How to read this", icon=":material/help:"):
        st.markdown(markdown)
        for formula in formulas:
            st.latex(formula)


def compared_adapters(key: str = "compare", min_count: int = 2, label: str = "Adapters compared",
                      max_default: int | None = None, max_count: int | None = None) -> list[Adapter]:
    """Multiselect of the set's adapters to compare (default: the largest group on one base model).

    Stops the page with a specific message when fewer than ``min_count`` are chosen or when the
    library finds them incompatible (``IncompatibleAdaptersError``: different bases or shapes).
    ``max_count``: at most this many (a demo server's cap, :mod:`ui.demo`), said on the page.
    """
    aset = state.adapter_set()
    if len(aset) < min_count:
        st.info(f"This page needs at least {min_count} adapters in the set (sidebar: Add adapters).")
        stop_page()
    default = compute.compatible_default(aset.adapters)
    if max_default is not None:
        default = default[:max_default]
    if key in st.session_state and not all(n in aset for n in st.session_state[key] or []):
        del st.session_state[key]  # an adapter was removed or renamed: back to the default choice
    chosen = st.multiselect(
        label,
        aset.names,
        default=default,
        key=key,
        bind=URL,
    )
    full = compute.compatible_default(aset.adapters)
    others = [n for n in aset.names if n not in full and n not in chosen]
    if others:
        bases = {n: str(aset[n].config.base_model_name_or_path or "no base declared").rstrip("/").split("/")[-1]
                 for n in others}
        by_base: dict[str, list[str]] = {}
        for n, b in bases.items():
            by_base.setdefault(b, []).append(n)
        detail = "; ".join(f"{', '.join(ns)} (base {b})" for b, ns in by_base.items())
        st.caption(f":material/block: Not compared, on another base model than the others: {detail}.")
    if len(chosen) < min_count:
        st.info(f"Choose at least {min_count} adapters.")
        stop_page()
    if max_count is not None and len(chosen) > max_count:
        st.warning(f"This demo server merges at most {max_count} adapters at once: using the first {max_count} "
                   f"({', '.join(chosen[:max_count])}).", icon=":material/speed:")
        chosen = chosen[:max_count]
    adapters = aset.subset(chosen)
    try:
        notes = compute.check(adapters)
    except AtlasError as exc:
        st.error(str(exc), icon=":material/error:")
        stop_page()
    if notes:
        with st.expander(f"{len(notes)} note(s) on comparing these adapters", icon=":material/warning:"):
            for note in notes:
                st.markdown(f"- {note}")
    else:
        st.caption("Adapters must share a base model (same module shapes) to be compared.")
    return adapters


def task_data(key: str, help: str, uploads: bool = False) -> str | None:
    """The folder of task data a page scores on: a typed path on a local server, one of the bundled task
    sets on a demo server (``ui.demo``: no page reads a path a visitor typed), or, with ``uploads``, test
    files the visitor uploads (one per task, written to a content-addressed temporary folder; see
    :func:`uploaded_tasks`). ``None`` when there is none."""
    from ui import demo
    from ui.state import samples_root

    sources = ["Bundled with this demo" if demo.demo_mode() else "Folder on this server"]
    if uploads:
        sources.append("Upload test files")
    source = (st.segmented_control("Task data from", sources, default=sources[0], required=True, key=f"{key}_source")
              if len(sources) > 1 else sources[0])
    if source == "Upload test files":
        return uploaded_tasks(key)
    if not demo.demo_mode():
        return st.text_input("Task data folder", value=str(samples_root() / "tasks"), key=key, help=help)
    sets = demo.bundled_task_sets(samples_root())
    if not sets:
        st.warning("This demo server has no bundled task data: scoring is off.", icon=":material/warning:")
        return None
    label = st.selectbox("Task data (bundled with this demo)", list(sets), key=key,
                         help=help + " On this demo server only the bundled task sets can be used.")
    return str(sets[label])


#: where uploaded test files become task folders (one folder per upload set, named by its content hash)
UPLOADED_TASKS_ROOT = "adapter-atlas-tasks"
#: uploaded task folders older than this are removed when a new set is written (seconds)
UPLOADED_TASKS_TTL = 24 * 3600


def uploaded_tasks(key: str) -> str | None:
    """Labeled test files uploaded by the visitor, one per task, as a folder of task folders.

    Each file ``<task or adapter name>.jsonl`` / ``.csv`` (``text`` [, ``text_pair``], ``label``) is
    checked by :func:`geometry.evaluation.tasks.write_uploaded_task` (a bad file gets one message and is left out;
    the session keeps everything else). The folder is named by the SHA-256 of the files, under the
    system's temporary directory: it holds only what was uploaded, is never read from a typed path,
    and folders older than a day are removed when another set is written.
    """

    from ui import demo

    files = st.file_uploader(
        "Test files, one per task (named after the adapter or its task)", type=["jsonl", "csv", "tsv"],
        accept_multiple_files=True, key=f"{key}_files", max_upload_size=20 if demo.demo_mode() else None,
        help="Columns text [, text_pair], label: the class index of the adapter's head (0 .. C-1), or a label "
             "name of the bundled task of the same name.",
    )
    if not files:
        st.info("Upload one labeled test file per adapter to score the merges.", icon=":material/upload:")
        return None
    digest = hashlib.sha256()
    for f in sorted(files, key=lambda f: f.name):
        digest.update(f.name.encode() + b"\0" + hashlib.sha256(f.getvalue()).digest())
    root = Path(tempfile.gettempdir()) / UPLOADED_TASKS_ROOT
    folder = root / digest.hexdigest()[:32]
    bundled = {name: p for name, p in demo.bundled_task_sets().items()}
    good = 0
    for f in files:
        stem = Path(f.name).stem
        if not stem or stem.startswith(".") or Path(stem).name != stem:
            st.error(f"{f.name}: not a usable task name", icon=":material/error:")
            continue
        labels = next((p / stem / "labels.json" for p in bundled.values() if (p / stem / "labels.json").is_file()), None)
        try:
            done = (folder / stem / "test.jsonl").is_file()  # content-addressed: written by an earlier rerun
            task = load_task(folder / stem) if done else write_uploaded_task(f.getvalue(), f.name, folder / stem, labels)
        except TaskLoadError as exc:
            shutil.rmtree(folder / stem, ignore_errors=True)
            st.error(str(exc), icon=":material/error:")
            continue
        good += 1
        st.caption(f":material/check: {f.name}: {len(task)} test examples, {len(task.label_names)} classes "
                   f"({', '.join(task.label_names[:6])}{', ...' if len(task.label_names) > 6 else ''})"
                   + (" from the bundled label list" if labels is not None else ""))
    now = time.time()
    for old in root.iterdir() if root.is_dir() else ():
        if old != folder and now - old.stat().st_mtime > UPLOADED_TASKS_TTL:
            shutil.rmtree(old, ignore_errors=True)
    return str(folder) if good else None


def demo_caps_note() -> None:
    """The demo server's compute caps, in one caption (nothing outside demo mode)."""
    from ui import demo

    text = demo.caps().describe()
    if text:
        st.caption(f":material/speed: {text}")


def comparable_set() -> list[Adapter]:
    """The session's adapters on the most common base (the default comparison): results for this set
    are computed once and sliced when a page compares a subset of it (see ``compute.distances``)."""
    aset = state.adapter_set()
    return aset.subset(compute.compatible_default(aset.adapters))


def choice(widget, label: str, labels: dict[str, str], default: str, key: str, **kwargs) -> str:
    """A URL-bound choice among ``labels`` (code -> label) that returns the code.

    The options are the labels themselves (no ``format_func``): a bound widget writes and reads
    the *displayed* option in the URL, so short labels keep links readable (``?metric=Grassmann``).
    """
    by_label = {v: k for k, v in labels.items()}
    options = list(by_label)
    if widget is st.selectbox:
        kwargs["index"] = list(labels).index(default)
    else:
        kwargs["default"] = labels[default]
        if widget is st.segmented_control:
            kwargs.setdefault("required", True)
    picked = widget(label, options, key=key, bind=URL, **kwargs)
    return by_label.get(picked, default)


def layer_control(layers: Sequence[int], key: str = "layers") -> LayerChoice:
    """Pick one layer, a range, all layers or the last k (``T_d`` is averaged over the choice)."""
    layers = sorted(int(v) for v in layers)
    if not layers:
        return LayerChoice("all")
    lo, hi = layers[0], layers[-1]
    modes = list(LAYER_MODES) if hi > lo else ["all"]
    with st.container(horizontal=True, gap="medium", vertical_alignment="bottom"):
        mode = choice(st.segmented_control, "Layers", {m: LAYER_MODES[m] for m in modes}, "all", key)
        if mode == "one":
            layer = st.select_slider("Layer", options=layers, value=hi, key="layer", bind=URL, width=320)
            return LayerChoice("one", layer=layer)
        if mode == "range":
            start, stop = st.select_slider(
                "Layer range", options=layers, value=(lo, hi), key="layer_range", bind=URL, width=320
            )
            return LayerChoice("range", start=start, stop=stop)
        if mode == "last":
            k = st.slider(
                "k (last layers)", 1, len(layers), value=min(5, len(layers)), key="last_k", bind=URL, width=320
            )
            return LayerChoice("last", k=k)
    return LayerChoice("all")


def merge_param(method: str, param, key: str):
    """A widget for one merge parameter (:data:`geometry.merging.params.PARAMS`), defaulting to the method's own."""
    from geometry.merging import MERGE_METHODS

    label = param.name.replace("_", " ").capitalize()
    value = default(MERGE_METHODS[method], param.name)
    if param.kind == "bool":
        return st.checkbox(label, value=bool(value), key=key, help=param.help)
    if param.kind == "choice":
        options = choices(method, param.name)
        return st.selectbox(label, options, index=options.index(value), key=key, help=param.help)
    if param.kind == "int":
        return int(st.number_input(label, int(param.low), int(param.high), int(value), key=key, help=param.help))
    number = st.number_input(label, float(param.low), float(param.high), None if value is None else float(value),
                             step=0.01, key=key, help=param.help, format="%.3g", placeholder="method default")
    return None if number is None else float(number)


def take_merge(method: str, params: dict, names) -> None:
    """``on_click`` of the advisor's "Use the recommended merge": the Merge page's method, weights, density and
    other parameter widgets set to ``method`` / ``params`` (a merge's ``params``: weights, density, alpha...)."""
    from geometry.merging.params import PARAMS

    st.session_state["merge_method"] = method
    weights = params.get("weights")
    numeric = isinstance(weights, (list, tuple)) and len(weights) == len(names) and all(
        isinstance(w, (int, float)) for w in weights)
    st.session_state["merge_weights"] = ", ".join(f"{float(w):.6g}" for w in weights) if numeric else ""
    for name, value in params.items():
        if name == "density" and value is not None:
            st.session_state[f"merge_density_{method}"] = float(value)
        elif name in PARAMS and name not in ("density", "seed", "rank", "keep_dense") and value is not None:
            st.session_state[f"merge_{name}_{method}"] = value
