"""Merge page: merge adapters, score each task with its own head (ANP), pairwise merge losses vs geometry."""

from __future__ import annotations

from ui import require_app

require_app()  # first: a shared link opened first on a fresh server gets the app (and its loading page) around it

from dataclasses import replace

import numpy as np
import pandas as pd
import streamlit as st

from geometry.errors import AtlasError, MissingTaskDataError
from geometry.evaluation.merge_eval import (
    correlation_study,
    correlation_table,
    methods_matrix,
    methods_table,
)
from geometry.evaluation.tasks import find_task_dir
from geometry.merging import MERGE_METHODS, METHOD_PARAMS
from geometry.merging import params as merge_params
from geometry.merging.weights import parse_weights
from ui import compute, controls, demo, downloads, figures, runs, stop_page
from ui.figures import merge as merge_figures

METHOD_LABELS = {
    "lora_average": "LoRA-level average (paper; cross terms)",
    "task_arithmetic": "Task arithmetic (exact)",
    "ties": "TIES",
    "dare_linear": "DARE (linear)",
    "dare_ties": "DARE (TIES)",
    "multislerp": "Multi-SLERP",
    "magnitude_prune": "Magnitude pruning",
    "breadcrumbs": "Model Breadcrumbs",
    "breadcrumbs_ties": "Model Breadcrumbs (TIES)",
    "della": "DELLA",
    "della_linear": "DELLA (linear)",
    "knots": "KnOTS (merge in the shared SVD basis)",
    "core_space": "Core Space merging",
    "tsv_m": "TSV-M (task singular vectors)",
    "iso_c": "Iso-C (isotropic)",
    "iso_cts": "Iso-CTS (common + task-specific)",
}

st.title("Merging adapters")
st.caption(
    "Combine task vectors with a merge method, then score the merged model on each task with that "
    "task's own classification head: what does merging cost each task, and did the geometry predict it?"
)
controls.how_to_read(
    """
**Methods.** *LoRA-level average* averages the factors A and B (the geometry paper's merge; it adds
cross terms B₁A₂ that belong to neither task). *Task arithmetic* adds λₜ·τₜ exactly (kept as a
rank-Σrₜ product; optionally truncated to a rank, with the energy kept shown). *TIES*, *DARE*,
*Multi-SLERP* and *magnitude pruning* work entry by entry on each module's dense task vector;
*Model Breadcrumbs* drops each task vector's largest outliers and smallest entries, *DELLA* drops
entries with probabilities ranked by magnitude and rescales the rest.
The LoRA-native methods work on singular vectors, computed exactly from the factors (no out × in
matrix): *TSV-M* keeps each task's singular vectors and orthogonalises them across tasks; *Iso-C*
flattens the spectrum of the task-arithmetic sum to its mean, *Iso-CTS* does so on a common subspace
plus task-specific directions; *KnOTS* runs TIES / DARE on the tasks' coordinates in the SVD basis of
their concatenation; *Core Space* runs a merge on small r·T × r·T cores in the bases of the stacked
factors (exact for task arithmetic). The formula and reference of each are in the docstring of its
file in `geometry/merging/`.
Each adapter's own scale (α/r, rsLoRA, per-module patterns) is applied before combining.

**Scores.** P(θ, t) is accuracy on task t's test split; for a generation task, its own metric from its
`labels.json` (exact match of the generated label word when classification is cast as generation, as on the
SmolLM2 set; ROUGE-1 or ROUGE-L F1 of the generated answer otherwise), greedy decoding. **ANP** is the mean,
over the merged tasks, of the merged model's score divided by the fine-tuned adapter's score (%).
The **pairwise study** merges every pair (i, j): the merge loss **δ(i, j) = P(θᵢ, i) − P(merge(i, j), i)**
(row i = the task scored) and the pair's ANP. The **correlation table** is the 2024 paper's Table 3:
per task i, the Spearman correlation between δ(i, ·) and the distance T̄_d(i, ·) over the partners,
mean (std) over tasks, for each metric, projection and layer selection (all layers or the last k).
Scores are cached on disk, so a second run is instant.
""",
    [
        r"\mathrm{ANP} = \frac{100}{T}\sum_{t=1}^{T}\frac{P(\theta_{\mathrm{merged}}, t)}{P(\theta_t, t)}"
        r"\qquad \delta(i,j) = P(\theta_i, i) - P(\theta_{i \oplus j}, i)",
        r"\Delta W_{\mathrm{TA}} = \sum_t \lambda_t s_t B_t A_t = [\lambda_1 s_1 B_1, \dots, \lambda_T s_T B_T]\,[A_1; \dots; A_T]",
    ],
)

