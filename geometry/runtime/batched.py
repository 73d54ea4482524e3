"""Batched helpers on a plain model: argmax predictions, greedy generation, and dense writing of updates
into a copy of a model (the reference the runtime is tested against)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from geometry.errors import AtlasError
from geometry.runtime.base_models import quiet
from geometry.runtime.bases import load_base
from geometry.runtime.modules import _head_key, _is_conv1d, _module_path, _num_labels
from geometry.runtime.updates import Update


# ---------------------------------------------------------------------------------------------- batched helpers
@torch.no_grad()
def predict(model: torch.nn.Module, tokenizer: Any, data: Any, batch_size: int = 64,
            max_length: int = 128, device: torch.device | str | None = None) -> np.ndarray:
    """Argmax predictions for a classification split, batched (examples sorted by length, order restored)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval()
    order = np.argsort([-(len(t) + len(data.text_pairs[i]) if data.text_pairs else -len(t))
                        for i, t in enumerate(data.texts)], kind="stable")
    preds = np.empty(len(data), dtype=np.int64)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        texts = [data.texts[i] for i in idx]
        pairs = [data.text_pairs[i] for i in idx] if data.text_pairs is not None else None
        enc = tokenizer(texts, pairs, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        logits = model(**{k: v.to(device) for k, v in enc.items()}).logits
        preds[idx] = logits.argmax(-1).cpu().numpy()
    return preds


@contextlib.contextmanager
def tokenizer_padding(tokenizer: Any, side: str) -> Iterator[None]:
    before = tokenizer.padding_side
    tokenizer.padding_side = side
    try:
        yield
    finally:
        tokenizer.padding_side = before


@torch.no_grad()
def generate(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], batch_size: int = 16,
             max_new_tokens: int = 32, device: torch.device | str | None = None) -> list[str]:
    """Greedy continuations of ``prompts`` (left padding, new tokens only, special tokens skipped).

    The tokenizer's ``padding_side`` is restored afterwards (tokenizers are shared by the runtime cache).
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[str] = []
    with tokenizer_padding(tokenizer, "left"):
        for start in range(0, len(prompts), batch_size):
            enc = tokenizer(list(prompts[start:start + batch_size]), padding=True, return_tensors="pt")
            enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            with quiet():
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
            out.extend(tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    return out


# ---------------------------------------------------------------------------------------------- dense writing
def apply_updates(
    model: torch.nn.Module, updates: Mapping[str, Update], heads: Mapping[str, torch.Tensor] | None = None
) -> torch.nn.Module:
    """Write each update into its module's weight in place and load the head tensors; return ``model``.

    This is the *dense* path, for a standalone model you own (export, peft-free use); scoring uses
    :class:`Runtime`, which never forms ``B @ A``. ``updates[name]`` is ``(B, A, scale)``
    (``W <- W0 + scale * B @ A``, ``B (out, r)``, ``A (r, in)``), ``(B, A, scale, magnitude)`` for DoRA
    (``W <- mag * (W0 + scale * B @ A) / ||W0 + scale * B @ A||_row``, peft's merged DoRA weight) or a dense
    ``(out, in)`` matrix.
    ``name`` is the peft module path (``base_model.model.`` prefix optional). GPT-2 ``Conv1D`` and
    embedding weights are stored transposed (``(in, out)``; embedding tables ``(vocab, dim)`` for an
    update ``(dim, vocab)``), so their update is added transposed.
    """
    for name, update in updates.items():
        path = _module_path(name)
        try:
            module = model.get_submodule(path)
        except AttributeError:
            module = None
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise AtlasError(f"update {name!r}: the model has no module {path!r} with a weight")
        transposed = _is_conv1d(module) or isinstance(module, torch.nn.Embedding)
        if isinstance(update, tuple):
            B, A, scale = update[:3]
            delta = float(scale) * (B.to(torch.float64) @ A.to(torch.float64))
            if len(update) == 4:  # DoRA: the exact update from this module's W0
                W0 = (weight.T if transposed else weight).detach().to(torch.float64)
                if tuple(W0.shape) == tuple(delta.shape):
                    V = W0 + delta.to(W0.device)
                    g = update[3].detach().to(W0.device, torch.float64).reshape(-1) / torch.linalg.norm(V, dim=1)
                    delta = g[:, None] * V - W0
        else:
            delta = update.to(torch.float64)
        if transposed:
            delta = delta.T
        if tuple(delta.shape) != tuple(weight.shape):
            stored = "(in, out)" if transposed else "(out, in)"
            raise AtlasError(
                f"update {name!r}: shape {tuple(delta.shape)} does not match the weight {tuple(weight.shape)} "
                f"of {path!r} (stored {stored})"
            )
        with torch.no_grad():
            weight.add_(delta.to(weight.dtype, copy=False).to(weight.device))
    if heads:
        _load_head(model, heads)
    return model


def _load_head(model: torch.nn.Module, heads: Mapping[str, torch.Tensor]) -> None:
    state = model.state_dict()
    new: dict[str, torch.Tensor] = {}
    for key, tensor in heads.items():
        k = _head_key(key)
        if k not in state:
            raise AtlasError(f"head tensor {key!r}: the model has no parameter {k!r}")
        if tuple(state[k].shape) != tuple(tensor.shape):
            raise AtlasError(f"head tensor {key!r}: shape {tuple(tensor.shape)}, the model expects "
                             f"{tuple(state[k].shape)}")
        new[k] = tensor.to(state[k].dtype)
    model.load_state_dict(new, strict=False)


def build_classifier(
    base: str, updates: Mapping[str, Update], head: Mapping[str, torch.Tensor], task_type: str = "SEQ_CLS"
) -> torch.nn.Module:
    """A fresh base model with ``updates`` written into its weights and ``head`` loaded (evaluation mode).

    The dense path (:func:`apply_updates`), for a model you keep; scoring uses :class:`Runtime`.
    """
    model = load_base(base, task_type, _num_labels(head))
    return apply_updates(model, updates, head).eval()
