"""KnOTS and Core Space merging (shared-basis merges) against dense references of the same definitions.

The references build the dense ``m x n`` task vectors, take ``torch.linalg.svd`` of the dense
concatenation (KnOTS) or of the stacked factors (Core Space) in float64, and run the element-wise
merges of :mod:`geometry.merging.ties` / :mod:`geometry.merging.dare` on the dense coordinates. Both
sides use the same sign convention (largest-|.| entry of each basis column positive); the tests
with random sign flips show that the results do not depend on it.
"""

from __future__ import annotations

import pytest
import torch

from geometry.linalg.factored import rank_mask
from geometry.merging.base import all_keys, iter_present
from geometry.merging.core_space import PARAMS as CORE_PARAMS
from geometry.merging.core_space import core_space, isotropize, tsv_cores
from geometry.merging.dare import drop_and_rescale, mask_generator
from geometry.merging.knots import PARAMS as KNOTS_PARAMS
from geometry.merging.knots import knots
from geometry.merging.task_arithmetic import task_arithmetic
from geometry.merging.ties import disjoint_mean, elect_sign, ties_tensors
from geometry.merging.weights import MergeWeights
from geometry.testing import random_adapter
from geometry.types import ModuleKey

# non-square modules; at "v" the rank sum (4 + 3 + 5 = 12) exceeds m = 9; at "q" it equals n = 12
KINDS = {"q": (20, 12), "v": (9, 26)}
DEFICIENT = ModuleKey("model", 0, "q")
MISSING = ModuleKey("model", 1, "v")
WEIGHTS = [0.7, -0.4, 1.3]
CPU = torch.device("cpu")


def _adapters():
    ads = [
        random_adapter(f"t{i}", layers=2, kinds=KINDS, r=r, alpha=a, seed=40 + i, dtype=torch.float64)
        for i, (r, a) in enumerate(zip((4, 3, 5), (8.0, 3.0, 20.0)))
    ]
    b = ads[0].modules[DEFICIENT].B
    b[:, 1] = b[:, 0]  # rank-deficient B (two equal columns)
    a = ads[2].modules[DEFICIENT].A
    a[3] = 2.0 * a[0]  # rank-deficient A
    del ads[1].modules[MISSING]  # a module one adapter lacks
    return ads


@pytest.fixture(scope="module")
def ads():
    return _adapters()


def _rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x - y).norm() / max(float(y.norm()), 1e-30))


def _canon(U: torch.Tensor) -> torch.Tensor:
    idx = U.abs().argmax(dim=0)
    vals = U[idx, torch.arange(U.shape[1])]
    return torch.where(vals < 0, -1.0, 1.0).to(U.dtype)


def _flips(k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (k,), generator=gen).to(torch.float64) * 2 - 1


def _ref_combine(X, w, method, density, key, seed=0, sign="total"):
    wv = w.reshape(-1, 1, 1)
    if method == "task_arithmetic":
        return (X * wv).sum(0)
    if method == "ties":
        return ties_tensors(X, w, density, sign)
    dropped = drop_and_rescale(X, density, mask_generator(seed, key, X.device))
    if method == "dare_linear":
        return (dropped * wv).sum(0)
    return disjoint_mean(dropped * wv, elect_sign(dropped, sign))


def _present(ads, key, weights):
    wk = MergeWeights(weights, len(ads), default=1.0).at(key)
    pres = list(iter_present(ads, key))
    return pres, torch.tensor([wk[t] for t, _ in pres], dtype=torch.float64)


def _ref_knots(ads, key, weights, method, density, scale_coordinates=True, flip_seed=None):
    pres, w = _present(ads, key, weights)
    taus = [mod.dense() for _, mod in pres]
    m, n, T = taus[0].shape[0], taus[0].shape[1], len(taus)
    U, S, Vh = torch.linalg.svd(torch.cat(taus, dim=1), full_matrices=False)
    keep = rank_mask(S, m, T * n)
    U, S, Vh = U[:, keep], S[keep], Vh[keep]
    sg = _canon(U) if flip_seed is None else _flips(U.shape[1], flip_seed)
    U, Vh = U * sg, Vh * sg[:, None]
    X = torch.stack([Vh[:, t * n : (t + 1) * n] for t in range(T)])
    if scale_coordinates:
        X = S[None, :, None] * X
    Xm = _ref_combine(X, w, method, density, key)
    return U @ Xm if scale_coordinates else (U * S) @ Xm


