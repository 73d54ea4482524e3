"""Soak test of a hosted demo: N concurrent sessions against one local server, for a bounded time.

    .venv/bin/python -m bench.soak [--sessions 8] [--seconds 120] [--samples DIR] [--demo]   # from the repository root
                                   [--client protocol|browser] [--proxy none|nginx]

Starts ``streamlit run app.py`` (``bench/browser_latency.py``'s server: the sample adapters, a private
disk cache), waits until the server is idle (the background warm-up of UMAP at start: 2 s with numba's cache,
a minute of compile without it; a hosted server is past it), warms every page once, then runs ``--sessions`` visitors at once for ``--seconds``. Each
visitor opens the app from its URL once (timed as ``first load``), then moves through the pages in a
loop by the sidebar's links and times each page: from the click to the page's script having finished;
every fifth visit is a full reload of the page's URL (a shared link opened again, timed as
``reload``). It counts as an error any page that shows a Streamlit exception or does not finish
within 60 s.

Two kinds of visitor:

* ``protocol`` (default): :mod:`st_protocol`, a client that speaks the browser's websocket protocol
  (the same ``rerun_script`` messages a tab sends on a link click or a page load, every element the
  server sends read in full; a first load also fetches the HTML, scripts and stylesheets). It renders
  nothing, so all the cores are the server's: the load a hosted demo's server sees, its visitors'
  browsers running on their own machines. Timed until ``script_finished`` reaches the client.
* ``browser``: one headless Debian chromium, one context each (separate cookies and Streamlit
  sessions), timed until the page's script has finished with its title drawn. Here the 8 browsers
  run on the same 2 cores as the server and take most of them, so this measures this machine more
  than the server; the bench reports the server's share of the CPU (its user + system time over the
  wall time of the soak, from ``/proc``): what the server itself costs.

``--proxy nginx`` puts nginx in front (``deploy/nginx.py``: Streamlit's static files from nginx, the rest
passed to the server), as a hosted demo can be run; nginx's own CPU is reported beside the server's.

Prints page-load latency p50 / p95 / max per page, the server's peak resident memory (``VmHWM`` of the
server process) and the error count; the last line is one JSON object with ``p95_s`` per page,
``max_p95_s``, ``peak_rss_mb``, ``errors``, ``client`` and ``target_met`` (every page's p95 under 3 s,
no error). The baseline is the same page loads with one visitor alone, timed first in the same run
(``single_p50_s``): the ratio says what sharing the server costs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from bench import browser_latency

REPO = Path(__file__).resolve().parents[1]

#: url path -> title in the sidebar navigation (app.py)
PAGES = {"overview": "Overview", "anatomy": "Anatomy", "distances": "Distances", "inclusion": "Inclusion",
         "merge": "Merge", "learned": "Learned merge", "tokens": "Token dynamics", "survey": "Survey"}
TARGET_P95_S = 3.0
DONE_JS = """(path) => { const app = document.querySelector('[data-testid="stApp"]');
    return app && app.getAttribute('data-test-script-state') === 'notRunning'
        && document.querySelector('[data-testid="stMain"] h1') !== null
        && (path === 'overview' ? location.pathname.endsWith('/') : location.pathname.endsWith('/' + path)); }"""


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux ``/proc/pid/stat``)."""
    import os

    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def wait_until_idle(pid: int, share: float = 0.05, window: float = 2.0, timeout: float = 300.0) -> float:
    """Wait until process ``pid`` uses under ``share`` of a core over ``window`` seconds (the server's
    start-up work done: UMAP's numba warm-up runs in a background thread for a few seconds after each
    start); returns the seconds waited (``timeout`` at most)."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        c0 = cpu_seconds(pid)
        time.sleep(window)
        if (cpu_seconds(pid) - c0) / window < share:
            break
    return time.perf_counter() - t0


async def _first_visit(url: str) -> None:
    from bench import st_protocol

    session = await st_protocol.Session.open(url)
    try:
        await session.visit("")
    finally:
        await session.close()


def peak_rss_mb(pid: int) -> float:
    """Peak resident memory of process ``pid`` (Linux ``VmHWM``), in MB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


