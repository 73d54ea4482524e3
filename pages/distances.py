"""Distances page: adapter x adapter distances per layer and projection, a 2-D map, layer profiles."""

from __future__ import annotations

from ui import require_app

require_app()  # first: a shared link opened first on a fresh server gets the app (and its loading page) around it

import itertools

import pandas as pd
import streamlit as st

from geometry.errors import AtlasError
from ui import compute, controls, downloads, figures, stop_page, views, warmup

st.title("Distances between adapters")
st.caption(
    "How far apart are the task vectors τ = s·B·A of two adapters, module by module? "
    "Computed once per adapter set; the controls below only re-slice."
)
controls.how_to_read(
    """
For each pair of adapters *i, j*, each layer *k* and each projection kind (query, value, ...),
the library measures one distance between their task vectors, giving the tensor **T_d(i, j, k)**.
The heatmap shows its mean over the layers you choose (**T̄_d**); the paper also uses the mean
over the last *k* layers (*k* = 5 of 12 correlated best with merge losses).

* **L2**: absolute position; too strict to be informative in the paper.
* **Cosine distance**: direction only, from 0 (same direction) to 2 (opposite).
* **Grassmann distance**: angle between the column spaces Im(τ1), Im(τ2): ignores scale and sign,
  suits low-rank updates. For adapters of **different ranks** r1 ≠ r2 there are min(r1, r2)
  principal angles, and the convention used is stated under the controls.
* **Factor**: BA is the task vector itself; *A alone* and *B alone* measure the down- and
  up-projections (the 2024 paper finds that B carries the task: clustering on B ≈ clustering on BA).

The 2-D map places adapters by the rows of T̄_d (PCA, classical MDS, or UMAP): nearby points have
similar distance profiles. Read distances from the heatmap; the map only shows the layout.
""",
    [
        r"d_{L2} = \lVert \tau_1 - \tau_2 \rVert_F \qquad d_{\cos} = 1 - \frac{\langle \tau_1, \tau_2\rangle_F}{\lVert\tau_1\rVert_F\,\lVert\tau_2\rVert_F}",
        r"d_G = \sqrt{\textstyle\sum_i \theta_i^2}, \quad \cos\theta_i = \sigma_i(Q_1^\top Q_2) \qquad \bar T_d(i,j) = \frac{1}{|K|}\sum_{k\in K} T_d(i,j,k)",
    ],
)

adapters = controls.compared_adapters()
names = [a.name for a in adapters]
dists = compute.distances(adapters, within=controls.comparable_set())
if not dists:
    st.warning("These adapters have no module in common.")
    stop_page()

@st.fragment(run_every=2)
def _await_umap() -> None:
    """While UMAP compiles in the background: a note, checked every 2 s, then a redraw with the UMAP map."""
    if warmup.umap_ready():
        st.rerun(scope="app")
    st.caption(":material/hourglass_top: UMAP is being compiled in the background (numba, once per installation; "
               "about a minute on 2 cores). Showing PCA until it is ready: the map switches by itself.")


