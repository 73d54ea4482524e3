"""Adapter Atlas's library: load peft LoRA adapters, compute their exact factored geometry, merge them.

No Streamlit here, and no disk unless asked: the dashboard, the CLI (``python -m geometry``) and
notebooks call these same functions (:mod:`geometry.api`, where the contract is written)::

    import geometry
    ads = geometry.load("sample_adapters/real")                                   # AdapterSet, by name
    geometry.distances(ads, metric="grassmann", kind="v", layers="last:3")        # DataFrame [n, n]
    geometry.inclusion(ads["mrpc"], ads["stsb"])                                  # one row per module
    m = geometry.merge(ads[["mrpc", "stsb"]], method="ties", density=0.2); m.save("out/")
    geometry.evaluate_merge(m, tasks="sample_adapters/real/tasks").anp            # ANP in %

Where things live: ``io`` (reading adapters), ``linalg`` (the factored linear algebra), ``analysis``
(distances, inclusion, anatomy, maps, tests, token dynamics), ``merging`` (one file per method),
``learned`` (DivMerge, AdaMerging), ``runtime`` (the one model runtime), ``evaluation`` (tasks,
scores, ANP), ``survey`` (hundreds of adapters, out of core), ``cli``.
"""

from typing import TYPE_CHECKING

from geometry.errors import (
    AdapterLoadError,
    AtlasError,
    IncompatibleAdaptersError,
    InvalidArgumentError,
    MergeParameterError,
)
from geometry.version import __version__ as __version__

if TYPE_CHECKING:
    from geometry.adapter_set import AdapterSet
    from geometry.api import (
        VOCABULARY,
        advise,
        anatomy,
        compatibility,
        compress,
        distance_table,
        distance_tensors,
        distances,
        embed,
        evaluate,
        evaluate_merge,
        inclusion,
        inclusion_matrix,
        interference,
        load,
        merge,
        ranks,
        resolve_dora,
        resolve_dora_where_possible,
    )
    from geometry.types import Adapter

#: Public names loaded on first use (PEP 562): ``import geometry`` stays light (no torch, pandas or
#: scipy: ``python -m geometry --version`` and ``--help`` start in milliseconds); the first
#: ``geometry.distances`` imports :mod:`geometry.api` and, when called, what that function needs.
_LAZY: dict[str, str] = {
    "AdapterSet": "geometry.adapter_set",
    "Adapter": "geometry.types",
    **dict.fromkeys(
        ("VOCABULARY", "advise", "anatomy", "compatibility", "compress", "distance_table", "distance_tensors",
         "distances", "embed", "evaluate", "evaluate_merge", "inclusion", "inclusion_matrix", "interference", "load", "merge", "ranks", "resolve_dora",
         "resolve_dora_where_possible"),
        "geometry.api",
    ),
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'geometry' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "VOCABULARY",
    "Adapter",
    "AdapterLoadError",
    "AdapterSet",
    "AtlasError",
    "IncompatibleAdaptersError",
    "InvalidArgumentError",
    "MergeParameterError",
    "advise",
    "anatomy",
    "compatibility",
    "compress",
    "distance_table",
    "distance_tensors",
    "distances",
    "embed",
    "evaluate",
    "evaluate_merge",
    "inclusion",
    "inclusion_matrix",
    "interference",
    "load",
    "merge",
    "ranks",
    "resolve_dora",
    "resolve_dora_where_possible",
]
