"""The model runtime (factored LoRA updates by hooks) against the base alone and against dense merged weights.

**Time**, on the sample base (all-MiniLM-L6-v2, 6 layers, hidden 384) with the 8 sample task adapters
(LoRA r = 8 on query / value, coefficients 1/8 each), one forward of a batch of task sentences:

* ``base``: the base model alone;
* ``runtime``: :class:`geometry.runtime.Runtime` with the 8 adapters applied,
  ``h = W0 x + sum_t c_t s_t B_t (A_t x)`` (two thin products per module, never ``B A``);
* ``dense``: a careful practitioner's baseline: dense weights ``W = W0 + (B_cat * w) A_cat`` computed
  once (``torch.addmm`` per module, the build timed separately), cached, and the forward run with
  ``torch.func.functional_call(model, dense_weights, ...)``. Ratios are given without and with the
  build (``time_vs_dense_with_build``: one forward after one build).

Timings are medians of ``--repeats`` runs after a warm-up; the outputs of the runtime and the dense
model are compared (max abs difference of the logits).

**Memory**, on a random-weight model of the Qwen2.5-0.5B shape (transformers ``Qwen2Config``: hidden 896,
24 layers, 14 heads, 2 kv heads, intermediate 4864; vocabulary reduced to ``--vocab`` = 32000 from
151936, which changes neither approach's update path) with 8 adapters of LoRA r = 16 on q, k, v, o,
gate, up, down: the bytes each approach allocates and keeps for the update path, counted by running the
real code on ``meta`` tensors (no memory used): the runtime's hook tensors (``A_cat (T r, n)``,
``B_cat (m, T r)``, weights ``(T r,)``), against the dense weights ``W0 + Delta`` (``m x n`` per adapted
module). With ``--device cuda`` the model is also materialised on the GPU and the peak
``torch.cuda.max_memory_allocated`` of one forward with each approach (build included) is measured.

    .venv/bin/python bench/runtime_bench.py                 # CPU, all cores
    .venv/bin/python bench/runtime_bench.py --quick         # smoke run (small batch, 2 Qwen layers)
    .venv/bin/python bench/runtime_bench.py --device cuda

The last line is one JSON object (``overhead_vs_base``, ``time_vs_dense``, ``memory_vs_dense``, ...).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time
from pathlib import Path

import torch

from geometry.evaluation.tasks import load_task
from geometry.io.loader import load_adapter
from geometry.runtime import LoraUpdates, Runtime
from geometry.runtime.base_models import MINILM, quiet
from geometry.runtime.modules import _module_path

ROOT = Path(__file__).resolve().parents[1]

SAMPLE_TASKS = ("acceptability", "negation", "news_topic", "nli", "paraphrase", "question", "sentiment_movies",
                "sentiment_products")
QWEN_KINDS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
              "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _median_time(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def dense_weights(model: torch.nn.Module, tasks: list, coefficients: list[float]) -> dict[str, torch.Tensor]:
    """``{param name: W0 + sum_t c_t s_t B_t A_t}`` for every adapted ``nn.Linear`` (concatenated factors,
    one ``addmm`` per module), the dense baseline's weights."""
    per_module: dict[str, list] = {}
    for c, ups in zip(coefficients, tasks):
        for name, (B, A, s) in ups.updates.items():
            per_module.setdefault(_module_path(name), []).append((B, A, c * s))
    out = {}
    for path, terms in per_module.items():
        module = model.get_submodule(path)
        W0 = module.weight
        B = torch.cat([(B * w).to(W0) for B, _, w in terms], dim=1)
        A = torch.cat([A.to(W0) for _, A, _ in terms], dim=0)
        out[f"{path}.weight"] = torch.addmm(W0, B, A)
    return out


def _sample_updates(names: list[str]) -> list[LoraUpdates]:
    from geometry.runtime import adapter_updates

    return [adapter_updates(load_adapter(ROOT / "sample_adapters" / "synthetic" / n)) for n in names]


