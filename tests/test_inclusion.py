"""Spectral inclusion: closed form vs dense least squares, numerical minimisers and the paper's Adam."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.optimize import minimize, nnls

from geometry.analysis.inclusion import (
    INCLUSION_COLUMNS,
    inclusion,
    inclusion_matrices,
    inclusion_matrix,
    inclusion_objective,
    lambda_sweep,
    project_spectrum,
    projection_coefficients,
    projection_residual,
    solve_spectrum,
)
from geometry.analysis.inclusion_adam import adam_inclusion, adam_inclusion_dense, adam_spectrum
from geometry.analysis.stats import ttest
from geometry.errors import IncompatibleAdaptersError
from geometry.linalg.factored import LowRankSVD, lowrank_svd
from geometry.linalg.spectra import rec
from geometry.testing import random_adapter, random_factors
from geometry.types import ModuleKey

CPU = "cpu"


def _pair(m, n, r1, r2, seed, rank_b1=None, rank_a1=None, rank_b2=None, mix=0.5):
    """tau1 = s1 B1 A1 and a tau2 that partly lives in tau1's row/column spaces (so c has both signs)."""
    B1, A1 = random_factors(m, n, r1, seed=seed, rank_b=rank_b1, rank_a=rank_a1)
    B2, A2 = random_factors(m, n, r2, seed=seed + 100, rank_b=rank_b2)
    k = min(r1, r2)
    gen = torch.Generator().manual_seed(seed + 7)
    B2[:, :k] = mix * B1[:, :k] @ torch.randn(k, k, generator=gen, dtype=torch.float64) + (1 - mix) * B2[:, :k]
    A2[:k] = mix * torch.randn(k, k, generator=gen, dtype=torch.float64) @ A1[:k] + (1 - mix) * A2[:k]
    return B1, A1, 2.0, B2, A2, 1.5


def _dense_basis(tau1: np.ndarray):
    U, S, Vh = np.linalg.svd(tau1, full_matrices=False)
    tol = max(tau1.shape) * np.finfo(np.float64).eps * S[0]
    k = int((S > tol).sum())
    return U[:, :k], S[:k], Vh[:k].T


CASES = [
    # m, n, r1, r2, rank_b1, rank_a1, rank_b2
    (12, 12, 4, 4, None, None, None),
    (20, 9, 3, 6, None, None, None),
    (7, 16, 6, 2, None, None, None),
    (15, 11, 5, 5, 2, None, None),
    (15, 11, 5, 4, None, 3, 1),
]


@pytest.mark.parametrize("case", CASES)
def test_closed_form_equals_dense_nonnegative_least_squares(case):
    m, n, r1, r2, rb1, ra1, rb2 = case
    B1, A1, s1, B2, A2, s2 = _pair(m, n, r1, r2, seed=sum(case[:4]), rank_b1=rb1, rank_a1=ra1, rank_b2=rb2)
    svd1 = lowrank_svd(B1, A1, s1, device=CPU)
    S2 = project_spectrum(svd1, B2, A2, s2)
    tau1 = (s1 * B1 @ A1).numpy()
    tau2 = (s2 * B2 @ A2).numpy()
    U, S1, V = _dense_basis(tau1)
    assert svd1.rank == len(S1) == min(r1, rb1 or r1, ra1 or r1)
    design = np.stack([np.outer(U[:, i], V[:, i]).ravel() for i in range(len(S1))], axis=1)
    expected, _ = nnls(design, tau2.ravel())
    np.testing.assert_allclose(S2[: len(S1)].numpy(), expected, atol=1e-12)
    assert torch.all(S2[len(S1):] == 0)
    lstsq = np.linalg.lstsq(design, tau2.ravel(), rcond=None)[0]
    np.testing.assert_allclose(S2[: len(S1)].numpy(), np.clip(lstsq, 0, None), atol=1e-12)


def test_the_cases_exercise_both_branches_of_the_clip():
    signs = set()
    for m, n, r1, r2, rb1, ra1, rb2 in CASES:
        B1, A1, s1, B2, A2, s2 = _pair(m, n, r1, r2, seed=m + n + r1 + r2, rank_b1=rb1, rank_a1=ra1, rank_b2=rb2)
        c = projection_coefficients(lowrank_svd(B1, A1, s1, device=CPU), B2, A2, s2)
        signs |= {int(v) for v in torch.sign(c[c != 0])}
    assert signs == {-1, 1}


