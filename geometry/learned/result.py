"""The outcome of a learned merge: coefficients labelled by adapter and layer, the objective's history,
the settings, ANP evaluations, and the merged adapter (exact task arithmetic with those coefficients)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from geometry.errors import InvalidArgumentError
from geometry.learned.layout import CoefficientLayout
from geometry.types import Adapter


@dataclass
class LearnedMerge:
    """Coefficients ``Gamma`` (``(T, 1)`` task level, ``(T, L)`` layer or module level) and how they were found.

    ``history``: one ``{"step", "epoch", "objective", "terms"}`` per optimiser step (the mini-batch
    objective before that step's update; ``terms`` per adapter). ``evaluations``: ANP measurements
    ``{"step", "anp", "scores": {task: {"adapter", "merged", "finetuned", "normalized"}}, "limit"}``.
    ``notes``: what the data selection and the caches did (fewer samples than asked...).
    """

    method: str
    adapters: list[str]
    tasks: list[str]
    level: str
    objective: str
    coefficients: np.ndarray
    layers: list[Any]
    history: list[dict[str, Any]]
    settings: dict[str, Any]
    steps_done: int
    total_steps: int
    stopped: bool = False
    notes: list[str] = field(default_factory=list)
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    source_adapters: list[Adapter] | None = field(default=None, repr=False, compare=False)
    layout: CoefficientLayout | None = field(default=None, repr=False, compare=False)

    @property
    def divergence(self) -> str | None:
        """``js`` / ``kl`` for DivMerge, ``None`` for AdaMerging (entropy)."""
        return self.objective if self.objective in ("js", "kl") else None

    @property
    def anp(self) -> float | None:
        """The last ANP measured (``None`` when none was)."""
        return self.evaluations[-1]["anp"] if self.evaluations else None

    def frame(self) -> pd.DataFrame:
        """Coefficients as a DataFrame: rows the adapters, columns the layers (``all`` for TL)."""
        return pd.DataFrame(self.coefficients, index=pd.Index(self.adapters, name="adapter"),
                            columns=[str(c) for c in self.layers])

    def history_frame(self) -> pd.DataFrame:
        """One row per step: ``step, epoch, objective`` and one column per adapter's term."""
        rows = [{"step": h["step"], "epoch": h["epoch"], "objective": h["objective"], **h.get("terms", {})}
                for h in self.history]
        return pd.DataFrame(rows)

    def merge(self, **params: Any):
        """The :class:`geometry.merging.MergedAdapter`: ``geometry.merging.task_arithmetic`` with these
        coefficients (per layer for LL; module level folds them into each module's scale)."""
        if self.source_adapters is None or self.layout is None:
            raise InvalidArgumentError("this result does not carry its adapters (it was rebuilt from JSON): merge with "
                             "geometry.merging.task_arithmetic(adapters, weights) instead")
        merged = self.layout.merge(self.source_adapters, self.coefficients, **params)
        merged.params["learned"] = {"method": self.method, "objective": self.objective, "level": self.level,
                                    "steps": self.steps_done}
        merged.source_adapters = list(self.source_adapters)
        return merged

    def save(self, path: str | Path, head: str | None = None) -> Path:
        """Write the merged peft folder (see :meth:`geometry.merging.MergedAdapter.to_peft_folder`)."""
        return self.merge().to_peft_folder(path, head=head)

    to_peft_folder = save

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: adapters, level, divergence, objective, coefficients (tasks x layers), layers,
        history (step, objective), anp, scores (the last evaluation), settings, notes."""
        last = self.evaluations[-1] if self.evaluations else {}
        scores = {task: {"merged": s["merged"], "finetuned": s["finetuned"]}
                  for task, s in (last.get("scores") or {}).items()}
        return {
            "method": self.method,
            "adapters": list(self.adapters),
            "tasks": list(self.tasks),
            "level": self.level,
            "divergence": self.divergence,
            "objective": self.objective,
            "coefficients": np.asarray(self.coefficients, dtype=float).tolist(),
            "layers": [c if isinstance(c, (int, str)) else str(c) for c in self.layers],
            "history": [{"step": int(h["step"]), "objective": float(h["objective"])} for h in self.history],
            "anp": self.anp,
            "scores": scores,
            "steps": self.steps_done,
            "total_steps": self.total_steps,
            "stopped": self.stopped,
            "settings": dict(self.settings),
            "notes": list(self.notes),
        }
