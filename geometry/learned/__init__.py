"""Learned merges: task-arithmetic coefficients fitted on unlabeled inputs (DivMerge, AdaMerging).

One concept per module:

=====================  ====================================================================
module                 what
=====================  ====================================================================
``divergences``        ``KL(p || q)``, ``JS(p, q)``, ``H(q)`` on log-probabilities
``data``               the unlabeled inputs of each task (validation split or a file, seeded)
``layout``             the coefficients' shape: per task (TL), per task and layer (LL), per module
``terms``              one task's term: reference distributions (cached) and merged predictions
``run``                the Adam loop, step by step (``steps()``, ``stop()``, ``evaluate()``)
``divmerge``           DivMerge (divergence to each fine-tuned model; Touayouch et al. 2025)
``adamerging``         AdaMerging (entropy of the merged predictions; Yang et al. 2024)
``result``             :class:`LearnedMerge`: coefficients, history, ``merge()`` -> task arithmetic
=====================  ====================================================================

    import geometry
    from geometry.learned import DivMerge, divmerge
    ads = geometry.load(["sample_adapters/synthetic/nli", "sample_adapters/synthetic/paraphrase"])
    result = divmerge(ads, "sample_adapters/synthetic/tasks", level="task", divergence="js")
    result.frame()                      # coefficients, adapters x layers
    result.anp, result.merge().save("out/")

    run = DivMerge(ads, "sample_adapters/synthetic/tasks", level="layer")
    for state in run.steps(evaluate_every=20, limit=100):
        ...                              # state.step, state.objective, state.coefficients, state.anp
"""

from geometry.errors import UnlabeledDataError
from geometry.learned.adamerging import AdaMerging, adamerging
from geometry.learned.data import UnlabeledInputs, parse_unlabeled, read_unlabeled
from geometry.learned.divergences import entropy, js_divergence, kl_divergence
from geometry.learned.divmerge import DivMerge, divmerge
from geometry.learned.layout import LEVELS, CoefficientLayout
from geometry.learned.result import LearnedMerge
from geometry.learned.run import LearnedMergeRun, Settings, StepState

#: method name -> run class
METHODS = {"divmerge": DivMerge, "adamerging": AdaMerging}

__all__ = [
    "LEVELS",
    "METHODS",
    "AdaMerging",
    "CoefficientLayout",
    "DivMerge",
    "LearnedMerge",
    "LearnedMergeRun",
    "Settings",
    "StepState",
    "UnlabeledDataError",
    "UnlabeledInputs",
    "adamerging",
    "divmerge",
    "entropy",
    "js_divergence",
    "kl_divergence",
    "parse_unlabeled",
    "read_unlabeled",
]
