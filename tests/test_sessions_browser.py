"""Many visitors at once, in a real browser: 8 concurrent sessions (headless Debian chromium, one context
each, on 127.0.0.1) each upload a different adapter and must see only their own, and the server keeps
answering the others while one of them runs a DivMerge: every other visitor's page is drawn before the
run has done its steps (50 epochs of 200 inputs per task: 2,500 steps, well over a minute here), so the
Stop pressed afterwards finds it still running. The bound is the run's steps, not a clock.

Skips without ``chromium`` (``.ci/run`` installs it). About two minutes here.
"""

from __future__ import annotations

import asyncio
import re
import shutil

import pytest

from tests.app_fixtures import adapter_zip_bytes
from tests.learned_fixtures import learned_study

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.skipif(shutil.which("chromium") is None, reason="no chromium")]
SESSIONS = 8
EPOCHS = 50  # with 200 inputs per task: 2,500 DivMerge steps
DONE_JS = """() => { const app = document.querySelector('[data-testid="stApp"]');
    return app && app.getAttribute('data-test-script-state') === 'notRunning'; }"""


async def _visitor(browser, url: str, k: int, zips, results: dict):
    context = await browser.new_context(viewport={"width": 1366, "height": 900})
    page = await context.new_page()
    page.set_default_timeout(120_000)
    await page.goto(url)
    await page.wait_for_function(DONE_JS)
    sidebar = page.locator('[data-testid="stSidebar"]')
    await sidebar.get_by_text("Add adapters").click()
    await sidebar.locator('input[type="file"]').set_input_files(str(zips[k]))
    await page.get_by_text(f"loaded visitor_{k}").wait_for()
    await page.wait_for_function(DONE_JS)
    results[k] = {"page": page, "context": context, "sidebar": await sidebar.inner_text()}


async def _run(url: str, zips) -> dict:
    from playwright.async_api import async_playwright

    from bench.browser_latency import ARGS

    out: dict = {}
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=shutil.which("chromium"), args=ARGS, headless=True)
        try:
            results: dict = {}
            await asyncio.gather(*(_visitor(browser, url, k, zips, results) for k in range(SESSIONS)))
            out["sidebars"] = {k: r["sidebar"] for k, r in results.items()}
            # Visitor 0 starts a DivMerge; meanwhile every other visitor loads a page.
            runner = results[0]["page"]
            await runner.locator('[data-testid="stSidebarNav"] a[href$="/learned"]').click()
            await runner.wait_for_function("() => location.pathname.endsWith('/learned')")
            await runner.wait_for_function(DONE_JS)
            epochs = runner.locator('[data-testid="stNumberInput"]').filter(has_text="Epochs").locator("input")
            await epochs.fill(str(EPOCHS))
            await epochs.press("Enter")
            await runner.wait_for_function(DONE_JS)
            await runner.get_by_role("button", name="Start").click()
            await runner.get_by_text(re.compile(r"step \d+/\d+ · running")).wait_for()
            loads = []

            async def load(k):
                page = results[k]["page"]
                await page.locator('[data-testid="stSidebarNav"] a[href$="/distances"]').click()
                await page.wait_for_function("() => location.pathname.endsWith('/distances')")
                await page.wait_for_function(DONE_JS)
                await page.locator(".js-plotly-plot").first.wait_for()
                loads.append((k, await page.locator('[data-testid="stSidebar"]').inner_text()))

            await asyncio.gather(*(load(k) for k in range(1, SESSIONS)))
            out["loads"] = loads
            # every page drawn: stop the run; "stopped" (not "done") says it had steps left to do
            await runner.get_by_role("button", name="Stop (keep the coefficients reached)").click()
            await runner.get_by_text(re.compile(r"step \d+/\d+ · (stopped|done)")).wait_for()
            out["runner_text"] = await runner.locator('[data-testid="stMain"]').inner_text()
        finally:
            await browser.close()
    return out


def test_eight_sessions_see_only_their_own_uploads_and_the_server_answers_during_a_divmerge(tmp_path):
    from bench.browser_latency import streamlit_server

    folders, _ = learned_study(tmp_path, n_examples=200)
    zips = []
    for k in range(SESSIONS):
        path = tmp_path / f"visitor_{k}.zip"
        path.write_bytes(adapter_zip_bytes(seed=100 + k))
        zips.append(path)
    with streamlit_server(folders[0].parent, tmp_path / "cache") as url:
        out = asyncio.run(_run(url, zips))
    for k, text in out["sidebars"].items():
        assert f"visitor_{k}" in text
        others = [j for j in range(SESSIONS) if j != k and f"visitor_{j}" in text]
        assert not others, f"session {k} sees the uploads of sessions {others}"
    assert len(out["loads"]) == SESSIONS - 1
    for k, sidebar in out["loads"]:
        assert f"visitor_{k}" in sidebar and "visitor_0" not in sidebar  # still their own set on another page
    step, total, state = re.search(r"step (\d+)/(\d+) · (\w+)", out["runner_text"]).groups()
    assert int(total) >= 1000 and state == "stopped" and int(step) < int(total), (
        f"the DivMerge ended ({step}/{total} steps, {state}) before the other visitors' pages were drawn")
