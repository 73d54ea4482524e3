"""Build the causal sample set's task folders: ``python -m sample_adapters.causaldata``.

Eight tasks for SmolLM2-135M-Instruct, every example a chat prompt whose answer the model generates
(the DivMerge paper's setup: classification cast as generation, the model emits the label word):

* **classification as generation** (scored by exact match of the generated label word): SST-2, CoLA, MRPC,
  RTE, QNLI, taken from the real set's committed subsets (``sample_adapters/real/tasks``: sources, licences
  and the no-overlap rule in its ``DATA.md``), the first rows of each split;
* **generation** (scored by ROUGE-1 / ROUGE-L and exact match): BoolQ (``true`` / ``false``), ARC-Easy and
  OpenBookQA, from LLM-Adapters' instruction files in ``../shared/datasets/llm-adapters`` (code Apache-2.0,
  data ODC-By). The ARC and OpenBookQA answer is the *text* of the right choice (``"a bacterial population
  in the bloodstream"``), not its number, so that ROUGE measures something and exact match is strict.
  Chosen because their training splits are here (BIG-Bench Hard has none), their answers are short (exact
  match applies) and a 135M model can learn them in a few hundred CPU steps; GSM8K's final answer needs
  multi-step arithmetic that such a run does not teach (left out, not tried).

Each folder has ``{train,validation,test}.jsonl`` rows ``{"prompt", "reference"}`` (plus the integer
``label`` for the classification tasks) and ``labels.json`` (``kind: generation``, the ``metric``, the label
words, ``max_new_tokens``, the sources). The prompt is the full chat-template text (system, user,
assistant header) of SmolLM2-Instruct: what the model reads, nothing added at run time. Test splits have
300 rows (RTE 277: all its labelled held-out data), validation 200, train at most 2,000. Text fields are cut
at :data:`MAX_CHARS` characters (at a word boundary) to keep sequences short on CPU.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "smollm2" / "tasks"
REAL = ROOT / "real" / "tasks"
SHARED = ROOT.parent.parent / "shared" / "datasets"
LLM_ADAPTERS = SHARED / "llm-adapters" / "dataset"
SEED = 0
MAX_TRAIN, VALIDATION_SIZE, TEST_SIZE = 2000, 200, 300
MAX_CHARS = 400
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

#: classification tasks: (question, field labels, label words by label index)
CLASSIFICATION = {
    "sst2": ("Is the sentiment of this movie review positive or negative?", ("Review",),
             ["negative", "positive"]),
    "cola": ("Is this English sentence grammatically acceptable?", ("Sentence",), ["unacceptable", "acceptable"]),
    "mrpc": ("Do these two sentences mean the same thing?", ("Sentence 1", "Sentence 2"), ["no", "yes"]),
    "rte": ("Does the text entail the hypothesis?", ("Text", "Hypothesis"), ["yes", "no"]),
    "qnli": ("Does the sentence contain the answer to the question?", ("Question", "Sentence"), ["yes", "no"]),
}
#: generation tasks: folder in llm-adapters, max new tokens
GENERATION = {"boolq": ("boolq", 4), "arc_easy": ("ARC-Easy", 32), "openbookqa": ("openbookqa", 32)}
TASKS = [*CLASSIFICATION, *GENERATION]


def chat(user: str) -> str:
    """SmolLM2-Instruct's chat template around one user message, ready for the assistant's answer."""
    return (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
            f"<|im_start|>assistant\n")


def cut(text: str, limit: int = MAX_CHARS) -> str:
    """``text`` cut at ``limit`` characters, at a word boundary, with an ellipsis when cut."""
    text = " ".join(str(text).split())
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0] + " ..."


def _classification_rows(task: str, split: str, n: int) -> list[dict]:
    question, fields, words = CLASSIFICATION[task]
    rows = [json.loads(line) for line in (REAL / task / f"{split}.jsonl").read_text().splitlines() if line.strip()]
    out = []
    for row in rows[:n]:
        values = [row["text"]] + ([row["text_pair"]] if len(fields) == 2 else [])
        body = "\n".join(f"{f}: {cut(v)}" for f, v in zip(fields, values))
        user = f"{question}\n\n{body}\n\nAnswer with one word: {' or '.join(sorted(set(words)))}."
        out.append({"prompt": chat(user), "reference": words[row["label"]], "label": int(row["label"])})
    return out


_CHOICE = re.compile(r"Answer(\d+):\s*")


def _parse_choice_question(instruction: str) -> tuple[str, list[str]]:
    """LLM-Adapters' ``Please choose the correct answer to the question: Q\\n\\nAnswer1: a Answer2: b ...``."""
    head, _, rest = instruction.partition("\n\n")
    question = head.split("question:", 1)[-1].strip()
    rest = rest.split("\n\nAnswer format:")[0]
    parts = _CHOICE.split(rest)[1:]
    choices = [parts[i + 1].strip() for i in range(0, len(parts), 2)]
    return question, choices


