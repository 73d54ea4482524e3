"""The public functions: what the dashboard, the CLI and notebooks all call (``import geometry``).

(About 500 lines on purpose: the whole public contract in one file, each function a thin layer over the
module that holds its maths.)

    import geometry
    ads = geometry.load("sample_adapters/real")                                   # AdapterSet, by name
    geometry.distances(ads, metric="grassmann", kind="v", layers="last:3")        # DataFrame [n, n]
    geometry.distance_table(ads, metric="cosine")                                 # long DataFrame, per layer
    geometry.inclusion(ads["mrpc"], ads["stsb"])                                  # DataFrame, one row per module
    geometry.inclusion_matrix(ads, metric="rec")                                  # DataFrame [n, n]
    m = geometry.merge(ads[["mrpc", "stsb"]], method="ties", density=0.2); m.save("out/")
    geometry.evaluate_merge(m, tasks="sample_adapters/real/tasks").anp            # per-task scores and ANP
    geometry.evaluate(ads, tasks="sample_adapters/real/tasks")                    # DataFrame, one row per adapter

The contract (tested by ``tests/test_api.py``):

* The adapters come first and positionally; everything else is keyword-only.
* One spelling per concept (:data:`VOCABULARY`): ``tasks`` (a folder of task folders, or one task
  folder), ``limit`` (examples per task), ``kind`` (a projection kind, ``"q"``, ``"v"``...),
  ``layers`` (``"all"``, ``"last:K"``, ``"N,N"``, ``"A-B"`` or ints), ``lam``, ``method``,
  ``metric``, ``factor``, ``stack``, ``weights``, ``split``, ``device``, ``progress``, ``cache``.
  The CLI's flags and the dashboard's page state use the same words.
* One return type per function; where there were two shapes there are two names
  (``distances`` / ``distance_table``, ``inclusion`` / ``inclusion_matrix``, ``evaluate`` /
  ``evaluate_merge``).
* Every merge result knows its source adapters (``MergedAdapter.source_adapters``), whichever
  function made it.
* Every error on bad input is a :class:`geometry.errors.AtlasError` naming what was wrong.
* No disk is touched unless asked: ``cache=`` takes a :class:`geometry.cache.ResultCache` (or a
  folder path); the default ``None`` computes.

Each function is a thin layer over the module holding its maths (named in its docstring); undefined
values stay NaN and are explained in ``DataFrame.attrs["notes"]``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from geometry.adapter_set import AdapterSet
from geometry.errors import AdapterLoadError, AtlasError, InvalidArgumentError
from geometry.types import Adapter

if TYPE_CHECKING:
    from geometry.analysis.maps import Map2D
    from geometry.evaluation.merge_eval import MergeEvaluation
    from geometry.merging import MergedAdapter

Source = str | os.PathLike[str] | bytes | Adapter
Adapters = AdapterSet | Sequence[Adapter]
Progress = Callable[[int, int, str], None]

#: The shared vocabulary: each concept's one parameter name in the public functions, the CLI flags
#: (``--tasks``, ``--limit``, ``--kind``...) and the dashboard's page state. ``tests/test_api.py``
#: checks every public signature against it.
VOCABULARY: dict[str, str] = {
    "adapters": "an AdapterSet or a list of Adapters (the positional first argument)",
    "adapter": "one Adapter",
    "adapter1": "the first Adapter of an ordered pair",
    "adapter2": "the second Adapter of an ordered pair",
    "sources": "what load reads: folders, .zip paths or bytes, hub:owner/name ids, Adapters",
    "names": "names given to loaded adapters, in order",
    "merged": "a MergedAdapter (geometry.merge)",
    "metric": "a distance or inclusion metric",
    "factor": "which factor a distance compares: ba (the task vector), a or b",
    "kind": "a projection kind (q, k, v, o, ...), or None for the default",
    "stack": "a module stack (encoder, decoder, ...), or None for the default",
    "layers": "a layer selection: 'all', 'last:K', 'N,N', 'A-B' or ints",
    "pad": "zero-pad different ranks in the Grassmann distance",
    "lam": "the inclusion regulariser lambda",
    "objective": "the inclusion objective: frobenius or spectral",
    "method": "a merge method, or a 2-D map method",
    "weights": "per-task merge weights lambda_t",
    "params": "a merge method's own parameters (density, rank, ...)",
    "score": "the task-interference score: overlap or sti",
    "tasks": "a folder of task folders, or one task folder",
    "split": "the split scored: test, validation or train",
    "limit": "how many examples per task are scored (None: all)",
    "samples": "how many unlabeled inputs per task a learned merge fits on (a different count from limit)",
    "base": "a base model: a transformers / peft model, a Runtime, or a state dict of its weights",
    "rank": "a target rank (the thin SVD truncates to it; None: the numerical rank)",
    "seed": "a random seed",
    "matrix": "a square distance matrix",
    "device": "where it computes (None: CUDA when present, else CPU)",
    "progress": "a callback progress(done, total, message)",
    "cache": "a ResultCache or a folder path to keep results in (None: no disk)",
    "budget": "how many candidates the merge advisor tries at most",
    "criterion": "the advisor's label-free criterion: js, kl or entropy",
    "methods": "a subset of the registered merge methods (None: all)",
    "learned": "whether learned merges (DivMerge / AdaMerging) are among the candidates",
    "measure": "also measure true scores with the test labels (the advisor's check)",
    "should_stop": "a callable that returns True to stop after the current step",
    "recipe": "a merge recipe: mergekit YAML (text or mapping) or one this tool wrote",
    "energy": "a fraction of ||tau||_F^2 kept (0 to 1]",
}
#: Spellings that the shared vocabulary replaced; none may appear in a public signature.
RETIRED: dict[str, str] = {
    "max_examples": "limit", "n_examples": "limit",
    "tasks_dir": "tasks", "task_dir": "tasks", "task": "tasks",
    "kinds": "kind", "lams": "lam", "lambda_": "lam",
    "ad1": "adapter1", "ad2": "adapter2", "adapter_list": "adapters",
}


# --------------------------------------------------------------------------------------------- load
def _expand(source: Any) -> list[Any]:
    """A folder holding several adapter folders (and no adapter of its own) expands to each of them."""
    if isinstance(source, (str, os.PathLike)) and not str(source).startswith("hub:"):
        path = Path(source).expanduser()
        if path.is_dir() and not (path / "adapter_config.json").is_file():
            children = sorted(p for p in path.iterdir() if p.is_dir() and (p / "adapter_config.json").is_file())
            if len(children) > 1:
                return children
            files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() == ".safetensors")
            if not children and len(files) > 1:  # a folder of kohya / diffusers LoRA files: one adapter each
                return files
    return [source]


def _from_files(files: Mapping[str, bytes]) -> list[tuple[str, Any]]:
    """In-memory files (an upload): each ``.zip`` is one adapter named by its file; the rest form one more."""
    from geometry.io.loader import load_files, load_weights_bytes, load_zip_bytes

    out, loose = [], {}
    for filename, data in files.items():
        base = Path(filename).name
        if base.lower().endswith(".zip"):
            out.append((base, lambda d=data, b=base: load_zip_bytes(bytes(d), name=Path(b).stem, source=b)))
        else:
            loose[base] = bytes(data)
    if loose and all(n.lower().endswith(".safetensors") for n in loose):  # kohya / diffusers LoRAs: one each
        for base, data in loose.items():
            out.append((base, lambda d=data, b=base: load_weights_bytes(d, name=Path(b).stem, source=b)))
        return out
    if loose:
        configs = [n for n in loose if n.endswith(".json")]
        label = " + ".join(sorted(loose))
        if len(configs) > 1:
            raise AdapterLoadError(
                f"{label}: several config files in one set of files ({', '.join(configs)}); give one adapter's "
                "adapter_config.json with its weights file at a time, or each adapter as a .zip")
        out.append((label, lambda: load_files(loose)))
    return out


def load(
    sources: Source | Mapping[str, bytes] | Iterable[Source], *, names: Sequence[str] | None = None
) -> AdapterSet:
    """Load adapters into an :class:`AdapterSet` (:mod:`geometry.io.loader`).

    ``sources``: one or a list of adapter folders, ``.zip`` files (path or bytes), ``hub:owner/name``
    ids, already loaded :class:`Adapter` objects, a folder of adapter folders (each loaded, in name
    order, e.g. ``geometry.load("sample_adapters/real")``), or in-memory files ``{filename: bytes}``
    (an upload: each ``.zip`` is one adapter named by its file, the other files, ``adapter_config.json``
    and its weights, one more). ``names`` renames them in order; otherwise each keeps its folder / file
    name, made unique with ``-2``, ``-3``. A source that fails raises :class:`AdapterLoadError` naming
    it (nothing is half-loaded). Every input is untrusted: the limits of :mod:`geometry.io.limits` apply.
    """
    from geometry.io.loader import load_adapter

    if isinstance(sources, Mapping):
        loaders = _from_files(sources)
        if names is not None and len(names) != len(loaders):
            raise InvalidArgumentError(f"load: {len(names)} names for {len(loaders)} adapters")
        out = AdapterSet()
        for k, (label, make) in enumerate(loaders):
            try:
                adapter = make()
            except AdapterLoadError:
                raise
            except (OSError, ValueError) as exc:
                raise AdapterLoadError(f"{label}: {exc}") from exc
            out.add(adapter, origin="upload", name=names[k] if names is not None else None)
        return out
    if isinstance(sources, (str, os.PathLike, bytes, bytearray, Adapter)):
        sources = [sources]
    items = [s for src in sources for s in _expand(src)]
    if names is not None and len(names) != len(items):
        raise InvalidArgumentError(f"load: {len(names)} names for {len(items)} adapters ({', '.join(map(str, items))})")
    out = AdapterSet()
    for k, src in enumerate(items):
        name = names[k] if names is not None else None
        if isinstance(src, Adapter):
            out.add(src, origin=f"path:{src.source}" if src.source else "object", name=name)
            continue
        try:
            adapter = load_adapter(src, name=name)
        except AdapterLoadError:
            raise
        except (OSError, ValueError) as exc:
            raise AdapterLoadError(f"{src}: {exc}") from exc
        origin = f"hub:{str(src)[4:]}" if isinstance(src, str) and src.startswith("hub:") else f"path:{src}"
        out.add(adapter, origin=origin if not isinstance(src, (bytes, bytearray)) else "bytes", name=name)
    return out


def as_adapters(adapters: Adapters | Adapter) -> list[Adapter]:
    """The list of :class:`Adapter` behind ``adapters`` (an AdapterSet, a list, or one Adapter)."""
    if isinstance(adapters, Adapter):
        return [adapters]
    if isinstance(adapters, AdapterSet):
        return adapters.adapters
    if isinstance(adapters, (str, bytes, os.PathLike)):
        raise InvalidArgumentError(f"expected loaded adapters (geometry.load({str(adapters)[:60]!r})), got a path")
    items = list(adapters)
    bad = [type(a).__name__ for a in items if not isinstance(a, Adapter)]
    if bad:
        raise InvalidArgumentError(
            f"expected an AdapterSet or Adapters (geometry.load(...)), got {', '.join(sorted(set(bad)))}")
    return items


# ---------------------------------------------------------------------------------------- distances
def _distance_tensor(adapters: Adapters, metric: str, factor: str, kind: str | None, stack: str | None,
                     pad: bool, device: Any):
    from geometry.analysis.distances import pairwise_distances

    return pairwise_distances(as_adapters(adapters), metric, factor, kind, stack, pad=pad, device=device)


def distances(
    adapters: Adapters,
    *,
    metric: str = "cosine",
    factor: str = "ba",
    kind: str | None = None,
    layers: str | Iterable[int] = "all",
    stack: str | None = None,
    pad: bool = False,
    device: Any = None,
) -> pd.DataFrame:
    """``Tbar_d``: the ``[n, n]`` mean over ``layers`` of the per-layer distance (:mod:`geometry.analysis.distances`).

    ``metric``: ``l2`` (``||tau_1 - tau_2||_F``), ``cosine`` (``1 - <tau_1, tau_2>_F / (||tau_1|| ||tau_2||)``)
    or ``grassmann`` (``sqrt(sum_i theta_i^2)``, principal angles between the column spaces), on
    ``factor`` ``ba`` (the task vector), ``a`` or ``b``, for one projection ``kind`` (``None``: ``v``
    when every adapter has it, else the first common kind). A DataFrame indexed and columned by
    adapter name; ``attrs``: ``notes`` (why some values are NaN, conventions), ``counts`` (how many
    layers each pair averaged), ``layers``, ``metric``, ``factor``, ``kind``, ``stack``.
    """
    from geometry.analysis.distances import select_layers

    tensor = _distance_tensor(adapters, metric, factor, kind, stack, pad, device)
    chosen = select_layers(tensor.layers, layers)
    names = list(tensor.adapters)
    idx = [tensor.layers.index(v) for v in chosen]
    counts = np.isfinite(tensor.values[:, :, idx]).sum(-1)
    frame = pd.DataFrame(tensor.reduce(chosen), index=pd.Index(names, name="adapter"), columns=names)
    partial = [
        f"({names[i]}, {names[j]}) averaged {counts[i, j]} of {len(chosen)} layers (the others are undefined)"
        for i in range(len(names)) for j in range(i + 1, len(names)) if counts[i, j] < len(chosen)
    ]
    frame.attrs.update(
        notes=[tensor.convention, *tensor.notes, *partial, *_dora_notes(adapters)], layers=chosen, metric=metric,
        factor=factor,
        kind=tensor.kind, stack=tensor.stack, counts=pd.DataFrame(counts, index=names, columns=names),
    )
    return frame


def distance_table(
    adapters: Adapters,
    *,
    metric: str = "cosine",
    factor: str = "ba",
    kind: str | None = None,
    layers: str | Iterable[int] = "all",
    stack: str | None = None,
    pad: bool = False,
    device: Any = None,
) -> pd.DataFrame:
    """The per-layer distances ``T_d(i, j, k)`` as a long table (:mod:`geometry.analysis.distances`).

    One row per ``(adapter_i, adapter_j, layer)`` of the chosen ``layers``, columns ``i, j,
    adapter_i, adapter_j, layer, stack, kind, metric, factor, value``; arguments as :func:`distances`.
    """
    from geometry.analysis.distances import select_layers

    tensor = _distance_tensor(adapters, metric, factor, kind, stack, pad, device)
    chosen = select_layers(tensor.layers, layers)
    frame = tensor.to_frame()
    frame = frame[frame["layer"].isin(chosen)].reset_index(drop=True)
    frame.attrs.update(notes=[tensor.convention, *tensor.notes], layers=chosen)
    return frame


def distance_tensors(
    adapters: Adapters,
    *,
    metric: str | Iterable[str] = ("l2", "cosine", "grassmann"),
    factor: str | Iterable[str] = ("ba", "a", "b"),
    kind: str | Iterable[str] | None = None,
    stack: str | Iterable[str] | None = None,
    pad: bool = False,
    device: Any = None,
    progress: Progress | None = None,
) -> dict:
    """Every per-layer distance tensor ``T_d(i, j, k)`` at once, keyed ``(metric, factor, stack, kind)``
    (:func:`geometry.analysis.distances.all_distances`): each adapter's modules decomposed once and reused
    for every pair, metric and factor (what the dashboard computes once per adapter set and re-slices).
    ``metric``, ``factor``, ``kind`` and ``stack`` take one value or several (``None``: all)."""
    from geometry.analysis.distances import all_distances

    def many(value):
        return [value] if isinstance(value, str) else value

    return all_distances(as_adapters(adapters), kind=kind, metrics=many(metric), factors=many(factor),
                         progress=progress, stacks=many(stack), pad=pad, device=device)


# ---------------------------------------------------------------------------------------- inclusion
def inclusion(
    adapter1: Adapter,
    adapter2: Adapter,
    *,
    lam: float = 0.0,
    objective: str = "frobenius",
    kind: str | None = None,
    stack: str | None = None,
    device: Any = None,
) -> pd.DataFrame:
    """Spectral inclusion ``tau1 -> tau2``, one row per common module (:mod:`geometry.analysis.inclusion`).

    Columns ``stack, layer, kind, rank, s1, s2, l1, l2, l1_normalized, l2_normalized, rec, h1, h2``;
    ``s2`` is ``tau2``'s spectrum projected on ``tau1``'s singular bases (closed form, regulariser
    ``lam``, ``objective`` frobenius or spectral).
    """
    from geometry.analysis import inclusion as inc

    if not isinstance(adapter1, Adapter) or not isinstance(adapter2, Adapter):
        raise InvalidArgumentError(
            "inclusion(adapter1, adapter2): pass two Adapters (ads['name']); for a set use inclusion_matrix(ads)")
    frame = inc.inclusion(adapter1, adapter2, lam=lam, kind=kind, objective=objective, stack=stack, device=device)
    frame.attrs.update(adapters=(adapter1.name, adapter2.name), lam=lam, objective=objective)
    return frame


def inclusion_matrix(
    adapters: Adapters,
    *,
    metric: str = "rec",
    lam: float = 0.0,
    objective: str = "frobenius",
    kind: str | None = None,
    stack: str | None = None,
    device: Any = None,
) -> pd.DataFrame:
    """The asymmetric ``[n, n]`` matrix of an inclusion ``metric``: row ``tau_i -> column tau_j``.

    Mean over the modules the pair shares (:func:`geometry.analysis.inclusion.inclusion_matrices`);
    each adapter decomposed once. The diagonal is the metric of an adapter with itself.
    """
    from geometry.analysis import inclusion as inc

    ads = as_adapters(adapters)
    names = [a.name for a in ads]
    mat = inc.inclusion_matrix(ads, metric=metric, kind=kind, lam=lam, objective=objective, stack=stack,
                               device=device)
    frame = pd.DataFrame(mat, index=pd.Index(names, name="tau_i (row) -> tau_j"), columns=names)
    frame.attrs.update(metric=metric, lam=lam, objective=objective, kind=kind)
    return frame


# ------------------------------------------------------------------------------------------ anatomy
def anatomy(adapter: Adapter, *, kind: str | Iterable[str] | None = None, device: Any = None) -> pd.DataFrame:
    """One row per module of ``adapter``: its exact spectrum and what it says (:mod:`geometry.analysis.anatomy`)."""
    from geometry.analysis.anatomy import anatomy as run

    if not isinstance(adapter, Adapter):
        raise InvalidArgumentError("anatomy(adapter): pass one Adapter (ads['name'])")
    frame = run(adapter, kind=kind, device=device)
    frame.attrs["notes"] = [*frame.attrs.get("notes", []), *_dora_notes(adapter)]
    return frame


def ranks(adapter: Adapter, *, energy: float = 0.9) -> pd.DataFrame:
    """One row per module: rank, numerical rank, the ranks that keep ``energy`` and 99% of ``||tau||_F^2``, the
    knee and the optimal-hard-threshold rank, exact from the factors (:mod:`geometry.analysis.ranks`)."""
    from geometry.analysis.ranks import rank_table

    if not isinstance(adapter, Adapter):
        raise InvalidArgumentError("ranks(adapter): pass one Adapter (ads['name'])")
    return rank_table(adapter, energy=energy)


def compress(adapter: Adapter, *, rank: int | None = None, energy: float | None = None) -> MergedAdapter:
    """``adapter`` truncated per module to ``rank``, or to the smallest rank keeping ``energy`` of each module's
    ``||tau||_F^2`` (Eckart-Young, from the factors); ``.energy_by_module()`` reports what is kept, ``.save(path)``
    writes a peft folder (:func:`geometry.analysis.ranks.compress`)."""
    from geometry.analysis.ranks import compress as run

    if not isinstance(adapter, Adapter):
        raise InvalidArgumentError("compress(adapter): pass one Adapter (ads['name'])")
    return run(adapter, rank=rank, energy=energy)


def compatibility(adapters: Adapters, *, device: Any = None) -> pd.DataFrame:
    """Per module shared by two or more adapters: subspace overlap, the dominant adapter and each one's share
    of the update norms, and a reading label (:func:`geometry.analysis.ranks.compatibility`)."""
    from geometry.analysis.ranks import compatibility as run

    return run(as_adapters(adapters), device=device)


def _dora_notes(adapters: Adapters | Adapter) -> list[str]:
    """``"<name>: DoRA: direction only, base weights not loaded"`` for each DoRA adapter analysed by its LoRA
    direction ``s B A`` (:func:`geometry.linalg.dora.resolve_dora` attaches the base's exact updates)."""
    # geometry.linalg.dora.dora_status / DIRECTION_ONLY, inlined: this module stays free of torch at import
    return [f"{a.name}: DoRA: direction only, base weights not loaded" for a in as_adapters(adapters)
            if any((m.magnitude is not None or a.config.use_dora) and not m.dora_exact for m in a.modules.values())]


def interference(
    adapters: Adapters,
    *,
    score: str = "overlap",
    kind: str | None = None,
    layers: str | Iterable[int] = "all",
    stack: str | None = None,
    device: Any = None,
) -> pd.DataFrame:
    """TSV-M's task interference between adapters, the mean over the chosen modules (:mod:`geometry.merging.tsv`).

    ``score``: ``overlap`` (mean ``cos^2`` of the principal angles between task ``i``'s and ``j``'s
    singular vectors) or ``sti`` (``||U_i^T U_j||_1 + ||V_i^T V_j||_1``, Gargiulo et al. 2025).
    ``[n, n]`` DataFrame; the mean ignores undefined (NaN) modules, and a pair undefined everywhere
    stays NaN. ``attrs["modules"]``: how many modules were averaged.
    """
    from geometry.analysis.distances import select_layers
    from geometry.merging.base import all_keys
    from geometry.merging.tsv import task_interference

    ads = as_adapters(adapters)
    keys = [k for k in all_keys(ads) if (kind is None or k.kind == kind) and (stack is None or k.stack == stack)]
    if kind is None and keys:
        keys = [k for k in keys if k.kind == keys[0].kind]
    chosen = set(select_layers(sorted({k.layer for k in keys}), layers)) if keys else set()
    keys = [k for k in keys if k.layer in chosen]
    if not keys:
        raise InvalidArgumentError(f"interference: no module of kind {kind!r} in layers {layers!r}")
    frame = task_interference(ads, score=score, module=keys, device=device)
    frame.index.name = "adapter"
    frame.attrs.update(score=score, modules=len(keys), kind=keys[0].kind, layers=sorted(chosen))
    return frame


def resolve_dora(adapter: Adapter, *, base: Any = None, rank: int | None = None) -> Adapter:
    """A copy of a DoRA ``adapter`` whose modules hold their exact updates, given its ``base`` weights
    (:func:`geometry.linalg.dora.resolve_dora`): ``m (W0 + s B A) / ||W0 + s B A||_row - W0`` per module,
    factored by a thin SVD at its numerical rank (or at most ``rank``). ``base=None``: the base the adapter
    names, loaded once by the runtime (offline: a local folder or an installed package's model); when it
    cannot be loaded, :class:`AtlasError` says why. Without this, a DoRA adapter's geometry is that of its
    LoRA direction ``s B A`` only, and says so in ``attrs["notes"]``. Not DoRA: the adapter itself."""
    from geometry.linalg.dora import dora_status
    from geometry.linalg.dora import resolve_dora as run

    if not isinstance(adapter, Adapter):
        raise InvalidArgumentError("resolve_dora(adapter, base=...): pass one Adapter (ads['name'])")
    if dora_status(adapter) != "direction":
        return adapter
    if base is None:
        from geometry.runtime import Runtime

        base = Runtime.for_sources([adapter])
    return run(adapter, base, rank=rank)


def resolve_dora_where_possible(adapters: Adapters) -> tuple[list[Adapter], list[str]]:
    """Each DoRA adapter with its exact updates where its base is on this machine (:func:`resolve_dora`; nothing
    is downloaded), the others as they are; and one note per DoRA adapter saying which (what the CLI and the
    dashboard do on load)."""
    from geometry.linalg.dora import dora_note, dora_status
    from geometry.runtime.base_models import resolve_base

    out, notes = [], []
    for ad in as_adapters(adapters):
        if dora_status(ad) == "direction":
            base = ad.config.base_model_name_or_path
            if not base or not Path(resolve_base(base)).exists():  # never a download on load
                notes.append(f"{ad.name}: {dora_note(ad)} (its base {base or '(not named)'} is not available "
                             "locally; geometry.resolve_dora(adapter, base=...) attaches one)")
                out.append(ad)
                continue
            try:
                ad = resolve_dora(ad)
            except (AtlasError, OSError, ValueError) as exc:
                notes.append(f"{ad.name}: {dora_note(ad)} ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})")
                out.append(ad)
                continue
            notes.append(f"{ad.name}: {dora_note(ad)}")
        out.append(ad)
    return out, notes


# ---------------------------------------------------------------------------------------------- map
def embed(matrix: Any, *, method: str = "pca", seed: int = 0) -> Map2D:
    """A 2-D map of adapters from a distance matrix (:func:`geometry.analysis.maps.embed_defined`).

    ``matrix``: a square DataFrame (from :func:`distances`) or array with names. ``method``: ``pca``,
    ``mds`` or ``umap``; UMAP needs at least :data:`~geometry.analysis.maps.UMAP_MIN_POINTS` adapters,
    and fewer fall back to PCA, said in ``Map2D.note``. Adapters with undefined distances are left out
    and named.
    """
    from geometry.analysis.maps import embed_defined

    if isinstance(matrix, pd.DataFrame):
        names, values = [str(c) for c in matrix.columns], matrix.to_numpy(dtype=float)
    else:
        values = np.asarray(matrix, dtype=float)
        names = [str(i) for i in range(values.shape[0])]
    return embed_defined(values, names, method=method, seed=seed)


# -------------------------------------------------------------------------------------------- merge
def merge(adapters: Adapters, *, method: str = "task_arithmetic", weights: Any = None, recipe: Any = None,
          **params: Any) -> MergedAdapter:
    """Merge adapters with a method of :data:`geometry.merging.MERGE_METHODS` (one call shape).

    Returns a :class:`geometry.merging.MergedAdapter` that knows its sources: ``m.save(path)`` writes a
    peft folder (with its model card and ``recipe.yaml``), ``m.summary()`` describes it,
    ``m.recipe()`` is its recipe, ``geometry.evaluate_merge(m, tasks=...)`` scores it.
    ``weights``: one ``lambda_t`` per task (a list, a dict by name, or the text ``"0.5, 0.5"``).
    ``recipe``: a merge recipe instead of ``method`` / ``weights`` / ``params`` (mergekit YAML text or
    mapping, or a recipe this tool wrote: :mod:`geometry.merging.recipe`), run on ``adapters``
    (matched to the recipe's models by name, else by position).
    """
    from geometry.merging import merge as run
    from geometry.merging.weights import parse_weights

    ads = as_adapters(adapters)
    if recipe is not None:
        from geometry.merging.replay import run_recipe

        if weights is not None or params:
            raise InvalidArgumentError("merge: give either recipe= or method / weights / parameters, not both")
        return run_recipe(recipe, ads, device=params.get("device"))
    if isinstance(weights, str):
        weights = parse_weights(weights, [a.name for a in ads])
    return run(ads, method, weights, **params)


# ----------------------------------------------------------------------------------------- evaluate
def evaluate(
    adapters: Adapters | Adapter | Source | Sequence[Source],
    *,
    tasks: str | os.PathLike[str],
    split: str = "test",
    limit: int | None = None,
    progress: Progress | None = None,
    cache: Any = None,
) -> pd.DataFrame:
    """Score each adapter on its own task: one row per adapter (:mod:`geometry.evaluation.evaluate`).

    ``adapters``: loaded adapters, or anything :func:`load` reads. ``tasks``: a folder of task folders
    (each adapter finds ``tasks/<training task or name>/``) or one task folder / ``.jsonl`` file (every
    adapter scored on it). Columns ``adapter, task, split, n`` and the task's metrics (``accuracy``,
    ``macro_f1``; ``rouge_l`` for generation).
    """
    from geometry.evaluation.evaluate import evaluate as score
    from geometry.evaluation.tasks import find_task_dir

    if _is_merge(adapters):
        raise InvalidArgumentError("evaluate: this is a merge; score it with geometry.evaluate_merge(merged, tasks=...)")
    ads = as_adapters(adapters) if _is_loaded(adapters) else as_adapters(load(adapters))
    root = Path(tasks)
    one_task = root.suffix == ".jsonl" or (root / f"{split}.jsonl").is_file()
    rows = []
    for k, ad in enumerate(ads):
        folder = root if one_task else find_task_dir(ad, root, split)
        result = score(ad, folder, split, limit=limit, cache=cache)
        rows.append({"adapter": ad.name, **result})
        if progress:
            progress(k + 1, len(ads), ad.name)
    return pd.DataFrame(rows)


def evaluate_merge(
    merged: MergedAdapter,
    *,
    tasks: str | os.PathLike[str],
    adapters: Adapters | None = None,
    split: str = "test",
    limit: int | None = None,
    progress: Progress | None = None,
    cache: Any = None,
) -> MergeEvaluation:
    """Score a merge on each source task: fine-tuned vs merged, and the ANP (:mod:`geometry.evaluation.merge_eval`).

    Per task ``t``: ``P(theta_t, t)`` (base + that adapter), ``P(merged, t)`` (with that task's head)
    and ``normalized = 100 P(merged, t) / P(theta_t, t)``;
    ``ANP = (1/T) sum_t P(merged, t) / P(theta_t, t)`` in %. The sources are the merge's own
    (``merged.source_adapters``) unless ``adapters`` is given.
    """
    from geometry.evaluation.merge_eval import evaluate_merge as run

    if not _is_merge(merged):
        raise InvalidArgumentError(
            f"evaluate_merge: expected a merge (geometry.merge), got {type(merged).__name__}; "
            "score adapters with geometry.evaluate")
    ads = as_adapters(adapters) if adapters is not None else merged.source_adapters
    if not ads:
        raise InvalidArgumentError("evaluate_merge: this merge does not carry its source adapters; pass adapters=")
    return run(ads, tasks, merged=merged, limit=limit, split=split, progress=progress, cache=cache)


def advise(
    adapters: Adapters,
    *,
    tasks: str | os.PathLike[str],
    budget: int | None = 24,
    criterion: str = "js",
    samples: int = 16,
    seed: int = 0,
    methods: Sequence[str] | None = None,
    learned: bool = True,
    measure: bool = False,
    limit: int | None = None,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
    cache: Any = None,
):
    """Which merge should I use? Candidate merges ranked by a label-free criterion, the best recommended
    (:mod:`geometry.evaluation.advise`: the grid, the criterion's formula, what ``measure`` adds).

    Returns an :class:`~geometry.evaluation.advise.Advice`: ``table`` (best first), ``recommended`` (a merge),
    and with ``measure=True`` the true ANP of every candidate and the Spearman correlation of criterion and ANP.
    """
    from geometry.evaluation.advise import advise as run

    return run(as_adapters(adapters), tasks, budget=budget, criterion=criterion, samples=samples, seed=seed,
               methods=methods, learned=learned, measure=measure, limit=limit, progress=progress,
               should_stop=should_stop, cache=cache)


def _is_merge(value: Any) -> bool:
    return hasattr(value, "heads") and hasattr(value, "updates") and hasattr(value, "source_adapters")


def _is_loaded(value: Any) -> bool:
    if isinstance(value, (Adapter, AdapterSet)):
        return True
    if isinstance(value, (str, bytes, bytearray, os.PathLike)):
        return False
    items = list(value)
    return bool(items) and all(isinstance(a, Adapter) for a in items)


__all__ = [
    "VOCABULARY",
    "advise",
    "anatomy",
    "as_adapters",
    "compatibility",
    "compress",
    "distance_table",
    "distance_tensors",
    "distances",
    "embed",
    "evaluate",
    "evaluate_merge",
    "inclusion",
    "inclusion_matrix",
    "interference",
    "load",
    "merge",
    "ranks",
    "resolve_dora",
    "resolve_dora_where_possible",
]
