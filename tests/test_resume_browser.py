"""A learned merge survives its server: a DivMerge started in the browser, the server killed (SIGKILL: no
clean-up) after a few steps, a new server on the same disk cache, and Start with the same settings resumes after
the last finished step, and the page says so. Skips without ``chromium`` (``.ci/run`` installs it)."""

from __future__ import annotations

import os
import re
import shutil
import signal

import pytest

from tests.learned_fixtures import learned_study

pytestmark = [pytest.mark.browser, pytest.mark.slow,
              pytest.mark.skipif(shutil.which("chromium") is None, reason="no chromium")]
DONE_JS = """() => { const app = document.querySelector('[data-testid="stApp"]');
    return app && app.getAttribute('data-test-script-state') === 'notRunning'; }"""
STEP = re.compile(r"step (\d+)/(\d+) · (\w+)")


def _start_run(page, url: str) -> None:
    page.goto(f"{url}/learned")
    page.wait_for_function(DONE_JS)
    epochs = page.locator('[data-testid="stNumberInput"]').filter(has_text="Epochs").locator("input")
    epochs.fill("50")
    epochs.press("Enter")
    page.wait_for_function(DONE_JS)
    page.get_by_role("button", name="Start").click()


def test_a_learned_run_killed_with_the_server_resumes_on_the_next_one(tmp_path):
    from playwright.sync_api import sync_playwright

    from bench.browser_latency import ARGS, streamlit_server

    folders, _ = learned_study(tmp_path, n_examples=200)
    cache = tmp_path / "cache"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=shutil.which("chromium"), args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1366, "height": 900})
            page.set_default_timeout(180_000)
            with streamlit_server(folders[0].parent, cache) as url:
                _start_run(page, url)
                page.wait_for_function("() => { const m = document.body.innerText.match(/step (\\d+)\\/\\d+ · running/);"
                                       " return m && Number(m[1]) >= 5; }")
                os.kill(url.pid, signal.SIGKILL)
                before = int(STEP.search(page.locator('[data-testid="stMain"]').inner_text()).group(1))
            with streamlit_server(folders[0].parent, cache) as url:
                _start_run(page, url)
                page.get_by_text(re.compile(r"Resumed at step \d+")).wait_for()
                text = page.locator('[data-testid="stMain"]').inner_text()
        finally:
            browser.close()
    resumed = int(re.search(r"Resumed at step (\d+)", text).group(1))
    # the checkpoint is written after every step: the step the page showed before the kill, or the one before it
    # (the page can show a step whose checkpoint the kill interrupted)
    assert before >= 5 and resumed >= before - 1
    step, total, _ = STEP.search(text).groups()
    assert int(step) >= resumed and int(total) > resumed
