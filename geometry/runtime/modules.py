"""Module paths and heads inside a base model: peft names to module paths, head keys, label counts, shapes."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from geometry.io.config import PEFT_PREFIX


# ---------------------------------------------------------------------------------------------- module paths
def _module_path(name: str) -> str:
    """Peft module name -> path inside the plain transformers model."""
    name = name.removeprefix(PEFT_PREFIX)
    for suffix in (".base_layer", ".weight"):
        name = name.removesuffix(suffix)
    return name


def _head_key(key: str) -> str:
    """Stored key of a non-LoRA tensor -> parameter name of the plain model (peft's ``modules_to_save.default``,
    ``original_module`` and ``base_layer`` wrappers removed; embeddings saved with ``save_embedding_layers``
    are stored as ``<embedding>.base_layer.weight``)."""
    key = key.removeprefix(PEFT_PREFIX)
    for wrapper in (".modules_to_save.default.", ".original_module.", ".base_layer."):
        key = key.replace(wrapper, ".")
    return key


def _num_labels(head: Mapping[str, torch.Tensor]) -> int | None:
    for key, tensor in head.items():
        k = _head_key(key)
        if k.endswith(("classifier.weight", "score.weight", "classifier.out_proj.weight")):
            return int(tensor.shape[0])
    return None


def _is_conv1d(module: torch.nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


def _module_shape(module: torch.nn.Module) -> tuple[int, int]:
    """``(out, in)`` of the linear map the module computes (embeddings: ``(dim, vocab)``)."""
    if isinstance(module, torch.nn.Embedding):
        return int(module.embedding_dim), int(module.num_embeddings)
    weight = module.weight
    if _is_conv1d(module):
        return int(weight.shape[1]), int(weight.shape[0])
    return int(weight.shape[0]), int(weight.shape[1])
