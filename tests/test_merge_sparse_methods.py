"""Model Breadcrumbs and DELLA: masks against their definitions, merges against dense references."""

from __future__ import annotations

import pytest
import torch

from geometry.merging import merge
from geometry.merging.breadcrumbs import breadcrumb_mask
from geometry.merging.dare import mask_generator
from geometry.merging.della import keep_probabilities, magprune
from geometry.testing import random_adapter

KINDS = {"q": (20, 12), "v": (16, 12)}


def _adapters(ranks=(4, 3, 5), alphas=(8.0, 3.0, 20.0), layers=2):
    return [
        random_adapter(f"t{i}", layers=layers, kinds=KINDS, r=r, alpha=a, seed=40 + i, dtype=torch.float64)
        for i, (r, a) in enumerate(zip(ranks, alphas))
    ]


def _rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x - y).norm() / max(float(y.norm()), 1e-30))


# ------------------------------------------------------------------------------ Breadcrumbs
def test_breadcrumb_mask_keeps_the_band_below_the_outliers():
    tau = torch.tensor([[1.0, -10.0, 3.0, 7.0, -2.0], [9.0, 4.0, -6.0, 5.0, 8.0]], dtype=torch.float64)
    # 10 entries: drop the top 1 (|-10|), keep the next 4 (9, 8, 7, -6)
    mask = breadcrumb_mask(tau, density=0.4, gamma=0.1)
    kept = sorted(float(v) for v in (tau * mask)[mask.bool()])
    assert kept == [-6.0, 7.0, 8.0, 9.0]
    # per row (the authors' code): each row of 5 drops int(0.2 * 5) = 1 and keeps int(0.4 * 5) = 2
    rows = breadcrumb_mask(tau, density=0.4, gamma=0.2, per_row=True)
    assert (tau * rows).tolist() == [[0.0, 0.0, 3.0, 7.0, 0.0], [0.0, 0.0, -6.0, 0.0, 8.0]]


def test_breadcrumb_mask_without_outliers_keeps_the_top_density():
    """gamma * N < 1: no outlier removed (mergekit's slice keeps nothing there, see the docstring)."""
    tau = torch.arange(1.0, 11.0, dtype=torch.float64)[None]
    mask = breadcrumb_mask(tau, density=0.3, gamma=0.01)
    assert (tau * mask).nonzero()[:, 1].tolist() == [7, 8, 9]
    # density + gamma > 1: fewer outliers removed so that `density` is still kept
    assert int(breadcrumb_mask(tau, density=0.9, gamma=0.5).sum()) == 9


def _mergekit_magnitude_outliers(tensor, density, gamma):
    """mergekit 0.1.5 ``sparsify.magnitude_outliers`` (rescale off), for n_top > 0."""
    num = tensor.numel()
    target, n_top = int(density * num), int(gamma * num)
    n_bot = num - target - n_top
    indices = torch.sort(tensor.abs().view(-1), descending=False).indices
    mask = torch.zeros_like(tensor)
    mask.view(-1)[indices[n_bot:-n_top]] = 1
    return tensor * mask


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
def test_breadcrumbs_merge_equals_mergekit_formula(method):
    ads = _adapters()
    w = [0.7, -0.4, 1.3]
    m = merge(ads, method, weights=w, density=0.6, gamma=0.05, keep_dense=True, dtype=torch.float64)
    for key, mod in m.modules.items():
        deltas = torch.stack([wt * _mergekit_magnitude_outliers(ad.modules[key].dense(), 0.6, 0.05)
                              for wt, ad in zip(w, ads)])
        if method == "breadcrumbs":
            ref = deltas.sum(0)
        else:  # mergekit GTA: consensus "sum" on weighted deltas, normalize false
            majority = (deltas.sum(0) >= 0).to(deltas.dtype) * 2 - 1
            ref = (deltas * (deltas.sign() == majority)).sum(0)
        assert _rel(mod.delta, ref) < 1e-12
    assert m.params["density"] == 0.6 and m.params["gamma"] == 0.05


def test_breadcrumbs_bad_gamma():
    with pytest.raises(ValueError, match="gamma must be in"):
        merge(_adapters(layers=1), "breadcrumbs", gamma=1.0)


