"""The all-pairs Gram engine (geometry.linalg.gram): float32 Gram path within 1e-6 of float64 dense maths, promotions
to float64 where float32 would not be accurate, and the CUDA path equal to the CPU one."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from geometry.analysis.distances import FACTORS, METRICS, all_distances, dense_distance
from geometry.errors import AtlasError
from geometry.linalg.factored import EPS64, grassmann_from_angles, principal_angles
from geometry.linalg.gram import COND_FLOAT32, FLOAT32_MIN_ROWS, FactorSide, resolve_gram_dtype
from geometry.testing import random_adapter, random_factors
from geometry.types import ModuleKey

CPU = torch.device("cpu")
HAS_CUDA = torch.cuda.is_available()
cuda = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]


# ---------------------------------------------------------------------------------------------
# Dense float64 references, one SVD per adapter and module (cached)
def _basis(M: torch.Tensor) -> tuple[torch.Tensor, int]:
    U, S, _ = torch.linalg.svd(M, full_matrices=False)
    rank = int((S > max(M.shape) * EPS64 * S[0]).sum()) if S.numel() and S[0] > 0 else 0
    return U[:, :rank], rank


class Dense:
    """Dense matrices of every adapter's module ``key`` per factor, and their bases."""

    def __init__(self, adapters, key):
        self.mats = {}
        for i, ad in enumerate(adapters):
            mod = ad.modules[key]
            self.mats[i, "ba"] = mod.dense()
            self.mats[i, "b"] = mod.B.double()
            self.mats[i, "a"] = mod.A.double().T
        self.bases = {k: _basis(v) for k, v in self.mats.items()}

    def value(self, metric, factor, i, j, pad=False) -> float:
        x1, x2 = self.mats[i, factor], self.mats[j, factor]
        if metric != "grassmann":
            if x1.shape != x2.shape:
                return math.nan
            return dense_distance(x1, x2, metric)
        (U1, r1), (U2, r2) = self.bases[i, factor], self.bases[j, factor]
        if min(r1, r2) == 0:
            return math.nan
        theta, _ = principal_angles(U1, r1, U2, r2)
        return float(grassmann_from_angles(theta, r1, r2, pad))


def assert_close_to_dense(adapters, res, rel, abs_=0.0, only=None):
    """Every value of ``res`` (or those ``only(metric, factor, layer, i, j)`` selects) against the dense
    reference; returns the largest relative error seen."""
    worst = 0.0
    refs: dict[ModuleKey, Dense] = {}
    for (metric, factor, stack, kind), dt in res.items():
        for k, layer in enumerate(dt.layers):
            key = ModuleKey(stack, layer, kind)
            ref = refs.get(key) or refs.setdefault(key, Dense(adapters, key))
            for i in range(len(adapters)):
                for j in range(i + 1, len(adapters)):
                    if only is not None and not only(metric, factor, layer, i, j):
                        continue
                    want, got = ref.value(metric, factor, i, j, dt.pad), dt.values[i, j, k]
                    if math.isnan(want):
                        assert math.isnan(got), (metric, factor, kind, layer, i, j)
                        continue
                    assert got == pytest.approx(want, rel=rel, abs=abs_), (metric, factor, kind, layer, i, j)
                    if want:
                        worst = max(worst, abs(got - want) / abs(want))
    return worst


def _orth(d, k, gen):
    return torch.linalg.qr(torch.randn(d, k, generator=gen, dtype=torch.float64))[0]


def _mixing(r, cond, gen):
    """``r x r`` matrix with singular values from 1 down to ``1 / cond`` and random singular vectors."""
    U, V = _orth(r, r, gen), _orth(r, r, gen)
    return U @ torch.diag(torch.logspace(0, -math.log10(cond), r, dtype=torch.float64)) @ V.T


def _pair_at_angle(d, r, angle, cond, gen):
    """Two ``(d, r)`` factors whose column spaces make ``r`` principal angles ``angle``, of condition ``cond``."""
    Q = _orth(d, 2 * r, gen)
    Q1, Q2 = Q[:, :r], math.cos(angle) * Q[:, :r] + math.sin(angle) * Q[:, r:]
    return Q1 @ _mixing(r, cond, gen) / math.sqrt(d), Q2 @ _mixing(r, cond, gen) / math.sqrt(d)


