"""Spectrum metrics: L_p (raw / normalised), REC, normalised entropy, effective and stable rank."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from geometry.linalg.spectra import effective_rank, entropy, lp, rec, shannon_entropy, stable_rank

RNG = np.random.default_rng(0)


def test_rec_of_a_spectrum_with_itself_and_with_a_multiple_is_one():
    S = RNG.random((5, 8))
    np.testing.assert_allclose(rec(S, S), 1.0, atol=1e-15)
    np.testing.assert_allclose(rec(S, 3.7 * S), 1.0, atol=1e-15)


def test_rec_equals_its_l1_form_and_the_min_form():
    S1, S2 = RNG.random((20, 8)), RNG.random((20, 8))
    S2[:, 5:] = 0.0
    by_min = np.array([np.minimum(a / a.sum(), b / b.sum()).sum() for a, b in zip(S1, S2)])
    np.testing.assert_allclose(rec(S1, S2), by_min, rtol=1e-14)
    np.testing.assert_allclose(rec(S1, S2), 1 - lp(S1, S2, 1, normalized=True) / 2, rtol=1e-14)
    assert np.all((rec(S1, S2) >= 0) & (rec(S1, S2) <= 1))


def test_rec_is_zero_for_disjoint_axes_and_nan_for_a_zero_spectrum():
    assert rec([1.0, 0.0], [0.0, 2.0]) == 0.0
    assert math.isnan(float(rec([1.0, 2.0], [0.0, 0.0])))


def test_lp_raw_and_normalized():
    S1, S2 = np.array([3.0, 1.0, 0.0]), np.array([1.0, 1.0, 2.0])
    assert lp(S1, S2, 1) == pytest.approx(4.0)
    assert lp(S1, S2, 2) == pytest.approx(math.sqrt(8.0))
    assert lp(S1, S2, np.inf) == pytest.approx(2.0)
    assert lp(S1, S2, 1, normalized=True) == pytest.approx(abs(0.75 - 0.25) + 0 + 0.5)
    with pytest.raises(ValueError, match="different lengths"):
        lp(S1, S2[:2])


def test_metrics_accept_torch_tensors_and_batch_over_leading_axes():
    S1 = torch.rand(3, 4, 6, dtype=torch.float64)
    S2 = torch.rand(3, 4, 6, dtype=torch.float64)
    out = rec(S1, S2)
    assert out.shape == (3, 4)
    np.testing.assert_allclose(out[1, 2], rec(S1[1, 2].numpy(), S2[1, 2].numpy()))


def test_entropy_bounds_uniform_dirac_zeros_and_n_equal_one():
    assert entropy(np.ones(8)) == pytest.approx(1.0)
    assert entropy([0, 0, 5.0, 0]) == 0.0
    two_axes = entropy([1.0, 1.0, 0, 0, 0, 0, 0, 0])
    assert two_axes == pytest.approx(math.log(2) / math.log(8))
    H = entropy(RNG.random((100, 8)))
    assert np.all((H >= 0) & (H <= 1))
    assert entropy([2.5]) == 0.0
    assert math.isnan(float(entropy([0.0, 0.0])))


def test_entropy_matches_scipy():
    from scipy.stats import entropy as scipy_entropy

    S = RNG.random(7)
    assert shannon_entropy(S) == pytest.approx(scipy_entropy(S))
    assert entropy(S) == pytest.approx(scipy_entropy(S) / math.log(7))


def test_effective_and_stable_rank():
    assert effective_rank(np.ones(5)) == pytest.approx(5.0)
    assert effective_rank([4.0, 0, 0]) == pytest.approx(1.0)
    S = np.array([3.0, 2.0, 1.0])
    assert stable_rank(S) == pytest.approx((9 + 4 + 1) / 9)
    tau = RNG.standard_normal((9, 6))
    sv = np.linalg.svd(tau, compute_uv=False)
    assert stable_rank(sv) == pytest.approx(np.linalg.norm(tau, "fro") ** 2 / np.linalg.norm(tau, 2) ** 2)
    assert math.isnan(float(stable_rank([0.0, 0.0])))


def test_entropy_with_an_explicit_count_ignores_zero_padding():
    S = np.array([[3.0, 1.0, 2.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0, 0.0], [7.0, 0, 0, 0, 0]])
    H = entropy(S, n=np.array([3, 2, 1]))
    assert H[0] == pytest.approx(float(entropy(S[0, :3])))
    assert H[1] == pytest.approx(1.0)
    assert H[2] == 0.0
    assert math.isnan(float(entropy([0.0, 0.0], n=0)))
