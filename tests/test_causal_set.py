"""The causal sample set (SmolLM2-135M-Instruct): its task folders, its scores, its training loss, its results file.

Nothing here loads the 135M model: the training and scoring code paths are checked with a character tokenizer
and a tiny random-weight Llama, the committed folders with the project's own task loader.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from geometry.evaluation.metrics import exact_match, normalize_answer
from geometry.evaluation.tasks import GENERATION_METRICS, TaskLoadError, load_task, task_metric
from sample_adapters import causal, causaldata

ROOT = Path(__file__).resolve().parents[1] / "sample_adapters" / "smollm2"
TASKS = ROOT / "tasks"


@pytest.mark.parametrize("task", causaldata.TASKS)
def test_committed_task_folders_load_as_generation_tasks_with_their_metric(task):
    meta = json.loads((TASKS / task / "labels.json").read_text())
    seen: dict[str, set[str]] = {}
    for split in ("train", "validation", "test"):
        data = load_task(TASKS / task, split)
        assert data.kind == "generation" and len(data) == meta["sizes"][split]
        assert data.metric == meta["metric"] and data.metric in GENERATION_METRICS
        assert data.max_new_tokens == meta["max_new_tokens"]
        assert all(p.startswith("<|im_start|>system\n") and p.endswith("<|im_start|>assistant\n") for p in data.texts)
        assert all(r.strip() for r in data.references)
        seen[split] = {" ".join(p.lower().split()) for p in data.texts}
    # no prompt of the test split is trained on or used to validate
    assert not seen["test"] & seen["train"] and not seen["test"] & seen["validation"]
    if task in causaldata.CLASSIFICATION:
        words = set(causaldata.CLASSIFICATION[task][2])
        test = load_task(TASKS / task, "test")
        assert set(test.references) == words  # every label word occurs in the test split
        assert task_metric(TASKS / task) == "exact_match"
    else:
        assert task_metric(TASKS / task) == "rouge_1"
    assert meta["sizes"]["test"] >= (277 if task == "rte" else 300)


def test_classification_prompts_keep_the_real_sets_rows_and_labels():
    real = [json.loads(x) for x in (causaldata.REAL / "mrpc" / "test.jsonl").read_text().splitlines()[:20]]
    ours = [json.loads(x) for x in (TASKS / "mrpc" / "test.jsonl").read_text().splitlines()[:20]]
    words = causaldata.CLASSIFICATION["mrpc"][2]
    for r, o in zip(real, ours, strict=True):
        assert o["label"] == r["label"] and o["reference"] == words[r["label"]]
        assert causaldata.cut(r["text"]) in o["prompt"] and causaldata.cut(r["text_pair"]) in o["prompt"]


def test_the_choice_parser_reads_llm_adapters_instructions():
    text = ("Please choose the correct answer to the question: Which is a gas?\n\nAnswer1: ice Answer2: steam "
            "Answer3: a rock Answer4: wood\n\nAnswer format: answer1/answer2/answer3/answer4")
    question, choices = causaldata._parse_choice_question(text)
    assert question == "Which is a gas?" and choices == ["ice", "steam", "a rock", "wood"]
    row = causaldata._generation_row("arc_easy", {"instruction": text, "answer": "answer2"})
    assert row["reference"] == "steam" and "- a rock\n" in row["prompt"]
    assert causaldata._generation_row("arc_easy", {"instruction": text, "answer": "answer7"}) is None


def test_rebuilding_from_shared_gives_the_committed_bytes(tmp_path):
    if not (causaldata.LLM_ADAPTERS / "boolq" / "train.json").is_file():
        pytest.skip("../shared/datasets/llm-adapters is not on this machine")
    causaldata.build(tmp_path)
    for file in sorted(TASKS.rglob("*.jsonl")) + sorted(TASKS.rglob("labels.json")):
        rebuilt = tmp_path / file.relative_to(TASKS)
        assert hashlib.sha256(rebuilt.read_bytes()).digest() == hashlib.sha256(file.read_bytes()).digest(), file


def test_exact_match_normalizes_case_space_quotes_and_final_punctuation():
    assert exact_match("Positive.", "positive") == 1.0
    assert exact_match('  "Yes"  ', "yes") == 1.0
    assert exact_match("It is positive", "positive") == 0.0
    assert exact_match("a bacterial  population in the Bloodstream!", "a bacterial population in the bloodstream") == 1.0
    assert normalize_answer("") == ""


def test_a_generation_task_names_an_unknown_metric(tmp_path):
    (tmp_path / "test.jsonl").write_text(json.dumps({"prompt": "p", "reference": "r"}) + "\n")
    (tmp_path / "labels.json").write_text(json.dumps({"metric": "bleu"}))
    with pytest.raises(TaskLoadError, match="labels.json: metric 'bleu'"):
        load_task(tmp_path)
    (tmp_path / "labels.json").write_text(json.dumps({"metric": "exact_match", "max_new_tokens": 0}))
    with pytest.raises(TaskLoadError, match="max_new_tokens must be a positive integer"):
        load_task(tmp_path)


class _CharTokenizer:
    """One token per character (ids = code points), pad 0: enough to check positions."""

    pad_token_id = 0
    eos_token_id = 1

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 500 + 2 for c in text]}


def test_encode_batch_marks_exactly_the_positions_that_predict_the_answer():
    tok = _CharTokenizer()
    ids, mask, pos, targets = causal.encode_batch(tok, ["ab", "wxyz"], ["c", "de"], max_length=64)
    end = tok(causal.END)["input_ids"]
    rows = [tok("ab")["input_ids"] + tok("c")["input_ids"] + end, tok("wxyz")["input_ids"] + tok("de")["input_ids"] + end]
    assert ids.shape == (2, max(map(len, rows))) and mask.sum(1).tolist() == [len(r) for r in rows]
    for b, row in enumerate(rows):
        picked = [(int(p[1]), int(t)) for p, t in zip(pos, targets) if int(p[0]) == b]
        # position k predicts token k + 1: the answer's tokens and <|im_end|>, nothing of the prompt
        assert [t for _, t in picked] == row[len(row) - len(picked):]
        assert all(ids[b, k + 1] == t for k, t in picked)
        assert len(picked) == len(row) - (2 if b == 0 else 4)
    # a long prompt is cut from the left, the answer kept whole
    ids, mask, pos, targets = causal.encode_batch(tok, ["x" * 100], ["yes"], max_length=20)
    assert ids.shape[1] == 20 and targets.tolist() == tok("yes" + causal.END)["input_ids"]


def test_answer_loss_equals_the_cross_entropy_of_the_full_logits():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=600, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    ids, mask, pos, targets = causal.encode_batch(_CharTokenizer(), ["hello", "hi there"], ["yes", "no"])
    ours = causal.answer_loss(model, ids, mask, pos, targets)
    logits = model(input_ids=ids, attention_mask=mask).logits
    full = torch.nn.functional.cross_entropy(logits[pos[:, 0], pos[:, 1]], targets)
    assert ours.item() == pytest.approx(full.item(), rel=1e-5)
    ours.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


def _fake_info(task: str, ours: float, base: float) -> dict:
    scores = {"exact_match": ours, "rouge_1": ours, "rouge_l": ours, "n": 300}
    zero = {"exact_match": base, "rouge_1": base, "rouge_l": base, "n": 300}
    return {"task": task, "steps": 200, "train_seconds": 1200.0, "seconds_per_step": 6.0,
            "scores": {"test": {"adapter": scores, "zero_shot_base": zero}}}


def test_results_file_and_overview_rows_say_which_adapter_is_not_above_zero_shot(tmp_path):
    from ui.adapter_set import training_records

    (tmp_path / "tasks").mkdir()
    for task, ours, base in (("sst2", 0.9, 0.5), ("boolq", 0.55, 0.6)):
        (tmp_path / task).mkdir()
        (tmp_path / task / "training_info.json").write_text(json.dumps(_fake_info(task, ours, base)))
        (tmp_path / "tasks" / task).mkdir()
        (tmp_path / "tasks" / task / "labels.json").write_text((TASKS / task / "labels.json").read_text())
        (tmp_path / "tasks" / task / "test.jsonl").write_text((TASKS / task / "test.jsonl").read_text())
    text = causal.results_markdown(tmp_path)
    assert "| sst2 | classification as generation | exact_match | **0.900** | 0.500 | 0.550 |" in text
    assert "Not above the zero-shot base on the test split: boolq." in text
    assert "Not trained yet: cola" in text
    records = training_records(tmp_path, ["sst2", "boolq"]).set_index("adapter")
    assert records.loc["sst2", "metric"] == "exact_match" and records.loc["boolq", "metric"] == "rouge_1"
    assert records.loc["sst2", "note"] == "" and records.loc["boolq", "note"] == "not above the zero-shot base"
