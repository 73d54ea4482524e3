"""Merging LoRA adapters: one function per method, a registry by name, one call shape.

Every method is ``method(adapters, weights=None, **params) -> MergedAdapter`` (mergekit's
``merge_methods/`` in spirit): ``weights`` gives one ``lambda_t`` per task or per task and layer
(:mod:`geometry.merging.weights`); each adapter's own scale ``s_t`` (``alpha/r``, rsLoRA,
``rank_pattern`` / ``alpha_pattern``, already resolved in ``LoraModule.scale``) is applied exactly.
Each task keeps its own head (``MergedAdapter.heads``). Every method also takes ``dtype`` (of the
stored factors, default float32) and ``device`` (where it computes, default
:func:`geometry.device.default_device`: CUDA when present); results are stored on the CPU.

========================  ===========  ==========================================================
name                      computed     update per module (stored factored; rank below)
========================  ===========  ==========================================================
``lora_average``          factored     ``(sum w_t sqrt(s_t) B_t)(sum w_t sqrt(s_t) A_t)`` (cross terms)
``task_arithmetic``       factored     ``sum_t l_t s_t B_t A_t`` exact (rank sum), or truncated
``ties``                  dense        trim top ``density``, elect sign, disjoint mean
``dare_linear``           dense        drop ``1-density`` at random, rescale, sum
``dare_ties``             dense        drop and rescale, elect sign, disjoint mean
``multislerp``            dense        spherical barycentre of the task vectors
``magnitude_prune``       dense        trim top ``density``, sum
``breadcrumbs``           dense        drop the top ``gamma`` and keep the next ``density``, sum
``breadcrumbs_ties``      dense        breadcrumbs masks, sign election on weighted deltas, sum
``della``                 dense        MagPrune (rank-based keep probabilities), rescale, elect, mean
``della_linear``          dense        MagPrune, rescale, weighted sum
``knots``                 factored     TIES / DARE on the coordinates in the SVD basis of ``[tau_1..tau_T]``
``core_space``            factored     any merge on ``R x R`` cores in the bases of stacked ``B`` / ``A``
``tsv_m``                 factored     each task's top singular vectors, orthogonalised across tasks, summed
``iso_c``                 factored     the task-arithmetic sum with its spectrum flattened to the mean
``iso_cts``               factored     Iso-C on a common subspace plus task-specific directions
========================  ===========  ==========================================================

Rank of the result: exact task arithmetic keeps ``sum_t r_t`` (energy kept 1.0); the dense
methods compute one module at a time and keep its best factors of rank ``rank``, by default the
sum of the inputs' ranks at that module, reporting the fraction of ``||Delta||_F^2`` kept per module
(``MergedModule.energy_kept``) and overall (``MergedAdapter.energy_kept``, ``summary()``,
``merge_info.json``); ``keep_dense=True`` keeps their ``m x n`` updates instead (small models).
Writing peft folders: :mod:`geometry.merging.export`.

Differences from peft's ``LoraModel.add_weighted_adapter`` (cross-checked in
``tests/test_merge_peft.py``):

- ``cat`` equals exact ``task_arithmetic`` (same factors); ``svd`` equals ``task_arithmetic`` with
  ``rank`` up to the signs of singular vectors, but peft builds every ``m x n`` update and runs a
  full SVD (see ``bench/merge_bench.py``); ``ties_svd`` / ``dare_*_svd`` / ``magnitude_prune_svd``
  with ``svd_rank = min(m, n)`` equal our ``ties`` / ``dare_*`` / ``magnitude_prune`` with
  ``keep_dense=True`` (or ``rank = min(m, n)``); peft's default ``svd_rank`` is the largest input
  rank, ours the sum of the input ranks.
- peft's ``linear`` is the LoRA-level average with weights under a square root: peft ``linear``
  with weights ``w_t^2`` equals our ``lora_average`` with ``w_t``. peft's ``ties`` / ``dare_*`` /
  ``magnitude_prune`` (without ``_svd``) trim and elect **on the factors A and B separately**, then
  multiply: that is not TIES on task vectors and has cross terms; we only define the task-vector
  versions.
- peft refuses to combine adapters that each save a head (``modules_to_save``: "Cannot add weighted
  adapters if they target the same module with modules_to_save"); here every task keeps its head
  (``MergedAdapter.heads``, written to ``heads/`` next to the merged weights).
- peft bugs avoided here: the combined adapter inherits ``use_rslora`` from the first adapter while
  setting ``lora_alpha = r``, so its scale is ``sqrt(r)`` instead of 1 (peft PR #3449, issue #3761);
  ``rank_pattern`` sources make element-wise factor merges fail to reload (issue #3737) or fail on
  unequal per-module ranks; negative weights lose their sign in ``linear`` (issue #3004). Here the
  scale of each input is folded in before combining, and the output always has
  ``lora_alpha = r`` per module (``alpha_pattern`` = ``rank_pattern``), ``use_rslora = False``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from geometry.errors import MergeParameterError, UnknownMergeMethodError
from geometry.merging.base import MergedAdapter, MergedModule, PeftUpdate
from geometry.merging.breadcrumbs import breadcrumbs, breadcrumbs_ties
from geometry.merging.core_space import core_space
from geometry.merging.dare import dare_linear, dare_ties
from geometry.merging.della import della, della_linear
from geometry.merging.iso import iso_c, iso_cts
from geometry.merging.knots import knots
from geometry.merging.lora_average import lora_average
from geometry.merging.magnitude_prune import magnitude_prune
from geometry.merging.multislerp import multislerp
from geometry.merging.task_arithmetic import task_arithmetic
from geometry.merging.ties import ties
from geometry.merging.tsv import task_interference, tsv_m
from geometry.types import Adapter

#: name -> method function ``(adapters, weights=None, **params) -> MergedAdapter``
MERGE_METHODS: dict[str, Callable[..., MergedAdapter]] = {
    "lora_average": lora_average,
    "task_arithmetic": task_arithmetic,
    "ties": ties,
    "dare_linear": dare_linear,
    "dare_ties": dare_ties,
    "multislerp": multislerp,
    "magnitude_prune": magnitude_prune,
    "breadcrumbs": breadcrumbs,
    "breadcrumbs_ties": breadcrumbs_ties,
    "della": della,
    "della_linear": della_linear,
    "knots": knots,
    "core_space": core_space,
    "tsv_m": tsv_m,
    "iso_c": iso_c,
    "iso_cts": iso_cts,
}

#: parameters (besides ``weights``) each method accepts
METHOD_PARAMS: dict[str, tuple[str, ...]] = {
    "lora_average": (),
    "task_arithmetic": ("rank",),
    "ties": ("density", "majority_sign_method", "rank", "keep_dense"),
    "dare_linear": ("density", "seed", "rank", "keep_dense"),
    "dare_ties": ("density", "seed", "majority_sign_method", "rank", "keep_dense"),
    "multislerp": ("rank", "keep_dense"),
    "magnitude_prune": ("density", "rank", "keep_dense"),
    "breadcrumbs": ("density", "gamma", "per_row", "rank", "keep_dense"),
    "breadcrumbs_ties": ("density", "gamma", "per_row", "rank", "keep_dense"),
    "della": ("density", "epsilon", "rescale", "scaling", "seed", "rank", "keep_dense"),
    "della_linear": ("density", "epsilon", "rescale", "scaling", "seed", "rank", "keep_dense"),
    "knots": ("merge_method", "density", "seed", "majority_sign_method", "scale_coordinates", "rank"),
    "core_space": ("merge_method", "density", "seed", "majority_sign_method", "rank"),
    "tsv_m": ("alpha", "fraction", "rank"),
    "iso_c": ("alpha", "spectrum", "rank"),
    "iso_cts": ("alpha", "common_space_fraction", "spectrum", "rank"),
}

#: parameters every method takes besides its own: stored dtype and compute device
COMMON_PARAMS: tuple[str, ...] = ("dtype", "device")


def merge(adapters: Sequence[Adapter], method: str, weights: Any = None, **params: Any) -> MergedAdapter:
    """Merge ``adapters`` with the method registered as ``method``.

    Parameters that are ``None`` are dropped (the method's default applies); a parameter the method
    does not take raises :class:`~geometry.errors.MergeParameterError` naming the ones it does take.
    """
    if method not in MERGE_METHODS:
        raise UnknownMergeMethodError(f"unknown merge method {method!r}; choose one of {', '.join(MERGE_METHODS)}")
    params = {k: v for k, v in params.items() if v is not None}
    unknown = sorted(set(params) - set(METHOD_PARAMS[method]) - set(COMMON_PARAMS))
    if unknown:
        takes = ", ".join(METHOD_PARAMS[method]) or "only weights"
        raise MergeParameterError(f"merge method {method!r} does not take {', '.join(unknown)} (it takes {takes})")
    return MERGE_METHODS[method](list(adapters), weights, **params)


__all__ = [
    "COMMON_PARAMS",
    "MERGE_METHODS",
    "METHOD_PARAMS",
    "MergedAdapter",
    "MergedModule",
    "PeftUpdate",
    "UnknownMergeMethodError",
    "breadcrumbs",
    "breadcrumbs_ties",
    "core_space",
    "dare_linear",
    "dare_ties",
    "della",
    "della_linear",
    "iso_c",
    "iso_cts",
    "knots",
    "lora_average",
    "magnitude_prune",
    "merge",
    "multislerp",
    "task_arithmetic",
    "task_interference",
    "ties",
    "tsv_m",
]
