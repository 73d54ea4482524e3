"""Learned merges page: DivMerge and AdaMerging run live; objective, coefficients and ANP move as they optimise."""

from __future__ import annotations

from ui import require_app

require_app()  # first: a shared link opened first on a fresh server gets the app (and its loading page) around it

import hashlib

import streamlit as st

from geometry.errors import AtlasError
from geometry.evaluation.merge_eval import methods_matrix, methods_table
from geometry.learned.data import parse_unlabeled
from ui import compute, controls, demo, downloads, figures, memory
from ui.figures import merge as merge_figures
from ui.runs import LiveRun, make_run

RUN_KEY = "learned_run"
METHODS = {"divmerge": "DivMerge (divergence to each fine-tuned model)", "adamerging": "AdaMerging (entropy)"}

st.title("Learned merges")
st.caption("Task arithmetic whose coefficients are learned on a few unlabeled inputs of each task: watch the "
           "objective, the coefficients and the ANP move while it optimises, stop at any time, download the merge.")
controls.how_to_read(
    """
**DivMerge** (Touayouch et al. 2025) minimises, over the coefficients Γ of task arithmetic
Φ = θ₀ + Σₜ Γₜ τₜ, the divergence between each fine-tuned model θₜ and the merged model on task t's
own unlabeled inputs (its validation split here), with task t's own head: Jensen-Shannon (default) or
KL(p_fine-tuned ‖ p_merged). **AdaMerging** (Yang et al. 2024) minimises instead the Shannon entropy of the
merged model's predictions. **Task level** learns one Γ per adapter; **layer level** one per adapter and
transformer block. Defaults are DivMerge's Table 9: Adam, lr 10⁻² (AdaMerging 10⁻³), init 0.5, batches of
4 inputs per task, 4 epochs (AdaMerging 5), 200 inputs per task (400 at layer level; the sample tasks have
300, and the run says so). The model runs with the factored updates (never B·A), and only Γ gets gradients.
**ANP** is measured on the test splits every few steps.
""",
    [r"\min_\Gamma \sum_t \mathbb{E}_{x\in X_t}\, D\big(p_{\theta_t}(\cdot\mid x)\,\|\,p_{\Phi}(\cdot\mid x)\big),"
     r"\quad \Phi = \theta_0 + \sum_t \Gamma_t\,\tau_t"],
)

caps = demo.caps()
adapters = controls.compared_adapters(key="learned_set", label="Adapters merged", max_default=2,
                                      max_count=caps.max_merged)
names = [a.name for a in adapters]
controls.demo_caps_note()
causal = bool(adapters) and all((a.config.task_type or "").upper() == "CAUSAL_LM" for a in adapters)
if causal:
    st.info("Causal language model (DivMerge's appendix B.1): each fine-tuned model's greedy continuation of every "
            "input is its reference (decoded once, then cached); the merged model reads the input and that "
            "continuation teacher-forced, and the divergence is averaged over the continuation's tokens. ANP uses "
            "each task's own metric (exact match of the generated label word, or ROUGE-1). On CPU a 135M model "
            "takes seconds per step, so the defaults here are small: 16 inputs per task, 2 epochs, 50 test examples.",
            icon=":material/text_fields:")

c1, c2, c3, c4 = st.columns([3, 2, 2, 2])
with c1:
    tasks = controls.task_data("learned_tasks", help="One folder per task: validation.jsonl (unlabeled inputs) "
                                   "and test.jsonl (ANP).")
with c2:
    method = st.selectbox("Method", list(METHODS), format_func=METHODS.get, key="learned_method", bind=controls.URL)
with c3:
    level = st.segmented_control("Level", ["task", "layer"], default="task", required=True, key="learned_level",
                                 bind=controls.URL)
with c4:
    divergence = st.segmented_control("Divergence", ["js", "kl"], default="js", required=True, key="learned_div",
                                      disabled=method != "divmerge", bind=controls.URL)
d1, d2, d3, d4, d5 = st.columns(5)
defaults = {"divmerge": (1e-2, 4), "adamerging": (1e-3, 5)}[method]
with d1:
    top = caps.max_learned_samples or 400
    samples = int(st.number_input("Inputs per task", 5, top, min(16 if causal else 200 if level == "task" else 300, top),
                                  step=25, key=f"learned_samples_{level}{'_causal' if causal else ''}"))
with d2:
    epochs = int(st.number_input("Epochs", 1, caps.max_learned_epochs or 50,
                                 min(2 if causal else defaults[1], caps.max_learned_epochs or 50),
                                 key=f"learned_epochs_{method}{'_causal' if causal else ''}"))
with d3:
    lr = float(st.number_input("Learning rate", 1e-5, 1.0, defaults[0], format="%.4f", key=f"learned_lr_{method}"))
