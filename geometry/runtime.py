"""One model runtime: a base model, loaded once, run with any set of factored LoRA updates applied.

For a target module with base map ``W0`` (``(out, in)``, bias ``b``) and tasks ``t = 1..T``, each
carrying a LoRA update ``s_t B_t A_t`` (``B_t (out, r_t)``, ``A_t (r_t, in)``, scale ``s_t``) and a
coefficient ``c_t``, the runtime computes

    h = W0 x + b + sum_t c_t s_t B_t (A_t x)

with forward hooks on the base modules: ``B_t A_t`` is never formed and ``W0`` is never copied or
modified. For several tasks the factors of one module are concatenated once,
``A = [A_1; ...; A_T] (K, in)``, ``B = [B_1 ... B_T] (out, K)``, ``K = sum_t r_t``, and the update is
``B (w * (A x))`` with ``w = (c_1 s_1 1_{r_1}, ..., c_T s_T 1_{r_T})``: two thin matrix products per
module, ``O(K (m + n))`` memory. One task keeps its own tensors (no copy) and computes
``B (A x) * (c s)`` in peft's order (``lora_B(lora_A(x)) * scaling``), so a single adapter gives
peft's unmerged forward.

Module types (the update is always the linear map ``(out, in)``, as peft stores ``A`` / ``B``):

* ``nn.Linear``: ``x (.., in) -> (.., out)``;
* GPT-2 ``Conv1D`` (weight stored ``(in, out)``): the same formula on the layer's input, since peft's
  ``fan_in_fan_out`` only describes the storage of ``W0``;
* ``nn.Embedding`` (table ``(vocab, dim)``; peft's ``lora_embedding_A (r, vocab)``,
  ``lora_embedding_B (dim, r)``): ``h = E0[ids] + c s F.embedding(ids, A^T) B^T`` (times the layer's
  ``embed_scale`` when it has one, as peft does);
* fused projections split into parts (:attr:`geometry.types.LoraModule.rows`, ``A`` shared): the parts'
  ``B`` rows are put back into one ``(out, r)`` factor over the shared ``A``;
* dense updates ``D (out, in)`` (element-wise merges such as TIES): ``h += c x D^T`` (fallback; these
  cost ``O(m n)`` by nature).

peft's ``lora_dropout`` is the identity at evaluation. DoRA adapters (a magnitude vector that depends
on ``W0``) are refused with :class:`~geometry.errors.AtlasError`.

Coefficients ``c`` (:meth:`Runtime.apply`): ``None`` (all 1), a number, a tensor of shape ``(T,)``
(one per task) or ``(T, L)`` (one per task and block index ``layer``), a sequence of ``T`` per-task
values (numbers, 0-d tensors or ``(L,)`` tensors), or a callable ``(t, module name, layer) ->
scalar`` (an arbitrary scalar per update). Coefficients may require grad: they are then read at every
forward, so ``loss.backward()`` reaches them (base parameters have ``requires_grad = False``).

Heads (``Adapter.other_tensors``, ``base_model.model.classifier.modules_to_save.default.weight`` ...)
are swapped in by replacing the module's ``Parameter`` object with one holding the head tensor; the
base's own ``Parameter`` is put back on exit, untouched (only head-sized tensors are allocated).

    rt = Runtime.for_base("sentence-transformers/all-MiniLM-L6-v2", "SEQ_CLS", num_labels=2)
    with rt.apply([adapter_a, adapter_b], coefficients=torch.tensor([0.6, 0.4]), head=adapter_a.name):
        out = rt.run(["a sentence", "another"], output_hidden_states=True)
    out.logits, out.probs, out.hidden_states

Base models are cached per (resolved base, task type, number of labels, device): a second score never
reloads. One runtime serialises its users (a re-entrant lock held from :meth:`Runtime.apply` to the
exit of its context), so threads sharing the cached base cannot see each other's updates.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from geometry.base_models import quiet, resolve_base
from geometry.config import PEFT_PREFIX
from geometry.device import default_device
from geometry.errors import AdapterLoadError, AtlasError
from geometry.types import Adapter

Update = tuple[torch.Tensor, torch.Tensor, float] | torch.Tensor
Coefficients = None | float | torch.Tensor | Sequence[Any] | Callable[[int, str, int], Any]


# ---------------------------------------------------------------------------------------------- update sets
@dataclass
class LoraUpdates:
    """A set of weight updates: ``{peft module name: (B, A, scale) or dense (out, in)}``.

    ``(B, A, scale)`` stands for ``scale * B @ A`` (``B (out, r)``, ``A (r, in)``). ``head`` holds the
    classification head tensors (``classifier.weight`` ... with or without the ``base_model.model.``
    prefix). ``base`` is the base model name or path. ``layers`` optionally gives the block index of
    a module (for per-layer coefficients); missing names use the first all-digit path segment.
    """

    base: str
    updates: dict[str, Update]
    head: dict[str, torch.Tensor] = field(default_factory=dict)
    name: str = "updates"
    task_type: str = "SEQ_CLS"
    layers: dict[str, int] = field(default_factory=dict)

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


def _check_not_dora(adapter: Adapter) -> None:
    for mod in adapter.modules.values():
        if mod.magnitude is not None or adapter.config.use_dora:
            raise AtlasError(
                f"{adapter.name}: module {mod.name} is DoRA (magnitude vector m, "
                "W = m (W0 + s B A) / ||W0 + s B A||_col depends on W0 and is not a low-rank update): "
                "evaluate its peft folder instead")


def _head_tensors(adapter: Adapter) -> dict[str, torch.Tensor]:
    """An adapter's head / ``modules_to_save`` tensors; LoRA biases are refused (not a head)."""
    biases = [k for k in adapter.other_tensors if k.endswith(".lora_B.bias")]
    if biases:
        raise AtlasError(f"{adapter.name}: tensor {biases[0]} is a LoRA bias (lora_bias=True), which the "
                         "runtime does not apply (expected LoRA factors and head tensors only)")
    return dict(adapter.other_tensors)


