"""Small text helpers shared by messages and notes."""

from __future__ import annotations

from collections.abc import Iterable


def ranges(values: Iterable[int]) -> str:
    """Integers as compact runs: ``[0, 1, 2, 5]`` -> ``"0-2, 5"`` (sorted, duplicates dropped; ``"none"`` if empty)."""
    runs: list[list[int]] = []
    for v in sorted({int(x) for x in values}):
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs) if runs else "none"


def module_span(stack: str, layers: Iterable[int], kind: str) -> str:
    """Module labels of one kind over several layers: ``model.3.v``, ``model.1-2.q``, ``model.{0-2, 5}.q``."""
    text = ranges(layers)
    return f"{stack}.{text if ',' not in text else '{' + text + '}'}.{kind}"
