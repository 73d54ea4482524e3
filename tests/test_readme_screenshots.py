"""The README's screenshots, made in a real browser from the real sample set.

Starts ``streamlit run app.py`` on ``sample_adapters/real`` (the set a new user sees first), opens each of
the six views the README shows (Distances, Inclusion, Anatomy, Merge, Learned merge, Token dynamics) in
Debian's chromium at 1280 x 800 in the light theme, does the least that makes the view draw its main
figure (Merge: score a TIES merge on 50 test examples per task; Learned merge: a short DivMerge run),
checks that the page shows no exception and at least one Plotly figure, and saves a 1280 px wide PNG of
the page from its heading down to the bottom of its main figure.

The PNGs go to ``test-artifacts/readme/`` (git-ignored) and to the folder named by
``ADAPTER_ATLAS_README_IMAGES``; without that variable the module is skipped (it is a regeneration tool, and
the suite keeps its time: ``tests/test_readme.py`` checks the committed images). To regenerate them::

    ADAPTER_ATLAS_README_IMAGES=docs/images OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/test_readme_screenshots.py

Skips when ``chromium`` is not installed (``.ci/run`` installs it with apt). Never runs
``playwright install``.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from tests.test_browser import ARGS, CHROMIUM, REPO, _idle, _nav, _streamlit, _wait_plots

pytestmark = [
    pytest.mark.browser, pytest.mark.slow,
    # a regeneration tool more than a check (about 4 minutes of the suite on 2 cores, 15 under load): the README's
    # images are checked by tests/test_readme.py (present, real PNGs); tests/test_browser.py opens every page
    pytest.mark.skipif(not os.environ.get("ADAPTER_ATLAS_README_IMAGES"),
                       reason="regenerates the README's screenshots: set ADAPTER_ATLAS_README_IMAGES=docs/images"),
]

OUT = REPO / "test-artifacts" / "readme"
SAMPLES = REPO / "sample_adapters" / "real"
WIDTH, HEIGHT = 1280, 800
MAX_BYTES = 250_000  # per PNG: the README shows six of them
MAX_CLIP = 1500  # px: taller than this, the shot starts at the view's controls instead of the heading
WAIT = 600.0  # s: a loaded 2-core machine computes the real set's figures from an empty cache


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    from ui.adapter_set import list_sample_adapters

    if len(list_sample_adapters(SAMPLES)) < 3:
        pytest.skip(f"the real sample set is not in {SAMPLES}")
    tmp = tmp_path_factory.mktemp("readme")
    with _streamlit(tmp, SAMPLES) as url:
        yield url


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            context = browser.new_context(viewport={"width": WIDTH, "height": HEIGHT}, color_scheme="light")
            page = context.new_page()
            page.set_default_timeout(WAIT * 1000)
            page.goto(server)
            page.get_by_role("heading", name="Adapter Atlas").wait_for()
            _idle(page, WAIT)
            yield page
        finally:
            browser.close()


def _main(page):
    return page.locator('[data-testid="stMain"]')


def _set_number(page, label: str, value: int) -> None:
    box = _main(page).get_by_label(label, exact=True)
    box.fill(str(value))
    box.press("Enter")
    _idle(page, WAIT)


def _distances(page) -> int:
    _wait_plots(page, 2, WAIT)
    return 2  # the heatmap and the 2-D map beside it


def _inclusion(page) -> int:
    _main(page).get_by_text("one pair", exact=True).click()  # the default view, chosen explicitly
    _idle(page, WAIT)
    _wait_plots(page, 1, WAIT)
    return 1  # the per-layer inclusion curves of the pair


def _anatomy(page) -> int:
    _wait_plots(page, 3, WAIT)
    return 3  # the norm heatmap, the ranks beside it and the singular spectrum of one module below


def _tokens(page) -> int:
    _wait_plots(page, 2, WAIT)  # the shared PCA map and the per-layer curves
    return 1


def _merge(page) -> int:
    main = _main(page)
    main.get_by_label("Method", exact=True).click()
    page.get_by_role("option", name="TIES", exact=True).click()
    _idle(page, WAIT)
    _set_number(page, "Test examples per task", 50)
    main.get_by_role("button", name="Score the merged model on every task").click()
    main.get_by_text("ANP (average normalized performance)", exact=True).wait_for(timeout=WAIT * 1000)
    _idle(page, WAIT)
    _wait_plots(page, 1, WAIT)
    return 1  # the per-task bars under the ANP


def _learned(page) -> int:
    main = _main(page)
    _set_number(page, "Inputs per task", 40)  # 10 optimiser steps of 4 inputs per task
    _set_number(page, "Epochs", 1)
    _set_number(page, "ANP test examples", 40)
    slider = main.get_by_role("slider", name="Measure ANP every k steps")
    slider.focus()
    slider.press("Home")  # every 5 steps: the ANP curve gets points in a short run
    _idle(page, WAIT)
    main.get_by_role("button", name="Start", exact=True).click()
    main.get_by_text(re.compile(r"step \d+/\d+ · (done|stopped)")).first.wait_for(timeout=2 * WAIT * 1000)
    _idle(page, WAIT)
    _wait_plots(page, 3, WAIT)
    return 2  # the objective and the coefficients; the ANP curve is below them


VIEWS = [  # (file name, sidebar label, heading, set-up returning how many figures make the main one,
    #          the label of the widget a shot starts at when the heading is too far above the figure)
    ("distances", "Distances", "Distances between adapters", _distances, None),
    ("inclusion", "Inclusion", "Spectral inclusion", _inclusion, None),
    ("anatomy", "Anatomy", "Adapter anatomy", _anatomy, None),
    ("merge", "Merge", "Merging adapters", _merge, "Method"),
    ("learned_merge", "Learned merge", "Learned merges", _learned, "Method"),
    ("token_dynamics", "Token dynamics", "Token dynamics", _tokens, "Adapters (one base model)"),
]

BOXES_JS = """([n, anchor]) => {
    const main = document.querySelector('[data-testid="stMain"]');
    const h1 = main.querySelector('h1').getBoundingClientRect();
    const plots = Array.from(main.querySelectorAll('.js-plotly-plot')).slice(0, n).map(p => p.getBoundingClientRect());
    // where a shot too tall for the heading starts: the widget labelled `anchor`, else the section heading
    // (h2 / h3) just above the main figure, else the figure itself
    const first = plots[0];
    const label = Array.from(main.querySelectorAll('[data-testid="stWidgetLabel"]'))
        .find(e => anchor && e.innerText.trim() === anchor);
    const heads = Array.from(main.querySelectorAll('h2, h3')).map(h => h.getBoundingClientRect())
        .filter(r => r.bottom <= first.top + 1);
    const section = label ? label.getBoundingClientRect().top : heads.length ? heads[heads.length - 1].top : first.top;
    return {heading: h1.top, section: section, bottom: Math.max(...plots.map(r => r.bottom))};
}"""


def _screenshot(page, name: str, figures: int, anchor: str | None) -> Path:
    """PNG of the full width from the page's heading to the bottom of its first ``figures`` figures.

    Streamlit scrolls inside its main container: the viewport is stretched to the content's height for
    the shot (the layout's width stays 1280 px), then restored."""
    OUT.mkdir(parents=True, exist_ok=True)
    page.evaluate("() => document.querySelector('[data-testid=\"stMain\"]').scrollTo(0, 0)")
    height = page.evaluate("() => document.querySelector('[data-testid=\"stMain\"]').scrollHeight")
    page.set_viewport_size({"width": WIDTH, "height": int(min(max(height, HEIGHT), 6000))})
    try:
        page.wait_for_timeout(800)  # plotly relayout after the resize
        _idle(page, WAIT)
        box = page.evaluate(BOXES_JS, [figures, anchor])
        top = max(box["heading"] - 40, 0)
        if box["bottom"] - top > MAX_CLIP:  # heading and figure do not fit one shot: start at its section
            top = max(box["section"] - 24, 0)
        bottom = box["bottom"] + 16
        path = OUT / f"{name}.png"
        while True:
            page.screenshot(path=str(path), clip={"x": 0, "y": top, "width": WIDTH, "height": bottom - top})
            if path.stat().st_size <= MAX_BYTES or bottom - top <= HEIGHT // 2:
                break
            top += 80  # too heavy: less height above the figure, never less width
    finally:
        page.set_viewport_size({"width": WIDTH, "height": HEIGHT})
    return path


@pytest.mark.parametrize("name,label,heading,setup,anchor", VIEWS, ids=[v[0] for v in VIEWS])
def test_readme_screenshot(page, name, label, heading, setup, anchor):
    _nav(page, label)
    _main(page).get_by_role("heading", name=re.compile(re.escape(heading))).first.wait_for()
    try:
        figures = setup(page)
    except Exception:
        OUT.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(OUT / f"failure_{name}.png"))
        raise
    _idle(page, WAIT)
    assert page.locator('[data-testid="stException"]').count() == 0, f"{label}: the page shows an exception"
    assert page.locator(".js-plotly-plot").count() >= 1, f"{label}: no Plotly figure"
    assert not page.locator('[data-testid="stSpinner"]').count(), f"{label}: still loading"
    background = page.evaluate(
        "() => getComputedStyle(document.querySelector('[data-testid=\"stApp\"]')).backgroundColor")
    assert sum(int(v) for v in background[background.index("(") + 1:-1].split(",")[:3]) > 600, background
    path = _screenshot(page, name, figures, anchor)
    assert path.stat().st_size <= MAX_BYTES, f"{path.name}: {path.stat().st_size} bytes"
    target = os.environ.get("ADAPTER_ATLAS_README_IMAGES")
    if target:
        folder = Path(target) if Path(target).is_absolute() else REPO / target
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, folder / path.name)
