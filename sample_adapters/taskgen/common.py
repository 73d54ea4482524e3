"""Machinery shared by the task generators: held-out word and template pools, splits, label noise.

Every task is a seeded template grammar. Each open word list (``slot``) and each template family is
split once, deterministically from the task seed, into a *train* pool and a *held-out* pool
(``HELDOUT_FRACTION`` of it). Train examples use only train pools. Validation and test examples
may use both, and every one of them uses at least one held-out word or template, so that accuracy
measures generalisation rather than memory. Closed-class lists (negators, determiners, auxiliaries)
are never held out.

Label noise: a documented fraction of labels is replaced by a different label, uniformly, in every
split (train, validation and test); the flipped rows carry ``"flipped": true``. With noise ``p`` a
perfect classifier scores about ``1 - p`` on the noisy test labels.
"""

from __future__ import annotations

import json
import random
import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HELDOUT_FRACTION = 0.25
SPLITS = ("train", "validation", "test")
#: Default split sizes (examples).
DEFAULT_SIZES = {"train": 2000, "validation": 300, "test": 400}
#: Default fraction of flipped labels in every split.
DEFAULT_NOISE = 0.08


def _rng(seed: int, *parts: str) -> random.Random:
    """A ``random.Random`` seeded by ``seed`` and names (stable across Python runs, unlike ``hash``)."""
    key = "\x1f".join([str(seed), *parts]).encode()
    return random.Random(zlib.crc32(key) ^ (seed * 0x9E3779B1))


def _split_pool(
    items: Sequence[Any], seed: int, name: str, fraction: float = HELDOUT_FRACTION
) -> tuple[list[Any], list[Any]]:
    """Deterministic (train, held-out) partition of ``items``; held-out is ``fraction`` of them."""
    order = list(items)
    _rng(seed, "pool", name).shuffle(order)
    n_held = max(1, round(fraction * len(order))) if len(order) >= 3 else 0
    return order[n_held:], order[:n_held]


@dataclass
class Lexicon:
    """Open word lists split into train / held-out pools, plus closed lists never held out."""

    open_words: dict[str, list[str]]
    closed_words: dict[str, list[str]]
    seed: int
    fraction: float = HELDOUT_FRACTION
    train: dict[str, list[str]] = field(init=False)
    heldout: dict[str, list[str]] = field(init=False)

    def __post_init__(self) -> None:
        self.train, self.heldout = {}, {}
        for slot, words in self.open_words.items():
            if len(set(words)) != len(words):
                dup = sorted({w for w in words if words.count(w) > 1})
                raise ValueError(f"slot {slot!r} lists words twice: {dup}")
            self.train[slot], self.heldout[slot] = _split_pool(words, self.seed, slot, self.fraction)
        # a held-out word that occurs inside a train phrase ("film" in "the first film") would leak
        # into train texts: it goes back to the train pool
        train_text = " " + " | ".join(w for ws in self.train.values() for w in ws) + " "
        for slot, held in self.heldout.items():
            leaking = [w for w in held if re.search(rf"(?<![\w-]){re.escape(w)}(?![\w-])", train_text)]
            self.heldout[slot] = [w for w in held if w not in leaking]
            self.train[slot] += leaking

    def heldout_words(self) -> set[str]:
        return {w for ws in self.heldout.values() for w in ws}


class Ctx:
    """Draws words and templates for one example, remembering whether a held-out item was used.

    ``mode == "train"``: train pools only. ``mode == "eval"``: each draw comes from the held-out pool
    with probability ``p_heldout`` (else from the train pool).
    """

    def __init__(self, rng: random.Random, lexicon: Lexicon, mode: str, seed: int, p_heldout: float = 0.35,
                 families: dict[str, int] | None = None):
        self.rng, self.lex, self.mode, self.seed, self.p_heldout = rng, lexicon, mode, seed, p_heldout
        self.families = {} if families is None else families
        self.used_heldout = False
        self.template_id = ""

    def _held(self, pool_held: Sequence[Any]) -> bool:
        return self.mode == "eval" and bool(pool_held) and self.rng.random() < self.p_heldout

    def w(self, slot: str) -> str:
        """One word of ``slot`` (open or closed list)."""
        if slot in self.lex.closed_words:
            return self.rng.choice(self.lex.closed_words[slot])
        if self._held(self.lex.heldout[slot]):
            self.used_heldout = True
            return self.rng.choice(self.lex.heldout[slot])
        return self.rng.choice(self.lex.train[slot])

    def ws(self, slot: str, k: int) -> list[str]:
        """``k`` distinct words of ``slot``."""
        out: list[str] = []
        while len(out) < k:
            word = self.w(slot)
            if word not in out:
                out.append(word)
        return out

    def pick(self, family: str, options: Sequence[Any]) -> Any:
        """One template of a family; the family's held-out templates appear only in eval splits."""
        self.families[family] = len(options)
        train, held = _split_pool(range(len(options)), self.seed, "templates:" + family)
        if self._held(held):
            self.used_heldout = True
            index = self.rng.choice(held)
        else:
            index = self.rng.choice(train)
        self.template_id = self.template_id + ("+" if self.template_id else "") + f"{family}:{index}"
        return options[index]

    def choice(self, options: Sequence[Any]) -> Any:
        """A plain random choice (closed structure, never held out)."""
        return self.rng.choice(options)

    def coin(self, p: float = 0.5) -> bool:
        return self.rng.random() < p


