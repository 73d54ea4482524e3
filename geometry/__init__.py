"""Adapter Atlas geometry library: load peft LoRA adapters and compute their exact, factored geometry.

No Streamlit here: every function is callable from a notebook or ``python -m geometry``.
"""

from geometry.errors import AdapterLoadError, AtlasError, IncompatibleAdaptersError
from geometry.types import Adapter, AdapterConfig, LoraModule, ModuleKey

__all__ = [
    "Adapter",
    "AdapterConfig",
    "AdapterLoadError",
    "AtlasError",
    "IncompatibleAdaptersError",
    "LoraModule",
    "ModuleKey",
]