adapters = controls.compared_adapters(key="merge_set", label="Adapters merged", max_default=3,
                                      max_count=demo.caps().max_merged)
controls.demo_caps_note()
names = [a.name for a in adapters]

c1, c2 = st.columns([3, 2])
with c1:
    tasks = controls.task_data(
        "merge_tasks", help="Holds one folder per task (test.jsonl + labels.json). Each adapter's task is read "
        "from its training_info.json, else its name.", uploads=True,
    )
with c2:
    limit = int(st.number_input(
        "Test examples per task", min_value=10, max_value=demo.caps().max_test_examples or 100000, value=200,
        step=50, key="merge_limit", help="Scores use the first N test examples of each task (fewer = faster).",
    ))
task_errors = [] if tasks else ["no task data"]
for a in adapters if tasks else []:
    try:
        find_task_dir(a, tasks)
    except MissingTaskDataError as exc:
        task_errors.append(str(exc))
can_score = not task_errors
if task_errors:
    st.warning("Scoring is off: " + "; ".join(task_errors), icon=":material/warning:")

m1, m2, m3, m4 = st.columns([3, 3, 2, 2])
with m1:
    method = st.selectbox("Method", list(MERGE_METHODS), format_func=METHOD_LABELS.get, key="merge_method",
                          index=list(MERGE_METHODS).index("task_arithmetic"), bind=controls.URL,
                          help="Task arithmetic works for any ranks; the LoRA-level average needs equal ranks.")
takes = METHOD_PARAMS[method]
params: dict = {}
with m2:
    weights_text = st.text_input(
        "Weights λ (one per adapter, comma-separated)", value="", key="merge_weights",
        placeholder="method default", help="Empty: 1/T for the averages and Multi-SLERP, 1 otherwise.",
    )
extra = [n for n in takes if n in merge_params.PARAMS and n not in ("density", "seed", "rank", "keep_dense")]
for col, name in zip(st.columns(max(len(extra), 4)) if extra else (), extra):
    with col:
        params[name] = controls.merge_param(method, merge_params.PARAMS[name], key=f"merge_{name}_{method}")
with m3:
    density = merge_params.density_default(method, params)
    if "density" in takes and density is not None:
        params["density"] = st.slider("Density (kept)", 0.05, 1.0, density, 0.05,
                                      key="_".join(("merge_density", method, *[params[k] for k in ("merge_method",)
                                                                                   if k in params])))
    if "seed" in takes:
        params["seed"] = int(st.number_input("Seed", 0, 2**31 - 1, 0, key="merge_seed"))
with m4:
    rank = int(st.number_input("Rank (0 = exact)", 0, 4096, 0, key="merge_rank",
                               help="Truncate each merged module to this rank by its SVD; the energy kept is shown."))
    if rank and "rank" in takes:
        params["rank"] = rank

with st.expander("Run a recipe instead (mergekit YAML, or the recipe.yaml of an export)",
                 icon=":material/receipt_long:"):
    st.caption("A mergekit recipe runs with mergekit's meaning (TIES elects on weighted deltas, DARE rescales by "
               "the L1 ratio...; gradients over layers and filters are followed); a recipe this tool wrote replays "
               "its merge exactly. Its models are matched to the adapters above by name, else by position.")
    recipe_file = st.file_uploader("Recipe", type=["yaml", "yml"], key="merge_recipe_file",
                                   help="Remove the file to go back to the controls above.")
recipe_text = None
if recipe_file is not None:
    try:
        recipe_text = recipe_file.getvalue().decode("utf-8")
    except UnicodeDecodeError:
        st.error(f"{recipe_file.name}: not UTF-8 text; a recipe is a YAML file", icon=":material/error:")
        stop_page()

