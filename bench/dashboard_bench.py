"""Dashboard bench: cold compute of an adapter set vs a slider move (re-slice + figure build).

    .venv/bin/python -m bench.dashboard_bench [--samples DIR] [--repeats 20]    # from the repository root

(The dashboard's ``ui/`` lives beside the installed library, not inside it: run from the repository root.)

On the sample adapters (``sample_adapters/``; when none are there yet, 8 synthetic adapters with
the samples' shapes: all-MiniLM-L6-v2, 6 layers, q and v of 384 x 384, r = 8) it times:

* cold compute: everything the pages compute once per adapter set (``all_distances``, ``anatomy``
  of each adapter, ``inclusion`` of every ordered pair), in this process, no cache;
* disk-cache hit: reading the same results back from the dashboard's disk cache, ``ui.cache.results()``
  (a server restart);
* slider move, library side: what one layer-slider step re-does on the Distances page (mean over
  the chosen layers, heatmap, PCA map, per-layer lines, figure JSON for the browser), with the
  geometry already computed;
* slider move, whole page: an ``AppTest`` rerun of the Distances page after moving the slider
  (Streamlit's script run, the memory cache lookups and every figure), median of the repeats;
* in a real browser (headless Debian chromium; skipped without it or with ``--no-browser``): the time
  from a click on a control to the redrawn figure, ``--clicks`` per page on Distances, Inclusion and
  Anatomy (``bench/browser_latency.py``), p50 / p95 per page and over all clicks, each page's p50 as a
  ratio of the floor: the same clicks on ``bench/latency_floor_app.py`` (one control, one heatmap,
  nothing else), the cost of a Streamlit round trip in this browser on this machine.

Prints the numbers, the ratio cold / slider move, and a last line of JSON (``p50_s``, ``p95_s``: the
browser's click-to-figure times over every page).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("NUMBA_CACHE_DIR", str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                                               / "adapter-atlas" / "numba"))

import torch  # noqa: E402

torch.set_num_threads(1)

from bench import browser_latency  # noqa: E402
from geometry.analysis.anatomy import anatomy  # noqa: E402
from geometry.analysis.distances import all_distances  # noqa: E402
from geometry.analysis.inclusion import inclusion  # noqa: E402
from geometry.io.loader import load_adapter  # noqa: E402
from ui import figures, views  # noqa: E402
from ui.adapter_set import list_sample_adapters, sample_name  # noqa: E402


def _synthetic_samples(root: Path, n: int = 8) -> Path:
    """Peft-format folders with the sample adapters' shapes (for when sample_adapters/ is empty)."""
    import json as _json

    from safetensors.torch import save_file

    for k in range(n):
        gen = torch.Generator().manual_seed(k)
        folder = root / f"synthetic{k}"
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for layer in range(6):
            for name in ("query", "value"):
                prefix = f"base_model.model.encoder.layer.{layer}.attention.self.{name}"
                tensors[f"{prefix}.lora_A.weight"] = torch.randn(8, 384, generator=gen) / 384**0.5
                tensors[f"{prefix}.lora_B.weight"] = torch.randn(384, 8, generator=gen) / 384**0.5 * 0.1
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text(_json.dumps({
            "peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["query", "value"],
            "base_model_name_or_path": "sentence-transformers/all-MiniLM-L6-v2",
        }))
    return root


def _timed(fn, repeats: int = 1):
    times, value = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - t0)
    return value, times


def slider_move(dists, names, layer: int, kind: str = "v"):
    """What one layer-slider step re-does on the Distances page, with the geometry computed."""
    from geometry.analysis.maps import embed_2d

    tensor = dists[("cosine", "ba", "model", kind)]
    choice = views.LayerChoice("one", layer=layer)
    matrix, used = views.distance_matrix(tensor, choice)
    heat = figures.matrix_heatmap(matrix, names, title="t\nsub", value_label="1 − cos", detail=choice.describe(used))
    coords = embed_2d(matrix, method="pca")
    scatter = figures.embedding_scatter(coords, names, title="map", method="PCA")
    pairs = [(names[0], b) for b in names[1:4]]
    lines = figures.layer_lines(views.pair_layer_frame(tensor, pairs), title="lines", value_label="1 − cos")
    for fig in (heat, scatter, lines):
        fig.to_json()  # what st.plotly_chart sends (HTML / CSV downloads are built only on click)
    return matrix


def apptest_slider(samples: Path, cache: Path, repeats: int) -> list[float]:
    """Median-able times of Distances-page reruns after a layer-slider move (warm caches)."""
    from streamlit.testing.v1 import AppTest

    os.environ["ADAPTER_ATLAS_SAMPLES"] = str(samples)
    os.environ["ADAPTER_ATLAS_CACHE"] = str(cache)
    at = AppTest.from_file(str(REPO / "pages" / "distances.py"), default_timeout=600).run()
    at.segmented_control(key="layers").set_value("one layer").run()
    layers = list(at.select_slider(key="layer").options)
    times = []
    for i in range(repeats):
        at.select_slider(key="layer").set_value(layers[i % len(layers)])
        t0 = time.perf_counter()
        at.run()
        times.append(time.perf_counter() - t0)
        assert not at.exception, at.exception
    return times