def _generation_row(task: str, item: dict) -> dict | None:
    if task == "boolq":
        question = item["instruction"].split("question:", 1)[-1].split("\n\nAnswer format")[0].strip()
        user = f"Answer the question with true or false.\n\nQuestion: {cut(question)}"
        return {"prompt": chat(user), "reference": item["answer"].strip().lower()}
    question, choices = _parse_choice_question(item["instruction"])
    m = re.fullmatch(r"answer(\d+)", item["answer"].strip().lower())
    if not choices or m is None or not 1 <= int(m.group(1)) <= len(choices):
        return None
    listed = "\n".join(f"- {c}" for c in choices)
    user = f"{cut(question)}\n\nChoices:\n{listed}\n\nAnswer with the text of the correct choice."
    return {"prompt": chat(user), "reference": choices[int(m.group(1)) - 1]}


def _key(row: dict) -> str:
    return " ".join(row["prompt"].lower().split())


def _generation_splits(task: str) -> dict[str, list[dict]]:
    folder, _ = GENERATION[task]
    rng = random.Random(SEED)
    test_items = json.loads((LLM_ADAPTERS / folder / "test.json").read_text())
    train_items = json.loads((LLM_ADAPTERS / folder / "train.json").read_text())
    rng.shuffle(test_items)
    rng.shuffle(train_items)
    test = [r for r in map(lambda i: _generation_row(task, i), test_items) if r][:TEST_SIZE]
    seen = {_key(r) for r in test}
    rest = []
    for r in map(lambda i: _generation_row(task, i), train_items):
        if r and _key(r) not in seen:
            seen.add(_key(r))
            rest.append(r)
    return {"test": test, "validation": rest[:VALIDATION_SIZE], "train": rest[VALIDATION_SIZE:VALIDATION_SIZE + MAX_TRAIN]}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build(out: Path = OUT) -> dict[str, dict]:
    """Write every task folder under ``out``; the ``labels.json`` of each, by task."""
    metas = {}
    for task in TASKS:
        folder = out / task
        folder.mkdir(parents=True, exist_ok=True)
        if task in CLASSIFICATION:
            sizes = {"train": MAX_TRAIN, "validation": VALIDATION_SIZE, "test": TEST_SIZE}
            splits = {s: _classification_rows(task, s, n) for s, n in sizes.items()}
            real_meta = json.loads((REAL / task / "labels.json").read_text())
            words = CLASSIFICATION[task][2]
            meta = {"task": task, "kind": "generation", "metric": "exact_match", "labels": words,
                    "max_new_tokens": 4, "description": f"{real_meta.get('description', task)} (label word generated)",
                    "sources": {f"sample_adapters/real/tasks/{task}/{s}.jsonl": {"sha256": _sha(REAL / task / f"{s}.jsonl"),
                                                                                  "rows": f"the first {len(splits[s])}"}
                                for s in splits},
                    "original_sources": real_meta.get("sources", {})}
        else:
            splits = _generation_splits(task)
            src, max_new = GENERATION[task]
            meta = {"task": task, "kind": "generation", "metric": "rouge_1", "also": ["exact_match", "rouge_l"],
                    "max_new_tokens": max_new,
                    "description": {"boolq": "BoolQ questions (no passage, as LLM-Adapters ships them): true or false",
                                    "arc_easy": "ARC-Easy: generate the text of the correct choice",
                                    "openbookqa": "OpenBookQA: generate the text of the correct choice"}[task],
                    "splits": "test: a seeded sample of the source test file; validation and train: a seeded "
                              "sample of the source train file, rows whose prompt equals a test prompt dropped",
                    "sources": {f"llm-adapters/dataset/{src}/{f}.json": {
                        "repo": "AGI-Edgerunners/LLM-Adapters", "commit": "81665720", "path": f"dataset/{src}/{f}.json",
                        "licence": "code Apache-2.0, data ODC-By", "sha256": _sha(LLM_ADAPTERS / src / f"{f}.json")}
                        for f in ("train", "test")}}
        meta["sizes"] = {s: len(r) for s, r in splits.items()}
        meta["seed"] = SEED
        meta["generator"] = "python -m sample_adapters.causaldata"
        for split, rows in splits.items():
            (folder / f"{split}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        (folder / "labels.json").write_text(json.dumps(meta, indent=1) + "\n")
        metas[task] = meta
    return metas


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sample_adapters.causaldata", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    for task, meta in build(args.out).items():
        print(task, meta["sizes"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
