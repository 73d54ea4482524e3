"""The runtime: a base model, loaded once, run with any set of factored LoRA updates applied.

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

peft's ``lora_dropout`` is the identity at evaluation. DoRA modules (a magnitude vector ``mag``) are applied
exactly, as peft's forward computes them: with ``g = mag / ||W0 + s B A||_row`` (one norm per output row,
computed once from the module's own ``W0`` when the update is applied, in float64), the module adds
``c ((g - 1) * (W0 x) + g * s B (A x))``, ``W0 x`` being the base output without its bias; ``B`` is
replaced by ``diag(g) B`` (still two thin products). DoRA on an embedding is refused (resolve it first
with :func:`geometry.linalg.dora.resolve_dora`, which the runtime then applies as a plain factored update).

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

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from geometry.device import default_device
from geometry.errors import AtlasError
from geometry.runtime import bases
from geometry.runtime.base_models import base_note, resolve_base
from geometry.runtime.bases import _task_type
from geometry.runtime.batched import generate, predict
from geometry.runtime.coefficients import Coefficients, _coefficient, _prep
from geometry.runtime.hooks import _ModuleDelta
from geometry.runtime.modules import _head_key, _is_conv1d, _module_path, _module_shape, _num_labels
from geometry.runtime.updates import _Task, _tasks
from geometry.types import row_index, row_label, row_stop


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
        return bases.cached_runtime(
            key, lambda: cls(bases.load_base(base, task_type, num_labels).to(device), base=base, task_type=task_type))

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
    def base_note(self) -> str | None:
        """What loading the base did to its weights when it came from a quantized GGUF file (e.g. ``"base
        HuggingFaceTB/SmolLM2-135M-Instruct: de-quantized to float32 from SmolLM2-135M-Instruct.Q4_1.gguf
        (4-bit Q4_1: ...)"``), for pages and the CLI to show; ``None`` otherwise
        (:func:`geometry.runtime.base_models.base_note`)."""
        return base_note(self.base, str(self.dtype).removeprefix("torch.")) if self.base else None

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            if self.base is None:
                raise AtlasError("this runtime wraps a model without a tokenizer: pass Runtime(model, tokenizer)")
            self._tokenizer = bases.load_tokenizer(self.base)
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
        per_module: dict[str, tuple[list, list, list]] = {}
        for t, task in enumerate(tasks):
            for term in task.terms:
                path = _module_path(term.name)
                module = self._module(term.name, path)
                dtype = module.weight.dtype if module.weight.is_floating_point() else self.dtype
                device = module.weight.device
                out, inp = _module_shape(module)
                coef = _coefficient(coefficients, t, len(tasks), term.name, term.layer)
                factored, dense, rowscale = per_module.setdefault(path, ([], [], []))
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
                    for rows, part in term.parts:
                        idx = row_index(rows)
                        n = idx.stop - idx.start if isinstance(idx, slice) else len(idx)
                        if row_stop(rows) > out or tuple(part.shape) != (n, A.shape[0]):
                            raise AtlasError(f"{where}: B part for rows {row_label(rows)} has shape "
                                             f"{tuple(part.shape)}, expected ({n}, {A.shape[0]}) within {out} rows")
                        B[idx] = _prep(part, dtype, device)
                else:
                    B = _prep(term.B, dtype, device)
                if tuple(B.shape) != (out, A.shape[0]):
                    raise AtlasError(f"{where}: B has shape {tuple(B.shape)}, expected ({out}, {A.shape[0]}) "
                                     f"(out, r) with r = A.shape[0]")
                if term.magnitude is not None:
                    g = _dora_scale(where, module, term, A, B)
                    B = (B.double() * g[:, None]).to(dtype)
                    rowscale.append(((g - 1).to(dtype=dtype, device=device), coef))
                factored.append((A, B, float(term.scale), coef))
        deltas = {}
        for path, (factored, dense, rowscale) in per_module.items():
            module = self.model.get_submodule(path)
            dtype = module.weight.dtype if module.weight.is_floating_point() else self.dtype
            deltas[path] = _ModuleDelta(path, module, factored, dense, dtype, module.weight.device, rowscale=rowscale)
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


def _dora_scale(where: str, module: torch.nn.Module, term: Any, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``g = mag / ||W0 + s B A||_row`` (float64, on the module's device) of a DoRA term, ``W0`` the module's own."""
    if isinstance(module, torch.nn.Embedding):
        raise AtlasError(f"{where}: DoRA on an embedding is not applied by the runtime; resolve the adapter first "
                         "(geometry.linalg.dora.resolve_dora(adapter, base))")
    weight = module.weight.detach()
    if not weight.is_floating_point():
        raise AtlasError(f"{where}: DoRA needs the floating-point base weight (this one is {weight.dtype})")
    W0 = (weight.T if _is_conv1d(module) else weight).double()
    mag = term.magnitude.detach().to(device=W0.device, dtype=torch.float64).reshape(-1)
    if mag.shape[0] != W0.shape[0]:
        raise AtlasError(f"{where}: DoRA magnitude of shape {tuple(term.magnitude.shape)}, expected ({W0.shape[0]},)")
    norm = torch.linalg.norm(W0 + float(term.scale) * (B.double() @ A.double()), dim=1)
    if not bool((norm > 0).all()):
        raise AtlasError(f"{where}: a row of W0 + s B A is zero; DoRA's normalisation is undefined")
    return mag / norm


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
