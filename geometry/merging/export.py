"""Writing a :class:`~geometry.merging.base.MergedAdapter` as a peft LoRA adapter folder (or zip).

:func:`to_peft_folder` writes ``adapter_config.json`` + ``adapter_model.safetensors`` that
``PeftModel.from_pretrained(base, path)`` loads, ``merge_info.json`` (provenance, ranks, energy
kept), ``heads/<adapter>.safetensors`` (every task's head) and ``README.md``, the model card
(:mod:`geometry.merging.card`). ``lora_alpha = r`` per module
(``rank_pattern`` = ``alpha_pattern``, ``use_rslora = False``), so peft's scale is exactly 1 and
the stored ``B @ A`` is the merged update; fused parts (GPT-2 ``c_attn``, Phi-3 ``qkv_proj``) are put
back into their fused module (:meth:`MergedAdapter.peft_updates`).

Diffusion LoRAs (``config_raw["format"]`` ``kohya`` / ``diffusers``, :mod:`geometry.io.diffusion`) are
written back in their format: ``lora.safetensors`` with kohya keys (``<name>.lora_down.weight``,
``.lora_up.weight``, ``.alpha = r``) or ``pytorch_lora_weights.safetensors`` with the inputs' diffusers keys,
plus ``merge_info.json`` and ``README.md``; scale 1 as for peft. Conv modules get their 4-D shapes back.

Rank of each written module:

- ``rank=None`` (default): factored modules are written as they are (exact task arithmetic:
  ``sum_t r_t``; element-wise merges: already truncated at merge time to the sum of the input
  ranks); a dense module (``keep_dense=True`` merges only) is written as its best rank-``k``
  factors with ``k`` = its ``rank_sum`` (the sum of the inputs' ranks there), never as a full-rank
  "LoRA" larger than the dense matrix;
- ``rank=R``: every module above ``R`` is truncated to ``R`` (factored: the factored SVD of
  :mod:`geometry.merging.truncate`; dense: an SVD of that one ``m x n`` module).

Energy kept, in ``merge_info.json``: ``energy_kept[module]`` is ``||written||_F^2 / ||Delta||_F^2``
with ``Delta`` the merged update before any truncation (merge time and write time together);
``energy_kept_total`` is the same ratio summed over modules; ``energy_kept_min`` the smallest.
"""

from __future__ import annotations

import io
import json
import re
import tempfile
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from geometry.device import default_device
from geometry.errors import IncompatibleAdaptersError, MergeParameterError
from geometry.io.config import PEFT_PREFIX
from geometry.io.diffusion import diffusion_weights
from geometry.merging.card import CARD_FILE, _recipe_text, model_card
from geometry.merging.truncate import factorize_dense, truncate_factored
from geometry.merging.updates import PeftUpdate, jsonable

if TYPE_CHECKING:
    from geometry.merging.base import MergedAdapter

#: The weights file of a diffusion LoRA export, by format (a kohya file loads as a single ``.safetensors``).
DIFFUSION_FILES = {"kohya": "lora.safetensors", "diffusers": "pytorch_lora_weights.safetensors"}
#: Files written next to the peft weights.
MERGE_INFO = "merge_info.json"
#: the merge's recipe (mergekit YAML; :mod:`geometry.merging.recipe`), in every export
RECIPE_FILE = "recipe.yaml"
HEADS_DIR = "heads"

# config fields that describe the sources' placement or variants, not the merged adapter
_DROPPED_CONFIG_FIELDS = {
    "layers_to_transform", "layers_pattern", "exclude_modules", "target_parameters", "loftq_config",
    "eva_config", "corda_config", "megatron_config", "lora_bias", "trainable_token_indices",
    "revision", "auto_mapping",
    # AdaLoRA's (an AdaLoRA input's merge is written as plain LoRA)
    "init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight", "total_step",
}


