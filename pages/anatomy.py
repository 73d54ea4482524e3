"""Anatomy page: where an adapter puts its weight, and how many directions each module uses."""

from __future__ import annotations

from ui import require_app

require_app()  # first: a shared link opened first on a fresh server gets the app (and its loading page) around it

import pandas as pd
import streamlit as st

from ui import compute, controls, downloads, figures, state, stop_page
from ui.figures import ranks as rank_figures

st.title("Adapter anatomy")
st.caption("Per module: the size of the update (‖τ‖_F), its singular spectrum and its effective / stable rank.")
controls.how_to_read(
    """
Each LoRA module adds the task vector **τ = s·B·A** (shape out × in, rank ≤ r) to one linear layer.

* The **heatmap** shows ‖τ‖_F for every layer (rows) and module kind (columns): where the adapter
  changed the base model most. Compare two adapters side by side on one colour scale.
* The **spectrum** of a module lists its singular values σ_1 ≥ σ_2 ≥ … (exact, from the factors:
  no out × in matrix is formed). A fast decay means the update uses few directions.
* **Effective rank** (exp of the Shannon entropy of the normalized spectrum) and **stable rank**
  (‖τ‖_F² / σ_1²) count the directions actually used, between 1 and r.
""",
    [
        r"\lVert\tau\rVert_F = \sqrt{\textstyle\sum_i \sigma_i^2} \qquad "
        r"\mathrm{erank}(\tau) = \exp\Big(-\sum_i p_i \log p_i\Big),\ p_i = \frac{\sigma_i}{\sum_j \sigma_j}"
        r"\qquad \mathrm{srank}(\tau) = \frac{\lVert\tau\rVert_F^2}{\sigma_1^2}",
    ],
)

aset = state.adapter_set()
if not len(aset):
    st.info("No adapters loaded: add some in the sidebar.")
    stop_page()

