"""The adapter set a dashboard session works on: ordered, uniquely named, loaded through the library.

Pure Python (no Streamlit): the sidebar callbacks and the tests call the same functions. A load
that fails raises an :class:`~geometry.errors.AtlasError` inside the library; here it becomes one
message in the returned error list and the set keeps every adapter it had.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd

from geometry.errors import AtlasError
from geometry.types import Adapter

REPO = Path(__file__).resolve().parents[1]
#: Environment variable that points the dashboard at another folder of sample adapters (tests).
SAMPLES_ENV = "ADAPTER_ATLAS_SAMPLES"
#: File names the uploader accepts.
UPLOAD_TYPES = ("zip", "json", "safetensors", "bin")


def samples_dir() -> Path:
    """``$ADAPTER_ATLAS_SAMPLES`` when set, else ``<repo>/sample_adapters``."""
    return Path(os.environ.get(SAMPLES_ENV) or REPO / "sample_adapters")


def list_sample_adapters(root: Path | str | None = None) -> list[Path]:
    """Every folder under ``root`` (default :func:`samples_dir`) holding an ``adapter_config.json``."""
    root = Path(root) if root is not None else samples_dir()
    if not root.is_dir():
        return []
    return sorted({p.parent for p in root.rglob("adapter_config.json") if ".git" not in p.parts})


def sample_name(path: Path, root: Path | str | None = None) -> str:
    """Display name of a sample adapter: its folder path under ``root`` joined with ``/``."""
    try:
        return "/".join(Path(path).relative_to(Path(root or samples_dir())).parts) or Path(path).name
    except ValueError:
        return Path(path).name


def _error_text(exc: BaseException, what: str) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if what in text else f"{what}: {text}"


class AdapterSet:
    """Ordered adapters with unique display names; ``Adapter.name`` is the display name.

    Adapters are never mutated: a rename stores a shallow copy (same tensors, new name), so an
    adapter shared through a cache is safe. ``origin[name]`` records where each came from
    (``sample:<folder>``, ``upload``, ``hub:<id>``) so that the URL can name sample adapters.
    """

    def __init__(self) -> None:
        self._items: dict[str, Adapter] = {}
        self.origin: dict[str, str] = {}

    # -- reading -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __getitem__(self, name: str) -> Adapter:
        return self._items[name]

    @property
    def names(self) -> list[str]:
        return list(self._items)

    @property
    def adapters(self) -> list[Adapter]:
        return list(self._items.values())

    def subset(self, names: Iterable[str]) -> list[Adapter]:
        return [self._items[n] for n in names if n in self._items]

    def sample_names(self) -> list[str]:
        """Folder names of the adapters that came from ``sample_adapters/`` (they fit in a URL).

        A renamed sample keeps its folder name here: a link reopens it under that name.
        """
        origins = (self.origin.get(n, "") for n in self._items)
        return [o.removeprefix("sample:") for o in origins if o.startswith("sample:")]

    # -- editing -------------------------------------------------------------------------------
    def unique_name(self, wanted: str) -> str:
        wanted = (wanted or "adapter").strip() or "adapter"
        if wanted not in self._items:
            return wanted
        i = 2
        while f"{wanted}-{i}" in self._items:
            i += 1
        return f"{wanted}-{i}"

    def add(self, adapter: Adapter, origin: str = "upload", name: str | None = None) -> str:
        """Add ``adapter`` under a unique display name (``name`` or its own); returns that name."""
        final = self.unique_name(name or adapter.name)
        self._items[final] = adapter if adapter.name == final else dataclasses.replace(adapter, name=final)
        self.origin[final] = origin
        return final

    def rename(self, old: str, new: str) -> str:
        """Rename ``old`` to ``new`` keeping its position; raises ``ValueError`` on a bad name."""
        new = (new or "").strip()
        if old not in self._items:
            raise ValueError(f"no adapter named {old!r} in the set")
        if not new:
            raise ValueError("a new name cannot be empty")
        if new == old:
            return old
        if new in self._items:
            raise ValueError(f"an adapter named {new!r} is already in the set")
        self._items = {
            (new if k == old else k): (dataclasses.replace(v, name=new) if k == old else v)
            for k, v in self._items.items()
        }
        self.origin[new] = self.origin.pop(old, "upload")
        return new

    def remove(self, names: Iterable[str]) -> None:
        for name in list(names):
            self._items.pop(name, None)
            self.origin.pop(name, None)

    def summary(self) -> pd.DataFrame:
        """Compact table of the set: name, base, r, alpha, targets, modules, parameters."""
        from geometry.loader import adapter_summary

        rows = []
        for name, adapter in self._items.items():
            info = adapter_summary(adapter, modules=False)
            targets = info.get("targets", adapter.config.target_modules)
            if isinstance(targets, (list, tuple, set)):
                targets = ", ".join(map(str, targets))
            rows.append(
                {
                    "name": name,
                    "base": str(info.get("base") or "?").rstrip("/").split("/")[-1],
                    "r": info.get("r", adapter.config.r),
                    "alpha": info.get("alpha", adapter.config.lora_alpha),
                    "targets": targets,
                    "modules": info.get("n_modules", len(adapter.modules)),
                    "parameters": info.get("n_params", adapter.n_params()),
                }
            )
        return pd.DataFrame(rows, columns=["name", "base", "r", "alpha", "targets", "modules", "parameters"])


# -- loading ----------------------------------------------------------------------------------
def load_sample_set(paths: Sequence[Path], root: Path | str | None = None) -> tuple[AdapterSet, list[str]]:
    """A new set holding the sample adapters at ``paths``; failures become error messages."""
    from geometry.loader import load_adapter

    aset, errors = AdapterSet(), []
    for path in paths:
        name = sample_name(path, root)
        try:
            aset.add(load_adapter(str(path), name=name), origin=f"sample:{name}", name=name)
        except (AtlasError, OSError, ValueError) as exc:
            errors.append(_error_text(exc, name))
    return aset, errors


def load_uploads(aset: AdapterSet, files: Sequence[tuple[str, bytes]]) -> tuple[list[str], list[str]]:
    """Load uploaded files into ``aset``: each ``.zip`` is one adapter; the other files together
    (``adapter_config.json`` + ``adapter_model.safetensors`` or ``.bin``) form one more.

    Returns ``(added names, error messages)``; an adapter that fails leaves the set untouched.
    """
    from geometry.loader import load_files, load_zip_bytes

    added, errors = [], []
    loose: dict[str, bytes] = {}
    for filename, data in files:
        base = Path(filename).name
        if base.lower().endswith(".zip"):
            try:
                adapter = load_zip_bytes(data, name=Path(base).stem)
                added.append(aset.add(adapter, origin="upload"))
            except (AtlasError, OSError, ValueError) as exc:
                errors.append(_error_text(exc, base))
        else:
            loose[base] = data
    if loose:
        configs = [n for n in loose if n.endswith(".json")]
        label = " + ".join(sorted(loose))
        if len(configs) > 1:
            errors.append(
                f"{label}: several config files in one upload ({', '.join(configs)}); upload one adapter's "
                "adapter_config.json with its weights file at a time, or each adapter as a .zip"
            )
        else:
            try:
                added.append(aset.add(load_files(loose), origin="upload"))
            except (AtlasError, OSError, ValueError) as exc:
                errors.append(_error_text(exc, label))
    return added, errors


def load_hub_id(aset: AdapterSet, repo_id: str) -> tuple[list[str], list[str]]:
    """Load ``owner/name`` from the Hugging Face hub into ``aset``; returns ``(added, errors)``."""
    from geometry.loader import load_hub

    repo_id = (repo_id or "").strip()
    if not repo_id:
        return [], ["enter a hub id such as owner/name"]
    try:
        return [aset.add(load_hub(repo_id), origin=f"hub:{repo_id}")], []
    except (AtlasError, OSError, ValueError) as exc:
        return [], [_error_text(exc, repo_id)]
