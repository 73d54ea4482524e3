"""The first visit after a server start (ui/loading.py): the page's title and a status box come before the heavy
imports; app.py draws it before importing them and clears it before the page; pages call require_app() first."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PAGE = """
import streamlit as st
from ui import loading
screen = loading.first_run("Distances")
st.write("after" if screen.box is None else "still loading")
"""

SCRIPT = """
import sys
from streamlit.testing.v1 import AppTest

at = AppTest.from_string(PAGE, default_timeout=120).run()
print("first:", [t.value for t in at.title], [m.value for m in at.markdown])
at.run()
print("second:", [t.value for t in at.title], [m.value for m in at.markdown])
print("torch imported:", "torch" in sys.modules)
"""


def test_first_run_shows_the_title_and_what_loads_once_per_process():
    out = subprocess.run([sys.executable, "-c", f"PAGE = {PAGE!r}\n" + SCRIPT], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(": ", 1) for line in out.stdout.strip().splitlines() if ": " in line)
    first = lines["first"]
    assert "'Distances'" in first and "still loading" in first
    for label, _ in __import__("ui.loading", fromlist=["STEPS"]).STEPS:
        assert label in first, label  # each step named as it starts
    assert lines["second"] == "[] ['after']"  # later runs of the process draw nothing
    assert lines["torch imported"] == "True"


def _calls(tree: ast.Module) -> list[str]:
    out = []
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out.append("import " + ",".join(a.name for a in node.names) + f" from {getattr(node, 'module', '')}")
        else:
            out += [ast.unparse(n.func) for n in ast.walk(node) if isinstance(n, ast.Call)]
    return out


def test_app_draws_the_loading_page_before_heavy_imports_and_clears_it_before_the_page():
    calls = _calls(ast.parse((ROOT / "app.py").read_text()))
    first_run = calls.index("loading.first_run")
    heavy = next(i for i, c in enumerate(calls) if c.startswith("import configure_threads"))
    assert calls.index("st.navigation") < first_run < heavy
    assert heavy < calls.index("screen.clear") < calls.index("page.run")
    assert calls.index("page.run") < calls.index("warmup.start")  # UMAP's compile after the first page


def test_pages_call_require_app_before_their_heavy_imports():
    for page in sorted((ROOT / "pages").glob("*.py")):
        body = ast.parse(page.read_text()).body
        kinds = [ast.unparse(n)[:60] for n in body if not isinstance(n, ast.Expr) or isinstance(n.value, ast.Call)]
        kinds = [k for k in kinds if not k.startswith("from __future__")]
        assert kinds[0] == "from ui import require_app" and kinds[1] == "require_app()", (page.name, kinds[:3])


def test_preload_imports_every_step_and_marks_the_process_done():
    """``ui.loading.preload`` (what ``ui.serve`` runs in a thread at server start), in a fresh interpreter."""
    import subprocess
    import sys

    code = ("import sys; from ui import loading; assert not loading.done(); loading.preload(); "
            "assert loading.done(); missing = [m for _, m in loading.STEPS if m not in sys.modules]; "
            "assert not missing, missing")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_serve_starts_the_preload_then_runs_streamlit_on_app_py(monkeypatch):
    import sys
    import threading

    from streamlit.web import cli

    from ui import loading, serve

    seen = {}
    monkeypatch.setattr(loading, "preload", lambda: seen.setdefault("preload", threading.current_thread().name))
    monkeypatch.setattr(cli, "main", lambda: seen.setdefault("argv", list(sys.argv)))
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    serve.main(["--server.port", "8600"])
    for t in threading.enumerate():
        if t.name == "atlas-preload":
            t.join(10)
    assert seen["preload"] == "atlas-preload"  # in its own thread, not the server's
    assert seen["argv"] == ["streamlit", "run", str(ROOT / "app.py"), "--server.port", "8600"]
    assert "python -m ui.serve" in (ROOT / "Dockerfile").read_text()  # the container starts the server this way
