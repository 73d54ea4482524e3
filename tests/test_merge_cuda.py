"""Merges on CUDA equal the CPU ones (factored and element-wise), stored on the CPU; skipped without a GPU.

DARE masks come from a generator on the merge device, so CUDA and CPU masks differ for one seed:
there the test checks reproducibility on CUDA and the statistics, not equality with the CPU.
"""

from __future__ import annotations

import pytest
import torch

from geometry.merging import MERGE_METHODS, merge
from geometry.testing import random_adapter

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

KINDS = {"q": (64, 48), "v": (32, 48)}


def _adapters():
    return [random_adapter(f"c{i}", layers=2, kinds=KINDS, r=r, seed=40 + i, dtype=torch.float32)
            for i, r in enumerate((4, 4, 4))]


def _rel(x, y):
    return float((x - y).norm() / max(float(y.norm()), 1e-30))


@pytest.mark.parametrize("method", sorted(set(MERGE_METHODS) - {"dare_linear", "dare_ties"}))
def test_cuda_merge_equals_cpu(method):
    ads = _adapters()
    kw = {"density": 0.3} if method in ("ties", "magnitude_prune") else {}
    for keep_dense in ((False, True) if method not in ("task_arithmetic", "lora_average") else (None,)):
        extra = {} if keep_dense is None else {"keep_dense": keep_dense}
        cpu = merge(ads, method, device="cpu", dtype=torch.float64, **kw, **extra)
        gpu = merge(ads, method, device="cuda", dtype=torch.float64, **kw, **extra)
        for key, mod in gpu.modules.items():
            tensors = [mod.delta] if mod.delta is not None else [mod.B, mod.A]
            assert all(t.device.type == "cpu" for t in tensors)
            assert _rel(mod.dense(), cpu.modules[key].dense()) < 1e-9, (method, key)
            assert mod.energy_kept == pytest.approx(cpu.modules[key].energy_kept, rel=1e-9)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_cuda_dare_is_seeded_and_recorded(method):
    ads = _adapters()
    a = merge(ads, method, density=0.5, seed=4, device="cuda", keep_dense=True)
    b = merge(ads, method, density=0.5, seed=4, device="cuda", keep_dense=True)
    c = merge(ads, method, density=0.5, seed=4, device="cpu", keep_dense=True)
    assert a.params["mask_device"] == "cuda" and c.params["mask_device"] == "cpu"
    assert a.content_hash != c.content_hash  # CPU and CUDA masks differ: never share a cache entry
    for key, mod in a.modules.items():
        assert mod.delta.device.type == "cpu" and torch.equal(mod.delta, b.modules[key].delta)
    full = merge(ads, method, density=1.0, device="cuda", keep_dense=True, dtype=torch.float64)
    ref = merge(ads, method, density=1.0, device="cpu", keep_dense=True, dtype=torch.float64)
    for key, mod in full.modules.items():  # no drop: the same on both devices
        assert _rel(mod.delta, ref.modules[key].delta) < 1e-9


def test_cuda_randomized_factorization_equals_cpu():
    from geometry.merging.truncate import factorize_dense

    gen = torch.Generator().manual_seed(0)
    d = torch.randn(600, 500, generator=gen, dtype=torch.float64)
    b1, a1, e1 = factorize_dense(d, 20, exact_max=100, seed=2)
    b2, a2, e2 = factorize_dense(d.cuda(), 20, exact_max=100, seed=2)
    assert _rel((b2 @ a2).cpu(), b1 @ a1) < 1e-8 and e1 == pytest.approx(e2, rel=1e-10)
