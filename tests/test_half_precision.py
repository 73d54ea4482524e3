"""Half-precision (float16 / bfloat16) factors: converted to float32 at load, so that every computation runs in
float32 or float64; the geometry of a half-precision adapter equals its float32 copy's to half's own precision."""

from __future__ import annotations

import warnings

import pytest
import torch

import geometry
from geometry.io.loader import load_adapter
from geometry.linalg.dora import resolve_dora
from geometry.merging import merge
from tests.families import make_peft_model, tiny_model


def _save(pm, path, dtype):
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.data = p.data.to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("half")
    out = {}
    for seed in (0, 1):
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            name = f"{str(dtype).removeprefix('torch.')}-{seed}"
            pm = make_peft_model("llama", seed=seed)
            out[name] = _save(pm, root / name, dtype)
    for seed in (0, 1):  # the half files' values, upcast and saved in float32
        for half, tag in ((torch.float16, "f16as32"), (torch.bfloat16, "bf16as32")):
            pm = make_peft_model("llama", seed=seed)
            with torch.no_grad():
                for name, p in pm.named_parameters():
                    if "lora_" in name:
                        p.data = p.data.to(half).to(torch.float32)
            out[f"{tag}-{seed}"] = _save(pm, root / f"{tag}-{seed}", torch.float32)
    out["dora16"] = _save(make_peft_model("llama", use_dora=True), root / "dora16", torch.float16)
    return out


@pytest.mark.parametrize("half, tag", [("float16", "f16as32"), ("bfloat16", "bf16as32")])
def test_half_factors_are_float32_after_load_and_give_the_same_geometry(folders, half, tag):
    from safetensors.torch import load_file

    stored = load_file(str(folders[f"{half}-0"] / "adapter_model.safetensors"))
    assert {str(t.dtype) for t in stored.values()} == {f"torch.{half}"}
    a, b = load_adapter(folders[f"{half}-0"]), load_adapter(folders[f"{half}-1"])
    for ad in (a, b):
        assert all(m.A.dtype == torch.float32 and m.B.dtype == torch.float32 for m in ad.modules.values())
    ra, rb = load_adapter(folders[f"{tag}-0"]), load_adapter(folders[f"{tag}-1"])
    for key, mod in a.modules.items():  # the same numbers, exactly (half -> float32 is exact)
        assert torch.equal(mod.A, ra.modules[key].A) and torch.equal(mod.B, ra.modules[key].B)
    fa, fb = load_adapter(folders["float32-0"]), load_adapter(folders["float32-1"])
    for metric in ("cosine", "l2", "grassmann"):
        got = geometry.distances([a, b], metric=metric, kind="q").iloc[0, 1]
        ref = geometry.distances([ra, rb], metric=metric, kind="q").iloc[0, 1]
        full = geometry.distances([fa, fb], metric=metric, kind="q").iloc[0, 1]
        assert got == pytest.approx(ref, rel=1e-9)
        assert got == pytest.approx(full, rel=1e-3)  # measured: <= 1.5e-5 for both
    merged = merge([a, b], "task_arithmetic")
    assert all(m.A.dtype != torch.float16 and m.A.dtype != torch.bfloat16 for m in merged.modules.values())
    frame = geometry.anatomy(a)
    assert len(frame) == len(a.modules)


def test_half_dora_magnitude_is_float32_and_resolves(folders):
    adapter = load_adapter(folders["dora16"])
    assert all(m.magnitude.dtype == torch.float32 for m in adapter.modules.values())
    exact = resolve_dora(adapter, tiny_model("llama").half())  # a half base: W0 is read in float64
    assert all(m.A.dtype == torch.float32 and m.dora_exact for m in exact.modules.values())
