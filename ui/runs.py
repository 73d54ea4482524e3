"""Run control of the dashboard's long work: progress bars with time left and Cancel, the heavy-run queue,
the results a cancelled run keeps, and the live learned merge run (:class:`LiveRun`) in its background thread."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import streamlit as st

from ui import cache

Progress = Callable[[int, int, str], None]


@contextmanager
def progress_bar(label: str, *, cancel: bool = True, on_cancel: Callable[[], None] | None = None):
    """A visible progress bar (not in a collapsed box) with the count, the elapsed time and an estimate
    of what is left; yields a ``progress(done, total, message)`` callback.

    ``cancel``: a Cancel button beside the bar. Clicking it reruns the page, which stops this run at its
    next progress update; every step that finished is already in the disk cache (each evaluation,
    each pair), so nothing done is lost and a new run resumes from there. ``on_cancel`` runs first (a
    page whose run starts by itself turns off what started it there).
    """
    holder = st.empty()
    box = holder.container(border=True)
    bar = box.progress(0.0, text=f"{label}…")
    if cancel:
        box.button("Cancel (finished steps are kept)", key=f"cancel_{next(_BARS)}",
                   icon=":material/cancel:", on_click=on_cancel)
    start = time.perf_counter()

    def update(done: int, total: int, message: str = "") -> None:
        frac = 0.0 if total <= 0 else min(1.0, max(0.0, done / total))
        elapsed = time.perf_counter() - start
        left = f" · about {_seconds(elapsed / done * (total - done))} left" if 0 < done < total else ""
        detail = f" · {message}" if message else ""
        bar.progress(frac, text=f"{label}: {done}/{total} · {_seconds(elapsed)} elapsed{left}{detail}")

    yield update
    holder.empty()


#: Scoring throughput measured on the 2-core development machine (all-MiniLM-L6-v2 with a LoRA applied
#: by the runtime, 200 test examples in 1.1 s), plus the merge itself: for cost estimates only.
EXAMPLES_PER_SECOND = 180.0


SECONDS_PER_MERGE = 0.3


def estimate_seconds(evaluations: int, examples: int) -> str:
    """A rough wall time for ``evaluations`` scores of ``examples`` examples each (see EXAMPLES_PER_SECOND)."""
    return _seconds(evaluations * (examples / EXAMPLES_PER_SECOND + SECONDS_PER_MERGE / 2))


_BARS = itertools.count()


def _seconds(value: float) -> str:
    return f"{value:.0f} s" if value < 90 else f"{value / 60:.1f} min"


def queued(update):
    """A heavy run's slot in the server-wide queue of a demo server (``ui.demo.heavy_slot``); while it
    waits, the progress bar says so (and its Cancel button still works)."""
    from ui import demo
    from ui.memory import fmt

    return demo.heavy_slot(
        waiting=lambda s: update(0, 1, f"queued behind another visitor's run ({s:.0f} s)"),
        waiting_memory=lambda s, free: update(0, 1, f"waiting for memory: this server's budget is full ({fmt(max(free, 0))} "
                                                    f"free; idle visitors' uploads are released in time) ({s:.0f} s)"))


def _keep_partial(namespace: str, key: tuple):
    """A callback that keeps the latest partial result of a run in the session (see :func:`partial`)."""
    def keep(result) -> None:
        st.session_state.setdefault("_partial_results", {})[(namespace, key)] = result
    return keep


def _mark_cancelled(namespace: str, key: tuple):
    """``on_cancel`` of the bar of a run starting now: forgets an earlier cancel of this run and remembers in
    the session that this one was cancelled if its Cancel is clicked (see :func:`cancelled`)."""
    st.session_state.get("_cancelled_runs", set()).discard((namespace, key))

    def mark() -> None:
        st.session_state.setdefault("_cancelled_runs", set()).add((namespace, key))
    return mark


def cancelled(namespace: str, key: tuple) -> bool:
    """Whether the last run of ``namespace`` on ``key`` in this session was cancelled (with or without a
    step finished: before the first one :func:`partial` has nothing, and the page says so)."""
    return (namespace, key) in st.session_state.get("_cancelled_runs", set())


def partial(namespace: str, key: tuple):
    """What a run of ``namespace`` on ``key`` finished before it was cancelled (or ``None``).

    Runs report their partial results after each step; a Cancel click reruns the page, which stops the
    run, and the page shows this until a complete result exists (labelled as partial).
    """
    return st.session_state.get("_partial_results", {}).get((namespace, key))


@dataclass
class LiveRun:
    run: Any  # geometry.learned.LearnedMergeRun
    settings: tuple
    evaluate_every: int
    limit: int | None
    coefficients: list[tuple[int, np.ndarray]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    was_running: bool = False
    started: float | None = None
    ended: float | None = None
    #: Whether the browser session that started the run is still there (``ui.demo.session_liveness``);
    #: checked after every step: a run whose session has gone stops (keeping what it reached).
    alive: Callable[[], bool] | None = None
    stopped_because: str | None = None

    def wall_seconds(self) -> float:
        """Seconds since Start (frozen when the run ends)."""
        if self.started is None:
            return 0.0
        if not self.run.running and self.ended is None:
            self.ended = time.perf_counter()
        return (self.ended if self.ended is not None and not self.run.running else time.perf_counter()) - self.started

    def record(self, state) -> None:
        """``on_step`` callback (the run's thread): keep the coefficients of this step."""
        with self.lock:
            self.coefficients.append((int(state.step), np.array(state.coefficients, dtype=float)))
        if self.alive is not None and not self.alive():
            self.stopped_because = "the browser session that started it has gone"
            self.run.stop()

    def start(self) -> None:
        init = np.array(self.run.coefficients, dtype=float)
        with self.lock:
            if not self.coefficients:
                self.coefficients.append((0, init))
        self.started, self.ended = time.perf_counter(), None
        # the ANP every k steps, and of the final coefficients (a run shorter than k steps still gets one)
        self.run.start(evaluate_every=self.evaluate_every, limit=self.limit, on_step=self.record, evaluate_at_end=True)
        self.was_running = True

    def coefficient_frame(self) -> pd.DataFrame:
        """Long table ``step, adapter, layer, coefficient`` of every recorded step."""
        names, layers = list(self.run.names), [str(v) for v in self.run.layout.layers]
        with self.lock:
            items = list(self.coefficients)
        rows = [{"step": step, "adapter": names[t], "layer": layers[k], "coefficient": float(gamma[t, k])}
                for step, gamma in items for t in range(gamma.shape[0]) for k in range(gamma.shape[1])]
        return pd.DataFrame(rows, columns=["step", "adapter", "layer", "coefficient"])

    def history_frame(self) -> pd.DataFrame:
        with self.run._lock:
            hist = [dict(h) for h in self.run.history]
        return pd.DataFrame([{"step": h["step"], "objective": h["objective"]} for h in hist],
                            columns=["step", "objective"])

    def anp_frame(self) -> pd.DataFrame:
        with self.run._lock:
            evals = [dict(e) for e in self.run.evaluations]
        return pd.DataFrame([{"step": e["step"], "ANP (%)": e["anp"]} for e in evals], columns=["step", "ANP (%)"])


def make_run(method: str, adapters: Any, tasks: Any, **kwargs: Any) -> Any:
    """A run of ``geometry.learned.METHODS[method]`` (``divmerge`` / ``adamerging``) on the dashboard's disk cache
    (``ui.cache.results()``): the fine-tuned models' references, the scores and the finished result are kept
    there, so Start after a Stop or a restart does not compute them again."""
    from geometry.learned import METHODS

    return METHODS[method](adapters, tasks, cache=cache.results(), **kwargs)
