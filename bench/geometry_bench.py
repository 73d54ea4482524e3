"""Factored vs dense distances on 8 random Llama-3-8B-shaped LoRA adapters (all pairs, metrics, modules).

    .venv/bin/python bench/geometry_bench.py               # full workload, 1 torch thread
    .venv/bin/python bench/geometry_bench.py --threads 2
    .venv/bin/python bench/geometry_bench.py --quick       # tiny shapes (smoke test)

Workload: 8 adapters x 32 layers x {q 4096x4096, k 1024x4096, v 1024x4096, o 4096x4096,
gate 14336x4096, up 14336x4096, down 4096x14336}, r = 16, float32 factors from a seeded generator;
every pair (28), metrics l2 / cosine / grassmann, factors ba / a / b.

* factored: ``geometry.distances.all_distances`` (each adapter's modules decomposed once, batched
  over layers), timed for real over the whole workload.
* dense: per pair and module, form both ``tau`` (float64), L2 and cosine on the dense matrices,
  Grassmann through two dense thin SVDs, plus the A-alone and B-alone metrics. Timed for real on
  one pair of one module per shape (or on the shapes listed by ``--dense-shapes``) and
  **extrapolated** to the whole workload (x layers x pairs); shapes not timed are scaled from a
  timed shape by the SVD cost model ``m n min(m, n)``. The lines say which numbers are measured.

Times are wall clock (``time.perf_counter``); CPU time of the process is printed beside them,
which is the better figure when other jobs share the machine. The last line is one JSON object
``{"factored_s", "dense_s_extrapolated", "ratio", ...}`` (wall-clock figures; ``*_cpu_s`` beside).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from geometry.distances import FACTORS, METRICS, all_distances, dense_distance  # noqa: E402
from geometry.types import Adapter, AdapterConfig, LoraModule, ModuleKey, lora_scale  # noqa: E402

LLAMA3_8B = {
    "q": (4096, 4096),
    "k": (1024, 4096),
    "v": (1024, 4096),
    "o": (4096, 4096),
    "gate": (14336, 4096),
    "up": (14336, 4096),
    "down": (4096, 14336),
}


def make_adapters(n: int, layers: int, shapes: dict[str, tuple[int, int]], r: int, seed: int) -> list[Adapter]:
    """``n`` adapters of float32 factors, N(0, 1/dim) entries, alpha = 2r (deterministic in ``seed``)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        modules = {}
        for layer in range(layers):
            for kind, (m, k) in shapes.items():
                key = ModuleKey("model", layer, kind)
                B = torch.randn(m, r, generator=gen) / math.sqrt(m)
                A = torch.randn(r, k, generator=gen) / math.sqrt(k)
                modules[key] = LoraModule(f"model.layers.{layer}.{kind}", key, A, B, r, 2.0 * r, lora_scale(r, 2.0 * r))
        config = AdapterConfig(r=r, lora_alpha=2.0 * r, base_model_name_or_path="bench/llama-3-8b-shaped")
        out.append(Adapter(f"bench{i}", config, modules, content_hash=f"bench-{seed}-{i}"))
    return out


def dense_pair(m1: LoraModule, m2: LoraModule) -> None:
    """Everything the factored run computes for one pair of one module, the dense way."""
    t1, t2 = m1.dense(), m2.dense()
    for metric in METRICS:
        dense_distance(t1, t2, metric)
        dense_distance(m1.B, m2.B, metric)
        dense_distance(m1.A.T, m2.A.T, metric)


def sig(x: float, digits: int = 6) -> float:
    """``x`` to ``digits`` significant digits (tiny quick-run times stay non-zero)."""
    return float(f"{x:.{digits}g}")


