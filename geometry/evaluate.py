"""Score an adapter, or any merged set of LoRA updates, on a task split.

Classification (``text`` [+ ``text_pair``] + ``label``): accuracy and macro F1 of the argmax of
the model's logits. Generation (``prompt`` + ``reference``, causal LMs): ROUGE-L F1 of greedy
generations against the references (:func:`rouge_l`, LCS-based, implemented here).

What can be scored (``source`` of :func:`evaluate`):

* a peft adapter folder: loaded with ``PeftModel.from_pretrained`` on its base model, resolved by
  :func:`geometry.base_models.resolve_base` (the reference path, exactly what peft users run);
* an :class:`~geometry.types.Adapter`: its factors and head written into a fresh base model;
* :class:`LoraUpdates`, or a merge result with ``updates()`` / ``heads`` / ``base_model`` (see
  :mod:`geometry.merging`): updates per peft module name, each a factored ``(B, A, scale)`` or a
  dense ``(out, in)`` matrix, applied as ``W <- W0 + scale * B @ A`` by :func:`apply_updates`,
  plus one task's classification head;
* a ready ``torch.nn.Module`` (with ``tokenizer=``).

Results are cached on disk by content hash (adapter bytes, task file bytes, split, limit).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from geometry.base_models import quiet, resolve_base
from geometry.device import default_device
from geometry.errors import AdapterLoadError, AtlasError
from geometry.tasks import TaskData, load_task, task_file
from geometry.types import Adapter

PEFT_PREFIX = "base_model.model."
#: Bump when the scoring changes, so that cached results are recomputed.
EVAL_VERSION = "1"
Update = tuple[torch.Tensor, torch.Tensor, float] | torch.Tensor


@dataclass
class LoraUpdates:
    """A set of weight updates to score: ``{peft module name: (B, A, scale) or dense (out, in)}``.

    ``head`` holds the classification head tensors (``classifier.weight`` ... with or without the
    ``base_model.model.`` prefix). ``base`` is the base model name or path.
    """

    base: str
    updates: dict[str, Update]
    head: dict[str, torch.Tensor] = field(default_factory=dict)
    name: str = "updates"
    task_type: str = "SEQ_CLS"

    def content_hash(self) -> str:
        h = hashlib.sha256(f"{self.base}|{self.task_type}".encode())
        for key in sorted(self.updates):
            h.update(key.encode())
            for t in _as_tuple(self.updates[key]):
                h.update(_tensor_bytes(t))
        for key in sorted(self.head):
            h.update(key.encode() + _tensor_bytes(self.head[key]))
        return h.hexdigest()


def _as_tuple(update: Update) -> tuple:
    return update if isinstance(update, tuple) else (update,)


def _tensor_bytes(t: Any) -> bytes:
    if isinstance(t, torch.Tensor):
        return t.detach().to("cpu", torch.float64).contiguous().numpy().tobytes() + str(tuple(t.shape)).encode()
    return repr(float(t)).encode()


# ---------------------------------------------------------------------------------------------- model building
def _module_path(name: str) -> str:
    """Peft module name -> path inside the plain transformers model."""
    name = name.removeprefix(PEFT_PREFIX)
    for suffix in (".base_layer", ".weight"):
        name = name.removesuffix(suffix)
    return name


def _head_key(key: str) -> str:
    key = key.removeprefix(PEFT_PREFIX)
    return key.replace(".modules_to_save.default.", ".").replace(".original_module.", ".")


def apply_updates(
    model: torch.nn.Module, updates: Mapping[str, Update], heads: Mapping[str, torch.Tensor] | None = None
) -> torch.nn.Module:
    """Add each update to its module's weight in place and load the head tensors; return ``model``.

    ``updates[name]`` is ``(B, A, scale)`` (``W <- W0 + scale * B @ A``, ``B (out, r)``, ``A (r, in)``)
    or a dense ``(out, in)`` matrix. ``name`` is the peft module path (``base_model.model.`` prefix
    optional). GPT-2 ``Conv1D`` and embedding weights are stored transposed (``(in, out)``; embedding
    tables ``(vocab, dim)`` for an update ``(dim, vocab)``), so their update is added transposed —
    peft's ``fan_in_fan_out`` flag only describes that storage, the update is always ``(out, in)``.
    BERT-style models use ``nn.Linear`` throughout, where no transpose happens.
    """
    modules = dict(model.named_modules())
    for name, update in updates.items():
        path = _module_path(name)
        module = modules.get(path)
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise AtlasError(f"update {name!r}: the model has no module {path!r} with a weight")
        if isinstance(update, tuple):
            B, A, scale = update
            delta = float(scale) * (B.to(torch.float64) @ A.to(torch.float64))
        else:
            delta = update.to(torch.float64)
        transposed = type(module).__name__ == "Conv1D" or isinstance(module, torch.nn.Embedding)
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
            raise AtlasError(f"head tensor {key!r}: shape {tuple(tensor.shape)}, the model expects {tuple(state[k].shape)}")
        new[k] = tensor.to(state[k].dtype)
    model.load_state_dict(new, strict=False)


def _num_labels(head: Mapping[str, torch.Tensor]) -> int | None:
    for key, tensor in head.items():
        k = _head_key(key)
        if k.endswith(("classifier.weight", "score.weight", "classifier.out_proj.weight")):
            return int(tensor.shape[0])
    return None


def _base_model(base: str, task_type: str, num_labels: int | None) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    path = resolve_base(base)
    with quiet():
        if task_type == "CAUSAL_LM":
            return AutoModelForCausalLM.from_pretrained(path)
        kwargs = {"num_labels": num_labels} if num_labels else {}
        return AutoModelForSequenceClassification.from_pretrained(path, **kwargs)


def build_classifier(
    base: str, updates: Mapping[str, Update], head: Mapping[str, torch.Tensor], task_type: str = "SEQ_CLS"
) -> torch.nn.Module:
    """A fresh base model with ``updates`` applied and ``head`` loaded (evaluation mode)."""
    model = _base_model(base, task_type, _num_labels(head))
    return apply_updates(model, updates, head).eval()


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
    """``PeftModel.from_pretrained`` on the resolved base model; returns ``(model, base path)``."""
    from peft import PeftModel

    folder = Path(folder)
    config = _read_config(folder)
    base_name = base or config.get("base_model_name_or_path")
    if not base_name:
        raise AdapterLoadError(f"{folder / 'adapter_config.json'}: no base_model_name_or_path (pass base=)")
    task_type = config.get("task_type") or "SEQ_CLS"
    model = _base_model(base_name, task_type, _num_labels(_folder_head_shapes(folder)))
    with quiet():
        model = PeftModel.from_pretrained(model, str(folder))
    return model.eval(), resolve_base(base_name)


def _merged_parts(source: Any, head: str | None) -> LoraUpdates:
    """A merge result (``updates()``, ``heads``, ``base_model``) as :class:`LoraUpdates` with one head."""
    heads: dict[str, dict[str, torch.Tensor]] = dict(getattr(source, "heads", {}) or {})
    if head is None and len(heads) > 1:
        raise AtlasError(f"the merge carries {len(heads)} heads ({', '.join(heads)}): pass head=NAME")
    if head is not None and head not in heads:
        raise AtlasError(f"no head named {head!r} in the merge (heads: {', '.join(heads) or 'none'})")
    chosen = heads[head] if head is not None else next(iter(heads.values()), {})
    base = getattr(source, "base_model", None)
    if not base:
        raise AtlasError("the merge records no base_model: build LoraUpdates(base=..., ...) instead")
    config = getattr(source, "config_raw", {}) or {}
    return LoraUpdates(str(base), dict(source.updates()), dict(chosen), name=f"merge:{getattr(source, 'method', '')}",
                       task_type=config.get("task_type") or "SEQ_CLS")


def adapter_updates(adapter: Adapter) -> LoraUpdates:
    """An :class:`Adapter`'s factors (fused parts put back by rows) and its other tensors as updates."""
    updates: dict[str, Update] = {}
    fused: dict[str, list] = {}
    for mod in adapter.modules.values():
        if mod.magnitude is not None:
            raise AtlasError(f"{adapter.name}: {mod.name} is DoRA; evaluate its peft folder instead")
        if mod.rows is None:
            updates[mod.name] = (mod.B, mod.A, mod.scale)
        else:
            fused.setdefault(mod.name, []).append(mod)
    for name, parts in fused.items():  # parts of a fused projection: rows of one dense update
        dense = torch.zeros(max(p.rows[1] for p in parts), int(parts[0].A.shape[1]), dtype=torch.float64)
        for p in parts:
            dense[p.rows[0]:p.rows[1]] += p.dense()
        updates[name] = dense
    base = adapter.config.base_model_name_or_path
    if not base:
        raise AdapterLoadError(f"{adapter.name}: adapter_config.json has no base_model_name_or_path")
    return LoraUpdates(base, updates, dict(adapter.other_tensors), name=adapter.name,
                       task_type=adapter.config.task_type or "SEQ_CLS")


