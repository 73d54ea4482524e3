"""Factored maths equals dense maths: thin SVD, bases, norms, inner products, principal angles."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from geometry.linalg.factored import (
    diff_fro_norm,
    fro_inner,
    fro_norm,
    grassmann_from_angles,
    lowrank_svd,
    orthonormal_basis,
    principal_angles,
)
from geometry.testing import random_factors

CPU = torch.device("cpu")
# (m, n, r, rank_b, rank_a): square, rectangular both ways, rank-deficient B or A or both.
CASES = [
    (20, 20, 4, None, None),
    (30, 12, 5, None, None),
    (9, 40, 3, None, None),
    (25, 18, 6, 3, None),
    (25, 18, 6, None, 2),
    (16, 16, 5, 4, 3),
    (6, 30, 8, None, None),  # r > m: k = min(m, n, r)
]


def dense_basis(M: np.ndarray) -> np.ndarray:
    """Orthonormal basis of Im(M) from the dense SVD with the same rank rule."""
    U, S, _ = np.linalg.svd(M, full_matrices=False)
    if S.size == 0 or S[0] == 0:
        return U[:, :0]
    keep = S > max(M.shape) * np.finfo(np.float64).eps * S[0]
    return U[:, keep]


@pytest.mark.parametrize("m,n,r,rank_b,rank_a", CASES)
def test_lowrank_svd_matches_dense_svd(m, n, r, rank_b, rank_a):
    B, A = random_factors(m, n, r, seed=m * n + r, rank_b=rank_b, rank_a=rank_a)
    svd = lowrank_svd(B, A, 1.7, device=CPU)
    tau = 1.7 * (B @ A)
    S_dense = torch.linalg.svdvals(tau)
    expected_rank = min(x for x in (r, rank_b or r, rank_a or r, m, n))
    assert svd.rank == expected_rank
    k = svd.S.shape[0]
    torch.testing.assert_close(svd.S[: svd.rank], S_dense[: svd.rank], rtol=1e-12, atol=1e-14)
    assert torch.all(svd.S[svd.rank :] == 0) and k == min(m, n, r)
    torch.testing.assert_close(svd.dense(), tau, rtol=0, atol=1e-13)
    Uk = svd.U[:, : svd.rank]
    torch.testing.assert_close(Uk.mT @ Uk, torch.eye(svd.rank, dtype=torch.float64), rtol=0, atol=1e-13)
    # Same column space as the dense SVD: principal angles all ~0.
    angles = scipy.linalg.subspace_angles(Uk.numpy(), dense_basis(tau.numpy()))
    assert angles.max() < 1e-10
    assert torch.all(svd.U[:, svd.rank :] == 0) and torch.all(svd.V[:, svd.rank :] == 0)


def test_lowrank_svd_batched_with_per_layer_scales_and_ranks():
    Bs, As = zip(*(random_factors(14, 11, 4, seed=i, rank_b=(2 if i == 1 else None)) for i in range(3)))
    B, A = torch.stack(Bs), torch.stack(As)
    scales = torch.tensor([0.5, 2.0, -3.0], dtype=torch.float64)
    svd = lowrank_svd(B, A, scales, device=CPU)
    assert svd.rank.tolist() == [4, 2, 4]
    for i in range(3):
        one = lowrank_svd(B[i], A[i], float(scales[i]), device=CPU)
        torch.testing.assert_close(svd.S[i], one.S, rtol=1e-13, atol=1e-15)
        torch.testing.assert_close(svd.dense()[i], scales[i] * B[i] @ A[i], rtol=0, atol=1e-13)


def test_lowrank_svd_zero_matrix_has_rank_zero():
    svd = lowrank_svd(torch.zeros(5, 3), torch.randn(3, 4), device=CPU)
    assert svd.rank == 0 and torch.all(svd.S == 0) and torch.all(svd.U == 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_inputs_compared_with_dense_of_the_same_rounded_values(dtype):
    B, A = random_factors(24, 17, 5, seed=3, dtype=dtype)
    svd = lowrank_svd(B, A, 2.0, device=CPU)
    assert svd.S.dtype == torch.float64
    tau = 2.0 * (B.double() @ A.double())
    torch.testing.assert_close(svd.S, torch.linalg.svdvals(tau)[:5], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("m,n,r,rank_b,rank_a", CASES)
def test_orthonormal_basis_spans_the_column_space(m, n, r, rank_b, rank_a):
    B, A = random_factors(m, n, r, seed=7, rank_b=rank_b, rank_a=rank_a)
    for M in (B, A.mT):
        Q, rank = orthonormal_basis(M, device=CPU)
        ref = dense_basis(M.numpy())
        assert rank == ref.shape[1]
        assert scipy.linalg.subspace_angles(Q[:, :rank].numpy(), ref).max() < 1e-10
        assert torch.all(Q[:, rank:] == 0)


def test_norms_and_inner_products_match_dense():
    B1, A1 = random_factors(30, 20, 4, seed=1)
    B2, A2 = random_factors(30, 20, 6, seed=2, rank_a=3)
    t1, t2 = 1.5 * B1 @ A1, -0.25 * B2 @ A2
    torch.testing.assert_close(fro_norm(B1, A1, 1.5, device=CPU), torch.linalg.matrix_norm(t1), rtol=1e-13, atol=0)
    torch.testing.assert_close(fro_inner(B1, A1, 1.5, B2, A2, -0.25, device=CPU), (t1 * t2).sum(), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(
        diff_fro_norm(B1, A1, 1.5, B2, A2, -0.25, device=CPU), torch.linalg.matrix_norm(t1 - t2), rtol=1e-12, atol=0
    )


def test_difference_norm_has_no_cancellation_for_nearby_task_vectors():
    B, A = random_factors(40, 30, 4, seed=5)
    dB = torch.zeros_like(B)
    dB[0, 0] = 1e-9
    exact = torch.linalg.matrix_norm(dB @ A)  # tau1 - tau2 = dB @ A exactly
    got = diff_fro_norm(B + dB, A, 1.0, B, A, 1.0, device=CPU)
    assert abs(float(got / exact) - 1) < 1e-6
    assert float(diff_fro_norm(B, A, 1.0, B, A, 1.0, device=CPU)) < 1e-14 * float(fro_norm(B, A, device=CPU))


def subspaces_with_known_angles(m, k1, k2, angles, seed):
    """Q1 = R [e_1..e_k1], Q2 = R [cos t_i e_i + sin t_i e_(k1+i)] (+ extra e's) for a random rotation R."""
    g = torch.Generator().manual_seed(seed)
    R = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))[0]
    E = torch.eye(m, dtype=torch.float64)
    Q1 = E[:, :k1]
    cols = [math.cos(t) * E[:, i] + math.sin(t) * E[:, k1 + i] for i, t in enumerate(angles)]
    cols += [E[:, k1 + len(angles) + j] for j in range(k2 - len(angles))]
    Q2 = torch.stack(cols, 1)
    mix = torch.linalg.qr(torch.randn(k2, k2, generator=g, dtype=torch.float64))[0]
    return R @ Q1, R @ Q2 @ mix