def interference_view(kind: str, kind_label: str, stack: str, used, where: str) -> None:
    """TSV's task interference (Gargiulo et al. 2025) beside the distances: it is geometry too."""
    if not st.toggle("Task interference (TSV-M's singular-vector overlap) for these layers", key="interference",
                     bind=controls.URL):
        return
    score = controls.choice(st.segmented_control, "Interference score",
                            {"overlap": "subspace overlap", "sti": "STI"}, "overlap", "interference_score")
    if not used:
        st.info(f"No {kind} module in the chosen layers.")
        return
    try:
        frame = compute.interference(adapters, score, kind, used, stack)
    except AtlasError:
        st.info(f"No {kind} module in the chosen layers.")
        return
    matrix = frame.to_numpy(dtype=float)
    unit = "mean cos² of principal angles" if score == "overlap" else "STI (‖·‖₁)"
    st.caption(
        "Per module, each task's singular vectors U_t, V_t (exact, from the factors). **Subspace overlap** = "
        "(‖U_iᵀU_j‖²_F + ‖V_iᵀV_j‖²_F) / (2 min(r_i, r_j)): 1 when one task's spaces contain the other's, 0 when "
        "orthogonal (undefined for a zero task vector). **STI** (the paper's singular task interference, entry-wise "
        "L1) = ‖X S_j Yᵀ‖₁ + ‖Xᵀ S_i Y‖₁ with X = U_iᵀU_j, Y = V_iᵀV_j: it grows with the task vectors' size. "
        f"Mean over the {frame.attrs['modules']} {kind} module(s) of {where} (geometry.interference). Formula and code: geometry/merging/tsv.py."
    )
    fig = figures.matrix_heatmap(
        matrix, names, title=f"Task interference ({'subspace overlap' if score == 'overlap' else 'STI'}), "
        f"{kind_label} projections\n{where}", value_label=unit, detail=f"kind: {kind}<br>{where}",
        colorscale=figures.SIMILARITY if score == "overlap" else figures.SEQUENTIAL,
    )
    downloads.show(fig, f"interference_{score}_{kind}", views.matrix_frame(matrix, names, unit), index=True,
                   key="interference_heatmap")


