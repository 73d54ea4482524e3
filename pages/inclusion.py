"""Inclusion page: does adapter 1's update span what adapter 2 learned? (spectral inclusion, TALN 2025)."""

from __future__ import annotations

from ui import require_app

require_app()  # first: a shared link opened first on a fresh server gets the app (and its loading page) around it

import itertools

import pandas as pd
import streamlit as st

from geometry.analysis.inclusion_summary import (
    entropy_table,
    inclusion_curves,
    inclusion_margins,
    inclusion_means,
)
from geometry.analysis.stats import ttest
from geometry.types import ordered_kinds
from ui import compute, controls, downloads, figures, views

st.title("Spectral inclusion")
st.caption("τ1 → τ2: project τ2 on the singular basis of τ1 and compare the two spectra, module by module.")
controls.how_to_read(
    """
"Does the model fine-tuned on task 1 encode information about task 2?" Write **τ1 = U·diag(S1)·Vᵀ**
(its singular value decomposition, r non-zero values) and project **τ2** on the same singular
directions: **S2** is the best non-negative spectrum on τ1's basis (closed form; the paper used Adam).
The notation **τ1 → τ2** reads *from 1, project 2*; it is **asymmetric**, so both directions are shown.

* **REC** (0 to 1): overlap of the two sum-normalized spectra; **1** = τ2 puts its weight on τ1's
  directions in the same proportions. Higher = more inclusion.
* **L1** = ‖S1 − S2‖₁ on the raw spectra (units of τ); lower = closer. The sum-normalized variant is
  offered too (then L1 = 2·(1 − REC)).
* **H(S)**: normalized Shannon entropy of a spectrum, 0 (one direction) to 1 (all equal).
* **λ** adds a sparsity penalty λ‖S‖₁ to the projection (soft threshold); λ = 0 is the plain projection.
* The **t-tests** compare the per-module values of two projections (the paper's Table 5), e.g.
  REC(τa → τb) against REC(τa → τc): two-sided, and one-sided in each direction.
""",
    [
        r"S_2 = \arg\min_{S \ge 0} \lVert U\,\mathrm{diag}(S)\,V^\top - \tau_2 \rVert_F + \lambda \lVert S\rVert_1"
        r"\quad(\lambda = 0:\ S_{2,i} = \max(0,\ u_i^\top \tau_2 v_i))",
        r"\mathrm{REC}(S_1,S_2) = \sum_i \min\Big(\frac{S_{1,i}}{\sum S_1}, \frac{S_{2,i}}{\sum S_2}\Big)"
        r"\qquad H(S) = -\frac{1}{\log r}\sum_i p_i \log p_i,\ p = S/\textstyle\sum S",
    ],
)

adapters = controls.compared_adapters()
names = [a.name for a in adapters]
by_name = dict(zip(names, adapters))

c1, c2 = st.columns([2, 3])
with c1:
    lam = st.number_input(
        "λ (sparsity penalty)", min_value=0.0, max_value=1.0, value=0.0, step=0.01, format="%.3f", key="lam",
        bind=controls.URL,
    )
    st.caption("0 = plain projection. The penalty is relative to ‖τ2‖_F (paper's objective); λ ≥ 1 gives S2 = 0.")
with c2:
    mode = controls.choice(st.segmented_control, "Show", {"pair": "one pair", "all": "all pairs"}, "pair", "mode")

ROW_LABELS = {k: v for k, v in views.INCLUSION_METRICS.items()}

