"""Adapter Atlas dashboard: ``streamlit run app.py``.

The entry script: page setup, navigation between the thin page files in ``pages/``, and the
shared sidebar holding the session's adapter set (see ``ui/sidebar.py``).
"""

from __future__ import annotations

import streamlit as st

from ui import PageDone, app_run, loading, quiet_environment

quiet_environment()

st.set_page_config(
    layout="wide", page_title="Adapter Atlas", page_icon=":material/hub:", initial_sidebar_state=360
)

PAGES = [
    # The default page lives at "/" (Streamlit ignores a url_path here: "/overview" would be "Page not found").
    st.Page("pages/home.py", title="Overview", icon=":material/home:", default=True),
    st.Page("pages/anatomy.py", title="Anatomy", icon=":material/biotech:", url_path="anatomy"),
    st.Page("pages/distances.py", title="Distances", icon=":material/grid_on:", url_path="distances"),
    st.Page("pages/inclusion.py", title="Inclusion", icon=":material/join_inner:", url_path="inclusion"),
    st.Page("pages/tokens.py", title="Token dynamics", icon=":material/scatter_plot:", url_path="tokens"),
    st.Page("pages/merge.py", title="Merge", icon=":material/merge:", url_path="merge"),
    st.Page("pages/learned.py", title="Learned merge", icon=":material/model_training:", url_path="learned"),
    st.Page("pages/survey.py", title="Survey", icon=":material/travel_explore:", url_path="survey"),
]

page = st.navigation(PAGES, position="sidebar")
# A server's first visit: the page's title and what loads, at once (then the heavy imports, step by step).
screen = loading.first_run(page.title)

from geometry.device import configure_threads  # noqa: E402  (after the environment is set and the title is up)
from ui import sidebar, warmup  # noqa: E402

configure_threads()  # every core, or $ADAPTER_ATLAS_THREADS
screen.clear()
try:
    with app_run():  # pages check they run inside the app (see ui.require_app)
        page.run()
except PageDone:  # the page's stop (ui.stop_page): the sidebar is still drawn
    pass
# The sidebar after the page: the page's heading and first figure reach the browser before the sidebar's widgets
# (its callbacks ran before this script run, so the page already sees what they changed).
sidebar.render()
warmup.start()  # UMAP's numba compile, once per server process, in the background: after the first page is drawn
