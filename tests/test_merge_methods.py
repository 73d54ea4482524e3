"""Merge methods on adapters built from factors: exact formulas against dense computation."""

from __future__ import annotations

import math

import pytest
import torch
from peft.utils import merge_utils

from geometry.errors import IncompatibleAdaptersError
from geometry.merging import MERGE_METHODS, METHOD_PARAMS, merge
from geometry.merging.elementwise import module_seed
from geometry.merging.multislerp import multislerp_tensors
from geometry.merging.truncate import factorize_dense, truncate_factored
from geometry.testing import random_adapter
from geometry.types import ModuleKey

KINDS = {"q": (20, 12), "v": (16, 12)}


def _adapters(ranks=(4, 3, 5), alphas=(8.0, 3.0, 20.0), layers=3):
    return [
        random_adapter(f"t{i}", layers=layers, kinds=KINDS, r=r, alpha=a, seed=10 + i, dtype=torch.float64)
        for i, (r, a) in enumerate(zip(ranks, alphas))
    ]


def _rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x - y).norm() / max(float(y.norm()), 1e-30))


def test_task_arithmetic_exact_rank_sum_different_ranks_and_scales():
    ads = _adapters()
    w = [0.5, -1.0, 2.0]
    m = merge(ads, "task_arithmetic", weights=w, dtype=torch.float64)
    for key, mod in m.modules.items():
        ref = sum(wt * ad.modules[key].dense() for wt, ad in zip(w, ads))
        assert mod.factored and mod.rank == 4 + 3 + 5
        assert _rel(mod.dense(), ref) < 1e-12
    assert m.energy_kept == 1.0


def test_task_arithmetic_truncated_is_best_rank_r_with_energy():
    ads = _adapters()
    m = merge(ads, "task_arithmetic", rank=3, dtype=torch.float64)
    for key, mod in m.modules.items():
        ref = sum(ad.modules[key].dense() for ad in ads)
        U, S, Vh = torch.linalg.svd(ref)
        best = (U[:, :3] * S[:3]) @ Vh[:3]
        assert mod.rank == 3
        assert _rel(mod.dense(), best) < 1e-10
        assert mod.energy_kept == pytest.approx(float((S[:3] ** 2).sum() / (S**2).sum()), rel=1e-10)
    assert 0.0 < m.energy_kept < 1.0


def test_truncate_factored_and_dense_agree():
    gen = torch.Generator().manual_seed(0)
    B, A = torch.randn(30, 6, generator=gen, dtype=torch.float64), torch.randn(6, 25, generator=gen, dtype=torch.float64)
    b1, a1, e1 = truncate_factored(B, A, 4, scale=0.7)
    b2, a2, e2 = factorize_dense(0.7 * B @ A, 4)
    assert _rel(b1 @ a1, b2 @ a2) < 1e-10 and e1 == pytest.approx(e2, rel=1e-12)
    b3, a3, e3 = truncate_factored(B, A)  # numerical rank: exact
    assert a3.shape[0] == 6 and e3 == 1.0 and _rel(b3 @ a3, B @ A) < 1e-12


def test_lora_average_is_the_factor_average_with_cross_terms():
    ads = _adapters(ranks=(4, 4), alphas=(8.0, 16.0))
    m = merge(ads, "lora_average", dtype=torch.float64)
    for key, mod in m.modules.items():
        m1, m2 = ads[0].modules[key], ads[1].modules[key]
        s1, s2 = m1.scale, m2.scale
        A = (math.sqrt(s1) * m1.A + math.sqrt(s2) * m2.A) / 2
        B = (math.sqrt(s1) * m1.B + math.sqrt(s2) * m2.B) / 2
        assert _rel(mod.dense(), B @ A) < 1e-12
        cross = math.sqrt(s1 * s2) * (m1.B @ m2.A + m2.B @ m1.A) / 4
        assert _rel(mod.dense(), (m1.dense() + m2.dense()) / 4 + cross) < 1e-12
    single = merge(ads[:1], "lora_average", weights=[1.0], dtype=torch.float64)
    for key, mod in single.modules.items():
        assert _rel(mod.dense(), ads[0].modules[key].dense()) < 1e-12