def _ref_core(ads, key, weights, method, density, flip_seed=None):
    pres, w = _present(ads, key, weights)
    Bst = torch.cat([mod.B for _, mod in pres], dim=1)
    Ast = torch.cat([mod.A for _, mod in pres], dim=0)
    UB, SB, _ = torch.linalg.svd(Bst, full_matrices=False)
    _, SA, VAh = torch.linalg.svd(Ast, full_matrices=False)
    UB = UB * rank_mask(SB, Bst.shape[0], Bst.shape[1])
    VA = VAh.T * rank_mask(SA, Ast.shape[1], Ast.shape[0])
    if flip_seed is None:
        UB, VA = UB * _canon(UB), VA * _canon(VA)
    else:
        UB, VA = UB * _flips(UB.shape[1], flip_seed), VA * _flips(VA.shape[1], flip_seed + 1)
    cores = torch.stack([UB.T @ mod.dense() @ VA for _, mod in pres])
    if method == "iso_c":
        U, S, Vh = torch.linalg.svd((cores * w.reshape(-1, 1, 1)).sum(0), full_matrices=False)
        k = int(rank_mask(S, *cores.shape[1:]).sum())
        M = (U[:, :k] * S[:k].mean()) @ Vh[:k]
    elif method == "tsv":
        M = tsv_cores(cores, w)
    else:
        M = _ref_combine(cores, w, method, density, key)
    return UB @ M @ VA.T


def test_params_constants_name_the_keyword_arguments():
    import inspect

    for fn, table in ((knots, KNOTS_PARAMS), (core_space, CORE_PARAMS)):
        sig = set(inspect.signature(fn).parameters) - {"adapters", "weights", "dtype", "device"}
        assert set(table[fn.__name__]) == sig


@pytest.mark.parametrize(
    "method, density",
    [("ties", 0.3), ("ties", 1.0), ("dare_ties", 0.6), ("dare_linear", 0.5), ("task_arithmetic", None)],
)
def test_knots_matches_dense_reference(ads, method, density):
    m = knots(ads, WEIGHTS, merge_method=method, density=density, dtype=torch.float64, device="cpu")
    assert set(m.modules) == set(all_keys(ads))
    for key, mod in m.modules.items():
        assert mod.factored and mod.energy_kept == 1.0
        assert mod.rank <= mod.rank_sum
        ref = _ref_knots(ads, key, WEIGHTS, method, m.params.get("density"))
        assert _rel(mod.dense(), ref) < 1e-10, key
        # the result does not depend on the signs of the singular vectors
        assert _rel(_ref_knots(ads, key, WEIGHTS, method, m.params.get("density"), flip_seed=7), ref) < 1e-10
    assert m.modules[MISSING].rank_sum == 4 + 5


def test_knots_unscaled_coordinates_and_sign_method(ads):
    m = knots(ads, WEIGHTS, merge_method="ties", density=0.4, scale_coordinates=False,
              majority_sign_method="frequency", dtype=torch.float64, device="cpu")
    for key, mod in m.modules.items():
        _, w = _present(ads, key, WEIGHTS)
        ref = _ref_knots_freq(ads, key, w)
        assert _rel(mod.dense(), ref) < 1e-10, key
    scaled = knots(ads, WEIGHTS, merge_method="ties", density=0.4, dtype=torch.float64, device="cpu")
    key = ModuleKey("model", 1, "q")
    assert _rel(scaled.modules[key].dense(), m.modules[key].dense()) > 1e-3  # a different merge


def _ref_knots_freq(ads, key, w):
    pres, _ = _present(ads, key, WEIGHTS)
    taus = [mod.dense() for _, mod in pres]
    m, n, T = taus[0].shape[0], taus[0].shape[1], len(taus)
    U, S, Vh = torch.linalg.svd(torch.cat(taus, dim=1), full_matrices=False)
    keep = rank_mask(S, m, T * n)
    U, S, Vh = U[:, keep], S[keep], Vh[keep]
    sg = _canon(U)  # needed: "frequency" votes tie (count 0) often, and ties elect +1
    U, Vh = U * sg, Vh * sg[:, None]
    X = torch.stack([Vh[:, t * n : (t + 1) * n] for t in range(T)])
    return (U * S) @ ties_tensors(X, w, 0.4, "frequency")


def test_knots_and_core_space_task_arithmetic_equal_task_arithmetic(ads):
    ta = task_arithmetic(ads, WEIGHTS, dtype=torch.float64, device="cpu")
    for fn in (knots, core_space):
        m = fn(ads, WEIGHTS, merge_method="task_arithmetic", dtype=torch.float64, device="cpu")
        for key, mod in m.modules.items():
            assert _rel(mod.dense(), ta.modules[key].dense()) < 1e-12, (fn.__name__, key)