async def _load(page, url: str, path: str, by_link: bool = False) -> tuple[float, str | None]:
    """Seconds to open ``path`` in ``page`` (a full load of its URL, or a click on its sidebar link)
    until its script is done; an error text or None."""
    t0 = time.perf_counter()
    try:
        if by_link:
            nav = page.locator('[data-testid="stSidebarNav"] a')
            link = nav.first if path == "overview" else nav.and_(page.locator(f'a[href$="/{path}"]'))
            await link.click(timeout=60_000)
        else:
            await page.goto(f"{url}/{path}" if path != "overview" else url, wait_until="domcontentloaded")
        await page.wait_for_timeout(50)  # the click's rerun has started (the script state leaves notRunning)
        await page.wait_for_function(DONE_JS, arg=path, timeout=60_000, polling=100)
    except Exception as exc:  # noqa: BLE001  (a timeout or a crashed page is an error of the run, counted)
        return time.perf_counter() - t0, f"{path}: {type(exc).__name__}: {str(exc)[:900]}"
    elapsed = time.perf_counter() - t0
    if await page.locator('[data-testid="stException"]').count():
        text = await page.locator('[data-testid="stException"]').first.inner_text()
        return elapsed, f"{path}: exception on the page: {text[:160]}"
    return elapsed, None


async def _session(browser, url: str, pages: list[str], deadline: float, times: dict, errors: list, offset: int):
    context = await browser.new_context(viewport={"width": 1366, "height": 900})
    page = await context.new_page()
    k = offset
    try:
        elapsed, error = await _load(page, url, pages[k % len(pages)])
        times.setdefault("first load", []).append(elapsed)
        errors.extend([error] if error else [])
        while time.perf_counter() < deadline:
            k += 1
            path = pages[k % len(pages)]
            reload = k % 5 == 0
            elapsed, error = await _load(page, url, path, by_link=not reload)
            times.setdefault("reload" if reload else path, []).append(elapsed)
            if error:
                errors.append(error)
    finally:
        await context.close()


async def _protocol_session(url: str, pages: list[str], deadline: float, times: dict, errors: list, offset: int):
    """One visitor through :mod:`st_protocol`: the same visits as :func:`_session`, without rendering."""
    from bench import st_protocol

    def error_of(path: str, run) -> str | None:
        if run.exceptions:
            return f"{path}: exception on the page: {run.exceptions[0][:160]}"
        return f"{path}: page not found" if run.page_not_found else None

    async def timed(coro, path: str) -> tuple[float, str | None]:
        t0 = time.perf_counter()
        try:
            run = await coro  # a coroutine starts when awaited: t0 is before it
        except Exception as exc:  # noqa: BLE001  (a timeout or a dropped connection is an error of the run)
            return time.perf_counter() - t0, f"{path}: {type(exc).__name__}: {str(exc)[:300]}"
        return time.perf_counter() - t0, error_of(path, run)

    k = offset
    session = None

    async def first(path: str, assets: bool):
        nonlocal session
        if session is not None:
            await session.close()
        await asyncio.to_thread(st_protocol.fetch_static, url if path == "overview" else f"{url}/{path}", 30.0,
                                assets)
        session = await st_protocol.Session.open(url)
        return await session.visit("" if path == "overview" else path)

    try:
        path = pages[k % len(pages)]
        elapsed, error = await timed(first(path, True), path)
        times.setdefault("first load", []).append(elapsed)
        errors.extend([error] if error else [])
        while time.perf_counter() < deadline and session is not None:
            k += 1
            path = pages[k % len(pages)]
            reload = k % 5 == 0
            if reload:
                elapsed, error = await timed(first(path, False), path)
            else:
                elapsed, error = await timed(session.switch("" if path == "overview" else path), path)
            times.setdefault("reload" if reload else path, []).append(elapsed)
            if error:
                errors.append(error)
    finally:
        if session is not None:
            await session.close()


