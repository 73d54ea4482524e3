"""Merge methods on adapters built from factors: exact formulas against dense computation."""

from __future__ import annotations

import math

import pytest
import torch
from peft.utils import merge_utils

from geometry.errors import IncompatibleAdaptersError
from geometry.merging import MERGE_METHODS, merge
from geometry.merging.elementwise import module_seed
from geometry.merging.multislerp import multislerp_tensors
from geometry.merging.truncate import factorize_dense, truncate_factored
from geometry.types import ModuleKey
from tests.synthetic import random_adapter

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
    m = merge(ads, "ties", weights=w, density=0.3, majority_sign_method=sign)
    for key, mod in m.modules.items():
        ref = merge_utils.ties(_stack(ads, key), torch.tensor(w), 0.3, sign)
        assert _rel(mod.dense().float(), ref) < 1e-6


def test_magnitude_prune_and_dare_match_peft_merge_utils():
    ads = _adapters()
    w = [1.0, 0.5, 0.8]
    m = merge(ads, "magnitude_prune", weights=w, density=0.4)
    for key, mod in m.modules.items():
        assert _rel(mod.dense().float(), merge_utils.magnitude_prune(_stack(ads, key), torch.tensor(w), 0.4)) < 1e-6
    for method, fn in (("dare_linear", merge_utils.dare_linear), ("dare_ties", merge_utils.dare_ties)):
        m = merge(ads, method, weights=w, density=0.6, seed=7)
        for key, mod in m.modules.items():
            torch.manual_seed(module_seed(7, key))  # peft draws its masks from the global generator
            ref = fn(_stack(ads, key), torch.tensor(w), 0.6)
            assert _rel(mod.dense().float(), ref) < 1e-6


def test_dare_seeded_and_unbiased_shape():
    ads = _adapters()
    a = merge(ads, "dare_linear", density=0.5, seed=1)
    b = merge(ads, "dare_linear", density=0.5, seed=1)
    c = merge(ads, "dare_linear", density=0.5, seed=2)
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
