"""AdaMerging (geometry.learned): the entropy objective decreases, its gradients equal finite differences,
the Table 9 defaults and the original code's options (init 0.3, clamp, test inputs), LL shapes, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from geometry.cli import main
from geometry.io.loader import load_adapter
from geometry.learned import AdaMerging, adamerging

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "sample_adapters" / "synthetic"
# learned_study_dirs, learned_tiny: tests/conftest.py (the tiny study shared with tests/test_divmerge.py)
pytestmark = pytest.mark.usefixtures("isolated_cache")


@pytest.mark.slow
def test_entropy_decreases_on_the_sample_pair():
    adapters = [load_adapter(SAMPLES / "sentiment_movies"), load_adapter(SAMPLES / "question")]
    run = AdaMerging(adapters, SAMPLES / "tasks", samples=12, epochs=2, lr=0.05)
    assert not run.needs_reference
    before, _ = run.objective_value()
    result = run.fit()
    after, _ = run.objective_value()
    assert result.steps_done == 6 and after < before
    assert result.objective == "entropy" and result.divergence is None and result.method == "adamerging"


def test_defaults_and_the_original_codes_options(learned_tiny):
    adapters, tasks = learned_tiny
    run = AdaMerging(adapters, tasks, samples=8)
    assert (run.settings.lr, run.settings.epochs, run.settings.init, run.settings.clamp) == (1e-3, 5, 0.5, False)
    assert AdaMerging(adapters, tasks).settings.samples == 200
    assert AdaMerging(adapters, tasks, level="layer").settings.samples == 400
    original = AdaMerging(adapters, tasks, init=0.3, clamp=True, split="test", lr=0.5, samples=8, max_steps=4)
    assert np.allclose(original.coefficients, 0.3) and original.inputs[0].source.endswith("test.jsonl")
    result = original.fit()
    assert result.steps_done == 4 and result.coefficients.min() >= 0.0 and result.coefficients.max() <= 1.0
    assert not np.allclose(result.coefficients, 0.3)


def test_entropy_gradients_equal_finite_differences_and_layer_shapes(learned_tiny):
    adapters, tasks = learned_tiny
    run = AdaMerging(adapters[:2], tasks, level="layer", samples=8)
    assert run.layout.shape == (2, 3)
    gamma = np.random.default_rng(2).uniform(0.2, 0.9, size=(2, 3))
    value, grad = run.objective_value(gamma, grad=True)
    assert value > 0
    eps = 1e-3
    for i, j in np.ndindex(2, 3):
        up, down = gamma.copy(), gamma.copy()
        up[i, j] += eps
        down[i, j] -= eps
        fd = (run.objective_value(up)[0] - run.objective_value(down)[0]) / (2 * eps)
        assert fd == pytest.approx(grad[i, j], rel=2e-3, abs=1e-6)
    result = adamerging(adapters[:2], tasks, level="layer", samples=8, max_steps=2, limit=6)
    assert result.coefficients.shape == (2, 3) and result.anp is not None


def test_cli_json_shape(learned_study_dirs, capsys):
    folders, tasks = learned_study_dirs
    code = main(["adamerging", *map(str, folders), "--tasks", str(tasks), "--level", "layer", "--samples", "8",
                 "--epochs", "1", "--init", "0.3", "--clamp", "--limit", "6", "--quiet"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["adapters"] == ["alpha", "beta", "gamma"] and data["level"] == "layer"
    assert data["divergence"] is None and data["objective"] == "entropy" and data["method"] == "adamerging"
    gamma = np.asarray(data["coefficients"])
    assert gamma.shape == (3, 3) and gamma.min() >= 0 and gamma.max() <= 1 and data["layers"] == [0, 1, 2]
    assert len(data["history"]) == 2 and set(data["scores"]) == {"alpha", "beta", "gamma"}
    assert data["settings"]["lr"] == 1e-3 and data["settings"]["clamp"] is True
