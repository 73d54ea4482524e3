"""Score an adapter, or any merged set of LoRA updates, on a task split.

Classification (``text`` [+ ``text_pair``] + ``label``): accuracy and macro F1 of the argmax of
the model's logits. Generation (``prompt`` + ``reference``, causal LMs): ROUGE-L F1 of greedy
generations against the references. The metrics are in :mod:`geometry.evaluation.metrics`; running models
(the base loaded once, updates applied by hooks, head swaps) is :mod:`geometry.runtime`.

What can be scored (``source`` of :func:`evaluate`):

* a peft adapter folder: loaded with ``PeftModel.from_pretrained`` on a fresh base model, resolved by
  :func:`geometry.runtime.base_models.resolve_base` (the *reference path*, exactly what peft users run; it
  also covers what the runtime refuses, such as DoRA). Load it with
  :func:`geometry.io.loader.load_adapter` to score it through the runtime instead;
* an :class:`~geometry.types.Adapter`, :class:`LoraUpdates`, or a merge result with ``updates()`` /
  ``heads`` / ``base_model`` (see :mod:`geometry.merging`): through :class:`geometry.runtime.Runtime`,
  on the cached base model of that base, task type, number of labels and device (never reloaded per
  score, never modified): ``h = W0 x + sum_t s_t B_t (A_t x)`` by forward hooks (no ``B @ A``;
  dense updates ``h += x D^T``), with that task's classification head swapped in;
* a ready ``torch.nn.Module`` (with ``tokenizer=``).

Results are cached on disk by content hash (adapter bytes, task file bytes, split, limit) when a cache
is given (``cache=``, :mod:`geometry.cache`); by default nothing is written.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from geometry.cache import ResultCache, as_cache
from geometry.device import default_device
from geometry.errors import AdapterLoadError, AtlasError
from geometry.evaluation.metrics import classification_scores, exact_match, rouge_scores
from geometry.evaluation.tasks import TaskData, load_task, task_file
from geometry.runtime import (
    LoraUpdates,
    Runtime,
    adapter_updates,
    as_updates,
    build_classifier,
    generate,
    load_base,
    load_tokenizer,
    predict,
)
from geometry.runtime.base_models import quiet, resolve_base
from geometry.runtime.modules import _num_labels
from geometry.runtime.updates import _is_merge
from geometry.types import Adapter

__all__ = ["EVAL_VERSION", "evaluate", "load_classifier", "load_peft_folder", "score_model", "source_hash"]
#: Bump when the scoring changes, so that cached results are recomputed.
#: 2: Adapter / LoraUpdates / merges scored through geometry.runtime (hooks, cached base, factored fused parts).
EVAL_VERSION = "3"  # 3: generation scores exact match, ROUGE-1 and ROUGE-L, and name the metric that counts

# ---------------------------------------------------------------------------------------------- peft folders
def _read_config(folder: Path) -> dict:
    file = folder / "adapter_config.json"
    if not file.is_file():
        raise AdapterLoadError(f"{folder}: no adapter_config.json (expected a peft adapter folder)")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise AdapterLoadError(f"{file}: not valid JSON ({exc.msg})") from None


def _folder_head_shapes(folder: Path) -> dict[str, torch.Tensor]:
    weights = folder / "adapter_model.safetensors"
    if weights.is_file():
        from safetensors import safe_open

        with safe_open(str(weights), "pt") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys() if "lora_" not in k}
    binary = folder / "adapter_model.bin"
    if binary.is_file():
        state = torch.load(binary, map_location="cpu", weights_only=True)
        return {k: v for k, v in state.items() if "lora_" not in k}
    raise AdapterLoadError(f"{folder}: no adapter_model.safetensors or adapter_model.bin")


def load_peft_folder(folder: str | os.PathLike[str], base: str | None = None) -> tuple[torch.nn.Module, str]:
    """``PeftModel.from_pretrained`` on a fresh resolved base model; returns ``(model, base path)``.

    The reference path (peft's own forward); a fresh base each call, since peft wraps it in place.
    """
    from peft import PeftModel

    folder = Path(folder)
    config = _read_config(folder)
    base_name = base or config.get("base_model_name_or_path")
    if not base_name:
        raise AdapterLoadError(f"{folder / 'adapter_config.json'}: no base_model_name_or_path (pass base=)")
    task_type = config.get("task_type") or "SEQ_CLS"
    model = load_base(base_name, task_type, _num_labels(_folder_head_shapes(folder)))
    with quiet():
        model = PeftModel.from_pretrained(model, str(folder))
    return model.eval(), resolve_base(base_name)


def load_classifier(
    source: Any, *, head: str | None = None, base: str | None = None, device: torch.device | str | None = None
) -> tuple[torch.nn.Module, Any]:
    """``(model, tokenizer)``, a standalone model you own, for a peft folder (``PeftModel``), an
    :class:`Adapter`, :class:`LoraUpdates` or a merge (a fresh base with the updates written into its
    weights by :func:`apply_updates`). Scoring does not use this: :func:`evaluate` runs the cached
    base through :class:`~geometry.runtime.Runtime`.
    """
    if isinstance(source, (str, os.PathLike)):
        model, base_path = load_peft_folder(source, base=base)
    else:
        updates = as_updates(source, head)
        if base:
            updates.base = base
        model = build_classifier(updates.base, updates.updates, updates.head, updates.task_type)
        base_path = resolve_base(updates.base)
    return model.to(device or default_device()), load_tokenizer(base_path)


# ---------------------------------------------------------------------------------------------- scoring
def score_model(model: torch.nn.Module, tokenizer: Any, data: TaskData, batch_size: int = 64,
                max_new_tokens: int | None = None) -> dict[str, Any]:
    """Metrics of a built model on one split (no caching).

    Generation: greedy continuations (``max_new_tokens``, default the task's own or 32) scored by exact match,
    ROUGE-1 and ROUGE-L F1 (means); ``metric`` names the one the task counts (:attr:`TaskData.metric`)."""
    if data.kind == "generation":
        budget = max_new_tokens or data.max_new_tokens or 32
        outputs = generate(model, tokenizer, data.texts, batch_size=min(batch_size, 16), max_new_tokens=budget)
        refs = data.references or []
        rouge = [rouge_scores(o, r) for o, r in zip(outputs, refs, strict=True)]
        return {"exact_match": float(np.mean([exact_match(o, r) for o, r in zip(outputs, refs)])),
                "rouge_1": float(np.mean([x["rouge_1"] for x in rouge])),
                "rouge_l": float(np.mean([x["rouge_l"] for x in rouge])),
                "metric": data.metric or "rouge_l", "n": len(data)}
    preds = predict(model, tokenizer, data, batch_size=batch_size)
    labels = data.labels or []
    if len(preds) and int(preds.max()) >= max(len(data.label_names), 1) and data.label_names:
        raise AtlasError(f"the model predicts class {int(preds.max())} but task {data.name!r} has "
                         f"{len(data.label_names)} labels ({', '.join(data.label_names)})")
    return {**classification_scores(preds, labels), "n": len(data)}


# ---------------------------------------------------------------------------------------------- entry point
def source_hash(source: Any, head: str | None = None) -> str | None:
    """Content hash of what is evaluated (``None`` for a bare model: not cached)."""
    if isinstance(source, (str, os.PathLike)):
        folder = Path(source)
        h = hashlib.sha256()
        for name in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"):
            if (folder / name).is_file():
                h.update(name.encode() + (folder / name).read_bytes())
        return h.hexdigest()
    if isinstance(source, Adapter):
        return source.content_hash or adapter_updates(source).content_hash()
    if isinstance(source, LoraUpdates):
        return source.content_hash()
    if hasattr(source, "content_hash"):
        value = source.content_hash
        return f"{value() if callable(value) else value}|head={head}"
    return None


def evaluate(
    source: Any,
    task: str | os.PathLike[str] | TaskData,
    split: str = "test",
    batch_size: int = 64,
    *,
    limit: int | None = None,
    head: str | None = None,
    tokenizer: Any = None,
    max_new_tokens: int | None = None,
    device: torch.device | str | None = None,
    cache: ResultCache | str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Score ``source`` on ``split`` of ``task`` (a folder, a ``.jsonl`` file, or :class:`TaskData`).

    Returns ``{"accuracy", "macro_f1", "n", "task", "split"}`` for classification, or
    ``{"exact_match", "rouge_1", "rouge_l", "metric", "n", "task", "split"}`` for generation (``metric``: the
    task's own score, :attr:`TaskData.metric`; ``max_new_tokens`` default: the task's, else 32). ``limit`` scores the first ``limit`` examples.
    ``head`` picks one task's head of a merge. ``cache`` (a :class:`geometry.cache.ResultCache` or a
    folder) keeps the scores by content hash (source, task file, split, limit); ``None``, the default,
    touches no disk. A bare model or a :class:`TaskData` is never cached.
    """
    cache = as_cache(cache)
    data = task if isinstance(task, TaskData) else load_task(task, split)
    data = data.head(limit)
    key = source_hash(source, head) if cache is not None else None
    if key is not None and not isinstance(task, TaskData):
        file_hash = hashlib.sha256(task_file(task, split).read_bytes()).hexdigest()
        parts = [EVAL_VERSION, key, file_hash, split, limit, max_new_tokens]
        result = cache.get_or_compute(
            "evaluate", parts, lambda: _evaluate(source, data, batch_size, head, tokenizer, max_new_tokens, device))
    else:
        result = _evaluate(source, data, batch_size, head, tokenizer, max_new_tokens, device)
    return {**result, "task": data.name, "split": data.split}


def _evaluate(source: Any, data: TaskData, batch_size: int, head: str | None, tokenizer: Any,
              max_new_tokens: int | None, device: Any) -> dict[str, Any]:
    if isinstance(source, torch.nn.Module):
        if tokenizer is None:
            raise AtlasError("evaluating a bare model needs tokenizer=")
        model = source.to(device or default_device())
        return score_model(model, tokenizer, data, batch_size=batch_size, max_new_tokens=max_new_tokens)
    if isinstance(source, (str, os.PathLike)):
        model, base_path = load_peft_folder(source)
        model = model.to(device or default_device())
        return score_model(model, tokenizer or load_tokenizer(base_path), data, batch_size=batch_size,
                           max_new_tokens=max_new_tokens)
    if not isinstance(source, (Adapter, LoraUpdates)) and not _is_merge(source):
        as_updates(source)  # raises the "cannot evaluate a ..." error
    # a merge task's head; an adapter's own head otherwise; a merge without heads (causal LMs: the output layer is
    # the base's) has none to pick
    pick = head if _is_merge(source) and any((getattr(source, "heads", None) or {}).values()) else None
    runtime = Runtime.for_sources(source, head=pick, device=device)
    with runtime.apply(source, head=pick):
        return score_model(runtime.model, tokenizer or runtime.tokenizer, data, batch_size=batch_size,
                           max_new_tokens=max_new_tokens)
