"""What a merge writes per peft module (:class:`PeftUpdate`), and the small helpers the export shares with the
merge: the squared Frobenius norm of a factored update and JSON-ready parameters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


def factored_norm2(B: torch.Tensor, A: torch.Tensor) -> float:
    """``||B A||_F^2 = trace((B^T B)(A A^T))`` without forming ``B A``."""
    Bd, Ad = B.double(), A.double()
    return float(((Bd.T @ Bd) * (Ad @ Ad.T)).sum())


@dataclass
class PeftUpdate:
    """The update of one peft module (fused parts put back together), in ``(out, in)`` orientation."""

    name: str
    shape: tuple[int, int]
    B: torch.Tensor | None = None
    A: torch.Tensor | None = None
    delta: torch.Tensor | None = None
    is_embedding: bool = False
    fan_in_fan_out: bool = False
    rank_sum: int | None = None

    def dense(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        if self.delta is not None:
            return self.delta.to(dtype)
        return self.B.to(dtype) @ self.A.to(dtype)

    def as_update(self) -> tuple[torch.Tensor, torch.Tensor, float] | torch.Tensor:
        """``(B, A, 1.0)`` or the dense matrix: the form ``geometry.evaluation.evaluate.apply_updates`` takes."""
        return self.delta if self.delta is not None else (self.B, self.A, 1.0)

    def norm2(self) -> float:
        if self.delta is not None:
            return float(self.delta.double().pow(2).sum())
        return factored_norm2(self.B, self.A)


def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