def time_sample_base(args: argparse.Namespace, device: torch.device) -> dict:
    tasks = _sample_updates(list(SAMPLE_TASKS))
    coefficients = [1.0 / len(tasks)] * len(tasks)
    runtime = Runtime.for_base(MINILM, "SEQ_CLS", num_labels=2, device=device)
    data = load_task(ROOT / "sample_adapters" / "synthetic" / "tasks" / "sentiment_movies", "test")
    enc = runtime.encode(data.texts[: args.batch], max_length=args.max_length)
    enc = {k: v.to(device) for k, v in enc.items()}
    model = runtime.model

    with torch.no_grad():
        t_base = _median_time(lambda: model(**enc), device, args.repeats)
        with runtime.apply(tasks, coefficients=coefficients, head=False):
            t_runtime = _median_time(lambda: model(**enc), device, args.repeats)
            logits_runtime = model(**enc).logits
        build = functools.partial(dense_weights, model, tasks, coefficients)
        t_build = _median_time(build, device, max(3, args.repeats // 2))
        dense = dense_weights(model, tasks, coefficients)
        call = torch.func.functional_call
        t_dense = _median_time(lambda: call(model, dense, args=(), kwargs=enc), device, args.repeats)
        logits_dense = call(model, dense, args=(), kwargs=enc).logits
    return {
        "t_base_s": t_base, "t_runtime_s": t_runtime, "t_dense_s": t_dense, "t_dense_build_s": t_build,
        "max_abs_diff_logits": float((logits_runtime - logits_dense).abs().max()),
        "batch": int(enc["input_ids"].shape[0]), "seq_len": int(enc["input_ids"].shape[1]),
        "adapters": len(tasks),
    }


def qwen_config(layers: int, vocab: int):
    from transformers import Qwen2Config

    return Qwen2Config(hidden_size=896, num_hidden_layers=layers, num_attention_heads=14, num_key_value_heads=2,
                       intermediate_size=4864, vocab_size=vocab, max_position_embeddings=512,
                       tie_word_embeddings=True)


def random_updates(model: torch.nn.Module, n_tasks: int, r: int, layers: int, device, seed: int = 0) -> list:
    """``n_tasks`` random LoRA updates of rank ``r`` on every q, k, v, o, gate, up, down (scale 2)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    tasks = []
    for t in range(n_tasks):
        updates = {}
        for layer in range(layers):
            for sub in QWEN_KINDS.values():
                path = f"model.layers.{layer}.{sub}"
                m, n = model.get_submodule(path).weight.shape
                if device.type == "meta":
                    B, A = torch.empty(m, r, device="meta"), torch.empty(r, n, device="meta")
                else:
                    B = (torch.randn(m, r, generator=g) / r).to(device)
                    A = (torch.randn(r, n, generator=g) / n**0.5).to(device)
                updates[path] = (B, A, 2.0)
        tasks.append(LoraUpdates("qwen-shaped", updates, name=f"t{t}", task_type="CAUSAL_LM"))
    return tasks


def memory_counted(args: argparse.Namespace) -> dict:
    """Bytes of the update path of each approach, by running both on meta tensors."""
    from transformers import AutoModelForCausalLM

    layers = 2 if args.quick else args.qwen_layers
    with torch.device("meta"), quiet():
        model = AutoModelForCausalLM.from_config(qwen_config(layers, args.vocab))
    tasks = random_updates(model, args.tasks, args.r, layers, torch.device("meta"))
    coefficients = [1.0 / args.tasks] * args.tasks
    with Runtime(model).apply(tasks, coefficients=coefficients) as applied:
        runtime_bytes = applied.nbytes()
    dense = dense_weights(model, tasks, coefficients)
    dense_bytes = sum(w.numel() * w.element_size() for w in dense.values())
    base_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"runtime_bytes": runtime_bytes, "dense_bytes": dense_bytes, "base_bytes": base_bytes,
            "qwen_layers": layers, "vocab": args.vocab, "r": args.r, "memory_adapters": args.tasks}


def memory_cuda(args: argparse.Namespace, device: torch.device) -> dict:
    """Peak CUDA memory above the resident model for one forward with each approach (build included)."""
    from transformers import AutoModelForCausalLM

    layers = 2 if args.quick else args.qwen_layers
    torch.manual_seed(0)
    with torch.device(device), quiet():
        model = AutoModelForCausalLM.from_config(qwen_config(layers, args.vocab)).eval()
    runtime = Runtime(model)
    tasks = random_updates(model, args.tasks, args.r, layers, device)
    coefficients = [1.0 / args.tasks] * args.tasks
    ids = torch.randint(0, args.vocab, (args.batch, args.max_length), device=device)
    out = {}
    with torch.no_grad():
        for name in ("base", "runtime", "dense"):
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            resident = torch.cuda.memory_allocated()
            if name == "base":
                model(input_ids=ids)
            elif name == "runtime":
                with runtime.apply(tasks, coefficients=coefficients):
                    logits_runtime = model(input_ids=ids).logits.float()
            else:
                dense = dense_weights(model, tasks, coefficients)
                call = torch.func.functional_call
                logits_dense = call(model, dense, args=(), kwargs={"input_ids": ids}).logits
                del dense
            torch.cuda.synchronize()
            out[f"cuda_peak_{name}_bytes"] = torch.cuda.max_memory_allocated() - resident
    out["cuda_max_abs_diff_logits"] = float((logits_runtime - logits_dense.float()).abs().max())
    out["cuda_memory_vs_dense"] = ((out["cuda_peak_runtime_bytes"] - out["cuda_peak_base_bytes"])
                                   / max(out["cuda_peak_dense_bytes"] - out["cuda_peak_base_bytes"], 1))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: batch 8, 3 repeats, 2 Qwen layers")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads (default: all)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--batch", type=int, default=64, help="sentences per forward (default 64)")
    parser.add_argument("--max-length", type=int, default=64, help="token limit (default 64)")
    parser.add_argument("--repeats", type=int, default=9, help="timed runs, median reported (default 9)")
    parser.add_argument("--qwen-layers", type=int, default=24, help="layers of the Qwen-shaped model (default 24)")
    parser.add_argument("--vocab", type=int, default=32000,
                        help="vocabulary of the Qwen-shaped model (default 32000, instead of 151936)")
    parser.add_argument("--tasks", type=int, default=8, help="adapters of the memory model (default 8)")
    parser.add_argument("--r", type=int, default=16, help="LoRA rank of the memory model (default 16)")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.repeats = min(args.batch, 8), min(args.repeats, 3)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    timing = time_sample_base(args, device)
    print(f"sample base all-MiniLM-L6-v2, {timing['adapters']} adapters, batch {timing['batch']} x "
          f"{timing['seq_len']} tokens, {device}, {args.threads} threads, median of {args.repeats}")
    for name in ("base", "runtime", "dense", "dense_build"):
        print(f"  {name:<12} {1e3 * timing[f't_{name}_s']:9.2f} ms")
    result = {
        "overhead_vs_base": timing["t_runtime_s"] / timing["t_base_s"],
        "time_vs_dense": timing["t_runtime_s"] / timing["t_dense_s"],
        "time_vs_dense_with_build": timing["t_runtime_s"] / (timing["t_dense_s"] + timing["t_dense_build_s"]),
    }
    print(f"  runtime / base {result['overhead_vs_base']:.3f}   runtime / dense {result['time_vs_dense']:.3f}   "
          f"runtime / (dense + build) {result['time_vs_dense_with_build']:.3f}   "
          f"max |logits diff| {timing['max_abs_diff_logits']:.2e}")

    memory = memory_counted(args)
    result["memory_vs_dense"] = memory["runtime_bytes"] / memory["dense_bytes"]
    print(f"Qwen2.5-0.5B-shaped ({memory['qwen_layers']} layers, vocab {memory['vocab']}), {memory['memory_adapters']} "
          f"adapters r={memory['r']} on q,k,v,o,gate,up,down: update path runtime "
          f"{memory['runtime_bytes'] / 2**20:.1f} MiB vs dense {memory['dense_bytes'] / 2**20:.1f} MiB "
          f"(ratio {result['memory_vs_dense']:.3f}; base weights {memory['base_bytes'] / 2**20:.1f} MiB)")
    extra = {}
    if device.type == "cuda":
        extra = memory_cuda(args, device)
        print(f"  CUDA peak above the model, one forward: base {extra['cuda_peak_base_bytes'] / 2**20:.1f} MiB, "
              f"runtime {extra['cuda_peak_runtime_bytes'] / 2**20:.1f} MiB, dense (with build) "
              f"{extra['cuda_peak_dense_bytes'] / 2**20:.1f} MiB; update-path ratio "
              f"{extra['cuda_memory_vs_dense']:.3f}")
    print(json.dumps({**result, **timing, **memory, **extra, "device": str(device), "threads": args.threads,
                      "quick": args.quick}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
