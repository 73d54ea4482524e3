"""Merge weights ``lambda_t`` (task level) or ``lambda_{t,l}`` (task and layer level).

Accepted forms (``T`` adapters):

- ``None``: the method's default for every task (e.g. ``1/T`` for the LoRA-level average);
- ``[w_1, ..., w_T]``: one weight per task (DivMerge's *task level*, TL);
- ``[{layer: w, ...}, ...]`` (one mapping per task) or a ``T x L`` array-like indexed by the
  layer index: one weight per task and layer (DivMerge's *layer level*, LL). A mapping may give
  ``"default"`` for modules outside the repeated blocks (layer ``-1``) or layers it does not list.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from geometry.errors import MergeParameterError
from geometry.types import ModuleKey

WeightsSpec = None | Sequence[float] | Sequence[Mapping[Any, float]] | Sequence[Sequence[float]]


def parse_weights(text: str, names: Sequence[str] | None = None, *, label: str = "weights") -> list[float] | None:
    """Task-level weights from text, as typed in the dashboard or given to ``--weights``: ``"0.5, 0.5"``.

    Numbers separated by commas (spaces ignored); an empty text is ``None`` (the method's default).
    With ``names`` the count must match the adapters. Raises :class:`MergeParameterError` naming the
    text (as ``label``: the CLI says ``--weights``) and what was expected.
    """
    if text is None or not str(text).strip():
        return None
    parts = [p.strip() for p in str(text).split(",")]
    try:
        weights = [float(p) for p in parts]
    except ValueError:
        raise MergeParameterError(f"{label} {text!r}: expected comma-separated numbers, e.g. 0.5, 0.5") from None
    if any(w != w or w in (float("inf"), float("-inf")) for w in weights):
        raise MergeParameterError(f"{label} {text!r}: every weight must be a finite number")
    if names is not None and len(weights) != len(names):
        raise MergeParameterError(f"{label} {text!r}: {len(weights)} weights for {len(names)} adapters "
                                  f"({', '.join(names)}); give one per adapter")
    return weights


class MergeWeights:
    """Resolves the weight of each task at a module key: ``weights.at(key) -> [w_1, ..., w_T]``."""

    def __init__(self, weights: WeightsSpec, n_tasks: int, default: float):
        self.n_tasks = int(n_tasks)
        self.layer_level = False
        if weights is None:
            self._task = [float(default)] * self.n_tasks
            return
        if hasattr(weights, "tolist"):
            weights = weights.tolist()
        weights = list(weights)
        if len(weights) != self.n_tasks:
            raise MergeParameterError(f"got {len(weights)} merge weights for {self.n_tasks} adapters; give one per adapter")
        if all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights):
            self._task = [float(w) for w in weights]
            return
        self.layer_level = True
        self._layer: list[Mapping[Any, float] | list[float]] = []
        for t, w in enumerate(weights):
            if isinstance(w, Mapping):
                self._layer.append({(k if k == "default" else int(k)): float(v) for k, v in w.items()})
            elif isinstance(w, Sequence) and not isinstance(w, str):
                self._layer.append([float(v) for v in w])
            else:
                raise MergeParameterError(
                    f"merge weight {t} is {w!r}: give numbers (one per adapter), or one mapping / list per adapter"
                )

    def at(self, key: ModuleKey) -> list[float]:
        """Weights ``[w_1, ..., w_T]`` at module ``key``."""
        if not self.layer_level:
            return list(self._task)
        out = []
        for t, w in enumerate(self._layer):
            if isinstance(w, Mapping):
                if key.layer in w:
                    out.append(w[key.layer])
                elif "default" in w:
                    out.append(w["default"])
                else:
                    raise MergeParameterError(f"layer-level merge weights of adapter {t} give no weight for layer {key.layer} ({key.label})")
            else:
                if not 0 <= key.layer < len(w):
                    raise MergeParameterError(
                        f"layer-level merge weights of adapter {t} cover layers 0..{len(w) - 1}, "
                        f"not layer {key.layer} ({key.label})"
                    )
                out.append(w[key.layer])
        return out

    def describe(self) -> Any:
        return list(self._task) if not self.layer_level else [dict(w) if isinstance(w, Mapping) else list(w) for w in self._layer]