with d4:
    init = st.selectbox("Initial Γ", ["0.5", "uniform"], key="learned_init",
                        help="0.5: the paper's Table 9 (default); uniform: 1/T, its Algorithm 1.")
with d5:
    limit = int(st.number_input("ANP test examples", 20, caps.max_test_examples or 2000, 50 if causal else 100, step=20,
                                key=f"learned_limit{'_causal' if causal else ''}"))
every = int(st.slider("Measure ANP every k steps", 5, 100, 25, step=5, key="learned_every"))

# Unlabeled inputs of one's own (kept in this session's memory, never written to the server's disk).
uploaded: dict[str, bytes] = {}
with st.expander("Your own unlabeled inputs (optional): a CSV or JSONL file per adapter", icon=":material/upload:"):
    st.caption("Columns `text` and optionally `text_pair` (labels, if any, are ignored). Adapters without a file "
               "use their task's validation split from the task data above.")
    for a in adapters:
        f = st.file_uploader(f"Inputs for {a.name}", type=["csv", "jsonl", "json", "tsv"], key=f"learned_up_{a.name}",
                             max_upload_size=20 if demo.demo_mode() else None)  # MB: text inputs are small
        if f is None:
            continue
        try:
            parsed = parse_unlabeled(f.getvalue(), f.name)
        except (AtlasError, ValueError, UnicodeDecodeError) as exc:
            st.error(f"{f.name}: {exc}" if f.name not in str(exc) else str(exc), icon=":material/error:")
            continue
        uploaded[a.name] = f.getvalue()
        st.caption(f":material/check: {f.name}: {len(parsed.texts)} inputs"
                   + (" (pairs)" if parsed.pairs is not None else "") + f" for {a.name}.")

settings = (compute.content_key(adapters), method, level, divergence if method == "divmerge" else None, samples,
            epochs, lr, init, tasks,
            tuple(sorted((n, hashlib.sha256(b).hexdigest()) for n, b in uploaded.items())))
live: LiveRun | None = st.session_state.get(RUN_KEY)
running = bool(live and live.run.running)
b1, b2, _ = st.columns([2, 3, 5])
start = b1.button("Start", type="primary", disabled=running, key="learned_start")
stop = b2.button("Stop (keep the coefficients reached)", disabled=not running, key="learned_stop")
if stop and live:
    live.run.stop()
if start:
    kwargs = dict(level=level, samples=samples, epochs=epochs, lr=lr, init=0.5 if init == "0.5" else "uniform")
    if method == "divmerge":
        kwargs["divergence"] = divergence
    try:
        if not tasks:
            raise AtlasError("no task data to measure ANP on")
        if memory.enforced() and not memory.ledger().wait_for(memory.HEAVY_RUN_BYTES, timeout=0):
            raise AtlasError(f"this server's memory budget is full ({memory.fmt(max(memory.ledger().headroom(), 0))} "
                             "free): a learned merge needs room for its working memory. Try again in a few minutes "
                             "(idle visitors' uploads are released), or remove adapters you no longer need.")
        run = make_run(method, adapters, tasks, data=uploaded or None, **kwargs)
    except (AtlasError, ValueError, OSError) as exc:
        st.error(str(exc), icon=":material/error:")
    else:
        live = LiveRun(run, settings, every, limit, alive=demo.session_liveness())
        st.session_state[RUN_KEY] = live
        live.start()
        st.rerun()  # redraw the buttons for a running run (Start off, Stop on)
if live and live.settings != settings and not running:
    st.caption(":material/info: The run below was made with other settings or adapters; press Start for these.")


