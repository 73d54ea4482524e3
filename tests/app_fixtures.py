"""Small peft-format adapter folders for the dashboard tests (no peft, no model: milliseconds).

Each folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` with BERT-style keys
(``base_model.model.encoder.layer.N.attention.self.{query,value}.lora_{A,B}.weight``), the layout
of the sample adapters on all-MiniLM-L6-v2, at a tiny width so the whole geometry takes < 1 s.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import torch
from safetensors.torch import save, save_file

BASE = "tiny/bert-like"
KINDS = {"query": (24, 20), "value": (24, 20)}


def _tensors(seed: int, layers: int, r: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for layer in range(layers):
        for name, (m, n) in KINDS.items():
            prefix = f"base_model.model.encoder.layer.{layer}.attention.self.{name}"
            out[f"{prefix}.lora_A.weight"] = torch.randn(r, n, generator=gen) / n**0.5
            out[f"{prefix}.lora_B.weight"] = torch.randn(m, r, generator=gen) / m**0.5
    return out


def _config(r: int, base: str) -> dict:
    return {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": 2 * r,
        "target_modules": ["query", "value"],
        "base_model_name_or_path": base,
        "task_type": "FEATURE_EXTRACTION",
    }


def write_adapter(path: Path, seed: int, layers: int = 4, r: int = 4, base: str = BASE) -> Path:
    """A peft adapter folder at ``path`` with random factors (deterministic in ``seed``)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps(_config(r, base)))
    save_file(_tensors(seed, layers, r), str(path / "adapter_model.safetensors"))
    return path


def adapter_zip_bytes(seed: int, layers: int = 4, r: int = 4, base: str = BASE) -> bytes:
    """The same adapter as a .zip (config + weights at the top level), in memory."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("adapter_config.json", json.dumps(_config(r, base)))
        zf.writestr("adapter_model.safetensors", save(_tensors(seed, layers, r)))
    return buf.getvalue()


def write_sample_set(root: Path, n: int = 3, layers: int = 4) -> Path:
    """``n`` adapters under ``root/task_k`` (the layout of ``sample_adapters/``)."""
    for k in range(n):
        write_adapter(Path(root) / f"task{k}", seed=k, layers=layers)
    return Path(root)


APP = Path(__file__).resolve().parents[1] / "app.py"
PAGES = APP.parent / "pages"


def app_test(monkeypatch, tmp_path: Path, n: int = 3, layers: int = 4, query: dict | None = None):
    """An ``AppTest`` of ``app.py`` on ``n`` tiny sample adapters, with its own disk cache, run once."""
    from streamlit.testing.v1 import AppTest

    samples = write_sample_set(tmp_path / "samples", n=n, layers=layers)
    monkeypatch.setenv("ADAPTER_ATLAS_SAMPLES", str(samples))
    monkeypatch.setenv("ADAPTER_ATLAS_CACHE", str(tmp_path / "cache"))
    at = AppTest.from_file(str(APP), default_timeout=120)
    for key, value in (query or {}).items():
        at.query_params[key] = value
    return at.run()


def page_test(page: str, query: dict | None = None):
    """An ``AppTest`` of one page file run as the main script (the way a shared link opens it),
    with ``query`` as the URL's query parameters; the environment must point at the samples."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(PAGES / page), default_timeout=120)
    for key, value in (query or {}).items():
        at.query_params[key] = value
    return at.run()


def plotly_specs(at) -> list[dict]:
    """The figure JSON of every ``st.plotly_chart`` on the page, in order."""
    return [json.loads(el.proto.spec) for el in at.get("plotly_chart")]


def decode(array) -> list:
    """A figure-JSON array as a nested list (Plotly 7 writes numeric arrays as base64 ``bdata``)."""
    import base64

    import numpy as np

    if isinstance(array, dict) and "bdata" in array:
        values = np.frombuffer(base64.b64decode(array["bdata"]), dtype=np.dtype(array["dtype"]))
        shape = [int(s) for s in str(array.get("shape", len(values))).split(",")]
        return values.reshape(shape).tolist()
    return array