def load_classifier(
    source: Any, *, head: str | None = None, base: str | None = None, device: torch.device | str | None = None
) -> tuple[torch.nn.Module, Any]:
    """``(model, tokenizer)`` for a peft folder, an :class:`Adapter`, :class:`LoraUpdates` or a merge."""
    from transformers import AutoTokenizer

    if isinstance(source, (str, os.PathLike)):
        model, base_path = load_peft_folder(source, base=base)
    else:
        updates = _as_updates(source, head)
        if base:
            updates.base = base
        model = build_classifier(updates.base, updates.updates, updates.head, updates.task_type)
        base_path = resolve_base(updates.base)
    with quiet():
        tokenizer = AutoTokenizer.from_pretrained(base_path)
    return model.to(device or default_device()), tokenizer


def _as_updates(source: Any, head: str | None) -> LoraUpdates:
    if isinstance(source, LoraUpdates):
        return source
    if isinstance(source, Adapter):
        return adapter_updates(source)
    if hasattr(source, "updates") and hasattr(source, "heads"):
        return _merged_parts(source, head)
    raise AtlasError(f"cannot evaluate a {type(source).__name__}: expected a peft folder, Adapter, LoraUpdates or merge")


# ---------------------------------------------------------------------------------------------- scoring
def classification_scores(preds: Sequence[int], labels: Sequence[int]) -> dict[str, float]:
    """Accuracy and macro F1 (mean over the classes present in labels or predictions, as scikit-learn).

    Per class ``c``: ``F1_c = 2 TP / (2 TP + FP + FN)``.
    """
    p, y = np.asarray(preds), np.asarray(labels)
    if len(p) == 0:
        return {"accuracy": float("nan"), "macro_f1": float("nan")}
    f1s = []
    for c in np.union1d(p, y):
        tp = int(np.sum((p == c) & (y == c)))
        denom = 2 * tp + int(np.sum((p == c) & (y != c))) + int(np.sum((p != c) & (y == c)))
        f1s.append(2 * tp / denom if denom else 0.0)
    return {"accuracy": float(np.mean(p == y)), "macro_f1": float(np.mean(f1s))}