def adapter_updates(adapter: Adapter) -> LoraUpdates:
    """An :class:`Adapter`'s factors and its other tensors (the head) as :class:`LoraUpdates`.

    Parts of a fused projection (``rows`` set) sharing one ``A`` are put back as one factored update:
    ``B`` gets the parts' rows (``(max stop, r)``, zero elsewhere) over the shared ``A``; parts with
    their own ``A`` (legacy peft) are placed block-wise, ``B = [B_1 0; 0 B_2]`` rows, ``A = [A_1; A_2]``.
    Nothing is multiplied out.
    """
    _check_not_dora(adapter)
    updates: dict[str, Update] = {}
    layers: dict[str, int] = {}
    fused: dict[str, list] = {}
    for mod in adapter.modules.values():
        layers.setdefault(mod.name, mod.key.layer if mod.key.layer >= 0 else _layer_of(mod.name))
        if mod.rows is None:
            updates[mod.name] = (mod.B, mod.A, mod.scale)
        else:
            fused.setdefault(mod.name, []).append(mod)
    for name, parts in fused.items():
        out = max(p.rows[1] for p in parts)
        groups: dict[int, list] = {}
        for p in parts:
            groups.setdefault(id(p.A), []).append(p)
        k = sum(int(g[0].A.shape[0]) for g in groups.values())
        B = parts[0].B.new_zeros((out, k))
        col = 0
        for g in groups.values():
            r = int(g[0].A.shape[0])
            for p in g:
                B[p.rows[0]:p.rows[1], col:col + r] = p.B
            col += r
        A = torch.cat([g[0].A for g in groups.values()], dim=0) if len(groups) > 1 else parts[0].A
        updates[name] = (B, A, parts[0].scale)
    base = adapter.config.base_model_name_or_path
    if not base:
        raise AdapterLoadError(f"{adapter.name}: adapter_config.json has no base_model_name_or_path")
    return LoraUpdates(base, updates, _head_tensors(adapter), name=adapter.name,
                       task_type=adapter.config.task_type or "SEQ_CLS", layers=layers)


def _is_merge(source: Any) -> bool:
    return hasattr(source, "updates") and hasattr(source, "heads") and callable(source.updates)


def merge_updates(source: Any, head: str | None) -> LoraUpdates:
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
    return LoraUpdates(str(base), dict(source.updates()), dict(chosen),
                       name=f"merge:{getattr(source, 'method', '')}", task_type=config.get("task_type") or "SEQ_CLS",
                       layers=_merge_layers(source))


def _merge_layers(source: Any) -> dict[str, int]:
    """Block index of each peft module of a merge, from its module keys (``MergedModule.key.layer``)."""
    return {m.name: m.key.layer for m in (getattr(source, "modules", None) or {}).values()
            if hasattr(m, "name") and hasattr(m, "key") and m.key.layer >= 0}


def as_updates(source: Any, head: str | None = None) -> LoraUpdates:
    """:class:`LoraUpdates` of an :class:`Adapter`, :class:`LoraUpdates` or merge (``head``: the merge's head)."""
    if isinstance(source, LoraUpdates):
        return source
    if isinstance(source, Adapter):
        return adapter_updates(source)
    if _is_merge(source):
        return merge_updates(source, head)
    raise AtlasError(f"cannot evaluate a {type(source).__name__}: expected a peft folder, Adapter, LoraUpdates "
                     "or merge")


_DIGITS = re.compile(r"^\d+$")


def _layer_of(name: str) -> int:
    """Block index of a module path: its first all-digit segment (``...layer.3.attention...`` -> 3), else -1."""
    for seg in name.removeprefix(PEFT_PREFIX).split("."):
        if _DIGITS.match(seg):
            return int(seg)
    return -1