@st.fragment
def view() -> None:
    """Everything below the title: a control here reruns only this part (not the sidebar)."""
    names = aset.names
    second = None
    with st.container(horizontal=True, gap="medium", vertical_alignment="bottom"):
        first = st.selectbox("Adapter", names, key="adapter", bind=controls.URL, width=380)
        compare = st.toggle("Compare with a second adapter", key="compare2", bind=controls.URL, disabled=len(names) < 2)
        if compare and len(names) > 1:
            others = [n for n in names if n != first]
            second = st.selectbox("Second adapter", others, key="adapter2", bind=controls.URL, width=380)

    shown = [first] + ([second] if second else [])
    tables = {name: compute.anatomy(aset[name]) for name in shown}
    stacks = list(dict.fromkeys(s for t in tables.values() for s in t["stack"]))
    stack = st.selectbox("Stack", stacks, key="stack_a") if len(stacks) > 1 else stacks[0]
    parts = {name: t[t["stack"] == stack] for name, t in tables.items()}
    # Two adapters: one colour scale for both heatmaps (the same colour is the same norm).
    zmin = min(float(p["fro_norm"].min()) for p in parts.values() if len(p)) if second else None
    zmax = max(float(p["fro_norm"].max()) for p in parts.values() if len(p)) if second else None

    def _draw(name: str, norms_box, ranks_box) -> None:
        part = parts[name]
        if part.empty:
            norms_box.warning(f"{name} has no module in the {stack} stack.")
            return
        fig = figures.built(
            figures.norm_heatmap, part, adapter=name, zmin=zmin, zmax=zmax,  # kept per its arguments' content
            title=f"‖τ‖_F by layer and module kind\n{name}" + (" · colour scale shared by both adapters" if second else ""),
        )
        with norms_box:
            downloads.show(fig, f"anatomy_norms_{name}", part.drop(columns=["singular_values"]), key=f"norms_{name}")
        fig_r = figures.built(figures.rank_lines, part, adapter=name,
                              title=f"Effective and stable rank by layer\n{name}")
        with ranks_box:
            ranks = part[[c for c in ("stack", "layer", "kind", "effective_rank", "stable_rank") if c in part.columns]]
            downloads.show(fig_r, f"anatomy_ranks_{name}", ranks, key=f"ranks_{name}")


    # The same two columns either way, the first adapter's heatmap at the same place: turning the comparison
    # on or off updates the figures there instead of building every figure of the page anew in the browser.
    left, right = st.columns(2)
    if second:  # two adapters: one column each (the subtitles name them), heatmaps on one colour scale
        _draw(first, left, left)
        _draw(second, right, right)
    else:  # one adapter: norms and ranks side by side
        _draw(first, left, right)

    # One module's spectrum
    st.subheader("Singular spectrum of one module")
    base = parts[first]
    kinds = list(dict.fromkeys(base["kind"]))
    layers = sorted(base["layer"].unique())
    k1, k2 = st.columns(2)
    with k1:
        kind = st.selectbox("Module kind", kinds, key="a_kind", bind=controls.URL)
    with k2:
        layer = (
            st.select_slider("Layer", options=layers, value=layers[-1], key="a_layer", bind=controls.URL)
            if len(layers) > 1 else layers[0]
        )
    spectra = {}
    for name in shown:
        row = parts[name][(parts[name]["layer"] == layer) & (parts[name]["kind"] == kind)]
        if len(row):
            spectra[name] = list(map(float, row.iloc[0]["singular_values"]))
    if spectra:
        fig_s = figures.built(
            figures.spectra_bars, spectra, title=f"Singular values of τ, layer {layer}, {kind} module\n{' vs '.join(spectra)}",
            detail=f"layer {layer} · {kind}",
        )
        frame = pd.DataFrame(
            [{"adapter": n, "i": i + 1, "sigma": v} for n, s in spectra.items() for i, v in enumerate(s)]
        )
        downloads.show(fig_s, f"spectrum_{stack}_{layer}_{kind}", frame, key="spectrum")
    else:
        st.info(f"No {kind} module at layer {layer}.")

    # Rank per module, and the adapter truncated
    st.subheader("Rank per module, and a smaller adapter")
    st.caption("Per module of the first adapter, from the exact spectrum of τ: the rank that keeps a fraction of "
               "‖τ‖²_F, the knee of the energy curve, and Gavish–Donoho's optimal hard threshold (with a LoRA "
               "update's r singular values, a heuristic: `geometry/analysis/ranks.py`). Truncating keeps each "
               "module's top singular directions (the best approximation of that rank) and reports the energy kept.")
    e1, e2 = st.columns([2, 3])
    with e1:
        keep = st.slider("Energy kept per module (%)", 50, 100, 90, 1, key="a_energy",
                         help="The rank column and the download below use this fraction of ‖τ‖²_F.") / 100.0
    table = compute.rank_table(aset[first], keep)
    downloads.show(figures.built(rank_figures.rank_suggestions, table, adapter=first,
                                 title=f"Rank kept for {100 * keep:g}% energy, by layer\n{first}",
                                 energy=keep), f"ranks_{first}", table, key="rank_table")
    small = compute.compressed(aset[first], keep)
    kept = small.energy_by_module()
    with e2:
        st.metric(f"Sum of ranks at {100 * keep:g}% energy per module",
                  f"{int(table[f'rank for {100 * keep:g}% energy'].sum())} of {int(table['r'].sum())}",
                  help=f"Energy kept overall {100 * small.energy_kept:.2f}%, lowest module "
                       f"{100 * min(kept.values()):.2f}%.")
        st.download_button(":material/download: Truncated adapter (.zip, peft format)",
                           compute.merged_zip(small, None, None), file_name=f"{first}_energy{round(100 * keep)}.zip",
                           mime="application/zip", key="compress_zip", on_click="ignore",
                           help="The same adapter with each module truncated to the rank above (its head kept).")


view()