def _draw(live: LiveRun) -> None:
    run = live.run
    snap = run.snapshot()
    if run.error is not None:
        st.error(f"The run stopped: {run.error}", icon=":material/error:")
    if live.stopped_because:
        st.info(f"The run was stopped because {live.stopped_because}; the coefficients it reached are kept.")
    frac = snap.step / max(snap.total_steps, 1)
    state = ("stopping after the step in progress" if run.running and run.stopped else "running" if run.running
             else "done" if snap.done else "stopped" if snap.step or run.stopped else "starting")
    prep = " (computing the fine-tuned models' reference distributions first)" if snap.step == 0 and run.running else ""
    st.progress(frac, text=f"{run.method}: step {snap.step}/{snap.total_steps} · {state}{prep} · "
                f"{live.wall_seconds():.0f} s" + (" · finished run read from the cache" if snap.cached else ""))
    if snap.resumed_from:
        st.info(f"Resumed at step {snap.resumed_from}: a run with these adapters, inputs and settings was interrupted "
                "there (a server restart or a closed run), and its checkpoint was kept in the disk cache. The steps "
                "before it are not redrawn in the coefficient chart; the result is the one an uninterrupted run "
                "reaches.", icon=":material/restore:")
    if run.stopped and not run.running and snap.step == 0 and run.error is None:
        st.info("Stopped before the first optimiser step: no coefficients were learned, nothing to show yet. The "
                "fine-tuned models' reference distributions computed so far are cached on disk, so Start continues "
                "from there.", icon=":material/pause_circle:")
    for note in run.notes:
        st.caption(f":material/info: {note}")
    anps = live.anp_frame()
    m1, m2, m3 = st.columns(3)
    m1.metric("Objective (mini-batch)", "—" if snap.step == 0 else f"{snap.objective:.4g}")
    m2.metric("Last ANP", "—" if anps.empty else f"{anps['ANP (%)'].iloc[-1]:.2f}%",
              help=f"On the first {live.limit} test examples of each task, every {live.evaluate_every} steps.")
    m3.metric("Steps", f"{snap.step} / {snap.total_steps}")
    left, right = st.columns(2)
    with left:
        hist = live.history_frame()
        fig = figures.layer_lines(hist.assign(series="objective", layer=hist["step"]), x="layer", y="objective",
                                  title=f"{run.method} objective per step\nmini-batch value before each update",
                                  value_label="objective", x_label="optimiser step")
        downloads.show(fig, f"{run.method}_objective", hist, key="learned_obj")
    with right:
        coefs = live.coefficient_frame()
        if run.settings.level == "task":
            lines = coefs.assign(series=coefs["adapter"], layer=coefs["step"])
            fig = figures.layer_lines(lines, x="layer", y="coefficient", value_label="Γ",
                                      title="Coefficients Γ per adapter\none line per task", x_label="optimiser step")
        else:
            last = coefs[coefs["step"] == coefs["step"].max()].pivot(index="adapter", columns="layer",
                                                                     values="coefficient")
            fig = figures.coefficient_heatmap(last, title=f"Coefficients Γ, task × layer\nafter step {snap.step}")
        downloads.show(fig, f"{run.method}_coefficients", coefs, key="learned_coef")
    if not anps.empty:
        fig = figures.layer_lines(anps.assign(series="ANP", layer=anps["step"]), x="layer", y="ANP (%)",
                                  title="ANP on the test splits while optimising", value_label="ANP (%)",
                                  x_label="optimiser step")
        downloads.show(fig, f"{run.method}_anp", anps, key="learned_anp")
    if live.was_running and not run.running:
        live.was_running = False
        st.rerun(scope="app")  # the run ended: draw the results below


if live is not None:
    st.fragment(_draw, run_every=1.0 if running else None)(live)
    run = live.run
    if not run.running and run.step > 0:
        result = run.result()
        st.subheader("The learned merge")
        st.caption(("Stopped early: " if result.stopped else "") + f"{result.steps_done} of {result.total_steps} "
                   "steps. The merge is exactly task arithmetic with these coefficients (per layer at layer level).")
        st.dataframe(result.frame(), width="stretch")
        downloads.csv_button(result.frame().reset_index(), f"{result.method}_coefficients_final", key="learned_csv")
        merged = run.merge()
        head = st.selectbox("Head in the download", list(result.adapters), key="learned_head")
        zip_slot = st.empty()  # filled below, once the scores (if measured) are known: they go in the model card
        st.markdown("**Beside the other methods** (same tasks, same test examples)")
        clicked = st.button("Score the learned merge, task arithmetic and TIES", key="learned_compare")
        src = run.adapters
        candidates = {result.method: merged, "task_arithmetic (λ = 1)": compute.merged(src, "task_arithmetic"),
                      "ties (20%)": compute.merged(src, "ties", None, {"density": 0.2})}
        scored_by = {}
        for label, m in candidates.items():
            try:
                scored = compute.merge_scores(src, tasks, m, live.limit, run=clicked)
            except AtlasError as exc:
                st.error(str(exc))
                break
            if scored is not None:
                scored_by[label] = scored
        zip_slot.download_button(
            ":material/download: Learned merge (.zip, peft format)",
            compute.merged_zip(merged, None, head, scored_by.get(result.method)), file_name=f"{result.method}.zip",
            mime="application/zip", key="learned_zip", on_click="ignore",
            help="peft folder with merge_info.json, every head under heads/ and README.md, a Hub model card "
                 "(with the scores and ANP once the learned merge is scored below)")
        if scored_by:
            table, wide = methods_table(scored_by), methods_matrix(scored_by)
            st.dataframe(wide, width="stretch")
            fig = merge_figures.method_comparison(table, {k: v.anp for k, v in scored_by.items()},
                                                  title="Merged score as % of fine-tuned, per task")
            downloads.show(fig, f"{result.method}_vs_baselines", table, key="learned_vs")
