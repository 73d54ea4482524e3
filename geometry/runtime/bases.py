"""Base models and tokenizers, loaded once per process in bounded, clearable caches.

At most :data:`MAX_RUNTIMES` runtimes (a loaded base model each: ``$ADAPTER_ATLAS_MAX_BASES``, default 4)
and :data:`MAX_TOKENIZERS` tokenizers are kept, least recently used dropped first;
:func:`clear_cache` forgets them all."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from typing import Any

import torch
from cachetools import LRUCache

from geometry.runtime.base_models import is_gguf, pretrained_args, quiet, resolve_base

# ---------------------------------------------------------------------------------------------- model loading
_AUTO = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "FEATURE_EXTRACTION": "AutoModel",
}


def _task_type(task_type: str | None) -> str:
    return (task_type or "SEQ_CLS").upper()


def load_base(base: str, task_type: str | None = "SEQ_CLS", num_labels: int | None = None) -> torch.nn.Module:
    """A fresh base model (not cached) of ``task_type`` from the folder (or GGUF file, de-quantized to float32)
    ``resolve_base(base)`` gives; a GGUF file that is corrupt, truncated or of an architecture transformers
    cannot load is one :class:`geometry.errors.AtlasError` naming it.

    ``SEQ_CLS`` / ``TOKEN_CLS`` models get ``num_labels`` outputs (their head is initialised at random
    when the base has none). Unknown task types load as sequence classifiers (peft's default here).
    """
    import transformers

    path = resolve_base(base)
    task_type = _task_type(task_type)
    auto = getattr(transformers, _AUTO.get(task_type, "AutoModelForSequenceClassification"))
    kwargs = {"num_labels": num_labels} if num_labels and task_type not in ("CAUSAL_LM", "SEQ_2_SEQ_LM") else {}
    where, extra = pretrained_args(path)
    with _checked(path, "model"), quiet():
        return auto.from_pretrained(where, **kwargs, **extra)


def _checked(path: str, what: str) -> contextlib.AbstractContextManager:
    """For a GGUF file: its header checked first, and any load error one :class:`AtlasError` naming the file
    (:func:`geometry.runtime.gguf_files.load_errors`); nothing for a folder or hub id."""
    if not is_gguf(path):
        return contextlib.nullcontext()
    from geometry.runtime.gguf_files import load_errors

    return load_errors(path, what)


def _max_runtimes() -> int:
    try:
        return max(1, int(os.environ.get(MAX_RUNTIMES_ENV, "4")))
    except ValueError:
        return 4


#: environment variable: how many loaded bases (runtimes) a process keeps at most
MAX_RUNTIMES_ENV = "ADAPTER_ATLAS_MAX_BASES"
MAX_RUNTIMES = _max_runtimes()
MAX_TOKENIZERS = 8
_TOKENIZERS: LRUCache = LRUCache(maxsize=MAX_TOKENIZERS)
_RUNTIMES: LRUCache = LRUCache(maxsize=MAX_RUNTIMES)  # key -> geometry.runtime.model.Runtime
_CACHE_LOCK = threading.Lock()


def load_tokenizer(base: str) -> Any:
    """The tokenizer of ``resolve_base(base)``, loaded once per process (bounded cache)."""
    path = resolve_base(base)
    with _CACHE_LOCK:
        if path in _TOKENIZERS:
            return _TOKENIZERS[path]
        from transformers import AutoTokenizer

        where, extra = pretrained_args(path)
        with _checked(path, "tokenizer"), quiet():
            tokenizer = AutoTokenizer.from_pretrained(where, **extra)
        _TOKENIZERS[path] = tokenizer
        return tokenizer


def cached_runtime(key: tuple, make: Callable[[], Any]) -> Any:
    """The runtime cached under ``key``, or ``make()`` cached then returned (two threads asking at once
    may both load; the first stored wins). At most :data:`MAX_RUNTIMES` are kept."""
    with _CACHE_LOCK:
        runtime = _RUNTIMES.get(key)
    if runtime is None:
        made = make()
        with _CACHE_LOCK:
            runtime = _RUNTIMES.setdefault(key, made)
    return runtime


def cached_runtimes() -> int:
    """How many runtimes (loaded bases) this process holds now."""
    with _CACHE_LOCK:
        return len(_RUNTIMES)


def loaded_bytes() -> int:
    """Bytes of the parameters and buffers of the base models this process holds (each runtime's model once)."""
    with _CACHE_LOCK:
        models = {id(rt.model): rt.model for rt in _RUNTIMES.values() if getattr(rt, "model", None) is not None}
    total = 0
    for model in models.values():
        seen = set()
        for t in (*model.parameters(), *model.buffers()):
            if t.data_ptr() not in seen:  # tied weights counted once
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def clear_cache() -> None:
    """Forget the cached base models and tokenizers (they are reloaded on next use)."""
    with _CACHE_LOCK:
        _RUNTIMES.clear()
        _TOKENIZERS.clear()