def test_lora_average_unequal_ranks_names_modules_and_ranks():
    ads = _adapters(ranks=(4, 3), alphas=(8.0, 8.0))
    with pytest.raises(IncompatibleAdaptersError, match=r"model\.0\.q: t0 r=4, t1 r=3"):
        merge(ads, "lora_average")


def test_different_bases_and_shapes_rejected():
    a = random_adapter("a", kinds=KINDS, base="org/base-1")
    b = random_adapter("b", kinds=KINDS, base="org/base-2")
    with pytest.raises(IncompatibleAdaptersError, match="different base models"):
        merge([a, b], "task_arithmetic")
    c = random_adapter("c", kinds={"q": (24, 12), "v": (16, 12)})
    with pytest.raises(IncompatibleAdaptersError, match=r"module model\.0\.q: .* shape"):
        merge([random_adapter("a2", kinds=KINDS), c], "ties")


def test_layer_level_weights():
    ads = _adapters(ranks=(4, 3), alphas=(8.0, 3.0))
    w = [[1.0, 0.0, 2.0], {0: 0.5, "default": -1.0}]
    m = merge(ads, "task_arithmetic", weights=w, dtype=torch.float64)
    for key, mod in m.modules.items():
        w0 = w[0][key.layer]
        w1 = 0.5 if key.layer == 0 else -1.0
        ref = w0 * ads[0].modules[key].dense() + w1 * ads[1].modules[key].dense()
        assert _rel(mod.dense(), ref) < 1e-12
    with pytest.raises(ValueError, match="one per adapter"):
        merge(ads, "task_arithmetic", weights=[1.0])


def _stack(ads, key):
    return [ad.modules[key].dense().float() for ad in ads]


@pytest.mark.parametrize("sign", ["total", "frequency"])
def test_ties_matches_peft_merge_utils(sign):
    ads = _adapters()
    w = [1.0, 0.5, 0.8]
    m = merge(ads, "ties", weights=w, density=0.3, majority_sign_method=sign, keep_dense=True)
    for key, mod in m.modules.items():
        ref = merge_utils.ties(_stack(ads, key), torch.tensor(w), 0.3, sign)
        assert _rel(mod.dense().float(), ref) < 1e-6


def test_magnitude_prune_and_dare_match_peft_merge_utils():
    ads = _adapters()
    w = [1.0, 0.5, 0.8]
    m = merge(ads, "magnitude_prune", weights=w, density=0.4, keep_dense=True)
    for key, mod in m.modules.items():
        assert _rel(mod.dense().float(), merge_utils.magnitude_prune(_stack(ads, key), torch.tensor(w), 0.4)) < 1e-6
    for method, fn in (("dare_linear", merge_utils.dare_linear), ("dare_ties", merge_utils.dare_ties)):
        m = merge(ads, method, weights=w, density=0.6, seed=7, keep_dense=True, device="cpu")
        for key, mod in m.modules.items():
            torch.manual_seed(module_seed(7, key))  # peft draws its masks from the global (CPU) generator
            ref = fn(_stack(ads, key), torch.tensor(w), 0.6)
            assert _rel(mod.dense().float(), ref) < 1e-6


def test_dare_seeded_and_unbiased_shape():
    ads = _adapters()
    a = merge(ads, "dare_linear", density=0.5, seed=1, keep_dense=True)
    b = merge(ads, "dare_linear", density=0.5, seed=1, keep_dense=True)
    c = merge(ads, "dare_linear", density=0.5, seed=2, keep_dense=True)
    key = ModuleKey("model", 0, "q")
    assert torch.equal(a.modules[key].delta, b.modules[key].delta)
    assert not torch.equal(a.modules[key].delta, c.modules[key].delta)
    full = merge(ads, "dare_linear", density=1.0)
    ta = merge(ads, "task_arithmetic", dtype=torch.float64)
    assert _rel(full.modules[key].dense(), ta.modules[key].dense()) < 1e-6


