"""The optimiser loop shared by DivMerge and AdaMerging, step by step.

(Over 500 lines on purpose: one class, :class:`LearnedMergeRun`, whose state, the coefficients, the
optimiser, the batches, the stop flag and the stored result, is shared by every method; split, each part
would reach into the others' state.)

A run holds the coefficients ``Gamma`` (a ``(T, L)`` leaf tensor, see :mod:`geometry.learned.layout`),
an Adam optimiser (default moments, no weight decay), the unlabeled inputs of each task
(:mod:`geometry.learned.data`) and one term per task (:mod:`geometry.learned.terms`). One step:

1. for each task ``t``: the next ``batch_per_task`` inputs of ``X_t`` (a seeded permutation per
   epoch), the merged model ``Phi_Gamma`` with task ``t``'s head, the term
   ``L_t = mean_{x in batch_t} f_t(x)``, ``L_t.backward()`` (gradients reach only ``Gamma``);
2. one Adam step on ``sum_t L_t`` (the batch holds ``batch_per_task x T`` inputs, the paper's
   ``4 x #tasks``), then, with ``clamp``, ``Gamma <- clip(Gamma, 0, 1)``.

An epoch is ``ceil(max_t |X_t| / batch_per_task)`` steps (a task with fewer inputs wraps around
within the epoch). Everything is seeded (``seed``): the inputs chosen, their order; the model runs in
evaluation mode (no dropout), so two runs with the same settings give the same coefficients.

Step-wise use (a dashboard page, a notebook)::

    run = DivMerge(adapters, "sample_adapters/synthetic/tasks", level="task")
    for state in run.steps(evaluate_every=10, limit=100):   # a StepState after every optimiser step
        print(state.step, state.objective, state.coefficients, state.anp)
        if should_stop:
            run.stop()                                        # or just break: the coefficients stay
    result = run.result()                                     # LearnedMerge; result.merge().save(...)

``run.steps()`` called again resumes where it stopped; :meth:`LearnedMergeRun.start` runs it in a
background thread (``run.snapshot()`` reads the state meanwhile, ``run.stop()`` ends it).
A run given a ``cache`` (a :class:`geometry.cache.ResultCache` or a folder) keeps there the fine-tuned
models' references, the scores, and, when it reaches its last step, its result (keyed by the adapters'
content, the inputs' content and the settings); a new run with the same key and cache starts from it
(``state.cached``). Until then it keeps a **checkpoint** there after every step (the coefficients, the optimiser's
state, the history and the evaluations): a run killed with its process (a server restart, a crash) and started
again with the same key resumes after its last finished step (``state.resumed_from``) and reaches exactly the
coefficients an uninterrupted run reaches (the mini-batches are a function of the step). Without a cache (the
default) nothing is written to disk.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from geometry.errors import AtlasError, IncompatibleAdaptersError
from geometry.learned.data import UnlabeledInputs, parse_unlabeled, read_unlabeled, select, task_inputs
from geometry.learned.layout import CoefficientLayout, initial_value
from geometry.learned.result import LearnedMerge
from geometry.learned.terms import TaskTerm, make_term, term_kind
from geometry.types import Adapter

RESULT_VERSION = "1"
DataSpec = None | str | Path | bytes | UnlabeledInputs | Sequence[str]


@dataclass
class StepState:
    """Where a run stands after a step: ``step`` of ``total_steps`` (1-based), ``epoch`` (0-based), the
    mini-batch ``objective`` and its per-adapter ``terms``, the ``coefficients`` after the update
    (a ``(T, L)`` copy; rows ``adapters``, columns ``layers``), ``anp`` when an evaluation ran at this
    step, ``done`` at the last step, ``cached`` when the state comes from a stored finished run, ``resumed_from``
    the step an interrupted run with the same key was resumed at (its checkpoint in the cache), else ``None``."""

    step: int
    epoch: int
    total_steps: int
    objective: float
    terms: dict[str, float]
    coefficients: np.ndarray
    adapters: list[str]
    layers: list[Any]
    elapsed_s: float
    anp: dict[str, Any] | None = None
    done: bool = False
    cached: bool = False
    resumed_from: int | None = None


@dataclass
class Settings:
    """Every choice of a run (the paper's Table 9 defaults are filled in by each method)."""

    method: str
    objective: str
    level: str = "task"
    samples: int | None = None
    epochs: int = 4
    lr: float = 1e-2
    init: float | str = 0.5
    batch_per_task: int = 4
    seed: int = 0
    clamp: bool = False
    split: str = "validation"
    max_length: int = 128
    max_steps: int | None = None
    max_new_tokens: int = 32
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_positive(name: str, value: Any, kind: type = int) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 or (
            kind is int and int(value) != value):
        raise AtlasError(f"{name} must be a positive {'integer' if kind is int else 'number'}, got {value!r}")


class LearnedMergeRun:
    """A learned-coefficient merge of ``adapters`` (see the module docstring); subclasses give the term."""

    method = ""
    #: the method's defaults (overridable by each keyword)
    defaults: dict[str, Any] = {}

    def __init__(
        self,
        adapters: Sequence[Adapter] | Any,
        tasks: str | Path | None = None,
        *,
        level: str = "task",
        objective: str,
        samples: int | None = None,
        epochs: int | None = None,
        lr: float | None = None,
        init: float | str | None = None,
        batch_per_task: int = 4,
        seed: int = 0,
        clamp: bool = False,
        split: str = "validation",
        data: Mapping[str, DataSpec] | None = None,
        max_length: int = 128,
        max_steps: int | None = None,
        max_new_tokens: int = 32,
        reference_budget: int = 512 * 2**20,
        device: Any = None,
        cache: Any = None,
    ):
        from geometry.evaluation.merge_eval import check_unique_names
        from geometry.merging.base import check_mergeable

        ads = _as_adapters(adapters)
        if not ads:
            raise IncompatibleAdaptersError(f"{self.method}: give at least one adapter")
        check_unique_names(ads)
        check_mergeable(ads)
        self.kind = term_kind(ads)
        for name, value, kind in (("samples", samples, int), ("epochs", epochs, int), ("lr", lr, float),
                                  ("batch_per_task", batch_per_task, int), ("max_length", max_length, int),
                                  ("max_steps", max_steps, int), ("max_new_tokens", max_new_tokens, int)):
            _check_positive(name, value, kind)
        d = self.defaults_for(self.kind)
        if samples is None:
            samples = d["samples_task"] if level == "task" else d["samples_layer"]
        self.settings = Settings(
            method=self.method, objective=objective, level=level, samples=int(samples),
            epochs=int(epochs if epochs is not None else d["epochs"]), lr=float(lr if lr is not None else d["lr"]),
            init=init if init is not None else d["init"], batch_per_task=int(batch_per_task), seed=int(seed),
            clamp=bool(clamp), split=split, max_length=int(max_length),
            max_steps=None if max_steps is None else int(max_steps), max_new_tokens=int(max_new_tokens))
        initial_value(self.settings.init, len(ads))  # validates init
        self.adapters: list[Adapter] = ads
        self.names = [a.name for a in ads]
        self.tasks_dir = Path(tasks) if tasks is not None else None
        self.layout = CoefficientLayout(ads, level)
        self.device = device
        from geometry.cache import as_cache

        self.cache = as_cache(cache)
        self.reference_budget = int(reference_budget)
        self.notes: list[str] = []
        self.inputs = self._select_inputs(data or {})
        self.notes.extend(i.note for i in self.inputs if i.note)
        self.task_names = [i.task for i in self.inputs]
        self._terms: list[TaskTerm] | None = None
        n_max = max(len(i) for i in self.inputs)
        self.steps_per_epoch = math.ceil(n_max / self.settings.batch_per_task)
        total = self.settings.epochs * self.steps_per_epoch
        self.total_steps = min(total, self.settings.max_steps) if self.settings.max_steps else total
        self._gamma = torch.tensor(self.layout.initial(self.settings.init), dtype=torch.float64, requires_grad=True)
        self._optimizer = torch.optim.Adam([self._gamma], lr=self.settings.lr)
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.evaluations: list[dict[str, Any]] = []
        self._finetuned: dict[tuple, float] = {}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = 0.0
        self._elapsed = 0.0
        self.error: BaseException | None = None
        self.from_cache = False
        #: the step this run resumed at from a checkpoint in its cache (``None``: started from the beginning)
        self.resumed_from: int | None = None

    # ------------------------------------------------------------------------------------ defaults
    @classmethod
    def defaults_for(cls, kind: str) -> dict[str, Any]:
        """The method's defaults for ``classification`` or ``generation`` (the paper's Table 9)."""
        return dict(cls.defaults)

    # ------------------------------------------------------------------------------------ inputs
    def _select_inputs(self, data: Mapping[str, DataSpec]) -> list[UnlabeledInputs]:
        unknown = sorted(set(data) - set(self.names))
        if unknown:
            raise AtlasError(f"data given for {', '.join(unknown)}, which is not among the adapters "
                             f"({', '.join(self.names)})")
        chosen = []
        for ad in self.adapters:
            spec = data.get(ad.name)
            if spec is None:
                full = task_inputs(ad, self.tasks_dir, self.settings.split)
            elif isinstance(spec, UnlabeledInputs):
                full = spec
            elif isinstance(spec, (str, Path)):
                full = read_unlabeled(spec, task=_task_name(ad))
            elif isinstance(spec, (bytes, bytearray)):
                full = parse_unlabeled(bytes(spec), ad.name, task=_task_name(ad))
            else:
                texts = [str(t) for t in spec]
                if not texts:
                    raise AtlasError(f"no unlabeled inputs given for {ad.name!r}")
                full = UnlabeledInputs(_task_name(ad), texts, None, "given", len(texts))
            chosen.append(select(full, self.settings.samples, self.settings.seed))
        return chosen

    # ------------------------------------------------------------------------------------ terms
    @property
    def needs_reference(self) -> bool:
        """Whether the objective compares with the fine-tuned models' distributions (DivMerge: yes)."""
        return True

    def _make_terms(self) -> list[TaskTerm]:
        if self._terms is None:
            self._terms = [make_term(self.kind, t, self.adapters, self.inputs[t], max_length=self.settings.max_length,
                                     device=self.device, cache=self.cache,
                                     max_new_tokens=self.settings.max_new_tokens,
                                     reference_budget=self.reference_budget)
                           for t in range(len(self.adapters))]
            self._gamma.data = self._gamma.data.to(self._terms[0].runtime.device)
        return self._terms

    def prepare(self, progress: Callable[[int, int, str], None] | None = None) -> None:
        """Load the runtimes and compute (or read from the caches) what the objective needs of each
        fine-tuned model, once; :meth:`steps` calls it when needed."""
        terms = self._make_terms()
        for t, term in enumerate(terms):
            if progress:
                progress(t, len(terms), f"{term.name}: reference")
            term.prepare(distributions=self.needs_reference)
            note = getattr(term, "note", "")
            if note and note not in self.notes:
                self.notes.append(note)
        if progress:
            progress(len(terms), len(terms), "ready")

    def term(self, task: TaskTerm, idx: list[int], coefficients: Any, grad: bool = True) -> torch.Tensor:
        """``mean_{x in batch} f_t(x)`` for task ``task`` on inputs ``idx`` (defined by each method)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------ batches
    def batch(self, t: int, step: int) -> list[int]:
        """Indices into ``X_t`` of the inputs used at ``step`` (0-based) for task ``t``."""
        epoch, k = divmod(step, self.steps_per_epoch)
        n = len(self.inputs[t])
        b = self.settings.batch_per_task
        n_max = max(len(i) for i in self.inputs)
        rng = np.random.default_rng([self.settings.seed & 0xFFFFFFFF, epoch, t])
        perm = rng.permutation(n)
        positions = range(k * b, min((k + 1) * b, n_max))
        return [int(perm[p % n]) for p in positions]

    # ------------------------------------------------------------------------------------ state
    @property
    def coefficients(self) -> np.ndarray:
        """The current ``Gamma`` (a copy), ``(T, L)``."""
        with self._lock:
            return self._gamma.detach().cpu().numpy().copy()

    @property
    def done(self) -> bool:
        return self.step >= self.total_steps

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def set_coefficients(self, gamma: Any) -> None:
        """Set ``Gamma`` (e.g. to evaluate the objective somewhere); the optimiser state is kept."""
        value = torch.as_tensor(np.asarray(gamma, dtype=float), dtype=torch.float64)
        if tuple(value.shape) != self.layout.shape:
            raise AtlasError(f"coefficients of shape {tuple(value.shape)}, expected {self.layout.shape}")
        with self._lock:
            self._gamma.data.copy_(value.to(self._gamma.device))

    def stop(self) -> None:
        """Ask the run to stop after the step in progress (the coefficients reached are kept)."""
        self._stop.set()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    # ------------------------------------------------------------------------------------ the loop
    def _one_step(self) -> StepState:
        terms = self._make_terms()
        with self._lock:
            self._optimizer.zero_grad(set_to_none=True)
            coefficients = self.layout.runtime_coefficients(self._gamma)
            values: dict[str, float] = {}
            for t, task in enumerate(terms):
                loss = self.term(task, self.batch(t, self.step), coefficients)
                loss.backward()
                values[task.name] = float(loss.detach())
            self._optimizer.step()
            if self.settings.clamp:
                with torch.no_grad():
                    self._gamma.clamp_(0.0, 1.0)
            epoch = self.step // self.steps_per_epoch
            self.step += 1
            objective = float(sum(values.values()))
            self.history.append({"step": self.step, "epoch": epoch, "objective": objective, "terms": values})
            return StepState(self.step, epoch, self.total_steps, objective, values, self.coefficients,
                             list(self.names), self.layout.layers, self._elapsed + time.perf_counter() - self._started,
                             done=self.done)

    def steps(self, evaluate_every: int | None = None, limit: int | None = None,
              evaluate_at_end: bool = False) -> Iterator[StepState]:
        """Run the remaining steps, yielding a :class:`StepState` after each optimiser step.

        ``evaluate_every=k``: ANP of the current coefficients on the test splits every ``k`` steps
        (``limit`` test examples per task), in ``state.anp``; ``evaluate_at_end``: also after the last
        step. Stops after the step in progress when :meth:`stop` is called (a later call resumes);
        breaking out of the loop also keeps the coefficients reached.
        """
        _check_positive("evaluate_every", evaluate_every, int)
        self._stop.clear()
        if self.step == 0 and self.cache is not None and self._load_cached():
            if evaluate_at_end and not self._evaluated(limit):
                self.evaluate(limit=limit)  # the stored run was scored otherwise (or not at all)
            state = self.snapshot()
            state.cached = True
            yield state
            return
        self.prepare()
        if self.step == 0 and self.cache is not None:
            self._load_checkpoint()
        self._started = time.perf_counter()
        try:
            while not self.done and not self._stop.is_set():
                state = self._one_step()
                if (evaluate_every and state.step % evaluate_every == 0) or (evaluate_at_end and state.done):
                    state.anp = self.evaluate(limit=limit)
                state.resumed_from = self.resumed_from
                if state.done:
                    self._store_cached()
                else:
                    self._store_checkpoint()
                yield state
        finally:
            self._elapsed += time.perf_counter() - self._started
            self._started = time.perf_counter()

    def fit(self, callback: Callable[[StepState], Any] | None = None, evaluate_every: int | None = None,
            limit: int | None = None, evaluate_at_end: bool = False, progress: bool = False) -> LearnedMerge:
        """Run to the end (or until ``callback`` returns ``False`` or :meth:`stop`); return the result.

        ``progress=True`` shows a tqdm bar on stderr (step, objective).
        """
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, desc=self.method, unit="step", leave=False)
        try:
            for state in self.steps(evaluate_every=evaluate_every, limit=limit, evaluate_at_end=evaluate_at_end):
                if bar is not None:
                    bar.n = state.step
                    bar.set_postfix_str(f"objective {state.objective:.4g}", refresh=False)
                    bar.update(0)
                if callback is not None and callback(state) is False:
                    break
        finally:
            if bar is not None:
                bar.close()
        if evaluate_at_end and self.done and not self._evaluated(limit):
            self.evaluate(limit=limit)  # finished earlier (a second fit) without this evaluation
        return self.result()

    def _evaluated(self, limit: int | None) -> bool:
        last = self.evaluations[-1] if self.evaluations else None
        return last is not None and last["step"] == self.step and last.get("limit") == limit

    def start(self, evaluate_every: int | None = None, limit: int | None = None,
              on_step: Callable[[StepState], Any] | None = None, evaluate_at_end: bool = False) -> threading.Thread:
        """Run :meth:`steps` in a background (daemon) thread; ``run.snapshot()`` reads the state,
        ``run.stop()`` ends it, ``run.join()`` waits; an exception ends up in ``run.error``. ``evaluate_every``,
        ``limit`` and ``evaluate_at_end`` as in :meth:`steps`."""
        if self.running:
            raise AtlasError(f"this {self.method} run is already running")
        self.error = None

        def work() -> None:
            try:
                for state in self.steps(evaluate_every=evaluate_every, limit=limit, evaluate_at_end=evaluate_at_end):
                    if on_step is not None:
                        on_step(state)
            except BaseException as exc:  # reported through run.error (a page shows it)
                self.error = exc

        self._stop.clear()
        self._thread = threading.Thread(target=work, name=f"{self.method}-run", daemon=True)
        self._thread.start()
        return self._thread

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def snapshot(self) -> StepState:
        """The current state (thread-safe copy), also before the first step (``step == 0``)."""
        with self._lock:
            last = self.history[-1] if self.history else {"step": 0, "epoch": 0, "objective": math.nan, "terms": {}}
            anp = self.evaluations[-1] if self.evaluations and self.evaluations[-1]["step"] == self.step else None
            return StepState(self.step, int(last["epoch"]), self.total_steps, float(last["objective"]),
                             dict(last["terms"]), self.coefficients, list(self.names), self.layout.layers,
                             self._elapsed, anp=anp, done=self.done, cached=self.from_cache,
                             resumed_from=self.resumed_from)

    # ------------------------------------------------------------------------------------ objective
    def objective_value(self, coefficients: Any = None, grad: bool = False,
                        batch_size: int = 32) -> tuple[float, np.ndarray | None]:
        """The full objective ``sum_t mean_{x in X_t} f_t(x)`` over every selected input at ``coefficients``
        (default: the current ones) and, with ``grad``, its gradient with respect to ``Gamma`` ``(T, L)``."""
        terms = self._make_terms()
        self.prepare()
        gamma0 = self.coefficients if coefficients is None else np.asarray(coefficients, dtype=float)
        gamma = torch.tensor(gamma0, dtype=torch.float64, device=self._gamma.device, requires_grad=grad)
        coef = self.layout.runtime_coefficients(gamma)
        total = 0.0
        for task in terms:
            n = len(task)
            for start in range(0, n, batch_size):
                idx = list(range(start, min(n, start + batch_size)))
                with torch.set_grad_enabled(grad):
                    value = self.term(task, idx, coef, grad=grad) * (len(idx) / n)
                if grad:
                    value.backward()
                total += float(value.detach())
        return total, (gamma.grad.detach().cpu().numpy() if grad else None)

    # ------------------------------------------------------------------------------------ evaluation
    def evaluate(self, limit: int | None = None, coefficients: Any = None) -> dict[str, Any]:
        """ANP of the merge at the current (or given) coefficients on each task's test split:
        ``{"step", "anp", "limit", "scores": {task: {"adapter", "merged", "finetuned", "normalized"}}}``
        (``anp`` NaN and a ``note`` when a fine-tuned model scores 0, where ANP is undefined).

        Fine-tuned scores are computed once per run, merged scores each time (both kept in the run's
        ``cache`` when it has one, by content hash).
        """
        from geometry.evaluation.merge_eval import anp, find_task_dir, performance

        if self.tasks_dir is None:
            raise AtlasError("ANP needs the tasks folder with each task's test split: pass tasks=")
        gamma = self.coefficients if coefficients is None else np.asarray(coefficients, dtype=float)
        merged = self.layout.merge(self.adapters, gamma)
        scores: dict[str, dict[str, Any]] = {}
        for ad in self.adapters:
            folder = find_task_dir(ad, self.tasks_dir, "test")
            key = (ad.name, limit)
            if key not in self._finetuned:
                self._finetuned[key] = performance(ad, folder, limit=limit, cache=self.cache)
            ft = self._finetuned[key]
            head = ad.name if ad.other_tensors else None  # causal LMs: no head
            mg = performance(merged, folder, head=head, limit=limit, cache=self.cache)
            scores[folder.name] = {"adapter": ad.name, "merged": mg, "finetuned": ft,
                                   "normalized": 100.0 * mg / ft if ft > 0 else math.nan}
        record: dict[str, Any] = {"step": self.step, "anp": math.nan, "limit": limit, "scores": scores}
        try:
            record["anp"] = anp([s["merged"] for s in scores.values()], [s["finetuned"] for s in scores.values()])
        except ValueError as exc:  # a fine-tuned model scoring 0: ANP is undefined, say why
            record["note"] = str(exc)
        with self._lock:
            if coefficients is None:
                self.evaluations.append(record)
        return record

    # ------------------------------------------------------------------------------------ results
    def merge(self, **params: Any):
        """Exact task arithmetic with the current coefficients (a :class:`MergedAdapter`)."""
        merged = self.layout.merge(self.adapters, self.coefficients, **params)
        merged.source_adapters = list(self.adapters)
        return merged

    def result(self) -> LearnedMerge:
        """The :class:`LearnedMerge` at the current step (finished or not)."""
        with self._lock:
            return LearnedMerge(
                method=self.method, adapters=list(self.names), tasks=list(self.task_names),
                level=self.settings.level, objective=self.settings.objective, coefficients=self.coefficients,
                layers=self.layout.layers, history=[dict(h) for h in self.history], settings=self.describe(),
                steps_done=self.step, total_steps=self.total_steps, stopped=not self.done, notes=list(self.notes),
                evaluations=[dict(e) for e in self.evaluations], source_adapters=list(self.adapters),
                layout=self.layout)

    def describe(self) -> dict[str, Any]:
        """The settings, with the inputs used per task (``inputs``: task -> {used, available, source})."""
        out = self.settings.to_dict()
        out["init_value"] = initial_value(self.settings.init, len(self.adapters))
        out["steps_per_epoch"] = self.steps_per_epoch
        out["total_steps"] = self.total_steps
        out["inputs"] = {i.task: {"used": len(i), "available": i.available, "source": i.source} for i in self.inputs}
        return out

    # ------------------------------------------------------------------------------------ result cache
    def cache_key(self) -> tuple:
        """What a finished run depends on: method, settings, adapters' and inputs' content."""
        from geometry.evaluation.evaluate import source_hash

        settings = {k: v for k, v in self.settings.to_dict().items()}
        return (RESULT_VERSION, self.method, repr(sorted(settings.items())), self.layout.level,
                tuple(str(c) for c in self.layout.columns), tuple(source_hash(a) for a in self.adapters),
                tuple(i.content_hash for i in self.inputs))

    def _store_cached(self) -> None:
        if self.cache is None:
            return
        payload = {"coefficients": self.coefficients, "history": self.history, "notes": self.notes,
                   "evaluations": self.evaluations, "step": self.step}
        self.cache.set("learned_merge", self.cache_key(), payload)
        self.cache.delete("learned_checkpoint", self.cache_key())  # finished: the result replaces the checkpoint

    def _store_checkpoint(self) -> None:
        """Keep where an unfinished run stands (after each step): what :meth:`_load_checkpoint` needs to go on
        exactly as if never interrupted. A few kilobytes: ``Gamma`` and Adam's two moments are ``(T, L)``."""
        if self.cache is None:
            return
        with self._lock:
            optimizer = self._optimizer.state_dict()
            payload = {"step": self.step, "coefficients": self.coefficients, "history": list(self.history),
                       "evaluations": list(self.evaluations), "notes": list(self.notes),
                       "elapsed": self._elapsed + time.perf_counter() - self._started,
                       "optimizer": {"state": {k: {n: (v.detach().cpu().clone() if torch.is_tensor(v) else v)
                                                   for n, v in st.items()} for k, st in optimizer["state"].items()},
                                     "param_groups": optimizer["param_groups"]}}
        self.cache.set("learned_checkpoint", self.cache_key(), payload)

    def _load_checkpoint(self) -> bool:
        """Resume from the checkpoint of an interrupted run with the same key (after :meth:`prepare`, so the
        optimiser's state lands on the runtime's device); ``False`` when there is none."""
        payload = self.cache.get("learned_checkpoint", self.cache_key())
        try:
            gamma = np.asarray(payload["coefficients"], dtype=float)
            step = int(payload["step"])
            if gamma.shape != self.layout.shape or not 0 < step < self.total_steps:
                return False
        except Exception:  # no checkpoint (None) or another shape: start from the beginning
            return False
        with self._lock:
            self._gamma.data.copy_(torch.as_tensor(gamma, dtype=torch.float64))
            self._optimizer.load_state_dict(payload["optimizer"])
            self.history = list(payload["history"])
            self.evaluations = list(payload.get("evaluations", []))
            for note in payload.get("notes", []):
                if note not in self.notes:
                    self.notes.append(note)
            self.step = step
            self._elapsed = float(payload.get("elapsed", 0.0))
            self.resumed_from = step
        return True

    def _load_cached(self) -> bool:
        if self.cache is None:
            return False
        payload = self.cache.get("learned_merge", self.cache_key())
        try:  # no entry (None) or another shape: not this run's result
            gamma = np.asarray(payload["coefficients"], dtype=float)
            if gamma.shape != self.layout.shape:
                return False
        except Exception:
            return False
        with self._lock:
            self._gamma.data.copy_(torch.as_tensor(gamma, dtype=torch.float64))
            self.history = list(payload["history"])
            self.evaluations = list(payload.get("evaluations", []))
            for note in payload.get("notes", []):
                if note not in self.notes:
                    self.notes.append(note)
            self.step = int(payload["step"])
            self.from_cache = True
        return True


def _as_adapters(adapters: Any) -> list[Adapter]:
    from geometry.adapter_set import AdapterSet

    if isinstance(adapters, Adapter):
        return [adapters]
    if isinstance(adapters, AdapterSet):
        return list(adapters.adapters)
    items = list(adapters)
    out = []
    for a in items:
        if isinstance(a, Adapter):
            out.append(a)
        elif isinstance(a, (str, Path)):
            from geometry.io.loader import load_adapter

            out.append(load_adapter(a))
        else:
            raise AtlasError(f"expected adapters (geometry.load(...) or folders), got a {type(a).__name__}")
    return out


def _task_name(adapter: Adapter) -> str:
    from geometry.evaluation.tasks import adapter_task_name

    return adapter_task_name(adapter)
