"""Align the modules of several adapters before comparing them.

Adapters are comparable module by module when they adapt the same base model: a module key
``(stack, layer, kind)`` present in two adapters must have the same task-vector shape ``(m, n)``.
Ranks may differ (``r1 != r2`` is fine everywhere in the geometry), and so may the target sets:
comparisons use the keys common to all adapters, and :func:`check_compatible` says which keys are
missing where.
"""

from __future__ import annotations

from collections.abc import Sequence

from geometry.errors import IncompatibleAdaptersError
from geometry.types import Adapter, ModuleKey, kind_order, stack_order

#: How many missing keys a warning names before summarising.
_SHOW = 4


def _base(adapter: Adapter) -> str | None:
    base = adapter.config.base_model_name_or_path
    return str(base).strip() or None if base else None


def check_compatible(adapters: Sequence[Adapter], *, strict_base: bool = False) -> list[str]:
    """Warnings about an adapter set, or :class:`IncompatibleAdaptersError` when it cannot be compared.

    Raises when a module key common to two adapters has different shapes (different base models),
    naming both adapters, the module, both shapes and both bases; also when ``strict_base`` is set
    and two ``base_model_name_or_path`` values differ. Otherwise returns human warnings: different
    declared bases (the same model can be named by a hub id and by a local path, so this alone is
    not an error), no module in common, keys missing from some adapters, different ranks.
    """
    warnings: list[str] = []
    if len(adapters) < 2:
        return warnings
    names = [a.name for a in adapters]
    bases = {a.name: _base(a) for a in adapters}
    declared = {b for b in bases.values() if b}
    first_shape: dict[ModuleKey, tuple[str, tuple[int, int]]] = {}
    for ad in adapters:
        for key, mod in sorted(ad.modules.items()):
            shape = mod.shape
            seen = first_shape.setdefault(key, (ad.name, shape))
            if seen[1] != shape:
                other = seen[0]
                raise IncompatibleAdaptersError(
                    f"adapter {ad.name!r} has module {key.label} of shape {shape[0]}x{shape[1]} but adapter "
                    f"{other!r} has {seen[1][0]}x{seen[1][1]}: they adapt different base models "
                    f"(base {bases[ad.name] or 'not declared'!r} vs {bases[other] or 'not declared'!r})"
                )
    if len(declared) > 1:
        detail = ", ".join(f"{n!r}: {bases[n] or 'not declared'}" for n in names)
        msg = f"adapters declare different base models ({detail})"
        if strict_base:
            raise IncompatibleAdaptersError(msg)
        warnings.append(msg + "; module shapes agree, so they are compared anyway")
    common = set(common_keys(adapters))
    if not common:
        warnings.append("the adapters have no module (stack, layer, kind) in common: nothing to compare")
    warnings += _coverage_notes(adapters, set(first_shape), common)
    ranks = {ad.name: sorted({m.rank for k, m in ad.modules.items() if k in common}) for ad in adapters}
    if len({tuple(r) for r in ranks.values()}) > 1:
        detail = ", ".join(f"{n!r}: r={'/'.join(map(str, r))}" for n, r in ranks.items())
        warnings.append(
            f"ranks differ ({detail}); Grassmann distances use min(r1, r2) principal angles, and L2 / cosine "
            "on A alone or B alone are undefined (NaN) between different ranks"
        )
    return warnings


def _coverage_notes(adapters: Sequence[Adapter], union: set[ModuleKey], common: set[ModuleKey]) -> list[str]:
    """One note per cause: the keys outside the common set, grouped by which adapters have them.

    Each group names the smaller side: "only in 'qkvo'" when few adapters have the extra modules,
    "'a', 'b' lack ..." when few lack them. Eleven adapters without one adapter's ``k`` / ``o``
    modules give one line naming that adapter, not ten lines.
    """
    groups: dict[tuple[str, ...], list[ModuleKey]] = {}
    for key in sorted(union - common, key=lambda k: k.order):
        holders = tuple(ad.name for ad in adapters if key in ad.modules)
        groups.setdefault(holders, []).append(key)
    notes = []
    n = len(adapters)
    for holders, keys in groups.items():
        shown = ", ".join(k.label for k in keys[:_SHOW]) + (", ..." if len(keys) > _SHOW else "")
        what = f"{len(keys)} module(s) ({shown})"
        if len(holders) < n - len(holders):
            who = ", ".join(map(repr, holders))
            notes.append(f"{what} only in {who}; comparisons use the modules common to all {n} adapters")
        else:
            lackers = [repr(ad.name) for ad in adapters if ad.name not in holders]
            verb = "lacks" if len(lackers) == 1 else "lack"
            notes.append(f"{', '.join(lackers)} {verb} {what} that the other adapters have; comparisons use the "
                         "common modules only")
    return notes


def common_keys(adapters: Sequence[Adapter], kind: str | None = None, stack: str | None = None) -> list[ModuleKey]:
    """Module keys present in every adapter (optionally of one ``kind`` / ``stack``), sorted."""
    if not adapters:
        return []
    keys = set(adapters[0].modules)
    for ad in adapters[1:]:
        keys &= set(ad.modules)
    return sorted(k for k in keys if (kind is None or k.kind == kind) and (stack is None or k.stack == stack))


def missing_keys(adapters: Sequence[Adapter]) -> dict[str, list[ModuleKey]]:
    """For each adapter name, the keys other adapters have and it lacks (empty lists omitted)."""
    union: set[ModuleKey] = set()
    for ad in adapters:
        union |= set(ad.modules)
    out = {ad.name: sorted(union - set(ad.modules)) for ad in adapters}
    return {n: v for n, v in out.items() if v}


def common_groups(adapters: Sequence[Adapter]) -> list[tuple[str, str]]:
    """The ``(stack, kind)`` groups having at least one common key, in canonical display order."""

    groups = {(k.stack, k.kind) for k in common_keys(adapters)}
    return sorted(groups, key=lambda g: (*stack_order(g[0]), *kind_order(g[1])))
