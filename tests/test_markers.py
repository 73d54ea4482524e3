"""The marker policy, checked on the test files' source (no test is imported or run):

* ``browser``: every test that reaches chromium or playwright (in its body, a fixture or helper of its
  module, or a module constant it uses);
* ``cuda``: every test of a ``*cuda*`` file, and every test that reaches ``torch.cuda`` / ``.cuda()`` or
  asks for ``device="cuda"``;
* ``docker``: every test that reaches ``deploy.image_check`` (the real image build) or a ``docker`` /
  ``podman`` executable;
* the four markers (and ``slow``) are registered, and ``--strict-markers`` refuses any other.

The fast subset ``-m "not slow and not browser and not docker"`` then leaves out every test that needs a
browser or a container, whatever its author remembered.
"""

from __future__ import annotations

import ast
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
MARKERS = ("slow", "browser", "docker", "cuda")


@dataclass
class Found:
    file: str
    name: str
    marks: set[str]
    tokens: set[str] = field(default_factory=set)

    @property
    def needs(self) -> set[str]:
        out = set()
        if any(re.search(r"chromium|playwright", t, re.I) for t in self.tokens if not t.startswith("str:")):
            out.add("browser")
        if "cuda" in self.file or {"attr:cuda", "device:cuda", "HAS_CUDA"} & self.tokens:
            out.add("cuda")
        if {"deploy.image_check", "which:docker", "which:podman"} & self.tokens:
            out.add("docker")
        return out


def _marks(node: ast.AST, assigned: dict[str, ast.AST], seen: frozenset = frozenset()) -> set[str]:
    """``X`` of every ``pytest.mark.X`` in ``node``, following module-level names (``cuda = [pytest.mark.cuda]``)."""
    out = set()
    for sub in ast.walk(node):
        if (isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Attribute) and sub.value.attr == "mark"
                and isinstance(sub.value.value, ast.Name) and sub.value.value.id == "pytest"):
            out.add(sub.attr)
        elif isinstance(sub, ast.Name) and sub.id in assigned and sub.id not in seen:
            out |= _marks(assigned[sub.id], assigned, seen | {sub.id})
    return out


def _tokens(node: ast.AST) -> tuple[set[str], set[str]]:
    """``(tokens, names used)`` of a definition: identifiers, attributes (``attr:NAME``), string constants
    (``str:VALUE``, docstrings left out), ``device="cuda"`` keywords, executables looked up
    (``shutil.which("chromium")``: ``which:chromium``)."""
    tokens, names = set(), set()
    docstrings = {id(n.body[0].value) for n in ast.walk(node)
                  if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)) and n.body
                  and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name):
            tokens.add(sub.id)
            names.add(sub.id)
        elif isinstance(sub, ast.arg):
            names.add(sub.arg)  # fixtures are requested by argument name
        elif isinstance(sub, ast.Attribute):
            tokens.add(f"attr:{sub.attr}")
        elif isinstance(sub, ast.Constant) and isinstance(sub.value, str) and id(sub) not in docstrings:
            tokens.add(f"str:{sub.value}")
        elif isinstance(sub, ast.keyword) and sub.arg == "device" and isinstance(sub.value, ast.Constant):
            tokens.add(f"device:{sub.value.value}")
        elif isinstance(sub, ast.Call) and isinstance(sub.func, ast.Attribute) and sub.func.attr in ("device", "which"):
            tokens |= {f"{sub.func.attr}:{a.value}" for a in sub.args if isinstance(a, ast.Constant)}
        if isinstance(sub, (ast.Import, ast.ImportFrom)):  # a function-local import: its module and names
            module = getattr(sub, "module", None) or ""
            tokens |= {module, *(a.name for a in sub.names)}
    return tokens, names


def _scan(path: Path) -> list[Found]:
    tree = ast.parse(path.read_text(), filename=str(path))
    defs: dict[str, ast.AST] = {}  # module-level functions, classes, constants and imports, by name
    assigned: dict[str, ast.AST] = {}
    module_marks: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defs[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name):
                    defs[target.id] = assigned[target.id] = node.value
        elif isinstance(node, (ast.Import, ast.ImportFrom)):  # each imported name: its own module and name
            module = getattr(node, "module", None) or ""
            for alias in node.names:
                defs[(alias.asname or alias.name).split(".")[0]] = ast.Tuple(
                    [ast.Name(module), ast.Name(alias.name), ast.Name(f"{module}.{alias.name}".strip("."))])
    if "pytestmark" in assigned:
        module_marks = _marks(assigned["pytestmark"], assigned)
    cache: dict[str, tuple[set[str], set[str]]] = {name: _tokens(node) for name, node in defs.items()}

    def reach(name: str) -> set[str]:
        tokens, todo, seen = set(), [name], set()
        while todo:
            current = todo.pop()
            if current in seen or current not in cache:
                continue
            seen.add(current)
            own, names = cache[current]
            tokens |= own
            todo += names
        return tokens

    found = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test_"):
            marks = module_marks | set().union(*(_marks(d, assigned) for d in node.decorator_list))
            found.append(Found(path.name, node.name, marks, reach(node.name)))
    return found


ALL = [t for path in sorted(TESTS.glob("test_*.py")) if path.name != "test_markers.py" for t in _scan(path)]


@pytest.mark.parametrize("marker", ["browser", "cuda", "docker"])
def test_every_test_that_needs_it_carries_the_marker(marker):
    missing = [f"{t.file}::{t.name}" for t in ALL if marker in t.needs and marker not in t.marks]
    assert not missing, f"tests needing {marker} without @pytest.mark.{marker}: {missing}"


def test_the_policy_sees_the_known_cases():
    """The scan is not vacuous: tests known to need a browser, CUDA or the Dockerfile are found as such."""
    by_name = {(t.file, t.name): t for t in ALL}
    needs = {name: t.needs for name, t in by_name.items()}
    assert all("browser" in n for (f, _), n in needs.items() if f in ("test_browser.py", "test_sessions_browser.py"))
    assert "browser" in needs["test_downloads.py", "test_svg_and_pdf_export"]  # kaleido drives chromium
    assert "browser" not in needs["test_downloads.py", "test_html_embeds_plotly_js"]
    assert "cuda" in needs["test_runtime.py", "test_cuda_matches_cpu_and_memory_is_factored"]
    assert "cuda" in needs["test_gram.py", "test_cuda_distances_equal_cpu"]
    assert "cuda" not in needs["test_gram.py", "test_auto_gram_dtype_rule_and_errors"]
    assert "docker" in needs["test_image_check.py", "test_no_podman_and_no_way_to_install_it_is_a_skip_with_the_reason"]
    assert len(ALL) > 500


def test_markers_are_registered_and_strict():
    options = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    registered = {line.split(":")[0].strip() for line in options["markers"]}
    assert set(MARKERS) <= registered
    assert "--strict-markers" in options["addopts"].split()
    used = set().union(*(t.marks for t in ALL))
    assert used <= registered | {"parametrize", "skipif", "skip", "xfail", "usefixtures", "filterwarnings"}, used