def _set_factors(ad, key, B, A):
    mod = ad.modules[key]
    mod.B, mod.A = B.to(torch.float32), A.to(torch.float32)


# ---------------------------------------------------------------------------------------------
def test_auto_gram_dtype_rule_and_errors():
    f32, f64, bf16 = torch.float32, torch.float64, torch.bfloat16
    assert resolve_gram_dtype("auto", [f32, bf16], FLOAT32_MIN_ROWS, CPU) == f32
    assert resolve_gram_dtype("auto", [f32], FLOAT32_MIN_ROWS - 1, CPU) == f64  # short factors: float64 is free
    assert resolve_gram_dtype("auto", [f32, f64], 10**5, CPU) == f64  # float64 factors keep float64
    assert resolve_gram_dtype("float32", [f64], 8, CPU) == f32
    assert resolve_gram_dtype(torch.float64, [f32], 10**5, CPU) == f64
    with pytest.raises(AtlasError, match="gram_dtype 'float16'"):
        resolve_gram_dtype("float16", [f32], 8, CPU)
    ads = [random_adapter(f"a{i}", layers=1, kinds={"q": (8, 6)}, r=2, seed=i) for i in range(2)]
    with pytest.raises(AtlasError, match="gram_dtype"):
        all_distances(ads, device=CPU, gram_dtype="half")


def test_float32_gram_path_matches_dense_within_1e6_and_is_not_promoted():
    """Independent float32 adapters (the benchmark's regime), both sides long enough for 'auto'."""
    kinds = {"up": (1024, 1024)}
    ads = [random_adapter(f"ad{i}", layers=1, kinds=kinds, r=8, seed=300 + i) for i in range(3)]
    ads.append(random_adapter("r5", layers=1, kinds=kinds, r=5, seed=310))  # padding to rp = 8
    res = all_distances(ads, device=CPU)
    worst = assert_close_to_dense(ads, res, rel=1e-6)
    assert worst > 1e-12  # the float32 path was taken (float64 would agree to ~1e-14)
    key = ModuleKey("model", 0, "up")
    blocks = [[ad.modules[key].B] for ad in ads]
    side = FactorSide(blocks, 8, CPU, torch.float32, cross=True)
    side.joint(torch.tensor([0, 0, 1]), torch.tensor([1, 2, 3]))
    assert side.float32 and not bool(side.promoted.any())


@pytest.mark.parametrize("angle_deg,cond", [(46.0, 9.0), (80.0, 9.0), (46.0, 1.0)])
def test_float32_gram_at_the_edge_of_its_domain_stays_within_1e6(angle_deg, cond):
    """Angles just above 45 degrees and factors just under COND_FLOAT32: still the float32 path, still < 1e-6."""
    assert cond < COND_FLOAT32
    gen = torch.Generator().manual_seed(int(angle_deg * 10 + cond))
    kinds = {"q": (1280, 1024)}
    ads = [random_adapter(f"e{i}", layers=1, kinds=kinds, r=8, seed=320 + i) for i in range(2)]
    key = ModuleKey("model", 0, "q")
    B1, B2 = _pair_at_angle(1280, 8, math.radians(angle_deg), cond, gen)
    A1, A2 = _pair_at_angle(1024, 8, math.radians(angle_deg + 5), cond, gen)
    _set_factors(ads[0], key, B1, A1.T)
    _set_factors(ads[1], key, B2, A2.T)
    res = all_distances(ads, device=CPU)
    assert_close_to_dense(ads, res, rel=1e-6)
    side = FactorSide([[ad.modules[key].B] for ad in ads], 8, CPU, torch.float32, cross=True)
    side.joint(torch.tensor([0]), torch.tensor([1]))
    assert not bool(side.promoted.any())