def test_projecting_tau_on_its_own_basis_returns_its_spectrum():
    B, A = random_factors(30, 18, 6, seed=3)
    svd = lowrank_svd(B, A, 2.0, device=CPU)
    S2 = project_spectrum(svd, B, A, 2.0)
    torch.testing.assert_close(S2, svd.S, rtol=1e-13, atol=1e-15)
    assert float(rec(svd.S, S2)) == pytest.approx(1.0, abs=1e-14)
    # Non-squared objective, tau2 inside the span (rho = 0) and lambda * sqrt(r) < 1: no shrinkage at all.
    torch.testing.assert_close(project_spectrum(svd, B, A, 2.0, lam=0.1), svd.S, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(project_spectrum(svd, B, A, 2.0, 0.1, "squared"), svd.S - 0.05, rtol=1e-13, atol=1e-15)


def test_sign_invariance_of_singular_pairs_and_of_the_basis_adapter():
    B1, A1, s1, B2, A2, s2 = _pair(14, 10, 4, 3, seed=5)
    svd = lowrank_svd(B1, A1, s1, device=CPU)
    flip = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64)
    flipped = LowRankSVD(svd.U * flip, svd.S, svd.V * flip, svd.rank)
    torch.testing.assert_close(projection_coefficients(flipped, B2, A2, s2), projection_coefficients(svd, B2, A2, s2))
    # Negating both task vectors changes nothing; negating only tau1 turns c into -c.
    negated = lowrank_svd(B1, A1, -s1, device=CPU)
    for lam in (0.0, 0.2):
        torch.testing.assert_close(project_spectrum(negated, -B2, A2, s2, lam), project_spectrum(svd, B2, A2, s2, lam))
    torch.testing.assert_close(projection_coefficients(negated, B2, A2, s2), -projection_coefficients(svd, B2, A2, s2))


def test_residual_from_qr_core_is_accurate_where_the_difference_of_squares_is_not():
    B1, A1 = random_factors(40, 30, 4, seed=11)
    svd = lowrank_svd(B1, A1, 1.0, device=CPU)
    gen = torch.Generator().manual_seed(12)
    b = torch.randn(40, 1, generator=gen, dtype=torch.float64)
    a = torch.randn(1, 30, generator=gen, dtype=torch.float64)
    eps = 1e-9
    B2, A2 = torch.cat([B1, eps * b], 1), torch.cat([A1, a], 0)
    c = projection_coefficients(svd, B2, A2)
    rho = float(projection_residual(svd, B2, A2, c=c))
    tau2 = B2 @ A2
    reference = float(torch.linalg.matrix_norm(tau2 - (svd.U * c) @ svd.V.mT))
    assert rho == pytest.approx(reference, rel=1e-6)
    naive = math.sqrt(max(float(torch.linalg.matrix_norm(tau2)) ** 2 - float((c**2).sum()), 0.0))
    assert abs(naive - reference) > 100 * abs(rho - reference)


def _dense_objective(U, V, tau2, lam, objective):
    def f(S):
        res = np.linalg.norm((U * S) @ V.T - tau2)
        return (res if objective == "frobenius" else res**2) + lam * np.abs(S).sum()

    return f


@pytest.mark.parametrize("objective", ["frobenius", "squared"])
@pytest.mark.parametrize("lam", [0.0, 0.05, 0.2, 0.6])
def test_closed_form_minimises_the_dense_objective(objective, lam):
    B1, A1, s1, B2, A2, s2 = _pair(16, 12, 5, 5, seed=21, mix=0.7)
    svd = lowrank_svd(B1, A1, s1, device=CPU)
    S2 = project_spectrum(svd, B2, A2, s2, lam, objective).numpy()
    U, V = svd.U.numpy(), svd.V.numpy()
    f = _dense_objective(U, V, (s2 * B2 @ A2).numpy(), lam, objective)
    best = min(
        (minimize(f, x0, method="L-BFGS-B", bounds=[(0, None)] * 5, options={"ftol": 1e-15, "gtol": 1e-12})
         for x0 in (np.zeros(5), np.abs(projection_coefficients(svd, B2, A2, s2).numpy()))),
        key=lambda r: r.fun,
    )
    assert f(S2) <= best.fun + 1e-12
    np.testing.assert_allclose(S2, best.x, atol=1e-5)