# ------------------------------------------------------------------------------ DELLA
def test_keep_probabilities_span_density_plus_minus_epsilon_by_row_rank():
    tau = torch.tensor([[0.1, -3.0, 2.0, 0.5, -1.0]], dtype=torch.float64)
    p = keep_probabilities(tau, density=0.5, epsilon=0.2)
    # ascending |tau|: 0.1, 0.5, -1, 2, -3  ->  u = 0, .25, .5, .75, 1
    assert p[0].tolist() == pytest.approx([0.3, 0.7, 0.6, 0.4, 0.5])
    assert float(p.mean()) == pytest.approx(0.5)
    one_col = keep_probabilities(torch.ones(3, 1, dtype=torch.float64), 0.5, 0.2)
    assert one_col.flatten().tolist() == [0.5, 0.5, 0.5]


def test_magprune_rescale_is_unbiased():
    gen = torch.Generator().manual_seed(0)
    tau = torch.randn(6, 8, generator=gen, dtype=torch.float64)
    mean = sum(magprune(tau, 0.4, 0.2, gen) for _ in range(4000)) / 4000
    assert _rel(mean, tau) < 0.05
    l1 = magprune(tau, 0.4, 0.2, torch.Generator().manual_seed(1), rescale="l1")
    assert float(l1.abs().sum()) == pytest.approx(float(tau.abs().sum()), rel=1e-12)


def _authors_della(taus, w, density, epsilon, gen, elect):
    """declare-lab/della: ``rank_magnitude`` (rows, 1/p rescale), then GTA with consensus sum, normalize."""
    out = []
    for tau in taus:
        ranks = torch.argsort(torch.argsort(tau.abs(), dim=1), dim=1).to(torch.float64) + 1
        lo, hi = ranks.min(1, keepdim=True).values, ranks.max(1, keepdim=True).values
        probs = (density - epsilon) + (ranks - lo) / (hi - lo) * 2 * epsilon
        out.append(tau * torch.bernoulli(probs, generator=gen) / probs)
    weights = torch.tensor(w, dtype=torch.float64).reshape(-1, 1, 1)
    weighted = torch.stack(out) * weights
    if not elect:
        return weighted.sum(0)
    sign = weighted.sign()
    majority = ((sign * weighted.abs()).sum(0) >= 0).to(weighted.dtype) * 2 - 1
    mask = sign == majority
    divisor = (weights * mask).sum(0)
    divisor[divisor == 0] = 1
    return (weighted * mask).sum(0) / divisor


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_equals_the_authors_formula_with_the_same_masks(method):
    ads = _adapters(ranks=(4, 2, 5))
    w = [0.5, 1.5, 1.0]
    m = merge(ads, method, weights=w, density=0.4, epsilon=0.1, seed=7, keep_dense=True, dtype=torch.float64,
              device="cpu")
    for key, mod in m.modules.items():
        taus = [ad.modules[key].dense() for ad in ads]
        ref = _authors_della(taus, w, 0.4, 0.1, mask_generator(7, key, torch.device("cpu")), method == "della")
        assert _rel(mod.delta, ref) < 1e-12, key
    again = merge(ads, method, weights=w, density=0.4, epsilon=0.1, seed=7, keep_dense=True, dtype=torch.float64)
    other = merge(ads, method, weights=w, density=0.4, epsilon=0.1, seed=8, keep_dense=True, dtype=torch.float64)
    key = next(iter(m.modules))
    assert torch.equal(again.modules[key].delta, m.modules[key].delta)
    assert not torch.equal(other.modules[key].delta, m.modules[key].delta)


def test_della_scaling_and_bad_epsilon():
    ads = _adapters(layers=1)
    a = merge(ads, "della", seed=1, keep_dense=True, dtype=torch.float64)
    b = merge(ads, "della", seed=1, scaling=0.5, keep_dense=True, dtype=torch.float64)
    for key in a.modules:
        assert _rel(b.modules[key].delta, 0.5 * a.modules[key].delta) < 1e-14
    with pytest.raises(ValueError, match="epsilon must keep density"):
        merge(ads, "della", density=0.5, epsilon=0.6)
    with pytest.raises(ValueError, match="rescale must be"):
        merge(ads, "della_linear", rescale="l2")
