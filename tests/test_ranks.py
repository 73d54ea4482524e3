"""Rank per module, compress and per-module compatibility (geometry/analysis/ranks.py) against dense
computations on random factors: non-square, different ranks, rank-deficient."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import geometry
from geometry.analysis.ranks import (
    compatibility,
    compress,
    energy_rank,
    hard_threshold_rank,
    knee_rank,
    rank_table,
)
from geometry.errors import InvalidArgumentError
from geometry.io.loader import load_adapter
from geometry.testing import random_adapter

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ad():
    a = random_adapter("a", layers=2, kinds={"q": (12, 7), "v": (5, 9)}, r={"q": 6, "v": 4}, seed=4)
    key = next(k for k in a.modules if k.kind == "q")
    mod = a.modules[key]
    mod.B[:, 3:] = mod.B[:, :3]  # rank-deficient: rank 3 of r = 6
    return a


def _dense(mod):
    return (mod.scale * (mod.B.double() @ mod.A.double())).numpy()


def test_rank_table_equals_dense_svd(ad):
    table = rank_table(ad, energy=0.8).set_index("module")
    for key, mod in ad.modules.items():
        S = np.linalg.svd(_dense(mod), compute_uv=False)
        S = S[S > S[0] * 1e-10]
        row = table.loc[key.label]
        cum = np.cumsum(S**2) / np.sum(S**2)
        assert row["numerical rank"] == len(S)
        assert row["rank for 80% energy"] == int(np.searchsorted(cum, 0.8 - 1e-12) + 1)
        assert row["rank for 99% energy"] == int(np.searchsorted(cum, 0.99 - 1e-12) + 1)
        x = np.arange(1, len(S) + 1) / len(S)
        assert row["knee"] == int(np.argmax(np.abs(cum - x)) + 1)
        beta = min(mod.shape) / max(mod.shape)
        omega = 0.56 * beta**3 - 0.95 * beta**2 + 1.82 * beta + 1.43
        assert row["hard threshold"] == int(np.sum(S > omega * np.median(S)))
        assert row["energy at knee"] == pytest.approx(cum[row["knee"] - 1], rel=1e-9)
    assert table.loc[next(k for k in ad.modules if k.kind == "q").label, "numerical rank"] == 3


def test_rank_helpers_edge_cases():
    zero = torch.zeros(4, dtype=torch.float64)
    assert energy_rank(zero, 0.9) == 0 and knee_rank(zero) == 0 and hard_threshold_rank(zero, (4, 4)) == 0
    one = torch.tensor([3.0, 0.0], dtype=torch.float64)
    assert energy_rank(one, 0.5) == 1 and knee_rank(one) == 1 and hard_threshold_rank(one, (4, 2)) == 1
    flat = torch.ones(4, dtype=torch.float64)
    assert energy_rank(flat, 1.0) == 4 and energy_rank(flat, 0.5) == 2


@pytest.mark.parametrize("how", [{"rank": 2}, {"energy": 0.75}, {"rank": 50}])
def test_compress_is_the_truncated_svd(ad, how, tmp_path):
    small = compress(ad, **how)
    for key, mod in ad.modules.items():
        U, S, Vt = np.linalg.svd(_dense(mod), full_matrices=False)
        S_nz = S[S > S[0] * 1e-10]
        if "rank" in how:
            k = min(how["rank"], len(S_nz))
        else:
            k = int(np.searchsorted(np.cumsum(S_nz**2) / np.sum(S_nz**2), how["energy"] - 1e-12) + 1)
        got = small.modules[key]
        assert got.B.shape[1] == k
        best = (U[:, :k] * S[:k]) @ Vt[:k]
        np.testing.assert_allclose((got.B.double() @ got.A.double()).numpy(), best, atol=1e-5)
        assert got.energy_kept == pytest.approx(np.sum(S[:k] ** 2) / np.sum(S**2), rel=1e-6)
    folder = small.to_peft_folder(tmp_path / "small")
    back = load_adapter(folder)
    for key, mod in small.modules.items():
        np.testing.assert_allclose(_dense(back.modules[key]), (mod.B.double() @ mod.A.double()).numpy(), atol=1e-5)
    assert not (folder / "recipe.yaml").exists()  # not a merge: nothing to replay
    assert "Compressed LoRA adapter" in (folder / "README.md").read_text()


def test_compress_arguments():
    a = random_adapter("x", layers=1)
    for bad in ({}, {"rank": 2, "energy": 0.5}, {"rank": 0}, {"energy": 0.0}, {"energy": 1.2}):
        with pytest.raises(InvalidArgumentError):
            geometry.compress(a, **bad)


def test_compatibility_equals_dense_principal_angles():
    ads = [random_adapter(n, layers=2, kinds={"q": (10, 8)}, r=r, seed=s) for n, r, s in (("a", 2, 1), ("b", 3, 2),
                                                                                              ("c", 4, 3))]
    frame = compatibility(ads).set_index("module")
    for key in ads[0].modules:
        bases = []
        norms = []
        for a in ads:
            M = _dense(a.modules[key])
            U, S, Vt = np.linalg.svd(M, full_matrices=False)
            k = int(np.sum(S > S[0] * 1e-10))
            bases.append((U[:, :k], Vt[:k].T, k))
            norms.append(np.linalg.norm(M))
        overlaps = []
        for i in range(3):
            for j in range(i + 1, 3):
                (Ui, Vi, ki), (Uj, Vj, kj) = bases[i], bases[j]
                overlaps.append((np.sum((Ui.T @ Uj) ** 2) + np.sum((Vi.T @ Vj) ** 2)) / (2 * min(ki, kj)))
        row = frame.loc[key.label]
        assert row["overlap"] == pytest.approx(np.mean(overlaps), rel=1e-9)
        shares = np.array(norms) / np.sum(norms)
        assert row["dominant"] == "abc"[int(np.argmax(shares))]
        assert row["dominant share"] == pytest.approx(shares.max(), rel=1e-9)
        assert [row[f"share:{n}"] for n in "abc"] == pytest.approx(shares.tolist(), rel=1e-9)
    with pytest.raises(InvalidArgumentError):
        compatibility(ads[:1])


def test_cli_compress(tmp_path):
    run = [sys.executable, "-m", "geometry", "compress", str(ROOT / "sample_adapters" / "real" / "sst2")]
    out = subprocess.run(run, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0].startswith("adapter,module,stack,layer,kind,shape,r,numerical rank,rank for 90%")
    out = subprocess.run([*run, "--energy", "0.9", "--out", str(tmp_path / "c")], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert "energy kept" in out.stderr and (tmp_path / "c" / "adapter_model.safetensors").is_file()
    assert "kept rank,energy kept" in out.stdout.splitlines()[0]
    bad = subprocess.run([*run, "--rank", "2"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "give --out DIR" in bad.stderr and "Traceback" not in bad.stderr
