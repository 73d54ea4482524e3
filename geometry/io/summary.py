"""A JSON-ready description of one adapter (what ``python -m geometry info`` and the dashboard's tables show)."""

from __future__ import annotations

from typing import Any

from geometry.types import Adapter, AdapterConfig, lora_scale

#: Display names of the variants (:func:`adapter_variant`).
VARIANTS = {"ADALORA": "AdaLoRA", "LOHA": "LoHa", "LOKR": "LoKr"}


def adapter_variant(config: AdapterConfig) -> str:
    """``LoRA``, ``rsLoRA``, ``DoRA`` (rsLoRA + DoRA: ``DoRA (rsLoRA)``), ``AdaLoRA``, ``LoHa`` or ``LoKr``."""
    peft_type = (config.peft_type or "LORA").upper()
    if peft_type in VARIANTS:
        return VARIANTS[peft_type]
    if config.use_dora:
        return "DoRA (rsLoRA)" if config.use_rslora else "DoRA"
    return "rsLoRA" if config.use_rslora else "LoRA"


def format_label(config: AdapterConfig) -> str:
    """``"<format> <variant>"`` as the Overview and ``info`` show it, e.g. ``peft rsLoRA``, ``kohya LoRA``."""
    return f"{getattr(config, 'format', 'peft')} {adapter_variant(config)}"


def adapter_summary(adapter: Adapter, modules: bool = True) -> dict:
    """A JSON-ready description: name, format (``peft`` / ``diffusers`` / ``kohya``), variant (LoRA, rsLoRA,
    DoRA, AdaLoRA, LoHa, LoKr), base, r, alpha, scale rule, targets, counts, kinds, layers,
    unmapped names, other tensors (name -> shape), warnings, and (``modules=True``) one record per module."""
    from geometry.linalg.dora import dora_note  # torch: only when a summary is made
    from geometry.runtime.base_models import base_note

    cfg = adapter.config
    out: dict[str, Any] = {
        "name": adapter.name,
        "source": adapter.source,
        "content_hash": adapter.content_hash,
        "base": cfg.base_model_name_or_path,
        "task_type": cfg.task_type,
        "format": getattr(cfg, "format", "peft"),
        "variant": adapter_variant(cfg),
        "r": cfg.r,
        "alpha": cfg.lora_alpha,
        "scale_rule": "alpha/sqrt(r)" if cfg.use_rslora else "alpha/r",
        "scale": lora_scale(cfg.r, cfg.lora_alpha, cfg.use_rslora),
        "rank_pattern": dict(cfg.rank_pattern),
        "alpha_pattern": dict(cfg.alpha_pattern),
        "use_dora": cfg.use_dora,
        "fan_in_fan_out": cfg.fan_in_fan_out,
        "targets": cfg.target_modules,
        "n_modules": len(adapter.modules),
        "n_params": adapter.n_params(),
        "stacks": adapter.stacks(),
        "kinds": adapter.kinds(),
        "layers": adapter.layers(),
        "unmapped": list(adapter.unmapped),
        "other_tensors": {k: list(v.shape) for k, v in adapter.other_tensors.items()},
        "warnings": list(adapter.warnings),
        # e.g. "DoRA: direction only, base weights not loaded" (geometry.linalg.dora.dora_note), and
        # "base ...: de-quantized to float32 from ....gguf (4-bit Q4_1 ...)" (geometry.runtime.base_models.base_note)
        "notes": [n for n in (dora_note(adapter), base_note(cfg.base_model_name_or_path)) if n],
    }
    if modules:
        out["modules"] = [
            {
                "stack": k.stack,
                "layer": k.layer,
                "kind": k.kind,
                "name": m.name,
                "shape": list(m.shape),
                "rank": m.rank,
                "r": m.r,
                "alpha": m.alpha,
                "scale": m.scale,
                "rows": list(m.rows) if m.rows else None,
                "dora": m.magnitude is not None,
                "dora_exact": m.dora_exact,
                "embedding": m.is_embedding,
                "dtype": str(m.B.dtype).removeprefix("torch."),
            }
            for k, m in sorted(adapter.modules.items(), key=lambda item: item[0].order)
        ]
    return out
