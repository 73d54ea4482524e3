"""``CITATION.cff``: valid Citation File Format 1.2.0 fields, the licence of ``pyproject.toml`` and the version
of ``geometry/version.py`` (so a release that bumps one bumps the other)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import yaml

import geometry

REPO = Path(__file__).resolve().parents[1]


def citation() -> dict:
    return yaml.safe_load((REPO / "CITATION.cff").read_text(encoding="utf-8"))


def test_citation_file_has_the_required_fields():
    cff = citation()
    assert cff["cff-version"] == "1.2.0"
    assert cff["title"] == "Adapter Atlas" and cff["type"] == "software"
    assert isinstance(cff["message"], str) and cff["message"].strip()
    assert cff["authors"] and all(isinstance(a, dict) and (a.get("name") or a.get("family-names"))
                                  for a in cff["authors"])
    assert {"name": "Adapter Atlas contributors"} in cff["authors"]


def test_citation_licence_and_version_match_the_package():
    cff = citation()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert cff["license"] == project["license"] == "Apache-2.0"
    assert isinstance(cff["version"], str) and cff["version"] == geometry.__version__
    assert "Apache License" in (REPO / "LICENSE").read_text()[:200] and "LICENSE" in project["license-files"]


def test_readme_points_to_the_licence_and_the_citation():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Licence and citation", 1)[1].split("\n## ", 1)[0]
    for link in ("LICENSE", "CITATION.cff", "sample_adapters/real/DATA.md"):
        assert f"]({link})" in section, link