@pytest.mark.slow
def test_float32_gram_promotes_close_subspaces_and_ill_conditioned_factors_to_float64():
    """Shared A (same LoRA init), nearly equal B, a condition-50 and a rank-deficient factor: float64 accuracy."""
    kinds = {"q": (1024, 768)}
    ads = [random_adapter(f"p{i}", layers=4, kinds=kinds, r=6, seed=330 + i) for i in range(3)]
    gen = torch.Generator().manual_seed(5)
    for layer in range(4):
        key = ModuleKey("model", layer, "q")
        base = ads[0].modules[key]
        if layer == 0:  # nearly overlapping: shared A, B + 1e-6 noise
            ads[1].modules[key].A = base.A.clone()
            ads[1].modules[key].B = base.B + 1e-6 * torch.randn(base.B.shape, generator=gen)
        elif layer == 1:  # condition 50: float64 Cholesky QR
            Q = _orth(1024, 6, gen)
            ads[2].modules[key].B = (Q @ _mixing(6, 50.0, gen) / 32).float()
        elif layer == 2:  # rank-deficient B: Householder
            ads[2].modules[key].B[:, 5] = ads[2].modules[key].B[:, 0]
    res = all_distances(ads, device=CPU, gram_dtype="float32")
    assert_close_to_dense(ads, res, rel=1e-6, abs_=1e-12)

    def promoted(metric, factor, layer, i, j):  # sides recomputed in float64 (pair (0, 1) at layer 0: both)
        return (layer == 0 and (i, j) == (0, 1)) or (layer in (1, 2) and j == 2 and factor == "b")

    assert_close_to_dense(ads, res, rel=1e-9, abs_=1e-12, only=promoted)
    g = res["grassmann", "a", "model", "q"].values[0, 1, 0]
    assert g < 1e-12  # identical A: ~1e-16, not the ~1e-4 float32 would give
    blocks = [[ad.modules[ModuleKey("model", layer, "q")].B for layer in range(4)] for ad in ads]
    side = FactorSide(blocks, 6, CPU, torch.float32, cross=True)
    assert side.promoted.tolist() == [False, True, True, False]  # conditioning, before any pair
    assert int(side.rank[2, 2]) == 5 and int(side.rank[2, 1]) == 6  # rank-deficient B found on its promoted layer
    side.joint(torch.tensor([0, 0, 1]), torch.tensor([1, 2, 2]))
    assert side.promoted.tolist() == [True, True, True, False]  # close pair at layer 0


def test_float32_self_distance_of_a_copy_is_float64_zero():
    kinds = {"q": (1024, 512)}
    ad = random_adapter("x", layers=2, kinds=kinds, r=8, seed=340)
    twin = random_adapter("x", layers=2, kinds=kinds, r=8, seed=340)
    twin.name = "twin"
    other = random_adapter("y", layers=2, kinds=kinds, r=8, seed=341)
    res = all_distances([ad, twin, other], device=CPU, gram_dtype="float32")
    for (metric, factor, _, _), dt in res.items():
        assert np.all(np.abs(dt.values[0, 1]) < 1e-12), (metric, factor, dt.values[0, 1])
        assert np.all(dt.values[0, 2] > 0.1), (metric, factor)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_float32_gram_of_half_precision_factors_matches_dense_of_the_rounded_values(dtype):
    kinds = {"v": (1024, 1024)}
    ads = [random_adapter(f"h{i}", layers=1, kinds=kinds, r=4, seed=350 + i, dtype=dtype) for i in range(3)]
    res = all_distances(ads, device=CPU)
    assert_close_to_dense(ads, res, rel=1e-6)


@pytest.mark.parametrize("gram_dtype", ["float32", "float64"])
def test_zero_modules_on_either_gram_path(gram_dtype):
    kinds = {"q": (1024, 512)}
    ads = [random_adapter(f"z{i}", layers=2, kinds=kinds, r=4, seed=360 + i) for i in range(3)]
    ads[0].modules[ModuleKey("model", 1, "q")].B.zero_()
    ads[1].modules[ModuleKey("model", 0, "q")].B[:, 1] = 0.0  # one zero column: rank 3, still Cholesky
    res = all_distances(ads, device=CPU, gram_dtype=gram_dtype)
    assert np.isnan(res["grassmann", "ba", "model", "q"].values[0, 1:, 1]).all()
    assert res["grassmann", "ba", "model", "q"].zero == {"z0": [1]}
    assert_close_to_dense(ads, res, rel=1e-6 if gram_dtype == "float32" else 1e-9)