def _pct(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=float), q))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=Path, default=None, help="folder of adapters (default: sample_adapters/)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--clicks", type=int, default=20, help="browser clicks per page (at least 20 for p95)")
    parser.add_argument("--no-browser", action="store_true", help="skip the real-browser latency")
    args = parser.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="dashboard_bench_"))
    root = args.samples or REPO / "sample_adapters" / "real"
    paths = list_sample_adapters(root)
    source = "sample_adapters" if paths else "synthetic (sample shapes)"
    if not paths:
        root = _synthetic_samples(tmp / "samples")
        paths = list_sample_adapters(root)
    adapters = [load_adapter(str(p), name=sample_name(p, root)) for p in paths]
    names = [a.name for a in adapters]
    n = len(adapters)
    print(f"adapter set: {n} adapters from {source}; modules per adapter: {len(adapters[0].modules)}")

    dists, t_dist = _timed(lambda: all_distances(adapters))
    _, t_anat = _timed(lambda: [anatomy(a) for a in adapters])
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    _, t_incl = _timed(lambda: [inclusion(adapters[i], adapters[j]) for i, j in pairs])
    cold = t_dist[0] + t_anat[0] + t_incl[0]
    print(f"cold compute: all_distances {t_dist[0]:.3f} s, anatomy x{n} {t_anat[0]:.3f} s, "
          f"inclusion x{len(pairs)} {t_incl[0]:.3f} s, total {cold:.3f} s")

    os.environ["ADAPTER_ATLAS_CACHE"] = str(tmp / "cache")
    key = ("bench", *(a.content_hash for a in adapters))
    from ui.cache import results

    store = results()
    store.get_or_compute("all_distances", key, lambda: dists)
    _, t_disk = _timed(lambda: store.get_or_compute("all_distances", key, lambda: None), repeats=5)
    print(f"disk-cache hit (all_distances): {statistics.median(t_disk) * 1e3:.1f} ms")

    layers = dists[("cosine", "ba", "model", "v")].layers
    slider_move(dists, names, layers[-1])  # warm-up (imports, first PCA)
    _, t_move = _timed(lambda: slider_move(dists, names, layers[len(layers) // 2]), repeats=args.repeats)
    move = statistics.median(t_move)
    print(f"slider move, library side (re-slice + PCA + 3 figures + JSON): median {move * 1e3:.1f} ms "
          f"(min {min(t_move) * 1e3:.1f}, max {max(t_move) * 1e3:.1f})")

    t_page = apptest_slider(root, tmp / "page_cache", max(5, args.repeats // 2))
    page = statistics.median(t_page)
    print(f"slider move, whole Distances page rerun (AppTest, warm caches): median {page * 1e3:.1f} ms "
          f"(min {min(t_page) * 1e3:.1f}, max {max(t_page) * 1e3:.1f})")
    print(f"ratio cold compute / page rerun: {cold / page:.1f}x; target page rerun < 300 ms: "
          f"{'met' if page < 0.3 else 'NOT met'}")
    browser: dict[str, list[float]] = {}
    floor: list[float] = []
    if not args.no_browser and browser_latency.chromium():
        floor = browser_latency.measure_floor(tmp / "floor_cache", clicks=args.clicks)
        print(f"browser, floor (bench/latency_floor_app.py: one control, one heatmap): p50 "
              f"{_pct(floor, 50) * 1e3:.0f} ms, p95 {_pct(floor, 95) * 1e3:.0f} ms over {len(floor)} clicks")
        browser = browser_latency.measure(root, tmp / "browser_cache", clicks=args.clicks)
        for path, times in browser.items():
            print(f"browser, {path}: click to redrawn figure p50 {_pct(times, 50) * 1e3:.0f} ms, "
                  f"p95 {_pct(times, 95) * 1e3:.0f} ms over {len(times)} clicks "
                  f"(p50 {_pct(times, 50) / _pct(floor, 50):.2f}x the floor)")
    every = [t for times in browser.values() for t in times]
    p50, p95 = (_pct(every, 50), _pct(every, 95)) if every else (None, None)
    if every:
        print(f"browser, all pages: p50 {p50 * 1e3:.0f} ms, p95 {p95 * 1e3:.0f} ms "
              f"(target p50 < 250 ms: {'met' if p50 < 0.25 else 'NOT met'}; p95 < 500 ms: "
              f"{'met' if p95 < 0.5 else 'NOT met'})")
    print(json.dumps({
        "p50_s": None if p50 is None else round(p50, 4), "p95_s": None if p95 is None else round(p95, 4),
        "browser_pages": {k: {"p50_s": round(_pct(v, 50), 4), "p95_s": round(_pct(v, 95), 4), "clicks": len(v)}
                          for k, v in browser.items()},
        "floor_p50_s": round(_pct(floor, 50), 4) if floor else None,
        "floor_p95_s": round(_pct(floor, 95), 4) if floor else None,
        "bench": "dashboard", "source": source, "n_adapters": n, "cold_compute_s": round(cold, 4),
        "all_distances_s": round(t_dist[0], 4), "anatomy_s": round(t_anat[0], 4), "inclusion_s": round(t_incl[0], 4),
        "disk_hit_ms": round(statistics.median(t_disk) * 1e3, 2), "slider_library_ms": round(move * 1e3, 2),
        "slider_page_ms": round(page * 1e3, 2), "ratio_cold_over_page": round(cold / page, 2),
        "target_met": page < 0.3, "device": str(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
