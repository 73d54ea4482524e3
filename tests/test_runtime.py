"""geometry.runtime: hooks ``h = W0 x + sum_t c_t s_t B_t (A_t x)`` against peft's merged models and dense
weights, coefficient gradients against finite differences, factored memory, the base-model cache, heads."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

from geometry import runtime as rt_mod
from geometry.errors import AtlasError
from geometry.evaluation.evaluate import evaluate
from geometry.io.loader import load_adapter
from geometry.runtime import LoraUpdates, Runtime
from geometry.runtime.model import _hidden_states
from tests.families import FAMILIES, make_peft_model, tiny_model
from tests.merge_fixtures import write_study


# ------------------------------------------------------------------------------------------- helpers
def _save(peft_model, folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.save_pretrained(str(folder))
    return load_adapter(folder)


def _adapter(family, base, folder, seed=0, perturb_head=True, **lora_kwargs):
    """An Adapter (random LoRA, a head different from the base's) and the peft model it came from."""
    pm = make_peft_model(family, seed=seed, base=copy.deepcopy(base), **lora_kwargs)
    if perturb_head:
        torch.manual_seed(100 + seed)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "modules_to_save" in name:
                    p.normal_(0, 0.5)
    return _save(pm, folder), pm


def _inputs(family, batch=2, seq=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    inputs = {"input_ids": torch.randint(1, 64, (batch, seq), generator=g)}
    if FAMILIES[family].auto == "AutoModelForSeq2SeqLM":
        inputs["decoder_input_ids"] = torch.randint(1, 64, (batch, 5), generator=g)
    return inputs


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _bit_identical(model, snap):
    state = model.state_dict()
    return state.keys() == snap.keys() and all(torch.equal(state[k], snap[k]) for k in snap)


def _assert_outputs_close(ours, ref_out, atol, rtol):
    ref_hidden = _hidden_states(ref_out)
    if ours.logits is not None:
        torch.testing.assert_close(ours.logits, ref_out.logits, atol=atol, rtol=rtol)
    assert len(ours.hidden_states) == len(ref_hidden)
    for a, b in zip(ours.hidden_states, ref_hidden):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


def _linear_map(module):
    """``(out, in)`` weight of a Linear / Conv1D / Embedding (Conv1D and embedding tables transposed)."""
    w = module.weight
    return w.T if type(module).__name__ == "Conv1D" or isinstance(module, torch.nn.Embedding) else w


def _dense_reference(base, adapters, coef):
    """A copy of ``base`` with ``W0 + sum_t c(t, layer) s_t B_t A_t`` written into each weight (test only)."""
    model = copy.deepcopy(base)
    with torch.no_grad():
        for t, ad in enumerate(adapters):
            for mod in ad.modules.values():
                module = model.get_submodule(mod.name.removeprefix("base_model.model."))
                delta = torch.zeros(_linear_map(module).shape, dtype=torch.float64)
                lo, hi = mod.rows or (0, delta.shape[0])
                delta[lo:hi] = mod.dense()
                _linear_map(module).add_((float(coef(t, mod.key.layer)) * delta).to(module.weight.dtype))
    return model.eval()


# ------------------------------------------------------------------------------------------- every family vs peft
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_outputs_equal_peft_merge_and_unload(family, dtype, tmp_path):
    """Logits and every hidden state of the hooked base equal peft's merge_and_unload() model; after exit
    the base is bit-identical and computes the base model again."""
    base = tiny_model(family).to(dtype)
    adapter, pm = _adapter(family, base, tmp_path / family)
    merged = pm.merge_and_unload().eval()
    runtime = Runtime(base)
    snap = _snapshot(base)
    inputs = _inputs(family)
    atol, rtol = (2e-5, 1e-4) if dtype == torch.float32 else (1e-11, 1e-9)
    with torch.no_grad():
        before = runtime.forward(output_hidden_states=True, **inputs)
        with runtime.apply(adapter) as applied:
            ours = runtime.forward(output_hidden_states=True, **inputs)
            assert applied.active and len(applied.deltas) == len({m.name for m in adapter.modules.values()})
        after = runtime.forward(output_hidden_states=True, **inputs)
        ref = merged(**inputs, output_hidden_states=True)
    _assert_outputs_close(ours, ref, atol, rtol)
    assert (ours.hidden_states[-1] - before.hidden_states[-1]).abs().max() > 1e-3  # the update matters
    assert _bit_identical(base, snap)
    for a, b in zip(after.hidden_states, before.hidden_states):
        assert torch.equal(a, b)
    if ours.logits is not None:
        torch.testing.assert_close(ours.probs.sum(-1), torch.ones_like(ours.probs[..., 0]))


def test_gpt2_fused_c_attn_parts_share_one_A(tmp_path):
    """GPT-2: Conv1D layers, c_attn split into q / k / v row parts over one A; the hook holds one A and
    one (3 * 32, r) B for c_attn, never the (96, 32) update."""
    base = tiny_model("gpt2")
    adapter, _ = _adapter("gpt2", base, tmp_path / "gpt2")
    parts = [m for m in adapter.modules.values() if m.name.endswith("h.0.attn.c_attn")]
    assert sorted(m.rows for m in parts) == [(0, 32), (32, 64), (64, 96)]
    with Runtime(base).apply(adapter) as applied:
        delta = applied.deltas["transformer.h.0.attn.c_attn"]
        assert delta.A is parts[0].A and tuple(delta.B.shape) == (96, 4)
        assert max(t.numel() for t in applied.tensors()) < 96 * 32


def test_embedding_lora_equals_merged_and_peft(tmp_path):
    """Embedding LoRA (lora_embedding_A (r, vocab), lora_embedding_B (dim, r)): F.embedding(ids, A^T) B^T s.
    Untied llama: equals merge_and_unload. Tied GPT-2 (wte is lm_head): equals peft's own (unmerged)
    forward, which changes the lookup only, as the runtime does."""
    base = tiny_model("llama")
    assert base.lm_head.weight is not base.model.embed_tokens.weight
    targets = FAMILIES["llama"].targets + ["embed_tokens"]
    adapter, pm = _adapter("llama", base, tmp_path / "emb", target_modules=targets)
    assert any(m.is_embedding for m in adapter.modules.values())
    inputs = _inputs("llama")
    runtime = Runtime(base)
    with torch.no_grad():
        with runtime.apply(adapter):
            ours = runtime.forward(output_hidden_states=True, **inputs)
        ref = pm.merge_and_unload().eval()(**inputs, output_hidden_states=True)
    _assert_outputs_close(ours, ref, 2e-5, 1e-4)

    gpt2 = tiny_model("gpt2")
    adapter, pm = _adapter("gpt2", gpt2, tmp_path / "wte", target_modules=["wte", "c_attn"])
    assert any(m.is_embedding for m in adapter.modules.values())
    runtime = Runtime(gpt2)
    with torch.no_grad():
        with runtime.apply(adapter):
            ours = runtime.forward(output_hidden_states=True, **inputs)
        ref = pm.eval()(**inputs, output_hidden_states=True)
    _assert_outputs_close(ours, ref, 2e-5, 1e-4)


# ------------------------------------------------------------------------------------------- several adapters
@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "t5"])
def test_coefficients_equal_dense_merged_weights(family, tmp_path):
    """Three adapters with coefficients c_t (per task, per task and layer, or a callable) equal the dense
    model W0 + sum_t c_t s_t B_t A_t (dense weights built in the test only)."""
    base = tiny_model(family)
    adapters = [_adapter(family, base, tmp_path / f"a{t}", seed=t)[0] for t in range(3)]
    inputs = _inputs(family)
    runtime = Runtime(base)
    snap = _snapshot(base)
    per_task = torch.tensor([0.5, -0.25, 1.5])
    per_layer = torch.tensor([[0.5, 1.0], [-0.25, 0.75], [1.5, -1.0]])
    cases = [
        (per_task, lambda t, layer: per_task[t]),
        (per_layer, lambda t, layer: per_layer[t, layer]),
        ([0.5, torch.tensor(-0.25), torch.tensor([1.5, 2.0])],
         lambda t, layer: [0.5, -0.25, [1.5, 2.0][layer]][t]),
        (lambda t, name, layer: 0.1 * (t + 1) + 0.01 * layer, lambda t, layer: 0.1 * (t + 1) + 0.01 * layer),
    ]
    if family == "bert":  # the pooler (layer -1) has no per-layer coefficient
        cases = [cases[0], cases[3]]
    for coefficients, coef in cases:
        with torch.no_grad():
            with runtime.apply(adapters, coefficients=coefficients, head=False):
                ours = runtime.forward(output_hidden_states=True, **inputs)
            ref = _dense_reference(base, adapters, coef)(**inputs, output_hidden_states=True)
        _assert_outputs_close(ours, ref, 2e-5, 1e-4)
    assert _bit_identical(base, snap)