@pytest.mark.parametrize(
    "method, density",
    [("ties", 0.25), ("ties", 1.0), ("dare_ties", 0.6), ("dare_linear", 0.5), ("iso_c", None), ("tsv", None)],
)
def test_core_space_matches_dense_reference(ads, method, density):
    m = core_space(ads, WEIGHTS, merge_method=method, density=density, dtype=torch.float64, device="cpu")
    assert set(m.modules) == set(all_keys(ads))
    for key, mod in m.modules.items():
        assert mod.factored and mod.rank <= mod.rank_sum
        ref = _ref_core(ads, key, WEIGHTS, method, m.params.get("density"))
        assert _rel(mod.dense(), ref) < 1e-10, key
        assert _rel(_ref_core(ads, key, WEIGHTS, method, m.params.get("density"), flip_seed=3), ref) < 1e-10


def test_core_space_elementwise_is_not_dense_elementwise(ads):
    """TIES on the cores differs from TIES on the dense task vectors (the point of the paper)."""
    from geometry.merging.ties import ties

    cs = core_space(ads, merge_method="ties", density=0.2, dtype=torch.float64, device="cpu")
    dense = ties(ads, density=0.2, keep_dense=True, dtype=torch.float64, device="cpu")
    key = ModuleKey("model", 1, "q")
    assert _rel(cs.modules[key].dense(), dense.modules[key].dense()) > 1e-2


def test_core_space_iso_and_tsv_properties(ads):
    key = ModuleKey("model", 1, "q")  # full-rank factors, R = 12 = n
    iso = core_space(ads, merge_method="iso_c", dtype=torch.float64, device="cpu").modules[key].dense()
    S = torch.linalg.svdvals(iso)[:12]
    assert float((S.max() - S.min()) / S.max()) < 1e-10  # isotropic spectrum
    one = [ads[0]]
    tsv = core_space(one, merge_method="tsv", dtype=torch.float64, device="cpu")
    for k, mod in tsv.modules.items():  # a single task keeps all its components
        assert _rel(mod.dense(), ads[0].modules[k].dense()) < 1e-12
    X = torch.randn(5, 7, dtype=torch.float64)
    assert _rel(isotropize(X), isotropize(-X) * -1) < 1e-12


def test_rank_truncation_is_best_rank_r(ads):
    for fn in (knots, core_space):
        full = fn(ads, WEIGHTS, merge_method="ties", density=0.5, dtype=torch.float64, device="cpu")
        cut = fn(ads, WEIGHTS, merge_method="ties", density=0.5, rank=3, dtype=torch.float64, device="cpu")
        for key, mod in cut.modules.items():
            U, S, Vh = torch.linalg.svd(full.modules[key].dense())
            assert mod.rank == 3
            assert _rel(mod.dense(), (U[:, :3] * S[:3]) @ Vh[:3]) < 1e-10
            assert mod.energy_kept == pytest.approx(float((S[:3] ** 2).sum() / (S**2).sum()), rel=1e-10)
        assert cut.params["rank"] == 3 and cut.summary()["rank_rule"] == "at most 3"


def test_dare_is_seeded_and_recorded(ads):
    a = knots(ads, merge_method="dare_ties", seed=1, dtype=torch.float64, device="cpu")
    b = knots(ads, merge_method="dare_ties", seed=1, dtype=torch.float64, device="cpu")
    c = knots(ads, merge_method="dare_ties", seed=2, dtype=torch.float64, device="cpu")
    key = ModuleKey("model", 1, "q")
    assert torch.equal(a.modules[key].dense(), b.modules[key].dense())
    assert _rel(a.modules[key].dense(), c.modules[key].dense()) > 1e-3
    assert a.params["mask_device"] == "cpu" and a.params["density"] == 0.5 and a.params["seed"] == 1
    assert a.content_hash != c.content_hash


def test_bad_parameters_raise(ads):
    with pytest.raises(ValueError, match="merge_method"):
        knots(ads, merge_method="iso_c")
    with pytest.raises(ValueError, match="merge_method"):
        core_space(ads, merge_method="magic")
    with pytest.raises(ValueError, match="density"):
        core_space(ads, merge_method="ties", density=0.0)
    with pytest.raises(ValueError, match="majority_sign_method"):
        knots(ads, majority_sign_method="mode")


def test_float32_storage_and_default_device(ads):
    m = core_space(ads, merge_method="ties")
    mod = next(iter(m.modules.values()))
    assert mod.B.dtype == torch.float32 and mod.B.device == CPU
    m2 = knots(ads)
    assert next(iter(m2.modules.values())).A.dtype == torch.float32
