"""geometry.evaluate: ROUGE-L, scores, update application (against peft itself), the causal-LM path, CLI."""

from __future__ import annotations

import itertools
import json
import random

import numpy as np
import pytest
import torch

from geometry.cli import main
from geometry.errors import AtlasError
from geometry.evaluation.evaluate import evaluate
from geometry.evaluation.metrics import classification_scores, lcs_length, rouge_l
from geometry.runtime import LoraUpdates, adapter_updates, apply_updates, build_classifier
from geometry.runtime.base_models import MINILM, resolve_base


# ------------------------------------------------------------------------------------------- ROUGE-L
@pytest.mark.parametrize(
    "cand, ref, expected",
    [
        ("the cat sat on the mat", "The cat sat on the mat.", 1.0),
        ("the cat was on the mat", "the cat sat on the mat", 5 / 6),  # LCS: the cat on the mat
        ("police killed the gunman", "the gunman killed police", 0.5),  # LCS: the gunman
        ("A B C D", "a x c", 2 * 0.5 * (2 / 3) / (0.5 + 2 / 3)),  # LCS: a c
        ("", "anything", 0.0),
        ("no overlap here", "completely different words", 0.0),
    ],
)
def test_rouge_l_hand_checked(cand, ref, expected):
    assert rouge_l(cand, ref) == pytest.approx(expected)


def _lcs_brute(a, b):
    for k in range(min(len(a), len(b)), 0, -1):
        subs = set(itertools.combinations(b, k))
        if any(c in subs for c in itertools.combinations(a, k)):
            return k
    return 0


def test_lcs_matches_brute_force():
    rng = random.Random(0)
    for _ in range(60):
        a = [rng.choice("abcd") for _ in range(rng.randrange(0, 7))]
        b = [rng.choice("abcd") for _ in range(rng.randrange(0, 7))]
        assert lcs_length(a, b) == _lcs_brute(a, b) == lcs_length(b, a)


def test_classification_scores_match_sklearn():
    from sklearn.metrics import accuracy_score, f1_score

    rng = np.random.default_rng(0)
    for _ in range(20):
        y = rng.integers(0, 4, size=50)
        p = np.where(rng.random(50) < 0.6, y, rng.integers(0, 3, size=50))  # class 3 never predicted
        got = classification_scores(p, y)
        assert got["accuracy"] == pytest.approx(accuracy_score(y, p))
        assert got["macro_f1"] == pytest.approx(f1_score(y, p, average="macro"))


# ------------------------------------------------------------------------------------------- tiny models
@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tok")
    AutoTokenizer.from_pretrained(resolve_base(MINILM)).save_pretrained(folder)
    return folder


def _tiny_base(folder, tokenizer_dir, kind):
    import shutil

    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        BertConfig,
        GPT2Config,
        LlamaConfig,
    )

    torch.manual_seed(0)
    vocab = 30522
    if kind == "bert":
        cfg = BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, num_labels=3)
        model = AutoModelForSequenceClassification.from_config(cfg)
    elif kind == "gpt2":
        cfg = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, num_labels=3, pad_token_id=0)
        model = AutoModelForSequenceClassification.from_config(cfg)
    else:
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=2, pad_token_id=0, bos_token_id=101,
                          eos_token_id=102, tie_word_embeddings=False)
        model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(folder)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, folder / f.name)
    return folder


def _peft_folder(base_dir, folder, kind):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(1)
    if kind == "llama":
        model = AutoModelForCausalLM.from_pretrained(base_dir)
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                         init_lora_weights=False)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=3)
        targets = ["query", "value"] if kind == "bert" else ["c_attn"]
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="SEQ_CLS", init_lora_weights=False,
                         fan_in_fan_out=(kind == "gpt2"))
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():  # a trained-looking head, different from the base's random one
        for name, p in peft_model.named_parameters():
            if "modules_to_save" in name:
                p.normal_(0, 0.5)
    peft_model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer_dir):
    out = {}
    for kind in ("bert", "gpt2", "llama"):
        base = _tiny_base(tmp_path_factory.mktemp(f"{kind}_base"), tokenizer_dir, kind)
        out[kind] = (base, _peft_folder(base, tmp_path_factory.mktemp(f"{kind}_lora"), kind))
    return out