try:
    weights = parse_weights(weights_text, names, label="Weights")
except AtlasError as exc:
    st.error(str(exc))
    stop_page()

try:
    if recipe_text is not None:
        merged = compute.merged_from_recipe(adapters, recipe_text)
        st.info(f"Merged by the recipe **{recipe_file.name}** (`{merged.method}`): the method controls above are not used "
                "while it is loaded.", icon=":material/receipt_long:")
    else:
        merged = compute.merged(adapters, method, weights, params)
except (AtlasError, ValueError) as exc:
    where = f"{recipe_file.name}: " if recipe_text is not None else ""
    st.error(where + str(exc), icon=":material/error:")
    stop_page()
merge_name = merged.method  # the control's method, or the recipe's ("mergekit:ties")
file_stem = merge_name.replace(":", "_")

write_rank = rank if rank and "rank" not in takes else None
summary = compute.merged_summary(merged)
s1, s2, s3, s4 = st.columns(4)
s1.metric("Modules merged", summary["n_modules"])
ranks = (f"{summary['min_rank']}" if summary.get("min_rank") == summary.get("max_rank")
         else f"{summary.get('min_rank')}–{summary.get('max_rank')}")
s2.metric("Rank per module", ranks, help=f"Rule: {summary.get('rank_rule', 'exact')}. The download stores each "
          "module as LoRA factors of this rank.")
s3.metric("Energy kept", f"{100 * summary['energy_kept']:.2f}%",
          help="Fraction of Σ‖Δ‖²_F kept over all modules; the default rank is the sum of the input ranks "
               "(exact for task arithmetic).")
s4.metric("Lowest per module", f"{100 * summary.get('energy_kept_min', summary['energy_kept']):.2f}%")
by_module = summary.get("energy_kept_by_module") or {}
if by_module and min(by_module.values()) < 1.0:
    with st.expander("Energy kept per module"):
        energy = pd.DataFrame({"module": list(by_module), "energy kept (%)": [100 * v for v in by_module.values()]})
        st.dataframe(energy, hide_index=True, width="stretch")
        downloads.csv_button(energy, f"merge_{file_stem}_energy", key="csv_energy")
st.caption(f"Weights used: {', '.join(f'{a}: {w:g}' for a, w in zip(names, merged.params.get('weights') or []))}"
           if merged.params.get("weights") else "Weights used: the method's default.")

d1, d2 = st.columns([2, 3])
with d1:
    head = st.selectbox("Head in the download", names, key="merge_head",
                        help="The chosen task's classifier goes in the peft weights; every head is in heads/.")

clicked = st.button("Score the merged model on every task", disabled=not can_score, key="merge_run", type="primary")
result = None
if can_score:
    try:
        result = compute.merge_scores(adapters, tasks, merged, limit, run=clicked)
    except AtlasError as exc:
        st.error(str(exc), icon=":material/error:")
if result is None and can_score and runs.cancelled(
        "merge_scores", compute.merge_scores_key(adapters, tasks, merged, limit)):
    st.info("Cancelled before the first task was scored: nothing to show yet. The evaluations that finished are "
            "cached, so pressing the button again continues from there.", icon=":material/pause_circle:")
if result is not None:
    frame = result.frame.assign(adapter=names[:len(result.frame)])  # current names (results are keyed by content)
    if result.complete:
        st.metric("ANP (average normalized performance)", f"{result.anp:.2f}%")
    else:
        st.warning(f"Cancelled after {len(result.frame)} of {result.tasks_total} tasks: the scores below are those "
                   "tasks only. Press the button again to finish (the finished evaluations are cached).",
                   icon=":material/pause_circle:")
        n_done = len(result.frame)
        st.metric(f"ANP over the {n_done} task{'s' if n_done != 1 else ''} scored (partial)", f"{result.anp:.2f}%")
    metrics = ", ".join(dict.fromkeys(frame["metric"])) if "metric" in frame else "accuracy"
    fig = merge_figures.performance_bars(frame, title=f"{METHOD_LABELS.get(merge_name, merge_name)}: merged vs fine-tuned, per task",
                                         metric_label=metrics.replace("_", " "))
    downloads.show(fig, f"merge_{file_stem}_performance", frame, key="merge_bars")
