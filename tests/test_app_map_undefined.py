"""Distances page: undefined distances (L2 / cosine on A or B between different ranks) are never drawn as 0.

Before the fix the page called ``np.nan_to_num`` before the 2-D map, so an r = 8 adapter among
r = 4 ones sat at distance 0 from every other adapter on the map.
"""

from __future__ import annotations

import pytest

from tests.app_fixtures import page_test, plotly_specs, write_adapter

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def mixed_ranks(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed") / "samples"
    for k in range(3):
        write_adapter(root / f"task{k}", seed=k, layers=3, r=4)
    write_adapter(root / "wide", seed=7, layers=3, r=8)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ADAPTER_ATLAS_SAMPLES", str(root))
        mp.setenv("ADAPTER_ATLAS_CACHE", str(root.parent / "cache"))
        yield root


def test_map_leaves_out_and_names_the_adapter_with_undefined_distances(mixed_ranks):
    at = page_test("distances.py", {"factor": "A"})
    assert not at.exception
    warnings = [w.value for w in at.warning]
    assert any("Left out of the map: wide" in w for w in warnings), warnings
    scatter = plotly_specs(at)[1]["data"][0]
    assert scatter["text"] == ["task0", "task1", "task2"]
    at.segmented_control(key="factor").set_value("BA").run()  # defined for every pair: nobody left out
    assert not any("Left out of the map" in w.value for w in at.warning)
    assert plotly_specs(at)[1]["data"][0]["text"] == ["task0", "task1", "task2", "wide"]


def test_a_zero_module_is_named_and_partial_means_say_how_many_layers(tmp_path, monkeypatch):
    """A module whose B is 0 (peft's init): Grassmann is undefined there, the page names the module and
    says which pairs averaged fewer layers."""

    from safetensors.torch import load_file, save_file

    root = tmp_path / "samples"
    for k in range(3):
        write_adapter(root / f"task{k}", seed=k, layers=3, r=4)
    weights = root / "task2" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = next(k for k in tensors if "layer.1." in k and "value" in k and "lora_B" in k)
    tensors[key] = tensors[key] * 0
    save_file(tensors, str(weights))
    monkeypatch.setenv("ADAPTER_ATLAS_SAMPLES", str(root))
    monkeypatch.setenv("ADAPTER_ATLAS_CACHE", str(tmp_path / "cache"))
    at = page_test("distances.py", {"metric": "Grassmann"})
    assert not at.exception
    captions = [c.value for c in at.caption]
    assert any("model.1.v of adapter 'task2' is zero" in c for c in captions), captions
    assert any("averaged 2 of 3 layers" in c for c in captions)