@dataclass
class _Term:
    """One task's update of one module: factored ``scale * B @ A`` or ``dense``; ``B`` may be row parts."""

    name: str
    layer: int
    scale: float = 1.0
    A: torch.Tensor | None = None
    B: torch.Tensor | None = None
    parts: list[tuple[tuple[int, int], torch.Tensor]] | None = None
    dense: torch.Tensor | None = None


@dataclass
class _Task:
    """A source normalised: its terms, the heads it can provide (by name), base and task type."""

    name: str
    terms: list[_Term]
    heads: dict[str, dict[str, torch.Tensor]]
    base: str | None
    task_type: str | None


def _task(source: Any) -> _Task:
    if isinstance(source, (str, os.PathLike)):
        from geometry.loader import load_adapter

        source = load_adapter(source)
    if isinstance(source, Adapter):
        _check_not_dora(source)
        groups: dict[tuple[str, int], list] = {}
        for mod in source.modules.values():
            groups.setdefault((mod.name, id(mod.A)), []).append(mod)
        terms = []
        for (name, _), mods in groups.items():
            layer = next((m.key.layer for m in mods if m.key.layer >= 0), _layer_of(name))
            first = mods[0]
            if first.rows is None:
                terms.append(_Term(name, layer, first.scale, first.A, first.B))
            else:
                terms.append(_Term(name, layer, first.scale, first.A, parts=[(m.rows, m.B) for m in mods]))
        head = _head_tensors(source)
        return _Task(source.name, terms, {source.name: head} if head else {},
                     source.config.base_model_name_or_path, source.config.task_type)
    if isinstance(source, LoraUpdates) or _is_merge(source):
        if isinstance(source, LoraUpdates):
            updates, layers = source.updates, source.layers
            heads = {source.name: dict(source.head)} if source.head else {}
            name, base, task_type = source.name, source.base, source.task_type
        else:
            updates, layers = dict(source.updates()), _merge_layers(source)
            heads = {k: dict(v) for k, v in (source.heads or {}).items() if v}
            name, base = f"merge:{getattr(source, 'method', '')}", getattr(source, "base_model", None)
            task_type = (getattr(source, "config_raw", {}) or {}).get("task_type")
        terms = []
        for mod_name, update in updates.items():
            layer = layers.get(mod_name, _layer_of(mod_name))
            if isinstance(update, tuple):
                B, A, scale = update
                terms.append(_Term(mod_name, layer, float(scale), A, B))
            elif isinstance(update, torch.Tensor):
                terms.append(_Term(mod_name, layer, dense=update))
            else:
                raise AtlasError(f"update {mod_name!r}: expected (B, A, scale) or a dense (out, in) tensor, "
                                 f"got {type(update).__name__}")
        return _Task(name, terms, heads, base, task_type)
    raise AtlasError(f"cannot apply a {type(source).__name__}: expected an Adapter, LoraUpdates, a merge result "
                     "(updates() / heads / base_model) or an adapter folder")


def _tasks(sources: Any) -> list[_Task]:
    if isinstance(sources, (list, tuple)):
        return [_task(s) for s in sources]
    return [_task(sources)]


# ---------------------------------------------------------------------------------------------- module paths
def _module_path(name: str) -> str:
    """Peft module name -> path inside the plain transformers model."""
    name = name.removeprefix(PEFT_PREFIX)
    for suffix in (".base_layer", ".weight"):
        name = name.removesuffix(suffix)
    return name


def _head_key(key: str) -> str:
    """Stored key of a non-LoRA tensor -> parameter name of the plain model (peft's ``modules_to_save.default``,
    ``original_module`` and ``base_layer`` wrappers removed; embeddings saved with ``save_embedding_layers``
    are stored as ``<embedding>.base_layer.weight``)."""
    key = key.removeprefix(PEFT_PREFIX)
    for wrapper in (".modules_to_save.default.", ".original_module.", ".base_layer."):
        key = key.replace(wrapper, ".")
    return key


def _num_labels(head: Mapping[str, torch.Tensor]) -> int | None:
    for key, tensor in head.items():
        k = _head_key(key)
        if k.endswith(("classifier.weight", "score.weight", "classifier.out_proj.weight")):
            return int(tensor.shape[0])
    return None


