"""bench/crosscheck_fusionbench.py on one module of the sample adapters; skipped without FusionBench.

FusionBench (``fusion-bench`` on PyPI) is not a dependency: install it with ``pip install --no-deps
--target DIR fusion-bench==0.2.33`` and set ``FUSIONBENCH_PATH=DIR`` (or have ``fusion_bench`` on
``sys.path``) to run this test.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def script(load_bench):
    mod = load_bench("crosscheck_fusionbench")
    if mod._package_dir(os.environ.get("FUSIONBENCH_PATH")) is None:
        pytest.skip("FusionBench (fusion_bench) is not installed; set FUSIONBENCH_PATH")
    return mod


def test_skips_cleanly_without_fusionbench(tmp_path, capsys, load_bench):
    mod = load_bench("crosscheck_fusionbench")
    assert mod.main(["--fusionbench-path", str(tmp_path)]) is None
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "skipped" in out[0]


def test_crosscheck_one_module(script, capsys):
    if not (REPO / "sample_adapters" / "synthetic" / "nli").is_dir():
        pytest.skip("sample adapters absent")
    result = script.main(["--layers", "0", "--kinds", "v", "--methods", "tsv_m,iso_c,iso_cts,ties,dare"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == result
    # with the setting that removes each difference, FusionBench's per-tensor code gives our result
    for check in ("tsv_m:agree", "iso_c:agree", "iso_c:project", "iso_cts:agree", "ties:agree", "dare_linear",
                  "dare_ties:agree"):
        assert result[check] < 1e-10, (check, result[check])
    # at both sides' defaults they differ (zero-padded TSV components, 384-direction Iso-C, TIES sum / trim)
    for check in ("tsv_m", "iso_c", "iso_cts", "ties", "dare_ties"):
        assert result[check] > 1e-3, (check, result[check])
    for method in ("breadcrumbs", "della", "core_space"):
        assert result[method] is None
