"""Fixed costs: ``import geometry`` loads no heavy dependency, a first call pays no import the second does
not (sympy behind ``torch.broadcast_shapes``), and ``bench/fixed_costs.py`` reports consistent figures.

Counted, not timed: which modules a fresh interpreter has loaded after each step.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

HEAVY = ("torch", "scipy", "transformers", "sympy", "pandas", "sklearn", "peft", "safetensors")


def _loaded_after(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; the heavy modules loaded before and after its last line."""
    *setup, last = code.strip().splitlines()
    script = "\n".join([
        "import sys, json",
        *setup,
        f"before = [m for m in {HEAVY!r} if m in sys.modules]",
        last,
        f"print(json.dumps({{'before': before, 'after': [m for m in {HEAVY!r} if m in sys.modules]}}))",
    ])
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_geometry_loads_no_heavy_dependency():
    loaded = _loaded_after("import geometry")
    assert loaded["after"] == [], loaded
    # the public names are there, loaded on first use
    loaded = _loaded_after("import geometry\nassert callable(geometry.distances) and geometry.AtlasError")
    assert "torch" not in loaded["after"] and "scipy" not in loaded["after"], loaded


def test_first_call_imports_nothing_the_second_does_not():
    """The first factored SVD used to import sympy (``torch.broadcast_shapes``): 0.8 s the second call does not pay."""
    loaded = _loaded_after("""
import torch
from geometry.linalg.factored import diff_fro_norm, lowrank_svd, principal_angles
B, A = torch.randn(2, 6, 3, dtype=torch.float64), torch.randn(2, 3, 5, dtype=torch.float64)
s = lowrank_svd(B, A, 2.0); principal_angles(s.U, s.rank, s.U, s.rank); diff_fro_norm(B, A, 1.0, B, A, 2.0)
""")
    assert "sympy" not in loaded["after"], loaded


def test_broadcast_shapes_matches_numpy():
    import numpy as np

    from geometry.errors import AtlasError
    from geometry.linalg.factored import broadcast_shapes

    for shapes in [(), ((),), ((3,), ()), ((2, 1), (3,)), ((1, 4), (5, 1), (4,)), ((0,), (1,)), ((2, 3), (2, 3))]:
        assert broadcast_shapes(*shapes) == np.broadcast_shapes(*shapes), shapes
    with pytest.raises(AtlasError, match="do not broadcast"):
        broadcast_shapes((2,), (3,))


@pytest.mark.slow
def test_fixed_costs_bench_reports_consistent_figures(capsys, load_bench):
    bench = load_bench("fixed_costs")
    assert bench.main(["--quick", "--repeats", "2"]) == 0
    data = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert data["repeats"] == 2 and data["quick"] is True
    for name in ("import_geometry", "import_numpy", "cli_version", "python_import_numpy", "anatomy_first",
                 "anatomy_second", "anatomy_numpy_first", "distances_first", "distances_second", "distances_numpy_first"):
        runs = data[f"{name}_runs_s"]
        assert len(runs) == 2 and all(math.isfinite(t) and t > 0 for t in runs), name  # one fresh process each
        assert data[f"{name}_s"] == pytest.approx(sorted(runs)[0] / 2 + sorted(runs)[1] / 2), name  # the median
    for ratio, (num, den) in {"import_ratio_vs_numpy": ("import_geometry_s", "import_numpy_s"),
                              "cli_version_ratio_vs_python_numpy": ("cli_version_s", "python_import_numpy_s"),
                              "anatomy_first_vs_second": ("anatomy_first_s", "anatomy_second_s"),
                              "distances_first_vs_numpy": ("distances_first_s", "distances_numpy_first_s")}.items():
        assert math.isfinite(data[ratio]) and data[ratio] > 0 and data[ratio] == pytest.approx(data[num] / data[den])
    assert data["import_geometry_heavy_modules"] == []
    assert data["anatomy_first_equals_second"] and data["distances_first_equals_second"]
    assert data["distances_max_abs_diff_vs_numpy"] < 1e-9  # the numpy baseline computes the same distance
    assert data["review_peers"]["gradience_principal_angles_slower"]["ratio"] == 6.6
    assert data["review_peers"]["weightwatcher_spectra_slower"]["ratio"] == 22.0
