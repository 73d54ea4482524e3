"""The Learned merge page's live run: one DivMerge / AdaMerging run per session, in a background thread.

:class:`LiveRun` holds the library's run (``geometry.learned``), the coefficients after every step
(for the lines of the page) and the settings it was started with. It lives in ``st.session_state``
(a running computation, not a cache): leaving the page and coming back shows the same run, and
the Stop button keeps the coefficients reached. Pure Python, no Streamlit import.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd


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
        self.run.start(evaluate_every=self.evaluate_every, limit=self.limit, on_step=self.record)
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


def make_run(method: str, adapters: Any, tasks_dir: Any, **kwargs: Any) -> Any:
    """A run of ``geometry.learned.METHODS[method]`` (``divmerge`` / ``adamerging``) on the dashboard's disk cache
    (``ui.cache.results()``): the fine-tuned models' references, the scores and the finished result are kept
    there, so Start after a Stop or a restart does not compute them again."""
    from geometry.learned import METHODS
    from ui import cache

    return METHODS[method](adapters, tasks_dir, cache=cache.results(), **kwargs)
