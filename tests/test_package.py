"""The installable package: one version (``geometry/version.py``) read by the build, the library and the CLI;
a wheel built from the repository holds the library and nothing of the dashboard."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_one_version_everywhere():
    import geometry
    from geometry.version import __version__

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "version" not in project and project["dynamic"] == ["version"]
    assert geometry.__version__ == __version__
    out = subprocess.run([sys.executable, "-m", "geometry", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"adapter-atlas {__version__}"


def test_distribution_name_and_extras():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["name"] == "adapter-atlas"
    assert {"dashboard", "survey", "dev"} <= set(project["optional-dependencies"])
    assert any(d.startswith("torch") for d in project["dependencies"])
    assert not any(d.startswith("streamlit") for d in project["dependencies"])  # the library needs no dashboard


@pytest.mark.slow
def test_a_wheel_holds_the_library_only(tmp_path):
    pytest.importorskip("setuptools", minversion="77")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
                    str(REPO)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("adapter_atlas-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "geometry/__init__.py" in names and "geometry/merging/ties.py" in names and "geometry/version.py" in names
    assert not any(n.startswith(("ui/", "pages/", "tests/", "bench/", "sample_adapters/")) for n in names)
