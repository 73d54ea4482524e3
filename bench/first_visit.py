"""First visits in a real browser: a shared link on a freshly started server (cold) and on a running one (warm),
against the smallest Streamlit page (a title and one Plotly heatmap, ``bench/latency_floor_app.py``) measured the
same way in the same run.

* **cold**: for each target, a new ``streamlit run`` process (the sample adapters, a disk cache filled by an
  earlier server: what a container or a restarted demo has), and as soon as it answers ``/_stcore/health`` a
  fresh headless chromium opens the link; times from ``page.goto`` to the first ``h1`` of the main area
  (**heading**) and to the first Plotly figure drawn (**figure**). The floor is started and timed the same way.
* **warm**: one server, already visited once (its caches and imports warm) and idle; each page opened in a new
  browser context (a new session); times to the heading and to **settled** (the script finished and every
  figure drawn).

Ratios are to the floor's heading / figure times (cold) and heading / settled times (warm). Targets: cold at most
2x, warm heading at most 1.5x and settled at most 2x. The last line is one JSON object.

    .venv/bin/python -m bench.first_visit                     # cold: floor, /distances and /anatomy links; warm: every page
    .venv/bin/python -m bench.first_visit --repeats 3 --no-warm
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench.browser_latency import ARGS, REPO, _idle, chromium, streamlit_server

SAMPLES = REPO / "sample_adapters" / "real"
#: the cold shared links (their choices in the URL, as a shared link holds them), pages with a figure
COLD_LINKS = {"distances": "/distances?metric=grassmann&kind=v", "anatomy": "/anatomy?adapter=sst2"}
WARM_PAGES = ("", "anatomy", "distances", "inclusion", "tokens", "merge", "learned", "survey")

HEADING_JS = "() => { const h = document.querySelector('[data-testid=\"stMain\"] h1'); return !!(h && h.innerText.trim()); }"
FIGURE_JS = ("() => Array.from(document.querySelectorAll('.js-plotly-plot'))"
             ".some(d => d._fullLayout && (d.data || []).length > 0)")
SETTLED_JS = ("() => { const app = document.querySelector('[data-testid=\"stApp\"]');"
              " if (!app || app.getAttribute('data-test-script-state') !== 'notRunning') return false;"
              " return Array.from(document.querySelectorAll('.js-plotly-plot'))"
              ".every(d => d._fullLayout && (d.data || []).length > 0); }")


def _times(browser, url: str, settle: bool) -> dict[str, float]:
    context = browser.new_context(viewport={"width": 1366, "height": 900})
    page = context.new_page()
    page.set_default_timeout(300_000)
    t0 = time.perf_counter()
    page.goto(url, wait_until="commit")
    page.wait_for_function(HEADING_JS, polling="raf")
    out = {"heading": time.perf_counter() - t0}
    heading = page.evaluate("() => document.querySelector('[data-testid=\"stMain\"] h1').innerText.trim()")
    if settle:
        page.wait_for_timeout(300)  # the script-state attribute flips to running once the session starts
        page.wait_for_function(SETTLED_JS, polling="raf")
        out["settled"] = time.perf_counter() - t0
    else:
        page.wait_for_function(FIGURE_JS, polling="raf")
        out["figure"] = time.perf_counter() - t0
        out["heading_text"] = heading
    context.close()
    return out


def cold(target: str, link: str, cache: Path, samples: Path) -> dict[str, float]:
    """One fresh server for ``target`` (``floor`` or the app) and one first visit of ``link``."""
    from playwright.sync_api import sync_playwright

    app = REPO / "bench" / "latency_floor_app.py" if target == "floor" else None
    with streamlit_server(samples, cache, app=app) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium(), args=ARGS, headless=True)
        try:
            return _times(browser, f"{url}{link}", settle=False)
        finally:
            browser.close()


def warm(cache: Path, samples: Path, repeats: int = 3) -> dict[str, dict[str, float]]:
    from playwright.sync_api import sync_playwright

    from bench.soak import wait_until_idle

    out = {}
    with streamlit_server(samples, cache) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium(), args=ARGS, headless=True)
        try:
            first = browser.new_page()
            first.set_default_timeout(300_000)
            for name in WARM_PAGES:  # one visit of each page: the server's caches and imports warm
                first.goto(f"{url}/{name}")
                _idle(first)
            wait_until_idle(url.pid)
            runs: dict[str, list[dict]] = {}
            for _ in range(repeats):  # the pages in turn, each a new session; medians
                for name in WARM_PAGES:
                    runs.setdefault(name or "overview", []).append(_times(browser, f"{url}/{name}", settle=True))
            out = {k: {m: statistics.median(r[m] for r in v) for m in ("heading", "settled")} for k, v in runs.items()}
        finally:
            browser.close()
    with streamlit_server(cache, cache, app=REPO / "bench" / "latency_floor_app.py") as url, \
            sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium(), args=ARGS, headless=True)
        try:
            _times(browser, url, settle=True)
            floor = [_times(browser, url, settle=True) for _ in range(repeats)]
            out["floor"] = {m: statistics.median(r[m] for r in floor) for m in ("heading", "settled")}
        finally:
            browser.close()
    return out


def prime(cache: Path, samples: Path) -> None:
    """Fill the disk cache as an earlier server would: one visit of the cold links."""
    from playwright.sync_api import sync_playwright

    with streamlit_server(samples, cache) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium(), args=ARGS, headless=True)
        try:
            page = browser.new_page()
            page.set_default_timeout(300_000)
            for link in COLD_LINKS.values():
                page.goto(f"{url}{link}")
                _idle(page)
                page.wait_for_function(FIGURE_JS)
        finally:
            browser.close()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3,
                   help="cold starts per target, and warm visits per page (medians reported)")
    p.add_argument("--samples", type=Path, default=SAMPLES)
    p.add_argument("--no-warm", action="store_true")
    p.add_argument("--no-cold", action="store_true")
    args = p.parse_args(argv)
    if chromium() is None:
        raise SystemExit("needs Debian's chromium (apt install chromium)")
    work = Path(tempfile.mkdtemp(prefix="first_visit_"))
    result: dict = {"repeats": args.repeats}
    try:
        cache = work / "cache"
        prime(cache, args.samples)
        if not args.no_cold:
            runs: dict[str, list[dict]] = {"floor": [], **{k: [] for k in COLD_LINKS}}
            for _ in range(args.repeats):  # interleaved: the same machine state for each
                runs["floor"].append(cold("floor", "/", cache, args.samples))
                for name, link in COLD_LINKS.items():
                    runs[name].append(cold("app", link, cache, args.samples))
            med = {k: {m: statistics.median(r[m] for r in v) for m in ("heading", "figure")} for k, v in runs.items()}
            floor = med["floor"]
            print(f"cold floor (title + one heatmap): heading {floor['heading']:.2f} s, figure {floor['figure']:.2f} s")
            for name in COLD_LINKS:
                m = med[name]
                print(f"cold {name} ({COLD_LINKS[name]}): heading {m['heading']:.2f} s "
                      f"({m['heading'] / floor['heading']:.2f}x), first figure {m['figure']:.2f} s "
                      f"({m['figure'] / floor['figure']:.2f}x); first heading seen: {runs[name][0]['heading_text']!r}")
            result["cold"] = {k: {**v, "heading_ratio": v["heading"] / floor["heading"],
                                  "figure_ratio": v["figure"] / floor["figure"]} for k, v in med.items()}
        if not args.no_warm:
            w = warm(cache, args.samples, args.repeats)
            floor = w.pop("floor")
            print(f"warm floor: heading {floor['heading']:.2f} s, settled {floor['settled']:.2f} s")
            for name, v in w.items():
                print(f"warm {name}: heading {v['heading']:.2f} s ({v['heading'] / floor['heading']:.2f}x), "
                      f"settled {v['settled']:.2f} s ({v['settled'] / floor['settled']:.2f}x)")
            result["warm"] = {k: {**v, "heading_ratio": v["heading"] / floor["heading"],
                                  "settled_ratio": v["settled"] / floor["settled"]} for k, v in w.items()}
            result["warm_floor"] = floor
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