async def soak_protocol(url: str, sessions: int = 8, seconds: float = 120.0, pages: list[str] | None = None,
                        pid: int | None = None) -> dict:
    """:func:`soak` with protocol-level visitors (:mod:`st_protocol`) instead of browsers: the same
    warm-up, baseline and loop; a visitor costs the client a few ms of CPU per page, so the server has
    the cores, as it has on a host whose visitors' browsers run on their own machines."""
    from concurrent.futures import ThreadPoolExecutor

    from bench import st_protocol

    # the HTTP fetches of first visits run in threads: one each (asyncio's default pool has cores + 4)
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=sessions + 2))
    pages = pages or list(PAGES)
    single: dict[str, list[float]] = {}
    warm_errors: list[str] = []
    alone = await st_protocol.Session.open(url)
    await alone.visit("")
    for round_ in range(3):  # the first round warms the caches; the next two are the baseline
        for path in pages[1:] + pages[:1]:
            t0 = time.perf_counter()
            run = await alone.switch("" if path == "overview" else path)
            if round_:
                single.setdefault(path, []).append(time.perf_counter() - t0)
            if run.exceptions:
                warm_errors.append(f"{path}: {run.exceptions[0][:160]}")
    await alone.close()
    for _ in range(2):
        times: dict[str, list[float]] = {}
        await _protocol_session(url, pages[1:2], 0.0, times, warm_errors, 0)
        single.setdefault("first load", []).extend(times["first load"])
        single.setdefault("reload", []).extend(times["first load"])
    times = {}
    errors: list[str] = []
    cpu0, t0 = cpu_seconds(pid) if pid else float("nan"), time.perf_counter()
    deadline = t0 + seconds
    await asyncio.gather(*(_protocol_session(url, pages, deadline, times, errors, offset=i)
                           for i in range(sessions)))
    wall = time.perf_counter() - t0
    server_cpu = (cpu_seconds(pid) - cpu0) / wall if pid else float("nan")
    return {"single": single, "times": times, "errors": errors, "warm_errors": warm_errors,
            "server_cpu_share": server_cpu}


async def soak(url: str, sessions: int = 8, seconds: float = 120.0, pages: list[str] | None = None,
               pid: int | None = None) -> dict:
    """Run the soak against a running server at ``url``; returns ``{"single": {...}, "times": {...}, "errors": [...]}``."""
    from playwright.async_api import async_playwright

    pages = pages or list(PAGES)
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=browser_latency.chromium(), args=browser_latency.ARGS,
                                           headless=True)
        try:
            single: dict[str, list[float]] = {}
            warm_errors: list[str] = []
            context = await browser.new_context(viewport={"width": 1366, "height": 900})
            page = await context.new_page()
            await _load(page, url, pages[0])
            for round_ in range(3):  # the first round warms the caches; the next two are the baseline
                for path in pages[1:] + pages[:1]:
                    elapsed, error = await _load(page, url, path, by_link=True)
                    if round_:
                        single.setdefault(path, []).append(elapsed)
                    if error:
                        warm_errors.append(error)
            for _ in range(2):
                elapsed, error = await _load(page, url, pages[1])
                single.setdefault("reload", []).append(elapsed)
                single.setdefault("first load", []).append(elapsed)
            await context.close()
            times: dict[str, list[float]] = {}
            errors: list[str] = []
            cpu0, t0 = cpu_seconds(pid) if pid else float("nan"), time.perf_counter()
            deadline = t0 + seconds
            await asyncio.gather(*(_session(browser, url, pages, deadline, times, errors, offset=i)
                                   for i in range(sessions)))
            wall = time.perf_counter() - t0
            server_cpu = (cpu_seconds(pid) - cpu0) / wall if pid else float("nan")
        finally:
            await browser.close()
    return {"single": single, "times": times, "errors": errors, "warm_errors": warm_errors,
            "server_cpu_share": server_cpu}


def _pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, max(0, round(q / 100 * (len(v) - 1))))] if v else float("nan")


