"""mergekit's generalized task arithmetic, as a mergekit recipe means it (the recipe runner's engine).

Reference: mergekit (``arcee-ai/mergekit``, LGPL-3.0) ``merge_methods/generalized_task_arithmetic.py``,
``sparsify.py`` and ``merge_methods/registry.py``, as released in v0.1.5 on PyPI (pinned for the tests,
which compare with its own ``sparsify``; an older main, commit ``a6e4028``, kept no entry in
``magnitude_outliers`` when ``gamma * numel < 1``: 0.1.5 fixed that, and this follows 0.1.5). mergekit runs ``task_arithmetic``, ``ties``, ``dare_ties``, ``dare_linear``,
``breadcrumbs``, ``breadcrumbs_ties``, ``della`` and ``della_linear`` through one routine, per tensor,
on the dense task vectors ``tau_t = theta_t - theta_0`` (here ``s_t B_t A_t``, one module at a time):

1. **Sparsify** each ``tau_t`` with its own ``density`` ``d_t`` (``>= 1``: untouched):
   ``magnitude`` keeps the ``max(1, floor(d_t numel))`` largest ``|tau|`` (ties); ``random`` keeps each entry
   with probability ``d_t`` (dare_*); ``magnitude_outliers`` keeps the ``floor(d_t numel)`` entries
   after the top ``floor(gamma numel)`` (fewer outliers dropped when needed) (breadcrumbs*); ``della_magprune`` keeps entry ``(i, j)`` with
   probability ``d_t - eps + 2 eps r_ij`` where ``r_ij`` is its magnitude rank in row ``i`` scaled to
   [0, 1] (della*). With ``rescale`` the kept entries are multiplied by ``||tau||_1 / ||kept||_1``
   (mergekit's L1 rescale, *not* the papers' ``1/d``; on by default for dare_* and della*).
2. **Weight**: ``x_t = w_t hat tau_t``.
3. **Consensus** (ties, dare_ties, breadcrumbs_ties, della): ``gamma = sign(sum_t x_t)`` (``+1`` at
   0); ``M_t = [sign(x_t) = gamma]``; ``Delta = sum_t M_t x_t``, divisor ``sum_t M_t w_t`` (1 where 0).
   Without: ``Delta = sum_t x_t``, divisor ``sum_t w_t`` (1 where ``|.| < 1e-8``).
4. ``normalize`` (default on for ties and della only): ``Delta /= divisor``; then ``Delta *= lambda``.

How this differs from the project's own methods of the same names (:mod:`geometry.merging.ties`,
``dare``, ``breadcrumbs``, ``della``): the election uses the *weighted* vectors and the mean divides by
the agreeing weights (so a common weight cancels and ``lambda`` scales); DARE rescales by the L1
ratio, not ``1/density``; dare_ties does not divide unless ``normalize``. A recipe is run with
mergekit's meaning, whatever the project's defaults.

Parameters may differ per module: each is a :data:`Setting` (a number, a per-layer gradient, or a
list of ``{filter, value}``), resolved by :func:`evaluate_setting` exactly as mergekit's
``config.evaluate_setting`` does, with ``t = layer / (L - 1)`` (``L``: one more than the highest layer
the adapters touch; mergekit uses the base's layer count, the same when the adapters reach the last
layer) and ``t = 0`` outside the repeated blocks. Random masks use a generator seeded per module
(:func:`geometry.merging.elementwise.module_seed`), so a recipe replays to the same bytes; mergekit
draws from torch's global generator, so its masks differ from run to run.

Limits: ``int8_mask`` only changes mergekit's mask dtype (accepted, no effect here).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from geometry.errors import MergeParameterError
from geometry.merging.base import MergedAdapter
from geometry.merging.elementwise import elementwise_merge, module_seed
from geometry.merging.recipe import GTA_METHODS, TENSOR_PARAMS
from geometry.types import Adapter, ModuleKey

Setting = Any  # a number, a list of numbers (gradient over layers), or a list of {"filter", "value"}


def evaluate_setting(setting: Setting, tensor_name: str, t: float) -> Any:
    """mergekit's ``evaluate_setting``: a scalar as is, a numeric list interpolated at ``t`` in [0, 1],
    a list of ``{filter, value}`` the first whose ``filter`` is ``None``, ``"*"`` or a substring of
    ``tensor_name`` (``None`` when none matches)."""
    if isinstance(setting, (bool, int, float, str)):
        return setting
    if isinstance(setting, Sequence):
        if all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
            scaled = t * (len(setting) - 1)
            i0 = int(scaled)
            i1 = min(len(setting) - 1, i0 + 1)
            frac = scaled - i0
            return (1 - frac) * setting[i0] + frac * setting[i1]
        if all(isinstance(e, (bool, int, float, str)) for e in setting):
            return setting[int(t * (len(setting) - 1))]
        for cond in setting:
            filt = cond.get("filter")
            if filt is None or filt == "*" or (tensor_name and filt in tensor_name):
                return evaluate_setting(cond["value"], tensor_name, t)
        return None
    raise MergeParameterError(f"unexpected parameter setting {setting!r}: a number, a list of numbers or a "
                              "list of {filter, value}")


# ------------------------------------------------------------------------------ sparsification
def _rescaled(tau: torch.Tensor, mask: torch.Tensor, rescale: bool, eps: float = 1e-7) -> torch.Tensor:
    masked = tau * mask
    if not rescale:
        return masked
    before, after = tau.abs().sum(), masked.abs().sum()
    if before < eps or after < eps:
        return masked
    return masked * (before / after)


def sparsify(tau: torch.Tensor, density: float, method: str, *, rescale: bool = False, gamma: float = 0.01,
             epsilon: float = 0.15, generator: torch.Generator | None = None) -> torch.Tensor:
    """One task vector sparsified as mergekit's ``sparsify`` does (see the module docstring)."""
    if density >= 1:
        return tau
    n = tau.numel()
    flat = tau.reshape(-1)
    if method == "magnitude":
        if density <= 0 or n == 0:
            return torch.zeros_like(tau)
        k = max(1, int(density * n))
        mask = torch.zeros_like(flat)
        mask[torch.argsort(flat.abs().float(), descending=True)[:k]] = 1
        return _rescaled(tau, mask.reshape_as(tau), rescale)
    if method == "magnitude_outliers":
        target, n_top = int(density * n), int(gamma * n)
        n_bot = max(0, n - target - n_top)  # fewer outliers removed when needed to keep the target count
        order = torch.sort(flat.abs().float(), descending=False).indices
        mask = torch.zeros_like(flat)
        mask[order[n_bot:n_bot + target]] = 1
        return _rescaled(tau, mask.reshape_as(tau), rescale)
    if method == "random":
        prob = torch.full(tau.shape, density, dtype=torch.float32, device=tau.device)
        mask = torch.bernoulli(prob, generator=generator).to(tau.dtype)
        return _rescaled(tau, mask, rescale)
    if method == "della_magprune":
        if density <= 0:
            return torch.zeros_like(tau)
        if density + epsilon >= 1 or density - epsilon <= 0:
            raise MergeParameterError(f"della: density {density} +/- epsilon {epsilon} must stay in (0, 1)")
        rows = tau if tau.dim() >= 2 else tau.unsqueeze(0)
        ranks = torch.argsort(rows.abs(), dim=1, descending=False).argsort(dim=1).to(torch.float32) + 1
        lo, hi = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
        rank_norm = ((ranks - lo) / (hi - lo)).clamp(0, 1)
        probs = (density - epsilon) + rank_norm * 2 * epsilon
        mask = torch.bernoulli(probs, generator=generator).to(tau.dtype)
        return _rescaled(rows, mask, rescale).reshape(tau.shape)
    raise MergeParameterError(f"unknown sparsification {method!r}")