def test_frobenius_threshold_is_lambda_times_the_optimal_residual():
    c = torch.tensor([[1.0, 0.5, 0.1, -0.3]], dtype=torch.float64)
    rho = torch.tensor([0.4], dtype=torch.float64)
    lam = 0.3
    S = solve_spectrum(c, rho, lam)
    R = math.sqrt(float(((S - c) ** 2).sum()) + 0.4**2)
    t = lam * R
    torch.testing.assert_close(S, (c - t).clamp(min=0))
    assert int((S > 0).sum()) == 2  # 0.1 < t: thresholded away
    torch.testing.assert_close(solve_spectrum(c, rho, lam, "squared"), (c - lam / 2).clamp(min=0))


def test_frobenius_solution_is_zero_from_lambda_one_and_scales_with_tau2():
    gen = torch.Generator().manual_seed(0)
    c = torch.randn(50, 6, generator=gen, dtype=torch.float64)
    rho = torch.rand(50, generator=gen, dtype=torch.float64)
    assert torch.all(solve_spectrum(c, rho, 1.0) == 0)
    # exact threshold for S2 = 0: lambda >= max c_i / ||tau2||
    norm = torch.sqrt((c**2).sum(-1) + rho**2)
    lam_zero = (c.max(-1).values / norm).clamp(min=0)
    assert torch.all(solve_spectrum(c, rho, float(lam_zero.max()) * 1.0001) == 0)
    torch.testing.assert_close(solve_spectrum(7.0 * c, 7.0 * rho, 0.3), 7.0 * solve_spectrum(c, rho, 0.3))


def test_degenerate_tau2_inside_the_span():
    c = torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64)
    zero = torch.tensor(0.0, dtype=torch.float64)
    torch.testing.assert_close(solve_spectrum(c, zero, 0.5), c)  # lambda * sqrt(2) < 1: S = c exactly
    S = solve_spectrum(c, zero, 0.9)
    value = float(inclusion_objective(S, c, zero, 0.9))
    grid = [float(inclusion_objective((c - t).clamp(min=0), c, zero, 0.9)) for t in np.linspace(0, 2, 2001)]
    assert value <= min(grid) + 1e-12


@pytest.mark.parametrize("objective", ["frobenius", "squared"])
@pytest.mark.parametrize("lam", [0.0, 0.15])
def test_adam_algorithm_1_reaches_the_closed_form(objective, lam):
    B1, A1, s1, B2, A2, s2 = _pair(10, 8, 4, 3, seed=31, mix=0.8)
    svd = lowrank_svd(B1, A1, s1, device=CPU)
    exact = project_spectrum(svd, B2, A2, s2, lam, objective)
    opts = {"lr": 0.1, "lr_decay": 0.997, "max_iter": 2500, "eps": 0.0, "seed": 1}
    by_adam = adam_inclusion(svd, B2, A2, s2, lam, objective, **opts)
    assert float(exact.max()) > 1.0 and float(exact.min()) == 0.0
    torch.testing.assert_close(by_adam, exact, rtol=0, atol=1e-4)
    S1, dense = adam_inclusion_dense(s1 * B1 @ A1, s2 * B2 @ A2, lam, objective, **opts)
    torch.testing.assert_close(S1, svd.S[:4], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dense, exact, rtol=0, atol=1e-4)


def test_adam_stops_on_the_loss_change_and_batches():
    c = torch.tensor([[0.5, -0.2], [0.1, 0.3]], dtype=torch.float64)
    rho = torch.tensor([0.1, 0.2], dtype=torch.float64)
    S = adam_spectrum(c, rho, lr=0.02, eps=1e-9, seed=3, lr_decay=0.999)
    torch.testing.assert_close(S, solve_spectrum(c, rho), rtol=0, atol=1e-3)
    with pytest.raises(ValueError, match="objective"):
        adam_spectrum(c, rho, objective="l2")


# -- adapters --------------------------------------------------------------------------------------


def _adapters():
    kinds = {"q": (24, 16), "v": (8, 16)}
    a = random_adapter("a", layers=3, kinds=kinds, r={"q": 4, "v": 3}, seed=1)
    b = random_adapter("b", layers=3, kinds=kinds, r={"q": 2, "v": 5}, seed=2)
    c = random_adapter("c", layers=[1, 2], kinds={"q": (24, 16)}, r=4, seed=3)
    return a, b, c


