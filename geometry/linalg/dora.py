"""DoRA's exact weight update, from the adapter and the base weights.

A DoRA module (peft ``use_dora``: LoRA factors ``B (m, r)``, ``A (r, n)``, scale ``s`` and a magnitude
vector ``mag (m,)``) replaces the base weight ``W0 (m, n)`` (the linear map ``(out, in)``) by

    W = diag(g) (W0 + s B A),    g = mag / ||W0 + s B A||_row

with one norm per output row, as peft computes it (``DoraLinearLayer.get_weight_norm``:
``torch.linalg.norm(W0 + s B A, dim=1)`` after ``transpose(weight, fan_in_fan_out)``, so GPT-2
``Conv1D`` is transposed first; embeddings ``(vocab, dim)`` are transposed too, one norm per embedding
dimension). Its exact update is therefore

    Delta = W - W0 = diag(g - 1) W0 + diag(g) s B A,

which depends on ``W0`` and is full-rank in general: it has no factored form of rank ``r``. This module
computes it densely, one module at a time (``m x n`` float64, what ``W0`` itself costs), and
:func:`resolve_dora` puts a thin SVD of it back into the adapter as LoRA factors (``dora_exact =
True``), so that every factored computation of the library (distances, inclusion, anatomy, merges,
the runtime, exports) uses the exact update unchanged. By default the factorisation keeps the
numerical rank (exact to float64 round-off); ``rank=k`` keeps ``k`` components and records the energy
kept.

Without the base weights the LoRA direction ``s B A`` is what the library analyses, labelled
:data:`DIRECTION_ONLY`; the runtime, which holds the base, applies DoRA exactly in any case
(:mod:`geometry.runtime.hooks`).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from typing import Any

import torch

from geometry.errors import AtlasError
from geometry.io.config import PEFT_PREFIX
from geometry.types import Adapter, LoraModule, row_index

#: The label of a DoRA adapter whose geometry is that of the LoRA direction ``s B A`` alone.
DIRECTION_ONLY = "DoRA: direction only, base weights not loaded"
#: The label of a DoRA adapter whose modules hold their exact updates.
EXACT = "DoRA: exact updates m (W0 + s B A) / ||W0 + s B A||_row - W0 (base weights loaded)"


def is_dora(module: LoraModule, adapter: Adapter | None = None) -> bool:
    """Whether ``module`` is a DoRA module (a magnitude vector, or an adapter with ``use_dora``)."""
    return module.magnitude is not None or bool(adapter is not None and adapter.config.use_dora)


def dora_status(adapter: Adapter) -> str:
    """``"none"`` (no DoRA), ``"direction"`` (some DoRA module holds only its LoRA direction) or
    ``"exact"`` (every DoRA module holds its exact update, see :func:`resolve_dora`)."""
    dora = [m for m in adapter.modules.values() if is_dora(m, adapter)]
    if not dora and not adapter.config.use_dora:
        return "none"
    return "exact" if dora and all(m.dora_exact for m in dora) else "direction"


def dora_note(adapter: Adapter) -> str | None:
    """:data:`DIRECTION_ONLY`, :data:`EXACT` or ``None`` (not DoRA): what the pages and the CLI show."""
    return {"direction": DIRECTION_ONLY, "exact": EXACT}.get(dora_status(adapter))


def dora_factor(module: LoraModule, W0: torch.Tensor) -> torch.Tensor:
    """``g = mag / ||W0 + s B A||_row`` (``(m,)`` float64) for ``W0`` the ``(m, n)`` linear map of the module's
    rows (already transposed for ``Conv1D`` / embeddings, sliced to ``module.rows`` for a fused part)."""
    if module.magnitude is None:
        raise AtlasError(f"module {module.name}: no DoRA magnitude vector")
    W0 = W0.detach().to("cpu", torch.float64)
    if tuple(W0.shape) != module.shape:
        raise AtlasError(f"module {module.name}: base weight of shape {tuple(W0.shape)}, expected the (out, in) "
                         f"map {module.shape}")
    V = W0 + module.scale * (module.B.detach().to("cpu", torch.float64) @ module.A.detach().to("cpu", torch.float64))
    norm = torch.linalg.norm(V, dim=1)
    if not bool((norm > 0).all()):
        raise AtlasError(f"module {module.name}: a row of W0 + s B A is zero; DoRA's normalisation is undefined")
    return module.magnitude.detach().to("cpu", torch.float64) / norm


def dora_update(module: LoraModule, W0: torch.Tensor) -> torch.Tensor:
    """The exact DoRA update ``mag * (W0 + s B A) / ||W0 + s B A||_row - W0``, dense ``(m, n)`` float64.

    Dense by necessity (it depends on ``W0`` and is full-rank in general): one module at a time.
    ``W0`` as in :func:`dora_factor`.
    """
    g = dora_factor(module, W0)
    W0 = W0.detach().to("cpu", torch.float64)
    V = W0 + module.scale * (module.B.detach().to("cpu", torch.float64) @ module.A.detach().to("cpu", torch.float64))
    return g[:, None] * V - W0


# ---------------------------------------------------------------------------------------------- base weights
def _module_path(name: str) -> str:
    name = name.removeprefix(PEFT_PREFIX)
    for suffix in (".base_layer", ".weight"):
        name = name.removesuffix(suffix)
    return name


def _from_model(model: torch.nn.Module, module: LoraModule) -> torch.Tensor | None:
    path = _module_path(module.name)
    for candidate in (path, PEFT_PREFIX + path, "base_model." + path):
        try:
            sub = model.get_submodule(candidate)
        except AttributeError:
            continue
        sub = getattr(sub, "base_layer", sub)  # a peft LoRA layer: its base layer
        weight = getattr(sub, "weight", None)
        if not isinstance(weight, torch.Tensor):
            return None
        transposed = isinstance(sub, torch.nn.Embedding) or type(sub).__name__ == "Conv1D"
        return weight.T if transposed else weight
    return None


def _from_state(state: Mapping[str, torch.Tensor], module: LoraModule) -> torch.Tensor | None:
    path = _module_path(module.name)
    for key in (f"{path}.weight", f"{path}.base_layer.weight", f"{PEFT_PREFIX}{path}.base_layer.weight",
                f"{PEFT_PREFIX}{path}.weight"):
        if key in state:
            weight = state[key]
            return weight.T if (module.fan_in_fan_out or module.is_embedding) else weight
    return None


def base_weight(base: Any, module: LoraModule) -> torch.Tensor:
    """``W0`` of ``module`` as the ``(out, in)`` map of its rows (float64, on the CPU), from ``base``: a model
    (transformers or peft), a :class:`~geometry.runtime.Runtime` or a state dict ``{path.weight: tensor}``
    (state dicts do not say whether a layer is a ``Conv1D``: the module's ``fan_in_fan_out`` decides)."""
    if hasattr(base, "model") and isinstance(base.model, torch.nn.Module) and not isinstance(
            base, torch.nn.Module):
        base = base.model  # a Runtime
    if isinstance(base, torch.nn.Module):
        weight = _from_model(base, module)
    elif isinstance(base, Mapping):
        weight = _from_state(base, module)
    else:
        raise AtlasError(f"cannot read base weights from a {type(base).__name__}: give a model, a Runtime or a "
                         "state dict")
    if weight is None:
        raise AtlasError(f"module {module.name}: the base has no weight for {_module_path(module.name)!r}")
    if weight.dim() != 2:
        raise AtlasError(f"module {module.name}: base weight of shape {tuple(weight.shape)}, expected a matrix")
    if module.rows is not None:
        weight = weight[row_index(module.rows)]
    if weight.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise AtlasError(f"module {module.name}: base weight of dtype {weight.dtype} (quantised?); DoRA's exact "
                         "update needs the floating-point base weights")
    return weight.detach().to("cpu", torch.float64)


# ---------------------------------------------------------------------------------------------- resolving
def exact_factors(delta: torch.Tensor, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(B, A, energy kept)`` of a dense update by a thin SVD: ``B = U_k S_k``, ``A = V_k^T``, ``k`` the
    numerical rank (``rank=None``: singular values above ``max(m, n) * eps * sigma_1``) or ``min(rank, .)``."""
    delta = delta.to(torch.float64)
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    total = float(S.pow(2).sum())
    if total == 0.0:
        return delta.new_zeros(delta.shape[0], 1), delta.new_zeros(1, delta.shape[1]), 1.0
    if rank is None:
        k = int((S > S[0] * max(delta.shape) * torch.finfo(torch.float64).eps).sum())
    else:
        k = max(1, min(int(rank), int(S.shape[0])))
    kept = float(S[:k].pow(2).sum()) / total
    return U[:, :k] * S[:k], Vh[:k], kept


def resolve_dora(adapter: Adapter, base: Any, *, rank: int | None = None,
                 dtype: torch.dtype | None = None) -> Adapter:
    """A copy of ``adapter`` whose DoRA modules hold their exact updates (``dora_exact = True``).

    ``base``: the base model (transformers or peft), a :class:`~geometry.runtime.Runtime` or a state
    dict of its weights. Each DoRA module's update ``mag (W0 + s B A) / ||W0 + s B A||_row - W0``
    (:func:`dora_update`, dense, one module at a time) is factored by a thin SVD as ``B' A'`` with scale 1
    at its numerical rank (``rank=None``, exact to round-off) or at most ``rank`` components; the module's
    ``r`` and ``alpha`` become that rank and ``Adapter.warnings`` records the energy kept when below 1.
    Factors are stored in ``dtype`` (default: the module's factor dtype, float32 for half-precision
    files). Non-DoRA modules and already-exact modules are shared, not copied. The content hash changes
    (it covers the base weights used), so caches never mix the direction and the exact update.
    """
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise AtlasError(f"rank must be a positive integer or None, got {rank!r}")
    if dora_status(adapter) != "direction":
        return adapter
    h = hashlib.sha256(f"{adapter.content_hash}|dora-exact|rank={rank}".encode())
    modules: dict = {}
    worst = 1.0
    for key, mod in adapter.modules.items():
        if mod.magnitude is None or mod.dora_exact:
            if adapter.config.use_dora and mod.magnitude is None:
                raise AtlasError(f"{adapter.name}: module {mod.name} has no lora_magnitude_vector although the "
                                 "config says use_dora; its exact DoRA update is undefined")
            modules[key] = mod
            continue
        W0 = base_weight(base, mod)
        h.update(key.label.encode() + W0.to(torch.float32).numpy().tobytes())
        B, A, kept = exact_factors(dora_update(mod, W0), rank)
        worst = min(worst, kept)
        out = dtype or mod.B.dtype
        k = int(A.shape[0])
        modules[key] = dataclasses.replace(mod, A=A.to(out).contiguous(), B=B.to(out).contiguous(), r=k,
                                           alpha=float(k), scale=1.0, dora_exact=True)
    warnings = list(adapter.warnings)
    if worst < 1.0 - 1e-12:
        warnings.append(f"DoRA exact updates factored at rank <= {rank}: energy kept >= {worst:.6f}")
    return dataclasses.replace(adapter, modules=modules, warnings=warnings, content_hash=h.hexdigest())
