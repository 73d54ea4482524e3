"""Coefficients of the applied updates: one number, one per task, per task and layer, or a callable."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from geometry.errors import AtlasError

Coefficients = None | float | torch.Tensor | Sequence[Any] | Callable[[int, str, int], Any]

# ---------------------------------------------------------------------------------------------- coefficients
def _coefficient(coefficients: Coefficients, t: int, n_tasks: int, name: str, layer: int) -> Any:
    """Coefficient of task ``t`` for module ``name`` (block ``layer``): a float, or a 0-arg callable giving
    a 0-d tensor at each forward when it requires grad."""
    if coefficients is None:
        return 1.0
    if callable(coefficients) and not isinstance(coefficients, torch.Tensor):
        value = coefficients(t, name, layer)
        if isinstance(value, torch.Tensor) and value.requires_grad:
            return lambda: coefficients(t, name, layer)
        return _as_float(value, f"coefficients({t}, {name!r}, {layer})")
    if isinstance(coefficients, (int, float)):
        return float(coefficients)
    if isinstance(coefficients, np.ndarray):
        coefficients = torch.as_tensor(coefficients)
    if isinstance(coefficients, torch.Tensor):
        c = coefficients
        if c.dim() == 0:
            return (lambda: c) if c.requires_grad else float(c)
        if c.shape[0] != n_tasks or c.dim() > 2:
            raise AtlasError(f"coefficients: tensor of shape {tuple(c.shape)}, expected (T,) or (T, L) with "
                             f"T = {n_tasks} tasks")
        if c.dim() == 1:
            return (lambda: c[t]) if c.requires_grad else float(c[t])
        _check_layer(layer, int(c.shape[1]), name)
        return (lambda: c[t, layer]) if c.requires_grad else float(c[t, layer])
    if isinstance(coefficients, Sequence) and not isinstance(coefficients, str):
        if len(coefficients) != n_tasks:
            raise AtlasError(f"coefficients: {len(coefficients)} values for {n_tasks} tasks "
                             "(expected one per task)")
        value = coefficients[t]
        if isinstance(value, torch.Tensor) and value.dim() == 1:
            _check_layer(layer, int(value.shape[0]), name)
            return (lambda: value[layer]) if value.requires_grad else float(value[layer])
        if isinstance(value, torch.Tensor) and value.dim() == 0:
            return (lambda: value) if value.requires_grad else float(value)
        return _as_float(value, f"coefficients[{t}]")
    raise AtlasError(f"coefficients: expected None, a number, a (T,) or (T, L) tensor, a sequence or a callable, "
                     f"got {type(coefficients).__name__}")


def _check_layer(layer: int, n_layers: int, name: str) -> None:
    if layer < 0:
        raise AtlasError(f"per-layer coefficients: module {name!r} is outside the numbered blocks (layer -1); "
                         "give coefficients as a callable (t, name, layer) -> value instead")
    if layer >= n_layers:
        raise AtlasError(f"per-layer coefficients: module {name!r} is in block {layer} but the coefficients "
                         f"cover {n_layers} layers")


def _as_float(value: Any, what: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise AtlasError(f"{what}: expected a number or a scalar tensor, got {value!r}") from None


def _prep(t: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``t`` in ``dtype`` on ``device``: the very same tensor object when nothing changes (no copy)."""
    t = t.to(dtype=dtype, device=device)
    return t.detach() if t.requires_grad else t


def _value(coef: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor | float:
    if callable(coef):
        v = coef()
        if not isinstance(v, torch.Tensor) or v.numel() != 1:
            raise AtlasError(f"a coefficient must be a scalar tensor, got {type(v).__name__} "
                             f"{tuple(getattr(v, 'shape', ()))}")
        return v.reshape(()).to(dtype=dtype, device=device)
    return coef