def test_inclusion_frame_matches_per_module_closed_form():
    a, b, _ = _adapters()
    frame = inclusion(a, b, device=CPU)
    assert list(frame.columns) == list(INCLUSION_COLUMNS)
    assert list(zip(frame.layer, frame.kind)) == [(0, "q"), (0, "v"), (1, "q"), (1, "v"), (2, "q"), (2, "v")]
    for row in frame.itertuples(index=False):
        m1, m2 = a.modules[ModuleKey(row.stack, row.layer, row.kind)], b.modules[ModuleKey(row.stack, row.layer, row.kind)]
        svd = lowrank_svd(m1.B, m1.A, m1.scale, device=CPU)
        S2 = project_spectrum(svd, m2.B, m2.A, m2.scale)
        assert row.rank == m1.rank == len(row.s1) == len(row.s2)
        np.testing.assert_allclose(row.s1, svd.S.numpy(), rtol=1e-12)
        np.testing.assert_allclose(row.s2, S2.numpy(), rtol=1e-12, atol=1e-15)
        s1, s2 = np.array(row.s1), np.array(row.s2)
        assert row.l1 == pytest.approx(np.abs(s1 - s2).sum())
        assert row.l2 == pytest.approx(np.linalg.norm(s1 - s2))
        assert row.rec == pytest.approx(np.minimum(s1 / s1.sum(), s2 / s2.sum()).sum())
        assert row.l1_normalized == pytest.approx(2 * (1 - row.rec))
        assert 0 <= row.h1 <= 1 and 0 <= row.h2 <= 1


def test_self_inclusion_and_asymmetry():
    a, b, _ = _adapters()
    own = inclusion(a, a, device=CPU)
    np.testing.assert_allclose(own.rec, 1.0, atol=1e-12)
    np.testing.assert_allclose(own.l1, 0.0, atol=1e-12)
    ab, ba = inclusion(a, b, device=CPU), inclusion(b, a, device=CPU)
    assert not np.allclose(ab.l1, ba.l1)


def test_inclusion_matrix_rows_project_columns_and_equal_frame_means():
    a, b, c = _adapters()
    mats = inclusion_matrices([a, b, c], device=CPU)
    M = mats["rec"]
    np.testing.assert_allclose(np.diag(M), 1.0, atol=1e-12)
    np.testing.assert_allclose(np.diag(mats["l1"]), 0.0, atol=1e-12)
    assert M[0, 1] == pytest.approx(inclusion(a, b, device=CPU).rec.mean())
    assert M[2, 0] == pytest.approx(inclusion(c, a, device=CPU).rec.mean())
    assert M[0, 1] != pytest.approx(M[1, 0])
    v = inclusion_matrix([a, b, c], metric="l1", kind="v", device=CPU)
    assert np.isnan(v[0, 2]) and v[0, 1] == pytest.approx(inclusion(a, b, kind=["v"], device=CPU).l1.mean())
    assert set(inclusion(a, b, kind="v", device=CPU).kind) == {"v"}
    with pytest.raises(ValueError, match="unknown inclusion metric"):
        inclusion_matrix([a, b], metric="cosine")


def test_lambda_sweep_like_table_6():
    a, b, _ = _adapters()
    sweep = lambda_sweep(a, b, lam=[0.0, 1e-3, 0.1, 0.5, 1.0], device=CPU)
    base = inclusion(a, b, device=CPU)
    assert sweep.loc[0, "rec"] == pytest.approx(base.rec.mean())
    assert sweep.loc[0, "l1"] == pytest.approx(base.l1.mean())
    last = sweep.iloc[-1]
    assert last.n_zero == last.n_modules == 6 and math.isnan(last.rec)
    assert last.l1 == pytest.approx(np.mean([sum(s) for s in base.s1]))
    assert list(sweep.n_zero) == sorted(sweep.n_zero)
    squared = lambda_sweep(a, b, lam=[0.01], objective="squared", device=CPU)
    assert squared.loc[0, "l1"] == pytest.approx(inclusion(a, b, lam=0.01, objective="squared", device=CPU).l1.mean())


