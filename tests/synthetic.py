"""Random LoRA factors and adapters built directly from factors (no peft, no model): for tests and benches.

    from tests.synthetic import random_adapter, random_factors
    ad = random_adapter("a", layers=4, kinds={"q": (32, 24), "v": (16, 24)}, r=4, seed=0)
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

# The shapes and the factor generator live with the benches (bench/ imports no tests); re-exported here.
from bench.synthetic import LLAMA3_8B_SHAPES, random_factors
from geometry.types import Adapter, AdapterConfig, LoraModule, ModuleKey, lora_scale

__all__ = ["LLAMA3_8B_SHAPES", "random_adapter", "random_factors", "save_peft_folder"]

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
