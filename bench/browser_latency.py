"""Click-to-redrawn-figure latency of the dashboard in a real browser (headless Debian chromium + playwright).

Starts ``streamlit run app.py`` on a free local port (the sample adapters, a private disk cache,
caches warmed by a first visit of each page), waits until the server is idle (its start-up warm-up
done), then on each page clicks a control back and forth and
times, from the click to the moment the figure's data in the page has changed (polled every animation
frame), at least ``clicks`` times per page:

* Distances: the metric (L2 / cosine / Grassmann) and the projection (q / v);
* Inclusion: "L1 on" (raw spectra / normalized);
* Anatomy: the adapter shown (a select box: opening it is not timed, the pick of another adapter is;
  every figure of the page changes), and, reported apart as ``anatomy_compare``, "Compare with a
  second adapter" (on / off): the second adapter's figures appear (five figures) or go (three), and
  the time runs until the page holds the new number of figures, every one drawn.

``measure(...)`` returns the times per page; ``bench/dashboard_bench.py`` prints p50 / p95. Imported from the
repository root (``python -m bench.dashboard_bench``, or pytest): the dashboard's ``deploy/`` and ``ui/``
live beside the installed library, not inside it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

from deploy import served  # the repository's deploy/, beside the library: imported from the root

REPO = Path(__file__).resolve().parents[1]

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
FIGURES_JS = """() => Array.from(document.querySelectorAll('.js-plotly-plot')).map(
    d => (d.data || []).map(t => JSON.stringify([t.z, t.y, t.x, t.type])).join('|'))"""


def chromium() -> str | None:
    return shutil.which("chromium")


class ServerURL(str):
    """The server's URL; ``pid`` is the ``streamlit run`` process (for its memory)."""

    pid: int


