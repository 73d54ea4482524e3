"""What the commands share: the CLI's own disk cache (the library touches no disk unless given one), the writers of records as CSV or JSON, comma-separated options."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence

CACHE_ENV = "ADAPTER_ATLAS_CACHE"


def default_cache_dir() -> str:
    """``$ADAPTER_ATLAS_CACHE`` when set, else ``~/.cache/adapter-atlas`` (the store is its ``store/``)."""

    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "adapter-atlas")


def add_cache_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache", default=None, metavar="DIR",
                   help=f"keep results under DIR/store (default: ${CACHE_ENV}, else ~/.cache/adapter-atlas)")
    p.add_argument("--no-cache", action="store_true", help="recompute, reading and writing no cache")


def result_cache(args: argparse.Namespace):
    """The :class:`geometry.cache.ResultCache` of ``--cache`` (``None`` with ``--no-cache``)."""
    if getattr(args, "no_cache", False):
        return None

    from geometry.cache import ResultCache

    size = os.environ.get("ADAPTER_ATLAS_CACHE_MB")
    folder = os.path.join(os.path.expanduser(args.cache or default_cache_dir()), "store")
    return ResultCache(folder, **({"size_mb": size} if size else {}))


def write_records(frame, fmt: str, out: str | None, list_columns: Sequence[str]) -> None:
    """``frame`` as CSV (list columns as JSON arrays) or a JSON list of records (NaN as null)."""

    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value.item() if hasattr(value, "item") else value

    records = [{k: clean(v) for k, v in row.items()} for row in frame.to_dict(orient="records")]
    if fmt == "json":
        text = "[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n"
    else:
        table = frame.copy()
        for col in list_columns:
            table[col] = [json.dumps(clean(list(v))) for v in table[col]]
        text = table.to_csv(index=False)
    if out:
        with open(out, "w", encoding="utf-8") as fh:
            fh.write(text)
    else:
        sys.stdout.write(text)


def kinds_option(value: str | None) -> list[str] | None:
    return [k.strip() for k in value.split(",") if k.strip()] if value else None


def comma_list(choices: Sequence[str] | None):
    """argparse ``type``: one value or several comma-separated (each among ``choices`` when given)."""

    def parse(text: str) -> list[str]:
        values = list(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))
        bad = [v for v in values if choices is not None and v not in choices]
        if not values or bad:
            raise argparse.ArgumentTypeError(
                f"invalid choice: {', '.join(map(repr, bad)) or repr(text)} (choose from {', '.join(choices or ())}; "
                "several: comma-separated)")
        return values

    return parse


def load_adapters(paths: Sequence[str]) -> list:
    """The adapters at ``paths`` (folders, zips, weight files, ``hub:`` ids), DoRA ones with their exact updates
    where their base loads offline (``geometry.resolve_dora``); one ``note:`` line on stderr per DoRA adapter
    saying whether its geometry is exact or the LoRA direction only, and one per base that loads de-quantized
    from a quantized GGUF file (:func:`geometry.runtime.base_models.base_note`)."""
    from geometry.api import resolve_dora_where_possible
    from geometry.io.loader import load_adapter
    from geometry.runtime.base_models import base_note

    adapters, notes = resolve_dora_where_possible([load_adapter(p) for p in paths])
    bases = dict.fromkeys(ad.config.base_model_name_or_path for ad in adapters)
    for note in [*notes, *(n for n in map(base_note, bases) if n)]:
        print(f"note: {note}", file=sys.stderr)
    return adapters
