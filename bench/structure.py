"""The house's shape, measured: modules and lines per folder, function-local imports, import circles,
and the modules two dashboard paths pass through (issue "Library 2.0").

    python bench/structure.py            # the static counts and both traces
    python bench/structure.py --static   # the counts only (no model, a second)

Static counts (``ast``, no import): per folder the number of ``.py`` modules, their lines and the largest
file; ``import`` statements inside a function body (split into optional heavy dependencies, which are
allowed, and the rest); strongly connected components of the module import graph of ``geometry``
(every import, function-local ones included: a circle hidden by a function-local import is still one).

Traces (``sys.setprofile``, project code only): the sequence of modules whose functions are called, with
consecutive calls inside one module collapsed. ``modules`` is how many distinct modules the path passes,
``re-entries`` how many times it enters a module it had already left; the same is counted "by concept",
each module replaced by its area (``geometry.io``, ``geometry.linalg``... ``ui``, ``pages``: the
subpackages, and for the flat layout before them the same grouping, :data:`FLAT_AREAS`). Path 1: an uploaded zip (bytes,
as the browser sends them) to the distance heatmap's figure; path 2: scoring a merge of two sample
adapters on 8 test examples per task (ANP).
"""

from __future__ import annotations

import argparse
import ast
import io
import sys
import zipfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("geometry", "ui", "pages", "bench", "tests", "sample_adapters", "deploy")
# imports that may stay function-local: optional or heavy dependencies loaded only when a command needs them
HEAVY = {
    "torch", "transformers", "peft", "umap", "numba", "dask", "distributed", "pyarrow", "plotly", "kaleido",
    "streamlit", "huggingface_hub", "rouge_score", "sklearn", "scipy", "safetensors", "diskcache", "tqdm",
    "pandas", "gguf", "playwright", "cachetools", "yaml", "sentence_transformers", "fsspec", "requests",
}


def _py_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if ".venv" not in p.parts and "__pycache__" not in p.parts)


