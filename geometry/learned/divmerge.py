"""DivMerge: task-arithmetic coefficients learned without labels by minimising divergences.

Touayouch, Fosse, Damnati, Lecorve, *DivMerge: a divergence-based model merging method for
multi-tasking*, arXiv 2509.02108v3 (EACL 2026), eq. 4 and Algorithm 1; ``../shared/docs/SCIENCE.md``
section 3. With task vectors ``tau_t = s_t B_t A_t`` (LoRA, factored) and the merged model
``Phi_Gamma = theta0 + sum_t Gamma_t tau_t`` (task level, TL) or one ``Gamma_{t,l}`` per task and
transformer block (layer level, LL; or per module)::

    Gamma* = argmin_Gamma  sum_t  E_{x in X_t}  D( p_{theta_t}(. | x) || p_{Phi_Gamma}(. | x) )

``X_t`` holds unlabeled inputs of task ``t`` only, ``theta_t = theta0 + tau_t`` (the fine-tuned model,
the reference) and ``D`` is the Jensen-Shannon divergence (``divergence="js"``, the default) or the
forward ``KL(p_{theta_t} || p_Phi)`` (``"kl"``), :mod:`geometry.learned.divergences`. Classification
compares the class distributions of task ``t``'s own head; generation the next-token distributions
along the fine-tuned model's greedy continuation (appendix B.1; :mod:`geometry.learned.terms`).
The Gammas are real numbers, possibly negative: no clamping unless ``clamp=True`` (to ``[0, 1]``).

Defaults (the paper's Table 9): Adam (default moments), ``lr = 1e-2``, ``init = 0.5`` (Algorithm 1
says ``1/T``: ``init="uniform"``; both agree for pairs), batches of ``4 x T`` inputs (4 per task),
4 epochs, 200 inputs per task for TL and 400 for LL (the sample tasks have 300 validation inputs: all
300 are used and the run's notes say so), from each task's validation split. Its Figure 4: 25 inputs
per task already beat the baselines.

    from geometry.learned import DivMerge
    run = DivMerge(adapters, "sample_adapters/synthetic/tasks", level="task", divergence="js")
    result = run.fit()                     # or: for state in run.steps(): ...
    result.coefficients, result.merge().save("out/")
"""

from __future__ import annotations

from typing import Any

import torch

from geometry.learned.divergences import divergence as divergence_function
from geometry.learned.run import LearnedMergeRun
from geometry.learned.terms import TaskTerm, reduce_term


class DivMerge(LearnedMergeRun):
    """DivMerge on LoRA adapters (see the module docstring); keywords of :class:`LearnedMergeRun`."""

    method = "divmerge"
    defaults = {"lr": 1e-2, "epochs": 4, "init": 0.5, "samples_task": 200, "samples_layer": 400}

    def __init__(self, adapters: Any, tasks: Any = None, *, divergence: str = "js", **kwargs: Any):
        self._divergence = divergence_function(divergence)  # raises for an unknown name
        super().__init__(adapters, tasks, objective=divergence, **kwargs)

    @property
    def divergence(self) -> str:
        return self.settings.objective

    def term(self, task: TaskTerm, idx: list[int], coefficients: Any, grad: bool = True) -> torch.Tensor:
        logp, mask = task.reference(idx)
        logq, _ = task.merged(idx, coefficients, grad=grad)
        return reduce_term(self._divergence(logp.to(logq.dtype), logq), mask)


def divmerge(adapters: Any, tasks: Any = None, **kwargs: Any):
    """Run :class:`DivMerge` to the end and return its :class:`~geometry.learned.result.LearnedMerge`.

    ``evaluate_at_end=True`` (default) adds the ANP of the final merge on the test splits
    (``limit`` examples per task) when ``tasks`` is given.
    """
    evaluate_at_end = kwargs.pop("evaluate_at_end", tasks is not None)
    limit = kwargs.pop("limit", None)
    progress = kwargs.pop("progress", False)
    return DivMerge(adapters, tasks, **kwargs).fit(evaluate_at_end=evaluate_at_end, limit=limit, progress=progress)
