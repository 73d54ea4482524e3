"""Merge recipes (geometry/merging/recipe.py, replay.py, mergekit_gta.py): round trips to the same bytes,
mergekit's meaning checked against mergekit's own code (v0.1.5, installed without dependencies by
requirements-nodeps.txt), its documented examples, the factored shortcut, and one clear error per bad field."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import geometry
from geometry.errors import MergeParameterError
from geometry.merging import MERGE_METHODS, merge
from geometry.merging.elementwise import module_seed
from geometry.merging.mergekit_gta import evaluate_setting, gta_tensors, layer_count, sparsify
from geometry.merging.recipe import read_recipe, recipe_of
from geometry.merging.replay import run_recipe
from geometry.testing import random_adapter

ROOT = Path(__file__).resolve().parents[1]
BASE = "synthetic/base"


@pytest.fixture(scope="module")
def ads():
    # non-square modules, different ranks per adapter (one rank-deficient: r = 6 on a 5-wide module)
    return [random_adapter("a", layers=3, kinds={"q": (7, 5), "v": (9, 6)}, r=2, seed=1),
            random_adapter("b", layers=3, kinds={"q": (7, 5), "v": (9, 6)}, r={"q": 3, "v": 6}, seed=2),
            random_adapter("c", layers=3, kinds={"q": (7, 5), "v": (9, 6)}, r=4, seed=3)]


def _dense(merged):
    """{module label: dense update} of a merge (B @ A or the stored dense update)."""
    out = {}
    for key, mod in merged.modules.items():
        out[key.label] = (mod.delta.double() if mod.delta is not None else mod.B.double() @ mod.A.double())
    return out


def _taus(adapters, key):
    return torch.stack([a.modules[key].scale * (a.modules[key].B.double() @ a.modules[key].A.double())
                        for a in adapters if key in a.modules])


@pytest.mark.parametrize("method", sorted(MERGE_METHODS))
def test_every_method_replays_from_its_recipe_to_the_same_bytes(ads, method):
    if method == "lora_average":  # needs equal ranks per module
        ads = [random_adapter(n, layers=3, kinds={"q": (7, 5), "v": (9, 6)}, r=3, seed=i) for i, n in enumerate("abc")]
    merged = merge(ads, method)
    text = merged.recipe()
    again = geometry.merge(ads, recipe=text)
    assert again.method == method and again.params == merged.params
    assert again.to_zip_bytes() == merged.to_zip_bytes()  # weights, config, merge_info, card, recipe.yaml
    data = read_recipe(text)
    assert data.merge_method == method and data.atlas["method"] == method
    assert [m.ref for m in data.adapters] == ["a", "b", "c"]


def test_recipe_is_in_every_export_and_its_card(ads, tmp_path):
    merged = merge(ads, "ties", [0.5, 0.3, 0.2], density=0.4)
    folder = merged.to_peft_folder(tmp_path / "m")
    text = (folder / "recipe.yaml").read_text()
    assert text == merged.recipe()
    card = (folder / "README.md").read_text()
    assert "## Recipe" in card and "merge_method: ties" in card and "density: 0.4" in card
    assert merged.to_zip_bytes() == merged.to_zip_bytes()  # deterministic zip (fixed dates)


def test_written_recipe_is_mergekit_shaped(ads):
    rec = recipe_of(merge(ads, "task_arithmetic", [1.0, 0.5, 0.25]), refs=["x/a", "x/b", "x/c"])
    d = rec.to_dict()
    assert d["models"][1] == {"model": f"{BASE}+x/b", "parameters": {"weight": 0.5}}
    assert d["merge_method"] == "task_arithmetic" and d["base_model"] == BASE
    assert d["parameters"] == {"normalize": False, "lambda": 1.0}


# ------------------------------------------------------------------------- mergekit's own code
@pytest.fixture(scope="module")
def mk_sparsify():
    return pytest.importorskip("mergekit.sparsify", reason="mergekit==0.1.5 (requirements-nodeps.txt) not installed")


def _mergekit_gta(mk_sparsify, taus, params, method, normalize, rescale, lam, seed=None):
    """mergekit 0.1.5's GTATask.execute on task vectors, with its own sparsify and get_mask."""
    from mergekit.merge_methods.generalized_task_arithmetic import get_mask

    from geometry.merging.recipe import GTA_METHODS

    spars, consensus, _, _ = GTA_METHODS[method]
    if seed is not None:
        torch.manual_seed(seed)
    deltas = []
    for tau, p in zip(taus, params):
        if spars:
            kwargs = {k: p[k] for k in ("gamma", "epsilon") if k in p}
            tau = mk_sparsify.sparsify(tau.clone(), density=p["density"], method=mk_sparsify.SparsificationMethod(spars),
                                       rescale_norm=mk_sparsify.RescaleNorm.l1 if rescale else None, **kwargs)
        deltas.append(tau)
    deltas = torch.stack(deltas)
    w = torch.tensor([p["weight"] for p in params], dtype=deltas.dtype).reshape(-1, 1, 1)
    deltas = deltas * w
    if consensus:
        mask = get_mask(deltas, method=consensus, mask_dtype=deltas.dtype)
        mixed = (deltas * mask).sum(0)
        divisor = (w * mask).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(0)
        divisor = w.sum(0).expand_as(mixed).clone()
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    return mixed * lam if lam != 1 else mixed


