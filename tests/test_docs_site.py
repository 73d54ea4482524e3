"""The documentation site (``mkdocs.yml``, ``docs/``) builds offline with warnings as errors, and has every page.

The same command as CI's: ``mkdocs build --strict``. The CLI reference and the merge parameters are generated
at build time (``docs/hooks/generate.py``), so a new command or method shows up here without editing a page.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NEEDED = ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")
MISSING = [name for name in NEEDED if importlib.util.find_spec(name.split(".")[0]) is None
           or importlib.util.find_spec(name) is None]

ANALYSES = ("distances", "inclusion", "anatomy", "maps", "interference", "tokens", "survey")
PAGES = ("index", "getting-started", "merging", "learned", "evaluation", "samples", "notebook", "cli", "api",
         "deploy", "benchmarks", "crosscheck_fusionbench")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(MISSING), reason=f"the documentation site needs {', '.join(MISSING)} "
                       "(pip install -r requirements.txt: mkdocs, mkdocs-material, mkdocstrings-python)"),
]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"mkdocs build --strict failed:\n{run.stdout[-4000:]}\n{run.stderr[-8000:]}"
    return out


def test_every_analysis_page_and_the_api_are_built(site):
    for name in ANALYSES:
        page = site / "analyses" / f"{name}.html"
        assert page.is_file(), f"missing analysis page {page.name}"
        text = page.read_text(encoding="utf-8")
        for part in ("What it computes", "How to read", "Reference"):
            assert part in text, f"analyses/{name}.html has no '{part}' section"
    for name in PAGES:
        assert (site / f"{name}.html").is_file(), f"missing page {name}.html"
    assert not (site / "hooks").exists()


def test_api_reference_documents_the_public_functions(site):
    import geometry.api

    html = (site / "api.html").read_text(encoding="utf-8")
    for name in geometry.api.__all__:
        assert f'id="geometry.api.{name}"' in html, f"geometry.api.{name} is not in the API reference"
    for anchor in ("geometry.merging", "geometry.learned.divmerge.divmerge", "geometry.learned.DivMerge",
                   "geometry.cache.ResultCache", "geometry.errors"):
        assert f'id="{anchor}"' in html, anchor
    assert ":func:" not in html and ":class:" not in html  # reST roles turned into code spans


def test_cli_and_merge_tables_are_generated_from_the_code(site):
    from geometry.cli import COMMANDS
    from geometry.merging import MERGE_METHODS

    cli = (site / "cli.html").read_text(encoding="utf-8")
    for name in COMMANDS:
        assert f'id="{name}"' in cli, f"command {name} has no section in cli.html"
        assert f"usage: python -m geometry {name}" in cli
    merging = (site / "merging.html").read_text(encoding="utf-8")
    for name in MERGE_METHODS:
        assert f"<code>{name}</code>" in merging, f"merge method {name} is not in merging.html"


def test_the_site_fetches_nothing_at_view_time(site):
    for page in site.rglob("*.html"):
        text = page.read_text(encoding="utf-8")
        assert "fonts.googleapis.com" not in text and "fonts.gstatic.com" not in text, page.name