def test_multislerp_geometry():
    x = torch.zeros(2, 3, 4, dtype=torch.float64)
    x[0, 0, 0] = 2.0
    x[1, 1, 1] = 4.0  # orthogonal, norms 2 and 4
    mid = multislerp_tensors(x, torch.tensor([0.5, 0.5], dtype=torch.float64))
    # spherical midpoint of two orthogonal unit vectors, times the mean norm 3
    assert mid[0, 0].item() == pytest.approx(3 / math.sqrt(2), rel=1e-6)
    assert mid[1, 1].item() == pytest.approx(3 / math.sqrt(2), rel=1e-6)
    assert float(mid.norm()) == pytest.approx(3.0, rel=1e-6)
    # weights are normalised; T = 1 returns the input
    assert torch.allclose(multislerp_tensors(x, torch.tensor([2.0, 2.0], dtype=torch.float64)), mid)
    assert torch.equal(multislerp_tensors(x[:1], torch.tensor([1.0])), x[0])
    # antipodal pair: linear fallback; three balanced antipodes: error
    y = torch.stack([x[0], -x[0]])
    assert float(multislerp_tensors(y, torch.tensor([0.5, 0.5], dtype=torch.float64)).abs().max()) == 0.0
    z = torch.stack([x[0], -x[0], x[0] * 0 + x[0], -x[0]])
    with pytest.raises(ValueError, match="antipodal"):
        multislerp_tensors(z, torch.ones(4, dtype=torch.float64))


def test_multislerp_on_adapters_keeps_direction_of_identical_tasks():
    ad = _adapters()[0]
    m = merge([ad, ad], "multislerp")
    for key, mod in m.modules.items():
        assert _rel(mod.dense(), ad.modules[key].dense()) < 1e-6


@pytest.mark.parametrize("method", sorted(MERGE_METHODS))
def test_every_method_rank_option_and_unknown_params(method):
    ads = _adapters(ranks=(4, 4, 4), alphas=(8.0, 4.0, 8.0), layers=2)
    if method != "lora_average":
        m = merge(ads, method, rank=2)
        assert all(mod.rank == 2 and 0 < mod.energy_kept <= 1.0 for mod in m.modules.values())
    with pytest.raises(ValueError, match="does not take"):
        merge(ads, method, bogus=1)


def test_unknown_method_and_bad_density():
    ads = _adapters(layers=1)
    with pytest.raises(ValueError, match="unknown merge method 'avg'"):
        merge(ads, "avg")
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
        merge(ads, "ties", density=0.0)


def test_dora_and_empty_inputs_rejected():
    ad = random_adapter("d", kinds=KINDS)
    ad.config.use_dora = True
    with pytest.raises(IncompatibleAdaptersError, match="d: DoRA adapter"):
        merge([ad, random_adapter("e", kinds=KINDS)], "task_arithmetic")
    with pytest.raises(IncompatibleAdaptersError, match="give at least one adapter"):
        merge([], "ties")


# ------------------------------------------------------------ dense merges: rank, energy, memory
DENSE_METHODS = ["ties", "dare_linear", "dare_ties", "multislerp", "magnitude_prune"]
WIDE = {"q": (40, 36), "v": (32, 36)}  # sum of ranks 4 + 3 + 5 = 12 < min(m, n): truncation bites


def _wide(layers=2):
    return [
        random_adapter(f"w{i}", layers=layers, kinds=WIDE, r=r, alpha=a, seed=30 + i, dtype=torch.float64)
        for i, (r, a) in enumerate(zip((4, 3, 5), (8.0, 3.0, 20.0)))
    ]


@pytest.mark.parametrize("method", DENSE_METHODS)
def test_dense_merge_defaults_to_the_sum_of_input_ranks_with_energy(method):
    ads = _wide()
    merged = merge(ads, method, seed=3) if "seed" in METHOD_PARAMS[method] else merge(ads, method)
    kw = {"seed": 3} if "seed" in METHOD_PARAMS[method] else {}
    dense = merge(ads, method, keep_dense=True, dtype=torch.float64, **kw)
    assert merged.params["keep_dense"] is False and merged.rank_rule == "sum of the input ranks"
    kept = total = 0.0
    for key, mod in merged.modules.items():
        assert mod.factored and mod.delta is None and mod.rank_sum == 12
        assert mod.B.shape == (mod.shape[0], 12) and mod.A.shape == (12, mod.shape[1])
        d = dense.modules[key].delta
        U, S, Vh = torch.linalg.svd(d)
        best = (U[:, :12] * S[:12]) @ Vh[:12]
        assert _rel(mod.dense(), best) < 1e-5  # float32 storage
        assert mod.energy_kept == pytest.approx(float((S[:12] ** 2).sum() / (S**2).sum()), rel=1e-9)
        kept, total = kept + float((S[:12] ** 2).sum()), total + float((S**2).sum())
    assert merged.energy_kept == pytest.approx(kept / total, rel=1e-5)
    summary = merged.summary()
    assert summary["n_dense"] == 0 and summary["max_rank"] == 12
    assert summary["rank_rule"] == "sum of the input ranks"
    assert summary["energy_kept"] == pytest.approx(kept / total, rel=1e-5)
    assert set(summary["energy_kept_by_module"]) == {k.label for k in merged.modules}
    assert summary["energy_kept_min"] == min(summary["energy_kept_by_module"].values())
    if method == "multislerp":  # a combination of the task vectors: rank <= sum of ranks, nothing lost
        assert summary["energy_kept_min"] == pytest.approx(1.0, abs=1e-12)
    else:
        assert summary["energy_kept_min"] < 1.0 and summary["n_truncated"] == len(merged.modules)