@pytest.mark.parametrize("method,params", [
    ("task_arithmetic", [{"weight": 1.0}, {"weight": 0.5}, {"weight": -0.3}]),
    ("ties", [{"weight": 1.0, "density": 0.5}, {"weight": 0.3, "density": 0.7}, {"weight": 0.6, "density": 0.2}]),
    ("breadcrumbs", [{"weight": 1.0, "density": 0.6, "gamma": 0.05}, {"weight": 0.5, "density": 0.4, "gamma": 0.1},
                     {"weight": 0.2, "density": 0.9, "gamma": 0.0}]),
    ("breadcrumbs_ties", [{"weight": 1.0, "density": 0.6, "gamma": 0.05}] * 3),
    ("dare_linear", [{"weight": 1.0, "density": 0.5}] * 3),
    ("dare_ties", [{"weight": 0.7, "density": 0.3}, {"weight": 1.0, "density": 0.6}, {"weight": 0.4, "density": 0.5}]),
    ("della", [{"weight": 1.0, "density": 0.5, "epsilon": 0.1}] * 3),
    ("della_linear", [{"weight": 1.0, "density": 0.4, "epsilon": 0.2}, {"weight": 0.5, "density": 0.6, "epsilon": 0.1},
                      {"weight": 0.8, "density": 0.5, "epsilon": 0.3}]),
])
@pytest.mark.parametrize("normalize,rescale,lam", [(True, True, 1.0), (False, False, 0.7)])
def test_gta_equals_mergekit_code(mk_sparsify, method, params, normalize, rescale, lam):
    """Every mergekit GTA method, with and without normalize / rescale / lambda, on non-square task vectors;
    the random ones draw the same masks (mergekit's global generator seeded as ours)."""
    g = torch.Generator().manual_seed(7)
    taus = torch.randn(3, 11, 8, generator=g, dtype=torch.float64)
    taus[1, :, :3] = 0.0  # exact zeros: ties in the sign election and in magnitude order
    ours = gta_tensors(taus, params, method, normalize=normalize, rescale=rescale, scale=lam,
                       generator=torch.Generator().manual_seed(123))
    theirs = _mergekit_gta(mk_sparsify, taus, params, method, normalize, rescale, lam, seed=123)
    # mergekit draws random masks in float32 and rescales there: agree to float32 rounding
    tol = 1e-5 if method.startswith(("dare", "della")) else 1e-12
    torch.testing.assert_close(ours, theirs, rtol=tol, atol=tol)


