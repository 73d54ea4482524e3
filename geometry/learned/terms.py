"""One task's term of a learned merge: its inputs, its reference distributions, its merged predictions.

For task ``t`` (adapter ``t``, its own head, its own inputs ``X_t``) the term of a batch ``b`` of
``X_t`` is ``mean_{x in b} f(x)`` where ``f`` compares (DivMerge) or scores (AdaMerging) the class
distributions of the merged model ``Phi`` with task ``t``'s head:

* **classification** (``SEQ_CLS``): ``p_t(. | x)`` and ``p_Phi(. | x)`` are the softmax of the logits
  of task ``t``'s head; the reference ``p_t`` is the base model plus adapter ``t`` alone
  (coefficient 1), computed once per input;
* **generation** (``CAUSAL_LM``, DivMerge appendix B.1): the fine-tuned model greedily decodes a
  continuation ``y`` of ``x`` (up to EOS or ``max_new_tokens``), once, and its next-token
  distributions at every step of ``y`` are the reference; the merged model runs once on ``x + y``,
  teacher-forced, and ``f(x)`` is the mean over the tokens of ``y`` of the token-level divergence
  (AdaMerging: of the entropy of the merged next-token distribution).

Reference distributions are kept in memory (an LRU of at most :data:`MEMORY_BYTES` bytes,
:func:`clear_memory_cache`) and, when the run is given a ``cache`` (:class:`geometry.cache.ResultCache`),
on disk, keyed by the adapter's content hash, the inputs' content hash, the base and the settings that change them
(``max_length``, ``max_new_tokens``). Generation stores the continuations always and the per-token
distributions while they fit in ``reference_budget`` bytes; above that the reference model is re-run
(teacher-forced, without gradient) on each batch, which gives the same distributions.
Forward passes go through :class:`geometry.runtime.Runtime` (factored ``B (A x)`` hooks, never ``B A``);
teacher-forced, the output layer runs on the positions predicting ``y`` only (transformers'
``logits_to_keep``), never on the whole ``(batch, length, vocabulary)``.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from cachetools import LRUCache

from geometry.errors import AtlasError
from geometry.learned.data import UnlabeledInputs
from geometry.runtime import Runtime
from geometry.types import Adapter

#: task types each kind of term handles
CLASSIFICATION_TYPES = ("SEQ_CLS",)
GENERATION_TYPES = ("CAUSAL_LM",)


def _nbytes(value: Any) -> int:
    """About how many bytes ``value`` (tensors, lists of them, continuations' token lists) holds."""
    if isinstance(value, torch.Tensor):
        return value.element_size() * value.nelement()
    if isinstance(value, dict):
        return 64 + sum(_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return 64 + sum(_nbytes(v) if isinstance(v, (torch.Tensor, list, tuple, dict)) else 8 for v in value)
    return 64


#: bytes of reference distributions and continuations kept in memory across runs (least recently used go)
MEMORY_BYTES = 1 << 30
_MEMORY: LRUCache = LRUCache(maxsize=MEMORY_BYTES, getsizeof=_nbytes)
_MEMORY_LOCK = threading.Lock()
REFERENCE_VERSION = "1"
_MISSING = object()


def term_kind(adapters: list[Adapter]) -> str:
    """``classification`` or ``generation`` from the adapters' task type (one for all, else an error)."""
    types = {(a.config.task_type or "SEQ_CLS").upper() for a in adapters}
    if len(types) > 1:
        raise AtlasError(f"the adapters have different task types ({', '.join(sorted(types))}): a learned merge "
                         "needs one")
    task_type = types.pop()
    if task_type in CLASSIFICATION_TYPES:
        return "classification"
    if task_type in GENERATION_TYPES:
        return "generation"
    if task_type == "SEQ_2_SEQ_LM":
        raise AtlasError("encoder-decoder adapters (SEQ_2_SEQ_LM, T5-style) are not supported by the learned merges "
                         "yet: the runtime runs them, but greedy continuations and their scoring are only written "
                         "for causal LMs")
    raise AtlasError(f"task type {task_type}: the learned merges handle sequence classification (SEQ_CLS, one head "
                     "per task) and causal LMs (CAUSAL_LM)")


def _memo(key: tuple, compute, cache: Any = None) -> Any:
    """``compute()`` once per ``key``: from memory, else from ``cache`` (a ResultCache, or ``None``: no disk)."""
    from geometry.cache import cached

    with _MEMORY_LOCK:
        value = _MEMORY.get(key, _MISSING)
    if value is not _MISSING:
        return value
    value = cached(cache, "learned_reference", key, compute)
    with _MEMORY_LOCK:
        try:
            _MEMORY[key] = value
        except ValueError:  # larger than the whole budget: not kept
            pass
    return value


def clear_memory_cache() -> None:
    """Forget the reference distributions kept in memory (a disk cache given to a run stays)."""
    with _MEMORY_LOCK:
        _MEMORY.clear()


def _head(adapter: Adapter) -> Any:
    return adapter.name if adapter.other_tensors else False


class TaskTerm:
    """Common part: the task's index, adapter, inputs and runtime (loaded for its head's label count)."""

    kind = ""

    def __init__(self, index: int, adapters: list[Adapter], inputs: UnlabeledInputs, *, max_length: int = 128,
                 device: Any = None, cache: Any = None):
        self.index = index
        self.adapters = adapters
        self.adapter = adapters[index]
        self.name = self.adapter.name
        self.inputs = inputs
        self.max_length = int(max_length)
        self.head = _head(self.adapter)
        self.runtime = Runtime.for_sources(adapters, head=self.head, device=device)
        self.cache = cache
        self._reference: Any = None

    def __len__(self) -> int:
        return len(self.inputs)

    def _texts(self, idx: list[int]) -> tuple[list[str], list[str] | None]:
        texts = [self.inputs.texts[i] for i in idx]
        pairs = None if self.inputs.pairs is None else [self.inputs.pairs[i] for i in idx]
        return texts, pairs

    def _key(self, *extra: Any) -> tuple:
        from geometry.evaluation.evaluate import source_hash
        from geometry.runtime.base_models import resolve_base

        return (REFERENCE_VERSION, self.kind, source_hash(self.adapter), self.inputs.content_hash,
                resolve_base(self.runtime.base or ""), self.max_length, *extra)


class ClassificationTerm(TaskTerm):
    """Class distributions of task ``t``'s head: reference ``log p_t (n, C)``, merged ``log p_Phi (b, C)``."""

    kind = "classification"

    def prepare(self, distributions: bool = True, batch_size: int = 64) -> None:
        """Compute (or read from the caches) the reference distributions; ``distributions=False``: nothing."""
        if distributions and self._reference is None:
            self._reference = _memo(self._key(), lambda: self._compute_reference(batch_size), self.cache)

    def _compute_reference(self, batch_size: int) -> torch.Tensor:
        rt = self.runtime
        with rt.apply([self.adapter], head=self.head):
            out = rt.run(self.inputs.texts, self.inputs.pairs, batch_size=batch_size, max_length=self.max_length)
        return torch.log_softmax(out.logits.detach().double(), dim=-1).float().cpu()

    def reference(self, idx: list[int]) -> tuple[torch.Tensor, None]:
        self.prepare()
        return self._reference[idx].to(self.runtime.device), None

    def merged(self, idx: list[int], coefficients: Any, grad: bool = True) -> tuple[torch.Tensor, None]:
        rt = self.runtime
        texts, pairs = self._texts(idx)
        enc = rt.encode(texts, pairs, self.max_length)
        with torch.set_grad_enabled(grad), rt.apply(self.adapters, coefficients=coefficients, head=self.head):
            logits = rt.forward(**enc).logits
        return torch.log_softmax(logits.double(), dim=-1), None

    def candidate(self, idx: list[int], source: Any) -> tuple[torch.Tensor, None]:
        """``log p`` of any merge ``source`` of these adapters (with this task's head), no gradient: the
        advisor's candidates (:mod:`geometry.evaluation.advise`)."""
        rt = self.runtime
        texts, pairs = self._texts(idx)
        enc = rt.encode(texts, pairs, self.max_length)
        with torch.no_grad(), rt.apply(source, head=self.head):
            logits = rt.forward(**enc).logits
        return torch.log_softmax(logits.double(), dim=-1), None


class GenerationTerm(TaskTerm):
    """Causal LM: the fine-tuned model's greedy continuation ``y`` of each input, its next-token
    distributions on ``y`` (reference), and the merged model's on ``x + y`` (teacher-forced)."""

    kind = "generation"

    def __init__(self, *args: Any, max_new_tokens: int = 32, reference_budget: int = 512 * 2**20, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.inputs.pairs is not None:
            raise AtlasError(f"{self.name}: text pairs are not supported for causal LMs (give one 'text' or "
                             "'prompt' per input)")
        self.max_new_tokens = int(max_new_tokens)
        self.reference_budget = int(reference_budget)
        self.note = ""
        self._continuations: dict | None = None

    # ---------------------------------------------------------------------------------- continuations
    def prepare(self, distributions: bool = True, batch_size: int = 16) -> None:
        """Greedy continuations (always) and, with ``distributions``, the reference next-token distributions."""
        if self._continuations is None:
            self._continuations = _memo(self._key("continuations", self.max_new_tokens),
                                        lambda: self._greedy(batch_size), self.cache)
        if distributions and self._reference is None:
            vocab = self._vocab()
            tokens = sum(len(c) for c in self._continuations["continuation"])
            if tokens * vocab * 4 <= self.reference_budget:
                self._reference = _memo(self._key("distributions", self.max_new_tokens),
                                        self._compute_distributions, self.cache)
            else:
                self._reference = "recompute"
                self.note = (f"{self.name}: reference distributions ({tokens} tokens x {vocab} vocabulary) exceed "
                             f"{self.reference_budget / 2**20:.0f} MiB: recomputed teacher-forced per batch")

    def _vocab(self) -> int:
        emb = self.runtime.model.get_output_embeddings()
        return int(emb.weight.shape[0]) if emb is not None else int(self.runtime.model.config.vocab_size)

    def _greedy(self, batch_size: int) -> dict:
        from geometry.runtime import tokenizer_padding
        from geometry.runtime.base_models import quiet

        rt = self.runtime
        tok = rt.tokenizer
        eos = _eos_id(rt)
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos
        if pad is None:
            raise AtlasError(f"{self.name}: the tokenizer has neither a pad nor an EOS token")
        prompts, conts = [], []
        texts = self.inputs.texts
        with rt.apply([self.adapter], head=self.head), torch.no_grad(), tokenizer_padding(tok, "left"):
            for start in range(0, len(texts), batch_size):
                chunk = texts[start:start + batch_size]
                enc = tok(list(chunk), padding=True, truncation=True, max_length=self.max_length,
                          return_tensors="pt")
                enc = {k: v.to(rt.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
                with quiet():
                    gen = rt.model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False,
                                            pad_token_id=pad, eos_token_id=eos)
                width = enc["input_ids"].shape[1]
                for row in range(gen.shape[0]):
                    mask = enc["attention_mask"][row].bool()
                    prompts.append(enc["input_ids"][row][mask].tolist())
                    new = gen[row, width:].tolist()
                    if eos is not None and eos in new:
                        new = new[:new.index(eos) + 1]
                    conts.append(new or [eos if eos is not None else pad])
        return {"prompt": prompts, "continuation": conts}

    # ---------------------------------------------------------------------------------- teacher forcing
    def _batch(self, idx: list[int]) -> tuple[dict, torch.Tensor, torch.Tensor]:
        """Right-padded ``x + y`` ids, the positions predicting each token of ``y`` ``(b, Ly)`` and their mask."""
        data = self._continuations
        rows = [data["prompt"][i] + data["continuation"][i] for i in idx]
        width = max(len(r) for r in rows)
        n_new = max(len(data["continuation"][i]) for i in idx)
        ids = torch.zeros(len(idx), width, dtype=torch.long)
        att = torch.zeros(len(idx), width, dtype=torch.long)
        pos = torch.zeros(len(idx), n_new, dtype=torch.long)
        mask = torch.zeros(len(idx), n_new, dtype=torch.bool)
        for b, (i, row) in enumerate(zip(idx, rows)):
            ids[b, :len(row)] = torch.tensor(row)
            att[b, :len(row)] = 1
            lp, lc = len(data["prompt"][i]), len(data["continuation"][i])
            pos[b, :lc] = torch.arange(lp - 1, lp - 1 + lc)
            mask[b, :lc] = True
        dev = self.runtime.device
        return {"input_ids": ids.to(dev), "attention_mask": att.to(dev)}, pos.to(dev), mask.to(dev)

    def _logp(self, enc: dict, pos: torch.Tensor, full: bool = False) -> torch.Tensor:
        """``log p (b, Ly, V)`` at the positions ``pos (b, Ly)`` that predict the continuation's tokens.

        The output layer runs on those positions only (transformers' ``logits_to_keep`` given the ``(b, Ly)``
        positions: the backbone's last hidden states are picked, then the head and any logit post-processing
        of the model run on them), which gives exactly the picked rows of the full logits without the
        ``(b, L, V)`` product and its backward. Models without ``logits_to_keep`` (or ``full=True``) compute
        the full logits and gather."""
        picked = None
        if not full and _keeps_logits(self.runtime.model):
            logits = self.runtime.forward(**enc, logits_to_keep=pos).logits
            if logits.dim() == 3 and tuple(logits.shape[:2]) == tuple(pos.shape):
                picked = logits
        if picked is None:  # full logits, then the rows wanted
            logits = self.runtime.forward(**enc).logits
            picked = logits.gather(1, pos.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
        return torch.log_softmax(picked.float(), dim=-1)

    def _compute_distributions(self) -> list[torch.Tensor]:
        rt = self.runtime
        out = []
        n = len(self.inputs)
        with rt.apply([self.adapter], head=self.head), torch.no_grad():
            for start in range(0, n, 16):
                idx = list(range(start, min(n, start + 16)))
                enc, pos, mask = self._batch(idx)
                logp = self._logp(enc, pos).float().cpu()
                for b in range(len(idx)):
                    out.append(logp[b, :int(mask[b].sum())])
        return out

    def reference(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        self.prepare()
        if isinstance(self._reference, str):
            rt = self.runtime
            enc, pos, mask = self._batch(idx)
            with rt.apply([self.adapter], head=self.head), torch.no_grad():
                return self._logp(enc, pos), mask
        _, _, mask = self._batch(idx)
        width = mask.shape[1]
        parts = []
        for i in idx:
            t = self._reference[i]
            pad = torch.zeros(width - t.shape[0], t.shape[1], dtype=t.dtype)
            parts.append(torch.cat([t, pad]))
        return torch.stack(parts).to(self.runtime.device), mask

    def merged(self, idx: list[int], coefficients: Any, grad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        self.prepare(distributions=False)
        rt = self.runtime
        enc, pos, mask = self._batch(idx)
        with torch.set_grad_enabled(grad), rt.apply(self.adapters, coefficients=coefficients, head=self.head):
            return self._logp(enc, pos), mask

    def candidate(self, idx: list[int], source: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced ``log p`` along the reference continuations of any merge ``source`` of these adapters,
        no gradient (the advisor's candidates, :mod:`geometry.evaluation.advise`)."""
        self.prepare(distributions=False)
        rt = self.runtime
        enc, pos, mask = self._batch(idx)
        with torch.no_grad(), rt.apply(source, head=self.head):
            return self._logp(enc, pos), mask


def _keeps_logits(model: torch.nn.Module) -> bool:
    """Whether ``model``'s forward takes ``logits_to_keep`` (transformers' causal LMs do: a ``(b, k)`` tensor of
    positions computes the output layer on those positions only)."""
    import inspect

    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _eos_id(rt: Runtime) -> int | None:
    gen = getattr(rt.model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if eos is None:
        eos = getattr(rt.model.config, "eos_token_id", None)
    if eos is None:
        eos = rt.tokenizer.eos_token_id
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    return eos


def reduce_term(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the batch of per-input values; per-token values ``(b, L)`` are first averaged over each
    input's tokens (``mask``)."""
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    per_input = (values * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    return per_input.mean()


def make_term(kind: str, index: int, adapters: list[Adapter], inputs: UnlabeledInputs, **kwargs: Any) -> TaskTerm:
    if kind == "classification":
        kwargs.pop("max_new_tokens", None)
        kwargs.pop("reference_budget", None)
        return ClassificationTerm(index, adapters, inputs, **kwargs)
    return GenerationTerm(index, adapters, inputs, **kwargs)