def to_peft_folder(
    merged: MergedAdapter, path: str | Path, rank: int | None = None, head: str | None = None, *,
    scores: Any = None, recipe: Any = None, license: str | None = None,
) -> Path:
    """Write ``merged`` as a peft LoRA adapter folder loadable by ``PeftModel.from_pretrained``.

    ``rank``: see the module docstring (``None``: factored modules as they are, dense ones at
    their ``rank_sum``). ``head``: the source adapter whose head (``other_tensors``,
    ``modules_to_save``) is put in the weights file so the folder is a complete classifier for that
    task; every head is also written under ``heads/<name>.safetensors``. Default: the first source
    that has a head. ``README.md`` is the model card (:func:`geometry.merging.card.model_card`, with
    ``scores`` / ``recipe`` / ``license``; ``scores`` defaults to ``merged.card_scores``).
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights, config, info = peft_payload(merged, rank, head)
    if recipe is None and merged.method != "compress":  # every merge carries its recipe (recipe.yaml, and in the
        from geometry.merging.recipe import recipe_yaml  # card): a replay writes the same bytes

        recipe = recipe_yaml(merged)
    if recipe is not None:
        (path / RECIPE_FILE).write_text(recipe if isinstance(recipe, str) else _recipe_text(recipe), encoding="utf-8")
    fmt = merged.config_raw.get("format")
    if fmt in ("kohya", "diffusers"):  # a diffusion LoRA: written in the format its inputs came in
        file = DIFFUSION_FILES[fmt]
        save_file(diffusion_payload(merged, weights), str(path / file))
        info["format"] = fmt
        (path / MERGE_INFO).write_text(json.dumps(info, indent=2, sort_keys=True))
        card = model_card(merged, scores=scores, recipe=recipe, license=license, info=info)
        (path / CARD_FILE).write_text(card, encoding="utf-8")
        return path
    save_file(weights, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    (path / MERGE_INFO).write_text(json.dumps(info, indent=2, sort_keys=True))
    card = model_card(merged, scores=scores, recipe=recipe, license=license, info=info)
    (path / CARD_FILE).write_text(card, encoding="utf-8")
    if merged.heads:
        (path / HEADS_DIR).mkdir(exist_ok=True)
        for name, tensors in merged.heads.items():
            if tensors:
                save_file(_contiguous(tensors), str(path / HEADS_DIR / f"{_safe(name)}.safetensors"))
    return path


def to_zip_bytes(merged: MergedAdapter, rank: int | None = None, head: str | None = None, *,
                 scores: Any = None, recipe: Any = None, license: str | None = None) -> bytes:
    """The :func:`to_peft_folder` files (model card included) as a zip (for a download button)."""

    buf = io.BytesIO()
    with tempfile.TemporaryDirectory() as tmp:
        folder = to_peft_folder(merged, Path(tmp) / "merged", rank=rank, head=head, scores=scores, recipe=recipe,
                                license=license)
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for file in sorted(folder.rglob("*")):
                if file.is_file():  # a fixed date: the same merge gives the same zip bytes
                    entry = zipfile.ZipInfo(file.relative_to(folder).as_posix(), date_time=(1980, 1, 1, 0, 0, 0))
                    entry.compress_type = zipfile.ZIP_DEFLATED
                    entry.external_attr = 0o644 << 16
                    zf.writestr(entry, file.read_bytes())
    return buf.getvalue()


def peft_payload(merged: MergedAdapter, rank: int | None, head: str | None) -> tuple[dict, dict, dict]:
    """``(weights, adapter_config, merge_info)`` of :func:`to_peft_folder`."""
    if rank is not None and int(rank) < 1:
        raise MergeParameterError(f"rank must be a positive integer, got {rank}")
    head = choose_head(merged, head)
    weights: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    energy: dict[str, float] = {}
    kept_total = before_total = 0.0
    fan_in_fan_out = False
    parts_of: dict[str, list] = {}
    for mod in merged.modules.values():
        parts_of.setdefault(mod.name, []).append(mod)
    for name, up in sorted(merged.peft_updates().items()):
        B, A, written = _factors_for_output(up, rank)
        kept, before = _module_energy(parts_of[name], up, written)
        kept_total += kept
        before_total += before
        energy[name] = 1.0 if before == 0.0 else min(1.0, kept / before)
        k = int(A.shape[0])
        if k == 0:  # an all-zero update: peft needs r >= 1
            B, A, k = torch.zeros(up.shape[0], 1), torch.zeros(1, up.shape[1]), 1
        ranks[name] = k
        fan_in_fan_out = fan_in_fan_out or up.fan_in_fan_out
        prefix = name if name.startswith(PEFT_PREFIX) else PEFT_PREFIX + name
        B = B.detach().to("cpu", torch.float32).contiguous()
        A = A.detach().to("cpu", torch.float32).contiguous()
        if up.is_embedding:
            weights[f"{prefix}.lora_embedding_A"] = A
            weights[f"{prefix}.lora_embedding_B"] = B
        else:
            weights[f"{prefix}.lora_A.weight"] = A
            weights[f"{prefix}.lora_B.weight"] = B
    if not ranks:
        raise IncompatibleAdaptersError(f"merge {merged.method!r} has no module to write")
    r = max(ranks.values())
    pattern = {re.escape(_short(name)): k for name, k in ranks.items() if k != r}
    config = {k: v for k, v in merged.config_raw.items() if k not in _DROPPED_CONFIG_FIELDS}
    if str(merged.config_raw.get("peft_type") or "LORA").upper() in ("LOHA", "LOKR") or "format" in config:
        # LoHa / LoKr sources (read as SVD factors) and diffusion files: only the fields a LoraConfig shares
        config = {k: v for k, v in config.items() if k in ("task_type", "base_model_name_or_path", "inference_mode")}
    config.update(
        peft_type="LORA",
        r=r,
        lora_alpha=r,
        use_rslora=False,
        use_dora=False,
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        target_modules=sorted(_short(n) for n in ranks),
        fan_in_fan_out=fan_in_fan_out,
        base_model_name_or_path=merged.base_model,
        modules_to_save=None,
        bias="none",
    )
    if head is not None:
        weights.update(_contiguous(merged.heads[head]))
        config["modules_to_save"] = merged.head_configs.get(head, {}).get("modules_to_save")
        if merged.head_configs.get(head, {}).get("task_type"):
            config["task_type"] = merged.head_configs[head]["task_type"]
    info = {
        "method": merged.method,
        "params": jsonable(merged.params),
        "sources": list(merged.sources),
        "source_hashes": list(merged.source_hashes),
        "head": head,
        "heads": sorted(merged.heads),
        "rank": rank,
        "rank_rule": merged.rank_rule if rank is None else f"at most {int(rank)}",
        "ranks": ranks,
        "energy_kept": energy,
        "energy_kept_min": min(energy.values()),
        "energy_kept_total": 1.0 if before_total == 0.0 else min(1.0, kept_total / before_total),
    }
    dora = sorted(n for n, c in merged.head_configs.items() if c.get("dora") == "exact")
    if dora:  # DoRA inputs (geometry.linalg.dora.resolve_dora): their exact updates were merged
        info["dora"] = (f"DoRA inputs {', '.join(dora)}: their exact updates m (W0 + s B A) / ||W0 + s B A||_row - W0 "
                        "were merged; written as a dense-derived LoRA (use_dora false) at the ranks above, "
                        "energy kept as given, not as DoRA")
    return weights, config, info


def diffusion_payload(merged: MergedAdapter, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The peft ``weights`` of :func:`peft_payload` (scale 1: ``lora_alpha = r``) as a kohya / diffusers
    state dict under the inputs' own module names (:func:`geometry.io.diffusion.diffusion_weights`):
    kohya ``<name>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha = r``; diffusers the factor suffix of
    the input names, no alpha. Conv modules get their 4-D shapes back."""
    pairs = {}
    for key in weights:
        if key.endswith(".lora_A.weight"):
            name = _short(key.removesuffix(".lora_A.weight"))
            pairs[name] = (weights[key.replace(".lora_A.weight", ".lora_B.weight")], weights[key])
    return diffusion_weights(pairs, merged.config_raw["format"], merged.config_raw.get("conv_kernels") or {})


