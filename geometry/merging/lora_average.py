"""LoRA-level average: average the factors, not the task vectors.

Reference: the task-vector geometry paper (TALN 2024, section on merging), which combines two LoRA
adapters of equal rank as ``((A1 + A2) / 2, (B1 + B2) / 2)``; peft's ``combination_type="linear"``
does the same with weights under a square root.

Formula (generalised to ``T`` adapters, weights ``w_t``, default ``1/T``, scales ``s_t``)::

    A = sum_t w_t sqrt(s_t) A_t,    B = sum_t w_t sqrt(s_t) B_t,    Delta = B @ A  (scale 1)

Each adapter's scale ``s_t`` (``alpha/r``, rsLoRA ``alpha/sqrt(r)``, per-module patterns) is folded
as ``sqrt(s_t)`` into *both* factors, so a single adapter with weight 1 gives back exactly
``s_1 B_1 A_1`` and adapters with different scales are handled exactly. This is **not** the average
of the task vectors: ``Delta = sum_t w_t^2 s_t B_t A_t + sum_{t != u} w_t w_u sqrt(s_t s_u) B_t A_u``;
for two adapters and ``w = 1/2`` it is ``(s1 B1A1 + s2 B2A2)/4 + sqrt(s1 s2)(B1 A2 + B2 A1)/4``: a
quarter of each task vector plus *cross terms* that belong to neither task.

Steps: check every adapter has the same module keys and the same rank per module; sum the scaled
factors per module on the merge device (:func:`~geometry.merging.base.merge_device`); store on the
CPU.

Limits: equal ranks per module only (:class:`IncompatibleAdaptersError` names the modules and
ranks otherwise); a negative weight flips both factors, so its diagonal term keeps a positive sign
(subtract with :mod:`task_arithmetic` instead; the same effect as peft issue #3004).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from geometry.errors import IncompatibleAdaptersError
from geometry.merging.base import (
    MergedAdapter,
    MergedModule,
    all_keys,
    check_mergeable,
    merge_device,
    stored,
    wrap,
)
from geometry.merging.weights import MergeWeights, WeightsSpec
from geometry.types import Adapter


def lora_average(
    adapters: Sequence[Adapter],
    weights: WeightsSpec = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> MergedAdapter:
    """Average the LoRA factors (``sqrt(s_t)`` folded into both); see the module docstring."""
    check_mergeable(adapters)
    dev = merge_device(device)
    keys = all_keys(adapters)
    missing = [(a.name, k.label) for a in adapters for k in keys if k not in a.modules]
    if missing:
        name, label = missing[0]
        raise IncompatibleAdaptersError(
            f"lora_average needs the same modules in every adapter: {name} has no module {label} "
            f"({len(missing)} missing in all); use task_arithmetic for adapters on different modules"
        )
    unequal = [(k, [a.modules[k].rank for a in adapters]) for k in keys]
    unequal = [(k, r) for k, r in unequal if len(set(r)) > 1]
    if unequal:
        shown = "; ".join(
            f"{k.label}: " + ", ".join(f"{a.name} r={r}" for a, r in zip(adapters, ranks)) for k, ranks in unequal[:3]
        )
        more = f" (and {len(unequal) - 3} more modules)" if len(unequal) > 3 else ""
        raise IncompatibleAdaptersError(
            f"lora_average needs equal ranks per module: {shown}{more}; use task_arithmetic for unequal ranks"
        )
    w = MergeWeights(weights, len(adapters), default=1.0 / len(adapters))
    modules: dict = {}
    for key in keys:
        wk = w.at(key)
        first = adapters[0].modules[key]
        A = torch.zeros(first.A.shape, dtype=torch.float64, device=dev)
        B = torch.zeros(first.B.shape, dtype=torch.float64, device=dev)
        for wt, ad in zip(wk, adapters):
            mod = ad.modules[key]
            root = math.sqrt(mod.scale)
            A += (wt * root) * mod.A.to(device=dev, dtype=torch.float64)
            B += (wt * root) * mod.B.to(device=dev, dtype=torch.float64)
        modules[key] = MergedModule(
            name=first.name, key=key, shape=first.shape, B=stored(B, dtype), A=stored(A, dtype),
            rows=first.rows,
            is_embedding=first.is_embedding, fan_in_fan_out=first.fan_in_fan_out,
            rank_sum=sum(ad.modules[key].rank for ad in adapters),
        )
    return wrap("lora_average", {"weights": w.describe()}, adapters, modules)