def _peft_logits(base, folder, ids):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base, num_labels=3), folder)
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_adapter_updates_reproduce_peft(tiny, kind):
    """Writing an Adapter's factors into a fresh base (W0 + s B A, Conv1D transposed, fused c_attn parts
    put back by rows) gives the logits of PeftModel.from_pretrained."""
    from geometry.io.loader import load_adapter

    base, folder = tiny[kind]
    ids = torch.randint(1000, 2000, (3, 7))
    adapter = load_adapter(folder)
    updates = adapter_updates(adapter)
    model = build_classifier(str(base), updates.updates, updates.head)
    with torch.no_grad():
        ours = model(input_ids=ids).logits
    reference = _peft_logits(base, folder, ids)
    assert torch.allclose(ours, reference, atol=1e-5), (ours, reference)
    plain = build_classifier(str(base), {}, updates.head)  # the updates matter: not just the head
    with torch.no_grad():
        assert not torch.allclose(plain(input_ids=ids).logits, reference, atol=1e-3)


def test_apply_updates_factored_and_dense(tiny):
    from transformers import AutoModelForSequenceClassification

    base, _ = tiny["bert"]
    name = "base_model.model.bert.encoder.layer.1.attention.self.value"
    B, A = torch.randn(32, 3, dtype=torch.float64), torch.randn(3, 32, dtype=torch.float64)
    m1 = AutoModelForSequenceClassification.from_pretrained(base, num_labels=3)
    w0 = m1.bert.encoder.layer[1].attention.self.value.weight.detach().clone()
    apply_updates(m1, {name: (B, A, 0.5)})
    m2 = apply_updates(AutoModelForSequenceClassification.from_pretrained(base, num_labels=3),
                       {name.removeprefix("base_model.model."): 0.5 * B @ A})
    expected = (w0.double() + 0.5 * B @ A).float()
    assert torch.allclose(m1.bert.encoder.layer[1].attention.self.value.weight, expected, atol=1e-6)
    assert torch.equal(m1.bert.encoder.layer[1].attention.self.value.weight,
                       m2.bert.encoder.layer[1].attention.self.value.weight)
    with pytest.raises(AtlasError, match=r"shape \(32, 31\)"):
        apply_updates(m1, {name: torch.zeros(32, 31)})
    with pytest.raises(AtlasError, match="no module"):
        apply_updates(m1, {"bert.encoder.layer.9.attention.self.value": torch.zeros(32, 32)})
    with pytest.raises(AtlasError, match="classifier.weight"):
        apply_updates(m1, {}, {"classifier.weight": torch.zeros(5, 32)})


def _write_task(folder, n=12, pair=False):
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    words = ["red", "green", "blue", "cat", "dog", "runs", "sleeps", "the", "a", "big"]
    with open(folder / "test.jsonl", "w") as fh:
        for i in range(n):
            row = {"text": " ".join(rng.choice(words) for _ in range(rng.randrange(2, 9))), "label": i % 3}
            if pair:
                row["text_pair"] = " ".join(rng.choice(words) for _ in range(3))
            fh.write(json.dumps(row) + "\n")
    (folder / "labels.json").write_text(json.dumps({"task": "toy", "labels": ["a", "b", "c"]}))
    return folder


def test_evaluate_folder_adapter_and_updates_agree(tiny, tmp_path):
    from geometry.io.loader import load_adapter

    base, folder = tiny["bert"]
    task = _write_task(tmp_path / "toy", pair=True)
    by_folder = evaluate(folder, task, batch_size=5)
    by_adapter = evaluate(load_adapter(folder), task)
    ups = adapter_updates(load_adapter(folder))
    by_updates = evaluate(LoraUpdates(str(base), ups.updates, ups.head), task)
    assert by_folder["n"] == 12 and by_folder["task"] == "toy" and by_folder["split"] == "test"
    assert by_folder == by_adapter == by_updates


