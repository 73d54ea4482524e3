"""adapter_config.json parsing and peft's rank_pattern / alpha_pattern rule."""

from __future__ import annotations

import pytest
from peft.utils.other import get_pattern_key

from geometry.errors import AdapterLoadError
from geometry.io.config import parse_config, rank_and_alpha
from geometry.types import lora_scale


def test_old_config_without_fields_gets_peft_defaults():
    cfg = parse_config({"peft_type": "LORA", "target_modules": ["q_proj"]})
    assert (cfg.r, cfg.lora_alpha, cfg.use_rslora, cfg.use_dora) == (8, 8.0, False, False)
    assert cfg.rank_pattern == {} and cfg.alpha_pattern == {}
    assert cfg.base_model_name_or_path is None and cfg.task_type is None
    minimal = parse_config({"r": 16, "lora_alpha": 32, "rank_pattern": None, "alpha_pattern": None})
    assert minimal.peft_type == "LORA" and minimal.r == 16 and minimal.rank_pattern == {}


def test_fields_are_read():
    cfg = parse_config({
        "r": 4, "lora_alpha": 16, "use_rslora": True, "fan_in_fan_out": True, "use_dora": True,
        "modules_to_save": ["classifier"], "base_model_name_or_path": "gpt2", "task_type": "SEQ_CLS",
        "target_modules": "c_attn|c_proj", "rank_pattern": {"q": 2}, "alpha_pattern": {"v": 3},
    })
    assert cfg.use_rslora and cfg.fan_in_fan_out and cfg.use_dora
    assert cfg.modules_to_save == ["classifier"] and cfg.target_modules == "c_attn|c_proj"
    assert cfg.rank_pattern == {"q": 2} and cfg.alpha_pattern == {"v": 3.0}
    assert cfg.raw["task_type"] == "SEQ_CLS"


@pytest.mark.parametrize(
    "bad, words",
    [
        ({"peft_type": "IA3"}, "peft_type"),
        ({"r": 0}, "'r'"),
        ({"r": "eight"}, "'r'"),
        ({"r": 2.5}, "'r'"),
        ({"rank_pattern": {"q_proj": 0}}, "rank_pattern"),
        ({"rank_pattern": {"(": 4}}, "regular expression"),
        ({"alpha_pattern": ["v"]}, "alpha_pattern"),
        ({"target_modules": 3}, "target_modules"),
    ],
)
def test_bad_fields_raise_naming_file_and_field(bad, words):
    with pytest.raises(AdapterLoadError) as err:
        parse_config(bad, source="x/adapter_config.json")
    assert "x/adapter_config.json" in str(err.value) and words in str(err.value)


NAMES = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.1.self_attn.q_proj",
    "model.layers.11.self_attn.v_proj",
    "model.layers.1.mlp.down_proj",
    "transformer.h.3.attn.c_proj",
    "transformer.h.3.mlp.c_proj",
]
PATTERNS = [
    {"q_proj": 2, "v_proj": 6},
    {"layers.1.self_attn.q_proj": 3, "q_proj": 5},  # first matching key wins (dict order)
    {"q_proj": 5, "layers.1.self_attn.q_proj": 3},
    {r"layers\.1\..*": 7},
    {"mlp.c_proj": 12, "c_proj": 2},
    {"roj": 9},  # no match: '(.*\.)?(roj)$' needs a dot before the key
]


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("name", NAMES)
def test_rank_and_alpha_match_peft_rule(pattern, name):
    cfg = parse_config({"r": 8, "lora_alpha": 16, "rank_pattern": pattern, "alpha_pattern": {k: 2 * v for k, v in pattern.items()}})
    r, alpha = rank_and_alpha(cfg, "base_model.model." + name)
    expected_r = pattern.get(get_pattern_key(pattern.keys(), name), 8)
    expected_alpha = {k: 2.0 * v for k, v in pattern.items()}.get(get_pattern_key(pattern.keys(), name), 16.0)
    assert (r, alpha) == (expected_r, expected_alpha)


def test_rank_pattern_examples():
    cfg = parse_config({"r": 8, "lora_alpha": 16, "rank_pattern": {"mlp.c_proj": 12, "c_proj": 2}})
    assert rank_and_alpha(cfg, "transformer.h.3.mlp.c_proj") == (12, 16.0)
    assert rank_and_alpha(cfg, "transformer.h.3.attn.c_proj") == (2, 16.0)
    assert rank_and_alpha(cfg, "transformer.h.3.attn.c_attn") == (8, 16.0)


def test_scale_rules():
    assert lora_scale(6, 32) == pytest.approx(32 / 6)
    assert lora_scale(16, 32, use_rslora=True) == pytest.approx(8.0)
