"""Random LoRA adapters built directly from factors (no peft, no model), for tests and benchmarks.

Like ``numpy.testing``: not used by the library itself, imported by ``tests/`` and ``bench/`` (and by
anyone checking their own code against known adapters). Deterministic in ``seed``::

    from geometry.testing import LLAMA3_8B_SHAPES, random_adapter, random_factors, save_peft_folder
    B, A = random_factors(4096, 4096, 16, seed=0)                              # LoRA-like magnitudes
    ad = random_adapter("a", layers=4, kinds={"q": (32, 24), "v": (16, 24)}, r=4, seed=0)
    save_peft_folder(ad, "out/a")                                              # a peft adapter folder
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from geometry.types import Adapter, AdapterConfig, LoraModule, ModuleKey, lora_scale

__all__ = ["LLAMA3_8B_SHAPES", "random_adapter", "random_factors", "save_peft_folder"]

#: ``kind -> (out_features, in_features)`` of one Llama-3-8B block (GQA: k / v have 8 heads of 128).
LLAMA3_8B_SHAPES: dict[str, tuple[int, int]] = {
    "q": (4096, 4096),
    "k": (1024, 4096),
    "v": (1024, 4096),
    "o": (4096, 4096),
    "gate": (14336, 4096),
    "up": (14336, 4096),
    "down": (4096, 14336),
}


def random_factors(
    m: int,
    n: int,
    r: int,
    *,
    seed: int | torch.Generator = 0,
    dtype: torch.dtype = torch.float64,
    rank_b: int | None = None,
    rank_a: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``B (m, r)``, ``A (r, n)`` with N(0, 1 / sqrt(dim)) entries (LoRA-like magnitudes).

    ``rank_b`` / ``rank_a`` below ``r`` make the factor exactly rank-deficient: the extra columns
    of B (rows of A) are copies of the first ones (exact in any dtype).
    """
    gen = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed))
    B = torch.randn(m, r, generator=gen, dtype=torch.float64) / m**0.5
    A = torch.randn(r, n, generator=gen, dtype=torch.float64) / n**0.5
    if rank_b is not None and rank_b < r:
        B[:, rank_b:] = B[:, torch.arange(r - rank_b) % max(rank_b, 1)] if rank_b > 0 else 0.0
    if rank_a is not None and rank_a < r:
        A[rank_a:, :] = A[torch.arange(r - rank_a) % max(rank_a, 1), :] if rank_a > 0 else 0.0
    return B.to(dtype), A.to(dtype)


_LLAMA_PARENT = {"gate": "mlp", "up": "mlp", "down": "mlp"}


def random_adapter(
    name: str,
    layers: int | Iterable[int] = 4,
    kinds: Mapping[str, tuple[int, int]] | None = None,
    r: int | Mapping[str, int] = 4,
    *,
    seed: int = 0,
    alpha: float | None = None,
    dtype: torch.dtype = torch.float32,
    stack: str = "model",
    base: str | None = "synthetic/base",
    generator: torch.Generator | None = None,
) -> Adapter:
    """An :class:`Adapter` whose modules ``(stack, layer, kind)`` hold random factors.

    ``kinds`` maps kind -> ``(m, n)`` (default q and v, 16 x 12); ``r`` is one rank or one per
    kind; ``alpha`` defaults to ``2 r`` (scale 2). Deterministic in ``seed``.
    """
    kinds = dict(kinds or {"q": (16, 12), "v": (16, 12)})
    layer_list = list(range(layers)) if isinstance(layers, int) else list(layers)
    gen = generator or torch.Generator().manual_seed(seed)
    ranks = {k: (r[k] if isinstance(r, Mapping) else r) for k in kinds}
    base_r = max(ranks.values()) if ranks else 1
    a = float(alpha if alpha is not None else 2 * base_r)
    modules: dict[ModuleKey, LoraModule] = {}
    for layer in layer_list:
        for kind, (m, n) in kinds.items():
            rk = ranks[kind]
            B, A = random_factors(m, n, rk, seed=gen, dtype=dtype)
            key = ModuleKey(stack, layer, kind)
            modules[key] = LoraModule(
                name=f"model.layers.{layer}.{_LLAMA_PARENT.get(kind, 'self_attn')}.{kind}_proj",
                key=key,
                A=A,
                B=B,
                r=rk,
                alpha=a,
                scale=lora_scale(rk, a),
            )
    config = AdapterConfig(
        r=base_r,
        lora_alpha=a,
        target_modules=[f"{k}_proj" for k in kinds],
        base_model_name_or_path=base,
        rank_pattern={f"{k}_proj": v for k, v in ranks.items() if v != base_r},
        raw={"r": base_r, "lora_alpha": a},
    )
    return Adapter(name=name, config=config, modules=modules, source=f"synthetic:{name}", content_hash=f"synthetic-{name}-{seed}")


def save_peft_folder(adapter: Adapter, folder: str | Path) -> Path:
    """Write ``adapter`` as a peft folder (``adapter_config.json`` + ``adapter_model.safetensors``).

    Llama-style module names (``model.layers.L.self_attn.q_proj``, ``mlp.down_proj``); one rank
    and alpha for all modules must hold (``rank_pattern`` is written for per-kind ranks).
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for mod in adapter.modules.values():
        tensors[f"base_model.model.{mod.name}.lora_A.weight"] = mod.A.contiguous()
        tensors[f"base_model.model.{mod.name}.lora_B.weight"] = mod.B.contiguous()
    cfg = adapter.config
    config = {
        "peft_type": "LORA",
        "r": cfg.r,
        "lora_alpha": cfg.lora_alpha,
        "target_modules": cfg.target_modules,
        "rank_pattern": cfg.rank_pattern,
        "base_model_name_or_path": cfg.base_model_name_or_path,
        "task_type": "CAUSAL_LM",
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder
