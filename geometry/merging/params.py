"""The parameters merge methods take: one table shared by the command line and the Merge page.

:data:`PARAMS` describes each parameter name once (its kind, its allowed values or range and a
one-line help); :func:`default` reads a method's default from its signature (the function is the
single source of defaults); :func:`parse` turns a ``NAME=VALUE`` string (the CLI's ``--param``)
into a typed value with an error naming the parameter and what was expected.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from geometry.errors import MergeParameterError


@dataclass(frozen=True)
class Param:
    """One merge parameter: ``kind`` is ``"float"``, ``"int"``, ``"bool"`` or ``"choice"``."""

    name: str
    kind: str
    help: str
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()


PARAMS: dict[str, Param] = {p.name: p for p in (
    Param("density", "float", "fraction of each task vector's entries kept", 0.0, 1.0),
    Param("seed", "int", "random seed of the drop masks (per module: the result does not depend on module order)",
          0, 2**31 - 1),
    Param("rank", "int", "rank of each merged module (factored SVD; the energy kept is reported)", 1, 1 << 20),
    Param("keep_dense", "bool", "store the dense (m, n) update instead of its factors (small models, tests)"),
    Param("majority_sign_method", "choice", "sign election: by total mass or by count", choices=("total", "frequency")),
    Param("gamma", "float", "fraction of the largest magnitudes removed first (Breadcrumbs' outliers)", 0.0, 1.0),
    Param("per_row", "bool", "rank magnitudes within each row (the Breadcrumbs authors' code) instead of the module"),
    Param("epsilon", "float", "half-width of DELLA's keep-probability window around the density", 0.0, 0.5),
    Param("rescale", "choice", "DELLA's rescale of kept entries: 1/p (paper), L1 norm (mergekit) or none",
          choices=("probability", "l1", "none")),
    Param("scaling", "float", "a factor on the merged update (the paper's lambda)", -10.0, 10.0),
    Param("merge_method", "choice", "the merge run in the shared basis (KnOTS: on the coordinates; Core Space: on "
          "the cores)", choices=("ties", "dare_ties", "dare_linear", "task_arithmetic", "iso_c", "tsv")),
    Param("scale_coordinates", "bool", "KnOTS: merge S V_t^T (the authors' default) instead of V_t^T"),
    Param("alpha", "float", "a factor on the merged update (the papers' alpha, chosen on validation data there)",
          -10.0, 10.0),
    Param("fraction", "float", "TSV-M: fraction of each task's components kept (empty: all non-zero ones, up to "
          "min(m, n) / T)", 0.0, 1.0),
    Param("spectrum", "choice", "Iso: the mean singular value over the rank of the sum (default) or over all "
          "min(m, n) values, zeros included (the authors' literal mean)", choices=("rank", "full")),
    Param("common_space_fraction", "float", "Iso-CTS: fraction of the directions given to the common subspace",
          0.0, 1.0),
)}

#: choices of a parameter that depend on the method (method -> parameter -> choices)
METHOD_CHOICES: dict[str, dict[str, tuple[str, ...]]] = {
    "knots": {"merge_method": ("ties", "dare_ties", "dare_linear", "task_arithmetic")},
}


def choices(method: str, name: str) -> tuple[str, ...]:
    """The values ``name`` may take for ``method``."""
    return METHOD_CHOICES.get(method, {}).get(name, PARAMS[name].choices)


def default(method: Any, name: str) -> Any:
    """The default of parameter ``name`` in the signature of the method function ``method``."""
    value = inspect.signature(method).parameters[name].default
    return None if value is inspect.Parameter.empty else value


def density_default(method: str, chosen: dict[str, Any]) -> float | None:
    """The density a method uses when none is given; for KnOTS / Core Space, that of the chosen
    ``merge_method`` (``None`` when it takes no density: task arithmetic, Iso-C, TSV)."""
    from geometry.merging import MERGE_METHODS
    from geometry.merging.knots import DEFAULT_DENSITY

    value = default(MERGE_METHODS[method], "density") if "density" in inspect.signature(MERGE_METHODS[method]).parameters else None
    if value is not None:
        return float(value)
    inner = chosen.get("merge_method", default(MERGE_METHODS[method], "merge_method")
                       if "merge_method" in inspect.signature(MERGE_METHODS[method]).parameters else None)
    return DEFAULT_DENSITY.get(inner)


def parse(text: str, takes: tuple[str, ...], method: str) -> tuple[str, Any]:
    """``"NAME=VALUE"`` -> ``(name, typed value)``; ``ValueError`` naming what was expected."""
    name, sep, raw = text.partition("=")
    name, raw = name.strip().replace("-", "_"), raw.strip()
    if not sep or not name:
        raise MergeParameterError(f"--param {text!r}: expected NAME=VALUE, e.g. gamma=0.01")
    if name not in takes or name not in PARAMS:
        raise MergeParameterError(f"--param {name}: merge method {method!r} does not take it (it takes {', '.join(takes) or 'only weights'})")
    p = PARAMS[name]
    if p.kind == "choice":
        allowed = choices(method, name)
        if raw not in allowed:
            raise MergeParameterError(f"--param {name}={raw}: expected one of {', '.join(allowed)}")
        return name, raw
    if p.kind == "bool":
        if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise MergeParameterError(f"--param {name}={raw}: expected true or false")
        return name, raw.lower() in ("true", "1", "yes")
    try:
        value = int(raw) if p.kind == "int" else float(raw)
    except ValueError:
        raise MergeParameterError(f"--param {name}={raw}: expected {'an integer' if p.kind == 'int' else 'a number'}") from None
    return name, value
