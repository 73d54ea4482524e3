"""The notebook API: the main things in a few lines, results labelled by adapter name.

    import geometry
    ads = geometry.load(["sample_adapters/synthetic/nli", "some.zip", "hub:owner/name"])  # AdapterSet, by name
    geometry.distances(ads, metric="grassmann", kind="v", layers="last:5")    # DataFrame adapters x adapters
    geometry.distances(ads, metric="cosine", per_layer=True)                  # long DataFrame, one row per pair and layer
    geometry.inclusion(ads["nli"], ads["paraphrase"])                         # DataFrame, one row per module
    m = geometry.merge(ads, method="ties", density=0.2); m.save("out/")       # a peft folder
    geometry.evaluate(m, tasks="sample_adapters/synthetic/tasks")                       # per-task scores and ANP

These six names (``load``, ``distances``, ``inclusion``, ``merge``, ``evaluate``, ``AdapterSet``)
are a stable contract. One keyword spelling everywhere: ``metric``, ``factor`` (``ba``, ``a``,
``b``), ``kind`` (``q``, ``v``, ...), ``stack``, ``layers`` (``"all"``, ``"last:K"``, ``"N,N"``,
``"A-B"`` or a list of ints), ``lam``, ``objective``, ``method``, ``weights``, ``tasks``, ``limit``.
Each function is a thin layer over the module that holds its maths (named in its docstring), where
the formulas are; undefined values stay NaN and are explained in ``DataFrame.attrs["notes"]``.

``geometry.distances``, ``geometry.inclusion`` and ``geometry.evaluate`` are also the modules of
those names: calling the module calls the function here (see :func:`_make_callable`).
"""

from __future__ import annotations

import os
import sys
import types
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from geometry.adapter_set import AdapterSet
from geometry.errors import AdapterLoadError, AtlasError
from geometry.types import Adapter

Source = str | os.PathLike[str] | bytes | Adapter


# --------------------------------------------------------------------------------------------- load
def _expand(source: Any) -> list[Any]:
    """A folder holding several adapter folders (and no adapter of its own) expands to each of them."""
    if isinstance(source, (str, os.PathLike)) and not str(source).startswith("hub:"):
        path = Path(source).expanduser()
        if path.is_dir() and not (path / "adapter_config.json").is_file():
            children = sorted(p for p in path.iterdir() if p.is_dir() and (p / "adapter_config.json").is_file())
            if len(children) > 1:
                return children
    return [source]


def load(sources: Source | Iterable[Source], names: Sequence[str] | None = None) -> AdapterSet:
    """Load adapters into an :class:`AdapterSet` (see :func:`geometry.loader.load_adapter`).

    ``sources``: one or a list of adapter folders, ``.zip`` files (path or bytes), ``hub:owner/name``
    ids, already loaded :class:`Adapter` objects, or a folder of adapter folders (each loaded, in
    name order, e.g. ``geometry.load("sample_adapters/synthetic")``). ``names`` renames them in order;
    otherwise each keeps its folder / file name, made unique with ``-2``, ``-3``.
    A source that fails raises :class:`AdapterLoadError` naming it (nothing is half-loaded).
    """
    from geometry.loader import load_adapter

    if isinstance(sources, (str, os.PathLike, bytes, bytearray, Adapter)):
        sources = [sources]
    items = [s for src in sources for s in _expand(src)]
    if names is not None and len(names) != len(items):
        raise AtlasError(f"load: {len(names)} names for {len(items)} adapters ({', '.join(map(str, items))})")
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


def _adapters(adapters: AdapterSet | Sequence[Adapter] | Adapter) -> list[Adapter]:
    if isinstance(adapters, Adapter):
        return [adapters]
    if isinstance(adapters, AdapterSet):
        return adapters.adapters
    items = list(adapters)
    bad = [type(a).__name__ for a in items if not isinstance(a, Adapter)]
    if bad:
        raise AtlasError(f"expected an AdapterSet or Adapters (geometry.load(...)), got {', '.join(sorted(set(bad)))}")
    return items