with d2:  # drawn beside the head choice, once the scores (if measured) are known: they go in the model card
    st.download_button(
        ":material/download: Merged adapter (.zip, peft format)",
        compute.merged_zip(merged, write_rank, head,
                           None if result is None else replace(result, frame=result.frame.assign(
                               adapter=names[:len(result.frame)]))),
        file_name=f"merged_{file_stem}.zip", mime="application/zip", key="merge_zip", on_click="ignore",
        help="peft folder with merge_info.json, every head under heads/, recipe.yaml and README.md, a Hub model "
             "card (with the scores and ANP once the merge is scored below)",
    )
    st.download_button(
        ":material/receipt_long: Recipe (.yaml, mergekit's shape)", merged.recipe(),
        file_name=f"recipe_{file_stem}.yaml", mime="application/x-yaml", key="merge_recipe", on_click="ignore",
        help="Replay it with `python -m geometry merge --recipe FILE`, or bring it back here above; methods "
             "mergekit also has are written so that mergekit reads them, with this tool's exact call beside.",
    )

st.subheader("Methods side by side on these tasks")
st.caption("Each method with its default weights and parameters (those of its function: TIES / magnitude pruning "
           "keep 20%, DARE and DELLA 50%, seed 0; task arithmetic λ = 1, averages and Multi-SLERP 1/T), scored on "
           "the same test examples.")
compared = st.multiselect(
    "Methods compared", list(MERGE_METHODS), format_func=METHOD_LABELS.get, key="merge_compare",
    default=["task_arithmetic", "ties", "dare_ties", "multislerp"],
)
clicked = st.button("Score every method", disabled=not can_score or not compared, key="merge_compare_run")
view_key = (compute.content_key(adapters), tuple(compared), tasks, limit)
if clicked:
    st.session_state["merge_compare_view"] = view_key  # what to show; the results come from the caches
scored_by, partial_methods = {}, []
if can_score and compared and st.session_state.get("merge_compare_view") == view_key:
    for m_name in compared:
        try:
            m_merged = compute.merged(adapters, m_name, None, {})
            scored = compute.merge_scores(adapters, tasks, m_merged, limit, run=clicked)
        except (AtlasError, ValueError) as exc:
            st.caption(f":material/info: {METHOD_LABELS[m_name]}: {exc}")
            continue
        if scored is None:
            continue
        if not scored.complete:  # cancelled half-way: named below, not mixed with complete results
            partial_methods.append(f"{METHOD_LABELS[m_name]} ({len(scored.frame)} of {scored.tasks_total} tasks)")
            continue
        scored_by[m_name] = scored
anps = {m: ev.anp for m, ev in scored_by.items()}
if scored_by:
    table, wide = methods_table(scored_by), methods_matrix(scored_by)
    st.dataframe(wide, width="stretch", column_config={c: st.column_config.NumberColumn(format="%.1f") for c in wide.columns})
    fig = merge_figures.method_comparison(table, anps, title="Merged score as % of the fine-tuned adapter, per task and method")
    downloads.show(fig, "merge_methods_compared", table, key="merge_methods")
    missing = [m for m in compared if m not in anps]
    if missing:
        st.caption(f"Not scored yet: {', '.join(METHOD_LABELS[m] for m in missing)} (press the button).")
if partial_methods:
    st.caption(f":material/pause_circle: Cancelled before every task was scored: {', '.join(partial_methods)}; "
               "press the button again to finish (finished evaluations are cached).")