@st.fragment
def view() -> None:
    """The pair or all-pairs view: its controls rerun only this part (not the sidebar, not the t-tests)."""
    if mode == "pair":
        p1, p2 = st.columns(2)
        with p1:
            tau1 = st.selectbox("τ1 (basis)", names, index=0, key="tau1", bind=controls.URL)
        with p2:
            tau2 = st.selectbox("τ2 (projected)", names, index=1, key="tau2", bind=controls.URL)
        if tau1 == tau2:
            st.info("Choose two different adapters.")
            return
        with st.spinner("Spectral inclusion in both directions..."):
            t12 = compute.inclusion_pair(by_name[tau1], by_name[tau2], lam)
            t21 = compute.inclusion_pair(by_name[tau2], by_name[tau1], lam)
        d12, d21 = f"{tau1} → {tau2}", f"{tau2} → {tau1}"
        stacks = list(dict.fromkeys(t12["stack"]))
        stack = st.selectbox("Stack", stacks, key="stack_i") if len(stacks) > 1 else stacks[0]
        present = list(dict.fromkeys(t12[t12["stack"] == stack]["kind"]))
        default_kinds = [k for k in ("q", "v") if k in present] or present[:2]
        k1, k2 = st.columns([3, 2])
        with k1:
            kinds = st.multiselect("Projections", present, default=default_kinds, key="pair_kind", bind=controls.URL)
        with k2:
            l1_col = controls.choice(
                st.segmented_control, "L1 on", {"l1": "raw spectra", "l1_normalized": "normalized"}, "l1", "l1"
            )
        curves = inclusion_curves({d12: t12, d21: t21}, kind=kinds or present, stack=stack)
        # each figure is kept per the content of the arguments it is built from (ui.figures.built)
        fig2 = figures.built(
            figures.grid_curves, curves, title=f"Per-layer {ROW_LABELS[l1_col].split(' =')[0]} and REC, both directions (the paper's Figure 2)",
            rows=[l1_col, "rec"], cols=kinds or present, row_labels=ROW_LABELS,
        )
        downloads.show(fig2, f"inclusion_curves_{tau1}_{tau2}", curves, key="curves")
        gaps = curves[curves["rec"].isna()]
        if len(gaps):
            where = ", ".join(f"{r.direction} layer {r.layer} {r.kind}" for r in gaps.itertuples())
            st.caption(
                f":material/info: Gaps in the REC curves: S2 = 0 at {where} (τ2 has no positive component on "
                "τ1's singular directions there), so REC is undefined."
            )

        summary = inclusion_means(curves)
        st.markdown("**Means over layers** (entropies of the basis spectrum S1 and of the projected S2)")
        st.dataframe(summary, hide_index=True, width="stretch")
        downloads.csv_button(summary, f"inclusion_means_{tau1}_{tau2}", key="csv_means")

        st.subheader("S1 vs S2 at one module")
        s1, s2, s3 = st.columns(3)
        with s1:
            direction = st.radio("Direction", [d12, d21], horizontal=True, key="direction")
        with s2:
            skind = st.selectbox("Kind", present, index=present.index(kinds[0]) if kinds else 0, key="s_kind")
        layers = sorted(t12[(t12["stack"] == stack) & (t12["kind"] == skind)]["layer"].unique())
        with s3:
            slayer = (
                st.select_slider("Layer", options=layers, value=layers[-1], key="s_layer", bind=controls.URL)
                if len(layers) > 1 else layers[0]
            )
        table = t12 if direction == d12 else t21
        spectra = views.spectra_at(table, int(slayer), skind, stack)
        if spectra and not any(spectra["S2 (τ2 projected on τ1's basis)"]):
            st.caption(
                ":material/info: S2 = 0 here: τ2 has no positive component on any of τ1's singular directions "
                "at this module (REC and H(S2) are undefined)."
            )
        if spectra:
            log = st.toggle("Log scale (S2 is often orders of magnitude below S1)", key="s_log")
            fig_s = figures.built(
                figures.spectra_bars, spectra, title=f"{direction}: spectra at layer {slayer}, {skind}", detail=f"{direction} · layer {slayer} · {skind}",
                log=log,
            )
            frame = pd.DataFrame({k: pd.Series(v) for k, v in spectra.items()}).rename_axis("i")
            downloads.show(fig_s, f"spectra_{direction}_{slayer}_{skind}", frame, index=True, key="spectra")
        st.subheader("λ sweep (the paper's appendix A)")
        with st.spinner("λ sweep..."):
            sweep = pd.concat(
                [compute.lambda_sweep(by_name[tau1], by_name[tau2]).assign(direction=d12),
                 compute.lambda_sweep(by_name[tau2], by_name[tau1]).assign(direction=d21)],
                ignore_index=True,
            )
        fig_l = figures.built(
            figures.sweep_lines, sweep, title="Mean REC and L1 as the sparsity penalty λ grows\nS2 = 0 for every module once λ ≥ 1",
            metrics={"rec": "mean REC", "l1": "mean L1 (raw)", "l1_normalized": "mean L1 (normalized)"},
        )  # both L1 variants, so that the "L1 on" choice above redraws only the curves it names
        downloads.show(fig_l, f"lambda_sweep_{tau1}_{tau2}", sweep, key="sweep")
    else:
        tables = compute.inclusion_all_pairs(adapters, lam)
        kinds_all = list(dict.fromkeys(k for t in tables.values() for k in t["kind"]))
        m1, m2 = st.columns(2)
        with m1:
            metric = controls.choice(
                st.selectbox, "Metric", views.INCLUSION_SHORT, "rec", "inc_metric",
            )
        with m2:
            kind = st.selectbox("Projections (all = every module)", ["all", *kinds_all], key="inc_kind",
                                bind=controls.URL)
        matrix_frame = compute.inclusion_matrix(adapters, metric, None if kind == "all" else kind, lam)
        matrix = matrix_frame.to_numpy(dtype=float)
        st.caption(
            ":material/east: **Direction: row τ_i → column τ_j** (τ_j projected on τ_i's singular basis). "
            "A high REC in row i, column j means τ_j lies in the directions of τ_i; compare with cell (j, i) "
            "for the reverse. The diagonal is an adapter with itself (REC 1, L1 0 up to rounding)."
        )
        fig_m = figures.matrix_heatmap(
            matrix, names, title=f"Inclusion matrix · mean {views.INCLUSION_METRICS[metric]} · {kind} · λ = {lam:g}",
            value_label=metric.upper() if metric == "rec" else metric, detail=f"kinds: {kind} · λ = {lam:g}",
            colorscale=figures.SIMILARITY if metric == "rec" else figures.SEQUENTIAL,
            row_label="τ_i (basis, row) →", col_label="τ_j (projected, column)",
        )
        ent = entropy_table(tables, names)
        left, right = st.columns([3, 2])
        with left:
            downloads.show(fig_m, f"inclusion_matrix_{metric}_{kind}", views.matrix_frame(matrix, names, metric),
                           index=True, key="inc_matrix")
        with right:
            label = views.INCLUSION_SHORT[metric]
            st.markdown(f"**Per adapter**: mean {label} as the basis τ1 (its row) and as the projected τ2 (its column)")
            margins = inclusion_margins(matrix_frame, ent, label=label)
            st.dataframe(margins, hide_index=True, width="stretch",
                         column_config={c: st.column_config.NumberColumn(format="%.3f") for c in margins.columns[1:]})
            downloads.csv_button(margins, f"inclusion_margins_{metric}_{kind}", key="csv_margins")
        st.markdown("**Mean entropies per direction** (H of the basis spectrum S1 and of the projected S2, 0 to 1)")
        st.dataframe(ent, hide_index=True, width="stretch", height=min(420, 38 + 35 * len(ent)),
                     column_config={c: st.column_config.NumberColumn(format="%.3f") for c in ("mean H(S1)", "mean H(S2)")})
        downloads.csv_button(ent, "inclusion_entropies", key="csv_ent")


