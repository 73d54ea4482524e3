"""Token dynamics page: how a LoRA changes the clustering of a text's tokens across the layers."""

from __future__ import annotations

from ui import require_app

require_app()  # first: a shared link opened first on a fresh server gets the app (and its loading page) around it

import streamlit as st

from geometry.errors import AtlasError
from ui import compute, controls, downloads, figures, state
from ui.figures import tokens as token_figures

st.title("Token dynamics")
st.caption("Layers as time, tokens as particles: does the adapter follow the base model's clustering of the tokens, "
           "and from which layer does it go its own way?")
controls.how_to_read(
    """
Self-attention moves every token towards the tokens it attends to, so layer after layer the tokens of a text
gather into **clusters**. A LoRA that changes the value matrix V first follows the base model's trajectory, then
diverges towards another clustering (Koubbi, Boussard & Hernandez).

**Real model.** The text goes through the base model and through the base with each adapter (the same tokens).
* The **map** places every token of every layer, base (grey circles) and adapted (diamonds), in *one* PCA plane
  fitted on all layers and both models at once, so that a move between frames is a move of the token, not of the
  axes. Press ▶ or drag the slider to step through the layers; a grey segment joins a token's base and adapted
  positions.
* **Clusters per layer**: agglomerative clustering of the tokens on the cosine distance (average linkage), cut at
  the threshold you set: fewer clusters = the tokens gathered.
* **Mean cosine distance base vs adapted**: 0 while the adapted trajectory follows the base; its rise shows the
  layer where they separate.
* **Mean pairwise cosine**: 1 when all tokens point the same way (collapse). A text of one token has no pair: the
  value is undefined and left blank, not 0.
* **Batch mode** repeats the curves over a task's validation inputs (mean and a ± 1 standard deviation band), so
  that a conclusion does not rest on one sentence.

**Toy particle model.** The blog's simplified dynamics on the unit sphere: n tokens, attention matrices Q, K, V,
Euler steps of size dt then renormalisation, and the LoRA perturbation V = V0 + ε·BA/‖BA‖₂ of rank r. Both runs
start from the same points; the *separation time* is the first t at which the mean geodesic distance between a
token and its perturbed twin exceeds δ.
""",
    [
        r"\dot x_i = P_{x_i}\Big(\sum_j \frac{e^{\beta\langle Q x_i, K x_j\rangle}}{\sum_k e^{\beta\langle Q x_i, K x_k\rangle}}"
        r"\, V x_j\Big),\quad P_x(v) = v - \langle x, v\rangle x,\quad V = V_0 + \varepsilon\,\frac{BA}{\lVert BA\rVert_2}",
        r"d_l = \frac1n\sum_i \big(1 - \cos(h_l(i), h'_l(i))\big) \qquad "
        r"c_l = \frac{2}{n(n-1)}\sum_{i<j} \cos(h_l(i), h_l(j)) \qquad "
        r"T_{\mathrm{sep}} = \min\{t : \tfrac1n \textstyle\sum_i \arccos\langle x_i(t), y_i(t)\rangle > \delta\}",
    ],
)

aset = state.adapter_set()
real_tab, toy_tab = st.tabs(["Real model", "Toy particle model"])


def _tasks_dir():
    return state.samples_root() / "tasks"