@contextmanager
def streamlit_server(samples: Path, cache: Path, env: dict[str, str] | None = None, app: Path | None = None):
    """``streamlit run app.py`` (or ``app``) on a free local port over ``samples`` with the disk cache
    ``cache`` (and extra environment ``env``); yields its URL (a :class:`ServerURL`) once healthy."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, ADAPTER_ATLAS_SAMPLES=str(samples), ADAPTER_ATLAS_CACHE=str(cache), HF_HUB_OFFLINE="1",
               PYTHONPATH=str(REPO), **(env or {}))
    cache.mkdir(parents=True, exist_ok=True)
    log = open(cache.parent / "streamlit.log", "w")
    # the dashboard as its container starts it (ui.serve: the heavy imports begin with the process); another app
    # (the latency floor) with plain `streamlit run`
    launch = ["-m", "ui.serve"] if app is None else ["-m", "streamlit", "run", str(app)]
    proc = subprocess.Popen(
        [sys.executable, *launch, "--server.headless", "true",
         "--server.port", str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false",
         "--server.fileWatcherType", "none"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = ServerURL(f"http://127.0.0.1:{port}")
    url.pid = proc.pid
    try:
        with served(url, proc, 90, "streamlit"):
            yield url
    finally:
        log.close()


def _idle(page, timeout: float = 300.0) -> None:
    page.wait_for_function(
        "() => { const app = document.querySelector('[data-testid=\"stApp\"]');"
        " return app && app.getAttribute('data-test-script-state') === 'notRunning'; }", timeout=timeout * 1000)


COUNT_JS = """(n) => { const f = Array.from(document.querySelectorAll('.js-plotly-plot'));
    return f.length === n && f.every(d => d._fullLayout && (d.data || []).length > 0); }"""


def _click_times(page, labels: list[str], clicks: int, figure: int | None,
                 counts: dict[int, int] | None = None) -> list[float]:
    """Click the controls named ``labels`` in turn; seconds from each click to the redrawn figure.

    ``figure``: the index of the figure whose data must change; ``None``: the click changes the number
    of figures, and the time runs until the page holds ``counts[figures before]`` figures, all drawn
    (learnt by a warm-up round: :func:`_learn_counts`).
    Timed inside the page: from the ``pointerdown`` event (a capture listener) to the first animation
    frame at which the figure's data differs, so the driver's own overhead is not counted.
    """
    page.evaluate("() => { if (!window.__atlasClick) { window.__atlasClick = true; document.addEventListener("
                  "'pointerdown', () => { window.__t0 = performance.now(); }, true); } }")
    times = []
    for k in range(clicks):
        target = _target(page, labels[k % len(labels)])
        if figure is None:
            expected = counts[page.evaluate("() => document.querySelectorAll('.js-plotly-plot').length")]
            target.click()
            page.wait_for_function(f"(n) => {{ const done = ({COUNT_JS})(n); if (done) window.__t1 = performance.now();"
                                   " return done; }", arg=expected, polling="raf", timeout=60_000)
        else:
            before = page.evaluate(FIGURES_JS)[figure]
            target.click()
            page.wait_for_function(f"(b) => {{ const f = ({FIGURES_JS})(); const done = f.length > {figure} && f[{figure}]"
                                   f" && f[{figure}] !== b; if (done) window.__t1 = performance.now(); return done; }}",
                                   arg=before, polling="raf", timeout=60_000)
        times.append(page.evaluate("() => (window.__t1 - window.__t0) / 1000"))
        _idle(page)
    return times


def _target(page, action):
    """The element whose click is timed: a control named ``action`` (its text), or, for ``("select", label,
    option)``, the option of the select box ``label`` (the box is opened first, untimed)."""
    main = page.locator('[data-testid="stMain"]')
    if isinstance(action, tuple):
        _, label, option = action
        box = main.locator('[data-testid="stSelectbox"]').filter(has_text=label).first
        box.scroll_into_view_if_needed()
        box.get_by_role("combobox").click()
        target = page.get_by_role("option", name=option, exact=True).first
        target.wait_for()
        return target
    target = main.get_by_text(action, exact=True).filter(visible=True).first
    target.scroll_into_view_if_needed()
    return target


def _learn_counts(page, labels: list[str]) -> dict[int, int]:
    """``{figures before: figures after}`` of each click of a warm-up round (controls that add figures)."""
    counts = {}
    for label in labels * 2:
        n0 = _settled_count(page)
        _target(page, label).click()
        _idle(page)
        counts[n0] = _settled_count(page)
    return counts


def _settled_count(page) -> int:
    """The number of figures on the page once it stays the same for 4 polls in a row (0.8 s)."""
    seen: list[int] = []
    while len(seen) < 4 or len(set(seen[-4:])) > 1:
        page.wait_for_timeout(200)
        seen.append(page.evaluate("() => document.querySelectorAll('.js-plotly-plot').length"))
    return seen[-1]


def measure_floor(cache: Path, clicks: int = 20) -> list[float]:
    """Click-to-figure seconds of ``bench/latency_floor_app.py`` (one control, one heatmap): the baseline."""
    from playwright.sync_api import sync_playwright

    with streamlit_server(cache, cache, app=REPO / "bench" / "latency_floor_app.py") as url, \
            sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium(), args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1366, "height": 900})
            page.set_default_timeout(300_000)
            page.goto(url)
            _idle(page)
            page.wait_for_function("() => document.querySelectorAll('.js-plotly-plot').length > 0")
            labels = ["L2", "Grassmann", "cosine"]
            _click_times(page, labels, len(labels), 0)
            return _click_times(page, labels, clicks, 0)
        finally:
            browser.close()


def measure(samples: Path, cache: Path, clicks: int = 20) -> dict[str, list[float]]:
    """``{page: [seconds per click]}`` for Distances, Inclusion, Anatomy and Anatomy's comparison toggle."""
    from playwright.sync_api import sync_playwright

    out: dict[str, list[float]] = {}
    with streamlit_server(samples, cache) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium(), args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1366, "height": 900})
            page.set_default_timeout(300_000)
            plan = [
                ("distances", ["Grassmann", "L2", "cosine", "q", "v"], 0),
                ("inclusion", ["normalized", "raw spectra"], 0),
                ("anatomy", [("select", "Adapter", "negation"), ("select", "Adapter", "acceptability")], 0),
                ("anatomy_compare", ["Compare with a second adapter"], None),
            ]
            from soak import wait_until_idle  # bench/, next to this file (soak imports this module)

            page.goto(url)
            _idle(page)
            wait_until_idle(url.pid)  # the app's start-up warm-up (UMAP's numba load) off these cores first
            for name, labels, figure in plan:
                page.goto(f"{url}/{name.split('_')[0]}")
                _idle(page)
                page.wait_for_function(f"() => document.querySelectorAll('.js-plotly-plot').length > {figure or 0}")
                counts = _learn_counts(page, labels) if figure is None else None
                _click_times(page, labels, len(labels), figure, counts)  # warm-up round: caches, first figures
                out[name] = _click_times(page, labels, clicks, figure, counts)
        finally:
            browser.close()
    return out
