"""Running a merge recipe (:mod:`geometry.merging.recipe`): match the adapters, then replay the
project's call (an ``adapter_atlas`` block) or run the mergekit fields with mergekit's meaning.

mergekit's ``linear`` and ``task_arithmetic`` with one number per weight are exact factored task
arithmetic (:func:`~geometry.merging.task_arithmetic.task_arithmetic`, weights
``lambda w_t / divisor``: never an ``m x n`` matrix); ``multislerp`` is the project's (the same
formula); the other methods, and per-layer or filtered weights, are mergekit's generalized task
arithmetic (:func:`~geometry.merging.mergekit_gta.mergekit_gta`, dense one module at a time, as
mergekit itself and every element-wise method are). The result records the recipe:
:func:`~geometry.merging.recipe.recipe_of` writes it back and a replay gives the same merge and,
exported, the same bytes (``tests/test_recipes.py``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from geometry.errors import MergeParameterError
from geometry.merging import COMMON_PARAMS, MERGE_METHODS, METHOD_PARAMS, merge
from geometry.merging.base import MergedAdapter
from geometry.merging.mergekit_gta import mergekit_gta
from geometry.merging.multislerp import multislerp
from geometry.merging.recipe import Recipe, _fail, _plain, _scalar, read_recipe, recipe_of
from geometry.merging.task_arithmetic import task_arithmetic
from geometry.types import Adapter

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}

def match_adapters(recipe: Recipe, adapters: Sequence[Adapter]) -> list[Adapter]:
    """The loaded adapters in the recipe's order: by name when every recipe adapter's name is among
    them, else by position when the counts agree; checked against ``adapter_atlas.source_hashes``."""
    wanted = recipe.adapters
    by_name = {a.name: a for a in adapters}
    if all(m.name in by_name for m in wanted):
        chosen = [by_name[m.name] for m in wanted]
    elif len(adapters) == len(wanted):
        chosen = list(adapters)
    else:
        raise MergeParameterError(f"recipe names {len(wanted)} adapters ({', '.join(m.name for m in wanted)}); "
                                  f"got {len(adapters)} ({', '.join(a.name for a in adapters)}): load the ones it "
                                  "names, or give exactly that many in its order")
    hashes = (recipe.atlas or {}).get("source_hashes")
    if hashes:
        for m, a, digest in zip(wanted, chosen, hashes):
            if a.content_hash and digest and a.content_hash != digest and digest != a.name:
                raise MergeParameterError(f"recipe was written for adapter {m.name!r} with content hash "
                                          f"{str(digest)[:16]}...; {a.name!r} ({a.source or 'loaded'}) has "
                                          f"{a.content_hash[:16]}...: not the same weights")
    return chosen


def _first_difference(path: str, a: Any, b: Any) -> tuple[str | None, Any, Any]:
    """The first path where ``a`` and ``b`` differ (``None`` when equal), with the two values there."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in [*a, *(k for k in b if k not in a)]:
            found = _first_difference(f"{path}.{k}", a.get(k), b.get(k))
            if found[0] is not None:
                return found
        return None, None, None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            found = _first_difference(f"{path}[{i}]", x, y)
            if found[0] is not None:
                return found
        return None, None, None
    return (None, None, None) if a == b else (path, a, b)


