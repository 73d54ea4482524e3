"""Seeded template-grammar generators of the sample tasks (see :mod:`sample_adapters.taskgen.common`).

``TASKS`` maps each task name to its :class:`~sample_adapters.taskgen.common.TaskSpec`; the designed
relatedness: the two sentiment tasks share grammar and polarity words; ``nli`` and ``paraphrase`` are
both sentence-pair tasks about meaning; ``acceptability``, ``question`` and ``negation`` share one
clause grammar; ``news_topic`` stands apart.
"""

from __future__ import annotations

from sample_adapters.taskgen.common import DEFAULT_SIZES, TaskSpec, generate, write_task
from sample_adapters.taskgen.pairs import NLI, PARAPHRASE
from sample_adapters.taskgen.sentiment import MOVIES, PRODUCTS
from sample_adapters.taskgen.syntax import ACCEPTABILITY, NEGATION, QUESTION
from sample_adapters.taskgen.topic import NEWS

TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (MOVIES, PRODUCTS, NEWS, NLI, PARAPHRASE, ACCEPTABILITY, QUESTION, NEGATION)
}

__all__ = ["DEFAULT_SIZES", "TASKS", "TaskSpec", "generate", "write_task"]
