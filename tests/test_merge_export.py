"""The peft export lives in geometry.merging.export; MergedAdapter's methods delegate to it."""

from __future__ import annotations

import json

import torch

from geometry.merging import base, export, merge
from geometry.testing import random_adapter

KINDS = {"q": (24, 20), "v": (16, 20)}


def test_export_module_holds_the_peft_writer():
    for name in ("to_peft_folder", "to_zip_bytes", "peft_payload", "choose_head"):
        assert callable(getattr(export, name)), name
    for name in ("_DROPPED_CONFIG_FIELDS", "MERGE_INFO", "HEADS_DIR", "_short", "_safe", "_contiguous"):
        assert name not in vars(base), name  # export helpers live in export.py only
    assert export.PEFT_PREFIX is __import__("geometry.io.config", fromlist=["PEFT_PREFIX"]).PEFT_PREFIX


def test_delegates_write_the_same_payload(tmp_path):
    ads = [random_adapter(f"t{i}", layers=2, kinds=KINDS, r=3, seed=i) for i in range(2)]
    merged = merge(ads, "task_arithmetic", weights=[1.0, -0.5])
    w1, c1, i1 = merged._peft_payload(None, None)
    w2, c2, i2 = export.peft_payload(merged, None, None)
    assert c1 == c2 and i1 == i2 and all(torch.equal(w1[k], w2[k]) for k in w1)
    folder = merged.to_peft_folder(tmp_path / "m")
    same = export.to_peft_folder(merged, tmp_path / "n")
    for f in ("adapter_config.json", "merge_info.json"):
        assert json.loads((folder / f).read_text()) == json.loads((same / f).read_text())
    assert merged.to_zip_bytes()[:2] == b"PK"
    info = json.loads((folder / "merge_info.json").read_text())
    assert set(info["ranks"].values()) == {6}
    assert info["energy_kept_total"] == 1.0 and info["energy_kept_min"] == 1.0


def test_save_is_the_peft_folder_writer(tmp_path):
    ads = [random_adapter(f"s{i}", layers=1, kinds=KINDS, r=2, seed=i) for i in range(2)]
    merged = merge(ads, "ties", density=0.5)
    folder = merged.save(tmp_path / "s")
    info = json.loads((folder / "merge_info.json").read_text())
    assert set(info["ranks"].values()) == {4} and 0.0 < info["energy_kept_total"] <= 1.0
