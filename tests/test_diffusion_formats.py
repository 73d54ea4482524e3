"""Diffusion LoRAs (geometry.io.diffusion): kohya and diffusers files built here with the key names the
tools write, peft UNet adapters; naming, per-module alpha, analyses, and merges written back in the format
they came in (keys, shapes and updates round trip). No diffusion model is run."""

from __future__ import annotations

import io
import json
import zipfile

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save

import geometry
from geometry.cli.analysis import format_summary
from geometry.errors import AdapterLoadError
from geometry.io.diffusion import diffusers_path, kohya_path
from geometry.io.loader import load_adapter, load_files
from geometry.io.summary import adapter_summary
from geometry.types import ModuleKey

R = 4

#: kohya SD 1.x modules: name -> (out, in) or (out, in, kh, kw) for a conv.
SD1 = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (32, 32),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k": (32, 32),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0": (32, 32),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (32, 24),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj": (64, 32),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2": (32, 32),
    "lora_unet_down_blocks_0_attentions_0_proj_in": (32, 32, 1, 1),
    "lora_unet_down_blocks_0_resnets_0_conv1": (32, 16, 3, 3),
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_v": (48, 48),
    "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn2_to_q": (40, 40),
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (24, 24),
    "lora_te_text_model_encoder_layers_11_mlp_fc1": (48, 24),
}
SD1_KEYS = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": ModuleKey("unet", 0, "to_q"),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0": ModuleKey("unet", 0, "to_out"),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": ModuleKey("unet", 0, "cross_to_k"),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj": ModuleKey("unet", 0, "ff_in"),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2": ModuleKey("unet", 0, "ff_out"),
    "lora_unet_down_blocks_0_attentions_0_proj_in": ModuleKey("unet", 0, "proj_in"),
    "lora_unet_down_blocks_0_resnets_0_conv1": ModuleKey("unet", 0, "res_conv1"),
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_v": ModuleKey("unet", 400, "to_v"),
    "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn2_to_q": ModuleKey("unet", 620, "cross_to_q"),
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": ModuleKey("text_encoder", 0, "q"),
    "lora_te_text_model_encoder_layers_11_mlp_fc1": ModuleKey("text_encoder", 11, "fc_in"),
}
#: kohya SDXL (LDM UNet names, two text encoders).
SDXL = {
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": (32, 32),
    "lora_unet_input_blocks_8_1_transformer_blocks_1_attn2_to_k": (32, 40),
    "lora_unet_middle_block_1_transformer_blocks_9_attn1_to_k": (48, 48),
    "lora_unet_output_blocks_0_1_transformer_blocks_3_ff_net_2": (48, 48),
    "lora_unet_output_blocks_5_1_proj_out": (32, 32),
    "lora_te1_text_model_encoder_layers_0_self_attn_v_proj": (24, 24),
    "lora_te2_text_model_encoder_layers_3_self_attn_out_proj": (40, 40),
}
SDXL_KEYS = {
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": ModuleKey("unet", 100, "to_q"),
    "lora_unet_input_blocks_8_1_transformer_blocks_1_attn2_to_k": ModuleKey("unet", 211, "cross_to_k"),
    "lora_unet_middle_block_1_transformer_blocks_9_attn1_to_k": ModuleKey("unet", 409, "to_k"),
    "lora_unet_output_blocks_0_1_transformer_blocks_3_ff_net_2": ModuleKey("unet", 503, "ff_out"),
    "lora_unet_output_blocks_5_1_proj_out": ModuleKey("unet", 620, "proj_out"),
    "lora_te1_text_model_encoder_layers_0_self_attn_v_proj": ModuleKey("text_encoder", 0, "v"),
    "lora_te2_text_model_encoder_layers_3_self_attn_out_proj": ModuleKey("text_encoder_2", 3, "o"),
}
#: kohya Flux (BFL names): fused qkv (3 x in) and single-block linear1 (7 x in) split exactly.
FLUX = {
    "lora_unet_double_blocks_0_img_attn_qkv": (48, 16),
    "lora_unet_double_blocks_0_txt_attn_proj": (16, 16),
    "lora_unet_double_blocks_1_img_mlp_0": (64, 16),
    "lora_unet_single_blocks_2_linear1": (112, 16),
    "lora_unet_single_blocks_2_linear2": (16, 80),
}