def gta_tensors(taus: torch.Tensor, params: Sequence[Mapping[str, float]], method: str, *, normalize: bool,
                rescale: bool, scale: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """mergekit's generalized task arithmetic of stacked ``taus (T, m, n)`` with per-task parameters
    ``params[t]`` (``weight``, ``density``, ``gamma``, ``epsilon``); see the module docstring."""
    spars, consensus, _, _ = GTA_METHODS[method]
    deltas = torch.stack([
        sparsify(tau, float(p.get("density", 1.0)), spars, rescale=rescale, gamma=float(p.get("gamma", 0.01)),
                 epsilon=float(p.get("epsilon", 0.15)), generator=generator) if spars else tau
        for tau, p in zip(taus, params)
    ])
    w = torch.tensor([float(p["weight"]) for p in params], dtype=deltas.dtype, device=deltas.device)
    w = w.reshape(-1, *([1] * (deltas.dim() - 1)))
    deltas = deltas * w
    if consensus:
        sign = deltas.sign()
        majority = torch.where(deltas.sum(dim=0) >= 0, 1.0, -1.0).to(deltas.dtype)
        mask = (sign == majority).to(deltas.dtype)
        mixed = (deltas * mask).sum(dim=0)
        divisor = (w * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = w.sum(dim=0).expand_as(mixed).clone()
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    if scale != 1:
        mixed = mixed * scale
    return mixed


def layer_count(adapters: Sequence[Adapter]) -> int:
    """One more than the highest block index the adapters touch (``L`` of ``t = layer / (L - 1)``)."""
    layers = [k.layer for a in adapters for k in a.modules if k.layer >= 0]
    return max(layers) + 1 if layers else 1


def mergekit_gta(
    adapters: Sequence[Adapter],
    method: str,
    model_params: Sequence[Mapping[str, Setting]],
    shared: Mapping[str, Setting] | None = None,
    *,
    seed: int = 0,
    rank: int | None = None,
    keep_dense: bool = False,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> MergedAdapter:
    """Run mergekit's ``method`` on the adapters: ``model_params[t]`` are model ``t``'s ``parameters``
    (settings), ``shared`` the recipe's top-level ``parameters`` (defaults for every model, and
    ``normalize`` / ``rescale`` / ``lambda``). The result's ``method`` is ``"mergekit:<method>"``."""
    if method not in GTA_METHODS:
        raise MergeParameterError(f"mergekit method {method!r} is not a generalized task arithmetic method "
                                  f"({', '.join(GTA_METHODS)})")
    shared = dict(shared or {})
    if len(model_params) != len(adapters):
        raise MergeParameterError(f"{len(model_params)} model parameter sets for {len(adapters)} adapters")
    _, _, default_normalize, default_rescale = GTA_METHODS[method]
    names = TENSOR_PARAMS[method]
    n_layers = layer_count(adapters)
    shared_values = {}
    for name, default in (("normalize", default_normalize), ("rescale", default_rescale), ("lambda", 1.0)):
        value = shared.get(name, default)
        if not isinstance(value, (bool, int, float)):
            raise MergeParameterError(f"parameters.{name}: a {type(value).__name__} where mergekit takes one "
                                      "value for the whole merge")
        shared_values[name] = value

    def resolve(t_index: int, key: ModuleKey, module_name: str) -> dict[str, float]:
        t = key.layer / (n_layers - 1) if key.layer >= 0 and n_layers > 1 else 0.0
        out = {}
        for name, default in names.items():
            setting = model_params[t_index].get(name, shared.get(name, default))
            value = evaluate_setting(setting, module_name, t) if setting is not None else None
            if value is None:
                value = default
            if value is None:
                raise MergeParameterError(f"models[{t_index}] ({adapters[t_index].name}): mergekit's {method} needs "
                                          f"'{name}' at {module_name}, and none is given")
            out[name] = float(value)
        return out

    def combine(taus: torch.Tensor, _w: torch.Tensor, key: ModuleKey) -> torch.Tensor:
        present = [i for i, a in enumerate(adapters) if key in a.modules]
        names_here = [adapters[i].modules[key].name for i in present]
        params = [resolve(i, key, nm) for i, nm in zip(present, names_here)]
        gen = torch.Generator(device=taus.device).manual_seed(module_seed(seed, key))
        return gta_tensors(taus, params, method, normalize=bool(shared_values["normalize"]),
                           rescale=bool(shared_values["rescale"]), scale=float(shared_values["lambda"]),
                           generator=gen)

    record = {"models": [dict(p) for p in model_params], "parameters": shared, "seed": int(seed)}
    merged = elementwise_merge(f"mergekit:{method}", adapters, None, 1.0, combine, record,
                               rank=rank, keep_dense=keep_dense, dtype=dtype, device=device)
    merged.params.pop("weights", None)
    return merged