def test_zero_adapters_give_nan_metrics_not_errors():
    a, b, _ = _adapters()
    a.modules[ModuleKey("model", 0, "q")].B = torch.zeros(24, 4)  # untrained LoRA: tau1 = 0
    b.modules[ModuleKey("model", 1, "q")].B = torch.zeros(24, 2)  # tau2 = 0
    frame = inclusion(a, b, device=CPU).set_index(["layer", "kind"])
    zero1 = frame.loc[(0, "q")]
    assert zero1["rank"] == 0 and zero1["s1"] == [] and math.isnan(zero1["rec"]) and zero1["l1"] == 0.0
    zero2 = frame.loc[(1, "q")]
    assert all(v == 0 for v in zero2["s2"]) and math.isnan(zero2["rec"])
    assert zero2["l1"] == pytest.approx(sum(zero2["s1"]))


def test_incompatible_shapes_and_no_common_module():
    a, _, _ = _adapters()
    other = random_adapter("other", layers=3, kinds={"q": (20, 16)}, r=4, seed=9)
    with pytest.raises(IncompatibleAdaptersError, match=r"'other'.*model\.0\.q.*20x16.*'a'.*24x16"):
        inclusion(a, other, device=CPU)
    disjoint = random_adapter("k_only", layers=3, kinds={"k": (8, 16)}, r=4, seed=9)
    assert inclusion(a, disjoint, device=CPU).empty


# -- t-tests (the paper's Table 5) -----------------------------------------------------------------


def test_ttest_matches_scipy_and_one_sided_halves():
    from scipy import stats

    rng = np.random.default_rng(0)
    x, y = rng.normal(0.64, 0.05, 64), rng.normal(0.60, 0.05, 64)
    out = ttest(x, y)
    ref = stats.ttest_ind(x, y)
    assert out["t"] == pytest.approx(ref.statistic) and out["p_two_sided"] == pytest.approx(ref.pvalue)
    assert out["t"] > 0 and out["p_greater"] == pytest.approx(ref.pvalue / 2)
    assert out["p_less"] == pytest.approx(1 - ref.pvalue / 2)
    paired = ttest(x, y, paired=True)
    assert paired["p_two_sided"] == pytest.approx(stats.ttest_rel(x, y).pvalue)
    with_nan = ttest(np.append(x, np.nan), y)
    assert with_nan["n_a"] == 64 and with_nan["t"] == pytest.approx(out["t"])
    with pytest.raises(ValueError, match="equal length"):
        ttest(x, y[:5], paired=True)


# -- command line ----------------------------------------------------------------------------------


def test_cli_inclusion_csv_and_json(tmp_path, capsys):
    import json

    import pandas as pd

    from geometry.cli import main
    from geometry.io.loader import load_adapter
    from tests.app_fixtures import write_adapter

    p1, p2 = write_adapter(tmp_path / "one", seed=1, layers=2), write_adapter(tmp_path / "two", seed=2, layers=2, r=3)
    assert main(["inclusion", str(p1), str(p2)]) == 0
    frame = pd.read_csv(__import__("io").StringIO(capsys.readouterr().out))
    for key in ("stack", "layer", "kind", "s1", "s2", "l1", "l2", "l1_normalized", "l2_normalized", "rec", "h1", "h2"):
        assert key in frame.columns
    expected = inclusion(load_adapter(p1), load_adapter(p2))
    assert len(frame) == len(expected) == 4
    np.testing.assert_allclose(frame.rec, expected.rec, rtol=1e-12)
    assert json.loads(frame.s2[0]) == pytest.approx(expected.s2[0], rel=1e-12)
    assert main(["inclusion", str(p1), str(p2), "--lambda", "0.05", "--format", "json", "--kind", "q"]) == 0
    records = json.loads(capsys.readouterr().out)
    by_lam = inclusion(load_adapter(p1), load_adapter(p2), lam=0.05, kind=["q"])
    assert [r["kind"] for r in records] == ["q", "q"]
    assert records[1]["s2"] == pytest.approx(by_lam.s2[1], rel=1e-12)


