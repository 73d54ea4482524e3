"""The first visit after a server start: a titled page that says what is loading, never a bare navigation.

A freshly started server (a container start, a demo that slept) imports PyTorch, pandas, Plotly and the library
on its first script run, then loads the sample set: seconds during which the page would show only its
navigation. :func:`first_run` draws the chosen page's title and a status box at once, imports those modules step
by step (each step named in the box as it starts), and clears the box just before the page draws itself. Later
runs of the process skip it (one flag per process; a run that fails half-way leaves the rest to the page).
"""

from __future__ import annotations

import importlib
import threading
import time

import streamlit as st

#: (what the box says, module imported) in order: the heavy imports of a first script run
STEPS = (
    ("PyTorch", "torch"),
    ("pandas and Plotly", "plotly.graph_objects"),
    ("the adapter library", "geometry.api"),
    ("the dashboard's views", "ui.sidebar"),
    ("the dashboard's figures", "ui.figures"),
    ("the dashboard's computations", "ui.compute"),
)

_DONE = threading.Event()
_LOCK = threading.Lock()


def preload() -> None:
    """Import :data:`STEPS` now, in the calling thread (``ui.serve`` runs it in a thread as the server process
    starts, so that a freshly started server has them, or most of them, before its first visitor's script run
    needs them). Holds the lock :func:`first_run` takes, so a first visitor waits for it instead of importing the
    same modules from a second thread; a failed import is left for the page to report."""
    with _LOCK:
        for _, module in STEPS:
            try:
                importlib.import_module(module)
            except Exception:  # noqa: BLE001  (the page's own import says what is wrong)
                return
        _DONE.set()


def done() -> bool:
    """Whether this process has imported what a page needs (a later run draws at once)."""
    return _DONE.is_set()


class Screen:
    """The loading box (an ``st.empty`` at the top of the main area); :meth:`clear` removes it."""

    def __init__(self, box):
        self.box = box

    def clear(self) -> None:
        if self.box is not None:
            self.box.empty()
            self.box = None


def first_run(title: str) -> Screen:
    """On the process's first run: show ``title`` and import :data:`STEPS`, saying which one loads; returns the
    screen to clear before the page draws. On later runs: nothing is drawn."""
    if _DONE.is_set():
        return Screen(None)
    box = st.empty()
    with box.container():
        st.title(title)
        status = st.status("Loading the analysis libraries: the first visit since this server started",
                           expanded=True)
    t0 = time.perf_counter()
    with _LOCK:  # concurrent first visitors: one imports, the others wait here (the import lock would anyway)
        for label, module in STEPS:
            status.write(f"{label}…")
            importlib.import_module(module)
        _DONE.set()
    status.update(label=f"Libraries loaded in {time.perf_counter() - t0:.1f} s; loading the adapters…",
                  state="running")
    return Screen(box)
