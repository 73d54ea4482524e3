"""Where the learned coefficients ``Gamma`` sit: one per task (TL), per task and layer (LL), or per
task and module.

``Gamma`` is a ``(T, L)`` matrix, rows the adapters in order, columns:

* ``level="task"`` (TL): one column, ``Gamma_t`` scales the whole task vector ``tau_t``;
* ``level="layer"`` (LL): one column per transformer block, the block index of
  :attr:`geometry.types.ModuleKey.layer` (the index ``geometry.merging.task_arithmetic``'s per-layer
  weights use), plus a last column ``"other"`` for modules outside the numbered blocks (e.g. BERT's
  pooler), when the adapters have any; encoder-decoder models get one column per ``(stack, layer)``;
* ``level="module"``: one column per adapted peft module (the paper's "per-module option").

The merged model is ``Phi = theta0 + sum_t sum_modules Gamma_{t, col(module)} tau_t[module]``, applied
by :class:`geometry.runtime.Runtime` through a callable coefficient ``(t, module name, layer) ->
Gamma[t, col]`` (the column looked up by module name, so the runtime and the exported merge always
agree), and exported by :meth:`CoefficientLayout.merge` as exact task arithmetic with those weights.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from geometry.errors import AtlasError
from geometry.types import Adapter

LEVELS = ("task", "layer", "module")


class CoefficientLayout:
    """The columns of ``Gamma`` for ``adapters`` at ``level`` and the module -> column map."""

    def __init__(self, adapters: Sequence[Adapter], level: str = "task"):
        if level not in LEVELS:
            raise AtlasError(f"unknown level {level!r}: choose task (one coefficient per task), layer (per task and "
                             "transformer block) or module (per task and adapted module)")
        self.level = level
        self.names = [a.name for a in adapters]
        keys = sorted({key for a in adapters for key in a.modules}, key=lambda k: k.order)
        stacks = sorted({k.stack for k in keys if k.stack != "raw" and k.layer >= 0})
        self.multi_stack = len(stacks) > 1
        columns: list[Any] = []
        column_of: dict[str, int] = {}

        def col(label: Any) -> int:
            if label not in columns:
                columns.append(label)
            return columns.index(label)

        if level == "task":
            columns = ["all"]
            column_of = {k_name: 0 for k_name in {m.name for a in adapters for m in a.modules.values()}}
        elif level == "layer":
            blocks = sorted({(k.stack, k.layer) for k in keys if k.layer >= 0},
                            key=lambda s: (stacks.index(s[0]) if s[0] in stacks else len(stacks), s[1]))
            for stack, layer in blocks:
                col(f"{stack}.{layer}" if self.multi_stack else layer)
            has_other = any(k.layer < 0 for k in keys)
            if has_other:
                col("other")
            for a in adapters:
                for key, mod in a.modules.items():
                    label = "other" if key.layer < 0 else (f"{key.stack}.{key.layer}" if self.multi_stack else key.layer)
                    column_of.setdefault(mod.name, columns.index(label))
        else:
            for key in keys:
                for a in adapters:
                    mod = a.modules.get(key)
                    if mod is not None:
                        column_of.setdefault(mod.name, col(mod.name))
                        break
        self.columns: list[Any] = columns
        self.column_of = column_of
        self._keys = keys

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.names), len(self.columns))

    @property
    def layers(self) -> list[Any]:
        """Column labels: ``["all"]`` (TL), block indices (and ``"other"``) (LL), module names (module)."""
        return list(self.columns)

    def initial(self, init: float | str) -> np.ndarray:
        """``Gamma`` at the start: every entry ``init``, or ``1/T`` for ``init="uniform"``."""
        value = initial_value(init, len(self.names))
        return np.full(self.shape, value, dtype=np.float64)

    def runtime_coefficients(self, gamma: torch.Tensor):
        """The runtime's callable coefficient: ``(t, module name, layer) -> gamma[t, col(module)]``."""
        column_of = self.column_of

        def coefficient(t: int, name: str, layer: int) -> torch.Tensor:
            try:
                return gamma[t, column_of[name]]
            except KeyError:
                raise AtlasError(f"module {name!r} is not in the coefficient layout") from None

        return coefficient

    def merge_weights(self, gamma: np.ndarray) -> list:
        """``gamma`` as :class:`geometry.merging.weights.MergeWeights` (task or per-layer level)."""
        gamma = np.asarray(gamma, dtype=float)
        if self.level == "task":
            return [float(g) for g in gamma[:, 0]]
        if self.level == "layer" and not self.multi_stack:
            out = []
            for row in gamma:
                w: dict[Any, float] = {}
                for label, value in zip(self.columns, row):
                    w["default" if label == "other" else int(label)] = float(value)
                out.append(w)
            return out
        raise AtlasError(f"level {self.level!r}{' with several stacks' if self.multi_stack else ''} has no "
                         "task-arithmetic weight form: use merge()")

    def merge(self, adapters: Sequence[Adapter], gamma: np.ndarray, **params: Any):
        """Exact task arithmetic with ``gamma``: ``sum_t Gamma_{t, col} s_t B_t A_t`` per module (factored).

        TL and single-stack LL call :func:`geometry.merging.task_arithmetic` with the task or per-layer
        weights; module level and multi-stack LL fold ``Gamma_{t, col}`` into each module's scale first
        (the same sum, term by term) and record the matrix in ``params["weights"]``.
        """
        from geometry.merging import task_arithmetic

        gamma = np.asarray(gamma, dtype=float)
        if gamma.shape != self.shape:
            raise AtlasError(f"coefficients of shape {gamma.shape}, expected {self.shape} (tasks x {self.level}s)")
        if self.level == "task" or (self.level == "layer" and not self.multi_stack):
            return task_arithmetic(list(adapters), self.merge_weights(gamma), **params)
        scaled = []
        for t, ad in enumerate(adapters):
            modules = {key: dataclasses.replace(mod, scale=float(gamma[t, self.column_of[mod.name]]) * mod.scale)
                       for key, mod in ad.modules.items()}
            scaled.append(dataclasses.replace(ad, modules=modules))
        merged = task_arithmetic(scaled, None, **params)
        merged.params["weights"] = {"level": self.level, "columns": [str(c) for c in self.columns],
                                    "coefficients": gamma.tolist()}
        return merged


def initial_value(init: float | str, n_tasks: int) -> float:
    """The initial coefficient: a number, ``"uniform"`` (``1/T``, the paper's Algorithm 1)."""
    if isinstance(init, str):
        if init.strip().lower() == "uniform":
            return 1.0 / n_tasks
        try:
            return float(init)
        except ValueError:
            raise AtlasError(f"init {init!r}: expected a number (e.g. 0.5) or 'uniform' (1/T)") from None
    return float(init)
