"""Reading ``adapter_config.json`` into :class:`~geometry.types.AdapterConfig`.

Old configs lacking fields load with peft's defaults (``r = 8``, ``lora_alpha = 8``,
``use_rslora = False``, empty ``rank_pattern`` / ``alpha_pattern``). Per-module rank and alpha follow
peft's rule (``peft.utils.other.get_pattern_key``): the first key ``k`` of the pattern dict (in
its stored order) for which ``re.match(rf"(.*\\.)?({k})$", module_name)`` succeeds gives the value;
otherwise the global ``r`` / ``lora_alpha`` applies. The scale is then ``alpha / r`` or, with
rsLoRA, ``alpha / sqrt(r)`` (:func:`geometry.types.lora_scale`).

The config is untrusted (an upload): numbers must be finite, flags booleans, names strings, and
pattern keys are matched with the ``regex`` package's time limit where it is installed (a key
such as ``(a*)*b`` backtracks exponentially under :mod:`re`); at most :data:`MAX_PATTERN_KEYS`
keys per pattern.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any

from geometry.errors import AdapterLoadError
from geometry.types import AdapterConfig

try:  # a runtime dependency of transformers; gives regular expressions a time limit
    import regex as _regex
except ImportError:  # pragma: no cover - plain re, without a time limit
    _regex = None

#: Prefix that peft puts in front of every module path in the saved weights.
PEFT_PREFIX = "base_model.model."
#: Most keys in ``rank_pattern`` / ``alpha_pattern`` (peft writes one per module at most).
MAX_PATTERN_KEYS = 10_000
#: Largest rank accepted (a factor of that many rows is already absurd; keeps messages short).
MAX_RANK = 2**24
#: Seconds one pattern key may take to match one module name before the config is refused.
PATTERN_TIMEOUT_S = 0.5
#: The peft types read: LoRA (and DoRA, ``use_dora``) and AdaLoRA.
PEFT_TYPES = ("LORA", "ADALORA", "LOHA", "LOKR")  # LoHa / LoKr: geometry.io.lycoris
#: peft's ``AdaLoraConfig.init_r`` default (every module's rank before pruning, and its ``ranknum``).
ADALORA_DEFAULT_INIT_R = 12


def _number(data: dict, field: str, default: float, source: str, kind: type) -> Any:
    value = data.get(field, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AdapterLoadError(f"{source}: field {field!r} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise AdapterLoadError(f"{source}: field {field!r} must be a finite number, got {value!r}")
    if kind is int:
        if float(value) != int(value) or int(value) <= 0:
            raise AdapterLoadError(f"{source}: field {field!r} must be a positive integer, got {value!r}")
        if int(value) > MAX_RANK:
            raise AdapterLoadError(f"{source}: field {field!r} is {value:.3g}, more than the largest rank accepted ({MAX_RANK})")
        return int(value)
    return float(value)


def _flag(data: dict, field: str, source: str) -> bool:
    """A boolean field (``true`` / ``false`` / ``null``, or 0 / 1): the string "false" is not false."""
    value = data.get(field)
    if value is None:
        return False
    if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
        return bool(value)
    raise AdapterLoadError(f"{source}: field {field!r} must be true or false, got {value!r}")


def _pattern(data: dict, field: str, source: str, kind: type) -> dict:
    value = data.get(field) or {}
    if not isinstance(value, dict):
        raise AdapterLoadError(f"{source}: field {field!r} must be an object of regex -> number, got {value!r}")
    if len(value) > MAX_PATTERN_KEYS:
        raise AdapterLoadError(
            f"{source}: field {field!r} has {len(value)} keys, more than the limit of {MAX_PATTERN_KEYS}")
    out = {}
    for key, val in value.items():
        if isinstance(val, bool) or not isinstance(val, (int, float)):
            raise AdapterLoadError(f"{source}: {field}[{key!r}] must be a number, got {val!r}")
        if not math.isfinite(val):
            raise AdapterLoadError(f"{source}: {field}[{key!r}] must be a finite number, got {val!r}")
        try:
            re.compile(key)
        except re.error as exc:
            raise AdapterLoadError(f"{source}: {field} key {key!r} is not a valid regular expression ({exc})") from exc
        if kind is int and (float(val) != int(val) or int(val) <= 0):
            raise AdapterLoadError(f"{source}: {field}[{key!r}] must be a positive integer rank, got {val!r}")
        if kind is int and int(val) > MAX_RANK:
            raise AdapterLoadError(f"{source}: {field}[{key!r}] is {val:.3g}, more than the largest rank accepted ({MAX_RANK})")
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
    peft_type = data.get("peft_type") or "LORA"
    if not isinstance(peft_type, str):
        raise AdapterLoadError(f"{source}: field 'peft_type' must be a string such as 'LORA', got {peft_type!r}")
    peft_type = peft_type.upper()
    if peft_type not in PEFT_TYPES:
        raise AdapterLoadError(
            f"{source}: peft_type is {peft_type!r}, which defines no weight update Adapter Atlas reads; only LoRA, "
            "DoRA, AdaLoRA, LoHa and LoKr adapters (peft_type 'LORA', 'ADALORA', 'LOHA' or 'LOKR') are supported")
    if peft_type in ("LOHA", "LOKR"):
        return _lycoris_config(data, source, peft_type)
    if peft_type == "ADALORA":
        return _adalora_config(data, source)
    targets = data.get("target_modules")
    if targets is not None and not isinstance(targets, (str, list)):
        raise AdapterLoadError(f"{source}: target_modules must be a list or a regex string, got {targets!r}")
    to_save = data.get("modules_to_save")
    if to_save is not None and not isinstance(to_save, list):
        raise AdapterLoadError(f"{source}: modules_to_save must be a list or null, got {to_save!r}")
    for field in ("base_model_name_or_path", "task_type"):
        if data.get(field) is not None and not isinstance(data[field], str):
            raise AdapterLoadError(f"{source}: field {field!r} must be a string or null, got {data[field]!r}")
    return AdapterConfig(
        r=_number(data, "r", 8, source, int),
        lora_alpha=_number(data, "lora_alpha", 8.0, source, float),
        use_rslora=_flag(data, "use_rslora", source),
        rank_pattern=_pattern(data, "rank_pattern", source, int),
        alpha_pattern=_pattern(data, "alpha_pattern", source, float),
        target_modules=list(targets) if isinstance(targets, list) else targets,
        fan_in_fan_out=_flag(data, "fan_in_fan_out", source),
        use_dora=_flag(data, "use_dora", source),
        modules_to_save=list(to_save) if to_save is not None else None,
        base_model_name_or_path=data.get("base_model_name_or_path") or None,
        task_type=data.get("task_type") or None,
        peft_type=peft_type,
        raw=dict(data),
    )


def _lycoris_config(data: dict, source: str, peft_type: str) -> AdapterConfig:
    """A LoHa / LoKr ``adapter_config.json`` (:mod:`geometry.io.lycoris`): ``alpha`` plays ``lora_alpha``."""
    targets = data.get("target_modules")
    if targets is not None and not isinstance(targets, (str, list)):
        raise AdapterLoadError(f"{source}: target_modules must be a list or a regex string, got {targets!r}")
    to_save = data.get("modules_to_save")
    if to_save is not None and not isinstance(to_save, list):
        raise AdapterLoadError(f"{source}: modules_to_save must be a list or null, got {to_save!r}")
    for field in ("base_model_name_or_path", "task_type"):
        if data.get(field) is not None and not isinstance(data[field], str):
            raise AdapterLoadError(f"{source}: field {field!r} must be a string or null, got {data[field]!r}")
    _flag(data, "use_effective_conv2d", source)
    return AdapterConfig(
        r=_number(data, "r", 8, source, int),
        lora_alpha=_number(data, "alpha", 8.0, source, float),
        rank_pattern=_pattern(data, "rank_pattern", source, int),
        alpha_pattern=_pattern(data, "alpha_pattern", source, float),
        target_modules=list(targets) if isinstance(targets, list) else targets,
        modules_to_save=list(to_save) if to_save is not None else None,
        base_model_name_or_path=data.get("base_model_name_or_path") or None,
        task_type=data.get("task_type") or None,
        peft_type=peft_type,
        raw=dict(data),
    )


def _adalora_config(data: dict, source: str) -> AdapterConfig:
    """An AdaLoRA config (:data:`ADALORA_DEFAULT_INIT_R`, masks in ``rank_pattern``; see :func:`adalora_masks`).

    peft's AdaLoRA builds every module at rank ``init_r`` (``r`` is ignored), scales by ``lora_alpha``
    (``r`` when ``lora_alpha <= 0``) over ``ranknum + 1e-5`` with ``ranknum = init_r``, and ignores
    ``alpha_pattern`` and rsLoRA; ``config.r`` here is ``init_r``, ``rank_pattern`` / ``alpha_pattern`` stay
    empty (the masks are read from ``raw`` by :func:`adalora_masks`).
    """
    if _flag(data, "use_dora", source):
        raise AdapterLoadError(f"{source}: peft_type 'ADALORA' with use_dora true; AdaLoRA does not support DoRA")
    for field in ("base_model_name_or_path", "task_type"):
        if data.get(field) is not None and not isinstance(data[field], str):
            raise AdapterLoadError(f"{source}: field {field!r} must be a string or null, got {data[field]!r}")
    targets = data.get("target_modules")
    if targets is not None and not isinstance(targets, (str, list)):
        raise AdapterLoadError(f"{source}: target_modules must be a list or a regex string, got {targets!r}")
    to_save = data.get("modules_to_save")
    if to_save is not None and not isinstance(to_save, list):
        raise AdapterLoadError(f"{source}: modules_to_save must be a list or null, got {to_save!r}")
    alpha = _number(data, "lora_alpha", 8.0, source, float)
    config = AdapterConfig(
        r=_number(data, "init_r", ADALORA_DEFAULT_INIT_R, source, int),
        lora_alpha=alpha,
        target_modules=list(targets) if isinstance(targets, list) else targets,
        fan_in_fan_out=_flag(data, "fan_in_fan_out", source),
        modules_to_save=list(to_save) if to_save is not None else None,
        base_model_name_or_path=data.get("base_model_name_or_path") or None,
        task_type=data.get("task_type") or None,
        peft_type="ADALORA",
        raw=dict(data),
    )
    adalora_masks(config, source)  # validated here: one error at load, never later
    return config


def adalora_masks(config: AdapterConfig, source: str = "") -> dict[str, list[bool]]:
    """AdaLoRA's saved ``rank_pattern``: ``{module path: [kept?] * init_r}`` (peft's keys
    ``<module>.lora_E`` or ``<module>.lora_E.<adapter>``, ``true`` for each rank component kept).

    peft saves only the kept components (``lora_A`` / ``lora_E`` rows, ``lora_B`` columns), so a pruned
    module's factors have ``sum(mask)`` components; ``ranknum`` (the scale's denominator) stays ``init_r``.
    """
    source = source or "adapter_config.json"
    value = config.raw.get("rank_pattern") or {}
    if not isinstance(value, dict):
        raise AdapterLoadError(f"{source}: AdaLoRA field 'rank_pattern' must be an object of module -> list of "
                               f"true / false, got {type(value).__name__}")
    if len(value) > MAX_PATTERN_KEYS:
        raise AdapterLoadError(
            f"{source}: field 'rank_pattern' has {len(value)} keys, more than the limit of {MAX_PATTERN_KEYS}")
    out: dict[str, list[bool]] = {}
    for key, mask in value.items():
        if not isinstance(mask, list) or len(mask) > MAX_RANK or not all(
                isinstance(b, bool) or (isinstance(b, int) and b in (0, 1)) for b in mask):
            raise AdapterLoadError(
                f"{source}: AdaLoRA rank_pattern[{str(key)[:200]!r}] must be a list of true / false (one per rank "
                f"component), got {str(mask)[:80]}")
        name = str(key).removeprefix(PEFT_PREFIX)
        head, sep, _ = name.rpartition(".lora_E")
        if not sep:
            raise AdapterLoadError(f"{source}: AdaLoRA rank_pattern key {str(key)[:200]!r} does not name a lora_E "
                                   "tensor (expected '<module>.lora_E')")
        out[head] = [bool(b) for b in mask]
    return out


#: Repetition, alternation or a back-reference: a key without these matches in linear time.
_BACKTRACKS = re.compile(r"[*+?{|]|\\[1-9]")


@functools.lru_cache(maxsize=1 << 16)
def _compiled(key: str):
    """peft's ``(.*\\.)?(key)$`` for one key, and whether it is time-limited.

    A key that can backtrack (repetition, alternation, back-reference) goes to the ``regex``
    package, which both resists catastrophic backtracking and takes a timeout; a plain key (the
    usual ``model.layers.3.self_attn.q_proj``) stays with :mod:`re`, ten times faster.
    """
    text = rf"(.*\.)?({key})$"
    if _regex is not None and _BACKTRACKS.search(key):
        try:
            return _regex.compile(text), True
        except _regex.error:  # a construct only the re module accepts: fall back to it
            pass
    return re.compile(text), False


def pattern_key(patterns: dict, module_name: str, field: str = "pattern") -> str | None:
    """The first key of ``patterns`` matching ``module_name`` as peft does (``(.*\\.)?(key)$``), or None.

    Raises :class:`AdapterLoadError` when one key takes more than :data:`PATTERN_TIMEOUT_S` to
    match (catastrophic backtracking, e.g. ``(a*)*b``), where the ``regex`` package is installed.
    """
    for key in patterns:
        pattern, limited = _compiled(key)
        if not limited:
            if pattern.match(module_name):
                return key
            continue
        try:
            if pattern.match(module_name, timeout=PATTERN_TIMEOUT_S):
                return key
        except TimeoutError as exc:
            raise AdapterLoadError(
                f"{field} key {key!r} took more than {PATTERN_TIMEOUT_S} s to match module {module_name!r} "
                "(a regular expression that backtracks without end); simplify it") from exc
    return None


def rank_and_alpha(config: AdapterConfig, module_name: str, source: str = "") -> tuple[int, float]:
    """``(r, alpha)`` of one module after ``rank_pattern`` / ``alpha_pattern`` (peft's precedence).

    ``module_name`` is the module path inside the base model (``model.layers.0.self_attn.q_proj``);
    a leading ``base_model.model.`` is removed first, as peft matches without it. ``source`` names
    the config file in error messages.
    """
    name = module_name.removeprefix(PEFT_PREFIX)
    try:
        rk = pattern_key(config.rank_pattern, name, "rank_pattern")
        ak = pattern_key(config.alpha_pattern, name, "alpha_pattern")
    except AdapterLoadError as exc:
        raise AdapterLoadError(f"{source or 'adapter_config.json'}: {exc}") from exc
    r = config.rank_pattern[rk] if rk is not None else config.r
    alpha = config.alpha_pattern[ak] if ak is not None else config.lora_alpha
    return int(r), float(alpha)
