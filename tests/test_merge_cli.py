"""``python -m geometry merge``: peft folder output, exact rank-sum by default, precise errors."""

from __future__ import annotations

import json

import pytest
import torch

from geometry.cli import main
from geometry.io.loader import load_adapter
from tests.families import save_adapter


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    a, _ = save_adapter("bert", root / "a", seed=1, r=4, lora_alpha=8)
    b, _ = save_adapter("bert", root / "b", seed=2, r=2, lora_alpha=8)
    return a, b


def test_merge_task_arithmetic_keeps_exact_rank_sum(pair, tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["merge", str(pair[0]), str(pair[1]), "--method", "task_arithmetic", "--weights", "1,-0.5",
                 "--out", str(out)]) == 0
    assert "energy kept 100%" in capsys.readouterr().out
    merged, a, b = load_adapter(out), load_adapter(pair[0]), load_adapter(pair[1])
    for key, mod in merged.modules.items():
        assert mod.rank == 6 and mod.scale == 1.0
        ref = a.modules[key].dense() - 0.5 * b.modules[key].dense()
        assert torch.allclose(mod.dense(), ref, atol=1e-6 * float(ref.abs().max()))
    info = json.loads((out / "merge_info.json").read_text())
    assert info["params"]["weights"] == [1.0, -0.5] and info["energy_kept_total"] == 1.0


def test_merge_ties_with_rank_reports_energy(pair, tmp_path, capsys):
    out = tmp_path / "t"
    assert main(["merge", str(pair[0]), str(pair[1]), "--method", "ties", "--density", "0.3", "--rank", "2",
                 "--out", str(out)]) == 0
    line = capsys.readouterr().out
    assert "rank 2" in line and "energy kept 100%" not in line
    assert {m.rank for m in load_adapter(out).modules.values()} == {2}


@pytest.mark.parametrize("extra, message", [
    (["--method", "lora_average"], "lora_average needs equal ranks per module: model.0.down: a r=4, b r=2"),
    (["--method", "ties", "--weights", "1"], "got 1 merge weights for 2 adapters"),
    (["--method", "ties", "--weights", "1,x"], "--weights '1,x': expected comma-separated numbers"),
    (["--method", "task_arithmetic", "--density", "0.5"], "--density does not apply to --method task_arithmetic"),
    (["--method", "ties", "--density", "1.5"], "density must be in (0, 1]"),
])
def test_merge_errors_are_one_line(pair, tmp_path, capsys, extra, message):
    assert main(["merge", str(pair[0]), str(pair[1]), *extra, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_merge_different_bases(tmp_path, capsys):
    a, _ = save_adapter("bert", tmp_path / "a", seed=1)
    b, _ = save_adapter("bert", tmp_path / "b", seed=2)
    cfg = json.loads((b / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "org/other-base"
    (b / "adapter_config.json").write_text(json.dumps(cfg))
    cfg = json.loads((a / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "org/base"
    (a / "adapter_config.json").write_text(json.dumps(cfg))
    assert main(["merge", str(a), str(b), "--method", "ties", "--out", str(tmp_path / "x")]) == 2
    assert "different base models (a: org/base, b: org/other-base)" in capsys.readouterr().err


def test_merge_ties_defaults_to_sum_of_input_ranks_and_prints_energy(pair, tmp_path, capsys):
    out = tmp_path / "d"
    args = ["merge", str(pair[0]), str(pair[1]), "--method", "ties", "--density", "0.2", "--out", str(out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    lines = text.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"wrote {out}: ties of 2 adapters")
    assert "rank 6," in lines[0]
    info = json.loads((out / "merge_info.json").read_text())
    assert set(info["ranks"].values()) == {6}  # r_a + r_b = 4 + 2, not the numerical rank (32)
    assert 0.0 < info["energy_kept_total"] < 1.0
    total = f"{100 * info['energy_kept_total']:.4g}%"
    assert lines[1].startswith(f"energy kept: {total} of sum ||delta||_F^2 over")
    assert "rank: sum of the input ranks" in lines[1]
    worst = min(info["energy_kept"], key=info["energy_kept"].get)
    assert f"lowest {100 * info['energy_kept'][worst]:.4g}% at {worst}" in lines[1]
    assert {m.rank for m in load_adapter(out).modules.values()} == {6}


def test_bad_method_is_one_error_line_and_out_must_be_new_or_empty(pair, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["merge", str(pair[0]), str(pair[1]), "--method", "nope", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and "invalid choice: 'nope'" in err[0] and err[0].startswith("error:")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    args = ["merge", str(pair[0]), str(pair[1]), "--method", "task_arithmetic", "--out", str(full)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "--force" in err and (full / "keep.txt").read_text() == "mine"
    assert not (full / "adapter_config.json").exists()
    assert main([*args, "--force"]) == 0 and (full / "adapter_config.json").is_file()


def test_method_parameters_through_param(pair, tmp_path, capsys):
    out = tmp_path / "bc"
    assert main(["merge", str(pair[0]), str(pair[1]), "--method", "breadcrumbs", "--density", "0.5",
                 "--param", "gamma=0.02", "--param", "per-row=true", "--out", str(out)]) == 0
    info = json.loads((out / "merge_info.json").read_text())
    assert info["params"]["gamma"] == 0.02 and info["params"]["per_row"] is True
    out = tmp_path / "kn"
    assert main(["merge", str(pair[0]), str(pair[1]), "--method", "knots", "--param", "merge_method=dare_ties",
                 "--seed", "3", "--out", str(out)]) == 0
    info = json.loads((out / "merge_info.json").read_text())
    assert info["params"]["merge_method"] == "dare_ties" and info["rank_rule"].startswith("numerical rank")
    capsys.readouterr()
    for extra, message in (
        (["--method", "ties", "--param", "gamma=0.1"], "--param gamma: merge method 'ties' does not take it"),
        (["--method", "della", "--param", "rescale=l2"], "--param rescale=l2: expected one of probability, l1, none"),
        (["--method", "knots", "--param", "merge_method=iso_c"], "expected one of ties, dare_ties"),
        (["--method", "iso_c", "--param", "alpha"], "expected NAME=VALUE"),
        (["--method", "della", "--param", "epsilon=0.6"], "epsilon must keep density +/- epsilon"),
    ):
        assert main(["merge", str(pair[0]), str(pair[1]), *extra, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