def test_merges_lora_updates_and_dense_updates(tmp_path):
    """A factored merge (task arithmetic) equals the same adapters applied with coefficients; a dense merge
    (TIES, keep_dense) and a dense LoraUpdates go through the x D^T fallback and equal the written weights."""
    from geometry.merging import merge
    from geometry.runtime import apply_updates

    base = tiny_model("bert")
    adapters = [_adapter("bert", base, tmp_path / f"a{t}", seed=t)[0] for t in range(2)]
    inputs = _inputs("bert")
    runtime = Runtime(base)
    ta = merge(adapters, "task_arithmetic", [0.7, 0.3])
    with torch.no_grad():
        with runtime.apply(ta, head=adapters[0].name):
            merged_out = runtime.forward(output_hidden_states=True, **inputs)
        with runtime.apply(adapters, coefficients=[0.7, 0.3], head=adapters[0].name):
            coef_out = runtime.forward(output_hidden_states=True, **inputs)
    torch.testing.assert_close(merged_out.logits, coef_out.logits, atol=2e-5, rtol=1e-4)

    ties = merge(adapters, "ties", density=0.5, keep_dense=True)
    assert any(m.delta is not None for m in ties.modules.values())
    with torch.no_grad():
        with runtime.apply(ties, head=adapters[1].name) as applied:
            ours = runtime.forward(output_hidden_states=True, **inputs)
            assert applied.deltas and all(d.dense for d in applied.deltas.values())
        reference = apply_updates(copy.deepcopy(base), ties.updates(), ties.heads[adapters[1].name])
        ref = reference.eval()(**inputs, output_hidden_states=True)
    _assert_outputs_close(ours, ref, 2e-5, 1e-4)

    name = "bert.encoder.layer.1.attention.self.value"
    D = torch.randn(32, 32, dtype=torch.float64)
    ups = LoraUpdates("unused", {name: D, "bert.encoder.layer.0.attention.self.query":
                                 (torch.randn(32, 2), torch.randn(2, 32), 0.5)})
    with torch.no_grad():
        with runtime.apply(ups, coefficients=[2.0]):
            ours = runtime.forward(**inputs)
        reference = copy.deepcopy(base)
        for mod_name, update in ups.updates.items():  # W0 + 2 * update, written densely
            if isinstance(update, torch.Tensor):
                dense = update
            else:
                dense = update[2] * update[0].double() @ update[1].double()
            reference.get_submodule(mod_name).weight.add_(2 * dense.float())
        ref = reference.eval()(**inputs)
    torch.testing.assert_close(ours.logits, ref.logits, atol=2e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("shape", ["task", "task_layer"])
def test_coefficient_gradients_equal_finite_differences(shape, tmp_path):
    """float64 tiny GPT-2 (LayerNorm: float64 throughout, unlike RMSNorm's float32 upcast), 2 adapters:
    d loss / d c by autograd equals central differences
    (f(c + h e_i) - f(c - h e_i)) / 2h; base parameters get no gradient."""
    base = tiny_model("gpt2").double()
    adapters = [_adapter("gpt2", base, tmp_path / f"a{t}", seed=t)[0] for t in range(2)]
    runtime = Runtime(base)
    inputs = _inputs("gpt2")
    weights = torch.randn(2, 7, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    c0 = torch.tensor([0.6, -0.4], dtype=torch.float64) if shape == "task" else \
        torch.tensor([[0.6, 1.1], [-0.4, 0.3]], dtype=torch.float64)

    def loss(c):
        with runtime.apply(adapters, coefficients=c):
            out = runtime.forward(output_hidden_states=True, **inputs)
        return (out.logits * weights).sum() + 0.1 * out.hidden_states[1].pow(2).sum()

    c = c0.clone().requires_grad_(True)
    value = loss(c)
    value.backward()
    h = 1e-5
    numeric = torch.zeros_like(c0)
    with torch.no_grad():
        for i in range(c0.numel()):
            e = torch.zeros_like(c0).reshape(-1)
            e[i] = h
            e = e.reshape(c0.shape)
            numeric.reshape(-1)[i] = (loss(c0 + e) - loss(c0 - e)) / (2 * h)
    torch.testing.assert_close(c.grad, numeric, atol=1e-7, rtol=1e-6)
    assert c.grad.abs().min() > 1e-6
    assert all(p.grad is None and not p.requires_grad for p in base.parameters())
    # the same graph shape twice: coefficients are read at each forward
    c.grad = None
    loss(c).backward()
    torch.testing.assert_close(c.grad, numeric, atol=1e-7, rtol=1e-6)


# ------------------------------------------------------------------------------------------- memory
def test_memory_is_factored(tmp_path):
    """T adapters hold O(T r (m + n)) numbers: exactly A (T r, n) + B (m, T r) + the (T r,) weights per
    module, no tensor of m * n entries; the model gains no parameter and keeps its own tensors."""
    base = tiny_model("bert")
    T, r = 3, 4
    adapters = [_adapter("bert", base, tmp_path / f"a{t}", seed=t)[0] for t in range(T)]
    params_before = {id(p): p.data_ptr() for p in base.parameters()}
    with Runtime(base).apply(adapters, head=False) as applied:
        expected = 0
        for path, delta in applied.deltas.items():
            m, n = delta.B.shape[0], delta.A.shape[1]
            assert tuple(delta.A.shape) == (T * r, n) and tuple(delta.B.shape) == (m, T * r)
            assert all(t.numel() < m * n for t in delta.tensors()), path
            expected += T * r * (m + n) + T * r
        assert applied.numel() == expected
        assert {id(p): p.data_ptr() for p in base.parameters()} == params_before
        assert not applied.head_tensors()
    with Runtime(base).apply(adapters[0], head=False) as applied:  # one task: its own tensors, no copy
        mods = {m.name.removeprefix("base_model.model."): m for m in adapters[0].modules.values()}
        for path, delta in applied.deltas.items():
            assert delta.A is mods[path].A and delta.B is mods[path].B


# ------------------------------------------------------------------------------------------- cache, heads, run
@pytest.fixture(scope="module")
def study(tmp_path_factory):
    folders, tasks = write_study(tmp_path_factory.mktemp("rt") / "study", ("alpha", "beta"))
    return [load_adapter(f) for f in folders], tasks


@pytest.fixture
def fresh_cache(monkeypatch):
    """An empty runtime cache, and a count of base-model loads."""
    rt_mod.clear_cache()
    calls = []
    real = rt_mod.load_base

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(rt_mod.bases, "load_base", counting)
    yield calls
    rt_mod.clear_cache()


def test_base_loaded_once_and_left_bit_identical(study, fresh_cache):
    """Scoring two adapters, twice, and a merge loads the base once; its weights stay bit-identical and its
    own head parameters are back (same objects) after each head swap."""
    from geometry.merging import merge

    adapters, tasks = study
    first = evaluate(adapters[0], tasks / "alpha", device="cpu")
    runtime = Runtime.for_base(adapters[0].config.base_model_name_or_path, "SEQ_CLS", 2, "cpu")
    snap = _snapshot(runtime.model)
    head_param = runtime.model.classifier.weight
    assert evaluate(adapters[0], tasks / "alpha", device="cpu") == first
    evaluate(adapters[1], tasks / "beta", device="cpu")
    evaluate(merge(adapters, "task_arithmetic", [0.5, 0.5]), tasks / "beta", head=adapters[1].name, device="cpu")
    assert len(fresh_cache) == 1
    assert Runtime.for_base(adapters[1].config.base_model_name_or_path, "SEQ_CLS", 2, "cpu") is runtime
    assert _bit_identical(runtime.model, snap) and runtime.model.classifier.weight is head_param
    with runtime.apply(adapters[1]) as applied:
        assert runtime.model.classifier.weight is not head_param
        key = next(k for k in adapters[1].other_tensors if k.endswith("classifier.weight"))
        assert torch.equal(runtime.model.classifier.weight, adapters[1].other_tensors[key])
        assert sum(t.numel() for t in applied.head_tensors()) == 2 * 32 + 2
    assert runtime.model.classifier.weight is head_param and _bit_identical(runtime.model, snap)


def test_runtime_scores_equal_the_peft_reference(study, fresh_cache):
    """evaluate(Adapter) through the runtime equals evaluate(folder) through PeftModel, task by task."""
    adapters, tasks = study
    for ad, task in zip(adapters, ("alpha", "beta")):
        assert evaluate(ad, tasks / task, device="cpu") == \
            evaluate(ad.source, tasks / task, device="cpu")


def test_run_batches_and_hidden_states(study, fresh_cache):
    """run() tokenises, batches and concatenates in input order: equal to one forward of the whole batch."""
    adapters, _ = study
    runtime = Runtime.for_sources(adapters[0], device="cpu")
    texts = ["good red cat", "a big dog under the rain", "sun", "small blue dog runs", "bad"]
    with torch.no_grad(), runtime.apply(adapters[0]):
        batched = runtime.run(texts, batch_size=2, output_hidden_states=True)
        whole = runtime.forward(output_hidden_states=True, **runtime.encode(texts))
    torch.testing.assert_close(batched.logits, whole.logits, atol=1e-5, rtol=1e-4)
    assert len(batched.hidden_states) == 4 and batched.hidden_states[0].shape[:2] == batched.attention_mask.shape
    for a, b in zip(batched.hidden_states, whole.hidden_states):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(batched.probs.sum(-1), torch.ones(len(texts)))


def test_heads_choice_and_errors(study, fresh_cache, tmp_path):
    adapters, _ = study
    runtime = Runtime.for_sources(adapters, head=adapters[0].name, device="cpu")
    with pytest.raises(AtlasError, match=r"carry 2 heads .*pass head=NAME"):
        runtime.apply(adapters)
    with pytest.raises(AtlasError, match="no head named 'nope'"):
        runtime.apply(adapters, head="nope")
    with runtime.apply(adapters, head=adapters[1].name):
        pass
    with pytest.raises(AtlasError, match=r"head tensor .*classifier.weight.*shape \(5, 32\)"):
        runtime.apply([], head={"classifier.weight": torch.zeros(5, 32)})
    name = "bert.encoder.layer.0.attention.self.query"
    with pytest.raises(AtlasError, match=r"bert.encoder.layer.0.attention.self.query.*A has shape \(2, 31\)"):
        runtime.apply(LoraUpdates("x", {name: (torch.zeros(32, 2), torch.zeros(2, 31), 1.0)}))
    with pytest.raises(AtlasError, match=r"dense update of shape \(31, 32\)"):
        runtime.apply(LoraUpdates("x", {name: torch.zeros(31, 32)}))
    with pytest.raises(AtlasError, match="no module 'bert.encoder.layer.9"):
        runtime.apply(LoraUpdates("x", {"bert.encoder.layer.9.attention.self.query": torch.zeros(32, 32)}))
    with pytest.raises(AtlasError, match="LayerNorm.*nn.Linear, GPT-2 Conv1D and nn.Embedding"):
        runtime.apply(LoraUpdates("x", {"bert.embeddings.LayerNorm": torch.zeros(32, 32)}))
    with pytest.raises(AtlasError, match=r"coefficients: 3 values for 2 tasks"):
        runtime.apply(adapters, coefficients=[1, 2, 3], head=False)
    with pytest.raises(AtlasError, match=r"cover 2 layers"):
        runtime.apply(adapters, coefficients=torch.ones(2, 2), head=False)  # 3 layers in the study base
    # a failed apply leaves nothing behind and releases the lock (another thread can take it)
    import threading

    got = []

    def try_lock():
        got.append(runtime._lock.acquire(blocking=False))  # free at once: no wait, no clock
        if got[-1]:
            runtime._lock.release()

    thread = threading.Thread(target=try_lock)
    thread.start()
    thread.join()
    assert got == [True]
    assert not any(m._forward_hooks for m in runtime.model.modules())
    with runtime.apply(adapters[0]) as applied:
        assert applied.active
        with pytest.raises(AtlasError, match="already applied to this runtime"):
            runtime.apply(adapters[1])
        with runtime.apply(adapters[1], head=False, stack=True):
            assert sum(len(m._forward_hooks) for m in runtime.model.modules()) == 2 * 3 * 2
    assert not applied.active and not any(m._forward_hooks for m in runtime.model.modules())


def test_per_layer_outside_blocks_is_refused(tmp_path):
    # (DoRA is applied exactly now: tests/test_dora.py)
    base = tiny_model("bert")
    plain, _ = _adapter("bert", base, tmp_path / "plain")
    with pytest.raises(AtlasError, match=r"bert.pooler.dense.*outside the numbered blocks"):
        Runtime(base).apply(plain, coefficients=torch.ones(1, 2))


# ------------------------------------------------------------------------------------------- generation
@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A saved tiny llama (MiniLM tokenizer, vocabulary 30522) and a peft LoRA folder on it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from geometry.runtime.base_models import MINILM, resolve_base

    base_dir = tmp_path_factory.mktemp("lm_base")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, pad_token_id=0, bos_token_id=101,
                      eos_token_id=102, tie_word_embeddings=False)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(base_dir)
    tok_dir = resolve_base(MINILM)
    AutoTokenizer.from_pretrained(tok_dir).save_pretrained(base_dir)
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                          task_type="CAUSAL_LM", init_lora_weights=False))
    folder = tmp_path_factory.mktemp("lm_lora")
    pm.save_pretrained(folder)
    return base_dir, folder