@pytest.mark.parametrize("k1,k2", [(4, 4), (3, 6), (6, 3), (5, 1)])
def test_principal_angles_match_known_angles_small_and_large(k1, k2):
    p = min(k1, k2)
    angles = [1e-9, 1e-5, 0.7, 1.3, 1.5707, 0.2][:p]
    X, Y = subspaces_with_known_angles(30, k1, k2, angles, seed=k1 * 10 + k2) if k1 >= k2 else (None, None)
    if k1 < k2:  # build with the roles swapped
        Y, X = subspaces_with_known_angles(30, k2, k1, angles, seed=k1 * 10 + k2)
    Q1, r1 = orthonormal_basis(X, device=CPU)
    Q2, r2 = orthonormal_basis(Y, device=CPU)
    theta, got_p = principal_angles(Q1, r1, Q2, r2)
    assert int(got_p) == p
    np.testing.assert_allclose(theta[:p].numpy(), np.sort(angles), rtol=1e-6, atol=1e-15)
    # Large angles agree with scipy as well (its small-angle branch is not a reference).
    ref = np.sort(scipy.linalg.subspace_angles(X.numpy(), Y.numpy()))
    big = ref > 0.1
    np.testing.assert_allclose(theta[:p].numpy()[big], ref[big], rtol=1e-10)


def test_principal_angles_rank_deficient_padded_bases_and_self_distance():
    X = torch.randn(20, 5, dtype=torch.float64)
    X[:, 4] = X[:, 0]  # rank 4 of 5
    Q, rank = orthonormal_basis(X, device=CPU)
    assert rank == 4
    theta, p = principal_angles(Q, rank, Q, rank)
    assert int(p) == 4 and float(theta.abs().max()) < 1e-7
    assert float(grassmann_from_angles(theta, rank, rank)) < 1e-7
    # A subspace of Im(X) (rank 2): distance 0 by the default convention, sqrt(2) * pi / 2 padded.
    Q2, r2 = orthonormal_basis(X[:, :2] @ torch.randn(2, 3, dtype=torch.float64), device=CPU)
    theta, p = principal_angles(Q, rank, Q2, r2)
    assert int(p) == 2 and float(grassmann_from_angles(theta, rank, r2)) < 1e-7
    padded = float(grassmann_from_angles(theta, rank, r2, pad=True))
    assert abs(padded - math.sqrt(2) * math.pi / 2) < 1e-7


def test_principal_angles_batched_with_different_ranks_per_item():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(3, 18, 4, generator=g, dtype=torch.float64)
    Y = torch.randn(3, 18, 4, generator=g, dtype=torch.float64)
    X[1, :, 3] = X[1, :, 0]
    Y[2, :, 2:] = 0.0
    Q1, r1 = orthonormal_basis(X, device=CPU)
    Q2, r2 = orthonormal_basis(Y, device=CPU)
    theta, p = principal_angles(Q1, r1, Q2, r2)
    assert p.tolist() == [4, 3, 2]
    for i in range(3):
        ref = np.sort(scipy.linalg.subspace_angles(X[i].numpy(), Y[i].numpy()))
        np.testing.assert_allclose(theta[i, : int(p[i])].numpy(), ref, rtol=1e-9, atol=1e-12)
        assert torch.all(theta[i, int(p[i]) :] == 0)


@pytest.mark.parametrize("pad", [False, True])
def test_grassmann_distance_to_the_zero_subspace_is_undefined(pad):
    """A zero matrix (B = 0) spans the zero subspace: no principal angle, NaN (not 0, not sqrt(r) pi / 2)."""
    g = torch.Generator().manual_seed(1)
    X = torch.randn(2, 12, 3, generator=g, dtype=torch.float64)
    Y = torch.randn(2, 12, 3, generator=g, dtype=torch.float64)
    X[1] = 0.0
    Q1, r1 = orthonormal_basis(X, device=CPU)
    Q2, r2 = orthonormal_basis(Y, device=CPU)
    theta, p = principal_angles(Q1, r1, Q2, r2)
    assert r1.tolist() == [3, 0] and p.tolist() == [3, 0]
    d = grassmann_from_angles(theta, r1, r2, pad=pad)
    assert math.isfinite(float(d[0])) and math.isnan(float(d[1]))
