"""AdaMerging: task-arithmetic coefficients learned by minimising the entropy of the merged predictions.

Yang, Wang, Shen, Liu, Guo, Wang, Tao, *AdaMerging: adaptive model merging for multi-task learning*,
ICLR 2024 (arXiv 2310.02575), eq. 5 and 6; the data-driven baseline of DivMerge (its Table 9 settings).
With ``Phi_Gamma = theta0 + sum_t Gamma_t tau_t`` (task-wise) or one ``Gamma_{t,l}`` per task and
layer (layer-wise)::

    Gamma* = argmin_Gamma  sum_t  E_{x in X_t}  H( p_{Phi_Gamma}(. | x) ),    H(q) = -sum_i q_i log q_i

on unlabeled inputs ``X_t`` of each task, with task ``t``'s own head (classification) or along the
fine-tuned model's greedy continuation (generation, the positions DivMerge uses). No fine-tuned
distribution enters the objective.

Defaults (DivMerge's Table 9): Adam, ``lr = 1e-3`` (classification; ``1e-2`` for generation), 5 epochs,
``init = 0.5``, batches of ``4 x T``, 200 (TL) / 400 (LL) validation inputs per task, no clamping.
The original AdaMerging code differs, and each choice is an option: ``init=0.3``, ``clamp=True``
(coefficients clipped to ``[0, 1]`` after every step), ``split="test"`` (it adapts on the unlabeled
test inputs), ``max_steps=500`` (it runs 500 steps), and "layer" meaning every parameter tensor
(``level="module"`` is the nearest here: one coefficient per adapted module).

    from geometry.learned import AdaMerging
    result = AdaMerging(adapters, "sample_adapters/synthetic/tasks", level="layer").fit()
"""

from __future__ import annotations

from typing import Any

import torch

from geometry.learned.divergences import entropy
from geometry.learned.run import LearnedMergeRun
from geometry.learned.terms import TaskTerm, reduce_term


class AdaMerging(LearnedMergeRun):
    """AdaMerging on LoRA adapters (see the module docstring); keywords of :class:`LearnedMergeRun`."""

    method = "adamerging"
    defaults = {"lr": 1e-3, "epochs": 5, "init": 0.5, "samples_task": 200, "samples_layer": 400}

    def __init__(self, adapters: Any, tasks: Any = None, **kwargs: Any):
        kwargs.pop("objective", None)
        super().__init__(adapters, tasks, objective="entropy", **kwargs)

    @classmethod
    def defaults_for(cls, kind: str) -> dict[str, Any]:
        d = dict(cls.defaults)
        if kind == "generation":
            d["lr"] = 1e-2
        return d

    @property
    def needs_reference(self) -> bool:
        return False

    def term(self, task: TaskTerm, idx: list[int], coefficients: Any, grad: bool = True) -> torch.Tensor:
        logq, mask = task.merged(idx, coefficients, grad=grad)
        return reduce_term(entropy(logq), mask)


def adamerging(adapters: Any, tasks: Any = None, **kwargs: Any):
    """Run :class:`AdaMerging` to the end and return its :class:`~geometry.learned.result.LearnedMerge`."""
    evaluate_at_end = kwargs.pop("evaluate_at_end", tasks is not None)
    limit = kwargs.pop("limit", None)
    progress = kwargs.pop("progress", False)
    return AdaMerging(adapters, tasks, **kwargs).fit(evaluate_at_end=evaluate_at_end, limit=limit, progress=progress)