def _kohya(spec: dict, seed: int, alphas: dict | None = None, dtype=torch.float16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i, (name, shape) in enumerate(spec.items()):
        out, inp, *k = shape
        sd[f"{name}.lora_down.weight"] = torch.randn(R, inp, *k, generator=g).to(dtype)
        sd[f"{name}.lora_up.weight"] = torch.randn(out, R, *([1, 1] if k else []), generator=g).to(dtype)
        alpha = (alphas or {}).get(name, float(i % 3 + 1))
        if alpha is not None:
            sd[f"{name}.alpha"] = torch.tensor(alpha, dtype=dtype)
    return sd


def _dense(sd: dict, name: str, down: str = ".lora_down.weight", up: str = ".lora_up.weight",
           alpha_key: str | None = None) -> torch.Tensor:
    A, B = sd[name + down].double(), sd[name + up].double()
    A, B = A.reshape(A.shape[0], -1), B.reshape(B.shape[0], -1)
    alpha_key = alpha_key if alpha_key is not None else name + ".alpha"
    alpha = float(sd[alpha_key]) if alpha_key in sd else A.shape[0]
    return alpha / A.shape[0] * B @ A


def test_kohya_sd1_naming_alpha_and_updates():
    sd = _kohya(SD1, 0, alphas={"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k": None})
    ad = load_adapter(save(sd), name="sd1")
    assert ad.config.format == "kohya" and not ad.unmapped
    assert ad.stacks() == ["text_encoder", "unet"]
    for name, key in SD1_KEYS.items():
        assert ad.modules[key].name == name
    for key, mod in ad.modules.items():
        assert torch.allclose(mod.dense(), _dense(sd, mod.name), rtol=1e-6, atol=1e-6), key
        assert mod.A.dtype == torch.float32  # float16 in the file
    no_alpha = ad.modules[ModuleKey("unet", 0, "to_k")]
    assert no_alpha.alpha == R and no_alpha.scale == 1.0  # no .alpha: alpha = rank
    q = ad.modules[ModuleKey("unet", 0, "to_q")]
    assert q.alpha == 1.0 and q.scale == pytest.approx(1 / R)
    conv = ad.modules[ModuleKey("unet", 0, "res_conv1")]
    assert conv.shape == (32, 16 * 9) and ad.config.raw["conv_kernels"]["lora_unet_down_blocks_0_resnets_0_conv1"] == [3, 3]
    assert any("convolution" in w for w in ad.warnings)


def test_kohya_sdxl_ldm_names_and_two_text_encoders():
    ad = load_adapter(save(_kohya(SDXL, 1)), name="sdxl")
    assert {k: m.name for k, m in ad.modules.items()} == {v: k for k, v in SDXL_KEYS.items()}
    assert ad.stacks() == ["text_encoder", "text_encoder_2", "unet"]


def test_kohya_flux_fused_projections_split_exactly():
    sd = _kohya(FLUX, 2)
    ad = load_adapter(save(sd), name="flux")
    full = _dense(sd, "lora_unet_double_blocks_0_img_attn_qkv")
    for i, kind in enumerate(("to_q", "to_k", "to_v")):
        part = ad.modules[ModuleKey("transformer", 0, kind)]
        assert part.rows == (16 * i, 16 * (i + 1))
        assert torch.allclose(part.dense(), full[16 * i : 16 * (i + 1)], atol=1e-6)
    lin1 = [ad.modules[ModuleKey("transformer", 102, k)] for k in ("to_q", "to_k", "to_v", "proj_mlp")]
    assert [m.rows for m in lin1] == [(0, 16), (16, 32), (32, 48), (48, 112)]
    assert ModuleKey("transformer", 0, "to_add_out") in ad.modules
    assert ModuleKey("transformer", 1, "ff_in") in ad.modules
    assert ModuleKey("transformer", 102, "proj_out") in ad.modules


def _diffusers(seed: int, style: str) -> dict[str, torch.Tensor]:
    """diffusers files: ``processor`` (attention processors, text encoder ``lora_linear_layer``), ``lora``
    (``.lora.down.weight``), ``peft`` (``lora_A`` / ``lora_B`` with ``.alpha``)."""
    g = torch.Generator().manual_seed(seed)
    mods = {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (32, 32),
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0": (32, 32),
        "unet.up_blocks.3.attentions.1.transformer_blocks.0.attn1.to_v": (24, 24),
        "text_encoder.text_model.encoder.layers.2.self_attn.k_proj": (16, 16),
    }
    sd = {}
    for path, (out, inp) in mods.items():
        down, up = torch.randn(R, inp, generator=g), torch.randn(out, R, generator=g)
        if style == "processor" and path.startswith("unet"):
            head, _, last = path.removesuffix(".0").rpartition(".")
            stem = f"{head}.processor.{last}_lora"
            sd[f"{stem}.down.weight"], sd[f"{stem}.up.weight"] = down, up
        elif style == "processor":
            sd[f"{path}.lora_linear_layer.down.weight"], sd[f"{path}.lora_linear_layer.up.weight"] = down, up
        elif style == "lora":
            sd[f"{path}.lora.down.weight"], sd[f"{path}.lora.up.weight"] = down, up
        else:
            sd[f"{path}.lora_A.weight"], sd[f"{path}.lora_B.weight"] = down, up
            sd[f"{path}.alpha"] = torch.tensor(2.0)
    return sd


DIFFUSERS_KEYS = {ModuleKey("unet", 0, "to_q"), ModuleKey("unet", 0, "cross_to_out"), ModuleKey("unet", 810, "to_v"),
                  ModuleKey("text_encoder", 2, "k")}


@pytest.mark.parametrize("style", ["processor", "lora", "peft"])
def test_diffusers_styles_load_with_the_same_keys(style):
    sd = _diffusers(3, style)
    ad = load_files({"pytorch_lora_weights.safetensors": save(sd)}, name=style)
    assert ad.config.format == "diffusers" and set(ad.modules) == DIFFUSERS_KEYS
    for mod in ad.modules.values():
        if style == "peft":
            want = _dense(sd, mod.name, ".lora_A.weight", ".lora_B.weight")
            assert mod.alpha == 2.0
        else:
            want = _dense(sd, mod.name, ".down.weight", ".up.weight", alpha_key="-")
            assert mod.scale == 1.0
        assert torch.allclose(mod.dense(), want, atol=1e-6)


def test_path_helpers():
    assert kohya_path("lora_te2_text_model_encoder_layers_3_mlp_fc2") == "text_encoder_2.text_model.encoder.layers.3.mlp.fc2"
    assert kohya_path("lora_unet_double_blocks_0_img_attn_qkv") == "transformer.double_blocks.0.img_attn.qkv"
    assert kohya_path("model.layers.0") is None
    assert diffusers_path("unet.mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora") == \
        "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0"


def test_peft_unet_adapter_gets_block_and_projection_kinds():
    g = torch.Generator().manual_seed(4)
    P = "base_model.model."
    names = {
        "down_blocks.1.attentions.1.transformer_blocks.0.attn1.to_k": (ModuleKey("unet", 110, "to_k"), 32),
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_q": (ModuleKey("unet", 400, "cross_to_q"), 32),
        "up_blocks.2.attentions.0.transformer_blocks.0.ff.net.2": (ModuleKey("unet", 700, "ff_out"), 32),
        "transformer_blocks.3.attn.add_k_proj": (ModuleKey("transformer", 3, "add_k"), 16),
    }
    sd = {}
    for name, (_, d) in names.items():
        sd[P + name + ".lora_A.weight"] = torch.randn(R, d, generator=g)
        sd[P + name + ".lora_B.weight"] = torch.randn(d, R, generator=g)
    cfg = {"peft_type": "LORA", "r": R, "lora_alpha": 8, "target_modules": ["to_k", "to_q", "ff.net.2", "add_k_proj"]}
    ad = load_files({"adapter_config.json": json.dumps(cfg).encode(), "adapter_model.safetensors": save(sd)})
    assert {k: m.name for k, m in ad.modules.items()} == {key: name for name, (key, _) in names.items()}
    assert ad.config.format == "peft" and not ad.unmapped
    assert all(m.scale == 2.0 for m in ad.modules.values())


def test_geometry_inclusion_anatomy_run_on_kohya_adapters():
    a = load_adapter(save(_kohya(SD1, 5)), name="a")
    b = load_adapter(save(_kohya(SD1, 6)), name="b")
    dist = geometry.distances([a, b])
    assert dist.shape == (2, 2) and float(dist.iloc[0, 1]) > 0
    inc = geometry.inclusion(a, b)
    assert len(inc) == len(a.modules) and set(inc["stack"]) == {"unet", "text_encoder"}
    anat = geometry.anatomy(a)
    assert len(anat) == len(a.modules)


def _roundtrip(a, b, tmp_path, method: str = "task_arithmetic"):
    merged = geometry.merge([a, b], method=method)
    folder = merged.to_peft_folder(tmp_path / f"{a.config.format}-{method}")
    back = load_adapter(folder)
    assert back.config.format == a.config.format
    assert set(back.modules) == set(a.modules)
    return merged, folder, back


@pytest.mark.parametrize("spec", [SD1, SDXL, FLUX], ids=["sd1", "sdxl", "flux"])
def test_kohya_merge_round_trip_keys_shapes_and_updates(tmp_path, spec):
    sa, sb = _kohya(spec, 7), _kohya(spec, 8)
    a, b = load_adapter(save(sa), name="a"), load_adapter(save(sb), name="b")
    _, folder, back = _roundtrip(a, b, tmp_path)
    files = sorted(p.name for p in folder.iterdir())
    assert files == ["README.md", "lora.safetensors", "merge_info.json", "recipe.yaml"]  # README.md: the model card
    assert "library_name: diffusers" in (folder / "README.md").read_text()
    written = st_load((folder / "lora.safetensors").read_bytes())
    factor_keys = {k for k in sa if not k.endswith(".alpha")}
    assert {k for k in written if not k.endswith(".alpha")} == factor_keys
    assert {k for k in written if k.endswith(".alpha")} == {k.replace(".lora_down.weight", ".alpha")
                                                             for k in sa if k.endswith(".lora_down.weight")}
    for key in factor_keys:  # same rank of dims; the rank grows to 2 R (exact sum)
        assert written[key].dim() == sa[key].dim()
        if key.endswith("lora_down.weight"):
            assert written[key].shape[1:] == sa[key].shape[1:]
        else:
            assert written[key].shape[0] == sa[key].shape[0] and written[key].shape[2:] == sa[key].shape[2:]
    for key, mod in back.modules.items():
        want = a.modules[key].dense() + b.modules[key].dense()
        assert mod.name == a.modules[key].name
        assert torch.allclose(mod.dense(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max())), key


@pytest.mark.parametrize("style", ["processor", "lora", "peft"])
def test_diffusers_merge_round_trip(tmp_path, style):
    sa, sb = _diffusers(9, style), _diffusers(10, style)
    a = load_files({"a.safetensors": save(sa)}, name="a")
    b = load_files({"b.safetensors": save(sb)}, name="b")
    merged, folder, back = _roundtrip(a, b, tmp_path)
    written = st_load((folder / "pytorch_lora_weights.safetensors").read_bytes())
    assert {k for k in written} == {k for k in sa if not k.endswith(".alpha")}
    for key, mod in back.modules.items():
        want = a.modules[key].dense() + b.modules[key].dense()
        assert torch.allclose(mod.dense(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max())), key
    zipped = load_adapter(merged.to_zip_bytes())  # the download button's zip loads the same
    assert set(zipped.modules) == set(a.modules) and zipped.config.format == "diffusers"


def test_ties_merge_writes_kohya(tmp_path):
    a, b = load_adapter(save(_kohya(SD1, 11)), name="a"), load_adapter(save(_kohya(SD1, 12)), name="b")
    _, folder, back = _roundtrip(a, b, tmp_path, method="ties")
    assert (folder / "lora.safetensors").is_file() and len(back.modules) == len(a.modules)


def test_every_source_detects_the_format(tmp_path):
    data = save(_kohya(SD1, 13))
    (tmp_path / "my_style.safetensors").write_bytes(data)
    assert load_adapter(tmp_path / "my_style.safetensors").name == "my_style"
    folder = tmp_path / "dfolder"
    folder.mkdir()
    (folder / "pytorch_lora_weights.safetensors").write_bytes(save(_diffusers(14, "peft")))
    assert load_adapter(folder).config.format == "diffusers"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("style/my_style.safetensors", data)
    assert load_adapter(buf.getvalue()).config.format == "kohya"
    ads = geometry.load({"one.safetensors": data, "two.safetensors": save(_kohya(SD1, 15))})
    assert [a.name for a in ads.adapters] == ["one", "two"]


def test_info_and_overview_show_format_and_variant():
    ad = load_adapter(save(_kohya(SD1, 16)), name="k")
    s = adapter_summary(ad)
    assert (s["format"], s["variant"]) == ("kohya", "LoRA")
    assert "format: kohya" in format_summary(s) and "variant: LoRA" in format_summary(s)
    from geometry.adapter_set import AdapterSet

    aset = AdapterSet()
    aset.add(ad)
    table = aset.summary()
    assert list(table["format"]) == ["kohya"] and list(table["variant"]) == ["LoRA"]


def _bad(sd: dict) -> str:
    with pytest.raises(AdapterLoadError) as exc:
        load_adapter(save(sd), name="bad")
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


@pytest.mark.parametrize("sd, words", [
    ({K + ".lora_down.weight": torch.ones(4, 8)}, [K, "no lora_up"]),
    ({K + ".lora_down.weight": torch.ones(4, 8), K + ".lora_up.weight": torch.ones(8, 3)}, ["rank 4", "rank 3"]),
    ({K + ".lora_down.weight": torch.ones(4, 8), K + ".lora_up.weight": torch.ones(8, 4),
      K + ".alpha": torch.ones(2)}, [K + ".alpha", "expected one number"]),
    ({K + ".lora_down.weight": torch.ones(4, 8), K + ".lora_up.weight": torch.ones(8, 4),
      K + ".alpha": torch.tensor(-1.0)}, [K + ".alpha", "positive alpha"]),
    ({K + ".lora_down.weight": torch.tensor([[float("nan")] * 8] * 4), K + ".lora_up.weight": torch.ones(8, 4)},
     [K + ".lora_down.weight", "NaN"]),
    ({K + ".lora_down.weight": torch.ones(4, 8, 2), K + ".lora_up.weight": torch.ones(8, 4)},
     [K + ".lora_down.weight", "expected 2-D"]),
    ({K + ".lora_down.weight": torch.ones(4, 8, 3, 3), K + ".lora_up.weight": torch.ones(8, 4, 3, 3)},
     [K + ".lora_up.weight", "(out, r, 1, 1)"]),
    ({K + ".lora_down.weight": torch.ones(4, 8, dtype=torch.int32), K + ".lora_up.weight": torch.ones(8, 4)},
     [K + ".lora_down.weight", "dtype torch.int32"]),
    ({K + ".hada_w1_a": torch.ones(8, 4)}, [K + ".hada_w1_a", "LoHa / LoKr", "not read"]),
    ({K + ".lora_mid.weight": torch.ones(4, 4, 3, 3)}, ["lora_mid", "Tucker"]),
    ({K + ".dora_scale": torch.ones(1, 8)}, ["dora_scale", "DoRA"]),
    ({"unet.down_blocks.0.attn1.to_q.lora_A.weight": torch.ones(4, 8)}, ["unet.down_blocks.0.attn1.to_q", "no up"]),
    ({"some.weight": torch.ones(2)}, ["no adapter_config.json", "no kohya"]),
])
def test_malformed_diffusion_files_one_clear_error(sd, words):
    msg = _bad(sd)
    assert all(w in msg for w in words), msg


def test_two_weight_files_without_config_are_refused(tmp_path):
    for n in ("a", "b"):
        (tmp_path / f"{n}.safetensors").write_bytes(save(_kohya(SD1, 17)))
    with pytest.raises(AdapterLoadError, match="several .safetensors"):
        load_adapter(tmp_path)


def test_truncated_kohya_file_names_the_file(tmp_path):
    data = save(_kohya(SD1, 18))[:-10]
    (tmp_path / "cut.safetensors").write_bytes(data)
    with pytest.raises(AdapterLoadError, match="cut.safetensors: cannot read as safetensors"):
        load_adapter(tmp_path / "cut.safetensors")


def test_a_folder_of_kohya_files_is_a_set(tmp_path):
    for i, n in enumerate(("style_a", "style_b", "style_c")):
        (tmp_path / f"{n}.safetensors").write_bytes(save(_kohya(SD1, 20 + i)))
    ads = geometry.load(tmp_path)
    assert [a.name for a in ads.adapters] == ["style_a", "style_b", "style_c"]
    assert all(a.config.format == "kohya" for a in ads.adapters)


def test_ai_toolkit_style_kohya_transformer_names():
    name = "lora_transformer_single_transformer_blocks_0_attn_to_k"
    ad = load_adapter(save(_kohya({name: (16, 16)}, 19)), name="t")
    assert list(ad.modules) == [ModuleKey("transformer", 100, "to_k")]


def test_mutated_kohya_and_diffusers_files_raise_only_adapter_load_errors():
    """Random byte flips and odd names: an AdapterLoadError (one line) or a load, never another exception."""
    g = torch.Generator().manual_seed(0)
    odd = {"unet.down_blocks.\u00b2.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.ones(2, 4),
           "unet.down_blocks.\u00b2.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.ones(4, 2)}
    assert load_adapter(save(odd)).config.format == "diffusers"
    for base in (save(_kohya(SD1, 30)), save(_diffusers(31, "processor"))):
        for _ in range(40):
            data = bytearray(base)
            for pos in torch.randint(0, min(len(data), 4000), (3,), generator=g).tolist():
                data[pos] = int(torch.randint(0, 256, (1,), generator=g))
            try:
                load_adapter(bytes(data))
            except AdapterLoadError as exc:
                assert "\n" not in str(exc)
