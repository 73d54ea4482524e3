"""The five real third-party adapters of ../shared/real_adapters (skipped when absent)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from geometry.loader import load_adapter
from geometry.summary import adapter_summary
from geometry.types import ModuleKey
from tests.families import legacy_forward

QWEN6 = "MatthewZhang473__LoRA_Qwen0.5B__r6_alpha32"
QWEN12 = "MatthewZhang473__LoRA_Qwen0.5B__r12_alpha32"
GPT2 = "abrhaleyarefaine1997__gpt2-tigrinya-lora__root"
NEO = "SARAELSAFTY__Movies-_with_lora__model"
BLOOM = "wujindou__BLOOM-LORA__root"


@pytest.fixture(scope="module")
def real(real_adapters_dir):
    cache = {}

    def get(name):
        if name not in cache:
            folder = real_adapters_dir / name
            if not folder.is_dir():
                pytest.skip(f"{name} is absent")
            cache[name] = load_adapter(folder)
        return cache[name]

    return get


def test_qwen_pair_gqa_shapes_and_scales(real):
    a6, a12 = real(QWEN6), real(QWEN12)
    assert a6.config.base_model_name_or_path == a12.config.base_model_name_or_path == "Qwen/Qwen2.5-0.5B-Instruct"
    assert a6.kinds() == a12.kinds() == ["q", "v"]
    assert a6.layers() == a12.layers() == list(range(24))
    q6, v6 = a6.modules[ModuleKey("model", 0, "q")], a6.modules[ModuleKey("model", 0, "v")]
    assert q6.shape == (896, 896) and v6.shape == (128, 896) and v6.B.shape == (128, 6)
    assert a12.modules[ModuleKey("model", 23, "v")].B.shape == (128, 12)
    assert q6.scale == pytest.approx(32 / 6) and a12.modules[ModuleKey("model", 0, "q")].scale == pytest.approx(32 / 12)
    assert round(q6.scale, 2) == 5.33 and round(a12.modules[ModuleKey("model", 5, "v")].scale, 2) == 2.67
    assert not a6.unmapped and not a6.other_tensors
    assert a6.content_hash != a12.content_hash


def test_gpt2_c_attn_split_and_c_proj_distinguished(real, real_adapters_dir):
    a = real(GPT2)
    assert a.config.fan_in_fan_out
    assert a.kinds() == ["q", "k", "v", "o", "down"] and a.layers() == list(range(12))
    raw = load_file(str(real_adapters_dir / GPT2 / "adapter_model.safetensors"))
    fused_b = raw["base_model.model.transformer.h.3.attn.c_attn.lora_B.weight"]
    fused_a = raw["base_model.model.transformer.h.3.attn.c_attn.lora_A.weight"]
    for i, kind in enumerate("qkv"):
        m = a.modules[ModuleKey("model", 3, kind)]
        assert m.rows == (768 * i, 768 * (i + 1)) and m.B.shape == (768, 8)
        torch.testing.assert_close(m.B, fused_b[768 * i : 768 * (i + 1)])
        torch.testing.assert_close(m.A, fused_a)
    o, down = a.modules[ModuleKey("model", 3, "o")], a.modules[ModuleKey("model", 3, "down")]
    assert o.name == "transformer.h.3.attn.c_proj" and o.A.shape == (8, 768)
    assert down.name == "transformer.h.3.mlp.c_proj" and down.A.shape == (8, 3072)
    assert a.n_params() == sum(t.numel() for t in raw.values())


def test_gpt_neo_keys(real):
    a = real(NEO)
    assert a.kinds() == ["q", "v"] and a.layers() == list(range(12))
    m = a.modules[ModuleKey("model", 11, "v")]
    assert m.name == "transformer.h.11.attn.attention.v_proj" and m.shape == (768, 768) and m.scale == 2.0


def test_bloom_legacy_loaded_exactly(real, real_adapters_dir):
    a = real(BLOOM)
    assert any("legacy peft<=0.2" in w for w in a.warnings)
    assert a.kinds() == ["qkv"] and a.layers() == list(range(24))
    state = torch.load(real_adapters_dir / BLOOM / "adapter_model.bin", weights_only=True, map_location="cpu")
    key = "base_model.model.transformer.h.5.self_attention.query_key_value"
    A, B = state[key + ".lora_A.weight"].double(), state[key + ".lora_B.weight"].double()
    m = a.modules[ModuleKey("model", 5, "qkv")]
    assert m.shape == (3072, 1024) and m.rank == 16 and m.r == 8 and m.scale == 2.0
    x = torch.randn(4, 1024, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x @ m.dense().T, legacy_forward(x, A, B, [True, False, True], 2.0))
    assert torch.count_nonzero(m.B[1024:2048]) == 0  # the disabled middle third is untouched


def test_summaries_are_json_ready(real):
    import json

    for name in (QWEN6, QWEN12, GPT2, NEO, BLOOM):
        s = adapter_summary(real(name))
        json.dumps(s)
        assert s["n_modules"] == len(s["modules"]) and s["unmapped"] == []