def test_evaluate_cache_and_limit(tiny, tmp_path, monkeypatch):
    """Scores are kept only in a cache that is given, and read back from it."""
    import geometry.evaluation.evaluate as ev
    from geometry.cache import ResultCache

    monkeypatch.chdir(tmp_path)
    _, folder = tiny["bert"]
    task = _write_task(tmp_path / "toy")
    before = sorted(tmp_path.rglob("*"))
    first = evaluate(folder, task, limit=6)
    assert first["n"] == 6 and sorted(tmp_path.rglob("*")) == before  # no cache: nothing written
    cache = ResultCache(tmp_path / "cache")
    assert evaluate(folder, task, limit=6, cache=cache) == first and len(cache) == 1
    calls = []
    real = ev._evaluate
    monkeypatch.setattr(ev, "_evaluate", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert evaluate(folder, task, limit=6, cache=cache) == first and calls == []  # read back
    assert evaluate(folder, task, limit=5, cache=cache)["n"] == 5 and calls == [1] and len(cache) == 2
    assert evaluate(folder, task, limit=6, cache=tmp_path / "cache") == first and calls == [1]  # a folder path


def test_generation_rouge_l_on_tiny_causal_lm(tiny, tmp_path):
    """Batched greedy generation (left padding) scores ROUGE-L 1.0 against the model's own
    one-prompt-at-a-time generations, and a fixed wrong reference scores what rouge_l says."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, folder = tiny["llama"]
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["task_type"] == "CAUSAL_LM"
    tok = AutoTokenizer.from_pretrained(base)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder).eval()
    prompts = ["the cat", "a big red dog runs", "green", "the blue cat sleeps on a mat"]
    refs = []
    for p in prompts:
        enc = tok(p, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**{k: enc[k] for k in ("input_ids", "attention_mask")}, max_new_tokens=6,
                                 do_sample=False, pad_token_id=0)
        refs.append(tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    assert any(r.strip() for r in refs)
    data = tmp_path / "gen.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "reference": r}) + "\n" for p, r in zip(prompts, refs)))
    result = evaluate(folder, data, max_new_tokens=6, batch_size=4)
    assert result == {"exact_match": pytest.approx(1.0), "rouge_1": pytest.approx(1.0),
                      "rouge_l": pytest.approx(1.0), "metric": "rouge_l", "n": 4, "task": "gen",
                      "split": "gen"}
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text("".join(json.dumps({"prompt": p, "reference": "alpha beta " + r}) + "\n"
                             for p, r in zip(prompts, refs)))
    expected = np.mean([rouge_l(r, "alpha beta " + r) for r in refs])
    assert evaluate(folder, wrong, max_new_tokens=6)["rouge_l"] == pytest.approx(expected)


def test_cli_evaluate(tiny, tmp_path, capsys, isolated_cache, monkeypatch):
    from geometry.cli import default_cache_dir

    _, folder = tiny["bert"]
    task = _write_task(tmp_path / "toy")
    assert main(["evaluate", str(folder), "--task", str(task), "--limit", "5", "--format", "csv", "--no-cache"]) == 0
    header, values = capsys.readouterr().out.strip().splitlines()
    assert header.split(",") == ["adapter", "accuracy", "macro_f1", "n", "task", "split"]
    assert values.split(",")[3:] == ["5", "toy", "test"]
    assert not isolated_cache.exists()  # --no-cache: nothing written
    # the CLI's own choice: a disk cache, --cache DIR, else $ADAPTER_ATLAS_CACHE, else ~/.cache/adapter-atlas
    assert main(["evaluate", str(folder), "--task", str(task), "--limit", "5", "--cache", str(tmp_path / "mine")]) == 0
    assert (tmp_path / "mine" / "store" / "cache.db").is_file() and not isolated_cache.exists()
    assert main(["evaluate", str(folder), "--task", str(task), "--limit", "5"]) == 0
    assert (isolated_cache / "store" / "cache.db").is_file()
    capsys.readouterr()
    monkeypatch.delenv("ADAPTER_ATLAS_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == str(tmp_path / "home" / ".cache" / "adapter-atlas")
    assert main(["evaluate", str(tmp_path / "missing"), "--task", str(task)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "adapter_config.json" in err and err.count("\n") == 1
    assert main(["evaluate", str(folder), "--task", str(tmp_path / "nope.jsonl")]) == 2
    assert "nope.jsonl" in capsys.readouterr().err
