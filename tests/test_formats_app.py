"""The new formats where users meet them: the CLI and the dashboard's upload (issue "The adapters people
actually have"). A DoRA adapter on the sample base (all-MiniLM-L6-v2, installed locally) gets its exact
updates on load; a kohya file uploaded in the browser loads as kohya; nothing is downloaded."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
import torch

import geometry
from geometry.cli import main
from geometry.linalg.dora import DIRECTION_ONLY, EXACT, dora_status
from geometry.runtime.base_models import MINILM, resolve_base
from tests.app_fixtures import app_test

pytestmark = pytest.mark.slow  # loads the real base model


@pytest.fixture(scope="module")
def dora_folder(tmp_path_factory) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    torch.manual_seed(0)
    base = AutoModel.from_pretrained(resolve_base(MINILM))
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], use_dora=True, init_lora_weights=False)
    model = get_peft_model(base, cfg)
    with torch.no_grad():  # a magnitude away from ||W0 + s B A|| (what training does)
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1.0 + 0.1 * torch.rand_like(p))
    out = tmp_path_factory.mktemp("dora") / "dora_minilm"
    model.save_pretrained(out)
    cfg_path = out / "adapter_config.json"
    cfg_path.write_text(cfg_path.read_text().replace(str(resolve_base(MINILM)), MINILM))  # portable name
    return out


def test_cli_uses_the_exact_dora_update_when_the_base_is_here(dora_folder, capsys):
    assert main(["info", str(dora_folder)]) == 0
    err = capsys.readouterr().err
    assert EXACT in err and DIRECTION_ONLY not in err


def test_a_missing_base_keeps_the_direction_and_says_so(dora_folder, tmp_path, capsys):
    other = tmp_path / "elsewhere"
    other.mkdir()
    for f in dora_folder.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    cfg = other / "adapter_config.json"
    cfg.write_text(cfg.read_text().replace(MINILM, "someone/not-on-this-machine"))
    assert main(["anatomy", str(other), "--format", "json"]) == 0
    err = capsys.readouterr().err
    assert DIRECTION_ONLY in err and "not available locally" in err


def test_resolving_with_the_runtimes_base_equals_resolving_with_the_model(dora_folder):
    from transformers import AutoModel

    ad = geometry.load(dora_folder)["dora_minilm"]
    auto = geometry.resolve_dora(ad)
    explicit = geometry.resolve_dora(ad, base=AutoModel.from_pretrained(resolve_base(MINILM)))
    assert dora_status(ad) == "direction" and dora_status(auto) == dora_status(explicit) == "exact"
    for key in auto.modules:
        a, b = auto.modules[key], explicit.modules[key]
        torch.testing.assert_close(a.dense(torch.float64), b.dense(torch.float64), rtol=1e-6, atol=1e-7)


def _zip(folder: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for f in sorted(folder.iterdir()):
            z.write(f, f"{folder.name}/{f.name}")
    return buf.getvalue()


def _kohya_bytes() -> bytes:
    from safetensors.torch import save

    g = torch.Generator().manual_seed(3)
    sd = {}
    for name, (out, inp) in {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (32, 32),
                             "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k": (32, 32),
                             "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (16, 16)}.items():
        sd[f"{name}.lora_down.weight"] = torch.randn(4, inp, generator=g)
        sd[f"{name}.lora_up.weight"] = torch.randn(out, 4, generator=g)
        sd[f"{name}.alpha"] = torch.tensor(2.0)
    return save(sd)


def test_dora_and_kohya_uploads_in_the_dashboard(monkeypatch, tmp_path, dora_folder):
    at = app_test(monkeypatch, tmp_path, n=2)
    at.sidebar.file_uploader[0].set_value([
        ("dora_minilm.zip", _zip(dora_folder), "application/zip"),
        ("style.safetensors", _kohya_bytes(), "application/octet-stream"),
    ])
    at.run()
    assert not at.exception and not at.sidebar.error
    aset = at.session_state["adapter_set"]
    by_name = {a.name: a for a in aset.adapters}
    assert dora_status(by_name["dora_minilm"]) == "exact"
    kohya = next(a for a in aset.adapters if a.config.format == "kohya")
    assert {k.stack for k in kohya.modules} == {"unet", "text_encoder"}


def test_scoring_a_diffusion_lora_says_it_needs_a_diffusion_model():
    from geometry.runtime import Runtime

    ad = geometry.load({"style.safetensors": _kohya_bytes()})["style"]
    with pytest.raises(geometry.AtlasError, match="needs a diffusion model"):
        Runtime.for_sources([ad])