view()


@st.fragment
def ttests() -> None:
    """The t-tests: their controls rerun only this section."""
    st.subheader("Student t-tests between two projections (the paper's Table 5)")
    directed = list(itertools.permutations(names, 2))  # (tau1, tau2) pairs; shown as "tau1 → tau2"


    def _arrow(pair: tuple[str, str]) -> str:
        return f"{pair[0]} → {pair[1]}"


    t1, t2, t3, t4 = st.columns(4)
    with t1:
        proj_x = st.selectbox("Projection X", directed, index=0, key="tt_x", format_func=_arrow)
    with t2:
        proj_y = st.selectbox("Projection Y", directed, index=min(1, len(directed) - 1), key="tt_y", format_func=_arrow)
    with t3:
        tt_metric = st.selectbox("Metric", list(views.INCLUSION_METRICS), format_func=views.INCLUSION_METRICS.get,
                                 key="tt_metric")
    table_x = compute.inclusion_pair(by_name[proj_x[0]], by_name[proj_x[1]], lam)
    table_y = compute.inclusion_pair(by_name[proj_y[0]], by_name[proj_y[1]], lam)
    tt_kinds = ordered_kinds(set(table_x["kind"]) | set(table_y["kind"]))  # the kinds these adapters have
    with t4:
        tt_kind = st.selectbox("Modules", ["all", *tt_kinds], key="tt_kind",
                               format_func=lambda k: "all modules" if k == "all" else f"{k} only")


    def _sample(table: pd.DataFrame) -> pd.Series:
        return (table if tt_kind == "all" else table[table["kind"] == tt_kind])[tt_metric]


    x, y = _sample(table_x), _sample(table_y)
    proj_x, proj_y = _arrow(proj_x), _arrow(proj_y)
    try:
        res = ttest(x.to_numpy(dtype=float), y.to_numpy(dtype=float))
    except ValueError as exc:
        st.warning(f"t-test not possible: {exc}")
    else:
        result = pd.DataFrame(
            [{
                "X": proj_x, "Y": proj_y, "metric": tt_metric, "modules": tt_kind,
                "mean X": res["mean_a"], "mean Y": res["mean_b"], "t": res["t"],
                "p (two-sided)": res["p_two_sided"], "p (X > Y)": res["p_greater"], "p (X < Y)": res["p_less"],
                "n X": res["n_a"], "n Y": res["n_b"],
            }]
        )
        st.dataframe(result, hide_index=True, width="stretch",
                     column_config={c: st.column_config.NumberColumn(format="%.3g")
                                    for c in ("mean X", "mean Y", "t", "p (two-sided)", "p (X > Y)", "p (X < Y)")})
        downloads.csv_button(result, f"ttest_{proj_x}_vs_{proj_y}_{tt_metric}", key="csv_tt")
        st.caption(
            "Independent two-sample Student t-test over per-module values (one value per layer and kind). "
            "For REC a small p (X > Y) says X includes more than Y; for L1, a small p (X < Y) says X is closer."
        )


ttests()
