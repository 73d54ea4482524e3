"""Shared test setup: one torch thread (2-core machines), offline hubs, the markers' skips, shared fixtures.

Markers (registered in ``pyproject.toml``; ``tests/test_markers.py`` checks they are applied):
``slow`` (more than ~5 s here), ``browser`` (headless chromium + playwright), ``docker`` (the Dockerfile
and its replayed build), ``cuda`` (a CUDA GPU; skipped here without one). The fast subset for the
edit-test loop is ``pytest -m "not slow and not browser and not docker"``.

Fixtures shared by several test files live here, found by pytest; the helpers they call (plain
functions that write adapters, studies, sample sets) stay in ``tests/app_fixtures.py``,
``tests/merge_fixtures.py``, ``tests/learned_fixtures.py`` and :mod:`geometry.testing`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REAL_ADAPTERS = SHARED / "real_adapters"


def pytest_collection_modifyitems(config, items):
    """``cuda`` tests are skipped without a CUDA device (the marker alone is enough)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("cuda") is not None:  # not item.keywords: a parameter id "cuda" is one too
            item.add_marker(skip)


@pytest.fixture(scope="session")
def real_adapters_dir() -> Path:
    """``../shared/real_adapters``; skips the test when it is absent."""
    if not REAL_ADAPTERS.is_dir():
        pytest.skip("../shared/real_adapters is absent")
    return REAL_ADAPTERS


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch) -> Path:
    """A disk cache of the test's own (``$ADAPTER_ATLAS_CACHE`` under ``tmp_path``): no result leaks between tests.

    A module whose every test needs it says ``pytestmark = pytest.mark.usefixtures("isolated_cache")``.
    """
    cache = tmp_path / "cache"
    monkeypatch.setenv("ADAPTER_ATLAS_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def sample_set(request, tmp_path_factory):
    """Tiny peft adapters ``task0..`` (``tests/app_fixtures.write_sample_set``) as the dashboard's sample set,
    with a disk cache of the module's own, for every test of the module.

    The module sets their number and depth with ``SAMPLE_SET = {"n": 3, "layers": 4}`` (the defaults).
    """
    from tests.app_fixtures import write_sample_set

    shape = {"n": 3, "layers": 4, **getattr(request.module, "SAMPLE_SET", {})}
    root = write_sample_set(tmp_path_factory.mktemp("sample_set") / "samples", **shape)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ADAPTER_ATLAS_SAMPLES", str(root))
        mp.setenv("ADAPTER_ATLAS_CACHE", str(root.parent / "cache"))
        yield root


@pytest.fixture(scope="session")
def learned_study_dirs(tmp_path_factory) -> tuple[list[Path], Path]:
    """Three tiny BERT adapters (3 blocks, LoRA on query / value, own heads) and their tasks with
    validation and test splits (``tests/learned_fixtures.learned_study``): ``(folders, tasks_dir)``.
    Built once per session and read only (DivMerge, AdaMerging and their CLIs)."""
    from tests.learned_fixtures import learned_study

    return learned_study(tmp_path_factory.mktemp("learned"))


@pytest.fixture(scope="module")
def learned_tiny(learned_study_dirs):
    """The learned study's adapters, loaded and amplified (updates and heads large enough to matter):
    ``(adapters, tasks_dir)``, fresh objects for each module."""
    from geometry.io.loader import load_adapter
    from tests.learned_fixtures import amplified

    folders, tasks = learned_study_dirs
    return [amplified(load_adapter(f)) for f in folders], tasks


@pytest.fixture
def load_bench():
    """``load_bench("geometry_bench")``: a fresh module of ``bench/geometry_bench.py`` (the benches are
    scripts beside the library; they import the installed ``geometry``)."""
    import importlib.util

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture
def timed_runs(monkeypatch):
    """``runs = timed_runs(bench, "_median_time")`` wraps a bench's median timer ``timer(fn, device, repeats)``;
    ``runs`` then lists ``(repeats asked, calls of fn made, median returned)`` per timed figure."""

    def wrap(module, attribute: str) -> list[tuple[int, int, float]]:
        real, runs = getattr(module, attribute), []

        def counting(fn, device, repeats):
            made = []

            def counted():
                made.append(1)
                return fn()

            median = real(counted, device, repeats)
            runs.append((repeats, len(made), median))
            return median

        monkeypatch.setattr(module, attribute, counting)
        return runs

    return wrap