def run_recipe(recipe: Recipe | str | Mapping[str, Any], adapters: Sequence[Adapter], *,
               device: torch.device | str | None = None) -> MergedAdapter:
    """Merge ``adapters`` (matched by :func:`match_adapters`) as ``recipe`` says; the result records
    the recipe, so :func:`recipe_of` writes it back and a replay gives the same merge."""
    if not isinstance(recipe, Recipe):
        recipe = read_recipe(recipe)
    chosen = match_adapters(recipe, adapters)
    dtype = _DTYPES[recipe.dtype] if recipe.dtype else torch.float32
    atlas = recipe.atlas or {}
    if atlas.get("method"):
        method = atlas["method"]
        if method not in MERGE_METHODS:
            raise _fail("adapter_atlas.method", f"'{method}' is not a merge method of this version "
                        f"({', '.join(MERGE_METHODS)})")
        params = dict(atlas.get("params") or {})
        weights = params.pop("weights", None)
        mask_device = params.pop("mask_device", None)  # random masks are drawn there: replay draws them there too
        if mask_device is not None and device is None:
            if str(mask_device).startswith("cuda") and not torch.cuda.is_available():
                raise _fail("adapter_atlas.params.mask_device", f"this merge drew its random masks on {mask_device}; "
                            "no CUDA device here, and CPU masks differ: replay it on a CUDA machine")
            device = mask_device
        unknown = sorted(set(params) - set(METHOD_PARAMS[method]) - set(COMMON_PARAMS))
        if unknown:
            raise _fail("adapter_atlas.params", f"{', '.join(unknown)} not taken by {method} "
                        f"(it takes {', '.join(METHOD_PARAMS[method]) or 'only weights'})")
        params.pop("dtype", None)
        merged = merge(chosen, method, weights, dtype=dtype, device=device, **params)
        expected = recipe_of(merged, refs=[m.ref for m in recipe.adapters], base=recipe.base_model).to_dict()
        given = recipe.to_dict()
        for key in ("merge_method", "models", "parameters"):
            where, said, made = _first_difference(key, _plain(given.get(key)), _plain(expected.get(key)))
            if where is not None:
                raise _fail(where, f"says {json.dumps(said)} but adapter_atlas (the call that made this merge) gives "
                            f"{json.dumps(made)}: edit adapter_atlas.params (or remove the adapter_atlas block to "
                            "run the mergekit fields with mergekit's meaning)")
        return merged
    merged = _run_mergekit(recipe, chosen, dtype, device, seed=int(atlas.get("seed", 0)),
                           rank=atlas.get("rank"), keep_dense=bool(atlas.get("keep_dense", False)))
    merged.method = f"mergekit:{recipe.merge_method}"
    record = Recipe(recipe.merge_method, recipe.models, recipe.parameters, recipe.base_model, recipe.dtype).to_dict()
    merged.params = {"recipe": _plain(record), "seed": int(atlas.get("seed", 0)), "rank": atlas.get("rank"),
                     "keep_dense": bool(atlas.get("keep_dense", False))}
    return merged


def _run_mergekit(recipe: Recipe, adapters: list[Adapter], dtype: torch.dtype, device: Any, *, seed: int,
                  rank: int | None, keep_dense: bool) -> MergedAdapter:
    method, shared = recipe.merge_method, recipe.parameters
    entries = list(recipe.models)
    weight_of = [m.parameters.get("weight", shared.get("weight", 1.0 if method == "multislerp" else None))
                 for m in entries]
    all_scalar = all(_scalar(w) for w in weight_of)
    adapter_weights = [w for m, w in zip(entries, weight_of) if not m.is_base]
    if method == "multislerp":
        if not all_scalar:
            raise _fail("models[*].parameters.weight", "multislerp takes one number per model")
        return multislerp(adapters, [float(w) for w in adapter_weights], rank=rank, keep_dense=keep_dense,
                          dtype=dtype, device=device)
    if method in ("linear", "task_arithmetic"):
        normalize = bool(shared.get("normalize", method == "linear"))
        lam = float(shared.get("lambda", 1.0)) if method == "task_arithmetic" else 1.0
        has_density = method == "task_arithmetic" and any(
            float(m.parameters.get("density", shared.get("density", 1.0))) < 1 if _scalar(
                m.parameters.get("density", shared.get("density", 1.0))) else True for m in entries)
        if all_scalar and not has_density:
            total = sum(float(w) for w in weight_of)  # the base's own entries count in linear's divisor
            divisor = total if normalize and abs(total) >= 1e-8 else 1.0
            return task_arithmetic(adapters, [lam * float(w) / divisor for w in adapter_weights], rank=rank,
                                   dtype=dtype, device=device)
        if any(m.is_base for m in entries):
            raise _fail("models", f"a base-model entry in {method} with per-layer or filtered weights is not "
                        "supported; give the adapters only")
        gta_shared = {"normalize": normalize, "lambda": lam} if method == "linear" else dict(shared)
        return mergekit_gta(adapters, "task_arithmetic", [m.parameters for m in entries], gta_shared, seed=seed,
                            rank=rank, keep_dense=keep_dense, dtype=dtype, device=device)
    return mergekit_gta(adapters, method, [m.parameters for m in entries if not m.is_base], shared, seed=seed,
                        rank=rank, keep_dense=keep_dense, dtype=dtype, device=device)
