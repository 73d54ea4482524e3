"""``python -m geometry info``: text and JSON output, errors as one ``error:`` line with status 2."""

from __future__ import annotations

import json

import pytest

from geometry.cli import main
from tests.families import save_adapter


@pytest.fixture(scope="module")
def two_adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    gpt2, _ = save_adapter("gpt2", root / "gpt2_lora", target_modules=["c_attn", "c_proj"])
    bert, _ = save_adapter("bert", root / "bert_lora")
    return gpt2, bert


def test_info_json(two_adapters, capsys):
    gpt2, bert = two_adapters
    assert main(["info", str(gpt2), str(bert), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    first, second = out["adapters"]
    assert first["name"] == "gpt2_lora" and second["name"] == "bert_lora"
    for key in ("base", "r", "alpha", "scale_rule", "scale", "modules", "unmapped", "other_tensors", "kinds", "layers"):
        assert key in first
    assert (first["r"], first["alpha"], first["scale_rule"], first["scale"]) == (4, 8.0, "alpha/r", 2.0)
    assert first["kinds"] == ["q", "k", "v", "o", "down"]
    mod = first["modules"][0]
    assert {k: mod[k] for k in ("stack", "layer", "kind", "shape", "rank")} == {
        "stack": "model", "layer": 0, "kind": "q", "shape": [32, 32], "rank": 4}
    assert mod["rows"] == [0, 32]
    assert second["unmapped"] == ["bert.pooler.dense"]
    assert set(second["other_tensors"]) == {"base_model.model.classifier.weight", "base_model.model.classifier.bias"}
    assert second["other_tensors"]["base_model.model.classifier.weight"] == [3, 32]


def test_info_text(two_adapters, capsys):
    gpt2, bert = two_adapters
    assert main(["info", str(bert)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("adapter bert_lora")
    assert "scale: alpha/r = 2" in out
    assert "unmapped: bert.pooler.dense" in out
    assert "base_model.model.classifier.weight [3, 32]" in out
    assert "model        1 down" in out


@pytest.mark.parametrize("make_bad", ["missing", "not_adapter", "bad_json"])
def test_info_bad_input_exits_2_with_error_line(tmp_path, capsys, make_bad):
    target = tmp_path / "x"
    if make_bad == "not_adapter":
        target.write_text("hello")
    elif make_bad == "bad_json":
        target.mkdir()
        (target / "adapter_config.json").write_text("{")
        (target / "adapter_model.safetensors").write_bytes(b"")
    assert main(["info", str(target)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(target) in lines[0]
    assert captured.out == ""