def test_cli_inclusion_errors_are_one_line(tmp_path, capsys):
    from geometry.cli import main
    from tests.app_fixtures import write_adapter

    p1 = write_adapter(tmp_path / "one", seed=1, layers=2)
    assert main(["inclusion", str(p1), str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "missing" in err and err.count("\n") == 1
    assert main(["inclusion", str(p1), str(p1), "--lambda", "-1"]) == 2
    assert "--lambda" in capsys.readouterr().err
    assert main(["inclusion", str(p1), str(p1), "--kind", "gate"]) == 2
    assert "share no LoRA module of kind gate" in capsys.readouterr().err


def test_real_qwen_adapters_with_different_ranks_match_dense(real_adapters_dir):
    """r12 -> r6 and back on the published Qwen2.5-0.5B adapters: closed form == dense clip(lstsq)."""
    from geometry.io.loader import load_adapter

    r12 = load_adapter(real_adapters_dir / "MatthewZhang473__LoRA_Qwen0.5B__r12_alpha32")
    r6 = load_adapter(real_adapters_dir / "MatthewZhang473__LoRA_Qwen0.5B__r6_alpha32")
    for ad1, ad2 in ((r12, r6), (r6, r12)):
        frame = inclusion(ad1, ad2, kind=["v"], device=CPU)
        assert len(frame) == 24 and set(frame["rank"]) == {ad1.config.r}
        assert frame.rec.between(0, 1).all() and frame.h1.between(0, 1).all()
        for layer in (0, 23):
            key = ModuleKey("model", layer, "v")
            tau1 = ad1.modules[key].dense().numpy()
            tau2 = ad2.modules[key].dense().numpy()
            U, S1, V = _dense_basis(tau1)
            c = np.einsum("mi,mn,ni->i", U, tau2, V)
            row = frame[frame.layer == layer].iloc[0]
            np.testing.assert_allclose(row.s1, S1, rtol=1e-9)
            np.testing.assert_allclose(row.s2, np.clip(c, 0, None), rtol=1e-8, atol=1e-12 * S1[0])


def test_compare_projections_like_table_5():
    from scipy import stats

    from geometry.analysis.stats import compare_projections

    a, b, _ = _adapters()
    c = random_adapter("c2", layers=3, kinds={"q": (24, 16), "v": (8, 16)}, r=4, seed=5)
    ab, ac = inclusion(a, b, device=CPU), inclusion(a, c, device=CPU)
    assert ac.rec.isna().sum() == 1  # one module whose c is all negative: S2 = 0, REC undefined, dropped
    out = compare_projections(ab, ac, "rec")
    assert out["n_b"] == 5
    assert out["p_two_sided"] == pytest.approx(stats.ttest_ind(ab.rec, ac.rec.dropna()).pvalue)
    paired = compare_projections(ab, ac.iloc[::-1], "rec", paired=True)  # matched on keys, not on row order
    keep = ac.rec.notna().to_numpy()
    assert paired["p_two_sided"] == pytest.approx(stats.ttest_rel(ab.rec[keep], ac.rec[keep]).pvalue)
    with pytest.raises(ValueError, match="no column 'cosine'"):
        compare_projections(ab, ac, "cosine")


def test_inclusion_tables_equal_pair_by_pair_with_one_decomposition_each(monkeypatch):
    """All ordered pairs from n decompositions (not n (n - 1)), equal to inclusion() per pair."""
    import geometry.analysis.inclusion as inc

    kinds = {"q": (24, 16), "v": (12, 16)}
    ads = [
        random_adapter("a", layers=3, kinds=kinds, r={"q": 4, "v": 3}, seed=1),
        random_adapter("b", layers=3, kinds=kinds, r={"q": 2, "v": 5}, seed=2),
        random_adapter("c", layers=[1, 2], kinds={"q": (24, 16)}, r=4, seed=3),
    ]
    calls = []
    real = inc.decompose_adapter
    monkeypatch.setattr(inc, "decompose_adapter", lambda ad, *a, **k: calls.append(ad.name) or real(ad, *a, **k))
    for lam in (0.0, 0.05):
        calls.clear()
        tables = inc.inclusion_tables(ads, lam=lam)
        assert sorted(calls) == ["a", "b", "c"]
        assert sorted(tables) == [(i, j) for i in range(3) for j in range(3) if i != j]
        for (i, j), table in tables.items():
            ref = inc.inclusion(ads[i], ads[j], lam=lam)
            pd.testing.assert_frame_equal(table.drop(columns=["s1", "s2"]), ref.drop(columns=["s1", "s2"]))
            for col in ("s1", "s2"):
                for x, y in zip(table[col], ref[col]):
                    np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-15)
