"""TSV-M, Iso-C, Iso-CTS and the singular task interference: factored code against dense references.

The references are written straightforwardly on the dense ``m x n`` task vectors (float64,
``torch.linalg.svd``), with the same definition as the factored code (zero singular components
dropped; numerical zero ``max(m, n) * eps * sigma_1``). Where the authors' dense code is well
defined (full-rank modules) its rule is restated (rewritten here, not copied) and compared as well.
"""

from __future__ import annotations

import math

import pytest
import torch

from geometry.merging.iso import PARAMS as ISO_PARAMS
from geometry.merging.iso import cts_split, iso_c, iso_cts
from geometry.merging.tsv import PARAMS as TSV_PARAMS
from geometry.merging.tsv import interference_by_module, task_interference, tsv_m
from geometry.testing import random_adapter
from geometry.types import ModuleKey

EPS = torch.finfo(torch.float64).eps
#: non-square kinds: "q" low rank (sum r_t < min(m, n)), "v" full rank (sum r_t >= min(m, n) = 6)
KINDS = {"q": (20, 13), "v": (7, 6)}
WEIGHTS = [0.5, -1.0, 2.0]


def _adapters(ranks=(2, 3, 4), layers=2):
    ads = [
        random_adapter(f"t{i}", layers=layers, kinds=KINDS, r=r, alpha=2.0 * r + i, seed=40 + i, dtype=torch.float64)
        for i, r in enumerate(ranks)
    ]
    # rank-deficient factors: two equal columns of B in t1, layer 0, q
    mod = ads[1].modules[ModuleKey("model", 0, "q")]
    mod.B[:, 1] = mod.B[:, 0]
    # a module one adapter lacks
    del ads[2].modules[ModuleKey("model", 1, "q")]
    return ads


def _rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x - y).norm() / max(float(y.norm()), 1e-30))


def _taus(ads, key, w):
    return [w[t] * ad.modules[key].dense() for t, ad in enumerate(ads) if key in ad.modules]


def _svd_nz(M, tol=None):
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    if tol is None:
        tol = max(M.shape) * EPS * float(S[0])
    k = int((S > tol).sum())
    return U[:, :k], S[:k], Vh[:k].T


def _polar(M):
    P, s, Qh = torch.linalg.svd(M, full_matrices=False)
    keep = s > max(M.shape) * EPS * s[0]
    return P[:, keep] @ Qh[keep]