def folder_counts() -> list[dict]:
    rows = []
    for name in FOLDERS:
        files = _py_files(ROOT / name)
        if not files:
            continue
        lines = {p: len(p.read_text().splitlines()) for p in files}
        big = max(lines, key=lines.get)
        rows.append({
            "folder": name, "modules": len(files), "lines": sum(lines.values()),
            "largest": f"{big.relative_to(ROOT)} ({lines[big]})",
            "over_500": sum(v > 500 for v in lines.values()),
        })
    return rows


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path):
    """(imported module, inside a function?) for each import statement of ``path``."""
    tree = ast.parse(path.read_text())
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]

    def resolve(node: ast.ImportFrom) -> list[str]:
        base = package[: len(package) - (node.level - 1)] if node.level else []
        mod = ".".join(base + ([node.module] if node.module else []))
        if node.module is None or node.level:
            # ``from . import x`` / ``from .pkg import x``: x may be a module
            return [f"{mod}.{a.name}" if mod else a.name for a in node.names] + [mod]
        return [mod] + [f"{mod}.{a.name}" for a in node.names]

    out = []

    def visit(node, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            local = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for a in child.names:
                    out.append(([a.name], in_function))
            elif isinstance(child, ast.ImportFrom):
                out.append((resolve(child), in_function))
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                continue
            visit(child, local)

    visit(tree, False)
    return out


def _is_type_checking(test) -> bool:
    return isinstance(test, ast.Name) and test.id == "TYPE_CHECKING" or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _heavy_modules() -> set[str]:
    """Project modules whose import (through top-level imports only) loads a heavy dependency."""
    files = {_module_name(p): p for folder in ("geometry", "ui") for p in _py_files(ROOT / folder)}
    top: dict[str, set[str]] = {}
    direct_heavy: set[str] = set()
    for mod, path in files.items():
        top[mod] = set()
        for names, in_function in _imports(path):
            if in_function:
                continue
            if names[0].split(".")[0] in HEAVY:
                direct_heavy.add(mod)
            top[mod].update(n for n in names if n in files)
            # importing a submodule runs its package's __init__ first
            parts = names[0].split(".")
            top[mod].update(".".join(parts[:k]) for k in range(1, len(parts)) if ".".join(parts[:k]) in files)
    heavy = set(direct_heavy)
    changed = True
    while changed:
        changed = False
        for mod in top:
            parents = {".".join(mod.split(".")[:k]) for k in range(1, mod.count(".") + 1)}
            if mod not in heavy and (top[mod] | parents) & heavy:  # a submodule runs its package first
                heavy.add(mod)
                changed = True
    return heavy


def local_imports() -> dict:
    """Function-local imports, split: of a heavy dependency or of a project module that loads one (deferred on
    purpose, allowed), and of the standard library or a light project module (avoidable)."""
    heavy_modules = _heavy_modules()
    heavy = other = 0
    others: Counter = Counter()
    for folder in ("geometry", "ui", "pages"):
        for path in _py_files(ROOT / folder):
            for names, in_function in _imports(path):
                if not in_function:
                    continue
                top = names[0].split(".")[0]
                third_party = top not in {"geometry", "ui", "pages"} and top not in sys.stdlib_module_names
                # importing geometry.a.b runs geometry/a/__init__ first: a heavy package makes it heavy too
                parents = {".".join(n.split(".")[:k]) for n in names for k in range(1, n.count(".") + 1)}
                if top in HEAVY or third_party or any(n in heavy_modules for n in [*names, *parents]):
                    heavy += 1
                else:
                    other += 1
                    others[str(path.relative_to(ROOT))] += 1
    return {"heavy_or_optional": heavy, "project_or_stdlib": other, "by_file": dict(others.most_common(8))}


def import_cycles() -> list[list[str]]:
    files = _py_files(ROOT / "geometry")
    modules = {_module_name(p): p for p in files}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        for names, _ in _imports(path):
            for name in names:
                if name in modules and name != mod and not mod.startswith(name + "."):
                    graph[mod].add(name)
    # Tarjan's strongly connected components
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    comps: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            strong(v)
    return comps


# ------------------------------------------------------------------------------------------ traces
class Trace:
    """Record the project modules entered by calls, consecutive repeats collapsed."""

    def __init__(self) -> None:
        self.sequence: list[str] = []
        self.prefixes = tuple(str(ROOT / f) + "/" for f in ("geometry", "ui", "pages"))

    def __call__(self, frame, event, arg) -> None:
        if event != "call":
            return
        filename = frame.f_code.co_filename
        if not filename.startswith(self.prefixes):
            return
        mod = str(Path(filename).relative_to(ROOT))
        if not self.sequence or self.sequence[-1] != mod:
            self.sequence.append(mod)

    def __enter__(self):
        sys.setprofile(self)
        return self

    def __exit__(self, *exc) -> None:
        sys.setprofile(None)

    def summary(self) -> dict:
        return {**_reentries(self.sequence), "areas": _reentries(_collapse([area(m) for m in self.sequence]))}


def _collapse(sequence: list[str]) -> list[str]:
    return [x for k, x in enumerate(sequence) if k == 0 or sequence[k - 1] != x]


def _reentries(sequence: list[str]) -> dict:
    seen: set[str] = set()
    reentries: Counter = Counter()
    for mod in sequence:
        if mod in seen:
            reentries[mod] += 1
        seen.add(mod)
    return {"modules": len(seen), "re-entries": sum(reentries.values()), "most re-entered": dict(reentries.most_common(3))}


#: The concept each module of the flat layout (before Library 2.0) belongs to: the same grouping as the
#: subpackages after it, so that both trees are counted alike.
FLAT_AREAS = {
    **dict.fromkeys(("loader", "config", "naming", "limits", "summary"), "io"),
    **dict.fromkeys(("factored", "gram", "decompose", "align", "spectra"), "linalg"),
    **dict.fromkeys(("distances", "inclusion", "anatomy", "maps", "stats", "tokens", "particles"), "analysis"),
    **dict.fromkeys(("runtime", "base_models"), "runtime"),
    **dict.fromkeys(("evaluate", "merge_eval", "tasks", "metrics"), "evaluation"),
    **dict.fromkeys(("survey", "survey_dask"), "survey"),
    "diskcache": "cache",
}


def area(path: str) -> str:
    """The concept a module file belongs to: ``geometry.<subpackage>`` (or its one module), ``ui``, ``pages``."""
    parts = Path(path).with_suffix("").parts
    if parts[0] != "geometry":
        return parts[0]
    name = parts[1] if len(parts) > 2 else FLAT_AREAS.get(parts[1], parts[1])
    return f"geometry.{name}"


def _zip_of(folder: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for p in sorted(folder.iterdir()):
            if p.is_file():
                z.write(p, f"{folder.name}/{p.name}")
    return buf.getvalue()


def traces() -> dict:
    sys.path.insert(0, str(ROOT))  # the dashboard's ui/ package lives beside the library, not inside it
    import os
    import tempfile
    import warnings

    # a fresh, empty cache: the trace follows the computation, not a cache hit
    os.environ["ADAPTER_ATLAS_CACHE"] = tempfile.mkdtemp(prefix="atlas-trace-")

    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("streamlit").setLevel(logging.ERROR)
    import geometry  # noqa: F401  (imports are not the path being measured)
    import ui.compute  # noqa: F401
    import ui.figures  # noqa: F401

    for name in ("streamlit", "streamlit.runtime", "streamlit.runtime.caching", "streamlit.runtime.scriptrunner_utils"):
        logging.getLogger(name).setLevel(logging.CRITICAL)

    sample = ROOT / "sample_adapters" / "real"
    blobs = {name: _zip_of(sample / name) for name in ("sst2", "mrpc", "qnli")}
    out = {}
    with Trace() as t1:
        _path_upload_to_heatmap(blobs)
    out["zip upload -> distance heatmap"] = t1.summary()
    with Trace() as t2:
        _path_merge_scores(sample)
    out["merge -> scores and ANP"] = t2.summary()
    return out


def _path_upload_to_heatmap(blobs: dict[str, bytes]) -> None:
    """What the dashboard does with uploaded zips: its upload handler, its cached distances, the heatmap."""
    from geometry.adapter_set import AdapterSet
    from ui import compute, figures

    if hasattr(__import__("ui.adapter_set").adapter_set, "load_uploads"):
        from ui.adapter_set import load_uploads

        aset = AdapterSet()
        load_uploads(aset, [(f"{n}.zip", b) for n, b in blobs.items()])
        adapters = aset.adapters
    else:  # the layout before Library 2.0
        from geometry.loader import load_zip_bytes

        adapters = [load_zip_bytes(b, name=n, source=f"{n}.zip") for n, b in blobs.items()]
    dists = compute.distances(adapters)
    key = ("grassmann", "ba", "model", "v")
    tensor = dists.get(key) or next(iter(dists.values()))
    matrix = tensor.reduce(tensor.layers)
    figures.matrix_heatmap(matrix, [a.name for a in adapters], title="Grassmann", value_label="distance")


def _path_merge_scores(sample: Path) -> None:
    import geometry

    ads = geometry.load([sample / "sst2", sample / "mrpc"])
    merged = geometry.merge(ads, method="ties", density=0.2)
    if hasattr(geometry, "evaluate_merge"):
        geometry.evaluate_merge(merged, tasks=sample / "tasks", limit=8)
    else:  # the layout before Library 2.0
        geometry.evaluate(merged, tasks=sample / "tasks", limit=8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--static", action="store_true", help="only the static counts")
    args = parser.parse_args()
    print("| folder | modules | lines | files over 500 lines | largest |\n|---|---|---|---|---|")
    for r in folder_counts():
        print(f"| {r['folder']} | {r['modules']} | {r['lines']} | {r['over_500']} | {r['largest']} |")
    li = local_imports()
    print(f"\nfunction-local imports in geometry/, ui/, pages/: {li['heavy_or_optional'] + li['project_or_stdlib']} "
          f"({li['heavy_or_optional']} defer a heavy dependency or a project module that loads one; "
          f"{li['project_or_stdlib']} of the standard library or a light project module); "
          f"most of the latter: {li['by_file']}")
    cycles = import_cycles()
    print(f"import circles in geometry/ (every import counted): {len(cycles)}")
    for c in cycles:
        print("  " + " <-> ".join(c))
    if not args.static:
        for name, s in traces().items():
            a = s["areas"]
            print(f"trace {name}: {s['modules']} modules, {s['re-entries']} re-entries "
                  f"(most: {s['most re-entered']}); by concept: {a['modules']} areas, {a['re-entries']} re-entries "
                  f"(most: {a['most re-entered']})")


if __name__ == "__main__":
    main()
