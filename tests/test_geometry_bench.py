"""The geometry benchmark runs end to end on tiny shapes and ends with its JSON line: its figures are
consistent (ratios of the reported times, finite and positive, as many timed runs as asked), and its
dense baseline computes the same distances as the library (no timing claims)."""

from __future__ import annotations

import json
import math

import pytest


def test_quick_bench_prints_json_last(capsys, load_bench):
    bench = load_bench("geometry_bench")
    assert bench.main(["--quick", "--adapters", "2", "--layers", "1", "--threads", "1", "--repeats", "2"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    data = json.loads(last)
    assert data["quick"] is True and data["adapters"] == 2 and data["layers"] == 1 and data["threads"] == 1
    # as many timed runs as asked, each a positive time, the reported figure their median
    assert len(data["factored_runs_s"]) == len(data["qr_b_runs_s"]) == 2
    assert all(t > 0 for t in data["factored_runs_s"] + data["qr_b_runs_s"])
    runs = data["factored_runs_s"]  # printed to 4 significant digits
    assert min(runs) * (1 - 1e-3) <= data["factored_s"] <= max(runs) * (1 + 1e-3)
    # the ratios are the reported times' ratios, finite and positive (6 significant digits in the JSON)
    for key in ("factored_s", "dense_s_extrapolated", "qr_b_s", "factored_grassmann_s", "ratio", "ratio_vs_qr_b"):
        assert math.isfinite(data[key]) and data[key] > 0, key
    assert data["ratio"] == pytest.approx(data["dense_s_extrapolated"] / data["factored_s"], rel=1e-4)
    assert data["ratio_vs_qr_b"] == pytest.approx(data["qr_b_s"] / data["factored_grassmann_s"], rel=1e-4)
    # one entry per distinct module shape, module counts summing to the workload's 7 kinds x 1 layer
    assert sum(v["modules"] for v in data["per_shape"].values()) == 7
    assert {"q/o", "k/v", "gate/up", "down"} == set(data["per_shape"])
    for shape in data["per_shape"].values():
        assert math.isfinite(shape["ratio"]) and shape["ratio"] > 0
        assert shape["ratio"] == pytest.approx(shape["dense_s_extrapolated"] / shape["factored_s"], rel=1e-4)
    # the extrapolated dense total is the per-shape sum (the count, not a model)
    total = sum(v["dense_s_extrapolated"] for v in data["per_shape"].values())
    assert data["dense_s_extrapolated"] == pytest.approx(total, rel=1e-4)


def test_dense_baseline_agrees_with_the_factored_distances(load_bench):
    """The baseline computes the same numbers (it is a baseline for the same work, not another one)."""
    import numpy as np

    from geometry.analysis.distances import all_distances
    from geometry.types import ModuleKey

    bench = load_bench("geometry_bench")
    shapes = {"q": (24, 20), "down": (20, 30)}
    ads = bench.make_adapters(3, 1, shapes, 4, seed=1)
    res = all_distances(ads, device="cpu")
    for kind in shapes:
        key = ModuleKey("model", 0, kind)
        preps = [bench.dense_prepare(ad.modules[key]) for ad in ads]
        for i in range(3):
            for j in range(i + 1, 3):
                for name, value in bench.dense_pair(preps[i], preps[j]).items():
                    metric, factor = name.split("/")
                    got = res[metric, factor, "model", kind].values[i, j, 0]
                    assert np.isclose(got, value, rtol=1e-9, atol=1e-12), (name, kind, i, j)
    for (kind, factor), values in bench.qr_b_workload(ads, list(shapes), 1).items():
        assert values.shape == (3, 1)
        for p, (i, j) in enumerate([(0, 1), (0, 2), (1, 2)]):
            for f in (factor, "ba") if factor == "b" else (factor,):  # Im(BA) = Im(B): A has full row rank
                got = res["grassmann", f, "model", kind].values[i, j, 0]
                assert np.isclose(got, float(values[p, 0]), rtol=1e-9), (kind, f, i, j)
