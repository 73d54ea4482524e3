"""A Hugging Face Hub model card (``README.md``) for a merged adapter.

:func:`model_card` writes YAML front matter (``library_name: peft``, ``base_model``, ``tags``, ``license``
when known) and a Markdown body: the adapters merged and where each came from, the method and its
parameters, ranks and energy kept, DoRA / format notes, the recipe when there is one, the scores and ANP
when they were measured (a :class:`geometry.evaluation.merge_eval.MergeEvaluation`), how to load it with
peft, and the Adapter Atlas version that made it. Every export writes it beside the weights
(:mod:`geometry.merging.export`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from geometry.merging.recipe import recipe_yaml
from geometry.merging.updates import jsonable
from geometry.tables import table_markdown
from geometry.version import __version__

if TYPE_CHECKING:
    from geometry.merging.base import MergedAdapter

#: The file name of the card in an export.
CARD_FILE = "README.md"

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _yaml_str(value: str) -> str:
    """A YAML scalar for ``value`` (JSON strings are valid YAML flow scalars)."""
    return json.dumps(str(value), ensure_ascii=False)


def _hub_id(name: str | None) -> str | None:
    """``name`` when it reads as a Hub repository id (``owner/name``), else ``None`` (a local path: one that
    exists here, e.g. ``models/minilm`` relative to the working folder, is not advertised as a Hub id)."""
    if not name:
        return None
    hub = name.startswith("hub:")
    name = name.removeprefix("hub:")
    if not _HUB_ID.match(name) or name.startswith("."):
        return None
    if not hub:
        try:
            if Path(name).exists():
                return None
        except OSError:
            pass
    return name


def _source_of(adapter: Any) -> str:
    origin = getattr(adapter, "origin", None)
    source = getattr(adapter, "source", "") or ""
    where = origin if isinstance(origin, str) and origin else source
    hub = _hub_id(where) if where.startswith("hub:") else None
    if hub:
        return f"[{where}](https://huggingface.co/{hub})"
    return f"`{where}`" if where else "(given as an object)"


def _md(text: Any) -> str:
    return str(text).replace("|", r"\|").replace("\n", " ")


def _recipe_text(recipe: Any) -> str:
    if isinstance(recipe, str):
        return recipe.strip()
    try:
        import yaml

        return yaml.safe_dump(jsonable(recipe), sort_keys=False, allow_unicode=True).strip()
    except ImportError:  # pragma: no cover - yaml comes with huggingface_hub
        return json.dumps(jsonable(recipe), indent=2)


def model_card(merged: MergedAdapter, *, scores: Any = None, recipe: Any = None, license: str | None = None,
               info: dict[str, Any] | None = None) -> str:
    """The model card (``README.md`` text, Hub format) of ``merged``.

    ``scores``: a :class:`~geometry.evaluation.merge_eval.MergeEvaluation` (its ``frame`` with task, adapter,
    finetuned, merged, normalized, and its ``anp``); default ``merged.card_scores``; without one the card says
    the merge was not scored. ``recipe``: the merge recipe (a mapping, written as YAML, or text); default: the
    merge's own (:func:`geometry.merging.recipe.recipe_yaml`). ``license``: a Hub licence id (``apache-2.0``...) when known. ``info``: the export's
    ``merge_info.json`` content (ranks and energy as written); default: computed from ``merged``.
    """
    if scores is None:
        scores = getattr(merged, "card_scores", None)
    if recipe is None and merged.method != "compress":  # a merge's card shows its recipe (recipe.yaml in exports)
        recipe = recipe_yaml(merged)
    if info is None:
        info = merged._peft_payload(None, None)[2]
        fmt = merged.config_raw.get("format")
        if fmt in ("kohya", "diffusers"):
            info["format"] = fmt
    fmt = info.get("format")
    base = merged.base_model
    base_id = _hub_id(base)
    tags = ["adapter-atlas", "lora", "merge", merged.method]
    if fmt:
        tags.append(fmt)
    front = ["---"]
    if fmt:
        front.append("library_name: diffusers")
    else:
        front.append("library_name: peft")
    if base_id:
        front.append(f"base_model: {_yaml_str(base_id)}")
    if license:
        front.append(f"license: {_yaml_str(license)}")
    front.append("tags:")
    front += [f"- {_yaml_str(t)}" for t in tags]
    front.append("---")

    title = (f"Compressed LoRA adapter: {merged.sources[0]} truncated" if merged.method == "compress" else
             f"Merged LoRA adapter: {merged.method} of {len(merged.sources)} adapter{'s' if len(merged.sources) != 1 else ''}")
    lines = [*front, "", f"# {title}", ""]
    lines.append(f"A merge of LoRA adapters made with [Adapter Atlas](https://pypi.org/project/adapter-atlas/) "
                 f"{__version__}, method `{merged.method}`, on the base model "
                 + (f"[{base_id}](https://huggingface.co/{base_id})." if base_id else f"`{base or 'unknown'}`."))
    lines.append("")

    lines += ["## Adapters merged", "", "| # | adapter | from | content hash (sha256) |", "|---:|---|---|---|"]
    adapters = {a.name: a for a in (merged.source_adapters or [])}
    hashes = list(merged.source_hashes) + [""] * max(0, len(merged.sources) - len(merged.source_hashes))
    for k, (name, digest) in enumerate(zip(merged.sources, hashes), start=1):
        where = _source_of(adapters[name]) if name in adapters else "(not recorded)"
        shown = f"`{digest[:16]}`" if digest and digest != name else "--"
        lines.append(f"| {k} | {_md(name)} | {_md(where)} | {shown} |")
    lines.append("")

    lines += ["## Method and parameters", "", f"- method: `{merged.method}`"]
    params = jsonable(merged.params)
    for key, value in params.items():
        if value is None:
            continue
        if key == "weights" and isinstance(value, list) and len(value) == len(merged.sources):
            shown = ", ".join(f"{n}: {w:g}" if isinstance(w, (int, float)) else f"{n}: {w}"
                              for n, w in zip(merged.sources, value))
            lines.append(f"- weights: {shown}")
        else:
            text = json.dumps(value)
            shown = f"`{text}`" if len(text) <= 200 else f"{type(value).__name__} of {len(value)} (in `merge_info.json`)" \
                if isinstance(value, (list, dict)) else f"`{text[:200]}...` (in `merge_info.json`)"
            lines.append(f"- {key}: {shown}")
    if not params:
        lines.append("- parameters: the method's defaults")
    ranks = sorted(set((info.get("ranks") or {}).values()))
    if ranks:
        shown = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
        lines.append(f"- rank per module: {shown} ({info.get('rank_rule', merged.rank_rule)}), "
                     f"{len(info['ranks'])} modules")
    if "energy_kept_total" in info:
        lines.append(f"- energy kept: {100 * info['energy_kept_total']:.4g}% of the sum of `||Delta||_F^2` "
                     f"(lowest module {100 * info.get('energy_kept_min', 1.0):.4g}%; per module in `merge_info.json`)")
    if info.get("head"):
        lines.append(f"- head in the weights: `{info['head']}` (every task's head is in `heads/`)")
    if info.get("dora"):
        lines.append(f"- DoRA: {info['dora']}")
    if fmt:
        lines.append(f"- format: {fmt} (the inputs' format; scale 1, alpha = r)")
    lines.append("")

    if recipe is not None:
        lines += ["## Recipe", "", "```yaml", _recipe_text(recipe), "```", ""]

    lines += ["## Scores", ""]
    if scores is None:
        lines += ["Not measured: this merge was not scored when it was exported.", ""]
    else:
        frame = scores.frame
        total = getattr(scores, "tasks_total", None)
        complete = total is None or len(frame) == total
        lines.append(f"**ANP (average normalized performance): {scores.anp:.2f}%**"
                     + ("" if complete else f" (over the {len(frame)} of {total} tasks scored)"))
        lines += ["", "Per task, on the test split: the fine-tuned adapter alone, the merge with that task's head, "
                  "and the merge as a % of fine-tuned.", "", table_markdown(frame, digits=4).rstrip(), ""]

    lines += ["## How to load it", ""]
    if fmt:
        weights = "lora.safetensors" if fmt == "kohya" else "pytorch_lora_weights.safetensors"
        lines += ["```python", "# pipe: a diffusers pipeline of the base model",
                  f'pipe.load_lora_weights("path/to/this/folder", weight_name="{weights}")', "```", ""]
    else:
        lines += ["```python", "from peft import PeftModel", "from transformers import AutoModel",
                  "", f'base = AutoModel.from_pretrained("{base_id or base or "BASE_MODEL"}")',
                  'model = PeftModel.from_pretrained(base, "path/or/repo-id/of/this/adapter")', "```", "",
                  "`lora_alpha = r` for every module, so the stored `B @ A` is the merged update (scale 1). Use the "
                  "model class of the head's task (e.g. `AutoModelForSequenceClassification`) to load the head.", ""]
    lines.append(f"Made with Adapter Atlas {__version__}.")
    return "\n".join(lines) + "\n"
