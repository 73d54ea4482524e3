"""Spectral inclusion and anatomy on CUDA equal the CPU results; skipped without a GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from geometry.analysis.anatomy import anatomy
from geometry.analysis.inclusion import inclusion, inclusion_matrix, inclusion_tables
from geometry.testing import random_adapter

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

KINDS = {"q": (96, 64), "v": (48, 64)}


def _adapters():
    return [random_adapter(f"g{i}", layers=3, kinds=KINDS, r={"q": 4 + i, "v": 3}, seed=60 + i) for i in range(3)]


@pytest.mark.parametrize("lam", [0.0, 0.05])
def test_inclusion_on_cuda_equals_cpu(lam):
    a, b, c = _adapters()
    cpu = inclusion(a, b, lam=lam, device="cpu")
    gpu = inclusion(a, b, lam=lam, device="cuda")
    for col in ("rec", "l1", "l2", "h1", "h2"):
        np.testing.assert_allclose(gpu[col].to_numpy(float), cpu[col].to_numpy(float), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(inclusion_matrix([a, b, c], metric="rec", device="cuda"),
                               inclusion_matrix([a, b, c], metric="rec", device="cpu"), rtol=1e-9, atol=1e-12)
    tables = inclusion_tables([a, b, c], lam=lam, device="cuda")
    np.testing.assert_allclose(tables[0, 1]["rec"].to_numpy(float), cpu["rec"].to_numpy(float), rtol=1e-9)


def test_anatomy_on_cuda_equals_cpu():
    a = _adapters()[0]
    cpu, gpu = anatomy(a, device="cpu"), anatomy(a, device="cuda")
    np.testing.assert_allclose(gpu["fro_norm"].to_numpy(float), cpu["fro_norm"].to_numpy(float), rtol=1e-10)
    np.testing.assert_allclose(gpu["stable_rank"].to_numpy(float), cpu["stable_rank"].to_numpy(float), rtol=1e-9)
