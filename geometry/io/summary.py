"""A JSON-ready description of one adapter (what ``python -m geometry info`` and the dashboard's tables show)."""

from __future__ import annotations

from typing import Any

from geometry.types import Adapter, lora_scale


def adapter_summary(adapter: Adapter, modules: bool = True) -> dict:
    """A JSON-ready description: name, base, r, alpha, scale rule, targets, counts, kinds, layers,
    unmapped names, other tensors (name -> shape), warnings, and (``modules=True``) one record per module."""
    cfg = adapter.config
    out: dict[str, Any] = {
        "name": adapter.name,
        "source": adapter.source,
        "content_hash": adapter.content_hash,
        "base": cfg.base_model_name_or_path,
        "task_type": cfg.task_type,
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
                "embedding": m.is_embedding,
                "dtype": str(m.B.dtype).removeprefix("torch."),
            }
            for k, m in sorted(adapter.modules.items(), key=lambda item: item[0].order)
        ]
    return out
