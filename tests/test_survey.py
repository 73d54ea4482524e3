"""Surveys (geometry/survey.py, geometry/survey/cluster.py): equal to geometry.distances, blocked = unblocked,
resumable, 1 worker = 2 workers, URLs = paths, the neighbours query and the command line."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

import geometry
from geometry import survey as sv
from geometry.cli import main
from geometry.errors import AtlasError
from geometry.testing import random_adapter, save_peft_folder
from geometry.types import ModuleKey

KINDS = {"q": (40, 24), "v": (16, 24)}
N = 6


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory):
    """Six adapters: random ones, an exact copy (promoted layers, ~0 distances) and one zero module (NaN)."""
    root = tmp_path_factory.mktemp("survey") / "ads"
    for k in range(N - 1):
        ad = random_adapter(f"a{k}", layers=2, kinds=KINDS, r=4, seed=k)
        if k == 3:
            ad.modules[ModuleKey("model", 1, "v")].B.zero_()  # B = 0: its Grassmann / cosine are undefined
        save_peft_folder(ad, root / f"a{k}")
    save_peft_folder(random_adapter("copy", layers=2, kinds=KINDS, r=4, seed=0), root / "a5_copy")
    return root


@pytest.fixture(scope="module")
def full(adapters_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "results.parquet"
    return sv.run_survey(adapters_dir, out)


def _sorted(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values(["layer", "kind", "i", "j"]).reset_index(drop=True)


def test_equals_in_memory_distances_every_metric_and_module(full, adapters_dir):
    ads = geometry.load(str(adapters_dir))
    assert full.names == ads.names
    frame = full.frame()
    assert len(frame) == N * (N - 1) // 2 * 4  # pairs x (2 layers x 2 kinds)
    for col in sv.METRIC_COLUMNS:
        metric, factor = col.rsplit("_", 1)
        for kind in KINDS:
            ref = geometry.distance_table(ads, metric=metric, factor=factor, kind=kind)
            ref = ref[ref.i < ref.j].sort_values(["layer", "i", "j"])
            got = frame[frame.kind == kind].sort_values(["layer", "i", "j"])
            np.testing.assert_allclose(got[col].to_numpy(), ref["value"].to_numpy(), rtol=1e-12, atol=1e-14,
                                       err_msg=col)


def test_undefined_is_nan_not_zero(full):
    frame = full.frame()
    zero = frame[(frame.layer == 1) & (frame.kind == "v") & ((frame.adapter_i == "a3") | (frame.adapter_j == "a3"))]
    assert len(zero) == N - 1
    assert zero["grassmann_ba"].isna().all() and zero["cosine_ba"].isna().all() and zero["grassmann_b"].isna().all()
    assert zero["l2_ba"].notna().all() and (zero["l2_ba"] > 0).all()  # L2 to a zero task vector is defined
    values, counts = full.matrix("grassmann_ba", kind=["v"])
    a3, a0 = full.names.index("a3"), full.names.index("a0")
    assert counts[a3, a0] == 1 and counts[a0, a0 + 1] == 2  # the mean skipped the undefined layer
    nb = full.neighbours("a3", "grassmann_ba", k=10, kind=["v"], layers=[1])
    assert nb["distance"].isna().all() and (nb["modules"] == 0).all()


def test_copy_is_nearest_with_tiny_distance(full):
    nb = full.neighbours("a0", "grassmann_ba", k=3)
    assert nb.loc[0, "adapter"] == "a5_copy" and nb.loc[0, "distance"] < 1e-10
    assert list(nb["rank"]) == [1, 2, 3] and nb["distance"].is_monotonic_increasing
    with pytest.raises(AtlasError, match="no adapter named"):
        full.neighbours("nope")


def test_blocked_equals_unblocked(full, adapters_dir, tmp_path):
    blocked = sv.run_survey(adapters_dir, tmp_path / "b.parquet", settings=sv.SurveySettings(block=2, pair_chunk=3))
    a, b = _sorted(full.frame()), _sorted(blocked.frame())
    for col in sv.METRIC_COLUMNS:
        np.testing.assert_allclose(b[col].to_numpy(), a[col].to_numpy(), rtol=1e-9, atol=1e-12, err_msg=col)


def test_blocked_module_distances_large_factors():
    """Blocks of the Gram product on float32-Gram-sized factors (d >= 1024) against one block."""
    gen = torch.Generator().manual_seed(1)
    n, (m, k), r = 7, (1100, 64), 3
    Bs = [torch.randn(m, r, generator=gen) / m**0.5 for _ in range(n)]
    As = [torch.randn(r, k, generator=gen) / k**0.5 for _ in range(n)]
    one = sv.module_distances(Bs, As, [2.0] * n, [r] * n)
    many = sv.module_distances(Bs, As, [2.0] * n, [r] * n, block=3, pair_chunk=4)
    for col in sv.METRIC_COLUMNS:
        np.testing.assert_allclose(many[col], one[col], rtol=1e-6, err_msg=col)


def test_memory_plan_blocks_and_refuses():
    assert sv.plan_blocks(100, 16, (4096, 4096), 64.0)[0] == 100
    block, chunk = sv.plan_blocks(2000, 16, (4096, 14336), 4.0)
    assert 1 <= block < 1000 and chunk >= 1
    assert sv.task_bytes(2 * block, chunk, 16, (4096, 14336)) <= 4 * 2**30
    with pytest.raises(AtlasError, match="too small"):
        sv.plan_blocks(10, 16, (4096, 14336), 0.6)


def test_resume_skips_finished_modules(full, adapters_dir, tmp_path, monkeypatch):
    out = tmp_path / "r.parquet"
    computed: list[str] = []
    real = sv.compute_module

    def counting(task):
        computed.append(task.label)
        return real(task)

    monkeypatch.setattr(sv.run, "compute_module", counting)  # where run_survey looks it up

    class Stop(Exception):
        pass

    def stop_after_two(done, total, message):
        if done == 2:
            raise Stop

    with pytest.raises(Stop):
        sv.run_survey(adapters_dir, out, progress=stop_after_two)
    assert len(sv.finished_modules(out)) == 2 and len(computed) == 2
    first = list(computed)
    computed.clear()
    seen = []
    resumed = sv.run_survey(adapters_dir, out, progress=lambda d, t, m: seen.append(d))
    assert len(computed) == 2 and not set(first) & set(computed)  # only the remaining modules
    assert seen[0] == 2 and seen[-1] == 4
    pd.testing.assert_frame_equal(_sorted(resumed.frame()), _sorted(full.frame()))
    computed.clear()
    sv.run_survey(adapters_dir, out)
    assert computed == []  # nothing left to do


def test_resume_refuses_other_adapters(adapters_dir, tmp_path):
    out = tmp_path / "o.parquet"
    refs = sv.scan(adapters_dir)
    sv.run_survey(refs[:3], out, kind=["v"])
    with pytest.raises(AtlasError, match="other adapters"):
        sv.run_survey(refs[:4], out, kind=["v"])
    with pytest.raises(AtlasError, match="other settings"):
        sv.run_survey(refs[:3], out, kind=["v"], settings=sv.SurveySettings(pad=True))


def test_url_reading_equals_paths(full, adapters_dir, tmp_path):
    refs = sv.scan(f"file://{adapters_dir}")
    assert [r.name for r in refs] == full.names
    task = sv.plan(refs, kind=["q"], layers=[0])[0]
    assert task.refs[0].weights.startswith("file://")
    got = sv.compute_module(task)["values"]
    frame = full.frame()
    ref = frame[(frame.module == "model.0.q")].sort_values(["i", "j"])
    for col in sv.METRIC_COLUMNS:
        np.testing.assert_allclose(got[col], ref[col].to_numpy(), rtol=1e-12, atol=1e-14)


def test_list_file_and_single_file_roundtrip(full, adapters_dir, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("# adapters\n" + "\n".join(str(p) for p in sorted(adapters_dir.iterdir())) + "\n")
    assert len(sv.adapter_locations(listing)) == N
    single = full.save(tmp_path / "one.parquet")
    again = sv.open_survey(single)
    assert again.names == full.names
    pd.testing.assert_frame_equal(_sorted(again.frame()), _sorted(full.frame()))
    np.testing.assert_array_equal(again.matrix("cosine_ba")[1], full.matrix("cosine_ba")[1])
    again2 = sv.open_survey(sv.survey_bytes_to_file(full.to_bytes(), tmp_path / "up"))
    assert again2.adapters["name"].tolist() == full.names
    with pytest.raises(AtlasError, match="not a Parquet file"):
        bad = tmp_path / "bad.parquet"
        bad.write_text("hello")
        sv.open_survey(bad)


def test_dask_one_worker_equals_two(full, adapters_dir, tmp_path):
    pytest.importorskip("distributed")
    from geometry.survey.cluster import dask_runner, start_client, worker_count

    client = start_client(workers=1, processes=False)
    try:
        one = sv.run_survey(adapters_dir, tmp_path / "w1.parquet", runner=dask_runner(client, threads=1))
        client.cluster.scale(2)
        client.wait_for_workers(2, timeout=30)
        assert worker_count(client) == 2
        two = sv.run_survey(adapters_dir, tmp_path / "w2.parquet", runner=dask_runner(client, threads=1))
    finally:
        cluster = client.cluster
        client.close()
        cluster.close()
    a, b = _sorted(one.frame()), _sorted(two.frame())
    pd.testing.assert_frame_equal(a, b)  # the same numbers, bit for bit
    for col in sv.METRIC_COLUMNS:
        np.testing.assert_allclose(a[col].to_numpy(), _sorted(full.frame())[col].to_numpy(), rtol=1e-12, atol=1e-14)


# -- command line ------------------------------------------------------------------------------------
def test_cli_survey_and_neighbours(adapters_dir, tmp_path, capsys):
    out = tmp_path / "cli.parquet"
    assert main(["survey", str(adapters_dir), "--out", str(out), "--kinds", "v", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "wrote 2 module(s) x 15 pairs" in err
    assert main(["neighbours", str(out), "a0", "--k", "2"]) == 0
    text = capsys.readouterr().out.splitlines()
    assert text[0] == "nearest to a0 by mean grassmann_ba over modules:"
    assert text[1].split()[:2] == ["1", "a5_copy"] and len(text) == 3
    assert main(["neighbours", str(out), "a1", "--metric", "cosine", "--factor", "b", "--format", "json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert len(records) == N - 1 and {"rank", "adapter", "distance", "modules"} <= set(records[0])
    frame = sv.open_survey(out).neighbours("a1", "cosine_b", k=10)
    assert [r["adapter"] for r in records] == frame["adapter"].tolist()
    assert math.isclose(records[0]["distance"], frame.loc[0, "distance"], rel_tol=1e-12)
    assert main(["neighbours", str(out), "a3", "--layers", "1"]) == 0
    assert "undefined (NaN)" in capsys.readouterr().out


@pytest.mark.parametrize("argv, needle", [
    (["survey", "/no/such/dir", "--out", "{tmp}/x"], "/no/such/dir: no such file or folder"),
    (["survey", "{ads}", "--out", "{tmp}/x", "--kinds", "zz"], "kind(s) zz not common"),
    (["survey", "{ads}", "--out", "{tmp}/x", "--memory-limit", "0"], "--memory-limit 0"),
    (["neighbours", "/no/such.parquet", "a0"], "no such file or folder"),
    (["neighbours", "{ads}", "a0"], "not a survey folder"),
])
def test_cli_errors_exit_2_with_one_line(argv, needle, adapters_dir, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path, ads=adapters_dir) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0], err


@pytest.mark.slow
def test_bench_quick_runs_and_reports(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(repo / "bench" / "survey_bench.py"), "--quick", "--no-dask", "--dir",
                           str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (last["adapters"], last["layers"], last["modules"]) == (12, 1, 7)  # the quick workload, all of it
    assert 0 < last["peak_rss_gb"] < last["memory_limit_gb"] == 4
    pairs = 12 * 11 // 2
    assert last["seconds_per_pair"] * pairs == pytest.approx(last["seconds"], abs=0.006)  # seconds: 2 decimals
    assert last["seconds_per_pair_module"] == pytest.approx(last["seconds_per_pair"] / 7)
    for key in ("seconds_per_pair", "growth_vs_n2", "gemm_gflops"):
        assert math.isfinite(last[key]) and last[key] > 0, key
    proj = last["projection_1000_llama3_8b"]
    assert all(math.isfinite(v) and v > 0 for v in proj.values() if isinstance(v, (int, float))), proj
    assert list(tmp_path.iterdir()) == []  # the synthetic adapters are deleted


def test_mixed_ranks_equal_in_memory_distances(tmp_path):
    """Different ranks (zero-padded blocks; NaN for entry-wise L2 / cosine on A or B alone) as geometry.distances."""
    root = tmp_path / "mixed"
    for k, r in enumerate((4, 4, 6, 2)):
        save_peft_folder(random_adapter(f"m{k}", layers=2, kinds={"v": (16, 24)}, r=r, seed=10 + k), root / f"m{k}")
    survey = sv.run_survey(root, tmp_path / "mixed.parquet", settings=sv.SurveySettings(block=2))
    frame = survey.frame().sort_values(["layer", "i", "j"])
    ads = geometry.load(str(root))
    for col in sv.METRIC_COLUMNS:
        metric, factor = col.rsplit("_", 1)
        ref = geometry.distance_table(ads, metric=metric, factor=factor, kind="v")
        ref = ref[ref.i < ref.j].sort_values(["layer", "i", "j"])
        np.testing.assert_allclose(frame[col].to_numpy(), ref["value"].to_numpy(), rtol=1e-9, atol=1e-12, err_msg=col)
    assert frame["l2_b"].isna().any() and frame["l2_ba"].notna().all()
