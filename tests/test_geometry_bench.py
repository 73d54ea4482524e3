"""The geometry benchmark runs end to end on tiny shapes and ends with its JSON line (no timing claims)."""

from __future__ import annotations

import importlib.util
import json

from geometry.diskcache import REPO


def _bench():
    spec = importlib.util.spec_from_file_location("geometry_bench", REPO / "bench" / "geometry_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_quick_bench_prints_json_last(capsys):
    bench = _bench()
    assert bench.main(["--quick", "--adapters", "2", "--layers", "1", "--threads", "1"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    data = json.loads(last)
    assert {"factored_s", "dense_s_extrapolated", "ratio", "qr_b_s", "ratio_vs_qr_b", "per_shape"} <= set(data)
    assert data["quick"] is True and data["factored_s"] > 0 and data["dense_s_extrapolated"] > 0
    # One entry per distinct module shape, module counts summing to the workload's 7 kinds x 1 layer.
    assert sum(v["modules"] for v in data["per_shape"].values()) == 7
    assert {"q/o", "k/v", "gate/up", "down"} == set(data["per_shape"])


def test_dense_baseline_agrees_with_the_factored_distances():
    """The baseline computes the same numbers (it is a baseline for the same work, not another one)."""
    import numpy as np

    from geometry.distances import all_distances
    from geometry.types import ModuleKey

    bench = _bench()
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