_TOKEN_RE = re.compile(r"[a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    """Lower-cased alphanumeric tokens (the tokenisation of the reference ROUGE scorer, no stemming)."""
    return _TOKEN_RE.findall(text.lower())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, O(len(a) len(b)) time, O(len(b)) memory)."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 (Lin, 2004): ``P = LCS / |cand|``, ``R = LCS / |ref|``, ``F = 2 P R / (P + R)``."""
    c, r = rouge_tokens(candidate), rouge_tokens(reference)
    lcs = lcs_length(c, r)
    if lcs == 0:
        return 0.0
    p, rec = lcs / len(c), lcs / len(r)
    return 2 * p * rec / (p + rec)


@torch.no_grad()
def predict(model: torch.nn.Module, tokenizer: Any, data: TaskData, batch_size: int = 64,
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


@torch.no_grad()
def generate(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], batch_size: int = 16,
             max_new_tokens: int = 32, device: torch.device | str | None = None) -> list[str]:
    """Greedy continuations of ``prompts`` (left padding, new tokens only, special tokens skipped)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval()
    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        enc = tokenizer(list(prompts[start:start + batch_size]), padding=True, return_tensors="pt")
        enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        with quiet():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
        out.extend(tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    return out


def score_model(model: torch.nn.Module, tokenizer: Any, data: TaskData, batch_size: int = 64,
                max_new_tokens: int = 32) -> dict[str, Any]:
    """Metrics of a built model on one split (no caching)."""
    if data.kind == "generation":
        outputs = generate(model, tokenizer, data.texts, batch_size=batch_size, max_new_tokens=max_new_tokens)
        scores = [rouge_l(o, r) for o, r in zip(outputs, data.references or [], strict=True)]
        return {"rouge_l": float(np.mean(scores)), "n": len(data)}
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


def _cached(key_parts: list[Any], compute: Any) -> Any:
    try:
        from geometry.diskcache import cached
    except ImportError:
        return compute()
    return cached("evaluate", key_parts, compute)


def evaluate(
    source: Any,
    task: str | os.PathLike[str] | TaskData,
    split: str = "test",
    batch_size: int = 64,
    *,
    limit: int | None = None,
    head: str | None = None,
    tokenizer: Any = None,
    max_new_tokens: int = 32,
    device: torch.device | str | None = None,
    use_cache: bool = True,
) -> dict[str, Any]:
    """Score ``source`` on ``split`` of ``task`` (a folder, a ``.jsonl`` file, or :class:`TaskData`).

    Returns ``{"accuracy", "macro_f1", "n", "task", "split"}`` for classification, or
    ``{"rouge_l", "n", "task", "split"}`` for generation. ``limit`` scores the first ``limit`` examples.
    ``head`` picks one task's head of a merge. Cached on disk unless ``use_cache`` is false or the
    source is a bare model.
    """
    data = task if isinstance(task, TaskData) else load_task(task, split)
    data = data.head(limit)
    key = source_hash(source, head)
    if key is not None and use_cache and not isinstance(task, TaskData):
        file_hash = hashlib.sha256(task_file(task, split).read_bytes()).hexdigest()
        parts = [EVAL_VERSION, key, file_hash, split, limit, max_new_tokens]
        result = _cached(parts, lambda: _evaluate(source, data, batch_size, head, tokenizer, max_new_tokens, device))
    else:
        result = _evaluate(source, data, batch_size, head, tokenizer, max_new_tokens, device)
    return {**result, "task": data.name, "split": data.split}


def _evaluate(source: Any, data: TaskData, batch_size: int, head: str | None, tokenizer: Any,
              max_new_tokens: int, device: Any) -> dict[str, Any]:
    if isinstance(source, torch.nn.Module):
        if tokenizer is None:
            raise AtlasError("evaluating a bare model needs tokenizer=")
        model = source.to(device or default_device())
    else:
        model, auto_tokenizer = load_classifier(source, head=head, device=device)
        tokenizer = tokenizer or auto_tokenizer
    return score_model(model, tokenizer, data, batch_size=batch_size, max_new_tokens=max_new_tokens)
