"""DivMerge (geometry.learned): divergences, one task recovers 1, the objective decreases on the sample pair,
gradients equal finite differences, LL shapes, the exported merge is task arithmetic, the step-wise API
(stop keeps the coefficients, resume, background thread), the result cache, the CLI and its errors."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from geometry.cli import main
from geometry.errors import AtlasError
from geometry.io.loader import load_adapter
from geometry.learned import DivMerge, UnlabeledDataError, divmerge, entropy, js_divergence, kl_divergence
from geometry.merging import task_arithmetic
from geometry.runtime import Runtime
from tests.merge_fixtures import write_study

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "sample_adapters" / "synthetic"


# learned_study_dirs, learned_tiny: tests/conftest.py (the tiny study shared with tests/test_adamerging.py)
pytestmark = pytest.mark.usefixtures("isolated_cache")


@pytest.fixture(scope="module")
def sample_pair():
    return [load_adapter(SAMPLES / "nli"), load_adapter(SAMPLES / "paraphrase")]


# ------------------------------------------------------------------------------------------- divergences
def test_js_symmetric_bounded_zero_only_for_equal_kl_forward_entropy():
    g = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.randn(50, 5, generator=g, dtype=torch.float64) * 3, -1)
    logq = torch.log_softmax(torch.randn(50, 5, generator=g, dtype=torch.float64) * 3, -1)
    js = js_divergence(logp, logq)
    torch.testing.assert_close(js, js_divergence(logq, logp))
    assert bool((js > 0).all()) and bool((js <= math.log(2)).all())
    assert float(js_divergence(logp, logp).abs().max()) < 1e-15
    p, q = logp.exp(), logq.exp()
    m = (p + q) / 2
    torch.testing.assert_close(js, 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1))
    torch.testing.assert_close(kl_divergence(logp, logq), (p * (logp - logq)).sum(-1))
    torch.testing.assert_close(entropy(logq), -(q * logq).sum(-1))
    # disjoint supports reach log 2 exactly; zeros (log 0 = -inf) give finite values and gradients
    a = torch.log(torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64))
    b = torch.log(torch.tensor([[0.0, 0.5, 0.5]], dtype=torch.float64)).requires_grad_(True)
    value = js_divergence(a, b)
    assert abs(float(value.detach()) - math.log(2)) < 1e-12
    value.sum().backward()
    assert bool(torch.isfinite(b.grad).all())
    assert float(entropy(a)) == 0.0


# ------------------------------------------------------------------------------------------- the optimisation
@pytest.mark.slow
def test_one_task_recovers_coefficient_one_and_zero_divergence(learned_tiny):
    adapters, tasks = learned_tiny
    run = DivMerge(adapters[:1], tasks, samples=24, epochs=25, lr=0.05)
    start, _ = run.objective_value()
    result = run.fit()
    assert result.coefficients.shape == (1, 1) and result.layers == ["all"]
    assert abs(float(result.coefficients[0, 0]) - 1.0) < 1e-2
    end, _ = run.objective_value()
    assert start > 1e-3 and end < 1e-3 * start


def test_objective_decreases_on_the_sample_pair(sample_pair):
    run = DivMerge(sample_pair, SAMPLES / "tasks", samples=12, epochs=2, lr=0.05, seed=0)
    before, _ = run.objective_value()
    states = list(run.steps())
    after, _ = run.objective_value()
    assert [s.step for s in states] == list(range(1, 7)) and states[-1].done
    assert after < 0.8 * before
    assert [h["step"] for h in run.history] == [1, 2, 3, 4, 5, 6]
    assert set(run.history[0]["terms"]) == {"nli", "paraphrase"}


@pytest.mark.parametrize("level", ["task", "layer"])
@pytest.mark.parametrize("divergence", ["js", "kl"])
def test_gradients_equal_finite_differences(learned_tiny, level, divergence):
    adapters, tasks = learned_tiny
    run = DivMerge(adapters[:2], tasks, level=level, divergence=divergence, samples=8)
    gamma = np.random.default_rng(1).uniform(0.2, 0.9, size=run.layout.shape)
    value, grad = run.objective_value(gamma, grad=True)
    assert value > 1e-4 and grad.shape == run.layout.shape
    eps = 1e-3
    for i, j in np.ndindex(*grad.shape):
        up, down = gamma.copy(), gamma.copy()
        up[i, j] += eps
        down[i, j] -= eps
        fd = (run.objective_value(up)[0] - run.objective_value(down)[0]) / (2 * eps)
        assert fd == pytest.approx(grad[i, j], rel=2e-3, abs=1e-6)


def test_layer_level_coefficients_are_tasks_by_layers(learned_tiny, sample_pair):
    adapters, tasks = learned_tiny
    run = DivMerge(adapters, tasks, level="layer", samples=8, max_steps=2)
    assert run.settings.samples == 8 and run.layout.layers == [0, 1, 2]
    result = run.fit()
    assert result.coefficients.shape == (3, 3) and result.frame().shape == (3, 3)
    assert list(result.frame().index) == [a.name for a in adapters]
    ll = DivMerge(sample_pair, SAMPLES / "tasks", level="layer")
    assert ll.layout.shape == (2, 6) and ll.layout.layers == [0, 1, 2, 3, 4, 5]
    assert ll.settings.samples == 400 and len(ll.inputs[0]) == 300  # the paper's 400; the sample tasks have 300
    assert any("400 samples asked, 300 available" in n for n in ll.notes)
    tl = DivMerge(sample_pair, SAMPLES / "tasks", init="uniform")
    assert tl.settings.samples == 200 and tl.settings.lr == 1e-2 and tl.settings.epochs == 4
    assert tl.total_steps == 4 * 50 and np.allclose(tl.coefficients, 0.5)
    module = DivMerge(sample_pair, SAMPLES / "tasks", level="module")
    assert module.layout.shape == (2, 12)


@pytest.mark.parametrize("level", ["task", "layer", "module"])
def test_exported_merge_is_task_arithmetic_with_the_coefficients(learned_tiny, tmp_path, level):
    adapters, tasks = learned_tiny
    adapters = adapters[:2]
    result = DivMerge(adapters, tasks, level=level, samples=8, max_steps=3, lr=0.1).fit()
    gamma = result.coefficients
    assert not np.allclose(gamma, 0.5)
    merged = result.merge()
    if level == "task":
        reference = task_arithmetic(adapters, gamma[:, 0].tolist())
    elif level == "layer":
        reference = task_arithmetic(adapters, [dict(enumerate(row.tolist())) for row in gamma])
    else:  # one weight per module: fold it into each module's scale by hand
        cols = {name: j for j, name in enumerate(result.layers)}
        scaled = [dataclasses.replace(a, modules={k: dataclasses.replace(m, scale=m.scale * gamma[t, cols[m.name]])
                                                  for k, m in a.modules.items()}) for t, a in enumerate(adapters)]
        reference = task_arithmetic(scaled)
    assert merged.modules.keys() == reference.modules.keys()
    for key, mod in merged.modules.items():
        torch.testing.assert_close(mod.B, reference.modules[key].B)
        torch.testing.assert_close(mod.A, reference.modules[key].A)
    # the merge computes what the runtime computed with the coefficients, also after a peft round trip
    folder = result.save(tmp_path / "out")
    assert (folder / "adapter_config.json").is_file()
    reloaded = load_adapter(folder)
    rt = Runtime.for_sources(adapters, head=adapters[0].name)
    enc = rt.encode(["good red cat", "small blue dog sun"])
    coefficients = result.layout.runtime_coefficients(torch.tensor(gamma))
    with torch.no_grad():
        with rt.apply(adapters, coefficients=coefficients, head=adapters[0].name):
            want = rt.forward(**enc).logits
        with rt.apply(merged, head=adapters[0].name):
            got = rt.forward(**enc).logits
        with rt.apply(reloaded):
            saved = rt.forward(**enc).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(saved, want, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------- step by step
def test_stop_keeps_the_coefficients_and_steps_resume(learned_tiny):
    adapters, tasks = learned_tiny
    run = DivMerge(adapters[:2], tasks, samples=8, epochs=3, lr=0.1)
    assert run.total_steps == 6 and run.snapshot().step == 0
    seen = []
    for state in run.steps():
        seen.append(state)
        if state.step == 2:
            run.stop()
    assert [s.step for s in seen] == [1, 2] and run.step == 2 and not run.done
    assert np.array_equal(run.result().coefficients, seen[-1].coefficients) and run.result().stopped
    state = next(iter(run.steps()))  # leaving the loop early also keeps them
    assert run.step == 3 and np.array_equal(run.coefficients, state.coefficients)
    rest = list(run.steps(evaluate_every=3, limit=6))
    assert [s.step for s in rest] == [4, 5, 6] and rest[-1].done and not run.result().stopped
    assert rest[-1].anp is not None and rest[0].anp is None
    assert set(rest[-1].anp["scores"]) == {"alpha", "beta"} and rest[-1].anp["limit"] == 6
    assert math.isfinite(rest[-1].anp["anp"]) and rest[-1].anp["anp"] > 0
    assert len(run.history) == 6 and run.result().evaluations[-1]["step"] == 6


def test_background_thread_and_same_seed_same_coefficients(learned_tiny):
    adapters, tasks = learned_tiny
    run = DivMerge(adapters[:2], tasks, samples=8, epochs=2, lr=0.1)
    run.start()
    run.join(timeout=120)
    assert not run.running and run.error is None and run.done
    again = DivMerge(adapters[:2], tasks, samples=8, epochs=2, lr=0.1).fit()
    np.testing.assert_array_equal(run.coefficients, again.coefficients)
    other_seed = DivMerge(adapters[:2], tasks, samples=8, epochs=2, lr=0.1, seed=1).fit()
    assert not np.array_equal(run.coefficients, other_seed.coefficients)


def test_finished_runs_are_cached_by_content(learned_tiny, tmp_path):
    from geometry.cache import ResultCache

    adapters, tasks = learned_tiny
    cache = ResultCache(tmp_path / "runs")
    first = DivMerge(adapters[:2], tasks, samples=8, epochs=1, lr=0.1, cache=cache)
    result = first.fit()
    assert not first.from_cache
    second = DivMerge(adapters[:2], tasks, samples=8, epochs=1, lr=0.1, cache=cache)
    states = list(second.steps())
    assert len(states) == 1 and states[0].cached and states[0].done and second.from_cache
    np.testing.assert_array_equal(second.coefficients, result.coefficients)
    assert second.history == first.history
    third = DivMerge(adapters[:2], tasks, samples=8, epochs=1, lr=0.2, cache=cache)  # other settings: another entry
    assert not list(third.steps())[0].cached
    uncached = DivMerge(adapters[:2], tasks, samples=8, epochs=1, lr=0.1)  # no cache: no disk, a fresh run
    assert uncached.cache is None and not list(uncached.steps())[0].cached


# ------------------------------------------------------------------------------------------- data and errors
def test_unlabeled_files_and_clear_errors(learned_tiny, learned_study_dirs, tmp_path):
    adapters, tasks = learned_tiny
    csv_file = tmp_path / "alpha.csv"
    csv_file.write_text("text,text_pair,label\nred cat,blue dog,1\nsun rain,big small,0\n", encoding="utf-8")
    run = DivMerge(adapters[:2], tasks, data={"alpha": csv_file}, samples=50, max_steps=1)
    assert run.inputs[0].texts == ["red cat", "sun rain"] and run.inputs[0].pairs == ["blue dog", "big small"]
    assert any("50 samples asked, 2 available" in n for n in run.notes)
    run.fit()
    bad = tmp_path / "bad.csv"
    bad.write_text("sentence,label\nred cat,1\n", encoding="utf-8")
    with pytest.raises(UnlabeledDataError, match="no 'text' column"):
        DivMerge(adapters[:2], tasks, data={"alpha": bad})
    with pytest.raises(AtlasError, match="not among the adapters"):
        DivMerge(adapters[:2], tasks, data={"nobody": csv_file})
    with pytest.raises(AtlasError, match="unknown divergence"):
        DivMerge(adapters[:2], tasks, divergence="hellinger")
    with pytest.raises(AtlasError, match="unknown level"):
        DivMerge(adapters[:2], tasks, level="block")
    with pytest.raises(AtlasError, match="init"):
        DivMerge(adapters[:2], tasks, init="half")
    with pytest.raises(AtlasError, match="samples must be a positive integer"):
        DivMerge(adapters[:2], tasks, samples=0)


def test_divmerge_function_scores_anp(learned_tiny):
    adapters, tasks = learned_tiny
    result = divmerge(adapters[:2], tasks, samples=8, max_steps=2, limit=8)
    assert result.anp is not None and set(result.to_dict()["scores"]) == {"alpha", "beta"}
    assert result.divergence == "js" and result.method == "divmerge"


# ------------------------------------------------------------------------------------------- command line
def test_cli_json_shape_and_peft_out(learned_study_dirs, tmp_path, capsys):
    folders, tasks = learned_study_dirs
    out = tmp_path / "merged"
    code = main(["divmerge", *map(str, folders[:2]), "--tasks", str(tasks), "--level", "layer", "--divergence", "kl",
                 "--samples", "8", "--epochs", "1", "--lr", "0.05", "--init", "uniform", "--limit", "8",
                 "--out", str(out), "--quiet"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert {"adapters", "level", "divergence", "coefficients", "layers", "history", "anp", "scores"} <= set(data)
    assert data["adapters"] == ["alpha", "beta"] and data["level"] == "layer" and data["divergence"] == "kl"
    assert np.asarray(data["coefficients"]).shape == (2, 3) and data["layers"] == [0, 1, 2]
    assert [h["step"] for h in data["history"]] == [1, 2] and set(data["history"][0]) == {"step", "objective"}
    assert set(data["scores"]) == {"alpha", "beta"} and set(data["scores"]["alpha"]) == {"merged", "finetuned"}
    assert isinstance(data["anp"], float) and data["settings"]["init_value"] == 0.5
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    code = main(["divmerge", *map(str, folders[:2]), "--tasks", str(tasks), "--samples", "8", "--max-steps", "1",
                 "--format", "csv", "--no-eval", "--quiet"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and lines[0] == "adapter,task,finetuned,merged,normalized,coefficient[all]" and len(lines) == 3


def test_cli_bad_inputs_exit_2_with_one_error_line(learned_study_dirs, tmp_path, capsys):
    folders, tasks = learned_study_dirs
    other, _ = write_study(tmp_path / "other", tasks=("delta",), n_examples=4)
    no_val = tmp_path / "tasks_no_validation"
    shutil.copytree(tasks, no_val)
    (no_val / "alpha" / "validation.jsonl").unlink()
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("sentence\nred cat\n", encoding="utf-8")
    cases = [
        ([str(folders[0]), str(other[0]), "--tasks", str(tasks)], "different base models"),
        ([str(folders[0]), "--tasks", str(tmp_path)], "no task data for adapter 'alpha'"),
        ([str(folders[0]), "--tasks", str(no_val)], "has no validation.jsonl"),
        ([str(folders[0]), "--tasks", str(tasks), "--data", f"alpha={bad_csv}"], "no 'text' column"),
        ([str(folders[0]), "--tasks", str(tasks), "--data", "alpha"], "expected NAME=FILE"),
    ]
    for argv, message in cases:
        for command in ("divmerge", "adamerging"):
            assert main([command, *argv, "--quiet"]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0].startswith("error:") and message in err[0], (command, message, err)