@pytest.mark.parametrize("spars", ["magnitude", "magnitude_outliers"])
@pytest.mark.parametrize("density", [0.01, 0.3, 0.99])
def test_sparsify_equals_mergekit(mk_sparsify, spars, density):
    tau = torch.randn(13, 17, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for rescale in (False, True):
        ours = sparsify(tau, density, spars, rescale=rescale, gamma=0.02)
        kw = {"gamma": 0.02} if spars == "magnitude_outliers" else {}
        theirs = mk_sparsify.sparsify(tau.clone(), density=density, method=mk_sparsify.SparsificationMethod(spars),
                                      rescale_norm=mk_sparsify.RescaleNorm.l1 if rescale else None, **kw)
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_evaluate_setting_follows_mergekit():
    cases = [0.5, [1, 0.7, 0.1], [0, 0.3, 0.7, 1], [{"filter": "mlp", "value": 0.5}, {"value": 0}],
             [{"filter": "q_proj", "value": [0.2, 0.8]}, {"value": 1}]]
    expect = {  # mergekit.config.evaluate_setting, by hand from its source (it needs immutables to import)
        (0, "x.mlp.up", 0.0): 0.5, (1, "x", 0.5): 0.7, (1, "x", 0.25): 0.85, (2, "x", 1.0): 1,
        (3, "x.mlp.up", 0.3): 0.5, (3, "x.attn.q", 0.3): 0, (4, "l.q_proj", 0.5): 0.5, (4, "l.v_proj", 0.5): 1,
    }
    for (i, name, t), value in expect.items():
        assert evaluate_setting(cases[i], name, t) == pytest.approx(value)


# ------------------------------------------------------------------------- recipes run factored / dense
def _recipe(method, models, parameters=None, base=BASE):
    out = {"models": [{"model": f"{base}+{ref}", "parameters": p} for ref, p in models], "merge_method": method,
           "base_model": base}
    if parameters:
        out["parameters"] = parameters
    return out


def test_linear_and_task_arithmetic_are_factored_and_equal_the_dense_path(ads):
    """Scalar weights run as exact factored task arithmetic; the same recipe through mergekit's dense
    routine (forced by a filter that matches everything) gives the same updates."""
    for method, shared in (("linear", None), ("task_arithmetic", {"lambda": 0.6}),
                           ("task_arithmetic", {"normalize": True})):
        models = [("a", {"weight": 1.0}), ("b", {"weight": 0.5}), ("c", {"weight": 2.0})]
        fact = run_recipe(_recipe(method, models, shared), ads)
        assert all(m.delta is None and m.energy_kept == 1.0 for m in fact.modules.values())  # never dense
        dense_models = [(r, {"weight": [{"filter": "*", "value": p["weight"]}]}) for r, p in models]
        dense = run_recipe(_recipe(method, dense_models, shared), ads)
        w = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
        scale = (0.6 if shared and "lambda" in shared else 1.0) / (
            float(w.sum()) if method == "linear" or (shared or {}).get("normalize") else 1.0)
        a, b = _dense(fact), _dense(dense)
        for key in ads[0].modules:
            direct = (w.reshape(-1, 1, 1) * _taus(ads, key)).sum(0) * scale
            torch.testing.assert_close(a[key.label], direct, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(b[key.label], direct, rtol=1e-5, atol=1e-6)


def test_linear_with_the_base_as_a_model_halves_the_task_vector(ads):
    rec = {"models": [{"model": BASE, "parameters": {"weight": 1.0}},
                      {"model": f"{BASE}+a", "parameters": {"weight": 1.0}}], "merge_method": "linear",
           "base_model": BASE}
    merged = run_recipe(rec, ads[:1])
    key = next(iter(ads[0].modules))
    torch.testing.assert_close(_dense(merged)[key.label], 0.5 * _taus(ads[:1], key)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["ties", "dare_ties", "breadcrumbs", "della_linear"])
def test_mergekit_recipes_run_with_mergekits_meaning(ads, name):
    """Gradients over layers and filters resolved per module, then mergekit's formula on that module."""
    models = [("a", {"weight": 1.0, "density": [1.0, 0.5]}),
              ("b", {"weight": [{"filter": "q", "value": 0.3}, {"value": 0.8}], "density": 0.6}),
              ("c", {"weight": 0.5, "density": 0.45})]
    shared = {"epsilon": 0.1} if name.startswith("della") else {"gamma": 0.05} if name.startswith("breadcrumbs") else None
    merged = run_recipe(_recipe(name, models, shared), ads, device="cpu")
    assert merged.method == f"mergekit:{name}"
    n_layers = layer_count(ads)
    for key, mod in merged.modules.items():
        t = key.layer / (n_layers - 1)
        mod_name = ads[0].modules[key].name
        params = [{"weight": 1.0, "density": 1.0 + t * (0.5 - 1.0)},
                  {"weight": 0.3 if "q" in mod_name else 0.8, "density": 0.6},
                  {"weight": 0.5, "density": 0.45}]
        for p in params:
            p.update(shared or {})
        from geometry.merging.recipe import GTA_METHODS

        _, _, normalize, rescale = GTA_METHODS[name]
        expect = gta_tensors(_taus(ads, key), params, name, normalize=normalize, rescale=rescale, scale=1.0,
                             generator=torch.Generator().manual_seed(module_seed(0, key)))
        got = mod.B.double() @ mod.A.double()
        torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-5 * float(expect.abs().max()) + 1e-9)
        assert mod.energy_kept == pytest.approx(1.0, abs=1e-6)  # rank sum >= the update's rank here


MERGEKIT_DOCS = {  # mergekit's documented examples (examples/*.yml, docs/merge_methods.md), models as BASE+LORA
    "ties": """
models:
  - model: synthetic/base+a
    parameters: {density: [1, 0.7, 0.1], weight: 1.0}
  - model: synthetic/base+b
    parameters: {density: 0.5, weight: [0, 0.3, 0.7, 1]}
  - model: synthetic/base+c
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: synthetic/base
parameters: {normalize: true, int8_mask: true}
dtype: float16
""",
    "task_arithmetic": """
merge_method: task_arithmetic
base_model: synthetic/base
models:
  - model: synthetic/base+a
    parameters: {weight: 0.5}
  - model: synthetic/base+b
    parameters: {weight: 0.5}
parameters: {lambda: 0.9}
""",
    "dare_ties": """
models:
  - model: synthetic/base+a
    parameters: {weight: 0.5, density: 0.5}
  - model: synthetic/base+b
    parameters: {weight: 0.5, density: 0.5}
merge_method: dare_ties
base_model: synthetic/base
parameters: {int8_mask: true}
dtype: bfloat16
""",
    "breadcrumbs": """
models:
  - model: synthetic/base+a
    parameters: {weight: 1.0, density: 0.9, gamma: 0.01}
  - model: synthetic/base+b
    parameters: {weight: 1.0, density: 0.9, gamma: 0.01}
merge_method: breadcrumbs
base_model: synthetic/base
""",
    "della": """
models:
  - model: synthetic/base+a
    parameters: {weight: 0.5, density: 0.5, epsilon: 0.1}
  - model: synthetic/base+b
    parameters: {weight: 0.5, density: 0.5, epsilon: 0.1}
merge_method: della
base_model: synthetic/base
parameters: {lambda: 1.0, normalize: true}
""",
}


@pytest.mark.parametrize("name", sorted(MERGEKIT_DOCS))
def test_mergekits_documented_examples_run_and_replay(ads, name, tmp_path):
    merged = geometry.merge(ads, recipe=MERGEKIT_DOCS[name])
    assert merged.method == f"mergekit:{name}" or (name == "task_arithmetic" and merged.method.startswith("mergekit:"))
    dtype = {"ties": torch.float16, "dare_ties": torch.bfloat16}.get(name, torch.float32)
    assert all(m.B.dtype == dtype for m in merged.modules.values())
    again = geometry.merge(ads, recipe=merged.recipe())  # written back (with hashes), replayed
    assert again.to_zip_bytes() == merged.to_zip_bytes()


# --------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("text,needle", [
    ("merge_method: ties\nslices: []\nmodels: [a]", "field 'slices' is not supported"),
    ("models: [{model: b+a, parameters: {weight: 1}}]\nmerge_method: slerp", "'slerp' is not supported"),
    ("models: [{model: b+a, parameters: {weight: 1}}]\nmerge_method: frankenmerge", "unknown merge_method"),
    ("models: [{model: b+a, parameters: {weight: 1, density: 0.5}}]\nmerge_method: linear",
     "models[0].parameters.density is not a parameter of mergekit's linear"),
    ("models: [{model: b+a, parameters: {density: 0.5}}]\nmerge_method: ties", "models[0].parameters.weight is missing"),
    ("models: [{model: b+a, parameters: {weight: 1}}]\nmerge_method: ties\nparameters: {temperature: 2}",
     "parameters.temperature is not a parameter"),
    ("models: [{model: b+a, parameters: {weight: 1}}]\nmerge_method: ties\ntokenizer_source: union", "tokenizer_source"),
    ("models: [{model: x+a, parameters: {weight: 1}}]\nmerge_method: ties\nbase_model: b", "names base 'x'"),
    ("models: []\nmerge_method: ties", "non-empty list"),
    ("merge_method: ties\nmodels: [{model: b+a, parameters: {weight: 1}}]\ndtype: int4", "dtype 'int4'"),
    ("models: [a, b\n", "not valid YAML"),
    ("- just a list", "expected a mapping"),
    ("models: [{model: b+a, weight: 1}]\nmerge_method: ties", "models[0].weight is not supported"),
])
def test_recipe_errors_name_the_field(text, needle):
    with pytest.raises(MergeParameterError) as err:
        read_recipe(text)
    assert needle in str(err.value)