def test_llama_sized_module_float32_equals_float64_within_1e6():
    """One gate-shaped (14336 x 4096, r = 16) layer of 4 adapters: float32 Gram errors at full length."""
    from geometry.types import Adapter, AdapterConfig, LoraModule, lora_scale

    ads = []
    for i in range(4):
        B, A = random_factors(14336, 4096, 16, seed=370 + i, dtype=torch.float32)
        key = ModuleKey("model", 0, "gate")
        mod = LoraModule("model.layers.0.mlp.gate_proj", key, A, B, 16, 32.0, lora_scale(16, 32.0))
        ads.append(Adapter(f"g{i}", AdapterConfig(r=16, lora_alpha=32.0), {key: mod}, content_hash=f"g{i}"))
    fast = all_distances(ads, device=CPU)
    exact = all_distances(ads, device=CPU, gram_dtype="float64")
    worst = 0.0
    for key, dt in fast.items():
        ref = exact[key].values
        np.testing.assert_allclose(dt.values, ref, rtol=1e-6, atol=0)
        off = ~np.eye(4, dtype=bool)
        worst = max(worst, float(np.max(np.abs(dt.values[off] - ref[off]) / np.abs(ref[off]))))
    assert worst > 1e-12  # float32 was used


# ---------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)
def _cuda_set():
    kinds = {"q": (1024, 768), "v": (24, 40)}
    ads = [random_adapter(f"c{i}", layers=3, kinds=kinds, r=6, seed=380 + i) for i in range(4)]
    key = ModuleKey("model", 0, "q")
    ads[1].modules[key].A = ads[0].modules[key].A.clone()  # close A subspaces: promoted, exact residual
    ads[2].modules[ModuleKey("model", 1, "v")].B.zero_()  # zero module
    ads[3].modules[ModuleKey("model", 2, "q")].B[:, 5] = ads[3].modules[ModuleKey("model", 2, "q")].B[:, 0]
    return ads


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("gram_dtype", ["float64", "auto"])
def test_cuda_distances_equal_cpu(gram_dtype):
    ads = _cuda_set()
    cpu = all_distances(ads, device="cpu", gram_dtype="float64")
    gpu = all_distances(ads, device="cuda", gram_dtype=gram_dtype)
    rel = 1e-9 if gram_dtype == "float64" else 1e-6
    for key, dt in gpu.items():
        ref = cpu[key].values
        assert np.array_equal(np.isnan(dt.values), np.isnan(ref)), key
        ok = ~np.isnan(ref)
        np.testing.assert_allclose(dt.values[ok], ref[ok], rtol=rel, atol=1e-12, err_msg=str(key))
        assert dt.zero == cpu[key].zero and dt.notes == cpu[key].notes


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_tf32_is_never_used_for_the_gram():
    ads = _cuda_set()
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        assert resolve_gram_dtype("auto", [torch.float32], 10**5, torch.device("cuda")) == torch.float64
        with pytest.raises(AtlasError, match="TF32"):
            resolve_gram_dtype("float32", [torch.float32], 10**5, torch.device("cuda"))
        gpu = all_distances(ads, device="cuda", metrics=METRICS, factors=FACTORS)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    cpu = all_distances(ads, device="cpu", gram_dtype="float64")
    for key, dt in gpu.items():
        ok = ~np.isnan(cpu[key].values)
        np.testing.assert_allclose(dt.values[ok], cpu[key].values[ok], rtol=1e-9, atol=1e-12)


def test_float32_layer_chunks_give_the_same_values():
    kinds = {"q": (1024, 640)}
    ads = [random_adapter(f"k{i}", layers=4, kinds=kinds, r=4, seed=390 + i) for i in range(3)]
    key = ModuleKey("model", 2, "q")
    ads[1].modules[key].A = ads[0].modules[key].A.clone()  # one promoted layer among float32 ones
    whole = all_distances(ads, device=CPU, gram_dtype="float32")
    chunked = all_distances(ads, device=CPU, gram_dtype="float32", layer_chunk=1)
    for k, dt in whole.items():
        np.testing.assert_allclose(chunked[k].values, dt.values, rtol=1e-12, atol=1e-15, err_msg=str(k))
