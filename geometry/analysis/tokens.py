"""Token dynamics: how a LoRA changes the clustering of a text's tokens across the layers of a model.

Reading the layers as time and the tokens as interacting particles (Geshkovski et al.; Koubbi, Boussard
& Hernandez, "The impact of LoRA on the emergence of clusters in Transformers"), self-attention drives
the tokens into clusters; a LoRA on the value matrix first follows the base trajectory, then diverges
towards another clustering. This module measures that on a real base model and real adapters.

For a text ``x`` of ``n`` tokens, ``h_l(i)`` is the hidden state of token ``i`` after layer ``l`` of the
base model and ``h'_l(i)`` the same with the adapter applied (both from :class:`geometry.runtime.Runtime`:
the base loaded once, the adapter added by hooks). Layer ``0`` is the embedding output, layer ``l >= 1``
the output of block ``l`` (``RuntimeOutput.hidden_states`` order). Padding positions are never used.
Per layer, for the base and for each adapter:

* ``clusters_*``: the number of clusters of the tokens' states by agglomerative clustering on the cosine
  distance ``1 - cos(h(i), h(j))`` with *average* linkage, cut at ``threshold``: two groups are merged
  while the mean cosine distance between their members is below the threshold (single linkage would
  chain distant tokens through intermediate ones; complete linkage splits a cluster on one outlier);
* ``distance``: ``mean_i (1 - cos(h_l(i), h'_l(i)))``, when the trajectories of the two models separate;
* ``pairwise_cosine_*``: ``mean_{i<j} cos(h_l(i), h_l(j))``, whether the tokens collapse (1 = all aligned).
  A text of one token has no pair: NaN, not 0.

``include_special`` (default ``True``) keeps the tokenizer's special tokens ([CLS], [SEP], <s> ...) among
the particles (the model attends to them); ``False`` drops them from every measure and from the map (the
model still sees them). The 2-D map is one PCA fitted on the states of *all* layers of the base *and* of
every adapter at once (unit-normalised by default, the metrics being cosine ones), so that a point's
motion between layers and between models is motion, not a change of axes.

    import geometry, geometry.analysis.tokens as tk
    ads = geometry.load("sample_adapters/synthetic")
    dyn = tk.token_dynamics(ads[["nli", "paraphrase"]], text="A man is playing a guitar.", threshold=0.5)
    dyn.table              # one row per (adapter, layer)
    dyn.points             # 2-D coordinates of every (model, layer, token)
    tk.batch_dynamics(ads[["nli"]], task="sample_adapters/synthetic/tasks/nli", limit=32).summary   # mean and spread

Given a ``cache`` (a :class:`geometry.cache.ResultCache` or a folder), hidden states of a text are kept
there by adapter content, base, text and ``max_length``, and the batch tables by the same plus the texts,
the threshold and ``include_special``; without one (the default) nothing is written to disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from geometry.analysis.token_measures import (  # noqa: F401  (the measures, re-exported here)
    METRICS,
    PCA2,
    cluster_count,
    cluster_labels,
    fit_pca,
    layer_table,
    mean_cosine_distance,
    mean_pairwise_cosine,
)
from geometry.errors import AtlasError, IncompatibleAdaptersError
from geometry.types import Adapter

#: Part of every cache key: bump when the meaning of a result changes.
TOKENS_VERSION = "tokens-1"
#: Default cut of the agglomerative clustering (cosine distance, in [0, 2]).
DEFAULT_THRESHOLD = 0.5
#: Default number of inputs of a task's split in batch mode.
DEFAULT_BATCH = 32
BASE_MODEL = "base"
#: Plain-words labels of the per-layer measures (figures, tables).
METRIC_LABELS = {
    "clusters_base": "clusters (base)",
    "clusters_adapted": "clusters (adapted)",
    "distance": "mean cosine distance base vs adapted",
    "pairwise_cosine_base": "mean pairwise cosine (base)",
    "pairwise_cosine_adapted": "mean pairwise cosine (adapted)",
}


class TokenInputError(AtlasError):
    """The text(s) to analyse are unusable (empty, not a string, no task inputs)."""


class BaseLoadError(AtlasError):
    """The base model of the adapters cannot be loaded (not a local folder, not reachable on the hub)."""




# ---------------------------------------------------------------------------------------------- adapters, runtime
def as_adapter_list(adapters: Any) -> list[Adapter]:
    """Adapters from an :class:`Adapter`, an ``AdapterSet``, a folder / zip / ``hub:`` id or a list of these;
    display names made unique."""
    if isinstance(adapters, Adapter):
        items = [adapters]
    elif isinstance(adapters, (str, os.PathLike)):
        from geometry.api import load

        items = list(load(adapters))
    elif hasattr(adapters, "adapters") and not callable(adapters.adapters):
        items = list(adapters.adapters)
    elif isinstance(adapters, Iterable):
        items = [a for item in adapters for a in as_adapter_list(item)]
    else:
        raise AtlasError(f"expected adapters (Adapter, AdapterSet, folder or list), got {type(adapters).__name__}")
    seen: dict[str, int] = {}
    out = []
    for a in items:
        if a.name in seen:
            seen[a.name] += 1
            from dataclasses import replace

            a = replace(a, name=f"{a.name}-{seen[a.name]}")
        else:
            seen[a.name] = 1
        out.append(a)
    return out


def _base_of(adapters: Sequence[Adapter], base: str | None) -> str:
    from geometry.runtime.base_models import resolve_base

    if base is not None:
        return str(base)
    bases = {}
    for a in adapters:
        name = a.config.base_model_name_or_path
        if not name:
            raise AtlasError(f"{a.name}: adapter_config.json has no base_model_name_or_path: pass base=")
        bases.setdefault(resolve_base(name), []).append(a.name)
    if len(bases) > 1:
        detail = "; ".join(f"{', '.join(v)} on {k}" for k, v in bases.items())
        raise IncompatibleAdaptersError(f"the adapters are on different base models ({detail}): token dynamics "
                                        "compares them on one base; choose adapters of one base")
    return str(adapters[0].config.base_model_name_or_path)


def runtime_for(adapters: Sequence[Adapter], base: str | None = None) -> Any:
    """The cached :class:`Runtime` of the adapters' base (one base for all), any head kept (hidden states
    do not depend on it). A base that cannot be loaded raises :class:`BaseLoadError`."""
    from geometry.runtime import Runtime

    if not adapters and base is None:
        raise AtlasError("no adapter given: token dynamics compares the base with at least one adapter")
    name = _base_of(adapters, base)
    task_type = next((a.config.task_type for a in adapters if a.config.task_type), None)
    try:
        rt = Runtime.for_base(name, task_type, None)
        rt.tokenizer  # noqa: B018  (loads it now, so that a missing tokenizer is a load error too)
    except AtlasError:
        raise
    except (OSError, ValueError, ImportError, KeyError, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        who = ", ".join(a.name for a in adapters) or "the request"
        raise BaseLoadError(
            f"cannot load the base model {name!r} of {who}: {first} (give a local folder of the base model, "
            "or a hub id with a network connection)") from None
    return rt


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        texts = [texts]
    out = []
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TokenInputError(f"text {i + 1} is a {type(t).__name__}, expected a string")
        if not t.strip():
            raise TokenInputError("the text is empty: type a sentence to follow its tokens through the layers"
                                  if len(texts) == 1 else f"text {i + 1} is empty")
        out.append(t)
    if not out:
        raise TokenInputError("no text given: type a sentence (or pick a task's inputs for batch mode)")
    return out


# ---------------------------------------------------------------------------------------------- hidden states
@dataclass
class TextStates:
    """Hidden states of one text: ``base`` and ``adapted[name]`` of shape ``(layers, n, d)`` (float32, all
    tokens of the text without padding), its ``tokens`` and which are ``special``."""

    text: str
    tokens: list[str]
    special: np.ndarray
    base: np.ndarray
    adapted: dict[str, np.ndarray]
    truncated: bool = False

    def keep(self, include_special: bool) -> np.ndarray:
        """Indices of the tokens measured (all, or the non-special ones)."""
        return np.arange(len(self.tokens)) if include_special else np.flatnonzero(~self.special)


def _source_key(adapter: Adapter) -> str:
    from geometry.evaluation.evaluate import source_hash

    return source_hash(adapter) or f"unhashed:{id(adapter)}"


@contextlib.contextmanager
def _pad_token(tokenizer: Any) -> Iterator[None]:
    """A tokenizer without a pad token (GPT-2, Llama) pads with its end-of-text token here (padding positions
    are masked out and never measured); the shared tokenizer is restored afterwards."""
    if getattr(tokenizer, "pad_token", None) is not None or getattr(tokenizer, "eos_token", None) is None:
        yield
        return
    tokenizer.pad_token = tokenizer.eos_token
    try:
        yield
    finally:
        tokenizer.pad_token = None


def _compute_states(rt: Any, adapters: Sequence[Adapter], texts: list[str], max_length: int,
                    batch_size: int) -> list[TextStates]:
    try:
        with _pad_token(rt.tokenizer):
            return _run_states(rt, adapters, texts, max_length, batch_size)
    except AtlasError:
        raise
    except (ValueError, RuntimeError, TypeError, IndexError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise AtlasError(f"running the base model {rt.base!r} on the text failed: {first}") from None


def _run_states(rt: Any, adapters: Sequence[Adapter], texts: list[str], max_length: int,
                batch_size: int) -> list[TextStates]:
    enc = rt.encode(texts, max_length=max_length)
    ids, mask = enc["input_ids"].numpy(), enc["attention_mask"].numpy().astype(bool)
    longer = rt.tokenizer(list(texts), truncation=True, max_length=max_length + 1)["input_ids"]
    special_ids = set(getattr(rt.tokenizer, "all_special_ids", []) or [])

    def states() -> np.ndarray:
        out = rt.run(texts, batch_size=batch_size, max_length=max_length, output_hidden_states=True)
        if out.hidden_states is None:
            raise AtlasError(f"the base model {rt.base!r} returns no hidden states")
        return np.stack([h.detach().float().cpu().numpy() for h in out.hidden_states])  # (layers, N, T, d)

    with rt.apply([], head=False):  # the lock, and no update: the base itself
        base = states()
    adapted = {}
    for a in adapters:
        with rt.apply([a], head=False):
            adapted[a.name] = states()
    result = []
    for i, text in enumerate(texts):
        pos = np.flatnonzero(mask[i])
        tok_ids = ids[i, pos]
        result.append(TextStates(
            text, list(rt.tokenizer.convert_ids_to_tokens(tok_ids.tolist())),
            np.array([int(t) in special_ids for t in tok_ids], dtype=bool),
            base[:, i, pos].copy(), {k: v[:, i, pos].copy() for k, v in adapted.items()},
            truncated=len(longer[i]) > len(pos)))
    return result


def _cached(namespace: str, parts: list[Any], compute: Any, cache: Any) -> Any:
    from geometry.cache import cached

    return cached(cache, namespace, [TOKENS_VERSION, *parts], compute)


def hidden_states(adapters: Any, texts: str | Sequence[str], *, base: str | None = None, max_length: int = 128,
                  batch_size: int = 32, cache: Any = None) -> list[TextStates]:
    """Hidden states of every token of each text at every layer, for the base and for each adapter.

    One base model (:func:`runtime_for`), one pass of the base and one per adapter (``rt.apply``).
    """
    from geometry.runtime.base_models import resolve_base

    texts = _check_texts(texts)
    adapters = as_adapter_list(adapters)
    parts = [resolve_base(_base_of(adapters, base)), tuple(_source_key(a) for a in adapters),
             hashlib.sha256("\0".join(texts).encode()).hexdigest(), int(max_length)]

    def compute() -> list[TextStates]:  # the base model is loaded only when the cache misses
        return _compute_states(runtime_for(adapters, base), adapters, texts, max_length, batch_size)

    states = _cached("token_states", parts, compute, cache)
    names = [a.name for a in adapters]  # display names are not part of the key: put the current ones back
    for s in states:
        s.adapted = dict(zip(names, s.adapted.values()))
    return states


# ---------------------------------------------------------------------------------------------- one text
@dataclass
class TokenDynamics:
    """Token dynamics of one text (see the module docstring).

    ``table``: one row per (adapter, layer) with :data:`METRICS`; ``points``: the shared 2-D PCA map, one
    row per (model, layer, token) with ``model`` = ``"base"`` or an adapter name; ``pca``: the fit.
    """

    text: str
    tokens: list[str]
    special: list[bool]
    adapters: list[str]
    threshold: float
    include_special: bool
    table: pd.DataFrame
    points: pd.DataFrame
    pca: PCA2
    states: TextStates
    notes: list[str] = field(default_factory=list)

    @property
    def layers(self) -> list[int]:
        return sorted(self.table["layer"].unique().tolist())


def _dynamics(states: TextStates, names: list[str], threshold: float, include_special: bool,
              normalize: bool) -> TokenDynamics:
    keep = states.keep(include_special)
    base = states.base[:, keep]
    adapted = {n: states.adapted[n][:, keep] for n in names}
    table = pd.concat([layer_table(base, adapted[n], threshold, n) for n in names], ignore_index=True)
    pca = fit_pca([base, *adapted.values()], 2, normalize)
    tokens = [states.tokens[i] for i in keep]
    special = [bool(states.special[i]) for i in keep]
    frames = []
    for model, arr in [(BASE_MODEL, base), *adapted.items()]:
        layers, n = arr.shape[0], arr.shape[1]
        xy = pca.transform(arr).reshape(layers, n, 2)
        frames.append(pd.DataFrame({
            "model": model, "layer": np.repeat(np.arange(layers), n), "token_index": np.tile(keep, layers),
            "token": tokens * layers, "special": special * layers,
            "x": xy[..., 0].ravel(), "y": xy[..., 1].ravel()}))
    points = pd.concat(frames, ignore_index=True)
    notes = []
    if states.truncated:
        notes.append("the text was truncated to the model's max_length tokens")
    if not len(keep):
        notes.append("no token left once the special tokens are dropped: every measure is undefined (NaN)")
    elif len(keep) == 1:
        notes.append("one token: the mean pairwise cosine is undefined (NaN), the cluster count is 1")
    table.attrs.update(threshold=threshold, include_special=include_special)
    return TokenDynamics(states.text, tokens, special, list(names), float(threshold), bool(include_special),
                         table, points, pca, states, notes)


def token_dynamics(adapters: Any, text: str, *, threshold: float = DEFAULT_THRESHOLD, include_special: bool = True,
                   normalize: bool = True, base: str | None = None, max_length: int = 128,
                   cache: Any = None) -> TokenDynamics:
    """Token dynamics of ``text`` for the base and each adapter (one or several; see the module docstring).

    ``threshold``: cosine-distance cut of the clustering; ``include_special``: measure [CLS] / [SEP] too;
    ``normalize``: unit-normalise the states before the shared PCA.
    """
    if not isinstance(threshold, (int, float)) or not np.isfinite(threshold) or not 0 <= threshold <= 2:
        raise AtlasError(f"threshold must be a cosine distance in [0, 2], got {threshold!r}")
    adapters = as_adapter_list(adapters)
    (states,) = hidden_states(adapters, [text], base=base, max_length=max_length, cache=cache)
    return _dynamics(states, [a.name for a in adapters], float(threshold), include_special, normalize)


# ---------------------------------------------------------------------------------------------- batch mode
@dataclass
class BatchDynamics:
    """Per-layer measures over many texts: ``per_text`` (one row per text, adapter and layer) and
    ``summary`` (one row per adapter, layer and metric: ``mean, std, q10, q90, n`` over the texts where the
    metric is defined; NaN values are left out and counted out of ``n``)."""

    texts: list[str]
    adapters: list[str]
    threshold: float
    include_special: bool
    per_text: pd.DataFrame
    summary: pd.DataFrame
    source: str = ""


def summarize(per_text: pd.DataFrame) -> pd.DataFrame:
    """Mean, standard deviation (ddof 1), 10 % / 90 % quantiles and count over texts of each metric."""
    rows = []
    for (adapter, layer), part in per_text.groupby(["adapter", "layer"], sort=False):
        for metric in METRICS:
            v = part[metric].to_numpy(dtype=float)
            v = v[np.isfinite(v)]
            rows.append({"adapter": adapter, "layer": int(layer), "metric": metric, "n": int(len(v)),
                         "mean": float(v.mean()) if len(v) else np.nan,
                         "std": float(v.std(ddof=1)) if len(v) > 1 else np.nan,
                         "q10": float(np.quantile(v, 0.1)) if len(v) else np.nan,
                         "q90": float(np.quantile(v, 0.9)) if len(v) else np.nan})
    return pd.DataFrame(rows, columns=["adapter", "layer", "metric", "n", "mean", "std", "q10", "q90"])


def task_texts(task: str | os.PathLike[str], split: str = "validation", limit: int | None = DEFAULT_BATCH) -> list[str]:
    """The first ``limit`` inputs (``text`` field) of ``split`` of a task folder or ``.jsonl`` file."""
    from geometry.evaluation.tasks import load_task

    data = load_task(task, split)
    if limit is not None and limit < 1:
        raise TokenInputError(f"limit must be at least 1, got {limit}")
    return list(data.head(limit).texts)


#: texts per step of a batch run: each step is kept in the cache given, reported to ``progress`` and ``partial``
BATCH_CHUNK = 16


def batch_dynamics(adapters: Any, texts: Sequence[str] | None = None, *, task: str | os.PathLike[str] | None = None,
                   split: str = "validation", limit: int | None = DEFAULT_BATCH,
                   threshold: float = DEFAULT_THRESHOLD, include_special: bool = True, base: str | None = None,
                   max_length: int = 128, cache: Any = None, progress: Any = None, partial: Any = None,
                   cached_only: bool = False) -> BatchDynamics | None:
    """The per-layer measures of :func:`token_dynamics` for each of ``texts`` (or the first ``limit`` inputs
    of ``split`` of ``task``), with their mean and spread over the texts.

    The texts run :data:`BATCH_CHUNK` at a time, each step kept in ``cache`` when one is given (a
    :class:`geometry.cache.ResultCache` or a folder; ``None``: no disk): after each one
    ``progress(done, total, message)`` is called with the inputs done so far and ``partial(result)`` with
    the :class:`BatchDynamics` of those inputs, so an interrupted run keeps (and, with a cache, a new run
    skips) what finished. ``cached_only``: ``None`` unless the whole result is already in ``cache``."""
    from geometry.cache import as_cache

    cache = as_cache(cache)
    if texts is None:
        if task is None:
            raise TokenInputError("batch mode needs texts= or task= (a task folder with a validation split)")
        texts = task_texts(task, split, limit)
        source = f"{Path(task).name}/{split} ({len(texts)} inputs)"
    else:
        texts = list(_check_texts(texts))[:limit] if limit is not None else list(_check_texts(texts))
        source = f"{len(texts)} texts"
    texts = _check_texts(texts)
    adapters = as_adapter_list(adapters)
    names = [a.name for a in adapters]

    from geometry.runtime.base_models import resolve_base

    common = [resolve_base(_base_of(adapters, base)), tuple(_source_key(a) for a in adapters)]
    settings = [int(max_length), float(threshold), bool(include_special)]

    def text_hash(some: Sequence[str]) -> str:
        return hashlib.sha256("\0".join(some).encode()).hexdigest()

    def result(per_text: pd.DataFrame, done: Sequence[str]) -> BatchDynamics:
        per_text = per_text.copy()
        mapping = dict(zip(per_text["adapter"].drop_duplicates().tolist(), names))
        per_text["adapter"] = per_text["adapter"].map(mapping)
        label = source if len(done) == len(texts) else f"{source}, {len(done)} of {len(texts)} finished"
        return BatchDynamics(list(done), names, float(threshold), bool(include_special), per_text,
                             summarize(per_text), label)

    def chunk_table(start: int, chunk: list[str]) -> pd.DataFrame:
        states = hidden_states(adapters, chunk, base=base, max_length=max_length)
        frames = []
        for i, s in enumerate(states, start=start):
            keep = s.keep(include_special)
            for n in names:
                t = layer_table(s.base[:, keep], s.adapted[n][:, keep], threshold, n)
                t.insert(0, "text_index", i)
                frames.append(t)
        return pd.concat(frames, ignore_index=True)

    def compute() -> pd.DataFrame:
        frames: list[pd.DataFrame] = []
        for start in range(0, len(texts), BATCH_CHUNK):
            chunk = list(texts[start:start + BATCH_CHUNK])
            frames.append(_cached("token_batch_step", [*common, start, text_hash(chunk), *settings],
                                  lambda start=start, chunk=chunk: chunk_table(start, chunk), cache))
            done = min(start + BATCH_CHUNK, len(texts))
            if partial is not None and done < len(texts):
                partial(result(pd.concat(frames, ignore_index=True), texts[:done]))
            if progress is not None:
                progress(done, len(texts), "")  # the bar shows done / total
        return pd.concat(frames, ignore_index=True)

    parts = [*common, text_hash(texts), *settings]
    if cached_only:
        per_text = cache.get("token_batch", [TOKENS_VERSION, *parts]) if cache is not None else None
        return None if per_text is None else result(per_text, texts)
    return result(_cached("token_batch", parts, compute, cache), texts)


def separation_layer(table: pd.DataFrame, delta: float = 0.05) -> pd.Series:
    """Per adapter, the first layer whose mean cosine distance base vs adapted exceeds ``delta`` (NaN: never)."""
    out = {}
    for adapter, part in table.groupby("adapter", sort=False):
        above = part.sort_values("layer")
        above = above[above["distance"] > delta]
        out[adapter] = float(above["layer"].iloc[0]) if len(above) else float("nan")
    return pd.Series(out, name=f"separation_layer(delta={delta:g})")
