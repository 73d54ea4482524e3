"""The latency floor of ``bench/browser_latency.py`` and ``bench/first_visit.py``: the smallest Streamlit page with a
title, one control and one figure.

A title and one segmented control that redraws one 11 x 11 heatmap (built by ``ui.figures.matrix_heatmap``, as on the
Distances page) and nothing else: no sidebar, no fragment, no other element. Its click-to-figure time
in the same browser, on the same machine, in the same run is what a Streamlit round trip costs here;
the dashboard's pages are reported against it.
"""

import numpy as np
import streamlit as st

from ui import figures  # the repository's ui/: browser_latency.streamlit_server sets PYTHONPATH to the root

st.title("Floor")
choice = st.segmented_control("Metric", ["L2", "cosine", "Grassmann"], default="cosine", key="m")
rng = np.random.default_rng(["L2", "cosine", "Grassmann"].index(choice or "cosine"))
names = [f"adapter_{i:02d}" for i in range(11)]
st.plotly_chart(figures.matrix_heatmap(rng.random((11, 11)), names, title=f"{choice} distance\nfloor",
                                       value_label="distance"), theme="streamlit")
