"""The one model runtime: a base model, loaded once, run with any set of factored LoRA updates applied.

Everything that runs a model goes through here (scoring, learned merges, token dynamics, generation).
The maths (``h = W0 x + b + sum_t c_t s_t B_t (A_t x)``, never ``B @ A``) is in :mod:`geometry.runtime.model`.

=====================  ==========================================================================
module                 what it holds
=====================  ==========================================================================
``model``              :class:`Runtime` (apply updates, run, generate), its outputs
``updates``            :class:`LoraUpdates`: adapters, merges and raw factors as per-module updates
``hooks``              the forward hook adding the factored update to one base module
``coefficients``       parsing of the coefficients ``c`` (per task, per task and layer, callable)
``modules``            peft module names -> module paths, heads, label counts, shapes
``bases``              base models and tokenizers, loaded once in bounded, clearable caches
``base_models``        portable base names -> local folders or GGUF files (offline); ``base_note``
``gguf_files``         GGUF base files: header read and checked cheaply, load errors, quantization note
``batched``            batched predictions and greedy generation on a plain model; dense writing
=====================  ==========================================================================
"""

from geometry.runtime.bases import MAX_RUNTIMES, cached_runtimes, clear_cache, load_base, load_tokenizer
from geometry.runtime.batched import apply_updates, build_classifier, generate, predict, tokenizer_padding
from geometry.runtime.coefficients import Coefficients
from geometry.runtime.model import Applied, Runtime, RuntimeOutput
from geometry.runtime.updates import LoraUpdates, Update, adapter_updates, as_updates, merge_updates

__all__ = [
    "MAX_RUNTIMES",
    "Applied",
    "Coefficients",
    "LoraUpdates",
    "Runtime",
    "RuntimeOutput",
    "Update",
    "adapter_updates",
    "apply_updates",
    "as_updates",
    "build_classifier",
    "cached_runtimes",
    "clear_cache",
    "generate",
    "load_base",
    "load_tokenizer",
    "merge_updates",
    "predict",
    "tokenizer_padding",
]
