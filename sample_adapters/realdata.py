"""Build the real-task folders from ``../shared/datasets``: ``python -m sample_adapters.realdata``.

Eight classification tasks (GLUE first) in the project's task format (``{train,validation,test}.jsonl``
with ``text`` [+ ``text_pair``] and an integer ``label``, plus ``labels.json``), written to
``sample_adapters/real/tasks/``. Every split is a seeded sample of the source files; a text (or text
pair) never appears in two splits of a task (exact match after lower-casing and collapsing spaces:
rows of a later split that repeat an earlier split's text are dropped, and counted in ``labels.json``).

``--check`` rebuilds into a temporary folder and compares every output file's sha256 with
``DATA.md``'s manifest (``MANIFEST`` below), and every source file's sha256 with the one recorded:
it fails when the shared files or the committed subsets changed.

Where GLUE's test labels are not public, its dev set stands in for the test split (said per task in
:data:`TASKS` and in ``DATA.md``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "real" / "tasks"
SHARED = ROOT.parent.parent / "shared" / "datasets"
MANIFEST = ROOT / "real" / "tasks" / "MANIFEST.json"
SEED = 0
#: most training rows committed per task (1,000 steps of 16 see 16,000 rows: two epochs of 8,000)
MAX_TRAIN = 8000
TEST_SIZE = 1000
VALIDATION_SIZE = 500

Row = dict  # {"text", ["text_pair"], "label"}


@dataclass(frozen=True)
class Source:
    repo: str
    commit: str
    path: str
    licence: str


@dataclass(frozen=True)
class Task:
    name: str
    labels: tuple[str, ...]
    description: str
    splits_note: str
    sources: dict[str, Source]  # file under ../shared/datasets -> where it came from
    read: Callable[[Path], dict[str, list[Row]]]  # raw pools: train / validation / test (may be "pool")
    metric: str = "accuracy"  # the GLUE metric reported beside accuracy


def _tsv(path: Path, header: bool = True) -> list[list[str]]:
    with open(path, encoding="utf-8-sig", newline="") as fh:
        rows = [line.rstrip("\n").rstrip("\r").split("\t") for line in fh]
    return [r for r in rows[1 if header else 0:] if any(c.strip() for c in r)]


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


# -- readers: raw rows per split (before sampling and de-duplication) ------------------------------
def _sst2(d: Path):
    rd = lambda f: [{"text": _clean(s), "label": int(y)} for s, y in _tsv(d / "glue/SST-2" / f)]  # noqa: E731
    return {"train": rd("train.tsv"), "validation": rd("dev.tsv"), "test": rd("test-labeled.tsv")}


def _cola(d: Path):
    rd = lambda f: [{"text": _clean(x), "label": int(y)} for x, y in _tsv(d / "glue/CoLA" / f)]  # noqa: E731
    return {"pool": rd("train.tsv"), "test": rd("test_idd.tsv") + rd("test_ood.tsv")}


def _mrpc(d: Path):
    rd = lambda f: [{"text": _clean(a), "text_pair": _clean(b), "label": int(q)}  # noqa: E731
                    for q, _, _, a, b in _tsv(d / "glue/MRPC" / f)]
    return {"pool": rd("msr_paraphrase_train.txt"), "test": rd("msr_paraphrase_test.txt")}


_ENTAIL = {"entailment": 0, "not_entailment": 1}


def _rte(d: Path):
    rd = lambda f: [{"text": _clean(a), "text_pair": _clean(b), "label": _ENTAIL[y]}  # noqa: E731
                    for _, a, b, y in _tsv(d / "glue/RTE" / f)]
    return {"pool": rd("train.tsv"), "test": rd("dev.tsv")}


def _qnli(d: Path):
    rows = [{"text": _clean(q), "text_pair": _clean(s), "label": _ENTAIL[y]} for _, q, s, y in _tsv(d / "glue/QNLI/dev.tsv")]
    return {"all": rows}


def _stsb(d: Path):
    def row(a, b, score):
        return {"text": _clean(a), "text_pair": _clean(b), "label": int(float(score) >= 3.0), "score": float(score)}

    train = [row(r[7], r[8], r[9]) for r in _tsv(d / "glue/STS-B/train.tsv")]
    dev = [row(r[7], r[8], r[9]) for r in _tsv(d / "glue/STS-B/dev.tsv")]
    test = [row(r[5], r[6], r[4]) for r in _tsv(d / "glue/STS-B/original/sts-test.tsv", header=False)]
    return {"train": train, "validation": dev, "test": test}


_AG = ("World", "Sports", "Business", "Sci/Tech")


def _agnews(d: Path):
    rd = lambda f: [{"text": _clean(t.replace("\\", " ")), "label": _AG.index(y)}  # noqa: E731
                    for t, y in _tsv(d / "agnews" / f, header=False)]
    return {"pool": rd("dev.tsv"), "test": rd("test.tsv")}


_EMO = ("sadness", "joy", "love", "anger", "fear", "surprise")


def _emotion(d: Path):
    def rd(f):
        with open(d / "emotion" / f, encoding="utf-8") as fh:
            lines = [line.rstrip("\n").rsplit(";", 1) for line in fh][1:]
        return [{"text": _clean(t), "label": _EMO.index(y)} for t, y in lines if t.strip()]

    return {"train": rd("train.txt"), "validation": rd("val.txt"), "test": rd("test.txt")}


GLUE = "GLUE terms (each dataset's own licence)"
TASKS: dict[str, Task] = {t.name: t for t in [
    Task("sst2", ("negative", "positive"), "GLUE SST-2: movie-review sentence sentiment.",
         "train: GLUE train (phrases); validation: GLUE dev; test: GLUE test with labels (test-labeled.tsv)",
         {f"glue/SST-2/{f}": Source("eyalbd2/Reproducing-AutoPrompt", "6288fb5b", f"glue_data/SST-2/{f}",
                                    "repository Apache-2.0; " + GLUE)
          for f in ("train.tsv", "dev.tsv", "test-labeled.tsv")}, _sst2),
    Task("cola", ("unacceptable", "acceptable"), "GLUE CoLA: grammatical acceptability (lower-cased, tokenised).",
         "train / validation: GLUE train, split; test: GLUE dev (in + out of domain) standing in for GLUE's unlabelled test",
         {f"glue/CoLA/{f}": Source("felipefreitas93/NLPdatasets", "b7d487e4", f"CoLA/{f}", "no licence file; " + GLUE)
          for f in ("train.tsv", "test_idd.tsv", "test_ood.tsv")}, _cola, metric="matthews"),
    Task("mrpc", ("not_paraphrase", "paraphrase"), "GLUE MRPC: are the two news sentences paraphrases?",
         "train / validation: MRPC train, split; test: MRPC test (labelled)",
         {f"glue/MRPC/{f}": Source("mieseung/Cutoff_with_Attribution", "0ef7460e", f"glue_data/MRPC/{f}",
                                   "Microsoft Research Paraphrase Corpus licence (research use)")
          for f in ("msr_paraphrase_train.txt", "msr_paraphrase_test.txt")}, _mrpc, metric="f1"),
    Task("rte", ("entailment", "not_entailment"), "GLUE RTE: does the first text entail the second?",
         "train / validation: GLUE train, split; test: GLUE dev (277 rows, all the labelled held-out data) "
         "standing in for GLUE's unlabelled test",
         {f"glue/RTE/{f}": Source("marcwww/nlu_eval", "1403aef7", f"data/RTE/{f}", GLUE)
          for f in ("train.tsv", "dev.tsv")}, _rte),
    Task("qnli", ("entailment", "not_entailment"), "GLUE QNLI: does the sentence answer the question?",
         "train / validation / test: GLUE dev (the only labelled file here), split; GLUE's train is not in ../shared",
         {"glue/QNLI/dev.tsv": Source("jonny-vr/LLMCBench", "720be179", "data/QNLI/dev.tsv", "CC BY-SA 4.0 (from SQuAD)")},
         _qnli),
    Task("stsb", ("dissimilar", "similar"), "GLUE STS-B binarised: similarity score >= 3 of 5 is 'similar'.",
         "train: GLUE train; validation: GLUE dev; test: STS-B test with scores (original/sts-test.tsv); "
         "binarised at score >= 3.0 (52 % positive in train)",
         {"glue/STS-B/train.tsv": Source("mieseung/Cutoff_with_Attribution", "0ef7460e", "glue_data/STS-B/train.tsv",
                                         "per-source licences (glue/STS-B/LICENSE.txt)"),
          "glue/STS-B/dev.tsv": Source("mieseung/Cutoff_with_Attribution", "0ef7460e", "glue_data/STS-B/dev.tsv",
                                       "per-source licences (glue/STS-B/LICENSE.txt)"),
          "glue/STS-B/original/sts-test.tsv": Source("mieseung/Cutoff_with_Attribution", "0ef7460e",
                                                     "glue_data/STS-B/original/sts-test.tsv",
                                                     "per-source licences (glue/STS-B/LICENSE.txt)")}, _stsb),
    Task("agnews", _AG, "AG News: topic of a news item (4 classes).",
         "train / validation: the 10,000-row dev file carved from AG's train, split; test: AG's official test",
         {f"agnews/{f}": Source("forest-snow/alps", "3c7ef2c9", f"data/agnews/{f}",
                                "repository MIT; AG's corpus for non-commercial research")
          for f in ("dev.tsv", "test.tsv")}, _agnews),
    Task("emotion", _EMO, "dair-ai emotion: the emotion of an English tweet (6 classes).",
         "train / validation / test: the dataset's own splits",
         {f"emotion/{f}": Source("niuzaisheng/AttExplainer", "fc8080f7", f"data/emotion/{f}",
                                 "repository MIT; dataset for research")
          for f in ("train.txt", "val.txt", "test.txt")}, _emotion),
]}


def _key(row: Row) -> str:
    return (row["text"].lower() + "\x1f" + row.get("text_pair", "").lower()).strip()


def _sample(rows: list[Row], n: int, rng: random.Random) -> list[Row]:
    rows = list(rows)
    rng.shuffle(rows)
    return rows[:n]


def _dedupe(rows: list[Row], seen: set[str]) -> tuple[list[Row], int]:
    """Rows whose text is not in ``seen`` and not repeated earlier in ``rows``."""
    out, dropped = [], 0
    for r in rows:
        k = _key(r)
        if k in seen:
            dropped += 1
            continue
        seen.add(k)
        out.append(r)
    return out, dropped


def build_task(task: Task, shared: Path) -> tuple[dict[str, list[Row]], dict]:
    """The three splits of ``task`` and its ``labels.json`` record (sizes, rows dropped as duplicates).

    Test is drawn first (the scarcest), then validation, then train; each later split drops the rows
    whose text an earlier split holds (and its own repeats)."""
    rng = random.Random(f"{SEED}:{task.name}")
    raw = task.read(shared)
    if "all" in raw:  # one labelled file: test, validation and train carved from it
        rows = _sample(raw["all"], len(raw["all"]), rng)
        raw = {"test": rows[:TEST_SIZE], "validation": rows[TEST_SIZE:TEST_SIZE + VALIDATION_SIZE],
               "train": rows[TEST_SIZE + VALIDATION_SIZE:]}
    if "pool" in raw:  # the training file gives validation as well
        pool = _sample(raw.pop("pool"), 10**9, rng)
        val_n = VALIDATION_SIZE if len(pool) > 4 * VALIDATION_SIZE else len(pool) // 10
        raw["validation"], raw["train"] = pool[:val_n], pool[val_n:]
    out: dict[str, list[Row]] = {}
    dropped: dict[str, int] = {}
    seen: set[str] = set()
    for split, cap in (("test", TEST_SIZE), ("validation", VALIDATION_SIZE), ("train", MAX_TRAIN)):
        rows, dropped[split] = _dedupe(_sample(raw[split], 10**9, rng), seen)
        out[split] = rows[:cap]
        seen = set().union(*({_key(r) for r in out[s]} for s in out))
    meta = {
        "task": task.name, "labels": list(task.labels), "description": task.description,
        "text_fields": ["text", "text_pair"] if "text_pair" in out["test"][0] else ["text"],
        "splits": task.splits_note, "glue_metric": task.metric,
        "sizes": {s: len(out[s]) for s in ("train", "validation", "test")},
        "duplicates_dropped": dropped, "seed": SEED,
        "sources": {f: vars(s) for f, s in task.sources.items()},
        "generator": "python -m sample_adapters.realdata",
    }
    return out, meta


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_tasks(out: Path, shared: Path, names: list[str] | None = None) -> dict:
    """Write every task under ``out``; returns the manifest (sha256 of every source and output file)."""
    manifest: dict = {"sources": {}, "outputs": {}}
    for name in names or list(TASKS):
        task = TASKS[name]
        for f in task.sources:
            if not (shared / f).is_file():
                raise FileNotFoundError(f"{shared / f}: source file of task {name} is missing")
            manifest["sources"][f] = _sha(shared / f)
        splits, meta = build_task(task, shared)
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        for split, rows in splits.items():
            with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as fh:
                for r in rows:
                    fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        (folder / "labels.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        for f in sorted(folder.iterdir()):
            manifest["outputs"][f"{name}/{f.name}"] = _sha(f)
    return manifest


def check(shared: Path = SHARED, manifest_file: Path = MANIFEST) -> list[str]:
    """Problems found rebuilding the tasks from ``shared`` against the committed manifest (empty: all equal)."""
    want = json.loads(manifest_file.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        got = write_tasks(Path(tmp), shared)
        problems = [f"source {f}: sha256 {got['sources'].get(f)} != recorded {h}"
                    for f, h in want["sources"].items() if got["sources"].get(f) != h]
        problems += [f"output {f}: rebuilt sha256 {got['outputs'].get(f)} != committed {h}"
                     for f, h in want["outputs"].items() if got["outputs"].get(f) != h]
    committed = manifest_file.parent
    problems += [f"committed {f} differs from the manifest" for f, h in want["outputs"].items()
                 if not (committed / f).is_file() or _sha(committed / f) != h]
    return problems


def data_md(out: Path, manifest: dict) -> str:
    """``DATA.md``: per task its splits, sizes and provenance (source repository, commit, file, licence)."""
    lines = ["# Real task data: provenance", "",
             "Generated by `python -m sample_adapters.realdata` from `../shared/datasets/` (do not edit by hand; "
             "`python -m sample_adapters.realdata --check` rebuilds every file and compares its sha256 with "
             "`MANIFEST.json`). Only the subsets the project trains and scores on are committed. Every split is a "
             f"seeded sample (seed {SEED}); no text (or text pair, compared lower-cased with spaces collapsed) is in "
             "two splits of a task: test is drawn first, then validation, then train, each dropping what an "
             f"earlier one holds. At most {MAX_TRAIN} training, {VALIDATION_SIZE} validation and {TEST_SIZE} "
             "test rows per task.", "",
             "| task | labels | train / validation / test | splits | GLUE metric |", "|---|---|---|---|---|"]
    for name, task in TASKS.items():
        meta = json.loads((out / name / "labels.json").read_text())
        z = meta["sizes"]
        lines.append(f"| `{name}` | {', '.join(task.labels)} | {z['train']} / {z['validation']} / {z['test']} | "
                     f"{task.splits_note} | {task.metric} |")
    lines += ["", "## Provenance", "", "| task | file in ../shared/datasets | source repository @ commit, path | licence | sha256 |",
              "|---|---|---|---|---|"]
    for name, task in TASKS.items():
        for f, src in task.sources.items():
            lines.append(f"| `{name}` | `{f}` | {src.repo} @ {src.commit}, `{src.path}` | {src.licence} | "
                         f"`{manifest['sources'][f][:16]}` |")
    lines += ["", "The copies in `../shared/datasets` are byte for byte those of the repositories above (its README). "
              "Licences: GLUE's tasks keep their own terms (GLUE asks users to cite and follow each dataset's "
              "licence); MRPC is under Microsoft's research licence; QNLI derives from SQuAD (CC BY-SA 4.0); STS-B's "
              "per-source licences are in its LICENSE.txt; AG News is for non-commercial research; emotion is "
              "released for research. These subsets are shipped for research use of this tool only.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sample_adapters.realdata", description=__doc__.split("\n\n")[0])
    p.add_argument("--shared", type=Path, default=SHARED, help="the ../shared/datasets folder")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--check", action="store_true", help="rebuild in a temporary folder and compare hashes")
    args = p.parse_args(argv)
    if not args.shared.is_dir():
        print(f"error: {args.shared} not found (the shared datasets folder)", file=sys.stderr)
        return 2
    if args.check:
        problems = check(args.shared, args.out / "MANIFEST.json")
        for line in problems:
            print(line)
        print("ok: every source and output hash matches" if not problems else f"{len(problems)} problem(s)")
        return 1 if problems else 0
    manifest = write_tasks(args.out, args.shared)
    (args.out / "MANIFEST.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    (args.out.parent / "DATA.md").write_text(data_md(args.out, manifest))
    for name in TASKS:
        meta = json.loads((args.out / name / "labels.json").read_text())
        print(f"{name:8s} {meta['sizes']}  dropped {meta['duplicates_dropped']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