st.subheader("Advise: which merge should I use?")
st.caption(
    "Tries every method over a small grid of its main parameters (λ, density, α; each method's defaults first) and, "
    "optionally, DivMerge (or AdaMerging), and ranks them **without labels**: the mean Jensen–Shannon (or KL) "
    "divergence between the merged model's predictions and each fine-tuned model's on a few unlabeled inputs of its "
    "task's validation split (DivMerge's objective), or the merged model's entropy (AdaMerging's). Lower is better. "
    "With *Measure ANP* every candidate is also scored on the test labels, so you can see whether the label-free "
    "ranking agrees on these tasks. Formula and grid: `geometry/evaluation/advise.py`."
)
a1, a2, a3, a4, a5 = st.columns([2, 2, 2, 2, 2])
advice_settings = {
    "budget": int(a1.number_input("Candidates (budget)", 4, 80, 20, key="advise_budget")),
    "criterion": a2.selectbox("Criterion", ["js", "kl", "entropy"], key="advise_criterion",
                              format_func={"js": "JS divergence", "kl": "KL divergence", "entropy": "entropy"}.get),
    "samples": int(a3.number_input("Unlabeled inputs per task", 2, 200, 16, key="advise_samples")),
    "learned": a4.checkbox("Include DivMerge / AdaMerging", value=True, key="advise_learned"),
    "measure": a5.checkbox("Measure ANP (labels)", value=False, key="advise_measure",
                           help=f"Also score every candidate on the first {limit} test examples of each task."),
}
advice_settings["limit"] = limit if advice_settings["measure"] else None
advise_clicked = st.button("Advise", disabled=not can_score, key="advise_run", icon=":material/recommend:")
advice = None
if can_score:
    try:
        advice = compute.advice(adapters, tasks, advice_settings, run=advise_clicked)
    except AtlasError as exc:
        st.error(str(exc), icon=":material/error:")
if advice is not None:
    best = advice.best
    pick = advice.recommended
    st.success(f"Recommended: **{best['candidate']}**, the lowest {advice.criterion} ({best['criterion']:.4g}) of "
               f"{len(advice.table)} candidates" + (f"; its ANP on the test labels: {best['anp']:.2f}%" if "anp" in best else ""),
               icon=":material/recommend:")
    for note in advice.notes:
        st.caption(f":material/info: {note}")
    st.dataframe(advice.table, hide_index=True, width="stretch",
                 column_config={"criterion": st.column_config.NumberColumn(format="%.4g"),
                                "seconds": st.column_config.NumberColumn(format="%.1f"),
                                "anp": st.column_config.NumberColumn("ANP (%)", format="%.2f")})
    downloads.csv_button(advice.table, "merge_advice", key="csv_advice")
    if "anp" in advice.table:
        st.caption(f"Spearman correlation of −{advice.criterion} and ANP over the candidates: {advice.spearman:.3f} "
                   f"(p = {advice.p_value:.2g})" if advice.spearman == advice.spearman else
                   "Spearman correlation undefined (a constant column).")
        fig = merge_figures.advice_scatter(advice.table, criterion=advice.criterion)
        downloads.show(fig, "merge_advice_scatter", advice.table, key="advice_scatter")
    if advice.compatibility is not None and not advice.compatibility.empty:
        with st.expander("What the adapters look like, module by module (the explanation beside the pick)"):
            for line in advice.explanation():
                st.markdown(f"- {line}")
            st.caption("Overlap: the mean squared cosine of the principal angles between two adapters' column and row "
                       "spaces at a module, averaged over pairs (TSV-M's overlap). Share: each adapter's ‖τ‖_F over "
                       "the sum at that module. The labels use thresholds chosen as reading aids "
                       "(`geometry/analysis/ranks.py`), not tested predictions of merge loss.")
            st.dataframe(advice.compatibility, hide_index=True, width="stretch",
                         column_config={c: st.column_config.NumberColumn(format="%.3f")
                                        for c in advice.compatibility.columns
                                        if c == "overlap" or "share" in c})
            downloads.csv_button(advice.compatibility, "merge_advice_compatibility", key="csv_advice_compat")
    u1, u2 = st.columns(2)
    u1.button("Use the recommended merge above", key="advise_take", on_click=controls.take_merge,
              args=(pick.method, pick.params, names), icon=":material/input:",
              help="Sets the method, weights and parameters at the top of this page to the recommended merge.")
    u2.download_button(":material/download: Recommended merge (.zip, peft format)",
                       compute.merged_zip(pick, None, names[0]), file_name=f"recommended_{pick.method}.zip",
                       mime="application/zip", key="advise_zip", on_click="ignore")