# ---------------------------------------------------------------------------------------- distances
def distances(
    adapters: AdapterSet | Sequence[Adapter],
    metric: str = "cosine",
    factor: str = "ba",
    kind: str | None = None,
    layers: str | Iterable[int] = "all",
    *,
    per_layer: bool = False,
    stack: str | None = None,
    pad: bool = False,
    device: Any = None,
) -> pd.DataFrame:
    """Distance ``metric`` (``l2``, ``cosine``, ``grassmann``) between adapters on ``factor`` and ``kind``.

    Default: the ``[n, n]`` matrix ``Tbar_d`` (mean over ``layers`` of the per-layer distance), a
    DataFrame indexed and columned by adapter name. ``per_layer=True``: the long table, one row per
    ``(adapter_i, adapter_j, layer)`` of the chosen layers with ``i, j, adapter_i, adapter_j, layer,
    stack, kind, metric, factor, value``. ``kind=None`` takes ``v`` when every adapter has it, else
    the first common kind. ``attrs``: ``notes`` (why some values are NaN, conventions), ``counts``
    (matrix form: how many layers each pair averaged, when some layer was undefined), ``layers``.
    Maths: :mod:`geometry.distances`.
    """
    from geometry.distances import pairwise_distances, select_layers

    ads = _adapters(adapters)
    tensor = pairwise_distances(ads, metric, factor, kind, stack, pad=pad, device=device)
    chosen = select_layers(tensor.layers, layers)
    notes = [tensor.convention, *tensor.notes]
    names = list(tensor.adapters)
    if per_layer:
        frame = tensor.to_frame()
        frame = frame[frame["layer"].isin(chosen)].reset_index(drop=True)
        frame.attrs.update(notes=notes, layers=chosen)
        return frame
    idx = [tensor.layers.index(v) for v in chosen]
    sub = tensor.values[:, :, idx]
    counts = np.isfinite(sub).sum(-1)
    frame = pd.DataFrame(tensor.reduce(chosen), index=pd.Index(names, name="adapter"), columns=names)
    partial = [
        f"({names[i]}, {names[j]}) averaged {counts[i, j]} of {len(chosen)} layers (the others are undefined)"
        for i in range(len(names)) for j in range(i + 1, len(names)) if counts[i, j] < len(chosen)
    ]
    frame.attrs.update(
        notes=notes + partial, layers=chosen, metric=metric, factor=factor, kind=tensor.kind, stack=tensor.stack,
        counts=pd.DataFrame(counts, index=names, columns=names),
    )
    return frame


# ---------------------------------------------------------------------------------------- inclusion
def inclusion(
    adapter1: Adapter | AdapterSet | Sequence[Adapter],
    adapter2: Adapter | None = None,
    lam: float = 0.0,
    *,
    objective: str = "frobenius",
    kind: str | None = None,
    stack: str | None = None,
    metric: str = "rec",
    device: Any = None,
) -> pd.DataFrame:
    """Spectral inclusion ``tau1 -> tau2`` (:mod:`geometry.inclusion`).

    Two adapters: one row per common module (``stack, layer, kind, rank, s1, s2, l1, l2,
    l1_normalized, l2_normalized, rec, h1, h2``). One set (``adapter2=None``): the asymmetric
    ``[n, n]`` matrix of ``metric`` (row ``tau_i -> column tau_j``, mean over common modules), each
    adapter decomposed once.
    """
    from geometry import inclusion as inc

    if adapter2 is None:
        ads = _adapters(adapter1)
        names = [a.name for a in ads]
        mat = inc.inclusion_matrix(ads, metric, kind, lam, objective, stack=stack, device=device)
        frame = pd.DataFrame(mat, index=pd.Index(names, name="tau_i (row) -> tau_j"), columns=names)
        frame.attrs.update(metric=metric, lam=lam, objective=objective, kind=kind)
        return frame
    if not isinstance(adapter1, Adapter) or not isinstance(adapter2, Adapter):
        raise AtlasError("inclusion(a1, a2): pass two Adapters (ads['name']), or one AdapterSet for the matrix")
    kinds = None if kind is None else [kind]
    frame = inc.inclusion(adapter1, adapter2, lam, kinds, objective, stack=stack, device=device)
    frame.attrs.update(adapters=(adapter1.name, adapter2.name), lam=lam, objective=objective)
    return frame


