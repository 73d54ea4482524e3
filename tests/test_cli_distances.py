"""``python -m geometry distances``: JSON / CSV matrix and per-layer forms, errors as one line."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
import torch

from geometry.analysis.distances import pairwise_distances
from geometry.cli import main
from geometry.io.loader import load_adapter
from geometry.testing import random_adapter, save_peft_folder

KINDS = {"q": (16, 12), "v": (8, 12), "down": (12, 20)}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return [
        str(save_peft_folder(random_adapter(f"ad{i}", layers=4, kinds=KINDS, r=3 + i, seed=i), root / f"ad{i}"))
        for i in range(3)
    ]


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_json_matrix_defaults_to_v_and_matches_the_library(capsys, folders):
    code, out, _ = run(capsys, "distances", *folders, "--metric", "grassmann", "--layers", "last:2")
    assert code == 0
    data = json.loads(out)
    assert data["adapters"] == ["ad0", "ad1", "ad2"]
    assert (data["metric"], data["factor"], data["kind"], data["layers"]) == ("grassmann", "ba", "v", [2, 3])
    ref = pairwise_distances([load_adapter(f) for f in folders], "grassmann", "ba", "v", device=torch.device("cpu"))
    np.testing.assert_allclose(np.array(data["matrix"]), ref.reduce("last:2"), rtol=1e-12)


def test_per_layer_records_and_csv(capsys, folders, tmp_path):
    code, out, _ = run(capsys, "distances", *folders[:2], "--metric", "l2", "--kind", "down", "--per-layer", "--layers", "1,3")
    records = json.loads(out)
    assert code == 0 and len(records) == 2 * 2 * 2
    assert set(records[0]) == {"i", "j", "adapter_i", "adapter_j", "layer", "kind", "value"}
    assert {(r["i"], r["adapter_i"]) for r in records} == {(0, "ad0"), (1, "ad1")}  # indices kept, names added
    assert {r["layer"] for r in records} == {1, 3} and all(r["kind"] == "down" for r in records)
    target = tmp_path / "m.csv"
    code, out, _ = run(capsys, "distances", *folders, "--metric", "cosine", "--factor", "b", "--format", "csv", "--out", str(target))
    rows = list(csv.reader(io.StringIO(target.read_text())))
    assert code == 0 and out == ""
    assert rows[0] == ["adapter", "ad0", "ad1", "ad2"] and rows[1][1] == "0.0"
    assert rows[1][2] == ""  # cosine on B alone between r=3 and r=4: undefined (NaN) -> empty cell


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--kind", "gate"], "kind 'gate' is not common"),
        (["--layers", "last:x"], "layers"),
        (["--layers", "7"], "not available"),
    ],
)
def test_errors_are_one_line(capsys, folders, argv, needle):
    code, out, err = run(capsys, "distances", *folders[:2], *argv)
    assert code == 2 and err.startswith("error:") and needle in err and len(err.strip().splitlines()) == 1


def test_missing_path_and_single_adapter(capsys, folders, tmp_path):
    code, _, err = run(capsys, "distances", folders[0], str(tmp_path / "nope"))
    assert code == 2 and err.startswith("error:") and "nope" in err
    code, _, err = run(capsys, "distances", folders[0])
    assert code == 2 and "at least two adapters" in err


def test_per_layer_csv_names_adapters_and_pad_notes_say_the_convention(capsys, folders):
    code, out, err = run(capsys, "distances", *folders[:2], "--metric", "grassmann", "--pad", "--per-layer",
                         "--format", "csv")
    rows = list(csv.reader(io.StringIO(out)))
    assert code == 0 and rows[0] == ["i", "j", "adapter_i", "adapter_j", "layer", "kind", "value"]
    assert rows[1][2:4] == ["ad0", "ad0"]
    assert "(--pad) add |r1 - r2| right angles" in err and "uses min(r1, r2)" not in err
    assert "note: Grassmann distance d_G = sqrt(sum theta_i^2 + |r1 - r2| (pi/2)^2)" in err


def test_bad_choice_is_one_error_line(capsys, folders):
    with pytest.raises(SystemExit) as exc:
        main(["distances", *folders[:2], "--metric", "manhattan"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("error: distances: argument --metric")


def test_several_metrics_and_kinds_in_one_call_match_the_single_calls(capsys, folders):
    code, out, err = run(capsys, "distances", *folders, "--metric", "grassmann,cosine", "--kind", "q,down",
                         "--layers", "last:2")
    assert code == 0
    data = json.loads(out)
    assert data["adapters"] == ["ad0", "ad1", "ad2"] and data["factor"] == "ba"
    pairs = [(r["metric"], r["kind"]) for r in data["results"]]
    assert pairs == [("grassmann", "q"), ("grassmann", "down"), ("cosine", "q"), ("cosine", "down")]
    for result in data["results"]:
        code, single, _ = run(capsys, "distances", *folders, "--metric", result["metric"], "--kind", result["kind"],
                              "--layers", "last:2")
        single = json.loads(single)
        assert {k: result[k] for k in single if k not in ("adapters", "matrix")} == {
            k: v for k, v in single.items() if k not in ("adapters", "matrix")}
        np.testing.assert_allclose(np.array(result["matrix"]), np.array(single["matrix"]), rtol=1e-12, atol=1e-15)
    assert err.count("note: Grassmann distance") == 1


def test_several_metrics_decompose_each_adapter_once_per_kind(capsys, folders, monkeypatch):
    """The work is bounded: one all_distances pass per kind, whatever the number of metrics."""
    import geometry.analysis.distances as gd

    calls = []
    real = gd.all_distances

    def counting(adapters, kind=None, metrics=(), *args, **kwargs):
        calls.append((tuple(kind), tuple(metrics)))
        return real(adapters, kind, metrics, *args, **kwargs)

    monkeypatch.setattr(gd, "all_distances", counting)
    code, _, _ = run(capsys, "distances", *folders, "--metric", "l2,cosine,grassmann", "--kind", "q,v")
    assert code == 0 and calls == [(("q",), ("l2", "cosine", "grassmann")), (("v",), ("l2", "cosine", "grassmann"))]


def test_several_per_layer_records_and_csv_gain_a_metric_column(capsys, folders):
    code, out, _ = run(capsys, "distances", *folders[:2], "--metric", "l2,cosine", "--per-layer", "--layers", "3")
    records = json.loads(out)
    assert code == 0 and len(records) == 2 * 2 * 2 * 1
    assert set(records[0]) == {"i", "j", "adapter_i", "adapter_j", "layer", "kind", "metric", "value"}
    assert {(r["metric"], r["kind"]) for r in records} == {("l2", "v"), ("cosine", "v")}  # default kind v
    code, out, _ = run(capsys, "distances", *folders[:2], "--metric", "l2", "--kind", "q,v", "--per-layer",
                       "--layers", "3", "--format", "csv")
    rows = list(csv.reader(io.StringIO(out)))
    assert rows[0] == ["i", "j", "adapter_i", "adapter_j", "layer", "kind", "metric", "value"]
    assert len(rows) == 1 + 2 * 2 * 2 and {r[5] for r in rows[1:]} == {"q", "v"} and {r[6] for r in rows[1:]} == {"l2"}
    code, out, _ = run(capsys, "distances", *folders, "--metric", "cosine,l2", "--format", "csv")
    rows = list(csv.reader(io.StringIO(out)))
    assert rows[0] == ["metric", "kind", "adapter", "ad0", "ad1", "ad2"] and len(rows) == 1 + 2 * 3
    assert [r[:3] for r in rows[1:4]] == [["cosine", "v", "ad0"], ["cosine", "v", "ad1"], ["cosine", "v", "ad2"]]
    assert rows[4][:2] == ["l2", "v"] and rows[4][3] == "0.0"


def test_several_kinds_errors_stay_one_line(capsys, folders):
    code, _, err = run(capsys, "distances", *folders[:2], "--metric", "l2,cosine", "--kind", "q,gate")
    assert code == 2 and "kind 'gate' is not common" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as exc:
        main(["distances", *folders[:2], "--metric", "l2,manhattan"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and "'manhattan'" in err[0]