# ----------------------------------------------------------------------------- dense references
def _tsv_ref(taus, fraction=None, alpha=1.0):
    m, n = taus[0].shape
    Us, Ss, Vs = [], [], []
    for tau in taus:
        U, S, V = _svd_nz(tau)
        k = min(len(S), min(m, n) // len(taus)) if fraction is None else math.ceil(fraction * len(S) - 1e-9)
        Us.append(U[:, :k])
        Ss.append(S[:k])
        Vs.append(V[:, :k])
    U, S, V = torch.cat(Us, 1), torch.cat(Ss), torch.cat(Vs, 1)
    return alpha * (_polar(U) * S) @ _polar(V).T


def _iso_c_ref(taus, spectrum="rank", alpha=1.0):
    U, S, V = _svd_nz(sum(taus))
    denom = len(S) if spectrum == "rank" else min(taus[0].shape)
    return alpha * float(S.sum()) / denom * U @ V.T


def _iso_cts_ref(taus, f=0.8, spectrum="rank", alpha=1.0):
    m, n = taus[0].shape
    ta = sum(taus)
    tol = max(m, n) * EPS * max(float(torch.linalg.matrix_norm(x, ord=2)) for x in [ta, *taus])
    U, S, V = _svd_nz(ta, tol)
    D = len(S) if spectrum == "rank" else min(m, n)
    k_c = int(D * f)
    ts = round((D - k_c) / len(taus)) * len(taus)
    ts = ts - len(taus) if ts > D else ts  # never more task directions than D
    k_c = D - ts
    n_per = ts // len(taus)
    Uc, Sc, Vc = U[:, :k_c], S[:k_c], V[:, :k_c]
    Us, Ss, Vs = [Uc], [Sc], [Vc]
    for tau in taus:
        if n_per == 0:
            break
        Ut, St, Vt = _svd_nz(tau - Uc @ Uc.T @ tau, tol)
        Us.append(Ut[:, :n_per])
        Ss.append(St[:n_per])
        Vs.append(Vt[:, :n_per])
    S_all = torch.cat(Ss)
    sigma = float(S_all.sum()) / (len(S_all) if spectrum == "rank" else min(m, n))
    return alpha * sigma * _polar(torch.cat(Us, 1)) @ _polar(torch.cat(Vs, 1)).T


# ------------------------------------- the authors' dense rules, restated (independent rewrites)
def _authors_tsv(taus):
    """TSV-M by the authors' dense rule (``compute_and_sum_svd_mem_reduction``), for one key.

    Their rule, step by step: every task keeps the same number ``int(min(m, n) / T)`` of leading
    singular triplets of its dense SVD, whatever its rank (so zero singular values can be kept);
    the kept left vectors of all tasks sit side by side in a ``min(m, n)``-wide block that is
    zero beyond the last task, likewise the right vectors (as rows) and the singular values; each
    block of vectors is replaced by its orthogonal polar factor ``P Q^T`` (one SVD each); the update
    is ``polar(U_all) diag(S_all) polar(Vh_all)`` with the singular values left as they were.
    """
    width = min(taus[0].shape)
    keep = int(width / len(taus))
    lefts, values, rows = [], [], []
    for tau in taus:
        u, s, vh = torch.linalg.svd(tau, full_matrices=False)
        lefts.append(u[:, :keep])
        values.append(s[:keep])
        rows.append(vh[:keep])
    spare = width - keep * len(taus)  # the authors' buffers are zero-filled past the last task
    u_all = torch.cat([*lefts, taus[0].new_zeros(taus[0].shape[0], spare)], dim=1)
    s_all = torch.cat([*values, taus[0].new_zeros(spare)])
    vh_all = torch.cat([*rows, taus[0].new_zeros(spare, taus[0].shape[1])], dim=0)

    def orthogonal_factor(M):  # P Q^T of M = P diag(.) Q^T, every singular direction included
        p, _, qh = torch.linalg.svd(M, full_matrices=False)
        return p @ qh

    return (orthogonal_factor(u_all) * s_all) @ orthogonal_factor(vh_all)


def _authors_iso_c(taus):
    """Iso-C by the authors' dense rule (``iso_c`` of their ``src/utils/iso.py``), for one key.

    Their rule: sum the task vectors, take the thin SVD of the sum and replace all ``min(m, n)``
    singular values (zeros included) by their mean: ``mean(S) * U Vh``.
    """
    left, sv, right_h = torch.linalg.svd(torch.stack(list(taus)).sum(dim=0), full_matrices=False)
    return sv.mean() * (left @ right_h)


def _authors_iso_cts(taus, common_space_fraction):
    """Iso-CTS by the authors' dense rule (``iso_cts`` of their ``src/utils/iso.py``), for one key.

    Their rule, step by step, with ``D = min(m, n)`` and ``T`` tasks:

    1. split ``D`` into ``k_c`` common directions and ``T`` equal task shares: start from
       ``int(f D)`` common, round the remainder to a multiple of ``T``, give the rest to the common part;
    2. common part: the top ``k_c`` singular triplets of the task-arithmetic sum;
    3. task part: for each task, its vector with the common left subspace projected out, and the
       top ``(D - k_c) / T`` triplets of that residual;
    4. task blocks first, then the common block, side by side; left vectors and right vectors are
       each replaced by their orthogonal polar factor; every singular value by the mean of all ``D``.
    """
    D, T = min(taus[0].shape), len(taus)
    specific_total = round((D - int(D * common_space_fraction)) / T) * T
    k_common, per_task = D - specific_total, specific_total // T
    u, s, vh = torch.linalg.svd(torch.stack(list(taus)).sum(dim=0), full_matrices=False)
    u_c = u[:, :k_common]
    lefts, values, rows = [], [], []
    for tau in taus:
        residual = tau - u_c @ (u_c.T @ tau)
        ur, sr, vhr = torch.linalg.svd(residual, full_matrices=False)
        lefts.append(ur[:, :per_task])
        values.append(sr[:per_task])
        rows.append(vhr[:per_task])
    lefts.append(u_c)
    values.append(s[:k_common])
    rows.append(vh[:k_common])
    u_all, s_all, vh_all = torch.cat(lefts, dim=1), torch.cat(values), torch.cat(rows, dim=0)
    p_u, _, q_u = torch.linalg.svd(u_all, full_matrices=False)
    p_v, _, q_v = torch.linalg.svd(vh_all, full_matrices=False)
    return s_all.mean() * ((p_u @ q_u) @ (p_v @ q_v))


# ------------------------------------------------------------------------------------ TSV-M
@pytest.mark.parametrize("fraction", [None, 0.5])
def test_tsv_m_matches_dense_reference(fraction):
    ads = _adapters()
    m = tsv_m(ads, WEIGHTS, alpha=1.3, fraction=fraction, dtype=torch.float64, device="cpu")
    assert set(m.modules) == {k for ad in ads for k in ad.modules}
    for key, mod in m.modules.items():
        taus = _taus(ads, key, WEIGHTS)
        assert mod.factored and _rel(mod.dense(), _tsv_ref(taus, fraction, 1.3)) < 1e-10, key.label
        assert mod.rank_sum == sum(ad.modules[key].r for ad in ads if key in ad.modules)
    lacking = m.modules[ModuleKey("model", 1, "q")]
    assert lacking.rank == 2 + 3 if fraction is None else lacking.rank == 1 + 2
    deficient = m.modules[ModuleKey("model", 0, "q")]
    assert deficient.rank == (2 + 2 + 4 if fraction is None else 1 + 1 + 2)  # t1 has rank 2, not 3


def test_layer_level_weights_scale_each_task_first():
    ads = _adapters()
    lw = [{0: 1.0, 1: -0.5}, {0: 2.0, "default": 1.0}, [0.3, 0.7]]
    kw = dict(dtype=torch.float64, device="cpu")
    merged = {fn: fn(ads, lw, **kw) for fn in (tsv_m, iso_c, iso_cts)}
    refs = {tsv_m: _tsv_ref, iso_c: _iso_c_ref, iso_cts: _iso_cts_ref}
    for fn, m in merged.items():
        for key, mod in m.modules.items():
            w = [1.0 if key.layer == 0 else -0.5, 2.0 if key.layer == 0 else 1.0, [0.3, 0.7][key.layer]]
            assert _rel(mod.dense(), refs[fn](_taus(ads, key, w))) < 1e-10, (fn.__name__, key.label)


def test_tsv_m_equals_authors_code_when_no_zero_component_is_padded():
    ads = _adapters()
    key = ModuleKey("model", 0, "v")  # (7, 6), ranks 2, 3, 4 >= 6 // 3
    m = tsv_m(ads, WEIGHTS, dtype=torch.float64, device="cpu")
    assert _rel(m.modules[key].dense(), _authors_tsv(_taus(ads, key, WEIGHTS))) < 1e-10


def test_tsv_m_one_task_returns_the_task_and_truncation():
    ad = _adapters()[2]
    full = tsv_m([ad], dtype=torch.float64, device="cpu")
    half = tsv_m([ad], fraction=0.5, dtype=torch.float64, device="cpu")
    for key, mod in full.modules.items():
        tau = ad.modules[key].dense()
        assert _rel(mod.dense(), tau) < 1e-12
        U, S, Vh = torch.linalg.svd(tau)
        assert _rel(half.modules[key].dense(), (U[:, :2] * S[:2]) @ Vh[:2]) < 1e-10


def test_tsv_m_rank_truncates_the_merged_update():
    ads = _adapters()
    full = tsv_m(ads, dtype=torch.float64, device="cpu")
    cut = tsv_m(ads, rank=3, dtype=torch.float64, device="cpu")
    for key, mod in cut.modules.items():
        U, S, Vh = torch.linalg.svd(full.modules[key].dense())
        assert mod.rank == 3 and _rel(mod.dense(), (U[:, :3] * S[:3]) @ Vh[:3]) < 1e-10
        assert mod.energy_kept == pytest.approx(float((S[:3] ** 2).sum() / (S**2).sum()), rel=1e-10)


# ------------------------------------------------------------------------------------ Iso-C
@pytest.mark.parametrize("spectrum", ["rank", "full"])
def test_iso_c_matches_dense_reference_and_is_isotropic(spectrum):
    ads = _adapters()
    m = iso_c(ads, WEIGHTS, alpha=1.5, spectrum=spectrum, dtype=torch.float64, device="cpu")
    for key, mod in m.modules.items():
        taus = _taus(ads, key, WEIGHTS)
        assert _rel(mod.dense(), _iso_c_ref(taus, spectrum, 1.5)) < 1e-10, key.label
        S = torch.linalg.svdvals(mod.dense())
        R = int(torch.linalg.matrix_rank(sum(taus)))
        assert mod.rank == R
        assert torch.allclose(S[:R], S[0].expand(R), rtol=1e-10) and float(S[R:].abs().sum()) < 1e-10 * float(S[0])


def test_iso_c_equals_authors_code_full_rank_and_its_projection_low_rank():
    ads = _adapters()
    for spectrum in ("rank", "full"):
        m = iso_c(ads, WEIGHTS, spectrum=spectrum, dtype=torch.float64, device="cpu")
        for key, mod in m.modules.items():
            taus = _taus(ads, key, WEIGHTS)
            M = _authors_iso_c(taus)
            if key.kind == "v":  # full rank: the authors' definition exactly, either setting
                assert _rel(mod.dense(), M) < 1e-10
            elif spectrum == "full":  # the authors' output compressed to Im(Delta) x Im(Delta^T)
                U, _, V = _svd_nz(sum(taus))
                assert _rel(mod.dense(), U @ (U.T @ M @ V) @ V.T) < 1e-10


def test_iso_c_rank_keeps_top_directions():
    ads = _adapters()
    full = iso_c(ads, dtype=torch.float64, device="cpu")
    cut = iso_c(ads, rank=2, dtype=torch.float64, device="cpu")
    for key, mod in cut.modules.items():
        U, S, V = _svd_nz(sum(_taus(ads, key, [1.0, 1.0, 1.0])))
        sigma = float(S.sum()) / len(S)
        assert _rel(mod.dense(), sigma * U[:, :2] @ V[:, :2].T) < 1e-10
        assert mod.energy_kept == pytest.approx(2 / full.modules[key].rank, rel=1e-10)


# ---------------------------------------------------------------------------------- Iso-CTS
@pytest.mark.parametrize(("spectrum", "f"), [("rank", 0.8), ("rank", 0.5), ("full", 0.8), ("rank", 0.0)])
def test_iso_cts_matches_dense_reference(spectrum, f):
    ads = _adapters()
    m = iso_cts(ads, WEIGHTS, alpha=0.7, common_space_fraction=f, spectrum=spectrum, dtype=torch.float64, device="cpu")
    for key, mod in m.modules.items():
        ref = _iso_cts_ref(_taus(ads, key, WEIGHTS), f, spectrum, 0.7)
        assert _rel(mod.dense(), ref) < 1e-10, key.label


def test_iso_cts_equals_authors_code_on_full_rank_modules():
    ads = _adapters()
    for f in (0.8, 0.3):  # splits (3, 1) and (0, 2) of D = 6
        for spectrum in ("rank", "full"):
            m = iso_cts(ads, WEIGHTS, common_space_fraction=f, spectrum=spectrum, dtype=torch.float64, device="cpu")
            for key in (ModuleKey("model", 0, "v"), ModuleKey("model", 1, "v")):
                assert _rel(m.modules[key].dense(), _authors_iso_cts(_taus(ads, key, WEIGHTS), f)) < 1e-10


def test_iso_cts_special_cases_reduce_to_iso_c():
    ads = _adapters()
    kw = dict(dtype=torch.float64, device="cpu")
    c = iso_c(ads, WEIGHTS, **kw)
    all_common = iso_cts(ads, WEIGHTS, common_space_fraction=1.0, **kw)
    single_c, single_cts = iso_c(ads[:1], **kw), iso_cts(ads[:1], **kw)
    # literal split on a LoRA sum: all of Delta_TA is common, the residuals vanish -> Iso-C "full"
    c_full = iso_c(ads, WEIGHTS, spectrum="full", **kw)
    cts_full = iso_cts(ads, WEIGHTS, spectrum="full", **kw)
    for key, mod in c.modules.items():
        assert _rel(all_common.modules[key].dense(), mod.dense()) < 1e-10
        if key.kind == "q":
            assert _rel(cts_full.modules[key].dense(), c_full.modules[key].dense()) < 1e-10
    for key, mod in single_c.modules.items():
        assert _rel(single_cts.modules[key].dense(), mod.dense()) < 1e-10


def test_iso_cts_flat_spectrum_and_rank():
    ads = _adapters()
    m = iso_cts(ads, WEIGHTS, common_space_fraction=0.5, dtype=torch.float64, device="cpu")
    cut = iso_cts(ads, WEIGHTS, common_space_fraction=0.5, rank=2, dtype=torch.float64, device="cpu")
    for key, mod in m.modules.items():
        S = torch.linalg.svdvals(mod.dense())[: mod.rank]
        assert torch.allclose(S, S[0].expand_as(S), rtol=1e-10)
        assert cut.modules[key].rank == 2
        assert cut.modules[key].energy_kept == pytest.approx(2 / mod.rank, rel=1e-10)


def test_cts_split_is_the_authors_rounding():
    assert cts_split(768, 8, 0.8) == (616, 19)  # ViT-B: 614 -> 616 common, 8 x 19 task-specific
    assert cts_split(6, 3, 0.8) == (3, 1)
    assert cts_split(2, 3, 0.0) == (2, 0)  # round(2/3) * 3 = 3 > 2: take T fewer
    assert cts_split(9, 3, 1.0) == (9, 0)


# ----------------------------------------------------------------------------- interference
def _blocks(name, cols, rows, m=12, n=10, r=2, seed=0):
    """An adapter with one module whose B lives in rows ``cols`` of R^m and A in columns ``rows`` of R^n."""
    ad = random_adapter(name, layers=1, kinds={"q": (m, n)}, r=r, alpha=float(r), seed=seed, dtype=torch.float64)
    mod = ad.modules[ModuleKey("model", 0, "q")]
    mask_b = torch.zeros(m, 1, dtype=torch.float64)
    mask_b[list(cols)] = 1.0
    mask_a = torch.zeros(1, n, dtype=torch.float64)
    mask_a[0, list(rows)] = 1.0
    mod.B.mul_(mask_b)
    mod.A.mul_(mask_a)
    return ad


def test_interference_known_values_orthogonal_and_identical():
    a = _blocks("a", range(0, 4), range(0, 5), seed=1)
    b = _blocks("b", range(4, 8), range(5, 10), seed=2)
    same = _blocks("same", range(0, 4), range(0, 5), seed=1)
    sti = task_interference([a, b, same], device="cpu")
    ov = task_interference([a, b, same], score="overlap", device="cpu")
    S = torch.linalg.svdvals(a.modules[ModuleKey("model", 0, "q")].dense())
    assert list(sti.index) == ["a", "b", "same"] and list(sti.columns) == ["a", "b", "same"]
    assert sti.loc["a", "b"] == pytest.approx(0.0, abs=1e-12) and sti.loc["b", "same"] == pytest.approx(0.0, abs=1e-12)
    assert sti.loc["a", "same"] == pytest.approx(2 * float(S.sum()), rel=1e-10)
    assert sti.loc["a", "a"] == pytest.approx(2 * float(S.sum()), rel=1e-10)
    assert ov.loc["a", "b"] == pytest.approx(0.0, abs=1e-12)
    assert ov.loc["a", "same"] == pytest.approx(1.0, rel=1e-12) and ov.loc["b", "b"] == pytest.approx(1.0, rel=1e-12)
    assert interference_by_module([a, b], device="cpu")["sti"].iloc[0] == pytest.approx(0.0, abs=1e-12)


def _sti_dense(taus):
    svds = [_svd_nz(t) for t in taus]
    U = torch.cat([u for u, _, _ in svds], 1)
    S = torch.cat([s for _, s, _ in svds])
    V = torch.cat([v for _, _, v in svds], 1)
    eye = torch.eye(U.shape[1], dtype=U.dtype)
    return float(torch.linalg.multi_dot((U.T @ U - eye, torch.diag(S), V.T @ V - eye)).abs().sum())


def test_interference_matches_dense_sti_symmetric_and_reduced():
    ads = _adapters()
    key = ModuleKey("model", 1, "q")  # t2 lacks it
    per = task_interference(ads, WEIGHTS, module=key.label, device="cpu")
    vals = torch.tensor(per.to_numpy())
    assert torch.allclose(vals, vals.T, rtol=0.0, atol=0.0, equal_nan=True)  # symmetric
    t0, t1 = (WEIGHTS[i] * ads[i].modules[key].dense() for i in (0, 1))
    assert per.loc["t0", "t1"] == pytest.approx(_sti_dense([t0, t1]), rel=1e-10)
    assert math.isnan(per.loc["t0", "t2"]) and math.isnan(per.loc["t2", "t2"])
    mean = task_interference(ads, WEIGHTS, device="cpu")
    keys = [k for k in ads[2].modules]  # modules shared by t0 and t2
    expect = sum(_sti_dense([WEIGHTS[t] * ads[t].modules[k].dense() for t in (0, 2)]) for k in keys)
    assert mean.loc["t0", "t2"] == pytest.approx(expect / len(keys), rel=1e-10)
    by_module = interference_by_module(ads, WEIGHTS, device="cpu").set_index("module")
    for k in sorted({k for ad in ads for k in ad.modules}):
        row = by_module.loc[k.label]
        assert row["sti"] == pytest.approx(_sti_dense(_taus(ads, k, WEIGHTS)), rel=1e-10)
        assert row["tasks"] == sum(k in ad.modules for ad in ads)


def test_params_constants_and_float32_storage():
    assert TSV_PARAMS == {"tsv_m": ("alpha", "fraction", "rank")}
    assert set(ISO_PARAMS) == {"iso_c", "iso_cts"} and "common_space_fraction" in ISO_PARAMS["iso_cts"]
    ads = _adapters()
    for fn in (tsv_m, iso_c, iso_cts):
        m = fn(ads, device="cpu")
        mod = next(iter(m.modules.values()))
        assert mod.B.dtype == torch.float32 and mod.B.device.type == "cpu" and m.method == fn.__name__
    with pytest.raises(ValueError):
        tsv_m(ads, fraction=0.0)
    with pytest.raises(ValueError):
        iso_cts(ads, spectrum="dense")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_equals_cpu():
    ads = _adapters()
    for fn in (tsv_m, iso_c, iso_cts):
        cpu = fn(ads, WEIGHTS, dtype=torch.float64, device="cpu")
        gpu = fn(ads, WEIGHTS, dtype=torch.float64, device="cuda")
        for key, mod in gpu.modules.items():
            assert mod.B.device.type == "cpu" and _rel(mod.dense(), cpu.modules[key].dense()) < 1e-10
    a = task_interference(ads, WEIGHTS, device="cpu").to_numpy()
    b = task_interference(ads, WEIGHTS, device="cuda").to_numpy()
    assert torch.allclose(torch.tensor(a), torch.tensor(b), rtol=1e-10, equal_nan=True)
