"""The house rules of Library 2.0, checked on the source (bench/structure.py does the counting): no import
circle in geometry/, no library file over ~500 lines without a reason at its top, the library never imports
ui/, and function-local imports only where they defer a heavy dependency."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_no_import_circle_in_the_library(load_bench):
    assert load_bench("structure").import_cycles() == []


def test_long_library_files_say_why_at_their_top():
    for path in sorted((REPO / "geometry").rglob("*.py")):
        lines = path.read_text().splitlines()
        if len(lines) > 500:
            head = "\n".join(lines[:12])
            assert "on purpose" in head, f"{path.relative_to(REPO)}: {len(lines)} lines and no reason at its top"


def test_the_library_never_imports_the_dashboard(load_bench):
    structure = load_bench("structure")
    for path in sorted((REPO / "geometry").rglob("*.py")):
        for names, _ in structure._imports(path):
            assert not any(n == "ui" or n.startswith("ui.") or n == "streamlit" for n in names), path


def test_function_local_imports_only_defer_heavy_modules(load_bench):
    """The few left (the dashboard's cached calls import geometry lazily on purpose) stay few."""
    counts = load_bench("structure").local_imports()
    library = {f: n for f, n in counts["by_file"].items() if f.startswith("geometry/")}
    assert sum(library.values()) <= 10, library
