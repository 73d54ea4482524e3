"""An ordered set of adapters with unique names: what ``geometry.load`` returns and the API takes.

    ads = geometry.load(["sample_adapters/synthetic/nli", "sample_adapters/synthetic/paraphrase"])
    ads["nli"]            # an Adapter, by name
    ads[["nli"]]          # a smaller AdapterSet
    ads.names, len(ads), list(ads)   # names, count, the Adapters in order
    ads.summary()         # one row per adapter (pandas)

Adapters are never mutated: a rename stores a shallow copy (same tensors, new name), so an
adapter shared through a cache is safe. ``origin[name]`` records where each came from
(``sample:<folder>``, ``upload``, ``hub:<id>``, ``path:<path>``). The dashboard's session set is
this same class (``ui/adapter_set.py`` adds the upload helpers).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator

import pandas as pd

from geometry.errors import InvalidArgumentError
from geometry.io.summary import adapter_summary
from geometry.types import Adapter


class AdapterSet:
    """Ordered adapters with unique display names; ``Adapter.name`` is the display name."""

    def __init__(self, adapters: Iterable[Adapter] = (), origin: str = "upload") -> None:
        self._items: dict[str, Adapter] = {}
        self.origin: dict[str, str] = {}
        for adapter in adapters:
            self.add(adapter, origin=origin)

    # -- reading -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[Adapter]:
        return iter(list(self._items.values()))

    def __getitem__(self, key):
        """``ads["nli"]`` / ``ads[0]``: one Adapter; ``ads[["nli", "qa"]]`` / ``ads[1:]``: an AdapterSet."""
        if isinstance(key, str):
            if key not in self._items:
                raise KeyError(f"no adapter named {key!r} in the set (names: {', '.join(self._items) or 'none'})")
            return self._items[key]
        if isinstance(key, int):
            return list(self._items.values())[key]
        if isinstance(key, slice):
            return self.select(self.names[key])
        if isinstance(key, (list, tuple)):
            return self.select(key)
        raise TypeError(f"index an AdapterSet by name, position, slice or list of names, not {type(key).__name__}")

    def __repr__(self) -> str:
        return f"AdapterSet({len(self)} adapters: {', '.join(self._items) or 'empty'})"

    def copy(self) -> AdapterSet:
        """A new set of the same adapters (the same :class:`Adapter` objects, which nothing changes in
        place: renaming replaces one) with the same origins; adding, renaming or removing in either set
        leaves the other as it was."""
        out = AdapterSet()
        out._items = dict(self._items)
        out.origin = dict(self.origin)
        return out

    @property
    def names(self) -> list[str]:
        return list(self._items)

    @property
    def adapters(self) -> list[Adapter]:
        return list(self._items.values())

    def items(self) -> list[tuple[str, Adapter]]:
        return list(self._items.items())

    def subset(self, names: Iterable[str]) -> list[Adapter]:
        """The adapters named ``names`` that are in the set, in the order given (unknown names skipped)."""
        return [self._items[n] for n in names if n in self._items]

    def select(self, names: Iterable[str]) -> AdapterSet:
        """A new set holding ``names`` (in that order); raises ``KeyError`` naming an unknown one and
        ``ValueError`` naming a repeated one (a set holds each adapter once)."""
        names = list(names)
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise InvalidArgumentError(f"adapters named more than once: {', '.join(map(repr, repeated))}")
        out = AdapterSet()
        for n in names:
            adapter = self[n]
            out._items[n] = adapter
            out.origin[n] = self.origin.get(n, "upload")
        return out

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
            raise InvalidArgumentError(f"no adapter named {old!r} in the set")
        if not new:
            raise InvalidArgumentError("a new name cannot be empty")
        if new == old:
            return old
        if new in self._items:
            raise InvalidArgumentError(f"an adapter named {new!r} is already in the set")
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
        """Compact table of the set: name, base, format (peft / diffusers / kohya), variant (LoRA, rsLoRA, DoRA,
        AdaLoRA, LoHa, LoKr), r, alpha, targets, modules, parameters."""

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
                    "format": info.get("format", "peft"),
                    "variant": info.get("variant", "LoRA"),
                    "r": info.get("r", adapter.config.r),
                    "alpha": info.get("alpha", adapter.config.lora_alpha),
                    "targets": targets,
                    "modules": info.get("n_modules", len(adapter.modules)),
                    "parameters": info.get("n_params", adapter.n_params()),
                }
            )
        return pd.DataFrame(
            rows, columns=["name", "base", "format", "variant", "r", "alpha", "targets", "modules", "parameters"])
