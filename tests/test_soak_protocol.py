"""The protocol-level visitor of ``bench/soak.py`` (``bench/st_protocol.py``) against a real local server."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bench import soak, st_protocol
from bench.browser_latency import streamlit_server

REPO = Path(__file__).resolve().parents[1]

SAMPLES = REPO / "sample_adapters" / "synthetic"
pytestmark = pytest.mark.skipif(not (SAMPLES / "nli").is_dir(), reason="no sample adapters")


async def _tour(url: str) -> dict:
    assert st_protocol.fetch_static(url) > 100_000  # the HTML, scripts and stylesheets of the app
    session = await st_protocol.Session.open(url)
    try:
        runs = {"": await session.visit("")}
        for path in soak.PAGES:
            runs[path] = await session.switch("" if path == "overview" else path)
        runs["shared link"] = await session.visit("distances")
        runs["missing"] = await session.visit("no-such-page")
        pages = dict(session.pages)
    finally:
        await session.close()
    return {"runs": runs, "pages": pages}


@pytest.mark.slow
def test_a_protocol_visitor_runs_every_page_as_a_browser_tab_does(tmp_path):
    with streamlit_server(SAMPLES, tmp_path / "cache") as url:
        tour = asyncio.run(_tour(url))
        result = asyncio.run(soak.soak_protocol(url, sessions=2, seconds=2.0, pid=url.pid))
        out = soak.report(result, 2, url.pid)
    runs = tour["runs"]
    assert set(soak.PAGES) - {"overview"} <= set(tour["pages"])  # the navigation names every soaked page
    for name, run in runs.items():
        assert not run.exceptions, (name, run.exceptions)
        assert run.elements > 5 and run.seconds > 0, name  # the page's elements reached the client
    assert runs["missing"].page_not_found and not runs["distances"].page_not_found
    # a page with figures sends more than the overview
    assert runs["distances"].bytes > runs[""].bytes
    assert out["errors"] == 0 and out["peak_rss_mb"] > 0
    assert "first load" in out["pages"] and len(result["times"]["first load"]) == 2  # one per visitor
    assert all(row["loads"] >= 1 and row["p95_s"] >= row["p50_s"] > 0 for row in out["pages"].values())


def test_an_exception_on_a_page_is_reported_not_timed_as_a_load(tmp_path):
    app = tmp_path / "broken.py"
    app.write_text("import streamlit as st\nst.title('broken')\nraise ValueError('boom in the page')\n")

    async def visit(url):
        session = await st_protocol.Session.open(url)
        try:
            return await session.visit("")
        finally:
            await session.close()

    with streamlit_server(SAMPLES, tmp_path / "cache", app=app) as url:
        run = asyncio.run(visit(url))
    assert run.exceptions and "boom in the page" in run.exceptions[0]


def test_the_server_config_skips_streamlits_full_collection_after_each_run():
    """Streamlit's default gc.collect(2) after every run walks the whole import-time heap (0.3 s here)."""
    import gc
    import tomllib

    from ui import warmup

    config = tomllib.loads((REPO / ".streamlit" / "config.toml").read_text())
    assert config["runner"]["postScriptGC"] is False
    try:
        assert warmup.settle_heap() > 1000 and gc.get_freeze_count() > 1000
    finally:
        gc.unfreeze()