def report(result: dict, sessions: int, pid: int | None) -> dict:
    times, single = result["times"], result["single"]
    out = {"bench": "soak", "sessions": sessions, "pages": {}}
    for path, values in times.items():
        base = statistics.median(single.get(path) or [float("nan")])
        row = {"p50_s": round(_pct(values, 50), 3), "p95_s": round(_pct(values, 95), 3),
               "max_s": round(max(values), 3), "loads": len(values), "single_p50_s": round(base, 3)}
        out["pages"][path] = row
        print(f"{path:10s} {sessions} sessions: p50 {row['p50_s']:.2f} s, p95 {row['p95_s']:.2f} s, "
              f"max {row['max_s']:.2f} s over {row['loads']} loads (one session alone: p50 {base:.2f} s, "
              f"x{row['p50_s'] / base:.1f})")
    out["max_p95_s"] = max((r["p95_s"] for r in out["pages"].values()), default=float("nan"))
    out["errors"] = len(result["errors"]) + len(result["warm_errors"])
    out["peak_rss_mb"] = round(peak_rss_mb(pid), 1) if pid else None
    out["server_cpu_cores"] = round(result.get("server_cpu_share", float("nan")), 2)
    print(f"server CPU during the soak: {out['server_cpu_cores']:.2f} of {os.cpu_count()} cores")
    out["target_met"] = out["errors"] == 0 and out["max_p95_s"] < TARGET_P95_S
    for e in (result["warm_errors"] + result["errors"])[:10]:
        print("error:", e)
    print(f"server peak memory {out['peak_rss_mb']} MB; errors {out['errors']}; "
          f"target (every page p95 < {TARGET_P95_S:g} s, no error): {'met' if out['target_met'] else 'NOT met'}")
    return out


def _proxy_cpu(prefix: Path) -> float:
    """CPU seconds of the nginx started under ``prefix`` (its master from the pid file, and its workers)."""
    try:
        master = int((prefix / "nginx.pid").read_text())
    except (OSError, ValueError):
        return 0.0
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if stat.read_text().rsplit(")", 1)[-1].split()[1] == str(master):
                kids.append(int(stat.parent.name))
        except (OSError, IndexError):  # a process that ended meanwhile
            continue
    return sum(cpu_seconds(pid) for pid in [master, *kids])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--samples", type=Path, default=REPO / "sample_adapters" / "synthetic")
    parser.add_argument("--demo", action="store_true", help="run the server in demo mode (ADAPTER_ATLAS_DEMO=1)")
    parser.add_argument("--proxy", choices=("none", "nginx"), default="none",
                        help="nginx: the visitors go through nginx (deploy/nginx.py), which serves Streamlit's "
                             "static files itself and passes the rest to the server")
    parser.add_argument("--client", choices=("protocol", "browser"), default="protocol",
                        help="protocol: visitors speak Streamlit's websocket protocol and render nothing (the "
                             "server's load, as on a host); browser: one headless chromium context each, "
                             "rendering on these same cores")
    args = parser.parse_args(argv)
    if args.client == "browser" and not browser_latency.chromium():
        print("error: no chromium on PATH (apt-get install chromium)", file=sys.stderr)
        return 2
    if args.proxy == "nginx":
        from deploy import nginx

        if nginx.nginx() is None:
            print("error: --proxy nginx needs nginx (apt-get install nginx)", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        env = {"ADAPTER_ATLAS_DEMO": "1"} if args.demo else {}
        url = stack.enter_context(browser_latency.streamlit_server(args.samples, Path(tmp) / "cache", env=env))
        visit = url
        if args.proxy == "nginx":
            visit = browser_latency.ServerURL(stack.enter_context(nginx.running(Path(tmp) / "nginx", url.split("//")[1])))
            visit.pid = url.pid
            print(f"visitors go through nginx at {visit} (static files from nginx, the rest from {url})")
        run = soak_protocol if args.client == "protocol" else soak
        asyncio.run(_first_visit(url))  # the app's first run starts its background warm-up
        waited = wait_until_idle(url.pid)
        print(f"server idle {waited:.0f} s after its first page (its warm-up, UMAP's compile, done)")
        proxy0, t0 = _proxy_cpu(Path(tmp) / "nginx"), time.perf_counter()
        result = asyncio.run(run(visit, args.sessions, args.seconds, pid=url.pid))
        out = report(result, args.sessions, url.pid)
        out["client"] = args.client
        out["proxy"] = args.proxy
        if args.proxy == "nginx":
            out["proxy_cpu_cores"] = round((_proxy_cpu(Path(tmp) / "nginx") - proxy0) / (time.perf_counter() - t0), 3)
            print(f"nginx CPU during the soak (its workers): {out['proxy_cpu_cores']:.3f} of {os.cpu_count()} cores")
        out["startup_idle_s"] = round(waited, 1)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
