"""Adapter Atlas geometry library: load peft LoRA adapters and compute their exact, factored geometry.

No Streamlit here: every function is callable from a notebook or ``python -m geometry``.

    import geometry
    ads = geometry.load("sample_adapters/synthetic")                          # AdapterSet, by name
    geometry.distances(ads, metric="grassmann", kind="v", layers="last:5")
    geometry.inclusion(ads["nli"], ads["paraphrase"])
    m = geometry.merge(ads[["nli", "paraphrase"]], method="ties", density=0.2); m.save("out/")
    geometry.evaluate(m, tasks="sample_adapters/synthetic/tasks")

See :mod:`geometry.api` for the contract; each function names the module holding its maths.
"""

import geometry.distances as _distances_module  # noqa: F401  (made callable below)
import geometry.evaluate as _evaluate_module  # noqa: F401
import geometry.inclusion as _inclusion_module  # noqa: F401
from geometry import api as _api
from geometry.adapter_set import AdapterSet
from geometry.errors import AdapterLoadError, AtlasError, IncompatibleAdaptersError
from geometry.types import Adapter, AdapterConfig, LoraModule, ModuleKey
from geometry.version import __version__ as __version__

load = _api.load
merge = _api.merge
for _name, _function in (("distances", _api.distances), ("inclusion", _api.inclusion), ("evaluate", _api.evaluate)):
    _api._make_callable(f"geometry.{_name}", _function)
del _name, _function

__all__ = [
    "Adapter",
    "AdapterConfig",
    "AdapterLoadError",
    "AdapterSet",
    "AtlasError",
    "IncompatibleAdaptersError",
    "LoraModule",
    "ModuleKey",
    "distances",
    "evaluate",
    "inclusion",
    "load",
    "merge",
]