def test_replay_errors(ads):
    text = merge(ads, "ties", [0.5, 0.5, 0.5]).recipe()
    edited = text.replace("weight: 0.5", "weight: 0.9", 1)
    with pytest.raises(MergeParameterError, match=r"recipe models\[0\]\.parameters\.weight: says 0.9 but adapter_atlas .* gives 0.5"):
        geometry.merge(ads, recipe=edited)
    with pytest.raises(MergeParameterError, match="recipe names 3 adapters"):
        geometry.merge(ads[:2], recipe=text)
    other = [random_adapter(n, layers=3, kinds={"q": (7, 5), "v": (9, 6)}, seed=9) for n in "abc"]
    with pytest.raises(MergeParameterError, match="not the same weights"):
        geometry.merge(other, recipe=text)
    with pytest.raises(geometry.InvalidArgumentError, match="either recipe"):
        geometry.merge(ads, recipe=text, weights=[1, 1, 1])
    bad = read_recipe(text).to_dict()
    bad["adapter_atlas"]["method"] = "nope"
    with pytest.raises(MergeParameterError, match="'nope' is not a merge method"):
        geometry.merge(ads, recipe=bad)


# ------------------------------------------------------------------------------------------ CLI
def _cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "geometry", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


REAL = ROOT / "sample_adapters" / "real"