def _is_conv1d(module: torch.nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


def _module_shape(module: torch.nn.Module) -> tuple[int, int]:
    """``(out, in)`` of the linear map the module computes (embeddings: ``(dim, vocab)``)."""
    if isinstance(module, torch.nn.Embedding):
        return int(module.embedding_dim), int(module.num_embeddings)
    weight = module.weight
    if _is_conv1d(module):
        return int(weight.shape[1]), int(weight.shape[0])
    return int(weight.shape[0]), int(weight.shape[1])


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
    """A fresh base model (not cached) of ``task_type`` from the folder ``resolve_base(base)`` gives.

    ``SEQ_CLS`` / ``TOKEN_CLS`` models get ``num_labels`` outputs (their head is initialised at random
    when the base has none). Unknown task types load as sequence classifiers (peft's default here).
    """
    import transformers

    path = resolve_base(base)
    task_type = _task_type(task_type)
    auto = getattr(transformers, _AUTO.get(task_type, "AutoModelForSequenceClassification"))
    kwargs = {"num_labels": num_labels} if num_labels and task_type not in ("CAUSAL_LM", "SEQ_2_SEQ_LM") else {}
    with quiet():
        return auto.from_pretrained(path, **kwargs)


def _base_model(base: str, task_type: str, num_labels: int | None) -> torch.nn.Module:
    """Old name of :func:`load_base`."""
    return load_base(base, task_type, num_labels)


_TOKENIZERS: dict[str, Any] = {}
_RUNTIMES: dict[tuple, Runtime] = {}
_CACHE_LOCK = threading.Lock()


def load_tokenizer(base: str) -> Any:
    """The tokenizer of ``resolve_base(base)``, loaded once per process."""
    path = resolve_base(base)
    with _CACHE_LOCK:
        if path not in _TOKENIZERS:
            from transformers import AutoTokenizer

            with quiet():
                _TOKENIZERS[path] = AutoTokenizer.from_pretrained(path)
        return _TOKENIZERS[path]


def clear_cache() -> None:
    """Forget the cached base models and tokenizers (they are reloaded on next use)."""
    with _CACHE_LOCK:
        _RUNTIMES.clear()
        _TOKENIZERS.clear()


# ---------------------------------------------------------------------------------------------- coefficients
def _coefficient(coefficients: Coefficients, t: int, n_tasks: int, name: str, layer: int) -> Any:
    """Coefficient of task ``t`` for module ``name`` (block ``layer``): a float, or a 0-arg callable giving
    a 0-d tensor at each forward when it requires grad."""
    if coefficients is None:
        return 1.0
    if callable(coefficients) and not isinstance(coefficients, torch.Tensor):
        value = coefficients(t, name, layer)
        if isinstance(value, torch.Tensor) and value.requires_grad:
            return lambda: coefficients(t, name, layer)
        return _as_float(value, f"coefficients({t}, {name!r}, {layer})")
    if isinstance(coefficients, (int, float)):
        return float(coefficients)
    if isinstance(coefficients, np.ndarray):
        coefficients = torch.as_tensor(coefficients)
    if isinstance(coefficients, torch.Tensor):
        c = coefficients
        if c.dim() == 0:
            return (lambda: c) if c.requires_grad else float(c)
        if c.shape[0] != n_tasks or c.dim() > 2:
            raise AtlasError(f"coefficients: tensor of shape {tuple(c.shape)}, expected (T,) or (T, L) with "
                             f"T = {n_tasks} tasks")
        if c.dim() == 1:
            return (lambda: c[t]) if c.requires_grad else float(c[t])
        _check_layer(layer, int(c.shape[1]), name)
        return (lambda: c[t, layer]) if c.requires_grad else float(c[t, layer])
    if isinstance(coefficients, Sequence) and not isinstance(coefficients, str):
        if len(coefficients) != n_tasks:
            raise AtlasError(f"coefficients: {len(coefficients)} values for {n_tasks} tasks "
                             "(expected one per task)")
        value = coefficients[t]
        if isinstance(value, torch.Tensor) and value.dim() == 1:
            _check_layer(layer, int(value.shape[0]), name)
            return (lambda: value[layer]) if value.requires_grad else float(value[layer])
        if isinstance(value, torch.Tensor) and value.dim() == 0:
            return (lambda: value) if value.requires_grad else float(value)
        return _as_float(value, f"coefficients[{t}]")
    raise AtlasError(f"coefficients: expected None, a number, a (T,) or (T, L) tensor, a sequence or a callable, "
                     f"got {type(coefficients).__name__}")


def _check_layer(layer: int, n_layers: int, name: str) -> None:
    if layer < 0:
        raise AtlasError(f"per-layer coefficients: module {name!r} is outside the numbered blocks (layer -1); "
                         "give coefficients as a callable (t, name, layer) -> value instead")
    if layer >= n_layers:
        raise AtlasError(f"per-layer coefficients: module {name!r} is in block {layer} but the coefficients "
                         f"cover {n_layers} layers")


def _as_float(value: Any, what: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise AtlasError(f"{what}: expected a number or a scalar tensor, got {value!r}") from None


def _prep(t: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``t`` in ``dtype`` on ``device``: the very same tensor object when nothing changes (no copy)."""
    t = t.to(dtype=dtype, device=device)
    return t.detach() if t.requires_grad else t


def _value(coef: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor | float:
    if callable(coef):
        v = coef()
        if not isinstance(v, torch.Tensor) or v.numel() != 1:
            raise AtlasError(f"a coefficient must be a scalar tensor, got {type(v).__name__} "
                             f"{tuple(getattr(v, 'shape', ()))}")
        return v.reshape(()).to(dtype=dtype, device=device)
    return coef


# ---------------------------------------------------------------------------------------------- the hook
class _ModuleDelta:
    """The forward hook of one module: ``output + sum_t c_t s_t B_t (A_t x) + sum_d c_d x D_d^T``.

    Factored terms are stored as ``A (K, in)``, ``B (out, K)`` and either a fixed weight (``float`` for
    one task, ``(K,)`` tensor otherwise) or per-task ``(coefficient, scale, rank)`` read at each forward.
    """

    def __init__(self, path: str, module: torch.nn.Module,
                 factored: list[tuple[torch.Tensor, torch.Tensor, float, Any]], dense: list[tuple[torch.Tensor, Any]],
                 dtype: torch.dtype, device: torch.device):
        self.path = path
        self.embedding = isinstance(module, torch.nn.Embedding)
        self.dtype, self.device = dtype, device
        self.padding_idx = getattr(module, "padding_idx", None) if self.embedding else None
        scale = getattr(module, "embed_scale", None) if self.embedding else None
        if isinstance(scale, torch.Tensor) and scale.numel() != 1:
            raise AtlasError(f"module {path!r}: embed_scale of shape {tuple(scale.shape)}, expected a scalar")
        self.embed_scale = scale
        self.dense = dense
        self.A = self.B = None
        self.fixed: float | torch.Tensor | None = None
        self.spec: list[tuple[Any, float, int]] = []
        self.ranks: torch.Tensor | None = None
        if not factored:
            return
        if len(factored) == 1:
            A, B, s, c = factored[0]
            self.A, self.B = A, B
        else:
            self.A = torch.cat([f[0] for f in factored], dim=0)
            self.B = torch.cat([f[1] for f in factored], dim=1)
        dynamic = any(callable(f[3]) for f in factored)
        if dynamic:
            self.spec = [(c, s, int(A.shape[0])) for A, _, s, c in factored]
            self.ranks = torch.tensor([k for _, _, k in self.spec], device=device)
        elif len(factored) == 1:
            self.fixed = factored[0][3] * factored[0][2]
        else:
            self.fixed = torch.cat([torch.full((int(A.shape[0]),), c * s, dtype=dtype, device=device)
                                    for A, _, s, c in factored])

    def tensors(self) -> list[torch.Tensor]:
        """Tensors this hook holds for the update (factors, weights, dense matrices)."""
        out = [t for t in (self.A, self.B, self.fixed, self.ranks) if isinstance(t, torch.Tensor)]
        return out + [d for d, _ in self.dense]

    def _weight(self) -> float | torch.Tensor:
        if not self.spec:
            return self.fixed
        values = [_value(c, self.dtype, self.device) * s for c, s, _ in self.spec]
        if len(values) == 1:
            return values[0]
        stacked = torch.stack([v if isinstance(v, torch.Tensor) else torch.tensor(v, dtype=self.dtype,
                                                                                  device=self.device)
                               for v in values])
        return stacked.repeat_interleave(self.ranks)

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        x = args[0] if args else next(iter(kwargs.values()))
        delta = None
        if self.A is not None:
            w = self._weight()
            if self.embedding:
                after_a = F.embedding(x, self.A.T, padding_idx=self.padding_idx)
                if isinstance(w, torch.Tensor) and w.dim() == 1:
                    delta = (after_a * w) @ self.B.T
                else:
                    delta = (after_a @ self.B.T) * w
            elif isinstance(w, torch.Tensor) and w.dim() == 1:
                delta = F.linear(F.linear(x.to(self.dtype), self.A) * w, self.B)
            else:
                delta = F.linear(F.linear(x.to(self.dtype), self.A), self.B) * w
        for D, c in self.dense:
            c = _value(c, self.dtype, self.device)
            if self.embedding:
                term = F.embedding(x, D.T, padding_idx=self.padding_idx) * c
            else:
                term = F.linear(x.to(self.dtype), D) * c
            delta = term if delta is None else delta + term
        if delta is None:
            return output
        if self.embed_scale is not None:
            delta = delta * (self.embed_scale.to(delta.dtype) if isinstance(self.embed_scale, torch.Tensor)
                             else self.embed_scale)
        return output + delta.to(output.dtype)


# ---------------------------------------------------------------------------------------------- outputs
@dataclass
class RuntimeOutput:
    """Logits (``None`` for a bare encoder), hidden states of every layer (embeddings first; encoder then
    decoder for seq2seq) when asked, the attention mask used, and the model's own output object."""

    logits: torch.Tensor | None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attention_mask: torch.Tensor | None = None
    raw: Any = None

    @property
    def probs(self) -> torch.Tensor | None:
        """``softmax(logits)`` over the last axis (classes, or the vocabulary for LMs)."""
        return None if self.logits is None else torch.softmax(self.logits, dim=-1)


def _hidden_states(out: Any) -> tuple[torch.Tensor, ...] | None:
    hs = getattr(out, "hidden_states", None)
    if hs is not None:
        return tuple(hs)
    enc, dec = getattr(out, "encoder_hidden_states", None), getattr(out, "decoder_hidden_states", None)
    if enc is None and dec is None:
        return None
    return tuple(enc or ()) + tuple(dec or ())


# ---------------------------------------------------------------------------------------------- the runtime
class Applied:
    """Updates (and a head) applied to a :class:`Runtime`'s model; :meth:`remove` (or leaving the
    ``with`` block) takes them off and puts the base's own head parameters back."""

    def __init__(self, runtime: Runtime, deltas: dict[str, _ModuleDelta], swaps: list[tuple], handles: list):
        self.runtime, self.deltas, self.swaps, self._handles = runtime, deltas, swaps, handles
        self.active = True

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor held for the updates (not the head): their total is ``O(sum_t r_t (m + n))``."""
        return [t for d in self.deltas.values() for t in d.tensors()]

    def head_tensors(self) -> list[torch.Tensor]:
        return [new for _, _, _, _, new in self.swaps]

    def numel(self) -> int:
        return sum(t.numel() for t in self.tensors())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def remove(self) -> None:
        if not self.active:
            return
        self.active = False
        try:
            for handle in self._handles:
                handle.remove()
            for module, slot, attr, original, _ in reversed(self.swaps):
                getattr(module, slot)[attr] = original
            self.runtime._active.remove(self)
        finally:
            self.runtime._lock.release()

    def __enter__(self) -> Applied:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


class Runtime:
    """A base model (evaluation mode, frozen) run with LoRA updates applied by forward hooks.

    ``Runtime(model, tokenizer)`` wraps a model you own (its parameters get ``requires_grad = False``);
    :meth:`for_base` gives the cached runtime of a named base. See the module docstring for the maths.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any = None, *, base: str | None = None,
                 task_type: str | None = None):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        first = next((p for p in model.parameters() if p.is_floating_point()), None)
        self.device = first.device if first is not None else torch.device("cpu")
        self.dtype = first.dtype if first is not None else torch.float32
        self.base, self.task_type = base, task_type
        self._tokenizer = tokenizer
        self._lock = threading.RLock()
        self._active: list[Applied] = []

    # ----------------------------------------------------------------------------------- construction
    @classmethod
    def for_base(cls, base: str, task_type: str | None = "SEQ_CLS", num_labels: int | None = None,
                 device: torch.device | str | None = None) -> Runtime:
        """The cached runtime of ``base`` (resolved by :func:`resolve_base`) for this task type, number
        of labels and device, loaded on first use by :func:`load_base`."""
        device = torch.device(device) if device is not None else default_device()
        path = resolve_base(base)
        task_type = _task_type(task_type)
        labels = num_labels if task_type not in ("CAUSAL_LM", "SEQ_2_SEQ_LM") else None
        key = (path, task_type, labels, str(device))
        with _CACHE_LOCK:
            runtime = _RUNTIMES.get(key)
        if runtime is None:
            model = load_base(base, task_type, num_labels).to(device)
            runtime = cls(model, base=base, task_type=task_type)
            with _CACHE_LOCK:
                runtime = _RUNTIMES.setdefault(key, runtime)
        return runtime

    @classmethod
    def for_sources(cls, sources: Any, head: Any = None, device: torch.device | str | None = None,
                    base: str | None = None) -> Runtime:
        """The cached runtime that ``sources`` (one or a list) need: their base model (or ``base``), task
        type, and the number of labels of the head :meth:`apply` would pick with ``head``."""
        tasks = _tasks(sources)
        bases = {resolve_base(t.base) for t in tasks if t.base}
        if base is None:
            if len(bases) > 1:
                raise AtlasError(f"the sources are on different base models ({', '.join(sorted(bases))})")
            if not bases:
                raise AtlasError("no source names its base model: pass base=")
            base = next(t.base for t in tasks if t.base)
        task_type = next((t.task_type for t in tasks if t.task_type), None)
        return cls.for_base(base, task_type, _num_labels(_choose_head(tasks, head)), device)

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            if self.base is None:
                raise AtlasError("this runtime wraps a model without a tokenizer: pass Runtime(model, tokenizer)")
            self._tokenizer = load_tokenizer(self.base)
        return self._tokenizer

    # ----------------------------------------------------------------------------------- updates
    def apply(self, sources: Any = (), coefficients: Coefficients = None, head: Any = None, *,
              stack: bool = False) -> Applied:
        """Apply ``sources`` (one or a list of :class:`Adapter`, :class:`LoraUpdates`, merges, adapter
        folders) with ``coefficients`` (see the module docstring) and swap in a head; use as a context
        manager (or call :meth:`Applied.remove`).

        ``head``: ``None`` picks the one head the sources carry (an error when they carry several);
        a name picks that adapter's (or merge task's) head; a mapping of tensors is used as given;
        ``False`` keeps the base's head. Other threads wait until this application is removed; in the
        same thread a second :meth:`apply` before removing the first is an error unless ``stack=True``
        (the updates then add up: ``h = W0 x + first + second``).
        """
        tasks = _tasks(sources)
        head_tensors = _choose_head(tasks, head)
        self._lock.acquire()
        try:
            if self._active and not stack:
                raise AtlasError(f"updates are already applied to this runtime ({len(self._active)} active "
                                 "application(s)): leave that `with runtime.apply(...)` block first, or pass "
                                 "stack=True to add these updates on top")
            deltas = self._build(tasks, coefficients)
            swaps = self._swaps(head_tensors)
        except BaseException:
            self._lock.release()
            raise
        handles = []
        for path, delta in deltas.items():
            handles.append(self.model.get_submodule(path).register_forward_hook(delta, with_kwargs=True))
        for module, slot, attr, _, new in swaps:
            getattr(module, slot)[attr] = new
        applied = Applied(self, deltas, swaps, handles)
        self._active.append(applied)
        return applied

    def _build(self, tasks: list[_Task], coefficients: Coefficients) -> dict[str, _ModuleDelta]:
        per_module: dict[str, tuple[list, list]] = {}
        for t, task in enumerate(tasks):
            for term in task.terms:
                path = _module_path(term.name)
                module = self._module(term.name, path)
                dtype = module.weight.dtype if module.weight.is_floating_point() else self.dtype
                device = module.weight.device
                out, inp = _module_shape(module)
                coef = _coefficient(coefficients, t, len(tasks), term.name, term.layer)
                factored, dense = per_module.setdefault(path, ([], []))
                where = (f"update {term.name!r} ({task.name}) on module {path!r} "
                         f"({type(module).__name__}, (out, in) = {(out, inp)})")
                if term.dense is not None:
                    if tuple(term.dense.shape) != (out, inp):
                        raise AtlasError(f"{where}: dense update of shape {tuple(term.dense.shape)}, "
                                         f"expected (out, in) = {(out, inp)}")
                    dense.append((_prep(term.dense, dtype, device), coef))
                    continue
                A = _prep(term.A, dtype, device)
                if A.dim() != 2 or A.shape[1] != inp:
                    raise AtlasError(f"{where}: A has shape {tuple(A.shape)}, expected (r, {inp})")
                if term.parts is not None:
                    B = torch.zeros(out, A.shape[0], dtype=dtype, device=device)
                    for (lo, hi), part in term.parts:
                        if hi > out or tuple(part.shape) != (hi - lo, A.shape[0]):
                            raise AtlasError(f"{where}: B part for rows {lo}:{hi} has shape {tuple(part.shape)}, "
                                             f"expected ({hi - lo}, {A.shape[0]}) within {out} rows")
                        B[lo:hi] = _prep(part, dtype, device)
                else:
                    B = _prep(term.B, dtype, device)
                if tuple(B.shape) != (out, A.shape[0]):
                    raise AtlasError(f"{where}: B has shape {tuple(B.shape)}, expected ({out}, {A.shape[0]}) "
                                     f"(out, r) with r = A.shape[0]")
                factored.append((A, B, float(term.scale), coef))
        deltas = {}
        for path, (factored, dense) in per_module.items():
            module = self.model.get_submodule(path)
            dtype = module.weight.dtype if module.weight.is_floating_point() else self.dtype
            deltas[path] = _ModuleDelta(path, module, factored, dense, dtype, module.weight.device)
        return deltas

    def _module(self, name: str, path: str) -> torch.nn.Module:
        try:
            module = self.model.get_submodule(path)
        except AttributeError:
            raise AtlasError(f"update {name!r}: the model has no module {path!r}") from None
        if not (isinstance(module, (torch.nn.Linear, torch.nn.Embedding)) or _is_conv1d(module)):
            raise AtlasError(f"update {name!r}: module {path!r} is a {type(module).__name__}; the runtime applies "
                             "LoRA to nn.Linear, GPT-2 Conv1D and nn.Embedding modules")
        return module

    def _swaps(self, head: Mapping[str, torch.Tensor] | None) -> list[tuple]:
        """``(module, slot, attr, original, new)`` for each head tensor (``slot``: ``_parameters`` / ``_buffers``)."""
        if not head:
            return []
        chosen: dict[str, tuple[str, torch.Tensor]] = {}
        for key in sorted(head, key=lambda k: ".original_module." not in k):  # modules_to_save copies win
            chosen[_head_key(key)] = (key, head[key])
        swaps = []
        for target, (key, tensor) in chosen.items():
            path, _, attr = target.rpartition(".")
            try:
                module = self.model.get_submodule(path)
            except AttributeError:
                module = None
            slots = ("_parameters", "_buffers") if module is not None else ()
            slot = next((s for s in slots if attr in getattr(module, s)), None)
            if slot is None or getattr(module, slot)[attr] is None:
                raise AtlasError(f"head tensor {key!r}: the model has no parameter {target!r}")
            original = getattr(module, slot)[attr]
            if tuple(original.shape) != tuple(tensor.shape):
                raise AtlasError(f"head tensor {key!r}: shape {tuple(tensor.shape)}, the model expects "
                                 f"{tuple(original.shape)} for {target!r} (build the runtime with the head's "
                                 "num_labels)")
            value = tensor.detach().to(dtype=original.dtype, device=original.device)
            new = torch.nn.Parameter(value, requires_grad=False) if slot == "_parameters" else value
            swaps.append((module, slot, attr, original, new))
        return swaps

    # ----------------------------------------------------------------------------------- running
    def forward(self, output_hidden_states: bool = False, **inputs: Any) -> RuntimeOutput:
        """One forward of the model on ``inputs`` (tensors moved to the runtime's device), with whatever
        updates are applied; gradients flow to coefficients that require them."""
        inputs = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        out = self.model(**inputs, output_hidden_states=output_hidden_states)
        return RuntimeOutput(getattr(out, "logits", None), _hidden_states(out) if output_hidden_states else None,
                             inputs.get("attention_mask"), out)

    __call__ = forward

    def encode(self, texts: Sequence[str], pairs: Sequence[str] | None = None, max_length: int = 128) -> dict:
        """Tokenise ``texts`` (and ``pairs``) padded to the longest, truncated to ``max_length``."""
        enc = self.tokenizer(list(texts), list(pairs) if pairs is not None else None, padding=True,
                             truncation=True, max_length=max_length, return_tensors="pt")
        return dict(enc)

    def run(self, texts: Sequence[str], pairs: Sequence[str] | None = None, *, batch_size: int = 64,
            max_length: int = 128, output_hidden_states: bool = False, grad: bool = False) -> RuntimeOutput:
        """Forward ``texts`` in batches of ``batch_size`` (all padded to one length, so that logits and
        hidden states of the batches concatenate in input order)."""
        enc = self.encode(texts, pairs, max_length)
        n = len(texts)
        logits, hidden = [], []
        with torch.set_grad_enabled(grad):
            for start in range(0, n, batch_size):
                batch = {k: v[start:start + batch_size] for k, v in enc.items()}
                out = self.forward(output_hidden_states=output_hidden_states, **batch)
                if out.logits is not None:
                    logits.append(out.logits)
                if out.hidden_states is not None:
                    hidden.append(out.hidden_states)
        cat_logits = torch.cat(logits) if logits else None
        cat_hidden = tuple(torch.cat(layer) for layer in zip(*hidden)) if hidden else None
        mask = enc.get("attention_mask")
        return RuntimeOutput(cat_logits, cat_hidden, mask.to(self.device) if mask is not None else None)

    def predict(self, data: Any, batch_size: int = 64, max_length: int = 128) -> np.ndarray:
        """Argmax class of each example of a classification split (see :func:`predict`)."""
        return predict(self.model, self.tokenizer, data, batch_size=batch_size, max_length=max_length)

    def generate(self, prompts: Sequence[str], batch_size: int = 16, max_new_tokens: int = 32) -> list[str]:
        """Greedy continuations of ``prompts`` (see :func:`generate`)."""
        return generate(self.model, self.tokenizer, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens)


def _choose_head(tasks: list[_Task], head: Any) -> dict[str, torch.Tensor]:
    if head is False:
        return {}
    if isinstance(head, Mapping):
        return dict(head)
    named: dict[str, dict[str, torch.Tensor]] = {}
    for task in tasks:
        for name, tensors in task.heads.items():
            named.setdefault(name, tensors)
    if head is None:
        if len(named) > 1:
            raise AtlasError(f"the sources carry {len(named)} heads ({', '.join(named)}): pass head=NAME "
                             "(or head=False to keep the base's head)")
        return next(iter(named.values()), {})
    if head not in named:
        raise AtlasError(f"no head named {head!r} in the sources (heads: {', '.join(named) or 'none'})")
    return named[head]


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
    (``W <- W0 + scale * B @ A``, ``B (out, r)``, ``A (r, in)``) or a dense ``(out, in)`` matrix.
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
        if isinstance(update, tuple):
            B, A, scale = update
            delta = float(scale) * (B.to(torch.float64) @ A.to(torch.float64))
        else:
            delta = update.to(torch.float64)
        transposed = _is_conv1d(module) or isinstance(module, torch.nn.Embedding)
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