def svd_cost(shape: tuple[int, int]) -> float:
    m, n = shape
    return float(m) * n * min(m, n)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes, 3 adapters, 2 layers (no timing claims)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--adapters", type=int, default=None)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--dense-shapes",
        default="k,q",
        help="kinds whose dense pair is timed for real (others extrapolated by m n min(m, n)); 'all' for every shape",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        shapes = {k: (max(8, m // 128), max(8, n // 128)) for k, (m, n) in LLAMA3_8B.items()}
        n_ad, n_layers, r = args.adapters or 3, args.layers or 2, args.rank or 4
    else:
        shapes = dict(LLAMA3_8B)
        n_ad, n_layers, r = args.adapters or 8, args.layers or 32, args.rank or 16
    pairs = n_ad * (n_ad - 1) // 2
    device = torch.device("cpu")
    print(f"workload: {n_ad} adapters x {n_layers} layers x {len(shapes)} modules, r = {r}, {pairs} pairs, "
          f"metrics {', '.join(METRICS)}, factors {', '.join(FACTORS)}; torch threads = {torch.get_num_threads()}")
    t = time.perf_counter()
    adapters = make_adapters(n_ad, n_layers, shapes, r, args.seed)
    print(f"generated factors in {time.perf_counter() - t:.1f} s (not timed below)")

    t, c = time.perf_counter(), time.process_time()
    res = all_distances(adapters, metrics=METRICS, factors=FACTORS, device=device)
    factored, factored_cpu = time.perf_counter() - t, time.process_time() - c
    print(f"factored, all metrics x factors: {factored:.2f} s wall, {factored_cpu:.2f} s CPU, measured "
          f"({len(res)} distance tensors)")
    t, c = time.perf_counter(), time.process_time()
    all_distances(adapters, metrics=METRICS, factors=("ba",), device=device)
    factored_ba, factored_ba_cpu = time.perf_counter() - t, time.process_time() - c
    print(f"factored, all metrics, factor ba only: {factored_ba:.2f} s wall, {factored_ba_cpu:.2f} s CPU, measured")

    timed_kinds = list(shapes) if args.dense_shapes == "all" else [k for k in args.dense_shapes.split(",") if k in shapes]
    if not timed_kinds:
        timed_kinds = [next(iter(shapes))]
    measured: dict[tuple[int, int], float] = {}
    a, b = adapters[0], adapters[1]
    for kind in timed_kinds:
        shape = shapes[kind]
        if shape in measured:
            continue
        key = ModuleKey("model", 0, kind)
        t, c = time.perf_counter(), time.process_time()
        dense_pair(a.modules[key], b.modules[key])
        measured[shape] = time.perf_counter() - t
        print(f"dense, one pair of {kind} {shape[0]}x{shape[1]}, all metrics x factors: {measured[shape]:.2f} s wall, "
              f"{time.process_time() - c:.2f} s CPU, measured")
    ref_shape = max(measured, key=svd_cost)
    per_shape = {}
    for kind, shape in shapes.items():
        if shape in measured:
            per_shape[kind] = measured[shape]
        else:
            per_shape[kind] = measured[ref_shape] * svd_cost(shape) / svd_cost(ref_shape)
            print(f"dense, one pair of {kind} {shape[0]}x{shape[1]}: {per_shape[kind]:.2f} s EXTRAPOLATED from "
                  f"{ref_shape[0]}x{ref_shape[1]} by m n min(m, n)")
    dense = sum(per_shape.values()) * n_layers * pairs
    print(f"dense, whole workload: {dense:.0f} s EXTRAPOLATED (one pair per shape x {n_layers} layers x {pairs} pairs)")
    ratio = dense / factored
    print(f"factored {factored:.2f} s vs dense {dense:.0f} s (extrapolated): {ratio:.0f}x")
    print(json.dumps({
        "factored_s": sig(factored),
        "dense_s_extrapolated": sig(dense),
        "ratio": sig(ratio),
        "factored_cpu_s": sig(factored_cpu),
        "factored_ba_s": sig(factored_ba),
        "factored_ba_cpu_s": sig(factored_ba_cpu),
        "threads": torch.get_num_threads(),
        "adapters": n_ad,
        "layers": n_layers,
        "rank": r,
        "dense_measured_shapes": [f"{m}x{n}" for m, n in measured],
        "quick": bool(args.quick),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
