"""nginx in front of the dashboard (``deploy/nginx.py``): its configuration, and a real nginx serving
Streamlit's static files itself while the pages, the websocket and uploads reach the Streamlit server."""

from __future__ import annotations

import asyncio
import re
import shutil
import urllib.request
from pathlib import Path

import pytest

from bench import st_protocol
from bench.browser_latency import streamlit_server
from deploy import nginx
from tests.app_fixtures import adapter_zip_bytes, write_sample_set

CHROMIUM = shutil.which("chromium")
needs_nginx = pytest.mark.skipif(nginx.nginx() is None, reason="nginx is not installed (apt-get install nginx)")


def _refs(html: bytes) -> list[str]:
    return re.findall(r'(?:src|href)="\.?/?(static/[^"]+\.(?:js|css))"', html.decode())


def test_the_config_serves_the_files_streamlits_page_asks_for_and_passes_the_websocket(tmp_path):
    conf = nginx.config(tmp_path, listen=8080, upstream="127.0.0.1:8501")
    alias = re.search(r"location /static/ \{\s*alias (\S+)/;", conf).group(1)
    assert Path(alias) == nginx.static_dir().resolve()
    refs = _refs((nginx.static_dir().parent / "index.html").read_bytes())
    assert len(refs) > 10 and all((Path(alias) / r.removeprefix("static/")).is_file() for r in refs)
    stream = conf[conf.index("location /_stcore/stream"):]
    assert "proxy_set_header Upgrade $http_upgrade;" in stream and "Connection $connection_upgrade" in stream
    assert "listen 8080;" in conf and "server 127.0.0.1:8501;" in conf and f"pid {tmp_path.resolve()}/" in conf
    assert "\nuser " not in conf and "\nuser www-data;\n" in nginx.config(tmp_path, user="www-data")
    with pytest.raises(FileNotFoundError, match="not Streamlit's static folder"):
        nginx.config(tmp_path, static=tmp_path)


def test_the_cli_writes_the_config_and_says_how_to_run_it(tmp_path, capsys):
    assert nginx.main(["--prefix", str(tmp_path / "ng"), "--listen", "9000", "--upstream", "10.0.0.2:8501"]) == 0
    conf = (tmp_path / "ng" / "nginx.conf").read_text()
    assert "listen 9000;" in conf and "server 10.0.0.2:8501;" in conf
    assert f"nginx -p {(tmp_path / 'ng').resolve()}" in capsys.readouterr().out
    assert nginx.main(["--prefix", str(tmp_path / "bad"), "--static", str(tmp_path)]) == 2
    assert "error:" in capsys.readouterr().err and not (tmp_path / "bad").exists()


@needs_nginx
@pytest.mark.slow
def test_behind_nginx_static_files_come_from_nginx_and_everything_else_from_streamlit(tmp_path):
    samples = write_sample_set(tmp_path / "samples", n=3, layers=2)
    with streamlit_server(samples, tmp_path / "cache") as url, \
            nginx.running(tmp_path / "nginx", url.split("//")[1]) as proxy:
        with urllib.request.urlopen(f"{proxy}/distances") as r:  # a page's path: Streamlit's HTML
            html = r.read()
            assert r.status == 200 and r.headers.get(nginx.SERVED_BY) is None
        refs = _refs(html)
        assert refs
        for ref in refs:
            with urllib.request.urlopen(f"{proxy}/{ref}") as via, urllib.request.urlopen(f"{url}/{ref}") as direct:
                assert via.headers.get(nginx.SERVED_BY) == "nginx", ref
                assert "immutable" in via.headers.get("Cache-Control", "")
                assert via.read() == direct.read(), ref  # the same bytes as Streamlit's own
        with urllib.request.urlopen(f"{proxy}/_stcore/health") as r:
            assert r.read() == b"ok" and r.headers.get(nginx.SERVED_BY) is None

        async def visit():
            session = await st_protocol.Session.open(proxy)  # the websocket through nginx
            try:
                return await session.visit("distances")
            finally:
                await session.close()

        run = asyncio.run(visit())
        assert not run.exceptions and not run.page_not_found and run.elements > 5


@needs_nginx
@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)")
def test_a_browser_behind_nginx_draws_the_app_and_uploads_an_adapter(tmp_path):
    from playwright.sync_api import sync_playwright

    samples = write_sample_set(tmp_path / "samples", n=3, layers=2)
    upload = tmp_path / "uploaded.zip"
    upload.write_bytes(adapter_zip_bytes(seed=11))
    with streamlit_server(samples, tmp_path / "cache") as url, \
            nginx.running(tmp_path / "nginx", url.split("//")[1]) as proxy, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1366, "height": 900})
            page.set_default_timeout(60_000)
            served = []
            page.on("response", lambda r: served.append(r.headers.get(nginx.SERVED_BY.lower())) if "/static/" in r.url
                    else None)
            page.goto(f"{proxy}/distances")
            page.locator('[data-testid="stMain"] .js-plotly-plot').first.wait_for()
            assert served and set(served) == {"nginx"}
            page.locator('[data-testid="stSidebar"]').get_by_text("Add adapters").click()
            page.locator('[data-testid="stSidebar"] input[type="file"]').set_input_files(str(upload))
            page.get_by_text("loaded uploaded").wait_for()  # the upload went through nginx to the server
            assert not page.locator('[data-testid="stException"]').count()
        finally:
            browser.close()
