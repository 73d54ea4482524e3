"""The forward hook that adds ``sum_t c_t s_t B_t (A_t x)`` to a base module's output (never ``B @ A``)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from geometry.errors import AtlasError
from geometry.runtime.coefficients import _value


# ---------------------------------------------------------------------------------------------- the hook
class _ModuleDelta:
    """The forward hook of one module: ``output + sum_t c_t s_t B_t (A_t x) + sum_d c_d x D_d^T``.

    Factored terms are stored as ``A (K, in)``, ``B (out, K)`` and either a fixed weight (``float`` for
    one task, ``(K,)`` tensor otherwise) or per-task ``(coefficient, scale, rank)`` read at each forward.
    """

    def __init__(self, path: str, module: torch.nn.Module,
                 factored: list[tuple[torch.Tensor, torch.Tensor, float, Any]], dense: list[tuple[torch.Tensor, Any]],
                 dtype: torch.dtype, device: torch.device, rowscale: list[tuple[torch.Tensor, Any]] = ()):
        self.path = path
        self.embedding = isinstance(module, torch.nn.Embedding)
        self.dtype, self.device = dtype, device
        self.padding_idx = getattr(module, "padding_idx", None) if self.embedding else None
        scale = getattr(module, "embed_scale", None) if self.embedding else None
        if isinstance(scale, torch.Tensor) and scale.numel() != 1:
            raise AtlasError(f"module {path!r}: embed_scale of shape {tuple(scale.shape)}, expected a scalar")
        self.embed_scale = scale
        self.dense = dense
        # DoRA: ``c * v * (W0 x)`` per output row (``v = g - 1``), ``W0 x`` recomputed from the module's weight
        # (not read from ``output``, which other hooks or a stacked application may have changed)
        self.rowscale = list(rowscale)
        self.module = module if self.rowscale else None
        self.A = self.B = None
        self.fixed: float | torch.Tensor | None = None
        self.spec: list[tuple[Any, float, int]] = []
        self.ranks: torch.Tensor | None = None
        if not factored:
            return
        if len(factored) == 1:
            A, B, s, c = factored[0]
            self.A, self.B = A, B
        else:
            self.A = torch.cat([f[0] for f in factored], dim=0)
            self.B = torch.cat([f[1] for f in factored], dim=1)
        dynamic = any(callable(f[3]) for f in factored)
        if dynamic:
            self.spec = [(c, s, int(A.shape[0])) for A, _, s, c in factored]
            self.ranks = torch.tensor([k for _, _, k in self.spec], device=device)
        elif len(factored) == 1:
            self.fixed = factored[0][3] * factored[0][2]
        else:
            self.fixed = torch.cat([torch.full((int(A.shape[0]),), c * s, dtype=dtype, device=device)
                                    for A, _, s, c in factored])

    def tensors(self) -> list[torch.Tensor]:
        """Tensors this hook holds for the update (factors, weights, dense matrices)."""
        out = [t for t in (self.A, self.B, self.fixed, self.ranks) if isinstance(t, torch.Tensor)]
        return out + [d for d, _ in self.dense] + [v for v, _ in self.rowscale]

    def _weight(self) -> float | torch.Tensor:
        if not self.spec:
            return self.fixed
        values = [_value(c, self.dtype, self.device) * s for c, s, _ in self.spec]
        if len(values) == 1:
            return values[0]
        stacked = torch.stack([v if isinstance(v, torch.Tensor) else torch.tensor(v, dtype=self.dtype,
                                                                                  device=self.device)
                               for v in values])
        return stacked.repeat_interleave(self.ranks)

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        x = args[0] if args else next(iter(kwargs.values()))
        delta = None
        if self.A is not None:
            w = self._weight()
            if self.embedding:
                after_a = F.embedding(x, self.A.T, padding_idx=self.padding_idx)
                if isinstance(w, torch.Tensor) and w.dim() == 1:
                    delta = (after_a * w) @ self.B.T
                else:
                    delta = (after_a @ self.B.T) * w
            elif isinstance(w, torch.Tensor) and w.dim() == 1:
                delta = F.linear(F.linear(x.to(self.dtype), self.A) * w, self.B)
            else:
                delta = F.linear(F.linear(x.to(self.dtype), self.A), self.B) * w
        for D, c in self.dense:
            c = _value(c, self.dtype, self.device)
            if self.embedding:
                term = F.embedding(x, D.T, padding_idx=self.padding_idx) * c
            else:
                term = F.linear(x.to(self.dtype), D) * c
            delta = term if delta is None else delta + term
        if delta is None and not self.rowscale:
            return output
        if delta is not None and self.embed_scale is not None:
            delta = delta * (self.embed_scale.to(delta.dtype) if isinstance(self.embed_scale, torch.Tensor)
                             else self.embed_scale)
        if self.rowscale:
            weight = self.module.weight
            weight = weight.T if type(self.module).__name__ == "Conv1D" else weight
            base = F.linear(x.to(weight.dtype), weight).to(self.dtype)
            for v, c in self.rowscale:
                term = base * (v * _value(c, self.dtype, self.device))
                delta = term if delta is None else delta + term
        return output + delta.to(output.dtype)