def test_factored_merges_keep_all_energy_in_summary():
    ads = _wide()
    for method in ("task_arithmetic", "lora_average"):
        summary = merge(ads if method == "task_arithmetic" else [ads[0], ads[0]], method).summary()
        assert summary["energy_kept"] == 1.0 and summary["energy_kept_min"] == 1.0
        assert summary["n_truncated"] == 0
    assert merge(ads, "task_arithmetic").summary()["max_rank"] == 12


def test_dense_merge_holds_one_dense_module_at_a_time(monkeypatch):
    """Each module's (m, n) update is factored and freed before the next module is computed."""
    import weakref

    import geometry.merging.elementwise as elementwise

    seen: list[weakref.ref] = []
    real = elementwise.factorize_dense

    def spy(delta, *args, **kwargs):
        assert all(ref() is None for ref in seen), "an earlier module's dense update is still alive"
        seen.append(weakref.ref(delta))
        return real(delta, *args, **kwargs)

    monkeypatch.setattr(elementwise, "factorize_dense", spy)
    ads = _wide(layers=3)
    merged = merge(ads, "ties", density=0.3)
    assert len(seen) == len(merged.modules) == 6
    assert all(ref() is None for ref in seen)
    for mod in merged.modules.values():  # no m x n tensor is held: only the thin factors
        assert mod.delta is None and mod.B.device.type == "cpu" and mod.A.device.type == "cpu"
        assert mod.B.numel() + mod.A.numel() < mod.shape[0] * mod.shape[1]


def test_factorize_dense_randomized_energy_is_exact():
    gen = torch.Generator().manual_seed(5)
    U, _ = torch.linalg.qr(torch.randn(300, 200, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(200, 200, generator=gen, dtype=torch.float64))
    S = 0.8 ** torch.arange(200, dtype=torch.float64)
    d = (U * S) @ V.T
    B, A, kept = factorize_dense(d, 10, exact_max=50, seed=1)  # randomized path
    assert B.shape == (300, 10) and A.shape == (10, 200)
    total = float(d.pow(2).sum())
    # B A is an orthogonal projection of d: the reported energy is exactly what it keeps
    assert float((d - B @ A).pow(2).sum()) == pytest.approx((1 - kept) * total, rel=1e-8)
    best = float((S[:10] ** 2).sum()) / total
    assert best * (1 - 1e-6) <= kept <= best * (1 + 1e-12)
    B2, A2, kept2 = factorize_dense(d, 10, exact_max=50, seed=1)
    assert torch.equal(B, B2) and torch.equal(A, A2) and kept == kept2
    Be, Ae, kept_exact = factorize_dense(d, 10)  # 200 <= EXACT_SVD_MAX: full SVD
    assert kept_exact == pytest.approx(best, rel=1e-12)


def test_merge_device_parameter_and_cpu_storage(monkeypatch):
    ads = _wide(layers=1)
    monkeypatch.setenv("ADAPTER_ATLAS_DEVICE", "cpu")
    for method in sorted(MERGE_METHODS):
        inputs = [ads[0], ads[0]] if method == "lora_average" else ads
        merged = merge(inputs, method, device="cpu")
        for mod in merged.modules.values():
            tensors = [mod.delta] if mod.delta is not None else [mod.B, mod.A]
            assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
    assert merge(ads, "dare_ties", seed=1).params["mask_device"] == "cpu"
    with pytest.raises(ValueError, match="does not take keep_dense"):
        merge(ads, "task_arithmetic", keep_dense=True)
