"""Factored distances equal dense ones; invariances; labelled reductions; alignment errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from geometry.analysis.distances import (
    FACTORS,
    METRICS,
    DistanceTensor,
    all_distances,
    dense_distance,
    pairwise_distances,
    select_layers,
)
from geometry.errors import AtlasError, IncompatibleAdaptersError
from geometry.linalg.align import check_compatible, common_keys, missing_keys
from geometry.testing import random_adapter, random_factors
from geometry.types import ModuleKey

CPU = torch.device("cpu")
KINDS = {"q": (20, 14), "v": (9, 14), "down": (14, 26)}


def dense_reference(ad1, ad2, key, metric, factor, pad=False):
    m1, m2 = ad1.modules[key], ad2.modules[key]
    if factor == "ba":
        x1, x2 = m1.dense(), m2.dense()
    elif factor == "b":
        x1, x2 = m1.B.double(), m2.B.double()
    else:
        x1, x2 = m1.A.double().T, m2.A.double().T
    if metric != "grassmann" and factor != "ba" and x1.shape != x2.shape:
        return math.nan
    return dense_distance(x1, x2, metric, pad=pad)


def assert_matches_dense(adapters, pad=False, **kw):
    res = all_distances(adapters, device=CPU, pad=pad, **kw)
    assert res, "no distance computed"
    for (metric, factor, stack, kind), dt in res.items():
        for i, a in enumerate(adapters):
            for j, b in enumerate(adapters):
                if i == j:
                    continue
                for k, layer in enumerate(dt.layers):
                    ref = dense_reference(a, b, ModuleKey(stack, layer, kind), metric, factor, pad)
                    got = dt.values[i, j, k]
                    if math.isnan(ref):
                        assert math.isnan(got), (metric, factor, kind, i, j, layer)
                    else:
                        assert got == pytest.approx(ref, rel=1e-9, abs=1e-10), (metric, factor, kind, i, j, layer)
    return res


def test_all_metrics_and_factors_match_dense_square_and_rectangular():
    ads = [random_adapter(f"ad{i}", layers=3, kinds=KINDS, r=4, seed=i) for i in range(3)]
    res = assert_matches_dense(ads)
    assert {(m, f) for m, f, _, _ in res} == {(m, f) for m in METRICS for f in FACTORS}
    assert {k for *_, k in res} == set(KINDS)


@pytest.mark.parametrize("pad", [False, True])
def test_different_ranks_match_dense_and_entrywise_factor_metrics_are_nan(pad):
    ads = [
        random_adapter("r3", layers=2, kinds=KINDS, r=3, seed=1),
        random_adapter("r6", layers=2, kinds=KINDS, r=6, seed=2),
        random_adapter("mixed", layers=2, kinds=KINDS, r={"q": 2, "v": 5, "down": 3}, seed=3),
    ]
    res = assert_matches_dense(ads, pad=pad)
    assert np.isnan(res["l2", "b", "model", "q"].values[0, 1]).all()
    assert np.isfinite(res["l2", "b", "model", "down"].values[0, 2]).all()  # both r = 3
    assert any("different ranks" in n for n in res["cosine", "a", "model", "q"].notes)


def test_rank_deficient_factors_match_dense():
    ads = [random_adapter(f"ad{i}", layers=2, kinds=KINDS, r=5, seed=10 + i) for i in range(3)]
    for mod in ads[0].modules.values():  # exact rank deficiency in B
        mod.B[:, 3:] = mod.B[:, :2]
    for mod in ads[1].modules.values():  # and in A
        mod.A[4] = 0.0
    assert_matches_dense(ads)


def test_mixed_conditioning_across_layers_matches_dense():
    """Layer 0 rank-deficient, layer 1 ill-conditioned (Householder path), layer 2 well-conditioned (Cholesky)."""
    ads = [random_adapter(f"ad{i}", layers=3, kinds=KINDS, r=4, seed=90 + i) for i in range(3)]
    for kind in KINDS:
        mod0 = ads[0].modules[ModuleKey("model", 0, kind)]
        mod0.B[:, 3] = mod0.B[:, 1]
        mod1 = ads[1].modules[ModuleKey("model", 1, kind)]
        mod1.B = mod1.B.double()
        mod1.B[:, 2] = mod1.B[:, 0] + 1e-6 * mod1.B[:, 2]
        mod2 = ads[2].modules[ModuleKey("model", 1, kind)]
        mod2.A = mod2.A.double()
        mod2.A[0] *= 1e4
    assert_matches_dense(ads)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_factors_match_dense_of_the_same_rounded_values(dtype):
    ads = [random_adapter(f"ad{i}", layers=2, kinds=KINDS, r=4, seed=20 + i, dtype=dtype) for i in range(2)]
    assert ads[0].modules[ModuleKey("model", 0, "q")].B.dtype == dtype
    assert_matches_dense(ads)


def test_nearly_overlapping_subspaces_use_the_exact_path_and_match_dense():
    """Shared A (same LoRA init) and nearly equal B: tiny angles and a small L2, no cancellation."""
    base = random_adapter("base", layers=2, kinds=KINDS, r=4, seed=30)
    near = random_adapter("near", layers=2, kinds=KINDS, r=4, seed=31)
    for key, mod in near.modules.items():
        ref = base.modules[key]
        mod.A = ref.A.clone()
        mod.B = ref.B.double() + 1e-7 * mod.B.double()
        ref.B = ref.B.double()
    res = assert_matches_dense([base, near])
    for key in common_keys([base, near], kind="q"):
        d = base.modules[key].dense() - near.modules[key].dense()
        exact = float(torch.linalg.matrix_norm(d))
        got = res["l2", "ba", "model", "q"].values[0, 1, key.layer]
        assert got == pytest.approx(exact, rel=1e-6)
    assert res["grassmann", "a", "model", "q"].values[0, 1].max() < 1e-7


def test_self_distance_is_zero_for_a_copy_under_another_name():
    ad = random_adapter("x", layers=3, kinds=KINDS, r=4, seed=40)
    twin = random_adapter("x", layers=3, kinds=KINDS, r=4, seed=40)
    twin.name = "twin"
    res = all_distances([ad, twin], device=CPU)
    for (metric, factor, _, _), dt in res.items():
        assert np.all(np.abs(dt.values[0, 1]) < 1e-7), (metric, factor, dt.values[0, 1])


def test_grassmann_of_ba_equals_grassmann_of_b_for_full_row_rank_a():
    ads = [random_adapter(f"ad{i}", layers=3, kinds=KINDS, r=4, seed=50 + i) for i in range(3)]
    res = all_distances(ads, metrics=["grassmann"], device=CPU)
    for kind in KINDS:
        np.testing.assert_allclose(
            res["grassmann", "ba", "model", kind].values, res["grassmann", "b", "model", kind].values, atol=1e-12
        )


def test_cosine_and_grassmann_are_scale_invariant_l2_is_not():
    ads = [random_adapter(f"ad{i}", layers=2, kinds=KINDS, r=4, seed=60 + i) for i in range(2)]
    before = all_distances(ads, factors=["ba"], device=CPU)
    for mod in ads[1].modules.values():
        mod.scale *= 7.5
        mod.B = mod.B * 3.0
    after = all_distances(ads, factors=["ba"], device=CPU)
    for metric in ("cosine", "grassmann"):
        np.testing.assert_allclose(after[metric, "ba", "model", "q"].values, before[metric, "ba", "model", "q"].values, atol=1e-12)
    assert not np.allclose(after["l2", "ba", "model", "q"].values, before["l2", "ba", "model", "q"].values)


def test_cosine_is_sign_sensitive_grassmann_is_not():
    ad = random_adapter("x", layers=1, kinds={"q": (10, 8)}, r=3, seed=70)
    neg = random_adapter("x", layers=1, kinds={"q": (10, 8)}, r=3, seed=70)
    neg.name = "neg"
    for mod in neg.modules.values():
        mod.scale = -mod.scale
    res = all_distances([ad, neg], factors=["ba"], device=CPU)
    assert res["cosine", "ba", "model", "q"].values[0, 1, 0] == pytest.approx(2.0)
    assert res["grassmann", "ba", "model", "q"].values[0, 1, 0] < 1e-7


def test_layer_chunks_give_the_same_values():
    ads = [random_adapter(f"ad{i}", layers=5, kinds=KINDS, r=3, seed=80 + i) for i in range(3)]
    whole = all_distances(ads, device=CPU)
    chunked = all_distances(ads, device=CPU, layer_chunk=2)
    for key in whole:
        np.testing.assert_allclose(chunked[key].values, whole[key].values, rtol=1e-12, atol=1e-14)


def test_progress_is_reported_per_chunk():
    ads = [random_adapter(f"ad{i}", layers=4, kinds=KINDS, r=3, seed=i) for i in range(2)]
    calls = []
    all_distances(ads, device=CPU, layer_chunk=2, progress=lambda d, t, msg: calls.append((d, t, msg)))
    assert [c[0] for c in calls] == list(range(1, 7)) and all(c[1] == 6 for c in calls)
    assert "model.q layers 0-1" in calls[0][2]


def test_pairwise_distances_defaults_and_errors():
    ads = [random_adapter(f"ad{i}", layers=3, kinds=KINDS, r=3, seed=i) for i in range(3)]
    dt = pairwise_distances(ads, metric="grassmann", kind=None, device=CPU)
    assert (dt.kind, dt.metric, dt.factor, dt.stack) == ("v", "grassmann", "ba", "model")
    assert dt.values.shape == (3, 3, 3) and np.allclose(dt.values, dt.values.transpose(1, 0, 2))
    assert np.all(np.diagonal(dt.values) == 0)
    with pytest.raises(AtlasError, match="kind 'k' is not common"):
        pairwise_distances(ads, kind="k", device=CPU)
    with pytest.raises(AtlasError, match="unknown metric"):
        pairwise_distances(ads, metric="euclid", device=CPU)


def test_distance_tensor_reduce_and_frame():
    vals = np.arange(2 * 2 * 4, dtype=float).reshape(2, 2, 4)
    vals[0, 1, 3] = np.nan
    dt = DistanceTensor(vals, ["a", "b"], [0, 1, 2, 5], "l2", "ba", "v")
    np.testing.assert_allclose(dt.reduce(), np.nanmean(vals, -1))
    np.testing.assert_allclose(dt.reduce("last:2"), np.nanmean(vals[:, :, 2:], -1))
    np.testing.assert_allclose(dt.reduce([0, 5]), np.nanmean(vals[:, :, [0, 3]], -1))
    np.testing.assert_allclose(dt.reduce(range(0, 2)), vals[:, :, :2].mean(-1))
    frame = dt.to_frame()
    assert len(frame) == 16 and set(frame.columns) >= {"i", "j", "adapter_i", "adapter_j", "layer", "kind", "value"}
    row = frame[(frame.i == 1) & (frame.j == 0) & (frame.layer == 5)].iloc[0]
    assert row.adapter_i == "b" and row.value == vals[1, 0, 3]
    with pytest.raises(AtlasError, match="not available"):
        dt.reduce([3])


def test_select_layers_specs():
    layers = [0, 1, 2, 3, 4, 5]
    assert select_layers(layers, "all") == layers
    assert select_layers(layers, "last:2") == [4, 5]
    assert select_layers(layers, "last:10") == layers
    assert select_layers(layers, "1,3") == [1, 3]
    assert select_layers(layers, "2-4") == [2, 3, 4]
    assert select_layers(layers, "4-2, 0") == [0, 2, 3, 4]
    for bad in ("last:0", "x", "9"):
        with pytest.raises(AtlasError):
            select_layers(layers, bad)


def test_incompatible_shapes_name_adapter_module_and_shapes():
    a = random_adapter("small", layers=2, kinds={"q": (8, 8)}, r=2, seed=0, base="org/base-small")
    b = random_adapter("large", layers=2, kinds={"q": (16, 8)}, r=2, seed=1, base="org/base-large")
    with pytest.raises(IncompatibleAdaptersError, match=r"'large'.*model\.0\.q.*16x8.*'small'.*8x8.*base-large"):
        check_compatible([a, b])
    with pytest.raises(IncompatibleAdaptersError):
        all_distances([a, b], device=CPU)


def test_different_targets_use_common_keys_and_warn():
    a = random_adapter("qv", layers=3, kinds={"q": (8, 6), "v": (8, 6)}, r=2, seed=0)
    b = random_adapter("v_only", layers=[1, 2], kinds={"v": (8, 6)}, r=3, seed=1, base="other/name")
    warnings = check_compatible([a, b])
    text = " | ".join(warnings)
    assert "different base models" in text and "'v_only' lacks 4 module(s)" in text and "ranks differ" in text
    assert common_keys([a, b]) == [ModuleKey("model", 1, "v"), ModuleKey("model", 2, "v")]
    assert missing_keys([a, b])["v_only"][0] == ModuleKey("model", 0, "q")
    with pytest.raises(IncompatibleAdaptersError, match="different base models"):
        check_compatible([a, b], strict_base=True)
    res = all_distances([a, b], device=CPU)
    assert {k for *_, k in res} == {"v"} and res["cosine", "ba", "model", "v"].layers == [1, 2]


def test_random_factors_rank_control():
    B, A = random_factors(12, 9, 5, seed=0, rank_b=2, rank_a=3)
    assert int(torch.linalg.matrix_rank(B)) == 2 and int(torch.linalg.matrix_rank(A)) == 3


def test_grassmann_matches_scipy_subspace_angles_on_dense_task_vectors():
    import scipy.linalg

    ads = [random_adapter(f"ad{i}", layers=2, kinds=KINDS, r=4, seed=100 + i) for i in range(2)]
    ads[1].modules[ModuleKey("model", 1, "q")].A[3] = 0.0  # rank 3 vs 4 at one module
    res = all_distances(ads, metrics=["grassmann"], factors=["ba"], device=CPU)
    for key in common_keys(ads):
        t1, t2 = ads[0].modules[key].dense().numpy(), ads[1].modules[key].dense().numpy()
        ref = math.sqrt(float((scipy.linalg.subspace_angles(t1, t2) ** 2).sum()))
        got = res["grassmann", "ba", key.stack, key.kind].values[0, 1, key.layer]
        assert got == pytest.approx(ref, rel=1e-8), key


def test_factors_wider_than_the_space_use_the_per_pair_path_and_match_dense():
    """m < r: Householder Q has m columns, the pair-batched path does not apply."""
    ads = [random_adapter(f"ad{i}", layers=2, kinds={"tiny": (3, 10), "q": (12, 10)}, r=4, seed=110 + i) for i in range(3)]
    assert_matches_dense(ads)


# ---------------------------------------------------------------------------------------------
# Zero task vectors (B = 0: peft's init, or a module that never trained) and reduce() coverage
def _zero_set():
    ads = [random_adapter(f"ad{i}", layers=3, kinds=KINDS, r=4, seed=200 + i) for i in range(3)]
    ads[0].name = "nli"
    for kind in ("q", "v"):
        ads[0].modules[ModuleKey("model", 1, kind)].B.zero_()  # peft init: B = 0
    ads[2].modules[ModuleKey("model", 2, "down")].A.zero_()  # A = 0 (rank 0 on the A side)
    return ads


@pytest.mark.parametrize("pad", [False, True])
def test_zero_task_vector_has_undefined_grassmann_and_cosine_not_zero(pad):
    ads = _zero_set()
    res = all_distances(ads, device=CPU, pad=pad)
    for factor in ("ba", "b"):
        g = res["grassmann", factor, "model", "q"].values
        assert np.isnan(g[0, 1, 1]) and np.isnan(g[0, 2, 1]) and np.isnan(g[1, 0, 1]), factor
        assert np.isfinite(g[1, 2, 1]) and np.isfinite(g[0, 1, 0]) and np.isfinite(g[0, 1, 2]), factor
        assert np.isnan(res["cosine", factor, "model", "q"].values[0, 1, 1])
    # The A side of a zero-B module is a genuine subspace: its Grassmann distances stay defined.
    assert np.isfinite(res["grassmann", "a", "model", "q"].values[0, 1, 1])
    # A = 0: tau and the A side are undefined for Grassmann, the B side is not.
    for factor in ("ba", "a"):
        assert np.isnan(res["grassmann", factor, "model", "down"].values[2, 0, 2]), factor
    assert np.isfinite(res["grassmann", "b", "model", "down"].values[2, 0, 2])
    # L2 between a zero and a non-zero task vector is ||tau|| of the other one.
    key = ModuleKey("model", 1, "q")
    other = float(torch.linalg.matrix_norm(ads[1].modules[key].dense()))
    assert res["l2", "ba", "model", "q"].values[0, 1, 1] == pytest.approx(other, rel=1e-12)
    assert res["l2", "b", "model", "q"].values[0, 1, 1] == pytest.approx(
        float(torch.linalg.matrix_norm(ads[1].modules[key].B.double())), rel=1e-12
    )
    # The diagonal stays 0 (a zero module is "itself").
    assert np.all(np.diagonal(res["grassmann", "ba", "model", "q"].values) == 0)


def test_zero_modules_are_named_once_per_adapter_in_the_notes():
    ads = _zero_set()
    ads[0].modules[ModuleKey("model", 2, "q")].B.zero_()
    res = all_distances(ads, device=CPU)
    notes = res["grassmann", "ba", "model", "q"].notes
    zero = [n for n in notes if "is zero" in n or "are zero" in n]
    assert len(zero) == 1, notes
    assert "'nli'" in zero[0] and "model.1-2.q" in zero[0] and "B = 0" in zero[0] and "undefined" in zero[0]
    assert res["grassmann", "ba", "model", "q"].zero == {"nli": [1, 2]}
    down = res["grassmann", "a", "model", "down"]
    assert down.zero == {"ad2": [2]} and any("A = 0" in n for n in down.notes)
    assert res["grassmann", "b", "model", "down"].zero == {}
    # L2 stays defined: its note says what the value is.
    l2 = [n for n in res["l2", "ba", "model", "v"].notes if "is zero" in n]
    assert len(l2) == 1 and "L2 to it is the norm of the other adapter's matrix" in l2[0]


def test_reduce_reports_how_many_layers_each_pair_averaged():
    ads = _zero_set()
    dt = all_distances(ads, metrics=["grassmann"], factors=["ba"], kind=["q"], device=CPU)["grassmann", "ba", "model", "q"]
    default = dt.reduce()
    values, counts = dt.reduce("all", return_counts=True)
    np.testing.assert_array_equal(values, default)
    assert counts[0, 1] == 2 and counts[1, 2] == 3 and counts[0, 0] == 3
    np.testing.assert_array_equal(dt.counts("all"), counts)
    assert dt.counts("last:1")[0, 1] == 1
    notes = dt.coverage_notes("all")
    assert any("pair ('nli', 'ad1') averaged 2 of 3 layers" in n for n in notes), notes
    assert not any("'ad1', 'ad2'" in n for n in notes)
    assert dt.coverage_notes("2") == []


def test_one_note_for_one_cause():
    """Ten adapters without one adapter's k modules: one line naming that adapter, not ten."""
    from geometry.linalg.align import check_compatible as check

    qv = [random_adapter(f"t{i}", layers=2, kinds={"q": (8, 6), "v": (8, 6)}, r=2, seed=i) for i in range(10)]
    wide = random_adapter("wide", layers=2, kinds={"q": (8, 6), "k": (8, 6), "v": (8, 6)}, r=2, seed=11)
    notes = [n for n in check([*qv, wide]) if "module(s)" in n]
    assert notes == ["2 module(s) (model.0.k, model.1.k) only in 'wide'; comparisons use the modules common to all "
                     "11 adapters"]
