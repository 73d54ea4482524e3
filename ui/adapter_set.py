"""The adapter set a dashboard session works on: ordered, uniquely named, loaded through the library.

Pure Python (no Streamlit): the sidebar callbacks and the tests call the same functions. A load
that fails raises an :class:`~geometry.errors.AtlasError` inside the library; here it becomes one
message in the returned error list and the set keeps every adapter it had.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from geometry.adapter_set import AdapterSet
from geometry.errors import AtlasError

REPO = Path(__file__).resolve().parents[1]
#: Environment variable that points the dashboard at one other folder of sample adapters (tests, hosts).
SAMPLES_ENV = "ADAPTER_ATLAS_SAMPLES"
#: File names the uploader accepts.
UPLOAD_TYPES = ("zip", "json", "safetensors", "bin")
#: The bundled sample sets (folders of ``sample_adapters/``), the first the default.
SAMPLE_SETS = {
    "real": "Real tasks: GLUE, AG News, emotion",
    "smollm2": "SmolLM2-135M: GLUE as generation, BoolQ, ARC, OpenBookQA",
    "synthetic": "Synthetic tasks: template grammars",
}
DEFAULT_SET = next(iter(SAMPLE_SETS))
#: Environment variable naming another folder that holds the sample sets' folders (tests)
SETS_ENV = "ADAPTER_ATLAS_SAMPLE_SETS"


def sets_root() -> Path:
    """The folder holding the sample sets: ``$ADAPTER_ATLAS_SAMPLE_SETS`` or ``<repo>/sample_adapters``."""
    return Path(os.environ.get(SETS_ENV) or REPO / "sample_adapters")


def sample_sets() -> dict[str, str]:
    """``{name: label}`` of the bundled sample sets present on disk; empty when ``$ADAPTER_ATLAS_SAMPLES``
    points the dashboard at one folder (then there is nothing to switch)."""
    if os.environ.get(SAMPLES_ENV):
        return {}
    return {k: v for k, v in SAMPLE_SETS.items() if (sets_root() / k).is_dir()}


def samples_dir(sample_set: str | None = None) -> Path:
    """``$ADAPTER_ATLAS_SAMPLES`` when set, else ``<repo>/sample_adapters/<sample_set>`` (default: the real set)."""
    env = os.environ.get(SAMPLES_ENV)
    if env:
        return Path(env)
    name = sample_set if sample_set in SAMPLE_SETS else DEFAULT_SET
    return sets_root() / name


def list_sample_adapters(root: Path | str | None = None) -> list[Path]:
    """Every folder under ``root`` (default :func:`samples_dir`) holding an ``adapter_config.json``."""
    root = Path(root) if root is not None else samples_dir()
    if not root.is_dir():
        return []
    return sorted({p.parent for p in root.rglob("adapter_config.json") if ".git" not in p.parts})


def sample_name(path: Path, root: Path | str | None = None) -> str:
    """Display name of a sample adapter: its folder path under ``root`` joined with ``/``."""
    try:
        return "/".join(Path(path).relative_to(Path(root or samples_dir())).parts) or Path(path).name
    except ValueError:
        return Path(path).name


def _error_text(exc: BaseException, what: str) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if what in text else f"{what}: {text}"


# -- loading ----------------------------------------------------------------------------------
def load_sample_set(paths: Sequence[Path], root: Path | str | None = None) -> tuple[AdapterSet, list[str]]:
    """A new set holding the sample adapters at ``paths``; failures become error messages."""
    from geometry.io.loader import load_adapter

    aset, errors = AdapterSet(), []
    for path in paths:
        name = sample_name(path, root)
        try:
            aset.add(load_adapter(str(path), name=name), origin=f"sample:{name}", name=name)
        except (AtlasError, OSError, ValueError) as exc:
            errors.append(_error_text(exc, name))
    return aset, errors


def load_uploads(aset: AdapterSet, files: Sequence[tuple[str, bytes]]) -> tuple[list[str], list[str]]:
    """Load uploaded files into ``aset``: each ``.zip`` is one adapter; the other files together
    (``adapter_config.json`` + ``adapter_model.safetensors`` or ``.bin``) form one more.

    Returns ``(added names, error messages)``; an adapter that fails leaves the set untouched.
    """
    import geometry

    added, errors = [], []
    zips = [(Path(f).name, d) for f, d in files if Path(f).name.lower().endswith(".zip")]
    loose = {Path(f).name: d for f, d in files if not Path(f).name.lower().endswith(".zip")}
    groups = [({base: data}, base) for base, data in zips] + ([(loose, " + ".join(sorted(loose)))] if loose else [])
    for group, label in groups:  # one adapter at a time: one that fails leaves the set as it was
        try:
            # DoRA: exact updates where the base is on this machine (the Overview says which)
            for adapter in geometry.resolve_dora_where_possible(geometry.load(group))[0]:
                added.append(aset.add(adapter, origin="upload"))
        except (AtlasError, OSError, ValueError) as exc:
            errors.append(_error_text(exc, label))
    return added, errors


def load_hub_id(aset: AdapterSet, repo_id: str) -> tuple[list[str], list[str]]:
    """Load ``owner/name`` from the Hugging Face hub into ``aset``; returns ``(added, errors)``."""
    from geometry.io.loader import load_hub

    repo_id = (repo_id or "").strip()
    if not repo_id:
        return [], ["enter a hub id such as owner/name"]
    try:
        return [aset.add(load_hub(repo_id), origin=f"hub:{repo_id}")], []
    except (AtlasError, OSError, ValueError) as exc:
        return [], [_error_text(exc, repo_id)]


def training_records(root: Path | str, names: Sequence[str]):
    """How the sample adapters ``names`` under ``root`` were trained and how they score: one row per adapter
    with a ``training_info.json`` (written by ``python -m sample_adapters.train``), as a DataFrame.

    Columns: adapter, task, variant, test accuracy, the task's GLUE metric and its value, head-only and
    majority-class test accuracy, and ``note``: "near chance" when the adapter is within
    ``sample_adapters.report.NEAR_CHANCE`` (0.03) of the majority class's accuracy (a merge can hardly lose
    on such a task, which inflates the ANP of every merge that includes it)."""

    import pandas as pd

    rows = []
    for name in names:
        file = Path(root) / name / "training_info.json"
        if not file.is_file():
            continue
        info = json.loads(file.read_text())
        test = info.get("scores", {}).get("test", {})
        if "zero_shot_base" in test:  # the causal set (sample_adapters.causal): generated answers
            rows.append(_causal_record(root, name, info, test))
            continue
        base = info.get("baselines", {})
        head = base.get("head_only", {}).get("test", {}).get("accuracy", float("nan"))
        major = base.get("majority", {}).get("test", {}).get("accuracy", float("nan"))
        meta_file = Path(root) / "tasks" / info.get("task", "") / "labels.json"
        metric = json.loads(meta_file.read_text()).get("glue_metric", "accuracy") if meta_file.is_file() else "accuracy"
        acc = test.get("accuracy", float("nan"))
        rows.append({
            "adapter": name, "task": info.get("task"), "variant": info.get("variant"), "test accuracy": acc,
            "metric": metric, "metric value": test.get(metric, acc), "head-only accuracy": head,
            "majority accuracy": major, "steps": info.get("steps"),
            "note": "near chance" if acc - major < NEAR_CHANCE else "",
        })
    return pd.DataFrame(rows)


def _causal_record(root: Path | str, name: str, info: dict, test: dict) -> dict:
    """One row of :func:`training_records` for an adapter of the causal set: its test score (the task's metric:
    exact match of the generated label word, or ROUGE-1 of the generated answer) against the base model
    prompted zero-shot with the same prompt, and the other scores of the generated answers."""
    meta_file = Path(root) / "tasks" / info.get("task", "") / "labels.json"
    metric = json.loads(meta_file.read_text()).get("metric", "rouge_l") if meta_file.is_file() else "rouge_l"
    ours, base = test["adapter"], test["zero_shot_base"]
    value, zero = ours.get(metric, float("nan")), base.get(metric, float("nan"))
    return {
        "adapter": name, "task": info.get("task"), "metric": metric, "test score": value, "zero-shot base": zero,
        "exact match": ours.get("exact_match"), "ROUGE-1": ours.get("rouge_1"), "ROUGE-L": ours.get("rouge_l"),
        "test examples": ours.get("n"), "steps": info.get("steps"), "training time (s)": info.get("train_seconds"),
        "note": "" if value > zero else "not above the zero-shot base",
    }


#: an adapter within this of its majority class's test accuracy is labelled "near chance"
#: (the same threshold as ``sample_adapters.report.NEAR_CHANCE``)
NEAR_CHANCE = 0.03
