"""Survey page: a survey of many adapters (``python -m geometry survey``), or one run on the session's set."""

from __future__ import annotations

from ui import require_app

require_app()  # first: a shared link opened first on a fresh server gets the app (and its loading page) around it

import numpy as np
import pandas as pd
import streamlit as st

from geometry import survey as sv
from geometry.errors import AtlasError
from ui import compute, controls, demo, downloads, runs, state, stop_page, views
from ui.figures import survey as survey_figures

st.title("Survey: geometry over many adapters")
st.caption(
    "Hundreds of adapters on one base, or every checkpoint of a run: every distance between every pair, "
    "module by module, computed out of core (`python -m geometry survey DIR --out results.parquet`)."
)
controls.how_to_read(
    """
A survey file holds one row per pair of adapters and per module (layer x projection) with every
metric (L2, cosine and Grassmann on the task vector BA, on B alone and on A alone). This page
averages the chosen metric over the chosen projection kinds' modules (undefined values, e.g. a
module whose B = 0, are skipped and counted; a pair undefined everywhere stays undefined, never 0).

* **Nearest neighbours** of one adapter by that mean.
* **Heatmap** ordered by hierarchical clustering (average linkage): blocks on the diagonal are groups
  of similar adapters.
* **2-D map** (classical MDS or UMAP of the distance matrix), one colour per base model.
""",
)

SOURCES = {"file": "Open a survey", "run": "Run on this session's adapters"}
source = controls.choice(st.segmented_control, "Source", SOURCES, "file", "survey_source")
path = None
if source == "file":
    upload = st.file_uploader("Survey file (.parquet, written by Survey.save or downloaded from this page)",
                              type=["parquet"], key="survey_upload")
    typed = "" if demo.demo_mode() else st.text_input(
        "Or a survey folder / file on this server", key="survey_path",
        placeholder="results.parquet (the folder written by python -m geometry survey)")
    try:
        if upload is not None:
            path = compute.saved_survey_upload(upload.getvalue())
        elif typed.strip():
            path = typed.strip()
    except AtlasError as exc:
        st.error(str(exc))
        stop_page()
else:
    adapters = state.adapter_set().adapters
    if len(adapters) < 2:
        st.info("A survey needs at least 2 adapters in the set (sidebar: Add adapters).")
        stop_page()
    st.caption(f"{len(adapters)} adapters in this session; the survey is written under the app's cache and "
               "resumes where a cancelled run stopped.")
    if st.button(f"Run the survey on the {len(adapters)} adapters", key="survey_run", icon=":material/play_arrow:"):
        try:
            with runs.progress_bar("Surveying modules") as update, runs.queued(update):
                st.session_state["survey_run_path"] = str(compute.run_survey_on(adapters, progress=update))
        except AtlasError as exc:
            st.error(str(exc))
            stop_page()
    path = st.session_state.get("survey_run_path")

if not path:
    st.info("Open a survey file, or run one on the session's adapters.")
    stop_page()
try:
    survey = compute.open_survey(path)
except AtlasError as exc:
    st.error(str(exc))
    stop_page()

info = survey.adapters
mods = compute.survey_modules(survey)
n_all = len(info)
st.caption(f"{n_all} adapters · {len(mods)} modules · {n_all * (n_all - 1) // 2} pairs per module · `{survey.path}`")