def test_cli_merge_recipe_replays_to_the_same_bytes(tmp_path):
    a, b = str(REAL / "sst2"), str(REAL / "mrpc")
    first = _cli("merge", a, b, "--method", "dare_ties", "--density", "0.4", "--out", str(tmp_path / "one"))
    assert first.returncode == 0, first.stderr
    recipe = tmp_path / "one" / "recipe.yaml"
    second = _cli("merge", "--recipe", str(recipe), "--out", str(tmp_path / "two"))
    assert second.returncode == 0, second.stderr
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file())
    assert Path("recipe.yaml") in files and Path("README.md") in files
    for f in files:
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes(), f
    # a mergekit recipe naming the adapters next to it
    (tmp_path / "mk").mkdir()
    (tmp_path / "mk" / "recipe.yml").write_text(
        f"models:\n  - model: {a}\n    parameters: {{weight: 1.0, density: 0.5}}\n"
        f"  - model: {b}\n    parameters: {{weight: 0.5, density: 0.5}}\nmerge_method: ties\n")
    third = _cli("merge", "--recipe", str(tmp_path / "mk" / "recipe.yml"), "--out", str(tmp_path / "three"))
    assert third.returncode == 0, third.stderr
    assert "mergekit's meaning" in third.stdout
    info = json.loads((tmp_path / "three" / "merge_info.json").read_text())
    assert info["method"] == "mergekit:ties"


def test_cli_recipe_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("merge_method: slerp\nmodels: [{model: x+y, parameters: {t: 0.5}}]\n")
    out = _cli("merge", "--recipe", str(bad), "--out", str(tmp_path / "o"))
    assert out.returncode != 0 and "Traceback" not in out.stderr and "'slerp' is not supported" in out.stderr
    out = _cli("merge", "--recipe", str(bad), "--method", "ties", "--out", str(tmp_path / "o"))
    assert out.returncode != 0 and "--recipe replaces --method" in out.stderr
    missing = tmp_path / "missing.yml"
    missing.write_text("merge_method: ties\nmodels: [{model: nowhere, parameters: {weight: 1}}]\n")
    out = _cli("merge", "--recipe", str(missing), "--out", str(tmp_path / "o"))
    assert out.returncode != 0 and "neither next to the recipe nor a path" in out.stderr