def real_view() -> None:
    """The real-model view: one text (map + curves) and the batch mode; errors are shown, the state kept.

    Not a fragment: a click inside a running fragment waits for it to finish instead of interrupting it,
    so the batch run's Cancel button would not stop anything (seen in the browser)."""
    if not len(aset):
        st.info("No adapters loaded: add some in the sidebar.")
        return
    names = aset.names
    default = compute.compatible_default(aset.adapters)[:2]
    if "tok_adapters" in st.session_state and not all(n in aset for n in st.session_state["tok_adapters"] or []):
        del st.session_state["tok_adapters"]  # an adapter was removed or renamed
    chosen = st.multiselect("Adapters (one base model)", names, default=default, key="tok_adapters", bind=controls.URL,
                            help="Each adapter is applied on its own to the same base; several adapters share the "
                                 "per-layer curves and the PCA plane.")
    if not chosen:
        st.info("Choose at least one adapter.")
        return
    adapters = aset.subset(chosen)
    examples = compute.example_texts(adapters, _tasks_dir())
    if "tok_text" not in st.session_state:
        st.session_state["tok_text"] = next(iter(examples.values()))

    def _use_example() -> None:
        picked = st.session_state.get("tok_example")
        if picked in examples:
            st.session_state["tok_text"] = examples[picked]

    with st.container(horizontal=True, gap="medium", vertical_alignment="bottom"):
        st.selectbox("Example text of a task", list(examples), key="tok_example", on_change=_use_example, width=260,
                     help="The first validation input of the task; pick one to put it in the text box.")
        threshold = st.slider("Cluster threshold (cosine distance)", 0.05, 1.5, 0.5, 0.05, key="tok_threshold",
                              bind=controls.URL, width=320,
                              help="Two groups of tokens merge while the mean cosine distance between them is "
                                   "below this value.")
        special = st.toggle("Include [CLS] / [SEP] (special tokens)", value=True, key="tok_special", bind=controls.URL)
    text = st.text_area("Text", key="tok_text", height=80)
    try:
        dyn = compute.dynamics(adapters, text, threshold, special)
        st.session_state["tok_last"] = (tuple(chosen), dyn)
    except AtlasError as exc:
        st.error(str(exc), icon=":material/error:")
        last = st.session_state.get("tok_last")
        if last is None or last[0] != tuple(chosen):
            return
        dyn = last[1]  # keep the view (and its widgets' state) on the last text that ran
        st.caption(f":material/history: Showing the last text that ran: “{dyn.text[:100]}”")
    for note in dyn.notes:
        st.caption(f":material/info: {note}")
    which = "special tokens included" if dyn.include_special else "special tokens left out"
    st.caption(f"{len(dyn.tokens)} tokens measured ({which}) · layer 0 is the embedding output, layer l the output "
               "of block l.")

    st.subheader("Tokens in the shared PCA plane")
    layers = dyn.layers
    with st.container(horizontal=True, gap="medium", vertical_alignment="bottom"):
        shown = st.selectbox("Adapter on the map", chosen, key="tok_map_adapter", width=300)
        layer = st.select_slider("Layer", options=layers, value=layers[-1], key="tok_layer", width=420)
    color = token_figures.QUALITATIVE[chosen.index(shown) % len(token_figures.QUALITATIVE)]
    fig = figures.built(token_figures.projection_figure, dyn, shown, int(layer), color)  # kept per its arguments' content
    points = dyn.points[dyn.points["model"].isin(["base", shown])]
    downloads.show(fig, f"tokens_map_{shown}", points, key="tok_map")

    st.subheader("Per-layer curves")
    sep = tok_separation(dyn.table)
    st.caption("First layer with a mean cosine distance base vs adapted above 0.05: "
               + ", ".join(f"{k}: {'never' if v != v else int(v)}" for k, v in sep.items()))
    short = dyn.text[:60] + ("…" if len(dyn.text) > 60 else "")
    title = (f"Per-layer token measures · {len(chosen)} adapter(s)\n"
             f"cluster cut: cosine distance {dyn.threshold:g} · text: {short}")
    fig_c = figures.built(token_figures.layer_curves, dyn.table, title=title)
    downloads.show(fig_c, "tokens_per_layer", dyn.table, key="tok_curves")

    st.subheader("Batch mode: the same curves over a task's validation inputs")
    tasks = compute.task_folders(_tasks_dir())
    if not tasks:
        st.info(f"No task folder with a validation split under {_tasks_dir()}: batch mode needs one.")
        return
    with st.container(horizontal=True, gap="medium", vertical_alignment="bottom"):
        run_batch = st.toggle("Run batch mode", value=False, key="tok_batch")
        default_task = next((t for t in examples if t in tasks), tasks[0])
        task = st.selectbox("Task", tasks, index=tasks.index(default_task), key="tok_task", width=260)
        limit = st.number_input("Inputs", 2, 500, 32, step=8, key="tok_limit", width=140,
                                help="The first N inputs of the validation split.")
    folder = str(_tasks_dir() / task)
    if not run_batch:
        res = compute.batch_partial(adapters, folder, int(limit), threshold, special)
        if res is None:
            st.caption("Turn on batch mode to average the curves over the inputs (about a second per 32 inputs "
                       "and adapter on CPU for the sample base).")
            return
        st.warning(f"Cancelled after {len(res.texts)} of {int(limit)} inputs: the curves below are over those "
                   f"{len(res.texts)} only. Turn batch mode on again to finish (the inputs done are kept).",
                   icon=":material/pause_circle:")
    else:
        try:
            res = compute.batch(adapters, folder, int(limit), threshold, special,
                            on_cancel=lambda: st.session_state.update(tok_batch=False))
        except AtlasError as exc:
            st.error(str(exc), icon=":material/error:")
            return
    fig_b = token_figures.batch_curves(res.summary, title=f"Per-layer token measures over {res.source}\n"
                             f"mean ± one standard deviation over the inputs · cluster cut {threshold:g}")
    downloads.show(fig_b, f"tokens_batch_{task}", res.summary, key="tok_batch_fig")
    downloads.csv_button(res.per_text, f"tokens_batch_{task}_per_text", label="CSV (per input)", key="tok_batch_rows")