@st.fragment
def view() -> None:
    """Everything below the adapter choice: a control here reruns only this part (not the sidebar)."""
    stacks = views.stacks_of(dists)
    with st.container(horizontal=True, gap="medium"):
        metric = controls.choice(st.segmented_control, "Metric", views.METRIC_LABELS, "cosine", "metric")
        factor = controls.choice(
            st.segmented_control, "Factor", views.FACTOR_LABELS, "ba", "factor",
        )
        stack = (
            st.selectbox("Stack", stacks, key="stack", bind=controls.URL, width=160) if len(stacks) > 1 else stacks[0]
        )
        kinds = views.kinds_of(dists, stack)
        kind = st.segmented_control(
            "Projection", kinds, default="v" if "v" in kinds else kinds[0], required=True, key="kind",
            bind=controls.URL,
        )
    kind_label = views.KIND_LABELS.get(kind, kind)
    # (No help= on URL-bound widgets: in Streamlit 1.67 it stops the widget from writing the URL.)
    st.caption(
        "Factor: BA is the task vector τ = s·B·A; A and B are the down- and up-projection factors alone. "
        "Projection: q = query, k = key, v = value, o = attention output; gate / up / down = MLP."
    )

    tensor = dists.get((metric, factor, stack, kind))
    if tensor is None:
        st.warning(f"No {metric} / {factor} distances for {stack} · {kind}.")
        stop_page()
    choice = controls.layer_control(tensor.layers)
    matrix, used = views.distance_matrix(tensor, choice)
    where = choice.describe(used)
    unit = views.METRIC_UNITS[metric]
    if metric == "grassmann":
        st.caption(f":material/info: Convention for different ranks: {tensor.convention}")
    undefined = [n for n in tensor.notes if "is zero" in n] + (tensor.coverage_notes(used) if used else [])
    if undefined:  # zero modules and partial means are named, never silently averaged away
        with st.container(border=True):
            st.markdown(":material/warning: **Undefined values in this view**")
            for note in undefined[:8]:
                st.caption(note)
            if len(undefined) > 8:
                st.caption(f"... and {len(undefined) - 8} more (in the CSV of the full table, as empty cells)")

    # each figure is kept per the content of the arguments it is built from (ui.figures.built)
    left, right = st.columns([3, 2] if len(names) > 6 else [1, 1])
    with left:
        fig = figures.built(
            figures.matrix_heatmap, matrix, names,
            title=f"{views.METRIC_LABELS[metric].capitalize()} distance, {kind_label} projections\n"
            f"factor {views.FACTOR_LABELS[factor]} · {where}",
            value_label=unit, detail=f"kind: {kind}<br>{where}",
        )
        downloads.show(fig, f"distance_{metric}_{factor}_{kind}_{choice.spec}", views.matrix_frame(matrix, names, unit),
                       index=True, key="heatmap")
    with right:
        method = controls.choice(
            st.segmented_control, "2-D map", {"pca": "PCA", "mds": "MDS", "umap": "UMAP"}, "pca", "map"
        )
        with st.spinner(f"{method.upper()} embedding..."):
            view_map = compute.adapter_map(matrix, names, method, fallback="pca")
        mapped, method = view_map.mapped, view_map.method
        if view_map.pending:
            _await_umap()  # the page redraws with UMAP once the compile is done
        elif view_map.note:
            st.caption(f":material/info: {view_map.note}")
        if mapped.message:
            st.warning(mapped.message, icon=":material/visibility_off:")
        fig_map = figures.built(
            figures.embedding_scatter, mapped.coords, mapped.names, method=method.upper(),
            detail=f"{views.METRIC_LABELS[metric]} · kind: {kind} · {where}",
            title=f"2-D map ({method.upper()}) of the distance rows\n{views.METRIC_LABELS[metric]} · {kind_label} · {where}",
        )
        frame = pd.DataFrame({"adapter": mapped.names, "x": mapped.coords[:, 0], "y": mapped.coords[:, 1]})
        if mapped.left_out:
            frame = pd.concat([frame, pd.DataFrame({"adapter": mapped.left_out, "x": float("nan"), "y": float("nan"),
                                                    "note": "left out: undefined distance"})], ignore_index=True)
        downloads.show(fig_map, f"map_{method}_{metric}_{factor}_{kind}_{choice.spec}", frame, key="map")

    st.subheader("Layer by layer")
    all_pairs = list(itertools.combinations(names, 2))
    if any(tuple(p) not in all_pairs for p in st.session_state.get("pairs") or []):
        del st.session_state["pairs"]  # the adapters compared changed: back to the default pairs at once
    chosen = st.multiselect("Pairs", all_pairs, default=all_pairs[: min(4, len(all_pairs))], key="pairs",
                            format_func=lambda p: f"{p[0]} ↔ {p[1]}")
    profile = views.pair_layer_frame(tensor, chosen)
    fig_lines = figures.built(
        figures.layer_lines, profile,
        title=f"{views.METRIC_LABELS[metric].capitalize()} distance per layer, {kind_label} projections\n"
        f"factor {views.FACTOR_LABELS[factor]} · one line per pair of adapters",
        value_label=unit,
    )
    downloads.show(fig_lines, f"layers_{metric}_{factor}_{kind}", profile, key="lines")

    qv = [k for k in ("q", "v") if (metric, factor, stack, k) in dists]
    side = st.toggle(
        "Query vs value side by side (the paper's Figure 3)", key="qv", bind=controls.URL, disabled=len(qv) < 2,
    )
    if side and len(qv) == 2:
        mats = {k: views.distance_matrix(dists[(metric, factor, stack, k)], choice)[0] for k in qv}
        fig_qv = figures.built(
            figures.side_by_side_heatmaps, mats, names,
            title=f"Query vs value: {views.METRIC_LABELS[metric]} distance (the paper's Figure 3)\n"
            f"factor {views.FACTOR_LABELS[factor]} · {where}",
            value_label=unit, detail=where,
        )
        long = pd.concat([views.matrix_frame(m, names, unit).assign(kind=k) for k, m in mats.items()])
        downloads.show(fig_qv, f"query_vs_value_{metric}_{factor}_{choice.spec}", long, index=True, key="qv")

    interference_view(kind, kind_label, stack, used, where)

    full = tensor.to_frame()
    with st.container(horizontal=True, vertical_alignment="center"):
        show_full = st.toggle("Full table T_d(i, j, k) for this metric, factor and kind", key="full_table")
        downloads.csv_button(full, f"T_{metric}_{factor}_{stack}_{kind}", label="CSV of the full table", key="csv_full")
    if show_full:  # drawn on demand: a large table costs every rerun
        st.dataframe(full, hide_index=True, height=260)


view()
