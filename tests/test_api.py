"""The public API's contract (geometry/api.py): one front door, one vocabulary, one return type per
function, merges that know their sources, one error hierarchy, no disk unless asked."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import geometry
from geometry.analysis.distances import pairwise_distances
from geometry.analysis.inclusion import inclusion_matrix as inclusion_matrix_module
from geometry.api import RETIRED, VOCABULARY
from geometry.evaluation.merge_eval import MergeEvaluation
from geometry.testing import random_adapter

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_adapters" / "synthetic"
PUBLIC_FUNCTIONS = [n for n in geometry.__all__ if inspect.isfunction(getattr(geometry, n))]
#: what each public function returns, whatever its inputs
RETURNS = {
    "load": geometry.AdapterSet, "distances": pd.DataFrame, "distance_table": pd.DataFrame,
    "inclusion": pd.DataFrame, "inclusion_matrix": pd.DataFrame, "anatomy": pd.DataFrame,
    "interference": pd.DataFrame, "evaluate": pd.DataFrame, "evaluate_merge": MergeEvaluation,
}


def _ads(seed: int = 0, ranks=(4, 2, 3)):
    """Three adapters of different ranks on non-square modules (q: 12 x 10, v: 8 x 10), 3 layers."""
    kinds = {"q": (12, 10), "v": (8, 10)}
    ads = [random_adapter(f"t{i}", 3, kinds, r, seed=seed + i, stack="encoder") for i, r in enumerate(ranks)]
    return geometry.load(ads)


# ------------------------------------------------------------------------------------ the surface
def test_the_package_exports_the_api_and_nothing_is_a_callable_module():
    for name in PUBLIC_FUNCTIONS:
        fn = getattr(geometry, name)
        assert fn is getattr(geometry.api, name)
        assert fn.__module__ == "geometry.api"
    # importing the module that holds the maths does not replace the function on the package
    importlib.import_module("geometry.analysis.distances")
    importlib.import_module("geometry.analysis.inclusion")
    importlib.import_module("geometry.evaluation.evaluate")
    assert inspect.isfunction(geometry.distances) and inspect.isfunction(geometry.inclusion)
    assert inspect.isfunction(geometry.evaluate)
    source = (ROOT / "geometry" / "api.py").read_text() + (ROOT / "geometry" / "__init__.py").read_text()
    assert "__class__" not in source  # no module rewritten into a callable


def test_every_public_signature_uses_the_shared_vocabulary():
    """Adapters first and positional; every other parameter keyword-only and named from VOCABULARY."""
    for name in PUBLIC_FUNCTIONS:
        params = list(inspect.signature(getattr(geometry, name)).parameters.values())
        first, rest = params[0], params[1:]
        assert first.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD, name
        positional = [p.name for p in rest if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
        assert positional in ([], ["adapter2"]), (name, positional)
        for p in params:
            if p.kind is inspect.Parameter.VAR_KEYWORD:
                continue
            assert p.name in VOCABULARY, f"geometry.{name}({p.name}=...) is not in the shared vocabulary"


def _library_modules():
    for info in pkgutil.walk_packages(geometry.__path__, "geometry."):
        if info.name.endswith("__main__") or info.name == "geometry.testing":
            continue  # geometry.testing's random_adapter(kinds={kind: shape}) maps kinds to shapes, a test helper
        yield info.name


def test_no_retired_spelling_in_any_library_signature():
    """``max_examples``, ``tasks_dir``, ``kinds``, ``lams``... are gone from every public function of the library."""
    retired = set(RETIRED) - {"task"}  # ``task`` stays where a function takes exactly one task
    offenders = []
    for mod_name in _library_modules():
        path = ROOT / (mod_name.replace(".", "/") + ".py")
        if not path.is_file():
            path = ROOT / mod_name.replace(".", "/") / "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
                args = node.args
                for a in [*args.posonlyargs, *args.args, *args.kwonlyargs]:
                    if a.arg in retired:
                        offenders.append(f"{mod_name}.{node.name}({a.arg})")
    assert not offenders, offenders


def test_the_cli_flags_use_the_same_words():
    from geometry.cli import build_parser

    flags = set()
    for action in build_parser()._subparsers._group_actions[0].choices.values():
        for a in action._actions:
            flags.update(s for s in a.option_strings if s.startswith("--"))
    for word in ("--tasks", "--limit", "--kind", "--layers", "--lam", "--method", "--metric"):
        assert word in flags, word
    # old spellings are kept as aliases, next to the shared one
    assert "--max-examples" in flags and "--lambda" in flags


# ------------------------------------------------------------------------------ one return type
def test_distances_returns_one_shape_and_distance_table_the_other():
    ads = _ads()
    m = geometry.distances(ads, metric="grassmann", kind="q", layers="last:2")
    t = geometry.distance_table(ads, metric="grassmann", kind="q", layers="last:2")
    assert isinstance(m, pd.DataFrame) and list(m.index) == list(m.columns) == ["t0", "t1", "t2"]
    assert set(t["layer"]) == {1, 2} and len(t) == 9 * 2
    # the matrix is the mean of the table's layers, to the last bit of the module's own tensor
    tensor = pairwise_distances(ads.adapters, "grassmann", "ba", "q")
    np.testing.assert_array_equal(m.to_numpy(), tensor.reduce([1, 2]))
    pivot = t.groupby(["i", "j"])["value"].mean().unstack().to_numpy()
    np.testing.assert_allclose(m.to_numpy(), pivot, rtol=0, atol=1e-12)


def test_inclusion_pair_and_matrix_are_two_names():
    ads = _ads()
    pair = geometry.inclusion(ads["t0"], ads["t1"], lam=0.0)
    assert len(pair) == 6 and {"rec", "s1", "s2"} <= set(pair.columns)
    mat = geometry.inclusion_matrix(ads, metric="rec")
    assert mat.shape == (3, 3)
    np.testing.assert_allclose(mat.to_numpy(), inclusion_matrix_module(ads.adapters, metric="rec"))
    np.testing.assert_allclose(mat.loc["t0", "t1"], pair["rec"].mean(), rtol=1e-12)
    with pytest.raises(geometry.InvalidArgumentError, match="inclusion_matrix"):
        geometry.inclusion(ads, ads["t1"])


def test_interference_is_the_mean_of_the_modules_chosen():
    from geometry.merging.tsv import task_interference
    from geometry.types import ModuleKey

    ads = _ads()
    got = geometry.interference(ads, score="overlap", kind="v", layers="last:2")
    per = [task_interference(ads.adapters, score="overlap", module=ModuleKey("encoder", layer, "v")).to_numpy()
           for layer in (1, 2)]
    np.testing.assert_allclose(got.to_numpy(), np.nanmean(np.stack(per), axis=0), rtol=1e-12)
    assert got.attrs["modules"] == 2


def test_evaluate_refuses_a_merge_and_evaluate_merge_refuses_adapters():
    ads = _ads()
    merged = geometry.merge(ads, method="task_arithmetic")
    with pytest.raises(geometry.InvalidArgumentError, match="evaluate_merge"):
        geometry.evaluate(merged, tasks=SAMPLES / "tasks")
    with pytest.raises(geometry.InvalidArgumentError, match="expected a merge"):
        geometry.evaluate_merge(ads, tasks=SAMPLES / "tasks")


def test_return_types_do_not_change_with_the_inputs():
    ads = _ads()
    for kind in ("q", "v"):
        for layers in ("all", "last:1", [0, 2]):
            assert isinstance(geometry.distances(ads, kind=kind, layers=layers), RETURNS["distances"])
            assert isinstance(geometry.distance_table(ads, kind=kind, layers=layers), RETURNS["distance_table"])
    assert isinstance(geometry.anatomy(ads["t0"]), RETURNS["anatomy"])
    assert isinstance(geometry.load(ads["t0"]), RETURNS["load"])


# ------------------------------------------------------------------------ merges know their sources
@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "tsv_m"])
def test_every_merge_knows_its_sources_whichever_function_made_it(method):
    from geometry import merging

    ads = _ads()
    for m in (geometry.merge(ads, method=method), merging.merge(ads.adapters, method),
              merging.MERGE_METHODS[method](ads.adapters)):
        assert [a.name for a in m.source_adapters] == ["t0", "t1", "t2"]
        assert m.source_adapters[0] is ads["t0"]


def test_merge_weights_as_text_are_parsed_like_the_cli_and_the_page():
    ads = _ads()
    a = geometry.merge(ads, method="task_arithmetic", weights="0.5, 1, 2")
    b = geometry.merge(ads, method="task_arithmetic", weights=[0.5, 1.0, 2.0])
    key = next(iter(a.modules))
    torch.testing.assert_close(a.modules[key].dense(), b.modules[key].dense(), rtol=0, atol=0)


# ------------------------------------------------------------------------------- one error hierarchy
@pytest.mark.parametrize("call", [
    lambda ads: geometry.merge(ads, method="nope"),
    lambda ads: geometry.merge(ads, method="ties", density=3.0),
    lambda ads: geometry.merge(ads, method="ties", not_a_param=1),
    lambda ads: geometry.distances(ads, metric="manhattan"),
    lambda ads: geometry.distances(ads, layers="last:x"),
    lambda ads: geometry.inclusion_matrix(ads, metric="nope"),
    lambda ads: geometry.interference(ads, score="nope"),
    lambda ads: geometry.load(["x", "y"], names=["only-one"]),
    lambda ads: geometry.distances(["not", "adapters"]),
    lambda ads: geometry.evaluate(ads, tasks="/nonexistent/tasks"),
])
def test_bad_input_raises_the_libraries_error(call):
    with pytest.raises(geometry.AtlasError):
        call(_ads())


def test_merge_parameter_errors_are_still_value_errors():
    with pytest.raises(ValueError):
        geometry.merge(_ads(), method="ties", density=-1.0)
    assert issubclass(geometry.MergeParameterError, geometry.InvalidArgumentError)


# ------------------------------------------------------------------------------------- no disk
def test_the_library_touches_no_disk_unless_asked(tmp_path, monkeypatch):
    """Computing distances, a merge and its scores writes nothing anywhere without ``cache=``."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ADAPTER_ATLAS_CACHE", str(tmp_path / "would-be-cache"))
    ads = geometry.load(SAMPLES)
    geometry.distances(ads, metric="grassmann")
    m = geometry.merge(ads[["nli", "paraphrase"]], method="ties", density=0.2)
    geometry.evaluate_merge(m, tasks=SAMPLES / "tasks", limit=4)
    assert list(tmp_path.iterdir()) == []


def test_a_cache_asked_for_is_used(tmp_path):
    from geometry.cache import ResultCache

    ads = geometry.load(SAMPLES)
    m = geometry.merge(ads[["nli", "paraphrase"]], method="ties", density=0.2)
    cache = ResultCache(tmp_path / "cache")
    first = geometry.evaluate_merge(m, tasks=SAMPLES / "tasks", limit=4, cache=cache)
    assert len(cache) == 4  # two fine-tuned and two merged scores
    again = geometry.evaluate_merge(m, tasks=SAMPLES / "tasks", limit=4, cache=cache)
    assert again.anp == first.anp and len(cache) == 4


# ------------------------------------------------------------------------------------ the CLI's parser
def test_the_cli_builds_only_the_parser_a_command_needs():
    """``--version`` and ``--help`` import neither torch nor the merge methods; each help line is the full one."""
    import subprocess
    import sys

    from geometry.cli import COMMANDS, build_parser

    full = build_parser()._subparsers._group_actions[0]
    assert {a.dest: a.help for a in full._choices_actions} == {k: v[0] for k, v in COMMANDS.items()}
    code = ("import sys\nfrom geometry.cli import main\ntry:\n    main(['--version'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'pandas', 'scipy', 'geometry.merging') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