@st.fragment
def view() -> None:
    with st.container(horizontal=True, gap="medium"):
        bases = sorted({str(b or "not declared") for b in info["base"]})
        pick_bases = st.multiselect("Base model", bases, key="survey_bases", placeholder="all bases")
        ranks = sorted({int(r) for r in info["r"]})
        pick_ranks = st.multiselect("Rank r", ranks, key="survey_ranks", placeholder="all ranks")
        targets = sorted({t for ts in info["target_modules"] for t in (ts or [])})
        pick_targets = st.multiselect("Target modules (all of)", targets, key="survey_targets", placeholder="any")
    with st.container(horizontal=True, gap="medium"):
        metric = controls.choice(st.segmented_control, "Metric", views.METRIC_LABELS, "grassmann", "survey_metric")
        factor = controls.choice(st.segmented_control, "Factor", views.FACTOR_LABELS, "ba", "survey_factor")
        kinds_all = list(dict.fromkeys(mods.sort_values(["layer"])["kind"]))
        kinds = st.multiselect("Projection kinds averaged", kinds_all, key="survey_kind", placeholder="all kinds")
    column = f"{metric}_{factor}"
    names_all = survey.names
    keep = sv.filter_adapters(info, bases=pick_bases, ranks=pick_ranks, targets=pick_targets)
    if len(keep) < 2:
        st.warning(f"{len(keep)} adapter(s) match these filters; at least 2 are needed.")
        return
    values_all, counts_all = compute.survey_matrix(survey, column, kinds or None)
    idx = [names_all.index(n) for n in keep]
    values, counts = values_all[np.ix_(idx, idx)], counts_all[np.ix_(idx, idx)]
    kinds_text = ", ".join(kinds) if kinds else "all kinds"
    label = f"{views.METRIC_LABELS[metric]} distance on {views.FACTOR_LABELS[factor]}"
    where = f"mean over the modules of {kinds_text}"
    undefined = int(np.isnan(values).sum() // 2)
    st.caption(f"{len(keep)} of {n_all} adapters shown · {label} · {where}"
               + (f" · :material/warning: {undefined} pair(s) undefined at every module (shown empty)"
                  if undefined else ""))

    st.subheader("Nearest neighbours")
    with st.container(horizontal=True, gap="medium", vertical_alignment="bottom"):
        who = st.selectbox("Adapter", keep, key="survey_who", width=320)
        k = st.number_input("k", min_value=1, max_value=max(1, len(keep) - 1), value=min(10, len(keep) - 1),
                            key="survey_k", width=120)
    table = sv.nearest(values, counts, keep, who, int(k))
    st.dataframe(table, hide_index=True, height=min(400, 38 + 35 * len(table)),
                 column_config={"distance": st.column_config.NumberColumn(format="%.5g")})
    downloads.csv_button(table, f"neighbours_{who}_{column}", label="CSV of the neighbours", key="csv_neighbours")

    order, _ = sv.cluster_order(values)
    ordered = [keep[i] for i in order]
    fig = survey_figures.survey_heatmap(
        values[order][:, order], ordered, title=f"{label[0].upper() + label[1:]}, ordered by hierarchical clustering\n"
        f"{len(keep)} adapters · {where}", value_label=label, detail=where)
    matrix_frame = pd.DataFrame(values, index=pd.Index(keep, name="adapter"), columns=keep)
    downloads.show(fig, f"survey_heatmap_{column}", matrix_frame, index=True, key="survey_heatmap")

    method = controls.choice(st.segmented_control, "2-D map", {"mds": "MDS", "umap": "UMAP"}, "mds", "survey_map")
    view_map = compute.adapter_map(values, keep, method, fallback="mds")
    mapped, method = view_map.mapped, view_map.method
    if view_map.note:
        st.caption(f":material/{'hourglass_top' if view_map.pending else 'info'}: {view_map.note}")
    if mapped.message:
        st.warning(mapped.message, icon=":material/visibility_off:")
    base_of = {row.name: str(row.base or "not declared") for row in info.itertuples()}
    fig_map = survey_figures.survey_scatter(
        mapped.coords, mapped.names, [base_of[n] for n in mapped.names], method=method.upper(),
        title=f"2-D map ({method.upper()}) of the {label}\n{len(mapped.names)} adapters · {where} · "
        "colour: base model",
        detail=where)
    frame = pd.DataFrame({"adapter": mapped.names, "x": mapped.coords[:, 0], "y": mapped.coords[:, 1],
                          "base": [base_of[n] for n in mapped.names]})
    downloads.show(fig_map, f"survey_map_{method}_{column}", frame, key="survey_map_fig")

    st.download_button(":material/download: The survey (.parquet, every pair, module and metric)",
                       survey.to_bytes, file_name="survey.parquet", mime="application/octet-stream",
                       key="survey_download", on_click="ignore")


view()