def test_generation_with_hooks_equals_peft(tiny_lm, fresh_cache, tmp_path):
    """Greedy generation (KV cache, left padding) on the hooked cached base equals PeftModel's, and
    evaluate(Adapter) on those references scores ROUGE-L 1.0; the tokenizer's padding side is restored."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir, folder = tiny_lm
    adapter = load_adapter(folder)
    runtime = Runtime.for_sources(adapter, device="cpu")
    assert runtime.task_type == "CAUSAL_LM"
    prompts = ["the cat", "a big red dog runs", "green", "the blue cat sleeps on a mat"]
    side = runtime.tokenizer.padding_side
    with runtime.apply(adapter):
        ours = runtime.generate(prompts, batch_size=4, max_new_tokens=6)
    assert runtime.tokenizer.padding_side == side
    reference_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), folder).eval()
    from geometry.runtime import generate

    reference = generate(reference_model, runtime.tokenizer, prompts, batch_size=4, max_new_tokens=6)
    assert ours == reference and any(r.strip() for r in reference)
    with runtime.apply([]):
        plain = runtime.generate(prompts, batch_size=4, max_new_tokens=6)
    assert plain != reference
    data = tmp_path / "gen.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "reference": r}) + "\n" for p, r in zip(prompts, reference)))
    result = evaluate(adapter, data, max_new_tokens=6, batch_size=4, device="cpu")
    assert result["rouge_l"] == pytest.approx(1.0) and len(fresh_cache) == 1


# ------------------------------------------------------------------------------------------- CUDA
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu_and_memory_is_factored(tmp_path):
    """On the GPU: the same outputs as on the CPU, and applying T adapters allocates about the bytes the
    hooks hold (O(T r (m + n))), far below one dense m x n copy per module."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                      max_position_embeddings=64)
    base = transformers.AutoModelForCausalLM.from_config(config)
    adapters = []
    for t in range(4):
        pm = make_peft_model("llama", seed=t, base=copy.deepcopy(base))
        adapters.append(_save(pm, tmp_path / f"a{t}"))
    inputs = _inputs("llama")
    coefficients = [0.4, 0.3, 0.2, 0.1]
    with torch.no_grad():
        cpu_runtime = Runtime(base)
        with cpu_runtime.apply(adapters, coefficients=coefficients):
            cpu = cpu_runtime.forward(output_hidden_states=True, **inputs)
        runtime = Runtime(copy.deepcopy(base).cuda())
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        with runtime.apply(adapters, coefficients=coefficients) as applied:
            torch.cuda.synchronize()
            held = torch.cuda.memory_allocated() - before
            gpu = runtime.forward(output_hidden_states=True, **inputs)
            dense_bytes = sum(4 * d.B.shape[0] * d.A.shape[1] for d in applied.deltas.values())
            assert all(t.is_cuda for t in applied.tensors())
            assert held <= applied.nbytes() + 512 * (len(applied.tensors()) + 1)
            assert held < dense_bytes / 4
    torch.testing.assert_close(gpu.logits.cpu(), cpu.logits, atol=1e-4, rtol=1e-4)
    for a, b in zip(gpu.hidden_states, cpu.hidden_states):
        torch.testing.assert_close(a.cpu(), b, atol=1e-4, rtol=1e-4)
