"""Merge recipes: mergekit's YAML for LoRA merges, read, run factored where possible, and written back.

A recipe names the adapters, the method and its parameters; it travels with every exported merge
(``recipe.yaml`` and the model card) and replays it: ``python -m geometry merge --recipe FILE``
writes the same bytes again.

**Reading a mergekit recipe** (:func:`read_recipe`): the fields a LoRA merge uses,

.. code-block:: yaml

    models:
      - model: BASE+path/to/lora_a          # mergekit's BASE+LORA; a bare adapter path also works
        parameters: {weight: 1.0, density: 0.5}
      - model: BASE+path/to/lora_b
        parameters: {weight: 0.5, density: [1, 0.5]}   # a gradient over layers, or [{filter, value}]
    merge_method: ties                      # linear, task_arithmetic, ties, dare_ties, dare_linear,
    base_model: BASE                        # breadcrumbs, breadcrumbs_ties, della, della_linear, multislerp
    parameters: {normalize: true, lambda: 1.0}
    dtype: float16                          # the stored factors' dtype

run with **mergekit's meaning** (:mod:`geometry.merging.mergekit_gta` says where it differs from the
project's methods of the same names): ``linear`` is ``sum_t w_t tau_t / sum_t w_t`` (``normalize``,
default on; a ``model:`` that is the base itself is a zero task vector with its weight) and
``task_arithmetic`` is ``lambda sum_t w_t tau_t`` (``/ sum_t w_t`` with ``normalize``): both exact
and factored (:func:`geometry.merging.task_arithmetic.task_arithmetic`) when every weight is one
number; ``multislerp`` is :func:`geometry.merging.multislerp.multislerp` (the same formula as
mergekit's); the rest, and per-layer or filtered weights, go through mergekit's generalized task
arithmetic, one dense module at a time. Anything else (``slices``, ``modules``, a tokenizer, methods
such as ``slerp``, ``model_stock`` or ``passthrough``, an unknown parameter) is one
:class:`~geometry.errors.MergeParameterError` naming the field.

**Writing** (:func:`recipe_of`): the recipe of any merge. A merge run from a mergekit recipe writes
that recipe; a merge by one of the project's methods writes the same YAML shape with
``merge_method`` set to the project's method and its exact call in an ``adapter_atlas:`` block
(``method``, ``params``, ``source_hashes``, ``version``); mergekit runs ``task_arithmetic`` recipes
as written (the same formula), and for the other names its own formula, or refuses a name it lacks.
Reading a recipe with an ``adapter_atlas:`` block replays that call; if its mergekit fields were
edited so that they no longer say the same, that is an error naming the field.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from geometry.errors import MergeParameterError
from geometry.version import __version__

MergedAdapter = Any  # geometry.merging.base.MergedAdapter (not imported: base imports this module)

#: method -> (sparsification, consensus, default normalize, default rescale), as mergekit registers them
GTA_METHODS: dict[str, tuple[str | None, str | None, bool, bool]] = {
    "task_arithmetic": (None, None, False, False),
    "ties": ("magnitude", "sum", True, False),
    "dare_ties": ("random", "sum", False, True),
    "dare_linear": ("random", None, False, True),
    "breadcrumbs": ("magnitude_outliers", None, False, False),
    "breadcrumbs_ties": ("magnitude_outliers", "sum", False, False),
    "della": ("della_magprune", "sum", True, True),
    "della_linear": ("della_magprune", None, False, True),
}
#: per-model parameters each method reads, with mergekit's defaults (``weight`` is required)
TENSOR_PARAMS: dict[str, dict[str, float | None]] = {
    name: {"weight": None, "density": 1.0,
           **({"gamma": 0.01} if spars == "magnitude_outliers" else {}),
           **({"epsilon": 0.15} if spars == "della_magprune" else {})}
    for name, (spars, *_rest) in GTA_METHODS.items()
}
#: parameters shared by all models: ``normalize``, ``rescale``, ``lambda``, ``int8_mask``
SHARED_PARAMS = ("normalize", "rescale", "lambda", "int8_mask")


#: mergekit methods a recipe may name (the generalized task arithmetic ones, ``linear``, ``multislerp``)
MERGEKIT_METHODS = ("linear", *GTA_METHODS, "multislerp")
#: mergekit methods that do not apply to LoRA task vectors here, with the reason
UNSUPPORTED_METHODS = {
    "slerp": "two full models interpolated on the sphere of their weights; use multislerp (task vectors)",
    "nuslerp": "as slerp", "karcher": "a Riemannian mean of full weights",
    "model_stock": "needs the fine-tuned models' geometry around the base, not implemented",
    "passthrough": "stacks layers of full models", "arcee_fusion": "not implemented",
    "sce": "not implemented", "nearswap": "not implemented", "ram": "not implemented",
}
#: top-level fields read; others raise, naming them
TOP_FIELDS = ("models", "merge_method", "base_model", "parameters", "dtype", "out_dtype", "tokenizer_source",
              "adapter_atlas")
#: dtypes a recipe may name (of the stored factors)
DTYPES = ("float32", "float16", "bfloat16", "float64")
#: per-model parameters mergekit's linear and multislerp read; shared ones
_LINEAR_TENSOR, _LINEAR_SHARED = ("weight",), ("normalize",)
_SLERP_TENSOR, _SLERP_SHARED = ("weight",), ("normalize_weights", "eps")


@dataclass(frozen=True)
class RecipeModel:
    """One ``models:`` entry: the adapter reference (``LORA`` of ``BASE+LORA``), the base it names,
    its ``parameters`` (mergekit settings), and whether it is the base model itself (no adapter)."""

    ref: str
    base: str | None
    parameters: dict[str, Any] = field(default_factory=dict)
    is_base: bool = False

    @property
    def name(self) -> str:
        """The adapter's name as the project loads it: the reference's last path part, ``.zip`` removed."""
        part = PurePosixPath(self.ref.replace("\\", "/")).name
        return part[:-4] if part.endswith(".zip") else part


@dataclass(frozen=True)
class Recipe:
    """A parsed recipe; :meth:`to_dict` / :meth:`to_yaml` write it back."""

    merge_method: str
    models: tuple[RecipeModel, ...]
    parameters: dict[str, Any] = field(default_factory=dict)
    base_model: str | None = None
    dtype: str | None = None
    atlas: dict[str, Any] | None = None

    @property
    def adapters(self) -> list[RecipeModel]:
        """The entries that are adapters (not the base model itself), in order."""
        return [m for m in self.models if not m.is_base]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"models": [], "merge_method": self.merge_method}
        for m in self.models:
            ref = m.ref if m.is_base or not m.base else f"{m.base}+{m.ref}"
            out["models"].append({"model": ref, **({"parameters": dict(m.parameters)} if m.parameters else {})})
        if self.base_model:
            out["base_model"] = self.base_model
        if self.parameters:
            out["parameters"] = dict(self.parameters)
        if self.dtype:
            out["dtype"] = self.dtype
        if self.atlas:
            out["adapter_atlas"] = dict(self.atlas)
        return out

    def to_yaml(self) -> str:
        import yaml

        head = (f"# Merge recipe written by Adapter Atlas {__version__} (mergekit's YAML; "
                "replay: python -m geometry merge --recipe THIS_FILE)\n")
        if self.atlas and self.atlas.get("method") and self.atlas["method"] != "task_arithmetic":
            head += (f"# merge_method names Adapter Atlas's {self.atlas['method']}; adapter_atlas holds its exact call "
                     "(mergekit would run its own formula of that name, or refuse a name it lacks)\n")
        return head + yaml.safe_dump(_plain(self.to_dict()), sort_keys=False, allow_unicode=True)


def _plain(value: Any) -> Any:
    """JSON-compatible copy (tuples to lists, numpy / torch scalars to numbers)."""
    return json.loads(json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") else str(v)))


def _scalar(setting: Any) -> bool:
    return isinstance(setting, (int, float)) and not isinstance(setting, bool)


def _fail(where: str, what: str) -> MergeParameterError:
    return MergeParameterError(f"recipe {where}: {what}")


# ------------------------------------------------------------------------------------------ read
def read_recipe(text: str | Mapping[str, Any], *, where: str = "recipe") -> Recipe:
    """Parse a recipe (YAML text or an already loaded mapping); see the module docstring."""
    if isinstance(text, Mapping):
        data = dict(text)
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise MergeParameterError(f"{where}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, Mapping):
        raise MergeParameterError(f"{where}: expected a mapping with models and merge_method, "
                                  f"got {type(data).__name__}")
    for key in data:
        if key not in TOP_FIELDS:
            extra = (" (layer slices of full models: a LoRA merge keeps the base's layers)" if key == "slices" else
                     " (per-module sub-merges are not supported)" if key == "modules" else "")
            raise _fail(where, f"field '{key}' is not supported{extra}; supported: {', '.join(TOP_FIELDS)}")
    if data.get("tokenizer_source") not in (None, "base"):
        raise _fail(where, f"tokenizer_source {data['tokenizer_source']!r}: an adapter merge keeps the base's "
                    "tokenizer (only 'base' is accepted)")
    method = data.get("merge_method")
    if not isinstance(method, str) or not method:
        raise _fail(where, "merge_method is missing (e.g. merge_method: ties)")
    atlas = data.get("adapter_atlas")
    if atlas is not None and not isinstance(atlas, Mapping):
        raise _fail(where, "adapter_atlas must be a mapping (method, params, source_hashes, version)")
    if method in UNSUPPORTED_METHODS:
        raise _fail(where, f"merge_method '{method}' is not supported for LoRA adapters here: "
                    f"{UNSUPPORTED_METHODS[method]}")
    project_method = (atlas or {}).get("method")
    if project_method is None and method not in MERGEKIT_METHODS:
        raise _fail(where, f"unknown merge_method '{method}' (mergekit methods run here: "
                    f"{', '.join(MERGEKIT_METHODS)}; a method of Adapter Atlas's own needs its call in an "
                    "adapter_atlas block (method, params), as the recipes this tool writes have)")
    base = data.get("base_model")
    if base is not None and not isinstance(base, str):
        raise _fail(where, f"base_model must be a model id or path, got {type(base).__name__}")
    dtype = data.get("dtype") or data.get("out_dtype")
    if dtype is not None and dtype not in DTYPES:
        raise _fail(where, f"dtype {dtype!r}: one of {', '.join(DTYPES)}")
    models_raw = data.get("models")
    if not isinstance(models_raw, list) or not models_raw:
        raise _fail(where, "models: a non-empty list of {model: BASE+ADAPTER, parameters: {...}} is needed")
    models = []
    for i, entry in enumerate(models_raw):
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, Mapping) or "model" not in entry:
            raise _fail(where, f"models[{i}] needs a 'model' field")
        for key in entry:
            if key not in ("model", "parameters"):
                raise _fail(where, f"models[{i}].{key} is not supported (model, parameters)")
        ref = entry["model"]
        if not isinstance(ref, str) or not ref.strip():
            raise _fail(where, f"models[{i}].model must be a text reference, got {ref!r}")
        params = entry.get("parameters") or {}
        if not isinstance(params, Mapping):
            raise _fail(where, f"models[{i}].parameters must be a mapping")
        if "+" in ref:
            lora_base, lora = ref.split("+", 1)
            if base is not None and lora_base != base:
                raise _fail(where, f"models[{i}].model names base {lora_base!r}, base_model is {base!r}")
            models.append(RecipeModel(lora, lora_base, dict(params)))
        elif base is not None and ref == base:
            models.append(RecipeModel(ref, None, dict(params), is_base=True))
        else:
            models.append(RecipeModel(ref, None, dict(params)))
    shared = data.get("parameters") or {}
    if not isinstance(shared, Mapping):
        raise _fail(where, "parameters must be a mapping")
    recipe = Recipe(method, tuple(models), dict(shared), base, dtype, dict(atlas) if atlas is not None else None)
    if not recipe.adapters:
        raise _fail(where, "models names no adapter (only the base model)")
    if project_method is None:
        _check_mergekit_params(recipe, where)
    return recipe


def _check_mergekit_params(recipe: Recipe, where: str) -> None:
    method = recipe.merge_method
    if method == "linear":
        tensor, shared = _LINEAR_TENSOR, _LINEAR_SHARED
    elif method == "multislerp":
        tensor, shared = _SLERP_TENSOR, _SLERP_SHARED
    else:
        tensor, shared = tuple(TENSOR_PARAMS[method]), SHARED_PARAMS
    for i, m in enumerate(recipe.models):
        for key in m.parameters:
            if key not in tensor:
                raise _fail(where, f"models[{i}].parameters.{key} is not a parameter of mergekit's {method} "
                            f"(per model: {', '.join(tensor)})")
        if "weight" not in m.parameters and "weight" not in recipe.parameters and method != "multislerp":
            raise _fail(where, f"models[{i}].parameters.weight is missing (mergekit's {method} requires it)")
    for key in recipe.parameters:
        if key not in tensor and key not in shared:
            raise _fail(where, f"parameters.{key} is not a parameter of mergekit's {method} "
                        f"(shared: {', '.join(shared)}; per model: {', '.join(tensor)})")
    if method == "multislerp":
        if recipe.parameters.get("normalize_weights", True) is not True:
            raise _fail(where, "parameters.normalize_weights: false is not supported (Multi-SLERP here uses "
                        "only the weights' ratios)")
        if float(recipe.parameters.get("eps", 1e-8)) != 1e-8:
            raise _fail(where, "parameters.eps: only mergekit's default 1e-8 is supported")


# ----------------------------------------------------------------------------------------- write
def recipe_of(merged: MergedAdapter, *, refs: Sequence[str] | None = None, base: str | None = None) -> Recipe:
    """The recipe of ``merged``: ``refs`` name its adapters (default: their names, as a folder of
    adapters has them), ``base`` the base model (default: the merge's)."""
    refs = list(refs) if refs is not None else list(merged.sources)
    base = base if base is not None else merged.base_model
    if len(refs) != len(merged.sources):
        raise MergeParameterError(f"{len(refs)} references for a merge of {len(merged.sources)} adapters")
    dtype = _dtype_name(merged)
    if merged.method.startswith("mergekit:"):
        rec = read_recipe(merged.params["recipe"])
        by_old = {m.ref: new for m, new in zip(rec.adapters, refs)}
        models = tuple(m if m.is_base else RecipeModel(by_old.get(m.ref, m.ref), m.base, m.parameters)
                       for m in rec.models)
        extra = {k: merged.params[k] for k in ("seed", "rank", "keep_dense") if merged.params.get(k) not in (None, False, 0)}
        extra["source_hashes"] = list(merged.source_hashes)
        extra["version"] = __version__
        return Recipe(rec.merge_method, models, rec.parameters, rec.base_model, rec.dtype, extra)
    params = _plain(merged.params)
    weights = params.get("weights")
    task_level = isinstance(weights, list) and all(_scalar(w) for w in weights)
    models = tuple(RecipeModel(ref, base, {"weight": w} if task_level else {})
                   for ref, w in zip(refs, weights if task_level else [None] * len(refs)))
    shown = {k: v for k, v in params.items() if k not in ("weights", "rank", "keep_dense", "dtype", "device")
             and v is not None}
    if merged.method == "task_arithmetic":
        shown = {"normalize": False, "lambda": 1.0, **shown}
    atlas = {"method": merged.method, "params": params, "source_hashes": list(merged.source_hashes),
             "version": __version__}
    return Recipe(merged.method, models, shown, base, dtype, atlas)


def _dtype_name(merged: MergedAdapter) -> str | None:
    for mod in merged.modules.values():
        t = mod.B if mod.B is not None else mod.delta
        if t is not None:
            name = str(t.dtype).replace("torch.", "")
            return None if name == "float32" else name
    return None


def recipe_yaml(merged: MergedAdapter, *, refs: Sequence[str] | None = None) -> str:
    """:func:`recipe_of` as YAML text (what ``recipe.yaml`` in an export holds)."""
    return recipe_of(merged, refs=refs).to_yaml()