def tok_separation(table):
    from geometry.analysis.tokens import separation_layer

    return separation_layer(table, 0.05)


@st.fragment
def toy_view() -> None:
    """The toy particle model: controls, numbers, animation (d = 2, 3) and curves."""
    c1, c2, c3, c4 = st.columns(4)
    with c1:
        n = st.number_input("Tokens n", 2, 300, 32, key="pt_n")
        d = st.number_input("Dimension d", 2, 64, 3, key="pt_d")
        seed = st.number_input("Seed", 0, 10**6, 0, key="pt_seed")
    with c2:
        beta = st.slider("β (inverse temperature)", 0.0, 50.0, 4.0, 0.5, key="pt_beta")
        rank = st.number_input("LoRA rank r", 1, 64, 1, key="pt_rank", help="At most d (clamped to d).")
        strength = st.slider("LoRA strength ε (‖ΔV‖₂)", 0.0, 2.0, 0.3, 0.05, key="pt_strength")
    with c3:
        steps = st.number_input("Euler steps", 10, 2000, 200, step=10, key="pt_steps")
        dt = st.number_input("Step dt", 0.005, 1.0, 0.1, step=0.01, format="%.3f", key="pt_dt")
        qk = st.selectbox("Q, K", ["identity", "random"], key="pt_qk")
    with c4:
        v0 = st.selectbox("V0", ["identity", "random"], key="pt_v0")
        threshold = st.number_input("Cluster threshold (cosine distance)", 0.001, 1.0, 0.02, step=0.005,
                                    format="%.3f", key="pt_threshold")
        separation = st.number_input("Separation δ (radians)", 0.001, 3.0, 0.1, step=0.01, format="%.3f",
                                     key="pt_separation")
    if rank > d:
        st.caption(f":material/info: rank r = {int(rank)} is above d = {int(d)}: using r = {int(d)}.")
        rank = d
    params = dict(n=int(n), d=int(d), beta=float(beta), rank=int(rank), strength=float(strength), seed=int(seed),
                  steps=int(steps), dt=float(dt), qk=qk, v0=v0, threshold=float(threshold),
                  separation=float(separation))
    try:
        run = compute.particles(**params)
    except AtlasError as exc:
        st.error(str(exc), icon=":material/error:")
        return
    base, pert = run.final_clusters
    m1, m2, m3 = st.columns(3)
    m1.metric("Separation time T_sep", "never" if run.separation_time != run.separation_time
              else f"{run.separation_time:.3g}", help=f"First t with mean geodesic distance > δ = {separation:g} rad")
    m2.metric("Final clusters, base", base)
    m3.metric("Final clusters, LoRA-perturbed", pert)
    anim = figures.built(token_figures.particle_animation, run)
    if anim is None:
        st.info(f"The animation is drawn for d = 2 (circle) and d = 3 (sphere); d = {int(d)} shows the curves only.")
    else:
        downloads.show(anim, f"particles_d{int(d)}", key="pt_anim")
    downloads.show(figures.built(token_figures.particle_curves, run), "particles_curves", run.table, key="pt_curves")


with real_tab:
    real_view()
with toy_tab:
    toy_view()