# -------------------------------------------------------------------------------------------- merge
def merge(adapters: AdapterSet | Sequence[Adapter], method: str = "task_arithmetic", weights: Any = None, **params: Any):
    """Merge adapters with a method of :data:`geometry.merging.MERGE_METHODS` (one call shape).

    Returns a :class:`geometry.merging.MergedAdapter`: ``m.save(path)`` writes a peft folder,
    ``m.summary()`` describes it, ``geometry.evaluate(m, tasks=...)`` scores it.
    """
    from geometry.merging import merge as run

    ads = _adapters(adapters)
    merged = run(ads, method, weights, **params)
    merged.source_adapters = ads  # what geometry.evaluate needs for the fine-tuned scores (not saved)
    return merged


# ----------------------------------------------------------------------------------------- evaluate
def evaluate(
    source: Any,
    tasks: str | os.PathLike[str] | None = None,
    *,
    adapters: AdapterSet | Sequence[Adapter] | None = None,
    split: str = "test",
    limit: int | None = None,
    progress: Callable[[int, int, str], None] | None = None,
):
    """Score on each task's ``split`` (accuracy; ROUGE-L for generation) under ``tasks`` (a folder of task folders).

    * a merge (``geometry.merge``): per task, the fine-tuned score (base + that adapter), the merged
      score (with that task's head) and ``normalized = 100 merged / finetuned``; returns a
      :class:`geometry.merge_eval.MergeEvaluation` (``.frame``, ``.anp`` =
      ``(1/T) sum_t P(merged, t) / P(theta_t, t)`` in %). The source adapters come from
      ``geometry.merge``; pass ``adapters=`` for a merge built otherwise.
    * an Adapter or an AdapterSet: a DataFrame, one row per adapter, scored on its own task.
    * a peft folder path with ``tasks`` pointing at one task folder or ``.jsonl``: a dict of metrics.

    Each adapter's task folder is ``tasks/<training_info task or adapter name>/`` (see
    :func:`geometry.merge_eval.find_task_dir`). Scores are cached on disk by content hash.
    """
    from geometry import evaluate as ev
    from geometry.merge_eval import evaluate_merge, find_task_dir

    if tasks is None:
        raise AtlasError("evaluate: pass tasks= (a folder of task folders, e.g. 'sample_adapters/tasks')")
    if hasattr(source, "heads") and hasattr(source, "updates"):
        ads = _adapters(adapters) if adapters is not None else getattr(source, "source_adapters", None)
        if not ads:
            raise AtlasError("evaluate: this merge does not carry its source adapters; pass adapters=")
        return evaluate_merge(ads, tasks, merged=source, max_examples=limit, progress=progress)
    if isinstance(source, (Adapter, AdapterSet)) or (
        isinstance(source, Sequence) and not isinstance(source, str) and source and isinstance(source[0], Adapter)
    ):
        rows = []
        ads = _adapters(source)
        for k, ad in enumerate(ads):
            folder = find_task_dir(ad, tasks, split)
            result = ev.evaluate(ad, folder, split, limit=limit)
            rows.append({"adapter": ad.name, "task": folder.name, **{k2: v for k2, v in result.items() if k2 != "task"}})
            if progress:
                progress(k + 1, len(ads), ad.name)
        return pd.DataFrame(rows)
    if isinstance(source, (str, os.PathLike)):
        return ev.evaluate(source, tasks, split, limit=limit)
    raise AtlasError(f"evaluate: cannot score a {type(source).__name__} (expected a merge, Adapter, AdapterSet or path)")



# ------------------------------------------------------------------------------- callable modules
def _make_callable(module_name: str, function: Callable[..., Any]) -> None:
    """Let ``geometry.<module_name>(...)`` call ``function`` while staying the module of that name.

    ``geometry.distances`` is both the module holding the maths and the notebook function: the
    module's class becomes a ``ModuleType`` subclass whose ``__call__`` is ``function``, so
    ``import geometry.distances``, ``from geometry.distances import ...`` and patching keep working.
    """
    module = sys.modules[module_name]
    if isinstance(module, types.ModuleType) and not callable(module):
        cls = type(f"CallableModule[{module_name}]", (types.ModuleType,), {
            "__call__": staticmethod(function), "__doc__": module.__doc__,
        })
        module.__class__ = cls
