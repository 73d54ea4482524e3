"""Real-browser end-to-end test of the dashboard: Debian's chromium driven by Python playwright.

Starts ``streamlit run app.py`` on a free local port (tiny sample adapters, private disk cache),
opens every page, uploads a real adapter .zip through the file uploader, moves the layer slider
and switches query / value on the Distances page (the heatmap data must change), and saves
screenshots at two laptop widths into ``test-artifacts/`` (git-ignored) for a person to look at.

Skips when ``chromium`` is not installed (``.ci/run`` installs it with apt). Never runs
``playwright install``.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import socket
import time
import zipfile
from pathlib import Path

import pytest

from tests.app_fixtures import adapter_zip_bytes, write_sample_set

pytestmark = [pytest.mark.browser, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = shutil.which("chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
UPLOADED = "MatthewZhang473__LoRA_Qwen0.5B__r6_alpha32"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _streamlit(tmp: Path, samples: Path):
    """``streamlit run app.py`` on a free port with its own disk cache (``bench/browser_latency.py``'s
    server, shared with the latency benchmark); yields the URL once healthy. Log: ``tmp/streamlit.log``."""
    from bench.browser_latency import streamlit_server

    try:
        with streamlit_server(samples, tmp / "cache") as url:
            yield url
    except RuntimeError as exc:
        log = tmp / "streamlit.log"
        pytest.fail(f"{exc}: {log.read_text()[-2000:] if log.is_file() else 'no log'}")


def _samples(tmp: Path) -> Path:
    """The bundled sample adapters (what a user sees) when there are enough, else tiny generated ones."""
    from ui.adapter_set import list_sample_adapters

    real = REPO / "sample_adapters" / "synthetic"
    return real if len(list_sample_adapters(real)) >= 3 else write_sample_set(tmp / "samples", n=4, layers=6)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    tmp = tmp_path_factory.mktemp("browser")
    with _streamlit(tmp, _samples(tmp)) as url:
        yield url


@pytest.fixture(scope="module")
def upload_zip(tmp_path_factory, request) -> Path:
    """A real third-party adapter zipped (from ../shared when present), else a tiny generated one."""
    out = tmp_path_factory.mktemp("upload")
    real = REPO.parent / "shared" / "real_adapters" / UPLOADED
    target = out / f"{UPLOADED if real.is_dir() else 'uploaded'}.zip"
    if real.is_dir():
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            for f in sorted(real.iterdir()):
                if f.name in ("adapter_config.json", "adapter_model.safetensors"):
                    zf.write(f, f.name)
        target.write_bytes(buf.getvalue())
    else:
        target.write_bytes(adapter_zip_bytes(seed=11))
    return target


def _idle(page, timeout: float = 60.0) -> None:
    """Wait until the script run finished (``stApp`` reports ``notRunning``) and the page settled."""
    page.wait_for_timeout(250)
    page.wait_for_function(
        "() => { const app = document.querySelector('[data-testid=\"stApp\"]');"
        " return app && app.getAttribute('data-test-script-state') === 'notRunning'"
        " && !document.querySelector('[data-testid=\"stSkeleton\"]'); }",
        timeout=timeout * 1000,
    )
    page.wait_for_timeout(250)


def _plots(page) -> list:
    """The data of each Plotly figure on the page: [[z or y of each trace], ...]."""
    return page.evaluate(
        """() => Array.from(document.querySelectorAll('.js-plotly-plot')).map(
               d => (d.data || []).map(t => JSON.stringify(t.z !== undefined ? t.z : t.y)))"""
    )


def _wait_plots(page, n: int, timeout: float = 60.0) -> None:
    page.wait_for_function(
        f"() => document.querySelectorAll('.js-plotly-plot .main-svg').length >= {n}", timeout=timeout * 1000
    )


def _wait_change(page, before, index: int = 0, timeout: float = 30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        now = _plots(page)
        if len(now) > index and now[index] and now[index] != before[index]:
            return now
        page.wait_for_timeout(250)
    _shot(page, "failure_figure_did_not_change")
    raise AssertionError(f"figure {index} did not change (screenshot test-artifacts/failure_figure_did_not_change.png)")


T0 = time.time()


def _shot(page, name: str) -> None:
    """Screenshot of the whole page: Streamlit scrolls inside its main container, so the viewport is
    stretched to the content height for the shot (capped), then restored."""
    ARTIFACTS.mkdir(exist_ok=True)
    _idle(page)
    size = page.viewport_size
    height = page.evaluate(
        "() => Math.max(...['[data-testid=\"stMain\"]', '[data-testid=\"stSidebarContent\"]'].map("
        "s => (document.querySelector(s) || {scrollHeight: 0}).scrollHeight))"
    )
    page.set_viewport_size({"width": size["width"], "height": int(min(max(height, size["height"]), 6000))})
    page.wait_for_timeout(600)  # plotly relayout after the resize
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))
    page.set_viewport_size(size)
    print(f"{time.time() - T0:6.1f}s {name}")


def _nav(page, label: str) -> None:
    page.locator('[data-testid="stSidebarNav"]').get_by_text(label, exact=True).click()
    _idle(page)


def test_dashboard_end_to_end(server, upload_zip):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1366, "height": 768})
            page.set_default_timeout(60_000)
            page.goto(server)
            page.get_by_role("heading", name="Adapter Atlas").wait_for()
            _idle(page)
            _shot(page, "01_overview_1366")

            # Upload a real adapter zip through the sidebar's file uploader.
            page.locator('[data-testid="stSidebar"]').get_by_text("Add adapters").click()
            page.locator('[data-testid="stSidebar"] input[type="file"]').set_input_files(str(upload_zip))
            loaded = f"loaded {upload_zip.stem}"
            page.get_by_text(loaded).wait_for(timeout=60_000)
            _idle(page)
            assert not page.locator('[data-testid="stSidebar"] [data-testid="stAlertContentError"]').count()
            _shot(page, "02_uploaded")

            # Anatomy: pick the uploaded adapter; its norm heatmap appears.
            _nav(page, "Anatomy")
            _wait_plots(page, 3)
            page.locator('[data-testid="stMain"] [data-testid="stSelectbox"]').first.click()
            page.get_by_role("option", name=upload_zip.stem).click()
            _idle(page)
            _wait_plots(page, 3)
            page.locator(".js-plotly-plot").filter(has_text=upload_zip.stem).first.wait_for()
            _shot(page, "03_anatomy_uploaded")

            # Distances: the layer slider and the query / value switch change the heatmap.
            _margins_fit(page)
            _nav(page, "Distances")
            _wait_plots(page, 3)
            _shot(page, "04_distances_all_layers")
            _margins_fit(page)
            before = _plots(page)
            page.get_by_text("one layer", exact=True).click()
            _idle(page)
            after_one = _wait_change(page, before)
            slider = page.locator('[data-testid="stSlider"] [aria-label="Layer"]').first
            box = slider.bounding_box()
            page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
            page.mouse.down()
            page.mouse.move(box["x"] - 200, box["y"] + box["height"] / 2, steps=8)
            page.mouse.up()
            _idle(page)
            after_move = _wait_change(page, after_one)
            assert after_move[0] != after_one[0]
            _shot(page, "05_distances_slider_moved")
            page.get_by_text("q", exact=True).click()
            _idle(page)
            after_q = _wait_change(page, after_move)
            assert after_q[0] != after_move[0]
            page.get_by_text("MDS", exact=True).click()
            _idle(page)
            after_q = _wait_change(page, after_q, index=1)  # the map is redrawn by MDS
            # The URL holds the view: a copied link reopens the same metric, kind, layer and map method.
            try:
                page.wait_for_function(
                    "() => location.search.includes('kind=q') && location.search.includes('layers=one')"
                    " && location.search.includes('map=MDS')", timeout=30_000
                )
            except Exception:
                _shot(page, "failure_url")
                raise AssertionError(f"the URL does not hold the view: {page.url}") from None
            link = browser.new_page(viewport={"width": 1366, "height": 768})
            link.goto(page.url)
            _wait_plots(link, 3)
            _idle(link)
            assert _plots(link)[0] == after_q[0]
            assert _plots(link)[1] == after_q[1]  # the same MDS map
            link.close()
            page.get_by_text("Query vs value side by side").click()
            _idle(page)
            _wait_plots(page, 4)
            _shot(page, "06_distances_query_vs_value")

            # Inclusion: one pair (Figure 2 layout), then all pairs (the asymmetric matrix).
            _nav(page, "Inclusion")
            _wait_plots(page, 2)
            _shot(page, "07_inclusion_pair")
            _margins_fit(page)
            page.get_by_text("all pairs", exact=True).click()
            _idle(page)
            _wait_plots(page, 1)
            page.get_by_text("Direction: row τ_i → column τ_j").wait_for()
            _shot(page, "08_inclusion_matrix")

            # A narrower laptop and the dark theme.
            page.set_viewport_size({"width": 1280, "height": 800})
            _nav(page, "Distances")
            _wait_plots(page, 3)
            _shot(page, "09_distances_1280")
            # Dark theme: the app follows the system setting (no fixed theme in .streamlit/config.toml).
            page.emulate_media(color_scheme="dark")
            page.wait_for_timeout(500)
            _shot(page, "10_distances_dark_1280")
            _nav(page, "Anatomy")
            _wait_plots(page, 3)
            _shot(page, "11_anatomy_dark_1280")
            background = page.evaluate(
                "() => getComputedStyle(document.querySelector('[data-testid=\"stApp\"]')).backgroundColor"
            )
            assert sum(int(v) for v in background[background.index("(") + 1 : -1].split(",")[:3]) < 200, background
            _nav(page, "Merge")
            _shot(page, "12_merge_dark_1280")
            errors = page.locator('[data-testid="stException"]').count()
            assert errors == 0
        finally:
            browser.close()


MARGINS_JS = """() => Array.from(document.querySelectorAll('.js-plotly-plot')).flatMap(d => {
    const m = (d.layout || {}).margin || {}, s = (d._fullLayout || {})._size || {};
    const title = String(((d.layout || {}).title || {}).text || '').replace(/<[^>]+>/g, '');
    return ['l', 'r', 't', 'b'].filter(k => m[k] !== undefined && s[k] > m[k] + 1)
        .map(k => `${title}: margin ${k} ${m[k]} -> ${Math.round(s[k])} px`); })"""


def _margins_fit(page) -> None:
    """No figure on the page had its margins widened by Plotly's automargin, which draws it a second time
    (``ui.figures.fit_margins``; half of a control change's time in the browser before)."""
    page.wait_for_timeout(500)
    assert page.evaluate(MARGINS_JS) == []


PAGE_URLS = {"overview": "Adapter Atlas", "anatomy": "Adapter anatomy", "distances": "Distances between adapters",
             "inclusion": "Spectral inclusion", "merge": "Merging adapters", "learned": "Learned merges"}
TITLES = ["Overview", "Anatomy", "Distances", "Inclusion", "Merge", "Learned merge"]


def _inside_the_app(page, path: str) -> None:
    """The page at ``path`` is drawn inside app.py: titled navigation, the shared sidebar, the page's heading.

    Run on its own, a page shows the file names (``app``, ``anatomy``, ``distances``, ...) as navigation
    and no adapter sidebar.
    """
    _idle(page, timeout=120)
    labels = ""
    deadline = time.time() + 60
    while time.time() < deadline:
        nav = page.locator('[data-testid="stSidebarNav"]')
        labels = nav.inner_text() if nav.count() else ""
        if all(t in labels for t in TITLES):
            break
        page.wait_for_timeout(500)
    else:
        _shot(page, f"failure_link_{path}")
        raise AssertionError(f"/{path}: navigation is not the app's: {labels!r}")
    words = labels.split()  # icon ligatures (home, merge, ...) are words too; file names are lower case
    for raw in ("app", "distances", "inclusion"):
        assert raw not in words, f"/{path}: navigation shows the raw file name {raw!r}: {labels!r}"
    page.locator('[data-testid="stSidebar"]').get_by_text("Add adapters").wait_for(timeout=30_000)
    page.locator('[data-testid="stMain"] h1').first.wait_for(timeout=60_000)
    heading = page.locator('[data-testid="stMain"] h1').first.inner_text()
    assert PAGE_URLS[path] in heading, f"/{path}: heading {heading!r}"


def test_merge_cancel_keeps_the_finished_tasks_and_the_next_run_finishes(server):
    """In a real browser: Cancel under the scoring bar stops the run; the page names the tasks finished
    (partial ANP, labelled) and the next press scores only what is left, to the complete ANP."""
    import re

    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1366, "height": 900})
            page.set_default_timeout(120_000)
            page.goto(f"{server}/merge")
            _idle(page)
            main = page.locator('[data-testid="stMain"]')
            score = main.get_by_role("button", name="Score the merged model on every task")
            if score.is_disabled():
                pytest.skip("no task data for these adapters")
            score.click()
            main.get_by_role("button", name=re.compile("Cancel")).wait_for()
            done = 0
            for _ in range(600):  # until one task (its fine-tuned and merged evaluations) is finished
                counts = re.search(r"Scoring fine-tuned and merged models: (\d+)/(\d+)", main.inner_text())
                done = int(counts.group(1)) if counts else done
                if done >= 3:
                    break
                page.wait_for_timeout(200)
            main.get_by_role("button", name=re.compile("Cancel")).click()
            note = main.get_by_text(re.compile(r"Cancelled after [12] of 3 tasks"))
            note.wait_for()
            assert main.get_by_text(re.compile(r"ANP over the (1 task|2 tasks) scored \(partial\)")).count() == 1
            _shot(page, "13_merge_cancelled")
            score.click()
            main.get_by_text("ANP (average normalized performance)", exact=True).wait_for()
            _idle(page)
            assert main.get_by_text(re.compile("Cancelled after")).count() == 0
        finally:
            browser.close()


def test_shared_links_open_inside_the_app_on_a_fresh_server(tmp_path):
    """A copied link is the first request a fresh server gets (a hosted demo waking up), and two more
    arrive before the entry script's first run has finished: each page still has the app around it."""
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with _streamlit(tmp_path, _samples(tmp_path)) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            first = browser.new_context(viewport={"width": 1366, "height": 768}).new_page()
            first.goto(f"{url}/distances")  # the server's very first script run
            early = {}
            for path in ("anatomy", "inclusion"):  # while the first run is still loading the set
                early[path] = browser.new_context(viewport={"width": 1366, "height": 768}).new_page()
                early[path].goto(f"{url}/{path}")
            _inside_the_app(first, "distances")
            _shot(first, "13_fresh_server_link_distances")
            for path, page in early.items():
                _inside_the_app(page, path)
            for path in PAGE_URLS:  # every page by its URL, each in a fresh browser context
                page = browser.new_context(viewport={"width": 1366, "height": 768}).new_page()
                page.goto(f"{url}/{path}" if path != "overview" else url)
                _inside_the_app(page, path)
                page.context.close()
        finally:
            browser.close()
