"""README.md: its commands are what CI runs, and every local link or image it shows exists."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
IMAGES = ("distances", "inclusion", "anatomy", "merge", "learned_merge", "token_dynamics")

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")  # [text](target), ![alt](target)
HTML = re.compile(r"""<(?:img|a)\b[^>]*?\b(?:src|href)=["']([^"']+)["']""", re.IGNORECASE)


def _text() -> str:
    return README.read_text(encoding="utf-8")


def _without_code(text: str) -> str:
    """The README without its fenced code blocks and inline code spans (no links live there)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)
    return re.sub(r"`[^`\n]*`", "", text)


def _targets(text: str) -> list[str]:
    prose = _without_code(text)
    return LINK.findall(prose) + HTML.findall(prose)


def test_every_local_link_and_image_exists():
    targets = _targets(_text())
    assert targets, "no links found in README.md"
    missing = []
    for target in targets:
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) or target.startswith("#"):
            continue  # http(s)://, mailto: and in-page anchors
        path = unquote(target.split("#", 1)[0].split("?", 1)[0])
        if not (REPO / path).exists():
            missing.append(target)
    assert not missing, f"README.md links to missing files: {missing}"


def test_the_readme_shows_a_screenshot_of_each_main_view():
    shown = {t for t in _targets(_text()) if t.startswith("docs/images/")}
    for name in IMAGES:
        assert f"docs/images/{name}.png" in shown, name
        png = REPO / "docs" / "images" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert png.stat().st_size <= 300_000, f"{png.name} is {png.stat().st_size} bytes"


def test_the_first_code_block_is_the_install_and_the_command_ci_runs():
    text = _text()
    lines = text.splitlines()
    assert lines[0] == "# Adapter Atlas"
    block = re.search(r"^```bash\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)
    assert block is not None, "README.md has no bash code block"
    assert text.index(block.group(0)) < text.index("\n## "), "the commands come before the first section"
    install, test = block.group(1).splitlines()
    assert install == ("python3 -m venv .venv && .venv/bin/pip install -r requirements.txt && .venv/bin/pip "
                       "install --no-deps -r requirements-nodeps.txt && .venv/bin/streamlit run app.py "
                       "--browser.gatherUsageStats false")
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    commands = [line.strip() for line in ci.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert commands[-1] == test == ".venv/bin/python -m pytest -q", (commands[-1], test)
    for step in ("pip install -q -r requirements.txt", "pip install -q --no-deps -r requirements-nodeps.txt"):
        assert step in ci, step  # the same installs as the README's first line