def heldout_templates(seed: int, family: str, n_options: int) -> list[int]:
    """Indices of the held-out templates of a family (as :meth:`Ctx.pick` splits them)."""
    return sorted(_split_pool(range(n_options), seed, "templates:" + family)[1])


#: A generator: (ctx, label index) -> (text, text_pair or None). It must produce an example whose
#: true label is ``label``.
MakeFn = Callable[[Ctx, int], tuple[str, str | None]]


@dataclass
class TaskSpec:
    """One task: its labels, its word lists and its example generator."""

    name: str
    labels: list[str]
    description: str
    open_words: dict[str, list[str]]
    closed_words: dict[str, list[str]]
    make: MakeFn
    pair: bool = False
    noise: float = DEFAULT_NOISE
    #: Fraction of each open word list held out of training, and the chance that an eval-split draw
    #: comes from the held-out pool.
    heldout_words: float = HELDOUT_FRACTION
    p_heldout: float = 0.35

    def lexicon(self, seed: int) -> Lexicon:
        return Lexicon(self.open_words, self.closed_words, seed, self.heldout_words)


def _clean(text: str) -> str:
    """Collapse spaces, attach punctuation, and write "an" before a vowel ("a artist" -> "an artist")."""
    text = " ".join(text.split())
    text = re.sub(r"\b([Aa]) (?=[aeio])", r"\1n ", text)
    return text.replace(" ,", ",").replace(" .", ".").replace(" '", "'").strip()


def generate(
    spec: TaskSpec, seed: int = 0, sizes: dict[str, int] | None = None, families: dict[str, int] | None = None
) -> dict[str, list[dict]]:
    """All splits of a task: ``{split: [{"text", ["text_pair"], "label", "template", "heldout", "flipped"}]}``.

    Deterministic given ``seed``. Texts are unique across all splits; labels are balanced before noise.
    ``template`` lists the ``family:index`` templates used; ``families`` (when given) is filled with
    each template family's number of templates.
    """
    families = {} if families is None else families
    sizes = dict(DEFAULT_SIZES if sizes is None else sizes)
    lexicon = spec.lexicon(seed)
    seen: set[tuple[str, str | None]] = set()
    out: dict[str, list[dict]] = {}
    for split in SPLITS:
        rng = _rng(seed, spec.name, split)
        n = sizes[split]
        labels = [i % len(spec.labels) for i in range(n)]
        rng.shuffle(labels)
        rows: list[dict] = []
        for label in labels:
            for _attempt in range(1000):
                ctx = Ctx(rng, lexicon, "train" if split == "train" else "eval", seed, spec.p_heldout, families)
                text, pair = spec.make(ctx, label)
                text, pair = _clean(text), (_clean(pair) if pair is not None else None)
                if (text, pair) in seen or (split != "train" and not ctx.used_heldout):
                    continue
                seen.add((text, pair))
                row: dict[str, Any] = {"text": text}
                if spec.pair:
                    row["text_pair"] = pair
                row.update(label=label, template=ctx.template_id, heldout=ctx.used_heldout, flipped=False)
                rows.append(row)
                break
            else:
                raise RuntimeError(f"{spec.name}: could not draw a new unique {split} example")
        _add_noise(rows, spec.noise, len(spec.labels), _rng(seed, spec.name, split, "noise"))
        out[split] = rows
    return out


def _add_noise(rows: list[dict], noise: float, n_labels: int, rng: random.Random) -> None:
    """Replace ``round(noise * len(rows))`` labels by a different label drawn uniformly."""
    for i in rng.sample(range(len(rows)), round(noise * len(rows))):
        rows[i]["label"] = rng.choice([k for k in range(n_labels) if k != rows[i]["label"]])
        rows[i]["flipped"] = True


def write_task(spec: TaskSpec, out_dir: str | Path, seed: int = 0, sizes: dict[str, int] | None = None) -> Path:
    """Write ``<out_dir>/<name>/{train,validation,test}.jsonl`` and ``labels.json``; return the folder."""
    folder = Path(out_dir) / spec.name
    folder.mkdir(parents=True, exist_ok=True)
    families: dict[str, int] = {}
    splits = generate(spec, seed, sizes, families)
    for split, rows in splits.items():
        with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    lexicon = spec.lexicon(seed)
    meta = {
        "task": spec.name,
        "labels": spec.labels,
        "text_fields": ["text", "text_pair"] if spec.pair else ["text"],
        "description": spec.description,
        "seed": seed,
        "label_noise": spec.noise,
        "sizes": {s: len(r) for s, r in splits.items()},
        "heldout_fraction": {"words": spec.heldout_words, "templates": HELDOUT_FRACTION},
        "p_heldout_draw": spec.p_heldout,
        "heldout_words": sorted(lexicon.heldout_words()),
        "heldout_templates": {f: heldout_templates(seed, f, n) for f, n in sorted(families.items())},
        "template_counts": dict(sorted(families.items())),
        "generator": "sample_adapters.taskgen (python -m sample_adapters.train --only-data)",
    }
    (folder / "labels.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return folder