def choose_head(merged: MergedAdapter, head: str | None) -> str | None:
    """``head`` checked against the merge's heads, or the first source that has a head."""
    if head is not None:
        if head not in merged.heads:
            raise IncompatibleAdaptersError(
                f"head {head!r} is not one of the merged adapters' heads {sorted(merged.heads)}"
            )
        return head if merged.heads[head] else None
    for name in merged.sources:
        if merged.heads.get(name):
            return name
    return None


def _factors_for_output(up: PeftUpdate, rank: int | None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(B, A, energy kept by this write)`` of one peft module."""
    if up.delta is not None:
        k = rank if rank is not None else up.rank_sum  # rank_sum None: numerical rank (exact)
        return factorize_dense(up.delta, k, device=default_device())
    if rank is not None and up.A.shape[0] > rank:
        return truncate_factored(up.B, up.A, rank, device=default_device())
    return up.B, up.A, 1.0


def _module_energy(parts: list, up: PeftUpdate, written: float) -> tuple[float, float]:
    """``(||written||^2, ||Delta||^2)``: ``Delta`` is the update before merge-time truncation."""
    before = sum(p.norm2() / max(p.energy_kept, 1e-300) for p in parts)
    return written * up.norm2(), before


def _short(name: str) -> str:
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "head"


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in tensors.items()}
