"""The paper's Algorithm 1 (Adam on the projected spectrum ``S2``), kept as a cross-check of the closed form of
:mod:`geometry.analysis.inclusion`: the tests show that Adam converges to :func:`~geometry.analysis.inclusion.solve_spectrum`
(and where the paper's iterates, e.g. at ``lambda = 1``, had not reached that optimum)."""

from __future__ import annotations

import math

import torch

from geometry.analysis.inclusion import (
    Objective,
    _check_objective,
    inclusion_objective,
    projection_coefficients,
    projection_residual,
)
from geometry.linalg.factored import LowRankSVD


def _adam_loop(loss_fn, shape, device, lr, eps, max_iter, seed, project, lr_decay) -> torch.Tensor:
    """Algorithm 1: ``S ~ N(0, 1)``; repeat: loss, stop when ``|L_t - L_{t+1}| <= eps``, else an Adam step.

    ``project`` clamps ``S`` to ``>= 0`` after each step (the feasible set of eq. 3, which the
    printed algorithm leaves implicit); ``lr_decay`` multiplies the learning rate after each step
    (1.0 is the paper's constant rate; a decay lets Adam settle closer to the optimum).
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    S = torch.randn(shape, generator=gen, dtype=torch.float64).to(device)
    if project:
        S = S.clamp(min=0.0)
    S.requires_grad_(True)
    opt = torch.optim.Adam([S], lr=lr)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=lr_decay)
    previous = math.inf
    for _ in range(max_iter):
        opt.zero_grad()
        loss = loss_fn(S)
        current = float(loss.detach())
        if abs(previous - current) <= eps:
            break
        loss.backward()
        opt.step()
        sched.step()
        if project:
            with torch.no_grad():
                S.clamp_(min=0.0)
        previous = current
    return S.detach()


def adam_spectrum(
    c: torch.Tensor,
    rho: torch.Tensor | float,
    lam: float = 0.0,
    objective: Objective = "frobenius",
    *,
    lr: float = 1e-2,
    eps: float = 1e-12,
    max_iter: int = 20000,
    seed: int = 0,
    project: bool = True,
    lr_decay: float = 1.0,
) -> torch.Tensor:
    """Algorithm 1 in the ``r``-dimensional coordinates ``(c, rho)`` (no ``m x n`` matrix), batched.

    The loss summed over the batch is minimised; the modules do not interact (Adam is per entry).
    """
    _check_objective(objective)
    c = c.to(torch.float64)
    rho = torch.as_tensor(rho, dtype=torch.float64, device=c.device).expand(c.shape[:-1])
    return _adam_loop(
        lambda S: inclusion_objective(S, c, rho, lam, objective).sum(),
        c.shape, c.device, lr, eps, max_iter, seed, project, lr_decay,
    )


def adam_inclusion(
    svd1: LowRankSVD,
    B2: torch.Tensor,
    A2: torch.Tensor,
    scale2: float | torch.Tensor = 1.0,
    lam: float = 0.0,
    objective: Objective = "frobenius",
    **adam_kwargs,
) -> torch.Tensor:
    """``S2`` of ``tau1 -> tau2`` by Adam (Algorithm 1), the loss computed from factored ``c`` and ``rho``."""
    c = projection_coefficients(svd1, B2, A2, scale2)
    rho = projection_residual(svd1, B2, A2, scale2, c=c)
    S2 = adam_spectrum(c, rho, lam, objective, **adam_kwargs)
    return torch.where(svd1.mask, S2, torch.zeros_like(S2))


def adam_inclusion_dense(
    tau1: torch.Tensor,
    tau2: torch.Tensor,
    lam: float = 0.0,
    objective: Objective = "frobenius",
    rank: int | None = None,
    **adam_kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 1 on dense matrices, as printed (for small tests): returns ``(S1, S2)``.

    ``U, S1, V^T = SVD(tau1)`` truncated to ``rank`` (default: the numerical rank); the loss is
    ``||U diag(S2) V^T - tau2||_F (^2) + lam ||S2||_1`` on the ``m x n`` matrices.
    """
    _check_objective(objective)
    tau1 = tau1.to(torch.float64)
    tau2 = tau2.to(device=tau1.device, dtype=torch.float64)
    U, S1, Vh = torch.linalg.svd(tau1, full_matrices=False)
    if rank is None:
        tol = max(tau1.shape) * torch.finfo(torch.float64).eps * float(S1[0]) if S1.numel() else 0.0
        rank = int((S1 > tol).sum())
    U, S1, Vh = U[:, :rank], S1[:rank], Vh[:rank]

    def loss(S: torch.Tensor) -> torch.Tensor:
        sq = ((U * S) @ Vh - tau2).pow(2).sum()
        fit = torch.sqrt(sq) if objective == "frobenius" else sq
        return fit + lam * S.abs().sum()

    return S1, _adam_loop(loss, S1.shape, tau1.device, **_adam_defaults(adam_kwargs))


def _adam_defaults(kwargs: dict) -> dict:
    out = {"lr": 1e-2, "eps": 1e-12, "max_iter": 20000, "seed": 0, "project": True, "lr_decay": 1.0}
    unknown = set(kwargs) - set(out)
    if unknown:
        raise TypeError(f"unknown Adam options: {sorted(unknown)}")
    out.update(kwargs)
    return out
