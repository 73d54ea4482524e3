"""Adapter anatomy: factored, batched spectra against dense torch.linalg.svd of s * B @ A."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from geometry.analysis.anatomy import ANATOMY_COLUMNS, anatomy, decompose_adapter, ordered_keys
from geometry.testing import random_adapter, random_factors
from geometry.types import ModuleKey


def _dense_row(mod):
    tau = mod.dense()
    sv = torch.linalg.svd(tau).S
    tol = max(tau.shape) * torch.finfo(torch.float64).eps * float(sv[0])
    sv = sv[sv > tol].numpy()
    return tau, sv


def test_anatomy_matches_dense_svd_square_rectangular_and_mixed_ranks():
    ad = random_adapter("a", layers=3, kinds={"q": (24, 20), "v": (8, 20), "down": (20, 30)}, r={"q": 4, "v": 6, "down": 3}, seed=1)
    frame = anatomy(ad, device="cpu")
    assert list(frame.columns) == list(ANATOMY_COLUMNS)
    assert len(frame) == 9
    for row in frame.itertuples(index=False):
        mod = ad.modules[ModuleKey(row.stack, row.layer, row.kind)]
        tau, sv = _dense_row(mod)
        assert (row.m, row.n, row.r) == (*tau.shape, mod.rank)
        assert row.rank == len(sv) == min(mod.rank, *tau.shape)
        np.testing.assert_allclose(row.singular_values, sv, rtol=1e-10)
        assert row.fro_norm == pytest.approx(float(torch.linalg.matrix_norm(tau)), rel=1e-12)
        assert row.spectral_norm == pytest.approx(float(torch.linalg.matrix_norm(tau, 2)), rel=1e-12)
        assert row.stable_rank == pytest.approx(row.fro_norm**2 / row.spectral_norm**2, rel=1e-12)
        p = sv / sv.sum()
        assert row.effective_rank == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-12)
        assert row.entropy == pytest.approx(-(p * np.log(p)).sum() / math.log(len(sv)), rel=1e-12)
        assert 1.0 - 1e-12 <= row.effective_rank <= row.rank + 1e-12


def test_anatomy_rank_deficient_and_zero_modules():
    ad = random_adapter("a", layers=2, kinds={"q": (16, 12)}, r=5, seed=2)
    B, A = random_factors(16, 12, 5, seed=3, rank_b=2, dtype=torch.float32)
    ad.modules[ModuleKey("model", 0, "q")].B = B
    ad.modules[ModuleKey("model", 1, "q")].B = torch.zeros(16, 5)
    frame = anatomy(ad, device="cpu").set_index("layer")
    assert frame.loc[0, "rank"] == 2
    _, sv = _dense_row(ad.modules[ModuleKey("model", 0, "q")])
    np.testing.assert_allclose(frame.loc[0, "singular_values"], sv, rtol=1e-9)
    assert frame.loc[1, "rank"] == 0 and frame.loc[1, "fro_norm"] == 0.0
    assert frame.loc[1, "singular_values"] == []
    assert math.isnan(frame.loc[1, "effective_rank"]) and math.isnan(frame.loc[1, "stable_rank"])


def test_rows_in_display_order_and_kind_filter():
    ad = random_adapter("a", layers=[2, 0, 1], kinds={"v": (8, 8), "q": (8, 8), "down": (8, 8)}, r=2, seed=0)
    frame = anatomy(ad, device="cpu")
    assert list(zip(frame.layer, frame.kind))[:3] == [(0, "q"), (0, "v"), (0, "down")]
    assert set(anatomy(ad, kind=["v"], device="cpu").kind) == {"v"}
    assert set(anatomy(ad, kind="down", device="cpu").kind) == {"down"}  # a single kind as a string
    keys = [ModuleKey("raw", -1, "zz"), ModuleKey("decoder", 0, "q"), ModuleKey("model", 1, "o"), ModuleKey("model", 1, "k")]
    assert ordered_keys(keys) == [keys[3], keys[2], keys[1], keys[0]]


def test_decompose_adapter_single_module_view_is_the_thin_svd():
    ad = random_adapter("a", layers=2, kinds={"q": (10, 7)}, r=3, seed=4)
    dec = decompose_adapter(ad, device="cpu")
    key = ModuleKey("model", 1, "q")
    svd = dec.get(key)
    torch.testing.assert_close(svd.dense(), ad.modules[key].dense(), rtol=1e-12, atol=1e-14)
    assert svd.rank == 3 and key in dec


def test_cli_anatomy_csv_and_json(tmp_path, capsys):
    import io
    import json

    import pandas as pd

    from geometry.cli import main
    from geometry.io.loader import load_adapter
    from tests.app_fixtures import write_adapter

    path = write_adapter(tmp_path / "ad", seed=3, layers=2)
    assert main(["anatomy", str(path)]) == 0
    frame = pd.read_csv(io.StringIO(capsys.readouterr().out))
    expected = anatomy(load_adapter(path))
    assert list(frame.columns) == list(ANATOMY_COLUMNS) and len(frame) == 4
    np.testing.assert_allclose(frame.fro_norm, expected.fro_norm, rtol=1e-12)
    assert json.loads(frame.singular_values[0]) == pytest.approx(expected.singular_values[0], rel=1e-12)
    assert main(["anatomy", str(path), "--format", "json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert records[0]["stable_rank"] == pytest.approx(expected.stable_rank[0])
    assert main(["anatomy", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.startswith("error:")