st.subheader("Pairwise study")
n_eval = len(adapters) * len(adapters)  # n fine-tuned + n (n - 1) merged evaluations
st.caption(
    f"Merges every pair of the {len(adapters)} adapters with the method above (each pair with the method's default "
    f"weights) and scores both tasks: {len(adapters)} fine-tuned and {n_eval - len(adapters)} merged evaluations of "
    f"up to {limit} test examples each, about {runs.estimate_seconds(n_eval, limit)} on this "
    "machine (estimate; evaluations already cached cost nothing). Pick the adapters above first."
)
clicked = st.button("Run the pairwise study", disabled=not can_score, key="merge_pairwise")
res = None
if can_score:
    try:
        res = compute.pairwise(adapters, tasks, method, params, limit, run=clicked)
    except AtlasError as exc:
        st.error(str(exc), icon=":material/error:")
if res is None and can_score and runs.cancelled(
        "pairwise", compute.pairwise_key(adapters, tasks, method, params, limit)):
    st.info("Cancelled before the first pair was merged and scored: nothing to show yet. The evaluations that "
            "finished are cached, so running the study again continues from there.", icon=":material/pause_circle:")
if res is not None:
    if res.extra.get("resumed_pairs"):
        st.info(f"Resumed: {res.extra['resumed_pairs']} of {res.pairs_total} pairs were finished by an earlier run "
                "with these adapters, method, parameters and task files that was interrupted (stopped, or a server "
                "restart); their scores came from its checkpoint in the disk cache and the study went on from there.",
                icon=":material/restore:")
    if res.complete:
        st.metric("Mean pairwise ANP", f"{res.mean_anp:.2f}%", help=f"std over pairs {res.std_anp:.2f}")
    else:
        st.warning(f"Cancelled after {res.pairs_done} of {res.pairs_total} pairs: the pairs not merged yet are blank "
                   "below. Run the study again to finish (the finished evaluations are cached).",
                   icon=":material/pause_circle:")
        st.metric(f"Mean pairwise ANP over the {res.pairs_done} finished pair{'s' if res.pairs_done != 1 else ''} (partial)",
                  f"{res.mean_anp:.2f}%" if res.pairs_done else "undefined",
                  help=f"std over those pairs {res.std_anp:.2f}")
    h1, h2 = st.columns(2)
    with h1:
        fig = figures.matrix_heatmap(res.delta, names, title="Merge loss δ(i, j) (row i: task scored)",
                                     value_label="δ", row_label="task i (scored)", col_label="merged with j",
                                     colorscale="RdBu_r", zmin=-float(np.nanmax(np.abs(res.delta)) or 1),
                                     zmax=float(np.nanmax(np.abs(res.delta)) or 1))
        downloads.show(fig, f"pairwise_delta_{method}", res.to_frame(), key="merge_delta")
    with h2:
        fig = figures.matrix_heatmap(res.anp, names, title="Pairwise ANP (%)", value_label="ANP %",
                                     colorscale=figures.SIMILARITY)
        anp_frame = pd.DataFrame(res.anp, index=names, columns=names).rename_axis("ANP %")
        downloads.show(fig, f"pairwise_anp_{method}", anp_frame, index=True, key="merge_anp")

    st.subheader("Does the geometry predict the merge loss?")
    if not res.complete:
        st.info("Undefined until the study is complete: the correlations need the merge loss of every pair.")
    elif len(adapters) < 5:
        st.info(f"Undefined here: each task has {len(adapters) - 1} partner(s), and a Spearman correlation over "
                "fewer than 4 partners takes only a few values (over 2 it is always ±1). Merge at least 5 adapters.")
    else:
        with st.spinner("Correlating merge losses with distances..."):
            corr = correlation_study(adapters, res.delta, distances=compute.distances(adapters))
        table = correlation_table(corr, layers=["all", *sorted({s for s in corr["layers"] if s != "all"},
                                                                key=lambda s: int(s.split(":")[1]))])
        st.dataframe(table, width="stretch")
        downloads.csv_button(corr.drop(columns=["per_task"]), f"correlations_{method}", key="merge_corr_csv")
        fig = merge_figures.correlation_lines(corr, title="Spearman correlation of δ(i, ·) with T̄_d(i, ·), last k layers")
        downloads.show(fig, f"correlations_{method}_vs_k", key="merge_corr")
