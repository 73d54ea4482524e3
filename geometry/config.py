"""Reading ``adapter_config.json`` into :class:`~geometry.types.AdapterConfig`.

Old configs lacking fields load with peft's defaults (``r = 8``, ``lora_alpha = 8``,
``use_rslora = False``, empty ``rank_pattern`` / ``alpha_pattern``). Per-module rank and alpha follow
peft's rule (``peft.utils.other.get_pattern_key``): the first key ``k`` of the pattern dict (in
its stored order) for which ``re.match(rf"(.*\\.)?({k})$", module_name)`` succeeds gives the value;
otherwise the global ``r`` / ``lora_alpha`` applies. The scale is then ``alpha / r`` or, with
rsLoRA, ``alpha / sqrt(r)`` (:func:`geometry.types.lora_scale`).
"""

from __future__ import annotations

import re
from typing import Any

from geometry.errors import AdapterLoadError
from geometry.types import AdapterConfig

#: Prefix that peft puts in front of every module path in the saved weights.
PEFT_PREFIX = "base_model.model."


def _number(data: dict, field: str, default: float, source: str, kind: type) -> Any:
    value = data.get(field, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AdapterLoadError(f"{source}: field {field!r} must be a number, got {value!r}")
    if kind is int:
        if float(value) != int(value) or int(value) <= 0:
            raise AdapterLoadError(f"{source}: field {field!r} must be a positive integer, got {value!r}")
        return int(value)
    return float(value)


def _pattern(data: dict, field: str, source: str, kind: type) -> dict:
    value = data.get(field) or {}
    if not isinstance(value, dict):
        raise AdapterLoadError(f"{source}: field {field!r} must be an object of regex -> number, got {value!r}")
    out = {}
    for key, val in value.items():
        if isinstance(val, bool) or not isinstance(val, (int, float)):
            raise AdapterLoadError(f"{source}: {field}[{key!r}] must be a number, got {val!r}")
        try:
            re.compile(key)
        except re.error as exc:
            raise AdapterLoadError(f"{source}: {field} key {key!r} is not a valid regular expression ({exc})") from exc
        if kind is int and (float(val) != int(val) or int(val) <= 0):
            raise AdapterLoadError(f"{source}: {field}[{key!r}] must be a positive integer rank, got {val!r}")
        out[str(key)] = kind(val)
    return out


def parse_config(data: dict, source: str = "") -> AdapterConfig:
    """Build an :class:`AdapterConfig` from the parsed ``adapter_config.json`` dict.

    ``source`` names the file in error messages. Raises :class:`AdapterLoadError` for a config that
    is not a LoRA config or has ill-typed fields.
    """
    source = source or "adapter_config.json"
    if not isinstance(data, dict):
        raise AdapterLoadError(f"{source}: expected a JSON object, got {type(data).__name__}")
    peft_type = str(data.get("peft_type") or "LORA").upper()
    if peft_type != "LORA":
        raise AdapterLoadError(f"{source}: peft_type is {peft_type!r}; only LoRA adapters (peft_type 'LORA') are supported")
    targets = data.get("target_modules")
    if targets is not None and not isinstance(targets, (str, list)):
        raise AdapterLoadError(f"{source}: target_modules must be a list or a regex string, got {targets!r}")
    to_save = data.get("modules_to_save")
    if to_save is not None and not isinstance(to_save, list):
        raise AdapterLoadError(f"{source}: modules_to_save must be a list or null, got {to_save!r}")
    return AdapterConfig(
        r=_number(data, "r", 8, source, int),
        lora_alpha=_number(data, "lora_alpha", 8.0, source, float),
        use_rslora=bool(data.get("use_rslora") or False),
        rank_pattern=_pattern(data, "rank_pattern", source, int),
        alpha_pattern=_pattern(data, "alpha_pattern", source, float),
        target_modules=list(targets) if isinstance(targets, list) else targets,
        fan_in_fan_out=bool(data.get("fan_in_fan_out") or False),
        use_dora=bool(data.get("use_dora") or False),
        modules_to_save=list(to_save) if to_save is not None else None,
        base_model_name_or_path=data.get("base_model_name_or_path") or None,
        task_type=data.get("task_type") or None,
        peft_type=peft_type,
        raw=dict(data),
    )


def pattern_key(patterns: dict, module_name: str) -> str | None:
    """The first key of ``patterns`` matching ``module_name`` as peft does (``(.*\\.)?(key)$``), or None."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None


def rank_and_alpha(config: AdapterConfig, module_name: str) -> tuple[int, float]:
    """``(r, alpha)`` of one module after ``rank_pattern`` / ``alpha_pattern`` (peft's precedence).

    ``module_name`` is the module path inside the base model (``model.layers.0.self_attn.q_proj``);
    a leading ``base_model.model.`` is removed first, as peft matches without it.
    """
    name = module_name.removeprefix(PEFT_PREFIX)
    rk = pattern_key(config.rank_pattern, name)
    ak = pattern_key(config.alpha_pattern, name)
    r = config.rank_pattern[rk] if rk is not None else config.r
    alpha = config.alpha_pattern[ak] if ak is not None else config.lora_alpha
    return int(r), float(alpha)
